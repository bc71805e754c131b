//! `/v1/saga-batches`: bulk operations on the sagas a filter matches, run server-side.

use crate::error::ApiError;
use crate::saga::batch::{Batch, BatchAction, BatchError, BatchFilter};
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use concord_api::ErrorCode;
use concord_api::sagas::{BatchActionIn, BatchCountOut, BatchFilterIn, BatchIn, BatchOut, SagaStatusIn};
use concord_core::domain::Principal;
use concord_core::domain::saga::SagaStatus;
use serde::Deserialize;
use utoipa::IntoParams;

fn batch_error(e: BatchError) -> ApiError {
    match e {
        BatchError::NotFound(id) => ApiError::new(ErrorCode::SagaBatchNotFound, format!("no saga batch {id}")),
        BatchError::Saga(e) => e.into(),
        BatchError::Store(e) => e.into(),
    }
}

fn filter_in(f: &BatchFilter) -> BatchFilterIn {
    BatchFilterIn {
        status: f.status.and_then(|s| SagaStatusIn::parse(s.as_str())),
        definition: f.definition.clone(),
        started_before: f.started_before,
        started_after: f.started_after,
    }
}

fn batch_out(b: &Batch) -> BatchOut {
    BatchOut {
        id: b.id.to_string(),
        action: match b.action {
            BatchAction::Cancel => BatchActionIn::Cancel,
            BatchAction::Pause => BatchActionIn::Pause,
            BatchAction::Resume => BatchActionIn::Resume,
            BatchAction::Retry => BatchActionIn::Retry,
        },
        filter: filter_in(&b.filter),
        status: if b.finished { "finished" } else { "running" }.to_owned(),
        matched: b.matched,
        applied: b.applied,
        refused: b.refused,
        after: b.after.clone(),
        created_at: b.created_at,
        updated_at: b.updated_at,
    }
}

/// Acts on every saga a filter matches, server-side, page by page, each page recorded: a batch
/// that a crash stopped is taken over by a node from its last page. `dry_run` only counts.
#[utoipa::path(post, path = "/v1/saga-batches", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    request_body = BatchIn,
    responses(
        (status = 200, description = "A dry run: how many sagas the filter matches now", body = BatchCountOut),
        (status = 202, description = "The batch is recorded and runs; follow it at GET /v1/saga-batches/{id}", body = BatchOut),
        (status = 400, description = "malformed_json: not JSON, or an action or status outside the lists"),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<BatchIn>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let action = match body.action {
        BatchActionIn::Cancel => BatchAction::Cancel,
        BatchActionIn::Pause => BatchAction::Pause,
        BatchActionIn::Resume => BatchAction::Resume,
        BatchActionIn::Retry => BatchAction::Retry,
    };
    let status = body.filter.status.and_then(|s| SagaStatus::parse(s.as_str()));
    let filter = BatchFilter {
        status,
        definition: body.filter.definition,
        started_before: body.filter.started_before,
        started_after: body.filter.started_after,
    };
    if body.dry_run {
        let matched = state.batches.count(&filter).await.map_err(batch_error)?;
        return Ok(Json(BatchCountOut { matched }).into_response());
    }
    let batch = state
        .batches
        .start(filter, action, Some(principal.key_id.to_string()))
        .await
        .map_err(batch_error)?;
    Ok((StatusCode::ACCEPTED, Json(batch_out(&batch))).into_response())
}

/// A batch named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BatchPath {
    /// The batch's id, as `POST /v1/saga-batches` answered it.
    pub id: String,
}

/// A batch and how far it got.
#[utoipa::path(get, path = "/v1/saga-batches/{id}", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    params(BatchPath),
    responses(
        (status = 200, description = "The batch", body = BatchOut),
        (status = 404, description = "saga_batch_not_found"),
    ))]
pub async fn get(State(state): State<AppState>, Path(path): Path<BatchPath>) -> Result<Json<BatchOut>, ApiError> {
    let Ok(id) = uuid::Uuid::parse_str(&path.id) else {
        return Err(batch_error(BatchError::NotFound(path.id.chars().take(64).collect())));
    };
    let batch = state.batches.get(&id).await.map_err(batch_error)?;
    Ok(Json(batch_out(&batch)))
}
