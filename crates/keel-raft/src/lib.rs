//! Keel's replication: one openraft group per partition, whose raft log IS the partition's
//! segment log, and multi-raft over one gRPC service per node.
//!
//! - [`store`]: openraft's log storage and state machine over `keel-storage` (group commit: one
//!   flush covers many entries; callbacks only after the flush);
//! - [`state_machine`]: the pure partition state (high watermark, producers, snapshots);
//! - [`producers`]: idempotent producers' deduplication table (pure, rebuilt from the log);
//! - [`network`]: the raft RPC client (deadlines, reconnects, per-peer backoff, real pre-vote)
//!   and server (routing by group id);
//! - [`node`]: a node hosting many groups and the `append` API the broker uses;
//! - [`leadership`]: how a node presents a group's leader, and the step-down of a leader that no
//!   quorum acknowledges any more;
//! - [`quiesce`]: idle groups stop their timers; node heartbeats keep their liveness;
//! - [`convert`]: every conversion between protobuf, openraft and the batch encoding.

pub mod convert;
pub mod leadership;
pub mod network;
pub mod node;
pub mod producers;
pub mod quiesce;
pub mod sequencer;
pub mod state_machine;
pub mod store;
pub mod throttle;
pub mod types;

pub use leadership::NOBODY;
pub use network::{Connector, NetworkConfig, RaftService, TcpConnector, VerifiedNode};
pub use node::{AppendError, FlushScope, NodeConfig, NodeError, PendingAppend, RaftNode, RaftTimings};
pub use quiesce::QuiesceFaults;
pub use sequencer::ProducerRefusal;
pub use store::{Faults, FlushObserver, IoMode, NodeFlusher, PartitionStore};
pub use types::{Appended, GroupId, KeelRaft, Node, NodeId};

#[cfg(test)]
mod fuzz_decoders;
