//! The membership part of the broker workload. In runs of five nodes (where a partition's three
//! replicas can go elsewhere), a mover moves the topic's partitions between the nodes all through
//! the safety phase, the way `keel partition move` does, under the same nemesis: leaders crash
//! mid-move, learners are cut off while they catch up. The checker then reads every partition
//! from the replicas the final metadata names, and the liveness phase requires every move to
//! have finished once the faults are healed.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_client::Admin;
use keel_raft::{GroupId, NodeId};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use keel_broker::Broker;

use crate::broker::{PARTITIONS, Shared, TOPIC, client_config, log, wait_topic};

/// A group's replicas and, mid-move, where it goes.
pub(crate) type Placement = (Vec<NodeId>, Option<Vec<NodeId>>);

/// Moves random partitions of the topic to random replica sets until `until` (simulated time
/// since the start); each request is logged with its outcome.
pub(crate) async fn mover_main(seed: u64, until: Duration, replication: u32, state: Shared) -> turmoil::Result {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    wait_topic(&state).await;
    let nodes = state.borrow().nodes;
    let admin = Admin::new(client_config(seed, nodes))?;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..6_000))).await;
        if turmoil::sim_elapsed().unwrap_or_default() >= until {
            return Ok(());
        }
        let partition = rng.random_range(0..PARTITIONS);
        let mut to: Vec<NodeId> = (1..=nodes).collect();
        to.shuffle(&mut rng);
        to.truncate(replication as usize);
        match admin.move_partition(TOPIC, partition, &to).await {
            Ok(p) if p.moving_to.is_empty() => log(&state, format!("mover: {TOPIC}/{partition} already on {to:?}")),
            Ok(p) => {
                log(&state, format!("mover: {TOPIC}/{partition} moves from {:?} to {to:?}", p.replicas));
                state.borrow_mut().moves += 1;
            }
            Err(e) => log(&state, format!("mover: {TOPIC}/{partition} to {to:?} refused: {e}")),
        }
    }
}

/// Every group's placement, from the most advanced metadata among the live brokers (`None`
/// while none is up).
pub(crate) fn placements(registry: &BTreeMap<NodeId, (u64, Broker)>) -> Option<BTreeMap<GroupId, Placement>> {
    let meta = registry.values().map(|(_, b)| b.metadata()).max_by_key(|m| m.applied_offset)?;
    let mut out = BTreeMap::new();
    for topic in meta.topics.values() {
        for p in &topic.partitions {
            out.insert(p.group, (p.replicas.clone(), p.target.clone()));
        }
    }
    Some(out)
}
