//! Crash tests over many seeds: a random workload on SimDisk, power loss at a random moment
//! (between operations, or in the middle of one: a roll, a truncation, a reset), recovery, and
//! the durability contract checked after every crash:
//! - every batch that was durable (`durable()` before the crash) is back, byte for byte;
//! - anything past it that is served is whole, valid and exactly what was written there;
//! - offsets and raft indexes stay dense; recovery never reports corruption for a crash.

mod common;

use common::{all_batches, batch, sim_log, small_config};
use keel_storage::{LogPosition, SimDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: u64 = 300;

fn run(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let disk = SimDisk::new(seed);
    let config = small_config();
    let mut log = sim_log(&disk, config.clone()).unwrap();
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
            let outcome: keel_storage::Result<()> = match rng.random_range(0..20) {
                0..=11 => {
                    let mut b = batch(tag, rng.random_range(1..6), rng.random_range(0..1500));
                    tag += 1;
                    log.append(&mut b, round).map(|_| model.push(b))
                }
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
            if std::env::var_os("CRASH_SEED").is_some() {
                eprintln!("round {round}: {outcome:?} written {:?} durable {durable:?} model {}+{}", log.written(), first, model.len());
            }
            if outcome.is_err() {
                assert!(disk.is_dead(), "seed {seed}: only the outage may fail an operation: {outcome:?}");
                break;
            }
            durable = durable.max(log.durable());
        }
        let mode = disk.crash();
        drop(log);
        log = match sim_log(&disk, config.clone()) {
            Ok(log) => log,
            Err(e) => panic!("seed {seed} round {round} ({mode:?}): recovery failed: {e}"),
        };
        let got = all_batches(&log);
        let start = log.start().index;
        // A reset or retention interrupted by the crash may or may not have happened.
        if start != first {
            assert!(got.is_empty() || start > first, "seed {seed}: the log start moved backwards");
            let skip = (start.saturating_sub(first) as usize).min(model.len());
            if start >= first + model.len() as u64 {
                model.clear();
            } else {
                model.drain(..skip);
            }
            first = start;
            durable = durable.max(log.start());
        }
        let must_have = durable.index.saturating_sub(first) as usize;
        assert!(
            got.len() >= must_have.min(model.len()),
            "seed {seed} round {round} ({mode:?}): lost durable batches: have {}, durable {must_have}",
            got.len()
        );
        assert!(got.len() <= model.len(), "seed {seed} ({mode:?}): more batches than were written");
        for (i, b) in got.iter().enumerate() {
            assert_eq!(b, &model[i], "seed {seed} round {round} ({mode:?}): batch {} differs", first + i as u64);
        }
        model.truncate(got.len());
        let mut next = log.start().offset;
        for b in log.read_entries(log.start().index, log.written().index, usize::MAX).unwrap() {
            assert_eq!(b.header().base_offset, next, "seed {seed}: offsets are dense");
            next = b.header().next_offset();
        }
        assert_eq!(log.durable(), log.written(), "after recovery, what is served is durable");
    }
}

/// `CRASH_SEED=N cargo test -p keel-storage --test crash -- --nocapture` replays one seed with a
/// trace of every operation; `CRASH_SEEDS=N` sweeps more seeds than CI does.
#[test]
fn crash_recovery_keeps_every_durable_batch() {
    if let Some(seed) = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()) {
        return run(seed);
    }
    let seeds = std::env::var("CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
    for seed in 0..seeds {
        run(seed);
    }
}
