//! Fuzz targets for the decoding of every request message a Keel server decodes (the input of
//! every method of every service in `proto/keel/v1`), through `bounded::decode`, the entry point
//! the gRPC codec uses: over arbitrary bytes and over damaged valid encodings (inflated lengths
//! and counts, long runs of repeated elements). Each must not panic, must fail with a
//! `BoundsError`, must agree with prost on every request under the element limit, and must not
//! allocate more than its wire bytes and its element count justify, nothing at all beyond a
//! constant when it refuses a request.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-proto --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::bounded::{self, BoundsError, REQUEST_ELEMENTS_MAX};
use crate::v1 as pb;
use bytes::Bytes;
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, measure, mutate, mutations};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use prost::{Message, Name};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The largest element prost allocates per counted element: every message that can repeat or
/// nest, and the entries of repeated scalar, string and bytes fields.
fn element_bytes_max() -> usize {
    use std::mem::size_of;
    [
        size_of::<pb::Record>(),
        size_of::<pb::Header>(),
        size_of::<pb::TopicPartitions>(),
        size_of::<pb::OffsetCommit>(),
        size_of::<pb::TopicConfig>(),
        size_of::<pb::Vote>(),
        size_of::<pb::LogId>(),
        size_of::<pb::SnapshotMeta>(),
        size_of::<pb::StoredMembership>(),
        size_of::<pb::Membership>(),
        size_of::<pb::membership::VoterSet>(),
        size_of::<pb::Node>(),
        size_of::<Bytes>(),
        size_of::<String>(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// What a request may allocate. Strings and bytes are copied out of the input once (1 byte per
/// wire byte; 2 for slack). Each element the walk counts (at most `REQUEST_ELEMENTS_MAX`) becomes
/// one struct in a vector that prost grows by doubling from a capacity of 4: at most 4 structs'
/// worth per element (one element in a fresh vector of 4; or n elements in a vector of 2n that
/// still holds its old buffer of n while it moves). The fixed part covers the walk's schema, built
/// once per process, and prost's first allocations.
fn request_bound(elements: usize) -> AllocBound {
    AllocBound { bytes_per_input_byte: 2, bytes_fixed: 4096 + 4 * element_bytes_max() * elements }
}

/// A refused request is refused by the walk, before prost allocates anything.
const REFUSED_BOUND: AllocBound = AllocBound { bytes_per_input_byte: 0, bytes_fixed: 1024 };

fn check_request<M: Message + Default + Name + PartialEq + std::fmt::Debug>(buf: &[u8]) -> TestCaseResult {
    let name = M::full_name();
    prop_assert!(bounded::is_bounded(&name), "{} is not a request the codec bounds", name);
    // The schema is built on first use: build it before measuring.
    let elements = bounded::check(&name, buf, usize::MAX);
    let (decoded, peak) = measure(|| bounded::decode::<M>(buf));
    let plain = M::decode(buf);
    match (&decoded, &elements) {
        (Ok(m), Ok(n)) => {
            let limit = request_bound(*n).limit(buf.len());
            prop_assert!(peak <= limit, "{}: {} bytes, {} elements: peak {} over {}", name, buf.len(), n, peak, limit);
            prop_assert!(*n <= REQUEST_ELEMENTS_MAX);
            prop_assert_eq!(Some(m), plain.as_ref().ok(), "{}: bounded and plain decoding disagree", name);
        }
        (Ok(_), Err(e)) => return Err(TestCaseError::fail(format!("{name}: decoded, yet the walk says {e}"))),
        (Err(BoundsError::Decode(_)), Ok(n)) => {
            // The walk passed, prost refused: prost may have allocated up to the failure.
            let limit = request_bound(*n).limit(buf.len());
            prop_assert!(peak <= limit, "{}: refused by prost after a peak of {} (limit {})", name, peak, limit);
            prop_assert!(plain.is_err(), "{}: prost refuses only what prost refuses", name);
        }
        (Err(e), _) => {
            let limit = REFUSED_BOUND.limit(buf.len());
            prop_assert!(peak <= limit, "{}: refused ({}) after allocating {} bytes", name, e, peak);
            if let (Ok(n), Ok(_)) = (&elements, &plain) {
                // The walk refuses a request prost accepts only for its element count.
                prop_assert!(*n > REQUEST_ELEMENTS_MAX, "{}: refused ({}) what prost accepts", name, e);
            }
        }
    }
    Ok(())
}

/// Calls `check_request` for the request type named `name`.
macro_rules! requests {
    ($($ty:ident),* $(,)?) => {
        /// The full names of every request type that has a target.
        fn request_names() -> Vec<String> {
            vec![$(pb::$ty::full_name()),*]
        }

        fn check_named(name: &str, buf: &[u8]) -> TestCaseResult {
            $(if name == pb::$ty::full_name() {
                return check_request::<pb::$ty>(buf);
            })*
            Err(TestCaseError::fail(format!("no target for {name}")))
        }

        /// The peak allocation of `bounded::decode` of the request type named `name`.
        fn decode_peak(name: &str, buf: &[u8]) -> Option<usize> {
            $(if name == pb::$ty::full_name() {
                return Some(measure(|| bounded::decode::<pb::$ty>(buf).map(drop)).1);
            })*
            None
        }
    };
}

requests!(
    ProduceRequest,
    InitProducerIdRequest,
    CancelDelayedRequest,
    PrepareTxnRequest,
    EndTxnRequest,
    TxnCheckAnswer,
    ListTxnsRequest,
    ResumeTxnRequest,
    MovePartitionRequest,
    FinishMoveRequest,
    ReplaceNodeRequest,
    DecommissionNodeRequest,
    FetchRequest,
    SubscribeRequest,
    CreateTopicRequest,
    DeleteTopicRequest,
    ListTopicsRequest,
    DescribeTopicRequest,
    AddPartitionsRequest,
    DescribeClusterRequest,
    AuditPartitionRequest,
    AclRequest,
    ListAclsRequest,
    FindCoordinatorRequest,
    HeartbeatRequest,
    CommitOffsetsRequest,
    FetchOffsetsRequest,
    ListGroupsRequest,
    DescribeGroupRequest,
    ResetOffsetsRequest,
    DeleteGroupRequest,
    NackRequest,
    AckRedeliveryRequest,
    ReplayDeadLettersRequest,
    RegisterNodeRequest,
    MetaPositionRequest,
    AllocateProducerIdsRequest,
    LocalStatusRequest,
    ReconciledRequest,
    MetaCopyRequest,
    AppendEntriesRequest,
    AppendEntriesBatchRequest,
    VoteRequest,
    InstallSnapshotRequest,
    TransferLeaderRequest,
    NodeHeartbeatRequest,
    QuiesceRequest,
);

fn enc<M: Message + Name>(m: M) -> (String, Vec<u8>) {
    (M::full_name(), m.encode_to_vec())
}

/// A valid request of every type, with every field set and a few elements in each list.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let header = |k: &str| pb::Header { key: k.into(), value: Some(Bytes::from_static(b"v")) };
    let record = pb::Record {
        key: Some(Bytes::from_static(b"key")),
        value: Some(Bytes::from_static(b"value")),
        headers: vec![header("a"), pb::Header { key: String::new(), value: None }],
        timestamp_ms: 1_700_000_000_000,
    };
    let tps = vec![
        pb::TopicPartitions { topic: "t".into(), partitions: vec![0, 1, 300] },
        pb::TopicPartitions { topic: "u".into(), partitions: vec![] },
    ];
    let commit = |p| pb::OffsetCommit { topic: "t".into(), partition: p, offset: 1 << 40, metadata: "m".into() };
    let vote = Some(pb::Vote { term: 3, node_id: 2, committed: true });
    let log_id = Some(pb::LogId { term: 3, index: 99 });
    let membership = pb::Membership {
        configs: vec![pb::membership::VoterSet { voters: vec![1, 2, 3] }],
        nodes: vec![
            pb::Node { node_id: 1, addr: "a:1".into(), generation: 0 },
            pb::Node { node_id: 2, addr: "b:2".into(), generation: 3 },
        ],
    };
    let meta = pb::SnapshotMeta {
        last_log_id: log_id,
        last_membership: Some(pb::StoredMembership { log_id, membership: Some(membership) }),
    };
    vec![
        enc(pb::ProduceRequest {
            request_id: 7,
            topic: "t".into(),
            partition: 1,
            records: vec![record.clone(), record.clone(), pb::Record::default()],
            batch: Bytes::new(),
            producer_id: Some(5),
            producer_epoch: Some(1),
            base_sequence: Some(10),
            deliver_at_ms: Some(1_700_000_060_000),
            delay_ms: Some(30_000),
            request_token: 99,
        }),
        enc(pb::ProduceRequest { topic: "t".into(), batch: Bytes::from(vec![1u8; 80]), ..Default::default() }),
        enc(pb::CancelDelayedRequest { timer_id: "0-1234".into() }),
        enc(pb::PrepareTxnRequest {
            group: "payments".into(),
            transaction_id: "order-42".into(),
            records: vec![pb::TxnPartitionRecords {
                topic: "orders".into(),
                partition: 1,
                records: vec![pb::Record {
                    key: Some(Bytes::from_static(b"k")),
                    value: Some(Bytes::from_static(b"v")),
                    headers: vec![pb::Header { key: "h".into(), value: None }],
                    timestamp_ms: 5,
                }],
            }],
            timeout_ms: 10_000,
        }),
        enc(pb::EndTxnRequest { group: "payments".into(), transaction_id: "order-42".into(), commit: true }),
        enc(pb::TxnCheckAnswer {
            group: "payments".into(),
            transaction_id: "order-42".into(),
            outcome: pb::TxnOutcome::TxnCommit.into(),
        }),
        enc(pb::ListTxnsRequest {
            group: "payments".into(),
            include_ended: true,
            after_group: "a".into(),
            after_transaction_id: "b".into(),
            limit: 10,
            partition: Some(2),
        }),
        enc(pb::ResumeTxnRequest { group: "payments".into(), transaction_id: "order-42".into() }),
        enc(pb::InitProducerIdRequest::default()),
        enc(pb::InitProducerIdRequest {
            producer_identity: Some("orders-writer".into()),
            producer_id: Some(1000),
            producer_epoch: Some(3),
            request_token: u64::MAX,
        }),
        enc(pb::FetchRequest {
            topic: "t".into(),
            partition: 2,
            offset: 100,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
            format: pb::FetchFormat::Batches.into(),
        }),
        enc(pb::SubscribeRequest {
            topic: "t".into(),
            partition: 2,
            offset: 100,
            max_bytes: 1 << 20,
            format: pb::FetchFormat::Records.into(),
        }),
        enc(pb::CreateTopicRequest {
            name: "t".into(),
            partitions: 3,
            replication_factor: 3,
            config: Some(pb::TopicConfig { retention_ms: 1000, retention_bytes: 1 << 30, max_batch_bytes: 1 << 20 }),
        }),
        enc(pb::DeleteTopicRequest { name: "t".into() }),
        enc(pb::ListTopicsRequest {}),
        enc(pb::DescribeTopicRequest { name: "t".into() }),
        enc(pb::AddPartitionsRequest { name: "t".into(), count: 2, target_total: 5 }),
        enc(pb::DescribeClusterRequest {}),
        enc(pb::AuditPartitionRequest { topic: "t".into(), partition: 2, from_offset: Some(7), max_records: 1000 }),
        enc(pb::AclRequest {
            rule: Some(pb::AclRule {
                principal: "User:alice".into(),
                resource_type: "topic".into(),
                name: "orders".into(),
                prefix: false,
                operation: "produce".into(),
            }),
        }),
        enc(pb::ListAclsRequest { principal: "User:alice".into() }),
        enc(pb::FindCoordinatorRequest { group: "g".into(), ..Default::default() }),
        enc(pb::HeartbeatRequest {
            group: "g".into(),
            member_id: "m".into(),
            member_epoch: 4,
            instance_id: "i".into(),
            subscribed_topics: vec!["t".into(), "u".into(), String::new()],
            owned: tps.clone(),
            session_timeout_ms: 45_000,
            rebalance_timeout_ms: 60_000,
            assignor: "uniform".into(),
            client_id: "c".into(),
        }),
        enc(pb::CommitOffsetsRequest {
            group: "g".into(),
            member_id: "m".into(),
            member_epoch: 4,
            offsets: vec![commit(0), commit(1)],
        }),
        enc(pb::FetchOffsetsRequest { group: "g".into(), partitions: tps }),
        enc(pb::ListGroupsRequest { offsets_partition: Some(3) }),
        enc(pb::DescribeGroupRequest { group: "g".into() }),
        enc(pb::ResetOffsetsRequest { group: "g".into(), offsets: vec![commit(0), commit(2)] }),
        enc(pb::DeleteGroupRequest { group: "g".into() }),
        enc(pb::NackRequest {
            group: "g".into(),
            member_id: "m".into(),
            member_epoch: 4,
            topic: "t".into(),
            partition: 1,
            offset: 9,
            attempt: 2,
            error: "e".into(),
            retryable: true,
            policy: Some(pb::RetryPolicy { max_attempts: 5, backoff_min_ms: 100, backoff_max_ms: 1_000 }),
            record: Some(record.clone()),
        }),
        enc(pb::AckRedeliveryRequest {
            group: "g".into(),
            member_id: "m".into(),
            member_epoch: 4,
            topic: "t".into(),
            partition: 1,
            offset: 9,
            attempt: 2,
        }),
        enc(pb::ReplayDeadLettersRequest {
            group: "g".into(),
            letters: vec![
                pb::DeadLetter { offset: 0, record: Some(record) },
                pb::DeadLetter { offset: 1, record: None },
            ],
        }),
        enc(pb::RegisterNodeRequest {
            node_id: 2,
            addr: "10.0.0.2:7070".into(),
            cluster_id: "c".into(),
            node_key: vec![7; 32].into(),
            peer_addr: "10.0.0.2:8070".into(),
        }),
        enc(pb::MetaPositionRequest {}),
        enc(pb::AllocateProducerIdsRequest { count: 1000 }),
        enc(pb::MovePartitionRequest { topic: "orders".into(), partition: 3, replicas: vec![2, 3, 4] }),
        enc(pb::FinishMoveRequest { topic: "orders".into(), partition: 3, replicas: vec![2, 3, 4] }),
        enc(pb::ReplaceNodeRequest { node_id: 3 }),
        enc(pb::DecommissionNodeRequest { node_id: 4 }),
        enc(pb::LocalStatusRequest {}),
        enc(pb::ReconciledRequest {}),
        enc(pb::MetaCopyRequest { node_id: 3, key_hash: "ab".repeat(32) }),
        enc(pb::AppendEntriesRequest {
            group_id: 9,
            vote,
            prev_log_id: log_id,
            entries: vec![Bytes::from(vec![2u8; 70]), Bytes::new(), Bytes::from_static(b"entry")],
            leader_commit: log_id,
            target_generation: 2,
        }),
        enc(pb::AppendEntriesBatchRequest {
            requests: vec![
                pb::AppendEntriesRequest {
                    group_id: 9,
                    vote,
                    prev_log_id: log_id,
                    entries: vec![Bytes::from_static(b"entry")],
                    leader_commit: log_id,
                    target_generation: 2,
                },
                pb::AppendEntriesRequest { group_id: 10, vote, ..Default::default() },
            ],
        }),
        enc(pb::VoteRequest {
            group_id: 9,
            vote,
            last_log_id: log_id,
            leadership_transfer: true,
            target_generation: 1,
        }),
        enc(pb::InstallSnapshotRequest {
            group_id: 9,
            vote,
            meta: Some(meta),
            data: Bytes::from_static(b"snapshot bytes"),
            target_generation: 3,
        }),
        enc(pb::TransferLeaderRequest {
            group_id: 9,
            from_leader: vote,
            to_node_id: 3,
            last_log_id: log_id,
            target_generation: 4,
        }),
        enc(pb::NodeHeartbeatRequest { from: 2 }),
        enc(pb::QuiesceRequest {
            from: 2,
            groups: (1..4).map(|g| pb::QuiescentGroup { group_id: g, vote, last_log_id: log_id }).collect(),
        }),
    ]
}

/// A request type and damaged bytes: a seed of that type, mutated.
fn damaged() -> impl Strategy<Value = (String, Vec<u8>)> {
    (proptest::sample::select(seeds()), mutations()).prop_map(|((name, seed), m)| (name, mutate(&seed, &m)))
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(16000))]

    #[test]
    fn fuzz_arbitrary_bytes_as_every_request(name in proptest::sample::select(request_names()), input in arbitrary_bytes(256)) {
        check_named(&name, &input)?;
    }

    #[test]
    fn fuzz_damaged_requests((name, input) in damaged()) {
        check_named(&name, &input)?;
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

/// Every method of every service has a target, and every seed is a valid request: a new method
/// fails here until its request gets one.
#[test]
fn every_request_type_has_a_target_and_a_seed() {
    let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let mut served: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .flat_map(|s| &s.method)
        .map(|m| m.input_type().trim_start_matches('.').to_owned())
        .collect();
    served.sort();
    served.dedup();
    let mut targets = request_names();
    targets.sort();
    assert_eq!(targets, served);
    let mut seeded: Vec<String> = seeds()
        .into_iter()
        .map(|(name, bytes)| {
            check_named(&name, &bytes).unwrap();
            name
        })
        .collect();
    seeded.sort();
    seeded.dedup();
    assert_eq!(seeded, served);
}

/// Requests made of their smallest elements: the largest (records) at the element limit, the
/// others at a tenth of it (the bound is linear; this keeps the test cheap in debug builds). What
/// the bound allows is what the densest request costs, and one element more is refused for a
/// constant.
#[test]
fn the_densest_requests_stay_within_the_bound() {
    // (request, field number of its list, elements): each element is the tag and a zero length.
    let lists = [
        (pb::ProduceRequest::full_name(), 4, REQUEST_ELEMENTS_MAX),
        (pb::HeartbeatRequest::full_name(), 5, REQUEST_ELEMENTS_MAX / 10),
        (pb::HeartbeatRequest::full_name(), 6, REQUEST_ELEMENTS_MAX / 10),
        (pb::CommitOffsetsRequest::full_name(), 4, REQUEST_ELEMENTS_MAX / 10),
        (pb::ResetOffsetsRequest::full_name(), 2, REQUEST_ELEMENTS_MAX / 10),
        (pb::FetchOffsetsRequest::full_name(), 2, REQUEST_ELEMENTS_MAX / 10),
        (pb::AppendEntriesRequest::full_name(), 4, REQUEST_ELEMENTS_MAX / 10),
    ];
    for (name, field, count) in lists {
        let one = [(field << 3) | 2, 0];
        let dense = one.repeat(count);
        let peak = decode_peak(&name, &dense).unwrap();
        assert!(peak <= request_bound(count).limit(dense.len()), "{name}: {count} elements, peak {peak}");
    }
    let over = [0x22, 0].repeat(REQUEST_ELEMENTS_MAX + 1);
    let peak = decode_peak(&pb::ProduceRequest::full_name(), &over).unwrap();
    assert!(peak <= REFUSED_BOUND.bytes_fixed, "one record over the limit, refused after {peak} bytes");
}
