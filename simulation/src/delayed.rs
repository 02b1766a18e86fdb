//! Delayed records in the broker workload: a client schedules records for `sim-delayed` at
//! times up to ten seconds ahead (by the simulation's true clock), cancels some of them, and
//! reads the topic all along, while the nemesis acts and the brokers' wall clocks are stepped
//! forward and back ([`ClockSteps`]). Invariants: no delayed record is visible before its time
//! (checked as each is read, against the true clock); after healing, every acknowledged one
//! that was not cancelled is visible within a bound; none is visible twice; one whose cancel was
//! acknowledged never is.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keel_client::{ClientError, Consumer, ConsumerConfig, DeliverAt, Offset, Producer, ProducerRecord};
use keel_raft::NodeId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::broker::{Shared, client_config, log, producer_config, wait_topic};

/// The target topic of the delayed records.
pub(crate) const TOPIC: &str = "sim-delayed";
/// Its partitions.
pub(crate) const PARTITIONS: u32 = 2;
/// The longest delay asked for.
const DELAY_MAX_MS: i64 = 10_000;

/// What happened to one delayed record.
#[derive(Debug, Clone, Default)]
struct Sent {
    /// When it is due (true clock, ms since the epoch).
    due: i64,
    /// The produce's outcome: `Some(true)` acknowledged, `Some(false)` refused, `None` unknown.
    acked: Option<bool>,
    /// A cancel's outcome: `Some(true)` acknowledged, `Some(false)` refused as not pending.
    cancelled: Option<bool>,
    /// A cancel was sent and its outcome is unknown: the client's retries may have cancelled it
    /// before the error it gave up with (seeds 69 and 153), so delivery is allowed, not owed.
    cancel_unknown: bool,
}

/// The delayed client's view.
#[derive(Debug, Default)]
pub(crate) struct DelayedView {
    sent: BTreeMap<String, Sent>,
    /// Where each value was read: (partition, offset).
    seen: BTreeMap<String, BTreeSet<(u32, u64)>>,
    /// The consumer stops (the check after healing is done).
    stop: bool,
    /// Schedules acknowledged, cancels acknowledged, records read.
    pub(crate) counts: (u64, u64, u64),
}

/// The true time: turmoil's clock, which no step moves.
fn true_now_ms() -> i64 {
    turmoil::since_epoch().map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Schedules (and sometimes cancels) delayed records until `until`, and reads `sim-delayed`
/// until told to stop.
pub(crate) async fn delayed_main(seed: u64, until: Duration, state: Shared) -> turmoil::Result {
    wait_topic(&state).await;
    let nodes = state.borrow().nodes;
    let producer = Producer::new(client_config(seed, nodes), producer_config(Duration::from_secs(10), true, None))?;
    let consumer = consume(seed, Rc::clone(&state));
    let schedule = async {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xde1a);
        for n in 0.. {
            if turmoil::sim_elapsed().unwrap_or_default() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
            let value = format!("d{n}");
            let due = true_now_ms() + rng.random_range(0..=DELAY_MAX_MS);
            let partition = rng.random_range(0..PARTITIONS);
            state.borrow_mut().delayed.sent.insert(value.clone(), Sent { due, ..Sent::default() });
            let record = ProducerRecord::new(value.clone().into_bytes()).with_partition(partition);
            let outcome = producer.send_delayed(TOPIC, vec![record], DeliverAt::AtMs(due)).await;
            let ids = match outcome {
                Ok(ids) => {
                    log(&state, format!("{value} scheduled for {due} as {ids:?}"));
                    let mut s = state.borrow_mut();
                    s.delayed.counts.0 += 1;
                    if let Some(sent) = s.delayed.sent.get_mut(&value) {
                        sent.acked = Some(true);
                    }
                    ids
                }
                Err(e) => {
                    log(&state, format!("{value} not scheduled: {e}"));
                    if !e.is_ambiguous()
                        && let Some(sent) = state.borrow_mut().delayed.sent.get_mut(&value)
                    {
                        sent.acked = Some(false);
                    }
                    continue;
                }
            };
            if due - true_now_ms() > 2_000 && rng.random_ratio(1, 4) {
                let Some(id) = ids.first() else { continue };
                let cancelled = match producer.cancel_delayed(id).await {
                    Ok(_) => Some(true),
                    Err(ClientError::FailedPrecondition(_)) => Some(false),
                    Err(e) => {
                        log(&state, format!("{value}: cancel of {id}: {e}"));
                        None
                    }
                };
                log(&state, format!("{value}: cancel of {id}: {cancelled:?}"));
                let mut s = state.borrow_mut();
                if cancelled == Some(true) {
                    s.delayed.counts.1 += 1;
                }
                if let Some(sent) = s.delayed.sent.get_mut(&value) {
                    sent.cancelled = cancelled;
                    sent.cancel_unknown = cancelled.is_none();
                }
            }
        }
        producer.close().await;
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let (scheduled, consumed) = tokio::join!(schedule, consumer);
    scheduled?;
    consumed
}

/// Reads `sim-delayed` from the beginning until told to stop; a record read before its time is a
/// violation at once.
async fn consume(seed: u64, state: Shared) -> turmoil::Result {
    let config = ConsumerConfig {
        fetch_bytes_max: 64 << 10,
        fetch_wait_max: Duration::from_millis(500),
        offset_default: Offset::Beginning,
    };
    let nodes = state.borrow().nodes;
    let mut consumer = Consumer::new(client_config(seed ^ 0xc0, nodes), config)?;
    while consumer.assign(TOPIC, &[]).await.is_err() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    while !state.borrow().delayed.stop {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => {
                let now = true_now_ms();
                for r in records {
                    let value = crate::checker::text(r.value.as_deref());
                    next.insert(r.partition, r.offset + 1);
                    let due = r
                        .headers
                        .iter()
                        .find(|(k, _)| k == keel_client::DELIVER_AT_HEADER)
                        .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse::<i64>().ok());
                    let mut s = state.borrow_mut();
                    s.delayed.counts.2 += 1;
                    match due {
                        Some(due) if now < due => s.violations.push(format!(
                            "delayed record {value} visible at {now}, {} ms before its time {due}",
                            due - now
                        )),
                        Some(_) => {}
                        None => s.violations.push(format!("delayed record {value} has no deliver-at header")),
                    }
                    s.delayed.seen.entry(value).or_default().insert((r.partition, r.offset));
                }
            }
            Err(e) => {
                log(&state, format!("delayed consumer: poll: {e}; re-subscribing"));
                for p in 0..PARTITIONS {
                    consumer.seek(TOPIC, p, Offset::At(next.get(&p).copied().unwrap_or(0)))?;
                }
            }
        }
    }
    Ok(())
}

/// After healing: every acknowledged delayed record that was not cancelled (nor possibly
/// cancelled) becomes visible within `bound`; then none was visible twice and none whose cancel was acknowledged was.
pub(crate) async fn converge(state: &Shared, bound: Duration) -> Result<(), String> {
    let missing = || -> Vec<String> {
        let s = state.borrow();
        let mut out: Vec<String> = s
            .delayed
            .sent
            .iter()
            .filter(|(v, sent)| {
                sent.acked == Some(true)
                    && sent.cancelled != Some(true)
                    && !sent.cancel_unknown
                    && !s.delayed.seen.contains_key(*v)
            })
            .map(|(v, sent)| format!("{v} (due {})", sent.due))
            .collect();
        out.truncate(5);
        out
    };
    crate::broker::within(bound, "acknowledged delayed records are missing", missing).await?;
    let mut s = state.borrow_mut();
    s.delayed.stop = true;
    for (value, at) in &s.delayed.seen {
        if at.len() > 1 {
            return Err(format!("delayed record {value} delivered twice: at {at:?}"));
        }
        match s.delayed.sent.get(value) {
            Some(sent) if sent.cancelled == Some(true) => {
                return Err(format!("delayed record {value} delivered at {at:?} although its cancel was acknowledged"));
            }
            Some(_) => {}
            None => return Err(format!("{value} in {TOPIC} was never sent")),
        }
    }
    let counts = s.delayed.counts;
    drop(s);
    log(state, format!("delayed records: {counts:?} (scheduled, cancelled, read)"));
    Ok(())
}

/// The brokers' wall clocks, stepped forward and back by the driver: a step lasts a few seconds,
/// on one node at a time, as an NTP correction would; a node boots with a true clock.
pub(crate) struct ClockSteps {
    rng: ChaCha8Rng,
    /// Each node's offset from the true clock, in ms (what its `Clock` adds).
    pub(crate) skews: BTreeMap<NodeId, Arc<AtomicI64>>,
    next_at: Duration,
    active: Option<(NodeId, Duration)>,
}

impl ClockSteps {
    /// Steps drawn from `seed` over `nodes` nodes.
    pub(crate) fn new(seed: u64, nodes: u64) -> ClockSteps {
        ClockSteps {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xc10c),
            skews: (1..=nodes).map(|id| (id, Arc::new(AtomicI64::new(0)))).collect(),
            next_at: Duration::from_secs(10),
            active: None,
        }
    }

    /// Called between simulation steps: ends the current step when its time is up, and starts
    /// the next one when it is due.
    pub(crate) fn step(&mut self, now: Duration, trace: &mut dyn FnMut(String)) {
        if let Some((id, until)) = self.active
            && now >= until
        {
            self.skews[&id].store(0, Ordering::Relaxed);
            trace(format!("{now:?} clock of n{id} back to true time"));
            self.active = None;
            self.next_at = now + Duration::from_millis(self.rng.random_range(4_000..15_000));
        }
        if self.active.is_none() && now >= self.next_at {
            let id = self.rng.random_range(1..=self.skews.len() as u64);
            let by = self.rng.random_range(5_000..30_000) * if self.rng.random_bool(0.5) { 1 } else { -1 };
            let lasting = Duration::from_millis(self.rng.random_range(3_000..12_000));
            self.skews[&id].store(by, Ordering::Relaxed);
            trace(format!("{now:?} clock of n{id} stepped by {by} ms for {lasting:?}"));
            self.active = Some((id, now + lasting));
        }
    }

    /// Every clock back to true time.
    pub(crate) fn heal(&mut self) {
        for skew in self.skews.values() {
            skew.store(0, Ordering::Relaxed);
        }
        self.active = None;
    }
}
