//! The inventory service's HTTP face.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use concord_sdk::barrier::BarrierOp;
use concord_sdk::tx::{CoordinatorAuth, Participant};
use serde_json::json;

use serde::Deserialize;

use super::domain::{NORTH, Reserve, SOUTH};
use super::store::{self, Reserved};
use crate::common::{Db, Faults, internal, ok, problem, saga_call};

pub struct Inventory {
    pub north: Db,
    pub south: Db,
    pub faults: Faults,
}

impl Inventory {
    fn warehouse(&self, name: &str) -> Option<&Db> {
        match name {
            NORTH => Some(&self.north),
            SOUTH => Some(&self.south),
            _ => None,
        }
    }
}

pub fn router(
    state: Arc<Inventory>,
    participants: [(&str, Arc<dyn Participant>); 2],
    token: String,
    tx_token: String,
) -> Router {
    let routes = Router::new()
        .route("/warehouses/{warehouse}/reservations", post(reserve))
        .route("/warehouses/{warehouse}/reservations/{order_id}/release", post(release))
        .route("/couriers", post(book_courier))
        .route("/couriers/{order_id}/cancel", post(cancel_courier))
        .route("/stock", get(stock))
        .with_state(state);
    // The coordinator's routes check the coordinator's own token.
    let mut coordinator = Router::new();
    for (warehouse, participant) in participants {
        coordinator = coordinator.nest(
            &format!("/2pc/{warehouse}"),
            concord_sdk::tx::router(participant, CoordinatorAuth::Token(tx_token.clone())),
        );
    }
    crate::common::service_router(routes, coordinator, token)
}

fn no_warehouse(name: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "unknown_warehouse",
        format!("no warehouse {:?}", name.chars().take(40).collect::<String>()),
    )
}

async fn reserve(
    State(s): State<Arc<Inventory>>,
    Path(warehouse): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(db) = s.warehouse(&warehouse) else {
        return no_warehouse(&warehouse);
    };
    saga_call(&s.faults, &headers, BarrierOp::Action, |key| async move {
        let Ok(cmd) = serde_json::from_slice::<Reserve>(&body) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_reservation",
                "the body is {order_id, items}",
            );
        };
        let result = match db {
            Db::Sqlite(p) => store::on_sqlite::reserve(p, &warehouse, &key, &cmd).await,
            Db::Pg(p) => store::on_pg::reserve(p, &warehouse, &key, &cmd).await,
        };
        match result {
            Ok(Reserved::Done(output)) => ok(output),
            Ok(Reserved::OutOfStock(sku)) => problem(StatusCode::CONFLICT, "out_of_stock", format!("not enough {sku}")),
            Ok(Reserved::Refused) => problem(StatusCode::CONFLICT, "already_compensated", "the step was compensated"),
            Err(e) => internal("reservation failed", &e),
        }
    })
    .await
}

async fn release(
    State(s): State<Arc<Inventory>>,
    headers: HeaderMap,
    Path((warehouse, order_id)): Path<(String, String)>,
) -> Response {
    let Some(db) = s.warehouse(&warehouse) else {
        return no_warehouse(&warehouse);
    };
    saga_call(&s.faults, &headers, BarrierOp::Compensation, |key| async move {
        let result = match db {
            Db::Sqlite(p) => store::on_sqlite::release(p, &key, &order_id).await,
            Db::Pg(p) => store::on_pg::release(p, &key, &order_id).await,
        };
        match result {
            Ok(v) => ok(v),
            Err(e) => internal("release failed", &e),
        }
    })
    .await
}

#[derive(Deserialize)]
struct BookCourier {
    order_id: String,
}

/// Books a courier for an express order (kept in the north's database, where orders ship from).
async fn book_courier(State(s): State<Arc<Inventory>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let s = &*s;
    saga_call(&s.faults, &headers, BarrierOp::Action, |key| async move {
        let Ok(cmd) = serde_json::from_slice::<BookCourier>(&body) else {
            return problem(StatusCode::BAD_REQUEST, "invalid_courier", "the body is {order_id}");
        };
        let result = match &s.north {
            Db::Sqlite(p) => store::on_sqlite::book_courier(p, &key, &cmd.order_id).await,
            Db::Pg(p) => store::on_pg::book_courier(p, &key, &cmd.order_id).await,
        };
        match result {
            Ok(Some(output)) => ok(output),
            Ok(None) => problem(StatusCode::CONFLICT, "already_compensated", "the step was compensated"),
            Err(e) => internal("booking a courier failed", &e),
        }
    })
    .await
}

async fn cancel_courier(State(s): State<Arc<Inventory>>, headers: HeaderMap, Path(order_id): Path<String>) -> Response {
    let s = &*s;
    saga_call(&s.faults, &headers, BarrierOp::Compensation, |key| async move {
        let result = match &s.north {
            Db::Sqlite(p) => store::on_sqlite::cancel_courier(p, &key, &order_id).await,
            Db::Pg(p) => store::on_pg::cancel_courier(p, &key, &order_id).await,
        };
        match result {
            Ok(v) => ok(v),
            Err(e) => internal("cancelling the courier failed", &e),
        }
    })
    .await
}

async fn stock(State(s): State<Arc<Inventory>>) -> Response {
    type Row = (String, String, i64, i64, i64);
    let rows: Result<Vec<Row>, sqlx::Error> = crate::with_db!(&s.north, |p| {
        sqlx::query_as("SELECT warehouse, sku, on_hand, reserved, shipped FROM stock ORDER BY sku")
            .fetch_all(p)
            .await
    });
    match rows {
        Ok(rows) => ok(json!(
            rows.into_iter()
                .map(|(w, sku, on_hand, reserved, shipped)| json!({"warehouse": w, "sku": sku, "on_hand": on_hand, "reserved": reserved, "shipped": shipped}))
                .collect::<Vec<_>>()
        )),
        Err(e) => internal("reading stock failed", &e),
    }
}
