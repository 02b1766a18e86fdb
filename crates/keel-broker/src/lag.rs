//! Consumer lag and status of the groups this node coordinates (README, "Consumer lag and
//! status"), for `DescribeGroup` and the `/metrics` scrape: lag in records (the partition's high
//! watermark now minus the committed offset), lag in seconds (how old the first record not yet
//! consumed is) and the Burrow-style status the pure rules of `keel_coordinator::groups::lag`
//! give from the commit window the shard replayed.
//!
//! High watermarks come from one `LocalStatus` question to every node (the partitions' leaders
//! know them). A record's timestamp costs one read of one batch at the committed offset, and is
//! cached per (partition, offset): a stopped consumer's offset does not move, so every later
//! look costs nothing; nothing here ever scans a log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use futures_util::StreamExt;
use keel_coordinator::groups::{
    CommitSample, ConsumerStatus, Group, Groups, StatusRules, Tp, group_status, partition_status,
};
use keel_proto::v1 as pb;
use keel_raft::GroupId;

use crate::metadata::Metadata;
use crate::service::{Api, Statuses};

/// Record timestamps remembered per node: far more than the partitions lagging at once.
const TIMESTAMPS_MAX: usize = 10_000;
/// Timestamp reads one evaluation may start; partitions beyond it get no lag in seconds this
/// time (the cache fills over successive evaluations).
pub(crate) const TIMESTAMP_READS_MAX: usize = 1_000;
/// Timestamp reads in flight at once.
const TIMESTAMP_READS_CONCURRENT: usize = 16;

/// Timestamps of the records at given offsets, the oldest entries dropped first.
#[derive(Debug, Default)]
pub(crate) struct TimestampCache {
    map: BTreeMap<(GroupId, u64), i64>,
    order: VecDeque<(GroupId, u64)>,
}

impl TimestampCache {
    fn get(&self, key: (GroupId, u64)) -> Option<i64> {
        self.map.get(&key).copied()
    }

    fn insert(&mut self, key: (GroupId, u64), timestamp_ms: i64) {
        if self.map.insert(key, timestamp_ms).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > TIMESTAMPS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// One partition of a group, as describe and the metrics show it.
#[derive(Debug, Clone)]
pub(crate) struct PartitionLag {
    pub(crate) tp: Tp,
    pub(crate) committed: Option<u64>,
    pub(crate) log_end: u64,
    pub(crate) lag_records: u64,
    /// `None` when the record's timestamp could not be read (this time).
    pub(crate) lag_seconds: Option<f64>,
    pub(crate) status: ConsumerStatus,
    pub(crate) last_commit_ms: Option<i64>,
    /// Commits the status was judged over.
    pub(crate) window_commits: usize,
}

/// A group's lag: its partitions and their aggregates.
#[derive(Debug, Clone)]
pub(crate) struct GroupLag {
    pub(crate) partitions: Vec<PartitionLag>,
    pub(crate) total_lag_records: u64,
    /// The oldest record any partition waits on (over the partitions whose age is known).
    pub(crate) max_lag_seconds: Option<f64>,
    pub(crate) status: ConsumerStatus,
}

/// The partitions a group's lag covers: those it committed and those its members subscribe to.
pub(crate) fn group_partitions(group: &Group, meta: &Metadata) -> BTreeSet<Tp> {
    let mut tps: BTreeSet<Tp> = group.offsets.keys().cloned().collect();
    for m in group.members.values() {
        for t in &m.subscribed {
            if let Some(topic) = meta.topics.get(t).filter(|t| !t.internal) {
                tps.extend((0..topic.partitions.len() as u32).map(|p| Tp::new(t.clone(), p)));
            }
        }
    }
    tps
}

/// The commits each partition of `name` is judged over: its window, or, for a partition
/// whose window was dropped (beyond `group_lag_partitions_max`), its latest commit.
pub(crate) fn windows(
    shard: &Groups,
    name: &str,
    group: &Group,
    tps: &BTreeSet<Tp>,
) -> BTreeMap<Tp, Vec<CommitSample>> {
    tps.iter()
        .map(|tp| {
            let mut window = shard.lag.window(name, tp);
            if window.is_empty()
                && let Some(c) = group.offsets.get(tp)
            {
                window.push(CommitSample::of(c));
            }
            (tp.clone(), window)
        })
        .collect()
}

impl Api {
    /// Lag and status of every group whose coordinator is active on this node, by name. Asks
    /// nothing of other nodes when there is none.
    pub(crate) async fn coordinated_lags(&self) -> Vec<(String, GroupLag)> {
        let coordinators: Vec<_> = lock(&self.inner.groups).values().cloned().collect();
        let meta = self.inner.metadata();
        let mut groups = Vec::new();
        for c in coordinators {
            if c.runtime.check_serving::<()>().is_err() {
                continue;
            }
            c.runtime.read(|s: &Groups| {
                for (name, group) in &s.groups {
                    let tps = group_partitions(group, &meta);
                    groups.push((name.clone(), group.clone(), windows(s, name, group, &tps)));
                }
            });
        }
        if groups.is_empty() {
            return Vec::new();
        }
        let (statuses, _) = self.gather(&meta).await;
        let mut reads = TIMESTAMP_READS_MAX;
        let mut lags = Vec::with_capacity(groups.len());
        for (name, group, windows) in groups {
            let lag = self.group_lag(&group, &windows, &meta, &statuses, &mut reads).await;
            lags.push((name, lag));
        }
        lags
    }

    /// The rules as this node is configured.
    fn status_rules(&self) -> StatusRules {
        let groups = &self.inner.config.groups;
        StatusRules { window_commits: groups.lag_limits.window_commits, stop_ms: groups.lag_stop_ms }
    }

    /// Lag and status of one group's partitions: `windows` from [`windows`], positions from
    /// `statuses` (one `gather`), at most `reads` timestamp reads (decremented by those made).
    pub(crate) async fn group_lag(
        &self,
        group: &Group,
        windows: &BTreeMap<Tp, Vec<CommitSample>>,
        meta: &Metadata,
        statuses: &Statuses,
        reads: &mut usize,
    ) -> GroupLag {
        let now_ms = self.inner.clock.now_ms();
        let rules = self.status_rules();
        let mut partitions = Vec::new();
        let mut lookups = Vec::new();
        for (tp, window) in windows {
            let Ok(p) = meta.partition(&tp.topic, tp.partition) else { continue };
            let view = statuses.get(&p.group);
            let log_end = view.map_or(0, |v| v.high_watermark);
            let log_start = view.map_or(0, |v| v.log_start_offset);
            let committed = group.offsets.get(tp);
            let from = committed.map_or(log_start, |c| c.offset).max(log_start);
            let lag_records = log_end.saturating_sub(from);
            let lag_seconds = match lag_records {
                0 => Some(0.0),
                _ => match self.cached_timestamp(p.group, from) {
                    Some(ts) => Some(age_seconds(now_ms, ts)),
                    None => {
                        if *reads > 0 {
                            *reads -= 1;
                            lookups.push((partitions.len(), p.group, tp.clone(), from));
                        }
                        None
                    }
                },
            };
            partitions.push(PartitionLag {
                tp: tp.clone(),
                committed: committed.map(|c| c.offset),
                log_end,
                lag_records,
                lag_seconds,
                status: partition_status(window, lag_records, now_ms, &rules),
                last_commit_ms: committed.map(|c| c.commit_timestamp_ms),
                window_commits: window.len(),
            });
        }
        let reads = futures_util::stream::iter(lookups)
            .map(|(i, raft_group, tp, offset)| async move { (i, self.read_timestamp(raft_group, &tp, offset).await) })
            .buffer_unordered(TIMESTAMP_READS_CONCURRENT)
            .collect::<Vec<_>>()
            .await;
        for (i, ts) in reads {
            if let (Some(p), Some(ts)) = (partitions.get_mut(i), ts) {
                p.lag_seconds = Some(age_seconds(now_ms, ts));
            }
        }
        GroupLag {
            total_lag_records: partitions.iter().fold(0u64, |t, p| t.saturating_add(p.lag_records)),
            max_lag_seconds: partitions.iter().filter_map(|p| p.lag_seconds).reduce(f64::max),
            status: group_status(partitions.iter().map(|p| p.status)),
            partitions,
        }
    }

    fn cached_timestamp(&self, raft_group: GroupId, offset: u64) -> Option<i64> {
        lock(&self.inner.lag_timestamps).get((raft_group, offset))
    }

    /// The timestamp of the record at `offset`: one fetch of at most one batch from a replica
    /// (the fetch path forwards it to one when this node has none).
    async fn read_timestamp(&self, raft_group: GroupId, tp: &Tp, offset: u64) -> Option<i64> {
        let fetch = pb::FetchRequest {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset,
            max_bytes: 1,
            max_wait_ms: 0,
            format: pb::FetchFormat::Records as i32,
        };
        let response = self.fetch(fetch, 0, 0).await.ok()?;
        // The first record at or after the offset: offsets are dense, so it is the one at it.
        let record = response.records.into_iter().next()?;
        lock(&self.inner.lag_timestamps).insert((raft_group, offset), record.timestamp_ms);
        Some(record.timestamp_ms)
    }
}

/// Seconds from `timestamp_ms` to `now_ms`; 0 for a record stamped in the future (producers
/// choose their timestamps).
fn age_seconds(now_ms: i64, timestamp_ms: i64) -> f64 {
    now_ms.saturating_sub(timestamp_ms).max(0) as f64 / 1000.0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
