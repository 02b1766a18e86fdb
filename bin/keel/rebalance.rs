//! `keel cluster rebalance`: spreads replicas, then preferred leaders, evenly over the active
//! nodes, as partition moves (`MovePartition`) the partitions' leaders carry out under the
//! catch-up throttle. The plan is computed here from `DescribeCluster` (what Kafka's
//! `kafka-reassign-partitions --generate` does), shown, and executed a few moves at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use keel_client::Admin;
use keel_proto::v1 as pb;
use serde::Serialize;
use serde_json::json;

use crate::Output;
use crate::tools::{Connection, ids, runtime};

/// How often a running rebalance looks at its moves.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Show the plan without moving anything.
    #[arg(long)]
    dry_run: bool,
    /// Moves at most (the most useful first); run again for the rest.
    #[arg(long, default_value_t = 1_000)]
    max_moves: usize,
    /// Moves under way at once (each new replica's catch-up is also paced by the nodes'
    /// `catch_up_bytes_per_sec`).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Give up waiting after this many seconds (moves under way go on).
    #[arg(long, default_value_t = 3_600)]
    timeout_secs: u64,
}

/// One planned move: a partition's replicas now and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    pub topic: String,
    pub partition: u32,
    pub from: Vec<u64>,
    pub to: Vec<u64>,
}

/// The moves that even out replicas, then preferred leaders (first replicas), over `nodes`:
/// each step moves one replica from the node holding the most to the one holding the fewest
/// (among partitions holding the first and not the second), until no two nodes differ by more
/// than one; then reorders replica lists so that preferred leaders differ by at most one too.
/// Partitions that are moving already, and `__meta`, are left alone. Deterministic.
pub fn plan(nodes: &BTreeSet<u64>, partitions: &[(String, u32, Vec<u64>)], max_moves: usize) -> Vec<Move> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut current: BTreeMap<(String, u32), Vec<u64>> =
        partitions.iter().map(|(t, p, r)| ((t.clone(), *p), r.clone())).collect();
    let count = |current: &BTreeMap<(String, u32), Vec<u64>>, first_only: bool| {
        let mut c: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for replicas in current.values() {
            let counted = if first_only { &replicas[..replicas.len().min(1)] } else { &replicas[..] };
            for n in counted {
                if let Some(x) = c.get_mut(n) {
                    *x += 1;
                }
            }
        }
        c
    };
    // Replicas on nodes that are not active (decommissioned) count as the most loaded.
    let bound = partitions.iter().map(|(_, _, r)| r.len()).sum::<usize>() + 1;
    for _ in 0..bound {
        let load = count(&current, false);
        let outside = current.values().flatten().find(|n| !nodes.contains(n)).copied();
        let (hi, hi_load) = match outside {
            Some(n) => (n, usize::MAX),
            None => {
                load.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))).map(|(n, c)| (*n, *c)).unwrap_or((0, 0))
            }
        };
        // The least loaded node that can take one of `hi`'s replicas (it lacks that partition).
        let mut lows: Vec<(u64, usize)> = load.iter().map(|(n, c)| (*n, *c)).collect();
        lows.sort_by_key(|(n, c)| (*c, *n));
        let candidate = lows.iter().filter(|(_, c)| hi_load > c + 1).find_map(|(lo, _)| {
            let key = current.iter().find(|(_, r)| r.contains(&hi) && !r.contains(lo)).map(|(k, _)| k.clone())?;
            Some((key, *lo))
        });
        let Some((key, lo)) = candidate else { break };
        if let Some(replicas) = current.get_mut(&key) {
            for n in replicas.iter_mut() {
                if *n == hi {
                    *n = lo;
                }
            }
        }
    }
    for _ in 0..bound {
        let leads = count(&current, true);
        let Some((hi, hi_leads)) =
            leads.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))).map(|(n, c)| (*n, *c))
        else {
            break;
        };
        // A partition led by `hi` with another replica leading at least two fewer.
        let swap = current.iter().find_map(|(k, r)| {
            if r.first() != Some(&hi) {
                return None;
            }
            let (i, _) = r
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, n)| leads.get(n).is_some_and(|c| c + 1 < hi_leads))
                .min_by_key(|(_, n)| leads[n])?;
            Some((k.clone(), i))
        });
        let Some((key, i)) = swap else { break };
        if let Some(replicas) = current.get_mut(&key) {
            replicas.swap(0, i);
        }
    }
    let mut moves: Vec<Move> = partitions
        .iter()
        .filter_map(|(t, p, from)| {
            let to = &current[&(t.clone(), *p)];
            (to != from).then(|| Move { topic: t.clone(), partition: *p, from: from.clone(), to: to.clone() })
        })
        .collect();
    // Replica moves (data to copy) first, reorderings (a leadership handover) after.
    moves.sort_by_key(|m| {
        let same: BTreeSet<u64> = m.from.iter().copied().collect();
        m.to.iter().all(|n| same.contains(n))
    });
    moves.truncate(max_moves);
    moves
}

/// Runs `keel cluster rebalance`.
pub fn run(args: RebalanceArgs, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let admin = Admin::new(connection.config()?)?;
    runtime()?.block_on(async {
        let view = admin.describe_cluster().await.context("describing the cluster")?;
        let nodes: BTreeSet<u64> = view.nodes.iter().filter(|n| !n.decommissioned).map(|n| n.node_id).collect();
        let partitions: Vec<(String, u32, Vec<u64>)> = view
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .filter(|p| p.moving_to.is_empty())
                    .map(|p| (t.name.clone(), p.partition, p.replicas.clone()))
            })
            .collect();
        let moves = plan(&nodes, &partitions, args.max_moves);
        if output == Output::Text {
            print_plan(&moves, &nodes, &partitions);
        }
        if args.dry_run || moves.is_empty() {
            if output == Output::Json {
                println!("{}", json!({ "planned": moves, "done": false }));
            }
            return Ok(());
        }
        let failed = execute(&admin, &moves, &args, output).await?;
        match output {
            Output::Json => println!("{}", json!({ "planned": moves, "done": failed.is_empty(), "failed": failed })),
            Output::Text if failed.is_empty() => println!("rebalanced: {} moves done", moves.len()),
            Output::Text => {
                println!("{} of {} moves done; refused: {}", moves.len() - failed.len(), moves.len(), failed.join("; "))
            }
        }
        Ok(())
    })
}

fn print_plan(moves: &[Move], nodes: &BTreeSet<u64>, partitions: &[(String, u32, Vec<u64>)]) {
    let load = |lists: &mut dyn Iterator<Item = &Vec<u64>>| {
        let mut replicas: BTreeMap<u64, (usize, usize)> = nodes.iter().map(|n| (*n, (0, 0))).collect();
        for r in lists {
            for (i, n) in r.iter().enumerate() {
                let e = replicas.entry(*n).or_default();
                e.0 += 1;
                if i == 0 {
                    e.1 += 1;
                }
            }
        }
        replicas
    };
    let planned: BTreeMap<(&str, u32), &Vec<u64>> =
        moves.iter().map(|m| ((m.topic.as_str(), m.partition), &m.to)).collect();
    let before = load(&mut partitions.iter().map(|(_, _, r)| r));
    let after = load(&mut partitions.iter().map(|(t, p, r)| planned.get(&(t.as_str(), *p)).copied().unwrap_or(r)));
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_HORIZONTAL_ONLY);
    table.set_header(["node", "replicas", "after", "preferred leader of", "after"]);
    for (n, (r, l)) in &before {
        let (ra, la) = after.get(n).copied().unwrap_or_default();
        table.add_row([n.to_string(), r.to_string(), ra.to_string(), l.to_string(), la.to_string()]);
    }
    println!("{table}");
    if moves.is_empty() {
        println!("balanced: nothing to move");
        return;
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_HORIZONTAL_ONLY);
    table.set_header(["partition", "replicas", "to"]);
    for m in moves {
        table.add_row([format!("{}/{}", m.topic, m.partition), ids(&m.from), ids(&m.to)]);
    }
    println!("{table}");
}

/// Starts the moves, at most `concurrency` under way, and waits for them; returns the refused.
async fn execute(admin: &Admin, moves: &[Move], args: &RebalanceArgs, output: Output) -> anyhow::Result<Vec<String>> {
    let bar = if output == Output::Text { ProgressBar::new(moves.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:20} {pos}/{len} moves {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut waiting = moves.iter();
    let mut running: Vec<&Move> = Vec::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < args.concurrency.max(1) {
            let Some(m) = waiting.next() else { break };
            match admin.move_partition(&m.topic, m.partition, &m.to).await {
                Ok(_) => running.push(m),
                Err(e) => {
                    failed.push(format!("{}/{}: {e}", m.topic, m.partition));
                    bar.inc(1);
                }
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::time::sleep(POLL).await;
        // A failed look is retried: a node may be electing mid-move.
        if let Ok(view) = admin.describe_cluster().await {
            let state: BTreeMap<(&str, u32), &pb::PartitionDescription> = view
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(move |p| ((t.name.as_str(), p.partition), p)))
                .collect();
            running.retain(|m| {
                let done = state.get(&(m.topic.as_str(), m.partition)).is_none_or(|p| p.moving_to.is_empty());
                if done {
                    bar.inc(1);
                }
                !done
            });
            bar.set_message(
                running.iter().map(|m| format!("{}/{}", m.topic, m.partition)).collect::<Vec<_>>().join(" "),
            );
        }
        if started.elapsed() > timeout {
            bar.abandon();
            anyhow::bail!("{} moves still under way after {timeout:?} (they go on)", running.len());
        }
    }
    bar.finish_and_clear();
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(lists: &[&[u64]]) -> Vec<(String, u32, Vec<u64>)> {
        lists.iter().enumerate().map(|(i, r)| ("t".to_owned(), i as u32, r.to_vec())).collect()
    }

    fn loads(
        nodes: &BTreeSet<u64>,
        partitions: &[(String, u32, Vec<u64>)],
        moves: &[Move],
    ) -> (Vec<usize>, Vec<usize>) {
        let after: Vec<Vec<u64>> = partitions
            .iter()
            .map(|(t, p, r)| {
                moves.iter().find(|m| &m.topic == t && m.partition == *p).map_or(r.clone(), |m| m.to.clone())
            })
            .collect();
        let replicas = nodes.iter().map(|n| after.iter().filter(|r| r.contains(n)).count()).collect();
        let leaders = nodes.iter().map(|n| after.iter().filter(|r| r[0] == *n).count()).collect();
        (replicas, leaders)
    }

    #[test]
    fn a_new_node_gets_its_share_and_leaders_spread() {
        // Six partitions on nodes 1-3, node 4 just added.
        let nodes: BTreeSet<u64> = [1, 2, 3, 4].into();
        let partitions = parts(&[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2], &[1, 2, 3], &[2, 3, 1], &[3, 1, 2]]);
        let moves = plan(&nodes, &partitions, 100);
        let (replicas, leaders) = loads(&nodes, &partitions, &moves);
        assert!(replicas.iter().max().unwrap() - replicas.iter().min().unwrap() <= 1, "{replicas:?}");
        assert!(leaders.iter().max().unwrap() - leaders.iter().min().unwrap() <= 1, "{leaders:?}");
        for m in &moves {
            let distinct: BTreeSet<u64> = m.to.iter().copied().collect();
            assert_eq!(distinct.len(), m.to.len(), "a replica list names a node once: {m:?}");
            assert_eq!(m.to.len(), m.from.len(), "a move keeps the replication factor");
        }
        assert_eq!(plan(&nodes, &partitions, 100), moves, "deterministic");
        assert_eq!(plan(&nodes, &partitions, 2), moves[..2].to_vec(), "--max-moves keeps the first");
    }

    #[test]
    fn a_balanced_cluster_needs_nothing_and_a_decommissioned_node_is_emptied() {
        let nodes: BTreeSet<u64> = [1, 2, 3].into();
        let partitions = parts(&[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2]]);
        assert!(plan(&nodes, &partitions, 100).is_empty());
        // Node 3 left the active set: its replicas go elsewhere (here, to node 4).
        let nodes: BTreeSet<u64> = [1, 2, 4].into();
        let moves = plan(&nodes, &partitions, 100);
        let (replicas, _) = loads(&nodes, &partitions, &moves);
        assert_eq!(replicas, [3, 3, 3]);
    }
}
