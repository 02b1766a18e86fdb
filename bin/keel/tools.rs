//! The user tools: `keel topic …`, `keel produce`, `keel consume`, `keel cluster status` (the
//! consumer-group tools are in `group.rs`). Each finds the cluster through `--bootstrap` or
//! `KEEL_BOOTSTRAP` and speaks the public gRPC API through `keel-client`.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::Table;
use keel_client::{
    Admin, ClientConfig, Consumer, ConsumerConfig, ConsumerRecord, DeliverAt, Offset, OutboxConfig, Producer,
    ProducerConfig, ProducerRecord,
};
use serde_json::{Value, json};

use crate::Output;

/// Where the cluster is (shared by every client command).
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// Brokers to contact first: `HOST:PORT,HOST:PORT`. Defaults to the `keel dev` cluster.
    // Global, so that it may also follow a subcommand (`keel group describe G --bootstrap …`).
    #[arg(long, global = true, env = "KEEL_BOOTSTRAP", default_value = "127.0.0.1:9091,127.0.0.1:9092,127.0.0.1:9093")]
    pub bootstrap: String,
    /// The CA the brokers' certificates chain to (PEM): set, the client speaks TLS (`keel dev`
    /// prints it).
    #[arg(long, global = true, env = "KEEL_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate to present (PEM); its common name is the principal.
    #[arg(long, global = true, env = "KEEL_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The key of --cert-file (PEM).
    #[arg(long, global = true, env = "KEEL_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// A bearer token (`keel token create`; `keel dev` prints one).
    #[arg(long, global = true, env = "KEEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Connection {
    /// The client settings for this cluster.
    pub fn config(&self) -> anyhow::Result<ClientConfig> {
        let config = ClientConfig::from_bootstrap(&self.bootstrap)?.with_seed(crate::clock::entropy());
        let config = match self.tls()? {
            Some(tls) => config.with_tls(&tls),
            None => config,
        };
        Ok(match &self.token {
            Some(token) => config.with_token(token.trim()),
            None => config,
        })
    }

    /// The TLS settings, if a CA file is given.
    pub fn tls(&self) -> anyhow::Result<Option<keel_client::Tls>> {
        match &self.ca_file {
            Some(ca) => {
                Ok(Some(keel_client::Tls::from_files(ca, self.cert_file.as_deref(), self.key_file.as_deref())?))
            }
            None if self.cert_file.is_some() => anyhow::bail!("--cert-file needs --ca-file (KEEL_CA_FILE)"),
            None => Ok(None),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions.
        #[arg(short, long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition, odd (default: 3, or 1 on a cluster of fewer than 3 nodes).
        #[arg(short, long, default_value_t = 0)]
        replicas: u32,
        /// Delete whole segments older than this (0 = keep forever).
        #[arg(long, default_value_t = 0)]
        retention_ms: i64,
        /// Delete whole segments beyond this many bytes per partition (0 = no limit).
        #[arg(long, default_value_t = 0)]
        retention_bytes: u64,
        /// Largest batch accepted, in bytes (0 = the cluster's limit).
        #[arg(long, default_value_t = 0)]
        max_batch_bytes: u32,
    },
    /// List topics.
    List,
    /// Show a topic's partitions: leaders, replicas, in-sync replicas, offsets.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
    /// Add partitions to a topic (safe to repeat with --total: it names the result).
    AddPartitions {
        name: String,
        /// The number of partitions the topic should have; running the command again changes
        /// nothing.
        #[arg(long, required_unless_present = "count", conflicts_with = "count")]
        total: Option<u32>,
        /// How many partitions to add to what the topic has when the command starts (the
        /// command's own retries still cannot add them twice).
        #[arg(long)]
        count: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, controller, leaderless and under-replicated partitions. Exits 1 when unhealthy.
    Status,
    /// Spread replicas, then preferred leaders, evenly over the active nodes: shows the plan,
    /// then moves partitions a few at a time (`--dry-run` to only look), each new replica's
    /// catch-up paced by the nodes' `catch_up_bytes_per_sec`.
    Rebalance(crate::rebalance::RebalanceArgs),
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The topic.
    topic: String,
    /// Split each line at the first occurrence of this into key and value.
    #[arg(long)]
    key_separator: Option<String>,
    /// Send every record to this partition (default: by key, or spread).
    #[arg(long)]
    partition: Option<u32>,
    /// Deliver the records this long after the broker receives them (`30s`, `5m`, `2h 30m`,
    /// `7days`): each line prints its timer id instead of an offset.
    #[arg(long, value_parser = parse_delay, conflicts_with = "at")]
    delay: Option<std::time::Duration>,
    /// Deliver the records at this time (RFC 3339, e.g. `2026-12-24T18:00:00Z`).
    #[arg(long, value_parser = parse_at)]
    at: Option<i64>,
    /// Write each record to a durable outbox in this directory before sending it (flushed;
    /// printed as `appended line N`): a producer killed at any point and started again with
    /// the same directory stores every appended record exactly once. A restart sends what the
    /// outbox holds, then what stdin brings, and exits once the outbox is empty.
    #[arg(long, conflicts_with_all = ["delay", "at"])]
    outbox: Option<std::path::PathBuf>,
}

impl ProduceArgs {
    /// The record a line of stdin stands for: split at the key separator, to the partition asked.
    fn record(&self, line: &str) -> ProducerRecord {
        let (key, value) = match self.key_separator.as_deref().and_then(|sep| line.split_once(sep)) {
            Some((k, v)) => (Some(k), v),
            None => (None, line),
        };
        let mut record = ProducerRecord::new(Bytes::from(value.to_owned()));
        if let Some(k) = key {
            record = record.with_key(Bytes::from(k.to_owned()));
        }
        if let Some(p) = self.partition {
            record = record.with_partition(p);
        }
        record
    }
}

fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 2h ({e})"))
}

fn parse_at(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-12-24T18:00:00Z ({e})"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per record.
    Json,
    /// The value only, one per line.
    Value,
}

/// Delayed produce: each line is scheduled (one request per line, retried safely), and its timer
/// id printed once the schedule is acknowledged.
async fn produce_delayed(
    args: ProduceArgs,
    config: keel_client::ClientConfig,
    when: DeliverAt,
    output: Output,
) -> anyhow::Result<()> {
    let producer = Producer::new(config, ProducerConfig::default())?;
    let mut failed = 0u64;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let record = args.record(&line.context("reading stdin")?);
        match producer.send_delayed(&args.topic, vec![record], when).await {
            Ok(ids) => {
                let id = ids.first().cloned().unwrap_or_default();
                match output {
                    Output::Json => println!("{}", json!({"line": i + 1, "topic": args.topic, "timer_id": id})),
                    Output::Text => println!("line {}: scheduled as timer {id}", i + 1),
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("line {}: not scheduled: {e}", i + 1);
            }
        }
    }
    producer.close().await;
    if failed > 0 {
        bail!("{failed} records were not scheduled");
    }
    Ok(())
}

/// Cancels delayed records by their timer ids; fails if any could not be cancelled.
pub fn cancel_delayed(ids: Vec<String>, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let config = connection.config()?;
    runtime()?.block_on(async move {
        let producer = Producer::new(config, ProducerConfig::default())?;
        let mut failed = 0u64;
        for id in ids {
            match producer.cancel_delayed(&id).await {
                Ok(due) => match output {
                    Output::Json => println!("{}", json!({"timer_id": id, "cancelled": true, "deliver_at_ms": due})),
                    Output::Text => println!("timer {id} cancelled (it was due at {})", crate::group::iso(due)),
                },
                Err(e) => {
                    failed += 1;
                    match output {
                        Output::Json => {
                            println!("{}", json!({"timer_id": id, "cancelled": false, "error": e.to_string()}))
                        }
                        Output::Text => eprintln!("timer {id}: not cancelled: {e}"),
                    }
                }
            }
        }
        producer.close().await;
        if failed > 0 {
            bail!("{failed} timers were not cancelled");
        }
        Ok(())
    })
}

/// Where a group member starts partitions the group never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoOffsetReset {
    /// The first offset still in the log.
    Earliest,
    /// The end of the log: only records produced from now on.
    Latest,
    /// Stop with an error naming the partition.
    Error,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic.
    pub(crate) topic: String,
    /// Where to start: `beginning`, `end`, or an offset.
    #[arg(long, default_value = "beginning")]
    pub(crate) from: String,
    /// Stop after this many records (default: run until interrupted).
    #[arg(short = 'n', long)]
    pub(crate) count: Option<u64>,
    /// Read only this partition (default: all).
    #[arg(long)]
    pub(crate) partition: Option<u32>,
    /// How to print records.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub(crate) format: Format,
    /// Consume as a member of this consumer group: the group's members share the partitions,
    /// each partition starts at the group's committed offset, and the offsets of the records
    /// printed are committed after each batch is printed (at-least-once).
    #[arg(long, conflicts_with_all = ["from", "partition"])]
    pub(crate) group: Option<String>,
    /// Static membership: a stable id for this consumer instance; a restart within the session
    /// timeout gets its partitions back without a rebalance.
    #[arg(long, requires = "group")]
    pub(crate) instance_id: Option<String>,
    /// The group removes this member when it has not heard from it for this long
    /// [default: 10000; the cluster bounds it, 1000 to 300000 by default].
    #[arg(long, requires = "group")]
    pub(crate) session_timeout_ms: Option<u32>,
    /// Where partitions the group never committed start [default: earliest].
    #[arg(long, value_enum, requires = "group")]
    pub(crate) auto_offset_reset: Option<AutoOffsetReset>,
    /// Shown by `keel group describe` [default: keel-cli].
    #[arg(long, requires = "group")]
    pub(crate) client_id: Option<String>,
    /// For demos of retry and dead letter: fail (nack) every record whose value contains this
    /// text instead of printing it; the group hands it back after a backoff, and after
    /// --max-attempts publishes it to `<group>.dlq` (`keel dlq inspect GROUP`).
    #[arg(long, requires = "group")]
    pub(crate) nack_on: Option<String>,
    /// With --nack-on: the failure is not retryable (dead-lettered at once).
    #[arg(long, requires = "nack_on")]
    pub(crate) nack_fatal: bool,
    /// Attempts of a failing record before it is dead-lettered.
    #[arg(long, default_value_t = 5, requires = "group")]
    pub(crate) max_attempts: u32,
    /// Backoff before the second attempt, doubled for each further one up to 60 s.
    #[arg(long, default_value_t = 1_000, requires = "group")]
    pub(crate) backoff_ms: u32,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")
}

pub(crate) fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t
}

pub(crate) fn ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn topic_json(t: &keel_client::TopicDescription) -> Value {
    let config = t.config.unwrap_or_default();
    json!({
        "name": t.name,
        "replication_factor": t.replication_factor,
        "config": {
            "retention_ms": config.retention_ms,
            "retention_bytes": config.retention_bytes,
            "max_batch_bytes": config.max_batch_bytes,
        },
        "partitions": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader": p.leader_id,
            "leader_addr": p.leader_addr,
            "replicas": p.replicas,
            "in_sync": p.in_sync,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
        })).collect::<Vec<_>>(),
    })
}

fn print_partitions(t: &keel_client::TopicDescription) {
    let mut table = table();
    table.set_header(["partition", "leader", "replicas", "in-sync", "log start", "high watermark"]);
    for p in &t.partitions {
        table.add_row([
            p.partition.to_string(),
            p.leader_id.map_or("none".into(), |l| l.to_string()),
            ids(&p.replicas),
            ids(&p.in_sync),
            p.log_start_offset.to_string(),
            p.high_watermark.to_string(),
        ]);
    }
    println!("{table}");
}

pub fn topic(command: TopicCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let admin = Admin::new(connection.config()?)?;
    runtime()?.block_on(async move {
        match command {
            TopicCommand::Create { name, partitions, replicas, retention_ms, retention_bytes, max_batch_bytes } => {
                let config = keel_client::TopicConfig { retention_ms, retention_bytes, max_batch_bytes };
                let t = admin.create_topic(&name, partitions, replicas, config).await?;
                match output {
                    Output::Json => println!("{}", topic_json(&t)),
                    Output::Text => println!(
                        "created topic {} ({} partitions, {} replicas each)",
                        t.name,
                        t.partitions.len(),
                        t.replication_factor
                    ),
                }
            }
            TopicCommand::List => {
                let topics = admin.list_topics().await?;
                match output {
                    Output::Json => println!("{}", Value::Array(topics.iter().map(topic_json).collect())),
                    Output::Text => {
                        let mut table = table();
                        table.set_header(["topic", "partitions", "replicas", "leaderless", "under-replicated"]);
                        for t in &topics {
                            let leaderless = t.partitions.iter().filter(|p| p.leader_id.is_none()).count();
                            let under = t
                                .partitions
                                .iter()
                                .filter(|p| p.leader_id.is_some() && p.in_sync.len() < p.replicas.len())
                                .count();
                            table.add_row([
                                t.name.clone(),
                                t.partitions.len().to_string(),
                                t.replication_factor.to_string(),
                                leaderless.to_string(),
                                under.to_string(),
                            ]);
                        }
                        println!("{table}");
                    }
                }
            }
            TopicCommand::Describe { name } => {
                let t = admin.describe_topic(&name).await?;
                match output {
                    Output::Json => println!("{}", topic_json(&t)),
                    Output::Text => {
                        let c = t.config.unwrap_or_default();
                        println!(
                            "topic {}: {} partitions, {} replicas each, retention_ms {}, retention_bytes {}",
                            t.name,
                            t.partitions.len(),
                            t.replication_factor,
                            c.retention_ms,
                            c.retention_bytes
                        );
                        print_partitions(&t);
                    }
                }
            }
            TopicCommand::Delete { name } => {
                admin.delete_topic(&name).await?;
                match output {
                    Output::Json => println!("{}", json!({ "deleted": name })),
                    Output::Text => println!("deleted topic {name}"),
                }
            }
            TopicCommand::AddPartitions { name, total, count } => {
                let total = match (total, count) {
                    (Some(total), _) => total,
                    (None, Some(count)) => {
                        let now = admin.describe_topic(&name).await?.partitions.len() as u32;
                        now.checked_add(count).context("too many partitions")?
                    }
                    (None, None) => bail!("give --total or --count"),
                };
                let t = admin.increase_partitions(&name, total).await?;
                match output {
                    Output::Json => println!("{}", topic_json(&t)),
                    Output::Text => println!("topic {} now has {} partitions", t.name, t.partitions.len()),
                }
            }
        }
        Ok(())
    })
}

/// `keel cluster status`: returns whether the cluster is healthy.
pub fn cluster(command: ClusterCommand, connection: &Connection, output: Output) -> anyhow::Result<bool> {
    if let ClusterCommand::Rebalance(args) = command {
        return crate::rebalance::run(args, connection, output).map(|()| true);
    }
    let admin = Admin::new(connection.config()?)?;
    let runtime = runtime()?;
    let view = runtime.block_on(admin.describe_cluster())?;
    // The metadata voters are not among the topics; a change of them (`keel partition move
    // __meta/0`) is a move like any other. Best effort: a caller not allowed to describe
    // `__meta` still gets the rest.
    let voters = runtime.block_on(admin.describe_topic(keel_broker::META_TOPIC)).ok();
    // A decommissioned node that holds nothing any more is retired: stopping it is the point.
    let holds = |id: u64| {
        view.topics.iter().flat_map(|t| &t.partitions).any(|p| p.replicas.contains(&id) || p.moving_to.contains(&id))
    };
    let retired = |n: &keel_proto::v1::NodeDescription| n.decommissioned && !n.controller_voter && !holds(n.node_id);
    let unreachable: Vec<u64> = view.nodes.iter().filter(|n| !n.reachable && !retired(n)).map(|n| n.node_id).collect();
    let partitions: usize = view.topics.iter().map(|t| t.partitions.len()).sum();
    let moving: Vec<(&str, &keel_proto::v1::PartitionDescription)> = view
        .topics
        .iter()
        .chain(voters.iter())
        .flat_map(|t| t.partitions.iter().filter(|p| !p.moving_to.is_empty()).map(|p| (t.name.as_str(), p)))
        .collect();
    let mut problems = Vec::new();
    if view.controller_leader.is_none() {
        problems.push("the metadata controller has no leader".to_owned());
    }
    if !unreachable.is_empty() {
        problems.push(format!("unreachable nodes: {}", ids(&unreachable)));
    }
    if view.leaderless > 0 {
        problems.push(format!("{} partitions have no leader", view.leaderless));
    }
    if view.under_replicated > 0 {
        problems.push(format!("{} partitions are under-replicated", view.under_replicated));
    }
    let healthy = problems.is_empty();
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "cluster_id": view.cluster_id,
                "healthy": healthy,
                "problems": problems,
                "controller_leader": view.controller_leader,
                "nodes": view.nodes.iter().map(|n| json!({
                    "node_id": n.node_id, "addr": n.addr, "voter": n.controller_voter, "reachable": n.reachable,
                    "decommissioned": n.decommissioned, "retired": retired(n),
                })).collect::<Vec<_>>(),
                "topics": view.topics.len(),
                "partitions": partitions,
                "leaderless": view.leaderless,
                "under_replicated": view.under_replicated,
                "moves": moving.iter().map(|(topic, p)| json!({
                    "topic": topic, "partition": p.partition, "replicas": p.replicas,
                    "moving_to": p.moving_to, "in_sync": p.in_sync, "leader": p.leader_id,
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            println!("cluster {}", view.cluster_id);
            let mut table = table();
            table.set_header(["node", "address", "controller", "reachable", "state"]);
            for n in &view.nodes {
                let role = match (n.controller_voter, view.controller_leader == Some(n.node_id)) {
                    (_, true) => "leader",
                    (true, false) => "voter",
                    (false, false) => "-",
                };
                table.add_row([
                    n.node_id.to_string(),
                    n.addr.clone(),
                    role.to_owned(),
                    if n.reachable { "yes" } else { "NO" }.to_owned(),
                    // Retired: emptied, so it may be stopped (its id stays taken).
                    match (n.decommissioned, retired(n)) {
                        (true, true) => "retired",
                        (true, false) => "decommissioning",
                        (false, _) => "active",
                    }
                    .to_owned(),
                ]);
            }
            println!("{table}");
            println!(
                "{} topics, {partitions} partitions, {} leaderless, {} under-replicated",
                view.topics.len(),
                view.leaderless,
                view.under_replicated
            );
            if !moving.is_empty() {
                let mut moves = crate::tools::table();
                moves.set_header(["moving", "from", "to", "in sync", "leader"]);
                for (topic, p) in &moving {
                    moves.add_row([
                        format!("{topic}/{}", p.partition),
                        ids(&p.replicas),
                        ids(&p.moving_to),
                        ids(&p.in_sync),
                        p.leader_id.map_or("-".to_owned(), |l| l.to_string()),
                    ]);
                }
                println!("{moves}");
            }
            if healthy {
                println!("healthy");
            } else {
                for p in &problems {
                    println!("UNHEALTHY: {p}");
                }
            }
        }
    }
    Ok(healthy)
}

pub fn produce(args: ProduceArgs, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let config = connection.config()?;
    let when = match (args.delay, args.at) {
        (Some(d), _) => Some(DeliverAt::After(d)),
        (None, Some(at)) => Some(DeliverAt::AtMs(at)),
        (None, None) => None,
    };
    if let Some(when) = when {
        return runtime()?.block_on(produce_delayed(args, config, when, output));
    }
    runtime()?.block_on(async move {
        let producer = match &args.outbox {
            Some(dir) => Producer::with_outbox(config, ProducerConfig::default(), OutboxConfig::new(dir)).await?,
            None => Producer::new(config, ProducerConfig::default())?,
        };
        // Acknowledgements are printed in input order by a second task, so reading stdin never
        // waits for the cluster (records are batched and pipelined).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, keel_client::DeliveryFuture)>(10_000);
        let printer = tokio::spawn(async move {
            let mut failed = 0u64;
            let stdout = std::io::stdout();
            while let Some((line, delivery)) = rx.recv().await {
                match delivery.await {
                    Ok(m) => {
                        let mut stdout = stdout.lock();
                        let _ = match output {
                            Output::Json => writeln!(
                                stdout,
                                "{}",
                                json!({"line": line, "topic": m.topic, "partition": m.partition, "offset": m.offset})
                            ),
                            Output::Text => writeln!(stdout, "partition {} offset {}", m.partition, m.offset),
                        };
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("line {line}: not acknowledged: {e}");
                    }
                }
            }
            failed
        });
        let stdin = std::io::stdin();
        for (i, line) in stdin.lock().lines().enumerate() {
            let record = args.record(&line.context("reading stdin")?);
            let delivery = producer.send(&args.topic, record).await?;
            if args.outbox.is_some() {
                // Durable now: the line is owed exactly once, whatever happens to this process.
                let mut stdout = std::io::stdout().lock();
                let _ = match output {
                    Output::Json => writeln!(stdout, "{}", json!({"line": i as u64 + 1, "appended": true})),
                    Output::Text => writeln!(stdout, "appended line {}", i as u64 + 1),
                };
                let _ = stdout.flush();
            }
            if tx.send((i as u64 + 1, delivery)).await.is_err() {
                break;
            }
        }
        drop(tx);
        producer.flush().await;
        let failed = printer.await.context("the printer task failed")?;
        if args.outbox.is_some() {
            // What an earlier run left in the outbox has no line here: wait until it is stored.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while producer.outbox_stats().is_some_and(|s| s.records > 0) {
                if tokio::time::Instant::now() > deadline {
                    bail!("the outbox still holds records: {:?}", producer.outbox_stats());
                }
                if let Some(parked) = producer.outbox_parked().first() {
                    bail!("an outbox batch is parked: {parked:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        producer.close().await;
        if failed > 0 {
            bail!("{failed} records were not acknowledged");
        }
        Ok(())
    })
}

fn bytes_json(b: &Option<Bytes>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
        },
    }
}

/// Writes one record as `--format` says.
pub(crate) fn print_record(out: &mut impl Write, format: Format, r: &ConsumerRecord) -> std::io::Result<()> {
    match format {
        Format::Json => {
            let headers: Vec<Value> =
                r.headers.iter().map(|(k, v)| json!({"key": k, "value": bytes_json(v)})).collect();
            let line = json!({
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "key": bytes_json(&r.key),
                "value": bytes_json(&r.value),
                "timestamp": r.timestamp_ms,
                "headers": headers,
                "attempt": r.attempt,
            });
            writeln!(out, "{line}")
        }
        Format::Value => {
            out.write_all(r.value.as_deref().unwrap_or_default())?;
            out.write_all(b"\n")
        }
    }
}

pub fn consume(args: ConsumeArgs, connection: &Connection) -> anyhow::Result<()> {
    if let Some(group) = args.group.clone() {
        return crate::group::consume(args, &group, connection);
    }
    let from = match args.from.as_str() {
        "beginning" => Offset::Beginning,
        "end" => Offset::End,
        n => Offset::At(n.parse().with_context(|| format!("--from {n:?}: expected beginning, end or an offset"))?),
    };
    let config = ConsumerConfig { offset_default: from, ..ConsumerConfig::default() };
    let client = connection.config()?;
    runtime()?.block_on(async move {
        let mut consumer = Consumer::new(client, config)?;
        let partitions: Vec<u32> = args.partition.into_iter().collect();
        consumer.assign(&args.topic, &partitions).await?;
        let mut printed = 0u64;
        let mut stdout = std::io::stdout().lock();
        loop {
            if args.count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
            let records = tokio::select! {
                r = consumer.poll(Duration::from_millis(500)) => r?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            for r in records {
                if args.count.is_some_and(|n| printed >= n) {
                    break;
                }
                print_record(&mut stdout, args.format, &r)?;
                printed += 1;
            }
            stdout.flush()?;
        }
    })
}
