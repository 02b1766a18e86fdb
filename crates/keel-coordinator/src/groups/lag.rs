//! Consumer health, Burrow-style: each group's recent commits per partition (a bounded window,
//! rebuilt from the replayed commit records), and the pure rules that turn a window, the
//! partition's lag now and the time now into a status — OK, WARN, STALL, STOP or REWIND.
//!
//! The windows are a view of recent history, not group state: a compaction rewrites only the
//! latest commit of each partition, so a replica that replays a compacted partition starts with
//! windows of one commit and fills them as commits arrive. Only the rules that need a full
//! window (STALL, WARN) wait for that; the rest judge from the latest commit alone.

use std::collections::{BTreeMap, VecDeque};

use super::records::{Committed, Tp};

/// A consumer's health on one partition (or a group's: the worst of its partitions). Ordered
/// by severity, so the worst status of several is their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConsumerStatus {
    /// Caught up, or moving without falling behind.
    Ok,
    /// Consuming, but the lag grew at every commit of a full window.
    Warn,
    /// The committed offset went backwards within the window (an offset reset).
    Rewind,
    /// Commits arrive but the offset stays put while records wait.
    Stall,
    /// No commit for longer than the window took to fill (and the stop threshold) while
    /// records wait: the consumer is gone or hung.
    Stop,
}

impl ConsumerStatus {
    /// Every status, least severe first.
    pub const ALL: [ConsumerStatus; 5] =
        [ConsumerStatus::Ok, ConsumerStatus::Warn, ConsumerStatus::Rewind, ConsumerStatus::Stall, ConsumerStatus::Stop];

    /// The upper-case name clients see ("OK", "WARN", ...).
    pub fn name(self) -> &'static str {
        match self {
            ConsumerStatus::Ok => "OK",
            ConsumerStatus::Warn => "WARN",
            ConsumerStatus::Rewind => "REWIND",
            ConsumerStatus::Stall => "STALL",
            ConsumerStatus::Stop => "STOP",
        }
    }
}

/// One commit of a partition as the window keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitSample {
    /// The committed offset (the next one to consume).
    pub offset: u64,
    /// When the coordinator committed it (its clock).
    pub commit_ms: i64,
    /// The partition's high watermark the coordinator knew then; `None` for commits written
    /// before Keel recorded it.
    pub high_watermark: Option<u64>,
}

impl CommitSample {
    /// The sample of a committed offset.
    pub fn of(c: &Committed) -> CommitSample {
        CommitSample { offset: c.offset, commit_ms: c.commit_timestamp_ms, high_watermark: c.high_watermark }
    }

    /// The lag at this commit, when the high watermark is known.
    fn lag(&self) -> Option<u64> {
        self.high_watermark.map(|hw| hw.saturating_sub(self.offset))
    }
}

/// Bounds of the commit windows one coordinator shard keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimits {
    /// Commits kept per (group, partition): the window the rules judge.
    pub window_commits: usize,
    /// (group, partition) windows kept per shard; past it, the least recently committed one
    /// is dropped (its partition is then judged from its latest commit alone).
    pub tracked_max: usize,
}

impl Default for LagLimits {
    fn default() -> LagLimits {
        // Burrow's default window is 10 commits.
        LagLimits { window_commits: 10, tracked_max: 10_000 }
    }
}

#[derive(Debug, Clone, Default)]
struct Window {
    /// The log offset of the record that last changed it: its place in `recency`.
    last_record: u64,
    samples: VecDeque<CommitSample>,
}

/// The recent commits of every tracked (group, partition) of one shard, bounded in both
/// directions: `window_commits` per partition and `tracked_max` partitions.
#[derive(Debug, Clone, Default)]
pub struct LagWindows {
    limits: LagLimits,
    windows: BTreeMap<(String, Tp), Window>,
    /// Windows by the log offset of their latest commit: the least recently committed first.
    recency: BTreeMap<u64, (String, Tp)>,
}

impl LagWindows {
    /// Empty windows with these bounds (at least one commit per window, one window).
    pub fn new(limits: LagLimits) -> LagWindows {
        let limits = LagLimits { window_commits: limits.window_commits.max(1), tracked_max: limits.tracked_max.max(1) };
        LagWindows { limits, windows: BTreeMap::new(), recency: BTreeMap::new() }
    }

    /// The bounds.
    pub fn limits(&self) -> LagLimits {
        self.limits
    }

    /// Notes the commit replayed at log offset `record` (offsets only grow). A sample equal to
    /// the window's latest is the same commit rewritten by a compaction, not a new commit:
    /// counting it would look like a commit that did not move.
    pub fn observe(&mut self, record: u64, group: &str, tp: &Tp, sample: CommitSample) {
        let key = (group.to_owned(), tp.clone());
        if let Some(w) = self.windows.get(&key)
            && w.samples.back() == Some(&sample)
        {
            return;
        }
        if !self.windows.contains_key(&key)
            && self.windows.len() >= self.limits.tracked_max
            && let Some((_, oldest)) = self.recency.pop_first()
        {
            self.windows.remove(&oldest);
        }
        let w = self.windows.entry(key.clone()).or_default();
        if !w.samples.is_empty() {
            self.recency.remove(&w.last_record);
        }
        w.last_record = record;
        w.samples.push_back(sample);
        while w.samples.len() > self.limits.window_commits {
            w.samples.pop_front();
        }
        self.recency.insert(record, key);
    }

    /// Drops a partition's window (its committed offset was deleted).
    pub fn forget(&mut self, group: &str, tp: &Tp) {
        if let Some(w) = self.windows.remove(&(group.to_owned(), tp.clone())) {
            self.recency.remove(&w.last_record);
        }
    }

    /// A partition's window, oldest commit first; empty when it is not tracked.
    pub fn window(&self, group: &str, tp: &Tp) -> Vec<CommitSample> {
        self.windows
            .get(&(group.to_owned(), tp.clone()))
            .map(|w| w.samples.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many partitions have a window.
    pub fn tracked(&self) -> usize {
        self.windows.len()
    }
}

/// What the rules need besides the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRules {
    /// Commits a window must hold before STALL and WARN are judged.
    pub window_commits: usize,
    /// The shortest silence that counts as STOP, whatever the window's span.
    pub stop_ms: i64,
}

/// The status of one partition of a group: `window` holds its recent commits, oldest first (at
/// least the latest, when the group ever committed it), `lag` is the high watermark now minus
/// the committed offset. The worst status whose rule holds wins:
///
/// - no lag now: OK, whatever came before (the consumer has caught up);
/// - STOP: silent for longer than both the window's span and `stop_ms`;
/// - STALL: a full window of commits at one offset, each with records waiting;
/// - REWIND: an offset lower than the one before it in the window;
/// - WARN: a full window whose lag, records waiting at each commit, never fell and grew;
/// - OK otherwise. A window with a commit that had nothing waiting is never STALL or WARN.
pub fn partition_status(window: &[CommitSample], lag: u64, now_ms: i64, rules: &StatusRules) -> ConsumerStatus {
    if lag == 0 {
        return ConsumerStatus::Ok;
    }
    let (Some(first), Some(last)) = (window.first(), window.last()) else {
        // Never committed: nothing tells how long the records have waited for it.
        return ConsumerStatus::Ok;
    };
    let span_ms = last.commit_ms.saturating_sub(first.commit_ms);
    if now_ms.saturating_sub(last.commit_ms) > span_ms.max(rules.stop_ms) {
        return ConsumerStatus::Stop;
    }
    let full = window.len() >= rules.window_commits.max(2);
    let lags: Option<Vec<u64>> = window.iter().map(CommitSample::lag).collect();
    let waiting = lags.as_ref().filter(|l| l.iter().all(|&l| l > 0));
    if full && waiting.is_some() && window.iter().all(|s| s.offset == first.offset) {
        return ConsumerStatus::Stall;
    }
    if window.windows(2).any(|p| p[1].offset < p[0].offset) {
        return ConsumerStatus::Rewind;
    }
    if let Some(lags) = waiting.filter(|_| full)
        && lags.windows(2).all(|p| p[1] >= p[0])
        && lags.last() > lags.first()
    {
        return ConsumerStatus::Warn;
    }
    ConsumerStatus::Ok
}

/// A group's status: the worst of its partitions' (OK without any).
pub fn group_status(partitions: impl IntoIterator<Item = ConsumerStatus>) -> ConsumerStatus {
    partitions.into_iter().max().unwrap_or(ConsumerStatus::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: StatusRules = StatusRules { window_commits: 3, stop_ms: 10_000 };

    /// Commits as (offset, commit time, high watermark then).
    fn window(commits: &[(u64, i64, u64)]) -> Vec<CommitSample> {
        commits
            .iter()
            .map(|&(offset, commit_ms, hw)| CommitSample { offset, commit_ms, high_watermark: Some(hw) })
            .collect()
    }

    #[test]
    fn status_rules() {
        use ConsumerStatus::*;
        // (what, window, lag now, now, expected)
        #[rustfmt::skip]
        let table: &[(&str, Vec<CommitSample>, u64, i64, ConsumerStatus)] = &[
            ("caught up", window(&[(10, 0, 10), (20, 1_000, 20), (30, 2_000, 30)]), 0, 2_500, Ok),
            ("caught up after a long silence", window(&[(30, 0, 40)]), 0, 1_000_000, Ok),
            ("caught up after a rewind", window(&[(30, 0, 40), (5, 1_000, 40), (40, 2_000, 40)]), 0, 2_500, Ok),
            ("never committed", vec![], 100, 1_000_000, Ok),
            ("moving, lag falling", window(&[(10, 0, 40), (30, 1_000, 50), (50, 2_000, 55)]), 5, 2_500, Ok),
            ("one commit, recent", window(&[(10, 0, 20)]), 10, 9_000, Ok),
            ("one commit, silent past the threshold", window(&[(10, 0, 20)]), 10, 10_001, Stop),
            ("silent exactly the threshold", window(&[(10, 0, 20)]), 10, 10_000, Ok),
            ("silent past the threshold, not the span", window(&[(10, 0, 20), (20, 30_000, 30)]), 10, 50_000, Ok),
            ("silent past the span and the threshold", window(&[(10, 0, 20), (20, 30_000, 30)]), 10, 60_001, Stop),
            ("stopped beats stalled", window(&[(10, 0, 20), (10, 1_000, 25), (10, 2_000, 30)]), 20, 20_000, Stop),
            ("stalled: full window at one offset, records waiting", window(&[(10, 0, 20), (10, 1_000, 25), (10, 2_000, 30)]), 20, 2_500, Stall),
            ("not stalled before the window is full", window(&[(10, 0, 20), (10, 1_000, 25)]), 20, 2_500, Ok),
            ("not stalled when caught up at one commit", window(&[(10, 0, 10), (10, 1_000, 25), (10, 2_000, 30)]), 20, 2_500, Ok),
            ("rewind", window(&[(30, 0, 40), (5, 1_000, 40)]), 35, 1_500, Rewind),
            ("rewind in a full window", window(&[(30, 0, 40), (5, 1_000, 40), (10, 2_000, 40)]), 30, 2_500, Rewind),
            ("warn: moving, lag growing", window(&[(10, 0, 20), (20, 1_000, 40), (30, 2_000, 60)]), 30, 2_500, Warn),
            ("warn: lag fixed, then growing", window(&[(10, 0, 20), (20, 1_000, 30), (30, 2_000, 45)]), 15, 2_500, Warn),
            ("lag fixed over the window", window(&[(10, 0, 20), (20, 1_000, 30), (30, 2_000, 40)]), 10, 2_500, Ok),
            ("lag grew, then fell", window(&[(10, 0, 20), (20, 1_000, 40), (30, 2_000, 35)]), 5, 2_500, Ok),
            ("no warn before the window is full", window(&[(10, 0, 20), (20, 1_000, 40)]), 20, 1_500, Ok),
            ("no warn with a commit that had nothing waiting", window(&[(20, 0, 20), (20, 1_000, 40), (30, 2_000, 60)]), 30, 2_500, Ok),
        ];
        for (what, window, lag, now_ms, expected) in table {
            assert_eq!(partition_status(window, *lag, *now_ms, &RULES), *expected, "{what}");
        }
    }

    #[test]
    fn unknown_high_watermarks_judge_only_what_needs_none() {
        let old = |offset, commit_ms| CommitSample { offset, commit_ms, high_watermark: None };
        let stalled = [old(10, 0), old(10, 1_000), old(10, 2_000)];
        assert_eq!(partition_status(&stalled, 5, 2_500, &RULES), ConsumerStatus::Ok);
        assert_eq!(partition_status(&stalled, 5, 20_000, &RULES), ConsumerStatus::Stop);
        assert_eq!(partition_status(&[old(10, 0), old(5, 1_000)], 5, 1_500, &RULES), ConsumerStatus::Rewind);
    }

    #[test]
    fn group_status_is_the_worst() {
        use ConsumerStatus::*;
        assert_eq!(group_status([]), Ok);
        assert_eq!(group_status([Ok, Warn, Ok]), Warn);
        assert_eq!(group_status([Warn, Rewind]), Rewind);
        assert_eq!(group_status([Rewind, Stall, Warn]), Stall);
        assert_eq!(group_status([Stall, Stop, Ok]), Stop);
        let names: Vec<&str> = ConsumerStatus::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["OK", "WARN", "REWIND", "STALL", "STOP"]);
    }

    #[test]
    fn windows_are_bounded_and_skip_rewritten_commits() {
        let mut w = LagWindows::new(LagLimits { window_commits: 3, tracked_max: 2 });
        let tp = Tp::new("t", 0);
        let s = |offset| CommitSample { offset, commit_ms: offset as i64, high_watermark: Some(100) };
        for (record, offset) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            w.observe(record, "g", &tp, s(offset));
        }
        assert_eq!(w.window("g", &tp), [s(20), s(30), s(40)], "the oldest commit leaves a full window");
        // A compaction rewrites the latest commit as it is: not a commit that did not move.
        w.observe(5, "g", &tp, s(40));
        assert_eq!(w.window("g", &tp).len(), 3);
        assert_eq!(w.window("g", &tp).last(), Some(&s(40)));
        // A third partition displaces the least recently committed.
        w.observe(6, "h", &tp, s(1));
        w.observe(7, "g", &tp, s(50));
        w.observe(8, "i", &tp, s(2));
        assert_eq!(w.tracked(), 2);
        assert!(w.window("h", &tp).is_empty(), "h committed least recently");
        assert_eq!(w.window("i", &tp), [s(2)]);
        w.forget("g", &tp);
        assert!(w.window("g", &tp).is_empty());
        assert_eq!(w.tracked(), 1);
    }
}
