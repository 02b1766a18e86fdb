//! Topic and cluster administration. Any node answers (brokers forward to the controller), so
//! every call tries one node after another until one answers or the request timeout passes.

use keel_proto::v1 as pb;
use keel_record::audit::{Duplicate, PartitionReport, ProducerAudit};

use crate::config::ClientConfig;
use crate::core::Core;
use crate::error::ClientError;

/// Salt of the admin client's random stream (see [`Core::new`]).
const SALT: u64 = 0xad31;

/// Creates, describes and deletes topics.
pub struct Admin {
    core: Core,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("config", &self.core.config).finish()
    }
}

fn topic_of(topic: Option<pb::TopicDescription>, what: &str) -> Result<pb::TopicDescription, ClientError> {
    topic.ok_or_else(|| ClientError::Protocol(format!("{what}: the answer has no topic")))
}

impl Admin {
    /// An admin client; nothing is dialled until the first call.
    pub fn new(config: ClientConfig) -> Result<Admin, ClientError> {
        Ok(Admin { core: Core::new(config, SALT)? })
    }

    /// Transactions pending or expired (and ended ones when `include_ended`), of one producer
    /// group or of every group, in (group, id) order.
    pub async fn list_transactions(
        &self,
        group: Option<&str>,
        include_ended: bool,
    ) -> Result<Vec<pb::TxnStatus>, ClientError> {
        crate::txn::list_txns(&self.core, group, include_ended).await
    }

    /// Puts a transaction the expiry policy rolled back back to pending (its group is checked
    /// again at once).
    pub async fn resume_transaction(&self, group: &str, transaction_id: &str) -> Result<pb::TxnStatus, ClientError> {
        crate::txn::resume_txn(&self.core, group, transaction_id).await
    }

    /// Creates a topic. `replication_factor` must be odd; 0 lets the cluster choose (3, or 1 on a
    /// cluster of fewer than 3 nodes).
    ///
    /// Safe to retry: creating a topic exactly like one that exists (partitions, replication
    /// factor, config) succeeds and changes nothing, so a retry after a lost answer returns the
    /// topic. A different topic of that name is `AlreadyExists`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: pb::TopicConfig,
    ) -> Result<pb::TopicDescription, ClientError> {
        let request =
            pb::CreateTopicRequest { name: name.to_owned(), partitions, replication_factor, config: Some(config) };
        let response = self
            .core
            .call_any("create topic", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).create_topic(request).await }
            })
            .await?;
        let topic = topic_of(response.topic, "create topic")?;
        self.core.apply_topic(&topic);
        Ok(topic)
    }

    /// Deletes a topic and its records. A retry after a lost answer reports `NotFound`: the topic
    /// is gone either way.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = pb::DeleteTopicRequest { name: name.to_owned() };
        self.core
            .call_any("delete topic", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).delete_topic(request).await }
            })
            .await?;
        self.core.forget_topic(name);
        Ok(())
    }

    /// Adds an access rule (README, "Security"); adding one that exists succeeds.
    pub async fn add_acl(&self, rule: pb::AclRule) -> Result<(), ClientError> {
        let request = pb::AclRequest { rule: Some(rule) };
        self.core
            .call_any("add acl", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).add_acl(request).await }
            })
            .await?;
        Ok(())
    }

    /// Removes an access rule; removing one that does not exist succeeds.
    pub async fn remove_acl(&self, rule: pb::AclRule) -> Result<(), ClientError> {
        let request = pb::AclRequest { rule: Some(rule) };
        self.core
            .call_any("remove acl", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).remove_acl(request).await }
            })
            .await?;
        Ok(())
    }

    /// The access rules, or those of one principal (`User:NAME`; `*` rules included).
    pub async fn list_acls(&self, principal: Option<&str>) -> Result<Vec<pb::AclRule>, ClientError> {
        let request = pb::ListAclsRequest { principal: principal.unwrap_or_default().to_owned() };
        let response = self
            .core
            .call_any("list acls", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).list_acls(request).await }
            })
            .await?;
        Ok(response.rules)
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<pb::TopicDescription>, ClientError> {
        let response = self
            .core
            .call_any("list topics", |channel| async move {
                Core::admin(channel).list_topics(pb::ListTopicsRequest {}).await
            })
            .await?;
        Ok(response.topics)
    }

    /// One topic: its partitions, replicas, leaders and watermarks.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicDescription, ClientError> {
        let request = pb::DescribeTopicRequest { name: name.to_owned() };
        let response = self
            .core
            .call_any("describe topic", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).describe_topic(request).await }
            })
            .await?;
        let topic = topic_of(response.topic, "describe topic")?;
        self.core.apply_topic(&topic);
        Ok(topic)
    }

    /// Grows a topic to `total` partitions. Keys then map to other partitions than before.
    ///
    /// The request names the total, not a number to add, so the retries this client makes after a
    /// lost answer can never add partitions twice: a topic that already has `total` partitions is
    /// left as it is (and returned). Fewer than it has is `FailedPrecondition`.
    pub async fn increase_partitions(&self, name: &str, total: u32) -> Result<pb::TopicDescription, ClientError> {
        if total == 0 {
            return Err(ClientError::InvalidArgument("a topic has at least one partition".into()));
        }
        let request = pb::AddPartitionsRequest { name: name.to_owned(), count: 0, target_total: total };
        let response = self
            .core
            .call_any("add partitions", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).add_partitions(request).await }
            })
            .await?;
        let topic = topic_of(response.topic, "add partitions")?;
        self.core.apply_topic(&topic);
        Ok(topic)
    }

    /// Starts moving a partition to `replicas` (as many as its replication factor; the first is
    /// the preferred leader) and returns it as recorded: `moving_to` names the target until the
    /// move is done (watch [`Admin::describe_topic`]). Asking again for the same replicas, or
    /// for the move in progress, changes nothing, so a retry after a lost answer is safe.
    pub async fn move_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u64],
    ) -> Result<pb::PartitionDescription, ClientError> {
        let request = pb::MovePartitionRequest { topic: topic.to_owned(), partition, replicas: replicas.to_vec() };
        let response = self
            .core
            .call_any("move partition", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).move_partition(request).await }
            })
            .await?;
        response.partition.ok_or_else(|| ClientError::Protocol("move partition answered no partition".into()))
    }

    /// After `node` lost its data dir: admits its new data dir's key and rebuilds every partition
    /// copy it held (each a move to the partition's own replicas: watch `moving_to`). Returns
    /// those partitions as `topic/partition`. Only for a node whose data is gone.
    pub async fn replace_node(&self, node: u64) -> Result<Vec<String>, ClientError> {
        let request = pb::ReplaceNodeRequest { node_id: node };
        let response = self
            .core
            .call_any("replace node", |channel| async move { Core::admin(channel).replace_node(request).await })
            .await?;
        Ok(response.partitions)
    }

    /// Empties `node`: nothing new goes to it, and the controller moves each partition it holds
    /// elsewhere. Returns the partitions it holds now (`topic/partition`); watch
    /// [`Admin::describe_cluster`] until none lists it. Asking again changes nothing.
    pub async fn decommission_node(&self, node: u64) -> Result<Vec<String>, ClientError> {
        let request = pb::DecommissionNodeRequest { node_id: node };
        let response =
            self.core
                .call_any("decommission node", |channel| async move {
                    Core::admin(channel).decommission_node(request).await
                })
                .await?;
        Ok(response.partitions)
    }

    /// Nodes, topics, leaders, and the counts of under-replicated and leaderless partitions.
    pub async fn describe_cluster(&self) -> Result<pb::DescribeClusterResponse, ClientError> {
        let response = self
            .core
            .call_any("describe cluster", |channel| async move {
                Core::admin(channel).describe_cluster(pb::DescribeClusterRequest {}).await
            })
            .await?;
        self.core.apply(&response);
        Ok(response)
    }

    /// One chunk of a partition's loss audit (AuditPartition), from `from_offset` (`None`: the
    /// log start), at most `max_records` records (0: the node's default). Merge the chunks of a
    /// partition in order with [`PartitionReport::merge`]; [`Admin::audit_partition`] does.
    pub async fn audit_chunk(
        &self,
        topic: &str,
        partition: u32,
        from_offset: Option<u64>,
        max_records: u64,
    ) -> Result<AuditChunk, ClientError> {
        let request = pb::AuditPartitionRequest { topic: topic.to_owned(), partition, from_offset, max_records };
        let r = self
            .core
            .call_any("audit partition", |channel| {
                let request = request.clone();
                async move { Core::admin(channel).audit_partition(request).await }
            })
            .await?;
        if r.next_offset < r.from_offset || from_offset.is_some_and(|f| f != r.from_offset) {
            return Err(ClientError::Protocol(format!(
                "audit of {topic}/{partition}: read {}..{} when asked from {from_offset:?}",
                r.from_offset, r.next_offset
            )));
        }
        let mut report = PartitionReport { unstamped: r.unstamped_records, ..PartitionReport::default() };
        for p in r.producers {
            let epoch = i16::try_from(p.producer_epoch)
                .map_err(|_| ClientError::Protocol(format!("audit: producer epoch {}", p.producer_epoch)))?;
            let mut audit = ProducerAudit {
                records: p.records,
                duplicates: p.duplicates,
                listed_duplicates: p
                    .duplicate_offsets
                    .iter()
                    .map(|d| Duplicate { sequence: d.sequence, offset: d.offset })
                    .collect(),
                first_offset: p.first_offset,
                last_offset: p.last_offset,
                ..ProducerAudit::default()
            };
            audit.set_ranges(p.ranges.iter().map(|r| (r.start, r.end)).collect());
            report.producers.insert((p.producer_id, epoch), audit);
        }
        Ok(AuditChunk {
            from_offset: r.from_offset,
            next_offset: r.next_offset,
            high_watermark: r.high_watermark,
            log_start_offset: r.log_start_offset,
            report,
        })
    }

    /// The loss audit of a partition from `from_offset` (`None`: the log start) up to the high
    /// watermark the first call saw, in chunks; `progress` hears the offset reached after each.
    /// Returns the first offset read, the end, and the report.
    pub async fn audit_partition(
        &self,
        topic: &str,
        partition: u32,
        from_offset: Option<u64>,
        mut progress: impl FnMut(u64),
    ) -> Result<(u64, u64, PartitionReport), ClientError> {
        let first = self.audit_chunk(topic, partition, from_offset, 0).await?;
        let (from, end) = (first.from_offset, first.high_watermark);
        let mut next = first.next_offset;
        let mut report = first.report;
        progress(next);
        let mut stalls = 0;
        while next < end {
            let chunk = self.audit_chunk(topic, partition, Some(next), 0).await?;
            if chunk.next_offset <= next {
                // A replica behind the first one's high watermark has nothing past `next` yet.
                stalls += 1;
                if stalls > 25 {
                    return Err(ClientError::Protocol(format!(
                        "audit of {topic}/{partition}: no replica answered past offset {next}"
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            stalls = 0;
            // A replica that answered with a later high watermark read past `end`: that is
            // still committed, audited records.
            next = chunk.next_offset;
            report.merge(chunk.report);
            progress(next);
        }
        Ok((from, next.max(end), report))
    }
}

/// One chunk of a partition's loss audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditChunk {
    /// The first offset read.
    pub from_offset: u64,
    /// The offset after the last one read: where the next chunk starts.
    pub next_offset: u64,
    /// The answering replica's high watermark: the audit is complete once it is reached.
    pub high_watermark: u64,
    /// The partition's log start on that replica.
    pub log_start_offset: u64,
    /// What the chunk found.
    pub report: PartitionReport,
}
