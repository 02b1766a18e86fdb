//! Regressions of issue 12 at the raft level: a follower that fell further behind than one raft
//! RPC can carry (64 MiB) must still catch up; a leader that lost its quorum steps down.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use keel_record::{BatchBuilder, NewRecord};

const GROUP: u64 = 12;

/// A batch of 16 records of 64 KiB: 1 MiB.
fn mebibyte_batch(tag: u64) -> Bytes {
    let value = vec![b'a' + (tag % 26) as u8; 64 << 10];
    let mut b = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for _ in 0..16 {
        b.push(NewRecord { timestamp_ms: 1_000, key: None, value: Some(&value), headers: &[] }).unwrap();
    }
    b.build()
}

/// openraft asks for up to 300 entries per AppendEntries and each may be a whole batch: a
/// follower 80 MiB behind used to get the same request, over the 64 MiB raft RPC limit, forever.
/// What one request carries is now bounded in bytes, so it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_further_behind_than_one_rpc_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = start_nodes(tmp.path(), &cfg, 3).await;
    for n in &nodes {
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    let leader = wait_leader(&refs, GROUP).await;
    let behind = (leader + 1) % 3;

    nodes[behind].stop(false).await;
    let live: Vec<&TestNode> = nodes.iter().enumerate().filter(|(i, _)| *i != behind).map(|(_, n)| n).collect();
    let mut end = 0;
    for tag in 0..80 {
        end = append(&live, GROUP, mebibyte_batch(tag)).await.unwrap().next_offset;
    }
    assert_eq!(end, 80 * 16);

    let old = &nodes[behind];
    let (id, addr, disk, dir) = (old.id, old.addr.clone(), Arc::clone(&old.disk), old.dir.clone());
    nodes[behind] = TestNode::start(id, &addr, disk, dir, &cfg).await;
    nodes[behind].node.open_group(GROUP).await.unwrap();
    // A bound on the wait, not a claim about speed: without the fix it never gets there.
    let mut hw = nodes[behind].node.store(GROUP).unwrap().high_watermark();
    let caught_up = tokio::time::timeout(Duration::from_secs(120), hw.wait_for(|v| *v >= end)).await.is_ok();
    assert!(caught_up, "the follower stayed at high watermark {} of {end}", *hw.borrow());
    let all: Vec<Vec<(u64, String)>> = nodes.iter().map(|n| read_all(n, GROUP)).collect();
    assert_eq!(all[behind].len(), end as usize);
    assert!(all.iter().all(|a| a == &all[0]), "all replicas converge");
    for n in &mut nodes {
        n.stop(false).await;
    }
}

/// Issue 12 item 13: a leader whose followers no longer hear it keeps hearing nothing back, so
/// openraft refuses its writes after a lease but leaves it a leader, which clients were still
/// told it was. It must stop naming itself at once and step down within about a lease, while a
/// leader that a quorum acknowledges never steps down; and once the followers are back, the
/// group elects a leader and accepts writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_its_quorum_steps_down() {
    const GROUP: u64 = 13;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let lease = Duration::from_millis(cfg.timings.election_max_ms);
    let mut nodes = start_nodes(tmp.path(), &cfg, 3).await;
    for n in &nodes {
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    let leader = wait_leader(&refs, GROUP).await;
    append(&refs, GROUP, batch(1, 3)).await.unwrap();

    // Acknowledged by its followers, a leader stays, in its term, for many leases.
    let term = nodes[leader].node.metrics(GROUP).unwrap().current_term;
    tokio::time::sleep(lease * 4).await;
    let m = nodes[leader].node.metrics(GROUP).unwrap();
    assert_eq!((m.current_leader, m.current_term), (Some(nodes[leader].id), term), "a healthy leader stays");

    for (i, n) in nodes.iter_mut().enumerate() {
        if i != leader {
            n.stop(false).await;
        }
    }
    let cut_off = &nodes[leader];
    // It stops naming itself once its lease is over, and steps down soon after.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(cut_off.node.leader(GROUP), None, "a leader without its quorum does not name itself");
    let mut stepped_down = false;
    for _ in 0..40 {
        let m = cut_off.node.metrics(GROUP).unwrap();
        if m.state != openraft::ServerState::Leader {
            assert_eq!(m.current_leader, None, "it knows no leader to name");
            assert_eq!(m.current_term, term + 1, "stepping down costs one term, and no more");
            stepped_down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stepped_down,
        "the leader was still leading {:?} after its followers went",
        lease * 2 + Duration::from_millis(200)
    );

    // The followers come back: a leader is elected and writes go through.
    for (i, n) in nodes.iter_mut().enumerate() {
        if i == leader {
            continue;
        }
        let (id, addr, disk, dir) = (n.id, n.addr.clone(), Arc::clone(&n.disk), n.dir.clone());
        *n = TestNode::start(id, &addr, disk, dir, &cfg).await;
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    wait_leader(&refs, GROUP).await;
    let appended = append(&refs, GROUP, batch(2, 3)).await.unwrap();
    assert_eq!(appended.base_offset, 3, "nothing acknowledged was lost");
    for n in &mut nodes {
        n.stop(false).await;
    }
}
