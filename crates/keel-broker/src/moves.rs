//! Partition moves (`keel partition move`). The controller records where a partition goes
//! (`MovePartition`); the partition's raft leader carries the move out — the new replicas join
//! as learners, catch up, and become the voters by joint consensus — and reports it finished
//! (`FinishMove`), after which the old replicas drop their copy. Every step is either a `__meta`
//! record or raft membership state, and each is idempotent, so whichever node leads the group
//! after a crash anywhere mid-move resumes from what it finds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keel_proto::v1 as pb;
use keel_raft::types::ChangeMembers;
use keel_raft::{GroupId, Node, NodeId};
use tokio::task::JoinSet;
use tonic::Status;
use tracing::{Instrument, info, info_span, warn};

use crate::broker::Inner;
use crate::error::meta_status;
use crate::metadata::{Command, META_GROUP, META_TOPIC, Metadata, Partition};

/// The partitions (`topic/partition`) that `node` holds (a replica, or the target of a move),
/// `__meta/0` for a recorded metadata voter.
pub(crate) fn held_by(meta: &Metadata, node: NodeId) -> Vec<String> {
    meta.all_partitions().filter(|(_, _, p)| p.hosts().any(|n| n == node)).map(|(t, i, _)| format!("{t}/{i}")).collect()
}

/// The partitions (`topic/partition`) with a move in progress that ends with a copy on `node`.
pub(crate) fn rebuilding(meta: &Metadata, node: NodeId) -> Vec<String> {
    meta.moving()
        .filter(|(_, _, p)| p.target.as_ref().is_some_and(|t| t.contains(&node)))
        .map(|(topic, partition, _)| format!("{topic}/{partition}"))
        .collect()
}

/// Longest a new replica may take to catch up before the leader gives up this attempt (and
/// tries again on its next pass): a learner that is down must not pin the driver forever.
const CATCH_UP_MAX: Duration = Duration::from_secs(600);
/// How long a node may take to say how far it reconciled.
const RECONCILED_ASK_MAX: Duration = Duration::from_secs(2);
/// How often each node looks for moves whose groups it leads: leadership changes are not
/// metadata changes, so a new leader would otherwise find its moves only at the next one.
const MOVE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Moves off decommissioned nodes under way at once: each new replica catches up over the
/// network and the disk, and production must keep its throughput meanwhile.
const DECOMMISSION_MOVES_MAX: usize = 4;

/// How a pass of a move on the leader ended.
enum Pass {
    /// The move is recorded as finished.
    Finished,
    /// This leader, which the move removes, handed leadership to a replica that stays.
    HandedOver,
}

impl Inner {
    /// Starts moving `topic`/`partition` to `to` (controller leader only) and returns the
    /// partition as recorded. Asking for the replicas it has, or for the move in progress,
    /// changes nothing.
    pub(crate) async fn move_partition(
        &self,
        topic: &str,
        partition: u32,
        to: Vec<NodeId>,
    ) -> Result<Partition, Status> {
        let _turn = self.controller_turn().await?;
        if topic == META_TOPIC {
            self.record_voters().await?;
        }
        let meta = self.metadata();
        meta.check_move(topic, partition, &to).map_err(meta_status)?;
        let current = meta.partition(topic, partition).map_err(meta_status)?;
        let settled = current.target.is_none() && current.replicas == to;
        if settled || current.target.as_ref() == Some(&to) {
            return Ok(current.clone());
        }
        let command = Command::MovePartition { topic: topic.to_owned(), partition, from: current.replicas.clone(), to };
        let offset = self.propose(&command).await?;
        if let Some(refusal) = self.outcome_at(&meta, offset)? {
            return Err(meta_status(refusal));
        }
        self.metadata().partition(topic, partition).cloned().map_err(meta_status)
    }

    /// Marks `node`'s data dir lost (controller leader only): its next registration may present
    /// a new key, and every partition it holds moves to the same replicas with a new copy on
    /// it. Returns those partitions (`topic/partition`).
    pub(crate) async fn replace_node(&self, node: NodeId) -> Result<Vec<String>, Status> {
        let _turn = self.controller_turn().await?;
        // A voter's copy of `__meta` is replaced like a partition's: the voters must be on record.
        self.record_voters().await?;
        let meta = self.metadata();
        let offset = self.propose(&Command::ReplaceNode { node_id: node }).await?;
        if let Some(refusal) = self.outcome_at(&meta, offset)? {
            return Err(meta_status(refusal));
        }
        let partitions = rebuilding(&self.metadata(), node);
        info!(node, partitions = partitions.len(), "node replaced: its copies are rebuilt by their leaders");
        Ok(partitions)
    }

    /// Records the metadata group's voters (controller leader, in its turn) unless they are: a
    /// voter change or replacement starts from them.
    async fn record_voters(&self) -> Result<(), Status> {
        let meta = self.metadata();
        if meta.controller.is_some() {
            return Ok(());
        }
        let metrics = self.node.metrics(META_GROUP).map_err(|e| Status::unavailable(e.to_string()))?;
        let membership = metrics.membership_config.membership();
        if membership.get_joint_config().len() > 1 || membership.learner_ids().next().is_some() {
            return Err(Status::unavailable("the metadata group is changing its voters; retry"));
        }
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let offset = self.propose(&Command::RecordVoters { voters }).await?;
        match self.outcome_at(&meta, offset)? {
            None => Ok(()),
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// Marks `node` decommissioned (controller leader only); returns the partitions it holds,
    /// which [`Inner::move_loop`] then moves off it.
    pub(crate) async fn decommission_node(&self, node: NodeId) -> Result<Vec<String>, Status> {
        let _turn = self.controller_turn().await?;
        // A decommissioned voter leaves the metadata group too, which needs the voters on record.
        self.record_voters().await?;
        let meta = self.metadata();
        if !meta.nodes.get(&node).is_some_and(|n| n.decommissioned) {
            let offset = self.propose(&Command::DecommissionNode { node_id: node }).await?;
            if let Some(refusal) = self.outcome_at(&meta, offset)? {
                return Err(meta_status(refusal));
            }
            info!(node, "node decommissioned: its partitions move to the other nodes");
        }
        Ok(held_by(&self.metadata(), node))
    }

    /// On the controller leader: starts the next move off a decommissioned node, if one is due
    /// and fewer than [`DECOMMISSION_MOVES_MAX`] such moves are under way.
    async fn next_decommission_move(&self) {
        let meta = self.metadata();
        let leaving = |n: &NodeId| meta.nodes.get(n).is_some_and(|i| i.decommissioned);
        let under_way = meta.moving().filter(|(_, _, p)| p.replicas.iter().any(leaving)).count();
        if under_way >= DECOMMISSION_MOVES_MAX {
            return;
        }
        let Some((topic, partition, to)) = meta.plan_decommission_move() else { return };
        match self.move_partition(&topic, partition, to.clone()).await {
            Ok(_) => info!(topic, partition, ?to, "moving a partition off a decommissioned node"),
            Err(status) => warn!(topic, partition, ?to, %status, "a move off a decommissioned node did not start"),
        }
    }

    /// Records that `topic`/`partition`'s group now has `to` as its voters: on the controller
    /// leader, appends `FinishMove`; elsewhere forwards the report there.
    pub(crate) async fn finish_move(
        &self,
        topic: &str,
        partition: u32,
        to: Vec<NodeId>,
        hops: u32,
    ) -> Result<(), Status> {
        if !self.leads_meta() {
            let message = pb::FinishMoveRequest { topic: topic.to_owned(), partition, replicas: to.clone() };
            let request = self.forwardable(message, hops)?;
            self.forward_to_controller(request, |channel, request| async move {
                pb::controller_client::ControllerClient::new(channel).finish_move(request).await.map(|_| ())
            })
            .await?;
            self.wait_meta(|m| m.partition(topic, partition).is_ok_and(|p| p.target.is_none())).await;
            return Ok(());
        }
        let _turn = self.controller_turn().await?;
        let meta = self.metadata();
        let current = meta.partition(topic, partition).map_err(meta_status)?;
        if current.target.is_none() && current.replicas == to {
            return Ok(());
        }
        let command = Command::FinishMove { topic: topic.to_owned(), partition, to };
        let offset = self.propose(&command).await?;
        match self.outcome_at(&meta, offset)? {
            None => Ok(()),
            Some(refusal) => Err(meta_status(refusal)),
        }
    }

    /// Drives every move whose group this node leads, one task per group.
    pub(crate) async fn move_loop(self: Arc<Self>) {
        let me = self.config.node_id;
        let mut rx = self.meta.subscribe();
        let mut driving: JoinSet<GroupId> = JoinSet::new();
        let mut busy: HashSet<GroupId> = HashSet::new();
        loop {
            while let Some(done) = driving.try_join_next() {
                if let Ok(group) = done {
                    busy.remove(&group);
                }
            }
            let meta = rx.borrow_and_update().clone();
            if self.leads_meta() {
                self.next_decommission_move().await;
            }
            for (topic, partition, p) in meta.moving() {
                let Some(target) = p.target.clone() else { continue };
                let generations: BTreeMap<NodeId, u32> = target.iter().map(|n| (*n, p.generation_of(*n))).collect();
                if busy.contains(&p.group) || self.node.leader(p.group) != Some(me) {
                    continue;
                }
                busy.insert(p.group);
                let inner = Arc::clone(&self);
                let (group, topic) = (p.group, topic.to_owned());
                let span = info_span!("move", topic = %topic, partition, group);
                driving.spawn(
                    async move {
                        match inner.drive_move(group, &topic, partition, target, generations).await {
                            Ok(Pass::Finished) => {}
                            // Not at once: the new leader takes over, or the cause (a node
                            // down, metadata behind) takes time to go away.
                            Ok(Pass::HandedOver) => tokio::time::sleep(MOVE_SCAN_INTERVAL).await,
                            Err(reason) => {
                                warn!(%reason, "moving the partition did not finish this time; retrying");
                                tokio::time::sleep(MOVE_SCAN_INTERVAL).await;
                            }
                        }
                        group
                    }
                    .instrument(span),
                );
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(MOVE_SCAN_INTERVAL) => {}
                Some(Ok(group)) = driving.join_next(), if !driving.is_empty() => { busy.remove(&group); }
            }
        }
    }

    /// One pass of a move on the group's leader: copies of a stale generation out, learners in,
    /// caught up, voters replaced, leftover learners out, then the controller told. Each step
    /// looks at the group's current membership first, so a pass after a crash skips what is done.
    async fn drive_move(
        &self,
        group: GroupId,
        topic: &str,
        partition: u32,
        target: Vec<NodeId>,
        generations: BTreeMap<NodeId, u32>,
    ) -> Result<Pass, String> {
        let raft = self.node.raft(group).map_err(|e| e.to_string())?;
        self.node.wake(group).await;
        let term = {
            let metrics = self.node.metrics(group).map_err(|e| e.to_string())?;
            if metrics.current_leader != Some(self.config.node_id) {
                return Err("this node does not lead the group".to_owned());
            }
            metrics.current_term
        };
        let fence = || self.still_driving(group, (topic, partition), &target, &generations, term);
        fence().await?;
        let wanted: BTreeSet<NodeId> = generations.keys().copied().collect();
        let membership = || -> Result<_, String> {
            let metrics = self.node.metrics(group).map_err(|e| e.to_string())?;
            Ok(metrics.membership_config.membership().clone())
        };
        // A member that is another copy than the one the move wants on its node (an old copy
        // of a node the partition returns to) goes first: a membership names each node once.
        let stale = |m: &keel_raft::types::Membership| -> BTreeSet<NodeId> {
            m.nodes()
                .filter(|(id, n)| generations.get(id).is_some_and(|g| *g != n.generation))
                .map(|(id, _)| *id)
                .collect()
        };
        let current = membership()?;
        let gone = stale(&current);
        if !gone.is_empty() {
            if gone.contains(&self.config.node_id) {
                return Err("this leader is a stale copy of the partition; another must lead the move".to_owned());
            }
            info!(nodes = ?gone, "removing old copies on nodes the partition returns to");
            let keep: BTreeSet<NodeId> = current.voter_ids().filter(|id| !gone.contains(id)).collect();
            if current.voter_ids().any(|id| gone.contains(&id)) {
                fence().await?;
                raft.change_membership(ChangeMembers::ReplaceAllVoters(keep), false)
                    .await
                    .map_err(|e| format!("removing the old copies {gone:?}: {e}"))?;
            }
            let left: BTreeSet<NodeId> = stale(&membership()?);
            if !left.is_empty() {
                fence().await?;
                raft.change_membership(ChangeMembers::RemoveNodes(left), false)
                    .await
                    .map_err(|e| format!("removing the old copies {gone:?}: {e}"))?;
            }
        }
        let (voters, joint) = {
            let m = membership()?;
            (m.voter_ids().collect::<BTreeSet<_>>(), m.get_joint_config().len() > 1)
        };
        // A new replica must have reconciled up to this move first: one that was a replica
        // before and has yet to apply the move that took it off would otherwise drop that old
        // copy after the leader counted it as caught up (the log of a voter would go back).
        let needed = self.metadata().applied_offset;
        for id in wanted.difference(&voters) {
            let reached = self.reconciled_on(*id).await?;
            if reached < needed {
                return Err(format!("node {id} has reconciled the metadata up to {reached}, not yet to {needed}"));
            }
        }
        // Every replica that is not a voter yet is (re-)added and awaited: a learner a previous
        // leader added may not have caught up, and a voter must never be one that has not
        // (unless the injected bug says otherwise: the simulation's negative control).
        let early = self.coordinator_faults.move_finished_early;
        // Their catch-up is paced (`catch_up_bytes_per_sec`) until they vote.
        let throttled: Vec<_> = wanted.difference(&voters).map(|id| self.node.throttle_catch_up(group, *id)).collect();
        for id in wanted.difference(&voters) {
            let addr = self.peer_addr_of(*id).ok_or_else(|| format!("node {id} has no peer address yet"))?;
            let node = Node::at(addr, generations.get(id).copied().unwrap_or(0));
            info!(
                node = id,
                generation = node.generation,
                "adding the new replica as a learner and waiting for it to catch up"
            );
            match tokio::time::timeout(CATCH_UP_MAX, raft.add_learner(*id, node, false)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("adding node {id} as a learner: {e}")),
                Err(_) => return Err(format!("node {id} could not be added as a learner in {CATCH_UP_MAX:?}")),
            }
            if !early {
                self.wait_caught_up(group, &raft, *id).await?;
            }
        }
        // Caught up: from here they become voters, whose replication is never paced.
        drop(throttled);
        if early {
            self.finish_move(topic, partition, target, 0).await.map_err(|s| s.message().to_owned())?;
            return Ok(Pass::Finished);
        }
        if (voters != wanted || joint) && !wanted.contains(&self.config.node_id) {
            // A leader that removes itself steps down only once the change committed, and the
            // partition then waits an election timeout for a leader. A voter that stays takes
            // over first (if caught up) and makes the change itself.
            if let Some(successor) = self.caught_up_successor(group, &voters, &target) {
                info!(to = successor, "handing leadership to a replica that stays, before the change");
                let _ = raft.trigger().transfer_leader(successor).await;
                return Ok(Pass::HandedOver);
            }
        }
        if voters != wanted || joint {
            info!(voters = ?wanted, "making the new replicas the voters");
            fence().await?;
            raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
                .await
                .map_err(|e| format!("changing the voters to {wanted:?}: {e}"))?;
        }
        let stray: BTreeSet<NodeId> = membership()?.learner_ids().filter(|id| !wanted.contains(id)).collect();
        if !stray.is_empty() {
            fence().await?;
            raft.change_membership(ChangeMembers::RemoveNodes(stray.clone()), false)
                .await
                .map_err(|e| format!("removing the learners {stray:?}: {e}"))?;
        }
        self.check_committed_voters(group, &raft, &generations).await?;
        self.finish_move(topic, partition, target, 0).await.map_err(|s| s.message().to_owned())?;
        info!("partition moved");
        Ok(Pass::Finished)
    }

    /// Fences a membership change: this node's metadata has caught up with what the controller
    /// has committed, the move is still the one this pass drives (`target`, `generations`), and
    /// this node still leads the group in the term it led when the pass began. A driver acting on
    /// metadata older than a later move would take the group back to this move's replicas
    /// (the simulation's seed 7: a decommission's result undone by a stale replace), while the
    /// metadata says the copies it names are gone.
    async fn still_driving(
        &self,
        group: GroupId,
        (topic, partition): (&str, u32),
        target: &[NodeId],
        generations: &BTreeMap<NodeId, u32>,
        term: u64,
    ) -> Result<(), String> {
        let committed = self.meta_position(0).await.map_err(|s| format!("asking the controller: {}", s.message()))?;
        self.wait_applied(committed).await.map_err(|s| s.message().to_owned())?;
        let meta = self.metadata();
        let p = meta.partition(topic, partition).map_err(|e| e.to_string())?;
        let now: BTreeMap<NodeId, u32> = target.iter().map(|n| (*n, p.generation_of(*n))).collect();
        if p.target.as_deref() != Some(target) || now != *generations {
            return Err(format!("the move to {target:?} is no longer the one in progress (now {:?})", p.target));
        }
        let metrics = self.node.metrics(group).map_err(|e| e.to_string())?;
        if metrics.current_leader != Some(self.config.node_id) || metrics.current_term != term {
            return Err("leadership of the group changed during the pass".to_owned());
        }
        Ok(())
    }

    /// Checks that the group's voters are `wanted` (those copies) in a membership that is *committed*: the
    /// metrics show the latest membership in the log, and one that a crash of this leader can
    /// still undo must not let the old replicas drop their copies (the simulation found a blank
    /// re-added replica voting in the configuration that came back).
    async fn check_committed_voters(
        &self,
        group: GroupId,
        raft: &keel_raft::types::Raft,
        wanted: &BTreeMap<NodeId, u32>,
    ) -> Result<(), String> {
        let settled = |metrics: &keel_raft::types::Metrics| {
            let membership = metrics.membership_config.membership();
            let uniform = membership.get_joint_config().len() == 1;
            let voters: BTreeMap<NodeId, u32> = membership.nodes().map(|(id, n)| (*id, n.generation)).collect();
            let all_vote = membership.voter_ids().count() == voters.len();
            let index = metrics.membership_config.log_id().as_ref().map_or(0, |l| l.index);
            (uniform && voters == *wanted && all_vote, index)
        };
        let (right, index) = settled(&self.node.metrics(group).map_err(|e| e.to_string())?);
        if !right {
            return Err(format!("the group's membership is not {wanted:?} alone yet"));
        }
        raft.wait(Some(CATCH_UP_MAX))
            .applied_index_at_least(Some(index), "membership committed")
            .await
            .map_err(|e| format!("the membership change was not committed: {e}"))?;
        let metrics = self.node.metrics(group).map_err(|e| e.to_string())?;
        let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
        match settled(&metrics) {
            (true, now) if now == index && applied >= index => Ok(()),
            _ => Err("the group's membership changed while waiting for it to commit".to_owned()),
        }
    }

    /// Waits until learner `id` holds this leader's log up to where it ended when the wait
    /// began, twice (the second round covers what was written during the first). openraft's
    /// own "caught up" (`add_learner` blocking) means within 5,000 entries, which for a partition
    /// of 1 MiB batches is gigabytes: the move would then finish with a voter far behind, at full
    /// speed past the throttle, and the partition down to its other replicas until it caught up.
    async fn wait_caught_up(&self, group: GroupId, raft: &keel_raft::types::Raft, id: NodeId) -> Result<(), String> {
        for _ in 0..2 {
            let target = self.node.metrics(group).map_err(|e| e.to_string())?.last_log_index;
            let matched = |m: &keel_raft::types::Metrics| {
                m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index)
            };
            raft.wait(Some(CATCH_UP_MAX))
                .metrics(|m| m.replication.is_none() || matched(m) >= target, "learner caught up")
                .await
                .map_err(|e| format!("node {id} did not catch up: {e}"))?;
            let now = self.node.metrics(group).map_err(|e| e.to_string())?;
            if now.replication.is_none() {
                return Err("this node stopped leading the group while the learner caught up".to_owned());
            }
            info!(node = id, matched = ?matched(&now), ?target, "the new replica caught up to the leader's log");
        }
        Ok(())
    }

    /// The first replica of `target` that is a voter now and matched everything this leader
    /// applied, if any.
    fn caught_up_successor(&self, group: GroupId, voters: &BTreeSet<NodeId>, target: &[NodeId]) -> Option<NodeId> {
        let metrics = self.node.metrics(group).ok()?;
        let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
        let replication = metrics.replication.as_ref()?;
        target.iter().copied().find(|id| {
            voters.contains(id) && replication.get(id).is_some_and(|m| m.as_ref().is_some_and(|m| m.index >= applied))
        })
    }

    /// How far `node` has reconciled its partitions with the metadata.
    async fn reconciled_on(&self, node: NodeId) -> Result<u64, String> {
        if node == self.config.node_id {
            return Ok(self.reconciled.load(std::sync::atomic::Ordering::Acquire));
        }
        let addr = self.peer_addr_of(node).ok_or_else(|| format!("node {node} has no peer address yet"))?;
        let channel = self.channel(&addr).map_err(|s| s.message().to_owned())?;
        let mut client = pb::node_status_client::NodeStatusClient::new(channel);
        let call = client.reconciled(pb::ReconciledRequest {});
        match tokio::time::timeout(RECONCILED_ASK_MAX, call).await {
            Ok(Ok(r)) => Ok(r.into_inner().reconciled_offset),
            Ok(Err(status)) => {
                self.forget_broken(&addr, &status);
                Err(format!("node {node}: {}", status.message()))
            }
            Err(_) => {
                self.drop_channel(&addr);
                Err(format!("node {node} did not say how far it reconciled in time"))
            }
        }
    }
}
