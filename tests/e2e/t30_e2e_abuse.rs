//! End to end, with a real `keel server` process: what one careless or hostile client sends is
//! refused with a clean status while the node keeps serving and its memory stays bounded
//! (issue 12, item 7). Requests are sent as raw bytes, as any language's client could.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use keel_proto::v1 as pb;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives message bodies as they are: the test writes the wire bytes itself.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

async fn produce_raw(channel: &Channel, body: Vec<u8>) -> Result<pb::ProduceResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_encoding_message_size(usize::MAX);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/keel.v1.Producer/Produce");
    let answer = grpc.unary(tonic::Request::new(body), path, Raw).await?;
    Ok(pb::ProduceResponse::decode(&answer.into_inner()[..]).unwrap())
}

/// The node's resident memory, from /proc.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

fn produce(values: &[&[u8]]) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: "t".into(),
        records: values.iter().map(|v| pb::Record { value: Some(v.to_vec().into()), ..Default::default() }).collect(),
        producer_id: None,
        producer_epoch: None,
        base_sequence: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_requests_get_clean_errors_and_the_node_keeps_serving() {
    let cluster = common::Cluster::start(1, 45).await;
    let pid = cluster.nodes[0].child.as_ref().unwrap().id();
    let channel = Channel::from_shared(format!("http://{}", cluster.nodes[0].addr)).unwrap().connect().await.unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let create = |name: &str, partitions| pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: 1,
        config: None,
    };
    admin.create_topic(create("t", 1)).await.unwrap();
    let serves = || async {
        let mut last = None;
        for _ in 0..100 {
            match produce_raw(&channel, produce(&[b"ok"]).encode_to_vec()).await {
                Ok(r) => return r.base_offset,
                Err(s) => last = Some(s),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the node stopped serving: {last:?}");
    };
    serves().await;
    let before = rss_mib(pid);
    println!("RSS before: {before} MiB");

    // Millions of empty records: 4 MB on the wire that prost would make ~200 MB of structs.
    let mut empty_records = Vec::with_capacity(4_000_010);
    empty_records.extend_from_slice(&[0x0a, 0x01, b't']);
    for _ in 0..2_000_000 {
        empty_records.extend_from_slice(&[0x22, 0x00]);
    }
    let status = produce_raw(&channel, empty_records).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    println!("2,000,000 empty records: {:?}; RSS {} MiB", status.code(), rss_mib(pid));

    // A 64 MiB record: over the message limit, refused before it is buffered.
    let big = vec![7u8; 64 << 20];
    let status = produce_raw(&channel, produce(&[&big]).encode_to_vec()).await.unwrap_err();
    drop(big);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    println!("a 64 MiB record: {:?}; RSS {} MiB", status.code(), rss_mib(pid));

    // Garbage, as a message and as a batch inside a valid message.
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let status = produce_raw(&channel, garbage.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let in_batch = pb::ProduceRequest { records: vec![], batch: garbage.into(), ..produce(&[]) };
    let status = produce_raw(&channel, in_batch.encode_to_vec()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    println!("garbage: {:?}; RSS {} MiB", status.code(), rss_mib(pid));

    // 100,000 partitions in one request, and the most one topic may have on one node.
    let status = admin.create_topic(create("huge", 100_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = admin.create_topic(create("wide", 10_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    println!("100,000 and 10,000 partitions: refused; RSS {} MiB", rss_mib(pid));

    // 200 concurrent Subscribe streams on one connection: served (the default allows 1,024),
    // each holding at most what its client has not taken.
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel.clone());
    let subscribe = pb::SubscribeRequest { topic: "t".into(), partition: 0, offset: 0, max_bytes: 0, format: 0 };
    let mut streams = Vec::new();
    for _ in 0..200 {
        streams.push(consumer.subscribe(subscribe.clone()).await.unwrap().into_inner());
    }
    for stream in &mut streams {
        assert!(!stream.message().await.unwrap().unwrap().records.is_empty());
    }
    println!("200 Subscribe streams open; RSS {} MiB", rss_mib(pid));
    drop(streams);

    let offset = serves().await;
    assert!(offset >= 1, "the node kept serving and wrote nothing refused: next offset {offset}");
    let fetched = pb::consumer_client::ConsumerClient::new(channel.clone())
        .fetch(pb::FetchRequest { topic: "t".into(), partition: 0, offset: 0, max_bytes: 0, max_wait_ms: 0, format: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.records.len() as u64, offset + 1, "only the two good records are there");
    let after = rss_mib(pid);
    println!("RSS after: {after} MiB");
    // Generous: the node's allocator keeps freed pages; what must not happen is the hundreds of
    // MiB the unbounded paths took.
    assert!(after < before + 256, "RSS grew from {before} MiB to {after} MiB");
}

/// `keel audit` (issue 11, item 4) over records written with producer stamps: a clean topic
/// exits 0, also after a retried batch (deduplicated by the leader) and a refused gap; the one
/// duplicate that can still reach the log — a batch of a producer the partition forgot — is
/// reported and exits 1. (Gaps cannot be written through a leader any more: the audit's gap
/// report is covered by `keel_record::audit`'s unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_audit_reports_duplicates_and_retries_are_not_written() {
    let cluster = common::Cluster::start(1, 48).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.nodes[0].addr)).unwrap().connect().await.unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    admin
        .create_topic(pb::CreateTopicRequest { name: "t".into(), partitions: 1, replication_factor: 1, config: None })
        .await
        .unwrap();
    let stamped = |base_sequence: i32, count: usize| {
        let values: Vec<&[u8]> = vec![b"v"; count];
        pb::ProduceRequest {
            producer_id: Some(7),
            producer_epoch: Some(0),
            base_sequence: Some(base_sequence),
            ..produce(&values)
        }
        .encode_to_vec()
    };
    let audit = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["audit", "t", "--output", "json", "--bootstrap", &cluster.nodes[0].addr])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        (out.status.success(), report)
    };
    for _ in 0..100 {
        if produce_raw(&channel, stamped(0, 3)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    produce_raw(&channel, stamped(3, 2)).await.unwrap();
    produce_raw(&channel, produce(&[b"unstamped"]).encode_to_vec()).await.unwrap();
    let (ok, report) = audit();
    assert!(ok, "{report}");
    let producer = &report["partitions"][0]["producers"][0];
    assert_eq!((producer["producer_id"].as_i64(), producer["ranges"].clone()), (Some(7), serde_json::json!([[0, 5]])));
    assert_eq!(report["partitions"][0]["unstamped_records"], 1);

    // The same batch again: the leader recognises the retry, answers with the first offsets and
    // writes nothing; a batch after a hole is refused. The audit still finds nothing.
    let first = produce_raw(&channel, stamped(0, 3)).await.unwrap();
    assert_eq!((first.base_offset, first.record_count), (0, 3), "a retry gets the original offsets");
    let gap = produce_raw(&channel, stamped(10, 1)).await.unwrap_err();
    assert_eq!(gap.code(), tonic::Code::FailedPrecondition, "{gap:?}");
    let (ok, report) = audit();
    assert!(ok, "{report}");

    // A duplicate can still reach the log when the partition forgot the producer: another
    // producer's batch a day later (by the batches' own clock) expires producer 7, whose
    // sequence 0 then reads as a new producer's start. The audit reports it and exits 1.
    // The node stamped producer 7's batches with its own clock: a day past that.
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel.clone());
    let fetch =
        pb::FetchRequest { topic: "t".into(), partition: 0, offset: 0, max_bytes: 0, max_wait_ms: 0, format: 0 };
    let now_ms = consumer.fetch(fetch).await.unwrap().into_inner().records[0].timestamp_ms;
    let day_later = |id: i64| {
        let later = now_ms + 25 * 3_600_000;
        pb::ProduceRequest {
            producer_id: Some(id),
            producer_epoch: Some(0),
            base_sequence: Some(0),
            records: vec![pb::Record { value: Some(b"v".to_vec().into()), timestamp_ms: later, ..Default::default() }],
            ..produce(&[])
        }
        .encode_to_vec()
    };
    produce_raw(&channel, day_later(8)).await.unwrap();
    produce_raw(&channel, day_later(7)).await.unwrap();
    let (ok, report) = audit();
    assert!(!ok, "exit status 1 on duplicates: {report}");
    let producer = &report["partitions"][0]["producers"][0];
    assert_eq!(producer["producer_id"].as_i64(), Some(7), "{report}");
    assert_eq!(producer["duplicates"], 1, "{report}");
}

/// The client port serves no peer service: raft, Controller and NodeStatus answer UNIMPLEMENTED
/// there. On the peer port (reachable by anyone while the cluster runs without mTLS), a forged
/// registration of an existing node id, which would point the cluster's traffic for that node at
/// the forger, is refused without its data dir's key, as is an id the controller was not told to
/// admit, and no address changes. The real node, restarted, registers with its key as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_registration_is_refused_and_moves_nothing() {
    let mut cluster = common::Cluster::start(3, 50).await;
    let admin = cluster.admin();
    let before = admin.describe_cluster().await.unwrap();
    let addresses = |d: &pb::DescribeClusterResponse| {
        let mut nodes: Vec<(u64, String)> = d.nodes.iter().map(|n| (n.node_id, n.addr.clone())).collect();
        nodes.sort();
        nodes
    };
    assert_eq!(addresses(&before).len(), 3);
    let forge = |node_id: u64| pb::RegisterNodeRequest {
        node_id,
        addr: "127.0.0.1:1".into(),
        cluster_id: before.cluster_id.clone(),
        node_key: vec![0x5a; 32].into(),
        peer_addr: "127.0.0.1:2".into(),
    };
    for node in &cluster.nodes {
        let channel = Channel::from_shared(format!("http://{}", node.addr)).unwrap().connect().await.unwrap();
        let mut raft = pb::raft_client::RaftClient::new(channel.clone());
        let vote = pb::VoteRequest { group_id: 0, ..Default::default() };
        let refused = raft.vote(vote).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented, "raft on the client port of node {}: {refused:?}", node.id);
        let mut controller = pb::controller_client::ControllerClient::new(channel.clone());
        let refused = controller.register_node(forge(2)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented, "the controller on the client port: {refused:?}");
        let mut status = pb::node_status_client::NodeStatusClient::new(channel);
        let refused = status.local_status(pb::LocalStatusRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented, "NodeStatus on the client port: {refused:?}");

        let channel = Channel::from_shared(format!("http://{}", node.peer_addr)).unwrap().connect().await.unwrap();
        let mut controller = pb::controller_client::ControllerClient::new(channel);
        for (node_id, what) in [(2, "an existing node"), (9, "an unknown node")] {
            let refused = controller.register_node(forge(node_id)).await.unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{what} via node {}: {refused:?}", node.id);
        }
    }
    assert_eq!(addresses(&admin.describe_cluster().await.unwrap()), addresses(&before));
    cluster.kill(2);
    cluster.restart(2);
    cluster.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(addresses(&admin.describe_cluster().await.unwrap()), addresses(&before));
}
