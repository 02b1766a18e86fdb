//! The records of `__consumer_offsets`: what each key names and how values are encoded. Keys are
//! `kind \0 group [\0 ...]`, so every record of a group starts with its name and a rewrite of one
//! group never touches another's keys. Values are JSON: they never leave the cluster's own log,
//! and JSON keeps the partition readable with `keel consume __consumer_offsets`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Record;
pub use crate::publish::{Publish, PublishHeader, Publisher};

/// A topic partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tp {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

impl Tp {
    /// A topic partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> Tp {
        Tp { topic: topic.into(), partition }
    }
}

impl std::fmt::Display for Tp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The group's own record: its epoch and what the assignment was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Bumped on every change of membership, subscriptions or subscribed topics' partitions.
    pub epoch: i32,
    /// The assignor, fixed by the first member.
    pub assignor: String,
    /// Partition counts of the subscribed topics when the epoch was bumped: a change (a topic
    /// created, partitions added) bumps the epoch again.
    pub topics: BTreeMap<String, u32>,
    /// When the group last became empty (coordinator clock), for offset retention.
    pub empty_since_ms: Option<i64>,
}

/// A member as the log remembers it (heartbeat deadlines are volatile and live in the runtime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Chosen by the client at its first join.
    pub member_id: String,
    /// Static membership id.
    pub instance_id: Option<String>,
    /// The client's name for itself.
    pub client_id: String,
    /// Where the member connected from.
    pub host: String,
    /// Subscribed topics.
    pub subscribed: BTreeSet<String>,
    /// Session timeout granted.
    pub session_timeout_ms: u32,
    /// How long it may take to revoke partitions.
    pub rebalance_timeout_ms: u32,
    /// The member's epoch (0 until its first assignment).
    pub epoch: i32,
    /// The epoch before the last bump: a heartbeat whose answer was lost may still carry it.
    pub previous_epoch: i32,
    /// Partitions it may consume, each with the epoch it was assigned at.
    #[serde(with = "tp_map")]
    pub assigned: BTreeMap<Tp, i32>,
    /// Partitions it was asked to give up and still owns, with their assignment epochs.
    #[serde(with = "tp_map")]
    pub revoking: BTreeMap<Tp, i32>,
    /// A static member that left for a while (epoch -2): its partitions wait for it.
    pub away: bool,
}

/// JSON objects need string keys: a map keyed by partition is stored as a list of pairs.
mod tp_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Tp;

    pub fn serialize<S: Serializer>(map: &BTreeMap<Tp, i32>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Tp, i32>, D::Error> {
        Ok(Vec::<(Tp, i32)>::deserialize(d)?.into_iter().collect())
    }
}

impl Member {
    /// Whether the member owns `tp` now (assigned or still revoking), and since which epoch.
    pub fn owns(&self, tp: &Tp) -> Option<i32> {
        self.assigned.get(tp).or_else(|| self.revoking.get(tp)).copied()
    }
}

/// The target assignment the members reconcile towards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The group epoch it was computed at.
    pub epoch: i32,
    /// Partitions per member.
    pub members: BTreeMap<String, BTreeSet<Tp>>,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next offset to consume.
    pub offset: u64,
    /// Client metadata.
    pub metadata: String,
    /// Coordinator clock at commit.
    pub commit_timestamp_ms: i64,
    /// Who committed it, at which epoch ("" and -1 for a reset or a group without members):
    /// an audit of the partition can check every commit against the ownership of its time.
    #[serde(default)]
    pub member_id: String,
    /// The committing member's epoch.
    #[serde(default)]
    pub member_epoch: i32,
    /// The partition's high watermark as the coordinator knew it at the commit (at least the
    /// offset): the lag at each commit is what the consumer-status rules judge (`lag.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<u64>,
}

/// Where a failed record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedeliveryState {
    /// Waiting for its next attempt (due at `due_at_ms`).
    Pending,
    /// Acknowledged on a redelivery: never dead-lettered.
    Resolved,
    /// Sent to the dead-letter topic (once: a `Publish` decision records it).
    DeadLettered,
}

/// A record that failed: its attempts so far and what comes next. Attempt counts and due times
/// are raft records, so a leader change or a restart replays them and never resets them. A
/// settled entry (resolved or dead-lettered) stays until the group's commit passes its offset,
/// so a retried nack is recognised instead of starting over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redelivery {
    /// Failed attempts recorded (the next attempt is number `attempts + 1`).
    pub attempts: u32,
    /// The policy fixed at the first failure.
    pub max_attempts: u32,
    /// Backoff bounds of the policy.
    pub backoff_min_ms: u32,
    /// Backoff bounds of the policy.
    pub backoff_max_ms: u32,
    /// When the next attempt is due (coordinator clock).
    pub due_at_ms: i64,
    /// When the first attempt failed.
    pub first_failure_ms: i64,
    /// The last failure's reason as the consumer gave it.
    pub last_error: String,
    /// Pending, resolved or dead-lettered.
    pub state: RedeliveryState,
}

/// What one record of a group sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRecord {
    /// The group's metadata; `None` deletes the group.
    Meta(String, Option<GroupMeta>),
    /// A member; `None` removes it.
    Member(String, String, Option<Member>),
    /// The target assignment; `None` removes it.
    Target(String, Option<Target>),
    /// A committed offset; `None` removes it.
    Offset(String, Tp, Option<Committed>),
    /// A failed record's redelivery state; `None` removes it.
    Redelivery(String, Tp, u64, Option<Redelivery>),
    /// The publisher identity for a target partition; `None` removes it.
    Publisher(String, Tp, Option<Publisher>),
    /// A publish decision `(epoch, sequence)` for a target partition; `None` confirms it.
    Publish(String, Tp, (i16, i32), Option<Publish>),
    /// Offsets of the group's dead-letter topic already replayed, as `[start, end)` ranges.
    Replayed(String, Option<Vec<(u64, u64)>>),
}

const META: u8 = b'g';
const MEMBER: u8 = b'm';
const TARGET: u8 = b't';
const OFFSET: u8 = b'o';
const REDELIVERY: u8 = b'r';
const PUBLISHER: u8 = b'p';
const PUBLISH: u8 = b'd';
const REPLAYED: u8 = b'x';
/// Parts of a key after its kind: group, topic, partition and offset (or stamp) at most.
const KEY_PARTS_MAX: usize = 4;

fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn value<T: Serialize>(v: &Option<T>) -> Option<Vec<u8>> {
    // Serializing plain structs of strings, integers and maps with string keys cannot fail.
    v.as_ref().map(|v| serde_json::to_vec(v).unwrap_or_default())
}

impl GroupRecord {
    /// The group this record belongs to.
    pub fn group(&self) -> &str {
        match self {
            GroupRecord::Meta(g, _) | GroupRecord::Member(g, _, _) | GroupRecord::Target(g, _) => g,
            GroupRecord::Offset(g, _, _)
            | GroupRecord::Redelivery(g, _, _, _)
            | GroupRecord::Publisher(g, _, _)
            | GroupRecord::Publish(g, _, _, _)
            | GroupRecord::Replayed(g, _) => g,
        }
    }

    /// Encodes it as a key/value record.
    pub fn encode(&self) -> Record {
        match self {
            GroupRecord::Meta(g, v) => Record { key: key(META, &[g]), value: value(v) },
            GroupRecord::Member(g, m, v) => Record { key: key(MEMBER, &[g, m]), value: value(v) },
            GroupRecord::Target(g, v) => Record { key: key(TARGET, &[g]), value: value(v) },
            GroupRecord::Offset(g, tp, v) => {
                Record { key: key(OFFSET, &[g, &tp.topic, &tp.partition.to_string()]), value: value(v) }
            }
            GroupRecord::Redelivery(g, tp, offset, v) => Record {
                key: key(REDELIVERY, &[g, &tp.topic, &tp.partition.to_string(), &format!("{offset:020}")]),
                value: value(v),
            },
            GroupRecord::Publisher(g, tp, v) => {
                Record { key: key(PUBLISHER, &[g, &tp.topic, &tp.partition.to_string()]), value: value(v) }
            }
            GroupRecord::Publish(g, tp, (epoch, sequence), v) => Record {
                // Zero-padded, so that a publisher's decisions sort in the order they are sent.
                key: key(PUBLISH, &[g, &tp.topic, &tp.partition.to_string(), &format!("{epoch:05}.{sequence:010}")]),
                value: value(v),
            },
            GroupRecord::Replayed(g, v) => Record { key: key(REPLAYED, &[g]), value: value(v) },
        }
    }

    /// Decodes a key/value record.
    pub fn decode(record: &Record) -> Result<GroupRecord, String> {
        let (&kind, rest) = record.key.split_first().ok_or("empty key")?;
        let rest = rest.strip_prefix(&[0u8]).ok_or("key has no group")?;
        let text = std::str::from_utf8(rest).map_err(|_| "key is not UTF-8".to_owned())?;
        // One split more than a key may have is enough to tell it has too many: a key of many
        // separators must not become a vector of as many slices.
        let parts: Vec<&str> = text.splitn(KEY_PARTS_MAX + 1, '\0').collect();
        fn parse<T: for<'a> Deserialize<'a>>(v: &Option<Vec<u8>>) -> Result<Option<T>, String> {
            v.as_deref().map(|b| serde_json::from_slice(b).map_err(|e| format!("bad value: {e}"))).transpose()
        }
        match (kind, parts.as_slice()) {
            (META, [g]) => Ok(GroupRecord::Meta((*g).to_owned(), parse(&record.value)?)),
            (MEMBER, [g, m]) => Ok(GroupRecord::Member((*g).to_owned(), (*m).to_owned(), parse(&record.value)?)),
            (TARGET, [g]) => Ok(GroupRecord::Target((*g).to_owned(), parse(&record.value)?)),
            (OFFSET, [g, t, p]) => {
                let partition = p.parse().map_err(|_| format!("bad partition {p:?}"))?;
                Ok(GroupRecord::Offset((*g).to_owned(), Tp::new(*t, partition), parse(&record.value)?))
            }
            (REDELIVERY, [g, t, p, o]) => {
                let partition = p.parse().map_err(|_| format!("bad partition {p:?}"))?;
                let offset = o.parse().map_err(|_| format!("bad offset {o:?}"))?;
                Ok(GroupRecord::Redelivery((*g).to_owned(), Tp::new(*t, partition), offset, parse(&record.value)?))
            }
            (REPLAYED, [g]) => Ok(GroupRecord::Replayed((*g).to_owned(), parse(&record.value)?)),
            (PUBLISHER, [g, t, p]) => {
                let partition = p.parse().map_err(|_| format!("bad partition {p:?}"))?;
                Ok(GroupRecord::Publisher((*g).to_owned(), Tp::new(*t, partition), parse(&record.value)?))
            }
            (PUBLISH, [g, t, p, stamp]) => {
                let partition = p.parse().map_err(|_| format!("bad partition {p:?}"))?;
                let (e, s) = stamp.split_once('.').ok_or_else(|| format!("bad stamp {stamp:?}"))?;
                let epoch = e.parse().map_err(|_| format!("bad epoch {e:?}"))?;
                let sequence = s.parse().map_err(|_| format!("bad sequence {s:?}"))?;
                Ok(GroupRecord::Publish(
                    (*g).to_owned(),
                    Tp::new(*t, partition),
                    (epoch, sequence),
                    parse(&record.value)?,
                ))
            }
            _ if parts.len() > KEY_PARTS_MAX => Err(format!("key of kind {kind} has more than {KEY_PARTS_MAX} parts")),
            _ => Err(format!("unknown key kind {kind} with {} parts", parts.len())),
        }
    }
}
