//! The two-phase-commit participant kit against real databases, always through its axum router
//! as the coordinator calls it: PostgreSQL prepared transactions (an `accounts` table whose
//! `CHECK (balance >= 0)` refuses overdrafts) and SQLite reservation records (a `stock` table).
//! PostgreSQL tests need `CONCORD_TEST_POSTGRES_URL` and `max_prepared_transactions` > 0;
//! without the variable each prints that it skipped. Every PostgreSQL test rolls back whatever
//! it left prepared, even when it fails, so no lock outlives it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use concord_sdk::Client;
use concord_sdk::tx::postgres::{PostgresParticipant, PreparedWork};
use concord_sdk::tx::sqlite::{ReservationWork, SqliteParticipant};
use concord_sdk::tx::{self, BoxError, Participant, RecoveryReport, WorkError, Xid};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection as _, PgConnection, SqliteConnection};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const API_KEY: &str = "k-tx-read";

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn new_xid() -> Xid {
    Xid::parse(uuid::Uuid::now_v7().to_string()).expect("a UUID is a valid xid")
}

fn xids(list: &[&Xid]) -> Vec<Xid> {
    list.iter().map(|&x| x.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The participant service and the coordinator's calls.

/// A participant service: the kit's router nested at `/2pc` on 127.0.0.1:0.
struct Service {
    url: String,
    http: reqwest::Client,
    server: JoinHandle<()>,
}

/// One answer of the service.
/// The coordinator's token every test call carries.
const TOKEN: &str = "test-coordinator-token";

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

impl Service {
    async fn spawn(participant: Arc<dyn Participant>) -> Self {
        install_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/2pc", listener.local_addr().expect("address"));
        let app = Router::new().nest(
            "/2pc",
            tx::router(participant, tx::CoordinatorAuth::Token(TOKEN.into())),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            url,
            http: reqwest::Client::new(),
            server,
        }
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        let response = self
            .http
            .post(format!("{}/{path}", self.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the service answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            content_type,
            body,
        }
    }

    async fn prepare(&self, xid: &Xid, payload: Value) -> Answer {
        self.post(
            "prepare",
            json!({ "xid": xid.as_str(), "payload": payload }).to_string(),
        )
        .await
    }

    async fn commit(&self, xid: &Xid) -> Answer {
        self.post("commit", json!({ "xid": xid.as_str() }).to_string()).await
    }

    async fn abort(&self, xid: &Xid) -> Answer {
        self.post("abort", json!({ "xid": xid.as_str() }).to_string()).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A coordinator reduced to `GET /v1/transactions/{xid}`: the decisions the test sets, presumed
/// abort for any other xid.
struct FakeCoordinator {
    client: Client,
    decisions: Arc<Mutex<HashMap<String, Option<&'static str>>>>,
    asked: Arc<Mutex<Vec<String>>>,
    server: JoinHandle<()>,
}

#[derive(Clone)]
struct CoordinatorState {
    decisions: Arc<Mutex<HashMap<String, Option<&'static str>>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl FakeCoordinator {
    async fn spawn() -> Self {
        install_provider();
        let state = CoordinatorState {
            decisions: Arc::default(),
            asked: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/transactions/{xid}", get(Self::transaction))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            client: Client::new(url, API_KEY).expect("client"),
            decisions: state.decisions,
            asked: state.asked,
            server,
        }
    }

    async fn transaction(
        State(state): State<CoordinatorState>,
        Path(xid): Path<String>,
        headers: HeaderMap,
    ) -> (StatusCode, axum::Json<Value>) {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {API_KEY}")) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        state.asked.lock().unwrap().push(xid.clone());
        let body = match state.decisions.lock().unwrap().get(&xid) {
            Some(Some(outcome)) => json!({ "xid": xid, "outcome": outcome, "pending": true }),
            Some(None) => json!({ "xid": xid, "pending": true }),
            None => json!({ "xid": xid, "outcome": "aborted", "presumed": true }),
        };
        (StatusCode::OK, axum::Json(body))
    }

    fn decide(&self, xid: &Xid, outcome: Option<&'static str>) {
        self.decisions.lock().unwrap().insert(xid.to_string(), outcome);
    }

    fn asked(&self) -> Vec<String> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a wallet service whose work debits an account.

/// Lets a test hold a prepare inside its work, "in flight".
#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

/// Debits `payload.account` by `payload.amount`. With `"savepoint": true` the debit runs in a
/// nested `conn.begin()` that it commits; with `"swallow": true` it first runs a statement that
/// fails and ignores the error.
#[derive(Default)]
struct Debit {
    gate: Option<Arc<Gate>>,
}

#[async_trait::async_trait]
impl PreparedWork for Debit {
    async fn run(&self, conn: &mut PgConnection, _xid: &Xid, payload: &Value) -> Result<(), WorkError> {
        let account = payload["account"]
            .as_str()
            .ok_or_else(|| WorkError::refused("no account"))?;
        let amount = payload["amount"]
            .as_i64()
            .ok_or_else(|| WorkError::refused("no amount"))?;
        assert!(
            conn.is_in_transaction(),
            "the work runs inside the participant's transaction"
        );
        if let Some(gate) = &self.gate {
            gate.entered.notify_one();
            gate.release.notified().await;
        }
        if payload["swallow"] == true {
            let _ = sqlx::query("SELECT 1 / 0").execute(&mut *conn).await;
        }
        let debit = sqlx::query("UPDATE accounts SET balance = balance - $2 WHERE id = $1")
            .bind(account)
            .bind(amount);
        let debited = if payload["savepoint"] == true {
            let mut nested = conn.begin().await.map_err(WorkError::failed)?;
            let done = debit.execute(&mut *nested).await?;
            nested.commit().await.map_err(WorkError::failed)?;
            done
        } else {
            debit.execute(&mut *conn).await?
        };
        if debited.rows_affected() == 0 {
            return Err(WorkError::refused(format!("no account {account}")));
        }
        Ok(())
    }
}

/// A scratch database with `accounts` (alice and bob at 100).
struct Pg {
    base: String,
    url: String,
    /// The test's own view, apart from the participants' pools.
    pool: PgPool,
}

impl Pg {
    async fn connect_pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .expect("connect to the scratch database")
    }

    /// A wallet participant on a pool of its own, schema ensured (twice: it is idempotent).
    async fn participant(&self, gid_prefix: &str, max_connections: u32, work: Debit) -> Arc<PostgresParticipant> {
        let pool = self.connect_pool(max_connections).await;
        let participant = PostgresParticipant::new(pool, gid_prefix, work).expect("participant");
        participant.ensure_schema().await.expect("schema");
        participant.ensure_schema().await.expect("schema again");
        Arc::new(participant)
    }

    async fn balance(&self, account: &str) -> i64 {
        sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_one(&self.pool)
            .await
            .expect("balance")
    }

    /// The gids prepared in this database.
    async fn prepared(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared")
            .fetch_all(&self.pool)
            .await
            .expect("pg_prepared_xacts")
    }

    async fn idle_in_transaction(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&self.pool)
        .await
        .expect("pg_stat_activity")
    }

    /// Rolls back whatever the test left prepared (a prepared transaction would hold its locks
    /// and block `DROP DATABASE`), then drops the database. New connections are refused and the
    /// others ended first: a call the test abandoned may still be running in a service's task.
    async fn clean_up(&self) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect for clean-up");
        let mut admin = PgConnection::connect(&self.base)
            .await
            .expect("connect to the base database");
        let (name, pid): (String, i32) = sqlx::query_as("SELECT current_database()::text, pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .expect("own pid");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> {pid};"
        )))
        .execute(&mut admin)
        .await
        .expect("close the database to the test's connections");
        admin.close().await.expect("close");
        let gids: Vec<String> =
            sqlx::query_scalar("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                .fetch_all(&mut conn)
                .await
                .expect("pg_prepared_xacts");
        for gid in gids {
            let rollback = format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"));
            sqlx::raw_sql(sqlx::AssertSqlSafe(rollback))
                .execute(&mut conn)
                .await
                .expect("roll back a leftover prepared transaction");
        }
        conn.close().await.expect("close");
        self.pool.close().await;
        concord_store_postgres::drop_scratch_database(&self.base, &self.url)
            .await
            .expect("drop the scratch database");
    }
}

/// Runs `test` on a fresh database, then cleans up whether it passed, failed or hung.
async fn with_postgres<F, Fut>(test: F)
where
    F: FnOnce(Arc<Pg>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    install_provider();
    let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .expect("scratch database");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect");
    sqlx::raw_sql(
        "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL CHECK (balance >= 0));
         INSERT INTO accounts VALUES ('alice', 100), ('bob', 100);",
    )
    .execute(&pool)
    .await
    .expect("accounts");
    let pg = Arc::new(Pg { base, url, pool });
    let mut run = tokio::spawn(test(pg.clone()));
    let outcome = tokio::time::timeout(TEST_TIMEOUT, &mut run).await;
    if outcome.is_err() {
        run.abort();
    }
    pg.clean_up().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
    }
}

fn debit(account: &str, amount: i64) -> Value {
    json!({ "account": account, "amount": amount })
}

#[tokio::test]
async fn postgres_prepare_then_commit_applies_the_work_once_however_often_each_is_repeated() {
    with_postgres(|pg| async move {
        let participant = pg.participant("wallet", 2, Debit::default()).await;
        let service = Service::spawn(participant.clone()).await;
        let xid = new_xid();

        let prepared = service.prepare(&xid, debit("alice", 30)).await;
        assert_eq!(prepared.status, 200, "{prepared:?}");
        assert_eq!(prepared.body, json!({ "xid": xid.as_str(), "vote": "commit" }));
        assert_eq!(pg.prepared().await, [participant.gid(&xid)]);
        assert_eq!(pg.balance("alice").await, 100, "prepared work is not visible");

        assert_eq!(service.prepare(&xid, debit("alice", 30)).await.status, 200);
        assert_eq!(
            pg.prepared().await,
            [participant.gid(&xid)],
            "a repeated prepare redoes nothing"
        );

        let committed = service.commit(&xid).await;
        assert_eq!(committed.status, 200, "{committed:?}");
        assert_eq!(committed.body, json!({ "xid": xid.as_str(), "outcome": "committed" }));
        assert_eq!(pg.balance("alice").await, 70);
        assert!(pg.prepared().await.is_empty());

        assert_eq!(
            service.commit(&xid).await.status,
            200,
            "a repeated commit is acknowledged"
        );
        let late = service.prepare(&xid, debit("alice", 30)).await;
        assert_eq!(late.status, 200, "a late prepare of a committed xid votes commit again");
        assert!(pg.prepared().await.is_empty(), "and prepares nothing");
        assert_eq!(pg.balance("alice").await, 70);

        let abort = service.abort(&xid).await;
        assert_eq!(
            abort.status, 500,
            "an abort after the commit is never acknowledged: {abort:?}"
        );
        assert_eq!(pg.balance("alice").await, 70);
    })
    .await;
}

#[tokio::test]
async fn postgres_abort_rolls_back_is_idempotent_and_refuses_a_late_prepare() {
    with_postgres(|pg| async move {
        let participant = pg.participant("wallet", 2, Debit::default()).await;
        let service = Service::spawn(participant).await;
        let xid = new_xid();

        assert_eq!(service.prepare(&xid, debit("alice", 30)).await.status, 200);
        let aborted = service.abort(&xid).await;
        assert_eq!(aborted.status, 200, "{aborted:?}");
        assert_eq!(aborted.body, json!({ "xid": xid.as_str(), "outcome": "aborted" }));
        assert_eq!(
            service.abort(&xid).await.status,
            200,
            "a repeated abort is acknowledged"
        );
        assert!(pg.prepared().await.is_empty());
        assert_eq!(pg.balance("alice").await, 100);

        let late = service.prepare(&xid, debit("alice", 30)).await;
        assert_eq!(late.status, 409, "a prepare after the abort votes abort: {late:?}");
        assert!(pg.prepared().await.is_empty(), "and leaves nothing prepared");

        let unknown = new_xid();
        assert_eq!(
            service.abort(&unknown).await.status,
            200,
            "an abort of an unknown xid succeeds"
        );
        assert_eq!(service.prepare(&unknown, debit("bob", 1)).await.status, 409);
        assert!(pg.prepared().await.is_empty());
        assert_eq!(pg.balance("bob").await, 100);
    })
    .await;
}

#[tokio::test]
async fn postgres_a_refusal_votes_409_and_leaves_nothing_prepared_nor_a_connection_in_a_transaction() {
    with_postgres(|pg| async move {
        // One connection: each call must hand it back clean for the next one to work.
        let participant = pg.participant("wallet", 1, Debit::default()).await;
        let service = Service::spawn(participant).await;

        let overdraft = service.prepare(&new_xid(), debit("alice", 150)).await;
        assert_eq!(overdraft.status, 409, "{overdraft:?}");
        assert_eq!(overdraft.body["vote"], "abort");
        let reason = overdraft.body["reason"].as_str().unwrap();
        assert!(reason.contains("accounts_balance_check"), "{reason}");

        let nobody = service.prepare(&new_xid(), debit("carol", 1)).await;
        assert_eq!(nobody.status, 409);
        assert_eq!(nobody.body["reason"], "no account carol");

        assert!(pg.prepared().await.is_empty());
        assert_eq!(pg.idle_in_transaction().await, 0);
        assert_eq!(pg.balance("alice").await, 100);

        let xid = new_xid();
        assert_eq!(service.prepare(&xid, debit("alice", 100)).await.status, 200);
        assert_eq!(service.commit(&xid).await.status, 200);
        assert_eq!(pg.balance("alice").await, 0);
    })
    .await;
}

#[tokio::test]
async fn postgres_a_prepared_transaction_survives_a_participant_restart_with_its_row_lock_held() {
    with_postgres(|pg| async move {
        let xid = new_xid();
        {
            let pool = pg.connect_pool(2).await;
            let participant = Arc::new(PostgresParticipant::new(pool.clone(), "wallet", Debit::default()).unwrap());
            participant.ensure_schema().await.unwrap();
            let service = Service::spawn(participant).await;
            assert_eq!(service.prepare(&xid, debit("alice", 30)).await.status, 200);
            drop(service);
            pool.close().await; // the participant is gone
        }

        let mut other = PgConnection::connect(&pg.url).await.unwrap();
        sqlx::raw_sql("SET lock_timeout = '200ms'")
            .execute(&mut other)
            .await
            .unwrap();
        let blocked = sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 'alice'")
            .execute(&mut other)
            .await
            .expect_err("the prepared transaction still holds alice's row");
        assert_eq!(
            blocked.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("55P03"),
            "{blocked}"
        );

        let participant = pg.participant("wallet", 2, Debit::default()).await;
        assert_eq!(participant.in_doubt().await.unwrap(), xids(&[&xid]));
        let service = Service::spawn(participant).await;
        assert_eq!(service.commit(&xid).await.status, 200);
        assert_eq!(pg.balance("alice").await, 70);
        assert!(pg.prepared().await.is_empty());

        sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 'alice'")
            .execute(&mut other)
            .await
            .expect("the lock went with the commit");
        assert_eq!(pg.balance("alice").await, 71);
        other.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn postgres_recover_settles_each_in_doubt_transaction_as_the_coordinator_decided() {
    with_postgres(|pg| async move {
        let wallet = pg.participant("wallet", 2, Debit::default()).await;
        let loyalty = pg.participant("loyalty", 2, Debit::default()).await;
        let (wallet_service, loyalty_service) = (
            Service::spawn(wallet.clone()).await,
            Service::spawn(loyalty.clone()).await,
        );
        let [committed, aborted, unknown, undecided, theirs] = std::array::from_fn(|_| new_xid());
        // One account per transaction: each prepared one holds its row's lock.
        for xid in [&committed, &aborted, &unknown, &undecided] {
            sqlx::query("INSERT INTO accounts VALUES ($1, 100)")
                .bind(xid.as_str())
                .execute(&pg.pool)
                .await
                .unwrap();
            assert_eq!(wallet_service.prepare(xid, debit(xid.as_str(), 10)).await.status, 200);
        }
        assert_eq!(loyalty_service.prepare(&theirs, debit("bob", 5)).await.status, 200);
        drop((wallet_service, loyalty_service));

        let coordinator = FakeCoordinator::spawn().await;
        coordinator.decide(&committed, Some("committed"));
        coordinator.decide(&aborted, Some("aborted"));
        coordinator.decide(&undecided, None);

        let report = wallet.recover(&coordinator.client).await.unwrap();
        assert_eq!(
            report,
            RecoveryReport {
                committed: xids(&[&committed]),
                aborted: xids(&[&aborted, &unknown]),
                undecided: xids(&[&undecided]),
                failed: vec![],
            }
        );
        assert!(!report.is_settled());
        assert_eq!(
            coordinator.asked(),
            [&committed, &aborted, &unknown, &undecided].map(ToString::to_string),
            "only its own gid prefix"
        );
        for (xid, balance) in [(&committed, 90), (&aborted, 100), (&unknown, 100), (&undecided, 100)] {
            assert_eq!(pg.balance(xid.as_str()).await, balance, "{xid}");
        }
        assert_eq!(pg.prepared().await, [wallet.gid(&undecided), loyalty.gid(&theirs)]);

        let again = wallet.recover(&coordinator.client).await.unwrap();
        assert_eq!(again.undecided, xids(&[&undecided]));
        assert!(again.committed.is_empty() && again.aborted.is_empty());

        coordinator.decide(&undecided, Some("committed"));
        let last = wallet.recover(&coordinator.client).await.unwrap();
        assert_eq!(last.committed, xids(&[&undecided]));
        assert!(last.is_settled());
        assert_eq!(pg.balance(undecided.as_str()).await, 90);

        // The coordinator never heard of `theirs`: presumed abort.
        let report = loyalty.recover(&coordinator.client).await.unwrap();
        assert_eq!(report.aborted, xids(&[&theirs]));
        assert!(report.is_settled());
        assert!(pg.prepared().await.is_empty(), "none left behind");
        assert_eq!(pg.balance("bob").await, 100);
    })
    .await;
}

#[tokio::test]
async fn postgres_a_savepoint_in_the_work_stays_inside_the_prepared_transaction() {
    with_postgres(|pg| async move {
        let participant = pg.participant("wallet", 2, Debit::default()).await;
        let service = Service::spawn(participant).await;
        let xid = new_xid();
        let payload = json!({ "account": "alice", "amount": 30, "savepoint": true });
        assert_eq!(service.prepare(&xid, payload).await.status, 200);
        assert_eq!(
            pg.balance("alice").await,
            100,
            "the nested commit released a savepoint only"
        );
        assert_eq!(service.abort(&xid).await.status, 200);
        assert_eq!(pg.balance("alice").await, 100);
        assert!(pg.prepared().await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn postgres_a_work_that_ignores_a_failed_statement_never_votes_commit() {
    with_postgres(|pg| async move {
        let participant = pg.participant("wallet", 1, Debit::default()).await;
        let service = Service::spawn(participant).await;
        let payload = json!({ "account": "alice", "amount": 30, "swallow": true });
        let answer = service.prepare(&new_xid(), payload).await;
        assert_eq!(answer.status, 500, "{answer:?}");
        assert_eq!(answer.body["code"], "internal");
        assert!(pg.prepared().await.is_empty());
        assert_eq!(pg.idle_in_transaction().await, 0);
        assert_eq!(pg.balance("alice").await, 100);
    })
    .await;
}

#[tokio::test]
async fn postgres_calls_racing_a_prepare_in_flight_are_retried_and_leave_nothing_prepared() {
    with_postgres(|pg| async move {
        let gate = Arc::new(Gate::default());
        let participant = pg
            .participant(
                "wallet",
                4,
                Debit {
                    gate: Some(gate.clone()),
                },
            )
            .await;
        let service = Arc::new(Service::spawn(participant).await);
        let xid = new_xid();

        let first = tokio::spawn({
            let (service, xid) = (service.clone(), xid.clone());
            async move { service.prepare(&xid, debit("alice", 30)).await }
        });
        gate.entered.notified().await;
        // The coordinator gave up waiting: it retries prepare, then aborts.
        let retry = service.prepare(&xid, debit("alice", 30)).await;
        assert_eq!(retry.status, 503, "{retry:?}");
        assert_eq!(retry.body["code"], "store_unavailable");
        assert_eq!(
            service.abort(&xid).await.status,
            503,
            "the abort is not acknowledged yet"
        );

        gate.release.notify_one();
        assert_eq!(first.await.unwrap().status, 200);
        assert_eq!(pg.prepared().await.len(), 1);
        assert_eq!(service.abort(&xid).await.status, 200, "the retried abort rolls it back");
        assert!(pg.prepared().await.is_empty());
        assert_eq!(pg.balance("alice").await, 100);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// SQLite: a warehouse whose reservation holds stock.

const INITIAL_STOCK: i64 = 10;

/// `reserve` moves `payload.qty` of `payload.item` from available to held (the CHECK refuses
/// more than is available), `apply` ships it, `release` makes it available again.
struct HoldStock;

fn item_and_qty(payload: &Value) -> Result<(&str, i64), String> {
    let item = payload["item"].as_str().ok_or("no item")?;
    let qty = payload["qty"].as_i64().ok_or("no qty")?;
    Ok((item, qty))
}

#[async_trait::async_trait]
impl ReservationWork for HoldStock {
    async fn reserve(&self, conn: &mut SqliteConnection, _xid: &Xid, payload: &Value) -> Result<(), WorkError> {
        let (item, qty) = item_and_qty(payload).map_err(WorkError::Refused)?;
        let held = sqlx::query("UPDATE stock SET available = available - ?, held = held + ? WHERE item = ?")
            .bind(qty)
            .bind(qty)
            .bind(item)
            .execute(&mut *conn)
            .await?;
        if held.rows_affected() == 0 {
            return Err(WorkError::refused(format!("no item {item}")));
        }
        Ok(())
    }

    async fn apply(&self, conn: &mut SqliteConnection, _xid: &Xid, payload: &Value) -> Result<(), BoxError> {
        let (item, qty) = item_and_qty(payload)?;
        sqlx::query("UPDATE stock SET held = held - ?, shipped = shipped + ? WHERE item = ?")
            .bind(qty)
            .bind(qty)
            .bind(item)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn release(&self, conn: &mut SqliteConnection, _xid: &Xid, payload: &Value) -> Result<(), BoxError> {
        let (item, qty) = item_and_qty(payload)?;
        sqlx::query("UPDATE stock SET held = held - ?, available = available + ? WHERE item = ?")
            .bind(qty)
            .bind(qty)
            .bind(item)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// A warehouse database in a temporary directory, reopened at will ("restarted").
struct Warehouse {
    dir: tempfile::TempDir,
    pool: SqlitePool,
}

impl Warehouse {
    async fn open_pool(dir: &tempfile::TempDir) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("warehouse.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("open sqlite")
    }

    async fn new() -> Self {
        install_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let pool = Self::open_pool(&dir).await;
        sqlx::query(
            "CREATE TABLE stock (item TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0), \
             held INTEGER NOT NULL CHECK (held >= 0), shipped INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("stock table");
        sqlx::query("INSERT INTO stock VALUES ('widget', ?, 0, 0)")
            .bind(INITIAL_STOCK)
            .execute(&pool)
            .await
            .expect("stock row");
        Self { dir, pool }
    }

    /// A participant on a pool of its own, schema ensured (twice: it is idempotent).
    async fn participant(&self) -> Arc<SqliteParticipant> {
        let participant = SqliteParticipant::new(Self::open_pool(&self.dir).await, HoldStock);
        participant.ensure_schema().await.expect("schema");
        participant.ensure_schema().await.expect("schema again");
        Arc::new(participant)
    }

    /// `(available, held, shipped)` of the widget.
    async fn stock(&self) -> (i64, i64, i64) {
        sqlx::query_as("SELECT available, held, shipped FROM stock WHERE item = 'widget'")
            .fetch_one(&self.pool)
            .await
            .expect("stock")
    }

    /// The reservation records as `(xid, state)`.
    async fn records(&self) -> Vec<(String, String)> {
        sqlx::query_as("SELECT xid, state FROM concord_tx_prepared ORDER BY created_at, xid")
            .fetch_all(&self.pool)
            .await
            .expect("records")
    }
}

fn widgets(qty: i64) -> Value {
    json!({ "item": "widget", "qty": qty })
}

#[tokio::test]
async fn sqlite_prepare_then_commit_applies_the_work_once_however_often_each_is_repeated() {
    let warehouse = Warehouse::new().await;
    let service = Service::spawn(warehouse.participant().await).await;
    let xid = new_xid();

    let prepared = service.prepare(&xid, widgets(3)).await;
    assert_eq!((prepared.status, &prepared.body["vote"]), (200, &json!("commit")));
    assert_eq!(warehouse.stock().await, (7, 3, 0), "held, not shipped");
    assert_eq!(service.prepare(&xid, widgets(3)).await.status, 200);
    assert_eq!(
        warehouse.stock().await,
        (7, 3, 0),
        "a repeated prepare holds nothing more"
    );

    assert_eq!(service.commit(&xid).await.status, 200);
    assert_eq!(warehouse.stock().await, (7, 0, 3));
    assert_eq!(service.commit(&xid).await.status, 200);
    assert_eq!(
        service.prepare(&xid, widgets(3)).await.status,
        200,
        "a late prepare votes commit"
    );
    assert_eq!(warehouse.stock().await, (7, 0, 3));
    assert_eq!(warehouse.records().await, [(xid.to_string(), "committed".to_owned())]);
    assert_eq!(
        service.abort(&xid).await.status,
        500,
        "an abort after the commit is never acknowledged"
    );
}

#[tokio::test]
async fn sqlite_abort_releases_the_reservation_is_idempotent_and_refuses_a_late_prepare() {
    let warehouse = Warehouse::new().await;
    let service = Service::spawn(warehouse.participant().await).await;
    let xid = new_xid();

    assert_eq!(service.prepare(&xid, widgets(4)).await.status, 200);
    assert_eq!(warehouse.stock().await, (6, 4, 0));
    let aborted = service.abort(&xid).await;
    assert_eq!(aborted.body, json!({ "xid": xid.as_str(), "outcome": "aborted" }));
    assert_eq!(warehouse.stock().await, (10, 0, 0));
    assert_eq!(service.abort(&xid).await.status, 200);
    assert_eq!(warehouse.stock().await, (10, 0, 0), "released once");
    assert_eq!(service.prepare(&xid, widgets(4)).await.status, 409);

    let unknown = new_xid();
    assert_eq!(
        service.abort(&unknown).await.status,
        200,
        "an abort of an unknown xid succeeds"
    );
    assert_eq!(service.prepare(&unknown, widgets(1)).await.status, 409);
    assert_eq!(warehouse.stock().await, (10, 0, 0));
}

#[tokio::test]
async fn sqlite_a_refusal_votes_409_and_writes_no_record() {
    let warehouse = Warehouse::new().await;
    let service = Service::spawn(warehouse.participant().await).await;

    let too_many = service.prepare(&new_xid(), widgets(INITIAL_STOCK + 1)).await;
    assert_eq!(too_many.status, 409, "{too_many:?}");
    assert!(
        too_many.body["reason"].as_str().unwrap().contains("CHECK"),
        "{too_many:?}"
    );
    let nothing = service.prepare(&new_xid(), json!({ "item": "gadget", "qty": 1 })).await;
    assert_eq!(
        (nothing.status, &nothing.body["reason"]),
        (409, &json!("no item gadget"))
    );

    assert!(warehouse.records().await.is_empty());
    assert_eq!(warehouse.stock().await, (10, 0, 0));
}

#[tokio::test]
async fn sqlite_reservations_survive_a_restart_and_recover_settles_them_as_the_coordinator_decided() {
    let warehouse = Warehouse::new().await;
    let [committed, aborted, unknown, undecided] = std::array::from_fn(|_| new_xid());
    {
        let participant = warehouse.participant().await;
        let service = Service::spawn(participant.clone()).await;
        for xid in [&committed, &aborted, &unknown, &undecided] {
            assert_eq!(service.prepare(xid, widgets(1)).await.status, 200);
        }
    }
    assert_eq!(warehouse.stock().await, (6, 4, 0));

    let participant = warehouse.participant().await; // restarted
    assert_eq!(
        participant.in_doubt().await.unwrap(),
        xids(&[&committed, &aborted, &unknown, &undecided])
    );
    let coordinator = FakeCoordinator::spawn().await;
    coordinator.decide(&committed, Some("committed"));
    coordinator.decide(&aborted, Some("aborted"));
    coordinator.decide(&undecided, None);
    let report = participant.recover(&coordinator.client).await.unwrap();
    assert_eq!(
        report,
        RecoveryReport {
            committed: xids(&[&committed]),
            aborted: xids(&[&aborted, &unknown]),
            undecided: xids(&[&undecided]),
            failed: vec![],
        }
    );
    assert_eq!(warehouse.stock().await, (8, 1, 1));

    coordinator.decide(&undecided, Some("aborted"));
    assert!(participant.recover(&coordinator.client).await.unwrap().is_settled());
    assert_eq!(warehouse.stock().await, (9, 0, 1));
    assert!(participant.in_doubt().await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_a_coordinator_that_cannot_be_asked_leaves_the_reservation_in_doubt() {
    let warehouse = Warehouse::new().await;
    let participant = warehouse.participant().await;
    let xid = new_xid();
    assert_eq!(participant.prepare(&xid, &widgets(2)).await.unwrap(), tx::Vote::Commit);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = Client::new(format!("http://{port}"), API_KEY).unwrap(); // nobody listens
    let report = participant.recover(&unreachable).await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, xid);
    assert_eq!(participant.in_doubt().await.unwrap(), [xid]);
    assert_eq!(warehouse.stock().await, (8, 2, 0));
}

#[tokio::test]
async fn malformed_calls_are_refused_with_400_problems_and_touch_nothing() {
    let warehouse = Warehouse::new().await;
    let service = Service::spawn(warehouse.participant().await).await;

    let cases = [
        ("prepare", "not json", "malformed_json"),
        ("prepare", r#"{"payload": {}}"#, "malformed_json"),
        ("prepare", r#"{"xid": 7}"#, "malformed_json"),
        (
            "prepare",
            r#"{"xid": "x'; DROP TABLE stock; --", "payload": {}}"#,
            "invalid_parameter",
        ),
        ("prepare", r#"{"xid": ""}"#, "invalid_parameter"),
        ("commit", "{}", "malformed_json"),
        ("commit", r#"{"xid": "a b"}"#, "invalid_parameter"),
        ("abort", "", "malformed_json"),
        (
            "abort",
            &format!(r#"{{"xid": "{}"}}"#, "x".repeat(129)),
            "invalid_parameter",
        ),
    ];
    for (path, body, code) in cases {
        let answer = service.post(path, body.to_owned()).await;
        assert_eq!(answer.status, 400, "{path} {body}: {answer:?}");
        assert_eq!(answer.content_type, "application/problem+json", "{path} {body}");
        assert_eq!(answer.body["code"], code, "{path} {body}: {answer:?}");
        assert_eq!(answer.body["status"], 400);
    }
    assert!(warehouse.records().await.is_empty());
    assert_eq!(warehouse.stock().await, (10, 0, 0));
}

#[tokio::test]
async fn a_call_without_the_coordinators_token_is_refused_and_changes_nothing() {
    install_provider();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);
    #[async_trait::async_trait]
    impl tx::Participant for Counting {
        async fn prepare(&self, _: &tx::Xid, _: &Value) -> Result<tx::Vote, tx::ParticipantError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(tx::Vote::Commit)
        }
        async fn commit(&self, _: &tx::Xid) -> Result<(), tx::ParticipantError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        async fn abort(&self, _: &tx::Xid) -> Result<(), tx::ParticipantError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }
    let service = Service::spawn(Arc::new(Counting(seen.clone()))).await;
    for (path, key) in [("commit", None), ("abort", Some("wrong")), ("prepare", Some(""))] {
        let mut request = service
            .http
            .post(format!("{}/{path}", service.url))
            .json(&serde_json::json!({"xid": "x-1", "payload": {}}));
        if let Some(k) = key {
            request = request.bearer_auth(k);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized");
    }
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the participant"
    );
    assert_eq!(
        service.post("commit", r#"{"xid": "x-1"}"#).await.status,
        200,
        "with the token it works"
    );
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
}
