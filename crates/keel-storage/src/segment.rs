//! The segment file format and its recovery scan (pure: bytes in, verdict out).
//!
//! A segment file is a 4 KiB header page followed by record batches back to back:
//!
//! ```text
//! 0    8 magic "KEELSEG1"
//! 8    8 base offset        offset of the first record in this segment
//! 16   8 base index         raft index of the first batch in this segment
//! 24   4 crc of bytes 0..24
//! 64   8 durable end        a byte position below which every batch is known to be durable
//! 72   4 crc of bytes 64..72
//! 4096 . batches
//! ```
//!
//! The durable end is what lets recovery tell a crash apart from corruption. A crash loses
//! unflushed writes, and because write-back has no order it can keep later pages and lose
//! earlier ones, so an invalid batch followed by a valid one is not always corruption. Bytes
//! below the durable end were flushed, so an invalid batch there is corruption, always. The
//! durable end is rewritten (without a flush of its own) after each flush, so it is carried to
//! disk by the next flush or by write-back, and never claims more than was flushed.

use bytes::Bytes;
use keel_record::{BatchHeader, DecodeError, HEADER_LEN, MAGIC};

/// Bytes of the segment header page; batches start here.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
const SEGMENT_MAGIC: &[u8; 8] = b"KEELSEG1";
const HINT_AT: usize = 64;

/// The unit a crash loses or keeps: disks tear writes at sector granularity, so even a 4 KiB
/// page can come back with some sectors old (zero) and some new.
const SECTOR: u64 = crate::disk::SECTOR_BYTES;

/// The static part of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Offset of the first record in the segment.
    pub base_offset: u64,
    /// Raft index of the first batch in the segment.
    pub base_index: u64,
}

/// Encodes the static header (bytes 0..28) of a new segment.
pub fn encode_header(h: SegmentHeader) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..8].copy_from_slice(SEGMENT_MAGIC);
    out[8..16].copy_from_slice(&h.base_offset.to_be_bytes());
    out[16..24].copy_from_slice(&h.base_index.to_be_bytes());
    let crc = crc32fast::hash(&out[..24]);
    out[24..28].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes the static header; `None` if it is not a valid segment header.
pub fn decode_header(page: &[u8]) -> Option<SegmentHeader> {
    let b = page.get(..28)?;
    if &b[..8] != SEGMENT_MAGIC || crc32fast::hash(&b[..24]) != u32::from_be_bytes([b[24], b[25], b[26], b[27]]) {
        return None;
    }
    Some(SegmentHeader { base_offset: be_u64(&b[8..16]), base_index: be_u64(&b[16..24]) })
}

/// Position of the durable-end record in the header page.
pub const HINT_POSITION: u64 = HINT_AT as u64;

/// Encodes the durable-end record.
pub fn encode_hint(durable_end: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&durable_end.to_be_bytes());
    let crc = crc32fast::hash(&out[..8]);
    out[8..].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes the durable-end record; a torn or missing record reads as the start of the data,
/// which claims nothing (recovery then treats every invalid batch as a possible crash tail and
/// relies on the valid-batch-after test alone).
pub fn decode_hint(page: &[u8]) -> u64 {
    let Some(b) = page.get(HINT_AT..HINT_AT + 12) else {
        return SEGMENT_HEADER_BYTES;
    };
    if crc32fast::hash(&b[..8]) != u32::from_be_bytes([b[8], b[9], b[10], b[11]]) {
        return SEGMENT_HEADER_BYTES;
    }
    be_u64(&b[..8]).max(SEGMENT_HEADER_BYTES)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A valid batch found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedBatch {
    /// Byte position in the file.
    pub position: u64,
    /// Its header.
    pub header: BatchHeader,
}

/// How the data of a segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Only zeros after the last valid batch (or the end of the file).
    Clean,
    /// A crash tail starting at `position`: invalid bytes that were never durable. Recovery
    /// zeroes from `position` to `garbage_end` so they cannot be mistaken for data later.
    TornTail {
        /// First invalid byte.
        position: u64,
        /// End of the last non-zero byte after it.
        garbage_end: u64,
        /// Why the batch there is invalid.
        reason: String,
    },
    /// An invalid batch inside the durable part of the log.
    Corrupt {
        /// First invalid byte.
        position: u64,
        /// Why.
        reason: String,
    },
}

/// The result of scanning one segment.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Valid, dense batches in order.
    pub batches: Vec<ScannedBatch>,
    /// Where valid data ends.
    pub data_end: u64,
    /// How it ends.
    pub end: ScanEnd,
}

/// Scans `file` (the whole segment file) from byte `from`, where a batch with `next_offset` and
/// `next_index` must start, verifying length, CRC and density of each batch. `durable_end` is the
/// header's claim; invalid bytes below it are corruption.
pub fn scan(file: &Bytes, from: u64, next_offset: u64, next_index: u64, durable_end: u64) -> Scan {
    let mut batches = Vec::new();
    let mut pos = from;
    let (mut offset, mut index) = (next_offset, next_index);
    let len = file.len() as u64;
    loop {
        if pos >= len || is_zero(&file[pos as usize..]) {
            let end = if pos < durable_end {
                ScanEnd::Corrupt { position: pos, reason: format!("data ends before the durable end {durable_end}") }
            } else {
                ScanEnd::Clean
            };
            return Scan { batches, data_end: pos, end };
        }
        let reason = match keel_record::check(&file[pos as usize..]) {
            Ok(h) if h.base_offset == offset && h.raft_index == index => {
                batches.push(ScannedBatch { position: pos, header: h });
                pos += h.total_len() as u64;
                offset = h.next_offset();
                index += 1;
                continue;
            }
            Ok(h) => format!(
                "batch at offset {} index {} where offset {offset} index {index} was expected",
                h.base_offset, h.raft_index
            ),
            Err(DecodeError::BadLength(0)) => "zero length (unwritten bytes)".to_owned(),
            Err(e) => e.to_string(),
        };
        let end = classify(file, pos, offset, index, durable_end, reason);
        return Scan { batches, data_end: pos, end };
    }
}

/// Decides whether the invalid batch at `pos` is a crash tail or corruption.
fn classify(file: &Bytes, pos: u64, offset: u64, index: u64, durable_end: u64, reason: String) -> ScanEnd {
    if pos < durable_end {
        return ScanEnd::Corrupt { position: pos, reason: format!("{reason} (below the durable end {durable_end})") };
    }
    match next_valid_batch(file, pos + 1, offset, index) {
        None => ScanEnd::TornTail { position: pos, garbage_end: last_nonzero_end(file, pos), reason },
        Some(q) if lost_sector_between(file, pos, q) => {
            // A sector in [pos, q) never reached the disk, so nothing from `pos` on was ever
            // flushed: the valid batch at `q` is unflushed data that write-back happened to
            // keep. Serving it would leave a hole in the offsets.
            ScanEnd::TornTail { position: pos, garbage_end: last_nonzero_end(file, pos), reason }
        }
        Some(q) => ScanEnd::Corrupt {
            position: pos,
            reason: format!("{reason}; a valid batch follows at byte {q}, so this is not a crash tail"),
        },
    }
}

/// The first position after `from` where a batch for offset >= `offset` and index >= `index`
/// verifies. Zero runs are skipped quickly; each candidate is cheap to reject unless its length,
/// magic and CRC all hold.
fn next_valid_batch(file: &Bytes, from: u64, offset: u64, index: u64) -> Option<u64> {
    let bytes = &file[..];
    let mut q = from as usize;
    while q + HEADER_LEN <= bytes.len() {
        if bytes[q] == 0 && bytes[q + 1] == 0 && bytes[q + 2] == 0 && bytes[q + 3] == 0 {
            // A valid batch's length is never zero; skip to the next non-zero byte.
            match bytes[q..].iter().position(|&b| b != 0) {
                Some(n) => {
                    // Its length field may start up to 3 bytes before the first non-zero byte.
                    q = (q + n).saturating_sub(3).max(q + 1);
                    continue;
                }
                None => return None,
            }
        }
        if bytes[q + 8] == MAGIC
            && let Ok(h) = keel_record::check(&bytes[q..])
            && h.base_offset >= offset
            && h.raft_index >= index
        {
            return Some(q as u64);
        }
        q += 1;
    }
    None
}

/// True if a sector that starts before `q` reads as all zeros from `pos` on: what a sector that
/// never reached the disk leaves behind. (Data is only ever written over zeros: fresh
/// preallocated space, or space that truncation zeroed and flushed. The zeros may run into the
/// batch at `q`, whose length field starts with zero bytes.) A flushed batch that merely rotted a
/// bit does not look like that, unless its own records hold a zeroed sector: that double
/// coincidence, above the durable end only, is the one case recovery cannot tell apart, and it
/// errs towards treating it as a crash tail.
fn lost_sector_between(file: &Bytes, pos: u64, q: u64) -> bool {
    let len = file.len() as u64;
    let mut sector = pos / SECTOR * SECTOR;
    while sector < q {
        let (a, b) = (sector.max(pos), (sector + SECTOR).min(len));
        if a < b && is_zero(&file[a as usize..b as usize]) {
            return true;
        }
        sector += SECTOR;
    }
    false
}

fn last_nonzero_end(file: &Bytes, from: u64) -> u64 {
    match file[from as usize..].iter().rposition(|&b| b != 0) {
        Some(i) => from + i as u64 + 1,
        None => from,
    }
}

/// True when every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(8);
    let rest = chunks.remainder();
    rest.iter().all(|&b| b == 0) && chunks.into_iter().all(|w| w == [0u8; 8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        let h = SegmentHeader { base_offset: 42, base_index: 7 };
        let mut page = vec![0u8; SEGMENT_HEADER_BYTES as usize];
        page[..28].copy_from_slice(&encode_header(h));
        assert_eq!(decode_header(&page), Some(h));
        assert_eq!(decode_hint(&page), SEGMENT_HEADER_BYTES, "no hint reads as nothing claimed");
        page[HINT_AT..HINT_AT + 12].copy_from_slice(&encode_hint(9000));
        assert_eq!(decode_hint(&page), 9000);
        page[HINT_AT] ^= 1;
        assert_eq!(decode_hint(&page), SEGMENT_HEADER_BYTES, "a torn hint claims nothing");
        page[10] ^= 1;
        assert_eq!(decode_header(&page), None);
    }

    #[test]
    fn is_zero_table() {
        for (bytes, want) in [(&[][..], true), (&[0; 13][..], true), (&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1][..], false)] {
            assert_eq!(is_zero(bytes), want, "{bytes:?}");
        }
    }
}
