//! The invariants every simulated workload checks, one function each, over a Jepsen-style
//! history of client operations and the final state of every replica; and the white-box probes
//! they need (what a node's disk holds durably, what a replica has committed).
//!
//! A "partition" here is one replicated log: a raft group of the `cluster` workload, a topic
//! partition of the `broker` workload. Values are unique per write, so a value names its write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use keel_raft::{GroupId, NodeId, RaftNode};
use keel_storage::SimDisk;

/// How one client write ended, as in Jepsen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged at this offset.
    Ok(u64),
    /// Definitely not written.
    Fail,
    /// May or may not have been written.
    Info,
}

/// One client write: invoked with `value` on `partition`, completed with `outcome` (`None`
/// while it is still in flight).
#[derive(Debug, Clone)]
pub struct Op {
    /// The log written to.
    pub partition: u64,
    /// The unique value written.
    pub value: String,
    /// How it ended.
    pub outcome: Option<Outcome>,
}

/// A log's records as `(offset, value)`, in offset order.
pub type Records = Vec<(u64, String)>;

/// White-box, at the moment of an ack: on how many of the disks the record at `offset` of the
/// partition in `dir` holds `value` durably (as it would be found after a power loss right now).
pub fn durable_copies(disks: &[SimDisk], dir: &Path, offset: u64, value: &str) -> usize {
    disks
        .iter()
        .filter(|disk| {
            disk.durable_files(dir)
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .any(|path| disk.durable_bytes(path).is_some_and(|bytes| holds(Bytes::from(bytes), offset, value)))
        })
        .count()
}

/// White-box: on how many disks some record of the partition in `dir` that satisfies `wanted`
/// is durable (for records whose offset the client cannot know, such as a group's commits).
/// Segments are searched newest first: what a client just learnt of is near the end.
pub fn durable_records(disks: &[SimDisk], dir: &Path, wanted: impl Fn(&keel_coordinator::Record) -> bool) -> usize {
    disks
        .iter()
        .filter(|disk| {
            let mut segments: Vec<_> =
                disk.durable_files(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
            segments.sort_unstable_by(|a, b| b.cmp(a));
            segments.iter().any(|path| {
                disk.durable_bytes(path).is_some_and(|bytes| {
                    batches_of(Bytes::from(bytes)).iter().any(|batch| {
                        batch.records().filter_map(Result::ok).any(|r| wanted(&keel_coordinator::Record::from(r)))
                    })
                })
            })
        })
        .count()
}

/// The batches of a segment file, from the header up to the first that does not decode.
fn batches_of(bytes: Bytes) -> Vec<keel_record::Batch> {
    let mut out = Vec::new();
    let mut pos = keel_storage::segment::SEGMENT_HEADER_BYTES as usize;
    while pos < bytes.len() {
        let Ok((batch, len)) = keel_record::Batch::split_first(&bytes.slice(pos..)) else { break };
        out.push(batch);
        pos += len;
    }
    out
}

/// Whether a segment file's bytes hold `value` at `offset`. Batches are walked from the segment
/// header up to the first one that does not decode (the torn or unwritten tail).
fn holds(bytes: Bytes, offset: u64, value: &str) -> bool {
    let mut pos = keel_storage::segment::SEGMENT_HEADER_BYTES as usize;
    while pos < bytes.len() {
        let Ok((batch, len)) = keel_record::Batch::split_first(&bytes.slice(pos..)) else { return false };
        let header = batch.header();
        if header.base_offset <= offset && offset < header.next_offset() && header.record_count > 0 {
            let found = batch.records().filter_map(Result::ok).find(|r| r.offset == offset).and_then(|r| r.value);
            if found.as_deref() == Some(value.as_bytes()) {
                return true;
            }
        }
        pos += len;
    }
    false
}

/// Every committed record a node holds for a group, in offset order, from its log start.
pub fn read_committed(node: &RaftNode, group: GroupId) -> Result<Records, String> {
    Ok(read_committed_stamped(node, group)?.into_iter().map(|(offset, value, _)| (offset, value)).collect())
}

/// A committed record: its offset, its value and the producer id and epoch of its batch (`None`:
/// written without one).
pub type Stamped = (u64, String, Option<(i64, i16)>);

/// [`read_committed`] with each record's producer id and epoch.
pub fn read_committed_stamped(node: &RaftNode, group: GroupId) -> Result<Vec<Stamped>, String> {
    let store = node.store(group).map_err(|e| e.to_string())?;
    let (start, _, _) = store.positions();
    let high_watermark = *store.high_watermark().borrow();
    let mut out = Vec::new();
    let mut next = start.offset;
    while next < high_watermark {
        let batches = store.read_committed(next, 1 << 20).map_err(|e| e.to_string())?;
        if batches.is_empty() {
            return Err(format!("nothing readable at {next} below the high watermark {high_watermark}"));
        }
        for b in batches {
            if b.header().base_offset != next {
                return Err(format!("offsets not dense: expected {next}, found {}", b.header().base_offset));
            }
            let producer = Some((b.header().producer_id, b.header().producer_epoch)).filter(|(id, _)| *id >= 0);
            for r in b.records() {
                let r = r.map_err(|e| e.to_string())?;
                out.push((r.offset, text(r.value.as_deref()), producer));
            }
            next = b.header().next_offset();
        }
    }
    Ok(out)
}

/// Which producer instance wrote a value: the value up to its last `-` (`p3-17` -> `p3`;
/// `p0.1-4` -> `p0.1`, the successor of `p0`; `final-2-0` -> `final-2`: the liveness phase
/// writes with one producer).
fn writer(value: &str) -> &str {
    let writer = value.rsplit_once('-').map_or(value, |(w, _)| w);
    if writer.starts_with("final-") { "final" } else { writer }
}

/// The identity an instance claims: instances `p0`, `p0.1`, `p0.2` are one identity, `p0`.
fn identity(writer: &str) -> &str {
    writer.split_once('.').map_or(writer, |(identity, _)| identity)
}

/// Who holds producer ids and epochs, collected over every partition's log by
/// [`check_producer_ids_unique`]: where each was first seen, for the report.
#[derive(Debug, Default)]
pub struct ProducerOwners {
    /// id -> the identity first seen with it, and where.
    ids: BTreeMap<i64, (String, u64, u64)>,
    /// (id, epoch) -> the instance first seen with it, and where.
    epochs: BTreeMap<(i64, i16), (String, u64, u64)>,
}

/// Producer ids and epochs are never shared, and epochs only grow:
/// - an id belongs to one identity (InitProducerId gives each fresh id once; an id shared by two
///   producers makes their sequences collide, and the leader answers one producer's batch with
///   the other's offsets);
/// - an (id, epoch) belongs to one instance (a successor that takes over an identity gets a new
///   epoch, or the zombie it replaces writes on as if it were the successor);
/// - on each partition an id's epochs never go down in log order (a batch of an older epoch after
///   a newer one is a zombie's write that the leader should have fenced).
pub fn check_producer_ids_unique(
    partition: u64,
    records: &[Stamped],
    owners: &mut ProducerOwners,
) -> Result<(), String> {
    let mut latest: BTreeMap<i64, (i16, u64)> = BTreeMap::new();
    for (offset, value, producer) in records {
        let Some((id, epoch)) = *producer else { continue };
        let instance = writer(value);
        let who = identity(instance);
        let (owner, p, o) = owners.ids.entry(id).or_insert_with(|| (who.to_owned(), partition, *offset));
        if owner != who {
            return Err(format!(
                "producer id {id} was given to two producers: {owner} (partition {p} offset {o}) and {who} (partition {partition} offset {offset}, {value:?})"
            ));
        }
        let (holder, p, o) =
            owners.epochs.entry((id, epoch)).or_insert_with(|| (instance.to_owned(), partition, *offset));
        if holder != instance {
            return Err(format!(
                "producer id {id} epoch {epoch} was held by two instances of {who}: {holder} (partition {p} offset {o}) and {instance} (partition {partition} offset {offset}, {value:?})"
            ));
        }
        let (newest, at) = latest.entry(id).or_insert((epoch, *offset));
        if epoch < *newest {
            return Err(format!(
                "a zombie's write was not fenced: partition {partition} offset {offset} ({value:?}) has producer id {id} epoch {epoch}, after epoch {newest} at offset {at}"
            ));
        }
        (*newest, *at) = (epoch, *offset);
    }
    Ok(())
}

/// A record value as the history writes it (values are ASCII; anything else is shown lossily).
pub fn text(value: Option<&[u8]>) -> String {
    value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

/// The high watermark of every (node, boot, group, generation of the copy) seen so far: it must
/// never move backwards within one boot of a node (a restart recomputes it from the log, which
/// may start lower) and one copy (a partition that returns to a node starts a new copy, empty).
#[derive(Debug, Default)]
pub struct HighWatermarks {
    seen: BTreeMap<(NodeId, u64, GroupId, u32), u64>,
}

impl HighWatermarks {
    /// Forgets a group a node no longer hosts: a partition moved off and back again starts
    /// that replica over, empty.
    pub fn forget(&mut self, node: NodeId, boot: u64, group: GroupId) {
        self.seen.retain(|(n, b, g, _), _| (*n, *b, *g) != (node, boot, group));
    }

    /// Records a sample of copy `generation`; returns the violation if it went backwards.
    pub fn observe(
        &mut self,
        node: NodeId,
        boot: u64,
        group: GroupId,
        generation: u32,
        high_watermark: u64,
    ) -> Option<String> {
        let last = self.seen.entry((node, boot, group, generation)).or_insert(high_watermark);
        let violation = (high_watermark < *last).then(|| {
            format!(
                "n{node} (boot {boot}) group {group} (copy {generation}): high watermark went back from {last} to \
                 {high_watermark}"
            )
        });
        *last = high_watermark;
        violation
    }
}

/// No inconsistent offsets: replicas agree on every offset they both hold.
pub fn check_replicas_agree(partition: u64, replicas: &BTreeMap<NodeId, Records>) -> Result<(), String> {
    let mut by_offset: BTreeMap<u64, (NodeId, &String)> = BTreeMap::new();
    for (id, records) in replicas {
        for (offset, value) in records {
            match by_offset.get(offset) {
                Some((other, v)) if *v != value => {
                    return Err(format!(
                        "partition {partition}: offset {offset} is {v:?} on n{other} but {value:?} on n{id}"
                    ));
                }
                Some(_) => {}
                None => {
                    by_offset.insert(*offset, (*id, value));
                }
            }
        }
    }
    Ok(())
}

/// No lost write: every acknowledged write is readable at its acknowledged offset.
pub fn check_no_lost_write(partition: u64, ops: &[&Op], records: &[(u64, String)]) -> Result<(), String> {
    let at: BTreeMap<u64, &String> = records.iter().map(|(o, v)| (*o, v)).collect();
    for op in ops {
        if let Some(Outcome::Ok(offset)) = op.outcome {
            match at.get(&offset) {
                Some(v) if **v == op.value => {}
                Some(v) => {
                    return Err(format!(
                        "partition {partition}: lost write: {} was acked at {offset}, which holds {v:?}",
                        op.value
                    ));
                }
                None => {
                    return Err(format!(
                        "partition {partition}: lost write: {} was acked at {offset}, which no replica holds",
                        op.value
                    ));
                }
            }
        }
    }
    Ok(())
}

/// No duplicates: every value is written once by the client, so it appears at most once.
pub fn check_no_duplicates(partition: u64, records: &[(u64, String)]) -> Result<(), String> {
    let mut seen: BTreeMap<&String, u64> = BTreeMap::new();
    for (offset, value) in records {
        if let Some(first) = seen.insert(value, *offset) {
            return Err(format!("partition {partition}: {value:?} appears at {first} and at {offset}"));
        }
    }
    Ok(())
}

/// Records that repeat an earlier record's value: retries of a write whose answer was lost
/// (allowed without the idempotent producer, and counted).
pub fn count_duplicates(records: &[(u64, String)]) -> u64 {
    let mut seen: BTreeSet<&String> = BTreeSet::new();
    records.iter().filter(|(_, value)| !seen.insert(value)).count() as u64
}

/// No aborted reads: a definitely failed write is never read.
pub fn check_no_aborted_reads(partition: u64, ops: &[&Op], records: &[(u64, String)]) -> Result<(), String> {
    let failed: BTreeSet<&String> = ops.iter().filter(|o| o.outcome == Some(Outcome::Fail)).map(|o| &o.value).collect();
    for (offset, value) in records {
        if failed.contains(value) {
            return Err(format!("partition {partition}: {value:?} definitely failed, yet is read at {offset}"));
        }
    }
    Ok(())
}

/// What a consumer read during the run agrees with the final committed state, offset by
/// offset: nothing it was served was later lost or replaced.
pub fn check_consumer_saw_committed(
    partition: u64,
    seen: &BTreeMap<u64, String>,
    records: &[(u64, String)],
) -> Result<(), String> {
    let at: BTreeMap<u64, &String> = records.iter().map(|(o, v)| (*o, v)).collect();
    for (offset, value) in seen {
        match at.get(offset) {
            Some(v) if *v == value => {}
            other => {
                return Err(format!(
                    "partition {partition}: a consumer read {value:?} at {offset}, which finally holds {other:?}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(value: &str, outcome: Outcome) -> Op {
        Op { partition: 0, value: value.into(), outcome: Some(outcome) }
    }

    fn records(values: &[&str]) -> Records {
        values.iter().enumerate().map(|(i, v)| (i as u64, (*v).to_owned())).collect()
    }

    /// Every invariant must be able to fail: each gets a history that breaks it.
    #[test]
    fn each_check_can_fail() {
        let log = records(&["a", "b", "a"]);
        let (acked, lost, failed) = (op("b", Outcome::Ok(1)), op("c", Outcome::Ok(3)), op("b", Outcome::Fail));
        assert!(check_no_lost_write(0, &[&acked], &log).is_ok());
        assert!(check_no_lost_write(0, &[&lost], &log).is_err());
        assert!(check_no_lost_write(0, &[&op("b", Outcome::Ok(0))], &log).is_err(), "acked at another offset");
        assert!(check_no_aborted_reads(0, &[&acked], &log).is_ok());
        assert!(check_no_aborted_reads(0, &[&failed], &log).is_err());
        assert!(check_no_duplicates(0, &log[..2]).is_ok());
        assert!(check_no_duplicates(0, &log).is_err());
        assert_eq!(count_duplicates(&log), 1);
        let mut replicas = BTreeMap::from([(1, log.clone()), (2, records(&["a", "b"]))]);
        assert!(check_replicas_agree(0, &replicas).is_ok());
        replicas.insert(3, records(&["a", "x"]));
        assert!(check_replicas_agree(0, &replicas).is_err());
        let seen = BTreeMap::from([(0, "a".to_owned()), (1, "b".to_owned())]);
        assert!(check_consumer_saw_committed(0, &seen, &log).is_ok());
        assert!(check_consumer_saw_committed(0, &seen, &records(&["a"])).is_err(), "read, then lost");
        let mut hw = HighWatermarks::default();
        assert!(hw.observe(1, 1, 1, 0, 5).is_none());
        assert!(hw.observe(1, 2, 1, 0, 3).is_none(), "a new boot starts over");
        assert!(hw.observe(1, 2, 1, 0, 2).is_some());
        assert!(hw.observe(1, 2, 1, 1, 0).is_none(), "a new copy of the group starts over");
        let stamped = |v: &[(&str, Option<(i64, i16)>)]| -> Vec<Stamped> {
            v.iter().enumerate().map(|(i, (v, p))| (i as u64, (*v).to_owned(), *p)).collect()
        };
        let mut owners = ProducerOwners::default();
        let fine = stamped(&[
            ("p1-0", Some((4, 0))),
            ("p2-0", Some((5, 0))),
            ("final-0-0", Some((6, 0))),
            ("final-1-3", Some((6, 0))),
            ("p1.1-0", Some((4, 1))),
        ]);
        assert!(check_producer_ids_unique(0, &fine, &mut owners).is_ok());
        let more = stamped(&[("p1-1", Some((4, 0))), ("x", None), ("p1.1-1", Some((4, 1)))]);
        assert!(check_producer_ids_unique(1, &more, &mut owners).is_ok(), "epochs grow on each partition");
        let other = stamped(&[("p3-0", Some((4, 0)))]);
        assert!(check_producer_ids_unique(2, &other, &mut owners).unwrap_err().contains("two producers"));
        let shared = stamped(&[("p1.2-0", Some((4, 1)))]);
        assert!(check_producer_ids_unique(3, &shared, &mut owners).unwrap_err().contains("two instances"));
        let zombie = stamped(&[("p1.1-2", Some((4, 1))), ("p1-2", Some((4, 0)))]);
        assert!(check_producer_ids_unique(4, &zombie, &mut owners).unwrap_err().contains("not fenced"));
    }
}
