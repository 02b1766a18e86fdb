//! openraft's storage over the segment log: the raft log IS the partition log (the same bytes),
//! the vote is a small file written atomically, and the state machine is the pure
//! [`PartitionState`] with its snapshot in another small file.
//!
//! Group commit: `append` copies entries into the log and returns at once; a per-partition flusher
//! task flushes everything written so far with one msync and only then calls every callback the
//! flush covered. openraft counts an entry as replicated on this node only after its callback, so
//! no entry is acknowledged before it is durable.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{Stream, StreamExt};
use keel_storage::{Disk, FlushTicket, LogConfig, LogPosition, SegmentLog};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::SnapshotOf;
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::convert;
use crate::state_machine::PartitionState;
use crate::types::{Appended, BatchData, Entry, KeelRaft, LogId, SnapshotMeta, StoredMembership, Vote};

/// Most batch bytes one AppendEntries carries (a single larger batch, up to
/// `keel_record::BATCH_BYTES_MAX`, travels alone). openraft asks for up to 300 entries per
/// request and each may be a whole batch, so without a byte bound a follower far enough behind
/// would get a request over the raft RPC limit, refused the same way on every retry: it would
/// never catch up. Small enough that a request is also sent, written and flushed by a follower
/// well within one RPC deadline.
pub const APPEND_ENTRIES_BYTES_MAX: usize = 8 << 20;

/// How far behind the log's end (in entries) replication reads count as recent, served from the
/// page cache on the async worker ([`LogStore::limited_get_log_entries`]).
const RECENT_ENTRIES: u64 = 256;

/// At most this many recent entries are read for apply on the async worker (that read has no
/// byte bound: a longer run, e.g. after a restart, goes to a blocking thread).
const APPLY_INLINE_ENTRIES: u64 = 16;

const _: () = assert!(
    APPEND_ENTRIES_BYTES_MAX < crate::network::RPC_MESSAGE_BYTES_MAX / 2
        && keel_record::BATCH_BYTES_MAX < crate::network::RPC_MESSAGE_BYTES_MAX / 2,
    "an AppendEntries request (entries plus their envelope) must fit in one raft RPC"
);

/// Files of a partition's raft state, next to its segments.
const VOTE_FILE: &str = "raft.vote";
const PURGED_FILE: &str = "raft.purged";
const SNAPSHOT_FILE: &str = "raft.snapshot";

/// How a partition's store does blocking disk work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// On tokio's blocking pool (msync can take milliseconds): production.
    Blocking,
    /// Inline on the task: the simulated disk is memory, and a thread pool would break
    /// determinism.
    Inline,
}

/// Injected bugs, for negative controls only: a checker that never sees these fail proves
/// nothing. Never set in production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Report appended entries as persisted at once and flush only once a second: the classic
    /// acknowledge-before-fsync bug (what `flush = async` would do under raft).
    pub ack_before_flush: bool,
    /// A node-wide flush of several partitions syncs nothing and reports success, as a syncfs
    /// of another file system than the partitions' would: their waiters complete, their bytes
    /// stay volatile.
    pub node_flush_wrong_filesystem: bool,
    /// Every answer of an AppendEntries batch is read as a success (a demultiplexer that mixes
    /// answers up): leaders count followers as holding entries they refused.
    pub batch_failures_read_as_success: bool,
    /// Quiescence bugs ([`crate::quiesce::QuiesceFaults`]).
    pub quiesce: crate::quiesce::QuiesceFaults,
}

/// Told about every completed flush of a partition, for the node's metrics. Called on the
/// flusher's path, so it must be cheap and never block.
pub trait FlushObserver: Send + Sync + 'static {
    /// A flush made `bytes` more of the log durable and took `took` (the msync or syncfs; a
    /// node-wide round also counts its wait for a blocking thread).
    fn flushed(&self, bytes: u64, took: std::time::Duration);
}

/// The shared state of one partition's storage.
struct Shared {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    io: IoMode,
    log: Mutex<SegmentLog>,
    /// Flush callbacks waiting for the durable end to reach a raft index (exclusive).
    waiters: Mutex<VecDeque<(u64, IOFlushed<KeelRaft>)>>,
    /// Wakes the flusher; shared with it apart from `Shared`, so that dropping the store wakes
    /// it to exit.
    flush_needed: Arc<Notify>,
    sm: Mutex<SmState>,
    /// The high watermark (next offset after the last applied entry), for readers that wait.
    high_watermark: watch::Sender<u64>,
    last_purged: Mutex<Option<LogId>>,
    /// The vote as last saved: replication reads it twice per batch it sends, so it is served
    /// from memory; the file is the durable copy.
    vote: Mutex<Option<Vote>>,
    closed: std::sync::atomic::AtomicBool,
    /// Records below this offset are obsolete (a compacted internal partition rewrote its live
    /// state above it), so retention may delete whole segments below it. Volatile: the runtime
    /// that compacts sets it again as it replays the partition's compaction record.
    obsolete_below: std::sync::atomic::AtomicU64,
    faults: Faults,
    /// Set once, right after the store opens (metrics only: it never changes what is flushed).
    flush_observer: std::sync::OnceLock<Arc<dyn FlushObserver>>,
    /// The node's flusher, when flushes are coalesced across partitions; else this partition's
    /// own flusher task waits on `flush_needed`.
    node_flusher: Option<Arc<NodeFlusher>>,
    /// Whether this partition is in the node flusher's queue.
    queued: std::sync::atomic::AtomicBool,
    /// Whether a flush runs on a blocking thread for this partition (per-partition flushes in
    /// production). Its own lock, taken after an append released the log's: a flush that finds
    /// nothing left to flush clears it under this lock, so an append either sees it cleared (and
    /// starts a flush) or was already visible to that last look.
    flush_running: Mutex<bool>,
}

/// Flushes of every partition of a node, coalesced: a round takes every partition with
/// unflushed appends, and makes them all durable with one `Disk::sync_filesystem` (one journal
/// commit and cache flush; `keel-storage`'s `flush_many` bench: 4–10× the partitions flushed
/// per second of one msync each, from 10 to 1,000 dirty partitions) or, with one partition
/// dirty, that partition's own msync. Nothing changes in what is acknowledged: a waiter is
/// completed only after the call that covered its bytes returned `Ok`.
pub struct NodeFlusher {
    disk: Arc<dyn Disk>,
    /// A directory on the file system every partition of the node lives on.
    root: PathBuf,
    io: IoMode,
    dirty: Mutex<Vec<std::sync::Weak<Shared>>>,
    /// Wakes the flusher task; dropping the flusher wakes it to exit.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for NodeFlusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeFlusher({})", self.root.display())
    }
}

impl Drop for NodeFlusher {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl NodeFlusher {
    /// A flusher for the partitions under `root`; its task runs on the current tokio runtime.
    pub fn start(disk: Arc<dyn Disk>, root: PathBuf, io: IoMode) -> Arc<NodeFlusher> {
        let flusher =
            Arc::new(NodeFlusher { disk, root, io, dirty: Mutex::new(Vec::new()), wake: Arc::new(Notify::new()) });
        tokio::spawn(node_flusher(Arc::downgrade(&flusher), Arc::clone(&flusher.wake)));
        flusher
    }

    fn enqueue(&self, shared: &Arc<Shared>) {
        if !shared.queued.swap(true, std::sync::atomic::Ordering::AcqRel) {
            lock(&self.dirty).push(Arc::downgrade(shared));
            self.wake.notify_one();
        }
    }
}

struct SmState {
    state: PartitionState,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    /// The state as it was just before each segment's first entry, by that entry's index: a
    /// snapshot for purging up to a segment boundary must describe the state there, not now, so
    /// that a follower installing it restarts its log exactly where the leader's log starts and
    /// loses none of the data retention kept (Kafka keeps producer snapshots per segment too).
    checkpoints: std::collections::BTreeMap<u64, PartitionState>,
    /// Where the next snapshot should be cut (a segment's first index), set by retention.
    snapshot_target: Option<u64>,
    /// Bounds of the producer table, applied with every batch.
    producer_limits: crate::producers::ProducerLimits,
}

/// Whether raft can go on from `snapshot` with this log: the log holds the snapshot's last
/// entry (same term), or starts right after it (purged up to it).
fn log_continues(log: &SegmentLog, snapshot: &LogId) -> bool {
    let (start, written) = (log.start().index, log.written().index);
    if start == snapshot.index + 1 {
        return true;
    }
    snapshot.index >= start
        && snapshot.index < written
        && log.header_at(snapshot.index).is_ok_and(|h| h.raft_term == snapshot.leader_id.term)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a partition lock already stopped that partition's raft core; the
    // data behind the lock is still consistent (every mutation is checked before it is made).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// One partition's storage; clones share it. Hand [`PartitionStore::log_store`] and
/// [`PartitionStore::state_machine`] to openraft.
#[derive(Clone)]
pub struct PartitionStore {
    shared: Arc<Shared>,
}

impl Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartitionStore({})", self.shared.dir.display())
    }
}

impl PartitionStore {
    /// Opens (recovering) the partition in `dir` and starts its flusher task on the current
    /// tokio runtime.
    pub fn open(disk: Arc<dyn Disk>, dir: impl Into<PathBuf>, config: LogConfig, io: IoMode) -> io::Result<Self> {
        Self::open_on_node(disk, dir, config, io, Faults::default(), None)
    }

    /// [`PartitionStore::open`] with injected bugs (`faults`: negative controls only), flushed by
    /// `node_flusher` (with every other partition of the node) when given, else by a flusher task
    /// of its own.
    pub fn open_on_node(
        disk: Arc<dyn Disk>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        io: IoMode,
        faults: Faults,
        node_flusher: Option<Arc<NodeFlusher>>,
    ) -> io::Result<Self> {
        let dir = dir.into();
        let mut log = SegmentLog::open(Arc::clone(&disk), &dir, config).map_err(io_err)?;
        let snapshot = read_optional(&*disk, &dir.join(SNAPSHOT_FILE))?;
        let (state, snapshot) = match snapshot {
            Some(bytes) => {
                let state = PartitionState::decode_snapshot(&bytes).map_err(io_err)?;
                let meta = state.snapshot_meta();
                (state, Some((meta, bytes.to_vec())))
            }
            None => (PartitionState::default(), None),
        };
        let mut last_purged = match read_optional(&*disk, &dir.join(PURGED_FILE))? {
            Some(bytes) => {
                let id = <keel_proto::v1::LogId as prost::Message>::decode(bytes).map_err(io_err)?;
                Some(convert::log_id_from_pb(&id))
            }
            None => None,
        };
        if let Some(last) = snapshot.as_ref().and_then(|(meta, _)| meta.last_log_id)
            && !log_continues(&log, &last)
        {
            // The snapshot file is the commit point of `install_snapshot`: a crash after it and
            // before the log was reset left a log that does not lead up to the snapshot, which
            // raft could never append after. Finish the install.
            let start = log.start().index;
            if start > last.index + 1 {
                return Err(io_err(format!(
                    "{}: the log starts at index {start}, after the snapshot's last entry {last}: entries are missing",
                    dir.display()
                )));
            }
            keel_storage::write_atomic(
                &*disk,
                &dir.join(PURGED_FILE),
                &prost::Message::encode_to_vec(&convert::log_id_to_pb(&last)),
            )?;
            last_purged = Some(last);
            log.reset(LogPosition { offset: state.next_offset, index: last.index + 1 }).map_err(io_err)?;
            warn!(dir = %dir.display(), %last, "an interrupted snapshot install finished: log reset after the snapshot");
        }
        let vote = match read_optional(&*disk, &dir.join(VOTE_FILE))? {
            Some(bytes) => Some(convert::decode_vote(&bytes).map_err(io_err)?),
            None => None,
        };
        let (high_watermark, _) = watch::channel(state.next_offset);
        info!(dir = %dir.display(), written = ?log.written(), applied = ?state.last_applied, "partition store opened");
        let shared = Arc::new(Shared {
            dir,
            disk,
            io,
            log: Mutex::new(log),
            waiters: Mutex::new(VecDeque::new()),
            flush_needed: Arc::new(Notify::new()),
            sm: Mutex::new(SmState {
                state,
                snapshot,
                checkpoints: Default::default(),
                snapshot_target: None,
                producer_limits: Default::default(),
            }),
            high_watermark,
            last_purged: Mutex::new(last_purged),
            vote: Mutex::new(vote),
            closed: std::sync::atomic::AtomicBool::new(false),
            obsolete_below: std::sync::atomic::AtomicU64::new(0),
            faults,
            flush_observer: std::sync::OnceLock::new(),
            node_flusher,
            queued: std::sync::atomic::AtomicBool::new(false),
            flush_running: Mutex::new(false),
        });
        if shared.node_flusher.is_none() && shared.io == IoMode::Inline {
            tokio::spawn(flusher(Arc::downgrade(&shared), Arc::clone(&shared.flush_needed)));
        }
        Ok(PartitionStore { shared })
    }

    /// Whether this replica holds nothing at all: no vote, no log entry, no snapshot (a
    /// partition just created here, never initialized nor contacted).
    pub fn is_blank(&self) -> bool {
        let s = &self.shared;
        lock(&s.vote).is_none()
            && lock(&s.log).written().index == 0
            && lock(&s.last_purged).is_none()
            && lock(&s.sm).snapshot.is_none()
    }

    /// openraft's log storage for this partition.
    pub fn log_store(&self) -> LogStore {
        LogStore { shared: Arc::clone(&self.shared) }
    }

    /// openraft's state machine for this partition.
    pub fn state_machine(&self) -> StateMachine {
        StateMachine { shared: Arc::clone(&self.shared) }
    }

    /// The high watermark: every offset below it is committed. Watch it to wait for new data.
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.shared.high_watermark.subscribe()
    }

    /// Sets the bounds of the producer table (the cluster's settings: the same on every replica,
    /// or replicas would remember different producers).
    pub fn set_producer_limits(&self, limits: crate::producers::ProducerLimits) {
        lock(&self.shared.sm).producer_limits = limits;
    }

    /// Reports every flush from now on to `observer` (only the first observer set counts).
    pub fn set_flush_observer(&self, observer: Arc<dyn FlushObserver>) {
        let _ = self.shared.flush_observer.set(observer);
    }

    /// Bytes the log's segments hold on disk.
    pub fn size_bytes(&self) -> u64 {
        lock(&self.shared.log).size_bytes()
    }

    /// Reads the applied idempotent-producer table.
    pub fn with_producers<T>(&self, f: impl FnOnce(&crate::producers::ProducerTable) -> T) -> T {
        f(&lock(&self.shared.sm).state.producers)
    }

    /// The log's written, durable and start positions.
    pub fn positions(&self) -> (LogPosition, LogPosition, LogPosition) {
        let log = lock(&self.shared.log);
        (log.start(), log.durable(), log.written())
    }

    /// Reads committed batches from `from_offset`, at most `bytes_max` (at least one batch).
    pub fn read_committed(
        &self,
        from_offset: u64,
        bytes_max: usize,
    ) -> Result<Vec<keel_record::Batch>, keel_storage::StorageError> {
        let high_watermark = *self.shared.high_watermark.borrow();
        lock(&self.shared.log).read(from_offset, bytes_max, high_watermark)
    }

    /// [`PartitionStore::read_committed`] off the async workers in production: a fetch copies up
    /// to its byte limit out of the mapped segments, faulting in cold pages from disk.
    pub async fn read_committed_blocking(
        &self,
        from_offset: u64,
        bytes_max: usize,
    ) -> Result<Vec<keel_record::Batch>, keel_storage::StorageError> {
        match self.shared.io {
            IoMode::Inline => self.read_committed(from_offset, bytes_max),
            IoMode::Blocking => {
                let store = self.clone();
                tokio::task::spawn_blocking(move || store.read_committed(from_offset, bytes_max))
                    .await
                    .map_err(|e| keel_storage::StorageError::Failed(format!("read task failed: {e}")))?
            }
        }
    }

    /// The last raft index that retention allows purging, if any (whole segments below the high
    /// watermark that are too old or beyond the size limit), and aims the next snapshot there.
    pub fn retention_point(&self, now_ms: i64) -> Option<u64> {
        let high_watermark = *self.shared.high_watermark.borrow();
        let obsolete = self.shared.obsolete_below.load(std::sync::atomic::Ordering::Acquire).min(high_watermark);
        let point = {
            let log = lock(&self.shared.log);
            let by_retention = log.retention_point(now_ms, high_watermark);
            let by_compaction = log.obsolete_point(obsolete);
            let point = if by_compaction.index > by_retention.index { by_compaction } else { by_retention };
            if point.index <= log.start().index {
                return None;
            }
            point
        };
        lock(&self.shared.sm).snapshot_target = Some(point.index);
        Some(point.index - 1)
    }

    /// Marks every record below `offset` obsolete (never lowers the mark): retention may then
    /// delete the whole segments below it.
    pub fn set_obsolete_below(&self, offset: u64) {
        self.shared.obsolete_below.fetch_max(offset, std::sync::atomic::Ordering::AcqRel);
    }

    /// Stops the flusher task. The log is flushed first.
    pub fn close(&self) {
        let _ = self.shared.flush_now();
        self.shared.closed.store(true, std::sync::atomic::Ordering::Release);
        self.shared.flush_needed.notify_one();
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.flush_needed.notify_one();
    }
}

impl Shared {
    /// Asks for a flush of everything written so far.
    fn request_flush(self: &Arc<Self>) {
        match (&self.node_flusher, self.io) {
            (Some(node), _) => node.enqueue(self),
            (None, IoMode::Inline) => self.flush_needed.notify_one(),
            (None, IoMode::Blocking) => {
                let mut running = lock(&self.flush_running);
                if *running || self.closed.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                *running = true;
                drop(running);
                let shared = Arc::clone(self);
                // The blocking thread flushes and completes the waiters itself: no flusher task
                // to wake first and none to wake after (at one record in flight, those two
                // hand-offs per flush per replica were a tenth of the context switches).
                tokio::task::spawn_blocking(move || shared.flush_on_this_thread());
            }
        }
    }

    /// A flush run on a blocking thread: flushes until nothing written is left unflushed, then
    /// clears `flush_running` (see there for why no append is missed).
    fn flush_on_this_thread(&self) {
        loop {
            if self.faults.ack_before_flush {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            if !self.flush_until_durable() {
                *lock(&self.flush_running) = false;
                return;
            }
            let mut running = lock(&self.flush_running);
            let log = lock(&self.log);
            let (written, durable) = (log.written(), log.durable());
            drop(log);
            if written.index <= durable.index {
                *running = false;
                drop(running);
                // Waiters registered after their append was flushed by an earlier round.
                self.complete_waiters(Ok(durable));
                return;
            }
        }
    }

    /// Flushes on the calling thread until everything written is durable, completing waiters
    /// as it goes; false if a flush failed (its waiters are failed). Both per-partition flushers
    /// run it: the simulation's task with inline IO, production's blocking thread.
    fn flush_until_durable(&self) -> bool {
        loop {
            let ticket = lock(&self.log).begin_flush();
            let ticket = match ticket {
                Ok(Some(t)) => t,
                Ok(None) => {
                    let durable = lock(&self.log).durable();
                    self.complete_waiters(Ok(durable));
                    return true;
                }
                Err(e) => {
                    self.complete_waiters(Err(e.to_string()));
                    return false;
                }
            };
            // tokio time, not the wall clock: the simulation drives it, and the observation
            // changes nothing that is flushed.
            let started = tokio::time::Instant::now();
            let result = ticket.run();
            if result.is_ok()
                && let Some(observer) = self.flush_observer.get()
            {
                observer.flushed(ticket.bytes(), started.elapsed());
            }
            let durable = lock(&self.log).complete_flush(ticket, result).map_err(|e| e.to_string());
            let failed = durable.is_err();
            self.complete_waiters(durable);
            if failed {
                return false;
            }
        }
    }

    /// Whether the entry at `index` is among the last [`RECENT_ENTRIES`] written: still in the
    /// page cache, cheap enough to read on an async worker.
    fn is_recent(&self, index: u64) -> bool {
        lock(&self.log).written().index.saturating_sub(index) <= RECENT_ENTRIES
    }

    /// Completes every waiter the durable end covers (or fails them all on error).
    fn complete_waiters(&self, durable: Result<LogPosition, String>) {
        let mut done = Vec::new();
        {
            let mut waiters = lock(&self.waiters);
            match &durable {
                Ok(pos) => {
                    while waiters.front().is_some_and(|(index, _)| *index <= pos.index) {
                        if let Some(w) = waiters.pop_front() {
                            done.push((w.1, Ok(())));
                        }
                    }
                }
                Err(why) => {
                    for (_, cb) in waiters.drain(..) {
                        done.push((cb, Err(io::Error::other(why.clone()))));
                    }
                }
            }
        }
        for (cb, result) in done {
            cb.io_completed(result);
        }
    }

    /// Flushes everything written, synchronously, and completes the waiters it covers. Used before
    /// IO that must not overtake earlier appends (truncation, vote, snapshot install).
    fn flush_now(&self) -> io::Result<LogPosition> {
        let result = lock(&self.log).flush().map_err(|e| e.to_string());
        self.complete_waiters(result.clone());
        result.map_err(io::Error::other)
    }

    /// Runs blocking disk work (flushes, fsyncs) off the async workers in production, inline in
    /// the simulation.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        match self.io {
            IoMode::Inline => work(self),
            IoMode::Blocking => {
                let shared = Arc::clone(self);
                tokio::task::spawn_blocking(move || work(&shared))
                    .await
                    .map_err(|e| io::Error::other(format!("blocking disk task failed: {e}")))?
            }
        }
    }

    /// Deletes the whole segments up to `log_id` (the purge point is rounded down to a segment
    /// boundary).
    fn purge(&self, log_id: LogId) -> io::Result<()> {
        let mut log = lock(&self.log);
        let point = log.purge_point(log_id.index + 1);
        if point.index <= log.start().index {
            return Ok(());
        }
        let h = log.header_at(point.index - 1).map_err(io_err)?;
        let purged = crate::types::log_id(h.raft_term, h.raft_index);
        // Record the purge point first: a crash after it but before the segments go leaves them
        // readable, which is harmless; the reverse would lose the purged log id.
        self.write_file(PURGED_FILE, &prost::Message::encode_to_vec(&convert::log_id_to_pb(&purged)))?;
        *lock(&self.last_purged) = Some(purged);
        let start = log.purge_before_index(point.index).map_err(io_err)?;
        drop(log);
        let mut sm = lock(&self.sm);
        sm.state.log_start_offset = sm.state.log_start_offset.max(start.offset);
        debug!(dir = %self.dir.display(), %purged, "log purged");
        Ok(())
    }

    /// Replaces the state with a snapshot's, resetting the log after it unless the log holds it.
    fn install_snapshot(&self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> io::Result<()> {
        let state = PartitionState::decode_snapshot(&snapshot).map_err(io_err)?;
        if state.last_applied != meta.last_log_id {
            return Err(io::Error::other("snapshot data does not match its metadata"));
        }
        self.flush_now()?;
        self.write_file(SNAPSHOT_FILE, &snapshot)?;
        if let Some(last) = meta.last_log_id {
            let mut log = lock(&self.log);
            let holds_last = last.index >= log.start().index
                && last.index < log.written().index
                && log.header_at(last.index).is_ok_and(|h| h.raft_term == last.leader_id.term);
            // The order makes a crash at any step recoverable: the snapshot file first (the
            // commit point: `open` finishes what follows if it finds a log that does not lead
            // up to it), then the purge marker, then the log reset (all-or-nothing itself).
            if !holds_last {
                // The log does not reach the snapshot (or disagrees with it): it restarts right
                // after it, at the offsets the snapshot says come next.
                self.write_file(PURGED_FILE, &prost::Message::encode_to_vec(&convert::log_id_to_pb(&last)))?;
                *lock(&self.last_purged) = Some(last);
                log.reset(LogPosition { offset: state.next_offset, index: last.index + 1 }).map_err(io_err)?;
                info!(dir = %self.dir.display(), %last, next_offset = state.next_offset, "log reset to a snapshot");
            }
        }
        let next_offset = state.next_offset;
        {
            let mut sm = lock(&self.sm);
            sm.state = state;
            sm.snapshot = Some((meta.clone(), snapshot));
        }
        self.high_watermark.send_replace(next_offset);
        Ok(())
    }

    /// Appends entries to the log; returns the raft index after the last.
    fn append_entries(&self, entries: Vec<Entry>) -> io::Result<u64> {
        let mut log = lock(&self.log);
        for entry in entries {
            let next = log.written();
            if next.index != entry.log_id.index {
                if log.start() == next {
                    // An empty log starts wherever raft's first entry is.
                    log.reset(LogPosition { offset: next.offset, index: entry.log_id.index }).map_err(io_err)?;
                } else {
                    return Err(io::Error::other(format!(
                        "append of {} would leave a hole after index {}",
                        entry.log_id,
                        next.index.saturating_sub(1)
                    )));
                }
            }
            let batch = convert::entry_to_batch(&entry, log.written().offset).map_err(io_err)?;
            log.append_stamped(&batch).map_err(io_err)?;
        }
        Ok(log.written().index)
    }

    /// Reads raft entries (copies out of the mapped segments, page faults on cold data).
    fn read_entries(&self, range: &impl RangeBounds<u64>, bytes_max: usize) -> io::Result<Vec<Entry>> {
        let log = lock(&self.log);
        let (from, to) = range_to(range, log.start().index, log.written().index);
        if from >= to {
            return Ok(Vec::new());
        }
        let batches = log.read_entries(from, to, bytes_max).map_err(io_err)?;
        drop(log);
        batches.iter().map(|b| convert::batch_to_entry(b).map_err(io_err)).collect()
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        keel_storage::write_atomic(&*self.disk, &self.dir.join(name), bytes)
    }
}

/// Runs flushes while there is unflushed data: one msync covers every append made before it.
/// The simulation's per-partition flusher (inline IO); production flushes on a blocking thread
/// straight from the append (`Shared::flush_on_this_thread`).
async fn flusher(weak: std::sync::Weak<Shared>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        let delayed = match weak.upgrade() {
            None => return,
            Some(shared) if shared.closed.load(std::sync::atomic::Ordering::Acquire) => return,
            Some(shared) => shared.faults.ack_before_flush,
        };
        if delayed {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let Some(shared) = weak.upgrade() else { return };
        shared.flush_until_durable();
    }
}

/// The node flusher's task: a round per wake-up, until the flusher is dropped.
async fn node_flusher(weak: std::sync::Weak<NodeFlusher>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(flusher) = weak.upgrade() else { return };
        node_flush_rounds(&flusher).await;
    }
}

/// Flushes the queued partitions, round after round, until none is queued.
async fn node_flush_rounds(flusher: &Arc<NodeFlusher>) {
    loop {
        let queued: Vec<Arc<Shared>> = lock(&flusher.dirty).drain(..).filter_map(|w| w.upgrade()).collect();
        if queued.is_empty() {
            return;
        }
        if queued.iter().any(|s| s.faults.ack_before_flush) {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let mut work = Vec::with_capacity(queued.len());
        for shared in queued {
            // Cleared before the ticket is taken: an append after this re-queues the partition.
            shared.queued.store(false, std::sync::atomic::Ordering::Release);
            if shared.closed.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            let ticket = lock(&shared.log).begin_flush();
            match ticket {
                Ok(Some(t)) => work.push((shared, t)),
                Ok(None) => {
                    let durable = lock(&shared.log).durable();
                    shared.complete_waiters(Ok(durable));
                }
                Err(e) => shared.complete_waiters(Err(e.to_string())),
            }
        }
        if work.is_empty() {
            continue;
        }
        let started = tokio::time::Instant::now();
        let (disk, root) = (Arc::clone(&flusher.disk), flusher.root.clone());
        let (shareds, tickets): (Vec<Arc<Shared>>, Vec<FlushTicket>) = work.into_iter().unzip();
        let wrong_filesystem = shareds.iter().any(|s| s.faults.node_flush_wrong_filesystem);
        let run = move || {
            let results = match wrong_filesystem && tickets.len() > 1 {
                true => tickets.iter().map(|_| Ok(())).collect(),
                false => run_tickets(&*disk, &root, &tickets),
            };
            (tickets, results)
        };
        let (tickets, results) = match flusher.io {
            IoMode::Inline => run(),
            IoMode::Blocking => match tokio::task::spawn_blocking(run).await {
                Ok(done) => done,
                Err(e) => {
                    for shared in &shareds {
                        shared.complete_waiters(Err(format!("flush task failed: {e}")));
                    }
                    continue;
                }
            },
        };
        let took = started.elapsed();
        for ((shared, ticket), result) in shareds.into_iter().zip(tickets).zip(results) {
            if result.is_ok()
                && let Some(observer) = shared.flush_observer.get()
            {
                observer.flushed(ticket.bytes(), took);
            }
            let durable = lock(&shared.log).complete_flush(ticket, result).map_err(|e| e.to_string());
            shared.complete_waiters(durable);
        }
    }
}

/// Makes every ticket's bytes durable: one file's own flush, or one flush of the whole file
/// system for several. When that fails, each file is flushed on its own: the error may be
/// another file's (syncfs reports any write-back error on the file system), and a file's own
/// flush reports exactly its own (the kernel keeps write-back errors per file as well).
fn run_tickets(disk: &dyn Disk, root: &Path, tickets: &[FlushTicket]) -> Vec<io::Result<()>> {
    if tickets.len() > 1 {
        match disk.sync_filesystem(root) {
            Ok(()) => return tickets.iter().map(|_| Ok(())).collect(),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(e) => warn!(error = %e, "node-wide flush failed; flushing each partition on its own"),
        }
    }
    tickets.iter().map(FlushTicket::run).collect()
}

fn read_optional(disk: &dyn Disk, path: &Path) -> io::Result<Option<bytes::Bytes>> {
    if disk.exists(path)? { keel_storage::read_whole(disk, path).map(Some) } else { Ok(None) }
}

fn range_to(range: &impl RangeBounds<u64>, start: u64, end: u64) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => start,
    };
    let to = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => end,
    };
    (from.max(start), to.min(end))
}

/// openraft's log storage (and reader) for one partition.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl RaftLogReader<KeelRaft> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        // openraft reads what it applies through here, on every replica, right after the
        // commit: like a replication read of recent entries, that is page-cache work cheaper
        // than two thread hand-offs (`limited_get_log_entries`). Whole, since this read has no
        // byte limit: it must stay a few recent entries to run on the worker.
        let (from, to) = {
            let log = lock(&self.shared.log);
            range_to(&range, log.start().index, log.written().index)
        };
        if to.saturating_sub(from) <= APPLY_INLINE_ENTRIES && self.shared.is_recent(from) {
            return self.shared.read_entries(&range, usize::MAX);
        }
        self.shared.blocking(move |shared| shared.read_entries(&range, usize::MAX)).await
    }

    /// What replication sends: entries from `start` on, at most [`APPEND_ENTRIES_BYTES_MAX`]
    /// bytes of them (at least one entry, as openraft requires of a non-empty range).
    ///
    /// A follower that keeps up is sent what was written moments ago, still in the page cache:
    /// that is read on the async worker, since handing it to a blocking thread and back cost
    /// more than the read (two thread wake-ups per AppendEntries per follower, a large share of
    /// the leader's context switches at one record in flight). Older entries, which may have to
    /// come from disk, are read off the workers.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        if self.shared.is_recent(start) {
            return self.shared.read_entries(&(start..end), APPEND_ENTRIES_BYTES_MAX);
        }
        self.shared.blocking(move |shared| shared.read_entries(&(start..end), APPEND_ENTRIES_BYTES_MAX)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*lock(&self.shared.vote))
    }
}

impl RaftLogStorage<KeelRaft> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<KeelRaft>, io::Error> {
        let last_purged_log_id = *lock(&self.shared.last_purged);
        let log = lock(&self.shared.log);
        let (start, end) = (log.start(), log.written());
        let last_log_id = if end.index > start.index {
            let h = log.header_at(end.index - 1).map_err(io_err)?;
            Some(crate::types::log_id(h.raft_term, h.raft_index))
        } else {
            last_purged_log_id
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        self.shared
            .blocking(move |shared| {
                // Serialised after earlier appends (openraft's contract): flush them first.
                shared.flush_now()?;
                shared.write_file(VOTE_FILE, &convert::encode_vote(&vote))?;
                *lock(&shared.vote) = Some(vote);
                debug!(dir = %shared.dir.display(), %vote, "vote saved");
                Ok(())
            })
            .await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KeelRaft>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let bytes: u64 = entries.iter().map(convert::entry_bytes).sum();
        // Most appends are a write into the page cache (no disk wait); one that rolls the segment or
        // grows its file syncs several times, which must not stall the async worker (and every
        // other group's heartbeats on it).
        let target = if lock(&self.shared.log).needs_room(bytes) {
            self.shared.blocking(move |shared| shared.append_entries(entries)).await?
        } else {
            self.shared.append_entries(entries)?
        };
        if self.shared.faults.ack_before_flush {
            callback.io_completed(Ok(()));
        } else {
            lock(&self.shared.waiters).push_back((target, callback));
        }
        self.shared.request_flush();
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.shared
            .blocking(move |shared| {
                shared.flush_now()?;
                let mut log = lock(&shared.log);
                let from = match last_log_id {
                    Some(id) => id.index + 1,
                    None => log.start().index,
                };
                if from < log.written().index {
                    warn!(dir = %shared.dir.display(), from, "truncating uncommitted entries");
                    log.truncate_from_index(from).map_err(io_err)?;
                }
                Ok(())
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // A file write and segment deletions, each synced.
        self.shared.blocking(move |shared| shared.purge(log_id)).await
    }
}

/// openraft's state machine for one partition: [`PartitionState`] behind a lock.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<KeelRaft> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<KeelRaft, Vec<u8>>, io::Error> {
        let (meta, bytes) = {
            let mut sm = lock(&self.shared.sm);
            let target = sm.snapshot_target.and_then(|t| sm.checkpoints.get(&t).map(|c| (t, c.clone())));
            match target {
                Some((t, checkpoint)) => {
                    // Older checkpoints can never be wanted again: the log will start at `t`.
                    sm.checkpoints = sm.checkpoints.split_off(&t);
                    (checkpoint.snapshot_meta(), checkpoint.encode_snapshot())
                }
                // No checkpoint where retention aims: keep the snapshot there is, rather than
                // cut one at the current state, which would make a follower that installs it
                // start its log above records this node still holds.
                None => match &sm.snapshot {
                    Some((meta, bytes)) => (meta.clone(), bytes.clone()),
                    None => (sm.state.snapshot_meta(), sm.state.encode_snapshot()),
                },
            }
        };
        let written = meta.clone();
        let bytes = self
            .shared
            .blocking(move |shared| {
                shared.write_file(SNAPSHOT_FILE, &bytes)?;
                lock(&shared.sm).snapshot = Some((written, bytes.clone()));
                Ok(bytes)
            })
            .await?;
        Ok(openraft::storage::Snapshot { meta, snapshot: bytes })
    }
}

impl RaftStateMachine<KeelRaft> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let sm = lock(&self.shared.sm);
        Ok((sm.state.last_applied, sm.state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<openraft::storage::EntryResponder<KeelRaft>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let segment_base = lock(&self.shared.log).is_segment_base(entry.log_id.index);
            let response = {
                let mut sm = lock(&self.shared.sm);
                if segment_base {
                    let before = sm.state.clone();
                    sm.checkpoints.insert(entry.log_id.index, before);
                }
                let limits = sm.producer_limits;
                let state = &mut sm.state;
                match entry.payload {
                    EntryPayload::Normal(BatchData(bytes)) => {
                        let header = keel_record::check(&bytes).map_err(io_err)?;
                        state.apply_batch(entry.log_id, &header, &limits)
                    }
                    EntryPayload::Blank => {
                        state.apply_blank(entry.log_id);
                        Appended { base_offset: state.next_offset, next_offset: state.next_offset }
                    }
                    EntryPayload::Membership(m) => {
                        state.apply_membership(entry.log_id, StoredMembership::new(Some(entry.log_id), m));
                        Appended { base_offset: state.next_offset, next_offset: state.next_offset }
                    }
                }
            };
            self.shared.high_watermark.send_replace(response.next_offset);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        // A flush, file writes and a log reset, each synced.
        let meta = meta.clone();
        self.shared.blocking(move |shared| shared.install_snapshot(&meta, snapshot)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<KeelRaft, Vec<u8>>>, io::Error> {
        let sm = lock(&self.shared.sm);
        Ok(sm.snapshot.clone().map(|(meta, snapshot)| openraft::storage::Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_storage::{Disk, SimDisk};
    use openraft::entry::RaftEntry;

    use super::*;
    use crate::types::log_id;

    const DIR: &str = "/p";

    /// A log of blank entries 1..=5 at term 1, flushed, on a fresh SimDisk.
    fn prepared() -> SimDisk {
        let disk = SimDisk::new(7);
        let mut log = SegmentLog::open(Arc::new(disk.clone()) as Arc<dyn Disk>, DIR, LogConfig::default()).unwrap();
        for index in 1..=5 {
            let entry = Entry::new_blank(log_id(1, index));
            let batch = convert::entry_to_batch(&entry, log.written().offset).unwrap();
            if index == 1 {
                log.reset(LogPosition { offset: 0, index: 1 }).unwrap();
            }
            log.append_stamped(&batch).unwrap();
        }
        log.flush().unwrap();
        disk
    }

    /// A snapshot at index 20 (term 2) that the log does not reach: installing it resets the log.
    fn snapshot() -> (SnapshotMeta, Vec<u8>) {
        let state = PartitionState {
            next_offset: 42,
            log_start_offset: 42,
            last_applied: Some(log_id(2, 20)),
            ..PartitionState::default()
        };
        (state.snapshot_meta(), state.encode_snapshot())
    }

    /// Appends racing the per-partition flush on its blocking thread: every flush callback
    /// completes, in order, and only once its entry is durable; nothing is left unflushed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_flushes_complete_every_append_racing_them() {
        let tmp = tempfile::tempdir().unwrap();
        let disk: Arc<dyn Disk> = Arc::new(keel_storage::FileDisk::new());
        let store = PartitionStore::open(disk, tmp.path().join("p"), LogConfig::default(), IoMode::Blocking).unwrap();
        let mut log = store.log_store();
        let mut flushed = Vec::new();
        for index in 0..2_000u64 {
            let (tx, rx) = <KeelRaft as openraft::type_config::TypeConfigExt>::oneshot();
            log.append([Entry::new_blank(log_id(1, index))], IOFlushed::signal(tx)).await.unwrap();
            flushed.push((index, rx));
            if index % 7 == 0 {
                // Lets some flushes finish between appends, others overlap them.
                tokio::task::yield_now().await;
            }
        }
        for (index, rx) in flushed {
            let done = tokio::time::timeout(std::time::Duration::from_secs(30), rx).await;
            assert!(matches!(done, Ok(Ok(Ok(())))), "the append of entry {index} was never reported flushed");
            assert!(lock(&store.shared.log).durable().index > index, "entry {index} reported flushed before durable");
        }
        let log = lock(&store.shared.log);
        assert_eq!(log.durable(), log.written());
        drop(log);
        assert!(!*lock(&store.shared.flush_running), "no flush is left running once all is durable");
    }

    /// A power loss at every step of `install_snapshot`: whatever survives, the reopened store
    /// is one raft can continue from (its log leads up to its snapshot, or there is no snapshot
    /// and the log is as before), never one that "would leave a hole".
    #[tokio::test]
    async fn a_crash_anywhere_in_install_snapshot_recovers() {
        let (meta, bytes) = snapshot();
        let mut finished = false;
        for ops in 0..200u64 {
            let disk = prepared().fork();
            let store = PartitionStore::open(
                Arc::new(disk.clone()) as Arc<dyn Disk>,
                DIR,
                LogConfig::default(),
                IoMode::Inline,
            )
            .unwrap();
            disk.crash_after(ops);
            let installed = store.state_machine().install_snapshot(&meta, bytes.clone()).await;
            let crashed = disk.is_dead();
            drop(store);
            disk.crash();
            let store = PartitionStore::open(
                Arc::new(disk.clone()) as Arc<dyn Disk>,
                DIR,
                LogConfig::default(),
                IoMode::Inline,
            )
            .unwrap_or_else(|e| panic!("crash after {ops} ops: reopening failed: {e}"));
            let log = lock(&store.shared.log);
            let applied = lock(&store.shared.sm).state.last_applied;
            match applied {
                Some(last) => {
                    assert_eq!(last, log_id(2, 20), "crash after {ops} ops");
                    assert_eq!(log.start(), LogPosition { offset: 42, index: 21 }, "crash after {ops} ops");
                    assert_eq!(*lock(&store.shared.last_purged), Some(last), "crash after {ops} ops");
                }
                None => assert_eq!(log.written().index, 6, "crash after {ops} ops: the old log is intact"),
            }
            if !crashed {
                installed.unwrap();
                finished = true;
                break;
            }
        }
        assert!(finished, "some run completed the install without a crash");
    }
}
