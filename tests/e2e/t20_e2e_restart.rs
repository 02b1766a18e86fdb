//! End to end: all three nodes are killed (SIGKILL) and restarted; topics, offsets and data
//! survive, and producing resumes at the next offsets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use keel_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};

async fn produce(
    cluster: &common::Cluster,
    topic: &str,
    partitions: u32,
    from: u64,
    count: u64,
) -> BTreeMap<(u32, u64), String> {
    let producer = Producer::new(cluster.client(from), ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for n in from..from + count {
        let value = format!("{topic}-{n}");
        let record = ProducerRecord::new(value.clone()).with_partition((n % u64::from(partitions)) as u32);
        deliveries.push((value, producer.send(topic, record).await.unwrap()));
    }
    let mut acked = BTreeMap::new();
    for (value, delivery) in deliveries {
        let m = delivery.await.unwrap();
        acked.insert((m.partition, m.offset), value);
    }
    producer.close().await;
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_offsets_and_data_survive_a_full_restart() {
    let mut cluster = common::Cluster::start(3, 30).await;
    let admin = cluster.admin();
    admin.create_topic("a", 2, 3, TopicConfig::default()).await.unwrap();
    admin.create_topic("b", 1, 1, TopicConfig { retention_ms: 3_600_000, ..TopicConfig::default() }).await.unwrap();
    common::wait_leaders(&admin, "a").await;
    common::wait_leaders(&admin, "b").await;
    let mut acked_a = produce(&cluster, "a", 2, 0, 1_000).await;
    let acked_b = produce(&cluster, "b", 1, 0, 300).await;
    let topics_before: Vec<(String, usize, u32)> = admin
        .list_topics()
        .await
        .unwrap()
        .iter()
        .map(|t| (t.name.clone(), t.partitions.len(), t.replication_factor))
        .collect();

    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    cluster.wait_healthy(Duration::from_secs(60)).await;

    let topics_after: Vec<(String, usize, u32)> = admin
        .list_topics()
        .await
        .unwrap()
        .iter()
        .map(|t| (t.name.clone(), t.partitions.len(), t.replication_factor))
        .collect();
    assert_eq!(topics_before, topics_after);
    let b = common::wait_leaders(&admin, "b").await;
    assert_eq!(b.config.unwrap().retention_ms, 3_600_000);
    // A new leader reports its high watermark once it has committed an entry of its term: wait
    // for that (bounded), then every acknowledged record must be below it.
    let mut until: BTreeMap<u32, u64> = BTreeMap::new();
    for _ in 0..200 {
        let a = common::wait_leaders(&admin, "a").await;
        until = a.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
        if until.values().sum::<u64>() >= 1_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(until.values().sum::<u64>(), 1_000, "high watermarks survive");

    // Producing resumes after the old offsets; everything reads back where it was acked.
    let more = produce(&cluster, "a", 2, 1_000, 200).await;
    assert!(more.keys().all(|(p, o)| *o >= until[p]));
    acked_a.extend(more);
    let until: BTreeMap<u32, u64> = [(0, 600), (1, 600)].into();
    let got = common::read_all(cluster.client(9), "a", &until).await;
    assert_eq!(got, acked_a);
    let got_b = common::read_all(cluster.client(10), "b", &[(0, 300)].into()).await;
    assert_eq!(got_b, acked_b);

    // A data dir belongs to one node: starting another node id on it is refused, loudly.
    cluster.kill(1);
    let node = &cluster.nodes[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["server", "--node-id", "7", "--listen", "127.0.0.1:0", "--insecure", "--data-dir"])
        .arg(&node.data_dir)
        .env_remove("KEEL_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to node 1"), "{stderr}");
}

/// SIGTERM stops a node within its grace period (1 s in these tests) even while a consumer's
/// Subscribe stream, which never ends by itself, is attached; the stop is clean (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_with_a_consumer_attached() {
    let mut cluster = common::Cluster::start(1, 36).await;
    let admin = cluster.admin();
    admin.create_topic("s", 1, 1, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, "s").await;
    produce(&cluster, "s", 1, 0, 10).await;
    let mut consumer = keel_client::Consumer::new(cluster.client(2), keel_client::ConsumerConfig::default()).unwrap();
    consumer.assign("s", &[0]).await.unwrap();
    let mut read = 0;
    while read < 10 {
        read += consumer.poll(Duration::from_secs(5)).await.unwrap().len();
    }
    // The consumer is now subscribed and waiting for more: its stream stays open.
    let waiting = tokio::spawn(async move { consumer.poll(Duration::from_secs(60)).await.map(|r| r.len()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.signal(1, "TERM");
    // Without the grace period's bound the node waits until the client gives up on its quiet
    // stream (~10 s); with it, about a second.
    let status = cluster.wait_exit(1, Duration::from_secs(6)).await;
    let status = status.expect("the node stopped within its grace period");
    assert!(status.success(), "a clean stop: {status}");
    waiting.abort();
}
