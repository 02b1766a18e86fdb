//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{Disk, LogConfig, SegmentLog, SimDisk};

/// A batch of `count` records whose values encode `tag` and the record number, so that a read
/// can be checked byte for byte.
pub fn batch(tag: u64, count: u32, value_len: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for i in 0..count {
        let mut value = format!("{tag}:{i}:").into_bytes();
        value.resize(value_len.max(value.len()), b'a' + (tag % 26) as u8);
        let key = tag.to_be_bytes();
        b.push(NewRecord { timestamp_ms: 1_000 + tag as i64, key: Some(&key), value: Some(&value), headers: &[] })
            .expect("test batches fit");
    }
    b.build().to_vec()
}

/// A small-segment config so that tests roll often.
pub fn small_config() -> LogConfig {
    LogConfig { segment_bytes_max: keel_storage::SEGMENT_BYTES_MIN, index_interval_bytes: 512, ..LogConfig::default() }
}

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
