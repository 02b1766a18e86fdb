//! Issue 14's check of consumer lag, against three in-process nodes whose wall clock the test
//! moves by hand (no real waiting): a group that stops while production continues shows a lag
//! in records and in seconds that grows, and the status STOP, in `DescribeGroup` and in the
//! coordinator's `/metrics` text; once it consumes again, lag returns to 0 and the status to OK.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::start_clocked;
use keel_broker::{Broker, Clock};
use keel_client::{
    Admin, ClientConfig, GroupAdmin, GroupConfig, GroupConsumer, Producer, ProducerConfig, ProducerRecord, TopicConfig,
};
use keel_proto::v1 as pb;

const T0: i64 = 1_700_000_000_000;
const GROUP: &str = "billing";

/// A wall clock that moves only when the test says so.
struct HandClock(AtomicI64);

impl HandClock {
    fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for HandClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Produces `count` records stamped by the broker (its clock, the hand clock).
async fn produce(client: &ClientConfig, count: usize) {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut pending = Vec::new();
    for i in 0..count {
        pending.push(producer.send("orders", ProducerRecord::new(format!("v{i}")).with_partition(0)).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    producer.close().await;
}

/// Polls and commits until the group's lag is 0.
async fn consume_all(client: &ClientConfig, admin: &GroupAdmin) -> GroupConsumer {
    let mut config = GroupConfig::new(GROUP);
    config.session_timeout = Duration::from_secs(2);
    let mut consumer = GroupConsumer::subscribe(client.clone(), config, &["orders"]).await.unwrap();
    for _ in 0..200 {
        consumer.poll(Duration::from_millis(50)).await.unwrap();
        let _ = consumer.commit().await;
        if admin.describe_group(GROUP).await.is_ok_and(|d| d.total_lag_records == 0 && !d.partitions.is_empty()) {
            return consumer;
        }
    }
    panic!("the group never caught up: {:?}", admin.describe_group(GROUP).await);
}

/// The value of the sample `name{labels}` in a metrics text, if it is there.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().unwrap())
}

fn coordinator<'a>(brokers: &'a [Broker], d: &pb::DescribeGroupResponse) -> &'a Broker {
    &brokers[d.coordinator_id as usize - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_group_lags_and_stops_then_recovers() {
    let clock = Arc::new(HandClock(AtomicI64::new(T0)));
    let tweak = |c: &mut keel_broker::BrokerConfig| {
        c.groups.offsets_partitions = 1;
        c.groups.lag_limits.window_commits = 3;
        c.groups.lag_stop_ms = 5_000;
    };
    let cluster = start_clocked(3, 3, tweak, Default::default(), Arc::clone(&clock) as Arc<dyn Clock>).await;
    let client = ClientConfig::new(cluster.addrs.clone()).with_seed(11);
    Admin::new(client.clone()).unwrap().create_topic("orders", 1, 3, TopicConfig::default()).await.unwrap();
    let admin = GroupAdmin::new(client.clone()).unwrap();

    produce(&client, 10).await;
    let consumer = consume_all(&client, &admin).await;
    let d = admin.describe_group(GROUP).await.unwrap();
    assert_eq!((d.status.as_str(), d.partitions[0].status.as_str()), ("OK", "OK"), "{d:?}");
    assert_eq!(d.partitions[0].lag_seconds, Some(0.0));
    // The consumer stops; records keep coming, stamped a second later.
    consumer.close().await.unwrap();
    clock.advance(1_000);
    produce(&client, 10).await;
    clock.advance(2_000);
    let early = admin.describe_group(GROUP).await.unwrap();
    let p = &early.partitions[0];
    assert_eq!((p.lag_records, p.lag_seconds), (10, Some(2.0)), "{early:?}");
    assert_eq!(early.status, "OK", "silent 3 s: not yet past the 5 s threshold: {early:?}");

    clock.advance(10_000);
    produce(&client, 10).await;
    let stopped = admin.describe_group(GROUP).await.unwrap();
    let p = &stopped.partitions[0];
    assert_eq!((p.lag_records, p.lag_seconds), (20, Some(12.0)), "lag grew in records and seconds: {stopped:?}");
    assert_eq!((p.status.as_str(), stopped.status.as_str()), ("STOP", "STOP"), "{stopped:?}");
    assert_eq!(stopped.max_lag_seconds, Some(12.0));
    assert_eq!(p.last_commit_timestamp_ms, Some(T0));

    let text = coordinator(&cluster.brokers, &stopped).metrics_text().await.unwrap();
    let g = format!("group=\"{GROUP}\"");
    assert_eq!(sample(&text, "keel_group_lag_records", &g), Some(20.0), "{text}");
    assert_eq!(sample(&text, "keel_group_lag_seconds", &g), Some(12.0));
    assert_eq!(sample(&text, "keel_group_status", &format!("{g},status=\"STOP\"")), Some(1.0));
    assert_eq!(sample(&text, "keel_group_status", &format!("{g},status=\"OK\"")), Some(0.0));
    let p0 = format!("{g},topic=\"orders\",partition=\"0\"");
    assert_eq!(sample(&text, "keel_group_partition_lag_records", &p0), Some(20.0));
    assert_eq!(sample(&text, "keel_group_partition_status", &format!("{p0},status=\"STOP\"")), Some(1.0));
    for other in cluster.brokers.iter().filter(|b| b.node_id() != stopped.coordinator_id) {
        let text = other.metrics_text().await.unwrap();
        assert_eq!(sample(&text, "keel_group_lag_records", &g), None, "only the coordinator exports a group");
    }

    // It resumes: lag back to 0, status OK.
    let consumer = consume_all(&client, &admin).await;
    let resumed = admin.describe_group(GROUP).await.unwrap();
    let p = &resumed.partitions[0];
    assert_eq!((p.lag_records, p.lag_seconds, p.status.as_str()), (0, Some(0.0), "OK"), "{resumed:?}");
    assert_eq!(resumed.status, "OK");
    let text = coordinator(&cluster.brokers, &resumed).metrics_text().await.unwrap();
    assert_eq!(sample(&text, "keel_group_lag_records", &g), Some(0.0));
    assert_eq!(sample(&text, "keel_group_status", &format!("{g},status=\"OK\"")), Some(1.0));
    assert_eq!(sample(&text, "keel_group_status", &format!("{g},status=\"STOP\"")), Some(0.0));
    consumer.close().await.unwrap();
}
