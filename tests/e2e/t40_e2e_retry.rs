//! End to end, with real processes: two group members process a topic with
//! `GroupConsumer::process`, failing every tenth record with a non-retryable error, every third
//! with a retryable one on its first two attempts (the third, its last, succeeds), and every
//! twenty-first on every attempt. The node that coordinates the group is killed with SIGKILL
//! part way and restarted. In the end every record was processed or dead-lettered, never both;
//! `<group>.dlq` holds each dead letter exactly once with its origin and attempts (`keel dlq
//! inspect --output json`), a record that succeeded on its last attempt is not in it, and
//! `keel dlq replay` publishes a dead letter back to its origin once, however often it is run.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{
    GroupAdmin, GroupConfig, GroupConsumer, HandlerError, Producer, ProducerConfig, ProducerRecord, RetryPolicy,
    TopicConfig,
};
use serde_json::Value;

const TOPIC: &str = "tasks";
const GROUP: &str = "workers";
const RECORDS: u64 = 300;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Fine,
    /// Fails attempts 1 and 2 (retryable); attempt 3, the last, succeeds.
    LastChance,
    /// Fails every attempt (retryable).
    Poison,
    /// Fails with a non-retryable error.
    Fatal,
}

fn fate(n: u64) -> Fate {
    match n {
        _ if n.is_multiple_of(10) => Fate::Fatal,
        _ if n.is_multiple_of(21) => Fate::Poison,
        _ if n.is_multiple_of(3) => Fate::LastChance,
        _ => Fate::Fine,
    }
}

fn number(value: &[u8]) -> u64 {
    std::str::from_utf8(value).unwrap().trim_start_matches('v').parse().unwrap()
}

fn keel_json(cluster: &common::Cluster, args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .args(["--output", "json", "--bootstrap"])
        .arg(cluster.bootstrap())
        .env_remove("KEEL_BOOTSTRAP")
        .output()
        .unwrap();
    assert!(out.status.success(), "keel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The dead letters as `keel dlq inspect` prints them: number → headers.
fn dead_letters(cluster: &common::Cluster) -> Vec<(u64, BTreeMap<String, String>)> {
    keel_json(cluster, &["dlq", "inspect", GROUP, "-n", "1000"])
        .into_iter()
        .map(|l| {
            let headers = l["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            (number(l["value"].as_str().unwrap().as_bytes()), headers)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_records_are_retried_and_dead_lettered_once_across_a_killed_coordinator() {
    let mut cluster = common::Cluster::start(3, 80).await;
    let admin = cluster.admin();
    admin.create_topic(TOPIC, 3, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, TOPIC).await;
    let producer = Producer::new(cluster.client(1), ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for n in 0..RECORDS {
        let record = ProducerRecord::new(format!("v{n}")).with_key(format!("k{n}"));
        deliveries.push(producer.send(TOPIC, record).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await;

    // Handler outcomes: successes (number → attempt) and every attempt run.
    type Seen = (BTreeMap<u64, u32>, BTreeMap<u64, BTreeSet<u32>>);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut members = Vec::new();
    for m in 0..2u64 {
        let mut config = GroupConfig::new(GROUP);
        config.session_timeout = Duration::from_secs(3);
        config.retry = RetryPolicy {
            max_attempts: MAX_ATTEMPTS,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
        };
        members.push(GroupConsumer::subscribe(cluster.client(10 + m), config, &[TOPIC]).await.unwrap());
    }
    let done_wanted: BTreeSet<u64> =
        (0..RECORDS).filter(|n| matches!(fate(*n), Fate::Fine | Fate::LastChance)).collect();
    let dead_wanted: BTreeSet<u64> = (0..RECORDS).filter(|n| matches!(fate(*n), Fate::Poison | Fate::Fatal)).collect();
    let groups = GroupAdmin::new(cluster.client(3)).unwrap();
    let mut killed = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for member in members.iter_mut() {
            let seen = Arc::clone(&seen);
            let round = member
                .process(Duration::from_millis(100), move |r| {
                    let n = number(r.value.as_deref().unwrap());
                    let mut s = seen.lock().unwrap();
                    s.1.entry(n).or_default().insert(r.attempt);
                    let outcome = match fate(n) {
                        Fate::Fine => Ok(()),
                        Fate::LastChance if r.attempt >= MAX_ATTEMPTS => Ok(()),
                        Fate::LastChance | Fate::Poison => Err(HandlerError::retryable(format!("v{n} busy"))),
                        Fate::Fatal => Err(HandlerError::fatal(format!("v{n} malformed"))),
                    };
                    if outcome.is_ok() {
                        s.0.insert(n, r.attempt);
                    }
                    std::future::ready(outcome)
                })
                .await;
            if let Err(e) = round {
                // The coordinator is down or moving: the records come again.
                eprintln!("process: {e}");
            }
        }
        let done: BTreeSet<u64> = seen.lock().unwrap().0.keys().copied().collect();
        if killed.is_none()
            && done.len() >= done_wanted.len() / 3
            && let Ok(d) = groups.describe_group(GROUP).await
        {
            cluster.kill(d.coordinator_id);
            killed = Some((d.coordinator_id, Instant::now()));
        }
        if let Some((id, at)) = killed
            && at.elapsed() > Duration::from_secs(5)
            && cluster.nodes[id as usize - 1].child.is_none()
        {
            cluster.restart(id);
        }
        if done.is_superset(&done_wanted) && killed.is_some() {
            let letters: BTreeSet<u64> = dead_letters(&cluster).iter().map(|(n, _)| *n).collect();
            if letters.is_superset(&dead_wanted) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "not done in time: {} of {} processed", done.len(), done_wanted.len());
    }

    let letters = dead_letters(&cluster);
    let numbers: Vec<u64> = letters.iter().map(|(n, _)| *n).collect();
    let unique: BTreeSet<u64> = numbers.iter().copied().collect();
    assert_eq!(numbers.len(), unique.len(), "a dead letter was published twice: {numbers:?}");
    assert_eq!(unique, dead_wanted, "exactly the failing records are dead-lettered");
    let s = seen.lock().unwrap().clone();
    for (n, headers) in &letters {
        assert_eq!(headers["keel-origin-topic"], TOPIC);
        let wanted = if fate(*n) == Fate::Poison { MAX_ATTEMPTS } else { 1 };
        assert_eq!(headers["keel-attempts"], wanted.to_string(), "v{n}");
        assert!(!s.0.contains_key(n), "v{n} was processed and dead-lettered");
    }
    for n in (0..RECORDS).filter(|n| fate(*n) == Fate::LastChance) {
        assert_eq!(s.0[&n], MAX_ATTEMPTS, "v{n} succeeded on its last attempt");
    }

    // Replay the first dead letter twice: it is back in its origin partition once.
    let first = keel_json(&cluster, &["dlq", "inspect", GROUP, "-n", "1"]).remove(0);
    let offset = first["offset"].as_u64().unwrap().to_string();
    let once = keel_json(&cluster, &["dlq", "replay", GROUP, "--offset", &offset]).remove(0);
    let twice = keel_json(&cluster, &["dlq", "replay", GROUP, "--offset", &offset]).remove(0);
    assert_eq!(once["replayed"].as_array().unwrap().len(), 1, "{once}");
    assert_eq!(twice["already_replayed"].as_array().unwrap().len(), 1, "{twice}");
    let value = first["value"].as_str().unwrap().to_owned();
    let origin: u32 = first["headers"]["keel-origin-partition"].as_str().unwrap().parse().unwrap();
    let copies = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let topic = admin.describe_topic(TOPIC).await.unwrap();
            let ends: BTreeMap<u32, u64> = topic.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
            let records = common::read_all(cluster.client(4), TOPIC, &ends).await;
            let copies = records.iter().filter(|((p, _), v)| *p == origin && **v == value).count();
            if copies == 2 {
                return copies;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await
    .expect("the replayed record did not arrive");
    assert_eq!(copies, 2, "the original and one replay");
    for m in members {
        let _ = m.close().await;
    }
}
