//! A node's block of producer ids: `InitProducerId` takes the next one, and an empty block is
//! refilled from the controller (which records every block in `__meta`), one allocation at a time
//! however many calls wait for it. The allocation itself is a parameter, so this is tested
//! without a cluster.
//!
//! The block lives only in memory: ids a node did not hand out before it stopped are never
//! handed out at all. That wastes at most one block per restart of a 63-bit space, and it spares
//! the node a disk write per id (a durable cursor would be the only way to reuse them safely).

use std::future::Future;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Status;

/// How many producer ids a node asks the controller for at once: one `__meta` record per this
/// many `InitProducerId` calls.
pub const PRODUCER_ID_BLOCK: u32 = 1_000;

/// The ids this node may still hand out, and the refill that fetches the next block.
pub(crate) struct ProducerIds {
    /// Ids not handed out yet; empty when a refill is due.
    ids: Mutex<Range<i64>>,
    /// Held for the length of one refill, so that there is one at a time. It keeps the failure
    /// of the last refill, which the calls that waited for that refill share instead of each
    /// starting one of their own (30 waiters on a dead controller would otherwise wait 30 times).
    refill: tokio::sync::Mutex<Option<Status>>,
    /// Refills finished so far: a call that sees it move while it waited knows one ran for it.
    refills: AtomicU64,
}

impl ProducerIds {
    /// No ids yet: the first call allocates a block.
    pub(crate) fn new() -> ProducerIds {
        ProducerIds { ids: Mutex::new(0..0), refill: tokio::sync::Mutex::new(None), refills: AtomicU64::new(0) }
    }

    fn take(&self) -> Option<i64> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).next()
    }

    /// The next id, refilling the block with `allocate` first when it is empty. Each id is
    /// returned once. A failed allocation fails this call and every call that waited for it.
    pub(crate) async fn next<F, Fut>(&self, allocate: F) -> Result<i64, Status>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Range<i64>, Status>>,
    {
        if let Some(id) = self.take() {
            return Ok(id);
        }
        let refills = self.refills.load(Ordering::Acquire);
        let mut last_failure = self.refill.lock().await;
        if let Some(id) = self.take() {
            return Ok(id);
        }
        if self.refills.load(Ordering::Acquire) != refills
            && let Some(status) = &*last_failure
        {
            return Err(status.clone());
        }
        // A caller that goes away here drops the allocation: its block (if it was allocated after
        // all) is lost, which is allowed; the next caller allocates another.
        let outcome = allocate().await.and_then(|block| {
            if block.is_empty() || block.start < 0 {
                return Err(Status::internal(format!("the controller allocated an invalid id block {block:?}")));
            }
            Ok(block)
        });
        self.refills.fetch_add(1, Ordering::Release);
        match outcome {
            Ok(mut block) => {
                let id = block.next();
                *self.ids.lock().unwrap_or_else(|e| e.into_inner()) = block;
                *last_failure = None;
                id.ok_or_else(|| Status::internal("an allocated id block was empty"))
            }
            Err(status) => {
                *last_failure = Some(status.clone());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;
    use std::time::Duration;

    use super::*;

    /// A controller that hands out blocks of `size` from 0 after a delay, counting its calls.
    struct Controller {
        next: AtomicI64,
        calls: AtomicU64,
        size: i64,
        fail: bool,
    }

    impl Controller {
        fn new(size: i64, fail: bool) -> Arc<Controller> {
            Arc::new(Controller { next: AtomicI64::new(0), calls: AtomicU64::new(0), size, fail })
        }

        async fn allocate(&self) -> Result<Range<i64>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.fail {
                return Err(Status::unavailable("no controller"));
            }
            let first = self.next.fetch_add(self.size, Ordering::SeqCst);
            Ok(first..first + self.size)
        }
    }

    /// Concurrent calls on an empty block wait for one allocation and then share its ids.
    #[tokio::test]
    async fn concurrent_calls_share_one_allocation() {
        let ids = Arc::new(ProducerIds::new());
        let controller = Controller::new(10, false);
        let calls = (0..25).map(|_| {
            let (ids, controller) = (Arc::clone(&ids), Arc::clone(&controller));
            tokio::spawn(async move { ids.next(|| controller.allocate()).await.unwrap() })
        });
        let got: Vec<i64> = futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();
        let distinct: BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(distinct, (0..25).collect(), "each id once, blocks used up before the next");
        assert_eq!(controller.calls.load(Ordering::SeqCst), 3, "one allocation per block of 10");
    }

    /// A failed allocation fails the calls that waited for it without a second attempt; the
    /// next call tries again.
    #[tokio::test]
    async fn waiters_share_a_failure() {
        let ids = Arc::new(ProducerIds::new());
        let down = Controller::new(10, true);
        let calls = (0..5).map(|_| {
            let (ids, down) = (Arc::clone(&ids), Arc::clone(&down));
            tokio::spawn(async move { ids.next(|| down.allocate()).await })
        });
        for result in futures_util::future::join_all(calls).await {
            assert_eq!(result.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
        }
        assert_eq!(down.calls.load(Ordering::SeqCst), 1);
        let up = Controller::new(10, false);
        assert_eq!(ids.next(|| up.allocate()).await.unwrap(), 0);
        assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalid_blocks_are_refused() {
        let ids = ProducerIds::new();
        for block in [5..5, -3..4] {
            let refused = ids.next(|| async move { Ok(block) }).await;
            assert_eq!(refused.unwrap_err().code(), tonic::Code::Internal);
        }
        assert_eq!(ids.next(|| async { Ok(7..9) }).await.unwrap(), 7);
        assert_eq!(ids.next(|| async { Ok(100..200) }).await.unwrap(), 8);
        assert_eq!(ids.next(|| async { Ok(100..200) }).await.unwrap(), 100);
    }
}
