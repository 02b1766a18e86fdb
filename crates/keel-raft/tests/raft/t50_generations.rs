//! Generations: a node whose copy of a group was lost (a wiped disk) comes back as a new
//! generation of that copy, blank. The group's members still name the old generation, so the
//! blank copy answers none of their RPCs (it would vote, and acknowledge appends, as if it had
//! the old copy's vote and log); the leader brings it in as a learner of the new generation, lets
//! it catch up, and only then makes it a voter.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use keel_raft::types::ChangeMembers;
use keel_raft::{Node, NodeError};
use keel_storage::LogConfig;

const GROUP: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_comes_back_as_a_new_generation_and_only_through_the_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let (mut nodes, first_leader) = start_group(tmp.path(), &cfg, 3, GROUP).await;
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for tag in 0..50u64 {
        append(&refs, GROUP, batch(tag, 2)).await.unwrap();
    }

    // A follower loses its disk and comes back blank, as generation 1 of its copy.
    let wiped = (first_leader + 1) % 3;
    let other = 3 - first_leader - wiped;
    nodes[wiped].stop(true).await;
    let (id, addr) = (nodes[wiped].id, nodes[wiped].addr.clone());
    std::fs::remove_dir_all(&nodes[wiped].dir).unwrap();
    nodes[wiped].restart(&cfg).await;
    nodes[wiped].node.open_group_with(GROUP, LogConfig::default(), 1).await.unwrap();
    match nodes[wiped].node.open_group_with(GROUP, LogConfig::default(), 0).await {
        Err(NodeError::Generation { have: 1, wanted: 0, .. }) => {}
        other => panic!("the copy is generation 1, not 0: {other:?}"),
    }

    // The members still name generation 0 there, so the blank copy takes no part: with the
    // leader down, the one other member cannot win an election with the blank copy's vote.
    nodes[first_leader].stop(true).await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let survivor = nodes[other].node.metrics(GROUP).unwrap();
    assert_ne!(survivor.current_leader, Some(nodes[other].id), "no leader without a real quorum");
    let blank = nodes[wiped].node.metrics(GROUP).unwrap();
    assert_eq!(blank.last_log_index, None, "the blank copy got no entries meant for the old one");
    assert_eq!(blank.vote.leader_id().term, 0, "and granted no vote");

    // The old leader comes back; the two old members go on without the blank copy.
    nodes[first_leader].restart(&cfg).await;
    nodes[first_leader].node.open_group(GROUP).await.unwrap();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let members_left = [refs[first_leader], refs[other]];
    let leader = [first_leader, other][wait_leader(&members_left, GROUP).await];
    for tag in 50..60u64 {
        append(&members_left, GROUP, batch(tag, 2)).await.unwrap();
    }
    assert_eq!(nodes[wiped].node.metrics(GROUP).unwrap().last_log_index, None);

    // The leader removes the old copy, adds the new one as a learner (caught up when this
    // returns), and makes it a voter.
    let raft = nodes[leader].node.raft(GROUP).unwrap();
    let others: BTreeSet<u64> = nodes.iter().filter(|n| n.id != id).map(|n| n.id).collect();
    raft.change_membership(ChangeMembers::ReplaceAllVoters(others.clone()), false).await.unwrap();
    raft.add_learner(id, Node::at(addr.clone(), 1), true).await.unwrap();
    let all: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
    raft.change_membership(ChangeMembers::ReplaceAllVoters(all), false).await.unwrap();
    for tag in 60..70u64 {
        append(&refs, GROUP, batch(tag, 2)).await.unwrap();
    }
    for n in &nodes {
        wait_high_watermark(n, GROUP, 140).await;
    }
    let copies: Vec<Vec<(u64, String)>> = nodes.iter().map(|n| read_all(n, GROUP)).collect();
    assert_eq!(copies[0].len(), 140);
    assert!(copies.iter().all(|c| c == &copies[0]), "the new generation holds every record");
    for n in &mut nodes {
        n.stop(false).await;
    }
}
