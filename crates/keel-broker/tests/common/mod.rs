//! Three (or more) in-process nodes on 127.0.0.1 with real disks and real gRPC: what the
//! broker's API tests share.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_broker::{Broker, BrokerConfig, Clock, Limits};
use keel_raft::{NetworkConfig, RaftTimings, TcpConnector};
use keel_storage::{FileDisk, LogConfig};
use tonic::transport::Channel;

pub struct FixedClock;
impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        1_700_000_000_000
    }
}

pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub brokers: Vec<Broker>,
    /// Client addresses.
    pub addrs: Vec<String>,
    /// Peer addresses.
    pub peer_addrs: Vec<String>,
}

pub async fn start(nodes: u64) -> Cluster {
    start_with_voters(nodes, nodes).await
}

/// `nodes` nodes of which the first `voters` vote in the metadata group.
pub async fn start_with_voters(nodes: u64, voters: u64) -> Cluster {
    start_configured(nodes, voters, |_| {}).await
}

/// `nodes` nodes (the first `voters` voting), each config adjusted by `tweak`.
pub async fn start_configured(nodes: u64, voters: u64, tweak: impl Fn(&mut BrokerConfig)) -> Cluster {
    start_faulty(nodes, voters, tweak, keel_broker::CoordinatorFaults::default()).await
}

/// [`start_configured`] with injected coordinator bugs (negative controls).
pub async fn start_faulty(
    nodes: u64,
    voters: u64,
    tweak: impl Fn(&mut BrokerConfig),
    coordinator: keel_broker::CoordinatorFaults,
) -> Cluster {
    start_clocked(nodes, voters, tweak, coordinator, Arc::new(FixedClock)).await
}

/// [`start_faulty`] with every node reading wall-clock time from `clock`.
pub async fn start_clocked(
    nodes: u64,
    voters: u64,
    tweak: impl Fn(&mut BrokerConfig),
    coordinator: keel_broker::CoordinatorFaults,
    clock: Arc<dyn Clock>,
) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut peer_listeners = Vec::new();
    for _ in 0..nodes {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        peer_listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let peer_addrs: Vec<String> = peer_listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let voters: BTreeMap<u64, String> =
        peer_addrs.iter().enumerate().take(voters as usize).map(|(i, a)| (i as u64 + 1, a.clone())).collect();
    let mut brokers = Vec::new();
    for (i, (listener, peer_listener)) in listeners.into_iter().zip(peer_listeners).enumerate() {
        let id = i as u64 + 1;
        let config = BrokerConfig {
            node_id: id,
            advertised_addr: addrs[i].clone(),
            peer_addr: peer_addrs[i].clone(),
            data_dir: dir.path().join(format!("node-{id}")),
            voters: voters.clone(),
            timings: RaftTimings { heartbeat_ms: 100, election_min_ms: 400, election_max_ms: 800, quiesce: true },
            log: LogConfig { segment_bytes_max: 1 << 20, preallocate_step_bytes: 1 << 20, ..LogConfig::default() },
            network: NetworkConfig::default(),
            append_timeout: Duration::from_secs(5),
            retention_interval: Duration::from_secs(3600),
            limits: Limits::default(),
            groups: Default::default(),
            delayed: Default::default(),
            txn: Default::default(),
            seed: id,
            new_node_key: keel_broker::node_key_from_seed(id),
            // Some tests run brokers beyond the voters.
            admit_new_nodes: true,
            auth: Default::default(),
        };
        let mut config = config;
        tweak(&mut config);
        let storage = keel_broker::StorageMode { coordinator, ..keel_broker::StorageMode::default() };
        let broker = Broker::start_with(
            config,
            storage,
            Arc::new(FileDisk::new()),
            Arc::new(TcpConnector::default()),
            Arc::clone(&clock),
        )
        .await
        .unwrap();
        let routes = broker.router().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(broker.server().add_routes(routes).serve_with_incoming(incoming));
        let incoming = tonic::transport::server::TcpIncoming::from(peer_listener);
        tokio::spawn(broker.server().add_routes(broker.peer_router()).serve_with_incoming(incoming));
        brokers.push(broker);
    }
    for b in &brokers {
        let mut ready = b.ready();
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r)).await.unwrap().unwrap();
    }
    Cluster { _dir: dir, brokers, addrs, peer_addrs }
}

pub async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}
