//! Exhaustive damage to a small segment: the file cut at every byte, and one bit flipped at every
//! byte. Recovery must never panic, must serve only valid batches, must keep every durable one
//! or refuse loudly with `Corrupt`, and must flag damage inside the durable part as `Corrupt`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::path::Path;

use common::{all_batches, batch, sim_log, small_config};
use keel_storage::segment::{SEGMENT_HEADER_BYTES, decode_hint};
use keel_storage::{CrashMode, SimDisk, StorageError};

struct Prepared {
    disk: SimDisk,
    segment: std::path::PathBuf,
    batches: Vec<Vec<u8>>,
    /// Byte ranges of the batches in the segment file.
    ranges: Vec<(u64, u64)>,
    /// The durable end recorded in the (durable) header.
    hint: u64,
}

/// Eight batches, each flushed on its own, then power loss (so the durable image is exactly what
/// a crashed node would find).
fn prepare() -> Prepared {
    let disk = SimDisk::new(11);
    let mut log = sim_log(&disk, small_config()).unwrap();
    let mut ranges = Vec::new();
    let mut pos = SEGMENT_HEADER_BYTES;
    for tag in 0..8u64 {
        let mut b = batch(tag, (tag % 3 + 1) as u32, 40 + tag as usize * 30);
        log.append(&mut b, 1).unwrap();
        log.flush().unwrap();
        ranges.push((pos, pos + b.len() as u64));
        pos += b.len() as u64;
    }
    let batches = all_batches(&log);
    let segment = log.segment_paths()[0].clone();
    drop(log);
    disk.crash_with(CrashMode::DropUnflushed);
    let hint = decode_hint(&disk.durable_bytes(&segment).unwrap());
    assert_eq!(hint, ranges[7].0, "the hint lags one flush: it covers all but the last batch");
    Prepared { disk, segment, batches, ranges, hint }
}

/// Opens the damaged log and checks the universal rules; returns the batches served, or `None`
/// for `Corrupt`.
fn recover(p: &Prepared, disk: &SimDisk, what: &str) -> Option<Vec<Vec<u8>>> {
    match sim_log(disk, small_config()) {
        Ok(log) => {
            let got = all_batches(&log);
            assert!(got.len() <= p.batches.len(), "{what}: more batches than written");
            assert_eq!(got[..], p.batches[..got.len()], "{what}: served something that was not written");
            Some(got)
        }
        Err(StorageError::Corrupt { .. }) => None,
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

#[test]
fn cut_at_every_byte() {
    let p = prepare();
    let file_len = p.disk.durable_bytes(&p.segment).unwrap().len() as u64;
    let data_end = p.ranges.last().unwrap().1;
    for cut in (0..=data_end + 10).chain([file_len]) {
        let disk = p.disk.fork();
        disk.cut(&p.segment, cut).unwrap();
        let what = format!("cut at {cut}");
        let whole = p.ranges.iter().filter(|r| r.1 <= cut).count();
        match recover(&p, &disk, &what) {
            Some(got) => {
                assert!(cut >= p.hint, "{what}: durable bytes are missing, yet recovery succeeded");
                assert_eq!(got.len(), whole, "{what}: every whole batch is kept");
            }
            None => assert!(cut < p.hint, "{what}: a cut past the durable end is a crash tail, not corruption"),
        }
    }
}

#[test]
fn flip_a_bit_at_every_byte() {
    let p = prepare();
    let data_end = p.ranges.last().unwrap().1;
    for byte in 0..data_end + 600 {
        let disk = p.disk.fork();
        disk.flip_bit(&p.segment, byte, (byte % 8) as u8).unwrap();
        let what = format!("flip at {byte}");
        let in_batch = p.ranges.iter().position(|r| r.0 <= byte && byte < r.1);
        let got = recover(&p, &disk, &what);
        match (byte, in_batch) {
            (0..28, _) => assert_eq!(got, None, "{what}: a damaged segment header is corruption"),
            (_, Some(k)) if k < 7 => assert_eq!(got, None, "{what}: damage inside a durable batch is corruption"),
            (_, Some(_)) => assert_eq!(got.map(|g| g.len()), Some(7), "{what}: a damaged last batch is a crash tail"),
            // Unused header bytes, the hint (whose loss only claims less) and the zeros past the
            // data (garbage after the last batch is a crash tail).
            _ => assert_eq!(got.map(|g| g.len()), Some(8), "{what}: nothing valid may be dropped"),
        }
    }
}

/// Without per-batch flushes the hint claims nothing, and corruption is told from a crash by the
/// valid batch that follows it.
#[test]
fn mid_log_corruption_after_one_flush_is_corrupt() {
    let disk = SimDisk::new(12);
    let mut log = sim_log(&disk, small_config()).unwrap();
    let mut positions = Vec::new();
    let mut pos = SEGMENT_HEADER_BYTES;
    for tag in 0..5u64 {
        let mut b = batch(tag, 3, 50);
        log.append(&mut b, 1).unwrap();
        positions.push(pos);
        pos += b.len() as u64;
    }
    log.flush().unwrap();
    let segment = log.segment_paths()[0].clone();
    drop(log);
    disk.crash_with(CrashMode::DropUnflushed);
    disk.flip_bit(&segment, positions[2] + 30, 3).unwrap();
    match sim_log(&disk, small_config()) {
        Err(StorageError::Corrupt { segment: s, position, .. }) => {
            assert_eq!((s.as_path(), position), (segment.as_path(), positions[2]));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// A bad index checkpoint is never trusted: recovery rebuilds the index by scanning.
#[test]
fn damaged_index_checkpoints_are_rebuilt() {
    let disk = SimDisk::new(13);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..200u64 {
        log.append(&mut batch(tag, 2, 300), 1).unwrap();
    }
    log.flush().unwrap();
    let expect = all_batches(&log);
    let index = log.segment_paths()[0].with_extension("index");
    drop(log);
    let len = disk.durable_bytes(&index).unwrap().len() as u64;
    for byte in (0..len).step_by(7) {
        let d = disk.fork();
        d.flip_bit(&index, byte, (byte % 8) as u8).unwrap();
        let log = sim_log(&d, small_config()).unwrap();
        assert_eq!(all_batches(&log), expect, "flip at index byte {byte}");
    }
    assert!(Path::new(&index).extension().is_some());
}

/// Reads verify the CRC too: rot in a sealed segment (not rescanned on open, its checkpoint covers
/// it) is reported as `Corrupt`, never served.
#[test]
fn reads_never_serve_rotted_bytes() {
    let disk = SimDisk::new(14);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..200u64 {
        log.append(&mut batch(tag, 2, 300), 1).unwrap();
    }
    log.flush().unwrap();
    let first = log.segment_paths()[0].clone();
    drop(log);
    disk.flip_bit(&first, SEGMENT_HEADER_BYTES + 100, 1).unwrap();
    let log = sim_log(&disk, small_config()).unwrap();
    assert!(matches!(log.read(0, 1 << 20, u64::MAX), Err(StorageError::Corrupt { .. })));
    assert!(matches!(log.read_entries(0, 1, 1 << 20), Err(StorageError::Corrupt { .. })));
}

/// The same eight batches, but the log was closed: every segment has an index checkpoint and the
/// header claims all of the data durable. A checkpoint that points past what is left of a cut file
/// must be refused (and the file then found `Corrupt`), never sliced into.
fn prepare_closed() -> Prepared {
    let disk = SimDisk::new(15);
    let mut log = sim_log(&disk, small_config()).unwrap();
    let mut ranges = Vec::new();
    let mut pos = SEGMENT_HEADER_BYTES;
    for tag in 0..8u64 {
        let mut b = batch(tag, (tag % 3 + 1) as u32, 40 + tag as usize * 30);
        log.append(&mut b, 1).unwrap();
        ranges.push((pos, pos + b.len() as u64));
        pos += b.len() as u64;
    }
    let batches = all_batches(&log);
    let segment = log.segment_paths()[0].clone();
    log.close().unwrap();
    disk.crash_with(CrashMode::DropUnflushed);
    assert!(disk.durable_bytes(&segment.with_extension("index")).is_some(), "close writes the checkpoint");
    let hint = decode_hint(&disk.durable_bytes(&segment).unwrap());
    assert_eq!(hint, pos, "close records the whole data as durable");
    Prepared { disk, segment, batches, ranges, hint }
}

/// Like `recover`, but a read may also refuse with `Corrupt`: batches the checkpoint covers are
/// verified when read, not when opened. Returns the batches served, or `None` for `Corrupt`.
fn recover_and_read(p: &Prepared, disk: &SimDisk, what: &str) -> Option<Vec<Vec<u8>>> {
    let log = match sim_log(disk, small_config()) {
        Ok(log) => log,
        Err(StorageError::Corrupt { .. }) => return None,
        Err(e) => panic!("{what}: unexpected error {e}"),
    };
    let (start, end) = (log.start().index, log.written().index);
    let got: Vec<Vec<u8>> = match log.read_entries(start, end, usize::MAX) {
        Ok(batches) => batches.into_iter().map(|b| b.bytes().to_vec()).collect(),
        Err(StorageError::Corrupt { .. }) => return None,
        Err(e) => panic!("{what}: unexpected read error {e}"),
    };
    assert!(got.len() <= p.batches.len(), "{what}: more batches than written");
    assert_eq!(got[..], p.batches[..got.len()], "{what}: served something that was not written");
    Some(got)
}

#[test]
fn cut_at_every_byte_with_an_index() {
    let p = prepare_closed();
    let file_len = p.disk.durable_bytes(&p.segment).unwrap().len() as u64;
    let data_end = p.ranges.last().unwrap().1;
    for cut in (0..=data_end + 10).chain([file_len]) {
        let disk = p.disk.fork();
        disk.cut(&p.segment, cut).unwrap();
        let what = format!("cut at {cut} (with index)");
        match recover_and_read(&p, &disk, &what) {
            Some(got) => {
                assert!(cut >= data_end, "{what}: durable bytes are missing, yet recovery succeeded");
                assert_eq!(got.len(), 8, "{what}: every batch is kept");
            }
            None => assert!(cut < data_end, "{what}: nothing durable was lost, yet recovery refused"),
        }
    }
}

#[test]
fn flip_a_bit_at_every_byte_with_an_index() {
    let p = prepare_closed();
    let data_end = p.ranges.last().unwrap().1;
    for byte in 0..data_end + 600 {
        let disk = p.disk.fork();
        disk.flip_bit(&p.segment, byte, (byte % 8) as u8).unwrap();
        let what = format!("flip at {byte} (with index)");
        let in_batch = p.ranges.iter().any(|r| r.0 <= byte && byte < r.1);
        let got = recover_and_read(&p, &disk, &what);
        match (byte, in_batch) {
            (0..28, _) => assert_eq!(got, None, "{what}: a damaged segment header is corruption"),
            (_, true) => assert_eq!(got, None, "{what}: damage inside a durable batch is never served"),
            _ => assert_eq!(got.map(|g| g.len()), Some(8), "{what}: nothing valid may be dropped"),
        }
    }
}

/// A sealed segment (checkpoint written at the roll) cut short, at many points, and its
/// checkpoint cut short too: open refuses with `Corrupt` or rebuilds, and never panics.
#[test]
fn cut_sealed_segment_and_its_index() {
    let disk = SimDisk::new(16);
    let mut log = sim_log(&disk, small_config()).unwrap();
    for tag in 0..200u64 {
        log.append(&mut batch(tag, 2, 300), 1).unwrap();
    }
    log.flush().unwrap();
    let expect = all_batches(&log);
    let paths = log.segment_paths();
    assert!(paths.len() >= 2, "the workload rolls segments");
    drop(log);
    disk.crash_with(CrashMode::DropUnflushed);
    let first = paths[0].clone();
    let index = first.with_extension("index");
    let len = disk.durable_bytes(&first).unwrap().len() as u64;
    for cut in (0..len).step_by(97).chain([len - 1]) {
        let d = disk.fork();
        d.cut(&first, cut).unwrap();
        match sim_log(&d, small_config()) {
            Err(StorageError::Corrupt { segment, .. }) => assert_eq!(segment, first, "cut at {cut}"),
            other => panic!("cut at {cut}: a sealed segment lost durable bytes, got {other:?}"),
        }
    }
    let index_len = disk.durable_bytes(&index).unwrap().len() as u64;
    for cut in 0..index_len {
        let d = disk.fork();
        d.cut(&index, cut).unwrap();
        let log = sim_log(&d, small_config()).unwrap();
        assert_eq!(all_batches(&log), expect, "index cut at {cut}");
    }
}
