//! Participant hosts' flow-control state and the sagas parked on them, on PostgreSQL, shared by
//! every node.
//!
//! A host's state is one JSONB row. A change holds that row's lock (`FOR UPDATE`) from the read
//! to the write, so changes to one host from any node apply one after the other; a host without a
//! row gets one inserted first (`ON CONFLICT DO NOTHING`, so nodes racing to create it queue on
//! the same row). Waking parked sagas is one statement: the rows it forgets are locked with
//! `SKIP LOCKED`, so concurrent wakers of one host share the parked sagas instead of waiting.

use crate::sql::sql_limit;
use crate::{PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::flow::HostState;
use concord_core::domain::saga::SagaId;
use concord_core::ports::{HostChange, HostStore, StoreError};
use sqlx::Row as _;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;

/// The host's state, its row locked until the transaction ends; `None` when it has no row.
async fn lock_host(conn: &mut PgConnection, host: &str) -> Result<Option<HostState>, StoreError> {
    let state: Option<Json<HostState>> =
        sqlx::query_scalar("SELECT state FROM concord_participant_hosts WHERE host = $1 FOR UPDATE")
            .bind(host)
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
    Ok(state.map(|s| s.0))
}

#[async_trait]
impl HostStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(host))]
    async fn change_host(&self, host: &str, change: HostChange<'_>) -> Result<HostState, StoreError> {
        let mut tx = self.inner.pool.begin().await.map_err(unavailable)?;
        let mut state = if let Some(state) = lock_host(&mut tx, host).await? {
            state
        } else {
            // A row to lock: of the nodes creating it at once, one inserts, the others wait on
            // its insert and then on its lock, and read the state it left.
            sqlx::query(
                "INSERT INTO concord_participant_hosts (host, state, updated_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (host) DO NOTHING",
            )
            .bind(host)
            .bind(Json(HostState::default()))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            lock_host(&mut tx, host)
                .await?
                .ok_or_else(|| unavailable(format!("host {host} was created but cannot be read")))?
        };
        if change(&mut state) {
            sqlx::query("UPDATE concord_participant_hosts SET state = $2, updated_at = now() WHERE host = $1")
                .bind(host)
                .bind(Json(&state))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
        } else {
            // Nothing to write: rolling back also takes back the default row, if this change
            // inserted it, so a host nobody changed keeps no state.
            tx.rollback().await.map_err(unavailable)?;
        }
        Ok(state)
    }

    async fn get_host(&self, host: &str) -> Result<Option<HostState>, StoreError> {
        let state: Option<Json<HostState>> =
            sqlx::query_scalar("SELECT state FROM concord_participant_hosts WHERE host = $1")
                .bind(host)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(unavailable)?;
        Ok(state.map(|s| s.0))
    }

    async fn list_hosts(&self) -> Result<Vec<(String, HostState)>, StoreError> {
        // Byte order, whatever the database's collation: the order every adapter answers.
        let rows = sqlx::query("SELECT host, state FROM concord_participant_hosts ORDER BY host COLLATE \"C\"")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        let mut hosts = Vec::with_capacity(rows.len());
        for row in &rows {
            let host: String = row.try_get("host").map_err(unavailable)?;
            // One row this version cannot read must not stop flow control for every host.
            match row.try_get::<Json<HostState>, _>("state") {
                Ok(state) => hosts.push((host, state.0)),
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "a participant host's state cannot be read; skipped")
                }
            }
        }
        Ok(hosts)
    }

    #[tracing::instrument(skip_all, fields(host, saga = %id))]
    async fn park_saga(&self, host: &str, id: &SagaId, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO concord_parked_sagas (host, saga_id, parked_at) VALUES ($1, $2, $3) \
             ON CONFLICT (host, saga_id) DO UPDATE SET parked_at = EXCLUDED.parked_at",
        )
        .bind(host)
        .bind(id.as_str())
        .bind(now)
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(host, limit))]
    async fn wake_parked(&self, host: &str, now: DateTime<Utc>, limit: usize) -> Result<usize, StoreError> {
        // One statement: the parked rows go and their sagas come due together. A saga finished
        // meanwhile (NULL next_run_at) or already due is left as it is. Data-modifying CTEs run
        // once and to completion whether or not the outer query reads them.
        let forgotten: i64 = sqlx::query_scalar(
            "WITH w AS ( \
               DELETE FROM concord_parked_sagas WHERE host = $1 AND saga_id IN ( \
                 SELECT saga_id FROM concord_parked_sagas WHERE host = $1 \
                 ORDER BY parked_at, saga_id LIMIT $3 \
                 FOR UPDATE SKIP LOCKED) \
               RETURNING saga_id), \
             u AS ( \
               UPDATE concord_sagas SET next_run_at = $2 \
               WHERE id IN (SELECT saga_id FROM w) AND next_run_at > $2) \
             SELECT COUNT(*) FROM w",
        )
        .bind(host)
        .bind(now)
        .bind(sql_limit(limit))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        usize::try_from(forgotten).map_err(|_| unavailable(format!("forgot {forgotten} parked sagas")))
    }

    async fn parked_on(&self, id: &SagaId) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT host FROM concord_parked_sagas WHERE saga_id = $1 ORDER BY host LIMIT 1")
            .bind(id.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(unavailable)
    }
}
