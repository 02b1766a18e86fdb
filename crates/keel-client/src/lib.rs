//! Keel's Rust client: [`Producer`], [`Consumer`] and [`Admin`] over the public gRPC API
//! (`proto/keel/v1/keel.proto`).
//!
//! Every call has a deadline, retriable errors are retried with exponential backoff and seeded
//! jitter, and requests follow partition leaders (NOT_LEADER hints are used directly). Time comes
//! from `tokio::time` and randomness from [`ClientConfig::seed`], so the client runs unchanged
//! in a deterministic simulation once [`ClientConfig::connect`] dials the simulated network.

mod admin;
mod config;
mod consumer;
mod core;
mod error;
mod partitioner;
mod producer;

pub use admin::Admin;
pub use config::{ClientConfig, Connect, TcpConnect, parse_bootstrap};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, FetchResult, Offset};
pub use error::{ClientError, NOT_LEADER_REASON};
pub use keel_proto::v1::{
    DescribeClusterResponse as ClusterDescription, NodeDescription, PartitionDescription, TopicConfig, TopicDescription,
};
pub use partitioner::{fnv1a_64, partition_for_key};
pub use producer::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
