//! The event store port: appends, stream and global-log reads ([`LogQuery`]), the head signal,
//! and the checkpoints of consumer groups.

use crate::domain::stream::Partition;
use crate::domain::{AppendOutcome, AppendRequest, Category, RecordedEvent, StreamName};
use async_trait::async_trait;
use concord_kernel::StoreError;
use tokio::sync::watch;

/// One read of the global log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// Only events with a position strictly greater than this.
    pub after: u64,
    pub limit: usize,
    /// At most this many bytes of events (`data` and `metadata` as stored); always at least one
    /// event when any is there. `usize::MAX`: no byte budget.
    pub max_bytes: usize,
    pub category: Option<Category>,
    /// Only streams owned by this member of a consumer group.
    pub partition: Option<Partition>,
}

/// The event store: streams with optimistic concurrency and one global ordered log.
///
/// The log's guarantee: positions only grow, and an event becomes visible to readers only after
/// every event with a smaller position is visible. A reader that has seen position P and asks
/// for events after P therefore never misses one that commits later.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends atomically: all events of the request or none. Re-sending an append whose event ids
    /// are already stored answers the original outcome.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Reads a stream forward from `from` (a version, 1-based). [`StoreError::StreamNotFound`]
    /// when the stream has no events at all.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads the global log in position order.
    async fn read_log(&self, query: &LogQuery) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The highest position visible to readers now (0 when the log is empty).
    async fn head_position(&self) -> Result<u64, StoreError>;

    /// A signal that changes whenever new events may be visible, carrying the newest position this
    /// node knows of. Subscribers wait on it instead of polling; they still read from the store,
    /// so a missed or coalesced signal only delays, never skips.
    fn watch_head(&self) -> watch::Receiver<u64>;
}

/// Server-side checkpoints of consumer groups, one per (group, member).
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    async fn load_checkpoint(&self, group: &str, member: u32) -> Result<Option<u64>, StoreError>;
    async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), StoreError>;
}

/// The byte budget of [`LogQuery::max_bytes`] over rows an adapter streams from its database:
/// rows are taken one at a time, each measured by `size` (its `data` and `metadata` as stored)
/// and decoded by `decode` only once it fits; the first row always fits. Rows past the budget
/// are never decoded or kept.
///
/// # Errors
/// The first error of the stream, of `size` or of `decode`.
pub async fn collect_within<R, E>(
    mut rows: impl futures::Stream<Item = Result<R, E>> + Unpin,
    max_bytes: usize,
    size: impl Fn(&R) -> Result<usize, StoreError>,
    decode: impl Fn(&R) -> Result<RecordedEvent, StoreError>,
) -> Result<Vec<RecordedEvent>, StoreError>
where
    E: std::fmt::Display,
{
    use futures::TryStreamExt as _;
    let mut out = Vec::new();
    let mut used = 0usize;
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    {
        let bytes = size(&row)?;
        if !out.is_empty() && used.saturating_add(bytes) > max_bytes {
            break;
        }
        used = used.saturating_add(bytes);
        out.push(decode(&row)?);
    }
    Ok(out)
}
