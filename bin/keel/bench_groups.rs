//! `keel bench commits|group-failover`: consumer groups as a client sees them — offset commits
//! per second through one coordinator, and how long a dead member's partitions stay unread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use keel_client::{
    Admin, ClientConfig, ClientError, GroupAdmin, GroupConfig, GroupConsumer, Producer, ProducerConfig, ProducerRecord,
    TopicConfig, TopicPartition,
};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;
use crate::tools::{Connection, table};

/// Longest wait for a group to settle (every member holding its share) before measuring.
const SETTLE_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct CommitsBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Topic whose offsets are committed (created with one partition per member if missing).
    #[arg(long, default_value = "keel-bench-commits")]
    topic: String,
    /// Members of the group, each committing in a loop with one commit in flight.
    #[arg(long, default_value_t = 8)]
    members: u32,
    /// Seconds of committing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Records written to each partition first: every commit moves its offsets forward by one,
    /// up to this (then it repeats the last offset, which still writes a record).
    #[arg(long, default_value_t = 20_000)]
    records_per_partition: u64,
}

#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Topic the members consume (created if missing); records are written to it all along.
    #[arg(long, default_value = "keel-bench-failover")]
    topic: String,
    /// Partitions of the topic if it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// The members' session timeout (the cluster clamps it to its bounds).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u32,
    /// How many times to kill a member (each round uses a new group).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Let the member leave (close) instead of dying: measures a clean rebalance.
    #[arg(long)]
    close: bool,
}

#[derive(Debug, Serialize)]
struct CommitsReport {
    what: &'static str,
    topic: String,
    members: u32,
    commits: u64,
    failed: u64,
    seconds: f64,
    commits_per_sec: f64,
    latency_us_p50: u64,
    latency_us_p99: u64,
    latency_us_p999: u64,
    latency_us_max: u64,
}

#[derive(Debug, Serialize)]
struct FailoverRound {
    /// Partitions the victim held.
    partitions: usize,
    /// From the victim's death to the survivor owning every one of its partitions.
    owned_after_ms: u64,
    /// From the victim's death to the survivor having read a record of each of them.
    consuming_after_ms: u64,
}

#[derive(Debug, Serialize)]
struct FailoverReport {
    what: &'static str,
    topic: String,
    session_timeout_ms: u32,
    victim: &'static str,
    rounds: Vec<FailoverRound>,
    consuming_after_ms_min: u64,
    consuming_after_ms_max: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")
}

/// A group name no earlier run used, so every run starts from no committed offsets.
fn fresh_group(prefix: &str) -> String {
    format!("{prefix}-{:016x}", crate::clock::entropy())
}

async fn ensure_topic(admin: &Admin, topic: &str, partitions: u32) -> anyhow::Result<u32> {
    match admin.create_topic(topic, partitions, 0, TopicConfig::default()).await {
        Ok(_) | Err(ClientError::AlreadyExists(_)) => {}
        Err(e) => return Err(e).with_context(|| format!("creating topic {topic}")),
    }
    let t = admin.describe_topic(topic).await.with_context(|| format!("topic {topic}"))?;
    Ok(t.partitions.len() as u32)
}

/// Polls every member until each owns partitions and together they own all `partitions`.
async fn settle(members: &mut [GroupConsumer], partitions: usize) -> anyhow::Result<()> {
    let clock = Stopwatch::start();
    loop {
        for m in members.iter_mut() {
            m.poll(Duration::from_millis(20)).await?;
        }
        let owned: Vec<BTreeSet<TopicPartition>> = members.iter().map(GroupConsumer::assignment).collect();
        let all: BTreeSet<&TopicPartition> = owned.iter().flatten().collect();
        if owned.iter().all(|o| !o.is_empty()) && all.len() == partitions {
            return Ok(());
        }
        if clock.elapsed() > SETTLE_MAX {
            bail!("the group did not settle within {SETTLE_MAX:?}: {owned:?}");
        }
    }
}

fn group_config(group: &str, client_id: String, session_timeout_ms: u32) -> GroupConfig {
    let mut c = GroupConfig::new(group);
    c.client_id = client_id;
    c.session_timeout = Duration::from_millis(u64::from(session_timeout_ms));
    c
}

pub fn commits(args: CommitsBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.members == 0 || args.duration == 0 {
        bail!("--members and --duration must be at least 1");
    }
    let client = args.connection.config()?;
    runtime()?.block_on(async move {
        let admin = Admin::new(client.clone())?;
        let partitions = ensure_topic(&admin, &args.topic, args.members).await?;
        if partitions < args.members {
            bail!("topic {} has {partitions} partitions: every one of {} members needs one", args.topic, args.members);
        }
        fill(&client, &args.topic, partitions, args.records_per_partition).await?;
        let hw: BTreeMap<u32, u64> = admin
            .describe_topic(&args.topic)
            .await?
            .partitions
            .iter()
            .map(|p| (p.partition, p.high_watermark))
            .collect();

        let group = fresh_group("bench-commits");
        let mut members = Vec::new();
        for i in 0..args.members {
            let mut config = group_config(&group, format!("bench-{i}"), 10_000);
            // The members only commit: starting their partitions at the log end keeps them from
            // streaming the whole topic meanwhile (which would load the nodes being measured).
            config.auto_offset_reset = keel_client::OffsetReset::Latest;
            let seeded = client.clone().with_seed(client.seed ^ u64::from(i + 1));
            members.push(GroupConsumer::subscribe(seeded, config, &[args.topic.as_str()]).await?);
        }
        settle(&mut members, partitions as usize).await?;
        let limit = Duration::from_secs(args.duration);
        let hw = Arc::new(hw);
        let clock = Stopwatch::start();
        // The members run as futures of this one task: `GroupConsumer` is not `Sync`, so a
        // commit's future cannot move to another thread; the commits still overlap on the wire.
        let runs = members.into_iter().map(|member| {
            let hw = Arc::clone(&hw);
            async move {
                let owned = member.assignment();
                let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
                let (mut commits, mut failed, mut next) = (0u64, 0u64, 1u64);
                while clock.elapsed() < limit {
                    let offsets: BTreeMap<TopicPartition, u64> =
                        owned.iter().map(|tp| (tp.clone(), next.min(hw.get(&tp.1).copied().unwrap_or(0)))).collect();
                    let one = Stopwatch::start();
                    match member.commit_offsets(&offsets).await {
                        Ok(_) => {
                            latency.saturating_record(one.elapsed().as_micros() as u64);
                            commits += 1;
                        }
                        Err(_) => failed += 1,
                    }
                    next += 1;
                }
                let _ = member.close().await;
                anyhow::Ok((latency, commits, failed))
            }
        });
        let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let (mut commits, mut failed) = (0u64, 0u64);
        for run in futures_util::future::join_all(runs).await {
            let (l, c, f) = run?;
            latency.add(&l).context("merging latencies")?;
            commits += c;
            failed += f;
        }
        let seconds = clock.elapsed().as_secs_f64();
        if let Err(e) = GroupAdmin::new(client)?.delete_group(&group).await {
            eprintln!("note: the bench group {group} was not deleted: {e}");
        }
        let report = CommitsReport {
            what: "commits",
            topic: args.topic,
            members: args.members,
            commits,
            failed,
            seconds,
            commits_per_sec: commits as f64 / seconds,
            latency_us_p50: latency.value_at_quantile(0.50),
            latency_us_p99: latency.value_at_quantile(0.99),
            latency_us_p999: latency.value_at_quantile(0.999),
            latency_us_max: latency.max(),
        };
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Text => {
                let mut t = table();
                t.set_header(["measure", "value"]);
                for (k, v) in [
                    ("members (one commit in flight each)", report.members.to_string()),
                    ("commits", report.commits.to_string()),
                    ("failed", report.failed.to_string()),
                    ("commits/s", format!("{:.0}", report.commits_per_sec)),
                    ("commit latency p50", format!("{} µs", report.latency_us_p50)),
                    ("commit latency p99", format!("{} µs", report.latency_us_p99)),
                    ("commit latency p99.9", format!("{} µs", report.latency_us_p999)),
                    ("commit latency max", format!("{} µs", report.latency_us_max)),
                ] {
                    t.add_row([k.to_owned(), v]);
                }
                println!("{t}");
            }
        }
        Ok(())
    })
}

/// Writes small records until every partition holds at least `per_partition`.
async fn fill(client: &ClientConfig, topic: &str, partitions: u32, per_partition: u64) -> anyhow::Result<()> {
    let admin = Admin::new(client.clone())?;
    let have: BTreeMap<u32, u64> =
        admin.describe_topic(topic).await?.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
    let producer = Producer::new(client.clone(), ProducerConfig::default())?;
    let mut pending = Vec::new();
    for p in 0..partitions {
        for _ in have.get(&p).copied().unwrap_or(0)..per_partition {
            let record = ProducerRecord::new(Bytes::from_static(b"offset")).with_partition(p);
            pending.push(producer.send(topic, record).await?);
        }
    }
    for delivery in pending {
        delivery.await.context("writing the records whose offsets the bench commits")?;
    }
    producer.close().await;
    Ok(())
}

pub fn group_failover(args: FailoverBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.partitions < 2 || args.rounds == 0 {
        bail!("--partitions must be at least 2 and --rounds at least 1");
    }
    let client = args.connection.config()?;
    runtime()?.block_on(async move {
        let admin = Admin::new(client.clone())?;
        let partitions = ensure_topic(&admin, &args.topic, args.partitions).await?;
        // Records keep arriving on every partition, so "consuming again" is observable.
        let producer = Producer::new(client.clone(), ProducerConfig::default())?;
        let topic = args.topic.clone();
        let feeder = tokio::spawn(async move {
            loop {
                for p in 0..partitions {
                    let record = ProducerRecord::new(Bytes::from_static(b"tick")).with_partition(p);
                    if producer.send(&topic, record).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let r = failover_round(&client, &args, partitions as usize, round).await;
            if r.is_err() {
                feeder.abort();
            }
            let r = r?;
            if output == Output::Text {
                eprintln!(
                    "round {}: {} partitions owned again after {} ms, consumed again after {} ms",
                    round + 1,
                    r.partitions,
                    r.owned_after_ms,
                    r.consuming_after_ms
                );
            }
            rounds.push(r);
        }
        feeder.abort();
        let report = FailoverReport {
            what: "group-failover",
            topic: args.topic,
            session_timeout_ms: args.session_timeout_ms,
            victim: if args.close { "leaves (close)" } else { "dies (dropped without leaving)" },
            consuming_after_ms_min: rounds.iter().map(|r| r.consuming_after_ms).min().unwrap_or(0),
            consuming_after_ms_max: rounds.iter().map(|r| r.consuming_after_ms).max().unwrap_or(0),
            rounds,
        };
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Text => {
                let mut t = table();
                t.set_header(["round", "victim's partitions", "owned again after", "consumed again after"]);
                for (i, r) in report.rounds.iter().enumerate() {
                    t.add_row([
                        (i + 1).to_string(),
                        r.partitions.to_string(),
                        format!("{} ms", r.owned_after_ms),
                        format!("{} ms", r.consuming_after_ms),
                    ]);
                }
                println!("{t}");
                println!("the victim {}; session timeout {} ms", report.victim, report.session_timeout_ms);
            }
        }
        Ok(())
    })
}

async fn failover_round(
    client: &ClientConfig,
    args: &FailoverBenchArgs,
    partitions: usize,
    round: u32,
) -> anyhow::Result<FailoverRound> {
    let group = fresh_group("bench-failover");
    let mut members = Vec::new();
    for i in 0..2u64 {
        let mut config = group_config(&group, format!("bench-{i}"), args.session_timeout_ms);
        // Start at the log end: only records written during the round count.
        config.auto_offset_reset = keel_client::OffsetReset::Latest;
        let seeded = client.clone().with_seed(client.seed ^ (u64::from(round) << 8 | i));
        members.push(GroupConsumer::subscribe(seeded, config, &[args.topic.as_str()]).await?);
    }
    settle(&mut members, partitions).await?;
    let victim = members.remove(0);
    let mut survivor = members.remove(0);
    let taken: BTreeSet<TopicPartition> = victim.assignment();
    let clock = Stopwatch::start();
    if args.close {
        victim.close().await?;
    } else {
        // Dies: no leave, no more heartbeats; the coordinator notices after the session timeout.
        drop(victim);
    }
    let bound = Duration::from_millis(u64::from(args.session_timeout_ms)) + SETTLE_MAX;
    let mut owned_after = None;
    let mut read: BTreeSet<TopicPartition> = BTreeSet::new();
    loop {
        let records = survivor.poll(Duration::from_millis(50)).await?;
        if owned_after.is_none() && taken.is_subset(&survivor.assignment()) {
            owned_after = Some(clock.elapsed());
        }
        for r in records {
            let tp = (r.topic, r.partition);
            if taken.contains(&tp) {
                read.insert(tp);
            }
        }
        if read.len() == taken.len() {
            break;
        }
        if clock.elapsed() > bound {
            bail!("round {}: the survivor did not consume the victim's partitions within {bound:?}", round + 1);
        }
    }
    let consuming_after = clock.elapsed();
    let _ = survivor.close().await;
    let _ = GroupAdmin::new(client.clone())?.delete_group(&group).await;
    Ok(FailoverRound {
        partitions: taken.len(),
        owned_after_ms: owned_after.unwrap_or(consuming_after).as_millis() as u64,
        consuming_after_ms: consuming_after.as_millis() as u64,
    })
}
