//! Coordinator shards (DESIGN.md §6.1): small state machines whose whole history is one partition
//! of an internal topic. A shard is pure: [`Shard::replay`] rebuilds its state from the records
//! of its partition, and an operation reads the state and returns the records to append plus the
//! answer to give once they are committed, without touching the state. The runtime that appends,
//! waits for the commit and replays lives in the broker; nothing here does I/O or reads a clock.
//!
//! - [`groups`]: consumer groups — members, epochs, server-side assignment, committed offsets,
//!   retry and dead letter;
//! - [`publish`]: publishing exactly once from a shard (dead letters, replays, fired timers);
//! - [`timers`]: delayed and scheduled messages over `__delayed`, bounded in memory;
//! - [`txn`]: transactional (half) messages with check-back over `__txn`.

pub mod groups;
pub mod publish;
pub mod timers;
pub mod txn;

/// One record of an internal topic: a key that names what it sets, and the value it now has
/// (`None` deletes it). Records are "latest value per key", so a partition rewritten as the
/// latest record of every live key replays to the same state as its whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// What the record sets.
    pub key: Vec<u8>,
    /// Its new value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
}

/// The key of the runtime's own record that ends a compaction: its value (8 bytes, big endian)
/// is an offset below which every record is obsolete, because every key's live state was
/// rewritten at or above it. Shards never see it; no shard key starts with a zero byte.
pub const COMPACTED_KEY: &[u8] = b"\0keel.compacted-below";

impl Record {
    /// The record that ends a compaction: everything below `floor` is obsolete.
    pub fn compaction(floor: u64) -> Record {
        Record { key: COMPACTED_KEY.to_vec(), value: Some(floor.to_be_bytes().to_vec()) }
    }

    /// `Some(Ok(floor))` for a compaction record, `Some(Err(()))` for one without a valid floor,
    /// `None` for a shard's record.
    pub fn compaction_floor(&self) -> Option<Result<u64, ()>> {
        (self.key == COMPACTED_KEY)
            .then(|| self.value.as_deref().and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes).ok_or(()))
    }
}

/// A stored record as a shard sees it: its key (a null key is empty) and value.
impl From<keel_record::Record> for Record {
    fn from(r: keel_record::Record) -> Record {
        Record { key: r.key.map(|k| k.to_vec()).unwrap_or_default(), value: r.value.map(|v| v.to_vec()) }
    }
}

/// A record that cannot be replayed: the partition holds something this code did not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record at offset {offset} cannot be replayed: {reason}")]
pub struct ReplayError {
    /// Where the record is.
    pub offset: u64,
    /// Why.
    pub reason: String,
}

/// A pure state machine rebuilt from its internal-topic partition.
pub trait Shard: Default + Send + 'static {
    /// Applies the committed record at `offset`. Records are replayed once each, in offset
    /// order; replay never refuses a record this code wrote (validation happened before it was
    /// appended), so an error means the partition is damaged or was written by other code.
    fn replay(&mut self, offset: u64, record: &Record) -> Result<(), ReplayError>;

    /// The keys (units of locking, e.g. consumer groups) that hold live state now.
    fn keys(&self) -> Vec<String>;

    /// Every record that, replayed into an empty shard, rebuilds `key`'s live state, sorted by
    /// record key: the rewrite that lets the records before it be trimmed.
    fn live_records(&self, key: &str) -> Vec<Record>;

    /// Ranges of earlier offsets to read again, asked for by the record just replayed (the
    /// timers shard loading an hour of far timers it only counted). The runtime reads them at
    /// once, in order, into [`Shard::rescanned`], then calls [`Shard::rescan_done`]: every
    /// replica does the same at the same record, so their states stay alike. Taking them clears
    /// them.
    fn take_rescan(&mut self) -> Vec<std::ops::Range<u64>> {
        Vec::new()
    }

    /// A record read again for a rescan.
    fn rescanned(&mut self, _offset: u64, _record: &Record) -> Result<(), ReplayError> {
        Ok(())
    }

    /// The rescan asked for is complete.
    fn rescan_done(&mut self) {}

    /// Below which offset a compaction that started at replay position `replayed_to` may trim:
    /// `replayed_to` when every live state is rewritten by [`Shard::live_records`]; lower for a
    /// shard whose state lives in records it never rewrites (pending timers stay in place).
    fn compaction_floor(&self, replayed_to: u64) -> u64 {
        replayed_to
    }
}

#[cfg(test)]
mod fuzz_decoders;
