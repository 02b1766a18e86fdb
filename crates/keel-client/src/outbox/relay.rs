//! The transactional-outbox pattern over the user's own database: the business change and the
//! message to publish commit in one local transaction (a row in an outbox table), and
//! [`relay_once`] moves committed rows into the producer's durable outbox and deletes them.
//!
//! Exactly once across the two stores rests on a mark: rows are handed to the outbox together
//! with the highest row id among them, in the same flushed log frame
//! ([`crate::Producer::send_marked`]), so after any crash the outbox knows exactly which rows it
//! holds, and the relay deletes those rows instead of handing them over again. The contract the
//! store must keep: row ids only ever grow in commit order, so a row committed later never gets
//! an id at or below one already relayed. SQLite keeps it with `INTEGER PRIMARY KEY
//! AUTOINCREMENT` (ids are never reused) and its single writer (ids are assigned in commit
//! order); see the README's "Durable client outbox" section.

use crate::error::ClientError;
use crate::producer::{Producer, ProducerRecord};

/// A committed row of the user's outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The row id; ids grow in commit order.
    pub id: u64,
    /// The topic to publish to.
    pub topic: String,
    /// The record.
    pub record: ProducerRecord,
}

/// The user's outbox table (e.g. in SQLite), read and trimmed by [`relay_once`].
pub trait OutboxStore {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The committed rows with an id above `after`, in id order, at most `limit`.
    fn rows_after(&mut self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, Self::Error>;
    /// Deletes every row with an id up to `through` (they are in the producer's outbox).
    fn delete_through(&mut self, through: u64) -> Result<(), Self::Error>;
}

/// Why a relay step failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError<E: std::error::Error + 'static> {
    /// The user's store failed.
    #[error("outbox store: {0}")]
    Store(#[source] E),
    /// The producer (or its outbox) failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Moves at most `limit` committed rows from `store` into `producer`'s durable outbox (which
/// sends them) and deletes them from `store`; returns how many rows were moved. Call it in a
/// loop (after each local commit, or on a timer). The producer needs an outbox
/// ([`Producer::with_outbox`]).
pub async fn relay_once<S: OutboxStore>(
    producer: &Producer,
    store: &mut S,
    limit: usize,
) -> Result<usize, RelayError<S::Error>> {
    let Some(relayed) = producer.outbox_mark()? else {
        return relay_after(producer, store, 0, limit, false).await;
    };
    // Rows up to the mark are in the outbox already (a crash came between the hand-over and
    // the delete): deleted, never handed over twice.
    store.delete_through(relayed).map_err(RelayError::Store)?;
    relay_after(producer, store, relayed, limit, true).await
}

async fn relay_after<S: OutboxStore>(
    producer: &Producer,
    store: &mut S,
    after: u64,
    limit: usize,
    marked: bool,
) -> Result<usize, RelayError<S::Error>> {
    let rows = store.rows_after(after, limit).map_err(RelayError::Store)?;
    let rows: Vec<OutboxRow> = rows.into_iter().filter(|r| !marked || r.id > after).collect();
    let Some(last) = rows.iter().map(|r| r.id).max() else { return Ok(0) };
    if rows.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(RelayError::Client(ClientError::InvalidArgument(
            "outbox rows must come in increasing id order".into(),
        )));
    }
    let count = rows.len();
    // The futures are not awaited: the records are durable in the outbox once this returns.
    let _ = producer.send_marked(rows.into_iter().map(|r| (r.topic, r.record)).collect(), last).await?;
    store.delete_through(last).map_err(RelayError::Store)?;
    Ok(count)
}
