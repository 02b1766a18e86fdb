//! `keel bench delayed`: what pending timers cost a cluster's memory, and how fast timers fire
//! while a million others wait. Memory comes from the nodes' own `/metrics`
//! (`keel_memory_anonymous_bytes`, `keel_delayed_pending`), so the figure is the nodes' heap, not
//! the page cache their segments sit in.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use http_body_util::BodyExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use keel_broker::Clock as _;
use keel_client::{
    Admin, ClientError, Consumer, ConsumerConfig, DELIVER_AT_HEADER, DeliverAt, Offset, Producer, ProducerConfig,
    ProducerRecord, TopicConfig,
};
use serde::Serialize;

use crate::Output;
use crate::clock::{Stopwatch, SystemClock};
use crate::tools::{Connection, table};

/// Records per schedule request (they share one deliver-at time).
const PER_REQUEST_MAX: usize = 10_000;
/// Time the nodes get to settle before their memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// Longest wait for the fired records to arrive after the last was due.
const ARRIVAL_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
pub struct DelayedBenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Timers left pending, due spread evenly from `--pending-from` to `--pending-to` (they stay
    /// behind: run this against a throwaway cluster, `keel dev --data-dir /tmp/…`).
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// The earliest delay of the pending timers.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pending_from: Duration,
    /// The latest delay of the pending timers.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
    pending_to: Duration,
    /// Timers fired for the throughput figure, all due at one moment once they are scheduled.
    #[arg(long, default_value_t = 100_000)]
    fire: u64,
    /// Records per schedule request.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Schedule requests in flight.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// The nodes' `/metrics` addresses (`HOST:PORT,…`); by default each bootstrap address's port
    /// + 100, as `keel dev` and `keel server` place them.
    #[arg(long)]
    metrics: Option<String>,
    /// Target topic (`<topic>-pending` holds the pending timers' targets); created with 4
    /// partitions if missing.
    #[arg(long, default_value = "keel-bench-delayed")]
    topic: String,
}

#[derive(Debug, Serialize)]
struct DelayedReport {
    what: &'static str,
    pending: u64,
    pending_from_s: u64,
    pending_to_s: u64,
    schedule_seconds: f64,
    schedules_per_sec: f64,
    nodes_pending_before: u64,
    nodes_pending_after: u64,
    anonymous_bytes_before: u64,
    /// After the first half of the pending timers.
    anonymous_bytes_middle: u64,
    anonymous_bytes_after: u64,
    /// Growth over all the pending timers (includes the nodes warming up to the load).
    bytes_per_pending_timer: f64,
    /// Growth over the second half: what one more pending timer costs a warm cluster.
    bytes_per_pending_timer_second_half: f64,
    fired: u64,
    fire_seconds: f64,
    fires_per_sec: f64,
    lateness_ms_p50: u64,
    lateness_ms_p99: u64,
    lateness_ms_max: u64,
}

/// The nodes' memory and pending timers, summed over `/metrics` of each.
#[derive(Debug, Clone, Copy, Default)]
struct NodeFigures {
    anonymous_bytes: u64,
    pending: u64,
}

/// `GET /metrics` of one node.
async fn scrape(addr: &str) -> anyhow::Result<prometheus_parse::Scrape> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP to {addr}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr)
        .body(http_body_util::Empty::<Bytes>::new())
        .context("building the request")?;
    let answer = sender.send_request(request).await.with_context(|| format!("GET {addr}/metrics"))?;
    if !answer.status().is_success() {
        bail!("GET {addr}/metrics: {}", answer.status());
    }
    let body = answer.into_body().collect().await.with_context(|| format!("reading {addr}/metrics"))?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .with_context(|| format!("parsing {addr}/metrics"))
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str) -> u64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v as u64,
            _ => 0,
        })
        .sum()
}

async fn node_figures(metrics: &[String]) -> anyhow::Result<NodeFigures> {
    let mut f = NodeFigures::default();
    for addr in metrics {
        let s = scrape(addr).await?;
        let anonymous = sample(&s, "keel_memory_anonymous_bytes");
        if anonymous == 0 {
            bail!("{addr} reports no keel_memory_anonymous_bytes (not Linux, or a node older than this bench)");
        }
        f.anonymous_bytes += anonymous;
        f.pending += sample(&s, "keel_delayed_pending");
    }
    Ok(f)
}

/// `--metrics`, or each bootstrap address with its port + 100.
fn metrics_addrs(args: &DelayedBenchArgs) -> anyhow::Result<Vec<String>> {
    if let Some(m) = &args.metrics {
        return Ok(m.split(',').map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect());
    }
    args.connection
        .bootstrap
        .split(',')
        .map(|a| {
            let (host, port) = a.trim().rsplit_once(':').context("a bootstrap address is HOST:PORT")?;
            let port: u16 = port.parse().context("a bootstrap port")?;
            let metrics = port.checked_add(100).context("no room for port + 100: pass --metrics")?;
            Ok(format!("{host}:{metrics}"))
        })
        .collect()
}

async fn ensure_topic(admin: &Admin, topic: &str) -> anyhow::Result<u32> {
    match admin.create_topic(topic, 4, 0, TopicConfig::default()).await {
        Ok(_) | Err(ClientError::AlreadyExists(_)) => {}
        Err(e) => return Err(e).with_context(|| format!("creating topic {topic}")),
    }
    let t = admin.describe_topic(topic).await.with_context(|| format!("topic {topic}"))?;
    Ok(t.partitions.len() as u32)
}

/// Schedules `count` records to `topic` in requests of `batch`, `when(i)` being the time of
/// request `i`, with a progress bar; returns the timer ids scheduled.
async fn schedule(
    producer: &Producer,
    topic: &str,
    partitions: u32,
    args: &DelayedBenchArgs,
    count: u64,
    when: impl Fn(u64) -> DeliverAt,
    progress: &ProgressBar,
) -> anyhow::Result<u64> {
    let batch = args.batch as u64;
    let requests = count.div_ceil(batch);
    let value = Bytes::from(vec![b'x'; args.value_bytes]);
    let results: Vec<Result<usize, ClientError>> = futures_util::stream::iter(0..requests)
        .map(|i| {
            let n = batch.min(count - i * batch);
            let records =
                (0..n).map(|_| ProducerRecord::new(value.clone()).with_partition((i % u64::from(partitions)) as u32));
            let records: Vec<ProducerRecord> = records.collect();
            let when = when(i);
            async move {
                let ids = producer.send_delayed(topic, records, when).await?;
                progress.inc(ids.len() as u64);
                Ok(ids.len())
            }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect()
        .await;
    let mut scheduled = 0u64;
    for r in results {
        scheduled += r.context("a schedule request failed")? as u64;
    }
    Ok(scheduled)
}

pub fn delayed(args: DelayedBenchArgs, output: Output) -> anyhow::Result<()> {
    if args.batch == 0 || args.batch > PER_REQUEST_MAX {
        bail!("--batch must be 1..={PER_REQUEST_MAX}");
    }
    if args.pending_to < args.pending_from {
        bail!("--pending-to must not be below --pending-from");
    }
    let metrics = metrics_addrs(&args)?;
    let client = args.connection.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let admin = Admin::new(client.clone())?;
        let pending_topic = format!("{}-pending", args.topic);
        let pending_partitions = ensure_topic(&admin, &pending_topic).await?;
        let partitions = ensure_topic(&admin, &args.topic).await?;
        let before = node_figures(&metrics).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default())?;
        let show = output == Output::Text;
        let bar = |len: u64, what: &str| {
            let p = if show { ProgressBar::new(len) } else { ProgressBar::hidden() };
            if let Ok(style) = ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} ({per_sec}, {eta})") {
                p.set_style(style);
            }
            p.set_message(what.to_owned());
            p
        };

        // The pending timers: each request's delay a step further along the span. They go in two
        // halves: the first also warms the nodes up (allocator arenas, buffers and caches sized
        // to the load, kept after it), the second shows what one more pending timer costs.
        let requests = args.pending.div_ceil(args.batch as u64).max(1);
        let (from, to) = (args.pending_from.as_millis() as u64, args.pending_to.as_millis() as u64);
        let when = |i: u64| DeliverAt::After(Duration::from_millis(from + (to - from) * i / requests));
        let first_requests = requests / 2;
        let first_half = (first_requests * args.batch as u64).min(args.pending);
        let progress = bar(args.pending, "pending");
        let clock = Stopwatch::start();
        let mut scheduled =
            schedule(&producer, &pending_topic, pending_partitions, &args, first_half, when, &progress).await?;
        let mut schedule_seconds = clock.elapsed().as_secs_f64();
        // Let the nodes settle (replays, the horizon's first load) before reading their memory.
        tokio::time::sleep(SETTLE).await;
        let middle = node_figures(&metrics).await?;
        let clock = Stopwatch::start();
        let second_half = schedule(
            &producer,
            &pending_topic,
            pending_partitions,
            &args,
            args.pending - first_half,
            |i| when(first_requests + i),
            &progress,
        )
        .await?;
        scheduled += second_half;
        schedule_seconds += clock.elapsed().as_secs_f64();
        progress.finish_and_clear();
        tokio::time::sleep(SETTLE).await;
        let after = node_figures(&metrics).await?;

        // The fired ones: all due at one moment, a little after they are all scheduled.
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default())?;
        let ends: Vec<(u32, u64)> = admin
            .describe_topic(&args.topic)
            .await?
            .partitions
            .iter()
            .map(|p| (p.partition, p.high_watermark))
            .collect();
        consumer.assign(&args.topic, &[]).await?;
        for (p, end) in &ends {
            consumer.seek(&args.topic, *p, Offset::At(*end))?;
        }
        let estimate_ms = (args.fire as f64 / (scheduled as f64 / schedule_seconds.max(0.001)) * 1_000.0) as i64;
        let due = SystemClock.now_ms() + estimate_ms * 2 + 5_000;
        let progress = bar(args.fire, "to fire");
        let fired_scheduled =
            schedule(&producer, &args.topic, partitions, &args, args.fire, |_| DeliverAt::AtMs(due), &progress).await?;
        progress.finish_and_clear();
        producer.close().await;
        if SystemClock.now_ms() >= due {
            eprintln!("note: scheduling ran past the due time; the firing figure includes some scheduling");
        }
        let progress = bar(fired_scheduled, "arrived");
        let mut lateness = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
        let mut arrived = 0u64;
        let mut seen_ids: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut last_arrival = due;
        let give_up = due.saturating_add(ARRIVAL_MAX.as_millis() as i64);
        while arrived < fired_scheduled {
            if SystemClock.now_ms() > give_up {
                bail!("only {arrived} of {fired_scheduled} fired records arrived within {ARRIVAL_MAX:?} of their time");
            }
            for r in consumer.poll(Duration::from_millis(200)).await? {
                if !seen_ids.insert((r.partition, r.offset)) {
                    continue;
                }
                let now = SystemClock.now_ms();
                let at = r
                    .headers
                    .iter()
                    .find(|(k, _)| k == DELIVER_AT_HEADER)
                    .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse::<i64>().ok())
                    .unwrap_or(due);
                lateness.saturating_record((now - at).max(1) as u64);
                arrived += 1;
                last_arrival = now;
                progress.inc(1);
            }
        }
        progress.finish_and_clear();
        let fire_seconds = ((last_arrival - due).max(1)) as f64 / 1_000.0;
        let per_timer = |from: NodeFigures, count: u64| {
            after.anonymous_bytes.saturating_sub(from.anonymous_bytes) as f64 / count.max(1) as f64
        };
        let report = DelayedReport {
            what: "delayed",
            pending: scheduled,
            pending_from_s: args.pending_from.as_secs(),
            pending_to_s: args.pending_to.as_secs(),
            schedule_seconds,
            schedules_per_sec: scheduled as f64 / schedule_seconds.max(0.001),
            nodes_pending_before: before.pending,
            nodes_pending_after: after.pending,
            anonymous_bytes_before: before.anonymous_bytes,
            anonymous_bytes_middle: middle.anonymous_bytes,
            anonymous_bytes_after: after.anonymous_bytes,
            bytes_per_pending_timer: per_timer(before, scheduled),
            bytes_per_pending_timer_second_half: per_timer(middle, second_half),
            fired: arrived,
            fire_seconds,
            fires_per_sec: arrived as f64 / fire_seconds,
            lateness_ms_p50: lateness.value_at_quantile(0.5),
            lateness_ms_p99: lateness.value_at_quantile(0.99),
            lateness_ms_max: lateness.max(),
        };
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Text => {
                let mut t = table();
                t.set_header(["measure", "value"]);
                let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
                for (k, v) in [
                    (
                        "pending timers scheduled".to_owned(),
                        format!("{} (due {:?} to {:?} ahead)", report.pending, args.pending_from, args.pending_to),
                    ),
                    ("schedules/s".to_owned(), format!("{:.0}", report.schedules_per_sec)),
                    (
                        "pending on the nodes (leaders)".to_owned(),
                        format!("{} → {}", report.nodes_pending_before, report.nodes_pending_after),
                    ),
                    (
                        "nodes' heap (sum of RssAnon)".to_owned(),
                        format!(
                            "{} → {} (half) → {}",
                            mib(report.anonymous_bytes_before),
                            mib(report.anonymous_bytes_middle),
                            mib(report.anonymous_bytes_after)
                        ),
                    ),
                    (
                        "heap per pending timer, all / second half".to_owned(),
                        format!(
                            "{:.1} / {:.1} bytes",
                            report.bytes_per_pending_timer, report.bytes_per_pending_timer_second_half
                        ),
                    ),
                    ("timers fired (all due at once)".to_owned(), report.fired.to_string()),
                    ("fires/s".to_owned(), format!("{:.0}", report.fires_per_sec)),
                    (
                        "lateness p50 / p99 / max".to_owned(),
                        format!(
                            "{} / {} / {} ms",
                            report.lateness_ms_p50, report.lateness_ms_p99, report.lateness_ms_max
                        ),
                    ),
                ] {
                    t.add_row([k, v]);
                }
                println!("{t}");
            }
        }
        Ok(())
    })
}
