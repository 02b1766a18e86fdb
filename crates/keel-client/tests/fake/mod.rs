//! A tiny in-process Keel cluster for client tests: every node serves Admin, Producer and
//! Consumer on 127.0.0.1 over one shared in-memory log per partition, answers deterministically,
//! and injects the failures a test asks for (NOT_LEADER, UNAVAILABLE, broken streams).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use keel_proto::v1 as pb;
use keel_proto::v1::admin_server::{Admin, AdminServer};
use keel_proto::v1::consumer_server::{Consumer, ConsumerServer};
use keel_proto::v1::producer_server::{Producer, ProducerServer};
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn channel_stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> BoxStream<T> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

/// One partition: stamped batches and who really leads it.
#[derive(Debug, Default)]
pub struct Partition {
    pub batches: Vec<Bytes>,
    pub next_offset: u64,
    pub log_start: u64,
    /// The node that accepts writes.
    pub leader: u64,
    /// The leader DescribeCluster reports (may be stale on purpose).
    pub advertised: u64,
    /// A node cut off from the others (a deposed leader that cannot hear of its successor): it
    /// refuses writes without naming a leader, and its metadata names none.
    pub blind: Option<u64>,
}

/// Failures to inject, each used up once.
#[derive(Debug, Default)]
pub struct Faults {
    /// Answer this many produce requests with UNAVAILABLE and no hint.
    pub unavailable: usize,
    /// End this many produce streams with an error status instead of answering.
    pub break_streams: usize,
    /// Answer every produce request with UNAVAILABLE (a partition that never recovers).
    pub always_unavailable: bool,
    /// Answer NOT_LEADER without a hint this many times.
    pub not_leader_unhinted: usize,
    /// Carry out this many admin writes, then answer UNAVAILABLE as if the answer was lost.
    pub lose_admin_answers: usize,
}

#[derive(Debug, Default)]
pub struct State {
    pub topics: BTreeMap<String, Vec<Partition>>,
    pub faults: Faults,
    pub produce_requests: usize,
    pub describe_calls: usize,
    /// Subscribe calls refused with an error (e.g. OUT_OF_RANGE).
    pub refused_subscribes: usize,
    /// Producer ids handed out (the fake does not deduplicate; it only stores the stamps).
    pub producer_ids: i64,
}

/// The shared state of every fake node.
#[derive(Debug, Default)]
pub struct Cluster {
    pub nodes: Mutex<BTreeMap<u64, String>>,
    pub state: Mutex<State>,
    pub appended: Notify,
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) on ephemeral ports.
    pub async fn start(n: u64) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::default());
        for id in 1..=n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            cluster.nodes.lock().unwrap().insert(id, addr);
            let node = Node { id, cluster: cluster.clone() };
            let incoming = futures_util::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(s, _)| {
                    s.set_nodelay(true).unwrap();
                    s
                });
                Some((accepted, listener))
            });
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(AdminServer::new(node.clone()))
                    .add_service(ProducerServer::new(node.clone()))
                    .add_service(ConsumerServer::new(node))
                    .serve_with_incoming(incoming)
                    .await
                    .unwrap();
            });
        }
        cluster
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes.lock().unwrap()[&id].clone()
    }

    pub fn bootstrap(&self) -> Vec<String> {
        self.nodes.lock().unwrap().values().cloned().collect()
    }

    /// Creates a topic led (and advertised) by node 1.
    pub fn create(&self, name: &str, partitions: u32) {
        let parts = (0..partitions).map(|_| Partition { leader: 1, advertised: 1, ..Partition::default() }).collect();
        self.state.lock().unwrap().topics.insert(name.to_owned(), parts);
    }

    pub fn with_partition<R>(&self, topic: &str, partition: u32, f: impl FnOnce(&mut Partition) -> R) -> R {
        let mut state = self.state.lock().unwrap();
        f(&mut state.topics.get_mut(topic).unwrap()[partition as usize])
    }

    /// The records of a partition, decoded: (offset, value).
    pub fn records(&self, topic: &str, partition: u32) -> Vec<(u64, Bytes)> {
        let batches = self.with_partition(topic, partition, |p| p.batches.clone());
        let mut out = Vec::new();
        for bytes in batches {
            let batch = keel_record::Batch::from_bytes(bytes).unwrap();
            for r in batch.records() {
                let r = r.unwrap();
                out.push((r.offset, r.value.unwrap_or_default()));
            }
        }
        out
    }

    /// A topic as node `by` describes it.
    fn describe_topic(&self, by: u64, name: &str, parts: &[Partition]) -> pb::TopicDescription {
        let nodes = self.nodes.lock().unwrap();
        pb::TopicDescription {
            name: name.to_owned(),
            replication_factor: 1,
            config: Some(pb::TopicConfig::default()),
            internal: false,
            partitions: parts
                .iter()
                .enumerate()
                .map(|(i, p)| pb::PartitionDescription {
                    partition: i as u32,
                    replicas: vec![p.advertised],
                    leader_id: (p.blind != Some(by)).then_some(p.advertised),
                    leader_addr: if p.blind == Some(by) { String::new() } else { nodes[&p.advertised].clone() },
                    high_watermark: p.next_offset,
                    log_start_offset: p.log_start,
                    in_sync: vec![p.advertised],
                    moving_to: vec![],
                })
                .collect(),
        }
    }

    /// Appends one produce request on node `id`, or says why not.
    fn produce(&self, id: u64, request: &pb::ProduceRequest) -> Result<pb::ProduceResponse, Status> {
        let mut state = self.state.lock().unwrap();
        state.produce_requests += 1;
        if state.faults.always_unavailable {
            return Err(Status::unavailable("always down"));
        }
        if state.faults.unavailable > 0 {
            state.faults.unavailable -= 1;
            return Err(Status::unavailable("injected"));
        }
        if state.faults.not_leader_unhinted > 0 {
            state.faults.not_leader_unhinted -= 1;
            return Err(not_leader(None));
        }
        let Some(parts) = state.topics.get_mut(&request.topic) else {
            return Err(Status::not_found(format!("no topic {}", request.topic)));
        };
        let Some(p) = parts.get_mut(request.partition as usize) else {
            return Err(Status::not_found("no such partition"));
        };
        if p.blind == Some(id) && p.leader != id {
            return Err(not_leader(None));
        }
        if p.leader != id {
            let addr = self.nodes.lock().unwrap()[&p.leader].clone();
            return Err(not_leader(Some((p.leader, addr))));
        }
        let batch = keel_record::Batch::from_bytes(request.batch.clone())
            .map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
        batch.validate_records().map_err(|e| Status::invalid_argument(format!("bad records: {e}")))?;
        let count = batch.header().record_count;
        let mut bytes = request.batch.to_vec();
        keel_record::stamp(&mut bytes, p.next_offset, 1, 1).unwrap();
        let base_offset = p.next_offset;
        p.next_offset += u64::from(count);
        p.batches.push(Bytes::from(bytes));
        drop(state);
        self.appended.notify_waiters();
        Ok(pb::ProduceResponse {
            request_id: request.request_id,
            base_offset,
            record_count: count,
            ..Default::default()
        })
    }

    /// Batches from `offset` on, up to about `max_bytes` (at least one).
    fn read(&self, topic: &str, partition: u32, offset: u64, max_bytes: usize) -> Result<pb::FetchResponse, Status> {
        let state = self.state.lock().unwrap();
        let p = state
            .topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
            .ok_or_else(|| Status::not_found("no such partition"))?;
        if offset < p.log_start || offset > p.next_offset {
            return Err(Status::out_of_range(format!("{offset} outside {}..={}", p.log_start, p.next_offset)));
        }
        let mut response = pb::FetchResponse {
            topic: topic.to_owned(),
            partition,
            high_watermark: p.next_offset,
            log_start_offset: p.log_start,
            next_offset: offset,
            ..Default::default()
        };
        let mut size = 0;
        for bytes in &p.batches {
            let header = keel_record::check(bytes).unwrap();
            if header.next_offset() <= offset {
                continue;
            }
            if size > 0 && size + bytes.len() > max_bytes {
                break;
            }
            size += bytes.len();
            response.next_offset = header.next_offset();
            response.batches.push(bytes.clone());
        }
        Ok(response)
    }
}

fn not_leader(leader: Option<(u64, String)>) -> Status {
    let mut metadata = std::collections::HashMap::new();
    if let Some((id, addr)) = leader {
        metadata.insert("leader_id".to_owned(), id.to_string());
        metadata.insert("leader_addr".to_owned(), addr);
    }
    let details = tonic_types::ErrorDetails::with_error_info("NOT_LEADER", "keel", metadata);
    <Status as tonic_types::StatusExt>::with_error_details(Code::Unavailable, "not the leader", details)
}

fn to_pb_error(status: &Status) -> pb::Error {
    use tonic_types::StatusExt;
    let mut error = pb::Error {
        code: status.code() as i32,
        message: status.message().to_owned(),
        leader_id: None,
        leader_addr: String::new(),
        reason: String::new(),
        retry_after_ms: None,
    };
    if let Some(info) = status.get_details_error_info() {
        error.leader_id = info.metadata.get("leader_id").and_then(|s| s.parse().ok());
        error.leader_addr = info.metadata.get("leader_addr").cloned().unwrap_or_default();
        error.reason = info.reason;
    }
    error
}

#[derive(Debug, Clone)]
struct Node {
    id: u64,
    cluster: Arc<Cluster>,
}

#[tonic::async_trait]
impl Producer for Node {
    async fn produce(&self, request: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        self.cluster.produce(self.id, request.get_ref()).map(Response::new)
    }

    type ProduceStreamStream = BoxStream<pb::ProduceResponse>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let node = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                let broken = {
                    let mut state = node.cluster.state.lock().unwrap();
                    let broken = state.faults.break_streams > 0;
                    if broken {
                        state.faults.break_streams -= 1;
                    }
                    broken
                };
                if broken {
                    let _ = tx.send(Err(Status::unavailable("stream broken on purpose"))).await;
                    return;
                }
                let response = match node.cluster.produce(node.id, &request) {
                    Ok(r) => r,
                    Err(status) => pb::ProduceResponse {
                        request_id: request.request_id,
                        error: Some(to_pb_error(&status)),
                        ..Default::default()
                    },
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(channel_stream(rx)))
    }

    async fn cancel_delayed(
        &self,
        _: Request<pb::CancelDelayedRequest>,
    ) -> Result<Response<pb::CancelDelayedResponse>, Status> {
        Err(Status::unimplemented("the fake node keeps no timers"))
    }

    async fn prepare_txn(&self, _: Request<pb::PrepareTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        Err(Status::unimplemented("the fake node keeps no transactions"))
    }

    async fn end_txn(&self, _: Request<pb::EndTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        Err(Status::unimplemented("the fake node keeps no transactions"))
    }

    type TxnChecksStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::TxnCheck, Status>> + Send>>;

    async fn txn_checks(
        &self,
        _: Request<tonic::Streaming<pb::TxnCheckAnswer>>,
    ) -> Result<Response<Self::TxnChecksStream>, Status> {
        Err(Status::unimplemented("the fake node keeps no transactions"))
    }

    async fn init_producer_id(
        &self,
        _request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        let mut state = self.cluster.state.lock().unwrap();
        let producer_id = state.producer_ids;
        state.producer_ids += 1;
        Ok(Response::new(pb::InitProducerIdResponse { producer_id, producer_epoch: 0 }))
    }
}

#[tonic::async_trait]
impl Consumer for Node {
    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let r = request.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(r.max_wait_ms));
        loop {
            let notified = self.cluster.appended.notified();
            let response = self.cluster.read(&r.topic, r.partition, r.offset, r.max_bytes as usize)?;
            if !response.batches.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(response));
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    type SubscribeStream = BoxStream<pb::FetchResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        if let Err(status) = self.cluster.read(&r.topic, r.partition, r.offset, 1) {
            self.cluster.state.lock().unwrap().refused_subscribes += 1;
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(2);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let mut offset = r.offset;
            loop {
                let notified = cluster.appended.notified();
                match cluster.read(&r.topic, r.partition, offset, r.max_bytes as usize) {
                    Ok(response) if response.batches.is_empty() => {
                        if tx.is_closed() {
                            return;
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                    }
                    Ok(response) => {
                        offset = response.next_offset;
                        if tx.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(channel_stream(rx)))
    }
}

#[tonic::async_trait]
impl Admin for Node {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let r = request.into_inner();
        if r.partitions == 0 {
            return Err(Status::invalid_argument("partitions must be positive"));
        }
        if self.cluster.state.lock().unwrap().topics.contains_key(&r.name) {
            return Err(Status::already_exists(format!("topic {} exists", r.name)));
        }
        self.cluster.create(&r.name, r.partitions);
        let state = self.cluster.state.lock().unwrap();
        let topic = self.cluster.describe_topic(self.id, &r.name, &state.topics[&r.name]);
        Ok(Response::new(pb::CreateTopicResponse { topic: Some(topic) }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        match self.cluster.state.lock().unwrap().topics.remove(&name) {
            Some(_) => Ok(Response::new(pb::DeleteTopicResponse {})),
            None => Err(Status::not_found(format!("no topic {name}"))),
        }
    }

    async fn list_topics(&self, _: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let state = self.cluster.state.lock().unwrap();
        let topics = state.topics.iter().map(|(n, p)| self.cluster.describe_topic(self.id, n, p)).collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let name = request.into_inner().name;
        let state = self.cluster.state.lock().unwrap();
        let parts = state.topics.get(&name).ok_or_else(|| Status::not_found(format!("no topic {name}")))?;
        Ok(Response::new(pb::DescribeTopicResponse { topic: Some(self.cluster.describe_topic(self.id, &name, parts)) }))
    }

    async fn add_partitions(
        &self,
        request: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::AddPartitionsResponse>, Status> {
        let r = request.into_inner();
        let mut state = self.cluster.state.lock().unwrap();
        let parts = state.topics.get_mut(&r.name).ok_or_else(|| Status::not_found("no topic"))?;
        // The real broker's rule (keel.proto): target_total, when set, is the total; else count.
        let add = match r.target_total as usize {
            0 => r.count as usize,
            total if total < parts.len() => return Err(Status::failed_precondition("partitions are never removed")),
            total => total - parts.len(),
        };
        for _ in 0..add {
            parts.push(Partition { leader: 1, advertised: 1, ..Partition::default() });
        }
        let topic = self.cluster.describe_topic(self.id, &r.name, parts);
        if state.faults.lose_admin_answers > 0 {
            state.faults.lose_admin_answers -= 1;
            return Err(Status::unavailable("the answer was lost"));
        }
        Ok(Response::new(pb::AddPartitionsResponse { topic: Some(topic) }))
    }

    async fn audit_partition(
        &self,
        _: Request<pb::AuditPartitionRequest>,
    ) -> Result<Response<pb::AuditPartitionResponse>, Status> {
        Err(Status::unimplemented("the fake broker does not audit"))
    }

    async fn add_acl(&self, _: Request<pb::AclRequest>) -> Result<Response<pb::AclResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no ACLs"))
    }

    async fn move_partition(
        &self,
        _: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        Err(Status::unimplemented("the fake broker has one replica per partition"))
    }

    async fn replace_node(
        &self,
        _: Request<pb::ReplaceNodeRequest>,
    ) -> Result<Response<pb::ReplaceNodeResponse>, Status> {
        Err(Status::unimplemented("the fake broker is one node"))
    }

    async fn decommission_node(
        &self,
        _: Request<pb::DecommissionNodeRequest>,
    ) -> Result<Response<pb::DecommissionNodeResponse>, Status> {
        Err(Status::unimplemented("the fake broker is one node"))
    }

    async fn remove_acl(&self, _: Request<pb::AclRequest>) -> Result<Response<pb::AclResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no ACLs"))
    }

    async fn list_acls(&self, _: Request<pb::ListAclsRequest>) -> Result<Response<pb::ListAclsResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no ACLs"))
    }

    async fn list_txns(&self, _: Request<pb::ListTxnsRequest>) -> Result<Response<pb::ListTxnsResponse>, Status> {
        Err(Status::unimplemented("the fake node keeps no transactions"))
    }

    async fn resume_txn(&self, _: Request<pb::ResumeTxnRequest>) -> Result<Response<pb::TxnStatus>, Status> {
        Err(Status::unimplemented("the fake node keeps no transactions"))
    }

    async fn describe_cluster(
        &self,
        _: Request<pb::DescribeClusterRequest>,
    ) -> Result<Response<pb::DescribeClusterResponse>, Status> {
        let mut state = self.cluster.state.lock().unwrap();
        state.describe_calls += 1;
        let topics = state.topics.iter().map(|(n, p)| self.cluster.describe_topic(self.id, n, p)).collect();
        let nodes = self
            .cluster
            .nodes
            .lock()
            .unwrap()
            .iter()
            .map(|(id, addr)| pb::NodeDescription {
                node_id: *id,
                addr: addr.clone(),
                controller_voter: true,
                reachable: true,
                decommissioned: false,
            })
            .collect();
        Ok(Response::new(pb::DescribeClusterResponse {
            cluster_id: "fake".into(),
            answered_by: self.id,
            controller_leader: Some(1),
            nodes,
            topics,
            under_replicated: 0,
            leaderless: 0,
        }))
    }
}
