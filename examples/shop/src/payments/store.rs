//! The payments table and its barrier, written once for both backends.

use concord_sdk::barrier::{BarrierKey, Enter};
use serde_json::Value;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS charges (
    order_id   TEXT PRIMARY KEY,
    amount     BIGINT NOT NULL,
    card_token TEXT NOT NULL,
    charge_id  TEXT NOT NULL,
    state      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_charges (
    order_id     TEXT PRIMARY KEY,
    saga_id      TEXT NOT NULL,
    step         TEXT NOT NULL,
    amount       BIGINT NOT NULL,
    card_token   TEXT NOT NULL,
    callback_url TEXT NOT NULL,
    completed    BIGINT NOT NULL DEFAULT 0,
    -- A fault asked for: the result is recorded but never posted to the saga (0/1).
    lost         BIGINT NOT NULL DEFAULT 0,
    -- A fault asked for: the provider's webhook is not taken before this time (Unix ms), as
    -- if it came late, after the call's late answer.
    hold_until   BIGINT NOT NULL DEFAULT 0
)";

/// A charge the provider confirms later: where its saga step waits for the result.
#[derive(Debug, Clone)]
pub struct PendingCharge {
    pub order_id: String,
    pub saga_id: String,
    pub step: String,
    pub amount: i64,
    pub card_token: String,
    pub callback_url: String,
    /// The completion is to be lost (a fault the demo asks for).
    pub lost: bool,
    /// The webhook is not taken before this time, Unix milliseconds (a fault the demo asks for).
    pub hold_until: i64,
}

pub use crate::common::StoreError;

/// Where a saga call stands at the barrier.
#[derive(Debug)]
pub enum Gate {
    /// Go on.
    Open,
    /// Answered before: its output.
    Done(Value),
    /// Compensated before it ran: refuse.
    Refused,
}

crate::per_backend! {
    pub async fn ensure_schema(pool: &Pool) -> Result<(), StoreError> {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
        barrier::ensure_schema(&mut *pool.acquire().await?).await?;
        Ok(())
    }

    /// Looks at the barrier without keeping anything: the provider is called outside any
    /// transaction, so no lock is held across it.
    pub async fn peek(pool: &Pool, key: &BarrierKey) -> Result<Gate, StoreError> {
        let mut tx = begin(pool).await?;
        let gate = match barrier::enter(&mut tx, key).await? {
            Enter::Run => Gate::Open,
            Enter::Duplicate { output } => Gate::Done(output.unwrap_or(Value::Null)),
            Enter::Refused | Enter::EmptyCompensation => Gate::Refused,
        };
        tx.rollback().await?;
        Ok(gate)
    }

    /// Records a captured charge behind the barrier.
    pub async fn record_charge(
        pool: &Pool,
        key: Option<&BarrierKey>,
        order_id: &str,
        amount: i64,
        card_token: &str,
        charge_id: &str,
    ) -> Result<Gate, StoreError> {
        let mut tx = begin(pool).await?;
        if let Some(key) = key {
            match barrier::enter(&mut tx, key).await? {
                Enter::Run => {}
                Enter::Duplicate { output } => return Ok(Gate::Done(output.unwrap_or(Value::Null))),
                Enter::Refused | Enter::EmptyCompensation => return Ok(Gate::Refused),
            }
        }
        sqlx::query(
            "INSERT INTO charges (order_id, amount, card_token, charge_id, state) VALUES ($1, $2, $3, $4, 'charged') \
             ON CONFLICT DO NOTHING",
        )
        .bind(order_id)
        .bind(amount)
        .bind(card_token)
        .bind(charge_id)
        .execute(&mut *tx)
        .await?;
        let output = serde_json::json!({ "order_id": order_id, "charge_id": charge_id, "amount": amount });
        if let Some(key) = key {
            barrier::save_output(&mut tx, key, &output).await?;
        }
        tx.commit().await?;
        Ok(Gate::Done(output))
    }

    /// Records the compensation at the barrier (so a late charge is refused).
    pub async fn enter_refund(pool: &Pool, key: &BarrierKey) -> Result<(), StoreError> {
        let mut tx = begin(pool).await?;
        let _recorded = barrier::enter(&mut tx, key).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps where an asynchronous charge's result goes; a later attempt's URL replaces an
    /// earlier one's.
    pub async fn save_pending(pool: &Pool, p: &PendingCharge) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO pending_charges (order_id, saga_id, step, amount, card_token, callback_url, lost, hold_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (order_id) DO UPDATE SET callback_url = excluded.callback_url, hold_until = excluded.hold_until",
        )
        .bind(&p.order_id)
        .bind(&p.saga_id)
        .bind(&p.step)
        .bind(p.amount)
        .bind(&p.card_token)
        .bind(&p.callback_url)
        .bind(i64::from(p.lost))
        .bind(p.hold_until)
        .execute(pool)
        .await?;
        Ok(())
    }

    pub async fn pending(pool: &Pool, order_id: &str) -> Result<Option<PendingCharge>, StoreError> {
        type Row = (String, String, String, i64, String, String, i64, i64);
        let row: Option<Row> = sqlx::query_as(
            "SELECT order_id, saga_id, step, amount, card_token, callback_url, lost, hold_until \
             FROM pending_charges WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(pool)
        .await?;
        Ok(row.map(|(order_id, saga_id, step, amount, card_token, callback_url, lost, hold_until)| PendingCharge {
            order_id,
            saga_id,
            step,
            amount,
            card_token,
            callback_url,
            lost: lost != 0,
            hold_until,
        }))
    }

    /// The saga took the result from this URL.
    pub async fn mark_completed(pool: &Pool, order_id: &str, callback_url: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE pending_charges SET completed = 1 WHERE order_id = $1 AND callback_url = $2")
            .bind(order_id)
            .bind(callback_url)
            .execute(pool)
            .await?;
        Ok(())
    }

    pub async fn mark_refunded(pool: &Pool, order_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE charges SET state = 'refunded' WHERE order_id = $1")
            .bind(order_id)
            .execute(pool)
            .await?;
        Ok(())
    }
}
