//! Publishing exactly once from a coordinator (DESIGN.md, "publishing exactly once from a
//! shard"). An operation that must put a record into a topic (a group's dead letter, a delayed
//! record that is due) does not send it: it commits a `Publish` decision stamped with the
//! shard's producer identity for the target partition (id, epoch, sequence). This loop, on the coordinator's leader only, sends every
//! unconfirmed decision in stamp order as an idempotent produce with exactly that stamp, then
//! confirms it with another group operation. A failover between the send and the confirmation
//! makes the next coordinator send it again with the same stamp, and the target's producer table
//! answers with the original offset (or DUPLICATE_SEQUENCE_NUMBER once it forgot where): the
//! record lands once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keel_coordinator::groups::Tp;
use keel_coordinator::publish::{self, Pending, Publishing};
use keel_proto::v1 as pb;
use keel_proto::v1::admin_client::AdminClient;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::{debug, info, warn};

use crate::broker::{Inner, is_transport_failure};
use crate::coordinator::Runtime;
use crate::error::{DUPLICATE_SEQUENCE_NUMBER, NOT_LEADER};

/// How often an idle coordinator looks for decisions it was not woken for (a replayed
/// history after a failover).
const PUBLISH_POLL: Duration = Duration::from_millis(500);
/// How long a publisher that could not send waits before it tries again.
const PUBLISH_RETRY: Duration = Duration::from_millis(500);
/// Decisions looked at per round.
const PUBLISH_SCAN_MAX: usize = 1_000;

/// A coordinator whose shard publishes: its runtime, what wakes its publisher, and what to do
/// once a record landed (metrics).
pub(crate) struct PublishSource<S: Publishing> {
    /// The shard's runtime.
    pub(crate) runtime: Arc<Runtime<S>>,
    /// Woken when an operation decided a record to publish.
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// Called for each record confirmed in its target.
    pub(crate) landed: Box<dyn Fn(&Pending) + Send + Sync>,
}

/// What became of one decision.
enum Sent {
    /// It is in its target.
    Landed,
    /// Its target topic no longer exists (a delayed record's topic deleted meanwhile): dropped.
    Dropped,
}

impl Inner {
    /// Sends the coordinator's unconfirmed publish decisions, in stamp order per target, while
    /// this node coordinates; each confirmed by an operation once the target has it.
    pub(crate) async fn publish_loop<S: Publishing>(self: Arc<Self>, source: PublishSource<S>) {
        let mut active = source.runtime.active();
        loop {
            if active.wait_for(Option::is_some).await.is_err() {
                return;
            }
            while active.borrow().is_some() {
                let pending = source.runtime.read(|s: &S| s.pending_publishes(PUBLISH_SCAN_MAX));
                if pending.is_empty() {
                    tokio::select! {
                        _ = source.wake.notified() => {}
                        _ = tokio::time::sleep(PUBLISH_POLL) => {}
                    }
                    continue;
                }
                if !self.publish_round(&source, pending).await {
                    tokio::time::sleep(PUBLISH_RETRY).await;
                }
            }
        }
    }

    /// Sends each batch of decisions, skipping the rest of a target after one fails (the target
    /// accepts a sequence only after the one before it). Returns whether anything was confirmed.
    async fn publish_round<S: Publishing>(&self, source: &PublishSource<S>, pending: Vec<Pending>) -> bool {
        let mut blocked: BTreeSet<(String, Tp)> = BTreeSet::new();
        let mut progressed = false;
        for batch in publish::batches(pending) {
            let (Some(p), Some(last)) = (batch.first(), batch.last()) else { continue };
            let key = (p.key.clone(), p.target.clone());
            if blocked.contains(&key) || source.runtime.active().borrow().is_none() {
                continue;
            }
            let sent = match self.publish(&batch, S::creates_targets()).await {
                Ok(sent) => sent,
                Err(why) => {
                    warn!(key = p.key, target = %p.target, sequence = p.publish.sequence, why, "publishing a decided record failed; retried");
                    blocked.insert(key);
                    continue;
                }
            };
            let stamp = (last.publish.epoch, last.publish.sequence);
            let confirmed = source
                .runtime
                .run(&p.key, |s: &S| Ok::<_, ()>((s.confirm_records(&p.key, &p.target, stamp), ())))
                .await;
            match confirmed {
                Ok(()) => {
                    progressed = true;
                    match sent {
                        Sent::Landed => {
                            debug!(key = p.key, target = %p.target, sequence = p.publish.sequence, records = batch.len(), "decided records published");
                            batch.iter().for_each(|p| (source.landed)(p));
                        }
                        Sent::Dropped => {
                            warn!(key = p.key, target = %p.target, records = batch.len(), "the target topic was deleted: the decided records are dropped");
                            self.metrics.delayed_dropped.inc_by(batch.len() as u64);
                        }
                    }
                }
                // Sent but not confirmed: whoever coordinates next sends it again, deduplicated.
                Err(e) => {
                    debug!(key = p.key, error = ?e, "confirming a publish failed; it will be sent again");
                    blocked.insert(key);
                }
            }
        }
        progressed
    }

    /// Produces one batch of decided records (one target, consecutive stamps) to the target's
    /// leader with the first decision's stamp. A missing target topic is created when `create`
    /// (dead letters), and the records dropped otherwise.
    async fn publish(&self, batch: &[Pending], create: bool) -> Result<Sent, String> {
        let Some(p) = batch.first() else { return Ok(Sent::Landed) };
        if create {
            self.ensure_topic(&p.target.topic).await?;
        } else if self.metadata().partition(&p.target.topic, p.target.partition).is_err() {
            return Ok(Sent::Dropped);
        }
        let d = &p.publish;
        // Negative control: without the stamp, a send repeated after a failover or an ambiguous
        // answer writes the record twice.
        let stamped = !self.coordinator_faults.publish_unstamped;
        let request = pb::ProduceRequest {
            request_id: 0,
            topic: p.target.topic.clone(),
            partition: p.target.partition,
            records: batch
                .iter()
                .map(|p| pb::Record {
                    key: p.publish.key.clone().map(Into::into),
                    value: p.publish.value.clone().map(Into::into),
                    headers: p
                        .publish
                        .headers
                        .iter()
                        .map(|h| pb::Header { key: h.key.clone(), value: h.value.clone().map(Into::into) })
                        .collect(),
                    timestamp_ms: p.publish.timestamp_ms,
                })
                .collect(),
            batch: Default::default(),
            producer_id: stamped.then_some(d.producer_id),
            producer_epoch: stamped.then_some(i32::from(d.epoch)),
            base_sequence: stamped.then_some(d.sequence),
            ..Default::default()
        };
        self.produce_to_leader(request).await.map(|()| Sent::Landed)
    }

    /// Sends a produce request to the partition's leader, following NOT_LEADER hints and
    /// trying each replica. A DUPLICATE_SEQUENCE_NUMBER answer means the record is there.
    pub(crate) async fn produce_to_leader(&self, request: pb::ProduceRequest) -> Result<(), String> {
        let (group, replicas, _) =
            self.resolve(&request.topic, request.partition).map_err(|s| s.message().to_owned())?;
        let mut candidates: Vec<String> =
            self.node.leader(group).and_then(|l| self.peer_addr_of(l)).into_iter().collect();
        candidates.extend(replicas.iter().filter_map(|r| self.peer_addr_of(*r)));
        let mut tried = BTreeSet::new();
        let mut last = String::from("no replica reachable");
        let deadline = self.config.append_timeout + Duration::from_secs(1);
        while let Some(addr) = candidates.iter().find(|a| !tried.contains(*a)).cloned() {
            tried.insert(addr.clone());
            let channel = self.channel(&addr).map_err(|s| s.message().to_owned())?;
            let mut client = pb::producer_client::ProducerClient::new(channel);
            let status = match tokio::time::timeout(deadline, client.produce(request.clone())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => status,
                Err(_) => {
                    self.drop_channel(&addr);
                    last = format!("{addr} did not answer in time");
                    continue;
                }
            };
            let info = status.get_details_error_info();
            match info.as_ref().map(|i| i.reason.as_str()) {
                Some(DUPLICATE_SEQUENCE_NUMBER) => return Ok(()),
                Some(NOT_LEADER) => {
                    if let Some(leader) = self.hinted_peer(&status) {
                        tried.remove(&leader);
                        candidates.insert(0, leader);
                        if tried.len() > replicas.len() + 2 {
                            break;
                        }
                    }
                }
                _ if status.code() == Code::Unavailable || is_transport_failure(&status) => {
                    self.forget_broken(&addr, &status);
                }
                _ => return Err(format!("{}: {}", status.code(), status.message())),
            }
            last = format!("{addr}: {}", status.message());
        }
        Err(last)
    }

    /// Creates a dead-letter topic on first use (one partition, the cluster's default
    /// replication), and waits until this node's metadata has it.
    async fn ensure_topic(&self, name: &str) -> Result<(), String> {
        if self.metadata().topics.contains_key(name) {
            return Ok(());
        }
        let created: Result<(), Status> = if self.leads_meta() {
            self.create_topic(name.to_owned(), 1, 0, Default::default()).await.map(|_| ())
        } else {
            let message =
                pb::CreateTopicRequest { name: name.to_owned(), partitions: 1, replication_factor: 0, config: None };
            match self.forwardable(message, 0) {
                Ok(request) => self
                    .forward_to_controller(request, |channel, request| async move {
                        AdminClient::new(channel).create_topic(request).await
                    })
                    .await
                    .map(|_| ()),
                Err(status) => Err(status),
            }
        };
        match created {
            Ok(()) => info!(topic = name, "dead-letter topic created"),
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => return Err(format!("creating topic {name:?}: {}", status.message())),
        }
        tokio::time::timeout(self.config.append_timeout, self.wait_meta(|m| m.topics.contains_key(name)))
            .await
            .map_err(|_| format!("topic {name:?} is not in this node's metadata yet"))
    }
}
