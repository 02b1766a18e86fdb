//! Issue 12 item 13, one-way cut: a partition leader whose messages to its followers are all
//! lost, while the producer still reaches every node. Produce stalled for the whole cut (the
//! client kept asking the cut leader, which could neither commit nor tell it who could). Now it
//! must resume at the new leader within a few election timeouts and the client's request
//! timeout, with nothing acknowledged lost and no election forced when the cut heals.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use keel_simulation::{Workload, run};

/// Seeds 2 and 6 stalled for the whole cut before the fix (a single seed takes ~3 s of CPU).
#[test]
fn produce_moves_off_a_leader_cut_off_one_way() {
    for seed in [2, 6] {
        let report = run(Workload::OneWayCut, seed);
        assert!(report.violation.is_none(), "{report}: {:?}\nlast events: {:#?}", report.violation, report.tail);
    }
}
