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
    /// Each node's configuration as started, for [`Cluster::restart`].
    configs: Vec<BrokerConfig>,
    /// Each node's client and peer servers.
    servers: Vec<Vec<tokio::task::JoinHandle<()>>>,
    coordinator: keel_broker::CoordinatorFaults,
    clock: Arc<dyn Clock>,
}

impl Cluster {
    /// Stops node `i` as a crash would: nothing flushed, its listeners closed.
    pub async fn crash(&mut self, i: usize) {
        self.brokers[i].halt().await;
        for server in self.servers[i].drain(..) {
            server.abort();
            let _ = server.await;
        }
    }

    /// Starts node `i` again on its addresses (crash it first). With `wipe`, its data dir is
    /// deleted first and the new one gets another key, as a replaced disk would. Returns without
    /// waiting for the node to be ready (a wiped node is not, until it is replaced).
    pub async fn restart(&mut self, i: usize, wipe: bool) {
        let mut config = self.configs[i].clone();
        if wipe {
            std::fs::remove_dir_all(&config.data_dir).unwrap();
            config.new_node_key = keel_broker::node_key_from_seed(config.node_id + 1_000);
        }
        let (broker, servers) =
            serve(config, self.coordinator, Arc::clone(&self.clock), &self.addrs[i], &self.peer_addrs[i]).await;
        self.brokers[i] = broker;
        self.servers[i] = servers;
    }
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range (32768 and up by default). A port
/// the system picks (`:0`) is in that range, and an outgoing connection of a test running
/// alongside could take it before the node binds it (AddrInUse).
fn free_addr() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id() % 12_000;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (start + n) % 12_000;
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return probe.local_addr().unwrap().to_string();
        }
    }
}

/// A listener on `addr` that can take the address of one just closed.
fn rebind(addr: &str) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr.parse().unwrap()).unwrap();
    socket.listen(1024).unwrap()
}

/// Starts a broker and serves its client and peer APIs on `addr` and `peer_addr`.
async fn serve(
    config: BrokerConfig,
    coordinator: keel_broker::CoordinatorFaults,
    clock: Arc<dyn Clock>,
    addr: &str,
    peer_addr: &str,
) -> (Broker, Vec<tokio::task::JoinHandle<()>>) {
    let (listener, peer_listener) = (rebind(addr), rebind(peer_addr));
    let storage = keel_broker::StorageMode { coordinator, ..keel_broker::StorageMode::default() };
    let broker =
        Broker::start_with(config, storage, Arc::new(FileDisk::new()), Arc::new(TcpConnector::default()), clock)
            .await
            .unwrap();
    let routes = broker.router().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let client = tokio::spawn({
        let server = broker.server().add_routes(routes);
        async move {
            let _ = server.serve_with_incoming(incoming).await;
        }
    });
    let incoming = tonic::transport::server::TcpIncoming::from(peer_listener);
    let peer = tokio::spawn({
        // What `keel server` serves on its peer listener, limits included.
        let server = broker.peer_server();
        async move {
            let _ = server.serve_with_incoming(incoming).await;
        }
    });
    (broker, vec![client, peer])
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
    launch(nodes, voters, tweak, coordinator, clock, None).await
}

/// `nodes` voters started last to first, `gap` apart: the first voter (the one that
/// initialises a new group at once) comes up after the others already asked around.
pub async fn start_last_first(nodes: u64, gap: Duration) -> Cluster {
    launch(nodes, nodes, |_| {}, keel_broker::CoordinatorFaults::default(), Arc::new(FixedClock), Some(gap)).await
}

async fn launch(
    nodes: u64,
    voters: u64,
    tweak: impl Fn(&mut BrokerConfig),
    coordinator: keel_broker::CoordinatorFaults,
    clock: Arc<dyn Clock>,
    last_first: Option<Duration>,
) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    // Free ports, closed again and bound by each node's server.
    let mut addrs = Vec::new();
    let mut peer_addrs = Vec::new();
    for _ in 0..nodes {
        for list in [&mut addrs, &mut peer_addrs] {
            list.push(free_addr());
        }
    }
    let voters: BTreeMap<u64, String> =
        peer_addrs.iter().enumerate().take(voters as usize).map(|(i, a)| (i as u64 + 1, a.clone())).collect();
    let mut started = BTreeMap::new();
    let order: Vec<usize> = match last_first {
        Some(_) => (0..nodes as usize).rev().collect(),
        None => (0..nodes as usize).collect(),
    };
    for i in order {
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
        let (broker, served) = serve(config.clone(), coordinator, Arc::clone(&clock), &addrs[i], &peer_addrs[i]).await;
        started.insert(i, (broker, config, served));
        if let Some(gap) = last_first {
            tokio::time::sleep(gap).await;
        }
    }
    let mut brokers = Vec::new();
    let mut configs = Vec::new();
    let mut servers = Vec::new();
    for (broker, config, served) in started.into_values() {
        brokers.push(broker);
        configs.push(config);
        servers.push(served);
    }
    for b in &brokers {
        let mut ready = b.ready();
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r)).await.unwrap().unwrap();
    }
    Cluster { _dir: dir, brokers, addrs, peer_addrs, configs, servers, coordinator, clock }
}

pub async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}
