//! The metadata voters change at run time on five in-process nodes: three configured voters
//! grow to five, a voter's copy of `__meta` is replaced by a new generation (what `keel node
//! replace` does after a lost disk), and the voters shrink to three others, the ones taken
//! out dropping their copy. Topics are created through every stage, from voters and others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{channel, start_with_voters};
use keel_broker::{META_GROUP, META_TOPIC};
use keel_proto::v1 as pb;
use tonic::Code;

type Admin = pb::admin_client::AdminClient<tonic::transport::Channel>;

async fn voters(admin: &mut Admin) -> pb::PartitionDescription {
    let t = admin.describe_topic(pb::DescribeTopicRequest { name: META_TOPIC.into() }).await.unwrap().into_inner();
    t.topic.unwrap().partitions.remove(0)
}

/// Asks for the voters `to` (retrying while a leader is elected) and waits for the change to end.
async fn change_voters(admin: &mut Admin, to: &[u64]) {
    let request = || pb::MovePartitionRequest { topic: META_TOPIC.into(), partition: 0, replicas: to.to_vec() };
    for attempt in 0.. {
        match admin.move_partition(request()).await {
            Ok(_) => break,
            Err(status) if attempt < 100 && status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("changing the voters to {to:?}: {status:?}"),
        }
    }
    settle(admin, to).await;
}

async fn settle(admin: &mut Admin, to: &[u64]) {
    for _ in 0..600 {
        let p = voters(admin).await;
        if p.moving_to.is_empty() {
            assert_eq!(p.replicas, to, "the voters are the ones asked for");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the voter change to {to:?} did not finish within 60 s");
}

/// Creates a topic through `addr` (retrying while the controller changes hands).
async fn create(addr: &str, name: &str) {
    let mut admin = Admin::new(channel(addr).await);
    let request = || pb::CreateTopicRequest { name: name.into(), partitions: 2, replication_factor: 3, config: None };
    for attempt in 0..100 {
        match admin.create_topic(request()).await {
            Ok(_) => return,
            Err(status) if status.code() == Code::AlreadyExists => return,
            Err(status) if attempt < 99 => {
                let _ = status;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("creating {name} through {addr}: {status:?}"),
        }
    }
}

/// The voters (and their copy generations) of the metadata group as node `i`'s copy has them.
fn membership(cluster: &common::Cluster, i: usize) -> Vec<(u64, u32)> {
    let metrics = cluster.brokers[i].raft_node().metrics(META_GROUP).unwrap();
    let m = metrics.membership_config.membership().clone();
    let voters: BTreeSet<u64> = m.voter_ids().collect();
    m.nodes().filter(|(id, _)| voters.contains(id)).map(|(id, n)| (*id, n.generation)).collect()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_voters_grow_are_replaced_and_shrink_while_the_cluster_serves() {
    let cluster = start_with_voters(5, 3).await;
    let mut admin = Admin::new(channel(&cluster.addrs[4]).await);
    assert_eq!(voters(&mut admin).await.replicas, [1, 2, 3], "the configured voters");
    let bad = |replicas: Vec<u64>| pb::MovePartitionRequest { topic: META_TOPIC.into(), partition: 0, replicas };
    let status = admin.move_partition(bad(vec![1, 2, 9])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "an unknown node: {status:?}");
    let status = admin.move_partition(bad(vec![1, 1, 2])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    change_voters(&mut admin, &[1, 2, 3, 4, 5]).await;
    until("node 5's copy seeing five voters", || membership(&cluster, 4).len() == 5).await;
    assert_eq!(membership(&cluster, 4), [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]);
    create(&cluster.addrs[4], "after-growing").await;

    // A voter's copy replaced: the old one out, a blank one of a new generation filled in.
    let replaced = admin.replace_node(pb::ReplaceNodeRequest { node_id: 2 }).await.unwrap().into_inner();
    let _ = replaced;
    settle(&mut admin, &[1, 2, 3, 4, 5]).await;
    until("node 2's new copy", || cluster.brokers[1].raft_node().generation(META_GROUP) == Some(2)).await;
    until("the voters' view of node 2's copy", || membership(&cluster, 0).contains(&(2, 2))).await;
    create(&cluster.addrs[1], "after-replacing").await;

    // Shrink to three that include none of the first two; they drop their copy.
    change_voters(&mut admin, &[3, 4, 5]).await;
    for i in [0, 1] {
        until("a former voter dropping its copy", || cluster.brokers[i].raft_node().generation(META_GROUP).is_none())
            .await;
    }
    assert_eq!(membership(&cluster, 2), [(3, 0), (4, 1), (5, 1)]);
    // A former voter still reads the metadata (from the voters now) and forwards to the controller.
    create(&cluster.addrs[0], "after-shrinking").await;
    until("node 1 seeing the new topic", || cluster.brokers[0].metadata().topics.contains_key("after-shrinking")).await;
    for b in &cluster.brokers {
        let meta = b.metadata();
        until("every node's metadata", || meta.applied_offset > 0).await;
    }
}

/// A voter's disk is lost while the cluster limps: node 2 is down and misses a topic committed
/// by nodes 1 and 3; then node 3 loses its disk and node 1 goes down, and node 2 comes back. If
/// node 3's blank copy voted as its old one, node 2 (which lacks the topic) would be elected by
/// it and the committed topic would be gone. Returns whether node 2 became the controller
/// without the topic within a few election timeouts; then brings node 1 back, replaces node 3,
/// and checks the topic on every node.
async fn lose_a_voter_disk(faults: keel_broker::CoordinatorFaults) -> bool {
    let mut cluster = common::start_faulty(3, 3, |_| {}, faults).await;
    create(&cluster.addrs[0], "before").await;
    cluster.crash(1).await;
    create(&cluster.addrs[0], "during").await;
    cluster.crash(2).await;
    cluster.restart(2, true).await;
    cluster.crash(0).await;
    cluster.restart(1, false).await;
    let mut stale_leader = false;
    for _ in 0..40 {
        let b = &cluster.brokers[1];
        if b.raft_node().leader(META_GROUP) == Some(2) && !b.metadata().topics.contains_key("during") {
            // Give it the time to apply what it has before judging.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stale_leader = !b.metadata().topics.contains_key("during");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if stale_leader {
        return true;
    }
    cluster.restart(0, false).await;
    let mut admin = Admin::new(channel(&cluster.addrs[0]).await);
    for attempt in 0..200 {
        match admin.replace_node(pb::ReplaceNodeRequest { node_id: 3 }).await {
            Ok(r) => {
                assert!(r.into_inner().partitions.contains(&"__meta/0".to_owned()), "node 3's copy of __meta");
                break;
            }
            Err(status) if attempt < 199 => {
                let _ = status;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("replacing node 3: {status:?}"),
        }
    }
    settle(&mut admin, &[1, 2, 3]).await;
    until("node 3's new copy voting", || membership(&cluster, 0).contains(&(3, 1))).await;
    for i in 0..3 {
        let b = cluster.brokers[i].clone();
        until("every node seeing both topics", || {
            let m = b.metadata();
            m.topics.contains_key("before") && m.topics.contains_key("during")
        })
        .await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_lost_its_disk_never_votes_as_its_old_copy() {
    assert!(!lose_a_voter_disk(Default::default()).await, "a stale node was elected with the blank voter's vote");
}

/// The negative control of the test above: with the blank copy opened at once (the behaviour
/// before `bootstrap_meta`), the committed topic is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_blank_voter_elects_a_stale_leader() {
    let faults = keel_broker::CoordinatorFaults { blank_voter_rejoins: true, ..Default::default() };
    assert!(lose_a_voter_disk(faults).await, "the blank voter's vote should have elected node 2 without the topic");
}

/// Voters of a new cluster that start at different moments still form it. Started last to
/// first, the others have asked around before node 1 comes up; node 1 then finds them all
/// blank, opens its copy and campaigns at once, and the others, asking again, must not take
/// that fresh copy for a formed cluster and wait for a leader it cannot elect without them
/// (the readiness wait of `start_last_first` fails the test if they do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_started_one_after_another_form_a_new_cluster() {
    for gap in [Duration::from_millis(300), Duration::from_millis(900)] {
        let cluster = common::start_last_first(3, gap).await;
        let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
        assert_eq!(voters(&mut admin).await.replicas.len(), 3, "gap {gap:?}");
    }
}
