//! Server-side assignors: who consumes which partition. Pure functions of the members'
//! subscriptions, the subscribed topics' partition counts and the previous target.

use std::collections::{BTreeMap, BTreeSet};

use super::records::Tp;

/// The assignors a group may use.
pub const ASSIGNORS: [&str; 2] = ["uniform", "range"];
/// The assignor of a group whose first member did not name one.
pub const ASSIGNOR_DEFAULT: &str = "uniform";

/// Input of an assignor: each member's subscription and each subscribed topic's partitions.
#[derive(Debug, Clone, Copy)]
pub struct AssignInput<'a> {
    /// Subscribed topics per member id.
    pub subscriptions: &'a BTreeMap<String, BTreeSet<String>>,
    /// Partition counts of the topics (a subscribed topic missing here does not exist yet).
    pub topics: &'a BTreeMap<String, u32>,
    /// The previous target assignment (stickiness).
    pub previous: &'a BTreeMap<String, BTreeSet<Tp>>,
}

/// Runs the named assignor (`uniform` for an unknown name: names are checked at join).
pub fn assign(name: &str, input: AssignInput<'_>) -> BTreeMap<String, BTreeSet<Tp>> {
    match name {
        "range" => range(input),
        _ => uniform(input),
    }
}

/// Every member eligible for each existing partition of a subscribed topic.
fn eligible(input: &AssignInput<'_>) -> BTreeMap<Tp, Vec<String>> {
    let mut out = BTreeMap::new();
    for (member, topics) in input.subscriptions {
        for topic in topics {
            let Some(&count) = input.topics.get(topic) else { continue };
            for p in 0..count {
                out.entry(Tp::new(topic.clone(), p)).or_insert_with(Vec::new).push(member.clone());
            }
        }
    }
    out
}

/// Sticky and balanced: each member keeps what it had (while still subscribed), new or orphaned
/// partitions go to the eligible member with the fewest, then partitions move one at a time
/// from the fullest member to an eligible one with at least two fewer until none can. Adding
/// one member to a group of ten with P partitions therefore moves at most ceil(P/11).
pub fn uniform(input: AssignInput<'_>) -> BTreeMap<String, BTreeSet<Tp>> {
    let eligible = eligible(&input);
    let mut out: BTreeMap<String, BTreeSet<Tp>> =
        input.subscriptions.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    let mut owner: BTreeMap<Tp, String> = BTreeMap::new();
    for (member, partitions) in input.previous {
        let Some(mine) = out.get_mut(member) else { continue };
        for tp in partitions {
            let ok = eligible.get(tp).is_some_and(|e| e.contains(member));
            if ok && !owner.contains_key(tp) {
                mine.insert(tp.clone());
                owner.insert(tp.clone(), member.clone());
            }
        }
    }
    for (tp, members) in &eligible {
        if owner.contains_key(tp) {
            continue;
        }
        if let Some(m) = members.iter().min_by_key(|m| (out.get(*m).map_or(0, BTreeSet::len), (*m).clone())) {
            out.entry(m.clone()).or_default().insert(tp.clone());
            owner.insert(tp.clone(), m.clone());
        }
    }
    // Balance. Each move lowers the sum of squared counts, so the loop ends; its bound is a
    // backstop against a bug, not a limit that should ever bind.
    let mut moves_left = eligible.len().saturating_mul(input.subscriptions.len()).saturating_add(1);
    while moves_left > 0 {
        moves_left -= 1;
        let mut by_count: Vec<(usize, &String)> = out.iter().map(|(m, s)| (s.len(), m)).collect();
        by_count.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let mut moved = None;
        'search: for (count, from) in &by_count {
            // Move the highest-numbered partitions first so that the lowest stay put.
            for tp in out[*from].iter().rev() {
                let target = eligible[tp]
                    .iter()
                    .filter(|m| *m != *from && out[*m].len() + 2 <= *count)
                    .min_by_key(|m| (out[*m].len(), (*m).clone()));
                if let Some(to) = target {
                    moved = Some(((*from).clone(), to.clone(), tp.clone()));
                    break 'search;
                }
            }
        }
        let Some((from, to, tp)) = moved else { break };
        if let Some(s) = out.get_mut(&from) {
            s.remove(&tp);
        }
        out.entry(to).or_default().insert(tp);
    }
    out
}

/// Kafka's range assignor: per topic, the subscribed members in id order take contiguous
/// ranges of partitions, the first `P mod M` of them one more.
pub fn range(input: AssignInput<'_>) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut out: BTreeMap<String, BTreeSet<Tp>> =
        input.subscriptions.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (topic, &count) in input.topics {
        let members: Vec<&String> =
            input.subscriptions.iter().filter(|(_, t)| t.contains(topic)).map(|(m, _)| m).collect();
        if members.is_empty() {
            continue;
        }
        let n = members.len() as u32;
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, m) in members.iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            let set = out.entry((*m).clone()).or_default();
            for p in next..next + take {
                set.insert(Tp::new(topic.clone(), p));
            }
            next += take;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn subs(members: usize, topics: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        (0..members).map(|i| (format!("m{i:02}"), topics.iter().map(|t| (*t).to_owned()).collect())).collect()
    }

    fn counts(a: &BTreeMap<String, BTreeSet<Tp>>) -> Vec<usize> {
        a.values().map(BTreeSet::len).collect()
    }

    fn check_complete(a: &BTreeMap<String, BTreeSet<Tp>>, topics: &BTreeMap<String, u32>) {
        let mut seen = BTreeSet::new();
        for set in a.values() {
            for tp in set {
                assert!(seen.insert(tp.clone()), "{tp} assigned twice");
            }
        }
        let total: u32 = topics.values().sum();
        assert_eq!(seen.len(), total as usize, "every partition assigned exactly once");
    }

    #[test]
    fn uniform_balances_and_covers() {
        let topics: BTreeMap<String, u32> = [("a".to_owned(), 7), ("b".to_owned(), 5)].into();
        let s = subs(5, &["a", "b"]);
        let a = uniform(AssignInput { subscriptions: &s, topics: &topics, previous: &BTreeMap::new() });
        check_complete(&a, &topics);
        let c = counts(&a);
        assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1, "{c:?}");
    }

    #[test]
    fn uniform_adding_one_member_to_ten_moves_at_most_ceil_p_over_11() {
        for partitions in [1u32, 10, 11, 12, 57, 100, 1000] {
            let topics: BTreeMap<String, u32> = [("t".to_owned(), partitions)].into();
            let ten = subs(10, &["t"]);
            let before = uniform(AssignInput { subscriptions: &ten, topics: &topics, previous: &BTreeMap::new() });
            let eleven = subs(11, &["t"]);
            let after = uniform(AssignInput { subscriptions: &eleven, topics: &topics, previous: &before });
            check_complete(&after, &topics);
            let moved: usize = before.iter().map(|(m, s)| s.difference(&after[m]).count()).sum();
            assert!(moved <= partitions.div_ceil(11) as usize, "P={partitions}: moved {moved}");
            let c = counts(&after);
            assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1, "P={partitions}: {c:?}");
        }
    }

    #[test]
    fn uniform_removing_a_member_moves_only_its_partitions() {
        let topics: BTreeMap<String, u32> = [("t".to_owned(), 30)].into();
        let s = subs(6, &["t"]);
        let before = uniform(AssignInput { subscriptions: &s, topics: &topics, previous: &BTreeMap::new() });
        let mut fewer = s.clone();
        fewer.remove("m03");
        let after = uniform(AssignInput { subscriptions: &fewer, topics: &topics, previous: &before });
        check_complete(&after, &topics);
        for (m, set) in &after {
            assert!(before[m].is_subset(set), "{m} lost partitions it could keep");
        }
    }

    #[test]
    fn uniform_respects_subscriptions() {
        let topics: BTreeMap<String, u32> = [("a".to_owned(), 4), ("b".to_owned(), 4)].into();
        let mut s = subs(2, &["a"]);
        s.insert("m09".into(), ["a".to_owned(), "b".to_owned()].into());
        let a = uniform(AssignInput { subscriptions: &s, topics: &topics, previous: &BTreeMap::new() });
        check_complete(&a, &topics);
        for (m, set) in &a {
            for tp in set {
                assert!(s[m].contains(&tp.topic), "{m} got {tp} without subscribing");
            }
        }
    }

    #[test]
    fn unknown_topics_and_members_without_subscriptions_get_nothing() {
        let topics: BTreeMap<String, u32> = [("a".to_owned(), 2)].into();
        let mut s = subs(1, &["missing"]);
        s.insert("m05".into(), ["a".to_owned()].into());
        let a = uniform(AssignInput { subscriptions: &s, topics: &topics, previous: &BTreeMap::new() });
        assert!(a["m00"].is_empty());
        assert_eq!(a["m05"].len(), 2);
    }

    #[test]
    fn range_gives_contiguous_ranges() {
        let topics: BTreeMap<String, u32> = [("t".to_owned(), 7)].into();
        let s = subs(3, &["t"]);
        let a = range(AssignInput { subscriptions: &s, topics: &topics, previous: &BTreeMap::new() });
        check_complete(&a, &topics);
        let parts: Vec<Vec<u32>> = a.values().map(|s| s.iter().map(|tp| tp.partition).collect()).collect();
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
    }
}
