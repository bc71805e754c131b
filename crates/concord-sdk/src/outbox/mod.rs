//! The transactional outbox and its relay.
//!
//! A service writes its business change and the messages announcing it in **one local
//! transaction**: [`postgres::enqueue`] / [`sqlite::enqueue`] insert into `concord_outbox` on the
//! caller's transaction, so the message exists exactly when the change does. A relay
//! ([`postgres::PgRelay`], [`sqlite::SqliteRelay`]) then publishes the rows to a
//! [`Broker`](crate::broker::Broker) and removes them.
//!
//! # What the relay guarantees
//!
//! - **At least once, never skipped.** A row stays in the table until the broker acknowledged
//!   it, so a relay that dies mid-batch publishes the batch again after a restart; rows are read
//!   by state, not by a cursor, so a transaction that commits late is never passed over. The
//!   duplicates a crash can cause carry the same message id: the broker drops them inside its
//!   duplicate window and the consumer's [`inbox`](crate::inbox) drops the rest.
//! - **Order per key.** Messages of one key are published one after the other, each only once
//!   the one before it is acknowledged; different keys of a batch are published in parallel
//!   (one "wave" per position within its key). On PostgreSQL several relay instances share one
//!   outbox: each claims rows with `FOR UPDATE SKIP LOCKED` and publishes a key only while it
//!   holds that key's advisory lock and the rows it claimed are the key's oldest, so two relays
//!   never interleave one key. On SQLite one relay holds a lease on the outbox.
//! - **Retries and dead letters.** A failed publish waits with exponential backoff
//!   ([`RelayConfig::backoff_initial`] doubling up to [`RelayConfig::backoff_max`]) and holds its
//!   key back meanwhile. A message the broker *rejects* (too large, invalid topic or key)
//!   [`RelayConfig::max_attempts`] times moves to `concord_outbox_dead` with its last error, and
//!   its key goes on; a broker that is merely unavailable never dead-letters anything.
//! - **No unbounded bloat.** Published rows are deleted in batches of at most
//!   [`RelayConfig::batch_size`]; on PostgreSQL the table's autovacuum runs after a fixed number
//!   of dead rows (not a fraction of the table), so the space is reused while the relay runs.
//! - **Low latency.** On PostgreSQL the outbox handle [`postgres::PgOutbox`] sends
//!   `NOTIFY concord_outbox` after the commit, which the relays `LISTEN` to (wherever they run),
//!   and wakes the relays of its own process directly;
//!   on SQLite the handle carries an in-process signal ([`sqlite::SqliteOutbox::notify`]). Both
//!   fall back to polling every [`RelayConfig::poll_interval`], which also finds rows committed
//!   without the handle.
//!
//! Each round is counted in the process's `metrics` recorder (`concord_outbox_published_total`,
//! `concord_outbox_retried_total`, `concord_outbox_dead_total`); `pending` and `dead_letters`
//! count the tables.
//!
//! # Example (PostgreSQL)
//!
//! ```no_run
//! use concord_sdk::broker::{Broker, EventStoreBroker};
//! use concord_sdk::outbox::{self, OutboxLimits, RelayConfig};
//! use serde_json::json;
//! use std::sync::Arc;
//!
//! # async fn run(pool: sqlx::PgPool, broker: Arc<dyn Broker>) -> Result<(), Box<dyn std::error::Error>> {
//! outbox::postgres::ensure_schema(&pool).await?;
//!
//! // In the service's own transaction:
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE stock SET qty = qty - 1 WHERE item = 'apple'").execute(&mut *tx).await?;
//! let msg = outbox::message("stock", "apple", json!({ "item": "apple", "delta": -1 }));
//! let handle = outbox::postgres::PgOutbox::new(pool.clone(), OutboxLimits::default());
//! handle.enqueue(&mut tx, &[msg]).await?;
//! handle.commit(tx).await?; // commits, then wakes the relays
//!
//! // In the relay (the same process or another one; several may run):
//! let relay = outbox::postgres::PgRelay::new(pool.clone(), broker, RelayConfig::default());
//! let (_stop, stopped) = tokio::sync::watch::channel(false);
//! relay.run(stopped).await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "postgres")]
pub mod postgres;
mod relay;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use crate::broker::BrokerMessage;
pub use relay::{RelayConfig, RelayError, RelayRound};

use std::collections::BTreeMap;
use std::time::Duration;

/// The limits an enqueued message must keep.
#[derive(Debug, Clone)]
pub struct OutboxLimits {
    /// Bytes of the topic (default 100).
    pub max_topic_bytes: usize,
    /// Bytes of the key (default 200).
    pub max_key_bytes: usize,
    /// Bytes of the payload's JSON (default 512 KiB; a NATS server takes 1 MiB per message by default).
    pub max_payload_bytes: usize,
    /// Number of headers (default 32).
    pub max_headers: usize,
    /// Bytes of one header name plus value (default 1 KiB).
    pub max_header_bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_topic_bytes: 100,
            max_key_bytes: 200,
            max_payload_bytes: 512 * 1024,
            max_headers: 32,
            max_header_bytes: 1024,
        }
    }
}

/// Failures of enqueueing.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The message breaks a limit or has an empty topic or key; nothing was written.
    #[error("invalid outbox message: {0}")]
    Invalid(String),
    /// The database failed; the caller's transaction should be rolled back.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A message with a fresh UUIDv7 id whose only header is the current span's `traceparent`, when
/// there is one ([`crate::trace::traceparent`]), so the consumer can continue the producer's trace
/// ([`crate::trace::continue_from`]).
#[must_use]
pub fn message(topic: &str, key: &str, payload: serde_json::Value) -> BrokerMessage {
    let headers = crate::trace::traceparent()
        .map(|tp| (crate::trace::TRACEPARENT.to_owned(), tp))
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    BrokerMessage {
        id: uuid::Uuid::now_v7(),
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload,
        headers,
    }
}

fn is_line(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Checks `m` against `limits`; answers the payload's JSON text.
///
/// # Errors
/// [`OutboxError::Invalid`] naming the broken rule.
pub fn validate(m: &BrokerMessage, limits: &OutboxLimits) -> Result<(String, String), OutboxError> {
    let bad = |s: String| Err(OutboxError::Invalid(s));
    if m.topic.is_empty() || m.topic.len() > limits.max_topic_bytes || !is_line(&m.topic) || m.topic.contains(' ') {
        return bad(format!(
            "the topic must be 1 to {} bytes without spaces or control characters",
            limits.max_topic_bytes
        ));
    }
    if m.key.is_empty() || m.key.len() > limits.max_key_bytes || !is_line(&m.key) {
        return bad(format!(
            "the key must be 1 to {} bytes without control characters",
            limits.max_key_bytes
        ));
    }
    if m.headers.len() > limits.max_headers {
        return bad(format!("more than {} headers", limits.max_headers));
    }
    for (k, v) in &m.headers {
        if k.is_empty() || k.len() + v.len() > limits.max_header_bytes || !is_line(k) || !is_line(v) {
            return bad(format!(
                "header names are non-empty, and name plus value at most {} bytes without control characters",
                limits.max_header_bytes
            ));
        }
    }
    let payload = serde_json::to_string(&m.payload).map_err(|e| OutboxError::Invalid(e.to_string()))?;
    if payload.len() > limits.max_payload_bytes {
        return bad(format!(
            "the payload is {} bytes, over the limit of {}",
            payload.len(),
            limits.max_payload_bytes
        ));
    }
    let headers = serde_json::to_string(&m.headers).map_err(|e| OutboxError::Invalid(e.to_string()))?;
    Ok((payload, headers))
}

/// The backoff before attempt `attempts + 1`.
fn backoff(config: &RelayConfig, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
    config.backoff_initial.saturating_mul(factor).min(config.backoff_max)
}
