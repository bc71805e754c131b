//! Participant hosts' flow-control state and the sagas parked on them, on SQLite.
//!
//! A host's state is one row of JSON text. Every write runs on the one write connection, a change
//! in one `BEGIN IMMEDIATE` transaction from the read to the write, so changes to one host apply
//! one after the other. Times are unix microseconds (see the migration), as for sagas, so waking
//! compares numbers with the sagas' `next_run_at`.

use crate::sql::{micros, sql_limit};
use crate::{SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::flow::HostState;
use concord_core::domain::saga::SagaId;
use concord_core::ports::{HostChange, HostStore, StoreError};
use sqlx::Row as _;

fn host_state(host: &str, text: &str) -> Result<HostState, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| unavailable(format!("{e}, in the state of host {host} stored in participant_hosts")))
}

#[async_trait]
impl HostStore for SqliteStore {
    #[tracing::instrument(skip_all, fields(host))]
    async fn change_host(&self, host: &str, change: HostChange<'_>) -> Result<HostState, StoreError> {
        // IMMEDIATE takes the write lock before the read, so the state read here is still the
        // state when the write runs.
        let mut tx = self
            .inner
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        let stored: Option<String> = sqlx::query_scalar("SELECT state FROM participant_hosts WHERE host = ?")
            .bind(host)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut state = stored
            .as_deref()
            .map(|text| host_state(host, text))
            .transpose()?
            .unwrap_or_default();
        if change(&mut state) {
            let text = serde_json::to_string(&state).map_err(unavailable)?;
            sqlx::query(
                "INSERT INTO participant_hosts (host, state, updated_at) VALUES (?, ?, ?) \
                 ON CONFLICT (host) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            )
            .bind(host)
            .bind(text)
            .bind(micros(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
        } else {
            // Nothing written: a host nobody changed keeps no state.
            tx.rollback().await.map_err(unavailable)?;
        }
        Ok(state)
    }

    async fn get_host(&self, host: &str) -> Result<Option<HostState>, StoreError> {
        let stored: Option<String> = sqlx::query_scalar("SELECT state FROM participant_hosts WHERE host = ?")
            .bind(host)
            .fetch_optional(&self.inner.read)
            .await
            .map_err(unavailable)?;
        stored.as_deref().map(|text| host_state(host, text)).transpose()
    }

    async fn list_hosts(&self) -> Result<Vec<(String, HostState)>, StoreError> {
        let rows = sqlx::query("SELECT host, state FROM participant_hosts ORDER BY host")
            .fetch_all(&self.inner.read)
            .await
            .map_err(unavailable)?;
        let mut hosts = Vec::with_capacity(rows.len());
        for row in &rows {
            let host: String = row.try_get("host").map_err(unavailable)?;
            let text: String = row.try_get("state").map_err(unavailable)?;
            // One row this version cannot read must not stop flow control for every host.
            match host_state(&host, &text) {
                Ok(state) => hosts.push((host, state)),
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
            "INSERT INTO parked_sagas (host, saga_id, parked_at) VALUES (?, ?, ?) \
             ON CONFLICT (host, saga_id) DO UPDATE SET parked_at = excluded.parked_at",
        )
        .bind(host)
        .bind(id.as_str())
        .bind(micros(now))
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(host, limit))]
    async fn wake_parked(&self, host: &str, now: DateTime<Utc>, limit: usize) -> Result<usize, StoreError> {
        // The same choice of parked rows in both statements: nothing else writes between them.
        const CHOSEN: &str = "SELECT saga_id FROM parked_sagas WHERE host = ? \
                              ORDER BY parked_at, saga_id LIMIT ?";
        let mut tx = self
            .inner
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        // A saga finished meanwhile (NULL next_run_at) or already due is left as it is.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sagas SET next_run_at = ? WHERE next_run_at > ? AND id IN ({CHOSEN})"
        )))
        .bind(micros(now))
        .bind(micros(now))
        .bind(host)
        .bind(sql_limit(limit))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let forgotten = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM parked_sagas WHERE host = ? AND saga_id IN ({CHOSEN})"
        )))
        .bind(host)
        .bind(host)
        .bind(sql_limit(limit))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        tx.commit().await.map_err(unavailable)?;
        usize::try_from(forgotten).map_err(|_| unavailable(format!("forgot {forgotten} parked sagas")))
    }

    async fn parked_on(&self, id: &SagaId) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT host FROM parked_sagas WHERE saga_id = ? ORDER BY host LIMIT 1")
            .bind(id.as_str())
            .fetch_optional(&self.inner.read)
            .await
            .map_err(unavailable)
    }
}
