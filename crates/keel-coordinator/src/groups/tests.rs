#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::Shard;

/// A coordinator without a runtime: every outcome's records go through the codec and replay,
/// as they would through the log.
struct Coord {
    state: Groups,
    /// Every record appended, as the partition would hold them.
    log: Vec<Record>,
    offset: u64,
    topics: TopicsView,
    limits: GroupLimits,
    now_ms: i64,
}

impl Coord {
    fn new(topics: &[(&str, u32)]) -> Coord {
        Coord {
            state: Groups::default(),
            log: Vec::new(),
            offset: 0,
            topics: topics.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
            limits: GroupLimits::default(),
            now_ms: 1_000,
        }
    }

    fn append(&mut self, records: &[GroupRecord]) {
        for r in records {
            self.state.replay(self.offset, &r.encode()).unwrap();
            self.log.push(r.encode());
            self.offset += 1;
        }
        self.check_no_double_ownership();
    }

    fn hb(&mut self, input: HeartbeatInput) -> Result<HeartbeatOutput, GroupError> {
        let out = self.state.heartbeat(&input, &self.topics, &self.limits, self.now_ms)?;
        self.append(&out.records);
        Ok(out.response)
    }

    fn join(&mut self, id: &str, topics: &[&str]) -> HeartbeatOutput {
        self.hb(HeartbeatInput {
            group: "g".into(),
            member_id: id.into(),
            member_epoch: 0,
            subscribed: topics.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    /// A well-behaved member's next heartbeat: it owns what it was last told.
    fn beat(&mut self, id: &str, last: &HeartbeatOutput, topics: &[&str]) -> HeartbeatOutput {
        self.hb(HeartbeatInput {
            group: "g".into(),
            member_id: id.into(),
            member_epoch: last.member_epoch,
            subscribed: topics.iter().map(|t| (*t).to_owned()).collect(),
            owned: last.assignment.iter().cloned().collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn check_no_double_ownership(&self) {
        for g in self.state.groups.values() {
            let mut seen = BTreeSet::new();
            for m in g.members.values() {
                for tp in m.assigned.keys().chain(m.revoking.keys()) {
                    assert!(seen.insert(tp.clone()), "{tp} owned twice");
                }
            }
        }
    }

    fn group(&self) -> &Group {
        self.state.get("g").unwrap()
    }
}

/// Heartbeats every member until nothing changes.
fn settle(c: &mut Coord, members: &mut BTreeMap<String, HeartbeatOutput>, topics: &[&str]) {
    for _ in 0..10 {
        let before = members.clone();
        let ids: Vec<String> = members.keys().cloned().collect();
        for id in ids {
            let last = members[&id].clone();
            let next = c.beat(&id, &last, topics);
            members.insert(id, next);
        }
        if *members == before {
            return;
        }
    }
    panic!("the group did not settle");
}

#[test]
fn a_lone_member_gets_every_partition() {
    let mut c = Coord::new(&[("t", 4)]);
    let a = c.join("a", &["t"]);
    assert_eq!(a.member_epoch, 1);
    assert_eq!(a.assignment.len(), 4);
    assert_eq!(c.group().state(), GroupState::Stable);
}

#[test]
fn a_second_member_waits_for_the_revocation() {
    let mut c = Coord::new(&[("t", 4)]);
    let a1 = c.join("a", &["t"]);
    let b1 = c.join("b", &["t"]);
    // b's partitions are still a's: it gets its epoch but nothing yet.
    assert_eq!(b1.member_epoch, 2);
    assert!(b1.assignment.is_empty());
    // a is asked to revoke two partitions and stays at its epoch until it does.
    let a2 = c.beat("a", &a1, &["t"]);
    assert_eq!(a2.member_epoch, 1);
    assert_eq!(a2.assignment.len(), 2);
    assert_eq!(a2.revoking.len(), 2);
    assert_eq!(c.group().state(), GroupState::Assigning);
    // b asks again: still owned by a (a has not reported them gone).
    let b2 = c.beat("b", &b1, &["t"]);
    assert!(b2.assignment.is_empty());
    // a reports its owned set without the revoked ones; it moves to epoch 2.
    let a3 = c.beat("a", &a2, &["t"]);
    assert_eq!(a3.member_epoch, 2);
    let b3 = c.beat("b", &b2, &["t"]);
    assert_eq!(b3.assignment.len(), 2);
    assert!(a3.assignment.is_disjoint(&b3.assignment));
    assert_eq!(c.group().state(), GroupState::Stable);
}

#[test]
fn leaving_and_timing_out_hand_partitions_to_the_others() {
    let mut c = Coord::new(&[("t", 6)]);
    let mut members = BTreeMap::new();
    for id in ["a", "b", "c"] {
        members.insert(id.to_owned(), c.join(id, &["t"]));
    }
    settle(&mut c, &mut members, &["t"]);
    assert!(members.values().all(|m| m.assignment.len() == 2));
    // a leaves.
    let left = c
        .hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() })
        .unwrap();
    assert_eq!(left.member_epoch, -1);
    members.remove("a");
    settle(&mut c, &mut members, &["t"]);
    assert!(members.values().all(|m| m.assignment.len() == 3));
    // b times out.
    let records = c.state.remove_member("g", "b", &c.topics.clone(), 5_000).unwrap();
    c.append(&records);
    members.remove("b");
    settle(&mut c, &mut members, &["t"]);
    assert_eq!(members["c"].assignment.len(), 6);
    // Leaving twice, or removing a member that is gone, changes nothing.
    assert!(c.state.remove_member("g", "b", &c.topics, 6_000).is_none());
}

#[test]
fn a_heartbeat_that_changes_nothing_writes_nothing() {
    let mut c = Coord::new(&[("t", 2)]);
    let a = c.join("a", &["t"]);
    let input = HeartbeatInput {
        group: "g".into(),
        member_id: "a".into(),
        member_epoch: a.member_epoch,
        subscribed: vec!["t".into()],
        owned: a.assignment.iter().cloned().collect(),
        ..Default::default()
    };
    let out = c.state.heartbeat(&input, &c.topics, &c.limits, 2_000).unwrap();
    assert!(out.records.is_empty(), "{:?}", out.records);
}

#[test]
fn a_retried_join_does_not_create_a_second_member() {
    let mut c = Coord::new(&[("t", 2)]);
    let first = c.join("a", &["t"]);
    let again = c.join("a", &["t"]);
    assert_eq!(first, again);
    assert_eq!(c.group().members.len(), 1);
}

#[test]
fn stale_and_unknown_epochs_are_fenced() {
    let mut c = Coord::new(&[("t", 2)]);
    let a = c.join("a", &["t"]);
    let wrong = HeartbeatInput {
        group: "g".into(),
        member_id: "a".into(),
        member_epoch: a.member_epoch + 5,
        subscribed: vec!["t".into()],
        ..Default::default()
    };
    assert!(matches!(c.hb(wrong), Err(GroupError::FencedEpoch { .. })));
    let nobody = HeartbeatInput { group: "g".into(), member_id: "z".into(), member_epoch: 3, ..Default::default() };
    assert_eq!(c.hb(nobody).unwrap_err().reason(), "UNKNOWN_MEMBER_ID");
}

#[test]
fn a_lost_answer_is_forgiven_with_the_previous_epoch() {
    let mut c = Coord::new(&[("t", 2)]);
    let a1 = c.join("a", &["t"]);
    let _b = c.join("b", &["t"]);
    let a2 = c.beat("a", &a1, &["t"]);
    let a3 = c.beat("a", &a2, &["t"]);
    assert_eq!(a3.member_epoch, 2);
    // The answer carrying epoch 2 was lost: a heartbeats with epoch 1 and what it owns.
    let again = c.beat("a", &a2, &["t"]);
    assert_eq!(again.member_epoch, 2);
}

#[test]
fn a_static_member_that_comes_back_keeps_its_partitions() {
    let mut c = Coord::new(&[("t", 4)]);
    let s = HeartbeatInput {
        group: "g".into(),
        member_id: "s-1".into(),
        member_epoch: 0,
        instance_id: Some("host-a".into()),
        subscribed: vec!["t".into()],
        ..Default::default()
    };
    let first = c.hb(s.clone()).unwrap();
    let mut members = BTreeMap::from([("s-1".to_owned(), first)]);
    members.insert("b".into(), c.join("b", &["t"]));
    settle(&mut c, &mut members, &["t"]);
    let held = members["s-1"].assignment.clone();
    let epoch = c.group().epoch();
    // It leaves for a while (restart), then rejoins under a new member id.
    let away = c.hb(HeartbeatInput { member_epoch: -2, ..s.clone() }).unwrap();
    assert_eq!(away.member_epoch, -2);
    let back = c.hb(HeartbeatInput { member_id: "s-2".into(), ..s.clone() }).unwrap();
    assert_eq!(back.assignment, held);
    assert_eq!(c.group().epoch(), epoch, "no rebalance");
    // The old member id is fenced.
    let old = c.hb(HeartbeatInput { member_epoch: back.member_epoch, ..s });
    assert_eq!(old.unwrap_err().reason(), "UNKNOWN_MEMBER_ID");
}

#[test]
fn new_partitions_and_topics_are_picked_up() {
    let mut c = Coord::new(&[("t", 2)]);
    let a = c.join("a", &["t", "later"]);
    assert_eq!(a.assignment.len(), 2);
    c.topics.insert("t".into(), 3);
    c.topics.insert("later".into(), 1);
    let a2 = c.beat("a", &a, &["t", "later"]);
    assert_eq!(a2.assignment.len(), 4);
}

fn commit(
    c: &mut Coord,
    member: &str,
    epoch: i32,
    tp: (&str, u32),
    offset: u64,
) -> Result<Vec<(Tp, Committed)>, GroupError> {
    let hw: BTreeMap<Tp, u64> =
        c.topics.iter().flat_map(|(t, n)| (0..*n).map(|p| (Tp::new(t.clone(), p), 100))).collect();
    let input = CommitInput {
        group: "g".into(),
        member_id: member.into(),
        member_epoch: epoch,
        offsets: vec![(Tp::new(tp.0, tp.1), offset, String::new())],
        unfenced: false,
    };
    let out = c.state.commit(&input, &c.topics, &hw, &c.limits, c.now_ms)?;
    c.append(&out.records);
    Ok(out.response)
}

#[test]
fn commits_are_fenced_by_ownership_and_epoch() {
    let mut c = Coord::new(&[("t", 2)]);
    let a1 = c.join("a", &["t"]);
    commit(&mut c, "a", a1.member_epoch, ("t", 0), 10).unwrap();
    let b1 = c.join("b", &["t"]);
    let a2 = c.beat("a", &a1, &["t"]);
    let revoking: Vec<Tp> = a2.revoking.iter().cloned().collect();
    assert_eq!(revoking.len(), 1);
    // a may still commit what it is revoking (commit on revoke).
    commit(&mut c, "a", 1, (&revoking[0].topic, revoking[0].partition), 20).unwrap();
    let a3 = c.beat("a", &a2, &["t"]);
    let b2 = c.beat("b", &b1, &["t"]);
    let moved = &revoking[0];
    assert!(b2.assignment.contains(moved));
    // a no longer owns it: its late commit is a zombie commit.
    let zombie = commit(&mut c, "a", a3.member_epoch, (&moved.topic, moved.partition), 30);
    assert_eq!(zombie.unwrap_err().reason(), "STALE_MEMBER_EPOCH");
    // b owns it since epoch 2; a commit at an older epoch than its assignment is refused.
    let early = commit(&mut c, "b", 1, (&moved.topic, moved.partition), 30);
    assert_eq!(early.unwrap_err().reason(), "STALE_MEMBER_EPOCH");
    commit(&mut c, "b", b2.member_epoch, (&moved.topic, moved.partition), 30).unwrap();
    // A future epoch, an unknown member, and an empty member id while members exist: fenced.
    assert_eq!(commit(&mut c, "b", 9, ("t", moved.partition), 31).unwrap_err().reason(), "FENCED_MEMBER_EPOCH");
    assert_eq!(commit(&mut c, "x", 1, ("t", 0), 31).unwrap_err().reason(), "UNKNOWN_MEMBER_ID");
    assert_eq!(commit(&mut c, "", -1, ("t", 0), 31).unwrap_err().reason(), "UNKNOWN_MEMBER_ID");
}

#[test]
fn commits_never_go_back_nor_past_the_high_watermark() {
    let mut c = Coord::new(&[("t", 1)]);
    let a = c.join("a", &["t"]);
    commit(&mut c, "a", a.member_epoch, ("t", 0), 50).unwrap();
    let back = commit(&mut c, "a", a.member_epoch, ("t", 0), 40).unwrap();
    assert_eq!(back[0].1.offset, 50);
    assert_eq!(c.group().offsets[&Tp::new("t", 0)].offset, 50);
    let above = commit(&mut c, "a", a.member_epoch, ("t", 0), 101);
    assert_eq!(above.unwrap_err().reason(), "OFFSET_ABOVE_HIGH_WATERMARK");
    assert_eq!(commit(&mut c, "a", a.member_epoch, ("t", 9), 1).unwrap_err().reason(), "UNKNOWN_TOPIC_OR_PARTITION");
    assert_eq!(commit(&mut c, "a", a.member_epoch, ("u", 0), 1).unwrap_err().reason(), "UNKNOWN_TOPIC_OR_PARTITION");
}

#[test]
fn refused_requests_change_nothing() {
    let mut c = Coord::new(&[("t", 1)]);
    let a = c.join("a", &["t"]);
    let before = c.state.clone();
    let mut limits = c.limits;
    limits.members_per_group_max = 1;
    let full = c.state.heartbeat(
        &HeartbeatInput { group: "g".into(), member_id: "b".into(), ..Default::default() },
        &c.topics,
        &limits,
        0,
    );
    assert_eq!(full.unwrap_err().reason(), "GROUP_MAX_SIZE_REACHED");
    let bad = [
        HeartbeatInput { group: "".into(), member_id: "b".into(), ..Default::default() },
        HeartbeatInput { group: "a/b".into(), member_id: "b".into(), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "".into(), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "x".repeat(65), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "b\0".into(), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "b".into(), member_epoch: -3, ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "b".into(), assignor: "magic".into(), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "b".into(), assignor: "range".into(), ..Default::default() },
        HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -2, ..Default::default() },
    ];
    for (i, input) in bad.into_iter().enumerate() {
        assert!(c.hb(input).is_err(), "case {i}");
        assert_eq!(c.state, before, "case {i}");
    }
    let meta = "m".repeat(c.limits.metadata_bytes_max + 1);
    let input = CommitInput {
        group: "g".into(),
        member_id: "a".into(),
        member_epoch: a.member_epoch,
        offsets: vec![(Tp::new("t", 0), 1, meta)],
        unfenced: false,
    };
    let hw = BTreeMap::from([(Tp::new("t", 0), 10)]);
    assert_eq!(c.state.commit(&input, &c.topics, &hw, &c.limits, 0).unwrap_err().reason(), "METADATA_TOO_LARGE");
    let twice = CommitInput {
        offsets: vec![(Tp::new("t", 0), 1, String::new()), (Tp::new("t", 0), 2, String::new())],
        ..input
    };
    assert!(c.state.commit(&twice, &c.topics, &hw, &c.limits, 0).is_err());
}

#[test]
fn reset_and_delete_need_an_empty_group() {
    let mut c = Coord::new(&[("t", 1)]);
    let a = c.join("a", &["t"]);
    commit(&mut c, "a", a.member_epoch, ("t", 0), 50).unwrap();
    let bounds = BTreeMap::from([(Tp::new("t", 0), (5, 100))]);
    let offsets = vec![(Tp::new("t", 0), 7, String::new())];
    let r = c.state.reset_offsets("g", &offsets, &c.topics, &bounds, &c.limits, 0);
    assert_eq!(r.unwrap_err().reason(), "GROUP_NOT_EMPTY");
    assert_eq!(c.state.delete_group("g").unwrap_err().reason(), "GROUP_NOT_EMPTY");
    c.hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() }).unwrap();
    assert_eq!(c.group().state(), GroupState::Empty);
    let out = c.state.reset_offsets("g", &offsets, &c.topics, &bounds, &c.limits, 0).unwrap();
    c.append(&out.records);
    assert_eq!(c.group().offsets[&Tp::new("t", 0)].offset, 7, "a reset may go back");
    let below = vec![(Tp::new("t", 0), 4, String::new())];
    assert!(c.state.reset_offsets("g", &below, &c.topics, &bounds, &c.limits, 0).is_err());
    let records = c.state.delete_group("g").unwrap();
    c.append(&records);
    assert!(c.state.get("g").is_none());
    assert_eq!(c.state.delete_group("g").unwrap_err().reason(), "GROUP_ID_NOT_FOUND");
}

#[test]
fn offsets_of_an_empty_group_expire_after_retention() {
    let mut c = Coord::new(&[("t", 1)]);
    let a = c.join("a", &["t"]);
    commit(&mut c, "a", a.member_epoch, ("t", 0), 5).unwrap();
    assert!(c.state.expired(1_000_000, 10, 100).is_empty(), "a group with members never expires");
    c.now_ms = 2_000;
    c.hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() }).unwrap();
    assert!(c.state.expired(2_009, 10, 100).is_empty());
    let expired = c.state.expired(2_010, 10, 100);
    assert_eq!(expired.len(), 1);
    let records = expired[0].1.clone();
    c.append(&records);
    assert!(c.state.get("g").is_none());
}

#[test]
fn replayed_commits_fill_the_lag_windows() {
    let mut c = Coord::new(&[("t", 1)]);
    let tp = Tp::new("t", 0);
    let a = c.join("a", &["t"]);
    for (offset, now_ms) in [(10, 1_000), (10, 2_000), (20, 3_000)] {
        c.now_ms = now_ms;
        commit(&mut c, "a", a.member_epoch, ("t", 0), offset).unwrap();
    }
    let sample = |offset, commit_ms| CommitSample { offset, commit_ms, high_watermark: Some(100) };
    assert_eq!(c.state.lag.window("g", &tp), [sample(10, 1_000), sample(10, 2_000), sample(20, 3_000)]);
    // A commit below the committed offset writes nothing, so the window does not see it.
    commit(&mut c, "a", a.member_epoch, ("t", 0), 5).unwrap();
    assert_eq!(c.state.lag.window("g", &tp).len(), 3);
    // A reset moves back: the window shows the rewind.
    c.hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() }).unwrap();
    let bounds = BTreeMap::from([(tp.clone(), (0, 100))]);
    let out = c.state.reset_offsets("g", &[(tp.clone(), 5, String::new())], &c.topics, &bounds, &c.limits, 4_000);
    c.append(&out.unwrap().records);
    let window = c.state.lag.window("g", &tp);
    assert_eq!(window.last(), Some(&sample(5, 4_000)));
    let rules = StatusRules { window_commits: 10, stop_ms: 60_000 };
    assert_eq!(partition_status(&window, 95, 4_500, &rules), ConsumerStatus::Rewind);
    // A compaction's rewrite replays the latest commit again: not a new commit.
    for r in c.group().live_records("g") {
        c.append(&[r]);
    }
    assert_eq!(c.state.lag.window("g", &tp), window);
    // Deleting the group forgets its windows.
    let records = c.state.delete_group("g").unwrap();
    c.append(&records);
    assert_eq!(c.state.lag.tracked(), 0);
}

#[test]
fn a_rewrite_of_live_records_replays_to_the_same_state() {
    let mut c = Coord::new(&[("t", 3), ("u", 2)]);
    let mut members = BTreeMap::new();
    for id in ["a", "b"] {
        members.insert(id.to_owned(), c.join(id, &["t", "u"]));
    }
    settle(&mut c, &mut members, &["t", "u"]);
    let a = members["a"].clone();
    let tp = a.assignment.iter().next().unwrap().clone();
    commit(&mut c, "a", a.member_epoch, (&tp.topic, tp.partition), 3).unwrap();
    let mut rebuilt = Groups::default();
    for r in c.group().live_records("g") {
        rebuilt.replay(0, &r.encode()).unwrap();
    }
    assert_eq!(rebuilt, c.state);
}

/// The compaction of DESIGN.md §6.1: note the replay position T, rewrite every live key while
/// other operations keep changing the groups, then trim anything below T. Replaying from any
/// start at or below T must rebuild exactly the state of the whole history.
#[test]
fn a_rewrite_above_a_floor_lets_everything_below_it_go() {
    let mut c = Coord::new(&[("t", 4)]);
    // Below the floor: two groups, members, commits.
    let mut members = BTreeMap::new();
    for id in ["a", "b", "c"] {
        members.insert(id.to_owned(), c.join(id, &["t"]));
    }
    settle(&mut c, &mut members, &["t"]);
    for (id, m) in members.clone() {
        for tp in &m.assignment {
            commit(&mut c, &id, m.member_epoch, (&tp.topic, tp.partition), 7).unwrap();
        }
    }
    c.hb(HeartbeatInput {
        group: "h".into(),
        member_id: "x".into(),
        subscribed: vec!["t".into()],
        ..Default::default()
    })
    .unwrap();
    let floor = c.log.len();
    assert_eq!(c.state.keys(), ["g", "h"]);

    // Above the floor: "c" leaves and "h" is deleted before the rewrite reaches them, "a"
    // commits between the rewrite's two chunks.
    let removed = c.state.remove_member("g", "c", &c.topics, c.now_ms).unwrap();
    c.append(&removed);
    let removed = c.state.remove_member("h", "x", &c.topics, c.now_ms).unwrap();
    c.append(&removed);
    let deleted = c.state.delete_group("h").unwrap();
    c.append(&deleted);
    let live = Shard::live_records(&c.state, "g");
    assert!(live.windows(2).all(|w| w[0].key < w[1].key), "live records come sorted by key");
    let first = &live[..live.len() / 2];
    let rewrite = |c: &mut Coord, records: &[Record]| {
        for r in records {
            c.state.replay(c.offset, r).unwrap();
            c.log.push(r.clone());
            c.offset += 1;
        }
    };
    rewrite(&mut c, first);
    let a = members["a"].clone();
    let tp = a.assignment.iter().next().unwrap().clone();
    commit(&mut c, "a", a.member_epoch, (&tp.topic, tp.partition), 9).unwrap();
    // The next chunk is read afresh, as the runtime does: the keys after the last one written.
    let cursor = first.last().map(|r| r.key.clone()).unwrap_or_default();
    let rest: Vec<Record> = Shard::live_records(&c.state, "g").into_iter().filter(|r| r.key > cursor).collect();
    assert!(!rest.is_empty());
    rewrite(&mut c, &rest);
    assert!(Shard::live_records(&c.state, "h").is_empty());

    for start in 0..=floor {
        let mut rebuilt = Groups::default();
        for (i, r) in c.log[start..].iter().enumerate() {
            rebuilt.replay((start + i) as u64, r).unwrap();
        }
        assert_eq!(rebuilt, c.state, "replayed from {start} (floor {floor})");
    }
}

#[test]
fn the_group_partition_follows_fnv1a() {
    assert_eq!(partition_for_group("", 8), (0xcbf2_9ce4_8422_2325u64 % 8) as u32);
    assert!(partition_for_group("orders-consumers", 8) < 8);
    assert_eq!(partition_for_group("x", 0), 0);
}

#[test]
fn undecodable_records_are_replay_errors() {
    let mut g = Groups::default();
    let bad = [
        crate::Record { key: vec![], value: None },
        crate::Record { key: b"z\0g".to_vec(), value: None },
        crate::Record { key: b"g\0g".to_vec(), value: Some(b"{".to_vec()) },
        crate::Record { key: b"o\0g\0t\0x".to_vec(), value: None },
    ];
    for r in bad {
        assert!(g.replay(7, &r).is_err());
    }
    assert_eq!(g, Groups::default());
}

mod random {
    //! Random member behaviour (join, heartbeat with or without revoking, leave, crash, commit)
    //! against the pure coordinator: no partition is ever owned twice, commits never go back.
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_schedules_keep_the_invariants(steps in proptest::collection::vec((0u8..6, 0usize..4, 0u64..100), 1..120)) {
            let mut c = Coord::new(&[("t", 5)]);
            let mut last: BTreeMap<String, HeartbeatOutput> = BTreeMap::new();
            let mut committed: BTreeMap<Tp, u64> = BTreeMap::new();
            for (action, who, n) in steps {
                let id = format!("m{who}");
                match action {
                    0 => {
                        if let Ok(out) = c.hb(HeartbeatInput { group: "g".into(), member_id: id.clone(), subscribed: vec!["t".into()], ..Default::default() }) {
                            last.insert(id, out);
                        }
                    }
                    1 | 2 => {
                        let Some(prev) = last.get(&id).cloned() else { continue };
                        // Action 2: a slow member still reports what it is revoking.
                        let mut owned: Vec<Tp> = prev.assignment.iter().cloned().collect();
                        if action == 2 {
                            owned.extend(prev.revoking.iter().cloned());
                        }
                        let input = HeartbeatInput { group: "g".into(), member_id: id.clone(), member_epoch: prev.member_epoch, subscribed: vec!["t".into()], owned, ..Default::default() };
                        match c.hb(input) {
                            Ok(out) => { last.insert(id, out); }
                            Err(_) => { last.remove(&id); }
                        }
                    }
                    3 => {
                        c.hb(HeartbeatInput { group: "g".into(), member_id: id.clone(), member_epoch: -1, ..Default::default() }).unwrap();
                        last.remove(&id);
                    }
                    4 => {
                        let topics = c.topics.clone();
                        if let Some(records) = c.state.remove_member("g", &id, &topics, 0) {
                            c.append(&records);
                        }
                    }
                    _ => {
                        let Some(prev) = last.get(&id).cloned() else { continue };
                        let Some(tp) = prev.assignment.iter().next().cloned() else { continue };
                        if let Ok(out) = commit(&mut c, &id, prev.member_epoch, (&tp.topic, tp.partition), n) {
                            let now = out[0].1.offset;
                            let before = committed.insert(tp.clone(), now).unwrap_or(0);
                            prop_assert!(now >= before, "{tp} went back from {before} to {now}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_refusal_reason_is_listed_once() {
    let tp = Tp { topic: "t".into(), partition: 0 };
    let (g, m) = (String::from("g"), String::from("m"));
    let errors = [
        GroupError::Invalid("x".into()),
        GroupError::UnknownMember { group: g.clone(), member: m.clone() },
        GroupError::FencedEpoch { member: m.clone(), sent: 1, current: 2 },
        GroupError::StaleEpoch { member: m, epoch: 1, tp: tp.clone() },
        GroupError::OffsetAboveHighWatermark { tp: tp.clone(), offset: 2, high_watermark: 1 },
        GroupError::OffsetBelowLogStart { tp, offset: 0, log_start: 1 },
        GroupError::UnknownTopic("t".into()),
        GroupError::UnknownGroup(g.clone()),
        GroupError::GroupNotEmpty { group: g.clone(), members: 1 },
        GroupError::GroupMaxSize { group: g.clone(), max: 1 },
        GroupError::GroupsMax(1),
        GroupError::MetadataTooLarge { size: 2, max: 1 },
        GroupError::InconsistentAssignor { group: g.clone(), group_assignor: "a".into(), asked: "b".into() },
        GroupError::StaleAttempt { tp: Tp::new("t", 0), offset: 1, sent: 1, expected: 2 },
        GroupError::RecordSettled { tp: Tp::new("t", 0), offset: 1, state: "resolved" },
        GroupError::RetryBacklogFull { group: g.clone(), what: "x", max: 1 },
        GroupError::PublishesPending { group: g, pending: 1 },
        GroupError::ProducerIdNeeded,
    ];
    let reasons: BTreeSet<&str> = errors.iter().map(GroupError::reason).collect();
    assert_eq!(reasons.len(), errors.len(), "two refusals share a reason");
    assert_eq!(reasons, GroupError::REASONS.iter().copied().collect::<BTreeSet<_>>());
}

mod retry {
    use super::*;
    use crate::groups::retry::headers;

    fn nack_input(member: &str, epoch: i32, offset: u64, attempt: u32, retryable: bool) -> NackInput {
        NackInput {
            group: "g".into(),
            member_id: member.into(),
            member_epoch: epoch,
            tp: Tp::new("t", 0),
            offset,
            attempt,
            error: format!("failure {attempt}"),
            retryable,
            policy: RetryPolicy { max_attempts: 3, backoff_min_ms: 100, backoff_max_ms: 1_000 },
            record: DeadLetterRecord {
                key: Some(b"k".to_vec()),
                value: Some(b"v".to_vec()),
                headers: vec![PublishHeader { key: headers::ATTEMPTS.into(), value: Some(b"99".to_vec()) }],
                timestamp_ms: 7,
            },
        }
    }

    fn nack(c: &mut Coord, input: &NackInput, spare: Option<i64>) -> Result<NackOutput, GroupError> {
        let out = c.state.nack(input, &c.topics, &RetryLimits::default(), c.now_ms, 12_345, spare)?;
        c.append(&out.records);
        Ok(out.response)
    }

    fn one_member() -> (Coord, i32) {
        let mut c = Coord::new(&[("t", 1)]);
        let a = c.join("a", &["t"]);
        (c, a.member_epoch)
    }

    #[test]
    fn a_poison_record_is_attempted_max_attempts_times_then_dead_lettered_once() {
        let (mut c, epoch) = one_member();
        let first = nack(&mut c, &nack_input("a", epoch, 5, 1, true), None).unwrap();
        assert_eq!((first.attempts, first.dead_lettered), (1, false));
        let due = first.due_at_ms.unwrap();
        assert!((c.now_ms + 50..=c.now_ms + 100).contains(&due), "backoff in the upper half of 100 ms: {due}");
        // Not handed out before it is due, then to its owner with the next attempt number.
        assert!(c.state.due_redeliveries("g", "a", due - 1, 10).is_empty());
        let handed = c.state.due_redeliveries("g", "a", due, 10);
        assert_eq!(handed, vec![crate::groups::retry::Due { tp: Tp::new("t", 0), offset: 5, attempt: 2 }]);
        // A retry of the first nack records nothing; a nack of a future attempt is stale.
        let again = c.state.nack(&nack_input("a", epoch, 5, 1, true), &c.topics, &RetryLimits::default(), 0, 0, None);
        assert!(again.unwrap().records.is_empty());
        assert!(matches!(
            nack(&mut c, &nack_input("a", epoch, 5, 3, true), None),
            Err(GroupError::StaleAttempt { expected: 2, .. })
        ));
        nack(&mut c, &nack_input("a", epoch, 5, 2, true), None).unwrap();
        // The last attempt decides the dead letter, which needs a producer id.
        assert_eq!(nack(&mut c, &nack_input("a", epoch, 5, 3, true), None).unwrap_err(), GroupError::ProducerIdNeeded);
        let last = nack(&mut c, &nack_input("a", epoch, 5, 3, true), Some(77)).unwrap();
        assert!(last.dead_lettered && last.used_spare_id);
        let g = c.group();
        assert_eq!(g.publishes.len(), 1);
        let ((target, stamp), p) = g.publishes.iter().next().unwrap();
        assert_eq!((target.topic.as_str(), target.partition, *stamp), ("g.dlq", 0, (0, 0)));
        assert_eq!((p.producer_id, p.value.as_deref()), (77, Some(&b"v"[..])));
        let h = |k: &str| p.headers.iter().filter(|h| h.key == k).map(|h| h.value.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(h(headers::ATTEMPTS), vec![b"3".to_vec()], "the old attempts header is replaced");
        assert_eq!(h(headers::ORIGIN_OFFSET), vec![b"5".to_vec()]);
        assert_eq!(h(headers::LAST_ERROR), vec![b"failure 3".to_vec()]);
        // Its retry is answered alike and decides nothing more, as is the record read again
        // from the commit below it; it is never handed out again.
        for attempt in [3, 1] {
            let retried =
                c.state.nack(&nack_input("a", epoch, 5, attempt, true), &c.topics, &RetryLimits::default(), 0, 0, None);
            let retried = retried.unwrap();
            assert!(retried.records.is_empty() && retried.response.dead_lettered);
        }
        assert!(c.state.due_redeliveries("g", "a", i64::MAX, 10).is_empty());
        // Confirming the publish forgets the decision; the publisher moves on.
        let records = c.state.confirm_published("g", target, (0, 0));
        c.append(&records);
        assert!(c.group().publishes.is_empty());
        assert_eq!(c.group().publishers[&Tp::new("g.dlq", 0)].next_sequence, 1);
    }

    #[test]
    fn a_non_retryable_failure_is_dead_lettered_at_once_and_a_second_uses_the_next_sequence() {
        let (mut c, epoch) = one_member();
        assert!(nack(&mut c, &nack_input("a", epoch, 1, 1, false), Some(9)).unwrap().dead_lettered);
        let second = nack(&mut c, &nack_input("a", epoch, 2, 1, false), Some(10)).unwrap();
        assert!(second.dead_lettered && !second.used_spare_id, "the publisher exists");
        let stamps: Vec<(i16, i32)> = c.group().publishes.keys().map(|(_, s)| *s).collect();
        assert_eq!(stamps, vec![(0, 0), (0, 1)]);
        // A group with dead letters still to publish cannot be deleted.
        c.hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() })
            .unwrap();
        assert!(matches!(c.state.delete_group("g"), Err(GroupError::PublishesPending { pending: 2, .. })));
    }

    #[test]
    fn an_idle_publisher_starts_a_new_epoch_once_nothing_is_unconfirmed() {
        let (mut c, epoch) = one_member();
        nack(&mut c, &nack_input("a", epoch, 1, 1, false), Some(9)).unwrap();
        c.now_ms += RetryLimits::default().publisher_idle_ms * 2;
        // Unconfirmed: the epoch stays, so the first decision can still be resent.
        nack(&mut c, &nack_input("a", epoch, 2, 1, false), None).unwrap();
        let stamps: Vec<(i16, i32)> = c.group().publishes.keys().map(|(_, s)| *s).collect();
        assert_eq!(stamps, vec![(0, 0), (0, 1)]);
        let records = c.state.confirm_published("g", &Tp::new("g.dlq", 0), (0, 1));
        c.append(&records);
        c.now_ms += RetryLimits::default().publisher_idle_ms * 2;
        nack(&mut c, &nack_input("a", epoch, 3, 1, false), None).unwrap();
        let stamps: Vec<(i16, i32)> = c.group().publishes.keys().map(|(_, s)| *s).collect();
        assert_eq!(stamps, vec![(1, 0)]);
    }

    #[test]
    fn a_record_acknowledged_on_its_last_attempt_is_never_dead_lettered() {
        let (mut c, epoch) = one_member();
        nack(&mut c, &nack_input("a", epoch, 5, 1, true), None).unwrap();
        nack(&mut c, &nack_input("a", epoch, 5, 2, true), None).unwrap();
        let settle = |attempt| SettleInput {
            group: "g".into(),
            member_id: "a".into(),
            member_epoch: epoch,
            tp: Tp::new("t", 0),
            offset: 5,
            attempt,
        };
        assert!(matches!(c.state.settle(&settle(2)), Err(GroupError::StaleAttempt { expected: 3, .. })));
        let out = c.state.settle(&settle(3)).unwrap();
        c.append(&out.records);
        assert!(c.state.settle(&settle(3)).unwrap().records.is_empty(), "a retried ack is answered alike");
        assert!(matches!(
            nack(&mut c, &nack_input("a", epoch, 5, 3, true), Some(1)),
            Err(GroupError::RecordSettled { state: "resolved", .. })
        ));
        assert!(c.group().publishes.is_empty());
        // The commit passing it forgets it; a late nack is then refused as committed.
        commit(&mut c, "a", epoch, ("t", 0), 6).unwrap();
        assert!(c.group().redeliveries.is_empty());
        assert!(matches!(
            nack(&mut c, &nack_input("a", epoch, 5, 1, true), Some(1)),
            Err(GroupError::RecordSettled { state: "committed", .. })
        ));
    }

    #[test]
    fn a_pending_redelivery_survives_the_commit_and_goes_to_the_next_owner() {
        let mut c = Coord::new(&[("t", 1)]);
        let a = c.join("a", &["t"]);
        nack(&mut c, &nack_input("a", a.member_epoch, 5, 1, true), None).unwrap();
        commit(&mut c, "a", a.member_epoch, ("t", 0), 9).unwrap();
        assert_eq!(c.group().redeliveries.len(), 1, "later records flow; the failed one waits");
        // a leaves; b takes the partition and is handed the redelivery.
        c.hb(HeartbeatInput { group: "g".into(), member_id: "a".into(), member_epoch: -1, ..Default::default() })
            .unwrap();
        let b = c.join("b", &["t"]);
        assert_eq!(c.state.due_redeliveries("g", "b", i64::MAX, 10).len(), 1);
        // a's late nack is fenced; b's counts.
        assert!(matches!(
            nack(&mut c, &nack_input("a", a.member_epoch, 5, 2, true), None),
            Err(GroupError::UnknownMember { .. })
        ));
        assert_eq!(nack(&mut c, &nack_input("b", b.member_epoch, 5, 2, true), None).unwrap().attempts, 2);
    }

    #[test]
    fn refused_nacks_change_nothing_and_bounds_hold() {
        let (mut c, epoch) = one_member();
        let limits = RetryLimits { redeliveries_max: 2, ..RetryLimits::default() };
        for offset in 0..2 {
            let out = c.state.nack(&nack_input("a", epoch, offset, 1, true), &c.topics, &limits, 0, 0, None).unwrap();
            c.append(&out.records);
        }
        let full = c.state.nack(&nack_input("a", epoch, 2, 1, true), &c.topics, &limits, 0, 0, None);
        assert!(matches!(full, Err(GroupError::RetryBacklogFull { max: 2, .. })));
        let mut bad = nack_input("a", epoch, 3, 1, true);
        bad.policy.max_attempts = 0;
        assert!(matches!(nack(&mut c, &bad, None), Err(GroupError::Invalid(_))));
        let mut big = nack_input("a", epoch, 3, 1, true);
        big.record.value = Some(vec![0; RetryLimits::default().record_bytes_max + 1]);
        assert!(matches!(nack(&mut c, &big, None), Err(GroupError::Invalid(_))));
        let mut other = nack_input("a", epoch, 3, 1, true);
        other.tp = Tp::new("nope", 0);
        assert!(matches!(nack(&mut c, &other, None), Err(GroupError::UnknownTopic(_))));
        assert_eq!(c.group().redeliveries.len(), 2);
    }

    #[test]
    fn a_rewrite_of_live_records_keeps_retry_state() {
        let (mut c, epoch) = one_member();
        nack(&mut c, &nack_input("a", epoch, 1, 1, true), None).unwrap();
        nack(&mut c, &nack_input("a", epoch, 2, 1, false), Some(4)).unwrap();
        let mut rebuilt = Groups::default();
        for r in Shard::live_records(&c.state, "g") {
            rebuilt.replay(0, &r).unwrap();
        }
        assert_eq!(rebuilt, c.state);
        assert_eq!(rebuilt.get("g").unwrap().publishes.len(), 1);
    }

    #[test]
    fn a_dead_letter_is_replayed_to_its_origin_once() {
        let (mut c, epoch) = one_member();
        nack(&mut c, &nack_input("a", epoch, 5, 1, false), Some(9)).unwrap();
        let letter = c.group().publishes.values().next().unwrap().clone();
        let letter =
            DeadLetterRecord { key: letter.key, value: letter.value, headers: letter.headers, timestamp_ms: 1 };
        let limits = RetryLimits::default();
        // The origin partition needs a publisher of its own: a producer id first.
        let first = c.state.replay_dead_letters("g", &[(0, letter.clone())], &c.topics, &limits, 5, None);
        assert_eq!(first.unwrap_err(), GroupError::ProducerIdNeeded);
        let out = c.state.replay_dead_letters("g", &[(0, letter.clone())], &c.topics, &limits, 5, Some(30)).unwrap();
        assert_eq!((out.response.replayed.clone(), out.response.used_spare_id), (vec![0], true));
        c.append(&out.records);
        let (_, p) = c.group().publishes.iter().find(|((tp, _), _)| *tp == Tp::new("t", 0)).unwrap();
        assert_eq!(p.producer_id, 30);
        let names: Vec<&str> = p.headers.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(names, vec![headers::REPLAYED_FROM], "the old keel headers go: a fresh attempt count");
        // Replaying it again does nothing; another letter with it is replayed.
        let again = c.state.replay_dead_letters("g", &[(0, letter.clone()), (1, letter)], &c.topics, &limits, 6, None);
        let again = again.unwrap();
        assert_eq!((again.response.already, again.response.replayed), (vec![0], vec![1]));
        c.append(&again.records);
        assert_eq!(c.group().replayed, vec![(0, 2)]);
        // Something that is not a dead letter is refused, and changes nothing.
        let plain = DeadLetterRecord { value: Some(b"x".to_vec()), ..DeadLetterRecord::default() };
        let refused = c.state.replay_dead_letters("g", &[(7, plain)], &c.topics, &limits, 7, None);
        assert!(matches!(refused, Err(GroupError::Invalid(_))));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitters_in_its_upper_half() {
        let p = RetryPolicy { max_attempts: 10, backoff_min_ms: 100, backoff_max_ms: 1_000 };
        assert_eq!(p.backoff_ms(1, 0), 50);
        assert_eq!(p.backoff_ms(1, 50), 100);
        assert_eq!(p.backoff_ms(3, 200), 400);
        assert_eq!(p.backoff_ms(30, u64::MAX), 500 + u64::MAX % 501);
    }
}
