//! Idempotency records on SQLite.

use crate::{SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::ports::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoreError, StoredResponse};
use sqlx::Row as _;

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin(&self, c: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        let now = c.now.timestamp_millis();
        // Claim and look in one transaction on the single write connection, so no release or
        // purge can slip between the two statements.
        let mut tx = self.inner.write.begin().await.map_err(unavailable)?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency (owner, key, fingerprint, locked_until, expires_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (owner, key) DO UPDATE SET fingerprint = excluded.fingerprint, status = NULL, \
               content_type = NULL, body = NULL, locked_until = excluded.locked_until, expires_at = excluded.expires_at \
             WHERE idempotency.expires_at <= ? OR (idempotency.status IS NULL AND idempotency.locked_until <= ?)",
        )
        .bind(c.owner)
        .bind(c.key.as_str())
        .bind(&c.fingerprint.0[..])
        .bind(c.locked_until.timestamp_millis())
        .bind(c.expires_at.timestamp_millis())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if claimed.rows_affected() > 0 {
            tx.commit().await.map_err(unavailable)?;
            return Ok(IdempotencyBegin::Started);
        }
        let row =
            sqlx::query("SELECT fingerprint, status, content_type, body FROM idempotency WHERE owner = ? AND key = ?")
                .bind(c.owner)
                .bind(c.key.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let fingerprint: Vec<u8> = row.get(0);
        if fingerprint != c.fingerprint.0 {
            return Ok(IdempotencyBegin::Mismatch);
        }
        let status: Option<i64> = row.get(1);
        Ok(match status {
            None => IdempotencyBegin::InFlight,
            Some(status) => IdempotencyBegin::Replay(StoredResponse {
                status: u16::try_from(status).map_err(unavailable)?,
                content_type: row.get(2),
                body: row.get::<Option<Vec<u8>>, _>(3).unwrap_or_default(),
            }),
        })
    }

    async fn complete(&self, c: &IdempotencyClaim<'_>, r: &StoredResponse) -> Result<(), StoreError> {
        // The claim's fingerprint and lock time fence out a holder whose key was taken over.
        sqlx::query("UPDATE idempotency SET status = ?, content_type = ?, body = ? WHERE owner = ? AND key = ? AND status IS NULL AND fingerprint = ? AND locked_until = ?")
            .bind(i64::from(r.status))
            .bind(r.content_type.as_deref())
            .bind(&r.body[..])
            .bind(c.owner)
            .bind(c.key.as_str())
            .bind(&c.fingerprint.0[..])
            .bind(c.locked_until.timestamp_millis())
            .execute(&self.inner.write)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, c: &IdempotencyClaim<'_>) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency WHERE owner = ? AND key = ? AND status IS NULL AND fingerprint = ? AND locked_until = ?")
            .bind(c.owner)
            .bind(c.key.as_str())
            .bind(&c.fingerprint.0[..])
            .bind(c.locked_until.timestamp_millis())
            .execute(&self.inner.write)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency WHERE expires_at <= ?")
            .bind(now.timestamp_millis())
            .execute(&self.inner.write)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }
}
