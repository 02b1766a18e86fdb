//! The `Groups` gRPC service: translates requests into coordinator operations and their
//! outcomes into answers or typed statuses (`google.rpc.ErrorInfo` reasons, keel.proto).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keel_coordinator::groups::{
    CommitInput, Committed, DeadLetterRecord, GroupError, Groups, HeartbeatInput, NackInput, PublishHeader,
    RetryPolicy, SettleInput, Tp, partition_for_group, validate_group_name,
};
use keel_proto::v1 as pb;
use keel_raft::{GroupId, NodeId};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::acl::{Operation, Resource};
use crate::coordinator::RunError;
use crate::error::DOMAIN;
use crate::groups::{GroupCoordinator, encode, offsets_group};
use crate::lag::{TIMESTAMP_READS_MAX, group_partitions, windows};
use crate::service::Api;

/// Deadline of a question to another node (ListGroups fan-out, high watermarks).
const PEER_DEADLINE: Duration = Duration::from_secs(2);

fn reason_status(code: Code, reason: &str, message: String, metadata: BTreeMap<String, String>) -> Status {
    let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, metadata))
}

/// The status of a refused group operation.
fn group_status(e: &GroupError) -> Status {
    let code = match e {
        GroupError::Invalid(_) => Code::InvalidArgument,
        GroupError::UnknownMember { .. } | GroupError::UnknownTopic(_) | GroupError::UnknownGroup(_) => Code::NotFound,
        GroupError::FencedEpoch { .. }
        | GroupError::StaleEpoch { .. }
        | GroupError::GroupNotEmpty { .. }
        | GroupError::InconsistentAssignor { .. }
        | GroupError::StaleAttempt { .. }
        | GroupError::RecordSettled { .. }
        | GroupError::PublishesPending { .. } => Code::FailedPrecondition,
        GroupError::OffsetAboveHighWatermark { .. } | GroupError::OffsetBelowLogStart { .. } => Code::OutOfRange,
        GroupError::GroupMaxSize { .. }
        | GroupError::GroupsMax(_)
        | GroupError::MetadataTooLarge { .. }
        | GroupError::RetryBacklogFull { .. } => Code::ResourceExhausted,
        GroupError::ProducerIdNeeded => Code::Unavailable,
    };
    reason_status(code, e.reason(), e.to_string(), BTreeMap::new())
}

impl Api {
    /// UNAVAILABLE + NOT_COORDINATOR, naming the coordinator when known.
    fn not_coordinator(&self, group: &str, leader: Option<NodeId>) -> Status {
        let mut metadata = BTreeMap::new();
        let message = match leader.and_then(|l| Some((l, self.inner.addr_of(l)?))) {
            Some((id, addr)) => {
                metadata.insert("coordinator_id".to_owned(), id.to_string());
                metadata.insert("coordinator_addr".to_owned(), addr.clone());
                format!("this node does not coordinate group {group:?}; node {id} at {addr} does")
            }
            None => {
                format!("this node does not coordinate group {group:?} and the coordinator is not known yet; retry")
            }
        };
        reason_status(Code::Unavailable, "NOT_COORDINATOR", message, metadata)
    }

    fn run_status(&self, group: &str, e: RunError<GroupError>) -> Status {
        match e {
            RunError::Refused(e) => group_status(&e),
            RunError::NotCoordinator(leader) => self.not_coordinator(group, leader),
            RunError::Loading => reason_status(
                Code::Unavailable,
                "COORDINATOR_LOADING",
                format!("the coordinator of group {group:?} is loading its state; retry"),
                BTreeMap::new(),
            ),
            RunError::Ambiguous(m) => reason_status(
                Code::Unavailable,
                "COORDINATOR_WRITE_UNKNOWN",
                format!("group {group:?}: the change may or may not have been committed ({m}); retry"),
                BTreeMap::new(),
            ),
            RunError::TooLarge(m) => Status::resource_exhausted(format!("group {group:?}: {m}")),
        }
    }

    /// The coordinator of `group` if this node is it (and serving), or NOT_COORDINATOR.
    fn coordinator_for(&self, group: &str) -> Result<Arc<GroupCoordinator>, Status> {
        let inner = &self.inner;
        inner.check_serving()?;
        validate_group_name(group).map_err(|e| group_status(&e))?;
        let meta = inner.metadata();
        let Some(topic) = meta.offsets_topic() else {
            return Err(reason_status(
                Code::Unavailable,
                "COORDINATOR_LOADING",
                "the cluster has not created __consumer_offsets yet; retry".into(),
                BTreeMap::new(),
            ));
        };
        let partition = partition_for_group(group, topic.partitions.len() as u32);
        match inner.group_coordinator(partition) {
            Some(c) => {
                c.runtime.check_serving::<GroupError>().map_err(|e| self.run_status(group, e))?;
                Ok(c)
            }
            None => {
                // Not a replica here: the preferred replica knows the leader, if it is not it.
                let hint = topic.partitions.get(partition as usize).and_then(|p| p.replicas.first().copied());
                Err(self.not_coordinator(group, hint))
            }
        }
    }

    /// A partition's high watermark, at least as high as `want` if any replica has it so.
    async fn high_watermark(&self, group: GroupId, replicas: &[NodeId], want: u64) -> u64 {
        let inner = &self.inner;
        let cached = inner.high_watermarks.lock().unwrap_or_else(|e| e.into_inner()).get(&group).copied();
        let local = inner.node.store(group).ok().map(|s| *s.high_watermark().borrow());
        let mut best = cached.unwrap_or(0).max(local.unwrap_or(0));
        if best < want {
            let asks =
                replicas.iter().filter(|n| **n != inner.config.node_id).filter_map(|n| inner.peer_addr_of(*n)).map(
                    |addr| async move {
                        let channel = inner.channel(&addr).ok()?;
                        let mut client = pb::node_status_client::NodeStatusClient::new(channel);
                        let call = client.local_status(pb::LocalStatusRequest {});
                        match tokio::time::timeout(PEER_DEADLINE, call).await {
                            Ok(Ok(r)) => {
                                r.into_inner().groups.into_iter().find(|g| g.group == group).map(|g| g.high_watermark)
                            }
                            Ok(Err(status)) => {
                                inner.forget_broken(&addr, &status);
                                None
                            }
                            Err(_) => {
                                inner.drop_channel(&addr);
                                None
                            }
                        }
                    },
                );
            for hw in futures_util::future::join_all(asks).await.into_iter().flatten() {
                best = best.max(hw);
            }
        }
        let mut cache = inner.high_watermarks.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.entry(group).or_insert(0);
        *entry = (*entry).max(best);
        *entry
    }

    fn list_local(&self, partition: u32) -> Result<Vec<pb::GroupListing>, Status> {
        let c = self.inner.group_coordinator(partition).ok_or_else(|| Status::unavailable("not hosted here"))?;
        c.runtime.check_serving::<GroupError>().map_err(|e| self.run_status("*", e))?;
        let me = self.inner.config.node_id;
        Ok(c.runtime.read(|s: &Groups| {
            s.groups
                .iter()
                .map(|(name, g)| pb::GroupListing {
                    group: name.clone(),
                    state: g.state().name().to_owned(),
                    members: g.members.len() as u32,
                    coordinator_id: Some(me),
                })
                .collect()
        }))
    }
}

fn to_topic_partitions<'a>(tps: impl IntoIterator<Item = &'a Tp>) -> Vec<pb::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for tp in tps {
        by_topic.entry(&tp.topic).or_default().push(tp.partition);
    }
    by_topic.into_iter().map(|(t, partitions)| pb::TopicPartitions { topic: t.to_owned(), partitions }).collect()
}

fn from_topic_partitions(list: &[pb::TopicPartitions], max: usize) -> Result<Vec<Tp>, Status> {
    let count: usize = list.iter().map(|t| t.partitions.len()).sum();
    if count > max {
        return Err(Status::invalid_argument(format!("at most {max} partitions per request")));
    }
    Ok(list.iter().flat_map(|t| t.partitions.iter().map(|p| Tp::new(t.topic.clone(), *p))).collect())
}

fn committed_to_pb(tp: &Tp, c: &Committed) -> pb::CommittedOffset {
    pb::CommittedOffset {
        topic: tp.topic.clone(),
        partition: tp.partition,
        offset: c.offset,
        metadata: c.metadata.clone(),
        commit_timestamp_ms: c.commit_timestamp_ms,
    }
}

#[tonic::async_trait]
impl pb::groups_server::Groups for Api {
    async fn find_coordinator(
        &self,
        request: Request<pb::FindCoordinatorRequest>,
    ) -> Result<Response<pb::FindCoordinatorResponse>, Status> {
        let inner = &self.inner;
        inner.check_serving()?;
        let request = request.into_inner();
        let group = request.group;
        validate_group_name(&group).map_err(|e| group_status(&e))?;
        let meta = inner.metadata();
        let topic = match pb::CoordinatorKind::try_from(request.kind) {
            Ok(pb::CoordinatorKind::CoordinatorGroup) => meta
                .offsets_topic()
                .ok_or_else(|| Status::unavailable("__consumer_offsets is not created yet; retry"))?,
            Ok(pb::CoordinatorKind::CoordinatorTransactions) => {
                meta.txn_topic().ok_or_else(|| Status::unavailable("__txn is not created yet; retry"))?
            }
            Err(_) => return Err(Status::invalid_argument(format!("unknown coordinator kind {}", request.kind))),
        };
        let partition = partition_for_group(&group, topic.partitions.len() as u32);
        let raft_group = topic.partitions[partition as usize].group;
        let leader = match inner.node.leader(raft_group) {
            Some(l) => Some(l),
            None if inner.node.store(raft_group).is_ok() => None,
            None => self.gather(&meta).await.0.get(&raft_group).and_then(|v| v.leader),
        };
        Ok(Response::new(pb::FindCoordinatorResponse {
            partition,
            coordinator_id: leader,
            coordinator_addr: leader.and_then(|l| inner.addr_of(l)).unwrap_or_default(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Join)?;
        let host = crate::tls::remote_of(&request).map(|a| a.to_string()).unwrap_or_default();
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let limits = self.inner.config.groups.limits;
        let input = HeartbeatInput {
            group: r.group.clone(),
            member_id: r.member_id.clone(),
            member_epoch: r.member_epoch,
            instance_id: (!r.instance_id.is_empty()).then(|| r.instance_id.clone()),
            subscribed: r.subscribed_topics,
            owned: from_topic_partitions(&r.owned, limits.offsets_per_commit_max)?,
            session_timeout_ms: r.session_timeout_ms,
            rebalance_timeout_ms: r.rebalance_timeout_ms,
            assignor: r.assignor,
            client_id: r.client_id,
            host,
        };
        let topics = self.inner.topics_view();
        let now_ms = self.inner.clock.now_ms();
        let c = &coordinator;
        let out = coordinator
            .runtime
            .run(&r.group, |s: &Groups| {
                let out = s.heartbeat(&input, &topics, &limits, now_ms)?;
                // Under the group's lock, so the expiry timer never removes a member that was
                // just heard from.
                let o = &out.response;
                match o.member_epoch {
                    -1 => c.forget(&r.group, &r.member_id),
                    _ => c.heard_from(
                        &r.group,
                        &r.member_id,
                        o.session_timeout_ms,
                        (!o.revoking.is_empty()).then_some(o.rebalance_timeout_ms),
                    ),
                }
                Ok((encode(&out.records), out.response))
            })
            .await
            .map_err(|e| self.run_status(&r.group, e))?;
        let redeliveries = if out.member_epoch > 0 {
            let (now_ms, max) =
                (self.inner.clock.now_ms(), self.inner.config.groups.retry_limits.due_per_heartbeat_max);
            coordinator.runtime.read(|s: &Groups| s.due_redeliveries(&r.group, &out.member_id, now_ms, max))
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::HeartbeatResponse {
            member_id: out.member_id,
            member_epoch: out.member_epoch,
            assignment: to_topic_partitions(&out.assignment),
            heartbeat_interval_ms: out.heartbeat_interval_ms,
            session_timeout_ms: out.session_timeout_ms,
            redeliveries: redeliveries
                .into_iter()
                .map(|d| pb::Redelivery {
                    topic: d.tp.topic,
                    partition: d.tp.partition,
                    offset: d.offset,
                    attempt: d.attempt,
                })
                .collect(),
        }))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Join)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let limits = self.inner.config.groups.limits;
        if r.offsets.len() > limits.offsets_per_commit_max {
            return Err(Status::invalid_argument(format!(
                "at most {} partitions per commit",
                limits.offsets_per_commit_max
            )));
        }
        let meta = self.inner.metadata();
        let mut high_watermarks = BTreeMap::new();
        for o in &r.offsets {
            let Ok(p) = meta.partition(&o.topic, o.partition) else { continue };
            if meta.topics.get(&o.topic).is_some_and(|t| t.internal) {
                continue;
            }
            let hw = self.high_watermark(p.group, &p.replicas, o.offset).await;
            high_watermarks.insert(Tp::new(o.topic.clone(), o.partition), hw);
        }
        let input = CommitInput {
            group: r.group.clone(),
            member_id: r.member_id,
            member_epoch: r.member_epoch,
            offsets: r.offsets.into_iter().map(|o| (Tp::new(o.topic, o.partition), o.offset, o.metadata)).collect(),
            unfenced: self.inner.coordinator_faults.no_fencing,
        };
        let topics = self.inner.topics_view();
        let now_ms = self.inner.clock.now_ms();
        let committed = coordinator
            .runtime
            .run(&r.group, |s: &Groups| {
                let out = s.commit(&input, &topics, &high_watermarks, &limits, now_ms)?;
                Ok((encode(&out.records), out.response))
            })
            .await
            .map_err(|e| self.run_status(&r.group, e))?;
        let offsets = committed.iter().map(|(tp, c)| committed_to_pb(tp, c)).collect();
        Ok(Response::new(pb::CommitOffsetsResponse { offsets }))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Describe)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let wanted: BTreeSet<Tp> =
            from_topic_partitions(&r.partitions, self.inner.config.groups.limits.offsets_per_commit_max)?
                .into_iter()
                .collect();
        let offsets = coordinator.runtime.read(|s: &Groups| {
            s.get(&r.group)
                .map(|g| {
                    g.offsets
                        .iter()
                        .filter(|(tp, _)| wanted.is_empty() || wanted.contains(*tp))
                        .map(|(tp, c)| committed_to_pb(tp, c))
                        .collect()
                })
                .unwrap_or_default()
        });
        Ok(Response::new(pb::FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let inner = &self.inner;
        inner.check_serving()?;
        let caller = crate::auth::caller(&request);
        if let Some(partition) = request.into_inner().offsets_partition {
            return Ok(Response::new(pb::ListGroupsResponse {
                groups: self.list_local(partition)?,
                unavailable_partitions: vec![],
            }));
        }
        let meta = inner.metadata();
        let Some(topic) = meta.offsets_topic() else {
            return Ok(Response::new(pb::ListGroupsResponse::default()));
        };
        let mut statuses = None;
        let mut response = pb::ListGroupsResponse::default();
        for partition in 0..topic.partitions.len() as u32 {
            if let Ok(groups) = self.list_local(partition) {
                response.groups.extend(groups);
                continue;
            }
            let Some((raft_group, _)) = offsets_group(inner, partition) else { continue };
            let leader = match inner.node.leader(raft_group) {
                Some(l) => Some(l),
                None => {
                    if statuses.is_none() {
                        statuses = Some(self.gather(&meta).await.0);
                    }
                    statuses.as_ref().and_then(|s| s.get(&raft_group)).and_then(|v| v.leader)
                }
            };
            let answer = match leader.filter(|l| *l != inner.config.node_id).and_then(|l| inner.peer_addr_of(l)) {
                None => None,
                Some(addr) => {
                    let channel = inner.channel(&addr)?;
                    let mut client = pb::groups_client::GroupsClient::new(channel);
                    let call = client.list_groups(pb::ListGroupsRequest { offsets_partition: Some(partition) });
                    match tokio::time::timeout(PEER_DEADLINE, call).await {
                        Ok(Ok(r)) => Some(r.into_inner().groups),
                        Ok(Err(status)) => {
                            inner.forget_broken(&addr, &status);
                            None
                        }
                        Err(_) => {
                            inner.drop_channel(&addr);
                            None
                        }
                    }
                }
            };
            match answer {
                Some(groups) => response.groups.extend(groups),
                None => response.unavailable_partitions.push(partition),
            }
        }
        // Only the groups the caller may describe.
        response.groups.retain(|g| inner.may(caller.as_ref(), Resource::Group(&g.group), Operation::Describe));
        response.groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(Response::new(response))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Describe)?;
        let name = request.into_inner().group;
        let coordinator = self.coordinator_for(&name)?;
        let group = coordinator
            .runtime
            .read(|s: &Groups| s.get(&name).cloned())
            .ok_or_else(|| group_status(&GroupError::UnknownGroup(name.clone())))?;
        let meta = self.inner.metadata();
        let tps = group_partitions(&group, &meta);
        let windows = coordinator.runtime.read(|s: &Groups| windows(s, &name, &group, &tps));
        let (statuses, _) = self.gather(&meta).await;
        let mut reads = TIMESTAMP_READS_MAX;
        let lag = self.group_lag(&group, &windows, &meta, &statuses, &mut reads).await;
        let partitions = lag
            .partitions
            .iter()
            .map(|p| pb::PartitionLag {
                topic: p.tp.topic.clone(),
                partition: p.tp.partition,
                committed_offset: p.committed,
                log_end_offset: p.log_end,
                lag_records: p.lag_records,
                lag_seconds: p.lag_seconds,
                member_id: group.owner_of(&p.tp).map(|m| m.member_id.clone()).unwrap_or_default(),
                status: p.status.name().to_owned(),
                last_commit_timestamp_ms: p.last_commit_ms,
                window_commits: p.window_commits as u32,
            })
            .collect();
        let members = group
            .members
            .values()
            .map(|m| pb::MemberDescription {
                member_id: m.member_id.clone(),
                instance_id: m.instance_id.clone().unwrap_or_default(),
                client_id: m.client_id.clone(),
                host: m.host.clone(),
                member_epoch: m.epoch,
                subscribed_topics: m.subscribed.iter().cloned().collect(),
                assignment: to_topic_partitions(m.assigned.keys()),
                revoking: to_topic_partitions(m.revoking.keys()),
            })
            .collect();
        Ok(Response::new(pb::DescribeGroupResponse {
            group: name,
            state: group.state().name().to_owned(),
            group_epoch: group.epoch(),
            assignor: group.meta.as_ref().map(|m| m.assignor.clone()).unwrap_or_default(),
            members,
            partitions,
            total_lag_records: lag.total_lag_records,
            coordinator_id: self.inner.config.node_id,
            status: lag.status.name().to_owned(),
            max_lag_seconds: lag.max_lag_seconds,
        }))
    }

    async fn reset_offsets(
        &self,
        request: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Delete)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let limits = self.inner.config.groups.limits;
        if r.offsets.len() > limits.offsets_per_commit_max {
            return Err(Status::invalid_argument(format!(
                "at most {} partitions per reset",
                limits.offsets_per_commit_max
            )));
        }
        let meta = self.inner.metadata();
        let (statuses, _) = self.gather(&meta).await;
        let mut bounds = BTreeMap::new();
        for o in &r.offsets {
            let Ok(p) = meta.partition(&o.topic, o.partition) else { continue };
            let view = statuses.get(&p.group);
            let hw = self.high_watermark(p.group, &p.replicas, view.map_or(0, |v| v.high_watermark)).await;
            bounds.insert(Tp::new(o.topic.clone(), o.partition), (view.map_or(0, |v| v.log_start_offset), hw));
        }
        let offsets: Vec<(Tp, u64, String)> =
            r.offsets.into_iter().map(|o| (Tp::new(o.topic, o.partition), o.offset, o.metadata)).collect();
        let topics = self.inner.topics_view();
        let now_ms = self.inner.clock.now_ms();
        let done = coordinator
            .runtime
            .run(&r.group, |s: &Groups| {
                let out = s.reset_offsets(&r.group, &offsets, &topics, &bounds, &limits, now_ms)?;
                Ok((encode(&out.records), out.response))
            })
            .await
            .map_err(|e| self.run_status(&r.group, e))?;
        Ok(Response::new(pb::ResetOffsetsResponse {
            offsets: done.iter().map(|(tp, c)| committed_to_pb(tp, c)).collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Delete)?;
        let group = request.into_inner().group;
        let coordinator = self.coordinator_for(&group)?;
        coordinator
            .runtime
            .run(&group, |s: &Groups| Ok((encode(&s.delete_group(&group)?), ())))
            .await
            .map_err(|e| self.run_status(&group, e))?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn nack(&self, request: Request<pb::NackRequest>) -> Result<Response<pb::NackResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Join)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let settings = &self.inner.config.groups;
        let policy = match r.policy {
            None => settings.retry_policy,
            Some(p) => {
                let default = settings.retry_policy;
                let or = |v: u32, d: u32| if v == 0 { d } else { v };
                let backoff_min_ms = or(p.backoff_min_ms, default.backoff_min_ms);
                RetryPolicy {
                    max_attempts: or(p.max_attempts, default.max_attempts),
                    backoff_min_ms,
                    backoff_max_ms: or(p.backoff_max_ms, default.backoff_max_ms.max(backoff_min_ms)),
                }
            }
        };
        let record = r.record.unwrap_or_default();
        let input = NackInput {
            group: r.group.clone(),
            member_id: r.member_id,
            member_epoch: r.member_epoch,
            tp: Tp::new(r.topic, r.partition),
            offset: r.offset,
            attempt: r.attempt,
            error: r.error,
            retryable: r.retryable,
            policy,
            record: dead_letter_record(record),
        };
        let topics = self.inner.topics_view();
        let mut spare = None;
        loop {
            let (now_ms, jitter) = (self.inner.clock.now_ms(), self.inner.random_u64());
            let outcome = coordinator
                .runtime
                .run(&r.group, |s: &Groups| {
                    let out = s.nack(&input, &topics, &settings.retry_limits, now_ms, jitter, spare)?;
                    Ok((encode(&out.records), out.response))
                })
                .await;
            match outcome {
                // The group's first dead letter needs a producer identity: allocate one (from
                // the controller's blocks, like InitProducerId) and decide again with it.
                Err(RunError::Refused(GroupError::ProducerIdNeeded)) if spare.is_none() => {
                    spare = Some(self.inner.next_producer_id().await?);
                }
                Err(e) => return Err(self.run_status(&r.group, e)),
                Ok(out) => {
                    self.inner.metrics.nacks.inc();
                    if out.dead_lettered {
                        coordinator.publish_wake.notify_one();
                    }
                    return Ok(Response::new(pb::NackResponse {
                        attempts: out.attempts,
                        due_at_ms: out.due_at_ms,
                        dead_lettered: out.dead_lettered,
                    }));
                }
            }
        }
    }

    async fn ack_redelivery(
        &self,
        request: Request<pb::AckRedeliveryRequest>,
    ) -> Result<Response<pb::AckRedeliveryResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Join)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let input = SettleInput {
            group: r.group.clone(),
            member_id: r.member_id,
            member_epoch: r.member_epoch,
            tp: Tp::new(r.topic, r.partition),
            offset: r.offset,
            attempt: r.attempt,
        };
        coordinator
            .runtime
            .run(&r.group, |s: &Groups| {
                let out = s.settle(&input)?;
                Ok((encode(&out.records), ()))
            })
            .await
            .map_err(|e| self.run_status(&r.group, e))?;
        Ok(Response::new(pb::AckRedeliveryResponse {}))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        self.allow(&request, Resource::Group(&request.get_ref().group), Operation::Join)?;
        let r = request.into_inner();
        let coordinator = self.coordinator_for(&r.group)?;
        let limits = self.inner.config.groups.retry_limits;
        if r.letters.len() > limits.replay_batch_max {
            return Err(Status::invalid_argument(format!(
                "at most {} dead letters per replay",
                limits.replay_batch_max
            )));
        }
        let mut letters: Vec<(u64, DeadLetterRecord)> =
            r.letters.into_iter().map(|l| (l.offset, dead_letter_record(l.record.unwrap_or_default()))).collect();
        let topics = self.inner.topics_view();
        let mut response = pb::ReplayDeadLettersResponse::default();
        let mut spare = None;
        // Each origin partition new to the group takes a producer id: one per round.
        while !letters.is_empty() {
            let now_ms = self.inner.clock.now_ms();
            let outcome = coordinator
                .runtime
                .run(&r.group, |s: &Groups| {
                    let out = s.replay_dead_letters(&r.group, &letters, &topics, &limits, now_ms, spare)?;
                    Ok((encode(&out.records), out.response))
                })
                .await;
            match outcome {
                Err(RunError::Refused(GroupError::ProducerIdNeeded)) if spare.is_none() => {
                    spare = Some(self.inner.next_producer_id().await?);
                }
                Err(e) => return Err(self.run_status(&r.group, e)),
                Ok(out) => {
                    if out.used_spare_id {
                        spare = None;
                    }
                    if !out.replayed.is_empty() {
                        coordinator.publish_wake.notify_one();
                    }
                    response.replayed.extend(&out.replayed);
                    response.already_replayed.extend(&out.already);
                    letters.retain(|(o, _)| out.deferred.contains(o));
                }
            }
        }
        Ok(Response::new(response))
    }
}

/// A record as a client sent it, as the coordinator keeps it.
fn dead_letter_record(record: pb::Record) -> DeadLetterRecord {
    DeadLetterRecord {
        key: record.key.map(|k| k.to_vec()),
        value: record.value.map(|v| v.to_vec()),
        headers: record
            .headers
            .into_iter()
            .map(|h| PublishHeader { key: h.key, value: h.value.map(|v| v.to_vec()) })
            .collect(),
        timestamp_ms: record.timestamp_ms,
    }
}
