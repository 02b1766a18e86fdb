//! Idempotent producers' state in a partition: pure, rebuilt from the log like the rest of the
//! state machine, so every replica holds the same table and a new leader deduplicates exactly as
//! the old one did. A producer stamps each batch with (id, epoch, base sequence); the table keeps
//! the last `window` batches of each producer with the offsets they got, so a retried batch is
//! answered with its original offsets instead of being written twice.
//!
//! Time is the batches' own max timestamp (stamped by the leader at append when the client sent
//! none), never a replica's clock: expiry and eviction are then the same on every replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use keel_record::SEQUENCE_MODULUS;

/// Bounds of the table; the same on every replica (they come from the cluster's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerLimits {
    /// Batches remembered per producer: a retry of any of them is recognised. At least as many
    /// as a producer may have in flight per partition.
    pub window: usize,
    /// Producers remembered per partition: beyond it the least recently active one is forgotten
    /// (its next batch is refused as UNKNOWN_PRODUCER_ID, never written twice).
    pub producers_max: usize,
    /// A producer silent this long (in batch timestamps) is forgotten.
    pub expiration_ms: i64,
}

impl Default for ProducerLimits {
    fn default() -> ProducerLimits {
        ProducerLimits { window: 16, producers_max: 10_000, expiration_ms: 24 * 3_600_000 }
    }
}

/// One remembered batch: its sequences and where it landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequencedBatch {
    /// Sequence of its first record.
    pub first_sequence: i32,
    /// Sequence of its last record.
    pub last_sequence: i32,
    /// Offset of its first record.
    pub base_offset: u64,
    /// Offset after its last record.
    pub next_offset: u64,
}

/// What a partition remembers of one producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    /// Its current epoch; batches of older epochs are fenced.
    pub epoch: i16,
    /// Its last batches, oldest first (at most `window`).
    pub batches: VecDeque<SequencedBatch>,
    /// The max timestamp of its last batch.
    pub last_timestamp_ms: i64,
}

impl ProducerEntry {
    /// The sequence the producer's next batch must start at.
    pub fn next_sequence(&self) -> i32 {
        self.batches.back().map_or(0, |b| next_sequence_after(b.last_sequence, 1))
    }
}

/// A batch's producer stamp and size, as the table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    /// Producer id (>= 0).
    pub producer_id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// Sequence of the first record.
    pub base_sequence: i32,
    /// Records in the batch (>= 1).
    pub record_count: u32,
    /// The batch's max timestamp.
    pub timestamp_ms: i64,
}

impl Stamped {
    fn last_sequence(&self) -> i32 {
        // `record_count` >= 1: the table refuses empty batches before it records one.
        next_sequence_after(self.base_sequence, self.record_count.saturating_sub(1))
    }
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and in order: append it.
    Append,
    /// Already written: answer with where it landed, write nothing.
    Duplicate {
        /// Offset of its first record.
        base_offset: u64,
        /// Offset after its last record.
        next_offset: u64,
    },
    /// A gap before it (an earlier batch was not written): refused, so that the producer
    /// resends in order (OUT_OF_ORDER_SEQUENCE).
    OutOfOrder {
        /// The sequence the partition expects next.
        expected: i32,
    },
    /// Older than the batches remembered, yet not new: it was written, but where is no longer
    /// known (DUPLICATE_SEQUENCE_NUMBER). Never written twice.
    StaleDuplicate,
    /// An older epoch than the producer's current one: a zombie instance (PRODUCER_FENCED).
    Fenced {
        /// The producer's current epoch.
        current: i16,
    },
    /// The partition does not know this producer (expired, evicted, or never seen) and the batch
    /// does not start a fresh sequence: it may be a retry, so it is refused
    /// (UNKNOWN_PRODUCER_ID) rather than risk a duplicate.
    UnknownProducer,
    /// Malformed stamp (negative sequence, an empty batch).
    Invalid(&'static str),
}

/// The producers of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerTable {
    producers: BTreeMap<i64, ProducerEntry>,
    /// (last timestamp, id) of every producer: expiry and eviction find the least recently
    /// active in O(log n) on the append path, not by a scan of every producer.
    by_time: BTreeSet<(i64, i64)>,
}

/// The sequence `n` records after `sequence`, modulo 2^31.
pub fn next_sequence_after(sequence: i32, n: u32) -> i32 {
    keel_record::sequence_after(sequence, u64::from(n))
}

/// How far `to` is after `from`, modulo 2^31 (0..2^31).
fn distance(from: i32, to: i32) -> i64 {
    (i64::from(to) - i64::from(from)).rem_euclid(SEQUENCE_MODULUS)
}

impl ProducerTable {
    /// The entry of a producer, if remembered.
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// How many producers are remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Every remembered producer, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&i64, &ProducerEntry)> {
        self.producers.iter()
    }

    /// Restores a producer's entry (from a snapshot).
    pub fn restore(&mut self, producer_id: i64, entry: ProducerEntry) {
        let time = (entry.last_timestamp_ms, producer_id);
        if let Some(old) = self.producers.insert(producer_id, entry) {
            self.by_time.remove(&(old.last_timestamp_ms, producer_id));
        }
        self.by_time.insert(time);
    }

    /// Decides what to do with a batch, changing nothing.
    pub fn check(&self, batch: &Stamped) -> Verdict {
        if batch.producer_id < 0 || batch.base_sequence < 0 || batch.epoch < 0 {
            return Verdict::Invalid("producer id, epoch and sequence must not be negative");
        }
        if batch.record_count == 0 || i64::from(batch.record_count) >= SEQUENCE_MODULUS {
            return Verdict::Invalid("a batch holds 1 to 2^31 - 1 records");
        }
        let Some(entry) = self.producers.get(&batch.producer_id) else {
            // Only a fresh sequence may start a producer: anything else could be a retry of a
            // batch whose producer state was since forgotten.
            return if batch.base_sequence == 0 { Verdict::Append } else { Verdict::UnknownProducer };
        };
        if batch.epoch < entry.epoch {
            return Verdict::Fenced { current: entry.epoch };
        }
        if batch.epoch > entry.epoch {
            // A new instance (or a bumped epoch) starts its sequence over.
            return if batch.base_sequence == 0 { Verdict::Append } else { Verdict::OutOfOrder { expected: 0 } };
        }
        if let Some(b) = entry.batches.iter().find(|b| b.first_sequence == batch.base_sequence) {
            if b.last_sequence == batch.last_sequence() {
                return Verdict::Duplicate { base_offset: b.base_offset, next_offset: b.next_offset };
            }
            // Same start, another length: not a retry of that batch, and not next either.
            return Verdict::OutOfOrder { expected: entry.next_sequence() };
        }
        let expected = entry.next_sequence();
        if batch.base_sequence == expected {
            return Verdict::Append;
        }
        // Behind what is expected by less than half the sequence space: an old batch whose place
        // the window no longer remembers. Ahead: a gap.
        if distance(batch.base_sequence, expected) < SEQUENCE_MODULUS / 2 {
            Verdict::StaleDuplicate
        } else {
            Verdict::OutOfOrder { expected }
        }
    }

    /// Records a batch that was written (applied from the log) at `[base_offset, next_offset)`.
    /// Replicas call this for every applied idempotent batch, so the table is a function of the
    /// log. Expiry and the producer bound are applied here too, by the batch's timestamp.
    pub fn record(&mut self, batch: &Stamped, base_offset: u64, next_offset: u64, limits: &ProducerLimits) {
        let now = batch.timestamp_ms;
        let horizon = now.saturating_sub(limits.expiration_ms);
        while let Some(&(ts, id)) = self.by_time.first() {
            if ts >= horizon {
                break;
            }
            self.by_time.pop_first();
            self.producers.remove(&id);
        }
        let entry = self.producers.entry(batch.producer_id).or_insert_with(|| ProducerEntry {
            epoch: batch.epoch,
            batches: VecDeque::new(),
            last_timestamp_ms: now,
        });
        self.by_time.remove(&(entry.last_timestamp_ms, batch.producer_id));
        if batch.epoch != entry.epoch {
            entry.epoch = batch.epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(SequencedBatch {
            first_sequence: batch.base_sequence,
            last_sequence: batch.last_sequence(),
            base_offset,
            next_offset,
        });
        while entry.batches.len() > limits.window.max(1) {
            entry.batches.pop_front();
        }
        // Timestamps may go backwards (clients may set them): keep the latest seen.
        entry.last_timestamp_ms = entry.last_timestamp_ms.max(now);
        self.by_time.insert((entry.last_timestamp_ms, batch.producer_id));
        while self.producers.len() > limits.producers_max.max(1) {
            // The least recently active other producer goes (ties: the lowest id), the same on
            // every replica since it depends on the log alone.
            let victim = self.by_time.iter().find(|(_, id)| *id != batch.producer_id).copied();
            match victim {
                Some((ts, id)) => {
                    self.by_time.remove(&(ts, id));
                    self.producers.remove(&id);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: ProducerLimits = ProducerLimits { window: 5, producers_max: 3, expiration_ms: 1_000 };

    fn stamped(producer_id: i64, epoch: i16, base_sequence: i32, record_count: u32, timestamp_ms: i64) -> Stamped {
        Stamped { producer_id, epoch, base_sequence, record_count, timestamp_ms }
    }

    /// Appends like a leader would: check, and record where it landed if new.
    fn append(table: &mut ProducerTable, next: &mut u64, batch: Stamped) -> Verdict {
        let verdict = table.check(&batch);
        if verdict == Verdict::Append {
            let base = *next;
            *next += u64::from(batch.record_count);
            table.record(&batch, base, *next, &LIMITS);
        }
        verdict
    }

    /// Found by `fuzz_snapshots`: a snapshot naming a producer twice with the same timestamp
    /// (the later entry wins) lost the producer from the time index, so expiry and eviction
    /// would never have found it.
    #[test]
    fn restoring_a_producer_twice_keeps_it_in_the_time_index() {
        let entry = |first| ProducerEntry {
            epoch: 1,
            batches: [SequencedBatch {
                first_sequence: first,
                last_sequence: first + 4,
                base_offset: 0,
                next_offset: 5,
            }]
            .into(),
            last_timestamp_ms: 1_000,
        };
        let mut twice = ProducerTable::default();
        twice.restore(5, entry(0));
        twice.restore(5, entry(5));
        let mut once = ProducerTable::default();
        once.restore(5, entry(5));
        assert_eq!(twice, once);
        // And it expires like any other.
        twice.record(&stamped(6, 0, 0, 1, 1_000 + LIMITS.expiration_ms + 1), 5, 6, &LIMITS);
        assert!(twice.get(5).is_none(), "producer 5 expired");
    }

    #[test]
    fn retries_inside_the_window_get_their_offsets_back() {
        let (mut t, mut next) = (ProducerTable::default(), 0);
        for i in 0..7 {
            assert_eq!(append(&mut t, &mut next, stamped(1, 0, i * 10, 10, 100)), Verdict::Append);
        }
        // The last five batches (sequences 20..70) are remembered, each with its offsets.
        assert_eq!(t.check(&stamped(1, 0, 20, 10, 100)), Verdict::Duplicate { base_offset: 20, next_offset: 30 });
        assert_eq!(t.check(&stamped(1, 0, 60, 10, 100)), Verdict::Duplicate { base_offset: 60, next_offset: 70 });
        assert_eq!(t.check(&stamped(1, 0, 10, 10, 100)), Verdict::StaleDuplicate, "written, place forgotten");
        assert_eq!(t.check(&stamped(1, 0, 80, 10, 100)), Verdict::OutOfOrder { expected: 70 }, "a gap");
        assert_eq!(t.check(&stamped(1, 0, 60, 3, 100)), Verdict::OutOfOrder { expected: 70 }, "not that batch");
        assert_eq!(t.check(&stamped(1, 0, 70, 1, 100)), Verdict::Append);
    }

    #[test]
    fn epochs_fence_old_instances_and_restart_sequences() {
        let (mut t, mut next) = (ProducerTable::default(), 0);
        append(&mut t, &mut next, stamped(1, 3, 0, 5, 100));
        assert_eq!(t.check(&stamped(1, 2, 5, 1, 100)), Verdict::Fenced { current: 3 });
        assert_eq!(t.check(&stamped(1, 4, 5, 1, 100)), Verdict::OutOfOrder { expected: 0 });
        assert_eq!(append(&mut t, &mut next, stamped(1, 4, 0, 2, 100)), Verdict::Append);
        assert_eq!(t.check(&stamped(1, 3, 5, 1, 100)), Verdict::Fenced { current: 4 });
        assert_eq!(t.check(&stamped(1, 4, 0, 2, 100)), Verdict::Duplicate { base_offset: 5, next_offset: 7 });
    }

    #[test]
    fn unknown_producers_start_at_zero_or_are_refused() {
        let t = ProducerTable::default();
        assert_eq!(t.check(&stamped(9, 0, 0, 1, 1)), Verdict::Append);
        assert_eq!(t.check(&stamped(9, 0, 7, 1, 1)), Verdict::UnknownProducer);
        assert!(matches!(t.check(&stamped(9, 0, -1, 1, 1)), Verdict::Invalid(_)));
        assert!(matches!(t.check(&stamped(9, 0, 0, 0, 1)), Verdict::Invalid(_)));
        assert!(matches!(t.check(&stamped(-2, 0, 0, 1, 1)), Verdict::Invalid(_)));
    }

    #[test]
    fn silent_producers_expire_by_batch_time() {
        let (mut t, mut next) = (ProducerTable::default(), 0);
        append(&mut t, &mut next, stamped(1, 0, 0, 1, 100));
        append(&mut t, &mut next, stamped(2, 0, 0, 1, 900));
        append(&mut t, &mut next, stamped(2, 0, 1, 1, 1_500));
        assert!(t.get(1).is_none(), "silent for more than 1,000 ms of batch time");
        assert_eq!(t.check(&stamped(1, 0, 1, 1, 1_500)), Verdict::UnknownProducer, "refused, not duplicated");
        assert!(t.get(2).is_some());
    }

    #[test]
    fn inventing_ids_cannot_grow_the_table() {
        let (mut t, mut next) = (ProducerTable::default(), 0);
        append(&mut t, &mut next, stamped(1, 0, 0, 1, 500));
        for id in 100..200 {
            append(&mut t, &mut next, stamped(id, 0, 0, 1, 600));
        }
        assert_eq!(t.len(), LIMITS.producers_max);
        assert!(t.get(1).is_none(), "the least recently active producer was forgotten first");
        assert_eq!(t.check(&stamped(1, 0, 1, 1, 700)), Verdict::UnknownProducer);
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        let (mut t, mut next) = (ProducerTable::default(), 0);
        append(&mut t, &mut next, stamped(1, 0, 0, 1, 1));
        let mut table = t.clone();
        let near_end = stamped(1, 0, i32::MAX - 1, 3, 1);
        table.restore(
            1,
            ProducerEntry {
                epoch: 0,
                batches: [SequencedBatch {
                    first_sequence: 0,
                    last_sequence: i32::MAX - 2,
                    base_offset: 0,
                    next_offset: 1,
                }]
                .into(),
                last_timestamp_ms: 1,
            },
        );
        assert_eq!(table.check(&near_end), Verdict::Append);
        table.record(&near_end, 1, 4, &LIMITS);
        assert_eq!(table.get(1).unwrap().next_sequence(), 1, "i32::MAX - 1, i32::MAX, 0; then 1");
        assert_eq!(table.check(&stamped(1, 0, 1, 1, 1)), Verdict::Append);
        assert_eq!(table.check(&near_end), Verdict::Duplicate { base_offset: 1, next_offset: 4 });
    }

    proptest! {
        /// Whatever order retries arrive in, a producer's records are written once each, in
        /// sequence order, with no gap: the log holds every sequence exactly once.
        #[test]
        fn retries_in_any_order_write_each_sequence_once(
            sends in proptest::collection::vec(0usize..12, 1..80),
        ) {
            // The producer's batches: fixed sequence ranges, resent in random order.
            let mut batches = Vec::new();
            let mut sequence = 0i32;
            for i in 0..12 {
                let count = 1 + (i % 3) as u32;
                batches.push(stamped(7, 0, sequence, count, 10));
                sequence += count as i32;
            }
            let (mut t, mut next) = (ProducerTable::default(), 0u64);
            let mut written: Vec<i32> = Vec::new();
            for i in sends {
                let batch = batches[i];
                if append(&mut t, &mut next, batch) == Verdict::Append {
                    written.extend(batch.base_sequence..=batch.last_sequence());
                }
            }
            let expected: Vec<i32> = (0..written.len() as i32).collect();
            prop_assert_eq!(written, expected);
        }
    }
}
