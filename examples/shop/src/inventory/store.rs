//! The inventory's use cases on its own databases, written once in portable SQL and compiled for
//! SQLite and PostgreSQL ([`crate::per_backend!`]).

use concord_sdk::barrier::{BarrierKey, Enter};
use concord_sdk::outbox::OutboxLimits;
use serde_json::{Value, json};
use sqlx::Row as _;

use super::domain::{self, Reserve, STOCK_CHANGED, STOCK_TOPIC, StockLevel};

/// The inventory's tables, in each warehouse's database: its stock, its reservations, the
/// record of each transfer side, and (used in the north's) the couriers booked for express
/// orders.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (
    warehouse TEXT NOT NULL,
    sku       TEXT NOT NULL,
    initial   BIGINT NOT NULL,
    on_hand   BIGINT NOT NULL CHECK (on_hand >= 0),
    reserved  BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    shipped   BIGINT NOT NULL DEFAULT 0,
    held      BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    version   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (warehouse, sku)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id  TEXT NOT NULL,
    sku       TEXT NOT NULL,
    warehouse TEXT NOT NULL,
    qty       BIGINT NOT NULL,
    state     TEXT NOT NULL,
    PRIMARY KEY (order_id, sku)
);
CREATE TABLE IF NOT EXISTS transfers (
    xid       TEXT NOT NULL,
    warehouse TEXT NOT NULL,
    sku       TEXT NOT NULL,
    qty       BIGINT NOT NULL,
    direction TEXT NOT NULL,
    state     TEXT NOT NULL,
    PRIMARY KEY (xid, warehouse)
);
CREATE TABLE IF NOT EXISTS couriers (
    order_id TEXT PRIMARY KEY,
    state    TEXT NOT NULL
)";

pub use crate::common::StoreError;

/// How a reservation went.
#[derive(Debug)]
pub enum Reserved {
    /// Held (now or by an earlier delivery of the same call): the step's output.
    Done(Value),
    /// Not enough stock of this sku: nothing was held.
    OutOfStock(String),
    /// The step was compensated before this call arrived.
    Refused,
}

fn level_message(level: &StockLevel) -> concord_sdk::broker::BrokerMessage {
    let mut m = concord_sdk::outbox::message(
        STOCK_TOPIC,
        &format!("{}.{}", level.warehouse, level.sku),
        serde_json::to_value(level).unwrap_or(Value::Null),
    );
    m.headers.insert("type".into(), STOCK_CHANGED.into());
    // The id names the change itself, so a consumer's inbox recognises it whatever the relay does.
    m.id = crate::common::derived_id(&[STOCK_CHANGED, &level.warehouse, &level.sku, &level.version.to_string()]);
    m
}

crate::per_backend! {
    /// Creates the tables and the stock `warehouse` starts with (once: a restart keeps the rows).
    pub async fn ensure_schema(pool: &Pool, warehouse: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
        barrier::ensure_schema(&mut *pool.acquire().await?).await?;
        outbox::ensure_schema(pool).await?;
        inbox::ensure_schema(pool).await?;
        for (sku, north, south) in domain::INITIAL_STOCK {
            let qty = if warehouse == domain::NORTH { *north } else { *south };
            // Read first: a plain read does not wait on a row a prepared transfer holds, which an
            // insert would (and a restart must not block on what recovery is about to settle).
            let present: Option<i64> = sqlx::query_scalar("SELECT version FROM stock WHERE warehouse = $1 AND sku = $2")
                .bind(warehouse)
                .bind(*sku)
                .fetch_optional(pool)
                .await?;
            if present.is_some() {
                continue;
            }
            let mut tx = begin(pool).await?;
            let inserted = sqlx::query(
                "INSERT INTO stock (warehouse, sku, initial, on_hand) VALUES ($1, $2, $3, $3) ON CONFLICT DO NOTHING",
            )
            .bind(warehouse)
            .bind(*sku)
            .bind(qty)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                // The first level is announced like every later one, so readers start from it.
                let level = StockLevel {
                    warehouse: warehouse.to_owned(),
                    sku: (*sku).to_owned(),
                    on_hand: qty,
                    reserved: 0,
                    shipped: 0,
                    held: 0,
                    version: 0,
                };
                outbox::enqueue(&mut tx, &level_message(&level), &OutboxLimits::default()).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Moves stock between the columns of one row and announces the new level through the
    /// outbox, on the caller's transaction. `None` when the row would go below zero.
    pub async fn change(
        conn: &mut Conn,
        warehouse: &str,
        sku: &str,
        deltas: [i64; 4],
    ) -> Result<Option<StockLevel>, StoreError> {
        let [on_hand, reserved, shipped, held] = deltas;
        let row = sqlx::query(
            "UPDATE stock SET on_hand = on_hand + $3, reserved = reserved + $4, shipped = shipped + $5, \
             held = held + $6, version = version + 1 \
             WHERE warehouse = $1 AND sku = $2 AND on_hand + $3 >= 0 AND reserved + $4 >= 0 AND held + $6 >= 0 \
             RETURNING warehouse, sku, on_hand, reserved, shipped, held, version",
        )
        .bind(warehouse)
        .bind(sku)
        .bind(on_hand)
        .bind(reserved)
        .bind(shipped)
        .bind(held)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let level = StockLevel {
            warehouse: row.try_get("warehouse")?,
            sku: row.try_get("sku")?,
            on_hand: row.try_get("on_hand")?,
            reserved: row.try_get("reserved")?,
            shipped: row.try_get("shipped")?,
            held: row.try_get("held")?,
            version: row.try_get("version")?,
        };
        outbox::enqueue(&mut *conn, &level_message(&level), &OutboxLimits::default()).await?;
        Ok(Some(level))
    }

    /// A `reserve-{warehouse}` step: holds every line in the warehouse, or none.
    pub async fn reserve(pool: &Pool, warehouse: &str, key: &BarrierKey, cmd: &Reserve) -> Result<Reserved, StoreError> {
        let mut tx = begin(pool).await?;
        match barrier::enter(&mut tx, key).await? {
            Enter::Run => {}
            Enter::Duplicate { output } => return Ok(Reserved::Done(output.unwrap_or(Value::Null))),
            Enter::Refused | Enter::EmptyCompensation => return Ok(Reserved::Refused),
        }
        let lines = domain::merge_lines(&cmd.items);
        for (sku, qty) in &lines {
            if change(&mut tx, warehouse, sku, [-qty, *qty, 0, 0]).await?.is_none() {
                tx.rollback().await?;
                return Ok(Reserved::OutOfStock(sku.clone()));
            }
            sqlx::query("INSERT INTO reservations (order_id, sku, warehouse, qty, state) VALUES ($1, $2, $3, $4, 'reserved')")
                .bind(&cmd.order_id)
                .bind(sku)
                .bind(warehouse)
                .bind(qty)
                .execute(&mut *tx)
                .await?;
        }
        let output = json!({ "order_id": cmd.order_id, "warehouse": warehouse, "lines": lines.len() });
        barrier::save_output(&mut tx, key, &output).await?;
        tx.commit().await?;
        Ok(Reserved::Done(output))
    }

    /// The `release` compensation: gives back what the order still holds. A release before any
    /// reservation (an empty compensation) records itself, so the late reservation is refused.
    pub async fn release(pool: &Pool, key: &BarrierKey, order_id: &str) -> Result<Value, StoreError> {
        let mut tx = begin(pool).await?;
        let released = match barrier::enter(&mut tx, key).await? {
            Enter::Run => release_rows(&mut tx, order_id).await?,
            Enter::Duplicate { .. } | Enter::EmptyCompensation | Enter::Refused => 0,
        };
        tx.commit().await?;
        Ok(json!({ "order_id": order_id, "released": released }))
    }

    async fn release_rows(conn: &mut Conn, order_id: &str) -> Result<i64, StoreError> {
        let rows = sqlx::query("SELECT sku, warehouse, qty FROM reservations WHERE order_id = $1 AND state = 'reserved'")
            .bind(order_id)
            .fetch_all(&mut *conn)
            .await?;
        for row in &rows {
            let (sku, warehouse, qty): (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            change(&mut *conn, &warehouse, &sku, [qty, -qty, 0, 0]).await?;
        }
        sqlx::query("UPDATE reservations SET state = 'released' WHERE order_id = $1 AND state = 'reserved'")
            .bind(order_id)
            .execute(&mut *conn)
            .await?;
        Ok(i64::try_from(rows.len()).unwrap_or(i64::MAX))
    }

    /// The `courier` step: books a courier for an express order (once, whatever the retries).
    pub async fn book_courier(pool: &Pool, key: &BarrierKey, order_id: &str) -> Result<Option<Value>, StoreError> {
        let mut tx = begin(pool).await?;
        match barrier::enter(&mut tx, key).await? {
            Enter::Run => {}
            Enter::Duplicate { output } => return Ok(Some(output.unwrap_or(Value::Null))),
            Enter::Refused | Enter::EmptyCompensation => return Ok(None),
        }
        sqlx::query("INSERT INTO couriers (order_id, state) VALUES ($1, 'booked') ON CONFLICT DO NOTHING")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        let output = json!({ "order_id": order_id, "courier": format!("courier-{order_id}") });
        barrier::save_output(&mut tx, key, &output).await?;
        tx.commit().await?;
        Ok(Some(output))
    }

    /// The courier's compensation: cancels the booking, if there is one (a cancel that comes
    /// first records itself, so the late booking is refused).
    pub async fn cancel_courier(pool: &Pool, key: &BarrierKey, order_id: &str) -> Result<Value, StoreError> {
        let mut tx = begin(pool).await?;
        let cancelled = match barrier::enter(&mut tx, key).await? {
            Enter::Run => sqlx::query("UPDATE couriers SET state = 'cancelled' WHERE order_id = $1 AND state = 'booked'")
                .bind(order_id)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
            Enter::Duplicate { .. } | Enter::EmptyCompensation | Enter::Refused => 0,
        };
        tx.commit().await?;
        Ok(json!({ "order_id": order_id, "cancelled": cancelled == 1 }))
    }

    /// A confirmed order's stock leaves the warehouse: its reservations become shipped. Runs once
    /// per message id (the inbox); `false` for a message handled before.
    pub async fn ship(pool: &Pool, message_id: uuid::Uuid, order_id: &str) -> Result<bool, StoreError> {
        let Some(mut tx) = inbox::begin(pool, "inventory-shipping", message_id).await? else {
            return Ok(false);
        };
        bound_lock_wait(&mut tx).await?;
        let rows = sqlx::query("SELECT sku, warehouse, qty FROM reservations WHERE order_id = $1 AND state = 'reserved'")
            .bind(order_id)
            .fetch_all(&mut *tx)
            .await?;
        for row in &rows {
            let (sku, warehouse, qty): (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            change(&mut tx, &warehouse, &sku, [0, -qty, qty, 0]).await?;
        }
        sqlx::query("UPDATE reservations SET state = 'shipped' WHERE order_id = $1 AND state = 'reserved'")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}
