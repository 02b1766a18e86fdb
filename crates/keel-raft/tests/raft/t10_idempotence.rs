//! Idempotent producers through three real nodes: a retry — in flight beside the first attempt,
//! after it, or at a new leader after the old one crashed — is answered with the first attempt's
//! offsets and written once; a gap, an old epoch and a forgotten producer are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use crate::common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use keel_raft::producers::ProducerLimits;
use keel_raft::{AppendError, Appended, ProducerRefusal, RaftTimings};
use keel_record::{BatchBuilder, NewRecord, ProducerStamp};
use keel_storage::{Disk, FileDisk};
use std::time::Duration;

const GROUP: u64 = 11;
const PRODUCER: i64 = 42;

/// Batch `n` of the producer: 3 records, sequences `3n..3n+3`.
fn stamped(epoch: i16, n: i32) -> Bytes {
    let stamp = ProducerStamp { producer_id: PRODUCER, producer_epoch: epoch, base_sequence: 3 * n };
    let mut b = BatchBuilder::new(1 << 20).producer(stamp);
    for i in 0..3 {
        let value = format!("{epoch}:{n}:{i}");
        b.push(NewRecord {
            timestamp_ms: 1_000 + i64::from(n),
            key: None,
            value: Some(value.as_bytes()),
            headers: &[],
        })
        .unwrap();
    }
    b.build()
}

fn refusal(r: Result<Appended, AppendError>) -> ProducerRefusal {
    match r {
        Err(AppendError::Producer(p)) => p,
        other => panic!("expected a producer refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_written_once_across_a_leader_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = start_nodes(tmp.path(), &cfg, 3).await;
    for n in &nodes {
        n.node.open_group(GROUP).await.unwrap();
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    let leader = wait_leader(&refs, GROUP).await;
    let node = &nodes[leader].node;

    // Twenty batches pipelined, each submitted twice back to back: the second is a retry while
    // the first is still in flight, which the applied table alone could not recognise.
    let mut pending = Vec::new();
    for n in 0..20 {
        pending.push((n, node.submit(GROUP, stamped(0, n)).await.unwrap()));
        pending.push((n, node.submit(GROUP, stamped(0, n)).await.unwrap()));
    }
    let mut first: Vec<Option<Appended>> = vec![None; 20];
    for (n, p) in pending {
        let a = p.wait().await.unwrap();
        let slot = &mut first[n as usize];
        assert!(slot.is_none_or(|f| f == a), "batch {n}: both attempts answer alike");
        *slot = Some(a);
    }
    for (n, a) in first.iter().enumerate() {
        assert_eq!(a.unwrap().base_offset, 3 * n as u64, "batch {n} written once, in order");
    }
    // A retry after the commit: the original offsets.
    assert_eq!(node.append(GROUP, stamped(0, 7)).await.unwrap(), first[7].unwrap());
    // A gap, and a batch that is neither next nor a retry.
    assert_eq!(refusal(node.append(GROUP, stamped(0, 25)).await), ProducerRefusal::OutOfOrder { expected: 60 });
    // Older than the window remembers (16 batches): written once, offsets unknown.
    assert_eq!(refusal(node.append(GROUP, stamped(0, 1)).await), ProducerRefusal::StaleDuplicate);

    // The leader crashes; the table came from the log, so the next leader answers alike.
    let old = leader;
    nodes[old].stop(true).await;
    let live: Vec<&TestNode> = nodes.iter().enumerate().filter(|(i, _)| *i != old).map(|(_, n)| n).collect();
    let retried = append(&live, GROUP, stamped(0, 19)).await.unwrap();
    assert_eq!(retried, first[19].unwrap(), "a retry at the new leader gets the original offsets");
    let next = append(&live, GROUP, stamped(0, 20)).await.unwrap();
    assert_eq!(next.base_offset, 60);
    // A new epoch starts over at 0 and fences the old one.
    assert_eq!(append(&live, GROUP, stamped(1, 0)).await.unwrap().base_offset, 63);
    assert_eq!(refusal(append(&live, GROUP, stamped(0, 21)).await), ProducerRefusal::Fenced { current: 1 });
    // A producer the partition never saw may only start a sequence.
    let stranger = ProducerStamp { producer_id: 7, producer_epoch: 0, base_sequence: 9 };
    let mut b = BatchBuilder::new(1 << 20).producer(stranger);
    b.push(NewRecord { timestamp_ms: 1, key: None, value: Some(b"x"), headers: &[] }).unwrap();
    assert_eq!(refusal(append(&live, GROUP, b.build()).await), ProducerRefusal::UnknownProducer);

    // Every replica holds each batch once.
    for n in &live {
        wait_high_watermark(n, GROUP, 66).await;
        let values: Vec<String> = read_all(n, GROUP).into_iter().map(|(_, v)| v).collect();
        let mut expected: Vec<String> = (0..=20).flat_map(|b| (0..3).map(move |i| format!("0:{b}:{i}"))).collect();
        expected.extend((0..3).map(|i| format!("1:0:{i}")));
        assert_eq!(values, expected, "node {}", n.id);
    }
    for n in &mut nodes {
        n.stop(false).await;
    }
}

/// The node's producer limits reach every partition's table: with a window of 5 batches, a
/// retry of the sixth-newest batch is no longer answered with its offsets (written once all the
/// same), where the default window of 16 would still answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_is_the_nodes_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::default();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::new());
        let node = TestNode::start(id, "127.0.0.1:0", disk, tmp.path().join(format!("node-{id}")), &cfg).await;
        node.node.set_producer_limits(ProducerLimits { window: 5, ..ProducerLimits::default() });
        node.node.open_group(GROUP).await.unwrap();
        nodes.push(node);
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    nodes[0].node.initialize_group(GROUP, members(&refs)).await.unwrap();
    for n in 0..6 {
        append(&refs, GROUP, stamped(0, n)).await.unwrap();
    }
    assert_eq!(append(&refs, GROUP, stamped(0, 1)).await.unwrap().base_offset, 3, "inside the window");
    assert_eq!(refusal(append(&refs, GROUP, stamped(0, 0)).await), ProducerRefusal::StaleDuplicate);
    for n in &mut nodes {
        n.stop(false).await;
    }
}

/// A leader restarted with its vote resumes its term without a new blank entry, over a log tail
/// of that same term that its followers never got. That tail commits in pieces (openraft sends
/// at most 300 entries per message), so an applied entry of the term does not mean the table
/// holds the whole tail: a retry of its last batch must still get its original offsets, not be
/// written a second time (the duplicate simulation seed 175 found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_at_a_leader_restarted_into_its_term_is_written_once() {
    const TAIL: i32 = 400;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig { timings: RaftTimings { quiesce: false, ..test_timings() }, ..ClusterConfig::default() };
    let (mut nodes, leader) = start_group(tmp.path(), &cfg, 3, GROUP).await;
    let refs: Vec<&TestNode> = nodes.iter().collect();
    for n in 0..5 {
        append(&refs, GROUP, stamped(0, n)).await.unwrap();
    }
    // The followers crash; the leader takes a tail of batches it can no longer commit.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        nodes[f].stop(true).await;
    }
    let raft_last = nodes[leader].node.metrics(GROUP).unwrap().last_log_index.unwrap();
    let mut pending = Vec::new();
    for n in 5..5 + TAIL {
        pending.push(nodes[leader].node.submit(GROUP, stamped(0, n)).await.expect("submitted within the lease"));
    }
    let raft = nodes[leader].node.raft(GROUP).unwrap();
    let logged = raft.wait(Some(Duration::from_secs(10)));
    logged.metrics(|m| m.last_log_index >= Some(raft_last + TAIL as u64), "the tail logged").await.unwrap();
    drop(pending);
    nodes[leader].stop(false).await;

    // The leader and one follower come back: the leader resumes its term at once.
    for i in [leader, followers[0]] {
        nodes[i].restart(&cfg).await;
        nodes[i].node.open_group(GROUP).await.unwrap();
    }
    let live = [&nodes[leader], &nodes[followers[0]]];
    let last = 5 + TAIL - 1;
    let retried = append(&live, GROUP, stamped(0, last)).await.unwrap();
    assert_eq!(retried.base_offset, 3 * last as u64, "the retry is answered with the tail's offsets");
    let next = append(&live, GROUP, stamped(0, last + 1)).await.unwrap();
    assert_eq!(next.base_offset, 3 * (last as u64 + 1), "and the log holds each batch once");
    for n in &mut nodes {
        n.stop(false).await;
    }
}
