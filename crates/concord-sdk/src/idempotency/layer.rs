//! The tower layer and service: parse, claim, run, record, replay.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::OriginalUri;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use concord_api::{ErrorCode, PROBLEM_JSON, Problem};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use tower::{Layer, Service};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    DoNotStore, Fingerprint, IDEMPOTENCY_KEY_HEADER, IdempotencyBegin, IdempotencyClaim, IdempotencyConfig,
    IdempotencyConfigError, IdempotencyKey, IdempotencyStore, REPLAYED_HEADER, StoreError, StoredResponse,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The tower layer that gives the routes it wraps `Idempotency-Key` semantics (see the
/// [module docs](super)). Cloning it is cheap; clones share the store and the configuration.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn IdempotencyStore>,
    config: IdempotencyConfig,
    lock_ttl: chrono::Duration,
    ttl: chrono::Duration,
    retry_after: HeaderValue,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer over `store` with `config`, for example
    /// `IdempotencyLayer::new(Arc::new(SqliteIdempotencyStore::new(pool)), IdempotencyConfig::default())`.
    ///
    /// # Errors
    /// [`IdempotencyConfigError`] when a setting is out of range ([`IdempotencyConfig::validate`]).
    pub fn new(store: Arc<dyn IdempotencyStore>, config: IdempotencyConfig) -> Result<Self, IdempotencyConfigError> {
        config.validate()?;
        // Both fit: validate bounds them by MAX_TTL.
        let ttl = chrono::Duration::from_std(config.ttl).map_err(|_| IdempotencyConfigError::Ttl(config.ttl))?;
        let lock_ttl = chrono::Duration::from_std(config.lock_ttl).map_err(|_| IdempotencyConfigError::LockTtl {
            lock_ttl: config.lock_ttl,
            ttl: config.ttl,
        })?;
        let seconds = config.retry_after.as_secs() + u64::from(config.retry_after.subsec_nanos() > 0);
        let retry_after = HeaderValue::from(seconds);
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                config,
                lock_ttl,
                ttl,
                retry_after,
            }),
        })
    }

    /// The configuration the layer runs with.
    #[must_use]
    pub fn config(&self) -> &IdempotencyConfig {
        &self.shared.config
    }

    /// The store the layer keeps its records in.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.shared.store
    }

    /// Deletes the records that expired before now; answers how many. Redis expires its records
    /// itself and answers 0.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store fails; a later purge catches up.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let purged = self.shared.store.purge_expired(Utc::now()).await?;
        tracing::debug!(purged, "purged expired idempotency records");
        Ok(purged)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around an inner service (an axum route or router).
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<Body>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The service that was polled ready serves this request; a fresh clone stays behind.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(handle(Arc::clone(&self.shared), inner, req))
    }
}

async fn pass<S, B>(mut inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Ok(inner.call(req).await?.map(Body::new))
}

async fn handle<S, B>(shared: Arc<Shared>, inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let config = &shared.config;
    if !config.methods.contains(req.method()) {
        return pass(inner, req).await;
    }
    let key = match read_key(req.headers()) {
        Ok(Some(key)) => key,
        Ok(None) if !config.require_key => return pass(inner, req).await,
        Ok(None) => {
            return Ok(problem_response(
                ErrorCode::IdempotencyKeyMissing,
                format!(
                    "{} requests to this service need an Idempotency-Key header",
                    req.method()
                ),
            ));
        }
        Err(detail) => return Ok(problem_response(ErrorCode::InvalidIdempotencyKey, detail)),
    };
    let (parts, body) = req.into_parts();
    let limit = config.max_body_bytes;
    let body = match read_request(body, limit).await {
        Read::Whole(body) => body,
        Read::TooLarge => {
            return Ok(problem_response(
                ErrorCode::PayloadTooLarge,
                format!("the request body is over {limit} bytes"),
            ));
        }
        Read::Failed => {
            return Ok(problem_response(
                ErrorCode::BodyUnreadable,
                "the request body could not be read",
            ));
        }
    };
    let Some(owner) = config.owner_of(&parts) else {
        tracing::error!("no owner for an idempotent request: the layer runs before the authentication it relies on");
        return Ok(problem_response(
            ErrorCode::Internal,
            "this request has no caller to scope its Idempotency-Key; it did not run",
        ));
    };
    let fingerprint = config.fingerprint(&parts.method, target(&parts), &body);
    let now = Utc::now();
    let held = Held {
        owner,
        key,
        fingerprint,
        now,
        locked_until: now + shared.lock_ttl,
        expires_at: now + shared.ttl,
    };
    let span = tracing::debug_span!("idempotency", %owner, key = %KeyDigest(&held.key));
    // The claim and the handler run in a task of their own, so a client that goes away cancels
    // neither halfway: not the handler (its outcome is always recorded), and not the claim (a
    // claim taken in the store just as the request was dropped would hold the key, unowned,
    // until its lock expired). The request's own span goes along too: the debug span is off at
    // the default log level, and without the outer one the handler would lose the caller's trace.
    let task = tokio::spawn(
        claim_and_run(
            Arc::clone(&shared),
            inner,
            Request::from_parts(parts, Body::from(body)),
            held,
        )
        .instrument(span)
        .in_current_span(),
    );
    match task.await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "the idempotent request's task failed");
            Ok(problem_response(ErrorCode::Internal, "the request's task failed"))
        }
    }
}

/// Claims the key and, when this request is the first with it, runs the handler and records
/// its answer; otherwise answers the replay or the refusal.
async fn claim_and_run<S, B>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<Body>,
    held: Held,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match shared.store.begin(&held.claim()).await {
        Ok(IdempotencyBegin::Started) => {}
        Ok(IdempotencyBegin::Replay(stored)) => {
            tracing::debug!(status = stored.status, "replaying the stored response");
            return Ok(replay(stored));
        }
        Ok(IdempotencyBegin::Mismatch) => {
            tracing::debug!("key reused with a different request");
            return Ok(problem_response(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different request (method, path, query or body)",
            ));
        }
        Ok(IdempotencyBegin::InFlight) => {
            tracing::debug!("the first request with this key is still running");
            let mut response = problem_response(
                ErrorCode::IdempotencyKeyInFlight,
                "the first request with this Idempotency-Key is still running; retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, shared.retry_after.clone());
            return Ok(response);
        }
        Err(e) => {
            tracing::error!(error = %e, "idempotency store unavailable; the request is refused");
            let mut response = problem_response(
                ErrorCode::IdempotencyStoreUnavailable,
                "the idempotency store is unavailable; the request did not run, retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, shared.retry_after.clone());
            return Ok(response);
        }
    }
    tracing::debug!("claimed the key; running the handler");
    run_and_record(shared, inner, req, held).await
}

/// The claim this request holds, owned so that it can move into the handler's task.
struct Held {
    owner: Uuid,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    now: DateTime<Utc>,
    locked_until: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl Held {
    fn claim(&self) -> IdempotencyClaim<'_> {
        IdempotencyClaim {
            owner: self.owner,
            key: &self.key,
            fingerprint: self.fingerprint,
            now: self.now,
            locked_until: self.locked_until,
            expires_at: self.expires_at,
        }
    }
}

async fn run_and_record<S, B>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<Body>,
    held: Held,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<B>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let claim = held.claim();
    let response = match AssertUnwindSafe(inner.call(req)).catch_unwind().await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            release(&shared, &claim, "the inner service failed").await;
            return Err(e);
        }
        Err(_) => {
            release(&shared, &claim, "the handler panicked").await;
            return Ok(problem_response(
                ErrorCode::Internal,
                "the handler failed; retry with the same Idempotency-Key",
            ));
        }
    };
    let (parts, body) = response.into_parts();
    let body = Body::new(body);
    if parts.extensions.get::<DoNotStore>().is_some() {
        release(&shared, &claim, "the response carries a secret").await;
        return Ok(Response::from_parts(parts, body));
    }
    if !(shared.config.store_policy)(parts.status) {
        release(&shared, &claim, "the response is not kept for replay").await;
        return Ok(Response::from_parts(parts, body));
    }
    let limit = shared.config.max_response_bytes;
    match buffer_response(body, limit).await {
        Kept::Whole(bytes) => {
            let stored = StoredResponse {
                status: parts.status.as_u16(),
                content_type: parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: bytes.to_vec(),
            };
            complete(&shared, &claim, &stored).await;
            Ok(Response::from_parts(parts, Body::from(bytes)))
        }
        Kept::TooLarge(body) => {
            let detail = format!("the request ran, but its response was over the {limit} bytes kept for replay");
            complete(&shared, &claim, &not_stored(&detail)).await;
            Ok(Response::from_parts(parts, body))
        }
        Kept::Failed => {
            let stored = not_stored("the request ran, but its response body failed and could not be kept");
            complete(&shared, &claim, &stored).await;
            let mut response = replay(stored);
            response.headers_mut().remove(REPLAYED_HEADER);
            Ok(response)
        }
    }
}

async fn complete(shared: &Shared, claim: &IdempotencyClaim<'_>, stored: &StoredResponse) {
    match shared.store.complete(claim, stored).await {
        Ok(()) => tracing::debug!(status = stored.status, "stored the response for replay"),
        // The record stays in flight until its lock expires; then a retry runs again.
        Err(e) => tracing::warn!(error = %e, "could not store the idempotent response"),
    }
}

async fn release(shared: &Shared, claim: &IdempotencyClaim<'_>, why: &'static str) {
    match shared.store.release(claim).await {
        Ok(()) => tracing::debug!(why, "released the key"),
        Err(e) => tracing::warn!(error = %e, why, "could not release the idempotency key"),
    }
}

/// What a retry gets in place of a response that could not be kept.
fn not_stored(detail: &str) -> StoredResponse {
    StoredResponse {
        status: ErrorCode::IdempotencyResponseNotStored.status(),
        content_type: Some(PROBLEM_JSON.to_owned()),
        body: Problem::new(ErrorCode::IdempotencyResponseNotStored, detail).to_body(),
    }
}

fn replay(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(content_type) = stored.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    }
    response.headers_mut().insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    response
}

/// The request's key: `Ok(None)` when absent, `Err(detail)` when malformed.
fn read_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, String> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("send one Idempotency-Key header, not several".to_owned());
    }
    let text = value
        .to_str()
        .map_err(|_| "the Idempotency-Key must be visible ASCII".to_owned())?;
    IdempotencyKey::parse(text).map(Some).map_err(|e| e.to_string())
}

/// The path and query the client sent, before a nesting router stripped its prefix.
fn target(parts: &Parts) -> &str {
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |original| &original.0);
    uri.path_and_query().map_or_else(|| uri.path(), |pq| pq.as_str())
}

enum Read {
    Whole(Bytes),
    TooLarge,
    Failed,
}

async fn read_request(body: Body, limit: usize) -> Read {
    if body.size_hint().lower() > limit as u64 {
        return Read::TooLarge;
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return Read::Failed };
        if chunk.len() > limit - buf.len() {
            return Read::TooLarge;
        }
        buf.extend_from_slice(&chunk);
    }
    Read::Whole(buf.freeze())
}

enum Kept {
    Whole(Bytes),
    /// The response, whole again: what was read, then the rest of the stream.
    TooLarge(Body),
    Failed,
}

async fn buffer_response(body: Body, limit: usize) -> Kept {
    if body.size_hint().lower() > limit as u64 {
        return Kept::TooLarge(body);
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Err(_) => return Kept::Failed,
            Ok(chunk) if chunk.len() > limit - buf.len() => {
                let head = futures::stream::iter([Ok::<_, axum::Error>(buf.freeze()), Ok(chunk)]);
                return Kept::TooLarge(Body::from_stream(head.chain(stream)));
            }
            Ok(chunk) => buf.extend_from_slice(&chunk),
        }
    }
    Kept::Whole(buf.freeze())
}

/// The `application/problem+json` answer of `code` that the layer makes itself.
fn problem_response(code: ErrorCode, detail: impl Into<String>) -> Response<Body> {
    use axum::response::IntoResponse as _;
    Problem::new(code, detail).into_response()
}

/// Shows a key in logs as the first hex digits of its SHA-256, never the key itself.
struct KeyDigest<'a>(&'a IdempotencyKey);

impl std::fmt::Display for KeyDigest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(self.0.as_str().as_bytes());
        f.write_str(&super::hex(&digest[..4]))
    }
}
