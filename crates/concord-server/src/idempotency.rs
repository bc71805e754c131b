//! `Idempotency-Key` on mutating routes, with the IETF draft's semantics: a completed request is
//! replayed, the same key with another request is 422, a key whose first request is still running
//! is 409. Keys are scoped per API key and expire.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use concord_api::ErrorCode;
use concord_core::domain::{IdempotencyKey, Principal};
use concord_core::ports::{IdempotencyBegin, IdempotencyClaim, StoredResponse};

pub const HEADER: &str = "idempotency-key";

/// Marks a response whose body holds a secret, so that it is never kept for replay: stored
/// responses sit in the database in plaintext.
#[derive(Debug, Clone, Copy)]
pub struct SecretResponse;
/// Set on a response that is a replay of a stored one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Largest response kept for replay; API responses are small JSON documents.
const MAX_STORED_RESPONSE: usize = 4 * 1024 * 1024;

pub async fn idempotency(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let mutating = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let Some(raw) = req.headers().get(HEADER).filter(|_| mutating) else {
        return Ok(next.run(req).await);
    };
    let key = IdempotencyKey::parse(raw.to_str().unwrap_or("")).map_err(concord_core::domain::ValidationError::from)?;
    let owner = req
        .extensions()
        .get::<Principal>()
        .map(|p| p.key_id)
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "idempotency runs after authentication"))?;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, state.settings.max_body_bytes)
        .await
        .map_err(|_| ApiError::new(ErrorCode::BodyTooLarge, "request body over the configured limit"))?;
    let target = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let now = Utc::now();
    let claim = IdempotencyClaim {
        owner,
        key: &key,
        fingerprint: state.vault.fingerprint(parts.method.as_str(), target, &bytes),
        now,
        locked_until: now + secs(state.settings.idempotency_lock_s),
        expires_at: now + secs(state.settings.idempotency_ttl_s),
    };
    match state.idempotency.begin(&claim).await? {
        IdempotencyBegin::Replay(stored) => return Ok(replay(stored)),
        IdempotencyBegin::Mismatch => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different request",
            ));
        }
        IdempotencyBegin::InFlight => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyInFlight,
                "the first request with this Idempotency-Key is still running",
            ));
        }
        IdempotencyBegin::Started => {}
    }
    // Run the request to completion even if the client goes away, so the key is never left
    // holding a half-finished request until its lock expires.
    let req = Request::from_parts(parts, Body::from(bytes));
    let store = state.idempotency.clone();
    let (fingerprint, locked_until, expires_at) = (claim.fingerprint, claim.locked_until, claim.expires_at);
    let finished = tokio::spawn(async move {
        let claim = IdempotencyClaim {
            owner,
            key: &key,
            fingerprint,
            now,
            locked_until,
            expires_at,
        };
        let resp = next.run(req).await;
        let (parts, body) = resp.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_STORED_RESPONSE).await else {
            let _ = store.release(&claim).await;
            return ApiError::new(ErrorCode::Internal, "response too large to keep").into_response();
        };
        // A server error may be transient: give the key back so a retry runs the request again.
        // A response carrying a secret (a new API key) is never stored: a retry runs again.
        let outcome = if parts.status.is_server_error() || parts.extensions.get::<SecretResponse>().is_some() {
            store.release(&claim).await
        } else {
            let stored = StoredResponse {
                status: parts.status.as_u16(),
                content_type: parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: bytes.to_vec(),
            };
            store.complete(&claim, &stored).await
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "could not record the idempotent response");
        }
        Response::from_parts(parts, Body::from(bytes))
    });
    finished
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("request task failed: {e}")))
}

fn secs(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, stored.body).into_response();
    if let Some(ct) = stored.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp.headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    resp
}
