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
use concord_core::app::auth::{KeyError, create_key};
use concord_core::domain::{Principal, Scope};
use concord_sdk::idempotency::DoNotStore;
use uuid::Uuid;

pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<CreateKeyBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    // admin cannot reveal vault values itself, but it can make a key that can: that grant is
    // recorded in the vault's audit trail before the key exists.
    let reveals: Vec<&str> = body
        .scopes
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with("vault:detokenize"))
        .collect();
    if !reveals.is_empty() {
        state.vault.record_grant(&principal, &body.name, &reveals).await?;
    }
    let (record, key) = create_key(state.keys.as_ref(), &body.name, &body.scopes)
        .await
        .map_err(|e| match e {
            KeyError::Invalid(v) => ApiError::from(v),
            KeyError::Store(s) => ApiError::from(s),
        })?;
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

pub async fn revoke(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::parameter("id", "must be a UUID"))?;
    if state.keys.revoke_key(id).await? {
        state.key_cache.forget(id);
        tracing::info!(key_id = %id, "api key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(ErrorCode::KeyNotFound, format!("no live key {id}")))
    }
}
