//! The query service's HTTP face: reads through the cache.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use concord_sdk::cache::Cache;
use serde_json::{Value, json};
use sqlx::Row as _;

use super::views::stock_key;
use crate::common::{Db, internal, ok, problem};

pub struct Query {
    pub db: Db,
    pub orders: Cache<Value>,
    pub stock: Cache<Value>,
}

pub fn router(state: Arc<Query>, token: String) -> Router {
    crate::common::service_router(
        Router::new()
            .route("/orders/{id}", get(order))
            .route("/stock/{warehouse}/{sku}", get(stock))
            .with_state(state),
        Router::new(),
        token,
    )
}

/// One order of the read model: `(value, log position)`.
///
/// # Errors
/// The database's.
pub async fn load_order(db: &Db, id: &str) -> Result<Option<(Value, u64)>, sqlx::Error> {
    let row = crate::with_db!(db, |p| {
        let sql = format!(
            "SELECT order_id, customer, total, status, position FROM {} WHERE order_id = $1",
            super::ORDERS_VIEW
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(p)
            .await?
            .map(|r| {
                Ok::<_, sqlx::Error>((
                    json!({
                        "order_id": r.try_get::<String, _>(0)?,
                        "customer": r.try_get::<String, _>(1)?,
                        "total": r.try_get::<i64, _>(2)?,
                        "status": r.try_get::<String, _>(3)?,
                    }),
                    u64::try_from(r.try_get::<i64, _>(4)?).unwrap_or(0),
                ))
            })
            .transpose()
    })?;
    Ok(row)
}

/// One stock row of the read model: `(value, version)`.
///
/// # Errors
/// The database's.
pub async fn load_stock(db: &Db, warehouse: &str, sku: &str) -> Result<Option<(Value, u64)>, sqlx::Error> {
    crate::with_db!(db, |p| {
        sqlx::query(
            "SELECT on_hand, reserved, shipped, held, version FROM stock_view WHERE warehouse = $1 AND sku = $2",
        )
        .bind(warehouse)
        .bind(sku)
        .fetch_optional(p)
        .await?
        .map(|r| {
            Ok::<_, sqlx::Error>((
                json!({
                    "warehouse": warehouse,
                    "sku": sku,
                    "on_hand": r.try_get::<i64, _>(0)?,
                    "reserved": r.try_get::<i64, _>(1)?,
                    "shipped": r.try_get::<i64, _>(2)?,
                    "held": r.try_get::<i64, _>(3)?,
                    "version": r.try_get::<i64, _>(4)?,
                }),
                u64::try_from(r.try_get::<i64, _>(4)?).unwrap_or(0),
            ))
        })
        .transpose()
    })
}

async fn order(State(s): State<Arc<Query>>, Path(id): Path<String>) -> Response {
    match s.orders.get_or_load(&id, || load_order(&s.db, &id)).await {
        Ok(Some(v)) => ok(v),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "no such order in the read model",
        ),
        Err(e) => internal("reading the order failed", &e),
    }
}

async fn stock(State(s): State<Arc<Query>>, Path((warehouse, sku)): Path<(String, String)>) -> Response {
    let key = stock_key(&warehouse, &sku);
    match s.stock.get_or_load(&key, || load_stock(&s.db, &warehouse, &sku)).await {
        Ok(Some(v)) => ok(v),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "stock_not_found",
            "no such stock row in the read model",
        ),
        Err(e) => internal("reading the stock failed", &e),
    }
}
