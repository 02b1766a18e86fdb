//! The nemesis: faults drawn from the run's seed and injected between simulation steps, one at a
//! time, each healed after a while. Crashes (one node or all at once, the disk keeping only what
//! was flushed), isolation of a node or of a partition's leader, repeated isolation of whoever
//! leads a partition next, bridges, one-way cuts (between two nodes, or of everything a
//! partition's leader sends), and a slow network that reorders messages.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_raft::NodeId;
use keel_storage::CrashMode;
use rand::Rng;
use rand::seq::SliceRandom;
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

/// The leader named by the node that has seen the highest term: a deposed leader that was cut
/// off may still believe it leads, in an older term.
pub fn freshest_leader(metrics: impl IntoIterator<Item = keel_raft::types::Metrics>) -> Option<NodeId> {
    metrics.into_iter().filter(|m| m.current_leader.is_some()).max_by_key(|m| m.current_term)?.current_leader
}

/// Repeated leader isolation in progress: each round isolates whoever leads the partition now,
/// so that every new leader is cut off soon after it wins (elections pile up, terms race).
struct Chase {
    index: u64,
    rounds_left: u32,
    next_round: Duration,
    /// The leader cut off last, and since when.
    isolated: NodeId,
    since: Duration,
}

/// How long a chase waits for the others to elect a leader before it isolates the same one again.
const CHASE_PATIENCE: Duration = Duration::from_secs(5);

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
    chase: Option<Chase>,
    heal_at: Option<Duration>,
    /// Faults injected so far.
    pub faults: u64,
}

impl Nemesis {
    /// A schedule over `nodes` nodes and `partitions` partitions whose first fault comes at
    /// `first_fault`; a crash of every node at once weighs `crash_all_weight` against 7 for the
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
            chase: None,
            heal_at: None,
            faults: 0,
        }
    }

    /// Counts node `id`, powered off by someone else, as crashed: it restarts with the others.
    pub fn down(&mut self, id: NodeId) {
        self.crashed.insert(id);
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
        self.chase_round(sim, now, target, trace);
        if let Some(at) = self.heal_at
            && now >= at
        {
            self.heal(sim, now, trace);
            self.heal_at = None;
        }
        if self.heal_at.is_none() && now >= self.next_fault {
            self.inject(sim, now, target, trace);
            self.heal_at = Some(now + Duration::from_millis(self.rng.random_range(500..4_000)));
            if let Some(next_round) = self.chase.as_ref().map(|c| c.next_round) {
                self.hold_heal_past(next_round);
            }
            self.next_fault = now + Duration::from_millis(self.rng.random_range(2_000..6_000));
        }
    }

    /// The next round of a repeated leader isolation, when it is due: heal, then cut off the
    /// partition's leader of the moment (the heal stays pending until the last round is over).
    fn chase_round(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now: Duration,
        target: &mut dyn Target,
        trace: &mut dyn FnMut(String),
    ) {
        let Some(chase) = &mut self.chase else { return };
        if now < chase.next_round {
            return;
        }
        let leader = target.leader(chase.index);
        if leader == Some(chase.isolated) && now < chase.since + CHASE_PATIENCE {
            // The others have not elected a new leader yet: look again shortly.
            chase.next_round = now + Duration::from_millis(200);
            self.hold_heal_past(now + Duration::from_millis(200));
            return;
        }
        let index = chase.index;
        chase.rounds_left -= 1;
        let next_round = now + Duration::from_millis(self.rng.random_range(800..2_000));
        chase.next_round = next_round;
        if let Some(id) = leader {
            (chase.isolated, chase.since) = (id, now);
        }
        self.repair_all(sim);
        match leader {
            Some(id) => {
                trace(format!("{now:?} isolate the new leader of partition {index}: n{id}"));
                self.isolate(sim, id);
            }
            None => trace(format!("{now:?} partition {index} has no leader to isolate")),
        }
        if self.chase.as_ref().is_some_and(|c| c.rounds_left == 0) {
            self.chase = None;
        }
        // This round's isolation lasts until the next round, or, after the last, as long again.
        self.hold_heal_past(next_round);
    }

    /// Keeps the current fault from healing before `at` (a chase's next round must come first).
    fn hold_heal_past(&mut self, at: Duration) {
        if let Some(heal_at) = &mut self.heal_at {
            *heal_at = (*heal_at).max(at + Duration::from_millis(1));
        }
    }

    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, trace: &mut dyn FnMut(String)) {
        self.chase = None;
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
        let others: Vec<NodeId> = (1..=self.nodes).filter(|o| *o != id).collect();
        self.split(sim, &[id], &others);
    }

    /// Cuts every link between the two sides.
    fn split(&mut self, sim: &mut turmoil::Sim<'_>, left: &[NodeId], right: &[NodeId]) {
        for a in left {
            for b in right {
                sim.partition(host_name(*a), host_name(*b));
            }
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
        match self.rng.random_range(0..(7 + self.crash_all_weight)) {
            0 => {
                let id = self.rng.random_range(1..=nodes);
                let mode = target.crash(sim, id);
                trace(format!("{now:?} crash n{id} ({mode:?})"));
                self.crashed.insert(id);
            }
            1 => {
                // A minority (one node of three; one or two of five) cut off from the majority.
                let mut ids: Vec<NodeId> = (1..=nodes).collect();
                ids.shuffle(&mut self.rng);
                let minority = self.rng.random_range(1..=(nodes - 1) / 2) as usize;
                let (small, large) = ids.split_at(minority);
                trace(format!("{now:?} partition {small:?} from {large:?}"));
                self.split(sim, small, large);
            }
            2 if self.rng.random_bool(0.5) => {
                let (a, b) = (self.rng.random_range(1..=nodes), self.rng.random_range(1..=nodes));
                if a != b {
                    trace(format!("{now:?} cut n{a} from n{b} one way"));
                    sim.partition_oneway(host_name(a), host_name(b));
                    self.partitioned = true;
                }
            }
            2 => {
                // Nothing a partition's leader sends reaches anyone, while it still hears the
                // others and the clients reach it: it can commit nothing, and cannot learn that
                // its followers elected another leader. The other half of the one-way cuts, so
                // that the mix of faults (and a run's cost) stays as it was.
                let index = self.rng.random_range(1..=self.partitions);
                if let Some(id) = target.leader(index) {
                    trace(format!(
                        "{now:?} cut the leader of partition {index}, n{id}, off one way (its messages are lost)"
                    ));
                    for other in (1..=nodes).filter(|o| *o != id) {
                        sim.partition_oneway(host_name(id), host_name(other));
                    }
                    self.partitioned = true;
                }
            }
            3 => {
                // A bridge: the others form two sides that cannot talk to each other; the bridge
                // talks to both.
                let bridge = self.rng.random_range(1..=nodes);
                let mut others: Vec<NodeId> = (1..=nodes).filter(|o| *o != bridge).collect();
                others.shuffle(&mut self.rng);
                let (left, right) = others.split_at(others.len() / 2);
                trace(format!("{now:?} bridge through n{bridge} between {left:?} and {right:?}"));
                self.split(sim, left, right);
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
            6 => {
                let index = self.rng.random_range(1..=self.partitions);
                if let Some(id) = target.leader(index) {
                    let rounds = self.rng.random_range(2..=5);
                    trace(format!("{now:?} isolate each leader of partition {index} in turn ({rounds} rounds): n{id}"));
                    self.isolate(sim, id);
                    let next_round = now + Duration::from_millis(self.rng.random_range(800..2_000));
                    self.chase = Some(Chase { index, rounds_left: rounds - 1, next_round, isolated: id, since: now });
                }
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
        self.chase = None;
        self.heal_at = None;
        trace("heal all".into());
    }
}
