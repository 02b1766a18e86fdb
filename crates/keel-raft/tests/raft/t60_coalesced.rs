//! The AppendEntries of many groups travel to a peer together, and a node that takes no batches
//! (coalescing off, answering as a node from before batches existed) still gets every group's
//! log: its peers fall back to one RPC per group.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;

use common::*;
use keel_raft::{GroupId, NetworkConfig};
use keel_storage::{Disk, FileDisk, LogConfig};

const GROUPS: GroupId = 30;
const ROUNDS: u64 = 5;
const RECORDS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_replicate_in_batches_and_to_a_node_that_takes_none() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg =
        ClusterConfig { log: LogConfig { segment_bytes_max: 1024 * 1024, ..Default::default() }, ..Default::default() };
    let unbatched = ClusterConfig {
        network: NetworkConfig { coalesce_append_entries: false, ..NetworkConfig::default() },
        ..cfg.clone()
    };
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::new());
        let node_cfg = if id == 1 { &unbatched } else { &cfg };
        nodes.push(TestNode::start(id, "127.0.0.1:0", disk, tmp.path().join(format!("node-{id}")), node_cfg).await);
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for n in &refs {
        for group in 1..=GROUPS {
            n.node.open_group(group).await.unwrap();
        }
    }
    // Group g starts on node g % 3 (the only one with a log until it leads): leaders spread.
    for group in 1..=GROUPS {
        refs[(group % 3) as usize].node.initialize_group(group, members(&refs)).await.unwrap();
    }
    for group in 1..=GROUPS {
        wait_leader(&refs, group).await;
    }

    // Every group takes a write at once, round after round.
    for round in 0..ROUNDS {
        let writes = (1..=GROUPS).map(|group| append(&refs, group, batch(group * 100 + round, RECORDS)));
        for result in futures_util::future::join_all(writes).await {
            result.unwrap();
        }
    }

    // Every replica, the one that takes no batches included, holds every group's records.
    let end = ROUNDS * u64::from(RECORDS);
    for group in 1..=GROUPS {
        for n in &refs {
            wait_high_watermark(n, group, end).await;
        }
        let expected = read_all(refs[0], group);
        assert_eq!(expected.len() as u64, end, "group {group}");
        for n in &refs[1..] {
            assert_eq!(read_all(n, group), expected, "node {} group {group}", n.id);
        }
    }

    let (batches, requests) = refs[0].node.append_batches();
    assert_eq!((batches, requests), (0, 0), "a node with coalescing off sends no batch");
    for n in &refs[1..] {
        let (batches, requests) = n.node.append_batches();
        println!("node {}: {requests} AppendEntries in {batches} batches", n.id);
        assert!(requests > batches, "node {}: some batch carried several groups' requests", n.id);
    }
}
