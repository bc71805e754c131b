//! The orders service's HTTP face.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use concord_sdk::idempotency::IdempotencyLayer;
use serde_json::Value;

use super::app::{OrderError, Orders};
use super::domain::{PlaceOrder, Transition};
use crate::common::{internal, ok, problem};

/// The header by which the demo asks for faults on an order's saga calls (honoured only with `--faults`).
pub const FAULTS_HEADER: &str = "x-shop-faults";

pub fn router(orders: Arc<Orders>, idempotency: IdempotencyLayer, token: String) -> Router {
    crate::common::service_router(
        Router::new()
            .route("/orders", post(place).layer(idempotency))
            .route("/orders/{id}", get(view))
            .route("/orders/{id}/saga/open", post(open))
            .route("/orders/{id}/saga/confirm", post(confirm))
            .route("/orders/{id}/saga/reject", post(reject))
            .with_state(orders),
        Router::new(),
        token,
    )
}

fn answer(result: Result<Value, OrderError>) -> Response {
    match result {
        Ok(v) => ok(v),
        Err(OrderError::Invalid(e)) => problem(StatusCode::BAD_REQUEST, "invalid_order", e.to_string()),
        Err(OrderError::NotFound(id)) => problem(StatusCode::NOT_FOUND, "order_not_found", format!("no order {id}")),
        Err(e @ OrderError::Conflict(_)) => problem(StatusCode::CONFLICT, "order_conflict", e.to_string()),
        Err(e @ OrderError::KeyReused) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            e.to_string(),
        ),
        Err(OrderError::Concord(e)) => match e.status() {
            // The caller's own mistake as Concord judged it (the vault refusing the card, say).
            Some(s @ 400..=499) if !matches!(s, 401 | 403 | 408 | 429) => problem(
                StatusCode::BAD_REQUEST,
                "invalid_order",
                "the order was refused by the platform",
            ),
            _ => internal("concord call failed", &e),
        },
    }
}

async fn place(State(orders): State<Arc<Orders>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Ok(cmd) = serde_json::from_slice::<PlaceOrder>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_order",
            "the body is {customer, items: [{sku, qty}], card}",
        );
    };
    let Some(key) = headers
        .get(concord_sdk::barrier::IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "idempotency_key_missing",
            "Idempotency-Key is required",
        );
    };
    let faults = headers
        .get(FAULTS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or(Value::Null);
    match orders.place(&cmd, key, faults).await {
        Ok(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        Err(e) => answer(Err(e)),
    }
}

async fn view(State(orders): State<Arc<Orders>>, Path(id): Path<String>) -> Response {
    answer(orders.view(&id).await)
}

async fn open(State(orders): State<Arc<Orders>>, Path(id): Path<String>) -> Response {
    answer(
        orders
            .load(&id)
            .await
            .map(|o| serde_json::json!({ "order_id": o.placed.order_id })),
    )
}

async fn confirm(State(orders): State<Arc<Orders>>, Path(id): Path<String>) -> Response {
    answer(orders.transition(&id, Transition::Confirm, None).await)
}

async fn reject(State(orders): State<Arc<Orders>>, Path(id): Path<String>) -> Response {
    answer(
        orders
            .transition(&id, Transition::Reject, Some("the place-order saga was compensated"))
            .await,
    )
}
