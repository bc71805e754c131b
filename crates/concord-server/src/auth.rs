//! Authentication and authorization of every `/v1` route: deny by default.
//!
//! The middleware runs after routing, looks the (method, route) pair up in [`ROUTE_SCOPES`] and
//! refuses any route that is missing from it, so a new route is closed until someone decides who
//! may call it.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use concord_api::ErrorCode;
use concord_core::app::auth::authenticate_cached;
use concord_core::domain::{KeyHash, Principal};

/// What a route needs: a scope, or only a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Scope(&'static str),
    AnyKey,
}

/// Every authenticated route and what it needs.
pub const ROUTE_SCOPES: &[(&str, &str, Need)] = &[
    ("POST", "/v1/streams/{stream}", Need::Scope("events:write")),
    ("GET", "/v1/streams/{stream}", Need::Scope("events:read")),
    ("GET", "/v1/events", Need::Scope("events:read")),
    ("GET", "/v1/events/subscribe", Need::Scope("events:read")),
    ("GET", "/v1/subscriptions/{group}/events", Need::Scope("events:read")),
    // A consumer moves its own group's cursor: part of reading.
    (
        "PUT",
        "/v1/subscriptions/{group}/checkpoint",
        Need::Scope("events:read"),
    ),
    ("PUT", "/v1/saga-definitions/{name}", Need::Scope("sagas:write")),
    ("GET", "/v1/saga-definitions/{name}", Need::Scope("sagas:read")),
    ("POST", "/v1/sagas", Need::Scope("sagas:write")),
    ("GET", "/v1/sagas", Need::Scope("sagas:read")),
    ("GET", "/v1/sagas/{id}", Need::Scope("sagas:read")),
    ("POST", "/v1/sagas/{id}/retry", Need::Scope("sagas:write")),
    ("POST", "/v1/transactions", Need::Scope("tx:write")),
    ("GET", "/v1/transactions", Need::Scope("tx:read")),
    ("GET", "/v1/transactions/{xid}", Need::Scope("tx:read")),
    ("POST", "/v1/vault/tokenize", Need::Scope("vault:tokenize")),
    // Each item needs the detokenize scope of its type; the vault checks them (deny by default).
    ("POST", "/v1/vault/detokenize", Need::AnyKey),
    ("PUT", "/v1/vault/rules/{category}", Need::Scope("vault:admin")),
    ("GET", "/v1/vault/rules/{category}", Need::Scope("vault:admin")),
    ("DELETE", "/v1/vault/subjects/{subject}", Need::Scope("vault:admin")),
    ("POST", "/v1/vault/keys/rotate", Need::Scope("vault:admin")),
    ("POST", "/v1/keys", Need::Scope("admin")),
    ("DELETE", "/v1/keys/{id}", Need::Scope("admin")),
    ("GET", "/v1/openapi.json", Need::AnyKey),
];

fn need_of(method: &Method, route: &str) -> Option<Need> {
    ROUTE_SCOPES
        .iter()
        .find(|(m, r, _)| *m == method.as_str() && *r == route)
        .map(|(_, _, n)| *n)
}

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
    match need_of(req.method(), &route) {
        Some(Need::AnyKey) => {}
        Some(Need::Scope(scope)) if principal.allows(scope) => {}
        Some(Need::Scope(scope)) => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this route needs the scope {scope}"),
            ));
        }
        None => return Err(ApiError::new(ErrorCode::Forbidden, "no scope grants this route")),
    }
    req.extensions_mut().insert::<Principal>(principal);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlisted_routes_need_something_no_key_has() {
        assert_eq!(need_of(&Method::GET, "/v1/secret"), None);
        assert_eq!(need_of(&Method::DELETE, "/v1/streams/{stream}"), None);
        assert_eq!(
            need_of(&Method::POST, "/v1/streams/{stream}"),
            Some(Need::Scope("events:write"))
        );
    }
}
