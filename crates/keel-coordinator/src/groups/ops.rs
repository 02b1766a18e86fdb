//! The group operations. Each reads the state, works on a copy of the one group it concerns and
//! returns the records that turn the old group into the new one, with the answer to give once
//! they are committed: the state itself changes only when the runtime replays those records.

use std::collections::{BTreeMap, BTreeSet};

use super::assignor::{self, ASSIGNOR_DEFAULT, ASSIGNORS, AssignInput};
use super::records::{Committed, GroupMeta, GroupRecord, Member, RedeliveryState, Target, Tp};
use super::{Group, GroupError, GroupLimits, Groups, validate_group_name};

/// Partition counts of every topic the cluster has (the coordinator's metadata now).
pub type TopicsView = BTreeMap<String, u32>;

/// Records to append and the answer to give once they are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    /// Appended as one batch; replayed in order.
    pub records: Vec<GroupRecord>,
    /// The answer.
    pub response: T,
}

/// A heartbeat as the member sent it.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatInput {
    /// Group.
    pub group: String,
    /// Member id (chosen by the client).
    pub member_id: String,
    /// 0 join, current epoch, -1 leave, -2 static leave.
    pub member_epoch: i32,
    /// Static membership id.
    pub instance_id: Option<String>,
    /// Subscribed topics.
    pub subscribed: Vec<String>,
    /// Partitions it owns now.
    pub owned: Vec<Tp>,
    /// Requested session timeout (0 = default).
    pub session_timeout_ms: u32,
    /// Requested rebalance timeout (0 = default).
    pub rebalance_timeout_ms: u32,
    /// Requested assignor ("" = the group's, or the default for a new group).
    pub assignor: String,
    /// The client's name.
    pub client_id: String,
    /// Its address.
    pub host: String,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatOutput {
    /// Member id.
    pub member_id: String,
    /// Its epoch now (-1 after leaving, -2 after a static leave).
    pub member_epoch: i32,
    /// What it may consume now.
    pub assignment: BTreeSet<Tp>,
    /// What it still owns but must give up.
    pub revoking: BTreeSet<Tp>,
    /// How often to heartbeat.
    pub heartbeat_interval_ms: u32,
    /// Granted session timeout.
    pub session_timeout_ms: u32,
    /// Granted rebalance timeout.
    pub rebalance_timeout_ms: u32,
}

/// A commit request.
#[derive(Debug, Clone, Default)]
pub struct CommitInput {
    /// Group.
    pub group: String,
    /// Committing member ("" with epoch -1 for a group without members).
    pub member_id: String,
    /// Its epoch when it consumed what it commits.
    pub member_epoch: i32,
    /// (partition, next offset, metadata).
    pub offsets: Vec<(Tp, u64, String)>,
    /// Negative control only: skip the member, epoch and ownership checks (a coordinator
    /// without fencing, which the simulation must catch).
    pub unfenced: bool,
}

fn check_id(what: &str, id: &str, limits: &GroupLimits) -> Result<(), GroupError> {
    if id.is_empty() || id.len() > limits.member_id_bytes_max {
        return Err(GroupError::Invalid(format!("{what} must be 1 to {} bytes", limits.member_id_bytes_max)));
    }
    if id.chars().any(char::is_control) {
        return Err(GroupError::Invalid(format!("{what} must not contain control characters")));
    }
    Ok(())
}

fn check_topic(name: &str) -> Result<(), GroupError> {
    if name.is_empty() || name.len() > 249 || name.chars().any(char::is_control) {
        return Err(GroupError::Invalid(format!("{name:?} is not a topic name")));
    }
    Ok(())
}

/// Records that turn `before` into `after` (a removed group's keys get tombstones).
pub fn diff(name: &str, before: Option<&Group>, after: &Group) -> Vec<GroupRecord> {
    let empty = Group::default();
    let before = before.unwrap_or(&empty);
    let mut out = Vec::new();
    if before.meta != after.meta {
        out.push(GroupRecord::Meta(name.to_owned(), after.meta.clone()));
    }
    if before.target != after.target {
        let t = (after.meta.is_some() || after.target != Target::default()).then(|| after.target.clone());
        out.push(GroupRecord::Target(name.to_owned(), t));
    }
    for (id, m) in &after.members {
        if before.members.get(id) != Some(m) {
            out.push(GroupRecord::Member(name.to_owned(), id.clone(), Some(m.clone())));
        }
    }
    for id in before.members.keys().filter(|id| !after.members.contains_key(*id)) {
        out.push(GroupRecord::Member(name.to_owned(), id.clone(), None));
    }
    for (tp, c) in &after.offsets {
        if before.offsets.get(tp) != Some(c) {
            out.push(GroupRecord::Offset(name.to_owned(), tp.clone(), Some(c.clone())));
        }
    }
    for tp in before.offsets.keys().filter(|tp| !after.offsets.contains_key(*tp)) {
        out.push(GroupRecord::Offset(name.to_owned(), tp.clone(), None));
    }
    for ((tp, offset), r) in &after.redeliveries {
        if before.redeliveries.get(&(tp.clone(), *offset)) != Some(r) {
            out.push(GroupRecord::Redelivery(name.to_owned(), tp.clone(), *offset, Some(r.clone())));
        }
    }
    for (tp, offset) in before.redeliveries.keys().filter(|k| !after.redeliveries.contains_key(*k)) {
        out.push(GroupRecord::Redelivery(name.to_owned(), tp.clone(), *offset, None));
    }
    for (tp, p) in &after.publishers {
        if before.publishers.get(tp) != Some(p) {
            out.push(GroupRecord::Publisher(name.to_owned(), tp.clone(), Some(p.clone())));
        }
    }
    for tp in before.publishers.keys().filter(|tp| !after.publishers.contains_key(*tp)) {
        out.push(GroupRecord::Publisher(name.to_owned(), tp.clone(), None));
    }
    for ((tp, stamp), p) in &after.publishes {
        if before.publishes.get(&(tp.clone(), *stamp)) != Some(p) {
            out.push(GroupRecord::Publish(name.to_owned(), tp.clone(), *stamp, Some(p.clone())));
        }
    }
    for (tp, stamp) in before.publishes.keys().filter(|k| !after.publishes.contains_key(*k)) {
        out.push(GroupRecord::Publish(name.to_owned(), tp.clone(), *stamp, None));
    }
    if before.replayed != after.replayed {
        let ranges = (!after.replayed.is_empty()).then(|| after.replayed.clone());
        out.push(GroupRecord::Replayed(name.to_owned(), ranges));
    }
    out
}

/// Partition counts of the topics some member subscribes to (those that exist).
fn subscribed_topics(g: &Group, topics: &TopicsView) -> BTreeMap<String, u32> {
    g.members.values().flat_map(|m| &m.subscribed).filter_map(|t| Some((t.clone(), *topics.get(t)?))).collect()
}

/// Bumps the group epoch and computes a new target when membership, subscriptions or the
/// subscribed topics changed (or `force`).
fn rebalance(g: &mut Group, topics: &TopicsView, force: bool, now_ms: i64) {
    let counts = subscribed_topics(g, topics);
    let meta = g.meta.get_or_insert_with(|| GroupMeta {
        epoch: 0,
        assignor: ASSIGNOR_DEFAULT.to_owned(),
        topics: BTreeMap::new(),
        empty_since_ms: None,
    });
    let changed = force || meta.topics != counts || g.target.epoch != meta.epoch;
    meta.empty_since_ms = if g.members.is_empty() { meta.empty_since_ms.or(Some(now_ms)) } else { None };
    if !changed {
        return;
    }
    meta.epoch = meta.epoch.saturating_add(1);
    meta.topics = counts.clone();
    let subscriptions: BTreeMap<String, BTreeSet<String>> =
        g.members.iter().map(|(id, m)| (id.clone(), m.subscribed.clone())).collect();
    let members = assignor::assign(
        &meta.assignor,
        AssignInput { subscriptions: &subscriptions, topics: &counts, previous: &g.target.members },
    );
    g.target = Target { epoch: meta.epoch, members };
}

/// Moves one member towards the target: it first gives up what it must lose, then takes the
/// target epoch and the partitions no other member still owns.
fn reconcile(g: &mut Group, id: &str) {
    let target_epoch = g.target.epoch;
    let wanted = g.target.members.get(id).cloned().unwrap_or_default();
    let owned_by_others: BTreeSet<Tp> = g
        .members
        .iter()
        .filter(|(other, _)| other.as_str() != id)
        .flat_map(|(_, m)| m.assigned.keys().chain(m.revoking.keys()).cloned())
        .collect();
    let Some(m) = g.members.get_mut(id) else { return };
    if m.epoch < target_epoch {
        let lose: Vec<Tp> = m.assigned.keys().filter(|tp| !wanted.contains(*tp)).cloned().collect();
        for tp in lose {
            if let Some(epoch) = m.assigned.remove(&tp) {
                m.revoking.insert(tp, epoch);
            }
        }
        if m.revoking.is_empty() {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
        }
    }
    if m.epoch == target_epoch {
        for tp in &wanted {
            if !m.assigned.contains_key(tp) && !owned_by_others.contains(tp) {
                m.assigned.insert(tp.clone(), m.epoch);
            }
        }
    }
}

fn output(m: &Member, limits: &GroupLimits, epoch: i32) -> HeartbeatOutput {
    HeartbeatOutput {
        member_id: m.member_id.clone(),
        member_epoch: epoch,
        assignment: m.assigned.keys().cloned().collect(),
        revoking: m.revoking.keys().cloned().collect(),
        heartbeat_interval_ms: limits.heartbeat_interval_ms.min(m.session_timeout_ms / 3).max(1),
        session_timeout_ms: m.session_timeout_ms,
        rebalance_timeout_ms: m.rebalance_timeout_ms,
    }
}

impl Groups {
    /// A heartbeat: join, stay, reconcile or leave.
    pub fn heartbeat(
        &self,
        input: &HeartbeatInput,
        topics: &TopicsView,
        limits: &GroupLimits,
        now_ms: i64,
    ) -> Result<Outcome<HeartbeatOutput>, GroupError> {
        validate_group_name(&input.group)?;
        check_id("member_id", &input.member_id, limits)?;
        if let Some(instance) = &input.instance_id {
            check_id("instance_id", instance, limits)?;
        }
        if input.subscribed.len() > limits.subscribed_topics_max {
            return Err(GroupError::Invalid(format!(
                "a member subscribes to at most {} topics",
                limits.subscribed_topics_max
            )));
        }
        for t in &input.subscribed {
            check_topic(t)?;
        }
        if input.owned.len() > limits.offsets_per_commit_max {
            return Err(GroupError::Invalid("too many owned partitions".into()));
        }
        if !input.assignor.is_empty() && !ASSIGNORS.contains(&input.assignor.as_str()) {
            return Err(GroupError::Invalid(format!(
                "unknown assignor {:?}; use one of {ASSIGNORS:?}",
                input.assignor
            )));
        }
        let name = input.group.as_str();
        let id = input.member_id.as_str();
        let before = self.groups.get(name);
        let mut g = before.cloned().unwrap_or_default();
        let mut force = false;
        match input.member_epoch {
            -1 => {
                if g.members.remove(id).is_some() {
                    g.target.members.remove(id);
                    rebalance(&mut g, topics, true, now_ms);
                }
                let records = diff(name, before, &g);
                let response = HeartbeatOutput {
                    member_id: id.to_owned(),
                    member_epoch: -1,
                    assignment: BTreeSet::new(),
                    revoking: BTreeSet::new(),
                    heartbeat_interval_ms: limits.heartbeat_interval_ms,
                    session_timeout_ms: 0,
                    rebalance_timeout_ms: 0,
                };
                return Ok(Outcome { records, response });
            }
            -2 => {
                if input.instance_id.is_none() {
                    return Err(GroupError::Invalid("only a static member (instance_id) may leave with -2".into()));
                }
                let m = g.members.get_mut(id).ok_or_else(|| unknown(name, id))?;
                m.away = true;
                let response = output(m, limits, -2);
                return Ok(Outcome { records: diff(name, before, &g), response });
            }
            0 if g.members.contains_key(id) => {
                // A retried join: the member exists; answer with its state as a heartbeat would.
            }
            0 => {
                let static_owner = input
                    .instance_id
                    .as_ref()
                    .and_then(|i| g.members.values().find(|m| m.instance_id.as_ref() == Some(i)))
                    .map(|m| m.member_id.clone());
                if let Some(old) = static_owner {
                    // A static member came back under a new member id: it takes over the old
                    // one's epoch and partitions with no reassignment; the old id is fenced.
                    if let Some(mut m) = g.members.remove(&old) {
                        m.member_id = id.to_owned();
                        m.away = false;
                        g.members.insert(id.to_owned(), m);
                    }
                    if let Some(t) = g.target.members.remove(&old) {
                        g.target.members.insert(id.to_owned(), t);
                    }
                } else {
                    if before.is_none() && self.groups.len() >= limits.groups_max {
                        return Err(GroupError::GroupsMax(limits.groups_max));
                    }
                    if g.members.len() >= limits.members_per_group_max {
                        return Err(GroupError::GroupMaxSize {
                            group: name.to_owned(),
                            max: limits.members_per_group_max,
                        });
                    }
                    match &mut g.meta {
                        Some(meta) if !input.assignor.is_empty() && meta.assignor != input.assignor => {
                            if !g.members.is_empty() {
                                return Err(GroupError::InconsistentAssignor {
                                    group: name.to_owned(),
                                    group_assignor: meta.assignor.clone(),
                                    asked: input.assignor.clone(),
                                });
                            }
                            // An empty group takes the assignor of its new first member.
                            meta.assignor = input.assignor.clone();
                        }
                        Some(_) => {}
                        None => {
                            let assignor = if input.assignor.is_empty() { ASSIGNOR_DEFAULT } else { &input.assignor };
                            g.meta = Some(GroupMeta {
                                epoch: 0,
                                assignor: assignor.to_owned(),
                                topics: BTreeMap::new(),
                                empty_since_ms: None,
                            });
                        }
                    }
                    g.members.insert(
                        id.to_owned(),
                        Member {
                            member_id: id.to_owned(),
                            instance_id: input.instance_id.clone(),
                            client_id: String::new(),
                            host: String::new(),
                            subscribed: BTreeSet::new(),
                            session_timeout_ms: 0,
                            rebalance_timeout_ms: 0,
                            epoch: 0,
                            previous_epoch: 0,
                            assigned: BTreeMap::new(),
                            revoking: BTreeMap::new(),
                            away: false,
                        },
                    );
                    force = true;
                }
            }
            epoch if epoch > 0 => {
                let m = g.members.get(id).ok_or_else(|| unknown(name, id))?;
                let lost_answer = epoch == m.previous_epoch && input.owned.iter().all(|tp| m.owns(tp).is_some());
                if epoch != m.epoch && !lost_answer {
                    return Err(GroupError::FencedEpoch { member: id.to_owned(), sent: epoch, current: m.epoch });
                }
            }
            other => return Err(GroupError::Invalid(format!("member_epoch {other} is not valid"))),
        }
        let Some(m) = g.members.get_mut(id) else { return Err(unknown(name, id)) };
        let subscribed: BTreeSet<String> = input.subscribed.iter().cloned().collect();
        if m.subscribed != subscribed {
            m.subscribed = subscribed;
            force = true;
        }
        m.client_id = input.client_id.chars().take(limits.member_id_bytes_max * 4).collect();
        m.host = input.host.chars().take(limits.member_id_bytes_max * 4).collect();
        m.session_timeout_ms = match input.session_timeout_ms {
            0 => limits.session_timeout_ms_default,
            n => n.clamp(limits.session_timeout_ms_min, limits.session_timeout_ms_max),
        };
        m.rebalance_timeout_ms = match input.rebalance_timeout_ms {
            0 => limits.rebalance_timeout_ms_default,
            n => n.clamp(limits.session_timeout_ms_min, limits.rebalance_timeout_ms_max),
        };
        m.away = false;
        let owned: BTreeSet<&Tp> = input.owned.iter().collect();
        m.revoking.retain(|tp, _| owned.contains(tp));
        rebalance(&mut g, topics, force, now_ms);
        reconcile(&mut g, id);
        let m = g.members.get(id).ok_or_else(|| unknown(name, id))?;
        let response = output(m, limits, m.epoch);
        Ok(Outcome { records: diff(name, before, &g), response })
    }

    /// Removes a member that stopped heartbeating or did not revoke in time; its partitions go
    /// to the others. `None` when it is not in the group any more.
    pub fn remove_member(
        &self,
        group: &str,
        member_id: &str,
        topics: &TopicsView,
        now_ms: i64,
    ) -> Option<Vec<GroupRecord>> {
        let before = self.groups.get(group)?;
        let mut g = before.clone();
        g.members.remove(member_id)?;
        g.target.members.remove(member_id);
        rebalance(&mut g, topics, true, now_ms);
        Some(diff(group, Some(before), &g))
    }

    /// Commits offsets. All or nothing: any refused partition refuses the request.
    pub fn commit(
        &self,
        input: &CommitInput,
        topics: &TopicsView,
        high_watermarks: &BTreeMap<Tp, u64>,
        limits: &GroupLimits,
        now_ms: i64,
    ) -> Result<Outcome<Vec<(Tp, Committed)>>, GroupError> {
        let name = input.group.as_str();
        validate_group_name(name)?;
        self.check_offsets(&input.offsets, topics, limits)?;
        let before = self.groups.get(name);
        if before.is_none() && self.groups.len() >= limits.groups_max {
            return Err(GroupError::GroupsMax(limits.groups_max));
        }
        let mut g = before.cloned().unwrap_or_default();
        if input.unfenced {
            // Negative control: no fencing at all.
        } else if input.member_id.is_empty() && input.member_epoch == -1 {
            if !g.members.is_empty() {
                return Err(GroupError::UnknownMember { group: name.to_owned(), member: String::new() });
            }
        } else {
            fence(&g, name, &input.member_id, input.member_epoch, input.offsets.iter().map(|(tp, _, _)| tp))?;
        }
        for (tp, offset, _) in &input.offsets {
            let high_watermark = *high_watermarks
                .get(tp)
                .ok_or_else(|| GroupError::UnknownTopic(format!("{tp} has no known high watermark")))?;
            if *offset > high_watermark {
                return Err(GroupError::OffsetAboveHighWatermark { tp: tp.clone(), offset: *offset, high_watermark });
            }
        }
        let mut response = Vec::new();
        for (tp, offset, metadata) in &input.offsets {
            let keep = g.offsets.get(tp).is_some_and(|c| c.offset > *offset);
            if !keep {
                g.offsets.insert(
                    tp.clone(),
                    Committed {
                        offset: *offset,
                        metadata: metadata.clone(),
                        commit_timestamp_ms: now_ms,
                        member_id: input.member_id.clone(),
                        member_epoch: input.member_epoch,
                        high_watermark: high_watermarks.get(tp).copied(),
                    },
                );
            }
            if let Some(c) = g.offsets.get(tp) {
                response.push((tp.clone(), c.clone()));
                // Settled failures the commit passed are done with: a nack of them would be
                // refused as committed anyway.
                let passed: Vec<(Tp, u64)> = g
                    .redeliveries
                    .range((tp.clone(), 0)..(tp.clone(), c.offset))
                    .filter(|(_, r)| r.state != RedeliveryState::Pending)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in passed {
                    g.redeliveries.remove(&k);
                }
            }
        }
        if g.members.is_empty()
            && let Some(meta) = &mut g.meta
        {
            // Retention counts from the last activity of an empty group.
            meta.empty_since_ms = Some(now_ms);
        }
        Ok(Outcome { records: diff(name, before, &g), response })
    }

    fn check_offsets(
        &self,
        offsets: &[(Tp, u64, String)],
        topics: &TopicsView,
        limits: &GroupLimits,
    ) -> Result<(), GroupError> {
        if offsets.is_empty() {
            return Err(GroupError::Invalid("no offsets to commit".into()));
        }
        if offsets.len() > limits.offsets_per_commit_max {
            return Err(GroupError::Invalid(format!(
                "at most {} partitions per request",
                limits.offsets_per_commit_max
            )));
        }
        let mut seen = BTreeSet::new();
        for (tp, _, metadata) in offsets {
            if metadata.len() > limits.metadata_bytes_max {
                return Err(GroupError::MetadataTooLarge { size: metadata.len(), max: limits.metadata_bytes_max });
            }
            if !seen.insert(tp) {
                return Err(GroupError::Invalid(format!("{tp} appears twice")));
            }
            match topics.get(&tp.topic) {
                Some(&count) if tp.partition < count => {}
                Some(&count) => {
                    return Err(GroupError::UnknownTopic(format!(
                        "topic {:?} has {count} partitions; {} is not one",
                        tp.topic, tp.partition
                    )));
                }
                None => return Err(GroupError::UnknownTopic(format!("topic {:?} does not exist", tp.topic))),
            }
        }
        Ok(())
    }

    /// Sets offsets of a group with no members, each within `[log start, high watermark]`
    /// (`bounds`); they may move backwards.
    pub fn reset_offsets(
        &self,
        group: &str,
        offsets: &[(Tp, u64, String)],
        topics: &TopicsView,
        bounds: &BTreeMap<Tp, (u64, u64)>,
        limits: &GroupLimits,
        now_ms: i64,
    ) -> Result<Outcome<Vec<(Tp, Committed)>>, GroupError> {
        validate_group_name(group)?;
        self.check_offsets(offsets, topics, limits)?;
        let before = self.groups.get(group);
        if before.is_none() && self.groups.len() >= limits.groups_max {
            return Err(GroupError::GroupsMax(limits.groups_max));
        }
        let mut g = before.cloned().unwrap_or_default();
        if !g.members.is_empty() {
            return Err(GroupError::GroupNotEmpty { group: group.to_owned(), members: g.members.len() });
        }
        let mut response = Vec::new();
        for (tp, offset, metadata) in offsets {
            let &(log_start, high_watermark) =
                bounds.get(tp).ok_or_else(|| GroupError::UnknownTopic(format!("{tp} has no known bounds")))?;
            if *offset > high_watermark {
                return Err(GroupError::OffsetAboveHighWatermark { tp: tp.clone(), offset: *offset, high_watermark });
            }
            if *offset < log_start {
                return Err(GroupError::OffsetBelowLogStart { tp: tp.clone(), offset: *offset, log_start });
            }
            let c = Committed {
                offset: *offset,
                metadata: metadata.clone(),
                commit_timestamp_ms: now_ms,
                member_id: String::new(),
                member_epoch: -1,
                high_watermark: Some(high_watermark),
            };
            g.offsets.insert(tp.clone(), c.clone());
            response.push((tp.clone(), c));
        }
        if let Some(meta) = &mut g.meta {
            meta.empty_since_ms = Some(now_ms);
        }
        Ok(Outcome { records: diff(group, before, &g), response })
    }

    /// Deletes a group with no members, and its offsets.
    pub fn delete_group(&self, group: &str) -> Result<Vec<GroupRecord>, GroupError> {
        validate_group_name(group)?;
        let before = self.groups.get(group).ok_or_else(|| GroupError::UnknownGroup(group.to_owned()))?;
        if !before.members.is_empty() {
            return Err(GroupError::GroupNotEmpty { group: group.to_owned(), members: before.members.len() });
        }
        if !before.publishes.is_empty() {
            return Err(GroupError::PublishesPending { group: group.to_owned(), pending: before.publishes.len() });
        }
        Ok(diff(group, Some(before), &Group::default()))
    }

    /// Groups that have had no members for `retention_ms`: their offsets expire (at most
    /// `groups_max` groups per call, so one append stays bounded).
    pub fn expired(&self, now_ms: i64, retention_ms: i64, groups_max: usize) -> Vec<(String, Vec<GroupRecord>)> {
        let mut out = Vec::new();
        for (name, g) in &self.groups {
            if out.len() >= groups_max {
                break;
            }
            if !g.members.is_empty() || !g.publishes.is_empty() {
                continue;
            }
            let last_active = match &g.meta {
                Some(meta) => meta.empty_since_ms,
                None => g.offsets.values().map(|c| c.commit_timestamp_ms).max(),
            };
            if last_active.is_some_and(|t| t.saturating_add(retention_ms) <= now_ms) {
                out.push((name.clone(), diff(name, Some(g), &Group::default())));
            }
        }
        out
    }
}

/// Checks that `member_id` is in the group at an epoch no later than its own and owns every
/// partition of `tps` since that epoch or earlier: the fencing of commits, nacks and acks.
pub(crate) fn fence<'a>(
    g: &Group,
    name: &str,
    member_id: &str,
    member_epoch: i32,
    tps: impl IntoIterator<Item = &'a Tp>,
) -> Result<(), GroupError> {
    let m = g.members.get(member_id).ok_or_else(|| unknown(name, member_id))?;
    if member_epoch > m.epoch || member_epoch < 0 {
        return Err(GroupError::FencedEpoch { member: m.member_id.clone(), sent: member_epoch, current: m.epoch });
    }
    for tp in tps {
        match m.owns(tp) {
            Some(assigned_at) if assigned_at <= member_epoch => {}
            _ => {
                return Err(GroupError::StaleEpoch {
                    member: m.member_id.clone(),
                    epoch: member_epoch,
                    tp: tp.clone(),
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn unknown(group: &str, member: &str) -> GroupError {
    GroupError::UnknownMember { group: group.to_owned(), member: member.to_owned() }
}
