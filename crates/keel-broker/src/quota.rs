//! Per-principal byte-rate quotas for produce and fetch, per node (as Kafka's are per broker).
//! A principal may go into debt by one request (a batch larger than a second's allowance still
//! passes an idle bucket); while in debt its next request is refused with RESOURCE_EXHAUSTED and
//! a `RetryInfo` saying when the debt is paid off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Principals whose buckets a node keeps; beyond, idle buckets (full ones) are forgotten first,
/// and then every bucket (a principal that loses its debt this way gets a fresh second).
const BUCKETS_MAX: usize = 10_000;

/// Which quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes produced (request size).
    Produce,
    /// Bytes fetched (response size).
    Fetch,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Bytes available; negative is debt.
    tokens: f64,
    at: Instant,
}

/// The buckets of one node.
#[derive(Debug)]
pub struct Quotas {
    produce: Option<u64>,
    fetch: Option<u64>,
    buckets: Mutex<HashMap<(String, Direction), Bucket>>,
}

impl Quotas {
    /// Quotas of `produce` and `fetch` bytes per second per principal (`None`: unlimited).
    pub fn new(produce: Option<u64>, fetch: Option<u64>) -> Quotas {
        Quotas {
            produce: produce.filter(|r| *r > 0),
            fetch: fetch.filter(|r| *r > 0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn rate(&self, direction: Direction) -> Option<u64> {
        match direction {
            Direction::Produce => self.produce,
            Direction::Fetch => self.fetch,
        }
    }

    /// `Err(wait)` while `principal` is in debt for `direction`: how long until it is not.
    pub fn check(&self, principal: &str, direction: Direction, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate(direction) else { return Ok(()) };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bucket) = buckets.get_mut(&(principal.to_owned(), direction)) else { return Ok(()) };
        refill(bucket, rate, now);
        if bucket.tokens >= 0.0 { Ok(()) } else { Err(Duration::from_secs_f64(-bucket.tokens / rate as f64)) }
    }

    /// Takes `bytes` from `principal`'s bucket (possibly into debt).
    pub fn charge(&self, principal: &str, direction: Direction, bytes: u64, now: Instant) {
        let Some(rate) = self.rate(direction) else { return };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(&(principal.to_owned(), direction)) {
            buckets.retain(|(_, d), b| {
                let rate = self.rate(*d).unwrap_or(1);
                refill(b, rate, now);
                b.tokens < rate as f64
            });
            if buckets.len() >= BUCKETS_MAX {
                buckets.clear();
            }
        }
        let bucket =
            buckets.entry((principal.to_owned(), direction)).or_insert(Bucket { tokens: rate as f64, at: now });
        refill(bucket, rate, now);
        bucket.tokens -= bytes as f64;
    }
}

/// Adds what `rate` earned since the bucket was last seen, up to one second's worth.
fn refill(bucket: &mut Bucket, rate: u64, now: Instant) {
    let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * rate as f64;
    bucket.tokens = (bucket.tokens + earned).min(rate as f64);
    bucket.at = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_in_debt_waits_until_it_is_paid() {
        let quotas = Quotas::new(Some(1_000), None);
        let t0 = Instant::now();
        assert_eq!(quotas.check("alice", Direction::Produce, t0), Ok(()));
        // One request may overdraw: 2,500 bytes from a full bucket of 1,000.
        quotas.charge("alice", Direction::Produce, 2_500, t0);
        assert_eq!(quotas.check("alice", Direction::Produce, t0), Err(Duration::from_millis(1_500)));
        assert_eq!(quotas.check("bob", Direction::Produce, t0), Ok(()), "buckets are per principal");
        assert_eq!(quotas.check("alice", Direction::Fetch, t0), Ok(()), "fetch is unlimited here");
        let later = t0 + Duration::from_millis(1_500);
        assert_eq!(quotas.check("alice", Direction::Produce, later), Ok(()));
        // Idle time earns at most one second's allowance.
        let much_later = later + Duration::from_secs(60);
        quotas.charge("alice", Direction::Produce, 1_001, much_later);
        assert!(quotas.check("alice", Direction::Produce, much_later).is_err());
    }
}
