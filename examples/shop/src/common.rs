//! What every shop service shares: its database handle (SQLite in the embedded shape, PostgreSQL
//! in the scale-out one), bearer-token auth, problem answers, injected faults and serving.

use std::collections::HashSet;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

/// A service's own database.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

/// Runs `$body` once per backend with `$pool` bound to the pool, so one text of portable SQL
/// (`$1` placeholders, `ON CONFLICT`, `RETURNING`) serves both.
#[macro_export]
macro_rules! with_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::common::Db::Sqlite($pool) => $body,
            $crate::common::Db::Pg($pool) => $body,
        }
    };
}

/// Writes the items once and compiles them twice: in `on_sqlite` with `Pool`/`Conn` the SQLite
/// types and `barrier`, `inbox`, `outbox`, `begin` the sdk's SQLite modules, and in `on_pg` with
/// the PostgreSQL ones. The SQL inside must be portable: `$1` placeholders, `ON CONFLICT`,
/// `RETURNING`, `BIGINT` and `TEXT` columns.
#[macro_export]
macro_rules! per_backend {
    ($($item:item)*) => {
        pub mod on_sqlite {
            #![allow(unused_imports)]
            use super::*;
            use $crate::common::sqlite_mods::{barrier, begin, bound_lock_wait, inbox, outbox};
            pub type Pool = sqlx::SqlitePool;
            pub type Conn = sqlx::SqliteConnection;
            $($item)*
        }
        pub mod on_pg {
            #![allow(unused_imports)]
            use super::*;
            use $crate::common::postgres_mods::{barrier, begin, bound_lock_wait, inbox, outbox};
            pub type Pool = sqlx::PgPool;
            pub type Conn = sqlx::PgConnection;
            $($item)*
        }
    };
}

/// The sdk's SQLite modules, under the names [`with_db!`] bodies use.
pub mod sqlite_mods {
    pub use concord_sdk::barrier::sqlite as barrier;
    pub use concord_sdk::inbox::sqlite as inbox;
    pub use concord_sdk::outbox::sqlite as outbox;

    /// A write transaction that takes the lock first, so concurrent writers queue.
    pub async fn begin(pool: &sqlx::SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// SQLite's writers wait on the busy timeout already.
    pub async fn bound_lock_wait(_conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

/// The sdk's PostgreSQL modules, under the names [`with_db!`] bodies use.
pub mod postgres_mods {
    pub use concord_sdk::barrier::postgres as barrier;
    pub use concord_sdk::inbox::postgres as inbox;
    pub use concord_sdk::outbox::postgres as outbox;

    /// A `READ COMMITTED` transaction whose row-lock waits are bounded ([`bound_lock_wait`]).
    pub async fn begin(pool: &sqlx::PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        bound_lock_wait(&mut tx).await?;
        Ok(tx)
    }

    /// A row held by a prepared transaction stays locked until its phase 2; a request waiting
    /// on it gives up after 2 s (and is retried) instead of holding a connection indefinitely.
    pub async fn bound_lock_wait(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(conn)
            .await
            .map(drop)
    }
}

impl Db {
    /// Opens `sqlite://PATH` (created if missing, WAL, `synchronous = FULL`, 10 s busy timeout) or
    /// `postgres://...`.
    ///
    /// # Errors
    /// A bad URL or an unreachable database.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(options)
                .await?;
            Ok(Self::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            Ok(Self::Pg(pool))
        } else {
            anyhow::bail!("a database URL starts with sqlite: or postgres:")
        }
    }

    /// Runs DDL statements (portable text, `;`-separated).
    ///
    /// # Errors
    /// The database's.
    pub async fn execute_script(&self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .map(drop),
            Self::Pg(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .map(drop),
        }
    }
}

/// What a participant's use case failed on: its database, the barrier or the outbox. Each is
/// answered 5xx, so the orchestrator retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Barrier(#[from] concord_sdk::barrier::BarrierError),
    #[error(transparent)]
    Outbox(#[from] concord_sdk::outbox::OutboxError),
}

/// A `problem+json` answer with a stable `code` of the shop's own.
pub fn problem(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    concord_api::Problem::custom(status.as_u16(), code, detail).into_response()
}

/// A 500 for a failure of the service's own storage or of a call it made; the detail is logged,
/// not sent.
pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %error, "{context}");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("{context}; retry"),
    )
}

/// The barrier key of a saga call, which must be the operation `op` of its step; else the
/// answer to send (boxed: a response is large).
///
/// # Errors
/// A missing or malformed key, or the other operation.
pub fn saga_key(
    headers: &HeaderMap,
    op: concord_sdk::barrier::BarrierOp,
) -> Result<concord_sdk::barrier::BarrierKey, Box<Response>> {
    let key = concord_sdk::barrier::BarrierKey::from_headers(headers)
        .map_err(|e| Box::new(problem(e.http_status(), "bad_saga_call", e.to_string())))?;
    if key.op() == op {
        Ok(key)
    } else {
        Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "bad_saga_call",
            "this route takes the other operation",
        )))
    }
}

/// Serves one saga call: checks its barrier key is for `op`, injects the fault the call asks for
/// (a 503 before any work, or a late answer after it), and otherwise answers what `work` does
/// with the key.
pub async fn saga_call<F, Fut>(
    faults: &Faults,
    headers: &HeaderMap,
    op: concord_sdk::barrier::BarrierOp,
    work: F,
) -> Response
where
    F: FnOnce(concord_sdk::barrier::BarrierKey) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    saga_call_seeing(faults, headers, op, |key, _| work(key)).await
}

/// [`saga_call`], telling `work` whether this call's answer will come late, so a participant
/// that also answers by another way (a completion URL) can make that late too.
pub async fn saga_call_seeing<F, Fut>(
    faults: &Faults,
    headers: &HeaderMap,
    op: concord_sdk::barrier::BarrierOp,
    work: F,
) -> Response
where
    F: FnOnce(concord_sdk::barrier::BarrierKey, Option<Duration>) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let key = match saga_key(headers, op) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let fault = faults.take(headers);
    if fault == Some(Fault::Unavailable) {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "injected_fault", "injected fault");
    }
    let late = (fault == Some(Fault::SlowAnswer)).then_some(faults.slow_answer);
    let answer = work(key, late).await;
    if fault == Some(Fault::SlowAnswer) {
        faults.answer_late().await;
    }
    answer
}

/// A 200 JSON answer.
pub fn ok(body: Value) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

/// The whole router of a service: `routes` behind its bearer token, `open` (routes with their own
/// auth) beside them, `GET /health` for anyone, and every request in a span continuing the
/// caller's trace.
pub fn service_router(routes: axum::Router, open: axum::Router, token: String) -> axum::Router {
    let token: Arc<str> = token.into();
    routes
        .layer(axum::middleware::from_fn_with_state(token, require_token))
        .merge(open)
        .route("/health", axum::routing::get(|| async { "ok" }))
        .layer(axum::middleware::from_fn(crate::trace_layer))
}

/// Requires `Authorization: Bearer <token>` (compared as hashes, in constant time as far as the
/// digest goes) on every request of the router it wraps.
pub async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let allowed = presented.is_some_and(|p| Sha256::digest(p.as_bytes()) == Sha256::digest(token.as_bytes()));
    if allowed {
        next.run(request).await
    } else {
        problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }
}

/// The header by which a saga call asks a participant, run with `--faults`, to misbehave once.
pub const FAULT_HEADER: &str = "x-shop-fault";

/// The fault by which an asynchronous call's completion is lost ([`Faults::completion_lost`]).
pub const COMPLETION_LOST: &str = "completion-lost";

/// A misbehaviour injected on a saga call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 503 without doing anything.
    Unavailable,
    /// Do the work, commit it, then answer late (past the step's timeout): the orchestrator sees
    /// a timeout and retries a call whose effect already happened.
    SlowAnswer,
}

/// Faults a participant honours: each asked-for fault fires on the first call of its
/// idempotency key only, so the orchestrator's retry succeeds.
#[derive(Debug, Clone)]
pub struct Faults {
    enabled: bool,
    slow_answer: Duration,
    fired: Arc<Mutex<HashSet<String>>>,
}

impl Faults {
    #[must_use]
    pub fn new(enabled: bool, slow_answer: Duration) -> Self {
        Self {
            enabled,
            slow_answer,
            fired: Arc::default(),
        }
    }

    /// The fault to inject on this call, if any.
    #[must_use]
    pub fn take(&self, headers: &HeaderMap) -> Option<Fault> {
        if !self.enabled {
            return None;
        }
        let fault = match headers.get(FAULT_HEADER).and_then(|v| v.to_str().ok())? {
            "5xx" => Fault::Unavailable,
            "timeout" => Fault::SlowAnswer,
            _ => return None,
        };
        let key = headers
            .get(concord_sdk::barrier::IDEMPOTENCY_KEY_HEADER)
            .and_then(|v| v.to_str().ok())?
            .to_owned();
        let fresh = self.fired.lock().map(|mut f| f.insert(key.clone())).unwrap_or(false);
        if fresh {
            tracing::info!(fault = ?fault, key = %key, "fault injected");
        }
        fresh.then_some(fault)
    }

    /// Whether this call asks that its asynchronous result be lost: the participant answers 202
    /// and does the work, but the completion never reaches the saga, which must treat the step
    /// as uncertain when its `callback_timeout_ms` runs out, and compensate it.
    #[must_use]
    pub fn completion_lost(&self, headers: &HeaderMap) -> bool {
        self.enabled && headers.get(FAULT_HEADER).and_then(|v| v.to_str().ok()) == Some(COMPLETION_LOST)
    }

    /// Sleeps past the caller's timeout, for [`Fault::SlowAnswer`].
    pub async fn answer_late(&self) {
        tokio::time::sleep(self.slow_answer).await;
    }
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An id derived from text: the same text always gives the same id (for ids that must survive
/// a retry, such as the id of an event a handler appends).
#[must_use]
pub fn derived_id(parts: &[&str]) -> uuid::Uuid {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// Serves `router` on `listener` until `shutdown`; logs `shop service listening` with the address.
///
/// # Errors
/// The server's.
pub async fn serve(
    service: &str,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // TLS, and mutual TLS, from the settings the Concord server reads (`CONCORD_TLS_CERT`, ...).
    let tls = match concord_sdk::serve::ServerTlsFiles::from_env()? {
        Some(files) => Some(concord_sdk::serve::ServerTls::load(&files)?),
        None => None,
    };
    tracing::info!(service, addr = %addr, tls = tls.is_some(), "shop service listening");
    let limits = concord_sdk::serve::ConnectionLimits::default();
    concord_sdk::serve::serve(listener, router, limits, tls, shutdown, Duration::from_secs(10)).await;
    Ok(())
}

/// An HTTP client with `timeout` per request, trusting and showing what `tls` names.
///
/// # Errors
/// A TLS file that cannot be used.
pub fn http_client(timeout: Duration, tls: &concord_sdk::ClientTls) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2));
    Ok(tls.apply(builder)?.build()?)
}

/// The sdk client of the Concord server.
///
/// # Errors
/// A bad URL or TLS file.
pub fn concord_client(url: &str, key: &str, tls: &concord_sdk::ClientTls) -> anyhow::Result<concord_sdk::Client> {
    let http = http_client(Duration::from_secs(30), tls)?;
    Ok(concord_sdk::Client::with_http(url, key, http))
}

/// Retries `f` while it fails, with a short backoff, up to `attempts` times.
///
/// # Errors
/// The last failure.
pub async fn retry<T, E, F, Fut>(attempts: u32, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    let mut n = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if n >= attempts => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                n += 1;
            }
        }
    }
}

/// Runs the outbox relay of `db` to `broker` until `stop`, logging (never stopping on) failures.
pub fn spawn_relay(
    db: &Db,
    broker: Arc<dyn concord_sdk::broker::Broker>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let config = concord_sdk::outbox::RelayConfig {
        poll_interval: Duration::from_millis(50),
        backoff_max: Duration::from_secs(2),
        ..concord_sdk::outbox::RelayConfig::default()
    };
    let db = db.clone();
    tokio::spawn(async move {
        loop {
            let result = match &db {
                Db::Sqlite(p) => {
                    concord_sdk::outbox::sqlite::SqliteRelay::new(p.clone(), Arc::clone(&broker), config.clone())
                        .run(stop.clone())
                        .await
                }
                Db::Pg(p) => {
                    concord_sdk::outbox::postgres::PgRelay::new(p.clone(), Arc::clone(&broker), config.clone())
                        .run(stop.clone())
                        .await
                }
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay stopped; restarting it");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if *stop.borrow() {
                return;
            }
        }
    })
}

/// A fault for consumers: hands some deliveries over twice in a row, as a broker does after a
/// lost acknowledgement. Which ones follows from the seed and the message id.
#[derive(Debug, Clone, Copy)]
pub struct DuplicateDeliveries {
    pub percent: u8,
    pub seed: u64,
}

impl DuplicateDeliveries {
    #[must_use]
    pub fn apply(&self, batch: Vec<concord_sdk::broker::Delivery>) -> Vec<concord_sdk::broker::Delivery> {
        if self.percent == 0 {
            return batch;
        }
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            let digest = Sha256::digest(format!("{}:{}", self.seed, d.message.id).as_bytes());
            let twice = d.attempt == 1 && digest[0] % 100 < self.percent;
            if twice {
                tracing::info!(message = %d.message.id, "fault injected: duplicate delivery");
                out.push(d.clone());
            }
            out.push(d);
        }
        out
    }
}

/// The header in which the card provider signs a webhook: hex HMAC-SHA256 of the body under the
/// API key the provider and payments share.
pub const WEBHOOK_SIGNATURE: &str = "provider-signature";

fn webhook_mac(key: &str) -> hmac::Hmac<Sha256> {
    <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length")
}

/// The signature of a webhook body.
#[must_use]
pub fn sign_webhook(key: &str, body: &[u8]) -> String {
    use hmac::Mac as _;
    let mut mac = webhook_mac(key);
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Whether `signature` (hex) signs `body` under `key`, compared in constant time.
#[must_use]
pub fn webhook_signed(key: &str, body: &[u8], signature: &str) -> bool {
    use hmac::Mac as _;
    let Some(bytes) = (0..signature.len())
        .step_by(2)
        .map(|i| signature.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = webhook_mac(key);
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

/// The log line a service writes each time more saga calls are in at once than ever before in
/// this process, with `peak=N`: the demo's checker reads the highest against the host's limit.
pub const SAGA_CALLS_PEAK: &str = "saga calls in at once, a new peak";

/// Counts the saga calls (requests carrying `Concord-Saga-Id`) in at once, as the participant
/// sees them. A call counts from its arrival until it is answered, or until `window` has passed
/// (the caller's timeout, less the network: past it the caller has given up and no longer holds
/// its place), or until the connection drops it.
pub struct SagaCallCounter {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    window: Option<Duration>,
}

impl SagaCallCounter {
    #[must_use]
    pub fn new(window: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            now: std::sync::atomic::AtomicUsize::new(0),
            peak: std::sync::atomic::AtomicUsize::new(0),
            window,
        })
    }
}

/// One counted call: uncounted once, whichever comes first.
struct Counted(Arc<SagaCallCounter>, std::sync::atomic::AtomicBool);

impl Counted {
    fn end(&self) {
        if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.end();
    }
}

/// The middleware of [`SagaCallCounter`].
pub async fn count_saga_calls(State(c): State<Arc<SagaCallCounter>>, req: Request, next: Next) -> Response {
    use std::sync::atomic::Ordering;
    if !req.headers().contains_key("concord-saga-id") {
        return next.run(req).await;
    }
    let n = c.now.fetch_add(1, Ordering::SeqCst) + 1;
    if c.peak.fetch_max(n, Ordering::SeqCst) < n {
        tracing::info!(peak = n, "{SAGA_CALLS_PEAK}");
    }
    let counted = Arc::new(Counted(c.clone(), std::sync::atomic::AtomicBool::new(false)));
    // The timer holds the call weakly: a call the connection drops is uncounted at once.
    let timer = c.window.map(|w| {
        let counted = Arc::downgrade(&counted);
        tokio::spawn(async move {
            tokio::time::sleep(w).await;
            if let Some(c) = counted.upgrade() {
                c.end();
            }
        })
    });
    let response = next.run(req).await;
    counted.end();
    if let Some(t) = timer {
        t.abort();
    }
    response
}
