//! The segment log against a model (a Vec of batches), plus its unit behaviours: dense offsets,
//! rolls, bounded reads, truncation, retention, reset and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use common::{all_batches, batch, sim_log, small_config};
use keel_storage::{LogConfig, LogPosition, SimDisk, StorageError};
use proptest::prelude::*;

#[test]
fn offsets_are_dense_and_reads_are_bounded() {
    let disk = SimDisk::new(1);
    let mut log = sim_log(&disk, small_config()).unwrap();
    assert_eq!(
        (log.start(), log.written(), log.durable()),
        (LogPosition::default(), LogPosition::default(), LogPosition::default())
    );
    let mut expect_offset = 0;
    for tag in 0..50u64 {
        let count = (tag % 5 + 1) as u32;
        let a = log.append(&mut batch(tag, count, 1000), 1).unwrap();
        assert_eq!(a.header.base_offset, expect_offset, "base offset = previous base + previous count");
        assert_eq!(a.header.raft_index, tag);
        expect_offset += u64::from(count);
    }
    assert_eq!(log.written(), LogPosition { offset: expect_offset, index: 50 });
    assert!(log.segment_count() > 1, "small segments roll");
    // Sealing a segment flushes it, so durable has moved, but the active segment's appends are not
    // durable before a flush.
    assert!(log.durable() > LogPosition::default() && log.durable() < log.written());
    assert_eq!(log.flush().unwrap(), log.written());

    // Every offset is readable and lands in the batch that holds it.
    for offset in 0..expect_offset {
        let got = log.read(offset, 1, u64::MAX).unwrap();
        assert_eq!(got.len(), 1, "one batch at least, even over the byte budget");
        let h = got[0].header();
        assert!(h.base_offset <= offset && offset < h.next_offset(), "offset {offset} in {h:?}");
    }
    // Byte budget and the upper bound (high watermark) are respected.
    let some = log.read(0, 2000, u64::MAX).unwrap();
    assert!(some.iter().map(|b| b.bytes().len()).sum::<usize>() <= 2000 || some.len() == 1);
    let below_hw = log.read(0, usize::MAX, 7).unwrap();
    assert!(below_hw.iter().all(|b| b.header().next_offset() <= 7));
    assert_eq!(
        log.read(expect_offset, 1000, u64::MAX).unwrap().len(),
        0,
        "reading at the end waits, it is not an error"
    );
    assert!(matches!(log.read(expect_offset + 1, 1000, u64::MAX), Err(StorageError::OutOfRange { .. })));
}

#[test]
fn bad_input_changes_nothing() {
    let disk = SimDisk::new(2);
    let mut log = sim_log(&disk, small_config()).unwrap();
    log.append(&mut batch(1, 3, 10), 1).unwrap();
    let before = (log.written(), all_batches(&log));
    let mut garbage = vec![0u8; 100];
    assert!(matches!(log.append(&mut garbage, 1), Err(StorageError::InvalidArgument(_))));
    let mut flipped = batch(2, 1, 10);
    flipped[50] ^= 1;
    assert!(matches!(log.append_stamped(&flipped), Err(StorageError::InvalidArgument(_))));
    // A stamped batch that does not follow the end is refused.
    let mut wrong = batch(3, 1, 10);
    keel_record::stamp(&mut wrong, 99, 1, 1).unwrap();
    assert!(matches!(log.append_stamped(&wrong), Err(StorageError::InvalidArgument(_))));
    let mut big = batch(4, 200, 1000);
    assert!(matches!(log.append(&mut big, 1), Err(StorageError::InvalidArgument(_))), "larger than a segment");
    assert!(log.truncate_from_offset(1).is_err(), "inside a batch");
    assert!(log.truncate_from_index(5).is_err(), "past the end");
    assert_eq!((log.written(), all_batches(&log)), before);
    let bad = LogConfig { segment_bytes_max: 10, ..LogConfig::default() };
    assert!(matches!(sim_log(&disk, bad), Err(StorageError::InvalidArgument(_))));
}

#[test]
fn raft_only_entries_take_an_index_but_no_offsets() {
    let disk = SimDisk::new(3);
    let mut log = sim_log(&disk, small_config()).unwrap();
    log.append(&mut batch(1, 2, 10), 1).unwrap();
    let mut blank = keel_record::raft_entry(b"", 2, 0, 0).unwrap().to_vec();
    let a = log.append(&mut blank, 2).unwrap();
    assert_eq!((a.header.base_offset, a.header.raft_index), (2, 1));
    let b = log.append(&mut batch(2, 1, 10), 2).unwrap();
    assert_eq!((b.header.base_offset, b.header.raft_index), (2, 2));
    let read = log.read(2, usize::MAX, u64::MAX).unwrap();
    assert_eq!(read.len(), 1, "consumers never see raft-only entries");
    assert_eq!(log.read_entries(0, 3, usize::MAX).unwrap().len(), 3, "raft sees every entry");
    // Truncating at offset 2 removes the raft-only entry at that offset too.
    log.truncate_from_offset(2).unwrap();
    assert_eq!(log.written(), LogPosition { offset: 2, index: 1 });
}

#[test]
fn retention_deletes_whole_old_segments_only() {
    let disk = SimDisk::new(4);
    let config = LogConfig { retention_bytes: Some(100_000), retention_ms: Some(1_000), ..small_config() };
    let mut log = sim_log(&disk, config).unwrap();
    for tag in 0..400u64 {
        log.append(&mut batch(tag, 2, 400), 1).unwrap();
    }
    log.flush().unwrap();
    let segments = log.segment_count();
    // Nothing may go past the caller's safe point.
    assert_eq!(log.apply_retention(0, 0).unwrap(), LogPosition::default());
    let start = log.apply_retention(0, u64::MAX).unwrap();
    assert!(start.offset > 0 && log.segment_count() < segments, "size retention deleted segments");
    assert!(log.size_bytes() >= 100_000 - keel_storage::SEGMENT_BYTES_MIN, "kept at least the retained size");
    assert!(matches!(log.read(0, 1, u64::MAX), Err(StorageError::OutOfRange { .. })));
    assert_eq!(log.read(start.offset, 1, u64::MAX).unwrap()[0].header().base_offset, start.offset);
    // Time retention: records have timestamps ~1_000..1_400 ms; at now = 1_000_000 all sealed
    // segments are old, but the active one stays.
    let start = log.apply_retention(1_000_000, u64::MAX).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert_eq!(start, log.start());
    drop(log);
    let log = sim_log(&disk, small_config()).unwrap();
    assert_eq!(log.start(), start, "the new start survives reopening");
}

#[test]
fn reset_restarts_the_log_and_survives_reopen() {
    let disk = SimDisk::new(5);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..100u64 {
        log.append(&mut batch(tag, 1, 300), 1).unwrap();
    }
    log.flush().unwrap();
    let at = LogPosition { offset: 1_000, index: 500 };
    log.reset(at).unwrap();
    assert_eq!((log.start(), log.written(), log.durable()), (at, at, at));
    let a = log.append(&mut batch(7, 1, 10), 3).unwrap();
    assert_eq!((a.header.base_offset, a.header.raft_index), (1_000, 500));
    log.flush().unwrap();
    drop(log);
    let log = sim_log(&disk, small_config()).unwrap();
    assert_eq!(log.start(), at);
    assert_eq!(log.written(), LogPosition { offset: 1_001, index: 501 });
}

#[test]
fn truncation_is_durable() {
    let disk = SimDisk::new(6);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..300u64 {
        log.append(&mut batch(tag, 1, 300), 1).unwrap();
    }
    log.flush().unwrap();
    let keep = all_batches(&log)[..123].to_vec();
    log.truncate_from_index(123).unwrap();
    disk.crash_with(keel_storage::CrashMode::DropUnflushed);
    let log = sim_log(&disk, small_config()).unwrap();
    assert_eq!(all_batches(&log), keep, "truncated batches never come back after a crash");
}

#[test]
fn flush_tickets_group_commit_and_ignore_stale_completions() {
    let disk = SimDisk::new(8);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..10u64 {
        log.append(&mut batch(tag, 1, 10), 1).unwrap();
    }
    let flushes = disk.flush_count();
    let ticket = log.begin_flush().unwrap().expect("something to flush");
    // Appends continue while the flush runs; the flush covers only what was there when it began.
    log.append(&mut batch(10, 1, 10), 1).unwrap();
    let result = ticket.run();
    assert_eq!(log.complete_flush(ticket, result).unwrap(), LogPosition { offset: 10, index: 10 });
    assert_eq!(disk.flush_count(), flushes + 1, "ten appends, one flush");
    // A flush that began before a truncation must not raise durable past the cut.
    let ticket = log.begin_flush().unwrap().unwrap();
    log.truncate_from_index(5).unwrap();
    let result = ticket.run();
    assert_eq!(log.complete_flush(ticket, result).unwrap(), LogPosition { offset: 5, index: 5 });
}

#[derive(Debug, Clone)]
enum Op {
    Append { count: u32, value_len: usize },
    Flush,
    Truncate { back: u64 },
    Reopen,
    Retain { keep_bytes: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..8, 0usize..600).prop_map(|(count, value_len)| Op::Append { count, value_len }),
        2 => Just(Op::Flush),
        1 => (0u64..20).prop_map(|back| Op::Truncate { back }),
        1 => Just(Op::Reopen),
        1 => (20_000u64..200_000).prop_map(|keep_bytes| Op::Retain { keep_bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any sequence of appends, flushes, truncations, reopens and retention agrees with a Vec.
    #[test]
    fn prop_log_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let disk = SimDisk::new(9);
        let mut log = sim_log(&disk, small_config()).unwrap();
        // The model: batches by raft index, and the index of the first one still kept.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut first = 0u64;
        let mut tag = 0u64;
        for op in ops {
            match op {
                Op::Append { count, value_len } => {
                    let mut b = batch(tag, count, value_len);
                    tag += 1;
                    log.append(&mut b, 1).unwrap();
                    model.push(b);
                }
                Op::Flush => {
                    prop_assert_eq!(log.flush().unwrap(), log.written());
                }
                Op::Truncate { back } => {
                    let end = first + model.len() as u64;
                    let at = end.saturating_sub(back).max(log.start().index);
                    log.truncate_from_index(at).unwrap();
                    model.truncate((at - first) as usize);
                }
                Op::Reopen => {
                    log.flush().unwrap();
                    drop(log);
                    log = sim_log(&disk, small_config()).unwrap();
                }
                Op::Retain { keep_bytes } => {
                    let cfg = LogConfig { retention_bytes: Some(keep_bytes), ..small_config() };
                    log.flush().unwrap();
                    drop(log);
                    log = sim_log(&disk, cfg).unwrap();
                    let start = log.apply_retention(0, u64::MAX).unwrap();
                    model.drain(..(start.index - first) as usize);
                    first = start.index;
                    drop(log);
                    log = sim_log(&disk, small_config()).unwrap();
                }
            }
            prop_assert_eq!(log.start().index, first);
            prop_assert_eq!(log.written().index, first + model.len() as u64);
            prop_assert!(log.start() <= log.durable() && log.durable() <= log.written());
        }
        prop_assert_eq!(&all_batches(&log), &model);
        // Offsets are dense across everything that is left.
        let mut next = log.start().offset;
        for b in log.read_entries(log.start().index, log.written().index, usize::MAX).unwrap() {
            prop_assert_eq!(b.header().base_offset, next);
            next = b.header().next_offset();
        }
    }
}
