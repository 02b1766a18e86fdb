//! What making many partitions durable at once costs, by the way it is done (issue 17 item 1:
//! choose a node-wide group commit by measurement). Each round writes `--bytes` into each of
//! `--files` mapped files (as many partitions' appends would), then makes all of them durable:
//!
//! - `each`: one msync per file, one after another (one flusher doing every partition);
//! - `parallel`: one msync per file, all at once on their own threads (today's per-partition
//!   flushers on tokio's blocking pool);
//! - `syncfs`: one syncfs(2) of the file system holding them (a node-wide flush).
//!
//! `cargo bench -p keel-storage --bench flush_many -- [--files N] [--bytes B] [--rounds R]`
//! prints rounds/s and the latency of a round per mode, interleaved (ABAB…) so drift on a noisy
//! machine spreads over every mode.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // A bench: it may panic, read the clock and start threads.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_storage::{Disk, DiskFile, FileDisk};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Each,
    Parallel,
    Syncfs,
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let files_n = arg("--files", 100);
    let bytes = arg("--bytes", 1024);
    let rounds = arg("--rounds", 200);
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let disk = FileDisk::new();
    let size = 64 << 20;
    let files: Vec<Arc<dyn DiskFile>> = (0..files_n)
        .map(|i| {
            let f = disk.create(&dir.path().join(format!("p{i}"))).unwrap();
            f.preallocate(size).unwrap();
            f.flush(0, 0).unwrap();
            f
        })
        .collect();
    disk.sync_dir(dir.path()).unwrap();
    let dir_fd = std::fs::File::open(dir.path()).unwrap();
    let payload = vec![0x5au8; bytes];
    let mut at = 0u64;
    let mut times: Vec<(Mode, Vec<Duration>)> =
        [Mode::Each, Mode::Parallel, Mode::Syncfs].into_iter().map(|m| (m, Vec::new())).collect();
    for round in 0..rounds * 3 {
        let (mode, samples) = &mut times[round % 3];
        if at + bytes as u64 > size {
            at = 0;
        }
        for f in &files {
            f.write(at, &payload).unwrap();
        }
        let started = Instant::now();
        match mode {
            Mode::Each => {
                for f in &files {
                    f.flush(at, bytes as u64).unwrap();
                }
            }
            Mode::Parallel => std::thread::scope(|s| {
                for f in &files {
                    s.spawn(move || f.flush(at, bytes as u64).unwrap());
                }
            }),
            Mode::Syncfs => {
                // SAFETY: syncfs(2) on a descriptor this function owns; no memory is passed.
                let rc = unsafe { libc::syncfs(dir_fd.as_raw_fd()) };
                assert_eq!(rc, 0, "syncfs: {}", std::io::Error::last_os_error());
            }
        }
        samples.push(started.elapsed());
        at += bytes as u64;
    }
    println!("{files_n} files, {bytes} bytes each per round, {rounds} rounds per mode (interleaved)");
    println!("{:<10} {:>12} {:>12} {:>12} {:>14}", "mode", "rounds/s", "p50 µs", "p99 µs", "files/s");
    for (mode, mut samples) in times {
        samples.sort();
        let total: Duration = samples.iter().sum();
        let per_sec = samples.len() as f64 / total.as_secs_f64();
        let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_micros();
        println!(
            "{:<10} {:>12.0} {:>12} {:>12} {:>14.0}",
            format!("{mode:?}").to_lowercase(),
            per_sec,
            p(0.5),
            p(0.99),
            per_sec * files_n as f64
        );
    }
}
