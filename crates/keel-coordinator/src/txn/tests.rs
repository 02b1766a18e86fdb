#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// A `__txn` partition without a runtime: appended records are replayed as the runtime would.
#[derive(Default)]
struct Log {
    records: Vec<Record>,
    state: Txns,
}

impl Log {
    fn append(&mut self, records: &[TxnRecord]) {
        for r in records {
            let encoded = r.encode();
            assert_eq!(TxnRecord::decode(&encoded).unwrap(), *r, "a record decodes to itself");
            self.state.replay(self.records.len() as u64, &encoded).unwrap();
            self.records.push(encoded);
        }
    }

    fn prepare(&mut self, txn: &str, values: &[&str], now: i64) -> TxnStatus {
        let (records, status) = self.state.prepare("g", txn, half(values), 1_000, now, &limits()).unwrap();
        self.append(&records);
        status
    }

    fn end(&mut self, txn: &str, commit: bool, now: i64) -> Result<TxnStatus, TxnError> {
        let (records, status) = self.state.end("g", txn, commit, now, |_| usize::MAX, &limits(), &[7, 8])?;
        self.append(&records);
        Ok(status)
    }

    fn check(&mut self, txn: &str, now: i64, limits: &TxnLimits) -> Checked {
        let (records, checked) = self.state.check("g", txn, now, |_| usize::MAX, limits, &[7, 8]).unwrap();
        self.append(&records);
        checked
    }

    /// The values published, in stamp order per target.
    fn published(&self) -> Vec<String> {
        self.state.publishes.values().map(|p| String::from_utf8(p.value.clone().unwrap_or_default()).unwrap()).collect()
    }
}

fn limits() -> TxnLimits {
    TxnLimits { checks_max: 3, check_backoff_ms: 100, check_backoff_max_ms: 250, ..TxnLimits::default() }
}

fn half(values: &[&str]) -> Vec<HalfRecord> {
    values
        .iter()
        .map(|v| HalfRecord {
            target: Tp::new("orders", 0),
            value: Some(v.as_bytes().to_vec()),
            ..HalfRecord::default()
        })
        .collect()
}

#[test]
fn a_commit_publishes_once_and_a_repeated_commit_changes_nothing() {
    let mut log = Log::default();
    log.prepare("t1", &["a", "b"], 0);
    assert!(log.published().is_empty(), "prepared records are not published");
    assert_eq!(log.end("t1", true, 10).unwrap().state, TxnState::Committed);
    assert_eq!(log.published(), ["a", "b"]);
    let p = log.state.publishes.values().collect::<Vec<_>>();
    assert_eq!(p[0].batch_base, Some(p[0].sequence), "one transaction's records to one target are one batch");
    assert_eq!(p[1].batch_base, Some(p[0].sequence));
    assert!(p[0].headers.iter().any(|h| h.key == TXN_ID_HEADER && h.value.as_deref() == Some(b"t1".as_slice())));
    let before = log.records.len();
    assert_eq!(log.end("t1", true, 20).unwrap().state, TxnState::Committed);
    assert_eq!(log.records.len(), before, "a repeated commit appends nothing");
    assert_eq!(log.state.payload_bytes(), 0, "a committed transaction's records leave the shard");
}

#[test]
fn contradictory_ends_are_refused() {
    let mut log = Log::default();
    log.prepare("c", &["x"], 0);
    log.end("c", true, 1).unwrap();
    assert!(matches!(log.end("c", false, 2), Err(TxnError::Contradicts { state: TxnState::Committed, .. })));
    log.prepare("r", &["y"], 0);
    log.end("r", false, 1).unwrap();
    assert!(matches!(log.end("r", true, 2), Err(TxnError::Contradicts { state: TxnState::RolledBack, .. })));
    assert_eq!(log.end("r", false, 3).unwrap().state, TxnState::RolledBack, "a repeated rollback agrees");
    assert_eq!(log.published(), ["x"], "the rolled-back record is never published");
    assert!(matches!(log.end("nope", true, 4), Err(TxnError::Unknown(_))));
}

#[test]
fn a_retried_prepare_is_answered_and_another_under_the_same_id_refused() {
    let mut log = Log::default();
    log.prepare("t", &["a"], 0);
    let (records, status) = log.state.prepare("g", "t", half(&["a"]), 1_000, 5, &limits()).unwrap();
    assert!(records.is_empty());
    assert_eq!(status.prepared_ms, 0, "the first prepare's status");
    assert_eq!(log.state.prepare("g", "t", half(&["b"]), 1_000, 5, &limits()), Err(TxnError::Conflict("t".into())));
    // After its end, a retry of the same prepare still gets the outcome, not a second life.
    log.end("t", true, 6).unwrap();
    let (records, status) = log.state.prepare("g", "t", half(&["a"]), 1_000, 7, &limits()).unwrap();
    assert!(records.is_empty());
    assert_eq!(status.state, TxnState::Committed);
}

#[test]
fn checks_are_counted_backed_off_and_end_in_the_policy() {
    let mut log = Log::default();
    log.prepare("t", &["a"], 0);
    assert!(log.state.due_checks(999, 10).is_empty(), "nothing is checked before the timeout");
    assert_eq!(log.state.due_checks(1_000, 10).len(), 1);
    let l = limits();
    assert_eq!(log.check("t", 1_000, &l), Checked::Ask(1));
    assert_eq!(log.check("t", 1_050, &l), Checked::Nothing, "the next check waits for its backoff");
    assert_eq!(log.state.next_check_ms(), Some(1_100));
    assert_eq!(log.check("t", 1_100, &l), Checked::Ask(2));
    assert_eq!(log.state.next_check_ms(), Some(1_300), "doubled");
    assert_eq!(log.check("t", 1_300, &l), Checked::Ask(3));
    assert_eq!(log.state.next_check_ms(), Some(1_550), "capped at the maximum backoff");
    assert_eq!(log.check("t", 1_550, &l), Checked::Expired { committed: false });
    assert_eq!(log.state.expired(), 1);
    assert_eq!(log.state.pending(), 0);
    assert!(log.published().is_empty(), "rolled back by default");
    assert!(log.state.payload_bytes() > 0, "its records are kept for a resume");
    assert!(matches!(log.end("t", true, 2_000), Err(TxnError::Expired(_))), "a late commit is refused");
    let listed = log.state.list(None, false, None, 10);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status.state, TxnState::Expired { committed: false });

    // Resumed: pending again, checked at once from the first attempt, and a commit then lands.
    let (records, status) = log.state.resume("g", "t", 3_000).unwrap();
    log.append(&records);
    assert_eq!((status.state, status.checks), (TxnState::Pending, 0));
    assert_eq!(log.state.due_checks(3_000, 10).len(), 1);
    assert_eq!(log.end("t", true, 3_001).unwrap().state, TxnState::Committed);
    assert_eq!(log.published(), ["a"]);
    assert!(matches!(log.state.resume("g", "t", 3_002), Err(TxnError::NotResumable { .. })));
}

#[test]
fn the_commit_policy_publishes_at_expiry_and_refuses_a_late_rollback() {
    let mut log = Log::default();
    log.prepare("t", &["a"], 0);
    let l = TxnLimits { checks_max: 0, expiry: ExpiryPolicy::Commit, ..limits() };
    assert_eq!(log.check("t", 1_000, &l), Checked::Expired { committed: true });
    assert_eq!(log.published(), ["a"]);
    assert!(matches!(log.end("t", false, 1_001), Err(TxnError::Contradicts { .. })));
    assert_eq!(log.end("t", true, 1_002).unwrap().state, TxnState::Expired { committed: true });
}

#[test]
fn an_expired_transaction_rolled_back_by_hand_is_dropped() {
    let mut log = Log::default();
    log.prepare("t", &["a"], 0);
    let l = TxnLimits { checks_max: 0, ..limits() };
    assert_eq!(log.check("t", 1_000, &l), Checked::Expired { committed: false });
    assert_eq!(log.end("t", false, 1_001).unwrap().state, TxnState::RolledBack);
    assert_eq!((log.state.expired(), log.state.payload_bytes()), (0, 0));
}

#[test]
fn commits_publish_in_the_order_they_were_made() {
    let mut log = Log::default();
    log.prepare("first", &["1"], 0);
    log.prepare("second", &["2"], 0);
    log.end("second", true, 1).unwrap();
    log.end("first", true, 2).unwrap();
    assert_eq!(log.published(), ["2", "1"], "stamps follow the commits, not the prepares");
}

#[test]
fn bounds_refuse_before_anything_is_appended() {
    let mut log = Log::default();
    let l = TxnLimits { pending_max: 1, records_max: 2, txn_bytes_max: 4, ..limits() };
    let refuse = |s: &Txns, txn: &str, v: &[&str]| s.prepare("g", txn, half(v), 0, 0, &l);
    assert!(matches!(refuse(&log.state, "a", &[]), Err(TxnError::Invalid(_))));
    assert!(matches!(refuse(&log.state, "a", &["1", "2", "3"]), Err(TxnError::Invalid(_))));
    assert!(matches!(refuse(&log.state, "a", &["12345"]), Err(TxnError::Invalid(_))));
    assert!(matches!(refuse(&log.state, "", &["1"]), Err(TxnError::Invalid(_))));
    assert!(matches!(refuse(&log.state, "a\nb", &["1"]), Err(TxnError::Invalid(_))));
    assert!(matches!(log.state.prepare("g", "a", half(&["1"]), -5, 0, &l), Err(TxnError::Invalid(_))));
    let (records, _) = refuse(&log.state, "a", &["1"]).unwrap();
    log.append(&records);
    assert!(matches!(refuse(&log.state, "b", &["1"]), Err(TxnError::Full(_))));
    let l = TxnLimits { expired_max: 0, ..limits() };
    assert!(matches!(log.state.prepare("g", "b", half(&["1"]), 0, 0, &l), Err(TxnError::Full(_))));
    let l = TxnLimits { pending_bytes_max: 1, ..limits() };
    assert!(matches!(log.state.prepare("g", "b", half(&["1"]), 0, 0, &l), Err(TxnError::Full(_))));
}

#[test]
fn ended_transactions_are_forgotten_after_their_window() {
    let mut log = Log::default();
    let l = TxnLimits { ended_window_ms: 100, ..limits() };
    let (records, _) = log.state.prepare("g", "old", half(&["a"]), 0, 0, &l).unwrap();
    log.append(&records);
    let (records, _) = log.state.end("g", "old", false, 10, |_| usize::MAX, &l, &[]).unwrap();
    log.append(&records);
    let (records, _) = log.state.prepare("g", "new", half(&["b"]), 0, 0, &l).unwrap();
    log.append(&records);
    let (records, _) = log.state.end("g", "new", false, 500, |_| usize::MAX, &l, &[]).unwrap();
    log.append(&records);
    assert!(log.state.status("g", "old").is_none(), "forgotten once its window passed");
    assert!(log.state.status("g", "new").is_some());
}

#[test]
fn a_commit_that_needs_a_producer_id_asks_for_one() {
    let mut log = Log::default();
    log.prepare("t", &["a"], 0);
    assert_eq!(
        log.state.end("g", "t", true, 1, |_| usize::MAX, &limits(), &[]).map(|_| ()),
        Err(TxnError::ProducerIdNeeded)
    );
}

#[test]
fn the_compaction_rewrite_replays_to_the_same_state() {
    let mut log = Log::default();
    log.prepare("pending", &["p"], 0);
    log.prepare("committed", &["c"], 0);
    log.end("committed", true, 1).unwrap();
    log.prepare("expired", &["e"], 0);
    let l = TxnLimits { checks_max: 0, ..limits() };
    let (records, _) = log.state.check("g", "expired", 1_000, |_| usize::MAX, &l, &[7, 8]).unwrap();
    log.append(&records);
    let mut rebuilt = Txns::default();
    for (i, r) in log.state.live_records(KEY).iter().enumerate() {
        rebuilt.replay(i as u64, r).unwrap();
    }
    assert_eq!(rebuilt, log.state);
}

#[test]
fn damaged_records_are_refused_at_replay() {
    let mut s = Txns::default();
    for key in [&b""[..], b"s\0only-group", b"z\0a\0b", b"s\0g\0t"] {
        let r = Record { key: key.to_vec(), value: Some(b"{not json".to_vec()) };
        assert!(s.replay(0, &r).is_err(), "{key:?}");
    }
}

#[test]
fn a_commit_to_new_targets_takes_one_producer_id_each() {
    let mut log = Log::default();
    let mut records = half(&["a"]);
    records.push(HalfRecord { target: Tp::new("orders", 1), value: Some(b"b".to_vec()), ..HalfRecord::default() });
    let (appended, _) = log.state.prepare("g", "t", records, 1_000, 0, &limits()).unwrap();
    log.append(&appended);
    assert_eq!(log.state.publishers_needed("g", "t"), 2);
    let one = log.state.end("g", "t", true, 1, |_| usize::MAX, &limits(), &[7]);
    assert_eq!(one.map(|_| ()), Err(TxnError::ProducerIdNeeded), "one id for two new targets is too few");
    log.end("t", true, 2).unwrap();
    let ids: BTreeSet<i64> = log.state.publishers.values().map(|p| p.producer_id).collect();
    assert_eq!(ids, [7, 8].into(), "each target its own publisher");
}
