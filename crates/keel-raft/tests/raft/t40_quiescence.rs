//! Issue 17 item 2: idle groups quiesce (no heartbeats, no election timers) and wake for a
//! write; a quiescent leader's node dying still elects new leaders (node liveness), a restarted
//! follower is heard again, and nothing acknowledged is lost on the way.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{
    ClusterConfig, TestNode, append, batch, members, read_all, start_nodes, wait_high_watermark, wait_leader,
};

const GROUPS: u64 = 12;

/// Waits until every group is quiescent on every node of `nodes`.
async fn wait_quiescent(nodes: &[&TestNode], what: &str) {
    for _ in 0..400 {
        if nodes.iter().all(|n| (1..=GROUPS).all(|g| n.node.is_quiescent(g))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let active: Vec<(u64, Vec<u64>)> =
        nodes.iter().map(|n| (n.id, (1..=GROUPS).filter(|g| !n.node.is_quiescent(*g)).collect())).collect();
    panic!("{what}: groups still active per node: {active:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_quiesce_wake_for_writes_and_fail_over() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = start_nodes(tmp.path(), &cfg, 3).await;
    for n in &nodes {
        for g in 1..=GROUPS {
            n.node.open_group(g).await.unwrap();
        }
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    // Blank groups wait without ticking until they are initialized or contacted.
    assert!(refs.iter().all(|n| (1..=GROUPS).all(|g| n.node.is_dormant(g))), "blank groups are dormant");
    for g in 1..=GROUPS {
        refs[(g % 3) as usize].node.initialize_group(g, members(&refs)).await.unwrap();
    }
    for g in 1..=GROUPS {
        wait_leader(&refs, g).await;
        append(&refs, g, batch(g * 100, 2)).await.unwrap();
    }
    wait_quiescent(&refs, "after one write each").await;
    // Quiescent leaders still name themselves (their nodes answer node heartbeats).
    let terms: Vec<u64> = (1..=GROUPS).map(|g| refs[0].node.metrics(g).unwrap().current_term).collect();
    let leaders: Vec<usize> = futures_util::future::join_all((1..=GROUPS).map(|g| wait_leader(&refs, g))).await;

    // Quiet for several leases: no group elects anyone, and every one stays quiescent.
    tokio::time::sleep(Duration::from_millis(cfg.timings.election_max_ms * 4)).await;
    let later: Vec<u64> = (1..=GROUPS).map(|g| refs[0].node.metrics(g).unwrap().current_term).collect();
    assert_eq!(terms, later, "no elections while quiescent");
    assert!(refs.iter().all(|n| (1..=GROUPS).all(|g| n.node.is_quiescent(g))), "still quiescent");

    // A write wakes its group, is acknowledged by a quorum, and the group quiesces again.
    let appended = append(&refs, 1, batch(1_000, 1)).await.unwrap();
    assert_eq!(appended.base_offset, 2);
    for n in &refs {
        wait_high_watermark(n, 1, 3).await;
    }
    wait_quiescent(&refs, "after a write to group 1").await;

    // The node leading the most groups dies: the others elect new leaders for every group.
    let busiest = (0..3).max_by_key(|i| leaders.iter().filter(|l| *l == i).count()).unwrap();
    let led: Vec<u64> = (1..=GROUPS).filter(|g| leaders[(*g - 1) as usize] == busiest).collect();
    assert!(!led.is_empty());
    eprintln!("phase: killing node {} which leads {led:?}", nodes[busiest].id);
    nodes[busiest].stop(true).await;
    let survivors: Vec<&TestNode> = nodes.iter().enumerate().filter(|(i, _)| *i != busiest).map(|(_, n)| n).collect();
    for g in &led {
        wait_leader(&survivors, *g).await;
        let appended = append(&survivors, *g, batch(g * 100 + 50, 1)).await.unwrap();
        assert_eq!(appended.base_offset, 2 + u64::from(*g == 1), "group {g}: nothing acknowledged was lost");
    }

    eprintln!("phase: restart");
    // It comes back: it hears from the leaders again, catches up, and everything quiesces.
    let n = &mut nodes[busiest];
    let (id, addr, disk, dir) = (n.id, n.addr.clone(), Arc::clone(&n.disk), n.dir.clone());
    *n = TestNode::start(id, &addr, disk, dir, &cfg).await;
    for g in 1..=GROUPS {
        n.node.open_group(g).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for g in 1..=GROUPS {
        wait_leader(&refs, g).await;
    }
    wait_quiescent(&refs, "after the restart").await;
    for g in 1..=GROUPS {
        let all: Vec<Vec<(u64, String)>> = refs.iter().map(|n| read_all(n, g)).collect();
        assert!(all.iter().all(|a| a == &all[0]), "group {g}: replicas agree");
        let expect = 2 + u64::from(g == 1) + u64::from(led.contains(&g));
        assert_eq!(all[0].len() as u64, expect, "group {g}: every acknowledged record, once");
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
}

/// A group with anything on disk is never dormant: after a whole-cluster restart no replica
/// would tick, and no group would ever elect a leader again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_elect_after_a_whole_cluster_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = start_nodes(tmp.path(), &cfg, 3).await;
    const FEW: u64 = 4;
    for n in &nodes {
        for g in 1..=FEW {
            n.node.open_group(g).await.unwrap();
        }
    }
    {
        let refs: Vec<&TestNode> = nodes.iter().collect();
        for g in 1..=FEW {
            refs[(g % 3) as usize].node.initialize_group(g, members(&refs)).await.unwrap();
            wait_leader(&refs, g).await;
            append(&refs, g, batch(g * 100, 1)).await.unwrap();
            for n in &refs {
                wait_high_watermark(n, g, 1).await;
            }
        }
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
    for n in &mut nodes {
        let (id, addr, disk, dir) = (n.id, n.addr.clone(), Arc::clone(&n.disk), n.dir.clone());
        *n = TestNode::start(id, &addr, disk, dir, &cfg).await;
        for g in 1..=FEW {
            n.node.open_group(g).await.unwrap();
            assert!(!n.node.is_dormant(g), "node {id} group {g}: it has a log, so it times elections");
        }
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for g in 1..=FEW {
        wait_leader(&refs, g).await;
        let appended = append(&refs, g, batch(g * 100 + 1, 1)).await.unwrap();
        assert_eq!(appended.base_offset, 1, "group {g}: the record written before the restart is kept");
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
}
