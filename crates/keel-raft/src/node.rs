//! A node hosting many raft groups (one per partition), and the write API the broker uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel_storage::{Disk, LogConfig};
use openraft::Config;
use openraft::async_runtime::WatchReceiver;
use openraft::error::ClientWriteError;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span};

use crate::network::{Connector, GroupNetwork, Groups, NetworkConfig, Peers, RaftService};
use crate::producers::{ProducerLimits, Stamped};
use crate::quiesce::Quiescence;
use crate::sequencer::{Answer, Check, ProducerRefusal, Sequencer};
use crate::store::{Faults, FlushObserver, IoMode, NodeFlusher, PartitionStore};
use crate::types::{Appended, BatchData, GroupId, Node, NodeId, Raft, Runtime};

/// Raft timing, in milliseconds. openraft does not coalesce heartbeats across groups, so with
/// hundreds of groups per node the heartbeat interval is what idle CPU costs: the defaults trade
/// some failover time (an election starts 1.5–3 s after a leader is lost) for a quiet node.
#[derive(Debug, Clone, Copy)]
pub struct RaftTimings {
    /// Leader → follower heartbeat interval.
    pub heartbeat_ms: u64,
    /// Shortest election timeout.
    pub election_min_ms: u64,
    /// Longest election timeout; also the leader lease and the node liveness timeout.
    pub election_max_ms: u64,
    /// Whether idle, caught-up groups stop their heartbeats and election timers
    /// ([`crate::quiesce`]); node heartbeats then keep their liveness.
    pub quiesce: bool,
}

impl RaftTimings {
    /// How recently a follower must have acknowledged replication for its heartbeat to be
    /// skipped (openraft's `heartbeat_min_interval`): a busy group's AppendEntries already prove
    /// the leader alive and renew its lease, so its heartbeats were a tenth of the peer traffic
    /// of the 100-partition bench. Half a heartbeat interval, or 0 (every heartbeat sent) when
    /// the election timeout leaves no room for the longer gap a skipped heartbeat allows
    /// (openraft refuses a gap that reaches it: interval + min interval + one tick).
    pub fn heartbeat_min_interval_ms(&self) -> u64 {
        let min_interval = self.heartbeat_ms / 2;
        let tick = self.heartbeat_ms * 13 / 64 + 1;
        let gap = min_interval + self.heartbeat_ms + tick;
        if gap < self.election_min_ms { min_interval } else { 0 }
    }
}

impl Default for RaftTimings {
    fn default() -> RaftTimings {
        RaftTimings { heartbeat_ms: 500, election_min_ms: 1_500, election_max_ms: 3_000, quiesce: true }
    }
}

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// The address peers reach this node at.
    pub advertised_addr: String,
    /// Where partitions live: one directory per group.
    pub data_dir: PathBuf,
    /// Raft timing.
    pub timings: RaftTimings,
    /// Segment log settings of every partition.
    pub log: LogConfig,
    /// How blocking disk work runs.
    pub io: IoMode,
    /// Network settings.
    pub network: NetworkConfig,
    /// How long an append may wait for its commit before it reports `Timeout`.
    pub append_timeout: Duration,
    /// Seed of openraft's randomness (election timeouts). Production takes it from the OS; the
    /// simulation from its run seed.
    pub seed: u64,
    /// Whether the flushes of all partitions are coalesced into node-wide ones
    /// ([`crate::store::NodeFlusher`]) or each partition flushes its own file.
    pub flush: FlushScope,
}

/// How a node's partitions are made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlushScope {
    /// One flusher per node: several dirty partitions are flushed by one syncfs.
    Node,
    /// Every partition msyncs its own file (the default: end to end on the 2-core development
    /// machine, node-wide flushing gained nothing; see DESIGN.md).
    #[default]
    Partition,
}

/// Why an append was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// This node does not lead the group; retry at the leader, if one is known.
    #[error("not the leader; leader is {leader:?}")]
    NotLeader {
        /// The leader's id and address, when known.
        leader: Option<(NodeId, String)>,
    },
    /// No answer within the append timeout: the batch may or may not be committed.
    #[error("append timed out; it may or may not have been written")]
    Timeout,
    /// Leadership changed while the batch was in flight: it may or may not be committed.
    #[error("leadership changed during the append; it may or may not have been written (leader {leader:?})")]
    Unknown {
        /// The new leader, when known.
        leader: Option<(NodeId, String)>,
    },
    /// The batch is not valid; nothing was written.
    #[error("invalid batch: {0}")]
    Invalid(String),
    /// No such group on this node.
    #[error("raft group {0} is not hosted on this node")]
    UnknownGroup(GroupId),
    /// The group stopped (storage failure or a broken invariant); it must be repaired.
    #[error("raft group failed: {0}")]
    Fatal(String),
    /// An idempotent producer's batch refused by its sequence or epoch; nothing was written.
    #[error("{0}")]
    Producer(#[from] ProducerRefusal),
}

impl AppendError {
    /// True when retrying (possibly elsewhere) may succeed. With `Timeout` and `Unknown` the
    /// first attempt may also have succeeded: the idempotent producer makes the retry safe.
    pub fn is_retriable(&self) -> bool {
        matches!(self, AppendError::NotLeader { .. } | AppendError::Timeout | AppendError::Unknown { .. })
    }
}

/// A batch handed to raft, waiting for its commit.
pub struct PendingAppend {
    answer: Pending,
    timeout: Duration,
}

enum Pending {
    /// Raft's own answer.
    Raft(openraft::type_config::alias::OneshotReceiverOf<crate::types::KeelRaft, ClientWriteResult>),
    /// An idempotent batch's answer, shared with its retries.
    Shared(watch::Receiver<Answer>),
    /// Known without raft: a duplicate's original offsets.
    Ready(Appended),
}

type ClientWriteResult =
    Result<openraft::raft::ClientWriteResponse<crate::types::KeelRaft>, ClientWriteError<crate::types::KeelRaft>>;

/// What raft's answer means for the batch.
fn outcome(result: ClientWriteResult) -> Result<Appended, AppendError> {
    let leader_of = |f: &openraft::error::ForwardToLeader<crate::types::KeelRaft>| {
        f.leader_id.map(|id| (id, f.leader_node.as_ref().map(|n| n.addr.clone()).unwrap_or_default()))
    };
    match result {
        Ok(response) => Ok(response.data),
        Err(ClientWriteError::ForwardToLeader(f)) => Err(AppendError::NotLeader { leader: leader_of(&f) }),
        Err(ClientWriteError::LogEntryDiscarded(f)) => Err(AppendError::Unknown { leader: leader_of(&f) }),
        Err(other) => Err(AppendError::Fatal(other.to_string())),
    }
}

fn core_stopped() -> AppendError {
    AppendError::Fatal("the raft core stopped".into())
}

impl PendingAppend {
    /// Waits until the batch is committed (a quorum has it durably), or fails.
    pub async fn wait(self) -> Result<Appended, AppendError> {
        match self.answer {
            Pending::Ready(appended) => Ok(appended),
            Pending::Raft(rx) => match tokio::time::timeout(self.timeout, rx).await {
                Err(_) => Err(AppendError::Timeout),
                Ok(Err(_)) => Err(core_stopped()),
                Ok(Ok(result)) => outcome(result),
            },
            Pending::Shared(mut rx) => match tokio::time::timeout(self.timeout, rx.wait_for(Option::is_some)).await {
                Err(_) => Err(AppendError::Timeout),
                Ok(Err(_)) => Err(core_stopped()),
                Ok(Ok(answer)) => answer.clone().unwrap_or_else(|| Err(core_stopped())),
            },
        }
    }
}

/// Errors of group management.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Opening a partition's storage failed.
    #[error("opening group {group}: {source}")]
    Storage {
        /// The group.
        group: GroupId,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// openraft refused.
    #[error("raft: {0}")]
    Raft(String),
    /// The group is not hosted here.
    #[error("raft group {0} is not hosted on this node")]
    UnknownGroup(GroupId),
    /// Another call is opening the group right now.
    #[error("raft group {0} is being opened")]
    Opening(GroupId),
    /// The group's copy here is another generation than the one asked for: the old copy must
    /// be removed before the new one can be made.
    #[error("raft group {group}: this node holds copy {have} of it, not copy {wanted}")]
    Generation {
        /// The group.
        group: GroupId,
        /// The generation of the copy on disk.
        have: u32,
        /// The generation asked for.
        wanted: u32,
    },
}

/// The file naming which generation of its group a copy is ([`Node::generation`]). Absent means
/// generation 0: a group's first copies (most of them) never write it.
const GENERATION_FILE: &str = "raft.generation";

/// Checks that the copy in `dir` is generation `wanted`, claiming a blank copy for it.
fn claim_generation(disk: &dyn Disk, dir: &Path, wanted: u32, blank: bool) -> std::io::Result<Option<u32>> {
    let path = dir.join(GENERATION_FILE);
    match read_generation(disk, dir)? {
        Some(have) if have != wanted => Ok(Some(have)),
        Some(_) => Ok(None),
        None if blank => {
            if wanted != 0 {
                keel_storage::write_atomic(disk, &path, format!("generation {wanted}\n").as_bytes())?;
            }
            Ok(None)
        }
        None => Ok((wanted != 0).then_some(0)),
    }
}

/// The generation a copy's file names, if it has one.
fn read_generation(disk: &dyn Disk, dir: &Path) -> std::io::Result<Option<u32>> {
    let path = dir.join(GENERATION_FILE);
    if !disk.exists(&path)? {
        return Ok(None);
    }
    let bytes = keel_storage::read_whole(disk, &path)?;
    let text = std::str::from_utf8(&bytes).ok().and_then(|t| t.strip_prefix("generation "));
    let parsed = text.and_then(|t| t.trim_end().parse::<u32>().ok());
    parsed.map(Some).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: not a generation", path.display()))
    })
}

/// One node: its raft groups, their storage, and its connections to peers.
pub struct RaftNode {
    config: NodeConfig,
    disk: Arc<dyn Disk>,
    peers: Peers,
    groups: Groups,
    stores: Mutex<BTreeMap<GroupId, PartitionStore>>,
    /// Groups whose storage is being opened (it awaits the disk): never two stores on one dir.
    opening: Mutex<BTreeSet<GroupId>>,
    /// Advances per group started, so every group draws its own election timeouts.
    seed: Mutex<u64>,
    faults: Mutex<Faults>,
    /// Whether the task that steps cut-off leaders down runs (it starts with the first group).
    step_down_started: AtomicBool,
    /// Per group, the idempotent batches this node handed to raft and raft has not answered.
    sequencers: Mutex<BTreeMap<GroupId, Arc<tokio::sync::Mutex<Sequencer>>>>,
    /// Bounds of every partition's producer table.
    producer_limits: Mutex<ProducerLimits>,
    /// Told about every flush of the groups opened from then on (metrics).
    flush_observer: Mutex<Option<Arc<dyn FlushObserver>>>,
    /// Which groups are quiescent, and which peers' nodes are alive.
    quiescence: Arc<Quiescence>,
    /// The node-wide flusher, started with the first group (it needs the runtime).
    node_flusher: std::sync::OnceLock<Arc<NodeFlusher>>,
}

impl RaftNode {
    /// A node with no groups yet. Mount [`RaftNode::service`] on a gRPC server to receive peers.
    /// Its id must not be [`crate::NOBODY`] (callers validate their configuration).
    pub fn new(config: NodeConfig, disk: Arc<dyn Disk>, connector: Arc<dyn Connector>) -> RaftNode {
        debug_assert_ne!(config.node_id, crate::NOBODY, "node id {} is reserved", crate::NOBODY);
        let peers = Peers::new(connector, config.network);
        peers.set_addr(config.node_id, &config.advertised_addr);
        let seed = Mutex::new(config.seed);
        let t = config.timings;
        let quiescence = Arc::new(Quiescence::new(
            config.node_id,
            t.quiesce,
            Duration::from_millis(t.election_max_ms),
            Duration::from_millis(t.heartbeat_ms),
        ));
        RaftNode {
            config,
            disk,
            peers,
            groups: Groups::default(),
            stores: Mutex::new(BTreeMap::new()),
            seed,
            faults: Mutex::new(Faults::default()),
            step_down_started: AtomicBool::new(false),
            opening: Mutex::new(BTreeSet::new()),
            sequencers: Mutex::new(BTreeMap::new()),
            producer_limits: Mutex::new(ProducerLimits::default()),
            flush_observer: Mutex::new(None),
            quiescence,
            node_flusher: std::sync::OnceLock::new(),
        }
    }

    /// Reports every flush of the groups opened from now on to `observer` (metrics).
    pub fn set_flush_observer(&self, observer: Arc<dyn FlushObserver>) {
        *self.flush_observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    /// Injects bugs into groups opened from now on: for negative controls only.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
        self.quiescence.set_faults(faults.quiesce);
        self.peers.set_failures_read_as_success(faults.batch_failures_read_as_success);
    }

    /// Sets the bounds of the producer tables of groups opened from now on: the cluster's
    /// settings, the same on every node.
    pub fn set_producer_limits(&self, limits: ProducerLimits) {
        *self.producer_limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// The gRPC service receiving raft RPCs for every group on this node.
    pub fn service(&self) -> RaftService {
        RaftService::new(self.groups.clone(), Arc::clone(&self.quiescence), self.config.network.coalesce_append_entries)
    }

    /// AppendEntries batches this node sent to peers, and the requests they carried.
    pub fn append_batches(&self) -> (u64, u64) {
        self.peers.append_batches()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    /// The largest batch a group of this node accepts, in bytes.
    pub fn batch_bytes_max(&self) -> usize {
        self.config.log.batch_bytes_max()
    }

    fn raft_config(&self, group: GroupId) -> Result<Arc<Config>, NodeError> {
        let t = self.config.timings;
        let config = Config {
            // openraft names its spans by it: each group's logs say which group they are.
            cluster_name: format!("group-{group}"),
            heartbeat_interval: t.heartbeat_ms,
            heartbeat_min_interval: Some(t.heartbeat_min_interval_ms()),
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            enable_pre_vote: Some(true),
            // Snapshots are tiny (offsets and producer state) and taken when retention purges;
            // openraft must not purge the log on its own: consumers read it.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            // A follower's log only goes backwards if acknowledged entries were lost: with the
            // injected ack-before-flush bug, let the checker see the damage instead of openraft's
            // debug assertion stopping the run.
            allow_log_reversion: Some(self.faults.lock().unwrap_or_else(|e| e.into_inner()).ack_before_flush),
            ..Config::default()
        };
        config.validate().map(Arc::new).map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Opens (recovering) the group's partition and starts its raft core. A group that was
    /// initialized before resumes; a new one waits for [`RaftNode::initialize_group`] on one
    /// node, or for a leader to reach it.
    pub async fn open_group(&self, group: GroupId) -> Result<(), NodeError> {
        self.open_group_with(group, self.config.log.clone(), 0).await
    }

    /// [`RaftNode::open_group`] with this partition's own log settings (its topic's retention),
    /// as copy `generation` of the group ([`Node::generation`]). A copy of another generation,
    /// open or on disk, is [`NodeError::Generation`]: the caller removes it first.
    pub async fn open_group_with(&self, group: GroupId, log: LogConfig, generation: u32) -> Result<(), NodeError> {
        if let Ok(have) = self.groups.generation(group) {
            return match have == generation {
                true => Ok(()),
                false => Err(NodeError::Generation { group, have, wanted: generation }),
            };
        }
        if !self.opening.lock().unwrap_or_else(|e| e.into_inner()).insert(group) {
            return Err(NodeError::Opening(group));
        }
        // Cleared however this ends, a cancelled open included.
        struct Opening<'a>(&'a Mutex<BTreeSet<GroupId>>, GroupId);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        let _opening = Opening(&self.opening, group);
        self.open_new_group(group, log, generation).await
    }

    async fn open_new_group(&self, group: GroupId, log: LogConfig, generation: u32) -> Result<(), NodeError> {
        let dir = self.group_dir(group);
        let faults = *self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let node_flusher = (self.config.flush == FlushScope::Node).then(|| {
            let start = || NodeFlusher::start(Arc::clone(&self.disk), self.config.data_dir.clone(), self.config.io);
            Arc::clone(self.node_flusher.get_or_init(start))
        });
        let (disk, io) = (Arc::clone(&self.disk), self.config.io);
        let open = move || {
            let store = PartitionStore::open_on_node(Arc::clone(&disk), &dir, log, io, faults, node_flusher)?;
            let mismatch = claim_generation(&*disk, &dir, generation, store.is_blank());
            if !matches!(mismatch, Ok(None)) {
                store.close();
            }
            Ok::<_, std::io::Error>((store, mismatch?))
        };
        // Opening reads (or creates and syncs) files: off the async workers in production, so
        // that a node opening thousands of partitions keeps serving the ones it has.
        let store = match io {
            IoMode::Inline => open(),
            IoMode::Blocking => tokio::task::spawn_blocking(open)
                .await
                .map_err(|e| NodeError::Storage { group, source: std::io::Error::other(e.to_string()) })?,
        }
        .map_err(|source| NodeError::Storage { group, source })?;
        let store = match store {
            (store, None) => store,
            (_, Some(have)) => return Err(NodeError::Generation { group, have, wanted: generation }),
        };
        store.set_producer_limits(*self.producer_limits.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(observer) = self.flush_observer.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            store.set_flush_observer(observer);
        }
        let network = GroupNetwork::new(self.peers.clone(), group);
        let config = self.raft_config(group)?;
        let seed = {
            let mut s = self.seed.lock().unwrap_or_else(|e| e.into_inner());
            *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 ^ group);
            *s
        };
        let span = info_span!("group", node = self.config.node_id, group);
        // openraft draws election timeouts from the runtime's RNG, seeded in this scope and
        // inherited by every task the raft core spawns.
        let blank = store.is_blank();
        let raft = Runtime::scope(
            seed,
            Raft::new(self.config.node_id, config, network, store.log_store(), store.state_machine()).instrument(span),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        self.quiescence.open_dormant(group, &raft, blank);
        self.groups.insert(group, raft, generation);
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).insert(group, store);
        info!(node = self.config.node_id, group, generation, "group opened");
        if !self.step_down_started.swap(true, Ordering::AcqRel) {
            // Checked every heartbeat interval: a cut-off leader steps down within a heartbeat of
            // its lease running out.
            let t = self.config.timings;
            let (period, lease) = (Duration::from_millis(t.heartbeat_ms.max(1)), self.lease());
            let task =
                crate::leadership::step_down_loop(self.groups.downgrade(), Arc::clone(&self.quiescence), period, lease);
            tokio::spawn(task.instrument(info_span!("step-down", node = self.config.node_id)));
            let task =
                crate::quiesce::run(Arc::clone(&self.quiescence), self.groups.downgrade(), self.peers.clone(), period);
            tokio::spawn(task.instrument(info_span!("quiesce", node = self.config.node_id)));
        }
        Ok(())
    }

    /// The generation of the group's copy here, if it is open ([`Node::generation`]).
    pub fn generation(&self, group: GroupId) -> Option<u32> {
        self.groups.generation(group).ok()
    }

    /// Sets the catch-up budget (bytes per second this node sends to replicas catching up
    /// after a move; 0: unthrottled).
    pub fn set_catch_up_rate(&self, bytes_per_sec: u64) {
        self.peers.throttle().set_rate(bytes_per_sec);
    }

    /// Throttles the log this node sends `target` for `group` (a replica a move brings in)
    /// while the guard lives.
    pub fn throttle_catch_up(&self, group: GroupId, target: NodeId) -> crate::throttle::Throttled {
        self.peers.throttle().throttle(group, target)
    }

    /// The generation of the copy of `group` this node holds, open or only on disk; `None` when
    /// it holds none (never had one, or removed it).
    pub fn stored_generation(&self, group: GroupId) -> Result<Option<u32>, NodeError> {
        if let Some(generation) = self.generation(group) {
            return Ok(Some(generation));
        }
        let dir = self.group_dir(group);
        let storage = |source| NodeError::Storage { group, source };
        if !self.disk.exists(&dir).map_err(storage)? || self.disk.list(&dir).map_err(storage)?.is_empty() {
            return Ok(None);
        }
        Ok(Some(read_generation(&*self.disk, &dir).map_err(storage)?.unwrap_or(0)))
    }

    /// Stops a group and deletes its data: the partition was deleted from the cluster.
    pub async fn remove_group(&self, group: GroupId) -> Result<(), NodeError> {
        if let Some(raft) = self.groups.remove(group) {
            let _ = raft.shutdown().await;
        }
        self.quiescence.remove(group);
        self.sequencers.lock().unwrap_or_else(|e| e.into_inner()).remove(&group);
        let store = self.stores.lock().unwrap_or_else(|e| e.into_inner()).remove(&group);
        if let Some(store) = &store {
            store.close();
        }
        let dir = self.group_dir(group);
        let storage = |source| NodeError::Storage { group, source };
        if !self.disk.exists(&dir).map_err(storage)? {
            return Ok(());
        }
        for name in self.disk.list(&dir).map_err(storage)? {
            self.disk.remove(&dir.join(name)).map_err(storage)?;
        }
        self.disk.sync_dir(&dir).map_err(storage)?;
        info!(node = self.config.node_id, group, "group removed");
        Ok(())
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.config.data_dir.join(format!("group-{group}"))
    }

    /// Tells the network where a node is (addresses can change when a node restarts).
    pub fn set_peer_addr(&self, node: NodeId, addr: &str) {
        self.peers.set_addr(node, addr);
    }

    /// Whether the group has a membership yet (initialized here, or reached by a leader).
    pub async fn is_initialized(&self, group: GroupId) -> Result<bool, NodeError> {
        let raft = self.raft(group)?;
        raft.is_initialized().await.map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Makes `members` the first membership of a new group (call on one member only).
    pub async fn initialize_group(&self, group: GroupId, members: BTreeMap<NodeId, Node>) -> Result<(), NodeError> {
        let raft = self.groups.get(group).map_err(|_| NodeError::UnknownGroup(group))?;
        for (id, node) in &members {
            self.peers.set_addr(*id, &node.addr);
        }
        self.quiescence.wake(group, &raft);
        match raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.api_error(), Some(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    /// Appends one record batch to a group and returns once a quorum has it durably and it is
    /// committed. Concurrent appends share raft entries' flushes (group commit).
    pub async fn append(&self, group: GroupId, batch: Bytes) -> Result<Appended, AppendError> {
        self.submit(group, batch).await?.wait().await
    }

    /// Hands one record batch to the group's leader and returns as soon as it is queued, in
    /// call order; [`PendingAppend::wait`] then waits for the commit. Pipelined producers submit
    /// in order and wait concurrently, so a partition's batches keep their order.
    ///
    /// A batch with a producer stamp is checked first ([`crate::sequencer`]): a retry of a
    /// written batch answers with its original offsets and writes nothing, a retry of one still
    /// in flight answers with that one's outcome, and a gap, an old epoch or a forgotten
    /// producer is refused ([`AppendError::Producer`]).
    pub async fn submit(&self, group: GroupId, batch: Bytes) -> Result<PendingAppend, AppendError> {
        let header = keel_record::check(&batch).map_err(|e| AppendError::Invalid(e.to_string()))?;
        if header.total_len() != batch.len() || header.attributes.is_raft_entry() {
            return Err(AppendError::Invalid("expected exactly one data batch".into()));
        }
        let max = self.config.log.batch_bytes_max();
        if batch.len() > max {
            return Err(AppendError::Invalid(format!("batch of {} bytes exceeds the limit of {max}", batch.len())));
        }
        let raft = self.groups.get(group).map_err(|_| AppendError::UnknownGroup(group))?;
        let timeout = self.config.append_timeout;
        self.quiescence.wake_to_lead(group, &raft, timeout).await;
        if header.producer_id < 0 {
            let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
            raft.client_write_ff(BatchData(batch), Some(responder))
                .await
                .map_err(|e| AppendError::Fatal(e.to_string()))?;
            return Ok(PendingAppend { answer: Pending::Raft(rx), timeout });
        }
        let stamped = Stamped {
            producer_id: header.producer_id,
            epoch: header.producer_epoch,
            base_sequence: header.base_sequence,
            record_count: header.record_count,
            timestamp_ms: header.max_timestamp_ms,
        };
        let store = self.store(group).map_err(|_| AppendError::UnknownGroup(group))?;
        let sequencer = Arc::clone(self.sequencers.lock().unwrap_or_else(|e| e.into_inner()).entry(group).or_default());
        // Held until raft has the batch queued: checks happen in log order.
        let mut sequencer = sequencer.lock().await;
        self.wait_settled(group, &raft, &mut sequencer).await?;
        let check = store.with_producers(|table| sequencer.check(table, &stamped));
        match check {
            Check::Done(Ok(appended)) => Ok(PendingAppend { answer: Pending::Ready(appended), timeout }),
            Check::Done(Err(e)) => Err(e),
            Check::SameAs(answer) => Ok(PendingAppend { answer: Pending::Shared(answer), timeout }),
            Check::Append => {
                let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
                let (answer_tx, answer) = watch::channel(None);
                // Noted before the batch goes to raft, so that no caller going away can leave
                // a batch in the log that the sequencer does not know of.
                sequencer.admitted(&stamped, answer.clone());
                tokio::spawn(async move {
                    let result: ClientWriteResult = match rx.await {
                        Ok(result) => result,
                        Err(_) => {
                            answer_tx.send_replace(Some(Err(core_stopped())));
                            return;
                        }
                    };
                    let result = outcome(result);
                    answer_tx.send_replace(Some(result));
                });
                raft.client_write_ff(BatchData(batch), Some(responder))
                    .await
                    .map_err(|e| AppendError::Fatal(e.to_string()))?;
                Ok(PendingAppend { answer: Pending::Shared(answer), timeout })
            }
        }
    }

    /// Waits (bounded) until this node leads the group and has applied every entry its log held
    /// when the term's first check began, so that the producer table holds every batch written
    /// before the term and every one of the term raft was given before this node's last restart.
    async fn wait_settled(&self, group: GroupId, raft: &Raft, sequencer: &mut Sequencer) -> Result<(), AppendError> {
        let me = self.config.node_id;
        let (term, last) = {
            // The common case, a settled leader, is read in place: no copy of the metrics and
            // no waiter per batch.
            let now = raft.metrics();
            let m = now.borrow_watched();
            if m.current_leader == Some(me)
                && sequencer.settled_term == Some(m.current_term)
                && self.leader_in(group, &m) == Some(me)
            {
                return Ok(());
            }
            (m.current_term, m.last_log_index.unwrap_or(0))
        };
        // Done waiting when the leadership changed (answered below) or the log up to `last` is
        // applied. A leader's log up to `last` holds every entry that can ever commit before it.
        let ready = |m: &crate::types::Metrics| {
            m.current_leader != Some(me)
                || m.current_term != term
                || m.last_applied.is_some_and(|l| l.leader_id.term == term && l.index >= last)
        };
        let metrics = raft
            .wait(Some(self.config.append_timeout))
            .metrics(ready, "the leader's log applied")
            .await
            .map_err(|_| AppendError::Timeout)?;
        if metrics.current_leader == Some(me) && metrics.current_term == term && ready(&metrics) {
            sequencer.settled_term = Some(term);
            if self.leader_in(group, &metrics) == Some(me) {
                return Ok(());
            }
        }
        let leader = metrics.current_leader.filter(|l| *l != me).map(|id| {
            let addr = metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone());
            (id, addr.unwrap_or_default())
        });
        Err(AppendError::NotLeader { leader })
    }

    /// Reads committed batches of a group from `from_offset`, up to `bytes_max` (at least one).
    pub fn read(
        &self,
        group: GroupId,
        from_offset: u64,
        bytes_max: usize,
    ) -> Result<Vec<keel_record::Batch>, NodeError> {
        let store = self.store(group)?;
        store
            .read_committed(from_offset, bytes_max)
            .map_err(|e| NodeError::Storage { group, source: std::io::Error::other(e) })
    }

    /// The partition store of a group (positions, high watermark).
    pub fn store(&self, group: GroupId) -> Result<PartitionStore, NodeError> {
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).get(&group).cloned().ok_or(NodeError::UnknownGroup(group))
    }

    /// The raft handle of a group (metrics, membership changes).
    pub fn raft(&self, group: GroupId) -> Result<Raft, NodeError> {
        self.groups.get(group).map_err(|_| NodeError::UnknownGroup(group))
    }

    /// A group's raft metrics now (leader, replication progress, applied index).
    pub fn metrics(&self, group: GroupId) -> Result<crate::types::Metrics, NodeError> {
        let raft = self.groups.get(group).map_err(|_| NodeError::UnknownGroup(group))?;
        Ok(raft.metrics().borrow_watched().clone())
    }

    /// How long a leader may go without a quorum's acknowledgement: openraft's lease, its
    /// longest election timeout. Past it, the leader's writes are refused and it steps down.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.config.timings.election_max_ms)
    }

    /// The current leader of a group, as this node knows it. This node names itself only while
    /// a quorum has acknowledged it within the lease: a leader cut off from its followers can
    /// neither commit nor learn that they elected another, so clients must look elsewhere.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        let raft = self.groups.get(group).ok()?;
        self.leader_in(group, &raft.metrics().borrow_watched())
    }

    /// [`RaftNode::leader`] from a group's metrics, as of now. A quiescent leader has no recent
    /// raft acknowledgements; it names itself while a quorum of its voters' nodes acknowledges
    /// its node heartbeats ([`crate::quiesce`]).
    pub fn leader_in(&self, group: GroupId, metrics: &crate::types::Metrics) -> Option<NodeId> {
        let me = self.config.node_id;
        crate::leadership::presented_leader(me, metrics, self.lease())
            .or_else(|| self.quiescence.leads_quietly(group, metrics).then_some(me))
    }

    /// For a group this node leads: how many voters are in sync, and how many voters it has
    /// (metrics; see [`crate::leadership::in_sync_voters`]). A quiescent group's voters all hold
    /// its last entry (it quiesced only then); they are in sync while their nodes answer.
    pub fn in_sync_voters(&self, group: GroupId, metrics: &crate::types::Metrics) -> (usize, usize) {
        let (in_sync, voters) = crate::leadership::in_sync_voters(self.config.node_id, metrics, self.lease());
        match self.quiescence.is_quiescent(group) {
            true => (self.quiescence.voters_heard(metrics).max(in_sync), voters),
            false => (in_sync, voters),
        }
    }

    /// Wakes a quiescent group this node leads and waits (bounded) until a quorum acknowledges
    /// it again: call before raft operations other than [`RaftNode::submit`] that need a
    /// leader's lease (read-index barriers, leadership transfers).
    pub async fn wake(&self, group: GroupId) {
        if let Ok(raft) = self.groups.get(group) {
            self.quiescence.wake_to_lead(group, &raft, self.config.append_timeout).await;
        }
    }

    /// Whether a group is quiescent on this node.
    pub fn is_quiescent(&self, group: GroupId) -> bool {
        self.quiescence.is_quiescent(group)
    }

    /// Whether a group opened blank here still waits, ticker off, to be initialized or to hear
    /// from a member.
    pub fn is_dormant(&self, group: GroupId) -> bool {
        self.quiescence.is_dormant(group)
    }

    /// Groups hosted here.
    pub fn group_ids(&self) -> BTreeSet<GroupId> {
        self.groups.all().into_iter().map(|(g, _)| g).collect()
    }

    /// Triggers a snapshot of a group's small state and lets raft purge the log up to the
    /// retention point: whole segments that retention allows go, and a follower that needs them
    /// later catches up from the snapshot.
    pub async fn apply_retention(&self, group: GroupId, now_ms: i64) -> Result<(), NodeError> {
        let raft = self.raft(group)?;
        let store = self.store(group)?;
        // The target first, then the snapshot, then the purge: the snapshot must describe the
        // state exactly where the log will start (a follower installing it restarts its log
        // there), and the trigger only queues the build, so wait for it before purging.
        let Some(upto) = store.retention_point(now_ms) else { return Ok(()) };
        raft.trigger().snapshot().await.map_err(|e| NodeError::Raft(e.to_string()))?;
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= upto), "retention snapshot")
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        raft.trigger().purge_log(upto).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Stops every raft core at once, flushing nothing: what a killed process leaves behind (the
    /// simulation then drops the disk's unflushed writes).
    pub async fn halt(&self) {
        for (group, raft) in self.groups.all() {
            let _ = raft.shutdown().await;
            self.groups.remove(group);
        }
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Stops every group's raft core and flushes its storage.
    pub async fn shutdown(&self) {
        for (group, raft) in self.groups.all() {
            let _ = raft.shutdown().await;
            self.groups.remove(group);
        }
        let stores = std::mem::take(&mut *self.stores.lock().unwrap_or_else(|e| e.into_inner()));
        for store in stores.values() {
            store.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// openraft refuses a suppression gap that reaches the election timeout; every timing a
    /// node may be configured with must still give a config it accepts.
    #[test]
    fn heartbeat_suppression_never_makes_openraft_refuse_the_timings() {
        let mut suppressed = 0;
        for heartbeat_ms in [1, 10, 50, 100, 250, 400, 500, 1_000] {
            for election_min_ms in [heartbeat_ms + 1, heartbeat_ms * 2, heartbeat_ms * 3, 1_500, 10_000] {
                let t =
                    RaftTimings { heartbeat_ms, election_min_ms, election_max_ms: election_min_ms * 2, quiesce: true };
                let min_interval = t.heartbeat_min_interval_ms();
                suppressed += usize::from(min_interval > 0);
                let config = Config {
                    heartbeat_interval: t.heartbeat_ms,
                    heartbeat_min_interval: Some(min_interval),
                    election_timeout_min: t.election_min_ms,
                    election_timeout_max: t.election_max_ms,
                    ..Config::default()
                };
                assert!(config.validate().is_ok(), "{t:?} gave heartbeat_min_interval {min_interval}");
            }
        }
        assert!(suppressed > 10, "suppression stays on where the timings allow it");
        assert_eq!(RaftTimings::default().heartbeat_min_interval_ms(), 250);
        let tight = RaftTimings { heartbeat_ms: 400, election_min_ms: 500, election_max_ms: 1_000, quiesce: true };
        assert_eq!(tight.heartbeat_min_interval_ms(), 0, "no room: every heartbeat is sent");
    }
}
