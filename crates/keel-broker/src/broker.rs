//! A node: the metadata log and its follower, the reconciler that opens and removes partition
//! groups to match it, and the controller operations (create/delete topics, register nodes,
//! allocate producer ids).
//!
//! The metadata controller is an ordinary Keel partition, raft group 0 (`__meta`), replicated on
//! the configured voters; each record is one metadata command. Every voter replays its own
//! replica's committed records into [`Metadata`]; other nodes fetch `__meta` from a voter. Only
//! the leader of group 0 proposes commands, one at a time, after catching up with the log, so
//! validation runs against the latest state; `Metadata::apply` refuses anything invalid the same
//! way on every node, so a command proposed by a deposed leader cannot diverge the replicas.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use keel_proto::v1 as pb;
use keel_raft::types::{Raft, ReadPolicy};
use keel_raft::{AppendError, Connector, Faults, GroupId, IoMode, Node, NodeConfig, NodeId, RaftNode};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{Disk, LogConfig};
use prost::Message;
use rand::{RngCore, SeedableRng};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{BrokerConfig, Identity, claim_data_dir};
use crate::coordinator::CoordinatorFaults;
use crate::error::{BrokerError, append_status, meta_status, not_leader, producer_fenced};
use crate::groups::GroupCoordinator;
use crate::metadata::{
    self, Command, DELAYED_TOPIC, META_GROUP, META_TOPIC, MetaError, Metadata, OFFSETS_TOPIC, Partition, ProducerEpoch,
    TXN_TOPIC, Topic,
};
use crate::metrics::{GaugeGuard, Metrics};
use crate::producer_ids::{PRODUCER_ID_BLOCK, ProducerIds};

/// The gRPC metadata key of a caller's request id, logged with every line of the call.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id taken from a caller; a longer one (or one with spaces or control
/// characters) is replaced by the node's own.
const REQUEST_ID_BYTES_MAX: usize = 64;

/// The wall clock (record timestamps, retention): the only source of "now" in a broker.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The request header that counts how often a request was forwarded between nodes.
pub(crate) const HOPS_HEADER: &str = "keel-hops";
/// Requests are forwarded at most this often (client → follower → leader).
const HOPS_MAX: u32 = 2;

/// Bytes of a node key.
const NODE_KEY_BYTES: usize = 32;

/// Partitions a node opens at once when the metadata assigns it new ones.
const GROUPS_OPENING_MAX: usize = 4;

/// A running node; clones share it.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

/// How an AddPartitions request wants a topic to grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Growth {
    /// By this many partitions (older clients; a retry adds them again).
    Add(u32),
    /// To this many partitions in total (safe to retry).
    To(u32),
}

pub(crate) struct Inner {
    pub(crate) config: BrokerConfig,
    pub(crate) node: Arc<RaftNode>,
    pub(crate) disk: Arc<dyn Disk>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) meta: watch::Sender<Arc<Metadata>>,
    /// Admin writes run one at a time on the controller leader.
    admin_lock: tokio::sync::Mutex<()>,
    channels: Mutex<BTreeMap<String, Channel>>,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
    identity: Mutex<Identity>,
    /// Set when the node must stop (e.g. its data dir belongs to another cluster).
    pub(crate) fatal: watch::Sender<Option<String>>,
    /// Serving once the node knows the cluster and is registered in it.
    pub(crate) ready: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Group coordinators, by `__consumer_offsets` partition hosted here.
    pub(crate) groups: Mutex<BTreeMap<u32, Arc<GroupCoordinator>>>,
    /// Timer coordinators, by `__delayed` partition hosted here.
    pub(crate) timers: Mutex<BTreeMap<u32, Arc<crate::delayed::TimerCoordinator>>>,
    /// The transaction coordinators of the `__txn` partitions this node hosts.
    pub(crate) txns: Mutex<BTreeMap<u32, Arc<crate::txn::TxnCoordinator>>>,
    /// The wall clock when the node started, and the monotonic instant then: the timers' second
    /// opinion of the time (a wall clock stepped forward since does not fire timers early).
    pub(crate) booted: (i64, tokio::time::Instant),
    /// Bugs injected into the coordinators (negative controls only).
    pub(crate) coordinator_faults: CoordinatorFaults,
    /// The `__meta` offset up to which the hosted partitions match the metadata (see
    /// [`crate::moves`]: a move's leader waits for its new replicas to reach the move).
    pub(crate) reconciled: std::sync::atomic::AtomicU64,
    /// The highest high watermark seen per partition (they only grow): commits are checked
    /// against it without asking the partition's replicas each time.
    pub(crate) high_watermarks: Mutex<BTreeMap<GroupId, u64>>,
    /// Timestamps of the records consumer groups wait on, for their lag in seconds.
    pub(crate) lag_timestamps: Mutex<crate::lag::TimestampCache>,
    /// Bytes of produce requests waiting for their commit, node-wide (`in_flight_bytes_max`).
    pub(crate) in_flight_bytes: ByteBudget,
    /// Bytes fetched for Subscribe streams and not yet taken by their clients.
    pub(crate) subscribe_buffer: Arc<Semaphore>,
    /// Open Subscribe streams per client connection (its peer address).
    pub(crate) subscribes: Mutex<BTreeMap<std::net::SocketAddr, usize>>,
    /// Set when the node begins to stop: streams end so that a graceful stop does not wait for
    /// consumers that would otherwise never hang up.
    pub(crate) stopping: watch::Sender<bool>,
    /// The block of producer ids `InitProducerId` hands out (in memory only: lost on restart).
    producer_ids: ProducerIds,
    /// The node's Prometheus series (`/metrics`).
    pub(crate) metrics: Arc<Metrics>,
    /// The tokens file, when client authentication is on.
    pub(crate) tokens: Option<Arc<crate::auth::Tokens>>,
    /// When each principal's last denial was logged (at most one line per second each).
    pub(crate) denials_logged: Mutex<BTreeMap<String, tokio::time::Instant>>,
    /// Per-principal produce and fetch byte rates.
    pub(crate) quotas: crate::quota::Quotas,
}

/// How a node's partitions do their disk work, and bugs injected for negative controls. The
/// default is production's; the simulation runs disk work inline (a thread pool would break its
/// determinism) and, to prove its checker can fail, acknowledges before the flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageMode {
    /// Where blocking disk work (flushes, fsyncs) runs.
    pub io: IoMode,
    /// Injected bugs (negative controls only).
    pub faults: Faults,
    /// Injected coordinator bugs (negative controls only).
    pub coordinator: CoordinatorFaults,
    /// Whether partitions' flushes are coalesced node-wide or made per partition (the default).
    pub flush: keel_raft::FlushScope,
}

impl Default for StorageMode {
    fn default() -> StorageMode {
        StorageMode {
            io: IoMode::Blocking,
            faults: Faults::default(),
            coordinator: CoordinatorFaults::default(),
            flush: keel_raft::FlushScope::Partition,
        }
    }
}

impl Broker {
    /// Starts a node: claims its data dir, opens the metadata group (voters), and starts the
    /// follower, reconciler, registration and retention tasks. Serve [`Broker::router`] next.
    pub async fn start(
        config: BrokerConfig,
        disk: Arc<dyn Disk>,
        connector: Arc<dyn Connector>,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker, BrokerError> {
        Broker::start_with(config, StorageMode::default(), disk, connector, clock).await
    }

    /// [`Broker::start`] with another [`StorageMode`] (the simulation's).
    pub async fn start_with(
        config: BrokerConfig,
        storage: StorageMode,
        disk: Arc<dyn Disk>,
        connector: Arc<dyn Connector>,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker, BrokerError> {
        config.validate()?;
        let (identity, new_dir) = claim_data_dir(&*disk, &config.data_dir, config.node_id, &config.new_node_key)?;
        info!(node = config.node_id, new_dir, cluster = ?identity.cluster_id, "starting");
        let node_config = NodeConfig {
            node_id: config.node_id,
            advertised_addr: config.peer_addr.clone(),
            data_dir: config.data_dir.clone(),
            timings: config.timings,
            log: config.log.clone(),
            io: storage.io,
            network: config.network,
            append_timeout: config.append_timeout,
            seed: config.seed,
            flush: storage.flush,
        };
        let node = Arc::new(RaftNode::new(node_config, Arc::clone(&disk), Arc::clone(&connector)));
        node.set_producer_limits(keel_raft::producers::ProducerLimits {
            window: config.limits.producer_window,
            producers_max: config.limits.producers_per_partition_max,
            expiration_ms: config.limits.producer_id_expiration_ms,
        });
        node.set_catch_up_rate(config.limits.catch_up_bytes_per_sec);
        // Before any group opens: faults and the flush observer apply to groups opened from then on.
        node.set_faults(storage.faults);
        let metrics = Arc::new(Metrics::new(config.node_id, config.limits.metrics_partition_series_max));
        let config_quotas = (config.auth.produce_bytes_per_sec, config.auth.fetch_bytes_per_sec);
        let tokens = match &config.auth.tokens_file {
            Some(path) => {
                Some(Arc::new(crate::auth::Tokens::load(path).map_err(|e| BrokerError::Config(e.to_string()))?))
            }
            None => None,
        };
        node.set_flush_observer(Arc::clone(&metrics) as Arc<dyn keel_raft::FlushObserver>);
        for (id, addr) in &config.voters {
            node.set_peer_addr(*id, addr);
        }
        let (meta, _) = watch::channel(Arc::new(Metadata::new()));
        let (fatal, _) = watch::channel(None);
        let (ready, _) = watch::channel(false);
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ 0x6b65_656c);
        let limits = config.limits;
        let booted = (clock.now_ms(), tokio::time::Instant::now());
        let inner = Arc::new(Inner {
            config,
            node,
            disk,
            connector,
            clock,
            meta,
            admin_lock: tokio::sync::Mutex::new(()),
            channels: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(rng),
            identity: Mutex::new(identity),
            fatal,
            ready,
            tasks: Mutex::new(Vec::new()),
            groups: Mutex::new(BTreeMap::new()),
            timers: Mutex::new(BTreeMap::new()),
            txns: Mutex::new(BTreeMap::new()),
            booted,
            coordinator_faults: storage.coordinator,
            reconciled: std::sync::atomic::AtomicU64::new(0),
            high_watermarks: Mutex::new(BTreeMap::new()),
            lag_timestamps: Mutex::new(crate::lag::TimestampCache::default()),
            in_flight_bytes: ByteBudget::new(limits.in_flight_bytes_max),
            subscribe_buffer: Arc::new(Semaphore::new(limits.subscribe_buffer_bytes_max.min(Semaphore::MAX_PERMITS))),
            subscribes: Mutex::new(BTreeMap::new()),
            stopping: watch::channel(false).0,
            producer_ids: ProducerIds::new(),
            metrics,
            quotas: crate::quota::Quotas::new(config_quotas.0, config_quotas.1),
            tokens,
            denials_logged: Mutex::new(BTreeMap::new()),
        });
        // The copy of `__meta` on disk is resumed whatever the configuration says now (voters
        // change at run time); a configured voter without one asks the cluster first.
        match inner.node.stored_generation(META_GROUP)? {
            Some(generation) => {
                inner.node.open_group_with(META_GROUP, inner.meta_log(), generation).await?;
                if generation == 0 && inner.config.is_voter() {
                    let members: Vec<NodeId> = inner.config.voters.keys().copied().collect();
                    inner.spawn("meta-init", Arc::clone(&inner).ensure_initialized(META_GROUP, members));
                }
            }
            None if inner.config.is_voter() && inner.coordinator_faults.blank_voter_rejoins => {
                inner.spawn("meta-bootstrap", Arc::clone(&inner).open_blank_meta());
            }
            None if inner.config.is_voter() => inner.spawn("meta-bootstrap", Arc::clone(&inner).bootstrap_meta()),
            None => {}
        }
        inner.spawn("meta-follow", Arc::clone(&inner).follow_meta());
        inner.spawn("cluster-id", Arc::clone(&inner).name_cluster());
        inner.spawn("internal-topics", Arc::clone(&inner).create_internal_topics());
        inner.spawn("reconcile", Arc::clone(&inner).reconcile_loop());
        inner.spawn("register", Arc::clone(&inner).register());
        inner.spawn("retention", Arc::clone(&inner).retention_loop());
        inner.spawn("leader-balance", Arc::clone(&inner).leader_balance_loop());
        inner.spawn("moves", Arc::clone(&inner).move_loop());
        Ok(Broker { inner })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// Where other nodes reach this node's peer listener.
    pub fn peer_addr(&self) -> &str {
        &self.inner.config.peer_addr
    }

    /// The raft node (groups, stores): for tests and the simulation.
    pub fn raft_node(&self) -> &Arc<RaftNode> {
        &self.inner.node
    }

    /// The metadata as this node applied it.
    pub fn metadata(&self) -> Arc<Metadata> {
        self.inner.meta.borrow().clone()
    }

    /// Becomes `true` once the node knows its cluster and is registered in it.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }

    /// Becomes `Some(reason)` when the node must stop.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.inner.fatal.subscribe()
    }

    /// The node's metrics in the Prometheus (OpenMetrics) text format, state gauges as of now.
    /// A node that coordinates consumer groups first asks every node for high watermarks (and
    /// reads the timestamps their lag in seconds needs), so the scrape may take up to that
    /// question's deadline.
    pub async fn metrics_text(&self) -> Result<String, BrokerError> {
        let api = crate::service::Api { inner: Arc::clone(&self.inner) };
        let groups = api.coordinated_lags().await;
        self.inner
            .metrics
            .encode(&self.inner, &groups)
            .map_err(|e| BrokerError::Config(format!("encoding metrics: {e}")))
    }

    /// Serves `GET /metrics` on `listener` until the node stops (README, "Metrics").
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener) {
        let broker = self.clone();
        self.inner.spawn("metrics", crate::metrics_http::serve(broker, listener));
    }

    /// Counts a gRPC connection open while the returned guard lives (`keel_connections`).
    pub fn connection_opened(&self) -> GaugeGuard {
        GaugeGuard::new(&self.inner.metrics.connections)
    }

    /// A gRPC server with this node's connection limits, to serve [`Broker::router`] on.
    pub fn server(&self) -> tonic::transport::Server {
        let node = self.inner.config.node_id;
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .max_concurrent_streams(self.inner.config.limits.streams_per_connection_max)
            // One span per call, around the service's own (topic, partition, ...): every log
            // line of a call names the call, so one request is followed through a node's log
            // (and across nodes, when the client sends its own `x-request-id`).
            .trace_fn(move |request| {
                let n = requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = request
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| {
                        !v.is_empty() && v.len() <= REQUEST_ID_BYTES_MAX && v.chars().all(|c| c.is_ascii_graphic())
                    })
                    .map_or_else(|| format!("n{node}-{n}"), str::to_owned);
                info_span!("rpc", method = request.uri().path(), request_id = %id)
            })
    }

    /// Begins to stop: open Subscribe streams end (UNAVAILABLE, so consumers go elsewhere) and
    /// new ones are refused, letting a graceful stop finish. Requests keep being served.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Stops the background tasks and every raft group, flushing storage.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.inner.stop_tasks();
        self.inner.node.shutdown().await;
    }

    /// Stops everything without flushing: what a killed process leaves behind (simulation).
    pub async fn halt(&self) {
        self.inner.stop_tasks();
        self.inner.node.halt().await;
    }
}

impl Inner {
    pub(crate) fn spawn(&self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let span = info_span!("task", node = self.config.node_id, name);
        let handle = tokio::spawn(task.instrument(span));
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }

    fn stop_tasks(&self) {
        for task in std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner())) {
            task.abort();
        }
    }

    pub(crate) fn metadata(&self) -> Arc<Metadata> {
        self.meta.borrow().clone()
    }

    fn fail(&self, reason: String) {
        warn!(node = self.config.node_id, %reason, "node must stop");
        self.fatal.send_replace(Some(reason));
    }

    /// A cached channel to another node's gRPC server.
    /// The largest request or response message of the Producer and Consumer services, and the
    /// largest fetch response: a batch at the limit plus room for the envelope, and a fetch's
    /// bytes plus one more batch (a fetch returns at least one whole batch).
    pub(crate) fn message_limits(&self) -> (usize, usize) {
        let message_max = self.config.log.batch_bytes_max() + (1 << 20);
        (message_max, message_max + self.config.limits.fetch_bytes_max)
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.connector.channel(addr).map_err(|e| Status::unavailable(format!("dialling {addr}: {e}")))?;
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets the channel to `addr` when `status` came from the connection rather than from the
    /// peer (a broken or timed-out transport, which a simulated network never repairs).
    pub(crate) fn forget_broken(&self, addr: &str, status: &Status) {
        if is_transport_failure(status) {
            self.drop_channel(addr);
        }
    }

    /// Forgets a channel that failed, so the next call dials again (a simulated connection
    /// that lost a packet never recovers on its own).
    pub(crate) fn drop_channel(&self, addr: &str) {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
    }

    /// Where clients reach a node (what leader hints name), from the metadata.
    pub(crate) fn addr_of(&self, node: NodeId) -> Option<String> {
        if node == self.config.node_id {
            return Some(self.config.advertised_addr.clone());
        }
        self.metadata().nodes.get(&node).map(|n| n.addr.clone())
    }

    /// The status of a failed append, its leader hint naming the leader's client address (raft
    /// memberships know peer addresses).
    pub(crate) fn append_status(&self, what: &str, e: AppendError) -> Status {
        match e {
            AppendError::NotLeader { leader } => {
                not_leader(what, leader.and_then(|(id, _)| Some((id, self.addr_of(id)?))))
            }
            e => append_status(what, e),
        }
    }

    /// The peer address of the leader a NOT_LEADER status names (its `leader_id`): hints carry
    /// client addresses, and calls between nodes go to peer listeners.
    pub(crate) fn hinted_peer(&self, status: &Status) -> Option<String> {
        use tonic_types::StatusExt;
        let info = status.get_details_error_info()?;
        let leader = info.metadata.get("leader_id")?.parse().ok()?;
        self.peer_addr_of(leader)
    }

    /// Where this node reaches another node's peer listener: every call between nodes goes
    /// there, never to the client address.
    pub(crate) fn peer_addr_of(&self, node: NodeId) -> Option<String> {
        if node == self.config.node_id {
            return Some(self.config.peer_addr.clone());
        }
        self.metadata()
            .nodes
            .get(&node)
            .and_then(|n| n.peer_addr.clone())
            .or_else(|| self.config.voters.get(&node).cloned())
    }

    /// The leader of the metadata group, as far as this node's copy of it knows.
    pub(crate) fn meta_leader(&self) -> Option<NodeId> {
        self.node.leader(META_GROUP)
    }

    /// Whether this node's copy of `__meta` is a voter of the metadata group now.
    pub(crate) fn votes_in_meta(&self) -> bool {
        let me = self.config.node_id;
        self.node.metrics(META_GROUP).is_ok_and(|m| {
            let membership = m.membership_config.membership();
            membership.voter_ids().any(|v| v == me)
                && membership.get_node(&me).map(|n| n.generation) == self.node.generation(META_GROUP)
        })
    }

    /// The metadata's voters and where to reach them (not this node): the recorded ones, the
    /// configured ones, and where this data dir last saw `__meta` (a node whose metadata is empty
    /// or behind knows only the last two).
    pub(crate) fn meta_voter_addrs(&self) -> Vec<(NodeId, String)> {
        let mut voters: BTreeMap<NodeId, String> = BTreeMap::new();
        if let Some(c) = &self.metadata().controller {
            for n in c.hosts() {
                if let Some(addr) = self.peer_addr_of(n) {
                    voters.insert(n, addr);
                }
            }
        }
        for (id, addr) in &self.config.voters {
            voters.entry(*id).or_insert_with(|| addr.clone());
        }
        for (id, addr) in &self.identity.lock().unwrap_or_else(|e| e.into_inner()).meta_hosts {
            voters.entry(*id).or_insert_with(|| addr.clone());
        }
        voters.remove(&self.config.node_id);
        voters.into_iter().collect()
    }

    /// The metadata's voters as recorded, else as configured.
    pub(crate) fn meta_voters(&self) -> Vec<NodeId> {
        match &self.metadata().controller {
            Some(c) => c.replicas.clone(),
            None => self.config.voters.keys().copied().collect(),
        }
    }

    /// `__meta`'s log settings: nothing is ever deleted from it.
    fn meta_log(&self) -> LogConfig {
        LogConfig { retention_bytes: None, retention_ms: None, ..self.config.log.clone() }
    }

    pub(crate) fn leads_meta(&self) -> bool {
        self.meta_leader() == Some(self.config.node_id)
    }

    /// Where to forward a controller request: the metadata leader, or each voter in turn.
    pub(crate) fn controller_candidates(&self) -> Vec<(NodeId, String)> {
        if let Some(leader) = self.meta_leader()
            && let Some(addr) = self.peer_addr_of(leader)
        {
            return vec![(leader, addr)];
        }
        // Voters too: a copy that missed its removal from the voters (down meanwhile) believes
        // it votes, while its campaigns fail and it never learns a leader.
        self.meta_voter_addrs()
    }

    /// Initializes a new group's first membership. The preferred (first) replica does it at
    /// once, so it usually becomes the first leader; the others wait a few election timeouts and
    /// do it only if nobody reached them — initializing with the same membership on several
    /// replicas is safe.
    async fn ensure_initialized(self: Arc<Self>, group: GroupId, replicas: Vec<NodeId>) {
        let me = self.config.node_id;
        if replicas.first() != Some(&me) {
            tokio::time::sleep(Duration::from_millis(self.config.timings.election_max_ms * 2)).await;
        }
        match self.node.is_initialized(group).await {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
        let mut members = BTreeMap::new();
        for id in &replicas {
            let Some(addr) = self.peer_addr_of(*id) else {
                warn!(group, node = id, "no address for a replica; the group waits for its peers");
                return;
            };
            members.insert(*id, Node::new(addr));
        }
        match self.node.initialize_group(group, members).await {
            Ok(()) => {
                info!(group, ?replicas, "group initialized");
                // Campaign now rather than after an election timeout: a new topic is usable at once.
                if let Ok(raft) = self.node.raft(group) {
                    let _ = raft.trigger().elect(false).await;
                }
            }
            Err(e) => warn!(group, error = %e, "initializing a group failed"),
        }
    }

    /// Applies committed `__meta` batches to the metadata, in order.
    fn apply_meta_batches(&self, batches: &[keel_record::Batch]) {
        let mut next = (*self.metadata()).clone();
        let before = next.applied_offset;
        for batch in batches {
            for record in batch.records() {
                let record = match record {
                    Ok(r) => r,
                    Err(e) => {
                        // The batch's CRC held, so this is a bug in whoever wrote it.
                        self.fail(format!("undecodable __meta record: {e}"));
                        return;
                    }
                };
                match next.replay(record.offset, record.value.as_deref().unwrap_or_default()) {
                    Ok(None) => {}
                    Ok(Some(refusal)) => debug!(offset = record.offset, error = %refusal, "metadata command refused"),
                    Err(e) => {
                        self.fail(e.to_string());
                        return;
                    }
                }
            }
        }
        if next.applied_offset != before {
            self.check_cluster_id(&next);
            self.remember_meta_hosts(&next);
            self.meta.send_replace(Arc::new(next));
        }
    }

    /// A data dir remembers its cluster; a node never joins another one with it.
    fn check_cluster_id(&self, meta: &Metadata) {
        let Some(cluster) = &meta.cluster_id else { return };
        let mut identity = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        match &identity.cluster_id {
            Some(mine) if mine != cluster => {
                let reason = format!(
                    "data dir {} belongs to cluster {mine}, but this cluster is {cluster}",
                    self.config.data_dir.display()
                );
                drop(identity);
                self.fail(reason);
            }
            Some(_) => {}
            None => {
                identity.cluster_id = Some(cluster.clone());
                if let Err(e) = identity.store(&*self.disk, &self.config.data_dir) {
                    let reason = format!("recording the cluster id: {e}");
                    drop(identity);
                    self.fail(reason);
                }
            }
        }
    }

    /// A data dir remembers where `__meta` lives (stored only when that changes): after a move
    /// took it off the configured voters, a node restarted without a copy asks there, where
    /// otherwise it would only ask configured voters that hold none (broker sim seed 27: a power
    /// cut of every node after such a move left the cluster without metadata).
    fn remember_meta_hosts(&self, meta: &Metadata) {
        let Some(controller) = &meta.controller else { return };
        let hosts: BTreeMap<NodeId, String> = controller
            .hosts()
            .filter_map(|n| {
                let addr = meta.nodes.get(&n).and_then(|node| node.peer_addr.clone());
                addr.or_else(|| self.config.voters.get(&n).cloned()).map(|a| (n, a))
            })
            .collect();
        let mut identity = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.is_empty() || identity.meta_hosts == hosts {
            return;
        }
        identity.meta_hosts = hosts;
        if let Err(e) = identity.store(&*self.disk, &self.config.data_dir) {
            warn!(error = %e, "recording where __meta lives failed; a restart looks at the configured voters");
        }
    }

    /// Replays `__meta` as it commits: from this node's own copy while it votes in the
    /// metadata group (or its copy has more than this node applied), and otherwise by long
    /// polls of the voters. A copy comes and goes as the voters change at run time, and a new
    /// one is blank until the leader has filled it, so the source is chosen again every round.
    async fn follow_meta(self: Arc<Self>) {
        let mut turn = 0usize;
        loop {
            if let Ok(store) = self.node.store(META_GROUP) {
                let mut hw = store.high_watermark();
                let target = *hw.borrow_and_update();
                let applied = self.metadata().applied_offset;
                if applied < target {
                    match store.read_committed(applied, 1 << 20) {
                        Ok(batches) if !batches.is_empty() => {
                            self.apply_meta_batches(&batches);
                            continue;
                        }
                        Ok(_) => {}
                        // The copy was removed (or replaced) since it was looked up.
                        Err(_) if self.node.store(META_GROUP).is_err() => continue,
                        Err(e) => {
                            self.fail(format!("reading __meta: {e}"));
                            return;
                        }
                    }
                }
                if self.votes_in_meta() {
                    // Woken by a commit. A quiet second may also mean this copy was taken out of
                    // the voters, in which case the records after that never reach it: then one
                    // look at another voter (the leader knows everything committed already).
                    let quiet = tokio::time::timeout(Duration::from_secs(1), hw.changed()).await.is_err();
                    if quiet && !self.leads_meta() && !self.fetch_meta_from_voter(turn, 0).await {
                        turn = turn.wrapping_add(1);
                    }
                    continue;
                }
            }
            let wait_ms = if self.node.store(META_GROUP).is_ok() { 1_000 } else { 5_000 };
            if !self.fetch_meta_from_voter(turn, wait_ms).await {
                turn = turn.wrapping_add(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// One long poll of `__meta` at a voter (the `turn`th); whether it answered.
    async fn fetch_meta_from_voter(&self, turn: usize, wait_ms: u32) -> bool {
        let voters = self.meta_voter_addrs();
        let Some((_, addr)) = voters.get(turn % voters.len().max(1)) else { return false };
        let request = pb::FetchRequest {
            topic: META_TOPIC.into(),
            partition: 0,
            offset: self.metadata().applied_offset,
            max_bytes: 1 << 20,
            max_wait_ms: wait_ms,
            format: pb::FetchFormat::Batches as i32,
        };
        let result = match self.channel(addr) {
            Ok(channel) => {
                // A fetch answers with at least one whole batch, whatever max_bytes says.
                let mut client = pb::consumer_client::ConsumerClient::new(channel)
                    .max_decoding_message_size(self.message_limits().1);
                let deadline = Duration::from_millis(u64::from(wait_ms)) + Duration::from_secs(5);
                tokio::time::timeout(deadline, client.fetch(request)).await
            }
            Err(e) => Ok(Err(e)),
        };
        match result {
            Ok(Ok(response)) => {
                // All or nothing: dropping a bad batch and applying the rest would skip
                // records (which replay refuses as a gap); a bad answer is retried elsewhere.
                let batches: Result<Vec<_>, _> =
                    response.into_inner().batches.into_iter().map(keel_record::Batch::from_bytes).collect();
                match batches {
                    Ok(batches) => {
                        self.apply_meta_batches(&batches);
                        return true;
                    }
                    Err(e) => warn!(addr, error = %e, "a voter sent an invalid __meta batch; asking another"),
                }
            }
            Ok(Err(status)) => {
                self.forget_broken(addr, &status);
                debug!(addr, %status, "fetching __meta failed");
            }
            Err(_) => {
                debug!(addr, "fetching __meta timed out");
                self.drop_channel(addr);
            }
        }
        false
    }

    /// A configured voter that holds no copy of `__meta` opens a blank one only where that
    /// cannot stand in for a copy it had before: when every other configured voter is blank too
    /// (a new cluster), or when the controller leader says this node never registered (it was
    /// not running when the cluster formed without it). A registered node lost its disk: its
    /// old copy voted and acknowledged entries, and a blank one under the same generation
    /// could elect a second leader or lose a commit. It waits for `keel node replace`, which
    /// brings in a new generation of copy.
    async fn bootstrap_meta(self: Arc<Self>) {
        let me = self.config.node_id;
        let key_hash = {
            let identity = self.identity.lock().unwrap_or_else(|e| e.into_inner());
            crate::config::node_key_hash(&identity.key_bytes())
        };
        let mut told = false;
        loop {
            let mut initialized = false;
            let mut answered = 0;
            let others: Vec<(NodeId, String)> =
                self.config.voters.iter().filter(|(id, _)| **id != me).map(|(i, a)| (*i, a.clone())).collect();
            for (id, addr) in &others {
                let Ok(channel) = self.channel(addr) else { continue };
                let mut client = pb::node_status_client::NodeStatusClient::new(channel);
                let call = client.meta_copy(pb::MetaCopyRequest { node_id: me, key_hash: key_hash.clone() });
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(answer)) => {
                        let answer = answer.into_inner();
                        answered += 1;
                        initialized |= answer.initialized;
                        match answer.may_open_blank {
                            Some(false) => {
                                // Its copy comes when the metadata names a new one (reconcile).
                                warn!(
                                    leader = id,
                                    "this node's data dir holds no copy of __meta, and the cluster knew it with \
                                     another (a lost disk, or it left the voters): it votes again only with a \
                                     new copy, which `keel node replace {me}` brings in after a lost disk"
                                );
                                return;
                            }
                            Some(true) => {
                                info!(leader = id, "the cluster formed without this voter; joining with a blank copy");
                                return self.open_blank_meta().await;
                            }
                            None => {}
                        }
                    }
                    Ok(Err(status)) => debug!(node = id, %status, "asking a voter about __meta failed"),
                    Err(_) => debug!(node = id, "asking a voter about __meta timed out"),
                }
            }
            if answered == others.len() && !initialized {
                if let Some(cluster) = self.known_cluster() {
                    // This data dir belongs to a cluster already: its `__meta` was moved off the
                    // configured voters, and a blank copy here would start a second cluster beside
                    // it (broker sim seed 27: a power cut of every node after such a move). The
                    // metadata names this node's next copy, if any (reconcile).
                    info!(cluster, "no configured voter holds __meta: it lives on other nodes now; following it");
                    return;
                }
                info!("every configured voter is blank: a new cluster");
                return self.open_blank_meta().await;
            }
            if !told {
                info!("waiting for every configured voter, or the controller leader, to answer before opening __meta");
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn open_blank_meta(self: Arc<Self>) {
        loop {
            match self.node.open_group_with(META_GROUP, self.meta_log(), 0).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "opening __meta failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let members: Vec<NodeId> = self.config.voters.keys().copied().collect();
        self.ensure_initialized(META_GROUP, members).await;
    }

    /// What this node tells a configured voter without a copy of `__meta` ([`Inner::bootstrap_meta`]).
    pub(crate) async fn meta_copy(&self, request: pb::MetaCopyRequest) -> pb::MetaCopyResponse {
        // A node that knows its cluster's name says so even without a copy: the cluster exists
        // (its `__meta` may have moved to other nodes), and no configured voter may start one.
        let initialized =
            self.metadata().applied_offset > 0 || self.meta_copy_took_part() || self.known_cluster().is_some();
        let mut may_open_blank = None;
        if self.leads_meta()
            && let Ok(_turn) = self.controller_turn().await
        {
            let meta = self.metadata();
            // Known with this very data dir's key: it registered while it waited to open a copy.
            let this_dir_or_unknown = match meta.nodes.get(&request.node_id) {
                None => true,
                Some(n) => n.key_hash.as_deref() == Some(request.key_hash.as_str()),
            };
            let named_elsewhere = meta
                .controller
                .as_ref()
                .is_some_and(|c| !c.hosts().any(|n| n == request.node_id) || c.generation_of(request.node_id) != 0);
            may_open_blank = Some(this_dir_or_unknown && !named_elsewhere);
        }
        pb::MetaCopyResponse { initialized, may_open_blank }
    }

    /// The cluster this node's data dir belongs to, once it has seen it named.
    fn known_cluster(&self) -> Option<String> {
        self.identity.lock().unwrap_or_else(|e| e.into_inner()).cluster_id.clone()
    }

    /// Whether this node's copy of `__meta` shows that the group has done anything a lost copy
    /// could have taken part in: a leader was elected (its vote committed), it voted for
    /// another node, or it holds or applied entries past the initial membership. A copy that is
    /// merely initialised and campaigning for itself does not count: voters started together
    /// initialise before the late ones ask, and counting that copy left the late ones waiting
    /// for a leader that could not be elected without them (CI caught the deadlock). Counting
    /// only what was applied was not enough either: a copy just restarted has applied nothing
    /// until a leader commits again, and a lost-disk voter asking then voted as its old copy
    /// (the simulation caught two leaders' logs diverging).
    fn meta_copy_took_part(&self) -> bool {
        let Ok(m) = self.node.metrics(META_GROUP) else { return false };
        let voted_for_another = m.vote.leader_id().term > 0 && m.vote.leader_id().voted_for != self.config.node_id;
        m.vote.is_committed()
            || voted_for_another
            || m.last_applied.is_some()
            || m.last_log_index.is_some_and(|i| i > 0)
    }

    /// The leader of `__meta` names a new cluster.
    async fn name_cluster(self: Arc<Self>) {
        loop {
            if self.metadata().cluster_id.is_some() {
                return;
            }
            if self.leads_meta() {
                let id = {
                    let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                    format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
                };
                match self.propose(&Command::InitCluster { cluster_id: id }).await {
                    Ok(_) => continue,
                    Err(status) => debug!(%status, "naming the cluster failed; retrying"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// On the controller leader: creates `__consumer_offsets`, `__delayed` and `__txn` once min(3,
    /// voters) nodes are registered (at cluster initialisation, and on the first start of a
    /// cluster created before they existed).
    async fn create_internal_topics(self: Arc<Self>) {
        let replication = (self.config.voters.len() as u32).min(3);
        let wanted = [
            (OFFSETS_TOPIC, self.config.groups.offsets_partitions),
            (DELAYED_TOPIC, self.config.delayed.partitions),
            (TXN_TOPIC, self.config.txn.partitions),
        ];
        loop {
            let meta = self.metadata();
            let Some(&(name, partitions)) = wanted.iter().find(|(name, _)| !meta.topics.contains_key(*name)) else {
                return;
            };
            if self.leads_meta() && meta.cluster_id.is_some() && meta.nodes.len() >= replication as usize {
                match self.create_internal_topic(name, partitions, replication).await {
                    Ok(()) => {
                        info!(partitions, replication, "created {name}");
                        continue;
                    }
                    Err(status) => debug!(%status, "creating {name} failed; retrying"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn create_internal_topic(&self, name: &str, partitions: u32, replication: u32) -> Result<(), Status> {
        let _turn = self.controller_turn().await?;
        let meta = self.metadata();
        if meta.topics.contains_key(name) {
            return Ok(());
        }
        let assignment = meta.plan_assignment(partitions, replication).map_err(meta_status)?;
        let command =
            Command::CreateInternalTopic { name: name.to_owned(), replication_factor: replication, assignment };
        self.propose(&command).await.map(|_| ())
    }

    /// Registers this node (id and address) in the metadata, then reports ready.
    async fn register(self: Arc<Self>) {
        let me = self.config.node_id;
        let node_key = Bytes::from(self.identity.lock().unwrap_or_else(|e| e.into_inner()).key_bytes());
        let mut last_refusal = None;
        loop {
            let meta = self.metadata();
            let my_key = crate::config::node_key_hash(&node_key);
            let registered = meta.nodes.get(&me).is_some_and(|n| {
                n.addr == self.config.advertised_addr
                    && n.peer_addr.as_ref() == Some(&self.config.peer_addr)
                    && n.key_hash.as_ref() == Some(&my_key)
            });
            if registered && meta.cluster_id.is_some() {
                // A restarted node replays `__meta` from its own replica (or a voter); until it
                // has caught up with what is committed now, it would answer from old metadata
                // (a topic created since would look missing).
                match self.meta_position(0).await {
                    Ok(committed) => match self.wait_applied(committed).await {
                        Ok(()) => {
                            self.ready.send_replace(true);
                            info!(node = me, cluster = ?meta.cluster_id, "node registered, caught up and serving");
                            return;
                        }
                        Err(status) => debug!(%status, "metadata not caught up yet; retrying"),
                    },
                    Err(status) => debug!(%status, "asking the controller for its position failed; retrying"),
                }
            }
            if !registered && meta.cluster_id.is_some() {
                let request = pb::RegisterNodeRequest {
                    node_id: me,
                    addr: self.config.advertised_addr.clone(),
                    cluster_id: meta.cluster_id.clone().unwrap_or_default(),
                    node_key: node_key.clone(),
                    peer_addr: self.config.peer_addr.clone(),
                };
                match self.register_node(request, 0).await {
                    Ok(()) => {}
                    // Not a passing state: the cluster knows this id with another key (another
                    // data dir), or was not told to admit it. The operator must act.
                    Err(status) if matches!(status.code(), Code::PermissionDenied | Code::FailedPrecondition) => {
                        if last_refusal.as_deref() != Some(status.message()) {
                            error!(%status, "this node is refused by the cluster; it does not serve until that changes");
                            last_refusal = Some(status.message().to_owned());
                        }
                    }
                    Err(status) => debug!(%status, "registration failed; retrying"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// How far `__meta` is committed, from the controller leader (forwarded if need be).
    pub(crate) async fn meta_position(&self, hops: u32) -> Result<u64, Status> {
        if !self.leads_meta() {
            let request = self.forwardable(pb::MetaPositionRequest {}, hops)?;
            return self
                .forward_to_controller(request, |channel, request| async move {
                    let mut client = pb::controller_client::ControllerClient::new(channel);
                    client.meta_position(request).await.map(|r| r.into_inner().committed_offset)
                })
                .await;
        }
        let _turn = self.controller_turn().await?;
        Ok(self.metadata().applied_offset)
    }

    /// Handles a RegisterNode request: on the controller leader, checks and appends it;
    /// elsewhere forwards. The checks: the request's cluster is this one; a known id presents
    /// the key it registered with (no one takes over a node's address by claiming its id); an
    /// unknown id is a metadata voter, or the controller admits new nodes.
    pub(crate) async fn register_node(&self, request: pb::RegisterNodeRequest, hops: u32) -> Result<(), Status> {
        if request.addr.is_empty() || request.peer_addr.is_empty() {
            return Err(Status::invalid_argument("a node must register with a client and a peer address"));
        }
        if request.node_key.len() != NODE_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "a node registers with its {NODE_KEY_BYTES}-byte key (its data dir's), not {} bytes",
                request.node_key.len()
            )));
        }
        if !self.leads_meta() {
            let request = self.forwardable(request, hops)?;
            return self
                .forward_to_controller(request, |channel, request| async move {
                    pb::controller_client::ControllerClient::new(channel).register_node(request).await.map(|_| ())
                })
                .await;
        }
        let _turn = self.controller_turn().await?;
        let before = self.metadata();
        let node_id = request.node_id;
        let key_hash = crate::config::node_key_hash(&request.node_key);
        let refused = |why: String| {
            warn!(node = node_id, addr = %request.addr, why, "registration refused");
            Status::permission_denied(why)
        };
        match before.cluster_id.as_deref() {
            Some(cluster) if cluster == request.cluster_id => {}
            cluster => {
                let why = format!(
                    "node {node_id} registers for cluster {:?}, but this is cluster {cluster:?}",
                    request.cluster_id
                );
                warn!(node = node_id, addr = %request.addr, why, "registration refused");
                return Err(Status::failed_precondition(why));
            }
        }
        match before.nodes.get(&node_id) {
            Some(known) if known.key_hash.as_ref().is_some_and(|h| *h != key_hash) => {
                return Err(refused(format!(
                    "node {node_id} is registered with another key: only that node (its data dir) can change \
                     its address"
                )));
            }
            Some(known)
                if known.addr == request.addr
                    && known.peer_addr.as_ref() == Some(&request.peer_addr)
                    && known.key_hash.is_some() =>
            {
                return Ok(());
            }
            Some(_) => {}
            None if self.config.voters.contains_key(&node_id) || self.config.admit_new_nodes => {}
            None => {
                return Err(refused(format!(
                    "node {node_id} is not a metadata voter and this controller does not admit new nodes \
                     (admit_new_nodes = true on the voters lets brokers join)"
                )));
            }
        }
        let command = Command::RegisterNode {
            node_id,
            addr: request.addr.clone(),
            peer_addr: Some(request.peer_addr.clone()),
            key_hash: Some(key_hash),
        };
        let offset = self.propose(&command).await?;
        match self.outcome_at(&before, offset)? {
            None => Ok(()),
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// A draw from the node's seeded generator (the simulation's seed drives it).
    pub(crate) fn random_u64(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).next_u64()
    }

    /// A producer id for `InitProducerId`, from this node's block; an empty block is refilled
    /// from the controller first. Any failure to allocate is UNAVAILABLE without a leader hint:
    /// every node serves InitProducerId, so the client should retry, not look for the controller.
    pub(crate) async fn next_producer_id(&self) -> Result<i64, Status> {
        self.producer_ids
            .next(|| async {
                if self.coordinator_faults.producer_ids_reused {
                    // Negative control: every node, every time, the same block.
                    return Ok(0..i64::from(PRODUCER_ID_BLOCK));
                }
                self.allocate_producer_ids(PRODUCER_ID_BLOCK, 0).await.map_err(|status| {
                    Status::unavailable(format!(
                        "node {} could not get producer ids from the metadata controller ({}: {}); retry",
                        self.config.node_id,
                        status.code(),
                        status.message()
                    ))
                })
            })
            .await
    }

    /// Allocates `count` producer ids: on the controller leader, appends an
    /// `AllocateProducerIds` planned from the latest metadata and returns the block once it is
    /// applied; elsewhere forwards the request there.
    pub(crate) async fn allocate_producer_ids(&self, count: u32, hops: u32) -> Result<Range<i64>, Status> {
        let max = metadata::PRODUCER_IDS_PER_ALLOCATION_MAX;
        if count == 0 || count > max {
            return Err(Status::invalid_argument(format!("count must be between 1 and {max}, not {count}")));
        }
        if !self.leads_meta() {
            let request = self.forwardable(pb::AllocateProducerIdsRequest { count }, hops)?;
            let response = self
                .forward_to_controller(request, |channel, request| async move {
                    let mut client = pb::controller_client::ControllerClient::new(channel);
                    client.allocate_producer_ids(request).await.map(|r| r.into_inner())
                })
                .await?;
            // Checked before the ids are used: a wrong block would repeat somebody's ids.
            let end = response.first.checked_add(i64::from(response.count));
            return match end {
                Some(end) if response.first >= 0 && response.count == count => Ok(response.first..end),
                _ => Err(Status::internal(format!(
                    "the controller answered {} ids from {} to a request for {count}",
                    response.count, response.first
                ))),
            };
        }
        let _turn = self.controller_turn().await?;
        let before = self.metadata();
        let first = before.next_producer_id;
        let Some(end) = first.checked_add(i64::from(count)) else {
            return Err(meta_status(MetaError::Precondition("the producer-id space is exhausted".into())));
        };
        let command = Command::AllocateProducerIds { first, count };
        let offset = self.propose(&command).await?;
        match self.outcome_at(&before, offset)? {
            None => Ok(first..end),
            // Another allocation from `first` came first (e.g. an earlier proposal of this
            // leader that timed out and committed later): this one allocated nothing.
            Some(MetaError::Precondition(reason)) => {
                Err(Status::aborted(format!("the producer-id allocation raced another ({reason}); retry")))
            }
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// Gives a stable producer identity its next id and epoch: on the controller leader, appends
    /// an `InitProducerIdentity` planned from the latest metadata and answers once it is applied;
    /// elsewhere forwards the request there. With `claimed` (an instance bumping its own epoch),
    /// only if the identity still holds it: otherwise PRODUCER_FENCED. A `request_token` (not
    /// 0) equal to that of the request that set the identity's current epoch marks a retry of
    /// it: it is answered that epoch again, neither bumped twice nor fenced.
    pub(crate) async fn init_producer_identity(
        &self,
        identity: String,
        claimed: Option<ProducerEpoch>,
        request_token: u64,
        hops: u32,
    ) -> Result<ProducerEpoch, Status> {
        metadata::validate_producer_identity(&identity).map_err(meta_status)?;
        if !self.leads_meta() {
            let message = pb::InitProducerIdRequest {
                producer_identity: Some(identity),
                producer_id: claimed.map(|c| c.producer_id),
                producer_epoch: claimed.map(|c| i32::from(c.epoch)),
                request_token,
            };
            let request = self.forwardable(message, hops)?;
            let response = self
                .forward_to_controller(request, |channel, request| async move {
                    let mut client = pb::controller_client::ControllerClient::new(channel);
                    client.init_producer_identity(request).await.map(|r| r.into_inner())
                })
                .await?;
            return match i16::try_from(response.producer_epoch) {
                Ok(epoch) if epoch >= 0 && response.producer_id >= 0 => {
                    Ok(ProducerEpoch { producer_id: response.producer_id, epoch })
                }
                _ => Err(Status::internal(format!(
                    "the controller answered producer id {} epoch {}",
                    response.producer_id, response.producer_epoch
                ))),
            };
        }
        let _turn = self.controller_turn().await?;
        let before = self.metadata();
        let holder = before.producer_identities.get(&identity).copied();
        if let Some(h) = holder
            && request_token != 0
            && h.request_token == request_token
        {
            return Ok(h.current);
        }
        let current = holder.map(|h| h.current);
        if let Some(claimed) = claimed
            && current != Some(claimed)
        {
            return Err(producer_fenced(format!(
                "producer identity {identity:?} holds {}, not id {} epoch {}: another instance re-initialised it",
                current.map_or_else(|| "nothing".to_owned(), |c| format!("id {} epoch {}", c.producer_id, c.epoch)),
                claimed.producer_id,
                claimed.epoch
            )));
        }
        if self.coordinator_faults.identity_epoch_reused
            && claimed.is_none()
            && let Some(current) = current
        {
            return Ok(current);
        }
        let command = before.plan_producer_identity(&identity, request_token).map_err(meta_status)?;
        let Command::InitProducerIdentity { next, .. } = &command else {
            return Err(Status::internal("planned the wrong metadata command"));
        };
        let next = *next;
        let offset = self.propose(&command).await?;
        match self.outcome_at(&before, offset)? {
            None => Ok(next),
            // Another change of the identity (or of the id counter) came first: this one changed
            // nothing, and planning it again from the newer metadata is safe.
            Some(MetaError::Precondition(reason)) => {
                Err(Status::aborted(format!("the producer identity change raced another ({reason}); retry")))
            }
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// Whether the command at `offset` (committed and applied here) was applied or refused,
    /// found by replaying the committed records from `before` (the metadata it was planned
    /// from) up to it. The latest metadata cannot tell: it may include other commands since.
    pub(crate) fn outcome_at(&self, before: &Metadata, offset: u64) -> Result<Option<MetaError>, Status> {
        let store = self.node.store(META_GROUP).map_err(|_| not_leader("the metadata log", None))?;
        let mut replayed = before.clone();
        while replayed.applied_offset <= offset {
            let from = replayed.applied_offset;
            let batches = store
                .read_committed(from, 1 << 20)
                .map_err(|e| Status::unavailable(format!("reading __meta back: {e}")))?;
            for batch in &batches {
                for record in batch.records() {
                    let record = record.map_err(|e| Status::internal(format!("undecodable __meta record: {e}")))?;
                    if record.offset > offset {
                        break;
                    }
                    let refusal = replayed
                        .replay(record.offset, record.value.as_deref().unwrap_or_default())
                        .map_err(|e| Status::internal(e.to_string()))?;
                    if record.offset == offset {
                        return Ok(refusal);
                    }
                }
            }
            if replayed.applied_offset == from {
                return Err(Status::unavailable(format!("__meta record {offset} is not readable here yet")));
            }
        }
        Err(Status::internal(format!("__meta record {offset} was applied before the metadata it was planned from")))
    }

    /// Wraps a request for forwarding, counting the hop; refuses a request that went too far.
    pub(crate) fn forwardable<T>(&self, message: T, hops: u32) -> Result<Request<T>, Status> {
        if hops >= HOPS_MAX {
            return Err(not_leader("the metadata log", None));
        }
        let mut request = Request::new(message);
        request.set_timeout(self.config.append_timeout + Duration::from_secs(1));
        if let Ok(value) = (hops + 1).to_string().parse() {
            request.metadata_mut().insert(HOPS_HEADER, value);
        }
        Ok(request)
    }

    /// Sends a request to the controller leader (or each voter in turn) and returns its answer.
    pub(crate) async fn forward_to_controller<T, R, F, Fut>(&self, request: Request<T>, call: F) -> Result<R, Status>
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<R, Status>>,
    {
        let candidates = self.controller_candidates();
        if candidates.is_empty() {
            return Err(not_leader("the metadata log", None));
        }
        let mut last = Status::unavailable("no controller reachable");
        for (_, addr) in candidates {
            let channel = self.channel(&addr)?;
            let mut attempt = Request::new(request.get_ref().clone());
            *attempt.metadata_mut() = request.metadata().clone();
            let deadline = self.config.append_timeout + Duration::from_secs(2);
            match tokio::time::timeout(deadline, call(channel, attempt)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable || is_transport_failure(&status) => {
                    self.forget_broken(&addr, &status);
                    last = status;
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    self.drop_channel(&addr);
                    last = Status::deadline_exceeded(format!("the controller at {addr} did not answer in time"));
                }
            }
        }
        Err(last)
    }

    /// Appends one command to `__meta` (this node must lead it) and waits until it is applied
    /// here. Returns its offset.
    pub(crate) async fn propose(&self, command: &Command) -> Result<u64, Status> {
        let value = metadata::encode_command(command);
        let mut builder = BatchBuilder::new(self.config.log.batch_bytes_max());
        builder
            .push(NewRecord { timestamp_ms: self.clock.now_ms(), key: None, value: Some(&value), headers: &[] })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let appended = self
            .node
            .append(META_GROUP, builder.build())
            .await
            .map_err(|e| self.append_status("the metadata log", e))?;
        self.wait_applied(appended.next_offset).await?;
        Ok(appended.base_offset)
    }

    /// Waits until the metadata is applied up to `offset` (exclusive).
    pub(crate) async fn wait_applied(&self, offset: u64) -> Result<(), Status> {
        let mut rx = self.meta.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.append_timeout;
        loop {
            if rx.borrow_and_update().applied_offset >= offset {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("the node is stopping")),
                Err(_) => return Err(Status::deadline_exceeded("the metadata did not catch up in time")),
            }
        }
    }

    /// Waits (bounded) until this node's metadata satisfies `done`: after a forwarded admin
    /// write, so that the client reads its own write from the node it asked.
    pub(crate) async fn wait_meta(&self, done: impl Fn(&Metadata) -> bool) {
        let mut rx = self.meta.subscribe();
        let _ = tokio::time::timeout(self.config.append_timeout, rx.wait_for(|m| done(m))).await;
    }

    /// On the controller leader: waits until everything committed before now is applied, so
    /// validation sees the latest metadata. Holds the admin lock for the caller.
    pub(crate) async fn controller_turn(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        let guard = self.admin_lock.lock().await;
        let raft: Raft = self.node.raft(META_GROUP).map_err(|_| not_leader("the metadata log", None))?;
        self.node.wake(META_GROUP).await;
        let read = tokio::time::timeout(self.config.append_timeout, raft.ensure_linearizable(ReadPolicy::ReadIndex))
            .await
            .map_err(|_| Status::deadline_exceeded("the metadata leader could not confirm its leadership in time"))?
            .map_err(|_| {
                not_leader("the metadata log", self.meta_leader().and_then(|l| Some((l, self.addr_of(l)?))))
            })?;
        raft.wait(Some(self.config.append_timeout))
            .applied_index_at_least(Some(read.log_id().index), "metadata read index")
            .await
            .map_err(|e| Status::deadline_exceeded(format!("metadata did not apply in time: {e}")))?;
        let store = self.node.store(META_GROUP).map_err(|_| not_leader("the metadata log", None))?;
        let hw = *store.high_watermark().borrow();
        self.wait_applied(hw).await?;
        Ok(guard)
    }

    /// Creates a topic (controller leader only); returns its metadata once applied.
    pub(crate) async fn create_topic(
        &self,
        name: String,
        partitions: u32,
        replication_factor: u32,
        settings: metadata::TopicSettings,
    ) -> Result<Topic, Status> {
        let _turn = self.controller_turn().await?;
        let meta = self.metadata();
        metadata::validate_replication_factor(replication_factor).map_err(meta_status)?;
        let replication_factor = match replication_factor {
            0 => metadata::default_replication_factor(meta.nodes.len()),
            n => n,
        };
        if let Some(existing) = meta.topics.get(&name) {
            // A retry of a create whose answer was lost asks for exactly what exists: it succeeds
            // and changes nothing. Anything else is somebody else's topic.
            let identical = existing.partitions.len() == partitions as usize
                && existing.replication_factor == replication_factor
                && existing.settings == settings;
            return if identical {
                Ok(existing.clone())
            } else {
                Err(meta_status(metadata::MetaError::TopicExists(name)))
            };
        }
        let assignment = meta.plan_assignment(partitions, replication_factor).map_err(meta_status)?;
        self.check_capacity(&meta, &assignment)?;
        let command =
            Command::CreateTopic { name: name.clone(), replication_factor, settings, assignment: assignment.clone() };
        self.propose(&command).await?;
        let meta = self.metadata();
        match meta.topics.get(&name) {
            Some(t) if t.partitions.iter().map(|p| &p.replicas).eq(assignment.iter()) => Ok(t.clone()),
            _ => Err(Status::aborted("the topic changed concurrently; describe it and retry")),
        }
    }

    /// Deletes a topic (controller leader only).
    pub(crate) async fn delete_topic(&self, name: String) -> Result<(), Status> {
        let _turn = self.controller_turn().await?;
        match self.metadata().topics.get(&name) {
            None => return Err(meta_status(metadata::MetaError::UnknownTopic(name))),
            Some(t) if t.internal => {
                return Err(Status::permission_denied(format!("{name:?} is internal to Keel and cannot be deleted")));
            }
            Some(_) => {}
        }
        self.propose(&Command::DeleteTopic { name }).await.map(|_| ())
    }

    /// Adds or removes an ACL rule (controller leader only); refused rules change nothing.
    pub(crate) async fn change_acl(&self, command: Command) -> Result<(), Status> {
        let _turn = self.controller_turn().await?;
        let before = self.metadata();
        let offset = self.propose(&command).await?;
        match self.outcome_at(&before, offset)? {
            None => Ok(()),
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// Grows a topic (controller leader only).
    pub(crate) async fn add_partitions(&self, name: String, growth: Growth) -> Result<Topic, Status> {
        let _turn = self.controller_turn().await?;
        let meta = self.metadata();
        let topic =
            meta.topics.get(&name).ok_or_else(|| meta_status(metadata::MetaError::UnknownTopic(name.clone())))?;
        if topic.internal {
            return Err(Status::permission_denied(format!("{name:?} is internal to Keel; its partitions are fixed")));
        }
        let before = topic.partitions.len() as u32;
        let count = match growth {
            Growth::Add(count) => count,
            // Already there: the retry of a call that succeeded.
            Growth::To(total) if total == before => return Ok(topic.clone()),
            Growth::To(total) if total < before => {
                return Err(Status::failed_precondition(format!(
                    "topic {name:?} has {before} partitions, more than {total}; partitions are never removed"
                )));
            }
            Growth::To(total) => total - before,
        };
        let assignment = meta.plan_assignment(count, topic.replication_factor).map_err(meta_status)?;
        self.check_capacity(&meta, &assignment)?;
        let command = Command::AddPartitions { name: name.clone(), assignment, partitions_before: Some(before) };
        self.propose(&command).await?;
        match self.metadata().topics.get(&name) {
            Some(t) if t.partitions.len() == (before + count) as usize => Ok(t.clone()),
            _ => Err(Status::aborted("the topic changed concurrently; describe it and retry")),
        }
    }

    /// Keeps the local partition groups equal to the metadata's assignment.
    async fn reconcile_loop(self: Arc<Self>) {
        // Not before the metadata has caught up: a restarted node replays `__meta` from the
        // start, and its intermediate states put partitions where they were before later moves
        // (acting on them would drop the copy of a partition this node holds as a voter now).
        // A node the cluster does not admit (another data dir under its id) never gets here.
        let mut ready = self.ready.subscribe();
        if ready.wait_for(|r| *r).await.is_err() {
            return;
        }
        let mut rx = self.meta.subscribe();
        let mut cleaned_upto: GroupId = META_GROUP + 1;
        loop {
            let meta = rx.borrow_and_update().clone();
            self.reconcile(&meta, &mut cleaned_upto).await;
            self.reconciled.store(meta.applied_offset, std::sync::atomic::Ordering::Release);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    async fn reconcile(self: &Arc<Self>, meta: &Metadata, cleaned_upto: &mut GroupId) {
        let me = self.config.node_id;
        for (id, node) in &meta.nodes {
            if *id != me
                && let Some(peer_addr) = &node.peer_addr
            {
                self.node.set_peer_addr(*id, peer_addr);
            }
        }
        let wanted = meta.groups_of(me);
        let open = self.node.group_ids();
        // Several at a time: each open waits for the disk (creating a partition syncs files and
        // directories), and one at a time made creating 3,000 partitions take 20 s per node.
        type Opening = (GroupId, u32, Option<Vec<NodeId>>, LogConfig, tracing::Span);
        let opening: Vec<Opening> = wanted
            .iter()
            .filter_map(|(group, (topic_name, partition, topic))| {
                let p = &topic.partitions[*partition as usize];
                let generation = p.generation_of(me);
                if open.contains(group) && self.node.generation(*group) == Some(generation) {
                    return None;
                }
                // A replica a move brings in joins through the leader: initialising it alone
                // would start a second group under the same id.
                let replicas = p.initialisable().then(|| p.replicas.clone());
                let span = info_span!("partition", topic = topic_name, partition, group, generation);
                Some((*group, generation, replicas, self.log_config(topic), span))
            })
            .collect();
        let opening = opening.into_iter().map(|(group, generation, replicas, log, span)| async move {
            let opened = self.open_copy(group, generation, log).instrument(span).await;
            (group, replicas, opened)
        });
        let mut opened = futures_util::stream::iter(opening).buffer_unordered(GROUPS_OPENING_MAX);
        while let Some((group, replicas, result)) = opened.next().await {
            match result {
                Ok(()) => {
                    if let Some(replicas) = replicas {
                        self.spawn("group-init", Arc::clone(self).ensure_initialized(group, replicas));
                    }
                }
                Err(e) => warn!(group, error = %e, "opening a partition failed"),
            }
        }
        self.reconcile_meta_copy(meta).await;
        self.start_group_coordinators();
        self.start_timer_coordinators();
        self.start_txn_coordinators();
        for group in open {
            if group != META_GROUP
                && !wanted.contains_key(&group)
                && let Err(e) = self.node.remove_group(group).await
            {
                warn!(group, error = %e, "removing a deleted partition failed");
            }
        }
        // Group ids are never reused: one below `next_group` that is not ours is a partition
        // deleted (possibly while this node was down), whose leftover data can go.
        while *cleaned_upto < meta.next_group {
            let group = *cleaned_upto;
            if !wanted.contains_key(&group)
                && let Err(e) = self.node.remove_group(group).await
            {
                warn!(group, error = %e, "removing a deleted partition failed");
            }
            *cleaned_upto += 1;
        }
    }

    /// Keeps this node's copy of `__meta` as the recorded voters say: a node a voter change
    /// brings in opens the copy the metadata names (blank; the leader fills it), and one it took
    /// out drops its copy. Before the voters are recorded the configured voters keep theirs.
    async fn reconcile_meta_copy(&self, meta: &Metadata) {
        let me = self.config.node_id;
        let Some(controller) = &meta.controller else { return };
        if controller.hosts().any(|n| n == me) {
            let generation = controller.generation_of(me);
            if self.node.generation(META_GROUP) == Some(generation) {
                return;
            }
            let span = info_span!("meta-copy", generation);
            if let Err(e) = self.open_copy(META_GROUP, generation, self.meta_log()).instrument(span).await {
                warn!(generation, error = %e, "opening a copy of __meta failed");
            }
        } else if matches!(self.node.stored_generation(META_GROUP), Ok(Some(_))) {
            info!("this node left the metadata voters: dropping its copy of __meta");
            if let Err(e) = self.node.remove_group(META_GROUP).await {
                warn!(error = %e, "removing the copy of __meta failed");
            }
        }
    }

    /// Opens copy `generation` of a partition here. A copy of an older generation is what is left
    /// of this node's earlier membership (a move took the partition off and now brings it back):
    /// the move that removed it finished, so no committed membership counts on it any more, and it
    /// is dropped for the blank copy the leader will fill.
    async fn open_copy(&self, group: GroupId, generation: u32, log: LogConfig) -> Result<(), keel_raft::NodeError> {
        match self.node.open_group_with(group, log.clone(), generation).await {
            // A newer copy than the metadata names means this view of it is behind: keep it.
            Err(keel_raft::NodeError::Generation { have, .. }) if have < generation => {
                info!(group, have, generation, "replacing an old copy of the partition with a new generation");
                self.node.remove_group(group).await?;
                self.node.open_group_with(group, log, generation).await
            }
            other => other,
        }
    }

    fn log_config(&self, topic: &Topic) -> LogConfig {
        let mut log = self.config.log.clone();
        if topic.internal {
            // A node-wide retention must never delete group state: an internal partition is
            // trimmed only below its own compaction point. Segments sized to a quarter of the
            // compaction threshold let a compaction free most of what it rewrote past.
            log.retention_ms = None;
            log.retention_bytes = None;
            let segment = (self.config.groups.offsets_compact_bytes / 4).max(keel_storage::SEGMENT_BYTES_MIN);
            log.segment_bytes_max = log.segment_bytes_max.min(segment);
            log.preallocate_step_bytes = log.preallocate_step_bytes.min(log.segment_bytes_max);
            return log;
        }
        if let Some(ms) = topic.settings.retention_ms {
            log.retention_ms = Some(ms);
        }
        if let Some(bytes) = topic.settings.retention_bytes {
            log.retention_bytes = Some(bytes);
        }
        log
    }

    /// Applies retention to every local partition now and then.
    async fn retention_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.retention_interval).await;
            let now = self.clock.now_ms();
            for group in self.node.group_ids() {
                if group == META_GROUP {
                    continue;
                }
                if let Err(e) = self.node.apply_retention(group, now).await {
                    debug!(group, error = %e, "retention skipped");
                }
            }
        }
    }

    /// Hands leadership back to each partition's preferred (first) replica once it is back in
    /// sync, so that leaders stay spread after failovers (Kafka's preferred-leader election).
    async fn leader_balance_loop(self: Arc<Self>) {
        let me = self.config.node_id;
        let interval = Duration::from_millis(self.config.timings.election_max_ms.saturating_mul(10).max(1_000));
        loop {
            tokio::time::sleep(interval).await;
            let meta = self.metadata();
            for (group, (_, partition, topic)) in meta.groups_of(me) {
                let p = &topic.partitions[partition as usize];
                // Mid-move the driver decides who leads (a leader it removes steps down itself).
                if p.target.is_some() {
                    continue;
                }
                let preferred = p.replicas[0];
                if preferred == me {
                    continue;
                }
                let Ok(metrics) = self.node.metrics(group) else { continue };
                if metrics.current_leader != Some(me) {
                    continue;
                }
                let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
                let caught_up = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&preferred))
                    .is_some_and(|m| m.as_ref().is_some_and(|m| m.index >= applied));
                if caught_up && let Ok(raft) = self.node.raft(group) {
                    info!(group, to = preferred, "handing leadership back to the preferred replica");
                    self.node.wake(group).await;
                    let _ = raft.trigger().transfer_leader(preferred).await;
                }
            }
        }
    }

    /// Refuses (UNAVAILABLE, so clients ask another node) while this node is not ready: a node
    /// that just restarted replays `__meta` from scratch, and until then its metadata lacks
    /// topics that exist; answering NOT_FOUND from it would tell clients they do not.
    pub(crate) fn check_serving(&self) -> Result<(), Status> {
        if *self.ready.borrow() {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "node {} is starting: it has not caught up with the cluster's metadata yet; ask another node",
                self.config.node_id
            )))
        }
    }

    /// Resolves a (topic, partition) to its group and replicas; `__meta` is group 0.
    pub(crate) fn resolve(&self, topic: &str, partition: u32) -> Result<(GroupId, Vec<NodeId>, Option<u32>), Status> {
        if topic == META_TOPIC {
            if partition != 0 {
                return Err(Status::not_found("__meta has one partition, 0"));
            }
            return Ok((META_GROUP, self.meta_voters(), None));
        }
        if topic.is_empty() {
            return Err(Status::invalid_argument("topic name must not be empty"));
        }
        self.check_serving()?;
        let meta = self.metadata();
        let t = meta.topics.get(topic).ok_or_else(|| Status::not_found(format!("topic {topic:?} does not exist")))?;
        let p: &Partition = t.partitions.get(partition as usize).ok_or_else(|| {
            Status::not_found(format!("topic {topic:?} has {} partitions; {partition} is not one", t.partitions.len()))
        })?;
        Ok((p.group, p.replicas.clone(), t.settings.batch_bytes_max))
    }

    /// The largest batch a partition accepts.
    pub(crate) fn batch_limit(&self, topic_limit: Option<u32>) -> usize {
        let node = self.config.log.batch_bytes_max();
        topic_limit.map_or(node, |t| (t as usize).min(node))
    }

    /// Encodes a produce request's records into one batch, or checks the batch it carries.
    pub(crate) fn batch_of(&self, request: &pb::ProduceRequest, limit: usize) -> Result<Bytes, Status> {
        match (request.records.is_empty(), request.batch.is_empty()) {
            (true, true) => Err(Status::invalid_argument("a produce request needs records (or one encoded batch)")),
            (false, false) => Err(Status::invalid_argument("send records or one encoded batch, not both")),
            (true, false) => {
                let batch = keel_record::Batch::from_bytes(request.batch.clone())
                    .map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
                if batch.bytes().len() > limit {
                    return Err(too_large(batch.bytes().len(), limit));
                }
                let h = batch.header();
                if let Some(stamp) = producer_stamp(request)?
                    && (stamp.producer_id, stamp.producer_epoch, stamp.base_sequence)
                        != (h.producer_id, h.producer_epoch, h.base_sequence)
                {
                    return Err(Status::invalid_argument(
                        "the request's producer fields do not match the batch's header; leave them out",
                    ));
                }
                if h.attributes.is_raft_entry() || h.record_count == 0 {
                    return Err(Status::invalid_argument("a produced batch must hold at least one record"));
                }
                batch.validate_records().map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
                if h.first_timestamp_ms == 0 && h.max_timestamp_ms == 0 {
                    // Timestamp 0 means "the broker's clock at append", as for records sent one
                    // by one.
                    let mut buf = batch.into_bytes().to_vec();
                    keel_record::stamp_append_time(&mut buf, self.clock.now_ms())
                        .map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
                    return Ok(Bytes::from(buf));
                }
                Ok(batch.into_bytes())
            }
            (false, true) => {
                let mut builder = BatchBuilder::new(limit);
                if let Some(stamp) = producer_stamp(request)? {
                    builder = builder.producer(stamp);
                }
                let now = self.clock.now_ms();
                for r in &request.records {
                    if r.timestamp_ms < 0 {
                        return Err(Status::invalid_argument("record timestamps must not be negative"));
                    }
                    let headers: Vec<(&str, Option<&[u8]>)> =
                        r.headers.iter().map(|h| (h.key.as_str(), h.value.as_deref())).collect();
                    let record = NewRecord {
                        timestamp_ms: if r.timestamp_ms == 0 { now } else { r.timestamp_ms },
                        key: r.key.as_deref(),
                        value: r.value.as_deref(),
                        headers: &headers,
                    };
                    builder.push(record).map_err(|e| match e {
                        keel_record::EncodeError::TooLarge { size, limit } => too_large(size, limit),
                        other => Status::invalid_argument(other.to_string()),
                    })?;
                }
                Ok(builder.build())
            }
        }
    }

    /// Hands a produce request to its partition's raft group (this node must host it).
    /// Submits a produce to its partition's raft group. The permit holds the request's bytes in
    /// the node's in-flight budget until it is dropped, after the commit was awaited.
    pub(crate) async fn submit(
        &self,
        request: &pb::ProduceRequest,
    ) -> Result<(keel_raft::PendingAppend, OwnedSemaphorePermit), Status> {
        if request.topic == META_TOPIC {
            return Err(Status::invalid_argument("__meta is written by the controller only"));
        }
        if request.deliver_at_ms.is_some() || request.delay_ms.is_some() {
            return Err(Status::invalid_argument("a delayed produce is sent with the unary Produce call"));
        }
        if self.metadata().topics.get(&request.topic).is_some_and(|t| t.internal) {
            return Err(Status::permission_denied(format!(
                "{} is internal to Keel: only Keel writes it",
                request.topic
            )));
        }
        let (group, replicas, topic_limit) = self.resolve(&request.topic, request.partition)?;
        // Before the batch is built: a node at its budget holds no more than it already does.
        let permit = self.in_flight_permit(request.encoded_len())?;
        let batch = self.batch_of(request, self.batch_limit(topic_limit))?;
        let what = format!("{}/{}", request.topic, request.partition);
        match self.node.submit(group, batch).await {
            Ok(pending) => Ok((pending, permit)),
            Err(AppendError::UnknownGroup(_)) if !replicas.contains(&self.config.node_id) => {
                let leader = replicas.first().and_then(|id| Some((*id, self.addr_of(*id)?)));
                Err(not_leader(&what, leader))
            }
            Err(e) => Err(self.append_status(&what, e)),
        }
    }
}

impl Inner {
    /// Refuses new partitions beyond the cluster's `partitions_max` or, on any node, beyond
    /// `partitions_per_node_max` replicas: each one is a raft group and a preallocated segment,
    /// so one request could otherwise exhaust every node's disk and memory.
    fn check_capacity(&self, meta: &Metadata, assignment: &[Vec<NodeId>]) -> Result<(), Status> {
        let limits = &self.config.limits;
        let existing: usize = meta.topics.values().map(|t| t.partitions.len()).sum();
        if existing + assignment.len() > limits.partitions_max {
            return Err(Status::resource_exhausted(format!(
                "the cluster has {existing} partitions; {} more would exceed partitions_max ({})",
                assignment.len(),
                limits.partitions_max
            )));
        }
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        let replicas = meta.topics.values().flat_map(|t| t.partitions.iter().map(|p| &p.replicas));
        for node in replicas.chain(assignment.iter()).flatten() {
            *per_node.entry(*node).or_default() += 1;
        }
        if let Some((node, count)) = per_node.iter().find(|(_, c)| **c > limits.partitions_per_node_max) {
            return Err(Status::resource_exhausted(format!(
                "node {node} would host {count} partition replicas, more than partitions_per_node_max ({}); \
                 add nodes or use fewer partitions",
                limits.partitions_per_node_max
            )));
        }
        Ok(())
    }

    /// Takes `bytes` from the node's in-flight budget, or refuses at once.
    fn in_flight_permit(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Status> {
        self.in_flight_bytes.try_take(bytes).map_err(|max| {
            Status::unavailable(format!(
                "node {} holds {max} bytes of produce requests awaiting commit (in_flight_bytes_max); retry later",
                self.config.node_id
            ))
        })
    }
}

/// A node-wide budget of bytes. Full means refused at once (UNAVAILABLE, which clients retry
/// with backoff) rather than queued: a queue would hold the very requests the budget bounds.
pub(crate) struct ByteBudget {
    room: Arc<Semaphore>,
    max: usize,
}

impl ByteBudget {
    pub(crate) fn new(max: usize) -> ByteBudget {
        ByteBudget { room: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))), max }
    }

    /// Bytes taken now, and the budget's size.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let size = self.max.min(Semaphore::MAX_PERMITS);
        (size.saturating_sub(self.room.available_permits()), self.max)
    }

    /// Takes `bytes` (at most the whole budget, so one request always passes an idle node), or
    /// returns the budget's size when it has no room.
    pub(crate) fn try_take(&self, bytes: usize) -> Result<OwnedSemaphorePermit, usize> {
        let bytes = u32::try_from(bytes.min(self.max)).unwrap_or(u32::MAX);
        Arc::clone(&self.room).try_acquire_many_owned(bytes).map_err(|_| self.max)
    }
}

/// Whether a status was made by the client side of the connection (transport error, local
/// timeout, cancelled stream) rather than sent by the peer.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown)
}

/// The request's idempotent-producer stamp: none when `producer_id` is absent or -1, and then
/// the other two must not be set either; with an id, both must be set and in range.
fn producer_stamp(request: &pb::ProduceRequest) -> Result<Option<keel_record::ProducerStamp>, Status> {
    match (request.producer_id, request.producer_epoch, request.base_sequence) {
        (None | Some(-1), None | Some(-1), None | Some(-1)) => Ok(None),
        (Some(producer_id), Some(epoch), Some(base_sequence)) if producer_id >= 0 => {
            let producer_epoch = i16::try_from(epoch)
                .ok()
                .filter(|e| *e >= 0)
                .ok_or_else(|| Status::invalid_argument("producer_epoch must be 0 to 32767"))?;
            if base_sequence < 0 {
                return Err(Status::invalid_argument("base_sequence must not be negative"));
            }
            Ok(Some(keel_record::ProducerStamp { producer_id, producer_epoch, base_sequence }))
        }
        _ => Err(Status::invalid_argument(
            "an idempotent produce sets producer_id (>= 0), producer_epoch and base_sequence together",
        )),
    }
}

fn too_large(size: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "batch of {size} bytes exceeds the partition's limit of {limit} bytes; send fewer or smaller records"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    struct FixedClock;
    impl Clock for FixedClock {
        fn now_ms(&self) -> i64 {
            1_700_000_000_000
        }
    }

    /// One node that is its own controller, serving nothing over the network (it needs none).
    async fn single_node(dir: &std::path::Path) -> Broker {
        single_node_on(dir, Arc::new(keel_storage::FileDisk::new())).await
    }

    /// [`single_node`] on the given disk.
    pub(crate) async fn single_node_on(dir: &std::path::Path, disk: Arc<dyn Disk>) -> Broker {
        let config = BrokerConfig {
            node_id: 1,
            advertised_addr: "127.0.0.1:1".to_owned(),
            peer_addr: "127.0.0.1:2".to_owned(),
            data_dir: dir.join("node-1"),
            voters: BTreeMap::from([(1, "127.0.0.1:2".to_owned())]),
            timings: keel_raft::RaftTimings {
                heartbeat_ms: 50,
                election_min_ms: 200,
                election_max_ms: 400,
                quiesce: true,
            },
            log: LogConfig { segment_bytes_max: 1 << 20, preallocate_step_bytes: 1 << 20, ..LogConfig::default() },
            network: keel_raft::NetworkConfig::default(),
            append_timeout: Duration::from_secs(5),
            retention_interval: Duration::from_secs(3600),
            limits: crate::Limits::default(),
            groups: Default::default(),
            delayed: Default::default(),
            txn: Default::default(),
            seed: 1,
            new_node_key: crate::config::node_key_from_seed(1),
            admit_new_nodes: false,
            auth: Default::default(),
        };
        let broker = Broker::start(config, disk, Arc::new(keel_raft::TcpConnector::default()), Arc::new(FixedClock))
            .await
            .unwrap();
        let mut ready = broker.ready();
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r)).await.unwrap().unwrap();
        broker
    }

    /// Registration proves identity: a known id with another key, another cluster's id and an
    /// id the controller does not admit are refused, and the metadata does not change; the
    /// node itself, with its key, may move.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registration_must_prove_the_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let broker = single_node(dir.path()).await;
        let inner = &broker.inner;
        let before = inner.metadata();
        let cluster = before.cluster_id.clone().unwrap();
        let request = |node_id: u64, addr: &str, cluster: &str, key: [u8; 32]| pb::RegisterNodeRequest {
            node_id,
            addr: addr.into(),
            cluster_id: cluster.into(),
            node_key: Bytes::copy_from_slice(&key),
            peer_addr: format!("{addr}0"),
        };
        let own_key = crate::config::node_key_from_seed(1);
        let forged = inner.register_node(request(1, "attacker:1", &cluster, [0; 32]), 0).await.unwrap_err();
        assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
        let other_cluster = inner.register_node(request(1, "attacker:1", "another", own_key), 0).await.unwrap_err();
        assert_eq!(other_cluster.code(), Code::FailedPrecondition, "{other_cluster:?}");
        let unknown = inner.register_node(request(7, "new:1", &cluster, [7; 32]), 0).await.unwrap_err();
        assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");
        let short = inner.register_node(
            pb::RegisterNodeRequest { node_key: Bytes::new(), ..request(1, "a:1", &cluster, own_key) },
            0,
        );
        assert_eq!(short.await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(inner.metadata().nodes, before.nodes, "a refused registration changed the metadata");
        // Even a command that reached the log unchecked changes nothing.
        let sneaked = Command::RegisterNode {
            node_id: 1,
            addr: "attacker:1".into(),
            peer_addr: Some("attacker:2".into()),
            key_hash: Some("00".repeat(32)),
        };
        let at = inner.propose(&sneaked).await.unwrap();
        assert!(matches!(inner.outcome_at(&before, at).unwrap(), Some(MetaError::Denied(_))));
        assert_eq!(inner.metadata().nodes, before.nodes);
        // The node itself moves.
        inner.register_node(request(1, "moved:1", &cluster, own_key), 0).await.unwrap();
        assert_eq!(inner.metadata().nodes[&1].addr, "moved:1");
        assert_eq!(inner.metadata().nodes[&1].peer_addr.as_deref(), Some("moved:10"));
        let no_peer = pb::RegisterNodeRequest { peer_addr: String::new(), ..request(1, "moved:1", &cluster, own_key) };
        assert_eq!(inner.register_node(no_peer, 0).await.unwrap_err().code(), Code::InvalidArgument);
    }

    /// The controller learns whether its own allocation applied by replaying from the metadata
    /// it planned from: a repeated proposal (as when an earlier one timed out and committed
    /// later) is found refused, though the latest metadata alone would look just as allocated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_allocation_is_told_from_an_applied_one() {
        let dir = tempfile::tempdir().unwrap();
        let broker = single_node(dir.path()).await;
        let inner = &broker.inner;
        let before = inner.metadata();
        let first = before.next_producer_id;
        let command = Command::AllocateProducerIds { first, count: 10 };
        let applied = inner.propose(&command).await.unwrap();
        inner
            .propose(&Command::RegisterNode { node_id: 9, addr: "elsewhere:1".into(), peer_addr: None, key_hash: None })
            .await
            .unwrap();
        let repeated = inner.propose(&command).await.unwrap();
        assert_eq!(inner.metadata().next_producer_id, first + 10);
        assert_eq!(inner.outcome_at(&before, applied).unwrap(), None);
        assert!(matches!(inner.outcome_at(&before, repeated).unwrap(), Some(MetaError::Precondition(_))));
        // Through the controller operation, a block starts where the last one ended.
        assert_eq!(inner.allocate_producer_ids(5, 0).await.unwrap(), first + 10..first + 15);
        assert_eq!(inner.allocate_producer_ids(0, 0).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        broker.shutdown().await;
    }

    #[test]
    fn a_full_budget_refuses_until_room_is_given_back() {
        let budget = ByteBudget::new(1_000);
        let first = budget.try_take(600).unwrap();
        assert_eq!(budget.try_take(600).unwrap_err(), 1_000, "no room: refused, not queued");
        let small = budget.try_take(400).unwrap();
        drop(first);
        let second = budget.try_take(600).unwrap();
        drop((small, second));
        // Larger than the whole budget: clamped, so it passes an idle node but nothing else.
        let huge = budget.try_take(5_000).unwrap();
        assert!(budget.try_take(1).is_err());
        drop(huge);
        assert!(budget.try_take(1_000).is_ok());
    }
}
