//! Helpers shared by the storage integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::{Disk, LogConfig, SegmentLog, SimDisk};

#[allow(unused_imports)] // Each test file uses its own subset.
pub use keel_storage::testing::{small_config, test_batch as batch};

/// Opens a log on a SimDisk in `/p`.
pub fn sim_log(disk: &SimDisk, config: LogConfig) -> keel_storage::Result<SegmentLog> {
    SegmentLog::open(Arc::new(disk.clone()) as Arc<dyn Disk>, PathBuf::from("/p"), config)
}

/// Every batch of the log, by raft index, as raw bytes.
pub fn all_batches(log: &SegmentLog) -> Vec<Vec<u8>> {
    let (start, end) = (log.start().index, log.written().index);
    if start == end {
        return Vec::new();
    }
    log.read_entries(start, end, usize::MAX).expect("read everything").into_iter().map(|b| b.bytes().to_vec()).collect()
}
