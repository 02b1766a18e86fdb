//! Whole Keel clusters under turmoil at the level users see them: three real brokers
//! (`keel-broker`: metadata controller, reconciler, gRPC services) and real clients
//! (`keel-client`: admin, pipelined producers, a subscribing consumer), over simulated TCP, each
//! node with a `SimDisk` that survives its crashes, turmoil's clock, and every choice drawn from
//! the run's seed.
//!
//! A run creates a topic, then has a safety phase (producers write unique values while the
//! nemesis crashes nodes, crashes all of them at once, partitions the network and slows it) and a
//! liveness phase (all faults healed: every partition must accept a write within a bound, and the
//! consumer must catch up with every acknowledged record). The checker then holds the history of
//! client operations and what the consumer read against every replica's final log.
//!
//! A consumer group (see [`crate::groups`]) shares the topic all along: its members process and
//! commit under the same faults, and the coordinator's log is audited at the end.
//!
//! The producer is not idempotent yet: a retried batch may be stored twice. Duplicates are
//! therefore counted, not refused.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use keel_broker::{Broker, BrokerConfig, Clock, CoordinatorFaults, GroupSettings, Limits, StorageMode};
use keel_client::{
    Admin, ClientConfig, ClientError, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig, ProducerRecord,
    RecordMetadata,
};
use keel_raft::{Faults, GroupId, IoMode, NodeId, RaftTimings};
use keel_storage::{CrashMode, Disk, SimDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{self, HighWatermarks, Op, Outcome};
use crate::nemesis::{NORMAL_LATENCY_MAX, Nemesis, Target, host_name};
use crate::net::{PEER_PORT, PORT, TurmoilConnector, incoming};

/// Metadata voters; a five-node run has two more brokers that follow the metadata from them.
pub(crate) const VOTERS: u64 = 3;
pub(crate) const PARTITIONS: u32 = 3;
/// Replicas of each partition: with five nodes, every partition lives on three of them.
const REPLICATION: u32 = 3;
pub(crate) const TOPIC: &str = "sim";
/// Where every node keeps its data, on its own disk.
pub(crate) const DATA_DIR: &str = "/data";
/// Records each producer keeps unresolved at once: enough to pipeline several batches.
pub(crate) const WINDOW: usize = 6;
/// The simulation starts at a fixed wall-clock time (turmoil's default is the real time, which
/// would reach record timestamps and break replay).
pub(crate) const EPOCH_SECS: u64 = 1_700_000_000;
/// How often the driver samples every replica's high watermark.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Liveness bounds, once every fault is healed.
const WRITE_BOUND: Duration = Duration::from_secs(30);
const CATCH_UP_BOUND: Duration = Duration::from_secs(60);
const CONVERGE_BOUND: Duration = Duration::from_secs(30);

/// Brokers in the run of `seed`: one seed in four runs five nodes (three metadata voters and two
/// brokers that are not, each partition on three of the five), the others three.
pub fn nodes_for(seed: u64) -> u64 {
    if seed % 4 == 3 { 5 } else { 3 }
}

/// Settings of one broker-level run.
#[derive(Debug, Clone, Copy)]
pub struct BrokerSim {
    /// Producers, each a client host of its own.
    pub producers: u64,
    /// How long the safety phase lasts, in simulated time from the start: producers keep
    /// writing until then, and the nemesis keeps acting until they are done.
    pub safety: Duration,
    /// Inject faults during the safety phase.
    pub nemesis: bool,
    /// A deliberately broken build (acknowledge before flush), for the negative control.
    pub faults: Faults,
    /// Weight of a crash of every node at once among the faults (the others weigh 6).
    pub crash_all_weight: u32,
    /// Members of the consumer group (`None`: 3 to 5, from the seed).
    pub members: Option<u64>,
    /// Every member pauses past its session once this far into the run (a sure zombie).
    pub zombie_at: Option<Duration>,
    /// A deliberately broken coordinator, for the group's negative controls.
    pub coordinator: CoordinatorFaults,
    /// The producers' idempotence; off is the negative control of the no-duplicate check.
    pub idempotence: bool,
    /// The outbox producer does not write its stamps: the negative control of the outbox check.
    pub outbox_skip_stamps: bool,
    /// The outbox producer's disk lies about flushes: the negative control of the loss check.
    pub outbox_lying_flush: bool,
}

impl Default for BrokerSim {
    fn default() -> BrokerSim {
        BrokerSim {
            producers: 3,
            safety: Duration::from_secs(120),
            nemesis: true,
            faults: Faults::default(),
            crash_all_weight: 1,
            members: None,
            zombie_at: None,
            coordinator: CoordinatorFaults::default(),
            idempotence: true,
            outbox_skip_stamps: false,
            outbox_lying_flush: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerStats {
    /// Acknowledged records.
    pub acked: u64,
    /// Records that definitely were not written.
    pub failed: u64,
    /// Records whose outcome is unknown.
    pub unknown: u64,
    /// Records stored more than once (retries of a batch whose answer was lost).
    pub duplicates: u64,
    /// Records the consumer read.
    pub consumed: u64,
    /// Faults injected.
    pub faults: u64,
    /// Commits acknowledged to group members.
    pub commits: u64,
    /// Commits tried by members waking from a pause longer than their session, and how many
    /// of them were refused.
    pub zombie_commits: (u64, u64),
    /// Member lives (joins under a new member id).
    pub member_lives: u64,
    /// Nacks acknowledged to members, redelivered records processed, and records dead-lettered.
    pub retries: (u64, u64, u64),
    /// Partition moves recorded (runs of five nodes only).
    pub moves: u64,
}

/// The wall clock of a simulated broker: turmoil's, which starts at [`EPOCH_SECS`], plus the
/// node's skew (stepped by [`crate::delayed::ClockSteps`]).
struct SimClock(Arc<AtomicI64>);

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        let since = turmoil::since_epoch().unwrap_or(Duration::from_secs(EPOCH_SECS));
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX).saturating_add(self.0.load(Ordering::Relaxed))
    }
}

/// The running brokers, with the boot number of each (a restarted node is a new boot).
pub(crate) type Registry = Rc<RefCell<BTreeMap<NodeId, (u64, Broker)>>>;

/// What the consumer read: values by partition and offset, the next offset it expects of each
/// partition, and how many records it was handed.
#[derive(Debug, Default)]
struct ConsumerView {
    seen: BTreeMap<u64, BTreeMap<u64, String>>,
    next: BTreeMap<u64, u64>,
    records: u64,
}

/// Everything the hosts and the driver share (one thread: turmoil runs every host on it).
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) history: Vec<Op>,
    /// Trace lines not yet handed to the driver's trace.
    events: Vec<String>,
    /// Partition → raft group, once the topic exists.
    pub(crate) groups: BTreeMap<u64, GroupId>,
    /// Raft group → the nodes that hold a replica of it (the metadata group included).
    pub(crate) replicas: BTreeMap<GroupId, Vec<NodeId>>,
    /// Brokers in the run.
    pub(crate) nodes: u64,
    topic_ready: bool,
    pub(crate) producers_done: u64,
    consumer: ConsumerView,
    stop_consumer: bool,
    /// Broken invariants found during the run (the first one is reported).
    pub(crate) violations: Vec<String>,
    /// Node boots seen ready (registered in the metadata they replayed), traced once each.
    ready: BTreeSet<(NodeId, u64)>,
    /// The consumer group's members and what they did.
    pub(crate) members: crate::groups::GroupView,
    /// Whether the producers are idempotent.
    pub(crate) idempotence: bool,
    /// The delayed records' client and what it saw.
    pub(crate) delayed: crate::delayed::DelayedView,
    /// The outbox producer and what it saw.
    pub(crate) outbox: crate::outbox::OutboxView,
    /// The transactional client and what it saw.
    pub(crate) txn: crate::txn::TxnView,
    /// Partition moves the controller recorded.
    pub(crate) moves: u64,
    /// A node whose disk the mover wants lost next (the driver powers it off and wipes it).
    pub(crate) lose_disk: Option<NodeId>,
    /// When a disk was last lost (simulated time).
    pub(crate) disk_lost_at: Option<Duration>,
}

/// Whether `copies` durable copies, found when a client learnt of an acknowledgement, make a
/// quorum of three. A disk lost in the last `WRITE_BOUND` counts as one more copy: the leader
/// may have counted it before it was lost, and the promise is for a majority of replicas that
/// keep their disks (the black-box check still finds every such record on the final replicas).
pub(crate) fn durable_quorum(state: &Shared, copies: usize) -> bool {
    let now = turmoil::sim_elapsed().unwrap_or_default();
    let lost = state.borrow().disk_lost_at.is_some_and(|at| now.saturating_sub(at) < WRITE_BOUND);
    copies + usize::from(lost) > (REPLICATION as usize) / 2
}

impl State {
    /// The state of a run of `nodes` brokers, the first `voters` of them metadata voters.
    pub(crate) fn new(nodes: u64, voters: u64) -> State {
        State { nodes, replicas: [(keel_broker::META_GROUP, (1..=voters).collect())].into(), ..State::default() }
    }
}

pub(crate) type Shared = Rc<RefCell<State>>;

pub(crate) fn log(state: &Shared, line: String) {
    let now = turmoil::sim_elapsed().unwrap_or_default();
    state.borrow_mut().events.push(format!("{now:?} {line}"));
}

pub(crate) fn broker_config(id: NodeId, seed: u64) -> BrokerConfig {
    // Every node knows the voters; the others find the rest through the metadata.
    let peer_addr = |id: NodeId| format!("{}:{PEER_PORT}", host_name(id));
    BrokerConfig {
        node_id: id,
        advertised_addr: format!("{}:{PORT}", host_name(id)),
        peer_addr: peer_addr(id),
        data_dir: PathBuf::from(DATA_DIR),
        voters: (1..=VOTERS).map(|id| (id, peer_addr(id))).collect(),
        timings: RaftTimings { heartbeat_ms: 100, election_min_ms: 300, election_max_ms: 600, quiesce: true },
        // Small segments, so that runs roll them; preallocation steps no larger than a segment.
        log: keel_storage::LogConfig {
            segment_bytes_max: keel_storage::SEGMENT_BYTES_MIN,
            preallocate_step_bytes: 16 << 10,
            ..Default::default()
        },
        network: keel_raft::NetworkConfig::default(),
        append_timeout: Duration::from_secs(2),
        // Retention does not run in a run: with it, openraft's snapshot installs and purges made
        // runs that share a process with other runs replay differently (seed 5, the first
        // divergence in raft peers' transport errors; suspected: h2 expires locally reset
        // streams by the wall clock). Trimming is tested in keel-broker's t20_groups until then.
        retention_interval: Duration::from_secs(3_600),
        limits: Limits::default(),
        // One coordinator partition: every group change goes through the one raft group the
        // nemesis's leader chase also targets; more would only cost simulated heartbeats. It is
        // compacted every few dozen KiB of records, so runs rewrite it under the same faults.
        groups: GroupSettings {
            offsets_partitions: 1,
            offsets_compact_bytes: 24 << 10,
            maintenance_interval: Duration::from_secs(5),
            ..GroupSettings::default()
        },
        // One timers partition, for the same reason, compacted as often.
        delayed: keel_broker::DelayedSettings { partitions: 1, compact_bytes: 24 << 10, ..Default::default() },
        // One transactions partition, compacted as often; check-backs within the run's time
        // scale (the first after 1.5 s, then every 0.5 to 2 s, six in all).
        txn: keel_broker::TxnSettings {
            partitions: 1,
            compact_bytes: 24 << 10,
            limits: keel_broker::TxnLimits {
                timeout_default_ms: 1_500,
                checks_max: 6,
                check_backoff_ms: 500,
                check_backoff_max_ms: 2_000,
                ..Default::default()
            },
        },
        seed,
        new_node_key: keel_broker::node_key_from_seed(seed ^ id),
        // The five-node seeds run two brokers beyond the three voters.
        admit_new_nodes: true,
        auth: Default::default(),
    }
}

/// One node's life: start the broker on its disk, serve every gRPC service, and register it so
/// the driver and the checker can look inside.
pub(crate) async fn broker_main(
    config: BrokerConfig,
    boot: u64,
    disk: SimDisk,
    faults: Faults,
    coordinator: CoordinatorFaults,
    registry: Registry,
    skew: Arc<AtomicI64>,
) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let peer_listener = turmoil::net::TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
    let id = config.node_id;
    let storage = StorageMode { io: IoMode::Inline, faults, coordinator, flush: keel_raft::FlushScope::Node };
    let broker = Broker::start_with(
        config,
        storage,
        Arc::new(disk) as Arc<dyn Disk>,
        Arc::new(TurmoilConnector),
        Arc::new(SimClock(skew)),
    )
    .await?;
    let routes = broker.router()?;
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_routes(routes).serve_with_incoming(incoming(listener)).await;
    });
    // The production peer gate, on the same bare server as the client services.
    let peers = tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(keel_broker::tls::PeerGate))
        .add_routes(broker.peer_router());
    tokio::spawn(async move {
        let _ = peers.serve_with_incoming(incoming(peer_listener)).await;
    });
    registry.borrow_mut().insert(id, (boot, broker));
    // The host lives until the simulation crashes it.
    std::future::pending::<()>().await;
    Ok(())
}

pub(crate) fn client_config(seed: u64, nodes: u64) -> ClientConfig {
    let mut config = ClientConfig::new((1..=nodes).map(|id| format!("{}:{PORT}", host_name(id))))
        .with_seed(seed)
        .with_connect(Arc::new(TurmoilConnector));
    // Longer than a broker's append timeout (2 s): an append that times out is answered, not cut.
    config.request_timeout = Duration::from_secs(4);
    config
}

pub(crate) fn producer_config(
    delivery_timeout: Duration,
    idempotence: bool,
    identity: Option<String>,
) -> ProducerConfig {
    ProducerConfig {
        linger: Duration::from_millis(5),
        // Below the brokers' batch limit, which the small segments set.
        batch_bytes_max: 16 << 10,
        in_flight_max: 5,
        buffer_records_max: 1_000,
        delivery_timeout,
        idempotence,
        identity: identity.filter(|_| idempotence),
    }
}

/// Creates the topic, then commits offsets for a consumer group that stays idle all run.
async fn admin_main(seed: u64, state: Shared, registry: Registry) -> turmoil::Result {
    create_topic(seed, &state, &registry).await?;
    crate::groups::commit_idle_group(&state, seed).await;
    Ok(())
}

/// Creates the topic (an answer lost in transit makes the retry find it), then learns which
/// raft group each partition is, white-box, for the durable-quorum check.
pub(crate) async fn create_topic(seed: u64, state: &Shared, registry: &Registry) -> turmoil::Result {
    let nodes = state.borrow().nodes;
    let admin = Admin::new(client_config(seed, nodes))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let topics = [
        (TOPIC, PARTITIONS),
        (crate::delayed::TOPIC, crate::delayed::PARTITIONS),
        (crate::txn::TOPIC, crate::txn::PARTITIONS),
    ];
    for (topic, partitions) in topics {
        loop {
            match admin.create_topic(topic, partitions, REPLICATION, keel_client::TopicConfig::default()).await {
                Ok(_) | Err(ClientError::AlreadyExists(_)) => break,
                Err(e) => {
                    log(state, format!("create topic {topic}: {e}"));
                    if tokio::time::Instant::now() > deadline {
                        return Err(format!("topic {topic} could not be created in 60 s: {e}").into());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    loop {
        type Found = (Vec<(GroupId, Vec<NodeId>)>, (GroupId, Vec<NodeId>));
        let found: Option<Found> = registry.borrow().values().find_map(|(_, broker)| {
            let meta = broker.metadata();
            let topic = meta.topics.get(TOPIC)?;
            let offsets = meta.offsets_topic()?.partitions.first()?;
            Some((
                topic.partitions.iter().map(|p| (p.group, p.replicas.clone())).collect(),
                (offsets.group, offsets.replicas.clone()),
            ))
        });
        if let Some((partitions, offsets)) = found {
            log(state, format!("topic {TOPIC} created: (group, replicas) by partition {partitions:?}"));
            log(state, format!("__consumer_offsets/0: (group, replicas) {offsets:?}"));
            let mut s = state.borrow_mut();
            s.groups = partitions.iter().enumerate().map(|(i, (group, _))| (i as u64, *group)).collect();
            s.replicas.extend(partitions);
            s.members.offsets_group = Some(offsets.0);
            s.replicas.insert(offsets.0, offsets.1);
            s.topic_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub(crate) async fn wait_topic(state: &Shared) {
    while !state.borrow().topic_ready {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records the outcome of one write, and checks white-box that an acknowledged record was on a
/// quorum of disks, durably, when the client learnt of the ack.
pub(crate) fn complete(state: &Shared, disks: &[SimDisk], index: usize, result: &Result<RecordMetadata, ClientError>) {
    let (partition, value) = {
        let s = state.borrow();
        (s.history[index].partition, s.history[index].value.clone())
    };
    let outcome = match result {
        Ok(stored) if u64::from(stored.partition) != partition || stored.topic != TOPIC => {
            state.borrow_mut().violations.push(format!(
                "{value} was sent to {TOPIC}/{partition} but acknowledged on {}/{}",
                stored.topic, stored.partition
            ));
            Outcome::Info
        }
        Ok(stored) => {
            let group = state.borrow().groups.get(&partition).copied();
            let copies = group.map_or(0, |g| {
                checker::durable_copies(disks, &Path::new(DATA_DIR).join(format!("group-{g}")), stored.offset, &value)
            });
            if !durable_quorum(state, copies) {
                state.borrow_mut().violations.push(format!(
                    "acknowledged without a durable quorum: {value} at {} of partition {partition} on {copies} disks",
                    stored.offset
                ));
            }
            Outcome::Ok(stored.offset)
        }
        // A producer that went away may have sent the record before it did.
        Err(e) if e.is_ambiguous() || *e == ClientError::Closed => Outcome::Info,
        Err(_) => Outcome::Fail,
    };
    let line = match (&outcome, result) {
        (Outcome::Ok(offset), _) => format!("{value} ok {partition}@{offset}"),
        (other, Err(e)) => format!("{value} {other:?}: {e}"),
        (other, Ok(_)) => format!("{value} {other:?}"),
    };
    log(state, line);
    state.borrow_mut().history[index].outcome = Some(outcome);
}

/// Appends an operation to the history; returns its index.
pub(crate) fn invoke(state: &Shared, partition: u64, value: &str) -> usize {
    log(state, format!("{value} invoke {partition}"));
    let mut s = state.borrow_mut();
    s.history.push(Op { partition, value: value.to_owned(), outcome: None });
    s.history.len() - 1
}

/// One producer: unique values `p{k}-{n}` to random partitions until the safety phase ends
/// (`until`, simulated time since the start), up to [`WINDOW`] unresolved at once, every outcome
/// recorded.
async fn producer_main(k: u64, seed: u64, until: Duration, state: Shared, disks: Vec<SimDisk>) -> turmoil::Result {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e4d);
    wait_topic(&state).await;
    // Short delivery timeouts give up on records in the middle of a fault (outcomes the checker
    // must classify); long ones retry through it.
    let delivery_timeout = Duration::from_millis(rng.random_range(2_000..20_000));
    log(&state, format!("producer {k}: delivery timeout {delivery_timeout:?}"));
    let (nodes, idempotence) = (state.borrow().nodes, state.borrow().idempotence);
    // Even producers have a stable identity, so that a partition that retires its sequence
    // (a delivery timeout) takes the identity's next epoch through the controller, under faults.
    let identity = k.is_multiple_of(2).then(|| format!("sim-producer-{k}"));
    // Producer 2's identity (the first) changes hands part-way (an application instance replaced while the
    // old one still runs): a successor takes it over, and the old instance, a zombie now, keeps
    // sending. The successor's epoch must fence the zombie wherever the successor has written.
    let successor_at = (k == 2 && idempotence).then(|| until.mul_f64(rng.random_range(0.25..0.6)));
    let config = |identity| producer_config(delivery_timeout, idempotence, identity);
    let producer = Producer::new(client_config(seed, nodes), config(identity.clone()))?;
    let mut successor: Option<Producer> = None;
    let mut unresolved = FuturesUnordered::new();
    for n in 0.. {
        let now = turmoil::sim_elapsed().unwrap_or_default();
        if now >= until {
            break;
        }
        if successor.is_none() && successor_at.is_some_and(|at| now >= at) {
            log(&state, format!("producer {k}: p{k}.1 takes over its identity; p{k} is a zombie now"));
            successor = Some(Producer::new(client_config(seed.wrapping_add(1), nodes), config(identity.clone()))?);
        }
        while unresolved.len() >= WINDOW {
            if let Some((index, result)) = unresolved.next().await {
                complete(&state, &disks, index, &result);
            }
        }
        let partition = rng.random_range(0..PARTITIONS);
        let (sender, value) = match &successor {
            Some(successor) if rng.random_bool(0.5) => (successor, format!("p{k}.1-{n}")),
            _ => (&producer, format!("p{k}-{n}")),
        };
        let index = invoke(&state, u64::from(partition), &value);
        let record = ProducerRecord::new(value.clone().into_bytes()).with_partition(partition);
        match sender.send(TOPIC, record).await {
            Ok(delivery) => unresolved.push(async move { (index, delivery.await) }),
            // Refused before it was queued: definitely not written.
            Err(e) => {
                log(&state, format!("{value} not queued: {e}"));
                state.borrow_mut().history[index].outcome = Some(Outcome::Fail);
            }
        }
        // Bursts (batches fill up, pipelines deepen) between pauses (faults land in between).
        let pause_ms = if rng.random_ratio(1, 4) { rng.random_range(200..1_500) } else { rng.random_range(1..20) };
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
    while let Some((index, result)) = unresolved.next().await {
        complete(&state, &disks, index, &result);
    }
    producer.close().await;
    if let Some(successor) = successor {
        successor.close().await;
    }
    state.borrow_mut().producers_done += 1;
    Ok(())
}

/// Records what the consumer was handed: each partition in strictly increasing, dense offset
/// order (no skip, no repeat, also across re-subscriptions), one value per offset.
fn observe(state: &Shared, partition: u64, offset: u64, value: String) {
    let mut s = state.borrow_mut();
    let s = &mut *s;
    let next = s.consumer.next.entry(partition).or_insert(0);
    if offset != *next {
        let what = if offset < *next { "repeated" } else { "skipped to" };
        s.violations.push(format!("consumer: partition {partition} expected offset {next}, {what} {offset}"));
    }
    *next = offset + 1;
    s.consumer.records += 1;
    if let Some(previous) = s.consumer.seen.entry(partition).or_default().insert(offset, value.clone())
        && previous != value
    {
        s.violations
            .push(format!("consumer: partition {partition} offset {offset} read {previous:?}, later {value:?}"));
    }
}

/// The consumer: every partition from the beginning, polled until the liveness phase says it has
/// caught up. Now and then it re-subscribes a partition at its position, as an application
/// that restarts would.
async fn consumer_main(seed: u64, state: Shared) -> turmoil::Result {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0de);
    wait_topic(&state).await;
    let config = ConsumerConfig {
        fetch_bytes_max: 64 << 10,
        fetch_wait_max: Duration::from_millis(500),
        offset_default: Offset::Beginning,
    };
    let nodes = state.borrow().nodes;
    let mut consumer = Consumer::new(client_config(seed, nodes), config)?;
    loop {
        match consumer.assign(TOPIC, &[]).await {
            Ok(()) => break,
            Err(e) => {
                log(&state, format!("consumer: assign: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    while !state.borrow().stop_consumer {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => {
                for r in records {
                    observe(&state, u64::from(r.partition), r.offset, checker::text(r.value.as_deref()));
                }
            }
            Err(e) => {
                // A partition that failed for good stays silent until sought: seek them all to
                // where the consumer is, which must neither skip nor repeat anything.
                log(&state, format!("consumer: poll: {e}; re-subscribing every partition"));
                for p in 0..PARTITIONS {
                    let at = state.borrow().consumer.next.get(&u64::from(p)).copied().unwrap_or(0);
                    consumer.seek(TOPIC, p, Offset::At(at))?;
                }
            }
        }
        if rng.random_ratio(1, 40) {
            let p = rng.random_range(0..PARTITIONS);
            let at = state.borrow().consumer.next.get(&u64::from(p)).copied().unwrap_or(0);
            log(&state, format!("consumer: re-subscribe partition {p} at {at}"));
            consumer.seek(TOPIC, p, Offset::At(at))?;
        }
    }
    Ok(())
}

/// The liveness phase: every partition accepts a write within [`WRITE_BOUND`], the consumer
/// catches up with every acknowledged record within [`CATCH_UP_BOUND`], and every node rejoins,
/// its replicas as far as their leaders', within [`CONVERGE_BOUND`].
async fn liveness_main(
    seed: u64,
    members: u64,
    state: Shared,
    registry: Registry,
    disks: Vec<SimDisk>,
) -> turmoil::Result {
    let (nodes, idempotence) = (state.borrow().nodes, state.borrow().idempotence);
    let producer =
        Producer::new(client_config(seed, nodes), producer_config(Duration::from_secs(10), idempotence, None))?;
    for p in 0..PARTITIONS {
        let deadline = tokio::time::Instant::now() + WRITE_BOUND;
        for attempt in 0.. {
            let value = format!("final-{p}-{attempt}");
            let index = invoke(&state, u64::from(p), &value);
            let result = match producer.send(TOPIC, ProducerRecord::new(value.into_bytes()).with_partition(p)).await {
                Ok(delivery) => delivery.await,
                Err(e) => Err(e),
            };
            complete(&state, &disks, index, &result);
            if result.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("partition {p} accepted no write within {WRITE_BOUND:?} after healing").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    producer.close().await;
    let behind = || -> Vec<String> {
        let s = state.borrow();
        let mut wanted: BTreeMap<u64, u64> = BTreeMap::new();
        for op in &s.history {
            if let Some(Outcome::Ok(offset)) = op.outcome {
                let end = wanted.entry(op.partition).or_default();
                *end = (*end).max(offset + 1);
            }
        }
        wanted
            .iter()
            .filter(|(p, end)| s.consumer.next.get(p).copied().unwrap_or(0) < **end)
            .map(|(p, end)| format!("partition {p}: read up to {:?} of {end}", s.consumer.next.get(p)))
            .collect()
    };
    within(CATCH_UP_BOUND, "the consumer did not catch up", behind).await?;
    log(&state, "consumer caught up".into());
    state.borrow_mut().stop_consumer = true;
    crate::delayed::converge(&state, CATCH_UP_BOUND).await?;
    crate::outbox::converge(&state, CATCH_UP_BOUND).await?;
    crate::txn::converge(&state, CATCH_UP_BOUND, seed).await?;
    let acked: BTreeSet<String> = state
        .borrow()
        .history
        .iter()
        .filter(|op| matches!(op.outcome, Some(Outcome::Ok(_))))
        .map(|op| op.value.clone())
        .collect();
    crate::groups::converge(&state, seed, members, acked, CATCH_UP_BOUND).await?;
    // Every node must rejoin: ready, hosting its partitions, each replica as far as its leader.
    within(CONVERGE_BOUND, "the cluster did not converge", || lagging(&state, &registry)).await?;
    log(&state, "every replica caught up".into());
    Ok(())
}

/// Polls `pending` (what is still missing) until it is empty, or fails with `failure` and what
/// is still missing once `bound` has passed.
pub(crate) async fn within(
    bound: Duration,
    failure: &str,
    mut pending: impl FnMut() -> Vec<String>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let missing = pending();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{failure} in {bound:?}: {}", missing.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What keeps the cluster from having converged: nodes down or not ready, partitions not open on
/// a replica (or still open on a node that is not one), replicas whose high watermark is behind
/// another's.
pub(crate) fn lagging(state: &Shared, registry: &Registry) -> Vec<String> {
    let (nodes, replicas) = {
        let s = state.borrow();
        (s.nodes, s.replicas.clone())
    };
    let registry = registry.borrow();
    let placements = crate::moves::placements(&registry).unwrap_or_default();
    let mut out: Vec<String> =
        (1..=nodes).filter(|id| !registry.contains_key(id)).map(|id| format!("n{id} is down")).collect();
    out.extend(crate::moves::left_on_decommissioned(&registry));
    for (id, (_, broker)) in registry.iter() {
        if !*broker.ready().borrow() {
            out.push(format!("n{id} is not ready"));
        }
    }
    for (&group, created_on) in &replicas {
        // Partitions move: the metadata says where each is now, and every move must finish.
        let holders = match placements.get(&group) {
            Some((holders, Some(target))) => {
                out.push(format!("group {group} is still moving from {holders:?} to {target:?}"));
                holders
            }
            Some((holders, None)) => holders,
            None => created_on,
        };
        let mut ends: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (id, (_, broker)) in registry.iter() {
            match (broker.raft_node().store(group), holders.contains(id)) {
                (Ok(store), true) => {
                    ends.insert(*id, *store.high_watermark().borrow());
                }
                (Err(_), true) => out.push(format!("group {group} is not open on n{id}")),
                (Ok(_), false) => out.push(format!("group {group} is open on n{id}, not one of its replicas")),
                (Err(_), false) => {}
            }
        }
        let max = ends.values().copied().max().unwrap_or(0);
        for (id, end) in ends.iter().filter(|(_, end)| **end < max) {
            out.push(format!("group {group} on n{id} is at {end} of {max}"));
        }
    }
    out
}

/// The nemesis's view of the brokers.
struct Nodes<'a> {
    /// Every host of the run (brokers and clients).
    hosts: &'a [String],
    disks: &'a [SimDisk],
    registry: &'a Registry,
    state: &'a Shared,
}

impl Target for Nodes<'_> {
    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) -> CrashMode {
        crate::nemesis::power_off(sim, &host_name(id), self.hosts);
        self.registry.borrow_mut().remove(&id);
        self.disks[(id - 1) as usize].crash()
    }

    fn leader(&self, index: u64) -> Option<NodeId> {
        // The partition after the topic's is the group coordinator's (`__consumer_offsets/0`).
        let group = match self.state.borrow().groups.get(&(index - 1)) {
            Some(g) => *g,
            None => self.state.borrow().members.offsets_group?,
        };
        crate::nemesis::freshest_leader(
            self.registry.borrow().values().filter_map(|(_, b)| b.raft_node().metrics(group).ok()),
        )
    }
}

/// Samples every live replica: high watermarks never go back within a boot, and no node has
/// stopped itself.
fn sample(registry: &Registry, state: &Shared, high_watermarks: &mut HighWatermarks) {
    let groups: Vec<GroupId> =
        state.borrow().groups.values().copied().chain(state.borrow().members.offsets_group).collect();
    for (id, (boot, broker)) in registry.borrow().iter() {
        if *broker.ready().borrow() && state.borrow_mut().ready.insert((*id, *boot)) {
            state.borrow_mut().events.push(format!("n{id} (boot {boot}) ready"));
        }
        if let Some(reason) = broker.fatal().borrow().clone() {
            state.borrow_mut().violations.push(format!("n{id} stopped: {reason}"));
        }
        for group in groups.iter().copied().chain([keel_broker::META_GROUP]) {
            let Ok(store) = broker.raft_node().store(group) else {
                high_watermarks.forget(*id, *boot, group);
                continue;
            };
            let high_watermark = *store.high_watermark().borrow();
            let generation = broker.raft_node().generation(group).unwrap_or(0);
            if let Some(violation) = high_watermarks.observe(*id, *boot, group, generation, high_watermark) {
                state.borrow_mut().violations.push(violation);
            }
        }
    }
}

/// Steps the simulation until `done`, handing trace lines over and sampling replicas as it goes.
pub(crate) fn drive(
    sim: &mut turmoil::Sim<'_>,
    ctx: &mut Driver<'_>,
    limit: Duration,
    mut done: impl FnMut(&State) -> bool,
    mut between: impl FnMut(&mut turmoil::Sim<'_>, Duration, &mut Driver<'_>),
) -> Result<(), String> {
    loop {
        let finished = sim.step().map_err(|e| format!("simulation failed: {e}"));
        ctx.drain();
        let now = sim.elapsed();
        if finished? || done(&ctx.state.borrow()) {
            return Ok(());
        }
        if now >= ctx.next_sample {
            sample(ctx.registry, ctx.state, &mut ctx.high_watermarks);
            ctx.next_sample = now + SAMPLE_EVERY;
        }
        if now > limit {
            return Err(format!("not done after {limit:?} of simulated time"));
        }
        between(sim, now, ctx);
    }
}

/// The driver's side of a run.
pub(crate) struct Driver<'a> {
    pub(crate) state: &'a Shared,
    pub(crate) registry: &'a Registry,
    pub(crate) disks: &'a [SimDisk],
    pub(crate) trace: &'a mut dyn FnMut(String),
    pub(crate) high_watermarks: HighWatermarks,
    pub(crate) next_sample: Duration,
}

impl Driver<'_> {
    fn drain(&mut self) {
        let events = std::mem::take(&mut self.state.borrow_mut().events);
        for line in events {
            (self.trace)(line);
        }
    }
}

/// Runs one seed; `trace` receives the history and the nemesis's actions as they happen.
pub fn run_broker(seed: u64, config: BrokerSim, trace: &mut dyn FnMut(String)) -> Result<BrokerStats, String> {
    run(seed, config, trace).map_err(|violation| format!("seed {seed}: {violation}"))
}

fn run(seed: u64, config: BrokerSim, trace: &mut dyn FnMut(String)) -> Result<BrokerStats, String> {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(config.safety + Duration::from_secs(600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(NORMAL_LATENCY_MAX)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .rng_seed(seed)
        .build();
    let nodes = nodes_for(seed);
    let disks: Vec<SimDisk> = (1..=nodes).map(|id| SimDisk::new(seed.wrapping_mul(31).wrapping_add(id))).collect();
    let registry: Registry = Rc::new(RefCell::new(BTreeMap::new()));
    let state: Shared = Rc::new(RefCell::new(State::new(nodes, VOTERS)));
    state.borrow_mut().idempotence = config.idempotence;
    trace(format!("{nodes} nodes, {VOTERS} of them metadata voters"));
    let mut clocks = crate::delayed::ClockSteps::new(seed, nodes);
    for id in 1..=nodes {
        let (disk, registry) = (disks[(id - 1) as usize].clone(), Rc::clone(&registry));
        let boots = Rc::new(RefCell::new(0u64));
        let faults = config.faults;
        let coordinator = config.coordinator;
        let skew = Arc::clone(&clocks.skews[&id]);
        sim.host(host_name(id), move || {
            let boot = {
                let mut b = boots.borrow_mut();
                *b += 1;
                *b
            };
            let seed = seed ^ (id << 32) ^ (boot << 48);
            // A node boots with a true clock (NTP sets it before the broker starts).
            skew.store(0, Ordering::Relaxed);
            let config = broker_config(id, seed);
            broker_main(config, boot, disk.clone(), faults, coordinator, Rc::clone(&registry), Arc::clone(&skew))
        });
    }
    sim.client("admin", admin_main(seed ^ 0xad, Rc::clone(&state), Rc::clone(&registry)));
    for k in 1..=config.producers {
        let producer = producer_main(k, seed ^ (k << 40), config.safety, Rc::clone(&state), disks.clone());
        sim.client(format!("producer{k}"), producer);
    }
    sim.client("consumer", consumer_main(seed ^ 0xc0, Rc::clone(&state)));
    sim.client("delayed", crate::delayed::delayed_main(seed ^ 0xde, config.safety, Rc::clone(&state)));
    let faults =
        crate::outbox::OutboxFaults { skip_stamps: config.outbox_skip_stamps, lying_flush: config.outbox_lying_flush };
    let outbox = crate::outbox::outbox_main(seed ^ 0x0b, config.safety, faults, Rc::clone(&state));
    sim.client("outbox", outbox);
    sim.client("txn", crate::txn::txn_main(seed ^ 0x7a, config.safety, Rc::clone(&state)));
    let members = config.members.unwrap_or_else(|| crate::groups::members_for(seed));
    let plan = crate::groups::MemberPlan { members, zombie_at: config.zombie_at };
    for k in 1..=members {
        let member = crate::groups::member_main(k, seed ^ (k << 44) ^ 0x6d, plan, Rc::clone(&state), disks.clone());
        sim.client(format!("member{k}"), member);
    }
    trace(format!("{members} group members"));
    let moving = nodes > u64::from(REPLICATION);
    if moving {
        let mover = crate::moves::mover_main(seed ^ 0x30e, config.safety, REPLICATION, Rc::clone(&state));
        sim.client("mover", mover);
    }
    let mut hosts: Vec<String> = (1..=nodes).map(host_name).collect();
    hosts.push("admin".into());
    hosts.extend((1..=config.producers).map(|k| format!("producer{k}")));
    hosts.push("consumer".into());
    hosts.push("delayed".into());
    hosts.push("outbox".into());
    hosts.push("txn".into());
    hosts.extend((1..=members).map(|k| format!("member{k}")));
    if moving {
        hosts.push("mover".into());
    }

    let mut ctx = Driver {
        state: &state,
        registry: &registry,
        disks: &disks,
        trace,
        high_watermarks: HighWatermarks::default(),
        next_sample: Duration::ZERO,
    };
    // Safety phase: the nemesis acts (once the topic exists) until every producer is done.
    let mut nemesis = Nemesis::new(
        ChaCha8Rng::seed_from_u64(seed ^ 0x7e4e),
        nodes,
        // The topic's partitions and the coordinator's: leader isolation targets it too.
        u64::from(PARTITIONS) + 1,
        Duration::from_secs(4),
        config.crash_all_weight,
    );
    let producers = config.producers;
    // Producers stop at `config.safety`, then wait out their last records (delivery timeouts are
    // at most 20 s).
    let safety = drive(
        &mut sim,
        &mut ctx,
        config.safety + Duration::from_secs(120),
        |s| s.producers_done == producers,
        |sim, now, ctx| {
            if config.nemesis && ctx.state.borrow().topic_ready {
                let mut nodes = Nodes { hosts: &hosts, disks: ctx.disks, registry: ctx.registry, state: ctx.state };
                let lose = ctx.state.borrow().lose_disk;
                if let Some(id) = lose.filter(|id| ctx.registry.borrow().contains_key(id)) {
                    // Lost while running: it comes back (at the nemesis's next heal) blank.
                    crate::nemesis::power_off(sim, &host_name(id), &hosts);
                    ctx.registry.borrow_mut().remove(&id);
                    ctx.disks[(id - 1) as usize].wipe();
                    nemesis.down(id);
                    ctx.state.borrow_mut().lose_disk = None;
                    ctx.state.borrow_mut().disk_lost_at = Some(now);
                    (ctx.trace)(format!("{now:?} n{id} loses its disk"));
                }
                nemesis.step(sim, now, &mut nodes, &mut *ctx.trace);
                clocks.step(now, &mut *ctx.trace);
            }
        },
    )
    .map_err(|e| format!("safety phase: {e}"));
    let phases = safety.and_then(|()| {
        // Liveness phase: everything healed.
        nemesis.heal_all(&mut sim, &mut *ctx.trace);
        clocks.heal();
        let liveness = liveness_main(seed ^ 0x11fe, members, Rc::clone(&state), Rc::clone(&registry), disks.clone());
        sim.client("liveness", liveness);
        let limit = sim.elapsed() + WRITE_BOUND * (PARTITIONS + 1) + CATCH_UP_BOUND * 5 + CONVERGE_BOUND;
        drive(&mut sim, &mut ctx, limit, |_| false, |_, _, _| {}).map_err(|e| format!("liveness phase: {e}"))
    });
    sample(&registry, &state, &mut ctx.high_watermarks);
    ctx.drain();

    let s = state.borrow();
    let mut stats = BrokerStats {
        faults: nemesis.faults,
        consumed: s.consumer.records,
        commits: s.members.commits.len() as u64,
        zombie_commits: (s.members.zombie_commits, s.members.zombie_fenced),
        member_lives: s.members.lives,
        retries: (s.members.nacks, s.members.redelivered, s.members.dead.len() as u64),
        moves: s.moves,
        ..BrokerStats::default()
    };
    for op in &s.history {
        match op.outcome {
            Some(Outcome::Ok(_)) => stats.acked += 1,
            Some(Outcome::Fail) => stats.failed += 1,
            _ => stats.unknown += 1,
        }
    }
    (ctx.trace)(format!("stats {stats:?}"));
    // The checker runs even when a phase failed (a cluster that lost writes may also stall), as
    // long as every replica is there to be read: what was lost is the more useful report.
    let registry = registry.borrow();
    let checked = if registry.len() == nodes as usize { check(&s, &registry).map(Some) } else { Ok(None) };
    let mut problems: Vec<String> = Vec::new();
    if let Err(e) = &checked {
        problems.push(e.clone());
    }
    if let Some(first) = s.violations.first() {
        problems.push(format!("{first} ({} found during the run)", s.violations.len()));
    }
    if let Err(e) = phases {
        problems.push(e);
    }
    if !problems.is_empty() {
        return Err(problems.join(" | "));
    }
    match checked {
        Ok(Some(duplicates)) => stats.duplicates = duplicates,
        _ => return Err(format!("only {} of {nodes} brokers are up at the end", registry.len())),
    }
    (ctx.trace)(format!("duplicates {}", stats.duplicates));
    Ok(stats)
}

/// The checker, per partition, over the history, what the consumer read, and every replica's
/// final log. Returns the number of duplicated records.
fn check(state: &State, registry: &BTreeMap<NodeId, (u64, Broker)>) -> Result<u64, String> {
    let mut duplicates = 0;
    let mut high_watermarks = BTreeMap::new();
    let mut logs = Vec::new();
    // The replicas are where the final metadata puts them (partitions move during the run).
    let placements = crate::moves::placements(registry).unwrap_or_default();
    for (&partition, &group) in &state.groups {
        let mut replicas: BTreeMap<NodeId, checker::Records> = BTreeMap::new();
        let mut stamped = Vec::new();
        let holders = placements
            .get(&group)
            .map(|(replicas, _)| replicas.clone())
            .or_else(|| state.replicas.get(&group).cloned())
            .unwrap_or_default();
        for (id, (_, broker)) in registry.iter().filter(|(id, _)| holders.contains(id)) {
            let records = checker::read_committed_stamped(broker.raft_node(), group)
                .map_err(|e| format!("n{id} partition {partition} (group {group}): {e}"))?;
            if records.len() > stamped.len() {
                stamped.clone_from(&records);
            }
            replicas.insert(*id, records.into_iter().map(|(o, v, _)| (o, v)).collect());
        }
        logs.push((partition, replicas, stamped));
    }
    // InitProducerId gives each id once, and each epoch of an identity to one instance: ids or
    // epochs shared collide in the leader's dedup (one producer's batch answered with the
    // other's offsets). Checked over every partition first: the lost writes such a collision
    // causes on one partition would otherwise hide the cause, visible on another.
    let mut producer_ids = checker::ProducerOwners::default();
    for (partition, _, stamped) in &logs {
        checker::check_producer_ids_unique(*partition, stamped, &mut producer_ids)?;
    }
    for (partition, replicas, _) in logs {
        let longest = replicas.values().max_by_key(|r| r.len()).cloned().unwrap_or_default();
        let ops: Vec<&Op> = state.history.iter().filter(|o| o.partition == partition).collect();
        // Every replica that has caught up must hold every acknowledged write (one that lags
        // merely lacks the newest records, which the other checks cover).
        for (id, records) in &replicas {
            if records.last() == longest.last() {
                checker::check_no_lost_write(partition, &ops, records).map_err(|e| format!("n{id}: {e}"))?;
            }
        }
        checker::check_replicas_agree(partition, &replicas)?;
        checker::check_no_aborted_reads(partition, &ops, &longest)?;
        let empty = BTreeMap::new();
        let seen = state.consumer.seen.get(&partition).unwrap_or(&empty);
        checker::check_consumer_saw_committed(partition, seen, &longest)?;
        // No lost write, as the consumer saw it: every ack read back at its offset.
        let consumed: Vec<(u64, String)> = seen.iter().map(|(o, v)| (*o, v.clone())).collect();
        checker::check_no_lost_write(partition, &ops, &consumed).map_err(|e| format!("consumer: {e}"))?;
        checker::check_no_aborted_reads(partition, &ops, &consumed).map_err(|e| format!("consumer: {e}"))?;
        // Every value is sent once by the application: a second copy is a client retry written
        // twice, which the idempotent producer and the leader's dedup must prevent.
        duplicates += checker::count_duplicates(&longest);
        checker::check_no_duplicates(partition, &longest)?;
        let high_watermark = longest.last().map_or(0, |(o, _)| o + 1);
        high_watermarks.insert(partition as u32, high_watermark);
    }
    // The coordinator's log, from its most advanced replica, audited record by record.
    if let Some(group) = state.members.offsets_group {
        let holders = placements
            .get(&group)
            .map(|(replicas, _)| replicas.clone())
            .or_else(|| state.replicas.get(&group).cloned())
            .unwrap_or_default();
        let mut longest = Vec::new();
        for (id, (_, broker)) in registry.iter().filter(|(id, _)| holders.contains(id)) {
            let log = crate::groups::read_offsets_log(broker.raft_node(), group)
                .map_err(|e| format!("n{id} __consumer_offsets (group {group}): {e}"))?;
            // The most history: the furthest end, then the earliest start (compaction trims
            // each replica's log on its own schedule).
            let span = |l: &[crate::groups::OpRecords]| {
                let first = l.first().and_then(|op| op.first()).map_or(u64::MAX, |(o, _)| *o);
                let end = l.last().and_then(|op| op.last()).map_or(0, |(o, _)| *o);
                (end, std::cmp::Reverse(first))
            };
            if longest.is_empty() || span(&log) > span(&longest) {
                longest = log;
            }
        }
        crate::groups::audit(&longest, &high_watermarks)?;
    }
    Ok(duplicates)
}
