//! The rolling-restart drill: three `concord serve` processes on one PostgreSQL database, clients
//! spread over all three appending events, starting sagas and running two-phase-commit
//! transfers, while each node in turn gets SIGTERM and is started again on its port, and then one
//! gets SIGKILL and is started again. Afterwards every acknowledged append is in its stream
//! exactly once, every saga is terminal with the outcome its plan asked for and its effects
//! applied once, every transfer is applied on both banks or neither with nothing left prepared,
//! and the clients met no error outside [`RETRYABLE`].
//!
//! The saga steps call a service of the test's own, built the way a scale-out service is built on
//! the kit: its routes behind the `Idempotency-Key` layer with its records in Redis, its effects
//! published to NATS JetStream, where the check reads them back. The transfers move money
//! between two banks, each a PostgreSQL scratch database changed by the sdk's 2PC participant.
//!
//! Needs `CONCORD_TEST_POSTGRES_URL`, `CONCORD_TEST_REDIS_URL` and `CONCORD_TEST_NATS_URL`;
//! without one of them the test prints that it skipped.

#[path = "support/proc.rs"]
mod proc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use concord_bench::bank::Bank;
use concord_sdk::broker::nats::{NatsBroker, NatsConfig};
use concord_sdk::broker::{Broker as _, BrokerMessage};
use concord_sdk::idempotency::redis::RedisIdempotencyStore;
use concord_sdk::idempotency::{IdempotencyConfig, IdempotencyLayer};
use proc::{ADMIN_KEY, Server};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every error a client of this cluster may meet during a rolling restart and retries, with the
/// same `Idempotency-Key`, on the next node after a connection error or a 503. The answers are
/// the ones the README ("HTTP API (v1)", "A server that holds") and the error table
/// (`crates/concord-api/src/error.rs`) tell a client to retry. The connection errors are
/// retryable because every mutating call here carries a key: a second run of a request that did
/// run meets what the first one did ("HTTP API (v1)": keyed sagas, transactions and events get
/// ids derived from the key).
const RETRYABLE: &[&str] = &[
    // The node is down or restarting: nothing was sent.
    "connection refused",
    // The node went away with the request: killed, or its shutdown closed a kept-alive
    // connection as the request went out on it (at the end of the drain hyper closes every
    // connection that has no request in progress). It may have run; the retry keeps its key.
    "connection reset",
    "connection closed",
    // Readiness of a node that is shutting down (answered by `/ready` only).
    "503 draining",
    // The database failed or is unreachable.
    "503 store_unavailable",
    // The server's idempotency layer could not reach its records; the request did not run.
    "503 idempotency_store_unavailable",
    // Over `request_timeout_ms`; with Retry-After.
    "503 request_timed_out",
    // Another node is working on the saga right now.
    "503 saga_busy",
    // Over `max_subscribers`; with Retry-After.
    "503 too_many_subscribers",
    // Over `max_concurrent_requests_per_key` or the detokenize rate; with Retry-After.
    "429 too_many_concurrent_requests",
    "429 rate_limited",
    // The first request with this key still runs (or its node died holding the key, until
    // `idempotency_lock_s`); with Retry-After.
    "409 idempotency_key_in_flight",
];

/// The answers above that the README promises with a `Retry-After` header; one without it is
/// counted as an error of its own, outside [`RETRYABLE`].
const NEED_RETRY_AFTER: &[&str] = &[
    "503 request_timed_out",
    "503 too_many_subscribers",
    "429 too_many_concurrent_requests",
    "429 rate_limited",
    "409 idempotency_key_in_flight",
];

/// The vault's master key of every node (they share one vault on PostgreSQL).
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
/// What the coordinators show the banks, which refuse calls without it.
const TX_TOKEN: &str = "rolling-restart-token";
const NODES: usize = 3;
const APPENDERS: usize = 4;
const SAGA_CLIENTS: usize = 2;
const TRANSFER_CLIENTS: usize = 3;
/// Accounts per bank: enough that concurrent transfers seldom meet on one.
const ACCOUNTS: u64 = 100;
const BALANCE: i64 = 1_000_000;
/// Each node serves this long with readiness false after SIGTERM, then finishes its in-flight
/// requests within the grace.
const DRAIN_MS: u64 = 300;
const GRACE_S: u64 = 5;
/// The longest a client keeps retrying one operation: over `idempotency_lock_s` (25 s here), the
/// longest a key stays in flight after its node died holding it.
const OP_DEADLINE: Duration = Duration::from_secs(60);
/// How long the sagas and transactions may take to settle once the load stopped.
const SETTLE: Duration = Duration::from_secs(60);

/// The settings of every node: short drain, grace, leases and waits, so the drill fits in a
/// couple of minutes, with the banks and the step service on loopback allowed.
fn node_env() -> Vec<(&'static str, String)> {
    vec![
        ("CONCORD_ADMIN_KEY", ADMIN_KEY.into()),
        ("CONCORD_VAULT_MASTER_KEY", VAULT_KEY.into()),
        ("CONCORD_SAGA_ALLOWED_HOSTS", r#"["127.0.0.1"]"#.into()),
        ("CONCORD_TX_ALLOWED_HOSTS", r#"["127.0.0.1"]"#.into()),
        ("CONCORD_TX_PARTICIPANT_TOKEN", TX_TOKEN.into()),
        ("CONCORD_TX_PARTICIPANT_TOKEN_HOSTS", r#"["127.0.0.1"]"#.into()),
        ("CONCORD_DRAIN_MS", DRAIN_MS.to_string()),
        ("CONCORD_SHUTDOWN_GRACE_S", GRACE_S.to_string()),
        ("CONCORD_LEASE_MS", "1000".into()),
        ("CONCORD_POLL_MS", "50".into()),
        ("CONCORD_TX_RETRY_BACKOFF_MS", "100".into()),
        ("CONCORD_TX_MAX_RETRY_BACKOFF_MS", "1000".into()),
        ("CONCORD_TX_PHASE2_TIMEOUT_MS", "2000".into()),
        // The shortest waits allow the shortest request timeout, and that the shortest
        // idempotency lock (each at least 10 s over the one before).
        ("CONCORD_MAX_WAIT_MS", "1000".into()),
        ("CONCORD_SAGA_MAX_WAIT_MS", "1000".into()),
        ("CONCORD_TX_MAX_TIMEOUT_MS", "5000".into()),
        ("CONCORD_REQUEST_TIMEOUT_MS", "15000".into()),
        ("CONCORD_IDEMPOTENCY_LOCK_S", "25".into()),
        ("CONCORD_DB_CONNECTIONS", "6".into()),
    ]
}

/// One node of the cluster: a fixed address, so it comes back where its clients look for it.
struct Node {
    addr: String,
    url: String,
    database_url: String,
    dir: PathBuf,
    server: Option<Server>,
}

impl Node {
    fn command(&self) -> Command {
        let mut cmd = proc::concord(&self.dir);
        cmd.args(["serve", "--listen", &self.addr, "--database-url", &self.database_url]);
        for (name, value) in node_env() {
            cmd.env(name, value);
        }
        cmd
    }

    /// Starts the node and waits until `/ready` answers 200; answers how long that took.
    async fn start(&mut self) -> Duration {
        let t = Instant::now();
        let server = Server::start_ready(self.command()).await;
        assert_eq!(server.url, self.url, "the node listens where it did before");
        self.server = Some(server);
        t.elapsed()
    }

    /// Sends `sig` and waits for the process to exit; answers its exit and how long it took.
    async fn stop(&mut self, sig: &str) -> (proc::Finished, Duration) {
        let mut server = self.server.take().expect("the node runs");
        let t = Instant::now();
        server.proc.signal(sig);
        server.proc.wait().await;
        let waited = t.elapsed();
        (server.proc.finish().await, waited)
    }
}

/// A small deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// Errors the clients met, by kind.
type Errors = Arc<Mutex<BTreeMap<String, u64>>>;

/// One client task's way into the cluster: each operation starts on the next node in turn and
/// fails over to the node after it on a connection error or a 503.
struct Caller {
    urls: Arc<Vec<String>>,
    next: usize,
    http: reqwest::Client,
    errors: Errors,
}

/// What a failed call was, as [`RETRYABLE`] names it.
fn transport_kind(e: &reqwest::Error) -> String {
    let mut source = std::error::Error::source(e);
    let mut io_kind = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        source = s.source();
    }
    match io_kind {
        _ if e.is_timeout() => "client timeout".into(),
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".into(),
        Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => "connection reset".into(),
        _ if e.is_connect() => format!("connect failed: {e}"),
        // The connection ended before the whole answer came (hyper's incomplete message).
        _ if e.is_request() || e.is_body() => "connection closed".into(),
        _ => format!("transport: {e}"),
    }
}

impl Caller {
    fn new(urls: Arc<Vec<String>>, first: usize, errors: Errors) -> Self {
        let http = reqwest::Client::builder()
            // Over the server's request timeout (15 s): a client timeout means a node hung.
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            urls,
            next: first,
            http,
            errors,
        }
    }

    /// POSTs `body` to `path` with `key` until an answer 2xx, retrying every error of
    /// [`RETRYABLE`] with the same key; answers the status and body, or `None` after an error
    /// outside the list (counted, and left for the test's verdict).
    async fn post(&mut self, path: &str, key: &str, body: &Value) -> Option<(u16, Value)> {
        let started = Instant::now();
        let mut node = self.next;
        self.next = (self.next + 1) % self.urls.len();
        let mut backoff = Duration::from_millis(50);
        loop {
            assert!(
                started.elapsed() < OP_DEADLINE,
                "POST {path} with key {key} not answered 2xx within {OP_DEADLINE:?}; errors so far: {:?}",
                self.errors.lock().unwrap()
            );
            let sent = self
                .http
                .post(format!("{}{path}", self.urls[node]))
                .bearer_auth(ADMIN_KEY)
                .header("idempotency-key", key)
                .json(body)
                .send()
                .await;
            let (kind, retry_after, fail_over) = match sent {
                Ok(r) if r.status().is_success() => {
                    let status = r.status().as_u16();
                    match r.json::<Value>().await {
                        Ok(v) => return Some((status, v)),
                        Err(e) => (transport_kind(&e), None, true),
                    }
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let code = match r.json::<Value>().await {
                        Ok(p) => p["code"].as_str().unwrap_or("(no code)").to_owned(),
                        Err(_) => "(no problem body)".to_owned(),
                    };
                    let mut kind = format!("{status} {code}");
                    if retry_after.is_none() && NEED_RETRY_AFTER.contains(&kind.as_str()) {
                        kind.push_str(" without Retry-After");
                    }
                    (kind, retry_after, status == 503)
                }
                Err(e) => (transport_kind(&e), None, true),
            };
            *self.errors.lock().unwrap().entry(kind.clone()).or_default() += 1;
            if !RETRYABLE.contains(&kind.as_str()) {
                eprintln!("drill: POST {path} (key {key}) on {}: {kind}", self.urls[node]);
                return None;
            }
            let wait = if fail_over {
                node = (node + 1) % self.urls.len();
                Duration::from_millis(50)
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(1));
                retry_after.map_or(backoff, |s| Duration::from_secs(s).min(Duration::from_secs(2)))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// What one client task got acknowledged.
#[derive(Default)]
struct Acked {
    /// Appends: (stream, n, events in it).
    appends: Vec<(String, u64, u64)>,
    /// Sagas: (id, whether its plan refuses the last step).
    sagas: Vec<(String, bool)>,
    /// Transfers: (xid, the outcome answered).
    transfers: Vec<(String, String)>,
    /// Operations that met an error outside [`RETRYABLE`].
    unacknowledged: u64,
}

async fn appender(mut caller: Caller, run: String, c: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let stream = format!("drill{run}-c{c}");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let k = 1 + n % 3;
        let events: Vec<Value> = (0..k)
            .map(|i| json!({"type": "Drilled", "data": {"client": c, "n": n, "k": i}}))
            .collect();
        let body = json!({"expected_version": "any", "events": events});
        match caller
            .post(
                &format!("/v1/streams/{stream}"),
                &format!("append-{run}-{c}-{n}"),
                &body,
            )
            .await
        {
            Some(_) => acked.appends.push((stream.clone(), n, k)),
            None => acked.unacknowledged += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

async fn saga_client(mut caller: Caller, run: String, c: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // One saga in four is refused at its last step and compensated.
        let refuse = n % 4 == 3;
        let body = json!({"definition": "drill", "input": {"refuse": refuse, "client": c, "n": n}});
        match caller.post("/v1/sagas", &format!("saga-{run}-{c}-{n}"), &body).await {
            Some((_, saga)) => acked
                .sagas
                .push((saga["id"].as_str().expect("a saga id").to_owned(), refuse)),
            None => acked.unacknowledged += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

async fn transfer_client(
    mut caller: Caller,
    run: String,
    c: usize,
    banks: (String, String),
    stop: Arc<AtomicBool>,
) -> Acked {
    let mut acked = Acked::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let (from, to) = (rng.below(ACCOUNTS), rng.below(ACCOUNTS));
        let amount = 1 + rng.below(100) as i64;
        let amount = if rng.below(2) == 0 { amount } else { -amount };
        let body = transfer_body(&banks, from, to, amount, 0);
        transfer(&mut caller, &format!("transfer-{run}-{c}-{n}"), &body, &mut acked).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

/// Moves `amount` from account `a{from}` of bank a to `b{to}` of bank b; bank b holds its prepare
/// `sleep_ms` first.
fn transfer_body(banks: &(String, String), from: u64, to: u64, amount: i64, sleep_ms: u64) -> Value {
    json!({"participants": [
        {"name": "bank-a", "url": banks.0, "payload": {"account": format!("a{from}"), "delta": -amount}},
        {"name": "bank-b", "url": banks.1, "payload": {"account": format!("b{to}"), "delta": amount, "sleep_ms": sleep_ms}}],
        "timeout_ms": 3000})
}

async fn transfer(caller: &mut Caller, key: &str, body: &Value, acked: &mut Acked) {
    match caller.post("/v1/transactions", key, body).await {
        Some((_, d)) => acked.transfers.push((
            d["xid"].as_str().expect("an xid").to_owned(),
            d["outcome"].as_str().unwrap_or("?").to_owned(),
        )),
        None => acked.unacknowledged += 1,
    }
}

/// A transfer that is surely in flight on `node` when the node is stopped: its prepare at bank b
/// takes 1.5 s, and the node gets its signal 0.3 s after the request went out.
fn slow_transfer(caller: Caller, run: &str, node: usize, banks: &(String, String)) -> tokio::task::JoinHandle<Acked> {
    let key = format!("slow-{run}-{node}-{}", uuid::Uuid::now_v7());
    let body = transfer_body(banks, ACCOUNTS, ACCOUNTS, 1, 1500);
    tokio::spawn(async move {
        let mut caller = caller;
        let mut acked = Acked::default();
        transfer(&mut caller, &key, &body, &mut acked).await;
        acked
    })
}

// ---------------------------------------------------------------------------------------------
// The saga steps' service: `Idempotency-Key` records in Redis, effects published to JetStream.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Done,
    Undone,
    /// The compensation came first: the action is refused for good.
    Blocked,
}

#[derive(Clone)]
struct Steps {
    broker: Arc<NatsBroker>,
    topic: String,
    /// The order of each step's action and compensation, as a barrier keeps it. Duplicates are
    /// not dropped here: that is the idempotency layer's work, which the check verifies.
    effects: Arc<tokio::sync::Mutex<HashMap<(String, String), Effect>>>,
}

impl Steps {
    async fn publish(&self, saga: &str, step: &str, op: &str) -> Result<(), String> {
        let message = BrokerMessage {
            id: uuid::Uuid::now_v7(),
            topic: self.topic.clone(),
            key: saga.to_owned(),
            payload: json!({"saga": saga, "step": step, "op": op}),
            headers: BTreeMap::new(),
        };
        self.broker
            .publish(&[message])
            .await
            .remove(0)
            .map_err(|e| e.to_string())
    }
}

async fn step_action(
    State(s): State<Steps>,
    Path(step): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let saga = body["saga"].as_str().unwrap_or_default().to_owned();
    let mut effects = s.effects.lock().await;
    let k = (saga.clone(), step.clone());
    if matches!(effects.get(&k), Some(Effect::Undone | Effect::Blocked)) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "compensated already"})),
        );
    }
    if step == "c" && body["refuse"] == json!(true) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "refused by plan"})),
        );
    }
    match s.publish(&saga, &step, "action").await {
        Ok(()) => {
            effects.insert(k, Effect::Done);
            (StatusCode::OK, Json(json!({"id": format!("{step}-{saga}")})))
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e}))),
    }
}

async fn step_compensation(
    State(s): State<Steps>,
    Path(step): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let saga = body["saga"].as_str().unwrap_or_default().to_owned();
    let mut effects = s.effects.lock().await;
    let k = (saga.clone(), step.clone());
    match effects.get(&k) {
        Some(Effect::Done) => match s.publish(&saga, &step, "compensation").await {
            Ok(()) => {
                effects.insert(k, Effect::Undone);
            }
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e}))),
        },
        None => {
            effects.insert(k, Effect::Blocked);
        }
        Some(Effect::Undone | Effect::Blocked) => {}
    }
    (StatusCode::OK, Json(json!({})))
}

/// Calls the step service answered, and how many of them its idempotency layer answered from
/// Redis (`Idempotent-Replayed: true`): a step call repeated after its node died.
#[derive(Default)]
struct StepCalls {
    answered: std::sync::atomic::AtomicU64,
    replayed: std::sync::atomic::AtomicU64,
}

/// Starts the step service on loopback; answers its URL.
async fn start_steps(
    redis_url: &str,
    run: &str,
    broker: Arc<NatsBroker>,
    topic: &str,
    calls: Arc<StepCalls>,
) -> String {
    let client = redis::Client::open(redis_url).expect("redis url");
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("connect to redis");
    let store = RedisIdempotencyStore::new(conn).with_prefix(format!("concord:drill:{run}:"));
    let layer = IdempotencyLayer::new(
        Arc::new(store),
        IdempotencyConfig::default().ttl(Duration::from_secs(600)),
    )
    .expect("idempotency layer");
    let steps = Steps {
        broker,
        topic: topic.to_owned(),
        effects: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/steps/{step}", post(step_action))
        .route("/steps/{step}/undo", post(step_compensation))
        .with_state(steps)
        .layer(layer)
        .layer(axum::middleware::map_response(move |r: axum::response::Response| {
            let calls = calls.clone();
            async move {
                calls.answered.fetch_add(1, Ordering::Relaxed);
                if r.headers().contains_key("idempotent-replayed") {
                    calls.replayed.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

fn saga_definition(steps_url: &str) -> Value {
    let steps: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|s| {
            json!({
                "name": s,
                "action": {"method": "POST", "url": format!("{steps_url}/steps/{s}"),
                           "body": {"saga": "{{saga.id}}", "refuse": "{{input.refuse}}"}},
                "compensation": {"method": "POST", "url": format!("{steps_url}/steps/{s}/undo"),
                                 "body": {"saga": "{{saga.id}}"}},
                "retry": {"max_attempts": 10, "backoff_ms": 50, "max_backoff_ms": 500},
                "timeout_ms": 2000
            })
        })
        .collect();
    json!({"steps": steps, "compensation_retry": {"max_attempts": 20, "backoff_ms": 50, "max_backoff_ms": 500}})
}

// ---------------------------------------------------------------------------------------------
// The drill.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restarted_one_node_at_a_time_under_load_loses_and_doubles_nothing() {
    let vars = [
        "CONCORD_TEST_POSTGRES_URL",
        "CONCORD_TEST_REDIS_URL",
        "CONCORD_TEST_NATS_URL",
    ];
    let values: Vec<Option<String>> = vars.iter().map(|v| std::env::var(v).ok()).collect();
    let [Some(base), Some(redis_url), Some(nats_url)] = &values[..] else {
        let unset: Vec<&str> = vars
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        eprintln!("skipped: {} not set", unset.join(", "));
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let drill_started = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let scratch = || concord_store_postgres::create_scratch_database(base, "concord_t");
    let (server_db, db_a, db_b) = (
        scratch().await.unwrap(),
        scratch().await.unwrap(),
        scratch().await.unwrap(),
    );

    // The banks and the step service.
    let auth = || concord_sdk::tx::CoordinatorAuth::Token(TX_TOKEN.into());
    // One account more in each bank for the slow transfers, which nothing else touches.
    let accounts_a: Vec<(String, i64)> = (0..=ACCOUNTS).map(|i| (format!("a{i}"), BALANCE)).collect();
    let accounts_b: Vec<(String, i64)> = (0..=ACCOUNTS).map(|i| (format!("b{i}"), BALANCE)).collect();
    let la: Vec<(&str, i64)> = accounts_a.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    let lb: Vec<(&str, i64)> = accounts_b.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    let bank_a = Bank::start(&db_a, "drill-a", &la, "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let bank_b = Bank::start(&db_b, "drill-b", &lb, "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let money_before = bank_a.total().await.unwrap() + bank_b.total().await.unwrap();
    let nats = async_nats::connect(nats_url.as_str()).await.expect("connect to NATS");
    let nats_config = NatsConfig {
        stream_prefix: "DRILL".into(),
        subject_prefix: "drill".into(),
        max_age: Duration::from_secs(600),
        ..NatsConfig::default()
    };
    let broker = Arc::new(NatsBroker::new(nats.clone(), nats_config));
    let topic = format!("steps{run}");
    let step_calls = Arc::new(StepCalls::default());
    let steps_url = start_steps(redis_url, &run, broker.clone(), &topic, step_calls.clone()).await;

    // The cluster, started one node after the other (the first one migrates the database).
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|_| {
            let addr = proc::free_addr();
            Node {
                url: format!("http://{addr}"),
                addr,
                database_url: server_db.clone(),
                dir: dir.path().to_owned(),
                server: None,
            }
        })
        .collect();
    for node in &mut nodes {
        node.start().await;
    }
    let urls = Arc::new(nodes.iter().map(|n| n.url.clone()).collect::<Vec<_>>());
    let admin = concord_sdk::Client::new(urls[0].clone(), ADMIN_KEY).unwrap();
    admin
        .put_saga_definition("drill", &saga_definition(&steps_url))
        .await
        .expect("the saga definition");
    eprintln!(
        "drill: cluster of {NODES} up in {:.1} s: {}",
        drill_started.elapsed().as_secs_f64(),
        urls.join(" ")
    );

    // The load: every client starts its operations on the nodes in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Errors = Arc::default();
    let mut clients = Vec::new();
    let mut first = 0;
    let mut caller = || {
        first += 1;
        Caller::new(urls.clone(), first % NODES, errors.clone())
    };
    for c in 0..APPENDERS {
        clients.push(tokio::spawn(appender(caller(), run.clone(), c, stop.clone())));
    }
    for c in 0..SAGA_CLIENTS {
        clients.push(tokio::spawn(saga_client(caller(), run.clone(), c, stop.clone())));
    }
    let banks = (bank_a.url.clone(), bank_b.url.clone());
    for c in 0..TRANSFER_CLIENTS {
        clients.push(tokio::spawn(transfer_client(
            caller(),
            run.clone(),
            c,
            banks.clone(),
            stop.clone(),
        )));
    }
    let pinned = |node: usize, errors: &Errors| Caller::new(urls.clone(), node, errors.clone());
    // The errors of the transfers in flight at each SIGTERM: none, since a node finishes its
    // in-flight requests before it exits.
    let term_errors: Errors = Arc::default();
    let mut in_flight_at_term = Vec::new();

    // The restarts: each node in turn stopped with SIGTERM and started again on its port, then
    // one killed outright and started again.
    let mut restarts = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let allowed = Duration::from_millis(DRAIN_MS) + Duration::from_secs(GRACE_S) + Duration::from_secs(2);
    for (i, node) in nodes.iter_mut().enumerate() {
        // A request in flight when the signal comes: the node finishes it before it exits.
        in_flight_at_term.push(slow_transfer(pinned(i, &term_errors), &run, i, &banks));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (finished, stopped_in) = node.stop("TERM").await;
        assert!(
            finished.status.success(),
            "node {i} exited with {} after SIGTERM; it said: {:#?}",
            finished.status,
            finished.stderr
        );
        assert!(
            stopped_in <= allowed,
            "node {i} took {stopped_in:?} to exit after SIGTERM, over drain + grace ({allowed:?})"
        );
        let ready_in = node.start().await;
        restarts.push(format!(
            "node {i}: SIGTERM, exit 0 in {} ms, ready again in {} ms",
            stopped_in.as_millis(),
            ready_in.as_millis()
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // A request in flight when the node dies: its client sees the connection go, and retries
    // with the same key on another node until the key's lock (`idempotency_lock_s`) expires.
    let before_kill = errors.lock().unwrap().clone();
    let killed = 1;
    clients.push(slow_transfer(pinned(killed, &errors), &run, killed, &banks));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, killed_in) = nodes[killed].stop("KILL").await;
    let ready_in = nodes[killed].start().await;
    restarts.push(format!(
        "node {killed}: SIGKILL, gone in {} ms, ready again in {} ms",
        killed_in.as_millis(),
        ready_in.as_millis()
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Stop the load: each client finishes the operation it is in, retries included.
    stop.store(true, Ordering::SeqCst);
    let load_stopped = Instant::now();
    let mut acked = Acked::default();
    for client in in_flight_at_term.into_iter().chain(clients) {
        let a = tokio::time::timeout(OP_DEADLINE + Duration::from_secs(10), client)
            .await
            .expect("a client finished its last operation")
            .expect("a client task");
        acked.appends.extend(a.appends);
        acked.sagas.extend(a.sagas);
        acked.transfers.extend(a.transfers);
        acked.unacknowledged += a.unacknowledged;
    }
    let clients_done_in = load_stopped.elapsed();
    let cut_off_at_term = term_errors.lock().unwrap().clone();
    for (kind, n) in &cut_off_at_term {
        *errors.lock().unwrap().entry(kind.clone()).or_default() += n;
    }

    // Recovery: every saga terminal, every transaction's phase 2 acknowledged.
    let settled = Instant::now();
    loop {
        let mut open = Vec::new();
        for status in ["running", "compensating"] {
            let page = admin.list_sagas(Some(status), None, 10).await.unwrap();
            open.extend(page.sagas.into_iter().map(|s| format!("{} {}", s.id, s.status)));
        }
        let pending = admin.list_transactions(None, Some(true), None, 10).await.unwrap();
        open.extend(
            pending
                .transactions
                .into_iter()
                .map(|t| format!("tx {} pending", t.xid)),
        );
        if open.is_empty() {
            break;
        }
        assert!(
            settled.elapsed() < SETTLE,
            "not settled {SETTLE:?} after the load stopped: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled_in = settled.elapsed();

    // 1. The clients met only retryable errors, and every operation was acknowledged.
    let errors = errors.lock().unwrap().clone();
    let unexpected: Vec<_> = errors.keys().filter(|k| !RETRYABLE.contains(&k.as_str())).collect();

    // 2. Every acknowledged append is in its stream exactly once; nothing is in twice.
    let mut stored: HashMap<(String, u64, u64), u32> = HashMap::new();
    let mut event_ids = HashSet::new();
    let mut events_read = 0;
    for c in 0..APPENDERS {
        let stream = format!("drill{run}-c{c}");
        let mut from = 1;
        loop {
            let page = admin.read_stream(&stream, from, 1000).await.unwrap();
            for e in &page.events {
                events_read += 1;
                assert!(event_ids.insert(e.id), "event id {} stored twice", e.id);
                let (n, k) = (e.data["n"].as_u64().unwrap(), e.data["k"].as_u64().unwrap());
                *stored.entry((stream.clone(), n, k)).or_default() += 1;
            }
            match page.next {
                Some(next) if !page.events.is_empty() => from = next,
                _ => break,
            }
        }
    }
    let doubled: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    let mut lost = Vec::new();
    for (stream, n, k) in &acked.appends {
        for i in 0..*k {
            if stored.get(&(stream.clone(), *n, i)).copied().unwrap_or(0) != 1 {
                lost.push(format!("{stream} n={n} k={i}"));
            }
        }
    }
    let acked_events: u64 = acked.appends.iter().map(|(_, _, k)| k).sum();

    // 3. Every saga is terminal with the outcome its plan asked for, and each effect happened
    // once: completed, each step's action once and no compensation; compensated, the first two
    // actions once and each undone once, the refused step never.
    let mut saga_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrong_sagas = Vec::new();
    for (id, refuse) in &acked.sagas {
        let saga = admin.saga(id, None).await.unwrap();
        *saga_status.entry(saga.status.clone()).or_default() += 1;
        let expected = if *refuse { "compensated" } else { "completed" };
        if saga.status != expected {
            // Its steps with every attempt, so a failure says which call went wrong and how.
            let steps = serde_json::to_string(&saga.steps).unwrap_or_default();
            wrong_sagas.push(format!(
                "{id}: {} where the plan makes it {expected}; steps: {steps}",
                saga.status
            ));
        }
    }
    for status in ["running", "compensating", "failed"] {
        let page = admin.list_sagas(Some(status), None, 10).await.unwrap();
        for s in page.sagas {
            wrong_sagas.push(format!("{}: {}", s.id, s.status));
        }
    }
    let mut effects: HashMap<(String, String, String), u32> = HashMap::new();
    let mut consumer = broker.subscribe(&topic, "check").await.expect("subscribe");
    loop {
        let batch = consumer.fetch(500, Duration::from_millis(500)).await.expect("fetch");
        if batch.is_empty() {
            break;
        }
        for d in batch {
            let p = &d.message.payload;
            let key = (
                p["saga"].as_str().unwrap().to_owned(),
                p["step"].as_str().unwrap().to_owned(),
                p["op"].as_str().unwrap().to_owned(),
            );
            *effects.entry(key).or_default() += 1;
            consumer.ack(&d).await.expect("ack");
        }
    }
    let published: u32 = effects.values().sum();
    let mut wrong_effects = Vec::new();
    let mut expected_effects = 0;
    for (id, refuse) in &acked.sagas {
        let want: &[(&str, &str, u32)] = if *refuse {
            &[
                ("a", "action", 1),
                ("b", "action", 1),
                ("c", "action", 0),
                ("a", "compensation", 1),
                ("b", "compensation", 1),
                ("c", "compensation", 0),
            ]
        } else {
            &[
                ("a", "action", 1),
                ("b", "action", 1),
                ("c", "action", 1),
                ("a", "compensation", 0),
                ("b", "compensation", 0),
                ("c", "compensation", 0),
            ]
        };
        for (step, op, n) in want {
            expected_effects += n;
            let got = effects
                .get(&(id.clone(), (*step).to_owned(), (*op).to_owned()))
                .copied()
                .unwrap_or(0);
            if got != *n {
                wrong_effects.push(format!("{id}: step {step} {op} published {got} times, not {n}"));
            }
        }
    }

    // 4. Every transfer is decided and applied on both banks or neither; the money is all there;
    // nothing is left prepared in the banks' databases or the server's.
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrong_transfers = Vec::new();
    for (xid, answered) in &acked.transfers {
        let t = admin.transaction(xid).await.unwrap();
        let outcome = t.outcome.clone().unwrap_or_else(|| "undecided".into());
        *outcomes.entry(outcome.clone()).or_default() += 1;
        if answered != "pending" && *answered != outcome {
            wrong_transfers.push(format!("{xid}: answered {answered}, now {outcome}"));
        }
        let (in_a, in_b) = (bank_a.applied(xid).await.unwrap(), bank_b.applied(xid).await.unwrap());
        let fine = match outcome.as_str() {
            "committed" => in_a && in_b,
            "aborted" => !in_a && !in_b,
            _ => false,
        };
        if !fine || t.pending {
            wrong_transfers.push(format!(
                "{xid}: {outcome} (pending {}), applied at a {in_a}, at b {in_b}",
                t.pending
            ));
        }
    }
    let money_after = bank_a.total().await.unwrap() + bank_b.total().await.unwrap();
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(base)
        .await
        .unwrap();
    let databases: Vec<String> = [&server_db, &db_a, &db_b]
        .iter()
        .map(|url| url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned())
        .collect();
    let prepared: Vec<(String, String)> =
        sqlx::query_as("SELECT database::text, gid FROM pg_prepared_xacts WHERE database = ANY($1)")
            .bind(&databases)
            .fetch_all(&pg)
            .await
            .unwrap();

    eprintln!(
        "drill: {} appends acknowledged ({acked_events} events; {events_read} stored), {} sagas {:?}, \
         {} transfers {:?} ({} prepared left), {} operations unacknowledged",
        acked.appends.len(),
        acked.sagas.len(),
        saga_status,
        acked.transfers.len(),
        outcomes,
        prepared.len(),
        acked.unacknowledged
    );
    let after_kill: BTreeMap<&String, u64> = errors
        .iter()
        .map(|(k, n)| (k, n - before_kill.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!("drill: client errors by kind: {errors:?}");
    eprintln!("drill: of them, during the SIGTERM restarts: {before_kill:?}; from the SIGKILL on: {after_kill:?}");
    for r in &restarts {
        eprintln!("drill: {r}");
    }
    eprintln!(
        "drill: {} step calls answered, {} of them replayed from Redis; {published} effects on JetStream",
        step_calls.answered.load(Ordering::Relaxed),
        step_calls.replayed.load(Ordering::Relaxed),
    );
    eprintln!(
        "drill: clients done {} ms after the load stopped, settled {} ms later; {:.1} s in all",
        clients_done_in.as_millis(),
        settled_in.as_millis(),
        drill_started.elapsed().as_secs_f64()
    );

    assert!(
        unexpected.is_empty(),
        "errors outside the retryable list: {unexpected:?} (all: {errors:?})"
    );
    assert_eq!(acked.unacknowledged, 0, "operations that were never acknowledged");
    assert!(
        cut_off_at_term.is_empty(),
        "requests in flight at SIGTERM were cut off: {cut_off_at_term:?}"
    );
    assert!(lost.is_empty(), "acknowledged events missing: {lost:?}");
    assert!(doubled.is_empty(), "events stored twice: {doubled:?}");
    assert!(wrong_sagas.is_empty(), "sagas: {wrong_sagas:?}");
    assert!(wrong_effects.is_empty(), "saga effects: {wrong_effects:?}");
    assert_eq!(published, expected_effects, "effects of sagas no client started");
    assert!(wrong_transfers.is_empty(), "transfers: {wrong_transfers:?}");
    assert_eq!(money_after, money_before, "no money made or lost");
    assert!(prepared.is_empty(), "transactions left prepared: {prepared:?}");
    assert!(
        !acked.appends.is_empty() && !acked.sagas.is_empty() && !acked.transfers.is_empty(),
        "the load ran"
    );

    // The JetStream stream goes now; the Redis records expire by themselves (ttl 10 min).
    let _ = async_nats::jetstream::new(nats)
        .delete_stream(broker.stream_name(&topic))
        .await;
    for node in &mut nodes {
        let (finished, _) = node.stop("TERM").await;
        assert!(finished.status.success(), "{:#?}", finished.stderr);
    }
    bank_a.stop().await;
    bank_b.stop().await;
    pg.close().await;
}
