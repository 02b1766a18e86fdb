//! Crashes with SimDisk (unflushed writes lost) and catch-up through a snapshot after retention.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_raft::IoMode;
use keel_storage::{Disk, LogConfig, SimDisk};

const GROUP: u64 = 3;

fn sim_cfg() -> ClusterConfig {
    ClusterConfig { io: IoMode::Inline, ..ClusterConfig::default() }
}

async fn sim_cluster(seed: u64, cfg: &ClusterConfig) -> (Vec<TestNode>, Vec<SimDisk>) {
    let mut nodes = Vec::new();
    let mut disks = Vec::new();
    for id in 1..=3u64 {
        let disk = SimDisk::new(seed * 10 + id);
        disks.push(disk.clone());
        nodes.push(
            TestNode::start(id, "127.0.0.1:0", Arc::new(disk) as Arc<dyn Disk>, PathBuf::from(format!("/n{id}")), cfg)
                .await,
        );
    }
    for n in &nodes {
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    (nodes, disks)
}

async fn restart(nodes: &mut [TestNode], i: usize, cfg: &ClusterConfig) {
    let (id, addr, disk, dir) = (nodes[i].id, nodes[i].addr.clone(), Arc::clone(&nodes[i].disk), nodes[i].dir.clone());
    nodes[i] = TestNode::start(id, &addr, disk, dir, cfg).await;
    nodes[i].node.open_group(GROUP).await.unwrap();
}

/// Appends `count` batches of 3 records tagged from `first`; returns (tag, base offset) per ack.
async fn write(nodes: &[TestNode], first: u64, count: u64) -> Vec<(u64, u64)> {
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let futures: Vec<_> = (first..first + count).map(|tag| append(&refs, GROUP, batch(tag, 3))).collect();
    let results = futures_util::future::join_all(futures).await;
    (first..first + count).zip(results).map(|(tag, r)| (tag, r.unwrap().base_offset)).collect()
}

fn check_acked(node: &TestNode, acked: &[(u64, u64)]) {
    let all = read_all(node, GROUP);
    for (tag, offset) in acked {
        let got = all.iter().find(|(o, _)| o == offset);
        assert_eq!(
            got.map(|(_, v)| v.clone()),
            Some(format!("{tag}:0")),
            "node {}: acked batch {tag} at offset {offset}",
            node.id
        );
    }
}

/// A follower that loses its unflushed tail in a crash rejoins and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_follower_rejoins_and_converges() {
    let cfg = sim_cfg();
    let (mut nodes, disks) = sim_cluster(1, &cfg).await;
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let leader = wait_leader(&refs, GROUP).await;
    let mut acked = write(&nodes, 0, 200).await;
    let follower = (leader + 1) % 3;
    nodes[follower].stop(true).await;
    disks[follower].crash();
    acked.extend(write(&nodes, 200, 100).await);
    restart(&mut nodes, follower, &cfg).await;
    for n in &nodes {
        wait_high_watermark(n, GROUP, 900).await;
    }
    let reference = read_all(&nodes[leader], GROUP);
    for n in &nodes {
        assert_eq!(read_all(n, GROUP), reference, "node {} converged", n.id);
        check_acked(n, &acked);
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
}

/// The flush callback must come after the bytes are durable: crash every disk right after the
/// acks (each crash drops all unflushed writes) and every acknowledged record must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_records_survive_a_crash_of_every_node() {
    let cfg = sim_cfg();
    for seed in 1..=3u64 {
        let (mut nodes, disks) = sim_cluster(100 + seed, &cfg).await;
        let refs: Vec<&TestNode> = nodes.iter().collect();
        wait_leader(&refs, GROUP).await;
        let mut acked = Vec::new();
        for round in 0..3u64 {
            acked.extend(write(&nodes, round * 1000, 60).await);
            for n in &mut nodes {
                n.stop(true).await;
            }
            for d in &disks {
                d.crash_with(keel_storage::CrashMode::DropUnflushed);
            }
            for i in 0..3 {
                restart(&mut nodes, i, &cfg).await;
            }
            let refs: Vec<&TestNode> = nodes.iter().collect();
            let leader = wait_leader(&refs, GROUP).await;
            // A write through the new leader commits everything before it, so the high watermark
            // covers every acked record.
            acked.extend(write(&nodes, round * 1000 + 500, 1).await);
            let max_offset = acked.iter().map(|(_, o)| o + 3).max().unwrap();
            wait_high_watermark(&nodes[leader], GROUP, max_offset).await;
            check_acked(&nodes[leader], &acked);
        }
        for n in &mut nodes {
            n.stop(false).await;
        }
    }
}

/// A follower away while retention deleted the segments it needs catches up from a snapshot:
/// its log restarts at the leader's snapshot point, with the same offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_from_a_snapshot() {
    let log = LogConfig {
        segment_bytes_max: keel_storage::SEGMENT_BYTES_MIN,
        retention_bytes: Some(keel_storage::SEGMENT_BYTES_MIN),
        ..LogConfig::default()
    };
    let cfg = ClusterConfig { log, ..sim_cfg() };
    let (mut nodes, _disks) = sim_cluster(7, &cfg).await;
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let leader = wait_leader(&refs, GROUP).await;
    write(&nodes, 0, 20).await;
    let away = (leader + 1) % 3;
    nodes[away].stop(false).await;
    // ~350 KiB of batches: several 64 KiB segments, most of them past retention.
    let mut acked = Vec::new();
    for chunk in 0..30u64 {
        acked.extend(write(&nodes, 1000 + chunk * 100, 100).await);
    }
    for (i, n) in nodes.iter().enumerate() {
        if i != away {
            n.node.apply_retention(GROUP, i64::MAX).await.unwrap();
        }
    }
    // One retention pass snapshots exactly where the log will start and then purges; raft
    // applies the purge in the background, so wait for it (without triggering anything again).
    let store = nodes[leader].node.store(GROUP).unwrap();
    let mut start = store.positions().0;
    for _ in 0..200 {
        if start.offset > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        start = store.positions().0;
    }
    assert!(start.offset > 0, "one retention pass deleted old segments on the leader");
    let snapshot = nodes[leader].node.metrics(GROUP).unwrap().snapshot.unwrap();
    assert_eq!(snapshot.index + 1, start.index, "the leader's snapshot ends right before its log starts");

    restart(&mut nodes, away, &cfg).await;
    let hw = *store.high_watermark().borrow();
    wait_high_watermark(&nodes[away], GROUP, hw).await;
    let (away_start, _, _) = nodes[away].node.store(GROUP).unwrap().positions();
    assert!(away_start.offset > 0, "the follower's log restarted at a snapshot, not at 0");
    assert_eq!(
        away_start,
        store.positions().0,
        "it starts exactly where the leader's log starts: no retained data lost"
    );
    // Everything the follower holds matches the leader, offset for offset, and new writes flow.
    let more = write(&nodes, 9000, 10).await;
    let hw = more.iter().map(|(_, o)| o + 3).max().unwrap();
    wait_high_watermark(&nodes[away], GROUP, hw).await;
    let theirs = read_all(&nodes[away], GROUP);
    let ours = read_all(&nodes[leader], GROUP);
    assert!(!theirs.is_empty());
    let first = theirs[0].0;
    assert_eq!(theirs[..], ours[ours.iter().position(|(o, _)| *o == first).unwrap()..]);
    check_acked(&nodes[away], &more);
    let kept: Vec<(u64, u64)> = acked.into_iter().filter(|(_, o)| *o >= away_start.offset).collect();
    assert!(!kept.is_empty());
    check_acked(&nodes[away], &kept);

    // Issue 12 item 2: the state at each segment start (where a snapshot may be cut) is kept in
    // memory only, and rebuilt as a restarted node re-applies its log from its snapshot. After
    // every node restarted, retention still snapshots exactly where each log will start.
    for i in 0..nodes.len() {
        nodes[i].stop(false).await;
        restart(&mut nodes, i, &cfg).await;
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    wait_leader(&refs, GROUP).await;
    let starts: Vec<_> = nodes.iter().map(|n| n.node.store(GROUP).unwrap().positions().0).collect();
    let mut later = Vec::new();
    for chunk in 0..30u64 {
        later.extend(write(&nodes, 20_000 + chunk * 100, 100).await);
    }
    let hw = later.iter().map(|(_, o)| o + 3).max().unwrap();
    for (i, n) in nodes.iter().enumerate() {
        wait_high_watermark(n, GROUP, hw).await;
        n.node.apply_retention(GROUP, i64::MAX).await.unwrap();
        let store = n.node.store(GROUP).unwrap();
        let mut start = store.positions().0;
        for _ in 0..200 {
            if start.offset > starts[i].offset {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            start = store.positions().0;
        }
        assert!(start.offset > starts[i].offset, "node {}: retention purged again after the restart", n.id);
        let snapshot = n.node.metrics(GROUP).unwrap().snapshot.unwrap();
        assert_eq!(snapshot.index + 1, start.index, "node {}: the snapshot ends right before the log starts", n.id);
        check_acked(n, &later.iter().copied().filter(|(_, o)| *o >= start.offset).collect::<Vec<_>>());
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
}
