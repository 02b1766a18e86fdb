//! Measures the segment log on the real file system (`FileDisk`: mmap + msync): durable appends
//! (append + flush of one batch per iteration) and sequential reads of up to 1 MiB.
// Benchmarks may panic on setup failures: there is nobody to return an error to.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{FileDisk, LogConfig, SegmentLog};

const MIB: u64 = 1024 * 1024;
/// Size of every record value.
const VALUE_BYTES: usize = 1024;
/// Data written before the read benchmark starts.
const READ_FILL_BYTES: u64 = 64 * MIB;
/// `bytes_max` of every read.
const READ_BYTES_MAX: usize = MIB as usize;

fn config() -> LogConfig {
    LogConfig { segment_bytes_max: 256 * MIB, ..Default::default() }
}

/// An unstamped batch of `records` records, each with a 1 KiB value (and no key).
fn batch(records: usize) -> Vec<u8> {
    let value: Vec<u8> = (0..VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    let mut builder = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for i in 0..records {
        let record =
            NewRecord { timestamp_ms: 1_700_000_000_000 + i as i64, key: None, value: Some(&value), headers: &[] };
        builder.push(record).expect("record fits in the batch");
    }
    builder.build().to_vec()
}

/// A fresh log in a fresh temp dir. The dir is returned so that it outlives the log.
fn open_log() -> (tempfile::TempDir, SegmentLog) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = SegmentLog::open(Arc::new(FileDisk::new()), dir.path().join("log"), config()).expect("open log");
    (dir, log)
}

/// One iteration = append one batch + flush it (msync), i.e. one durable append with no group
/// commit. Segments roll every 256 MiB during the run, as they would in production: with 256-record
/// batches a roll (seal + create + preallocate + populate the next segment) lands in a few samples,
/// which shows as high outliers and a wide interval; the median is the steady-state cost.
fn append_flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_flush");
    group.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    for records in [1usize, 16, 256] {
        let template = batch(records);
        // append() stamps the batch in place, so each iteration appends a fresh copy of it.
        let mut buf = template.clone();
        // Set up on first use (during warm-up, untimed), so that a filtered-out benchmark costs nothing.
        let mut state: Option<(tempfile::TempDir, SegmentLog)> = None;
        group.throughput(Throughput::Bytes(template.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(records), |b| {
            let (_, log) = state.get_or_insert_with(|| {
                let (dir, log) = open_log();
                assert!(template.len() <= log.config().batch_bytes_max(), "batch must fit in a segment");
                (dir, log)
            });
            b.iter(|| {
                buf.copy_from_slice(&template);
                log.append(&mut buf, 1).expect("append");
                black_box(log.flush().expect("flush"))
            })
        });
        if let Some((dir, log)) = state {
            println!(
                "append_flush/{records}: {} bytes per batch; wrote {} MiB in {} segment(s)",
                template.len(),
                log.size_bytes() / MIB,
                log.segment_count()
            );
            drop(log);
            drop(dir);
        }
    }
    group.finish();
}

/// A log holding ~64 MiB of 16-record batches, a whole number of reads of `READ_BYTES_MAX`:
/// returns it with the bytes every read returns. Checks, untimed, that every read returns the same
/// number of batches and that the reads end exactly at the end of the log.
fn filled_log() -> (tempfile::TempDir, SegmentLog, usize) {
    let template = batch(16);
    let batch_len = template.len();
    let per_read = (READ_BYTES_MAX / batch_len).max(1);
    let reads = READ_FILL_BYTES.div_ceil((per_read * batch_len) as u64) as usize;
    let (dir, mut log) = open_log();
    let mut buf = template.clone();
    for _ in 0..reads * per_read {
        buf.copy_from_slice(&template);
        log.append(&mut buf, 1).expect("append");
    }
    log.flush().expect("flush");
    let mut offset = log.start().offset;
    for _ in 0..reads {
        let batches = log.read(offset, READ_BYTES_MAX, u64::MAX).expect("read");
        assert_eq!(batches.len(), per_read, "a read at offset {offset} returned {} batches", batches.len());
        offset = batches.last().expect("a read returns batches").header().next_offset();
    }
    assert_eq!(offset, log.written().offset, "the reads cover the whole log");
    let read_bytes = per_read * batch_len;
    println!(
        "read: {} MiB in {} batches of {batch_len} bytes, {} segment(s); {per_read} batches ({read_bytes} B) a read",
        log.size_bytes() / MIB,
        reads * per_read,
        log.segment_count()
    );
    (dir, log, read_bytes)
}

/// One iteration = one `read` of up to 1 MiB (zero-copy from the mapping, CRC of every batch
/// checked), walking the log from start to end and wrapping around.
fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    group.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    // Throughput must be set before the benchmark runs, so the batch size is computed up front.
    let batch_len = batch(16).len();
    let read_bytes = (READ_BYTES_MAX / batch_len).max(1) * batch_len;
    group.throughput(Throughput::Bytes(read_bytes as u64));
    let mut state: Option<(tempfile::TempDir, SegmentLog, u64)> = None;
    group.bench_function(BenchmarkId::new("sequential", "1MiB"), |b| {
        let (_, log, offset) = state.get_or_insert_with(|| {
            let (dir, log, bytes) = filled_log();
            assert_eq!(bytes, read_bytes);
            let start = log.start().offset;
            (dir, log, start)
        });
        let (start, end) = (log.start().offset, log.written().offset);
        b.iter(|| {
            let batches = log.read(*offset, READ_BYTES_MAX, u64::MAX).expect("read");
            *offset = batches.last().map_or(end, |b| b.header().next_offset());
            if *offset >= end {
                *offset = start;
            }
            black_box(batches)
        })
    });
    group.finish();
}

// What criterion_group!/criterion_main! expand to, written out: the macros' generated `pub fn`
// has no doc comment, which trips the workspace's missing_docs lint.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    append_flush(&mut c);
    read(&mut c);
    c.final_summary();
}
