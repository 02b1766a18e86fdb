//! `keel server`: runs one node. Settings come from a TOML file, then `KEEL_*` environment
//! variables, then flags (each overriding the one before).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keel_broker::{Broker, BrokerConfig, Clock, DelayedSettings, GroupSettings, Limits};
use keel_raft::{NetworkConfig, RaftTimings, TcpConnector};
use keel_storage::{FileDisk, LogConfig};
use serde::Deserialize;
use tracing::{error, info, warn};

use crate::clock::SystemClock;

/// Flags of `keel server` (each also readable from the `KEEL_…` variable named beside it).
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML config file (see README "Configuration").
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (unique in the cluster, ≥ 1).
    #[arg(long, env = "KEEL_NODE_ID")]
    node_id: Option<u64>,
    /// Address clients connect to (host:port).
    #[arg(long, env = "KEEL_LISTEN")]
    listen: Option<String>,
    /// Address clients reach this node at (defaults to --listen).
    #[arg(long, env = "KEEL_ADVERTISE")]
    advertise: Option<String>,
    /// Address of the peer listener (raft, the controller, calls between nodes). Defaults to
    /// the listen address with its port + 1000 (9092 → 10092).
    #[arg(long, env = "KEEL_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// Address other nodes reach the peer listener at (defaults to --peer-listen).
    #[arg(long, env = "KEEL_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// The metadata voters by peer address, the same on every node:
    /// `1@host:peerport,2@host:peerport,3@host:peerport`. Defaults to this node alone.
    #[arg(long, env = "KEEL_VOTERS")]
    voters: Option<String>,
    /// Where this node keeps its data.
    #[arg(long, env = "KEEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the `/metrics` HTTP listener (host:port), or `off`. Defaults to the listen
    /// address with its port + 100 (9092 → 9192).
    #[arg(long, env = "KEEL_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// This node's certificate (PEM), with the URI SAN `keel://node/ID` (`keel cert node`).
    #[arg(long, env = "KEEL_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM).
    #[arg(long, env = "KEEL_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// The cluster CA (PEM): peers' and client certificates must chain to it.
    #[arg(long, env = "KEEL_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Serve plaintext, without TLS or peer authentication: for development only. Without TLS
    /// files a node refuses to start unless this is given.
    #[arg(long, env = "KEEL_INSECURE")]
    insecure: bool,
    /// Client tokens (`NAME SHA256HEX` lines, `keel token create`): set, clients must present a
    /// token or a client certificate, and ACLs decide what they may do.
    #[arg(long, env = "KEEL_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Principal names that pass every ACL check (comma-separated, without `User:`).
    #[arg(long, env = "KEEL_SUPERUSERS", value_delimiter = ',')]
    superusers: Option<Vec<String>>,
    /// Let the controller register node ids that are not metadata voters (nodes that hold
    /// partitions only). Overrides the file's `admit_new_nodes`.
    #[arg(long, env = "KEEL_ADMIT_NEW_NODES")]
    admit_new_nodes: Option<bool>,
}

/// The TOML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    listen: Option<String>,
    advertise: Option<String>,
    /// The peer listener (README, "Configuration").
    peer_listen: Option<String>,
    peer_advertise: Option<String>,
    /// TLS (README, "Security").
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    insecure: Option<bool>,
    tokens_file: Option<PathBuf>,
    superusers: Option<Vec<String>>,
    /// Per-principal byte rates per node (README, "Security").
    quota_produce_bytes_per_sec: Option<u64>,
    quota_fetch_bytes_per_sec: Option<u64>,
    voters: Option<String>,
    data_dir: Option<PathBuf>,
    /// The `/metrics` HTTP listener (README, "Metrics").
    metrics_listen: Option<String>,
    /// Per-partition metric series only while the node hosts fewer partitions than this.
    metrics_partition_series_max: Option<usize>,
    /// A segment is rolled beyond this size.
    segment_bytes_max: Option<u64>,
    /// Default retention of every topic (0 = forever).
    retention_ms: Option<i64>,
    retention_bytes: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_min_ms: Option<u64>,
    election_max_ms: Option<u64>,
    /// Whether idle partitions stop their raft heartbeats and election timers (node heartbeats
    /// keep their liveness).
    raft_quiesce: Option<bool>,
    /// Whether the AppendEntries of many partitions to the same peer travel in one RPC.
    raft_coalesce: Option<bool>,
    /// `partition` (the default: each partition msyncs its own file) or `node` (one syncfs
    /// covers every dirty partition of the node).
    flush_scope: Option<String>,
    /// How long a produce waits for its commit.
    append_timeout_ms: Option<u64>,
    /// How long SIGTERM or Ctrl-C lets open requests and streams finish before closing them.
    shutdown_grace_ms: Option<u64>,
    fetch_bytes_max: Option<usize>,
    fetch_wait_ms_max: Option<u32>,
    /// Bounds of what clients can make a node hold (README, "Limits").
    stream_in_flight_bytes_max: Option<usize>,
    in_flight_bytes_max: Option<usize>,
    streams_per_connection_max: Option<u32>,
    subscribes_per_connection_max: Option<usize>,
    subscribe_buffer_bytes_max: Option<usize>,
    partitions_max: Option<usize>,
    partitions_per_node_max: Option<usize>,
    /// Idempotent producers' dedup state per partition (README, "Idempotent producers"); set
    /// them alike on every node.
    producer_window: Option<usize>,
    catch_up_bytes_per_sec: Option<u64>,
    producers_per_partition_max: Option<usize>,
    producer_id_expiration_ms: Option<i64>,
    /// Partitions of `__consumer_offsets` (used once, when the cluster creates it).
    offsets_partitions: Option<u32>,
    /// Offsets of a group with no members expire this long after it became empty.
    offsets_retention_ms: Option<i64>,
    /// Compact a `__consumer_offsets` partition once this many bytes were written since its
    /// last compaction.
    offsets_compact_bytes: Option<u64>,
    /// Members per consumer group.
    group_members_max: Option<usize>,
    /// Consumer groups per coordinator (per `__consumer_offsets` partition).
    groups_max: Option<usize>,
    /// Bytes of metadata one committed offset may carry.
    commit_metadata_bytes_max: Option<usize>,
    /// The longest session timeout a group member may ask for.
    group_session_timeout_ms_max: Option<u32>,
    /// Commits per (group, partition) the consumer status is judged over.
    group_lag_window_commits: Option<usize>,
    /// (group, partition) commit windows kept per `__consumer_offsets` partition.
    group_lag_partitions_max: Option<usize>,
    /// Silence (with records waiting) after which a consumer is STOP.
    group_lag_stop_ms: Option<i64>,
    /// Partitions of `__delayed` (used once, when the cluster creates it).
    delayed_partitions: Option<u32>,
    /// The longest delay a delayed produce may ask for (default: 366 days).
    delay_max_ms: Option<i64>,
    /// Timers pending per `__delayed` partition.
    delayed_pending_max: Option<u64>,
    /// Compact a `__delayed` partition once this many bytes were written since its last
    /// compaction.
    delayed_compact_bytes: Option<u64>,
    /// Partitions of `__txn` (used once, when the cluster creates it).
    txn_partitions: Option<u32>,
    /// The timeout of a transaction whose prepare names none, before its first check-back.
    txn_timeout_ms: Option<i64>,
    /// Check-backs sent before the expiry policy applies.
    txn_checks_max: Option<u32>,
    /// The wait after the first check-back (each later one doubles it, up to the maximum).
    txn_check_backoff_ms: Option<i64>,
    /// The longest wait between two check-backs.
    txn_check_backoff_max_ms: Option<i64>,
    /// What expiry does to a transaction whose checks went unanswered: `rollback` or `commit`.
    txn_expiry_policy: Option<String>,
    /// Pending transactions per `__txn` partition.
    txn_pending_max: Option<usize>,
    /// Bytes of pending transactions' records per `__txn` partition (held in memory).
    txn_pending_bytes_max: Option<u64>,
    /// Register node ids that are not metadata voters (brokers that follow the metadata).
    admit_new_nodes: Option<bool>,
}

/// Parses `1@host:port,2@host:port`.
pub fn parse_voters(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut voters = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('@').with_context(|| format!("voter {part:?} is not ID@HOST:PORT"))?;
        let id: u64 = id.parse().with_context(|| format!("voter id {id:?} is not a number"))?;
        if addr.is_empty() || !addr.contains(':') {
            bail!("voter {part:?}: address must be HOST:PORT");
        }
        if voters.insert(id, addr.to_owned()).is_some() {
            bail!("voter {id} is listed twice");
        }
    }
    if voters.is_empty() {
        bail!("the voter list is empty");
    }
    Ok(voters)
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// How far above the gRPC port the metrics listener is by default: far enough that `keel dev`'s
/// consecutive node ports (up to 9 nodes) never meet their metrics ports.
const METRICS_PORT_OFFSET: u16 = 100;

/// How far above the client port the peer listener is by default.
pub const PEER_PORT_OFFSET: u16 = 1_000;

fn split_addr(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("{addr:?} is not HOST:PORT"))?;
    let port = port.parse().with_context(|| format!("{addr:?}: the port is not a number from 0 to 65535"))?;
    Ok((host.to_owned(), port))
}

/// The address of a listener beside the client one: `setting` if given, else the client listen
/// address with its port + `offset` (0 stays 0: any free port, for tests). `key` names the
/// setting in errors.
fn beside(setting: Option<&str>, listen: &str, offset: u16, key: &str) -> anyhow::Result<String> {
    let (host, port) = split_addr(listen).context("listen")?;
    match setting {
        Some(addr) => {
            let (_, own_port) = split_addr(addr).with_context(|| key.to_owned())?;
            if addr == listen && own_port != 0 {
                bail!("{key} {addr} is the client listen address; give it a port of its own");
            }
            Ok(addr.to_owned())
        }
        None if port == 0 => Ok(format!("{host}:0")),
        None => match port.checked_add(offset) {
            Some(own_port) => Ok(format!("{host}:{own_port}")),
            None => bail!("listen port {port} leaves no room for the default {key} port (+{offset}); set {key}"),
        },
    }
}

/// Where the `/metrics` listener goes: `setting` if given (`off` for none), else the gRPC listen
/// address with its port + [`METRICS_PORT_OFFSET`].
fn metrics_listen(setting: Option<String>, listen: &str) -> anyhow::Result<Option<String>> {
    match setting.as_deref().map(str::trim) {
        Some("off") => Ok(None),
        setting => beside(setting, listen, METRICS_PORT_OFFSET, "metrics_listen").map(Some),
    }
}

/// Where a node listens: clients, peers, metrics (if on); and its TLS files (`None`: insecure).
struct Listen {
    client: String,
    peer: String,
    metrics: Option<String>,
    tls: Option<TlsFiles>,
}

/// A node's TLS files.
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// TLS on, from all three files, or off only when asked for (`insecure`); anything between is
/// refused, so that a typo never leaves a node in plaintext.
fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    insecure: bool,
) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key, ca, insecure) {
        (Some(cert), Some(key), Some(ca), false) => Ok(Some(TlsFiles { cert, key, ca })),
        (None, None, None, true) => Ok(None),
        (Some(_), Some(_), Some(_), true) => {
            bail!("TLS files are set and so is insecure: choose one (remove insecure to serve TLS)")
        }
        (None, None, None, false) => bail!(
            "no TLS configured: set tls_cert_file, tls_key_file and tls_ca_file (`keel cert` makes them; `keel dev` \
             does it for you), or set insecure = true (--insecure) to serve plaintext for development"
        ),
        (cert, key, ca, _) => {
            let missing: Vec<&str> =
                [("tls_cert_file", cert.is_none()), ("tls_key_file", key.is_none()), ("tls_ca_file", ca.is_none())]
                    .into_iter()
                    .filter_map(|(name, missing)| missing.then_some(name))
                    .collect();
            bail!("TLS is half-configured: {} missing (all three files, or none with insecure)", missing.join(", "))
        }
    }
}

/// What `resolve` gives `serve`: the node's config, where to listen, the shutdown grace period.
type Resolved = (BrokerConfig, Listen, Duration, keel_raft::FlushScope);

/// Merges file, environment and flags into a node's config.
fn resolve(args: ServerArgs) -> anyhow::Result<Resolved> {
    let file = match &args.config {
        Some(path) => load_file(path)?,
        None => FileConfig::default(),
    };
    let node_id = args.node_id.or(file.node_id).context("--node-id (or node_id in the config file) is required")?;
    if node_id == 0 {
        bail!("node ids start at 1");
    }
    let listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:9092".into());
    let advertise = args.advertise.or(file.advertise).unwrap_or_else(|| listen.clone());
    let peer_listen =
        beside(args.peer_listen.or(file.peer_listen).as_deref(), &listen, PEER_PORT_OFFSET, "peer_listen")?;
    let peer_advertise = args.peer_advertise.or(file.peer_advertise).unwrap_or_else(|| peer_listen.clone());
    let voters = match args.voters.or(file.voters) {
        Some(v) => parse_voters(&v)?,
        None => BTreeMap::from([(node_id, peer_advertise.clone())]),
    };
    let metrics = metrics_listen(args.metrics_listen.or(file.metrics_listen), &listen)?;
    let data_dir =
        args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(format!("keel-data/node-{node_id}")));
    let defaults = RaftTimings::default();
    let timings = RaftTimings {
        heartbeat_ms: file.heartbeat_ms.unwrap_or(defaults.heartbeat_ms),
        election_min_ms: file.election_min_ms.unwrap_or(defaults.election_min_ms),
        election_max_ms: file.election_max_ms.unwrap_or(defaults.election_max_ms),
        quiesce: file.raft_quiesce.unwrap_or(defaults.quiesce),
    };
    let log = LogConfig {
        segment_bytes_max: file.segment_bytes_max.unwrap_or(LogConfig::default().segment_bytes_max),
        retention_ms: file.retention_ms.filter(|&ms| ms > 0),
        retention_bytes: file.retention_bytes.filter(|&b| b > 0),
        ..LogConfig::default()
    };
    let mut limits = Limits::default();
    if let Some(b) = file.fetch_bytes_max {
        limits.fetch_bytes_max = b;
    }
    if let Some(ms) = file.fetch_wait_ms_max {
        limits.fetch_wait_ms_max = ms;
    }
    limits.stream_in_flight_bytes_max = file.stream_in_flight_bytes_max.unwrap_or(limits.stream_in_flight_bytes_max);
    limits.in_flight_bytes_max = file.in_flight_bytes_max.unwrap_or(limits.in_flight_bytes_max);
    limits.streams_per_connection_max = file.streams_per_connection_max.unwrap_or(limits.streams_per_connection_max);
    limits.subscribes_per_connection_max =
        file.subscribes_per_connection_max.unwrap_or(limits.subscribes_per_connection_max);
    limits.subscribe_buffer_bytes_max = file.subscribe_buffer_bytes_max.unwrap_or(limits.subscribe_buffer_bytes_max);
    limits.producer_window = file.producer_window.unwrap_or(limits.producer_window);
    limits.catch_up_bytes_per_sec = file.catch_up_bytes_per_sec.unwrap_or(limits.catch_up_bytes_per_sec);
    limits.producers_per_partition_max = file.producers_per_partition_max.unwrap_or(limits.producers_per_partition_max);
    limits.producer_id_expiration_ms = file.producer_id_expiration_ms.unwrap_or(limits.producer_id_expiration_ms);
    limits.partitions_max = file.partitions_max.unwrap_or(limits.partitions_max);
    limits.partitions_per_node_max = file.partitions_per_node_max.unwrap_or(limits.partitions_per_node_max);
    limits.metrics_partition_series_max =
        file.metrics_partition_series_max.unwrap_or(limits.metrics_partition_series_max);
    let mut groups = GroupSettings::default();
    if let Some(n) = file.offsets_partitions {
        groups.offsets_partitions = n;
    }
    if let Some(ms) = file.offsets_retention_ms {
        groups.offsets_retention_ms = ms;
    }
    if let Some(bytes) = file.offsets_compact_bytes {
        if bytes < 1 << 20 {
            anyhow::bail!("offsets_compact_bytes must be at least 1 MiB (got {bytes})");
        }
        groups.offsets_compact_bytes = bytes;
    }
    if let Some(n) = file.group_members_max {
        groups.limits.members_per_group_max = n;
    }
    if let Some(n) = file.groups_max {
        groups.limits.groups_max = n;
    }
    if let Some(n) = file.commit_metadata_bytes_max {
        groups.limits.metadata_bytes_max = n;
    }
    if let Some(ms) = file.group_session_timeout_ms_max {
        groups.limits.session_timeout_ms_max = ms.max(groups.limits.session_timeout_ms_min);
    }
    if let Some(n) = file.group_lag_window_commits {
        if !(2..=100).contains(&n) {
            anyhow::bail!("group_lag_window_commits must be 2 to 100 (got {n})");
        }
        groups.lag_limits.window_commits = n;
    }
    if let Some(n) = file.group_lag_partitions_max {
        if n == 0 {
            anyhow::bail!("group_lag_partitions_max must be at least 1");
        }
        groups.lag_limits.tracked_max = n;
    }
    if let Some(ms) = file.group_lag_stop_ms {
        if ms < 1_000 {
            anyhow::bail!("group_lag_stop_ms must be at least 1000 (got {ms})");
        }
        groups.lag_stop_ms = ms;
    }
    let mut delayed = DelayedSettings::default();
    delayed.partitions = file.delayed_partitions.unwrap_or(delayed.partitions);
    delayed.limits.delay_max_ms = file.delay_max_ms.unwrap_or(delayed.limits.delay_max_ms);
    delayed.limits.pending_max = file.delayed_pending_max.unwrap_or(delayed.limits.pending_max);
    delayed.compact_bytes = file.delayed_compact_bytes.unwrap_or(delayed.compact_bytes);
    let mut txn = keel_broker::TxnSettings::default();
    txn.partitions = file.txn_partitions.unwrap_or(txn.partitions);
    let t = &mut txn.limits;
    t.timeout_default_ms = file.txn_timeout_ms.unwrap_or(t.timeout_default_ms);
    t.checks_max = file.txn_checks_max.unwrap_or(t.checks_max);
    t.check_backoff_ms = file.txn_check_backoff_ms.unwrap_or(t.check_backoff_ms);
    t.check_backoff_max_ms = file.txn_check_backoff_max_ms.unwrap_or(t.check_backoff_max_ms.max(t.check_backoff_ms));
    t.pending_max = file.txn_pending_max.unwrap_or(t.pending_max);
    t.pending_bytes_max = file.txn_pending_bytes_max.unwrap_or(t.pending_bytes_max);
    t.expiry = match file.txn_expiry_policy.as_deref() {
        None | Some("rollback") => keel_broker::TxnExpiryPolicy::Rollback,
        Some("commit") => keel_broker::TxnExpiryPolicy::Commit,
        Some(other) => anyhow::bail!("txn_expiry_policy is `rollback` or `commit` (got {other:?})"),
    };
    let config = BrokerConfig {
        node_id,
        advertised_addr: advertise,
        peer_addr: peer_advertise,
        data_dir,
        voters,
        timings,
        log,
        network: NetworkConfig {
            coalesce_append_entries: file.raft_coalesce.unwrap_or(NetworkConfig::default().coalesce_append_entries),
            ..NetworkConfig::default()
        },
        append_timeout: Duration::from_millis(file.append_timeout_ms.unwrap_or(10_000)),
        retention_interval: Duration::from_secs(30),
        limits,
        groups,
        delayed,
        txn,
        seed: crate::clock::entropy(),
        // A secret, unlike the seed: from the OS's random source.
        new_node_key: rand::random(),
        admit_new_nodes: args.admit_new_nodes.or(file.admit_new_nodes).unwrap_or(false),
        auth: keel_broker::AuthSettings {
            tokens_file: args.tokens_file.or(file.tokens_file),
            superusers: args
                .superusers
                .or(file.superusers)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.trim().trim_start_matches("User:").to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            produce_bytes_per_sec: file.quota_produce_bytes_per_sec,
            fetch_bytes_per_sec: file.quota_fetch_bytes_per_sec,
        },
    };
    let grace = Duration::from_millis(file.shutdown_grace_ms.unwrap_or(10_000));
    let tls = tls_files(
        args.tls_cert_file.or(file.tls_cert_file),
        args.tls_key_file.or(file.tls_key_file),
        args.tls_ca_file.or(file.tls_ca_file),
        args.insecure || file.insecure.unwrap_or(false),
    )?;
    let flush = match file.flush_scope.as_deref() {
        Some("node") => keel_raft::FlushScope::Node,
        None | Some("partition") => keel_raft::FlushScope::Partition,
        Some(other) => anyhow::bail!("flush_scope is `node` or `partition` (got {other:?})"),
    };
    Ok((config, Listen { client: listen, peer: peer_listen, metrics, tls }, grace, flush))
}

/// Binds `addr`; a port 0 in `advertised` (the default when the listen port is 0) becomes the
/// port bound.
async fn bind(addr: &str, what: &str, advertised: &mut String) -> anyhow::Result<tokio::net::TcpListener> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening for {what} on {addr}"))?;
    if let (Ok((host, 0)), Ok(bound)) = (split_addr(advertised), listener.local_addr()) {
        *advertised = format!("{host}:{}", bound.port());
    }
    Ok(listener)
}

/// Runs a node until Ctrl-C / SIGTERM, or until it must stop.
pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let (config, listen, grace, flush) = resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(serve(config, listen, grace, flush))
}

async fn serve(
    mut config: BrokerConfig,
    listen: Listen,
    grace: Duration,
    flush: keel_raft::FlushScope,
) -> anyhow::Result<()> {
    // Bound before the node starts, so that a taken port stops it before it joins the cluster.
    let listener = bind(&listen.client, "clients", &mut config.advertised_addr).await?;
    let unbound_peer = config.peer_addr.clone();
    let peer_listener = bind(&listen.peer, "peers (peer_listen)", &mut config.peer_addr).await?;
    if config.voters.get(&config.node_id) == Some(&unbound_peer) {
        // The default voter list (this node alone) names the port actually bound.
        config.voters.insert(config.node_id, config.peer_addr.clone());
    }
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (connector, acceptors) = match &listen.tls {
        Some(files) => {
            let (connector, acceptors) = tls_setup(files, config.node_id)?;
            (connector, Some(acceptors))
        }
        None => {
            warn!(
                "serving WITHOUT TLS (insecure): anyone who reaches the peer port can speak for a node; development only"
            );
            if config.auth.tokens_file.is_some() {
                warn!("client tokens travel in plaintext (insecure)");
            }
            (TcpConnector::default(), None)
        }
    };
    if let Some(tokens) = &config.auth.tokens_file {
        info!(tokens = %tokens.display(), superusers = ?config.auth.superusers, "clients must authenticate; ACLs apply");
    }
    let (client_tls, peer_tls) = match acceptors {
        Some((client, peer)) => (Some(client), Some(peer)),
        None => (None, None),
    };
    let (metrics, listen) = (listen.metrics, listen.client);
    let metrics_listener = match &metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for /metrics on {addr} (metrics_listen; `off` disables it)"))?,
        ),
        None => None,
    };
    let node_id = config.node_id;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let storage = keel_broker::StorageMode { flush, ..keel_broker::StorageMode::default() };
    let broker = Broker::start_with(config, storage, Arc::new(FileDisk::new()), Arc::new(connector), clock)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let routes = broker.router().map_err(|e| anyhow::anyhow!("{e}"))?;
    let peer = broker.peer_addr().to_owned();
    match metrics_listener {
        Some(metrics_listener) => {
            let addr = metrics_listener.local_addr().context("the metrics listener's address")?;
            broker.serve_metrics(metrics_listener);
            info!(node = node_id, %listen, %peer, metrics = %format!("http://{addr}/metrics"), "serving");
        }
        None => info!(node = node_id, %listen, %peer, "serving; metrics are off"),
    }
    // How long open requests may still run once the node stops: the grace period after a
    // signal, nothing after a fatal error (a node that cannot go on must not answer anything).
    let (stopping_tx, stopping) = tokio::sync::watch::channel(None::<Duration>);
    let mut fatal = broker.fatal();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                error!(error = %e, "cannot watch SIGTERM");
                None
            }
        };
        let sigterm = async {
            match &mut term {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        let allowed = tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!(?grace, "interrupted; stopping"); grace }
            _ = sigterm => { info!(?grace, "terminated; stopping"); grace }
            _ = fatal.wait_for(Option::is_some) => Duration::ZERO,
        };
        stopping_tx.send_replace(Some(allowed));
        // Keep the channel open so that the server and the deadline below see the value.
        std::future::pending::<()>().await;
    });
    let stop = {
        let mut stopping = stopping.clone();
        let broker = broker.clone();
        async move {
            let _ = stopping.wait_for(Option::is_some).await;
            // Subscribe streams end now (consumers move to other replicas): a graceful stop
            // would otherwise always wait out the grace period for them.
            broker.begin_shutdown();
        }
    };
    let deadline = {
        let mut stopping = stopping.clone();
        async move {
            let allowed = match stopping.wait_for(Option::is_some).await {
                Ok(allowed) => allowed.unwrap_or_default(),
                Err(_) => return std::future::pending::<()>().await,
            };
            tokio::time::sleep(allowed).await;
        }
    };
    let incoming = |listener: tokio::net::TcpListener, tls: Option<keel_broker::tls::TlsAcceptor>| {
        let broker = broker.clone();
        keel_broker::tls::incoming(listener, tls, move || broker.connection_opened())
    };
    // The peer listener stops with the client one: the same shutdown, shared.
    let stop = futures_util::FutureExt::shared(Box::pin(stop));
    let server =
        broker.server().add_routes(routes).serve_with_incoming_shutdown(incoming(listener, client_tls), stop.clone());
    let peer_server = broker.peer_server().serve_with_incoming_shutdown(incoming(peer_listener, peer_tls), stop);
    // A graceful stop waits for every open request, and a consumer's Subscribe stream never
    // ends by itself: past the grace period, dropping the server closes what is left.
    tokio::select! {
        served = async { tokio::try_join!(server, peer_server) } => { served.context("serving gRPC")?; }
        _ = deadline => warn!("requests still open after the grace period; closing their connections"),
    }
    broker.shutdown().await;
    if let Some(reason) = broker.fatal().borrow().clone() {
        bail!("node {node_id} stopped: {reason}");
    }
    Ok(())
}

/// TLS from a node's files: the connector it dials peers with (its certificate as client
/// identity), and the acceptors of its client listener (client certificates optional) and peer
/// listener (a node certificate required). The certificate must be this node's.
fn tls_setup(
    files: &TlsFiles,
    node_id: u64,
) -> anyhow::Result<(TcpConnector, (keel_broker::tls::TlsAcceptor, keel_broker::tls::TlsAcceptor))> {
    use keel_broker::tls::{ClientCerts, Principal, acceptor, principal_of};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (cert, key, ca) = (read(&files.cert)?, read(&files.key)?, read(&files.ca)?);
    let leaf = keel_broker::tls::first_cert_der(&cert)
        .with_context(|| format!("{}: no PEM certificate", files.cert.display()))?;
    match principal_of(&leaf) {
        Some(Principal::Node(id)) if id == node_id => {}
        other => bail!(
            "{} is not node {node_id}'s certificate (it names {other:?}; a node certificate carries the URI SAN \
             keel://node/{node_id}: `keel cert node --id {node_id}`)",
            files.cert.display()
        ),
    }
    let client = acceptor(&files.cert, &files.key, &files.ca, ClientCerts::Optional)?;
    let peer = acceptor(&files.cert, &files.key, &files.ca, ClientCerts::Required)?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key));
    info!(cert = %files.cert.display(), ca = %files.ca.display(), "TLS on both listeners; peers need a node certificate");
    Ok((TcpConnector { tls: Some(tls), ..TcpConnector::default() }, (client, peer)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests may panic: that is how they fail.

    use super::metrics_listen;

    /// The setting, the gRPC listen address, and what comes of them (`None`: refused).
    type Case = (Option<&'static str>, &'static str, Option<Option<&'static str>>);

    #[test]
    fn the_metrics_listener_defaults_beside_the_grpc_port() {
        let cases: [Case; 8] = [
            (None, "127.0.0.1:9092", Some(Some("127.0.0.1:9192"))),
            (None, "0.0.0.0:9092", Some(Some("0.0.0.0:9192"))),
            (None, "[::1]:9092", Some(Some("[::1]:9192"))),
            (None, "127.0.0.1:0", Some(Some("127.0.0.1:0"))),
            (Some("off"), "127.0.0.1:9092", Some(None)),
            (Some("10.0.0.1:9644"), "127.0.0.1:9092", Some(Some("10.0.0.1:9644"))),
            // Refused: no room above the gRPC port, and the gRPC address itself.
            (None, "127.0.0.1:65500", None),
            (Some("127.0.0.1:9092"), "127.0.0.1:9092", None),
        ];
        for (setting, listen, expected) in cases {
            let got = metrics_listen(setting.map(str::to_owned), listen).ok();
            assert_eq!(got, expected.map(|e| e.map(str::to_owned)), "{setting:?} beside {listen}");
        }
        assert!(metrics_listen(Some("nonsense".into()), "127.0.0.1:9092").is_err());
    }
}
