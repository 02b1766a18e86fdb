//! Producer ids over real gRPC against three in-process nodes: `InitProducerId` on every node
//! hands out ids unique across the cluster, from blocks the controller records in `__meta` (few
//! metadata writes for many ids), bounded `AllocateProducerIds`, and ids that stay unique when
//! the controller leader's node stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, channel, start};
use futures_util::StreamExt;
use keel_broker::{Broker, META_GROUP};
use keel_proto::v1 as pb;
use keel_proto::v1::controller_client::ControllerClient;
use keel_proto::v1::producer_client::ProducerClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The block a node allocates at a time.
const BLOCK: i64 = keel_broker::producer_ids::PRODUCER_ID_BLOCK as i64;

/// One InitProducerId, retried while the answer is UNAVAILABLE (which says: retry), up to ~20 s.
async fn init_producer_id(client: &mut ProducerClient<Channel>) -> i64 {
    let mut last = None;
    for _ in 0..200 {
        match client.init_producer_id(pb::InitProducerIdRequest::default()).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.producer_epoch, 0, "a new id starts at epoch 0");
                return r.producer_id;
            }
            Err(status) if status.code() == Code::Unavailable => last = Some(status),
            Err(status) => panic!("InitProducerId failed: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("InitProducerId stayed unavailable: {last:?}");
}

/// The node that leads `__meta` now, once one does.
async fn controller(cluster: &Cluster, among: &[usize]) -> usize {
    for _ in 0..200 {
        for &i in among {
            let b: &Broker = &cluster.brokers[i];
            if b.raft_node().leader(META_GROUP) == Some(b.node_id()) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no controller leader among {among:?}");
}

/// `calls` InitProducerIds spread round-robin over the nodes `on`, `concurrency` at a time:
/// (node index, id) pairs.
async fn many_ids(cluster: &Cluster, on: &[usize], calls: usize, concurrency: usize) -> Vec<(usize, i64)> {
    let mut clients = Vec::new();
    for &i in on {
        clients.push((i, ProducerClient::new(channel(&cluster.addrs[i]).await)));
    }
    futures_util::stream::iter(0..calls)
        .map(|n| {
            let (node, mut client) = clients[n % clients.len()].clone();
            async move { (node, init_producer_id(&mut client).await) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn distinct(ids: &[(usize, i64)]) -> BTreeSet<i64> {
    let set: BTreeSet<i64> = ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(set.len(), ids.len(), "an id was handed out twice");
    assert!(set.iter().all(|id| *id >= 0), "ids are never negative");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_are_unique_across_the_cluster() {
    let cluster = start(3).await;
    let calls = 3_000;
    let ids = distinct(&many_ids(&cluster, &[0, 1, 2], calls, 30).await);
    assert_eq!(ids.len(), calls);

    let leader = &cluster.brokers[controller(&cluster, &[0, 1, 2]).await];
    let next = leader.metadata().next_producer_id;
    assert!(ids.iter().all(|id| *id < next), "every id was allocated: next is {next}, max {:?}", ids.last());
    // Blocks, not ids, are metadata writes: every block but the last of each node was used up,
    // so at most ceil(3000 / 1000) + 3 blocks (6 records in __meta for 3,000 ids).
    assert_eq!(next % BLOCK, 0, "whole blocks only");
    let blocks_max = calls.div_ceil(BLOCK as usize) as i64 + 3;
    assert!(next / BLOCK <= blocks_max, "{} blocks for {calls} ids", next / BLOCK);

    // AllocateProducerIds is bounded, on the controller and on a node that forwards it, and a
    // refused request allocates nothing.
    let follower = cluster.brokers.iter().position(|b| b.node_id() != leader.node_id()).unwrap();
    for addr in [&cluster.peer_addrs[(leader.node_id() - 1) as usize], &cluster.peer_addrs[follower]] {
        let mut c = ControllerClient::new(channel(addr).await);
        for count in [0, 100_001] {
            let refused = c.allocate_producer_ids(pb::AllocateProducerIdsRequest { count }).await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{count}: {refused:?}");
        }
    }
    assert_eq!(leader.metadata().next_producer_id, next);
    // A block allocated through a follower starts where the last one ended.
    let mut c = ControllerClient::new(channel(&cluster.peer_addrs[follower]).await);
    let block = c.allocate_producer_ids(pb::AllocateProducerIdsRequest { count: 7 }).await.unwrap().into_inner();
    assert_eq!((block.first, block.count), (next, 7));
    assert_eq!(leader.metadata().next_producer_id, next + 7);
}

/// The controller leader's node stops with a block of its own partly used; the survivors, each
/// also holding part of a block, hand out ids through a newly elected controller. No id given
/// before the stop (including the stopped node's) is given again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_stay_unique_when_the_controller_stops() {
    let cluster = start(3).await;
    let given = many_ids(&cluster, &[0, 1, 2], 300, 10).await;
    let before = distinct(&given);
    let stopped = controller(&cluster, &[0, 1, 2]).await;
    // The blocks the stopped node gave ids from: the rest of them must never be given out.
    let stopped_blocks: BTreeSet<i64> = given.iter().filter(|(n, _)| *n == stopped).map(|(_, id)| id / BLOCK).collect();
    assert!(!stopped_blocks.is_empty());
    let allocated_before = cluster.brokers[stopped].metadata().next_producer_id;
    assert!(before.iter().all(|id| *id < allocated_before));
    cluster.brokers[stopped].halt().await;

    let survivors: Vec<usize> = (0..3).filter(|i| *i != stopped).collect();
    // More than the survivors' blocks still hold (at most 2 * 1000 - 200): the new controller
    // must allocate.
    let after = distinct(&many_ids(&cluster, &survivors, 2 * BLOCK as usize, 10).await);
    assert!(after.is_disjoint(&before), "an id handed out before the stop was handed out again");
    assert!(after.iter().all(|id| !stopped_blocks.contains(&(id / BLOCK))), "the stopped node's block was reused");
    let fresh: Vec<i64> = after.iter().copied().filter(|id| *id >= allocated_before).collect();
    assert!(!fresh.is_empty(), "blocks were allocated after the stop");
    let new_leader = &cluster.brokers[controller(&cluster, &survivors).await];
    let next = new_leader.metadata().next_producer_id;
    assert!(next > allocated_before);
    assert!(after.iter().all(|id| *id < next));
}

/// InitProducerId with a stable identity, retried while UNAVAILABLE or ABORTED (a race).
async fn init_identity(
    client: &mut ProducerClient<Channel>,
    identity: &str,
    claimed: Option<(i64, i32)>,
) -> Result<(i64, i32), tonic::Status> {
    init_identity_once(client, identity, claimed, 0).await
}

/// The same, with a request token (a retry of the same request passes the same).
async fn init_identity_once(
    client: &mut ProducerClient<Channel>,
    identity: &str,
    claimed: Option<(i64, i32)>,
    request_token: u64,
) -> Result<(i64, i32), tonic::Status> {
    let request = pb::InitProducerIdRequest {
        producer_identity: Some(identity.to_owned()),
        producer_id: claimed.map(|c| c.0),
        producer_epoch: claimed.map(|c| c.1),
        request_token,
    };
    let mut last = None;
    for _ in 0..200 {
        match client.init_producer_id(request.clone()).await {
            Ok(r) => return Ok((r.get_ref().producer_id, r.get_ref().producer_epoch)),
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Aborted) => last = Some(status),
            Err(status) => return Err(status),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("InitProducerId stayed unavailable: {last:?}");
}

/// A stable identity keeps its id and gets the next epoch at every InitProducerId, on any node
/// and after the controller's node stops; an instance that claims an epoch its identity no
/// longer holds is fenced; bad requests are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_identity_gets_the_next_epoch_and_fences_older_instances() {
    let cluster = start(3).await;
    let mut clients = Vec::new();
    for addr in &cluster.addrs {
        clients.push(ProducerClient::new(channel(addr).await));
    }
    let (id, epoch) = init_identity(&mut clients[0], "orders-writer", None).await.unwrap();
    assert_eq!(epoch, 0, "a new identity starts at epoch 0");
    for (n, client) in clients.iter_mut().enumerate() {
        let again = init_identity(client, "orders-writer", None).await.unwrap();
        assert_eq!(again, (id, n as i32 + 1), "the same id, the next epoch, through node {n}");
    }
    let other = init_identity(&mut clients[1], "billing-writer", None).await.unwrap();
    assert_ne!(other.0, id);
    let anonymous = init_producer_id(&mut clients[2]).await;
    assert!(anonymous != id && anonymous != other.0, "identities and blocks share one id counter");

    // An instance bumping its own epoch: with the current one it gets the next; with an older
    // one it learns it was replaced.
    assert_eq!(init_identity(&mut clients[2], "orders-writer", Some((id, 3))).await.unwrap(), (id, 4));
    // A retry of a request that took effect (same token: its answer was lost) is answered the
    // same, on any node; without the token it would be fenced (a bump) or bump again (an init).
    assert_eq!(init_identity_once(&mut clients[0], "orders-writer", Some((id, 4)), 41).await.unwrap(), (id, 5));
    for client in &mut clients {
        assert_eq!(init_identity_once(client, "orders-writer", Some((id, 4)), 41).await.unwrap(), (id, 5));
    }
    assert_eq!(init_identity_once(&mut clients[1], "orders-writer", None, 42).await.unwrap(), (id, 6));
    assert_eq!(init_identity_once(&mut clients[2], "orders-writer", None, 42).await.unwrap(), (id, 6));
    let zombie = init_identity_once(&mut clients[2], "orders-writer", Some((id, 4)), 43).await.unwrap_err();
    assert_eq!(zombie.get_details_error_info().expect("a reason").reason, "PRODUCER_FENCED");

    let leader = controller(&cluster, &[0, 1, 2]).await;
    let before = cluster.brokers[leader].metadata().producer_identities.clone();
    for client in &mut clients {
        let fenced = init_identity(client, "orders-writer", Some((id, 5))).await.unwrap_err();
        assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
        assert_eq!(fenced.get_details_error_info().expect("a reason").reason, "PRODUCER_FENCED");
        let unknown = init_identity(client, "never-seen", Some((id, 0))).await.unwrap_err();
        assert_eq!(unknown.get_details_error_info().expect("a reason").reason, "PRODUCER_FENCED");
    }
    let bad = [
        pb::InitProducerIdRequest { producer_identity: Some(String::new()), ..Default::default() },
        pb::InitProducerIdRequest { producer_identity: Some("x".repeat(256)), ..Default::default() },
        pb::InitProducerIdRequest { producer_identity: Some("a\u{7}".into()), ..Default::default() },
        pb::InitProducerIdRequest { producer_id: Some(id), producer_epoch: Some(4), ..Default::default() },
        pb::InitProducerIdRequest {
            producer_identity: Some("orders-writer".into()),
            producer_id: Some(id),
            ..Default::default()
        },
        pb::InitProducerIdRequest {
            producer_identity: Some("orders-writer".into()),
            producer_id: Some(id),
            producer_epoch: Some(70_000),
            request_token: 0,
        },
    ];
    for request in bad {
        let refused = clients[0].init_producer_id(request.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{request:?}: {refused:?}");
    }
    assert_eq!(cluster.brokers[leader].metadata().producer_identities, before, "refusals changed nothing");

    // The identities are in __meta: a new controller knows them.
    cluster.brokers[leader].halt().await;
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    assert_eq!(init_identity(&mut clients[survivor], "orders-writer", None).await.unwrap(), (id, 7));
    assert_eq!(init_identity(&mut clients[survivor], "billing-writer", None).await.unwrap(), (other.0, 1));
}

/// Two instances of the Rust producer with one stable identity: the second takes the identity
/// over; once it has written to a partition, the first is refused there, stops, and fails every
/// later send at once, while what it had acknowledged stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_producer_stops_once_a_newer_instance_took_its_identity() {
    use keel_client::{Admin, ClientConfig, ClientError, Producer, ProducerConfig, ProducerRecord};
    let cluster = start(3).await;
    let client = |seed| ClientConfig::new(cluster.addrs.clone()).with_seed(seed);
    async fn send(p: &Producer, v: &'static str) -> Result<keel_client::RecordMetadata, ClientError> {
        p.send("fenced", ProducerRecord::new(v).with_partition(0)).await?.await
    }
    Admin::new(client(1)).unwrap().create_topic("fenced", 1, 3, pb::TopicConfig::default()).await.unwrap();
    let config = ProducerConfig { identity: Some("payments".into()), ..ProducerConfig::default() };
    let old = Producer::new(client(2), config.clone()).unwrap();
    let first = send(&old, "old-1").await.unwrap();
    let new = Producer::new(client(3), config).unwrap();
    let taken = send(&new, "new-1").await.unwrap();
    assert!(taken.offset > first.offset);
    let reason = |e: ClientError| match e {
        ClientError::Producer { reason, .. } => reason,
        other => panic!("expected a producer refusal, got {other:?}"),
    };
    assert_eq!(reason(send(&old, "old-2").await.unwrap_err()), "PRODUCER_FENCED");
    assert_eq!(reason(old.send("fenced", ProducerRecord::new("old-3")).await.unwrap_err()), "PRODUCER_FENCED");
    assert_eq!(send(&new, "new-2").await.unwrap().offset, taken.offset + 1, "the new instance goes on");
    new.close().await;
    old.close().await;
}
