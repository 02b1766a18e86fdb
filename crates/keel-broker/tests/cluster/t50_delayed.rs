//! Delayed records against three in-process nodes, through the Rust client and raw gRPC: none is
//! visible before its time, each appears once after it (across a stop of the node that
//! coordinates the timers), in the order of their times per partition; a cancelled one never
//! appears; a retried schedule (same request token) schedules nothing more; bad delays are
//! refused with nothing scheduled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_broker::{Clock, DELAYED_TOPIC};
use keel_client::{
    Admin, ClientConfig, ClientError, Consumer, ConsumerConfig, DeliverAt, Producer, ProducerConfig, ProducerRecord,
    TopicConfig,
};
use keel_proto::v1 as pb;
use tonic::Code;

/// A clock that moves with time, from a fixed start.
struct RunningClock(tokio::time::Instant);

impl Clock for RunningClock {
    fn now_ms(&self) -> i64 {
        START_MS + self.0.elapsed().as_millis() as i64
    }
}

const START_MS: i64 = 1_700_000_000_000;

/// A fired record: its value, when it was due, and when it was written to the target.
#[derive(Debug, Clone)]
struct Fired {
    value: String,
    due: i64,
    written: i64,
}

async fn read_all(client: &ClientConfig, topic: &str, partition: u32) -> Vec<Fired> {
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    let (_, end) = consumer.watermarks(topic, partition).await.unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        let fetched = consumer.fetch(topic, partition, offset).await.unwrap();
        for r in fetched.records.into_iter().filter(|r| r.offset < end) {
            let header =
                r.headers.iter().find(|(k, _)| k == "keel-deliver-at-ms").expect("a fired record says its time");
            let due = String::from_utf8_lossy(header.1.as_deref().unwrap()).parse().unwrap();
            let value = String::from_utf8(r.value.as_deref().unwrap().to_vec()).unwrap();
            out.push(Fired { value, due, written: r.timestamp_ms });
            offset = r.offset + 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_records_appear_once_after_their_time_and_never_when_cancelled() {
    let clock = Arc::new(RunningClock(tokio::time::Instant::now()));
    let cluster = common::start_clocked(
        3,
        3,
        |c| c.delayed.partitions = 1,
        keel_broker::CoordinatorFaults::default(),
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    let client = ClientConfig::new(cluster.addrs.clone());
    let admin = Admin::new(client.clone()).unwrap();
    admin.create_topic("d", 2, 3, TopicConfig::default()).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();

    let record = |v: String| ProducerRecord::new(v);
    let batch = |prefix: &str, n: usize| (0..n).map(|i| record(format!("{prefix}{i:03}"))).collect::<Vec<_>>();
    // Later first, so that the order of their times is not the order they were scheduled in.
    let mut ids = BTreeMap::new();
    let now = clock.now_ms();
    for (prefix, partition, when) in [
        ("c", 0, DeliverAt::AtMs(now + 4_000)),
        ("b", 0, DeliverAt::After(Duration::from_millis(2_500))),
        ("a", 1, DeliverAt::After(Duration::from_millis(1_000))),
        ("x", 1, DeliverAt::After(Duration::from_millis(3_000))),
    ] {
        let records = batch(prefix, 20).into_iter().map(|r| r.with_partition(partition)).collect();
        let got = producer.send_delayed("d", records, when).await.unwrap();
        assert_eq!(got.len(), 20);
        ids.insert(prefix, got);
    }
    // Cancel half of x; cancelling one again succeeds again (a retried cancel is safe).
    for id in ids["x"].iter().step_by(2) {
        producer.cancel_delayed(id).await.unwrap();
    }
    producer.cancel_delayed(&ids["x"][0]).await.unwrap();

    // Bad input: refused, nothing scheduled.
    let too_far = producer.send_delayed("d", batch("z", 1), DeliverAt::After(Duration::from_secs(400 * 86_400))).await;
    assert!(matches!(too_far, Err(ClientError::InvalidArgument(_))), "{too_far:?}");
    let mut raw = pb::producer_client::ProducerClient::new(common::channel(&cluster.addrs[0]).await);
    let request = |token: u64| pb::ProduceRequest {
        topic: "d".into(),
        partition: 0,
        records: vec![pb::Record { value: Some(format!("t{token}").into_bytes().into()), ..Default::default() }],
        delay_ms: Some(1_500),
        request_token: token,
        ..Default::default()
    };
    let both = pb::ProduceRequest { deliver_at_ms: Some(now), ..request(1) };
    assert_eq!(raw.produce(both).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = pb::ProduceRequest { topic: "nope".into(), ..request(1) };
    assert_eq!(raw.produce(unknown).await.unwrap_err().code(), Code::NotFound);
    let internal = pb::ProduceRequest { topic: DELAYED_TOPIC.into(), ..request(1) };
    assert_eq!(raw.produce(internal).await.unwrap_err().code(), Code::PermissionDenied);

    // A retry with the same token is answered with the same id and schedules nothing more.
    let first = raw.produce(request(77)).await.unwrap().into_inner().timer_ids;
    let retry = raw.produce(request(77)).await.unwrap().into_inner().timer_ids;
    assert_eq!(first, retry);
    assert_eq!(first.len(), 1);

    // Nothing is visible yet.
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    for p in 0..2 {
        assert_eq!(consumer.watermarks("d", p).await.unwrap().1, 0, "nothing fired early in partition {p}");
    }

    // Stop the node that coordinates the timers while they are pending.
    let meta = cluster.brokers[0].metadata();
    let group = meta.delayed_topic().unwrap().partitions[0].group;
    let leader = cluster.brokers[0].raft_node().leader(group).unwrap();
    let stopped = cluster.brokers.iter().find(|b| b.node_id() == leader).unwrap();
    stopped.clone().shutdown().await;
    let alive: Vec<String> = cluster
        .brokers
        .iter()
        .zip(&cluster.addrs)
        .filter(|(b, _)| b.node_id() != leader)
        .map(|(_, a)| a.clone())
        .collect();
    let client = ClientConfig::new(alive);

    let expected = [20 + 20 + 1, 20 + 10];
    for _ in 0..300 {
        let fired = [read_all(&client, "d", 0).await, read_all(&client, "d", 1).await];
        if fired.iter().zip(expected).all(|(f, n)| f.len() >= n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer: nothing more may come (no duplicate after the failover).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fired = [read_all(&client, "d", 0).await, read_all(&client, "d", 1).await];
    for (p, (records, n)) in fired.iter().zip(expected).enumerate() {
        assert_eq!(records.len(), n, "partition {p}: every delayed record once, none cancelled: {records:?}");
        for r in records {
            assert!(
                r.written >= r.due,
                "partition {p}: {} written at {} before its time {}",
                r.value,
                r.written,
                r.due
            );
        }
        let dues: Vec<i64> = records.iter().map(|r| r.due).collect();
        assert!(dues.is_sorted(), "partition {p}: fired in the order of their times: {dues:?}");
    }
    let values: Vec<&str> = fired[1].iter().map(|r| r.value.as_str()).collect();
    for (i, id) in ids["x"].iter().enumerate() {
        let value = format!("x{i:03}");
        assert_eq!(values.contains(&value.as_str()), i % 2 == 1, "{value} ({id}) cancelled iff even");
    }
    // Cancelling a delivered one is refused.
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let late = producer.cancel_delayed(&ids["a"][0]).await.unwrap_err();
    assert!(matches!(late, ClientError::FailedPrecondition(_)), "{late:?}");
    for b in &cluster.brokers {
        if b.node_id() != leader {
            b.shutdown().await;
        }
    }
}
