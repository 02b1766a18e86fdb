//! Consumer-group coordinators on this node: one [`GroupCoordinator`] per `__consumer_offsets`
//! partition it hosts, each the generic [`Runtime`] over the pure [`Groups`] shard plus what
//! only a live coordinator has — heartbeat deadlines (volatile: a new coordinator gives every
//! member a full session timeout) and the timers that remove silent members and expire the
//! offsets of long-empty groups, by running operations like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_coordinator::Record;
use keel_coordinator::groups::{GroupRecord, Groups, TopicsView};
use keel_raft::GroupId;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::Inner;
use crate::coordinator::{RunError, Runtime};
use crate::publisher::PublishSource;

/// How often a coordinator looks for members whose session or revocation timed out.
const EXPIRY_POLL: Duration = Duration::from_millis(200);

/// When a member must next be heard from.
#[derive(Debug, Clone, Copy)]
struct MemberClock {
    session: Instant,
    revoke: Option<Instant>,
}

/// The coordinator of the groups of one `__consumer_offsets` partition.
pub struct GroupCoordinator {
    /// The partition's runtime.
    pub(crate) runtime: Arc<Runtime<Groups>>,
    /// Heartbeat and revocation deadlines per (group, member), only while active.
    clocks: Mutex<BTreeMap<(String, String), MemberClock>>,
    /// Woken when an operation decided a record to publish (`publisher.rs`).
    pub(crate) publish_wake: Arc<tokio::sync::Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Encodes group records for the runtime.
pub(crate) fn encode(records: &[GroupRecord]) -> Vec<Record> {
    records.iter().map(GroupRecord::encode).collect()
}

impl GroupCoordinator {
    /// Records that a member was heard from (and whether it is revoking).
    pub(crate) fn heard_from(&self, group: &str, member: &str, session_ms: u32, revoke_ms: Option<u32>) {
        let now = Instant::now();
        let mut clocks = lock(&self.clocks);
        let key = (group.to_owned(), member.to_owned());
        let revoke = match (revoke_ms, clocks.get(&key).and_then(|c| c.revoke)) {
            (None, _) => None,
            (Some(_), Some(existing)) => Some(existing),
            (Some(ms), None) => Some(now + Duration::from_millis(u64::from(ms))),
        };
        clocks.insert(key, MemberClock { session: now + Duration::from_millis(u64::from(session_ms)), revoke });
    }

    /// Forgets a member that left.
    pub(crate) fn forget(&self, group: &str, member: &str) {
        lock(&self.clocks).remove(&(group.to_owned(), member.to_owned()));
    }

    fn expired(&self, group: &str, member: &str, now: Instant) -> bool {
        lock(&self.clocks)
            .get(&(group.to_owned(), member.to_owned()))
            .is_some_and(|c| c.session <= now || c.revoke.is_some_and(|r| r <= now))
    }

    /// Gives every member a full session timeout (a new coordinator knows nothing of when they
    /// were last heard from), and forgets departed ones.
    fn restart_clocks(&self) {
        let now = Instant::now();
        let members: Vec<(String, String, u32, Option<u32>)> = self.runtime.read(|s| {
            s.groups
                .iter()
                .flat_map(|(g, group)| {
                    group.members.values().map(move |m| {
                        let revoke = (!m.revoking.is_empty()).then_some(m.rebalance_timeout_ms);
                        (g.clone(), m.member_id.clone(), m.session_timeout_ms, revoke)
                    })
                })
                .collect()
        });
        let mut clocks = lock(&self.clocks);
        clocks.clear();
        for (g, m, session_ms, revoke_ms) in members {
            let session = now + Duration::from_millis(u64::from(session_ms));
            let revoke = revoke_ms.map(|ms| now + Duration::from_millis(u64::from(ms)));
            clocks.insert((g, m), MemberClock { session, revoke });
        }
    }

    /// Members whose session or revocation deadline passed; members the state has but the
    /// clocks lack (replayed while this node was a follower) get a full session from now.
    fn due(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let members: Vec<(String, String, u32)> = self.runtime.read(|s| {
            s.groups
                .iter()
                .flat_map(|(g, group)| {
                    group.members.values().map(move |m| (g.clone(), m.member_id.clone(), m.session_timeout_ms))
                })
                .collect()
        });
        let mut clocks = lock(&self.clocks);
        let live: BTreeSet<(String, String)> = members.iter().map(|(g, m, _)| (g.clone(), m.clone())).collect();
        clocks.retain(|k, _| live.contains(k));
        let mut due = Vec::new();
        for (g, m, session_ms) in members {
            let clock = clocks
                .entry((g.clone(), m.clone()))
                .or_insert(MemberClock { session: now + Duration::from_millis(u64::from(session_ms)), revoke: None });
            if clock.session <= now || clock.revoke.is_some_and(|r| r <= now) {
                due.push((g, m));
            }
        }
        due
    }
}

impl Inner {
    /// Starts a coordinator for every `__consumer_offsets` partition this node hosts.
    pub(crate) fn start_group_coordinators(self: &Arc<Self>) {
        let meta = self.metadata();
        let Some(topic) = meta.offsets_topic() else { return };
        for (partition, p) in topic.partitions.iter().enumerate() {
            if !p.replicas.contains(&self.config.node_id) || self.node.store(p.group).is_err() {
                continue;
            }
            let partition = partition as u32;
            let lag_limits = self.config.groups.lag_limits;
            if lock(&self.groups).contains_key(&partition) {
                continue;
            }
            let runtime = Arc::new(Runtime::new(
                p.group,
                Arc::clone(&self.node),
                Arc::clone(&self.clock),
                self.config.append_timeout,
                self.coordinator_faults,
                move || Groups::with_lag_limits(lag_limits),
            ));
            let coordinator = Arc::new(GroupCoordinator {
                runtime: Arc::clone(&runtime),
                clocks: Mutex::new(BTreeMap::new()),
                publish_wake: Arc::new(tokio::sync::Notify::new()),
            });
            lock(&self.groups).insert(partition, Arc::clone(&coordinator));
            info!(partition, group = p.group, "group coordinator started");
            self.spawn("coord-replay", Arc::clone(&runtime).replay_loop());
            self.spawn("coord-leadership", Arc::clone(&runtime).leadership_loop());
            let metrics = Arc::clone(&self.metrics);
            let source = PublishSource {
                runtime: Arc::clone(&runtime),
                wake: Arc::clone(&coordinator.publish_wake),
                landed: Box::new(move |_| {
                    metrics.dead_letters_published.inc();
                }),
            };
            self.spawn("coord-publish", Arc::clone(self).publish_loop(source));
            self.spawn("coord-timers", Arc::clone(self).group_timers(coordinator));
        }
    }

    /// The coordinator of an offsets partition, if this node hosts it.
    pub(crate) fn group_coordinator(&self, partition: u32) -> Option<Arc<GroupCoordinator>> {
        lock(&self.groups).get(&partition).cloned()
    }

    /// Partition counts of the user topics, as the coordinator sees them now.
    pub(crate) fn topics_view(&self) -> TopicsView {
        self.metadata().topic_partitions()
    }

    /// Removes members that went silent or did not revoke in time, and expires the offsets of
    /// groups empty for `offsets_retention_ms`; all while this node coordinates the partition.
    async fn group_timers(self: Arc<Self>, coordinator: Arc<GroupCoordinator>) {
        let mut active = coordinator.runtime.active();
        let mut maintenance_at = Instant::now() + self.config.groups.maintenance_interval;
        loop {
            // Wait to become active, then start every member's clock afresh.
            if active.wait_for(Option::is_some).await.is_err() {
                return;
            }
            coordinator.restart_clocks();
            while active.borrow().is_some() {
                tokio::time::sleep(EXPIRY_POLL).await;
                for (group, member) in coordinator.due() {
                    self.expire_member(&coordinator, &group, &member).await;
                }
                if Instant::now() >= maintenance_at {
                    maintenance_at = Instant::now() + self.config.groups.maintenance_interval;
                    self.expire_offsets(&coordinator).await;
                }
                if coordinator.runtime.bytes_since_compaction() > self.config.groups.offsets_compact_bytes {
                    // Failures leave only redundant copies; the next round starts afresh.
                    if let Err(e) = coordinator.runtime.compact().await {
                        warn!(error = ?e, "compacting a coordinator partition failed; retried later");
                    }
                }
            }
        }
    }

    async fn expire_member(&self, coordinator: &GroupCoordinator, group: &str, member: &str) {
        let topics = self.topics_view();
        let now_ms = self.clock.now_ms();
        let outcome = coordinator
            .runtime
            .run(group, |s: &Groups| {
                // Checked again under the group's lock: a heartbeat may have arrived meanwhile.
                if !coordinator.expired(group, member, Instant::now()) {
                    return Ok::<_, ()>((Vec::new(), false));
                }
                Ok(s.remove_member(group, member, &topics, now_ms).map_or((Vec::new(), false), |r| (encode(&r), true)))
            })
            .await;
        match outcome {
            Ok(true) => {
                info!(
                    group,
                    member, "member removed: no heartbeat within its session timeout, or no revocation in time"
                );
                coordinator.forget(group, member);
            }
            Ok(false) => {}
            Err(RunError::Refused(())) => {}
            Err(_) => {} // Not active any more, or the append failed: the next round retries.
        }
    }

    async fn expire_offsets(&self, coordinator: &GroupCoordinator) {
        let retention = self.config.groups.offsets_retention_ms;
        let now_ms = self.clock.now_ms();
        let expired = coordinator.runtime.read(|s| s.expired(now_ms, retention, 100));
        for (group, _) in expired {
            let outcome = coordinator
                .runtime
                .run(&group, |s: &Groups| {
                    let records = s.expired(now_ms, retention, usize::MAX);
                    let mine =
                        records.into_iter().find(|(g, _)| *g == group).map(|(_, r)| encode(&r)).unwrap_or_default();
                    Ok::<_, ()>((mine, ()))
                })
                .await;
            match outcome {
                Ok(()) => info!(group, "offsets of a long-empty group expired"),
                Err(_) => warn!(group, "expiring a group's offsets failed; retried later"),
            }
        }
    }
}

/// The raft group of an offsets partition, from the metadata.
pub(crate) fn offsets_group(inner: &Inner, partition: u32) -> Option<(GroupId, Vec<keel_raft::NodeId>)> {
    let meta = inner.metadata();
    let p = meta.offsets_topic()?.partitions.get(partition as usize)?;
    Some((p.group, p.replicas.clone()))
}
