//! A node's settings and the identity its data directory remembers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_raft::{NetworkConfig, NodeId, RaftTimings};
use keel_storage::{Disk, LogConfig};
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// Limits the broker enforces on requests (checked before any allocation or write).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest fetch response, in bytes.
    pub fetch_bytes_max: usize,
    /// Longest a fetch may wait for records.
    pub fetch_wait_ms_max: u32,
    /// Most produce requests in flight on one ProduceStream.
    pub stream_in_flight_max: usize,
    /// Most bytes of produce requests in flight on one ProduceStream.
    pub stream_in_flight_bytes_max: usize,
    /// Most bytes of produce requests the whole node holds while they wait for their commit;
    /// beyond it produces are refused (RESOURCE_EXHAUSTED, retriable) rather than queued.
    pub in_flight_bytes_max: usize,
    /// Most concurrent HTTP/2 streams (requests) on one connection; more wait in the client.
    pub streams_per_connection_max: u32,
    /// Most Subscribe streams open on one connection; more are refused.
    pub subscribes_per_connection_max: usize,
    /// Most bytes of fetched records the node buffers for Subscribe streams whose clients have
    /// not taken them yet; subscriptions wait for room rather than fetch more.
    pub subscribe_buffer_bytes_max: usize,
    /// Most partitions (of every topic, internal ones included) in the cluster.
    pub partitions_max: usize,
    /// Most partition replicas one node hosts (each is a raft group and a preallocated segment).
    pub partitions_per_node_max: usize,
    /// Batches each partition remembers per idempotent producer: a retry of any of them is
    /// answered with its offsets. Clients keep at most this many batches in flight per partition.
    pub producer_window: usize,
    /// Idempotent producers each partition remembers; beyond it the least recently active is
    /// forgotten (its next batch gets UNKNOWN_PRODUCER_ID, never a duplicate).
    pub producers_per_partition_max: usize,
    /// A producer silent this long (by its batches' timestamps) is forgotten.
    pub producer_id_expiration_ms: i64,
    /// Per-partition metric series are exported only while the node hosts fewer partitions than
    /// this (per-topic aggregates always are): it bounds what one scrape costs Prometheus.
    pub metrics_partition_series_max: usize,
    /// Bytes per second a node sends, over all partitions, to replicas catching up after a
    /// move, a replace or a decommission (0: unthrottled). Production traffic is not counted.
    pub catch_up_bytes_per_sec: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fetch_bytes_max: 8 << 20,
            fetch_wait_ms_max: 30_000,
            stream_in_flight_max: 1_024,
            stream_in_flight_bytes_max: 64 << 20,
            in_flight_bytes_max: 512 << 20,
            // Above what one consumer needs for a partition per stream on a node, below what
            // lets one connection pin the node.
            streams_per_connection_max: 2_048,
            subscribes_per_connection_max: 1_024,
            subscribe_buffer_bytes_max: 256 << 20,
            partitions_max: 100_000,
            partitions_per_node_max: 4_096,
            producer_window: 16,
            producers_per_partition_max: 10_000,
            producer_id_expiration_ms: 24 * 3_600_000,
            metrics_partition_series_max: 1_000,
            catch_up_bytes_per_sec: keel_raft::throttle::CATCH_UP_BYTES_PER_SEC_DEFAULT,
        }
    }
}

impl Limits {
    /// Refuses limits that would make the node refuse everything or nothing.
    pub fn validate(&self, batch_bytes_max: usize) -> Result<(), BrokerError> {
        let positive = [
            ("fetch_bytes_max", self.fetch_bytes_max),
            ("stream_in_flight_max", self.stream_in_flight_max),
            ("streams_per_connection_max", self.streams_per_connection_max as usize),
            ("subscribes_per_connection_max", self.subscribes_per_connection_max),
            ("partitions_max", self.partitions_max),
            ("partitions_per_node_max", self.partitions_per_node_max),
            ("producers_per_partition_max", self.producers_per_partition_max),
        ];
        // Fewer than the client's pipeline would answer its legitimate retries with
        // DUPLICATE_SEQUENCE_NUMBER; more than a thousand costs memory per producer for nothing.
        if !(5..=1_000).contains(&self.producer_window) {
            return Err(BrokerError::Config(format!("producer_window {} is outside 5..=1000", self.producer_window)));
        }
        if self.producer_id_expiration_ms < 60_000 {
            return Err(BrokerError::Config(format!(
                "producer_id_expiration_ms {} is below one minute",
                self.producer_id_expiration_ms
            )));
        }
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(BrokerError::Config(format!("{name} must be at least 1")));
        }
        // A budget smaller than one batch would refuse that batch forever.
        let budgets = [
            ("stream_in_flight_bytes_max", self.stream_in_flight_bytes_max),
            ("in_flight_bytes_max", self.in_flight_bytes_max),
            ("subscribe_buffer_bytes_max", self.subscribe_buffer_bytes_max),
        ];
        if let Some((name, _)) = budgets.iter().find(|(_, v)| *v < batch_bytes_max) {
            return Err(BrokerError::Config(format!(
                "{name} must be at least the largest batch ({batch_bytes_max} bytes)"
            )));
        }
        if self.subscribe_buffer_bytes_max < self.fetch_bytes_max {
            return Err(BrokerError::Config("subscribe_buffer_bytes_max must be at least fetch_bytes_max".into()));
        }
        Ok(())
    }
}

/// Consumer-group settings: the shape of `__consumer_offsets` and the coordinators' bounds.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// Partitions of `__consumer_offsets`, fixed when the cluster creates it (a group's
    /// coordinator is partition `fnv1a_64(group) mod` this). Each is a raft group on
    /// min(3, voters) nodes that costs heartbeats even when idle: 8 spreads coordinators over up
    /// to 8 nodes for ~8% of what 100 idle partitions cost (README, "Idle cost").
    pub offsets_partitions: u32,
    /// Committed offsets of a group with no members expire this long after it became empty.
    pub offsets_retention_ms: i64,
    /// How often coordinators look for expired groups and whether to rewrite their partition.
    pub maintenance_interval: Duration,
    /// Rewrite a coordinator partition (latest record per key) and trim what precedes the
    /// rewrite once it holds this many more bytes than the last rewrite left.
    pub offsets_compact_bytes: u64,
    /// Bounds of what clients can make a coordinator hold.
    pub limits: keel_coordinator::groups::GroupLimits,
    /// Commits kept per (group, partition) for the consumer status, and how many such windows
    /// a coordinator partition keeps (README, "Consumer lag and status").
    pub lag_limits: keel_coordinator::groups::LagLimits,
    /// A consumer silent this long (and longer than its window took) with records waiting is
    /// STOP.
    pub lag_stop_ms: i64,
    /// Bounds of the retry and dead-letter state a group may hold.
    pub retry_limits: keel_coordinator::groups::RetryLimits,
    /// The retry policy of a nack that names none.
    pub retry_policy: keel_coordinator::groups::RetryPolicy,
}

impl Default for GroupSettings {
    fn default() -> GroupSettings {
        GroupSettings {
            offsets_partitions: 8,
            offsets_retention_ms: 7 * 24 * 3_600_000,
            maintenance_interval: Duration::from_secs(60),
            offsets_compact_bytes: 64 << 20,
            limits: keel_coordinator::groups::GroupLimits::default(),
            lag_limits: keel_coordinator::groups::LagLimits::default(),
            lag_stop_ms: 60_000,
            retry_limits: keel_coordinator::groups::RetryLimits::default(),
            retry_policy: keel_coordinator::groups::RetryPolicy::default(),
        }
    }
}

/// Delayed-message settings: the shape of `__delayed` and the timer coordinators' bounds.
#[derive(Debug, Clone, Copy)]
pub struct DelayedSettings {
    /// Partitions of `__delayed`, fixed when the cluster creates it (a target partition's timers
    /// live in partition `fnv1a_64(topic, partition) mod` this).
    pub partitions: u32,
    /// Bounds: the longest delay, pending timers per partition, record size, the horizon.
    pub limits: keel_coordinator::timers::TimerLimits,
    /// Rewrite a `__delayed` partition and trim below its lowest pending timer once it holds this
    /// many more bytes than the last rewrite left.
    pub compact_bytes: u64,
}

impl Default for DelayedSettings {
    fn default() -> DelayedSettings {
        DelayedSettings {
            partitions: 4,
            limits: keel_coordinator::timers::TimerLimits::default(),
            compact_bytes: 64 << 20,
        }
    }
}

/// Transactional-message settings: the shape of `__txn` and the transaction coordinators'
/// bounds and check-back timings.
#[derive(Debug, Clone, Copy)]
pub struct TxnSettings {
    /// Partitions of `__txn`, fixed when the cluster creates it (a producer group's transactions
    /// live in partition `fnv1a_64(group) mod` this).
    pub partitions: u32,
    /// Bounds, check-back timings and the expiry policy.
    pub limits: keel_coordinator::txn::TxnLimits,
    /// Rewrite a `__txn` partition once it holds this many more bytes than the last rewrite left
    /// (and at least twice the bytes of the transactions it holds, so rewrites stay amortised).
    pub compact_bytes: u64,
}

impl Default for TxnSettings {
    fn default() -> TxnSettings {
        TxnSettings { partitions: 4, limits: keel_coordinator::txn::TxnLimits::default(), compact_bytes: 64 << 20 }
    }
}

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// This node's id (unique in the cluster).
    pub node_id: NodeId,
    /// Where clients reach this node.
    pub advertised_addr: String,
    /// Where other nodes reach this node's peer listener (raft, Controller, NodeStatus and the
    /// calls nodes forward to each other), which is never the client address.
    pub peer_addr: String,
    /// Where its data lives.
    pub data_dir: PathBuf,
    /// The voters of the metadata group (`id → peer address`): the same on every node. A node
    /// whose id is among them hosts a replica of `__meta`; the others follow it from a voter.
    pub voters: BTreeMap<NodeId, String>,
    /// Raft timing of every group.
    pub timings: RaftTimings,
    /// Segment log defaults of every partition (topics may override retention).
    pub log: LogConfig,
    /// Raft network settings.
    pub network: NetworkConfig,
    /// How long a produce waits for its commit before answering DEADLINE_EXCEEDED.
    pub append_timeout: Duration,
    /// How often retention runs over the local partitions.
    pub retention_interval: Duration,
    /// Request limits.
    pub limits: Limits,
    /// Consumer groups.
    pub groups: GroupSettings,
    /// Delayed and scheduled messages.
    pub delayed: DelayedSettings,
    /// Transactional messages.
    pub txn: TxnSettings,
    /// Seed of this node's randomness (election timeouts, the cluster id it may coin).
    pub seed: u64,
    /// The key a new data dir gets (it proves the node's identity when it registers): from the
    /// OS's random source in `keel server`, from the seed in the simulation and tests.
    pub new_node_key: [u8; 32],
    /// Whether the controller registers node ids that are not metadata voters (brokers that
    /// only follow the metadata); off, an unknown id is refused.
    pub admit_new_nodes: bool,
    /// Client authentication and authorization.
    pub auth: AuthSettings,
}

/// Client authentication and authorization (README, "Security").
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// The tokens file (`NAME SHA256HEX` lines). Set, every client request needs a principal
    /// (a token or a client certificate) and ACLs decide what it may do; unset, clients are
    /// anonymous and unrestricted.
    pub tokens_file: Option<PathBuf>,
    /// Principal names (without `User:`) that pass every ACL check.
    pub superusers: std::collections::BTreeSet<String>,
    /// Bytes per second each authenticated principal may produce to this node (`None`: no quota).
    pub produce_bytes_per_sec: Option<u64>,
    /// Bytes per second each authenticated principal may fetch from this node.
    pub fetch_bytes_per_sec: Option<u64>,
}

impl BrokerConfig {
    /// Checks the settings that depend on each other.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.voters.is_empty() {
            return Err(BrokerError::Config("at least one metadata voter is needed".into()));
        }
        if self.node_id == keel_raft::NOBODY || self.voters.contains_key(&keel_raft::NOBODY) {
            return Err(BrokerError::Config(format!("node id {} is reserved", keel_raft::NOBODY)));
        }
        if self.advertised_addr.is_empty() || self.peer_addr.is_empty() {
            return Err(BrokerError::Config("the advertised client and peer addresses must not be empty".into()));
        }
        if self.advertised_addr == self.peer_addr {
            return Err(BrokerError::Config(format!(
                "the peer address {} is the client address: peers (raft, the controller) need a listener of \
                 their own",
                self.peer_addr
            )));
        }
        if let Some(addr) = self.voters.get(&self.node_id)
            && addr != &self.peer_addr
        {
            return Err(BrokerError::Config(format!(
                "node {} is a voter at {addr} but its peer address is {} (voters list peer addresses)",
                self.node_id, self.peer_addr
            )));
        }
        if self.groups.offsets_partitions == 0 || self.groups.offsets_partitions > 1_000 {
            return Err(BrokerError::Config("offsets_partitions must be 1 to 1000".into()));
        }
        if self.delayed.partitions == 0 || self.delayed.partitions > 1_000 {
            return Err(BrokerError::Config("delayed partitions must be 1 to 1000".into()));
        }
        if self.txn.partitions == 0 || self.txn.partitions > 1_000 {
            return Err(BrokerError::Config("txn partitions must be 1 to 1000".into()));
        }
        let t = &self.txn.limits;
        if t.check_backoff_ms < 1 || t.check_backoff_max_ms < t.check_backoff_ms || t.timeout_default_ms < 1 {
            return Err(BrokerError::Config(
                "txn check backoffs and the default timeout must be positive, the maximum backoff at least the first"
                    .into(),
            ));
        }
        if t.publish.publisher_idle_ms >= self.limits.producer_id_expiration_ms {
            return Err(BrokerError::Config(format!(
                "the txn publisher's idle rotation ({} ms) must be below producer_id_expiration_ms ({} ms)",
                t.publish.publisher_idle_ms, self.limits.producer_id_expiration_ms
            )));
        }
        if self.delayed.limits.delay_max_ms < 60_000 {
            return Err(BrokerError::Config("delay_max_ms must be at least one minute".into()));
        }
        if self.delayed.limits.publish.publisher_idle_ms >= self.limits.producer_id_expiration_ms {
            return Err(BrokerError::Config(format!(
                "the delayed publisher's idle rotation ({} ms) must be below producer_id_expiration_ms ({} ms)",
                self.delayed.limits.publish.publisher_idle_ms, self.limits.producer_id_expiration_ms
            )));
        }
        if self.groups.retry_limits.publisher_idle_ms >= self.limits.producer_id_expiration_ms {
            // A group's publisher must move to a new epoch before its target partitions could
            // have forgotten it, or its next dead letter is refused as UNKNOWN_PRODUCER_ID.
            return Err(BrokerError::Config(format!(
                "the dead-letter publisher's idle rotation ({} ms) must be below producer_id_expiration_ms ({} ms)",
                self.groups.retry_limits.publisher_idle_ms, self.limits.producer_id_expiration_ms
            )));
        }
        self.limits.validate(self.log.batch_bytes_max())
    }

    /// Whether this node votes in the metadata group.
    pub fn is_voter(&self) -> bool {
        self.voters.contains_key(&self.node_id)
    }
}

/// What a data directory remembers about whom it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node the directory belongs to.
    pub node_id: NodeId,
    /// The cluster, once known.
    pub cluster_id: Option<String>,
    /// The node's key, hex (absent in a directory from before keys: it gets one at its next
    /// start, and the metadata adopts it at the next registration).
    #[serde(default)]
    pub node_key: Option<String>,
    /// Where `__meta`'s copies were (peer addresses) when this node last saw them change: a
    /// restarted node that holds no copy looks for the metadata there as well as at the
    /// configured voters, which may no longer host it after a move.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta_hosts: BTreeMap<NodeId, String>,
}

const IDENTITY_FILE: &str = "keel.id";

impl Identity {
    /// Reads the directory's identity, or `None` for a new directory.
    pub fn load(disk: &dyn Disk, data_dir: &Path) -> Result<Option<Identity>, BrokerError> {
        let path = data_dir.join(IDENTITY_FILE);
        if !disk.exists(&path).map_err(BrokerError::Io)? {
            return Ok(None);
        }
        let bytes = keel_storage::read_whole(disk, &path).map_err(BrokerError::Io)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BrokerError::Config(format!("{} is unreadable: {e}", path.display())))
    }

    /// Writes the identity durably.
    pub fn store(&self, disk: &dyn Disk, data_dir: &Path) -> Result<(), BrokerError> {
        keel_storage::create_dir_durable(disk, data_dir).map_err(BrokerError::Io)?;
        let bytes = serde_json::to_vec(self).map_err(|e| BrokerError::Config(e.to_string()))?;
        keel_storage::write_atomic(disk, &data_dir.join(IDENTITY_FILE), &bytes).map_err(BrokerError::Io)
    }
}

/// Claims `data_dir` for `node_id`, refusing a directory that belongs to another node; a
/// directory without a key gets `new_key`. Returns the identity and whether the directory was
/// new.
pub fn claim_data_dir(
    disk: &dyn Disk,
    data_dir: &Path,
    node_id: NodeId,
    new_key: &[u8; 32],
) -> Result<(Identity, bool), BrokerError> {
    match Identity::load(disk, data_dir)? {
        Some(identity) if identity.node_id != node_id => Err(BrokerError::Config(format!(
            "data dir {} belongs to node {}, not node {node_id}; use that node id or another directory",
            data_dir.display(),
            identity.node_id
        ))),
        Some(identity) if identity.node_key.is_some() => Ok((identity, false)),
        Some(mut identity) => {
            identity.node_key = Some(hex(new_key));
            identity.store(disk, data_dir)?;
            Ok((identity, false))
        }
        None => {
            let identity =
                Identity { node_id, cluster_id: None, node_key: Some(hex(new_key)), meta_hosts: BTreeMap::new() };
            identity.store(disk, data_dir)?;
            Ok((identity, true))
        }
    }
}

impl Identity {
    /// The node key's bytes (empty when the directory has none or it is not hex).
    pub fn key_bytes(&self) -> Vec<u8> {
        self.node_key.as_deref().and_then(unhex).unwrap_or_default()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A node key drawn from `seed` (tests and the simulation, whose runs must replay).
pub fn node_key_from_seed(seed: u64) -> [u8; 32] {
    use rand::{RngCore as _, SeedableRng as _};
    let mut key = [0; 32];
    rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x6e6f_6465_6b65_7973).fill_bytes(&mut key);
    key
}

/// What the metadata keeps of a node key: its SHA-256, hex.
pub fn node_key_hash(key: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(key))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests may panic: that is how they fail.

    use super::*;
    use keel_storage::{CrashMode, SimDisk};

    /// A claimed data dir must survive power loss: its creation (and its parents') has to reach
    /// the parent directories durably, or the node comes back without its identity and data. A
    /// crash keeps a random prefix of each directory's unsynced changes, so a few seeds suffice.
    #[test]
    fn a_claimed_data_dir_survives_power_loss() {
        for seed in 0..32 {
            let disk = SimDisk::new(seed);
            let dir = Path::new("/var/keel/node-3");
            let (identity, new) = claim_data_dir(&disk, dir, 3, &[7; 32]).unwrap();
            assert!(new);
            disk.crash_with(CrashMode::DropUnflushed);
            assert_eq!(Identity::load(&disk, dir).unwrap(), Some(identity), "seed {seed}");
        }
    }

    /// A directory keeps its key across starts; one from before keys gets one, once.
    #[test]
    fn a_data_dir_keeps_its_node_key() {
        let disk = SimDisk::new(1);
        let dir = Path::new("/var/keel/node-3");
        let (first, _) = claim_data_dir(&disk, dir, 3, &[7; 32]).unwrap();
        assert_eq!(first.key_bytes(), vec![7; 32]);
        let (again, new) = claim_data_dir(&disk, dir, 3, &[9; 32]).unwrap();
        assert!(!new);
        assert_eq!(again.key_bytes(), vec![7; 32], "a restart must not change the key");
        // As a directory from before keys (and before `meta_hosts`) wrote it.
        keel_storage::write_atomic(&disk, &dir.join(IDENTITY_FILE), br#"{"node_id":3,"cluster_id":"c"}"#).unwrap();
        let (upgraded, _) = claim_data_dir(&disk, dir, 3, &[9; 32]).unwrap();
        assert_eq!(upgraded.key_bytes(), vec![9; 32]);
        assert_eq!(upgraded.cluster_id.as_deref(), Some("c"));
        assert!(upgraded.meta_hosts.is_empty());
        let moved = Identity { meta_hosts: BTreeMap::from([(4, "10.0.0.4:9100".to_owned())]), ..upgraded };
        moved.store(&disk, dir).unwrap();
        assert_eq!(Identity::load(&disk, dir).unwrap(), Some(moved), "where __meta lives survives a restart");
        assert_ne!(node_key_hash(&[7; 32]), node_key_hash(&[9; 32]));
        assert_eq!(node_key_hash(&[]).len(), 64);
    }

    #[test]
    fn producer_limits_that_would_misanswer_retries_are_refused() {
        let batch = 1 << 20;
        assert!(Limits::default().validate(batch).is_ok());
        for bad in [
            Limits { producer_window: 4, ..Limits::default() },
            Limits { producer_window: 1_001, ..Limits::default() },
            Limits { producers_per_partition_max: 0, ..Limits::default() },
            Limits { producer_id_expiration_ms: 59_999, ..Limits::default() },
        ] {
            assert!(bad.validate(batch).is_err(), "{bad:?}");
        }
    }
}
