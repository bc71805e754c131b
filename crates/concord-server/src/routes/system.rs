//! Health, metrics and the OpenAPI document.

use crate::error::ApiError;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use concord_api::keys::Health;

/// Liveness and readiness: answers 200 once the store answers.
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let head = state.events.head_position().await?;
    metrics::gauge!("concord_log_head_position").set(head as f64);
    Ok(Json(Health { status: "ok".into() }))
}

/// Prometheus text exposition.
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}
