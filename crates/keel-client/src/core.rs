//! What every client shares: cached connections, deadlines on every call, retry backoff with
//! seeded jitter, and the metadata cache (which node leads which partition).
//!
//! Every RPC runs under a deadline, and a timeout or transport error drops the cached channel so
//! that the next call dials again: a simulated TCP connection never retransmits, so a connection
//! that lost a packet in a partition stays stuck forever unless it is replaced.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use keel_proto::v1 as pb;
use keel_proto::v1::admin_client::AdminClient;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::debug;

use crate::config::ClientConfig;
use crate::error::ClientError;

/// Largest gRPC message the client encodes or decodes: above any batch (16 MiB) and any fetch.
pub(crate) const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Where a partition's leader is, as far as the cache knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The leader's address.
    Leader(String),
    /// The partition exists but has no known leader.
    NoLeader,
    /// The cache has never seen the topic, or not this partition of it.
    Unknown,
}

#[derive(Debug, Clone, Default)]
struct PartitionMeta {
    leader_addr: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct TopicMeta {
    partitions: BTreeMap<u32, PartitionMeta>,
}

#[derive(Debug, Default)]
struct MetaState {
    /// Node id → address, from the last DescribeCluster.
    nodes: BTreeMap<u64, String>,
    topics: BTreeMap<String, TopicMeta>,
    fetched_at: Option<Instant>,
    /// Bumped by every successful refresh, so that callers queued behind one refresh skip theirs.
    version: u64,
    /// The node that answered last: asked first next time.
    last_answered: Option<String>,
    /// Nodes whose view of the cluster is suspect, asked after every other one: those whose
    /// metadata left a partition without a leader, then those that could not serve a partition
    /// they were taken to lead; within each, the one distrusted longest ago first. Asking such a
    /// node first again would keep the client where it is stuck (a leader cut off from its
    /// followers cannot tell who replaced it); when every node is suspect, they take turns.
    suspects: Vec<(Doubt, String)>,
}

/// Why a node is asked for metadata after the others, the stronger reason last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Doubt {
    /// Its metadata named no leader for some partition (the cluster may have elected one since).
    NoLeader,
    /// It refused a write without naming a leader, or did not answer in time.
    CannotServe,
}

/// A connection to a broker with the client's credentials attached to each call.
pub(crate) type Conn = InterceptedService<Channel, Credentials>;

/// Attaches the bearer token, if any, to every call.
#[derive(Clone)]
pub(crate) struct Credentials {
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Connections, randomness and metadata of one client object.
pub(crate) struct Core {
    pub(crate) config: ClientConfig,
    channels: Mutex<BTreeMap<String, Channel>>,
    rng: Mutex<ChaCha8Rng>,
    meta: Mutex<MetaState>,
    /// Serialises refreshes: many partitions failing at once cause one DescribeCluster, not many.
    refreshing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    /// `salt` separates the random streams of objects built from one config.
    pub(crate) fn new(config: ClientConfig, salt: u64) -> Result<Core, ClientError> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed ^ salt);
        Ok(Core {
            config,
            channels: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(rng),
            meta: Mutex::new(MetaState::default()),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// The cached channel to `addr`, dialled lazily on first use, carrying the client's
    /// credentials on every call.
    pub(crate) fn channel(&self, addr: &str) -> Result<Conn, ClientError> {
        let mut channels = lock(&self.channels);
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let channel =
                    self.config.connect.channel(addr).map_err(|e| ClientError::Transport(format!("{addr}: {e}")))?;
                channels.insert(addr.to_owned(), channel.clone());
                channel
            }
        };
        Ok(InterceptedService::new(channel, Credentials { bearer: self.config.bearer()? }))
    }

    /// Forgets the channel to `addr`; the next call dials again. Calls still using the old one
    /// keep it until they finish.
    pub(crate) fn drop_channel(&self, addr: &str) {
        if lock(&self.channels).remove(addr).is_some() {
            debug!(addr, "dropped the connection");
        }
    }

    /// A random number from the seeded RNG.
    pub(crate) fn random_u64(&self) -> u64 {
        lock(&self.rng).random()
    }

    /// A random number in `0..bound` from the seeded RNG (0 when `bound` is 0).
    pub(crate) fn random_below(&self, bound: u32) -> u32 {
        if bound == 0 { 0 } else { lock(&self.rng).random_range(0..bound) }
    }

    /// Delay before retry number `attempt` (0-based): exponential, capped, with jitter in
    /// [50%, 100%] so that clients failing together do not retry together.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let min = self.config.retry_backoff_min;
        let max = self.config.retry_backoff_max;
        let base = min.saturating_mul(1u32 << attempt.min(20)).min(max);
        let half = base / 2;
        let half_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if half_ns == 0 { 0 } else { lock(&self.rng).random_range(0..=half_ns) };
        half + Duration::from_nanos(jitter)
    }

    /// Runs one RPC to `addr` under `timeout`. A timeout or broken connection drops the channel.
    pub(crate) async fn call<T, F, Fut>(&self, addr: &str, timeout: Duration, rpc: F) -> Result<T, ClientError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let channel = self.channel(addr)?;
        let result = match tokio::time::timeout(timeout, rpc(channel)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ClientError::from(status)),
            Err(_) => Err(ClientError::timeout(format!("request to {addr}"), timeout)),
        };
        if let Err(e) = &result
            && e.breaks_connection()
        {
            self.drop_channel(addr);
        }
        result
    }

    /// Brokers to ask for anything any node can answer: the last one that answered, then every
    /// known node, then the bootstrap list; suspects after all of them.
    fn candidates(&self) -> Vec<String> {
        let meta = lock(&self.meta);
        let mut out: Vec<String> = Vec::new();
        let known = meta.last_answered.iter().chain(meta.nodes.values()).chain(self.config.bootstrap.iter());
        for addr in known {
            if !addr.is_empty() && !out.contains(addr) && !meta.suspects.iter().any(|(_, s)| s == addr) {
                out.push(addr.clone());
            }
        }
        for doubt in [Doubt::NoLeader, Doubt::CannotServe] {
            out.extend(meta.suspects.iter().filter(|(d, _)| *d == doubt).map(|(_, s)| s.clone()));
        }
        out
    }

    /// Asks `addr` for metadata only after every other node from now on (see
    /// `MetaState::suspects`), until a refresh finds a leader for every partition. A node keeps
    /// the stronger of its doubts.
    pub(crate) fn distrust(&self, addr: &str, doubt: Doubt) {
        let mut meta = lock(&self.meta);
        if meta.last_answered.as_deref() == Some(addr) {
            meta.last_answered = None;
        }
        let earlier = meta.suspects.iter().position(|(_, s)| s == addr).map(|i| meta.suspects.remove(i).0);
        let doubt = earlier.map_or(doubt, |d| d.max(doubt));
        meta.suspects.push((doubt, addr.to_owned()));
        debug!(addr, ?doubt, "asking other nodes for metadata first");
    }

    /// Runs an RPC any node can answer, trying one node after another with backoff on retriable
    /// errors, until one answers or `request_timeout` has passed.
    pub(crate) async fn call_any<T, F, Fut>(&self, what: &str, mut rpc: F) -> Result<T, ClientError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let budget = self.config.request_timeout;
        let deadline = Instant::now() + budget;
        // Half the budget per attempt, so that one black-holed node leaves time to ask another.
        let attempt_max = (budget / 2).max(Duration::from_millis(1));
        let mut attempt = 0u32;
        let mut last_error = None;
        loop {
            for addr in self.candidates() {
                let now = Instant::now();
                if now >= deadline {
                    return Err(last_error.unwrap_or_else(|| ClientError::timeout(what, budget)));
                }
                match self.call(&addr, attempt_max.min(deadline - now), &mut rpc).await {
                    Ok(response) => {
                        lock(&self.meta).last_answered = Some(addr);
                        return Ok(response);
                    }
                    Err(e) if e.is_retriable() => {
                        debug!(what, addr, error = %e, "retrying on another node");
                        last_error = Some(e);
                    }
                    Err(e) => return Err(e),
                }
                let throttled = last_error.as_ref().and_then(ClientError::retry_after).unwrap_or_default();
                let pause = self.backoff(attempt).max(throttled);
                attempt = attempt.saturating_add(1);
                let now = Instant::now();
                if now + pause >= deadline {
                    return Err(last_error.unwrap_or_else(|| ClientError::timeout(what, budget)));
                }
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// An admin client over `channel` that accepts the largest messages Keel sends.
    pub(crate) fn admin(channel: Conn) -> AdminClient<Conn> {
        AdminClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// Asks the cluster for its nodes and partition leaders and replaces the cache. Callers that
    /// queue behind a refresh in progress share its result instead of sending their own.
    ///
    /// An answer that leaves a partition without a leader makes the node that gave it a suspect,
    /// so that the next refresh asks another: a node cut off from the others sees no leader
    /// anywhere, while the rest of the cluster may already have elected one. An answer with a
    /// leader for every partition clears the suspects.
    pub(crate) async fn refresh(&self) -> Result<(), ClientError> {
        let seen = lock(&self.meta).version;
        let _one_at_a_time = self.refreshing.lock().await;
        if lock(&self.meta).version != seen {
            return Ok(());
        }
        let cluster = self
            .call_any("describe cluster", |channel| async move {
                Core::admin(channel).describe_cluster(pb::DescribeClusterRequest {}).await
            })
            .await?;
        self.apply(&cluster);
        let leaderless = cluster.topics.iter().flat_map(|t| &t.partitions).any(|p| p.leader_id.is_none());
        let answered_by = lock(&self.meta).last_answered.clone();
        debug!(?answered_by, leaderless, "metadata refreshed");
        match answered_by {
            Some(addr) if leaderless => self.distrust(&addr, Doubt::NoLeader),
            _ if !leaderless => lock(&self.meta).suspects.clear(),
            _ => {}
        }
        Ok(())
    }

    /// The version of the metadata; it changes with every successful refresh.
    pub(crate) fn metadata_version(&self) -> u64 {
        lock(&self.meta).version
    }

    /// Replaces the cache with a DescribeCluster answer.
    pub(crate) fn apply(&self, cluster: &pb::DescribeClusterResponse) {
        let nodes: BTreeMap<u64, String> =
            cluster.nodes.iter().filter(|n| !n.addr.is_empty()).map(|n| (n.node_id, n.addr.clone())).collect();
        let topics = cluster.topics.iter().map(|t| (t.name.clone(), topic_meta(t, &nodes))).collect();
        let mut meta = lock(&self.meta);
        meta.nodes = nodes;
        meta.topics = topics;
        meta.fetched_at = Some(Instant::now());
        meta.version += 1;
    }

    /// Updates one topic from a fresher description (e.g. after CreateTopic).
    pub(crate) fn apply_topic(&self, topic: &pb::TopicDescription) {
        let mut meta = lock(&self.meta);
        let t = topic_meta(topic, &meta.nodes);
        meta.topics.insert(topic.name.clone(), t);
    }

    /// Forgets a topic (after DeleteTopic).
    pub(crate) fn forget_topic(&self, topic: &str) {
        lock(&self.meta).topics.remove(topic);
    }

    fn is_stale(&self, meta: &MetaState) -> bool {
        meta.fetched_at.is_none_or(|at| at.elapsed() >= self.config.metadata_max_age)
    }

    /// What the cache says about a partition's leader, and whether the cache is past its age.
    pub(crate) fn cached_leader(&self, topic: &str, partition: u32) -> (Lookup, bool) {
        let meta = lock(&self.meta);
        let lookup = match meta.topics.get(topic).and_then(|t| t.partitions.get(&partition)) {
            None => Lookup::Unknown,
            Some(PartitionMeta { leader_addr: Some(addr) }) => Lookup::Leader(addr.clone()),
            Some(PartitionMeta { leader_addr: None }) => Lookup::NoLeader,
        };
        (lookup, self.is_stale(&meta))
    }

    /// The partition's leader, refreshing the cache when it is old or does not know.
    pub(crate) async fn leader(&self, topic: &str, partition: u32) -> Result<String, ClientError> {
        let (lookup, stale) = self.cached_leader(topic, partition);
        if let (Lookup::Leader(addr), false) = (&lookup, stale) {
            return Ok(addr.clone());
        }
        self.refresh().await?;
        match self.cached_leader(topic, partition).0 {
            Lookup::Leader(addr) => Ok(addr),
            Lookup::NoLeader => Err(ClientError::Unavailable(format!("{topic}/{partition} has no leader right now"))),
            Lookup::Unknown => Err(ClientError::NotFound(format!("no partition {partition} in topic {topic:?}"))),
        }
    }

    /// The cached partition count of a topic (`None` when the topic is unknown). An old cache is
    /// good enough: partitions are only ever added, and the producer refreshes old caches.
    pub(crate) fn cached_partition_count(&self, topic: &str) -> Option<u32> {
        let meta = lock(&self.meta);
        meta.topics.get(topic).map(|t| u32::try_from(t.partitions.len()).unwrap_or(u32::MAX))
    }

    /// The number of partitions of a topic, refreshing the cache when it does not know the topic.
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        if let Some(count) = self.cached_partition_count(topic) {
            return Ok(count);
        }
        self.refresh().await?;
        let meta = lock(&self.meta);
        match meta.topics.get(topic) {
            Some(t) if !t.partitions.is_empty() => Ok(u32::try_from(t.partitions.len()).unwrap_or(u32::MAX)),
            _ => Err(ClientError::NotFound(format!("no topic {topic:?}"))),
        }
    }

    /// The partition ids of a topic.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<Vec<u32>, ClientError> {
        self.partition_count(topic).await?;
        let meta = lock(&self.meta);
        let partitions = meta.topics.get(topic).map(|t| t.partitions.keys().copied().collect()).unwrap_or_default();
        Ok(partitions)
    }

    /// Learns from a NOT_LEADER answer: the hinted leader is used at once; without a hint the
    /// partition's leader is forgotten so that the next lookup refreshes.
    pub(crate) fn leader_moved(&self, topic: &str, partition: u32, error: &ClientError) {
        let hint = error.leader_hint().map(str::to_owned);
        let mut meta = lock(&self.meta);
        if let Some(p) = meta.topics.get_mut(topic).and_then(|t| t.partitions.get_mut(&partition)) {
            debug!(topic, partition, ?hint, "leader moved");
            p.leader_addr = hint;
        }
    }
}

fn topic_meta(t: &pb::TopicDescription, nodes: &BTreeMap<u64, String>) -> TopicMeta {
    let partitions = t
        .partitions
        .iter()
        .map(|p| {
            let leader_addr = if !p.leader_addr.is_empty() {
                Some(p.leader_addr.clone())
            } else {
                p.leader_id.and_then(|id| nodes.get(&id).cloned())
            };
            (p.partition, PartitionMeta { leader_addr })
        })
        .collect();
    TopicMeta { partitions }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn core() -> Core {
        Core::new(ClientConfig::new(["b:1"]), 0).unwrap()
    }

    fn cluster() -> pb::DescribeClusterResponse {
        pb::DescribeClusterResponse {
            nodes: vec![
                pb::NodeDescription { node_id: 1, addr: "n1:1".into(), ..Default::default() },
                pb::NodeDescription { node_id: 2, addr: "n2:1".into(), ..Default::default() },
            ],
            topics: vec![pb::TopicDescription {
                name: "t".into(),
                partitions: vec![
                    pb::PartitionDescription { partition: 0, leader_id: Some(1), ..Default::default() },
                    pb::PartitionDescription {
                        partition: 1,
                        leader_id: Some(2),
                        leader_addr: "n2:1".into(),
                        ..Default::default()
                    },
                    pb::PartitionDescription { partition: 2, leader_id: None, ..Default::default() },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn metadata_resolves_leaders_and_ages() {
        let core = core();
        assert_eq!(core.cached_leader("t", 0), (Lookup::Unknown, true));
        core.apply(&cluster());
        assert_eq!(core.cached_leader("t", 0), (Lookup::Leader("n1:1".into()), false));
        assert_eq!(core.cached_leader("t", 1), (Lookup::Leader("n2:1".into()), false));
        assert_eq!(core.cached_leader("t", 2), (Lookup::NoLeader, false));
        assert_eq!(core.cached_leader("t", 3).0, Lookup::Unknown);
        assert_eq!(core.cached_partition_count("t"), Some(3));
        assert_eq!(core.candidates(), ["n1:1", "n2:1", "b:1"]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(core.cached_leader("t", 0), (Lookup::Leader("n1:1".into()), true));
        assert_eq!(core.cached_partition_count("t"), Some(3));
    }

    #[test]
    fn not_leader_hints_update_the_cache() {
        let core = core();
        core.apply(&cluster());
        let hinted =
            ClientError::NotLeader { message: String::new(), leader_id: Some(2), leader_addr: Some("n2:1".into()) };
        core.leader_moved("t", 0, &hinted);
        assert_eq!(core.cached_leader("t", 0).0, Lookup::Leader("n2:1".into()));
        let unhinted = ClientError::NotLeader { message: String::new(), leader_id: None, leader_addr: None };
        core.leader_moved("t", 0, &unhinted);
        assert_eq!(core.cached_leader("t", 0).0, Lookup::NoLeader);
    }

    #[test]
    fn suspects_are_asked_last_and_take_turns() {
        let core = core();
        core.apply(&cluster());
        lock(&core.meta).last_answered = Some("n1:1".into());
        assert_eq!(core.candidates(), ["n1:1", "n2:1", "b:1"]);
        // The node that answered last refused without a hint: ask it last, not first.
        core.distrust("n1:1", Doubt::CannotServe);
        assert_eq!(core.candidates(), ["n2:1", "b:1", "n1:1"]);
        // One that merely knew no leader is asked before it.
        core.distrust("n2:1", Doubt::NoLeader);
        assert_eq!(core.candidates(), ["b:1", "n2:1", "n1:1"]);
        // When every node is suspect, the one distrusted longest ago is asked first, and a node
        // keeps its stronger doubt.
        core.distrust("b:1", Doubt::NoLeader);
        core.distrust("n1:1", Doubt::NoLeader);
        assert_eq!(core.candidates(), ["n2:1", "b:1", "n1:1"]);
        core.distrust("n2:1", Doubt::NoLeader);
        assert_eq!(core.candidates(), ["b:1", "n2:1", "n1:1"]);
    }

    #[test]
    fn backoff_grows_caps_and_jitters_deterministically() {
        let a = core();
        let b = core();
        for attempt in 0..12 {
            let d = a.backoff(attempt);
            assert_eq!(d, b.backoff(attempt), "same seed, same delays");
            let base = Duration::from_millis(50).saturating_mul(1 << attempt).min(Duration::from_secs(1));
            assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?} outside [{:?}, {base:?}]", base / 2);
        }
    }
}
