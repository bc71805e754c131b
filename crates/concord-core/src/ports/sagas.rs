//! The saga store port: saga definitions, saga rows and their updates.

use crate::domain::saga::{SagaId, SagaStatus};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_kernel::StoreError;
use uuid::Uuid;

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
    pub id: SagaId,
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
    pub id: &'a SagaId,
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

/// Saga definitions and saga rows. The saga log itself lives in the
/// [`EventStore`](super::EventStore).
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
    async fn get_saga(&self, id: &SagaId) -> Result<Option<SagaRow>, StoreError>;
    /// Rows in id order after `after`, optionally of one status. `after` is a position in that
    /// order (the last id of the previous page, or any text), not necessarily an id.
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
    /// Makes a saga that is not finished due now (its `next_run_at`), leaving its lease alone:
    /// a signal came for it. False when no such unfinished saga is there.
    async fn wake_saga(&self, id: &SagaId, now: DateTime<Utc>) -> Result<bool, StoreError>;
    /// How many rows have each status.
    async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError>;
    /// Removes up to `limit` rows of sagas that finished for good (`completed`, `compensated`,
    /// `cancelled`; not `failed`, which waits for an operator), held by nobody and last changed
    /// before `before`. Their logs stay. Answers how many it removed.
    async fn purge_sagas(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;
}
