//! What the row stores (sagas, transactions) share on SQLite: the conversions of their columns
//! (times as unix microseconds, counters as signed 64-bit integers) and the claim of due rows.

use crate::unavailable;
use chrono::{DateTime, Utc};
use concord_core::ports::StoreError;
use sqlx::Row as _;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use uuid::Uuid;

/// A time as stored: unix microseconds, so comparisons are numeric and values round-trip exactly.
pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn time(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| unavailable(format!("stored time {us} is out of range")))
}

/// A nullable time column of `row`.
pub(crate) fn optional_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get::<Option<i64>, _>(column)
        .map_err(unavailable)?
        .map(time)
        .transpose()
}

pub(crate) fn bigint(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| unavailable(format!("{v} does not fit in a 64-bit signed integer")))
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
    write: &SqlitePool,
    table: &WorkTable,
    owner: Uuid,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<SqliteRow>, StoreError> {
    let WorkTable { name, key, columns } = table;
    // One statement on the one write connection: no other claim runs between the choice of
    // rows and their lease.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {name} SET lease_owner = ?, lease_until = ? WHERE {key} IN ( \
           SELECT {key} FROM {name} \
           WHERE next_run_at IS NOT NULL AND next_run_at <= ? AND (lease_until IS NULL OR lease_until <= ?) \
           ORDER BY next_run_at LIMIT ?) \
         RETURNING {columns}"
    )))
    .bind(owner)
    .bind(micros(lease_until))
    .bind(micros(now))
    .bind(micros(now))
    .bind(sql_limit(limit))
    .fetch_all(write)
    .await
    .map_err(unavailable)
}
