//! The `Idempotency-Key` layer against its three real stores: every behaviour is served over HTTP
//! by an axum router on 127.0.0.1:0 with the layer, once on SQLite, once on PostgreSQL and once
//! on Redis. PostgreSQL and Redis tests need `CONCORD_TEST_POSTGRES_URL` and
//! `CONCORD_TEST_REDIS_URL`; without them each says that it skipped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use concord_sdk::idempotency::postgres::PostgresIdempotencyStore;
use concord_sdk::idempotency::redis::RedisIdempotencyStore;
use concord_sdk::idempotency::sqlite::SqliteIdempotencyStore;
use concord_sdk::idempotency::{
    self, Fingerprint, IdempotencyBegin, IdempotencyClaim, IdempotencyConfig, IdempotencyKey, IdempotencyLayer,
    IdempotencyStore, StoredResponse, owner_for_caller,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

const SECRET: &str = "test fingerprint secret";
const ALICE: &str = "Bearer alice";
const BOB: &str = "Bearer bob";

// ---------------------------------------------------------------------------------------------
// Stores
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
}

/// One store on a fresh database (or a fresh key prefix), and what a test needs to look inside.
struct Backend {
    store: Arc<dyn IdempotencyStore>,
    db: Db,
}

enum Db {
    Sqlite {
        pool: SqlitePool,
        _dir: tempfile::TempDir,
    },
    Postgres {
        pool: PgPool,
        base: String,
        url: String,
    },
    Redis {
        store: RedisIdempotencyStore,
        conn: ::redis::aio::ConnectionManager,
    },
}

impl Backend {
    /// `None` (after saying so) when the store's server is not configured.
    async fn open(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Sqlite => Some(Self::sqlite().await),
            Kind::Postgres => Self::postgres().await,
            Kind::Redis => Self::redis().await,
        }
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("service.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("open sqlite");
        // Twice: creating the table is idempotent.
        idempotency::sqlite::ensure_schema(&pool).await.expect("schema");
        idempotency::sqlite::ensure_schema(&pool).await.expect("schema again");
        Self {
            store: Arc::new(SqliteIdempotencyStore::new(pool.clone())),
            db: Db::Sqlite { pool, _dir: dir },
        }
    }

    async fn postgres() -> Option<Self> {
        let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
            eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
            return None;
        };
        let url = concord_store_postgres::create_scratch_database(&base, "concord_t_idem")
            .await
            .expect("scratch database");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect postgres");
        idempotency::postgres::ensure_schema(&pool).await.expect("schema");
        idempotency::postgres::ensure_schema(&pool).await.expect("schema again");
        Some(Self {
            store: Arc::new(PostgresIdempotencyStore::new(pool.clone())),
            db: Db::Postgres { pool, base, url },
        })
    }

    async fn redis() -> Option<Self> {
        let Ok(url) = std::env::var("CONCORD_TEST_REDIS_URL") else {
            eprintln!("skipped: CONCORD_TEST_REDIS_URL is not set");
            return None;
        };
        let client = ::redis::Client::open(url).expect("redis url");
        let conn = ::redis::aio::ConnectionManager::new(client)
            .await
            .expect("connect redis");
        // The shared Redis serves other tests too: this test's records live under its own prefix.
        let prefix = format!("concord:t:idem:{}:", Uuid::now_v7().simple());
        let store = RedisIdempotencyStore::new(conn.clone()).with_prefix(prefix);
        Some(Self {
            store: Arc::new(store.clone()),
            db: Db::Redis { store, conn },
        })
    }

    fn kind(&self) -> Kind {
        match self.db {
            Db::Sqlite { .. } => Kind::Sqlite,
            Db::Postgres { .. } => Kind::Postgres,
            Db::Redis { .. } => Kind::Redis,
        }
    }

    /// Whether the store physically holds a record of `(owner, key)`, expired or not.
    async fn record_exists(&self, owner: Uuid, key: &str) -> bool {
        match &self.db {
            Db::Sqlite { pool, .. } => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM concord_idempotency WHERE owner = ? AND key = ?")
                    .bind(owner)
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .expect("count")
                    == 1
            }
            Db::Postgres { pool, .. } => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM concord_idempotency WHERE owner = $1 AND key = $2")
                    .bind(owner)
                    .bind(key)
                    .fetch_one(pool)
                    .await
                    .expect("count")
                    == 1
            }
            Db::Redis { store, conn } => ::redis::cmd("EXISTS")
                .arg(store.record_key(owner, &IdempotencyKey::parse(key).unwrap()))
                .query_async::<i64>(&mut conn.clone())
                .await
                .expect("exists")
                .eq(&1),
        }
    }

    /// A store of the same kind that cannot be reached: the SQL pools are closed (so this is the
    /// last use of the backend), Redis points at a port nobody listens on.
    async fn unreachable_store(&self) -> Arc<dyn IdempotencyStore> {
        match &self.db {
            Db::Sqlite { pool, .. } => {
                pool.close().await;
                Arc::clone(&self.store)
            }
            Db::Postgres { pool, .. } => {
                pool.close().await;
                Arc::clone(&self.store)
            }
            Db::Redis { .. } => {
                let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = free.local_addr().expect("addr").port();
                drop(free);
                let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
                let config = ::redis::aio::ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                let conn = ::redis::aio::ConnectionManager::new_lazy_with_config(client, config).expect("lazy manager");
                Arc::new(RedisIdempotencyStore::new(conn))
            }
        }
    }

    async fn teardown(self) {
        match self.db {
            Db::Sqlite { pool, _dir } => pool.close().await,
            Db::Postgres { pool, base, url } => {
                pool.close().await;
                concord_store_postgres::drop_scratch_database(&base, &url)
                    .await
                    .expect("drop scratch database");
            }
            Db::Redis { store, conn } => {
                let mut conn = conn.clone();
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{}*", store.prefix()))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                        .expect("scan");
                    if !keys.is_empty() {
                        let _: i64 = ::redis::cmd("DEL")
                            .arg(&keys)
                            .query_async(&mut conn)
                            .await
                            .expect("del");
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
    }
}

/// Runs each test once per store: `sqlite::name`, `postgres::name`, `redis::name`.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        on_every_store!(@mod sqlite, Sqlite, $($test),*);
        on_every_store!(@mod postgres, Postgres, $($test),*);
        on_every_store!(@mod redis, Redis, $($test),*);
    };
    (@mod $module:ident, $kind:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(backend) = super::Backend::open(super::Kind::$kind).await {
                        super::$test(&backend).await;
                        backend.teardown().await;
                    }
                }
            )*
        }
    };
}

on_every_store!(
    one_hundred_concurrent_requests_run_the_handler_once,
    the_same_key_with_another_body_is_refused_with_422,
    a_missing_key_is_refused_unless_optional,
    malformed_keys_are_refused_with_400,
    an_oversized_body_is_refused_with_413_before_the_handler,
    two_callers_with_the_same_key_each_run_once,
    a_key_held_by_a_live_holder_answers_409_with_retry_after,
    a_dead_holder_is_taken_over_and_its_late_complete_is_fenced_out,
    server_errors_are_not_stored_so_a_retry_runs_again,
    client_errors_are_stored_and_replayed,
    a_response_marked_do_not_store_is_never_replayed,
    a_panicking_handler_releases_the_key,
    a_response_over_the_limit_is_answered_but_not_replayed,
    expired_records_run_again_and_are_purged,
    a_completed_record_is_final_until_it_expires,
    an_unreachable_store_fails_closed_with_503,
    a_request_dropped_while_its_claim_is_taken_still_runs_once,
);

// ---------------------------------------------------------------------------------------------
// The service under test
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Handlers {
    runs: Arc<AtomicUsize>,
    delay: Duration,
    gate: Arc<tokio::sync::Notify>,
}

impl Handlers {
    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }
}

async fn create_order(State(h): State<Handlers>, body: String) -> Response {
    let run = h.run();
    tokio::time::sleep(h.delay).await;
    let order = json!({ "order": format!("o-{run}"), "run": run, "request": body });
    (StatusCode::CREATED, axum::Json(order)).into_response()
}

/// Like `create_order`, but answers only once the test opens the gate.
async fn gated(State(h): State<Handlers>, body: String) -> Response {
    let run = h.run();
    h.gate.notified().await;
    let order = json!({ "order": format!("o-{run}"), "run": run, "request": body });
    (StatusCode::CREATED, axum::Json(order)).into_response()
}

/// Fails with 500 the first time, succeeds after.
async fn flaky(State(h): State<Handlers>) -> Response {
    let run = h.run();
    if run == 1 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "database hiccup").into_response();
    }
    (StatusCode::CREATED, axum::Json(json!({ "run": run }))).into_response()
}

/// A business refusal: out of stock.
async fn refuse(State(h): State<Handlers>) -> Response {
    let run = h.run();
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "out of stock", "run": run })),
    )
        .into_response()
}

/// Panics the first time, succeeds after.
async fn panics_once(State(h): State<Handlers>) -> Response {
    let run = h.run();
    assert!(run > 1, "the handler fails on its first run");
    (StatusCode::CREATED, axum::Json(json!({ "run": run }))).into_response()
}

/// Answers more bytes than the layer keeps (see `RESPONSE_LIMIT`).
async fn big(State(h): State<Handlers>) -> Response {
    h.run();
    (StatusCode::OK, "x".repeat(RESPONSE_LIMIT + 1)).into_response()
}

/// A new secret on every run, marked so that it is never kept for replay.
async fn secret(State(h): State<Handlers>) -> Response {
    let run = h.run();
    let mut response = (StatusCode::CREATED, axum::Json(json!({ "secret": format!("s-{run}") }))).into_response();
    response.extensions_mut().insert(idempotency::DoNotStore);
    response
}

async fn list_orders(State(h): State<Handlers>) -> Response {
    let run = h.run();
    axum::Json(json!({ "orders": [], "run": run })).into_response()
}

const BODY_LIMIT: usize = 64;
const RESPONSE_LIMIT: usize = 256;

fn config() -> IdempotencyConfig {
    IdempotencyConfig::default()
        .fingerprint_secret(SECRET)
        .max_body_bytes(BODY_LIMIT)
        .max_response_bytes(RESPONSE_LIMIT)
}

/// The router of a small service with the layer, served on 127.0.0.1:0.
struct App {
    addr: SocketAddr,
    http: reqwest::Client,
    runs: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
    layer: IdempotencyLayer,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn spawn_app(store: Arc<dyn IdempotencyStore>, config: IdempotencyConfig, delay: Duration) -> App {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(store, config).expect("valid config");
    let gate = Arc::new(tokio::sync::Notify::new());
    let handlers = Handlers {
        runs: Arc::clone(&runs),
        delay,
        gate: Arc::clone(&gate),
    };
    let app = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/gated", post(gated))
        .route("/flaky", post(flaky))
        .route("/refuse", post(refuse))
        .route("/panics", post(panics_once))
        .route("/big", post(big))
        .route("/secret", post(secret))
        .with_state(handlers)
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    App {
        addr,
        http: reqwest::Client::new(),
        runs,
        gate,
        layer,
        server,
    }
}

/// What the client saw.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    replayed: bool,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The problem's code, after checking the body is a whole problem document.
    fn code(&self) -> String {
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{self:?}"
        );
        let p = self.json();
        for member in ["type", "title", "detail"] {
            assert!(p[member].is_string(), "problem without {member}: {p}");
        }
        assert_eq!(p["status"], json!(self.status));
        p["code"].as_str().expect("code").to_owned()
    }
}

impl App {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("http://{}{path}", self.addr))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().expect("ascii header").to_owned())
        };
        let replayed = header("idempotent-replayed").as_deref() == Some("true");
        let retry_after = header("retry-after");
        let content_type = header("content-type");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body").to_vec();
        Answer {
            status,
            replayed,
            retry_after,
            content_type,
            body,
        }
    }

    /// POST `body` to `path` as `caller` with `key`.
    async fn post(&self, path: &str, key: Option<&str>, caller: &str, body: &str) -> Answer {
        let mut request = self
            .request(Method::POST, path)
            .header("authorization", caller)
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request).await
    }

    /// The owner the layer scopes `caller`'s keys to.
    fn owner(&self, caller: &str) -> Uuid {
        let (parts, ()) = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header("authorization", caller)
            .body(())
            .unwrap()
            .into_parts();
        owner_for_caller(&self.layer.config().caller_id(&parts))
    }

    /// The claim the layer makes for `POST {path}` with `body` by `caller`, at times of our choosing.
    fn claim_of<'k>(
        &self,
        caller: &str,
        key: &'k IdempotencyKey,
        path: &str,
        body: &str,
        times: Times,
    ) -> IdempotencyClaim<'k> {
        let config = self.layer.config();
        IdempotencyClaim {
            owner: self.owner(caller),
            key,
            fingerprint: config.fingerprint(&Method::POST, path, body.as_bytes()),
            now: times.now,
            locked_until: times.locked_until,
            expires_at: times.expires_at,
        }
    }
}

#[derive(Clone, Copy)]
struct Times {
    now: DateTime<Utc>,
    locked_until: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

fn times(now: DateTime<Utc>, lock: chrono::Duration, ttl: chrono::Duration) -> Times {
    Times {
        now,
        locked_until: now + lock,
        expires_at: now + ttl,
    }
}

fn stored(status: u16, body: &str) -> StoredResponse {
    StoredResponse {
        status,
        content_type: Some("application/json".into()),
        body: body.as_bytes().to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn one_hundred_concurrent_requests_run_the_handler_once(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::from_millis(300)).await;
    let body = r#"{"item":"widget","qty":1}"#;
    let answers = futures::future::join_all((0..100).map(|_| app.post("/orders", Some("order-1"), ALICE, body))).await;

    assert_eq!(app.runs(), 1, "the handler ran exactly once");
    let first = answers
        .iter()
        .find(|a| a.status == 201)
        .expect("one request ran the handler");
    assert_eq!(first.json()["run"], json!(1));
    assert_eq!(first.json()["request"], json!(body));
    for answer in &answers {
        match answer.status {
            201 => assert_eq!(answer.body, first.body, "every 201 is the same response"),
            409 => {
                assert_eq!(answer.code(), "idempotency_key_in_flight");
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
            }
            other => panic!("unexpected answer {other}: {answer:?}"),
        }
    }

    let again = app.post("/orders", Some("order-1"), ALICE, body).await;
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, first.body);
    assert_eq!(again.content_type.as_deref(), Some("application/json"));
    assert_eq!(app.runs(), 1);
}

async fn the_same_key_with_another_body_is_refused_with_422(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let first = app.post("/orders", Some("k-reuse"), ALICE, "one").await;
    assert_eq!((first.status, first.replayed), (201, false));

    let other_body = app.post("/orders", Some("k-reuse"), ALICE, "two").await;
    assert_eq!(other_body.status, 422);
    assert_eq!(other_body.code(), "idempotency_key_reused");

    let other_path = app.post("/refuse", Some("k-reuse"), ALICE, "one").await;
    assert_eq!(other_path.code(), "idempotency_key_reused");
    let other_query = app.post("/orders?x=1", Some("k-reuse"), ALICE, "one").await;
    assert_eq!(other_query.code(), "idempotency_key_reused");
    assert_eq!(app.runs(), 1, "refused requests never reach the handler");

    let replay = app.post("/orders", Some("k-reuse"), ALICE, "one").await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(replay.body, first.body);
}

async fn a_missing_key_is_refused_unless_optional(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let missing = app.post("/orders", None, ALICE, "{}").await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.code(), "idempotency_key_missing");
    assert_eq!(app.runs(), 0);

    // Methods the layer does not cover pass through without a key.
    let listed = app.send(app.request(Method::GET, "/orders")).await;
    assert_eq!(listed.status, 200);
    assert_eq!(app.runs(), 1);

    // With the key optional, a request without one runs every time and nothing is recorded.
    let optional = spawn_app(Arc::clone(&backend.store), config().require_key(false), Duration::ZERO).await;
    for run in 1..=2 {
        let answer = optional.post("/orders", None, ALICE, "{}").await;
        assert_eq!((answer.status, answer.replayed), (201, false));
        assert_eq!(answer.json()["run"], json!(run));
    }
}

async fn malformed_keys_are_refused_with_400(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let too_long = "k".repeat(256);
    for bad in ["two words", "\"\"", too_long.as_str()] {
        let answer = app.post("/orders", Some(bad), ALICE, "{}").await;
        assert_eq!(answer.status, 400, "{bad:?}");
        assert_eq!(answer.code(), "invalid_idempotency_key", "{bad:?}");
    }
    let twice = app
        .send(
            app.request(Method::POST, "/orders")
                .header("idempotency-key", "a")
                .header("idempotency-key", "b")
                .body("{}"),
        )
        .await;
    assert_eq!(twice.code(), "invalid_idempotency_key");
    let not_ascii = app
        .send(
            app.request(Method::POST, "/orders")
                .header(
                    "idempotency-key",
                    reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                )
                .body("{}"),
        )
        .await;
    assert_eq!(not_ascii.code(), "invalid_idempotency_key");
    assert_eq!(app.runs(), 0);

    // The draft's quoted form is the same key as the bare one.
    let quoted = app.post("/orders", Some("\"k-quoted\""), ALICE, "{}").await;
    let bare = app.post("/orders", Some("k-quoted"), ALICE, "{}").await;
    assert_eq!((quoted.status, bare.status, bare.replayed), (201, 201, true));
    assert_eq!(app.runs(), 1);
}

async fn an_oversized_body_is_refused_with_413_before_the_handler(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let over = "x".repeat(BODY_LIMIT + 1);
    let answer = app.post("/orders", Some("k-big"), ALICE, &over).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.code(), "payload_too_large");
    assert_eq!(app.runs(), 0, "the handler did not run");

    // A chunked body (no length known in advance) is counted as it arrives.
    let mut request = String::from(
        "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: k-chunked\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..=BODY_LIMIT {
        request.push_str("1\r\nx\r\n");
    }
    request.push_str("0\r\n\r\n");
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    conn.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"code\":\"payload_too_large\""), "{response}");
    assert_eq!(app.runs(), 0);

    // A body of exactly the limit reaches the handler whole.
    let at_limit = "y".repeat(BODY_LIMIT);
    let answer = app.post("/orders", Some("k-big"), ALICE, &at_limit).await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.json()["request"], json!(at_limit));
    assert_eq!(app.runs(), 1);
}

async fn two_callers_with_the_same_key_each_run_once(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let alice = app.post("/orders", Some("shared-key"), ALICE, "{}").await;
    let bob = app.post("/orders", Some("shared-key"), BOB, "{}").await;
    let anonymous = app
        .send(
            app.request(Method::POST, "/orders")
                .header("idempotency-key", "shared-key")
                .body("{}"),
        )
        .await;
    assert_eq!((alice.status, bob.status, anonymous.status), (201, 201, 201));
    assert!(!alice.replayed && !bob.replayed && !anonymous.replayed);
    assert_eq!(app.runs(), 3);
    assert_ne!(alice.body, bob.body);

    let alice_again = app.post("/orders", Some("shared-key"), ALICE, "{}").await;
    let bob_again = app.post("/orders", Some("shared-key"), BOB, "{}").await;
    assert!(alice_again.replayed && bob_again.replayed);
    assert_eq!(alice_again.body, alice.body, "each caller replays its own response");
    assert_eq!(bob_again.body, bob.body);
    assert_eq!(app.runs(), 3);
}

async fn a_key_held_by_a_live_holder_answers_409_with_retry_after(backend: &Backend) {
    let app = spawn_app(
        Arc::clone(&backend.store),
        config().retry_after(Duration::from_millis(2500)),
        Duration::ZERO,
    )
    .await;
    let key = IdempotencyKey::parse("k-held").unwrap();
    let held = times(Utc::now(), chrono::Duration::minutes(5), chrono::Duration::hours(1));
    let claim = app.claim_of(ALICE, &key, "/orders", "{}", held);
    assert_eq!(backend.store.begin(&claim).await.unwrap(), IdempotencyBegin::Started);

    let answer = app.post("/orders", Some("k-held"), ALICE, "{}").await;
    assert_eq!(answer.status, 409);
    assert_eq!(answer.code(), "idempotency_key_in_flight");
    assert_eq!(answer.retry_after.as_deref(), Some("3"), "rounded up to whole seconds");
    assert_eq!(app.runs(), 0);

    // Once the holder completes, the request is answered its response.
    backend
        .store
        .complete(&claim, &stored(202, r#"{"held":true}"#))
        .await
        .unwrap();
    let answer = app.post("/orders", Some("k-held"), ALICE, "{}").await;
    assert_eq!((answer.status, answer.replayed), (202, true));
    assert_eq!(answer.json(), json!({ "held": true }));
    assert_eq!(app.runs(), 0);
}

async fn a_dead_holder_is_taken_over_and_its_late_complete_is_fenced_out(backend: &Backend) {
    let app = Arc::new(spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await);
    let key = IdempotencyKey::parse("k-dead").unwrap();
    // A holder took the key with a one-second lock ten seconds ago, then died.
    let died = times(
        Utc::now() - chrono::Duration::seconds(10),
        chrono::Duration::seconds(1),
        chrono::Duration::hours(24),
    );
    let dead = app.claim_of(ALICE, &key, "/gated", "{}", died);
    assert_eq!(backend.store.begin(&dead).await.unwrap(), IdempotencyBegin::Started);

    // A new request takes the key over; its handler waits at the gate.
    let new_holder = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.post("/gated", Some("k-dead"), ALICE, "{}").await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.runs() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new request never reached the handler"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first holder wakes up while the new one runs: neither its response nor its release
    // touches the new record.
    backend
        .store
        .complete(&dead, &stored(200, r#"{"late":true}"#))
        .await
        .unwrap();
    backend.store.release(&dead).await.unwrap();
    let in_flight = app.post("/gated", Some("k-dead"), ALICE, "{}").await;
    assert_eq!(
        in_flight.code(),
        "idempotency_key_in_flight",
        "the new holder still holds the key"
    );

    app.gate.notify_one();
    let taken_over = new_holder.await.unwrap();
    assert_eq!((taken_over.status, taken_over.replayed), (201, false));
    assert_eq!(app.runs(), 1, "after the lock expired exactly one new request ran");

    backend
        .store
        .complete(&dead, &stored(200, r#"{"late":true}"#))
        .await
        .unwrap();
    let replay = app.post("/gated", Some("k-dead"), ALICE, "{}").await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(replay.body, taken_over.body);
    assert_eq!(app.runs(), 1);
}

async fn server_errors_are_not_stored_so_a_retry_runs_again(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let failed = app.post("/flaky", Some("k-flaky"), ALICE, "{}").await;
    assert_eq!((failed.status, failed.replayed), (500, false));
    assert_eq!(failed.body, b"database hiccup");

    let retried = app.post("/flaky", Some("k-flaky"), ALICE, "{}").await;
    assert_eq!((retried.status, retried.replayed), (201, false));
    assert_eq!(app.runs(), 2, "the retry ran the handler again");

    let replay = app.post("/flaky", Some("k-flaky"), ALICE, "{}").await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(replay.body, retried.body);
    assert_eq!(app.runs(), 2);
}

async fn client_errors_are_stored_and_replayed(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let refused = app.post("/refuse", Some("k-refuse"), ALICE, "{}").await;
    assert_eq!((refused.status, refused.replayed), (400, false));
    let replay = app.post("/refuse", Some("k-refuse"), ALICE, "{}").await;
    assert_eq!((replay.status, replay.replayed), (400, true));
    assert_eq!(replay.body, refused.body);
    assert_eq!(replay.json()["error"], json!("out of stock"));
    assert_eq!(app.runs(), 1);

    // A policy that keeps only successes releases the refusal instead.
    let strict = spawn_app(
        Arc::clone(&backend.store),
        config().store_response_when(|status| status.is_success()),
        Duration::ZERO,
    )
    .await;
    for run in 1..=2 {
        let answer = strict.post("/refuse", Some("k-refuse-strict"), ALICE, "{}").await;
        assert_eq!((answer.status, answer.replayed), (400, false));
        assert_eq!(answer.json()["run"], json!(run));
    }
}

async fn a_response_marked_do_not_store_is_never_replayed(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let first = app.post("/secret", Some("k-secret"), ALICE, "{}").await;
    let again = app.post("/secret", Some("k-secret"), ALICE, "{}").await;
    assert_eq!((first.status, first.replayed), (201, false));
    assert_eq!((again.status, again.replayed), (201, false));
    assert_eq!(
        (first.json()["secret"].clone(), again.json()["secret"].clone()),
        (json!("s-1"), json!("s-2")),
        "each run answers its own secret, none is kept"
    );
    assert_eq!(app.runs(), 2);
}

async fn a_panicking_handler_releases_the_key(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let failed = app.post("/panics", Some("k-panic"), ALICE, "{}").await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.code(), "internal");
    let retried = app.post("/panics", Some("k-panic"), ALICE, "{}").await;
    assert_eq!((retried.status, retried.replayed), (201, false));
    assert_eq!(app.runs(), 2);
}

async fn a_response_over_the_limit_is_answered_but_not_replayed(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let first = app.post("/big", Some("k-large"), ALICE, "{}").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.body.len(),
        RESPONSE_LIMIT + 1,
        "the client gets the whole response"
    );

    let retry = app.post("/big", Some("k-large"), ALICE, "{}").await;
    assert_eq!((retry.status, retry.replayed), (500, true));
    assert_eq!(retry.code(), "idempotency_response_not_stored");
    assert_eq!(app.runs(), 1, "the request that ran is not run twice");
}

async fn expired_records_run_again_and_are_purged(backend: &Backend) {
    let app = spawn_app(Arc::clone(&backend.store), config(), Duration::ZERO).await;
    let store = &backend.store;
    let two_days_ago = times(
        Utc::now() - chrono::Duration::days(2),
        chrono::Duration::seconds(30),
        chrono::Duration::days(1),
    );
    // Two requests completed two days ago; their records expired yesterday.
    let renewed = IdempotencyKey::parse("k-renewed").unwrap();
    let gone = IdempotencyKey::parse("k-gone").unwrap();
    for key in [&renewed, &gone] {
        let claim = app.claim_of(ALICE, key, "/orders", "{}", two_days_ago);
        assert_eq!(store.begin(&claim).await.unwrap(), IdempotencyBegin::Started);
        store.complete(&claim, &stored(201, r#"{"old":true}"#)).await.unwrap();
    }

    let again = app.post("/orders", Some("k-renewed"), ALICE, "{}").await;
    assert_eq!(
        (again.status, again.replayed),
        (201, false),
        "an expired record is not replayed"
    );
    assert_eq!(app.runs(), 1);

    let owner = app.owner(ALICE);
    let purged = app.layer.purge_expired().await.unwrap();
    match backend.kind() {
        Kind::Sqlite | Kind::Postgres => {
            assert_eq!(purged, 1, "only the expired record is purged");
            assert!(!backend.record_exists(owner, "k-gone").await);
        }
        Kind::Redis => {
            // Redis drops records itself when their key's TTL ends; the TTL is the record's life.
            assert_eq!(purged, 0);
            let Db::Redis { store, conn } = &backend.db else {
                unreachable!()
            };
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(store.record_key(owner, &gone))
                .query_async(&mut conn.clone())
                .await
                .unwrap();
            assert!(
                ttl > 0 && ttl <= chrono::Duration::days(1).num_milliseconds(),
                "ttl {ttl}"
            );
        }
    }
    assert!(backend.record_exists(owner, "k-renewed").await);
    let replay = app.post("/orders", Some("k-renewed"), ALICE, "{}").await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(replay.body, again.body);
    assert_eq!(app.runs(), 1);

    if backend.kind() == Kind::Redis {
        redis_drops_a_record_when_it_expires(backend).await;
    }
}

/// On Redis, a record with a one-second life is gone a moment after that second.
async fn redis_drops_a_record_when_it_expires(backend: &Backend) {
    let short = config().ttl(Duration::from_secs(1)).lock_ttl(Duration::from_secs(1));
    let app = spawn_app(Arc::clone(&backend.store), short, Duration::ZERO).await;
    let answer = app.post("/orders", Some("k-short"), ALICE, "{}").await;
    assert_eq!(answer.status, 201);
    let owner = app.owner(ALICE);
    assert!(backend.record_exists(owner, "k-short").await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while backend.record_exists(owner, "k-short").await {
        assert!(tokio::time::Instant::now() < deadline, "the record outlived its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the core suite leaves open, straight on the store: binary bodies without a content type
/// round-trip, a completed record is final until it expires (a second complete, a release or
/// the end of its lock changes nothing), and what a purge answers on each kind of store.
async fn a_completed_record_is_final_until_it_expires(backend: &Backend) {
    let s = &backend.store;
    let owner = Uuid::now_v7();
    let other = Uuid::now_v7();
    let key = IdempotencyKey::parse("k-store").unwrap();
    let now = Utc::now();
    let claim = |owner: Uuid, body: &[u8], now: DateTime<Utc>| IdempotencyClaim {
        owner,
        key: &key,
        fingerprint: Fingerprint::keyed(SECRET.as_bytes(), "POST", "/x", body),
        now,
        locked_until: now + chrono::Duration::seconds(30),
        expires_at: now + chrono::Duration::hours(1),
    };
    let response = StoredResponse {
        status: 201,
        content_type: None,
        body: vec![0, 159, 146, 150, b'o', b'k'],
    };

    for owner in [owner, other] {
        assert_eq!(
            s.begin(&claim(owner, b"a", now)).await.unwrap(),
            IdempotencyBegin::Started
        );
        s.complete(&claim(owner, b"a", now), &response).await.unwrap();
    }
    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone()),
        "binary bodies and a missing content type round-trip"
    );
    s.complete(&claim(owner, b"a", now), &stored(200, "second"))
        .await
        .unwrap();
    s.release(&claim(owner, b"a", now)).await.unwrap();
    let later = now + chrono::Duration::seconds(31);
    assert_eq!(
        s.begin(&claim(owner, b"a", later)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone()),
        "neither a second complete, nor a release, nor the end of the lock changes a completed record"
    );
    let expired = now + chrono::Duration::hours(2);
    assert_eq!(
        s.begin(&claim(owner, b"z", expired)).await.unwrap(),
        IdempotencyBegin::Started
    );

    let purged = s.purge_expired(now + chrono::Duration::hours(10)).await.unwrap();
    if backend.kind() == Kind::Redis {
        assert_eq!(purged, 0, "Redis expires records itself");
    } else {
        assert_eq!(purged, 2);
        assert!(!backend.record_exists(owner, "k-store").await);
        assert!(!backend.record_exists(other, "k-store").await);
    }
}

/// A store whose claims take effect at once but whose answer to a claim comes late, as an
/// answer still on the wire when its client gives up.
struct LateClaimAnswers(Arc<dyn IdempotencyStore>);

#[async_trait::async_trait]
impl IdempotencyStore for LateClaimAnswers {
    async fn begin(&self, claim: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, idempotency::StoreError> {
        let begun = self.0.begin(claim).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        begun
    }
    async fn complete(
        &self,
        claim: &IdempotencyClaim<'_>,
        response: &StoredResponse,
    ) -> Result<(), idempotency::StoreError> {
        self.0.complete(claim, response).await
    }
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), idempotency::StoreError> {
        self.0.release(claim).await
    }
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, idempotency::StoreError> {
        self.0.purge_expired(now).await
    }
}

/// A client that gives up while the claim is being taken does not leave the key claimed by
/// nobody (answered 409 in flight until the lock expires): the request runs and is recorded, and
/// the retry is answered its response.
async fn a_request_dropped_while_its_claim_is_taken_still_runs_once(backend: &Backend) {
    let store = Arc::new(LateClaimAnswers(Arc::clone(&backend.store)));
    let app = spawn_app(store, config(), Duration::ZERO).await;
    let impatient = app
        .request(Method::POST, "/orders")
        .header("authorization", ALICE)
        .header("idempotency-key", "k-dropped")
        .body("{}")
        .timeout(Duration::from_millis(100));
    assert!(impatient.send().await.is_err(), "the client gives up during the claim");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = app.post("/orders", Some("k-dropped"), ALICE, "{}").await;
        if answer.status != 409 || std::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        answer.replayed,
        "the retry is answered the first request's response: {answer:?}"
    );
    assert_eq!(app.runs(), 1, "the handler ran once");
}

async fn an_unreachable_store_fails_closed_with_503(backend: &Backend) {
    let store = backend.unreachable_store().await;
    let app = spawn_app(store, config(), Duration::ZERO).await;
    let answer = app.post("/orders", Some("k-down"), ALICE, "{}").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.code(), "idempotency_store_unavailable");
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert_eq!(app.runs(), 0, "the handler did not run");
}

// ---------------------------------------------------------------------------------------------
// The port's conformance suite
// ---------------------------------------------------------------------------------------------

// The SQL stores pass `concord_core::testkit::idempotency_store_suite`, each on a fresh database.
// The Redis store does not run it: the suite ends by purging at a time ten hours ahead and
// expects a record deleted, while Redis drops each record itself when its key's TTL (the
// record's life, on Redis's own clock) ends, so its purge has nothing to delete and answers 0.
// Every other check of the suite runs on Redis too, over HTTP above and in
// `a_completed_record_is_final_until_it_expires`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_store_passes_the_core_conformance_suite() {
    let backend = Backend::sqlite().await;
    let Db::Sqlite { pool, .. } = &backend.db else {
        unreachable!()
    };
    concord_core::testkit::idempotency_store_suite(SqliteIdempotencyStore::new(pool.clone())).await;
    backend.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_passes_the_core_conformance_suite() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Db::Postgres { pool, .. } = &backend.db else {
        unreachable!()
    };
    concord_core::testkit::idempotency_store_suite(PostgresIdempotencyStore::new(pool.clone())).await;
    backend.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// The layer alone, without HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_config_out_of_range_is_refused_at_construction() {
    let backend = Backend::sqlite().await;
    let refused = IdempotencyLayer::new(
        Arc::clone(&backend.store),
        IdempotencyConfig::default()
            .lock_ttl(Duration::from_secs(3600))
            .ttl(Duration::from_secs(60)),
    );
    assert!(matches!(
        refused,
        Err(idempotency::IdempotencyConfigError::LockTtl { .. })
    ));
    backend.teardown().await;
}

#[tokio::test]
async fn a_nested_router_fingerprints_the_full_path() {
    use tower::ServiceExt as _;
    let backend = Backend::sqlite().await;
    let layer = IdempotencyLayer::new(Arc::clone(&backend.store), config()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let handlers = Handlers {
        runs: Arc::clone(&runs),
        delay: Duration::ZERO,
        gate: Arc::new(tokio::sync::Notify::new()),
    };
    let inner = Router::new()
        .route("/orders", post(create_order))
        .with_state(handlers)
        .layer(layer);
    let app = Router::new().nest("/a", inner.clone()).nest("/b", inner);
    let call = |path: &'static str| {
        let app = app.clone();
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header("idempotency-key", "k-nested")
                .body(axum::body::Body::from("{}"))
                .unwrap();
            app.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(call("/a/orders").await, StatusCode::CREATED);
    // Stripped of its prefix the second path would look the same and be replayed the first's answer.
    assert_eq!(call("/b/orders").await, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    backend.teardown().await;
}
