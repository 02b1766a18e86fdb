//! The `Disk` trait: the only door from Keel to files, so that the simulation can replace it.
//!
//! Contract (checked by the conformance suite in `tests/storage/disk_conformance.rs` against both
//! implementations):
//! - `write` changes what `read` returns at once, but nothing is durable until `flush` of a range
//!   covering it returns `Ok`; a crash may drop any write that was not flushed, keep any subset of
//!   its 4 KiB pages, or keep part of the last write.
//! - `flush` also makes the file's length durable (fdatasync semantics).
//! - `create`, `rename` and `remove` are durable only after `sync_dir` of the parent directory.
//! - Reads past the end of a file are errors, never zeros.
//! - A write tears only between 512-byte sectors ([`SECTOR_BYTES`]), as drives guarantee.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

/// The unit a drive writes atomically: a crash tears a write between sectors, never inside one.
pub const SECTOR_BYTES: u64 = 512;

/// A file system: real ([`crate::FileDisk`]) or simulated ([`crate::SimDisk`]).
pub trait Disk: Send + Sync + fmt::Debug + 'static {
    /// Creates a directory and its parents (durable after `sync_dir` of each parent; see
    /// [`create_dir_durable`]).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Removes a file. Open handles stay usable, as on POSIX.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Names of the regular files in `dir`, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes creations (of files and directories), renames and removals in `dir` durable. The
    /// empty path is the current directory.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// True when `path` exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Makes the written data and length of every file on the file system holding `dir`
    /// durable, in one call (syncfs): a node flushing many partitions pays one journal commit
    /// and one cache flush instead of one per file. Directory operations still need `sync_dir`.
    /// `Unsupported` where the result could not be trusted (kernels before 5.8 do not report
    /// write-back errors from syncfs): flush each file instead.
    fn sync_filesystem(&self, dir: &Path) -> io::Result<()>;
}

/// An open file.
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> u64;
    /// True when the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sets the length: shrinking drops the tail, growing adds zeros (possibly sparse).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Grows the file to at least `len` bytes with blocks allocated up front (fallocate), so
    /// that later writes and flushes do not allocate.
    fn preallocate(&self, len: u64) -> io::Result<()>;
    /// Reads `len` bytes at `offset`; zero-copy where the implementation can.
    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Writes `data` at `offset`; the range must lie inside the file's length.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` and the file length durable; returns only when they are.
    fn flush(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Replaces `path` with `data` so that a crash leaves either the old or the new content, whole:
/// write a temp file, flush it, rename it over `path`, sync the directory.
pub fn write_atomic(disk: &dyn Disk, path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = parent(path)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    if disk.exists(tmp)? {
        disk.remove(tmp)?;
    }
    let file = disk.create(tmp)?;
    file.set_len(data.len() as u64)?;
    if !data.is_empty() {
        file.write(0, data)?;
    }
    file.flush(0, data.len() as u64)?;
    drop(file);
    disk.rename(tmp, path)?;
    disk.sync_dir(dir)
}

/// Creates `dir` and any missing parents, and makes each creation durable by syncing the
/// directory that holds it: until then a power loss may drop the new directory and everything
/// later flushed inside it. The parent of `dir` is synced even when `dir` already existed, because
/// a process that crashed right after creating it never did.
pub fn create_dir_durable(disk: &dyn Disk, dir: &Path) -> io::Result<()> {
    let mut holders = Vec::new();
    for ancestor in dir.ancestors() {
        let Some(holder) = ancestor.parent() else { break };
        if ancestor != dir && disk.exists(ancestor)? {
            break;
        }
        holders.push(holder);
    }
    disk.create_dir_all(dir)?;
    // Deepest first, so that when the sync of the top-most new directory returns, every level
    // below it is already durable.
    for holder in holders {
        disk.sync_dir(holder)?;
    }
    Ok(())
}

/// Reads a whole file.
pub fn read_whole(disk: &dyn Disk, path: &Path) -> io::Result<Bytes> {
    let file = disk.open(path)?;
    let len = usize::try_from(file.len()).map_err(|_| io::Error::other("file too large"))?;
    if len == 0 { Ok(Bytes::new()) } else { file.read(0, len) }
}

/// The directory holding `path`.
pub fn parent(path: &Path) -> io::Result<&Path> {
    path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent directory"))
}
