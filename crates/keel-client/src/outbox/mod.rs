//! The durable client outbox: an opt-in producer mode ([`crate::Producer::with_outbox`]) in which
//! `send` first appends the record to a local, flushed, CRC-checked write-ahead log (`log.rs`)
//! and the record leaves it only once a partition has stored it.
//!
//! The exactly-once argument: the broker deduplicates per batch by (producer id, epoch, base
//! sequence, record count). A batch's stamp is made durable (a stamp entry, flushed) before the
//! batch goes on the wire, so every batch that may have reached a partition is re-sent after a
//! restart with exactly its stamp and records, and the partition answers it as a duplicate if it
//! stored it. Records that were never stamped never went out and get new stamps. A stored batch
//! is marked done (a done entry); done entries are flushed lazily (with the next write, or after
//! [`OutboxConfig::done_sync_interval`]), which only ever re-sends a few batches the partition
//! still remembers (at most `in_flight_max` per partition are stamped and not durably done).
//!
//! What the broker cannot recognise, the outbox does not guess at: a batch that may be stored
//! and whose producer the partition has forgotten (UNKNOWN_PRODUCER_ID: the producer expired)
//! is parked with an alarm, as is a batch refused for good; parked records stay in the log until
//! the user discards or re-sends them.

pub(crate) mod log;
mod relay;

pub use self::relay::{OutboxRow, OutboxStore, RelayError, relay_once};

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use keel_record::{BatchBuilder, NewRecord, ProducerStamp};
use keel_storage::{Disk, FileDisk};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use self::log::{Entry, OpenError, OutboxLog, RecordEntry, StampEntry};
use crate::error::ClientError;
use crate::producer::ProducerRecord;
use crate::producer::accumulator::{NewStamp, ParkedOut};

/// What `send` does when the outbox holds `bytes_max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room (acknowledged records free it), at most [`OutboxConfig::block_timeout`].
    Block,
    /// Fail at once with [`ClientError::OutboxFull`].
    Fail,
}

/// Called with every alarm (also logged with `tracing::error!`).
pub type AlarmHandler = Arc<dyn Fn(&OutboxAlarm) + Send + Sync>;

/// A wall clock: milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Settings of a producer's outbox.
#[derive(Clone)]
pub struct OutboxConfig {
    /// The directory of the log (created if missing); one producer at a time.
    pub dir: PathBuf,
    /// The file system: [`FileDisk`] for real files, a `SimDisk` in tests.
    pub disk: Arc<dyn Disk>,
    /// Most bytes of log files (preallocated segments); at least three times `segment_bytes`
    /// (a record is taken when the files, plus a segment a roll may add, stay within it). Stamp
    /// and done entries are never refused for room (they are what frees it), so the files may
    /// exceed it by a segment.
    pub bytes_max: u64,
    /// Size of each segment file; a segment is deleted once every record in it is done and
    /// every older one was deleted.
    pub segment_bytes: u64,
    /// What `send` does when the outbox is full.
    pub when_full: WhenFull,
    /// Longest wait for room with [`WhenFull::Block`].
    pub block_timeout: Duration,
    /// How long done entries may wait for a write to carry them before one is flushed for
    /// them alone.
    pub done_sync_interval: Duration,
    /// Run flushes on tokio's blocking pool (production) rather than inline (the simulation's
    /// disk, which never blocks).
    pub blocking_io: bool,
    /// Called with every alarm.
    pub on_alarm: Option<AlarmHandler>,
    /// The wall clock stamps are timed with (`None`: untimed). A partition's first batch under a
    /// producer id (sequence 0) re-sent after the brokers forgot that id would be taken for a new
    /// one, so such a batch stamped longer than `producer_expiry` ago is parked at open instead.
    pub wall_clock_ms: Option<WallClock>,
    /// Below the brokers' producer expiration (24 h by default), by a margin for clock error.
    pub producer_expiry: Duration,
    /// A deliberately broken outbox, for the simulation's negative control only: stamps are
    /// not written, so a restart stamps possibly stored batches afresh (duplicates).
    #[doc(hidden)]
    pub negative_control_skip_stamps: bool,
}

impl fmt::Debug for OutboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxConfig")
            .field("dir", &self.dir)
            .field("bytes_max", &self.bytes_max)
            .field("segment_bytes", &self.segment_bytes)
            .field("when_full", &self.when_full)
            .field("block_timeout", &self.block_timeout)
            .finish_non_exhaustive()
    }
}

impl OutboxConfig {
    /// An outbox in `dir` on the real file system: 256 MiB in 4 MiB segments, blocking when full.
    pub fn new(dir: impl Into<PathBuf>) -> OutboxConfig {
        // The production door to the wall clock: stamps are timed across restarts of the process.
        #[allow(clippy::disallowed_methods)]
        let clock: WallClock = Arc::new(|| {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
        OutboxConfig {
            blocking_io: true,
            wall_clock_ms: Some(clock),
            ..OutboxConfig::with_disk(Arc::new(FileDisk::new()), dir)
        }
    }

    /// An outbox in `dir` on `disk`, with the defaults of [`OutboxConfig::new`] (inline I/O:
    /// for simulated disks).
    pub fn with_disk(disk: Arc<dyn Disk>, dir: impl Into<PathBuf>) -> OutboxConfig {
        OutboxConfig {
            dir: dir.into(),
            disk,
            bytes_max: 256 << 20,
            segment_bytes: 4 << 20,
            when_full: WhenFull::Block,
            block_timeout: Duration::from_secs(30),
            done_sync_interval: Duration::from_millis(100),
            blocking_io: false,
            on_alarm: None,
            wall_clock_ms: None,
            producer_expiry: Duration::from_secs(23 * 3600),
            negative_control_skip_stamps: false,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.segment_bytes < 4096 {
            return Err(ClientError::Config("outbox segment_bytes must be at least 4096".into()));
        }
        if self.bytes_max < 3 * self.segment_bytes {
            return Err(ClientError::Config("outbox bytes_max must be at least three times segment_bytes".into()));
        }
        if self.done_sync_interval.is_zero() {
            return Err(ClientError::Config("outbox done_sync_interval must be positive".into()));
        }
        Ok(())
    }
}

/// The outbox's gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records not yet stored (parked ones included).
    pub records: u64,
    /// Their encoded size in the log.
    pub record_bytes: u64,
    /// Bytes of log files.
    pub log_bytes: u64,
    /// How long the oldest pending record has waited (records recovered at open count from
    /// the open).
    pub oldest_age: Option<Duration>,
    /// Parked batches.
    pub parked: u64,
    /// The latest external id relayed ([`crate::Producer::send_marked`]).
    pub mark: Option<u64>,
}

/// An alarm: a batch of outbox records that will not be sent again without a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxAlarm {
    /// The parked batch ([`crate::Producer::outbox_parked`]).
    pub parked_id: u64,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// How many records it holds.
    pub records: usize,
    /// Whether an earlier attempt may have stored it (then a re-send may duplicate it).
    pub maybe_written: bool,
    /// Why it stopped.
    pub error: ClientError,
}

/// A batch of outbox records that failed for good, kept in the outbox until the user decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedBatch {
    /// Its id, for [`crate::Producer::outbox_discard`] and [`crate::Producer::outbox_resend`].
    pub id: u64,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// The outbox ids of its records.
    pub record_ids: Vec<u64>,
    /// Its last stamp: (producer id, epoch, base sequence).
    pub stamp: Option<(i64, i16, i32)>,
    /// Whether an earlier attempt may have stored it.
    pub maybe_written: bool,
    /// Why it stopped.
    pub error: ClientError,
}

struct Pending {
    bytes: u64,
    /// First LSN of the segment holding the record entry, and of the one holding its latest
    /// stamp: both must stay until the record is done.
    record_segment: u64,
    stamp_segment: Option<u64>,
    since: Instant,
}

struct Parked {
    out: ParkedOut,
}

struct State {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    /// Done ids not yet written.
    done: Vec<u64>,
    done_since: Option<Instant>,
    parked: BTreeMap<u64, Parked>,
    next_parked: u64,
    /// Cached from the log for the gauges.
    log_bytes: u64,
    mark: Option<u64>,
    failed: Option<ClientError>,
}

/// What a reopened outbox holds to send again.
pub(crate) struct Restored {
    /// Batches stamped before the restart, in the order they were stamped.
    pub(crate) stamped: Vec<RestoredBatch>,
    /// Records never stamped, in the order they were appended.
    pub(crate) unstamped: Vec<RecordEntry>,
    /// Stamped batches too old to send again without a decision.
    pub(crate) parked: Vec<ParkedOut>,
}

/// A batch to send again with exactly its stamp.
pub(crate) struct RestoredBatch {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) ids: Vec<u64>,
    pub(crate) bytes: Bytes,
    pub(crate) stamp: (i64, i16),
}

/// A producer's outbox: the log plus what is pending in it.
pub(crate) struct Outbox {
    config: OutboxConfig,
    log: Arc<Mutex<OutboxLog>>,
    /// Frames to write, to the writer task (group commit).
    writes: mpsc::Sender<WriteRequest>,
    /// Cleared when the producer is dropped or closed: tasks still holding the outbox (a send
    /// in flight, the writer) touch the disk no more, so another instance may open it.
    alive: Arc<AtomicBool>,
    state: Mutex<State>,
    /// Signalled when segments were deleted (room for blocked sends).
    room: Notify,
    /// For the negative control of the simulation: stamps are not written, so a restart stamps
    /// batches that may be stored afresh (duplicates).
    skip_stamps: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_error(e: &io::Error) -> ClientError {
    ClientError::Outbox(e.to_string())
}

/// Encodes records as one batch (as the producer would) and stamps it.
fn build_batch(records: &[&RecordEntry], stamp: Option<ProducerStamp>) -> Result<Bytes, ClientError> {
    let mut builder = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for r in records {
        let headers: Vec<(&str, Option<&[u8]>)> =
            r.record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let new = NewRecord {
            timestamp_ms: r.record.timestamp_ms,
            key: r.record.key.as_deref(),
            value: r.record.value.as_deref(),
            headers: &headers,
        };
        builder.push(new).map_err(|e| ClientError::Outbox(format!("record {} cannot be encoded again: {e}", r.id)))?;
    }
    let mut bytes = builder.build().to_vec();
    if let Some(stamp) = stamp {
        keel_record::stamp_producer(&mut bytes, stamp)
            .map_err(|e| ClientError::Outbox(format!("a rebuilt batch cannot be stamped: {e}")))?;
    }
    Ok(Bytes::from(bytes))
}

/// One recovered record as a batch of its own, unstamped.
pub(crate) fn single_batch(record: &RecordEntry) -> Result<Bytes, ClientError> {
    build_batch(&[record], None)
}

fn entry_bytes(entry: &RecordEntry) -> u64 {
    let r = &entry.record;
    let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len) + 10).sum();
    (entry.topic.len() + r.key.as_ref().map_or(0, Bytes::len) + r.value.as_ref().map_or(0, Bytes::len) + headers + 40)
        as u64
}

impl Outbox {
    /// Opens the outbox: recovers the log and returns what must be sent again.
    pub(crate) async fn open(config: OutboxConfig, skip_stamps: bool) -> Result<(Outbox, Restored), ClientError> {
        config.validate()?;
        let (disk, dir, segment_bytes) = (Arc::clone(&config.disk), config.dir.clone(), config.segment_bytes);
        let opened = run_io(config.blocking_io, move || Ok(OutboxLog::open(disk, &dir, segment_bytes))).await?;
        let (log, recovered) = opened.map_err(|e| match e {
            OpenError::Io(e) => io_error(&e),
            OpenError::Corrupt(c) => {
                ClientError::OutboxCorrupt { path: c.path.display().to_string(), offset: c.offset, detail: c.detail }
            }
        })?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(dir = %config.dir.display(), bytes = recovered.torn_bytes, "outbox: a torn tail was dropped");
        }
        let now = Instant::now();
        let mut records: BTreeMap<u64, (RecordEntry, u64)> = BTreeMap::new();
        // Per record id: the index of its latest stamp in `stamps`.
        let mut stamp_of: BTreeMap<u64, usize> = BTreeMap::new();
        let mut stamps: Vec<(StampEntry, u64)> = Vec::new();
        let mut next_id = 0;
        for (segment, entry) in recovered.entries {
            match entry {
                Entry::Record(r) => {
                    next_id = next_id.max(r.id + 1);
                    records.insert(r.id, (r, segment));
                }
                Entry::Stamp(s) => {
                    for id in &s.ids {
                        stamp_of.insert(*id, stamps.len());
                    }
                    stamps.push((s, segment));
                }
                Entry::Done(ids) => {
                    for id in ids {
                        records.remove(&id);
                        stamp_of.remove(&id);
                    }
                }
                Entry::Mark(_) => {}
            }
        }
        let mut pending = BTreeMap::new();
        for (id, (r, segment)) in &records {
            let stamp_segment = stamp_of.get(id).map(|i| stamps[*i].1);
            pending.insert(*id, Pending { bytes: entry_bytes(r), record_segment: *segment, stamp_segment, since: now });
        }
        let mut restored = Restored { stamped: Vec::new(), unstamped: Vec::new(), parked: Vec::new() };
        let now_ms = config.wall_clock_ms.as_ref().map(|clock| clock());
        let expiry_ms = i64::try_from(config.producer_expiry.as_millis()).unwrap_or(i64::MAX);
        for (i, (stamp, _)) in stamps.iter().enumerate() {
            let live: Vec<u64> = stamp.ids.iter().copied().filter(|id| stamp_of.get(id) == Some(&i)).collect();
            if live.is_empty() {
                continue;
            }
            let corrupt = |detail: String| ClientError::OutboxCorrupt {
                path: config.dir.display().to_string(),
                offset: 0,
                detail,
            };
            // Batches are done and stamped as a whole: part of one pending is not a state the
            // writer can leave.
            if live.len() != stamp.ids.len() {
                return Err(corrupt(format!(
                    "only {} of the {} records of a stamped batch are pending",
                    live.len(),
                    stamp.ids.len()
                )));
            }
            let members: Vec<&RecordEntry> = match live.iter().map(|id| records.get(id).map(|(r, _)| r)).collect() {
                Some(m) => m,
                None => return Err(corrupt("a stamp names a record the log does not hold".into())),
            };
            let producer = ProducerStamp {
                producer_id: stamp.producer_id,
                producer_epoch: stamp.epoch,
                base_sequence: stamp.base_sequence,
            };
            let bytes = build_batch(&members, Some(producer))?;
            let age_ms = match (now_ms, stamp.stamped_at_ms) {
                (Some(now), Some(at)) => now.saturating_sub(at),
                _ => 0,
            };
            if stamp.base_sequence == 0 && age_ms > expiry_ms {
                // Only sequence 0 needs this: a later sequence of a forgotten producer is refused
                // by the partition (UNKNOWN_PRODUCER_ID), and parked then.
                restored.parked.push(ParkedOut {
                    topic: stamp.topic.clone(),
                    partition: stamp.partition,
                    ids: live,
                    bytes,
                    stamp: Some((stamp.producer_id, stamp.epoch, stamp.base_sequence)),
                    error: ClientError::OutboxStale { age_ms: age_ms as u64 },
                    maybe_written: true,
                });
                continue;
            }
            restored.stamped.push(RestoredBatch {
                topic: stamp.topic.clone(),
                partition: stamp.partition,
                ids: live,
                bytes,
                stamp: (stamp.producer_id, stamp.epoch),
            });
        }
        restored.unstamped =
            records.into_iter().filter(|(id, _)| !stamp_of.contains_key(id)).map(|(_, (r, _))| r).collect();
        let state = State {
            next_id,
            pending,
            done: Vec::new(),
            done_since: None,
            parked: BTreeMap::new(),
            next_parked: 0,
            log_bytes: log.bytes(),
            mark: log.mark(),
            failed: None,
        };
        tracing::info!(
            dir = %config.dir.display(),
            stamped = restored.stamped.len(),
            unstamped = restored.unstamped.len(),
            "outbox opened"
        );
        let log = Arc::new(Mutex::new(log));
        let (writes, requests) = mpsc::channel(WRITE_QUEUE_MAX);
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(writer(Arc::clone(&log), Arc::clone(&alive), config.blocking_io, requests));
        let outbox = Outbox { config, log, writes, alive, state: Mutex::new(state), room: Notify::new(), skip_stamps };
        Ok((outbox, restored))
    }

    /// Fails every later write with `error` (the first error wins).
    fn fail(&self, error: &ClientError) -> ClientError {
        lock(&self.state).failed.get_or_insert_with(|| error.clone()).clone()
    }

    /// Runs `work` on the log with the done entries waiting, then applies what became durable.
    async fn write(&self, mut entries: Vec<Entry>, done_only: bool) -> Result<(u64, Vec<u64>), ClientError> {
        let done = {
            let mut s = lock(&self.state);
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            s.done_since = None;
            std::mem::take(&mut s.done)
        };
        if done_only && done.is_empty() {
            return Ok((0, done));
        }
        if !done.is_empty() {
            entries.push(Entry::Done(done.clone()));
        }
        let (reply, answer) = oneshot::channel();
        let result = match self.writes.send(WriteRequest { entries, reply }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(ClientError::Outbox("the outbox writer stopped".into()))),
            Err(_) => Err(ClientError::Outbox("the outbox writer stopped".into())),
        };
        match result {
            Ok((segment, bytes)) => {
                lock(&self.state).log_bytes = bytes;
                Ok((segment, done))
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Forgets durably done records and deletes the segments nothing pending needs.
    async fn collect(&self, done: &[u64]) -> Result<(), ClientError> {
        if done.is_empty() {
            return Ok(());
        }
        let keep_from = {
            let mut s = lock(&self.state);
            for id in done {
                s.pending.remove(id);
            }
            s.pending.values().map(|p| p.record_segment.min(p.stamp_segment.unwrap_or(u64::MAX))).min()
        };
        let (log, alive) = (Arc::clone(&self.log), Arc::clone(&self.alive));
        let keep_from = keep_from.unwrap_or(u64::MAX);
        let removed = run_io(self.config.blocking_io, move || {
            let mut log = lock(&log);
            check_alive(&alive)?;
            let removed = log.remove_before(keep_from)?;
            Ok((removed, log.bytes()))
        })
        .await;
        match removed {
            Ok((removed, bytes)) => {
                lock(&self.state).log_bytes = bytes;
                if removed > 0 {
                    self.room.notify_waiters();
                }
                Ok(())
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Appends records (with their routed partitions) durably, and the mark if given; returns
    /// their outbox ids. Waits for room or fails, per [`OutboxConfig::when_full`].
    pub(crate) async fn append(
        &self,
        records: Vec<(String, u32, ProducerRecord)>,
        mark: Option<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        let size: u64 = records
            .iter()
            .map(|(t, p, r)| entry_bytes(&RecordEntry { id: 0, topic: t.clone(), partition: *p, record: r.clone() }))
            .sum();
        let deadline = Instant::now() + self.config.block_timeout;
        loop {
            // Registered before the check, so that room freed in between is not missed.
            let room = self.room.notified();
            let full = {
                let s = lock(&self.state);
                s.log_bytes + size + self.config.segment_bytes > self.config.bytes_max && !s.pending.is_empty()
            };
            if !full {
                break;
            }
            if self.config.when_full == WhenFull::Fail {
                return Err(ClientError::OutboxFull { bytes_max: self.config.bytes_max });
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(ClientError::OutboxFull { bytes_max: self.config.bytes_max });
            }
        }
        let now = Instant::now();
        let (entries, pending): (Vec<Entry>, Vec<(u64, u64)>) = {
            let mut s = lock(&self.state);
            let first = s.next_id;
            s.next_id += records.len() as u64;
            records
                .into_iter()
                .enumerate()
                .map(|(i, (topic, partition, record))| {
                    let entry = RecordEntry { id: first + i as u64, topic, partition, record };
                    let bytes = entry_bytes(&entry);
                    (Entry::Record(entry), (first + i as u64, bytes))
                })
                .unzip()
        };
        let mut entries = entries;
        if let Some(mark) = mark {
            entries.push(Entry::Mark(mark));
        }
        {
            // Pending before the write, at segment 0, which keeps every segment: a concurrent
            // collection must not delete the segment this write lands in before it is known.
            let mut s = lock(&self.state);
            for (id, bytes) in &pending {
                s.pending.insert(*id, Pending { bytes: *bytes, record_segment: 0, stamp_segment: None, since: now });
            }
        }
        let (segment, done) = self.write(entries, false).await?;
        {
            let mut s = lock(&self.state);
            for (id, _) in &pending {
                if let Some(p) = s.pending.get_mut(id) {
                    p.record_segment = segment;
                }
            }
            if let Some(mark) = mark {
                s.mark = Some(s.mark.map_or(mark, |m| m.max(mark)));
            }
        }
        self.collect(&done).await?;
        Ok(pending.into_iter().map(|(id, _)| id).collect())
    }

    /// Makes stamps durable; the batches they stamp may be sent once this returns `Ok`.
    pub(crate) async fn stamp(&self, stamps: Vec<NewStamp>) -> Result<(), ClientError> {
        if self.skip_stamps {
            return Ok(());
        }
        let stamped_at_ms = self.config.wall_clock_ms.as_ref().map(|clock| clock());
        let entries: Vec<Entry> = stamps
            .iter()
            .map(|s| {
                Entry::Stamp(StampEntry {
                    topic: s.topic.clone(),
                    partition: s.partition,
                    producer_id: s.producer_id,
                    epoch: s.epoch,
                    base_sequence: s.base_sequence,
                    ids: s.ids.clone(),
                    stamped_at_ms,
                })
            })
            .collect();
        let (segment, done) = self.write(entries, false).await?;
        {
            let mut s = lock(&self.state);
            for id in stamps.iter().flat_map(|s| &s.ids) {
                if let Some(p) = s.pending.get_mut(id) {
                    p.stamp_segment = Some(segment);
                }
            }
        }
        self.collect(&done).await
    }

    /// Notes records stored; written with the next write, or by [`Outbox::sync_done`].
    pub(crate) fn done(&self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        let mut s = lock(&self.state);
        s.done_since.get_or_insert_with(Instant::now);
        s.done.extend(ids);
    }

    /// When done entries must be flushed on their own, if any wait.
    pub(crate) fn done_deadline(&self) -> Option<Instant> {
        let s = lock(&self.state);
        if s.failed.is_some() {
            return None;
        }
        s.done_since.map(|at| at + self.config.done_sync_interval)
    }

    /// Flushes the waiting done entries and deletes what they free.
    pub(crate) async fn sync_done(&self) -> Result<(), ClientError> {
        let (_, done) = self.write(Vec::new(), true).await?;
        self.collect(&done).await
    }

    /// Keeps parked batches and raises an alarm for each.
    pub(crate) fn park(&self, batches: Vec<ParkedOut>) {
        for out in batches {
            let alarm = {
                let mut s = lock(&self.state);
                let id = s.next_parked;
                s.next_parked += 1;
                let alarm = OutboxAlarm {
                    parked_id: id,
                    topic: out.topic.clone(),
                    partition: out.partition,
                    records: out.ids.len(),
                    maybe_written: out.maybe_written,
                    error: out.error.clone(),
                };
                s.parked.insert(id, Parked { out });
                alarm
            };
            tracing::error!(
                parked_id = alarm.parked_id,
                topic = alarm.topic,
                partition = alarm.partition,
                records = alarm.records,
                maybe_written = alarm.maybe_written,
                error = %alarm.error,
                "outbox: a batch is parked and will not be sent again without a decision (discard or resend)"
            );
            if let Some(handler) = &self.config.on_alarm {
                handler(&alarm);
            }
        }
    }

    /// The parked batches.
    pub(crate) fn parked(&self) -> Vec<ParkedBatch> {
        lock(&self.state)
            .parked
            .iter()
            .map(|(id, p)| ParkedBatch {
                id: *id,
                topic: p.out.topic.clone(),
                partition: p.out.partition,
                record_ids: p.out.ids.clone(),
                stamp: p.out.stamp,
                maybe_written: p.out.maybe_written,
                error: p.out.error.clone(),
            })
            .collect()
    }

    /// Takes a parked batch out (to discard or re-send it).
    pub(crate) fn unpark(&self, id: u64) -> Result<ParkedOut, ClientError> {
        lock(&self.state)
            .parked
            .remove(&id)
            .map(|p| p.out)
            .ok_or_else(|| ClientError::NotFound(format!("no parked outbox batch {id}")))
    }

    /// Puts a batch back (its discard failed).
    pub(crate) fn repark(&self, id: u64, out: ParkedOut) {
        lock(&self.state).parked.insert(id, Parked { out });
    }

    /// Durably drops records: they will never be sent again.
    pub(crate) async fn discard(&self, ids: Vec<u64>) -> Result<(), ClientError> {
        self.done(ids);
        self.sync_done().await
    }

    /// The gauges.
    pub(crate) fn stats(&self) -> OutboxStats {
        let s = lock(&self.state);
        let now = Instant::now();
        OutboxStats {
            records: s.pending.len() as u64,
            record_bytes: s.pending.values().map(|p| p.bytes).sum(),
            log_bytes: s.log_bytes,
            oldest_age: s.pending.values().map(|p| p.since).min().map(|since| now.saturating_duration_since(since)),
            parked: s.parked.len() as u64,
            mark: s.mark,
        }
    }

    /// Stops every later disk operation (the producer was dropped or closed).
    pub(crate) fn stop(&self) {
        // Under the log's lock, so that no operation is half done when this returns.
        let _log = lock(&self.log);
        self.alive.store(false, Ordering::Release);
    }

    /// The latest mark.
    pub(crate) fn mark(&self) -> Option<u64> {
        lock(&self.state).mark
    }
}

/// Writes waiting for the writer task at most; more wait to be queued.
const WRITE_QUEUE_MAX: usize = 1024;
/// A frame gathers waiting writes up to about this many bytes (a single larger write goes alone).
const GROUP_BYTES_MAX: u64 = 4 << 20;

/// Entries to write as (part of) one flushed frame; the answer is the segment that holds them
/// and the log's size after.
struct WriteRequest {
    entries: Vec<Entry>,
    reply: oneshot::Sender<Result<(u64, u64), ClientError>>,
}

fn approx_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match e {
            Entry::Record(r) => entry_bytes(r),
            Entry::Stamp(s) => 64 + 8 * s.ids.len() as u64,
            Entry::Done(ids) => 8 + 8 * ids.len() as u64,
            Entry::Mark(_) => 16,
        })
        .sum()
}

/// The writer task: group commit. Every write waiting when a flush ends goes into the next
/// frame, so concurrent `send`s share one fsync. It owns nothing but the log, and ends when the
/// outbox is dropped.
async fn writer(
    log: Arc<Mutex<OutboxLog>>,
    alive: Arc<AtomicBool>,
    blocking: bool,
    mut requests: mpsc::Receiver<WriteRequest>,
) {
    while let Some(first) = requests.recv().await {
        let mut bytes = approx_bytes(&first.entries);
        let mut group = vec![first];
        while bytes < GROUP_BYTES_MAX {
            let Ok(next) = requests.try_recv() else { break };
            bytes += approx_bytes(&next.entries);
            group.push(next);
        }
        let entries: Vec<Entry> = group.iter_mut().flat_map(|r| std::mem::take(&mut r.entries)).collect();
        let (log, alive) = (Arc::clone(&log), Arc::clone(&alive));
        let result = run_io(blocking, move || {
            let mut log = lock(&log);
            check_alive(&alive)?;
            let segment = log.append(&entries)?;
            Ok((segment, log.bytes()))
        })
        .await;
        for request in group {
            // A caller that went away has nothing to learn.
            let _ = request.reply.send(result.clone());
        }
    }
}

fn check_alive(alive: &AtomicBool) -> io::Result<()> {
    if alive.load(Ordering::Acquire) { Ok(()) } else { Err(io::Error::other("the producer was closed or dropped")) }
}

/// Runs disk work inline or on the blocking pool.
async fn run_io<T: Send + 'static>(
    blocking: bool,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ClientError> {
    let result = if blocking {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| io::Error::other(format!("outbox disk task failed: {e}")))
            .and_then(|r| r)
    } else {
        work()
    };
    result.map_err(|e| io_error(&e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_storage::{CrashMode, SimDisk};

    use super::*;

    fn config(disk: &SimDisk) -> OutboxConfig {
        let mut c = OutboxConfig::with_disk(Arc::new(disk.clone()), "/ob");
        c.segment_bytes = 4096;
        c.bytes_max = 64 << 10;
        c
    }

    fn records(values: &[&str]) -> Vec<(String, u32, ProducerRecord)> {
        values.iter().map(|v| ("t".to_owned(), 1, ProducerRecord::new(v.to_string()).with_partition(1))).collect()
    }

    fn new_stamp(ids: &[u64], base_sequence: i32) -> NewStamp {
        NewStamp { topic: "t".into(), partition: 1, producer_id: 7, epoch: 1, base_sequence, ids: ids.to_vec() }
    }

    fn batch_values(bytes: &Bytes) -> Vec<String> {
        let batch = keel_record::Batch::from_bytes(bytes.clone()).unwrap();
        batch.records().map(|r| String::from_utf8(r.unwrap().value.unwrap().to_vec()).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_restart_resends_stamped_batches_with_their_stamps_and_nothing_done() {
        let disk = SimDisk::new(1);
        let (outbox, restored) = Outbox::open(config(&disk), false).await.unwrap();
        assert!(restored.stamped.is_empty() && restored.unstamped.is_empty());
        let ids = outbox.append(records(&["a", "b", "c", "d"]), None).await.unwrap();
        assert_eq!(ids, [0, 1, 2, 3]);
        outbox.stamp(vec![new_stamp(&[0], 4), new_stamp(&[1, 2], 5)]).await.unwrap();
        // "a" is acknowledged and its done entry flushed; "b", "c" are acknowledged, but the
        // process dies before their done entry is written: they go again with their stamp, and
        // the partition answers them as duplicates.
        outbox.done(vec![0]);
        outbox.sync_done().await.unwrap();
        outbox.done(vec![1, 2]);
        assert_eq!(outbox.stats().records, 3);
        drop(outbox);
        disk.crash_with(CrashMode::RandomPages);
        let (outbox, restored) = Outbox::open(config(&disk), false).await.unwrap();
        assert_eq!(restored.stamped.len(), 1);
        let b = &restored.stamped[0];
        assert_eq!((b.ids.clone(), b.stamp), (vec![1, 2], (7, 1)));
        let header = keel_record::check(&b.bytes).unwrap();
        assert_eq!(header.producer_stamp(0), Some((7, 1, 5)), "exactly the stamp it went out with");
        assert_eq!(batch_values(&b.bytes), ["b", "c"]);
        let unstamped: Vec<u64> = restored.unstamped.iter().map(|r| r.id).collect();
        assert_eq!(unstamped, [3], "never stamped, so never sent: stamped afresh");
        assert_eq!(outbox.stats().records, 3);
        // New records continue the ids.
        assert_eq!(outbox.append(records(&["e"]), None).await.unwrap(), [4]);
    }

    #[tokio::test]
    async fn a_first_batch_stamped_longer_ago_than_the_producer_expiry_is_parked_at_open() {
        use std::sync::atomic::{AtomicI64, Ordering};
        let disk = SimDisk::new(9);
        let now = Arc::new(AtomicI64::new(1_700_000_000_000));
        let clock = Arc::clone(&now);
        let alarms: Arc<Mutex<Vec<OutboxAlarm>>> = Arc::default();
        let heard = Arc::clone(&alarms);
        let timed = OutboxConfig {
            wall_clock_ms: Some(Arc::new(move || clock.load(Ordering::Relaxed))),
            on_alarm: Some(Arc::new(move |alarm: &OutboxAlarm| lock(&heard).push(alarm.clone()))),
            ..config(&disk)
        };
        let (outbox, _) = Outbox::open(timed.clone(), false).await.unwrap();
        outbox.append(records(&["first", "later"]), None).await.unwrap();
        outbox.stamp(vec![new_stamp(&[0], 0), new_stamp(&[1], 1)]).await.unwrap();
        drop(outbox);
        disk.crash_with(CrashMode::DropUnflushed);
        // Within the expiry both go again with their stamps.
        now.fetch_add(3_600_000, Ordering::Relaxed);
        let (outbox, restored) = Outbox::open(timed.clone(), false).await.unwrap();
        assert_eq!((restored.stamped.len(), restored.parked.len()), (2, 0));
        drop(outbox);
        // A day later the partition may have forgotten the producer: sequence 0 would be taken
        // for a new batch, so it is parked; sequence 1 would be refused as UNKNOWN_PRODUCER_ID
        // (and parked then), so it goes.
        now.fetch_add(24 * 3_600_000, Ordering::Relaxed);
        let (outbox, restored) = Outbox::open(timed, false).await.unwrap();
        let parked: Vec<(Vec<u64>, bool)> = restored.parked.iter().map(|p| (p.ids.clone(), p.maybe_written)).collect();
        assert_eq!(parked, [(vec![0], true)]);
        assert!(matches!(restored.parked[0].error, ClientError::OutboxStale { age_ms } if age_ms > 24 * 3_600_000));
        assert_eq!(restored.stamped.iter().map(|b| b.ids.clone()).collect::<Vec<_>>(), [vec![1]]);
        outbox.park(restored.parked);
        assert_eq!(outbox.parked().len(), 1);
        let heard: Vec<(u32, usize, bool)> =
            lock(&alarms).iter().map(|a| (a.partition, a.records, a.maybe_written)).collect();
        assert_eq!(heard, [(1, 1, true)], "the alarm callback heard it");
        assert_eq!(outbox.stats().records, 2, "parked records stay in the outbox");
    }

    #[tokio::test]
    async fn concurrent_appends_share_flushes() {
        let disk = SimDisk::new(8);
        let (outbox, _) = Outbox::open(config(&disk), false).await.unwrap();
        let outbox = Arc::new(outbox);
        let before = disk.flush_count();
        let appends: Vec<_> = (0..50)
            .map(|i| {
                let outbox = Arc::clone(&outbox);
                tokio::spawn(async move { outbox.append(records(&[&format!("c{i}")]), None).await })
            })
            .collect();
        let mut ids = Vec::new();
        for append in appends {
            ids.extend(append.await.unwrap().unwrap());
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..50).collect::<Vec<u64>>());
        let flushes = disk.flush_count() - before;
        assert!(flushes < 10, "50 concurrent appends took {flushes} flushes");
        drop(outbox);
        disk.crash_with(CrashMode::DropUnflushed);
        let (_, restored) = Outbox::open(config(&disk), false).await.unwrap();
        assert_eq!(restored.unstamped.len(), 50, "every acknowledged append is durable");
    }

    #[tokio::test]
    async fn done_records_free_their_segments() {
        let disk = SimDisk::new(2);
        let (outbox, _) = Outbox::open(config(&disk), false).await.unwrap();
        let value = "v".repeat(300);
        let mut all = Vec::new();
        for _ in 0..40 {
            let ids = outbox.append(records(&[value.as_str()]), None).await.unwrap();
            outbox.stamp(vec![new_stamp(&ids, ids[0] as i32)]).await.unwrap();
            all.extend(ids);
        }
        let full = outbox.stats().log_bytes;
        assert!(full >= 4 * 4096, "{full}");
        outbox.done(all[..39].to_vec());
        outbox.sync_done().await.unwrap();
        let stats = outbox.stats();
        assert!(stats.log_bytes <= 2 * 4096, "{stats:?}");
        assert_eq!(stats.records, 1);
        drop(outbox);
        disk.crash_with(CrashMode::DropUnflushed);
        let (_, restored) = Outbox::open(config(&disk), false).await.unwrap();
        let ids: Vec<Vec<u64>> = restored.stamped.iter().map(|b| b.ids.clone()).collect();
        assert_eq!(ids, [vec![39]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_fails_or_blocks_until_room_is_freed() {
        let disk = SimDisk::new(3);
        let mut c = config(&disk);
        c.bytes_max = 3 * 4096;
        c.when_full = WhenFull::Fail;
        let (outbox, _) = Outbox::open(c.clone(), false).await.unwrap();
        let value = "x".repeat(1000);
        let mut ids = Vec::new();
        let refused = loop {
            match outbox.append(records(&[value.as_str()]), None).await {
                Ok(id) => ids.extend(id),
                Err(e) => break e,
            }
            assert!(ids.len() < 100, "never full");
        };
        assert_eq!(refused, ClientError::OutboxFull { bytes_max: 3 * 4096 });
        drop(outbox);

        let disk = SimDisk::new(4);
        let mut c = config(&disk);
        c.bytes_max = 3 * 4096;
        c.block_timeout = Duration::from_secs(5);
        let (outbox, _) = Outbox::open(c, false).await.unwrap();
        let outbox = Arc::new(outbox);
        let mut ids = Vec::new();
        for _ in 0..100 {
            let more =
                tokio::time::timeout(Duration::from_secs(1), outbox.append(records(&[value.as_str()]), None)).await;
            match more {
                Ok(Ok(id)) => ids.extend(id),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => break,
            }
        }
        assert!(!ids.is_empty());
        // Blocked now; acknowledging everything frees the old segments and lets it through.
        let blocked = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            let value = value.clone();
            async move { outbox.append(records(&[value.as_str()]), None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!blocked.is_finished(), "waits for room");
        outbox.done(ids);
        outbox.sync_done().await.unwrap();
        assert!(blocked.await.unwrap().is_ok(), "room was freed");
        // With nothing freed, the wait ends at block_timeout.
        let mut refused = None;
        for _ in 0..100 {
            if let Err(e) = outbox.append(records(&[value.as_str()]), None).await {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(ClientError::OutboxFull { bytes_max: 3 * 4096 }));
    }

    #[tokio::test]
    async fn a_failed_flush_reaches_the_caller_and_stops_the_outbox() {
        let disk = SimDisk::new(5);
        let (outbox, _) = Outbox::open(config(&disk), false).await.unwrap();
        outbox.append(records(&["a"]), None).await.unwrap();
        // The power goes out during the write or its flush.
        disk.crash_after(1);
        let err = outbox.append(records(&["b"]), None).await.unwrap_err();
        assert!(matches!(err, ClientError::Outbox(_)), "{err}");
        disk.crash_with(CrashMode::DropUnflushed);
        let again = outbox.append(records(&["c"]), None).await.unwrap_err();
        assert!(matches!(again, ClientError::Outbox(_)), "stopped: {again}");
        assert!(outbox.stamp(vec![new_stamp(&[0], 0)]).await.is_err());
        drop(outbox);
        let (_, restored) = Outbox::open(config(&disk), false).await.unwrap();
        let values: Vec<String> = restored
            .unstamped
            .iter()
            .map(|r| String::from_utf8(r.record.value.clone().unwrap().to_vec()).unwrap())
            .collect();
        assert!(values == ["a"] || values == ["a", "b"], "{values:?}");
    }

    #[tokio::test]
    async fn a_flipped_bit_is_refused_at_open() {
        let disk = SimDisk::new(6);
        let (outbox, _) = Outbox::open(config(&disk), false).await.unwrap();
        for v in ["a", "b", "c"] {
            outbox.append(records(&[v]), None).await.unwrap();
        }
        drop(outbox);
        disk.flip_bit(std::path::Path::new("/ob/00000000000000000000.outbox"), 40, 2).unwrap();
        let err = Outbox::open(config(&disk), false).await.err().unwrap();
        assert!(matches!(err, ClientError::OutboxCorrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_mark_survives_restarts_and_segment_deletion() {
        let disk = SimDisk::new(7);
        let (outbox, _) = Outbox::open(config(&disk), false).await.unwrap();
        let value = "m".repeat(500);
        let mut ids = Vec::new();
        for mark in 1..=30u64 {
            ids.extend(outbox.append(records(&[value.as_str()]), Some(mark)).await.unwrap());
        }
        outbox.done(ids);
        outbox.sync_done().await.unwrap();
        assert_eq!(outbox.mark(), Some(30));
        drop(outbox);
        disk.crash_with(CrashMode::TornLastWrite);
        let (outbox, restored) = Outbox::open(config(&disk), false).await.unwrap();
        assert!(restored.unstamped.is_empty());
        assert_eq!(outbox.mark(), Some(30));
    }
}
