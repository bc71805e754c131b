//! Creating and revoking API keys.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use concord_api::ErrorCode;
use concord_api::keys::{CreateKeyBody, CreatedKey};
use concord_core::app::auth::{create_key, revoke_key};
use concord_core::domain::{Principal, Scope};
use concord_sdk::idempotency::DoNotStore;
use uuid::Uuid;

/// Creates an API key; the key is shown only in this answer.
#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    security(("bearer" = ["admin"])),
    request_body = CreateKeyBody,
    responses(
        (status = 201, description = "Created; the key is shown only here, and never kept for replay", body = CreatedKey),
        (status = 400, description = "invalid_scope or invalid_parameter"),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<CreateKeyBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let (record, key) = create_key(
        state.keys.as_ref(),
        state.vault.as_ref(),
        &principal,
        &body.name,
        &body.scopes,
    )
    .await?;
    tracing::info!(key_id = %record.id, name = %record.name, "api key created");
    let created = CreatedKey {
        id: record.id,
        name: record.name,
        scopes: record.scopes.iter().map(Scope::as_str).map(str::to_owned).collect(),
        key,
    };
    let mut resp = (StatusCode::CREATED, Json(created)).into_response();
    resp.extensions_mut().insert(DoNotStore);
    Ok(resp)
}

/// Revokes an API key.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    security(("bearer" = ["admin"])),
    params(("id" = uuid::Uuid, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "invalid_parameter: not a UUID"),
        (status = 404, description = "key_not_found"),
    ))]
pub async fn revoke(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::parameter("id", "must be a UUID"))?;
    if revoke_key(state.keys.as_ref(), &state.key_cache, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(ErrorCode::KeyNotFound, format!("no live key {id}")))
    }
}
