//! The vault's store on PostgreSQL (its own database in the scale-out shape; any number of nodes
//! share it: every race is settled by a unique index or a compare-and-set).

use crate::sql::{sql_limit, unsigned};
use crate::{migration, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::vault::{Sealed, TokenType};
use concord_core::ports::{DataKeyRow, FoundToken, MasterKeyRow, StoreError, TokenInsert, TokenRecord, VaultStore};
use sqlx::Row as _;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgRow};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// The vault's migrations. Numbered from 1001 and applied with `ignore_missing`, so the vault may
/// share a database with the event store without either migrator refusing the other's rows.
fn vault_migrator() -> Migrator {
    let mut m = Migrator::with_migrations(vec![migration(
        1001,
        "vault",
        include_str!("../vault_migrations/1001_vault.sql"),
    )]);
    m.set_ignore_missing(true);
    m
}

/// The vault store on PostgreSQL.
#[derive(Clone)]
pub struct PostgresVaultStore {
    pool: PgPool,
}

impl PostgresVaultStore {
    /// Connects and applies the vault's migrations.
    ///
    /// # Errors
    /// When the database is unreachable or a migration fails.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = crate::pool_options(max_connections)
            .connect(url)
            .await
            .map_err(unavailable)?;
        vault_migrator().run(&pool).await.map_err(unavailable)?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn sealed(row: &PgRow, nonce: &str, ciphertext: &str) -> Result<Sealed, StoreError> {
    let n: Vec<u8> = row.try_get(nonce).map_err(unavailable)?;
    Sealed::from_parts(&n, row.try_get(ciphertext).map_err(unavailable)?).map_err(unavailable)
}

fn version(row: &PgRow, column: &str) -> Result<u32, StoreError> {
    unsigned(i64::from(row.try_get::<i32, _>(column).map_err(unavailable)?), column)
}

fn int(v: u32) -> Result<i32, StoreError> {
    i32::try_from(v).map_err(|_| unavailable(format!("version {v} does not fit in an INTEGER")))
}

const DATA_KEY_COLUMNS: &str = "id, subject, master_version, nonce, wrapped, created_at";

fn data_key(row: &PgRow) -> Result<DataKeyRow, StoreError> {
    Ok(DataKeyRow {
        id: row.try_get("id").map_err(unavailable)?,
        subject: row.try_get("subject").map_err(unavailable)?,
        master_version: version(row, "master_version")?,
        wrapped: sealed(row, "nonce", "wrapped")?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

fn token_record(row: &PgRow) -> Result<TokenRecord, StoreError> {
    let kind: String = row.try_get("kind").map_err(unavailable)?;
    let index: Option<Vec<u8>> = row.try_get("blind_index").map_err(unavailable)?;
    Ok(TokenRecord {
        token: row.try_get("token").map_err(unavailable)?,
        kind: TokenType::parse(&kind).map_err(unavailable)?,
        data_key_id: row.try_get("data_key_id").map_err(unavailable)?,
        sealed: sealed(row, "nonce", "ciphertext")?,
        blind_index: index
            .map(|i| {
                i.try_into()
                    .map_err(|_| unavailable("stored blind index is not 32 bytes"))
            })
            .transpose()?,
        metadata: row.try_get("metadata").map_err(unavailable)?,
        expires_at: row.try_get("expires_at").map_err(unavailable)?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

#[async_trait]
impl VaultStore for PostgresVaultStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError> {
        let rows =
            sqlx::query("SELECT version, nonce, wrapped, created_at FROM concord_vault_master_keys ORDER BY version")
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(MasterKeyRow {
                    version: version(r, "version")?,
                    wrapped: sealed(r, "nonce", "wrapped")?,
                    created_at: r.try_get("created_at").map_err(unavailable)?,
                })
            })
            .collect()
    }

    async fn insert_master_key(&self, row: &MasterKeyRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO concord_vault_master_keys (version, nonce, wrapped, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(int(row.version)?)
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(row.created_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn rewrap_master_key(&self, row: &MasterKeyRow) -> Result<(), StoreError> {
        sqlx::query("UPDATE concord_vault_master_keys SET nonce = $1, wrapped = $2 WHERE version = $3")
            .bind(&row.wrapped.nonce[..])
            .bind(&row.wrapped.ciphertext)
            .bind(int(row.version)?)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn data_key(&self, subject: &str) -> Result<Option<DataKeyRow>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DATA_KEY_COLUMNS} FROM concord_vault_data_keys WHERE subject = $1"
        )))
        .bind(subject)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(data_key)
        .transpose()
    }

    async fn insert_data_key(&self, row: &DataKeyRow) -> Result<DataKeyRow, StoreError> {
        sqlx::query(
            "INSERT INTO concord_vault_data_keys (id, subject, master_version, nonce, wrapped, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (subject) DO NOTHING",
        )
        .bind(row.id)
        .bind(&row.subject)
        .bind(int(row.master_version)?)
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(row.created_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        self.data_key(&row.subject)
            .await?
            .ok_or_else(|| unavailable("the data key vanished as it was stored"))
    }

    async fn delete_data_key(&self, subject: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM concord_vault_data_keys WHERE subject = $1")
            .bind(subject)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn data_keys_below(
        &self,
        version: u32,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<DataKeyRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DATA_KEY_COLUMNS} FROM concord_vault_data_keys \
             WHERE master_version < $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
        )))
        .bind(int(version)?)
        .bind(after)
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(data_key).collect()
    }

    async fn rewrap_data_key(&self, row: &DataKeyRow, from_version: u32) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE concord_vault_data_keys SET master_version = $1, nonce = $2, wrapped = $3 \
             WHERE id = $4 AND master_version = $5",
        )
        .bind(int(row.master_version)?)
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(row.id)
        .bind(int(from_version)?)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_tokens(&self, records: &[TokenRecord]) -> Result<Vec<TokenInsert>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the whole batch. Rows go in (data key, blind index) order, so two
        // batches that share convergent values wait on each other in the same order and never
        // deadlock.
        // A token twice in one batch: only its first record is tried, so a returned token names
        // one record.
        let mut seen = HashSet::new();
        let first: Vec<bool> = records.iter().map(|r| seen.insert(r.token.as_str())).collect();
        let mut order: Vec<&TokenRecord> = records
            .iter()
            .zip(&first)
            .filter(|(_, f)| **f)
            .map(|(r, _)| r)
            .collect();
        order.sort_by_key(|r| (r.data_key_id, r.blind_index));
        // The data keys are share-locked for the statement, so an erasure waits for it to commit,
        // and a record whose key is already gone is not written.
        let keys: Vec<Uuid> = order.iter().map(|r| r.data_key_id).collect();
        let rows: Vec<(bool, String)> = sqlx::query_as(
            "WITH live AS (SELECT id FROM concord_vault_data_keys WHERE id = ANY($10::uuid[]) FOR SHARE), \
             ins AS (INSERT INTO concord_vault_tokens \
               (token, kind, data_key_id, nonce, ciphertext, blind_index, metadata, expires_at, created_at) \
               SELECT token, kind, dk, nonce, ct, bi, m::jsonb, exp, created \
               FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::bytea[], $5::bytea[], $6::bytea[], $7::text[], \
                           $8::timestamptz[], $9::timestamptz[]) \
                    WITH ORDINALITY AS t(token, kind, dk, nonce, ct, bi, m, exp, created, n) \
               WHERE dk IN (SELECT id FROM live) \
               ORDER BY n \
               ON CONFLICT DO NOTHING RETURNING token) \
             SELECT true, token FROM ins UNION ALL SELECT false, id::text FROM live",
        )
        .bind(order.iter().map(|r| r.token.as_str()).collect::<Vec<_>>())
        .bind(order.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
        .bind(order.iter().map(|r| r.data_key_id).collect::<Vec<_>>())
        .bind(order.iter().map(|r| r.sealed.nonce.to_vec()).collect::<Vec<_>>())
        .bind(order.iter().map(|r| r.sealed.ciphertext.clone()).collect::<Vec<_>>())
        .bind(
            order
                .iter()
                .map(|r| r.blind_index.map(|b| b.to_vec()))
                .collect::<Vec<_>>(),
        )
        .bind(
            order
                .iter()
                .map(|r| r.metadata.as_ref().map(ToString::to_string))
                .collect::<Vec<_>>(),
        )
        .bind(order.iter().map(|r| r.expires_at).collect::<Vec<_>>())
        .bind(order.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .bind(&keys)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let (inserted, live): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(inserted, _)| *inserted);
        let inserted: Vec<String> = inserted.into_iter().map(|(_, t)| t).collect();
        let live: HashSet<String> = live.into_iter().map(|(_, id)| id).collect();
        let inserted: HashSet<String> = inserted.into_iter().collect();
        let lost: Vec<&TokenRecord> = records
            .iter()
            .filter(|r| !inserted.contains(&r.token) && r.blind_index.is_some())
            .collect();
        // A record sent again (a retry after an unclear failure) finds itself: same token, same
        // nonce. It counts as inserted.
        let unsure: Vec<&str> = records
            .iter()
            .filter(|r| !inserted.contains(&r.token))
            .map(|r| r.token.as_str())
            .collect();
        let mine: HashSet<(String, Vec<u8>)> = if unsure.is_empty() {
            HashSet::new()
        } else {
            sqlx::query_as::<_, (String, Vec<u8>)>(
                "SELECT token, nonce FROM concord_vault_tokens WHERE token = ANY($1)",
            )
            .bind(&unsure)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .into_iter()
            .collect()
        };
        let mut existing: HashMap<(Uuid, Vec<u8>), (String, Option<DateTime<Utc>>)> = HashMap::new();
        if !lost.is_empty() {
            let rows = sqlx::query(
                "SELECT data_key_id, blind_index, token, expires_at FROM concord_vault_tokens \
                 WHERE (data_key_id, blind_index) IN (SELECT * FROM UNNEST($1::uuid[], $2::bytea[]))",
            )
            .bind(lost.iter().map(|r| r.data_key_id).collect::<Vec<_>>())
            .bind(
                lost.iter()
                    .map(|r| r.blind_index.map(|b| b.to_vec()))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            for row in rows {
                existing.insert(
                    (
                        row.try_get("data_key_id").map_err(unavailable)?,
                        row.try_get("blind_index").map_err(unavailable)?,
                    ),
                    (
                        row.try_get("token").map_err(unavailable)?,
                        row.try_get("expires_at").map_err(unavailable)?,
                    ),
                );
            }
        }
        Ok(records
            .iter()
            .zip(first)
            .map(|(r, first)| {
                if first && inserted.contains(&r.token) {
                    return TokenInsert::Inserted;
                }
                if mine.contains(&(r.token.clone(), r.sealed.nonce.to_vec())) {
                    return TokenInsert::Inserted;
                }
                if !live.contains(&r.data_key_id.to_string()) {
                    return TokenInsert::KeyErased;
                }
                match r.blind_index.and_then(|b| existing.get(&(r.data_key_id, b.to_vec()))) {
                    Some((token, expires_at)) => TokenInsert::Existing {
                        token: token.clone(),
                        expires_at: *expires_at,
                    },
                    None => TokenInsert::TokenTaken,
                }
            })
            .collect())
    }

    async fn find_tokens(&self, tokens: &[String]) -> Result<Vec<FoundToken>, StoreError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT t.token, t.kind, t.data_key_id, t.nonce, t.ciphertext, t.blind_index, t.metadata, \
                    t.expires_at, t.created_at, \
                    k.id AS k_id, k.subject, k.master_version, k.nonce AS k_nonce, k.wrapped, k.created_at AS k_created_at \
             FROM concord_vault_tokens t LEFT JOIN concord_vault_data_keys k ON k.id = t.data_key_id \
             WHERE t.token = ANY($1)",
        )
        .bind(tokens)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let key_id: Option<Uuid> = row.try_get("k_id").map_err(unavailable)?;
                let key = match key_id {
                    None => None,
                    Some(id) => Some(DataKeyRow {
                        id,
                        subject: row.try_get("subject").map_err(unavailable)?,
                        master_version: version(row, "master_version")?,
                        wrapped: sealed(row, "k_nonce", "wrapped")?,
                        created_at: row.try_get("k_created_at").map_err(unavailable)?,
                    }),
                };
                Ok(FoundToken {
                    record: token_record(row)?,
                    key,
                })
            })
            .collect()
    }

    async fn delete_expired_token(&self, token: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM concord_vault_tokens WHERE token = $1 AND expires_at <= $2")
            .bind(token)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn purge_expired_tokens(&self, now: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM concord_vault_tokens WHERE token IN \
             (SELECT token FROM concord_vault_tokens WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
        .bind(sql_limit(limit))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn put_rules(
        &self,
        category: &str,
        fields: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO concord_vault_rules (category, fields, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (category) DO UPDATE SET fields = EXCLUDED.fields, updated_at = EXCLUDED.updated_at",
        )
        .bind(category)
        .bind(fields)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn get_rules(&self, category: &str) -> Result<Option<serde_json::Value>, StoreError> {
        sqlx::query_scalar("SELECT fields FROM concord_vault_rules WHERE category = $1")
            .bind(category)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }
}
