//! Keel's durable segment log: record batches on disk, dense offsets, crash recovery.
//!
//! All file I/O goes through the [`Disk`] trait: [`FileDisk`] (mmap + msync) in production,
//! [`SimDisk`] (in memory, seeded faults) in tests and the simulation. The [`SegmentLog`] tracks
//! what it has written apart from what is durable, and only the durable end may be acknowledged.

mod disk;
mod error;
mod file_disk;
pub mod index;
mod log;
pub mod segment;
mod sim_disk;
pub mod testing;

pub use disk::{Disk, DiskFile, SECTOR_BYTES, create_dir_durable, parent, read_whole, write_atomic};
pub use error::{Result, StorageError};
pub use file_disk::FileDisk;
pub use log::{Appended, FlushTicket, LogConfig, LogPosition, PREALLOCATE_FIRST_BYTES, SEGMENT_BYTES_MIN, SegmentLog};
pub use sim_disk::{CrashMode, PAGE_BYTES, SimDisk};

#[cfg(test)]
mod fuzz_decoders;
