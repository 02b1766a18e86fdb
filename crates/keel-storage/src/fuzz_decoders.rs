//! Fuzz targets for the decoders of what the storage layer reads back from disk: the index
//! checkpoint (`IndexCheckpoint::decode`), the segment header and its durable-end record
//! (`segment::decode_header`, `decode_hint`), the recovery scan (`segment::scan`), and recovery
//! as a whole (`SegmentLog::open` over damaged segment, index and reset-marker files, which also
//! runs the private checkpoint checks and the reset-marker decoder). A disk may hand back any
//! bytes: each must be a typed error or a verified log, never a panic, and never an allocation
//! the files do not justify.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-storage --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::path::PathBuf;
use std::sync::Arc;

use crate::index::{IndexCheckpoint, IndexEntry};
use crate::segment::{self, SEGMENT_HEADER_BYTES, ScanEnd, SegmentHeader};
use crate::testing::test_batch;
use crate::{Disk, LogConfig, SEGMENT_BYTES_MIN, SegmentLog, SimDisk, StorageError, write_atomic};
use bytes::Bytes;
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, mutated};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A checkpoint decodes into entries of the same size as their encoding (24 bytes each) in one
/// exactly sized allocation; the fixed part is for the footer and small temporaries.
const CHECKPOINT_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 2, bytes_fixed: 1024 };

/// The scan keeps one 80-byte entry per valid batch of at least 69 bytes, in a vector that may
/// hold twice its length and, while it grows, its old buffer too: 3 × 80 / 69 < 4 bytes per file
/// byte. The fixed part is the verdict's reason string.
const SCAN_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 4, bytes_fixed: 4096 };

/// Recovery reads each file whole once (1 per byte), scans it (4 per byte, as above), and keeps
/// one 24-byte index entry per 512 bytes of log (`index_interval_bytes` below). The fixed part is
/// the segment recovery may create (its 4 KiB header page and first preallocation step, 4 KiB
/// each, in the simulated disk's volatile and durable images), paths, and the log's own state.
const OPEN_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 8, bytes_fixed: 64 * 1024 };

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: SEGMENT_BYTES_MIN,
        index_interval_bytes: 512,
        preallocate_step_bytes: SEGMENT_HEADER_BYTES,
        ..LogConfig::default()
    }
}

fn dir() -> PathBuf {
    PathBuf::from("/p")
}

fn segment_path(base: u64) -> PathBuf {
    dir().join(format!("{base:020}.log"))
}

fn index_path(base: u64) -> PathBuf {
    dir().join(format!("{base:020}.index"))
}

/// The files a real log leaves behind: a segment (header page and batches, trailing zeros of its
/// preallocation trimmed to keep cases small) and the index checkpoint written when it closed.
struct Image {
    segment: Vec<u8>,
    index: Vec<u8>,
}

fn image() -> Image {
    let disk = SimDisk::new(3);
    let mut log = SegmentLog::open(Arc::new(disk.clone()) as Arc<dyn Disk>, dir(), config()).unwrap();
    for tag in 0..6u64 {
        let mut b = test_batch(tag, (tag % 3 + 1) as u32, 20 + tag as usize * 40);
        log.append(&mut b, 1).unwrap();
    }
    log.flush().unwrap();
    log.close().unwrap();
    let mut segment = disk.durable_bytes(&segment_path(0)).unwrap();
    let hint = segment::decode_hint(&segment);
    let end = segment::scan(&Bytes::from(segment.clone()), SEGMENT_HEADER_BYTES, 0, 0, hint).data_end;
    segment.truncate(end as usize);
    let index = disk.durable_bytes(&index_path(0)).unwrap();
    Image { segment, index }
}

fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let entries = vec![
        IndexEntry { offset: 0, index: 0, position: SEGMENT_HEADER_BYTES },
        IndexEntry { offset: 10, index: 3, position: 5000 },
        IndexEntry { offset: 50, index: 9, position: 9000 },
    ];
    let full = IndexCheckpoint { entries, covered_end: 12_000, next_offset: 70, next_index: 12, max_timestamp_ms: 7 };
    let empty = IndexCheckpoint { entries: vec![], covered_end: SEGMENT_HEADER_BYTES, ..full.clone() };
    vec![full.encode(), empty.encode(), image().index]
}

/// Makes damaged checkpoint bytes pass the CRC again, so that the damage reaches the checks
/// behind it (footer, count, order).
fn reseal_checkpoint(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 4 {
        let at = b.len() - 4;
        let crc = crc32fast::hash(&b[..at]);
        b[at..].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

fn check_checkpoint(input: &[u8]) -> TestCaseResult {
    let decoded = CHECKPOINT_BOUND.check("IndexCheckpoint::decode", input.len(), || IndexCheckpoint::decode(input))?;
    if let Some(c) = decoded {
        // A checkpoint that decodes is exactly its encoding: nothing ignored, nothing invented.
        prop_assert_eq!(c.encode(), input.to_vec());
    }
    Ok(())
}

fn check_segment_bytes(file: &[u8], from: u64, durable_end: u64) -> TestCaseResult {
    let header = CHECKPOINT_BOUND.check("decode_header", file.len(), || segment::decode_header(file))?;
    if let Some(h) = header {
        prop_assert_eq!(&segment::encode_header(h)[..], &file[..28]);
    }
    let hint = CHECKPOINT_BOUND.check("decode_hint", file.len(), || segment::decode_hint(file))?;
    prop_assert!(hint >= SEGMENT_HEADER_BYTES);
    let file = Bytes::copy_from_slice(file);
    let scan = SCAN_BOUND.check("scan", file.len(), || segment::scan(&file, from, 0, 0, durable_end))?;
    // Whatever the verdict, the batches it reports verify where it says they are, back to back.
    let mut pos = from;
    for b in &scan.batches {
        prop_assert_eq!(b.position, pos);
        let h = keel_record::check(&file[b.position as usize..]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(h, b.header);
        pos += h.total_len() as u64;
    }
    prop_assert!(scan.batches.is_empty() || scan.data_end == pos);
    if let ScanEnd::TornTail { position, garbage_end, .. } = scan.end {
        prop_assert!(position <= garbage_end && garbage_end <= file.len() as u64);
    }
    Ok(())
}

/// Writes the files onto a fresh simulated disk and opens the log on them.
fn check_open(segment: Option<&[u8]>, index: Option<&[u8]>, marker: Option<&[u8]>) -> TestCaseResult {
    let disk = SimDisk::new(1);
    disk.create_dir_all(&dir()).unwrap();
    let mut files: Vec<(PathBuf, &[u8])> = Vec::new();
    files.extend(segment.map(|s| (segment_path(0), s)));
    files.extend(index.map(|s| (index_path(0), s)));
    files.extend(marker.map(|s| (dir().join("reset.marker"), s)));
    for (path, bytes) in &files {
        write_atomic(&disk, path, bytes).unwrap();
    }
    let input_len: usize = files.iter().map(|(_, b)| b.len()).sum();
    let shared: Arc<dyn Disk> = Arc::new(disk.clone());
    let opened = OPEN_BOUND.check("SegmentLog::open", input_len, || SegmentLog::open(shared, dir(), config()))?;
    match opened {
        Ok(log) => {
            // A log that opened serves only batches that verify, at the raft index asked for.
            // Recovery verifies only what lies after a trusted checkpoint (DESIGN.md §3), so
            // damage below it is found when read: a Corrupt error then, never bad bytes.
            for index in log.start().index..log.written().index {
                match log.read_entries(index, index + 1, usize::MAX) {
                    Ok(batches) => {
                        prop_assert_eq!(batches.len(), 1);
                        prop_assert_eq!(batches[0].header().raft_index, index);
                    }
                    Err(StorageError::Corrupt { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("reading index {index}: {e}"))),
                }
            }
        }
        Err(StorageError::Corrupt { .. }) => {}
        Err(e) => return Err(TestCaseError::fail(format!("recovery failed with {e}, not a Corrupt error"))),
    }
    Ok(())
}

fn marker(offset: u64, index: u64) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(&index.to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn any_file(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        2 => proptest::sample::select(seeds.clone()).prop_map(Some),
        6 => mutated(seeds).prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(12000))]

    #[test]
    fn fuzz_checkpoint_arbitrary(input in arbitrary_bytes(256)) {
        check_checkpoint(&input)?;
    }

    #[test]
    fn fuzz_checkpoint_damaged(input in mutated(checkpoint_seeds()), reseal in any::<bool>()) {
        let input = if reseal { reseal_checkpoint(input) } else { input };
        check_checkpoint(&input)?;
    }

    #[test]
    fn fuzz_segment_header_and_hint(input in arbitrary_bytes(96)) {
        check_segment_bytes(&input, SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES)?;
    }
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(8000))]

    #[test]
    fn fuzz_scan_damaged_segments(
        file in mutated(vec![image().segment]),
        from in prop_oneof![Just(SEGMENT_HEADER_BYTES), 0u64..20_000],
        durable_end in prop_oneof![Just(SEGMENT_HEADER_BYTES), 0u64..20_000],
    ) {
        check_segment_bytes(&file, from, durable_end)?;
    }

    #[test]
    fn fuzz_recovery_of_damaged_files(
        segment in any_file(vec![image().segment]),
        index in any_file(vec![image().index]),
        marker in any_file(vec![marker(0, 0), marker(70, 12)]),
    ) {
        check_open(segment.as_deref(), index.as_deref(), marker.as_deref())?;
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

#[test]
fn the_image_is_a_valid_log() {
    let image = image();
    assert_eq!(segment::decode_header(&image.segment), Some(SegmentHeader { base_offset: 0, base_index: 0 }));
    assert!(IndexCheckpoint::decode(&image.index).is_some());
    let disk = SimDisk::new(1);
    disk.create_dir_all(&dir()).unwrap();
    write_atomic(&disk, &segment_path(0), &image.segment).unwrap();
    write_atomic(&disk, &index_path(0), &image.index).unwrap();
    let log = SegmentLog::open(Arc::new(disk) as Arc<dyn Disk>, dir(), config()).unwrap();
    assert_eq!(log.written().index, 6, "the image holds the six batches written");
    check_open(Some(&image.segment), Some(&image.index), Some(&marker(0, 0))).unwrap();
}
