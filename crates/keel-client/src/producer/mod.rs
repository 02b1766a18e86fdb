//! The producer: records accumulate into one batch per partition, batches are pipelined to the
//! partition leaders over `ProduceStream`, and each record's future resolves with its offset.
//!
//! Delivery is at least once: a batch whose answer was lost (timeout, broken connection,
//! UNAVAILABLE) is sent again and may then be stored twice. That ends with the idempotent
//! producer (producer id, epoch and sequence numbers), which this client does not implement yet.
//!
//! Ordering: a partition's batches are sent, and retried, in the order they were closed. When a
//! batch fails, nothing more is sent to its partition until every request in flight there has
//! answered, and then the failed batches go out again in their order. Batches that were
//! acknowledged meanwhile stay where they are, so a failure in the middle of a pipeline can
//! reorder batches (as in Kafka without idempotence); `in_flight_max: 1` avoids that.

pub(crate) mod accumulator;
mod delayed;
mod stream;

pub use self::delayed::{DELIVER_AT_HEADER, DeliverAt, TIMER_ID_HEADER};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use keel_proto::v1 as pb;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use self::accumulator::{Accumulator, Limits};
use self::stream::{Event, StreamHandle};
use crate::config::ClientConfig;
use crate::core::Core;
use crate::error::ClientError;
use crate::outbox::{Outbox, OutboxConfig, OutboxStats, ParkedBatch};
use crate::partitioner::partition_for_key;

/// Salt of the producer's random stream (see [`Core::new`]).
const SALT: u64 = 0x9e0d;

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent.
    pub linger: Duration,
    /// Largest encoded batch; must not exceed the brokers' limit. A record that does not fit in
    /// a batch of its own is refused.
    pub batch_bytes_max: usize,
    /// Most unacknowledged requests per partition.
    pub in_flight_max: usize,
    /// Most records buffered or in flight; `send` waits for room beyond it.
    pub buffer_records_max: usize,
    /// How long a batch is retried, counted from its first record; then its records fail with
    /// the last error.
    pub delivery_timeout: Duration,
    /// Stamp every batch with a producer id (InitProducerId), epoch and per-partition sequence,
    /// so that the partition leader writes a retried batch once and answers it with the first
    /// attempt's offsets. On by default; off, a batch whose acknowledgement was lost may be
    /// written twice. Needs `in_flight_max` <= 16 (the batches a partition remembers per
    /// producer).
    pub idempotence: bool,
    /// A stable identity (Kafka's `transactional.id`; needs idempotence): every instance of the
    /// producer started with it keeps the same producer id at a higher epoch, and a partition
    /// that has seen the newer epoch refuses the older instances' batches. An instance that is
    /// refused so (PRODUCER_FENCED) stops: every record it holds and every later `send` fails
    /// with that error, so a zombie left by a failover cannot write next to its replacement.
    /// `None` (the default): a new anonymous id per producer.
    pub identity: Option<String>,
}

impl Default for ProducerConfig {
    fn default() -> ProducerConfig {
        ProducerConfig {
            linger: Duration::from_millis(5),
            batch_bytes_max: 1 << 20,
            in_flight_max: 5,
            buffer_records_max: 100_000,
            delivery_timeout: Duration::from_secs(60),
            idempotence: true,
            identity: None,
        }
    }
}

/// Longest stable producer identity, in bytes (as the brokers check it).
pub const PRODUCER_IDENTITY_BYTES_MAX: usize = 255;

/// Batches a partition remembers per idempotent producer: a retry of any of them is recognised.
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 16;

impl ProducerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ClientError> {
        let batch_min = keel_record::HEADER_LEN + 16;
        if !(batch_min..=keel_record::BATCH_BYTES_MAX).contains(&self.batch_bytes_max) {
            return Err(ClientError::Config(format!(
                "batch_bytes_max {} is outside {batch_min}..={}",
                self.batch_bytes_max,
                keel_record::BATCH_BYTES_MAX
            )));
        }
        if self.in_flight_max == 0 {
            return Err(ClientError::Config("in_flight_max must be at least 1".into()));
        }
        if self.idempotence && self.in_flight_max > IDEMPOTENT_IN_FLIGHT_MAX {
            return Err(ClientError::Config(format!(
                "with idempotence, in_flight_max must be at most {IDEMPOTENT_IN_FLIGHT_MAX} (the batches a partition remembers per producer)"
            )));
        }
        if let Some(identity) = &self.identity {
            if !self.idempotence {
                return Err(ClientError::Config("a producer identity needs idempotence".into()));
            }
            if identity.is_empty()
                || identity.len() > PRODUCER_IDENTITY_BYTES_MAX
                || identity.chars().any(char::is_control)
            {
                return Err(ClientError::Config(format!(
                    "a producer identity has 1 to {PRODUCER_IDENTITY_BYTES_MAX} bytes and no control characters"
                )));
            }
        }
        if self.buffer_records_max == 0 || self.buffer_records_max > Semaphore::MAX_PERMITS {
            return Err(ClientError::Config(format!("buffer_records_max must be in 1..={}", Semaphore::MAX_PERMITS)));
        }
        if self.delivery_timeout.is_zero() {
            return Err(ClientError::Config("delivery_timeout must be positive".into()));
        }
        Ok(())
    }
}

/// A record to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// The key; keyed records go to `fnv1a_64(key) mod partition_count`.
    pub key: Option<Bytes>,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the Unix epoch; 0 lets the broker stamp its own time.
    pub timestamp_ms: i64,
    /// An explicit partition, overriding the key.
    pub partition: Option<u32>,
}

impl ProducerRecord {
    /// A record with a value and nothing else.
    pub fn new(value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord { value: Some(value.into()), ..ProducerRecord::default() }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> ProducerRecord {
        self.key = Some(key.into());
        self
    }

    /// Sets an explicit partition.
    pub fn with_partition(mut self, partition: u32) -> ProducerRecord {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: Option<Bytes>) -> ProducerRecord {
        self.headers.push((key.into(), value));
        self
    }

    /// Sets the timestamp (ms since the Unix epoch).
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> ProducerRecord {
        self.timestamp_ms = timestamp_ms;
        self
    }
}

/// Where an acknowledged record was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The record's offset in the partition.
    pub offset: u64,
}

/// Resolves once the record is acknowledged (or has failed for good). After a failure for which
/// [`ClientError::is_ambiguous`] holds, the record may be stored all the same.
#[derive(Debug)]
#[must_use = "a record's outcome is only known by awaiting its DeliveryFuture"]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<RecordMetadata, ClientError>>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A dropped sender means the producer went away with the record unresolved.
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

struct Shared {
    core: Arc<Core>,
    config: ProducerConfig,
    acc: Mutex<Accumulator>,
    buffer: Arc<Semaphore>,
    /// Wakes the sender task: a batch opened or closed, a flush, a stop.
    wake: Notify,
    /// No more sends (close started).
    closing: AtomicBool,
    /// The sender task must exit.
    stop: AtomicBool,
    /// The durable outbox, when the producer has one.
    outbox: Option<Arc<Outbox>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends records to Keel. Cheap to share behind an `Arc`; `send` takes `&self`.
pub struct Producer {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer; its sender task starts at once on the current tokio runtime, and nothing is
    /// dialled until the first record.
    pub fn new(config: ClientConfig, producer: ProducerConfig) -> Result<Producer, ClientError> {
        Producer::build(config, producer, None)
    }

    /// A producer with a durable outbox (see the crate's `outbox` module and the README):
    /// `send` appends each record to the outbox's log and flushes it before it returns, and
    /// the record leaves the log only once stored. Opening recovers the log and sends again
    /// what it holds: batches stamped before a restart with exactly their stamps (so a
    /// partition that stored them answers them as duplicates), records never stamped under a
    /// new producer id. Records are retried until stored (`delivery_timeout` only bounds how
    /// long `close` waits); one that cannot be stored is parked with an alarm and stays in the
    /// outbox. Needs idempotence and no stable `identity`. An outbox I/O error (a full disk, a
    /// failed fsync) fails that `send` and stops the producer: open it again to continue.
    pub async fn with_outbox(
        config: ClientConfig,
        producer: ProducerConfig,
        outbox: OutboxConfig,
    ) -> Result<Producer, ClientError> {
        producer.validate()?;
        outbox.validate()?;
        if !producer.idempotence || producer.identity.is_some() {
            return Err(ClientError::Config(
                "an outbox needs an idempotent producer without a stable identity (a new epoch would fence the batches it re-sends)".into(),
            ));
        }
        let skip_stamps = outbox.negative_control_skip_stamps;
        let (outbox, restored) = Outbox::open(outbox, skip_stamps).await?;
        let outbox = Arc::new(outbox);
        outbox.park(restored.parked);
        let this = Producer::build(config, producer, Some(outbox))?;
        {
            let now = Instant::now();
            let shared = &this.shared;
            let mut acc = lock(&shared.acc);
            for b in restored.stamped {
                acc.restore_batch(&b.topic, b.partition, b.ids, b.bytes, Some(b.stamp), now);
            }
            for r in restored.unstamped {
                // Nobody waits for these futures; the records hold buffer room until stored.
                let (tx, _rx) = oneshot::channel();
                shared.buffer.forget_permits(1);
                if let Err(error) = acc.append_with_id(&r.topic, r.partition, &r.record, tx, now, Some(r.id)) {
                    // Only a smaller batch_bytes_max than the record was written with gets here:
                    // sent alone, in a batch of its own.
                    warn!(%error, id = r.id, "outbox: a recovered record does not fit a batch; sent alone");
                    match crate::outbox::single_batch(&r) {
                        Ok(bytes) => acc.restore_batch(&r.topic, r.partition, vec![r.id], bytes, None, now),
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        this.shared.wake.notify_one();
        Ok(this)
    }

    fn build(
        config: ClientConfig,
        producer: ProducerConfig,
        outbox: Option<Arc<Outbox>>,
    ) -> Result<Producer, ClientError> {
        producer.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ClientError::Config("a Producer must be created inside a tokio runtime".into()))?;
        let core = Arc::new(Core::new(config, SALT)?);
        let buffer = Arc::new(Semaphore::new(producer.buffer_records_max));
        let limits = Limits {
            batch_bytes_max: producer.batch_bytes_max,
            linger: producer.linger,
            in_flight_max: producer.in_flight_max,
            // Outbox records are retried until stored: the outbox is their durable buffer.
            delivery_timeout: if outbox.is_some() { OUTBOX_RETRY_FOREVER } else { producer.delivery_timeout },
            idempotent: producer.idempotence,
            outbox: outbox.is_some(),
        };
        let shared = Arc::new(Shared {
            core,
            config: producer,
            acc: Mutex::new(Accumulator::new(limits, buffer.clone())),
            buffer,
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            outbox,
        });
        let task = runtime.spawn(Sender::new(shared.clone()).run());
        Ok(Producer { shared, task: Mutex::new(Some(task)) })
    }

    /// Queues a record, waiting while `buffer_records_max` records are unresolved. The returned
    /// future resolves when the record is acknowledged; an error here means the record was not
    /// queued (too large, unknown topic or partition, producer closed).
    ///
    /// With an outbox, `Ok` means the record is in the outbox's log, flushed: it will be stored
    /// exactly once even if this process dies now, and its future resolves once it is stored.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture, ClientError> {
        if self.shared.outbox.is_some() {
            let mut futures = self.send_outbox(vec![(topic.to_owned(), record)], None).await?;
            return futures.pop().ok_or(ClientError::Closed);
        }
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(error) = lock(&self.shared.acc).fenced() {
            return Err(error.clone());
        }
        let permit = self.shared.buffer.acquire().await.map_err(|_| ClientError::Closed)?;
        let partition = self.partition_for(topic, &record).await?;
        let (tx, rx) = oneshot::channel();
        let wake = lock(&self.shared.acc).append(topic, partition, &record, tx, Instant::now())?;
        // The permit now belongs to the record; the accumulator gives it back on resolution.
        permit.forget();
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(DeliveryFuture { rx })
    }

    /// Sends records (each with its topic) as one durable outbox write: one flush for all, and
    /// `mark` (an external id, e.g. the highest database row id among them) recorded in the same
    /// write, so that [`Producer::outbox_mark`] tells after any crash whether they were handed
    /// over. Needs an outbox; see [`crate::relay_once`].
    pub async fn send_marked(
        &self,
        records: Vec<(String, ProducerRecord)>,
        mark: u64,
    ) -> Result<Vec<DeliveryFuture>, ClientError> {
        if self.shared.outbox.is_none() {
            return Err(ClientError::Config("send_marked needs a producer with an outbox".into()));
        }
        self.send_outbox(records, Some(mark)).await
    }

    /// Sends records (each with its topic) as one durable outbox write when the producer has an
    /// outbox (one flush for all), or one by one otherwise.
    pub async fn send_all(&self, records: Vec<(String, ProducerRecord)>) -> Result<Vec<DeliveryFuture>, ClientError> {
        if self.shared.outbox.is_some() {
            return self.send_outbox(records, None).await;
        }
        let mut futures = Vec::with_capacity(records.len());
        for (topic, record) in records {
            futures.push(self.send(&topic, record).await?);
        }
        Ok(futures)
    }

    async fn send_outbox(
        &self,
        records: Vec<(String, ProducerRecord)>,
        mark: Option<u64>,
    ) -> Result<Vec<DeliveryFuture>, ClientError> {
        let Some(outbox) = &self.shared.outbox else { return Err(ClientError::Closed) };
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(error) = lock(&self.shared.acc).fenced() {
            return Err(error.clone());
        }
        let count = u32::try_from(records.len())
            .ok()
            .filter(|n| (*n as usize) <= self.shared.config.buffer_records_max)
            .ok_or_else(|| ClientError::InvalidArgument("more records in one call than buffer_records_max".into()))?;
        let permit =
            Arc::clone(&self.shared.buffer).acquire_many_owned(count).await.map_err(|_| ClientError::Closed)?;
        let mut routed = Vec::with_capacity(records.len());
        for (topic, record) in records {
            let partition = self.partition_for(&topic, &record).await?;
            check_encodable(&record, self.shared.config.batch_bytes_max)?;
            routed.push((topic, partition, record.with_partition(partition)));
        }
        let bytes: usize = routed
            .iter()
            .map(|(t, _, r)| t.len() + r.key.as_ref().map_or(0, Bytes::len) + r.value.as_ref().map_or(0, Bytes::len))
            .sum();
        if bytes > OUTBOX_CALL_BYTES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "{bytes} bytes in one outbox call; at most {OUTBOX_CALL_BYTES_MAX}"
            )));
        }
        // The append and the hand-over to the accumulator run in a task of their own: a caller
        // that goes away (a cancelled `send`) must not leave a durable record that this
        // process never sends.
        let (outbox, shared) = (Arc::clone(outbox), Arc::clone(&self.shared));
        let handed = tokio::spawn(async move {
            // Durable from here on, whatever happens to this process.
            let ids = outbox.append(routed.clone(), mark).await?;
            let now = Instant::now();
            let mut futures = Vec::with_capacity(ids.len());
            let mut wake = false;
            {
                let mut acc = lock(&shared.acc);
                for ((topic, partition, record), id) in routed.iter().zip(ids) {
                    let (tx, rx) = oneshot::channel();
                    let (refused, refusal) = oneshot::channel();
                    match acc.append_with_id(topic, *partition, record, tx, now, Some(id)) {
                        Ok(w) => {
                            wake |= w;
                            futures.push(DeliveryFuture { rx });
                        }
                        Err(error) => {
                            // Only a fence (another outbox error) refuses it now. The record is
                            // durable all the same and is sent when the outbox is opened again,
                            // so `send` still answers Ok (an Err would invite a second copy); its
                            // future tells that this process will not deliver it.
                            let _ = refused.send(Err(error));
                            futures.push(DeliveryFuture { rx: refusal });
                        }
                    }
                }
            }
            permit.forget();
            if wake {
                shared.wake.notify_one();
            }
            Ok::<_, ClientError>(futures)
        });
        let futures = handed.await.map_err(|_| ClientError::Closed)??;
        Ok(futures)
    }

    /// The outbox's gauges (`None` without an outbox): pending records and bytes, log bytes,
    /// the oldest pending record's age, parked batches.
    pub fn outbox_stats(&self) -> Option<OutboxStats> {
        self.shared.outbox.as_ref().map(|o| o.stats())
    }

    /// The latest mark given to [`Producer::send_marked`] (durable), `None` before any.
    pub fn outbox_mark(&self) -> Result<Option<u64>, ClientError> {
        match &self.shared.outbox {
            Some(o) => Ok(o.mark()),
            None => Err(ClientError::Config("the producer has no outbox".into())),
        }
    }

    /// The outbox batches parked with an alarm: refused for good, or possibly stored under a
    /// producer id the partition has since forgotten (then only the user can tell whether
    /// sending it again duplicates it).
    pub fn outbox_parked(&self) -> Vec<ParkedBatch> {
        self.shared.outbox.as_ref().map(|o| o.parked()).unwrap_or_default()
    }

    /// Drops a parked batch's records from the outbox for good (durably, before returning).
    pub async fn outbox_discard(&self, parked_id: u64) -> Result<(), ClientError> {
        let Some(outbox) = &self.shared.outbox else { return Err(ClientError::Config("no outbox".into())) };
        let out = outbox.unpark(parked_id)?;
        if let Err(e) = outbox.discard(out.ids.clone()).await {
            outbox.repark(parked_id, out);
            return Err(e);
        }
        Ok(())
    }

    /// Sends a parked batch again under a new stamp. If it may be stored already
    /// ([`ParkedBatch::maybe_written`]), this may store it twice: the caller has decided that
    /// it was not stored, or that a duplicate is acceptable.
    pub fn outbox_resend(&self, parked_id: u64) -> Result<(), ClientError> {
        let Some(outbox) = &self.shared.outbox else { return Err(ClientError::Config("no outbox".into())) };
        let out = outbox.unpark(parked_id)?;
        lock(&self.shared.acc).restore_batch(&out.topic, out.partition, out.ids, out.bytes, None, Instant::now());
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn partition_for(&self, topic: &str, record: &ProducerRecord) -> Result<u32, ClientError> {
        let core = &self.shared.core;
        let count = core.partition_count(topic).await?;
        match (record.partition, &record.key) {
            (Some(p), _) if p < count => Ok(p),
            (Some(p), _) => {
                // Partitions may have been added since the cache was filled.
                core.refresh().await?;
                let count = core.partition_count(topic).await?;
                if p < count {
                    Ok(p)
                } else {
                    Err(ClientError::NotFound(format!("topic {topic:?} has {count} partitions, not {}", p + 1)))
                }
            }
            (None, Some(key)) => Ok(partition_for_key(key, count)),
            (None, None) => Ok(lock(&self.shared.acc).sticky_partition(topic, count, || core.random_below(count))),
        }
    }

    /// Sends every buffered record now and waits until everything sent before this call is
    /// acknowledged or has failed.
    pub async fn flush(&self) {
        let waiters = lock(&self.shared.acc).flush();
        self.shared.wake.notify_one();
        for waiter in waiters {
            // An error only means the batch was dropped, which also resolves it.
            let _ = waiter.await;
        }
    }

    /// Refuses new records, flushes, and stops the background tasks. Records that raced with
    /// the close fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(outbox) = &self.shared.outbox {
            // Outbox records are retried until stored; what is not stored by then stays in the
            // outbox for the next open.
            let _ = tokio::time::timeout(self.shared.config.delivery_timeout, self.flush()).await;
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_one();
            let task = lock(&self.task).take();
            if let Some(task) = task {
                let _ = task.await;
            }
            let (done, parked) = lock(&self.shared.acc).take_outbox_events();
            outbox.done(done);
            outbox.park(parked);
            if let Err(error) = outbox.sync_done().await {
                warn!(%error, "outbox: the last done entries were not written (their records are sent again on open)");
            }
            outbox.stop();
        } else {
            self.flush().await;
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        // Whatever is left now can never be sent: dropping it resolves its futures as Closed.
        let leftover = {
            let mut acc = lock(&self.shared.acc);
            let empty = Accumulator::new(acc.limits(), self.shared.buffer.clone());
            std::mem::replace(&mut *acc, empty)
        };
        drop(leftover);
        self.shared.buffer.close();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // Aborting drops the sender task's streams, which ends the stream tasks; unresolved
        // futures then resolve as Closed. Nothing here waits.
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        // Tasks that outlive the producer (a send in flight, the outbox's writer) must not
        // write to an outbox that another instance may open next.
        if let Some(outbox) = &self.shared.outbox {
            outbox.stop();
        }
    }
}

/// How long outbox records are retried: for ever, in effect (an `Instant` must not overflow).
const OUTBOX_RETRY_FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Most bytes of records in one outbox call (one log frame holds them all).
const OUTBOX_CALL_BYTES_MAX: usize = 32 << 20;

/// Refuses a record that no batch of `batch_bytes_max` can hold, before it enters the outbox.
fn check_encodable(record: &ProducerRecord, batch_bytes_max: usize) -> Result<(), ClientError> {
    let headers: Vec<(&str, Option<&[u8]>)> = record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
    let new = keel_record::NewRecord {
        timestamp_ms: record.timestamp_ms,
        key: record.key.as_deref(),
        value: record.value.as_deref(),
        headers: &headers,
    };
    match keel_record::BatchBuilder::new(batch_bytes_max).push(new) {
        Ok(()) => Ok(()),
        Err(keel_record::EncodeError::TooLarge { size, limit }) => Err(ClientError::RecordTooLarge { size, limit }),
        Err(keel_record::EncodeError::Invalid(why)) => Err(ClientError::InvalidArgument(why.to_owned())),
    }
}

/// Whether an error says that the node it came from could not serve the partition it was taken
/// for the leader of, and knows no better: it refused without naming a leader, or gave up, or
/// did not answer. Such a node may be a leader cut off from its followers, whose metadata still
/// names itself or nobody, so the next metadata refresh asks the other nodes first.
fn cannot_serve(error: &ClientError) -> bool {
    match error {
        ClientError::NotLeader { .. } => error.leader_hint().is_none(),
        ClientError::MaybeWritten(last) => cannot_serve(last),
        _ => matches!(
            error,
            ClientError::Unavailable(_)
                | ClientError::DeadlineExceeded(_)
                | ClientError::Timeout { .. }
                | ClientError::Transport(_)
        ),
    }
}

/// The sender task: closes lingering batches, sends ready ones, and processes answers.
struct Sender {
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    streams: BTreeMap<String, StreamHandle>,
    next_stream_id: u64,
    refresh_running: bool,
    refresh_wanted: bool,
    refresh_not_before: Instant,
    /// Refreshes in a row that did not leave every partition with a leader: they back off.
    refresh_streak: u32,
    /// An InitProducerId call is running.
    id_running: bool,
    /// No InitProducerId call before this (backoff after a failure).
    id_not_before: Instant,
    id_failures: u32,
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Sender {
        let (events_tx, events) = mpsc::unbounded_channel();
        Sender {
            shared,
            events,
            events_tx,
            streams: BTreeMap::new(),
            next_stream_id: 0,
            refresh_running: false,
            refresh_wanted: false,
            refresh_not_before: Instant::now(),
            refresh_streak: 0,
            id_running: false,
            id_not_before: Instant::now(),
            id_failures: 0,
        }
    }

    async fn run(mut self) {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            let (dispatch, next) = {
                let core = &self.shared.core;
                let mut acc = lock(&self.shared.acc);
                acc.close_lingering(now);
                let dispatch = acc.dispatch(now, core.metadata_version(), |t, p| core.cached_leader(t, p));
                (dispatch, acc.next_deadline())
            };
            let accumulator::Dispatch { requests, wants_refresh, wants_producer_id, stamps } = dispatch;
            let stamped = match (&self.shared.outbox, stamps.is_empty()) {
                (Some(outbox), false) => outbox.stamp(stamps).await,
                _ => Ok(()),
            };
            match stamped {
                Ok(()) => {
                    for (addr, request) in requests {
                        self.send_to(addr, request);
                    }
                }
                Err(error) => {
                    // The stamps are not durable, so the batches must not go out: a restart
                    // would stamp them afresh. The producer stops; the records stay in the
                    // outbox for the next open.
                    warn!(%error, "outbox: a stamp could not be written; the producer stops");
                    let mut acc = lock(&self.shared.acc);
                    acc.fence(error.clone());
                    for (_, request) in requests {
                        acc.abandon(request.request_id, &error);
                    }
                }
            }
            let now = Instant::now();
            let mut next = next;
            if let Some(outbox) = self.shared.outbox.clone() {
                match outbox.done_deadline() {
                    Some(at) if at <= now => {
                        if let Err(error) = outbox.sync_done().await {
                            warn!(%error, "outbox: done entries could not be written; the producer stops");
                            lock(&self.shared.acc).fence(error);
                        }
                    }
                    Some(at) => next = Some(next.map_or(at, |n: Instant| n.min(at))),
                    None => {}
                }
            }
            if wants_refresh {
                self.refresh_wanted = true;
            } else if !self.refresh_running {
                self.refresh_streak = 0;
            }
            self.maybe_refresh(now);
            let id_at = if wants_producer_id && !self.id_running {
                if now >= self.id_not_before {
                    self.fetch_producer_id();
                    None
                } else {
                    Some(self.id_not_before)
                }
            } else {
                None
            };
            let next = match (next, id_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let refresh_at = (self.refresh_wanted && !self.refresh_running).then_some(self.refresh_not_before);
            let wake_at = match (next, refresh_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                event = self.events.recv() => {
                    if let Some(event) = event {
                        self.handle(event);
                    }
                }
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep_until(wake_at.unwrap_or(now)), if wake_at.is_some() => {}
            }
            // Answers come in bursts; take them all before the next dispatch.
            while let Ok(event) = self.events.try_recv() {
                self.handle(event);
            }
            if let Some(outbox) = &self.shared.outbox {
                let (done, parked) = lock(&self.shared.acc).take_outbox_events();
                outbox.done(done);
                outbox.park(parked);
            }
        }
        debug!("producer sender task stopped");
    }

    fn send_to(&mut self, addr: String, request: keel_proto::v1::ProduceRequest) {
        let handle = self.streams.entry(addr.clone()).or_insert_with(|| {
            let id = self.next_stream_id;
            self.next_stream_id += 1;
            stream::start(self.shared.core.clone(), addr.clone(), id, self.events_tx.clone())
        });
        if let Err(mpsc::error::SendError(request)) = handle.tx.send(request) {
            // The stream just ended and is failing its requests; failing this one too (rather
            // than sending it on a new stream) keeps the partition's batches in order, because
            // the partition then drains and re-sends all of them in sequence.
            self.streams.remove(&addr);
            let error = ClientError::Transport(format!("produce stream to {addr} closed"));
            let answered = Event::Answered { addr, request_id: request.request_id, result: Err(error) };
            let _ = self.events_tx.send(answered);
        }
    }

    /// Asks any node for a producer id; the answer comes back as an event. With a stable
    /// identity, the first call takes the identity over (fencing older instances), and each
    /// later one claims the id and epoch this instance holds, so that it gets the next epoch
    /// only if no other instance took over meanwhile.
    fn fetch_producer_id(&mut self) {
        self.id_running = true;
        let core = self.shared.core.clone();
        let events = self.events_tx.clone();
        let identity = self.shared.config.identity.clone();
        let claimed = identity.as_ref().and_then(|_| lock(&self.shared.acc).latest_producer_id());
        let request = pb::InitProducerIdRequest {
            producer_identity: identity,
            producer_id: claimed.map(|c| c.0),
            producer_epoch: claimed.map(|c| i32::from(c.1)),
            // The same on every retry of this call: one whose first attempt took effect (its
            // answer lost) gets that attempt's epoch instead of fencing this very instance.
            request_token: self.shared.core.random_u64().max(1),
        };
        tokio::spawn(async move {
            let result = core
                .call_any("InitProducerId", |channel| {
                    let request = request.clone();
                    async move { pb::producer_client::ProducerClient::new(channel).init_producer_id(request).await }
                })
                .await
                .and_then(|r| {
                    let epoch = i16::try_from(r.producer_epoch).map_err(|_| {
                        ClientError::Protocol(format!("producer epoch {} out of range", r.producer_epoch))
                    })?;
                    if r.producer_id < 0 || epoch < 0 {
                        return Err(ClientError::Protocol(format!("producer id {} epoch {epoch}", r.producer_id)));
                    }
                    Ok((r.producer_id, epoch))
                });
            let _ = events.send(Event::ProducerId(result));
        });
    }

    fn maybe_refresh(&mut self, now: Instant) {
        if !self.refresh_wanted || self.refresh_running || now < self.refresh_not_before {
            return;
        }
        self.refresh_wanted = false;
        self.refresh_running = true;
        self.refresh_not_before = now + self.shared.core.backoff(self.refresh_streak);
        self.refresh_streak = self.refresh_streak.saturating_add(1);
        let core = self.shared.core.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = core.refresh().await;
            let _ = events.send(Event::Refreshed(result));
        });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Answered { addr, request_id, result } => {
                let core = &self.shared.core;
                let completion =
                    lock(&self.shared.acc).complete(request_id, result, Instant::now(), |n| core.backoff(n));
                let Some(completion) = completion else { return };
                let Some(error) = completion.error else { return };
                debug!(topic = completion.topic, partition = completion.partition, addr, %error, "produce failed");
                if cannot_serve(&error) {
                    core.distrust(&addr, crate::core::Doubt::CannotServe);
                }
                if matches!(error, ClientError::NotLeader { .. }) {
                    core.leader_moved(&completion.topic, completion.partition, &error);
                    self.refresh_wanted |= error.leader_hint().is_none();
                } else if error.stale_metadata() {
                    self.refresh_wanted = true;
                }
            }
            Event::StreamClosed { addr, id } => {
                if self.streams.get(&addr).is_some_and(|s| s.id == id) {
                    self.streams.remove(&addr);
                }
            }
            Event::ProducerId(result) => {
                self.id_running = false;
                match result {
                    Ok((id, epoch)) => {
                        self.id_failures = 0;
                        lock(&self.shared.acc).supply_producer_id(id, epoch);
                    }
                    Err(error) if matches!(&error, ClientError::Producer { reason, .. } if reason == "PRODUCER_FENCED") =>
                    {
                        warn!(%error, "another instance of this producer's identity took over; this one stops");
                        lock(&self.shared.acc).fence(error);
                    }
                    Err(error) => {
                        warn!(%error, "no producer id yet; batches wait for one");
                        self.id_not_before = Instant::now() + self.shared.core.backoff(self.id_failures);
                        self.id_failures = self.id_failures.saturating_add(1);
                    }
                }
            }
            Event::Refreshed(result) => {
                self.refresh_running = false;
                if let Err(error) = result {
                    warn!(%error, "metadata refresh failed");
                    self.refresh_wanted = true;
                }
            }
        }
    }
}
