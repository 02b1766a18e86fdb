//! The membership part of the broker workload. In runs of five nodes (where a partition's three
//! replicas can go elsewhere), a mover moves the topic's partitions between the nodes all through
//! the safety phase, the way `keel partition move` does, under the same nemesis: leaders crash
//! mid-move, learners are cut off while they catch up. The checker then reads every partition
//! from the replicas the final metadata names, and the liveness phase requires every move to
//! have finished once the faults are healed. Once a run, the mover has a node (a metadata voter
//! or not) lose its disk and replaces it (`keel node replace`): every copy it held, `__meta`'s
//! included, is rebuilt by the groups' leaders, which the checker then reads like any other
//! replica. Once a run it decommissions a node (`keel node decommission`): the controller moves
//! every partition, and its vote in the metadata, off it, and moves onto it are refused from then
//! on. And twice a run it changes the metadata voters (three or five of the nodes).

use std::collections::BTreeMap;
use std::time::Duration;

use keel_client::Admin;
use keel_raft::{GroupId, NodeId};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use keel_broker::{Broker, META_TOPIC};

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
    let last = until.as_secs().saturating_sub(30).max(16);
    let mut lose_disk_at = Some(Duration::from_secs(rng.random_range(15..last)));
    let mut decommission_at = Some(Duration::from_secs(rng.random_range(10..last)));
    let mut voters_at: Vec<Duration> = (0..2).map(|_| Duration::from_secs(rng.random_range(5..last))).collect();
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..6_000))).await;
        let now = turmoil::sim_elapsed().unwrap_or_default();
        if now >= until {
            return Ok(());
        }
        if decommission_at.is_some_and(|at| now >= at) {
            decommission_at = None;
            let leaving = rng.random_range(1..=nodes);
            match admin.decommission_node(leaving).await {
                Ok(partitions) => {
                    log(&state, format!("mover: n{leaving} decommissioned; moving off {partitions:?}"));
                    state.borrow_mut().moves += partitions.len() as u64;
                }
                Err(e) => log(&state, format!("mover: decommissioning n{leaving} refused: {e}")),
            }
            continue;
        }
        if lose_disk_at.is_some_and(|at| now >= at) {
            lose_disk_at = None;
            // Any node, a metadata voter included: its copy of `__meta` is replaced too.
            let victim = rng.random_range(1..=nodes);
            lose_and_replace(&admin, &state, victim).await;
            continue;
        }
        if let Some(i) = voters_at.iter().position(|at| now >= *at) {
            voters_at.remove(i);
            // Three or five voters, any of the nodes (a decommissioned one is refused).
            let mut to: Vec<NodeId> = (1..=nodes).collect();
            to.shuffle(&mut rng);
            to.truncate(if rng.random_bool(0.5) { 3 } else { 5 });
            match admin.move_partition(META_TOPIC, 0, &to).await {
                Ok(p) => {
                    log(&state, format!("mover: the metadata voters go from {:?} to {to:?}", p.replicas));
                    state.borrow_mut().moves += 1;
                }
                Err(e) => log(&state, format!("mover: metadata voters {to:?} refused: {e}")),
            }
            continue;
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

/// Has the driver wipe `victim`'s disk (while it runs), then replaces it until the cluster
/// accepts: its partitions are then rebuilt on it.
async fn lose_and_replace(admin: &Admin, state: &Shared, victim: NodeId) {
    state.borrow_mut().lose_disk = Some(victim);
    log(state, format!("mover: n{victim} is to lose its disk"));
    // The driver acts between steps of the safety phase, once the node runs.
    while state.borrow().lose_disk.is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..60 {
        match admin.replace_node(victim).await {
            Ok(partitions) => {
                log(state, format!("mover: n{victim} replaced; rebuilding {partitions:?}"));
                state.borrow_mut().moves += partitions.len() as u64;
                return;
            }
            Err(e) => log(state, format!("mover: replacing n{victim} refused: {e}")),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What decommissioned nodes still hold (they must end up holding nothing), from the most
/// advanced metadata among the live brokers.
pub(crate) fn left_on_decommissioned(registry: &BTreeMap<NodeId, (u64, Broker)>) -> Vec<String> {
    let Some(meta) = registry.values().map(|(_, b)| b.metadata()).max_by_key(|m| m.applied_offset) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (id, _) in meta.nodes.iter().filter(|(_, n)| n.decommissioned) {
        for (name, topic) in &meta.topics {
            for (i, p) in topic.partitions.iter().enumerate() {
                if p.hosts().any(|n| n == *id) {
                    out.push(format!("n{id} is decommissioned but still holds {name}/{i}"));
                }
            }
        }
        // Unless it is one of three voters and no other active node is free to take its place.
        let stuck = meta.controller.as_ref().is_some_and(|c| {
            let free = meta.nodes.iter().any(|(n, i)| !i.decommissioned && !c.hosts().any(|h| h == *n));
            c.replicas.iter().filter(|n| !meta.nodes.get(n).is_some_and(|i| i.decommissioned)).count() < 3 && !free
        });
        if meta.hosts_meta(*id) == Some(true) && !stuck {
            out.push(format!("n{id} is decommissioned but still votes in the metadata"));
        }
    }
    out
}

/// Every group's placement, from the most advanced metadata among the live brokers (`None`
/// while none is up).
pub(crate) fn placements(registry: &BTreeMap<NodeId, (u64, Broker)>) -> Option<BTreeMap<GroupId, Placement>> {
    let meta = registry.values().map(|(_, b)| b.metadata()).max_by_key(|m| m.applied_offset)?;
    let mut out = BTreeMap::new();
    // The metadata's own group too, once its voters are recorded (they move like replicas).
    for (_, _, p) in meta.all_partitions() {
        out.insert(p.group, (p.replicas.clone(), p.target.clone()));
    }
    Some(out)
}
