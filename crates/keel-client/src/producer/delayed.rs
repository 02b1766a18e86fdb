//! Delayed and scheduled records: sent with a delay or a deliver-at time to any node, which
//! hands them to the timer coordinator of their target partition; acknowledged once the schedule
//! is on a quorum's disks, and visible in the target no earlier than their time.

use std::time::Duration;

use keel_proto::v1 as pb;
use keel_proto::v1::producer_client::ProducerClient;

use super::{Producer, ProducerRecord};
use crate::error::ClientError;

/// Header of a delivered delayed record: its timer id (`<__delayed partition>-<offset>`).
pub const TIMER_ID_HEADER: &str = "keel-timer-id";
/// Header of a delivered delayed record: when it was due (ms since the Unix epoch).
pub const DELIVER_AT_HEADER: &str = "keel-deliver-at-ms";

/// When a delayed record becomes visible to consumers of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverAt {
    /// This long after the broker receives it.
    After(Duration),
    /// At this time (ms since the Unix epoch, by the cluster's clock).
    AtMs(i64),
}

impl Producer {
    /// Schedules `records` for one partition of `topic` (chosen like [`Producer::send`] chooses
    /// it for the first record), visible no earlier than `when`; returns one timer id per
    /// record, for [`Producer::cancel_delayed`]. Retries are safe: every attempt carries the same
    /// request token, so a schedule whose answer was lost is answered again, not repeated. An
    /// error for which [`ClientError::is_ambiguous`] holds may have scheduled them all the same.
    pub async fn send_delayed(
        &self,
        topic: &str,
        records: Vec<ProducerRecord>,
        when: DeliverAt,
    ) -> Result<Vec<String>, ClientError> {
        let first = records.first().ok_or_else(|| ClientError::InvalidArgument("no records to schedule".into()))?;
        let partition = self.partition_for(topic, first).await?;
        let core = &self.shared.core;
        let (deliver_at_ms, delay_ms) = match when {
            DeliverAt::After(d) => (None, Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
            DeliverAt::AtMs(at) => (Some(at), None),
        };
        let request = pb::ProduceRequest {
            topic: topic.to_owned(),
            partition,
            records: records
                .into_iter()
                .map(|r| pb::Record {
                    key: r.key,
                    value: r.value,
                    headers: r.headers.into_iter().map(|(key, value)| pb::Header { key, value }).collect(),
                    timestamp_ms: r.timestamp_ms,
                })
                .collect(),
            deliver_at_ms,
            delay_ms,
            // Never 0, which means "no token".
            request_token: core.random_u64() | 1,
            ..Default::default()
        };
        let answer = core
            .call_any("delayed produce", |channel| {
                let request = request.clone();
                async move { ProducerClient::new(channel).produce(request).await }
            })
            .await?;
        Ok(answer.timer_ids)
    }

    /// Cancels a delayed record before it is due; returns when it was due. A cancel repeated
    /// after its answer was lost succeeds again; once the record was delivered (or the id never
    /// named a timer) it is FAILED_PRECONDITION (`TIMER_NOT_PENDING`).
    pub async fn cancel_delayed(&self, timer_id: &str) -> Result<i64, ClientError> {
        let request = pb::CancelDelayedRequest { timer_id: timer_id.to_owned() };
        let answer = self
            .shared
            .core
            .call_any("cancel delayed", |channel| {
                let request = request.clone();
                async move { ProducerClient::new(channel).cancel_delayed(request).await }
            })
            .await?;
        Ok(answer.deliver_at_ms)
    }
}
