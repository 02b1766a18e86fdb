//! `keel bench`: speed measured on this machine, reported as rates and latency percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use keel_record::{BatchBuilder, NewRecord};
use keel_storage::{Disk, FileDisk, LogConfig, SegmentLog};
use serde::Serialize;

use crate::Output;
use crate::clock::Stopwatch;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable appends to one segment log on this disk: append a batch, flush it (msync), repeat.
    Storage(StorageArgs),
    /// Produce to a running cluster: records/s, MB/s and acknowledgement latency.
    Produce(crate::bench_net::ProduceBenchArgs),
    /// Consume a topic from the beginning: records/s and MB/s of catch-up reads.
    Consume(crate::bench_net::ConsumeBenchArgs),
    /// Offset commits through one group coordinator: commits/s and commit latency.
    Commits(crate::bench_groups::CommitsBenchArgs),
    /// Kill a group member and time until another member consumes its partitions again.
    GroupFailover(crate::bench_groups::FailoverBenchArgs),
    /// Delayed messages: the nodes' memory per pending timer, and fires/s while they wait.
    Delayed(crate::bench_delayed::DelayedBenchArgs),
    /// What idle partitions cost: the nodes' CPU, memory, open files and threads before and
    /// after creating a topic of many partitions, and how long their leader elections took.
    Idle(crate::bench_idle::IdleBenchArgs),
    /// Move a partition of a gigabyte (`--bytes`) to another node while producers write other
    /// partitions: how long the move takes under the catch-up throttle, and their throughput
    /// during it against just before.
    Move(crate::bench_move::MoveBenchArgs),
}

#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Directory for the log; a fresh temporary directory (deleted afterwards) if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Stop after this many records.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Stop after this many seconds, whichever comes first.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Records per batch (one batch = one append and one flush).
    #[arg(long, default_value_t = 16)]
    batch: u32,
    /// Bytes of each record value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Segment size in MiB.
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
}

/// One run's figures, as printed with `--output json`.
#[derive(Debug, Serialize)]
struct StorageReport {
    records: u64,
    batches: u64,
    records_per_batch: u32,
    value_bytes: usize,
    seconds: f64,
    records_per_sec: f64,
    mib_per_sec: f64,
    /// Latency of one durable append (append + flush), microseconds.
    latency_us_p50: u64,
    latency_us_p99: u64,
    latency_us_p999: u64,
    latency_us_max: u64,
    /// The log's end after the run (next offset): proof of what was written.
    end_offset: u64,
    dir: Option<PathBuf>,
}

pub fn run(what: BenchCommand, output: Output) -> anyhow::Result<()> {
    match what {
        BenchCommand::Storage(args) => storage(args, output),
        BenchCommand::Produce(args) => crate::bench_net::produce(args, output),
        BenchCommand::Consume(args) => crate::bench_net::consume(args, output),
        BenchCommand::Commits(args) => crate::bench_groups::commits(args, output),
        BenchCommand::GroupFailover(args) => crate::bench_groups::group_failover(args, output),
        BenchCommand::Delayed(args) => crate::bench_delayed::delayed(args, output),
        BenchCommand::Idle(args) => crate::bench_idle::idle(args, output),
        BenchCommand::Move(args) => crate::bench_move::move_bench(args, output),
    }
}

fn storage(args: StorageArgs, output: Output) -> anyhow::Result<()> {
    if args.batch == 0 || args.records == 0 {
        bail!("--batch and --records must be at least 1");
    }
    if args.segment_mib == 0 || args.segment_mib > 4096 {
        bail!("--segment-mib must be within 1..=4096");
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().join("bench-0")
        }
    };
    let config = LogConfig { segment_bytes_max: args.segment_mib << 20, ..LogConfig::default() };
    let mut log = SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, &dir, config)
        .with_context(|| format!("opening the log in {}", dir.display()))?;

    let value: Vec<u8> = (0..args.value_bytes).map(|i| (i % 251) as u8).collect();
    let mut builder = BatchBuilder::new(log.config().batch_bytes_max());
    for i in 0..args.batch {
        builder
            .push(NewRecord { timestamp_ms: i64::from(i), key: None, value: Some(&value), headers: &[] })
            .context("--batch × --value-bytes is larger than the largest batch")?;
    }
    let template = builder.build().to_vec();
    let mut buf = template.clone();

    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let progress = ProgressBar::new(args.records);
    progress.set_style(
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if output == Output::Json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let limit = Duration::from_secs(args.duration);
    let clock = Stopwatch::start();
    let (mut records, mut batches) = (0u64, 0u64);
    while records < args.records && clock.elapsed() < limit {
        buf.copy_from_slice(&template);
        let one = Stopwatch::start();
        log.append(&mut buf, 1)?;
        log.flush()?;
        latency.saturating_record(one.elapsed().as_micros() as u64);
        records += u64::from(args.batch);
        batches += 1;
        progress.inc(u64::from(args.batch));
    }
    let seconds = clock.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let end_offset = log.durable().offset;
    log.close()?;
    let report = StorageReport {
        records,
        batches,
        records_per_batch: args.batch,
        value_bytes: args.value_bytes,
        seconds,
        records_per_sec: records as f64 / seconds,
        mib_per_sec: (batches * template.len() as u64) as f64 / seconds / (1024.0 * 1024.0),
        latency_us_p50: latency.value_at_quantile(0.50),
        latency_us_p99: latency.value_at_quantile(0.99),
        latency_us_p999: latency.value_at_quantile(0.999),
        latency_us_max: latency.max(),
        end_offset,
        dir: args.dir.clone(),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["measure", "value"]);
            let rows = [
                ("records", report.records.to_string()),
                ("batches (append + flush each)", report.batches.to_string()),
                ("records/s", format!("{:.0}", report.records_per_sec)),
                ("MiB/s", format!("{:.1}", report.mib_per_sec)),
                ("latency p50", format!("{} µs", report.latency_us_p50)),
                ("latency p99", format!("{} µs", report.latency_us_p99)),
                ("latency p99.9", format!("{} µs", report.latency_us_p999)),
                ("latency max", format!("{} µs", report.latency_us_max)),
            ];
            for (k, v) in rows {
                table.add_row([k.to_owned(), v]);
            }
            println!("{table}");
        }
    }
    Ok(())
}
