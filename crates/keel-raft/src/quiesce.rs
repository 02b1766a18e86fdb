//! Quiescent raft groups: an idle group whose followers have everything stops its heartbeats and
//! election timers, and liveness comes from one heartbeat per node pair instead.
//!
//! openraft heartbeats every group on its own, so idle CPU grows with the partition count (100
//! idle partitions cost a quarter of a core here). A leader whose group has been idle for two
//! heartbeat intervals, with every replica holding and having applied its last entry, asks each
//! follower node (one `Quiesce` RPC per node for all its groups) to stop the group's ticker; only
//! when every follower agreed does it stop its own. A quiescent group costs nothing until:
//!
//! - a write, a read-index barrier or a leadership transfer at the leader wakes it: ticker on, a
//!   heartbeat round, and the caller waits for a quorum's acknowledgement (openraft refuses writes
//!   of a leader whose lease ran out, as it has while quiet);
//! - any AppendEntries, snapshot or handover for it reaches a follower: woken before openraft
//!   sees it;
//! - its leader's node stops sending node heartbeats for the liveness timeout (the raft lease):
//!   the followers wake and campaign as after a lost leader;
//! - a vote request reaches it. A quiescent leader refuses it and wakes, so the candidate (a
//!   restarted follower, typically) hears from it; a quiescent follower refuses it while its
//!   leader's node is alive, as openraft refuses one while its leader's lease holds, and passes it
//!   on otherwise (and always when the candidate is its leader: that node restarted).
//!
//! Safety does not rest on any of this: stopping timers and refusing votes never let raft elect
//! two leaders in one term or lose a committed entry. What quiescence changes is who a node names
//! as leader: a quiescent leader has no raft-level acknowledgements, so it names itself while a
//! quorum of the group's voters' nodes acknowledged a node heartbeat sent within the lease. Each
//! of those nodes then counts it alive (from a receipt no earlier than that send) for at least as
//! long, and while it does, refuses votes for the group: no other leader can be elected in that
//! window, the same argument as openraft's leader lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_proto::v1 as pb;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::VoteResponse;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::convert;
use crate::network::{Groups, Peers, WeakGroups};
use crate::types::{GroupId, KeelRaft, LogId, Metrics, NodeId, Raft};

/// Most groups one `Quiesce` request may name (its size is bounded by the RPC limit too; this
/// bounds the work one request makes a follower do).
pub const QUIESCE_GROUPS_MAX: usize = 100_000;

/// What this node knows of a group's quiescence.
#[derive(Debug, Clone)]
enum State {
    /// Ticking. `idle`: since when (as leader) it has been seen idle at that last log index;
    /// `woken`: when it last left quiescence.
    Active { idle: Option<(Instant, u64)>, woken: Option<Instant> },
    /// Quiescent, led by this node, with these voters.
    Leader { voters: Vec<NodeId> },
    /// Quiescent, following `leader`.
    Follower { leader: NodeId },
    /// Never initialized here: no vote, no log, no membership, so nothing to time. A new
    /// partition's replicas wait like this for its first replica's election; ticking them all
    /// at once was most of the cost of creating thousands of partitions.
    Dormant,
}

/// What to do with a vote request that reached a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteAction {
    /// Hand it to openraft.
    Pass,
    /// Refuse it here: the group's leader is alive.
    Refuse,
}

/// Injected bugs, for negative controls only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuiesceFaults {
    /// A write (or barrier) at a quiescent leader does not wake its group: openraft refuses it
    /// (the leader's lease ran out while it was quiet) and the partition takes no write again
    /// until something else wakes it.
    pub writes_do_not_wake: bool,
}

/// One node's quiescence bookkeeping: per-group state and per-peer node liveness.
pub(crate) struct Quiescence {
    me: NodeId,
    enabled: bool,
    /// The raft lease (longest election timeout): how long a quiescent leader names itself after
    /// a node heartbeat a quorum acknowledged, and how long a follower counts a node alive.
    lease: Duration,
    /// How long a leader's group must stay idle before it asks to quiesce: long enough for a
    /// heartbeat to have told every follower the last commit.
    settle: Duration,
    faults: Mutex<QuiesceFaults>,
    groups: Mutex<BTreeMap<GroupId, State>>,
    /// When each peer's last node heartbeat arrived.
    heard: Mutex<BTreeMap<NodeId, Instant>>,
    /// When this node sent the last node heartbeat each peer acknowledged.
    acked: Mutex<BTreeMap<NodeId, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `last` is everything the group has and all of it is applied here.
fn settled_at(m: &Metrics) -> Option<LogId> {
    let last = m.last_applied?;
    (m.last_log_index == Some(last.index)).then_some(last)
}

impl Quiescence {
    pub(crate) fn new(me: NodeId, enabled: bool, lease: Duration, heartbeat: Duration) -> Quiescence {
        Quiescence {
            me,
            enabled,
            lease,
            settle: heartbeat * 2,
            faults: Mutex::new(QuiesceFaults::default()),
            groups: Mutex::new(BTreeMap::new()),
            heard: Mutex::new(BTreeMap::new()),
            acked: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn set_faults(&self, faults: QuiesceFaults) {
        *lock(&self.faults) = faults;
    }

    /// Forgets a group that left this node.
    pub(crate) fn remove(&self, group: GroupId) {
        lock(&self.groups).remove(&group);
    }

    /// A group just opened whose store is blank (nothing written, never voted): its ticker
    /// stops until it is initialized here or hears from a member, which wakes it as a quiescent
    /// group. (Not decided from openraft's metrics: right after `Raft::new` they still show the
    /// defaults, whatever the store holds.)
    pub(crate) fn open_dormant(&self, group: GroupId, raft: &Raft, blank: bool) {
        if self.enabled && blank {
            lock(&self.groups).insert(group, State::Dormant);
            raft.runtime_config().tick(false);
        }
    }

    /// Whether a group waits blank here, ticker off.
    pub(crate) fn is_dormant(&self, group: GroupId) -> bool {
        matches!(lock(&self.groups).get(&group), Some(State::Dormant))
    }

    /// Whether a group is quiescent here.
    pub(crate) fn is_quiescent(&self, group: GroupId) -> bool {
        matches!(lock(&self.groups).get(&group), Some(State::Leader { .. } | State::Follower { .. }))
    }

    /// When the group last left quiescence, if it is active.
    pub(crate) fn woken_at(&self, group: GroupId) -> Option<Instant> {
        match lock(&self.groups).get(&group) {
            Some(State::Active { woken, .. }) => *woken,
            _ => None,
        }
    }

    /// A node heartbeat from `node` arrived.
    pub(crate) fn heard_from(&self, node: NodeId) {
        lock(&self.heard).insert(node, Instant::now());
    }

    fn alive(&self, node: NodeId) -> bool {
        lock(&self.heard).get(&node).is_some_and(|at| at.elapsed() < self.lease)
    }

    /// Whether a quorum of `voters` (this node counting itself) acknowledged a node heartbeat
    /// this node sent within the lease.
    fn node_quorum(&self, voters: &[NodeId]) -> bool {
        let acked = lock(&self.acked);
        let fresh = voters
            .iter()
            .filter(|v| **v == self.me || acked.get(v).is_some_and(|sent| sent.elapsed() < self.lease))
            .count();
        fresh > voters.len() / 2
    }

    /// How many of a group's voters (this node counting itself) acknowledged a node heartbeat
    /// sent within the lease.
    pub(crate) fn voters_heard(&self, m: &Metrics) -> usize {
        let acked = lock(&self.acked);
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v == self.me || acked.get(v).is_some_and(|sent| sent.elapsed() < self.lease))
            .count()
    }

    /// Whether this node may name itself leader of a group whose raft-level acknowledgements are
    /// stale because it was quiet: quiescent (or woken within the lease) and acknowledged by a
    /// quorum of its voters' nodes.
    pub(crate) fn leads_quietly(&self, group: GroupId, m: &Metrics) -> bool {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let quiet = match lock(&self.groups).get(&group) {
            Some(State::Leader { .. }) => true,
            Some(State::Active { woken: Some(at), .. }) => at.elapsed() < self.lease,
            _ => false,
        };
        quiet && m.state == ServerState::Leader && self.node_quorum(&voters)
    }

    /// Leaves quiescence (ticker on). Returns whether it was quiescent.
    pub(crate) fn wake(&self, group: GroupId, raft: &Raft) -> bool {
        let mut groups = lock(&self.groups);
        let was = matches!(groups.get(&group), Some(State::Leader { .. } | State::Follower { .. } | State::Dormant));
        if was {
            groups.insert(group, State::Active { idle: None, woken: Some(Instant::now()) });
            raft.runtime_config().tick(true);
            debug!(group, "group woken");
        } else if let Some(State::Active { idle, .. }) = groups.get_mut(&group) {
            // Something is happening: the idle clock starts over.
            *idle = None;
        }
        was
    }

    /// An AppendEntries for a group arrived: wakes it unless it is a quiescent follower and this
    /// is a heartbeat of its leader that tells it nothing new. A leader's last heartbeats may
    /// still be in flight when its followers agree to quiesce; woken by them, followers would
    /// campaign with nothing to hear from, and could elect each other.
    pub(crate) fn on_append(
        &self,
        group: GroupId,
        raft: &Raft,
        vote: &crate::types::Vote,
        prev: Option<&LogId>,
        commit: Option<&LogId>,
        has_entries: bool,
    ) {
        let leader = match lock(&self.groups).get(&group) {
            Some(State::Follower { leader }) => Some(*leader),
            _ => None,
        };
        if let Some(leader) = leader
            && !has_entries
            && vote.leader_id.voted_for == leader
        {
            let m = raft.metrics();
            let m = m.borrow_watched();
            let last = settled_at(&m);
            if m.vote == *vote && last.is_some() && last.as_ref() == prev && last.as_ref() == commit {
                return;
            }
        }
        self.wake(group, raft);
    }

    /// Wakes a group this node may lead before a write or a leadership barrier, and waits
    /// (bounded) until a quorum has acknowledged it again: openraft refuses the writes of a leader
    /// whose lease ran out while it was quiet.
    pub(crate) async fn wake_to_lead(&self, group: GroupId, raft: &Raft, timeout: Duration) {
        if lock(&self.faults).writes_do_not_wake {
            return;
        }
        self.wake(group, raft);
        // Woken just now or within the lease (a wake-up sets `woken`): its raft lease may be stale.
        if self.woken_at(group).is_none_or(|at| at.elapsed() >= self.lease) {
            return;
        }
        let lease = self.lease;
        let fresh = move |m: &Metrics| {
            m.state != ServerState::Leader
                || crate::leadership::quorum_ack_age(m).is_some_and(|age| age < lease)
                || !crate::leadership::needs_others(m)
        };
        if fresh(&raft.metrics().borrow_watched()) {
            return;
        }
        let _ = raft.trigger().heartbeat().await;
        let _ = raft.wait(Some(timeout)).metrics(fresh, "a quorum acknowledges the woken leader").await;
    }

    /// What to do with a vote request from `candidate` for a group.
    pub(crate) fn on_vote(&self, group: GroupId, candidate: NodeId, raft: &Raft) -> VoteAction {
        let state = lock(&self.groups).get(&group).cloned();
        match state {
            Some(State::Leader { .. }) => {
                // The candidate has not heard from this leader (it restarted, most likely): waking
                // makes it hear, and the vote is refused as openraft refuses one within its lease.
                self.wake(group, raft);
                VoteAction::Refuse
            }
            Some(State::Follower { leader }) if candidate != leader && self.alive(leader) => VoteAction::Refuse,
            Some(State::Follower { .. } | State::Dormant) => {
                self.wake(group, raft);
                VoteAction::Pass
            }
            _ => VoteAction::Pass,
        }
    }

    /// A follower's answer to a leader's request to quiesce groups: the ones it stopped.
    pub(crate) fn on_quiesce(&self, from: NodeId, asked: Vec<pb::QuiescentGroup>, groups: &Groups) -> Vec<GroupId> {
        let mut quiesced = Vec::new();
        if !self.enabled {
            return quiesced;
        }
        for g in asked {
            let Ok(raft) = groups.get(g.group_id) else { continue };
            let Ok(vote) = convert::vote_from_pb(g.vote.as_ref()) else { continue };
            let Some(last) = g.last_log_id.as_ref().map(convert::log_id_from_pb) else { continue };
            let mut states = lock(&self.groups);
            let agrees = {
                let m = raft.metrics();
                let m = m.borrow_watched();
                m.state == ServerState::Follower
                    && m.current_leader == Some(from)
                    && vote.leader_id.voted_for == from
                    && vote.committed
                    && m.vote == vote
                    && settled_at(&m).as_ref() == Some(&last)
            };
            if agrees {
                states.insert(g.group_id, State::Follower { leader: from });
                raft.runtime_config().tick(false);
                quiesced.push(g.group_id);
            }
        }
        quiesced
    }

    /// This node's vote and last log id in a group, for a refusal it answers itself.
    pub(crate) fn refusal(raft: &Raft) -> VoteResponse<KeelRaft> {
        let m = raft.metrics();
        let m = m.borrow_watched();
        VoteResponse { vote: m.vote, vote_granted: false, last_log_id: m.last_applied }
    }
}

/// A leader's view of one group it could quiesce.
struct Candidate {
    group: GroupId,
    raft: Raft,
    vote: pb::Vote,
    last: LogId,
    voters: Vec<NodeId>,
    followers: Vec<NodeId>,
}

/// Runs until the node's groups are gone: every `period`, sends node heartbeats to every peer,
/// quiesces the idle groups this node leads, and wakes quiescent groups whose leader's node died
/// (as follower) or whose voters' nodes stopped acknowledging (as leader).
pub(crate) async fn run(q: Arc<Quiescence>, groups: WeakGroups, peers: Peers, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(all) = groups.upgrade() else { return };
        send_heartbeats(&q, &peers, &all);
        if !q.enabled {
            continue;
        }
        wake_stale(&q, &all);
        let candidates = idle_groups(&q, &all);
        if !candidates.is_empty() {
            quiesce(&q, &peers, candidates).await;
        }
    }
}

/// Node heartbeats go to the nodes this node shares a group with, and to none once it hosts no
/// group (a halted node is silent, as a dead one).
fn send_heartbeats(q: &Arc<Quiescence>, peers: &Peers, all: &Groups) {
    let mut members = std::collections::BTreeSet::new();
    for (_, raft) in all.all() {
        let m = raft.metrics();
        members.extend(m.borrow_watched().membership_config.membership().nodes().map(|(id, _)| *id));
    }
    members.remove(&q.me);
    for peer in members {
        let (q, peers) = (Arc::clone(q), peers.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            if peers.node_heartbeat(peer, q.me).await {
                let mut acked = lock(&q.acked);
                let at = acked.entry(peer).or_insert(sent);
                *at = (*at).max(sent);
            }
        });
    }
}

fn wake_stale(q: &Quiescence, all: &Groups) {
    let states: Vec<(GroupId, State)> = lock(&q.groups).iter().map(|(g, s)| (*g, s.clone())).collect();
    for (group, state) in states {
        let Ok(raft) = all.get(group) else {
            q.remove(group);
            continue;
        };
        let wake = match state {
            State::Leader { voters } => !q.node_quorum(&voters),
            State::Follower { leader } => !q.alive(leader),
            State::Active { .. } | State::Dormant => false,
        };
        if wake && q.wake(group, &raft) {
            info!(group, "quiescent group woken: a node it needs is not heard from");
        }
    }
}

/// The groups this node leads that have been idle and fully replicated for `settle`.
fn idle_groups(q: &Quiescence, all: &Groups) -> Vec<Candidate> {
    let now = Instant::now();
    let mut out = Vec::new();
    for (group, raft) in all.all() {
        let candidate = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader || !crate::leadership::needs_others(&m) {
                continue;
            }
            let Some(last) = settled_at(&m) else { continue };
            let fresh = crate::leadership::quorum_ack_age(&m).is_some_and(|age| age < q.lease);
            let membership = m.membership_config.membership();
            let single = membership.get_joint_config().len() == 1;
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let followers: Vec<NodeId> = membership.nodes().map(|(id, _)| *id).filter(|id| *id != q.me).collect();
            let caught_up = followers
                .iter()
                .all(|f| m.replication.as_ref().and_then(|r| r.get(f)).is_some_and(|p| p.as_ref() == Some(&last)));
            let own_term = last.leader_id.term == m.current_term && m.vote.committed;
            (fresh && single && caught_up && own_term).then(|| Candidate {
                group,
                raft: raft.clone(),
                vote: convert::vote_to_pb(&m.vote),
                last,
                voters,
                followers,
            })
        };
        let mut states = lock(&q.groups);
        let state = states.entry(group).or_insert(State::Active { idle: None, woken: None });
        let State::Active { idle, .. } = state else { continue };
        match candidate {
            None => *idle = None,
            Some(c) => match idle {
                Some((since, at)) if *at == c.last.index && now.duration_since(*since) >= q.settle => out.push(c),
                Some((_, at)) if *at == c.last.index => {}
                _ => *idle = Some((now, c.last.index)),
            },
        }
    }
    out
}

/// Asks each follower node to quiesce its share of `candidates` (one RPC per node), then stops
/// the groups every follower agreed to and that stayed idle meanwhile.
async fn quiesce(q: &Quiescence, peers: &Peers, candidates: Vec<Candidate>) {
    let mut asks: BTreeMap<NodeId, Vec<pb::QuiescentGroup>> = BTreeMap::new();
    for c in &candidates {
        for f in &c.followers {
            asks.entry(*f).or_default().push(pb::QuiescentGroup {
                group_id: c.group,
                vote: Some(c.vote),
                last_log_id: Some(convert::log_id_to_pb(&c.last)),
            });
        }
    }
    let answers = futures_util::future::join_all(asks.into_iter().map(|(node, groups)| async move {
        let agreed = peers.quiesce(node, q.me, groups).await.unwrap_or_default();
        (node, agreed)
    }))
    .await;
    let agreed: BTreeMap<NodeId, std::collections::BTreeSet<GroupId>> =
        answers.into_iter().map(|(n, gs)| (n, gs.into_iter().collect())).collect();
    let mut stopped = 0usize;
    for c in candidates {
        if !c.followers.iter().all(|f| agreed.get(f).is_some_and(|gs| gs.contains(&c.group))) {
            continue;
        }
        let mut states = lock(&q.groups);
        let still_idle =
            matches!(states.get(&c.group), Some(State::Active { idle: Some((_, at)), .. }) if *at == c.last.index);
        let unchanged = {
            let m = c.raft.metrics();
            let m = m.borrow_watched();
            m.state == ServerState::Leader && settled_at(&m).as_ref() == Some(&c.last)
        };
        if still_idle && unchanged {
            states.insert(c.group, State::Leader { voters: c.voters });
            c.raft.runtime_config().tick(false);
            stopped += 1;
        }
    }
    if stopped > 0 {
        debug!(node = q.me, groups = stopped, "groups quiesced");
    }
}
