//! End to end, with real processes: three `keel consume --group` processes share a 6-partition
//! topic while records stream in; one consumer is killed with SIGKILL, then the node that
//! coordinates the group is killed and restarted. In the end every acknowledged record was
//! printed by some consumer, the group's committed offsets are the log ends, `keel group
//! describe --output json` reports no lag, and the survivors leave cleanly on SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{GroupAdmin, Producer, ProducerConfig, ProducerRecord, TopicConfig};

const TOPIC: &str = "jobs";
const GROUP: &str = "printers";
const PARTITIONS: u32 = 6;

/// A `keel consume --group` process and every line it printed.
struct Printer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Printer {
    fn spawn(cluster: &common::Cluster, n: usize) -> Printer {
        let stderr = std::fs::File::create(cluster.dir.path().join(format!("printer-{n}.log"))).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["consume", TOPIC, "--group", GROUP, "--format", "value", "--client-id"])
            .arg(format!("printer-{n}"))
            // Short, so the killed printer's partitions move on quickly (the bound is 1 s).
            .args(["--session-timeout-ms", "3000", "--bootstrap"])
            .arg(cluster.bootstrap())
            .env("KEEL_LOG", "info")
            .env_remove("KEEL_BOOTSTRAP")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        // Blocking reads on the runtime's blocking pool; they end when the process does.
        let reader = tokio::task::spawn_blocking(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        Printer { child, lines, reader }
    }

    fn printed(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits (bounded) for the process to exit and returns whether it succeeded.
    async fn exit_status(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "printer {} did not exit within {within:?}", self.child.id());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Printer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces `from..from + count` as values `v{n}` keyed by `n` (spread over the partitions),
/// and returns the values acknowledged.
async fn produce(cluster: &common::Cluster, from: u64, count: u64) -> BTreeSet<String> {
    let producer = Producer::new(cluster.client(from + 1), ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for n in from..from + count {
        let value = format!("v{n}");
        let record = ProducerRecord::new(value.clone()).with_key(format!("k{n}"));
        deliveries.push((value, producer.send(TOPIC, record).await.unwrap()));
    }
    let mut acked = BTreeSet::new();
    for (value, delivery) in deliveries {
        // The producer retries through a failover; a record it gives up on is not counted.
        if delivery.await.is_ok() {
            acked.insert(value);
        }
    }
    producer.close().await;
    acked
}

/// Every line any printer printed, with how often.
fn printed(printers: &[&Printer]) -> BTreeMap<String, usize> {
    let mut all = BTreeMap::new();
    for p in printers {
        for line in p.lines.lock().unwrap().iter() {
            *all.entry(line.clone()).or_insert(0) += 1;
        }
    }
    all
}

/// Whether `done` turns true within `within` (asked every 200 ms).
async fn eventually(within: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consumers_survive_a_killed_member_and_a_killed_coordinator() {
    let mut cluster = common::Cluster::start(3, 70).await;
    let admin = cluster.admin();
    admin.create_topic(TOPIC, PARTITIONS, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, TOPIC).await;
    let groups = GroupAdmin::new(cluster.client(9)).unwrap();

    let mut printers: Vec<Printer> = (0..3).map(|n| Printer::spawn(&cluster, n)).collect();
    let shared = eventually(Duration::from_secs(30), async || {
        groups.describe_group(GROUP).await.is_ok_and(|d| {
            d.members.len() == 3 && d.members.iter().all(|m| !m.assignment.is_empty()) && d.state == "stable"
        })
    })
    .await;
    assert!(shared, "the three printers share the partitions: {:?}", groups.describe_group(GROUP).await);
    let mut acked = produce(&cluster, 0, 1_500).await;
    let all_print = eventually(Duration::from_secs(30), async || printers.iter().all(|p| p.printed() > 0)).await;
    assert!(
        all_print,
        "every printer printed something: {:?}",
        printers.iter().map(Printer::printed).collect::<Vec<_>>()
    );

    // A member dies without leaving: its partitions move on after its session timeout.
    let mut killed = printers.remove(0);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    acked.extend(produce(&cluster, 1_500, 1_000).await);

    // The coordinator dies too; a new one takes over from the replicated group state.
    let coordinator = groups.describe_group(GROUP).await.unwrap().coordinator_id;
    cluster.kill(coordinator);
    acked.extend(produce(&cluster, 2_500, 1_000).await);
    let moved = eventually(Duration::from_secs(30), async || {
        groups.describe_group(GROUP).await.is_ok_and(|d| d.coordinator_id != coordinator)
    })
    .await;
    assert!(moved, "another node coordinates the group while node {coordinator} is down");
    cluster.restart(coordinator);
    cluster.wait_healthy(Duration::from_secs(60)).await;
    acked.extend(produce(&cluster, 3_500, 500).await);
    assert!(acked.len() >= 3_500, "most records were acknowledged through the failovers: {}", acked.len());

    // Every acknowledged record gets printed, and the survivors commit up to the log ends.
    let mut lagging = String::new();
    let caught_up = eventually(Duration::from_secs(40), async || {
        // What the killed printer printed counts too: it may have committed it before it died.
        let everyone: Vec<&Printer> = printers.iter().chain([&killed]).collect();
        let seen = printed(&everyone);
        let missing = acked.iter().filter(|v| !seen.contains_key(*v)).count();
        let Ok(topic) = admin.describe_topic(TOPIC).await else { return false };
        let Ok(committed) = groups.fetch_offsets(GROUP).await else { return false };
        let committed: BTreeMap<u32, u64> =
            committed.into_iter().filter(|o| o.topic == TOPIC).map(|o| (o.partition, o.offset)).collect();
        let ends: BTreeMap<u32, u64> = topic.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
        lagging = format!("{missing} records not printed yet; committed {committed:?}, log ends {ends:?}");
        missing == 0 && committed == ends
    })
    .await;
    assert!(caught_up, "the survivors print everything and commit up to the log ends: {lagging}");

    // The killed member was removed; the tool reports no lag.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["group", "describe", GROUP, "--output", "json", "--bootstrap"])
        .arg(cluster.bootstrap())
        .env_remove("KEEL_BOOTSTRAP")
        .output()
        .unwrap();
    assert!(out.status.success(), "keel group describe failed: {}", String::from_utf8_lossy(&out.stderr));
    let described: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(described["total_lag_records"], 0, "{described:#}");
    assert_eq!(described["members"].as_array().unwrap().len(), 2, "the killed printer was removed: {described:#}");
    let partitions = described["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), PARTITIONS as usize, "{described:#}");
    for p in partitions {
        assert_eq!(p["committed_offset"], p["log_end_offset"], "{described:#}");
    }

    // Ctrl-C: each survivor commits what it printed and leaves at once, exiting 0.
    for p in &printers {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let sent = unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(sent, 0);
    }
    for p in &mut printers {
        let status = p.exit_status(Duration::from_secs(20)).await;
        assert!(status.success(), "a printer exited with {status} on SIGINT");
    }
    for p in &mut printers {
        (&mut p.reader).await.unwrap();
    }
    let after = groups.describe_group(GROUP).await.unwrap();
    assert!(after.members.is_empty(), "the printers left on SIGINT: {after:?}");
    assert_eq!(after.total_lag_records, 0, "{after:?}");
}
