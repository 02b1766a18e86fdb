//! Three nodes in one process over loopback gRPC: election, replication with dense offsets,
//! failover, restart and catch-up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;

use common::*;
use keel_storage::{Disk, FileDisk};

const GROUP: u64 = 7;

async fn cluster(dir: &std::path::Path, cfg: &ClusterConfig) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::new());
        nodes.push(TestNode::start(id, "127.0.0.1:0", disk, dir.join(format!("node-{id}")), cfg).await);
    }
    for n in &nodes {
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_fail_over_restart_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = cluster(tmp.path(), &cfg).await;

    // 1,000 appends, 20 in flight at a time, each acknowledged with its offsets.
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let leader = wait_leader(&refs, GROUP).await;
    let mut acked = Vec::new();
    for chunk in 0..50u64 {
        let futures: Vec<_> = (0..20u64).map(|i| append(&refs, GROUP, batch(chunk * 20 + i, 2))).collect();
        for (i, r) in futures_util::future::join_all(futures).await.into_iter().enumerate() {
            acked.push((chunk * 20 + i as u64, r.unwrap()));
        }
    }
    // Offsets are dense and unique: 1,000 batches of 2 records cover 0..2000 exactly once.
    let mut offsets: Vec<u64> = acked.iter().map(|(_, a)| a.base_offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    for n in &nodes {
        wait_high_watermark(n, GROUP, 2000).await;
    }
    let reference = read_all(&nodes[leader], GROUP);
    assert_eq!(reference.len(), 2000);
    for (tag, a) in &acked {
        assert_eq!(
            reference[a.base_offset as usize],
            (a.base_offset, format!("{tag}:0")),
            "acked batch {tag} at its offset"
        );
    }
    for n in &nodes {
        assert_eq!(read_all(n, GROUP), reference, "replica {} is identical", n.id);
    }

    // Stop the leader: a new one is elected and every acknowledged record is still there.
    nodes[leader].stop(false).await;
    let live: Vec<&TestNode> = nodes.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, n)| n).collect();
    let new_leader = wait_leader(&live, GROUP).await;
    assert_ne!(live[new_leader].id, nodes[leader].id);
    assert_eq!(read_all(live[new_leader], GROUP)[..2000], reference[..]);
    for tag in 1000..1100u64 {
        append(&live, GROUP, batch(tag, 1)).await.unwrap();
    }

    // Restart the stopped node from its data dir: it catches up.
    let old = &nodes[leader];
    let (id, addr, disk, dir) = (old.id, old.addr.clone(), Arc::clone(&old.disk), old.dir.clone());
    nodes[leader] = TestNode::start(id, &addr, disk, dir, &cfg).await;
    nodes[leader].node.open_group(GROUP).await.unwrap();
    wait_high_watermark(&nodes[leader], GROUP, 2100).await;
    let all: Vec<Vec<(u64, String)>> = nodes.iter().map(|n| read_all(n, GROUP)).collect();
    assert_eq!(all[0].len(), 2100);
    assert!(all.iter().all(|a| a == &all[0]), "all replicas converge");
    for n in &mut nodes {
        n.stop(false).await;
    }
}
