//! `Idempotency-Key` on the mutating routes: the service kit's one layer (the IETF draft's
//! semantics: a completed request is replayed, the same key with another request is 422, a key
//! whose first request is still running is 409), configured for the server: keys are optional,
//! scoped per API key, and kept as the settings say.

use axum::http::{Method, StatusCode};
use concord_core::domain::Principal;
use concord_core::ports::IdempotencyStore;
use concord_sdk::idempotency::{IdempotencyConfig, IdempotencyConfigError, IdempotencyLayer};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;

/// The request's `Idempotency-Key`, as the layer in front of the handler accepted it (one
/// header, valid), when it has one.
#[must_use]
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(concord_sdk::idempotency::IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// Largest response kept for replay; API responses are small JSON documents.
const MAX_STORED_RESPONSE: usize = 4 * 1024 * 1024;

/// The server's answers that a retry would get again are kept: every answer but a server error
/// and those that say "try again" (408, 425, 429). A refusal such as 409
/// `wrong_expected_version` is kept: the same request gets the same answer. An answer that
/// carries a secret (a new API key, a revealed value) is marked
/// [`DoNotStore`](concord_sdk::idempotency::DoNotStore) by its route and never kept.
#[must_use]
pub fn store_policy(status: StatusCode) -> bool {
    !status.is_server_error()
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
}

/// The layer of the `/v1` routes, over `store`. It runs after authentication: a key is scoped to
/// the API key that sent it. `fingerprint_secret` keys the fingerprints of request bodies, so a
/// stored fingerprint of a body holding a card number cannot be matched against guesses; every
/// node must use the same.
///
/// # Errors
/// When the settings' times are out of range.
pub fn layer(
    store: Arc<dyn IdempotencyStore>,
    settings: &Settings,
    fingerprint_secret: &[u8],
) -> Result<IdempotencyLayer, IdempotencyConfigError> {
    let config = IdempotencyConfig::default()
        .methods([Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .require_key(false)
        .fingerprint_secret(fingerprint_secret)
        .max_body_bytes(settings.max_body_bytes)
        .max_response_bytes(MAX_STORED_RESPONSE)
        .lock_ttl(Duration::from_secs(settings.idempotency_lock_s))
        .ttl(Duration::from_secs(settings.idempotency_ttl_s))
        // Scoped by the API key's id itself; a request without a principal (the layer placed
        // before authentication) is refused rather than share a key space.
        .owner(|parts| parts.extensions.get::<Principal>().map(|p| p.key_id))
        .store_response_when(store_policy);
    IdempotencyLayer::new(store, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_kept_and_try_again_answers_are_not() {
        for kept in [200, 201, 400, 403, 404, 409, 422] {
            assert!(store_policy(StatusCode::from_u16(kept).unwrap()), "{kept}");
        }
        for released in [408, 425, 429, 500, 503] {
            assert!(!store_policy(StatusCode::from_u16(released).unwrap()), "{released}");
        }
    }
}
