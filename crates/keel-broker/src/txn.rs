//! Transactional (half) messages on this node: one [`TxnCoordinator`] per `__txn` partition it
//! hosts, each the generic [`Runtime`] over the pure [`Txns`] shard, plus what only a live
//! coordinator does — send check-backs to the producer groups' open streams when a transaction's
//! timeout passes (each attempt recorded first, so a failover does not reset the count), apply
//! the expiry policy after the last, and publish committed records exactly once through
//! `publisher.rs`.
//!
//! A prepare, end or resume may reach any node: it is validated there and forwarded to the
//! leader of the group's `__txn` partition. The check-back stream must be opened on that leader
//! (FindCoordinator with kind TRANSACTIONS): it is the only node that sends checks, and it ends
//! the group's streams when it stops leading so that producers find the next one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_coordinator::Record;
use keel_coordinator::groups::{Tp, validate_group_name};
use keel_coordinator::publish::PublishHeader;
use keel_coordinator::txn::{self, Checked, HalfRecord, TxnError, TxnRecord, TxnState, TxnStatus, Txns};
use keel_proto::v1 as pb;
use keel_raft::{GroupId, NodeId};
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::acl::{Operation, Resource};
use crate::auth::Caller;
use crate::broker::Inner;
use crate::coordinator::{RunError, Runtime};
use crate::error::{meta_status, not_leader, with_reason};
use crate::publisher::PublishSource;

/// The longest the check loop sleeps when no check is due sooner.
const CHECK_POLL: Duration = Duration::from_millis(250);
/// Checks recorded per round of the loop.
const CHECK_BATCH: usize = 256;
/// Checks queued per open stream; a producer that does not read them misses checks (each is
/// still counted, and sent again after its backoff).
const STREAM_QUEUE: usize = 256;
/// Unread messages after which a stream is taken for dead (its producer crashed or is cut off
/// without the connection breaking) and closed: checks then go to the group's other streams.
const STREAM_UNREAD_MAX: usize = 16;
/// How often every open stream gets a keepalive (a TxnCheck without a transaction id), so that
/// a producer whose coordinator died without closing the connection notices the silence.
pub const KEEPALIVE: Duration = Duration::from_secs(3);

/// `ErrorInfo.reason` of an END contradicting how the transaction ended (FAILED_PRECONDITION).
pub const TXN_CONTRADICTS: &str = "TXN_CONTRADICTS";
/// `ErrorInfo.reason` of a commit of a transaction the expiry policy rolled back.
pub const TXN_EXPIRED: &str = "TXN_EXPIRED";
/// `ErrorInfo.reason` of an END or resume of a transaction the coordinator does not know.
pub const TXN_UNKNOWN: &str = "TXN_UNKNOWN";
/// `ErrorInfo.reason` of a prepare under an id that holds other records (INVALID_ARGUMENT).
pub const TXN_CONFLICT: &str = "TXN_CONFLICT";
/// `ErrorInfo.reason` of a resume of a transaction that is not expired-and-rolled-back.
pub const TXN_NOT_RESUMABLE: &str = "TXN_NOT_RESUMABLE";

/// What a check-back stream sends: checks, or the status that ends it.
pub(crate) type CheckStream = mpsc::Receiver<Result<pb::TxnCheck, Status>>;

/// An open check-back stream of a producer group.
struct Checker {
    id: u64,
    tx: mpsc::Sender<Result<pb::TxnCheck, Status>>,
}

/// The coordinator of the transactions of one `__txn` partition.
pub struct TxnCoordinator {
    /// Its `__txn` partition.
    pub(crate) partition: u32,
    /// The partition's runtime.
    pub(crate) runtime: Arc<Runtime<Txns>>,
    /// Woken when a commit decided records to publish.
    publish_wake: Arc<Notify>,
    /// Woken when a transaction was prepared or resumed: its check may be due before the
    /// loop's next look.
    check_wake: Notify,
    /// Open check-back streams per producer group.
    checkers: Mutex<BTreeMap<String, Vec<Checker>>>,
    /// Ids of streams, and the round-robin position of checks.
    next: AtomicU64,
}

/// Whether a stream is open and its producer reads it (dropping it ends the stream).
fn live(c: &Checker) -> bool {
    !c.tx.is_closed() && STREAM_QUEUE - c.tx.capacity() <= STREAM_UNREAD_MAX
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode(records: &[TxnRecord]) -> Vec<Record> {
    records.iter().map(TxnRecord::encode).collect()
}

/// The `__txn` partition that holds the transactions of producer group `group`.
pub fn txn_partition(group: &str, partitions: u32) -> u32 {
    keel_coordinator::groups::partition_for_group(group, partitions)
}

/// A transaction's status as the API shows it.
pub(crate) fn to_pb(group: &str, txn: &str, s: &TxnStatus) -> pb::TxnStatus {
    let state = match s.state {
        TxnState::Pending => pb::TxnState::TxnPending,
        TxnState::Committed => pb::TxnState::TxnCommitted,
        TxnState::RolledBack => pb::TxnState::TxnRolledBack,
        TxnState::Expired { committed: false } => pb::TxnState::TxnExpiredRolledBack,
        TxnState::Expired { committed: true } => pb::TxnState::TxnExpiredCommitted,
    };
    pb::TxnStatus {
        group: group.to_owned(),
        transaction_id: txn.to_owned(),
        state: state as i32,
        prepared_at_ms: s.prepared_ms,
        ended_at_ms: s.ended_ms,
        checks: s.checks,
        next_check_at_ms: if s.state == TxnState::Pending { s.next_check_ms } else { 0 },
        records: s.records,
        bytes: s.bytes,
        topics: s.topics.clone(),
    }
}

/// The status of a refused or failed transaction operation.
fn txn_status(partition: u32, leader: Option<(NodeId, String)>, e: RunError<TxnError>) -> Status {
    let what = format!("{}/{partition}", crate::metadata::TXN_TOPIC);
    match e {
        RunError::Refused(TxnError::Invalid(m)) => Status::invalid_argument(m),
        RunError::Refused(e @ TxnError::Conflict(_)) => {
            with_reason(Code::InvalidArgument, e.to_string(), TXN_CONFLICT, &[])
        }
        RunError::Refused(e @ TxnError::Unknown(_)) => {
            with_reason(Code::FailedPrecondition, e.to_string(), TXN_UNKNOWN, &[])
        }
        RunError::Refused(e @ TxnError::Contradicts { .. }) => {
            with_reason(Code::FailedPrecondition, e.to_string(), TXN_CONTRADICTS, &[])
        }
        RunError::Refused(e @ TxnError::Expired(_)) => {
            with_reason(Code::FailedPrecondition, e.to_string(), TXN_EXPIRED, &[])
        }
        RunError::Refused(e @ TxnError::NotResumable { .. }) => {
            with_reason(Code::FailedPrecondition, e.to_string(), TXN_NOT_RESUMABLE, &[])
        }
        RunError::Refused(e @ TxnError::Full(_)) => Status::resource_exhausted(e.to_string()),
        RunError::Refused(e @ TxnError::ProducerIdNeeded) => Status::unavailable(e.to_string()),
        RunError::NotCoordinator(_) => not_leader(&what, leader),
        RunError::Loading => {
            Status::unavailable(format!("the coordinator of {what} is loading its transactions; retry"))
        }
        RunError::Ambiguous(m) => Status::unavailable(format!(
            "{what}: the change may or may not have been committed ({m}); retry (the same transaction id)"
        )),
        RunError::TooLarge(m) => Status::resource_exhausted(format!("{what}: {m}")),
    }
}

fn validate(group: &str, txn: &str) -> Result<(), Status> {
    validate_group_name(group).map_err(|e| Status::invalid_argument(format!("producer group: {e}")))?;
    txn::validate_txn_id(txn).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The principal a forwarded request acts for (the coordinator checks on its behalf).
fn forwarded_principal(caller: &Option<Caller>) -> Option<String> {
    match caller {
        Some(Caller::Principal(p @ crate::tls::Principal::User(_))) => Some(p.to_string()),
        _ => None,
    }
}

impl Inner {
    /// Starts a coordinator for every `__txn` partition this node hosts.
    pub(crate) fn start_txn_coordinators(self: &Arc<Self>) {
        let meta = self.metadata();
        let Some(topic) = meta.txn_topic() else { return };
        for (partition, p) in topic.partitions.iter().enumerate() {
            let partition = partition as u32;
            if !p.replicas.contains(&self.config.node_id)
                || self.node.store(p.group).is_err()
                || lock(&self.txns).contains_key(&partition)
            {
                continue;
            }
            let runtime = Arc::new(Runtime::new(
                p.group,
                Arc::clone(&self.node),
                Arc::clone(&self.clock),
                self.config.append_timeout,
                self.coordinator_faults,
                Txns::default,
            ));
            let coordinator = Arc::new(TxnCoordinator {
                partition,
                runtime: Arc::clone(&runtime),
                publish_wake: Arc::new(Notify::new()),
                check_wake: Notify::new(),
                checkers: Mutex::new(BTreeMap::new()),
                next: AtomicU64::new(0),
            });
            lock(&self.txns).insert(partition, Arc::clone(&coordinator));
            info!(partition, group = p.group, "transaction coordinator started");
            self.spawn("txn-replay", Arc::clone(&runtime).replay_loop());
            self.spawn("txn-leadership", Arc::clone(&runtime).leadership_loop());
            let metrics = Arc::clone(&self.metrics);
            let source = PublishSource {
                runtime,
                wake: Arc::clone(&coordinator.publish_wake),
                landed: Box::new(move |_| {
                    metrics.txn_published.inc();
                }),
            };
            self.spawn("txn-publish", Arc::clone(self).publish_loop(source));
            self.spawn("txn-checks", Arc::clone(self).txn_loop(coordinator));
        }
    }

    /// The raft group and replicas of a `__txn` partition.
    fn txn_group(&self, partition: u32) -> Option<(GroupId, Vec<NodeId>)> {
        let meta = self.metadata();
        let p = meta.txn_topic()?.partitions.get(partition as usize)?;
        Some((p.group, p.replicas.clone()))
    }

    /// The `__txn` partition of a producer group, and the partitions there are.
    fn txn_partition_of(&self, group: &str) -> Result<(u32, u32), Status> {
        let meta = self.metadata();
        let topic =
            meta.txn_topic().ok_or_else(|| Status::unavailable("the cluster has not created __txn yet; retry"))?;
        let partitions = topic.partitions.len() as u32;
        Ok((txn_partition(group, partitions), partitions))
    }

    /// The coordinator of `partition` if this node serves it, or the status that says where to
    /// go instead (with the leader's client address when known).
    pub(crate) fn serving_txns(&self, partition: u32) -> Result<Arc<TxnCoordinator>, Status> {
        let hint = |leader: Option<NodeId>| {
            let leader = leader.or_else(|| self.txn_group(partition).and_then(|(_, r)| r.first().copied()));
            leader.filter(|l| *l != self.config.node_id).and_then(|l| Some((l, self.addr_of(l)?)))
        };
        let coordinator = lock(&self.txns).get(&partition).cloned();
        match coordinator {
            Some(c) => match c.runtime.check_serving::<TxnError>() {
                Ok(()) => Ok(c),
                Err(e) => Err(txn_status(partition, hint(c.runtime.leader()), e)),
            },
            None => Err(txn_status(partition, hint(None), RunError::NotCoordinator(None))),
        }
    }

    /// The coordinator of `group`'s transactions here, or a forward of `message` to it (once:
    /// `hops` 0 only) by `call`.
    async fn at_txn_coordinator<T, R, F, Fut>(
        &self,
        group: &str,
        hops: u32,
        message: T,
        principal: Option<String>,
        call: F,
    ) -> Result<Result<(Arc<TxnCoordinator>, T), R>, Status>
    where
        T: Clone,
        F: Fn(tonic::transport::Channel, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let (partition, _) = self.txn_partition_of(group)?;
        match self.serving_txns(partition) {
            Ok(c) => Ok(Ok((c, message))),
            Err(status) if hops == 0 => {
                let replicas = self.txn_group(partition).map(|(_, r)| r).unwrap_or_default();
                self.forward_to_coordinator(&replicas, status, message, principal, call).await.map(Err)
            }
            Err(status) => Err(status),
        }
    }

    /// A prepare: validated and authorized here (produce on every target), run by the group's
    /// coordinator (forwarded there when that is not this node).
    pub(crate) async fn prepare_txn(
        &self,
        request: pb::PrepareTxnRequest,
        hops: u32,
        caller: Option<Caller>,
    ) -> Result<pb::TxnStatus, Status> {
        self.check_serving()?;
        validate(&request.group, &request.transaction_id)?;
        let limits = self.config.txn.limits;
        let count: usize = request.records.iter().map(|p| p.records.len()).sum();
        if count == 0 || count > limits.records_max {
            return Err(Status::invalid_argument(format!(
                "a transaction carries 1 to {} records ({count} given)",
                limits.records_max
            )));
        }
        let meta = self.metadata();
        for p in &request.records {
            if meta.topics.get(&p.topic).is_some_and(|t| t.internal) || p.topic == crate::META_TOPIC {
                return Err(Status::permission_denied(format!("{} is internal to Keel", p.topic)));
            }
            meta.partition(&p.topic, p.partition).map_err(meta_status)?;
            self.authorize(caller.as_ref(), Resource::Topic(&p.topic), Operation::Produce)?;
            let limit = self.batch_limit(meta.topics.get(&p.topic).and_then(|t| t.settings.batch_bytes_max));
            for r in &p.records {
                let size = r.key.as_ref().map_or(0, |k| k.len())
                    + r.value.as_ref().map_or(0, |v| v.len())
                    + r.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len())).sum::<usize>();
                if size + txn::RECORD_OVERHEAD_BYTES + txn::BATCH_OVERHEAD_BYTES > limit {
                    return Err(Status::invalid_argument(format!(
                        "a record of {size} bytes does not fit the batches of {} (at most {limit} bytes, {} of them \
                         for framing)",
                        p.topic,
                        txn::RECORD_OVERHEAD_BYTES + txn::BATCH_OVERHEAD_BYTES
                    )));
                }
            }
        }
        drop(meta);
        let group = request.group.clone();
        let at = self
            .at_txn_coordinator(&group, hops, request, None, |channel, request| async move {
                pb::producer_client::ProducerClient::new(channel).prepare_txn(request).await
            })
            .await?;
        let (coordinator, request) = match at {
            Ok(here) => here,
            Err(answer) => return Ok(answer),
        };
        let records: Vec<HalfRecord> = request
            .records
            .into_iter()
            .flat_map(|p| {
                let target = Tp::new(&p.topic, p.partition);
                p.records.into_iter().map(move |r| HalfRecord {
                    target: target.clone(),
                    key: r.key.map(|k| k.to_vec()),
                    value: r.value.map(|v| v.to_vec()),
                    headers: r
                        .headers
                        .into_iter()
                        .map(|h| PublishHeader { key: h.key, value: h.value.map(|v| v.to_vec()) })
                        .collect(),
                })
            })
            .collect();
        let (now, txn_id, timeout) = (self.clock.now_ms(), request.transaction_id, request.timeout_ms);
        let (new, status) = coordinator
            .runtime
            .run(txn::KEY, |s: &Txns| {
                s.prepare(&group, &txn_id, records, timeout, now, &limits)
                    .map(|(r, st)| (encode(&r), (!r.is_empty(), st)))
            })
            .await
            .map_err(|e| txn_status(coordinator.partition, None, e))?;
        if new {
            self.metrics.txn_prepared.inc();
            coordinator.check_wake.notify_one();
        }
        Ok(to_pb(&group, &txn_id, &status))
    }

    /// Refuses unless `caller` may produce to every topic of the transaction.
    fn authorize_txn(
        &self,
        caller: Option<&Caller>,
        coordinator: &TxnCoordinator,
        group: &str,
        txn_id: &str,
    ) -> Result<(), Status> {
        let topics = coordinator.runtime.read(|s| s.status(group, txn_id).map(|st| st.topics.clone()));
        for topic in topics.unwrap_or_default() {
            self.authorize(caller, Resource::Topic(&topic), Operation::Produce)?;
        }
        Ok(())
    }

    /// An END (forwarded to the group's coordinator when that is not this node).
    pub(crate) async fn end_txn(
        &self,
        request: pb::EndTxnRequest,
        hops: u32,
        caller: Option<Caller>,
    ) -> Result<pb::TxnStatus, Status> {
        self.check_serving()?;
        validate(&request.group, &request.transaction_id)?;
        let group = request.group.clone();
        let at = self
            .at_txn_coordinator(&group, hops, request, forwarded_principal(&caller), |channel, request| async move {
                pb::producer_client::ProducerClient::new(channel).end_txn(request).await
            })
            .await?;
        let (coordinator, request) = match at {
            Ok(here) => here,
            Err(answer) => return Ok(answer),
        };
        self.authorize_txn(caller.as_ref(), &coordinator, &group, &request.transaction_id)?;
        let status = self.end_here(&coordinator, &group, &request.transaction_id, request.commit).await?;
        Ok(to_pb(&group, &request.transaction_id, &status))
    }

    /// Runs an END on this coordinator (asking for a producer id when a commit needs a new
    /// publisher).
    async fn end_here(
        &self,
        coordinator: &TxnCoordinator,
        group: &str,
        txn_id: &str,
        commit: bool,
    ) -> Result<TxnStatus, Status> {
        let (limits, now) = (self.config.txn.limits, self.clock.now_ms());
        let meta = self.metadata();
        let batch_limit =
            |tp: &Tp| self.batch_limit(meta.topics.get(&tp.topic).and_then(|t| t.settings.batch_bytes_max));
        let mut spares = Vec::new();
        loop {
            let ended = coordinator
                .runtime
                .run(txn::KEY, |s: &Txns| {
                    let was = s.status(group, txn_id).map(|st| st.state);
                    s.end(group, txn_id, commit, now, batch_limit, &limits, &spares)
                        .map(|(r, st)| (encode(&r), (was != Some(st.state), st)))
                })
                .await;
            match ended {
                Ok((changed, status)) => {
                    if changed {
                        if commit {
                            self.metrics.txn_committed.inc();
                            coordinator.publish_wake.notify_one();
                        } else {
                            self.metrics.txn_rolled_back.inc();
                        }
                    }
                    return Ok(status);
                }
                Err(RunError::Refused(TxnError::ProducerIdNeeded)) if spares.is_empty() => {
                    spares = self.spare_producer_ids(coordinator, group, txn_id).await?;
                }
                Err(RunError::Refused(TxnError::Contradicts { .. }))
                    if self.coordinator_faults.txn_contradictions_accepted =>
                {
                    let status = coordinator.runtime.read(|s| s.status(group, txn_id).cloned());
                    return status.ok_or_else(|| Status::internal("the transaction vanished"));
                }
                Err(e) => return Err(txn_status(coordinator.partition, None, e)),
            }
        }
    }

    /// A producer id for each target partition of (group, txn) without a publisher yet.
    async fn spare_producer_ids(
        &self,
        coordinator: &TxnCoordinator,
        group: &str,
        txn_id: &str,
    ) -> Result<Vec<i64>, Status> {
        let needed = coordinator.runtime.read(|s| s.publishers_needed(group, txn_id)).max(1);
        let mut ids = Vec::with_capacity(needed);
        for _ in 0..needed {
            ids.push(self.next_producer_id().await?);
        }
        Ok(ids)
    }

    /// A resume (forwarded to the group's coordinator when that is not this node).
    pub(crate) async fn resume_txn(
        &self,
        request: pb::ResumeTxnRequest,
        hops: u32,
        caller: Option<Caller>,
    ) -> Result<pb::TxnStatus, Status> {
        self.check_serving()?;
        validate(&request.group, &request.transaction_id)?;
        let group = request.group.clone();
        let at = self
            .at_txn_coordinator(&group, hops, request, forwarded_principal(&caller), |channel, request| async move {
                pb::admin_client::AdminClient::new(channel).resume_txn(request).await
            })
            .await?;
        let (coordinator, request) = match at {
            Ok(here) => here,
            Err(answer) => return Ok(answer),
        };
        let txn_id = request.transaction_id;
        self.authorize_txn(caller.as_ref(), &coordinator, &group, &txn_id)?;
        let now = self.clock.now_ms();
        let status = coordinator
            .runtime
            .run(txn::KEY, |s: &Txns| s.resume(&group, &txn_id, now).map(|(r, st)| (encode(&r), st)))
            .await
            .map_err(|e| txn_status(coordinator.partition, None, e))?;
        info!(group, txn = txn_id, "transaction resumed: its group is checked again");
        coordinator.check_wake.notify_one();
        Ok(to_pb(&group, &txn_id, &status))
    }

    /// Lists transactions: of one group at its coordinator, or of every group from every
    /// partition's coordinator (forwarded), merged in (group, id) order.
    pub(crate) async fn list_txns(
        &self,
        request: pb::ListTxnsRequest,
        hops: u32,
        caller: Option<Caller>,
    ) -> Result<pb::ListTxnsResponse, Status> {
        self.check_serving()?;
        let limit = match request.limit {
            0 => 1_000,
            n @ 1..=1_000 => n as usize,
            n => return Err(Status::invalid_argument(format!("limit is 1 to 1000 (got {n})"))),
        };
        let count = self.txn_partition_of("-")?.1;
        let partitions: Vec<u32> = if let Some(p) = request.partition {
            if p >= count {
                return Err(Status::invalid_argument(format!("__txn has {count} partitions (got partition {p})")));
            }
            vec![p]
        } else if request.group.is_empty() {
            (0..count).collect()
        } else {
            validate_group_name(&request.group)
                .map_err(|e| Status::invalid_argument(format!("producer group: {e}")))?;
            vec![self.txn_partition_of(&request.group)?.0]
        };
        let after = (!request.after_group.is_empty())
            .then(|| (request.after_group.clone(), request.after_transaction_id.clone()));
        let mut all = Vec::new();
        let mut more = false;
        for partition in partitions {
            let page = match self.serving_txns(partition) {
                Ok(c) => {
                    let group = (!request.group.is_empty()).then_some(request.group.as_str());
                    let listed = c.runtime.read(|s| s.list(group, request.include_ended, after.as_ref(), limit + 1));
                    let mut out: Vec<pb::TxnStatus> = listed
                        .iter()
                        .filter(|l| {
                            self.authorize(caller.as_ref(), Resource::Group(&l.group), Operation::Describe).is_ok()
                        })
                        .map(|l| to_pb(&l.group, &l.txn, &l.status))
                        .collect();
                    let more = out.len() > limit;
                    out.truncate(limit);
                    pb::ListTxnsResponse { transactions: out, more }
                }
                Err(status) if hops == 0 => {
                    let replicas = self.txn_group(partition).map(|(_, r)| r).unwrap_or_default();
                    let one =
                        pb::ListTxnsRequest { limit: limit as u32, partition: Some(partition), ..request.clone() };
                    let principal = forwarded_principal(&caller);
                    self.forward_to_coordinator(&replicas, status, one, principal, |channel, request| async move {
                        pb::admin_client::AdminClient::new(channel).list_txns(request).await
                    })
                    .await?
                }
                Err(status) => return Err(status),
            };
            more |= page.more;
            all.extend(page.transactions);
        }
        all.sort_by(|a, b| (&a.group, &a.transaction_id).cmp(&(&b.group, &b.transaction_id)));
        if all.len() > limit {
            more = true;
            all.truncate(limit);
        }
        Ok(pb::ListTxnsResponse { transactions: all, more })
    }

    /// Registers a producer group's check-back stream on this coordinator: checks go out on
    /// `tx`; the stream ends when this node stops coordinating.
    pub(crate) fn open_checks(&self, group: &str) -> Result<(Arc<TxnCoordinator>, u64, CheckStream), Status> {
        validate_group_name(group).map_err(|e| Status::invalid_argument(format!("producer group: {e}")))?;
        let (partition, _) = self.txn_partition_of(group)?;
        let coordinator = self.serving_txns(partition)?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let id = coordinator.next.fetch_add(1, Ordering::Relaxed);
        lock(&coordinator.checkers).entry(group.to_owned()).or_default().push(Checker { id, tx });
        info!(group, partition, "check-back stream opened");
        // Transactions of this group may have waited for a producer to ask.
        coordinator.check_wake.notify_one();
        Ok((coordinator, id, rx))
    }

    /// Forgets a closed check-back stream.
    pub(crate) fn close_checks(&self, coordinator: &TxnCoordinator, group: &str, id: u64) {
        let mut checkers = lock(&coordinator.checkers);
        if let Some(list) = checkers.get_mut(group) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                checkers.remove(group);
            }
        }
    }

    /// A producer's answer to a check, on its stream: ends the transaction as its outcome says
    /// (an UNKNOWN answer waits for the next check).
    pub(crate) async fn check_answer(
        &self,
        coordinator: &TxnCoordinator,
        group: &str,
        answer: pb::TxnCheckAnswer,
        caller: Option<&Caller>,
    ) -> Result<(), Status> {
        let commit = match pb::TxnOutcome::try_from(answer.outcome) {
            Ok(pb::TxnOutcome::TxnCommit) => true,
            Ok(pb::TxnOutcome::TxnRollback) => false,
            Ok(pb::TxnOutcome::TxnUnknown) => return Ok(()),
            _ => return Err(Status::invalid_argument("an answer's outcome is COMMIT, ROLLBACK or UNKNOWN")),
        };
        if !answer.group.is_empty() && answer.group != group {
            return Err(Status::invalid_argument("a check-back stream answers for the group it opened with"));
        }
        txn::validate_txn_id(&answer.transaction_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.authorize_txn(caller, coordinator, group, &answer.transaction_id)?;
        self.end_here(coordinator, group, &answer.transaction_id, commit).await.map(|_| ())
    }

    /// Sends due check-backs, applies the expiry policy and compacts, while this node
    /// coordinates; ends the groups' streams when it stops.
    async fn txn_loop(self: Arc<Self>, coordinator: Arc<TxnCoordinator>) {
        let mut active = coordinator.runtime.active();
        loop {
            if active.wait_for(Option::is_some).await.is_err() {
                return;
            }
            let mut reported = (0i64, 0i64);
            let mut keepalive_at = tokio::time::Instant::now();
            let mut checked: std::collections::BTreeSet<(txn::TxnKey, u32)> = std::collections::BTreeSet::new();
            while active.borrow().is_some() {
                let now = self.clock.now_ms();
                // A check whose answer left before its replay (only under a fault that answers
                // before the commit) is still due in the state: checking it again would repeat
                // the round in a loop that never waits. Skip what was checked at the count the
                // state still shows; the replay moves the count on.
                let due = coordinator.runtime.read(|s| {
                    checked.retain(|(key, checks): &(txn::TxnKey, u32)| {
                        s.status(&key.0, &key.1).is_some_and(|st| st.checks == *checks && st.state == TxnState::Pending)
                    });
                    s.due_checks(now, CHECK_BATCH)
                });
                let due: Vec<_> = due.into_iter().filter(|d| !checked.contains(&(d.key.clone(), d.checks))).collect();
                if tokio::time::Instant::now() >= keepalive_at {
                    keepalive_at = tokio::time::Instant::now() + KEEPALIVE;
                    let mut checkers = lock(&coordinator.checkers);
                    for list in checkers.values_mut() {
                        list.retain(live);
                        for c in list.iter() {
                            let _ = c.tx.try_send(Ok(pb::TxnCheck::default()));
                        }
                    }
                    checkers.retain(|_, list| !list.is_empty());
                }
                let (mut busy, mut failed) = (false, false);
                for check in due {
                    match self.check_one(&coordinator, &check.key, now).await {
                        Ok(progressed) => {
                            busy |= progressed;
                            checked.insert((check.key, check.checks));
                        }
                        Err(why) => {
                            warn!(partition = coordinator.partition, why, "a transaction check failed; retried");
                            failed = true;
                            break;
                        }
                    }
                }
                let (payload, pending) =
                    coordinator.runtime.read(|s| (s.payload_bytes(), (s.pending() as i64, s.expired() as i64)));
                if coordinator.runtime.bytes_since_compaction() > self.config.txn.compact_bytes.max(payload * 2)
                    && let Err(e) = coordinator.runtime.compact().await
                {
                    warn!(error = ?e, "compacting a __txn partition failed; retried later");
                }
                self.metrics.txn_pending.inc_by(pending.0 - reported.0);
                self.metrics.txn_expired_held.inc_by(pending.1 - reported.1);
                reported = pending;
                if busy && !failed {
                    continue;
                }
                let next = coordinator.runtime.read(Txns::next_check_ms).filter(|_| !failed);
                // After a failure the due check is still due: wait a poll, not a millisecond.
                let wait = next.map_or(CHECK_POLL, |at| {
                    Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0).clamp(1, 250))
                });
                tokio::select! {
                    _ = coordinator.check_wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            self.metrics.txn_pending.dec_by(reported.0);
            self.metrics.txn_expired_held.dec_by(reported.1);
            // Producers find the next coordinator: end their streams with where to go.
            let streams = std::mem::take(&mut *lock(&coordinator.checkers));
            let status = self.serving_txns(coordinator.partition).err();
            for c in streams.into_values().flatten() {
                if let Some(status) = &status {
                    let _ = c.tx.try_send(Err(status.clone()));
                }
            }
        }
    }

    /// Records the due check of one transaction and asks its group, or applies the expiry
    /// policy; returns whether anything was recorded.
    async fn check_one(&self, coordinator: &TxnCoordinator, key: &txn::TxnKey, now: i64) -> Result<bool, String> {
        let (group, txn_id) = (key.0.as_str(), key.1.as_str());
        let limits = self.config.txn.limits;
        let meta = self.metadata();
        let batch_limit =
            |tp: &Tp| self.batch_limit(meta.topics.get(&tp.topic).and_then(|t| t.settings.batch_bytes_max));
        let mut spares = Vec::new();
        let checked = loop {
            let outcome = coordinator
                .runtime
                .run(txn::KEY, |s: &Txns| {
                    s.check(group, txn_id, now, batch_limit, &limits, &spares).map(|(r, c)| (encode(&r), c))
                })
                .await;
            match outcome {
                Ok(c) => break c,
                Err(RunError::Refused(TxnError::ProducerIdNeeded)) if spares.is_empty() => {
                    spares = self
                        .spare_producer_ids(coordinator, group, txn_id)
                        .await
                        .map_err(|s| s.message().to_owned())?;
                }
                Err(e) => return Err(format!("{e:?}")),
            }
        };
        match checked {
            Checked::Ask(attempt) => {
                self.metrics.txn_checks.inc();
                let prepared_at_ms =
                    coordinator.runtime.read(|s| s.status(group, txn_id).map_or(0, |st| st.prepared_ms));
                let check = pb::TxnCheck {
                    group: group.to_owned(),
                    transaction_id: txn_id.to_owned(),
                    attempt,
                    prepared_at_ms,
                };
                let sent = self.send_check(coordinator, group, check);
                debug!(group, txn = txn_id, attempt, sent, "check-back");
                Ok(true)
            }
            Checked::Expired { committed } => {
                self.metrics.txn_expired.inc();
                if committed {
                    coordinator.publish_wake.notify_one();
                }
                warn!(
                    group,
                    txn = txn_id,
                    committed,
                    "transaction expired: every check-back went unanswered (`keel txn list` shows it)"
                );
                Ok(true)
            }
            Checked::Nothing => Ok(false),
        }
    }

    /// Sends a check to one of the group's open streams (round robin); whether one took it.
    fn send_check(&self, coordinator: &TxnCoordinator, group: &str, check: pb::TxnCheck) -> bool {
        let mut checkers = lock(&coordinator.checkers);
        let Some(list) = checkers.get_mut(group) else { return false };
        list.retain(live);
        let n = list.len();
        let start = coordinator.next.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..n {
            if list[(start + i) % n].tx.try_send(Ok(check.clone())).is_ok() {
                return true;
            }
        }
        false
    }
}
