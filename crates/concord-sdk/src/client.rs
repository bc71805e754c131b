//! The typed HTTP client of Concord's API v1.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventOut, EventsPage};
use concord_api::keys::{CreateKeyBody, CreatedKey, Health};
use concord_api::sagas::{DefinitionOut, SagaOut, SagaPage, StartSagaBody};
use concord_api::tx::{BeginTxBody, TxDecision, TxOut, TxPage};
use concord_api::{ErrorCode, Problem};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use uuid::Uuid;

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_DETAIL_CHARS: usize = 512;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered non-2xx. A body that is not a problem document becomes a problem built
    /// from the status (`about:blank`, code `http_<status>` unless the status has a single
    /// generic code such as `not_found`). Arguments the client cannot even send (an empty, `.` or
    /// `..` path segment) are refused locally with a 400 problem.
    #[error("HTTP {} {}: {}", .0.status, .0.code, .0.detail)]
    Problem(Problem),
    /// The request did not complete: connection, TLS, timeout, or the body broke off.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// A 2xx answer whose body is not what the route promises.
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),
    /// The client cannot be used as configured: a base URL that does not parse, or no rustls
    /// crypto provider installed when [`Client::new`] builds its HTTP client.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The stable error code, when the server answered one Concord knows.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Problem(problem) => problem.error_code(),
            _ => None,
        }
    }

    /// The HTTP status, when there was an answer.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Problem(problem) => Some(problem.status),
            Self::Transport(e) => e.status().map(|s| s.as_u16()),
            Self::Decode(_) | Self::Config(_) => None,
        }
    }
}

/// The version a stream must be at for an append to succeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check.
    #[default]
    Any,
    /// The stream has no events.
    NoStream,
    /// The stream has at least one event.
    Exists,
    /// The stream's last event has this version.
    Exact(u64),
}

impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Any => serializer.serialize_str("any"),
            Self::NoStream => serializer.serialize_str("no_stream"),
            Self::Exists => serializer.serialize_str("exists"),
            Self::Exact(version) => serializer.serialize_u64(*version),
        }
    }
}

impl From<ExpectedVersion> for serde_json::Value {
    fn from(expected: ExpectedVersion) -> Self {
        match expected {
            ExpectedVersion::Any => "any".into(),
            ExpectedVersion::NoStream => "no_stream".into(),
            ExpectedVersion::Exists => "exists".into(),
            ExpectedVersion::Exact(version) => version.into(),
        }
    }
}

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
    /// A client with its own `reqwest::Client`. `base_url` may carry a path prefix
    /// (`https://gateway/concord`).
    ///
    /// # Errors
    ///
    /// [`ClientError::Config`] when `base_url` is not an absolute URL or when the process has no
    /// rustls crypto provider installed (see the crate docs); [`ClientError::Transport`] when
    /// reqwest cannot build its client.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Result<Self, ClientError> {
        let base_url = base_url.into();
        endpoint(&base_url, &[])?;
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(ClientError::Config(
                "no rustls crypto provider is installed; the binary must install one before \
                 Client::new, e.g. rustls::crypto::ring::default_provider().install_default()"
                    .into(),
            ));
        }
        let http = reqwest::Client::builder().build()?;
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

    /// Appends `events` atomically to `stream` if it is at `expected_version`.
    ///
    /// # Errors
    ///
    /// `wrong_expected_version` (409, with `current_version` in the problem) on a version
    /// mismatch; see [`ClientError`] for the rest.
    pub async fn append(
        &self,
        stream: &str,
        expected_version: ExpectedVersion,
        events: Vec<EventInput>,
    ) -> Result<AppendResponse, ClientError> {
        let body = AppendBody {
            expected_version: Some(expected_version.into()),
            events,
        };
        self.append_with(stream, &body, None).await
    }

    /// `POST /v1/streams/{stream}` with a prepared body and an optional `Idempotency-Key`.
    ///
    /// # Errors
    ///
    /// As [`Client::append`], plus `idempotency_key_reused` (422) and
    /// `idempotency_key_in_flight` (409).
    pub async fn append_with(
        &self,
        stream: &str,
        body: &AppendBody,
        idempotency_key: Option<&str>,
    ) -> Result<AppendResponse, ClientError> {
        let stream = segment(stream, ErrorCode::InvalidStreamName)?;
        let url = endpoint(&self.base_url, &["v1", "streams", stream])?;
        let mut request = self.request(Method::POST, url).json(body);
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        json(request).await
    }

    /// `GET /v1/streams/{stream}?from=&limit=`: up to `limit` events of `stream` from version
    /// `from` on.
    ///
    /// # Errors
    ///
    /// `stream_not_found` (404) for a stream without events; see [`ClientError`].
    pub async fn read_stream(&self, stream: &str, from: u64, limit: u32) -> Result<EventsPage, ClientError> {
        let stream = segment(stream, ErrorCode::InvalidStreamName)?;
        let mut url = endpoint(&self.base_url, &["v1", "streams", stream])?;
        url.query_pairs_mut()
            .append_pair("from", &from.to_string())
            .append_pair("limit", &limit.to_string());
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/events?after=&limit=&category=`: the global log after position `after`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn read_log(&self, after: u64, limit: u32, category: Option<&str>) -> Result<EventsPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "events"])?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("after", &after.to_string())
                .append_pair("limit", &limit.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
        }
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/events/subscribe?after=&category=`: the log after `after` as Server-Sent Events,
    /// catch-up then live. The subscription does not reconnect; resume from
    /// [`Subscription::last_position`].
    ///
    /// # Errors
    ///
    /// A non-2xx answer, or a 2xx that is not `text/event-stream` ([`ClientError::Decode`]).
    pub async fn subscribe(&self, after: u64, category: Option<&str>) -> Result<Subscription, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "events", "subscribe"])?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("after", &after.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
        }
        let request = self.request(Method::GET, url).header(ACCEPT, "text/event-stream");
        let response = check(request.send().await?).await?;
        if let Some(content_type) = media_type(response.headers())
            && content_type != "text/event-stream"
        {
            return Err(ClientError::Decode(format!(
                "expected text/event-stream, got {content_type}"
            )));
        }
        Ok(Subscription {
            response: Some(response),
            parser: sse::Parser::default(),
            ready: VecDeque::new(),
            last_position: after,
        })
    }

    /// `GET /v1/subscriptions/{group}/events`: the next events for member `member` of a group of
    /// `size`, waiting up to `wait_ms` for some to arrive.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn group_events(
        &self,
        group: &str,
        member: u32,
        size: u32,
        category: Option<&str>,
        wait_ms: u64,
        limit: u32,
    ) -> Result<EventsPage, ClientError> {
        let group = segment(group, ErrorCode::InvalidParameter)?;
        let mut url = endpoint(&self.base_url, &["v1", "subscriptions", group, "events"])?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("member", &member.to_string())
                .append_pair("size", &size.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
            query
                .append_pair("wait_ms", &wait_ms.to_string())
                .append_pair("limit", &limit.to_string());
        }
        json(self.request(Method::GET, url)).await
    }

    /// `PUT /v1/subscriptions/{group}/checkpoint`: member `member` has processed everything up to
    /// `position`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), ClientError> {
        let group = segment(group, ErrorCode::InvalidParameter)?;
        let url = endpoint(&self.base_url, &["v1", "subscriptions", group, "checkpoint"])?;
        let body = CheckpointBody { member, position };
        empty(self.request(Method::PUT, url).json(&body)).await
    }

    /// `POST /v1/keys`. The answer holds the only copy of the new key.
    ///
    /// # Errors
    ///
    /// `invalid_scope` (400) for a scope the server does not know; see [`ClientError`].
    pub async fn create_key(&self, name: &str, scopes: &[&str]) -> Result<CreatedKey, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "keys"])?;
        let body = CreateKeyBody {
            name: name.to_owned(),
            scopes: scopes.iter().map(|&s| s.to_owned()).collect(),
        };
        json(self.request(Method::POST, url).json(&body)).await
    }

    /// `DELETE /v1/keys/{id}`.
    ///
    /// # Errors
    ///
    /// `key_not_found` (404); see [`ClientError`].
    pub async fn revoke_key(&self, id: Uuid) -> Result<(), ClientError> {
        let url = endpoint(&self.base_url, &["v1", "keys", &id.to_string()])?;
        empty(self.request(Method::DELETE, url)).await
    }

    /// `PUT /v1/saga-definitions/{name}`: `definition` is `{"steps": [...], "compensation_retry"?}`.
    /// A definition that differs from the latest version becomes the next version; an equal one
    /// answers the latest.
    ///
    /// # Errors
    ///
    /// `invalid_name`, `duplicate_step_name`, `unknown_template_variable`, `invalid_step_url`,
    /// `invalid_step_method`, `invalid_step_header`, `saga_limit_exceeded` and `malformed_json`
    /// (400) for a definition the server refuses; see [`ClientError`].
    pub async fn put_saga_definition(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> Result<DefinitionOut, ClientError> {
        Ok(self.put_saga_definition_created(name, definition).await?.value)
    }

    /// As [`Client::put_saga_definition`], telling whether the call made a new version.
    ///
    /// # Errors
    ///
    /// As [`Client::put_saga_definition`].
    pub async fn put_saga_definition_created(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> Result<Created<DefinitionOut>, ClientError> {
        let name = segment(name, ErrorCode::InvalidName)?;
        let url = endpoint(&self.base_url, &["v1", "saga-definitions", name])?;
        created(self.request(Method::PUT, url).json(definition)).await
    }

    /// `GET /v1/saga-definitions/{name}?version=`: one version, the latest by default.
    ///
    /// # Errors
    ///
    /// `saga_definition_not_found` (404); see [`ClientError`].
    pub async fn saga_definition(&self, name: &str, version: Option<u32>) -> Result<DefinitionOut, ClientError> {
        let name = segment(name, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "saga-definitions", name])?;
        if let Some(version) = version {
            url.query_pairs_mut().append_pair("version", &version.to_string());
        }
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/sagas?wait_ms=`: starts a saga of the definition's latest version, or answers
    /// the saga that already has `body.id`. With `wait`, the answer comes once the saga finished
    /// or the wait ran out, and holds its steps; without, it is the saga as just started.
    ///
    /// # Errors
    ///
    /// `saga_definition_not_found` (404), `invalid_name` (400) for a bad id,
    /// `saga_limit_exceeded` (400) for an input too large, `invalid_parameter` (400) for a wait
    /// beyond the server's limit; see [`ClientError`].
    pub async fn start_saga(&self, body: &StartSagaBody, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        Ok(self.start_saga_created(body, wait).await?.value)
    }

    /// As [`Client::start_saga`], telling whether the call started the saga or found it.
    ///
    /// # Errors
    ///
    /// As [`Client::start_saga`].
    pub async fn start_saga_created(
        &self,
        body: &StartSagaBody,
        wait: Option<Duration>,
    ) -> Result<Created<SagaOut>, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "sagas"])?;
        append_wait(&mut url, wait);
        created(self.request(Method::POST, url).json(body)).await
    }

    /// `GET /v1/sagas/{id}?wait_ms=`: the saga with each step and its attempts, once it finished
    /// or `wait` ran out.
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404); see [`ClientError`].
    pub async fn saga(&self, id: &str, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "sagas", id])?;
        append_wait(&mut url, wait);
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/sagas?status=&limit=&after=`: up to `limit` sagas by id after `after`, without
    /// their steps. Pass the page's `next` as `after` for the following page.
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400) for an unknown status or a limit out of range; see
    /// [`ClientError`].
    pub async fn list_sagas(
        &self,
        status: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<SagaPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "sagas"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(status) = status {
                query.append_pair("status", status);
            }
            query.append_pair("limit", &limit.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/transactions`: runs a two-phase commit across the participants and answers once
    /// the decision is durable (phase 2 goes on in the background).
    ///
    /// # Errors
    ///
    /// `invalid_participant` or `transaction_limit_exceeded` (400); see [`ClientError`].
    /// `POST /v1/vault/tokenize`: one token per item, in order.
    ///
    /// # Errors
    /// As every call; a refused item refuses the whole request.
    pub async fn tokenize(&self, items: &[concord_api::vault::TokenizeItemIn]) -> Result<Vec<String>, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "tokenize"])?;
        let body = concord_api::vault::TokenizeBody { items: items.to_vec() };
        let out: concord_api::vault::Tokenized = json(self.request(Method::POST, url).json(&body)).await?;
        Ok(out.tokens)
    }

    /// `POST /v1/vault/detokenize`: each token's value (masked when `masked`) or error.
    ///
    /// # Errors
    /// As every call; 403 when this key may not reveal some item's type.
    pub async fn detokenize(
        &self,
        tokens: &[String],
        masked: bool,
    ) -> Result<Vec<concord_api::vault::DetokenizedItem>, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "detokenize"])?;
        let body = concord_api::vault::DetokenizeBody {
            tokens: tokens.to_vec(),
            reveal: Some(if masked { "masked" } else { "plain" }.to_owned()),
        };
        let out: concord_api::vault::Detokenized = json(self.request(Method::POST, url).json(&body)).await?;
        Ok(out.items)
    }

    /// `POST /v1/vault/keys/rotate`.
    ///
    /// # Errors
    /// As every call.
    pub async fn rotate_vault_key(&self) -> Result<concord_api::vault::RotatedOut, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "keys", "rotate"])?;
        json(self.request(Method::POST, url)).await
    }

    /// `DELETE /v1/vault/subjects/{subject}`: crypto-shredding of the subject's tokens.
    ///
    /// # Errors
    /// As every call.
    pub async fn erase_subject(&self, subject: &str) -> Result<concord_api::vault::ErasedOut, ClientError> {
        let url = endpoint(
            &self.base_url,
            &["v1", "vault", "subjects", segment(subject, ErrorCode::InvalidSubject)?],
        )?;
        json(self.request(Method::DELETE, url)).await
    }

    /// `PUT /v1/vault/rules/{category}`: the event fields of the category that are stored as tokens.
    ///
    /// # Errors
    /// As every call.
    pub async fn put_vault_rules(
        &self,
        category: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<concord_api::vault::RulesOut, ClientError> {
        let url = endpoint(
            &self.base_url,
            &["v1", "vault", "rules", segment(category, ErrorCode::InvalidStreamName)?],
        )?;
        json(
            self.request(Method::PUT, url)
                .json(&concord_api::vault::RulesBody { fields }),
        )
        .await
    }

    pub async fn begin_transaction(&self, body: &BeginTxBody) -> Result<TxDecision, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "transactions"])?;
        json(self.request(Method::POST, url).json(body)).await
    }

    /// `GET /v1/transactions/{xid}`: the outcome with each participant's vote and
    /// acknowledgement. An unknown xid answers `aborted` with `presumed: true`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn transaction(&self, xid: &str) -> Result<TxOut, ClientError> {
        let xid = segment(xid, ErrorCode::InvalidParameter)?;
        let url = endpoint(&self.base_url, &["v1", "transactions", xid])?;
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/transactions?outcome=&pending=&after=&limit=`: transactions by xid, without
    /// their participants. `outcome` is `committed`, `aborted` or `undecided`.
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400); see [`ClientError`].
    pub async fn list_transactions(
        &self,
        outcome: Option<&str>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<TxPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "transactions"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(outcome) = outcome {
                query.append_pair("outcome", outcome);
            }
            if let Some(pending) = pending {
                query.append_pair("pending", if pending { "true" } else { "false" });
            }
            query.append_pair("limit", &limit.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/sagas/{id}/retry?wait_ms=`: resumes a `failed` saga; `wait` as in
    /// [`Client::saga`].
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404), `saga_not_failed` (409) for a saga in any other status,
    /// `saga_busy` (409) while another node holds it; see [`ClientError`].
    pub async fn retry_saga(&self, id: &str, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "sagas", id, "retry"])?;
        append_wait(&mut url, wait);
        json(self.request(Method::POST, url)).await
    }

    /// Every call is built here, so every call carries the caller's trace.
    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self.http.request(method, url).bearer_auth(&self.api_key);
        match crate::trace::traceparent() {
            Some(traceparent) => request.header(crate::trace::TRACEPARENT, traceparent),
            None => request,
        }
    }
}

/// A live subscription to the global log.
#[derive(Debug)]
pub struct Subscription {
    response: Option<Response>,
    parser: sse::Parser,
    ready: VecDeque<sse::Frame>,
    last_position: u64,
}

impl Subscription {
    /// The next event; `None` once the server closed the stream or after a transport error.
    /// An event whose data does not decode yields [`ClientError::Decode`] and the subscription
    /// goes on.
    pub async fn next(&mut self) -> Option<Result<EventOut, ClientError>> {
        loop {
            while let Some(frame) = self.ready.pop_front() {
                if frame.event != "event" {
                    continue;
                }
                return Some(match serde_json::from_str::<EventOut>(&frame.data) {
                    Ok(event) => {
                        self.last_position = event.position;
                        Ok(event)
                    }
                    Err(e) => Err(ClientError::Decode(format!(
                        "event id {}: {e}",
                        frame.id.as_deref().unwrap_or("-")
                    ))),
                });
            }
            let response = self.response.as_mut()?;
            match response.chunk().await {
                Ok(Some(chunk)) => self.ready.extend(self.parser.feed(&chunk)),
                Ok(None) => {
                    self.response = None;
                    return None;
                }
                Err(e) => {
                    self.response = None;
                    return Some(Err(e.into()));
                }
            }
        }
    }

    /// The position of the last event returned, or the `after` the subscription started from.
    #[must_use]
    pub fn last_position(&self) -> u64 {
        self.last_position
    }
}

fn endpoint(base_url: &str, segments: &[&str]) -> Result<Url, ClientError> {
    let mut url = Url::parse(base_url).map_err(|e| ClientError::Config(format!("base URL {base_url:?}: {e}")))?;
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| ClientError::Config(format!("base URL {base_url:?} cannot be a base")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// `Url::path_segments_mut` percent-encodes a segment but drops `.` and `..`, and an empty one
/// would address another route: refuse those before sending anything.
fn segment(value: &str, code: ErrorCode) -> Result<&str, ClientError> {
    if matches!(value, "" | "." | "..") {
        return Err(ClientError::Problem(Problem::new(
            code,
            format!("{value:?} cannot be a path segment"),
        )));
    }
    Ok(value)
}

/// `wait_ms` of the saga routes that can hold their answer until the saga finishes.
fn append_wait(url: &mut Url, wait: Option<Duration>) {
    if let Some(wait) = wait {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        url.query_pairs_mut().append_pair("wait_ms", &ms.to_string());
    }
}

async fn json<T: DeserializeOwned>(request: RequestBuilder) -> Result<T, ClientError> {
    Ok(json_with_status(request).await?.1)
}

async fn created<T: DeserializeOwned>(request: RequestBuilder) -> Result<Created<T>, ClientError> {
    let (status, value) = json_with_status(request).await?;
    Ok(Created {
        value,
        created: status == StatusCode::CREATED,
    })
}

async fn json_with_status<T: DeserializeOwned>(request: RequestBuilder) -> Result<(StatusCode, T), ClientError> {
    let response = check(request.header(ACCEPT, "application/json").send().await?).await?;
    let status = response.status();
    let body = response.bytes().await?;
    let value = serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))?;
    Ok((status, value))
}

async fn empty(request: RequestBuilder) -> Result<(), ClientError> {
    check(request.send().await?).await?.bytes().await?;
    Ok(())
}

async fn check(response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let is_json = media_type(response.headers()).is_some_and(|t| t == "application/json" || t.ends_with("+json"));
    let body = response.bytes().await.unwrap_or_default();
    Err(ClientError::Problem(problem_from(status, is_json, &body)))
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default();
    Some(essence.trim().to_ascii_lowercase())
}

fn problem_from(status: StatusCode, is_json: bool, body: &[u8]) -> Problem {
    if is_json && let Ok(problem) = serde_json::from_slice::<Problem>(body) {
        return problem;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let detail = match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    };
    let generic = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BodyTooLarge,
        ErrorCode::UnsupportedMediaType,
    ]
    .into_iter()
    .find(|code| code.status() == status.as_u16());
    match generic {
        Some(code) => Problem::new(code, detail),
        None => Problem::custom(status.as_u16(), format!("http_{}", status.as_u16()), detail),
    }
}

/// Incremental parser of a `text/event-stream` body (WHATWG HTML, "Server-sent events").
mod sse {
    /// One dispatched event.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Frame {
        pub(crate) id: Option<String>,
        pub(crate) event: String,
        pub(crate) data: String,
    }

    #[derive(Debug, Default)]
    pub(crate) struct Parser {
        line: Vec<u8>,
        after_cr: bool,
        started: bool,
        id: Option<String>,
        event: String,
        data: String,
    }

    impl Parser {
        /// Consumes the next bytes of the body; answers the events they complete. Lines end in
        /// CRLF, LF or CR, and may be split anywhere between chunks.
        pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<Frame> {
            let mut frames = Vec::new();
            let mut rest = chunk;
            while let Some((&first, tail)) = rest.split_first() {
                if std::mem::take(&mut self.after_cr) && first == b'\n' {
                    rest = tail;
                    continue;
                }
                let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                    self.line.extend_from_slice(rest);
                    break;
                };
                self.line.extend_from_slice(&rest[..end]);
                self.after_cr = rest[end] == b'\r';
                rest = &rest[end + 1..];
                let line = std::mem::take(&mut self.line);
                self.line_done(&String::from_utf8_lossy(&line), &mut frames);
                self.line = line;
                self.line.clear();
            }
            frames
        }

        fn line_done(&mut self, line: &str, frames: &mut Vec<Frame>) {
            let line = if self.started {
                line
            } else {
                self.started = true;
                line.strip_prefix('\u{feff}').unwrap_or(line)
            };
            if line.is_empty() {
                self.dispatch(frames);
                return;
            }
            if line.starts_with(':') {
                return;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "event" => value.clone_into(&mut self.event),
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
                _ => {}
            }
        }

        fn dispatch(&mut self, frames: &mut Vec<Frame>) {
            let event = std::mem::take(&mut self.event);
            if self.data.is_empty() {
                return;
            }
            let mut data = std::mem::take(&mut self.data);
            data.pop();
            frames.push(Frame {
                id: self.id.clone(),
                event: if event.is_empty() { "message".to_owned() } else { event },
                data,
            });
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn feed_all(chunks: &[&[u8]]) -> Vec<Frame> {
            let mut parser = Parser::default();
            chunks.iter().flat_map(|chunk| parser.feed(chunk)).collect()
        }

        fn frame(id: &str, event: &str, data: &str) -> Frame {
            Frame {
                id: Some(id.into()),
                event: event.into(),
                data: data.into(),
            }
        }

        const TWO: &[u8] = b": keep-alive\n\nid: 1\nevent: event\ndata: {\"a\":1}\n\n\
                             : ping\nid: 2\nevent: event\ndata: {\"b\":2}\n\n";

        #[test]
        fn parses_events_and_skips_comments() {
            assert_eq!(
                feed_all(&[TWO]),
                [frame("1", "event", "{\"a\":1}"), frame("2", "event", "{\"b\":2}")]
            );
        }

        #[test]
        fn any_split_into_chunks_gives_the_same_events() {
            let whole = feed_all(&[TWO]);
            let bytes: Vec<&[u8]> = TWO.chunks(1).collect();
            assert_eq!(feed_all(&bytes), whole);
            for at in 0..=TWO.len() {
                let (a, b) = TWO.split_at(at);
                assert_eq!(feed_all(&[a, b]), whole, "split at {at}");
            }
        }

        #[test]
        fn crlf_lf_and_cr_line_endings_mix() {
            let input: &[u8] = b"id: 7\r\nevent: event\rdata: x\n\r\nid: 8\revent: event\r\ndata: y\r\r";
            let expected = [frame("7", "event", "x"), frame("8", "event", "y")];
            assert_eq!(feed_all(&[input]), expected);
            for at in 0..=input.len() {
                let (a, b) = input.split_at(at);
                assert_eq!(feed_all(&[a, b]), expected, "split at {at}");
            }
        }

        #[test]
        fn crlf_split_between_chunks_is_one_line_end() {
            assert_eq!(
                feed_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]),
                [Frame {
                    id: None,
                    event: "message".into(),
                    data: "a\nb".into()
                }]
            );
        }

        #[test]
        fn field_forms_follow_the_spec() {
            let frames = feed_all(&[
                b"\xEF\xBB\xBFdata:no-space\ndata:  two spaces\ndata\nevent:custom\nretry: 10\nunknown: z\n\n",
            ]);
            assert_eq!(
                frames,
                [Frame {
                    id: None,
                    event: "custom".into(),
                    data: "no-space\n two spaces\n".into()
                }]
            );
        }

        #[test]
        fn events_without_data_are_not_dispatched_and_reset_the_type() {
            let frames = feed_all(&[b"id: 3\nevent: event\n\ndata: d\n\n"]);
            assert_eq!(frames, [frame("3", "message", "d")]);
        }

        #[test]
        fn an_unterminated_event_is_held_back() {
            let mut parser = Parser::default();
            assert!(parser.feed(b"id: 9\nevent: event\ndata: {}\n").is_empty());
            assert_eq!(parser.feed(b"\n"), [frame("9", "event", "{}")]);
        }

        #[test]
        fn split_utf8_is_decoded_whole() {
            let input = "data: é€😀\n\n".as_bytes();
            let chunks: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(feed_all(&chunks)[0].data, "é€😀");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    fn install_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// Serves one connection: reads one request, writes `parts` with pauses between them, closes.
    async fn serve_once(parts: Vec<Vec<u8>>) -> (Client, JoinHandle<String>) {
        install_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(format!("http://{}/", listener.local_addr().unwrap()), "k1").unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_lowercase();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if request.len() >= head_end + 4 + length {
                        break;
                    }
                }
                assert!(n > 0, "request cut short");
            }
            for part in parts {
                socket.write_all(&part).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            String::from_utf8(request).unwrap()
        });
        (client, server)
    }

    fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn append_encodes_the_path_and_sends_key_and_body() {
        let (client, server) = serve_once(vec![answer(
            "201 Created",
            "application/json",
            r#"{"stream":"$audit:a/b","first_version":1,"last_version":1,"position":5}"#,
        )])
        .await;
        let body = AppendBody {
            expected_version: Some(ExpectedVersion::NoStream.into()),
            events: vec![EventInput {
                id: None,
                event_type: "Noted".into(),
                data: serde_json::json!({"n": 1}),
                metadata: None,
            }],
        };
        let appended = client.append_with("$audit:a/b", &body, Some("idem-1")).await.unwrap();
        assert_eq!(appended.position, 5);
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /v1/streams/$audit:a%2Fb HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_lowercase();
        assert!(lower.contains("\r\nauthorization: bearer k1\r\n"), "{request}");
        assert!(lower.contains("\r\nidempotency-key: idem-1\r\n"), "{request}");
        assert!(request.ends_with(r#"{"expected_version":"no_stream","events":[{"type":"Noted","data":{"n":1}}]}"#));
    }

    #[tokio::test]
    async fn queries_are_encoded() {
        let (client, server) = serve_once(vec![answer(
            "200 OK",
            "application/json",
            r#"{"events":[],"next":null}"#,
        )])
        .await;
        let page = client.group_events("g 1", 2, 3, Some("a&b"), 500, 10).await.unwrap();
        assert!(page.events.is_empty());
        let request = server.await.unwrap();
        assert!(
            request
                .starts_with("GET /v1/subscriptions/g%201/events?member=2&size=3&category=a%26b&wait_ms=500&limit=10 "),
            "{request}"
        );
    }

    const SAGA: &str = r#"{"id":"order:42/a","definition":"order.v2","version":1,"status":"running",
        "input":{},"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}"#;

    #[tokio::test]
    async fn saga_ids_are_encoded_and_waits_sent_in_milliseconds() {
        let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
        let saga = client
            .saga("order:42/a", Some(Duration::from_millis(1500)))
            .await
            .unwrap();
        assert_eq!((saga.id.as_str(), saga.steps.len()), ("order:42/a", 0));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /v1/sagas/order:42%2Fa?wait_ms=1500 "),
            "{request}"
        );

        let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
        client.retry_saga("order:42/a", None).await.unwrap();
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /v1/sagas/order:42%2Fa/retry HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn saga_lists_encode_their_query() {
        let (client, server) =
            serve_once(vec![answer("200 OK", "application/json", r#"{"sagas":[],"next":"b"}"#)]).await;
        let page = client.list_sagas(Some("failed"), Some("a&b"), 10).await.unwrap();
        assert_eq!(page.next.as_deref(), Some("b"));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /v1/sagas?status=failed&limit=10&after=a%26b "),
            "{request}"
        );
    }

    #[tokio::test]
    async fn created_tells_201_from_200() {
        let definition = r#"{"name":"order.v2","version":3,"definition":{"steps":[]},
            "created_at":"2026-01-01T00:00:00Z"}"#;
        let steps = serde_json::json!({"steps": []});
        for (status, created) in [("201 Created", true), ("200 OK", false)] {
            let (client, server) = serve_once(vec![answer(status, "application/json", definition)]).await;
            let put = client.put_saga_definition_created("order.v2", &steps).await.unwrap();
            assert_eq!((put.value.version, put.created), (3, created));
            let request = server.await.unwrap();
            assert!(request.starts_with("PUT /v1/saga-definitions/order.v2 "), "{request}");
            assert!(request.ends_with(r#"{"steps":[]}"#), "{request}");
        }
        let body = StartSagaBody {
            definition: "order.v2".into(),
            input: serde_json::json!({"n": 1}),
            id: None,
        };
        let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
        assert!(!client.start_saga_created(&body, None).await.unwrap().created);
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /v1/sagas HTTP/1.1\r\n"), "{request}");
        assert!(
            request.ends_with(r#"{"definition":"order.v2","input":{"n":1}}"#),
            "{request}"
        );
    }

    #[tokio::test]
    async fn problem_bodies_become_problems() {
        let (client, _server) = serve_once(vec![answer(
            "409 Conflict",
            "application/problem+json",
            r#"{"type":"urn:concord:error:wrong_expected_version","title":"Wrong expected version",
                "status":409,"detail":"stream order-1 is at 3","code":"wrong_expected_version",
                "current_version":3}"#,
        )])
        .await;
        let err = client
            .append("order-1", ExpectedVersion::Exact(2), vec![])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::WrongExpectedVersion));
        assert_eq!(err.status(), Some(409));
        let ClientError::Problem(problem) = err else {
            panic!("{err:?}")
        };
        assert_eq!(problem.current_version, Some(3));
    }

    #[tokio::test]
    async fn other_bodies_become_problems_from_the_status() {
        let (client, _server) =
            serve_once(vec![answer("502 Bad Gateway", "text/html", "<h1>upstream down</h1>")]).await;
        let err = client.health().await.unwrap_err();
        assert_eq!(err.code(), None);
        assert_eq!(err.status(), Some(502));
        let ClientError::Problem(problem) = err else {
            panic!("{err:?}")
        };
        assert_eq!(problem.code, "http_502");
        assert_eq!(problem.detail, "<h1>upstream down</h1>");

        let (client, _server) = serve_once(vec![answer("404 Not Found", "text/plain", "")]).await;
        assert_eq!(
            client.revoke_key(Uuid::nil()).await.unwrap_err().code(),
            Some(ErrorCode::NotFound)
        );
    }

    #[tokio::test]
    async fn dot_segments_are_refused_locally() {
        install_provider();
        let client = Client::with_http("http://127.0.0.1:9", "k", reqwest::Client::new());
        for name in ["", ".", ".."] {
            let err = client.read_stream(name, 1, 10).await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::InvalidStreamName));
        }
        let err = client.saga("..", None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidName));
        let err = client
            .put_saga_definition(".", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidName));
    }

    #[tokio::test]
    async fn subscription_reads_events_split_across_chunks() {
        let event = |position: u64| {
            format!(
                r#"{{"id":"00000000-0000-0000-0000-00000000000{position}","stream":"order-1","version":{position},"position":{position},"type":"T","data":{{}},"metadata":{{}},"recorded_at":"2026-01-01T00:00:00Z"}}"#
            )
        };
        let body = format!(
            ": hello\r\n\r\nid: 1\r\nevent: event\r\ndata: {}\r\n\r\nevent: other\ndata: x\n\nid: 2\nevent: event\ndata: {}\n\n",
            event(1),
            event(2)
        );
        let (head, tail) = body.as_bytes().split_at(40);
        let (client, server) = serve_once(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec(),
            head.to_vec(),
            tail.to_vec(),
        ])
        .await;
        let mut subscription = client.subscribe(0, Some("order")).await.unwrap();
        let positions = [
            subscription.next().await.unwrap().unwrap().position,
            subscription.next().await.unwrap().unwrap().position,
        ];
        assert_eq!(positions, [1, 2]);
        assert_eq!(subscription.last_position(), 2);
        assert!(subscription.next().await.is_none());
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /v1/events/subscribe?after=0&category=order "),
            "{request}"
        );
        assert!(request.to_lowercase().contains("\r\naccept: text/event-stream\r\n"));
    }
}
