//! Idempotency records on PostgreSQL.

use crate::{PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::ports::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoreError, StoredResponse};
use sqlx::Row as _;

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin(&self, c: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        let now = c.now.timestamp_millis();
        // The upsert is the claim: concurrent claims of one key, from any node, queue on the row
        // and exactly one finds it free.
        for _ in 0..3 {
            let claimed = sqlx::query(
                "INSERT INTO concord_idempotency (owner, key, fingerprint, locked_until, expires_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (owner, key) DO UPDATE SET fingerprint = excluded.fingerprint, status = NULL, \
                   content_type = NULL, body = NULL, locked_until = excluded.locked_until, expires_at = excluded.expires_at \
                 WHERE concord_idempotency.expires_at <= $6 \
                    OR (concord_idempotency.status IS NULL AND concord_idempotency.locked_until <= $6)",
            )
            .bind(c.owner)
            .bind(c.key.as_str())
            .bind(&c.fingerprint.0[..])
            .bind(c.locked_until.timestamp_millis())
            .bind(c.expires_at.timestamp_millis())
            .bind(now)
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
            if claimed.rows_affected() > 0 {
                return Ok(IdempotencyBegin::Started);
            }
            let row = sqlx::query(
                "SELECT fingerprint, status, content_type, body FROM concord_idempotency WHERE owner = $1 AND key = $2",
            )
            .bind(c.owner)
            .bind(c.key.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)?;
            // Released between the two statements: claim again.
            let Some(row) = row else { continue };
            let fingerprint: Vec<u8> = row.get(0);
            if fingerprint != c.fingerprint.0 {
                return Ok(IdempotencyBegin::Mismatch);
            }
            let status: Option<i32> = row.get(1);
            return Ok(match status {
                None => IdempotencyBegin::InFlight,
                Some(status) => IdempotencyBegin::Replay(StoredResponse {
                    status: u16::try_from(status).map_err(unavailable)?,
                    content_type: row.get(2),
                    body: row.get::<Option<Vec<u8>>, _>(3).unwrap_or_default(),
                }),
            });
        }
        Ok(IdempotencyBegin::InFlight)
    }

    async fn complete(&self, c: &IdempotencyClaim<'_>, r: &StoredResponse) -> Result<(), StoreError> {
        // The claim's fingerprint and lock time fence out a holder whose key was taken over.
        sqlx::query("UPDATE concord_idempotency SET status = $1, content_type = $2, body = $3 WHERE owner = $4 AND key = $5 AND status IS NULL AND fingerprint = $6 AND locked_until = $7")
            .bind(i32::from(r.status))
            .bind(r.content_type.as_deref())
            .bind(&r.body[..])
            .bind(c.owner)
            .bind(c.key.as_str())
            .bind(&c.fingerprint.0[..])
            .bind(c.locked_until.timestamp_millis())
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, c: &IdempotencyClaim<'_>) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM concord_idempotency WHERE owner = $1 AND key = $2 AND status IS NULL AND fingerprint = $3 AND locked_until = $4")
            .bind(c.owner)
            .bind(c.key.as_str())
            .bind(&c.fingerprint.0[..])
            .bind(c.locked_until.timestamp_millis())
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM concord_idempotency WHERE expires_at <= $1")
            .bind(now.timestamp_millis())
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }
}
