//! Scripted faults: one fault placed on purpose, where the nemesis draws it only now and then,
//! and a bound on how long the cluster may take to work around it. The sweep checks safety under
//! random faults; it cannot say "this must recover within N seconds" of a fault it rarely draws.
//!
//! `one_way_cut`: the leader of a partition keeps hearing from its followers and from the
//! clients, but nothing it sends reaches the followers. It cannot commit anything, the followers
//! elect a new leader among themselves, and the producer must find that leader within a few
//! election timeouts and its request timeout, long before the cut heals. Once it has healed,
//! every acknowledged record must be on every replica, and the node that was cut off must not
//! have forced an election on the others.
//!
//! turmoil completes a TCP handshake whatever the state of the link back (its SYN-ACK is not a
//! network message), so here the followers can always open connections to the cut leader and
//! their requests reach it: it hears of its successor, as it would not on a real network, where
//! only connections opened before the cut carry their requests. That a leader which hears
//! nobody steps down is tested in keel-raft (`t90_issue_12`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use keel_client::{Producer, ProducerRecord};
use keel_raft::{NodeId, RaftTimings};
use keel_storage::SimDisk;

use crate::broker::{
    Driver, EPOCH_SECS, Registry, Shared, State, TOPIC, WINDOW, broker_config, broker_main, client_config, complete,
    create_topic, drive, invoke, lagging, log, producer_config, wait_topic,
};
use crate::checker::{self, HighWatermarks, Op, Outcome};
use crate::nemesis::{NORMAL_LATENCY_MAX, freshest_leader, host_name};

/// Brokers in the scenario: the cut leader and the two followers that must replace it.
const NODES: u64 = 3;
/// The partition the producer writes to.
const PARTITION: u64 = 0;

/// Settings of the one-way cut scenario.
#[derive(Debug, Clone, Copy)]
pub struct OneWayCut {
    /// Acknowledged records before the cut: the cluster is up and the producer in its stride.
    pub warm_up_acks: usize,
    /// How long the leader's messages to its followers are dropped.
    pub cut: Duration,
    /// How long the producer keeps writing once the cut has healed.
    pub after: Duration,
    /// The first record committed after the cut must be acknowledged within this long.
    pub resume_bound: Duration,
    /// The brokers' raft timing.
    pub timings: RaftTimings,
}

impl Default for OneWayCut {
    fn default() -> OneWayCut {
        // Production's raft timing (a lease of 3 s), as where the stall was reported: with the
        // sweep's (600 ms) the producer of the seeds tried happened to come back to the cut
        // leader after it had heard of its successor, and followed its hint.
        let timings = RaftTimings::default();
        OneWayCut {
            warm_up_acks: 20,
            // Long enough to show a stall, and over (with `after`) before the brokers' first
            // round of preferred-leader balancing (10 election timeouts, 30 s, after they
            // start): a handover back to the cut node would change the term after the heal for
            // a good reason, and hide the bad one the check is for.
            cut: Duration::from_secs(20),
            after: Duration::from_secs(3),
            // A few election timeouts for the followers to elect a new leader and for the cut
            // one to stop passing itself off as leader, plus the client's request timeout (4 s)
            // for a request stuck on the cut leader.
            resume_bound: Duration::from_millis(3 * timings.election_max_ms + 4_000),
            timings,
        }
    }
}

/// What a one-way cut run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// The partition leader whose messages were cut.
    pub cut_leader: NodeId,
    /// When the cut began, in simulated time since the start.
    pub cut_at: Duration,
    /// How long after the cut began the producer heard of the first record that only a new
    /// leader could have committed (`None`: not before the cut healed).
    pub resumed_after: Option<Duration>,
    /// Acknowledgements received while the cut lasted.
    pub acked_during_cut: usize,
    /// Acknowledged records in all.
    pub acked: usize,
    /// Who led the partition when the cut healed, according to the node with the highest term.
    pub leader_at_heal: Option<NodeId>,
    /// The partition's highest term when the cut healed, and [`OneWayCut::after`] later: the
    /// node coming back must not force an election on the healthy majority.
    pub terms: (u64, u64),
}

/// When each acknowledgement arrived (simulated time since the start), with its offset.
type Acks = Rc<RefCell<Vec<(Duration, u64)>>>;

/// One producer writing unique values `c-{n}` to [`PARTITION`] every 10 ms, at most [`WINDOW`]
/// unresolved, until `stop`; every outcome goes into the history and every acknowledgement into
/// `acks` the moment it arrives.
async fn producer_main(
    seed: u64,
    state: Shared,
    disks: Vec<SimDisk>,
    acks: Acks,
    stop: Rc<Cell<bool>>,
) -> turmoil::Result {
    wait_topic(&state).await;
    // Long enough to retry through the whole cut: a record is acknowledged, or its outcome is
    // unknown, but it does not fail for want of patience.
    let producer = Producer::new(client_config(seed, NODES), producer_config(Duration::from_secs(60), true, None))?;
    let mut unresolved = FuturesUnordered::new();
    let mut next_send = tokio::time::Instant::now();
    let mut n = 0u64;
    while !stop.get() {
        tokio::select! {
            biased;
            Some((index, result)) = unresolved.next(), if !unresolved.is_empty() => {
                complete(&state, &disks, index, &result);
                if let Ok(stored) = &result {
                    acks.borrow_mut().push((turmoil::sim_elapsed().unwrap_or_default(), stored.offset));
                }
            }
            () = tokio::time::sleep_until(next_send), if unresolved.len() < WINDOW => {
                let value = format!("c-{n}");
                n += 1;
                let index = invoke(&state, PARTITION, &value);
                let record = ProducerRecord::new(value.clone().into_bytes()).with_partition(PARTITION as u32);
                match producer.send(TOPIC, record).await {
                    Ok(delivery) => unresolved.push(async move { (index, delivery.await) }),
                    Err(e) => {
                        log(&state, format!("{value} not queued: {e}"));
                        state.borrow_mut().history[index].outcome = Some(Outcome::Fail);
                    }
                }
                next_send = tokio::time::Instant::now() + Duration::from_millis(10);
            }
        }
    }
    while let Some((index, result)) = unresolved.next().await {
        complete(&state, &disks, index, &result);
    }
    producer.close().await;
    state.borrow_mut().producers_done += 1;
    Ok(())
}

/// Traces how each node sees the partition's leadership.
fn trace_views(registry: &Registry, group: keel_raft::GroupId, trace: &mut dyn FnMut(String)) {
    for (id, (_, broker)) in registry.borrow().iter() {
        if let Ok(m) = broker.raft_node().metrics(group) {
            let view = format!("{:?} in term {}, leader {:?}", m.state, m.current_term, m.current_leader);
            trace(format!("n{id} sees partition {PARTITION} as: {view}"));
        }
    }
}

/// Steps the simulation until `until` (simulated time since the start).
fn run_until(sim: &mut turmoil::Sim<'_>, ctx: &mut Driver<'_>, until: Duration) -> Result<(), String> {
    let reached = Cell::new(false);
    drive(sim, ctx, until + Duration::from_secs(1), |_| reached.get(), |_, now, _| reached.set(now >= until))
}

/// Runs the one-way cut scenario for `seed`; an error names the broken invariant or the missed
/// bound.
pub fn run_one_way_cut(seed: u64, settings: OneWayCut, trace: &mut dyn FnMut(String)) -> Result<CutReport, String> {
    run(seed, settings, trace).map_err(|violation| format!("seed {seed}: {violation}"))
}

fn run(seed: u64, settings: OneWayCut, trace: &mut dyn FnMut(String)) -> Result<CutReport, String> {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(settings.cut + settings.after + Duration::from_secs(300))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(NORMAL_LATENCY_MAX)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .rng_seed(seed)
        .build();
    let disks: Vec<SimDisk> = (1..=NODES).map(|id| SimDisk::new(seed.wrapping_mul(31).wrapping_add(id))).collect();
    let registry: Registry = Rc::new(RefCell::new(BTreeMap::new()));
    let state: Shared = Rc::new(RefCell::new(State::new(NODES, NODES)));
    for id in 1..=NODES {
        let (disk, registry) = (disks[(id - 1) as usize].clone(), Rc::clone(&registry));
        sim.host(host_name(id), move || {
            // Nobody crashes here: every host runs one boot.
            let seed = seed ^ (id << 32) ^ (1 << 48);
            let mut config = broker_config(id, seed);
            config.timings = settings.timings;
            broker_main(
                config,
                1,
                disk.clone(),
                Default::default(),
                Default::default(),
                Rc::clone(&registry),
                Default::default(),
            )
        });
    }
    {
        let (state, registry) = (Rc::clone(&state), Rc::clone(&registry));
        sim.client("admin", async move { create_topic(seed ^ 0xad, &state, &registry).await });
    }
    let acks: Acks = Rc::default();
    let stop = Rc::new(Cell::new(false));
    let producer = producer_main(seed ^ 0x9d, Rc::clone(&state), disks.clone(), Rc::clone(&acks), Rc::clone(&stop));
    sim.client("producer", producer);
    // turmoil ends a run when its last client does: this one lasts until the checks are done.
    let checked = Rc::new(Cell::new(false));
    let until_checked = Rc::clone(&checked);
    sim.client("keeper", async move {
        while !until_checked.get() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    });

    let mut ctx = Driver {
        state: &state,
        registry: &registry,
        disks: &disks,
        trace,
        high_watermarks: HighWatermarks::default(),
        next_sample: Duration::ZERO,
    };
    let warm = drive(
        &mut sim,
        &mut ctx,
        Duration::from_secs(60),
        |_| acks.borrow().len() >= settings.warm_up_acks,
        |_, _, _| {},
    );
    warm.map_err(|e| format!("warm-up: {e}"))?;

    let group = state.borrow().groups.get(&PARTITION).copied().ok_or("the topic has no partition 0")?;
    let leader_now =
        || freshest_leader(registry.borrow().values().filter_map(|(_, b)| b.raft_node().metrics(group).ok()));
    let leader = leader_now().ok_or("partition 0 has no leader after the warm-up")?;
    let followers: Vec<NodeId> = (1..=NODES).filter(|id| *id != leader).collect();
    // Only records at or past every follower's log end when the cut begins can be committed by
    // a new leader alone: the cut one can still commit what a follower already holds.
    let fresh_from = followers
        .iter()
        .filter_map(|id| registry.borrow().get(id).and_then(|(_, b)| b.raft_node().store(group).ok()))
        .map(|store| store.positions().2.offset)
        .max()
        .unwrap_or(0);
    for f in &followers {
        sim.partition_oneway(host_name(leader), host_name(*f));
    }
    let cut_at = sim.elapsed();
    (ctx.trace)(format!("{cut_at:?} cut n{leader} off from {followers:?} one way (its messages are dropped)"));
    let acked_before = acks.borrow().len();

    run_until(&mut sim, &mut ctx, cut_at + settings.cut).map_err(|e| format!("during the cut: {e}"))?;
    let leader_at_heal = leader_now();
    let term_now = || {
        let registry = registry.borrow();
        registry.values().filter_map(|(_, b)| b.raft_node().metrics(group).ok()).map(|m| m.current_term).max()
    };
    let term_at_heal = term_now().unwrap_or(0);
    trace_views(&registry, group, &mut *ctx.trace);
    for f in &followers {
        sim.repair_oneway(host_name(leader), host_name(*f));
    }
    let healed_at = sim.elapsed();
    (ctx.trace)(format!("{healed_at:?} cut healed; partition {PARTITION} led by {leader_at_heal:?}"));
    let acked_during_cut = acks.borrow().len() - acked_before;

    run_until(&mut sim, &mut ctx, healed_at + settings.after).map_err(|e| format!("after the cut: {e}"))?;
    trace_views(&registry, group, &mut *ctx.trace);
    let term_after = term_now().unwrap_or(0);
    stop.set(true);
    let limit = sim.elapsed() + Duration::from_secs(90);
    drive(&mut sim, &mut ctx, limit, |s| s.producers_done == 1, |_, _, _| {})
        .map_err(|e| format!("the producer did not finish: {e}"))?;
    // Every replica must catch up before their logs are compared.
    let limit = sim.elapsed() + Duration::from_secs(30);
    let converged = |_: &State| lagging(&state, &registry).is_empty();
    drive(&mut sim, &mut ctx, limit, converged, |_, _, _| {})
        .map_err(|e| format!("no convergence after the cut: {e}: {}", lagging(&state, &registry).join("; ")))?;

    check(&state.borrow(), &registry, group)?;
    checked.set(true);
    let resumed_after = acks
        .borrow()
        .iter()
        .find(|(at, offset)| *at > cut_at && *offset >= fresh_from)
        .map(|(at, _)| *at - cut_at)
        .filter(|after| *after < settings.cut);
    let report = CutReport {
        cut_leader: leader,
        cut_at,
        resumed_after,
        acked_during_cut,
        acked: acks.borrow().len(),
        leader_at_heal,
        terms: (term_at_heal, term_after),
    };
    (ctx.trace)(format!("{report:?}"));
    if term_after != term_at_heal {
        return Err(format!("the partition went from term {term_at_heal} to {term_after} once n{leader} was back"));
    }
    match report.resumed_after {
        Some(after) if after <= settings.resume_bound => Ok(report),
        Some(after) => Err(format!(
            "produce resumed {after:?} after n{leader} was cut off one way, later than {:?}",
            settings.resume_bound
        )),
        None => Err(format!("produce stalled for the whole {:?} that n{leader} was cut off one way", settings.cut)),
    }
}

/// No acknowledged record lost, no failed record read, replicas agreeing, and nothing the run
/// itself caught (an ack without a durable quorum, a high watermark going back).
fn check(state: &State, registry: &Registry, group: keel_raft::GroupId) -> Result<(), String> {
    if let Some(first) = state.violations.first() {
        return Err(format!("{first} ({} found during the run)", state.violations.len()));
    }
    let ops: Vec<&Op> = state.history.iter().filter(|o| o.partition == PARTITION).collect();
    let mut replicas = BTreeMap::new();
    for (id, (_, broker)) in registry.borrow().iter() {
        let records = checker::read_committed(broker.raft_node(), group).map_err(|e| format!("n{id}: {e}"))?;
        checker::check_no_lost_write(PARTITION, &ops, &records).map_err(|e| format!("n{id}: {e}"))?;
        checker::check_no_aborted_reads(PARTITION, &ops, &records).map_err(|e| format!("n{id}: {e}"))?;
        replicas.insert(*id, records);
    }
    checker::check_replicas_agree(PARTITION, &replicas)
}
