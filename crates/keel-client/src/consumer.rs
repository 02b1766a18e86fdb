//! The consumer: one `Subscribe` stream per assigned partition feeds a bounded channel that
//! `poll` drains. Each offset is returned once and in order: a partition's task tracks the next
//! offset it wants, drops anything below it, and resubscribes from it after any failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::core::Conn as Channel;
use bytes::Bytes;
use keel_proto::v1 as pb;
use keel_proto::v1::consumer_client::ConsumerClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::config::ClientConfig;
use crate::core::{Core, MESSAGE_BYTES_MAX};
use crate::error::ClientError;

/// Salt of the consumer's random stream (see [`Core::new`]).
const SALT: u64 = 0xc0de;
/// Messages buffered between the partition tasks and `poll`, each up to `fetch_bytes_max`.
const EVENTS_MAX: usize = 32;
/// Most records one `poll` returns; the rest wait for the next.
const POLL_RECORDS_MAX: usize = 100_000;

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// The first offset still in the log.
    Beginning,
    /// The high watermark: only records committed from now on.
    End,
    /// This offset.
    At(u64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Size bound of one fetched message.
    pub fetch_bytes_max: u32,
    /// How long a [`Consumer::fetch`] waits for records when there are none yet.
    pub fetch_wait_max: Duration,
    /// Where newly assigned partitions start.
    pub offset_default: Offset,
}

impl Default for ConsumerConfig {
    fn default() -> ConsumerConfig {
        ConsumerConfig {
            fetch_bytes_max: 1 << 20,
            fetch_wait_max: Duration::from_millis(500),
            offset_default: Offset::Beginning,
        }
    }
}

impl ConsumerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.fetch_bytes_max == 0 {
            return Err(ClientError::Config("fetch_bytes_max must be positive".into()));
        }
        if u32::try_from(self.fetch_wait_max.as_millis()).is_err() {
            return Err(ClientError::Config("fetch_wait_max is too long".into()));
        }
        Ok(())
    }
}

/// A record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The idempotent producer that wrote it, with the record's own sequence (what `keel audit`
    /// checks for gaps and duplicates); `None` for records written without one.
    pub producer: Option<RecordProducer>,
    /// Which delivery attempt this is: 1 as first consumed; 2 and up for a failed record a
    /// consumer group hands back for another attempt ([`crate::GroupConsumer::nack`]).
    pub attempt: u32,
}

/// The idempotent producer stamp of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordProducer {
    /// Producer id.
    pub id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// The record's sequence: its batch's base sequence plus its place in the batch (mod 2^31).
    pub sequence: i32,
}

/// The answer of one [`Consumer::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResult {
    /// Records from the requested offset on, in offset order.
    pub records: Vec<ConsumerRecord>,
    /// Every offset below this is committed.
    pub high_watermark: u64,
    /// The first offset still in the log.
    pub log_start_offset: u64,
    /// Where the next fetch should start.
    pub next_offset: u64,
}

/// What a partition task tells `poll`. The generation tells events of a superseded task
/// (before a seek) from the current one.
#[derive(Debug)]
enum Event {
    Started { topic: String, partition: u32, generation: u64, offset: u64 },
    Records { topic: String, partition: u32, generation: u64, records: Vec<ConsumerRecord> },
    Failed { topic: String, partition: u32, generation: u64, error: ClientError },
}

struct Assigned {
    generation: u64,
    /// The next offset `poll` returns; unknown until Beginning or End is resolved.
    position: Option<u64>,
    task: JoinHandle<()>,
}

/// Reads records from assigned partitions.
pub struct Consumer {
    core: Arc<Core>,
    config: ConsumerConfig,
    assigned: BTreeMap<(String, u32), Assigned>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    next_generation: u64,
    /// An error that arrived while `poll` had records to return: reported by the next `poll`.
    deferred: Option<ClientError>,
    /// With [`Consumer::verify_sequences`]: per partition, the next offset to audit and the
    /// audit of the producer sequences of every record `poll` returned.
    audits: Option<BTreeMap<(String, u32), (u64, keel_record::audit::PartitionAudit)>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("config", &self.config).field("assigned", &self.assignment()).finish()
    }
}

impl Consumer {
    /// A consumer with nothing assigned. Must be created inside a tokio runtime.
    pub fn new(config: ClientConfig, consumer: ConsumerConfig) -> Result<Consumer, ClientError> {
        consumer.validate()?;
        tokio::runtime::Handle::try_current()
            .map_err(|_| ClientError::Config("a Consumer must be created inside a tokio runtime".into()))?;
        let (events_tx, events) = mpsc::channel(EVENTS_MAX);
        Ok(Consumer {
            core: Arc::new(Core::new(config, SALT)?),
            config: consumer,
            assigned: BTreeMap::new(),
            events,
            events_tx,
            next_generation: 0,
            deferred: None,
            audits: None,
        })
    }

    /// Reads `partitions` of `topic` (every partition when empty), replacing this topic's
    /// previous assignment. New partitions start at `offset_default`; partitions already
    /// assigned keep their position.
    pub async fn assign(&mut self, topic: &str, partitions: &[u32]) -> Result<(), ClientError> {
        let mut all = self.core.partitions(topic).await?;
        if partitions.iter().any(|p| !all.contains(p)) {
            // The cache may predate added partitions.
            self.core.refresh().await?;
            all = self.core.partitions(topic).await?;
        }
        let wanted: Vec<u32> = if partitions.is_empty() { all.clone() } else { partitions.to_vec() };
        if let Some(missing) = wanted.iter().find(|p| !all.contains(p)) {
            return Err(ClientError::NotFound(format!("no partition {missing} in topic {topic:?}")));
        }
        let dropped: Vec<(String, u32)> =
            self.assigned.keys().filter(|(t, p)| t == topic && !wanted.contains(p)).cloned().collect();
        for key in dropped {
            if let Some(a) = self.assigned.remove(&key) {
                a.task.abort();
            }
        }
        for partition in wanted {
            if !self.assigned.contains_key(&(topic.to_owned(), partition)) {
                self.start(topic, partition, self.config.offset_default);
            }
        }
        Ok(())
    }

    /// Stops reading every partition of `topic`.
    pub fn unassign(&mut self, topic: &str) {
        self.assigned.retain(|(t, _), a| {
            if t == topic {
                a.task.abort();
            }
            t != topic
        });
    }

    /// Stops reading the partitions of `topic` that are not in `partitions` (others keep
    /// their positions).
    pub fn retain(&mut self, topic: &str, partitions: &[u32]) {
        self.assigned.retain(|(t, p), a| {
            let keep = t != topic || partitions.contains(p);
            if !keep {
                a.task.abort();
            }
            keep
        });
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.assigned.keys().cloned().collect()
    }

    /// Moves an assigned partition: the next records `poll` returns for it start at `offset`.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: Offset) -> Result<(), ClientError> {
        if !self.assigned.contains_key(&(topic.to_owned(), partition)) {
            return Err(ClientError::InvalidArgument(format!("{topic}/{partition} is not assigned")));
        }
        self.start(topic, partition, offset);
        Ok(())
    }

    /// The offset of the next record `poll` returns for the partition (`None` when it is not
    /// assigned, or its Beginning or End is not resolved yet).
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assigned.get(&(topic.to_owned(), partition)).and_then(|a| a.position)
    }

    fn start(&mut self, topic: &str, partition: u32, offset: Offset) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let task = PartitionTask {
            core: self.core.clone(),
            config: self.config.clone(),
            topic: topic.to_owned(),
            partition,
            generation,
            events: self.events_tx.clone(),
        };
        let handle = tokio::spawn(task.run(offset));
        let position = match offset {
            Offset::At(o) => Some(o),
            Offset::Beginning | Offset::End => None,
        };
        if let Some(old) =
            self.assigned.insert((topic.to_owned(), partition), Assigned { generation, position, task: handle })
        {
            old.task.abort();
        }
    }

    /// Waits up to `timeout` for records and returns what has arrived: in offset order within
    /// each partition, every offset once. An empty vector means nothing arrived in time.
    ///
    /// A partition that failed for good (its offset fell below the log start, its topic was
    /// deleted) is reported here once and then stays silent until it is sought.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>, ClientError> {
        if let Some(error) = self.deferred.take() {
            return Err(error);
        }
        if self.assigned.is_empty() {
            return Err(ClientError::InvalidArgument("poll without any assigned partition".into()));
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < POLL_RECORDS_MAX {
            let event = if out.is_empty() {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(event)) => event,
                    // The sender half lives in `self`: the channel cannot close.
                    Ok(None) | Err(_) => break,
                }
            } else {
                match self.events.try_recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            };
            if let Err(error) = self.apply(event, &mut out) {
                if out.is_empty() {
                    return Err(error);
                }
                self.deferred = Some(error);
                break;
            }
        }
        Ok(out)
    }

    fn apply(&mut self, event: Event, out: &mut Vec<ConsumerRecord>) -> Result<(), ClientError> {
        let (topic, partition, generation) = match &event {
            Event::Started { topic, partition, generation, .. }
            | Event::Records { topic, partition, generation, .. }
            | Event::Failed { topic, partition, generation, .. } => (topic, *partition, *generation),
        };
        let Some(assigned) = self.assigned.get_mut(&(topic.clone(), partition)) else { return Ok(()) };
        if assigned.generation != generation {
            return Ok(());
        }
        match event {
            Event::Started { offset, .. } => {
                assigned.position = Some(offset);
            }
            Event::Records { records, .. } => {
                for record in records {
                    let position = assigned.position.unwrap_or(record.offset);
                    if record.offset < position {
                        // The task already filters; this guards the once-only promise anyway.
                        debug_assert!(false, "partition task repeated offset {}", record.offset);
                        continue;
                    }
                    assigned.position = Some(record.offset + 1);
                    if let Some(audits) = &mut self.audits {
                        let (next, audit) = audits.entry((record.topic.clone(), record.partition)).or_default();
                        // A seek back delivers offsets again: each offset is audited once, so
                        // only copies at other offsets count as duplicates.
                        if record.offset >= *next {
                            *next = record.offset + 1;
                            audit.record(record.offset, record.producer.map(|p| (p.id, p.epoch, p.sequence)));
                        }
                    }
                    out.push(record);
                }
            }
            Event::Failed { error, .. } => return Err(error),
        }
        Ok(())
    }

    /// Checks the producer sequences of every record `poll` returns from now on, as `keel audit`
    /// does over a whole partition: per idempotent producer, gaps (something acknowledged may be
    /// missing from what this consumer read) and duplicates (the same sequence at two offsets).
    /// Memory grows with producers and holes, not records. [`Consumer::sequence_report`] tells.
    pub fn verify_sequences(&mut self) {
        self.audits.get_or_insert_with(BTreeMap::new);
    }

    /// What [`Consumer::verify_sequences`] found so far, per (topic, partition); empty when it
    /// was not turned on. A partition read from the middle of a producer's sequence starts its
    /// audit there: only holes after the first record read count as gaps.
    pub fn sequence_report(&self) -> BTreeMap<(String, u32), keel_record::audit::PartitionReport> {
        self.audits.iter().flatten().map(|(k, (_, audit))| (k.clone(), audit.report())).collect()
    }

    /// Reads once from `offset` with a unary Fetch (waiting up to `fetch_wait_max` when there
    /// is nothing yet), following the leader and retrying retriable errors.
    pub async fn fetch(&self, topic: &str, partition: u32, offset: u64) -> Result<FetchResult, ClientError> {
        let request = pb::FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes: self.config.fetch_bytes_max,
            max_wait_ms: u32::try_from(self.config.fetch_wait_max.as_millis()).unwrap_or(u32::MAX),
            format: pb::FetchFormat::Batches as i32,
        };
        let response = fetch_with_retries(&self.core, &request, self.config.fetch_wait_max).await?;
        let (records, _) = decode(topic, partition, &response, offset)?;
        Ok(FetchResult {
            records,
            high_watermark: response.high_watermark,
            log_start_offset: response.log_start_offset,
            next_offset: response.next_offset,
        })
    }

    /// The partition's log start offset and high watermark, from its leader.
    pub async fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), ClientError> {
        watermarks(&self.core, topic, partition).await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        for assigned in self.assigned.values() {
            assigned.task.abort();
        }
    }
}

fn consumer_client(channel: Channel) -> ConsumerClient<Channel> {
    ConsumerClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// A unary Fetch to the partition's leader, re-resolving the leader and backing off on
/// retriable errors until `request_timeout` has passed.
async fn fetch_with_retries(
    core: &Core,
    request: &pb::FetchRequest,
    wait: Duration,
) -> Result<pb::FetchResponse, ClientError> {
    let budget = core.config.request_timeout;
    let deadline = Instant::now() + budget;
    let mut attempt = 0u32;
    loop {
        let result = match core.leader(&request.topic, request.partition).await {
            Ok(addr) => {
                let request = request.clone();
                core.call(&addr, budget + wait, |channel| async move { consumer_client(channel).fetch(request).await })
                    .await
            }
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(response) => return Ok(response),
            Err(e) => e,
        };
        if error.stale_metadata() {
            core.leader_moved(&request.topic, request.partition, &error);
        }
        let retriable = error.is_retriable() || matches!(error, ClientError::NotFound(_)) && attempt == 0;
        let pause = core.backoff(attempt).max(error.retry_after().unwrap_or_default());
        if !retriable || Instant::now() + pause >= deadline {
            return Err(error);
        }
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(pause).await;
    }
}

/// The log start and high watermark: a Fetch at offset 0 answers with both; when offset 0 is
/// gone (retention), the leader's DescribeTopic gives the log start and a Fetch there the rest.
async fn watermarks(core: &Core, topic: &str, partition: u32) -> Result<(u64, u64), ClientError> {
    let at = |offset| pb::FetchRequest {
        topic: topic.to_owned(),
        partition,
        offset,
        max_bytes: 1,
        max_wait_ms: 0,
        format: pb::FetchFormat::Batches as i32,
    };
    match fetch_with_retries(core, &at(0), Duration::ZERO).await {
        Ok(r) => Ok((r.log_start_offset, r.high_watermark)),
        Err(ClientError::OutOfRange(_)) => {
            let addr = core.leader(topic, partition).await?;
            let request = pb::DescribeTopicRequest { name: topic.to_owned() };
            let described = core
                .call(&addr, core.config.request_timeout, |channel| async move {
                    Core::admin(channel).describe_topic(request).await
                })
                .await?;
            let log_start = described
                .topic
                .iter()
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == partition)
                .map(|p| p.log_start_offset)
                .ok_or_else(|| ClientError::NotFound(format!("no partition {partition} in topic {topic:?}")))?;
            let r = fetch_with_retries(core, &at(log_start), Duration::ZERO).await?;
            Ok((r.log_start_offset, r.high_watermark))
        }
        Err(e) => Err(e),
    }
}

/// Turns a FetchResponse into records at or after `next`, skipping raft-only and control
/// batches. Returns the records and the next offset wanted after them.
fn decode(
    topic: &str,
    partition: u32,
    response: &pb::FetchResponse,
    mut next: u64,
) -> Result<(Vec<ConsumerRecord>, u64), ClientError> {
    let corrupt =
        |e: keel_record::DecodeError| ClientError::Protocol(format!("{topic}/{partition}: corrupt batch: {e}"));
    let mut out = Vec::new();
    // Offsets are dense (raft-only batches take none, control batches are skipped explicitly):
    // a gap means records the consumer would silently skip, so it is an error, not a warning.
    let mut take = |offset: u64, record: ConsumerRecord, next: &mut u64| {
        if offset < *next {
            return Ok(());
        }
        if offset > *next {
            return Err(ClientError::Protocol(format!(
                "{topic}/{partition}: the broker skipped offsets {}..{offset}; not reading past the gap",
                *next
            )));
        }
        *next = offset + 1;
        out.push(record);
        Ok(())
    };
    for bytes in &response.batches {
        for batch in keel_record::batches(bytes.clone()) {
            let batch = batch.map_err(corrupt)?;
            let header = *batch.header();
            if header.attributes.is_raft_entry() || header.next_offset() <= next {
                continue;
            }
            if header.attributes.is_control() {
                // Transaction markers take offsets but are not records for the application.
                next = next.max(header.next_offset());
                continue;
            }
            for record in batch.records() {
                let record = record.map_err(corrupt)?;
                let headers = record
                    .headers
                    .into_iter()
                    .map(|h| (String::from_utf8_lossy(&h.key).into_owned(), h.value))
                    .collect();
                let offset = record.offset;
                let producer =
                    header.producer_stamp(offset).map(|(id, epoch, sequence)| RecordProducer { id, epoch, sequence });
                let record = ConsumerRecord {
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers,
                    producer,
                    attempt: 1,
                };
                take(offset, record, &mut next)?;
            }
        }
    }
    // A broker that ignores the requested format answers with decoded records.
    for r in &response.records {
        let record = ConsumerRecord {
            topic: topic.to_owned(),
            partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.iter().map(|h| (h.key.clone(), h.value.clone())).collect(),
            // The decoded-records format does not carry producer stamps.
            producer: None,
            attempt: 1,
        };
        take(r.offset, record, &mut next)?;
    }
    Ok((out, next))
}

/// Reads one partition for one generation of the assignment.
struct PartitionTask {
    core: Arc<Core>,
    config: ConsumerConfig,
    topic: String,
    partition: u32,
    generation: u64,
    events: mpsc::Sender<Event>,
}

/// Why a subscription ended.
enum Ended {
    /// The consumer is gone.
    Stop,
    /// No message for `request_timeout`: subscribe again at once, nothing is known to be wrong.
    Quiet,
    /// The stream failed; `progressed` when it delivered records first.
    Failed { error: ClientError, progressed: bool },
}

impl PartitionTask {
    async fn run(self, start: Offset) {
        let Some(mut next) = self.resolve(start).await else { return };
        let started = Event::Started {
            topic: self.topic.clone(),
            partition: self.partition,
            generation: self.generation,
            offset: next,
        };
        if self.events.send(started).await.is_err() {
            return;
        }
        let mut attempt = 0u32;
        let mut not_found = 0u32;
        let mut beyond_end_since: Option<Instant> = None;
        loop {
            let (error, progressed) = match self.subscribe(&mut next).await {
                Ended::Stop => return,
                Ended::Quiet => continue,
                Ended::Failed { error, progressed } => (error, progressed),
            };
            if progressed {
                attempt = 0;
                not_found = 0;
                beyond_end_since = None;
            }
            debug!(topic = self.topic, partition = self.partition, next, %error, "subscription ended");
            if error.stale_metadata() {
                self.core.leader_moved(&self.topic, self.partition, &error);
            }
            let retriable = match &error {
                e if e.is_retriable() => true,
                // Once: a new partition's leader may not know it yet. The forgotten leader makes
                // the next lookup refresh the metadata, which says whether the partition exists.
                ClientError::NotFound(_) => {
                    not_found += 1;
                    not_found < 2
                }
                ClientError::OutOfRange(_) => {
                    let since = *beyond_end_since.get_or_insert_with(Instant::now);
                    self.still_in_range(next, since).await
                }
                _ => false,
            };
            if !retriable {
                self.fail(error).await;
                return;
            }
            tokio::time::sleep(self.core.backoff(attempt).max(error.retry_after().unwrap_or_default())).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// An offset below the log start is gone for good. One above the high watermark is
    /// transient for a while (a new leader's watermark lags the old one's until it commits in its
    /// term), but not for longer than `request_timeout`: then it was sought past the end.
    async fn still_in_range(&self, next: u64, out_of_range_since: Instant) -> bool {
        if out_of_range_since.elapsed() >= self.core.config.request_timeout {
            return false;
        }
        match watermarks(&self.core, &self.topic, self.partition).await {
            Ok((log_start, _)) => next >= log_start,
            Err(e) => e.is_retriable(),
        }
    }

    async fn fail(&self, error: ClientError) {
        let failed =
            Event::Failed { topic: self.topic.clone(), partition: self.partition, generation: self.generation, error };
        let _ = self.events.send(failed).await;
    }

    /// Turns Beginning or End into an offset, retrying retriable errors.
    async fn resolve(&self, start: Offset) -> Option<u64> {
        let mut attempt = 0u32;
        loop {
            let result = match start {
                Offset::At(offset) => return Some(offset),
                Offset::Beginning => watermarks(&self.core, &self.topic, self.partition).await.map(|w| w.0),
                Offset::End => watermarks(&self.core, &self.topic, self.partition).await.map(|w| w.1),
            };
            match result {
                Ok(offset) => return Some(offset),
                Err(error) if error.is_retriable() => {
                    debug!(topic = self.topic, partition = self.partition, %error, "resolving the start offset");
                    tokio::time::sleep(self.core.backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(error) => {
                    self.fail(error).await;
                    return None;
                }
            }
        }
    }

    /// One Subscribe stream from `next`, until it fails. Every record passed on advances `next`.
    async fn subscribe(&self, next: &mut u64) -> Ended {
        let failed = |error, progressed| Ended::Failed { error, progressed };
        let core = &self.core;
        let timeout = core.config.request_timeout;
        let addr = match core.leader(&self.topic, self.partition).await {
            Ok(addr) => addr,
            Err(error) => return failed(error, false),
        };
        let channel = match core.channel(&addr) {
            Ok(channel) => channel,
            Err(error) => return failed(error, false),
        };
        let request = pb::SubscribeRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: *next,
            max_bytes: self.config.fetch_bytes_max,
            format: pb::FetchFormat::Batches as i32,
        };
        let mut client = consumer_client(channel);
        let opened = tokio::time::timeout(timeout, client.subscribe(request)).await;
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return self.broken(&addr, ClientError::from(status), false),
            Err(_) => {
                return self.broken(&addr, ClientError::timeout(format!("subscribing at {addr}"), timeout), false);
            }
        };
        let mut progressed = false;
        loop {
            // A quiet stream is resubscribed (on the same connection: quiet may just mean no new
            // records); if the connection is dead, the new subscription times out and drops it.
            let message = match tokio::time::timeout(timeout, stream.message()).await {
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None)) => {
                    return failed(ClientError::Unavailable(format!("{addr} ended the subscription")), progressed);
                }
                Ok(Err(status)) => return self.broken(&addr, ClientError::from(status), progressed),
                Err(_) => return Ended::Quiet,
            };
            let (records, after) = match decode(&self.topic, self.partition, &message, *next) {
                Ok(decoded) => decoded,
                Err(error) => return failed(error, progressed),
            };
            debug_assert!(after >= *next);
            *next = after;
            if records.is_empty() {
                continue;
            }
            progressed = true;
            let event = Event::Records {
                topic: self.topic.clone(),
                partition: self.partition,
                generation: self.generation,
                records,
            };
            if self.events.send(event).await.is_err() {
                return Ended::Stop;
            }
        }
    }

    fn broken(&self, addr: &str, error: ClientError, progressed: bool) -> Ended {
        if error.breaks_connection() {
            self.core.drop_channel(addr);
        }
        Ended::Failed { error, progressed }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_record::{BatchBuilder, NewRecord};

    use super::*;

    fn batch(base_offset: u64, values: &[&str]) -> Bytes {
        let mut b = BatchBuilder::new(1 << 20);
        for v in values {
            b.push(NewRecord { timestamp_ms: 7, key: None, value: Some(v.as_bytes()), headers: &[("h", None)] })
                .unwrap();
        }
        let mut bytes = b.build().to_vec();
        keel_record::stamp(&mut bytes, base_offset, 1, 1).unwrap();
        Bytes::from(bytes)
    }

    fn offsets(records: &[ConsumerRecord]) -> Vec<u64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn decode_skips_below_the_wanted_offset_and_raft_entries() {
        let raft = keel_record::raft_entry(b"membership", 1, 2, 13).unwrap();
        let response = pb::FetchResponse {
            batches: vec![batch(10, &["a", "b", "c"]), raft, batch(13, &["d", "e"])],
            ..Default::default()
        };
        let (records, next) = decode("t", 0, &response, 11).unwrap();
        assert_eq!(offsets(&records), [11, 12, 13, 14]);
        assert_eq!(next, 15);
        assert_eq!(records[0].value.as_deref(), Some(&b"b"[..]));
        assert_eq!(records[0].headers, [("h".to_owned(), None)]);
        assert_eq!((records[0].topic.as_str(), records[0].partition, records[0].timestamp_ms), ("t", 0, 7));
        let (again, next) = decode("t", 0, &response, 15).unwrap();
        assert!(again.is_empty(), "nothing is returned twice");
        assert_eq!(next, 15);
    }

    #[test]
    fn decode_accepts_back_to_back_batches_in_one_message() {
        let mut both = batch(0, &["a"]).to_vec();
        both.extend_from_slice(&batch(1, &["b", "c"]));
        let response = pb::FetchResponse { batches: vec![Bytes::from(both)], ..Default::default() };
        let (records, next) = decode("t", 0, &response, 0).unwrap();
        assert_eq!(offsets(&records), [0, 1, 2]);
        assert_eq!(next, 3);
    }

    #[test]
    fn decode_rejects_corrupt_batches() {
        let mut bad = batch(0, &["a"]).to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let response = pb::FetchResponse { batches: vec![Bytes::from(bad)], ..Default::default() };
        assert!(matches!(decode("t", 0, &response, 0), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn decode_refuses_a_gap_in_the_offsets() {
        let response =
            pb::FetchResponse { batches: vec![batch(0, &["a", "b"]), batch(5, &["f"])], ..Default::default() };
        let error = decode("t", 0, &response, 0).unwrap_err();
        assert!(matches!(&error, ClientError::Protocol(m) if m.contains("skipped offsets 2..5")), "{error}");
        let decoded = pb::FetchResponse {
            records: vec![pb::ConsumedRecord { offset: 7, ..Default::default() }],
            ..Default::default()
        };
        assert!(matches!(decode("t", 0, &decoded, 6), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn decode_reads_decoded_records_too() {
        let response = pb::FetchResponse {
            records: vec![
                pb::ConsumedRecord { offset: 4, value: Some(Bytes::from_static(b"x")), ..Default::default() },
                pb::ConsumedRecord { offset: 5, value: Some(Bytes::from_static(b"y")), ..Default::default() },
            ],
            ..Default::default()
        };
        let (records, next) = decode("t", 1, &response, 5).unwrap();
        assert_eq!(offsets(&records), [5]);
        assert_eq!(next, 6);
    }
}
