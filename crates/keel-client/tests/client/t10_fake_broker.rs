//! The client against a fake in-process cluster: admin calls, produce with leader moves and
//! injected failures, consumption of every offset once and in order, seeks, flush and close.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::fake;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fake::Cluster;
use keel_client::{
    Admin, ClientConfig, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Offset, Producer, ProducerConfig,
    ProducerRecord, RecordMetadata, TopicConfig, partition_for_key,
};

fn config(cluster: &Cluster) -> ClientConfig {
    let mut config = ClientConfig::new(cluster.bootstrap()).with_seed(7);
    config.request_timeout = Duration::from_secs(2);
    config.retry_backoff_min = Duration::from_millis(5);
    config.retry_backoff_max = Duration::from_millis(50);
    config
}

fn value(i: usize) -> Bytes {
    Bytes::from(format!("value-{i}"))
}

/// Polls until `n` records arrived (or panics after 10 s).
async fn consume(consumer: &mut Consumer, n: usize) -> Vec<ConsumerRecord> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {n} records arrived", out.len());
        out.extend(consumer.poll(Duration::from_millis(100)).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_manages_topics() {
    let cluster = Cluster::start(2).await;
    let admin = Admin::new(config(&cluster)).unwrap();
    let created = admin.create_topic("orders", 3, 1, TopicConfig::default()).await.unwrap();
    assert_eq!((created.name.as_str(), created.partitions.len()), ("orders", 3));
    let err = admin.create_topic("orders", 3, 1, TopicConfig::default()).await.unwrap_err();
    assert!(matches!(err, ClientError::AlreadyExists(_)), "{err}");
    let err = admin.create_topic("empty", 0, 1, TopicConfig::default()).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    assert_eq!(admin.describe_topic("orders").await.unwrap().partitions.len(), 3);
    assert_eq!(admin.increase_partitions("orders", 5).await.unwrap().partitions.len(), 5);
    // A retry after a lost answer must not grow the topic again (issue 12, item 10).
    cluster.state.lock().unwrap().faults.lose_admin_answers = 2;
    assert_eq!(admin.increase_partitions("orders", 7).await.unwrap().partitions.len(), 7);
    assert_eq!(admin.describe_topic("orders").await.unwrap().partitions.len(), 7);
    let names: Vec<String> = admin.list_topics().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["orders"]);
    let cluster_view = admin.describe_cluster().await.unwrap();
    assert_eq!(cluster_view.nodes.len(), 2);
    admin.delete_topic("orders").await.unwrap();
    let err = admin.describe_topic("orders").await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_skips_a_dead_bootstrap_node() {
    let cluster = Cluster::start(1).await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut config = config(&cluster);
    config.bootstrap.insert(0, dead_addr);
    let admin = Admin::new(config).unwrap();
    assert_eq!(admin.describe_cluster().await.unwrap().answered_by, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_follows_leaders_and_consume_reads_every_offset_once() {
    let cluster = Cluster::start(2).await;
    cluster.create("t", 3);
    // Partition 0 moved to node 2 but the metadata still says node 1: NOT_LEADER with a hint.
    cluster.with_partition("t", 0, |p| p.leader = 2);
    // Partition 2 is on node 2 and says so.
    cluster.with_partition("t", 2, |p| {
        p.leader = 2;
        p.advertised = 2;
    });
    cluster.state.lock().unwrap().faults.unavailable = 3;
    cluster.state.lock().unwrap().faults.not_leader_unhinted = 2;

    let producer =
        Producer::new(config(&cluster), ProducerConfig { batch_bytes_max: 4096, ..ProducerConfig::default() }).unwrap();
    let n = 3000;
    let mut futures = Vec::new();
    for i in 0..n {
        let record = ProducerRecord::new(value(i)).with_key(format!("key-{i}"));
        futures.push(producer.send("t", record).await.unwrap());
    }
    let mut acked: BTreeMap<u32, Vec<(u64, usize)>> = BTreeMap::new();
    for (i, future) in futures.into_iter().enumerate() {
        let RecordMetadata { topic, partition, offset } = future.await.unwrap();
        assert_eq!(topic, "t");
        assert_eq!(partition, partition_for_key(format!("key-{i}").as_bytes(), 3), "record {i}");
        acked.entry(partition).or_default().push((offset, i));
    }
    for (partition, mut records) in acked.clone() {
        records.sort();
        let log = cluster.records("t", partition);
        let offsets: Vec<u64> = records.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..records.len() as u64).collect::<Vec<_>>(), "partition {partition}: dense offsets");
        for (offset, i) in records {
            assert_eq!(log[offset as usize], (offset, value(i)), "partition {partition} offset {offset}");
        }
    }
    producer.close().await;
    {
        let state = cluster.state.lock().unwrap();
        assert_eq!((state.faults.unavailable, state.faults.not_leader_unhinted), (0, 0), "every fault was hit");
    }

    let mut consumer = Consumer::new(config(&cluster), ConsumerConfig::default()).unwrap();
    consumer.assign("t", &[]).await.unwrap();
    assert_eq!(consumer.assignment().len(), 3);
    let records = consume(&mut consumer, n).await;
    assert_eq!(records.len(), n, "nothing repeated");
    let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in &records {
        seen.entry(r.partition).or_default().push(r.offset);
    }
    for (partition, offsets) in seen {
        let count = acked[&partition].len() as u64;
        assert_eq!(offsets, (0..count).collect::<Vec<_>>(), "partition {partition}: each offset once, in order");
        assert_eq!(consumer.position("t", partition), Some(count));
    }
    // Nothing comes twice later either: a record produced now is the very next one read.
    let producer = Producer::new(config(&cluster), ProducerConfig::default()).unwrap();
    let last = producer.send("t", ProducerRecord::new("last").with_partition(0)).await.unwrap().await.unwrap();
    producer.close().await;
    let next = consume(&mut consumer, 1).await;
    assert_eq!(next.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(), [(0, last.offset)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_are_redialled_and_retried() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 2);
    cluster.state.lock().unwrap().faults.break_streams = 2;
    let producer =
        Producer::new(config(&cluster), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() })
            .unwrap();
    let mut futures = Vec::new();
    for i in 0..200 {
        futures
            .push((i, producer.send("t", ProducerRecord::new(value(i)).with_partition(i as u32 % 2)).await.unwrap()));
    }
    for (i, future) in futures {
        let m = future.await.unwrap();
        // At least once: a retried batch may be stored twice, but what was acked is there.
        let log = cluster.records("t", m.partition);
        assert_eq!(log[m.offset as usize], (m.offset, value(i)));
    }
    producer.close().await;
}

/// Issue 12 item 13: the leader the producer writes to is cut off from the others. It refuses
/// writes without naming a leader and its metadata names none, while the other nodes know the
/// new leader. The producer must ask them rather than keep asking the node it was talking to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_moves_off_a_leader_that_knows_no_successor() {
    let cluster = Cluster::start(3).await;
    cluster.create("t", 1);
    let producer =
        Producer::new(config(&cluster), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() })
            .unwrap();
    let first = producer.send("t", ProducerRecord::new(value(0))).await.unwrap().await.unwrap();
    assert_eq!(first.offset, 0, "written at node 1, which the metadata of node 1 named");
    cluster.with_partition("t", 0, |p| {
        p.leader = 2;
        p.advertised = 2;
        p.blind = Some(1);
    });
    let next = producer.send("t", ProducerRecord::new(value(1))).await.unwrap();
    let stored = tokio::time::timeout(Duration::from_secs(5), next).await;
    let stored = stored.expect("the record was acknowledged within 5 s").unwrap();
    assert_eq!(stored.offset, 1);
    assert_eq!(cluster.records("t", 0), [(0, value(0)), (1, value(1))]);
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_fail_after_the_delivery_timeout() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    cluster.state.lock().unwrap().faults.always_unavailable = true;
    let producer_config = ProducerConfig { delivery_timeout: Duration::from_millis(300), ..ProducerConfig::default() };
    let producer = Producer::new(config(&cluster), producer_config).unwrap();
    let future = producer.send("t", ProducerRecord::new("x")).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), future).await.unwrap().unwrap_err();
    assert_eq!(err, ClientError::Unavailable("always down".into()));
    assert!(cluster.state.lock().unwrap().produce_requests > 1, "retried before giving up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_and_topics_fail_at_send() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 2);
    let producer =
        Producer::new(config(&cluster), ProducerConfig { batch_bytes_max: 1024, ..ProducerConfig::default() }).unwrap();
    let err = producer.send("t", ProducerRecord::new(vec![0u8; 2000])).await.unwrap_err();
    assert!(matches!(err, ClientError::RecordTooLarge { limit: 1024, .. }), "{err}");
    let err = producer.send("nope", ProducerRecord::new("x")).await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err}");
    let err = producer.send("t", ProducerRecord::new("x").with_partition(2)).await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err}");
    // Unkeyed records stick to one partition while its batch is open.
    let a = producer.send("t", ProducerRecord::new("a")).await.unwrap();
    let b = producer.send("t", ProducerRecord::new("b")).await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.partition, b.partition);
    assert_eq!(b.offset, a.offset + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_without_waiting_for_linger() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    let producer_config = ProducerConfig { linger: Duration::from_secs(30), ..ProducerConfig::default() };
    let producer = Producer::new(config(&cluster), producer_config).unwrap();
    let mut futures = Vec::new();
    for i in 0..50 {
        futures.push(producer.send("t", ProducerRecord::new(value(i))).await.unwrap());
    }
    tokio::time::timeout(Duration::from_secs(5), producer.close()).await.unwrap();
    for (i, future) in futures.into_iter().enumerate() {
        assert_eq!(future.await.unwrap().offset, i as u64);
    }
    assert_eq!(producer.send("t", ProducerRecord::new("late")).await.unwrap_err(), ClientError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_producer_resolves_its_records() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    cluster.state.lock().unwrap().faults.always_unavailable = true;
    let producer = Producer::new(config(&cluster), ProducerConfig::default()).unwrap();
    let future = producer.send("t", ProducerRecord::new("x")).await.unwrap();
    drop(producer);
    let outcome = tokio::time::timeout(Duration::from_secs(5), future).await.unwrap();
    assert_eq!(outcome.unwrap_err(), ClientError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_for_buffer_room() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    let producer_config =
        ProducerConfig { buffer_records_max: 4, linger: Duration::from_millis(200), ..ProducerConfig::default() };
    let producer = Producer::new(config(&cluster), producer_config).unwrap();
    let mut futures = Vec::new();
    for i in 0..4 {
        futures.push(producer.send("t", ProducerRecord::new(value(i))).await.unwrap());
    }
    // The fifth waits until the first four are acknowledged, after their linger: by the time it
    // has room, their batch has reached the broker.
    assert_eq!(cluster.state.lock().unwrap().produce_requests, 0, "nothing is sent before the linger");
    let fifth = producer.send("t", ProducerRecord::new(value(4))).await.unwrap();
    assert!(cluster.state.lock().unwrap().produce_requests >= 1, "send returned before the buffer had room");
    futures.push(fifth);
    for (i, f) in futures.into_iter().enumerate() {
        assert_eq!(f.await.unwrap().offset, i as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_seeks() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    let producer =
        Producer::new(config(&cluster), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() })
            .unwrap();
    let produce = |from: usize, to: usize| {
        let producer = &producer;
        async move {
            let mut futures = Vec::new();
            for i in from..to {
                futures.push(producer.send("t", ProducerRecord::new(value(i))).await.unwrap());
            }
            for f in futures {
                f.await.unwrap();
            }
        }
    };
    produce(0, 10).await;
    let consumer_config = ConsumerConfig { offset_default: Offset::End, ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(config(&cluster), consumer_config).unwrap();
    consumer.assign("t", &[0]).await.unwrap();
    assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty(), "End skips what exists");
    assert_eq!(consumer.position("t", 0), Some(10));
    produce(10, 15).await;
    let got: Vec<u64> = consume(&mut consumer, 5).await.iter().map(|r| r.offset).collect();
    assert_eq!(got, [10, 11, 12, 13, 14]);

    consumer.seek("t", 0, Offset::At(3)).unwrap();
    assert_eq!(consumer.position("t", 0), Some(3));
    let got = consume(&mut consumer, 12).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), (3..15).collect::<Vec<_>>());
    assert_eq!(got[0].value, Some(value(3)));

    consumer.seek("t", 0, Offset::Beginning).unwrap();
    let got = consume(&mut consumer, 15).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), (0..15).collect::<Vec<_>>());

    let fetched = consumer.fetch("t", 0, 13).await.unwrap();
    assert_eq!(fetched.records.iter().map(|r| r.offset).collect::<Vec<_>>(), [13, 14]);
    assert_eq!((fetched.high_watermark, fetched.log_start_offset), (15, 0));
    assert_eq!(consumer.watermarks("t", 0).await.unwrap(), (0, 15));
    assert!(matches!(consumer.seek("t", 9, Offset::Beginning), Err(ClientError::InvalidArgument(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reports_offsets_below_the_log_start() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    cluster.with_partition("t", 0, |p| {
        p.log_start = 100;
        p.next_offset = 100;
    });
    let mut consumer = Consumer::new(config(&cluster), ConsumerConfig::default()).unwrap();
    consumer.assign("t", &[0]).await.unwrap();
    assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty());
    assert_eq!(consumer.position("t", 0), Some(100), "Beginning is the log start, not 0");
    consumer.seek("t", 0, Offset::At(5)).unwrap();
    let err = consumer.poll(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, ClientError::OutOfRange(_)), "{err}");
}

/// Throughput with 1 KiB records and 1,000 in flight; run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let cluster = Cluster::start(1).await;
    cluster.create("t", env("PARTITIONS", 4) as u32);
    let producer_config = ProducerConfig {
        linger: Duration::from_millis(env("LINGER_MS", 5)),
        batch_bytes_max: env("BATCH_BYTES", 1 << 20) as usize,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(config(&cluster), producer_config).unwrap();
    let payload = Bytes::from(vec![7u8; 1024]);
    let n = env("RECORDS", 200_000) as usize;
    let window = env("IN_FLIGHT", 1000) as usize;
    let started = tokio::time::Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..n {
        if in_flight.len() == window {
            let f: keel_client::DeliveryFuture = in_flight.pop_front().unwrap();
            f.await.unwrap();
        }
        let record = ProducerRecord::new(payload.clone()).with_key(format!("{i}"));
        in_flight.push_back(producer.send("t", record).await.unwrap());
    }
    for f in in_flight {
        f.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let requests = cluster.state.lock().unwrap().produce_requests;
    println!("{n} records in {secs:.2} s: {:.0} records/s, {requests} requests", n as f64 / secs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reports_a_seek_past_the_end() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    let mut consumer = Consumer::new(config(&cluster), ConsumerConfig::default()).unwrap();
    consumer.assign("t", &[0]).await.unwrap();
    consumer.seek("t", 0, Offset::At(1000)).unwrap();
    // Past the end is retried for a request timeout (a new leader's watermark may lag), then reported.
    let err = consumer.poll(Duration::from_secs(10)).await.unwrap_err();
    assert!(matches!(err, ClientError::OutOfRange(_)), "{err}");
    let refused = cluster.state.lock().unwrap().refused_subscribes;
    assert!(refused >= 2, "reported after {refused} attempt(s), without retrying");
}

/// Issue 11 item 4: a consumer that verifies sequences reports, per idempotent producer, what
/// it read: nothing wrong for an idempotent producer's records, and a duplicate once a batch is
/// in the log twice (the fake broker does not deduplicate; a copy of the first batch is
/// appended as a broker without dedup would after a retry). A seek back re-reads offsets
/// without counting them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifying_consumer_reports_duplicates_by_sequence() {
    let cluster = Cluster::start(1).await;
    cluster.create("t", 1);
    let producer =
        Producer::new(config(&cluster), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() })
            .unwrap();
    for i in 0..6 {
        producer.send("t", ProducerRecord::new(value(i))).await.unwrap().await.unwrap();
    }
    let mut consumer = Consumer::new(config(&cluster), ConsumerConfig::default()).unwrap();
    consumer.verify_sequences();
    consumer.assign("t", &[0]).await.unwrap();
    consume(&mut consumer, 6).await;
    let report = consumer.sequence_report();
    let partition = &report[&("t".to_owned(), 0)];
    assert!(partition.is_clean(), "{partition:?}");
    assert_eq!(partition.producers.len(), 1, "one idempotent producer: {partition:?}");

    // Seeking back re-reads offsets 0..6: the same offsets are not duplicates.
    consumer.seek("t", 0, Offset::Beginning).unwrap();
    consume(&mut consumer, 6).await;
    assert!(consumer.sequence_report()[&("t".to_owned(), 0)].is_clean());

    {
        let mut state = cluster.state.lock().unwrap();
        let p = &mut state.topics.get_mut("t").unwrap()[0];
        let mut copy = p.batches[0].to_vec();
        let header = keel_record::stamp(&mut copy, p.next_offset, 1, 1).unwrap();
        p.next_offset += u64::from(header.record_count);
        p.batches.push(Bytes::from(copy));
    }
    cluster.appended.notify_waiters();
    consume(&mut consumer, 1).await;
    let report = consumer.sequence_report();
    let (_, audit) = report[&("t".to_owned(), 0)].producers.iter().next().unwrap();
    assert_eq!(audit.duplicates, 1, "{audit:?}");
    producer.close().await;
}
