//! `keel audit TOPIC`: audits a topic's partitions up to their high watermark (each replica reads
//! its own log through the Admin API's AuditPartition) and reports, per
//! partition and idempotent producer, the sequence ranges present, the gaps between them (records
//! that may have been acknowledged and lost) and the duplicates; exits non-zero on either.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::{Admin, Consumer, ConsumerConfig};
use keel_record::audit::PartitionReport;
use serde_json::{Value, json};

use crate::Output;
use crate::tools::{Connection, runtime, table};

/// Flags of `keel audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The topic.
    topic: String,
    /// Only these partitions (repeatable); default: every partition.
    #[arg(long)]
    partition: Vec<u32>,
    /// Start at this offset (default: the log start of each partition). Sequences before it are
    /// not seen, so the first range of each producer may start above 0.
    #[arg(long)]
    from: Option<u64>,
}

/// Runs the audit; `Ok(false)` when it found a gap or a duplicate.
pub fn run(args: AuditArgs, connection: &Connection, output: Output) -> anyhow::Result<bool> {
    let config = connection.config()?;
    runtime()?.block_on(async move {
        let admin = Admin::new(config.clone())?;
        let topic = admin.describe_topic(&args.topic).await.with_context(|| format!("describing {}", args.topic))?;
        let partitions: Vec<u32> = if args.partition.is_empty() {
            (0..topic.partitions.len() as u32).collect()
        } else {
            args.partition.clone()
        };
        let consumer = Consumer::new(config, ConsumerConfig::default())?;
        let mut ends = Vec::new();
        let mut total = 0u64;
        for &p in &partitions {
            let (start, high_watermark) = consumer.watermarks(&args.topic, p).await?;
            let from = args.from.unwrap_or(start).max(start);
            total += high_watermark.saturating_sub(from);
            ends.push((p, from));
        }
        let bar = if output == Output::Text { ProgressBar::new(total) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} records {msg}")?);
        bar.enable_steady_tick(Duration::from_millis(200));
        let mut reports = Vec::new();
        for (p, from) in ends {
            bar.set_message(format!("partition {p}"));
            // The replicas audit their own logs (the Admin API's AuditPartition, in bounded
            // chunks): only the reports cross the network, not the records.
            let position = bar.position();
            let (from, to, report) = admin
                .audit_partition(&args.topic, p, Some(from), |reached| {
                    bar.set_position(position + reached.saturating_sub(from));
                })
                .await
                .with_context(|| format!("auditing {}/{p}", args.topic))?;
            bar.set_position(position + to.saturating_sub(from));
            reports.push((p, from, to, report));
        }
        bar.finish_and_clear();
        let clean = reports.iter().all(|(_, _, _, r)| r.is_clean());
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&to_json(&args.topic, &reports, clean))?),
            Output::Text => print_text(&args.topic, &reports, clean),
        }
        Ok(clean)
    })
}

fn to_json(topic: &str, reports: &[(u32, u64, u64, PartitionReport)], clean: bool) -> Value {
    let partitions: Vec<Value> = reports
        .iter()
        .map(|(p, from, to, r)| {
            let producers: Vec<Value> = r
                .producers
                .iter()
                .map(|((id, epoch), a)| {
                    json!({
                        "producer_id": id,
                        "epoch": epoch,
                        "records": a.records,
                        "ranges": a.ranges,
                        "gaps": a.gaps,
                        "missing": a.missing(),
                        "duplicates": a.duplicates,
                        "duplicate_offsets": a.listed_duplicates.iter().map(|d| json!({"sequence": d.sequence, "offset": d.offset})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"partition": p, "from": from, "to": to, "unstamped_records": r.unstamped, "producers": producers})
        })
        .collect();
    json!({"topic": topic, "clean": clean, "partitions": partitions})
}

fn print_text(topic: &str, reports: &[(u32, u64, u64, PartitionReport)], clean: bool) {
    let mut t = table();
    t.set_header(["partition", "producer", "epoch", "records", "sequences", "gaps", "missing", "duplicates"]);
    for (p, _, _, r) in reports {
        for ((id, epoch), a) in &r.producers {
            let ranges = a.ranges.iter().map(|(s, e)| format!("{s}..{e}")).collect::<Vec<_>>().join(", ");
            let gaps = a.gaps.iter().map(|(s, e)| format!("{s}..{e}")).collect::<Vec<_>>().join(", ");
            t.add_row([
                p.to_string(),
                id.to_string(),
                epoch.to_string(),
                a.records.to_string(),
                ranges,
                if gaps.is_empty() { "-".into() } else { gaps },
                a.missing().to_string(),
                a.duplicates.to_string(),
            ]);
        }
    }
    println!("{t}");
    let unstamped: u64 = reports.iter().map(|(_, _, _, r)| r.unstamped).sum();
    if unstamped > 0 {
        println!("{unstamped} records were written without an idempotent producer: nothing to check them by.");
    }
    let read: u64 = reports.iter().map(|(_, from, to, _)| to - from).sum();
    if clean {
        println!("{topic}: {read} records read; no gaps, no duplicates.");
    } else {
        println!("{topic}: {read} records read; GAPS OR DUPLICATES FOUND (see above).");
    }
}
