//! End-to-end tests against real `keel` processes on 127.0.0.x (one test binary: each binary links
//! the whole dependency graph again, which made the build of many the larger part of `.ci/run`).

#[path = "../common/mod.rs"]
mod common;
mod t10_bench_storage;
mod t10_e2e_failover;
mod t20_e2e_dev;
mod t20_e2e_metrics;
mod t20_e2e_restart;
mod t30_e2e_abuse;
mod t30_e2e_catch_up;
mod t30_e2e_groups;
mod t30_e2e_tls;
mod t40_e2e_retry;
mod t50_e2e_delayed;
mod t60_e2e_outbox;
mod t70_e2e_txn;
