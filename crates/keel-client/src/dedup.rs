//! Idempotent consumption: run a handler once per message even when the message is delivered
//! twice (after a rebalance, or a consumer that died before committing its offset). A message is
//! known by its idempotent producer stamp — (topic, partition, producer id, epoch, sequence),
//! unique in the log — or by a header the application sets (its own message id). What was
//! processed is remembered in a [`ProcessedStore`]: [`MemoryStore`] for one process's life,
//! [`FileStore`] across restarts, or the application's own (best: in the database the handler
//! writes to, in the same transaction, which closes the one window left — a crash after the
//! handler's effect and before the mark).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::consumer::ConsumerRecord;

/// Why the store could not answer or remember.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The store's file could not be read or written.
    #[error("processed-message store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store's file holds something this code did not write.
    #[error("processed-message store {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What identifies a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageId {
    /// Written by an idempotent producer: its stamp is unique in the partition's log.
    Sequence {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The producer id.
        producer_id: i64,
        /// The producer epoch (sequences restart at each).
        epoch: i16,
        /// The record's sequence.
        sequence: i32,
    },
    /// An id the application gave the message (a header's value).
    Key(Vec<u8>),
}

impl MessageId {
    /// The id of `record`: the value of `header` if set and present, else its producer stamp.
    /// `None` when it has neither (a record written without idempotence and without the header
    /// cannot be recognised).
    pub fn of(record: &ConsumerRecord, header: Option<&str>) -> Option<MessageId> {
        if let Some(name) = header
            && let Some((_, Some(value))) = record.headers.iter().find(|(k, _)| k == name)
        {
            return Some(MessageId::Key(value.to_vec()));
        }
        record.producer.map(|p| MessageId::Sequence {
            topic: record.topic.clone(),
            partition: record.partition,
            producer_id: p.id,
            epoch: p.epoch,
            sequence: p.sequence,
        })
    }
}

/// Where processed messages are remembered.
pub trait ProcessedStore {
    /// Whether `id` was marked processed.
    fn seen(&self, id: &MessageId) -> bool;
    /// Marks `id` processed; when this returns `Ok`, the mark survives what the store promises
    /// to survive (a [`FileStore`]: a crash of the process or of the machine).
    fn mark(&mut self, id: &MessageId) -> Result<(), DedupError>;
}

/// Sequences of one (topic, partition, producer, epoch): every one below `below`, and `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Window {
    below: i64,
    above: BTreeSet<i64>,
}

impl Window {
    fn contains(&self, s: i64) -> bool {
        s < self.below || self.above.contains(&s)
    }

    fn insert(&mut self, s: i64) {
        if s < self.below {
            return;
        }
        self.above.insert(s);
        // Consumption is in log order, so marks usually arrive in sequence order: fold them in.
        while self.above.remove(&self.below) {
            self.below += 1;
        }
    }
}

type SequenceKey = (String, u32, i64, i16);

/// Processed messages in memory, for one process's life. Bounded: at most `keys_max`
/// application ids (the oldest are forgotten first) and `producers_max` producer windows (the
/// least recently marked are forgotten first); a forgotten message would be processed again.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    windows: BTreeMap<SequenceKey, (Window, u64)>,
    keys: HashSet<Vec<u8>>,
    key_order: VecDeque<Vec<u8>>,
    keys_max: usize,
    producers_max: usize,
    clock: u64,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new(1_000_000, 100_000)
    }
}

impl MemoryStore {
    /// A store remembering at most `keys_max` application ids and `producers_max` producers.
    pub fn new(keys_max: usize, producers_max: usize) -> MemoryStore {
        MemoryStore {
            windows: BTreeMap::new(),
            keys: HashSet::new(),
            key_order: VecDeque::new(),
            keys_max: keys_max.max(1),
            producers_max: producers_max.max(1),
            clock: 0,
        }
    }

    fn restore_below(&mut self, key: SequenceKey, below: i64) {
        self.clock += 1;
        let (window, used) = self.windows.entry(key).or_default();
        window.below = window.below.max(below);
        window.above.retain(|s| *s >= below);
        *used = self.clock;
    }

    fn remember(&mut self, id: &MessageId) {
        self.clock += 1;
        match id {
            MessageId::Sequence { topic, partition, producer_id, epoch, sequence } => {
                let key = (topic.clone(), *partition, *producer_id, *epoch);
                let (window, used) = self.windows.entry(key).or_default();
                window.insert(i64::from(*sequence));
                *used = self.clock;
                if self.windows.len() > self.producers_max {
                    let oldest = self.windows.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        self.windows.remove(&k);
                    }
                }
            }
            MessageId::Key(k) => {
                if self.keys.insert(k.clone()) {
                    self.key_order.push_back(k.clone());
                    while self.key_order.len() > self.keys_max {
                        if let Some(old) = self.key_order.pop_front() {
                            self.keys.remove(&old);
                        }
                    }
                }
            }
        }
    }
}

impl ProcessedStore for MemoryStore {
    fn seen(&self, id: &MessageId) -> bool {
        match id {
            MessageId::Sequence { topic, partition, producer_id, epoch, sequence } => self
                .windows
                .get(&(topic.clone(), *partition, *producer_id, *epoch))
                .is_some_and(|(w, _)| w.contains(i64::from(*sequence))),
            MessageId::Key(k) => self.keys.contains(k),
        }
    }

    fn mark(&mut self, id: &MessageId) -> Result<(), DedupError> {
        self.remember(id);
        Ok(())
    }
}

/// Largest encoded id in a [`FileStore`] (application ids longer than this are refused).
const ENTRY_BYTES_MAX: usize = 64 << 10;

/// Processed messages in an append-only file, synced at every mark, so that they survive a
/// crash of the process or the machine. Each entry carries its length and CRC: a torn last
/// entry (a crash in the middle of a write) is dropped when the file is opened, anything else
/// that does not check is [`DedupError::Corrupt`]. The file is rewritten from memory (to a
/// temporary file, synced, renamed) once it holds `compact_after` entries more than memory does.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    memory: MemoryStore,
    entries: usize,
    compact_after: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DedupError + '_ {
    move |source| DedupError::Io { path: path.to_owned(), source }
}

/// What one file entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// This message was processed.
    Mark(MessageId),
    /// Every sequence below `below` of this producer was processed (written by compaction).
    Below(SequenceKey, i64),
}

fn encode(id: &MessageId, out: &mut Vec<u8>) {
    encode_entry(&Entry::Mark(id.clone()), out);
}

fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    match entry {
        Entry::Below((topic, partition, producer_id, epoch), below) => {
            body.push(3);
            body.extend_from_slice(&(topic.len() as u32).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&partition.to_be_bytes());
            body.extend_from_slice(&producer_id.to_be_bytes());
            body.extend_from_slice(&epoch.to_be_bytes());
            body.extend_from_slice(&below.to_be_bytes());
        }
        Entry::Mark(MessageId::Sequence { topic, partition, producer_id, epoch, sequence }) => {
            body.push(1);
            body.extend_from_slice(&(topic.len() as u32).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&partition.to_be_bytes());
            body.extend_from_slice(&producer_id.to_be_bytes());
            body.extend_from_slice(&epoch.to_be_bytes());
            body.extend_from_slice(&sequence.to_be_bytes());
        }
        Entry::Mark(MessageId::Key(k)) => {
            body.push(2);
            body.extend_from_slice(k);
        }
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
}

fn decode(body: &[u8]) -> Option<Entry> {
    let (&tag, rest) = body.split_first()?;
    let sequenced = |rest: &[u8], tail: usize| -> Option<(SequenceKey, Vec<u8>)> {
        let (len, rest) = rest.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (topic, rest) = rest.split_at_checked(len)?;
        let topic = String::from_utf8(topic.to_vec()).ok()?;
        if rest.len() != 4 + 8 + 2 + tail {
            return None;
        }
        let key = (
            topic,
            u32::from_be_bytes(rest[0..4].try_into().ok()?),
            i64::from_be_bytes(rest[4..12].try_into().ok()?),
            i16::from_be_bytes(rest[12..14].try_into().ok()?),
        );
        Some((key, rest[14..].to_vec()))
    };
    match tag {
        1 => {
            let ((topic, partition, producer_id, epoch), tail) = sequenced(rest, 4)?;
            let sequence = i32::from_be_bytes(tail.as_slice().try_into().ok()?);
            Some(Entry::Mark(MessageId::Sequence { topic, partition, producer_id, epoch, sequence }))
        }
        2 => Some(Entry::Mark(MessageId::Key(rest.to_vec()))),
        3 => {
            let (key, tail) = sequenced(rest, 8)?;
            Some(Entry::Below(key, i64::from_be_bytes(tail.as_slice().try_into().ok()?)))
        }
        _ => None,
    }
}

impl FileStore {
    /// Opens (or creates) the store at `path`, with a [`MemoryStore::default`] of bounds.
    pub fn open(path: impl Into<PathBuf>) -> Result<FileStore, DedupError> {
        FileStore::open_with(path, MemoryStore::default(), 100_000)
    }

    /// Opens (or creates) the store at `path` into `memory` (its bounds apply), rewriting the
    /// file once it holds `compact_after` entries.
    pub fn open_with(
        path: impl Into<PathBuf>,
        mut memory: MemoryStore,
        compact_after: usize,
    ) -> Result<FileStore, DedupError> {
        let path = path.into();
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let mut pos = 0;
        let mut entries = 0;
        while pos < bytes.len() {
            let Some(head) = bytes.get(pos..pos + 8) else { break };
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if len > ENTRY_BYTES_MAX + 64 {
                return Err(DedupError::Corrupt { path, reason: format!("entry at byte {pos} claims {len} bytes") });
            }
            let Some(body) = bytes.get(pos + 8..pos + 8 + len) else { break };
            if crc32fast::hash(body) != crc {
                if pos + 8 + len == bytes.len() {
                    break; // the last write, torn
                }
                return Err(DedupError::Corrupt { path, reason: format!("entry at byte {pos} fails its CRC") });
            }
            let entry = decode(body).ok_or_else(|| DedupError::Corrupt {
                path: path.clone(),
                reason: format!("entry at byte {pos} is malformed"),
            })?;
            match entry {
                Entry::Mark(id) => memory.remember(&id),
                Entry::Below(key, below) => memory.restore_below(key, below),
            }
            entries += 1;
            pos += 8 + len;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        if pos < bytes.len() {
            // Drop the torn tail, so that the next entry starts on a boundary.
            file.set_len(pos as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        Ok(FileStore { path, file, memory, entries, compact_after: compact_after.max(1) })
    }

    /// Rewrites the file with what memory holds: one entry per window sequence still needed.
    fn compact(&mut self) -> Result<(), DedupError> {
        let mut out = Vec::new();
        let mut count = 0;
        for (key, (window, _)) in &self.memory.windows {
            // A window is its contiguous prefix and the marks above it.
            encode_entry(&Entry::Below(key.clone(), window.below), &mut out);
            count += 1;
            for s in &window.above {
                let Ok(sequence) = i32::try_from(*s) else { continue };
                let (topic, partition, producer_id, epoch) = key.clone();
                encode(&MessageId::Sequence { topic, partition, producer_id, epoch, sequence }, &mut out);
                count += 1;
            }
        }
        for k in &self.memory.key_order {
            encode(&MessageId::Key(k.clone()), &mut out);
            count += 1;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&out).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io(&self.path))?;
        self.entries = count;
        Ok(())
    }
}

impl ProcessedStore for FileStore {
    fn seen(&self, id: &MessageId) -> bool {
        self.memory.seen(id)
    }

    fn mark(&mut self, id: &MessageId) -> Result<(), DedupError> {
        if let MessageId::Key(k) = id
            && k.len() > ENTRY_BYTES_MAX
        {
            return Err(DedupError::Corrupt {
                path: self.path.clone(),
                reason: format!("a message id of {} bytes is over the {ENTRY_BYTES_MAX}-byte limit", k.len()),
            });
        }
        let mut entry = Vec::new();
        encode(id, &mut entry);
        self.file.write_all(&entry).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.memory.remember(id);
        self.entries += 1;
        if self.entries >= self.compact_after {
            self.compact()?;
        }
        Ok(())
    }
}

/// What [`Deduplicator::process`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The handler ran and the message is marked.
    Ran,
    /// Already processed: the handler did not run.
    Skipped,
    /// The record has no id (no producer stamp, no id header): the handler ran, unmarked.
    Unidentified,
}

/// Counts of what a [`Deduplicator`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Handlers run and marked.
    pub ran: u64,
    /// Duplicates skipped.
    pub skipped: u64,
    /// Records without an id, run unmarked.
    pub unidentified: u64,
}

/// Runs a handler at most once per message id, remembering ids in a [`ProcessedStore`]. Call
/// it for each record before committing the record's offset: a record delivered again after a
/// rebalance or a crash is then skipped.
#[derive(Debug)]
pub struct Deduplicator<S> {
    store: S,
    header: Option<String>,
    stats: DedupStats,
}

/// A handler's own error, or the store's.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    /// The handler failed: the message is not marked, so it runs again when redelivered.
    #[error("handler failed: {0}")]
    Handler(E),
    /// The handler ran but the mark could not be made durable.
    #[error(transparent)]
    Store(#[from] DedupError),
}

impl<S: ProcessedStore> Deduplicator<S> {
    /// Recognises messages by their producer stamp.
    pub fn new(store: S) -> Deduplicator<S> {
        Deduplicator { store, header: None, stats: DedupStats::default() }
    }

    /// Recognises messages by the value of header `name` first (the producer stamp for records
    /// without it).
    pub fn by_header(store: S, name: impl Into<String>) -> Deduplicator<S> {
        Deduplicator { store, header: Some(name.into()), stats: DedupStats::default() }
    }

    /// Runs `handler` on `record` unless its id was processed; marks it when the handler
    /// succeeds.
    pub fn process<E>(
        &mut self,
        record: &ConsumerRecord,
        handler: impl FnOnce(&ConsumerRecord) -> Result<(), E>,
    ) -> Result<Processed, ProcessError<E>> {
        let Some(id) = MessageId::of(record, self.header.as_deref()) else {
            handler(record).map_err(ProcessError::Handler)?;
            self.stats.unidentified += 1;
            return Ok(Processed::Unidentified);
        };
        if self.store.seen(&id) {
            self.stats.skipped += 1;
            return Ok(Processed::Skipped);
        }
        handler(record).map_err(ProcessError::Handler)?;
        self.store.mark(&id)?;
        self.stats.ran += 1;
        Ok(Processed::Ran)
    }

    /// What it did so far.
    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::consumer::RecordProducer;

    fn record(partition: u32, sequence: i32, id_header: Option<&str>) -> ConsumerRecord {
        ConsumerRecord {
            topic: "t".into(),
            partition,
            offset: sequence as u64,
            timestamp_ms: 0,
            key: None,
            value: None,
            headers: id_header
                .map(|v| vec![("msg-id".to_owned(), Some(v.as_bytes().to_vec().into()))])
                .unwrap_or_default(),
            producer: Some(RecordProducer { id: 9, epoch: 0, sequence }),
            attempt: 1,
        }
    }

    #[test]
    fn a_redelivered_message_runs_once() {
        let mut d = Deduplicator::new(MemoryStore::default());
        let mut ran = Vec::new();
        for s in [0, 1, 2, 1, 2, 3, 0] {
            d.process(&record(0, s, None), |r| {
                ran.push(r.producer.unwrap().sequence);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        assert_eq!(ran, [0, 1, 2, 3]);
        assert_eq!(d.stats(), DedupStats { ran: 4, skipped: 3, unidentified: 0 });
        // Another partition's sequence 0 is another message.
        assert_eq!(d.process(&record(1, 0, None), |_| Ok::<_, ()>(())).unwrap(), Processed::Ran);
    }

    #[test]
    fn a_failed_handler_leaves_the_message_unmarked() {
        let mut d = Deduplicator::new(MemoryStore::default());
        assert!(matches!(d.process(&record(0, 0, None), |_| Err("db down")), Err(ProcessError::Handler("db down"))));
        assert_eq!(d.process(&record(0, 0, None), |_| Ok::<_, ()>(())).unwrap(), Processed::Ran);
    }

    #[test]
    fn application_ids_win_over_stamps_and_are_bounded() {
        let mut d = Deduplicator::by_header(MemoryStore::new(2, 10), "msg-id");
        let run =
            |d: &mut Deduplicator<MemoryStore>, s, id| d.process(&record(0, s, Some(id)), |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(run(&mut d, 0, "a"), Processed::Ran);
        assert_eq!(run(&mut d, 1, "a"), Processed::Skipped, "same id, another stamp: a resend by the application");
        assert_eq!(run(&mut d, 2, "b"), Processed::Ran);
        assert_eq!(run(&mut d, 3, "c"), Processed::Ran);
        assert_eq!(run(&mut d, 4, "a"), Processed::Ran, "the oldest id was forgotten (bound of 2)");
        let mut bare = record(0, 5, None);
        bare.producer = None;
        assert_eq!(d.process(&bare, |_| Ok::<_, ()>(())).unwrap(), Processed::Unidentified);
    }

    #[test]
    fn a_file_store_survives_a_restart_a_torn_tail_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processed");
        {
            let mut d =
                Deduplicator::by_header(FileStore::open_with(&path, MemoryStore::default(), 7).unwrap(), "msg-id");
            for s in 0..10 {
                d.process(&record(0, s, None), |_| Ok::<_, ()>(())).unwrap();
            }
            d.process(&record(0, 99, Some("order-7")), |_| Ok::<_, ()>(())).unwrap();
        }
        // A crash in the middle of the next write leaves half an entry.
        let mut torn = Vec::new();
        encode(&MessageId::Key(b"order-8".to_vec()), &mut torn);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let mut d = Deduplicator::by_header(FileStore::open(&path).unwrap(), "msg-id");
        for s in 0..10 {
            assert_eq!(d.process(&record(0, s, None), |_| Ok::<_, ()>(())).unwrap(), Processed::Skipped, "{s}");
        }
        assert_eq!(d.process(&record(0, 50, Some("order-7")), |_| Ok::<_, ()>(())).unwrap(), Processed::Skipped);
        assert_eq!(
            d.process(&record(0, 51, Some("order-8")), |_| Ok::<_, ()>(())).unwrap(),
            Processed::Ran,
            "torn: never marked"
        );
        assert_eq!(d.process(&record(0, 10, None), |_| Ok::<_, ()>(())).unwrap(), Processed::Ran);
        drop(d);
        // Damage before the end is corruption, not a tail.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(FileStore::open(&path), Err(DedupError::Corrupt { .. })));
    }
}
