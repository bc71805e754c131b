//! The HTTP routes and the router that joins them with auth, idempotency and telemetry.

pub mod events;
pub mod keys;
pub mod sagas;
pub mod subscriptions;
pub mod system;
pub mod tx;
pub mod vault;

use crate::state::AppState;
use crate::{auth, error, telemetry};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{delete, get, post, put};

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/streams/{stream}", post(events::append).get(events::read_stream))
        .route("/v1/events", get(events::read_log))
        .route("/v1/events/subscribe", get(subscriptions::subscribe))
        .route("/v1/subscriptions/{group}/events", get(subscriptions::group_events))
        .route(
            "/v1/subscriptions/{group}/checkpoint",
            put(subscriptions::save_checkpoint),
        )
        .route(
            "/v1/saga-definitions/{name}",
            put(sagas::put_definition).get(sagas::get_definition),
        )
        .route("/v1/sagas", post(sagas::start).get(sagas::list))
        .route("/v1/sagas/{id}", get(sagas::get))
        .route("/v1/sagas/{id}/retry", post(sagas::retry))
        .route("/v1/transactions", post(tx::begin).get(tx::list))
        .route("/v1/transactions/{xid}", get(tx::get))
        .route("/v1/vault/tokenize", post(vault::tokenize))
        .route("/v1/vault/detokenize", post(vault::detokenize))
        .route(
            "/v1/vault/rules/{category}",
            put(vault::put_rules).get(vault::get_rules),
        )
        .route("/v1/vault/subjects/{subject}", delete(vault::erase_subject))
        .route("/v1/vault/keys/rotate", post(vault::rotate))
        .route("/v1/keys", post(keys::create))
        .route("/v1/keys/{id}", delete(keys::revoke))
        .route("/v1/openapi.json", get(system::openapi))
        // Layers run bottom-up: authentication first, then idempotency (which needs the caller).
        .route_layer(state.idempotency_layer.clone())
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .merge(v1)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(from_fn(telemetry::observe))
        .with_state(state)
}
