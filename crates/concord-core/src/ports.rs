//! The traits use cases need from the outside world. Adapters (SQLite, PostgreSQL, ...) implement
//! them and prove it by running the conformance suites of [`crate::testkit`].

use crate::domain::saga::SagaStatus;
use crate::domain::stream::Partition;
use crate::domain::tx::Outcome;
use crate::domain::vault::{Sealed, TokenType};
use crate::domain::{ApiKeyRecord, AppendOutcome, AppendRequest, Category, KeyHash, RecordedEvent, StreamName};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

// The ports the services share with the server live in the shared kernel.
pub use concord_kernel::StoreError;
pub use concord_kernel::broker::{Broker, BrokerConsumer, BrokerError, BrokerMessage, Delivery};
pub use concord_kernel::idempotency::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoredResponse};

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

/// One stored version of a saga definition: the spec as the user wrote it, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    pub name: String,
    pub version: u32,
    pub spec: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// A saga's row: the read model of its log (status, for listing) and its place in the work queue
/// (when it is due, who holds it).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    pub id: String,
    pub definition: String,
    pub version: u32,
    pub input: serde_json::Value,
    pub status: SagaStatus,
    /// When a runner should look at it next; none when nothing will run on its own.
    pub next_run_at: Option<DateTime<Utc>>,
    /// The node working on it, until `lease_until`; after that any node may take it over.
    pub lease_owner: Option<Uuid>,
    pub lease_until: Option<DateTime<Utc>>,
    /// How many log events the row reflects.
    pub log_version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A change to a saga's row by the node that holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaUpdate<'a> {
    pub id: &'a str,
    /// Applied only while the row's lease owner is this (none: only while nobody holds it).
    pub holder: Option<Uuid>,
    pub status: SagaStatus,
    pub next_run_at: Option<DateTime<Utc>>,
    /// The new lease; none releases it.
    pub lease: Option<(Uuid, DateTime<Utc>)>,
    /// Applied only if not older than what the row reflects.
    pub log_version: u64,
    pub now: DateTime<Utc>,
}

/// Saga definitions and saga rows. The saga log itself lives in the [`EventStore`].
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Stores a new version of a definition, unless the spec equals the latest version's; returns
    /// the version and whether it is new. Concurrent puts get distinct versions.
    async fn put_definition(
        &self,
        name: &str,
        spec: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<(u32, bool), StoreError>;
    /// A version of a definition, or its latest.
    async fn get_definition(&self, name: &str, version: Option<u32>) -> Result<Option<StoredDefinition>, StoreError>;
    /// Inserts a saga's row unless one with its id exists; returns the stored row and whether
    /// it is new.
    async fn create_saga(&self, row: &SagaRow) -> Result<(SagaRow, bool), StoreError>;
    async fn get_saga(&self, id: &str) -> Result<Option<SagaRow>, StoreError>;
    /// Rows in id order after `after`, optionally of one status.
    async fn list_sagas(
        &self,
        status: Option<SagaStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError>;
    /// Takes up to `limit` rows that are due (`next_run_at <= now`) and not held by a live lease,
    /// leasing them to `owner` until `lease_until`. Two concurrent claims never take the same row.
    async fn claim_sagas(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError>;
    /// Applies an update if its conditions hold; false when they did not (the lease was lost).
    async fn update_saga(&self, update: &SagaUpdate<'_>) -> Result<bool, StoreError>;
    /// How many rows have each status.
    async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError>;
}

/// A two-phase-commit transaction's row: the read model of its log (`tx-{xid}`) and its place in
/// the coordinator's work queue.
#[derive(Debug, Clone, PartialEq)]
pub struct TxRow {
    pub xid: String,
    /// The logged decision; none while phase 1 runs.
    pub outcome: Option<Outcome>,
    /// True until every participant acknowledged phase 2.
    pub pending: bool,
    /// When a coordinator should look at it next; none when nothing is left to do.
    pub next_run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<Uuid>,
    pub lease_until: Option<DateTime<Utc>>,
    pub log_version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A change to a transaction's row by the node that holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct TxUpdate<'a> {
    pub xid: &'a str,
    /// Applied only while the row's lease owner is this (none: only while nobody holds it).
    pub holder: Option<Uuid>,
    pub outcome: Option<Outcome>,
    pub pending: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    /// The new lease; none releases it.
    pub lease: Option<(Uuid, DateTime<Utc>)>,
    /// Applied only if not older than what the row reflects.
    pub log_version: u64,
    pub now: DateTime<Utc>,
}

/// Transaction rows of the 2PC coordinator. The log itself lives in the [`EventStore`].
#[async_trait]
pub trait TxStore: Send + Sync + 'static {
    /// Inserts a new row; an existing xid is an [`StoreError::Unavailable`] (xids are generated).
    async fn create_tx(&self, row: &TxRow) -> Result<(), StoreError>;
    async fn get_tx(&self, xid: &str) -> Result<Option<TxRow>, StoreError>;
    /// Rows in xid order after `after`, optionally of one outcome (`Some(None)`: undecided) and
    /// pending state.
    async fn list_txs(
        &self,
        outcome: Option<Option<Outcome>>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError>;
    /// Takes up to `limit` rows that are due and not held by a live lease, leasing them to
    /// `owner`; two concurrent claims never take the same row.
    async fn claim_txs(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError>;
    /// Applies an update if its conditions hold; false when they did not.
    async fn update_tx(&self, update: &TxUpdate<'_>) -> Result<bool, StoreError>;
    /// Pending rows: how many, and when the oldest was created (for the in-doubt metrics).
    async fn pending_txs(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError>;
}

/// One version of the vault's keyring: a master key version, wrapped by the configured master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRow {
    pub version: u32,
    pub wrapped: Sealed,
    pub created_at: DateTime<Utc>,
}

/// A subject's data key, wrapped by a master key version. The default data key has the subject
/// [`crate::domain::vault::Subject::DEFAULT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyRow {
    /// A fresh id for every data key, so a subject erased and tokenized again gets a new key
    /// and its old values stay erased.
    pub id: Uuid,
    pub subject: String,
    pub master_version: u32,
    pub wrapped: Sealed,
    pub created_at: DateTime<Utc>,
}

/// One tokenized value: only its ciphertext, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub token: String,
    pub kind: TokenType,
    pub data_key_id: Uuid,
    pub sealed: Sealed,
    /// For convergent tokens: the keyed index of (type, format, value); unique per data key.
    pub blind_index: Option<[u8; 32]>,
    pub metadata: Option<serde_json::Value>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// What became of one record of [`VaultStore::insert_tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenInsert {
    Inserted,
    /// A convergent record with the same blind index under the same data key exists: its token
    /// and expiry.
    Existing {
        token: String,
        expires_at: Option<DateTime<Utc>>,
    },
    /// The token is already taken by another record: generate another. (The same record sent
    /// again, same token and nonce, is `Inserted`: a retry after an unclear failure stores it once.)
    TokenTaken,
    /// The record's data key is gone (its subject was erased meanwhile): nothing was written;
    /// seal the value under the subject's new key.
    KeyErased,
}

/// A stored record and the data key it needs (none once the subject is erased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundToken {
    pub record: TokenRecord,
    pub key: Option<DataKeyRow>,
}

/// The vault's own database: keyring, data keys, token records and field rules. It is separate
/// from the event store's, so the card-data environment can be segmented from everything else.
#[async_trait]
pub trait VaultStore: Send + Sync + 'static {
    /// Every master key version, in version order.
    async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError>;
    /// Adds a master key version; false when that version exists (another node rotated first).
    async fn insert_master_key(&self, row: &MasterKeyRow) -> Result<bool, StoreError>;
    /// Replaces the wrapping of an existing master key version (a new configured master key).
    async fn rewrap_master_key(&self, row: &MasterKeyRow) -> Result<(), StoreError>;
    /// The live data key of a subject.
    async fn data_key(&self, subject: &str) -> Result<Option<DataKeyRow>, StoreError>;
    /// Stores a subject's data key unless it has one; returns the one stored (the first wins,
    /// so concurrent first tokenizations of a subject agree on one key).
    async fn insert_data_key(&self, row: &DataKeyRow) -> Result<DataKeyRow, StoreError>;
    /// Deletes a subject's data key (crypto-shredding): one row, whatever the number of tokens.
    /// False when the subject had none.
    async fn delete_data_key(&self, subject: &str) -> Result<bool, StoreError>;
    /// Up to `limit` data keys wrapped by a version older than `version`, in id order after
    /// `after`.
    async fn data_keys_below(
        &self,
        version: u32,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<DataKeyRow>, StoreError>;
    /// Replaces a data key's wrapping if it is still wrapped by `from_version`; false otherwise.
    async fn rewrap_data_key(&self, row: &DataKeyRow, from_version: u32) -> Result<bool, StoreError>;
    /// Inserts records, each on its own terms (see [`TokenInsert`]), in one transaction. A record
    /// is written only while its data key exists, and the key cannot be deleted until the
    /// insert commits.
    async fn insert_tokens(&self, records: &[TokenRecord]) -> Result<Vec<TokenInsert>, StoreError>;
    /// The records of these tokens that exist, with their data keys, in any order.
    async fn find_tokens(&self, tokens: &[String]) -> Result<Vec<FoundToken>, StoreError>;
    /// Deletes one record if it expired before `now` (to make room for a fresh convergent token).
    async fn delete_expired_token(&self, token: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Deletes up to `limit` records expired before `now`; returns how many.
    async fn purge_expired_tokens(&self, now: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;
    /// Stores (replaces) the tokenized-field rules of a category.
    async fn put_rules(&self, category: &str, fields: &serde_json::Value, now: DateTime<Utc>)
    -> Result<(), StoreError>;
    /// The rules of a category, as stored.
    async fn get_rules(&self, category: &str) -> Result<Option<serde_json::Value>, StoreError>;
}
