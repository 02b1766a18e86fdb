#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// A `__delayed` partition without a runtime: appended records are replayed as the runtime
/// would, rescans included (read from this log).
#[derive(Default)]
struct Log {
    records: Vec<Record>,
    state: Timers,
}

impl Log {
    fn append(&mut self, records: &[TimerRecord]) -> Vec<u64> {
        let mut offsets = Vec::new();
        for r in records {
            let offset = self.records.len() as u64;
            let encoded = r.encode();
            self.records.push(encoded.clone());
            replay_one(&mut self.state, &self.records, offset, &encoded);
            offsets.push(offset);
        }
        offsets
    }
}

/// Replays one record into `state` and runs the rescan it asks for over `log`.
fn replay_one(state: &mut Timers, log: &[Record], offset: u64, record: &Record) {
    state.replay(offset, record).unwrap();
    for range in state.take_rescan() {
        for o in range {
            state.rescanned(o, &log[o as usize]).unwrap();
        }
    }
    state.rescan_done();
}

/// The records of a schedule that is not a retry.
fn new(s: Scheduling) -> Vec<TimerRecord> {
    match s {
        Scheduling::New(records) => records,
        Scheduling::Already { .. } => panic!("not a retry"),
    }
}

fn timer(at: i64) -> Timer {
    Timer { target: Tp::new("t", 0), deliver_at_ms: at, value: Some(at.to_string().into_bytes()), ..Timer::default() }
}

const T0: i64 = 1_700_000_000_000;

fn limits() -> TimerLimits {
    TimerLimits::default()
}

fn advance(log: &mut Log, now: i64) {
    if let Some(h) = log.state.advance(now, &limits()) {
        log.append(&[h]);
    }
}

fn fire_due(log: &mut Log, now: i64, spare: Option<i64>) -> FireOutput {
    let due: Vec<(u64, Timer)> = log
        .state
        .due(now, 1_000)
        .into_iter()
        .map(|d| match TimerRecord::decode(&log.records[d.id as usize]).unwrap() {
            TimerRecord::Scheduled(t) => (d.id, t),
            other => panic!("timer {} is {other:?}", d.id),
        })
        .collect();
    let (records, out) = log.state.fire(&due, |id| format!("0-{id}"), |_| 1 << 20, &limits(), now, spare).unwrap();
    log.append(&records);
    out
}

#[test]
fn near_timers_fire_once_when_due_and_far_ones_after_their_hour_loads() {
    let mut log = Log::default();
    advance(&mut log, T0);
    let near_at = T0 + 5_000;
    let far_at = T0 + 5 * HOUR_MS + 17;
    let ids = log.append(&log.state.schedule(vec![timer(near_at), timer(far_at)], 0, T0, &limits()).map(new).unwrap());
    assert_eq!(log.state.pending(), 2);
    assert_eq!(log.state.memory_entries(), 2, "one near entry and one count");
    assert!(log.state.due(near_at - 1, 10).is_empty(), "nothing before its time");
    let out = fire_due(&mut log, near_at, Some(7));
    assert_eq!(out.fired, vec![ids[0]]);
    assert!(out.used_spare_id);
    let (_, p) = log.state.publishes.iter().next().unwrap();
    assert_eq!((p.producer_id, p.sequence), (7, 0));
    assert!(p.headers.iter().any(|h| h.key == TIMER_ID_HEADER && h.value.as_deref() == Some(&b"0-1"[..])));
    assert!(fire_due(&mut log, near_at + 1, None).fired.is_empty(), "fired once");
    // The far one is only counted until the horizon passes its hour.
    assert!(log.state.due(far_at, 10).is_empty());
    for step in 1..=6 {
        advance(&mut log, T0 + step * HOUR_MS);
    }
    assert_eq!(log.state.due(far_at, 10), vec![DueTimer { id: ids[1], deliver_at_ms: far_at }]);
    assert_eq!(fire_due(&mut log, far_at, None).fired, vec![ids[1]]);
    assert_eq!(log.state.pending(), 0);
    assert_eq!(log.state.latest_fired_ms, far_at);
    // Both decisions wait for confirmation, in stamp order.
    let stamps: Vec<(i16, i32)> = log.state.publishes.keys().map(|(_, s)| *s).collect();
    assert_eq!(stamps, vec![(0, 0), (0, 1)]);
    let confirmed = log.state.confirm_published(&Tp::new("t", 0), (0, 1));
    log.append(&confirmed);
    assert!(log.state.publishes.is_empty());
}

#[test]
fn a_cancelled_timer_never_fires_near_or_far() {
    let mut log = Log::default();
    advance(&mut log, T0);
    let ids = log.append(
        &log.state.schedule(vec![timer(T0 + 1_000), timer(T0 + 3 * HOUR_MS)], 0, T0, &limits()).map(new).unwrap(),
    );
    for (id, at) in [(ids[0], T0 + 1_000), (ids[1], T0 + 3 * HOUR_MS)] {
        let records = log.state.cancel(id, &timer(at)).unwrap();
        log.append(&records);
        assert_eq!(log.state.cancel(id, &timer(at)), Ok(Vec::new()), "a retried cancel succeeds, recording nothing");
    }
    assert_eq!(log.state.pending(), 0);
    for step in 1..=4 {
        advance(&mut log, T0 + step * HOUR_MS);
    }
    assert!(log.state.due(i64::MAX, 10).is_empty());
    assert_eq!(log.state.memory_entries(), 2, "both cancellations remembered (for retries), nothing else");
    assert_eq!(log.state.cancel(ids[1], &timer(T0 + 3 * HOUR_MS)), Ok(Vec::new()), "also after its hour loaded");
    // A fired timer cannot be cancelled.
    let late = log.append(&log.state.schedule(vec![timer(T0 + 5 * HOUR_MS)], 0, T0, &limits()).map(new).unwrap())[0];
    advance(&mut log, T0 + 5 * HOUR_MS);
    assert_eq!(fire_due(&mut log, T0 + 5 * HOUR_MS, Some(3)).fired, vec![late]);
    assert_eq!(log.state.cancel(late, &timer(T0 + 5 * HOUR_MS)), Err(TimerError::NotPending(late)));
}

#[test]
fn delays_and_sizes_are_bounded() {
    let state = Timers::default();
    let too_far = timer(T0 + limits().delay_max_ms + 1);
    assert!(matches!(state.schedule(vec![too_far], 0, T0, &limits()), Err(TimerError::Invalid(_))));
    assert!(state.schedule(vec![timer(T0 + 365 * 24 * HOUR_MS)], 0, T0, &limits()).is_ok(), "a year is allowed");
    let mut big = timer(T0);
    big.value = Some(vec![0; limits().record_bytes_max + 1]);
    assert!(matches!(state.schedule(vec![big], 0, T0, &limits()), Err(TimerError::Invalid(_))));
    let full = TimerLimits { pending_max: 1, ..limits() };
    assert!(matches!(state.schedule(vec![timer(T0), timer(T0)], 0, T0, &full), Err(TimerError::Full(_))));
}

/// Timers spread from 1 s to 30 days: memory holds the ones within the horizon and a count per
/// (hour, chunk), not one entry per timer.
#[test]
fn memory_stays_bounded_with_timers_spread_over_thirty_days() {
    const TIMERS: u64 = 100_000;
    let mut log = Log::default();
    advance(&mut log, T0);
    let span = 30 * 24 * HOUR_MS;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut batch = Vec::new();
    for _ in 0..TIMERS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        batch.push(timer(T0 + 1_000 + (x % span as u64) as i64));
        if batch.len() == 1_000 {
            let records = log.state.schedule(std::mem::take(&mut batch), 0, T0, &limits()).map(new).unwrap();
            log.append(&records);
        }
    }
    assert_eq!(log.state.pending(), TIMERS);
    let entries = log.state.memory_entries();
    // ~100,000 × 70 min / 30 days ≈ 160 near, ≤ 721 hours × 2 chunks counted.
    assert!(entries < 2_500, "{entries} entries in memory for {TIMERS} timers");
    // Six hours later (the horizon moved 6 times), every timer due by then fires, none early.
    for step in 1..=6 {
        advance(&mut log, T0 + step * HOUR_MS);
    }
    let now = T0 + 6 * HOUR_MS;
    let due = log.state.due(now, usize::MAX);
    assert!(due.iter().all(|d| d.deliver_at_ms <= now));
    let expected = log
        .records
        .iter()
        .filter_map(|r| match TimerRecord::decode(r) {
            Ok(TimerRecord::Scheduled(t)) if t.deliver_at_ms <= now => Some(()),
            _ => None,
        })
        .count();
    assert_eq!(due.len(), expected);
}

/// A compaction keeps the timers in place and rewrites the rest: a replica that replays from
/// the floor (the trimmed log) plus the rewrite knows the same pending timers.
#[test]
fn a_replay_from_the_compaction_floor_knows_the_same_timers() {
    let mut log = Log::default();
    advance(&mut log, T0);
    let batch: Vec<Timer> = (0..50).map(|i| timer(T0 + i * 10 * 60_000)).collect();
    let ids = log.append(&log.state.schedule(batch, 0, T0, &limits()).map(new).unwrap());
    // Cancel a far one, fire what is due in the first 20 minutes.
    log.append(&log.state.cancel(ids[40], &timer(T0 + 400 * 60_000)).unwrap());
    fire_due(&mut log, T0 + 20 * 60_000, Some(1));
    let floor = log.state.compaction_floor(log.records.len() as u64);
    assert_eq!(floor, ids[3], "the first timer still pending holds the floor");
    let rewrite = Shard::live_records(&log.state, KEY);
    let mut trimmed: Vec<Record> = log.records.clone();
    trimmed.extend(rewrite);
    let mut replica = Timers::default();
    for (o, r) in trimmed.iter().enumerate().skip(floor as usize) {
        replay_one(&mut replica, &trimmed, o as u64, r);
    }
    for step in 1..=10 {
        let now = T0 + step * HOUR_MS;
        advance(&mut log, now);
        let h = log.state.advance(now, &limits());
        assert!(h.is_none());
        let record = TimerRecord::Horizon(log.state.horizon_ms).encode();
        trimmed.push(record.clone());
        let at = trimmed.len() as u64 - 1;
        replay_one(&mut replica, &trimmed, at, &record);
        assert_eq!(replica.due(now, usize::MAX), log.state.due(now, usize::MAX), "at hour {step}");
    }
    assert_eq!(replica.pending(), log.state.pending());
}

#[test]
fn records_round_trip_and_garbage_is_a_replay_error() {
    let p = Publisher { producer_id: 1, epoch: 2, next_sequence: 3, last_decided_ms: 4 };
    for r in [
        TimerRecord::Scheduled(timer(5)),
        TimerRecord::Cancelled(7, 8),
        TimerRecord::Fired(9, 10),
        TimerRecord::Horizon(11 * HOUR_MS),
        TimerRecord::Publisher(Tp::new("a", 1), Some(p)),
        TimerRecord::Publisher(Tp::new("a", 1), None),
        TimerRecord::Publish(Tp::new("a", 1), (2, 3), None),
        TimerRecord::Token(Token { token: 12, first: Some(13), count: 14, at_ms: 15 }),
        TimerRecord::Token(Token { token: 12, first: None, count: 14, at_ms: 15 }),
    ] {
        assert_eq!(TimerRecord::decode(&r.encode()).unwrap(), r);
    }
    let mut t = Timers::default();
    assert!(t.replay(0, &Record { key: b"zz".to_vec(), value: None }).is_err());
    assert!(t.replay(0, &Record { key: vec![SCHEDULED], value: Some(b"{".to_vec()) }).is_err());
}

/// A retried schedule (its answer was lost) is answered with the first attempt's ids, also
/// after a compaction rewrote the token; a token is forgotten after its window.
#[test]
fn a_retried_schedule_gets_its_first_ids_and_schedules_nothing() {
    let mut log = Log::default();
    advance(&mut log, T0);
    let first =
        log.append(&log.state.schedule(vec![timer(T0 + 1), timer(T0 + 2)], 42, T0, &limits()).map(new).unwrap());
    assert_eq!(first.len(), 3, "a token record, then the two timers");
    let retry = log.state.schedule(vec![timer(T0 + 1), timer(T0 + 2)], 42, T0 + 5, &limits()).unwrap();
    assert_eq!(retry, Scheduling::Already { first: first[1], count: 2 });
    assert_eq!(log.state.pending(), 2);

    let mut replica = Timers::default();
    for r in Shard::live_records(&log.state, KEY) {
        replica.replay(1_000, &r).unwrap();
    }
    assert_eq!(replica.scheduled_by(42), Some((first[1], 2)), "the rewrite keeps the token's ids");

    let later = T0 + TOKEN_WINDOW_MS + 1;
    log.append(&log.state.schedule(vec![timer(later + 1)], 43, later, &limits()).map(new).unwrap());
    assert_eq!(log.state.scheduled_by(42), None, "forgotten after its window");
    assert!(matches!(log.state.schedule(vec![timer(later)], 42, later, &limits()), Ok(Scheduling::New(_))));
}

#[test]
fn fired_records_are_sent_in_the_batches_they_were_decided_in() {
    let mut log = Log::default();
    advance(&mut log, T0);
    let at = T0 + 1_000;
    log.append(&log.state.schedule((0..5).map(|_| timer(at)).collect(), 0, T0, &limits()).map(new).unwrap());
    assert_eq!(fire_due(&mut log, at, Some(7)).fired.len(), 5);
    log.append(&log.state.schedule((0..3).map(|_| timer(at + 1)).collect(), 0, T0, &limits()).map(new).unwrap());
    assert_eq!(fire_due(&mut log, at + 1, None).fired.len(), 3);
    let sizes =
        |pending: Vec<publish::Pending>| -> Vec<usize> { publish::batches(pending).iter().map(Vec::len).collect() };
    use publish::Publishing as _;
    assert_eq!(sizes(log.state.pending_publishes(100)), vec![5, 3], "one batch per fire, per target");
    assert_eq!(log.state.pending_publishes(2).len(), 5, "a scan never stops inside a batch");
    let mut cut = log.state.pending_publishes(100);
    cut.remove(0);
    assert_eq!(sizes(cut), vec![3], "a batch missing its start is not sent");
    // Large records: a batch holds at most PUBLISH_BATCH_BYTES_MAX.
    let big = |at: i64| Timer { value: Some(vec![7; 600 << 10]), ..timer(at) };
    log.append(&log.state.schedule((0..3).map(|_| big(at + 2)).collect(), 0, T0, &limits()).map(new).unwrap());
    assert_eq!(fire_due(&mut log, at + 2, None).fired.len(), 3);
    assert_eq!(sizes(log.state.pending_publishes(100)), vec![5, 3, 1, 1, 1]);
    // Confirming a batch's last stamp confirms the batch.
    log.append(&log.state.confirm_published(&Tp::new("t", 0), (0, 4)));
    assert_eq!(sizes(log.state.pending_publishes(100)), vec![3, 1, 1, 1]);
}
