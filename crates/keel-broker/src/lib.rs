//! A Keel node: the metadata controller (raft group 0, `__meta`), the partition groups its
//! assignment gives this node, and the gRPC services clients and peers talk to.
//!
//! - [`metadata`]: the pure metadata state machine (nodes, topics, assignment, producer ids);
//! - [`broker`]: the node's life: metadata follower, reconciler, controller operations;
//! - [`service`]: Producer, Consumer, Admin, Controller and NodeStatus over gRPC;
//! - [`coordinator`]: the coordinator runtime (DESIGN.md §6.1) over an internal-topic partition;
//! - [`groups`]: consumer-group coordinators on that runtime, served by the `Groups` gRPC service;
//! - [`delayed`]: timer coordinators of `__delayed` (delayed produce, cancel, firing);
//! - [`txn`]: transaction coordinators of `__txn` (half messages, END, check-backs, expiry);
//! - [`producer_ids`]: the node's block of producer ids behind `InitProducerId`;
//! - `publisher`: a coordinator's decided records (dead letters, due timers) sent exactly once;
//! - [`size_status`]: tonic's size-limit answers turned into RESOURCE_EXHAUSTED;
//! - [`metrics`]: the node's Prometheus series, served on `/metrics` by its own HTTP listener;
//! - [`tls`]: TLS on the listeners and the principal a connection proves;
//! - [`auth`]: tokens and the caller of a request; [`acl`]: allow rules and their decision;
//!   [`quota`]: per-principal byte rates;
//! - [`config`]: settings and the data dir's identity; [`error`]: errors and their statuses.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod config;
pub mod coordinator;
pub mod delayed;
pub mod error;
pub mod groups;
mod groups_service;
mod lag;
pub mod metadata;
pub mod metrics;
mod metrics_groups;
mod metrics_http;
mod moves;
pub mod producer_ids;
mod publisher;
pub mod quota;
pub mod service;
pub mod size_status;
pub mod tls;
pub mod txn;

pub use broker::{Broker, Clock, REQUEST_ID_HEADER, StorageMode};
pub use config::{
    AuthSettings, BrokerConfig, DelayedSettings, GroupSettings, Identity, Limits, TxnSettings, node_key_from_seed,
};
pub use coordinator::CoordinatorFaults;
pub use error::BrokerError;
pub use keel_coordinator::txn::{ExpiryPolicy as TxnExpiryPolicy, TxnLimits};
pub use metadata::{DELAYED_TOPIC, META_GROUP, META_TOPIC, Metadata, OFFSETS_TOPIC, TXN_TOPIC};

#[cfg(test)]
mod fuzz_decoders;
