//! End to end, with real `keel server` processes: the leader of a partition is killed with
//! SIGKILL while 10,000 records stream in, restarted, and every acknowledged record is then read
//! back exactly at its acknowledged offset, exactly once (the producer is idempotent; `keel audit`
//! agrees); the restarted node then leads its partition again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use keel_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};

const RECORDS: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_a_killed_leader() {
    let mut cluster = common::Cluster::start(3, 20).await;
    let admin = cluster.admin();
    admin.create_topic("e2e", 3, 3, TopicConfig::default()).await.unwrap();
    let before = common::wait_leaders(&admin, "e2e").await;
    let victim = before.partitions[0].leader_id.unwrap();

    let producer = Producer::new(cluster.client(1), ProducerConfig::default()).unwrap();
    let mut pending = FuturesUnordered::new();
    let mut acked: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut killed = false;
    for n in 0..RECORDS {
        let value = format!("r{n}");
        let record = ProducerRecord::new(value.clone()).with_partition((n % 3) as u32);
        let delivery = producer.send("e2e", record).await.unwrap();
        pending.push(async move { (value, delivery.await) });
        // Keep at most ~1,000 in flight, and collect acks as they come.
        while pending.len() > 1_000 {
            let (value, result) = pending.next().await.unwrap();
            match result {
                Ok(m) => assert!(acked.insert((m.partition, m.offset), value).is_none(), "offset acked twice"),
                Err(e) => failed.push((value, e)),
            }
        }
        if !killed && acked.len() >= 3_000 {
            // Mid-stream: the leader of partition 0 dies without a chance to flush anything.
            cluster.kill(victim);
            killed = true;
        }
    }
    while let Some((value, result)) = pending.next().await {
        match result {
            Ok(m) => assert!(acked.insert((m.partition, m.offset), value).is_none(), "offset acked twice"),
            Err(e) => failed.push((value, e)),
        }
    }
    producer.close().await;
    assert!(killed, "the kill happened mid-stream");
    // The producer retries through the failover: nothing should have failed for good.
    assert!(failed.is_empty(), "{} records failed, e.g. {:?}", failed.len(), failed.first());

    cluster.restart(victim);
    cluster.wait_healthy(Duration::from_secs(60)).await;
    let after = common::wait_leaders(&admin, "e2e").await;
    let until: BTreeMap<u32, u64> = after.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
    for (partition, offset) in acked.keys() {
        assert!(*offset < until[partition], "acked offset {offset} of partition {partition} is above the HW");
    }
    let got = common::read_all(cluster.client(2), "e2e", &until).await;
    let mut lost = Vec::new();
    for (key, value) in &acked {
        if got.get(key) != Some(value) {
            lost.push((key, value, got.get(key)));
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged records not at their offsets, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // Every record sent is there exactly once: the producer is idempotent, so the retries
    // through the failover wrote nothing twice.
    let distinct: std::collections::BTreeSet<&String> = got.values().collect();
    assert_eq!((distinct.len() as u64, got.len() as u64), (RECORDS, RECORDS), "each record once");
    // And `keel audit` proves it from the log alone, by the producer's sequences.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["audit", "e2e", "--output", "json", "--bootstrap", &cluster.nodes[1].addr])
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "keel audit found gaps or duplicates: {report}");
    for p in report["partitions"].as_array().unwrap() {
        for producer in p["producers"].as_array().unwrap() {
            assert_eq!((producer["duplicates"].as_u64(), producer["missing"].as_u64()), (Some(0), Some(0)), "{report}");
        }
    }

    // The restarted node catches up and, as the preferred replica, gets its leadership back.
    let mut leader = None;
    for _ in 0..300 {
        leader = admin.describe_topic("e2e").await.unwrap().partitions[0].leader_id;
        if leader == Some(victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leader, Some(victim), "partition 0 returns to its preferred leader");
    // Other partitions (the offsets topic's among them) move back to the restarted node too, and
    // each handover leaves its partition leaderless for an election: wait for the cluster to settle.
    let mut status = admin.describe_cluster().await.unwrap();
    for _ in 0..300 {
        if status.leaderless == 0 && status.nodes.iter().all(|n| n.reachable) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = admin.describe_cluster().await.unwrap();
    }
    assert!(status.nodes.iter().all(|n| n.reachable));
    assert_eq!(status.leaderless, 0, "every partition has a leader once the cluster settles");
}
