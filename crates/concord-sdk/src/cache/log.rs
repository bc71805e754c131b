//! Invalidation from the Concord event log: a task that follows `GET /v1/events/subscribe` and
//! turns each event into an invalidation at the event's log position.

use std::fmt;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::AbortHandle;

use super::feed::{Backoff, FeedHandle};
use super::{CacheError, Inner};
use crate::{Client, EventOut};

/// A running log follower, returned by [`Cache::spawn_log_invalidation`](super::Cache::spawn_log_invalidation).
/// It stops with the last clone of its cache, or on [`stop`](Self::stop); dropping this handle
/// does not stop it.
pub struct LogFeed {
    position: Arc<AtomicU64>,
    task: AbortHandle,
}

impl fmt::Debug for LogFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogFeed")
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl LogFeed {
    pub(super) fn new(position: Arc<AtomicU64>, task: AbortHandle) -> Self {
        Self { position, task }
    }

    /// The position of the last event fully applied (both tiers); a reconnection resumes after it.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    /// Stops following. The feed is then removed, which flushes the local tier once.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Why a session of the follower ended.
enum End {
    /// The cache is gone: stop for good.
    CacheDropped,
    /// Reconnect after a pause.
    Lost(String),
}

pub(super) async fn follow<V, F>(
    cache: Weak<Inner<V>>,
    client: Client,
    category: Option<String>,
    position: Arc<AtomicU64>,
    key_of: F,
    feed: FeedHandle,
    mut backoff: Backoff,
) where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(&EventOut) -> Option<String> + Send + Sync + 'static,
{
    loop {
        let end = session(
            &cache,
            &client,
            category.as_deref(),
            &position,
            &key_of,
            &feed,
            &mut backoff,
        )
        .await;
        feed.disconnected();
        match end {
            End::CacheDropped => return,
            End::Lost(reason) => {
                tracing::debug!(
                    reason,
                    after = position.load(Ordering::SeqCst),
                    "log invalidation feed lost"
                );
            }
        }
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

async fn session<V, F>(
    cache: &Weak<Inner<V>>,
    client: &Client,
    category: Option<&str>,
    position: &AtomicU64,
    key_of: &F,
    feed: &FeedHandle,
    backoff: &mut Backoff,
) -> End
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(&EventOut) -> Option<String>,
{
    let after = position.load(Ordering::SeqCst);
    let mut subscription = match client.subscribe(after, category).await {
        Ok(subscription) => subscription,
        Err(e) => return End::Lost(format!("subscribe: {e}")),
    };
    // Every event committed from now on reaches this subscription (catch-up, then live), so the
    // local tier may be used again.
    feed.connected();
    backoff.reset();
    loop {
        let event = match subscription.next().await {
            None => return End::Lost("the server closed the subscription".into()),
            // An event that does not decode cannot be told apart from one that invalidates:
            // treat it as a gap, which keeps the local tier bypassed until it is read.
            Some(Err(e)) => return End::Lost(e.to_string()),
            Some(Ok(event)) => event,
        };
        if let Some(key) = key_of(&event) {
            let Some(inner) = cache.upgrade() else {
                return End::CacheDropped;
            };
            match inner.apply_invalidation(&key, event.position).await {
                Ok(()) => {}
                Err(CacheError::InvalidKey(e)) => {
                    tracing::debug!(position = event.position, error = %e, "event names no valid cache key");
                }
                // Not applied to the shared tier: resume from before this event.
                Err(e) => return End::Lost(format!("invalidating at {}: {e}", event.position)),
            }
        } else if cache.strong_count() == 0 {
            return End::CacheDropped;
        }
        position.store(event.position, Ordering::SeqCst);
    }
}
