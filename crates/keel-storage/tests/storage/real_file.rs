//! The production disk end to end: write through mmap, flush, drop all process state, reopen from
//! the files alone and read everything back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;

use common::{all_batches, batch};
use keel_storage::{Disk, FileDisk, LogConfig, SegmentLog, StorageError};

fn open(dir: &std::path::Path) -> SegmentLog {
    let config = LogConfig { segment_bytes_max: 1 << 20, ..LogConfig::default() };
    SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, dir, config).unwrap()
}

#[test]
fn write_flush_reopen_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("topic-0");
    let mut log = open(&dir);
    for tag in 0..2_000u64 {
        log.append(&mut batch(tag, 4, 200), 1).unwrap();
        if tag % 100 == 99 {
            log.flush().unwrap();
        }
    }
    log.flush().unwrap();
    let written = log.written();
    let expect = all_batches(&log);
    assert!(log.segment_count() >= 2, "1 MiB segments roll");
    // Not closed: the next open recovers from the files as after a process crash.
    drop(log);

    let mut log = open(&dir);
    assert_eq!(log.written(), written);
    assert_eq!(all_batches(&log), expect);
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().any(|n| n == "00000000000000000000.log"), "segments are named by base offset: {names:?}");
    assert!(names.iter().any(|n| n.ends_with(".index")), "sealed segments have an index checkpoint");

    // Continue after recovery, truncate, close cleanly, reopen.
    log.append(&mut batch(9_999, 1, 10), 2).unwrap();
    log.truncate_from_index(1_500).unwrap();
    log.close().unwrap();
    let log = open(&dir);
    assert_eq!(all_batches(&log), expect[..1_500]);
}

#[test]
fn corruption_on_a_real_file_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let mut log = open(&dir);
    for tag in 0..10u64 {
        log.append(&mut batch(tag, 2, 100), 1).unwrap();
        log.flush().unwrap();
    }
    let path = log.segment_paths()[0].clone();
    drop(log);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 40] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    match SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, &dir, LogConfig::default()) {
        Err(StorageError::Corrupt { position, .. }) => assert_eq!(position, 4096),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Thousands of partitions per node are mostly idle: a new log must not reserve a whole
/// preallocation step of disk before anything is written, while a
/// busy one grows to full steps and a segment rolled from a full one starts at a full step.
#[test]
fn idle_logs_reserve_little_and_busy_ones_grow_in_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let step = 256 << 10;
    let config = LogConfig { segment_bytes_max: 1 << 20, preallocate_step_bytes: step, ..LogConfig::default() };
    let mut log = SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, &dir, config.clone()).unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    let first = log.segment_paths()[0].clone();
    assert_eq!(size(&first), keel_storage::PREALLOCATE_FIRST_BYTES, "an empty log reserves only the first step");

    let mut sizes = vec![size(&first)];
    let mut tag = 0;
    while log.segment_count() == 1 {
        log.append(&mut batch(tag, 4, 200), 1).unwrap();
        tag += 1;
        let now = size(&first);
        if log.segment_count() == 1 && now != *sizes.last().unwrap() {
            sizes.push(now);
        }
    }
    // 64 KiB, then doubling up to the step, then whole steps up to the segment's limit.
    assert_eq!(sizes[..3], [64 << 10, 128 << 10, 256 << 10], "{sizes:?}");
    assert!(sizes.windows(2).skip(2).all(|w| w[1] - w[0] <= step), "growth is capped at the step: {sizes:?}");
    let rolled = log.segment_paths()[1].clone();
    assert_eq!(size(&rolled), step, "a segment rolled from a full one starts at a whole step");
    log.flush().unwrap();
    let expect = all_batches(&log);
    drop(log);
    let log = SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, &dir, config).unwrap();
    assert_eq!(all_batches(&log), expect);
}
