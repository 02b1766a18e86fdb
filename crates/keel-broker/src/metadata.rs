//! The cluster's metadata as a pure state machine: nodes, topics, the partition → replicas
//! assignment, and how many producer ids were allocated. It is the applied state of the `__meta`
//! log (one command per record), so every node that replays the same log holds the same
//! metadata. No I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use keel_raft::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

/// The raft group of the metadata log itself.
pub const META_GROUP: GroupId = 0;
/// The name under which the metadata log can be fetched like a topic (one partition).
pub const META_TOPIC: &str = "__meta";
/// The internal topic of committed group offsets and group membership (one coordinator per
/// partition). Created by the controller; users can neither produce to it nor delete it.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The internal topic of delayed records (one timer coordinator per partition, chosen by the
/// target partition, so that one target's timers fire in the order of their times).
pub const DELAYED_TOPIC: &str = "__delayed";
/// The internal topic of transactional (half) messages: one coordinator per partition.
pub const TXN_TOPIC: &str = "__txn";
/// Longest topic name (as in Kafka: it must fit in file names with room to spare).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Most partitions one topic may have.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;
/// Most producer ids one `AllocateProducerIds` may take: a node asks for a block at a time, and
/// a bound keeps one bad request from spending a noticeable share of the id space.
pub const PRODUCER_IDS_PER_ALLOCATION_MAX: u32 = 100_000;
/// Longest stable producer identity (Kafka's `transactional.id`), in bytes.
pub const PRODUCER_IDENTITY_BYTES_MAX: usize = 255;
/// Most stable producer identities the cluster remembers. Each is a few hundred bytes of every
/// node's metadata, kept for good (an identity is never forgotten, or a new instance could no
/// longer fence an old one), so a client inventing names must not grow it without bound.
pub const PRODUCER_IDENTITIES_MAX: usize = 100_000;
/// Most metadata voters: every `__meta` commit waits for a majority of them, and more than
/// seven buys no availability a cluster of this kind needs.
pub const META_VOTERS_MAX: usize = 7;

/// A stable producer identity's current id and epoch, and the request that gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityHolder {
    /// The id and epoch.
    pub current: ProducerEpoch,
    /// The `request_token` of the InitProducerId that set them (0: none), so that a retry of
    /// that request (its answer lost) gets them again instead of another epoch, or a fence.
    pub request_token: u64,
}

/// The producer id and epoch a stable producer identity was last given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEpoch {
    /// The producer id.
    pub producer_id: i64,
    /// Its epoch: each re-initialisation of the identity takes the next one.
    pub epoch: i16,
}

/// A node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where clients reach it (`host:port`).
    pub addr: String,
    /// Where other nodes reach its peer listener. Absent for a node registered before the
    /// peer listener existed, until its next registration (which every node makes at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// SHA-256 of its node key (hex): a later registration under its id must present the key.
    /// Absent for a node registered before keys, until its next registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hash: Option<String>,
    /// Being emptied (`keel node decommission`): no new replica goes to it, and the controller
    /// moves every one it holds elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decommissioned: bool,
}

/// A topic's own settings; `None` means the cluster default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSettings {
    /// Delete whole segments older than this.
    pub retention_ms: Option<i64>,
    /// Delete whole segments beyond this many bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Largest batch accepted, in bytes.
    pub batch_bytes_max: Option<u32>,
}

/// One partition: its raft group and its replicas (the first is the preferred leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Its raft group id (never reused, even after the topic is deleted).
    pub group: GroupId,
    /// Node ids of the replicas; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// The replicas a move in progress goes to (`keel partition move`): every node of both
    /// sets hosts the partition until the group's leader has made `target` its voters and the
    /// controller recorded [`Command::FinishMove`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<NodeId>>,
    /// Moves finished so far. A partition that was ever moved is never initialised again: a
    /// replica that joins it blank must be brought in by the leader, never start a group alone.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub moves: u32,
    /// The generation of the copy each host holds, where it is not 0 (the copies the partition
    /// was created with). A node a move brings in gets a generation no copy of the partition
    /// had before (the move's number), so that a node holding the partition again — after a
    /// move took it off, or a lost disk — is never taken by the group for its old copy, whose
    /// vote and log the new one does not have (`keel_raft::Node::generation`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub generations: BTreeMap<NodeId, u32>,
    /// The last generation given out: each new copy takes the next, so none is ever reused.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub last_generation: u32,
}

impl Partition {
    /// A new partition's record: its first copies (generation 0), never moved.
    pub fn new(group: GroupId, replicas: Vec<NodeId>) -> Partition {
        Partition { group, replicas, target: None, moves: 0, generations: BTreeMap::new(), last_generation: 0 }
    }

    /// Every node that hosts the partition: its replicas and, during a move, its target.
    pub fn hosts(&self) -> impl Iterator<Item = NodeId> + '_ {
        let target = self.target.iter().flatten().filter(|n| !self.replicas.contains(n));
        self.replicas.iter().chain(target).copied()
    }

    /// The generation of `node`'s copy.
    pub fn generation_of(&self, node: NodeId) -> u32 {
        self.generations.get(&node).copied().unwrap_or(0)
    }

    /// Whether a replica may initialise the group's first membership: only the replicas it was
    /// created with, before it was ever moved.
    pub fn initialisable(&self) -> bool {
        self.moves == 0 && self.target.is_none()
    }
}

/// A topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Settings.
    pub settings: TopicSettings,
    /// Partitions by number.
    pub partitions: Vec<Partition>,
    /// Created by the controller for Keel's own use (`__consumer_offsets`): not writable,
    /// not deletable by users.
    #[serde(default)]
    pub internal: bool,
}

/// A change to the metadata: one record of the `__meta` log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster (only the first one counts).
    InitCluster {
        /// The cluster id.
        cluster_id: String,
    },
    /// A node joined or changed its address.
    RegisterNode {
        /// Its id.
        node_id: NodeId,
        /// Its advertised client address.
        addr: String,
        /// Its advertised peer address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_addr: Option<String>,
        /// SHA-256 of the key it presented (hex).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_hash: Option<String>,
    },
    /// A new topic with its assignment (computed by the controller leader).
    CreateTopic {
        /// Name.
        name: String,
        /// Replicas per partition.
        replication_factor: u32,
        /// Settings.
        settings: TopicSettings,
        /// Replicas of each partition.
        assignment: Vec<Vec<NodeId>>,
    },
    /// Deletes a topic and, on every replica, its data.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// Creates one of Keel's internal topics (only the names Keel reserves for itself).
    CreateInternalTopic {
        /// Name (`__consumer_offsets`).
        name: String,
        /// Replicas per partition.
        replication_factor: u32,
        /// Replicas of each partition.
        assignment: Vec<Vec<NodeId>>,
    },
    /// Adds partitions to a topic.
    AddPartitions {
        /// Name.
        name: String,
        /// Replicas of each new partition.
        assignment: Vec<Vec<NodeId>>,
        /// The partition count the controller planned from: applied to any other count (the
        /// same command proposed twice, or a race) the command is refused, so partitions are
        /// never added twice. Absent in records written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partitions_before: Option<u32>,
    },
    /// Hands the producer ids `first..first + count` to one node (which gives them out one per
    /// `InitProducerId`). Applied only if `first` is the next unallocated id, so a proposal
    /// planned from stale metadata, or proposed twice, allocates nothing.
    AllocateProducerIds {
        /// The first id of the block: must equal `Metadata::next_producer_id`.
        first: i64,
        /// How many ids, 1 to `PRODUCER_IDS_PER_ALLOCATION_MAX`.
        count: u32,
    },
    /// Gives a stable producer identity its next id and epoch (planned by
    /// [`Metadata::plan_producer_identity`]): the same id with the next epoch, which fences the
    /// instances that hold an older one, or a fresh id (epoch 0) for a new identity or one whose
    /// epochs are used up. Applied only if the identity still holds `previous` (and a fresh id is
    /// still the next unallocated one), so a stale or repeated proposal changes nothing.
    InitProducerIdentity {
        /// The identity.
        identity: String,
        /// What the identity held when the command was planned (`None`: unknown then).
        previous: Option<ProducerEpoch>,
        /// What it holds once applied.
        next: ProducerEpoch,
        /// The client's token for the request (0: none); see [`IdentityHolder::request_token`].
        #[serde(default, skip_serializing_if = "is_zero")]
        request_token: u64,
    },
    /// Adds an allow rule (adding one that exists changes nothing).
    AddAcl {
        /// The rule.
        rule: crate::acl::AclRule,
    },
    /// Removes an allow rule (removing one that does not exist changes nothing).
    RemoveAcl {
        /// The rule.
        rule: crate::acl::AclRule,
    },
    /// Starts moving a partition to other replicas. Applied only if the partition's replicas are
    /// still `from` and no move is in progress, so a stale or repeated proposal changes nothing.
    MovePartition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Its replicas when the move was planned.
        from: Vec<NodeId>,
        /// Where it goes (the first is the preferred leader).
        to: Vec<NodeId>,
    },
    /// Records a finished move: the group's voters are `to`, so they become the replicas and the
    /// others drop their copy. Applied only if `to` is the move's target.
    FinishMove {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The target the group's voters now are.
        to: Vec<NodeId>,
    },
    /// Empties a node (`keel node decommission`): nothing new is placed on it, and the controller
    /// moves each partition it holds elsewhere.
    DecommissionNode {
        /// The node.
        node_id: NodeId,
    },
    /// A node lost its data dir (`keel node replace`): its next registration may present a new
    /// key, and every partition it holds gets a new generation of copy there, brought in by the
    /// partition's leader as a move to the same replicas.
    ReplaceNode {
        /// The node.
        node_id: NodeId,
    },
    /// Records the metadata group's voters (its configured ones, before any change), so that
    /// they can be replaced and moved like a partition's replicas. Applied only once.
    RecordVoters {
        /// The voters of `__meta`'s group as its leader saw them.
        voters: Vec<NodeId>,
    },
}

/// Why a command or a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such topic.
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    /// The topic exists already.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// The cluster cannot do it in its current state (e.g. too few nodes).
    #[error("{0}")]
    Precondition(String),
    /// A bounded table of the metadata is full.
    #[error("{0}")]
    Exhausted(String),
    /// The request claims an identity it does not prove.
    #[error("{0}")]
    Denied(String),
}

/// Why a node cannot go on replaying `__meta`: its metadata would differ from every other
/// node's, so it must stop rather than serve it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A committed record does not hold a command this node understands.
    #[error("__meta record at offset {offset} does not decode: {reason}")]
    Undecodable {
        /// The record's offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A record arrived beyond the next offset to apply: the ones between were skipped.
    #[error("__meta record at offset {offset} arrived while {applied} was the next to apply")]
    Gap {
        /// The record's offset.
        offset: u64,
        /// The next offset this node had to apply.
        applied: u64,
    },
}

/// The applied metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The cluster's id, once named.
    pub cluster_id: Option<String>,
    /// Nodes by id.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
    /// The group id the next partition gets (0 is the metadata log's own).
    pub next_group: GroupId,
    /// The `__meta` offset up to which commands are applied.
    pub applied_offset: u64,
    /// The first producer id no node was given: every id below it was allocated exactly once,
    /// and none is ever allocated again. 0 in a log written before producer ids existed.
    pub next_producer_id: i64,
    /// Stable producer identities and the id and epoch each was last given.
    pub producer_identities: BTreeMap<String, IdentityHolder>,
    /// The access rules (see [`crate::acl`]).
    pub acls: std::collections::BTreeSet<crate::acl::AclRule>,
    /// The metadata group's own "partition" (`__meta`/0, group 0), once its voters are recorded
    /// ([`Command::RecordVoters`]): its replicas are the voters, moved, replaced and
    /// decommissioned like any partition's. `None` means the voters of the configuration.
    pub controller: Option<Partition>,
}

impl Metadata {
    /// Empty metadata, before any command.
    pub fn new() -> Metadata {
        Metadata { next_group: META_GROUP + 1, ..Metadata::default() }
    }

    /// Replays the committed `__meta` record at `offset` (its value, the encoded command).
    /// Records already applied are ignored (a fetch returns whole batches). Returns the refusal
    /// of a refused command, which every node refuses alike. A record that does not decode, or
    /// that comes after a gap, is an error and changes nothing: skipping it would leave this node
    /// with metadata the log does not hold (the node must stop instead).
    pub fn replay(&mut self, offset: u64, value: &[u8]) -> Result<Option<MetaError>, ReplayError> {
        if offset < self.applied_offset {
            return Ok(None);
        }
        if offset > self.applied_offset {
            return Err(ReplayError::Gap { offset, applied: self.applied_offset });
        }
        let command = decode_command(value).map_err(|e| ReplayError::Undecodable { offset, reason: e.to_string() })?;
        Ok(self.apply(offset, &command).err())
    }

    /// Applies the command at `offset`. A refused command changes nothing but the applied
    /// offset: every replica refuses it the same way.
    pub fn apply(&mut self, offset: u64, command: &Command) -> Result<(), MetaError> {
        debug_assert!(offset >= self.applied_offset, "metadata applied out of order");
        self.applied_offset = offset + 1;
        match command {
            Command::InitCluster { cluster_id } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id.clone());
                }
                Ok(())
            }
            Command::RecordVoters { voters } => {
                if self.controller.is_some() {
                    return Err(MetaError::Precondition("the metadata voters are recorded already".into()));
                }
                check_distinct(voters)?;
                if voters.is_empty() || voters.len() > META_VOTERS_MAX {
                    return Err(MetaError::Invalid(format!("the metadata has 1 to {META_VOTERS_MAX} voters")));
                }
                self.controller = Some(Partition::new(META_GROUP, voters.clone()));
                Ok(())
            }
            Command::AddAcl { rule } => {
                rule.validate()?;
                if !self.acls.contains(rule) && self.acls.len() >= crate::acl::ACL_RULES_MAX {
                    return Err(MetaError::Exhausted(format!(
                        "the cluster holds {} ACL rules already; remove some (or use prefixes)",
                        crate::acl::ACL_RULES_MAX
                    )));
                }
                self.acls.insert(rule.clone());
                Ok(())
            }
            Command::RemoveAcl { rule } => {
                self.acls.remove(rule);
                Ok(())
            }
            Command::RegisterNode { node_id, addr, peer_addr, key_hash } => {
                let known = self.nodes.get(node_id).and_then(|n| n.key_hash.clone());
                if known.is_some() && *key_hash != known {
                    return Err(MetaError::Denied(format!(
                        "node {node_id} is registered with another key: only that node (its data dir) can \
                         change its address"
                    )));
                }
                // A node registered before keys adopts the first key it registers with.
                let key_hash = key_hash.clone().or(known);
                let decommissioned = self.nodes.get(node_id).is_some_and(|n| n.decommissioned);
                let info = NodeInfo { addr: addr.clone(), peer_addr: peer_addr.clone(), key_hash, decommissioned };
                self.nodes.insert(*node_id, info);
                Ok(())
            }
            Command::CreateTopic { name, replication_factor, settings, assignment } => {
                validate_topic_name(name)?;
                if self.topics.contains_key(name) {
                    return Err(MetaError::TopicExists(name.clone()));
                }
                self.check_assignment(assignment, *replication_factor)?;
                let partitions = self.allocate(assignment);
                let topic = Topic {
                    replication_factor: *replication_factor,
                    settings: settings.clone(),
                    partitions,
                    internal: false,
                };
                self.topics.insert(name.clone(), topic);
                Ok(())
            }
            Command::CreateInternalTopic { name, replication_factor, assignment } => {
                if name != OFFSETS_TOPIC && name != DELAYED_TOPIC && name != TXN_TOPIC {
                    return Err(MetaError::Invalid(format!("{name:?} is not one of Keel's internal topics")));
                }
                if self.topics.contains_key(name) {
                    return Err(MetaError::TopicExists(name.clone()));
                }
                self.check_assignment(assignment, *replication_factor)?;
                let partitions = self.allocate(assignment);
                let topic = Topic {
                    replication_factor: *replication_factor,
                    settings: TopicSettings::default(),
                    partitions,
                    internal: true,
                };
                self.topics.insert(name.clone(), topic);
                Ok(())
            }
            Command::DeleteTopic { name } => {
                if self.topics.get(name).is_some_and(|t| t.internal) {
                    return Err(MetaError::Invalid(format!("{name:?} is internal and cannot be deleted")));
                }
                self.topics.remove(name).map(|_| ()).ok_or_else(|| MetaError::UnknownTopic(name.clone()))
            }
            Command::AddPartitions { name, assignment, partitions_before } => {
                let topic = self.topics.get(name).ok_or_else(|| MetaError::UnknownTopic(name.clone()))?;
                if topic.internal {
                    return Err(MetaError::Invalid(format!("{name:?} is internal; its partitions are fixed")));
                }
                if let Some(before) = *partitions_before
                    && topic.partitions.len() != before as usize
                {
                    return Err(MetaError::Precondition(format!(
                        "topic {name:?} has {} partitions, not the {before} this change was planned for",
                        topic.partitions.len()
                    )));
                }
                let total = topic.partitions.len() + assignment.len();
                if total > PARTITIONS_PER_TOPIC_MAX as usize {
                    return Err(MetaError::Invalid(format!(
                        "a topic has at most {PARTITIONS_PER_TOPIC_MAX} partitions"
                    )));
                }
                self.check_assignment(assignment, topic.replication_factor)?;
                let partitions = self.allocate(assignment);
                if let Some(topic) = self.topics.get_mut(name) {
                    topic.partitions.extend(partitions);
                }
                Ok(())
            }
            Command::MovePartition { topic, partition, from, to } => {
                self.check_move(topic, *partition, to)?;
                let current = self.partition(topic, *partition)?;
                if let Some(target) = &current.target {
                    // Redirecting would strand a replica the first move already made a voter: it
                    // would drop its copy while the group still counts on it.
                    return Err(MetaError::Precondition(format!(
                        "{topic}/{partition} is moving to {target:?} already; a partition moves once at a time"
                    )));
                }
                if current.replicas != *from {
                    return Err(MetaError::Precondition(format!(
                        "{topic}/{partition} has replicas {:?}, not the {from:?} this move was planned from",
                        current.replicas
                    )));
                }
                let target = (current.replicas != *to).then(|| to.clone());
                let p = self.partition_mut(topic, *partition)?;
                if to.iter().any(|n| !p.replicas.contains(n)) {
                    p.last_generation = p.last_generation.saturating_add(1);
                }
                for joiner in to.iter().filter(|n| !p.replicas.contains(n)) {
                    p.generations.insert(*joiner, p.last_generation);
                }
                p.target = target;
                Ok(())
            }
            Command::DecommissionNode { node_id } => {
                let node = self.nodes.get_mut(node_id).ok_or_else(|| {
                    MetaError::Precondition(format!("node {node_id} is not registered: nothing to decommission"))
                })?;
                node.decommissioned = true;
                Ok(())
            }
            Command::ReplaceNode { node_id } => {
                let node = self.nodes.get_mut(node_id).ok_or_else(|| {
                    MetaError::Precondition(format!("node {node_id} is not registered: nothing to replace"))
                })?;
                node.key_hash = None;
                let partitions = self.topics.values_mut().flat_map(|t| &mut t.partitions);
                for p in partitions.chain(self.controller.as_mut()) {
                    // Every copy the node hosts, one a move takes it off included: the
                    // membership may still list the old one, which a blank copy of the
                    // same generation would answer for (seed 15: a follower's log went back).
                    if !p.hosts().any(|n| n == *node_id) {
                        continue;
                    }
                    p.last_generation = p.last_generation.saturating_add(1);
                    p.generations.insert(*node_id, p.last_generation);
                    if p.target.is_none() {
                        p.target = Some(p.replicas.clone());
                    }
                }
                Ok(())
            }
            Command::FinishMove { topic, partition, to } => {
                let current = self.partition_mut(topic, *partition)?;
                if current.target.as_ref() != Some(to) {
                    return Err(MetaError::Precondition(format!(
                        "{topic}/{partition} is not moving to {to:?} (target {:?})",
                        current.target
                    )));
                }
                current.generations.retain(|n, _| to.contains(n));
                current.replicas = to.clone();
                current.target = None;
                current.moves = current.moves.saturating_add(1);
                Ok(())
            }
            Command::AllocateProducerIds { first, count } => {
                if *count == 0 || *count > PRODUCER_IDS_PER_ALLOCATION_MAX {
                    return Err(MetaError::Invalid(format!(
                        "a producer-id allocation takes 1 to {PRODUCER_IDS_PER_ALLOCATION_MAX} ids, not {count}"
                    )));
                }
                if *first != self.next_producer_id {
                    return Err(MetaError::Precondition(format!(
                        "producer ids from {first} were planned, but {} is the next unallocated one",
                        self.next_producer_id
                    )));
                }
                // `next` itself is never handed out, so every id stays below i64::MAX.
                let next = first
                    .checked_add(i64::from(*count))
                    .ok_or_else(|| MetaError::Precondition("the producer-id space is exhausted".into()))?;
                self.next_producer_id = next;
                debug_assert!(self.next_producer_id > 0, "producer ids only grow from 0");
                Ok(())
            }
            Command::InitProducerIdentity { identity, previous, next, request_token } => {
                validate_producer_identity(identity)?;
                let current = self.producer_identities.get(identity).map(|h| h.current);
                if current != *previous {
                    return Err(MetaError::Precondition(format!(
                        "producer identity {identity:?} holds {current:?}, not the {previous:?} this change was planned from"
                    )));
                }
                let bump = previous.filter(|p| p.epoch < i16::MAX);
                match bump {
                    Some(p) if next.producer_id == p.producer_id && Some(next.epoch) == p.epoch.checked_add(1) => {}
                    Some(_) => {
                        return Err(MetaError::Invalid(format!(
                            "producer identity {identity:?} must take the next epoch of its id, not {next:?}"
                        )));
                    }
                    None => {
                        if next.epoch != 0 || next.producer_id != self.next_producer_id {
                            return Err(MetaError::Precondition(format!(
                                "a fresh id for producer identity {identity:?} must be {} at epoch 0, not {next:?}",
                                self.next_producer_id
                            )));
                        }
                        if previous.is_none() && self.producer_identities.len() >= PRODUCER_IDENTITIES_MAX {
                            return Err(MetaError::Exhausted(format!(
                                "the cluster remembers at most {PRODUCER_IDENTITIES_MAX} producer identities"
                            )));
                        }
                        self.next_producer_id = self
                            .next_producer_id
                            .checked_add(1)
                            .ok_or_else(|| MetaError::Precondition("the producer-id space is exhausted".into()))?;
                    }
                }
                self.producer_identities
                    .insert(identity.clone(), IdentityHolder { current: *next, request_token: *request_token });
                Ok(())
            }
        }
    }

    /// The command that gives `identity` its next id and epoch: the next epoch of its id, or a
    /// fresh id at epoch 0 when the identity is new or its epochs are used up.
    pub fn plan_producer_identity(&self, identity: &str, request_token: u64) -> Result<Command, MetaError> {
        validate_producer_identity(identity)?;
        let previous = self.producer_identities.get(identity).map(|h| h.current);
        let next = match previous {
            Some(p) if p.epoch < i16::MAX => ProducerEpoch { producer_id: p.producer_id, epoch: p.epoch + 1 },
            _ => {
                if previous.is_none() && self.producer_identities.len() >= PRODUCER_IDENTITIES_MAX {
                    return Err(MetaError::Exhausted(format!(
                        "the cluster remembers at most {PRODUCER_IDENTITIES_MAX} producer identities"
                    )));
                }
                if self.next_producer_id == i64::MAX {
                    return Err(MetaError::Precondition("the producer-id space is exhausted".into()));
                }
                ProducerEpoch { producer_id: self.next_producer_id, epoch: 0 }
            }
        };
        Ok(Command::InitProducerIdentity { identity: identity.to_owned(), previous, next, request_token })
    }

    fn allocate(&mut self, assignment: &[Vec<NodeId>]) -> Vec<Partition> {
        assignment
            .iter()
            .map(|replicas| {
                let group = self.next_group;
                self.next_group += 1;
                Partition::new(group, replicas.clone())
            })
            .collect()
    }

    fn check_assignment(&self, assignment: &[Vec<NodeId>], replication_factor: u32) -> Result<(), MetaError> {
        if assignment.is_empty() {
            return Err(MetaError::Invalid("at least one partition is needed".into()));
        }
        if assignment.len() > PARTITIONS_PER_TOPIC_MAX as usize {
            return Err(MetaError::Invalid(format!("a topic has at most {PARTITIONS_PER_TOPIC_MAX} partitions")));
        }
        for replicas in assignment {
            if replicas.len() != replication_factor as usize {
                return Err(MetaError::Invalid("every partition needs replication_factor replicas".into()));
            }
            check_distinct(replicas)?;
            if let Some(unknown) = replicas.iter().find(|n| !self.nodes.contains_key(n)) {
                return Err(MetaError::Precondition(format!("node {unknown} is not registered")));
            }
            if let Some(leaving) = replicas.iter().find(|n| self.nodes.get(n).is_some_and(|i| i.decommissioned)) {
                return Err(MetaError::Precondition(format!(
                    "node {leaving} is decommissioned: no new replica goes to it"
                )));
            }
        }
        Ok(())
    }

    /// Checks that `topic`/`partition` may move to `to`: as many distinct, registered nodes as
    /// the topic's replication factor (a move never changes how many copies there are). The
    /// metadata's voters (`__meta`/0) may grow or shrink, to 1 to [`META_VOTERS_MAX`].
    pub fn check_move(&self, topic: &str, partition: u32, to: &[NodeId]) -> Result<(), MetaError> {
        if topic == META_TOPIC {
            self.partition(topic, partition)?;
            if to.is_empty() || to.len() > META_VOTERS_MAX {
                return Err(MetaError::Invalid(format!(
                    "the metadata has 1 to {META_VOTERS_MAX} voters, not {}",
                    to.len()
                )));
            }
            return self.check_assignment(&[to.to_vec()], to.len() as u32);
        }
        let t = self.topics.get(topic).ok_or_else(|| MetaError::UnknownTopic(topic.to_owned()))?;
        self.partition(topic, partition)?;
        if to.len() != t.replication_factor as usize {
            return Err(MetaError::Invalid(format!(
                "{topic} has replication factor {}; a move names that many replicas, not {}",
                t.replication_factor,
                to.len()
            )));
        }
        self.check_assignment(&[to.to_vec()], t.replication_factor)?;
        Ok(())
    }

    fn partition_mut(&mut self, topic: &str, partition: u32) -> Result<&mut Partition, MetaError> {
        if topic == META_TOPIC {
            return match (partition, self.controller.as_mut()) {
                (0, Some(p)) => Ok(p),
                (0, None) => Err(voters_unrecorded()),
                _ => Err(MetaError::Invalid("__meta has one partition, 0".into())),
            };
        }
        let t = self.topics.get_mut(topic).ok_or_else(|| MetaError::UnknownTopic(topic.to_owned()))?;
        let count = t.partitions.len();
        t.partitions.get_mut(partition as usize).ok_or_else(|| {
            MetaError::Invalid(format!("topic {topic:?} has {count} partitions; {partition} is not one"))
        })
    }

    /// The move that takes one partition off a decommissioned node, if one is due: the first
    /// partition (not moving already) that a decommissioned node holds, with that node replaced
    /// in its replica list by the active node holding the fewest replicas that it lacks. `None`
    /// when there is nothing to move, or no node to move to (the status shows what is left).
    pub fn plan_decommission_move(&self) -> Option<(String, u32, Vec<NodeId>)> {
        let leaving: BTreeSet<NodeId> =
            self.nodes.iter().filter(|(_, n)| n.decommissioned).map(|(id, _)| *id).collect();
        if leaving.is_empty() {
            return None;
        }
        let mut load: BTreeMap<NodeId, usize> =
            self.nodes.iter().filter(|(_, n)| !n.decommissioned).map(|(id, _)| (*id, 0)).collect();
        for p in self.topics.values().flat_map(|t| &t.partitions) {
            for n in p.hosts() {
                if let Some(count) = load.get_mut(&n) {
                    *count += 1;
                }
            }
        }
        // The metadata's voters first: a decommissioned voter leaves the controller too.
        for (name, i, p) in self.all_partitions() {
            if p.target.is_some() || !p.replicas.iter().any(|n| leaving.contains(n)) {
                continue;
            }
            let mut to = p.replicas.clone();
            for k in 0..to.len() {
                if !leaving.contains(&to[k]) {
                    continue;
                }
                let pick = load.iter().filter(|(n, _)| !to.contains(n)).min_by_key(|(n, c)| (**c, **n));
                let Some((pick, _)) = pick else { break };
                let pick = *pick;
                to[k] = pick;
                *load.entry(pick).or_default() += 1;
            }
            // Voters with no node to go to shrink, while at least three stay (as many failures
            // tolerated as with three): a voter blocks its node's retirement otherwise.
            if name == META_TOPIC && to.iter().any(|n| leaving.contains(n)) {
                let staying: Vec<NodeId> = to.iter().copied().filter(|n| !leaving.contains(n)).collect();
                if staying.len() >= 3 {
                    to = staying;
                }
            }
            if to.iter().any(|n| leaving.contains(n)) {
                continue;
            }
            return Some((name.to_owned(), i, to));
        }
        None
    }

    /// Partitions with a move in progress: (topic, partition, the partition), the metadata's
    /// voters (`__meta`/0) included.
    pub fn moving(&self) -> impl Iterator<Item = (&str, u32, &Partition)> + '_ {
        self.all_partitions().filter(|(_, _, p)| p.target.is_some())
    }

    /// Every partition as (topic, partition, the partition): the metadata's voters (`__meta`/0,
    /// once recorded) first, then the topics'.
    pub fn all_partitions(&self) -> impl Iterator<Item = (&str, u32, &Partition)> + '_ {
        let controller = self.controller.iter().map(|p| (META_TOPIC, 0, p));
        let partitions = self
            .topics
            .iter()
            .flat_map(|(name, t)| t.partitions.iter().enumerate().map(|(i, p)| (name.as_str(), i as u32, p)));
        controller.chain(partitions)
    }

    /// Whether `node` hosts a copy of `__meta` as the metadata records it (`None`: the voters
    /// are not recorded; the configuration's are the voters).
    pub fn hosts_meta(&self, node: NodeId) -> Option<bool> {
        self.controller.as_ref().map(|c| c.hosts().any(|n| n == node))
    }

    /// The partitions of `__consumer_offsets`, once the controller created it.
    pub fn offsets_topic(&self) -> Option<&Topic> {
        self.topics.get(OFFSETS_TOPIC).filter(|t| t.internal)
    }

    /// The partitions of `__delayed`, once the controller created it.
    pub fn delayed_topic(&self) -> Option<&Topic> {
        self.topics.get(DELAYED_TOPIC).filter(|t| t.internal)
    }

    /// `__txn`, once the cluster created it.
    pub fn txn_topic(&self) -> Option<&Topic> {
        self.topics.get(TXN_TOPIC).filter(|t| t.internal)
    }

    /// Partition counts of the user topics (what group subscriptions can match).
    pub fn topic_partitions(&self) -> BTreeMap<String, u32> {
        self.topics.iter().filter(|(_, t)| !t.internal).map(|(n, t)| (n.clone(), t.partitions.len() as u32)).collect()
    }

    /// The partition → group of a topic (`__meta`/0: the metadata voters, once recorded).
    pub fn partition(&self, topic: &str, partition: u32) -> Result<&Partition, MetaError> {
        if topic == META_TOPIC {
            return match (partition, self.controller.as_ref()) {
                (0, Some(p)) => Ok(p),
                (0, None) => Err(voters_unrecorded()),
                _ => Err(MetaError::Invalid("__meta has one partition, 0".into())),
            };
        }
        let t = self.topics.get(topic).ok_or_else(|| MetaError::UnknownTopic(topic.to_owned()))?;
        t.partitions.get(partition as usize).ok_or_else(|| {
            MetaError::Invalid(format!("topic {topic:?} has {} partitions; {partition} is not one", t.partitions.len()))
        })
    }

    /// Every group hosted by `node` (a replica, or the target of a move), excluding the metadata
    /// group.
    pub fn groups_of(&self, node: NodeId) -> BTreeMap<GroupId, (&str, u32, &Topic)> {
        let mut out = BTreeMap::new();
        for (name, topic) in &self.topics {
            for (i, p) in topic.partitions.iter().enumerate() {
                if p.hosts().any(|n| n == node) {
                    out.insert(p.group, (name.as_str(), i as u32, topic));
                }
            }
        }
        out
    }

    /// Plans the replicas of `count` new partitions, Kafka style: partition `p` takes the
    /// `replication_factor` nodes that follow `start + p` in id order, where `start` is the node
    /// that leads the fewest partitions (then holds the fewest replicas) — so replicas and
    /// preferred leaders spread evenly as topics come and go.
    pub fn plan_assignment(&self, count: u32, replication_factor: u32) -> Result<Vec<Vec<NodeId>>, MetaError> {
        let nodes: Vec<NodeId> = self.nodes.iter().filter(|(_, n)| !n.decommissioned).map(|(id, _)| *id).collect();
        if replication_factor == 0 {
            return Err(MetaError::Invalid("replication factor must be at least 1".into()));
        }
        if replication_factor as usize > nodes.len() {
            return Err(MetaError::Precondition(format!(
                "replication factor {replication_factor} needs {replication_factor} nodes; the cluster has {}",
                nodes.len()
            )));
        }
        let mut load: BTreeMap<NodeId, (usize, usize)> = nodes.iter().map(|&n| (n, (0, 0))).collect();
        for p in self.topics.values().flat_map(|t| &t.partitions) {
            for (i, n) in p.replicas.iter().enumerate() {
                if let Some((leaders, replicas)) = load.get_mut(n) {
                    *leaders += usize::from(i == 0);
                    *replicas += 1;
                }
            }
        }
        let place = |start: usize| -> Vec<Vec<NodeId>> {
            (0..count as usize)
                .map(|p| (0..replication_factor as usize).map(|r| nodes[(start + p + r) % nodes.len()]).collect())
                .collect()
        };
        // Try every rotation; keep the one whose result is most even (fewest leaders on the
        // busiest node, then fewest replicas, then the smallest spread).
        let score = |plan: &[Vec<NodeId>]| {
            let mut after = load.clone();
            for replicas in plan {
                for (i, n) in replicas.iter().enumerate() {
                    if let Some((leaders, count)) = after.get_mut(n) {
                        *leaders += usize::from(i == 0);
                        *count += 1;
                    }
                }
            }
            let leaders_max = after.values().map(|l| l.0).max().unwrap_or(0);
            let replicas_max = after.values().map(|l| l.1).max().unwrap_or(0);
            let spread: usize = after.values().map(|l| l.0 * l.0 + l.1 * l.1).sum();
            (leaders_max, replicas_max, spread)
        };
        let start = (0..nodes.len()).min_by_key(|&s| (score(&place(s)), s)).unwrap_or(0);
        let plan = place(start);
        Ok(plan)
    }
}

/// Checks the replication factor of a new topic: odd, or 0 for the default. A majority of `2k`
/// replicas is `k + 1`, so an even factor tolerates no more failures than `2k - 1` replicas while
/// costing one more copy and making every commit wait for one more ack.
///
/// Only new topics are checked: the metadata log may hold topics created with an even factor
/// before this rule, and replaying it must rebuild them as they were.
pub fn validate_replication_factor(replication_factor: u32) -> Result<(), MetaError> {
    if replication_factor.is_multiple_of(2) && replication_factor != 0 {
        return Err(MetaError::Invalid(format!(
            "replication factor {replication_factor} is even; use an odd one (an even factor tolerates no \
             more failed replicas than the odd one below it)"
        )));
    }
    Ok(())
}

/// The replication factor of a topic created with 0: 3, or 1 on a cluster of fewer than three
/// nodes (2 would be even, see [`validate_replication_factor`]).
pub fn default_replication_factor(nodes: usize) -> u32 {
    if nodes >= 3 { 3 } else { 1 }
}

/// Checks a topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`, and not
/// starting with `__` (reserved for Keel's internal topics).
pub fn validate_topic_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty() {
        return Err(MetaError::Invalid("topic name must not be empty".into()));
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(MetaError::Invalid(format!("topic name is longer than {TOPIC_NAME_BYTES_MAX} characters")));
    }
    if name == "." || name == ".." {
        return Err(MetaError::Invalid(format!("topic name {name:?} is not allowed")));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(MetaError::Invalid(format!(
            "topic name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    if name.starts_with("__") {
        return Err(MetaError::Invalid(format!("topic names starting with \"__\" are reserved ({name:?})")));
    }
    Ok(())
}

fn voters_unrecorded() -> MetaError {
    MetaError::Precondition("the metadata voters are not recorded yet; ask the controller leader".into())
}

/// Refuses a replica list naming a node twice.
fn check_distinct(replicas: &[NodeId]) -> Result<(), MetaError> {
    let seen: BTreeSet<NodeId> = replicas.iter().copied().collect();
    if seen.len() != replicas.len() {
        return Err(MetaError::Invalid("a partition's replicas must be distinct nodes".into()));
    }
    Ok(())
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// Checks a stable producer identity: 1 to `PRODUCER_IDENTITY_BYTES_MAX` bytes, no control
/// characters (it is printed in logs and listings).
pub fn validate_producer_identity(identity: &str) -> Result<(), MetaError> {
    if identity.is_empty() || identity.len() > PRODUCER_IDENTITY_BYTES_MAX {
        return Err(MetaError::Invalid(format!(
            "a producer identity has 1 to {PRODUCER_IDENTITY_BYTES_MAX} bytes, not {}",
            identity.len()
        )));
    }
    if identity.chars().any(char::is_control) {
        return Err(MetaError::Invalid("a producer identity must not contain control characters".into()));
    }
    Ok(())
}

/// Encodes a command as the value of a `__meta` record.
pub fn encode_command(command: &Command) -> Vec<u8> {
    // A derived Serialize of plain strings and integers cannot fail.
    serde_json::to_vec(command).unwrap_or_default()
}

/// Decodes a `__meta` record's value.
pub fn decode_command(bytes: &[u8]) -> Result<Command, MetaError> {
    serde_json::from_slice(bytes).map_err(|e| MetaError::Invalid(format!("undecodable metadata command: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn cluster(nodes: u64) -> Metadata {
        let mut m = Metadata::new();
        for (i, n) in (1..=nodes).enumerate() {
            m.apply(
                i as u64,
                &Command::RegisterNode {
                    node_id: n,
                    addr: format!("127.0.0.1:{}", 9000 + n),
                    peer_addr: None,
                    key_hash: None,
                },
            )
            .unwrap();
        }
        m
    }

    fn create(m: &mut Metadata, name: &str, partitions: u32, rf: u32) -> Result<(), MetaError> {
        let assignment = m.plan_assignment(partitions, rf)?;
        let offset = m.applied_offset;
        m.apply(
            offset,
            &Command::CreateTopic {
                name: name.into(),
                replication_factor: rf,
                settings: TopicSettings::default(),
                assignment,
            },
        )
    }

    fn apply_next(m: &mut Metadata, command: Command) -> Result<(), MetaError> {
        let offset = m.applied_offset;
        m.apply(offset, &command)
    }

    fn move_to(from: &[NodeId], to: &[NodeId]) -> Command {
        Command::MovePartition { topic: "a".into(), partition: 0, from: from.to_vec(), to: to.to_vec() }
    }

    #[test]
    fn a_move_is_recorded_once_and_finishes_only_as_planned() {
        let mut m = cluster(4);
        create(&mut m, "a", 1, 3).unwrap();
        let from = m.partition("a", 0).unwrap().replicas.clone();
        let spare = (1..=4).find(|n| !from.contains(n)).unwrap();
        let to = vec![spare, from[1], from[2]];
        assert!(m.partition("a", 0).unwrap().initialisable());

        // Refused moves change nothing but the applied offset.
        let before = m.clone();
        for bad in [
            move_to(&from, &[spare, from[1]]),
            move_to(&from, &[spare, spare, from[1]]),
            move_to(&from, &[9, from[1], from[2]]),
            move_to(&[from[1], from[0], from[2]], &to),
            Command::MovePartition { topic: "nope".into(), partition: 0, from: from.clone(), to: to.clone() },
            Command::MovePartition { topic: "a".into(), partition: 1, from: from.clone(), to: to.clone() },
            Command::FinishMove { topic: "a".into(), partition: 0, to: to.clone() },
        ] {
            assert!(apply_next(&mut m, bad.clone()).is_err(), "{bad:?}");
            assert_eq!(Metadata { applied_offset: before.applied_offset, ..m.clone() }, before, "{bad:?}");
            m.applied_offset = before.applied_offset;
        }

        apply_next(&mut m, move_to(&from, &to)).unwrap();
        let p = m.partition("a", 0).unwrap().clone();
        assert_eq!((p.replicas.clone(), p.target.clone()), (from.clone(), Some(to.clone())));
        assert!(!p.initialisable(), "a replica a move brings in must not initialise the group alone");
        // Every node of both sets hosts the partition until the move finishes.
        for n in 1..=4 {
            assert!(m.groups_of(n).contains_key(&p.group), "node {n}");
        }
        // Once at a time: the same proposal again, or another target, is refused.
        assert!(apply_next(&mut m, move_to(&from, &to)).is_err());
        assert!(apply_next(&mut m, move_to(&from, &[from[0], spare, from[2]])).is_err());
        assert!(apply_next(&mut m, Command::FinishMove { topic: "a".into(), partition: 0, to: from.clone() }).is_err());

        apply_next(&mut m, Command::FinishMove { topic: "a".into(), partition: 0, to: to.clone() }).unwrap();
        let p = m.partition("a", 0).unwrap().clone();
        assert_eq!((p.replicas.clone(), p.target.clone(), p.moves), (to.clone(), None, 1));
        assert!(!m.groups_of(from[0]).contains_key(&p.group), "the replica moved off drops the partition");
        assert!(!p.initialisable(), "a moved partition is never initialised again");
        // A finish applied twice is refused (the controller answers a repeat before proposing).
        assert!(apply_next(&mut m, Command::FinishMove { topic: "a".into(), partition: 0, to }).is_err());
        // The node brought in holds the partition's second generation of copy; the others keep
        // theirs (0).
        assert_eq!(p.generations, BTreeMap::from([(spare, 1)]));
        assert_eq!((p.generation_of(spare), p.generation_of(from[1])), (1, 0));
        // Back to the node it left: that node's new copy is another generation than its old.
        apply_next(&mut m, move_to(&p.replicas, &from)).unwrap();
        apply_next(&mut m, Command::FinishMove { topic: "a".into(), partition: 0, to: from.clone() }).unwrap();
        let p = m.partition("a", 0).unwrap().clone();
        assert_eq!(p.generations, BTreeMap::from([(from[0], 2)]), "the spare's copy is gone with it");
        let mut reordered = p.replicas.clone();
        reordered.rotate_left(1);
        apply_next(&mut m, move_to(&p.replicas, &reordered)).unwrap();
    }

    #[test]
    fn the_metadata_voters_are_recorded_once_then_grow_shrink_and_are_replaced_like_replicas() {
        let mut m = cluster(5);
        let meta_move = |from: &[NodeId], to: &[NodeId]| Command::MovePartition {
            topic: META_TOPIC.into(),
            partition: 0,
            from: from.to_vec(),
            to: to.to_vec(),
        };
        assert!(m.partition(META_TOPIC, 0).is_err(), "not recorded: the configuration's voters");
        assert!(apply_next(&mut m, meta_move(&[1, 2, 3], &[1, 2, 3, 4, 5])).is_err(), "not before the record");
        assert!(apply_next(&mut m, Command::RecordVoters { voters: vec![] }).is_err());
        assert!(apply_next(&mut m, Command::RecordVoters { voters: vec![1, 1, 2] }).is_err());
        apply_next(&mut m, Command::RecordVoters { voters: vec![1, 2, 3] }).unwrap();
        let recorded = m.controller.clone();
        assert!(apply_next(&mut m, Command::RecordVoters { voters: vec![4] }).is_err(), "only once");
        assert_eq!(m.controller, recorded);
        assert_eq!((m.hosts_meta(1), m.hosts_meta(4)), (Some(true), Some(false)));

        // Grow to five: the joiners get a new generation; the voters are not partition copies.
        assert!(apply_next(&mut m, meta_move(&[1, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8])).is_err(), "too many");
        assert!(apply_next(&mut m, meta_move(&[1, 2, 3], &[1, 2, 9])).is_err(), "an unknown node");
        assert!(apply_next(&mut m, meta_move(&[2, 3, 4], &[1, 2, 3, 4, 5])).is_err(), "planned from stale voters");
        apply_next(&mut m, meta_move(&[1, 2, 3], &[1, 2, 3, 4, 5])).unwrap();
        assert_eq!(m.moving().map(|(t, p, _)| (t.to_owned(), p)).collect::<Vec<_>>(), [(META_TOPIC.to_owned(), 0)]);
        assert_eq!(m.hosts_meta(5), Some(true), "a joiner hosts a copy during the change");
        let c = m.partition(META_TOPIC, 0).unwrap();
        assert_eq!((c.generation_of(4), c.generation_of(5), c.generation_of(1)), (1, 1, 0));
        apply_next(&mut m, Command::FinishMove { topic: META_TOPIC.into(), partition: 0, to: vec![1, 2, 3, 4, 5] })
            .unwrap();
        assert!(m.topics.is_empty(), "no topic holds the voters");

        // A voter that lost its disk gets a new copy, as a partition replica would.
        apply_next(&mut m, Command::ReplaceNode { node_id: 3 }).unwrap();
        let c = m.partition(META_TOPIC, 0).unwrap();
        assert_eq!((c.target.clone(), c.generation_of(3)), (Some(vec![1, 2, 3, 4, 5]), 2));
        apply_next(&mut m, Command::FinishMove { topic: META_TOPIC.into(), partition: 0, to: vec![1, 2, 3, 4, 5] })
            .unwrap();

        // A decommissioned voter is replaced by a node that is not one, if there is one; else
        // the voters shrink, but never below three.
        apply_next(&mut m, Command::DecommissionNode { node_id: 2 }).unwrap();
        assert_eq!(m.plan_decommission_move(), Some((META_TOPIC.to_owned(), 0, vec![1, 3, 4, 5])));
        apply_next(&mut m, meta_move(&[1, 2, 3, 4, 5], &[3, 4, 5])).unwrap();
        apply_next(&mut m, Command::FinishMove { topic: META_TOPIC.into(), partition: 0, to: vec![3, 4, 5] }).unwrap();
        assert_eq!((m.hosts_meta(1), m.hosts_meta(2)), (Some(false), Some(false)));
        apply_next(&mut m, Command::DecommissionNode { node_id: 3 }).unwrap();
        assert_eq!(m.plan_decommission_move(), Some((META_TOPIC.to_owned(), 0, vec![1, 4, 5])));
        apply_next(&mut m, meta_move(&[3, 4, 5], &[1, 4, 5])).unwrap();
        apply_next(&mut m, Command::FinishMove { topic: META_TOPIC.into(), partition: 0, to: vec![1, 4, 5] }).unwrap();
        apply_next(&mut m, Command::DecommissionNode { node_id: 4 }).unwrap();
        assert_eq!(m.plan_decommission_move(), None, "three voters, and no node to go to");
    }

    #[test]
    fn a_replaced_node_gets_a_new_copy_of_every_partition_it_holds_and_may_change_its_key() {
        let mut m = cluster(4);
        let register = |key: &str| Command::RegisterNode {
            node_id: 2,
            addr: "127.0.0.1:9002".into(),
            peer_addr: None,
            key_hash: Some(key.into()),
        };
        apply_next(&mut m, register("old")).unwrap();
        create(&mut m, "a", 4, 3).unwrap();
        let before = m.clone();
        assert!(apply_next(&mut m, Command::ReplaceNode { node_id: 9 }).is_err(), "an unknown node");
        assert_eq!(Metadata { applied_offset: before.applied_offset, ..m.clone() }, before);
        assert!(apply_next(&mut m, register("new")).is_err(), "a new key is refused before the replace");

        apply_next(&mut m, Command::ReplaceNode { node_id: 2 }).unwrap();
        for (i, p) in m.topics["a"].partitions.iter().enumerate() {
            let was = &before.topics["a"].partitions[i];
            if was.replicas.contains(&2) {
                assert_eq!(p.target.as_ref(), Some(&was.replicas), "partition {i} moves to the same replicas");
                assert_eq!((p.generation_of(2), p.last_generation), (1, 1), "partition {i}");
                assert!(!p.initialisable(), "the blank copy joins through the leader");
            } else {
                assert_eq!(p, was, "partition {i} does not involve node 2");
            }
        }
        apply_next(&mut m, register("new")).unwrap();
        assert_eq!(m.nodes[&2].key_hash.as_deref(), Some("new"), "the new data dir's key is adopted");

        let (i, p) = m.topics["a"].partitions.iter().enumerate().find(|(_, p)| p.target.is_some()).unwrap();
        let to = p.replicas.clone();
        apply_next(&mut m, Command::FinishMove { topic: "a".into(), partition: i as u32, to: to.clone() }).unwrap();
        let p = m.partition("a", i as u32).unwrap();
        assert_eq!((p.replicas.clone(), p.target.clone(), p.generation_of(2)), (to, None, 1));
    }

    #[test]
    fn a_decommissioned_node_is_emptied_one_move_at_a_time_and_gets_nothing_new() {
        let mut m = cluster(4);
        create(&mut m, "a", 4, 3).unwrap();
        assert!(apply_next(&mut m, Command::DecommissionNode { node_id: 9 }).is_err());
        apply_next(&mut m, Command::DecommissionNode { node_id: 2 }).unwrap();
        // Nothing new goes to it: not by placement, not by a move.
        assert!(m.plan_assignment(3, 3).unwrap().iter().all(|r| !r.contains(&2)));
        let p = m.partition("a", 0).unwrap().clone();
        let spare = (1..=4).find(|n| !p.replicas.contains(n)).unwrap();
        if spare != 2 {
            let onto_it = [2, spare, p.replicas.iter().copied().find(|n| *n != 2).unwrap()];
            assert!(m.check_move("a", 0, &onto_it).is_err());
        }
        // Each planned move replaces node 2 in place by an active node the partition lacks.
        let mut planned = 0;
        while let Some((topic, partition, to)) = m.plan_decommission_move() {
            let from = m.partition(&topic, partition).unwrap().replicas.clone();
            assert!(!to.contains(&2) && from.contains(&2), "{from:?} -> {to:?}");
            let slot = from.iter().position(|n| *n == 2).unwrap();
            assert_eq!((&from[..slot], &from[slot + 1..]), (&to[..slot], &to[slot + 1..]), "only node 2 changes");
            apply_next(&mut m, Command::MovePartition { topic: topic.clone(), partition, from, to: to.clone() })
                .unwrap();
            apply_next(&mut m, Command::FinishMove { topic, partition, to }).unwrap();
            planned += 1;
        }
        assert_eq!(planned, 3, "node 2 held three of the four partitions");
        assert!(m.groups_of(2).is_empty(), "node 2 holds nothing");
        // A registration keeps the mark.
        let again =
            Command::RegisterNode { node_id: 2, addr: "127.0.0.1:9002".into(), peer_addr: None, key_hash: None };
        apply_next(&mut m, again).unwrap();
        assert!(m.nodes[&2].decommissioned);
    }

    #[test]
    fn replicas_and_leaders_spread_evenly() {
        let mut m = cluster(5);
        create(&mut m, "a", 7, 3).unwrap();
        create(&mut m, "b", 3, 3).unwrap();
        let mut leaders = BTreeMap::<NodeId, usize>::new();
        let mut replicas = BTreeMap::<NodeId, usize>::new();
        for t in m.topics.values() {
            for p in &t.partitions {
                *leaders.entry(p.replicas[0]).or_default() += 1;
                for r in &p.replicas {
                    *replicas.entry(*r).or_default() += 1;
                }
            }
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![2; 5]);
        assert_eq!(replicas.values().copied().collect::<Vec<_>>(), vec![6; 5]);
    }

    #[test]
    fn groups_are_allocated_once_and_never_reused() {
        let mut m = cluster(3);
        create(&mut m, "a", 2, 3).unwrap();
        let offset = m.applied_offset;
        m.apply(offset, &Command::DeleteTopic { name: "a".into() }).unwrap();
        create(&mut m, "a", 1, 1).unwrap();
        assert_eq!(m.topics["a"].partitions[0].group, 3);
        assert_eq!(m.next_group, 4);
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut m = cluster(3);
        create(&mut m, "a", 2, 3).unwrap();
        let before = m.clone();
        let cases = [
            Command::CreateTopic {
                name: "a".into(),
                replication_factor: 1,
                settings: TopicSettings::default(),
                assignment: vec![vec![1]],
            },
            Command::CreateTopic {
                name: "b".into(),
                replication_factor: 2,
                settings: TopicSettings::default(),
                assignment: vec![vec![1, 1]],
            },
            Command::CreateTopic {
                name: "b".into(),
                replication_factor: 1,
                settings: TopicSettings::default(),
                assignment: vec![vec![9]],
            },
            Command::CreateTopic {
                name: "b".into(),
                replication_factor: 1,
                settings: TopicSettings::default(),
                assignment: vec![],
            },
            Command::CreateTopic {
                name: "b/c".into(),
                replication_factor: 1,
                settings: TopicSettings::default(),
                assignment: vec![vec![1]],
            },
            Command::DeleteTopic { name: "nope".into() },
            Command::AddPartitions { name: "nope".into(), assignment: vec![vec![1, 2, 3]], partitions_before: None },
            Command::AddPartitions { name: "a".into(), assignment: vec![vec![1]], partitions_before: None },
            Command::AddPartitions { name: "a".into(), assignment: vec![vec![1, 2, 3]], partitions_before: Some(1) },
        ];
        for (i, c) in cases.iter().enumerate() {
            let offset = m.applied_offset;
            assert!(m.apply(offset, c).is_err(), "case {i} must be refused");
            assert_eq!(m.topics, before.topics, "case {i}");
            assert_eq!(m.next_group, before.next_group, "case {i}");
        }
    }

    #[test]
    fn replication_factors_are_odd() {
        for ok in [0, 1, 3, 5, 7] {
            validate_replication_factor(ok).unwrap();
        }
        for even in [2, 4, 6, u32::MAX - 1] {
            assert!(matches!(validate_replication_factor(even), Err(MetaError::Invalid(_))), "{even}");
        }
        let defaults: Vec<u32> = (0..=6).map(default_replication_factor).collect();
        assert_eq!(defaults, [1, 1, 1, 3, 3, 3, 3]);
        assert!(defaults.iter().all(|&rf| validate_replication_factor(rf).is_ok()));
    }

    #[test]
    fn replication_factor_beyond_nodes_is_refused() {
        let m = cluster(2);
        assert!(matches!(m.plan_assignment(1, 3), Err(MetaError::Precondition(_))));
        assert!(matches!(m.plan_assignment(1, 0), Err(MetaError::Invalid(_))));
    }

    #[test]
    fn topic_names() {
        for ok in ["a", "orders", "a.b_c-D9", &"x".repeat(249)] {
            validate_topic_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "__meta", "a b", "a/b", "é", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Every node must apply every `__meta` record, in order: one that skipped a record (it did
    /// not decode, or never arrived) would hold metadata no other node has. Such a replay is an
    /// error, and the metadata is left as it was before the record.
    #[test]
    fn replay_never_skips_a_record() {
        let register = |n: u64| {
            encode_command(&Command::RegisterNode {
                node_id: n,
                addr: format!("n{n}:1"),
                peer_addr: None,
                key_hash: None,
            })
        };
        let mut m = Metadata::new();
        assert_eq!(m.replay(0, &register(1)), Ok(None));
        assert_eq!(m.replay(1, &register(2)), Ok(None));
        assert_eq!(m.replay(0, &register(9)), Ok(None), "an applied offset again is ignored");
        assert_eq!(m.nodes.len(), 2);
        let delete = encode_command(&Command::DeleteTopic { name: "nope".into() });
        assert!(matches!(m.replay(2, &delete), Ok(Some(MetaError::UnknownTopic(_)))), "refused alike everywhere");
        assert_eq!(m.applied_offset, 3);

        let before = m.clone();
        for (offset, value) in [(3, &b"{\"op\":\"from_a_newer_version\"}"[..]), (3, b"")] {
            assert!(matches!(m.replay(offset, value), Err(ReplayError::Undecodable { offset: 3, .. })), "{value:?}");
            assert_eq!(m, before, "nothing applied");
        }
        assert_eq!(m.replay(5, &register(3)), Err(ReplayError::Gap { offset: 5, applied: 3 }));
        assert_eq!(m, before, "nothing applied");
        assert_eq!(m.replay(3, &register(3)), Ok(None));
        assert_eq!(m.applied_offset, 4);
    }

    /// The same AddPartitions proposed twice (or planned from a stale count) adds nothing the
    /// second time; records written before `partitions_before` existed still apply.
    #[test]
    fn add_partitions_applies_once() {
        let mut m = cluster(3);
        create(&mut m, "a", 1, 3).unwrap();
        let add = Command::AddPartitions {
            name: "a".into(),
            assignment: m.plan_assignment(2, 3).unwrap(),
            partitions_before: Some(1),
        };
        let offset = m.applied_offset;
        m.apply(offset, &add).unwrap();
        let after = m.clone();
        assert!(matches!(m.apply(offset + 1, &add), Err(MetaError::Precondition(_))));
        assert_eq!((m.topics.clone(), m.next_group), (after.topics, after.next_group));
        let old = br#"{"op":"add_partitions","name":"a","assignment":[[1,2,3]]}"#;
        assert!(matches!(decode_command(old), Ok(Command::AddPartitions { partitions_before: None, .. })));
        assert_eq!(m.replay(offset + 2, old), Ok(None));
        assert_eq!(m.topics["a"].partitions.len(), 4);
        assert!(!String::from_utf8(encode_command(&decode_command(old).unwrap())).unwrap().contains("before"));
    }

    #[test]
    fn commands_round_trip() {
        let commands = [
            Command::CreateTopic {
                name: "t".into(),
                replication_factor: 3,
                settings: TopicSettings { retention_ms: Some(5), ..TopicSettings::default() },
                assignment: vec![vec![1, 2, 3]],
            },
            Command::AllocateProducerIds { first: 0, count: 1 },
            Command::AllocateProducerIds { first: i64::MAX - 1, count: PRODUCER_IDS_PER_ALLOCATION_MAX },
        ];
        for c in commands {
            assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
        }
        assert!(decode_command(b"{\"op\":\"nope\"}").is_err());
        let written = br#"{"op":"allocate_producer_ids","first":2000,"count":1000}"#;
        assert_eq!(decode_command(written).unwrap(), Command::AllocateProducerIds { first: 2000, count: 1000 });
    }

    /// A stable identity keeps its id and takes the next epoch at each re-initialisation; ids of
    /// new identities come from the same counter as blocks; a stale or repeated plan changes
    /// nothing; epochs used up move the identity to a fresh id; the table is bounded.
    #[test]
    fn producer_identities_bump_their_epoch_once_per_init() {
        let mut m = cluster(3);
        m.apply(m.applied_offset, &Command::AllocateProducerIds { first: 0, count: 1000 }).unwrap();
        let first = m.plan_producer_identity("orders-writer", 0).unwrap();
        let offset = m.applied_offset;
        m.apply(offset, &first).unwrap();
        assert_eq!(m.producer_identities["orders-writer"].current, ProducerEpoch { producer_id: 1000, epoch: 0 });
        assert_eq!(m.next_producer_id, 1001, "one id of the shared counter");
        let before = m.clone();
        assert!(matches!(m.apply(offset + 1, &first), Err(MetaError::Precondition(_))), "applied once");
        assert_eq!(m.producer_identities, before.producer_identities);
        assert_eq!(m.next_producer_id, before.next_producer_id);

        let bump = m.plan_producer_identity("orders-writer", 0).unwrap();
        m.apply(offset + 2, &bump).unwrap();
        assert_eq!(m.producer_identities["orders-writer"].current, ProducerEpoch { producer_id: 1000, epoch: 1 });
        assert_eq!(m.next_producer_id, 1001, "a bump allocates no id");
        assert!(m.apply(offset + 3, &bump).is_err(), "a repeated bump is refused");
        assert!(m.apply(offset + 4, &Command::AllocateProducerIds { first: 1000, count: 1 }).is_err());

        // Forged commands: skipping an epoch, taking someone's id, a bad name.
        let forged = [
            Command::InitProducerIdentity {
                identity: "orders-writer".into(),
                previous: Some(ProducerEpoch { producer_id: 1000, epoch: 1 }),
                next: ProducerEpoch { producer_id: 1000, epoch: 3 },
                request_token: 0,
            },
            Command::InitProducerIdentity {
                identity: "other".into(),
                previous: None,
                next: ProducerEpoch { producer_id: 5, epoch: 0 },
                request_token: 0,
            },
            Command::InitProducerIdentity {
                identity: "x".repeat(PRODUCER_IDENTITY_BYTES_MAX + 1),
                previous: None,
                next: ProducerEpoch { producer_id: 1001, epoch: 0 },
                request_token: 0,
            },
            Command::InitProducerIdentity {
                identity: "a\nb".into(),
                previous: None,
                next: ProducerEpoch { producer_id: 1001, epoch: 0 },
                request_token: 0,
            },
        ];
        for (i, c) in forged.iter().enumerate() {
            let before = m.clone();
            assert!(m.apply(offset + 5 + i as u64, c).is_err(), "{c:?}");
            assert_eq!(
                (&m.producer_identities, m.next_producer_id),
                (&before.producer_identities, before.next_producer_id)
            );
        }
        assert!(m.plan_producer_identity("", 0).is_err());

        let mut worn = Metadata { next_producer_id: 7, ..Metadata::new() };
        worn.producer_identities.insert(
            "w".into(),
            IdentityHolder { current: ProducerEpoch { producer_id: 3, epoch: i16::MAX }, request_token: 0 },
        );
        let plan = worn.plan_producer_identity("w", 0).unwrap();
        worn.apply(0, &plan).unwrap();
        assert_eq!(worn.producer_identities["w"].current, ProducerEpoch { producer_id: 7, epoch: 0 });
        assert_eq!(worn.next_producer_id, 8);

        let mut full = Metadata::new();
        for i in 0..PRODUCER_IDENTITIES_MAX {
            full.producer_identities.insert(
                format!("p{i}"),
                IdentityHolder { current: ProducerEpoch { producer_id: i as i64, epoch: 0 }, request_token: 0 },
            );
        }
        assert!(matches!(full.plan_producer_identity("one-more", 0), Err(MetaError::Exhausted(_))));
        assert!(full.plan_producer_identity("p7", 0).is_ok(), "a known identity is re-initialised when full");
        let sneaked = Command::InitProducerIdentity {
            identity: "one-more".into(),
            previous: None,
            next: ProducerEpoch { producer_id: 0, epoch: 0 },
            request_token: 0,
        };
        assert!(matches!(full.apply(0, &sneaked), Err(MetaError::Exhausted(_))));
        let c = Command::InitProducerIdentity {
            identity: "w".into(),
            previous: Some(ProducerEpoch { producer_id: 3, epoch: 4 }),
            next: ProducerEpoch { producer_id: 3, epoch: 5 },
            request_token: 77,
        };
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
    }

    /// Blocks follow one another from 0; the same proposal applied twice (a retry, or a deposed
    /// leader's) is refused the second time and allocates nothing.
    #[test]
    fn producer_ids_are_allocated_once() {
        let mut m = cluster(3);
        assert_eq!(m.next_producer_id, 0, "a log without allocations starts at 0");
        let first = Command::AllocateProducerIds { first: 0, count: 1000 };
        let offset = m.applied_offset;
        m.apply(offset, &first).unwrap();
        assert_eq!(m.next_producer_id, 1000);
        assert!(matches!(m.apply(offset + 1, &first), Err(MetaError::Precondition(_))));
        assert_eq!(m.next_producer_id, 1000);
        m.apply(offset + 2, &Command::AllocateProducerIds { first: 1000, count: 1 }).unwrap();
        assert_eq!(m.next_producer_id, 1001);
        // Replayed from the log, the refused record is refused again: every node agrees.
        let mut replayed = cluster(3);
        for (i, c) in [first.clone(), first, Command::AllocateProducerIds { first: 1000, count: 1 }].iter().enumerate()
        {
            let refusal = replayed.replay(offset + i as u64, &encode_command(c)).unwrap();
            assert_eq!(refusal.is_some(), i == 1, "record {i}");
        }
        assert_eq!(replayed, m);
    }

    #[test]
    fn producer_id_allocations_are_bounded() {
        let max = PRODUCER_IDS_PER_ALLOCATION_MAX;
        let cases = [
            (0, 0, 0, "no ids"),
            (0, 0, max + 1, "too many ids"),
            (0, 5, 10, "ahead of the next id"),
            (10, 5, 10, "behind the next id"),
            (0, -1, 10, "negative"),
            (i64::MAX - 5, i64::MAX - 5, 6, "past i64::MAX"),
        ];
        for (next, first, count, why) in cases {
            let mut m = Metadata { next_producer_id: next, ..Metadata::new() };
            let before = m.clone();
            assert!(m.apply(0, &Command::AllocateProducerIds { first, count }).is_err(), "{why}");
            assert_eq!(m.next_producer_id, before.next_producer_id, "{why}");
        }
        let mut m = Metadata::new();
        m.apply(0, &Command::AllocateProducerIds { first: 0, count: max }).unwrap();
        assert_eq!(m.next_producer_id, i64::from(max));
        // The last block may end exactly at i64::MAX: its ids stay below it.
        let mut m = Metadata { next_producer_id: i64::MAX - 5, ..Metadata::new() };
        m.apply(0, &Command::AllocateProducerIds { first: i64::MAX - 5, count: 5 }).unwrap();
        assert_eq!(m.next_producer_id, i64::MAX);
        let refused = m.apply(1, &Command::AllocateProducerIds { first: i64::MAX, count: 1 });
        assert!(matches!(refused, Err(MetaError::Precondition(_))), "{refused:?}");
    }
}
