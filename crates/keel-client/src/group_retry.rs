//! Retry and dead letter, the member's side (keel.proto, "Retry and dead letter"). A record
//! whose processing failed is reported with [`GroupConsumer::nack`]; the coordinator records the
//! attempt and hands the record back after a backoff (to whichever member owns its partition
//! then), or publishes it once to the group's dead-letter topic `<group>.dlq`.
//! [`GroupConsumer::process`] is the loop that does all of it: poll, run the handler, ack or
//! nack each record, then commit.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use keel_proto::v1 as pb;
use tracing::{debug, warn};

use super::{GroupConsumer, TopicPartition, lock};
use crate::consumer::{ConsumerRecord, Offset};
use crate::error::ClientError;

/// How failed records are retried; a record's first failure fixes its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first delivery included (1 = dead-letter at the first failure).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each further one (jittered into its
    /// upper half by the coordinator).
    pub backoff_min: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, backoff_min: Duration::from_secs(1), backoff_max: Duration::from_secs(60) }
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Why a handler could not process a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong (the dead letter's `keel-last-error` header).
    pub message: String,
    /// Whether another attempt may succeed; `false` dead-letters the record at once.
    pub retryable: bool,
}

impl HandlerError {
    /// A failure another attempt may not repeat (a timeout, a busy dependency).
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), retryable: true }
    }

    /// A failure no attempt can fix (a malformed record): dead-lettered at once.
    pub fn fatal(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), retryable: false }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.retryable { "retryable" } else { "not retryable" };
        write!(f, "{} ({kind})", self.message)
    }
}

impl std::error::Error for HandlerError {}

/// What the coordinator recorded for a nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackOutcome {
    /// Failed attempts recorded for the record so far.
    pub attempts: u32,
    /// Whether it goes (or went) to the dead-letter topic instead of another attempt.
    pub dead_lettered: bool,
    /// When the next attempt is due (coordinator clock, ms since the epoch).
    pub next_attempt_at_ms: Option<i64>,
}

/// What one [`GroupConsumer::process`] round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessSummary {
    /// Records the handler processed.
    pub processed: usize,
    /// Records that failed and will be attempted again.
    pub retried: usize,
    /// Records that failed for the last time and went to the dead-letter topic.
    pub dead_lettered: usize,
}

type Redelivery = (TopicPartition, u64, u32);

/// The refusal of a nack or ack for a record whose outcome is already decided.
pub const RECORD_SETTLED: &str = "RECORD_SETTLED";

fn key_of(record: &ConsumerRecord) -> Redelivery {
    ((record.topic.clone(), record.partition), record.offset, record.attempt)
}

impl GroupConsumer {
    /// Reports that processing `record` failed: the coordinator records the attempt and hands
    /// the record back after the backoff of [`crate::GroupConfig::retry`], or, on its last
    /// attempt or when `retryable` is false, publishes it once to `<group>.dlq`. Returns once
    /// the coordinator's quorum recorded it; a retried call is recorded once. Commit past a
    /// failed record only after its nack returned: the commit then no longer holds it.
    pub async fn nack(
        &mut self,
        record: &ConsumerRecord,
        error: &str,
        retryable: bool,
    ) -> Result<NackOutcome, ClientError> {
        let (member_id, member_epoch) = {
            let s = lock(&self.shared);
            (s.member_id.clone(), s.epoch)
        };
        let policy = self.config.retry;
        let request = pb::NackRequest {
            group: self.config.group.clone(),
            member_id,
            member_epoch,
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            attempt: record.attempt,
            error: error.to_owned(),
            retryable,
            policy: Some(pb::RetryPolicy {
                max_attempts: policy.max_attempts,
                backoff_min_ms: millis(policy.backoff_min),
                backoff_max_ms: millis(policy.backoff_max),
            }),
            record: Some(pb::Record {
                key: record.key.clone(),
                value: record.value.clone(),
                headers: record.headers.iter().map(|(k, v)| pb::Header { key: k.clone(), value: v.clone() }).collect(),
                timestamp_ms: record.timestamp_ms,
            }),
        };
        let r = self
            .route
            .call(|mut c| {
                let request = request.clone();
                async move { c.nack(request).await }
            })
            .await
            .inspect_err(|_| {
                // Not recorded: the coordinator lists a redelivery again and it comes back.
                self.in_progress.remove(&key_of(record));
            })?;
        self.settled(record);
        Ok(NackOutcome { attempts: r.attempts, dead_lettered: r.dead_lettered, next_attempt_at_ms: r.due_at_ms })
    }

    /// Reports that a redelivered record (`attempt` > 1) was processed: it is neither handed
    /// back nor dead-lettered again. Records of their first attempt are acknowledged by the
    /// commit, and this returns at once for them.
    pub async fn ack(&mut self, record: &ConsumerRecord) -> Result<(), ClientError> {
        if record.attempt <= 1 {
            return Ok(());
        }
        let (member_id, member_epoch) = {
            let s = lock(&self.shared);
            (s.member_id.clone(), s.epoch)
        };
        let request = pb::AckRedeliveryRequest {
            group: self.config.group.clone(),
            member_id,
            member_epoch,
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            attempt: record.attempt,
        };
        self.route
            .call(|mut c| {
                let request = request.clone();
                async move { c.ack_redelivery(request).await }
            })
            .await
            .inspect_err(|_| {
                self.in_progress.remove(&key_of(record));
            })?;
        self.settled(record);
        Ok(())
    }

    fn settled(&mut self, record: &ConsumerRecord) {
        let key = key_of(record);
        if self.in_progress.remove(&key) {
            self.settled_here.insert(key);
        }
    }

    /// The redeliveries the last heartbeat listed that this member owns and is not already
    /// processing, fetched from their partitions (`attempt` set).
    pub(super) async fn take_redeliveries(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        let listed: Vec<Redelivery> = lock(&self.shared).redeliveries.clone();
        let listed_set: BTreeSet<&Redelivery> = listed.iter().collect();
        // What the coordinator no longer lists is settled there: forget it here too.
        self.settled_here.retain(|k| listed_set.contains(k));
        self.in_progress.retain(|k| listed_set.contains(k));
        let mut out = Vec::new();
        for key in listed {
            let (tp, offset, attempt) = &key;
            if !self.owned.contains(tp) || self.in_progress.contains(&key) || self.settled_here.contains(&key) {
                continue;
            }
            let fetched = match self.consumer.fetch(&tp.0, tp.1, *offset).await {
                Ok(f) if *offset >= f.log_start_offset && !f.records.iter().any(|r| r.offset == *offset) => {
                    // Still in the log but not served: a new leader whose high watermark has not
                    // caught up answers a long poll with nothing. Dead-lettering it as gone would
                    // lose a record that can still succeed (simulation seeds 160 and 193).
                    debug!(
                        group = self.config.group,
                        topic = tp.0,
                        partition = tp.1,
                        offset,
                        "a redelivery is not readable yet"
                    );
                    continue;
                }
                Ok(f) => f.records.into_iter().find(|r| r.offset == *offset),
                Err(ClientError::OutOfRange(_)) => None,
                Err(e) if e.is_retriable() => {
                    debug!(group = self.config.group, error = %e, "a redelivery could not be fetched yet");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(mut record) = fetched else {
                // Retention removed it before its next attempt: dead-letter what is known (its
                // origin), so that the loss is visible instead of silent.
                warn!(
                    group = self.config.group,
                    topic = tp.0,
                    partition = tp.1,
                    offset,
                    "a failed record left the log before its next attempt"
                );
                let gone = ConsumerRecord {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    offset: *offset,
                    timestamp_ms: 0,
                    key: None,
                    value: None,
                    headers: Vec::new(),
                    producer: None,
                    attempt: *attempt,
                };
                self.in_progress.insert(key.clone());
                self.nack(&gone, "the record left the log before its next attempt", false).await?;
                continue;
            };
            record.attempt = *attempt;
            self.in_progress.insert(key.clone());
            out.push(record);
        }
        Ok(out)
    }

    /// One round of the processing loop: polls up to `timeout`, runs `handler` on each record
    /// in order, acks or nacks each by its outcome, then commits what was settled. A record
    /// whose nack could not be recorded is read again (its partition seeks back to it) and the
    /// error is returned after the commit of what came before it. Call it in a loop.
    pub async fn process<F, Fut>(&mut self, timeout: Duration, mut handler: F) -> Result<ProcessSummary, ClientError>
    where
        F: FnMut(&ConsumerRecord) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let records = self.poll(timeout).await?;
        let mut summary = ProcessSummary::default();
        let mut commit: BTreeMap<TopicPartition, u64> = BTreeMap::new();
        let mut stopped: BTreeSet<TopicPartition> = BTreeSet::new();
        let mut first_error = None;
        for record in &records {
            let tp = (record.topic.clone(), record.partition);
            if stopped.contains(&tp) {
                continue;
            }
            let settled = match handler(record).await {
                Ok(()) => self.ack(record).await.map(|()| summary.processed += 1),
                Err(e) => self.nack(record, &e.message, e.retryable).await.map(|o| {
                    if o.dead_lettered {
                        summary.dead_lettered += 1;
                    } else {
                        summary.retried += 1;
                    }
                }),
            };
            let settled = match settled {
                // Its outcome was decided before (a record read again from a commit below it):
                // nothing left to do for it.
                Err(e) if e.group_reason() == Some(RECORD_SETTLED) => {
                    debug!(group = self.config.group, error = %e, "record already settled");
                    self.in_progress.remove(&key_of(record));
                    Ok(())
                }
                other => other,
            };
            match settled {
                Ok(()) if record.attempt == 1 => {
                    commit.insert(tp, record.offset + 1);
                }
                Ok(()) => {}
                Err(e) => {
                    warn!(group = self.config.group, topic = record.topic, partition = record.partition, offset = record.offset, error = %e, "a record's outcome could not be recorded; it will be processed again");
                    if record.attempt == 1 {
                        self.consumer.seek(&record.topic, record.partition, Offset::At(record.offset))?;
                        stopped.insert(tp);
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        if !commit.is_empty() {
            self.commit_offsets(&commit).await?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}
