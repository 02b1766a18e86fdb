//! One conformance suite for the `Disk` contract, run against FileDisk and SimDisk alike.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_storage::{Disk, FileDisk, SimDisk, read_whole, write_atomic};

/// Runs every contract check against `disk`, rooted at `root`.
fn suite(disk: Arc<dyn Disk>, root: &Path) {
    let dir = root.join("d");
    disk.create_dir_all(&dir).unwrap();
    disk.sync_dir(root).unwrap();
    create_is_exclusive(&*disk, &dir);
    write_read_flush(&*disk, &dir);
    reads_past_end_fail(&*disk, &dir);
    set_len_and_preallocate(&*disk, &dir);
    rename_remove_list(&*disk, &dir);
    atomic_replace(&*disk, &dir);
    open_handles_survive_remove(&*disk, &dir);
}

fn create_is_exclusive(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("excl");
    let _f = disk.create(&p).unwrap();
    assert_eq!(disk.create(&p).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    assert!(disk.exists(&p).unwrap());
    assert_eq!(disk.open(&dir.join("missing")).unwrap_err().kind(), std::io::ErrorKind::NotFound);
}

fn write_read_flush(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("rw");
    let f = disk.create(&p).unwrap();
    assert_eq!(f.len(), 0);
    f.set_len(10_000).unwrap();
    f.write(4090, b"straddles a page").unwrap();
    assert_eq!(&f.read(4090, 16).unwrap()[..], b"straddles a page", "a write is visible at once");
    assert_eq!(&f.read(0, 4).unwrap()[..], &[0, 0, 0, 0], "new bytes read as zeros");
    f.flush(4090, 16).unwrap();
    f.flush(0, 0).unwrap();
    f.flush(9_000, 5_000).unwrap();
    drop(f);
    let f = disk.open(&p).unwrap();
    assert_eq!(f.len(), 10_000);
    assert_eq!(&f.read(4090, 16).unwrap()[..], b"straddles a page", "data survives reopening");
}

fn reads_past_end_fail(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("short");
    let f = disk.create(&p).unwrap();
    f.set_len(100).unwrap();
    assert!(f.read(90, 11).is_err());
    assert!(f.read(u64::MAX - 2, 5).is_err());
    assert!(f.write(95, b"123456").is_err());
    assert_eq!(f.read(100, 0).unwrap().len(), 0);
    assert_eq!(f.read(90, 10).unwrap().len(), 10);
}

fn set_len_and_preallocate(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("len");
    let f = disk.create(&p).unwrap();
    f.preallocate(1 << 20).unwrap();
    assert_eq!(f.len(), 1 << 20);
    f.write((1 << 20) - 4, b"tail").unwrap();
    f.preallocate(1000).unwrap();
    assert_eq!(f.len(), 1 << 20, "preallocate never shrinks");
    f.set_len(5000).unwrap();
    assert_eq!(f.len(), 5000);
    f.set_len(8192).unwrap();
    assert_eq!(&f.read(5000, 8).unwrap()[..], &[0; 8], "growing again reads zeros, not old bytes");
    f.flush(0, 8192).unwrap();
}

fn rename_remove_list(disk: &dyn Disk, dir: &Path) {
    let sub = dir.join("ls");
    disk.create_dir_all(&sub).unwrap();
    for name in ["b", "a", "c"] {
        let f = disk.create(&sub.join(name)).unwrap();
        f.set_len(1).unwrap();
        f.write(0, name.as_bytes()).unwrap();
        f.flush(0, 1).unwrap();
    }
    assert_eq!(disk.list(&sub).unwrap(), vec!["a", "b", "c"], "sorted names");
    disk.rename(&sub.join("a"), &sub.join("c")).unwrap();
    assert_eq!(disk.list(&sub).unwrap(), vec!["b", "c"]);
    assert_eq!(&read_whole(disk, &sub.join("c")).unwrap()[..], b"a", "rename replaces the target");
    disk.remove(&sub.join("b")).unwrap();
    assert_eq!(disk.list(&sub).unwrap(), vec!["c"]);
    assert!(disk.remove(&sub.join("b")).is_err());
    disk.sync_dir(&sub).unwrap();
}

fn atomic_replace(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("meta");
    write_atomic(disk, &p, b"first").unwrap();
    write_atomic(disk, &p, b"second, longer").unwrap();
    assert_eq!(&read_whole(disk, &p).unwrap()[..], b"second, longer");
    write_atomic(disk, &p, b"").unwrap();
    assert_eq!(read_whole(disk, &p).unwrap().len(), 0);
    assert!(!disk.list(dir).unwrap().iter().any(|n| n.ends_with(".tmp")), "no temp file left behind");
}

fn open_handles_survive_remove(disk: &dyn Disk, dir: &Path) {
    let p = dir.join("unlinked");
    let f = disk.create(&p).unwrap();
    f.set_len(8).unwrap();
    f.write(0, b"still he").unwrap();
    let before = f.read(0, 8).unwrap();
    disk.remove(&p).unwrap();
    assert_eq!(f.read(0, 8).unwrap(), before, "POSIX: an open file outlives its name");
}

#[test]
fn file_disk_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    suite(Arc::new(FileDisk::new()), tmp.path());
}

#[test]
fn sim_disk_conforms() {
    let disk = SimDisk::new(1);
    let root = PathBuf::from("/root");
    disk.create_dir_all(&root).unwrap();
    suite(Arc::new(disk), &root);
}

/// The SimDisk-only half of the contract: what a crash keeps.
#[test]
fn sim_disk_crash_keeps_only_what_was_made_durable() {
    use keel_storage::CrashMode;
    let disk = SimDisk::new(7);
    let dir = PathBuf::from("/c");
    disk.create_dir_all(&dir).unwrap();
    disk.sync_dir(Path::new("/")).unwrap();
    let synced = disk.create(&dir.join("synced")).unwrap();
    synced.set_len(3 * 4096).unwrap();
    synced.write(0, b"flushed").unwrap();
    synced.flush(0, 7).unwrap();
    disk.sync_dir(&dir).unwrap();
    synced.write(4096, b"not flushed").unwrap();
    let _unsynced = disk.create(&dir.join("unsynced-name")).unwrap();

    disk.crash_with(CrashMode::DropUnflushed);
    assert!(synced.read(0, 1).is_err(), "handles die with the process");
    let f = disk.open(&dir.join("synced")).unwrap();
    assert_eq!(&f.read(0, 7).unwrap()[..], b"flushed");
    assert_eq!(&f.read(4096, 11).unwrap()[..], &[0u8; 11], "the unflushed write is gone");
    // The unsynced creation is kept or not, as a prefix of the directory's journal; here the only
    // pending op decides alone, so either answer is legal. What must hold: no error either way.
    let _ = disk.exists(&dir.join("unsynced-name")).unwrap();

    // RandomPages: each dirty page is all-or-nothing.
    f.write(0, &[1u8; 4096]).unwrap();
    f.write(4096, &[2u8; 4096]).unwrap();
    f.write(8192, &[3u8; 4096]).unwrap();
    disk.crash_with(CrashMode::RandomPages);
    let f = disk.open(&dir.join("synced")).unwrap();
    let page0 = f.read(0, 4096).unwrap();
    assert!(page0.iter().all(|&b| b == 1) || &page0[..7] == b"flushed");
    for (i, v) in [(1u64, 2u8), (2, 3)] {
        let page = f.read(i * 4096, 4096).unwrap();
        assert!(page.iter().all(|&b| b == v) || page.iter().all(|&b| b == 0), "page {i} is whole or absent");
    }

    // TornLastWrite: a prefix of the last write survives, ending on a sector boundary.
    let f = disk.open(&dir.join("synced")).unwrap();
    f.flush(0, 3 * 4096).unwrap();
    f.write(100, &[9u8; 1000]).unwrap();
    disk.crash_with(CrashMode::TornLastWrite);
    let f = disk.open(&dir.join("synced")).unwrap();
    let got = f.read(100, 1000).unwrap();
    let kept = got.iter().take_while(|&&b| b == 9).count();
    assert!(got[kept..].iter().all(|&b| b != 9), "only a prefix of a torn write survives");
    assert!(kept == 0 || kept == 1000 || (100 + kept) % 512 == 0, "tears fall between sectors: kept {kept}");
}

/// Same seed, same crash decisions.
#[test]
fn sim_disk_is_deterministic() {
    let run = |seed| {
        let disk = SimDisk::new(seed);
        let dir = PathBuf::from("/s");
        disk.create_dir_all(&dir).unwrap();
        disk.sync_dir(Path::new("/")).unwrap();
        let f = disk.create(&dir.join("f")).unwrap();
        disk.sync_dir(&dir).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.flush(0, 0).unwrap();
        for p in 0..64u64 {
            f.write(p * 4096, &[p as u8 + 1; 4096]).unwrap();
        }
        disk.crash_with(keel_storage::CrashMode::RandomPages);
        disk.durable_bytes(&dir.join("f"))
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4), "different seeds make different choices");
}

/// A directory's creation is a namespace change of its parent: a crash before the parent is
/// synced may drop the directory, and with it everything below it, however durable that was.
#[test]
fn sim_disk_crash_drops_unsynced_directories_with_their_contents() {
    use keel_storage::CrashMode;
    let write_durably = |disk: &SimDisk, dir: &Path| {
        let f = disk.create(&dir.join("data")).unwrap();
        f.set_len(4096).unwrap();
        f.write(0, b"acknowledged").unwrap();
        f.flush(0, 4096).unwrap();
        disk.sync_dir(dir).unwrap();
    };
    // A crash keeps a prefix of `/`'s journal and of `/a`'s; `/a/b` survives only if both of its
    // creations did, so over a few seeds some crash drops it. Synced all the way up, none does.
    let mut dropped = 0;
    for seed in 0..32 {
        let disk = SimDisk::new(seed);
        let dir = PathBuf::from("/a/b");
        disk.create_dir_all(&dir).unwrap();
        write_durably(&disk, &dir);
        disk.crash_with(CrashMode::DropUnflushed);
        if !disk.exists(&dir).unwrap() {
            dropped += 1;
            assert!(!disk.exists(&dir.join("data")).unwrap(), "seed {seed}: a file outlived its directory");
            assert!(disk.list(&dir).is_err(), "seed {seed}: listing a vanished directory fails");
            assert!(disk.create(&dir.join("x")).is_err(), "seed {seed}: nothing can be created in it");
        }
    }
    assert!(dropped > 0, "some crash must drop an unsynced directory");

    let disk = SimDisk::new(1);
    let dir = PathBuf::from("/a/b");
    disk.create_dir_all(&dir).unwrap();
    disk.sync_dir(Path::new("/")).unwrap();
    disk.sync_dir(Path::new("/a")).unwrap();
    write_durably(&disk, &dir);
    for _ in 0..8 {
        disk.crash();
        let f = disk.open(&dir.join("data")).unwrap();
        assert_eq!(&f.read(0, 12).unwrap()[..], b"acknowledged", "synced all the way up, it survives");
    }
}

/// A node-wide flush: every file's writes and length are durable after `sync_filesystem`, as
/// after a flush of each; directory operations are not (they still need `sync_dir`).
#[test]
fn sim_disk_sync_filesystem_flushes_every_file_but_not_directories() {
    use keel_storage::CrashMode;
    let disk = SimDisk::new(11);
    let dir = PathBuf::from("/n");
    disk.create_dir_all(&dir).unwrap();
    disk.sync_dir(Path::new("/")).unwrap();
    let (a, b) = (disk.create(&dir.join("a")).unwrap(), disk.create(&dir.join("b")).unwrap());
    disk.sync_dir(&dir).unwrap();
    a.set_len(8192).unwrap();
    b.set_len(4096).unwrap();
    a.write(4096, b"partition a").unwrap();
    b.write(0, b"partition b").unwrap();
    disk.sync_filesystem(&dir).unwrap();
    let _late = disk.create(&dir.join("created after")).unwrap();
    a.write(0, b"after the sync").unwrap();
    disk.crash_with(CrashMode::DropUnflushed);
    let (a, b) = (disk.open(&dir.join("a")).unwrap(), disk.open(&dir.join("b")).unwrap());
    assert_eq!(&a.read(4096, 11).unwrap()[..], b"partition a");
    assert_eq!(&b.read(0, 11).unwrap()[..], b"partition b");
    assert_eq!(&a.read(0, 14).unwrap()[..], &[0u8; 14], "a write after the sync is not durable");
}

/// The real one runs (this machine's kernel reports write-back errors from syncfs) or says it
/// cannot, never silently skips.
#[test]
fn file_disk_sync_filesystem_runs_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = FileDisk::new();
    let f = disk.create(&tmp.path().join("f")).unwrap();
    f.set_len(4096).unwrap();
    f.write(0, b"x").unwrap();
    match disk.sync_filesystem(tmp.path()) {
        Ok(()) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}"),
    }
}
