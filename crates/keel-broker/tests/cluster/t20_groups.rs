//! Consumer groups over real gRPC against three in-process nodes: `__consumer_offsets`, the
//! coordinator lookup and its hints, the join/revoke handshake, fenced and refused commits,
//! reads of committed offsets after the coordinator's node stops, lag, reset and delete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, channel, start};
use keel_proto::v1 as pb;
use keel_proto::v1::groups_client::GroupsClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

/// Asks any node for the group's coordinator until one is known; returns its client.
async fn coordinator(cluster: &Cluster, group: &str) -> (u64, GroupsClient<Channel>) {
    for _ in 0..200 {
        let mut any = GroupsClient::new(channel(&cluster.addrs[0]).await);
        if let Ok(r) =
            any.find_coordinator(pb::FindCoordinatorRequest { group: group.into(), ..Default::default() }).await
        {
            let r = r.into_inner();
            if let Some(id) = r.coordinator_id {
                let mut c = GroupsClient::new(channel(&r.coordinator_addr).await);
                // Serving once it has loaded the partition.
                let probe = c.fetch_offsets(pb::FetchOffsetsRequest { group: group.into(), partitions: vec![] }).await;
                if probe.is_ok() {
                    return (id, c);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no coordinator for {group}");
}

fn join(group: &str, member: &str, topics: &[&str]) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        group: group.into(),
        member_id: member.into(),
        member_epoch: 0,
        subscribed_topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    }
}

fn owned(r: &pb::HeartbeatResponse) -> Vec<pb::TopicPartitions> {
    r.assignment.clone()
}

fn partitions(r: &pb::HeartbeatResponse) -> BTreeSet<(String, u32)> {
    r.assignment.iter().flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p))).collect()
}

fn commit(group: &str, member: &str, epoch: i32, topic: &str, partition: u32, offset: u64) -> pb::CommitOffsetsRequest {
    pb::CommitOffsetsRequest {
        group: group.into(),
        member_id: member.into(),
        member_epoch: epoch,
        offsets: vec![pb::OffsetCommit { topic: topic.into(), partition, offset, metadata: String::new() }],
    }
}

async fn create_and_fill(cluster: &Cluster, topic: &str, partitions: u32, records: u32) {
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    admin
        .create_topic(pb::CreateTopicRequest { name: topic.into(), partitions, replication_factor: 3, config: None })
        .await
        .unwrap();
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    for p in 0..partitions {
        let request = pb::ProduceRequest {
            topic: topic.into(),
            partition: p,
            records: (0..records)
                .map(|i| pb::Record { value: Some(format!("{p}-{i}").into_bytes().into()), ..Default::default() })
                .collect(),
            producer_id: None,
            producer_epoch: None,
            base_sequence: None,
            ..Default::default()
        };
        for _ in 0..100 {
            if producer.produce(request.clone()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_topic_is_internal() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    let topic = loop {
        let listed = admin.list_topics(pb::ListTopicsRequest {}).await.unwrap().into_inner();
        if let Some(t) = listed.topics.into_iter().find(|t| t.name == "__consumer_offsets") {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(topic.internal);
    assert_eq!(topic.replication_factor, 3);
    assert_eq!(topic.partitions.len(), 8);
    let deleted = admin.delete_topic(pb::DeleteTopicRequest { name: "__consumer_offsets".into() }).await;
    assert_eq!(deleted.unwrap_err().code(), Code::PermissionDenied);
    let added = admin
        .add_partitions(pb::AddPartitionsRequest { name: "__consumer_offsets".into(), count: 1, target_total: 0 })
        .await;
    assert_eq!(added.unwrap_err().code(), Code::PermissionDenied);
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    let produced = producer
        .produce(pb::ProduceRequest {
            topic: "__consumer_offsets".into(),
            records: vec![pb::Record { value: Some(b"x".to_vec().into()), ..Default::default() }],
            producer_id: None,
            ..Default::default()
        })
        .await;
    assert_eq!(produced.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_commits_are_fenced() {
    let cluster = start(3).await;
    create_and_fill(&cluster, "orders", 4, 10).await;
    let (coord_id, mut c) = coordinator(&cluster, "g1").await;

    // Every node agrees on the coordinator; a node that is not it answers with a hint.
    for addr in &cluster.addrs {
        let mut any = GroupsClient::new(channel(addr).await);
        let r = any
            .find_coordinator(pb::FindCoordinatorRequest { group: "g1".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.coordinator_id, Some(coord_id));
        if r.coordinator_addr != *addr {
            let refused = any.heartbeat(join("g1", "x", &["orders"])).await.unwrap_err();
            assert_eq!(refused.code(), Code::Unavailable);
            assert_eq!(reason(&refused), "NOT_COORDINATOR");
        }
    }

    let a1 = c.heartbeat(join("g1", "a", &["orders"])).await.unwrap().into_inner();
    assert_eq!(partitions(&a1).len(), 4);
    c.commit_offsets(commit("g1", "a", a1.member_epoch, "orders", 0, 5)).await.unwrap();
    // Above the high watermark (10 records per partition): refused, nothing changes.
    let above = c.commit_offsets(commit("g1", "a", a1.member_epoch, "orders", 0, 11)).await.unwrap_err();
    assert_eq!((above.code(), reason(&above).as_str()), (Code::OutOfRange, "OFFSET_ABOVE_HIGH_WATERMARK"));

    let b1 = c.heartbeat(join("g1", "b", &["orders"])).await.unwrap().into_inner();
    assert!(partitions(&b1).is_empty(), "b waits until a revokes");
    let mut a2 =
        pb::HeartbeatRequest { member_epoch: a1.member_epoch, owned: owned(&a1), ..join("g1", "a", &["orders"]) };
    let a2r = c.heartbeat(a2.clone()).await.unwrap().into_inner();
    assert_eq!(partitions(&a2r).len(), 2, "a keeps two and revokes two");
    let revoked: Vec<(String, u32)> = partitions(&a1).difference(&partitions(&a2r)).cloned().collect();
    a2.owned = owned(&a2r);
    let a3 = c.heartbeat(a2).await.unwrap().into_inner();
    let b2 = c
        .heartbeat(pb::HeartbeatRequest { member_epoch: b1.member_epoch, ..join("g1", "b", &["orders"]) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(partitions(&b2).len(), 2);
    assert!(partitions(&a3).is_disjoint(&partitions(&b2)));

    // a's commit of a partition it gave away is a zombie commit.
    let (t, p) = &revoked[0];
    let zombie = c.commit_offsets(commit("g1", "a", a3.member_epoch, t, *p, 7)).await.unwrap_err();
    assert_eq!((zombie.code(), reason(&zombie).as_str()), (Code::FailedPrecondition, "STALE_MEMBER_EPOCH"));
    c.commit_offsets(commit("g1", "b", b2.member_epoch, t, *p, 8)).await.unwrap();
    let unknown = c.commit_offsets(commit("g1", "nobody", 1, t, *p, 9)).await.unwrap_err();
    assert_eq!((unknown.code(), reason(&unknown).as_str()), (Code::NotFound, "UNKNOWN_MEMBER_ID"));

    let fetched = c.fetch_offsets(pb::FetchOffsetsRequest { group: "g1".into(), partitions: vec![] }).await.unwrap();
    let got: BTreeSet<(String, u32, u64)> =
        fetched.into_inner().offsets.into_iter().map(|o| (o.topic, o.partition, o.offset)).collect();
    assert!(got.contains(&("orders".into(), 0, 5)));
    assert!(got.contains(&(t.clone(), *p, 8)));

    // Describe: members, lag per partition, in records and seconds.
    let d = c.describe_group(pb::DescribeGroupRequest { group: "g1".into() }).await.unwrap().into_inner();
    assert_eq!(d.members.len(), 2);
    assert_eq!(d.partitions.len(), 4);
    let p0 = d.partitions.iter().find(|x| x.partition == 0).unwrap();
    assert_eq!((p0.committed_offset, p0.log_end_offset, p0.lag_records), (Some(5), 10, 5));
    assert!(p0.lag_seconds.is_some());
    let listed = GroupsClient::new(channel(&cluster.addrs[2]).await)
        .list_groups(pb::ListGroupsRequest { offsets_partition: None })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.groups.iter().any(|g| g.group == "g1" && g.members == 2), "{listed:?}");

    // Reset and delete need an empty group.
    let reset = pb::ResetOffsetsRequest {
        group: "g1".into(),
        offsets: vec![pb::OffsetCommit { topic: "orders".into(), partition: 0, offset: 1, metadata: String::new() }],
    };
    let busy = c.reset_offsets(reset.clone()).await.unwrap_err();
    assert_eq!(reason(&busy), "GROUP_NOT_EMPTY");
    for (m, e) in [("a", a3.member_epoch), ("b", b2.member_epoch)] {
        let _ = e;
        c.heartbeat(pb::HeartbeatRequest { member_epoch: -1, ..join("g1", m, &[]) }).await.unwrap();
    }
    let done = c.reset_offsets(reset).await.unwrap().into_inner();
    assert_eq!(done.offsets[0].offset, 1, "a reset may move an offset back");
    c.delete_group(pb::DeleteGroupRequest { group: "g1".into() }).await.unwrap();
    let gone = c.describe_group(pb::DescribeGroupRequest { group: "g1".into() }).await.unwrap_err();
    assert_eq!(reason(&gone), "GROUP_ID_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_the_coordinators_node() {
    let cluster = start(3).await;
    create_and_fill(&cluster, "events", 2, 20).await;
    let (coord_id, mut c) = coordinator(&cluster, "g2").await;
    let a = c.heartbeat(join("g2", "a", &["events"])).await.unwrap().into_inner();
    c.commit_offsets(commit("g2", "a", a.member_epoch, "events", 1, 17)).await.unwrap();
    // The coordinator's node stops; another replica takes over and replays the partition.
    cluster.brokers[(coord_id - 1) as usize].halt().await;
    let mut found = None;
    for _ in 0..400 {
        for addr in cluster.addrs.iter().enumerate().filter(|(i, _)| *i as u64 + 1 != coord_id).map(|(_, a)| a) {
            let mut any = GroupsClient::new(channel(addr).await);
            if let Ok(r) = any.fetch_offsets(pb::FetchOffsetsRequest { group: "g2".into(), partitions: vec![] }).await {
                found = Some(r.into_inner());
            }
        }
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let offsets = found.expect("a new coordinator serves the group").offsets;
    assert_eq!(offsets.len(), 1);
    assert_eq!((offsets[0].partition, offsets[0].offset), (1, 17));
}

/// Bounded growth: a coordinator partition that passes its compaction threshold rewrites every
/// group's live records and each replica trims whole segments below the rewrite. Checked the way
/// a restarted coordinator would see it: every replica's trimmed log, replayed from its start,
/// holds exactly the offsets `FetchOffsets` returns, including those of a group untouched since
/// the very first records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_offsets_partition_keeps_every_live_offset() {
    let lost = compact_and_replay(keel_broker::CoordinatorFaults::default()).await;
    assert!(lost.is_empty(), "{lost:?}");
}

/// The negative control: a coordinator that trims without rewriting the live state is caught
/// (the group untouched since the start is gone from the replayed logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_without_the_rewrite_is_caught() {
    let faults = keel_broker::CoordinatorFaults { compact_without_rewrite: true, ..Default::default() };
    let lost = compact_and_replay(faults).await;
    assert!(lost.iter().any(|l| l.contains("old-")), "{lost:?}");
}

/// Commits enough to compact one offsets partition several times, waits until every replica
/// trimmed it, and returns what differs between `FetchOffsets` and each replica's trimmed log
/// replayed from its start (empty when nothing was lost).
async fn compact_and_replay(faults: keel_broker::CoordinatorFaults) -> Vec<String> {
    let tweak = |c: &mut keel_broker::BrokerConfig| {
        // 64 KiB segments; compaction past 64 KiB; retention (which trims) every 200 ms.
        c.groups.offsets_compact_bytes = 64 << 10;
        c.groups.maintenance_interval = Duration::from_millis(200);
        c.retention_interval = Duration::from_millis(200);
    };
    let cluster = common::start_faulty(3, 3, tweak, faults).await;
    create_and_fill(&cluster, "events", 2, 20).await;
    // "old" and "busy" share an offsets partition, so that "old"'s lone commit is in the
    // segments the busy group's traffic pushes below the compaction point.
    let partitions = cluster.brokers[0].metadata().offsets_topic().unwrap().partitions.len() as u32;
    let target = keel_coordinator::groups::partition_for_group("busy", partitions);
    let old = (0..)
        .map(|i| format!("old-{i}"))
        .find(|g| keel_coordinator::groups::partition_for_group(g, partitions) == target)
        .unwrap();
    let (_, mut c) = coordinator(&cluster, &old).await;
    let o = c.heartbeat(join(&old, "o", &["events"])).await.unwrap().into_inner();
    c.commit_offsets(commit(&old, "o", o.member_epoch, "events", 0, 3)).await.unwrap();
    c.heartbeat(pb::HeartbeatRequest { member_epoch: -1, ..join(&old, "o", &["events"]) }).await.unwrap();

    let (_, mut c) = coordinator(&cluster, "busy").await;
    // The member only commits from here on: a session longer than the 200 commits take on a
    // loaded CI machine keeps it in the group without heartbeats (10 s was once too short).
    let a = c
        .heartbeat(pb::HeartbeatRequest { session_timeout_ms: 300_000, ..join("busy", "a", &["events"]) })
        .await
        .unwrap()
        .into_inner();
    let metadata = "m".repeat(2_000);
    for i in 0..200u64 {
        let mut request = commit("busy", "a", a.member_epoch, "events", (i % 2) as u32, i / 10);
        request.offsets[0].metadata = metadata.clone();
        c.commit_offsets(request).await.unwrap();
    }
    let raft_group = cluster.brokers[0].metadata().offsets_topic().unwrap().partitions[target as usize].group;
    let mut starts = Vec::new();
    for _ in 0..200 {
        starts =
            cluster.brokers.iter().map(|b| b.raft_node().store(raft_group).unwrap().positions().0.offset).collect();
        if starts.iter().all(|s| *s > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(starts.iter().all(|s| *s > 0), "every replica trimmed its log: starts {starts:?}");

    // What was acknowledged, and what the live coordinator serves (its memory, not yet rebuilt).
    let fetch = |group: &str| pb::FetchOffsetsRequest { group: group.into(), partitions: vec![] };
    let served = [
        BTreeSet::from([(old.clone(), 0, 3)]),
        BTreeSet::from([("busy".to_owned(), 0, 19), ("busy".to_owned(), 1, 19)]),
    ];
    for (i, group) in [old.as_str(), "busy"].into_iter().enumerate() {
        let (_, mut c) = coordinator(&cluster, group).await;
        let offsets = c.fetch_offsets(fetch(group)).await.unwrap().into_inner().offsets;
        let now: BTreeSet<_> = offsets.iter().map(|o| (group.to_owned(), o.partition, o.offset)).collect();
        assert_eq!(now, served[i]);
    }
    let mut lost = Vec::new();
    for broker in &cluster.brokers {
        let store = broker.raft_node().store(raft_group).unwrap();
        let mut state = keel_coordinator::groups::Groups::default();
        let mut next = store.positions().0.offset;
        let end = *store.high_watermark().borrow();
        while next < end {
            for batch in store.read_committed(next, 1 << 20).unwrap() {
                for r in batch.records() {
                    let r = r.unwrap();
                    let offset = r.offset;
                    let record = keel_coordinator::Record::from(r);
                    if record.key != keel_coordinator::COMPACTED_KEY {
                        keel_coordinator::Shard::replay(&mut state, offset, &record).unwrap();
                    }
                }
                next = batch.header().next_offset();
            }
        }
        for (i, group) in [old.as_str(), "busy"].into_iter().enumerate() {
            let rebuilt: BTreeSet<(String, u32, u64)> = state
                .get(group)
                .map(|g| g.offsets.iter().map(|(tp, c)| (group.to_owned(), tp.partition, c.offset)).collect())
                .unwrap_or_default();
            if rebuilt != served[i] {
                lost.push(format!("node {}: {group} replays to {rebuilt:?}, not {:?}", broker.node_id(), served[i]));
            }
        }
    }
    lost
}

/// The client turns a status into `ClientError::Group` only for reasons it knows: every refusal
/// the group shard can give must be among them, or a client would miss it.
#[test]
fn clients_recognise_every_group_refusal_reason() {
    for reason in keel_coordinator::groups::GroupError::REASONS {
        assert!(keel_client::GROUP_REASONS.contains(reason), "{reason} is missing from keel_client::GROUP_REASONS");
    }
}
