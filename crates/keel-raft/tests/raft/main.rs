//! Raft groups of real `keel-raft` nodes in this process: replication, crashes, snapshots, many groups.

#[path = "../common/mod.rs"]
mod common;
mod t10_idempotence;
mod t10_replication;
mod t20_crash_and_snapshot;
mod t30_many_groups;
mod t40_quiescence;
mod t50_generations;
mod t60_coalesced;
mod t90_issue_12;
