//! Multi-raft over gRPC: the raft RPCs of every group on a node share one tonic server and one
//! connection per peer, each request naming its group.
//!
//! Found the hard way in a prototype of this stack, and handled here: every RPC has a deadline; a
//! failed or timed-out connection is dropped and dialled again (a simulated TCP connection never
//! retransmits, so a stream that lost a packet in a partition stays stuck forever); dialling a
//! peer that refuses is backed off per peer; HTTP/2 keepalive finds dead connections.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use keel_proto::v1 as pb;
use keel_proto::v1::raft_client::RaftClient;
use openraft::OptionalSend;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::convert::{self, ConvertError};
use crate::quiesce::{QUIESCE_GROUPS_MAX, Quiescence, VoteAction};
use crate::types::{GroupId, KeelRaft, Node, NodeId, Raft, Vote};

/// How this node dials a peer. Production dials TCP; the simulation hands in turmoil's network.
pub trait Connector: Send + Sync + 'static {
    /// A lazily connecting channel to `addr` (`host:port`).
    fn channel(&self, addr: &str) -> Result<Channel, String>;
}

/// Dials peers over TCP with tokio.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// TLS to peers (the node's own certificate as its client identity), or plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for TcpConnector {
    fn default() -> TcpConnector {
        TcpConnector { connect_timeout: Duration::from_millis(500), tls: None }
    }
}

impl Connector for TcpConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| e.to_string())?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| e.to_string())?;
        }
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy())
    }
}

/// Largest raft RPC message, either way (what AppendEntries may carry is bounded well below it:
/// `store::APPEND_ENTRIES_BYTES_MAX`).
pub const RPC_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Network settings.
#[derive(Debug, Clone, Copy)]
pub struct NetworkConfig {
    /// Deadline of one raft RPC (capped by openraft's own TTL for it).
    pub rpc_timeout: Duration,
    /// First delay before dialling a peer again after a failure; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay between dials of a failing peer.
    pub backoff_max: Duration,
    /// Whether the AppendEntries of many groups to the same peer travel together in one
    /// `AppendEntriesBatch` RPC (off: one RPC per group's request, as before it existed).
    pub coalesce_append_entries: bool,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            rpc_timeout: Duration::from_millis(1_000),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            coalesce_append_entries: true,
        }
    }
}

struct Peer {
    addr: String,
    client: Option<RaftClient<Channel>>,
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
    /// When the current connection last delivered an answer.
    answered: Option<tokio::time::Instant>,
    /// AppendEntries waiting to go out in the next batch to this peer.
    queue: Vec<Queued>,
    /// Whether a task that sends the queue is on its way.
    scheduled: bool,
    /// Batches sent to this peer whose answers are not all in.
    batches_out: usize,
    /// The peer answered a batch with UNIMPLEMENTED (a node of an older version, during a
    /// rolling upgrade): one RPC per request until the connection is dialled again.
    no_batches: bool,
}

/// An AppendEntries waiting for its batch.
struct Queued {
    request: pb::AppendEntriesRequest,
    bytes: usize,
    /// What the peer's bounded decoder counts for it: its entries and nested messages.
    elements: usize,
    answer: tokio::sync::oneshot::Sender<Answer>,
}

/// How a request sent in a batch was answered.
enum Answer {
    /// The group's answer.
    Response(pb::AppendEntriesResponse),
    /// The peer's node answered for the group with an error: the connection works.
    Refused(Status),
    /// The batch did not get through (the connection was dropped, or the peer answered nothing
    /// in time).
    Lost(String),
}

/// Most requests in one AppendEntries batch a node accepts.
pub const APPEND_BATCH_ITEMS_MAX: usize = 4_096;
/// Most requests a node puts in one batch it sends.
const APPEND_BATCH_SEND_ITEMS: usize = 1_024;
/// Most bytes of requests a node puts in one batch it sends (a larger request goes alone).
const APPEND_BATCH_SEND_BYTES: usize = crate::store::APPEND_ENTRIES_BYTES_MAX;
/// Most elements (entries and nested messages) in one batch a node sends: half of what the
/// peer's bounded decoder takes in one request (a batch of 1,024 requests of 300 entries each
/// would be refused whole).
const APPEND_BATCH_SEND_ELEMENTS: usize = keel_proto::bounded::REQUEST_ELEMENTS_MAX / 2;
/// Nested messages of one AppendEntries besides its entries (itself, vote, log ids), rounded up.
const APPEND_ELEMENTS_PER_REQUEST: usize = 8;

/// This node's connections to its peers, shared by every raft group on the node.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    connector: Arc<dyn Connector>,
    config: NetworkConfig,
    peers: Mutex<BTreeMap<NodeId, Peer>>,
    /// Paces the log sent to replicas catching up after a move.
    throttle: crate::throttle::CatchUpThrottle,
    /// AppendEntries batches sent, and the requests in them.
    batches: std::sync::atomic::AtomicU64,
    batched: std::sync::atomic::AtomicU64,
    /// A negative control's bug ([`crate::Faults::batch_failures_read_as_success`]).
    failures_read_as_success: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetError(String);

impl Peers {
    /// Connections made through `connector`.
    pub fn new(connector: Arc<dyn Connector>, config: NetworkConfig) -> Peers {
        let throttle = crate::throttle::CatchUpThrottle::default();
        Peers {
            inner: Arc::new(PeersInner {
                connector,
                config,
                peers: Mutex::new(BTreeMap::new()),
                throttle,
                batches: std::sync::atomic::AtomicU64::new(0),
                batched: std::sync::atomic::AtomicU64::new(0),
                failures_read_as_success: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Injects the misread-answers bug: for a negative control only.
    pub(crate) fn set_failures_read_as_success(&self, on: bool) {
        self.inner.failures_read_as_success.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The catch-up throttle of this node's outgoing log.
    pub fn throttle(&self) -> &crate::throttle::CatchUpThrottle {
        &self.inner.throttle
    }

    /// Records (or updates) where a peer listens.
    pub fn set_addr(&self, node: NodeId, addr: &str) {
        let mut peers = self.lock();
        let peer = peers.entry(node).or_insert_with(|| Peer {
            addr: addr.to_owned(),
            client: None,
            failures: 0,
            retry_at: None,
            answered: None,
            queue: Vec::new(),
            scheduled: false,
            batches_out: 0,
            no_batches: false,
        });
        if peer.addr != addr {
            peer.addr = addr.to_owned();
            peer.client = None;
            peer.answered = None;
            peer.no_batches = false;
        }
    }

    /// Records where a peer listens unless an address is known already: a membership keeps
    /// the addresses of when it was made, and the owner's later [`Peers::set_addr`] (from its
    /// metadata) is newer.
    pub fn learn_addr(&self, node: NodeId, addr: &str) {
        if !self.lock().contains_key(&node) {
            self.set_addr(node, addr);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Peer>> {
        self.inner.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn client(&self, target: NodeId) -> Result<RaftClient<Channel>, Unreachable<KeelRaft>> {
        let mut peers = self.lock();
        let Some(peer) = peers.get_mut(&target) else {
            return Err(Unreachable::new(&NetError(format!("no address for node {target}"))));
        };
        if let Some(client) = &peer.client {
            return Ok(client.clone());
        }
        if peer.retry_at.is_some_and(|at| tokio::time::Instant::now() < at) {
            return Err(Unreachable::new(&NetError(format!(
                "node {target}: backing off after {} failures",
                peer.failures
            ))));
        }
        let channel = self
            .inner
            .connector
            .channel(&peer.addr)
            .map_err(|e| Unreachable::new(&NetError(format!("node {target} at {}: {e}", peer.addr))))?;
        let client = RaftClient::new(channel)
            .max_decoding_message_size(RPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RPC_MESSAGE_BYTES_MAX);
        peer.client = Some(client.clone());
        Ok(client)
    }

    /// A failure drops the connection and backs the peer off, doubling the wait each time.
    fn failed(&self, target: NodeId, why: &str) {
        let mut peers = self.lock();
        if let Some(peer) = peers.get_mut(&target) {
            peer.client = None;
            peer.answered = None;
            peer.no_batches = false;
            peer.failures = peer.failures.saturating_add(1);
            let shift = peer.failures.min(16) - 1;
            let wait = self.inner.config.backoff_min.saturating_mul(1 << shift).min(self.inner.config.backoff_max);
            peer.retry_at = Some(tokio::time::Instant::now() + wait);
            debug!(target, failures = peer.failures, ?wait, why, "peer connection dropped");
        }
    }

    fn succeeded(&self, target: NodeId) {
        if let Some(peer) = self.lock().get_mut(&target) {
            peer.failures = 0;
            peer.retry_at = None;
        }
        self.answered(target);
    }

    /// The peer answered (with an error status): its connection works.
    fn answered(&self, target: NodeId) {
        if let Some(peer) = self.lock().get_mut(&target) {
            peer.answered = Some(tokio::time::Instant::now());
        }
    }

    /// An RPC sent at `sent` got no answer in time. The connection is dropped only if nothing
    /// at all came back on it since: a stuck stream (a simulated connection that lost a packet
    /// never recovers) answers nothing, while a peer that is merely slow for one group keeps
    /// answering the others. Dropping and backing off the connection that thousands of groups
    /// share because one of their RPCs was late turned a busy moment into every group on the
    /// peer failing at once, campaigning, and a busier moment (found creating 10,000 partitions).
    fn timed_out(&self, target: NodeId, sent: tokio::time::Instant) {
        let alive = self.lock().get(&target).is_some_and(|p| p.answered.is_some_and(|at| at >= sent));
        if !alive {
            self.failed(target, "deadline");
        }
    }

    /// Runs one RPC with a deadline; transport failures and timeouts drop the connection.
    async fn call<T, F, Fut>(&self, target: NodeId, option: &RPCOption, rpc: F) -> Result<T, RPCError<KeelRaft>>
    where
        F: FnOnce(RaftClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let client = self.client(target)?;
        let deadline = self.inner.config.rpc_timeout.min(option.hard_ttl());
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(deadline, rpc(client)).await {
            Ok(Ok(response)) => {
                self.succeeded(target);
                Ok(response.into_inner())
            }
            Ok(Err(status)) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) {
                    self.failed(target, status.message());
                    Err(RPCError::Unreachable(Unreachable::new(&NetError(format!("node {target}: {status}")))))
                } else {
                    self.answered(target);
                    Err(RPCError::Network(NetworkError::new(&NetError(format!("node {target}: {status}")))))
                }
            }
            Err(_) => {
                self.timed_out(target, sent);
                Err(RPCError::Unreachable(Unreachable::new(&NetError(format!(
                    "node {target}: no answer within {deadline:?}"
                )))))
            }
        }
    }
}

fn convert_err(e: ConvertError) -> RPCError<KeelRaft> {
    RPCError::Network(NetworkError::new(&e))
}

fn bad_response(what: &str) -> RPCError<KeelRaft> {
    RPCError::Network(NetworkError::new(&NetError(format!("malformed response: {what}"))))
}

fn vote_request_to_pb(to: Addressed, rpc: &VoteRequest<KeelRaft>) -> pb::VoteRequest {
    pb::VoteRequest {
        group_id: to.group,
        target_generation: to.generation,
        vote: Some(convert::vote_to_pb(&rpc.vote)),
        last_log_id: rpc.last_log_id.as_ref().map(convert::log_id_to_pb),
        leadership_transfer: rpc.leadership_transfer,
    }
}

fn vote_response_from_pb(r: pb::VoteResponse) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
    let vote = convert::vote_from_pb(r.vote.as_ref()).map_err(convert_err)?;
    Ok(VoteResponse {
        vote,
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(convert::log_id_from_pb),
    })
}

impl Peers {
    /// Sends one node heartbeat; whether `target` acknowledged it.
    pub(crate) async fn node_heartbeat(&self, target: NodeId, me: NodeId) -> bool {
        let request = pb::NodeHeartbeatRequest { from: me };
        let option = RPCOption::new(self.inner.config.rpc_timeout);
        self.call(target, &option, |mut c| async move { c.node_heartbeat(request).await }).await.is_ok()
    }

    /// Asks `target` to quiesce `groups` this node leads; the ones it did (`None`: no answer).
    pub(crate) async fn quiesce(
        &self,
        target: NodeId,
        me: NodeId,
        groups: Vec<pb::QuiescentGroup>,
    ) -> Option<Vec<GroupId>> {
        let request = pb::QuiesceRequest { from: me, groups };
        let option = RPCOption::new(self.inner.config.rpc_timeout);
        let response = self.call(target, &option, |mut c| async move { c.quiesce(request).await }).await.ok()?;
        Some(response.quiesced)
    }
}

impl Peers {
    /// Sends one AppendEntries in the next batch to `target`, with the same deadline, errors and
    /// connection handling as [`Peers::call`].
    async fn call_batched(
        &self,
        target: NodeId,
        option: &RPCOption,
        request: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, RPCError<KeelRaft>> {
        // Dials, or refuses while the peer is backed off, exactly as a call on its own would.
        self.client(target)?;
        let deadline = self.inner.config.rpc_timeout.min(option.hard_ttl());
        let sent = tokio::time::Instant::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let bytes = prost::Message::encoded_len(&request);
        let unbatched = {
            let mut peers = self.lock();
            match peers.get_mut(&target) {
                Some(peer) if !peer.no_batches => {
                    let elements = request.entries.len() + APPEND_ELEMENTS_PER_REQUEST;
                    peer.queue.push(Queued { request, bytes, elements, answer });
                    if !std::mem::replace(&mut peer.scheduled, true) {
                        // With nothing on its way to the peer the request goes at once (a lone
                        // write pays no extra hop); otherwise others may join it first.
                        let gather = peer.batches_out > 0;
                        tokio::spawn(send_batches(self.clone(), target, gather));
                    }
                    None
                }
                _ => Some(request),
            }
        };
        let outcome = match unbatched {
            Some(request) => return self.call_unbatched(target, option, request).await,
            None => tokio::time::timeout(deadline, answered).await,
        };
        match outcome {
            Ok(Ok(Answer::Response(response))) => {
                self.succeeded(target);
                Ok(response)
            }
            Ok(Ok(Answer::Refused(status))) => {
                self.answered(target);
                let error = NetError(format!("node {target}: {status}"));
                Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&error)),
                    _ => RPCError::Network(NetworkError::new(&error)),
                })
            }
            Ok(Ok(Answer::Lost(why))) => {
                Err(RPCError::Unreachable(Unreachable::new(&NetError(format!("node {target}: {why}")))))
            }
            Ok(Err(_)) => Err(RPCError::Unreachable(Unreachable::new(&NetError(format!(
                "node {target}: the batch carrying this request was dropped"
            ))))),
            Err(_) => {
                self.timed_out(target, sent);
                Err(RPCError::Unreachable(Unreachable::new(&NetError(format!(
                    "node {target}: no answer within {deadline:?}"
                )))))
            }
        }
    }

    async fn call_unbatched(
        &self,
        target: NodeId,
        option: &RPCOption,
        request: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, RPCError<KeelRaft>> {
        self.call(target, option, |mut c| async move { c.append_entries(request).await }).await
    }

    /// Takes the next batch off `target`'s queue; when more is left than one batch carries,
    /// another sender is started for the rest.
    fn next_batch(&self, target: NodeId) -> Vec<Queued> {
        let mut peers = self.lock();
        let Some(peer) = peers.get_mut(&target) else { return Vec::new() };
        let (mut items, mut bytes, mut elements) = (0, 0, 0);
        for queued in &peer.queue {
            let full = items == APPEND_BATCH_SEND_ITEMS
                || bytes + queued.bytes > APPEND_BATCH_SEND_BYTES
                || elements + queued.elements > APPEND_BATCH_SEND_ELEMENTS;
            if items > 0 && full {
                break;
            }
            items += 1;
            bytes += queued.bytes;
            elements += queued.elements;
        }
        let rest = peer.queue.split_off(items);
        let batch = std::mem::replace(&mut peer.queue, rest);
        if !batch.is_empty() {
            peer.batches_out += 1;
        }
        if peer.queue.is_empty() {
            peer.scheduled = false;
        } else {
            tokio::spawn(send_batches(self.clone(), target, false));
        }
        batch
    }

    /// Sends one batch and hands each answer to its caller as it arrives.
    async fn send_batch(&self, target: NodeId, batch: Vec<Queued>) {
        let client = match self.client(target) {
            Ok(client) => client,
            Err(e) => return answer_all(batch, || Answer::Lost(e.to_string())),
        };
        let mut waiting: Vec<Option<tokio::sync::oneshot::Sender<Answer>>> = Vec::with_capacity(batch.len());
        let mut requests = Vec::with_capacity(batch.len());
        for queued in batch {
            waiting.push(Some(queued.answer));
            requests.push(queued.request);
        }
        self.inner.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.batched.fetch_add(requests.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let sent = tokio::time::Instant::now();
        let deadline = self.inner.config.rpc_timeout;
        let lost = match tokio::time::timeout(deadline, self.stream_batch(target, client, requests, &mut waiting)).await
        {
            Ok(Ok(())) => return,
            Ok(Err(BatchFailed::Unimplemented)) => {
                // The requests went into the refused call; openraft sends them again (after its
                // back-off), then one RPC each.
                if let Some(peer) = self.lock().get_mut(&target) {
                    peer.no_batches = true;
                }
                debug!(target, "peer does not take AppendEntries batches; sending one RPC per group");
                "the peer takes no batches: sent again on their own".to_owned()
            }
            Ok(Err(BatchFailed::Transport(status))) => {
                self.failed(target, status.message());
                format!("batch failed: {status}")
            }
            Ok(Err(BatchFailed::Incomplete)) => "the batch's answers ended early".to_owned(),
            Err(_) => {
                self.timed_out(target, sent);
                format!("no answer to the batch within {deadline:?}")
            }
        };
        for answer in waiting.iter_mut().filter_map(Option::take) {
            let _ = answer.send(Answer::Lost(lost.clone()));
        }
    }

    async fn stream_batch(
        &self,
        target: NodeId,
        mut client: RaftClient<Channel>,
        requests: Vec<pb::AppendEntriesRequest>,
        waiting: &mut [Option<tokio::sync::oneshot::Sender<Answer>>],
    ) -> Result<(), BatchFailed> {
        let mut answers = match client.append_entries_batch(pb::AppendEntriesBatchRequest { requests }).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => return Err(BatchFailed::Unimplemented),
            Err(status) => return Err(BatchFailed::Transport(status)),
        };
        let mut left = waiting.len();
        while left > 0 {
            let message = match answers.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(BatchFailed::Incomplete),
                Err(status) => return Err(BatchFailed::Transport(status)),
            };
            self.answered(target);
            let misread = self.inner.failures_read_as_success.load(std::sync::atomic::Ordering::Relaxed);
            for item in message.items {
                let Some(answer) = waiting.get_mut(item.index as usize).and_then(Option::take) else {
                    warn!(target, index = item.index, "a batch answer for no request, or a second one; ignored");
                    continue;
                };
                left -= 1;
                use pb::append_entries_batch_item::Outcome;
                let _ = answer.send(match item.outcome {
                    _ if misread => {
                        let success = pb::append_entries_response::Result::Success(Default::default());
                        Answer::Response(pb::AppendEntriesResponse { result: Some(success) })
                    }
                    Some(Outcome::Response(response)) => Answer::Response(response),
                    Some(Outcome::Error(e)) => Answer::Refused(Status::new(tonic::Code::from(e.code), e.message)),
                    None => Answer::Refused(Status::internal("a batch answer without an outcome")),
                });
            }
        }
        Ok(())
    }

    /// AppendEntries batches sent to peers, and the requests they carried.
    pub fn append_batches(&self) -> (u64, u64) {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.inner.batches), load(&self.inner.batched))
    }
}

/// Why a batch got no (complete) answer.
enum BatchFailed {
    /// The peer does not know the RPC.
    Unimplemented,
    Transport(Status),
    Incomplete,
}

fn answer_all(batch: Vec<Queued>, answer: impl Fn() -> Answer) {
    for queued in batch {
        let _ = queued.answer.send(answer());
    }
}

/// A sender of `target`'s AppendEntries queue. With `gather` (batches are already out to the
/// peer) it first lets the tasks that are ready run (a spawned task would otherwise run next, in
/// tokio's LIFO slot, and carry only the request that started it), so that the requests of every
/// group replicating at this moment go together.
async fn send_batches(peers: Peers, target: NodeId, gather: bool) {
    if gather {
        tokio::task::yield_now().await;
    }
    let batch = peers.next_batch(target);
    if !batch.is_empty() {
        let _out = BatchOut { peers: &peers, target };
        peers.send_batch(target, batch).await;
    }
}

/// Counts a batch out to its peer until its last answer is in (or it is given up on).
struct BatchOut<'a> {
    peers: &'a Peers,
    target: NodeId,
}

impl Drop for BatchOut<'_> {
    fn drop(&mut self) {
        if let Some(peer) = self.peers.lock().get_mut(&self.target) {
            peer.batches_out = peer.batches_out.saturating_sub(1);
        }
    }
}

/// Which of the two vote RPCs to send; they carry the same messages.
#[derive(Debug, Clone, Copy)]
enum Ballot {
    Vote,
    PreVote,
}

impl Peers {
    async fn ask_for_vote(
        &self,
        ballot: Ballot,
        target: NodeId,
        to: Addressed,
        rpc: &VoteRequest<KeelRaft>,
        option: &RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        let request = vote_request_to_pb(to, rpc);
        let response = self
            .call(target, option, |mut c| async move {
                match ballot {
                    Ballot::Vote => c.vote(request).await,
                    Ballot::PreVote => c.pre_vote(request).await,
                }
            })
            .await?;
        vote_response_from_pb(response)
    }
}

/// Where a group's raft RPC goes on its target node: the group, and the generation of the copy
/// of it the sender's membership names there ([`Node::generation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressed {
    /// The group.
    pub group: GroupId,
    /// The copy's generation.
    pub generation: u32,
}

impl GroupRouter<KeelRaft, Addressed> for Peers {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &self,
        target: NodeId,
        to: Addressed,
        rpc: AppendEntriesRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<KeelRaft>, RPCError<KeelRaft>> {
        let request = pb::AppendEntriesRequest {
            group_id: to.group,
            target_generation: to.generation,
            vote: Some(convert::vote_to_pb(&rpc.vote)),
            prev_log_id: rpc.prev_log_id.as_ref().map(convert::log_id_to_pb),
            entries: convert::entries_to_pb(&rpc.entries).map_err(convert_err)?,
            leader_commit: rpc.leader_commit.as_ref().map(convert::log_id_to_pb),
        };
        if !request.entries.is_empty() {
            let bytes: usize = request.entries.iter().map(prost::Message::encoded_len).sum();
            self.inner.throttle.admit(to.group, target, bytes).await;
        }
        let response = if self.inner.config.coalesce_append_entries {
            self.call_batched(target, &option, request).await?
        } else {
            self.call(target, &option, |mut c| async move { c.append_entries(request).await }).await?
        };
        use pb::append_entries_response::Result as R;
        match response.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => {
                Ok(AppendEntriesResponse::PartialSuccess(p.matching.as_ref().map(convert::log_id_from_pb)))
            }
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => {
                Ok(AppendEntriesResponse::HigherVote(convert::vote_from_pb(Some(&v)).map_err(convert_err)?))
            }
            None => Err(bad_response("append entries without a result")),
        }
    }

    async fn vote(
        &self,
        target: NodeId,
        to: Addressed,
        rpc: VoteRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        self.ask_for_vote(Ballot::Vote, target, to, &rpc, &option).await
    }

    /// A real RPC: openraft's default grants every pre-vote without asking, which defeats the
    /// point (a node rejoining after a partition would disrupt a healthy leader).
    async fn pre_vote(
        &self,
        target: NodeId,
        to: Addressed,
        rpc: VoteRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelRaft>, RPCError<KeelRaft>> {
        self.ask_for_vote(Ballot::PreVote, target, to, &rpc, &option).await
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        to: Addressed,
        vote: Vote,
        snapshot: SnapshotOf<KeelRaft, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<KeelRaft>, StreamingError<KeelRaft>> {
        let request = pb::InstallSnapshotRequest {
            group_id: to.group,
            target_generation: to.generation,
            vote: Some(convert::vote_to_pb(&vote)),
            meta: Some(convert::snapshot_meta_to_pb(&snapshot.meta)),
            data: snapshot.snapshot.into(),
        };
        let response = self
            .call(target, &option, |mut c| async move { c.install_snapshot(request).await })
            .await
            .map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&NetError(r.to_string()))),
            })?;
        let vote = convert::vote_from_pb(response.vote.as_ref())
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        Ok(SnapshotResponse { vote })
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        to: Addressed,
        rpc: TransferLeaderRequest<KeelRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<KeelRaft>, RPCError<KeelRaft>> {
        let request = convert::transfer_leader_to_pb(to.group, to.generation, &rpc);
        let response = self.call(target, &option, |mut c| async move { c.transfer_leader(request).await }).await?;
        convert::transfer_leader_response_from_pb(response).map_err(convert_err)
    }

    fn backoff(&self) -> Option<Backoff> {
        // openraft's own pacing of retries to an unreachable follower.
        let (min, max) = (self.inner.config.backoff_min, self.inner.config.backoff_max);
        Some(Backoff::new(std::iter::successors(Some(min), move |d| Some((*d * 2).min(max)))))
    }
}

/// The network factory of one group: records peer addresses from the membership and hands
/// openraft a per-target adapter over the shared [`Peers`].
#[derive(Clone)]
pub struct GroupNetwork {
    peers: Peers,
    group_id: GroupId,
}

impl GroupNetwork {
    /// The factory for `group_id`.
    pub fn new(peers: Peers, group_id: GroupId) -> GroupNetwork {
        GroupNetwork { peers, group_id }
    }
}

impl RaftNetworkFactory<KeelRaft> for GroupNetwork {
    type Network = GroupNetworkAdapter<KeelRaft, Addressed, Peers>;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        self.peers.learn_addr(target, &node.addr);
        let to = Addressed { group: self.group_id, generation: node.generation };
        GroupNetworkAdapter::new(self.peers.clone(), target, to)
    }
}

/// The groups hosted on this node, by id: where incoming raft RPCs are routed.
#[derive(Clone, Default)]
pub struct Groups {
    inner: Arc<RwLock<BTreeMap<GroupId, Hosted>>>,
}

/// A group's copy on this node.
#[derive(Clone)]
struct Hosted {
    raft: Raft,
    generation: u32,
}

impl Groups {
    /// Adds (or replaces) a group whose copy here is `generation`.
    pub fn insert(&self, group_id: GroupId, raft: Raft, generation: u32) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).insert(group_id, Hosted { raft, generation });
    }

    /// Removes a group.
    pub fn remove(&self, group_id: GroupId) -> Option<Raft> {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).remove(&group_id).map(|h| h.raft)
    }

    /// The raft handle of a group.
    pub fn get(&self, group_id: GroupId) -> Result<Raft, Status> {
        self.hosted(group_id).map(|h| h.raft)
    }

    /// The generation of the group's copy here.
    pub fn generation(&self, group_id: GroupId) -> Result<u32, Status> {
        self.hosted(group_id).map(|h| h.generation)
    }

    fn hosted(&self, group_id: GroupId) -> Result<Hosted, Status> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("raft group {group_id} is not hosted on this node")))
    }

    /// The raft handle of a group, for an RPC meant for copy `generation` of it: a copy of
    /// another generation must not answer (a blank copy would vote as if it had the old one's
    /// log and vote; the old one must not take part in a membership it was removed from).
    pub fn addressed(&self, group_id: GroupId, generation: u32) -> Result<Raft, Status> {
        let hosted = self.hosted(group_id)?;
        if hosted.generation != generation {
            return Err(Status::failed_precondition(format!(
                "raft group {group_id}: this node hosts copy {} of it, not copy {generation}",
                hosted.generation
            )));
        }
        Ok(hosted.raft)
    }

    /// Every hosted group.
    pub fn all(&self) -> Vec<(GroupId, Raft)> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(g, h)| (*g, h.raft.clone())).collect()
    }

    /// A handle that does not keep the groups alive (for the node's background tasks).
    pub(crate) fn downgrade(&self) -> WeakGroups {
        WeakGroups(Arc::downgrade(&self.inner))
    }
}

/// [`Groups`] that are gone once the node that hosts them is.
pub(crate) struct WeakGroups(Weak<RwLock<BTreeMap<GroupId, Hosted>>>);

impl WeakGroups {
    /// The groups, while their node exists.
    pub(crate) fn upgrade(&self) -> Option<Groups> {
        self.0.upgrade().map(|inner| Groups { inner })
    }
}

/// The gRPC service that receives raft RPCs for every group on this node.
#[derive(Clone)]
pub struct RaftService {
    groups: Groups,
    quiescence: Arc<Quiescence>,
    /// Whether AppendEntries batches are taken; a node with coalescing off answers them
    /// UNIMPLEMENTED, as a node from before batches did, and its peers fall back to one RPC each.
    batches: bool,
}

impl RaftService {
    /// A service routing to `groups`, waking quiescent ones first.
    pub(crate) fn new(groups: Groups, quiescence: Arc<Quiescence>, batches: bool) -> RaftService {
        RaftService { groups, quiescence, batches }
    }

    /// The group's raft, woken if it was quiescent: a message from its leader arrived.
    fn woken(&self, group: GroupId, generation: u32) -> Result<Raft, Status> {
        let raft = self.groups.addressed(group, generation)?;
        self.quiescence.wake(group, &raft);
        Ok(raft)
    }

    async fn ballot(
        &self,
        ballot: Ballot,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        check_claim(&request, request.get_ref().vote.as_ref())?;
        let r = request.into_inner();
        let raft = self.groups.addressed(r.group_id, r.target_generation)?;
        let candidate = r.vote.as_ref().map_or(crate::NOBODY, |v| v.node_id);
        let response = match self.quiescence.on_vote(r.group_id, candidate, &raft) {
            VoteAction::Refuse => Quiescence::refusal(&raft),
            VoteAction::Pass => {
                let request = vote_request_from_pb(r)?;
                match ballot {
                    Ballot::Vote => raft.vote(request).await,
                    Ballot::PreVote => raft.pre_vote(request).await,
                }
                .map_err(raft_failed)?
            }
        };
        Ok(Response::new(vote_response_to_pb(response)))
    }

    /// One group's AppendEntries, sent alone or in a batch.
    async fn append_one(
        &self,
        verified: Option<VerifiedNode>,
        r: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        check_claim_of(verified, r.vote.as_ref())?;
        let raft = self.groups.addressed(r.group_id, r.target_generation)?;
        let rpc = AppendEntriesRequest {
            vote: convert::vote_from_pb(r.vote.as_ref()).map_err(invalid)?,
            prev_log_id: r.prev_log_id.as_ref().map(convert::log_id_from_pb),
            entries: convert::entries_from_pb(r.entries).map_err(invalid)?,
            leader_commit: r.leader_commit.as_ref().map(convert::log_id_from_pb),
        };
        self.quiescence.on_append(
            r.group_id,
            &raft,
            &rpc.vote,
            rpc.prev_log_id.as_ref(),
            rpc.leader_commit.as_ref(),
            !rpc.entries.is_empty(),
        );
        let response = raft.append_entries(rpc).await.map_err(raft_failed)?;
        use pb::append_entries_response::{Conflict, PartialSuccess, Result as R, Success};
        let result = match response {
            AppendEntriesResponse::Success => R::Success(Success {}),
            AppendEntriesResponse::PartialSuccess(m) => {
                R::PartialSuccess(PartialSuccess { matching: m.as_ref().map(convert::log_id_to_pb) })
            }
            AppendEntriesResponse::Conflict => R::Conflict(Conflict {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(convert::vote_to_pb(&v)),
        };
        Ok(pb::AppendEntriesResponse { result: Some(result) })
    }

    /// The tonic server for it.
    pub fn into_server(self) -> pb::raft_server::RaftServer<RaftService> {
        pb::raft_server::RaftServer::new(self)
            .max_decoding_message_size(RPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RPC_MESSAGE_BYTES_MAX)
    }
}

fn invalid(e: ConvertError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The node a peer connection proved to be (its certificate's node id), put in a request's
/// extensions by the server's peer gate. When present, a raft RPC must speak for that node: a
/// vote's candidate, an AppendEntries' or snapshot's leader, a handover's leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedNode(pub NodeId);

/// Refuses a request whose claimed node is not the one its connection proved.
fn check_claim<T>(request: &Request<T>, vote: Option<&pb::Vote>) -> Result<(), Status> {
    check_claim_of(request.extensions().get::<VerifiedNode>().copied(), vote)
}

/// [`check_claim`] with the connection's proof taken out of its request already.
fn check_claim_of(verified: Option<VerifiedNode>, vote: Option<&pb::Vote>) -> Result<(), Status> {
    let Some(VerifiedNode(proved)) = verified else {
        return Ok(());
    };
    let claimed = vote.map(|v| v.node_id);
    if claimed == Some(proved) {
        return Ok(());
    }
    warn!(proved, ?claimed, "a raft request claims another node than its certificate's; refused");
    Err(Status::permission_denied(format!(
        "this connection is node {proved}'s, but the request speaks for node {claimed:?}"
    )))
}

/// Refuses a node-level request that names another node than its connection proved.
fn check_node_claim<T>(request: &Request<T>, from: NodeId) -> Result<(), Status> {
    check_claim(request, Some(&pb::Vote { term: 0, node_id: from, committed: false }))
}

fn raft_failed(e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "raft rpc failed");
    Status::unavailable(e.to_string())
}

fn vote_request_from_pb(r: pb::VoteRequest) -> Result<VoteRequest<KeelRaft>, Status> {
    Ok(VoteRequest {
        vote: convert::vote_from_pb(r.vote.as_ref()).map_err(invalid)?,
        last_log_id: r.last_log_id.as_ref().map(convert::log_id_from_pb),
        leadership_transfer: r.leadership_transfer,
    })
}

fn vote_response_to_pb(r: VoteResponse<KeelRaft>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(convert::vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(convert::log_id_to_pb),
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let verified = request.extensions().get::<VerifiedNode>().copied();
        Ok(Response::new(self.append_one(verified, request.into_inner()).await?))
    }

    type AppendEntriesBatchStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::AppendEntriesBatchResponse, Status>> + Send + 'static>,
    >;

    async fn append_entries_batch(
        &self,
        request: Request<pb::AppendEntriesBatchRequest>,
    ) -> Result<Response<Self::AppendEntriesBatchStream>, Status> {
        use futures_util::StreamExt;
        use pb::append_entries_batch_item::Outcome;
        if !self.batches {
            return Err(Status::unimplemented("this node takes AppendEntries one group at a time"));
        }
        let verified = request.extensions().get::<VerifiedNode>().copied();
        let requests = request.into_inner().requests;
        if requests.len() > APPEND_BATCH_ITEMS_MAX {
            return Err(Status::invalid_argument(format!(
                "{} requests in one AppendEntries batch; at most {APPEND_BATCH_ITEMS_MAX}",
                requests.len()
            )));
        }
        // Every group's request runs at once; answers go back as they are ready, several in one
        // message when they are ready together.
        let answers: futures_util::stream::FuturesUnordered<_> = requests
            .into_iter()
            .zip(0u32..)
            .map(|(request, index)| {
                let service = self.clone();
                async move {
                    let outcome = match service.append_one(verified, request).await {
                        Ok(response) => Outcome::Response(response),
                        Err(status) => Outcome::Error(pb::RpcError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    };
                    pb::AppendEntriesBatchItem { index, outcome: Some(outcome) }
                }
            })
            .collect();
        let stream =
            answers.ready_chunks(APPEND_BATCH_ITEMS_MAX).map(|items| Ok(pb::AppendEntriesBatchResponse { items }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        self.ballot(Ballot::Vote, request).await
    }

    async fn pre_vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        self.ballot(Ballot::PreVote, request).await
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        check_claim(&request, request.get_ref().vote.as_ref())?;
        let r = request.into_inner();
        let raft = self.woken(r.group_id, r.target_generation)?;
        let vote = convert::vote_from_pb(r.vote.as_ref()).map_err(invalid)?;
        let meta = convert::snapshot_meta_from_pb(r.meta).map_err(invalid)?;
        let snapshot = openraft::storage::Snapshot { meta, snapshot: r.data.to_vec() };
        let response = raft.install_full_snapshot(vote, snapshot).await.map_err(raft_failed)?;
        Ok(Response::new(pb::InstallSnapshotResponse { vote: Some(convert::vote_to_pb(&response.vote)) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        check_claim(&request, request.get_ref().from_leader.as_ref())?;
        let r = request.into_inner();
        let raft = self.woken(r.group_id, r.target_generation)?;
        let request = convert::transfer_leader_from_pb(&r).map_err(invalid)?;
        let response = raft.handle_transfer_leader(request).await.map_err(raft_failed)?;
        Ok(Response::new(convert::transfer_leader_response_to_pb(&response)))
    }

    async fn node_heartbeat(
        &self,
        request: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        let from = request.get_ref().from;
        check_node_claim(&request, from)?;
        self.quiescence.heard_from(from);
        Ok(Response::new(pb::NodeHeartbeatResponse {}))
    }

    async fn quiesce(&self, request: Request<pb::QuiesceRequest>) -> Result<Response<pb::QuiesceResponse>, Status> {
        let from = request.get_ref().from;
        check_node_claim(&request, from)?;
        let r = request.into_inner();
        if r.groups.len() > QUIESCE_GROUPS_MAX {
            return Err(Status::invalid_argument(format!(
                "{} groups in one quiesce request; at most {QUIESCE_GROUPS_MAX}",
                r.groups.len()
            )));
        }
        let quiesced = self.quiescence.on_quiesce(from, r.groups, &self.groups);
        Ok(Response::new(pb::QuiesceResponse { quiesced }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A connection proved to be node 3 may speak for node 3 only; without a proof (plaintext
    /// peers) nothing is checked.
    #[test]
    fn a_raft_request_must_speak_for_its_connections_node() {
        let vote = |node_id| Some(pb::Vote { term: 9, node_id, committed: false });
        let proved = |node: Option<NodeId>| {
            let mut request = Request::new(());
            if let Some(node) = node {
                request.extensions_mut().insert(VerifiedNode(node));
            }
            request
        };
        assert!(check_claim(&proved(Some(3)), vote(3).as_ref()).is_ok());
        let refused = check_claim(&proved(Some(3)), vote(2).as_ref()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(check_claim(&proved(Some(3)), None).is_err(), "a request that claims no one is refused too");
        assert!(check_claim(&proved(None), vote(2).as_ref()).is_ok());
    }
}
