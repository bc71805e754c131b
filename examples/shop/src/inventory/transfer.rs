//! Each warehouse's side of a stock transfer, as a two-phase-commit participant: on SQLite a
//! reservation (the source holds the units at prepare), on PostgreSQL a prepared transaction.

use concord_sdk::tx::{BoxError, WorkError, Xid};
use serde_json::Value;
use sqlx::{PgConnection, SqliteConnection};

use super::domain::{Side, Transfer};
use super::store::{on_pg, on_sqlite};

fn parse(warehouse: &str, payload: &Value) -> Result<(Transfer, Side), WorkError> {
    let t: Transfer = serde_json::from_value(payload.clone())
        .map_err(|_| WorkError::refused("a transfer is {sku, qty, from, to}"))?;
    let side = t.side(warehouse).map_err(WorkError::refused)?;
    Ok((t, side))
}

async fn record(
    conn: &mut SqliteConnection,
    xid: &Xid,
    warehouse: &str,
    t: &Transfer,
    side: Side,
) -> Result<(), sqlx::Error> {
    let direction = if side == Side::Source { "out" } else { "in" };
    sqlx::query(
        "INSERT INTO transfers (xid, warehouse, sku, qty, direction, state) VALUES ($1, $2, $3, $4, $5, 'held')",
    )
    .bind(xid.as_str())
    .bind(warehouse)
    .bind(&t.sku)
    .bind(t.qty)
    .bind(direction)
    .execute(conn)
    .await
    .map(drop)
}

async fn set_state(conn: &mut SqliteConnection, xid: &Xid, warehouse: &str, state: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE transfers SET state = $3 WHERE xid = $1 AND warehouse = $2")
        .bind(xid.as_str())
        .bind(warehouse)
        .bind(state)
        .execute(conn)
        .await
        .map(drop)
}

/// The SQLite side: the source sets the units aside (`held`) at prepare.
pub struct SqliteSide {
    pub warehouse: String,
}

#[async_trait::async_trait]
impl concord_sdk::tx::sqlite::ReservationWork for SqliteSide {
    async fn reserve(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), WorkError> {
        let (t, side) = parse(&self.warehouse, payload)?;
        if side == Side::Source {
            let held = on_sqlite::change(conn, &self.warehouse, &t.sku, [-t.qty, 0, 0, t.qty])
                .await
                .map_err(WorkError::failed)?;
            if held.is_none() {
                return Err(WorkError::refused(format!(
                    "{} has fewer than {} {}",
                    self.warehouse, t.qty, t.sku
                )));
            }
        }
        record(conn, xid, &self.warehouse, &t, side)
            .await
            .map_err(WorkError::failed)
    }

    async fn apply(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), BoxError> {
        let (t, side) = parse(&self.warehouse, payload).map_err(|e| e.to_string())?;
        let deltas = if side == Side::Source {
            [0, 0, 0, -t.qty]
        } else {
            [t.qty, 0, 0, 0]
        };
        on_sqlite::change(conn, &self.warehouse, &t.sku, deltas)
            .await?
            .ok_or("the held units are gone")?;
        set_state(conn, xid, &self.warehouse, "applied").await?;
        Ok(())
    }

    async fn release(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), BoxError> {
        let (t, side) = parse(&self.warehouse, payload).map_err(|e| e.to_string())?;
        if side == Side::Source {
            on_sqlite::change(conn, &self.warehouse, &t.sku, [t.qty, 0, 0, -t.qty])
                .await?
                .ok_or("the held units are gone")?;
        }
        set_state(conn, xid, &self.warehouse, "released").await?;
        Ok(())
    }
}

/// The PostgreSQL side: the whole change is one transaction left prepared until phase 2.
pub struct PgSide {
    pub warehouse: String,
}

#[async_trait::async_trait]
impl concord_sdk::tx::postgres::PreparedWork for PgSide {
    async fn run(&self, conn: &mut PgConnection, xid: &Xid, payload: &Value) -> Result<(), WorkError> {
        let (t, side) = parse(&self.warehouse, payload)?;
        sqlx::query("SET LOCAL lock_timeout = '2s'").execute(&mut *conn).await?;
        let deltas = if side == Side::Source {
            [-t.qty, 0, 0, 0]
        } else {
            [t.qty, 0, 0, 0]
        };
        let changed = on_pg::change(conn, &self.warehouse, &t.sku, deltas)
            .await
            .map_err(WorkError::failed)?;
        if changed.is_none() {
            return Err(WorkError::refused(format!(
                "{} has fewer than {} {}",
                self.warehouse, t.qty, t.sku
            )));
        }
        let direction = if side == Side::Source { "out" } else { "in" };
        sqlx::query(
            "INSERT INTO transfers (xid, warehouse, sku, qty, direction, state) VALUES ($1, $2, $3, $4, $5, 'applied')",
        )
        .bind(xid.as_str())
        .bind(&self.warehouse)
        .bind(&t.sku)
        .bind(t.qty)
        .bind(direction)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
