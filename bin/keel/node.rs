//! `keel node replace`: brings a node that lost its data dir back to full replication.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::Admin;
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
}

/// Runs a `keel node` command.
pub fn run(command: NodeCommand, connection: &crate::tools::Connection, output: Output) -> anyhow::Result<()> {
    let NodeCommand::Replace { node, no_wait, timeout_secs } = command;
    let admin = Admin::new(connection.config()?)?;
    runtime()?.block_on(async {
        let partitions = admin.replace_node(node).await.with_context(|| format!("replacing node {node}"))?;
        let left = if no_wait || partitions.is_empty() {
            partitions.iter().cloned().collect()
        } else {
            follow(&admin, &partitions, Duration::from_secs(timeout_secs), output).await
        };
        match output {
            Output::Json => println!(
                "{}",
                json!({ "node": node, "partitions": partitions, "rebuilding": left, "done": left.is_empty() })
            ),
            Output::Text if left.is_empty() => {
                println!("node {node}: {} partition copies rebuilt", partitions.len());
            }
            Output::Text => println!(
                "node {node}: {} of {} partition copies still being rebuilt (`keel cluster status` shows them)",
                left.len(),
                partitions.len()
            ),
        }
        Ok(())
    })
}

/// Polls the cluster until none of `partitions` is moving any more (or `timeout`); the ones left.
async fn follow(admin: &Admin, partitions: &[String], timeout: Duration, output: Output) -> BTreeSet<String> {
    let bar = if output == Output::Text { ProgressBar::new(partitions.len() as u64) } else { ProgressBar::hidden() };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:20} {pos}/{len} copies {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let mut left: BTreeSet<String> = partitions.iter().cloned().collect();
    loop {
        // Nodes may be down or electing meanwhile: a failed look is retried, not fatal.
        match admin.describe_cluster().await {
            Ok(cluster) => {
                let moving: BTreeSet<String> = cluster
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions
                            .iter()
                            .filter(|p| !p.moving_to.is_empty())
                            .map(|p| format!("{}/{}", t.name, p.partition))
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
