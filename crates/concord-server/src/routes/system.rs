//! Health, metrics and the OpenAPI document.

use crate::error::ApiError;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use concord_api::ErrorCode;
use concord_api::keys::Health;

/// Liveness: answers 200 while the process serves, whatever its database does (a restart would
/// not bring a database back). Needs no key.
#[utoipa::path(get, path = "/health", tag = "system",
    security(()),
    responses(
        (status = 200, description = "The process serves", body = Health),
    ))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Readiness: 200 when the store answers and the server is not draining; 503 while the database
/// is unreachable (`store_unavailable`) and from the start of a shutdown on (`draining`), so a
/// load balancer sends no request to a stopping node. Needs no key.
#[utoipa::path(get, path = "/ready", tag = "system",
    security(()),
    responses(
        (status = 200, description = "Ready for requests", body = Health),
        (status = 503, description = "store_unavailable or draining"),
    ))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            ErrorCode::Draining,
            "this node is shutting down; send requests to another",
        ));
    }
    let head = state.events.head_position().await?;
    metrics::gauge!("concord_log_head_position").set(head as f64);
    Ok(Json(Health { status: "ready".into() }))
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
