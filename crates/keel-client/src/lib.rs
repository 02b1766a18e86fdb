//! Keel's Rust client: [`Producer`], [`Consumer`], [`GroupConsumer`] (consumer groups), [`Admin`]
//! and [`GroupAdmin`] over the public gRPC API
//! (`proto/keel/v1/keel.proto`).
//!
//! Every call has a deadline, retriable errors are retried with exponential backoff and seeded
//! jitter, and requests follow partition leaders (NOT_LEADER hints are used directly). Time comes
//! from `tokio::time` and randomness from [`ClientConfig::seed`], so the client runs unchanged
//! in a deterministic simulation once [`ClientConfig::connect`] dials the simulated network.
//!
//! ```no_run
//! use std::time::Duration;
//! use keel_client::{Admin, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord};
//!
//! # async fn example() -> Result<(), keel_client::ClientError> {
//! let config = ClientConfig::from_bootstrap("127.0.0.1:9091,127.0.0.1:9092")?;
//! Admin::new(config.clone())?.create_topic("orders", 3, 0, Default::default()).await?;
//!
//! let producer = Producer::new(config.clone(), ProducerConfig::default())?;
//! let delivery = producer.send("orders", ProducerRecord::new("hello").with_key("customer-7")).await?;
//! let stored = delivery.await?;
//! println!("stored at {}/{} offset {}", stored.topic, stored.partition, stored.offset);
//! producer.close().await;
//!
//! let mut consumer = Consumer::new(config, ConsumerConfig::default())?;
//! consumer.assign("orders", &[]).await?;
//! for record in consumer.poll(Duration::from_secs(1)).await? {
//!     println!("{}/{} @{}: {:?}", record.topic, record.partition, record.offset, record.value);
//! }
//! # Ok(())
//! # }
//! ```

mod admin;
mod config;
mod consumer;
mod core;
pub mod dedup;
mod error;
#[cfg(test)]
mod fuzz_decoders;
mod group;
pub mod outbox;
mod partitioner;
mod producer;
mod txn;

pub use admin::{Admin, AuditChunk};
pub use config::{ClientConfig, Connect, TcpConnect, Tls, parse_bootstrap};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, FetchResult, Offset, RecordProducer};
pub use error::{ClientError, GROUP_REASONS, NOT_LEADER_REASON, TXN_REASONS};
pub use group::{
    GroupAdmin, GroupConfig, GroupConsumer, HandlerError, NackOutcome, OffsetReset, ProcessSummary, RebalanceListener,
    RetryPolicy, TopicPartition,
};
pub use keel_proto::v1::{
    DescribeClusterResponse as ClusterDescription, NodeDescription, PartitionDescription, TopicConfig, TopicDescription,
};
pub use keel_proto::v1::{TxnCheck, TxnState, TxnStatus};
pub use outbox::{
    AlarmHandler, OutboxAlarm, OutboxConfig, OutboxRow, OutboxStats, OutboxStore, ParkedBatch, RelayError, WallClock,
    WhenFull, relay_once,
};
pub use partitioner::{fnv1a_64, partition_for_key};
pub use producer::{
    DELIVER_AT_HEADER, DeliverAt, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata,
    TIMER_ID_HEADER,
};
pub use txn::{CheckServer, Transactions, TxnOutcome};
