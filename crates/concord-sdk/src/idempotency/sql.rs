//! What the SQLite and PostgreSQL stores share: the claim protocol over one table, written once;
//! each store supplies its statements.

use std::num::NonZeroU32;

use super::{IdempotencyBegin, IdempotencyClaim, StoreError, StoredResponse};
use uuid::Uuid;

/// How often a claim is tried again when the record it conflicted with was released between the
/// claim and the read; past that the key is taken to be busy.
const CLAIM_ATTEMPTS: usize = 3;

/// The default number of rows one purge statement deletes.
pub(super) const DEFAULT_PURGE_BATCH: NonZeroU32 = NonZeroU32::new(10_000).unwrap();

/// A record as read back: the fingerprint and, once completed, the response.
pub(super) struct RecordRow {
    pub fingerprint: Vec<u8>,
    pub status: Option<i64>,
    pub content_type: Option<String>,
    pub body: Option<Vec<u8>>,
}

/// The statements of one database.
pub(super) trait RecordRows {
    /// Inserts the claim's record, or takes over an expired one or one whose holder's lock ran
    /// out; true when the claim now holds the key.
    async fn claim(&self, claim: &IdempotencyClaim<'_>) -> Result<bool, sqlx::Error>;
    /// The record of `(owner, key)`.
    async fn find(&self, owner: Uuid, key: &str) -> Result<Option<RecordRow>, sqlx::Error>;
    /// Stores the response on the record the claim still holds.
    async fn complete(&self, claim: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), sqlx::Error>;
    /// Deletes the record the claim still holds.
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), sqlx::Error>;
    /// Deletes up to `batch` records that expired at `now_ms`; answers how many.
    async fn purge_batch(&self, now_ms: i64, batch: u32) -> Result<u64, sqlx::Error>;
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) async fn begin<R: RecordRows>(
    rows: &R,
    claim: &IdempotencyClaim<'_>,
) -> Result<IdempotencyBegin, StoreError> {
    for _ in 0..CLAIM_ATTEMPTS {
        // The upsert is the claim: concurrent claims of one key queue on its row, and exactly
        // one of them finds it free.
        if rows.claim(claim).await.map_err(unavailable)? {
            return Ok(IdempotencyBegin::Started);
        }
        // Absent: released between the two statements; claim again.
        let Some(row) = rows.find(claim.owner, claim.key.as_str()).await.map_err(unavailable)? else {
            continue;
        };
        if row.fingerprint != claim.fingerprint.0 {
            return Ok(IdempotencyBegin::Mismatch);
        }
        return Ok(match row.status {
            None => IdempotencyBegin::InFlight,
            Some(status) => IdempotencyBegin::Replay(StoredResponse {
                status: u16::try_from(status)
                    .map_err(|_| unavailable(format!("stored status {status} is not an HTTP status")))?,
                content_type: row.content_type,
                body: row.body.unwrap_or_default(),
            }),
        });
    }
    Ok(IdempotencyBegin::InFlight)
}

pub(super) async fn purge<R: RecordRows>(rows: &R, now_ms: i64, batch: u32) -> Result<u64, StoreError> {
    let mut purged = 0;
    // In batches, so one purge never holds a long lock over the whole table.
    loop {
        let deleted = rows.purge_batch(now_ms, batch).await.map_err(unavailable)?;
        purged += deleted;
        if deleted < u64::from(batch) {
            return Ok(purged);
        }
    }
}
