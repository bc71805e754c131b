//! Authentication and authorization of every `/v1` route: deny by default.
//!
//! The middleware runs after routing, looks the (method, route) pair up in [`RouteScopes`](crate::scopes::RouteScopes) (what
//! each handler declares as its operation's security) and refuses any route that declares
//! nothing, so a new route is closed until someone decides who may call it.

use crate::error::ApiError;
use crate::scopes::Need;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use concord_api::ErrorCode;
use concord_core::app::auth::authenticate_cached;
use concord_core::domain::{KeyHash, Principal};

/// Resolves the bearer key to a [`Principal`] (401 when absent or unknown), checks the route's
/// scope (403), and hands the principal to the handler as an extension.
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "send Authorization: Bearer <api key>"))?;
    let hash = KeyHash::of(presented);
    let principal = authenticate_cached(state.keys.as_ref(), &state.key_cache, &hash)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown or revoked API key"))?;
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    match state.route_scopes.need(req.method(), &route) {
        Some(Need::AnyKey) => {}
        Some(Need::Scope(scope)) if principal.allows(*scope) => {}
        Some(Need::Scope(scope)) => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this route needs the scope {scope}"),
            ));
        }
        None => return Err(ApiError::new(ErrorCode::Forbidden, "no scope grants this route")),
    }
    // Held until the handler answered (an event stream's body is counted by max_subscribers).
    let _slot = state
        .key_slots
        .try_take(principal.key_id)
        .ok_or_else(|| crate::limits::too_many_requests(state.settings.max_concurrent_requests_per_key))?;
    req.extensions_mut().insert::<Principal>(principal);
    Ok(next.run(req).await)
}
