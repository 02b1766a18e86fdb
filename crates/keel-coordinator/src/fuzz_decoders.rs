//! Fuzz targets for the decoders of `__consumer_offsets` and `__delayed` records
//! (`GroupRecord::decode`, `TimerRecord::decode`, and `Shard::replay`, which decodes and applies): keys and JSON values over arbitrary bytes and over
//! damaged valid records. A partition replayed after damage, or written by other code, must be
//! refused with a `ReplayError`, never a panic, and must not make the coordinator allocate more
//! than the record justifies.
//!
//! CI runs 8,000 to 16,000 cases per target, about 2 s for this file in the debug profile (the
//! fuzz files of all crates together stay near 12 s, well inside CI's share of one minute). A
//! longer campaign, in the debug profile that keeps the debug assertions:
//! `PROPTEST_CASES=100000 cargo test -p keel-coordinator --lib fuzz_decoders`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::collections::{BTreeMap, BTreeSet};

use crate::groups::{
    Committed, GroupMeta, GroupRecord, Groups, Member, Publish, PublishHeader, Publisher, Redelivery, RedeliveryState,
    Target, Tp,
};
use crate::timers::{Timer, TimerRecord, Timers};
use crate::{Record, Shard};
use keel_fuzzkit::{AllocBound, CountingAlloc, arbitrary_bytes, assert_counting, measure, mutated};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The densest JSON these values hold is a list of empty containers or strings: `"",` (3 bytes)
/// becomes a 24-byte `String` in a B-tree node (about 26 bytes with the node's own fields), and
/// `[["",0],0],` (11 bytes) a 32-byte pair in a vector that doubles, holding up to 3 times its
/// length while it moves, before it becomes a map: under 16 bytes per input byte. The fixed part
/// covers serde_json's error messages and first allocations.
const BOUND: AllocBound = AllocBound { bytes_per_input_byte: 16, bytes_fixed: 4096 };

fn record_len(r: &Record) -> usize {
    r.key.len() + r.value.as_ref().map_or(0, Vec::len)
}

fn check_record(record: &Record) -> TestCaseResult {
    let decoded = BOUND.check("GroupRecord::decode", record_len(record), || GroupRecord::decode(record))?;
    if let Ok(d) = &decoded {
        // What decodes re-encodes to a record that decodes to the same thing (the encoding of
        // JSON may differ: whitespace, field order, escapes).
        let again = GroupRecord::decode(&d.encode()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&again, d);
    }
    let mut groups = Groups::default();
    let replayed = BOUND.check("Groups::replay", record_len(record), || groups.replay(7, record))?;
    prop_assert_eq!(replayed.is_ok(), decoded.is_ok());
    if let Err(e) = replayed {
        prop_assert_eq!(e.offset, 7);
    }
    let decoded = BOUND.check("TimerRecord::decode", record_len(record), || TimerRecord::decode(record))?;
    if let Ok(d) = &decoded {
        let again = TimerRecord::decode(&d.encode()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&again, d);
    }
    let mut timers = Timers::default();
    let replayed = BOUND.check("Timers::replay", record_len(record), || timers.replay(7, record))?;
    prop_assert_eq!(replayed.is_ok(), decoded.is_ok());
    Ok(())
}

fn seeds() -> Vec<GroupRecord> {
    let tp = |t: &str, p| Tp::new(t, p);
    let member = Member {
        member_id: "m-1".into(),
        instance_id: Some("i".into()),
        client_id: "c".into(),
        host: "/10.0.0.1".into(),
        subscribed: BTreeSet::from(["a".to_owned(), "b".to_owned()]),
        session_timeout_ms: 45_000,
        rebalance_timeout_ms: 60_000,
        epoch: 3,
        previous_epoch: 2,
        assigned: BTreeMap::from([(tp("a", 0), 3), (tp("b", 1), 2)]),
        revoking: BTreeMap::from([(tp("a", 1), 1)]),
        away: false,
    };
    let meta = GroupMeta {
        epoch: 3,
        assignor: "uniform".into(),
        topics: BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 2)]),
        empty_since_ms: None,
    };
    let target =
        Target { epoch: 3, members: BTreeMap::from([("m-1".to_owned(), BTreeSet::from([tp("a", 0), tp("b", 1)]))]) };
    let committed = Committed {
        offset: 42,
        metadata: "meta\u{0}data \"quoted\" \u{e9}".into(),
        commit_timestamp_ms: 1_700_000_000_000,
        member_id: "m-1".into(),
        member_epoch: 3,
        high_watermark: Some(50),
    };
    vec![
        GroupRecord::Meta("g".into(), Some(meta)),
        GroupRecord::Meta("g".into(), None),
        GroupRecord::Member("g".into(), "m-1".into(), Some(member)),
        GroupRecord::Member("g".into(), "m-1".into(), None),
        GroupRecord::Target("g".into(), Some(target)),
        GroupRecord::Offset("g".into(), tp("a", 0), Some(committed)),
        GroupRecord::Offset("g".into(), tp("a", 0), None),
        GroupRecord::Redelivery(
            "g".into(),
            tp("a", 0),
            17,
            Some(Redelivery {
                attempts: 2,
                max_attempts: 5,
                backoff_min_ms: 100,
                backoff_max_ms: 1_000,
                due_at_ms: 1_700_000_000_500,
                first_failure_ms: 1_700_000_000_000,
                last_error: "boom \"x\"".into(),
                state: RedeliveryState::Pending,
            }),
        ),
        GroupRecord::Publisher("g".into(), tp("g.dlq", 0), Some(publisher())),
        GroupRecord::Publish("g".into(), tp("g.dlq", 0), (1, 2), Some(publish())),
        GroupRecord::Replayed("g".into(), Some(vec![(0, 3), (5, 9)])),
    ]
}

fn publisher() -> Publisher {
    Publisher { producer_id: 9, epoch: 1, next_sequence: 3, last_decided_ms: 1_700_000_000_000 }
}

fn publish() -> Publish {
    Publish {
        producer_id: 9,
        epoch: 1,
        sequence: 2,
        key: Some(b"k".to_vec()),
        value: Some(vec![0, 255, 7]),
        headers: vec![PublishHeader { key: "h".into(), value: None }],
        timestamp_ms: 1,
        decided_ms: 1,
        batch_base: Some(2),
    }
}

fn timer_seeds() -> Vec<TimerRecord> {
    let timer = Timer {
        target: Tp::new("t", 1),
        deliver_at_ms: 1_700_000_360_000,
        key: None,
        value: Some(b"v".to_vec()),
        headers: vec![PublishHeader { key: "h".into(), value: Some(b"x".to_vec()) }],
    };
    vec![
        TimerRecord::Scheduled(timer),
        TimerRecord::Cancelled(12, 1_700_000_360_000),
        TimerRecord::Fired(13, 1_700_000_360_000),
        TimerRecord::Horizon(1_700_002_800_000),
        TimerRecord::Publisher(Tp::new("t", 1), Some(publisher())),
        TimerRecord::Publish(Tp::new("t", 1), (1, 2), Some(publish())),
    ]
}

fn all_encoded() -> Vec<Record> {
    seeds().iter().map(GroupRecord::encode).chain(timer_seeds().iter().map(TimerRecord::encode)).collect()
}

fn key_seeds() -> Vec<Vec<u8>> {
    all_encoded().into_iter().map(|r| r.key).collect()
}

fn value_seeds() -> Vec<Vec<u8>> {
    all_encoded().into_iter().filter_map(|r| r.value).collect()
}

proptest! {
    #![proptest_config(keel_fuzzkit::config(12000))]

    #[test]
    fn fuzz_arbitrary_records(key in arbitrary_bytes(64), value in proptest::option::of(arbitrary_bytes(256))) {
        check_record(&Record { key, value })?;
    }

    #[test]
    fn fuzz_damaged_keys(key in mutated(key_seeds()), value in proptest::sample::select(value_seeds())) {
        check_record(&Record { key, value: Some(value) })?;
    }

    #[test]
    fn fuzz_damaged_values(
        key in proptest::sample::select(key_seeds()),
        value in mutated(value_seeds()),
    ) {
        check_record(&Record { key, value: Some(value) })?;
    }
}

#[test]
fn counting_allocator_is_installed() {
    assert_counting();
}

#[test]
fn every_seed_decodes() {
    for r in seeds() {
        assert_eq!(GroupRecord::decode(&r.encode()).unwrap(), r);
    }
    for r in timer_seeds() {
        assert_eq!(TimerRecord::decode(&r.encode()).unwrap(), r);
    }
}

/// The densest values the JSON decoder may meet, each checked against the bound: long lists of
/// empty strings and of empty pairs, and many map keys.
#[test]
fn dense_json_stays_within_the_bound() {
    let n = 20_000;
    let strings = vec!["\"\""; n].join(",");
    let member = format!(
        r#"{{"member_id":"m","instance_id":null,"client_id":"c","host":"h","subscribed":[{strings}],"session_timeout_ms":1,"rebalance_timeout_ms":1,"epoch":1,"previous_epoch":0,"assigned":[{}],"revoking":[],"away":false}}"#,
        (0..n).map(|i| format!(r#"[["",{i}],0]"#)).collect::<Vec<_>>().join(",")
    );
    let target = format!(
        r#"{{"epoch":1,"members":{{{}}}}}"#,
        (0..n).map(|i| format!(r#""{i}":[]"#)).collect::<Vec<_>>().join(",")
    );
    let meta = format!(
        r#"{{"epoch":1,"assignor":"a","topics":{{{}}},"empty_since_ms":null}}"#,
        (0..n).map(|i| format!(r#""{i}":0"#)).collect::<Vec<_>>().join(",")
    );
    let cases = [
        (GroupRecord::Member("g".into(), "m".into(), None).encode().key, member),
        (GroupRecord::Target("g".into(), None).encode().key, target),
        (GroupRecord::Meta("g".into(), None).encode().key, meta),
    ];
    for (key, value) in cases {
        let record = Record { key, value: Some(value.into_bytes()) };
        let (decoded, peak) = measure(|| GroupRecord::decode(&record));
        assert!(decoded.is_ok(), "{decoded:?}");
        let len = record_len(&record);
        assert!(peak <= BOUND.limit(len), "{} bytes decoded with a peak of {peak} bytes", len);
    }
}

/// Regression (fuzz finding): the key was split on every zero byte into a vector of 16-byte
/// slices before its shape was checked, so a key of n zero bytes allocated up to 48 n bytes.
/// A key has at most four parts; the split now stops there.
#[test]
fn a_key_of_many_separators_stays_within_the_bound() {
    let mut key = vec![b'o', 0];
    key.extend(std::iter::repeat_n(0u8, 100_000));
    let record = Record { key, value: None };
    let (decoded, peak) = measure(|| GroupRecord::decode(&record));
    assert!(peak <= BOUND.bytes_fixed, "{peak} bytes allocated for a {}-byte key", record.key.len());
    assert!(decoded.is_err());
}
