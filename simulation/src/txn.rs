//! Transactional (half) messages in the broker workload. A producer of group `sim-payments`
//! prepares transactions for `sim-txn`, decides each locally (commit or roll back, written to
//! its "database", which survives everything), and then either ends it or "crashes" before the
//! END (forgets it), leaving the outcome to the check-back its check server answers from the
//! database; the check server itself is restarted now and then (a new producer instance). Now
//! and then it sends a contradictory END after an acknowledged one, which must be refused.
//! After healing an operator resumes what expired unanswered (the nemesis can keep the producer
//! from every check), and then: every record of a locally committed transaction is read exactly
//! once; no record of one rolled back (or never decided) is ever read.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::{
    Admin, ClientError, Consumer, ConsumerConfig, Offset, ProducerRecord, Transactions, TxnOutcome, TxnState,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::broker::{Shared, client_config, log, wait_topic};

/// The target topic of the transactions' records.
pub(crate) const TOPIC: &str = "sim-txn";
/// Its partitions.
pub(crate) const PARTITIONS: u32 = 2;
/// The producer group.
const GROUP: &str = "sim-payments";

/// What the producer's database says of one transaction.
#[derive(Debug, Clone, Default)]
struct Local {
    /// Its records' values.
    values: Vec<String>,
    /// The local decision: committed (true) or rolled back (false); `None` while undecided.
    committed: Option<bool>,
}

/// The producer's database: transaction id → its local decision (shared with the check server,
/// which the client library runs as a task of its own).
type Database = Arc<Mutex<BTreeMap<String, bool>>>;

/// The transactional client's view.
#[derive(Debug, Default)]
pub(crate) struct TxnView {
    /// What the producer prepared and decided (the database holds the decisions too).
    local: BTreeMap<String, Local>,
    database: Database,
    /// Check-backs answered.
    answered: Arc<AtomicU64>,
    /// Where each value was read: (partition, offset).
    seen: BTreeMap<String, BTreeSet<(u32, u64)>>,
    /// The consumer and the check server stop (the check after healing is done).
    stop: bool,
    /// Transactions prepared, ENDs skipped (left to the check-back), check-backs answered,
    /// contradictory ENDs refused, records read.
    pub(crate) counts: (u64, u64, u64, u64, u64),
}

/// A check server answering from the database, as a fresh producer instance would.
fn check_server(txns: &Transactions, state: &Shared) -> keel_client::CheckServer {
    let (database, answered) = {
        let s = state.borrow();
        (Arc::clone(&s.txn.database), Arc::clone(&s.txn.answered))
    };
    txns.serve_checks(move |check| {
        let decided = database.lock().unwrap_or_else(|e| e.into_inner()).get(&check.transaction_id).copied();
        answered.fetch_add(1, Ordering::Relaxed);
        std::future::ready(match decided {
            Some(true) => TxnOutcome::Commit,
            Some(false) => TxnOutcome::Rollback,
            // Prepared and not decided yet, or never heard of: not known.
            None => TxnOutcome::Unknown,
        })
    })
}

/// Runs transactions until `until`, answering check-backs, and reads `sim-txn` until told to
/// stop.
pub(crate) async fn txn_main(seed: u64, until: Duration, state: Shared) -> turmoil::Result {
    wait_topic(&state).await;
    let nodes = state.borrow().nodes;
    let txns = Transactions::new(client_config(seed, nodes), GROUP)?;
    let consumer = consume(seed, Rc::clone(&state));
    let run = async {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e4);
        let mut checks = Some(check_server(&txns, &state));
        for n in 0.. {
            if turmoil::sim_elapsed().unwrap_or_default() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_000))).await;
            if rng.random_ratio(1, 10) {
                // A new producer instance: the old one's stream goes, a new one opens later.
                checks = None;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..3_000))).await;
            }
            if checks.is_none() {
                checks = Some(check_server(&txns, &state));
            }
            one(&txns, &state, &mut rng, n).await;
        }
        // The check server stays up until the check after healing is done.
        while !state.borrow().txn.stop {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(checks);
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let (ran, consumed) = tokio::join!(run, consumer);
    ran?;
    consumed
}

/// One transaction: prepare, decide, then END, skip it, or END and contradict it.
async fn one(txns: &Transactions, state: &Shared, rng: &mut ChaCha8Rng, n: u64) {
    let id = format!("t{n}");
    let count = rng.random_range(1..=2);
    let values: Vec<String> = (0..count).map(|i| format!("{id}-{i}")).collect();
    let records: Vec<(String, ProducerRecord)> = values
        .iter()
        .map(|v| (TOPIC.to_owned(), ProducerRecord::new(v.clone().into_bytes()).with_key(v.clone().into_bytes())))
        .collect();
    state.borrow_mut().txn.local.insert(id.clone(), Local { values, committed: None });
    // A prepare whose answer was lost is retried under the same id (the coordinator answers it
    // with the transaction's status); one that cannot be confirmed is rolled back locally.
    let mut prepared = false;
    for _ in 0..3 {
        match txns.prepare(&id, records.clone(), None).await {
            Ok(_) => {
                prepared = true;
                break;
            }
            Err(e) => {
                log(state, format!("txn {id}: prepare: {e}"));
                if !e.is_ambiguous() && !e.is_retriable() {
                    break;
                }
            }
        }
    }
    let commit = prepared && rng.random_ratio(3, 5);
    // The local transaction: decided and durable before any END.
    {
        let mut s = state.borrow_mut();
        s.txn.database.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), commit);
        if let Some(l) = s.txn.local.get_mut(&id) {
            l.committed = Some(commit);
        }
    }
    if !prepared {
        // Perhaps prepared after all: say so, or leave it to the check-back.
        let _ = txns.rollback(&id).await;
        return;
    }
    state.borrow_mut().txn.counts.0 += 1;
    if rng.random_ratio(1, 4) {
        log(state, format!("txn {id}: decided {commit}, END skipped (a crash)"));
        state.borrow_mut().txn.counts.1 += 1;
        return;
    }
    let ended = if commit { txns.commit(&id).await } else { txns.rollback(&id).await };
    log(state, format!("txn {id}: END {commit}: {:?}", ended.as_ref().map(|s| s.state())));
    if ended.is_ok() && rng.random_ratio(1, 5) {
        let contrary = if commit { txns.rollback(&id).await } else { txns.commit(&id).await };
        match contrary {
            Err(ClientError::Producer { reason, .. }) if reason == "TXN_CONTRADICTS" => {
                state.borrow_mut().txn.counts.3 += 1;
            }
            Ok(status) => state
                .borrow_mut()
                .violations
                .push(format!("txn {id}: a contradictory END was acknowledged ({:?})", status.state())),
            Err(e) => log(state, format!("txn {id}: contradictory END: {e}")),
        }
    }
}

/// Reads `sim-txn` from the beginning until told to stop.
async fn consume(seed: u64, state: Shared) -> turmoil::Result {
    let config = ConsumerConfig {
        fetch_bytes_max: 64 << 10,
        fetch_wait_max: Duration::from_millis(500),
        offset_default: Offset::Beginning,
    };
    let nodes = state.borrow().nodes;
    let mut consumer = Consumer::new(client_config(seed ^ 0xc1, nodes), config)?;
    while consumer.assign(TOPIC, &[]).await.is_err() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    while !state.borrow().txn.stop {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => {
                for r in records {
                    let value = crate::checker::text(r.value.as_deref());
                    next.insert(r.partition, r.offset + 1);
                    let mut s = state.borrow_mut();
                    s.txn.counts.4 += 1;
                    if !r.headers.iter().any(|(k, _)| k == "keel-txn-id") {
                        s.violations.push(format!("transactional record {value} has no keel-txn-id header"));
                    }
                    s.txn.seen.entry(value).or_default().insert((r.partition, r.offset));
                }
            }
            Err(e) => {
                log(&state, format!("txn consumer: poll: {e}; re-subscribing"));
                for p in 0..PARTITIONS {
                    consumer.seek(TOPIC, p, Offset::At(next.get(&p).copied().unwrap_or(0)))?;
                }
            }
        }
    }
    Ok(())
}

/// After healing: an operator resumes what expired unanswered, until every record of a locally
/// committed transaction is read (within `bound`); then none was read twice, and none of a
/// transaction rolled back or never decided was read at all.
pub(crate) async fn converge(state: &Shared, bound: Duration, seed: u64) -> Result<(), String> {
    let nodes = state.borrow().nodes;
    let admin = Admin::new(client_config(seed ^ 0x0e, nodes)).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let missing: Vec<String> = {
            let s = state.borrow();
            let mut out: Vec<String> = s
                .txn
                .local
                .iter()
                .filter(|(_, l)| l.committed == Some(true))
                .flat_map(|(_, l)| l.values.iter())
                .filter(|v| !s.txn.seen.contains_key(*v))
                .cloned()
                .collect();
            out.truncate(5);
            out
        };
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("records of committed transactions are missing in {bound:?}: {}", missing.join("; ")));
        }
        // The operator's round: `keel txn list`, then `keel txn resume` of each expired one.
        if let Ok(listed) = admin.list_transactions(Some(GROUP), false).await {
            for t in listed.iter().filter(|t| t.state() == TxnState::TxnExpiredRolledBack) {
                let resumed = admin.resume_transaction(GROUP, &t.transaction_id).await;
                log(state, format!("operator: resume {}: {:?}", t.transaction_id, resumed.map(|s| s.state())));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut s = state.borrow_mut();
    s.txn.stop = true;
    let by_value: BTreeMap<&str, (&str, Option<bool>)> = s
        .txn
        .local
        .iter()
        .flat_map(|(id, l)| l.values.iter().map(move |v| (v.as_str(), (id.as_str(), l.committed))))
        .collect();
    for (value, at) in &s.txn.seen {
        if at.len() > 1 {
            return Err(format!("transactional record {value} delivered twice: at {at:?}"));
        }
        match by_value.get(value.as_str()) {
            Some((_, Some(true))) => {}
            Some((id, decided)) => {
                return Err(format!("record {value} of transaction {id} read at {at:?}, decided locally {decided:?}"));
            }
            None => return Err(format!("{value} in {TOPIC} was never prepared")),
        }
    }
    let mut counts = s.txn.counts;
    counts.2 = s.txn.answered.load(Ordering::Relaxed);
    drop(s);
    log(
        state,
        format!("transactions: {counts:?} (prepared, END skipped, checks answered, contradictions refused, read)"),
    );
    Ok(())
}
