//! The durable client outbox in the broker workload: a producer with an outbox on a disk of its
//! own sends a few records a second to `sim-outbox` and is crashed again and again (the producer
//! dropped mid-flight, its disk losing whatever was not flushed) at chosen points — right after
//! `send` returned (appended, nothing sent), a few milliseconds later (sent, not answered), right
//! after an acknowledgement (stored, not yet marked done), or by a power cut in the middle of its
//! own disk writes — and reopened from the same outbox. Invariant, checked after healing: every
//! record whose `send` returned `Ok` is read from the topic exactly once, and nothing is read that
//! was never sent.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use keel_client::{
    Admin, ClientError, Consumer, ConsumerConfig, Offset, OutboxConfig, Producer, ProducerRecord, WhenFull,
};
use keel_storage::{Disk, SimDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::broker::{Shared, client_config, log, producer_config, wait_topic};

/// The outbox producer's topic.
pub(crate) const TOPIC: &str = "sim-outbox";
/// Its partitions.
const PARTITIONS: u32 = 2;
const DIR: &str = "/outbox";

/// Deliberate bugs for the negative controls.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OutboxFaults {
    /// The outbox writes no stamps: a restart stamps batches that may be stored afresh.
    pub(crate) skip_stamps: bool,
    /// The outbox's disk acknowledges flushes and persists nothing: a crash loses records
    /// whose `send` returned `Ok`.
    pub(crate) lying_flush: bool,
}

/// Where a life of the producer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// Right after a `send` returned: the record is in the log, nothing went out.
    AfterAppend,
    /// A few milliseconds after a `send`: the batch is on the wire, its answer not yet in.
    AfterSend,
    /// Right after a record's acknowledgement, before its done entry is flushed.
    AfterAck,
    /// The power goes out after this many more mutating disk operations (mid-write, mid-flush).
    DiskOutage(u64),
}

/// The outbox client's view.
#[derive(Debug, Default)]
pub(crate) struct OutboxView {
    /// Values whose `send` returned `Ok`: owed exactly once.
    appended: BTreeSet<String>,
    /// Values whose `send` failed (a power cut mid-append): they may or may not be in the log.
    maybe: BTreeSet<String>,
    /// Where each value was read: (partition, offset).
    seen: BTreeMap<String, BTreeSet<(u32, u64)>>,
    /// The last producer and the consumer stop (the check is done).
    stop: bool,
    /// Producer lives (opens of the outbox), and records read.
    pub(crate) counts: (u64, u64),
    /// The last producer's outbox, as last seen.
    status: String,
}

fn outbox_config(disk: &SimDisk, skip_stamps: bool) -> OutboxConfig {
    let mut config = OutboxConfig::with_disk(Arc::new(disk.clone()) as Arc<dyn Disk>, DIR);
    // Small segments, so that runs roll and delete them.
    config.segment_bytes = 8 << 10;
    config.bytes_max = 1 << 20;
    config.when_full = WhenFull::Block;
    config.negative_control_skip_stamps = skip_stamps;
    config
}

/// Creates the topic (an answer lost in transit makes the retry find it).
async fn create_topic(seed: u64, state: &Shared) -> turmoil::Result {
    let nodes = state.borrow().nodes;
    let admin = Admin::new(client_config(seed, nodes))?;
    loop {
        match admin.create_topic(TOPIC, PARTITIONS, 3, keel_client::TopicConfig::default()).await {
            Ok(_) | Err(ClientError::AlreadyExists(_)) => return Ok(()),
            Err(e) => {
                log(state, format!("outbox: create topic: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Sends through an outbox, crashing and reopening it, until `until`; then keeps a last life
/// open until the check is done, while reading the topic.
pub(crate) async fn outbox_main(seed: u64, until: Duration, faults: OutboxFaults, state: Shared) -> turmoil::Result {
    wait_topic(&state).await;
    create_topic(seed ^ 0xad, &state).await?;
    let consumer = consume(seed ^ 0xc0, Rc::clone(&state));
    let produce = async {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0b0c);
        let disk = SimDisk::new(seed ^ 0xd15c);
        disk.set_lying_flush(faults.lying_flush);
        let nodes = state.borrow().nodes;
        let mut n = 0u64;
        for life in 0u64.. {
            let last = turmoil::sim_elapsed().unwrap_or_default() >= until;
            let config = client_config(seed ^ (life << 20), nodes);
            let producer = match Producer::with_outbox(
                config,
                producer_config(Duration::from_secs(10), true, None),
                outbox_config(&disk, faults.skip_stamps),
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    state.borrow_mut().violations.push(format!("outbox: life {life} could not open the outbox: {e}"));
                    return Ok(());
                }
            };
            state.borrow_mut().outbox.counts.0 += 1;
            if last {
                log(&state, format!("outbox: last life {life}: {:?}", producer.outbox_stats()));
                while !state.borrow().outbox.stop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // What the outbox still holds, for the report should the check fail.
                    let status = format!("{:?}, parked {:?}", producer.outbox_stats(), producer.outbox_parked());
                    state.borrow_mut().outbox.status = status;
                }
                let stats = producer.outbox_stats().unwrap_or_default();
                if stats.parked > 0 {
                    state.borrow_mut().violations.push(format!("outbox: parked batches after healing: {stats:?}"));
                }
                producer.close().await;
                return Ok(());
            }
            let crash = match rng.random_range(0..4) {
                0 => Crash::AfterAppend,
                1 => Crash::AfterSend,
                2 => Crash::AfterAck,
                _ => Crash::DiskOutage(rng.random_range(1..40)),
            };
            let sends = rng.random_range(1..12);
            log(&state, format!("outbox: life {life}: {sends} sends, then {crash:?}"));
            if let Crash::DiskOutage(ops) = crash {
                disk.crash_after(ops);
            }
            for i in 0..sends {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                let value = format!("o{n}");
                n += 1;
                let record =
                    ProducerRecord::new(value.clone().into_bytes()).with_partition(rng.random_range(0..PARTITIONS));
                let delivery = match producer.send(TOPIC, record).await {
                    Ok(delivery) => {
                        state.borrow_mut().outbox.appended.insert(value.clone());
                        delivery
                    }
                    Err(e) => {
                        log(&state, format!("outbox: {value} not appended: {e}"));
                        state.borrow_mut().outbox.maybe.insert(value);
                        break;
                    }
                };
                if i + 1 < sends {
                    continue;
                }
                match crash {
                    Crash::AfterAppend | Crash::DiskOutage(_) => {}
                    Crash::AfterSend => tokio::time::sleep(Duration::from_millis(rng.random_range(1..6))).await,
                    Crash::AfterAck => {
                        // Bounded: under faults the answer may take long; the crash comes anyway.
                        let _ = tokio::time::timeout(Duration::from_secs(5), delivery).await;
                    }
                }
            }
            // The process dies: the producer's tasks stop where they are, and the disk keeps
            // only what was flushed (per the crash mode the seed picks).
            drop(producer);
            let mode = disk.crash();
            log(&state, format!("outbox: life {life} crashed ({mode:?})"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..500))).await;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let (produced, consumed) = tokio::join!(produce, consumer);
    produced?;
    consumed
}

/// Reads `sim-outbox` from the beginning until told to stop.
async fn consume(seed: u64, state: Shared) -> turmoil::Result {
    let config = ConsumerConfig {
        fetch_bytes_max: 64 << 10,
        fetch_wait_max: Duration::from_millis(500),
        offset_default: Offset::Beginning,
    };
    let nodes = state.borrow().nodes;
    let mut consumer = Consumer::new(client_config(seed, nodes), config)?;
    while consumer.assign(TOPIC, &[]).await.is_err() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    while !state.borrow().outbox.stop {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => {
                let mut s = state.borrow_mut();
                for r in records {
                    next.insert(r.partition, r.offset + 1);
                    s.outbox.counts.1 += 1;
                    let value = crate::checker::text(r.value.as_deref());
                    s.outbox.seen.entry(value).or_default().insert((r.partition, r.offset));
                }
            }
            Err(e) => {
                log(&state, format!("outbox consumer: poll: {e}; re-subscribing"));
                for p in 0..PARTITIONS {
                    consumer.seek(TOPIC, p, Offset::At(next.get(&p).copied().unwrap_or(0)))?;
                }
            }
        }
    }
    Ok(())
}

/// After healing: every record whose send returned `Ok` is read within `bound`; then none was
/// read twice, and none that was never sent.
pub(crate) async fn converge(state: &Shared, bound: Duration) -> Result<(), String> {
    let missing = || -> Vec<String> {
        let s = state.borrow();
        let mut out: Vec<String> =
            s.outbox.appended.iter().filter(|v| !s.outbox.seen.contains_key(*v)).cloned().collect();
        out.truncate(5);
        out
    };
    let lost = crate::broker::within(bound, "outbox records appended but never stored (lost)", missing).await;
    lost.map_err(|e| format!("{e}; the outbox holds {}", state.borrow().outbox.status))?;
    let mut s = state.borrow_mut();
    s.outbox.stop = true;
    for (value, at) in &s.outbox.seen {
        if at.len() > 1 {
            return Err(format!("outbox record {value} stored twice (duplicate): at {at:?}"));
        }
        if !s.outbox.appended.contains(value) && !s.outbox.maybe.contains(value) {
            return Err(format!("{value} in {TOPIC} was never sent"));
        }
    }
    let counts = s.outbox.counts;
    let owed = s.outbox.appended.len();
    drop(s);
    log(state, format!("outbox: {owed} records owed, all read once; {counts:?} (lives, records read)"));
    Ok(())
}
