//! The typed client of Concord's HTTP API v1: one method per route, one module per resource
//! ([`events`](crate::Client::append), keys, sagas, transactions, vault), server-sent events in
//! their own module, and the caller's trace context on every call.
//!
//! It depends on the API's bodies (`concord-api`) and the shared kernel only: no database
//! driver, no web framework, no vault crypto. The service kit (`concord-sdk`) re-exports it.
//!
//! # TLS crypto provider
//!
//! reqwest is built with `rustls-no-provider`: the library never picks a crypto provider. The
//! binary installs one, once, before the first [`Client::new`] (which otherwise answers
//! [`ClientError::Config`]), for example `rustls::crypto::ring::default_provider().install_default()`.
//! [`Client::with_http`] takes a `reqwest::Client` the caller built itself.
//!
//! # Example
//!
//! ```no_run
//! use concord_client::{Client, ClientError, ErrorCode, EventInput, ExpectedVersion};
//!
//! # async fn run() -> Result<(), ClientError> {
//! let _ = rustls::crypto::ring::default_provider().install_default();
//! let client = Client::new("http://127.0.0.1:7400", "my-api-key")?;
//!
//! let placed = EventInput {
//!     id: None,
//!     event_type: "OrderPlaced".into(),
//!     data: serde_json::json!({ "total": 30 }),
//!     metadata: None,
//! };
//! match client.append("order-42", ExpectedVersion::NoStream, vec![placed]).await {
//!     Ok(appended) => println!("order-42 is at version {}", appended.last_version),
//!     Err(e) if e.code() == Some(ErrorCode::WrongExpectedVersion) => println!("already placed"),
//!     Err(e) => return Err(e),
//! }
//!
//! let mut orders = client.subscribe(0, Some("order")).await?;
//! while let Some(event) = orders.next().await {
//!     let event = event?;
//!     println!("{} {} v{}", event.position, event.stream, event.version);
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod events;
mod keys;
mod sagas;
mod sse;
pub mod tls;
pub mod trace;
mod transport;
mod tx;
mod vault;

use std::fmt;

use reqwest::{Method, RequestBuilder, Url};
use transport::{endpoint, json};

pub use concord_api as api;
pub use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventOut, EventsPage};
pub use concord_api::keys::{CreatedKey, Health};
pub use concord_api::sagas::{AttemptOut, DefinitionOut, SagaOut, SagaPage, StartSagaBody, StepOut};
pub use concord_api::tx::{BeginTxBody, ParticipantIn, ParticipantOut, TxDecision, TxOut, TxPage};
pub use concord_api::{ErrorCode, Problem};
pub use concord_kernel::ExpectedVersion;
pub use error::ClientError;
pub use sagas::{CALLBACK_HEADER, complete_action};
pub use sse::Subscription;
pub use tls::ClientTls;

/// The answer of a route that creates a resource or, when an equal one exists, returns that one.
#[derive(Debug, Clone, PartialEq)]
pub struct Created<T> {
    pub value: T,
    /// `true` when this call created it (201), `false` when it existed already (200).
    pub created: bool,
}

/// A client of one Concord server with one API key. Cheap to clone: clones share the connection
/// pool.
#[derive(Clone)]
pub struct Client {
    base_url: String,
    api_key: String,
    http: reqwest::Client,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}
impl Client {
    /// A client with its own `reqwest::Client` that trusts the system's roots and shows no client
    /// certificate; [`Client::with_tls`] for more. `base_url` may carry a path prefix
    /// (`https://gateway/concord`).
    ///
    /// # Errors
    ///
    /// [`ClientError::Config`] when `base_url` is not an absolute URL or when the process has no
    /// rustls crypto provider installed (see the crate docs); [`ClientError::Transport`] when
    /// reqwest cannot build its client.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Result<Self, ClientError> {
        Self::with_tls(base_url, api_key, &ClientTls::default())
    }

    /// A client that trusts `tls.ca` beyond the system's roots and shows `tls.client_cert` to
    /// a server that asks for one (mutual TLS); [`ClientTls::from_env`] reads the settings every
    /// Concord client shares.
    ///
    /// # Errors
    ///
    /// As [`Client::new`], and [`ClientError::Config`] when a TLS file cannot be used.
    pub fn with_tls(
        base_url: impl Into<String>,
        api_key: impl Into<String>,
        tls: &ClientTls,
    ) -> Result<Self, ClientError> {
        let base_url = base_url.into();
        endpoint(&base_url, &[])?;
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(ClientError::Config(
                "no rustls crypto provider is installed; the binary must install one before \
                 Client::new, e.g. rustls::crypto::ring::default_provider().install_default()"
                    .into(),
            ));
        }
        let http = tls.apply(reqwest::Client::builder())?.build()?;
        Ok(Self::with_http(base_url, api_key, http))
    }

    /// A client over a `reqwest::Client` built by the caller (timeouts, proxies, TLS roots).
    /// A `base_url` that does not parse makes every call answer [`ClientError::Config`].
    #[must_use]
    pub fn with_http(base_url: impl Into<String>, api_key: impl Into<String>, http: reqwest::Client) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: api_key.into(),
            http,
        }
    }

    /// `GET /health`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn health(&self) -> Result<Health, ClientError> {
        let url = endpoint(&self.base_url, &["health"])?;
        json(self.request(Method::GET, url)).await
    }

    /// Every call is built here, so every call carries the caller's trace.
    pub(crate) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self.http.request(method, url).bearer_auth(&self.api_key);
        #[cfg(feature = "otel")]
        if let Some(traceparent) = trace::traceparent() {
            return request.header(trace::TRACEPARENT, traceparent);
        }
        request
    }
}

#[cfg(test)]
mod tests;
