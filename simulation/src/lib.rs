//! Deterministic simulation runs: a run is a function of its seed, its trace is hashed so that
//! determinism can be checked, and a failure names the seed that replays it.
//!
//! Workloads: `storage` (one segment log on SimDisk under power loss between and inside
//! operations, checked by `keel_storage::testing`), `cluster` (three raft nodes under turmoil
//! with crashes, whole-cluster crashes and partitions, checked by [`cluster`]), `broker` (three
//! real brokers and real clients under the same faults, checked by [`broker`]), and scripted
//! single faults with liveness bounds ([`scenario`]: `one-way-cut`). The pieces they
//! share: the network door ([`net`]), the fault schedule ([`nemesis`]) and the invariants
//! ([`checker`]).

pub mod broker;
pub mod checker;
pub mod cluster;
pub mod delayed;
pub mod groups;
mod moves;
pub mod nemesis;
pub mod net;
pub mod outbox;
pub mod scenario;
pub mod txn;

use std::fmt;

/// Which simulated system to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The segment log under crashes.
    Storage,
    /// A three-node raft cluster under crashes and partitions.
    Cluster,
    /// The cluster with an injected ack-before-flush bug: the checker must fail it.
    ClusterAckBeforeFlush,
    /// Three brokers and their clients under crashes and partitions.
    Broker,
    /// The brokers with an injected ack-before-flush bug: the checker must fail it.
    BrokerAckBeforeFlush,
    /// The brokers with a group coordinator that acknowledges commits before the quorum flush.
    BrokerGroupAckBeforeCommit,
    /// The brokers with a group coordinator that does not fence commits (a zombie's go through).
    BrokerGroupNoFencing,
    /// The brokers with a group coordinator whose per-group lock a cancelled request releases.
    BrokerGroupUnlockOnCancel,
    /// The brokers with producers that are not idempotent: their retries write duplicates.
    BrokerNoIdempotence,
    /// The brokers handing out the same producer ids on every node, without the controller.
    BrokerProducerIdsReused,
    /// The negative control: the controller answers a successor's claim of a producer identity
    /// with the epoch its predecessor holds.
    BrokerIdentityEpochReused,
    /// The negative control: group coordinators publish dead letters without their producer
    /// stamp, so a send repeated after a failover or an ambiguous answer lands twice.
    BrokerDeadLetterUnstamped,
    /// The negative control: timer coordinators fire by the wall clock alone, so a clock stepped
    /// forward fires delayed records early.
    BrokerDelayedWallClock,
    /// The negative control: transaction coordinators acknowledge an END that contradicts how
    /// the transaction already ended, instead of refusing it.
    BrokerTxnContradictionsAccepted,
    /// The negative control: the outbox producer does not write its stamps, so a producer
    /// restarted after a crash stamps batches that may be stored afresh (duplicates).
    BrokerOutboxUnstamped,
    /// The negative control: the outbox producer's disk acknowledges flushes and persists
    /// nothing, so a crash loses records whose send returned Ok.
    BrokerOutboxLyingFlush,
    /// The negative control: a node-wide flush of several partitions reports success without
    /// syncing (as a syncfs of the wrong file system would), so power cuts lose acked writes.
    BrokerNodeFlushWrongFilesystem,
    /// The negative control: a write to a quiescent partition leader does not wake its raft
    /// group, so once a partition goes quiet it never takes a write again.
    BrokerQuiescentWritesDoNotWake,
    /// The negative control: partition moves reported finished before the new replicas caught
    /// up, so the replicas moved off drop copies the new ones lack.
    BrokerMoveFinishedEarly,
    /// The negative control: every answer of an AppendEntries batch is read as a success, so
    /// leaders count followers as holding entries they refused.
    BrokerBatchFailuresReadAsSuccess,
    /// A partition leader cut off one way (its messages to its followers dropped): produce must
    /// resume at a new leader within a bound.
    OneWayCut,
}

impl Workload {
    /// The name the driver's `--workload` takes.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Storage => "storage",
            Workload::Cluster => "cluster",
            Workload::ClusterAckBeforeFlush => "cluster-ack-before-flush",
            Workload::Broker => "broker",
            Workload::BrokerAckBeforeFlush => "broker-ack-before-flush",
            Workload::BrokerGroupAckBeforeCommit => "broker-group-ack-before-commit",
            Workload::BrokerGroupNoFencing => "broker-group-no-fencing",
            Workload::BrokerGroupUnlockOnCancel => "broker-group-unlock-on-cancel",
            Workload::BrokerNoIdempotence => "broker-no-idempotence",
            Workload::BrokerProducerIdsReused => "broker-producer-ids-reused",
            Workload::BrokerIdentityEpochReused => "broker-identity-epoch-reused",
            Workload::BrokerDeadLetterUnstamped => "broker-dead-letter-unstamped",
            Workload::BrokerDelayedWallClock => "broker-delayed-wall-clock",
            Workload::BrokerTxnContradictionsAccepted => "broker-txn-contradictions-accepted",
            Workload::BrokerOutboxUnstamped => "broker-outbox-unstamped",
            Workload::BrokerOutboxLyingFlush => "broker-outbox-lying-flush",
            Workload::BrokerQuiescentWritesDoNotWake => "broker-quiescent-writes-do-not-wake",
            Workload::BrokerNodeFlushWrongFilesystem => "broker-node-flush-wrong-filesystem",
            Workload::BrokerMoveFinishedEarly => "broker-move-finished-early",
            Workload::BrokerBatchFailuresReadAsSuccess => "broker-batch-failures-read-as-success",
            Workload::OneWayCut => "one-way-cut",
        }
    }
}

/// The outcome of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// FNV-1a hash of every trace line, in order.
    pub trace_hash: u64,
    /// Trace lines recorded.
    pub events: u64,
    /// The broken invariant, if any.
    pub violation: Option<String>,
    /// The last trace lines before the end of the run (a short history excerpt for failures).
    pub tail: Vec<String>,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} trace {:016x}", self.seed, self.trace_hash)
    }
}

/// Runs every seed of `seeds` on `jobs` threads (each run is single-threaded and independent of
/// the others), handing each report to `done` as it finishes, in the order they finish.
pub fn sweep(workload: Workload, seeds: std::ops::Range<u64>, jobs: usize, done: &mut dyn FnMut(RunReport)) {
    sweep_list(workload, &seeds.collect::<Vec<_>>(), jobs, done);
}

/// [`sweep`] over a list of seeds, which may name a seed more than once (each is a run of its
/// own: how CI checks replays without a second pool).
pub fn sweep_list(workload: Workload, seeds: &[u64], jobs: usize, done: &mut dyn FnMut(RunReport)) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<RunReport>();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            let (tx, next) = (tx.clone(), &next);
            scope.spawn(move || {
                loop {
                    let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    // Named before it runs: should a run abort the process, the seed is on record.
                    eprintln!("running seed {seed}");
                    if tx.send(run(workload, seed)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for report in rx {
            done(report);
        }
    });
}

/// Runs every seed of `seeds` on every core; returns one report per failed seed: its violation,
/// its last events and the command that replays it (what a test prints when it fails).
pub fn failures(workload: Workload, seeds: std::ops::Range<u64>) -> Vec<String> {
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let mut failures = Vec::new();
    sweep(workload, seeds, jobs, &mut |report| failures.extend(failure_report(workload, &report)));
    failures
}

/// What a test prints for a failed run (`None` for a run that passed): its violation, its last
/// events and the command that replays it.
pub fn failure_report(workload: Workload, report: &RunReport) -> Option<String> {
    let violation = report.violation.as_ref()?;
    Some(format!(
        "{report}: {violation}\nlast events: {:#?}\nreplay: cargo run -p keel-simulation --release -- --workload {} --seed {} --verbose",
        report.tail,
        workload.name(),
        report.seed
    ))
}

/// Lines of history kept for a failure report.
const TAIL_LINES: usize = 12;

/// Runs one seed of `workload`.
pub fn run(workload: Workload, seed: u64) -> RunReport {
    run_keeping(workload, seed, TAIL_LINES)
}

/// Runs one seed, keeping the last `tail_lines` events for the report.
pub fn run_keeping(workload: Workload, seed: u64, tail_lines: usize) -> RunReport {
    run_watching(workload, seed, tail_lines, &mut |_| {})
}

/// Runs one seed, handing every trace line to `watch` as it happens (a run that hangs can then
/// be watched while it hangs), and keeping the last `tail_lines` for the report.
pub fn run_watching(workload: Workload, seed: u64, tail_lines: usize, watch: &mut dyn FnMut(&str)) -> RunReport {
    let mut hasher = Fnv::new();
    let mut events = 0u64;
    let mut tail = std::collections::VecDeque::with_capacity(tail_lines.min(1 << 16));
    let mut trace = |line: String| {
        hasher.write(line.as_bytes());
        hasher.write(b"\n");
        events += 1;
        watch(&line);
        if tail_lines > 0 {
            if tail.len() == tail_lines {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    };
    // A panic inside the simulated cluster is a broken invariant (openraft and Keel assert
    // theirs): report it against the seed like any other violation.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_workload(workload, seed, &mut trace)));
    let violation = match outcome {
        Ok(violation) => violation,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "non-string panic".to_owned());
            Some(format!("seed {seed}: panicked: {message}"))
        }
    };
    RunReport { seed, trace_hash: hasher.finish(), events, violation, tail: tail.into_iter().collect() }
}

/// The broker workload for a negative control: crashes of every node come often, so a short run
/// is enough for the control's fault to lose writes.
fn crash_heavy(faults: keel_raft::Faults) -> broker::BrokerSim {
    broker::BrokerSim {
        faults,
        crash_all_weight: 6,
        safety: std::time::Duration::from_secs(40),
        ..broker::BrokerSim::default()
    }
}

fn run_workload(workload: Workload, seed: u64, trace: &mut dyn FnMut(String)) -> Option<String> {
    match workload {
        Workload::Storage => keel_storage::testing::crash_workload(seed, trace).err(),
        Workload::Cluster => cluster::run_cluster(seed, cluster::ClusterSim::default(), trace).err(),
        Workload::ClusterAckBeforeFlush => {
            let config = cluster::ClusterSim {
                faults: keel_raft::Faults { ack_before_flush: true, ..Default::default() },
                crash_all_weight: 6,
                ..cluster::ClusterSim::default()
            };
            cluster::run_cluster(seed, config, trace).err()
        }
        Workload::Broker => broker::run_broker(seed, broker::BrokerSim::default(), trace).err(),
        Workload::BrokerAckBeforeFlush => {
            let faults = keel_raft::Faults { ack_before_flush: true, ..Default::default() };
            broker::run_broker(seed, crash_heavy(faults), trace).err()
        }
        Workload::BrokerGroupAckBeforeCommit => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { ack_before_commit: true, ..Default::default() },
                safety: std::time::Duration::from_secs(40),
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerGroupNoFencing => {
            // No other fault, and nothing produced after 15 s: the coordinator stays up through
            // every member's pause at 20 s and gives its partitions away, and the zombie's commit
            // of what it already committed rewrites the offset under its name unless refused.
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { no_fencing: true, ..Default::default() },
                nemesis: false,
                safety: std::time::Duration::from_secs(15),
                zombie_at: Some(std::time::Duration::from_secs(20)),
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerOutboxLyingFlush => {
            let config = broker::BrokerSim { outbox_lying_flush: true, ..broker::BrokerSim::default() };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerOutboxUnstamped => {
            let config = broker::BrokerSim { outbox_skip_stamps: true, ..broker::BrokerSim::default() };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerNodeFlushWrongFilesystem => {
            let faults = keel_raft::Faults { node_flush_wrong_filesystem: true, ..Default::default() };
            broker::run_broker(seed, crash_heavy(faults), trace).err()
        }
        Workload::BrokerBatchFailuresReadAsSuccess => {
            let faults = keel_raft::Faults { batch_failures_read_as_success: true, ..Default::default() };
            broker::run_broker(seed, crash_heavy(faults), trace).err()
        }
        Workload::BrokerQuiescentWritesDoNotWake => {
            let quiesce = keel_raft::QuiesceFaults { writes_do_not_wake: true };
            let config = broker::BrokerSim {
                faults: keel_raft::Faults { quiesce, ..Default::default() },
                safety: std::time::Duration::from_secs(40),
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerNoIdempotence => {
            let config = broker::BrokerSim { idempotence: false, ..broker::BrokerSim::default() };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerProducerIdsReused => {
            // No other fault and a short run: the producers' first ids alone collide.
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { producer_ids_reused: true, ..Default::default() },
                nemesis: false,
                safety: std::time::Duration::from_secs(20),
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerIdentityEpochReused => {
            // No other fault and a short run: producer 2's successor arrives 5-12 s in.
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { identity_epoch_reused: true, ..Default::default() },
                nemesis: false,
                safety: std::time::Duration::from_secs(20),
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerDeadLetterUnstamped => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { publish_unstamped: true, ..Default::default() },
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerTxnContradictionsAccepted => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { txn_contradictions_accepted: true, ..Default::default() },
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerDelayedWallClock => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { timers_wall_clock_only: true, ..Default::default() },
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerMoveFinishedEarly => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { move_finished_early: true, ..Default::default() },
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::BrokerGroupUnlockOnCancel => {
            let config = broker::BrokerSim {
                coordinator: keel_broker::CoordinatorFaults { unlock_on_cancel: true, ..Default::default() },
                ..broker::BrokerSim::default()
            };
            broker::run_broker(seed, config, trace).err()
        }
        Workload::OneWayCut => scenario::run_one_way_cut(seed, scenario::OneWayCut::default(), trace).err(),
    }
}

/// 64-bit FNV-1a: tiny, stable across platforms and Rust versions (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace() {
        for seed in [0, 1, 42] {
            let (a, b) = (run(Workload::Storage, seed), run(Workload::Storage, seed));
            assert_eq!(a, b, "seed {seed} must replay identically");
            assert!(a.events > 10, "a run records its history");
        }
        assert_ne!(run(Workload::Storage, 1).trace_hash, run(Workload::Storage, 2).trace_hash);
    }
}
