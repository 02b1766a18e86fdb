//! The public gRPC API against three in-process nodes on 127.0.0.1: topics, produce (unary,
//! forwarded, streamed), fetch (records, batches, long poll), and every bad input refused with
//! the right status and no change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{channel, start, start_with_voters};
use keel_proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn record(value: &str) -> pb::Record {
    pb::Record { key: None, value: Some(value.as_bytes().to_vec().into()), headers: vec![], timestamp_ms: 0 }
}

fn produce(topic: &str, partition: u32, values: &[&str]) -> pb::ProduceRequest {
    pb::ProduceRequest {
        request_id: 0,
        topic: topic.into(),
        partition,
        records: values.iter().map(|v| record(v)).collect(),
        batch: Default::default(),
        producer_id: None,
        producer_epoch: None,
        base_sequence: None,
        ..Default::default()
    }
}

/// Produces, retrying while the partition's leader is not known yet where the request lands
/// (a node learns of a new leader a heartbeat after node 1 may have reported it).
async fn produce_settled(
    producer: &mut pb::producer_client::ProducerClient<Channel>,
    request: pb::ProduceRequest,
) -> pb::ProduceResponse {
    for _ in 0..100 {
        match producer.produce(request.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("{s:?}"),
        }
    }
    panic!("no leader for {}/{} after 5 s", request.topic, request.partition);
}

/// Waits until every partition of `topic` has a leader (as node 1 sees it).
async fn wait_leaders(admin: &mut pb::admin_client::AdminClient<Channel>, topic: &str) -> pb::TopicDescription {
    for _ in 0..200 {
        let t = admin.describe_topic(pb::DescribeTopicRequest { name: topic.into() }).await.unwrap().into_inner();
        let t = t.topic.unwrap();
        if t.partitions.iter().all(|p| p.leader_id.is_some()) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("partitions of {topic} got no leaders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_produce_and_fetch() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[1]).await);
    let created = admin
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 3,
            replication_factor: 3,
            config: None,
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    assert_eq!(created.partitions.len(), 3);
    let leaders: Vec<u64> = created.partitions.iter().map(|p| p.replicas[0]).collect();
    assert_eq!(leaders.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "preferred leaders spread");
    wait_leaders(&mut admin, "orders").await;

    // Unary produce to every node: followers forward to the leader.
    for (i, addr) in cluster.addrs.iter().enumerate() {
        let mut producer = pb::producer_client::ProducerClient::new(channel(addr).await);
        let values: Vec<String> = (0..5).map(|j| format!("n{i}-{j}")).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let r = producer.produce(produce("orders", 0, &refs)).await.unwrap().into_inner();
        assert_eq!(r.base_offset, i as u64 * 5);
        assert_eq!(r.record_count, 5);
    }

    // Fetch the records back from each node.
    for addr in &cluster.addrs {
        let mut consumer = pb::consumer_client::ConsumerClient::new(channel(addr).await);
        let mut got = Vec::new();
        let mut offset = 3;
        while got.len() < 12 {
            let r = consumer
                .fetch(pb::FetchRequest {
                    topic: "orders".into(),
                    partition: 0,
                    offset,
                    max_bytes: 0,
                    max_wait_ms: 1_000,
                    format: 0,
                })
                .await
                .unwrap()
                .into_inner();
            for rec in &r.records {
                got.push((rec.offset, String::from_utf8(rec.value.clone().unwrap().to_vec()).unwrap()));
            }
            offset = r.next_offset;
        }
        assert_eq!(got[0], (3, "n0-3".to_owned()));
        assert_eq!(got[11], (14, "n2-4".to_owned()));
        assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        assert!(got.iter().all(|(_, v)| !v.is_empty()));
        let first = &consumer
            .fetch(pb::FetchRequest {
                topic: "orders".into(),
                partition: 0,
                offset: 0,
                max_bytes: 0,
                max_wait_ms: 0,
                format: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .records[0];
        assert_eq!(first.timestamp_ms, 1_700_000_000_000, "timestamp 0 takes the broker's clock");
    }

    // A pre-encoded batch (what keel-client sends) with timestamps 0 gets the broker's clock too.
    let mut builder = keel_record::BatchBuilder::new(1 << 16);
    builder.push(keel_record::NewRecord { timestamp_ms: 0, key: None, value: Some(b"enc"), headers: &[] }).unwrap();
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    let request = pb::ProduceRequest { batch: builder.build(), ..produce("orders", 2, &[]) };
    let r = producer.produce(request).await.unwrap().into_inner();
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(&cluster.addrs[0]).await);
    let fetched = consumer
        .fetch(pb::FetchRequest {
            topic: "orders".into(),
            partition: 2,
            offset: r.base_offset,
            max_bytes: 0,
            max_wait_ms: 1_000,
            format: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.records[0].timestamp_ms, 1_700_000_000_000);

    // A long poll returns as soon as records commit. It asks to wait far longer than the
    // test's own bound, so only a wake-up by the commit can answer it in time.
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(&cluster.addrs[0]).await);
    let poll = tokio::spawn(async move {
        consumer
            .fetch(pb::FetchRequest {
                topic: "orders".into(),
                partition: 1,
                offset: 0,
                max_bytes: 0,
                max_wait_ms: 30_000,
                format: pb::FetchFormat::Batches as i32,
            })
            .await
    });
    // Give the fetch time to reach the node; had it answered at once (no waiting), it would be
    // finished by now and empty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "an empty partition's fetch waits for records");
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[2]).await);
    producer.produce(produce("orders", 1, &["late"])).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("the commit wakes the waiting fetch")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(r.batches.len(), 1);
    assert_eq!(r.next_offset, 1);
    assert_eq!(r.high_watermark, 1);

    // The cluster view, once the internal topics' partitions (opened when each node turned
    // ready, which may be after `orders` got its leaders) have theirs too.
    let mut view = admin.describe_cluster(pb::DescribeClusterRequest {}).await.unwrap().into_inner();
    for _ in 0..100 {
        if view.leaderless == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        view = admin.describe_cluster(pb::DescribeClusterRequest {}).await.unwrap().into_inner();
    }
    assert_eq!(view.nodes.len(), 3);
    assert!(view.nodes.iter().all(|n| n.reachable && n.controller_voter));
    assert!(!view.cluster_id.is_empty());
    assert_eq!(view.leaderless, 0);
    let p0 = &view.topics.iter().find(|t| t.name == "orders").unwrap().partitions[0];
    assert_eq!(p0.high_watermark, 15);
    for b in &cluster.brokers {
        assert_eq!(b.metadata().topics.values().filter(|t| !t.internal).count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    let create = |name: &str, partitions: u32, rf: u32, config: Option<pb::TopicConfig>| pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        config,
    };
    admin.create_topic(create("t", 1, 3, None)).await.unwrap();
    let bad_config = pb::TopicConfig { retention_ms: -1, retention_bytes: 0, max_batch_bytes: 0 };
    let huge_config = pb::TopicConfig { retention_ms: 0, retention_bytes: 0, max_batch_bytes: u32::MAX };
    let cases = [
        (create("", 1, 3, None), Code::InvalidArgument),
        (create("a/b", 1, 3, None), Code::InvalidArgument),
        (create("__meta", 1, 3, None), Code::InvalidArgument),
        (create("x", 0, 3, None), Code::InvalidArgument),
        (create("x", 1, 5, None), Code::FailedPrecondition),
        // An even factor tolerates no more failures than the odd one below it (keel.proto).
        (create("x", 1, 2, None), Code::InvalidArgument),
        (create("x", 1, 4, None), Code::InvalidArgument),
        (create("x", 1, 3, Some(bad_config)), Code::InvalidArgument),
        (create("x", 1, 3, Some(huge_config)), Code::InvalidArgument),
        (create("t", 2, 3, None), Code::AlreadyExists),
    ];
    for (i, (request, code)) in cases.into_iter().enumerate() {
        let status = admin.create_topic(request).await.unwrap_err();
        assert_eq!(status.code(), code, "case {i}: {status:?}");
        assert!(!status.message().is_empty());
    }
    let topics = admin.list_topics(pb::ListTopicsRequest {}).await.unwrap().into_inner().topics;
    assert_eq!(topics.iter().filter(|t| !t.internal).map(|t| t.name.as_str()).collect::<Vec<_>>(), ["t"]);
    wait_leaders(&mut admin, "t").await;

    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    let oversized =
        pb::Record { key: None, value: Some(vec![7u8; 1_536 << 10].into()), headers: vec![], timestamp_ms: 0 };
    let mut both = produce("t", 0, &["a"]);
    both.batch = vec![1, 2, 3].into();
    let mut garbage = produce("t", 0, &[]);
    garbage.batch = vec![0u8; 100].into();
    let mut negative_time = produce("t", 0, &["a"]);
    negative_time.records[0].timestamp_ms = -5;
    // Issue 12 item 7: 200 KB on the wire that prost would turn into ~10 MB of structs.
    let empty_records = pb::ProduceRequest {
        records: vec![pb::Record::default(); keel_proto::bounded::REQUEST_ELEMENTS_MAX + 1],
        ..produce("t", 0, &[])
    };
    let many_headers = pb::ProduceRequest {
        records: vec![pb::Record {
            headers: vec![pb::Header::default(); keel_proto::bounded::REQUEST_ELEMENTS_MAX],
            ..record("a")
        }],
        ..produce("t", 0, &[])
    };
    let cases = [
        (produce("nope", 0, &["a"]), Code::NotFound),
        (produce("t", 1, &["a"]), Code::NotFound),
        (produce("", 0, &["a"]), Code::InvalidArgument),
        (produce("t", 0, &[]), Code::InvalidArgument),
        (produce("__meta", 0, &["a"]), Code::InvalidArgument),
        (pb::ProduceRequest { records: vec![oversized], ..produce("t", 0, &[]) }, Code::ResourceExhausted),
        (both, Code::InvalidArgument),
        (garbage, Code::InvalidArgument),
        (negative_time, Code::InvalidArgument),
        (empty_records, Code::ResourceExhausted),
        (many_headers, Code::ResourceExhausted),
        // Issue 11: the producer fields come together or not at all.
        (pb::ProduceRequest { producer_id: Some(5), ..produce("t", 0, &["a"]) }, Code::InvalidArgument),
        (
            pb::ProduceRequest {
                producer_id: Some(5),
                producer_epoch: Some(0),
                base_sequence: Some(-3),
                ..produce("t", 0, &["a"])
            },
            Code::InvalidArgument,
        ),
    ];
    for (i, (request, code)) in cases.into_iter().enumerate() {
        let status = producer.produce(request).await.unwrap_err();
        assert_eq!(status.code(), code, "case {i}: {status:?}");
    }
    let r = producer.produce(produce("t", 0, &["ok"])).await.unwrap().into_inner();
    assert_eq!(r.base_offset, 0, "refused produces wrote nothing");

    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(&cluster.addrs[0]).await);
    let fetch =
        |offset| pb::FetchRequest { topic: "t".into(), partition: 0, offset, max_bytes: 0, max_wait_ms: 0, format: 0 };
    let leader = wait_leaders(&mut admin, "t").await.partitions[0].leader_addr.clone();
    let mut on_leader = pb::consumer_client::ConsumerClient::new(channel(&leader).await);
    assert_eq!(on_leader.fetch(fetch(5)).await.unwrap_err().code(), Code::OutOfRange);
    // A request that left the producer fields out is not "producer 0" (proto3's default).
    let stored = on_leader.fetch(pb::FetchRequest { format: 1, ..fetch(0) }).await.unwrap().into_inner();
    let header = *keel_record::Batch::from_bytes(stored.batches[0].clone()).unwrap().header();
    assert_eq!(header.producer_id, -1, "not idempotent");
    assert_eq!(
        consumer.fetch(pb::FetchRequest { format: 9, ..fetch(0) }).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(consumer.fetch(pb::FetchRequest { partition: 3, ..fetch(0) }).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pipeline_and_name_the_leader() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    admin
        .create_topic(pb::CreateTopicRequest { name: "s".into(), partitions: 1, replication_factor: 3, config: None })
        .await
        .unwrap();
    let t = wait_leaders(&mut admin, "s").await;
    let leader = t.partitions[0].leader_id.unwrap();
    let follower = cluster.addrs[(leader as usize) % 3].clone();

    // A follower answers each streamed request with NOT_LEADER and the leader's address.
    let mut producer = pb::producer_client::ProducerClient::new(channel(&follower).await);
    let requests = (0..3).map(|i| pb::ProduceRequest { request_id: i, ..produce("s", 0, &["x"]) }).collect::<Vec<_>>();
    let mut responses = producer.produce_stream(futures_util::stream::iter(requests)).await.unwrap().into_inner();
    for _ in 0..3 {
        let r = responses.message().await.unwrap().unwrap();
        let e = r.error.unwrap();
        assert_eq!(e.code, Code::Unavailable as i32);
        assert_eq!(e.leader_id, Some(leader));
        assert_eq!(e.leader_addr, t.partitions[0].leader_addr);
    }

    // The unary call's status carries the same hint as a google.rpc.ErrorInfo... unless it is
    // forwarded; a forwarded call succeeds.
    let r = producer.produce(produce("s", 0, &["fwd"])).await.unwrap().into_inner();
    assert_eq!(r.base_offset, 0);

    // The leader pipelines 200 requests on one stream.
    let mut producer = pb::producer_client::ProducerClient::new(channel(&t.partitions[0].leader_addr).await);
    let requests =
        (0..200).map(|i| pb::ProduceRequest { request_id: i, ..produce("s", 0, &["a", "b"]) }).collect::<Vec<_>>();
    let mut responses = producer.produce_stream(futures_util::stream::iter(requests)).await.unwrap().into_inner();
    let mut offsets = BTreeMap::new();
    while let Some(r) = responses.message().await.unwrap() {
        assert!(r.error.is_none(), "{:?}", r.error);
        offsets.insert(r.request_id, r.base_offset);
        if offsets.len() == 200 {
            break;
        }
    }
    let bases: Vec<u64> = offsets.values().copied().collect();
    assert_eq!(bases, (0..200).map(|i| 1 + 2 * i).collect::<Vec<_>>(), "one partition's batches keep their order");

    // Delete: gone from the metadata and from every replica's disk.
    let group = cluster.brokers[0].metadata().topics["s"].partitions[0].group;
    admin.delete_topic(pb::DeleteTopicRequest { name: "s".into() }).await.unwrap();
    let status = admin.describe_topic(pb::DescribeTopicRequest { name: "s".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        admin.delete_topic(pb::DeleteTopicRequest { name: "s".into() }).await.unwrap_err().code(),
        Code::NotFound
    );
    for b in &cluster.brokers {
        for _ in 0..100 {
            if !b.raft_node().group_ids().contains(&group) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!b.raft_node().group_ids().contains(&group));
    }

    // Add partitions.
    admin
        .create_topic(pb::CreateTopicRequest { name: "g".into(), partitions: 1, replication_factor: 1, config: None })
        .await
        .unwrap();
    let add = |name: &str, count, target_total| pb::AddPartitionsRequest { name: name.into(), count, target_total };
    let t = admin.add_partitions(add("g", 2, 0)).await.unwrap().into_inner();
    assert_eq!(t.topic.unwrap().partitions.len(), 3);
    let status = admin.add_partitions(add("nope", 2, 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let _ = status.get_details_error_info();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_beyond_the_voters_join_and_serve() {
    let cluster = start_with_voters(4, 3).await;
    // Node 4 follows __meta from the voters and registered itself.
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[3]).await);
    let view = admin.describe_cluster(pb::DescribeClusterRequest {}).await.unwrap().into_inner();
    assert_eq!(view.nodes.len(), 4);
    let node4 = view.nodes.iter().find(|n| n.node_id == 4).unwrap();
    assert!(!node4.controller_voter && node4.reachable);

    // Admin writes through a non-voter are forwarded to the controller; 4 partitions × 3
    // replicas over 4 nodes put 3 replicas and 1 preferred leadership on each.
    let t = admin
        .create_topic(pb::CreateTopicRequest { name: "w".into(), partitions: 4, replication_factor: 3, config: None })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let mut leaders = BTreeMap::<u64, usize>::new();
    let mut replicas = BTreeMap::<u64, usize>::new();
    for p in &t.partitions {
        *leaders.entry(p.replicas[0]).or_default() += 1;
        for r in &p.replicas {
            *replicas.entry(*r).or_default() += 1;
        }
    }
    assert_eq!(leaders.values().copied().collect::<Vec<_>>(), [1; 4]);
    assert_eq!(replicas.values().copied().collect::<Vec<_>>(), [3; 4]);
    let t = wait_leaders(&mut admin, "w").await;

    // Every partition takes writes through node 4 and reads back through it.
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[3]).await);
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(&cluster.addrs[3]).await);
    for p in &t.partitions {
        // A replica may not have heard from its new leader yet: UNAVAILABLE means retry.
        let mut r = producer.produce(produce("w", p.partition, &["x", "y"])).await;
        for _ in 0..100 {
            match &r {
                Err(s) if s.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r = producer.produce(produce("w", p.partition, &["x", "y"])).await;
                }
                _ => break,
            }
        }
        let r = r.unwrap().into_inner();
        assert_eq!(r.base_offset, 0);
        let fetched = consumer
            .fetch(pb::FetchRequest {
                topic: "w".into(),
                partition: p.partition,
                offset: 0,
                max_bytes: 0,
                max_wait_ms: 2_000,
                format: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(fetched.records.len(), 2, "partition {}", p.partition);
    }
    assert_eq!(cluster.brokers[3].metadata().topics.values().filter(|t| !t.internal).count(), 1);
}

/// Issue 12 (items 11 and 13): a message over a size limit is RESOURCE_EXHAUSTED wherever the
/// limit is met, tonic's own decode limit included (OUT_OF_RANGE is reserved for offsets outside
/// the log), and a fetch forwarded by a node without a replica may be as large as the replica may
/// send, not tonic's default 4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_errors_are_resource_exhausted() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    admin
        .create_topic(pb::CreateTopicRequest { name: "big".into(), partitions: 1, replication_factor: 1, config: None })
        .await
        .unwrap();
    let t = wait_leaders(&mut admin, "big").await;
    let home = t.partitions[0].replicas[0] as usize;
    let (replica, elsewhere) = (cluster.addrs[home - 1].clone(), cluster.addrs[home % 3].clone());
    let value =
        |bytes: usize| pb::Record { key: None, value: Some(vec![7u8; bytes].into()), headers: vec![], timestamp_ms: 0 };

    // Over the transport's limit (batch limit + 1 MiB here), on the replica and on a node that
    // would forward: refused before anything is decoded, as RESOURCE_EXHAUSTED.
    for bytes in [3 << 20, 64 << 20] {
        for addr in [&replica, &elsewhere] {
            let mut producer = pb::producer_client::ProducerClient::new(channel(addr).await);
            let request = pb::ProduceRequest { records: vec![value(bytes)], ..produce("big", 0, &[]) };
            let status = producer.produce(request).await.unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted, "{bytes} bytes at {addr}: {status:?}");
        }
    }
    let mut producer = pb::producer_client::ProducerClient::new(channel(&replica).await);
    let requests = vec![pb::ProduceRequest { request_id: 1, records: vec![value(3 << 20)], ..produce("big", 0, &[]) }];
    let status = match producer.produce_stream(futures_util::stream::iter(requests)).await {
        Ok(responses) => responses.into_inner().message().await.expect_err("an oversized stream message is refused"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // 6 MiB in batches under the 1 MiB segment, then one fetch of up to 8 MiB through the node
    // without a replica: it forwards, and the answer (over 4 MiB) comes back whole.
    for i in 0..7 {
        let r = producer
            .produce(pb::ProduceRequest { records: vec![value(900 << 10)], ..produce("big", 0, &[]) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.base_offset, i, "the refused requests wrote nothing");
    }
    let mut consumer =
        pb::consumer_client::ConsumerClient::new(channel(&elsewhere).await).max_decoding_message_size(64 << 20);
    let fetched = consumer
        .fetch(pb::FetchRequest {
            topic: "big".into(),
            partition: 0,
            offset: 0,
            max_bytes: 8 << 20,
            max_wait_ms: 1_000,
            format: pb::FetchFormat::Batches as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.next_offset, 7);
    assert!(fetched.batches.iter().map(|b| b.len()).sum::<usize>() > 4 << 20);
}

/// Issue 12 (item 13): every replica gives the same verdict on an offset beyond the log. A
/// follower used to wait out max_wait_ms and answer OK with nothing at offset 2^63, where the
/// leader answers OUT_OF_RANGE; the verdict is now the leader's, wherever the fetch arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_says_out_of_range_alike() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    admin
        .create_topic(pb::CreateTopicRequest { name: "r".into(), partitions: 1, replication_factor: 3, config: None })
        .await
        .unwrap();
    wait_leaders(&mut admin, "r").await;
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    produce_settled(&mut producer, produce("r", 0, &["a", "b", "c"])).await;
    let fetch = |offset, max_wait_ms| pb::FetchRequest {
        topic: "r".into(),
        partition: 0,
        offset,
        max_bytes: 0,
        max_wait_ms,
        format: 0,
    };
    for addr in &cluster.addrs {
        let mut consumer = pb::consumer_client::ConsumerClient::new(channel(addr).await);
        // Every replica has the records (a fetch from offset 0 waits until this one applied them).
        let r = consumer.fetch(fetch(0, 5_000)).await.unwrap().into_inner();
        assert_eq!(r.records.len(), 3, "{addr}");
        for offset in [1 << 63, u64::MAX, 4] {
            let status = consumer.fetch(fetch(offset, 2_000)).await.unwrap_err();
            assert_eq!(status.code(), Code::OutOfRange, "offset {offset} at {addr}: {status:?}");
        }
        // The end of the log itself is in range: a long poll there answers OK (empty here).
        let r = consumer.fetch(fetch(3, 0)).await.unwrap().into_inner();
        assert_eq!((r.records.len(), r.next_offset, r.high_watermark), (0, 3, 3), "{addr}");
    }
}

/// Issue 12 (item 10): retried admin writes are idempotent. AddPartitions says the total the
/// topic should have, so a retry after a lost answer changes nothing; an identical CreateTopic
/// retried succeeds; a different one is ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_admin_writes_change_nothing() {
    let cluster = start(3).await;
    // Through a node that forwards (not necessarily the controller) and through the others.
    let mut admins = Vec::new();
    for addr in &cluster.addrs {
        admins.push(pb::admin_client::AdminClient::new(channel(addr).await));
    }
    let create = pb::CreateTopicRequest { name: "i".into(), partitions: 1, replication_factor: 3, config: None };
    for admin in &mut admins {
        let t = admin.create_topic(create.clone()).await.unwrap().into_inner().topic.unwrap();
        assert_eq!((t.partitions.len(), t.replication_factor), (1, 3), "an identical create is a no-op");
    }
    let different = pb::CreateTopicRequest { partitions: 2, ..create.clone() };
    assert_eq!(admins[0].create_topic(different).await.unwrap_err().code(), Code::AlreadyExists);

    let grow = |target_total| pb::AddPartitionsRequest { name: "i".into(), count: 0, target_total };
    for admin in &mut admins {
        let t = admin.add_partitions(grow(3)).await.unwrap().into_inner().topic.unwrap();
        assert_eq!(t.partitions.len(), 3, "a retried increase adds nothing");
    }
    // `count` is ignored when the target is set (an old client's field).
    let both = pb::AddPartitionsRequest { count: 5, ..grow(3) };
    assert_eq!(admins[1].add_partitions(both).await.unwrap().into_inner().topic.unwrap().partitions.len(), 3);
    assert_eq!(admins[2].add_partitions(grow(2)).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(admins[2].add_partitions(grow(10_001)).await.unwrap_err().code(), Code::InvalidArgument);
    for b in &cluster.brokers {
        let mut meta = b.metadata();
        for _ in 0..100 {
            if meta.topics.get("i").is_some_and(|t| t.partitions.len() == 3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            meta = b.metadata();
        }
        assert_eq!(meta.topics["i"].partitions.len(), 3);
        // __consumer_offsets' partitions have groups too (created whenever the controller got to it).
        let partitions: usize = meta.topics.values().map(|t| t.partitions.len()).sum();
        assert_eq!(meta.next_group as usize, 1 + partitions, "one group per partition, none allocated twice");
    }
}

/// Issue 12 item 7: what one client can make a node hold is bounded — Subscribe streams per
/// connection, partitions per node and per cluster — each refused with a clean error while the
/// node keeps serving; and a stopping node ends its Subscribe streams instead of waiting on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_bounds_are_refused_cleanly_and_streams_end_on_stop() {
    let cluster = common::start_configured(3, 3, |c| {
        c.limits.subscribes_per_connection_max = 3;
        c.limits.streams_per_connection_max = 4;
        c.limits.partitions_per_node_max = 30;
        c.limits.partitions_max = 50;
    })
    .await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    let create = |name: &str, partitions: u32, replication_factor: u32| pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor,
        config: None,
    };
    admin.create_topic(create("t", 1, 3)).await.unwrap();
    let leader = wait_leaders(&mut admin, "t").await.partitions[0].leader_addr.clone();
    let mut producer = pb::producer_client::ProducerClient::new(channel(&leader).await);
    produce_settled(&mut producer, produce("t", 0, &["a"])).await;

    // Subscribe streams: three on one connection, the fourth refused; another connection is
    // not affected, and closing a stream gives its slot back.
    let subscribe = pb::SubscribeRequest { topic: "t".into(), partition: 0, offset: 0, max_bytes: 0, format: 0 };
    let one = channel(&leader).await;
    let mut on_one = pb::consumer_client::ConsumerClient::new(one.clone());
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = on_one.subscribe(subscribe.clone()).await.unwrap().into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().records.len(), 1);
        open.push(stream);
    }
    let refused = on_one.subscribe(subscribe.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("subscribes_per_connection_max"), "{refused:?}");
    let mut other = pb::consumer_client::ConsumerClient::new(channel(&leader).await);
    let mut elsewhere = other.subscribe(subscribe.clone()).await.unwrap().into_inner();
    assert_eq!(elsewhere.message().await.unwrap().unwrap().records.len(), 1);
    // HTTP/2 streams: a fourth open stream fills the connection's four; a fifth request waits
    // (in the client) until one closes, while other connections are served.
    let (requests, inbound) = tokio::sync::mpsc::channel::<pb::ProduceRequest>(1);
    let inbound = futures_util::stream::unfold(inbound, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut on_one_producer = pb::producer_client::ProducerClient::new(one.clone());
    let held = on_one_producer.produce_stream(inbound).await.unwrap();
    let waiting = tokio::spawn(async move { on_one_producer.produce(produce("t", 0, &["queued"])).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a fifth stream was opened on a connection limited to four");
    producer.produce(produce("t", 0, &["elsewhere"])).await.expect("other connections are served");
    drop((held, requests));
    let queued = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a stream closed");
    queued.unwrap().unwrap();
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..100 {
        match on_one.subscribe(subscribe.clone()).await {
            Ok(stream) => {
                reopened = Some(stream.into_inner());
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut reopened = reopened.expect("a closed stream gives its slot back");
    assert_eq!(reopened.message().await.unwrap().unwrap().records.len(), 3, "a, queued, elsewhere");

    // Partitions: 25 more replicas on each node would pass 30 (8 of __consumer_offsets and t's
    // are there already); 60 in all would pass the cluster's 50. Nothing is created.
    for (request, why) in
        [(create("wide", 25, 3), "partitions_per_node_max"), (create("many", 45, 1), "partitions_max")]
    {
        let status = admin.create_topic(request).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains(why), "{status:?}");
    }
    admin.create_topic(create("fits", 12, 1)).await.unwrap();
    let grow = pb::AddPartitionsRequest { name: "fits".into(), count: 0, target_total: 100 };
    assert_eq!(admin.add_partitions(grow).await.unwrap_err().code(), Code::ResourceExhausted);
    let topics = admin.list_topics(pb::ListTopicsRequest {}).await.unwrap().into_inner().topics;
    let names: Vec<_> = topics.iter().filter(|t| !t.internal).map(|t| (t.name.as_str(), t.partitions.len())).collect();
    assert_eq!(names, [("fits", 12), ("t", 1)]);
    producer.produce(produce("t", 0, &["last"])).await.expect("the node keeps serving");

    // A stopping node ends its streams (UNAVAILABLE: subscribe elsewhere) and opens no more.
    let stopping = cluster.brokers.iter().find(|b| cluster.addrs[b.node_id() as usize - 1] == leader).unwrap();
    stopping.begin_shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reopened.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends when the node stops");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(other.subscribe(subscribe).await.unwrap_err().code(), Code::Unavailable);
}

/// Issue 11: a client in any language that sets the producer fields by hand gets Kafka's
/// idempotence — a duplicate request answers with the first one's offsets and writes nothing,
/// a gap is refused with OUT_OF_ORDER_SEQUENCE naming the expected sequence, an older epoch is
/// PRODUCER_FENCED — on the unary call and on ProduceStream alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_idempotent_producer_is_deduplicated() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    let create = pb::CreateTopicRequest { name: "idem".into(), partitions: 1, replication_factor: 3, config: None };
    admin.create_topic(create).await.unwrap();
    let leader = wait_leaders(&mut admin, "idem").await.partitions[0].leader_addr.clone();
    let mut producer = pb::producer_client::ProducerClient::new(channel(&leader).await);
    let stamped = |epoch: i32, sequence: i32, values: &[&str]| pb::ProduceRequest {
        producer_id: Some(9),
        producer_epoch: Some(epoch),
        base_sequence: Some(sequence),
        ..produce("idem", 0, values)
    };
    let first = produce_settled(&mut producer, stamped(0, 0, &["a", "b"])).await;
    assert_eq!((first.base_offset, first.record_count), (0, 2));
    let again = producer.produce(stamped(0, 0, &["a", "b"])).await.unwrap().into_inner();
    assert_eq!((again.base_offset, again.record_count), (0, 2), "a duplicate gets the original offsets");
    let gap = producer.produce(stamped(0, 5, &["x"])).await.unwrap_err();
    assert_eq!(gap.code(), Code::FailedPrecondition, "{gap:?}");
    let info = gap.get_details_error_info().expect("an ErrorInfo names the refusal");
    assert_eq!(info.reason, "OUT_OF_ORDER_SEQUENCE");
    assert_eq!(info.metadata.get("expected_sequence").map(String::as_str), Some("2"));
    let next = producer.produce(stamped(0, 2, &["c"])).await.unwrap().into_inner();
    assert_eq!(next.base_offset, 2);

    // The same on a stream: the duplicate's answer, then a fenced epoch as a per-request error.
    let requests = vec![
        pb::ProduceRequest { request_id: 1, ..stamped(1, 0, &["d"]) },
        pb::ProduceRequest { request_id: 2, ..stamped(1, 0, &["d"]) },
        pb::ProduceRequest { request_id: 3, ..stamped(0, 3, &["e"]) },
    ];
    let mut answers = producer.produce_stream(futures_util::stream::iter(requests)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(r) = answers.message().await.unwrap() {
        got.push(r);
    }
    got.sort_by_key(|r| r.request_id);
    assert_eq!(got.len(), 3);
    assert_eq!((got[0].base_offset, got[1].base_offset), (3, 3), "{got:?}");
    let fenced = got[2].error.as_ref().expect("the old epoch is refused");
    assert_eq!((fenced.code, fenced.reason.as_str()), (Code::FailedPrecondition as i32, "PRODUCER_FENCED"));

    let mut consumer = pb::consumer_client::ConsumerClient::new(channel(&leader).await);
    let fetch =
        pb::FetchRequest { topic: "idem".into(), partition: 0, offset: 0, max_bytes: 0, max_wait_ms: 0, format: 0 };
    let records = consumer.fetch(fetch).await.unwrap().into_inner().records;
    let values: Vec<&[u8]> = records.iter().map(|r| r.value.as_deref().unwrap_or_default()).collect();
    assert_eq!(values, [b"a" as &[u8], b"b", b"c", b"d"], "each written once");
}

/// AuditPartition on every replica: the sequence ranges of each producer, the unstamped records,
/// and the same report whether read in one call or in chunks of a few records merged in order;
/// bad requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_partition_reports_producer_ranges_in_chunks() {
    let cluster = start(3).await;
    let mut admin = pb::admin_client::AdminClient::new(channel(&cluster.addrs[0]).await);
    let create = pb::CreateTopicRequest { name: "audited".into(), partitions: 1, replication_factor: 3, config: None };
    admin.create_topic(create).await.unwrap();
    let leader = wait_leaders(&mut admin, "audited").await.partitions[0].leader_addr.clone();
    let mut producer = pb::producer_client::ProducerClient::new(channel(&leader).await);
    let stamped = |id: i64, sequence: i32, values: &[&str]| pb::ProduceRequest {
        producer_id: Some(id),
        producer_epoch: Some(0),
        base_sequence: Some(sequence),
        ..produce("audited", 0, values)
    };
    produce_settled(&mut producer, stamped(4, 0, &["a", "b", "c"])).await;
    for (request, sequence) in [(stamped(5, 0, &["x"]), 0), (produce("audited", 0, &["plain"]), -1)] {
        producer.produce(request).await.unwrap_or_else(|e| panic!("{sequence}: {e:?}"));
    }
    producer.produce(stamped(4, 3, &["d", "e"])).await.unwrap();
    producer.produce(stamped(5, 1, &["y", "z"])).await.unwrap();
    let end = 9;

    let request = |from: Option<u64>, max_records: u64| pb::AuditPartitionRequest {
        topic: "audited".into(),
        partition: 0,
        from_offset: from,
        max_records,
    };
    for addr in &cluster.addrs {
        let mut admin = pb::admin_client::AdminClient::new(channel(addr).await);
        // A follower's high watermark may trail the leader's for a moment.
        let mut whole = admin.audit_partition(request(None, 0)).await.unwrap().into_inner();
        for _ in 0..100 {
            if whole.high_watermark == end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            whole = admin.audit_partition(request(None, 0)).await.unwrap().into_inner();
        }
        assert_eq!((whole.from_offset, whole.next_offset, whole.high_watermark), (0, end, end), "{addr}");
        assert_eq!(whole.unstamped_records, 1);
        type Found = (i64, Vec<(i64, i64)>, u64);
        let ranges: Vec<Found> = whole
            .producers
            .iter()
            .map(|p| (p.producer_id, p.ranges.iter().map(|r| (r.start, r.end)).collect(), p.duplicates))
            .collect();
        assert_eq!(ranges, [(4, vec![(0, 5)], 0), (5, vec![(0, 3)], 0)], "{addr}");

        // Two records at a time (whole batches: a chunk may end past its limit) from the middle
        // of the first batch.
        let mut next = 1;
        let mut chunks = 0;
        let mut merged = keel_record::audit::PartitionReport::default();
        while next < end {
            let c = admin.audit_partition(request(Some(next), 2)).await.unwrap().into_inner();
            assert_eq!(c.from_offset, next);
            assert!(c.next_offset > next);
            let mut report =
                keel_record::audit::PartitionReport { unstamped: c.unstamped_records, ..Default::default() };
            for p in c.producers {
                let mut audit = keel_record::audit::ProducerAudit {
                    records: p.records,
                    duplicates: p.duplicates,
                    first_offset: p.first_offset,
                    last_offset: p.last_offset,
                    ..Default::default()
                };
                audit.set_ranges(p.ranges.iter().map(|r| (r.start, r.end)).collect());
                report.producers.insert((p.producer_id, p.producer_epoch as i16), audit);
            }
            merged.merge(report);
            next = c.next_offset;
            chunks += 1;
        }
        assert!(chunks >= 3, "{chunks} chunks");
        assert!(merged.is_clean());
        assert_eq!(merged.producers[&(4, 0)].ranges, [(1, 5)], "from offset 1: sequence 0 is before it");
        assert_eq!(merged.producers[&(5, 0)].ranges, [(0, 3)]);
        assert_eq!(merged.unstamped, 1);
    }

    let refused = [
        (request(None, 10_000_001), Code::InvalidArgument),
        (pb::AuditPartitionRequest { topic: "nope".into(), ..request(None, 0) }, Code::NotFound),
        (pb::AuditPartitionRequest { partition: 1, ..request(None, 0) }, Code::NotFound),
    ];
    for (r, code) in refused {
        assert_eq!(admin.audit_partition(r.clone()).await.unwrap_err().code(), code, "{r:?}");
    }
}

/// A peer cancels many raft RPCs before the node got to them (each RPC that times out on a
/// busy node is reset): the connection, which every raft group on the pair shares, must stay
/// up. h2's default answers the 21st such reset with GOAWAY, which failed every group at once
/// and turned creating 10,000 partitions into an election storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connection_survives_rpcs_cancelled_before_they_were_served() {
    let cluster = start(1).await;
    let tcp = tokio::net::TcpStream::connect(&cluster.peer_addrs[0]).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = || {
        http::Request::post(format!("http://{}/keel.v1.NodeStatus/LocalStatus", cluster.peer_addrs[0]))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    // Opened and reset back to back, so most resets arrive before the node accepts the stream.
    for _ in 0..500 {
        let (response, body) = send.send_request(request(), false).unwrap();
        drop((response, body));
        send = send.ready().await.unwrap();
    }
    let (response, mut body) = send.send_request(request(), false).unwrap();
    // An empty LocalStatusRequest: one uncompressed gRPC frame of length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), response).await.expect("no answer in 10 s");
    let answered = answered.expect("the connection was closed after the cancelled RPCs");
    assert_eq!(answered.status(), http::StatusCode::OK);
    connection.abort();
}
