//! The consumer-group part of the broker workload: 3 to 5 real `GroupConsumer`s (some static)
//! share the topic, process every record they are handed and commit after processing, while
//! they crash, leave, and pause long enough to be removed (waking up as zombies that try to
//! commit) — all under the same nemesis as the brokers, whose leader chase also targets the
//! coordinator's partition.
//!
//! What is checked, through the clients' eyes and on the coordinator's final log:
//! - durable quorum at commit ack: when a member learns a commit was acknowledged, a quorum of
//!   disks hold that committed offset durably (white-box, as for produce acks);
//! - acknowledged commits survive: after healing, `FetchOffsets` returns at least every offset
//!   a member saw acknowledged;
//! - the audit of `__consumer_offsets` replayed in order: no partition is ever owned by two
//!   members, every commit came from a member that owned the partition at an epoch within its
//!   assignment epoch and its current one (zombie commits fenced), committed offsets never move
//!   backwards and never pass the partition's high watermark;
//! - at-least-once: after healing the group converges (stable, every partition owned) and every
//!   acknowledged record was processed by some member, or dead-lettered;
//! - retry and dead letter: records fail by a rule of their value (some once, some on every
//!   attempt, some with a non-retryable error). An acknowledged nack is on a quorum of disks;
//!   in the audit, a record's attempts go up by exactly one per recorded failure and never
//!   start over, a record acknowledged on a redelivery is never dead-lettered, and no origin
//!   gets two publish decisions; after healing, `<group>.dlq` holds every record a member was
//!   told was dead-lettered, each exactly once, with max-attempts attempts for a poison record
//!   and one for a non-retryable failure, and nothing that ever succeeded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use keel_client::{ConsumerConfig, ConsumerRecord, GroupAdmin, GroupConfig, GroupConsumer, Offset, RetryPolicy};
use keel_coordinator::Shard;
use keel_coordinator::groups::{GroupRecord, Groups, RedeliveryState, Tp};
use keel_raft::{GroupId, RaftNode};
use keel_storage::SimDisk;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::broker::{DATA_DIR, PARTITIONS, Shared, TOPIC, client_config, log, wait_topic};
use crate::checker;
use crate::nemesis::host_name;

/// The group every member joins.
pub const GROUP: &str = "sim-group";
/// Members' session timeout: short, so that removals (and zombies) happen within a run.
const SESSION: Duration = Duration::from_secs(3);
/// How long a member may take to revoke.
const REBALANCE: Duration = Duration::from_secs(6);
/// Attempts of a failing record before it is dead-lettered.
const MAX_ATTEMPTS: u32 = 3;

/// How processing a record goes, by a rule of its value (the same for every member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Processed at the first attempt.
    Fine,
    /// Fails its first attempt (retryable), then succeeds.
    Flaky,
    /// Fails every attempt (retryable): dead-lettered after [`MAX_ATTEMPTS`].
    Poison,
    /// Fails with a non-retryable error: dead-lettered at once.
    Fatal,
}

/// The fate of a value: about 4% poison, 2% fatal, 8% flaky.
pub fn fate(value: &str) -> Fate {
    match keel_record::fnv1a_64(value.as_bytes()) % 100 {
        0..4 => Fate::Poison,
        4..6 => Fate::Fatal,
        6..14 => Fate::Flaky,
        _ => Fate::Fine,
    }
}

/// A commit a member saw acknowledged.
#[derive(Debug, Clone)]
pub struct AckedCommit {
    /// The committing member.
    pub member: String,
    /// Partition of the topic.
    pub partition: u32,
    /// The committed offset the answer reported.
    pub offset: u64,
}

/// What the members did, for the checker.
#[derive(Debug, Default)]
pub struct GroupView {
    /// Values processed by some member.
    pub processed: BTreeSet<String>,
    /// Commits acknowledged to a member.
    pub commits: Vec<AckedCommit>,
    /// The raft group of `__consumer_offsets` (one partition in the simulation).
    pub offsets_group: Option<GroupId>,
    /// Set in the liveness phase: members stop crashing, leaving and pausing.
    pub quiet: bool,
    /// Set once the group converged: members commit a last time and leave.
    pub stop: bool,
    /// Members that have left for good.
    pub done: u64,
    /// Commits tried by a member right after a pause longer than its session.
    pub zombie_commits: u64,
    /// Of those, how many the coordinator refused.
    pub zombie_fenced: u64,
    /// Member lives (joins with a new member id).
    pub lives: u64,
    /// The idle group's offsets, by partition, once acknowledged.
    pub idle: Option<BTreeMap<u32, u64>>,
    /// Nacks acknowledged to a member.
    pub nacks: u64,
    /// Values a member was told were dead-lettered.
    pub dead: BTreeSet<String>,
    /// Redelivered records processed (and acked).
    pub redelivered: u64,
}

/// Settings of the members.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemberPlan {
    /// Members of the group.
    pub members: u64,
    /// Every member pauses once this long into the run (negative controls: a zombie for sure).
    pub zombie_at: Option<Duration>,
}

/// The members of a run of `seed`: 3 to 5.
pub fn members_for(seed: u64) -> u64 {
    3 + seed % 3
}

/// White-box, when a member learns of a commit: on how many disks `__consumer_offsets` holds a
/// record committing `offset` for the partition, or a later offset, durably (a compaction may
/// have rewritten the record and trimmed the original, or a later commit superseded it).
fn durable_commit_copies(disks: &[SimDisk], dir: &Path, partition: u32, offset: u64) -> usize {
    let tp = Tp::new(TOPIC, partition);
    let key = GroupRecord::Offset(GROUP.to_owned(), tp, None).encode().key;
    checker::durable_records(disks, dir, |record| {
        record.key == key
            && matches!(GroupRecord::decode(record), Ok(GroupRecord::Offset(_, _, Some(c))) if c.offset >= offset)
    })
}

/// White-box, when a member learns its nack was recorded: on how many disks
/// `__consumer_offsets` durably holds the record's failure at `attempt` or later.
fn durable_nack_copies(disks: &[SimDisk], dir: &Path, partition: u32, offset: u64, attempt: u32) -> usize {
    let key = GroupRecord::Redelivery(GROUP.to_owned(), Tp::new(TOPIC, partition), offset, None).encode().key;
    checker::durable_records(disks, dir, |record| {
        record.key == key
            && matches!(GroupRecord::decode(record), Ok(GroupRecord::Redelivery(_, _, _, Some(r))) if r.attempts >= attempt)
    })
}

/// Runs a member's handler on what one poll returned, in order: ack or nack each record by its
/// fate. Returns false when a first attempt's failure could not be recorded: the member must
/// not commit past it, so it gives up this life (its partitions then restart at the commit).
async fn handle(
    state: &Shared,
    disks: &[SimDisk],
    host: &str,
    member: &mut GroupConsumer,
    records: Vec<ConsumerRecord>,
) -> bool {
    for r in records {
        let value = checker::text(r.value.as_deref());
        let failure = match (fate(&value), r.attempt) {
            (Fate::Fine, _) => None,
            (Fate::Flaky, a) if a > 1 => None,
            (Fate::Flaky | Fate::Poison, _) => Some(true),
            (Fate::Fatal, _) => Some(false),
        };
        let Some(retryable) = failure else {
            if r.attempt > 1 {
                // Not acknowledged: the coordinator lists it again, and it runs again.
                match member.ack(&r).await {
                    Ok(()) => state.borrow_mut().members.redelivered += 1,
                    Err(e) => log(state, format!("{host}: ack {value}@{}: {e}", r.attempt)),
                }
            }
            state.borrow_mut().members.processed.insert(value);
            continue;
        };
        match member.nack(&r, &format!("{value} failed"), retryable).await {
            Ok(outcome) => {
                let dir = state.borrow().members.offsets_group.map(|g| Path::new(DATA_DIR).join(format!("group-{g}")));
                let copies =
                    dir.as_ref().map_or(0, |d| durable_nack_copies(disks, d, r.partition, r.offset, r.attempt));
                let quorum = crate::broker::durable_quorum(state, copies);
                let mut s = state.borrow_mut();
                if !quorum {
                    s.violations.push(format!(
                        "{host}: nack of {value} (attempt {}) acknowledged without a durable quorum ({copies} disks)",
                        r.attempt
                    ));
                }
                s.members.nacks += 1;
                if outcome.dead_lettered {
                    s.members.dead.insert(value.clone());
                }
                drop(s);
                log(state, format!("{host}: nacked {value}@{}: {outcome:?}", r.attempt));
            }
            // Decided before (read again from a commit below it): nothing left to do.
            Err(e) if e.group_reason() == Some("RECORD_SETTLED") => log(state, format!("{host}: {value}: {e}")),
            Err(e) => {
                log(state, format!("{host}: nack {value}@{}: {e}", r.attempt));
                if r.attempt == 1 {
                    return false;
                }
            }
        }
    }
    true
}

/// One member's lives until the group is told to stop.
pub(crate) async fn member_main(
    k: u64,
    seed: u64,
    plan: MemberPlan,
    state: Shared,
    disks: Vec<SimDisk>,
) -> turmoil::Result {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6e6d);
    wait_topic(&state).await;
    let nodes = state.borrow().nodes;
    let host = format!("member{k}");
    let instance = rng.random_ratio(1, 2).then(|| format!("instance-{k}"));
    let mut zombie_done = false;
    for life in 1u64.. {
        state.borrow_mut().members.lives += 1;
        let mut config = GroupConfig::new(GROUP);
        config.session_timeout = SESSION;
        config.rebalance_timeout = REBALANCE;
        config.instance_id = instance.clone();
        config.client_id = host.clone();
        config.consumer = ConsumerConfig {
            fetch_bytes_max: 64 << 10,
            fetch_wait_max: Duration::from_millis(500),
            offset_default: Offset::Beginning,
        };
        config.retry = RetryPolicy {
            max_attempts: MAX_ATTEMPTS,
            backoff_min: Duration::from_millis(300),
            backoff_max: Duration::from_secs(2),
        };
        let client = client_config(seed ^ (life << 24), nodes);
        let mut member = match GroupConsumer::subscribe(client, config, &[TOPIC]).await {
            Ok(m) => m,
            Err(e) => {
                log(&state, format!("{host}: subscribe: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        log(&state, format!("{host}: life {life} as {} ({instance:?})", member.member_id()));
        let mut last_commit = BTreeMap::new();
        loop {
            let stop = state.borrow().members.stop;
            match member.poll(Duration::from_millis(200)).await {
                Ok(records) => {
                    if !handle(&state, &disks, &host, &mut member, records).await {
                        log(&state, format!("{host}: a failure could not be recorded: rejoining"));
                        drop(member);
                        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1_000))).await;
                        break;
                    }
                }
                Err(e) => log(&state, format!("{host}: poll: {e}")),
            }
            // Processed: commit what was handed out.
            commit(&state, &disks, &host, &member, &mut last_commit).await;
            if stop {
                let _ = member.close().await;
                log(&state, format!("{host}: left for good"));
                state.borrow_mut().members.done += 1;
                return Ok(());
            }
            let now = turmoil::sim_elapsed().unwrap_or_default();
            let planned = !zombie_done && plan.zombie_at.is_some_and(|at| now >= at);
            if state.borrow().members.quiet && !planned {
                continue;
            }
            if planned || rng.random_ratio(1, 400) {
                zombie_done |= planned;
                pause(
                    &state,
                    &disks,
                    &host,
                    &member,
                    nodes,
                    SESSION + Duration::from_millis(rng.random_range(1_000..4_000)),
                )
                .await;
            } else if rng.random_ratio(1, 400) {
                let down = Duration::from_millis(rng.random_range(0..5_000));
                log(&state, format!("{host}: crash (down {down:?})"));
                drop(member);
                tokio::time::sleep(down).await;
                break;
            } else if rng.random_ratio(1, 500) {
                log(&state, format!("{host}: leave"));
                if let Err(e) = member.close().await {
                    log(&state, format!("{host}: leave: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..3_000))).await;
                break;
            }
        }
    }
    Ok(())
}

/// Commits the positions that moved since the last acknowledged commit and records what the
/// answer acknowledged.
async fn commit(
    state: &Shared,
    disks: &[SimDisk],
    host: &str,
    member: &GroupConsumer,
    last: &mut BTreeMap<(String, u32), u64>,
) {
    let positions: BTreeMap<(String, u32), u64> = member
        .assignment()
        .into_iter()
        .filter_map(|(t, p)| Some(((t.clone(), p), member.position(&t, p)?)))
        .filter(|(tp, o)| last.get(tp) != Some(o))
        .collect();
    if positions.is_empty() {
        return;
    }
    match member.commit_offsets(&positions).await {
        Ok(committed) => {
            acked(state, disks, host, &committed);
            last.extend(committed);
        }
        Err(e) => log(state, format!("{host}: commit {positions:?}: {e}")),
    }
}

fn acked(state: &Shared, disks: &[SimDisk], host: &str, committed: &BTreeMap<(String, u32), u64>) {
    let dir = state.borrow().members.offsets_group.map(|g| Path::new(DATA_DIR).join(format!("group-{g}")));
    for ((_, partition), offset) in committed {
        let copies = dir.as_ref().map_or(0, |d| durable_commit_copies(disks, d, *partition, *offset));
        let quorum = crate::broker::durable_quorum(state, copies);
        let mut s = state.borrow_mut();
        if !quorum {
            s.violations.push(format!(
                "{host}: commit of offset {offset} on partition {partition} acknowledged without a durable quorum ({copies} disks)"
            ));
        }
        s.members.commits.push(AckedCommit { member: host.to_owned(), partition: *partition, offset: *offset });
    }
    log(state, format!("{host}: committed {committed:?}"));
}

/// A long pause (a stop-the-world collection, a frozen VM): the member is cut off for longer
/// than its session, then, before anything else, commits what it held — a zombie commit the
/// coordinator must refuse if it gave the partitions away meanwhile.
async fn pause(state: &Shared, disks: &[SimDisk], host: &str, member: &GroupConsumer, nodes: u64, long: Duration) {
    let positions: BTreeMap<(String, u32), u64> =
        member.assignment().into_iter().filter_map(|(t, p)| Some(((t.clone(), p), member.position(&t, p)?))).collect();
    log(state, format!("{host}: pause {long:?} holding {positions:?}"));
    for n in 1..=nodes {
        turmoil::partition(host, host_name(n).as_str());
    }
    tokio::time::sleep(long).await;
    for n in 1..=nodes {
        turmoil::repair(host, host_name(n).as_str());
    }
    if positions.is_empty() {
        return;
    }
    state.borrow_mut().members.zombie_commits += 1;
    match member.commit_offsets(&positions).await {
        Ok(committed) => acked(state, disks, host, &committed),
        Err(e) => {
            log(state, format!("{host}: zombie commit refused: {e}"));
            state.borrow_mut().members.zombie_fenced += 1;
        }
    }
}

/// A group nobody joins: its offsets are committed once, at the start, and never touched again,
/// so every later compaction must carry them over (lost offsets are seen after healing).
pub const IDLE_GROUP: &str = "sim-idle";

/// Commits the idle group's offsets (retrying through faults for up to a minute) and records
/// them once acknowledged.
pub(crate) async fn commit_idle_group(state: &Shared, seed: u64) {
    let nodes = state.borrow().nodes;
    let Ok(admin) = GroupAdmin::new(client_config(seed ^ 0x1d, nodes)) else { return };
    let offsets: BTreeMap<(String, u32), u64> = (0..PARTITIONS).map(|p| ((TOPIC.to_owned(), p), 0)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match admin.reset_offsets(IDLE_GROUP, &offsets).await {
            Ok(_) => {
                log(state, format!("{IDLE_GROUP}: committed {offsets:?}"));
                state.borrow_mut().members.idle = Some(offsets.into_iter().map(|((_, p), o)| (p, o)).collect());
                return;
            }
            Err(e) => log(state, format!("{IDLE_GROUP}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The liveness part of the members: every acknowledged record processed by some member, the
/// group stable with every partition owned, then a last commit each; then every acknowledged
/// commit must be what `FetchOffsets` returns, or below it.
pub(crate) async fn converge(
    state: &Shared,
    seed: u64,
    members: u64,
    acked: BTreeSet<String>,
    bound: Duration,
) -> Result<(), String> {
    state.borrow_mut().members.quiet = true;
    let pending = || -> Vec<String> {
        let s = state.borrow();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|v| matches!(fate(v), Fate::Fine | Fate::Flaky) && !s.members.processed.contains(*v))
            .collect();
        if missing.is_empty() {
            Vec::new()
        } else {
            vec![format!("{} acknowledged records never processed, e.g. {:?}", missing.len(), missing.first())]
        }
    };
    crate::broker::within(bound, "the group did not process every acknowledged record", pending).await?;
    // The failing ones: every acknowledged one dead-lettered (while the members still run: a
    // poison record needs its redeliveries), each once.
    let failing: BTreeSet<String> =
        acked.iter().filter(|v| matches!(fate(v), Fate::Poison | Fate::Fatal)).cloned().collect();
    check_dead_letters(state, seed, &failing, bound).await?;
    let nodes = state.borrow().nodes;
    let admin = GroupAdmin::new(client_config(seed ^ 0x9a, nodes)).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let why = match admin.describe_group(GROUP).await {
            Ok(d) => {
                let owned = d.partitions.iter().filter(|p| !p.member_id.is_empty()).count();
                if d.state == "stable" && d.members.len() as u64 == members && owned == PARTITIONS as usize {
                    break;
                }
                format!("state {}, {} members, {owned} partitions owned", d.state, d.members.len())
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the group did not converge in {bound:?}: {why}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log(state, "group converged".into());
    state.borrow_mut().members.stop = true;
    crate::broker::within(bound, "members did not leave", || {
        let done = state.borrow().members.done;
        if done == members { Vec::new() } else { vec![format!("{done} of {members} left")] }
    })
    .await?;
    let fetched: BTreeMap<u32, u64> = admin
        .fetch_offsets(GROUP)
        .await
        .map_err(|e| format!("fetching the group's offsets after healing: {e}"))?
        .into_iter()
        .map(|o| (o.partition, o.offset))
        .collect();
    log(state, format!("committed offsets after healing: {fetched:?}"));
    let idle = state.borrow().members.idle.clone();
    if let Some(idle) = idle {
        let now: BTreeMap<u32, u64> = admin
            .fetch_offsets(IDLE_GROUP)
            .await
            .map_err(|e| format!("fetching {IDLE_GROUP}'s offsets after healing: {e}"))?
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect();
        if now != idle {
            return Err(format!("lost commit: {IDLE_GROUP} committed {idle:?} once, FetchOffsets returns {now:?}"));
        }
    }
    for c in &state.borrow().members.commits {
        let now = fetched.get(&c.partition).copied();
        if now.is_none_or(|o| o < c.offset) {
            return Err(format!(
                "lost commit: {} saw offset {} of partition {} acknowledged, FetchOffsets returns {now:?}",
                c.member, c.offset, c.partition
            ));
        }
    }
    Ok(())
}

/// After healing: `<group>.dlq` holds every acknowledged failing record (and every one a
/// member was told was dead-lettered), once, with the attempts its fate implies, and nothing
/// else.
async fn check_dead_letters(
    state: &Shared,
    seed: u64,
    failing: &BTreeSet<String>,
    bound: Duration,
) -> Result<(), String> {
    let mut dead = state.borrow().members.dead.clone();
    dead.extend(failing.iter().cloned());
    if dead.is_empty() {
        return Ok(());
    }
    let nodes = state.borrow().nodes;
    let consumer = keel_client::Consumer::new(client_config(seed ^ 0xd1, nodes), ConsumerConfig::default())
        .map_err(|e| e.to_string())?;
    let topic = format!("{GROUP}.dlq");
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let letters = read_all(&consumer, &topic).await;
        let found: BTreeSet<String> = letters.iter().map(|(v, _)| v.clone()).collect();
        let missing: Vec<&String> = dead.difference(&found).collect();
        if missing.is_empty() {
            let mut origins = BTreeSet::new();
            for (value, headers) in &letters {
                let origin =
                    (headers.get("keel-origin-partition").cloned(), headers.get("keel-origin-offset").cloned());
                if !origins.insert(origin.clone()) {
                    return Err(format!("dead letter published twice: {value} from {origin:?}"));
                }
                let attempts: u32 = headers.get("keel-attempts").and_then(|a| a.parse().ok()).unwrap_or(0);
                let wanted = match fate(value) {
                    Fate::Poison => MAX_ATTEMPTS,
                    Fate::Fatal => 1,
                    f => return Err(format!("{value} ({f:?}) was dead-lettered")),
                };
                if attempts != wanted {
                    return Err(format!(
                        "dead letter {value} ({:?}) after {attempts} attempts, not {wanted}",
                        fate(value)
                    ));
                }
            }
            log(state, format!("{} dead letters, each once", letters.len()));
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{} dead-lettered records missing from {topic} after {bound:?}, e.g. {:?}",
                missing.len(),
                missing.first()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every committed record of partition 0 of `topic`: value and headers.
async fn read_all(consumer: &keel_client::Consumer, topic: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let Ok((_, end)) = consumer.watermarks(topic, 0).await else { return Vec::new() };
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        let Ok(fetched) = consumer.fetch(topic, 0, offset).await else { return Vec::new() };
        let before = offset;
        for r in fetched.records.into_iter().filter(|r| r.offset < end) {
            let headers = r.headers.iter().map(|(k, v)| (k.clone(), checker::text(v.as_deref()))).collect();
            out.push((checker::text(r.value.as_deref()), headers));
            offset = r.offset + 1;
        }
        if offset == before {
            return Vec::new();
        }
    }
    out
}

/// One batch of the coordinator's log: the records of one operation, appended atomically.
pub type OpRecords = Vec<(u64, keel_coordinator::Record)>;

/// Every committed batch of `__consumer_offsets` on a node, in offset order.
pub fn read_offsets_log(node: &RaftNode, group: GroupId) -> Result<Vec<OpRecords>, String> {
    let store = node.store(group).map_err(|e| e.to_string())?;
    let (start, _, _) = store.positions();
    let high_watermark = *store.high_watermark().borrow();
    let mut out = Vec::new();
    let mut next = start.offset;
    while next < high_watermark {
        let batches = store.read_committed(next, 1 << 20).map_err(|e| e.to_string())?;
        if batches.is_empty() {
            return Err(format!("nothing readable at {next} below the high watermark {high_watermark}"));
        }
        for b in batches {
            let mut op = Vec::new();
            for r in b.records() {
                let r = r.map_err(|e| e.to_string())?;
                op.push((r.offset, keel_coordinator::Record::from(r)));
            }
            out.push(op);
            next = b.header().next_offset();
        }
    }
    Ok(out)
}

/// Replays the coordinator's log in order and checks what the module doc lists: every commit
/// against the ownership before its operation, single ownership after every operation (one
/// batch: its records are appended atomically), monotonic offsets within the high watermarks.
///
/// A compacted log starts past offset 0: the state replayed from its start is then the real one
/// only from the first compaction record whose floor is at or above that start (every live key
/// was rewritten between the floor and that record), so commits before it are checked for
/// monotonicity and the high watermark but not against ownership. A rewrite repeats a key's
/// current value: it is no new commit.
pub fn audit(log: &[OpRecords], high_watermarks: &BTreeMap<u32, u64>) -> Result<(), String> {
    let mut state = Groups::default();
    let mut last: BTreeMap<(String, Tp), u64> = BTreeMap::new();
    let mut retries = RetryAudit::default();
    let start = log.first().and_then(|op| op.first()).map_or(0, |(o, _)| *o);
    let mut complete = start == 0;
    for op in log {
        let before = state.clone();
        for (offset, record) in op {
            if let Some(floor) = record.compaction_floor() {
                let floor =
                    floor.map_err(|()| format!("__consumer_offsets@{offset}: a compaction record without a floor"))?;
                if floor > *offset {
                    return Err(format!("__consumer_offsets@{offset}: a compaction floor {floor} above itself"));
                }
                complete |= floor >= start;
                continue;
            }
            audit_record(&before, &mut last, *offset, record, high_watermarks, complete)?;
            retries.record(&before, *offset, record, complete)?;
            state.replay(*offset, record).map_err(|e| e.to_string())?;
        }
        let offset = op.last().map_or(0, |(o, _)| *o);
        for (name, group) in &state.groups {
            let mut seen = BTreeSet::new();
            for m in group.members.values() {
                for tp in m.assigned.keys().chain(m.revoking.keys()) {
                    if !seen.insert(tp) {
                        return Err(format!("group {name}: {tp} owned by two members at __consumer_offsets@{offset}"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn audit_record(
    state: &Groups,
    last: &mut BTreeMap<(String, Tp), u64>,
    offset: u64,
    record: &keel_coordinator::Record,
    high_watermarks: &BTreeMap<u32, u64>,
    complete: bool,
) -> Result<(), String> {
    let decoded = GroupRecord::decode(record).map_err(|e| format!("__consumer_offsets@{offset}: {e}"))?;
    if let GroupRecord::Offset(g, tp, Some(c)) = &decoded {
        let rewrite = state.get(g).and_then(|group| group.offsets.get(tp)) == Some(c);
        if !c.member_id.is_empty() && complete && !rewrite {
            let owner = state.get(g).and_then(|group| group.members.get(&c.member_id));
            let fenced_ok = owner.is_some_and(|m| {
                m.owns(tp).is_some_and(|assigned_at| assigned_at <= c.member_epoch) && c.member_epoch <= m.epoch
            });
            if !fenced_ok {
                return Err(format!(
                    "zombie commit accepted at __consumer_offsets@{offset}: {} (epoch {}) committed {} of {tp} without owning it ({:?})",
                    c.member_id,
                    c.member_epoch,
                    c.offset,
                    owner.map(|m| (m.epoch, m.assigned.clone(), m.revoking.clone()))
                ));
            }
        }
        let key = (g.clone(), tp.clone());
        if let Some(before) = last.get(&key)
            && c.offset < *before
        {
            return Err(format!("committed offset of {tp} went back from {before} to {} at @{offset}", c.offset));
        }
        last.insert(key, c.offset);
        let hw = high_watermarks.get(&tp.partition).copied().unwrap_or(0);
        if c.offset > hw {
            return Err(format!("committed offset {} of {tp} above its high watermark {hw} at @{offset}", c.offset));
        }
    }
    Ok(())
}

/// What the audit remembers of retries: records whose redelivery state was removed (settled and
/// passed by the commit: their attempts must never start over), and every dead letter's origin
/// with the publish decision that carries it.
#[derive(Default)]
struct RetryAudit {
    removed: BTreeSet<(String, Tp, u64)>,
    origins: BTreeMap<(String, String, String), (i16, i32)>,
}

impl RetryAudit {
    fn record(
        &mut self,
        state: &Groups,
        offset: u64,
        record: &keel_coordinator::Record,
        complete: bool,
    ) -> Result<(), String> {
        let Ok(decoded) = GroupRecord::decode(record) else { return Ok(()) };
        match decoded {
            GroupRecord::Redelivery(g, tp, at, value) => {
                let key = (g.clone(), tp.clone(), at);
                let before = state.get(&g).and_then(|group| group.redeliveries.get(&(tp.clone(), at)));
                let Some(r) = value else {
                    self.removed.insert(key);
                    return Ok(());
                };
                if before == Some(&r) {
                    return Ok(()); // a compaction's rewrite
                }
                let fine = match before {
                    None if self.removed.contains(&key) => false,
                    // A log that starts after a trim knows chains only from their rewrite on.
                    None => r.attempts == 1 || !complete,
                    Some(b) => match (b.state, r.state) {
                        (RedeliveryState::Pending, RedeliveryState::Pending | RedeliveryState::DeadLettered) => {
                            r.attempts == b.attempts + 1
                        }
                        (RedeliveryState::Pending, RedeliveryState::Resolved) => r.attempts == b.attempts,
                        _ => false,
                    },
                };
                if !fine {
                    return Err(format!(
                        "retry state of {tp}@{at} went from {before:?} to {r:?} at __consumer_offsets@{offset} (removed before: {})",
                        self.removed.contains(&key)
                    ));
                }
            }
            GroupRecord::Publish(g, target, stamp, Some(p)) => {
                if state.get(&g).and_then(|group| group.publishes.get(&(target.clone(), stamp))) == Some(&p) {
                    return Ok(());
                }
                let header = |k: &str| {
                    p.headers.iter().find(|h| h.key == k).map(|h| checker::text(h.value.as_deref())).unwrap_or_default()
                };
                let origin =
                    (header("keel-origin-topic"), header("keel-origin-partition"), header("keel-origin-offset"));
                if let Some(first) = self.origins.insert(origin.clone(), stamp) {
                    return Err(format!(
                        "{origin:?} decided for the dead-letter topic twice: stamps {first:?} and {stamp:?} (__consumer_offsets@{offset})"
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}
