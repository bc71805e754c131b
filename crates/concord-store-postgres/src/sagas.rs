//! Saga definitions and saga rows on PostgreSQL, shared by every node.
//!
//! Each method is one statement the database arbitrates: a claim locks the rows it picks with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers neither take the same row nor wait on each
//! other; an update is applied only while its conditions hold (the lease is the fencing token);
//! a new definition version is inserted only if no other node inserted that version first.

use crate::sql::{WorkTable, bigint, claim_due, sql_limit, unsigned};
use crate::{PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::saga::{SagaId, SagaStatus};
use concord_core::ports::{SagaRow, SagaStore, SagaUpdate, StoreError, StoredDefinition};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

const SAGA_COLUMNS: &str = "id, definition, version, input, status, next_run_at, lease_owner, lease_until, log_version, created_at, updated_at";

const SAGAS: WorkTable = WorkTable {
    name: "concord_sagas",
    key: "id",
    columns: SAGA_COLUMNS,
};

/// How many times a put looks again after losing a version to a concurrent put. Each round one
/// of the racing puts wins, so this bounds the number of puts racing on one name.
const PUT_ATTEMPTS: usize = 64;

fn status(s: &str) -> Result<SagaStatus, StoreError> {
    SagaStatus::parse(s).ok_or_else(|| unavailable(format!("unknown saga status {s:?} stored in concord_sagas")))
}

fn saga_id(s: String) -> Result<SagaId, StoreError> {
    SagaId::parse(s).map_err(|e| unavailable(format!("{e}, stored in concord_sagas")))
}

fn definition_from_row(row: &PgRow) -> Result<StoredDefinition, StoreError> {
    Ok(StoredDefinition {
        name: row.try_get("name").map_err(unavailable)?,
        version: unsigned(row.try_get("version").map_err(unavailable)?, "version")?,
        spec: row.try_get::<Json<Value>, _>("spec").map_err(unavailable)?.0,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

fn saga_from_row(row: &PgRow) -> Result<SagaRow, StoreError> {
    Ok(SagaRow {
        id: saga_id(row.try_get("id").map_err(unavailable)?)?,
        definition: row.try_get("definition").map_err(unavailable)?,
        version: unsigned(row.try_get("version").map_err(unavailable)?, "version")?,
        input: row.try_get::<Json<Value>, _>("input").map_err(unavailable)?.0,
        status: status(row.try_get("status").map_err(unavailable)?)?,
        next_run_at: row.try_get("next_run_at").map_err(unavailable)?,
        lease_owner: row.try_get("lease_owner").map_err(unavailable)?,
        lease_until: row.try_get("lease_until").map_err(unavailable)?,
        log_version: unsigned(row.try_get("log_version").map_err(unavailable)?, "log_version")?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
        updated_at: row.try_get("updated_at").map_err(unavailable)?,
    })
}

#[async_trait]
impl SagaStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(definition = name))]
    async fn put_definition(&self, name: &str, spec: &Value, now: DateTime<Utc>) -> Result<(u32, bool), StoreError> {
        for _ in 0..PUT_ATTEMPTS {
            let latest = sqlx::query(
                "SELECT version, spec FROM concord_saga_definitions WHERE name = $1 ORDER BY version DESC LIMIT 1",
            )
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)?;
            let mut version = 1;
            if let Some(row) = latest {
                let latest: u32 = unsigned(row.try_get("version").map_err(unavailable)?, "version")?;
                // Compared as JSON values, the same equality everywhere: jsonb's own `=` would
                // also call 1 and 1.0 equal, which `serde_json::Value` does not.
                if row.try_get::<Json<Value>, _>("spec").map_err(unavailable)?.0 == *spec {
                    return Ok((latest, false));
                }
                version = latest
                    .checked_add(1)
                    .ok_or_else(|| unavailable(format!("definition {name} has no versions left")))?;
            }
            // The primary key arbitrates: of the puts that read the same latest version, one
            // inserts the next; the others look again, and may find their spec is now the latest.
            let inserted = sqlx::query(
                "INSERT INTO concord_saga_definitions (name, version, spec, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name, version) DO NOTHING",
            )
            .bind(name)
            .bind(i64::from(version))
            .bind(Json(spec))
            .bind(now)
            .execute(&self.inner.pool)
            .await
            .map_err(unavailable)?;
            if inserted.rows_affected() > 0 {
                return Ok((version, true));
            }
        }
        Err(unavailable(format!(
            "definition {name}: lost the next version to concurrent puts {PUT_ATTEMPTS} times"
        )))
    }

    async fn get_definition(&self, name: &str, version: Option<u32>) -> Result<Option<StoredDefinition>, StoreError> {
        let row = sqlx::query(
            "SELECT name, version, spec, created_at FROM concord_saga_definitions \
             WHERE name = $1 AND ($2::bigint IS NULL OR version = $2) ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version.map(i64::from))
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(definition_from_row).transpose()
    }

    #[tracing::instrument(skip_all, fields(saga = %row.id))]
    async fn create_saga(&self, row: &SagaRow) -> Result<(SagaRow, bool), StoreError> {
        let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO concord_sagas ({SAGA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (id) DO NOTHING RETURNING {SAGA_COLUMNS}"
        )))
        .bind(row.id.as_str())
        .bind(&row.definition)
        .bind(i64::from(row.version))
        .bind(Json(&row.input))
        .bind(row.status.as_str())
        .bind(row.next_run_at)
        .bind(row.lease_owner)
        .bind(row.lease_until)
        .bind(bigint(row.log_version)?)
        .bind(row.created_at)
        .bind(row.updated_at)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        if let Some(stored) = inserted {
            return Ok((saga_from_row(&stored)?, true));
        }
        // ON CONFLICT waited for the other insert to commit, and rows are never deleted, so the
        // winner is visible to this next statement.
        let existing = self
            .get_saga(&row.id)
            .await?
            .ok_or_else(|| unavailable(format!("saga {} conflicted but cannot be read", row.id)))?;
        Ok((existing, false))
    }

    async fn get_saga(&self, id: &SagaId) -> Result<Option<SagaRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM concord_sagas WHERE id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(saga_from_row).transpose()
    }

    async fn list_sagas(
        &self,
        status: Option<SagaStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM concord_sagas \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR id > $2) \
             ORDER BY id LIMIT $3"
        )))
        .bind(status.map(SagaStatus::as_str))
        .bind(after)
        .bind(sql_limit(limit))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(saga_from_row).collect()
    }

    #[tracing::instrument(skip_all, fields(%owner, limit))]
    async fn claim_sagas(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError> {
        let rows = claim_due(&self.inner.pool, &SAGAS, owner, now, lease_until, limit).await?;
        let mut claimed = rows.iter().map(saga_from_row).collect::<Result<Vec<_>, _>>()?;
        // In the order the claim chose them; RETURNING has none.
        claimed.sort_by(|a, b| (a.next_run_at, &a.id).cmp(&(b.next_run_at, &b.id)));
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, fields(saga = %update.id, status = update.status.as_str()))]
    async fn update_saga(&self, update: &SagaUpdate<'_>) -> Result<bool, StoreError> {
        // The conditions are the fence: a node whose lease was taken over, or an update older
        // than what the row shows, changes nothing.
        let done = sqlx::query(
            "UPDATE concord_sagas SET status = $2, next_run_at = $3, lease_owner = $4, lease_until = $5, \
               log_version = $6, updated_at = $7 \
             WHERE id = $1 AND lease_owner IS NOT DISTINCT FROM $8 AND log_version <= $6",
        )
        .bind(update.id.as_str())
        .bind(update.status.as_str())
        .bind(update.next_run_at)
        .bind(update.lease.map(|(owner, _)| owner))
        .bind(update.lease.map(|(_, until)| until))
        .bind(bigint(update.log_version)?)
        .bind(update.now)
        .bind(update.holder)
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn wake_saga(&self, id: &SagaId, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE concord_sagas SET next_run_at = $2 \
             WHERE id = $1 AND status IN ('running', 'compensating')",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn purge_sagas(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        // SKIP LOCKED: a row a runner holds right now is left for the next round.
        let done = sqlx::query(
            "DELETE FROM concord_sagas WHERE id IN (SELECT id FROM concord_sagas WHERE next_run_at IS NULL \
             AND updated_at < $1 AND status IN ('completed', 'compensated', 'cancelled') \
             AND lease_owner IS NULL LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before)
        .bind(sql_limit(limit))
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM concord_sagas GROUP BY status ORDER BY status")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                Ok((
                    status(row.try_get("status").map_err(unavailable)?)?,
                    unsigned(row.try_get("n").map_err(unavailable)?, "count")?,
                ))
            })
            .collect()
    }
}
