//! Fuzz targets for the broker's own decoders: the `__meta` command (`metadata::decode_command`)
//! and its replay into the metadata state machine (`Metadata::replay`), and the data directory's
//! identity file (`Identity::load`). Requests are decoded by keel-proto's bounded codec and fuzzed
//! there; record batches and `__consumer_offsets` records in keel-record and keel-coordinator.
//! Each must not panic, must fail with a typed error, and must not allocate more than its input
//! justifies.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-broker --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::path::Path;

use crate::metadata::{Command, ReplayError, TopicSettings, decode_command, encode_command};
use crate::{Identity, Metadata};
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, measure, mutated};
use keel_storage::{Disk, SimDisk, write_atomic};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `Command` is internally tagged (`"op"`), so serde first buffers the whole object as generic
/// content, a 32-byte node per JSON value in vectors that double (and hold their old buffer while
/// they move), and only then builds the command from it. The densest value, an empty list (`[],`,
/// 3 bytes), peaks at about 105 bytes: 35 per wire byte, measured (`dense_commands_...` below);
/// 48 leaves room. This is more than a decoder of untrusted input should allow, and it is
/// accepted here because only the controller writes `__meta`, after validating every command
/// (at most `PARTITIONS_PER_TOPIC_MAX` partitions); nothing a client sends is decoded this way.
/// The fixed part covers serde_json's error text.
const BOUND: AllocBound = AllocBound { bytes_per_input_byte: 48, bytes_fixed: 4096 };

fn seeds() -> Vec<Vec<u8>> {
    let commands = [
        Command::InitCluster { cluster_id: "c-1".into() },
        Command::RegisterNode {
            node_id: 1,
            addr: "10.0.0.1:7070".into(),
            peer_addr: Some("10.0.0.1:8070".into()),
            key_hash: Some("ab".repeat(32)),
        },
        Command::CreateTopic {
            name: "orders".into(),
            replication_factor: 3,
            settings: TopicSettings {
                retention_ms: Some(60_000),
                retention_bytes: Some(1 << 30),
                batch_bytes_max: None,
            },
            assignment: vec![vec![1, 2, 3], vec![2, 3, 1]],
        },
        Command::CreateInternalTopic {
            name: "__consumer_offsets".into(),
            replication_factor: 1,
            assignment: vec![vec![1]],
        },
        Command::AddPartitions { name: "orders".into(), assignment: vec![vec![3, 1, 2]], partitions_before: Some(2) },
        Command::AddAcl {
            rule: crate::acl::AclRule {
                principal: "User:alice".into(),
                resource_type: crate::acl::ResourceType::Topic,
                name: "orders".into(),
                prefix: true,
                operation: crate::acl::Operation::Produce,
            },
        },
        Command::MovePartition { topic: "orders".into(), partition: 0, from: vec![1, 2, 3], to: vec![3, 2, 1] },
        Command::FinishMove { topic: "orders".into(), partition: 0, to: vec![3, 2, 1] },
        Command::ReplaceNode { node_id: 2 },
        Command::RecordVoters { voters: vec![1, 2, 3] },
        Command::MovePartition { topic: "__meta".into(), partition: 0, from: vec![1, 2, 3], to: vec![1, 2, 3, 4, 5] },
        Command::DecommissionNode { node_id: 3 },
        Command::DeleteTopic { name: "orders".into() },
        // Applies to a fresh cluster (ids start at 0); the other is refused there.
        Command::AllocateProducerIds { first: 0, count: 1000 },
        Command::AllocateProducerIds { first: i64::MAX - 100_000, count: 100_000 },
        Command::InitProducerIdentity {
            identity: "orders-writer".into(),
            previous: None,
            next: crate::metadata::ProducerEpoch { producer_id: 1000, epoch: 0 },
            request_token: 42,
        },
        Command::InitProducerIdentity {
            identity: "orders-writer".into(),
            previous: Some(crate::metadata::ProducerEpoch { producer_id: 1000, epoch: 0 }),
            next: crate::metadata::ProducerEpoch { producer_id: 1000, epoch: 1 },
            request_token: 0,
        },
    ];
    let mut seeds: Vec<Vec<u8>> = commands.iter().map(encode_command).collect();
    // A record written before `partitions_before` existed.
    seeds.push(br#"{"op":"add_partitions","name":"orders","assignment":[[1,2,3]]}"#.to_vec());
    seeds
}

/// A cluster of three nodes, where replayed commands can take effect.
fn cluster() -> Metadata {
    let mut m = Metadata::new();
    for node_id in 1..=3 {
        let offset = m.applied_offset;
        m.apply(
            offset,
            &Command::RegisterNode { node_id, addr: format!("n{node_id}:1"), peer_addr: None, key_hash: None },
        )
        .unwrap();
    }
    m
}

fn check_command(value: &[u8]) -> TestCaseResult {
    let decoded = BOUND.check("decode_command", value.len(), || decode_command(value))?;
    if let Ok(c) = &decoded {
        let again = decode_command(&encode_command(c));
        prop_assert_eq!(again.as_ref(), Ok(c));
    }
    let mut m = cluster();
    let before = m.clone();
    let offset = m.applied_offset;
    let replayed = BOUND.check("Metadata::replay", value.len(), || m.replay(offset, value))?;
    match replayed {
        Ok(_) => prop_assert_eq!(m.applied_offset, offset + 1),
        Err(ReplayError::Undecodable { .. }) => {
            prop_assert!(decoded.is_err());
            prop_assert_eq!(&m, &before, "an undecodable record changes nothing");
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
    }
    Ok(())
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(12000))]

    #[test]
    fn fuzz_arbitrary_commands(value in arbitrary_bytes(256)) {
        check_command(&value)?;
    }

    #[test]
    fn fuzz_damaged_commands(value in mutated(seeds())) {
        check_command(&value)?;
    }

    #[test]
    fn fuzz_identity_file(bytes in prop_oneof![
        arbitrary_bytes(64),
        mutated(vec![br#"{"node_id":3,"cluster_id":"c-1"}"#.to_vec(), br#"{"node_id":1,"cluster_id":null}"#.to_vec()]),
    ]) {
        let disk = SimDisk::new(1);
        let dir = Path::new("/data");
        disk.create_dir_all(dir).unwrap();
        write_atomic(&disk, &dir.join("keel.id"), &bytes).unwrap();
        let loaded = BOUND.check("Identity::load", bytes.len(), || Identity::load(&disk, dir))?;
        if let Ok(Some(id)) = loaded {
            id.store(&disk, dir).unwrap();
            prop_assert_eq!(Identity::load(&disk, dir).unwrap(), Some(id));
        }
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

#[test]
fn every_seed_decodes() {
    for seed in seeds() {
        decode_command(&seed).unwrap();
    }
}

/// The densest commands: more partitions than a topic may have, each with no replicas (3 bytes
/// on the wire, a 32-byte content node and a 24-byte vector decoded), and one partition with very
/// many replicas (2 bytes each, a content node and an 8-byte integer).
#[test]
fn dense_commands_stay_within_the_bound() {
    let many = format!(
        r#"{{"op":"create_internal_topic","name":"x","replication_factor":0,"assignment":[{}]}}"#,
        vec!["[]"; 200_000].join(",")
    );
    let wide = format!(r#"{{"op":"add_partitions","name":"x","assignment":[[{}]]}}"#, vec!["0"; 200_000].join(","));
    for value in [many, wide] {
        let (decoded, peak) = measure(|| decode_command(value.as_bytes()));
        assert!(peak <= BOUND.limit(value.len()), "{} bytes decoded with a peak of {peak}", value.len());
        drop(decoded);
    }
}
