//! Rows of the 2PC coordinator's transactions on SQLite.
//!
//! Every write is one statement on the one write connection, so writes are serialized by
//! construction: two claims never take the same row. Times are unix microseconds (see the
//! migration), so the claim compares numbers.

use crate::sql::{WorkTable, bigint, claim_due, micros, optional_time, sql_limit, time, unsigned};
use crate::{SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::tx::{Outcome, Xid};
use concord_core::ports::{StoreError, TxRow, TxStore, TxUpdate};
use sqlx::Row as _;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

const TX_COLUMNS: &str =
    "xid, outcome, pending, next_run_at, lease_owner, lease_until, log_version, created_at, updated_at";

const TRANSACTIONS: WorkTable = WorkTable {
    name: "transactions",
    key: "xid",
    columns: TX_COLUMNS,
};

fn outcome(s: Option<&str>) -> Result<Option<Outcome>, StoreError> {
    s.map(|s| Outcome::parse(s).ok_or_else(|| unavailable(format!("unknown outcome {s:?} stored in transactions"))))
        .transpose()
}

fn xid(s: String) -> Result<Xid, StoreError> {
    Xid::parse(s).map_err(|e| unavailable(format!("{e}, stored in transactions")))
}

fn tx_from_row(row: &SqliteRow) -> Result<TxRow, StoreError> {
    Ok(TxRow {
        xid: xid(row.try_get("xid").map_err(unavailable)?)?,
        outcome: outcome(row.try_get("outcome").map_err(unavailable)?)?,
        pending: row.try_get("pending").map_err(unavailable)?,
        next_run_at: optional_time(row, "next_run_at")?,
        lease_owner: row.try_get::<Option<Uuid>, _>("lease_owner").map_err(unavailable)?,
        lease_until: optional_time(row, "lease_until")?,
        log_version: unsigned(row.try_get("log_version").map_err(unavailable)?, "log_version")?,
        created_at: time(row.try_get("created_at").map_err(unavailable)?)?,
        updated_at: time(row.try_get("updated_at").map_err(unavailable)?)?,
    })
}

#[async_trait]
impl TxStore for SqliteStore {
    #[tracing::instrument(skip_all, fields(xid = %row.xid))]
    async fn create_tx(&self, row: &TxRow) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO transactions ({TX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )))
        .bind(row.xid.as_str())
        .bind(row.outcome.map(Outcome::as_str))
        .bind(row.pending)
        .bind(row.next_run_at.map(micros))
        .bind(row.lease_owner)
        .bind(row.lease_until.map(micros))
        .bind(bigint(row.log_version)?)
        .bind(micros(row.created_at))
        .bind(micros(row.updated_at))
        .execute(&self.inner.write)
        .await
        .map_err(|e| match e.as_database_error() {
            // Xids are generated, so a second row with one is a bug upstream, not a retry.
            Some(d) if d.is_unique_violation() => unavailable(format!("transaction {} exists", row.xid)),
            _ => unavailable(e),
        })?;
        Ok(())
    }

    async fn get_tx(&self, xid: &Xid) -> Result<Option<TxRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TX_COLUMNS} FROM transactions WHERE xid = ?"
        )))
        .bind(xid.as_str())
        .fetch_optional(&self.inner.read)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(tx_from_row).transpose()
    }

    async fn list_txs(
        &self,
        outcome: Option<Option<Outcome>>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError> {
        // Only the conditions that apply, so the cursor is a range on the primary key. `IS`
        // compares NULL too: `Some(None)` asks for the undecided rows.
        let mut sql = format!("SELECT {TX_COLUMNS} FROM transactions WHERE 1 = 1");
        if outcome.is_some() {
            sql.push_str(" AND outcome IS ?");
        }
        if pending.is_some() {
            sql.push_str(" AND pending = ?");
        }
        if after.is_some() {
            sql.push_str(" AND xid > ?");
        }
        sql.push_str(" ORDER BY xid LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(o) = outcome {
            query = query.bind(o.map(Outcome::as_str));
        }
        if let Some(p) = pending {
            query = query.bind(p);
        }
        if let Some(a) = after {
            query = query.bind(a);
        }
        let rows = query
            .bind(sql_limit(limit))
            .fetch_all(&self.inner.read)
            .await
            .map_err(unavailable)?;
        rows.iter().map(tx_from_row).collect()
    }

    #[tracing::instrument(skip_all, fields(%owner, limit))]
    async fn claim_txs(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError> {
        let rows = claim_due(&self.inner.write, &TRANSACTIONS, owner, now, lease_until, limit).await?;
        let mut claimed = rows.iter().map(tx_from_row).collect::<Result<Vec<_>, _>>()?;
        // In the order the claim chose them; RETURNING has none.
        claimed.sort_by(|a, b| (a.next_run_at, &a.xid).cmp(&(b.next_run_at, &b.xid)));
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, fields(xid = %update.xid, pending = update.pending))]
    async fn update_tx(&self, update: &TxUpdate<'_>) -> Result<bool, StoreError> {
        let log_version = bigint(update.log_version)?;
        // The conditions are the fence: a node whose lease was taken over, or an update older
        // than what the row shows, changes nothing.
        let done = sqlx::query(
            "UPDATE transactions SET outcome = ?, pending = ?, next_run_at = ?, lease_owner = ?, lease_until = ?, \
               log_version = ?, updated_at = ? \
             WHERE xid = ? AND lease_owner IS ? AND log_version <= ?",
        )
        .bind(update.outcome.map(Outcome::as_str))
        .bind(update.pending)
        .bind(update.next_run_at.map(micros))
        .bind(update.lease.map(|(owner, _)| owner))
        .bind(update.lease.map(|(_, until)| micros(until)))
        .bind(log_version)
        .bind(micros(update.now))
        .bind(update.xid.as_str())
        .bind(update.holder)
        .bind(log_version)
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(skip_all)]
    async fn purge_txs(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM transactions WHERE xid IN (SELECT xid FROM transactions WHERE next_run_at IS NULL \
             AND updated_at < ? AND outcome IS NOT NULL AND pending = 0 AND lease_owner IS NULL LIMIT ?)",
        )
        .bind(micros(before))
        .bind(sql_limit(limit))
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn pending_txs(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        // `WHERE pending` as the partial index says it (see the migration).
        let row = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM transactions WHERE pending")
            .fetch_one(&self.inner.read)
            .await
            .map_err(unavailable)?;
        Ok((
            unsigned(row.try_get("n").map_err(unavailable)?, "count")?,
            optional_time(&row, "oldest")?,
        ))
    }
}
