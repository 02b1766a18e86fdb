//! Every conversion between Keel's protobuf messages, openraft's types and the on-disk batch
//! encoding of raft entries lives here, in one place.
//!
//! A raft entry is stored and sent as one record batch (the raft log IS the partition log): a
//! normal entry is the producer's batch, stamped with its offset, term and index; a blank or
//! membership entry is a raft-only batch (no records, no offsets) whose payload starts with a tag
//! byte (0 blank, 1 membership) followed by the encoded `Membership` message.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use keel_proto::bounded;
use keel_proto::v1 as pb;
use keel_record::Batch;
use openraft::EntryPayload;
use prost::Message;

use crate::types::{BatchData, Entry, KeelRaft, LogId, Membership, Node, SnapshotMeta, StoredMembership, Vote, log_id};

/// A message that cannot become a valid openraft value.
#[derive(Debug, thiserror::Error)]
#[error("invalid message: {0}")]
pub struct ConvertError(pub String);

fn invalid(what: impl Into<String>) -> ConvertError {
    ConvertError(what.into())
}

const TAG_BLANK: u8 = 0;
const TAG_MEMBERSHIP: u8 = 1;

/// Encodes an entry as the batch that goes on disk and on the wire, stamped with `base_offset`.
pub fn entry_to_batch(entry: &Entry, base_offset: u64) -> Result<Vec<u8>, ConvertError> {
    let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
    match &entry.payload {
        EntryPayload::Normal(BatchData(bytes)) => {
            let mut buf = bytes.to_vec();
            let header = keel_record::stamp(&mut buf, base_offset, term, index).map_err(|e| invalid(e.to_string()))?;
            if header.attributes.is_raft_entry() {
                return Err(invalid("a normal entry must carry a data batch"));
            }
            Ok(buf)
        }
        EntryPayload::Blank => keel_record::raft_entry(&[TAG_BLANK], term, index, base_offset)
            .map(|b| b.to_vec())
            .map_err(|e| invalid(e.to_string())),
        EntryPayload::Membership(m) => {
            let mut payload = vec![TAG_MEMBERSHIP];
            membership_to_pb(m).encode(&mut payload).map_err(|e| invalid(e.to_string()))?;
            keel_record::raft_entry(&payload, term, index, base_offset)
                .map(|b| b.to_vec())
                .map_err(|e| invalid(e.to_string()))
        }
    }
}

/// About the bytes [`entry_to_batch`] stores for `entry`: exact for data batches, a generous
/// bound for raft's own small entries. It only decides where an append runs.
pub fn entry_bytes(entry: &Entry) -> u64 {
    match &entry.payload {
        EntryPayload::Normal(BatchData(bytes)) => bytes.len() as u64,
        EntryPayload::Blank | EntryPayload::Membership(_) => 4_096,
    }
}

/// Decodes a stored or received batch back into the raft entry it carries.
pub fn batch_to_entry(batch: &Batch) -> Result<Entry, ConvertError> {
    let h = batch.header();
    let log_id = log_id(h.raft_term, h.raft_index);
    let payload = if h.attributes.is_raft_entry() {
        let body = batch.raft_payload();
        match body.first() {
            Some(&TAG_BLANK) if body.len() == 1 => EntryPayload::Blank,
            Some(&TAG_MEMBERSHIP) => {
                // Counted before prost allocates it, as a request is: an empty node is 2 bytes on
                // the wire and a 32-byte struct decoded, and an entry may hold 16 MiB.
                let m =
                    bounded::decode::<pb::Membership>(&body[1..]).map_err(|e| invalid(format!("membership: {e}")))?;
                EntryPayload::Membership(membership_from_pb(m)?)
            }
            _ => return Err(invalid("unknown raft entry payload")),
        }
    } else {
        EntryPayload::Normal(BatchData(batch.bytes().clone()))
    };
    Ok(Entry { log_id, payload })
}

/// Decodes entries received from a peer: each must be a valid batch.
pub fn entries_from_pb(entries: Vec<Bytes>) -> Result<Vec<Entry>, ConvertError> {
    entries
        .into_iter()
        .map(|bytes| {
            let batch = Batch::from_bytes(bytes).map_err(|e| invalid(format!("entry: {e}")))?;
            batch_to_entry(&batch)
        })
        .collect()
}

/// Encodes entries for a peer. Normal entries are sent as the leader holds them; offsets are a
/// function of the log prefix, so each follower stamps its own (identical) ones on append.
pub fn entries_to_pb(entries: &[Entry]) -> Result<Vec<Bytes>, ConvertError> {
    entries
        .iter()
        .map(|e| {
            // Entries read back from the log already carry their term and index: send those
            // bytes as they are, without a copy.
            if let EntryPayload::Normal(BatchData(bytes)) = &e.payload
                && let Ok(h) = keel_record::check(bytes)
                && h.raft_term == e.log_id.leader_id.term
                && h.raft_index == e.log_id.index
            {
                return Ok(bytes.clone());
            }
            entry_to_batch(e, 0).map(Bytes::from)
        })
        .collect()
}

/// openraft → proto.
pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId { term: id.leader_id.term, index: id.index }
}

/// proto → openraft.
pub fn log_id_from_pb(id: &pb::LogId) -> LogId {
    log_id(id.term, id.index)
}

/// openraft → proto.
pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote { term: v.leader_id.term, node_id: v.leader_id.voted_for, committed: v.committed }
}

/// proto → openraft.
pub fn vote_from_pb(v: Option<&pb::Vote>) -> Result<Vote, ConvertError> {
    let v = v.ok_or_else(|| invalid("missing vote"))?;
    let leader_id = openraft::impls::leader_id_std::LeaderId { term: v.term, voted_for: v.node_id };
    Ok(openraft::impls::Vote { leader_id, committed: v.committed })
}

/// openraft → proto.
pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::membership::VoterSet { voters: set.iter().copied().collect() })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| pb::Node { node_id: *id, addr: n.addr.clone(), generation: n.generation })
            .collect(),
    }
}

/// proto → openraft.
pub fn membership_from_pb(m: pb::Membership) -> Result<Membership, ConvertError> {
    let configs: Vec<BTreeSet<u64>> = m.configs.into_iter().map(|c| c.voters.into_iter().collect()).collect();
    let nodes: BTreeMap<u64, Node> = m.nodes.into_iter().map(|n| (n.node_id, Node::at(n.addr, n.generation))).collect();
    Membership::new(configs, nodes).map_err(|e| invalid(format!("membership: {e}")))
}

/// openraft → proto.
pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: m.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(m.membership())),
    }
}

/// proto → openraft.
pub fn stored_membership_from_pb(m: Option<pb::StoredMembership>) -> Result<StoredMembership, ConvertError> {
    let m = m.ok_or_else(|| invalid("missing membership"))?;
    let membership = membership_from_pb(m.membership.ok_or_else(|| invalid("missing membership"))?)?;
    Ok(StoredMembership::new(m.log_id.as_ref().map(log_id_from_pb), membership))
}

/// openraft → proto.
pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: m.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
    }
}

/// proto → openraft.
pub fn snapshot_meta_from_pb(m: Option<pb::SnapshotMeta>) -> Result<SnapshotMeta, ConvertError> {
    let m = m.ok_or_else(|| invalid("missing snapshot meta"))?;
    Ok(SnapshotMeta {
        last_log_id: m.last_log_id.as_ref().map(log_id_from_pb),
        last_membership: stored_membership_from_pb(m.last_membership)?,
    })
}

/// Encodes a vote for the vote file (protobuf, the same message as on the wire).
pub fn encode_vote(v: &Vote) -> Vec<u8> {
    vote_to_pb(v).encode_to_vec()
}

/// Decodes the vote file.
pub fn decode_vote(bytes: &[u8]) -> Result<Vote, ConvertError> {
    let v = pb::Vote::decode(bytes).map_err(|e| invalid(format!("vote: {e}")))?;
    vote_from_pb(Some(&v))
}

/// A transfer-leader request to protobuf.
pub fn transfer_leader_to_pb(
    group_id: u64,
    target_generation: u32,
    r: &openraft::raft::TransferLeaderRequest<KeelRaft>,
) -> pb::TransferLeaderRequest {
    pb::TransferLeaderRequest {
        group_id,
        target_generation,
        from_leader: Some(vote_to_pb(r.from_leader())),
        to_node_id: *r.to_node_id(),
        last_log_id: r.last_log_id().map(log_id_to_pb),
    }
}

/// A transfer-leader request from protobuf.
pub fn transfer_leader_from_pb(
    r: &pb::TransferLeaderRequest,
) -> Result<openraft::raft::TransferLeaderRequest<KeelRaft>, ConvertError> {
    let from = vote_from_pb(r.from_leader.as_ref())?;
    Ok(openraft::raft::TransferLeaderRequest::new(from, r.to_node_id, r.last_log_id.as_ref().map(log_id_from_pb)))
}

/// A transfer-leader answer to protobuf.
pub fn transfer_leader_response_to_pb(
    r: &openraft::raft::TransferLeaderResponse<KeelRaft>,
) -> pb::TransferLeaderResponse {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Rejected;
    let rejected = match r {
        Ok(()) => None,
        Err(E::VoteChanged { expected, actual }) => Some(Rejected::VoteChanged(pb::VoteChanged {
            expected: Some(vote_to_pb(expected)),
            actual: Some(vote_to_pb(actual)),
        })),
        Err(E::LogNotFlushed { expected, actual }) => Some(Rejected::LogNotFlushed(pb::LogNotFlushed {
            expected: expected.as_ref().map(log_id_to_pb),
            actual: actual.as_ref().map(log_id_to_pb),
        })),
    };
    pb::TransferLeaderResponse { rejected }
}

/// A transfer-leader answer from protobuf.
pub fn transfer_leader_response_from_pb(
    r: pb::TransferLeaderResponse,
) -> Result<openraft::raft::TransferLeaderResponse<KeelRaft>, ConvertError> {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Rejected;
    Ok(match r.rejected {
        None => Ok(()),
        Some(Rejected::VoteChanged(v)) => Err(E::VoteChanged {
            expected: vote_from_pb(v.expected.as_ref())?,
            actual: vote_from_pb(v.actual.as_ref())?,
        }),
        Some(Rejected::LogNotFlushed(l)) => Err(E::LogNotFlushed {
            expected: l.expected.as_ref().map(log_id_from_pb),
            actual: l.actual.as_ref().map(log_id_from_pb),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        let nodes: BTreeMap<u64, Node> = [(1, Node::new("a:1")), (2, Node::at("b:2", 7)), (3, Node::new("c:3"))].into();
        Membership::new(vec![[1, 2, 3].into()], nodes).unwrap()
    }

    #[test]
    fn entries_round_trip_through_batches() {
        let mut b = keel_record::BatchBuilder::new(1 << 20);
        b.push(keel_record::NewRecord { timestamp_ms: 5, value: Some(b"v"), ..Default::default() }).unwrap();
        let entries = vec![
            Entry { log_id: log_id(1, 0), payload: EntryPayload::Membership(membership()) },
            Entry { log_id: log_id(2, 1), payload: EntryPayload::Blank },
            Entry { log_id: log_id(2, 2), payload: EntryPayload::Normal(BatchData(b.build())) },
        ];
        let wire = entries_to_pb(&entries).unwrap();
        let back = entries_from_pb(wire).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in entries.iter().zip(&back) {
            assert_eq!(a.log_id, b.log_id);
        }
        assert!(matches!(&back[0].payload, EntryPayload::Membership(m) if *m == membership()));
        assert!(matches!(back[1].payload, EntryPayload::Blank));
        assert!(
            matches!(&back[2].payload, EntryPayload::Normal(BatchData(bytes)) if keel_record::check(bytes).unwrap().record_count == 1)
        );
    }

    #[test]
    fn vote_and_meta_round_trip() {
        let v = vote_from_pb(Some(&pb::Vote { term: 7, node_id: 3, committed: true })).unwrap();
        assert_eq!(decode_vote(&encode_vote(&v)).unwrap(), v);
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(3, 40)),
            last_membership: StoredMembership::new(Some(log_id(1, 0)), membership()),
        };
        assert_eq!(snapshot_meta_from_pb(Some(snapshot_meta_to_pb(&meta))).unwrap(), meta);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(entries_from_pb(vec![Bytes::from_static(b"not a batch")]).is_err());
        assert!(vote_from_pb(None).is_err());
        assert!(decode_vote(&[0xff, 0xff, 0xff]).is_err());
        let bad = keel_record::raft_entry(&[9, 9], 1, 1, 0).unwrap();
        assert!(batch_to_entry(&Batch::from_bytes(bad).unwrap()).is_err());
    }
}
