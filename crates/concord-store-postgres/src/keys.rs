//! API keys on PostgreSQL: only their SHA-256 hashes are stored.

use crate::{PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::{ApiKeyRecord, KeyHash, Scope};
use concord_core::ports::{KeyStore, StoreError};
use sqlx::Row as _;
use uuid::Uuid;

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let scopes: Vec<&str> = key.scopes.iter().map(Scope::as_str).collect();
        sqlx::query(
            "INSERT INTO concord_api_keys (id, name, scopes, hash, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(key.id)
        .bind(&key.name)
        .bind(&scopes)
        .bind(&key.hash.0[..])
        .bind(key.created_at)
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, scopes, hash, created_at FROM concord_api_keys WHERE hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash.0[..])
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let scopes: Vec<String> = row.get(2);
        let stored: Vec<u8> = row.get(3);
        Ok(Some(ApiKeyRecord {
            id: row.get::<Uuid, _>(0),
            name: row.get(1),
            scopes: scopes
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<_, _>>()
                .map_err(unavailable)?,
            hash: KeyHash(
                stored
                    .try_into()
                    .map_err(|_| unavailable("stored key hash is not 32 bytes"))?,
            ),
            created_at: row.get::<DateTime<Utc>, _>(4),
        }))
    }

    async fn revoke_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE concord_api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_admin_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM concord_api_keys WHERE revoked_at IS NULL AND 'admin' = ANY(scopes)",
        )
        .fetch_one(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn claim_owner(&self, kind: &str, name: &str, owner: &str) -> Result<String, StoreError> {
        // The no-op update locks the row and returns it, so a concurrent first claim is waited
        // for and read back rather than missed.
        sqlx::query_scalar(
            "INSERT INTO concord_owners (kind, name, owner, created_at) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (kind, name) DO UPDATE SET owner = concord_owners.owner RETURNING owner",
        )
        .bind(kind)
        .bind(name)
        .bind(owner)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(unavailable)
    }

    async fn owner(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT owner FROM concord_owners WHERE kind = $1 AND name = $2")
            .bind(kind)
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)
    }
}
