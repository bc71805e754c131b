//! Saga definitions and saga rows on SQLite.
//!
//! Every write runs on the one write connection, as one statement or one `BEGIN IMMEDIATE`
//! transaction, so writes are serialized by construction: two claims never take the same row and
//! two puts of a definition never pick the same version. Times are unix microseconds (see the
//! migration), so the claim compares numbers.

use crate::sql::{WorkTable, bigint, claim_due, micros, optional_time, sql_limit, time, unsigned};
use crate::{SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::saga::{SagaId, SagaStatus};
use concord_core::ports::{SagaRow, SagaStore, SagaUpdate, StoreError, StoredDefinition};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteRow;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const SAGA_COLUMNS: &str = "id, definition, version, input, status, next_run_at, lease_owner, lease_until, log_version, created_at, updated_at";

const SAGAS: WorkTable = WorkTable {
    name: "sagas",
    key: "id",
    columns: SAGA_COLUMNS,
};

fn json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(unavailable)
}

fn status(s: &str) -> Result<SagaStatus, StoreError> {
    SagaStatus::parse(s).ok_or_else(|| unavailable(format!("unknown saga status {s:?} stored in sagas")))
}

fn saga_id(s: String) -> Result<SagaId, StoreError> {
    SagaId::parse(s).map_err(|e| unavailable(format!("{e}, stored in sagas")))
}

fn definition_from_row(row: &SqliteRow) -> Result<StoredDefinition, StoreError> {
    Ok(StoredDefinition {
        name: row.try_get("name").map_err(unavailable)?,
        version: unsigned(row.try_get("version").map_err(unavailable)?, "version")?,
        spec: json(row.try_get("spec").map_err(unavailable)?)?,
        created_at: time(row.try_get("created_at").map_err(unavailable)?)?,
    })
}

fn saga_from_row(row: &SqliteRow) -> Result<SagaRow, StoreError> {
    Ok(SagaRow {
        id: saga_id(row.try_get("id").map_err(unavailable)?)?,
        definition: row.try_get("definition").map_err(unavailable)?,
        version: unsigned(row.try_get("version").map_err(unavailable)?, "version")?,
        input: json(row.try_get("input").map_err(unavailable)?)?,
        status: status(row.try_get("status").map_err(unavailable)?)?,
        next_run_at: optional_time(row, "next_run_at")?,
        lease_owner: row.try_get::<Option<Uuid>, _>("lease_owner").map_err(unavailable)?,
        lease_until: optional_time(row, "lease_until")?,
        log_version: unsigned(row.try_get("log_version").map_err(unavailable)?, "log_version")?,
        created_at: time(row.try_get("created_at").map_err(unavailable)?)?,
        updated_at: time(row.try_get("updated_at").map_err(unavailable)?)?,
    })
}

#[async_trait]
impl SagaStore for SqliteStore {
    #[tracing::instrument(skip_all, fields(definition = name))]
    async fn put_definition(&self, name: &str, spec: &Value, now: DateTime<Utc>) -> Result<(u32, bool), StoreError> {
        // IMMEDIATE takes the write lock before the read, so the latest version read here is
        // still the latest when the insert runs.
        let mut tx = self
            .inner
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        let latest =
            sqlx::query("SELECT version, spec FROM saga_definitions WHERE name = ? ORDER BY version DESC LIMIT 1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        let mut version = 1;
        if let Some(row) = latest {
            let latest: u32 = unsigned(row.try_get("version").map_err(unavailable)?, "version")?;
            // Compared as JSON values, not as text: key order and spacing do not make a version.
            if json(row.try_get("spec").map_err(unavailable)?)? == *spec {
                return Ok((latest, false));
            }
            version = latest
                .checked_add(1)
                .ok_or_else(|| unavailable(format!("definition {name} has no versions left")))?;
        }
        sqlx::query("INSERT INTO saga_definitions (name, version, spec, created_at) VALUES (?, ?, ?, ?)")
            .bind(name)
            .bind(i64::from(version))
            .bind(spec.to_string())
            .bind(micros(now))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok((version, true))
    }

    async fn get_definition(&self, name: &str, version: Option<u32>) -> Result<Option<StoredDefinition>, StoreError> {
        let version = version.map(i64::from);
        let row = sqlx::query(
            "SELECT name, version, spec, created_at FROM saga_definitions \
             WHERE name = ? AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version)
        .bind(version)
        .fetch_optional(&self.inner.read)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(definition_from_row).transpose()
    }

    #[tracing::instrument(skip_all, fields(saga = %row.id))]
    async fn create_saga(&self, row: &SagaRow) -> Result<(SagaRow, bool), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .rows
            .send(RowOp::Create(row.clone(), tx))
            .await
            .map_err(|_| closed())?;
        if let Some(stored) = rx.await.map_err(|_| closed())?? {
            return Ok((stored, true));
        }
        // Rows are never deleted, so the one that won the id is still there.
        let existing = self
            .get_saga(&row.id)
            .await?
            .ok_or_else(|| unavailable(format!("saga {} conflicted but cannot be read", row.id)))?;
        Ok((existing, false))
    }

    async fn get_saga(&self, id: &SagaId) -> Result<Option<SagaRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE id = ?"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.inner.read)
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
        // Only the conditions that apply, so the cursor is a range on the primary key.
        let mut sql = format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE 1 = 1");
        if status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if after.is_some() {
            sql.push_str(" AND id > ?");
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(s) = status {
            query = query.bind(s.as_str());
        }
        if let Some(a) = after {
            query = query.bind(a);
        }
        let rows = query
            .bind(sql_limit(limit))
            .fetch_all(&self.inner.read)
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
        let rows = claim_due(&self.inner.write, &SAGAS, owner, now, lease_until, limit).await?;
        let mut claimed = rows.iter().map(saga_from_row).collect::<Result<Vec<_>, _>>()?;
        // In the order the claim chose them; RETURNING has none.
        claimed.sort_by(|a, b| (a.next_run_at, &a.id).cmp(&(b.next_run_at, &b.id)));
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, fields(saga = %update.id, status = update.status.as_str()))]
    async fn update_saga(&self, update: &SagaUpdate<'_>) -> Result<bool, StoreError> {
        let owned = OwnedUpdate {
            id: update.id.clone(),
            holder: update.holder,
            status: update.status,
            next_run_at: update.next_run_at,
            lease: update.lease,
            log_version: update.log_version,
            now: update.now,
        };
        let (tx, rx) = oneshot::channel();
        self.inner
            .rows
            .send(RowOp::Update(owned, tx))
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn wake_saga(&self, id: &SagaId, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE sagas SET next_run_at = ? WHERE id = ? AND status IN ('running', 'compensating')")
                .bind(micros(now))
                .bind(id.as_str())
                .execute(&self.inner.write)
                .await
                .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn purge_sagas(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        // `next_run_at IS NULL` as the partial index says it (see the migration).
        let done = sqlx::query(
            "DELETE FROM sagas WHERE id IN (SELECT id FROM sagas WHERE next_run_at IS NULL AND updated_at < ? \
             AND status IN ('completed', 'compensated', 'cancelled') AND lease_owner IS NULL LIMIT ?)",
        )
        .bind(micros(before))
        .bind(sql_limit(limit))
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM sagas GROUP BY status ORDER BY status")
            .fetch_all(&self.inner.read)
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

fn closed() -> StoreError {
    unavailable("the saga row writer has stopped")
}

/// A saga-row write waiting for the row writer.
pub(crate) enum RowOp {
    Create(SagaRow, oneshot::Sender<Result<Option<SagaRow>, StoreError>>),
    Update(OwnedUpdate, oneshot::Sender<Result<bool, StoreError>>),
}

pub(crate) struct OwnedUpdate {
    id: SagaId,
    holder: Option<Uuid>,
    status: SagaStatus,
    next_run_at: Option<DateTime<Utc>>,
    lease: Option<(Uuid, DateTime<Utc>)>,
    log_version: u64,
    now: DateTime<Utc>,
}

/// Saga-row writes waiting at most; beyond it writers wait for room.
pub(crate) const ROW_QUEUE: usize = 4096;
/// Most row writes in one transaction.
const ROW_BATCH: usize = 512;

/// Writes saga rows in batches: every create and update waiting when the write connection frees
/// up goes into one transaction, so one commit (one fsync with `synchronous=FULL`) serves many
/// sagas, as group commit does for appends. Each write is still one statement with its own
/// conditions and its own answer; a batch only shares the commit.
pub(crate) fn spawn_row_writer(write: SqlitePool) -> mpsc::Sender<RowOp> {
    let (tx, mut rx) = mpsc::channel::<RowOp>(ROW_QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < ROW_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            metrics::histogram!("concord_saga_row_batch_size").record(batch.len() as f64);
            write_rows(&write, batch).await;
        }
    });
    tx
}

enum RowResult {
    Created(Result<Option<SagaRow>, StoreError>),
    Updated(Result<bool, StoreError>),
}

async fn write_rows(write: &SqlitePool, batch: Vec<RowOp>) {
    let outcome = async {
        let mut tx = write.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let mut results = Vec::with_capacity(batch.len());
        for op in &batch {
            // A failing statement (disk full, I/O error) may have rolled the whole transaction
            // back in SQLite; the batch then stops and rolls back, and every writer hears the
            // error, so no one is told "failed" about a write that later commits.
            results.push(match op {
                RowOp::Create(row, _) => RowResult::Created(Ok(insert_row(&mut tx, row).await?)),
                RowOp::Update(u, _) => RowResult::Updated(Ok(update_row(&mut tx, u).await?)),
            });
        }
        tx.commit().await.map_err(unavailable)?;
        Ok::<_, StoreError>(results)
    }
    .await;
    match outcome {
        Ok(results) => {
            for (op, result) in batch.into_iter().zip(results) {
                match (op, result) {
                    (RowOp::Create(_, reply), RowResult::Created(r)) => drop(reply.send(r)),
                    (RowOp::Update(_, reply), RowResult::Updated(r)) => drop(reply.send(r)),
                    (RowOp::Create(_, reply), RowResult::Updated(_)) => drop(reply.send(Err(closed()))),
                    (RowOp::Update(_, reply), RowResult::Created(_)) => drop(reply.send(Err(closed()))),
                }
            }
        }
        // Nothing of the batch is written: every writer hears it.
        Err(e) => {
            for op in batch {
                match op {
                    RowOp::Create(_, reply) => drop(reply.send(Err(e.clone()))),
                    RowOp::Update(_, reply) => drop(reply.send(Err(e.clone()))),
                }
            }
        }
    }
}

async fn insert_row(conn: &mut sqlx::SqliteConnection, row: &SagaRow) -> Result<Option<SagaRow>, StoreError> {
    let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO sagas ({SAGA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO NOTHING RETURNING {SAGA_COLUMNS}"
    )))
    .bind(row.id.as_str())
    .bind(&row.definition)
    .bind(i64::from(row.version))
    .bind(row.input.to_string())
    .bind(row.status.as_str())
    .bind(row.next_run_at.map(micros))
    .bind(row.lease_owner)
    .bind(row.lease_until.map(micros))
    .bind(bigint(row.log_version)?)
    .bind(micros(row.created_at))
    .bind(micros(row.updated_at))
    .fetch_optional(&mut *conn)
    .await
    .map_err(unavailable)?;
    inserted.as_ref().map(saga_from_row).transpose()
}

async fn update_row(conn: &mut sqlx::SqliteConnection, update: &OwnedUpdate) -> Result<bool, StoreError> {
    let log_version = bigint(update.log_version)?;
    // The conditions are the fence: a node whose lease was taken over, or an update older than
    // what the row shows, changes nothing.
    let done = sqlx::query(
        "UPDATE sagas SET status = ?, next_run_at = ?, lease_owner = ?, lease_until = ?, log_version = ?, updated_at = ? \
         WHERE id = ? AND lease_owner IS ? AND log_version <= ?",
    )
    .bind(update.status.as_str())
    .bind(update.next_run_at.map(micros))
    .bind(update.lease.map(|(owner, _)| owner))
    .bind(update.lease.map(|(_, until)| micros(until)))
    .bind(log_version)
    .bind(micros(update.now))
    .bind(update.id.as_str())
    .bind(update.holder)
    .bind(log_version)
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    Ok(done.rows_affected() > 0)
}
