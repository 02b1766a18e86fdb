//! `keel bench move`: what moving a large partition costs — how long the move of a partition of
//! `--bytes` takes with the catch-up throttle as the nodes have it, and the throughput of
//! producers writing other partitions meanwhile, against the same producers just before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::{Admin, ClientError, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;
use crate::tools::Connection;

#[derive(Debug, Args)]
pub struct MoveBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic whose partition 0 is filled and moved (created with one partition if missing;
    /// filled only up to --bytes, so a second run moves it back without writing again).
    #[arg(long, default_value = "keel-bench-move")]
    topic: String,
    /// How much the moved partition holds.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// The topic the producers write during the measurements (created if missing).
    #[arg(long, default_value = "keel-bench-load")]
    load_topic: String,
    /// Partitions of the load topic if it is created.
    #[arg(long, default_value_t = 3)]
    load_partitions: u32,
    /// Records the load producer has in flight.
    #[arg(long, default_value_t = 1_000)]
    in_flight: usize,
    /// Bytes of each record's value (fill and load).
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// How long the load runs before the move, for the baseline.
    #[arg(long, default_value_t = 15)]
    baseline_secs: u64,
    /// Where the partition goes (default: its replicas with the first replaced by a node that
    /// holds no copy; the cluster needs a node more than the replicas).
    #[arg(long, value_delimiter = ',')]
    to: Vec<u64>,
    /// Give up if the move has not finished after this many seconds.
    #[arg(long, default_value_t = 3_600)]
    timeout_secs: u64,
}

#[derive(Debug, Serialize)]
struct MoveReport {
    topic: String,
    bytes: u64,
    from: Vec<u64>,
    to: Vec<u64>,
    move_seconds: f64,
    move_mib_per_sec: f64,
    baseline_records_per_sec: f64,
    during_move_records_per_sec: f64,
    /// During-move throughput over the baseline.
    throughput_ratio: f64,
    load_failed: u64,
}

pub fn move_bench(args: MoveBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.in_flight == 0 || args.value_bytes == 0 || args.bytes == 0 {
        bail!("--in-flight, --value-bytes and --bytes must be at least 1");
    }
    let client = args.connection.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let admin = Admin::new(client.clone())?;
        for (topic, partitions) in [(&args.topic, 1), (&args.load_topic, args.load_partitions)] {
            match admin.create_topic(topic, partitions, 3, TopicConfig::default()).await {
                Ok(_) | Err(ClientError::AlreadyExists(_)) => {}
                Err(e) => return Err(e).with_context(|| format!("creating {topic}")),
            }
        }
        let value = Bytes::from((0..args.value_bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        fill(&client, &admin, &args, &value, output).await?;

        let partition = describe(&admin, &args.topic).await?;
        let from = partition.replicas.clone();
        let to = if args.to.is_empty() { spare_target(&admin, &from).await? } else { args.to.clone() };

        let bar = spinner(output, "baseline: producing to the load topic");
        let stop = Arc::new(AtomicBool::new(false));
        let baseline = {
            let (timer, secs) = (Arc::clone(&stop), args.baseline_secs);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                timer.store(true, Ordering::Release);
            });
            load(&client, &args, &value, &stop).await?
        };
        bar.set_message(format!("moving {}/0 from {from:?} to {to:?} while producing", args.topic));
        stop.store(false, Ordering::Release);
        let moving = {
            let admin = Admin::new(client.clone())?;
            let (topic, to, stop) = (args.topic.clone(), to.clone(), Arc::clone(&stop));
            let timeout = Duration::from_secs(args.timeout_secs);
            tokio::spawn(async move {
                let clock = Stopwatch::start();
                let result = move_and_wait(&admin, &topic, &to, timeout).await;
                stop.store(true, Ordering::Release);
                result.map(|()| clock.elapsed())
            })
        };
        let during = load(&client, &args, &value, &stop).await?;
        let took = moving.await.context("the move task")??;
        bar.finish_and_clear();
        let (base_rate, during_rate) = (baseline.0 as f64 / baseline.1, during.0 as f64 / during.1);
        let report = MoveReport {
            topic: args.topic.clone(),
            bytes: args.bytes,
            from,
            to,
            move_seconds: took.as_secs_f64(),
            move_mib_per_sec: args.bytes as f64 / (1 << 20) as f64 / took.as_secs_f64(),
            baseline_records_per_sec: base_rate,
            during_move_records_per_sec: during_rate,
            throughput_ratio: if base_rate > 0.0 { during_rate / base_rate } else { 0.0 },
            load_failed: baseline.2 + during.2,
        };
        match output {
            Output::Json => println!("{}", serde_json::to_string(&report)?),
            Output::Text => println!(
                "moved {}/0 ({:.0} MiB) from {:?} to {:?} in {:.1} s ({:.1} MiB/s); producers to {}: {:.0} records/s \
                 before, {:.0} during ({:.2} of before); {} failed",
                report.topic,
                report.bytes as f64 / (1 << 20) as f64,
                report.from,
                report.to,
                report.move_seconds,
                report.move_mib_per_sec,
                args.load_topic,
                report.baseline_records_per_sec,
                report.during_move_records_per_sec,
                report.throughput_ratio,
                report.load_failed,
            ),
        }
        Ok(())
    })
}

fn spinner(output: Output, message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(message.to_owned());
    bar
}

async fn describe(admin: &Admin, topic: &str) -> anyhow::Result<keel_proto::v1::PartitionDescription> {
    let t = admin.describe_topic(topic).await.with_context(|| format!("describing {topic}"))?;
    t.partitions.into_iter().find(|p| p.partition == 0).with_context(|| format!("{topic} has no partition 0"))
}

/// Its replicas with the first replaced by the lowest node id that holds no copy.
async fn spare_target(admin: &Admin, from: &[u64]) -> anyhow::Result<Vec<u64>> {
    let cluster = admin.describe_cluster().await.context("describing the cluster")?;
    let spare = cluster
        .nodes
        .iter()
        .filter(|n| !n.decommissioned && !from.contains(&n.node_id))
        .map(|n| n.node_id)
        .min()
        .with_context(|| format!("every node holds a copy already ({from:?}): run a cluster with one more node"))?;
    let mut to = from.to_vec();
    to[0] = spare;
    Ok(to)
}

/// Writes the partition up to `--bytes`, in large batches.
async fn fill(
    client: &keel_client::ClientConfig,
    admin: &Admin,
    args: &MoveBenchArgs,
    value: &Bytes,
    output: Output,
) -> anyhow::Result<()> {
    let records = args.bytes.div_ceil(args.value_bytes as u64);
    let have = describe(admin, &args.topic).await?.high_watermark;
    if have >= records {
        return Ok(());
    }
    let config = ProducerConfig { batch_bytes_max: 1 << 20, buffer_records_max: 4_096, ..ProducerConfig::default() };
    let producer = Producer::new(client.clone(), config)?;
    let bar = ProgressBar::new(records - have);
    bar.set_style(
        ProgressStyle::with_template("{spinner} filling {wide_bar} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut pending = FuturesUnordered::new();
    let mut sent = have;
    loop {
        if sent < records && pending.len() < 4_096 {
            let record = ProducerRecord::new(value.clone()).with_partition(0);
            pending.push(producer.send(&args.topic, record).await?);
            sent += 1;
            continue;
        }
        let Some(result) = pending.next().await else { break };
        result.context("filling the partition")?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    producer.close().await;
    Ok(())
}

/// Produces to the load topic until `stop`: (acknowledged, seconds, failed).
async fn load(
    client: &keel_client::ClientConfig,
    args: &MoveBenchArgs,
    value: &Bytes,
    stop: &AtomicBool,
) -> anyhow::Result<(u64, f64, u64)> {
    let config = ProducerConfig {
        linger: Duration::from_millis(1),
        buffer_records_max: args.in_flight,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config)?;
    producer.send(&args.load_topic, ProducerRecord::new(Bytes::from_static(b"warm-up"))).await?.await?;
    let clock = Stopwatch::start();
    let mut pending = FuturesUnordered::new();
    let (mut acked, mut failed) = (0u64, 0u64);
    loop {
        if !stop.load(Ordering::Acquire) && pending.len() < args.in_flight {
            pending.push(producer.send(&args.load_topic, ProducerRecord::new(value.clone())).await?);
            continue;
        }
        // Bounded by the in-flight limit; the flag is looked at again after each answer.
        let Some(result) = pending.next().await else { break };
        match result {
            Ok(_) => acked += 1,
            Err(_) => failed += 1,
        }
    }
    let seconds = clock.elapsed().as_secs_f64();
    producer.close().await;
    Ok((acked, seconds, failed))
}

/// Starts the move and waits until the partition's replicas are `to`.
async fn move_and_wait(admin: &Admin, topic: &str, to: &[u64], timeout: Duration) -> anyhow::Result<()> {
    admin.move_partition(topic, 0, to).await.with_context(|| format!("moving {topic}/0 to {to:?}"))?;
    let clock = Stopwatch::start();
    loop {
        if let Ok(p) = describe(admin, topic).await
            && p.moving_to.is_empty()
        {
            if p.replicas != to {
                bail!("{topic}/0 has replicas {:?}, not {to:?}: another move came after", p.replicas);
            }
            return Ok(());
        }
        if clock.elapsed() > timeout {
            bail!("the move did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
