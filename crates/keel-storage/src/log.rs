//! The segment log of one partition: dense offsets, written vs durable ends, roll, read,
//! truncate, retention and crash recovery.
//!
//! Coordinates: every batch has an offset range (its records) and a raft index (one per batch).
//! Both are dense: the next batch starts at the previous one's `next_offset` and `raft_index + 1`.
//! Raft-only batches (blank, membership) take an index but no offsets.
//!
//! Invariants (checked by `debug_validate` after every mutation in debug builds):
//! - segments are contiguous: each starts where the previous one ends, in offset and index;
//! - `start <= durable <= written`, and only `durable` is ever reported as acknowledged-safe;
//! - every byte below a segment's durable end was flushed; the header's hint never claims more;
//! - sealed segments are flushed whole and end exactly at their data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use keel_record::{Batch, BatchHeader, HEADER_LEN};
use tracing::{debug, info, warn};

use crate::disk::{self, Disk, DiskFile};
use crate::error::{IoContext, Result, StorageError};
use crate::index::{self, IndexCheckpoint, IndexEntry};
use crate::segment::{self, SEGMENT_HEADER_BYTES, ScanEnd, SegmentHeader};

/// A position in the log: the offset and the raft index of the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct LogPosition {
    /// Record offset.
    pub offset: u64,
    /// Raft index (one per batch).
    pub index: u64,
}

/// Settings of one log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is rolled when the next batch would take it past this size.
    pub segment_bytes_max: u64,
    /// One index entry per this many bytes of log.
    pub index_interval_bytes: u64,
    /// Delete whole old segments once the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete whole old segments whose newest record is older than this.
    pub retention_ms: Option<i64>,
    /// Where an empty log starts.
    pub initial: LogPosition,
    /// Largest step a segment file grows by (fallocate), not all at once: a node with
    /// hundreds of partitions must not reserve `segment_bytes_max` of disk for each up front.
    /// A new file starts at [`PREALLOCATE_FIRST_BYTES`] and doubles up to this step, so an idle
    /// partition holds a few pages while a busy one grows in few syscalls.
    pub preallocate_step_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes_max: 64 * 1024 * 1024,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: None,
            initial: LogPosition::default(),
            preallocate_step_bytes: 16 << 20,
        }
    }
}

/// Smallest allowed segment: a header page and the largest batch must fit.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;

/// What a new segment file of a partition that is not rolling from a full segment reserves
/// (header page included): with thousands of partitions per node, most are idle, and each
/// reserving `preallocate_step_bytes` (16 MiB) of disk would cost tens of gigabytes for nothing.
pub const PREALLOCATE_FIRST_BYTES: u64 = 64 * 1024;

impl LogConfig {
    fn validate(&self) -> Result<()> {
        if self.segment_bytes_max < SEGMENT_BYTES_MIN {
            return Err(StorageError::InvalidArgument(format!(
                "segment_bytes_max {} is below the minimum {SEGMENT_BYTES_MIN}",
                self.segment_bytes_max
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(StorageError::InvalidArgument("index_interval_bytes must be > 0".into()));
        }
        if self.preallocate_step_bytes < SEGMENT_HEADER_BYTES {
            return Err(StorageError::InvalidArgument(format!(
                "preallocate_step_bytes must be at least {SEGMENT_HEADER_BYTES}"
            )));
        }
        Ok(())
    }

    /// Largest batch this log accepts, in bytes.
    pub fn batch_bytes_max(&self) -> usize {
        (keel_record::BATCH_BYTES_MAX as u64).min(self.segment_bytes_max - SEGMENT_HEADER_BYTES) as usize
    }
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its header (base offset, raft index as stored).
    pub header: BatchHeader,
    /// The log's written end after it.
    pub written: LogPosition,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    index_path: PathBuf,
    file: Arc<dyn DiskFile>,
    base: LogPosition,
    end: LogPosition,
    data_end: u64,
    durable_data_end: u64,
    /// The durable end last written into the header page (flushed or not).
    hint: u64,
    entries: Vec<IndexEntry>,
    last_entry_position: u64,
    max_timestamp_ms: i64,
    sealed: bool,
}

impl Segment {
    fn records(&self) -> u64 {
        self.end.offset - self.base.offset
    }

    fn add_to_index(&mut self, h: &BatchHeader, position: u64, interval: u64) {
        if self.entries.is_empty() || position >= self.last_entry_position + interval {
            self.entries.push(IndexEntry { offset: h.base_offset, index: h.raft_index, position });
            self.last_entry_position = position;
        }
        if h.record_count > 0 {
            self.max_timestamp_ms = self.max_timestamp_ms.max(h.max_timestamp_ms);
        }
    }

    fn write_hint(&mut self, durable_end: u64) -> Result<()> {
        if self.hint != durable_end {
            self.file
                .write(segment::HINT_POSITION, &segment::encode_hint(durable_end))
                .ctx("write hint", &self.path)?;
            self.hint = durable_end;
        }
        Ok(())
    }

    fn checkpoint(&self) -> IndexCheckpoint {
        IndexCheckpoint {
            entries: self.entries.clone(),
            covered_end: self.data_end,
            next_offset: self.end.offset,
            next_index: self.end.index,
            max_timestamp_ms: self.max_timestamp_ms,
        }
    }

    /// Reads and verifies the batch at `position`.
    fn batch_at(&self, position: u64) -> Result<Batch> {
        let head = self.file.read(position, HEADER_LEN).ctx("read", &self.path)?;
        let corrupt = |reason: String| StorageError::Corrupt { segment: self.path.clone(), position, reason };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64 + 4;
        if position + len > self.data_end {
            return Err(corrupt(format!("batch of {len} bytes runs past the data end {}", self.data_end)));
        }
        let bytes = self.file.read(position, len as usize).ctx("read", &self.path)?;
        Batch::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))
    }
}

/// A pending flush: taken under the log's lock, run without it, completed under it again, so that
/// appends (and reads) continue while the disk works. Many appends, one flush: group commit.
#[derive(Debug)]
#[must_use = "a flush does nothing until run and completed"]
pub struct FlushTicket {
    file: Arc<dyn DiskFile>,
    path: PathBuf,
    segment_base: u64,
    data_end: u64,
    target: LogPosition,
    generation: u64,
    /// Where the segment's durable data ended when the flush began.
    durable_data_end: u64,
}

impl FlushTicket {
    /// Runs the flush (msync); may take milliseconds. Call without holding the log's lock.
    pub fn run(&self) -> std::io::Result<()> {
        self.file.flush(0, self.data_end)
    }

    /// The position that will be durable once this flush completes.
    pub fn target(&self) -> LogPosition {
        self.target
    }

    /// Bytes of log data this flush makes durable (what was written since the last flush).
    pub fn bytes(&self) -> u64 {
        self.data_end.saturating_sub(self.durable_data_end)
    }
}

/// The segment log of one partition (single writer; reads take `&self`).
#[derive(Debug)]
pub struct SegmentLog {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    config: LogConfig,
    segments: Vec<Segment>,
    durable: LogPosition,
    /// Bumped by truncation and reset, so that a flush begun before them cannot raise `durable`.
    generation: u64,
    failed: Option<String>,
}

impl SegmentLog {
    /// Opens (recovering) or creates the log in `dir`.
    ///
    /// Recovery verifies every batch after each segment's index checkpoint. A crash tail (invalid
    /// bytes that were never durable) is zeroed and dropped; an invalid batch inside the durable
    /// part returns [`StorageError::Corrupt`] and changes nothing.
    pub fn open(disk: Arc<dyn Disk>, dir: impl Into<PathBuf>, config: LogConfig) -> Result<SegmentLog> {
        config.validate()?;
        let dir = dir.into();
        // A partition whose directory is not durable in its parent could vanish whole in a
        // power loss, acknowledged batches included.
        disk::create_dir_durable(&*disk, &dir).ctx("create dir", &dir)?;
        let mut log = SegmentLog {
            disk,
            dir,
            config,
            segments: Vec::new(),
            durable: LogPosition::default(),
            generation: 0,
            failed: None,
        };
        log.recover()?;
        let marker = log.dir.join(RESET_MARKER);
        if log.disk.exists(&marker).ctx("stat", &marker)? {
            let bytes = disk::read_whole(&*log.disk, &marker).ctx("read", &marker)?;
            // write_atomic makes the marker whole or absent, so a bad one is corruption.
            let start = decode_position(&bytes).ok_or_else(|| StorageError::Corrupt {
                segment: marker.clone(),
                position: 0,
                reason: "invalid reset marker".into(),
            })?;
            warn!(dir = %log.dir.display(), ?start, "finishing an interrupted reset");
            log.finish_reset(start)?;
        }
        if log.segments.is_empty() {
            log.create_segment(log.config.initial)?;
        }
        log.durable = log.written();
        log.debug_validate();
        info!(dir = %log.dir.display(), start = ?log.start(), end = ?log.written(), segments = log.segments.len(), "log opened");
        Ok(log)
    }

    fn recover(&mut self) -> Result<()> {
        let names = self.disk.list(&self.dir).ctx("list", &self.dir)?;
        let mut bases = Vec::new();
        for name in &names {
            if name.ends_with(".tmp") {
                // A checkpoint that was being written when the node stopped.
                let path = self.dir.join(name);
                self.disk.remove(&path).ctx("remove", &path)?;
            } else if let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let last = i + 1 == count;
            let path = self.dir.join(format!("{base:020}.log"));
            let index_path = self.dir.join(format!("{base:020}.index"));
            let file = self.disk.open(&path).ctx("open", &path)?;
            let len = file.len();
            let bytes = if len == 0 { Bytes::new() } else { file.read(0, len as usize).ctx("read", &path)? };
            let corrupt =
                |position: u64, reason: String| StorageError::Corrupt { segment: path.clone(), position, reason };
            // Segments get their final name only once their header is durable (see
            // `create_segment`), so a bad header is damage, never an unfinished creation.
            let Some(header) = segment::decode_header(&bytes) else {
                return Err(corrupt(0, "invalid segment header".into()));
            };
            if len < SEGMENT_HEADER_BYTES {
                return Err(corrupt(len, "segment shorter than its header page".into()));
            }
            if header.base_offset != base {
                return Err(corrupt(0, format!("header says base offset {}, name says {base}", header.base_offset)));
            }
            let base_pos = LogPosition { offset: header.base_offset, index: header.base_index };
            if let Some(prev) = self.segments.last()
                && prev.end != base_pos
            {
                return Err(corrupt(
                    0,
                    format!("segment starts at {base_pos:?} but the previous one ends at {:?}", prev.end),
                ));
            }
            let hint = segment::decode_hint(&bytes);
            let checkpoint = self.load_checkpoint(&index_path, base_pos, hint, &bytes);
            let (mut entries, from, next, mut max_ts) = match checkpoint {
                Some(c) => (
                    c.entries,
                    c.covered_end,
                    LogPosition { offset: c.next_offset, index: c.next_index },
                    c.max_timestamp_ms,
                ),
                None => (Vec::new(), SEGMENT_HEADER_BYTES, base_pos, i64::MIN),
            };
            let scan = segment::scan(&bytes, from, next.offset, next.index, hint);
            let mut seg = Segment {
                path: path.clone(),
                index_path,
                file,
                base: base_pos,
                end: next,
                data_end: scan.data_end,
                durable_data_end: scan.data_end,
                hint,
                last_entry_position: entries.last().map_or(0, |e| e.position),
                entries: Vec::new(),
                max_timestamp_ms: i64::MIN,
                sealed: !last,
            };
            seg.entries.append(&mut entries);
            for b in &scan.batches {
                seg.add_to_index(&b.header, b.position, self.config.index_interval_bytes);
                seg.end = LogPosition { offset: b.header.next_offset(), index: b.header.raft_index + 1 };
            }
            max_ts = max_ts.max(seg.max_timestamp_ms);
            seg.max_timestamp_ms = max_ts;
            match scan.end {
                ScanEnd::Clean => {}
                ScanEnd::Corrupt { position, reason } => return Err(corrupt(position, reason)),
                ScanEnd::TornTail { position, reason, .. } if !last => {
                    return Err(corrupt(position, format!("{reason} (in a sealed segment)")));
                }
                ScanEnd::TornTail { position, garbage_end, reason } => {
                    warn!(path = %path.display(), position, garbage_end, %reason, "dropping a crash tail");
                    zero_range(&*seg.file, &path, position, garbage_end)?;
                    seg.file.flush(position, garbage_end - position).ctx("flush", &path)?;
                }
            }
            if last {
                // Bytes that survived in the page cache (a process crash, not power loss) may not
                // be on disk yet: make them durable before anyone is told they are.
                seg.file.flush(0, seg.data_end).ctx("flush", &path)?;
                seg.durable_data_end = seg.data_end;
                // The file may have been trimmed (sealed) or never grown: appends grow it again
                // in steps (`ensure_room`).
            }
            debug!(path = %path.display(), base = ?seg.base, end = ?seg.end, batches = scan.batches.len(), "segment recovered");
            self.segments.push(seg);
        }
        Ok(())
    }

    fn load_checkpoint(&self, path: &Path, base: LogPosition, hint: u64, bytes: &Bytes) -> Option<IndexCheckpoint> {
        if !self.disk.exists(path).ok()? {
            return None;
        }
        let data = disk::read_whole(&*self.disk, path).ok()?;
        let c = IndexCheckpoint::decode(&data)?;
        // Trust a checkpoint only if it fits this segment and its last entry still verifies. The
        // segment may have been cut short after the checkpoint was written, so no position from
        // the checkpoint is used to slice the file unchecked.
        let fits = c.covered_end <= hint
            && c.covered_end <= bytes.len() as u64
            && c.next_offset >= base.offset
            && c.next_index >= base.index
            && c.entries
                .first()
                .is_none_or(|e| e.position == SEGMENT_HEADER_BYTES && e.offset == base.offset && e.index == base.index)
            && c.entries.is_empty() == (c.covered_end == SEGMENT_HEADER_BYTES);
        let last_ok = || {
            c.entries.last().is_none_or(|e| {
                usize::try_from(e.position).ok().and_then(|at| bytes.get(at..)).is_some_and(|rest| {
                    keel_record::check(rest).is_ok_and(|h| h.base_offset == e.offset && h.raft_index == e.index)
                })
            })
        };
        (fits && last_ok()).then_some(c)
    }

    /// The first position still in the log.
    pub fn start(&self) -> LogPosition {
        self.segments.first().map_or(self.config.initial, |s| s.base)
    }

    /// The position after the last written batch (not necessarily durable).
    pub fn written(&self) -> LogPosition {
        self.segments.last().map_or(self.config.initial, |s| s.end)
    }

    /// The position after the last durable batch: the only end that may be acknowledged.
    pub fn durable(&self) -> LogPosition {
        self.durable
    }

    /// Bytes of data held by all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.data_end - SEGMENT_HEADER_BYTES).sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(StorageError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, err: StorageError) -> Result<T> {
        warn!(dir = %self.dir.display(), error = %err, "log failed; it must be reopened");
        self.failed = Some(err.to_string());
        Err(err)
    }

    /// Leader path: assigns the next offset and raft index to `batch` (stamping it in place, with
    /// `raft_term`) and appends it. Not durable until a flush covers it.
    pub fn append(&mut self, batch: &mut [u8], raft_term: u64) -> Result<Appended> {
        let next = self.written();
        keel_record::stamp(batch, next.offset, raft_term, next.index)
            .map_err(|e| StorageError::InvalidArgument(format!("batch rejected: {e}")))?;
        self.append_stamped(batch)
    }

    /// Follower path: appends a batch that already carries its offset and raft index, which must
    /// be the log's next ones.
    pub fn append_stamped(&mut self, batch: &[u8]) -> Result<Appended> {
        self.check_usable()?;
        let h = keel_record::check(batch).map_err(|e| StorageError::InvalidArgument(format!("batch rejected: {e}")))?;
        if h.total_len() != batch.len() {
            return Err(StorageError::InvalidArgument("buffer holds more than one batch".into()));
        }
        if batch.len() > self.config.batch_bytes_max() {
            return Err(StorageError::InvalidArgument(format!(
                "batch of {} bytes exceeds the limit of {}",
                batch.len(),
                self.config.batch_bytes_max()
            )));
        }
        let next = self.written();
        if h.base_offset != next.offset || h.raft_index != next.index {
            return Err(StorageError::InvalidArgument(format!(
                "batch at offset {} index {} does not follow the log end {next:?}",
                h.base_offset, h.raft_index
            )));
        }
        self.ensure_room(batch.len() as u64)?;
        let interval = self.config.index_interval_bytes;
        let seg = self.segments.last_mut().ok_or_else(|| StorageError::Failed("no active segment".into()))?;
        let position = seg.data_end;
        if let Err(e) = seg.file.write(position, batch) {
            let path = seg.path.clone();
            return self.fail(StorageError::Io { op: "write", path, source: e });
        }
        seg.data_end += batch.len() as u64;
        seg.add_to_index(&h, position, interval);
        seg.end = LogPosition { offset: h.next_offset(), index: h.raft_index + 1 };
        let written = seg.end;
        self.debug_validate();
        Ok(Appended { header: h, written })
    }

    /// Whether appending `len` more bytes means disk work beyond a page-cache write: rolling the
    /// segment (syncs, a new file, a directory sync) or growing the active file. Callers on an
    /// async runtime do such appends on a blocking thread.
    pub fn needs_room(&self, len: u64) -> bool {
        self.segments.last().is_none_or(|seg| seg.data_end + len > seg.file.len())
    }

    /// Makes room for `len` more bytes: rolls a segment that holds records past its size limit
    /// (one without records keeps growing: its successor would need the same base offset, and
    /// names must be unique), and grows the active file in preallocation steps.
    fn ensure_room(&mut self, len: u64) -> Result<()> {
        let max = self.config.segment_bytes_max;
        let Some(seg) = self.segments.last() else { return Ok(()) };
        if seg.data_end + len > max && seg.records() > 0 {
            let next = seg.end;
            self.seal_active()?;
            self.create_segment_sized(next, self.config.preallocate_step_bytes)?;
        }
        let Some(seg) = self.segments.last() else { return Ok(()) };
        let need = seg.data_end + len;
        if need <= seg.file.len() {
            return Ok(());
        }
        let path = seg.path.clone();
        // Doubling, capped at the step: a partition that has written little reserves little.
        let step = seg.file.len().clamp(SEGMENT_HEADER_BYTES, self.config.preallocate_step_bytes);
        let target = need.max(seg.file.len() + step).next_multiple_of(SEGMENT_HEADER_BYTES).min(max.max(need));
        match seg.file.preallocate(target) {
            Ok(()) => Ok(()),
            Err(e) => self.fail(StorageError::Io { op: "preallocate", path, source: e }),
        }
    }

    /// Flushes the active segment, records its end in its header, trims the preallocated tail and
    /// writes its index checkpoint. Several syncs, once per segment.
    fn seal_active(&mut self) -> Result<()> {
        let disk = Arc::clone(&self.disk);
        let Some(seg) = self.segments.last_mut() else { return Ok(()) };
        let res: Result<()> = (|| {
            seg.file.flush(0, seg.data_end).ctx("flush", &seg.path)?;
            seg.durable_data_end = seg.data_end;
            seg.write_hint(seg.data_end)?;
            seg.file.flush(0, SEGMENT_HEADER_BYTES).ctx("flush", &seg.path)?;
            seg.file.set_len(seg.data_end).ctx("trim", &seg.path)?;
            seg.file.flush(0, 0).ctx("flush", &seg.path)?;
            disk::write_atomic(&*disk, &seg.index_path, &seg.checkpoint().encode())
                .ctx("write index", &seg.index_path)?;
            Ok(())
        })();
        if let Err(e) = res {
            return self.fail(e);
        }
        seg.sealed = true;
        self.durable = self.durable.max(seg.end);
        debug!(path = %seg.path.display(), end = ?seg.end, "segment sealed");
        Ok(())
    }

    /// Creates the active segment at `base`, reserving [`PREALLOCATE_FIRST_BYTES`].
    fn create_segment(&mut self, base: LogPosition) -> Result<()> {
        self.create_segment_sized(base, PREALLOCATE_FIRST_BYTES)
    }

    /// Creates the active segment at `base`, reserving `first` bytes (a roll from a full segment
    /// reserves a whole step: that partition is busy).
    fn create_segment_sized(&mut self, base: LogPosition, first: u64) -> Result<()> {
        let path = self.dir.join(format!("{:020}.log", base.offset));
        let index_path = self.dir.join(format!("{:020}.index", base.offset));
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        // Built under a temporary name and renamed once its header is durable, so a crash never
        // leaves a segment-named file without a valid header.
        let res: Result<Arc<dyn DiskFile>> = (|| {
            for stale in [&path, &index_path, &tmp] {
                // Left by a truncation or reset that removed it from the log before a crash.
                if self.disk.exists(stale).ctx("stat", stale)? {
                    self.disk.remove(stale).ctx("remove", stale)?;
                }
            }
            let file = self.disk.create(&tmp).ctx("create", &tmp)?;
            let first = first
                .min(self.config.preallocate_step_bytes)
                .min(self.config.segment_bytes_max)
                .max(SEGMENT_HEADER_BYTES);
            file.preallocate(first).ctx("preallocate", &tmp)?;
            file.write(0, &segment::encode_header(SegmentHeader { base_offset: base.offset, base_index: base.index }))
                .ctx("write header", &tmp)?;
            file.write(segment::HINT_POSITION, &segment::encode_hint(SEGMENT_HEADER_BYTES))
                .ctx("write header", &tmp)?;
            file.flush(0, SEGMENT_HEADER_BYTES).ctx("flush", &tmp)?;
            self.disk.rename(&tmp, &path).ctx("rename", &path)?;
            self.disk.sync_dir(&self.dir).ctx("sync dir", &self.dir)?;
            Ok(file)
        })();
        let file = match res {
            Ok(f) => f,
            Err(e) => return self.fail(e),
        };
        self.segments.push(Segment {
            path,
            index_path,
            file,
            base,
            end: base,
            data_end: SEGMENT_HEADER_BYTES,
            durable_data_end: SEGMENT_HEADER_BYTES,
            hint: SEGMENT_HEADER_BYTES,
            entries: Vec::new(),
            last_entry_position: 0,
            max_timestamp_ms: i64::MIN,
            sealed: false,
        });
        Ok(())
    }

    /// Starts a flush of everything written so far, or `None` if it is all durable already.
    pub fn begin_flush(&mut self) -> Result<Option<FlushTicket>> {
        self.check_usable()?;
        let generation = self.generation;
        let Some(seg) = self.segments.last() else { return Ok(None) };
        if seg.end == self.durable {
            return Ok(None);
        }
        Ok(Some(FlushTicket {
            file: Arc::clone(&seg.file),
            path: seg.path.clone(),
            segment_base: seg.base.offset,
            data_end: seg.data_end,
            target: seg.end,
            generation,
            durable_data_end: seg.durable_data_end,
        }))
    }

    /// Completes a flush: on success, advances the durable end; on failure the log is failed (after
    /// a failed fsync the kernel may have dropped the pages, so retrying could ack lost data).
    pub fn complete_flush(&mut self, ticket: FlushTicket, result: std::io::Result<()>) -> Result<LogPosition> {
        if let Err(source) = result {
            return self.fail(StorageError::Io { op: "flush", path: ticket.path, source });
        }
        if ticket.generation != self.generation {
            // A truncation or reset happened meanwhile; what this flush covered may be gone.
            return Ok(self.durable);
        }
        if let Some(seg) = self.segments.iter_mut().rev().find(|s| s.base.offset == ticket.segment_base) {
            seg.durable_data_end = seg.durable_data_end.max(ticket.data_end);
            // No flush of its own: the next flush or write-back carries it, and it never claims
            // more than is durable now.
            let durable_end = seg.durable_data_end;
            if let Err(e) = seg.write_hint(durable_end) {
                return self.fail(e);
            }
        }
        self.durable = self.durable.max(ticket.target);
        self.debug_validate();
        Ok(self.durable)
    }

    /// Flushes everything written and returns the durable end.
    pub fn flush(&mut self) -> Result<LogPosition> {
        match self.begin_flush()? {
            None => Ok(self.durable),
            Some(ticket) => {
                let result = ticket.run();
                self.complete_flush(ticket, result)
            }
        }
    }

    /// Flushes, records exact durable ends and writes the active segment's index checkpoint, so
    /// that the next open verifies nothing it does not have to.
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        let disk = Arc::clone(&self.disk);
        if let Some(seg) = self.segments.last_mut() {
            seg.write_hint(seg.durable_data_end)?;
            seg.file.flush(0, SEGMENT_HEADER_BYTES).ctx("flush", &seg.path)?;
            disk::write_atomic(&*disk, &seg.index_path, &seg.checkpoint().encode())
                .ctx("write index", &seg.index_path)?;
        }
        Ok(())
    }

    fn segment_for(&self, key: u64, key_of: impl Fn(&LogPosition) -> u64) -> Option<usize> {
        let n = self.segments.partition_point(|s| key_of(&s.base) <= key);
        n.checked_sub(1)
    }

    /// Reads batches holding offsets from `from_offset` on: at least one batch (if any is there),
    /// then more while the total stays within `bytes_max`, never a batch that ends after
    /// `upto_offset` (pass the high watermark, or `written().offset` for everything written).
    /// Raft-only batches are skipped. Each batch's CRC is verified; a bad one is `Corrupt`.
    pub fn read(&self, from_offset: u64, bytes_max: usize, upto_offset: u64) -> Result<Vec<Batch>> {
        let (start, end) = (self.start().offset, self.written().offset);
        if from_offset < start || from_offset > end {
            return Err(StorageError::OutOfRange { what: "offset", requested: from_offset, start, end: end + 1 });
        }
        let mut out = Vec::new();
        let mut total = 0usize;
        let Some(first) = self.segment_for(from_offset, |p| p.offset) else { return Ok(out) };
        for seg in &self.segments[first..] {
            let entry = index::floor(&seg.entries, from_offset, |e| e.offset);
            let mut pos = entry.map_or(SEGMENT_HEADER_BYTES, |e| e.position);
            while pos < seg.data_end {
                let batch = seg.batch_at(pos)?;
                pos += batch.bytes().len() as u64;
                let h = *batch.header();
                if h.next_offset() <= from_offset || h.record_count == 0 {
                    continue;
                }
                if h.next_offset() > upto_offset || (!out.is_empty() && total + batch.bytes().len() > bytes_max) {
                    return Ok(out);
                }
                total += batch.bytes().len();
                out.push(batch);
            }
        }
        Ok(out)
    }

    /// Reads the batches with raft indexes in `[from_index, to_index)`, up to `bytes_max` (at least
    /// one). Includes raft-only batches. This is how raft reads its log.
    pub fn read_entries(&self, from_index: u64, to_index: u64, bytes_max: usize) -> Result<Vec<Batch>> {
        let (start, end) = (self.start().index, self.written().index);
        if from_index < start || to_index > end || from_index > to_index {
            return Err(StorageError::OutOfRange { what: "index", requested: from_index, start, end });
        }
        let mut out = Vec::new();
        let mut total = 0usize;
        let Some(first) = self.segment_for(from_index, |p| p.index) else { return Ok(out) };
        'segments: for seg in &self.segments[first..] {
            let entry = index::floor(&seg.entries, from_index, |e| e.index);
            let mut pos = entry.map_or(SEGMENT_HEADER_BYTES, |e| e.position);
            while pos < seg.data_end {
                let batch = seg.batch_at(pos)?;
                pos += batch.bytes().len() as u64;
                let index = batch.header().raft_index;
                if index < from_index {
                    continue;
                }
                if index >= to_index || (!out.is_empty() && total + batch.bytes().len() > bytes_max) {
                    break 'segments;
                }
                total += batch.bytes().len();
                out.push(batch);
            }
        }
        Ok(out)
    }

    /// Position of the batch with raft index `index` (segment slot and byte position).
    fn locate_index(&self, index: u64) -> Result<(usize, u64, BatchHeader)> {
        let (start, end) = (self.start().index, self.written().index);
        let out_of_range = || StorageError::OutOfRange { what: "index", requested: index, start, end };
        let slot = self.segment_for(index, |p| p.index).ok_or_else(out_of_range)?;
        let seg = &self.segments[slot];
        let mut pos = index::floor(&seg.entries, index, |e| e.index).map_or(SEGMENT_HEADER_BYTES, |e| e.position);
        while pos < seg.data_end {
            let h = *seg.batch_at(pos)?.header();
            if h.raft_index == index {
                return Ok((slot, pos, h));
            }
            pos += h.total_len() as u64;
        }
        Err(out_of_range())
    }

    /// The header of the batch with raft index `index`.
    pub fn header_at(&self, index: u64) -> Result<BatchHeader> {
        self.locate_index(index).map(|(_, _, h)| h)
    }

    /// Removes every batch with raft index `>= from_index`. Raft calls this for uncommitted
    /// entries that conflict with the leader's; committed entries must never be truncated (the
    /// caller's contract). Durable before it returns: a crash cannot bring the batches back.
    pub fn truncate_from_index(&mut self, from_index: u64) -> Result<()> {
        self.check_usable()?;
        if from_index == self.written().index {
            return Ok(());
        }
        let (slot, position, _) = self.locate_index(from_index)?;
        let cut =
            LogPosition { offset: self.segments[slot].batch_at(position)?.header().base_offset, index: from_index };
        if let Err(e) = self.cut(slot, position, cut) {
            return self.fail(e);
        }
        self.debug_validate();
        info!(dir = %self.dir.display(), ?cut, "log truncated");
        Ok(())
    }

    /// Removes every record with offset `>= offset` (and the raft-only batches among them).
    /// `offset` must be a batch boundary; inside a batch it is an invalid argument.
    pub fn truncate_from_offset(&mut self, offset: u64) -> Result<()> {
        self.check_usable()?;
        let (start, end) = (self.start().offset, self.written().offset);
        if offset < start || offset > end {
            return Err(StorageError::OutOfRange { what: "offset", requested: offset, start, end: end + 1 });
        }
        // The first batch whose base offset is >= `offset` (raft-only batches at `offset` included,
        // hence the search from the last batch strictly below it).
        let below = offset.checked_sub(1).filter(|_| offset > start);
        let slot = below.and_then(|k| self.segment_for(k, |p| p.offset)).unwrap_or(0);
        let mut target = None;
        'find: for seg in &self.segments[slot..] {
            let entry = below.and_then(|k| index::floor(&seg.entries, k, |e| e.offset));
            let mut pos = entry.map_or(SEGMENT_HEADER_BYTES, |e| e.position);
            while pos < seg.data_end {
                let h = *seg.batch_at(pos)?.header();
                if h.base_offset >= offset {
                    target = Some(h.raft_index);
                    break 'find;
                }
                if h.next_offset() > offset {
                    return Err(StorageError::InvalidArgument(format!("offset {offset} is inside a batch")));
                }
                pos += h.total_len() as u64;
            }
        }
        match target {
            Some(index) => self.truncate_from_index(index),
            None => Ok(()),
        }
    }

    /// Cuts the log at `position` of segment `slot` (the batch at `cut`). Order matters for crash
    /// safety: later segments go first (a crash then leaves a prefix of the old log), then the
    /// segment's checkpoint, then its hint is lowered durably, and only then its bytes are zeroed.
    fn cut(&mut self, slot: usize, position: u64, cut: LogPosition) -> Result<()> {
        self.generation += 1;
        for seg in self.segments.drain(slot + 1..).rev() {
            for p in [&seg.path, &seg.index_path] {
                if self.disk.exists(p).ctx("stat", p)? {
                    self.disk.remove(p).ctx("remove", p)?;
                }
            }
        }
        let seg = &mut self.segments[slot];
        if self.disk.exists(&seg.index_path).ctx("stat", &seg.index_path)? {
            self.disk.remove(&seg.index_path).ctx("remove", &seg.index_path)?;
        }
        self.disk.sync_dir(&self.dir).ctx("sync dir", &self.dir)?;
        if seg.hint > position {
            seg.write_hint(position)?;
            seg.file.flush(0, SEGMENT_HEADER_BYTES).ctx("flush", &seg.path)?;
        }
        // A sealed segment becomes the active one again; appends grow its file as needed.
        seg.sealed = false;
        zero_range(&*seg.file, &seg.path, position, seg.data_end)?;
        seg.file.flush(position, seg.data_end - position).ctx("flush", &seg.path)?;
        seg.data_end = position;
        seg.durable_data_end = seg.durable_data_end.min(position);
        seg.end = cut;
        seg.entries.retain(|e| e.position < position);
        seg.last_entry_position = seg.entries.last().map_or(0, |e| e.position);
        // max_timestamp_ms may now be too high, which only delays time-based retention.
        self.durable = self.durable.min(cut);
        Ok(())
    }

    /// Deletes whole old segments that retention allows, never the active one and never one that
    /// holds offsets at or above `upto_offset` (the caller's safe point, e.g. what consumers and
    /// raft no longer need). Returns the new start of the log.
    pub fn apply_retention(&mut self, now_ms: i64, upto_offset: u64) -> Result<LogPosition> {
        self.check_usable()?;
        let remove = self.retainable(now_ms, upto_offset);
        self.remove_oldest(remove)
    }

    /// Where the log would start after `apply_retention(now_ms, upto_offset)`, without changing
    /// anything (raft purges through its own path, up to this point).
    pub fn retention_point(&self, now_ms: i64, upto_offset: u64) -> LogPosition {
        self.segments.get(self.retainable(now_ms, upto_offset)).map_or(self.start(), |s| s.base)
    }

    /// Where the log would start if every whole segment below `below_offset` went (a compacted
    /// partition whose live state was rewritten above that offset); the last segment stays.
    pub fn obsolete_point(&self, below_offset: u64) -> LogPosition {
        let n = self.segments.len().saturating_sub(1);
        let remove = self.segments[..n].iter().take_while(|s| s.end.offset <= below_offset).count();
        self.segments.get(remove).map_or(self.start(), |s| s.base)
    }

    /// How many of the oldest segments retention allows deleting.
    fn retainable(&self, now_ms: i64, upto_offset: u64) -> usize {
        let mut total = self.size_bytes();
        let mut remove = 0;
        for seg in &self.segments[..self.segments.len().saturating_sub(1)] {
            if seg.end.offset > upto_offset {
                break;
            }
            let size = seg.data_end - SEGMENT_HEADER_BYTES;
            let by_size = self.config.retention_bytes.is_some_and(|max| total.saturating_sub(size) >= max);
            let by_time = self.config.retention_ms.is_some_and(|ms| seg.max_timestamp_ms < now_ms.saturating_sub(ms));
            if !(by_size || by_time) {
                break;
            }
            total -= size;
            remove += 1;
        }
        remove
    }

    /// Deletes whole segments whose batches all have raft indexes below `index` (raft purge after
    /// a snapshot). Returns the new start.
    pub fn purge_before_index(&mut self, index: u64) -> Result<LogPosition> {
        self.check_usable()?;
        let remove = self.purgeable(index);
        self.remove_oldest(remove)
    }

    /// True when a segment starts at raft index `index`.
    pub fn is_segment_base(&self, index: u64) -> bool {
        self.segments.binary_search_by_key(&index, |s| s.base.index).is_ok()
    }

    /// Where the log would start after `purge_before_index(index)`, without changing anything.
    pub fn purge_point(&self, index: u64) -> LogPosition {
        self.segments.get(self.purgeable(index)).map_or(self.start(), |s| s.base)
    }

    fn purgeable(&self, index: u64) -> usize {
        let n = self.segments.len().saturating_sub(1);
        self.segments[..n].iter().take_while(|s| s.end.index <= index).count()
    }

    fn remove_oldest(&mut self, count: usize) -> Result<LogPosition> {
        if count == 0 {
            return Ok(self.start());
        }
        // Oldest first: a crash in between leaves a suffix of segments, still contiguous.
        for seg in self.segments.drain(..count) {
            for p in [&seg.index_path, &seg.path] {
                if self.disk.exists(p).ctx("stat", p)? {
                    self.disk.remove(p).ctx("remove", p)?;
                }
            }
            info!(path = %seg.path.display(), end = ?seg.end, "segment deleted");
        }
        self.disk.sync_dir(&self.dir).ctx("sync dir", &self.dir)?;
        if !self.segments.is_empty() {
            self.debug_validate();
        }
        Ok(self.start())
    }

    /// Deletes everything and restarts the log empty at `start` (a follower installing a
    /// snapshot that is newer than its whole log). A durable marker makes it all-or-nothing: if
    /// the node stops half way, the next open finishes the reset.
    pub fn reset(&mut self, start: LogPosition) -> Result<()> {
        self.check_usable()?;
        self.generation += 1;
        let marker = self.dir.join(RESET_MARKER);
        if let Err(e) = disk::write_atomic(&*self.disk, &marker, &encode_position(start)).ctx("write", &marker) {
            return self.fail(e);
        }
        self.finish_reset(start)
    }

    fn finish_reset(&mut self, start: LogPosition) -> Result<()> {
        let count = self.segments.len();
        self.remove_oldest(count)?;
        self.create_segment(start)?;
        let marker = self.dir.join(RESET_MARKER);
        let res = self.disk.remove(&marker).and_then(|()| self.disk.sync_dir(&self.dir));
        if let Err(e) = res.ctx("remove", &marker) {
            return self.fail(e);
        }
        self.durable = start;
        self.debug_validate();
        info!(dir = %self.dir.display(), ?start, "log reset");
        Ok(())
    }

    fn debug_validate(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        for w in self.segments.windows(2) {
            assert_eq!(w[0].end, w[1].base, "segments must be contiguous");
            assert!(w[0].sealed, "only the last segment is active");
            assert!(w[0].records() > 0, "a sealed segment holds records");
        }
        for s in &self.segments {
            assert!(s.base <= s.end);
            assert!(s.durable_data_end <= s.data_end);
            assert!(s.hint <= s.durable_data_end.max(SEGMENT_HEADER_BYTES), "hint claims more than is durable");
        }
        assert!(self.start() <= self.durable && self.durable <= self.written(), "start <= durable <= written");
    }
}

const RESET_MARKER: &str = "reset.marker";

fn encode_position(p: LogPosition) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&p.offset.to_be_bytes());
    out.extend_from_slice(&p.index.to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn decode_position(b: &[u8]) -> Option<LogPosition> {
    if b.len() != 20 || crc32fast::hash(&b[..16]).to_be_bytes() != b[16..20] {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    Some(LogPosition { offset: word(0), index: word(8) })
}

/// Writes zeros over `[from, to)` in bounded chunks.
fn zero_range(file: &dyn DiskFile, path: &Path, from: u64, to: u64) -> Result<()> {
    const CHUNK: usize = 64 * 1024;
    let zeros = [0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(CHUNK);
        file.write(at, &zeros[..n]).ctx("zero", path)?;
        at += n as u64;
    }
    Ok(())
}
