//! Idempotency records in the service's own PostgreSQL database.
//!
//! Every statement is a single autocommit statement at the default `READ COMMITTED`: concurrent
//! claims of one key, from any instance, queue on its row. The table's layout is the one the
//! Concord server uses for its own records, so a service sharing a database with a server does no
//! harm to either: their owners never collide.

use std::num::NonZeroU32;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use super::sql::{self, DEFAULT_PURGE_BATCH, RecordRow, RecordRows};
use super::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoreError, StoredResponse};

/// The table's DDL, for services that run their own migrations. Times are unix milliseconds.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_idempotency (
    owner        UUID    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  BYTEA   NOT NULL,
    status       INTEGER,
    content_type TEXT,
    body         BYTEA,
    locked_until BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS concord_idempotency_by_expiry ON concord_idempotency (expires_at);";

/// Creates the `concord_idempotency` table and its index when they do not exist. Instances
/// starting together may all call it: an advisory lock makes them create it once (a bare
/// `CREATE TABLE IF NOT EXISTS` can fail when two sessions race).
///
/// # Errors
/// The database's error when a statement fails.
pub async fn ensure_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('concord_idempotency'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    tx.commit().await
}

/// [`IdempotencyStore`] on a PostgreSQL pool; create the table first with [`ensure_schema`].
#[derive(Debug, Clone)]
pub struct PostgresIdempotencyStore {
    pool: PgPool,
    purge_batch: NonZeroU32,
}

impl PostgresIdempotencyStore {
    /// A store on `pool`, purging 10 000 rows per statement.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            purge_batch: DEFAULT_PURGE_BATCH,
        }
    }

    /// How many rows one purge statement deletes; a purge runs statements until it is done.
    #[must_use]
    pub fn with_purge_batch(mut self, rows: NonZeroU32) -> Self {
        self.purge_batch = rows;
        self
    }

    /// The pool the store writes to.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl IdempotencyStore for PostgresIdempotencyStore {
    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner))]
    async fn begin(&self, claim: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        sql::begin(self, claim).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner, status = response.status))]
    async fn complete(&self, claim: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), StoreError> {
        RecordRows::complete(self, claim, response)
            .await
            .map_err(sql::unavailable)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner))]
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), StoreError> {
        RecordRows::release(self, claim).await.map_err(sql::unavailable)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        sql::purge(self, now.timestamp_millis(), self.purge_batch.get()).await
    }
}

impl RecordRows for PostgresIdempotencyStore {
    async fn claim(&self, c: &IdempotencyClaim<'_>) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO concord_idempotency (owner, key, fingerprint, locked_until, expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (owner, key) DO UPDATE SET fingerprint = excluded.fingerprint, status = NULL, \
               content_type = NULL, body = NULL, locked_until = excluded.locked_until, \
               expires_at = excluded.expires_at \
             WHERE concord_idempotency.expires_at <= $6 \
                OR (concord_idempotency.status IS NULL AND concord_idempotency.locked_until <= $6)",
        )
        .bind(c.owner)
        .bind(c.key.as_str())
        .bind(&c.fingerprint.0[..])
        .bind(c.locked_until.timestamp_millis())
        .bind(c.expires_at.timestamp_millis())
        .bind(c.now.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn find(&self, owner: Uuid, key: &str) -> Result<Option<RecordRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT fingerprint, status, content_type, body FROM concord_idempotency WHERE owner = $1 AND key = $2",
        )
        .bind(owner)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(RecordRow {
                fingerprint: row.try_get(0)?,
                status: row.try_get::<Option<i32>, _>(1)?.map(i64::from),
                content_type: row.try_get(2)?,
                body: row.try_get(3)?,
            })
        })
        .transpose()
    }

    async fn complete(&self, c: &IdempotencyClaim<'_>, r: &StoredResponse) -> Result<(), sqlx::Error> {
        // Fingerprint and lock time are the fence: after a takeover they no longer match.
        sqlx::query(
            "UPDATE concord_idempotency SET status = $1, content_type = $2, body = $3 \
             WHERE owner = $4 AND key = $5 AND status IS NULL AND fingerprint = $6 AND locked_until = $7",
        )
        .bind(i32::from(r.status))
        .bind(r.content_type.as_deref())
        .bind(&r.body[..])
        .bind(c.owner)
        .bind(c.key.as_str())
        .bind(&c.fingerprint.0[..])
        .bind(c.locked_until.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, c: &IdempotencyClaim<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM concord_idempotency \
             WHERE owner = $1 AND key = $2 AND status IS NULL AND fingerprint = $3 AND locked_until = $4",
        )
        .bind(c.owner)
        .bind(c.key.as_str())
        .bind(&c.fingerprint.0[..])
        .bind(c.locked_until.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_batch(&self, now_ms: i64, batch: u32) -> Result<u64, sqlx::Error> {
        // The outer condition is checked again on a row that a takeover renewed meanwhile, so a
        // fresh claim is never deleted.
        let done = sqlx::query(
            "DELETE FROM concord_idempotency WHERE expires_at <= $1 AND (owner, key) IN \
             (SELECT owner, key FROM concord_idempotency WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now_ms)
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
