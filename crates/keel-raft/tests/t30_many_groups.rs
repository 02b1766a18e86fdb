//! 100 raft groups on three nodes with the production timings: every group elects a leader and
//! takes a write, then the idle CPU cost of their heartbeats is measured and printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_raft::{GroupId, RaftTimings};
use keel_storage::{Disk, FileDisk, LogConfig};

const GROUPS: GroupId = 100;
const NODES: u64 = 3;
/// How long the cluster sits idle while its CPU time is measured.
const IDLE_MS: u64 = 5_000;
/// Segments small enough that 300 partitions preallocate (and pre-fault, in background threads
/// of this process) 300 MiB, not 19 GiB: the idle figure must be heartbeats, not page faults.
const SEGMENT_BYTES_MAX: u64 = 1024 * 1024;

/// This process's CPU time (user + system) so far, in clock ticks: fields 14 and 15 of
/// /proc/self/stat. The fields are counted after the command name, which ends at the last ')'
/// and may itself contain spaces.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    // Field 3 (state) is the first one after the name, so field n is at index n - 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user: u64 = fields[14 - 3].parse().unwrap();
    let system: u64 = fields[15 - 3].parse().unwrap();
    user + system
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    ticks as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_groups_elect_write_and_idle() {
    let tmp = tempfile::tempdir().unwrap();
    // The production timings throughout: the idle figure is what a real node pays.
    let timings = RaftTimings::default();
    let cfg = ClusterConfig {
        timings,
        log: LogConfig { segment_bytes_max: SEGMENT_BYTES_MAX, ..Default::default() },
        ..Default::default()
    };
    let mut nodes = Vec::new();
    for id in 1..=NODES {
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::new());
        nodes.push(TestNode::start(id, "127.0.0.1:0", disk, tmp.path().join(format!("node-{id}")), &cfg).await);
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for n in &refs {
        for group in 1..=GROUPS {
            n.node.open_group(group).await.unwrap();
        }
    }
    // Group g starts on node g % 3, the only member with a log until it leads, so leaders spread.
    for group in 1..=GROUPS {
        refs[(group % NODES) as usize].node.initialize_group(group, members(&refs)).await.unwrap();
    }

    // Every group elects a leader that all three replicas agree on.
    let mut led = [0u32; NODES as usize];
    for group in 1..=GROUPS {
        led[wait_leader(&refs, group).await] += 1;
    }
    println!("leaders per node: {led:?}");
    assert!(led.iter().all(|n| *n > 0), "leaders spread over every node: {led:?}");

    // Every group takes one write, at offset 0, and every replica learns it is committed.
    let writes = (1..=GROUPS).map(|group| append(&refs, group, batch(group, 1)));
    let mut retried = 0;
    for (group, result) in (1..=GROUPS).zip(futures_util::future::join_all(writes).await) {
        let appended = result.unwrap_or_else(|e| panic!("group {group}: append failed: {e}"));
        // `append` retries answers that leave a write's fate unknown (a timeout, a leadership
        // change). On a starved machine an earlier attempt may then have committed too, so the
        // write may land after copies of itself: the log must still hold this batch alone, from
        // offset 0.
        for n in &refs {
            wait_high_watermark(n, group, appended.base_offset + 1).await;
            let records = read_all(n, group);
            let copies: Vec<(u64, String)> = (0..records.len() as u64).map(|o| (o, format!("{group}:0"))).collect();
            assert_eq!(records, copies, "node {} group {group}: the log holds only this write, from offset 0", n.id);
        }
        retried += u32::from(appended.base_offset > 0);
    }
    if retried > 0 {
        println!("{retried} of {GROUPS} writes landed after copies of themselves (retried after an unknown outcome)");
    }

    // Idle: nothing but heartbeats (and the runtime's own timers). The figure is printed, never
    // asserted: CPU time depends on the machine and on whatever else runs on it.
    let ticks_before = cpu_ticks();
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(IDLE_MS)).await;
    let ticks = cpu_ticks() - ticks_before;
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu_s = ticks as f64 / ticks_per_second() as f64;
    println!(
        "idle cpu: {:.1}% of one core for {GROUPS} groups x {NODES} replicas (heartbeat {} ms)",
        100.0 * cpu_s / elapsed_s,
        timings.heartbeat_ms
    );
    if cfg!(debug_assertions) {
        // openraft checks its whole state on every access when debug assertions are on (validit).
        println!(
            "(debug build: openraft's state checks make this ~3x the release figure; --release gives the real one)"
        );
    }

    for n in &mut nodes {
        n.stop(false).await;
    }
}
