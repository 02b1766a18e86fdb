//! `FileDisk`: the production disk. Appends are written to the file, reads are served from a
//! memmap2 map of it, and `flush` is msync of the range, so a batch is durable when it returns.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

use crate::disk::{Disk, DiskFile};

/// The real file system: appends are written to the file (pwrite), reads are served from a
/// memory map (memmap2) of it, and `flush` is msync of the range.
///
/// Why not copy appends into the map: every msync write-protects the pages it cleans, which on
/// a multi-threaded process means a TLB shootdown (an interrupt to every core running it), and
/// the next append into the same page takes a write fault; fresh pages first fault in from the
/// page cache. Profiled under 100 partitions of small batches (`keel bench produce
/// --partitions 100`), that was 40% of the nodes' worker CPU (page faults 20%, msync's
/// shootdowns most of another 20%) plus a pre-faulting thread. A page written by pwrite is
/// never mapped writable, so cleaning it costs no shootdown, and nothing faults. The page cache
/// is the same either way: the map sees every write at once, and msync flushes the range's
/// dirty pages however they were dirtied.
#[derive(Debug, Clone, Default)]
pub struct FileDisk;

impl FileDisk {
    /// The real disk.
    pub fn new() -> FileDisk {
        FileDisk
    }
}

impl Disk for FileDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        Ok(Arc::new(MappedFile::new(file, path.to_path_buf())?))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(MappedFile::new(file, path.to_path_buf())?))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // `Path::parent` of a relative one-component path is the empty path: the current dir.
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn sync_filesystem(&self, dir: &Path) -> io::Result<()> {
        if !syncfs_reports_errors() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "syncfs does not report write-back errors before Linux 5.8",
            ));
        }
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let handle = File::open(dir)?;
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs(2) on a descriptor this function owns; no memory is passed.
        if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether this kernel's syncfs(2) returns write-back errors (Linux 5.8 and later): before, it
/// returned success after a failed write-back, which would acknowledge lost data.
fn syncfs_reports_errors() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        // SAFETY: uname(2) fills the zeroed struct it is given; nothing else is touched.
        let mut name: libc::utsname = unsafe { std::mem::zeroed() };
        if unsafe { libc::uname(&mut name) } != 0 {
            return false;
        }
        // SAFETY: uname NUL-terminates `release` within the array.
        let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }.to_string_lossy().into_owned();
        kernel_at_least(&release, (5, 8))
    })
}

/// Whether a kernel release string (`6.18.44-fc-v1272`) is at least `min` (major, minor).
fn kernel_at_least(release: &str, min: (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((major, minor), (Some(a), Some(b)) if (a, b) >= min)
}

#[cfg(test)]
mod tests {
    use super::kernel_at_least;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1272", (5, 8)));
        assert!(kernel_at_least("5.8.0", (5, 8)));
        assert!(kernel_at_least("5.10.0-28-amd64", (5, 8)));
        assert!(!kernel_at_least("5.4.0-150-generic", (5, 8)));
        assert!(!kernel_at_least("4.19.0", (5, 8)));
        assert!(!kernel_at_least("garbage", (5, 8)));
    }
}

/// A file and its current mapping. Growing the file replaces the mapping; readers keep the old
/// one alive through their `Bytes`, and the pages they see stay valid because the log never
/// shrinks a file below bytes it has handed out.
#[derive(Debug)]
struct MappedFile {
    file: File,
    path: PathBuf,
    map: RwLock<Option<Arc<MmapRaw>>>,
    len: AtomicU64,
    /// The length changed since the last flush: flush must also sync the inode.
    metadata_dirty: AtomicBool,
}

impl MappedFile {
    fn new(file: File, path: PathBuf) -> io::Result<MappedFile> {
        let len = file.metadata()?.len();
        let this = MappedFile {
            file,
            path,
            map: RwLock::new(None),
            len: AtomicU64::new(len),
            metadata_dirty: AtomicBool::new(false),
        };
        this.remap(len)?;
        Ok(this)
    }

    fn remap(&self, len: u64) -> io::Result<Option<Arc<MmapRaw>>> {
        let map = if len == 0 {
            None
        } else {
            let len = usize::try_from(len).map_err(|_| io::Error::other("file larger than the address space"))?;
            Some(Arc::new(MmapOptions::new().len(len).map_raw(&self.file)?))
        };
        *self.map.write().map_err(|_| poisoned(&self.path))? = map.clone();
        self.len.store(len, Ordering::Release);
        Ok(map)
    }

    fn mapping(&self) -> io::Result<Option<Arc<MmapRaw>>> {
        Ok(self.map.read().map_err(|_| poisoned(&self.path))?.clone())
    }

    fn check_range(&self, offset: u64, len: u64, map_len: usize) -> io::Result<usize> {
        let end = offset.checked_add(len).ok_or_else(|| io::Error::other("range overflows"))?;
        if end > map_len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: range {offset}..{end} is past the end ({map_len} bytes)", self.path.display()),
            ));
        }
        Ok(offset as usize)
    }
}

fn poisoned(path: &Path) -> io::Error {
    io::Error::other(format!("{}: mapping lock poisoned", path.display()))
}

/// A zero-copy view of part of a mapping; keeps the mapping alive while any `Bytes` uses it.
struct MapSlice {
    map: Arc<MmapRaw>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset + len <= map.len()` was checked when the slice was made, and the
        // mapping lives as long as `self`. The log never writes to a range it has handed to a
        // reader except to truncate an uncommitted suffix, which readers above the commit point
        // re-validate by CRC before use.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.offset), self.len) }
    }
}

impl DiskFile for MappedFile {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.metadata_dirty.store(true, Ordering::Release);
        self.remap(len).map(drop)
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        let old = self.len();
        if len <= old {
            return Ok(());
        }
        let off_t = libc::off_t::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, off_t) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        self.metadata_dirty.store(true, Ordering::Release);
        self.remap(len).map(drop)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(map) = self.mapping()? else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read from an empty file"));
        };
        let start = self.check_range(offset, len as u64, map.len())?;
        Ok(Bytes::from_owner(MapSlice { map, offset: start, len }))
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let len = usize::try_from(self.len()).map_err(|_| io::Error::other("file larger than the address space"))?;
        self.check_range(offset, data.len() as u64, len)?;
        // Into the page cache the map shares, never through the map (see `FileDisk`). The log is
        // the only writer of its files and never writes a range a reader may be looking at
        // (see MapSlice).
        self.file.write_all_at(data, offset)
    }

    fn flush(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(map) = self.mapping()? {
            let end = offset.saturating_add(len).min(map.len() as u64);
            if end > offset {
                map.flush_range(offset as usize, (end - offset) as usize)?;
            }
        }
        // msync covers the data; a length change also needs the inode on disk.
        if self.metadata_dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.file.sync_data()
        {
            self.metadata_dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }
}
