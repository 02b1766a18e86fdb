//! Transactional (half) messages: [`Transactions`] prepares records no consumer can see, and
//! commits or rolls them back once the producer's local transaction is decided; and it answers
//! the coordinator's check-backs for transactions whose END never came (a producer that crashed
//! between its local commit and the END), from whatever the application's own store says.
//!
//! ```no_run
//! # async fn example(config: keel_client::ClientConfig) -> Result<(), keel_client::ClientError> {
//! use keel_client::{ProducerRecord, TxnOutcome, Transactions};
//! let txns = Transactions::new(config, "payments")?;
//! // Answers check-backs for as long as it lives, from the application's own records.
//! let _checks = txns.serve_checks(|check| async move {
//!     let committed_locally = check.transaction_id.starts_with("paid-"); // look it up instead
//!     if committed_locally { TxnOutcome::Commit } else { TxnOutcome::Rollback }
//! });
//! txns.prepare("paid-42", vec![("payments".into(), ProducerRecord::new("order 42 paid"))], None).await?;
//! // ... commit the local database transaction, then:
//! txns.commit("paid-42").await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::v1 as pb;
use keel_proto::v1::groups_client::GroupsClient;
use keel_proto::v1::producer_client::ProducerClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::ClientConfig;
use crate::core::{Core, MESSAGE_BYTES_MAX};
use crate::error::ClientError;
use crate::partitioner::partition_for_key;
use crate::producer::ProducerRecord;

/// A check-back stream with nothing on it this long (coordinators send a keepalive every 3 s)
/// is dead: its coordinator crashed or is cut off without the connection breaking.
const SILENCE_MAX: Duration = Duration::from_secs(10);

/// A producer's local outcome of a transaction, as it answers a check-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The local transaction committed: publish the records.
    Commit,
    /// It rolled back or never happened: drop them.
    Rollback,
    /// Not decided yet: ask again after the backoff.
    Unknown,
}

/// Transactional messages of one producer group.
#[derive(Clone)]
pub struct Transactions {
    core: Arc<Core>,
    group: String,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions").field("group", &self.group).finish_non_exhaustive()
    }
}

/// Answers check-backs until dropped (or [`CheckServer::stop`]ped).
#[derive(Debug)]
pub struct CheckServer {
    task: JoinHandle<()>,
}

impl CheckServer {
    /// Stops answering (the coordinator then checks another producer of the group, if any).
    pub fn stop(self) {}
}

impl Drop for CheckServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Transactions {
    /// Transactions of producer `group` (validated like a topic name by the cluster).
    pub fn new(config: ClientConfig, group: impl Into<String>) -> Result<Transactions, ClientError> {
        Ok(Transactions { core: Arc::new(Core::new(config, 0x7478_6e73)?), group: group.into() })
    }

    /// The producer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Prepares `records` (each with its topic; partitions chosen like [`crate::Producer::send`]
    /// chooses them) under `transaction_id`, invisible to consumers until [`Transactions::commit`].
    /// The first check-back may come `timeout` after (the cluster's default when `None`).
    /// Retries are safe: a prepare repeated with the same records is answered with the
    /// transaction's status.
    pub async fn prepare(
        &self,
        transaction_id: &str,
        records: Vec<(String, ProducerRecord)>,
        timeout: Option<Duration>,
    ) -> Result<pb::TxnStatus, ClientError> {
        let mut parts: Vec<pb::TxnPartitionRecords> = Vec::new();
        for (topic, r) in records {
            let count = self.core.partition_count(&topic).await?;
            let partition = match (r.partition, &r.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partition_for_key(key, count),
                (None, None) => self.core.random_below(count),
            };
            let record = pb::Record {
                key: r.key,
                value: r.value,
                headers: r.headers.into_iter().map(|(key, value)| pb::Header { key, value }).collect(),
                timestamp_ms: r.timestamp_ms,
            };
            match parts.iter_mut().find(|p| p.topic == topic && p.partition == partition) {
                Some(p) => p.records.push(record),
                None => parts.push(pb::TxnPartitionRecords { topic, partition, records: vec![record] }),
            }
        }
        let request = pb::PrepareTxnRequest {
            group: self.group.clone(),
            transaction_id: transaction_id.to_owned(),
            records: parts,
            timeout_ms: timeout.map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1)),
        };
        self.core
            .call_any("prepare transaction", |channel| {
                let request = request.clone();
                async move { producer(channel).prepare_txn(request).await }
            })
            .await
    }

    /// Commits a prepared transaction: its records become visible, once each. Repeating a
    /// commit succeeds again; a commit of a rolled-back transaction is refused
    /// (`TXN_CONTRADICTS`), of one the expiry policy rolled back too (`TXN_EXPIRED`).
    pub async fn commit(&self, transaction_id: &str) -> Result<pb::TxnStatus, ClientError> {
        self.end(transaction_id, true).await
    }

    /// Rolls a prepared transaction back: its records are never visible.
    pub async fn rollback(&self, transaction_id: &str) -> Result<pb::TxnStatus, ClientError> {
        self.end(transaction_id, false).await
    }

    async fn end(&self, transaction_id: &str, commit: bool) -> Result<pb::TxnStatus, ClientError> {
        let request =
            pb::EndTxnRequest { group: self.group.clone(), transaction_id: transaction_id.to_owned(), commit };
        self.core
            .call_any("end transaction", |channel| {
                let request = request.clone();
                async move { producer(channel).end_txn(request).await }
            })
            .await
    }

    /// Answers the coordinator's check-backs with `answer` (called once per check, one at a
    /// time) until the returned handle is dropped: keeps a stream open to the coordinator of the
    /// group's transactions, following it when it moves.
    pub fn serve_checks<F, Fut>(&self, answer: F) -> CheckServer
    where
        F: Fn(pb::TxnCheck) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TxnOutcome> + Send + 'static,
    {
        let (core, group) = (Arc::clone(&self.core), self.group.clone());
        let task = tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                match serve_once(&core, &group, &answer).await {
                    Ok(answered) if answered > 0 => attempt = 0,
                    Ok(_) => {}
                    Err(e) => debug!(group, error = %e, "check-back stream ended; reopening"),
                }
                tokio::time::sleep(core.backoff(attempt)).await;
                attempt = attempt.saturating_add(1).min(8);
            }
        });
        CheckServer { task }
    }

    /// Transactions pending or expired (and ended ones when `include_ended`) of this group.
    pub async fn list(&self, include_ended: bool) -> Result<Vec<pb::TxnStatus>, ClientError> {
        list_txns(&self.core, Some(&self.group), include_ended).await
    }

    /// Puts a transaction the expiry policy rolled back back to pending: the group is checked
    /// again at once.
    pub async fn resume(&self, transaction_id: &str) -> Result<pb::TxnStatus, ClientError> {
        resume_txn(&self.core, &self.group, transaction_id).await
    }
}

fn producer(channel: crate::core::Conn) -> ProducerClient<crate::core::Conn> {
    ProducerClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// Every transaction listed (all pages), of one group or all.
pub(crate) async fn list_txns(
    core: &Core,
    group: Option<&str>,
    include_ended: bool,
) -> Result<Vec<pb::TxnStatus>, ClientError> {
    let mut out: Vec<pb::TxnStatus> = Vec::new();
    loop {
        let last = out.last();
        let request = pb::ListTxnsRequest {
            group: group.unwrap_or_default().to_owned(),
            include_ended,
            after_group: last.map(|t| t.group.clone()).unwrap_or_default(),
            after_transaction_id: last.map(|t| t.transaction_id.clone()).unwrap_or_default(),
            limit: 1_000,
            partition: None,
        };
        let page = core
            .call_any("list transactions", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).list_txns(request).await }
            })
            .await?;
        out.extend(page.transactions);
        if !page.more {
            return Ok(out);
        }
    }
}

/// Resumes one transaction of `group`.
pub(crate) async fn resume_txn(core: &Core, group: &str, transaction_id: &str) -> Result<pb::TxnStatus, ClientError> {
    let request = pb::ResumeTxnRequest { group: group.to_owned(), transaction_id: transaction_id.to_owned() };
    core.call_any("resume transaction", |channel| {
        let request = request.clone();
        async move { Core::admin(channel).resume_txn(request).await }
    })
    .await
}

/// Finds the group's transaction coordinator, opens a check-back stream there and answers checks
/// until it ends; returns how many were answered.
async fn serve_once<F, Fut>(core: &Core, group: &str, answer: &F) -> Result<u64, ClientError>
where
    F: Fn(pb::TxnCheck) -> Fut,
    Fut: Future<Output = TxnOutcome>,
{
    let request = pb::FindCoordinatorRequest {
        group: group.to_owned(),
        kind: pb::CoordinatorKind::CoordinatorTransactions as i32,
    };
    let found = core
        .call_any("find transaction coordinator", |channel| {
            let request = request.clone();
            async move { GroupsClient::new(channel).find_coordinator(request).await }
        })
        .await?;
    if found.coordinator_addr.is_empty() {
        return Err(ClientError::Unavailable(format!("producer group {group:?} has no transaction coordinator yet")));
    }
    let addr = found.coordinator_addr;
    let (answers, answers_rx) = mpsc::unbounded_channel::<pb::TxnCheckAnswer>();
    let outbound = futures_util::stream::unfold(answers_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let _ = answers.send(pb::TxnCheckAnswer { group: group.to_owned(), ..Default::default() });
    let channel = core.channel(&addr)?;
    let opened = tokio::time::timeout(core.config.request_timeout, producer(channel).txn_checks(outbound)).await;
    let mut inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(ClientError::from(status)),
        Err(_) => {
            core.drop_channel(&addr);
            return Err(ClientError::timeout(
                format!("opening a check-back stream to {addr}"),
                core.config.request_timeout,
            ));
        }
    };
    info!(group, addr, "answering check-backs");
    let mut answered = 0u64;
    loop {
        let check = match tokio::time::timeout(SILENCE_MAX, inbound.message()).await {
            Ok(Ok(Some(check))) if check.transaction_id.is_empty() => continue,
            Ok(Ok(Some(check))) => check,
            Ok(Ok(None)) => return Ok(answered),
            Ok(Err(status)) => {
                let e = ClientError::from(status);
                if e.breaks_connection() {
                    core.drop_channel(&addr);
                }
                return if answered > 0 { Ok(answered) } else { Err(e) };
            }
            Err(_) => {
                // Not even a keepalive: the coordinator died or is cut off with the connection
                // still up. Find the coordinator again.
                core.drop_channel(&addr);
                return Err(ClientError::timeout(format!("check-back stream to {addr} (no keepalive)"), SILENCE_MAX));
            }
        };
        let transaction_id = check.transaction_id.clone();
        let outcome = match answer(check).await {
            TxnOutcome::Commit => pb::TxnOutcome::TxnCommit,
            TxnOutcome::Rollback => pb::TxnOutcome::TxnRollback,
            TxnOutcome::Unknown => pb::TxnOutcome::TxnUnknown,
        };
        debug!(group, transaction_id, ?outcome, "check-back answered");
        answered += 1;
        let reply = pb::TxnCheckAnswer { group: group.to_owned(), transaction_id, outcome: outcome as i32 };
        if answers.send(reply).is_err() {
            warn!(group, "check-back stream closed while answering");
            return Ok(answered);
        }
    }
}
