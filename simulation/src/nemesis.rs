//! The nemesis: faults drawn from the run's seed and injected between simulation steps, one at a
//! time, each healed after a while. Crashes (one node or all at once, the disk keeping only what
//! was flushed), isolation of a node or of a partition's leader, bridges, one-way cuts, and a
//! slow network that reorders messages.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_raft::NodeId;
use keel_storage::CrashMode;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The largest message latency of a healthy network.
pub const NORMAL_LATENCY_MAX: Duration = Duration::from_millis(5);

/// The host name of node `id`.
pub fn host_name(id: NodeId) -> String {
    format!("n{id}")
}

/// Stops host `name` as a power loss does: first cut it off from every host in `others`, so that
/// the connections its dying tasks drop send nothing (a machine that loses power sends no FIN
/// or RST), then crash it, then mend the links for its restart.
///
/// Cutting it off also keeps runs replayable within one process: tokio drops a runtime's tasks
/// in an order that depends on process-wide task ids, so the FINs they would send (and the
/// random latencies turmoil would draw for them) would come in a different order in a second
/// run of the same seed.
pub fn power_off(sim: &mut turmoil::Sim<'_>, name: &str, others: &[String]) {
    for other in others.iter().filter(|o| o.as_str() != name) {
        sim.partition(name, other.as_str());
    }
    sim.crash(name);
    for other in others.iter().filter(|o| o.as_str() != name) {
        sim.repair(name, other.as_str());
    }
}

/// What the nemesis acts on: the nodes of a workload.
pub trait Target {
    /// Crashes node `id`: its host stops and its disk keeps only what survives a power loss.
    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) -> CrashMode;
    /// The node that leads partition `index` (1-based) right now, as far as any node knows.
    fn leader(&self, index: u64) -> Option<NodeId>;
}

/// The fault schedule of one run.
pub struct Nemesis {
    rng: ChaCha8Rng,
    nodes: u64,
    partitions: u64,
    crash_all_weight: u32,
    next_fault: Duration,
    crashed: BTreeSet<NodeId>,
    partitioned: bool,
    slow: bool,
    heal_at: Option<Duration>,
    /// Faults injected so far.
    pub faults: u64,
}

impl Nemesis {
    /// A schedule over `nodes` nodes and `partitions` partitions whose first fault comes at
    /// `first_fault`; a crash of every node at once weighs `crash_all_weight` against 6 for the
    /// other faults together.
    pub fn new(rng: ChaCha8Rng, nodes: u64, partitions: u64, first_fault: Duration, crash_all_weight: u32) -> Nemesis {
        Nemesis {
            rng,
            nodes,
            partitions,
            crash_all_weight,
            next_fault: first_fault,
            crashed: BTreeSet::new(),
            partitioned: false,
            slow: false,
            heal_at: None,
            faults: 0,
        }
    }

    /// Called between simulation steps: heals the current fault when its time is up, and
    /// injects the next one when that is due.
    pub fn step(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now: Duration,
        target: &mut dyn Target,
        trace: &mut dyn FnMut(String),
    ) {
        if let Some(at) = self.heal_at
            && now >= at
        {
            self.heal(sim, now, trace);
            self.heal_at = None;
        }
        if self.heal_at.is_none() && now >= self.next_fault {
            self.inject(sim, now, target, trace);
            self.heal_at = Some(now + Duration::from_millis(self.rng.random_range(500..4_000)));
            self.next_fault = now + Duration::from_millis(self.rng.random_range(2_000..6_000));
        }
    }

    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, trace: &mut dyn FnMut(String)) {
        for id in std::mem::take(&mut self.crashed) {
            trace(format!("{now:?} restart n{id}"));
            sim.bounce(host_name(id));
        }
        if self.partitioned {
            trace(format!("{now:?} heal network"));
            self.repair_all(sim);
            self.partitioned = false;
        }
        if self.slow {
            trace(format!("{now:?} network speed restored"));
            sim.set_max_message_latency(NORMAL_LATENCY_MAX);
            self.slow = false;
        }
    }

    fn repair_all(&self, sim: &mut turmoil::Sim<'_>) {
        for a in 1..=self.nodes {
            for b in a + 1..=self.nodes {
                sim.repair(host_name(a), host_name(b));
            }
        }
    }

    fn isolate(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) {
        for other in (1..=self.nodes).filter(|o| *o != id) {
            sim.partition(host_name(id), host_name(other));
        }
        self.partitioned = true;
    }

    fn inject(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now: Duration,
        target: &mut dyn Target,
        trace: &mut dyn FnMut(String),
    ) {
        self.faults += 1;
        let nodes = self.nodes;
        match self.rng.random_range(0..(6 + self.crash_all_weight)) {
            0 => {
                let id = self.rng.random_range(1..=nodes);
                let mode = target.crash(sim, id);
                trace(format!("{now:?} crash n{id} ({mode:?})"));
                self.crashed.insert(id);
            }
            1 => {
                let id = self.rng.random_range(1..=nodes);
                trace(format!("{now:?} isolate n{id}"));
                self.isolate(sim, id);
            }
            2 => {
                let (a, b) = (self.rng.random_range(1..=nodes), self.rng.random_range(1..=nodes));
                if a != b {
                    trace(format!("{now:?} cut n{a} from n{b} one way"));
                    sim.partition_oneway(host_name(a), host_name(b));
                    self.partitioned = true;
                }
            }
            3 => {
                // A bridge: two nodes cannot talk to each other, the third talks to both.
                let bridge = self.rng.random_range(1..=nodes);
                let others: Vec<u64> = (1..=nodes).filter(|o| *o != bridge).collect();
                trace(format!("{now:?} bridge through n{bridge}"));
                sim.partition(host_name(others[0]), host_name(others[1]));
                self.partitioned = true;
            }
            4 => {
                // Isolate whoever leads a random partition right now.
                let index = self.rng.random_range(1..=self.partitions);
                if let Some(id) = target.leader(index) {
                    trace(format!("{now:?} isolate the leader of partition {index}: n{id}"));
                    self.isolate(sim, id);
                }
            }
            5 => {
                let max = Duration::from_millis(self.rng.random_range(50..400));
                trace(format!("{now:?} slow network: up to {max:?} per message, reordered"));
                sim.set_max_message_latency(max);
                self.slow = true;
            }
            _ => {
                trace(format!("{now:?} crash every node"));
                for id in 1..=nodes {
                    let mode = target.crash(sim, id);
                    trace(format!("{now:?}   n{id} {mode:?}"));
                    self.crashed.insert(id);
                }
            }
        }
    }

    /// The liveness phase begins: every crashed node restarts and the network is whole and fast.
    pub fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>, trace: &mut dyn FnMut(String)) {
        for id in std::mem::take(&mut self.crashed) {
            sim.bounce(host_name(id));
        }
        self.repair_all(sim);
        sim.set_max_message_latency(NORMAL_LATENCY_MAX);
        self.partitioned = false;
        self.slow = false;
        self.heal_at = None;
        trace("heal all".into());
    }
}
