//! The openraft type configuration, kept behind Keel's own names: openraft's API churns between
//! alphas, and only this crate should have to follow it.

use std::fmt;

use bytes::Bytes;

/// The async runtime: tokio, with openraft's randomness (election timeouts) drawn from a seed
/// carried in task-local scope, so that a simulation run is a function of its seed.
pub type Runtime = openraft_rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>;

openraft::declare_raft_types!(
    /// Keel's raft types: entries carry record batches; standard raft terms (a leader id is a term).
    pub KeelRaft:
        D = BatchData,
        R = Appended,
        NodeId = u64,
        Node = Node,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
        AsyncRuntime = Runtime,
);

/// How a leader confirms its leadership before a linearizable read.
pub use openraft::ReadPolicy;

/// A group's raft metrics (leader, replication progress, applied index).
pub type Metrics = openraft::RaftMetrics<KeelRaft>;

/// A node's id in the cluster.
pub type NodeId = u64;
/// A raft group's id: one per partition (and later one for the metadata controller).
pub type GroupId = u64;
/// A raft log id (term, index).
pub type LogId = openraft::type_config::alias::LogIdOf<KeelRaft>;
/// A vote (term, voted-for node, committed).
pub type Vote = openraft::type_config::alias::VoteOf<KeelRaft>;
/// A raft log entry.
pub type Entry = openraft::type_config::alias::EntryOf<KeelRaft>;
/// Membership of a group.
pub type Membership = openraft::Membership<NodeId, Node>;
/// A change to a group's membership (learners in, voters replaced, nodes out).
pub type ChangeMembers = openraft::ChangeMembers<NodeId, Node>;
/// Membership with the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<KeelRaft>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<KeelRaft>;
/// A replica as a group's membership names it: where its node listens, and which copy of the
/// group on that node it is. A node that hosts a group again (a move back, or a new disk after
/// the old one was lost) hosts a new generation: raft RPCs carry the generation they are meant
/// for, and a replica answers only its own, so a blank copy is never taken for the old one (whose
/// vote and log it does not have).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The node's peer address (`host:port`).
    pub addr: String,
    /// The generation of the group's copy on that node (0: the group's first copy there).
    pub generation: u32,
}

impl Node {
    /// The first copy (generation 0) on the node at `addr`.
    pub fn new(addr: impl Into<String>) -> Node {
        Node { addr: addr.into(), generation: 0 }
    }

    /// Copy `generation` on the node at `addr`.
    pub fn at(addr: impl Into<String>, generation: u32) -> Node {
        Node { addr: addr.into(), generation }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.addr, self.generation)
    }
}
/// The raft handle of one group.
pub type Raft = openraft::Raft<KeelRaft, crate::store::StateMachine>;
/// The committed part of a leader id: the term.
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<KeelRaft>;

/// The application data of a raft entry: one encoded record batch (the bytes that go on disk).
#[derive(Clone, PartialEq, Eq)]
pub struct BatchData(pub Bytes);

impl fmt::Debug for BatchData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BatchData({} bytes)", self.0.len())
    }
}

impl fmt::Display for BatchData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} bytes", self.0.len())
    }
}

/// Where a committed batch landed: the answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// The offset after its last record (the high watermark once it is committed).
    pub next_offset: u64,
}

/// A log id from a term and an index.
pub fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId { leader_id: CommittedLeaderId::new(term), index }
}
