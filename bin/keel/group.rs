//! Consumer groups from the command line: `keel consume TOPIC --group G` (a group member that
//! prints, then commits) and `keel group list|describe|reset-offsets|delete`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgGroup, Subcommand};
use keel_client::{
    Admin, ClientError, Consumer, ConsumerConfig, GroupAdmin, GroupConfig, GroupConsumer, OffsetReset, TopicPartition,
};
use keel_proto::v1 as pb;
use serde_json::{Value, json};

use crate::Output;
use crate::tools::{AutoOffsetReset, Connection, ConsumeArgs, print_record, runtime, table};

/// How long one `poll` waits before the loop looks at signals and the record count again.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Bytes per fetch while looking for a timestamp: large reads, few round trips.
const SCAN_FETCH_BYTES: u32 = 4 << 20;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List the cluster's consumer groups: state, members, coordinator.
    List,
    /// Show a group: members and their assignments, committed offsets and lag per partition.
    Describe {
        /// The group.
        group: String,
    },
    /// Set a group's committed offsets for a topic (only while the group has no members).
    #[command(group(ArgGroup::new("mode").required(true).args(["dry_run", "execute"])))]
    ResetOffsets {
        /// The group.
        group: String,
        /// The topic whose offsets are reset.
        #[arg(long)]
        topic: String,
        /// Only these partitions (repeat the flag; default: every partition of the topic).
        #[arg(long = "partition")]
        partitions: Vec<u32>,
        /// `earliest` (log start), `latest` (log end), an offset (clamped to the log), or a
        /// time: ISO-8601 / RFC 3339 such as `2026-12-01T10:00:00Z` or
        /// `2026-12-01T11:00:00+01:00`, or milliseconds since the Unix epoch as `ms:1764583200000`.
        /// A time moves each partition to its first record stamped at or after it (the log end
        /// when there is none).
        #[arg(long, value_parser = parse_reset_to)]
        to: ResetTo,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Change the committed offsets.
        #[arg(long)]
        execute: bool,
        /// A time is looked for by reading each partition from its log start; give up after
        /// this many records per partition.
        #[arg(long, default_value_t = 10_000_000)]
        scan_records_max: u64,
    },
    /// Delete a group with no members, and its committed offsets.
    Delete {
        /// The group.
        group: String,
    },
}

/// Where `reset-offsets` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The log start.
    Earliest,
    /// The log end (high watermark).
    Latest,
    /// This offset, clamped to the log.
    Offset(u64),
    /// The first record stamped at or after this many ms since the Unix epoch.
    Timestamp(i64),
}

fn parse_reset_to(s: &str) -> Result<ResetTo, String> {
    let s = s.trim();
    if s == "earliest" {
        return Ok(ResetTo::Earliest);
    }
    if s == "latest" {
        return Ok(ResetTo::Latest);
    }
    if let Some(ms) = s.strip_prefix("ms:") {
        return ms
            .parse::<i64>()
            .map(ResetTo::Timestamp)
            .map_err(|e| format!("{s:?}: ms: must be followed by milliseconds since the Unix epoch ({e})"));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(ResetTo::Offset).map_err(|e| format!("{s:?}: not an offset ({e})"));
    }
    chrono::DateTime::parse_from_rfc3339(s).map(|t| ResetTo::Timestamp(t.timestamp_millis())).map_err(|e| {
        format!(
            "{s:?} is none of: earliest, latest, an offset, an ISO-8601 time with its zone \
             (2026-12-01T10:00:00Z), ms:MILLISECONDS ({e})"
        )
    })
}

/// A timestamp in ms since the epoch as RFC 3339 in UTC, for messages.
pub(crate) fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("ms:{ms}"), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// A client error in a group command, with a hint when the reason has a usual cure.
fn explain(e: ClientError, group: &str) -> anyhow::Error {
    let hint = match e.group_reason() {
        Some("GROUP_NOT_EMPTY") => {
            " — offsets are reset, and groups deleted, only while a group has no members: stop its \
             consumers first (a static member's slot stays for its session timeout after it leaves)"
        }
        Some("GROUP_ID_NOT_FOUND") => " — no such group (`keel group list` shows the groups)",
        Some("INCONSISTENT_ASSIGNOR") => " — the group's members must all ask for the same assignor",
        Some("GROUP_MAX_SIZE_REACHED") => " — the group is at the cluster's group_members_max",
        Some("GROUPS_MAX_REACHED") => " — the coordinator is at the cluster's groups_max",
        _ => "",
    };
    anyhow::anyhow!("group {group:?}: {e}{hint}")
}

fn partitions_text(list: &[pb::TopicPartitions]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|t| format!("{}: {}", t.topic, t.partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn partitions_json(list: &[pb::TopicPartitions]) -> Value {
    Value::Array(list.iter().map(|t| json!({"topic": t.topic, "partitions": t.partitions})).collect())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_owned() }
}

/// `keel consume TOPIC --group G`: joins G, prints each poll's records, then commits the offsets
/// of what it printed; stops after `-n` records or on Ctrl-C / SIGTERM, committing what it
/// printed and leaving the group at once.
pub fn consume(args: ConsumeArgs, group: &str, connection: &Connection) -> anyhow::Result<()> {
    let client = connection.config()?;
    let mut config = GroupConfig::new(group);
    config.client_id = args.client_id.clone().unwrap_or_else(|| "keel-cli".into());
    config.instance_id = args.instance_id.clone();
    if let Some(ms) = args.session_timeout_ms {
        config.session_timeout = Duration::from_millis(u64::from(ms));
    }
    config.auto_offset_reset = match args.auto_offset_reset.unwrap_or(AutoOffsetReset::Earliest) {
        AutoOffsetReset::Earliest => OffsetReset::Earliest,
        AutoOffsetReset::Latest => OffsetReset::Latest,
        AutoOffsetReset::Error => OffsetReset::Error,
    };
    config.retry = keel_client::RetryPolicy {
        max_attempts: args.max_attempts,
        backoff_min: Duration::from_millis(u64::from(args.backoff_ms)),
        backoff_max: Duration::from_millis(u64::from(args.backoff_ms)).max(Duration::from_secs(60)),
    };
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    runtime()?.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Signal streams made once: a signal that arrives while a batch is printed or committed
        // is kept and seen by the next turn of the loop.
        let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        // A group waits for topics that do not exist yet without a word; a tool should say so.
        Admin::new(client.clone())?
            .describe_topic(&args.topic)
            .await
            .with_context(|| format!("topic {:?}", args.topic))?;
        let mut member =
            GroupConsumer::subscribe(client, config, &[args.topic.as_str()]).await.map_err(|e| explain(e, group))?;
        let mut stdout = std::io::stdout().lock();
        let mut printed = 0u64;
        // Offsets of printed records whose commit has not succeeded yet.
        let mut uncommitted: BTreeMap<TopicPartition, u64> = BTreeMap::new();
        let stopped: anyhow::Result<()> = loop {
            if args.count.is_some_and(|n| printed >= n) {
                break Ok(());
            }
            let polled = tokio::select! {
                biased;
                _ = interrupt.recv() => break Ok(()),
                _ = terminate.recv() => break Ok(()),
                r = member.poll(POLL_WAIT) => r,
            };
            let records = match polled {
                Ok(records) => records,
                Err(e) => break Err(explain(e, group)),
            };
            let mut written = Ok(());
            for r in &records {
                if args.count.is_some_and(|n| printed >= n) {
                    break;
                }
                let failing = args
                    .nack_on
                    .as_deref()
                    .is_some_and(|text| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).contains(text));
                if failing {
                    match member.nack(r, "matched --nack-on", !args.nack_fatal).await {
                        Ok(o) if o.dead_lettered => eprintln!(
                            "nacked {}/{}@{} (attempt {}): dead-lettered to {group}.dlq",
                            r.topic, r.partition, r.offset, r.attempt
                        ),
                        Ok(_) => eprintln!(
                            "nacked {}/{}@{} (attempt {}): it comes back after its backoff",
                            r.topic, r.partition, r.offset, r.attempt
                        ),
                        Err(e) if e.group_reason() == Some("RECORD_SETTLED") => {}
                        Err(e) => {
                            // Not recorded: stop before committing past it, so it comes again.
                            written = Err(std::io::Error::other(format!("nack failed: {e}")));
                            break;
                        }
                    }
                } else {
                    written = print_record(&mut stdout, args.format, r);
                    if written.is_err() {
                        break;
                    }
                    printed += 1;
                    if r.attempt > 1
                        && let Err(e) = member.ack(r).await
                    {
                        eprintln!("warning: acknowledging a redelivered record failed (it comes again): {e}");
                    }
                }
                if r.attempt == 1 {
                    let next = uncommitted.entry((r.topic.clone(), r.partition)).or_insert(0);
                    *next = (*next).max(r.offset + 1);
                }
            }
            if let Err(e) = written.and_then(|()| stdout.flush()) {
                // Output that may not have reached its reader is not processed: nothing of this
                // batch is committed, so the group delivers it again.
                uncommitted.clear();
                break Err(anyhow::Error::new(e).context("writing records to stdout"));
            }
            if !uncommitted.is_empty() {
                match member.commit_offsets(&uncommitted).await {
                    Ok(_) => uncommitted.clear(),
                    // Refused commits (the partition moved to another member) are never retried;
                    // the others are, with the next batch or on the way out.
                    Err(e) if e.group_reason().is_some() && !e.is_retriable() => {
                        eprintln!("warning: {}: those records will be delivered again", explain(e, group));
                        uncommitted.clear();
                    }
                    Err(e) => eprintln!("warning: commit failed, retried after the next batch: {e}"),
                }
            }
        };
        // On the way out: commit what was printed, then leave so the partitions move at once.
        let committed = if uncommitted.is_empty() {
            Ok(())
        } else {
            member.commit_offsets(&uncommitted).await.map(|_| ()).map_err(|e| {
                anyhow::anyhow!(
                    "{}: the offsets of the last records printed were not committed; they will be delivered again",
                    explain(e, group)
                )
            })
        };
        if let Err(e) = member.close().await {
            eprintln!("warning: leaving group {group:?} failed ({e}); it drops this member after its session timeout");
        }
        stopped.and(committed)
    })
}

pub fn run(command: GroupCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let client = connection.config()?;
    runtime()?.block_on(async move {
        let groups = GroupAdmin::new(client.clone())?;
        match command {
            GroupCommand::List => list(&groups, &Admin::new(client)?, output).await,
            GroupCommand::Describe { group } => describe(&groups, &group, output).await,
            GroupCommand::ResetOffsets { group, topic, partitions, to, dry_run, execute, scan_records_max } => {
                debug_assert!(dry_run != execute, "clap requires exactly one of --dry-run and --execute");
                let consumer = Consumer::new(
                    client.clone(),
                    ConsumerConfig {
                        fetch_bytes_max: SCAN_FETCH_BYTES,
                        fetch_wait_max: Duration::ZERO,
                        ..ConsumerConfig::default()
                    },
                )?;
                let request = ResetRequest { group, topic, partitions, to, execute, scan_records_max };
                reset_offsets(&groups, &Admin::new(client)?, &consumer, request, output).await
            }
            GroupCommand::Delete { group } => {
                groups.delete_group(&group).await.map_err(|e| explain(e, &group))?;
                match output {
                    Output::Json => println!("{}", json!({ "deleted": group })),
                    Output::Text => println!("deleted group {group}"),
                }
                Ok(())
            }
        }
    })
}

async fn list(groups: &GroupAdmin, admin: &Admin, output: Output) -> anyhow::Result<()> {
    let listed = groups.list_groups().await.context("listing groups")?;
    // Addresses make the coordinator column useful; the listing stands without them.
    let addrs: BTreeMap<u64, String> = match admin.describe_cluster().await {
        Ok(c) => c.nodes.into_iter().map(|n| (n.node_id, n.addr)).collect(),
        Err(_) => BTreeMap::new(),
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "groups": listed.groups.iter().map(|g| json!({
                    "group": g.group,
                    "state": g.state,
                    "members": g.members,
                    "coordinator_id": g.coordinator_id,
                    "coordinator_addr": g.coordinator_id.and_then(|id| addrs.get(&id)),
                })).collect::<Vec<_>>(),
                "unavailable_partitions": listed.unavailable_partitions,
            })
        ),
        Output::Text => {
            let mut t = table();
            t.set_header(["group", "state", "members", "coordinator"]);
            for g in &listed.groups {
                let coordinator = match g.coordinator_id {
                    Some(id) => addrs.get(&id).map_or(format!("node {id}"), |a| format!("node {id} ({a})")),
                    None => "-".into(),
                };
                t.add_row([g.group.clone(), g.state.clone(), g.members.to_string(), coordinator]);
            }
            println!("{t}");
        }
    }
    if !listed.unavailable_partitions.is_empty() {
        bail!(
            "incomplete: the coordinators of __consumer_offsets partitions {} did not answer, so their groups \
             are missing; try again shortly",
            crate::tools::ids(&listed.unavailable_partitions.iter().map(|p| u64::from(*p)).collect::<Vec<_>>())
        );
    }
    Ok(())
}

async fn describe(groups: &GroupAdmin, group: &str, output: Output) -> anyhow::Result<()> {
    let d = groups.describe_group(group).await.map_err(|e| explain(e, group))?;
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "group": d.group,
                "state": d.state,
                "group_epoch": d.group_epoch,
                "assignor": d.assignor,
                "coordinator_id": d.coordinator_id,
                "members": d.members.iter().map(|m| json!({
                    "member_id": m.member_id,
                    "instance_id": (!m.instance_id.is_empty()).then_some(&m.instance_id),
                    "client_id": m.client_id,
                    "host": m.host,
                    "member_epoch": m.member_epoch,
                    "subscribed_topics": m.subscribed_topics,
                    "assignment": partitions_json(&m.assignment),
                    "revoking": partitions_json(&m.revoking),
                })).collect::<Vec<_>>(),
                "partitions": d.partitions.iter().map(|p| json!({
                    "topic": p.topic,
                    "partition": p.partition,
                    "committed_offset": p.committed_offset,
                    "log_end_offset": p.log_end_offset,
                    "lag_records": p.lag_records,
                    "lag_seconds": p.lag_seconds,
                    "status": (!p.status.is_empty()).then_some(&p.status),
                    "last_commit_timestamp_ms": p.last_commit_timestamp_ms,
                    "window_commits": p.window_commits,
                    "member_id": (!p.member_id.is_empty()).then_some(&p.member_id),
                })).collect::<Vec<_>>(),
                "total_lag_records": d.total_lag_records,
                "max_lag_seconds": d.max_lag_seconds,
                "status": (!d.status.is_empty()).then_some(&d.status),
            })
        ),
        Output::Text => {
            println!(
                "group {}: {}, status {}, epoch {}, assignor {}, coordinator node {}",
                d.group,
                d.state,
                or_dash(&d.status),
                d.group_epoch,
                or_dash(&d.assignor),
                d.coordinator_id
            );
            if d.members.is_empty() {
                println!("no members");
            } else {
                let mut t = table();
                t.set_header(["member", "instance", "client", "host", "epoch", "assignment", "revoking"]);
                for m in &d.members {
                    t.add_row([
                        m.member_id.clone(),
                        or_dash(&m.instance_id),
                        or_dash(&m.client_id),
                        or_dash(&m.host),
                        m.member_epoch.to_string(),
                        partitions_text(&m.assignment),
                        partitions_text(&m.revoking),
                    ]);
                }
                println!("{t}");
            }
            if d.partitions.is_empty() {
                println!("no committed offsets and no partitions assigned");
                return Ok(());
            }
            let mut t = table();
            t.set_header(["topic", "partition", "committed", "log end", "lag", "lag (s)", "status", "owner"]);
            for p in &d.partitions {
                t.add_row([
                    p.topic.clone(),
                    p.partition.to_string(),
                    p.committed_offset.map_or("-".into(), |o| o.to_string()),
                    p.log_end_offset.to_string(),
                    p.lag_records.to_string(),
                    p.lag_seconds.map_or("?".into(), |s| format!("{s:.1}")),
                    or_dash(&p.status),
                    or_dash(&p.member_id),
                ]);
            }
            println!("{t}");
            let oldest = d.max_lag_seconds.map_or(String::new(), |s| format!(", oldest waiting {s:.1} s"));
            println!("total lag: {} records{oldest}; status {}", d.total_lag_records, or_dash(&d.status));
        }
    }
    Ok(())
}

struct ResetRequest {
    group: String,
    topic: String,
    partitions: Vec<u32>,
    to: ResetTo,
    execute: bool,
    scan_records_max: u64,
}

/// The first offset of `topic/partition` at or above `log_start` whose record is stamped at or
/// after `timestamp_ms`, or `log_end` when none is. Record timestamps are set by producers and
/// need not grow with offsets, so this is a linear scan from the log start, one fetch of up to
/// `SCAN_FETCH_BYTES` at a time; it stops at the first match and gives up after `records_max`
/// records.
async fn offset_for_time(
    consumer: &Consumer,
    (topic, partition): (&str, u32),
    (log_start, log_end): (u64, u64),
    timestamp_ms: i64,
    records_max: u64,
) -> anyhow::Result<u64> {
    let mut at = log_start;
    let mut scanned = 0u64;
    while at < log_end {
        if scanned >= records_max {
            bail!(
                "{topic}/{partition}: no record stamped at or after {} among the first {scanned} records from the \
                 log start (offsets {log_start}..{at}); raise --scan-records-max or give an offset",
                iso(timestamp_ms)
            );
        }
        let fetched = consumer
            .fetch(topic, partition, at)
            .await
            .with_context(|| format!("reading {topic}/{partition} at {at}"))?;
        if let Some(r) = fetched.records.iter().find(|r| r.timestamp_ms >= timestamp_ms) {
            return Ok(r.offset);
        }
        scanned += fetched.records.len() as u64;
        if fetched.next_offset <= at {
            bail!("{topic}/{partition}: a fetch at offset {at} made no progress (next offset {})", fetched.next_offset);
        }
        at = fetched.next_offset;
    }
    Ok(log_end)
}

async fn reset_offsets(
    groups: &GroupAdmin,
    admin: &Admin,
    consumer: &Consumer,
    request: ResetRequest,
    output: Output,
) -> anyhow::Result<()> {
    let ResetRequest { group, topic, partitions, to, execute, scan_records_max } = request;
    let described = admin.describe_topic(&topic).await.with_context(|| format!("topic {topic:?}"))?;
    let all: Vec<u32> = described.partitions.iter().map(|p| p.partition).collect();
    let chosen: Vec<u32> = if partitions.is_empty() { all.clone() } else { partitions };
    if let Some(p) = chosen.iter().find(|p| !all.contains(p)) {
        bail!("topic {topic:?} has no partition {p} (it has {})", all.len());
    }
    // A group that does not exist yet has no members and no offsets: a reset creates it.
    let members = match groups.describe_group(&group).await {
        Ok(d) => d.members.len(),
        Err(e) if e.group_reason() == Some("GROUP_ID_NOT_FOUND") => 0,
        Err(e) => return Err(explain(e, &group)),
    };
    let current: BTreeMap<u32, u64> = groups
        .fetch_offsets(&group)
        .await
        .map_err(|e| explain(e, &group))?
        .into_iter()
        .filter(|o| o.topic == topic)
        .map(|o| (o.partition, o.offset))
        .collect();
    let mut plan: BTreeMap<TopicPartition, u64> = BTreeMap::new();
    let mut notes = Vec::new();
    for &p in &chosen {
        let (start, end) =
            consumer.watermarks(&topic, p).await.with_context(|| format!("the watermarks of {topic}/{p}"))?;
        let new = match to {
            ResetTo::Earliest => start,
            ResetTo::Latest => end,
            ResetTo::Offset(o) => {
                let clamped = o.clamp(start, end);
                if clamped != o {
                    notes.push(format!(
                        "partition {p}: offset {o} is outside the log ({start}..={end}): using {clamped}"
                    ));
                }
                clamped
            }
            ResetTo::Timestamp(ms) => {
                offset_for_time(consumer, (&topic, p), (start, end), ms, scan_records_max).await?
            }
        };
        plan.insert((topic.clone(), p), new);
    }
    let applied: Option<BTreeMap<u32, u64>> = if execute {
        let done = groups.reset_offsets(&group, &plan).await.map_err(|e| explain(e, &group))?;
        Some(done.into_iter().filter(|o| o.topic == topic).map(|o| (o.partition, o.offset)).collect())
    } else {
        None
    };
    let new_of = |p: u32| applied.as_ref().and_then(|a| a.get(&p).copied()).unwrap_or(plan[&(topic.clone(), p)]);
    let to_text = match to {
        ResetTo::Earliest => "earliest".to_owned(),
        ResetTo::Latest => "latest".to_owned(),
        ResetTo::Offset(o) => format!("offset {o}"),
        ResetTo::Timestamp(ms) => iso(ms),
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "group": group,
                "topic": topic,
                "to": to_text,
                "executed": execute,
                "members": members,
                "partitions": chosen.iter().map(|&p| json!({
                    "partition": p,
                    "current_offset": current.get(&p),
                    "new_offset": new_of(p),
                })).collect::<Vec<_>>(),
                "notes": notes,
            })
        ),
        Output::Text => {
            for n in &notes {
                eprintln!("note: {n}");
            }
            let mut t = table();
            t.set_header(["partition", "current committed", "new offset"]);
            for &p in &chosen {
                t.add_row([p.to_string(), current.get(&p).map_or("-".into(), u64::to_string), new_of(p).to_string()]);
            }
            println!("{t}");
            if execute {
                println!("group {group}: offsets of {topic} reset to {to_text}");
            } else {
                println!("dry run: nothing changed (run again with --execute to apply)");
                if members > 0 {
                    eprintln!(
                        "note: group {group:?} has {members} members now; --execute is refused (GROUP_NOT_EMPTY) \
                         until they have left"
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse() {
        let cases: [(&str, Result<ResetTo, ()>); 9] = [
            ("earliest", Ok(ResetTo::Earliest)),
            ("latest", Ok(ResetTo::Latest)),
            ("42", Ok(ResetTo::Offset(42))),
            ("ms:1764583200000", Ok(ResetTo::Timestamp(1_764_583_200_000))),
            ("2025-12-01T10:00:00Z", Ok(ResetTo::Timestamp(1_764_583_200_000))),
            ("2025-12-01T11:00:00.5+01:00", Ok(ResetTo::Timestamp(1_764_583_200_500))),
            ("2025-12-01", Err(())),
            ("ms:soon", Err(())),
            ("-3", Err(())),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_reset_to(input).map_err(|_| ()), expected, "{input}");
        }
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(iso(1_764_583_200_500), "2025-12-01T10:00:00.500Z");
    }
}
