//! Fuzz targets for what a raft node decodes from its peers and its own files: each raft request
//! (AppendEntries alone and in a batch, Vote and PreVote, InstallSnapshot, TransferLeader) through
//! the bounded decode and the conversions its handler runs (`convert::*_from_pb`, the entries'
//! batches and their membership payloads, the snapshot data); the TransferLeader and
//! AppendEntries-batch answers a peer sends back; the vote file (`convert::decode_vote`), the purge
//! mark (a `LogId`) and the snapshot file (`PartitionState::decode_snapshot`). Each must not panic,
//! must fail with a typed error, and must not allocate more than its wire bytes and its element
//! count justify.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-raft --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::collections::BTreeMap;

use crate::Node;
use crate::convert;
use crate::producers::{ProducerEntry, ProducerTable, SequencedBatch};
use crate::state_machine::PartitionState;
use crate::types::{Membership, StoredMembership, log_id};
use bytes::Bytes;
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, measure, mutate, mutations};
use keel_proto::bounded::{self, REQUEST_ELEMENTS_MAX};
use keel_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use prost::{Message, Name};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// What decoding and converting may allocate per element the schema walk counts (a node, a voter
/// set, a voter, a producer, an entry): prost's struct of at most 32 bytes, four times over (a
/// vector that doubles from a capacity of 4 and holds its old buffer while it moves), then the
/// converted form, a B-tree entry of at most 40 bytes with its share of a node, which openraft's
/// membership checks may copy once: 128 + 2 × 64 bytes.
const ELEMENT_BYTES: usize = 256;

/// Wire bytes are copied at most twice (prost copies strings and bytes; an entry's batch is kept
/// as it arrived); the fixed part covers openraft's and prost's first allocations and error text.
fn raft_bound(elements: usize) -> AllocBound {
    AllocBound { bytes_per_input_byte: 3, bytes_fixed: 16 * 1024 + ELEMENT_BYTES * elements }
}

/// Elements the schema walk counts in `buf` as the message `name`, capped at the limit above
/// which a decoder must refuse: the cap is what bounds a refused decode.
fn elements(name: &str, buf: &[u8]) -> usize {
    bounded::check(name, buf, usize::MAX).unwrap_or(0).min(REQUEST_ELEMENTS_MAX)
}

fn check_within<T>(what: &str, name: &str, buf: &[u8], decode: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    raft_bound(elements(name, buf)).check(what, buf.len(), decode)
}

/// The server side of each raft RPC: the bounded decode, then what its handler converts.
fn serve(name: &str, buf: &[u8]) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    if name == pb::AppendEntriesRequest::full_name() {
        append_one(bounded::decode::<pb::AppendEntriesRequest>(buf).map_err(|x| e(&x))?)?;
    } else if name == pb::AppendEntriesBatchRequest::full_name() {
        let r = bounded::decode::<pb::AppendEntriesBatchRequest>(buf).map_err(|x| e(&x))?;
        if r.requests.len() > crate::network::APPEND_BATCH_ITEMS_MAX {
            return Err(format!("{} requests in one batch", r.requests.len()));
        }
        // Each item is answered on its own: one refused item does not stop the others.
        let refused: Vec<String> = r.requests.into_iter().filter_map(|item| append_one(item).err()).collect();
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
    } else if name == pb::VoteRequest::full_name() {
        let r = bounded::decode::<pb::VoteRequest>(buf).map_err(|x| e(&x))?;
        convert::vote_from_pb(r.vote.as_ref()).map_err(|x| e(&x))?;
        let _ = r.last_log_id.as_ref().map(convert::log_id_from_pb);
    } else if name == pb::InstallSnapshotRequest::full_name() {
        let r = bounded::decode::<pb::InstallSnapshotRequest>(buf).map_err(|x| e(&x))?;
        convert::vote_from_pb(r.vote.as_ref()).map_err(|x| e(&x))?;
        convert::snapshot_meta_from_pb(r.meta).map_err(|x| e(&x))?;
        // The state machine decodes the data when it installs the snapshot.
        PartitionState::decode_snapshot(&r.data).map_err(|x| e(&x))?;
    } else if name == pb::TransferLeaderRequest::full_name() {
        let r = bounded::decode::<pb::TransferLeaderRequest>(buf).map_err(|x| e(&x))?;
        convert::transfer_leader_from_pb(&r).map_err(|x| e(&x))?;
    } else {
        return Err(format!("no handler for {name}"));
    }
    Ok(())
}

/// What the AppendEntries handler converts of one group's request, alone or inside a batch.
fn append_one(r: pb::AppendEntriesRequest) -> Result<(), String> {
    convert::vote_from_pb(r.vote.as_ref()).map_err(|x| x.to_string())?;
    let _ = r.prev_log_id.as_ref().map(convert::log_id_from_pb);
    let _ = r.leader_commit.as_ref().map(convert::log_id_from_pb);
    convert::entries_from_pb(r.entries).map_err(|x| x.to_string())?;
    Ok(())
}

/// Elements inside the membership payloads of a request's entries, which the walk of the
/// request sees only as bytes.
fn entry_elements(r: &pb::AppendEntriesRequest) -> usize {
    r.entries.iter().map(|b| elements(&pb::Membership::full_name(), b.get(HEADER_AND_TAG..).unwrap_or(&[]))).sum()
}

fn check_request(name: &str, buf: &[u8]) -> TestCaseResult {
    // The request's own elements, plus those inside its entries and snapshot data, which the
    // walk of the request sees only as bytes.
    let mut n = elements(name, buf);
    if let Ok(r) = pb::AppendEntriesRequest::decode(buf)
        && name == pb::AppendEntriesRequest::full_name()
    {
        n += entry_elements(&r);
    }
    if let Ok(r) = pb::AppendEntriesBatchRequest::decode(buf)
        && name == pb::AppendEntriesBatchRequest::full_name()
    {
        n += r.requests.iter().map(entry_elements).sum::<usize>();
    }
    if let Ok(r) = pb::InstallSnapshotRequest::decode(buf)
        && name == pb::InstallSnapshotRequest::full_name()
    {
        n += elements(&pb::PartitionSnapshot::full_name(), &r.data);
    }
    // Refusal is the expected outcome for most damaged requests; what matters is how.
    let _served = raft_bound(n).check(name, buf.len(), || serve(name, buf))?;
    Ok(())
}

/// Where a membership payload starts in a raft-only batch: after the batch header and the tag.
const HEADER_AND_TAG: usize = keel_record::HEADER_LEN + 1;

fn membership() -> Membership {
    let nodes: BTreeMap<u64, Node> = [(1, Node::new("a:1")), (2, Node::at("b:2", 3)), (3, Node::new("c:3"))].into();
    Membership::new(vec![[1, 2, 3].into(), [2, 3].into()], nodes).unwrap()
}

fn membership_entry() -> Vec<u8> {
    let mut payload = vec![1u8];
    convert::membership_to_pb(&membership()).encode(&mut payload).unwrap();
    keel_record::raft_entry(&payload, 4, 17, 100).unwrap().to_vec()
}

fn data_entry() -> Vec<u8> {
    let mut b = keel_record::BatchBuilder::new(1 << 16);
    b.push(keel_record::NewRecord { timestamp_ms: 5, value: Some(b"v"), ..Default::default() }).unwrap();
    let mut buf = b.build().to_vec();
    keel_record::stamp(&mut buf, 100, 4, 18).unwrap();
    buf
}

fn snapshot() -> Vec<u8> {
    let mut s = PartitionState {
        last_applied: Some(log_id(4, 40)),
        membership: StoredMembership::new(Some(log_id(1, 0)), membership()),
        next_offset: 900,
        log_start_offset: 100,
        producers: ProducerTable::default(),
    };
    for id in 1..=5 {
        let last = SequencedBatch {
            first_sequence: 5,
            last_sequence: 9,
            base_offset: 795 + id as u64,
            next_offset: 800 + id as u64,
        };
        s.producers.restore(id, ProducerEntry { epoch: 1, batches: [last].into(), last_timestamp_ms: 1_000 });
    }
    s.encode_snapshot()
}

fn request_seeds() -> Vec<(String, Vec<u8>)> {
    let vote = Some(pb::Vote { term: 4, node_id: 2, committed: true });
    let id = Some(pb::LogId { term: 4, index: 16 });
    let meta = convert::snapshot_meta_to_pb(&PartitionState::decode_snapshot(&snapshot()).unwrap().snapshot_meta());
    let enc = |name: String, m: &dyn Fn() -> Vec<u8>| (name, m());
    let append = |group_id| pb::AppendEntriesRequest {
        group_id,
        vote,
        prev_log_id: id,
        entries: vec![
            Bytes::from(membership_entry()),
            Bytes::from(data_entry()),
            keel_record::raft_entry(&[0], 4, 19, 101).unwrap(),
        ],
        leader_commit: id,
        target_generation: 1,
    };
    vec![
        enc(pb::AppendEntriesRequest::full_name(), &|| append(3).encode_to_vec()),
        enc(pb::AppendEntriesBatchRequest::full_name(), &|| {
            // A heartbeat (no entries) beside two groups' entries, as a batch carries them.
            let heartbeat = pb::AppendEntriesRequest { entries: vec![], ..append(5) };
            pb::AppendEntriesBatchRequest { requests: vec![append(3), heartbeat, append(4)] }.encode_to_vec()
        }),
        enc(pb::VoteRequest::full_name(), &|| {
            pb::VoteRequest { group_id: 3, vote, last_log_id: id, leadership_transfer: false, target_generation: 2 }
                .encode_to_vec()
        }),
        enc(pb::InstallSnapshotRequest::full_name(), &|| {
            pb::InstallSnapshotRequest {
                group_id: 3,
                vote,
                meta: Some(meta.clone()),
                data: Bytes::from(snapshot()),
                target_generation: 1,
            }
            .encode_to_vec()
        }),
        enc(pb::TransferLeaderRequest::full_name(), &|| {
            pb::TransferLeaderRequest {
                group_id: 3,
                from_leader: vote,
                to_node_id: 1,
                last_log_id: id,
                target_generation: 1,
            }
            .encode_to_vec()
        }),
    ]
}

/// Makes a damaged batch verify again (length and CRC), so that the damage reaches the payload.
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 8 {
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

fn check_entry(entry: &[u8]) -> TestCaseResult {
    let n = elements(&pb::Membership::full_name(), entry.get(HEADER_AND_TAG..).unwrap_or(&[]));
    let entry = Bytes::copy_from_slice(entry);
    let len = entry.len();
    let converted = raft_bound(n).check("entries_from_pb", len, || convert::entries_from_pb(vec![entry]))?;
    if let Ok(entries) = converted {
        prop_assert_eq!(entries.len(), 1);
        // What converts back is what arrived, up to the offset the follower stamps itself.
        let again = convert::entries_to_pb(&entries).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(convert::entries_from_pb(again).map_err(|e| TestCaseError::fail(e.to_string()))?, entries);
    }
    Ok(())
}

fn check_snapshot(bytes: &[u8]) -> TestCaseResult {
    let state = check_within("decode_snapshot", &pb::PartitionSnapshot::full_name(), bytes, || {
        PartitionState::decode_snapshot(bytes)
    })?;
    if let Ok(s) = state {
        prop_assert!(s.log_start_offset <= s.next_offset);
        prop_assert_eq!(PartitionState::decode_snapshot(&s.encode_snapshot()).ok(), Some(s));
    }
    Ok(())
}

fn check_small_files(bytes: &[u8]) -> TestCaseResult {
    let vote = check_within("decode_vote", &pb::Vote::full_name(), bytes, || convert::decode_vote(bytes))?;
    if let Ok(v) = vote {
        prop_assert_eq!(convert::decode_vote(&convert::encode_vote(&v)).ok(), Some(v));
    }
    check_within("purge mark", &pb::LogId::full_name(), bytes, || pb::LogId::decode(bytes))?.ok();
    // Peer answers go through the bounded codec, like requests.
    let answer = check_within("transfer-leader answer", &pb::TransferLeaderResponse::full_name(), bytes, || {
        bounded::decode::<pb::TransferLeaderResponse>(bytes).map(convert::transfer_leader_response_from_pb)
    })?;
    drop(answer);
    let batch = check_within("batch answer", &pb::AppendEntriesBatchResponse::full_name(), bytes, || {
        bounded::decode::<pb::AppendEntriesBatchResponse>(bytes)
    })?;
    drop(batch);
    Ok(())
}

fn batch_answer() -> Vec<u8> {
    use pb::append_entries_batch_item::Outcome;
    use pb::append_entries_response::{Conflict, Result as R};
    let conflict = pb::AppendEntriesResponse { result: Some(R::Conflict(Conflict {})) };
    let refused = pb::RpcError { code: tonic::Code::Unavailable as i32, message: "group 4 is not here".into() };
    pb::AppendEntriesBatchResponse {
        items: vec![
            pb::AppendEntriesBatchItem { index: 0, outcome: Some(Outcome::Response(conflict)) },
            pb::AppendEntriesBatchItem { index: 2, outcome: Some(Outcome::Error(refused)) },
        ],
    }
    .encode_to_vec()
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(8000))]

    #[test]
    fn fuzz_arbitrary_requests(
        name in proptest::sample::select(request_seeds().into_iter().map(|(n, _)| n).collect::<Vec<_>>()),
        input in arbitrary_bytes(256),
    ) {
        check_request(&name, &input)?;
    }

    #[test]
    fn fuzz_damaged_requests((name, seed) in proptest::sample::select(request_seeds()), m in mutations()) {
        check_request(&name, &mutate(&seed, &m))?;
    }

    #[test]
    fn fuzz_damaged_entries(
        seed in proptest::sample::select(vec![membership_entry(), data_entry()]),
        m in mutations(),
        resealed in any::<bool>(),
    ) {
        let damaged = mutate(&seed, &m);
        check_entry(&if resealed { reseal(damaged) } else { damaged })?;
    }

    #[test]
    fn fuzz_damaged_membership_payloads(m in mutations()) {
        // Damage only the encoded membership, inside a batch that verifies.
        let mut payload = vec![1u8];
        convert::membership_to_pb(&membership()).encode(&mut payload).unwrap();
        let damaged = [&payload[..1], &mutate(&payload[1..], &m)[..]].concat();
        check_entry(&keel_record::raft_entry(&damaged, 4, 17, 100).unwrap())?;
    }

    #[test]
    fn fuzz_snapshots(input in prop_oneof![arbitrary_bytes(256), mutations().prop_map(|m| mutate(&snapshot(), &m))]) {
        check_snapshot(&input)?;
    }

    #[test]
    fn fuzz_vote_purge_mark_and_peer_answers(input in prop_oneof![
        arbitrary_bytes(64),
        mutations().prop_map(|m| mutate(&convert::encode_vote(&convert::vote_from_pb(Some(&pb::Vote { term: 9, node_id: 3, committed: true })).unwrap()), &m)),
        mutations().prop_map(|m| mutate(&pb::TransferLeaderResponse {
            rejected: Some(pb::transfer_leader_response::Rejected::LogNotFlushed(pb::LogNotFlushed {
                expected: Some(pb::LogId { term: 1, index: 2 }),
                actual: None,
            })),
        }.encode_to_vec(), &m)),
        mutations().prop_map(|m| mutate(&batch_answer(), &m)),
    ]) {
        check_small_files(&input)?;
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

#[test]
fn every_seed_is_served() {
    for (name, bytes) in request_seeds() {
        serve(&name, &bytes).unwrap();
    }
    assert_eq!(convert::entries_from_pb(vec![Bytes::from(membership_entry())]).unwrap().len(), 1);
    PartitionState::decode_snapshot(&snapshot()).unwrap();
}

/// A membership payload of `count` empty nodes (2 bytes each on the wire).
fn membership_of_empty_nodes(count: usize) -> Vec<u8> {
    let payload = [&[1u8][..], &[0x12, 0].repeat(count)].concat();
    keel_record::raft_entry(&payload, 4, 17, 100).unwrap().to_vec()
}

/// Regression (fuzz finding): the membership inside a raft entry was decoded by prost with no
/// bound: each 2-byte empty node became a 32-byte struct in a vector that doubles, so one 16 MiB
/// entry in an AppendEntries allocated ~600 MiB (37 bytes per wire byte, measured). It is now counted first, like a request.
#[test]
fn a_membership_of_many_empty_nodes_is_refused_before_it_is_allocated() {
    let entry = Bytes::from(membership_of_empty_nodes(REQUEST_ELEMENTS_MAX + 1));
    let len = entry.len();
    // The walk's schema is built once per process, on first use: not part of this decode.
    elements(&pb::Membership::full_name(), &[]);
    let (converted, peak) = measure(|| convert::entries_from_pb(vec![entry]));
    assert!(peak <= raft_bound(0).bytes_fixed, "{peak} bytes allocated for a {len}-byte entry");
    assert!(converted.is_err());

    // Found by fuzz_damaged_membership_payloads: prost allocated every node before it met the
    // malformed byte at the end. The walk refuses it first.
    let payload = [&[1u8][..], &[0x12, 0].repeat(10_000), &[0x0f]].concat();
    let entry = keel_record::raft_entry(&payload, 4, 17, 100).unwrap();
    let (converted, peak) = measure(|| convert::entries_from_pb(vec![entry]));
    assert!(peak <= raft_bound(0).bytes_fixed, "{peak} bytes allocated before a malformed membership was refused");
    assert!(converted.is_err());
}

/// Regression (fuzz finding): a snapshot's producers were decoded by prost into a vector of
/// 24-byte structs, one per 2-byte element, before they became the map: a 64 MiB snapshot (the
/// raft message limit) of empty producers allocated ~1.5 GiB (24 bytes per wire byte, measured). They are now inserted one by one.
#[test]
fn a_snapshot_of_many_empty_producers_stays_within_the_bound() {
    let count = 200_000;
    let bytes = [snapshot(), [0x22, 0].repeat(count)].concat();
    elements(&pb::Membership::full_name(), &[]);
    let (state, peak) = measure(|| PartitionState::decode_snapshot(&bytes));
    let state = state.unwrap();
    assert_eq!(state.producers.len(), 6, "empty producers are all producer 0");
    assert!(peak <= raft_bound(0).limit(bytes.len()), "{peak} bytes allocated for a {}-byte snapshot", bytes.len());
}

/// Regression (fuzz finding, when the batch answer joined the harness): peers' answers were
/// decoded by prost with no bound, so a batch answer of empty items (2 bytes each on the wire)
/// with a malformed byte at its end allocated every item before prost refused it — up to
/// gigabytes for an answer at the RPC size limit. The `Raft` service's answers are now walked
/// first, like requests.
#[test]
fn a_batch_answer_of_many_empty_items_is_refused_before_it_is_allocated() {
    let answer = [&[0x0a, 0][..].repeat(REQUEST_ELEMENTS_MAX + 1), &[0x0f][..]].concat();
    elements(&pb::Membership::full_name(), &[]);
    let (decoded, peak) = measure(|| bounded::decode::<pb::AppendEntriesBatchResponse>(&answer));
    assert!(decoded.is_err());
    assert!(peak <= raft_bound(0).bytes_fixed, "{peak} bytes allocated before a malformed answer was refused");
    // Unbounded, the same answer costs far more than its wire bytes: what the walk prevents.
    let (_, unbounded) = measure(|| pb::AppendEntriesBatchResponse::decode(&answer[..]));
    assert!(unbounded > 10 * answer.len(), "{unbounded} bytes for {} wire bytes", answer.len());
}
