//! What every handler shares: the ports, the limits and the shutdown signal.

use crate::config::Settings;
use concord_core::domain::Limits;
use concord_core::ports::{CheckpointStore, EventStore, IdempotencyStore, KeyStore};
use std::sync::Arc;
use tokio::sync::watch;

/// Shared application state.
#[derive(Clone)]
pub struct AppState {
    pub events: Arc<dyn EventStore>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    pub keys: Arc<dyn KeyStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// The `Idempotency-Key` layer of the `/v1` routes, over `idempotency`.
    pub idempotency_layer: concord_sdk::idempotency::IdempotencyLayer,
    /// This server's OpenAPI document (`GET /v1/openapi.json`).
    pub openapi: Arc<serde_json::Value>,
    /// What each `/v1` operation needs, read off the document's security requirements.
    pub route_scopes: Arc<crate::scopes::RouteScopes>,
    pub limits: Limits,
    pub settings: Arc<Settings>,
    /// True from the start of a shutdown (SIGTERM) on: readiness answers 503 `draining`.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Turns true when the server starts shutting down, so long-lived streams end.
    pub shutdown: watch::Receiver<bool>,
    pub key_cache: Arc<concord_core::app::auth::KeyCache>,
    pub sagas: Arc<crate::saga::SagaRunner>,
    /// Bulk operations on sagas (`/v1/saga-batches`).
    pub batches: Arc<crate::saga::batch::SagaBatches>,
    pub transactions: Arc<crate::tx::TxRunner>,
    pub vault: Arc<concord_core::app::vault::Vault>,
    /// The append use case: write policy, tokenized fields, validation, the store, metrics.
    pub appender: Arc<concord_core::app::events::Appender>,
    /// Requests in progress per API key (`max_concurrent_requests_per_key`).
    pub key_slots: Arc<crate::limits::KeySlots>,
    /// Event streams served at once (`max_subscribers`).
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// Event streams per API key (`max_subscribers_per_key`).
    pub key_streams: Arc<crate::limits::KeySlots>,
}
