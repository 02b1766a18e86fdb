//! A real cluster for end-to-end tests: `keel server` processes on 127.0.0.x, each with its own
//! loopback address, data dir and log file; nodes can be killed (SIGKILL) and restarted.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_client::{Admin, ClientConfig};

/// One node's process and where it lives.
pub struct Node {
    pub id: u64,
    pub addr: String,
    /// The peer listener (raft, the controller, forwarded calls).
    pub peer_addr: String,
    /// The `/metrics` listener (a free port of its own: the default, gRPC port + 100, could be
    /// taken on a shared machine).
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// Nodes of one cluster; dropping it kills them all.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// With TLS on: the directory of its CA and certificates (`keel cert`), and what a client
    /// needs.
    pub tls: Option<(PathBuf, keel_client::Tls)>,
    /// With authentication on: each principal's token (`admin` is a superuser, the default
    /// client's identity).
    pub tokens: std::collections::BTreeMap<String, String>,
}

/// Runs `keel <args>` to its end; panics if it fails.
pub fn keel(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keel")).args(args).output().unwrap();
    assert!(out.status.success(), "keel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free port on `ip` (the port is released before the node binds it; tests on one machine
/// never race for the same 127.0.0.x address).
fn free_port(ip: &str) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

impl Cluster {
    /// Starts `n` nodes (all metadata voters, plaintext: `insecure`) and waits until every one
    /// is healthy. `first_ip` picks the loopback addresses (127.0.0.first_ip …), so tests running
    /// at once never collide.
    pub async fn start(n: u64, first_ip: u8) -> Cluster {
        Cluster::start_with(n, first_ip, false, &[], "").await
    }

    /// [`Cluster::start`] with `extra` appended to every node's config file.
    pub async fn start_configured(n: u64, first_ip: u8, extra: &str) -> Cluster {
        Cluster::start_with(n, first_ip, false, &[], extra).await
    }

    /// [`Cluster::start`] with TLS on both listeners: a CA and node certificates made by
    /// `keel cert` in the cluster's directory (`tls/`).
    pub async fn start_tls(n: u64, first_ip: u8) -> Cluster {
        Cluster::start_with(n, first_ip, true, &[], "").await
    }

    /// [`Cluster::start_tls`] with client authentication: a tokens file with a token for
    /// `admin` (a superuser) and for each of `principals`.
    pub async fn start_auth(n: u64, first_ip: u8, principals: &[&str]) -> Cluster {
        Cluster::start_with(n, first_ip, true, principals, "").await
    }

    /// [`Cluster::start_auth`] with `extra` appended to every node's config file.
    pub async fn start_auth_with(n: u64, first_ip: u8, principals: &[&str], extra: &str) -> Cluster {
        Cluster::start_with(n, first_ip, true, principals, extra).await
    }

    async fn start_with(n: u64, first_ip: u8, tls: bool, principals: &[&str], extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", u64::from(first_ip) + i);
            let addr = format!("{ip}:{}", free_port(&ip));
            let peer_addr = format!("{ip}:{}", free_port(&ip));
            let metrics_addr = format!("{ip}:{}", free_port(&ip));
            let id = i + 1;
            nodes.push(Node {
                id,
                addr,
                peer_addr,
                metrics_addr,
                data_dir: dir.path().join(format!("node-{id}")),
                config: dir.path().join(format!("node-{id}.toml")),
                log: dir.path().join(format!("node-{id}.log")),
                child: None,
            });
        }
        let voters = nodes.iter().map(|n| format!("{}@{}", n.id, n.peer_addr)).collect::<Vec<_>>().join(",");
        let tls_dir = dir.path().join("tls");
        let tls_dir_text = tls_dir.display().to_string();
        let tokens_file = tls_dir.join("tokens");
        let mut tokens = std::collections::BTreeMap::new();
        if tls {
            keel(&["cert", "ca", "--dir", &tls_dir_text]);
            if !principals.is_empty() {
                for name in std::iter::once("admin").chain(principals.iter().copied()) {
                    let token = keel(&["token", "create", name, "--file", &tokens_file.display().to_string()]);
                    tokens.insert(name.to_owned(), token.trim().to_owned());
                }
            }
        }
        for node in &nodes {
            let security = if tls {
                let ip = node.addr.rsplit_once(':').unwrap().0;
                keel(&["cert", "node", "--id", &node.id.to_string(), "--hosts", ip, "--dir", &tls_dir_text]);
                let auth = if tokens.is_empty() {
                    String::new()
                } else {
                    format!("tokens_file = \"{tls_dir_text}/tokens\"\nsuperusers = [\"admin\"]\n")
                };
                format!(
                    "tls_cert_file = \"{0}/node-{1}.pem\"\ntls_key_file = \"{0}/node-{1}.key\"\ntls_ca_file = \"{0}/ca.pem\"\n{auth}",
                    tls_dir_text, node.id
                )
            } else {
                "insecure = true\n".to_owned()
            };
            // The config file path is part of what is tested: flags only name the file.
            let toml = format!(
                "node_id = {}\nlisten = \"{}\"\npeer_listen = \"{}\"\nmetrics_listen = \"{}\"\nvoters = \"{voters}\"\ndata_dir = \"{}\"\n\
                 heartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\nappend_timeout_ms = 5000\n\
                 segment_bytes_max = 4194304\nshutdown_grace_ms = 1000\n",
                node.id,
                node.addr,
                node.peer_addr,
                node.metrics_addr,
                node.data_dir.display()
            );
            std::fs::write(&node.config, toml + &security + extra).unwrap();
        }
        let tls = tls.then(|| {
            let client = keel_client::Tls::from_files(&tls_dir.join("ca.pem"), None, None).unwrap();
            (tls_dir, client)
        });
        let mut cluster = Cluster { dir, nodes, tls, tokens };
        for i in 0..n as usize {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(60)).await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("server")
            .arg("--config")
            .arg(&node.config)
            .env("KEEL_LOG", "info,openraft=warn")
            .env_remove("KEEL_NODE_ID")
            .env_remove("KEEL_VOTERS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Kills node `id` with SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self, id: u64) {
        let node = &mut self.nodes[id as usize - 1];
        if let Some(mut child) = node.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to node `id`'s process, through kill(1): a stopped
    /// node keeps its sockets and its state, like one stalled by the machine, not crashed.
    pub fn signal(&self, id: u64, signal: &str) {
        let child = self.nodes[id as usize - 1].child.as_ref().expect("the node is running");
        let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} node {id}: {status}");
    }

    /// Waits up to `within` for node `id`'s process to exit; its exit status if it did.
    pub async fn wait_exit(&mut self, id: u64, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        let node = &mut self.nodes[id as usize - 1];
        let child = node.child.as_mut().expect("the node is running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                node.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts node `id` from its data dir.
    pub fn restart(&mut self, id: u64) {
        assert!(self.nodes[id as usize - 1].child.is_none(), "node {id} is running");
        self.spawn(id as usize - 1);
    }

    /// Waits until every running node answers SERVING.
    pub async fn wait_healthy(&mut self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        for node in &mut self.nodes {
            let Some(child) = node.child.as_mut() else { continue };
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("node {} exited ({status}):\n{}", node.id, std::fs::read_to_string(&node.log).unwrap());
                }
                if serving_with(&node.addr, self.tls.as_ref().map(|(_, t)| t)).await {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "node {} not healthy in time", node.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The `KEEL_BOOTSTRAP` string of the cluster.
    pub fn bootstrap(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// Client settings for this cluster.
    pub fn client(&self, seed: u64) -> ClientConfig {
        self.client_as("admin", seed)
    }

    /// Client settings with `principal`'s token (when the cluster has tokens).
    pub fn client_as(&self, principal: &str, seed: u64) -> ClientConfig {
        let config = ClientConfig::from_bootstrap(&self.bootstrap()).unwrap().with_seed(seed);
        let config = match &self.tls {
            Some((_, tls)) => config.with_tls(tls),
            None => config,
        };
        match self.tokens.get(principal) {
            Some(token) => config.with_token(token),
            None => config,
        }
    }

    /// An admin client.
    pub fn admin(&self) -> Admin {
        Admin::new(self.client(0)).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Whether the node at `addr` answers SERVING on grpc.health.v1 within a second.
pub async fn serving(addr: &str) -> bool {
    serving_with(addr, None).await
}

/// [`serving`], over TLS when `tls` is given.
pub async fn serving_with(addr: &str, tls: Option<&keel_client::Tls>) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client_config()).unwrap();
    }
    let probe = async {
        let channel = endpoint.connect_timeout(Duration::from_millis(300)).connect().await.ok()?;
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let response = HealthClient::new(channel).check(request).await.ok()?;
        Some(response.into_inner().status == 1)
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}

/// `GET /metrics` of the node at `metrics_addr` (HTTP/1.0: the server closes the connection
/// after its answer, so the body is everything after the headers); `None` if it does not answer
/// within two seconds.
pub fn scrape_text(metrics_addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = metrics_addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "scrape of {metrics_addr}: {head}");
    Some(body.to_owned())
}

/// A scrape parsed by a Prometheus text parser.
pub fn scrape(metrics_addr: &str) -> Option<prometheus_parse::Scrape> {
    let text = scrape_text(metrics_addr)?;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).ok()
}

/// The value of the sample `name` whose labels include `labels` (0 if there is none), summed
/// when several match.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Waits until every partition of `topic` has a leader.
pub async fn wait_leaders(admin: &Admin, topic: &str) -> keel_client::TopicDescription {
    for _ in 0..300 {
        if let Ok(t) = admin.describe_topic(topic).await
            && t.partitions.iter().all(|p| p.leader_id.is_some())
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("partitions of {topic} got no leaders");
}

/// Reads every partition of `topic` from the beginning until each reaches `until[p]` (exclusive).
pub async fn read_all(
    config: ClientConfig,
    topic: &str,
    until: &std::collections::BTreeMap<u32, u64>,
) -> std::collections::BTreeMap<(u32, u64), String> {
    let mut consumer = keel_client::Consumer::new(config, keel_client::ConsumerConfig::default()).unwrap();
    consumer.assign(topic, &[]).await.unwrap();
    let mut got = std::collections::BTreeMap::new();
    let mut next: std::collections::BTreeMap<u32, u64> = until.keys().map(|p| (*p, 0)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while next.iter().any(|(p, n)| *n < until[p]) {
        assert!(tokio::time::Instant::now() < deadline, "read only up to {next:?} of {until:?}");
        for r in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            let expected = next.get(&r.partition).copied().unwrap_or(0);
            assert_eq!(r.offset, expected, "partition {} read out of order", r.partition);
            next.insert(r.partition, r.offset + 1);
            let value = String::from_utf8(r.value.unwrap_or_default().to_vec()).unwrap();
            got.insert((r.partition, r.offset), value);
        }
    }
    got
}
