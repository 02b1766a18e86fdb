//! Retry and dead letter as group operations (DESIGN.md, "Retry and dead letter"). A consumer's
//! nack is fenced like a commit and recorded as a [`Redelivery`]; the attempt it names must be
//! the next one, so a retried nack is recognised and recorded once: recorded attempts are
//! exact, whatever the network does. A nack of an attempt already recorded (a retry, or the
//! record read again from a commit below it) is answered with the record's current state. On the last attempt, or at once for a non-retryable
//! error, the operation also decides to publish the record to the group's dead-letter topic: a
//! [`Publish`] stamped with the group's producer identity for that partition, committed before
//! anything is sent, so the runtime's sends (again after a failover, with the same stamp) land
//! once.

use super::ops::{Outcome, TopicsView, diff, fence};
use super::records::{PublishHeader, Redelivery, RedeliveryState, Tp};
use super::{Group, GroupError, Groups, validate_group_name};
use crate::publish;

/// The suffix of a group's dead-letter topic.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// Headers a dead letter carries, naming where it came from and why it failed.
pub mod headers {
    /// The topic the record was consumed from.
    pub const ORIGIN_TOPIC: &str = "keel-origin-topic";
    /// Its partition.
    pub const ORIGIN_PARTITION: &str = "keel-origin-partition";
    /// Its offset.
    pub const ORIGIN_OFFSET: &str = "keel-origin-offset";
    /// The group that gave up on it.
    pub const GROUP: &str = "keel-group";
    /// Attempts made.
    pub const ATTEMPTS: &str = "keel-attempts";
    /// The last failure's reason.
    pub const LAST_ERROR: &str = "keel-last-error";
    /// When the first attempt failed (ms since the epoch).
    pub const FIRST_FAILURE_MS: &str = "keel-first-failure-ms";
    /// The original record's timestamp (the dead letter's own is when it was decided: the
    /// target partition ages its producers by batch timestamps).
    pub const ORIGIN_TIMESTAMP_MS: &str = "keel-origin-timestamp-ms";
    /// On a replayed record: the dead letter's offset in `<group>.dlq`.
    pub const REPLAYED_FROM: &str = "keel-replayed-from";
    /// Every header the coordinator sets (a record dead-lettered again loses its old ones).
    pub const ALL: &[&str] = &[
        ORIGIN_TOPIC,
        ORIGIN_PARTITION,
        ORIGIN_OFFSET,
        GROUP,
        ATTEMPTS,
        LAST_ERROR,
        FIRST_FAILURE_MS,
        ORIGIN_TIMESTAMP_MS,
        REPLAYED_FROM,
    ];
}

/// The dead-letter topic of `group`, or why it cannot have one (the name would be too long).
pub fn dead_letter_topic(group: &str) -> Result<String, GroupError> {
    let name = format!("{group}{DEAD_LETTER_SUFFIX}");
    if name.len() > 249 {
        return Err(GroupError::Invalid(format!(
            "group name {group:?} is too long for a dead-letter topic ({name:?} exceeds 249 characters)"
        )));
    }
    Ok(name)
}

/// Bounds of the retry state a group may hold, checked before anything is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    /// Pending redeliveries per group: beyond it a nack is RETRY_BACKLOG_FULL (backpressure).
    pub redeliveries_max: usize,
    /// Publish decisions not yet confirmed per group.
    pub publishes_max: usize,
    /// The most attempts a policy may ask for.
    pub max_attempts_max: u32,
    /// The longest backoff a policy may ask for.
    pub backoff_ms_max: u32,
    /// Bytes of a failure's reason kept (longer ones are cut at a character boundary).
    pub error_bytes_max: usize,
    /// Bytes of a record a nack may carry (key, value and headers).
    pub record_bytes_max: usize,
    /// Redeliveries handed out per heartbeat answer.
    pub due_per_heartbeat_max: usize,
    /// A publisher idle this long starts a new epoch: its target may have forgotten it (the
    /// partition's producer expiry must be longer).
    pub publisher_idle_ms: i64,
    /// Dead letters one replay request may carry.
    pub replay_batch_max: usize,
    /// Disjoint ranges of replayed dead-letter offsets a group remembers.
    pub replayed_ranges_max: usize,
}

impl Default for RetryLimits {
    fn default() -> RetryLimits {
        RetryLimits {
            redeliveries_max: 10_000,
            publishes_max: 1_000,
            max_attempts_max: 100,
            backoff_ms_max: 24 * 3_600_000,
            error_bytes_max: 1_024,
            record_bytes_max: 512 * 1024,
            due_per_heartbeat_max: 100,
            publisher_idle_ms: 3_600_000,
            replay_batch_max: 100,
            replayed_ranges_max: 10_000,
        }
    }
}

/// How a record that failed is retried; fixed by its first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first delivery included (1 = dead-letter at the first failure).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each further one.
    pub backoff_min_ms: u32,
    /// The longest backoff.
    pub backoff_max_ms: u32,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, backoff_min_ms: 1_000, backoff_max_ms: 60_000 }
    }
}

impl RetryPolicy {
    /// The backoff after `attempts` failures: `min * 2^(attempts-1)` capped at `max`, then
    /// jittered into its upper half by `jitter` (any u64; the runtime draws it), so that
    /// members failing together do not retry together, yet no retry comes before half of it.
    pub fn backoff_ms(&self, attempts: u32, jitter: u64) -> u64 {
        let shift = attempts.saturating_sub(1).min(32);
        let full = u64::from(self.backoff_min_ms).saturating_mul(1u64 << shift).min(u64::from(self.backoff_max_ms));
        let half = full / 2;
        half + jitter % (full - half + 1)
    }

    fn check(&self, limits: &RetryLimits) -> Result<(), GroupError> {
        if self.max_attempts == 0 || self.max_attempts > limits.max_attempts_max {
            return Err(GroupError::Invalid(format!("max_attempts must be 1 to {}", limits.max_attempts_max)));
        }
        if self.backoff_min_ms > self.backoff_max_ms || self.backoff_max_ms > limits.backoff_ms_max {
            return Err(GroupError::Invalid(format!(
                "backoff must satisfy min <= max <= {} ms",
                limits.backoff_ms_max
            )));
        }
        Ok(())
    }
}

/// The record a nack carries, published as is (plus origin headers) if it is dead-lettered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<PublishHeader>,
    /// The original timestamp.
    pub timestamp_ms: i64,
}

impl DeadLetterRecord {
    fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len)).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers
    }
}

/// A member's report that processing a record failed.
#[derive(Debug, Clone, Default)]
pub struct NackInput {
    /// Group.
    pub group: String,
    /// The member that processed it.
    pub member_id: String,
    /// Its epoch.
    pub member_epoch: i32,
    /// The record's partition.
    pub tp: Tp,
    /// The record's offset.
    pub offset: u64,
    /// Which attempt failed (1 = the first delivery).
    pub attempt: u32,
    /// Why.
    pub error: String,
    /// Whether another attempt may succeed; `false` dead-letters it at once.
    pub retryable: bool,
    /// The policy, used if this is the record's first failure.
    pub policy: RetryPolicy,
    /// The record itself.
    pub record: DeadLetterRecord,
}

/// What the coordinator recorded for a nack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackOutput {
    /// Failed attempts recorded for the record.
    pub attempts: u32,
    /// When the next attempt is due; `None` once dead-lettered.
    pub due_at_ms: Option<i64>,
    /// Whether it is (now or already) dead-lettered.
    pub dead_lettered: bool,
    /// Whether the operation used the spare producer id it was given.
    pub used_spare_id: bool,
}

/// A member's report that a redelivered record was processed (acknowledged).
#[derive(Debug, Clone, Default)]
pub struct SettleInput {
    /// Group.
    pub group: String,
    /// The member.
    pub member_id: String,
    /// Its epoch.
    pub member_epoch: i32,
    /// The record's partition.
    pub tp: Tp,
    /// The record's offset.
    pub offset: u64,
    /// Which attempt succeeded.
    pub attempt: u32,
}

/// A redelivery due now: the owner fetches the record and runs its handler again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The record's partition.
    pub tp: Tp,
    /// The record's offset.
    pub offset: u64,
    /// The attempt this will be.
    pub attempt: u32,
}

fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn header(key: &str, value: impl ToString) -> PublishHeader {
    PublishHeader { key: key.to_owned(), value: Some(value.to_string().into_bytes()) }
}

impl Groups {
    /// Records a failed attempt; on the last one (or a non-retryable error) decides the dead
    /// letter. `jitter` spreads the backoff; `spare_producer_id` is used if the group has no
    /// publisher for its dead-letter partition yet (without one such a nack is refused with
    /// [`GroupError::ProducerIdNeeded`], and the runtime runs it again with one).
    pub fn nack(
        &self,
        input: &NackInput,
        topics: &TopicsView,
        limits: &RetryLimits,
        now_ms: i64,
        jitter: u64,
        spare_producer_id: Option<i64>,
    ) -> Result<Outcome<NackOutput>, GroupError> {
        let name = input.group.as_str();
        validate_group_name(name)?;
        let dlq = Tp::new(dead_letter_topic(name)?, 0);
        check_tp(&input.tp, topics)?;
        if input.attempt == 0 {
            return Err(GroupError::Invalid("attempt numbers start at 1".into()));
        }
        input.policy.check(limits)?;
        if input.record.size() > limits.record_bytes_max {
            return Err(GroupError::Invalid(format!(
                "a nacked record carries at most {} bytes of key, value and headers",
                limits.record_bytes_max
            )));
        }
        let before = self.groups.get(name).ok_or_else(|| GroupError::UnknownGroup(name.to_owned()))?;
        fence(before, name, &input.member_id, input.member_epoch, [&input.tp])?;
        let key = (input.tp.clone(), input.offset);
        let existing = before.redeliveries.get(&key);
        let recorded = existing.map_or(0, |r| r.attempts);
        if let Some(r) = existing {
            if input.attempt <= r.attempts {
                // A retry of a recorded nack, or the record read again from a commit below it
                // (its earlier attempts' outcome is known): the current state, no record.
                let dead_lettered = r.state == RedeliveryState::DeadLettered;
                let response = NackOutput {
                    attempts: r.attempts,
                    due_at_ms: (r.state == RedeliveryState::Pending).then_some(r.due_at_ms),
                    dead_lettered,
                    used_spare_id: false,
                };
                return Ok(Outcome { records: Vec::new(), response });
            }
            match r.state {
                RedeliveryState::Resolved => return Err(settled(&input.tp, input.offset, "resolved")),
                RedeliveryState::DeadLettered => return Err(settled(&input.tp, input.offset, "dead-lettered")),
                RedeliveryState::Pending => {}
            }
        } else if before.offsets.get(&input.tp).is_some_and(|c| c.offset > input.offset) {
            // Settled and passed by the commit (its entry is gone), or never failed before the
            // commit passed it: either way not this member's to fail now.
            return Err(settled(&input.tp, input.offset, "committed"));
        }
        if input.attempt != recorded + 1 {
            return Err(GroupError::StaleAttempt {
                tp: input.tp.clone(),
                offset: input.offset,
                sent: input.attempt,
                expected: recorded + 1,
            });
        }
        let mut g = before.clone();
        let pending = g.redeliveries.values().filter(|r| r.state == RedeliveryState::Pending).count();
        if existing.is_none() && pending >= limits.redeliveries_max {
            return Err(GroupError::RetryBacklogFull {
                group: name.to_owned(),
                what: "pending redeliveries",
                max: limits.redeliveries_max,
            });
        }
        let policy = existing.map_or(input.policy, |r| RetryPolicy {
            max_attempts: r.max_attempts,
            backoff_min_ms: r.backoff_min_ms,
            backoff_max_ms: r.backoff_max_ms,
        });
        let attempts = input.attempt;
        let mut r = Redelivery {
            attempts,
            max_attempts: policy.max_attempts,
            backoff_min_ms: policy.backoff_min_ms,
            backoff_max_ms: policy.backoff_max_ms,
            due_at_ms: 0,
            first_failure_ms: existing.map_or(now_ms, |r| r.first_failure_ms),
            last_error: cut(&input.error, limits.error_bytes_max),
            state: RedeliveryState::Pending,
        };
        let give_up = !input.retryable || attempts >= policy.max_attempts;
        let mut used_spare_id = false;
        if give_up {
            r.state = RedeliveryState::DeadLettered;
            let mut headers: Vec<PublishHeader> =
                input.record.headers.iter().filter(|h| !headers::ALL.contains(&h.key.as_str())).cloned().collect();
            headers.extend([
                header(headers::ORIGIN_TOPIC, &input.tp.topic),
                header(headers::ORIGIN_PARTITION, input.tp.partition),
                header(headers::ORIGIN_OFFSET, input.offset),
                header(headers::GROUP, name),
                header(headers::ATTEMPTS, attempts),
                header(headers::LAST_ERROR, &r.last_error),
                header(headers::FIRST_FAILURE_MS, r.first_failure_ms),
                header(headers::ORIGIN_TIMESTAMP_MS, input.record.timestamp_ms),
            ]);
            let record = DeadLetterRecord { headers, ..input.record.clone() };
            used_spare_id = decide_publish(&mut g, name, &dlq, record, limits, now_ms, spare_producer_id)?;
        } else {
            let backoff = policy.backoff_ms(attempts, jitter);
            r.due_at_ms = now_ms.saturating_add(i64::try_from(backoff).unwrap_or(i64::MAX));
        }
        let response = NackOutput {
            attempts,
            due_at_ms: (!give_up).then_some(r.due_at_ms),
            dead_lettered: give_up,
            used_spare_id,
        };
        g.redeliveries.insert(key, r);
        Ok(Outcome { records: diff(name, Some(before), &g), response })
    }

    /// Records that a redelivered record was processed: it will never be dead-lettered.
    pub fn settle(&self, input: &SettleInput) -> Result<Outcome<()>, GroupError> {
        let name = input.group.as_str();
        validate_group_name(name)?;
        let before = self.groups.get(name).ok_or_else(|| GroupError::UnknownGroup(name.to_owned()))?;
        fence(before, name, &input.member_id, input.member_epoch, [&input.tp])?;
        let key = (input.tp.clone(), input.offset);
        let Some(r) = before.redeliveries.get(&key) else {
            // Settled and passed by the commit, or never failed: nothing to resolve.
            return Ok(Outcome { records: Vec::new(), response: () });
        };
        match r.state {
            RedeliveryState::Resolved => return Ok(Outcome { records: Vec::new(), response: () }),
            RedeliveryState::DeadLettered => return Err(settled(&input.tp, input.offset, "dead-lettered")),
            RedeliveryState::Pending if input.attempt != r.attempts + 1 => {
                return Err(GroupError::StaleAttempt {
                    tp: input.tp.clone(),
                    offset: input.offset,
                    sent: input.attempt,
                    expected: r.attempts + 1,
                });
            }
            RedeliveryState::Pending => {}
        }
        let mut g = before.clone();
        if before.offsets.get(&input.tp).is_some_and(|c| c.offset > input.offset) {
            g.redeliveries.remove(&key);
        } else if let Some(r) = g.redeliveries.get_mut(&key) {
            r.state = RedeliveryState::Resolved;
        }
        Ok(Outcome { records: diff(name, Some(before), &g), response: () })
    }

    /// Redeliveries due by `now_ms` on partitions `member_id` is assigned (not revoking), at
    /// most `max`, earliest first.
    pub fn due_redeliveries(&self, group: &str, member_id: &str, now_ms: i64, max: usize) -> Vec<Due> {
        let Some(g) = self.groups.get(group) else { return Vec::new() };
        let Some(m) = g.members.get(member_id) else { return Vec::new() };
        let mut due: Vec<(i64, Due)> = g
            .redeliveries
            .iter()
            .filter(|((tp, _), r)| {
                r.state == RedeliveryState::Pending && r.due_at_ms <= now_ms && m.assigned.contains_key(tp)
            })
            .map(|((tp, offset), r)| (r.due_at_ms, Due { tp: tp.clone(), offset: *offset, attempt: r.attempts + 1 }))
            .collect();
        due.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| (&a.1.tp, a.1.offset).cmp(&(&b.1.tp, b.1.offset))));
        due.into_iter().take(max).map(|(_, d)| d).collect()
    }

    /// Every publish decision not confirmed yet, per group and target in stamp order.
    pub fn pending_publishes(&self, max: usize) -> Vec<publish::Pending> {
        self.groups
            .iter()
            .flat_map(|(name, g)| {
                g.publishes.iter().map(move |((tp, _), p)| publish::Pending {
                    key: name.clone(),
                    target: tp.clone(),
                    publish: p.clone(),
                })
            })
            .take(max)
            .collect()
    }

    /// Confirms that the decision stamped `stamp` for `target` (and every earlier one there) is
    /// in the target partition.
    pub fn confirm_published(&self, group: &str, target: &Tp, stamp: (i16, i32)) -> Vec<super::GroupRecord> {
        let Some(before) = self.groups.get(group) else { return Vec::new() };
        let mut g = before.clone();
        publish::confirm(&mut g.publishes, target, stamp);
        diff(group, Some(before), &g)
    }
}

/// What a replay did with each dead letter it was given, by its offset in `<group>.dlq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutput {
    /// Decided for publishing to their origin now.
    pub replayed: Vec<u64>,
    /// Replayed before: nothing done.
    pub already: Vec<u64>,
    /// Not looked at (their origin partitions need producer ids this request did not have):
    /// send them again.
    pub deferred: Vec<u64>,
    /// Whether the spare producer id was used.
    pub used_spare_id: bool,
}

impl Groups {
    /// Replays dead letters to their origin topic and partition (from their headers), each at
    /// most once per offset of `<group>.dlq`: the replay is a publish decision like a dead
    /// letter's, so it lands once, as a new record with a fresh attempt count.
    pub fn replay_dead_letters(
        &self,
        group: &str,
        letters: &[(u64, DeadLetterRecord)],
        topics: &TopicsView,
        limits: &RetryLimits,
        now_ms: i64,
        spare_producer_id: Option<i64>,
    ) -> Result<Outcome<ReplayOutput>, GroupError> {
        validate_group_name(group)?;
        let dlq = dead_letter_topic(group)?;
        if letters.len() > limits.replay_batch_max {
            return Err(GroupError::Invalid(format!("at most {} dead letters per replay", limits.replay_batch_max)));
        }
        let before = self.groups.get(group).ok_or_else(|| GroupError::UnknownGroup(group.to_owned()))?;
        let mut g = before.clone();
        let mut out = ReplayOutput::default();
        let mut spare = spare_producer_id;
        for (offset, letter) in letters {
            if letter.size() > limits.record_bytes_max {
                return Err(GroupError::Invalid(format!(
                    "dead letter {dlq}@{offset} exceeds {} bytes",
                    limits.record_bytes_max
                )));
            }
            if g.replayed.iter().any(|(start, end)| (*start..*end).contains(offset)) {
                out.already.push(*offset);
                continue;
            }
            let named = |k: &str| {
                letter
                    .headers
                    .iter()
                    .find(|h| h.key == k)
                    .and_then(|h| h.value.as_deref())
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            };
            let origin = match (named(headers::ORIGIN_TOPIC), named(headers::ORIGIN_PARTITION)) {
                (Some(topic), Some(partition)) => {
                    let partition = partition.parse().map_err(|_| {
                        GroupError::Invalid(format!("{dlq}@{offset}: bad {} header", headers::ORIGIN_PARTITION))
                    })?;
                    Tp::new(topic, partition)
                }
                _ => {
                    return Err(GroupError::Invalid(format!(
                        "{dlq}@{offset} is not a dead letter: it has no {} and {} headers",
                        headers::ORIGIN_TOPIC,
                        headers::ORIGIN_PARTITION
                    )));
                }
            };
            check_tp(&origin, topics)?;
            let mut headers: Vec<PublishHeader> =
                letter.headers.iter().filter(|h| !headers::ALL.contains(&h.key.as_str())).cloned().collect();
            headers.push(header(headers::REPLAYED_FROM, format!("{dlq}@{offset}")));
            let record = DeadLetterRecord { headers, ..letter.clone() };
            match decide_publish(&mut g, group, &origin, record, limits, now_ms, spare) {
                Ok(used) => {
                    if used {
                        spare = None;
                        out.used_spare_id = true;
                    }
                }
                Err(GroupError::ProducerIdNeeded) if !out.replayed.is_empty() || out.used_spare_id => {
                    out.deferred.push(*offset);
                    continue;
                }
                Err(e) => return Err(e),
            }
            insert_range(&mut g.replayed, *offset);
            if g.replayed.len() > limits.replayed_ranges_max {
                return Err(GroupError::RetryBacklogFull {
                    group: group.to_owned(),
                    what: "ranges of replayed dead letters",
                    max: limits.replayed_ranges_max,
                });
            }
            out.replayed.push(*offset);
        }
        Ok(Outcome { records: diff(group, Some(before), &g), response: out })
    }
}

/// Adds `offset` to sorted disjoint `[start, end)` ranges, merging neighbours.
fn insert_range(ranges: &mut Vec<(u64, u64)>, offset: u64) {
    let at = ranges.partition_point(|(_, end)| *end < offset);
    match ranges.get_mut(at) {
        Some((start, end)) if *start <= offset && offset < *end => return,
        Some((start, _)) if *start == offset + 1 => *start = offset,
        Some((_, end)) if *end == offset => *end = offset + 1,
        _ => ranges.insert(at, (offset, offset + 1)),
    }
    // The range grown at its end may now touch the next one.
    if at + 1 < ranges.len() && ranges[at].1 == ranges[at + 1].0 {
        ranges[at].1 = ranges[at + 1].1;
        ranges.remove(at + 1);
    }
}

fn settled(tp: &Tp, offset: u64, state: &'static str) -> GroupError {
    GroupError::RecordSettled { tp: tp.clone(), offset, state }
}

fn check_tp(tp: &Tp, topics: &TopicsView) -> Result<(), GroupError> {
    match topics.get(&tp.topic) {
        Some(&count) if tp.partition < count => Ok(()),
        Some(_) | None => Err(GroupError::UnknownTopic(format!("{tp} does not exist"))),
    }
}

/// Decides to publish `record` to `target` for group `name` ([`crate::publish::decide`]).
/// Returns whether `spare` was used.
fn decide_publish(
    g: &mut Group,
    name: &str,
    target: &Tp,
    record: DeadLetterRecord,
    limits: &RetryLimits,
    now_ms: i64,
    spare: Option<i64>,
) -> Result<bool, GroupError> {
    let bounds = publish::Bounds { publishes_max: limits.publishes_max, publisher_idle_ms: limits.publisher_idle_ms };
    let record = publish::Outgoing { key: record.key, value: record.value, headers: record.headers };
    publish::decide(&mut g.publishers, &mut g.publishes, target, record, &bounds, now_ms, spare).map_err(|e| match e {
        publish::DecideError::Full { max } => {
            GroupError::RetryBacklogFull { group: name.to_owned(), what: "records waiting to be published", max }
        }
        publish::DecideError::ProducerIdNeeded => GroupError::ProducerIdNeeded,
    })
}

impl publish::Publishing for Groups {
    fn pending_publishes(&self, max: usize) -> Vec<publish::Pending> {
        Groups::pending_publishes(self, max)
    }

    fn confirm_records(&self, group: &str, target: &Tp, stamp: (i16, i32)) -> Vec<crate::Record> {
        self.confirm_published(group, target, stamp).iter().map(super::GroupRecord::encode).collect()
    }

    fn creates_targets() -> bool {
        true
    }
}

#[cfg(test)]
mod range_tests {
    use super::insert_range;

    #[test]
    fn ranges_merge_as_offsets_fill_the_gaps() {
        let mut r = Vec::new();
        for o in [5, 7, 6, 1, 0, 9, 2] {
            insert_range(&mut r, o);
        }
        assert_eq!(r, vec![(0, 3), (5, 8), (9, 10)]);
        insert_range(&mut r, 8);
        insert_range(&mut r, 6);
        assert_eq!(r, vec![(0, 3), (5, 10)]);
        insert_range(&mut r, 4);
        insert_range(&mut r, 3);
        assert_eq!(r, vec![(0, 10)]);
    }
}
