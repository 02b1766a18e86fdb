//! The deterministic simulations in CI: sweeps of seeds, replays and negative controls.

mod t10_cluster;
mod t20_broker;
mod t30_one_way_cut;
