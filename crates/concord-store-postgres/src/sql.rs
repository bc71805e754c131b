//! What the row stores (sagas, transactions) share on PostgreSQL: the conversions of their
//! columns (counters are BIGINT, so unsigned values are checked both ways) and the claim of due
//! rows.

use crate::unavailable;
use chrono::{DateTime, Utc};
use concord_core::ports::StoreError;
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

pub(crate) fn bigint(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| unavailable(format!("{v} does not fit in a BIGINT")))
}

pub(crate) fn unsigned<T: TryFrom<i64>>(v: i64, column: &str) -> Result<T, StoreError> {
    T::try_from(v).map_err(|_| unavailable(format!("stored {column} {v} is out of range")))
}

/// A `LIMIT` bound: beyond `i64::MAX` means no limit anyway.
pub(crate) fn sql_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A table of leased work: a row is due at `next_run_at` and held by `lease_owner` until
/// `lease_until`. Sagas and transactions are both one.
pub(crate) struct WorkTable {
    pub(crate) name: &'static str,
    /// The primary key.
    pub(crate) key: &'static str,
    /// The columns a claim returns.
    pub(crate) columns: &'static str,
}

/// Leases to `owner` up to `limit` rows of `table` that are due and not held by a live lease,
/// choosing the oldest due first. The rows come back in no particular order (RETURNING has none).
pub(crate) async fn claim_due(
    pool: &PgPool,
    table: &WorkTable,
    owner: Uuid,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<PgRow>, StoreError> {
    let WorkTable { name, key, columns } = table;
    // SKIP LOCKED: a row another claimer has just picked is left to it, not waited for. Under
    // READ COMMITTED a row whose lease another claim committed meanwhile is re-checked against
    // the WHERE clause when locked, and dropped.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {name} SET lease_owner = $1, lease_until = $2 WHERE {key} IN ( \
           SELECT {key} FROM {name} \
           WHERE next_run_at IS NOT NULL AND next_run_at <= $3 AND (lease_until IS NULL OR lease_until <= $3) \
           ORDER BY next_run_at LIMIT $4 \
           FOR UPDATE SKIP LOCKED) \
         RETURNING {columns}"
    )))
    .bind(owner)
    .bind(lease_until)
    .bind(now)
    .bind(sql_limit(limit))
    .fetch_all(pool)
    .await
    .map_err(unavailable)
}
