//! A leader that lost its quorum: how a node presents a group's leadership, and how a leader
//! that no quorum has acknowledged for a whole lease steps down.
//!
//! openraft's CheckQuorum (`docs::protocol::check_quorum`) refuses new writes once no quorum has
//! acknowledged the leader for `election_timeout_max` (the lease), but leaves the node a leader
//! in its state and metrics, heartbeating, until it hears of a higher vote. When only the
//! leader's own messages are lost (a one-way cut), it never hears of one: the followers elect a
//! new leader it cannot learn about, while clients that still reach it are told it leads.
//! `Trigger::elect` ignores a leader, and a leadership transfer that nobody receives leaves it
//! refusing writes for good, so a node steps its cut-off leaders down itself: it grants its vote
//! in the next term to [`NOBODY`], as a node does for a candidate whose requests then all get
//! lost. That makes it a follower without a known leader, and costs nothing in safety (a vote
//! for a node that never campaigns elects no one; openraft still checks every real candidate's
//! log), nor in disruption: a follower sends no append or vote request in its new term; its
//! elections start with a pre-vote, which changes nobody's term and which a healthy majority
//! refuses while its leader's lease holds. When the cut heals, the first message of the
//! majority's leader (a later term, or the same one committed) makes it a follower of it.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::VoteRequest;
use tracing::{debug, info};

use crate::network::WeakGroups;
use crate::types::{GroupId, Metrics, NodeId, Raft, Vote};

/// The candidate a cut-off leader votes for when it steps down: no node may have this id (the
/// broker's configuration refuses it), so the vote elects no one.
pub const NOBODY: NodeId = NodeId::MAX;

/// How long ago a quorum last acknowledged this node as the leader of a group, from its metrics
/// (`None`: it is not the leader, or no quorum has acknowledged it yet).
pub(crate) fn quorum_ack_age(metrics: &Metrics) -> Option<Duration> {
    use openraft::Instant as _;
    metrics.last_quorum_acked.map(|acked| acked.into_inner().elapsed())
}

/// Whether the group has more than one voter: a single voter is a quorum by itself and can never
/// be cut off from it.
pub(crate) fn needs_others(metrics: &Metrics) -> bool {
    metrics.membership_config.membership().voter_ids().take(2).count() > 1
}

/// The leader `me` should name for a group, from its metrics: the leader it knows of, except
/// itself while no quorum has acknowledged it within `lease` (openraft refuses its writes then,
/// and the others may have elected someone else).
pub fn presented_leader(me: NodeId, metrics: &Metrics, lease: Duration) -> Option<NodeId> {
    let leader = metrics.current_leader?;
    if leader != me || !needs_others(metrics) {
        return Some(leader);
    }
    quorum_ack_age(metrics).filter(|age| *age < lease).map(|_| me)
}

/// For a group `me` leads: how many of its voters are in sync, and how many voters it has. A
/// voter is in sync when it holds every entry the leader applied and acknowledged the leader
/// within `lease` (the leader counts itself): a replica that died is out of sync within one lease
/// even when nothing is being written, as Kafka's ISR drops a follower after
/// `replica.lag.time.max.ms`. Metrics only; replication itself never asks.
pub fn in_sync_voters(me: NodeId, metrics: &Metrics, lease: Duration) -> (usize, usize) {
    use openraft::Instant as _;
    let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
    let matched = |voter: &NodeId| {
        let progress = metrics.replication.as_ref().and_then(|r| r.get(voter));
        progress.is_some_and(|m| m.as_ref().is_some_and(|m| m.index >= applied))
    };
    let heard = |voter: &NodeId| {
        let acked = metrics.heartbeat.as_ref().and_then(|h| h.get(voter));
        *voter == me || acked.is_some_and(|t| t.is_some_and(|t| t.into_inner().elapsed() < lease))
    };
    let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
    (voters.iter().filter(|v| matched(v) && heard(v)).count(), voters.len())
}

/// Whether a leader must step down: no quorum has acknowledged it for `lease`, counting from
/// when it was first seen leading (`leading_for` ago) while no quorum has acknowledged it yet.
pub(crate) fn cut_off(quorum_ack_age: Option<Duration>, leading_for: Duration, lease: Duration) -> bool {
    quorum_ack_age.unwrap_or(leading_for) >= lease
}

/// Runs until the node's groups are gone: every `period`, steps down each group this node has
/// led for a whole `lease` without a quorum acknowledging it.
/// A quiescent group is skipped (its leader has no raft acknowledgements by design; the
/// quiescence task wakes it when its voters' nodes stop answering), and a woken one is counted
/// as leading from when it woke.
pub(crate) async fn step_down_loop(
    groups: WeakGroups,
    quiescence: std::sync::Arc<crate::quiesce::Quiescence>,
    period: Duration,
    lease: Duration,
) {
    // Since when this node has led each group, and in which term.
    let mut leading: BTreeMap<GroupId, (u64, tokio::time::Instant)> = BTreeMap::new();
    loop {
        tokio::time::sleep(period).await;
        let Some(all) = groups.upgrade().map(|g| g.all()) else { return };
        let now = tokio::time::Instant::now();
        let mut due = Vec::new();
        let mut still_leading = BTreeMap::new();
        for (group, raft) in all {
            let (term, age) = {
                let metrics = raft.metrics();
                let m = metrics.borrow_watched();
                if m.state != ServerState::Leader || !needs_others(&m) {
                    continue;
                }
                (m.current_term, quorum_ack_age(&m))
            };
            if quiescence.is_quiescent(group) {
                continue;
            }
            let since = match leading.get(&group) {
                Some((t, since)) if *t == term => *since,
                _ => now,
            };
            still_leading.insert(group, (term, since));
            // A woken leader's last acknowledgement is as old as its quiet spell: its lease
            // counts from when it woke.
            let woken = quiescence.woken_at(group);
            let age = match woken {
                Some(at) => age.map(|a| a.min(now - at)),
                None => age,
            };
            let since = woken.map_or(since, |at| since.max(at));
            if cut_off(age, now - since, lease) {
                due.push((group, raft, term));
            }
        }
        leading = still_leading;
        for (group, raft, term) in due {
            step_down(group, &raft, term).await;
        }
    }
}

/// Makes the leader of `term` a follower by granting its vote in `term + 1` to [`NOBODY`].
/// openraft refuses it if the leader has meanwhile been acknowledged by a quorum again, or has
/// moved on to a later term: then nothing changes.
async fn step_down(group: GroupId, raft: &Raft, term: u64) {
    let Ok(last_log_id) = raft.with_raft_state(|st| st.log_ids.last().cloned()).await else { return };
    let vote = Vote {
        leader_id: openraft::impls::leader_id_std::LeaderId { term: term + 1, voted_for: NOBODY },
        committed: false,
    };
    match raft.vote(VoteRequest { vote, last_log_id, leadership_transfer: false }).await {
        Ok(response) if response.vote_granted => {
            info!(group, term, "stepped down: no quorum acknowledged this leader for a whole lease");
        }
        Ok(response) => {
            debug!(group, term, vote = %response.vote, "no step-down: the leader moved on or was acknowledged")
        }
        Err(e) => debug!(group, term, error = %e, "no step-down: the raft core stopped"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::types::{Membership, StoredMembership};

    const LEASE: Duration = Duration::from_millis(3_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Node `me`'s metrics of a group of `voters` led by `leader`, last acknowledged `acked_ago`.
    fn metrics(me: NodeId, leader: Option<NodeId>, voters: &[NodeId], acked_ago: Option<Duration>) -> Metrics {
        use openraft::Instant as _;
        let mut m = Metrics::new_initial(me);
        m.current_leader = leader;
        let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
        m.membership_config = Arc::new(StoredMembership::new(None, Membership::new_with_defaults(vec![voters], [])));
        let now = openraft::type_config::alias::InstantOf::<crate::types::KeelRaft>::now();
        m.last_quorum_acked = acked_ago.map(|ago| openraft::metrics::SerdeInstant::new(now - ago));
        m
    }

    #[test]
    fn a_leader_names_itself_only_within_its_lease() {
        let three = [1, 2, 3];
        let cases = [
            // (leader, voters, acknowledged ago, named)
            (Some(1), &three[..], Some(ms(100)), Some(1)),
            (Some(1), &three[..], Some(ms(2_900)), Some(1)),
            (Some(1), &three[..], Some(ms(3_000)), None),
            (Some(1), &three[..], Some(ms(9_000)), None),
            // Elected, but no quorum has acknowledged it yet: openraft refuses its writes too.
            (Some(1), &three[..], None, None),
            // A quorum by itself: nobody else can acknowledge it, and nobody needs to.
            (Some(1), &[1][..], None, Some(1)),
            // Another node's leadership is reported as this node knows it.
            (Some(2), &three[..], None, Some(2)),
            (None, &three[..], None, None),
        ];
        for (leader, voters, acked_ago, want) in cases {
            let m = metrics(1, leader, voters, acked_ago);
            assert_eq!(presented_leader(1, &m, LEASE), want, "leader {leader:?} of {voters:?} acked {acked_ago:?} ago");
        }
    }

    #[test]
    fn a_leader_steps_down_after_a_lease_without_a_quorum() {
        let cases = [
            // (quorum ack age, leading for, cut off)
            (Some(ms(100)), ms(60_000), false),
            (Some(ms(2_999)), ms(60_000), false),
            (Some(ms(3_000)), ms(60_000), true),
            (Some(ms(9_000)), ms(60_000), true),
            // Never acknowledged: counted from when it was first seen leading.
            (None, ms(10), false),
            (None, ms(2_999), false),
            (None, ms(3_000), true),
            // An acknowledgement counts even if it was seen leading only just now.
            (Some(ms(5_000)), ms(0), true),
        ];
        for (age, leading_for, want) in cases {
            assert_eq!(cut_off(age, leading_for, LEASE), want, "ack age {age:?}, leading for {leading_for:?}");
        }
    }
}
