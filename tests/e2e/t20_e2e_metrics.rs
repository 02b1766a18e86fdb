//! End to end: `/metrics` of real `keel server` processes, parsed by a Prometheus text parser.
//! The series operators alert on exist from startup; after N records are acknowledged the
//! nodes' produce record counters moved by N; a killed replica makes the leader of its partitions
//! report them under-replicated within about one election timeout, and they are caught up again
//! after its restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::{Duration, Instant};

use common::{Cluster, sample, scrape};
use keel_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};

/// The loopback addresses of this test's cluster (127.0.0.60-62): the other end-to-end tests use
/// 20-22, 30-32, 36, 40-42, 45, 48, 50 and 70-72, and a user's own `keel dev` 127.0.0.1.
const FIRST_IP: u8 = 60;

const RECORDS: u64 = 200;

/// Series that exist on every node from startup, as the parser names them (histograms by their
/// family, counters with `_total`).
const AT_STARTUP: &[&str] = &[
    "keel_node_info",
    "keel_node_ready",
    "keel_raft_groups",
    "keel_raft_groups_quiescent",
    "keel_raft_append_batches_total",
    "keel_raft_append_batch_requests_total",
    "keel_partitions_led",
    "keel_partitions_leaderless",
    "keel_partitions_under_replicated",
    "keel_partitions_below_quorum",
    "keel_leadership_changes_total",
    "keel_raft_apply_lag_max",
    "keel_in_flight_bytes",
    "keel_in_flight_max_bytes",
    "keel_subscribe_buffer_bytes",
    "keel_produce_requests_total",
    "keel_produce_records_total",
    "keel_produce_bytes_total",
    "keel_fetch_requests_total",
    "keel_fetch_bytes_total",
    "keel_errors_total",
    "keel_produce_latency_seconds",
    "keel_append_commit_latency_seconds",
    "keel_fetch_latency_seconds",
    "keel_flush_latency_seconds",
    "keel_flush_bytes",
    "keel_produce_streams",
    "keel_subscribe_streams",
    "keel_connections",
    "keel_topic_partitions",
    "keel_topic_partitions_under_replicated",
    "keel_topic_log_bytes",
    "keel_partition_log_start_offset",
    "keel_partition_log_end_offset",
    "keel_partition_high_watermark",
];

/// The sum of `name{labels}` over the nodes that answer.
fn total(cluster: &Cluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    cluster
        .nodes
        .iter()
        .filter(|n| n.child.is_some())
        .filter_map(|n| scrape(&n.metrics_addr))
        .map(|s| sample(&s, name, labels))
        .sum()
}

/// Polls `total(name{labels})` every 100 ms until `done` holds, for at most `within`.
async fn wait_total(
    cluster: &Cluster,
    name: &str,
    labels: &[(&str, &str)],
    within: Duration,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let started = Instant::now();
    loop {
        let value = total(cluster, name, labels);
        if done(value) {
            return value;
        }
        assert!(started.elapsed() < within, "{name}{labels:?} is still {value} after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_produces_and_a_killed_replica() {
    let mut cluster = Cluster::start(3, FIRST_IP).await;
    for node in &cluster.nodes {
        let scrape = scrape(&node.metrics_addr).expect("the node serves /metrics");
        let names: std::collections::BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        for name in AT_STARTUP {
            assert!(names.contains(name), "node {} does not export {name} at startup", node.id);
        }
        assert_eq!(sample(&scrape, "keel_node_ready", &[]), 1.0, "node {} is serving", node.id);
        // Every code of every API is there at 0 before any error happened.
        assert!(scrape.samples.iter().any(|s| s.metric == "keel_errors_total"
            && s.labels.get("api") == Some("produce")
            && s.labels.get("code") == Some("unavailable")));
    }

    let admin = cluster.admin();
    admin.create_topic("metrics", 1, 3, TopicConfig::default()).await.unwrap();
    let described = common::wait_leaders(&admin, "metrics").await;
    let leader = described.partitions[0].leader_id.unwrap();
    let before = total(&cluster, "keel_produce_records_total", &[]);
    let producer = Producer::new(cluster.client(7), ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for n in 0..RECORDS {
        deliveries.push(producer.send("metrics", ProducerRecord::new(format!("m{n}"))).await.unwrap());
    }
    for delivery in deliveries {
        delivery.await.unwrap();
    }
    producer.close().await;
    let after = total(&cluster, "keel_produce_records_total", &[]);
    assert_eq!(after - before, RECORDS as f64, "the produce record counters moved by the records acknowledged");
    let topic = [("topic", "metrics")];
    assert_eq!(total(&cluster, "keel_topic_partitions", &topic), 3.0, "three replicas of the partition");
    assert!(total(&cluster, "keel_produce_latency_seconds_count", &[]) >= 1.0);
    assert!(total(&cluster, "keel_flush_latency_seconds_count", &[]) >= 1.0);
    let leader_scrape = scrape(&cluster.nodes[leader as usize - 1].metrics_addr).unwrap();
    let partition = [("topic", "metrics"), ("partition", "0")];
    assert_eq!(sample(&leader_scrape, "keel_partition_high_watermark", &partition), RECORDS as f64);
    assert_eq!(sample(&leader_scrape, "keel_partition_leader", &partition), 1.0);

    // A follower dies: its leader stops hearing from it and reports the partition
    // under-replicated within a lease (election_max_ms = 1 s here), though nothing is written.
    let victim = cluster.nodes.iter().map(|n| n.id).find(|id| *id != leader).unwrap();
    cluster.kill(victim);
    let within = Duration::from_secs(10);
    wait_total(&cluster, "keel_topic_partitions_under_replicated", &topic, within, |v| v >= 1.0).await;
    cluster.restart(victim);
    cluster.wait_healthy(Duration::from_secs(60)).await;
    // Caught up again: nothing is under-replicated anywhere (the internal partitions included).
    wait_total(&cluster, "keel_partitions_under_replicated", &[], Duration::from_secs(30), |v| v == 0.0).await;
}
