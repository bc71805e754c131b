//! API keys on SQLite: only their SHA-256 hashes are stored.

use crate::{SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::{ApiKeyRecord, KeyHash, Scope};
use concord_core::ports::{KeyStore, StoreError};
use sqlx::Row as _;
use uuid::Uuid;

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let scopes: Vec<&str> = key.scopes.iter().map(Scope::as_str).collect();
        sqlx::query(
            "INSERT INTO api_keys (id, name, scopes, hash, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(key.id)
        .bind(&key.name)
        .bind(serde_json::to_string(&scopes).map_err(unavailable)?)
        .bind(&key.hash.0[..])
        .bind(key.created_at)
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, scopes, hash, created_at FROM api_keys WHERE hash = ? AND revoked_at IS NULL",
        )
        .bind(&hash.0[..])
        .fetch_optional(&self.inner.read)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let scopes: String = row.get(2);
        let scopes: Vec<String> = serde_json::from_str(&scopes).map_err(unavailable)?;
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
        let done = sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(Utc::now())
            .bind(id)
            .execute(&self.inner.write)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_admin_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL \
             AND EXISTS (SELECT 1 FROM json_each(api_keys.scopes) WHERE value = 'admin')",
        )
        .fetch_one(&self.inner.read)
        .await
        .map_err(unavailable)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn claim_owner(&self, kind: &str, name: &str, owner: &str) -> Result<String, StoreError> {
        // One statement on the one writer: the first claim inserts, later ones read it back.
        sqlx::query_scalar(
            "INSERT INTO owners (kind, name, owner, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (kind, name) DO UPDATE SET owner = owners.owner RETURNING owner",
        )
        .bind(kind)
        .bind(name)
        .bind(owner)
        .bind(Utc::now())
        .fetch_one(&self.inner.write)
        .await
        .map_err(unavailable)
    }

    async fn owner(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT owner FROM owners WHERE kind = ? AND name = ?")
            .bind(kind)
            .bind(name)
            .fetch_optional(&self.inner.read)
            .await
            .map_err(unavailable)
    }
}
