//! Consumer groups as a pure shard of `__consumer_offsets`: members and their epochs, the
//! group epoch, the target assignment and each owned partition's assignment epoch, committed
//! offsets. [`Groups::replay`] rebuilds it from the partition; the operations in [`ops`] read it
//! and return the records to append with the answer to give once they are committed.
//!
//! The protocol follows Kafka's KIP-848: a member heartbeats with its epoch and what it owns;
//! any change of membership, subscription or subscribed partitions bumps the group epoch and
//! computes a new target assignment; each member then reconciles towards it — it first gives up
//! what it must lose (revoking), then moves to the new epoch and receives only partitions that no
//! other member still owns. So no partition is ever owned by two members at once.

pub mod assignor;
pub mod lag;
pub mod ops;
pub mod records;
pub mod retry;

use std::collections::BTreeMap;

pub use lag::{CommitSample, ConsumerStatus, LagLimits, LagWindows, StatusRules, group_status, partition_status};
pub use ops::{CommitInput, HeartbeatInput, HeartbeatOutput, Outcome, TopicsView};
pub use records::{
    Committed, GroupMeta, GroupRecord, Member, Publish, PublishHeader, Publisher, Redelivery, RedeliveryState, Target,
    Tp,
};
pub use retry::{
    DeadLetterRecord, NackInput, NackOutput, ReplayOutput, RetryLimits, RetryPolicy, SettleInput, dead_letter_topic,
};

use crate::{Record, ReplayError, Shard};

/// Bounds of what clients can make a coordinator hold; each is checked before anything is
/// appended, so a flood of joins or commits is refused rather than stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Members in one group.
    pub members_per_group_max: usize,
    /// Groups per `__consumer_offsets` partition (so per coordinator shard).
    pub groups_max: usize,
    /// Bytes of a commit's metadata string.
    pub metadata_bytes_max: usize,
    /// Partitions in one commit request.
    pub offsets_per_commit_max: usize,
    /// Topics one member may subscribe to.
    pub subscribed_topics_max: usize,
    /// Longest member and instance id.
    pub member_id_bytes_max: usize,
    /// The session timeout granted when the member asks for none.
    pub session_timeout_ms_default: u32,
    /// Bounds of the session timeout a member may ask for.
    pub session_timeout_ms_min: u32,
    /// Bounds of the session timeout a member may ask for.
    pub session_timeout_ms_max: u32,
    /// How often members heartbeat (at most a third of their session timeout).
    pub heartbeat_interval_ms: u32,
    /// How long a member may take to revoke partitions when it asks for nothing else.
    pub rebalance_timeout_ms_default: u32,
    /// The longest rebalance timeout a member may ask for.
    pub rebalance_timeout_ms_max: u32,
}

impl Default for GroupLimits {
    fn default() -> GroupLimits {
        GroupLimits {
            members_per_group_max: 1_000,
            groups_max: 10_000,
            metadata_bytes_max: 4_096,
            offsets_per_commit_max: 10_000,
            subscribed_topics_max: 1_000,
            member_id_bytes_max: 64,
            session_timeout_ms_default: 10_000,
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 300_000,
            heartbeat_interval_ms: 1_000,
            rebalance_timeout_ms_default: 60_000,
            rebalance_timeout_ms_max: 600_000,
        }
    }
}

/// Why a group operation was refused; nothing was changed. [`GroupError::reason`] is the
/// `google.rpc.ErrorInfo` reason clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The member is not in the group (removed, timed out, or never joined).
    #[error("member {member:?} is not in group {group:?}; rejoin with member_epoch 0")]
    UnknownMember {
        /// Group.
        group: String,
        /// Member.
        member: String,
    },
    /// The member's epoch is not its current one: it was fenced.
    #[error("member {member:?} sent epoch {sent} but its epoch is {current}; rejoin with member_epoch 0")]
    FencedEpoch {
        /// Member.
        member: String,
        /// What it sent.
        sent: i32,
        /// What it is.
        current: i32,
    },
    /// A commit for a partition the member does not own at that epoch (a zombie commit).
    #[error("member {member:?} at epoch {epoch} does not own {tp}; nothing was committed")]
    StaleEpoch {
        /// Member.
        member: String,
        /// Epoch of the commit.
        epoch: i32,
        /// The partition.
        tp: Tp,
    },
    /// A committed offset beyond the partition's high watermark.
    #[error("offset {offset} of {tp} is above its high watermark {high_watermark}")]
    OffsetAboveHighWatermark {
        /// The partition.
        tp: Tp,
        /// The offset.
        offset: u64,
        /// The partition's high watermark.
        high_watermark: u64,
    },
    /// An offset below the partition's log start (reset only).
    #[error("offset {offset} of {tp} is below its log start {log_start}")]
    OffsetBelowLogStart {
        /// The partition.
        tp: Tp,
        /// The offset.
        offset: u64,
        /// The log start.
        log_start: u64,
    },
    /// No such topic or partition.
    #[error("{0}")]
    UnknownTopic(String),
    /// No such group.
    #[error("group {0:?} does not exist")]
    UnknownGroup(String),
    /// Reset and delete need an empty group.
    #[error("group {group:?} has {members} members; stop them first")]
    GroupNotEmpty {
        /// Group.
        group: String,
        /// How many members it has.
        members: usize,
    },
    /// The group is full.
    #[error("group {group:?} has reached its limit of {max} members")]
    GroupMaxSize {
        /// Group.
        group: String,
        /// The limit.
        max: usize,
    },
    /// The coordinator holds as many groups as it may.
    #[error("this coordinator holds its limit of {0} groups")]
    GroupsMax(usize),
    /// A commit's metadata is too long.
    #[error("commit metadata of {size} bytes exceeds the limit of {max}")]
    MetadataTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A member asked for another assignor than the group uses.
    #[error("group {group:?} uses assignor {group_assignor:?}, not {asked:?}")]
    InconsistentAssignor {
        /// Group.
        group: String,
        /// The group's.
        group_assignor: String,
        /// The member's.
        asked: String,
    },
    /// A nack or ack names another attempt than the one the coordinator expects: a late
    /// message from an earlier attempt, or from a member that missed a redelivery's outcome.
    #[error("{tp} offset {offset}: attempt {sent} is not the current one ({expected}); nothing was recorded")]
    StaleAttempt {
        /// The partition.
        tp: Tp,
        /// The record.
        offset: u64,
        /// The attempt the request named.
        sent: u32,
        /// The attempt the coordinator expects next.
        expected: u32,
    },
    /// The record was already acknowledged on a redelivery or dead-lettered.
    #[error("{tp} offset {offset} is already {state}; nothing was recorded")]
    RecordSettled {
        /// The partition.
        tp: Tp,
        /// The record.
        offset: u64,
        /// "resolved", "dead-lettered" or "committed".
        state: &'static str,
    },
    /// The group holds as many pending redeliveries (or unconfirmed publishes) as it may: the
    /// consumer should pause the partition rather than fail more records.
    #[error("group {group:?} holds its limit of {max} {what}; pause and retry")]
    RetryBacklogFull {
        /// Group.
        group: String,
        /// Pending redeliveries or unconfirmed dead letters.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// Dead letters or replays are decided but not yet published: deleting the group would
    /// lose them.
    #[error("group {group:?} has {pending} records decided but not yet published; retry shortly")]
    PublishesPending {
        /// Group.
        group: String,
        /// How many.
        pending: usize,
    },
    /// The operation must publish and the coordinator has no producer id at hand: the runtime
    /// allocates one and runs it again (clients never see this).
    #[error("the coordinator needs a producer id to publish; retry")]
    ProducerIdNeeded,
}

impl GroupError {
    /// Every reason [`GroupError::reason`] can return (clients recognise group refusals by them).
    pub const REASONS: &'static [&'static str] = &[
        "INVALID_REQUEST",
        "UNKNOWN_MEMBER_ID",
        "FENCED_MEMBER_EPOCH",
        "STALE_MEMBER_EPOCH",
        "OFFSET_ABOVE_HIGH_WATERMARK",
        "OFFSET_BELOW_LOG_START",
        "UNKNOWN_TOPIC_OR_PARTITION",
        "GROUP_ID_NOT_FOUND",
        "GROUP_NOT_EMPTY",
        "GROUP_MAX_SIZE_REACHED",
        "GROUPS_MAX_REACHED",
        "METADATA_TOO_LARGE",
        "INCONSISTENT_ASSIGNOR",
        "STALE_ATTEMPT",
        "RECORD_SETTLED",
        "RETRY_BACKLOG_FULL",
        "PUBLISHES_PENDING",
        "PRODUCER_ID_NEEDED",
    ];

    /// The `google.rpc.ErrorInfo` reason of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            GroupError::Invalid(_) => "INVALID_REQUEST",
            GroupError::UnknownMember { .. } => "UNKNOWN_MEMBER_ID",
            GroupError::FencedEpoch { .. } => "FENCED_MEMBER_EPOCH",
            GroupError::StaleEpoch { .. } => "STALE_MEMBER_EPOCH",
            GroupError::OffsetAboveHighWatermark { .. } => "OFFSET_ABOVE_HIGH_WATERMARK",
            GroupError::OffsetBelowLogStart { .. } => "OFFSET_BELOW_LOG_START",
            GroupError::UnknownTopic(_) => "UNKNOWN_TOPIC_OR_PARTITION",
            GroupError::UnknownGroup(_) => "GROUP_ID_NOT_FOUND",
            GroupError::GroupNotEmpty { .. } => "GROUP_NOT_EMPTY",
            GroupError::GroupMaxSize { .. } => "GROUP_MAX_SIZE_REACHED",
            GroupError::GroupsMax(_) => "GROUPS_MAX_REACHED",
            GroupError::MetadataTooLarge { .. } => "METADATA_TOO_LARGE",
            GroupError::InconsistentAssignor { .. } => "INCONSISTENT_ASSIGNOR",
            GroupError::StaleAttempt { .. } => "STALE_ATTEMPT",
            GroupError::RecordSettled { .. } => "RECORD_SETTLED",
            GroupError::RetryBacklogFull { .. } => "RETRY_BACKLOG_FULL",
            GroupError::PublishesPending { .. } => "PUBLISHES_PENDING",
            GroupError::ProducerIdNeeded => "PRODUCER_ID_NEEDED",
        }
    }
}

/// One group's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// Epoch, assignor, subscribed topics' partition counts; `None` for a group known only by
    /// its offsets.
    pub meta: Option<GroupMeta>,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// The target assignment.
    pub target: Target,
    /// Committed offsets.
    pub offsets: BTreeMap<Tp, Committed>,
    /// Records that failed, by partition and offset: pending redeliveries, and settled ones
    /// the commit has not passed yet.
    pub redeliveries: BTreeMap<(Tp, u64), Redelivery>,
    /// The coordinator's producer identity per partition it publishes to.
    pub publishers: BTreeMap<Tp, Publisher>,
    /// Publish decisions not confirmed yet, per target partition in stamp order.
    pub publishes: BTreeMap<(Tp, (i16, i32)), Publish>,
    /// Offsets of the dead-letter topic replayed so far, as sorted `[start, end)` ranges.
    pub replayed: Vec<(u64, u64)>,
}

/// How a group is doing, as `ListGroups` and `DescribeGroup` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members.
    Empty,
    /// Some member has not reached the target assignment yet.
    Assigning,
    /// Every member holds its target assignment at the group epoch.
    Stable,
}

impl GroupState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "empty",
            GroupState::Assigning => "assigning",
            GroupState::Stable => "stable",
        }
    }
}

impl Group {
    /// The group epoch (0 before any member joined).
    pub fn epoch(&self) -> i32 {
        self.meta.as_ref().map_or(0, |m| m.epoch)
    }

    /// Empty, assigning or stable.
    pub fn state(&self) -> GroupState {
        if self.members.is_empty() {
            return GroupState::Empty;
        }
        let settled = self.members.values().all(|m| {
            let target = self.target.members.get(&m.member_id);
            m.epoch == self.epoch()
                && m.revoking.is_empty()
                && target.is_none_or(|t| t.len() == m.assigned.len() && t.iter().all(|tp| m.assigned.contains_key(tp)))
        });
        if settled { GroupState::Stable } else { GroupState::Assigning }
    }

    /// The member that owns `tp` now (assigned or revoking), if any.
    pub fn owner_of(&self, tp: &Tp) -> Option<&Member> {
        self.members.values().find(|m| m.owns(tp).is_some())
    }

    /// Every record that, replayed alone, rebuilds this group (the rewrite that lets older
    /// records be trimmed).
    pub fn live_records(&self, name: &str) -> Vec<GroupRecord> {
        let mut out = Vec::new();
        if let Some(meta) = &self.meta {
            out.push(GroupRecord::Meta(name.to_owned(), Some(meta.clone())));
        }
        // As `ops::diff` writes it: a group's target is a live key while it has metadata or
        // is not the default.
        if self.meta.is_some() || self.target != Target::default() {
            out.push(GroupRecord::Target(name.to_owned(), Some(self.target.clone())));
        }
        for (id, m) in &self.members {
            out.push(GroupRecord::Member(name.to_owned(), id.clone(), Some(m.clone())));
        }
        for (tp, c) in &self.offsets {
            out.push(GroupRecord::Offset(name.to_owned(), tp.clone(), Some(c.clone())));
        }
        for ((tp, offset), r) in &self.redeliveries {
            out.push(GroupRecord::Redelivery(name.to_owned(), tp.clone(), *offset, Some(r.clone())));
        }
        for (tp, p) in &self.publishers {
            out.push(GroupRecord::Publisher(name.to_owned(), tp.clone(), Some(p.clone())));
        }
        for ((tp, stamp), p) in &self.publishes {
            out.push(GroupRecord::Publish(name.to_owned(), tp.clone(), *stamp, Some(p.clone())));
        }
        if !self.replayed.is_empty() {
            out.push(GroupRecord::Replayed(name.to_owned(), Some(self.replayed.clone())));
        }
        out
    }

    /// Whether the group holds nothing at all (it then stops existing).
    pub fn is_void(&self) -> bool {
        self.meta.is_none()
            && self.members.is_empty()
            && self.offsets.is_empty()
            && self.redeliveries.is_empty()
            && self.publishers.is_empty()
            && self.publishes.is_empty()
            && self.replayed.is_empty()
    }
}

/// Every group of one `__consumer_offsets` partition.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    /// Groups by name.
    pub groups: BTreeMap<String, Group>,
    /// Each group's recent commits per partition, fed by [`Shard::replay`].
    pub lag: LagWindows,
}

/// Groups are equal when their state is: the lag windows are recent history, which a rewrite
/// of the live records does not carry, so a rebuilt shard equals the one it was rebuilt from.
impl PartialEq for Groups {
    fn eq(&self, other: &Groups) -> bool {
        self.groups == other.groups
    }
}

impl Eq for Groups {}

impl Groups {
    /// No groups, with commit windows of these bounds.
    pub fn with_lag_limits(limits: LagLimits) -> Groups {
        Groups { groups: BTreeMap::new(), lag: LagWindows::new(limits) }
    }

    /// Applies one decoded record.
    pub fn apply(&mut self, record: GroupRecord) {
        let name = record.group().to_owned();
        let group = self.groups.entry(name.clone()).or_default();
        match record {
            GroupRecord::Meta(_, meta) => group.meta = meta,
            GroupRecord::Member(_, id, Some(m)) => {
                group.members.insert(id, m);
            }
            GroupRecord::Member(_, id, None) => {
                group.members.remove(&id);
            }
            GroupRecord::Target(_, t) => group.target = t.unwrap_or_default(),
            GroupRecord::Offset(_, tp, Some(c)) => {
                group.offsets.insert(tp, c);
            }
            GroupRecord::Offset(_, tp, None) => {
                group.offsets.remove(&tp);
            }
            GroupRecord::Redelivery(_, tp, offset, Some(r)) => {
                group.redeliveries.insert((tp, offset), r);
            }
            GroupRecord::Redelivery(_, tp, offset, None) => {
                group.redeliveries.remove(&(tp, offset));
            }
            GroupRecord::Publisher(_, tp, Some(p)) => {
                group.publishers.insert(tp, p);
            }
            GroupRecord::Publisher(_, tp, None) => {
                group.publishers.remove(&tp);
            }
            GroupRecord::Publish(_, tp, stamp, Some(p)) => {
                group.publishes.insert((tp, stamp), p);
            }
            GroupRecord::Publish(_, tp, stamp, None) => {
                group.publishes.remove(&(tp, stamp));
            }
            GroupRecord::Replayed(_, ranges) => group.replayed = ranges.unwrap_or_default(),
        }
        if group.is_void() {
            self.groups.remove(&name);
        }
    }

    /// A group, if it exists.
    pub fn get(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }
}

impl Shard for Groups {
    fn replay(&mut self, offset: u64, record: &Record) -> Result<(), ReplayError> {
        let decoded = GroupRecord::decode(record).map_err(|reason| ReplayError { offset, reason })?;
        match &decoded {
            GroupRecord::Offset(g, tp, Some(c)) => self.lag.observe(offset, g, tp, CommitSample::of(c)),
            GroupRecord::Offset(g, tp, None) => self.lag.forget(g, tp),
            _ => {}
        }
        self.apply(decoded);
        Ok(())
    }

    fn keys(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    fn live_records(&self, key: &str) -> Vec<Record> {
        let mut records: Vec<Record> = self
            .groups
            .get(key)
            .map(|g| g.live_records(key).iter().map(GroupRecord::encode).collect())
            .unwrap_or_default();
        // Sorted by key, so a rewrite in chunks can resume after the last key it wrote. The
        // metadata's key sorts first, so a group exists before its other records replay.
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }
}

/// Checks a group name like a topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`.
pub fn validate_group_name(name: &str) -> Result<(), GroupError> {
    if name.is_empty() {
        return Err(GroupError::Invalid("group name must not be empty".into()));
    }
    if name.len() > 249 {
        return Err(GroupError::Invalid("group name is longer than 249 characters".into()));
    }
    if name == "." || name == ".." {
        return Err(GroupError::Invalid(format!("group name {name:?} is not allowed")));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(GroupError::Invalid(format!(
            "group name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// The `__consumer_offsets` partition that holds `group`: `fnv1a_64(group) mod partitions`.
pub fn partition_for_group(group: &str, partitions: u32) -> u32 {
    if partitions == 0 {
        return 0;
    }
    // The remainder is below `partitions`, so it fits in u32.
    (keel_record::fnv1a_64(group.as_bytes()) % u64::from(partitions)) as u32
}

#[cfg(test)]
mod tests;
