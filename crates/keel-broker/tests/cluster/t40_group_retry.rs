//! Retry and dead letter through `GroupConsumer::process` against three in-process nodes: three
//! members share a topic; records fail by a fixed rule (some once, some always, some with a
//! non-retryable error); the coordinator's node is stopped part way. In the end every record
//! was processed or dead-lettered, each dead letter is in `<group>.dlq` exactly once with its
//! origin headers, a poison record was attempted exactly max-attempts times, and a record that
//! succeeded on a redelivery was never dead-lettered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_broker::Clock;
use keel_client::{
    Admin, ClientConfig, Consumer, ConsumerConfig, GroupAdmin, GroupConfig, GroupConsumer, HandlerError, Producer,
    ProducerConfig, ProducerRecord, RetryPolicy, TopicConfig,
};

const RECORDS: usize = 90;
const MAX_ATTEMPTS: u32 = 3;

/// A clock that moves with time (backoffs must pass), from a fixed start.
struct RunningClock(tokio::time::Instant);

impl Clock for RunningClock {
    fn now_ms(&self) -> i64 {
        1_700_000_000_000 + self.0.elapsed().as_millis() as i64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Fine,
    /// Fails its first attempt (retryable), then succeeds.
    Flaky,
    /// Fails every attempt (retryable): dead-lettered after MAX_ATTEMPTS.
    Poison,
    /// Fails with a non-retryable error: dead-lettered at once.
    Fatal,
}

fn fate(i: usize) -> Fate {
    match i {
        _ if i.is_multiple_of(10) => Fate::Fatal,
        _ if i.is_multiple_of(7) => Fate::Poison,
        _ if i.is_multiple_of(3) => Fate::Flaky,
        _ => Fate::Fine,
    }
}

fn index(value: &[u8]) -> usize {
    std::str::from_utf8(value).unwrap().trim_start_matches('v').parse().unwrap()
}

/// What the handlers saw: attempts per record index, and which succeeded (on which attempt).
#[derive(Default)]
struct Seen {
    attempts: BTreeMap<usize, BTreeSet<u32>>,
    succeeded: BTreeMap<usize, u32>,
}

async fn dead_letters(client: &ClientConfig, topic: &str) -> Vec<(usize, BTreeMap<String, String>)> {
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    let (_, end) = match consumer.watermarks(topic, 0).await {
        Ok(w) => w,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        let fetched = consumer.fetch(topic, 0, offset).await.unwrap();
        for r in fetched.records.into_iter().filter(|r| r.offset < end) {
            let headers = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned()))
                .collect();
            out.push((index(r.value.as_deref().unwrap()), headers));
            offset = r.offset + 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_records_are_retried_then_dead_lettered_once_across_a_coordinator_failover() {
    let cluster =
        common::start_clocked(3, 3, |_| {}, Default::default(), Arc::new(RunningClock(tokio::time::Instant::now())))
            .await;
    let client = ClientConfig::new(cluster.addrs.clone()).with_seed(11);
    Admin::new(client.clone()).unwrap().create_topic("jobs", 3, 3, TopicConfig::default()).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for i in 0..RECORDS {
        producer
            .send("jobs", ProducerRecord::new(format!("v{i}")).with_key(format!("k{i}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    producer.close().await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut members = Vec::new();
    for m in 0..3u64 {
        let mut config = GroupConfig::new("workers");
        config.session_timeout = Duration::from_secs(3);
        config.retry = RetryPolicy {
            max_attempts: MAX_ATTEMPTS,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
        };
        members.push(GroupConsumer::subscribe(client.clone().with_seed(20 + m), config, &["jobs"]).await.unwrap());
    }
    let expected_dead: BTreeSet<usize> =
        (0..RECORDS).filter(|i| matches!(fate(*i), Fate::Poison | Fate::Fatal)).collect();
    let expected_done: BTreeSet<usize> =
        (0..RECORDS).filter(|i| matches!(fate(*i), Fate::Fine | Fate::Flaky)).collect();
    let mut stopped = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        for m in members.iter_mut() {
            let seen = Arc::clone(&seen);
            let round = m
                .process(Duration::from_millis(100), move |r| {
                    let i = index(r.value.as_deref().unwrap());
                    let mut s = seen.lock().unwrap();
                    s.attempts.entry(i).or_default().insert(r.attempt);
                    let outcome = match fate(i) {
                        Fate::Fine => Ok(()),
                        Fate::Flaky if r.attempt > 1 => Ok(()),
                        Fate::Flaky | Fate::Poison => Err(HandlerError::retryable(format!("busy ({i})"))),
                        Fate::Fatal => Err(HandlerError::fatal(format!("malformed ({i})"))),
                    };
                    if outcome.is_ok() {
                        s.succeeded.insert(i, r.attempt);
                    }
                    std::future::ready(outcome)
                })
                .await;
            // A refused commit or nack during the failover: the records come again.
            if let Err(e) = round {
                eprintln!("round failed (retried): {e}");
            }
        }
        let done: BTreeSet<usize> = seen.lock().unwrap().succeeded.keys().copied().collect();
        if !stopped && done.len() >= expected_done.len() / 3 {
            // Stop the node that coordinates the group: attempts and dead letters in flight
            // must survive the move.
            if let Ok(d) = GroupAdmin::new(client.clone()).unwrap().describe_group("workers").await
                && let Some(b) = cluster.brokers.iter().find(|b| b.node_id() == d.coordinator_id)
            {
                b.clone().shutdown().await;
                stopped = true;
            }
        }
        if done.is_superset(&expected_done) && dead_letters(&client, "workers.dlq").await.len() >= expected_dead.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not done in time: processed {}/{}",
            done.len(),
            expected_done.len()
        );
    }

    assert!(stopped, "the coordinator's node was stopped part way");
    let dead = dead_letters(&client, "workers.dlq").await;
    let indexes: Vec<usize> = dead.iter().map(|(i, _)| *i).collect();
    let unique: BTreeSet<usize> = indexes.iter().copied().collect();
    assert_eq!(indexes.len(), unique.len(), "a dead letter was published twice: {indexes:?}");
    assert_eq!(unique, expected_dead);
    let s = seen.lock().unwrap();
    for (i, headers) in &dead {
        assert_eq!(headers["keel-origin-topic"], "jobs");
        assert_eq!(headers["keel-group"], "workers");
        let attempts: u32 = headers["keel-attempts"].parse().unwrap();
        match fate(*i) {
            Fate::Poison => {
                assert_eq!(attempts, MAX_ATTEMPTS, "record {i}");
                let seen: BTreeSet<u32> = (1..=MAX_ATTEMPTS).collect();
                assert_eq!(s.attempts[i], seen, "record {i} ran every attempt");
                assert!(headers["keel-last-error"].contains("busy"));
            }
            _ => {
                assert_eq!(attempts, 1, "record {i}: not retryable");
                assert!(headers["keel-last-error"].contains("malformed"));
            }
        }
    }
    for i in &expected_done {
        if fate(*i) == Fate::Flaky {
            assert!(s.succeeded[i] >= 2, "record {i} succeeded on a redelivery");
        }
    }
}
