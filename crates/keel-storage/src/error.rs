//! Errors of the storage layer: retriable I/O apart from corruption and misuse.

use std::path::PathBuf;

/// What went wrong in the segment log.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O operation failed. After a failed flush the log must not be trusted (the kernel may
    /// have dropped the dirty pages), so the log marks itself failed and refuses further writes.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Bytes inside the durable part of the log are invalid; the partition must be repaired from a
    /// peer. Nothing after `position` in `segment` is served.
    #[error("corrupt log: {segment} at byte {position}: {reason}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the first invalid batch in that file.
        position: u64,
        /// What was wrong.
        reason: String,
    },
    /// The caller asked for something the log cannot do; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The requested offset or index is outside the log (below its start or past its end).
    #[error("out of range: {what} {requested} is outside [{start}, {end})")]
    OutOfRange {
        /// "offset" or "index".
        what: &'static str,
        /// What was asked for.
        requested: u64,
        /// First available.
        start: u64,
        /// One past the last available.
        end: u64,
    },
    /// An earlier I/O failure left the log in an unknown state; reopen it to recover.
    #[error("log failed earlier and must be reopened: {0}")]
    Failed(String),
}

impl StorageError {
    /// True for errors after which retrying the same call may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StorageError::OutOfRange { .. })
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Adds the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| StorageError::Io { op, path: path.to_path_buf(), source })
    }
}
