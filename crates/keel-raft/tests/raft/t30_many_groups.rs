//! 100 raft groups on three nodes with the production timings: every group elects a leader and
//! takes a write, then the idle CPU cost of their heartbeats is measured and printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_raft::{GroupId, RaftTimings};
use keel_storage::{Disk, FileDisk, LogConfig};

const GROUPS: GroupId = 100;
const NODES: u64 = 3;
/// How long the cluster sits idle while its CPU time is measured.
const IDLE_MS: u64 = 5_000;
/// Segments small enough that 300 partitions preallocate 300 MiB, not 19 GiB: the idle figure
/// must be heartbeats, not disk allocation.
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

/// A disk whose directory syncs take `delay` once armed, on whatever thread calls them: what a
/// busy or slow device does to the fsyncs of a segment roll.
#[derive(Debug)]
struct SlowSyncDisk {
    inner: FileDisk,
    armed: std::sync::atomic::AtomicBool,
    delay: Duration,
}

impl Disk for SlowSyncDisk {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create(&self, path: &std::path::Path) -> std::io::Result<Arc<dyn keel_storage::DiskFile>> {
        self.inner.create(path)
    }
    fn open(&self, path: &std::path::Path) -> std::io::Result<Arc<dyn keel_storage::DiskFile>> {
        self.inner.open(path)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        if self.armed.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(self.delay);
        }
        self.inner.sync_dir(dir)
    }
    fn exists(&self, path: &std::path::Path) -> std::io::Result<bool> {
        self.inner.exists(path)
    }
    fn sync_filesystem(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_filesystem(dir)
    }
}

/// Issue 12 item 6: a segment roll (several syncs) on one group runs off the async workers, so
/// the other groups' heartbeats go on. Node 1 runs on a runtime of its own with one worker: a
/// roll done inline there held node 1's every group still for the slow syncs, and the followers
/// of the groups it led (on the other nodes, on the test's runtime) timed out and elected anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_segment_roll_does_not_stall_other_groups() {
    const SMALL: GroupId = 6;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig {
        log: LogConfig { segment_bytes_max: 256 << 10, preallocate_step_bytes: 64 << 10, ..Default::default() },
        ..Default::default()
    };
    // Three election timeouts of the test timings per sync.
    let slow = Arc::new(SlowSyncDisk {
        inner: FileDisk::new(),
        armed: false.into(),
        delay: Duration::from_millis(3 * cfg.timings.election_max_ms),
    });
    let own = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let on_own = own.handle().clone();
    let (stop_own, stopped) = tokio::sync::oneshot::channel::<()>();
    // A second runtime needs a thread to drive it; this test never runs in the simulation.
    #[allow(clippy::disallowed_methods)]
    let own_thread = std::thread::spawn(move || own.block_on(stopped));
    let mut nodes = Vec::new();
    for id in 1..=NODES {
        let dir = tmp.path().join(format!("node-{id}"));
        if id == 1 {
            // Started, and its groups opened, on its own runtime: their tasks run there.
            let (disk, cfg) = (slow.clone() as Arc<dyn Disk>, cfg.clone());
            let node = on_own
                .spawn(async move {
                    let node = TestNode::start(id, "127.0.0.1:0", disk, dir, &cfg).await;
                    for group in 1..=SMALL {
                        node.node.open_group(group).await.unwrap();
                    }
                    node
                })
                .await
                .unwrap();
            nodes.push(node);
        } else {
            let node = TestNode::start(id, "127.0.0.1:0", Arc::new(FileDisk::new()), dir, &cfg).await;
            for group in 1..=SMALL {
                node.node.open_group(group).await.unwrap();
            }
            nodes.push(node);
        }
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for group in 1..=SMALL {
        refs[(group % NODES) as usize].node.initialize_group(group, members(&refs)).await.unwrap();
    }
    for group in 1..=SMALL {
        wait_leader(&refs, group).await;
    }
    let terms = |group| refs.iter().map(|n| n.node.metrics(group).unwrap().current_term).collect::<Vec<_>>();
    let before: Vec<Vec<u64>> = (2..=SMALL).map(terms).collect();

    // Group 1 writes past its 256 KiB segment: node 1 rolls it, each directory sync slow.
    slow.armed.store(true, std::sync::atomic::Ordering::Release);
    let value = "x".repeat(60 << 10);
    for i in 0..6 {
        let mut builder = keel_record::BatchBuilder::new(1 << 20);
        let record = keel_record::NewRecord { key: None, value: Some(value.as_bytes()), headers: &[], timestamp_ms: i };
        builder.push(record).unwrap();
        append(&refs, 1, builder.build()).await.unwrap();
    }
    wait_high_watermark(refs[0], 1, 6).await;
    slow.armed.store(false, std::sync::atomic::Ordering::Release);
    let segments = std::fs::read_dir(refs[0].node.store(1).unwrap().dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
        .count();
    assert!(segments > 1, "group 1 rolled its segment on node 1");
    let after: Vec<Vec<u64>> = (2..=SMALL).map(terms).collect();
    assert_eq!(before, after, "no other group held an election while node 1 rolled group 1's segment");

    for n in &mut nodes {
        n.stop(false).await;
    }
    let _ = stop_own.send(());
    own_thread.join().unwrap().unwrap();
}
