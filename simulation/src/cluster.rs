//! Whole raft clusters under turmoil: the real `keel-raft` node code over simulated TCP (tonic
//! unchanged, only the listener and the connector differ), one `SimDisk` per node that survives
//! that node's crashes, turmoil's clock, and every choice drawn from the run's seed.
//!
//! A run has a safety phase (a workload of appends while the nemesis crashes nodes, crashes all of
//! them at once, partitions the network and heals it) and a liveness phase (all faults healed:
//! every partition must elect a leader and accept a write within a bound). The checker then reads
//! every replica and checks the history of client operations against what the replicas hold.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use keel_raft::{AppendError, Faults, IoMode, Node, NodeConfig, NodeId, RaftNode, RaftTimings};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{CrashMode, Disk, SimDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

const PORT: u16 = 9000;
const NODES: u64 = 3;
const GROUPS: u64 = 3;
const NORMAL_LATENCY_MAX: Duration = Duration::from_millis(5);

/// Settings of one cluster run.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSim {
    /// Client operations in the safety phase.
    pub ops: u64,
    /// Inject faults (crashes, partitions) during the safety phase.
    pub nemesis: bool,
    /// A deliberately broken build (acknowledge before flush), for the negative control.
    pub faults: Faults,
    /// Probability that a fault is a crash of every node at once.
    pub crash_all_weight: u32,
}

impl Default for ClusterSim {
    fn default() -> ClusterSim {
        ClusterSim { ops: 400, nemesis: true, faults: Faults::default(), crash_all_weight: 1 }
    }
}

/// One client operation, Jepsen style.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged at this base offset.
    Ok(u64),
    /// Definitely not written.
    Fail,
    /// May or may not have been written.
    Info,
}

#[derive(Debug, Clone)]
struct Op {
    group: u64,
    value: String,
    outcome: Option<Outcome>,
}

/// turmoil's TCP for tonic's client: dials `host:port` through the simulated network.
struct TurmoilConnector;

impl keel_raft::Connector for TurmoilConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
        let connector = tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        });
        Ok(endpoint.connect_timeout(Duration::from_millis(500)).connect_with_connector_lazy(connector))
    }
}

/// An accepted simulated connection, as tonic's server wants it.
struct Accepted(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn host_name(id: NodeId) -> String {
    format!("n{id}")
}

fn members() -> BTreeMap<NodeId, Node> {
    (1..=NODES).map(|id| (id, Node { addr: format!("{}:{PORT}", host_name(id)) })).collect()
}

/// The running nodes, with the boot number of each (a restarted node is a new boot).
type Registry = Rc<RefCell<BTreeMap<NodeId, (u64, Arc<RaftNode>)>>>;

/// One node's life: serve raft, open the groups, initialise them on the first boot of node 1.
async fn node_main(
    id: NodeId,
    boot: u64,
    disk: SimDisk,
    seed: u64,
    faults: Faults,
    registry: Registry,
) -> turmoil::Result {
    let config = NodeConfig {
        node_id: id,
        advertised_addr: format!("{}:{PORT}", host_name(id)),
        data_dir: PathBuf::from("/data"),
        timings: RaftTimings { heartbeat_ms: 100, election_min_ms: 500, election_max_ms: 1_000 },
        log: keel_storage::LogConfig { segment_bytes_max: keel_storage::SEGMENT_BYTES_MIN, ..Default::default() },
        io: IoMode::Inline,
        network: keel_raft::NetworkConfig::default(),
        append_timeout: Duration::from_secs(3),
        seed,
    };
    let node = Arc::new(RaftNode::new(config, Arc::new(disk) as Arc<dyn Disk>, Arc::new(TurmoilConnector)));
    node.set_faults(faults);
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let service = node.service().into_server();
    tokio::spawn(async move {
        let incoming = futures_stream(listener);
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    for group in 1..=GROUPS {
        node.open_group(group).await?;
    }
    if id == 1 {
        for group in 1..=GROUPS {
            // Idempotent: a group that already has a membership refuses, which is fine.
            let _ = node.initialize_group(group, members()).await;
        }
    }
    registry.borrow_mut().insert(id, (boot, Arc::clone(&node)));
    // The host lives until the simulation crashes it.
    std::future::pending::<()>().await;
    Ok(())
}

/// The accept loop as a stream of connections.
fn futures_stream(
    listener: turmoil::net::TcpListener,
) -> impl futures_util::Stream<Item = Result<Accepted, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(s, _)| Accepted(s));
        Some((next, listener))
    })
}

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(1 << 16);
    // A record that does not fit cannot happen with these short values; an empty batch would be
    // rejected by the node and recorded as a failure, never silently counted.
    let _ = b.push(NewRecord { timestamp_ms: 0, key: None, value: Some(value.as_bytes()), headers: &[] });
    b.build()
}

/// White-box check at the moment of an ack: how many nodes' disks hold the acknowledged batch
/// durably (as it would be found after a power loss right now).
fn durable_copies(disks: &[SimDisk], group: u64, base_offset: u64, value: &str) -> usize {
    let dir = PathBuf::from(format!("/data/group-{group}"));
    disks
        .iter()
        .filter(|disk| {
            disk.durable_files(&dir).iter().filter(|p| p.extension().is_some_and(|e| e == "log")).any(|path| {
                let Some(bytes) = disk.durable_bytes(path) else { return false };
                let bytes = Bytes::from(bytes);
                let mut pos = keel_storage::segment::SEGMENT_HEADER_BYTES as usize;
                while pos < bytes.len() {
                    let Ok((b, len)) = keel_record::Batch::split_first(&bytes.slice(pos..)) else { break };
                    if b.header().base_offset == base_offset && b.header().record_count > 0 {
                        let first = b.records().next().and_then(|r| r.ok()).and_then(|r| r.value);
                        if first.as_deref() == Some(value.as_bytes()) {
                            return true;
                        }
                    }
                    pos += len;
                }
                false
            })
        })
        .count()
}

/// Appends through whichever node the client picks, following "not leader" hints once.
async fn client_append(registry: &Registry, rng: &mut ChaCha8Rng, group: u64, value: &str) -> Outcome {
    let mut target = rng.random_range(1..=NODES);
    for _ in 0..3 {
        let node = registry.borrow().get(&target).map(|(_, n)| Arc::clone(n));
        let Some(node) = node else {
            target = rng.random_range(1..=NODES);
            continue;
        };
        match node.append(group, batch(value)).await {
            Ok(appended) => return Outcome::Ok(appended.base_offset),
            Err(AppendError::NotLeader { leader }) => match leader {
                Some((id, _)) => target = id,
                None => return Outcome::Fail,
            },
            Err(AppendError::Invalid(_) | AppendError::UnknownGroup(_)) => return Outcome::Fail,
            // Timeout, leadership change, or the node died mid-write: unknown.
            Err(_) => return Outcome::Info,
        }
    }
    Outcome::Fail
}

/// The result of a cluster run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterStats {
    /// Acknowledged appends.
    pub acked: u64,
    /// Definitely failed appends.
    pub failed: u64,
    /// Appends with an unknown outcome.
    pub unknown: u64,
    /// Faults injected.
    pub faults: u64,
}

/// Runs one seed; `trace` receives the history and the nemesis's actions.
pub fn run_cluster(seed: u64, config: ClusterSim, trace: &mut dyn FnMut(String)) -> Result<ClusterStats, String> {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(NORMAL_LATENCY_MAX)
        .rng_seed(seed)
        .build();
    let disks: Vec<SimDisk> = (1..=NODES).map(|id| SimDisk::new(seed.wrapping_mul(31).wrapping_add(id))).collect();
    let registry: Registry = Rc::new(RefCell::new(BTreeMap::new()));
    for id in 1..=NODES {
        let disk = disks[(id - 1) as usize].clone();
        let registry = Rc::clone(&registry);
        let boots = Rc::new(RefCell::new(0u64));
        let faults = config.faults;
        sim.host(host_name(id), move || {
            let boot = {
                let mut b = boots.borrow_mut();
                *b += 1;
                *b
            };
            node_main(id, boot, disk.clone(), seed ^ (id << 32) ^ boot, faults, Rc::clone(&registry))
        });
    }

    let history: Rc<RefCell<Vec<Op>>> = Rc::new(RefCell::new(Vec::new()));
    let done = Rc::new(RefCell::new(false));
    let under_quorum: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(Vec::new()));
    {
        let (registry, history, done) = (Rc::clone(&registry), Rc::clone(&history), Rc::clone(&done));
        let (disks, under_quorum) = (disks.clone(), Rc::clone(&under_quorum));
        let ops = config.ops;
        sim.client("client", async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc11e);
            // Let the first elections happen.
            tokio::time::sleep(Duration::from_secs(3)).await;
            for i in 0..ops {
                let group = rng.random_range(1..=GROUPS);
                let value = format!("v{i}");
                let index = {
                    let mut h = history.borrow_mut();
                    h.push(Op { group, value: value.clone(), outcome: None });
                    h.len() - 1
                };
                let outcome = client_append(&registry, &mut rng, group, &value).await;
                if let Outcome::Ok(offset) = outcome {
                    let copies = durable_copies(&disks, group, offset, &value);
                    if copies < (NODES as usize) / 2 + 1 {
                        under_quorum
                            .borrow_mut()
                            .push(format!("{value} acked at {offset} of group {group} on {copies} disks"));
                    }
                }
                history.borrow_mut()[index].outcome = Some(outcome);
                tokio::time::sleep(Duration::from_millis(rng.random_range(5..80))).await;
            }
            *done.borrow_mut() = true;
            Ok(())
        });
    }

    // A consumer reads committed records from any live replica, in offset order, the whole
    // time; what it saw is checked against the final state, and high watermarks are sampled.
    let consumed: Rc<RefCell<Consumed>> = Rc::new(RefCell::new(Consumed::default()));
    {
        let (registry, consumed, done) = (Rc::clone(&registry), Rc::clone(&consumed), Rc::clone(&done));
        sim.client("consumer", async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0de);
            while !*done.borrow() {
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
                let nodes: Vec<(NodeId, u64, Arc<RaftNode>)> =
                    registry.borrow().iter().map(|(i, (boot, n))| (*i, *boot, Arc::clone(n))).collect();
                if nodes.is_empty() {
                    continue;
                }
                let (id, boot, node) = &nodes[rng.random_range(0..nodes.len())];
                for group in 1..=GROUPS {
                    consumed.borrow_mut().poll(*id, *boot, node, group);
                }
            }
            Ok(())
        });
    }

    // The nemesis runs between simulation steps, on the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e4e);
    let mut stats = ClusterStats::default();
    let mut next_fault = Duration::from_secs(4);
    let mut crashed: BTreeSet<NodeId> = BTreeSet::new();
    let mut partitioned = false;
    let mut slow = false;
    let mut heal_at: Option<Duration> = None;
    loop {
        let finished = sim.step().map_err(|e| format!("seed {seed}: simulation failed: {e}"))?;
        let now = sim.elapsed();
        if finished || *done.borrow() {
            break;
        }
        if now > Duration::from_secs(400) {
            return Err(format!("seed {seed}: the workload did not finish in 400 simulated seconds"));
        }
        if let Some(at) = heal_at
            && now >= at
        {
            for id in std::mem::take(&mut crashed) {
                trace(format!("{now:?} restart n{id}"));
                sim.bounce(host_name(id));
            }
            if partitioned {
                trace(format!("{now:?} heal network"));
                sim.repair("n1", "n2");
                sim.repair("n1", "n3");
                sim.repair("n2", "n3");
                partitioned = false;
            }
            if slow {
                trace(format!("{now:?} network speed restored"));
                sim.set_max_message_latency(NORMAL_LATENCY_MAX);
                slow = false;
            }
            heal_at = None;
        }
        if config.nemesis && heal_at.is_none() && now >= next_fault {
            stats.faults += 1;
            let weight_all = config.crash_all_weight;
            match rng.random_range(0..(6 + weight_all)) {
                3 => {
                    // A bridge: two nodes cannot talk to each other, the third talks to both.
                    let bridge = rng.random_range(1..=NODES);
                    let others: Vec<u64> = (1..=NODES).filter(|o| *o != bridge).collect();
                    trace(format!("{now:?} bridge through n{bridge}"));
                    sim.partition(host_name(others[0]), host_name(others[1]));
                    partitioned = true;
                }
                4 => {
                    // Isolate whoever leads a random partition right now.
                    let group = rng.random_range(1..=GROUPS);
                    let leader = registry.borrow().values().find_map(|(_, n)| n.leader(group));
                    if let Some(id) = leader {
                        trace(format!("{now:?} isolate the leader of group {group}: n{id}"));
                        for other in (1..=NODES).filter(|o| *o != id) {
                            sim.partition(host_name(id), host_name(other));
                        }
                        partitioned = true;
                    }
                }
                5 => {
                    let max = Duration::from_millis(rng.random_range(50..400));
                    trace(format!("{now:?} slow network: up to {max:?} per message, reordered"));
                    sim.set_max_message_latency(max);
                    slow = true;
                }
                0 => {
                    let id = rng.random_range(1..=NODES);
                    let mode = crash_node(&mut sim, &disks, &registry, id);
                    trace(format!("{now:?} crash n{id} ({mode:?})"));
                    crashed.insert(id);
                }
                1 => {
                    let id = rng.random_range(1..=NODES);
                    trace(format!("{now:?} isolate n{id}"));
                    for other in (1..=NODES).filter(|o| *o != id) {
                        sim.partition(host_name(id), host_name(other));
                    }
                    partitioned = true;
                }
                2 => {
                    let (a, b) = (rng.random_range(1..=NODES), rng.random_range(1..=NODES));
                    if a != b {
                        trace(format!("{now:?} cut n{a} from n{b} one way"));
                        sim.partition_oneway(host_name(a), host_name(b));
                        partitioned = true;
                    }
                }
                _ => {
                    trace(format!("{now:?} crash every node"));
                    for id in 1..=NODES {
                        let mode = crash_node(&mut sim, &disks, &registry, id);
                        trace(format!("{now:?}   n{id} {mode:?}"));
                        crashed.insert(id);
                    }
                }
            }
            heal_at = Some(now + Duration::from_millis(rng.random_range(500..4_000)));
            next_fault = now + Duration::from_millis(rng.random_range(2_000..6_000));
        }
    }
    // Liveness phase: everything healed.
    for id in std::mem::take(&mut crashed) {
        sim.bounce(host_name(id));
    }
    sim.repair("n1", "n2");
    sim.repair("n1", "n3");
    sim.repair("n2", "n3");
    sim.set_max_message_latency(NORMAL_LATENCY_MAX);
    trace("heal all".into());
    let final_writes: Rc<RefCell<BTreeMap<u64, u64>>> = Rc::new(RefCell::new(BTreeMap::new()));
    {
        let (registry, final_writes) = (Rc::clone(&registry), Rc::clone(&final_writes));
        sim.client("checker", async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xf1a1);
            for group in 1..=GROUPS {
                // Liveness bound: each partition accepts a write within 30 simulated seconds.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    if let Outcome::Ok(offset) =
                        client_append(&registry, &mut rng, group, &format!("final{group}")).await
                    {
                        final_writes.borrow_mut().insert(group, offset);
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(format!("group {group} accepted no write within 30 s after healing").into());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // Let every replica catch up to the final writes.
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
    }
    sim.run().map_err(|e| format!("seed {seed}: liveness: {e}"))?;

    let history = history.borrow().clone();
    for op in &history {
        trace(format!("op {} group {} {:?}", op.value, op.group, op.outcome));
    }
    for o in &history {
        match o.outcome {
            Some(Outcome::Ok(_)) => stats.acked += 1,
            Some(Outcome::Fail) => stats.failed += 1,
            _ => stats.unknown += 1,
        }
    }
    if let Some(first) = under_quorum.borrow().first() {
        return Err(format!("seed {seed}: acknowledged without a durable quorum: {first}"));
    }
    if let Some(first) = consumed.borrow().violations.first() {
        return Err(format!("seed {seed}: consumer: {first}"));
    }
    let seen = consumed.borrow().seen.clone();
    let nodes: BTreeMap<NodeId, Arc<RaftNode>> =
        registry.borrow().iter().map(|(i, (_, n))| (*i, Arc::clone(n))).collect();
    check(seed, &history, &nodes, &final_writes.borrow(), &seen)?;
    Ok(stats)
}

fn crash_node(sim: &mut turmoil::Sim<'_>, disks: &[SimDisk], registry: &Registry, id: NodeId) -> CrashMode {
    sim.crash(host_name(id));
    registry.borrow_mut().remove(&id);
    disks[(id - 1) as usize].crash()
}

/// The checker: one function per invariant, over the history and every replica's final state.
fn check(
    seed: u64,
    history: &[Op],
    nodes: &BTreeMap<NodeId, Arc<RaftNode>>,
    final_writes: &BTreeMap<u64, u64>,
    seen: &BTreeMap<(u64, u64), String>,
) -> Result<(), String> {
    for group in 1..=GROUPS {
        let final_offset = final_writes.get(&group).copied().unwrap_or(0);
        let mut replicas: BTreeMap<NodeId, Vec<(u64, String)>> = BTreeMap::new();
        for (id, node) in nodes {
            replicas.insert(
                *id,
                read_committed(node, group).map_err(|e| format!("seed {seed}: n{id} group {group}: {e}"))?,
            );
        }
        let ops: Vec<&Op> = history.iter().filter(|o| o.group == group).collect();
        check_replicas_agree(seed, group, &replicas)?;
        let longest = replicas.values().max_by_key(|r| r.len()).cloned().unwrap_or_default();
        if longest.last().is_none_or(|(o, _)| *o < final_offset) {
            return Err(format!("seed {seed} group {group}: no replica holds the final write at {final_offset}"));
        }
        check_no_lost_write(seed, group, &ops, &longest)?;
        check_no_duplicates(seed, group, &longest)?;
        check_no_aborted_reads(seed, group, &ops, &longest)?;
        check_consumer_saw_committed(seed, group, seen, &longest)?;
    }
    Ok(())
}

/// What the consumer read during the run agrees with the final committed state, offset by
/// offset: nothing it was served was later lost or replaced.
fn check_consumer_saw_committed(
    seed: u64,
    group: u64,
    seen: &BTreeMap<(u64, u64), String>,
    records: &[(u64, String)],
) -> Result<(), String> {
    let at: BTreeMap<u64, &String> = records.iter().map(|(o, v)| (*o, v)).collect();
    for ((g, offset), value) in seen.range((group, 0)..=(group, u64::MAX)) {
        debug_assert_eq!(*g, group);
        match at.get(offset) {
            Some(v) if *v == value => {}
            other => {
                return Err(format!(
                    "seed {seed} group {group}: a consumer read {value:?} at {offset}, which finally holds {other:?}"
                ));
            }
        }
    }
    Ok(())
}

/// What the consumer observed: records by (group, offset), its position per group, and the high
/// watermark each node boot reported per group (which must never move backwards).
#[derive(Default)]
struct Consumed {
    seen: BTreeMap<(u64, u64), String>,
    next: BTreeMap<u64, u64>,
    high_watermarks: BTreeMap<(NodeId, u64, u64), u64>,
    violations: Vec<String>,
}

impl Consumed {
    fn poll(&mut self, id: NodeId, boot: u64, node: &RaftNode, group: u64) {
        let Ok(store) = node.store(group) else { return };
        let high_watermark = *store.high_watermark().borrow();
        let last = self.high_watermarks.entry((id, boot, group)).or_insert(high_watermark);
        if high_watermark < *last {
            self.violations
                .push(format!("n{id} group {group}: high watermark went back from {last} to {high_watermark}"));
        }
        *last = high_watermark;
        let next = self.next.entry(group).or_insert(0);
        let Ok(batches) = store.read_committed(*next, 64 << 10) else { return };
        for batch in batches {
            if batch.header().next_offset() > high_watermark {
                self.violations
                    .push(format!("n{id} group {group}: served offsets above its high watermark {high_watermark}"));
            }
            for record in batch.records() {
                let Ok(record) = record else {
                    self.violations.push(format!("n{id} group {group}: served an undecodable record"));
                    return;
                };
                if record.offset != *next {
                    self.violations
                        .push(format!("n{id} group {group}: expected offset {next}, was served {}", record.offset));
                    return;
                }
                let value = record.value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
                if let Some(previous) = self.seen.insert((group, record.offset), value.clone())
                    && previous != value
                {
                    self.violations
                        .push(format!("group {group} offset {}: read {previous:?}, later {value:?}", record.offset));
                }
                *next += 1;
            }
        }
    }
}

/// Every committed record a node holds for a group, in offset order, from its log start.
fn read_committed(node: &RaftNode, group: u64) -> Result<Vec<(u64, String)>, String> {
    let store = node.store(group).map_err(|e| e.to_string())?;
    let (start, _, _) = store.positions();
    let high_watermark = *store.high_watermark().borrow();
    let mut out = Vec::new();
    let mut next = start.offset;
    while next < high_watermark {
        let batches = store.read_committed(next, 1 << 20).map_err(|e| e.to_string())?;
        if batches.is_empty() {
            return Err(format!("nothing readable at {next} below the high watermark {high_watermark}"));
        }
        for b in batches {
            if b.header().base_offset != next {
                return Err(format!("offsets not dense: expected {next}, found {}", b.header().base_offset));
            }
            for r in b.records() {
                let r = r.map_err(|e| e.to_string())?;
                let value = r.value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
                out.push((r.offset, value));
            }
            next = b.header().next_offset();
        }
    }
    Ok(out)
}

/// No inconsistent offsets: replicas agree on every offset they both hold.
fn check_replicas_agree(seed: u64, group: u64, replicas: &BTreeMap<NodeId, Vec<(u64, String)>>) -> Result<(), String> {
    let mut by_offset: BTreeMap<u64, (NodeId, &String)> = BTreeMap::new();
    for (id, records) in replicas {
        for (offset, value) in records {
            if let Some((other, v)) = by_offset.get(offset) {
                if *v != value {
                    return Err(format!(
                        "seed {seed} group {group}: offset {offset} is {v:?} on n{other} but {value:?} on n{id}"
                    ));
                }
            } else {
                by_offset.insert(*offset, (*id, value));
            }
        }
    }
    Ok(())
}

/// No lost write: every acknowledged append is readable at its acknowledged offset.
fn check_no_lost_write(seed: u64, group: u64, ops: &[&Op], records: &[(u64, String)]) -> Result<(), String> {
    let at: BTreeMap<u64, &String> = records.iter().map(|(o, v)| (*o, v)).collect();
    for op in ops {
        if let Some(Outcome::Ok(offset)) = op.outcome {
            match at.get(&offset) {
                Some(v) if **v == op.value => {}
                Some(v) => {
                    return Err(format!(
                        "seed {seed} group {group}: lost write: {} was acked at {offset}, which holds {v:?}",
                        op.value
                    ));
                }
                None => {
                    return Err(format!(
                        "seed {seed} group {group}: lost write: {} was acked at {offset}, which no replica holds",
                        op.value
                    ));
                }
            }
        }
    }
    Ok(())
}

/// No duplicates: every value is written once by the client, so it appears at most once.
fn check_no_duplicates(seed: u64, group: u64, records: &[(u64, String)]) -> Result<(), String> {
    let mut seen: BTreeMap<&String, u64> = BTreeMap::new();
    for (offset, value) in records {
        if let Some(first) = seen.insert(value, *offset) {
            return Err(format!("seed {seed} group {group}: {value:?} appears at {first} and at {offset}"));
        }
    }
    Ok(())
}

/// No aborted reads: a definitely failed append is never read.
fn check_no_aborted_reads(seed: u64, group: u64, ops: &[&Op], records: &[(u64, String)]) -> Result<(), String> {
    let failed: BTreeSet<&String> = ops.iter().filter(|o| o.outcome == Some(Outcome::Fail)).map(|o| &o.value).collect();
    for (offset, value) in records {
        if failed.contains(value) {
            return Err(format!("seed {seed} group {group}: {value:?} failed, yet is read at {offset}"));
        }
    }
    Ok(())
}
