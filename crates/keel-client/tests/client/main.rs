//! The Rust client against a scripted fake broker, and (ignored by default) against a real cluster.

#[path = "../fake/mod.rs"]
mod fake;
mod t10_fake_broker;
mod t20_real_cluster;
