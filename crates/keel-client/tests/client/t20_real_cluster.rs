//! The client against a running Keel cluster named by `KEEL_BOOTSTRAP` (e.g. from `keel dev`):
//! `KEEL_BOOTSTRAP=127.0.0.1:9091,... cargo test -p keel-client --test client t20_real_cluster -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use keel_client::{
    Admin, ClientConfig, ClientError, Consumer, ConsumerConfig, DeliveryFuture, Producer, ProducerConfig,
    ProducerRecord, TopicConfig,
};

fn config() -> ClientConfig {
    let bootstrap = std::env::var("KEEL_BOOTSTRAP").expect("set KEEL_BOOTSTRAP to a running cluster");
    ClientConfig::from_bootstrap(&bootstrap).unwrap().with_seed(1)
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a running cluster (KEEL_BOOTSTRAP)"]
async fn produce_then_consume_every_offset_once() {
    let topic = format!("client-e2e-{}", env("TOPIC_SUFFIX", 0));
    let partitions = env("PARTITIONS", 3) as u32;
    let admin = Admin::new(config()).unwrap();
    match admin.create_topic(&topic, partitions, 0, TopicConfig::default()).await {
        Ok(_) | Err(ClientError::AlreadyExists(_)) => {}
        Err(e) => panic!("create topic: {e}"),
    }
    let before: BTreeMap<u32, u64> = admin
        .describe_topic(&topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| (p.partition, p.high_watermark))
        .collect();

    let n = env("RECORDS", 50_000) as usize;

    // The consumer tails the partitions while the producer writes (and while nodes fail).
    let mut consumer = Consumer::new(config(), ConsumerConfig::default()).unwrap();
    consumer.assign(&topic, &[]).await.unwrap();
    for (&p, &from) in &before {
        consumer.seek(&topic, p, keel_client::Offset::At(from)).unwrap();
    }
    let consuming = tokio::spawn(async move {
        let mut seen: BTreeMap<u32, Vec<(u64, usize)>> = BTreeMap::new();
        let mut count = 0;
        let mut quiet = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        // Until every record arrived and then nothing more for 2 s (duplicates from retries).
        while count < n || quiet < 4 {
            assert!(tokio::time::Instant::now() < deadline, "consumed only {count} of {n}");
            let records = consumer.poll(Duration::from_millis(500)).await.unwrap();
            quiet = if records.is_empty() { quiet + 1 } else { 0 };
            for r in records {
                let header = r.headers.iter().find(|(k, _)| k == "i").and_then(|(_, v)| v.clone()).unwrap();
                let i: usize = std::str::from_utf8(&header).unwrap().parse().unwrap();
                seen.entry(r.partition).or_default().push((r.offset, i));
                count += 1;
            }
        }
        println!("consumed {count} records");
        seen
    });

    let producer = Producer::new(config(), ProducerConfig::default()).unwrap();
    let window = env("IN_FLIGHT", 1000) as usize;
    let payload = Bytes::from(vec![b'x'; env("RECORD_BYTES", 1024) as usize]);
    let started = tokio::time::Instant::now();
    let mut in_flight: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
    let mut acked: BTreeMap<u32, Vec<(u64, usize)>> = BTreeMap::new();
    let mut settle =
        |(i, m): (usize, keel_client::RecordMetadata)| acked.entry(m.partition).or_default().push((m.offset, i));
    for i in 0..n {
        if in_flight.len() == window {
            let (j, f) = in_flight.pop_front().unwrap();
            settle((j, f.await.unwrap()));
        }
        let record = ProducerRecord::new(payload.clone())
            .with_key(format!("k{i}"))
            .with_header("i", Some(Bytes::from(i.to_string())));
        in_flight.push_back((i, producer.send(&topic, record).await.unwrap()));
    }
    for (j, f) in in_flight {
        settle((j, f.await.unwrap()));
    }
    let secs = started.elapsed().as_secs_f64();
    println!("produced {n} records in {secs:.2} s: {:.0} records/s", n as f64 / secs);
    producer.close().await;
    let seen = consuming.await.unwrap();
    let faults = env("FAULTS", 0) == 1;
    for (p, mut records) in acked {
        records.sort();
        let from = before[&p];
        let offsets: Vec<u64> = seen[&p].iter().map(|r| r.0).collect();
        assert_eq!(offsets, (from..from + offsets.len() as u64).collect::<Vec<_>>(), "partition {p}: dense, once each");
        if faults {
            // Retried batches may be stored twice, but every acknowledged record is where its
            // acknowledgement said.
            for (offset, i) in &records {
                assert_eq!(seen[&p][(offset - from) as usize], (*offset, *i), "partition {p} offset {offset}");
            }
        } else {
            // No failures, so nothing was retried: exactly the acked records, in order.
            assert_eq!(seen[&p], records, "partition {p}");
        }
    }
}
