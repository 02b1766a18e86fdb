//! The loss audit: given a partition's records in offset order, each with the idempotent
//! producer stamp it was written with, which sequences of each producer are there, which are
//! missing between them (a gap: something acknowledged may be lost) and which are there twice (a
//! duplicate). Pure and streaming: memory grows with the number of producers and of holes, not
//! of records. `keel audit` and the Admin API use it.

use std::collections::BTreeMap;

/// Sequences count modulo 2^31.
use crate::SEQUENCE_MODULUS as MODULUS;

/// Duplicates listed per producer and epoch (all are counted).
const LISTED_MAX: usize = 100;

/// A sequence written twice, and where its copies are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate {
    /// The sequence (unwrapped: it keeps counting past 2^31).
    pub sequence: i64,
    /// Offset of the copy that came second (or later).
    pub offset: u64,
}

/// What the audit found for one producer id and epoch in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerAudit {
    /// Records seen.
    pub records: u64,
    /// The present sequences, as half-open ranges `[start, end)` (unwrapped).
    pub ranges: Vec<(i64, i64)>,
    /// Missing sequences between the present ones, as half-open ranges.
    pub gaps: Vec<(i64, i64)>,
    /// How many records repeated a sequence already present.
    pub duplicates: u64,
    /// The first [`LISTED_MAX`] of them.
    pub listed_duplicates: Vec<Duplicate>,
    /// Offset of the first record seen.
    pub first_offset: u64,
    /// Offset of the last record seen.
    pub last_offset: u64,
}

impl ProducerAudit {
    /// Sets the present sequences (sorted, disjoint half-open ranges) and the gaps between them.
    pub fn set_ranges(&mut self, ranges: Vec<(i64, i64)>) {
        self.gaps = ranges.windows(2).map(|w| (w[0].1, w[1].0)).collect();
        self.ranges = ranges;
    }

    /// Sequences missing between the first and the last present one.
    pub fn missing(&self) -> i64 {
        self.gaps.iter().map(|(s, e)| e - s).sum()
    }
}

#[derive(Debug, Clone, Default)]
struct Tracker {
    audit: ProducerAudit,
    /// Present sequences: start -> end (exclusive), disjoint and not touching.
    present: BTreeMap<i64, i64>,
    last: Option<i64>,
}

impl Tracker {
    /// Places a wrapped sequence on the unwrapped line, next to the last one seen.
    fn unwrap(&self, sequence: i32) -> i64 {
        let s = i64::from(sequence);
        match self.last {
            None => s,
            Some(last) => {
                let base = last - last.rem_euclid(MODULUS);
                [base - MODULUS + s, base + s, base + MODULUS + s]
                    .into_iter()
                    .min_by_key(|u| (u - last).abs())
                    .unwrap_or(s)
            }
        }
    }

    fn add(&mut self, sequence: i32, offset: u64) {
        let u = self.unwrap(sequence);
        self.last = Some(u);
        let a = &mut self.audit;
        if a.records == 0 {
            a.first_offset = offset;
        }
        a.records += 1;
        a.last_offset = offset;
        // The range that starts at or before `u`.
        if let Some((_, &end)) = self.present.range(..=u).next_back()
            && u < end
        {
            a.duplicates += 1;
            if a.listed_duplicates.len() < LISTED_MAX {
                a.listed_duplicates.push(Duplicate { sequence: u, offset });
            }
            return;
        }
        let mut start = u;
        let mut end = u + 1;
        if let Some((&s, &e)) = self.present.range(..u).next_back()
            && e == u
        {
            start = s;
            self.present.remove(&s);
        }
        if let Some(&e) = self.present.get(&end) {
            self.present.remove(&end);
            end = e;
        }
        self.present.insert(start, end);
    }

    fn finish(mut self) -> ProducerAudit {
        self.audit.set_ranges(self.present.iter().map(|(s, e)| (*s, *e)).collect());
        self.audit
    }
}

/// Audits one partition: feed every record in offset order, then [`PartitionAudit::finish`].
#[derive(Debug, Clone, Default)]
pub struct PartitionAudit {
    producers: BTreeMap<(i64, i16), Tracker>,
    unstamped: u64,
}

/// The audit of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionReport {
    /// By (producer id, epoch).
    pub producers: BTreeMap<(i64, i16), ProducerAudit>,
    /// Records written without an idempotent producer stamp (nothing to check them by).
    pub unstamped: u64,
}

impl PartitionReport {
    /// Whether any producer has a gap or a duplicate.
    pub fn is_clean(&self) -> bool {
        self.producers.values().all(|p| p.gaps.is_empty() && p.duplicates == 0)
    }

    /// Adds the report of the records that follow this one's (the next chunk of a resumable
    /// audit): ranges are united, sequences present in both count as duplicates, and the gaps
    /// are those of the union. Duplicates across chunks are counted but not listed (their
    /// offsets are not in the reports).
    pub fn merge(&mut self, later: PartitionReport) {
        self.unstamped += later.unstamped;
        for (key, b) in later.producers {
            match self.producers.get_mut(&key) {
                None => {
                    self.producers.insert(key, b);
                }
                Some(a) => a.merge(b),
            }
        }
    }
}

impl ProducerAudit {
    fn merge(&mut self, mut later: ProducerAudit) {
        // The later chunk unwrapped its sequences from its own first one: move its ranges by the
        // multiple of 2^31 that puts them next to where this chunk ended.
        if let (Some(&(_, end)), Some(&(start, _))) = (self.ranges.last(), later.ranges.first()) {
            let q = (end - start).div_euclid(MODULUS);
            let shift =
                [q * MODULUS, (q + 1) * MODULUS].into_iter().min_by_key(|m| (start + m - end).abs()).unwrap_or(0);
            for r in &mut later.ranges {
                *r = (r.0 + shift, r.1 + shift);
            }
            for d in &mut later.listed_duplicates {
                d.sequence += shift;
            }
        }
        let mut overlap = 0;
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < later.ranges.len() {
            let (a, b) = (self.ranges[i], later.ranges[j]);
            overlap += (a.1.min(b.1) - a.0.max(b.0)).max(0);
            if a.1 < b.1 { i += 1 } else { j += 1 }
        }
        let mut all: Vec<(i64, i64)> = self.ranges.iter().chain(&later.ranges).copied().collect();
        all.sort_unstable();
        let mut ranges: Vec<(i64, i64)> = Vec::with_capacity(all.len());
        for (s, e) in all {
            match ranges.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        self.set_ranges(ranges);
        self.duplicates += later.duplicates + u64::try_from(overlap).unwrap_or(0);
        let room = LISTED_MAX.saturating_sub(self.listed_duplicates.len());
        self.listed_duplicates.extend(later.listed_duplicates.into_iter().take(room));
        if self.records == 0 {
            self.first_offset = later.first_offset;
        }
        self.records += later.records;
        self.last_offset = later.last_offset.max(self.last_offset);
    }
}

impl PartitionAudit {
    /// Adds one record: its offset and the stamp of its batch with its own sequence
    /// (`base_sequence + offset - base_offset`), or `None` if its batch had no producer.
    pub fn record(&mut self, offset: u64, stamp: Option<(i64, i16, i32)>) {
        match stamp {
            Some((producer_id, epoch, sequence)) if producer_id >= 0 && sequence >= 0 => {
                self.producers.entry((producer_id, epoch)).or_default().add(sequence, offset)
            }
            _ => self.unstamped += 1,
        }
    }

    /// Adds every record of a batch (its header is enough: records are dense).
    pub fn batch(&mut self, header: &crate::BatchHeader) {
        self.batch_range(header, header.base_offset..header.next_offset());
    }

    /// Adds the records of a batch whose offsets fall in `offsets` (an audit chunk that starts
    /// or stops inside a batch).
    pub fn batch_range(&mut self, header: &crate::BatchHeader, offsets: std::ops::Range<u64>) {
        for offset in offsets.start.max(header.base_offset)..offsets.end.min(header.next_offset()) {
            self.record(offset, header.producer_stamp(offset));
        }
    }

    /// How much the audit holds: producers, the ranges of sequences they have and the
    /// duplicates listed. A caller that must bound its answer stops feeding records beyond a
    /// limit of this.
    pub fn tracked(&self) -> usize {
        self.producers.values().map(|t| 1 + t.present.len() + t.audit.listed_duplicates.len()).sum()
    }

    /// The report so far, the audit going on (costs a copy of what it tracks: producers and
    /// holes, not records).
    pub fn report(&self) -> PartitionReport {
        self.clone().finish()
    }

    /// The report.
    pub fn finish(self) -> PartitionReport {
        PartitionReport {
            producers: self.producers.into_iter().map(|(k, t)| (k, t.finish())).collect(),
            unstamped: self.unstamped,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn audit(records: &[(u64, i64, i16, i32)]) -> PartitionReport {
        let mut a = PartitionAudit::default();
        for &(offset, pid, epoch, seq) in records {
            a.record(offset, Some((pid, epoch, seq)));
        }
        a.finish()
    }

    #[test]
    fn a_clean_log_has_one_range_per_producer() {
        let mut a = PartitionAudit::default();
        for i in 0..10 {
            a.record(i, Some((1, 0, i as i32)));
            a.record(100 + i, Some((2, 3, 50 + i as i32)));
        }
        a.record(500, None);
        let r = a.finish();
        assert!(r.is_clean());
        assert_eq!(r.producers[&(1, 0)].ranges, [(0, 10)]);
        assert_eq!(r.producers[&(2, 3)].ranges, [(50, 60)]);
        assert_eq!(r.unstamped, 1);
    }

    #[test]
    fn gaps_and_duplicates_are_found() {
        let r = audit(&[(0, 1, 0, 0), (1, 1, 0, 1), (2, 1, 0, 5), (3, 1, 0, 1), (4, 1, 0, 2), (5, 1, 0, 6)]);
        let p = &r.producers[&(1, 0)];
        assert_eq!(p.ranges, [(0, 3), (5, 7)]);
        assert_eq!(p.gaps, [(3, 5)]);
        assert_eq!(p.missing(), 2);
        assert_eq!(p.duplicates, 1);
        assert_eq!(p.listed_duplicates, [Duplicate { sequence: 1, offset: 3 }]);
        assert!(!r.is_clean());
    }

    #[test]
    fn a_hole_filled_later_is_no_gap_and_no_duplicate() {
        let r = audit(&[(0, 1, 0, 0), (1, 1, 0, 4), (2, 1, 0, 1), (3, 1, 0, 2), (4, 1, 0, 3)]);
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.producers[&(1, 0)].ranges, [(0, 5)]);
    }

    #[test]
    fn sequences_run_on_past_i32_max() {
        let r = audit(&[(0, 1, 0, i32::MAX - 1), (1, 1, 0, i32::MAX), (2, 1, 0, 0), (3, 1, 0, 1)]);
        assert!(r.is_clean(), "{r:?}");
        let start = i64::from(i32::MAX) - 1;
        assert_eq!(r.producers[&(1, 0)].ranges, [(start, start + 4)]);
    }

    #[test]
    fn batches_expand_to_their_records() {
        let mut b = crate::BatchBuilder::new(1 << 20).producer(crate::ProducerStamp {
            producer_id: 4,
            producer_epoch: 1,
            base_sequence: 10,
        });
        for _ in 0..3 {
            b.push(crate::NewRecord { timestamp_ms: 1, value: Some(b"v"), ..Default::default() }).unwrap();
        }
        let mut bytes = b.build().to_vec();
        crate::stamp(&mut bytes, 7, 1, 1).unwrap();
        let header = crate::check(&bytes).unwrap();
        let mut a = PartitionAudit::default();
        a.batch(&header);
        a.batch(&header);
        let p = &a.finish().producers[&(4, 1)];
        assert_eq!((p.ranges.clone(), p.duplicates, p.first_offset, p.last_offset), (vec![(10, 13)], 3, 7, 9));
    }

    /// Any split of a log into chunks, each audited on its own and merged in order, reports what
    /// the whole log does (duplicates counted; listed only within a chunk).
    #[test]
    fn merged_chunks_report_what_the_whole_does() {
        let near_wrap = i32::MAX - 3;
        let records: Vec<(u64, i64, i16, i32)> = [0, 1, 2, 5, 1, 6, 7, 2, 9, 10]
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, 1, 0, *s))
            .chain((0..8).map(|i| (20 + i as u64, 2, 0, ((i64::from(near_wrap) + i) % MODULUS) as i32)))
            .collect();
        let whole = audit(&records);
        for cut in 1..records.len() {
            let mut merged = audit(&records[..cut]);
            merged.merge(audit(&records[cut..]));
            for (key, w) in &whole.producers {
                let m = &merged.producers[key];
                assert_eq!(
                    (&m.ranges, &m.gaps, m.duplicates, m.records),
                    (&w.ranges, &w.gaps, w.duplicates, w.records),
                    "cut at {cut}, producer {key:?}"
                );
                assert_eq!((m.first_offset, m.last_offset), (w.first_offset, w.last_offset));
            }
        }
    }

    proptest! {
        /// Any order of any multiset of sequences: the ranges cover exactly the distinct ones,
        /// and duplicates count the repeats.
        #[test]
        fn ranges_and_duplicates_match_a_set(seqs in proptest::collection::vec(0i32..60, 0..120)) {
            let records: Vec<_> = seqs.iter().enumerate().map(|(i, s)| (i as u64, 1, 0, *s)).collect();
            let r = audit(&records);
            let distinct: std::collections::BTreeSet<i64> = seqs.iter().map(|s| i64::from(*s)).collect();
            if let Some(p) = r.producers.get(&(1, 0)) {
                let covered: std::collections::BTreeSet<i64> = p.ranges.iter().flat_map(|(s, e)| *s..*e).collect();
                prop_assert_eq!(&covered, &distinct);
                prop_assert_eq!(p.duplicates as usize, seqs.len() - distinct.len());
                let missing: i64 = (distinct.iter().max().unwrap() - distinct.iter().min().unwrap() + 1) - distinct.len() as i64;
                prop_assert_eq!(p.missing(), missing);
            } else {
                prop_assert!(seqs.is_empty());
            }
        }
    }
}
