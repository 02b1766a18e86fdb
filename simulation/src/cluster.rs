//! Whole raft clusters under turmoil: the real `keel-raft` node code over simulated TCP (tonic
//! unchanged, only the listener and the connector differ), one `SimDisk` per node that survives
//! that node's crashes, turmoil's clock, and every choice drawn from the run's seed.
//!
//! A run has a safety phase (a workload of appends while the nemesis crashes nodes, crashes all of
//! them at once, partitions the network and heals it) and a liveness phase (all faults healed:
//! every partition must elect a leader and accept a write within a bound). The checker then reads
//! every replica and checks the history of client operations against what the replicas hold.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_raft::{AppendError, Faults, IoMode, Node, NodeConfig, NodeId, RaftNode, RaftTimings};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{CrashMode, Disk, SimDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::{self, HighWatermarks, Op, Outcome};
use crate::nemesis::{NORMAL_LATENCY_MAX, Nemesis, Target, host_name};
use crate::net::{PORT, TurmoilConnector, incoming};

const NODES: u64 = 3;
const GROUPS: u64 = 3;

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

fn members() -> BTreeMap<NodeId, Node> {
    (1..=NODES).map(|id| (id, Node::new(format!("{}:{PORT}", host_name(id))))).collect()
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
        timings: RaftTimings { heartbeat_ms: 100, election_min_ms: 500, election_max_ms: 1_000, quiesce: true },
        log: keel_storage::LogConfig { segment_bytes_max: keel_storage::SEGMENT_BYTES_MIN, ..Default::default() },
        io: IoMode::Inline,
        network: keel_raft::NetworkConfig::default(),
        append_timeout: Duration::from_secs(3),
        seed,
        // The broker workload flushes node-wide; this one keeps the per-partition default covered.
        flush: keel_raft::FlushScope::Partition,
    };
    let node = Arc::new(RaftNode::new(config, Arc::new(disk) as Arc<dyn Disk>, Arc::new(TurmoilConnector)));
    node.set_faults(faults);
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let service = node.service().into_server();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming(listener)).await;
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

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(1 << 16);
    // A record that does not fit cannot happen with these short values; an empty batch would be
    // rejected by the node and recorded as a failure, never silently counted.
    let _ = b.push(NewRecord { timestamp_ms: 0, key: None, value: Some(value.as_bytes()), headers: &[] });
    b.build()
}

/// Where a group's segments live on every node's disk.
fn group_dir(group: u64) -> PathBuf {
    Path::new("/data").join(format!("group-{group}"))
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

/// The nemesis's view of the raft cluster.
struct Nodes<'a> {
    disks: &'a [SimDisk],
    registry: &'a Registry,
}

impl Target for Nodes<'_> {
    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) -> CrashMode {
        let hosts: Vec<String> = (1..=NODES).map(host_name).chain(["client".into(), "consumer".into()]).collect();
        crate::nemesis::power_off(sim, &host_name(id), &hosts);
        self.registry.borrow_mut().remove(&id);
        self.disks[(id - 1) as usize].crash()
    }

    fn leader(&self, group: u64) -> Option<NodeId> {
        crate::nemesis::freshest_leader(self.registry.borrow().values().filter_map(|(_, n)| n.metrics(group).ok()))
    }
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
                    h.push(Op { partition: group, value: value.clone(), outcome: None });
                    h.len() - 1
                };
                let outcome = client_append(&registry, &mut rng, group, &value).await;
                if let Outcome::Ok(offset) = outcome {
                    let copies = checker::durable_copies(&disks, &group_dir(group), offset, &value);
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
    let mut nemesis = Nemesis::new(
        ChaCha8Rng::seed_from_u64(seed ^ 0x7e4e),
        NODES,
        GROUPS,
        Duration::from_secs(4),
        config.crash_all_weight,
    );
    loop {
        let finished = sim.step().map_err(|e| format!("seed {seed}: simulation failed: {e}"))?;
        let now = sim.elapsed();
        if finished || *done.borrow() {
            break;
        }
        if now > Duration::from_secs(400) {
            return Err(format!("seed {seed}: the workload did not finish in 400 simulated seconds"));
        }
        if config.nemesis {
            nemesis.step(&mut sim, now, &mut Nodes { disks: &disks, registry: &registry }, trace);
        }
    }
    // Liveness phase: everything healed.
    nemesis.heal_all(&mut sim, trace);
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
        trace(format!("op {} group {} {:?}", op.value, op.partition, op.outcome));
    }
    let mut stats = ClusterStats { faults: nemesis.faults, ..ClusterStats::default() };
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
    let nodes: BTreeMap<NodeId, Arc<RaftNode>> =
        registry.borrow().iter().map(|(i, (_, n))| (*i, Arc::clone(n))).collect();
    check(&history, &nodes, &final_writes.borrow(), &consumed.borrow().seen)
        .map_err(|violation| format!("seed {seed}: {violation}"))?;
    Ok(stats)
}

/// The checker: every invariant of [`checker`], per group, over the history and every replica's
/// final state.
fn check(
    history: &[Op],
    nodes: &BTreeMap<NodeId, Arc<RaftNode>>,
    final_writes: &BTreeMap<u64, u64>,
    seen: &BTreeMap<u64, BTreeMap<u64, String>>,
) -> Result<(), String> {
    for group in 1..=GROUPS {
        let final_offset = final_writes.get(&group).copied().unwrap_or(0);
        let mut replicas: BTreeMap<NodeId, checker::Records> = BTreeMap::new();
        for (id, node) in nodes {
            replicas
                .insert(*id, checker::read_committed(node, group).map_err(|e| format!("n{id} group {group}: {e}"))?);
        }
        let ops: Vec<&Op> = history.iter().filter(|o| o.partition == group).collect();
        checker::check_replicas_agree(group, &replicas)?;
        let longest = replicas.values().max_by_key(|r| r.len()).cloned().unwrap_or_default();
        if longest.last().is_none_or(|(o, _)| *o < final_offset) {
            return Err(format!("group {group}: no replica holds the final write at {final_offset}"));
        }
        checker::check_no_lost_write(group, &ops, &longest)?;
        checker::check_no_duplicates(group, &longest)?;
        checker::check_no_aborted_reads(group, &ops, &longest)?;
        let empty = BTreeMap::new();
        checker::check_consumer_saw_committed(group, seen.get(&group).unwrap_or(&empty), &longest)?;
    }
    Ok(())
}

/// What the white-box consumer observed: records by group and offset, its position per group,
/// and the high watermark of every node boot per group (which must never move backwards).
#[derive(Default)]
struct Consumed {
    seen: BTreeMap<u64, BTreeMap<u64, String>>,
    next: BTreeMap<u64, u64>,
    high_watermarks: HighWatermarks,
    violations: Vec<String>,
}

impl Consumed {
    fn poll(&mut self, id: NodeId, boot: u64, node: &RaftNode, group: u64) {
        let Ok(store) = node.store(group) else { return };
        let high_watermark = *store.high_watermark().borrow();
        if let Some(violation) = self.high_watermarks.observe(id, boot, group, 0, high_watermark) {
            self.violations.push(violation);
        }
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
                let value = checker::text(record.value.as_deref());
                if let Some(previous) = self.seen.entry(group).or_default().insert(record.offset, value.clone())
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
