//! The segment log and the disks under it: corruption, power loss, the disk contract, a model check.

#[path = "../common/mod.rs"]
mod common;
mod corruption;
mod crash;
mod disk_conformance;
mod log_model;
mod real_file;
