//! Consumer-group series of the `/metrics` scrape (README, "Consumer lag and status"): lag in
//! records and seconds and the consumer status of every group this node coordinates, per group
//! always, and per (group, partition) only while there are fewer such pairs on the node than
//! `metrics_partition_series_max`. Only the active coordinator of a group exports it, so a sum
//! or max across nodes counts each group once.
//!
//! A status is a gauge per status name (`status="OK"` … `status="REWIND"`), 1 for the current
//! one and 0 for the others: an alert reads `keel_group_status{status="STOP"} == 1`, and the
//! series of a group never appear and disappear as its status changes.

use std::sync::atomic::AtomicU64;

use keel_coordinator::groups::ConsumerStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::lag::GroupLag;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupStatusLabels {
    group: String,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupPartitionLabels {
    group: String,
    topic: String,
    partition: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupPartitionStatusLabels {
    group: String,
    topic: String,
    partition: u32,
    status: &'static str,
}

type Seconds = Gauge<f64, AtomicU64>;

/// The consumer-group families, refilled at every scrape.
#[derive(Default)]
pub(crate) struct GroupGauges {
    coordinated: Gauge,
    partition_series_exported: Gauge,
    lag_records: Family<GroupLabels, Gauge>,
    lag_seconds: Family<GroupLabels, Seconds>,
    status: Family<GroupStatusLabels, Gauge>,
    partition_lag_records: Family<GroupPartitionLabels, Gauge>,
    partition_lag_seconds: Family<GroupPartitionLabels, Seconds>,
    partition_status: Family<GroupPartitionStatusLabels, Gauge>,
}

impl GroupGauges {
    /// Registers every family in `r` (prefixed `keel_` by the registry).
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register("groups_coordinated", "Consumer groups this node coordinates now", self.coordinated.clone());
        r.register(
            "group_partition_series_exported",
            "1 while per-partition group series are exported, 0 once the groups coordinated here have metrics_partition_series_max partitions or more",
            self.partition_series_exported.clone(),
        );
        r.register(
            "group_lag_records",
            "Records the group has not consumed, over its partitions (high watermark minus committed offset)",
            self.lag_records.clone(),
        );
        r.register_with_unit(
            "group_lag",
            "Age of the oldest record the group has not consumed, over its partitions whose age is known",
            Unit::Seconds,
            self.lag_seconds.clone(),
        );
        r.register(
            "group_status",
            "1 for the group's consumer status (the worst of its partitions: OK, WARN, REWIND, STALL, STOP), 0 for the others",
            self.status.clone(),
        );
        r.register(
            "group_partition_lag_records",
            "Records of the partition the group has not consumed",
            self.partition_lag_records.clone(),
        );
        r.register_with_unit(
            "group_partition_lag",
            "Age of the oldest record of the partition the group has not consumed (absent while unknown)",
            Unit::Seconds,
            self.partition_lag_seconds.clone(),
        );
        r.register(
            "group_partition_status",
            "1 for the group's consumer status on the partition, 0 for the others",
            self.partition_status.clone(),
        );
    }

    /// Replaces every series with those of `groups` (the groups coordinated here now).
    pub(crate) fn refresh(&self, groups: &[(String, GroupLag)], partition_series_max: usize) {
        self.lag_records.clear();
        self.lag_seconds.clear();
        self.status.clear();
        self.partition_lag_records.clear();
        self.partition_lag_seconds.clear();
        self.partition_status.clear();
        let pairs: usize = groups.iter().map(|(_, lag)| lag.partitions.len()).sum();
        let per_partition = pairs < partition_series_max;
        self.coordinated.set(i64::try_from(groups.len()).unwrap_or(i64::MAX));
        self.partition_series_exported.set(i64::from(per_partition));
        for (name, lag) in groups {
            let g = GroupLabels { group: name.clone() };
            self.lag_records.get_or_create(&g).set(i64::try_from(lag.total_lag_records).unwrap_or(i64::MAX));
            self.lag_seconds.get_or_create(&g).set(lag.max_lag_seconds.unwrap_or(0.0));
            for status in ConsumerStatus::ALL {
                let labels = GroupStatusLabels { group: name.clone(), status: status.name() };
                self.status.get_or_create(&labels).set(i64::from(status == lag.status));
            }
            if !per_partition {
                continue;
            }
            for p in &lag.partitions {
                let labels =
                    GroupPartitionLabels { group: name.clone(), topic: p.tp.topic.clone(), partition: p.tp.partition };
                self.partition_lag_records.get_or_create(&labels).set(i64::try_from(p.lag_records).unwrap_or(i64::MAX));
                if let Some(seconds) = p.lag_seconds {
                    self.partition_lag_seconds.get_or_create(&labels).set(seconds);
                }
                for status in ConsumerStatus::ALL {
                    let labels = GroupPartitionStatusLabels {
                        group: name.clone(),
                        topic: p.tp.topic.clone(),
                        partition: p.tp.partition,
                        status: status.name(),
                    };
                    self.partition_status.get_or_create(&labels).set(i64::from(status == p.status));
                }
            }
        }
    }
}
