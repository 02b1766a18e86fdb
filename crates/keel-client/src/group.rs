//! Consumer groups: [`GroupConsumer`] joins a group, consumes the partitions the coordinator
//! assigns it and commits offsets after processing; [`GroupAdmin`] lists, describes, resets and
//! deletes groups.
//!
//! A background task heartbeats the coordinator (every `heartbeat_interval_ms` it grants) and
//! keeps the latest assignment; `poll` reconciles the consumer with it before reading: it gives
//! up revoked partitions first (telling the listener, committing their positions if asked, then
//! reporting them no longer owned) and starts new partitions at their committed offsets. A
//! member that learns it was fenced, or that could not reach its coordinator for a whole
//! session timeout, drops every partition before it rejoins, so it never reads a partition the
//! coordinator may have given to another member.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::core::Conn as Channel;
use keel_proto::v1 as pb;
use keel_proto::v1::groups_client::GroupsClient;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::ClientConfig;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset};
use crate::core::{Core, MESSAGE_BYTES_MAX};
use crate::error::ClientError;

#[path = "group_retry.rs"]
mod retry;
pub use retry::{HandlerError, NackOutcome, ProcessSummary, RetryPolicy};

/// Salt of the group clients' random streams (see [`Core::new`]).
const SALT: u64 = 0x9a0b;
/// Longest a `poll` waits in the consumer before it looks at the assignment again.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// A topic partition.
pub type TopicPartition = (String, u32);

/// Where a partition with no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The first offset still in the log.
    Earliest,
    /// The high watermark: only records committed from now on.
    Latest,
    /// Fail `poll` with an error naming the partition.
    Error,
}

/// Settings of a group member.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The group (letters, digits, `.`, `_`, `-`).
    pub group: String,
    /// Static membership: a stable id per instance; a restart within the session timeout
    /// keeps the partitions with no rebalance.
    pub instance_id: Option<String>,
    /// Shown by `keel group describe`.
    pub client_id: String,
    /// The member is removed when the coordinator has not heard from it for this long.
    pub session_timeout: Duration,
    /// How long it may take to give up revoked partitions.
    pub rebalance_timeout: Duration,
    /// `uniform` (default) or `range`.
    pub assignor: String,
    /// Where partitions without a committed offset start.
    pub auto_offset_reset: OffsetReset,
    /// Off (`None`) by default: process, then [`GroupConsumer::commit`]. When set, `poll`
    /// commits, at most this often, the positions of records returned by *earlier* polls.
    pub auto_commit_interval: Option<Duration>,
    /// Commit the positions of revoked partitions before giving them up (the records `poll`
    /// returned for them are taken as processed, as in a poll-process-commit loop).
    pub commit_on_revoke: bool,
    /// How the partitions are read.
    pub consumer: ConsumerConfig,
    /// How records this member nacks are retried (fixed by each record's first failure).
    pub retry: RetryPolicy,
}

impl GroupConfig {
    /// Defaults for `group`: 10 s session, 60 s rebalance, uniform, earliest, no auto-commit.
    pub fn new(group: impl Into<String>) -> GroupConfig {
        GroupConfig {
            group: group.into(),
            instance_id: None,
            client_id: "keel-client".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(60),
            assignor: String::new(),
            auto_offset_reset: OffsetReset::Earliest,
            auto_commit_interval: None,
            commit_on_revoke: true,
            consumer: ConsumerConfig::default(),
            retry: RetryPolicy::default(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.group.is_empty() {
            return Err(ClientError::Config("group must not be empty".into()));
        }
        for (what, d) in [("session_timeout", self.session_timeout), ("rebalance_timeout", self.rebalance_timeout)] {
            if d.is_zero() || u32::try_from(d.as_millis()).is_err() {
                return Err(ClientError::Config(format!("{what} must be positive and below 49 days")));
            }
        }
        self.consumer.validate()
    }
}

/// Told of rebalances, from inside [`GroupConsumer::poll`].
pub trait RebalanceListener: Send {
    /// These partitions were added; reading starts at their committed offsets.
    fn assigned(&mut self, _partitions: &[TopicPartition]) {}
    /// These partitions are about to be given up: finish their work now (their positions are
    /// committed next when `commit_on_revoke` is set).
    fn revoked(&mut self, _partitions: &[TopicPartition]) {}
    /// These partitions were lost without a chance to commit (the member was fenced or timed
    /// out): another member may already own them.
    fn lost(&mut self, _partitions: &[TopicPartition]) {}
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn groups_client(channel: Channel) -> GroupsClient<Channel> {
    GroupsClient::new(channel).max_decoding_message_size(MESSAGE_BYTES_MAX).max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// Finds a group's coordinator and runs calls there, following NOT_COORDINATOR hints and
/// retrying retriable refusals until the request timeout.
struct Route {
    core: Arc<Core>,
    group: String,
    coordinator: Mutex<Option<String>>,
}

impl Route {
    async fn find(&self) -> Result<String, ClientError> {
        if let Some(addr) = lock(&self.coordinator).clone() {
            return Ok(addr);
        }
        let request = pb::FindCoordinatorRequest { group: self.group.clone(), ..Default::default() };
        let found = self
            .core
            .call_any("find coordinator", |channel| {
                let request = request.clone();
                async move { groups_client(channel).find_coordinator(request).await }
            })
            .await?;
        if found.coordinator_addr.is_empty() {
            return Err(ClientError::Unavailable(format!("group {:?} has no coordinator yet", self.group)));
        }
        *lock(&self.coordinator) = Some(found.coordinator_addr.clone());
        Ok(found.coordinator_addr)
    }

    /// One attempt at the coordinator.
    async fn once<T, F, Fut>(&self, timeout: Duration, rpc: F) -> Result<T, ClientError>
    where
        F: FnOnce(GroupsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let addr = self.find().await?;
        let result = self.core.call(&addr, timeout, |channel| rpc(groups_client(channel))).await;
        if let Err(e) = &result {
            match e {
                ClientError::Group { reason, coordinator_addr, .. } if reason == "NOT_COORDINATOR" => {
                    *lock(&self.coordinator) = coordinator_addr.clone();
                }
                e if e.is_retriable() && e.group_reason().is_none() => *lock(&self.coordinator) = None,
                _ => {}
            }
        }
        result
    }

    /// Retries retriable failures (the coordinator moved or is loading) with backoff until
    /// the request timeout; every group call is safe to repeat.
    async fn call<T, F, Fut>(&self, mut rpc: F) -> Result<T, ClientError>
    where
        F: FnMut(GroupsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let budget = self.core.config.request_timeout;
        let deadline = Instant::now() + budget;
        let mut attempt = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            match self.once(left, &mut rpc).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retriable() => {
                    let pause = self.core.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    debug!(group = self.group, error = %e, "group call retried");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn to_pb(tps: &BTreeSet<TopicPartition>) -> Vec<pb::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (t, p) in tps {
        by_topic.entry(t).or_default().push(*p);
    }
    by_topic.into_iter().map(|(t, partitions)| pb::TopicPartitions { topic: t.to_owned(), partitions }).collect()
}

fn from_pb(list: &[pb::TopicPartitions]) -> BTreeSet<TopicPartition> {
    list.iter().flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p))).collect()
}

/// What the heartbeat task and `poll` share.
#[derive(Debug)]
struct Shared {
    member_id: String,
    epoch: i32,
    topics: Vec<String>,
    /// The last assignment the coordinator granted (`None` before the first answer).
    target: Option<BTreeSet<TopicPartition>>,
    /// What `poll` owns now, as reported to the coordinator.
    owned: BTreeSet<TopicPartition>,
    /// The member must drop everything and rejoin (fenced, removed, or out of touch).
    fenced: bool,
    last_heard: Instant,
    /// Failed records due for another attempt, as the last heartbeat answer listed them:
    /// (partition, offset, attempt).
    redeliveries: Vec<(TopicPartition, u64, u32)>,
}

/// A member of a consumer group.
pub struct GroupConsumer {
    route: Arc<Route>,
    config: GroupConfig,
    consumer: Consumer,
    shared: Arc<Mutex<Shared>>,
    /// Wakes the heartbeat task when `owned` changed (a revocation to report at once).
    wake: Arc<Notify>,
    /// Bumped by the heartbeat task whenever the assignment or the fencing changes.
    changed: watch::Receiver<u64>,
    heartbeat: JoinHandle<()>,
    owned: BTreeSet<TopicPartition>,
    listener: Option<Box<dyn RebalanceListener>>,
    last_auto_commit: Instant,
    /// Redeliveries `poll` returned and not yet acked or nacked.
    in_progress: BTreeSet<(TopicPartition, u64, u32)>,
    /// Redeliveries acked or nacked here that a heartbeat answer may still list.
    settled_here: BTreeSet<(TopicPartition, u64, u32)>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer").field("group", &self.config.group).field("owned", &self.owned).finish()
    }
}

impl GroupConsumer {
    /// Joins `config.group` subscribed to `topics`. Must be called inside a tokio runtime.
    pub async fn subscribe(
        client: ClientConfig,
        config: GroupConfig,
        topics: &[&str],
    ) -> Result<GroupConsumer, ClientError> {
        config.validate()?;
        if topics.is_empty() {
            return Err(ClientError::Config("subscribe to at least one topic".into()));
        }
        let core = Arc::new(Core::new(client.clone(), SALT)?);
        // A member id chosen once per instance: a retried join cannot make a second member.
        let member_id = format!(
            "{}-{:08x}{:08x}",
            config.client_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(24).collect::<String>(),
            core.random_below(u32::MAX),
            core.random_below(u32::MAX)
        );
        let route = Arc::new(Route { core, group: config.group.clone(), coordinator: Mutex::new(None) });
        let shared = Arc::new(Mutex::new(Shared {
            member_id,
            epoch: 0,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            target: None,
            owned: BTreeSet::new(),
            fenced: false,
            last_heard: Instant::now(),
            redeliveries: Vec::new(),
        }));
        let wake = Arc::new(Notify::new());
        let (changed_tx, changed) = watch::channel(0u64);
        let heartbeat = tokio::spawn(heartbeat_loop(
            Arc::clone(&route),
            config.clone(),
            Arc::clone(&shared),
            Arc::clone(&wake),
            changed_tx,
        ));
        let consumer = Consumer::new(client, config.consumer.clone())?;
        Ok(GroupConsumer {
            route,
            config,
            consumer,
            shared,
            wake,
            changed,
            heartbeat,
            owned: BTreeSet::new(),
            listener: None,
            last_auto_commit: Instant::now(),
            in_progress: BTreeSet::new(),
            settled_here: BTreeSet::new(),
        })
    }

    /// Sets the listener told of assignments, revocations and losses.
    pub fn set_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(listener);
    }

    /// This member's id.
    pub fn member_id(&self) -> String {
        lock(&self.shared).member_id.clone()
    }

    /// The member's epoch now (0 until it joined).
    pub fn member_epoch(&self) -> i32 {
        lock(&self.shared).epoch
    }

    /// The partitions this member reads now.
    pub fn assignment(&self) -> BTreeSet<TopicPartition> {
        self.owned.clone()
    }

    /// The next offset `poll` returns for an owned partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.consumer.position(topic, partition)
    }

    /// Waits up to `timeout` for records of the partitions this member owns, reconciling with
    /// the coordinator's assignment first. Every offset of a partition is returned once, in
    /// order, while the member owns it; after a rebalance a partition restarts at its
    /// committed offset, so records after the last commit may come again (at-least-once).
    /// Failed records due for another attempt come first, each with its `attempt` number:
    /// [`GroupConsumer::ack`] or [`GroupConsumer::nack`] every one of them.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>, ClientError> {
        let deadline = Instant::now() + timeout;
        if let Some(every) = self.config.auto_commit_interval
            && self.last_auto_commit.elapsed() >= every
            && !self.owned.is_empty()
        {
            // Positions now are past records returned by earlier polls only.
            self.last_auto_commit = Instant::now();
            if let Err(e) = self.commit().await {
                warn!(group = self.config.group, error = %e, "auto-commit failed");
            }
        }
        loop {
            self.reconcile().await?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let redelivered = self.take_redeliveries().await?;
            if !redelivered.is_empty() {
                return Ok(redelivered);
            }
            let slice = (deadline - now).min(RECONCILE_EVERY);
            if self.owned.is_empty() {
                let _ = tokio::time::timeout(slice, self.changed.changed()).await;
                continue;
            }
            let records = self.consumer.poll(slice).await?;
            // A record of a partition given up meanwhile is not returned: it may be another's.
            let records: Vec<ConsumerRecord> =
                records.into_iter().filter(|r| self.owned.contains(&(r.topic.clone(), r.partition))).collect();
            if !records.is_empty() {
                return Ok(records);
            }
        }
    }

    async fn reconcile(&mut self) -> Result<(), ClientError> {
        let (target, fenced) = {
            let s = lock(&self.shared);
            (s.target.clone(), s.fenced)
        };
        if fenced {
            if !self.owned.is_empty() {
                let lost: Vec<TopicPartition> = self.owned.iter().cloned().collect();
                info!(group = self.config.group, partitions = lost.len(), "fenced: dropping every partition");
                if let Some(l) = &mut self.listener {
                    l.lost(&lost);
                }
                self.drop_partitions(&lost);
            }
            return Ok(());
        }
        let Some(target) = target else { return Ok(()) };
        let revoke: Vec<TopicPartition> = self.owned.difference(&target).cloned().collect();
        if !revoke.is_empty() {
            if let Some(l) = &mut self.listener {
                l.revoked(&revoke);
            }
            if self.config.commit_on_revoke {
                let offsets: BTreeMap<TopicPartition, u64> = revoke
                    .iter()
                    .filter_map(|(t, p)| Some(((t.clone(), *p), self.consumer.position(t, *p)?)))
                    .collect();
                if !offsets.is_empty()
                    && let Err(e) = self.commit_offsets(&offsets).await
                {
                    warn!(group = self.config.group, error = %e, "commit on revoke failed");
                }
            }
            self.drop_partitions(&revoke);
        }
        let add: BTreeSet<TopicPartition> = target.difference(&self.owned).cloned().collect();
        if add.is_empty() {
            return Ok(());
        }
        let group = self.config.group.clone();
        let wanted = to_pb(&add);
        let committed = match self
            .route
            .call(|mut c| {
                let request = pb::FetchOffsetsRequest { group: group.clone(), partitions: wanted.clone() };
                async move { c.fetch_offsets(request).await }
            })
            .await
        {
            Ok(r) => r.offsets,
            Err(e) if e.is_retriable() => {
                debug!(group, error = %e, "committed offsets not readable yet; the next poll retries");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let committed: BTreeMap<TopicPartition, u64> =
            committed.into_iter().map(|o| ((o.topic, o.partition), o.offset)).collect();
        for tp in &add {
            if !committed.contains_key(tp) && self.config.auto_offset_reset == OffsetReset::Error {
                return Err(ClientError::OutOfRange(format!(
                    "group {group:?} has no committed offset for {}/{} and auto_offset_reset is error",
                    tp.0, tp.1
                )));
            }
        }
        let mut topics: BTreeSet<&str> = BTreeSet::new();
        self.owned.extend(add.iter().cloned());
        topics.extend(add.iter().map(|(t, _)| t.as_str()));
        for topic in topics {
            let partitions: Vec<u32> = self.owned.iter().filter(|(t, _)| t == topic).map(|(_, p)| *p).collect();
            self.consumer.assign(topic, &partitions).await?;
        }
        for tp in &add {
            let offset = match committed.get(tp) {
                Some(o) => Offset::At(*o),
                None if self.config.auto_offset_reset == OffsetReset::Latest => Offset::End,
                None => Offset::Beginning,
            };
            self.consumer.seek(&tp.0, tp.1, offset)?;
        }
        let added: Vec<TopicPartition> = add.into_iter().collect();
        if let Some(l) = &mut self.listener {
            l.assigned(&added);
        }
        lock(&self.shared).owned = self.owned.clone();
        Ok(())
    }

    fn drop_partitions(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.owned.remove(tp);
        }
        let topics: BTreeSet<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        for topic in topics {
            let left: Vec<u32> = self.owned.iter().filter(|(t, _)| t == topic).map(|(_, p)| *p).collect();
            if left.is_empty() {
                self.consumer.unassign(topic);
            } else {
                self.consumer.retain(topic, &left);
            }
        }
        lock(&self.shared).owned = self.owned.clone();
        self.wake.notify_one();
    }

    /// Commits the positions of every owned partition (the offset after the last record `poll`
    /// returned) and waits until the coordinator's quorum has them.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let offsets: BTreeMap<TopicPartition, u64> =
            self.owned.iter().filter_map(|(t, p)| Some(((t.clone(), *p), self.consumer.position(t, *p)?))).collect();
        if offsets.is_empty() {
            return Ok(());
        }
        self.commit_offsets(&offsets).await.map(|_| ())
    }

    /// Commits these offsets (the next offset to consume of each partition) and waits for the
    /// acknowledgement. Returns what the group has committed for them afterwards: a commit
    /// below the committed offset changes nothing.
    pub async fn commit_offsets(
        &self,
        offsets: &BTreeMap<TopicPartition, u64>,
    ) -> Result<BTreeMap<TopicPartition, u64>, ClientError> {
        commit_with(&self.route, &self.shared, offsets).await
    }

    /// Starts committing the current positions and returns at once; await the handle for the
    /// outcome.
    pub fn commit_async(&self) -> JoinHandle<Result<BTreeMap<TopicPartition, u64>, ClientError>> {
        let offsets: BTreeMap<TopicPartition, u64> =
            self.owned.iter().filter_map(|(t, p)| Some(((t.clone(), *p), self.consumer.position(t, *p)?))).collect();
        let route = Arc::clone(&self.route);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move { commit_with(&route, &shared, &offsets).await })
    }

    /// Leaves the group at once (a static member leaves for its session timeout, keeping its
    /// partitions for its return). With auto-commit on, commits the positions first.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if self.config.auto_commit_interval.is_some()
            && let Err(e) = self.commit().await
        {
            warn!(group = self.config.group, error = %e, "commit on close failed");
        }
        self.heartbeat.abort();
        let (member_id, epoch) = {
            let s = lock(&self.shared);
            (s.member_id.clone(), s.epoch)
        };
        if epoch <= 0 {
            return Ok(());
        }
        let request = pb::HeartbeatRequest {
            group: self.config.group.clone(),
            member_id,
            member_epoch: if self.config.instance_id.is_some() { -2 } else { -1 },
            instance_id: self.config.instance_id.clone().unwrap_or_default(),
            ..Default::default()
        };
        self.route
            .call(|mut c| {
                let request = request.clone();
                async move { c.heartbeat(request).await }
            })
            .await
            .map(|_| ())
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

async fn commit_with(
    route: &Route,
    shared: &Mutex<Shared>,
    offsets: &BTreeMap<TopicPartition, u64>,
) -> Result<BTreeMap<TopicPartition, u64>, ClientError> {
    let (member_id, epoch) = {
        let s = lock(shared);
        (s.member_id.clone(), s.epoch)
    };
    let request = pb::CommitOffsetsRequest {
        group: route.group.clone(),
        member_id,
        member_epoch: epoch,
        offsets: offsets
            .iter()
            .map(|((t, p), o)| pb::OffsetCommit {
                topic: t.clone(),
                partition: *p,
                offset: *o,
                metadata: String::new(),
            })
            .collect(),
    };
    let r = route
        .call(|mut c| {
            let request = request.clone();
            async move { c.commit_offsets(request).await }
        })
        .await?;
    Ok(r.offsets.into_iter().map(|o| ((o.topic, o.partition), o.offset)).collect())
}

/// Heartbeats until the consumer is dropped or closed.
async fn heartbeat_loop(
    route: Arc<Route>,
    config: GroupConfig,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    changed: watch::Sender<u64>,
) {
    let session = config.session_timeout;
    let mut interval = Duration::from_secs(1);
    let mut attempt = 0u32;
    loop {
        let request = {
            let mut s = lock(&shared);
            if s.fenced && !s.owned.is_empty() {
                // Wait for `poll` to drop what it owns before joining again.
                None
            } else {
                if s.fenced {
                    s.fenced = false;
                    s.epoch = 0;
                }
                if s.last_heard.elapsed() >= session && s.epoch > 0 {
                    // The coordinator surely removed us: our partitions may be someone else's.
                    warn!(group = config.group, "no heartbeat answer for a whole session timeout: rejoining");
                    s.fenced = true;
                    s.target = Some(BTreeSet::new());
                    changed.send_modify(|v| *v += 1);
                    None
                } else {
                    Some(pb::HeartbeatRequest {
                        group: config.group.clone(),
                        member_id: s.member_id.clone(),
                        member_epoch: s.epoch,
                        instance_id: config.instance_id.clone().unwrap_or_default(),
                        subscribed_topics: s.topics.clone(),
                        owned: to_pb(&s.owned),
                        session_timeout_ms: u32::try_from(session.as_millis()).unwrap_or(u32::MAX),
                        rebalance_timeout_ms: u32::try_from(config.rebalance_timeout.as_millis()).unwrap_or(u32::MAX),
                        assignor: config.assignor.clone(),
                        client_id: config.client_id.clone(),
                    })
                }
            }
        };
        let Some(request) = request else {
            let _ = tokio::time::timeout(interval, wake.notified()).await;
            continue;
        };
        let timeout = (session / 3).max(Duration::from_millis(100));
        match route.once(timeout, |mut c| async move { c.heartbeat(request).await }).await {
            Ok(r) => {
                attempt = 0;
                interval = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                let target = from_pb(&r.assignment);
                let mut s = lock(&shared);
                s.last_heard = Instant::now();
                let news = s.epoch != r.member_epoch || s.target.as_ref() != Some(&target);
                s.epoch = r.member_epoch;
                s.target = Some(target);
                s.redeliveries =
                    r.redeliveries.into_iter().map(|d| ((d.topic, d.partition), d.offset, d.attempt)).collect();
                drop(s);
                if news {
                    changed.send_modify(|v| *v += 1);
                }
            }
            Err(e) if matches!(e.group_reason(), Some("UNKNOWN_MEMBER_ID" | "FENCED_MEMBER_EPOCH")) => {
                info!(group = config.group, error = %e, "fenced by the coordinator: rejoining");
                let mut s = lock(&shared);
                s.fenced = true;
                s.target = Some(BTreeSet::new());
                drop(s);
                changed.send_modify(|v| *v += 1);
                continue;
            }
            Err(e) => {
                debug!(group = config.group, error = %e, "heartbeat failed");
                let pause = route.core.backoff(attempt).min(interval);
                attempt = attempt.saturating_add(1);
                let _ = tokio::time::timeout(pause, wake.notified()).await;
                continue;
            }
        }
        let _ = tokio::time::timeout(interval, wake.notified()).await;
    }
}

/// Lists, describes, resets and deletes consumer groups.
pub struct GroupAdmin {
    core: Arc<Core>,
}

impl std::fmt::Debug for GroupAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupAdmin").finish_non_exhaustive()
    }
}

impl GroupAdmin {
    /// A group admin client; nothing is dialled until the first call.
    pub fn new(config: ClientConfig) -> Result<GroupAdmin, ClientError> {
        Ok(GroupAdmin { core: Arc::new(Core::new(config, SALT ^ 0xad)?) })
    }

    fn route(&self, group: &str) -> Route {
        Route { core: Arc::clone(&self.core), group: group.to_owned(), coordinator: Mutex::new(None) }
    }

    /// Every group of the cluster (any node answers; partitions whose coordinator did not
    /// answer are listed in `unavailable_partitions`).
    pub async fn list_groups(&self) -> Result<pb::ListGroupsResponse, ClientError> {
        self.core
            .call_any("list groups", |channel| async move {
                groups_client(channel).list_groups(pb::ListGroupsRequest { offsets_partition: None }).await
            })
            .await
    }

    /// Members, assignment, committed offsets and lag of a group.
    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupResponse, ClientError> {
        let request = pb::DescribeGroupRequest { group: group.to_owned() };
        self.route(group)
            .call(|mut c| {
                let request = request.clone();
                async move { c.describe_group(request).await }
            })
            .await
    }

    /// A group's committed offsets.
    pub async fn fetch_offsets(&self, group: &str) -> Result<Vec<pb::CommittedOffset>, ClientError> {
        let request = pb::FetchOffsetsRequest { group: group.to_owned(), partitions: vec![] };
        let r = self
            .route(group)
            .call(|mut c| {
                let request = request.clone();
                async move { c.fetch_offsets(request).await }
            })
            .await?;
        Ok(r.offsets)
    }

    /// Sets committed offsets of a group that has no members (they may move back).
    pub async fn reset_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, u64>,
    ) -> Result<Vec<pb::CommittedOffset>, ClientError> {
        let request = pb::ResetOffsetsRequest {
            group: group.to_owned(),
            offsets: offsets
                .iter()
                .map(|((t, p), o)| pb::OffsetCommit {
                    topic: t.clone(),
                    partition: *p,
                    offset: *o,
                    metadata: String::new(),
                })
                .collect(),
        };
        let r = self
            .route(group)
            .call(|mut c| {
                let request = request.clone();
                async move { c.reset_offsets(request).await }
            })
            .await?;
        Ok(r.offsets)
    }

    /// Re-publishes dead letters of `<group>.dlq` (as read there: offset and record) to their
    /// origin partitions, each once per offset however often it is asked. Returns the offsets
    /// replayed now and those replayed before.
    pub async fn replay_dead_letters(
        &self,
        group: &str,
        letters: &[ConsumerRecord],
    ) -> Result<(Vec<u64>, Vec<u64>), ClientError> {
        let request = pb::ReplayDeadLettersRequest {
            group: group.to_owned(),
            letters: letters
                .iter()
                .map(|r| pb::DeadLetter {
                    offset: r.offset,
                    record: Some(pb::Record {
                        key: r.key.clone(),
                        value: r.value.clone(),
                        headers: r
                            .headers
                            .iter()
                            .map(|(k, v)| pb::Header { key: k.clone(), value: v.clone() })
                            .collect(),
                        timestamp_ms: r.timestamp_ms,
                    }),
                })
                .collect(),
        };
        let r = self
            .route(group)
            .call(|mut c| {
                let request = request.clone();
                async move { c.replay_dead_letters(request).await }
            })
            .await?;
        Ok((r.replayed, r.already_replayed))
    }

    /// Deletes a group with no members, and its committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let request = pb::DeleteGroupRequest { group: group.to_owned() };
        self.route(group)
            .call(|mut c| {
                let request = request.clone();
                async move { c.delete_group(request).await }
            })
            .await
            .map(|_| ())
    }
}
