//! End to end, with real `keel server` processes: a follower is stalled (SIGSTOP) while 200 MiB
//! of 1 MiB records are acknowledged by the other two replicas, then resumed (SIGCONT); it must
//! be in sync again. Before AppendEntries was bounded in bytes (issue 12, item 1) it never was:
//! every request to it carried hundreds of MiB, over the 64 MiB raft RPC limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use keel_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};

const RECORDS: u64 = 200;
const RECORD_BYTES: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_follower_is_in_sync_again() {
    let cluster = common::Cluster::start(3, 40).await;
    let admin = cluster.admin();
    admin.create_topic("big", 1, 3, TopicConfig::default()).await.unwrap();
    let t = common::wait_leaders(&admin, "big").await;
    let leader = t.partitions[0].leader_id.unwrap();
    // Stall a node that leads neither the partition nor the metadata (so admin calls still work).
    let controller = admin.describe_cluster().await.unwrap().controller_leader;
    let stalled = (1..=3).find(|id| *id != leader && Some(*id) != controller).unwrap();
    cluster.signal(stalled, "STOP");

    // One record per batch (the cluster's batch limit is just under 4 MiB).
    let config = ProducerConfig { batch_bytes_max: RECORD_BYTES + (64 << 10), ..ProducerConfig::default() };
    let producer = Producer::new(cluster.client(1), config).unwrap();
    let mut pending = FuturesUnordered::new();
    let mut acked = 0;
    for n in 0..RECORDS {
        let value = vec![b'a' + (n % 26) as u8; RECORD_BYTES];
        pending.push(producer.send("big", ProducerRecord::new(value).with_partition(0)).await.unwrap());
        while pending.len() > 16 {
            pending.next().await.unwrap().unwrap();
            acked += 1;
        }
    }
    while let Some(delivery) = pending.next().await {
        delivery.unwrap();
        acked += 1;
    }
    producer.close().await;
    assert_eq!(acked, RECORDS);
    let t = admin.describe_topic("big").await.unwrap();
    assert!(!t.partitions[0].in_sync.contains(&stalled), "the stalled node fell behind");

    cluster.signal(stalled, "CONT");
    // A bound on the wait, not a claim about speed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let p = admin.describe_topic("big").await.unwrap().partitions.remove(0);
        if p.high_watermark >= RECORDS && p.in_sync.contains(&stalled) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {stalled} is not in sync again: in sync {:?}, high watermark {}",
            p.in_sync,
            p.high_watermark
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
