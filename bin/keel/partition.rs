//! `keel partition move`: moves a partition's replicas and follows the move to its end.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::Admin;
use keel_proto::v1 as pb;
use serde_json::json;

use crate::Output;
use crate::tools::{Connection, ids, runtime};

/// How often a waiting move asks how far it got.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move a partition to other replicas: `keel partition move orders/3 --replicas 2,3,4`. The
    /// new replicas catch up as learners, then replace the old ones as voters; the old ones then
    /// drop their copy. Waits for the end with a progress bar (unless --no-wait); running it
    /// again while the move goes on just waits. `__meta/0` is the metadata log: its replicas
    /// are the controller's voters, one to seven of them (`--replicas 1,2,3,4,5` grows three to
    /// five; naming others moves the controller).
    Move {
        /// `TOPIC/PARTITION`.
        partition: String,
        /// The new replicas' node ids, as many as the topic's replication factor (for `__meta/0`,
        /// the new voters); the first is the preferred leader.
        #[arg(long, value_delimiter = ',', required = true)]
        replicas: Vec<u64>,
        /// Return once the move is recorded, without waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the move itself goes on).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
}

/// Runs a `keel partition` command.
pub fn run(command: PartitionCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let PartitionCommand::Move { partition, replicas, no_wait, timeout_secs } = command;
    let (topic, number) = parse_partition(&partition)?;
    let admin = Admin::new(connection.config()?)?;
    runtime()?.block_on(async {
        let recorded = admin
            .move_partition(&topic, number, &replicas)
            .await
            .with_context(|| format!("moving {topic}/{number} to {replicas:?}"))?;
        let done = if no_wait || recorded.moving_to.is_empty() {
            recorded
        } else {
            follow(&admin, &topic, number, &replicas, Duration::from_secs(timeout_secs), output).await?
        };
        match output {
            Output::Json => println!(
                "{}",
                json!({
                    "topic": topic,
                    "partition": number,
                    "replicas": done.replicas,
                    "moving_to": done.moving_to,
                    "leader": done.leader_id,
                    "in_sync": done.in_sync,
                    "done": done.moving_to.is_empty() && done.replicas == replicas,
                })
            ),
            Output::Text if done.moving_to.is_empty() => {
                let leader = done.leader_id.map_or("being elected".to_owned(), |l| l.to_string());
                println!("{topic}/{number}: replicas {}, leader {leader}", ids(&done.replicas));
            }
            Output::Text => {
                println!("{topic}/{number}: moving from {} to {}", ids(&done.replicas), ids(&done.moving_to));
            }
        }
        Ok(())
    })
}

/// Polls the partition until its replicas are `to` and no move is left, showing how many of the
/// new replicas the leader sees caught up.
async fn follow(
    admin: &Admin,
    topic: &str,
    partition: u32,
    to: &[u64],
    timeout: Duration,
    output: Output,
) -> anyhow::Result<pb::PartitionDescription> {
    let bar = if output == Output::Text { ProgressBar::new(to.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:20} {pos}/{len} in sync {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    loop {
        // A node may be down or electing mid-move: a failed look is retried, not fatal.
        match admin.describe_topic(topic).await {
            Ok(t) => {
                let Some(p) = t.partitions.into_iter().find(|p| p.partition == partition) else {
                    bail!("{topic}/{partition} no longer exists");
                };
                if p.moving_to.is_empty() {
                    bar.finish_and_clear();
                    if p.replicas != to {
                        bail!("{topic}/{partition} has replicas {:?}, not {to:?}: another move came after", p.replicas);
                    }
                    return Ok(p);
                }
                let caught_up = to.iter().filter(|n| p.in_sync.contains(n)).count();
                bar.set_position(caught_up as u64);
                bar.set_message(format!(
                    "{topic}/{partition}: {} -> {}, leader {}, high watermark {}",
                    ids(&p.replicas),
                    ids(&p.moving_to),
                    p.leader_id.map_or("none".to_owned(), |l| l.to_string()),
                    p.high_watermark
                ));
            }
            Err(e) => bar.set_message(format!("asking again ({e})")),
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!("{topic}/{partition} is still moving after {timeout:?}; the move goes on (`keel cluster status`)");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn parse_partition(s: &str) -> anyhow::Result<(String, u32)> {
    let (topic, number) = s.rsplit_once('/').with_context(|| format!("{s:?} is not TOPIC/PARTITION"))?;
    let number = number.parse().with_context(|| format!("{number:?} is not a partition number"))?;
    if topic.is_empty() {
        bail!("{s:?} names no topic");
    }
    Ok((topic.to_owned(), number))
}
