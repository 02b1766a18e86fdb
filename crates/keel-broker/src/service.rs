//! The gRPC services of a node, on two listeners: the client one (Producer, Consumer, Admin,
//! Groups, grpc.health.v1, reflection) and the peer one (raft, Controller, NodeStatus, and the
//! client services again for the calls nodes forward to each other).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use keel_proto::v1 as pb;
use keel_proto::v1::admin_client::AdminClient;
use keel_raft::{GroupId, NodeId};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use crate::acl::{Operation, Resource};
use crate::broker::{Broker, HOPS_HEADER, Inner};
use crate::error::{not_leader, to_pb_error};
use crate::metadata::{self, META_GROUP, Metadata, ProducerEpoch, Topic, TopicSettings};
use crate::metrics::{Api as Counted, GaugeGuard};
use crate::quota::Direction;
use crate::size_status::{SizeStatus, size_status};

/// Records one AuditPartition reads when the request leaves it to the node.
const AUDIT_RECORDS_DEFAULT: u64 = 1_000_000;
/// Most records one AuditPartition reads: the call's work is bounded however it is asked.
const AUDIT_RECORDS_MAX: u64 = 10_000_000;
/// An AuditPartition stops once its report holds this many producers, ranges and listed
/// duplicates (~50 bytes each), so that its answer stays well below the 4 MiB a gRPC client
/// decodes by default (a partition written by many producers is audited in more calls).
const AUDIT_TRACKED_MAX: usize = 50_000;
/// Bytes read from the log at a time by AuditPartition.
const AUDIT_READ_BYTES: usize = 4 << 20;
/// Default size bound of a fetch response when the request leaves it 0.
const FETCH_BYTES_DEFAULT: usize = 1 << 20;
/// How long one Subscribe round waits for records before it looks again.
const SUBSCRIBE_WAIT_MS: u32 = 1_000;

/// Every service of a node, over the shared broker state.
#[derive(Clone)]
pub struct Api {
    pub(crate) inner: Arc<Inner>,
}

fn hops<T>(request: &Request<T>) -> u32 {
    request.metadata().get(HOPS_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream fed by a channel (the sending task stops when the client goes away).
fn channel_stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> BoxStream<T> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

impl Broker {
    /// The client services, each behind `gate` (the client gate that establishes the caller on
    /// the client listener; none on the peer listener, whose own gate does it).
    fn client_services<G>(&self, routes: tonic::service::Routes, gate: G) -> tonic::service::Routes
    where
        G: tonic::service::Interceptor + Clone + Send + Sync + 'static,
    {
        use tonic::service::interceptor::InterceptedService;
        let api = Api { inner: Arc::clone(&self.inner) };
        let (message_max, fetch_message_max) = self.inner.message_limits();
        // Keel's services answer size limits with RESOURCE_EXHAUSTED (see `size_status`); the
        // gate runs first and answers for itself.
        routes
            .add_service(InterceptedService::new(
                SizeStatus::new(
                    pb::producer_server::ProducerServer::new(api.clone())
                        .max_decoding_message_size(message_max)
                        .max_encoding_message_size(message_max),
                ),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                SizeStatus::new(
                    pb::consumer_server::ConsumerServer::new(api.clone())
                        .max_decoding_message_size(message_max)
                        .max_encoding_message_size(fetch_message_max),
                ),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                SizeStatus::new(pb::admin_server::AdminServer::new(api.clone())),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(SizeStatus::new(pb::groups_server::GroupsServer::new(api)), gate))
    }

    /// A server for [`Broker::peer_router`]: [`Broker::server`] behind the peer gate (with TLS,
    /// only node certificates get in; raft and RegisterNode check the id they claim).
    pub fn peer_server(
        &self,
    ) -> tonic::transport::server::Router<
        tower_layer::Stack<tonic::service::InterceptorLayer<crate::tls::PeerGate>, tower_layer::Identity>,
    > {
        // A raft RPC that times out is cancelled (RST_STREAM); when this node is busy, many are
        // cancelled before it accepted them. h2 answers more than 20 such streams (its guard
        // against rapid-reset floods) with GOAWAY, which cut the connection that every raft
        // group shares with that peer: all of them failed at once, campaigned, and made the node
        // busier (creating 10,000 partitions never got a leader). A peer may reset as many as
        // it may open; the client listener keeps h2's default.
        let resets = 4 * self.inner.config.limits.streams_per_connection_max as usize;
        self.server()
            .http2_max_pending_accept_reset_streams(Some(resets))
            .layer(tonic::service::InterceptorLayer::new(crate::tls::PeerGate))
            .add_routes(self.peer_router())
    }

    /// The peer listener's services: raft, Controller, NodeStatus, and the client services for
    /// forwarded calls. Never served on the client listener: whoever reaches a peer service can
    /// speak for a node.
    pub fn peer_router(&self) -> tonic::service::Routes {
        let api = Api { inner: Arc::clone(&self.inner) };
        let routes = tonic::service::Routes::default()
            .add_service(self.inner.node.service().into_server())
            .add_service(SizeStatus::new(pb::controller_server::ControllerServer::new(api.clone())))
            .add_service(SizeStatus::new(pb::node_status_server::NodeStatusServer::new(api)));
        self.client_services(routes, |request: Request<()>| Ok::<_, Status>(request))
    }

    /// The client listener's services: Producer, Consumer, Admin, Groups, grpc.health.v1 and
    /// reflection (v1 and v1alpha).
    pub fn router(&self) -> Result<tonic::service::Routes, crate::error::BrokerError> {
        let reflection = |e: tonic_reflection::server::Error| crate::error::BrokerError::Config(e.to_string());
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(reflection)?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(reflection)?;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let mut ready = self.ready();
        tokio::spawn(async move {
            // NOT_SERVING until the node knows its cluster and is registered in it.
            for name in ["", "keel.v1.Producer", "keel.v1.Consumer", "keel.v1.Admin", "keel.v1.Groups"] {
                health_reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
            }
            while !*ready.borrow_and_update() {
                if ready.changed().await.is_err() {
                    return;
                }
            }
            for name in ["", "keel.v1.Producer", "keel.v1.Consumer", "keel.v1.Admin", "keel.v1.Groups"] {
                health_reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
            }
        });
        let routes = tonic::service::Routes::default().add_service(health).add_service(v1).add_service(v1alpha);
        Ok(self.client_services(routes, crate::auth::ClientGate::new(self.inner.tokens.clone())))
    }
}

impl Api {
    /// Refuses the request unless its caller may do `operation` on `resource` (see
    /// [`crate::auth`]).
    pub(crate) fn allow<T>(
        &self,
        request: &Request<T>,
        resource: Resource<'_>,
        operation: Operation,
    ) -> Result<(), Status> {
        self.inner.authorize(crate::auth::caller(request).as_ref(), resource, operation)
    }

    /// Sends an admin write to the controller leader, then waits (bounded) until this node's own
    /// metadata shows its effect, so that the client reads its write from the node it asked.
    async fn forward_admin<T, R, F, Fut>(
        &self,
        request: Request<T>,
        hops: u32,
        call: F,
        applied: impl Fn(&Metadata, &R) -> bool,
    ) -> Result<Response<R>, Status>
    where
        T: Clone,
        F: Fn(tonic::transport::Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let inner = &self.inner;
        let request = inner.forwardable(request.into_inner(), hops)?;
        let response = inner.forward_to_controller(request, call).await?;
        inner.wait_meta(|m| applied(m, response.get_ref())).await;
        Ok(response)
    }

    async fn produce_unary(&self, request: pb::ProduceRequest, hops: u32) -> Result<pb::ProduceResponse, Status> {
        let inner = &self.inner;
        if request.deliver_at_ms.is_some() || request.delay_ms.is_some() {
            return inner.produce_delayed(request, hops).await;
        }
        let what = format!("{}/{}", request.topic, request.partition);
        let submitted = inner.submit(&request).await;
        let status = match submitted {
            Ok((pending, _in_flight)) => match timed(&inner.metrics.commit_latency, pending.wait()).await {
                Ok(appended) => {
                    inner.metrics.produce_records.inc_by(appended.next_offset - appended.base_offset);
                    return Ok(pb::ProduceResponse {
                        request_id: request.request_id,
                        base_offset: appended.base_offset,
                        record_count: (appended.next_offset - appended.base_offset) as u32,
                        error: None,
                        timer_ids: Vec::new(),
                    });
                }
                Err(e) => inner.append_status(&what, e),
            },
            Err(status) => status,
        };
        // A generic client that reached a follower is served by forwarding once to the leader.
        let error = to_pb_error(&status);
        let leader_peer = error.leader_id.filter(|l| *l != inner.config.node_id).and_then(|l| inner.peer_addr_of(l));
        match (leader_peer, hops) {
            (Some(addr), 0) => {
                let channel = inner.channel(&addr)?;
                let mut forwarded = Request::new(request);
                forwarded.metadata_mut().insert(HOPS_HEADER, tonic::metadata::MetadataValue::from_static("1"));
                let deadline = inner.config.append_timeout + Duration::from_secs(1);
                // The leader accepts what this node accepted (the same limits on every node).
                let (message_max, _) = inner.message_limits();
                let mut client = pb::producer_client::ProducerClient::new(channel)
                    .max_decoding_message_size(message_max)
                    .max_encoding_message_size(message_max);
                let call = client.produce(forwarded);
                match tokio::time::timeout(deadline, call).await {
                    Ok(result) => result
                        .map(Response::into_inner)
                        .inspect_err(|s| inner.forget_broken(&addr, s))
                        .map_err(size_status),
                    Err(_) => {
                        inner.drop_channel(&addr);
                        Err(Status::deadline_exceeded(format!(
                            "{what}: the leader at {addr} did not answer in time; the batch may or may not have been written"
                        )))
                    }
                }
            }
            _ => Err(status),
        }
    }

    /// Reads committed records, waiting up to `wait_ms` for some to commit.
    pub(crate) async fn fetch(
        &self,
        request: pb::FetchRequest,
        wait_ms: u32,
        hops: u32,
    ) -> Result<pb::FetchResponse, Status> {
        let inner = &self.inner;
        let (group, replicas, _) = inner.resolve(&request.topic, request.partition)?;
        let Ok(store) = inner.node.store(group) else {
            return self.forward_fetch(request, replicas.first().copied(), hops).await;
        };
        inner.metrics.fetch_requests.inc();
        let bytes_max = match request.max_bytes {
            0 => FETCH_BYTES_DEFAULT,
            n => n as usize,
        }
        .min(inner.config.limits.fetch_bytes_max);
        let wait_ms = wait_ms.min(inner.config.limits.fetch_wait_ms_max);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms));
        let mut hw_rx = store.high_watermark();
        let format = pb::FetchFormat::try_from(request.format)
            .map_err(|_| Status::invalid_argument(format!("unknown fetch format {}", request.format)))?;
        loop {
            let high_watermark = *hw_rx.borrow_and_update();
            let (start, _, written) = store.positions();
            let mut response = pb::FetchResponse {
                topic: request.topic.clone(),
                partition: request.partition,
                records: Vec::new(),
                batches: Vec::new(),
                high_watermark,
                log_start_offset: start.offset,
                next_offset: request.offset,
            };
            if request.offset < start.offset {
                return Err(Status::out_of_range(format!(
                    "offset {} is below the log start {} of {}/{}",
                    request.offset, start.offset, request.topic, request.partition
                )));
            }
            if request.offset > written.offset.max(high_watermark) {
                // Beyond this replica's log. Only the leader's log end bounds the offsets that can
                // still be committed (a follower may lag it by any amount), so the leader decides,
                // and every replica gives the same answer: OUT_OF_RANGE from the leader, records or
                // a long poll from it otherwise.
                let leader = inner.node.leader(group);
                if leader == Some(inner.config.node_id) {
                    return Err(Status::out_of_range(format!(
                        "offset {} is beyond the end {} of {}/{}",
                        request.offset,
                        written.offset.max(high_watermark),
                        request.topic,
                        request.partition
                    )));
                }
                return self.forward_fetch(request, leader, hops).await;
            }
            if request.offset < high_watermark {
                let started = tokio::time::Instant::now();
                let batches = store.read_committed_blocking(request.offset, bytes_max).await.map_err(|e| match e {
                    keel_storage::StorageError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
                    other => Status::unavailable(format!("this replica cannot read: {other}; try another")),
                })?;
                let bytes: usize = batches.iter().map(|b| b.bytes().len()).sum();
                fill(&mut response, batches, request.offset, format)?;
                inner.metrics.fetch_bytes.inc_by(bytes as u64);
                inner.metrics.fetch_latency.observe(started.elapsed().as_secs_f64());
                return Ok(response);
            }
            match tokio::time::timeout_at(deadline, hw_rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("the partition closed on this node; retry")),
                Err(_) => return Ok(response),
            }
        }
    }

    /// Hands a fetch this node cannot answer to `to`, once: a node that hosts no replica asks
    /// one that does (the preferred leader), a follower asked beyond its log asks the leader.
    /// One bounded chunk of a partition's loss audit, read from this replica's committed log
    /// (batch headers are enough: a batch's records have consecutive sequences).
    async fn audit_partition(&self, request: pb::AuditPartitionRequest) -> Result<pb::AuditPartitionResponse, Status> {
        let inner = &self.inner;
        let max_records = match request.max_records {
            0 => AUDIT_RECORDS_DEFAULT,
            n if n > AUDIT_RECORDS_MAX => {
                return Err(Status::invalid_argument(format!("max_records is at most {AUDIT_RECORDS_MAX}, not {n}")));
            }
            n => n,
        };
        let (group, _, _) = inner.resolve(&request.topic, request.partition)?;
        let what = format!("{}/{}", request.topic, request.partition);
        let Ok(store) = inner.node.store(group) else {
            let leader = inner.node.leader(group).and_then(|id| inner.addr_of(id).map(|addr| (id, addr)));
            return Err(not_leader(&what, leader));
        };
        let high_watermark = *store.high_watermark().borrow();
        let (start, _, _) = store.positions();
        let from = request.from_offset.unwrap_or(start.offset);
        if from < start.offset {
            return Err(Status::out_of_range(format!(
                "offset {from} is below the log start {} of {what}",
                start.offset
            )));
        }
        let mut audit = keel_record::audit::PartitionAudit::default();
        let mut next = from;
        let mut read = 0u64;
        'chunk: while next < high_watermark && read < max_records {
            let batches = store.read_committed_blocking(next, AUDIT_READ_BYTES).await.map_err(|e| match e {
                keel_storage::StorageError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
                other => Status::unavailable(format!("this replica cannot read: {other}; try another")),
            })?;
            let before = next;
            for batch in &batches {
                let header = batch.header();
                // A batch that starts before `from` (the fetch returns whole batches) counts only
                // from `from`; one past the high watermark is not committed yet.
                if header.base_offset >= high_watermark || read >= max_records {
                    break 'chunk;
                }
                if audit.tracked() >= AUDIT_TRACKED_MAX {
                    break 'chunk;
                }
                // A chunk that starts inside a batch takes its records from `next` on.
                audit.batch_range(header, next..header.next_offset().min(high_watermark));
                let end = header.next_offset();
                read += end - next;
                next = end;
            }
            if next == before {
                return Err(Status::internal(format!("{what}: the log made no progress at offset {next}")));
            }
        }
        let report = audit.finish();
        let producers = report
            .producers
            .into_iter()
            .map(|((producer_id, epoch), a)| pb::ProducerAudit {
                producer_id,
                producer_epoch: i32::from(epoch),
                records: a.records,
                ranges: a.ranges.iter().map(|&(start, end)| pb::SequenceRange { start, end }).collect(),
                duplicates: a.duplicates,
                duplicate_offsets: a
                    .listed_duplicates
                    .iter()
                    .map(|d| pb::DuplicateAt { sequence: d.sequence, offset: d.offset })
                    .collect(),
                first_offset: a.first_offset,
                last_offset: a.last_offset,
            })
            .collect();
        Ok(pb::AuditPartitionResponse {
            from_offset: from,
            next_offset: next,
            high_watermark,
            log_start_offset: start.offset,
            unstamped_records: report.unstamped,
            producers,
        })
    }

    async fn forward_fetch(
        &self,
        request: pb::FetchRequest,
        to: Option<NodeId>,
        hops: u32,
    ) -> Result<pb::FetchResponse, Status> {
        let inner = &self.inner;
        let what = format!("{}/{}", request.topic, request.partition);
        if hops > 0 {
            return Err(Status::unavailable(format!(
                "{what}: forwarded to a node that cannot answer (not open here yet, or the leader moved); retry"
            )));
        }
        let Some(addr) = to.and_then(|id| inner.peer_addr_of(id)) else {
            return Err(not_leader(&what, None));
        };
        let channel = inner.channel(&addr)?;
        let mut forwarded = Request::new(request.clone());
        forwarded.metadata_mut().insert(HOPS_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        let deadline = Duration::from_millis(u64::from(request.max_wait_ms)) + Duration::from_secs(5);
        // The replica may answer with as much as its Consumer service encodes, far above tonic's
        // default 4 MiB decode limit.
        let (message_max, fetch_message_max) = inner.message_limits();
        let mut client = pb::consumer_client::ConsumerClient::new(channel)
            .max_decoding_message_size(fetch_message_max)
            .max_encoding_message_size(message_max);
        match tokio::time::timeout(deadline, client.fetch(forwarded)).await {
            Ok(result) => {
                result.map(Response::into_inner).inspect_err(|s| inner.forget_broken(&addr, s)).map_err(size_status)
            }
            Err(_) => {
                inner.drop_channel(&addr);
                Err(Status::unavailable(format!("the replica of {what} at {addr} did not answer in time")))
            }
        }
    }

    fn describe_partition(
        &self,
        partition: u32,
        p: &metadata::Partition,
        status: &Statuses,
    ) -> pb::PartitionDescription {
        let s = status.get(&p.group);
        let leader_id = s.and_then(|s| s.leader);
        pb::PartitionDescription {
            partition,
            replicas: p.replicas.clone(),
            leader_id,
            leader_addr: leader_id.and_then(|l| self.inner.addr_of(l)).unwrap_or_default(),
            high_watermark: s.map_or(0, |s| s.high_watermark),
            log_start_offset: s.map_or(0, |s| s.log_start_offset),
            in_sync: s.map(|s| s.in_sync.clone()).unwrap_or_default(),
            moving_to: p.target.clone().unwrap_or_default(),
        }
    }

    fn describe(&self, name: &str, topic: &Topic, status: &Statuses) -> pb::TopicDescription {
        let partitions =
            topic.partitions.iter().enumerate().map(|(i, p)| self.describe_partition(i as u32, p, status)).collect();
        pb::TopicDescription {
            name: name.to_owned(),
            replication_factor: topic.replication_factor,
            config: Some(settings_to_pb(&topic.settings)),
            partitions,
            internal: topic.internal,
        }
    }

    /// Asks every node what it knows about the groups it hosts (1 s deadline each) and merges
    /// the answers (see [`merge`]).
    pub(crate) async fn gather(&self, meta: &Metadata) -> (Statuses, BTreeMap<NodeId, bool>) {
        let inner = &self.inner;
        let mut nodes: BTreeMap<NodeId, String> =
            meta.nodes.iter().filter_map(|(id, n)| Some((*id, n.peer_addr.clone()?))).collect();
        for (id, addr) in inner.meta_voter_addrs() {
            nodes.entry(id).or_insert(addr);
        }
        let calls = nodes.iter().map(|(id, addr)| {
            let (id, addr) = (*id, addr.clone());
            async move {
                if id == inner.config.node_id {
                    return (id, Some(local_status(inner)));
                }
                let Ok(channel) = inner.channel(&addr) else { return (id, None) };
                let mut client = pb::node_status_client::NodeStatusClient::new(channel);
                let call = client.local_status(pb::LocalStatusRequest {});
                match tokio::time::timeout(Duration::from_secs(1), call).await {
                    Ok(Ok(r)) => (id, Some(r.into_inner())),
                    Ok(Err(status)) => {
                        inner.forget_broken(&addr, &status);
                        (id, None)
                    }
                    Err(_) => {
                        inner.drop_channel(&addr);
                        (id, None)
                    }
                }
            }
        });
        let merged = merge(futures_util::future::join_all(calls).await);
        // Every answer refreshes the high watermarks commits are stamped with, so the lag at
        // each commit (what the consumer-status rules judge) is as fresh as the last describe
        // or scrape even on a coordinator that hosts no replica of the partition.
        let mut cache = inner.high_watermarks.lock().unwrap_or_else(|e| e.into_inner());
        for (group, view) in &merged.0 {
            let hw = cache.entry(*group).or_insert(0);
            *hw = (*hw).max(view.high_watermark);
        }
        drop(cache);
        merged
    }
}

/// Merges every node's answer (`None`: it did not answer) into one view per group, and which
/// nodes answered. A group's leader is the node that says it leads it, in the latest term should
/// two say so (a deposed leader may not know it yet); before a leader's answer is seen, the
/// positions are the furthest any replica reported.
fn merge(answers: Vec<(NodeId, Option<pb::LocalStatusResponse>)>) -> (Statuses, BTreeMap<NodeId, bool>) {
    let mut statuses = Statuses::new();
    let mut reachable = BTreeMap::new();
    for (id, answer) in answers {
        reachable.insert(id, answer.is_some());
        let Some(answer) = answer else { continue };
        for g in answer.groups {
            let entry = statuses.entry(g.group).or_insert_with(|| GroupView {
                leader: None,
                term: 0,
                high_watermark: 0,
                log_start_offset: 0,
                in_sync: Vec::new(),
            });
            if g.leader && (entry.leader.is_none() || g.term > entry.term) {
                entry.leader = Some(answer.node_id);
                entry.term = g.term;
                entry.high_watermark = g.high_watermark;
                entry.log_start_offset = g.log_start_offset;
                entry.in_sync = g.in_sync;
            } else if entry.leader.is_none() {
                entry.high_watermark = entry.high_watermark.max(g.high_watermark);
                entry.log_start_offset = entry.log_start_offset.max(g.log_start_offset);
            }
        }
    }
    (statuses, reachable)
}

pub(crate) struct GroupView {
    pub(crate) leader: Option<NodeId>,
    /// The leader's term.
    term: u64,
    pub(crate) high_watermark: u64,
    pub(crate) log_start_offset: u64,
    in_sync: Vec<NodeId>,
}

pub(crate) type Statuses = BTreeMap<GroupId, GroupView>;

/// What this node knows about each group it hosts.
fn local_status(inner: &Inner) -> pb::LocalStatusResponse {
    let me = inner.config.node_id;
    let mut groups = Vec::new();
    for group in inner.node.group_ids() {
        let (Ok(metrics), Ok(store)) = (inner.node.metrics(group), inner.node.store(group)) else { continue };
        let leader_id = inner.node.leader_in(group, &metrics);
        let leader = leader_id == Some(me);
        let high_watermark = *store.high_watermark().borrow();
        let (start, _, _) = store.positions();
        let mut in_sync = Vec::new();
        if leader && let Some(replication) = &metrics.replication {
            let committed = metrics.last_applied.as_ref().map_or(0, |l| l.index);
            for (node, matched) in replication {
                if matched.as_ref().is_some_and(|m| m.index >= committed) {
                    in_sync.push(*node);
                }
            }
        }
        groups.push(pb::GroupStatus {
            group,
            leader,
            leader_id,
            high_watermark,
            log_start_offset: start.offset,
            in_sync,
            term: metrics.current_term,
        });
    }
    pb::LocalStatusResponse { node_id: me, groups }
}

/// Runs `work`, observing how long it took in `histogram` when it succeeds.
async fn timed<T, E>(
    histogram: &prometheus_client::metrics::histogram::Histogram,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = tokio::time::Instant::now();
    let result = work.await;
    if result.is_ok() {
        histogram.observe(started.elapsed().as_secs_f64());
    }
    result
}

/// Fills a fetch response from committed batches (records below `from` are left out).
fn fill(
    response: &mut pb::FetchResponse,
    batches: Vec<keel_record::Batch>,
    from: u64,
    format: pb::FetchFormat,
) -> Result<(), Status> {
    for batch in batches {
        response.next_offset = response.next_offset.max(batch.header().next_offset());
        match format {
            pb::FetchFormat::Batches => response.batches.push(batch.into_bytes()),
            pb::FetchFormat::Records => {
                for record in batch.records() {
                    let record =
                        record.map_err(|e| Status::internal(format!("a committed batch is unreadable: {e}")))?;
                    if record.offset < from {
                        continue;
                    }
                    response.records.push(pb::ConsumedRecord {
                        offset: record.offset,
                        timestamp_ms: record.timestamp_ms,
                        key: record.key,
                        value: record.value,
                        headers: record
                            .headers
                            .into_iter()
                            .map(|h| pb::Header { key: String::from_utf8_lossy(&h.key).into_owned(), value: h.value })
                            .collect(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn settings_to_pb(s: &TopicSettings) -> pb::TopicConfig {
    pb::TopicConfig {
        retention_ms: s.retention_ms.unwrap_or(0),
        retention_bytes: s.retention_bytes.unwrap_or(0),
        max_batch_bytes: s.batch_bytes_max.unwrap_or(0),
    }
}

fn settings_from_pb(c: Option<pb::TopicConfig>, batch_bytes_max: usize) -> Result<TopicSettings, Status> {
    let c = c.unwrap_or_default();
    if c.retention_ms < 0 {
        return Err(Status::invalid_argument("retention_ms must not be negative (0 keeps records forever)"));
    }
    if c.max_batch_bytes as usize > batch_bytes_max {
        return Err(Status::invalid_argument(format!(
            "max_batch_bytes {} exceeds the cluster's limit of {batch_bytes_max}",
            c.max_batch_bytes
        )));
    }
    if c.max_batch_bytes != 0 && c.max_batch_bytes < 1024 {
        return Err(Status::invalid_argument("max_batch_bytes must be at least 1024 (0 = the cluster's limit)"));
    }
    Ok(TopicSettings {
        retention_ms: (c.retention_ms > 0).then_some(c.retention_ms),
        retention_bytes: (c.retention_bytes > 0).then_some(c.retention_bytes),
        batch_bytes_max: (c.max_batch_bytes > 0).then_some(c.max_batch_bytes),
    })
}

#[tonic::async_trait]
impl pb::producer_server::Producer for Api {
    async fn produce(&self, request: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().topic), Operation::Produce)?;
        let caller = crate::auth::caller(&request);
        self.inner.check_quota(caller.as_ref(), Direction::Produce)?;
        self.inner.charge_quota(caller.as_ref(), Direction::Produce, request.get_ref().encoded_len());
        let hops = hops(&request);
        let request = request.into_inner();
        let metrics = &self.inner.metrics;
        metrics.produce_requests.inc();
        metrics.produce_bytes.inc_by(request.encoded_len() as u64);
        let span = info_span!("produce", topic = %request.topic, partition = request.partition);
        let answer = timed(&metrics.produce_latency, self.produce_unary(request, hops).instrument(span)).await;
        if let Err(status) = &answer {
            metrics.error(Counted::Produce, status);
        }
        answer.map(Response::new)
    }

    type ProduceStreamStream = BoxStream<pb::ProduceResponse>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        // One stream, one caller; each request is checked against its own topic.
        let caller = crate::auth::caller(&request);
        let mut inbound = request.into_inner();
        let inner = Arc::clone(&self.inner);
        let in_flight = inner.config.limits.stream_in_flight_max;
        let bytes_max = inner.config.limits.stream_in_flight_bytes_max;
        let (tx, rx) = mpsc::channel(in_flight);
        let permits = Arc::new(Semaphore::new(in_flight));
        let bytes = Arc::new(Semaphore::new(bytes_max));
        let open = GaugeGuard::new(&inner.metrics.produce_streams);
        tokio::spawn(async move {
            let _open = open;
            // Requests are submitted to raft one by one, in arrival order, and their commits
            // awaited concurrently: pipelining without reordering a partition's batches.
            loop {
                let request = match inbound.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(status) => {
                        // Tell the client why its stream ends (e.g. a message over the size
                        // limit), rather than ending it as if all were well.
                        debug!(%status, "produce stream ended");
                        let _ = tx.send(Err(size_status(status))).await;
                        return;
                    }
                };
                let arrived = tokio::time::Instant::now();
                inner.metrics.produce_requests.inc();
                inner.metrics.produce_bytes.inc_by(request.encoded_len() as u64);
                // Waiting here stops reading the stream: HTTP/2 flow control then holds the
                // client back, so a stream holds at most its count and byte budgets.
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                let size = u32::try_from(request.encoded_len().min(bytes_max)).unwrap_or(u32::MAX);
                let Ok(held) = Arc::clone(&bytes).acquire_many_owned(size).await else { return };
                let id = request.request_id;
                let what = format!("{}/{}", request.topic, request.partition);
                let allowed = inner
                    .authorize(caller.as_ref(), Resource::Topic(&request.topic), Operation::Produce)
                    .and_then(|()| inner.check_quota(caller.as_ref(), Direction::Produce));
                if allowed.is_ok() {
                    inner.charge_quota(caller.as_ref(), Direction::Produce, request.encoded_len());
                }
                let submitted = match allowed {
                    Ok(()) => inner.submit(&request).await,
                    Err(status) => Err(status),
                };
                match submitted {
                    Ok((pending, in_flight)) => {
                        drop(request);
                        let tx = tx.clone();
                        let inner = Arc::clone(&inner);
                        tokio::spawn(async move {
                            let metrics = &inner.metrics;
                            let response = match timed(&metrics.commit_latency, pending.wait()).await {
                                Ok(a) => {
                                    metrics.produce_records.inc_by(a.next_offset - a.base_offset);
                                    metrics.produce_latency.observe(arrived.elapsed().as_secs_f64());
                                    pb::ProduceResponse {
                                        request_id: id,
                                        base_offset: a.base_offset,
                                        record_count: (a.next_offset - a.base_offset) as u32,
                                        error: None,
                                        timer_ids: Vec::new(),
                                    }
                                }
                                Err(e) => {
                                    let status = inner.append_status(&what, e);
                                    metrics.error(Counted::Produce, &status);
                                    error_response(id, &status)
                                }
                            };
                            drop((in_flight, held));
                            let _ = tx.send(Ok(response)).await;
                            drop(permit);
                        });
                    }
                    Err(status) => {
                        drop((held, permit));
                        inner.metrics.error(Counted::Produce, &status);
                        if tx.send(Ok(error_response(id, &status))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(channel_stream(rx)))
    }

    async fn cancel_delayed(
        &self,
        request: Request<pb::CancelDelayedRequest>,
    ) -> Result<Response<pb::CancelDelayedResponse>, Status> {
        let hops = hops(&request);
        let caller = crate::auth::caller(&request);
        self.inner.cancel_delayed(request.into_inner(), hops, caller).await.map(Response::new)
    }

    async fn prepare_txn(&self, request: Request<pb::PrepareTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        let (hops, caller) = (hops(&request), crate::auth::caller(&request));
        self.inner.prepare_txn(request.into_inner(), hops, caller).await.map(Response::new)
    }

    async fn end_txn(&self, request: Request<pb::EndTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        let (hops, caller) = (hops(&request), crate::auth::caller(&request));
        self.inner.end_txn(request.into_inner(), hops, caller).await.map(Response::new)
    }

    type TxnChecksStream = BoxStream<pb::TxnCheck>;

    async fn txn_checks(
        &self,
        request: Request<Streaming<pb::TxnCheckAnswer>>,
    ) -> Result<Response<Self::TxnChecksStream>, Status> {
        let caller = crate::auth::caller(&request);
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Status::invalid_argument("a check-back stream opens with the producer group")),
            Err(status) => return Err(status),
        };
        let group = first.group;
        self.inner.authorize(caller.as_ref(), Resource::Group(&group), Operation::Join)?;
        let inner = Arc::clone(&self.inner);
        let (coordinator, id, rx) = inner.open_checks(&group)?;
        tokio::spawn(async move {
            // Answers are applied one at a time, in order; the stream's end unregisters it.
            while let Ok(Some(answer)) = inbound.message().await {
                let txn_id = answer.transaction_id.clone();
                if let Err(status) = inner.check_answer(&coordinator, &group, answer, caller.as_ref()).await {
                    warn!(group, txn = txn_id, %status, "a check-back answer was not applied");
                }
            }
            inner.close_checks(&coordinator, &group, id);
        });
        Ok(Response::new(channel_stream(rx)))
    }

    async fn init_producer_id(
        &self,
        request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        let request = request.into_inner();
        let Some(identity) = request.producer_identity else {
            if request.producer_id.is_some() || request.producer_epoch.is_some() {
                return Err(Status::invalid_argument(
                    "producer_id and producer_epoch are only for a stable producer_identity",
                ));
            }
            let producer_id = self.inner.next_producer_id().instrument(info_span!("init_producer_id")).await?;
            return Ok(Response::new(pb::InitProducerIdResponse { producer_id, producer_epoch: 0 }));
        };
        let claimed = claimed_epoch(&request.producer_id, &request.producer_epoch)?;
        let span = info_span!("init_producer_id", identity = %identity);
        let next =
            self.inner.init_producer_identity(identity, claimed, request.request_token, 0).instrument(span).await?;
        Ok(Response::new(identity_response(next)))
    }
}

/// The answer to an identity's InitProducerId: the id and epoch it holds now.
fn identity_response(next: ProducerEpoch) -> pb::InitProducerIdResponse {
    pb::InitProducerIdResponse { producer_id: next.producer_id, producer_epoch: i32::from(next.epoch) }
}

/// The id and epoch an instance claims to hold when it bumps its own epoch: both or neither.
fn claimed_epoch(producer_id: &Option<i64>, epoch: &Option<i32>) -> Result<Option<ProducerEpoch>, Status> {
    match (*producer_id, *epoch) {
        (None, None) => Ok(None),
        (Some(producer_id), Some(epoch)) => match i16::try_from(epoch) {
            Ok(epoch) if epoch >= 0 && producer_id >= 0 => Ok(Some(ProducerEpoch { producer_id, epoch })),
            _ => Err(Status::invalid_argument(format!("no producer has id {producer_id} epoch {epoch}"))),
        },
        _ => Err(Status::invalid_argument("producer_id and producer_epoch go together")),
    }
}

fn error_response(request_id: u64, status: &Status) -> pb::ProduceResponse {
    pb::ProduceResponse { request_id, error: Some(to_pb_error(status)), ..Default::default() }
}

#[tonic::async_trait]
impl pb::consumer_server::Consumer for Api {
    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().topic), Operation::Consume)?;
        let caller = crate::auth::caller(&request);
        self.inner.check_quota(caller.as_ref(), Direction::Fetch)?;
        let hops = hops(&request);
        let request = request.into_inner();
        let wait = request.max_wait_ms;
        let span = info_span!("fetch", topic = %request.topic, partition = request.partition, offset = request.offset);
        let answer = self.fetch(request, wait, hops).instrument(span).await;
        match &answer {
            Ok(response) => self.inner.charge_quota(caller.as_ref(), Direction::Fetch, response.encoded_len()),
            Err(status) => self.inner.metrics.error(Counted::Fetch, status),
        }
        answer.map(Response::new)
    }

    type SubscribeStream = BoxStream<pb::FetchResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().topic), Operation::Consume)?;
        let caller = crate::auth::caller(&request);
        let connection = crate::tls::remote_of(&request);
        let request = request.into_inner();
        let api = self.clone();
        // Fail fast on a bad topic or partition, before the stream starts.
        self.inner.resolve(&request.topic, request.partition)?;
        let mut stopping = self.inner.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return Err(Status::unavailable(format!("node {} is stopping", self.inner.config.node_id)));
        }
        let slot = SubscribeSlot::take(&self.inner, connection)?;
        let budget = Arc::clone(&self.inner.subscribe_buffer);
        let (tx, rx) = mpsc::channel::<Result<(pb::FetchResponse, Option<OwnedSemaphorePermit>), Status>>(2);
        tokio::spawn(async move {
            let _slot = slot;
            let mut offset = request.offset;
            loop {
                // Room for a whole response before fetching it: what consumers have not taken
                // yet stays within the node's budget, however many streams are open.
                let max_bytes = match request.max_bytes {
                    0 => FETCH_BYTES_DEFAULT,
                    n => n as usize,
                }
                .min(api.inner.config.limits.fetch_bytes_max);
                let room = u32::try_from(max_bytes).unwrap_or(u32::MAX);
                let permit = tokio::select! {
                    permit = Arc::clone(&budget).acquire_many_owned(room) => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stopping.wait_for(|s| *s) => break,
                    _ = tx.closed() => return,
                };
                // Over its fetch quota, the stream waits rather than fails: the consumer just
                // receives more slowly.
                if let Err(status) = api.inner.check_quota(caller.as_ref(), Direction::Fetch) {
                    let wait = tonic_types::StatusExt::get_details_retry_info(&status)
                        .and_then(|r| r.retry_delay)
                        .unwrap_or(Duration::from_millis(100));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stopping.wait_for(|s| *s) => break,
                        _ = tx.closed() => return,
                    }
                }
                let fetch = pb::FetchRequest {
                    topic: request.topic.clone(),
                    partition: request.partition,
                    offset,
                    max_bytes: request.max_bytes,
                    max_wait_ms: SUBSCRIBE_WAIT_MS,
                    format: request.format,
                };
                let result = tokio::select! {
                    result = api.fetch(fetch, SUBSCRIBE_WAIT_MS, 0) => result,
                    _ = stopping.wait_for(|s| *s) => break,
                };
                match result {
                    Ok(response) => {
                        if response.next_offset == offset {
                            if tx.is_closed() {
                                return;
                            }
                            continue;
                        }
                        offset = response.next_offset;
                        api.inner.charge_quota(caller.as_ref(), Direction::Fetch, response.encoded_len());
                        if tx.send(Ok((response, Some(permit)))).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        api.inner.metrics.error(Counted::Fetch, &status);
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            let stopping =
                Status::unavailable(format!("node {} is stopping; subscribe elsewhere", api.inner.config.node_id));
            let _ = tx.send(Err(stopping)).await;
        });
        // The permit is released when the response is handed to the connection, whose own
        // flow control then bounds what waits for the client.
        let stream = channel_stream(rx);
        Ok(Response::new(Box::pin(futures_util::StreamExt::map(stream, |item| {
            item.map(|(response, _permit)| response)
        }))))
    }
}

/// One open Subscribe stream counted against its connection's limit while it lives.
struct SubscribeSlot {
    inner: Arc<Inner>,
    connection: Option<std::net::SocketAddr>,
    _open: GaugeGuard,
}

impl SubscribeSlot {
    fn take(inner: &Arc<Inner>, connection: Option<std::net::SocketAddr>) -> Result<SubscribeSlot, Status> {
        if let Some(addr) = connection {
            let max = inner.config.limits.subscribes_per_connection_max;
            let mut open = inner.subscribes.lock().unwrap_or_else(|e| e.into_inner());
            let count = open.entry(addr).or_insert(0);
            if *count >= max {
                return Err(Status::resource_exhausted(format!(
                    "{max} Subscribe streams are open on this connection (subscribes_per_connection_max); \
                     close some or use another connection"
                )));
            }
            *count += 1;
        }
        Ok(SubscribeSlot {
            inner: Arc::clone(inner),
            connection,
            _open: GaugeGuard::new(&inner.metrics.subscribe_streams),
        })
    }
}

impl Drop for SubscribeSlot {
    fn drop(&mut self) {
        if let Some(addr) = self.connection {
            let mut open = self.inner.subscribes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = open.get_mut(&addr) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&addr);
                }
            }
        }
    }
}

/// An ACL rule from the wire; INVALID_ARGUMENT for unknown types or operations.
fn acl_from_pb(rule: Option<&pb::AclRule>) -> Result<crate::acl::AclRule, Status> {
    use crate::acl::ResourceType;
    let rule = rule.ok_or_else(|| Status::invalid_argument("the request carries no rule"))?;
    let resource_type = match rule.resource_type.as_str() {
        "topic" => ResourceType::Topic,
        "group" => ResourceType::Group,
        "cluster" => ResourceType::Cluster,
        other => return Err(Status::invalid_argument(format!("resource type {other:?}: topic, group or cluster"))),
    };
    let operation = Operation::parse(&rule.operation).ok_or_else(|| {
        let all: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
        Status::invalid_argument(format!("operation {:?}: one of {}", rule.operation, all.join(", ")))
    })?;
    Ok(crate::acl::AclRule {
        principal: rule.principal.clone(),
        resource_type,
        name: rule.name.clone(),
        prefix: rule.prefix,
        operation,
    })
}

fn acl_to_pb(rule: &crate::acl::AclRule) -> pb::AclRule {
    use crate::acl::ResourceType;
    let resource_type = match rule.resource_type {
        ResourceType::Topic => "topic",
        ResourceType::Group => "group",
        ResourceType::Cluster => "cluster",
    };
    pb::AclRule {
        principal: rule.principal.clone(),
        resource_type: resource_type.into(),
        name: rule.name.clone(),
        prefix: rule.prefix,
        operation: rule.operation.name().into(),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().name), Operation::Create)?;
        let hops = hops(&request);
        let inner = &self.inner;
        let r = request.get_ref();
        metadata::validate_topic_name(&r.name).map_err(crate::error::meta_status)?;
        if r.partitions == 0 || r.partitions > metadata::PARTITIONS_PER_TOPIC_MAX {
            return Err(Status::invalid_argument(format!(
                "partitions must be between 1 and {}",
                metadata::PARTITIONS_PER_TOPIC_MAX
            )));
        }
        metadata::validate_replication_factor(r.replication_factor).map_err(crate::error::meta_status)?;
        let settings = settings_from_pb(r.config, inner.config.log.batch_bytes_max())?;
        if !inner.leads_meta() {
            let name = request.get_ref().name.clone();
            let call = |channel, request| async move { AdminClient::new(channel).create_topic(request).await };
            return self.forward_admin(request, hops, call, |m, _| m.topics.contains_key(&name)).await;
        }
        let r = request.into_inner();
        let topic = inner.create_topic(r.name.clone(), r.partitions, r.replication_factor, settings).await?;
        let description = self.describe(&r.name, &topic, &Statuses::new());
        Ok(Response::new(pb::CreateTopicResponse { topic: Some(description) }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().name), Operation::Delete)?;
        let hops = hops(&request);
        let inner = &self.inner;
        if request.get_ref().name.is_empty() {
            return Err(Status::invalid_argument("topic name must not be empty"));
        }
        if !inner.leads_meta() {
            let name = request.get_ref().name.clone();
            let call = |channel, request| async move { AdminClient::new(channel).delete_topic(request).await };
            return self.forward_admin(request, hops, call, |m, _| !m.topics.contains_key(&name)).await;
        }
        inner.delete_topic(request.into_inner().name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.inner.check_serving()?;
        let caller = crate::auth::caller(&request);
        let meta = self.inner.metadata();
        let (statuses, _) = self.gather(&meta).await;
        // Only the topics the caller may describe (as Kafka lists them).
        let topics = meta
            .topics
            .iter()
            .filter(|(name, _)| self.inner.may(caller.as_ref(), Resource::Topic(name), Operation::Describe))
            .map(|(name, t)| self.describe(name, t, &statuses))
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().name), Operation::Describe)?;
        self.inner.check_serving()?;
        let name = request.into_inner().name;
        let meta = self.inner.metadata();
        // `__meta` describes as one internal partition whose replicas are the metadata voters
        // (what `keel partition move __meta/0` changes).
        let controller = (name == metadata::META_TOPIC).then(|| {
            let p = meta
                .controller
                .clone()
                .unwrap_or_else(|| metadata::Partition::new(META_GROUP, self.inner.meta_voters()));
            Topic {
                replication_factor: p.replicas.len() as u32,
                settings: TopicSettings::default(),
                partitions: vec![p],
                internal: true,
            }
        });
        let topic = controller
            .as_ref()
            .or_else(|| meta.topics.get(&name))
            .ok_or_else(|| Status::not_found(format!("topic {name:?} does not exist")))?;
        let (statuses, _) = self.gather(&meta).await;
        Ok(Response::new(pb::DescribeTopicResponse { topic: Some(self.describe(&name, topic, &statuses)) }))
    }

    async fn add_partitions(
        &self,
        request: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::AddPartitionsResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().name), Operation::Alter)?;
        let hops = hops(&request);
        let inner = &self.inner;
        let r = request.get_ref();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("topic name must not be empty"));
        }
        let max = metadata::PARTITIONS_PER_TOPIC_MAX;
        if r.target_total > max {
            return Err(Status::invalid_argument(format!("target_total must be at most {max}")));
        }
        if r.target_total == 0 && (r.count == 0 || r.count > max) {
            return Err(Status::invalid_argument(format!(
                "count must be between 1 and {max} (or set target_total, which is safe to retry)"
            )));
        }
        if !inner.leads_meta() {
            let name = request.get_ref().name.clone();
            let call = |channel, request| async move { AdminClient::new(channel).add_partitions(request).await };
            let applied = |m: &Metadata, r: &pb::AddPartitionsResponse| {
                let count = r.topic.as_ref().map_or(0, |t| t.partitions.len());
                m.topics.get(&name).is_some_and(|t| t.partitions.len() >= count)
            };
            return self.forward_admin(request, hops, call, applied).await;
        }
        let r = request.into_inner();
        let growth = match r.target_total {
            0 => crate::broker::Growth::Add(r.count),
            total => crate::broker::Growth::To(total),
        };
        let topic = inner.add_partitions(r.name.clone(), growth).await?;
        Ok(Response::new(pb::AddPartitionsResponse { topic: Some(self.describe(&r.name, &topic, &Statuses::new())) }))
    }

    async fn audit_partition(
        &self,
        request: Request<pb::AuditPartitionRequest>,
    ) -> Result<Response<pb::AuditPartitionResponse>, Status> {
        self.allow(&request, Resource::Topic(&request.get_ref().topic), Operation::Consume)?;
        let request = request.into_inner();
        let span = info_span!("audit_partition", topic = %request.topic, partition = request.partition);
        self.audit_partition(request).instrument(span).await.map(Response::new)
    }

    async fn move_partition(
        &self,
        request: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Admin)?;
        let r = request.get_ref();
        if r.topic.is_empty() {
            return Err(Status::invalid_argument("topic name must not be empty"));
        }
        self.inner.check_serving()?;
        // Checked here too, so a bad request is refused without a trip to the controller (which
        // records the metadata voters first if they are not yet: then only it can check).
        let meta = self.inner.metadata();
        if r.topic != metadata::META_TOPIC || meta.controller.is_some() {
            meta.check_move(&r.topic, r.partition, &r.replicas).map_err(crate::error::meta_status)?;
        }
        if !self.inner.leads_meta() {
            let hops = hops(&request);
            let (topic, partition, to) = (r.topic.clone(), r.partition, r.replicas.clone());
            let call = |channel, request| async move { AdminClient::new(channel).move_partition(request).await };
            let applied = move |m: &Metadata, _: &pb::MovePartitionResponse| {
                m.partition(&topic, partition).is_ok_and(|p| p.replicas == to || p.target.as_ref() == Some(&to))
            };
            return self.forward_admin(request, hops, call, applied).await;
        }
        let r = request.into_inner();
        let p = self.inner.move_partition(&r.topic, r.partition, r.replicas).await?;
        let description = self.describe_partition(r.partition, &p, &Statuses::new());
        Ok(Response::new(pb::MovePartitionResponse { partition: Some(description) }))
    }

    async fn replace_node(
        &self,
        request: Request<pb::ReplaceNodeRequest>,
    ) -> Result<Response<pb::ReplaceNodeResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Admin)?;
        self.inner.check_serving()?;
        let node = request.get_ref().node_id;
        if !self.inner.metadata().nodes.contains_key(&node) {
            return Err(Status::failed_precondition(format!("node {node} is not registered: nothing to replace")));
        }
        if !self.inner.leads_meta() {
            let hops = hops(&request);
            let call = |channel, request| async move { AdminClient::new(channel).replace_node(request).await };
            // Read-your-writes: the node's old key is forgotten (until its new data dir registers).
            let applied = move |m: &Metadata, r: &pb::ReplaceNodeResponse| {
                m.nodes.get(&node).is_some_and(|n| n.key_hash.is_none())
                    || r.partitions.iter().all(|p| crate::moves::rebuilding(m, node).contains(p))
            };
            return self.forward_admin(request, hops, call, applied).await;
        }
        let partitions = self.inner.replace_node(node).await?;
        Ok(Response::new(pb::ReplaceNodeResponse { partitions }))
    }

    async fn decommission_node(
        &self,
        request: Request<pb::DecommissionNodeRequest>,
    ) -> Result<Response<pb::DecommissionNodeResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Admin)?;
        self.inner.check_serving()?;
        let node = request.get_ref().node_id;
        if !self.inner.metadata().nodes.contains_key(&node) {
            return Err(Status::failed_precondition(format!("node {node} is not registered: nothing to decommission")));
        }
        if !self.inner.leads_meta() {
            let hops = hops(&request);
            let call = |channel, request| async move { AdminClient::new(channel).decommission_node(request).await };
            let applied = move |m: &Metadata, _: &pb::DecommissionNodeResponse| {
                m.nodes.get(&node).is_some_and(|n| n.decommissioned)
            };
            return self.forward_admin(request, hops, call, applied).await;
        }
        let partitions = self.inner.decommission_node(node).await?;
        Ok(Response::new(pb::DecommissionNodeResponse { partitions }))
    }

    async fn add_acl(&self, request: Request<pb::AclRequest>) -> Result<Response<pb::AclResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Admin)?;
        let rule = acl_from_pb(request.get_ref().rule.as_ref())?;
        rule.validate().map_err(crate::error::meta_status)?;
        if !self.inner.leads_meta() {
            let hops = hops(&request);
            let call = |channel, request| async move { AdminClient::new(channel).add_acl(request).await };
            return self.forward_admin(request, hops, call, |m, _| m.acls.contains(&rule)).await;
        }
        self.inner.change_acl(metadata::Command::AddAcl { rule }).await?;
        Ok(Response::new(pb::AclResponse {}))
    }

    async fn remove_acl(&self, request: Request<pb::AclRequest>) -> Result<Response<pb::AclResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Admin)?;
        let rule = acl_from_pb(request.get_ref().rule.as_ref())?;
        if !self.inner.leads_meta() {
            let hops = hops(&request);
            let call = |channel, request| async move { AdminClient::new(channel).remove_acl(request).await };
            return self.forward_admin(request, hops, call, |m, _| !m.acls.contains(&rule)).await;
        }
        self.inner.change_acl(metadata::Command::RemoveAcl { rule }).await?;
        Ok(Response::new(pb::AclResponse {}))
    }

    async fn list_acls(&self, request: Request<pb::ListAclsRequest>) -> Result<Response<pb::ListAclsResponse>, Status> {
        self.allow(&request, Resource::Cluster, Operation::Describe)?;
        let principal = request.into_inner().principal;
        let rules = self
            .inner
            .metadata()
            .acls
            .iter()
            .filter(|r| principal.is_empty() || r.principal == principal || r.principal == "*")
            .map(acl_to_pb)
            .collect();
        Ok(Response::new(pb::ListAclsResponse { rules }))
    }

    async fn list_txns(&self, request: Request<pb::ListTxnsRequest>) -> Result<Response<pb::ListTxnsResponse>, Status> {
        let (hops, caller) = (hops(&request), crate::auth::caller(&request));
        self.inner.list_txns(request.into_inner(), hops, caller).await.map(Response::new)
    }

    async fn resume_txn(&self, request: Request<pb::ResumeTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        let (hops, caller) = (hops(&request), crate::auth::caller(&request));
        self.inner.resume_txn(request.into_inner(), hops, caller).await.map(Response::new)
    }

    async fn describe_cluster(
        &self,
        request: Request<pb::DescribeClusterRequest>,
    ) -> Result<Response<pb::DescribeClusterResponse>, Status> {
        // Every client needs the nodes and its topics' leaders (the Rust client's metadata):
        // no ACL beyond authentication, and only the topics the caller may describe.
        let caller = crate::auth::caller(&request);
        self.inner.check_serving()?;
        let inner = &self.inner;
        let meta = inner.metadata();
        let (statuses, reachable) = self.gather(&meta).await;
        let mut nodes: BTreeMap<NodeId, pb::NodeDescription> = BTreeMap::new();
        for id in inner.meta_voters() {
            // A voter's client address is known once it registered (`voters` names peer ones).
            nodes.insert(
                id,
                pb::NodeDescription {
                    node_id: id,
                    addr: String::new(),
                    controller_voter: true,
                    reachable: false,
                    decommissioned: false,
                },
            );
        }
        for (id, n) in &meta.nodes {
            let entry = nodes.entry(*id).or_insert_with(|| pb::NodeDescription {
                node_id: *id,
                addr: String::new(),
                controller_voter: false,
                reachable: false,
                decommissioned: false,
            });
            entry.addr = n.addr.clone();
            entry.decommissioned = n.decommissioned;
        }
        for (id, node) in nodes.iter_mut() {
            node.reachable = reachable.get(id).copied().unwrap_or(false);
        }
        let topics: Vec<_> = meta
            .topics
            .iter()
            .filter(|(name, _)| inner.may(caller.as_ref(), Resource::Topic(name), Operation::Describe))
            .map(|(name, t)| self.describe(name, t, &statuses))
            .collect();
        let mut under_replicated = 0;
        let mut leaderless = 0;
        for p in topics.iter().flat_map(|t| &t.partitions) {
            if p.leader_id.is_none() {
                leaderless += 1;
            } else if p.in_sync.len() < p.replicas.len() {
                under_replicated += 1;
            }
        }
        let controller_leader = statuses.get(&META_GROUP).and_then(|s| s.leader);
        Ok(Response::new(pb::DescribeClusterResponse {
            cluster_id: meta.cluster_id.clone().unwrap_or_default(),
            answered_by: inner.config.node_id,
            controller_leader,
            nodes: nodes.into_values().collect(),
            topics,
            under_replicated,
            leaderless,
        }))
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Api {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let hops = hops(&request);
        // Forwarded registrations come from the node that checked this at its door.
        if let Some(keel_raft::VerifiedNode(proved)) = request.extensions().get().copied()
            && hops == 0
            && proved != request.get_ref().node_id
        {
            tracing::warn!(proved, claimed = request.get_ref().node_id, "RegisterNode for another node refused");
            return Err(Status::permission_denied(format!(
                "this connection's certificate is node {proved}'s: it cannot register node {}",
                request.get_ref().node_id
            )));
        }
        self.inner.register_node(request.into_inner(), hops).await?;
        let cluster_id = self.inner.metadata().cluster_id.clone().unwrap_or_default();
        Ok(Response::new(pb::RegisterNodeResponse { cluster_id }))
    }

    async fn finish_move(
        &self,
        request: Request<pb::FinishMoveRequest>,
    ) -> Result<Response<pb::FinishMoveResponse>, Status> {
        let hops = hops(&request);
        let r = request.into_inner();
        self.inner.finish_move(&r.topic, r.partition, r.replicas, hops).await?;
        Ok(Response::new(pb::FinishMoveResponse {}))
    }

    async fn meta_position(
        &self,
        request: Request<pb::MetaPositionRequest>,
    ) -> Result<Response<pb::MetaPositionResponse>, Status> {
        let hops = hops(&request);
        let committed_offset = self.inner.meta_position(hops).await?;
        Ok(Response::new(pb::MetaPositionResponse { committed_offset }))
    }

    async fn allocate_producer_ids(
        &self,
        request: Request<pb::AllocateProducerIdsRequest>,
    ) -> Result<Response<pb::AllocateProducerIdsResponse>, Status> {
        let hops = hops(&request);
        let count = request.into_inner().count;
        let block = self.inner.allocate_producer_ids(count, hops).await?;
        Ok(Response::new(pb::AllocateProducerIdsResponse { first: block.start, count }))
    }

    async fn init_producer_identity(
        &self,
        request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        let hops = hops(&request);
        let request = request.into_inner();
        let Some(identity) = request.producer_identity else {
            return Err(Status::invalid_argument("InitProducerIdentity needs a producer_identity"));
        };
        let claimed = claimed_epoch(&request.producer_id, &request.producer_epoch)?;
        let next = self.inner.init_producer_identity(identity, claimed, request.request_token, hops).await?;
        Ok(Response::new(identity_response(next)))
    }
}

#[tonic::async_trait]
impl pb::node_status_server::NodeStatus for Api {
    async fn local_status(
        &self,
        _request: Request<pb::LocalStatusRequest>,
    ) -> Result<Response<pb::LocalStatusResponse>, Status> {
        Ok(Response::new(local_status(&self.inner)))
    }

    async fn reconciled(
        &self,
        _request: Request<pb::ReconciledRequest>,
    ) -> Result<Response<pb::ReconciledResponse>, Status> {
        let reconciled_offset = self.inner.reconciled.load(std::sync::atomic::Ordering::Acquire);
        Ok(Response::new(pb::ReconciledResponse { reconciled_offset }))
    }

    async fn meta_copy(&self, request: Request<pb::MetaCopyRequest>) -> Result<Response<pb::MetaCopyResponse>, Status> {
        Ok(Response::new(self.inner.meta_copy(request.into_inner()).await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(group: GroupId, leader: bool, term: u64, high_watermark: u64) -> pb::GroupStatus {
        pb::GroupStatus { group, leader, term, high_watermark, ..Default::default() }
    }

    fn answer(node_id: NodeId, groups: Vec<pb::GroupStatus>) -> Option<pb::LocalStatusResponse> {
        Some(pb::LocalStatusResponse { node_id, groups })
    }

    #[test]
    fn the_latest_terms_leader_wins() {
        // Group 1: node 3 leads in term 4; node 1 still says it leads, in term 3 (a deposed
        // leader that has not heard of its successor). Group 2: nobody leads now.
        let answers = vec![
            (1, answer(1, vec![status(1, true, 3, 10), status(2, false, 2, 5)])),
            (2, None),
            (3, answer(3, vec![status(1, true, 4, 8), status(2, false, 2, 7)])),
        ];
        for answers in [answers.clone(), answers.into_iter().rev().collect()] {
            let (statuses, reachable) = merge(answers);
            let g1 = &statuses[&1];
            assert_eq!((g1.leader, g1.term, g1.high_watermark), (Some(3), 4, 8), "whatever the order of the answers");
            let g2 = &statuses[&2];
            assert_eq!((g2.leader, g2.high_watermark), (None, 7));
            assert_eq!(reachable, BTreeMap::from([(1, true), (2, false), (3, true)]));
        }
    }
}
