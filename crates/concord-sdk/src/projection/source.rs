//! Where a projection's events come from: the [`ProjectionSource`] trait and its implementation
//! over Concord's global log, [`ConcordLog`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use concord_api::events::EventOut;
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use super::{BoxError, ProjectionError};
use crate::{Client, ClientError};

/// One event as a projection sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    /// The event's place in the source; strictly increasing along a source. The runner stores the
    /// last one it applied as the checkpoint.
    pub position: u64,
    /// The event's id.
    pub id: Uuid,
    /// The stream the event belongs to, e.g. `account-42`.
    pub stream: String,
    /// The event's number within its stream, from 1.
    pub version: u64,
    /// The event's type, e.g. `Deposited`.
    pub event_type: String,
    /// The event's body.
    pub data: Value,
    /// The event's metadata (a JSON object).
    pub metadata: Value,
    /// When the event store recorded it.
    pub recorded_at: DateTime<Utc>,
}

impl From<EventOut> for SourceEvent {
    fn from(event: EventOut) -> Self {
        Self {
            position: event.position,
            id: event.id,
            stream: event.stream,
            version: event.version,
            event_type: event.event_type,
            data: event.data,
            metadata: event.metadata,
            recorded_at: event.recorded_at,
        }
    }
}

/// A failed read of a [`ProjectionSource`]. The variant tells the runner what to do.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot answer now (connection refused, timeout, 5xx, 429): the runner retries
    /// with its backoff.
    #[error("the event source is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The source refused the read and will refuse it again (bad credentials, a missing scope, a
    /// parameter it does not accept, an answer that does not decode): the runner stops and
    /// returns [`ProjectionError::Source`]. Fix the configuration.
    #[error("the event source refused the read: {0}")]
    Rejected(#[source] BoxError),
}

impl From<ClientError> for SourceError {
    fn from(error: ClientError) -> Self {
        let permanent = match &error {
            ClientError::Problem(problem) => {
                (400..500).contains(&problem.status) && !matches!(problem.status, 408 | 425 | 429)
            }
            ClientError::Decode(_) | ClientError::Config(_) => true,
            ClientError::Transport(_) => false,
        };
        if permanent {
            Self::Rejected(Box::new(error))
        } else {
            Self::Unavailable(Box::new(error))
        }
    }
}

/// An ordered source of events that a projection runner reads from.
///
/// The contract the runner relies on:
/// - [`fetch`](Self::fetch) answers events whose positions are strictly increasing and all
///   greater than `after` (the runner checks it and stops with
///   [`ProjectionError::SourceOrder`] otherwise);
/// - no gaps: an event with a position at or below the last one answered never appears later.
///   This is what makes the stored position a safe place to resume from;
/// - the same `after` answers the same events (in a prefix sense) every time, so a batch rolled
///   back is read again unchanged.
///
/// The trait is object safe: a runner can take a `Box<dyn ProjectionSource>` or an
/// `Arc<dyn ProjectionSource>`.
#[async_trait::async_trait]
pub trait ProjectionSource: Send + Sync {
    /// Up to `max` events after position `after`, in position order. When there are none yet,
    /// waits up to `wait` for some to arrive and then answers what it has, possibly nothing.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when a retry may succeed, [`SourceError::Rejected`] when it
    /// cannot.
    async fn fetch(&self, after: u64, max: usize, wait: Duration) -> Result<Vec<SourceEvent>, SourceError>;
}

#[async_trait::async_trait]
impl<T: ProjectionSource + ?Sized> ProjectionSource for Box<T> {
    async fn fetch(&self, after: u64, max: usize, wait: Duration) -> Result<Vec<SourceEvent>, SourceError> {
        (**self).fetch(after, max, wait).await
    }
}

#[async_trait::async_trait]
impl<T: ProjectionSource + ?Sized> ProjectionSource for Arc<T> {
    async fn fetch(&self, after: u64, max: usize, wait: Duration) -> Result<Vec<SourceEvent>, SourceError> {
        (**self).fetch(after, max, wait).await
    }
}

/// The limits of a [`ConcordLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// The pause between two reads of the log while it has nothing new. Default 200 ms; must be
    /// at least 1 ms.
    pub poll_interval: Duration,
    /// The most events asked of the server in one read. Default 1000, the server's default
    /// `max_read_limit`; 1 to 10 000, and no more than the server's own limit (it refuses larger
    /// pages, which stops the runner with [`SourceError::Rejected`]).
    pub page_limit: u32,
}

/// Largest [`LogConfig::page_limit`] accepted.
pub const MAX_PAGE_LIMIT: u32 = 10_000;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(200),
            page_limit: 1000,
        }
    }
}

/// Concord's global log (`GET /v1/events`), optionally of one category, as a
/// [`ProjectionSource`].
///
/// It polls: each [`fetch`](ProjectionSource::fetch) reads one page after the position asked,
/// and while the page is empty reads again every [`LogConfig::poll_interval`] until the `wait`
/// is over. Polling, rather than holding a Server-Sent Events subscription, keeps the source
/// stateless: the runner asks from its checkpoint every time, which after a rollback or a
/// checkpoint moved by another runner is not where a live subscription would be. A new event is
/// seen at most one poll interval after it commits; the log's guarantee (a reader that has seen
/// position P never misses an event that commits later) makes every position answered safe to
/// checkpoint.
#[derive(Debug, Clone)]
pub struct ConcordLog {
    client: Client,
    category: Option<String>,
    config: LogConfig,
}

impl ConcordLog {
    /// The log of `category` (`account` for streams `account-*`), or the whole log when `None`,
    /// read through `client` with the default [`LogConfig`]. The client's key needs the scope to
    /// read events.
    #[must_use]
    pub fn new(client: Client, category: Option<&str>) -> Self {
        Self {
            client,
            category: category.map(str::to_owned),
            config: LogConfig::default(),
        }
    }

    /// The same source with other limits.
    ///
    /// # Errors
    /// [`ProjectionError::Config`] when a limit is out of its range (see [`LogConfig`]).
    pub fn with_config(mut self, config: LogConfig) -> Result<Self, ProjectionError> {
        if config.poll_interval < Duration::from_millis(1) {
            return Err(ProjectionError::Config("poll_interval must be at least 1 ms"));
        }
        if !(1..=MAX_PAGE_LIMIT).contains(&config.page_limit) {
            return Err(ProjectionError::Config("page_limit must be 1 to 10000"));
        }
        self.config = config;
        Ok(self)
    }

    /// The category read, if any.
    #[must_use]
    pub fn category(&self) -> Option<&str> {
        self.category.as_deref()
    }
}

#[async_trait::async_trait]
impl ProjectionSource for ConcordLog {
    async fn fetch(&self, after: u64, max: usize, wait: Duration) -> Result<Vec<SourceEvent>, SourceError> {
        let limit = u32::try_from(max).unwrap_or(u32::MAX).clamp(1, self.config.page_limit);
        let deadline = Instant::now() + wait;
        loop {
            let page = self.client.read_log(after, limit, self.category.as_deref()).await?;
            if !page.events.is_empty() {
                return Ok(page.events.into_iter().map(SourceEvent::from).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(self.config.poll_interval.min(deadline - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_api::Problem;

    fn problem(status: u16) -> ClientError {
        ClientError::Problem(Problem {
            problem_type: "about:blank".into(),
            title: "t".into(),
            status,
            detail: "d".into(),
            code: "c".into(),
            current_version: None,
        })
    }

    #[test]
    fn client_errors_split_into_retryable_and_permanent() {
        for status in [400, 401, 403, 404, 422] {
            assert!(
                matches!(SourceError::from(problem(status)), SourceError::Rejected(_)),
                "{status}"
            );
        }
        for status in [408, 425, 429, 500, 502, 503] {
            assert!(
                matches!(SourceError::from(problem(status)), SourceError::Unavailable(_)),
                "{status}"
            );
        }
        assert!(matches!(
            SourceError::from(ClientError::Decode("x".into())),
            SourceError::Rejected(_)
        ));
    }

    #[test]
    fn log_limits_are_checked() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::with_http("http://127.0.0.1:9", "k", reqwest::Client::new());
        let log = || ConcordLog::new(client.clone(), Some("account"));
        for bad in [
            LogConfig {
                poll_interval: Duration::ZERO,
                ..LogConfig::default()
            },
            LogConfig {
                page_limit: 0,
                ..LogConfig::default()
            },
            LogConfig {
                page_limit: MAX_PAGE_LIMIT + 1,
                ..LogConfig::default()
            },
        ] {
            assert!(
                matches!(log().with_config(bad), Err(ProjectionError::Config(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            log().with_config(LogConfig::default()).unwrap().category(),
            Some("account")
        );
    }
}
