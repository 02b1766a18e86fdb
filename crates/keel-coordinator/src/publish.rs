//! Publishing exactly once from a shard (DESIGN.md, "publishing exactly once from a shard"). A
//! shard that must put a record into a topic (a dead letter, a replay, a delayed record that is
//! due) does not send it: its operation records a [`Publish`] decision stamped with the shard's
//! idempotent-producer identity for the target partition (a [`Publisher`]: producer id, epoch,
//! next sequence). The runtime sends each unconfirmed decision, one batch per decision and in
//! stamp order, with exactly that stamp, then confirms it ([`confirm`]); a new runtime after a
//! failover sends what is unconfirmed again with the same stamps, and the target partition's
//! producer table recognises the duplicates. Nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::groups::Tp;
use crate::{Record, Shard};

/// A publish decision the runtime must send: who decided it, target, stamp and record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The lock key of the state that decided it (a group; the timers).
    pub key: String,
    /// Where it goes.
    pub target: Tp,
    /// The decision.
    pub publish: Publish,
}

/// A shard whose operations decide records to publish; the runtime sends them and confirms.
pub trait Publishing: Shard {
    /// Decisions not confirmed yet, per key and target in stamp order: at most `max`, and more
    /// only to complete the batch the last one belongs to.
    fn pending_publishes(&self, max: usize) -> Vec<Pending>;

    /// The records that confirm the decision of `key` stamped `stamp` for `target` (and every
    /// earlier one there): the target has them.
    fn confirm_records(&self, key: &str, target: &Tp, stamp: (i16, i32)) -> Vec<Record>;

    /// Whether a target topic that does not exist is created (dead letters) rather than the
    /// decision dropped (a delayed record whose topic was deleted meanwhile).
    fn creates_targets() -> bool;
}

/// The coordinator's idempotent-producer identity for one target partition: what it publishes
/// there (dead letters, replays) is stamped with it, so a resend after a failover is
/// deduplicated by the target partition itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    /// Producer id (allocated by the controller like any other).
    pub producer_id: i64,
    /// Producer epoch: bumped only when nothing is unconfirmed (a resend of an older epoch
    /// would be fenced).
    pub epoch: i16,
    /// The sequence the next decision gets.
    pub next_sequence: i32,
    /// When the last decision was made (coordinator clock): a publisher idle long enough may
    /// have been forgotten by its target, so its next decision starts a new epoch.
    pub last_decided_ms: i64,
}

/// Bytes as base64 in the JSON values (a record's key and value are arbitrary bytes).
pub(crate) mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?.map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// A header of a record to publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishHeader {
    /// Name.
    pub key: String,
    /// Value.
    #[serde(with = "b64", default)]
    pub value: Option<Vec<u8>>,
}

/// A decision to publish one record to a partition, stamped before it is sent: the runtime
/// sends it (again after a failover, with the same stamp) until it is confirmed, and the
/// target's deduplication makes it land once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Producer id of the stamp.
    pub producer_id: i64,
    /// Producer epoch of the stamp.
    pub epoch: i16,
    /// Sequence of the stamp.
    pub sequence: i32,
    /// The record's key.
    #[serde(with = "b64", default)]
    pub key: Option<Vec<u8>>,
    /// The record's value.
    #[serde(with = "b64", default)]
    pub value: Option<Vec<u8>>,
    /// Its headers.
    pub headers: Vec<PublishHeader>,
    /// Its timestamp.
    pub timestamp_ms: i64,
    /// When the decision was made (coordinator clock).
    pub decided_ms: i64,
    /// The sequence of the first decision of the batch this one is sent in, when decisions are
    /// sent together (fired timers); none: alone. Batch boundaries are decided once and
    /// recorded, so a resend after a failover is the same batch and the target recognises it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_base: Option<i32>,
}

/// A record to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<PublishHeader>,
}

/// Bounds of a shard's publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Decisions not yet confirmed a shard (or a group) may hold.
    pub publishes_max: usize,
    /// A publisher idle this long starts a new epoch: its target may have forgotten it (the
    /// target's producer expiry must be longer).
    pub publisher_idle_ms: i64,
}

/// Why no decision was made; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideError {
    /// As many decisions wait to be confirmed as the bound allows.
    Full {
        /// The bound.
        max: usize,
    },
    /// The target needs a new publisher and no spare producer id was given.
    ProducerIdNeeded,
}

/// Records a decision to publish `record` to `target`, stamped by the publisher there: created
/// from `spare` when there is none, or moved to a new epoch at sequence 0 when it was idle for
/// `publisher_idle_ms` (or is far into its sequences) and nothing of it is unconfirmed, so that a
/// target that forgot it accepts it (a resend of an older epoch would be fenced, hence not while
/// anything is unconfirmed); a new id from `spare` once its epochs run out. The record's
/// timestamp is `now_ms`: the target ages producers by batch timestamps. Returns whether
/// `spare` was used.
pub fn decide(
    publishers: &mut BTreeMap<Tp, Publisher>,
    publishes: &mut BTreeMap<(Tp, (i16, i32)), Publish>,
    target: &Tp,
    record: Outgoing,
    bounds: &Bounds,
    now_ms: i64,
    spare: Option<i64>,
) -> Result<bool, DecideError> {
    if publishes.len() >= bounds.publishes_max {
        return Err(DecideError::Full { max: bounds.publishes_max });
    }
    let unconfirmed = publishes.keys().any(|(tp, _)| tp == target);
    let mut used = false;
    let fresh = |used: &mut bool| -> Result<Publisher, DecideError> {
        let producer_id = spare.ok_or(DecideError::ProducerIdNeeded)?;
        *used = true;
        Ok(Publisher { producer_id, epoch: 0, next_sequence: 0, last_decided_ms: now_ms })
    };
    let mut p = match publishers.get(target) {
        None => fresh(&mut used)?,
        Some(p) if unconfirmed => p.clone(),
        // Sequences are far from wrapping and the target still remembers it: go on.
        Some(p) if now_ms.saturating_sub(p.last_decided_ms) < bounds.publisher_idle_ms && p.next_sequence < 1 << 30 => {
            p.clone()
        }
        Some(p) if p.epoch < i16::MAX => Publisher { epoch: p.epoch + 1, next_sequence: 0, ..p.clone() },
        Some(_) => fresh(&mut used)?,
    };
    let stamp = (p.epoch, p.next_sequence);
    let publish = Publish {
        producer_id: p.producer_id,
        epoch: p.epoch,
        sequence: p.next_sequence,
        key: record.key,
        value: record.value,
        headers: record.headers,
        timestamp_ms: now_ms,
        decided_ms: now_ms,
        batch_base: None,
    };
    p.next_sequence += 1;
    p.last_decided_ms = now_ms;
    publishers.insert(target.clone(), p);
    publishes.insert((target.clone(), stamp), publish);
    Ok(used)
}

/// Groups `pending` (in stamp order per key and target) into the batches they are sent in: runs
/// of decisions sharing a `batch_base` that starts at that base, and single decisions. A run
/// whose first decision is not at its base is left out, and [`Publishing::pending_publishes`]
/// never stops inside a run, so a batch is only ever sent whole, with the boundaries it was
/// decided with.
pub fn batches(pending: Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut out: Vec<Vec<Pending>> = Vec::new();
    for p in pending {
        if let Some(last) = out.last_mut()
            && let Some(first) = last.first()
            && p.publish.batch_base.is_some()
            && first.publish.batch_base == p.publish.batch_base
            && first.key == p.key
            && first.target == p.target
            && first.publish.epoch == p.publish.epoch
            && last.last().is_some_and(|l| l.publish.sequence.checked_add(1) == Some(p.publish.sequence))
        {
            last.push(p);
            continue;
        }
        out.push(vec![p]);
    }
    out.retain(|b| b.first().is_some_and(|f| f.publish.batch_base.is_none_or(|base| base == f.publish.sequence)));
    out
}

/// Forgets the decisions for `target` up to and including `stamp`: the target has them.
pub fn confirm(publishes: &mut BTreeMap<(Tp, (i16, i32)), Publish>, target: &Tp, stamp: (i16, i32)) {
    publishes.retain(|(tp, s), _| tp != target || *s > stamp);
}

/// Decisions of one operation, grouped per target into batches of at most a byte limit
/// (`batch_base` set on each), so that the records one operation decides for one target land
/// together and a resend after a failover repeats the same batches. Works on copies of the
/// shard's publishers and decisions; [`Batcher::records`] tells what changed.
#[derive(Debug, Clone)]
pub struct Batcher {
    /// Publishers as the decisions so far left them.
    pub publishers: BTreeMap<Tp, Publisher>,
    /// Decisions, those of this operation included.
    pub publishes: BTreeMap<(Tp, (i16, i32)), Publish>,
    /// Per target: the batch being filled (its base sequence and bytes so far).
    open: BTreeMap<Tp, (i32, usize)>,
    /// Producer ids new publishers may take (from the back), one each.
    spares: Vec<i64>,
    /// Whether a spare was taken.
    pub used_spare: bool,
}

impl Batcher {
    /// Starts from the shard's publishers and decisions, with producer ids for new publishers.
    pub fn new(
        publishers: &BTreeMap<Tp, Publisher>,
        publishes: &BTreeMap<(Tp, (i16, i32)), Publish>,
        spares: Vec<i64>,
    ) -> Batcher {
        Batcher {
            publishers: publishers.clone(),
            publishes: publishes.clone(),
            open: BTreeMap::new(),
            spares,
            used_spare: false,
        }
    }

    /// Decides `record` (counted as `bytes`) for `target`, in the open batch there if it still
    /// fits `batch_bytes_max` (counting `batch_overhead` once per batch), else in a new one.
    #[allow(clippy::too_many_arguments)] // The decision's inputs, each of a different kind.
    pub fn add(
        &mut self,
        target: &Tp,
        record: Outgoing,
        bytes: usize,
        batch_bytes_max: usize,
        batch_overhead: usize,
        bounds: &Bounds,
        now_ms: i64,
    ) -> Result<(), DecideError> {
        let spare = self.spares.last().copied();
        if decide(&mut self.publishers, &mut self.publishes, target, record, bounds, now_ms, spare)? {
            self.spares.pop();
            self.used_spare = true;
        }
        let Some(p) = self.publishers.get(target) else { return Ok(()) };
        let stamp = (p.epoch, p.next_sequence - 1);
        let base = match self.open.get(target) {
            Some(&(base, size)) if size.saturating_add(bytes) <= batch_bytes_max => {
                self.open.insert(target.clone(), (base, size + bytes));
                base
            }
            _ => {
                self.open.insert(target.clone(), (stamp.1, batch_overhead + bytes));
                stamp.1
            }
        };
        if let Some(d) = self.publishes.get_mut(&(target.clone(), stamp)) {
            d.batch_base = Some(base);
        }
        Ok(())
    }

    /// What changed against the shard's `publishers` and `publishes`: publishers that are new or
    /// moved on, and the new decisions, in key order.
    #[allow(clippy::type_complexity)] // The two halves of a shard's publishing state.
    pub fn changes(
        &self,
        publishers: &BTreeMap<Tp, Publisher>,
        publishes: &BTreeMap<(Tp, (i16, i32)), Publish>,
    ) -> (Vec<(Tp, Publisher)>, Vec<(Tp, (i16, i32), Publish)>) {
        let moved = self.publishers.iter().filter(|(tp, p)| publishers.get(*tp) != Some(*p));
        let new = self.publishes.iter().filter(|(k, _)| !publishes.contains_key(*k));
        (
            moved.map(|(tp, p)| (tp.clone(), p.clone())).collect(),
            new.map(|((tp, s), p)| (tp.clone(), *s, p.clone())).collect(),
        )
    }
}
