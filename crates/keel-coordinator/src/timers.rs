//! Delayed and scheduled messages as a pure shard of one `__delayed` partition (DESIGN.md,
//! "Delayed and scheduled messages"). A delayed record is a `Scheduled` record of the partition,
//! acknowledged like any produce; its id is its offset there. The log is the durable index: the
//! shard keeps in memory only the timers that fall before its *horizon* (a whole hour, advanced
//! by `Horizon` records as time passes: about an hour ahead), 16 bytes each, and of every later
//! timer only a count per (hour, chunk of offsets). When a `Horizon` record moves past an hour,
//! the chunks holding that hour's timers are read again ([`Shard::take_rescan`]) and its timers
//! enter memory — so a million timers spread over 30 days cost the few thousand due within the
//! hour and a few KiB of counts, not a million entries.
//!
//! Firing is a publish decision ([`crate::publish`]) recorded with a `Fired` marker in one
//! batch: a timer fires once however often the runtime that sends it fails over. Cancelling is
//! a `Cancelled` record; one of a timer beyond the horizon is remembered (and rewritten by each
//! compaction) until its hour loads, so that it is dropped then.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::groups::Tp;
use crate::publish::{self, Publish, PublishHeader, Publisher};
use crate::{Record, ReplayError, Shard};

/// One hour in milliseconds: the unit of the horizon and of the far timers' counts.
pub const HOUR_MS: i64 = 3_600_000;
/// Offsets per chunk: the unit in which far timers are counted and read again.
pub const CHUNK_RECORDS: u64 = 1 << 16;
/// The lock key of every timer operation (one shard, one state).
pub const KEY: &str = "timers";

/// How long a schedule's request token is remembered: a retry within it gets the first
/// attempt's timer ids instead of scheduling again.
pub const TOKEN_WINDOW_MS: i64 = 15 * 60_000;
/// Request tokens remembered at most (the oldest go first): 40 bytes each.
pub const TOKENS_MAX: usize = 100_000;
/// Cancelled timers remembered at most, so that a retried cancel is answered "cancelled" rather
/// than "not pending" (the earliest due go first; each also goes once timers due a window after
/// it have fired).
pub const RECENT_CANCELS_MAX: usize = 100_000;
/// Bytes of fired records sent to one target in one batch (more start another batch).
pub const PUBLISH_BATCH_BYTES_MAX: usize = 1 << 20;
/// What a fired record is counted beyond its key, value and headers: the two headers it gets
/// and its framing, rounded up.
pub const RECORD_OVERHEAD_BYTES: usize = 128;
/// What a batch is counted beyond its records (its header, rounded up).
pub const BATCH_OVERHEAD_BYTES: usize = 128;

/// Header a fired record carries: its timer's id (`<__delayed partition>-<offset>`).
pub const TIMER_ID_HEADER: &str = "keel-timer-id";
/// Header a fired record carries: the time it was due (ms since the epoch).
pub const DELIVER_AT_HEADER: &str = "keel-deliver-at-ms";

/// Bounds of the timers shard, checked before anything is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerLimits {
    /// The longest delay a produce may ask for (at least a year by default).
    pub delay_max_ms: i64,
    /// How far ahead of now the horizon reaches at least (it is then rounded up to an hour).
    pub horizon_ms: i64,
    /// Timers pending in one `__delayed` partition.
    pub pending_max: u64,
    /// Bytes of one delayed record (key, value, headers).
    pub record_bytes_max: usize,
    /// Publishing bounds (decisions awaiting confirmation; publisher idle rotation).
    pub publish: publish::Bounds,
}

impl Default for TimerLimits {
    fn default() -> TimerLimits {
        TimerLimits {
            delay_max_ms: 366 * 24 * HOUR_MS,
            horizon_ms: 10 * 60_000,
            pending_max: 50_000_000,
            record_bytes_max: 1 << 20,
            publish: publish::Bounds { publishes_max: 10_000, publisher_idle_ms: HOUR_MS },
        }
    }
}

/// A delayed record as its `Scheduled` record holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Where it goes when due.
    pub target: Tp,
    /// When it is due (ms since the epoch, the coordinator's clock).
    pub deliver_at_ms: i64,
    /// The record's key.
    #[serde(with = "crate::publish::b64", default)]
    pub key: Option<Vec<u8>>,
    /// The record's value.
    #[serde(with = "crate::publish::b64", default)]
    pub value: Option<Vec<u8>>,
    /// Its headers.
    pub headers: Vec<PublishHeader>,
}

impl Timer {
    fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len)).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers
    }
}

/// What one record of `__delayed` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerRecord {
    /// A delayed record; its offset is its id.
    Scheduled(Timer),
    /// The timer at this offset, due then, is cancelled.
    Cancelled(u64, i64),
    /// The timer at this offset, due then, fired (its publish decision is in the same batch).
    Fired(u64, i64),
    /// Timers due before this time are held in memory from here on.
    Horizon(i64),
    /// The publisher identity for a target partition; `None` removes it.
    Publisher(Tp, Option<Publisher>),
    /// A publish decision for a target partition; `None` confirms it.
    Publish(Tp, (i16, i32), Option<Publish>),
    /// A schedule's request token: the timers it scheduled (the records right after this one
    /// when `first` is `None`).
    Token(Token),
}

/// A schedule's request token and the timers it scheduled, so that a retry of the same request
/// (its answer was lost) is answered with them rather than scheduling the records twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The client's token (random, the same on every retry of one request).
    pub token: u64,
    /// The first timer's id; `None`: the offset after the token record's own.
    #[serde(default)]
    pub first: Option<u64>,
    /// How many timers, at consecutive offsets.
    pub count: u32,
    /// When it was scheduled (coordinator clock): it is forgotten `TOKEN_WINDOW_MS` later.
    pub at_ms: i64,
}

const SCHEDULED: u8 = b's';
const CANCELLED: u8 = b'x';
const FIRED: u8 = b'f';
const HORIZON: u8 = b'h';
const PUBLISHER: u8 = b'p';
const PUBLISH: u8 = b'd';
const TOKEN: u8 = b't';

fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings, integers and lists cannot fail to serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

#[derive(Serialize, Deserialize)]
struct DueAt {
    deliver_at_ms: i64,
}

impl TimerRecord {
    /// Encodes it as a key/value record.
    pub fn encode(&self) -> Record {
        let tp = |tp: &Tp| [tp.topic.clone(), tp.partition.to_string()];
        match self {
            TimerRecord::Scheduled(t) => Record { key: vec![SCHEDULED], value: Some(json(t)) },
            TimerRecord::Cancelled(id, at) => Record {
                key: key(CANCELLED, &[&format!("{id:020}")]),
                value: Some(json(&DueAt { deliver_at_ms: *at })),
            },
            TimerRecord::Fired(id, at) => {
                Record { key: key(FIRED, &[&format!("{id:020}")]), value: Some(json(&DueAt { deliver_at_ms: *at })) }
            }
            TimerRecord::Horizon(until) => Record { key: vec![HORIZON], value: Some(json(until)) },
            TimerRecord::Publisher(target, p) => {
                let [t, n] = tp(target);
                Record { key: key(PUBLISHER, &[&t, &n]), value: p.as_ref().map(json) }
            }
            TimerRecord::Publish(target, (epoch, sequence), p) => {
                let [t, n] = tp(target);
                let stamp = format!("{epoch:05}.{sequence:010}");
                Record { key: key(PUBLISH, &[&t, &n, &stamp]), value: p.as_ref().map(json) }
            }
            TimerRecord::Token(t) => Record { key: key(TOKEN, &[&format!("{:020}", t.token)]), value: Some(json(t)) },
        }
    }

    /// Decodes a key/value record.
    pub fn decode(record: &Record) -> Result<TimerRecord, String> {
        let (&kind, rest) = record.key.split_first().ok_or("empty key")?;
        let text = std::str::from_utf8(rest).map_err(|_| "key is not UTF-8".to_owned())?;
        let parts: Vec<&str> = text.strip_prefix('\0').map(|t| t.splitn(4, '\0').collect()).unwrap_or_default();
        let value = || record.value.as_deref().ok_or_else(|| "no value".to_owned());
        fn parse<T: for<'a> Deserialize<'a>>(v: &[u8]) -> Result<T, String> {
            serde_json::from_slice(v).map_err(|e| format!("bad value: {e}"))
        }
        let number = |s: &str| s.parse::<u64>().map_err(|_| format!("bad number {s:?}"));
        let tp = |t: &str, p: &str| -> Result<Tp, String> {
            Ok(Tp::new(t, p.parse::<u32>().map_err(|_| format!("bad partition {p:?}"))?))
        };
        match (kind, parts.as_slice()) {
            (SCHEDULED, []) => Ok(TimerRecord::Scheduled(parse(value()?)?)),
            (CANCELLED, [id]) => Ok(TimerRecord::Cancelled(number(id)?, parse::<DueAt>(value()?)?.deliver_at_ms)),
            (FIRED, [id]) => Ok(TimerRecord::Fired(number(id)?, parse::<DueAt>(value()?)?.deliver_at_ms)),
            (HORIZON, []) => Ok(TimerRecord::Horizon(parse(value()?)?)),
            (PUBLISHER, [t, p]) => {
                Ok(TimerRecord::Publisher(tp(t, p)?, record.value.as_deref().map(parse).transpose()?))
            }
            (PUBLISH, [t, p, stamp]) => {
                let (e, s) = stamp.split_once('.').ok_or_else(|| format!("bad stamp {stamp:?}"))?;
                let stamp = (e.parse().map_err(|_| "bad epoch")?, s.parse().map_err(|_| "bad sequence")?);
                Ok(TimerRecord::Publish(tp(t, p)?, stamp, record.value.as_deref().map(parse).transpose()?))
            }
            (TOKEN, [_]) => Ok(TimerRecord::Token(parse(value()?)?)),
            _ => Err(format!("unknown key kind {kind} with {} parts", parts.len())),
        }
    }
}

/// Why a timer operation was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    /// Bad input (a delay above the maximum, a record too large).
    #[error("{0}")]
    Invalid(String),
    /// The timer already fired (or never existed).
    #[error("timer {0} is not pending: it was delivered (or never scheduled)")]
    NotPending(u64),
    /// As many timers are pending as the partition may hold, or as many fired records wait to
    /// be published.
    #[error("{0}; retry later")]
    Full(String),
    /// A fired record needs a publisher for a new target partition and no producer id was given.
    #[error("the timers coordinator needs a producer id to publish; retry")]
    ProducerIdNeeded,
}

/// Timers of one `__delayed` partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timers {
    /// Timers due before this (a whole hour) are in `near`.
    pub horizon_ms: i64,
    /// Pending timers in memory: (due time, id).
    near: BTreeSet<(i64, u64)>,
    /// Pending timers beyond the horizon, counted per (hour, chunk of offsets), with the lowest
    /// offset among them (the compaction floor).
    far: BTreeMap<(i64, u64), (u64, u64)>,
    /// Cancelled timers beyond the horizon (id → due time), dropped when their hour loads.
    cancelled_far: BTreeMap<u64, i64>,
    /// The hours a rescan is loading, and the ranges still to read.
    loading: BTreeSet<i64>,
    rescan: Vec<Range<u64>>,
    /// The latest due time fired: the runtime never fires below it (a clock that jumped back).
    pub latest_fired_ms: i64,
    /// Publisher identity per target partition.
    pub publishers: BTreeMap<Tp, Publisher>,
    /// Fired records not yet confirmed in their target, in stamp order.
    pub publishes: BTreeMap<(Tp, (i16, i32)), Publish>,
    /// Timers cancelled within the horizon, remembered for a retried cancel: (due time, id).
    recent_cancels: BTreeSet<(i64, u64)>,
    /// Request tokens of recent schedules: token → (first id, count, when).
    tokens: BTreeMap<u64, (u64, u32, i64)>,
    /// The same tokens by time, oldest first (what is forgotten first).
    tokens_by_time: BTreeSet<(i64, u64)>,
}

fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// The first whole hour at or after `ms`.
fn ceil_hour(ms: i64) -> i64 {
    let h = hour_of(ms);
    if ms.rem_euclid(HOUR_MS) == 0 { h * HOUR_MS } else { (h + 1).saturating_mul(HOUR_MS) }
}

/// What a schedule appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheduling {
    /// These records: a `Token` first when the request had one, then one `Scheduled` per timer.
    New(Vec<TimerRecord>),
    /// Nothing: a retry of a request that scheduled these timers.
    Already {
        /// The first timer's id.
        first: u64,
        /// How many (consecutive ids).
        count: u32,
    },
}

/// A timer due now, for the runtime to read and fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueTimer {
    /// Its id (offset).
    pub id: u64,
    /// When it was due.
    pub deliver_at_ms: i64,
}

/// What a fire operation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FireOutput {
    /// Timers fired now.
    pub fired: Vec<u64>,
    /// Timers left for another round (a second new target needed another producer id).
    pub deferred: Vec<u64>,
    /// Whether the spare producer id was used.
    pub used_spare_id: bool,
}

impl Timers {
    /// Timers pending (in memory and beyond the horizon, cancelled ones not yet dropped
    /// excluded).
    pub fn pending(&self) -> u64 {
        let far: u64 = self.far.values().map(|(count, _)| count).sum();
        (self.near.len() as u64 + far).saturating_sub(self.cancelled_far.len() as u64)
    }

    /// Entries held in memory: what a pending timer costs is this over [`Timers::pending`].
    pub fn memory_entries(&self) -> usize {
        self.near.len() + self.far.len() + self.cancelled_far.len() + self.recent_cancels.len()
    }

    /// Applies one decoded record at `offset`.
    fn apply(&mut self, offset: u64, record: TimerRecord) {
        match record {
            TimerRecord::Scheduled(t) => {
                if t.deliver_at_ms < self.horizon_ms {
                    self.near.insert((t.deliver_at_ms, offset));
                } else {
                    let entry =
                        self.far.entry((hour_of(t.deliver_at_ms), offset / CHUNK_RECORDS)).or_insert((0, offset));
                    entry.0 += 1;
                    entry.1 = entry.1.min(offset);
                }
            }
            TimerRecord::Cancelled(id, at) => {
                if at < self.horizon_ms {
                    self.near.remove(&(at, id));
                    self.recent_cancels.insert((at, id));
                    if self.recent_cancels.len() > RECENT_CANCELS_MAX {
                        self.recent_cancels.pop_first();
                    }
                } else {
                    self.cancelled_far.insert(id, at);
                }
            }
            TimerRecord::Fired(id, at) => {
                self.near.remove(&(at, id));
                self.latest_fired_ms = self.latest_fired_ms.max(at);
                let forget_below = self.latest_fired_ms.saturating_sub(TOKEN_WINDOW_MS);
                while self.recent_cancels.first().is_some_and(|(due, _)| *due < forget_below) {
                    self.recent_cancels.pop_first();
                }
            }
            TimerRecord::Horizon(until) => {
                // Whole hours only: a timer is in memory exactly when its hour was loaded or it
                // was scheduled after its hour came within the horizon, never both.
                let until = until - until.rem_euclid(HOUR_MS);
                if until <= self.horizon_ms {
                    return;
                }
                self.horizon_ms = until;
                let loading: Vec<(i64, u64)> =
                    self.far.keys().filter(|(hour, _)| hour.saturating_mul(HOUR_MS) < until).copied().collect();
                // Per chunk, from the lowest offset of a loading timer in it.
                let mut chunks: BTreeMap<u64, u64> = BTreeMap::new();
                for k in loading {
                    if let Some((_, low)) = self.far.remove(&k) {
                        let start = chunks.entry(k.1).or_insert(low);
                        *start = (*start).min(low);
                    }
                    self.loading.insert(k.0);
                }
                for (chunk, start) in chunks {
                    let range = start..((chunk + 1) * CHUNK_RECORDS).min(offset);
                    match self.rescan.last_mut() {
                        Some(last) if last.end == range.start => last.end = range.end,
                        _ => self.rescan.push(range),
                    }
                }
            }
            TimerRecord::Publisher(tp, Some(p)) => {
                self.publishers.insert(tp, p);
            }
            TimerRecord::Publisher(tp, None) => {
                self.publishers.remove(&tp);
            }
            TimerRecord::Publish(tp, stamp, Some(p)) => {
                self.publishes.insert((tp, stamp), p);
            }
            TimerRecord::Publish(tp, stamp, None) => {
                self.publishes.remove(&(tp, stamp));
            }
            TimerRecord::Token(t) => {
                let first = t.first.unwrap_or(offset + 1);
                if let Some((_, _, at)) = self.tokens.insert(t.token, (first, t.count, t.at_ms)) {
                    self.tokens_by_time.remove(&(at, t.token));
                }
                self.tokens_by_time.insert((t.at_ms, t.token));
                // Forget by age and by count, at the same record on every replica.
                while let Some(&(at, token)) = self.tokens_by_time.first() {
                    if at > t.at_ms.saturating_sub(TOKEN_WINDOW_MS) && self.tokens.len() <= TOKENS_MAX {
                        break;
                    }
                    self.tokens_by_time.pop_first();
                    self.tokens.remove(&token);
                }
            }
        }
    }

    /// The timers a schedule with request `token` already scheduled: (first id, count).
    pub fn scheduled_by(&self, token: u64) -> Option<(u64, u32)> {
        self.tokens.get(&token).map(|(first, count, _)| (*first, *count))
    }

    /// Schedules delayed records (each due at its `deliver_at_ms`): their records, in order,
    /// after a `Token` record when the request carries a `token` (non-zero); the offsets the
    /// `Scheduled` records are appended at are their ids. A token already seen is answered
    /// [`Scheduling::Already`] and schedules nothing.
    pub fn schedule(
        &self,
        timers: Vec<Timer>,
        token: u64,
        now_ms: i64,
        limits: &TimerLimits,
    ) -> Result<Scheduling, TimerError> {
        if let Some((first, count)) = (token != 0).then(|| self.scheduled_by(token)).flatten() {
            return Ok(Scheduling::Already { first, count });
        }
        if self.pending().saturating_add(timers.len() as u64) > limits.pending_max {
            return Err(TimerError::Full(format!(
                "this partition holds its limit of {} pending timers",
                limits.pending_max
            )));
        }
        for t in &timers {
            if t.deliver_at_ms.saturating_sub(now_ms) > limits.delay_max_ms {
                return Err(TimerError::Invalid(format!(
                    "a delay of {} ms exceeds the maximum of {} ms (delay_max_ms)",
                    t.deliver_at_ms.saturating_sub(now_ms),
                    limits.delay_max_ms
                )));
            }
            if t.size() > limits.record_bytes_max {
                return Err(TimerError::Invalid(format!(
                    "a delayed record carries at most {} bytes of key, value and headers",
                    limits.record_bytes_max
                )));
            }
        }
        let count = u32::try_from(timers.len()).map_err(|_| TimerError::Invalid("too many records".into()))?;
        let mut records = Vec::with_capacity(timers.len() + 1);
        if token != 0 {
            records.push(TimerRecord::Token(Token { token, first: None, count, at_ms: now_ms }));
        }
        records.extend(timers.into_iter().map(TimerRecord::Scheduled));
        Ok(Scheduling::New(records))
    }

    /// Cancels the timer `id` (whose `Scheduled` record the runtime read: `timer`). One already
    /// cancelled is answered with no records (a retried cancel succeeds again).
    pub fn cancel(&self, id: u64, timer: &Timer) -> Result<Vec<TimerRecord>, TimerError> {
        let at = timer.deliver_at_ms;
        if self.recent_cancels.contains(&(at, id)) || self.cancelled_far.contains_key(&id) {
            return Ok(Vec::new());
        }
        let pending =
            if at < self.horizon_ms { self.near.contains(&(at, id)) } else { !self.cancelled_far.contains_key(&id) };
        if !pending {
            return Err(TimerError::NotPending(id));
        }
        Ok(vec![TimerRecord::Cancelled(id, at)])
    }

    /// The horizon record due at `now_ms`, if the horizon must move.
    pub fn advance(&self, now_ms: i64, limits: &TimerLimits) -> Option<TimerRecord> {
        let until = ceil_hour(now_ms.saturating_add(limits.horizon_ms));
        (until > self.horizon_ms).then_some(TimerRecord::Horizon(until))
    }

    /// Timers in memory due at or before `now_ms`, earliest first, at most `max`.
    pub fn due(&self, now_ms: i64, max: usize) -> Vec<DueTimer> {
        self.near
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(max)
            .map(|(at, id)| DueTimer { id: *id, deliver_at_ms: *at })
            .collect()
    }

    /// Fires due timers (each with the `Scheduled` record the runtime read): a `Fired` marker and
    /// a publish decision to its target per timer, in one batch. The decisions of one target are
    /// sent together (`batch_base`), up to [`PUBLISH_BATCH_BYTES_MAX`] a batch or the target's
    /// own batch limit (`batch_limit`) if lower. `timer_id` names a timer in the header its record
    /// carries.
    pub fn fire(
        &self,
        due: &[(u64, Timer)],
        timer_id: impl Fn(u64) -> String,
        batch_limit: impl Fn(&Tp) -> usize,
        limits: &TimerLimits,
        now_ms: i64,
        spare_producer_id: Option<i64>,
    ) -> Result<(Vec<TimerRecord>, FireOutput), TimerError> {
        let mut batcher =
            publish::Batcher::new(&self.publishers, &self.publishes, spare_producer_id.into_iter().collect());
        let mut records = Vec::new();
        let mut out = FireOutput::default();
        for (id, t) in due {
            if !self.near.contains(&(t.deliver_at_ms, *id)) {
                continue;
            }
            let mut headers = t.headers.clone();
            headers.push(PublishHeader { key: TIMER_ID_HEADER.into(), value: Some(timer_id(*id).into_bytes()) });
            headers.push(PublishHeader {
                key: DELIVER_AT_HEADER.into(),
                value: Some(t.deliver_at_ms.to_string().into_bytes()),
            });
            let record = publish::Outgoing { key: t.key.clone(), value: t.value.clone(), headers };
            let bytes = t.size().saturating_add(RECORD_OVERHEAD_BYTES);
            let limit = PUBLISH_BATCH_BYTES_MAX.min(batch_limit(&t.target));
            match batcher.add(&t.target, record, bytes, limit, BATCH_OVERHEAD_BYTES, &limits.publish, now_ms) {
                Ok(()) => {}
                Err(publish::DecideError::ProducerIdNeeded) if !out.fired.is_empty() || batcher.used_spare => {
                    out.deferred.push(*id);
                    continue;
                }
                Err(publish::DecideError::ProducerIdNeeded) => return Err(TimerError::ProducerIdNeeded),
                Err(publish::DecideError::Full { max }) if out.fired.is_empty() => {
                    return Err(TimerError::Full(format!("{max} fired records wait to be published")));
                }
                Err(publish::DecideError::Full { .. }) => {
                    out.deferred.push(*id);
                    continue;
                }
            }
            records.push(TimerRecord::Fired(*id, t.deliver_at_ms));
            out.fired.push(*id);
        }
        out.used_spare_id = batcher.used_spare;
        let (publishers, publishes) = batcher.changes(&self.publishers, &self.publishes);
        records.extend(publishers.into_iter().map(|(tp, p)| TimerRecord::Publisher(tp, Some(p))));
        records.extend(publishes.into_iter().map(|(tp, s, p)| TimerRecord::Publish(tp, s, Some(p))));
        Ok((records, out))
    }

    /// Confirms that the fired record stamped `stamp` for `target` (and every earlier one there)
    /// is in the target partition.
    pub fn confirm_published(&self, target: &Tp, stamp: (i16, i32)) -> Vec<TimerRecord> {
        self.publishes
            .keys()
            .filter(|(tp, s)| tp == target && *s <= stamp)
            .map(|(tp, s)| TimerRecord::Publish(tp.clone(), *s, None))
            .collect()
    }
}

impl publish::Publishing for Timers {
    fn pending_publishes(&self, max: usize) -> Vec<publish::Pending> {
        let mut out: Vec<publish::Pending> = Vec::new();
        for ((tp, _), p) in &self.publishes {
            let same_batch = out.last().is_some_and(|l| {
                l.target == *tp && l.publish.batch_base.is_some() && l.publish.batch_base == p.batch_base
            });
            if out.len() >= max && !same_batch {
                break;
            }
            out.push(publish::Pending { key: KEY.to_owned(), target: tp.clone(), publish: p.clone() });
        }
        out
    }

    fn confirm_records(&self, _key: &str, target: &Tp, stamp: (i16, i32)) -> Vec<Record> {
        self.confirm_published(target, stamp).iter().map(TimerRecord::encode).collect()
    }

    fn creates_targets() -> bool {
        false
    }
}

impl Shard for Timers {
    fn replay(&mut self, offset: u64, record: &Record) -> Result<(), ReplayError> {
        let decoded = TimerRecord::decode(record).map_err(|reason| ReplayError { offset, reason })?;
        self.apply(offset, decoded);
        Ok(())
    }

    fn keys(&self) -> Vec<String> {
        vec![KEY.to_owned()]
    }

    fn live_records(&self, key: &str) -> Vec<Record> {
        if key != KEY {
            return Vec::new();
        }
        // Timers stay where they are (the compaction floor keeps them); what lives elsewhere in
        // the state is rewritten: the horizon, publishers, unconfirmed decisions, and the
        // cancellations of timers beyond the horizon.
        let mut out = vec![TimerRecord::Horizon(self.horizon_ms).encode()];
        out.extend(self.cancelled_far.iter().map(|(id, at)| TimerRecord::Cancelled(*id, *at).encode()));
        out.extend(self.recent_cancels.iter().map(|(at, id)| TimerRecord::Cancelled(*id, *at).encode()));
        out.extend(self.publishers.iter().map(|(tp, p)| TimerRecord::Publisher(tp.clone(), Some(p.clone())).encode()));
        out.extend(
            self.publishes.iter().map(|((tp, s), p)| TimerRecord::Publish(tp.clone(), *s, Some(p.clone())).encode()),
        );
        out.extend(self.tokens.iter().map(|(token, (first, count, at_ms))| {
            TimerRecord::Token(Token { token: *token, first: Some(*first), count: *count, at_ms: *at_ms }).encode()
        }));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn take_rescan(&mut self) -> Vec<Range<u64>> {
        std::mem::take(&mut self.rescan)
    }

    fn rescanned(&mut self, offset: u64, record: &Record) -> Result<(), ReplayError> {
        if let Ok(TimerRecord::Scheduled(t)) = TimerRecord::decode(record)
            && self.loading.contains(&hour_of(t.deliver_at_ms))
        {
            if self.cancelled_far.remove(&offset).is_some() {
                self.recent_cancels.insert((t.deliver_at_ms, offset));
            } else {
                self.near.insert((t.deliver_at_ms, offset));
            }
        }
        Ok(())
    }

    fn rescan_done(&mut self) {
        self.loading.clear();
    }

    fn compaction_floor(&self, replayed_to: u64) -> u64 {
        let near = self.near.iter().map(|(_, id)| *id).min();
        let far = self.far.values().map(|(_, low)| *low).min();
        [Some(replayed_to), near, far].into_iter().flatten().min().unwrap_or(replayed_to)
    }
}

#[cfg(test)]
mod tests;
