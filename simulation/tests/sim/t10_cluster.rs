//! The cluster simulation in CI: a sweep of seeds that must pass, determinism (same seed, same
//! trace), and the negative control (an ack-before-flush build must be caught).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use keel_simulation::{Workload, failures, run};

/// Seeds run by `cargo test`; `cargo run -p keel-simulation --release -- --workload cluster
/// --seeds 0..2000` sweeps more.
const SEEDS: u64 = 24;

#[test]
fn cluster_seeds_pass() {
    let failures = failures(Workload::Cluster, 0..SEEDS);
    assert!(failures.is_empty(), "{} of {SEEDS} seeds failed:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn same_seed_same_history() {
    for seed in [3, 11] {
        let (a, b) = (run(Workload::Cluster, seed), run(Workload::Cluster, seed));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} replays identically");
        assert_eq!(a.events, b.events);
    }
}

/// A checker that cannot fail proves nothing: acknowledging before the flush, with every node
/// crashed now and then, must be reported as lost or inconsistent writes.
#[test]
fn ack_before_flush_is_caught() {
    let caught = (0..4u64).filter(|&seed| run(Workload::ClusterAckBeforeFlush, seed).violation.is_some()).count();
    assert!(caught >= 3, "only {caught} of 4 seeds caught acknowledging before the flush");
}
