//! End to end, with real processes: 100,000 delayed records, due over 60 seconds, are scheduled
//! to three partitions, and the node leading the most `__delayed` partitions is killed with
//! SIGKILL while they fire and restarted 5 s later. Every record arrives exactly once, none
//! before its time, and each partition holds them in the order of their times. The lateness is
//! printed, not asserted (the machine is shared); the bound asserted is that everything arrived
//! within 90 s after the last was due.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use keel_client::{
    Consumer, ConsumerConfig, DELIVER_AT_HEADER, DeliverAt, Producer, ProducerConfig, ProducerRecord, TopicConfig,
};

const TOPIC: &str = "reminders";
const PARTITIONS: u32 = 3;
/// Records per schedule request (they share one deliver-at time).
const PER_REQUEST: usize = 100;
const REQUESTS: usize = 1_000;
/// The records' times spread over this span.
const SPAN_MS: i64 = 60_000;
/// Scheduling must finish before the first record is due (it takes a few seconds).
const LEAD_MS: i64 = 20_000;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// One record as the consumer saw it.
#[derive(Debug)]
struct Seen {
    partition: u32,
    offset: u64,
    due: i64,
    received: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_delayed_records_fire_once_in_order_across_a_killed_node() {
    let mut cluster = common::Cluster::start(3, 90).await;
    let admin = cluster.admin();
    admin.create_topic(TOPIC, PARTITIONS, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, TOPIC).await;
    let delayed = common::wait_leaders(&admin, keel_broker::DELAYED_TOPIC).await;

    let producer = Producer::new(cluster.client(1), ProducerConfig::default()).unwrap();
    let first_due = now_ms() + LEAD_MS;
    let step = SPAN_MS / REQUESTS as i64;
    let scheduled: Vec<Vec<String>> = futures_util::stream::iter(0..REQUESTS)
        .map(|i| {
            let producer = &producer;
            async move {
                let records = (0..PER_REQUEST)
                    .map(|j| ProducerRecord::new(format!("r{i}-{j}")).with_partition(i as u32 % PARTITIONS))
                    .collect();
                producer.send_delayed(TOPIC, records, DeliverAt::AtMs(first_due + i as i64 * step)).await.unwrap()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let ids: BTreeSet<&String> = scheduled.iter().flatten().collect();
    assert_eq!(ids.len(), REQUESTS * PER_REQUEST, "one distinct timer id per record");
    let scheduled_by = now_ms();
    assert!(scheduled_by < first_due, "scheduling took {} ms, past the first time", scheduled_by + LEAD_MS - first_due);
    eprintln!("scheduled {} records in {} ms", ids.len(), scheduled_by + LEAD_MS - first_due);
    producer.close().await;

    // The node that leads the most __delayed partitions dies a third of the way through.
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for p in &delayed.partitions {
        *led.entry(p.leader_id.unwrap()).or_default() += 1;
    }
    let victim = led.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id).unwrap();
    let kill_at = first_due + SPAN_MS / 3;
    let mut killed_at = None;

    let mut consumer = Consumer::new(cluster.client(2), ConsumerConfig::default()).unwrap();
    consumer.assign(TOPIC, &[]).await.unwrap();
    let mut seen: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    let deadline = first_due + SPAN_MS + 90_000;
    while seen.len() < REQUESTS * PER_REQUEST {
        assert!(now_ms() < deadline, "only {} of {} records arrived in time", seen.len(), REQUESTS * PER_REQUEST);
        if killed_at.is_none() && now_ms() >= kill_at {
            cluster.kill(victim);
            killed_at = Some(now_ms());
            eprintln!("killed node {victim} with {} records read", seen.len());
        }
        if let Some(at) = killed_at
            && now_ms() > at + 5_000
            && cluster.nodes[victim as usize - 1].child.is_none()
        {
            cluster.restart(victim);
        }
        let records = match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => records,
            Err(e) => {
                eprintln!("poll: {e}");
                continue;
            }
        };
        let received = now_ms();
        for r in records {
            let due = r
                .headers
                .iter()
                .find(|(k, _)| k == DELIVER_AT_HEADER)
                .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok())
                .expect("a delivered delayed record names its time");
            let value = String::from_utf8(r.value.unwrap_or_default().to_vec()).unwrap();
            seen.entry(value).or_default().push(Seen { partition: r.partition, offset: r.offset, due, received });
        }
    }
    assert!(killed_at.is_some(), "the node was killed while records fired");

    let twice: Vec<&String> = seen.iter().filter(|(_, s)| s.len() > 1).map(|(v, _)| v).collect();
    assert!(twice.is_empty(), "{} records arrived twice, e.g. {:?}", twice.len(), twice.first());
    let early: Vec<(&String, i64)> =
        seen.iter().filter(|(_, s)| s[0].received < s[0].due).map(|(v, s)| (v, s[0].due - s[0].received)).collect();
    assert!(early.is_empty(), "{} records arrived before their time, e.g. {:?}", early.len(), early.first());
    let mut by_partition: BTreeMap<u32, Vec<(u64, i64)>> = BTreeMap::new();
    for s in seen.values().map(|s| &s[0]) {
        by_partition.entry(s.partition).or_default().push((s.offset, s.due));
    }
    for (partition, mut records) in by_partition {
        records.sort();
        let out_of_order = records.windows(2).find(|w| w[1].1 < w[0].1);
        assert!(out_of_order.is_none(), "partition {partition}: a later time before an earlier one: {out_of_order:?}");
    }
    let mut lateness: Vec<i64> = seen.values().map(|s| s[0].received - s[0].due).collect();
    lateness.sort_unstable();
    let at = |q: f64| lateness[((lateness.len() - 1) as f64 * q) as usize];
    eprintln!(
        "lateness as the consumer saw it (ms): p50 {} p99 {} max {} (node {victim} killed at +{} ms)",
        at(0.5),
        at(0.99),
        at(1.0),
        killed_at.unwrap_or_default() - first_due
    );
}
