//! `keel bench produce|consume`: the speed of a running cluster as a client sees it — records/s,
//! MB/s and acknowledgement latency percentiles, through `keel-client`.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::{
    Admin, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, TopicConfig,
};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;
use crate::tools::Connection;

#[derive(Debug, Args)]
pub struct ProduceBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Topic to write (created if missing).
    #[arg(long, default_value = "keel-bench")]
    topic: String,
    /// Partitions of the topic if it is created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Replicas per partition if the topic is created.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Stop after this many records.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Stop after this many seconds, whichever comes first.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Records sent but not yet acknowledged, at most.
    #[arg(long, default_value_t = 1_000)]
    in_flight: usize,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// How long the producer waits to fill a batch, in ms (default: 1, or 0 with --in-flight 1,
    /// where there is nothing to batch).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Largest batch the producer sends, in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    batch_bytes: usize,
    /// Batches the producer keeps unacknowledged per partition (its `in_flight_max`); fewer
    /// make records wait, and batch, while a partition's earlier batches are out.
    #[arg(long, default_value_t = ProducerConfig::default().in_flight_max)]
    batches_in_flight: usize,
    /// The producer's idempotence: on (the default), off, or both — one run each, off first,
    /// and the cost of idempotence as a ratio of their throughputs.
    #[arg(long, value_enum, default_value_t = Idempotence::On)]
    idempotence: Idempotence,
}

/// Which producers `keel bench produce` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Idempotence {
    /// Idempotent (the client's default).
    On,
    /// Not idempotent.
    Off,
    /// Both, in one run.
    Both,
}

#[derive(Debug, Args)]
pub struct ConsumeBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Topic to read from the beginning (write it first with `keel bench produce`).
    #[arg(long, default_value = "keel-bench")]
    topic: String,
    /// Stop after this many records (or at the end of the topic as it was at the start).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Stop after this many seconds, whichever comes first.
    #[arg(long, default_value_t = 30)]
    duration: u64,
}

#[derive(Debug, Serialize)]
struct NetReport {
    what: &'static str,
    /// Whether the producer was idempotent (produce only).
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotence: Option<bool>,
    topic: String,
    records: u64,
    failed: u64,
    value_bytes: usize,
    in_flight: Option<usize>,
    seconds: f64,
    records_per_sec: f64,
    mb_per_sec: f64,
    latency_us_p50: Option<u64>,
    latency_us_p99: Option<u64>,
    latency_us_p999: Option<u64>,
    latency_us_max: Option<u64>,
}

fn progress(len: u64, output: Output) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")
}

pub fn produce(args: ProduceBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.in_flight == 0 || args.records == 0 {
        bail!("--in-flight and --records must be at least 1");
    }
    let client = args.connection.config()?;
    runtime()?.block_on(async move {
        let admin = Admin::new(client.clone())?;
        match admin.create_topic(&args.topic, args.partitions, args.replicas, TopicConfig::default()).await {
            Ok(_) | Err(ClientError::AlreadyExists(_)) => {}
            Err(e) => return Err(e).context("creating the bench topic"),
        }
        let modes: &[bool] = match args.idempotence {
            Idempotence::On => &[true],
            Idempotence::Off => &[false],
            Idempotence::Both => &[false, true],
        };
        let mut reports = Vec::new();
        for &idempotence in modes {
            let report = measure_produce(&client, &args, idempotence, output).await?;
            print(&report, output)?;
            reports.push(report);
        }
        if let [off, on] = &reports[..]
            && off.records_per_sec > 0.0
        {
            let ratio = on.records_per_sec / off.records_per_sec;
            match output {
                Output::Json => println!("{}", serde_json::json!({ "idempotent_to_plain_throughput": ratio })),
                Output::Text => println!(
                    "idempotence: {:.1}% of the plain producer's throughput ({:+.1}%)",
                    100.0 * ratio,
                    100.0 * (ratio - 1.0)
                ),
            }
        }
        Ok(())
    })
}

async fn measure_produce(
    client: &keel_client::ClientConfig,
    args: &ProduceBenchArgs,
    idempotence: bool,
    output: Output,
) -> anyhow::Result<NetReport> {
    let config = ProducerConfig {
        linger: Duration::from_millis(args.linger_ms.unwrap_or(if args.in_flight == 1 { 0 } else { 1 })),
        batch_bytes_max: args.batch_bytes,
        buffer_records_max: args.in_flight.max(1),
        in_flight_max: args.batches_in_flight,
        idempotence,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config)?;
    // Warm up every partition, not one: a new topic's partitions elect their leaders over seconds,
    // and a single warm-up record let the measured run wait for 99 of 100 elections (a 2.5 s stall
    // that read as the 100-partition path being 0.44x of one partition).
    let partitions = Admin::new(client.clone())?
        .describe_topic(&args.topic)
        .await
        .with_context(|| format!("describing {}", args.topic))?
        .partitions
        .len() as u32;
    let mut warm_up = FuturesUnordered::new();
    for partition in 0..partitions {
        let record = ProducerRecord::new(Bytes::from_static(b"warm-up")).with_partition(partition);
        warm_up.push(producer.send(&args.topic, record).await?);
    }
    while let Some(delivered) = warm_up.next().await {
        delivered.context("warming up")?;
    }

    let value = Bytes::from((0..args.value_bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram")?;
    let bar = progress(args.records, output);
    let limit = Duration::from_secs(args.duration);
    let clock = Stopwatch::start();
    let mut pending = FuturesUnordered::new();
    let (mut sent, mut acked, mut failed) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    loop {
        let can_send = sent < args.records && clock.elapsed() < limit;
        if can_send && pending.len() < args.in_flight {
            let delivery = producer.send(&args.topic, ProducerRecord::new(value.clone())).await?;
            let one = Stopwatch::start();
            pending.push(async move { (delivery.await, one.elapsed()) });
            sent += 1;
            continue;
        }
        let Some((result, took)) = pending.next().await else { break };
        match result {
            Ok(_) => {
                acked += 1;
                latency.saturating_record(took.as_micros() as u64);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        bar.inc(1);
    }
    let seconds = clock.elapsed().as_secs_f64();
    bar.finish_and_clear();
    producer.close().await;
    if let Some(e) = first_error {
        eprintln!("{failed} records failed; the first: {e}");
    }
    Ok(NetReport {
        what: "produce",
        idempotence: Some(idempotence),
        topic: args.topic.clone(),
        records: acked,
        failed,
        value_bytes: args.value_bytes,
        in_flight: Some(args.in_flight),
        seconds,
        records_per_sec: acked as f64 / seconds,
        mb_per_sec: (acked * args.value_bytes as u64) as f64 / seconds / 1e6,
        latency_us_p50: Some(latency.value_at_quantile(0.50)),
        latency_us_p99: Some(latency.value_at_quantile(0.99)),
        latency_us_p999: Some(latency.value_at_quantile(0.999)),
        latency_us_max: Some(latency.max()),
    })
}

pub fn consume(args: ConsumeBenchArgs, output: Output) -> anyhow::Result<()> {
    let client = args.connection.config()?;
    runtime()?.block_on(async move {
        let admin = Admin::new(client.clone())?;
        let topic =
            admin.describe_topic(&args.topic).await.context("the bench topic (run `keel bench produce` first)")?;
        let available: u64 = topic.partitions.iter().map(|p| p.high_watermark - p.log_start_offset).sum();
        let target = args.records.min(available);
        if target == 0 {
            bail!("topic {} is empty; run `keel bench produce` first", args.topic);
        }
        let mut consumer =
            Consumer::new(client, ConsumerConfig { fetch_bytes_max: 4 << 20, ..ConsumerConfig::default() })?;
        consumer.assign(&args.topic, &[]).await?;
        let bar = progress(target, output);
        let limit = Duration::from_secs(args.duration);
        let clock = Stopwatch::start();
        let (mut records, mut bytes) = (0u64, 0u64);
        while records < target && clock.elapsed() < limit {
            let batch = consumer.poll(Duration::from_millis(500)).await?;
            for r in &batch {
                bytes += r.value.as_ref().map_or(0, |v| v.len() as u64);
            }
            records += batch.len() as u64;
            bar.inc(batch.len() as u64);
        }
        let seconds = clock.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let report = NetReport {
            idempotence: None,
            what: "consume",
            topic: args.topic,
            records,
            failed: 0,
            value_bytes: bytes.checked_div(records).unwrap_or(0) as usize,
            in_flight: None,
            seconds,
            records_per_sec: records as f64 / seconds,
            mb_per_sec: bytes as f64 / seconds / 1e6,
            latency_us_p50: None,
            latency_us_p99: None,
            latency_us_p999: None,
            latency_us_max: None,
        };
        print(&report, output)
    })
}

fn print(report: &NetReport, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
        Output::Text => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["measure", "value"]);
            let mut rows = vec![
                ("records".to_owned(), report.records.to_string()),
                ("records/s".to_owned(), format!("{:.0}", report.records_per_sec)),
                ("MB/s".to_owned(), format!("{:.1}", report.mb_per_sec)),
            ];
            if let Some(n) = report.in_flight {
                rows.push(("in flight".into(), n.to_string()));
                if let Some(on) = report.idempotence {
                    rows.push(("idempotent".into(), if on { "yes" } else { "no" }.into()));
                }
                rows.push(("failed".into(), report.failed.to_string()));
            }
            for (name, v) in [
                ("ack latency p50", report.latency_us_p50),
                ("ack latency p99", report.latency_us_p99),
                ("ack latency p99.9", report.latency_us_p999),
                ("ack latency max", report.latency_us_max),
            ] {
                if let Some(v) = v {
                    rows.push((name.to_owned(), format!("{v} µs")));
                }
            }
            for (k, v) in rows {
                table.add_row([k, v]);
            }
            println!("{table}");
        }
    }
    Ok(())
}
