//! `keel-client`'s GroupConsumer against three in-process nodes: members share a topic, commit
//! after processing, one member dies without leaving and its partitions move on after its
//! session timeout, a static member comes back to its own partitions, and in the end every
//! record was processed at least once and the committed offsets are the log ends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::start;
use keel_client::{
    Admin, ClientConfig, GroupAdmin, GroupConfig, GroupConsumer, Producer, ProducerConfig, ProducerRecord, TopicConfig,
};

fn group_config(group: &str, instance: Option<&str>) -> GroupConfig {
    let mut c = GroupConfig::new(group);
    c.session_timeout = Duration::from_secs(2);
    c.instance_id = instance.map(str::to_owned);
    c
}

async fn produce(client: &ClientConfig, topic: &str, from: usize, count: usize) {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut pending = Vec::new();
    for i in from..from + count {
        let record = ProducerRecord::new(format!("v{i}")).with_key(format!("k{i}"));
        pending.push(producer.send(topic, record).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    producer.close().await;
}

/// Polls and commits until `seen` holds every value below `total` (or the deadline passes).
async fn consume(members: &mut [GroupConsumer], seen: &mut BTreeSet<String>, total: usize, max: Duration) {
    let deadline = tokio::time::Instant::now() + max;
    while seen.len() < total && tokio::time::Instant::now() < deadline {
        for m in members.iter_mut() {
            for r in m.poll(Duration::from_millis(100)).await.unwrap() {
                seen.insert(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
            }
            // Processed: commit (a refused commit after a rebalance is fine; records come again).
            let _ = m.commit().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_die_come_back_and_commit_everything() {
    let cluster = start(3).await;
    let client = ClientConfig::new(cluster.addrs.clone()).with_seed(7);
    Admin::new(client.clone()).unwrap().create_topic("jobs", 6, 3, TopicConfig::default()).await.unwrap();
    produce(&client, "jobs", 0, 300).await;

    let mut members = Vec::new();
    for (i, instance) in [None, None, Some("static-1")].into_iter().enumerate() {
        let c = client.clone().with_seed(100 + i as u64);
        members.push(GroupConsumer::subscribe(c, group_config("workers", instance), &["jobs"]).await.unwrap());
    }
    let mut seen = BTreeSet::new();
    consume(&mut members, &mut seen, 300, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 300);
    // All 300 may be consumed before the group settles (the first member to join got every
    // partition); the static member's return only means something once the three share them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while members.iter().any(|m| m.assignment().len() != 2) && tokio::time::Instant::now() < deadline {
        consume(&mut members, &mut seen, usize::MAX, Duration::from_millis(300)).await;
    }
    let owned: Vec<BTreeSet<(String, u32)>> = members.iter().map(GroupConsumer::assignment).collect();
    let all: BTreeSet<_> = owned.iter().flatten().cloned().collect();
    assert_eq!(all.len(), 6, "every partition owned: {owned:?}");
    assert!(owned.iter().all(|o| o.len() == 2), "the uniform assignor shares 6 partitions 2-2-2: {owned:?}");
    assert_eq!(owned.iter().map(BTreeSet::len).sum::<usize>(), 6, "no partition owned twice: {owned:?}");

    // Member 0 dies without leaving; the static member restarts (close = leave for a while).
    let dead = members.remove(0);
    drop(dead);
    let static_member = members.pop().unwrap();
    let static_before = static_member.assignment();
    static_member.close().await.unwrap();
    let back =
        GroupConsumer::subscribe(client.clone().with_seed(300), group_config("workers", Some("static-1")), &["jobs"])
            .await
            .unwrap();
    members.push(back);
    produce(&client, "jobs", 300, 300).await;
    consume(&mut members, &mut seen, 600, Duration::from_secs(60)).await;
    assert_eq!(seen.len(), 600, "every record processed at least once");
    let static_after = members[1].assignment();
    assert!(
        static_before.is_subset(&static_after),
        "the static member got its partitions back: before {static_before:?}, after {static_after:?}, other {:?}",
        members[0].assignment()
    );

    // Commit until the committed offsets reach the log ends, then check with the admin view.
    let admin = GroupAdmin::new(client.clone()).unwrap();
    let mut described = admin.describe_group("workers").await.unwrap();
    for _ in 0..100 {
        if described.total_lag_records == 0 && described.members.len() == 2 {
            break;
        }
        for m in members.iter_mut() {
            let _ = m.poll(Duration::from_millis(50)).await.unwrap();
            let _ = m.commit().await;
        }
        described = admin.describe_group("workers").await.unwrap();
    }
    assert_eq!(described.members.len(), 2, "{described:?}");
    assert_eq!(described.total_lag_records, 0, "{described:?}");
    let committed: BTreeMap<u32, u64> =
        admin.fetch_offsets("workers").await.unwrap().into_iter().map(|o| (o.partition, o.offset)).collect();
    assert_eq!(committed.len(), 6);
    assert_eq!(committed.values().sum::<u64>(), 600);
    for m in members {
        m.close().await.unwrap();
    }
    let listed = admin.list_groups().await.unwrap();
    let workers = listed.groups.iter().find(|g| g.group == "workers").unwrap();
    assert_eq!(workers.members, 1, "the static member's slot waits for it; the other left at once");
}
