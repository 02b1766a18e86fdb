//! Fuzz targets for the decoders of what the client reads back from disk: the outbox log's
//! entries (`outbox::log::decode_entries`) and its recovery as a whole (`OutboxLog::open` over a
//! damaged segment file). A disk may hand back any bytes: each must be a typed error or a
//! verified log, never a panic, and never an allocation the files do not justify.
//!
//! CI runs a few thousand cases per target, well under a second in the debug profile. A longer
//! campaign: `PROPTEST_CASES=100000 cargo test -p keel-client --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, mutated};
use keel_storage::{Disk, SimDisk};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

use crate::outbox::log::{Entry, OpenError, OutboxLog, RecordEntry, StampEntry, decode_entries};
use crate::producer::ProducerRecord;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// An entry is at least 9 bytes of input (a tag and a u64) and decodes into one `Entry` (a few
/// hundred bytes at most with its strings' headers) in a vector that may hold twice its length
/// and its old buffer while it grows; keys, values, topics and ids are copies of their bytes.
const ENTRIES_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 96, bytes_fixed: 4096 };

/// Recovery reads the file once, decodes its entries (as above), and may zero a torn tail in
/// 64 KiB chunks, which the simulated disk copies into its images; paths and the log's state
/// are the rest of the fixed part.
const OPEN_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 128, bytes_fixed: 512 * 1024 };

fn entries() -> Vec<Entry> {
    vec![
        Entry::Record(RecordEntry {
            id: 7,
            topic: "orders".into(),
            partition: 2,
            record: ProducerRecord::new("value")
                .with_key("key")
                .with_header("h", Some(Bytes::from_static(b"v")))
                .with_header("empty", None)
                .with_partition(2),
        }),
        Entry::Stamp(StampEntry {
            topic: "orders".into(),
            partition: 2,
            producer_id: 11,
            epoch: 1,
            base_sequence: 5,
            ids: vec![7, 8],
            stamped_at_ms: Some(1_700_000_000_000),
        }),
        Entry::Done(vec![3, 4, 5]),
        Entry::Mark(99),
    ]
}

/// A segment file as the log writes it: a few frames, trailing zeros trimmed.
fn segment() -> Vec<u8> {
    let disk = SimDisk::new(1);
    let (mut log, _) = OutboxLog::open(Arc::new(disk.clone()), Path::new("/o"), 4096).unwrap();
    for e in entries() {
        log.append(&[e]).unwrap();
    }
    let mut bytes = disk.durable_bytes(&Path::new("/o").join(format!("{:020}.outbox", 0))).unwrap();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

fn payload_seeds() -> Vec<Vec<u8>> {
    // The payload of each frame: the frame header is 24 bytes, then the entries.
    let seg = segment();
    vec![seg[24..].to_vec(), seg.clone()]
}

fn check_entries(input: &[u8]) -> TestCaseResult {
    let decoded = ENTRIES_BOUND.check("decode_entries", input.len(), || decode_entries(input))?;
    let _ = decoded.map(|e| e.len());
    Ok(())
}

fn check_open(file: &[u8]) -> TestCaseResult {
    let disk = SimDisk::new(2);
    let dir = Path::new("/o");
    disk.create_dir_all(dir).unwrap();
    let f = disk.create(&dir.join(format!("{:020}.outbox", 0))).unwrap();
    if !file.is_empty() {
        f.set_len(file.len() as u64).unwrap();
        f.write(0, file).unwrap();
        f.flush(0, file.len() as u64).unwrap();
    }
    disk.sync_dir(dir).unwrap();
    let shared: Arc<dyn Disk> = Arc::new(disk);
    let opened = OPEN_BOUND.check("OutboxLog::open", file.len(), || OutboxLog::open(shared, dir, 4096))?;
    match opened {
        Ok(_) | Err(OpenError::Corrupt(_)) => Ok(()),
        Err(OpenError::Io(e)) => Err(proptest::test_runner::TestCaseError::fail(format!("an I/O error: {e}"))),
    }
}

#[test]
fn the_counting_allocator_is_installed() {
    assert_counting();
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(4000))]

    #[test]
    fn entries_decode_arbitrary_bytes(input in arbitrary_bytes(512)) {
        check_entries(&input)?;
    }

    #[test]
    fn entries_decode_damaged_payloads(input in mutated(payload_seeds())) {
        check_entries(&input)?;
    }

    #[test]
    fn the_log_opens_damaged_segments(input in mutated(vec![segment()])) {
        check_open(&input)?;
    }
}
