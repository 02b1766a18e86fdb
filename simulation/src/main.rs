//! The simulation driver: `--seed S` replays one run, `--seeds A..B` sweeps. Every run prints
//! `seed S trace HEX`; a sweep ends with `simulation: N passed, M failed` and exits non-zero when
//! anything failed.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use keel_simulation::{RunReport, Workload, run_watching, sweep};

/// Deterministic simulation of Keel: every run is a function of its seed.
#[derive(Debug, Parser)]
#[command(name = "keel-simulation")]
struct Args {
    /// Replay one seed (prints its history excerpt on failure).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep a half-open range of seeds, e.g. `0..1000`.
    #[arg(long)]
    seeds: Option<String>,
    /// Print the history of every run as it happens, not only the end of failed ones.
    #[arg(long)]
    verbose: bool,
    /// Run each seed twice in this process and report where the two histories first differ (a
    /// replay must not depend on what ran before it, nor on how fast the machine is).
    #[arg(long, conflicts_with = "verbose")]
    twice: bool,
    /// Seeds run at once (each run is single-threaded); defaults to the number of cores.
    #[arg(long)]
    jobs: Option<usize>,
    /// What to simulate (the whole system by default).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Broker)]
    workload: WorkloadArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadArg {
    /// One segment log under power loss.
    Storage,
    /// Three raft nodes under crashes and partitions.
    Cluster,
    /// The negative control: the cluster with an ack-before-flush bug (must fail).
    ClusterAckBeforeFlush,
    /// Three brokers and their clients under crashes and partitions.
    Broker,
    /// The negative control: the brokers with an ack-before-flush bug (must fail).
    BrokerAckBeforeFlush,
    /// The negative control: a group coordinator that acknowledges commits before the quorum flush.
    BrokerGroupAckBeforeCommit,
    /// The negative control: a group coordinator without epoch fencing (zombie commits pass).
    BrokerGroupNoFencing,
    /// The negative control: a group coordinator whose per-group lock a cancelled request releases.
    BrokerGroupUnlockOnCancel,
    /// The negative control: producers without idempotence (their retries write duplicates).
    BrokerNoIdempotence,
    /// The negative control: every node hands out the same producer ids.
    BrokerProducerIdsReused,
    /// The negative control: a successor of a producer identity gets its predecessor's epoch.
    BrokerIdentityEpochReused,
    /// The negative control: dead letters published without their producer stamp.
    BrokerDeadLetterUnstamped,
    /// The negative control: timers fired by the wall clock alone (early under a forward step).
    BrokerDelayedWallClock,
    /// The negative control: contradictory transaction ENDs acknowledged instead of refused.
    BrokerTxnContradictionsAccepted,
    /// The negative control: the outbox producer writes no stamps (duplicates after restarts).
    BrokerOutboxUnstamped,
    /// The negative control: the outbox's disk lies about flushes (records lost after crashes).
    BrokerOutboxLyingFlush,
    /// The negative control: node-wide flushes of several partitions sync nothing (must fail).
    BrokerNodeFlushWrongFilesystem,
    /// The negative control: writes to a quiescent leader do not wake its group (must fail).
    BrokerQuiescentWritesDoNotWake,
    /// The negative control: moves reported finished before the new replicas caught up.
    BrokerMoveFinishedEarly,
    /// The negative control: every AppendEntries batch answer read as a success.
    BrokerBatchFailuresReadAsSuccess,
    /// A partition leader's messages to its followers dropped for 20 s: produce must resume.
    OneWayCut,
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s.split_once("..").context("--seeds takes A..B")?;
    let (a, b): (u64, u64) = (a.parse().context("bad start seed")?, b.parse().context("bad end seed")?);
    if a >= b {
        bail!("--seeds {a}..{b} is empty");
    }
    Ok(a..b)
}

fn main() -> anyhow::Result<ExitCode> {
    // Logs of the simulated nodes, when asked for (`KEEL_LOG=keel_broker=debug`): for replaying a
    // failing seed; they do not change the run.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG") {
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
    }
    let args = Args::parse();
    let workload = match args.workload {
        WorkloadArg::Storage => Workload::Storage,
        WorkloadArg::Cluster => Workload::Cluster,
        WorkloadArg::ClusterAckBeforeFlush => Workload::ClusterAckBeforeFlush,
        WorkloadArg::Broker => Workload::Broker,
        WorkloadArg::BrokerAckBeforeFlush => Workload::BrokerAckBeforeFlush,
        WorkloadArg::BrokerGroupAckBeforeCommit => Workload::BrokerGroupAckBeforeCommit,
        WorkloadArg::BrokerGroupNoFencing => Workload::BrokerGroupNoFencing,
        WorkloadArg::BrokerGroupUnlockOnCancel => Workload::BrokerGroupUnlockOnCancel,
        WorkloadArg::BrokerNoIdempotence => Workload::BrokerNoIdempotence,
        WorkloadArg::BrokerProducerIdsReused => Workload::BrokerProducerIdsReused,
        WorkloadArg::BrokerIdentityEpochReused => Workload::BrokerIdentityEpochReused,
        WorkloadArg::BrokerDeadLetterUnstamped => Workload::BrokerDeadLetterUnstamped,
        WorkloadArg::BrokerDelayedWallClock => Workload::BrokerDelayedWallClock,
        WorkloadArg::BrokerTxnContradictionsAccepted => Workload::BrokerTxnContradictionsAccepted,
        WorkloadArg::BrokerOutboxUnstamped => Workload::BrokerOutboxUnstamped,
        WorkloadArg::BrokerOutboxLyingFlush => Workload::BrokerOutboxLyingFlush,
        WorkloadArg::BrokerQuiescentWritesDoNotWake => Workload::BrokerQuiescentWritesDoNotWake,
        WorkloadArg::BrokerNodeFlushWrongFilesystem => Workload::BrokerNodeFlushWrongFilesystem,
        WorkloadArg::BrokerMoveFinishedEarly => Workload::BrokerMoveFinishedEarly,
        WorkloadArg::BrokerBatchFailuresReadAsSuccess => Workload::BrokerBatchFailuresReadAsSuccess,
        WorkloadArg::OneWayCut => Workload::OneWayCut,
    };
    let seeds = match (args.seed, &args.seeds) {
        (Some(s), _) => s..s + 1,
        (None, Some(r)) => parse_range(r)?,
        (None, None) => 0..100,
    };
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut report_one = |report: RunReport| {
        println!("{report}");
        if args.verbose {
            println!("  {} events", report.events);
        }
        match &report.violation {
            None => passed += 1,
            Some(violation) => {
                failed += 1;
                println!("FAILED: {violation}");
                println!(
                    "  replay: cargo run -p keel-simulation --release -- --workload {} --seed {}",
                    workload.name(),
                    report.seed
                );
                println!("  last events:");
                for line in &report.tail {
                    println!("    {line}");
                }
            }
        }
    };
    let mut diverged = 0u64;
    if args.twice {
        for seed in seeds {
            let mut histories = [Vec::new(), Vec::new()];
            for history in &mut histories {
                report_one(run_watching(workload, seed, 0, &mut |line| history.push(line.to_owned())));
            }
            let [a, b] = &histories;
            if let Some((i, (x, y))) = a.iter().zip(b).enumerate().find(|(_, (x, y))| x != y) {
                diverged += 1;
                println!("seed {seed} replays differently: event {i} was\n    {x}\nand is\n    {y}");
            } else if a.len() != b.len() {
                diverged += 1;
                println!("seed {seed} replays differently: {} events, then {}", a.len(), b.len());
            }
        }
    } else if args.verbose {
        // One at a time, printed as it happens, so that a run that hangs shows where.
        for seed in seeds {
            report_one(run_watching(workload, seed, 12, &mut |line| println!("    {line}")));
        }
    } else {
        let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        sweep(workload, seeds, jobs, &mut report_one);
    }
    failed += diverged;
    println!("simulation: {passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
