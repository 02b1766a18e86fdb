//! The producer's bookkeeping without I/O: records accumulate into one open batch per partition,
//! closed batches wait in order, at most `in_flight_max` are sent per partition, and answers
//! resolve, retry or fail them. The sender task drives it with the time and the metadata; the
//! unit tests drive it by hand.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_proto::v1 as pb;
use keel_record::{BatchBuilder, EncodeError, NewRecord, ProducerStamp};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use super::{ProducerRecord, RecordMetadata};
use crate::core::Lookup;
use crate::error::ClientError;

/// Where a record's outcome is sent.
pub(crate) type Reply = oneshot::Sender<Result<RecordMetadata, ClientError>>;

/// The producer settings the accumulator enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) batch_bytes_max: usize,
    pub(crate) linger: Duration,
    pub(crate) in_flight_max: usize,
    pub(crate) delivery_timeout: Duration,
    /// Stamp batches with a producer id, epoch and sequence, so that retries are deduplicated.
    pub(crate) idempotent: bool,
    /// Records come from a durable outbox: a batch leaves it only once stored, so a batch that
    /// fails for good is parked (kept for the user to decide) rather than failed, and a batch
    /// that may be stored is never stamped afresh.
    pub(crate) outbox: bool,
}

/// A stamp given to a batch of outbox records, to be made durable before the batch is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewStamp {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) base_sequence: i32,
    pub(crate) ids: Vec<u64>,
}

/// An outbox batch that failed for good: its records stay in the outbox until the user discards
/// or re-sends them.
#[derive(Debug, Clone)]
pub(crate) struct ParkedOut {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) ids: Vec<u64>,
    /// The encoded batch, as last sent.
    pub(crate) bytes: Bytes,
    pub(crate) stamp: Option<(i64, i16, i32)>,
    pub(crate) error: ClientError,
    /// An attempt may have stored it: sending it again under a new stamp may duplicate it.
    pub(crate) maybe_written: bool,
}

/// The producer identity a partition's batches are stamped with, and the next sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ident {
    producer_id: i64,
    epoch: i16,
    next_sequence: i32,
    /// Which of the producer's ids (in the order they were supplied) this is.
    generation: u64,
}

/// An id and epoch from InitProducerId, numbered in the order they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Supplied {
    producer_id: i64,
    epoch: i16,
    generation: u64,
}

/// The batch being filled.
struct OpenBatch {
    builder: BatchBuilder,
    replies: Vec<Reply>,
    /// Outbox ids of the records, in record order (empty without an outbox).
    ids: Vec<u64>,
    created: Instant,
}

/// A closed batch: encoded once, re-sent unchanged on every retry.
struct Batch {
    /// Closing order within the producer; a partition's batches are sent in this order.
    seq: u64,
    topic: String,
    partition: u32,
    bytes: Bytes,
    /// One per record, in record order: record i gets offset `base_offset + i`.
    replies: Vec<Reply>,
    created: Instant,
    last_error: Option<ClientError>,
    /// An attempt ended without a definite answer (timeout, broken connection, UNAVAILABLE): the
    /// records may be stored, whatever later attempts say.
    maybe_written: bool,
    /// The identity and sequence in `bytes`' header, once first sent (idempotent producers).
    stamped: Option<(i64, i16)>,
    /// Dropped when the batch is resolved, which is what `flush` waits for.
    flush_waiters: Vec<oneshot::Sender<()>>,
    /// Outbox ids of the records, in record order (empty without an outbox).
    ids: Vec<u64>,
    /// Re-sent from the outbox after a restart: the previous process may have stored it.
    restored: bool,
}

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    /// Closed batches waiting to be sent, in `seq` order (retries go back to their place).
    ready: VecDeque<Batch>,
    in_flight: usize,
    /// No sending before this (backoff after a failure); cleared once it has passed, so that it
    /// never names a wake-up time in the past.
    retry_at: Option<Instant>,
    /// Consecutive failed rounds, for the backoff.
    failures: u32,
    /// A batch failed: send nothing more until everything in flight has answered, so that the
    /// failed batch and those behind it go out again in order.
    draining: bool,
    /// The metadata version at which the cache first did not know this partition.
    unknown_since: Option<u64>,
    /// Idempotent producers: the identity this partition's batches are stamped with.
    ident: Option<Ident>,
    /// The oldest generation of id this partition may take: past the one it retired, whose
    /// sequence it cannot continue (a new id or epoch starts the sequence over at 0).
    min_generation: u64,
}

#[derive(Default)]
struct TopicQueues {
    partitions: BTreeMap<u32, PartitionQueue>,
    /// Where unkeyed records go; moves on when that partition's batch closes.
    sticky: Option<u32>,
}

/// Requests to send now, each with its leader's address.
#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    pub(crate) requests: Vec<(String, pb::ProduceRequest)>,
    /// Some partition needs fresher metadata than the cache has.
    pub(crate) wants_refresh: bool,
    /// Some partition waits for a producer id ([`Accumulator::supply_producer_id`]).
    pub(crate) wants_producer_id: bool,
    /// Stamps given to outbox batches in `requests`: durable before any of them is sent.
    pub(crate) stamps: Vec<NewStamp>,
}

/// The outcome of one answered request.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    /// `None` when acknowledged; the error when it failed (and was retried or given up).
    pub(crate) error: Option<ClientError>,
}

/// Every partition's batches of one producer.
pub(crate) struct Accumulator {
    limits: Limits,
    /// Permits of buffered records; a resolved record gives its permit back.
    buffer: Arc<Semaphore>,
    topics: BTreeMap<String, TopicQueues>,
    in_flight: BTreeMap<u64, Batch>,
    next_seq: u64,
    next_request_id: u64,
    /// The latest id and epoch InitProducerId gave: every partition without an identity takes
    /// it, unless it retired that very one (then it waits for the next).
    latest: Option<Supplied>,
    /// Another instance of this producer's stable identity took over (PRODUCER_FENCED): this one
    /// can send nothing more, and every record fails with this error.
    fenced: Option<ClientError>,
    /// Outbox ids of records stored since the last [`Accumulator::take_outbox_events`].
    outbox_done: Vec<u64>,
    /// Outbox batches parked since then.
    outbox_parked: Vec<ParkedOut>,
}

fn succeed(buffer: &Semaphore, batch: Batch, base_offset: u64) {
    let count = batch.replies.len();
    for (i, reply) in batch.replies.into_iter().enumerate() {
        let metadata =
            RecordMetadata { topic: batch.topic.clone(), partition: batch.partition, offset: base_offset + i as u64 };
        // The caller may have dropped its DeliveryFuture: nobody to tell.
        let _ = reply.send(Ok(metadata));
    }
    buffer.add_permits(count);
}

/// Gives up on a batch. A definite error after an attempt that may have written the batch would
/// tell the caller "not stored" when it may be: that error is reported as ambiguous instead.
fn fail(buffer: &Semaphore, batch: Batch, error: &ClientError) {
    let count = batch.replies.len();
    let error = if batch.maybe_written && !error.is_ambiguous() {
        ClientError::MaybeWritten(Box::new(error.clone()))
    } else {
        error.clone()
    };
    for reply in batch.replies {
        let _ = reply.send(Err(error.clone()));
    }
    buffer.add_permits(count);
}

impl PartitionQueue {
    /// Closes the open batch, if any; returns whether there was one.
    fn close(&mut self, next_seq: &mut u64, topic: &str, partition: u32) -> bool {
        let Some(open) = self.open.take() else { return false };
        debug_assert!(!open.builder.is_empty(), "an open batch holds at least one record");
        let seq = *next_seq;
        *next_seq += 1;
        debug_assert!(self.ready.back().is_none_or(|b| b.seq < seq));
        self.ready.push_back(Batch {
            seq,
            topic: topic.to_owned(),
            partition,
            bytes: open.builder.build(),
            replies: open.replies,
            created: open.created,
            last_error: None,
            maybe_written: false,
            stamped: None,
            flush_waiters: Vec::new(),
            ids: open.ids,
            restored: false,
        });
        true
    }

    /// The partition's identity can no longer continue its sequence (a stamped batch failed for
    /// good, so the next one would leave a gap; or the partition forgot the producer): a fresh
    /// identity stamps what follows. Batches waiting to be resent that no attempt can have
    /// stored are stamped afresh; those that may be stored keep their stamp, so that a retry of
    /// them is still recognised.
    fn retire_identity(&mut self) {
        if let Some(ident) = self.ident.take() {
            self.min_generation = self.min_generation.max(ident.generation + 1);
        }
        for b in &mut self.ready {
            if !b.maybe_written {
                b.stamped = None;
            }
        }
    }

    fn expire(&mut self, buffer: &Semaphore, delivery_timeout: Duration, now: Instant) {
        if !self.ready.iter().any(|b| now >= b.created + delivery_timeout) {
            return;
        }
        let (expired, kept): (VecDeque<Batch>, VecDeque<Batch>) =
            std::mem::take(&mut self.ready).into_iter().partition(|b| now >= b.created + delivery_timeout);
        self.ready = kept;
        if expired.iter().any(|b| b.stamped.is_some()) {
            self.retire_identity();
        }
        for mut batch in expired {
            let error = batch
                .last_error
                .take()
                .unwrap_or_else(|| ClientError::timeout("delivery (no leader to send to)", delivery_timeout));
            fail(buffer, batch, &error);
        }
    }
}

/// Gives a batch about to be sent for the first time (or again under a new identity) the next
/// sequences of its partition's identity.
fn stamp(batch: &mut Batch, ident: &mut Ident) {
    let count = batch.replies.len();
    let producer = ProducerStamp {
        producer_id: ident.producer_id,
        producer_epoch: ident.epoch,
        base_sequence: ident.next_sequence,
    };
    let mut bytes = batch.bytes.to_vec();
    // The accumulator built this batch; a failure to decode it is a bug, caught by the broker's
    // check as a refused batch rather than hidden here.
    if keel_record::stamp_producer(&mut bytes, producer).is_ok() {
        batch.bytes = Bytes::from(bytes);
    }
    batch.stamped = Some((ident.producer_id, ident.epoch));
    // Sequences wrap at 2^31, as the broker counts them.
    ident.next_sequence = keel_record::sequence_after(ident.next_sequence, count as u64);
}

fn advance_sticky(sticky: &mut Option<u32>, partition: u32) {
    if *sticky == Some(partition) {
        *sticky = Some(partition.wrapping_add(1));
    }
}

impl Accumulator {
    pub(crate) fn new(limits: Limits, buffer: Arc<Semaphore>) -> Accumulator {
        Accumulator {
            limits,
            buffer,
            topics: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            next_request_id: 1,
            latest: None,
            fenced: None,
            outbox_done: Vec::new(),
            outbox_parked: Vec::new(),
        }
    }

    /// A producer id and epoch (from InitProducerId): the first for every partition, each later
    /// one for the partitions that retired their identity since.
    pub(crate) fn supply_producer_id(&mut self, producer_id: i64, epoch: i16) {
        let generation = self.latest.map_or(0, |l| l.generation + 1);
        self.latest = Some(Supplied { producer_id, epoch, generation });
    }

    /// The latest id and epoch supplied: what a stable identity claims when it asks for its
    /// next epoch.
    pub(crate) fn latest_producer_id(&self) -> Option<(i64, i16)> {
        self.latest.map(|l| (l.producer_id, l.epoch))
    }

    /// Another instance took this producer's identity over: fails everything not in flight now
    /// and every record sent from now on; answers of batches in flight still resolve them.
    pub(crate) fn fence(&mut self, error: ClientError) {
        if self.fenced.is_none() {
            self.fenced = Some(error);
        }
        self.fail_fenced();
    }

    /// Whether the producer was fenced.
    pub(crate) fn fenced(&self) -> Option<&ClientError> {
        self.fenced.as_ref()
    }

    fn fail_fenced(&mut self) {
        let Some(error) = &self.fenced else { return };
        for t in self.topics.values_mut() {
            for q in t.partitions.values_mut() {
                if let Some(open) = q.open.take() {
                    for reply in open.replies {
                        let _ = reply.send(Err(error.clone()));
                        self.buffer.add_permits(1);
                    }
                }
                for batch in q.ready.drain(..) {
                    fail(&self.buffer, batch, error);
                }
            }
        }
    }

    /// The limits it enforces.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    fn topic_mut(&mut self, topic: &str) -> &mut TopicQueues {
        // Looked up by `&str` so that only a topic's first record allocates its name.
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_owned(), TopicQueues::default());
        }
        match self.topics.get_mut(topic) {
            Some(t) => t,
            None => unreachable!("inserted just above"),
        }
    }

    /// The partition for an unkeyed record: the topic's sticky partition, which starts at
    /// `start` (random) and moves to the next partition whenever its batch closes.
    pub(crate) fn sticky_partition(&mut self, topic: &str, count: u32, start: impl FnOnce() -> u32) -> u32 {
        debug_assert!(count > 0);
        let t = self.topic_mut(topic);
        // Stored as the partition itself, not a counter: `advance_sticky` recognises the sticky
        // partition by comparing it with the partition whose batch closed.
        let partition = *t.sticky.get_or_insert_with(start) % count.max(1);
        t.sticky = Some(partition);
        partition
    }

    /// Adds a record to the open batch of its partition, closing that batch first if the record
    /// does not fit. Returns true when the sender task has new work (a batch was opened, whose
    /// linger must be timed, or one was closed).
    pub(crate) fn append(
        &mut self,
        topic: &str,
        partition: u32,
        record: &ProducerRecord,
        reply: Reply,
        now: Instant,
    ) -> Result<bool, ClientError> {
        self.append_with_id(topic, partition, record, reply, now, None)
    }

    /// [`Accumulator::append`] of a record with its outbox id.
    pub(crate) fn append_with_id(
        &mut self,
        topic: &str,
        partition: u32,
        record: &ProducerRecord,
        reply: Reply,
        now: Instant,
        id: Option<u64>,
    ) -> Result<bool, ClientError> {
        if let Some(error) = &self.fenced {
            return Err(error.clone());
        }
        let headers: Vec<(&str, Option<&[u8]>)> =
            record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let new = NewRecord {
            timestamp_ms: record.timestamp_ms,
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &headers,
        };
        let bytes_max = self.limits.batch_bytes_max;
        let mut next_seq = self.next_seq;
        let t = self.topic_mut(topic);
        let q = t.partitions.entry(partition).or_default();
        let mut closed = false;
        if let Some(open) = &mut q.open {
            if open.builder.push(new).is_ok() {
                open.replies.push(reply);
                open.ids.extend(id);
                return Ok(false);
            }
            // Full (or a timestamp too far from the batch's first): start a new batch, where a
            // record that cannot fit even alone is reported.
            closed = q.close(&mut next_seq, topic, partition);
        }
        let mut builder = BatchBuilder::new(bytes_max);
        let pushed = builder.push(new);
        if closed {
            advance_sticky(&mut t.sticky, partition);
        }
        self.next_seq = next_seq;
        match pushed {
            Ok(()) => {}
            Err(EncodeError::TooLarge { size, limit }) => return Err(ClientError::RecordTooLarge { size, limit }),
            Err(EncodeError::Invalid(why)) => return Err(ClientError::InvalidArgument(why.to_owned())),
        }
        let t = self.topic_mut(topic);
        let q = t.partitions.entry(partition).or_default();
        q.open = Some(OpenBatch { builder, replies: vec![reply], ids: id.into_iter().collect(), created: now });
        Ok(true)
    }

    /// Closes every open batch whose linger has passed.
    pub(crate) fn close_lingering(&mut self, now: Instant) {
        let linger = self.limits.linger;
        for (topic, t) in &mut self.topics {
            for (&partition, q) in &mut t.partitions {
                if q.open.as_ref().is_some_and(|o| now >= o.created + linger)
                    && q.close(&mut self.next_seq, topic, partition)
                {
                    advance_sticky(&mut t.sticky, partition);
                }
            }
        }
    }

    /// Closes every open batch and returns receivers that complete once each batch not yet
    /// resolved is resolved (acknowledged or failed).
    pub(crate) fn flush(&mut self) -> Vec<oneshot::Receiver<()>> {
        let mut waiters = Vec::new();
        let mut watch = |batch: &mut Batch| {
            let (tx, rx) = oneshot::channel();
            batch.flush_waiters.push(tx);
            waiters.push(rx);
        };
        for (topic, t) in &mut self.topics {
            for (&partition, q) in &mut t.partitions {
                if q.close(&mut self.next_seq, topic, partition) {
                    advance_sticky(&mut t.sticky, partition);
                }
                q.ready.iter_mut().for_each(&mut watch);
            }
        }
        self.in_flight.values_mut().for_each(&mut watch);
        waiters
    }

    /// Fails expired batches and picks the batches to send now. `lookup` gives a partition's
    /// leader and whether the cache is old; `version` is the metadata version, so that a partition
    /// the cache still does not know after a refresh fails with NOT_FOUND.
    pub(crate) fn dispatch(
        &mut self,
        now: Instant,
        version: u64,
        mut lookup: impl FnMut(&str, u32) -> (Lookup, bool),
    ) -> Dispatch {
        let mut out = Dispatch::default();
        if self.fenced.is_some() {
            // Retried batches came back since the fence: they fail too.
            self.fail_fenced();
            return out;
        }
        let mut gone: Vec<(String, u32)> = Vec::new();
        for (topic, t) in &mut self.topics {
            for (&partition, q) in &mut t.partitions {
                q.expire(&self.buffer, self.limits.delivery_timeout, now);
                if q.ready.is_empty() || q.retry_at.is_some_and(|at| now < at) {
                    continue;
                }
                // The backoff is over. Left set, it would stay the earliest deadline while the
                // pipeline is full or drains, and the sender task would spin on a timer that
                // has already fired until an answer came.
                q.retry_at = None;
                if q.draining {
                    if q.in_flight > 0 {
                        continue;
                    }
                    q.draining = false;
                }
                let (found, stale) = lookup(topic, partition);
                out.wants_refresh |= stale;
                let addr = match found {
                    Lookup::Leader(addr) => addr,
                    Lookup::NoLeader => {
                        q.unknown_since = None;
                        out.wants_refresh = true;
                        continue;
                    }
                    Lookup::Unknown => {
                        out.wants_refresh = true;
                        match q.unknown_since {
                            Some(since) if version > since => {
                                let error =
                                    ClientError::NotFound(format!("no partition {partition} in topic {topic:?}"));
                                for batch in q.ready.drain(..) {
                                    fail(&self.buffer, batch, &error);
                                }
                                q.unknown_since = None;
                                gone.push((topic.clone(), partition));
                            }
                            Some(_) => {}
                            None => q.unknown_since = Some(version),
                        }
                        continue;
                    }
                };
                q.unknown_since = None;
                while q.in_flight < self.limits.in_flight_max {
                    if self.limits.idempotent && q.ready.front().is_some_and(|b| b.stamped.is_none()) {
                        if q.ident.is_none() {
                            match self.latest.filter(|l| l.generation >= q.min_generation) {
                                Some(l) => {
                                    q.ident = Some(Ident {
                                        producer_id: l.producer_id,
                                        epoch: l.epoch,
                                        next_sequence: 0,
                                        generation: l.generation,
                                    });
                                }
                                None => {
                                    out.wants_producer_id = true;
                                    break;
                                }
                            }
                        }
                        if let (Some(ident), Some(front)) = (q.ident.as_mut(), q.ready.front_mut()) {
                            let base_sequence = ident.next_sequence;
                            stamp(front, ident);
                            if !front.ids.is_empty() {
                                out.stamps.push(NewStamp {
                                    topic: topic.clone(),
                                    partition,
                                    producer_id: ident.producer_id,
                                    epoch: ident.epoch,
                                    base_sequence,
                                    ids: front.ids.clone(),
                                });
                            }
                        }
                    }
                    let Some(batch) = q.ready.pop_front() else { break };
                    let request_id = self.next_request_id;
                    self.next_request_id += 1;
                    let request = pb::ProduceRequest {
                        request_id,
                        topic: topic.clone(),
                        partition,
                        records: Vec::new(),
                        batch: batch.bytes.clone(),
                        // The batch's header carries the producer stamp.
                        producer_id: None,
                        producer_epoch: None,
                        base_sequence: None,
                        ..Default::default()
                    };
                    q.in_flight += 1;
                    self.in_flight.insert(request_id, batch);
                    out.requests.push((addr.clone(), request));
                }
            }
        }
        // A deleted topic's (or partition's) queues go once nothing of theirs is pending, so a
        // long-lived producer's memory follows the partitions it writes to now.
        for (topic, partition) in gone {
            if let Some(t) = self.topics.get_mut(&topic) {
                if t.partitions
                    .get(&partition)
                    .is_some_and(|q| q.open.is_none() && q.ready.is_empty() && q.in_flight == 0)
                {
                    t.partitions.remove(&partition);
                }
                if t.partitions.is_empty() {
                    self.topics.remove(&topic);
                }
            }
        }
        out
    }

    /// Resolves, re-queues or fails the batch of an answered request. `backoff(n)` is the delay
    /// after the n-th consecutive failed round. Unknown ids (answered twice) are ignored.
    pub(crate) fn complete(
        &mut self,
        request_id: u64,
        result: Result<pb::ProduceResponse, ClientError>,
        now: Instant,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> Option<Completion> {
        let mut batch = self.in_flight.remove(&request_id)?;
        let topic = batch.topic.clone();
        let partition = batch.partition;
        let q = self.topics.get_mut(&topic).and_then(|t| t.partitions.get_mut(&partition));
        let Some(q) = q else {
            // Unreachable (a queue goes only with nothing in flight); failing beats losing the records.
            debug_assert!(false, "in-flight batch without a partition queue");
            let error = ClientError::Protocol("lost partition queue".into());
            fail(&self.buffer, batch, &error);
            return Some(Completion { topic, partition, error: Some(error) });
        };
        debug_assert!(q.in_flight > 0);
        q.in_flight = q.in_flight.saturating_sub(1);
        let result = result.and_then(|r| match &r.error {
            Some(e) => Err(ClientError::from(e)),
            None => Ok(r),
        });
        let error = match result {
            Ok(r) if r.record_count as usize == batch.replies.len() => {
                q.failures = 0;
                self.outbox_done.extend_from_slice(&batch.ids);
                succeed(&self.buffer, batch, r.base_offset);
                return Some(Completion { topic, partition, error: None });
            }
            Ok(r) => ClientError::Protocol(format!(
                "{topic}/{partition}: acknowledged {} records of a batch of {}",
                r.record_count,
                batch.replies.len()
            )),
            Err(e) => e,
        };
        // A wrong record count means the broker stored something.
        batch.maybe_written |= error.is_ambiguous() || matches!(error, ClientError::Protocol(_));
        if matches!(&error, ClientError::Producer { reason, .. } if reason == "PRODUCER_FENCED") {
            self.fenced.get_or_insert_with(|| error.clone());
        }
        let unknown_producer =
            matches!(&error, ClientError::Producer { reason, .. } if reason == "UNKNOWN_PRODUCER_ID");
        if unknown_producer && self.limits.outbox && (batch.maybe_written || batch.restored) {
            // An outbox batch that may be stored (by an earlier attempt, or by the process
            // before a restart) whose producer the partition has since forgotten (expired):
            // stamped afresh it would be written twice if it was stored. It is parked, and the
            // user decides.
            q.retire_identity();
            self.park(batch, error.clone());
            return Some(Completion { topic, partition, error: Some(error) });
        }
        if unknown_producer {
            // The partition forgot the producer, so no attempt of this batch is stored (it would
            // know the producer): it goes again under a new identity, like everything after it.
            batch.stamped = None;
            q.retire_identity();
        }
        // NOT_FOUND is retried too: a new partition's leader may not know it yet, and the
        // metadata refresh that follows decides whether the partition exists at all.
        let retriable = error.is_retriable() || matches!(error, ClientError::NotFound(_));
        if retriable && now < batch.created + self.limits.delivery_timeout {
            if !q.draining {
                q.draining = true;
                // A named leader is worth trying at once; anything else waits.
                let wait =
                    if error.leader_hint().is_some() && q.failures == 0 { Duration::ZERO } else { backoff(q.failures) };
                // A quota's throttle says how long at least.
                let wait = wait.max(error.retry_after().unwrap_or_default());
                q.failures = q.failures.saturating_add(1);
                q.retry_at = Some(now + wait);
            }
            batch.last_error = Some(error.clone());
            let at = q.ready.partition_point(|b| b.seq < batch.seq);
            q.ready.insert(at, batch);
        } else {
            if batch.stamped.is_some() {
                q.retire_identity();
            }
            let stored =
                matches!(&error, ClientError::Producer { reason, .. } if reason == "DUPLICATE_SEQUENCE_NUMBER");
            if self.limits.outbox && !batch.ids.is_empty() && !stored {
                self.park(batch, error.clone());
            } else {
                // Stored long ago (where is no longer known): the outbox is done with it.
                self.outbox_done.extend_from_slice(&batch.ids);
                fail(&self.buffer, batch, &error);
            }
        }
        Some(Completion { topic, partition, error: Some(error) })
    }

    /// Fails an outbox batch's futures and keeps the batch for the user.
    fn park(&mut self, batch: Batch, error: ClientError) {
        let parked = ParkedOut {
            topic: batch.topic.clone(),
            partition: batch.partition,
            ids: batch.ids.clone(),
            bytes: batch.bytes.clone(),
            stamp: keel_record::check(&batch.bytes).ok().and_then(|h| h.producer_stamp(0)),
            error: error.clone(),
            maybe_written: batch.maybe_written || batch.restored,
        };
        self.outbox_parked.push(parked);
        fail(&self.buffer, batch, &error);
    }

    /// Forgets a dispatched request that was never sent (its stamp could not be made durable),
    /// failing its records' futures with `error`; the records stay in the outbox.
    pub(crate) fn abandon(&mut self, request_id: u64, error: &ClientError) {
        let Some(batch) = self.in_flight.remove(&request_id) else { return };
        if let Some(q) = self.topics.get_mut(&batch.topic).and_then(|t| t.partitions.get_mut(&batch.partition)) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        fail(&self.buffer, batch, error);
    }

    /// Outbox ids stored and batches parked since the last call.
    pub(crate) fn take_outbox_events(&mut self) -> (Vec<u64>, Vec<ParkedOut>) {
        (std::mem::take(&mut self.outbox_done), std::mem::take(&mut self.outbox_parked))
    }

    /// Queues an encoded batch of outbox records behind everything of its partition: one the
    /// previous process stamped (`stamped`: sent again with exactly that stamp, so the
    /// partition recognises it if it was stored), or one the user re-sends (stamped afresh).
    /// Nobody waits for its records' futures.
    pub(crate) fn restore_batch(
        &mut self,
        topic: &str,
        partition: u32,
        ids: Vec<u64>,
        bytes: Bytes,
        stamped: Option<(i64, i16)>,
        now: Instant,
    ) {
        debug_assert!(!ids.is_empty());
        let replies: Vec<Reply> = ids.iter().map(|_| oneshot::channel().0).collect();
        // The records hold buffer room like any others until they resolve (which gives it back).
        self.buffer.forget_permits(replies.len());
        let seq = self.next_seq;
        self.next_seq += 1;
        let restored = stamped.is_some();
        let q = self.topic_mut(topic).partitions.entry(partition).or_default();
        q.ready.push_back(Batch {
            seq,
            topic: topic.to_owned(),
            partition,
            bytes,
            replies,
            created: now,
            last_error: None,
            maybe_written: restored,
            stamped,
            flush_waiters: Vec::new(),
            ids,
            restored,
        });
    }

    /// When the sender task must look again even if nothing happens: a linger ending, a backoff
    /// ending, a batch expiring.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        for t in self.topics.values() {
            for q in t.partitions.values() {
                if let Some(open) = &q.open {
                    consider(open.created + self.limits.linger);
                }
                if !q.ready.is_empty() {
                    if let Some(at) = q.retry_at {
                        consider(at);
                    }
                    if let Some(oldest) = q.ready.iter().map(|b| b.created).min() {
                        consider(oldest + self.limits.delivery_timeout);
                    }
                }
            }
        }
        next
    }

    /// True when no record waits or is in flight.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
            && self.topics.values().all(|t| t.partitions.values().all(|q| q.open.is_none() && q.ready.is_empty()))
    }
}

impl Drop for Accumulator {
    /// The producer went away (closed or dropped) with batches unresolved. Those sent and not
    /// answered, or sent before with no definite answer, may be stored: they resolve as
    /// [`ClientError::MaybeWritten`]; those never sent resolve as [`ClientError::Closed`].
    fn drop(&mut self) {
        let closed = ClientError::Closed;
        let ambiguous = ClientError::MaybeWritten(Box::new(ClientError::Closed));
        for (_, batch) in std::mem::take(&mut self.in_flight) {
            fail(&self.buffer, batch, &ambiguous);
        }
        for t in std::mem::take(&mut self.topics).into_values() {
            for q in t.partitions.into_values() {
                for batch in q.ready {
                    fail(&self.buffer, batch, &closed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_record::Batch as Decoded;

    use super::*;

    type Outcome = oneshot::Receiver<Result<RecordMetadata, ClientError>>;

    const LINGER: Duration = Duration::from_millis(5);

    fn acc(batch_bytes_max: usize, in_flight_max: usize) -> Accumulator {
        let limits = Limits {
            batch_bytes_max,
            linger: LINGER,
            in_flight_max,
            delivery_timeout: Duration::from_secs(60),
            idempotent: false,
            outbox: false,
        };
        Accumulator::new(limits, Arc::new(Semaphore::new(0)))
    }

    fn record(value: &str) -> ProducerRecord {
        ProducerRecord::new(Bytes::copy_from_slice(value.as_bytes()))
    }

    fn push(a: &mut Accumulator, partition: u32, value: &str, now: Instant) -> Outcome {
        let (tx, rx) = oneshot::channel();
        a.append("t", partition, &record(value), tx, now).unwrap();
        rx
    }

    fn leader(_: &str, _: u32) -> (Lookup, bool) {
        (Lookup::Leader("n1:1".into()), false)
    }

    fn values(request: &pb::ProduceRequest) -> Vec<String> {
        let batch = Decoded::from_bytes(request.batch.clone()).unwrap();
        batch.records().map(|r| String::from_utf8(r.unwrap().value.unwrap().to_vec()).unwrap()).collect()
    }

    fn ok(request_id: u64, base_offset: u64, record_count: u32) -> Result<pb::ProduceResponse, ClientError> {
        Ok(pb::ProduceResponse { request_id, base_offset, record_count, ..Default::default() })
    }

    fn offset(rx: &mut Outcome) -> u64 {
        rx.try_recv().unwrap().unwrap().offset
    }

    #[test]
    fn a_dropped_producer_reports_batches_in_flight_as_maybe_written() {
        let mut a = acc(1 << 20, 1);
        let t0 = Instant::now();
        let mut sent = push(&mut a, 0, "sent", t0);
        let mut retried = push(&mut a, 1, "retried", t0);
        a.close_lingering(t0 + LINGER);
        let d = a.dispatch(t0 + LINGER, 1, leader);
        assert_eq!(d.requests.len(), 2);
        // Partition 1's attempt timed out (ambiguous) and waits for its retry.
        let timeout = Err(ClientError::timeout("produce", Duration::from_secs(1)));
        a.complete(d.requests[1].1.request_id, timeout, t0 + LINGER, |_| Duration::from_secs(1));
        let mut unsent = push(&mut a, 2, "unsent", t0 + LINGER);
        drop(a);
        for rx in [&mut sent, &mut retried] {
            let e = rx.try_recv().unwrap().unwrap_err();
            assert!(e.is_ambiguous(), "{e}");
        }
        // The open batch was never sent: its reply is dropped, which its DeliveryFuture
        // reports as Closed (not stored).
        assert!(unsent.try_recv().is_err());
    }

    fn idempotent(in_flight_max: usize) -> Accumulator {
        let mut a = acc(1 << 20, in_flight_max);
        a.limits.idempotent = true;
        a
    }

    /// (producer id, epoch, base sequence) of a sent batch.
    fn stamp_of(request: &pb::ProduceRequest) -> (i64, i16, i32) {
        let h = *Decoded::from_bytes(request.batch.clone()).unwrap().header();
        (h.producer_id, h.producer_epoch, h.base_sequence)
    }

    fn refused(reason: &str) -> Result<pb::ProduceResponse, ClientError> {
        Err(ClientError::Producer { reason: reason.into(), message: String::new() })
    }

    #[test]
    fn idempotent_batches_are_stamped_when_first_sent_and_keep_their_stamp_on_retry() {
        let mut a = idempotent(5);
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        for (p, v) in [(0, "a"), (0, "b"), (1, "c")] {
            outcomes.push(push(&mut a, p, v, t0));
        }
        a.flush();
        outcomes.push(push(&mut a, 0, "d", t0));
        a.flush();
        let d = a.dispatch(t0, 1, leader);
        assert!(d.requests.is_empty() && d.wants_producer_id, "nothing leaves unstamped");
        a.supply_producer_id(7, 0);
        let sent = a.dispatch(t0, 1, leader).requests;
        let stamps: Vec<_> = sent.iter().map(|(_, r)| (r.partition, stamp_of(r))).collect();
        // Sequences count records per partition; every partition shares the producer's id.
        assert_eq!(stamps, [(0, (7, 0, 0)), (0, (7, 0, 2)), (1, (7, 0, 0))]);
        let lost = Err(ClientError::timeout("produce", Duration::from_secs(1)));
        a.complete(sent[0].1.request_id, lost, t0, |_| Duration::ZERO);
        a.complete(sent[1].1.request_id, refused("OUT_OF_ORDER_SEQUENCE"), t0, |_| Duration::ZERO);
        let again = a.dispatch(t0, 1, leader).requests;
        let stamps: Vec<_> = again.iter().map(|(_, r)| stamp_of(r)).collect();
        assert_eq!(stamps, [(7, 0, 0), (7, 0, 2)], "a retry is the same batch, in order");
        for (i, (_, r)) in again.iter().chain(&sent[2..]).enumerate() {
            a.complete(r.request_id, ok(r.request_id, 10 + 2 * i as u64, values(r).len() as u32), t0, |_| {
                Duration::ZERO
            });
        }
        assert_eq!(offset(&mut outcomes[0]), 10);
    }

    #[test]
    fn a_stamped_batch_that_fails_for_good_retires_its_partitions_identity() {
        let mut a = idempotent(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let _first = push(&mut a, 0, "a", t0);
        a.flush();
        let sent = a.dispatch(t0, 1, leader).requests;
        let refused_for_good = Err(ClientError::InvalidArgument("no".into()));
        a.complete(sent[0].1.request_id, refused_for_good, t0, |_| Duration::ZERO);
        // The next batch would leave a gap after the failed one: it starts a new identity.
        let _second = push(&mut a, 0, "b", t0);
        a.flush();
        assert!(a.dispatch(t0, 1, leader).wants_producer_id);
        a.supply_producer_id(8, 0);
        let sent = a.dispatch(t0, 1, leader).requests;
        assert_eq!(stamp_of(&sent[0].1), (8, 0, 0));
    }

    /// Partitions that retire their identity share the next id (or epoch) supplied, and one
    /// that retires it again waits for a newer one; the others keep theirs.
    #[test]
    fn retired_partitions_share_the_next_identity() {
        let mut a = idempotent(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let _outcomes: Vec<Outcome> = (0..3).map(|p| push(&mut a, p, "a", t0)).collect();
        a.flush();
        let sent = a.dispatch(t0, 1, leader).requests;
        for (_, r) in &sent[..2] {
            a.complete(r.request_id, refused("UNKNOWN_PRODUCER_ID"), t0, |_| Duration::ZERO);
        }
        a.complete(sent[2].1.request_id, ok(sent[2].1.request_id, 0, 1), t0, |_| Duration::ZERO);
        assert!(a.dispatch(t0, 1, leader).wants_producer_id);
        assert_eq!(a.latest_producer_id(), Some((7, 0)), "what a stable identity claims when it asks");
        a.supply_producer_id(7, 1);
        let _b = push(&mut a, 2, "b", t0);
        a.flush();
        let mut again: Vec<_> =
            a.dispatch(t0, 1, leader).requests.iter().map(|(_, r)| (r.partition, stamp_of(r))).collect();
        again.sort_unstable();
        assert_eq!(again, [(0, (7, 1, 0)), (1, (7, 1, 0)), (2, (7, 0, 1))]);
    }

    /// A fenced producer fails what it holds and every later record; answers of batches in
    /// flight still resolve theirs.
    #[test]
    fn a_fenced_producer_stops() {
        let mut a = idempotent(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let mut in_flight = push(&mut a, 0, "a", t0);
        let mut fenced_here = push(&mut a, 1, "b", t0);
        a.flush();
        let sent = a.dispatch(t0, 1, leader).requests;
        let mut queued = push(&mut a, 2, "c", t0);
        let fenced = |a: &mut Accumulator, r: &pb::ProduceRequest| {
            a.complete(r.request_id, refused("PRODUCER_FENCED"), t0, |_| Duration::ZERO);
        };
        let p1 = sent.iter().find(|(_, r)| r.partition == 1).unwrap();
        fenced(&mut a, &p1.1);
        assert!(a.fenced().is_some());
        assert!(a.dispatch(t0, 1, leader).requests.is_empty(), "nothing more is sent");
        let reason = |e: ClientError| match e {
            ClientError::Producer { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(fenced_here.try_recv().unwrap().unwrap_err()), "PRODUCER_FENCED");
        assert_eq!(reason(queued.try_recv().unwrap().unwrap_err()), "PRODUCER_FENCED");
        let (tx, _rx) = oneshot::channel();
        let refused_send = a.append("t", 0, &record("d"), tx, t0).unwrap_err();
        assert_eq!(reason(refused_send), "PRODUCER_FENCED");
        let p0 = sent.iter().find(|(_, r)| r.partition == 0).unwrap();
        a.complete(p0.1.request_id, ok(p0.1.request_id, 3, 1), t0, |_| Duration::ZERO);
        assert_eq!(offset(&mut in_flight), 3, "acknowledged before the fence: stored");
    }

    #[test]
    fn an_unknown_producer_sends_the_batch_again_under_a_new_identity() {
        let mut a = idempotent(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let mut first = push(&mut a, 0, "a", t0);
        a.flush();
        let sent = a.dispatch(t0, 1, leader).requests;
        a.complete(sent[0].1.request_id, refused("UNKNOWN_PRODUCER_ID"), t0, |_| Duration::ZERO);
        assert!(a.dispatch(t0, 1, leader).wants_producer_id);
        a.supply_producer_id(9, 0);
        let again = a.dispatch(t0, 1, leader).requests;
        assert_eq!((values(&again[0].1), stamp_of(&again[0].1)), (vec!["a".to_owned()], (9, 0, 0)));
        a.complete(again[0].1.request_id, ok(again[0].1.request_id, 4, 1), t0, |_| Duration::ZERO);
        assert_eq!(offset(&mut first), 4);
    }

    fn outbox(in_flight_max: usize) -> Accumulator {
        let mut a = idempotent(in_flight_max);
        a.limits.outbox = true;
        a.limits.delivery_timeout = Duration::from_secs(10 * 365 * 24 * 3600);
        a
    }

    fn push_outbox(a: &mut Accumulator, partition: u32, value: &str, id: u64, now: Instant) -> Outcome {
        let (tx, rx) = oneshot::channel();
        a.append_with_id("t", partition, &record(value), tx, now, Some(id)).unwrap();
        rx
    }

    #[test]
    fn outbox_batches_report_their_stamps_before_they_are_sent_and_their_ids_once_stored() {
        let mut a = outbox(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 2);
        let mut r = [push_outbox(&mut a, 0, "a", 10, t0), push_outbox(&mut a, 0, "b", 11, t0)];
        a.flush();
        let d = a.dispatch(t0, 1, leader);
        let want =
            NewStamp { topic: "t".into(), partition: 0, producer_id: 7, epoch: 2, base_sequence: 0, ids: vec![10, 11] };
        assert_eq!(d.stamps, [want]);
        assert_eq!(stamp_of(&d.requests[0].1), (7, 2, 0));
        assert_eq!(a.take_outbox_events().0, Vec::<u64>::new(), "nothing is done before it is stored");
        let id = d.requests[0].1.request_id;
        a.complete(id, ok(id, 40, 2), t0, |_| Duration::ZERO);
        assert_eq!(a.take_outbox_events().0, [10, 11]);
        assert_eq!(r.iter_mut().map(offset).collect::<Vec<_>>(), [40, 41]);
    }

    #[test]
    fn a_restored_batch_keeps_its_stamp_and_is_parked_when_its_producer_was_forgotten() {
        let mut a = outbox(5);
        let t0 = Instant::now();
        // A batch the previous process stamped (7, 0, 3) before it died.
        let mut builder = BatchBuilder::new(1 << 20);
        builder.push(NewRecord { value: Some(b"r"), ..NewRecord::default() }).unwrap();
        let mut bytes = builder.build().to_vec();
        let stamp = ProducerStamp { producer_id: 7, producer_epoch: 0, base_sequence: 3 };
        keel_record::stamp_producer(&mut bytes, stamp).unwrap();
        a.restore_batch("t", 0, vec![21], Bytes::from(bytes), Some((7, 0)), t0);
        let d = a.dispatch(t0, 1, leader);
        assert!(d.stamps.is_empty() && !d.wants_producer_id, "sent with its own stamp, no new id needed");
        assert_eq!(stamp_of(&d.requests[0].1), (7, 0, 3));
        // Its producer expired on the partition: stamped afresh, it could be written twice.
        let id = d.requests[0].1.request_id;
        a.complete(id, refused("UNKNOWN_PRODUCER_ID"), t0, |_| Duration::ZERO);
        let (done, parked) = a.take_outbox_events();
        assert!(done.is_empty());
        assert_eq!(parked.len(), 1);
        assert_eq!(
            (parked[0].ids.clone(), parked[0].stamp, parked[0].maybe_written),
            (vec![21], Some((7, 0, 3)), true)
        );
        let again = a.dispatch(t0 + Duration::from_secs(5), 1, leader);
        assert!(again.requests.is_empty(), "never sent again without the user's decision");
    }

    #[test]
    fn outbox_batches_stored_long_ago_are_done_and_refused_ones_parked() {
        let mut a = outbox(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let _stale = push_outbox(&mut a, 0, "a", 1, t0);
        let _bad = push_outbox(&mut a, 1, "b", 2, t0);
        a.flush();
        let d = a.dispatch(t0, 1, leader);
        for (_, r) in &d.requests {
            let answer = if r.partition == 0 {
                refused("DUPLICATE_SEQUENCE_NUMBER")
            } else {
                Err(ClientError::InvalidArgument("no".into()))
            };
            a.complete(r.request_id, answer, t0, |_| Duration::ZERO);
        }
        let (done, parked) = a.take_outbox_events();
        assert_eq!(done, [1], "stored, where no longer known: done");
        assert_eq!(parked.iter().map(|p| (p.ids.clone(), p.maybe_written)).collect::<Vec<_>>(), [(vec![2], false)]);
    }

    #[test]
    fn outbox_records_are_retried_past_the_delivery_timeout() {
        let mut a = outbox(5);
        let t0 = Instant::now();
        a.supply_producer_id(7, 0);
        let mut r = push_outbox(&mut a, 0, "a", 1, t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        let later = t0 + Duration::from_secs(3600);
        a.complete(id, Err(ClientError::Unavailable("down".into())), later, |_| Duration::ZERO);
        assert!(r.try_recv().is_err(), "not failed");
        let again = a.dispatch(later, 1, leader).requests;
        assert_eq!(stamp_of(&again[0].1), (7, 0, 0), "the same stamp");
    }

    #[test]
    fn records_accumulate_until_linger() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let _r: Vec<Outcome> = ["a", "b", "c"].iter().map(|v| push(&mut a, 0, v, t0)).collect();
        a.close_lingering(t0 + LINGER / 2);
        assert!(a.dispatch(t0, 1, leader).requests.is_empty(), "an open batch is not sent before its linger");
        assert_eq!(a.next_deadline(), Some(t0 + LINGER));
        a.close_lingering(t0 + LINGER);
        let d = a.dispatch(t0 + LINGER, 1, leader);
        assert_eq!(d.requests.len(), 1);
        let (addr, request) = &d.requests[0];
        assert_eq!(addr, "n1:1");
        assert_eq!((request.topic.as_str(), request.partition, request.producer_id), ("t", 0, None));
        assert_eq!(values(request), ["a", "b", "c"]);
    }

    #[test]
    fn size_limit_splits_batches_in_order() {
        let mut a = acc(200, 100);
        let t0 = Instant::now();
        let all: Vec<String> = (0..20).map(|i| format!("value-{i:02}-{}", "x".repeat(20))).collect();
        let _r: Vec<Outcome> = all.iter().map(|v| push(&mut a, 0, v, t0)).collect();
        a.flush();
        let d = a.dispatch(t0, 1, leader);
        assert!(d.requests.len() > 1, "20 records of ~40 bytes do not fit in 200 bytes");
        let mut seen = Vec::new();
        for (_, request) in &d.requests {
            assert!(request.batch.len() <= 200, "batch of {} bytes", request.batch.len());
            seen.extend(values(request));
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn a_record_larger_than_a_batch_is_refused() {
        let mut a = acc(200, 5);
        let (tx, _rx) = oneshot::channel();
        let big = ProducerRecord::new(Bytes::from(vec![0u8; 300]));
        let err = a.append("t", 0, &big, tx, Instant::now()).unwrap_err();
        assert!(matches!(err, ClientError::RecordTooLarge { limit: 200, .. }), "{err}");
        assert!(a.is_idle());
    }

    #[test]
    fn record_index_gives_the_offset() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r: Vec<Outcome> = ["a", "b", "c"].iter().map(|v| push(&mut a, 2, v, t0)).collect();
        a.flush();
        let d = a.dispatch(t0, 1, leader);
        let id = d.requests[0].1.request_id;
        let done = a.complete(id, ok(id, 100, 3), t0, |_| Duration::ZERO).unwrap();
        assert!(done.error.is_none());
        let offsets: Vec<u64> = r.iter_mut().map(offset).collect();
        assert_eq!(offsets, [100, 101, 102]);
        assert!(a.is_idle());
        assert_eq!(a.buffer.available_permits(), 3, "resolved records free their buffer room");
    }

    #[test]
    fn a_wrong_record_count_fails_the_batch() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r = push(&mut a, 0, "a", t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        a.complete(id, ok(id, 0, 2), t0, |_| Duration::ZERO);
        let err = r.try_recv().unwrap().unwrap_err();
        // The broker stored something: what exactly is unknown.
        assert!(matches!(&err, ClientError::MaybeWritten(e) if matches!(**e, ClientError::Protocol(_))), "{err}");
    }

    #[test]
    fn failed_batches_are_retried_in_order_after_in_flight_drains() {
        let mut a = acc(1 << 20, 2);
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        for v in ["b0", "b1", "b2"] {
            outcomes.push(push(&mut a, 0, v, t0));
            a.flush();
        }
        let first = a.dispatch(t0, 1, leader).requests;
        assert_eq!(first.len(), 2, "in_flight_max bounds the pipeline");
        let moved =
            ClientError::NotLeader { message: String::new(), leader_id: Some(2), leader_addr: Some("n2:1".into()) };
        let e = a.complete(first[0].1.request_id, Err(moved.clone()), t0, |_| Duration::from_secs(1)).unwrap();
        assert_eq!(e.error, Some(moved.clone()));
        // While b1 is still in flight nothing new goes out, not even b2.
        assert!(a.dispatch(t0, 1, leader).requests.is_empty());
        a.complete(first[1].1.request_id, Err(moved), t0, |_| Duration::from_secs(1));
        let n2 = |_: &str, _: u32| (Lookup::Leader("n2:1".into()), false);
        let again = a.dispatch(t0, 1, n2).requests;
        let sent: Vec<Vec<String>> = again.iter().map(|(_, r)| values(r)).collect();
        assert_eq!(sent, [["b0"], ["b1"]], "a hinted leader is retried at once, in the original order");
        assert!(again.iter().all(|(addr, _)| addr == "n2:1"));
        for (i, (_, r)) in again.iter().enumerate() {
            a.complete(r.request_id, ok(r.request_id, 10 + i as u64, 1), t0, |_| Duration::ZERO);
        }
        let last = a.dispatch(t0, 1, n2).requests;
        assert_eq!(values(&last[0].1), ["b2"]);
        a.complete(last[0].1.request_id, ok(last[0].1.request_id, 12, 1), t0, |_| Duration::ZERO);
        let offsets: Vec<u64> = outcomes.iter_mut().map(offset).collect();
        assert_eq!(offsets, [10, 11, 12]);
    }

    #[test]
    fn retries_back_off_and_stop_at_the_delivery_timeout() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r = push(&mut a, 0, "a", t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        let down = ClientError::Unavailable("down".into());
        a.complete(id, Err(down.clone()), t0, |n| Duration::from_millis(100 << n));
        assert!(a.dispatch(t0 + Duration::from_millis(99), 1, leader).requests.is_empty(), "backing off");
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_millis(100)));
        let id = a.dispatch(t0 + Duration::from_millis(100), 1, leader).requests[0].1.request_id;
        // The answer arrives after the delivery timeout: no more retries, the last error wins.
        a.complete(id, Err(down.clone()), t0 + Duration::from_secs(61), |_| Duration::ZERO);
        assert_eq!(r.try_recv().unwrap(), Err(down));
        assert!(a.is_idle());
    }

    #[test]
    fn a_definite_error_after_an_ambiguous_attempt_is_ambiguous() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut lost = push(&mut a, 0, "answer lost", t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        a.complete(id, Err(ClientError::timeout("produce answer", Duration::from_secs(1))), t0, |_| Duration::ZERO);
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        let refused = ClientError::InvalidArgument("no".into());
        a.complete(id, Err(refused.clone()), t0, |_| Duration::ZERO);
        let err = lost.try_recv().unwrap().unwrap_err();
        assert_eq!(err, ClientError::MaybeWritten(Box::new(refused.clone())));
        assert!(err.is_ambiguous(), "the first attempt may have stored it");

        let mut moved = push(&mut a, 0, "refused twice", t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        let not_leader = ClientError::NotLeader { message: String::new(), leader_id: None, leader_addr: None };
        a.complete(id, Err(not_leader), t0, |_| Duration::ZERO);
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        a.complete(id, Err(refused.clone()), t0, |_| Duration::ZERO);
        assert_eq!(moved.try_recv().unwrap(), Err(refused), "no attempt could have stored it");
    }

    #[test]
    fn a_passed_backoff_is_no_deadline() {
        let mut a = acc(1 << 20, 1);
        let t0 = Instant::now();
        let _r: Vec<Outcome> = ["b0", "b1"]
            .iter()
            .map(|v| {
                let rx = push(&mut a, 0, v, t0);
                a.flush();
                rx
            })
            .collect();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        a.complete(id, Err(ClientError::Unavailable("down".into())), t0, |_| Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(a.next_deadline(), Some(t1), "the backoff");
        assert_eq!(a.dispatch(t1, 1, leader).requests.len(), 1, "b0 again; b1 waits for room in the pipeline");
        let later = t1 + Duration::from_secs(1);
        assert!(a.dispatch(later, 1, leader).requests.is_empty(), "the pipeline is full");
        assert_eq!(
            a.next_deadline(),
            Some(t0 + Duration::from_secs(60)),
            "only b1's delivery timeout: a deadline in the past would make the sender spin"
        );
    }

    #[test]
    fn batches_without_a_leader_expire() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r = push(&mut a, 0, "a", t0);
        a.flush();
        let none = |_: &str, _: u32| (Lookup::NoLeader, false);
        assert!(a.dispatch(t0, 1, none).wants_refresh);
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(60)));
        a.dispatch(t0 + Duration::from_secs(60), 1, none);
        assert!(matches!(r.try_recv().unwrap(), Err(ClientError::Timeout { .. })));
    }

    #[test]
    fn unknown_partitions_fail_after_a_refresh() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r = push(&mut a, 7, "a", t0);
        a.flush();
        let unknown = |_: &str, _: u32| (Lookup::Unknown, false);
        assert!(a.dispatch(t0, 1, unknown).wants_refresh);
        a.dispatch(t0, 1, unknown);
        assert!(r.try_recv().is_err(), "no verdict before the cache was refreshed");
        a.dispatch(t0, 2, unknown);
        assert!(matches!(r.try_recv().unwrap(), Err(ClientError::NotFound(_))));
        // The unknown partition's queue is gone with its last batch (a deleted topic's too).
        assert!(a.topics.is_empty());
        assert!(a.is_idle());
    }

    #[test]
    fn non_retriable_errors_fail_at_once() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let mut r = push(&mut a, 0, "a", t0);
        a.flush();
        let id = a.dispatch(t0, 1, leader).requests[0].1.request_id;
        let stream_error = pb::ProduceResponse {
            request_id: id,
            error: Some(pb::Error {
                code: tonic::Code::InvalidArgument as i32,
                message: "bad".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        a.complete(id, Ok(stream_error), t0, |_| Duration::ZERO);
        assert_eq!(r.try_recv().unwrap(), Err(ClientError::InvalidArgument("bad".into())));
    }

    #[test]
    fn sticky_partition_moves_when_its_batch_closes() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let p = a.sticky_partition("t", 3, || 2);
        assert_eq!(p, 2);
        let _r = push(&mut a, p, "a", t0);
        assert_eq!(a.sticky_partition("t", 3, || 0), 2, "stays while the batch is open");
        a.close_lingering(t0 + LINGER);
        assert_eq!(a.sticky_partition("t", 3, || 0), 0, "moves on (wrapping) once it closed");
    }

    /// Regression: the sticky partition was kept unwrapped (3 of 3 partitions) and compared with
    /// the wrapped one (0), so after its first wrap it never moved again and every unkeyed
    /// record landed in one partition. Over many batch closes it must keep going round.
    #[test]
    fn unkeyed_records_keep_spreading_over_every_partition() {
        let mut a = acc(1 << 20, 1_000);
        let t0 = Instant::now();
        let mut per_partition = [0u32; 3];
        let mut order = Vec::new();
        let mut outcomes = Vec::new();
        for round in 0..30u32 {
            let now = t0 + LINGER * round;
            let p = a.sticky_partition("t", 3, || 1);
            per_partition[p as usize] += 1;
            order.push(p);
            outcomes.push(push(&mut a, p, "x", now));
            // Alternate the two ways a batch closes: linger, and flush.
            if round % 2 == 0 {
                a.close_lingering(now + LINGER);
            } else {
                drop(a.flush());
            }
        }
        assert_eq!(per_partition, [10, 10, 10], "batches in order {order:?}");
        // Partition counts can change under the producer (added partitions): still in range.
        for count in [2, 5, 1] {
            assert!(a.sticky_partition("t", count, || 0) < count);
        }
    }

    #[test]
    fn flush_waits_for_every_unresolved_batch() {
        let mut a = acc(1 << 20, 5);
        let t0 = Instant::now();
        let _r0 = push(&mut a, 0, "a", t0);
        let _r1 = push(&mut a, 1, "b", t0);
        let mut waiters = a.flush();
        assert_eq!(waiters.len(), 2);
        let pending = |w: &mut oneshot::Receiver<()>| w.try_recv() == Err(oneshot::error::TryRecvError::Empty);
        let d = a.dispatch(t0, 1, leader);
        assert!(waiters.iter_mut().all(pending), "nothing is resolved before an answer");
        let (_, first) = &d.requests[0];
        a.complete(first.request_id, ok(first.request_id, 0, 1), t0, |_| Duration::ZERO);
        assert_eq!(waiters.iter_mut().map(pending).filter(|p| *p).count(), 1, "one batch still in flight");
        let (_, second) = &d.requests[1];
        a.complete(second.request_id, Err(ClientError::InvalidArgument("no".into())), t0, |_| Duration::ZERO);
        assert!(waiters.iter_mut().all(|w| w.try_recv() == Err(oneshot::error::TryRecvError::Closed)));
    }
}
