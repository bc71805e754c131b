//! A keyed request whose effect committed but whose `Idempotency-Key` record did not complete
//! (the server SIGKILLed in between) is not run a second time by a retry after the lock: the
//! saga id and the xid are derived from the caller and the key, so the retry meets the saga and
//! the transaction the first attempt began. With the real `concord` binary, on both backends.

#[path = "support/proc.rs"]
mod proc;

use proc::{ADMIN_KEY, Server, bare_serve, within};
use serde_json::{Value, json};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
/// The lock: at least 10 s over the request timeout, itself 10 s over the longest wait (2 s).
const LOCK_S: u64 = 22;

fn node(dir: &Path, database_url: &str) -> Command {
    let mut cmd = bare_serve(dir);
    cmd.args(["--database-url", database_url])
        .env("CONCORD_ADMIN_KEY", ADMIN_KEY)
        .env("CONCORD_VAULT_MASTER_KEY", VAULT_KEY)
        .env("CONCORD_SAGA_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
        .env("CONCORD_TX_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
        .env("CONCORD_MAX_WAIT_MS", "2000")
        .env("CONCORD_SAGA_MAX_WAIT_MS", "2000")
        .env("CONCORD_TX_MAX_TIMEOUT_MS", "2000")
        .env("CONCORD_REQUEST_TIMEOUT_MS", "12000")
        .env("CONCORD_IDEMPOTENCY_LOCK_S", LOCK_S.to_string())
        .env("CONCORD_LEASE_MS", "1000")
        .env("CONCORD_POLL_MS", "50")
        .env("RUST_LOG", "warn,concord=info");
    cmd
}

/// A participant whose every call hangs: the requests that reach it stay in flight.
async fn hanging_participant() -> String {
    let router = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        axum::Json(json!({}))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

fn start_saga(server: &Server) -> reqwest::RequestBuilder {
    server
        .request(reqwest::Method::POST, "/v1/sagas?wait_ms=2000")
        .header("idempotency-key", "order-77")
        .json(&json!({"definition": "slow", "input": {}}))
}

fn begin_tx(server: &Server, participant: &str) -> reqwest::RequestBuilder {
    server
        .request(reqwest::Method::POST, "/v1/transactions")
        .header("idempotency-key", "transfer-77")
        .json(&json!({"participants": [{"name": "bank", "url": participant, "payload": {}}], "timeout_ms": 2000}))
}

async fn list(server: &Server, path: &str, field: &str) -> Vec<Value> {
    let page: Value = within(
        path,
        server.request(reqwest::Method::GET, path).send().await.unwrap().json(),
    )
    .await
    .unwrap();
    page[field].as_array().cloned().unwrap_or_default()
}

async fn a_retry_after_a_crash_meets_the_first_effect(database_url: &str, dir: &Path) {
    let participant = hanging_participant().await;
    let mut server = Server::start(node(dir, database_url)).await;
    let def = json!({"steps": [{"name": "charge",
        "action": {"method": "POST", "url": format!("{participant}/charge")},
        "timeout_ms": 20000, "retry": {"max_attempts": 1, "backoff_ms": 10, "max_backoff_ms": 10}}]});
    let r = server
        .request(reqwest::Method::PUT, "/v1/saga-definitions/slow")
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    // Both requests commit their effect, then wait: the saga for its hanging step, the
    // transaction for its participant's vote. Their keys stay in flight.
    let saga_request = tokio::spawn(start_saga(&server).send());
    let tx_request = tokio::spawn(begin_tx(&server, &participant).send());
    let started = Instant::now();
    let (sagas, txs) = loop {
        let sagas = list(&server, "/v1/sagas", "sagas").await;
        let txs = list(&server, "/v1/transactions", "transactions").await;
        if !sagas.is_empty() && !txs.is_empty() {
            break (sagas, txs);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the effects were not committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !saga_request.is_finished() && !tx_request.is_finished(),
        "both requests still run"
    );
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let (saga_id, xid) = (sagas[0]["id"].clone(), txs[0]["xid"].clone());

    let server = Server::start(node(dir, database_url)).await;
    // The keys' records were left in flight: a retry waits for the lock to expire.
    let r = start_saga(&server).send().await.unwrap();
    assert_eq!(r.status(), 409, "the key is still locked by the killed request");
    let unlocked = started + Duration::from_secs(LOCK_S + 1);
    tokio::time::sleep(unlocked.saturating_duration_since(Instant::now())).await;

    let r = start_saga(&server).send().await.unwrap();
    assert_eq!(r.status(), 200, "the retry finds the saga the first attempt started");
    let saga: Value = r.json().await.unwrap();
    assert_eq!(saga["id"], saga_id, "{saga}");
    let r = begin_tx(&server, &participant).send().await.unwrap();
    assert!(r.status() == 200 || r.status() == 202, "{}", r.status());
    let tx: Value = r.json().await.unwrap();
    assert_eq!(tx["xid"], xid, "{tx}");

    assert_eq!(list(&server, "/v1/sagas", "sagas").await.len(), 1, "exactly one saga");
    assert_eq!(
        list(&server, "/v1/transactions", "transactions").await.len(),
        1,
        "exactly one transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_crash_meets_the_first_effect_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("concord.db").display());
    a_retry_after_a_crash_meets_the_first_effect(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_crash_meets_the_first_effect_on_postgres() {
    let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    a_retry_after_a_crash_meets_the_first_effect(&url, dir.path()).await;
    let _ = concord_store_postgres::drop_scratch_database(&base, &url).await;
}
