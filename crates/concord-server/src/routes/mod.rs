//! The HTTP routes, each declared once, and the router that joins them with auth, idempotency
//! and telemetry.

pub mod batches;
pub mod events;
pub mod keys;
pub mod participants;
pub mod sagas;
pub mod subscriptions;
pub mod system;
pub mod tx;
pub mod vault;

use crate::config::Settings;
use crate::state::AppState;
use crate::{auth, error, openapi, telemetry};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Every route, declared once: the `#[utoipa::path]` on its handler gives its method, its path,
/// the scope it needs (its `security`) and its OpenAPI operation, and `routes!` registers it with
/// axum and with the document alike. The first router's routes need no key; the second's (`/v1`)
/// go through authentication and `Idempotency-Key`.
fn declared() -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let public = OpenApiRouter::new()
        .routes(routes!(system::health))
        .routes(routes!(system::ready))
        .routes(routes!(system::metrics))
        // No key: the token in the URL is the capability (see the handler).
        .routes(routes!(sagas::complete));
    let v1 = OpenApiRouter::new()
        .routes(routes!(events::append, events::read_stream))
        .routes(routes!(events::read_log))
        .routes(routes!(subscriptions::subscribe))
        .routes(routes!(subscriptions::group_events))
        .routes(routes!(subscriptions::save_checkpoint))
        .routes(routes!(sagas::put_definition, sagas::get_definition))
        .routes(routes!(sagas::start, sagas::list))
        .routes(routes!(sagas::get))
        .routes(routes!(sagas::retry))
        .routes(routes!(sagas::cancel))
        .routes(routes!(sagas::pause))
        .routes(routes!(sagas::resume))
        .routes(routes!(sagas::retry_now))
        .routes(routes!(sagas::signal))
        .routes(routes!(batches::create))
        .routes(routes!(batches::get))
        .routes(routes!(participants::put, participants::get))
        .routes(routes!(participants::list))
        .routes(routes!(tx::begin, tx::list))
        .routes(routes!(tx::get))
        .routes(routes!(vault::tokenize))
        .routes(routes!(vault::detokenize))
        .routes(routes!(vault::put_rules, vault::get_rules))
        .routes(routes!(vault::erase_subject))
        .routes(routes!(vault::rotate))
        .routes(routes!(keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(system::openapi));
    (public, v1)
}

/// The OpenAPI document of this server: the declared routes, what every route of a kind answers,
/// and the limits `settings` choose.
#[must_use]
pub fn document(settings: &Settings) -> serde_json::Value {
    let (public, v1) = declared();
    let declared = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(public)
        .merge(v1)
        .into_openapi();
    openapi::finish(&declared, settings)
}

/// Bounds a handler by `request_timeout_ms` (503 `request_timed_out` past it). It runs inside
/// the idempotency layer, which sees the 503 and frees the key at once.
async fn request_timeout(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = std::time::Duration::from_millis(state.settings.request_timeout_ms);
    crate::limits::within(limit, next.run(req)).await
}

/// Bounds the whole request, body upload and idempotency layer included, a little past
/// `request_timeout_ms` so the handler's own bound answers first.
async fn whole_request_timeout(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = std::time::Duration::from_millis(state.settings.request_timeout_ms + 5_000);
    crate::limits::within(limit, next.run(req)).await
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let (public, v1) = declared();
    // Layers run bottom-up: authentication first, then idempotency (which needs the caller),
    // then the handler's time bound.
    let v1 = v1
        .route_layer(from_fn_with_state(state.clone(), request_timeout))
        .route_layer(state.idempotency_layer.clone())
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    let (router, _) = OpenApiRouter::new().merge(public).merge(v1).split_for_parts();
    router
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), whole_request_timeout))
        .layer(from_fn(telemetry::observe))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use crate::scopes::{Need, RouteScopes};
    use axum::http::Method;
    use concord_core::domain::Scope;

    fn scopes() -> RouteScopes {
        let doc = super::document(&crate::config::Settings::default());
        RouteScopes::from_document(&doc).unwrap()
    }

    #[test]
    fn undeclared_routes_need_something_no_key_has() {
        let scopes = scopes();
        assert_eq!(scopes.need(&Method::GET, "/v1/secret"), None);
        assert_eq!(scopes.need(&Method::DELETE, "/v1/streams/{stream}"), None);
        assert_eq!(
            scopes.need(&Method::POST, "/v1/streams/{stream}"),
            Some(&Need::Scope(Scope::parse("events:write").unwrap()))
        );
        assert_eq!(scopes.need(&Method::POST, "/v1/vault/detokenize"), Some(&Need::AnyKey));
        assert_eq!(scopes.need(&Method::GET, "/health"), None, "public: never behind auth");
    }

    #[test]
    fn every_v1_operation_declares_what_it_needs() {
        let doc = super::document(&crate::config::Settings::default());
        let scopes = scopes();
        let mut count = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, _) in item.as_object().unwrap() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let declared = scopes.need(&method, path).is_some();
                assert_eq!(declared, path.starts_with("/v1/"), "{method} {path}");
                count += 1;
            }
        }
        assert_eq!(count, 38, "every operation of the API");
    }

    #[test]
    fn an_unknown_scope_is_refused_when_the_table_is_built() {
        let doc = serde_json::json!({"paths": {"/v1/x": {"get": {"security": [{"bearer": ["events:delete"]}]}}}});
        assert!(RouteScopes::from_document(&doc).is_err());
    }

    #[test]
    fn every_error_answer_is_a_problem_document_and_limits_follow_the_settings() {
        let settings = crate::config::Settings {
            max_events_per_append: 7,
            max_read_limit: 50,
            ..crate::config::Settings::default()
        };
        let doc = super::document(&settings);
        assert_eq!(
            doc["components"]["schemas"]["AppendBody"]["properties"]["events"]["maxItems"],
            7
        );
        let limit = doc["paths"]["/v1/events"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert_eq!(limit["schema"]["maximum"], 50);
        let append = &doc["paths"]["/v1/streams/{stream}"]["post"];
        for status in ["400", "401", "403", "409", "413", "415", "422", "500", "503"] {
            assert!(
                append["responses"][status]["content"]["application/problem+json"].is_object(),
                "{status}: {}",
                append["responses"][status]
            );
        }
        assert!(
            append["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "Idempotency-Key")
        );
        let health = &doc["paths"]["/health"]["get"];
        assert!(health["responses"]["401"].is_null(), "public routes need no key");
    }
}
