//! The leader's check of idempotent batches before they enter the log (DESIGN.md §6).
//!
//! The producer table ([`crate::producers`]) is applied from the log, so it lags the leader's
//! own appends by a commit: a batch and its retry, both still in flight, would both pass it and
//! both be written. The sequencer adds what this node has handed to raft and not yet had
//! answered, per producer and in log order, and a batch is checked against both under one lock
//! that is held until raft has queued it, so the order batches are checked in is the order they
//! are in the log.
//!
//! Sound only when the table holds every entry in the leader's log before its first check: a
//! batch is checked only once the leader applied everything its log held when the term's first
//! check began. "An entry of the leader's own term applied" is not enough: a leader restarted
//! with its vote resumes its term without a new blank entry, over a log whose tail (of that same
//! term) commits piecemeal, so an applied entry of the term may still have unapplied retries
//! behind it (simulation seed 175). A batch handed to raft stays in flight until raft answers for it
//! — applied, or failed because leadership was lost — whatever term it was handed in, and a
//! retry of it waits for that answer instead of being written beside it.

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::watch;

use crate::node::AppendError;
use crate::producers::{ProducerTable, Stamped, Verdict, next_sequence_after};
use crate::types::Appended;

/// Raft's answer for a batch in flight: `None` until it comes.
pub(crate) type Answer = Option<Result<Appended, AppendError>>;

/// An idempotent producer's batch that the partition refuses; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerRefusal {
    /// A gap before the batch: an earlier one was not written. Resend from `expected`, in order.
    #[error("out of order sequence: the partition expects sequence {expected} of this producer next")]
    OutOfOrder {
        /// The sequence the partition expects next.
        expected: i32,
    },
    /// The producer's epoch is older than its current one: another instance took over.
    #[error("producer fenced: its epoch is now {current}")]
    Fenced {
        /// The producer's current epoch.
        current: i16,
    },
    /// The partition does not know the producer (expired, evicted or never seen) and the batch
    /// does not start a sequence: it may be a retry, so it is refused rather than risk a duplicate.
    #[error("unknown producer id: the partition no longer remembers this producer; start a new sequence")]
    UnknownProducer,
    /// Written before, but older than the batches the partition remembers, so its offsets are
    /// no longer known. It is not written again.
    #[error("duplicate sequence: this batch was written before, at offsets no longer remembered")]
    StaleDuplicate,
}

/// What to do with a batch.
#[derive(Debug)]
pub(crate) enum Check {
    /// New and next in its sequence: hand it to raft.
    Append,
    /// A retry of a batch in flight: its answer is the answer.
    SameAs(watch::Receiver<Answer>),
    /// Answered already: a duplicate with its original offsets, or a refusal.
    Done(Result<Appended, AppendError>),
}

struct InFlight {
    epoch: i16,
    first: i32,
    last: i32,
    answer: watch::Receiver<Answer>,
}

impl InFlight {
    fn answered(&self) -> bool {
        self.answer.borrow().is_some()
    }
}

/// The batches of idempotent producers this node handed to one group's raft and that raft has
/// not answered yet.
#[derive(Default)]
pub(crate) struct Sequencer {
    in_flight: BTreeMap<i64, VecDeque<InFlight>>,
    /// Producers tracked after the last sweep of answered batches: the next sweep comes when
    /// twice as many are, so stale entries cost amortised constant time.
    swept_at: usize,
    /// The term in which this node, as leader, applied everything its log held at the term's
    /// first check: from then on the table and `in_flight` together hold every batch.
    pub(crate) settled_term: Option<u64>,
}

fn refused(r: ProducerRefusal) -> Check {
    Check::Done(Err(AppendError::Producer(r)))
}

fn from_verdict(v: Verdict) -> Check {
    match v {
        Verdict::Append => Check::Append,
        Verdict::Duplicate { base_offset, next_offset } => Check::Done(Ok(Appended { base_offset, next_offset })),
        Verdict::OutOfOrder { expected } => refused(ProducerRefusal::OutOfOrder { expected }),
        Verdict::StaleDuplicate => refused(ProducerRefusal::StaleDuplicate),
        Verdict::Fenced { current } => refused(ProducerRefusal::Fenced { current }),
        Verdict::UnknownProducer => refused(ProducerRefusal::UnknownProducer),
        Verdict::Invalid(m) => Check::Done(Err(AppendError::Invalid(m.to_owned()))),
    }
}

impl Sequencer {
    /// Decides what to do with `batch`, given the applied `table` and the batches in flight.
    pub(crate) fn check(&mut self, table: &ProducerTable, batch: &Stamped) -> Check {
        let verdict = table.check(batch);
        if matches!(verdict, Verdict::Invalid(_)) {
            return from_verdict(verdict);
        }
        // Answered batches are in the table now (raft answers after applying) or were never
        // written (their leadership was lost before the commit).
        if let Some(queue) = self.in_flight.get_mut(&batch.producer_id) {
            queue.retain(|f| !f.answered());
            if queue.is_empty() {
                self.in_flight.remove(&batch.producer_id);
            }
        }
        let Some(last) = self.in_flight.get(&batch.producer_id).and_then(|q| q.back()) else {
            return from_verdict(verdict);
        };
        if batch.epoch < last.epoch {
            return refused(ProducerRefusal::Fenced { current: last.epoch });
        }
        let expected = next_sequence_after(last.last, 1);
        let queue = self.in_flight.get(&batch.producer_id).into_iter().flatten();
        for f in queue {
            if f.epoch == batch.epoch && f.first == batch.base_sequence {
                if f.last == batch_last_of(batch) {
                    return Check::SameAs(f.answer.clone());
                }
                // Same start, another length: not a retry of that batch, and not next either.
                return refused(ProducerRefusal::OutOfOrder { expected });
            }
        }
        if batch.epoch > last.epoch {
            // A new instance starts its sequence over.
            return if batch.base_sequence == 0 {
                Check::Append
            } else {
                refused(ProducerRefusal::OutOfOrder { expected: 0 })
            };
        }
        if batch.base_sequence == expected {
            return Check::Append;
        }
        // Neither next nor in flight: perhaps a batch the table remembers from before them.
        match verdict {
            v @ (Verdict::Duplicate { .. } | Verdict::StaleDuplicate | Verdict::Fenced { .. }) => from_verdict(v),
            _ => refused(ProducerRefusal::OutOfOrder { expected }),
        }
    }

    /// Notes a batch handed to raft, whose answer `answer` will carry.
    pub(crate) fn admitted(&mut self, batch: &Stamped, answer: watch::Receiver<Answer>) {
        let f = InFlight { epoch: batch.epoch, first: batch.base_sequence, last: batch_last_of(batch), answer };
        self.in_flight.entry(batch.producer_id).or_default().push_back(f);
        if self.in_flight.len() > 2 * self.swept_at + 64 {
            for queue in self.in_flight.values_mut() {
                queue.retain(|f| !f.answered());
            }
            self.in_flight.retain(|_, q| !q.is_empty());
            self.swept_at = self.in_flight.len();
        }
    }

    /// Producers with batches tracked (answered or not): for tests.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.in_flight.len()
    }
}

fn batch_last_of(batch: &Stamped) -> i32 {
    next_sequence_after(batch.base_sequence, batch.record_count.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use crate::producers::ProducerLimits;

    fn stamped(producer_id: i64, epoch: i16, base_sequence: i32, record_count: u32) -> Stamped {
        Stamped { producer_id, epoch, base_sequence, record_count, timestamp_ms: 1_000 }
    }

    /// Admits a batch the way `submit` does; returns the sender raft's answer would come through.
    fn admit(s: &mut Sequencer, batch: &Stamped) -> watch::Sender<Answer> {
        let (tx, rx) = watch::channel(None);
        s.admitted(batch, rx);
        tx
    }

    fn expect_append(s: &mut Sequencer, table: &ProducerTable, batch: &Stamped) {
        assert!(matches!(s.check(table, batch), Check::Append), "{batch:?} should be appended");
    }

    fn expect_refused(s: &mut Sequencer, table: &ProducerTable, batch: &Stamped, want: ProducerRefusal) {
        match s.check(table, batch) {
            Check::Done(Err(AppendError::Producer(r))) => assert_eq!(r, want, "{batch:?}"),
            other => panic!("{batch:?}: expected {want:?}, got {other:?}"),
        }
    }

    /// Raft applied the batch at `base` (the table learns it) and answered.
    fn applied(table: &mut ProducerTable, tx: &watch::Sender<Answer>, batch: &Stamped, base: u64) {
        let next = base + u64::from(batch.record_count);
        table.record(batch, base, next, &ProducerLimits::default());
        tx.send_replace(Some(Ok(Appended { base_offset: base, next_offset: next })));
    }

    #[test]
    fn a_retry_of_a_batch_in_flight_shares_its_answer_and_then_its_offsets() {
        let (mut s, mut table) = (Sequencer::default(), ProducerTable::default());
        let first = stamped(7, 0, 0, 10);
        expect_append(&mut s, &table, &first);
        let tx = admit(&mut s, &first);
        // The table does not know it yet; without the sequencer the retry would be written too.
        assert_eq!(table.check(&first), Verdict::Append);
        let Check::SameAs(rx) = s.check(&table, &first) else { panic!("a retry in flight waits for the first") };
        applied(&mut table, &tx, &first, 100);
        assert_eq!(*rx.borrow(), Some(Ok(Appended { base_offset: 100, next_offset: 110 })));
        match s.check(&table, &first) {
            Check::Done(Ok(a)) => assert_eq!(a, Appended { base_offset: 100, next_offset: 110 }),
            other => panic!("an applied retry answers with its offsets: {other:?}"),
        }
        assert_eq!(s.tracked(), 0, "answered batches are forgotten");
    }

    #[test]
    fn pipelined_batches_follow_the_ones_in_flight_and_gaps_are_refused() {
        let (mut s, table) = (Sequencer::default(), ProducerTable::default());
        let batches = [stamped(1, 0, 0, 10), stamped(1, 0, 10, 10), stamped(1, 0, 20, 10)];
        let mut senders = Vec::new();
        for b in &batches {
            expect_append(&mut s, &table, b);
            senders.push(admit(&mut s, b));
        }
        expect_refused(&mut s, &table, &stamped(1, 0, 40, 5), ProducerRefusal::OutOfOrder { expected: 30 });
        // Same start as one in flight, another length: not a retry of it.
        expect_refused(&mut s, &table, &stamped(1, 0, 10, 3), ProducerRefusal::OutOfOrder { expected: 30 });
        expect_append(&mut s, &table, &stamped(1, 0, 30, 1));
        // Another producer is unaffected.
        expect_append(&mut s, &table, &stamped(2, 0, 0, 1));
        assert!(matches!(s.check(&table, &batches[1]), Check::SameAs(_)));
    }

    #[test]
    fn a_batch_whose_leadership_was_lost_may_be_sent_again() {
        let (mut s, table) = (Sequencer::default(), ProducerTable::default());
        let b = stamped(3, 0, 0, 4);
        let tx = admit(&mut s, &b);
        tx.send_replace(Some(Err(AppendError::NotLeader { leader: None })));
        // Not applied, so not in the table: the resend is new (a later leader's blank entry
        // would have put it in the table had it been committed).
        expect_append(&mut s, &table, &b);
    }

    #[test]
    fn epochs_in_flight_fence_older_ones_and_restart_the_sequence() {
        let (mut s, mut table) = (Sequencer::default(), ProducerTable::default());
        let old = stamped(5, 0, 0, 3);
        let tx = admit(&mut s, &old);
        applied(&mut table, &tx, &old, 0);
        let new = stamped(5, 1, 0, 2);
        expect_append(&mut s, &table, &new);
        let _pending = admit(&mut s, &new);
        expect_refused(&mut s, &table, &stamped(5, 0, 3, 1), ProducerRefusal::Fenced { current: 1 });
        expect_refused(&mut s, &table, &stamped(5, 2, 7, 1), ProducerRefusal::OutOfOrder { expected: 0 });
        expect_append(&mut s, &table, &stamped(5, 1, 2, 1));
    }

    #[test]
    fn an_old_batch_behind_those_in_flight_is_answered_from_the_table() {
        let (mut s, mut table) = (Sequencer::default(), ProducerTable::default());
        let a = stamped(9, 0, 0, 5);
        let tx = admit(&mut s, &a);
        applied(&mut table, &tx, &a, 50);
        let b = stamped(9, 0, 5, 5);
        let _in_flight = admit(&mut s, &b);
        match s.check(&table, &a) {
            Check::Done(Ok(x)) => assert_eq!(x, Appended { base_offset: 50, next_offset: 55 }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answered_batches_of_silent_producers_are_swept() {
        let mut s = Sequencer::default();
        for id in 0..1_000 {
            let tx = admit(&mut s, &stamped(id, 0, 0, 1));
            tx.send_replace(Some(Ok(Appended { base_offset: 0, next_offset: 1 })));
        }
        assert!(s.tracked() < 200, "{} producers still tracked", s.tracked());
    }
}
