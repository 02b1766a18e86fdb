//! The broker's errors and how each becomes a gRPC status (DESIGN.md §5): UNAVAILABLE means
//! "retry", and a not-leader answer carries a `google.rpc.ErrorInfo` naming the leader.

use keel_raft::{AppendError, NodeId, ProducerRefusal};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::metadata::MetaError;

/// Errors of a node's life cycle (start, configuration, storage).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// The disk failed.
    #[error("disk: {0}")]
    Io(#[source] std::io::Error),
    /// A raft group could not start.
    #[error("raft: {0}")]
    Raft(#[from] keel_raft::NodeError),
}

/// The `ErrorInfo.reason` of a not-leader answer.
pub const NOT_LEADER: &str = "NOT_LEADER";
/// The `ErrorInfo.domain` of Keel's errors.
pub const DOMAIN: &str = "keel";

/// `ErrorInfo.reason` of a batch whose sequence leaves a gap (FAILED_PRECONDITION): resend from
/// the expected sequence (`expected_sequence` in the metadata), in order.
pub const OUT_OF_ORDER_SEQUENCE: &str = "OUT_OF_ORDER_SEQUENCE";
/// `ErrorInfo.reason` of a batch from an older producer epoch (FAILED_PRECONDITION).
pub const PRODUCER_FENCED: &str = "PRODUCER_FENCED";
/// `ErrorInfo.reason` of a batch whose producer the partition forgot (FAILED_PRECONDITION).
pub const UNKNOWN_PRODUCER_ID: &str = "UNKNOWN_PRODUCER_ID";
/// `ErrorInfo.reason` of a retry of a batch written long ago (ALREADY_EXISTS): written once,
/// offsets no longer known.
pub const DUPLICATE_SEQUENCE_NUMBER: &str = "DUPLICATE_SEQUENCE_NUMBER";

pub(crate) fn with_reason(code: Code, message: String, reason: &str, metadata: &[(&str, String)]) -> Status {
    let metadata: std::collections::HashMap<String, String> =
        metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, metadata))
}

/// UNAVAILABLE with the leader hint (both fields empty when no leader is known).
pub fn not_leader(what: &str, leader: Option<(NodeId, String)>) -> Status {
    let mut metadata = std::collections::HashMap::new();
    let message = match &leader {
        Some((id, addr)) => {
            metadata.insert("leader_id".to_owned(), id.to_string());
            metadata.insert("leader_addr".to_owned(), addr.clone());
            format!("this node does not lead {what}; node {id} at {addr} does")
        }
        None => format!("this node does not lead {what} and no leader is known yet; retry"),
    };
    Status::with_error_details(Code::Unavailable, message, ErrorDetails::with_error_info(NOT_LEADER, DOMAIN, metadata))
}

/// The status of a refused metadata request.
pub fn meta_status(e: MetaError) -> Status {
    match e {
        MetaError::Invalid(m) => Status::invalid_argument(m),
        MetaError::UnknownTopic(_) => Status::not_found(e.to_string()),
        MetaError::TopicExists(_) => Status::already_exists(e.to_string()),
        MetaError::Precondition(m) => Status::failed_precondition(m),
        MetaError::Exhausted(m) => Status::resource_exhausted(m),
        MetaError::Denied(m) => Status::permission_denied(m),
    }
}

/// PRODUCER_FENCED for an `InitProducerId` that claims an id and epoch its identity no longer
/// holds: another instance re-initialised it since, and this one must stop.
pub fn producer_fenced(message: String) -> Status {
    with_reason(Code::FailedPrecondition, message, PRODUCER_FENCED, &[])
}

/// The status of a failed append.
pub fn append_status(what: &str, e: AppendError) -> Status {
    match e {
        AppendError::NotLeader { leader } => not_leader(what, leader),
        AppendError::Timeout => {
            Status::deadline_exceeded(format!("{what}: no commit in time; the batch may or may not have been written"))
        }
        AppendError::Unknown { .. } => Status::unavailable(format!(
            "{what}: leadership changed during the write; it may or may not have been written"
        )),
        AppendError::Invalid(m) => Status::invalid_argument(m),
        AppendError::UnknownGroup(_) => Status::unavailable(format!("{what} is not open on this node yet; retry")),
        AppendError::Fatal(m) => Status::unavailable(format!("{what}: this replica failed ({m}); retry")),
        AppendError::Producer(r) => {
            let message = format!("{what}: {r}");
            match r {
                ProducerRefusal::OutOfOrder { expected } => with_reason(
                    Code::FailedPrecondition,
                    message,
                    OUT_OF_ORDER_SEQUENCE,
                    &[("expected_sequence", expected.to_string())],
                ),
                ProducerRefusal::Fenced { current } => with_reason(
                    Code::FailedPrecondition,
                    message,
                    PRODUCER_FENCED,
                    &[("current_epoch", current.to_string())],
                ),
                ProducerRefusal::UnknownProducer => {
                    with_reason(Code::FailedPrecondition, message, UNKNOWN_PRODUCER_ID, &[])
                }
                ProducerRefusal::StaleDuplicate => {
                    with_reason(Code::AlreadyExists, message, DUPLICATE_SEQUENCE_NUMBER, &[])
                }
            }
        }
    }
}

/// A status as the per-request error of a stream response.
pub fn to_pb_error(status: &Status) -> keel_proto::v1::Error {
    let mut error = keel_proto::v1::Error {
        code: status.code() as i32,
        message: status.message().to_owned(),
        leader_id: None,
        leader_addr: String::new(),
        reason: String::new(),
        retry_after_ms: status.get_details_retry_info().and_then(|r| r.retry_delay).map(|d| d.as_millis() as u64),
    };
    if let Some(info) = status.get_details_error_info()
        && info.domain == DOMAIN
    {
        if info.reason == NOT_LEADER {
            error.leader_id = info.metadata.get("leader_id").and_then(|s| s.parse().ok());
            error.leader_addr = info.metadata.get("leader_addr").cloned().unwrap_or_default();
        }
        error.reason = info.reason;
    }
    error
}
