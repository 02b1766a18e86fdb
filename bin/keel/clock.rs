//! The production shell's door to time. Everything below the binary takes time as a parameter
//! (STYLE.md rule 3); only here may the real clocks be read.

use std::time::{Duration, Instant};

/// A monotonic stopwatch.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts now.
    #[allow(clippy::disallowed_methods)] // The production shell owns the clock.
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    /// Time since start.
    #[allow(clippy::disallowed_methods)] // The production shell owns the clock.
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Wall-clock time for record timestamps and retention.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl keel_broker::Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The production shell owns the clock.
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// Production randomness (election timeouts, the cluster id, client jitter): from the clock and
/// the pid, unlike the simulation, which hands every node and client a seed.
#[allow(clippy::disallowed_methods)] // The production shell owns the clock and the entropy.
pub fn entropy() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}
