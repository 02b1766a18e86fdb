//! End to end, with real processes: `keel produce --outbox DIR` reads lines from stdin while it
//! is killed with SIGKILL mid-stream (records appended, some sent, some acknowledged and not yet
//! marked done), twice, and is started again each time with the same outbox directory. In the
//! end every line it reported appended is in the topic exactly once, and nothing else is.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::TopicConfig;

const TOPIC: &str = "outbox";
const PARTITIONS: u32 = 3;

/// A `keel produce --outbox` process fed `lines` (one every `gap`), with the line numbers it
/// reported appended collected as they come.
struct Producing {
    child: Child,
    appended: Arc<Mutex<BTreeSet<u64>>>,
    reader: std::thread::JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
}

fn start(cluster: &common::Cluster, dir: &std::path::Path, lines: Vec<String>, gap: Duration) -> Producing {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["produce", TOPIC, "--outbox"])
        .arg(dir)
        .args(["--bootstrap", &cluster.bootstrap()])
        .env_remove("KEEL_BOOTSTRAP")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let appended = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::clone(&appended);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(n) = line.strip_prefix("appended line ") {
                seen.lock().unwrap().insert(n.parse::<u64>().unwrap());
            }
        }
    });
    let writer = std::thread::spawn(move || {
        for line in lines {
            // A killed process closes the pipe: the rest of the lines are never read.
            if writeln!(stdin, "{line}").and_then(|()| stdin.flush()).is_err() {
                return;
            }
            std::thread::sleep(gap);
        }
    });
    Producing { child, appended, reader, writer }
}

impl Producing {
    /// SIGKILL, and the line numbers reported appended before it.
    fn kill(mut self) -> BTreeSet<u64> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        self.writer.join().unwrap();
        self.appended.lock().unwrap().clone()
    }

    /// Waits for a clean exit (stdin ended and the outbox emptied).
    fn finish(mut self, within: Duration) -> BTreeSet<u64> {
        let deadline = Instant::now() + within;
        self.writer.join().unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "keel produce --outbox exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "keel produce --outbox did not finish in {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reader.join().unwrap();
        self.appended.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_stream_stores_every_appended_record_once() {
    let cluster = common::Cluster::start(3, 110).await;
    let admin = cluster.admin();
    admin.create_topic(TOPIC, PARTITIONS, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, TOPIC).await;
    let outbox = tempfile::tempdir().unwrap();
    // Line numbers restart at 1 in every process: the values carry a run prefix.
    let lines = |run: u32, count: u64| -> Vec<String> { (1..=count).map(|n| format!("r{run}-{n}")).collect() };
    let mut owed: BTreeSet<String> = BTreeSet::new();
    let mut sent: BTreeSet<String> = BTreeSet::new();
    for (run, after) in [(1u32, Duration::from_millis(1_500)), (2, Duration::from_millis(900))] {
        let all = lines(run, 5_000);
        sent.extend(all.iter().cloned());
        let producing = start(&cluster, outbox.path(), all, Duration::from_micros(500));
        tokio::time::sleep(after).await;
        let appended = producing.kill();
        assert!(appended.len() > 50, "run {run}: only {} lines appended before the kill", appended.len());
        // Mid-stream: the process was killed with lines still coming.
        assert!(appended.len() < 5_000, "run {run}: every line was appended before the kill");
        eprintln!("run {run}: {} lines appended before SIGKILL", appended.len());
        owed.extend(appended.iter().map(|n| format!("r{run}-{n}")));
    }
    // A third process sends what the outbox holds, then its own lines, and exits when all are
    // stored.
    let all = lines(3, 200);
    sent.extend(all.iter().cloned());
    let appended = start(&cluster, outbox.path(), all, Duration::from_micros(200)).finish(Duration::from_secs(120));
    assert_eq!(appended.len(), 200);
    owed.extend(appended.iter().map(|n| format!("r3-{n}")));

    let mut until = BTreeMap::new();
    for p in admin.describe_topic(TOPIC).await.unwrap().partitions {
        until.insert(p.partition, p.high_watermark);
    }
    let read = common::read_all(cluster.client(7), TOPIC, &until).await;
    let mut times: BTreeMap<&str, u32> = BTreeMap::new();
    for value in read.values() {
        *times.entry(value.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let missing: Vec<_> = owed.iter().filter(|v| !times.contains_key(v.as_str())).collect();
    assert!(missing.is_empty(), "{} appended records lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    let strangers: Vec<_> = times.keys().filter(|v| !sent.contains(**v)).collect();
    assert!(strangers.is_empty(), "never sent: {strangers:?}");
    eprintln!("{} records owed, {} read, each once", owed.len(), read.len());
}

/// The user's outbox table, in memory: rows with growing ids, and a delete that fails when told
/// to (a crash between handing rows to the producer's outbox and deleting them).
#[derive(Default)]
struct Table {
    rows: Vec<keel_client::OutboxRow>,
    /// Deletes that succeed before one fails.
    deletes_before_failure: Option<u32>,
}

#[derive(Debug)]
struct TableGone;

impl std::fmt::Display for TableGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the table is gone")
    }
}

impl std::error::Error for TableGone {}

impl keel_client::OutboxStore for Table {
    type Error = TableGone;

    fn rows_after(&mut self, after: u64, limit: usize) -> Result<Vec<keel_client::OutboxRow>, TableGone> {
        Ok(self.rows.iter().filter(|r| r.id > after).take(limit).cloned().collect())
    }

    fn delete_through(&mut self, through: u64) -> Result<(), TableGone> {
        match &mut self.deletes_before_failure {
            Some(0) => {
                self.deletes_before_failure = None;
                return Err(TableGone);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        self.rows.retain(|r| r.id > through);
        Ok(())
    }
}

/// `relay_once` moves committed rows into a producer's outbox exactly once: rows handed over
/// before a crash that kept them in the table (the delete never happened) are recognised by the
/// outbox's mark after the producer is opened again, and deleted, not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_rows_are_published_once_across_a_crash_before_their_delete() {
    let cluster = common::Cluster::start(1, 114).await;
    let admin = cluster.admin();
    admin.create_topic("relayed", 1, 1, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, "relayed").await;
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        keel_client::Producer::with_outbox(
            cluster.client(3),
            keel_client::ProducerConfig::default(),
            keel_client::OutboxConfig::new(dir.path()),
        )
        .await
        .unwrap()
    };
    let row = |id: u64| keel_client::OutboxRow {
        id,
        topic: "relayed".into(),
        record: keel_client::ProducerRecord::new(format!("row-{id}")),
    };
    let mut table = Table { rows: (1..=10).map(row).collect(), deletes_before_failure: None };
    let producer = open().await;
    assert_eq!(keel_client::relay_once(&producer, &mut table, 4).await.unwrap(), 4);
    // The relay's first delete (rows up to the mark, 4) goes through; the one after handing
    // rows 5..=8 over fails.
    table.deletes_before_failure = Some(1);
    let crashed = keel_client::relay_once(&producer, &mut table, 4).await;
    assert!(matches!(crashed, Err(keel_client::RelayError::Store(_))), "{crashed:?}");
    assert_eq!(table.rows.first().map(|r| r.id), Some(5), "rows 5..=8 are in the outbox and the table");
    drop(producer);
    // Opened again: the mark says rows up to 8 are in the outbox already.
    let producer = open().await;
    assert_eq!(producer.outbox_mark().unwrap(), Some(8));
    let mut moved = 0;
    loop {
        let n = keel_client::relay_once(&producer, &mut table, 4).await.unwrap();
        if n == 0 {
            break;
        }
        moved += n;
    }
    assert_eq!(moved, 2, "only rows 9 and 10 were left to hand over");
    assert!(table.rows.is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.outbox_stats().unwrap().records > 0 {
        assert!(Instant::now() < deadline, "not stored: {:?}", producer.outbox_stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producer.close().await;
    let until: BTreeMap<u32, u64> = [(0, 10)].into();
    let read = common::read_all(cluster.client(4), "relayed", &until).await;
    let values: Vec<String> = read.into_values().collect();
    assert_eq!(values, (1..=10).map(|id| format!("row-{id}")).collect::<Vec<_>>());
}
