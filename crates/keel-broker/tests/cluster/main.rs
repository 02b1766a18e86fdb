//! Brokers in this process on 127.0.0.x, driven through the gRPC API and the Rust client (one test
//! binary; `t10_tracing` stays apart because it installs the process's global subscriber).

#[path = "../common/mod.rs"]
mod common;
mod t10_api;
mod t20_groups;
mod t20_producer_ids;
mod t30_group_consumer;
mod t30_group_lag;
mod t40_group_retry;
mod t50_delayed;
mod t60_moves;
mod t70_voters;
