//! Delayed and scheduled messages on this node: one [`TimerCoordinator`] per `__delayed`
//! partition it hosts, each the generic [`Runtime`] over the pure [`Timers`] shard, plus what only
//! a live coordinator does — move the horizon as time passes, fire what is due (a `Fired` marker
//! and a publish decision per timer, in one batch), and publish the fired records exactly once
//! through `publisher.rs`.
//!
//! A delayed produce may reach any node: it is validated there and forwarded to the leader of
//! the `__delayed` partition that holds its target partition's timers (so one target's timers
//! fire in the order of their times), which answers once the schedule is committed.
//!
//! **Time.** A timer fires when both the wall clock and a monotonic estimate (the wall clock
//! when the node started plus the monotonic time since) have passed its time: a wall clock
//! stepped forward is held back by the estimate, one stepped back only delays. Below the latest
//! deliver-at already fired, the coordinator's "now" never goes (a new leader whose clock is
//! behind does not hold back timers that were due before).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_coordinator::Record;
use keel_coordinator::groups::Tp;
use keel_coordinator::publish::PublishHeader;
use keel_coordinator::timers::{self, Scheduling, Timer, TimerError, TimerRecord, Timers};
use keel_proto::v1 as pb;
use keel_raft::{GroupId, NodeId};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tracing::{debug, info, warn};

use crate::broker::{HOPS_HEADER, Inner, is_transport_failure};
use crate::coordinator::{RunError, Runtime};
use crate::error::{NOT_LEADER, meta_status, not_leader, with_reason};
use crate::publisher::PublishSource;

/// The longest a coordinator waits between looks at its timers when none is due sooner.
const FIRE_POLL: Duration = Duration::from_millis(250);
/// Timers fired per operation (one batch of markers and decisions).
const FIRE_BATCH: usize = 256;
/// Bytes read per look-up of timers' `Scheduled` records.
const READ_BYTES: usize = 1 << 20;

/// `ErrorInfo.reason` of a cancel of a timer that already fired, was cancelled, or never existed
/// (FAILED_PRECONDITION).
pub const TIMER_NOT_PENDING: &str = "TIMER_NOT_PENDING";

/// The coordinator of the timers of one `__delayed` partition.
pub struct TimerCoordinator {
    /// Its `__delayed` partition.
    pub(crate) partition: u32,
    /// The partition's runtime.
    pub(crate) runtime: Arc<Runtime<Timers>>,
    /// Woken when timers fired (their records wait to be published).
    publish_wake: Arc<Notify>,
    /// Woken when a timer due before the horizon was scheduled: it may be due before the
    /// fire loop's next look.
    fire_wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode(records: &[TimerRecord]) -> Vec<Record> {
    records.iter().map(TimerRecord::encode).collect()
}

/// The `__delayed` partition that holds the timers of `topic`/`partition`.
pub fn delayed_partition(topic: &str, partition: u32, partitions: u32) -> u32 {
    let mut key = topic.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    (keel_record::fnv1a_64(&key) % u64::from(partitions.max(1))) as u32
}

/// A timer's id as clients see it: `<__delayed partition>-<offset>`.
pub fn timer_id(partition: u32, offset: u64) -> String {
    format!("{partition}-{offset}")
}

/// Parses a timer id.
pub fn parse_timer_id(id: &str) -> Option<(u32, u64)> {
    let (p, o) = id.split_once('-')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// The status of a refused or failed timer operation.
fn timer_status(partition: u32, leader: Option<(NodeId, String)>, e: RunError<TimerError>) -> Status {
    let what = format!("{}/{partition}", crate::metadata::DELAYED_TOPIC);
    match e {
        RunError::Refused(TimerError::Invalid(m)) => Status::invalid_argument(m),
        RunError::Refused(e @ TimerError::NotPending(_)) => {
            with_reason(Code::FailedPrecondition, e.to_string(), TIMER_NOT_PENDING, &[])
        }
        RunError::Refused(e @ TimerError::Full(_)) => Status::resource_exhausted(e.to_string()),
        RunError::Refused(e @ TimerError::ProducerIdNeeded) => Status::unavailable(e.to_string()),
        RunError::NotCoordinator(_) => not_leader(&what, leader),
        RunError::Loading => Status::unavailable(format!("the coordinator of {what} is loading its timers; retry")),
        RunError::Ambiguous(m) => Status::unavailable(format!(
            "{what}: the change may or may not have been committed ({m}); retry (a delayed produce with the same request_token)"
        )),
        RunError::TooLarge(m) => Status::resource_exhausted(format!("{what}: {m}")),
    }
}

/// What a schedule operation answers: the ids of its timers.
enum Placed {
    /// Appended now: the timers are the records from the `skip`-th of the batch on.
    New { skip: u64, count: u32 },
    /// A retry: the first attempt's timers.
    Already { first: u64, count: u32 },
}

impl Inner {
    /// Starts a coordinator for every `__delayed` partition this node hosts.
    pub(crate) fn start_timer_coordinators(self: &Arc<Self>) {
        let meta = self.metadata();
        let Some(topic) = meta.delayed_topic() else { return };
        for (partition, p) in topic.partitions.iter().enumerate() {
            let partition = partition as u32;
            if !p.replicas.contains(&self.config.node_id)
                || self.node.store(p.group).is_err()
                || lock(&self.timers).contains_key(&partition)
            {
                continue;
            }
            let limits = self.config.delayed.limits;
            let runtime = Arc::new(Runtime::new(
                p.group,
                Arc::clone(&self.node),
                Arc::clone(&self.clock),
                self.config.append_timeout,
                self.coordinator_faults,
                Timers::default,
            ));
            let coordinator = Arc::new(TimerCoordinator {
                partition,
                runtime: Arc::clone(&runtime),
                publish_wake: Arc::new(Notify::new()),
                fire_wake: Notify::new(),
            });
            lock(&self.timers).insert(partition, Arc::clone(&coordinator));
            info!(partition, group = p.group, delay_max_ms = limits.delay_max_ms, "timer coordinator started");
            self.spawn("timers-replay", Arc::clone(&runtime).replay_loop());
            self.spawn("timers-leadership", Arc::clone(&runtime).leadership_loop());
            let (metrics, clock) = (Arc::clone(&self.metrics), Arc::clone(&self.clock));
            let source = PublishSource {
                runtime,
                wake: Arc::clone(&coordinator.publish_wake),
                landed: Box::new(move |p| {
                    metrics.delayed_published.inc();
                    let due = p.publish.headers.iter().find(|h| h.key == timers::DELIVER_AT_HEADER);
                    let due = due.and_then(|h| std::str::from_utf8(h.value.as_deref()?).ok()?.parse::<i64>().ok());
                    if let Some(due) = due {
                        metrics.delayed_lateness.observe((clock.now_ms() - due).max(0) as f64 / 1_000.0);
                    }
                }),
            };
            self.spawn("timers-publish", Arc::clone(self).publish_loop(source));
            self.spawn("timers-fire", Arc::clone(self).timer_loop(coordinator));
        }
    }

    /// The timer coordinator of a `__delayed` partition, if this node hosts it.
    pub(crate) fn timer_coordinator(&self, partition: u32) -> Option<Arc<TimerCoordinator>> {
        lock(&self.timers).get(&partition).cloned()
    }

    /// The coordinator's "now": the wall clock, held back by the monotonic estimate, and never
    /// below the latest deliver-at fired.
    fn timer_now(&self, coordinator: &TimerCoordinator) -> i64 {
        let wall = self.clock.now_ms();
        let (booted_wall, booted) = self.booted;
        let estimate = booted_wall.saturating_add(i64::try_from(booted.elapsed().as_millis()).unwrap_or(i64::MAX));
        let now = if self.coordinator_faults.timers_wall_clock_only { wall } else { wall.min(estimate) };
        now.max(coordinator.runtime.read(|s| s.latest_fired_ms))
    }

    /// Moves the horizon, fires what is due and compacts, while this node coordinates.
    async fn timer_loop(self: Arc<Self>, coordinator: Arc<TimerCoordinator>) {
        let mut active = coordinator.runtime.active();
        let limits = self.config.delayed.limits;
        loop {
            if active.wait_for(Option::is_some).await.is_err() {
                return;
            }
            let mut reported = 0i64;
            let mut last_fired = None;
            while active.borrow().is_some() {
                let now = self.timer_now(&coordinator);
                let mut busy = false;
                if coordinator.runtime.read(|s| s.advance(now, &limits)).is_some() {
                    let moved = coordinator
                        .runtime
                        .run(timers::KEY, |s: &Timers| {
                            Ok::<_, ()>((s.advance(now, &limits).iter().map(TimerRecord::encode).collect(), ()))
                        })
                        .await;
                    if let Err(e) = moved {
                        debug!(error = ?e, "moving the timers' horizon failed; retried");
                    }
                }
                match self.fire_due(&coordinator, now, &mut last_fired).await {
                    Ok(fired) => busy = fired > 0,
                    Err(why) => warn!(partition = coordinator.partition, why, "firing due timers failed; retried"),
                }
                if coordinator.runtime.bytes_since_compaction() > self.config.delayed.compact_bytes
                    && let Err(e) = coordinator.runtime.compact().await
                {
                    warn!(error = ?e, "compacting a __delayed partition failed; retried later");
                }
                let pending = i64::try_from(coordinator.runtime.read(Timers::pending)).unwrap_or(i64::MAX);
                self.metrics.delayed_pending.inc_by(pending - reported);
                reported = pending;
                if busy {
                    continue;
                }
                let next = coordinator.runtime.read(|s| s.due(i64::MAX, 1).first().map(|d| d.deliver_at_ms));
                let wait = next.map_or(FIRE_POLL, |at| {
                    Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0).clamp(1, 250))
                });
                tokio::select! {
                    _ = coordinator.fire_wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            self.metrics.delayed_pending.dec_by(reported);
        }
    }

    /// Fires up to [`FIRE_BATCH`] timers due at `now`; returns how many fired. `last_fired` is a
    /// timer the previous round fired: while it is still due the state does not hold that round
    /// yet (an answer that left before its replay), and firing again would only repeat the round
    /// in a loop that never yields, so this waits for the state instead.
    async fn fire_due(
        &self,
        coordinator: &TimerCoordinator,
        now: i64,
        last_fired: &mut Option<u64>,
    ) -> Result<usize, String> {
        let due = coordinator.runtime.read(|s| s.due(now, FIRE_BATCH));
        if due.is_empty() || due.iter().any(|d| Some(d.id) == *last_fired) {
            return Ok(0);
        }
        let ids: Vec<u64> = due.iter().map(|d| d.id).collect();
        let found = self.read_scheduled(coordinator, &ids)?;
        let due: Vec<(u64, Timer)> = ids.iter().filter_map(|id| Some((*id, found.get(id)?.clone()))).collect();
        let (limits, partition, wall) = (self.config.delayed.limits, coordinator.partition, self.clock.now_ms());
        let meta = self.metadata();
        let batch_limit =
            |tp: &Tp| self.batch_limit(meta.topics.get(&tp.topic).and_then(|t| t.settings.batch_bytes_max));
        let mut spare = None;
        loop {
            let fired = coordinator
                .runtime
                .run(timers::KEY, |s: &Timers| {
                    s.fire(&due, |id| timer_id(partition, id), batch_limit, &limits, wall, spare)
                        .map(|(r, out)| (encode(&r), out))
                })
                .await;
            match fired {
                Ok(out) => {
                    if !out.fired.is_empty() {
                        coordinator.publish_wake.notify_one();
                    }
                    *last_fired = out.fired.first().copied();
                    return Ok(out.fired.len());
                }
                Err(RunError::Refused(TimerError::ProducerIdNeeded)) if spare.is_none() => {
                    spare = Some(self.next_producer_id().await.map_err(|s| s.message().to_owned())?);
                }
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    }

    /// The `Scheduled` records of timers, by id (an id that holds none is left out).
    fn read_scheduled(&self, coordinator: &TimerCoordinator, ids: &[u64]) -> Result<BTreeMap<u64, Timer>, String> {
        let group = self.delayed_group(coordinator.partition).ok_or("__delayed is not in the metadata")?.0;
        let store = self.node.store(group).map_err(|e| e.to_string())?;
        let mut wanted: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        let mut found = BTreeMap::new();
        while let Some(&next) = wanted.first() {
            let batches = match store.read_committed(next, READ_BYTES) {
                Ok(b) => b,
                Err(keel_storage::StorageError::OutOfRange { .. }) => {
                    wanted.remove(&next);
                    continue;
                }
                Err(e) => return Err(format!("reading timer {next}: {e}")),
            };
            if batches.is_empty() {
                wanted.remove(&next);
                continue;
            }
            let mut last = next;
            for batch in &batches {
                for record in batch.records() {
                    let record = record.map_err(|e| format!("undecodable __delayed record: {e}"))?;
                    let offset = record.offset;
                    if wanted.remove(&offset)
                        && let Ok(TimerRecord::Scheduled(t)) = TimerRecord::decode(&Record::from(record))
                    {
                        found.insert(offset, t);
                    }
                }
                last = last.max(batch.header().next_offset());
            }
            // Ids below where this read ended that it did not hold are not timers.
            wanted.retain(|id| *id >= last);
        }
        Ok(found)
    }

    /// The raft group and replicas of a `__delayed` partition.
    fn delayed_group(&self, partition: u32) -> Option<(GroupId, Vec<NodeId>)> {
        let meta = self.metadata();
        let p = meta.delayed_topic()?.partitions.get(partition as usize)?;
        Some((p.group, p.replicas.clone()))
    }

    fn delayed_replicas(&self, partition: u32) -> Vec<NodeId> {
        self.delayed_group(partition).map(|(_, r)| r).unwrap_or_default()
    }

    /// The coordinator of `partition` if this node serves it, or the status that says where to
    /// go instead (with the leader's address when known).
    fn serving_timers(&self, partition: u32) -> Result<Arc<TimerCoordinator>, Status> {
        let hint = |leader: Option<NodeId>| {
            let leader = leader.or_else(|| self.delayed_group(partition).and_then(|(_, r)| r.first().copied()));
            leader.filter(|l| *l != self.config.node_id).and_then(|l| Some((l, self.addr_of(l)?)))
        };
        match self.timer_coordinator(partition) {
            Some(c) => match c.runtime.check_serving::<TimerError>() {
                Ok(()) => Ok(c),
                Err(e) => Err(timer_status(partition, hint(c.runtime.leader()), e)),
            },
            None => Err(timer_status(partition, hint(None), RunError::NotCoordinator(None))),
        }
    }

    /// A delayed produce (`deliver_at_ms` or `delay_ms` set): validated here, scheduled by the
    /// coordinator of the target's `__delayed` partition (forwarded there when that is not this
    /// node), answered with the timer ids once the schedule is committed.
    pub(crate) async fn produce_delayed(
        &self,
        request: pb::ProduceRequest,
        hops: u32,
    ) -> Result<pb::ProduceResponse, Status> {
        self.check_serving()?;
        let deliver_at_ms = match (request.deliver_at_ms, request.delay_ms) {
            (Some(_), Some(_)) => return Err(Status::invalid_argument("set deliver_at_ms or delay_ms, not both")),
            (Some(at), None) if at >= 0 => at,
            (None, Some(delay)) if delay >= 0 => self.clock.now_ms().saturating_add(delay),
            _ => return Err(Status::invalid_argument("deliver_at_ms and delay_ms must not be negative")),
        };
        if !request.batch.is_empty() {
            return Err(Status::invalid_argument("a delayed produce carries `records`, not a pre-encoded batch"));
        }
        if request.records.is_empty() {
            return Err(Status::invalid_argument("a delayed produce needs at least one record"));
        }
        if request.producer_id.is_some_and(|id| id >= 0) || request.base_sequence.is_some() {
            return Err(Status::invalid_argument(
                "a delayed produce carries no producer stamp: set request_token to make its retries safe",
            ));
        }
        let meta = self.metadata();
        if meta.topics.get(&request.topic).is_some_and(|t| t.internal) || request.topic == crate::META_TOPIC {
            return Err(Status::permission_denied(format!("{} is internal to Keel", request.topic)));
        }
        meta.partition(&request.topic, request.partition).map_err(meta_status)?;
        // A record its target's batches cannot hold would be refused at its time, forever, and
        // hold back every later timer of that partition: refuse it now.
        let limit = self.batch_limit(meta.topics.get(&request.topic).and_then(|t| t.settings.batch_bytes_max));
        for r in &request.records {
            let size = r.key.as_ref().map_or(0, |k| k.len())
                + r.value.as_ref().map_or(0, |v| v.len())
                + r.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len())).sum::<usize>();
            if size + timers::RECORD_OVERHEAD_BYTES + timers::BATCH_OVERHEAD_BYTES > limit {
                return Err(Status::invalid_argument(format!(
                    "a delayed record of {size} bytes does not fit the batches of {} (at most {limit} bytes, \
                     {} of them for framing)",
                    request.topic,
                    timers::RECORD_OVERHEAD_BYTES + timers::BATCH_OVERHEAD_BYTES
                )));
            }
        }
        let Some(delayed) = meta.delayed_topic() else {
            return Err(Status::unavailable("the cluster has not created __delayed yet; retry"));
        };
        let partition = delayed_partition(&request.topic, request.partition, delayed.partitions.len() as u32);
        drop(meta);
        let coordinator = match self.serving_timers(partition) {
            Ok(c) => c,
            Err(status) if hops == 0 => {
                let request = pb::ProduceRequest { deliver_at_ms: Some(deliver_at_ms), delay_ms: None, ..request };
                return self
                    .forward_to_coordinator(
                        &self.delayed_replicas(partition),
                        status,
                        request,
                        None,
                        |channel, request| async move {
                            pb::producer_client::ProducerClient::new(channel).produce(request).await
                        },
                    )
                    .await;
            }
            Err(status) => return Err(status),
        };
        let ids = self.schedule(&coordinator, request, deliver_at_ms).await?;
        Ok(pb::ProduceResponse { timer_ids: ids, ..Default::default() })
    }

    async fn schedule(
        &self,
        coordinator: &TimerCoordinator,
        request: pb::ProduceRequest,
        deliver_at_ms: i64,
    ) -> Result<Vec<String>, Status> {
        let target = Tp::new(&request.topic, request.partition);
        let timers: Vec<Timer> = request
            .records
            .into_iter()
            .map(|r| Timer {
                target: target.clone(),
                deliver_at_ms,
                key: r.key.map(|k| k.to_vec()),
                value: r.value.map(|v| v.to_vec()),
                headers: r
                    .headers
                    .into_iter()
                    .map(|h| PublishHeader { key: h.key, value: h.value.map(|v| v.to_vec()) })
                    .collect(),
            })
            .collect();
        let (limits, now, partition) = (self.config.delayed.limits, self.clock.now_ms(), coordinator.partition);
        let outcome = coordinator
            .runtime
            .run_placed(timers::KEY, |s: &Timers| match s.schedule(timers, request.request_token, now, &limits)? {
                Scheduling::New(records) => {
                    let count = records.iter().filter(|r| matches!(r, TimerRecord::Scheduled(_))).count();
                    let skip = (records.len() - count) as u64;
                    Ok((encode(&records), Placed::New { skip, count: count as u32 }))
                }
                Scheduling::Already { first, count } => Ok((Vec::new(), Placed::Already { first, count })),
            })
            .await;
        let (first, count) = match outcome {
            Ok((Placed::New { skip, count }, Some(base))) => {
                self.metrics.delayed_scheduled.inc_by(u64::from(count));
                if deliver_at_ms < coordinator.runtime.read(|s| s.horizon_ms) {
                    coordinator.fire_wake.notify_one();
                }
                (base + skip, count)
            }
            Ok((Placed::Already { first, count }, _)) => (first, count),
            Ok((Placed::New { .. }, None)) => return Err(Status::internal("a schedule appended nothing")),
            Err(e) => return Err(timer_status(partition, None, e)),
        };
        Ok((first..first + u64::from(count)).map(|o| timer_id(partition, o)).collect())
    }

    /// Cancels a timer before it fires (forwarded to its coordinator when that is not this node).
    pub(crate) async fn cancel_delayed(
        &self,
        request: pb::CancelDelayedRequest,
        hops: u32,
        caller: Option<crate::auth::Caller>,
    ) -> Result<pb::CancelDelayedResponse, Status> {
        self.check_serving()?;
        let Some((partition, id)) = parse_timer_id(&request.timer_id) else {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a timer id (<partition>-<offset>, as a delayed produce answers)",
                request.timer_id
            )));
        };
        if self.delayed_group(partition).is_none() {
            return Err(with_reason(
                Code::FailedPrecondition,
                format!("timer {} does not exist", request.timer_id),
                TIMER_NOT_PENDING,
                &[],
            ));
        }
        let coordinator = match self.serving_timers(partition) {
            Ok(c) => c,
            Err(status) if hops == 0 => {
                // Only the coordinator knows the timer's topic: it checks on the caller's behalf.
                let principal = match &caller {
                    Some(crate::auth::Caller::Principal(p @ crate::tls::Principal::User(_))) => Some(p.to_string()),
                    _ => None,
                };
                return self
                    .forward_to_coordinator(
                        &self.delayed_replicas(partition),
                        status,
                        request,
                        principal,
                        |channel, request| async move {
                            pb::producer_client::ProducerClient::new(channel).cancel_delayed(request).await
                        },
                    )
                    .await;
            }
            Err(status) => return Err(status),
        };
        let timer = self
            .read_scheduled(&coordinator, &[id])
            .map_err(|e| Status::unavailable(format!("reading timer {}: {e}; retry", request.timer_id)))?
            .remove(&id)
            .ok_or_else(|| timer_status(partition, None, RunError::Refused(TimerError::NotPending(id))))?;
        self.authorize(
            caller.as_ref(),
            crate::acl::Resource::Topic(&timer.target.topic),
            crate::acl::Operation::Produce,
        )?;
        coordinator
            .runtime
            .run(timers::KEY, |s: &Timers| s.cancel(id, &timer).map(|r| (encode(&r), ())))
            .await
            .map_err(|e| timer_status(partition, None, e))?;
        self.metrics.delayed_cancelled.inc();
        Ok(pb::CancelDelayedResponse { deliver_at_ms: timer.deliver_at_ms })
    }

    /// Sends a request to the coordinator of an internal-topic partition held by `replicas`: the
    /// node `refused` names, then each replica, following one more leader hint.
    pub(crate) async fn forward_to_coordinator<T, R, F, Fut>(
        &self,
        replicas: &[NodeId],
        refused: Status,
        message: T,
        principal: Option<String>,
        call: F,
    ) -> Result<R, Status>
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        use tonic_types::StatusExt;
        let mut candidates: Vec<String> = self.hinted_peer(&refused).into_iter().collect();
        candidates.extend(replicas.iter().filter(|r| **r != self.config.node_id).filter_map(|r| self.peer_addr_of(*r)));
        let mut tried = std::collections::BTreeSet::new();
        let mut last = refused;
        let deadline = self.config.append_timeout + Duration::from_secs(1);
        while let Some(addr) = candidates.iter().find(|a| !tried.contains(*a)).cloned() {
            tried.insert(addr.clone());
            let channel = self.channel(&addr)?;
            let mut request = Request::new(message.clone());
            request.set_timeout(deadline);
            request.metadata_mut().insert(HOPS_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            if let Some(value) = principal.as_deref().and_then(|p| p.parse().ok()) {
                request.metadata_mut().insert(crate::auth::PRINCIPAL_HEADER, value);
            }
            let status = match tokio::time::timeout(deadline, call(channel, request)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    self.drop_channel(&addr);
                    return Err(Status::deadline_exceeded(format!(
                        "the coordinator at {addr} did not answer in time; the change may or may not have been made"
                    )));
                }
            };
            let not_leader = status.get_details_error_info().is_some_and(|i| i.reason == NOT_LEADER);
            if not_leader {
                if let Some(addr) = self.hinted_peer(&status).filter(|a| !tried.contains(a)) {
                    candidates.insert(0, addr);
                }
            } else if is_transport_failure(&status) {
                self.forget_broken(&addr, &status);
            } else {
                return Err(status);
            }
            last = status;
        }
        Err(last)
    }
}
