//! `SimDisk`: an in-memory disk that injects the faults a healthy node must survive, from a seed.
//!
//! It keeps, per file, the bytes a reader sees (volatile) apart from the bytes that would survive
//! power loss (durable), and per directory the namespace operations not yet made durable. A
//! [`SimDisk::crash`] throws the volatile state away the way a kernel can: unflushed writes are
//! lost, or a random subset of their 4 KiB pages reached the disk (write-back has no order), or
//! the last write was torn (between sectors: drives write a 512-byte sector atomically); unsynced
//! creates, renames, removes and directory creations are kept only as a prefix, in order, as a
//! journaling file system does. A directory whose creation did not survive takes everything
//! below it along, however durable that was inside it. Bit flips are injected on demand. Every
//! choice comes from one seeded RNG, so a run is a function of its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::{Disk, DiskFile, SECTOR_BYTES};

/// Page size used to model write-back.
pub const PAGE_BYTES: u64 = 4096;

/// How a crash treats writes that were not flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unflushed write is lost.
    DropUnflushed,
    /// Each dirty page independently did or did not reach the disk.
    RandomPages,
    /// Unflushed writes are lost, except a random prefix (whole sectors) of the last write of
    /// each file.
    TornLastWrite,
}

/// The simulated disk; clones share the same state (one node's disk).
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    rng: ChaCha8Rng,
    /// Handles from before the last crash are dead: their process is gone.
    generation: u64,
    next_inode: u64,
    inodes: BTreeMap<u64, Inode>,
    /// What a process sees now.
    names: BTreeMap<PathBuf, u64>,
    /// What survives a crash.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Namespace changes per directory, in order, not yet made durable by `sync_dir`.
    pending: BTreeMap<PathBuf, Vec<NameOp>>,
    /// Directories a process sees now.
    dirs: BTreeSet<PathBuf>,
    /// Directories whose creation reached their parent durably (roots always have).
    durable_dirs: BTreeSet<PathBuf>,
    /// Counters tests use to prove that flushes happened.
    flushes: u64,
    /// Mutating operations left before the power goes out (`None`: no outage scheduled).
    ops_until_outage: Option<u64>,
    /// The power is out: every operation fails until `crash` resolves what survived.
    dead: bool,
    /// A broken disk for negative controls: `flush` reports success and persists nothing.
    lying_flush: bool,
}

#[derive(Debug, Clone)]
enum NameOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    MakeDir(PathBuf),
}

#[derive(Debug, Default, Clone)]
struct Inode {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    dirty_pages: BTreeSet<u64>,
    /// The most recent unflushed write, for torn-write crashes.
    last_write: Option<(u64, usize)>,
}

impl SimDisk {
    /// A fresh, empty disk whose fault choices follow `seed`.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(State {
                rng: ChaCha8Rng::seed_from_u64(seed),
                generation: 0,
                next_inode: 1,
                inodes: BTreeMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending: BTreeMap::new(),
                dirs: BTreeSet::new(),
                durable_dirs: BTreeSet::new(),
                flushes: 0,
                ops_until_outage: None,
                dead: false,
                lying_flush: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock already failed the test; keep going to report it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An independent copy of this disk (same files, same pending state, same RNG position), for
    /// trying many faults on one prepared state.
    pub fn fork(&self) -> SimDisk {
        let s = self.lock();
        let copy = State {
            rng: s.rng.clone(),
            generation: s.generation,
            next_inode: s.next_inode,
            inodes: s.inodes.iter().map(|(k, v)| (*k, v.clone())).collect(),
            names: s.names.clone(),
            durable_names: s.durable_names.clone(),
            pending: s.pending.clone(),
            dirs: s.dirs.clone(),
            durable_dirs: s.durable_dirs.clone(),
            flushes: s.flushes,
            ops_until_outage: s.ops_until_outage,
            dead: s.dead,
            lying_flush: s.lying_flush,
        };
        SimDisk { state: Arc::new(Mutex::new(copy)) }
    }

    /// Schedules a power outage in the middle of whatever the code under test is doing: after
    /// `ops` more mutating operations (write, flush, set_len, create, remove, rename, sync_dir)
    /// every operation fails, as on a dead machine, until [`SimDisk::crash`] is called.
    pub fn crash_after(&self, ops: u64) {
        self.lock().ops_until_outage = Some(ops);
    }

    /// Makes `flush` lie: it reports success and persists nothing, as a drive with a volatile
    /// cache that ignores flush commands would. Only for proving that checkers can fail.
    pub fn set_lying_flush(&self, lying: bool) {
        self.lock().lying_flush = lying;
    }

    /// True once a scheduled outage has happened (and `crash` has not yet been called).
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// The disk is lost: power off, and the machine comes back with a new, empty disk (the
    /// operator's `keel node replace` case). Handles from before are dead.
    pub fn wipe(&self) {
        let mut s = self.lock();
        s.generation += 1;
        s.dead = false;
        s.ops_until_outage = None;
        s.inodes.clear();
        s.names.clear();
        s.durable_names.clear();
        s.pending.clear();
        s.dirs.clear();
        s.durable_dirs.clear();
    }

    /// Power loss, with the crash mode chosen by the seeded RNG.
    pub fn crash(&self) -> CrashMode {
        let mode = match self.lock().rng.random_range(0..3) {
            0 => CrashMode::DropUnflushed,
            1 => CrashMode::RandomPages,
            _ => CrashMode::TornLastWrite,
        };
        self.crash_with(mode);
        mode
    }

    /// Power loss: open handles die, unflushed data is handled per `mode`, unsynced namespace
    /// changes (directory creations included) survive only as a random prefix per directory, and
    /// a directory that did not survive takes its files and subdirectories with it.
    pub fn crash_with(&self, mode: CrashMode) {
        let mut s = self.lock();
        let s = &mut *s;
        s.generation += 1;
        s.dead = false;
        s.ops_until_outage = None;
        for inode in s.inodes.values_mut() {
            match mode {
                CrashMode::DropUnflushed => {}
                CrashMode::RandomPages => {
                    let pages: Vec<u64> = inode.dirty_pages.iter().copied().collect();
                    for page in pages {
                        if s.rng.random_bool(0.5) {
                            let keep_len = s.rng.random_bool(0.5);
                            inode.persist_page(page, keep_len);
                        }
                    }
                }
                CrashMode::TornLastWrite => {
                    if let Some((offset, len)) = inode.last_write {
                        // Drives write whole sectors atomically, so a torn write keeps the
                        // sectors up to some boundary inside it (or all of it).
                        // The sectors go out whole, with whatever else the page cache holds in
                        // them, so the kept part starts at the first sector's start.
                        let end = offset + len as u64;
                        let first = offset / SECTOR_BYTES * SECTOR_BYTES;
                        let sectors = end.div_ceil(SECTOR_BYTES) - offset / SECTOR_BYTES;
                        let kept = s.rng.random_range(0..=sectors) * SECTOR_BYTES;
                        inode.persist_bytes(first, kept as usize);
                    }
                }
            }
            inode.volatile = inode.durable.clone();
            inode.dirty_pages.clear();
            inode.last_write = None;
        }
        let pending = std::mem::take(&mut s.pending);
        for (_dir, ops) in pending {
            let keep = s.rng.random_range(0..=ops.len());
            for op in ops.into_iter().take(keep) {
                apply(&mut s.durable_names, &mut s.durable_dirs, op);
            }
        }
        // A directory is reachable only through durable entries all the way up from a root.
        let reachable =
            |dirs: &BTreeSet<PathBuf>, path: &Path| path.ancestors().skip(1).all(|a| is_root(a) || dirs.contains(a));
        let durable_dirs: BTreeSet<PathBuf> =
            s.durable_dirs.iter().filter(|d| reachable(&s.durable_dirs, d)).cloned().collect();
        s.durable_names.retain(|p, _| reachable(&durable_dirs, p));
        s.durable_dirs = durable_dirs;
        s.dirs = s.durable_dirs.clone();
        s.names = s.durable_names.clone();
        let live: BTreeSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
    }

    /// Flips one bit of a file, in both its durable and its volatile bytes (bit rot).
    pub fn flip_bit(&self, path: &Path, byte: u64, bit: u8) -> io::Result<()> {
        let mut s = self.lock();
        let ino = *s.names.get(path).ok_or_else(|| not_found(path))?;
        let inode = s.inodes.get_mut(&ino).ok_or_else(|| not_found(path))?;
        let mask = 1u8 << (bit % 8);
        let mut hit = false;
        for bytes in [&mut inode.volatile, &mut inode.durable] {
            if let Some(b) = bytes.get_mut(byte as usize) {
                *b ^= mask;
                hit = true;
            }
        }
        if hit { Ok(()) } else { Err(io::Error::new(io::ErrorKind::UnexpectedEof, "flip past the end")) }
    }

    /// Sets a file's durable and volatile length (to simulate a truncated copy of a file).
    pub fn cut(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        let ino = *s.names.get(path).ok_or_else(|| not_found(path))?;
        let inode = s.inodes.get_mut(&ino).ok_or_else(|| not_found(path))?;
        inode.volatile.resize(len as usize, 0);
        inode.durable.resize(len as usize, 0);
        Ok(())
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// Files of `dir` that would survive a crash now (names made durable by a directory sync).
    pub fn durable_files(&self, dir: &Path) -> Vec<PathBuf> {
        let s = self.lock();
        s.durable_names.keys().filter(|p| p.parent() == Some(dir)).cloned().collect()
    }

    /// A copy of the durable bytes of a file, as they would be after a crash.
    pub fn durable_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let ino = s.durable_names.get(path)?;
        s.inodes.get(ino).map(|i| i.durable.clone())
    }

    fn handle(&self, ino: u64, generation: u64, path: &Path) -> Arc<dyn DiskFile> {
        Arc::new(SimFile { disk: self.clone(), ino, generation, path: path.to_path_buf() })
    }
}

fn apply(names: &mut BTreeMap<PathBuf, u64>, dirs: &mut BTreeSet<PathBuf>, op: NameOp) {
    match op {
        NameOp::Link(path, ino) => {
            names.insert(path, ino);
        }
        NameOp::Unlink(path) => {
            names.remove(&path);
        }
        NameOp::MakeDir(path) => {
            dirs.insert(path);
        }
    }
}

/// A root directory (`/`, or the empty path relative ones hang from) always exists.
fn is_root(dir: &Path) -> bool {
    dir.parent().is_none()
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

impl State {
    /// Counts a mutating operation; fails once the power is out.
    fn tick(&mut self) -> io::Result<()> {
        if let Some(left) = self.ops_until_outage {
            if left == 0 {
                self.dead = true;
            } else {
                self.ops_until_outage = Some(left - 1);
            }
        }
        self.alive()
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead { Err(io::Error::other("simulated power outage")) } else { Ok(()) }
    }

    fn record(&mut self, path: &Path, op: NameOp) {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.pending.entry(dir).or_default().push(op);
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new(""));
        if self.dirs.contains(dir) { Ok(()) } else { Err(not_found(dir)) }
    }
}

impl Inode {
    fn persist_page(&mut self, page: u64, keep_len: bool) {
        let start = (page * PAGE_BYTES) as usize;
        let end = (start + PAGE_BYTES as usize).min(self.volatile.len());
        if keep_len && self.durable.len() < self.volatile.len() {
            self.durable.resize(self.volatile.len(), 0);
        }
        if start < end && end <= self.durable.len() {
            self.durable[start..end].copy_from_slice(&self.volatile[start..end]);
        }
    }

    fn persist_bytes(&mut self, offset: u64, len: usize) {
        let start = offset as usize;
        let end = (start + len).min(self.volatile.len()).min(self.durable.len());
        if start < end {
            self.durable[start..end].copy_from_slice(&self.volatile[start..end]);
        }
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let missing: Vec<PathBuf> = dir.ancestors().filter(|a| !s.dirs.contains(*a)).map(Path::to_path_buf).collect();
        if missing.is_empty() {
            return s.alive();
        }
        s.tick()?;
        // Parents first, as mkdir -p does; each creation is durable only once its parent is
        // synced, like a file's.
        for d in missing.into_iter().rev() {
            if s.names.contains_key(&d) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is a file", d.display())));
            }
            s.dirs.insert(d.clone());
            if is_root(&d) {
                s.durable_dirs.insert(d);
            } else {
                s.record(&d, NameOp::MakeDir(d.clone()));
            }
        }
        Ok(())
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let mut s = self.lock();
        s.tick()?;
        s.check_dir(path)?;
        if s.names.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        let ino = s.next_inode;
        s.next_inode += 1;
        s.inodes.insert(ino, Inode::default());
        s.names.insert(path.to_path_buf(), ino);
        s.record(path, NameOp::Link(path.to_path_buf(), ino));
        let generation = s.generation;
        drop(s);
        Ok(self.handle(ino, generation, path))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let s = self.lock();
        s.alive()?;
        let ino = *s.names.get(path).ok_or_else(|| not_found(path))?;
        let generation = s.generation;
        drop(s);
        Ok(self.handle(ino, generation, path))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        s.names.remove(path).ok_or_else(|| not_found(path))?;
        s.record(path, NameOp::Unlink(path.to_path_buf()));
        // The inode stays while durable names or open handles may use it; crash() collects it.
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        if from.parent() != to.parent() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "SimDisk renames only within a directory"));
        }
        let ino = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_path_buf(), ino);
        // One journal transaction: both halves are in the same directory's pending list, in order,
        // and a crash keeps a prefix, so `to` may appear before `from` vanishes, as with a
        // hard-link-then-unlink; the log tolerates both names.
        s.record(to, NameOp::Link(to.to_path_buf(), ino));
        s.record(from, NameOp::Unlink(from.to_path_buf()));
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        s.alive()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    /// Every file's data and length, as a flush of each would (directory operations stay
    /// pending: the contract leaves them to `sync_dir`, so the simulation still catches a
    /// missing one).
    fn sync_filesystem(&self, _dir: &Path) -> io::Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.tick()?;
        s.flushes += 1;
        if s.lying_flush {
            return Ok(());
        }
        for inode in s.inodes.values_mut() {
            let len = inode.volatile.len() as u64;
            flush_inode(inode, 0, len);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.tick()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        if let Some(ops) = s.pending.remove(dir) {
            for op in ops {
                apply(&mut s.durable_names, &mut s.durable_dirs, op);
            }
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let s = self.lock();
        s.alive()?;
        Ok(s.names.contains_key(path) || s.dirs.contains(path))
    }
}

/// A handle to a simulated file; dead after the disk crashes.
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
    generation: u64,
    path: PathBuf,
}

impl SimFile {
    fn with<T>(&self, mutating: bool, f: impl FnOnce(&mut Inode, &mut u64) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.disk.lock();
        if mutating {
            s.tick()?
        } else {
            s.alive()?
        }
        if s.generation != self.generation {
            return Err(io::Error::other(format!("{}: handle from before a crash", self.path.display())));
        }
        let s = &mut *s;
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(|| not_found(&self.path))?;
        f(inode, &mut s.flushes)
    }
}

/// Makes `[offset, offset + len)` of a file durable, and its length (fdatasync semantics).
fn flush_inode(i: &mut Inode, offset: u64, len: u64) {
    i.durable.resize(i.volatile.len(), 0);
    let end = offset.saturating_add(len).min(i.volatile.len() as u64);
    if end > offset {
        let pages: Vec<u64> = i.dirty_pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES).copied().collect();
        for page in pages {
            let start = (page * PAGE_BYTES) as usize;
            let stop = (start + PAGE_BYTES as usize).min(i.volatile.len());
            i.durable[start..stop].copy_from_slice(&i.volatile[start..stop]);
            i.dirty_pages.remove(&page);
        }
    }
    // Pages past the new end are gone for good.
    let pages_in_file = (i.volatile.len() as u64).div_ceil(PAGE_BYTES);
    i.dirty_pages.retain(|&p| p < pages_in_file);
    if let Some((w, l)) = i.last_write
        && w >= offset
        && w + l as u64 <= end
    {
        i.last_write = None;
    }
}

fn mark_dirty(inode: &mut Inode, start: u64, end: u64) {
    if end > start {
        for page in start / PAGE_BYTES..=(end - 1) / PAGE_BYTES {
            inode.dirty_pages.insert(page);
        }
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> u64 {
        self.with(false, |i, _| Ok(i.volatile.len() as u64)).unwrap_or(0)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.with(true, |i, _| {
            let old = i.volatile.len();
            i.volatile.resize(len, 0);
            mark_dirty(i, old.min(len) as u64, old.max(len) as u64);
            i.last_write = None;
            Ok(())
        })
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        if len > self.len() { self.set_len(len) } else { Ok(()) }
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.with(false, |i, _| {
            let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
            let end = start.checked_add(len).filter(|&e| e <= i.volatile.len());
            let Some(end) = end else {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
            };
            Ok(Bytes::copy_from_slice(&i.volatile[start..end]))
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(true, |i, _| {
            let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
            let end = start.checked_add(data.len()).filter(|&e| e <= i.volatile.len());
            let Some(end) = end else {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "write past the end"));
            };
            i.volatile[start..end].copy_from_slice(data);
            mark_dirty(i, start as u64, end as u64);
            i.last_write = Some((offset, data.len()));
            Ok(())
        })
    }

    fn flush(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.disk.lock().lying_flush {
            return self.with(true, |_, flushes| {
                *flushes += 1;
                Ok(())
            });
        }
        self.with(true, |i, flushes| {
            *flushes += 1;
            flush_inode(i, offset, len);
            Ok(())
        })
    }
}
