//! The vault's store on its own SQLite database (the embedded default: a file beside the event
//! store's). One connection writes, a small pool reads, as for the event store.

use crate::sql::{micros, optional_time, sql_limit, time, unsigned};
use crate::{migration, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::vault::{Sealed, TokenType};
use concord_core::ports::{DataKeyRow, FoundToken, MasterKeyRow, StoreError, TokenInsert, TokenRecord, VaultStore};
use sqlx::Row as _;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use std::str::FromStr as _;
use std::time::Duration;
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

/// The vault store on SQLite.
#[derive(Clone)]
pub struct SqliteVaultStore {
    write: SqlitePool,
    read: SqlitePool,
}

impl SqliteVaultStore {
    /// Opens (creating when missing) the vault database and applies its migrations.
    ///
    /// # Errors
    /// When the file cannot be opened or a migration fails.
    pub async fn connect(url: &str, synchronous_full: bool) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            // A deleted data key (an erased subject) is overwritten in the file, not left in a
            // free page.
            .pragma("secure_delete", "ON");
        let write = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        vault_migrator().run(&write).await.map_err(unavailable)?;
        let read = if url.contains(":memory:") {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(4)
                .connect_with(options.read_only(true))
                .await
                .map_err(unavailable)?
        };
        Ok(Self { write, read })
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

fn sealed(row: &SqliteRow, nonce: &str, ciphertext: &str) -> Result<Sealed, StoreError> {
    let n: Vec<u8> = row.try_get(nonce).map_err(unavailable)?;
    Sealed::from_parts(&n, row.try_get(ciphertext).map_err(unavailable)?).map_err(unavailable)
}

const DATA_KEY_COLUMNS: &str = "id, subject, master_version, nonce, wrapped, created_at";

fn data_key(row: &SqliteRow) -> Result<DataKeyRow, StoreError> {
    Ok(DataKeyRow {
        id: row.try_get("id").map_err(unavailable)?,
        subject: row.try_get("subject").map_err(unavailable)?,
        master_version: unsigned(row.try_get("master_version").map_err(unavailable)?, "master_version")?,
        wrapped: sealed(row, "nonce", "wrapped")?,
        created_at: time(row.try_get("created_at").map_err(unavailable)?)?,
    })
}

fn token_record(row: &SqliteRow) -> Result<TokenRecord, StoreError> {
    let kind: String = row.try_get("kind").map_err(unavailable)?;
    let index: Option<Vec<u8>> = row.try_get("blind_index").map_err(unavailable)?;
    let metadata: Option<String> = row.try_get("metadata").map_err(unavailable)?;
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
        metadata: metadata
            .map(|m| serde_json::from_str(&m).map_err(unavailable))
            .transpose()?,
        expires_at: optional_time(row, "expires_at")?,
        created_at: time(row.try_get("created_at").map_err(unavailable)?)?,
    })
}

#[async_trait]
impl VaultStore for SqliteVaultStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError> {
        let rows = sqlx::query("SELECT version, nonce, wrapped, created_at FROM vault_master_keys ORDER BY version")
            .fetch_all(&self.read)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(MasterKeyRow {
                    version: unsigned(r.try_get("version").map_err(unavailable)?, "version")?,
                    wrapped: sealed(r, "nonce", "wrapped")?,
                    created_at: time(r.try_get("created_at").map_err(unavailable)?)?,
                })
            })
            .collect()
    }

    async fn insert_master_key(&self, row: &MasterKeyRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO vault_master_keys (version, nonce, wrapped, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(i64::from(row.version))
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(micros(row.created_at))
        .execute(&self.write)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn rewrap_master_key(&self, row: &MasterKeyRow) -> Result<(), StoreError> {
        sqlx::query("UPDATE vault_master_keys SET nonce = ?, wrapped = ? WHERE version = ?")
            .bind(&row.wrapped.nonce[..])
            .bind(&row.wrapped.ciphertext)
            .bind(i64::from(row.version))
            .execute(&self.write)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn data_key(&self, subject: &str) -> Result<Option<DataKeyRow>, StoreError> {
        // From the writer: a key inserted a moment ago must be seen, or a second key would be made.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DATA_KEY_COLUMNS} FROM vault_data_keys WHERE subject = ?"
        )))
        .bind(subject)
        .fetch_optional(&self.write)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(data_key)
        .transpose()
    }

    async fn insert_data_key(&self, row: &DataKeyRow) -> Result<DataKeyRow, StoreError> {
        sqlx::query(
            "INSERT INTO vault_data_keys (id, subject, master_version, nonce, wrapped, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subject) DO NOTHING",
        )
        .bind(row.id)
        .bind(&row.subject)
        .bind(i64::from(row.master_version))
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(micros(row.created_at))
        .execute(&self.write)
        .await
        .map_err(unavailable)?;
        self.data_key(&row.subject)
            .await?
            .ok_or_else(|| unavailable("the data key vanished as it was stored"))
    }

    async fn delete_data_key(&self, subject: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM vault_data_keys WHERE subject = ?")
            .bind(subject)
            .execute(&self.write)
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
            "SELECT {DATA_KEY_COLUMNS} FROM vault_data_keys \
             WHERE master_version < ? AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
        )))
        .bind(i64::from(version))
        .bind(after)
        .bind(after)
        .bind(sql_limit(limit))
        .fetch_all(&self.write)
        .await
        .map_err(unavailable)?;
        rows.iter().map(data_key).collect()
    }

    async fn rewrap_data_key(&self, row: &DataKeyRow, from_version: u32) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE vault_data_keys SET master_version = ?, nonce = ?, wrapped = ? WHERE id = ? AND master_version = ?",
        )
        .bind(i64::from(row.master_version))
        .bind(&row.wrapped.nonce[..])
        .bind(&row.wrapped.ciphertext)
        .bind(row.id)
        .bind(i64::from(from_version))
        .execute(&self.write)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_tokens(&self, records: &[TokenRecord]) -> Result<Vec<TokenInsert>, StoreError> {
        let mut tx = self.write.begin().await.map_err(unavailable)?;
        // The one writer connection runs this transaction alone: no erasure can come between
        // this check and the inserts.
        let mut live: Vec<Uuid> = Vec::new();
        let mut asked: Vec<Uuid> = records.iter().map(|r| r.data_key_id).collect();
        asked.sort_unstable();
        asked.dedup();
        for id in asked {
            let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM vault_data_keys WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
            if found.is_some() {
                live.push(id);
            }
        }
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            if !live.contains(&r.data_key_id) {
                out.push(TokenInsert::KeyErased);
                continue;
            }
            let done = sqlx::query(
                "INSERT OR IGNORE INTO vault_tokens \
                 (token, kind, data_key_id, nonce, ciphertext, blind_index, metadata, expires_at, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.token)
            .bind(r.kind.as_str())
            .bind(r.data_key_id)
            .bind(&r.sealed.nonce[..])
            .bind(&r.sealed.ciphertext)
            .bind(r.blind_index.as_ref().map(|b| &b[..]))
            .bind(r.metadata.as_ref().map(ToString::to_string))
            .bind(r.expires_at.map(micros))
            .bind(micros(r.created_at))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if done.rows_affected() == 1 {
                out.push(TokenInsert::Inserted);
                continue;
            }
            let same: Option<Vec<u8>> = sqlx::query_scalar("SELECT nonce FROM vault_tokens WHERE token = ?")
                .bind(&r.token)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
            if same.as_deref() == Some(&r.sealed.nonce[..]) {
                out.push(TokenInsert::Inserted);
                continue;
            }
            let existing = match &r.blind_index {
                Some(index) => {
                    sqlx::query("SELECT token, expires_at FROM vault_tokens WHERE data_key_id = ? AND blind_index = ?")
                        .bind(r.data_key_id)
                        .bind(&index[..])
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(unavailable)?
                }
                None => None,
            };
            out.push(match existing {
                Some(row) => TokenInsert::Existing {
                    token: row.try_get("token").map_err(unavailable)?,
                    expires_at: optional_time(&row, "expires_at")?,
                },
                None => TokenInsert::TokenTaken,
            });
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn find_tokens(&self, tokens: &[String]) -> Result<Vec<FoundToken>, StoreError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let list = serde_json::to_string(tokens).map_err(unavailable)?;
        let rows = sqlx::query(
            "SELECT t.token, t.kind, t.data_key_id, t.nonce, t.ciphertext, t.blind_index, t.metadata, \
                    t.expires_at, t.created_at, \
                    k.id AS k_id, k.subject, k.master_version, k.nonce AS k_nonce, k.wrapped, k.created_at AS k_created_at \
             FROM vault_tokens t LEFT JOIN vault_data_keys k ON k.id = t.data_key_id \
             WHERE t.token IN (SELECT value FROM json_each(?))",
        )
        .bind(list)
        .fetch_all(&self.read)
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
                        master_version: unsigned(
                            row.try_get("master_version").map_err(unavailable)?,
                            "master_version",
                        )?,
                        wrapped: sealed(row, "k_nonce", "wrapped")?,
                        created_at: time(row.try_get("k_created_at").map_err(unavailable)?)?,
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
        let done = sqlx::query("DELETE FROM vault_tokens WHERE token = ? AND expires_at <= ?")
            .bind(token)
            .bind(micros(now))
            .execute(&self.write)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn purge_expired_tokens(&self, now: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM vault_tokens WHERE token IN \
             (SELECT token FROM vault_tokens WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
        )
        .bind(micros(now))
        .bind(sql_limit(limit))
        .execute(&self.write)
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
            "INSERT INTO vault_rules (category, fields, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (category) DO UPDATE SET fields = excluded.fields, updated_at = excluded.updated_at",
        )
        .bind(category)
        .bind(fields.to_string())
        .bind(micros(now))
        .execute(&self.write)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn get_rules(&self, category: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let fields: Option<String> = sqlx::query_scalar("SELECT fields FROM vault_rules WHERE category = ?")
            .bind(category)
            .fetch_optional(&self.write)
            .await
            .map_err(unavailable)?;
        fields
            .map(|f| serde_json::from_str(&f).map_err(unavailable))
            .transpose()
    }
}
