//! Test support shipped with the crate (as openraft ships its storage suite): the crash workload
//! that the crash tests and the simulation driver both run, and deterministic test batches.
//!
//! The workload drives a [`SegmentLog`] on a [`SimDisk`] with appends, flushes, truncations,
//! resets and retention, cuts the power at a random moment (between operations or inside one),
//! recovers, and checks the durability contract after every crash:
//! - every batch that was durable (`durable()` before the crash) is back, byte for byte;
//! - anything past it that is served is whole, valid and exactly what was written there;
//! - offsets and raft indexes stay dense; recovery never reports corruption for a crash.

use std::path::PathBuf;
use std::sync::Arc;

use keel_record::{BatchBuilder, NewRecord};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Disk, LogConfig, LogPosition, SEGMENT_BYTES_MIN, SegmentLog, SimDisk};

/// A batch of `count` records whose values encode `tag` and the record number, so that a read
/// can be checked byte for byte.
pub fn test_batch(tag: u64, count: u32, value_len: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for i in 0..count {
        let mut value = format!("{tag}:{i}:").into_bytes();
        value.resize(value_len.max(value.len()), b'a' + (tag % 26) as u8);
        let key = tag.to_be_bytes();
        let record = NewRecord { timestamp_ms: 1_000 + tag as i64, key: Some(&key), value: Some(&value), headers: &[] };
        // A record that does not fit is left out: test batches stay under the format's limit.
        if b.push(record).is_err() {
            break;
        }
    }
    b.build().to_vec()
}

/// A config with the smallest segments, so that workloads roll often.
pub fn small_config() -> LogConfig {
    LogConfig { segment_bytes_max: SEGMENT_BYTES_MIN, index_interval_bytes: 512, ..LogConfig::default() }
}

/// Larger segments than [`small_config`] that grow their files in small steps, so that workloads
/// exercise growth, rolls and recovery of partly grown files.
pub fn growing_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4 * SEGMENT_BYTES_MIN,
        index_interval_bytes: 512,
        preallocate_step_bytes: 12 * 1024,
        ..LogConfig::default()
    }
}

/// What one crash-workload run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashRunStats {
    /// Crashes survived.
    pub crashes: u64,
    /// Batches appended.
    pub appended: u64,
    /// Batches checked after recoveries.
    pub verified: u64,
}

/// Faults beyond what a healthy machine does, for proving that the checks can fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// The disk acknowledges flushes without persisting anything.
    pub lying_flush: bool,
    /// The classic bug: the log's flush is completed (durable advanced) without running it.
    pub ack_before_flush: bool,
}

/// Runs the crash workload for `seed`; `trace` receives one line per event (the simulation
/// hashes them to prove determinism). Returns the violation if the contract broke.
pub fn crash_workload(seed: u64, trace: &mut dyn FnMut(String)) -> Result<CrashRunStats, String> {
    crash_workload_with(seed, Sabotage::default(), trace)
}

/// [`crash_workload`] on a sabotaged disk: the checks must then report violations.
pub fn crash_workload_with(
    seed: u64,
    sabotage: Sabotage,
    trace: &mut dyn FnMut(String),
) -> Result<CrashRunStats, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let disk = SimDisk::new(seed);
    disk.set_lying_flush(sabotage.lying_flush);
    // Odd seeds grow segment files in small steps; even seeds preallocate whole segments.
    let config = if seed % 2 == 1 { growing_config() } else { small_config() };
    let open =
        |disk: &SimDisk| SegmentLog::open(Arc::new(disk.clone()) as Arc<dyn Disk>, PathBuf::from("/p"), config.clone());
    let mut log = open(&disk).map_err(|e| format!("seed {seed}: open failed: {e}"))?;
    let mut stats = CrashRunStats::default();
    // The model: what was written, by raft index from `first`.
    let mut model: Vec<Vec<u8>> = Vec::new();
    let mut first = 0u64;
    let mut tag = seed << 20;
    for round in 0..6 {
        // Sometimes the power goes out in the middle of an operation.
        if rng.random_bool(0.5) {
            disk.crash_after(rng.random_range(0..60));
        }
        // `durable` as the log reported it: the contract is about what it promised.
        let mut durable = log.durable();
        for _ in 0..rng.random_range(1..60) {
            let op = rng.random_range(0..20);
            let outcome: crate::Result<()> = match op {
                0..=11 => {
                    let mut b = test_batch(tag, rng.random_range(1..6), rng.random_range(0..1500));
                    tag += 1;
                    stats.appended += 1;
                    log.append(&mut b, round).map(|_| model.push(b))
                }
                12..=16 if sabotage.ack_before_flush => match log.begin_flush() {
                    Ok(Some(ticket)) => log.complete_flush(ticket, Ok(())).map(|d| durable = d),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                },
                12..=16 => log.flush().map(|d| durable = d),
                17 => {
                    let end = first + model.len() as u64;
                    let at = end.saturating_sub(rng.random_range(0..5)).max(first);
                    // Asking for the cut voids the promise for what lies past it, whether or
                    // not the truncation completes before the power goes.
                    durable.index = durable.index.min(at);
                    log.truncate_from_index(at).map(|()| {
                        model.truncate((at - first) as usize);
                        durable = log.durable();
                    })
                }
                18 => {
                    let at = LogPosition {
                        offset: log.written().offset + rng.random_range(0..100),
                        index: log.written().index + rng.random_range(0..100),
                    };
                    log.reset(at).map(|()| {
                        model.clear();
                        first = at.index;
                        durable = at;
                    })
                }
                _ => log.apply_retention(i64::MAX, u64::MAX).map(|start| {
                    model.drain(..(start.index - first) as usize);
                    first = start.index;
                }),
            };
            trace(format!("round {round} op {op}: {outcome:?} written {:?} durable {durable:?}", log.written()));
            if let Err(e) = outcome {
                if !disk.is_dead() {
                    return Err(format!("seed {seed}: only the outage may fail an operation: {e}"));
                }
                break;
            }
            durable = durable.max(log.durable());
        }
        let mode = disk.crash();
        stats.crashes += 1;
        trace(format!("round {round}: crash {mode:?}"));
        drop(log);
        log = open(&disk).map_err(|e| format!("seed {seed} round {round} ({mode:?}): recovery failed: {e}"))?;
        let (start, end) = (log.start(), log.written());
        let got: Vec<Vec<u8>> = if start.index == end.index {
            Vec::new()
        } else {
            log.read_entries(start.index, end.index, usize::MAX)
                .map_err(|e| format!("seed {seed}: read after recovery failed: {e}"))?
                .into_iter()
                .map(|b| b.bytes().to_vec())
                .collect()
        };
        trace(format!("round {round}: recovered {start:?}..{end:?}"));
        // A reset or retention interrupted by the crash may or may not have happened.
        if start.index != first {
            if !got.is_empty() && start.index < first {
                return Err(format!("seed {seed}: the log start moved backwards"));
            }
            let skip = (start.index.saturating_sub(first) as usize).min(model.len());
            model.drain(..skip);
            first = start.index;
            durable = durable.max(start);
        }
        let must_have = (durable.index.saturating_sub(first) as usize).min(model.len());
        if got.len() < must_have {
            return Err(format!(
                "seed {seed} round {round} ({mode:?}): lost durable batches: have {}, durable {must_have}",
                got.len()
            ));
        }
        if got.len() > model.len() {
            return Err(format!("seed {seed} ({mode:?}): more batches than were written"));
        }
        if let Some(i) = got.iter().zip(&model).position(|(g, m)| g != m) {
            return Err(format!("seed {seed} round {round} ({mode:?}): batch {} differs", first + i as u64));
        }
        model.truncate(got.len());
        stats.verified += got.len() as u64;
        let mut next = start.offset;
        for b in &got {
            let h = keel_record::check(b).map_err(|e| format!("seed {seed}: served an invalid batch: {e}"))?;
            if h.base_offset != next {
                return Err(format!("seed {seed}: offsets are not dense at {}", h.base_offset));
            }
            next = h.next_offset();
        }
        if log.durable() != log.written() {
            return Err(format!("seed {seed}: after recovery, the log serves bytes that are not durable"));
        }
    }
    Ok(stats)
}
