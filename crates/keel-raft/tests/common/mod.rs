//! A cluster of Keel raft nodes in one process, talking gRPC over real loopback sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_raft::{
    AppendError, Appended, GroupId, IoMode, NetworkConfig, Node, NodeConfig, NodeId, RaftNode, RaftTimings,
    TcpConnector,
};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{Disk, LogConfig};
use tokio::sync::oneshot;

/// Fast timings so tests fail over in well under a second.
pub fn test_timings() -> RaftTimings {
    RaftTimings { heartbeat_ms: 50, election_min_ms: 300, election_max_ms: 600, quiesce: true }
}

/// One running node: raft groups plus a gRPC server on its own address.
pub struct TestNode {
    pub id: NodeId,
    pub addr: String,
    pub node: Arc<RaftNode>,
    pub disk: Arc<dyn Disk>,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// Settings shared by a test cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    pub log: LogConfig,
    pub io: IoMode,
    pub timings: RaftTimings,
    pub network: NetworkConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            log: LogConfig::default(),
            io: IoMode::Blocking,
            timings: test_timings(),
            network: NetworkConfig::default(),
        }
    }
}

impl TestNode {
    /// Starts node `id` on `addr` (`127.0.0.1:0` picks a port) over `disk`, data under `dir`.
    pub async fn start(id: NodeId, addr: &str, disk: Arc<dyn Disk>, dir: PathBuf, cfg: &ClusterConfig) -> TestNode {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr.parse().unwrap()).unwrap();
        let listener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = NodeConfig {
            node_id: id,
            advertised_addr: addr.clone(),
            data_dir: dir.clone(),
            timings: cfg.timings,
            log: cfg.log.clone(),
            io: cfg.io,
            network: cfg.network,
            append_timeout: Duration::from_secs(5),
            seed: id * 7919,
            flush: keel_raft::FlushScope::Node,
        };
        let node = Arc::new(RaftNode::new(config, Arc::clone(&disk), Arc::new(TcpConnector::default())));
        let (stop, stopped) = oneshot::channel::<()>();
        let service = node.service().into_server();
        let server = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestNode { id, addr, node, disk, dir, stop: Some(stop), server: Some(server) }
    }

    /// Starts this (stopped) node again on its address, disk and data dir.
    pub async fn restart(&mut self, cfg: &ClusterConfig) {
        let (id, addr, disk, dir) = (self.id, self.addr.clone(), Arc::clone(&self.disk), self.dir.clone());
        *self = TestNode::start(id, &addr, disk, dir, cfg).await;
    }

    /// Stops the server and every raft core. With `crash`, nothing is flushed on the way out.
    pub async fn stop(&mut self, crash: bool) {
        if crash {
            self.node.halt().await;
        } else {
            self.node.shutdown().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

/// A batch of `count` records whose values name `tag` and the record number.
pub fn batch(tag: u64, count: u32) -> Bytes {
    let mut b = BatchBuilder::new(1 << 20);
    for i in 0..count {
        let value = format!("{tag}:{i}");
        b.push(NewRecord { timestamp_ms: 1_000 + tag as i64, key: None, value: Some(value.as_bytes()), headers: &[] })
            .unwrap();
    }
    b.build()
}

/// The values of the records of a batch.
pub fn values(batch: &keel_record::Batch) -> Vec<(u64, String)> {
    batch
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap())
        })
        .collect()
}

/// Starts nodes 1..=n on loopback, each on a fresh `FileDisk` under `dir/node-<id>`.
pub async fn start_nodes(dir: &std::path::Path, cfg: &ClusterConfig, n: u64) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        let disk: Arc<dyn Disk> = Arc::new(keel_storage::FileDisk::new());
        nodes.push(TestNode::start(id, "127.0.0.1:0", disk, dir.join(format!("node-{id}")), cfg).await);
    }
    nodes
}

/// Starts nodes 1..=n (as [`start_nodes`]) with `group` open on each and initialised with all
/// of them as voters; returns them and the index of the group's leader.
pub async fn start_group(dir: &std::path::Path, cfg: &ClusterConfig, n: u64, group: GroupId) -> (Vec<TestNode>, usize) {
    let nodes = start_nodes(dir, cfg, n).await;
    for node in &nodes {
        node.node.open_group(group).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(group, members(&refs)).await.unwrap();
    let leader = wait_leader(&refs, group).await;
    (nodes, leader)
}

pub fn members(nodes: &[&TestNode]) -> BTreeMap<NodeId, Node> {
    nodes.iter().map(|n| (n.id, Node::new(n.addr.clone()))).collect()
}

/// Waits until some node of `nodes` leads `group` and every live node agrees; returns its index.
pub async fn wait_leader(nodes: &[&TestNode], group: GroupId) -> usize {
    for _ in 0..400 {
        let leaders: Vec<Option<NodeId>> = nodes.iter().map(|n| n.node.leader(group)).collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && let Some(i) = nodes.iter().position(|n| n.id == *l)
        {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no agreed leader for group {group}");
}

/// Appends, following NotLeader answers, retrying retriable errors; returns where it landed.
pub async fn append(nodes: &[&TestNode], group: GroupId, batch: Bytes) -> Result<Appended, AppendError> {
    let mut target = 0;
    let mut last = None;
    for _ in 0..50 {
        match nodes[target].node.append(group, batch.clone()).await {
            Ok(a) => return Ok(a),
            Err(AppendError::NotLeader { leader: Some((id, _)) }) => match nodes.iter().position(|n| n.id == id) {
                Some(i) => target = i,
                None => {
                    // A leader that is not among `nodes` (stopped): wait for the next election.
                    target = (target + 1) % nodes.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Err(e) if e.is_retriable() => {
                last = Some(e);
                target = (target + 1) % nodes.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(AppendError::Timeout))
}

/// Waits until the node's high watermark for `group` reaches `offset`.
pub async fn wait_high_watermark(node: &TestNode, group: GroupId, offset: u64) {
    let mut hw = node.node.store(group).unwrap().high_watermark();
    let reached = tokio::time::timeout(Duration::from_secs(20), hw.wait_for(|v| *v >= offset)).await.is_ok();
    assert!(reached, "node {} group {group}: high watermark {} never reached {offset}", node.id, *hw.borrow());
}

/// Every committed record of a group on a node, as (offset, value).
pub fn read_all(node: &TestNode, group: GroupId) -> Vec<(u64, String)> {
    let store = node.node.store(group).unwrap();
    let (start, _, _) = store.positions();
    let hw = *store.high_watermark().borrow();
    let mut out = Vec::new();
    let mut next = start.offset;
    while next < hw {
        let batches = store.read_committed(next, 1 << 20).unwrap();
        assert!(!batches.is_empty(), "node {}: nothing at {next} below the high watermark {hw}", node.id);
        for b in &batches {
            out.extend(values(b));
            next = b.header().next_offset();
        }
    }
    out
}
