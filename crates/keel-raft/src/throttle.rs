//! The catch-up throttle: a node-wide budget, in bytes per second, for the log a leader sends to
//! replicas a move brings in (learners catching up, and the blank copies `keel node replace`
//! rebuilds). A partition of gigabytes would otherwise be streamed as fast as the network and
//! disks allow, and the producers of every other partition on those nodes would pay for it.
//! Replication to voters is never throttled: their acknowledgements are the commit point.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{GroupId, NodeId};

/// The default budget: 100 MiB/s, what one move may take of a node's disk and network.
pub const CATCH_UP_BYTES_PER_SEC_DEFAULT: u64 = 100 * 1024 * 1024;

/// A token bucket shared by every throttled (group, target) pair of one node.
#[derive(Clone, Default)]
pub struct CatchUpThrottle {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Bytes per second; 0: unthrottled.
    rate: u64,
    /// Tokens (bytes) left; negative while sends are waiting for theirs.
    tokens: f64,
    refilled: Option<tokio::time::Instant>,
    /// Pairs under throttle, with how many guards hold each.
    throttled: BTreeMap<(GroupId, NodeId), usize>,
}

/// Keeps a (group, target) pair throttled until dropped.
pub struct Throttled {
    throttle: CatchUpThrottle,
    key: (GroupId, NodeId),
}

impl Drop for Throttled {
    fn drop(&mut self) {
        let mut inner = self.throttle.lock();
        if let Some(count) = inner.throttled.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                inner.throttled.remove(&self.key);
            }
        }
    }
}

impl CatchUpThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the budget in bytes per second (0: unthrottled).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut inner = self.lock();
        inner.rate = bytes_per_sec;
        inner.tokens = inner.tokens.min(bytes_per_sec as f64);
    }

    /// Throttles what this node sends `target` for `group` while the guard lives.
    pub fn throttle(&self, group: GroupId, target: NodeId) -> Throttled {
        *self.lock().throttled.entry((group, target)).or_default() += 1;
        Throttled { throttle: self.clone(), key: (group, target) }
    }

    /// Waits until `bytes` for `target` in `group` fit the budget (at once when the pair is not
    /// throttled): for what the bucket lacks, and for what sends before it took on credit, so
    /// sends go in the order they came and the average stays at the rate. A bucket holds at
    /// most a second's budget.
    pub async fn admit(&self, group: GroupId, target: NodeId, bytes: usize) {
        let wait = {
            let mut inner = self.lock();
            if inner.rate == 0 || !inner.throttled.contains_key(&(group, target)) {
                return;
            }
            let rate = inner.rate as f64;
            let now = tokio::time::Instant::now();
            let elapsed = inner.refilled.map_or(1.0, |t| now.duration_since(t).as_secs_f64());
            inner.tokens = (inner.tokens + elapsed * rate).min(rate);
            inner.refilled = Some(now);
            let short = (bytes as f64 - inner.tokens.max(0.0)).max(0.0);
            // Waiting for the debt of earlier sends too: first come, first served.
            let debt = (-inner.tokens).max(0.0);
            inner.tokens -= bytes as f64;
            Duration::from_secs_f64((short + debt).min(rate * 3_600.0) / rate)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttled_sends_average_the_rate_and_others_pass() {
        let throttle = CatchUpThrottle::default();
        throttle.set_rate(1_000);
        let start = tokio::time::Instant::now();
        // Not throttled: at once, whatever the size.
        throttle.admit(1, 2, 1_000_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        {
            let _guard = throttle.throttle(1, 2);
            // A full bucket's worth goes at once; the next three seconds' worth waits for them.
            throttle.admit(1, 2, 1_000).await;
            assert_eq!(start.elapsed(), Duration::ZERO);
            for _ in 0..3 {
                throttle.admit(1, 2, 1_000).await;
            }
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(2_990) && took <= Duration::from_millis(3_010), "{took:?}");
            // Another group's traffic to the same node is not under this throttle.
            throttle.admit(7, 2, 1_000_000).await;
            assert_eq!(start.elapsed(), took);
        }
        // The guard gone, the pair is free again.
        let before = tokio::time::Instant::now();
        throttle.admit(1, 2, 1_000_000).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_larger_than_the_bucket_waits_for_its_share() {
        let throttle = CatchUpThrottle::default();
        throttle.set_rate(1_000);
        let _guard = throttle.throttle(1, 2);
        let start = tokio::time::Instant::now();
        throttle.admit(1, 2, 5_000).await;
        let first = start.elapsed();
        assert!(first >= Duration::from_millis(3_990) && first <= Duration::from_millis(4_010), "{first:?}");
        throttle.admit(1, 2, 1).await;
        assert!(start.elapsed() - first < Duration::from_millis(20), "the debt was paid by the wait");
        // Unthrottled at rate 0.
        throttle.set_rate(0);
        let before = tokio::time::Instant::now();
        throttle.admit(1, 2, 1_000_000).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
