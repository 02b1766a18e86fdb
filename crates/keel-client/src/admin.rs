//! Topic and cluster administration. Any node answers (brokers forward to the controller), so
//! every call tries one node after another until one answers or the request timeout passes.

use keel_proto::v1 as pb;

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
}
