//! `keel node replace` brings a node that lost its data dir back to full replication; `keel node
//! decommission` empties a node before it is retired.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::Admin;
use keel_proto::v1 as pb;
use serde_json::json;

use crate::Output;
use crate::tools::runtime;

/// How often a waiting replacement asks how far it got.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// After node N lost its data dir: admit its new data dir under its id and rebuild every
    /// partition copy it held (each partition's leader fills a new copy on it; the old one is
    /// never taken for it). Start the node with its empty data dir, before or after. Only for a
    /// node whose data is gone: copies it still holds are discarded. Waits with a progress bar
    /// (unless --no-wait).
    Replace {
        /// The node's id.
        node: u64,
        /// Return once recorded, without waiting for the copies to be rebuilt.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the rebuild itself goes on).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Empty node N: nothing new is placed on it, and every partition it holds moves to the
    /// other nodes (a few at a time; each a `keel partition move`). Waits with a progress bar
    /// until it holds nothing (unless --no-wait); then stop it. A metadata voter stays one.
    Decommission {
        /// The node's id.
        node: u64,
        /// Return once recorded, without waiting for the moves.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the moves themselves go on).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
}

/// Runs a `keel node` command.
pub fn run(command: NodeCommand, connection: &crate::tools::Connection, output: Output) -> anyhow::Result<()> {
    let admin = Admin::new(connection.config()?)?;
    runtime()?.block_on(async {
        match command {
            NodeCommand::Replace { node, no_wait, timeout_secs } => {
                let partitions = admin.replace_node(node).await.with_context(|| format!("replacing node {node}"))?;
                let wait = (!no_wait).then(|| Duration::from_secs(timeout_secs));
                let left = follow(&admin, &partitions, wait, output, |p| !p.moving_to.is_empty()).await;
                report(output, node, "rebuilt", &partitions, &left);
            }
            NodeCommand::Decommission { node, no_wait, timeout_secs } => {
                let partitions =
                    admin.decommission_node(node).await.with_context(|| format!("decommissioning node {node}"))?;
                let wait = (!no_wait).then(|| Duration::from_secs(timeout_secs));
                let holds = |p: &pb::PartitionDescription, n: u64| p.replicas.contains(&n) || p.moving_to.contains(&n);
                let left = follow(&admin, &partitions, wait, output, move |p| holds(p, node)).await;
                report(output, node, "moved off", &partitions, &left);
            }
        }
        Ok(())
    })
}

/// Prints how far the operation on `node` got: `left` of `partitions` are not done.
fn report(output: Output, node: u64, done: &str, partitions: &[String], left: &BTreeSet<String>) {
    match output {
        Output::Json => {
            println!("{}", json!({ "node": node, "partitions": partitions, "pending": left, "done": left.is_empty() }))
        }
        Output::Text if left.is_empty() => println!("node {node}: {} partition copies {done}", partitions.len()),
        Output::Text => println!(
            "node {node}: {} of {} partition copies not {done} yet (`keel cluster status` shows them)",
            left.len(),
            partitions.len()
        ),
    }
}

/// Polls the cluster until none of `partitions` is `pending` any more (or `timeout`); the ones
/// left. Without a timeout, looks once.
async fn follow(
    admin: &Admin,
    partitions: &[String],
    timeout: Option<Duration>,
    output: Output,
    pending: impl Fn(&pb::PartitionDescription) -> bool,
) -> BTreeSet<String> {
    let mut left: BTreeSet<String> = partitions.iter().cloned().collect();
    let Some(timeout) = timeout.filter(|_| !left.is_empty()) else { return left };
    let bar = if output == Output::Text { ProgressBar::new(partitions.len() as u64) } else { ProgressBar::hidden() };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:20} {pos}/{len} copies {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    loop {
        // Nodes may be down or electing meanwhile: a failed look is retried, not fatal.
        match admin.describe_cluster().await {
            Ok(cluster) => {
                let moving: BTreeSet<String> = cluster
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions.iter().filter(|p| pending(p)).map(|p| format!("{}/{}", t.name, p.partition))
                    })
                    .collect();
                left.retain(|p| moving.contains(p));
                bar.set_position((partitions.len() - left.len()) as u64);
                bar.set_message(left.iter().next().map(|p| format!("next: {p}")).unwrap_or_default());
                if left.is_empty() {
                    bar.finish_and_clear();
                    return left;
                }
            }
            Err(e) => bar.set_message(format!("asking again ({e})")),
        }
        if started.elapsed() > timeout {
            bar.abandon();
            return left;
        }
        tokio::time::sleep(POLL).await;
    }
}
