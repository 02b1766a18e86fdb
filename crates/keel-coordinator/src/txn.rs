//! Transactional (half) messages as a pure shard of one `__txn` partition (README,
//! "Transactional messages"). A producer *prepares* records that no consumer can see, runs its
//! local transaction, then *ends* it: commit publishes the records to their topics (exactly
//! once, through [`crate::publish`]), rollback drops them. Every transaction makes exactly one
//! transition out of `Pending`, recorded here before anyone is told: a repeated END agrees with
//! it and changes nothing, a contradictory one is refused.
//!
//! When no END comes within the transaction's timeout, the coordinator asks the producer group
//! (a *check-back*): each check is first recorded (its attempt number and the time of the next),
//! so the attempts are bounded across failovers, and after `checks_max` unanswered ones the
//! configured policy applies and the transaction is `Expired` — listed, and (when the policy
//! rolled it back) kept with its records so that an operator can resume it. A check rewrites a
//! few dozen bytes of status, never the records: a stuck producer cannot make the partition
//! grow beyond its bounds.
//!
//! Transactions are keyed by (producer group, transaction id); every operation takes the one
//! lock key [`KEY`], because commits of any group share the publishers of their targets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::groups::Tp;
use crate::publish::{self, Publish, PublishHeader, Publisher};
use crate::{Record, ReplayError, Shard};

/// The lock key of every transaction operation.
pub const KEY: &str = "txns";
/// Header a committed record carries: its transaction's id.
pub const TXN_ID_HEADER: &str = "keel-txn-id";
/// Header a committed record carries: its producer group.
pub const TXN_GROUP_HEADER: &str = "keel-txn-group";
/// Bytes of committed records sent to one target in one batch (more start another batch).
pub const PUBLISH_BATCH_BYTES_MAX: usize = 1 << 20;
/// What a committed record is counted beyond its key, value and headers.
pub const RECORD_OVERHEAD_BYTES: usize = 160;
/// What a batch is counted beyond its records.
pub const BATCH_OVERHEAD_BYTES: usize = 128;
/// The longest transaction id, in bytes.
pub const TXN_ID_MAX: usize = 128;

/// What happens to a transaction whose checks all went unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryPolicy {
    /// Its records are not published (they stay, listed, until resumed or rolled back).
    Rollback,
    /// Its records are published.
    Commit,
}

/// Bounds and timings of the transactions shard, checked before anything is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnLimits {
    /// The timeout of a transaction whose prepare names none.
    pub timeout_default_ms: i64,
    /// The longest timeout a prepare may ask for.
    pub timeout_max_ms: i64,
    /// Checks sent before the expiry policy applies.
    pub checks_max: u32,
    /// The wait after the first check; each later one doubles it, up to `check_backoff_max_ms`.
    pub check_backoff_ms: i64,
    /// The longest wait between two checks.
    pub check_backoff_max_ms: i64,
    /// What expiry does.
    pub expiry: ExpiryPolicy,
    /// Pending transactions one partition holds.
    pub pending_max: usize,
    /// Bytes of pending (and expired, unpublished) records one partition holds in memory.
    pub pending_bytes_max: u64,
    /// Records one transaction carries.
    pub records_max: usize,
    /// Bytes (keys, values, headers) one transaction carries.
    pub txn_bytes_max: usize,
    /// Expired transactions kept: at the bound, prepares are refused until an operator acts.
    pub expired_max: usize,
    /// How long an ended transaction is remembered, so a late or repeated END is answered with
    /// its outcome.
    pub ended_window_ms: i64,
    /// Ended transactions remembered at most (the oldest go first).
    pub ended_max: usize,
    /// Publishing bounds.
    pub publish: publish::Bounds,
}

impl Default for TxnLimits {
    fn default() -> TxnLimits {
        TxnLimits {
            timeout_default_ms: 10_000,
            timeout_max_ms: 3_600_000,
            checks_max: 10,
            check_backoff_ms: 5_000,
            check_backoff_max_ms: 60_000,
            expiry: ExpiryPolicy::Rollback,
            pending_max: 100_000,
            pending_bytes_max: 64 << 20,
            records_max: 1_000,
            txn_bytes_max: 1 << 20,
            expired_max: 10_000,
            ended_window_ms: 3_600_000,
            ended_max: 200_000,
            publish: publish::Bounds { publishes_max: 20_000, publisher_idle_ms: 3_600_000 },
        }
    }
}

impl TxnLimits {
    /// The wait after check `attempt` (1 for the first) before the next.
    pub fn backoff_after(&self, attempt: u32) -> i64 {
        let doublings = attempt.saturating_sub(1).min(30);
        self.check_backoff_ms.saturating_mul(1i64 << doublings).min(self.check_backoff_max_ms).max(1)
    }
}

/// One record of a transaction, and the partition it goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfRecord {
    /// Where it goes once committed.
    pub target: Tp,
    /// Key.
    #[serde(with = "crate::publish::b64", default)]
    pub key: Option<Vec<u8>>,
    /// Value.
    #[serde(with = "crate::publish::b64", default)]
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<PublishHeader>,
}

impl HalfRecord {
    fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len)).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers
    }
}

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Prepared; its records are invisible until it ends.
    Pending,
    /// Committed by its producer (or a check's answer): its records are published.
    Committed,
    /// Rolled back: its records were dropped.
    RolledBack,
    /// No END came through every check; `committed` tells what the policy did.
    Expired {
        /// The policy published its records.
        committed: bool,
    },
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxnState::Pending => "pending",
            TxnState::Committed => "committed",
            TxnState::RolledBack => "rolled back",
            TxnState::Expired { committed: true } => "expired (committed by policy)",
            TxnState::Expired { committed: false } => "expired (rolled back by policy)",
        })
    }
}

/// A transaction's status record: small, rewritten by each check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnStatus {
    /// Where it is.
    pub state: TxnState,
    /// When it was prepared (coordinator clock, ms since the epoch).
    pub prepared_ms: i64,
    /// Its timeout.
    pub timeout_ms: i64,
    /// Checks sent so far.
    pub checks: u32,
    /// When the next check is due (pending only).
    pub next_check_ms: i64,
    /// When it left `Pending` (0 while pending).
    #[serde(default)]
    pub ended_ms: i64,
    /// A digest of its records: a retried prepare must carry the same.
    pub digest: u64,
    /// How many records.
    pub records: u32,
    /// Their bytes.
    pub bytes: u64,
    /// The topics they go to (for access checks).
    pub topics: Vec<String>,
}

/// What one record of `__txn` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnRecord {
    /// The records of (group, transaction); `None` drops them.
    Payload(String, String, Option<Vec<HalfRecord>>),
    /// The status of (group, transaction); `None` forgets it.
    Status(String, String, Option<TxnStatus>),
    /// The publisher identity for a target partition; `None` removes it.
    Publisher(Tp, Option<Publisher>),
    /// A publish decision for a target partition; `None` confirms it.
    Publish(Tp, (i16, i32), Option<Publish>),
}

const PAYLOAD: u8 = b'r';
const STATUS: u8 = b's';
const PUBLISHER: u8 = b'p';
const PUBLISH: u8 = b'd';

fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings, integers and lists cannot fail to serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

impl TxnRecord {
    /// Encodes it as a key/value record.
    pub fn encode(&self) -> Record {
        match self {
            TxnRecord::Payload(g, t, v) => Record { key: key(PAYLOAD, &[g, t]), value: v.as_ref().map(json) },
            TxnRecord::Status(g, t, v) => Record { key: key(STATUS, &[g, t]), value: v.as_ref().map(json) },
            TxnRecord::Publisher(tp, p) => {
                Record { key: key(PUBLISHER, &[&tp.topic, &tp.partition.to_string()]), value: p.as_ref().map(json) }
            }
            TxnRecord::Publish(tp, (epoch, sequence), p) => {
                let stamp = format!("{epoch:05}.{sequence:010}");
                Record {
                    key: key(PUBLISH, &[&tp.topic, &tp.partition.to_string(), &stamp]),
                    value: p.as_ref().map(json),
                }
            }
        }
    }

    /// Decodes a key/value record.
    pub fn decode(record: &Record) -> Result<TxnRecord, String> {
        let (&kind, rest) = record.key.split_first().ok_or("empty key")?;
        let text = std::str::from_utf8(rest).map_err(|_| "key is not UTF-8".to_owned())?;
        let parts: Vec<&str> = text.strip_prefix('\0').map(|t| t.splitn(4, '\0').collect()).unwrap_or_default();
        fn parse<T: for<'a> Deserialize<'a>>(v: &Option<Vec<u8>>) -> Result<Option<T>, String> {
            v.as_deref().map(|v| serde_json::from_slice(v).map_err(|e| format!("bad value: {e}"))).transpose()
        }
        let tp = |t: &str, p: &str| -> Result<Tp, String> {
            Ok(Tp::new(t, p.parse::<u32>().map_err(|_| format!("bad partition {p:?}"))?))
        };
        match (kind, parts.as_slice()) {
            (PAYLOAD, [g, t]) => Ok(TxnRecord::Payload((*g).into(), (*t).into(), parse(&record.value)?)),
            (STATUS, [g, t]) => Ok(TxnRecord::Status((*g).into(), (*t).into(), parse(&record.value)?)),
            (PUBLISHER, [t, p]) => Ok(TxnRecord::Publisher(tp(t, p)?, parse(&record.value)?)),
            (PUBLISH, [t, p, stamp]) => {
                let (e, s) = stamp.split_once('.').ok_or_else(|| format!("bad stamp {stamp:?}"))?;
                let stamp = (e.parse().map_err(|_| "bad epoch")?, s.parse().map_err(|_| "bad sequence")?);
                Ok(TxnRecord::Publish(tp(t, p)?, stamp, parse(&record.value)?))
            }
            _ => Err(format!("unknown key kind {kind} with {} parts", parts.len())),
        }
    }
}

/// Why a transaction operation was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// A prepare under an id that holds other records.
    #[error("transaction {0:?} was prepared with other records; use a new transaction id")]
    Conflict(String),
    /// No such transaction (never prepared, or ended longer ago than it is remembered).
    #[error("transaction {0:?} is unknown (never prepared here, or ended longer ago than the coordinator remembers)")]
    Unknown(String),
    /// An END that contradicts how the transaction already ended.
    #[error("transaction {txn:?} is already {state}; the contradictory END changes nothing")]
    Contradicts {
        /// The transaction.
        txn: String,
        /// How it ended.
        state: TxnState,
    },
    /// A commit of a transaction the expiry policy rolled back: an operator must resume it.
    #[error(
        "transaction {0:?} expired unanswered and was rolled back by policy; `keel txn resume` puts it back to pending"
    )]
    Expired(String),
    /// A resume of a transaction that is not expired-and-rolled-back.
    #[error("transaction {txn:?} is {state}: only one the expiry policy rolled back can be resumed")]
    NotResumable {
        /// The transaction.
        txn: String,
        /// Where it is.
        state: TxnState,
    },
    /// A bound is reached.
    #[error("{0}; retry later")]
    Full(String),
    /// A commit needs publishers for new target partitions and too few producer ids were given.
    #[error("the transaction coordinator needs producer ids to publish; retry")]
    ProducerIdNeeded,
}

/// (producer group, transaction id).
pub type TxnKey = (String, String);

/// Transactions of one `__txn` partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txns {
    status: BTreeMap<TxnKey, TxnStatus>,
    payloads: BTreeMap<TxnKey, Vec<HalfRecord>>,
    /// Pending transactions by the time their next check is due.
    checks: BTreeSet<(i64, TxnKey)>,
    /// Committed and rolled-back transactions by when they ended (forgotten first).
    ended: BTreeSet<(i64, TxnKey)>,
    pending: usize,
    expired: usize,
    /// Bytes of the payloads held.
    payload_bytes: u64,
    /// Publisher identity per target partition.
    pub publishers: BTreeMap<Tp, Publisher>,
    /// Committed records not yet confirmed in their target, in stamp order.
    pub publishes: BTreeMap<(Tp, (i16, i32)), Publish>,
}

/// A check the runtime must act on: ask the group, or apply the expiry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueCheck {
    /// The transaction.
    pub key: TxnKey,
    /// The checks sent so far.
    pub checks: u32,
}

/// What a check operation decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Ask the producer group: this is attempt `n` (from 1).
    Ask(u32),
    /// The policy applied: expired, committed or not.
    Expired {
        /// Its records were published.
        committed: bool,
    },
    /// Nothing to do (it ended, or its check is not due).
    Nothing,
}

/// A transaction as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Producer group.
    pub group: String,
    /// Transaction id.
    pub txn: String,
    /// Its status.
    pub status: TxnStatus,
}

fn digest(records: &[HalfRecord]) -> u64 {
    keel_record::fnv1a_64(&json(&records))
}

/// Checks a transaction id: 1 to [`TXN_ID_MAX`] bytes, no control characters.
pub fn validate_txn_id(txn: &str) -> Result<(), TxnError> {
    if txn.is_empty() || txn.len() > TXN_ID_MAX || txn.chars().any(char::is_control) {
        return Err(TxnError::Invalid(format!(
            "a transaction id is 1 to {TXN_ID_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

impl Txns {
    /// Transactions pending.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Transactions expired (and not resumed or ended since).
    pub fn expired(&self) -> usize {
        self.expired
    }

    /// Bytes of records held (pending, and expired unpublished).
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// The status of a transaction, if remembered.
    pub fn status(&self, group: &str, txn: &str) -> Option<&TxnStatus> {
        self.status.get(&(group.to_owned(), txn.to_owned()))
    }

    fn apply(&mut self, record: TxnRecord) {
        match record {
            TxnRecord::Payload(g, t, Some(records)) => {
                let bytes = records.iter().map(|r| r.size() as u64).sum::<u64>();
                if let Some(old) = self.payloads.insert((g, t), records) {
                    self.payload_bytes -= old.iter().map(|r| r.size() as u64).sum::<u64>();
                }
                self.payload_bytes += bytes;
            }
            TxnRecord::Payload(g, t, None) => {
                if let Some(old) = self.payloads.remove(&(g, t)) {
                    self.payload_bytes -= old.iter().map(|r| r.size() as u64).sum::<u64>();
                }
            }
            TxnRecord::Status(g, t, status) => {
                let k = (g, t);
                if let Some(old) = self.status.remove(&k) {
                    match old.state {
                        TxnState::Pending => {
                            self.pending -= 1;
                            self.checks.remove(&(old.next_check_ms, k.clone()));
                        }
                        TxnState::Expired { .. } => self.expired -= 1,
                        TxnState::Committed | TxnState::RolledBack => {
                            self.ended.remove(&(old.ended_ms, k.clone()));
                        }
                    }
                }
                let Some(s) = status else { return };
                match s.state {
                    TxnState::Pending => {
                        self.pending += 1;
                        self.checks.insert((s.next_check_ms, k.clone()));
                    }
                    TxnState::Expired { .. } => self.expired += 1,
                    TxnState::Committed | TxnState::RolledBack => {
                        self.ended.insert((s.ended_ms, k.clone()));
                    }
                }
                self.status.insert(k, s);
            }
            TxnRecord::Publisher(tp, Some(p)) => {
                self.publishers.insert(tp, p);
            }
            TxnRecord::Publisher(tp, None) => {
                self.publishers.remove(&tp);
            }
            TxnRecord::Publish(tp, stamp, Some(p)) => {
                self.publishes.insert((tp, stamp), p);
            }
            TxnRecord::Publish(tp, stamp, None) => {
                self.publishes.remove(&(tp, stamp));
            }
        }
    }

    /// The ended transactions an operation at `now_ms` forgets (by age, and the oldest beyond
    /// the count bound): tombstones of their status, so every replica forgets the same ones.
    fn forget(&self, now_ms: i64, adding: usize, limits: &TxnLimits) -> Vec<TxnRecord> {
        let over = (self.ended.len() + adding).saturating_sub(limits.ended_max);
        self.ended
            .iter()
            .enumerate()
            .take_while(|(i, (at, _))| *i < over || *at < now_ms.saturating_sub(limits.ended_window_ms))
            .take(1_000)
            .map(|(_, (_, (g, t)))| TxnRecord::Status(g.clone(), t.clone(), None))
            .collect()
    }

    /// Prepares a transaction: its records, invisible until it ends, and its status (pending,
    /// first check due after its timeout). A retry with the same records is answered with the
    /// transaction's status and appends nothing.
    pub fn prepare(
        &self,
        group: &str,
        txn: &str,
        records: Vec<HalfRecord>,
        timeout_ms: i64,
        now_ms: i64,
        limits: &TxnLimits,
    ) -> Result<(Vec<TxnRecord>, TxnStatus), TxnError> {
        validate_txn_id(txn)?;
        if records.is_empty() || records.len() > limits.records_max {
            return Err(TxnError::Invalid(format!("a transaction carries 1 to {} records", limits.records_max)));
        }
        let bytes: usize = records.iter().map(HalfRecord::size).sum();
        if bytes > limits.txn_bytes_max {
            return Err(TxnError::Invalid(format!(
                "a transaction carries at most {} bytes of keys, values and headers ({bytes} given)",
                limits.txn_bytes_max
            )));
        }
        let timeout_ms = if timeout_ms == 0 { limits.timeout_default_ms } else { timeout_ms };
        if !(1..=limits.timeout_max_ms).contains(&timeout_ms) {
            return Err(TxnError::Invalid(format!("timeout_ms must be 1 to {} ms", limits.timeout_max_ms)));
        }
        let digest = digest(&records);
        if let Some(s) = self.status(group, txn) {
            return if s.digest == digest { Ok((Vec::new(), s.clone())) } else { Err(TxnError::Conflict(txn.into())) };
        }
        if self.pending >= limits.pending_max {
            return Err(TxnError::Full(format!("this partition holds {} pending transactions", self.pending)));
        }
        if self.expired >= limits.expired_max {
            return Err(TxnError::Full(format!(
                "this partition holds {} expired transactions: resume or roll them back (`keel txn list`)",
                self.expired
            )));
        }
        if self.payload_bytes.saturating_add(bytes as u64) > limits.pending_bytes_max {
            return Err(TxnError::Full(format!(
                "this partition holds {} bytes of pending transactions (at most {})",
                self.payload_bytes, limits.pending_bytes_max
            )));
        }
        let mut topics: Vec<String> = records.iter().map(|r| r.target.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        let status = TxnStatus {
            state: TxnState::Pending,
            prepared_ms: now_ms,
            timeout_ms,
            checks: 0,
            next_check_ms: now_ms.saturating_add(timeout_ms),
            ended_ms: 0,
            digest,
            records: records.len() as u32,
            bytes: bytes as u64,
            topics,
        };
        let out = vec![
            TxnRecord::Payload(group.into(), txn.into(), Some(records)),
            TxnRecord::Status(group.into(), txn.into(), Some(status.clone())),
        ];
        Ok((out, status))
    }

    /// Ends a transaction: commit publishes its records (one batch per target where they fit
    /// `batch_limit`), rollback drops them. An END that agrees with how it already ended is
    /// answered with its status and appends nothing.
    #[allow(clippy::too_many_arguments)] // The END's inputs and the shard's bounds.
    pub fn end(
        &self,
        group: &str,
        txn: &str,
        commit: bool,
        now_ms: i64,
        batch_limit: impl Fn(&Tp) -> usize,
        limits: &TxnLimits,
        spare_producer_ids: &[i64],
    ) -> Result<(Vec<TxnRecord>, TxnStatus), TxnError> {
        let s = self.status(group, txn).ok_or_else(|| TxnError::Unknown(txn.into()))?;
        let agrees = match (s.state, commit) {
            (TxnState::Pending, _) => false,
            (TxnState::Committed | TxnState::Expired { committed: true }, true) => true,
            (TxnState::RolledBack, false) => true,
            (TxnState::Expired { committed: false }, false) => false,
            (TxnState::Expired { committed: false }, true) => return Err(TxnError::Expired(txn.into())),
            (state, _) => return Err(TxnError::Contradicts { txn: txn.into(), state }),
        };
        if agrees {
            return Ok((Vec::new(), s.clone()));
        }
        let state = if commit { TxnState::Committed } else { TxnState::RolledBack };
        self.finish(group, txn, state, now_ms, batch_limit, limits, spare_producer_ids)
    }

    /// Moves (group, txn) out of pending or expired into `state`, publishing its records when
    /// that commits them.
    #[allow(clippy::too_many_arguments)] // As `end`.
    fn finish(
        &self,
        group: &str,
        txn: &str,
        state: TxnState,
        now_ms: i64,
        batch_limit: impl Fn(&Tp) -> usize,
        limits: &TxnLimits,
        spare_producer_ids: &[i64],
    ) -> Result<(Vec<TxnRecord>, TxnStatus), TxnError> {
        let k = (group.to_owned(), txn.to_owned());
        let Some(old) = self.status.get(&k) else { return Err(TxnError::Unknown(txn.into())) };
        let publishes = matches!(state, TxnState::Committed | TxnState::Expired { committed: true });
        let keeps_payload = matches!(state, TxnState::Expired { committed: false });
        let mut out = Vec::new();
        if publishes {
            let records = self.payloads.get(&k).map(Vec::as_slice).unwrap_or_default();
            let mut batcher = publish::Batcher::new(&self.publishers, &self.publishes, spare_producer_ids.to_vec());
            for r in records {
                let mut headers = r.headers.clone();
                headers.push(PublishHeader { key: TXN_ID_HEADER.into(), value: Some(txn.as_bytes().to_vec()) });
                headers.push(PublishHeader { key: TXN_GROUP_HEADER.into(), value: Some(group.as_bytes().to_vec()) });
                let record = publish::Outgoing { key: r.key.clone(), value: r.value.clone(), headers };
                let bytes = r.size().saturating_add(RECORD_OVERHEAD_BYTES);
                let limit = PUBLISH_BATCH_BYTES_MAX.min(batch_limit(&r.target));
                batcher.add(&r.target, record, bytes, limit, BATCH_OVERHEAD_BYTES, &limits.publish, now_ms).map_err(
                    |e| match e {
                        publish::DecideError::ProducerIdNeeded => TxnError::ProducerIdNeeded,
                        publish::DecideError::Full { max } => {
                            TxnError::Full(format!("{max} committed records wait to be published"))
                        }
                    },
                )?;
            }
            let (publishers, decisions) = batcher.changes(&self.publishers, &self.publishes);
            out.extend(publishers.into_iter().map(|(tp, p)| TxnRecord::Publisher(tp, Some(p))));
            out.extend(decisions.into_iter().map(|(tp, s, p)| TxnRecord::Publish(tp, s, Some(p))));
        }
        if !keeps_payload {
            out.push(TxnRecord::Payload(k.0.clone(), k.1.clone(), None));
        }
        let status = TxnStatus { state, ended_ms: now_ms, next_check_ms: 0, ..old.clone() };
        let ends = matches!(state, TxnState::Committed | TxnState::RolledBack);
        out.extend(
            self.forget(now_ms, usize::from(ends), limits)
                .into_iter()
                .filter(|r| !matches!(r, TxnRecord::Status(g, t, None) if *g == k.0 && *t == k.1)),
        );
        out.push(TxnRecord::Status(k.0, k.1, Some(status.clone())));
        Ok((out, status))
    }

    /// How many target partitions of (group, txn) have no publisher yet: the producer ids a
    /// commit of it needs.
    pub fn publishers_needed(&self, group: &str, txn: &str) -> usize {
        let Some(records) = self.payloads.get(&(group.to_owned(), txn.to_owned())) else { return 0 };
        let targets: BTreeSet<&Tp> = records.iter().map(|r| &r.target).collect();
        targets.iter().filter(|t| !self.publishers.contains_key(**t)).count()
    }

    /// Pending transactions whose check is due at `now_ms`, earliest first, at most `max`.
    pub fn due_checks(&self, now_ms: i64, max: usize) -> Vec<DueCheck> {
        self.checks
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(max)
            .filter_map(|(_, k)| Some(DueCheck { key: k.clone(), checks: self.status.get(k)?.checks }))
            .collect()
    }

    /// The time of the earliest check, if any transaction is pending.
    pub fn next_check_ms(&self) -> Option<i64> {
        self.checks.first().map(|(at, _)| *at)
    }

    /// Records the next check of a pending transaction whose check is due (the attempt and the
    /// time of the one after), or, once `checks_max` went unanswered, applies the expiry policy.
    pub fn check(
        &self,
        group: &str,
        txn: &str,
        now_ms: i64,
        batch_limit: impl Fn(&Tp) -> usize,
        limits: &TxnLimits,
        spare_producer_ids: &[i64],
    ) -> Result<(Vec<TxnRecord>, Checked), TxnError> {
        let Some(s) = self.status(group, txn) else { return Ok((Vec::new(), Checked::Nothing)) };
        if s.state != TxnState::Pending || s.next_check_ms > now_ms {
            return Ok((Vec::new(), Checked::Nothing));
        }
        if s.checks >= limits.checks_max {
            let committed = limits.expiry == ExpiryPolicy::Commit;
            let state = TxnState::Expired { committed };
            let (records, _) = self.finish(group, txn, state, now_ms, batch_limit, limits, spare_producer_ids)?;
            return Ok((records, Checked::Expired { committed }));
        }
        let attempt = s.checks + 1;
        let status = TxnStatus {
            checks: attempt,
            next_check_ms: now_ms.saturating_add(limits.backoff_after(attempt)),
            ..s.clone()
        };
        Ok((vec![TxnRecord::Status(group.into(), txn.into(), Some(status))], Checked::Ask(attempt)))
    }

    /// Puts a transaction the expiry policy rolled back back to pending, checked again from the
    /// first attempt at once. One already pending is answered as it is.
    pub fn resume(&self, group: &str, txn: &str, now_ms: i64) -> Result<(Vec<TxnRecord>, TxnStatus), TxnError> {
        let s = self.status(group, txn).ok_or_else(|| TxnError::Unknown(txn.into()))?;
        match s.state {
            TxnState::Pending => Ok((Vec::new(), s.clone())),
            TxnState::Expired { committed: false } => {
                let status =
                    TxnStatus { state: TxnState::Pending, checks: 0, next_check_ms: now_ms, ended_ms: 0, ..s.clone() };
                Ok((vec![TxnRecord::Status(group.into(), txn.into(), Some(status.clone()))], status))
            }
            state => Err(TxnError::NotResumable { txn: txn.into(), state }),
        }
    }

    /// Transactions of `group` (every group when `None`), pending and expired ones always and
    /// ended ones when `ended`, in key order after `after`, at most `max`.
    pub fn list(&self, group: Option<&str>, ended: bool, after: Option<&TxnKey>, max: usize) -> Vec<Listed> {
        let start = match after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Unbounded,
        };
        self.status
            .range((start, std::ops::Bound::Unbounded))
            .filter(|((g, _), _)| group.is_none_or(|want| want == g))
            .filter(|(_, s)| ended || matches!(s.state, TxnState::Pending | TxnState::Expired { .. }))
            .take(max)
            .map(|((g, t), s)| Listed { group: g.clone(), txn: t.clone(), status: s.clone() })
            .collect()
    }

    /// Confirms that the committed record stamped `stamp` for `target` (and every earlier one
    /// there) is in the target partition.
    pub fn confirm_published(&self, target: &Tp, stamp: (i16, i32)) -> Vec<TxnRecord> {
        self.publishes
            .keys()
            .filter(|(tp, s)| tp == target && *s <= stamp)
            .map(|(tp, s)| TxnRecord::Publish(tp.clone(), *s, None))
            .collect()
    }
}

impl publish::Publishing for Txns {
    fn pending_publishes(&self, max: usize) -> Vec<publish::Pending> {
        let mut out: Vec<publish::Pending> = Vec::new();
        for ((tp, _), p) in &self.publishes {
            let same_batch = out.last().is_some_and(|l| {
                l.target == *tp && l.publish.batch_base.is_some() && l.publish.batch_base == p.batch_base
            });
            if out.len() >= max && !same_batch {
                break;
            }
            out.push(publish::Pending { key: KEY.to_owned(), target: tp.clone(), publish: p.clone() });
        }
        out
    }

    fn confirm_records(&self, _key: &str, target: &Tp, stamp: (i16, i32)) -> Vec<Record> {
        self.confirm_published(target, stamp).iter().map(TxnRecord::encode).collect()
    }

    fn creates_targets() -> bool {
        false
    }
}

impl Shard for Txns {
    fn replay(&mut self, offset: u64, record: &Record) -> Result<(), ReplayError> {
        let decoded = TxnRecord::decode(record).map_err(|reason| ReplayError { offset, reason })?;
        self.apply(decoded);
        Ok(())
    }

    fn keys(&self) -> Vec<String> {
        vec![KEY.to_owned()]
    }

    fn live_records(&self, key: &str) -> Vec<Record> {
        if key != KEY {
            return Vec::new();
        }
        let mut live: Vec<TxnRecord> = Vec::new();
        live.extend(self.payloads.iter().map(|((g, t), r)| TxnRecord::Payload(g.clone(), t.clone(), Some(r.clone()))));
        live.extend(self.status.iter().map(|((g, t), s)| TxnRecord::Status(g.clone(), t.clone(), Some(s.clone()))));
        live.extend(self.publishers.iter().map(|(tp, p)| TxnRecord::Publisher(tp.clone(), Some(p.clone()))));
        live.extend(self.publishes.iter().map(|((tp, s), p)| TxnRecord::Publish(tp.clone(), *s, Some(p.clone()))));
        let mut out: Vec<Record> = live.iter().map(TxnRecord::encode).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

#[cfg(test)]
mod tests;
