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
