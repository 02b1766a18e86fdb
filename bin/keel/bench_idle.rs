//! `keel bench idle`: what partitions cost a cluster while nothing is written to them. Samples
//! the nodes' processes (CPU, memory, open files, threads, from `/proc`) with no topic of its
//! own, creates one with many partitions, times until they all have a leader, samples again,
//! and deletes the topic. Raft heartbeats, timers and open segments are the cost that grows
//! with partitions even when no client is connected.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::{Admin, ClientError, TopicConfig};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;
use crate::dev_control::{self, Reply, Request, State};
use crate::procstat::{self, Sample};
use crate::tools::{Connection, table};

/// How often the topic is described while its partitions elect leaders.
const POLL: Duration = Duration::from_millis(100);
/// Most node processes sampled (`keel dev` runs up to 9).
const NODES_MAX: usize = 64;
/// Most partitions asked for: the bench measures the cluster, not whether it survives a topic
/// far beyond what it was sized for.
const PARTITIONS_MAX: u32 = 100_000;

#[derive(Debug, Args)]
pub struct IdleBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// A node process to sample (repeat for each node). Default: ask the `keel dev` running on
    /// --dev-dir for its nodes.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// The --dir of the running `keel dev` whose nodes are sampled [default: keel-dev].
    #[arg(long, value_name = "DIR", conflicts_with = "pids")]
    dev_dir: Option<PathBuf>,
    /// The topic created for the measurement (it must not exist) and deleted afterwards.
    #[arg(long, default_value = "keel-bench-idle")]
    topic: String,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 1000)]
    partitions: u32,
    /// Replicas per partition.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Seconds of each sampling window (before the topic, and with it).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds between every partition having a leader and the second window.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Give up if the partitions do not all have a leader after this many seconds.
    #[arg(long, default_value_t = 120)]
    create_timeout_secs: u64,
    /// Leave the topic behind instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// A node process to sample, and how the report names it.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    node_id: Option<u64>,
    pid: u32,
}

/// One node's figures over one window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Figures {
    /// Percent of one core, averaged over the window.
    cpu_percent: f64,
    /// At the end of the window.
    rss_bytes: u64,
    open_files: u64,
    threads: u64,
}

impl Figures {
    fn add(&mut self, other: &Figures) {
        self.cpu_percent += other.cpu_percent;
        self.rss_bytes += other.rss_bytes;
        self.open_files += other.open_files;
        self.threads += other.threads;
    }
}

#[derive(Debug, Serialize)]
struct NodeReport {
    node: String,
    node_id: Option<u64>,
    pid: u32,
    baseline: Figures,
    idle: Figures,
}

#[derive(Debug, Serialize)]
struct IdleReport {
    what: &'static str,
    topic: String,
    partitions: u32,
    replicas: u32,
    duration_s: u64,
    settle_s: u64,
    /// From the create call until every partition had a leader.
    leaders_ms: u64,
    /// From the create call until every partition had all its replicas in sync; `None` if that
    /// did not happen within --create-timeout-secs.
    all_in_sync_ms: Option<u64>,
    /// Partitions with all replicas in sync when the wait ended.
    in_sync_partitions: u32,
    nodes: Vec<NodeReport>,
    /// Sums over the nodes (`cpu_percent` is then a percent of one core for the whole cluster).
    total: Totals,
    deleted: bool,
}

#[derive(Debug, Serialize)]
struct Totals {
    baseline: Figures,
    idle: Figures,
}

/// What the creation wait saw.
#[derive(Debug)]
struct Creation {
    leaders_ms: u64,
    all_in_sync_ms: Option<u64>,
    in_sync_partitions: u32,
}

pub fn idle(args: IdleBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.partitions == 0 || args.partitions > PARTITIONS_MAX {
        bail!("--partitions must be within 1..={PARTITIONS_MAX}");
    }
    if args.duration == 0 {
        bail!("--duration must be at least 1");
    }
    let ticks_per_sec = procstat::clock_ticks_per_sec()?;
    let client = args.connection.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let nodes = nodes(&args).await?;
        // A wrong --pid is reported before the cluster is asked anything.
        for n in &nodes {
            procstat::sample(n.pid).with_context(|| format!("sampling node {}", n.name))?;
        }
        let admin = Admin::new(client)?;
        match admin.describe_topic(&args.topic).await {
            Ok(_) => bail!(
                "topic {} exists already: delete it (`keel topic delete {}`) or pick another name with --topic",
                args.topic,
                args.topic
            ),
            Err(ClientError::NotFound(_)) => {}
            Err(e) => return Err(e).with_context(|| format!("looking for topic {}", args.topic)),
        }
        let show = output == Output::Text;
        let baseline = window(&nodes, args.duration, ticks_per_sec, "baseline", show).await?;

        let clock = Stopwatch::start();
        match admin.create_topic(&args.topic, args.partitions, args.replicas, TopicConfig::default()).await {
            Ok(_) => {}
            // It did not exist a moment ago: most likely the client retried this very create
            // after its first answer was lost, so the topic is this run's.
            Err(ClientError::AlreadyExists(_)) => {
                eprintln!("note: creating {} answered \"already exists\"; taking it as this run's topic", args.topic)
            }
            Err(e) => return Err(e).with_context(|| format!("creating topic {}", args.topic)),
        }
        // From here on the topic is this run's: it is deleted whatever happens next (unless
        // --keep), so a failed run does not leave thousands of partitions on the cluster.
        let measured = async {
            let creation = wait_for_leaders(&admin, &args, clock, show).await?;
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            let idle = window(&nodes, args.duration, ticks_per_sec, "idle", show).await?;
            anyhow::Ok((creation, idle))
        }
        .await;
        let deleted = match args.keep {
            true => Ok(false),
            false => admin.delete_topic(&args.topic).await.map(|()| true),
        };
        let (creation, idle) = match (measured, deleted.as_ref()) {
            (Ok(figures), _) => figures,
            (Err(e), Ok(_)) => return Err(e),
            (Err(e), Err(delete)) => {
                return Err(e.context(format!(
                    "and deleting topic {} failed too ({delete}): delete it with `keel topic delete {}`",
                    args.topic, args.topic
                )));
            }
        };
        let mut total = Totals { baseline: Figures::default(), idle: Figures::default() };
        let nodes: Vec<NodeReport> = nodes
            .iter()
            .map(|n| {
                let (baseline, idle) = (baseline[&n.pid], idle[&n.pid]);
                total.baseline.add(&baseline);
                total.idle.add(&idle);
                NodeReport { node: n.name.clone(), node_id: n.node_id, pid: n.pid, baseline, idle }
            })
            .collect();
        let report = IdleReport {
            what: "idle",
            topic: args.topic.clone(),
            partitions: args.partitions,
            replicas: args.replicas,
            duration_s: args.duration,
            settle_s: args.settle_secs,
            leaders_ms: creation.leaders_ms,
            all_in_sync_ms: creation.all_in_sync_ms,
            in_sync_partitions: creation.in_sync_partitions,
            nodes,
            total,
            deleted: *deleted.as_ref().unwrap_or(&false),
        };
        print(&report, output)?;
        // The figures are printed either way; a topic left behind still fails the run.
        deleted.with_context(|| {
            format!("deleting topic {}: delete it with `keel topic delete {}`", args.topic, args.topic)
        })?;
        Ok(())
    })
}

/// The processes to sample: --pid, or the nodes of the `keel dev` on --dev-dir.
async fn nodes(args: &IdleBenchArgs) -> anyhow::Result<Vec<Node>> {
    if !args.pids.is_empty() {
        let mut pids = args.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        if pids.len() > NODES_MAX {
            bail!("at most {NODES_MAX} processes with --pid");
        }
        return Ok(pids.into_iter().map(|pid| Node { name: format!("pid {pid}"), node_id: None, pid }).collect());
    }
    let dir = args.dev_dir.clone().unwrap_or_else(|| PathBuf::from(dev_control::DIR_DEFAULT));
    let reply = dev_control::call(&dir, &Request::Status, Duration::ZERO, |_| {}).await.with_context(|| {
        format!(
            "finding the node processes to sample: pass --pid PID for each node, or --dev-dir DIR of a running \
             `keel dev` (asked {})",
            dir.display()
        )
    })?;
    let Reply::Nodes(status) = reply else { bail!("the `keel dev` supervisor answered {reply:?} to a status request") };
    if status.is_empty() {
        bail!("the `keel dev` on {} has no nodes", dir.display());
    }
    if status.len() > NODES_MAX {
        bail!("the `keel dev` on {} lists {} nodes; at most {NODES_MAX} are sampled", dir.display(), status.len());
    }
    let mut nodes = Vec::new();
    for n in status {
        // A stopped or dead node would show as a cheap one: the figures would be wrong, not low.
        if n.state != State::Running || n.restarting {
            bail!(
                "node {} (pid {}) of the `keel dev` on {} is not running ({:?}{}): bring it back first",
                n.node_id,
                n.pid,
                dir.display(),
                n.state,
                if n.restarting { ", restarting" } else { "" }
            );
        }
        nodes.push(Node { name: n.node_id.to_string(), node_id: Some(n.node_id), pid: n.pid });
    }
    Ok(nodes)
}

/// Samples every node at the start and at the end of `seconds`; CPU is the average between.
async fn window(
    nodes: &[Node],
    seconds: u64,
    ticks_per_sec: u64,
    what: &str,
    show: bool,
) -> anyhow::Result<BTreeMap<u32, Figures>> {
    let first: Vec<(Sample, Stopwatch)> =
        nodes.iter().map(|n| Ok((procstat::sample(n.pid)?, Stopwatch::start()))).collect::<anyhow::Result<_>>()?;
    let bar = bar(show, seconds, &format!("{what}: sampling {} nodes", nodes.len()), "{pos}/{len} s");
    // One-second steps only move the bar: the nodes are read at the ends of the window, so the
    // bench's own reads do not show up in between.
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut figures = BTreeMap::new();
    for (node, (first, clock)) in nodes.iter().zip(first) {
        // Read the CPU time first, so that the elapsed time it is divided by matches it.
        let elapsed = clock.elapsed().as_secs_f64();
        let last = procstat::sample(node.pid).with_context(|| format!("sampling node {}", node.name))?;
        if last.start_ticks != first.start_ticks {
            bail!(
                "node {} (pid {}) restarted during the {what} window: its CPU time started over",
                node.name,
                node.pid
            );
        }
        let ticks = last.cpu_ticks.saturating_sub(first.cpu_ticks);
        figures.insert(
            node.pid,
            Figures {
                cpu_percent: procstat::cpu_percent(ticks, ticks_per_sec, elapsed),
                rss_bytes: last.rss_bytes,
                open_files: last.open_files,
                threads: last.threads,
            },
        );
    }
    Ok(figures)
}

/// Describes the topic every `POLL` until every partition has a leader and all its replicas in
/// sync, or --create-timeout-secs pass. Only missing leaders fail the run.
async fn wait_for_leaders(
    admin: &Admin,
    args: &IdleBenchArgs,
    clock: Stopwatch,
    show: bool,
) -> anyhow::Result<Creation> {
    let limit = Duration::from_secs(args.create_timeout_secs);
    let bar = bar(show, u64::from(args.partitions), "partitions with a leader", "{pos}/{len}");
    let mut leaders_ms = None;
    let (mut with_leader, mut in_sync) = (0u32, 0u32);
    loop {
        match admin.describe_topic(&args.topic).await {
            Ok(topic) => {
                with_leader = topic.partitions.iter().filter(|p| p.leader_id.is_some()).count() as u32;
                in_sync = topic
                    .partitions
                    .iter()
                    .filter(|p| !p.replicas.is_empty() && p.replicas.iter().all(|r| p.in_sync.contains(r)))
                    .count() as u32;
                bar.set_position(u64::from(with_leader));
                let all = topic.partitions.len() as u32 == args.partitions;
                if leaders_ms.is_none() && all && with_leader == args.partitions {
                    leaders_ms = Some(clock.elapsed().as_millis() as u64);
                    bar.set_message("partitions with a leader (waiting for in-sync replicas)");
                }
                if let (Some(leaders_ms), true) = (leaders_ms, all && in_sync == args.partitions) {
                    bar.finish_and_clear();
                    let all_in_sync_ms = Some(clock.elapsed().as_millis() as u64);
                    return Ok(Creation { leaders_ms, all_in_sync_ms, in_sync_partitions: in_sync });
                }
            }
            // A node busy creating partitions may miss a deadline; the wait has its own limit.
            Err(e) if e.is_retriable() => {}
            Err(e) => return Err(e).with_context(|| format!("describing topic {}", args.topic)),
        }
        if clock.elapsed() >= limit {
            bar.finish_and_clear();
            return match leaders_ms {
                Some(leaders_ms) => {
                    eprintln!(
                        "note: after {} s only {in_sync} of {} partitions had all their replicas in sync",
                        args.create_timeout_secs, args.partitions
                    );
                    Ok(Creation { leaders_ms, all_in_sync_ms: None, in_sync_partitions: in_sync })
                }
                None => bail!(
                    "after {} s only {with_leader} of {} partitions of {} had a leader (--create-timeout-secs)",
                    args.create_timeout_secs,
                    args.partitions,
                    args.topic
                ),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

fn bar(show: bool, len: u64, message: &str, counts: &str) -> ProgressBar {
    let bar = if show { ProgressBar::new(len) } else { ProgressBar::hidden() };
    if let Ok(style) = ProgressStyle::with_template(&format!("{{msg}} [{{bar:40}}] {counts}")) {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    bar
}

fn print(report: &IdleReport, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
        Output::Text => {
            let mib = |b: u64| format!("{:.0} MiB", b as f64 / f64::from(1 << 20));
            let mut t = table();
            t.set_header([
                "node".to_owned(),
                "pid".to_owned(),
                "CPU % no topic".to_owned(),
                format!("CPU % {} partitions", report.partitions),
                "RSS before → after".to_owned(),
                "open files before → after".to_owned(),
                "threads before → after".to_owned(),
            ]);
            let row = |name: String, pid: String, baseline: &Figures, idle: &Figures| {
                [
                    name,
                    pid,
                    format!("{:.1}", baseline.cpu_percent),
                    format!("{:.1}", idle.cpu_percent),
                    format!("{} → {}", mib(baseline.rss_bytes), mib(idle.rss_bytes)),
                    format!("{} → {}", baseline.open_files, idle.open_files),
                    format!("{} → {}", baseline.threads, idle.threads),
                ]
            };
            for n in &report.nodes {
                t.add_row(row(n.node.clone(), n.pid.to_string(), &n.baseline, &n.idle));
            }
            t.add_row(row("total".to_owned(), String::new(), &report.total.baseline, &report.total.idle));
            println!("{t}");
            println!(
                "CPU is % of one core over {} s windows (the total: % of one core for the whole cluster).",
                report.duration_s
            );
            println!(
                "{} partitions × {} replicas: every partition had a leader after {:.2} s; {}.",
                report.partitions,
                report.replicas,
                report.leaders_ms as f64 / 1000.0,
                match report.all_in_sync_ms {
                    Some(ms) => format!("all replicas in sync after {:.2} s", ms as f64 / 1000.0),
                    None => format!(
                        "{} of {} partitions had all replicas in sync when the wait ended",
                        report.in_sync_partitions, report.partitions
                    ),
                }
            );
            match report.deleted {
                true => println!("Topic {} deleted.", report.topic),
                false => println!("Topic {} kept (--keep).", report.topic),
            }
        }
    }
    Ok(())
}
