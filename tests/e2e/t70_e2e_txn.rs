//! End to end, with real processes: a producer process prepares 40 transactions, decides each in
//! its own database (a file it flushes: even ones commit, odd ones roll back), ends only the
//! first ten, and is killed with SIGKILL. A restarted producer process (the same test binary
//! again) answers the coordinator's check-backs from that database. Every record of a committed
//! transaction is then read exactly once, none of a rolled-back one ever, nothing stays pending,
//! and an END contradicting how a transaction ended is refused.
//!
//! The producer processes are this test binary run again with `KEEL_E2E_TXN_ROLE` set: the
//! ignored test `txn_producer_process` plays the role and does nothing without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_client::{
    ClientConfig, ClientError, Consumer, ConsumerConfig, ProducerRecord, TopicConfig, Transactions, TxnOutcome,
    TxnState,
};

const TOPIC: &str = "payments";
const GROUP: &str = "e2e-payments";
const TRANSACTIONS: u32 = 40;
/// Transactions the first producer ends itself before it is killed.
const ENDED: u32 = 10;

fn committed(i: u32) -> bool {
    i.is_multiple_of(2)
}

fn values(i: u32) -> [String; 2] {
    [format!("t{i}-a"), format!("t{i}-b")]
}

/// A producer process, killed with SIGKILL when dropped (a failing test leaves none behind).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this test binary as a producer process in `role`, and waits until it says `ready`.
fn producer_process(role: &str, bootstrap: &str, database: &std::path::Path, ready: &str) -> Process {
    let mut child = Process(
        Command::new(std::env::current_exe().unwrap())
            .args(["t70_e2e_txn::txn_producer_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("KEEL_E2E_TXN_ROLE", role)
            .env("KEEL_E2E_TXN_BOOTSTRAP", bootstrap)
            .env("KEEL_E2E_TXN_DATABASE", database)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the {role} process did not get ready");
        match lines.next() {
            Some(Ok(line)) if line.contains(ready) => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("reading the {role} process: {e}"),
            None => panic!("the {role} process ended before it was ready"),
        }
    }
    // Keep draining its output so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_producers_transactions_are_decided_by_its_restarted_successor() {
    // Check-backs at the scale of the test: the first a second after the prepare, then every
    // half second to one, thirty before the expiry policy would apply.
    let extra =
        "txn_timeout_ms = 1000\ntxn_check_backoff_ms = 500\ntxn_check_backoff_max_ms = 1000\ntxn_checks_max = 30\n";
    let cluster = common::Cluster::start_configured(3, 120, extra).await;
    let admin = cluster.admin();
    admin.create_topic(TOPIC, 2, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, TOPIC).await;
    common::wait_leaders(&admin, keel_broker::TXN_TOPIC).await;
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("database");
    let bootstrap = cluster.bootstrap();

    // SIGKILL, as soon as it has prepared everything.
    drop(producer_process("prepare", &bootstrap, &database, "PREPARED"));
    let successor = producer_process("answer", &bootstrap, &database, "SERVING");

    let mut consumer = Consumer::new(cluster.client(7), ConsumerConfig::default()).unwrap();
    consumer.assign(TOPIC, &[]).await.unwrap();
    let wanted: BTreeSet<String> = (0..TRANSACTIONS).filter(|i| committed(*i)).flat_map(values).collect();
    let mut seen: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    // Until every committed record is in, then a few seconds more for anything that should not be.
    let mut settle: Option<Instant> = None;
    while settle.is_none_or(|at| Instant::now() < at) {
        if Instant::now() > deadline {
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| std::fs::read_to_string(&n.log).unwrap_or_default())
                .flat_map(|l| {
                    l.lines()
                        .filter(|l| l.contains("check") || l.contains("transaction"))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            panic!("committed records missing: {:?}\n{}", missing(&wanted, &seen), logs.join("\n"));
        }
        for r in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            assert!(r.headers.iter().any(|(k, _)| k == "keel-txn-id"), "{value} carries its transaction id");
            seen.entry(value).or_default().push((r.partition, r.offset));
        }
        if settle.is_none() && missing(&wanted, &seen).is_empty() {
            settle = Some(Instant::now() + Duration::from_secs(4));
        }
    }
    for (value, at) in &seen {
        assert!(wanted.contains(value), "{value} of a rolled-back transaction was read at {at:?}");
        assert_eq!(at.len(), 1, "{value} read once, not at {at:?}");
    }

    let left = admin.list_transactions(Some(GROUP), false).await.unwrap();
    assert!(left.is_empty(), "nothing stays pending or expired: {left:?}");
    let ended = admin.list_transactions(Some(GROUP), true).await.unwrap();
    assert_eq!(ended.len(), TRANSACTIONS as usize, "every transaction is remembered as ended: {ended:?}");
    for t in &ended {
        let i: u32 = t.transaction_id.trim_start_matches('t').parse().unwrap();
        let want = if committed(i) { TxnState::TxnCommitted } else { TxnState::TxnRolledBack };
        assert_eq!(t.state(), want, "{}", t.transaction_id);
    }
    let txns = Transactions::new(cluster.client(8), GROUP).unwrap();
    match txns.rollback("t0").await {
        Err(ClientError::Producer { reason, .. }) => assert_eq!(reason, "TXN_CONTRADICTS"),
        other => panic!("a rollback of a committed transaction is refused, not {other:?}"),
    }
    assert_eq!(txns.commit("t0").await.unwrap().state(), TxnState::TxnCommitted, "a repeated commit agrees");

    drop(successor);
    drop(cluster);
}

fn missing(wanted: &BTreeSet<String>, seen: &BTreeMap<String, Vec<(u32, u64)>>) -> Vec<String> {
    wanted.iter().filter(|v| !seen.contains_key(*v)).take(5).cloned().collect()
}

/// The producer processes (see the module's doc); nothing without `KEEL_E2E_TXN_ROLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a producer process that a_killed_producers_transactions_are_decided_by_its_restarted_successor runs"]
async fn txn_producer_process() {
    let Ok(role) = std::env::var("KEEL_E2E_TXN_ROLE") else { return };
    // What the client did, on the test's stderr, for when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("keel_client=info")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let bootstrap = std::env::var("KEEL_E2E_TXN_BOOTSTRAP").unwrap();
    let database = std::path::PathBuf::from(std::env::var("KEEL_E2E_TXN_DATABASE").unwrap());
    let txns = Transactions::new(ClientConfig::from_bootstrap(&bootstrap).unwrap(), GROUP).unwrap();
    // The check server answers for as long as it is held: until the process is killed.
    let mut _checks = None;
    match role.as_str() {
        "prepare" => {
            let mut db = std::fs::OpenOptions::new().create(true).append(true).open(&database).unwrap();
            for i in 0..TRANSACTIONS {
                let id = format!("t{i}");
                let records =
                    values(i).map(|v| (TOPIC.to_owned(), ProducerRecord::new(v.clone()).with_key(v))).to_vec();
                txns.prepare(&id, records, Some(Duration::from_secs(1))).await.unwrap();
                // The local transaction, durable before any END (or the crash that skips it).
                writeln!(db, "{id} {}", if committed(i) { "commit" } else { "rollback" }).unwrap();
                db.sync_data().unwrap();
                if i < ENDED {
                    if committed(i) { txns.commit(&id).await } else { txns.rollback(&id).await }.unwrap();
                }
            }
            println!("PREPARED");
        }
        "answer" => {
            let decided: BTreeMap<String, bool> = std::fs::read_to_string(&database)
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(id, d)| (id.to_owned(), d == "commit"))
                .collect();
            _checks = Some(txns.serve_checks(move |check| {
                let outcome = match decided.get(&check.transaction_id) {
                    Some(true) => TxnOutcome::Commit,
                    Some(false) => TxnOutcome::Rollback,
                    None => TxnOutcome::Unknown,
                };
                std::future::ready(outcome)
            }));
            println!("SERVING");
        }
        other => panic!("unknown role {other}"),
    }
    std::io::stdout().flush().unwrap();
    // Until killed.
    tokio::time::sleep(Duration::from_secs(600)).await;
}
