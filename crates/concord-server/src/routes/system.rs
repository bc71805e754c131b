//! Health, metrics and the OpenAPI document.

use crate::error::ApiError;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use concord_api::keys::Health;

/// Liveness and readiness: answers 200 once the store answers. Needs no key.
#[utoipa::path(get, path = "/health", tag = "system",
    security(()),
    responses(
        (status = 200, description = "The store answers", body = Health),
        (status = 503, description = "store_unavailable"),
    ))]
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let head = state.events.head_position().await?;
    metrics::gauge!("concord_log_head_position").set(head as f64);
    Ok(Json(Health { status: "ok".into() }))
}

/// Prometheus text exposition. Needs no key.
#[utoipa::path(get, path = "/metrics", tag = "system",
    security(()),
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain; version=0.0.4", body = String),
    ))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The OpenAPI document of this server, its limits included", body = Object),
    ))]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.openapi.as_ref().clone())
}
