//! The 2PC transaction store port: the coordinator's transaction rows and their updates.

use crate::domain::tx::{Outcome, Xid};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_kernel::StoreError;
use uuid::Uuid;

/// A two-phase-commit transaction's row: the read model of its log (`tx-{xid}`) and its place in
/// the coordinator's work queue.
#[derive(Debug, Clone, PartialEq)]
pub struct TxRow {
    pub xid: Xid,
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
    pub xid: &'a Xid,
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

/// Transaction rows of the 2PC coordinator. The log itself lives in the
/// [`EventStore`](super::EventStore).
#[async_trait]
pub trait TxStore: Send + Sync + 'static {
    /// Inserts a new row; an existing xid is an [`StoreError::Unavailable`] (xids are generated).
    async fn create_tx(&self, row: &TxRow) -> Result<(), StoreError>;
    async fn get_tx(&self, xid: &Xid) -> Result<Option<TxRow>, StoreError>;
    /// Rows in xid order after `after`, optionally of one outcome (`Some(None)`: undecided) and
    /// pending state. `after` is a position in that order (the last xid of the previous page, or
    /// any text), not necessarily an xid.
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
    /// Removes up to `limit` rows of transactions that are decided with nothing left to do,
    /// held by nobody and last changed before `before`. Their logs stay. Answers how many.
    async fn purge_txs(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;
}
