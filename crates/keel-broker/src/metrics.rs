//! The node's Prometheus metrics (README, "Metrics"): what operators alert on and graph.
//!
//! Two kinds of series. Counters and histograms are recorded where their events happen (the
//! gRPC services, the partitions' flushers) with atomics or one short lock per request, never
//! per record. Gauges of state (leaders, replication, log positions, budgets) are computed from
//! the node at scrape time ([`Metrics::encode`]), so they cost nothing between scrapes and are
//! never stale. Every family without labels exists from startup at 0, and labelled families are
//! filled with their known label sets (every gRPC code; every topic and partition hosted here),
//! so an alert on a missing series never lies.
//!
//! Label cardinality is bounded: per-partition series are exported only while the node hosts
//! fewer than `metrics_partition_series_max` partitions; per-topic aggregates always (a node
//! hosts at most `partitions_per_node_max` partitions, so at most that many topics).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use keel_raft::{GroupId, NodeId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::Inner;
use crate::lag::GroupLag;
use crate::metadata::{META_GROUP, META_TOPIC};
use crate::metrics_groups::GroupGauges;

/// The content type of [`Metrics::encode`]'s output: prometheus-client writes OpenMetrics text,
/// which Prometheus (and anything that reads its text format) parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The API a request or error is counted under (a bounded label).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum Api {
    Produce,
    Fetch,
}

impl Api {
    const ALL: [Api; 2] = [Api::Produce, Api::Fetch];

    fn name(self) -> &'static str {
        match self {
            Api::Produce => "produce",
            Api::Fetch => "fetch",
        }
    }
}

/// Every gRPC code but OK, by its name in the gRPC spec (lower case): the `code` label.
const CODES: [(tonic::Code, &str); 16] = [
    (tonic::Code::Cancelled, "cancelled"),
    (tonic::Code::Unknown, "unknown"),
    (tonic::Code::InvalidArgument, "invalid_argument"),
    (tonic::Code::DeadlineExceeded, "deadline_exceeded"),
    (tonic::Code::NotFound, "not_found"),
    (tonic::Code::AlreadyExists, "already_exists"),
    (tonic::Code::PermissionDenied, "permission_denied"),
    (tonic::Code::ResourceExhausted, "resource_exhausted"),
    (tonic::Code::FailedPrecondition, "failed_precondition"),
    (tonic::Code::Aborted, "aborted"),
    (tonic::Code::OutOfRange, "out_of_range"),
    (tonic::Code::Unimplemented, "unimplemented"),
    (tonic::Code::Internal, "internal"),
    (tonic::Code::Unavailable, "unavailable"),
    (tonic::Code::DataLoss, "data_loss"),
    (tonic::Code::Unauthenticated, "unauthenticated"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    api: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node_id: String,
    version: &'static str,
}

/// Latency buckets from 100 µs to ~13 s (doubling): a flush on a fast disk to a produce that
/// waited out an election.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 18)
}

/// The node's metrics: the registry and every series recorded by events.
pub struct Metrics {
    registry: Registry,
    node_id: NodeId,
    partition_series_max: usize,
    pub(crate) produce_requests: Counter,
    pub(crate) produce_records: Counter,
    pub(crate) produce_bytes: Counter,
    pub(crate) fetch_requests: Counter,
    pub(crate) fetch_bytes: Counter,
    errors: Family<ErrorLabels, Counter>,
    pub(crate) produce_latency: Histogram,
    pub(crate) commit_latency: Histogram,
    pub(crate) fetch_latency: Histogram,
    flush_latency: Histogram,
    flush_bytes: Histogram,
    pub(crate) produce_streams: Gauge,
    pub(crate) subscribe_streams: Gauge,
    pub(crate) connections: Gauge,
    leadership_changes: Counter,
    pub(crate) nacks: Counter,
    pub(crate) dead_letters_published: Counter,
    pub(crate) delayed_scheduled: Counter,
    pub(crate) delayed_published: Counter,
    pub(crate) delayed_dropped: Counter,
    pub(crate) delayed_cancelled: Counter,
    pub(crate) delayed_lateness: Histogram,
    pub(crate) delayed_pending: Gauge,
    pub(crate) txn_prepared: Counter,
    pub(crate) txn_committed: Counter,
    pub(crate) txn_rolled_back: Counter,
    pub(crate) txn_expired: Counter,
    pub(crate) txn_checks: Counter,
    pub(crate) txn_published: Counter,
    pub(crate) txn_pending: Gauge,
    pub(crate) txn_expired_held: Gauge,
    state: StateGauges,
    groups: GroupGauges,
    /// The raft term each hosted group was last seen in: leadership changes are counted as the
    /// terms that began since (each term is an election or a leader stepping down).
    terms: Mutex<BTreeMap<GroupId, u64>>,
}

/// Gauges of the node's state, set from it at every scrape.
#[derive(Default)]
struct StateGauges {
    ready: Gauge,
    raft_groups: Gauge,
    raft_groups_quiescent: Gauge,
    /// Counters kept by the raft node and copied at each scrape.
    raft_append_batches: Counter,
    raft_append_batch_requests: Counter,
    memory_resident_bytes: Gauge,
    memory_anonymous_bytes: Gauge,
    partitions_led: Gauge,
    partitions_leaderless: Gauge,
    partitions_under_replicated: Gauge,
    partitions_below_quorum: Gauge,
    raft_apply_lag_max: Gauge,
    in_flight_bytes: Gauge,
    in_flight_bytes_max: Gauge,
    subscribe_buffer_bytes: Gauge,
    subscribe_buffer_bytes_max: Gauge,
    partition_series_exported: Gauge,
    topic_partitions: Family<TopicLabels, Gauge>,
    topic_partitions_led: Family<TopicLabels, Gauge>,
    topic_partitions_leaderless: Family<TopicLabels, Gauge>,
    topic_partitions_under_replicated: Family<TopicLabels, Gauge>,
    topic_partitions_below_quorum: Family<TopicLabels, Gauge>,
    topic_log_bytes: Family<TopicLabels, Gauge>,
    partition_leader: Family<PartitionLabels, Gauge>,
    partition_under_replicated: Family<PartitionLabels, Gauge>,
    partition_log_bytes: Family<PartitionLabels, Gauge>,
    partition_log_start_offset: Family<PartitionLabels, Gauge>,
    partition_log_end_offset: Family<PartitionLabels, Gauge>,
    partition_high_watermark: Family<PartitionLabels, Gauge>,
    partition_raft_apply_lag: Family<PartitionLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every series of node `node_id`, registered at zero.
    pub fn new(node_id: NodeId, partition_series_max: usize) -> Metrics {
        let mut registry = Registry::with_prefix("keel");
        let histogram = || Histogram::new(latency_buckets());
        let mut metrics = Metrics {
            registry: Registry::default(),
            node_id,
            partition_series_max,
            produce_requests: Counter::default(),
            produce_records: Counter::default(),
            produce_bytes: Counter::default(),
            fetch_requests: Counter::default(),
            fetch_bytes: Counter::default(),
            errors: Family::default(),
            produce_latency: histogram(),
            commit_latency: histogram(),
            fetch_latency: histogram(),
            flush_latency: histogram(),
            // 512 B to 512 MiB (quadrupling): one small record to a segment's worth.
            flush_bytes: Histogram::new(exponential_buckets(512.0, 4.0, 11)),
            produce_streams: Gauge::default(),
            subscribe_streams: Gauge::default(),
            connections: Gauge::default(),
            leadership_changes: Counter::default(),
            nacks: Counter::default(),
            dead_letters_published: Counter::default(),
            delayed_scheduled: Counter::default(),
            delayed_published: Counter::default(),
            delayed_dropped: Counter::default(),
            delayed_cancelled: Counter::default(),
            // 1 ms to ~9 h (doubling): a timer fired on time to one held back by an outage.
            delayed_lateness: Histogram::new(exponential_buckets(0.001, 2.0, 25)),
            delayed_pending: Gauge::default(),
            txn_prepared: Counter::default(),
            txn_committed: Counter::default(),
            txn_rolled_back: Counter::default(),
            txn_expired: Counter::default(),
            txn_checks: Counter::default(),
            txn_published: Counter::default(),
            txn_pending: Gauge::default(),
            txn_expired_held: Gauge::default(),
            state: StateGauges::default(),
            groups: GroupGauges::default(),
            terms: Mutex::new(BTreeMap::new()),
        };
        let r = &mut registry;
        let m = &metrics;
        r.register(
            "node",
            "This node's id and Keel version",
            Info::new(NodeLabels { node_id: node_id.to_string(), version: env!("CARGO_PKG_VERSION") }),
        );
        r.register("node_ready", "1 once the node knows its cluster and serves clients, else 0", m.state.ready.clone());
        r.register(
            "memory_resident_bytes",
            "Resident memory of the node's process (VmRSS: mapped segment pages it touched included)",
            m.state.memory_resident_bytes.clone(),
        );
        r.register(
            "memory_anonymous_bytes",
            "Anonymous resident memory of the node's process (RssAnon: its heap, without file pages)",
            m.state.memory_anonymous_bytes.clone(),
        );
        r.register(
            "raft_groups",
            "Raft groups open on this node (partitions hosted, __meta included)",
            m.state.raft_groups.clone(),
        );
        r.register(
            "raft_groups_quiescent",
            "Raft groups quiescent on this node (idle: no raft heartbeats or election timers)",
            m.state.raft_groups_quiescent.clone(),
        );
        r.register(
            "raft_append_batches",
            "AppendEntries batches sent to peers (each carries the requests of many groups)",
            m.state.raft_append_batches.clone(),
        );
        r.register(
            "raft_append_batch_requests",
            "Groups' AppendEntries requests sent in batches (divided by raft_append_batches: requests per batch)",
            m.state.raft_append_batch_requests.clone(),
        );
        r.register("partitions_led", "Partitions this node leads", m.state.partitions_led.clone());
        r.register(
            "partitions_leaderless",
            "Partitions hosted here whose replica knows no leader (every replica counts: take the max across nodes)",
            m.state.partitions_leaderless.clone(),
        );
        r.register(
            "partitions_under_replicated",
            "Partitions led here with a replica that has not caught up with the commit point (leaders count: sum across nodes)",
            m.state.partitions_under_replicated.clone(),
        );
        r.register(
            "partitions_below_quorum",
            "Partitions led here with fewer caught-up replicas than a majority: their writes stall",
            m.state.partitions_below_quorum.clone(),
        );
        r.register(
            "leadership_changes",
            "Raft terms begun in the partitions hosted here since the node started (elections and leader step-downs)",
            m.leadership_changes.clone(),
        );
        r.register("group_nacks", "Failed processing attempts recorded by group coordinators here", m.nacks.clone());
        r.register(
            "dead_letters_published",
            "Dead letters this node's coordinators published and confirmed (each once)",
            m.dead_letters_published.clone(),
        );
        r.register(
            "delayed_scheduled",
            "Delayed records this node's timer coordinators scheduled (acknowledged to producers)",
            m.delayed_scheduled.clone(),
        );
        r.register(
            "delayed_published",
            "Delayed records this node's timer coordinators published to their target and confirmed (each once)",
            m.delayed_published.clone(),
        );
        r.register(
            "delayed_dropped",
            "Delayed records dropped when due because their target topic had been deleted",
            m.delayed_dropped.clone(),
        );
        r.register("delayed_cancelled", "Delayed records cancelled before they were due", m.delayed_cancelled.clone());
        r.register(
            "delayed_lateness_seconds",
            "How long after its deliver-at time a delayed record was confirmed in its target",
            m.delayed_lateness.clone(),
        );
        r.register(
            "delayed_pending",
            "Timers pending in the __delayed partitions this node coordinates",
            m.delayed_pending.clone(),
        );
        for (name, help, counter) in [
            ("txn_prepared", "Transactions this node's coordinators prepared", &m.txn_prepared),
            ("txn_committed", "Transactions committed (by END or a check-back answer)", &m.txn_committed),
            ("txn_rolled_back", "Transactions rolled back (by END or a check-back answer)", &m.txn_rolled_back),
            (
                "txn_expired",
                "Transactions whose check-backs all went unanswered (expiry policy applied)",
                &m.txn_expired,
            ),
            (
                "txn_checks",
                "Check-backs recorded (whether or not a producer of the group was connected)",
                &m.txn_checks,
            ),
            ("txn_published", "Committed transactional records published and confirmed (each once)", &m.txn_published),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "txn_pending",
            "Transactions pending in the __txn partitions this node coordinates",
            m.txn_pending.clone(),
        );
        r.register(
            "txn_expired_held",
            "Expired transactions held (listed by `keel txn list`) in the __txn partitions this node coordinates",
            m.txn_expired_held.clone(),
        );
        r.register(
            "raft_apply_lag_max",
            "The largest number of raft entries a hosted partition has in its log but not yet applied",
            m.state.raft_apply_lag_max.clone(),
        );
        r.register_with_unit(
            "in_flight",
            "Bytes of produce requests waiting for their commit on this node",
            Unit::Bytes,
            m.state.in_flight_bytes.clone(),
        );
        r.register_with_unit(
            "in_flight_max",
            "The node's budget of produce bytes waiting for their commit (in_flight_bytes_max)",
            Unit::Bytes,
            m.state.in_flight_bytes_max.clone(),
        );
        r.register_with_unit(
            "subscribe_buffer",
            "Bytes fetched for Subscribe streams that their clients have not taken yet",
            Unit::Bytes,
            m.state.subscribe_buffer_bytes.clone(),
        );
        r.register_with_unit(
            "subscribe_buffer_max",
            "The node's budget for Subscribe buffers (subscribe_buffer_bytes_max)",
            Unit::Bytes,
            m.state.subscribe_buffer_bytes_max.clone(),
        );
        r.register(
            "partition_series_exported",
            "1 while per-partition series are exported, 0 once the node hosts metrics_partition_series_max partitions or more",
            m.state.partition_series_exported.clone(),
        );
        r.register(
            "produce_requests",
            "Produce requests received (unary calls and stream messages)",
            m.produce_requests.clone(),
        );
        r.register(
            "produce_records",
            "Records acknowledged to producers by this node (as leader)",
            m.produce_records.clone(),
        );
        r.register_with_unit("produce", "Bytes of produce requests received", Unit::Bytes, m.produce_bytes.clone());
        r.register("fetch_requests", "Fetches served (Fetch calls and Subscribe rounds)", m.fetch_requests.clone());
        r.register_with_unit("fetch", "Bytes of record batches read for fetches", Unit::Bytes, m.fetch_bytes.clone());
        r.register(
            "errors",
            "Produce and fetch requests answered with an error, by API and gRPC code",
            m.errors.clone(),
        );
        r.register_with_unit(
            "produce_latency",
            "From a produce request's arrival to its acknowledgement (successful produces)",
            Unit::Seconds,
            m.produce_latency.clone(),
        );
        r.register_with_unit(
            "append_commit_latency",
            "From a batch's hand-over to raft to its commit by a quorum",
            Unit::Seconds,
            m.commit_latency.clone(),
        );
        r.register_with_unit(
            "fetch_latency",
            "Reading committed records for a fetch that found some (the long-poll wait for new records excluded)",
            Unit::Seconds,
            m.fetch_latency.clone(),
        );
        r.register_with_unit(
            "flush_latency",
            "One flush (msync) of a partition's log, group commit of every append before it",
            Unit::Seconds,
            m.flush_latency.clone(),
        );
        r.register_with_unit("flush", "Bytes of log data one flush made durable", Unit::Bytes, m.flush_bytes.clone());
        r.register("produce_streams", "ProduceStream calls open", m.produce_streams.clone());
        r.register("subscribe_streams", "Subscribe streams open", m.subscribe_streams.clone());
        r.register("connections", "gRPC connections open (clients and peers)", m.connections.clone());
        r.register("topic_partitions", "Partitions of the topic hosted here", m.state.topic_partitions.clone());
        r.register("topic_partitions_led", "Partitions of the topic led here", m.state.topic_partitions_led.clone());
        r.register(
            "topic_partitions_leaderless",
            "Partitions of the topic hosted here whose replica knows no leader",
            m.state.topic_partitions_leaderless.clone(),
        );
        r.register(
            "topic_partitions_under_replicated",
            "Partitions of the topic led here with a replica behind the commit point",
            m.state.topic_partitions_under_replicated.clone(),
        );
        r.register(
            "topic_partitions_below_quorum",
            "Partitions of the topic led here with fewer caught-up replicas than a majority",
            m.state.topic_partitions_below_quorum.clone(),
        );
        r.register_with_unit(
            "topic_log",
            "Bytes the topic's partitions hosted here hold on disk",
            Unit::Bytes,
            m.state.topic_log_bytes.clone(),
        );
        r.register("partition_leader", "1 if this node leads the partition, else 0", m.state.partition_leader.clone());
        r.register(
            "partition_under_replicated",
            "1 if this node leads the partition and a replica is behind the commit point",
            m.state.partition_under_replicated.clone(),
        );
        r.register_with_unit(
            "partition_log",
            "Bytes the partition's log holds on disk here",
            Unit::Bytes,
            m.state.partition_log_bytes.clone(),
        );
        r.register(
            "partition_log_start_offset",
            "The first offset the partition's log still holds here",
            m.state.partition_log_start_offset.clone(),
        );
        r.register(
            "partition_log_end_offset",
            "The offset after the last record written to the partition's log here",
            m.state.partition_log_end_offset.clone(),
        );
        r.register(
            "partition_high_watermark",
            "The offset after the last committed record the replica here has applied",
            m.state.partition_high_watermark.clone(),
        );
        r.register(
            "partition_raft_apply_lag",
            "Raft entries in the partition's log here not yet applied",
            m.state.partition_raft_apply_lag.clone(),
        );
        m.groups.register(r);
        for api in Api::ALL {
            for (_, code) in CODES {
                let _ = m.errors.get_or_create(&ErrorLabels { api: api.name(), code });
            }
        }
        metrics.registry = registry;
        metrics
    }

    /// Counts a request of `api` answered with `status`.
    pub(crate) fn error(&self, api: Api, status: &tonic::Status) {
        let code = CODES.iter().find(|(c, _)| *c == status.code()).map_or("unknown", |(_, name)| name);
        self.errors.get_or_create(&ErrorLabels { api: api.name(), code }).inc();
    }

    /// The exposition of every series, with the state gauges computed from `inner` now and the
    /// consumer-group series from `groups` (the groups this node coordinates).
    pub(crate) fn encode(&self, inner: &Inner, groups: &[(String, GroupLag)]) -> Result<String, std::fmt::Error> {
        // One scrape at a time: the state families are cleared and refilled.
        let mut terms = self.terms.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(inner, &mut terms);
        self.groups.refresh(groups, self.partition_series_max);
        self.encode_registry()
    }

    /// The exposition of every series as they are now.
    fn encode_registry(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn refresh(&self, inner: &Inner, terms: &mut BTreeMap<GroupId, u64>) {
        let s = &self.state;
        let me = inner.config.node_id;
        let meta = inner.metadata();
        let mut names: BTreeMap<GroupId, (&str, u32)> =
            meta.groups_of(me).into_iter().map(|(group, (topic, partition, _))| (group, (topic, partition))).collect();
        names.insert(META_GROUP, (META_TOPIC, 0));
        let groups = inner.node.group_ids();
        let per_partition = groups.len() < self.partition_series_max;
        s.ready.set(i64::from(*inner.ready.borrow()));
        s.raft_groups.set(gauge(groups.len() as u64));
        s.raft_groups_quiescent.set(gauge(groups.iter().filter(|g| inner.node.is_quiescent(**g)).count() as u64));
        let (batches, batched) = inner.node.append_batches();
        s.raft_append_batches.inc_by(batches.saturating_sub(s.raft_append_batches.get()));
        s.raft_append_batch_requests.inc_by(batched.saturating_sub(s.raft_append_batch_requests.get()));
        let (resident, anonymous) = process_memory();
        s.memory_resident_bytes.set(gauge(resident));
        s.memory_anonymous_bytes.set(gauge(anonymous));
        s.partition_series_exported.set(i64::from(per_partition));
        let (in_flight, in_flight_max) = inner.in_flight_bytes.usage();
        s.in_flight_bytes.set(gauge(in_flight as u64));
        s.in_flight_bytes_max.set(gauge(in_flight_max as u64));
        let buffer_max = inner.config.limits.subscribe_buffer_bytes_max.min(tokio::sync::Semaphore::MAX_PERMITS);
        let buffer_free = inner.subscribe_buffer.available_permits();
        s.subscribe_buffer_bytes.set(gauge(buffer_max.saturating_sub(buffer_free) as u64));
        s.subscribe_buffer_bytes_max.set(gauge(buffer_max as u64));
        // Families are rebuilt from what the node hosts now: a deleted topic's series go away.
        for family in [
            &s.topic_partitions,
            &s.topic_partitions_led,
            &s.topic_partitions_leaderless,
            &s.topic_partitions_under_replicated,
            &s.topic_partitions_below_quorum,
            &s.topic_log_bytes,
        ] {
            family.clear();
        }
        for family in [
            &s.partition_leader,
            &s.partition_under_replicated,
            &s.partition_log_bytes,
            &s.partition_log_start_offset,
            &s.partition_log_end_offset,
            &s.partition_high_watermark,
            &s.partition_raft_apply_lag,
        ] {
            family.clear();
        }
        terms.retain(|group, _| groups.contains(group));
        let mut totals = Totals::default();
        for group in &groups {
            let Some(&(topic, partition)) = names.get(group) else { continue };
            let (Ok(raft), Ok(store)) = (inner.node.metrics(*group), inner.node.store(*group)) else { continue };
            let leader = inner.node.leader_in(*group, &raft);
            let in_sync = inner.node.in_sync_voters(*group, &raft);
            let view = PartitionView::of(&raft, leader, me, in_sync);
            let seen = terms.entry(*group).or_insert(raft.current_term);
            self.leadership_changes.inc_by(raft.current_term.saturating_sub(*seen));
            *seen = (*seen).max(raft.current_term);
            let size = store.size_bytes();
            let (start, _, written) = store.positions();
            let high_watermark = *store.high_watermark().borrow();
            totals.add(&view);
            let t = TopicLabels { topic: topic.to_owned() };
            s.topic_partitions.get_or_create(&t).inc();
            s.topic_partitions_led.get_or_create(&t).inc_by(i64::from(view.leads));
            s.topic_partitions_leaderless.get_or_create(&t).inc_by(i64::from(view.leaderless));
            s.topic_partitions_under_replicated.get_or_create(&t).inc_by(i64::from(view.under_replicated));
            s.topic_partitions_below_quorum.get_or_create(&t).inc_by(i64::from(view.below_quorum));
            s.topic_log_bytes.get_or_create(&t).inc_by(gauge(size));
            if per_partition {
                let p = PartitionLabels { topic: t.topic, partition };
                s.partition_leader.get_or_create(&p).set(i64::from(view.leads));
                s.partition_under_replicated.get_or_create(&p).set(i64::from(view.under_replicated));
                s.partition_log_bytes.get_or_create(&p).set(gauge(size));
                s.partition_log_start_offset.get_or_create(&p).set(gauge(start.offset));
                s.partition_log_end_offset.get_or_create(&p).set(gauge(written.offset));
                s.partition_high_watermark.get_or_create(&p).set(gauge(high_watermark));
                s.partition_raft_apply_lag.get_or_create(&p).set(gauge(view.apply_lag));
            }
        }
        s.partitions_led.set(totals.led);
        s.partitions_leaderless.set(totals.leaderless);
        s.partitions_under_replicated.set(totals.under_replicated);
        s.partitions_below_quorum.set(totals.below_quorum);
        s.raft_apply_lag_max.set(gauge(totals.apply_lag_max));
    }
}

impl keel_raft::FlushObserver for Metrics {
    fn flushed(&self, bytes: u64, took: Duration) {
        self.flush_latency.observe(took.as_secs_f64());
        self.flush_bytes.observe(bytes as f64);
    }
}

/// A gauge value from a count or an offset (which never reach `i64::MAX` in practice).
fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What the metrics say about one hosted partition, from its raft metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartitionView {
    leads: bool,
    leaderless: bool,
    under_replicated: bool,
    below_quorum: bool,
    apply_lag: u64,
}

impl PartitionView {
    /// `leader` is the leader this node presents (`RaftNode::leader_in`): a leader cut off from
    /// its quorum does not name itself, so its partitions count as leaderless, not led.
    fn of(
        metrics: &keel_raft::types::Metrics,
        leader: Option<NodeId>,
        me: NodeId,
        (in_sync, voters): (usize, usize),
    ) -> PartitionView {
        let leads = leader == Some(me);
        let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
        let apply_lag = metrics.last_log_index.unwrap_or(0).saturating_sub(applied);
        let (mut under_replicated, mut below_quorum) = (false, false);
        if leads {
            under_replicated = in_sync < voters;
            below_quorum = in_sync < voters / 2 + 1;
        }
        PartitionView { leads, leaderless: leader.is_none(), under_replicated, below_quorum, apply_lag }
    }
}

#[derive(Debug, Default)]
struct Totals {
    led: i64,
    leaderless: i64,
    under_replicated: i64,
    below_quorum: i64,
    apply_lag_max: u64,
}

impl Totals {
    fn add(&mut self, view: &PartitionView) {
        self.led += i64::from(view.leads);
        self.leaderless += i64::from(view.leaderless);
        self.under_replicated += i64::from(view.under_replicated);
        self.below_quorum += i64::from(view.below_quorum);
        self.apply_lag_max = self.apply_lag_max.max(view.apply_lag);
    }
}

/// Holds a gauge one higher while it lives (an open stream or connection).
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Raises `gauge` by one until the guard is dropped.
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The process's resident and anonymous resident bytes from `/proc/self/status` (Linux); zeros
/// where it cannot be read.
fn process_memory() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k.saturating_mul(1024))
    };
    (kib("VmRSS:"), kib("RssAnon:"))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::*;

    /// Every sample name a node exports, with its topic and partition families filled as they are
    /// once a partition is hosted (histograms appear as their `_bucket`, `_sum` and `_count`).
    fn exported_names() -> BTreeSet<String> {
        let metrics = Metrics::new(1, 1_000);
        let s = &metrics.state;
        let t = TopicLabels { topic: "orders".into() };
        for family in [
            &s.topic_partitions,
            &s.topic_partitions_led,
            &s.topic_partitions_leaderless,
            &s.topic_partitions_under_replicated,
            &s.topic_partitions_below_quorum,
            &s.topic_log_bytes,
        ] {
            family.get_or_create(&t).set(1);
        }
        let p = PartitionLabels { topic: "orders".into(), partition: 0 };
        for family in [
            &s.partition_leader,
            &s.partition_under_replicated,
            &s.partition_log_bytes,
            &s.partition_log_start_offset,
            &s.partition_log_end_offset,
            &s.partition_high_watermark,
            &s.partition_raft_apply_lag,
        ] {
            family.get_or_create(&p).set(1);
        }
        let partition = crate::lag::PartitionLag {
            tp: keel_coordinator::groups::Tp::new("orders", 0),
            committed: Some(5),
            log_end: 7,
            lag_records: 2,
            lag_seconds: Some(1.5),
            status: keel_coordinator::groups::ConsumerStatus::Warn,
            last_commit_ms: Some(0),
            window_commits: 3,
        };
        let lag = GroupLag {
            partitions: vec![partition],
            total_lag_records: 2,
            max_lag_seconds: Some(1.5),
            status: keel_coordinator::groups::ConsumerStatus::Warn,
        };
        metrics.groups.refresh(&[("billing".to_owned(), lag)], 1_000);
        let text = metrics.encode_registry().unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let mut names = BTreeSet::new();
        for sample in scrape.samples {
            if matches!(sample.value, prometheus_parse::Value::Histogram(_)) {
                names.insert(format!("{}_bucket", sample.metric));
            }
            names.insert(sample.metric);
        }
        names
    }

    /// The `keel_*` metric names a PromQL expression reads.
    fn names_in(expr: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("keel_") {
            let preceded_by_word =
                rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            if !preceded_by_word {
                names.push(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
        names
    }

    fn deploy(path: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RuleFile {
        groups: Vec<RuleGroup>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RuleGroup {
        name: String,
        rules: Vec<Rule>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rule {
        alert: String,
        expr: String,
        #[serde(rename = "for")]
        for_: Option<String>,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    }

    #[test]
    fn every_series_exists_at_startup() {
        let names = exported_names();
        for name in [
            "keel_node_ready",
            "keel_memory_anonymous_bytes",
            "keel_partitions_leaderless",
            "keel_partitions_under_replicated",
            "keel_partitions_below_quorum",
            "keel_leadership_changes_total",
            "keel_produce_records_total",
            "keel_errors_total",
            "keel_produce_latency_seconds_bucket",
            "keel_flush_latency_seconds_count",
            "keel_flush_bytes_sum",
            "keel_in_flight_max_bytes",
            "keel_connections",
            "keel_groups_coordinated",
            "keel_group_partition_series_exported",
        ] {
            assert!(names.contains(name), "{name} is not exported: {names:?}");
        }
    }

    #[test]
    fn group_partition_series_only_below_the_bound() {
        use keel_coordinator::groups::{ConsumerStatus, Tp};
        let partition = |p| crate::lag::PartitionLag {
            tp: Tp::new("orders", p),
            committed: None,
            log_end: 1,
            lag_records: 1,
            lag_seconds: None,
            status: ConsumerStatus::Ok,
            last_commit_ms: None,
            window_commits: 0,
        };
        let lag = GroupLag {
            partitions: vec![partition(0), partition(1)],
            total_lag_records: 2,
            max_lag_seconds: None,
            status: ConsumerStatus::Stall,
        };
        let metrics = Metrics::new(1, 2);
        let groups = [("billing".to_owned(), lag)];
        for (series_max, per_partition) in [(3, true), (2, false)] {
            metrics.groups.refresh(&groups, series_max);
            let text = metrics.encode_registry().unwrap();
            assert!(text.contains("keel_group_lag_records{group=\"billing\"} 2"), "{text}");
            assert!(text.contains("keel_group_status{group=\"billing\",status=\"STALL\"} 1"), "{text}");
            assert!(text.contains("keel_group_status{group=\"billing\",status=\"OK\"} 0"), "{text}");
            assert_eq!(text.contains("keel_group_partition_lag_records{"), per_partition, "{text}");
            assert!(!text.contains("keel_group_partition_lag_seconds{"), "unknown ages are absent");
            let exported = format!("keel_group_partition_series_exported {}", i64::from(per_partition));
            assert!(text.contains(&exported), "{text}");
        }
    }

    #[test]
    fn the_alert_rules_use_only_exported_series() {
        let exported = exported_names();
        let rules: RuleFile = serde_yaml_ng::from_str(&deploy("prometheus/alerts.yml")).unwrap();
        let mut used = 0;
        for group in &rules.groups {
            assert!(!group.name.is_empty() && !group.rules.is_empty());
            for rule in &group.rules {
                assert!(rule.alert.starts_with("Keel"), "{}", rule.alert);
                assert!(rule.for_.is_some(), "{} fires on one bad scrape", rule.alert);
                assert!(
                    rule.labels.contains_key("severity") && rule.annotations.contains_key("summary"),
                    "{}",
                    rule.alert
                );
                for name in names_in(&rule.expr) {
                    assert!(exported.contains(&name), "alert {} reads {name}, which Keel does not export", rule.alert);
                    used += 1;
                }
            }
        }
        assert!(used >= 10, "the alerts read Keel's series");
    }

    #[test]
    fn the_dashboard_uses_only_exported_series() {
        let exported = exported_names();
        let dashboard: serde_json::Value = serde_json::from_str(&deploy("grafana/keel.json")).unwrap();
        assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
        let panels = dashboard["panels"].as_array().unwrap();
        let mut ids = BTreeSet::new();
        let mut used = 0;
        for panel in panels {
            assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel ids are unique");
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {} shows something", panel["title"]);
            for target in targets {
                for name in names_in(target["expr"].as_str().unwrap()) {
                    assert!(
                        exported.contains(&name),
                        "panel {} reads {name}, which Keel does not export",
                        panel["title"]
                    );
                    used += 1;
                }
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            for name in names_in(variable["query"].as_str().unwrap_or_default()) {
                assert!(exported.contains(&name), "variable {} reads {name}", variable["name"]);
            }
        }
        assert!(used >= 20, "the dashboard reads Keel's series");
    }

    #[test]
    fn names_are_found_in_promql() {
        assert_eq!(
            names_in("sum(rate(keel_errors_total{api=\"produce\"}[5m])) / x_keel_no + keel_a"),
            ["keel_errors_total", "keel_a"]
        );
    }
}
