//! The traits use cases need from the outside world. Adapters (SQLite, PostgreSQL, ...) implement
//! them and prove it by running the conformance suites of [`crate::testkit`].

use crate::domain::stream::Partition;
use crate::domain::{
    ApiKeyRecord, AppendOutcome, AppendRequest, Category, ExpectedVersion, Fingerprint, IdempotencyKey, KeyHash,
    RecordedEvent, StreamName,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

/// Failures of a store. Each variant's doc says what a caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version; re-read it, decide again, retry.
    #[error("stream {stream} is at version {current}, expected {expected}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        current: u64,
    },
    /// An event id of the append already exists but not as this exact append; use fresh ids.
    #[error("event id {0} already exists elsewhere")]
    EventIdConflict(Uuid),
    /// The stream has no events.
    #[error("stream {0} not found")]
    StreamNotFound(String),
    /// The database failed or is unreachable; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// One read of the global log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// Only events with a position strictly greater than this.
    pub after: u64,
    pub limit: usize,
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
    async fn read_stream(&self, stream: &StreamName, from: u64, limit: usize)
    -> Result<Vec<RecordedEvent>, StoreError>;

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

/// API keys, stored by hash.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a key; a key with the same hash is left as it is (bootstrap is idempotent).
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// The live (not revoked) key with this hash.
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Revokes a key; false when no live key had this id.
    async fn revoke_key(&self, id: Uuid) -> Result<bool, StoreError>;
    /// Number of live keys carrying `admin`.
    async fn count_admin_keys(&self) -> Result<u64, StoreError>;
}

/// A response kept for replay under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// What to do with a request that carries an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// This request holds the key now: run it, then `complete` or `release`.
    Started,
    /// The same request already completed: answer its stored response.
    Replay(StoredResponse),
    /// The key was used with a different request.
    Mismatch,
    /// The first request with this key is still running.
    InFlight,
}

/// One idempotency key of one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim<'a> {
    pub owner: Uuid,
    pub key: &'a IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub now: DateTime<Utc>,
    /// Until when this claim's in-flight record holds the key; after it, another request may
    /// take the key over, since a holder that has not finished by then has died.
    pub locked_until: DateTime<Utc>,
    /// When a completed record stops being replayed.
    pub expires_at: DateTime<Utc>,
}

/// Records of idempotency keys, scoped per owner (the API key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims the key atomically, even across nodes.
    async fn begin(&self, claim: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError>;
    /// Stores the response of the request that holds the key.
    ///
    /// Only the claim that still holds the key is heard: after a takeover, a late first holder
    /// neither overwrites nor releases the new holder's record (the claim is the fencing token).
    async fn complete(&self, claim: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), StoreError>;
    /// Gives the key up without a response (the request failed in a way worth retrying).
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), StoreError>;
    /// Deletes records past their expiry; returns how many.
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}
