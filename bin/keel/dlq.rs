//! Dead-letter topics from the command line: `keel dlq list|inspect|replay`. A group's dead
//! letters live in the ordinary topic `<group>.dlq` (partition 0), each with headers naming
//! its origin and why it failed; replay asks the group's coordinator to publish them back to
//! their origin, each once.

use anyhow::Context;
use clap::Subcommand;
use keel_client::{Admin, Consumer, ConsumerConfig, ConsumerRecord, GroupAdmin};
use serde_json::{Value, json};

use crate::Output;
use crate::tools::{Connection, runtime, table};

/// The suffix of a group's dead-letter topic.
const SUFFIX: &str = ".dlq";
/// Dead letters per replay request (the broker's bound).
const REPLAY_BATCH: usize = 100;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Every dead-letter topic (`<group>.dlq`) and how many dead letters it holds.
    List,
    /// Print a group's dead letters: origin, attempts, last error, value.
    Inspect {
        /// The group.
        group: String,
        /// First dead-letter offset to print.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Print at most this many.
        #[arg(short = 'n', long, default_value_t = 100)]
        count: u64,
    },
    /// Publish dead letters back to their origin topic and partition, each once (again: nothing).
    /// The replayed records are new records: their attempts start over.
    Replay {
        /// The group.
        group: String,
        /// Only this dead letter (repeat the flag); default: every one from --from on.
        #[arg(long = "offset")]
        offsets: Vec<u64>,
        /// First dead-letter offset to replay.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

pub fn run(command: DlqCommand, connection: &Connection, output: Output) -> anyhow::Result<()> {
    let client = connection.config()?;
    runtime()?.block_on(async move {
        let consumer = Consumer::new(client.clone(), ConsumerConfig::default())?;
        match command {
            DlqCommand::List => {
                let topics = Admin::new(client)?.list_topics().await?;
                let mut rows = Vec::new();
                for t in topics.iter().filter(|t| t.name.ends_with(SUFFIX)) {
                    let (start, end) = consumer.watermarks(&t.name, 0).await?;
                    rows.push((t.name.clone(), t.name.trim_end_matches(SUFFIX).to_owned(), start, end));
                }
                match output {
                    Output::Json => {
                        let list: Vec<Value> = rows
                            .iter()
                            .map(|(topic, group, start, end)| {
                                json!({"topic": topic, "group": group, "log_start_offset": start, "end_offset": end, "dead_letters": end - start})
                            })
                            .collect();
                        println!("{}", Value::Array(list));
                    }
                    Output::Text => {
                        let mut t = table();
                        t.set_header(["TOPIC", "GROUP", "DEAD LETTERS", "OFFSETS"]);
                        for (topic, group, start, end) in &rows {
                            t.add_row([topic.clone(), group.clone(), (end - start).to_string(), format!("{start}..{end}")]);
                        }
                        println!("{t}");
                    }
                }
                Ok(())
            }
            DlqCommand::Inspect { group, from, count } => {
                let letters = read(&consumer, &group, from, Some(count)).await?;
                match output {
                    Output::Json => {
                        for r in &letters {
                            println!("{}", letter_json(r));
                        }
                    }
                    Output::Text => {
                        let mut t = table();
                        t.set_header(["OFFSET", "ORIGIN", "ATTEMPTS", "FIRST FAILURE", "LAST ERROR", "VALUE"]);
                        for r in &letters {
                            let h = |k: &str| header(r, k).unwrap_or_else(|| "-".into());
                            let origin = format!(
                                "{}/{}@{}",
                                h("keel-origin-topic"),
                                h("keel-origin-partition"),
                                h("keel-origin-offset")
                            );
                            let first = header(r, "keel-first-failure-ms")
                                .and_then(|ms| ms.parse::<i64>().ok())
                                .and_then(chrono::DateTime::from_timestamp_millis)
                                .map_or_else(|| "-".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                            let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                            t.add_row([r.offset.to_string(), origin, h("keel-attempts"), first, h("keel-last-error"), short(&value)]);
                        }
                        println!("{t}");
                    }
                }
                Ok(())
            }
            DlqCommand::Replay { group, offsets, from } => {
                let mut letters = read(&consumer, &group, from, None).await?;
                if !offsets.is_empty() {
                    letters.retain(|r| offsets.contains(&r.offset));
                    if let Some(missing) = offsets.iter().find(|o| !letters.iter().any(|r| r.offset == **o)) {
                        anyhow::bail!("{group}{SUFFIX} has no dead letter at offset {missing}");
                    }
                }
                let admin = GroupAdmin::new(client)?;
                let (mut replayed, mut already) = (Vec::new(), Vec::new());
                for chunk in letters.chunks(REPLAY_BATCH) {
                    let (now, before) = admin
                        .replay_dead_letters(&group, chunk)
                        .await
                        .with_context(|| format!("replaying dead letters of group {group:?}"))?;
                    replayed.extend(now);
                    already.extend(before);
                }
                match output {
                    Output::Json => println!("{}", json!({"replayed": replayed, "already_replayed": already})),
                    Output::Text => {
                        println!("replayed {} dead letters of {group}{SUFFIX}", replayed.len());
                        if !already.is_empty() {
                            println!("{} were replayed before and were not sent again", already.len());
                        }
                    }
                }
                Ok(())
            }
        }
    })
}

/// The dead letters of `group` from `from` on (at most `count`), up to the end as it is now.
async fn read(consumer: &Consumer, group: &str, from: u64, count: Option<u64>) -> anyhow::Result<Vec<ConsumerRecord>> {
    let topic = format!("{group}{SUFFIX}");
    let (start, end) = consumer
        .watermarks(&topic, 0)
        .await
        .with_context(|| format!("{topic} (a group's dead-letter topic exists once it dead-lettered a record)"))?;
    let mut out = Vec::new();
    let mut offset = from.max(start);
    while offset < end && count.is_none_or(|n| (out.len() as u64) < n) {
        let fetched = consumer.fetch(&topic, 0, offset).await?;
        let before = offset;
        for r in fetched.records.into_iter().filter(|r| r.offset < end) {
            offset = r.offset + 1;
            if count.is_none_or(|n| (out.len() as u64) < n) {
                out.push(r);
            }
        }
        if offset == before {
            break;
        }
    }
    Ok(out)
}

fn header(r: &ConsumerRecord, key: &str) -> Option<String> {
    r.headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
}

fn short(s: &str) -> String {
    if s.chars().count() <= 40 { s.to_owned() } else { format!("{}…", s.chars().take(39).collect::<String>()) }
}

fn letter_json(r: &ConsumerRecord) -> Value {
    let text = |b: &Option<bytes::Bytes>| b.as_deref().map(|v| String::from_utf8_lossy(v).into_owned());
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| {
            (k.clone(), v.as_deref().map_or(Value::Null, |v| Value::String(String::from_utf8_lossy(v).into_owned())))
        })
        .collect();
    json!({
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": text(&r.key),
        "value": text(&r.value),
        "headers": headers,
    })
}
