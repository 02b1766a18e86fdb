//! Measures replicated appends: three nodes in this process over loopback gRPC, one raft group,
//! 1 KiB record values, 64 appends in flight at the leader; each counts once a quorum has it
//! durably (msync on `FileDisk`) and it is committed.
// Benchmarks may panic on setup failures: there is nobody to return an error to.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use keel_raft::{GroupId, IoMode, Node, NodeConfig, RaftNode, RaftTimings, TcpConnector};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{FileDisk, LogConfig};
use tokio::runtime::Runtime;

/// Size of every record value.
const VALUE_BYTES: usize = 1024;
/// Appends in flight at the leader during one iteration.
const IN_FLIGHT: usize = 64;
/// The one raft group every benchmark appends to.
const GROUP: GroupId = 1;
/// Limit on waiting for the group's first leader (production timings: elected in 1.5–3 s).
const LEADER_WAIT_MS_MAX: u64 = 20_000;

/// A batch of `records` records, each with a 1 KiB value (and no key).
fn batch(records: usize) -> Bytes {
    let value: Vec<u8> = (0..VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    let mut builder = BatchBuilder::new(keel_record::BATCH_BYTES_MAX);
    for i in 0..records {
        let record =
            NewRecord { timestamp_ms: 1_700_000_000_000 + i as i64, key: None, value: Some(&value), headers: &[] };
        builder.push(record).expect("record fits in the batch");
    }
    builder.build()
}

/// Three nodes serving gRPC on loopback, all hosting `GROUP`; the temp dir outlives them.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Arc<RaftNode>>,
    leader: Arc<RaftNode>,
}

/// Starts one node on a fresh loopback port, its server spawned on the current runtime; returns
/// it with the address peers reach it at.
async fn start_node(id: u64, dir: &std::path::Path) -> (Arc<RaftNode>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let config = NodeConfig {
        node_id: id,
        advertised_addr: addr.clone(),
        data_dir: dir.join(format!("node-{id}")),
        timings: RaftTimings::default(),
        log: LogConfig::default(),
        io: IoMode::Blocking,
        network: Default::default(),
        append_timeout: Duration::from_secs(30),
        seed: id * 7919,
        flush: keel_raft::FlushScope::Node,
    };
    let node = Arc::new(RaftNode::new(config, Arc::new(FileDisk::new()), Arc::new(TcpConnector::default())));
    let service = node.service().into_server();
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await.expect("serve");
    });
    (node, addr)
}

/// Three nodes, one group initialized on node 1, and the leader every node agrees on.
async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nodes = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        let (node, addr) = start_node(id, dir.path()).await;
        node.open_group(GROUP).await.expect("open group");
        members.insert(id, Node::new(addr));
        nodes.push(node);
    }
    nodes[0].initialize_group(GROUP, members).await.expect("initialize group");
    let mut waited_ms = 0;
    let leader = loop {
        let leaders: Vec<_> = nodes.iter().map(|n| n.leader(GROUP)).collect();
        if let Some(Some(id)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*id))
        {
            break Arc::clone(nodes.iter().find(|n| n.id() == *id).expect("the leader is a member"));
        }
        assert!(waited_ms < LEADER_WAIT_MS_MAX, "no agreed leader after {waited_ms} ms: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited_ms += 50;
    };
    Cluster { _dir: dir, nodes, leader }
}

/// One iteration = `IN_FLIGHT` concurrent appends of one batch to the leader, all acknowledged
/// (replicated to a quorum, durable there, committed). Throughput counts records.
fn append_replicated(c: &mut Criterion, rt: &Runtime, cluster: &Cluster) {
    let mut group = c.benchmark_group("append_replicated");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(6));
    for records in [1usize, 16, 256] {
        let template = batch(records);
        group.throughput(Throughput::Elements((IN_FLIGHT * records) as u64));
        group.bench_function(BenchmarkId::from_parameter(records), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let appends = (0..IN_FLIGHT).map(|_| cluster.leader.append(GROUP, template.clone()));
                    for result in futures_util::future::join_all(appends).await {
                        black_box(result.expect("append"));
                    }
                })
            })
        });
        println!("append_replicated/{records}: {} bytes per batch", template.len());
    }
    group.finish();
}

// What criterion_group!/criterion_main! expand to, written out: the macros' generated `pub fn`
// has no doc comment, which trips the workspace's missing_docs lint.
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let cluster = rt.block_on(cluster());
    let mut c = Criterion::default().configure_from_args();
    append_replicated(&mut c, &rt, &cluster);
    c.final_summary();
    rt.block_on(async {
        for node in &cluster.nodes {
            node.shutdown().await;
        }
    });
}
