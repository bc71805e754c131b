//! Two-phase commit against real PostgreSQL participants (each bank its own database, changed by
//! prepared transactions): concurrent transfers keep the money, a coordinator killed between its
//! decision and phase 2 finishes after a restart, a participant killed after voting commit commits
//! after its restart, and timeouts and refusals leave nothing prepared.

#[path = "support/proc.rs"]
mod proc;

use concord_bench::bank::Bank;
use concord_server::config::Settings;
use concord_server::startup::Application;
use proc::{ADMIN_KEY, Proc, Server, bare_serve};
use serde_json::{Value, json};
use std::time::Duration;

/// One test at a time: each holds several connection pools and prepared transactions, and
/// PostgreSQL's connection and prepared-transaction limits are shared by all of them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the coordinators of these tests show the banks, which refuse calls without it.
/// The vault's master key of every coordinator here (they share a PostgreSQL vault).
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const TX_TOKEN: &str = "tx-crash-test-token";

fn auth() -> concord_sdk::tx::CoordinatorAuth {
    concord_sdk::tx::CoordinatorAuth::Token(TX_TOKEN.into())
}

fn base_url() -> Option<String> {
    let url = std::env::var("CONCORD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
    }
    url
}

async fn scratch(base: &str) -> String {
    concord_store_postgres::create_scratch_database(base, "concord_t")
        .await
        .unwrap()
}

/// A coordinator in this process, on its own scratch database.
async fn coordinator(base: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        // The participants are on loopback, which the outbound policy refuses unless named.
        saga_allowed_hosts: vec!["127.0.0.1".into()],
        tx_allowed_hosts: vec!["127.0.0.1".into()],
        database_url: scratch(base).await,
        admin_key: Some(ADMIN_KEY.into()),
        tx_participant_token: Some(TX_TOKEN.into()),
        tx_participant_token_hosts: vec!["127.0.0.1".into()],
        vault_master_key: Some(VAULT_KEY.into()),
        db_connections: 6,
        ..Settings::default()
    };
    let app = Application::build(settings).await.unwrap();
    let url = format!("http://{}", app.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    (url, stop)
}

async fn transfer(http: &reqwest::Client, coord: &str, body: &Value) -> Value {
    let r = http
        .post(format!("{coord}/v1/transactions"))
        .bearer_auth(ADMIN_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    r.json().await.unwrap()
}

fn move_money(a: &Bank, from: &str, b: &Bank, to: &str, amount: i64, timeout_ms: u64) -> Value {
    json!({"participants": [
        {"name": "bank-a", "url": a.url, "payload": {"account": from, "delta": -amount}},
        {"name": "bank-b", "url": b.url, "payload": {"account": to, "delta": amount}}],
        "timeout_ms": timeout_ms})
}

async fn get(http: &reqwest::Client, coord: &str, xid: &str) -> Option<Value> {
    let r = http
        .get(format!("{coord}/v1/transactions/{xid}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Waits until the coordinator has no pending transaction (phase 2 acknowledged everywhere).
async fn settle(http: &reqwest::Client, coord: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let page: Option<Value> = match http
            .get(format!("{coord}/v1/transactions?pending=true&limit=10"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        if page
            .as_ref()
            .is_some_and(|p| p["transactions"].as_array().is_some_and(Vec::is_empty))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending after {limit:?}: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accounts per bank in the transfer test: enough that 32 concurrent transfers seldom meet on one.
const ACCOUNTS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_transfers_keep_the_money_and_are_never_half_applied() {
    let Some(base) = base_url() else { return };
    let _serial = SERIAL.lock().await;
    let (coord, _stop) = coordinator(&base).await;
    let accounts_a: Vec<(String, i64)> = (0..ACCOUNTS).map(|i| (format!("a{i}"), 1_000)).collect();
    let accounts_b: Vec<(String, i64)> = (0..ACCOUNTS).map(|i| (format!("b{i}"), 1_000)).collect();
    let (db_a, db_b) = (scratch(&base).await, scratch(&base).await);
    let la: Vec<(&str, i64)> = accounts_a.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    let lb: Vec<(&str, i64)> = accounts_b.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    let a = Bank::start(&db_a, "bank-a", &la, "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let b = Bank::start(&db_b, "bank-b", &lb, "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let before = a.total().await.unwrap() + b.total().await.unwrap();
    let http = reqwest::Client::new();
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let results = futures::future::join_all((0..32).map(|worker| {
        let (http, coord, a_url, b_url) = (http.clone(), coord.clone(), a_url.clone(), b_url.clone());
        async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ worker;
            let mut next = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let mut outcomes = Vec::new();
            for _ in 0..(1000 / 32 + 1) {
                let (from, to) = (next(ACCOUNTS), next(ACCOUNTS));
                // Money moves both ways, so neither bank runs dry.
                let amount = if next(2) == 0 { 1 + next(400) as i64 } else { -(1 + next(400) as i64) };
                // One in ten is refused by bank b outright; overdrafts are refused by bank a.
                let refuse = next(10) == 0;
                let body = json!({"participants": [
                    {"name": "bank-a", "url": a_url, "payload": {"account": format!("a{from}"), "delta": -amount}},
                    {"name": "bank-b", "url": b_url, "payload": {"account": format!("b{to}"), "delta": amount, "refuse": refuse}}],
                    "timeout_ms": 10_000});
                let d = transfer(&http, &coord, &body).await;
                outcomes.push((d["xid"].as_str().unwrap().to_owned(), d["outcome"].as_str().unwrap().to_owned()));
            }
            outcomes
        }
    }))
    .await;
    let outcomes: Vec<(String, String)> = results.into_iter().flatten().take(1000).collect();
    settle(&http, &coord, Duration::from_secs(60)).await;
    let committed = outcomes.iter().filter(|(_, o)| o == "committed").count();
    eprintln!("{committed} of {} transfers committed", outcomes.len());
    assert!(committed > 100 && committed < outcomes.len(), "both outcomes happened");
    assert_eq!(
        a.total().await.unwrap() + b.total().await.unwrap(),
        before,
        "no money made or lost"
    );
    for (xid, outcome) in &outcomes {
        let (in_a, in_b) = (a.applied(xid).await.unwrap(), b.applied(xid).await.unwrap());
        match outcome.as_str() {
            "committed" => assert!(in_a && in_b, "{xid} committed but applied a={in_a} b={in_b}"),
            _ => assert!(!in_a && !in_b, "{xid} aborted but applied a={in_a} b={in_b}"),
        }
    }
    assert_eq!((a.prepared().await.unwrap(), b.prepared().await.unwrap()), (0, 0));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_deciding_finishes_phase_two_after_a_restart() {
    let Some(base) = base_url() else { return };
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let coord_db = scratch(&base).await;
    let node = || {
        let mut cmd = bare_serve(dir.path());
        cmd.args(["--database-url", &coord_db])
            .env("CONCORD_ADMIN_KEY", ADMIN_KEY)
            .env("CONCORD_SAGA_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
            .env("CONCORD_TX_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
            .env("CONCORD_LEASE_MS", "1000")
            .env("CONCORD_POLL_MS", "50")
            .env("CONCORD_TX_RETRY_BACKOFF_MS", "200")
            .env("CONCORD_TX_PARTICIPANT_TOKEN", TX_TOKEN)
            .env("CONCORD_TX_PARTICIPANT_TOKEN_HOSTS", r#"["127.0.0.1"]"#)
            .env("CONCORD_VAULT_MASTER_KEY", VAULT_KEY);
        cmd
    };
    let mut server = Server::start(node()).await;
    // Both banks answer their first commit messages 503: phase 2 cannot finish before the kill.
    let a = Bank::start(&scratch(&base).await, "kill-a", &[("a", 100)], "127.0.0.1:0", 3, auth())
        .await
        .unwrap();
    let b = Bank::start(&scratch(&base).await, "kill-b", &[("b", 0)], "127.0.0.1:0", 3, auth())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let d = transfer(&http, &server.url, &move_money(&a, "a", &b, "b", 40, 5000)).await;
    assert_eq!(d["outcome"], "committed");
    let xid = d["xid"].as_str().unwrap().to_owned();
    server.proc.signal("KILL");
    server.proc.wait().await;
    drop(server);
    // In doubt at both banks: prepared, locks held, not applied.
    assert_eq!((a.prepared().await.unwrap(), b.prepared().await.unwrap()), (1, 1));
    let server = Server::start(node()).await;
    settle(&http, &server.url, Duration::from_secs(30)).await;
    assert_eq!((a.prepared().await.unwrap(), b.prepared().await.unwrap()), (0, 0));
    assert!(a.applied(&xid).await.unwrap() && b.applied(&xid).await.unwrap());
    assert_eq!((a.total().await.unwrap(), b.total().await.unwrap()), (60, 40));
    let t = get(&http, &server.url, &xid).await.unwrap();
    assert_eq!(t["outcome"], "committed");
    assert!(
        t["participants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["acknowledged_at"].is_string()),
        "{t}"
    );
    // The command line shows the same.
    let shown = proc::cli(dir.path(), &server, ADMIN_KEY, &["tx", "show", &xid]).await;
    assert!(shown.status.success(), "{shown:?}");
    let text = shown.stdout.join("\n");
    assert!(
        text.contains("committed") && text.contains("bank-a") && text.contains("bank-b"),
        "{text}"
    );
    assert!(!text.contains("not acknowledged"), "{text}");
    let listed = proc::cli(dir.path(), &server, ADMIN_KEY, &["tx", "list", "--pending"]).await;
    assert!(
        listed.status.success() && listed.stdout.iter().all(|l| !l.contains(&xid)),
        "{listed:?}"
    );
    let listed = proc::cli(
        dir.path(),
        &server,
        ADMIN_KEY,
        &["tx", "list", "--outcome", "committed"],
    )
    .await;
    assert!(listed.stdout.iter().any(|l| l.contains(&xid)), "{listed:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_refusals_abort_everyone_and_leave_nothing_prepared() {
    let Some(base) = base_url() else { return };
    let _serial = SERIAL.lock().await;
    let (coord, _stop) = coordinator(&base).await;
    let a = Bank::start(&scratch(&base).await, "to-a", &[("a", 100)], "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let b = Bank::start(&scratch(&base).await, "to-b", &[("b", 0)], "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    // Bank b holds its prepare past the timeout; bank a prepares at once.
    let mut slow = move_money(&a, "a", &b, "b", 10, 300);
    slow["participants"][1]["payload"]["sleep_ms"] = json!(1500);
    let d = transfer(&http, &coord, &slow).await;
    assert_eq!(d["outcome"], "aborted");
    let refused = transfer(&http, &coord, &move_money(&a, "a", &b, "b", 500, 5000)).await;
    assert_eq!(refused["outcome"], "aborted", "an overdraft at bank a");
    // The slow prepare finishes after the abort was decided: it must not stay prepared.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    settle(&http, &coord, Duration::from_secs(30)).await;
    assert_eq!((a.prepared().await.unwrap(), b.prepared().await.unwrap()), (0, 0));
    assert_eq!((a.total().await.unwrap(), b.total().await.unwrap()), (100, 0));
    for x in [&d, &refused] {
        let xid = x["xid"].as_str().unwrap();
        assert!(!a.applied(xid).await.unwrap() && !b.applied(xid).await.unwrap());
    }
    a.stop().await;
    b.stop().await;
}

/// Not a test: the participant process of the test below, started by it as a child (this same
/// test binary, run with `--ignored --exact participant_process`), so that it can be SIGKILLed.
#[tokio::test]
#[ignore = "a child process of participant_killed_after_voting_commit_commits_after_its_restart"]
async fn participant_process() {
    let (Ok(db), Ok(listen), Ok(refuse), Ok(coord)) = (
        std::env::var("TX_BANK_DB"),
        std::env::var("TX_BANK_LISTEN"),
        std::env::var("TX_BANK_REFUSE_COMMITS"),
        std::env::var("TX_COORDINATOR"),
    ) else {
        panic!("run only as the child of participant_killed_after_voting_commit_commits_after_its_restart");
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bank = Bank::start(&db, "proc-a", &[("a", 100)], &listen, refuse.parse().unwrap(), auth())
        .await
        .unwrap();
    // On start, ask the coordinator about every transaction left prepared here.
    let client = concord_sdk::Client::new(coord, ADMIN_KEY).unwrap();
    let report = bank.participant.recover(&client).await.unwrap();
    // Standard error: the test harness may keep a test's standard output to itself.
    eprintln!("bank ready, recovered: {report:?}");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_after_voting_commit_commits_after_its_restart() {
    let Some(base) = base_url() else { return };
    let _serial = SERIAL.lock().await;
    let (coord, _stop) = coordinator(&base).await;
    let db_a = scratch(&base).await;
    let b = Bank::start(&scratch(&base).await, "proc-b", &[("b", 0)], "127.0.0.1:0", 0, auth())
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let bank_a = |refuse_commits: &str| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--ignored", "--exact", "participant_process", "--nocapture"])
            .env("TX_BANK_DB", &db_a)
            .env("TX_BANK_LISTEN", &listen)
            .env("TX_BANK_REFUSE_COMMITS", refuse_commits)
            .env("TX_COORDINATOR", &coord);
        Proc::spawn(cmd)
    };
    // Bank a votes commit, then refuses every commit message until it is killed.
    let mut a = bank_a("1000000");
    a.stderr
        .find("bank ready", |l| l.contains("bank ready").then_some(()))
        .await;
    let http = reqwest::Client::new();
    let url_a = format!("http://{listen}");
    let body = json!({"participants": [
        {"name": "bank-a", "url": url_a, "payload": {"account": "a", "delta": -30}},
        {"name": "bank-b", "url": b.url, "payload": {"account": "b", "delta": 30}}], "timeout_ms": 5000});
    let d = transfer(&http, &coord, &body).await;
    assert_eq!(d["outcome"], "committed");
    let xid = d["xid"].as_str().unwrap().to_owned();
    a.signal("KILL");
    a.wait().await;
    drop(a);
    // Its prepared transaction survives in PostgreSQL.
    let pool_a = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_a)
        .await
        .unwrap();
    let prepared: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_xacts WHERE database = current_database()")
            .fetch_one(&pool_a)
            .await
            .unwrap();
    assert_eq!(prepared, 1);
    // Restarted, it asks the coordinator and commits: its recovery alone, since it still answers
    // every commit message from the coordinator with 503.
    let mut a = bank_a("1000000");
    let ready = a
        .stderr
        .find("bank ready", |l| l.contains("bank ready").then(|| l.to_owned()))
        .await;
    assert!(ready.contains(&format!("committed: [Xid(\"{xid}\")]")), "{ready}");
    let prepared: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_xacts WHERE database = current_database()")
            .fetch_one(&pool_a)
            .await
            .unwrap();
    assert_eq!(prepared, 0);
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 'a'")
        .fetch_one(&pool_a)
        .await
        .unwrap();
    assert_eq!(balance, 70);
    assert!(b.applied(&xid).await.unwrap());
    a.signal("KILL");
    pool_a.close().await;
    b.stop().await;
}
