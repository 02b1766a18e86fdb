//! The client's error type and its mapping from gRPC statuses (the error table of keel.proto).

use std::time::Duration;

use keel_proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// The `ErrorInfo.reason` a broker sets when it does not lead the partition.
pub const NOT_LEADER_REASON: &str = "NOT_LEADER";

/// The `ErrorInfo.reason`s of the Groups service (keel.proto's Groups table): a status carrying
/// one becomes [`ClientError::Group`]; any other reason keeps its plain gRPC-code mapping.
pub const GROUP_REASONS: &[&str] = &[
    "NOT_COORDINATOR",
    "COORDINATOR_LOADING",
    "COORDINATOR_WRITE_UNKNOWN",
    "INVALID_REQUEST",
    "UNKNOWN_MEMBER_ID",
    "FENCED_MEMBER_EPOCH",
    "STALE_MEMBER_EPOCH",
    "OFFSET_ABOVE_HIGH_WATERMARK",
    "OFFSET_BELOW_LOG_START",
    "UNKNOWN_TOPIC_OR_PARTITION",
    "GROUP_ID_NOT_FOUND",
    "GROUP_NOT_EMPTY",
    "GROUP_MAX_SIZE_REACHED",
    "GROUPS_MAX_REACHED",
    "METADATA_TOO_LARGE",
    "INCONSISTENT_ASSIGNOR",
    "STALE_ATTEMPT",
    "RECORD_SETTLED",
    "RETRY_BACKLOG_FULL",
    "PUBLISHES_PENDING",
    "PRODUCER_ID_NEEDED",
];

/// The `ErrorInfo.reason`s of an idempotent producer's refused batch (keel.proto's Produce
/// table): a status carrying one becomes [`ClientError::Producer`].
pub const PRODUCER_REASONS: &[&str] =
    &["OUT_OF_ORDER_SEQUENCE", "PRODUCER_FENCED", "UNKNOWN_PRODUCER_ID", "DUPLICATE_SEQUENCE_NUMBER"];

/// ErrorInfo reasons of refused transaction calls (keel.proto, PrepareTxn and EndTxn), reported
/// as [`ClientError::Producer`]; none is retriable.
pub const TXN_REASONS: &[&str] =
    &["TXN_CONTRADICTS", "TXN_EXPIRED", "TXN_UNKNOWN", "TXN_CONFLICT", "TXN_NOT_RESUMABLE"];

/// Why a client call failed.
///
/// [`ClientError::is_retriable`] separates errors that a later attempt may cure (the cluster
/// moved, a connection broke) from those it will not (bad input, missing topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The node does not lead the partition; the hint names the leader when the node knows it.
    #[error("not the leader: {message} (leader hint: {leader_addr:?})")]
    NotLeader {
        /// The broker's message.
        message: String,
        /// The leader's node id, if known.
        leader_id: Option<u64>,
        /// The leader's `host:port`, if known.
        leader_addr: Option<String>,
    },
    /// UNAVAILABLE: retry the call. A produce that failed this way may still have been written.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// NOT_FOUND: no such topic or partition.
    #[error("not found: {0}")]
    NotFound(String),
    /// INVALID_ARGUMENT: bad input; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// ALREADY_EXISTS: the topic exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// FAILED_PRECONDITION: do not retry until the cluster's state changes.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// OUT_OF_RANGE: the offset is outside the partition's log.
    #[error("offset out of range: {0}")]
    OutOfRange(String),
    /// RESOURCE_EXHAUSTED: a configured limit was hit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// RESOURCE_EXHAUSTED with a retry delay (reason QUOTA_EXCEEDED): over a byte-rate quota;
    /// retried after at least `retry_after`.
    #[error("throttled for {retry_after:?}: {message}")]
    Throttled {
        /// The broker's message.
        message: String,
        /// How long the broker asked to wait.
        retry_after: Duration,
    },
    /// DEADLINE_EXCEEDED from the server: the write may or may not have been committed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// No answer within the client's own deadline: as ambiguous as `DeadlineExceeded`.
    #[error("timed out after {after:?}: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The connection failed or was reset (also the catch-all for CANCELLED, ABORTED, UNKNOWN).
    #[error("transport error: {0}")]
    Transport(String),
    /// Any other status (INTERNAL, UNIMPLEMENTED, ...): a bug or a version mismatch.
    #[error("server error ({code:?}): {message}")]
    Server {
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A record does not fit in a batch of `batch_bytes_max` bytes.
    #[error("record of {size} bytes does not fit in a batch of at most {limit} bytes")]
    RecordTooLarge {
        /// Encoded size of the batch holding only this record.
        size: usize,
        /// The producer's `batch_bytes_max`.
        limit: usize,
    },
    /// The client's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server answered with something the client cannot use (a corrupt batch, a wrong count).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The producer or consumer was closed or dropped before the operation finished.
    #[error("the client was closed")]
    Closed,
    /// A consumer-group call was refused or must go elsewhere; `reason` is the broker's
    /// `google.rpc.ErrorInfo` reason (keel.proto's Groups table, e.g. `UNKNOWN_MEMBER_ID`,
    /// `STALE_MEMBER_EPOCH`, `NOT_COORDINATOR`).
    #[error("{reason}: {message}")]
    Group {
        /// The gRPC code.
        code: Code,
        /// The ErrorInfo reason.
        reason: String,
        /// The broker's message.
        message: String,
        /// With NOT_COORDINATOR: the coordinator's `host:port`, when known.
        coordinator_addr: Option<String>,
    },
    /// An idempotent producer's batch refused by the partition for its sequence or epoch;
    /// `reason` is one of [`PRODUCER_REASONS`]. OUT_OF_ORDER_SEQUENCE (an earlier batch is being
    /// resent) and UNKNOWN_PRODUCER_ID (the partition forgot the producer, which starts a new
    /// sequence) are retried by the producer; DUPLICATE_SEQUENCE_NUMBER means the batch was
    /// stored long ago, at offsets no longer known. A refused transaction call carries one of
    /// [`TXN_REASONS`] (`TXN_CONTRADICTS`: the END contradicts how the transaction ended).
    #[error("{reason}: {message}")]
    Producer {
        /// The ErrorInfo reason.
        reason: String,
        /// The broker's message.
        message: String,
    },
    /// A produce gave up with this error after an earlier attempt whose answer was lost: the
    /// records may have been stored all the same.
    #[error("{0} (an earlier attempt may have stored the records)")]
    MaybeWritten(Box<ClientError>),
    /// The producer's outbox holds `bytes_max` bytes ([`crate::WhenFull`]); nothing was written.
    #[error("the outbox is full ({bytes_max} bytes)")]
    OutboxFull {
        /// The configured bound.
        bytes_max: u64,
    },
    /// The outbox's log could not be written or flushed (a full disk, a failed fsync): the
    /// producer stops; what the log holds is sent when it is opened again.
    #[error("outbox I/O: {0}")]
    Outbox(String),
    /// An outbox batch that may be stored was stamped so long ago (`age_ms`) that the brokers
    /// may have forgotten its producer id, so a re-send could be stored twice: parked.
    #[error("outbox batch stamped {age_ms} ms ago, past the producer expiration: parked")]
    OutboxStale {
        /// How long ago it was stamped.
        age_ms: u64,
    },
    /// The outbox's log is damaged before its end (a flipped bit, a lost segment): refused
    /// rather than served, so nothing is sent twice or dropped silently.
    #[error("outbox log corrupt in {path} at byte {offset}: {detail}")]
    OutboxCorrupt {
        /// The segment (or the directory).
        path: String,
        /// Where in it.
        offset: u64,
        /// What was found.
        detail: String,
    },
}

impl ClientError {
    /// True when the same call may succeed later without anything else changing.
    pub fn is_retriable(&self) -> bool {
        if let ClientError::MaybeWritten(last) = self {
            return last.is_retriable();
        }
        if let ClientError::Group { code, .. } = self {
            return *code == Code::Unavailable;
        }
        if let ClientError::Producer { reason, .. } = self {
            return reason == "OUT_OF_ORDER_SEQUENCE" || reason == "UNKNOWN_PRODUCER_ID";
        }
        matches!(
            self,
            ClientError::NotLeader { .. }
                | ClientError::Throttled { .. }
                | ClientError::Unavailable(_)
                | ClientError::DeadlineExceeded(_)
                | ClientError::Timeout { .. }
                | ClientError::Transport(_)
        )
    }

    /// True when the outcome of a write is unknown: it may have been committed.
    pub fn is_ambiguous(&self) -> bool {
        if let ClientError::Group { code, reason, .. } = self {
            return *code == Code::Unavailable && reason == "COORDINATOR_WRITE_UNKNOWN";
        }
        if let ClientError::Producer { reason, .. } = self {
            // Stored, but where is no longer known.
            return reason == "DUPLICATE_SEQUENCE_NUMBER";
        }
        matches!(
            self,
            ClientError::MaybeWritten(_)
                | ClientError::Unavailable(_)
                | ClientError::DeadlineExceeded(_)
                | ClientError::Timeout { .. }
                | ClientError::Transport(_)
        )
    }

    /// True when the cached connection to the node should be dropped and dialled again: a
    /// simulated (or broken) TCP connection that lost a packet never recovers by itself. Statuses
    /// the broker sent arrived over a working connection, so they keep it.
    pub(crate) fn breaks_connection(&self) -> bool {
        matches!(self, ClientError::Timeout { .. } | ClientError::Transport(_))
    }

    /// True when the partition's leader may have moved, so cached metadata must be refreshed.
    pub(crate) fn stale_metadata(&self) -> bool {
        matches!(
            self,
            ClientError::NotLeader { .. }
                | ClientError::NotFound(_)
                | ClientError::Unavailable(_)
                | ClientError::Timeout { .. }
                | ClientError::Transport(_)
        )
    }

    /// The leader hint of a NOT_LEADER error, if it names an address.
    pub fn leader_hint(&self) -> Option<&str> {
        match self {
            ClientError::NotLeader { leader_addr: Some(addr), .. } => Some(addr),
            _ => None,
        }
    }

    /// The ErrorInfo reason of a group refusal (`UNKNOWN_MEMBER_ID`, ...), if this is one.
    pub fn group_reason(&self) -> Option<&str> {
        match self {
            ClientError::Group { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// How long the broker asked to wait before a retry (a quota's throttle), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Throttled { retry_after, .. } => Some(*retry_after),
            ClientError::MaybeWritten(last) => last.retry_after(),
            _ => None,
        }
    }

    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> ClientError {
        ClientError::Timeout { what: what.into(), after }
    }

    /// Maps a gRPC code, message and optional not-leader hint, as the error table says.
    fn from_parts(code: Code, message: String, not_leader: Option<(Option<u64>, Option<String>)>) -> ClientError {
        match code {
            Code::Unavailable => match not_leader {
                Some((leader_id, leader_addr)) => ClientError::NotLeader { message, leader_id, leader_addr },
                None => ClientError::Unavailable(message),
            },
            Code::NotFound => ClientError::NotFound(message),
            Code::InvalidArgument => ClientError::InvalidArgument(message),
            Code::AlreadyExists => ClientError::AlreadyExists(message),
            Code::FailedPrecondition => ClientError::FailedPrecondition(message),
            // Tonic's own size limits (this client's decode limit, or a broker that does not
            // rewrite them) come as OUT_OF_RANGE, which Keel reserves for offsets; its messages
            // are their only mark.
            Code::OutOfRange if message.contains("message length too large") => ClientError::ResourceExhausted(message),
            Code::OutOfRange => ClientError::OutOfRange(message),
            Code::ResourceExhausted => ClientError::ResourceExhausted(message),
            Code::DeadlineExceeded => ClientError::DeadlineExceeded(message),
            // Tonic reports broken connections and reset streams with these codes.
            Code::Cancelled | Code::Aborted | Code::Unknown => ClientError::Transport(format!("{code:?}: {message}")),
            code => ClientError::Server { code, message },
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> ClientError {
        // Tonic builds statuses of local failures (refused connections, resets, keepalive
        // timeouts) from an error it keeps as the source; statuses sent by a broker have none.
        if std::error::Error::source(&status).is_some() {
            return ClientError::Transport(format!("{:?}: {}", status.code(), status.message()));
        }
        if let Some(info) = status.get_error_details().error_info()
            && (PRODUCER_REASONS.contains(&info.reason.as_str()) || TXN_REASONS.contains(&info.reason.as_str()))
        {
            return ClientError::Producer { reason: info.reason.clone(), message: status.message().to_owned() };
        }
        if let Some(info) = status.get_error_details().error_info()
            && GROUP_REASONS.contains(&info.reason.as_str())
        {
            return ClientError::Group {
                code: status.code(),
                reason: info.reason.clone(),
                message: status.message().to_owned(),
                coordinator_addr: info.metadata.get("coordinator_addr").filter(|a| !a.is_empty()).cloned(),
            };
        }
        if status.code() == Code::ResourceExhausted
            && let Some(retry_after) = status.get_error_details().retry_info().and_then(|r| r.retry_delay)
        {
            return ClientError::Throttled { message: status.message().to_owned(), retry_after };
        }
        let not_leader = if status.code() == Code::Unavailable {
            status.get_error_details().error_info().filter(|info| info.reason == NOT_LEADER_REASON).map(|info| {
                let leader_id = info.metadata.get("leader_id").and_then(|id| id.parse::<u64>().ok());
                let leader_addr = info.metadata.get("leader_addr").filter(|addr| !addr.is_empty()).cloned();
                (leader_id, leader_addr)
            })
        } else {
            None
        };
        ClientError::from_parts(status.code(), status.message().to_owned(), not_leader)
    }
}

impl From<&pb::Error> for ClientError {
    /// A per-request error of ProduceStream: the NOT_LEADER reason, or a leader id or address
    /// (from brokers that predate the reason), makes it a NOT_LEADER.
    fn from(error: &pb::Error) -> ClientError {
        if PRODUCER_REASONS.contains(&error.reason.as_str()) {
            return ClientError::Producer { reason: error.reason.clone(), message: error.message.clone() };
        }
        if let Some(ms) = error.retry_after_ms.filter(|_| error.code == Code::ResourceExhausted as i32) {
            return ClientError::Throttled { message: error.message.clone(), retry_after: Duration::from_millis(ms) };
        }
        let code = Code::from_i32(error.code);
        let leader_addr = (!error.leader_addr.is_empty()).then(|| error.leader_addr.clone());
        let not_leader = (error.reason == NOT_LEADER_REASON || error.leader_id.is_some() || leader_addr.is_some())
            .then_some((error.leader_id, leader_addr));
        // An OK code on an error message is a broker bug; do not let it pass as success.
        let code = if code == Code::Ok { Code::Internal } else { code };
        ClientError::from_parts(code, error.message.clone(), not_leader)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn not_leader_status(metadata: &[(&str, &str)]) -> tonic::Status {
        let metadata: HashMap<String, String> =
            metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let details = ErrorDetails::with_error_info(NOT_LEADER_REASON, "keel", metadata);
        tonic::Status::with_error_details(Code::Unavailable, "not the leader of t/0", details)
    }

    #[test]
    fn not_leader_error_info_round_trips() {
        let e = ClientError::from(not_leader_status(&[("leader_id", "3"), ("leader_addr", "n3:9092")]));
        assert_eq!(
            e,
            ClientError::NotLeader {
                message: "not the leader of t/0".into(),
                leader_id: Some(3),
                leader_addr: Some("n3:9092".into())
            }
        );
        assert!(e.is_retriable());
        assert!(!e.is_ambiguous(), "a NOT_LEADER rejection wrote nothing");
        assert_eq!(e.leader_hint(), Some("n3:9092"));
    }

    #[test]
    fn not_leader_without_a_known_leader() {
        let e = ClientError::from(not_leader_status(&[("leader_id", ""), ("leader_addr", "")]));
        assert_eq!(
            e,
            ClientError::NotLeader { message: "not the leader of t/0".into(), leader_id: None, leader_addr: None }
        );
        assert_eq!(e.leader_hint(), None);
    }

    #[test]
    fn other_error_info_reasons_stay_unavailable() {
        let details = ErrorDetails::with_error_info("SHUTTING_DOWN", "keel", HashMap::new());
        let e = ClientError::from(tonic::Status::with_error_details(Code::Unavailable, "bye", details));
        assert_eq!(e, ClientError::Unavailable("bye".into()));
    }

    #[test]
    fn status_codes_map_per_the_error_table() {
        let table = [
            (Code::Unavailable, ClientError::Unavailable("m".into()), true),
            (Code::NotFound, ClientError::NotFound("m".into()), false),
            (Code::InvalidArgument, ClientError::InvalidArgument("m".into()), false),
            (Code::AlreadyExists, ClientError::AlreadyExists("m".into()), false),
            (Code::FailedPrecondition, ClientError::FailedPrecondition("m".into()), false),
            (Code::OutOfRange, ClientError::OutOfRange("m".into()), false),
            (Code::ResourceExhausted, ClientError::ResourceExhausted("m".into()), false),
            (Code::DeadlineExceeded, ClientError::DeadlineExceeded("m".into()), true),
            (Code::Cancelled, ClientError::Transport("Cancelled: m".into()), true),
            (Code::Internal, ClientError::Server { code: Code::Internal, message: "m".into() }, false),
        ];
        for (code, want, retriable) in table {
            let got = ClientError::from(tonic::Status::new(code, "m"));
            assert_eq!(got, want, "{code:?}");
            assert_eq!(got.is_retriable(), retriable, "{code:?}");
        }
    }

    /// Tonic reports its own message size limits (the client's decode limit, an older broker's
    /// answers) as OUT_OF_RANGE, which Keel reserves for offsets: they are size errors.
    #[test]
    fn message_size_limits_are_resource_exhausted() {
        for message in [
            "Error, decoded message length too large: found 6451797 bytes, the limit is: 4194304 bytes",
            "Error, encoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ] {
            let e = ClientError::from(tonic::Status::out_of_range(message));
            assert_eq!(e, ClientError::ResourceExhausted(message.into()));
            assert!(!e.is_retriable());
        }
        let e = ClientError::from(tonic::Status::out_of_range("offset 9 is beyond the end 4 of t/0"));
        assert!(matches!(e, ClientError::OutOfRange(_)), "offsets stay OUT_OF_RANGE: {e}");
    }

    #[test]
    fn local_transport_failures_are_transport_errors() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = ClientError::from(tonic::Status::from_error(Box::new(refused)));
        assert!(matches!(e, ClientError::Transport(_)), "{e}");
        assert!(e.is_retriable() && e.breaks_connection());
        let sent = ClientError::from(tonic::Status::unavailable("partition not open yet"));
        assert!(sent.is_retriable() && !sent.breaks_connection(), "a broker's answer keeps the connection");
    }

    #[test]
    fn stream_errors_map_like_statuses() {
        let e = ClientError::from(&pb::Error {
            code: Code::Unavailable as i32,
            message: "moved".into(),
            leader_id: Some(2),
            leader_addr: "n2:1".into(),
            reason: "NOT_LEADER".into(),
            ..Default::default()
        });
        assert_eq!(
            e,
            ClientError::NotLeader { message: "moved".into(), leader_id: Some(2), leader_addr: Some("n2:1".into()) }
        );
        let e = ClientError::from(&pb::Error {
            code: Code::Unavailable as i32,
            message: "busy".into(),
            leader_id: None,
            leader_addr: String::new(),
            reason: String::new(),
            ..Default::default()
        });
        assert_eq!(e, ClientError::Unavailable("busy".into()));
        // A leader that lost its quorum knows no leader to name, but is still not the leader:
        // the client must forget it rather than retry it as if it were busy.
        let e = ClientError::from(&pb::Error {
            code: Code::Unavailable as i32,
            message: "no leader known".into(),
            leader_id: None,
            leader_addr: String::new(),
            reason: "NOT_LEADER".into(),
            ..Default::default()
        });
        assert_eq!(e, ClientError::NotLeader { message: "no leader known".into(), leader_id: None, leader_addr: None });
        let e = ClientError::from(&pb::Error {
            code: Code::NotFound as i32,
            message: "no t".into(),
            leader_id: None,
            leader_addr: String::new(),
            reason: String::new(),
            ..Default::default()
        });
        assert_eq!(e, ClientError::NotFound("no t".into()));
        let e = ClientError::from(&pb::Error { code: 0, message: "?".into(), ..Default::default() });
        assert!(matches!(e, ClientError::Server { code: Code::Internal, .. }));
        // A quota's throttle: retriable, after at least the delay the broker gave.
        let e = ClientError::from(&pb::Error {
            code: Code::ResourceExhausted as i32,
            message: "over quota".into(),
            reason: "QUOTA_EXCEEDED".into(),
            retry_after_ms: Some(1_500),
            ..Default::default()
        });
        assert!(e.is_retriable(), "{e}");
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1_500)));
        let limit = ClientError::from(&pb::Error { code: Code::ResourceExhausted as i32, ..Default::default() });
        assert!(!limit.is_retriable(), "a limit without a delay is no throttle");
    }
}
