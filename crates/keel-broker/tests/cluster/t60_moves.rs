//! Partition moves on four in-process nodes: a partition moves off its preferred leader onto the
//! spare node while records are produced, every acknowledged record is on the new replica, the
//! replica moved off drops its copy, and bad moves are refused. Then the partition moves back to
//! the node it left, whose new copy is a new generation filled by the leader.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::{channel, start_with_voters};
use keel_proto::v1 as pb;
use tonic::Code;

fn produce(value: String) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: "orders".into(),
        partition: 0,
        records: vec![pb::Record {
            key: None,
            value: Some(value.into_bytes().into()),
            headers: vec![],
            timestamp_ms: 0,
        }],
        ..Default::default()
    }
}

async fn describe(admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>) -> pb::PartitionDescription {
    let t = admin.describe_topic(pb::DescribeTopicRequest { name: "orders".into() }).await.unwrap().into_inner();
    t.topic.unwrap().partitions.remove(0)
}

/// Every record of `orders/0` below `end`, as the node at `addr` serves it.
async fn read_from(addr: &str, end: u64) -> std::collections::BTreeMap<u64, String> {
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(addr).await);
    let mut got = std::collections::BTreeMap::new();
    let mut offset = 0;
    for _ in 0..200 {
        if offset >= end {
            break;
        }
        let request = pb::FetchRequest {
            topic: "orders".into(),
            partition: 0,
            offset,
            max_bytes: 0,
            max_wait_ms: 500,
            format: 0,
        };
        let r = consumer.fetch(request).await.unwrap().into_inner();
        for rec in r.records {
            got.insert(rec.offset, String::from_utf8(rec.value.unwrap().to_vec()).unwrap());
        }
        offset = r.next_offset;
    }
    got
}

/// Waits for the move in progress to finish; the partition then.
async fn settled(admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>) -> pb::PartitionDescription {
    for _ in 0..600 {
        let p = describe(admin).await;
        if p.moving_to.is_empty() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the move did not finish within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moves_while_records_are_produced_and_loses_none() {
    let cluster = start_with_voters(4, 3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[1]).await);
    let created = admin
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 1,
            replication_factor: 3,
            config: None,
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let from = created.partitions[0].replicas.clone();
    let spare = (1..=4).find(|n| !from.contains(n)).unwrap();
    // Off the preferred leader (usually the leader): the leader removes itself mid-move.
    let to = vec![spare, from[1], from[2]];

    // A producer that keeps going through the whole move, retrying whatever is refused while
    // leadership changes; it remembers what was acknowledged where.
    let producing = {
        let addrs = cluster.addrs.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400u32 {
                let value = format!("r{i}");
                for attempt in 0..400 {
                    let mut producer =
                        pb::producer_client::ProducerClient::new(channel(&addrs[attempt % addrs.len()]).await);
                    match producer.produce(produce(value.clone())).await {
                        Ok(r) => {
                            acked.push((r.into_inner().base_offset, value.clone()));
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Bad moves are refused and change nothing.
    let bad = |replicas: Vec<u64>| pb::MovePartitionRequest { topic: "orders".into(), partition: 0, replicas };
    let status = admin.move_partition(bad(vec![spare, from[1]])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = admin.move_partition(bad(vec![spare, spare, from[1]])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = admin.move_partition(bad(vec![9, from[1], from[2]])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = admin
        .move_partition(pb::MovePartitionRequest { topic: "orders".into(), partition: 7, replicas: to.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(describe(&mut admin).await.moving_to.is_empty());

    let recorded = admin.move_partition(bad(to.clone())).await.unwrap().into_inner().partition.unwrap();
    assert_eq!((recorded.replicas.clone(), recorded.moving_to.clone()), (from.clone(), to.clone()));
    // Asking again for the move in progress changes nothing; another move meanwhile is refused.
    admin.move_partition(bad(to.clone())).await.unwrap();
    let other = vec![from[0], spare, from[2]];
    if let Err(status) = admin.move_partition(bad(other)).await {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }

    assert_eq!(settled(&mut admin).await.replicas, to);

    let acked = producing.await.unwrap();
    assert_eq!(acked.len(), 400, "every record was acknowledged");

    // Every acknowledged record is on the new replica, read from its own log.
    let group = cluster.brokers[0].metadata().partition("orders", 0).unwrap().group;
    let new_node = &cluster.brokers[(spare - 1) as usize];
    let end = acked.iter().map(|(o, _)| o + 1).max().unwrap();
    let got = read_from(&cluster.addrs[(spare - 1) as usize], end).await;
    assert!(new_node.raft_node().group_ids().contains(&group), "the new replica hosts the group");
    for (offset, value) in &acked {
        assert_eq!(got.get(offset), Some(value), "acknowledged record at {offset} on node {spare}");
    }

    // The replica moved off drops its copy.
    let old = &cluster.brokers[(from[0] - 1) as usize];
    for _ in 0..100 {
        if !old.raft_node().group_ids().contains(&group) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!old.raft_node().group_ids().contains(&group), "node {} still hosts the partition", from[0]);

    // The group's voters are the new replicas, and it still takes writes.
    let metrics = new_node.raft_node().metrics(group).unwrap();
    let voters: std::collections::BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
    assert_eq!(voters, to.iter().copied().collect());
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    let mut written = false;
    for _ in 0..200 {
        if producer.produce(produce("after".into())).await.is_ok() {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written, "the moved partition takes writes");

    // Back to the node it left. Its old copy is gone; the new one is the partition's second
    // generation there (the copy a blank disk would also be), and only the leader fills it.
    admin.move_partition(bad(from.clone())).await.unwrap();
    assert_eq!(settled(&mut admin).await.replicas, from);
    assert_eq!(old.raft_node().generation(group), Some(2), "node {} holds a new generation", from[0]);
    let got = read_from(&cluster.addrs[(from[0] - 1) as usize], end).await;
    for (offset, value) in &acked {
        assert_eq!(got.get(offset), Some(value), "acknowledged record at {offset} back on node {}", from[0]);
    }
}
