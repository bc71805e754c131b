//! Rows of the 2PC coordinator's transactions on PostgreSQL, shared by every node.
//!
//! Each method is one statement the database arbitrates (and one round trip, which the
//! coordinator's throughput depends on): a claim locks the rows it picks with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers neither take the same row nor wait on each
//! other; an update is applied only while its conditions hold (the lease is the fencing token).

use crate::sql::{WorkTable, bigint, claim_due, sql_limit, unsigned};
use crate::{PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::domain::tx::{Outcome, Xid};
use concord_core::ports::{StoreError, TxRow, TxStore, TxUpdate};
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use uuid::Uuid;

const TX_COLUMNS: &str =
    "xid, outcome, pending, next_run_at, lease_owner, lease_until, log_version, created_at, updated_at";

const TRANSACTIONS: WorkTable = WorkTable {
    name: "concord_transactions",
    key: "xid",
    columns: TX_COLUMNS,
};

fn outcome(s: Option<&str>) -> Result<Option<Outcome>, StoreError> {
    s.map(|s| {
        Outcome::parse(s).ok_or_else(|| unavailable(format!("unknown outcome {s:?} stored in concord_transactions")))
    })
    .transpose()
}

fn xid(s: String) -> Result<Xid, StoreError> {
    Xid::parse(s).map_err(|e| unavailable(format!("{e}, stored in concord_transactions")))
}

fn tx_from_row(row: &PgRow) -> Result<TxRow, StoreError> {
    Ok(TxRow {
        xid: xid(row.try_get("xid").map_err(unavailable)?)?,
        outcome: outcome(row.try_get("outcome").map_err(unavailable)?)?,
        pending: row.try_get("pending").map_err(unavailable)?,
        next_run_at: row.try_get("next_run_at").map_err(unavailable)?,
        lease_owner: row.try_get("lease_owner").map_err(unavailable)?,
        lease_until: row.try_get("lease_until").map_err(unavailable)?,
        log_version: unsigned(row.try_get("log_version").map_err(unavailable)?, "log_version")?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
        updated_at: row.try_get("updated_at").map_err(unavailable)?,
    })
}

#[async_trait]
impl TxStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(xid = %row.xid))]
    async fn create_tx(&self, row: &TxRow) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO concord_transactions ({TX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )))
        .bind(row.xid.as_str())
        .bind(row.outcome.map(Outcome::as_str))
        .bind(row.pending)
        .bind(row.next_run_at)
        .bind(row.lease_owner)
        .bind(row.lease_until)
        .bind(bigint(row.log_version)?)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&self.inner.pool)
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
            "SELECT {TX_COLUMNS} FROM concord_transactions WHERE xid = $1"
        )))
        .bind(xid.as_str())
        .fetch_optional(&self.inner.pool)
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
        // $1 says whether to filter on the outcome at all, since $2 = NULL is itself a filter
        // (`Some(None)`: the undecided rows).
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TX_COLUMNS} FROM concord_transactions \
             WHERE (NOT $1 OR outcome IS NOT DISTINCT FROM $2::text) AND ($3::boolean IS NULL OR pending = $3) \
               AND ($4::text IS NULL OR xid > $4) \
             ORDER BY xid LIMIT $5"
        )))
        .bind(outcome.is_some())
        .bind(outcome.flatten().map(Outcome::as_str))
        .bind(pending)
        .bind(after)
        .bind(sql_limit(limit))
        .fetch_all(&self.inner.pool)
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
        let rows = claim_due(&self.inner.pool, &TRANSACTIONS, owner, now, lease_until, limit).await?;
        let mut claimed = rows.iter().map(tx_from_row).collect::<Result<Vec<_>, _>>()?;
        // In the order the claim chose them; RETURNING has none.
        claimed.sort_by(|a, b| (a.next_run_at, &a.xid).cmp(&(b.next_run_at, &b.xid)));
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, fields(xid = %update.xid, pending = update.pending))]
    async fn update_tx(&self, update: &TxUpdate<'_>) -> Result<bool, StoreError> {
        // The conditions are the fence: a node whose lease was taken over, or an update older
        // than what the row shows, changes nothing.
        let done = sqlx::query(
            "UPDATE concord_transactions SET outcome = $2, pending = $3, next_run_at = $4, lease_owner = $5, \
               lease_until = $6, log_version = $7, updated_at = $8 \
             WHERE xid = $1 AND lease_owner IS NOT DISTINCT FROM $9 AND log_version <= $7",
        )
        .bind(update.xid.as_str())
        .bind(update.outcome.map(Outcome::as_str))
        .bind(update.pending)
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

    #[tracing::instrument(skip_all)]
    async fn purge_txs(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM concord_transactions WHERE xid IN (SELECT xid FROM concord_transactions \
             WHERE next_run_at IS NULL AND updated_at < $1 AND outcome IS NOT NULL AND NOT pending \
             AND lease_owner IS NULL LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before)
        .bind(sql_limit(limit))
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn pending_txs(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM concord_transactions WHERE pending")
                .fetch_one(&self.inner.pool)
                .await
                .map_err(unavailable)?;
        Ok((
            unsigned(row.try_get("n").map_err(unavailable)?, "count")?,
            row.try_get("oldest").map_err(unavailable)?,
        ))
    }
}
