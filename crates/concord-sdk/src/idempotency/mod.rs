//! The `Idempotency-Key` layer for a service's own HTTP routes: a tower [`IdempotencyLayer`] that
//! runs each keyed request once and answers its retries with the stored response, following the
//! IETF draft "The Idempotency-Key HTTP Header Field". Its records live in the service's own
//! database ([`sqlite`], [`postgres`]) or in Redis ([`redis`]), all behind the port
//! [`IdempotencyStore`].
//!
//! # What a request gets
//!
//! The layer looks at requests whose method is one of [`IdempotencyConfig::methods`] (POST and
//! PATCH by default); every other request passes through untouched. A covered request's key is
//! scoped to its caller ([`IdempotencyConfig::caller`]), and its *fingerprint* is an HMAC-SHA256
//! of method, path with query, and body under [`IdempotencyConfig::fingerprint_secret`].
//!
//! | situation                                               | answer                                                         |
//! |---------------------------------------------------------|----------------------------------------------------------------|
//! | no `Idempotency-Key`, key required (the default)        | 400 `idempotency_key_missing`                                  |
//! | no `Idempotency-Key`, key optional                      | the handler runs, nothing is recorded                          |
//! | a key that is not 1–255 visible ASCII (quotes allowed)  | 400 `invalid_idempotency_key`                                  |
//! | a body over [`IdempotencyConfig::max_body_bytes`]       | 413 `payload_too_large`; the handler does not run             |
//! | the first request with the key                          | the handler runs; its response is answered and, if kept, stored |
//! | the same request again, once the first completed        | the stored response, with `Idempotent-Replayed: true`         |
//! | the same key while the first is still running           | 409 `idempotency_key_in_flight` with `Retry-After`            |
//! | the same key with another method, path, query or body   | 422 `idempotency_key_reused`                                   |
//! | the store fails                                         | 503 `idempotency_store_unavailable`; the handler does not run |
//!
//! Errors are `application/problem+json` bodies `{type, title, status, detail, code}`; the codes
//! are listed once, in the table of every Concord error, [`ErrorCode`](crate::ErrorCode).
//!
//! # Which responses are kept
//!
//! A response is worth replaying when a retry would get the same answer. By default
//! ([`default_store_policy`]) the layer keeps 2xx and 4xx answers except 408, 409, 425 and 429,
//! which say "try again" (a timeout, a conflict with concurrent work, too early, too many). For
//! every other answer — 5xx, 1xx, 3xx and those four — the key is released, so a retry runs
//! the handler again. Change it with [`IdempotencyConfig::store_response_when`].
//!
//! A response whose extensions hold [`DoNotStore`] is never kept, whatever its status: a
//! handler marks an answer that carries a secret with it.
//!
//! A stored response keeps its status, `Content-Type` and body; other headers (a 201's
//! `Location`, cookies) are not replayed, so put what a retry needs in the body. A response
//! larger than [`IdempotencyConfig::max_response_bytes`] still reaches its client unchanged, but
//! the record keeps, in its place, a 500 `idempotency_response_not_stored` problem: the request
//! did run, and a retry must not run it twice. A response whose body fails while being read is
//! answered and kept the same way.
//!
//! The claim and the handler run in a task of their own: a client that goes away mid-request
//! cancels neither, so its outcome is always recorded and no key is left claimed by nobody. A
//! handler that panics releases the key and is answered 500 `internal`.
//!
//! # Locks, takeover and expiry
//!
//! The first request holds the key for [`IdempotencyConfig::lock_ttl`] (30 s by default). A
//! holder that has not completed by then is taken for dead: the next request with the key takes
//! it over and runs. The claim is a fencing token — a late first holder can neither complete nor
//! release the record of the one that took over. Set the lock above the slowest handler's run
//! time (above the service's request timeout), or a slow first request and its retry can both
//! run. A completed record is replayed for [`IdempotencyConfig::ttl`] (24 h by default); after
//! that the key is free again. [`IdempotencyLayer::purge_expired`] deletes expired records; run
//! it now and then (for example hourly): SQLite and PostgreSQL keep expired rows until then,
//! Redis drops each record itself when its key's TTL ends.
//!
//! # Callers
//!
//! Two callers that pick the same key never see each other's records. The default caller id is
//! a SHA-256 of the `Authorization` header, or `anonymous` without one
//! ([`default_caller`]). A service whose authentication layer puts its principal in the
//! request's extensions can name callers by it instead:
//! `config.caller(|parts| parts.extensions.get::<User>().map(|u| u.id.to_string()))` — place
//! that authentication layer outside this one. A caller id becomes the store's `owner` through
//! [`owner_for_caller`]; `None` from the function is the `anonymous` caller.
//!
//! # Tables and keys
//!
//! [`sqlite::ensure_schema`] and [`postgres::ensure_schema`] create the table
//! `concord_idempotency` ([`sqlite::SCHEMA`] and [`postgres::SCHEMA`] hold the DDL for a
//! migration tool): one row per `(owner, key)` with the fingerprint, the stored response once
//! there is one, and `locked_until` / `expires_at` in unix milliseconds. The Redis store keeps one
//! hash per record under `{prefix}{owner}:{key}` and claims, completes and releases it in Lua
//! scripts (see [`redis`]).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use axum::Router;
//! use axum::http::StatusCode;
//! use axum::routing::post;
//! use concord_sdk::idempotency::{self, IdempotencyConfig, IdempotencyLayer};
//!
//! async fn create_order(body: String) -> (StatusCode, String) {
//!     (StatusCode::CREATED, format!("{{\"order\":\"o-1\",\"request\":{body}}}"))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::SqlitePool::connect("sqlite://orders.db?mode=rwc").await?;
//! idempotency::sqlite::ensure_schema(&pool).await?;
//! let store = Arc::new(idempotency::sqlite::SqliteIdempotencyStore::new(pool));
//! let config = IdempotencyConfig::default().fingerprint_secret(std::env::var("IDEMPOTENCY_SECRET")?);
//! let layer = IdempotencyLayer::new(store, config)?;
//!
//! // Delete expired records once an hour.
//! let purger = layer.clone();
//! tokio::spawn(async move {
//!     let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
//!     loop {
//!         every.tick().await;
//!         if let Err(e) = purger.purge_expired().await {
//!             tracing::warn!(error = %e, "idempotency purge failed");
//!         }
//!     }
//! });
//!
//! let app = Router::new().route("/orders", post(create_order)).layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Measuring the added latency
//!
//! What the layer adds to a request is the buffering of its body and response, one HMAC, and
//! store round trips: two for a first request (claim, then complete or release), one for a
//! replay, a conflict or a mismatch. To measure it, serve one handler twice over HTTP on the
//! same machine — one router with the layer, one without, both built from the same store
//! constructor a service uses (`SqliteIdempotencyStore::new(pool)`,
//! `PostgresIdempotencyStore::new(pool)`, after `ensure_schema`) — and drive both with the same
//! keep-alive client and concurrency. Send a fresh key per request to measure the first-run path
//! and one repeated key to measure replays; compare the median and tail latencies of the two
//! routers. Everything here is public, so such a benchmark lives in another crate.

#[cfg(feature = "axum")]
mod layer;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Method, StatusCode, header};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
pub use concord_kernel::StoreError;
pub use concord_kernel::idempotency::{Fingerprint, IdempotencyKey};
pub use concord_kernel::idempotency::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoredResponse};
#[cfg(feature = "axum")]
pub use layer::{IdempotencyLayer, IdempotencyService};

/// Marks a response that must never be kept for replay, whatever its status: one whose body
/// holds a secret (a new API key, a revealed value), since stored responses sit in the database
/// in plaintext. A handler inserts it into the response's extensions; the layer then releases
/// the key, so a retry runs the handler again.
#[derive(Debug, Clone, Copy)]
pub struct DoNotStore;

/// The header set on a response that is a replay of a stored one (its value is `true`).
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The caller id of requests the caller function has no id for.
pub const ANONYMOUS_CALLER: &str = "anonymous";

/// The longest [`IdempotencyConfig::ttl`] accepted: one year.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Names the caller of a request; see [`IdempotencyConfig::caller`].
pub type CallerFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Names the store's owner of a request directly; see [`IdempotencyConfig::owner`].
pub type OwnerFn = Arc<dyn Fn(&Parts) -> Option<Uuid> + Send + Sync>;

/// Decides whether a response with this status is kept for replay; see
/// [`IdempotencyConfig::store_response_when`].
pub type StorePolicyFn = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// How the layer behaves. Start from [`IdempotencyConfig::default`] and change what differs;
/// [`IdempotencyLayer::new`] checks the result.
#[derive(Clone)]
pub struct IdempotencyConfig {
    methods: Vec<Method>,
    require_key: bool,
    secret: Arc<[u8]>,
    max_body_bytes: usize,
    max_response_bytes: usize,
    lock_ttl: Duration,
    ttl: Duration,
    retry_after: Duration,
    caller: CallerFn,
    owner: Option<OwnerFn>,
    store_policy: StorePolicyFn,
}

impl Default for IdempotencyConfig {
    /// POST and PATCH, key required, empty fingerprint secret, 1 MiB bodies and responses, 30 s
    /// lock, 24 h replay, `Retry-After: 1`, callers by `Authorization`, [`default_store_policy`].
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            require_key: true,
            secret: Arc::from(Vec::new()),
            max_body_bytes: 1024 * 1024,
            max_response_bytes: 1024 * 1024,
            lock_ttl: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
            retry_after: Duration::from_secs(1),
            caller: Arc::new(default_caller),
            owner: None,
            store_policy: Arc::new(default_store_policy),
        }
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("lock_ttl", &self.lock_ttl)
            .field("ttl", &self.ttl)
            .field("retry_after", &self.retry_after)
            .finish_non_exhaustive()
    }
}

impl IdempotencyConfig {
    /// The methods the layer applies to (default POST and PATCH); requests with other methods
    /// pass through untouched. At least one.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Whether a covered request without `Idempotency-Key` is refused with 400 (the default) or
    /// passed to the handler without any record.
    #[must_use]
    pub fn require_key(mut self, required: bool) -> Self {
        self.require_key = required;
        self
    }

    /// The HMAC key of request fingerprints. Every instance of a service must use the same
    /// one, or their records do not match each other's. It is empty by default: fingerprints
    /// are then an HMAC under a public key, so a stored fingerprint of a body holding a
    /// low-entropy secret (a card number, a one-time code) could be guessed offline; set a
    /// random secret of 32 bytes or more.
    #[must_use]
    pub fn fingerprint_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Arc::from(secret.into());
        self
    }

    /// The largest request body the layer buffers (default 1 MiB); a larger one is answered 413
    /// `payload_too_large` before the handler runs.
    #[must_use]
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// The largest response kept for replay (default 1 MiB); see the module docs for a larger one.
    #[must_use]
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// How long the first request holds its key before another may take it over (default 30 s).
    /// More than zero, at most [`IdempotencyConfig::ttl`].
    #[must_use]
    pub fn lock_ttl(mut self, lock_ttl: Duration) -> Self {
        self.lock_ttl = lock_ttl;
        self
    }

    /// How long a completed request is replayed (default 24 h). More than zero, at most
    /// [`MAX_TTL`].
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The `Retry-After` of 409 `idempotency_key_in_flight` and 503 answers (default 1 s),
    /// rounded up to whole seconds.
    #[must_use]
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Names the caller of a request from its head (method, URI, headers, extensions); keys are
    /// scoped per caller. `None` is the [`ANONYMOUS_CALLER`]. Default: [`default_caller`].
    #[must_use]
    pub fn caller<F>(mut self, caller: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.caller = Arc::new(caller);
        self
    }

    /// Names the store's owner of a request directly, for a service whose authentication layer
    /// already gives each caller a stable id that is no secret (an API key's id): records are
    /// then scoped by it as it is, not by a hash of a caller id. A request it has no owner for is
    /// refused with 500 `internal` and its handler does not run: the layer was placed before the
    /// authentication it relies on, and no request may fall into a shared key space. Overrides
    /// [`IdempotencyConfig::caller`].
    #[must_use]
    pub fn owner<F>(mut self, owner: F) -> Self
    where
        F: Fn(&Parts) -> Option<Uuid> + Send + Sync + 'static,
    {
        self.owner = Some(Arc::new(owner));
        self
    }

    /// Which response statuses are kept for replay; the key of any other is released so that a
    /// retry runs again. Default: [`default_store_policy`].
    #[must_use]
    pub fn store_response_when<F>(mut self, policy: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.store_policy = Arc::new(policy);
        self
    }

    /// Checks the limits and times.
    ///
    /// # Errors
    /// [`IdempotencyConfigError`] names the setting that is out of range.
    pub fn validate(&self) -> Result<(), IdempotencyConfigError> {
        if self.methods.is_empty() {
            return Err(IdempotencyConfigError::NoMethods);
        }
        if self.ttl.is_zero() || self.ttl > MAX_TTL {
            return Err(IdempotencyConfigError::Ttl(self.ttl));
        }
        if self.lock_ttl.is_zero() || self.lock_ttl > self.ttl {
            return Err(IdempotencyConfigError::LockTtl {
                lock_ttl: self.lock_ttl,
                ttl: self.ttl,
            });
        }
        if self.retry_after > MAX_TTL {
            return Err(IdempotencyConfigError::RetryAfter(self.retry_after));
        }
        Ok(())
    }

    /// The fingerprint the layer computes for a request: `target` is the path with its query,
    /// as the client sent it (before any router nesting stripped a prefix).
    #[must_use]
    pub fn fingerprint(&self, method: &Method, target: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::keyed(&self.secret, method.as_str(), target, body)
    }

    /// The caller id of a request, as the layer scopes its key.
    #[must_use]
    pub fn caller_id(&self, parts: &Parts) -> String {
        (self.caller)(parts).unwrap_or_else(|| ANONYMOUS_CALLER.to_owned())
    }

    /// The store's owner of a request: what [`IdempotencyConfig::owner`] names, else the owner
    /// of its caller id ([`owner_for_caller`]). `None` only when the owner function has none.
    #[must_use]
    pub fn owner_of(&self, parts: &Parts) -> Option<Uuid> {
        match &self.owner {
            Some(owner) => owner(parts),
            None => Some(owner_for_caller(&self.caller_id(parts))),
        }
    }
}

/// A setting of [`IdempotencyConfig`] out of range. Fix the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyConfigError {
    /// The layer applies to no method at all.
    #[error("the idempotency layer needs at least one method")]
    NoMethods,
    /// The replay time is zero or longer than [`MAX_TTL`].
    #[error("idempotency ttl {0:?} must be more than zero and at most {MAX_TTL:?}")]
    Ttl(Duration),
    /// The lock is zero or outlives the record.
    #[error("idempotency lock_ttl {lock_ttl:?} must be more than zero and at most the ttl {ttl:?}")]
    LockTtl {
        /// The configured lock time.
        lock_ttl: Duration,
        /// The configured replay time.
        ttl: Duration,
    },
    /// The `Retry-After` is longer than [`MAX_TTL`].
    #[error("idempotency retry_after {0:?} must be at most {MAX_TTL:?}")]
    RetryAfter(Duration),
}

/// The default caller id: the SHA-256 (hex) of the request's `Authorization` header values, or
/// [`ANONYMOUS_CALLER`] when it has none. The header itself is never stored.
#[must_use]
pub fn default_caller(parts: &Parts) -> Option<String> {
    let mut values = parts.headers.get_all(header::AUTHORIZATION).iter().peekable();
    if values.peek().is_none() {
        return Some(ANONYMOUS_CALLER.to_owned());
    }
    let mut hash = Sha256::new();
    for value in values {
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    Some(hex(&hash.finalize()))
}

/// The store's `owner` of a caller id: a UUID (version 8) made of the id's SHA-256, so the same
/// caller is the same owner on every instance and the id itself is never stored.
#[must_use]
pub fn owner_for_caller(caller_id: &str) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"concord idempotency owner\0");
    hash.update(caller_id.as_bytes());
    let digest: [u8; 32] = hash.finalize().into();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The default policy of kept responses: 2xx, and 4xx other than 408 Request Timeout,
/// 409 Conflict, 425 Too Early and 429 Too Many Requests.
#[must_use]
pub fn default_store_policy(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::REQUEST_TIMEOUT
                    | StatusCode::CONFLICT
                    | StatusCode::TOO_EARLY
                    | StatusCode::TOO_MANY_REQUESTS
            ))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(authorization: Option<&str>) -> Parts {
        let mut req = Request::builder().method(Method::POST).uri("/orders");
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn callers_are_told_apart_by_authorization() {
        let alice = default_caller(&parts(Some("Bearer alice"))).unwrap();
        let bob = default_caller(&parts(Some("Bearer bob"))).unwrap();
        assert_ne!(alice, bob);
        assert_eq!(alice.len(), 64);
        assert!(!alice.contains("alice"));
        assert_eq!(default_caller(&parts(None)).unwrap(), ANONYMOUS_CALLER);
        assert_eq!(owner_for_caller(&alice), owner_for_caller(&alice));
        assert_ne!(owner_for_caller(&alice), owner_for_caller(&bob));
        assert_eq!(owner_for_caller(&alice).get_version_num(), 8);
    }

    #[test]
    fn an_owner_function_names_the_owner_as_it_is() {
        let id = Uuid::now_v7();
        let config = IdempotencyConfig::default().owner(move |p| p.headers.get(header::AUTHORIZATION).map(|_| id));
        assert_eq!(config.owner_of(&parts(Some("Bearer k"))), Some(id));
        assert_eq!(
            config.owner_of(&parts(None)),
            None,
            "no owner: refused, never a shared one"
        );
        let by_caller = IdempotencyConfig::default();
        let alice = parts(Some("Bearer alice"));
        assert_eq!(
            by_caller.owner_of(&alice),
            Some(owner_for_caller(&by_caller.caller_id(&alice)))
        );
    }

    #[test]
    fn the_default_policy_keeps_answers_a_retry_would_get_again() {
        for kept in [200, 201, 204, 400, 404, 422] {
            assert!(default_store_policy(StatusCode::from_u16(kept).unwrap()), "{kept}");
        }
        for released in [101, 302, 408, 409, 425, 429, 500, 502, 503] {
            assert!(
                !default_store_policy(StatusCode::from_u16(released).unwrap()),
                "{released}"
            );
        }
    }

    #[test]
    fn configs_out_of_range_are_refused() {
        assert!(IdempotencyConfig::default().validate().is_ok());
        assert_eq!(
            IdempotencyConfig::default().methods([]).validate(),
            Err(IdempotencyConfigError::NoMethods)
        );
        assert!(matches!(
            IdempotencyConfig::default().lock_ttl(Duration::ZERO).validate(),
            Err(IdempotencyConfigError::LockTtl { .. })
        ));
        assert!(matches!(
            IdempotencyConfig::default()
                .ttl(Duration::from_secs(10))
                .lock_ttl(Duration::from_secs(11))
                .validate(),
            Err(IdempotencyConfigError::LockTtl { .. })
        ));
        assert!(matches!(
            IdempotencyConfig::default()
                .ttl(MAX_TTL + Duration::from_secs(1))
                .validate(),
            Err(IdempotencyConfigError::Ttl(_))
        ));
        assert!(matches!(
            IdempotencyConfig::default().ttl(Duration::ZERO).validate(),
            Err(IdempotencyConfigError::Ttl(_))
        ));
    }

    #[test]
    fn fingerprints_depend_on_the_secret_and_the_query() {
        let a = IdempotencyConfig::default().fingerprint_secret("one");
        let b = IdempotencyConfig::default().fingerprint_secret("two");
        assert_eq!(
            a.fingerprint(&Method::POST, "/orders", b"{}"),
            a.fingerprint(&Method::POST, "/orders", b"{}")
        );
        assert_ne!(
            a.fingerprint(&Method::POST, "/orders", b"{}"),
            b.fingerprint(&Method::POST, "/orders", b"{}")
        );
        assert_ne!(
            a.fingerprint(&Method::POST, "/orders", b"{}"),
            a.fingerprint(&Method::POST, "/orders?x=1", b"{}")
        );
        assert!(!format!("{a:?}").contains("one"));
    }
}
