//! The sparse offset index of a segment and its checkpoint file (`.index`).
//!
//! In memory: one entry per `index_interval_bytes` of log (and one for the first batch), mapping a
//! batch's base offset and raft index to its byte position. On disk the index is a checkpoint:
//! written whole (write-temp, flush, rename, directory sync) when a segment is sealed or the log
//! is closed, with the position it covers, so that recovery verifies only what lies after it.
//!
//! ```text
//! entries: count × (offset u64, index u64, position u64)
//! footer:  covered_end u64, next_offset u64, next_index u64, max_timestamp_ms i64, count u64,
//!          magic "KEELIDX1", crc32 u32 of everything before it
//! ```

/// One index entry: the batch at `position` starts at `offset` and raft `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Base offset of the batch.
    pub offset: u64,
    /// Raft index of the batch.
    pub index: u64,
    /// Byte position of the batch in the segment file.
    pub position: u64,
}

/// A checkpoint: the entries and the state of the segment at `covered_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexCheckpoint {
    /// Entries, ascending.
    pub entries: Vec<IndexEntry>,
    /// Every batch below this byte position was verified when the checkpoint was written.
    pub covered_end: u64,
    /// Offset of the batch that starts at `covered_end`.
    pub next_offset: u64,
    /// Raft index of the batch that starts at `covered_end`.
    pub next_index: u64,
    /// Largest record timestamp below `covered_end`.
    pub max_timestamp_ms: i64,
}

const ENTRY_BYTES: usize = 24;
const FOOTER_BYTES: usize = 8 * 5 + 8 + 4;
const MAGIC: &[u8; 8] = b"KEELIDX1";

impl IndexCheckpoint {
    /// Encodes the checkpoint file.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * ENTRY_BYTES + FOOTER_BYTES);
        for e in &self.entries {
            out.extend_from_slice(&e.offset.to_be_bytes());
            out.extend_from_slice(&e.index.to_be_bytes());
            out.extend_from_slice(&e.position.to_be_bytes());
        }
        for v in [self.covered_end, self.next_offset, self.next_index, self.max_timestamp_ms as u64] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        out.extend_from_slice(MAGIC);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a checkpoint file; `None` if it is torn, corrupt or inconsistent (the caller then
    /// rebuilds the index by scanning, which is always correct, only slower).
    pub fn decode(bytes: &[u8]) -> Option<IndexCheckpoint> {
        let body_len = bytes.len().checked_sub(4)?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32fast::hash(body) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return None;
        }
        let footer = body.get(body.len().checked_sub(FOOTER_BYTES - 4)?..)?;
        if &footer[40..48] != MAGIC {
            return None;
        }
        let word = |b: &[u8], i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let count = usize::try_from(word(footer, 4)).ok()?;
        if count.checked_mul(ENTRY_BYTES)? != body.len() - footer.len() {
            return None;
        }
        let entries: Vec<IndexEntry> = body[..count * ENTRY_BYTES]
            .chunks_exact(ENTRY_BYTES)
            .map(|c| IndexEntry { offset: word(c, 0), index: word(c, 1), position: word(c, 2) })
            .collect();
        let checkpoint = IndexCheckpoint {
            entries,
            covered_end: word(footer, 0),
            next_offset: word(footer, 1),
            next_index: word(footer, 2),
            max_timestamp_ms: word(footer, 3) as i64,
        };
        checkpoint.is_consistent().then_some(checkpoint)
    }

    /// Entries ascend in every coordinate and lie below the covered end.
    fn is_consistent(&self) -> bool {
        let ascending = self
            .entries
            .windows(2)
            .all(|w| w[0].offset <= w[1].offset && w[0].index < w[1].index && w[0].position < w[1].position);
        let below = self
            .entries
            .last()
            .is_none_or(|e| e.position < self.covered_end && e.index < self.next_index && e.offset <= self.next_offset);
        ascending && below
    }
}

/// The last entry at or before the batch holding `key`, by the coordinate `key_of` picks.
pub fn floor(entries: &[IndexEntry], key: u64, key_of: impl Fn(&IndexEntry) -> u64) -> Option<IndexEntry> {
    let n = entries.partition_point(|e| key_of(e) <= key);
    n.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IndexCheckpoint {
        IndexCheckpoint {
            entries: vec![
                IndexEntry { offset: 10, index: 3, position: 4096 },
                IndexEntry { offset: 50, index: 9, position: 9000 },
            ],
            covered_end: 12000,
            next_offset: 70,
            next_index: 12,
            max_timestamp_ms: 1234,
        }
    }

    #[test]
    fn round_trip_and_every_truncation_or_flip_rejected() {
        let c = sample();
        let bytes = c.encode();
        assert_eq!(IndexCheckpoint::decode(&bytes), Some(c));
        for cut in 0..bytes.len() {
            assert_eq!(IndexCheckpoint::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            assert_eq!(IndexCheckpoint::decode(&b), None, "flip at {i}");
        }
    }

    #[test]
    fn floor_table() {
        let e = sample().entries;
        for (key, want) in [(0, None), (10, Some(4096)), (49, Some(4096)), (50, Some(9000)), (99, Some(9000))] {
            assert_eq!(floor(&e, key, |e| e.offset).map(|e| e.position), want, "key {key}");
        }
    }
}
