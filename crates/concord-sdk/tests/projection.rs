//! The sdk's projection runner against the real server (router on port 0, event store on
//! SQLite), with the read model in the service's own database: SQLite, and PostgreSQL when
//! `CONCORD_TEST_POSTGRES_URL` is set. Every read model is compared with a replay of the log
//! computed here, from the events the server answers.

#[path = "support/server.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use concord_sdk::projection::postgres::PostgresStore;
use concord_sdk::projection::sqlite::SqliteStore;
use concord_sdk::projection::{
    Backend as ProjectionBackend, BoxError, ConcordLog, ConnectionOf, LogConfig, NameError, Projection,
    ProjectionError, ProjectionName, ProjectionSource, Rebuild, Runner, RunnerConfig, SourceError, SourceEvent,
    TableName,
};
use concord_sdk::{Client, EventInput, EventOut, ExpectedVersion};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::json;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Row as _};
use support::{TestServer, postgres_url};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a runner may take to catch up before the test fails (the machine may be busy).
const CATCH_UP: Duration = Duration::from_secs(120);

/// The read model's database in a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Declares a test that runs on SQLite and, when configured, on PostgreSQL.
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The read model under test: balance per account, and in version 2 the number of events too.

/// What the test projection needs of a connection; the same SQL runs on both databases.
#[async_trait]
trait Exec: Send {
    async fn ddl(&mut self, sql: String) -> Result<(), sqlx::Error>;
    async fn upsert(&mut self, sql: String, account: &str, delta: i64) -> Result<(), sqlx::Error>;
}

#[async_trait]
impl Exec for SqliteConnection {
    async fn ddl(&mut self, sql: String) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(sql)).execute(self).await.map(drop)
    }
    async fn upsert(&mut self, sql: String, account: &str, delta: i64) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(sql))
            .bind(account)
            .bind(delta)
            .execute(self)
            .await
            .map(drop)
    }
}

#[async_trait]
impl Exec for PgConnection {
    async fn ddl(&mut self, sql: String) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(sql)).execute(self).await.map(drop)
    }
    async fn upsert(&mut self, sql: String, account: &str, delta: i64) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(sql))
            .bind(account)
            .bind(delta)
            .execute(self)
            .await
            .map(drop)
    }
}

/// Version 1 keeps `balance`; version 2 also counts every event of the account in `events`.
#[derive(Clone, Copy)]
struct Balances {
    counts_events: bool,
}

const V1: Balances = Balances { counts_events: false };
const V2: Balances = Balances { counts_events: true };

#[async_trait]
impl<C: Exec> Projection<C> for Balances {
    fn version(&self) -> u32 {
        if self.counts_events { 2 } else { 1 }
    }

    async fn create(&self, conn: &mut C, table: &TableName) -> Result<(), BoxError> {
        let events = if self.counts_events {
            ", events BIGINT NOT NULL"
        } else {
            ""
        };
        let sql = format!(
            "CREATE TABLE {} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL{events})",
            table.quoted()
        );
        conn.ddl(sql).await?;
        conn.ddl(format!(
            "CREATE INDEX \"{}_by_balance\" ON {} (balance)",
            table.as_str(),
            table.quoted()
        ))
        .await?;
        Ok(())
    }

    async fn apply(&self, conn: &mut C, table: &TableName, event: &SourceEvent) -> Result<(), BoxError> {
        let amount = || event.data["amount"].as_i64().ok_or("an amount event without an amount");
        let delta = match event.event_type.as_str() {
            "Deposited" => amount()?,
            "Withdrawn" => -amount()?,
            _ if self.counts_events => 0,
            _ => return Ok(()),
        };
        let t = table.quoted();
        // Not idempotent on purpose: an event applied twice shows in the totals.
        let sql = if self.counts_events {
            format!(
                "INSERT INTO {t} (account, balance, events) VALUES ($1, $2, 1) ON CONFLICT (account) \
                 DO UPDATE SET balance = {t}.balance + excluded.balance, events = {t}.events + 1"
            )
        } else {
            format!(
                "INSERT INTO {t} (account, balance) VALUES ($1, $2) ON CONFLICT (account) \
                 DO UPDATE SET balance = {t}.balance + excluded.balance"
            )
        };
        conn.upsert(sql, &event.stream, delta).await?;
        Ok(())
    }
}

/// [`Balances`] that fails once at one position and panics once at another, and reports every
/// call to `apply`.
struct Flaky {
    inner: Balances,
    fail_at: u64,
    panic_at: u64,
    failed: AtomicBool,
    panicked: AtomicBool,
    calls: AtomicU64,
    applied: mpsc::UnboundedSender<u64>,
}

impl Flaky {
    fn new(inner: Balances, fail_at: u64, panic_at: u64) -> (Arc<Self>, mpsc::UnboundedReceiver<u64>) {
        let (applied, rx) = mpsc::unbounded_channel();
        let flaky = Self {
            inner,
            fail_at,
            panic_at,
            failed: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            applied,
        };
        (Arc::new(flaky), rx)
    }
}

#[async_trait]
impl<C: Exec> Projection<C> for Flaky {
    fn version(&self) -> u32 {
        Projection::<C>::version(&self.inner)
    }

    async fn create(&self, conn: &mut C, table: &TableName) -> Result<(), BoxError> {
        self.inner.create(conn, table).await
    }

    async fn apply(&self, conn: &mut C, table: &TableName, event: &SourceEvent) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _ = self.applied.send(event.position);
        if event.position == self.fail_at && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(format!("injected failure at {}", event.position).into());
        }
        if event.position == self.panic_at && !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected panic at {}", event.position);
        }
        self.inner.apply(conn, table, event).await
    }
}

/// Account -> (balance, events counted), the shape both the replay and the table reads answer.
type Model = BTreeMap<String, (i64, i64)>;

/// The read model computed from the log alone, without the projection's code.
fn replay(log: &[EventOut], counts_events: bool) -> Model {
    let mut model = Model::new();
    for event in log {
        let delta = match event.event_type.as_str() {
            "Deposited" => event.data["amount"].as_i64().unwrap(),
            "Withdrawn" => -event.data["amount"].as_i64().unwrap(),
            _ if counts_events => 0,
            _ => continue,
        };
        let entry = model.entry(event.stream.clone()).or_default();
        entry.0 += delta;
        if counts_events {
            entry.1 += 1;
        }
    }
    model
}

// ---------------------------------------------------------------------------------------------
// The service's database, SQLite or PostgreSQL.

#[async_trait]
trait ReadModel: Send + Sync + 'static {
    type Store: ProjectionBackend + Clone;
    fn store(&self) -> Self::Store;
    /// The rows of `table` (a view or a physical table).
    async fn rows(&self, table: &str, counts_events: bool) -> Model;
    /// A handle for a reader task.
    fn reader(&self) -> Box<dyn Reader>;
    async fn table_exists(&self, table: &str) -> bool;
}

/// What a reader of the service runs: the view, by its plain name, with its columns named.
#[async_trait]
trait Reader: Send + Sync + 'static {
    async fn read_balances(&self) -> Result<Vec<(String, i64)>, sqlx::Error>;
}

const READ_BALANCES: &str = "SELECT account, balance FROM balances ORDER BY account";

#[async_trait]
impl Reader for SqlitePool {
    async fn read_balances(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as(READ_BALANCES).fetch_all(self).await
    }
}

#[async_trait]
impl Reader for PgPool {
    async fn read_balances(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as(READ_BALANCES).fetch_all(self).await
    }
}

fn rows_sql(table: &str, counts_events: bool) -> String {
    let events = if counts_events { "events" } else { "CAST(0 AS BIGINT)" };
    format!("SELECT account, balance, {events} FROM {table} ORDER BY account")
}

fn to_model(rows: Vec<(String, i64, i64)>) -> Model {
    rows.into_iter().map(|(a, b, e)| (a, (b, e))).collect()
}

struct SqliteDb {
    pool: SqlitePool,
    _dir: tempfile::TempDir,
}

impl SqliteDb {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("service.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(6)
            .connect_with(options)
            .await
            .unwrap();
        Self { pool, _dir: dir }
    }
}

#[async_trait]
impl ReadModel for SqliteDb {
    type Store = SqliteStore;
    fn store(&self) -> SqliteStore {
        SqliteStore::new(self.pool.clone())
    }
    async fn rows(&self, table: &str, counts_events: bool) -> Model {
        let rows = sqlx::query_as(AssertSqlSafe(rows_sql(table, counts_events)))
            .fetch_all(&self.pool)
            .await
            .unwrap();
        to_model(rows)
    }
    fn reader(&self) -> Box<dyn Reader> {
        Box::new(self.pool.clone())
    }
    async fn table_exists(&self, table: &str) -> bool {
        let row = sqlx::query("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1")
            .bind(table)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        row.get::<i64, _>(0) == 1
    }
}

struct PgDb {
    pool: PgPool,
    base: String,
    url: String,
}

impl PgDb {
    /// A scratch database, or `None` (after printing that the test skipped).
    async fn new() -> Option<Self> {
        let base = postgres_url()?;
        let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
            .await
            .unwrap();
        let pool = PgPoolOptions::new().max_connections(6).connect(&url).await.unwrap();
        Some(Self { pool, base, url })
    }

    async fn drop_database(self) {
        self.pool.close().await;
        concord_store_postgres::drop_scratch_database(&self.base, &self.url)
            .await
            .unwrap();
    }
}

#[async_trait]
impl ReadModel for PgDb {
    type Store = PostgresStore;
    fn store(&self) -> PostgresStore {
        PostgresStore::new(self.pool.clone())
    }
    async fn rows(&self, table: &str, counts_events: bool) -> Model {
        let rows = sqlx::query_as(AssertSqlSafe(rows_sql(table, counts_events)))
            .fetch_all(&self.pool)
            .await
            .unwrap();
        to_model(rows)
    }
    fn reader(&self) -> Box<dyn Reader> {
        Box::new(self.pool.clone())
    }
    async fn table_exists(&self, table: &str) -> bool {
        let row = sqlx::query("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1")
            .bind(table)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        row.get::<i64, _>(0) == 1
    }
}

/// Runs `case` on the read-model database `backend`; the Concord server runs on SQLite.
macro_rules! on_read_model {
    ($backend:expr, $case:ident) => {
        match $backend {
            Backend::Sqlite => {
                let db = SqliteDb::new().await;
                $case(&db).await;
            }
            Backend::Postgres => {
                let Some(db) = PgDb::new().await else { return };
                $case(&db).await;
                db.drop_database().await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The server side: events appended, the log read back.

struct Server {
    /// Keeps the server running.
    _app: TestServer,
    /// Appends, with the admin key.
    admin: Client,
    /// Reads for the projections, with a key that may only read events.
    reader: Client,
}

impl Server {
    async fn start() -> Self {
        let app = TestServer::start().await;
        let admin = Client::new(&app.address, &app.admin_key).unwrap();
        let key = admin.create_key("test", &["events:read"]).await.unwrap().key;
        let reader = Client::new(&app.address, key).unwrap();
        Self {
            _app: app,
            admin,
            reader,
        }
    }

    fn source(&self) -> ConcordLog {
        ConcordLog::new(self.reader.clone(), Some("account"))
            .with_config(LogConfig {
                poll_interval: Duration::from_millis(20),
                ..LogConfig::default()
            })
            .unwrap()
    }

    /// Every event of the `account` category, in position order.
    async fn account_log(&self) -> Vec<EventOut> {
        let mut log: Vec<EventOut> = Vec::new();
        loop {
            let after = log.last().map_or(0, |e| e.position);
            let page = self.admin.read_log(after, 1000, Some("account")).await.unwrap();
            if page.events.is_empty() {
                return log;
            }
            log.extend(page.events);
        }
    }
}

fn rng() -> StdRng {
    let seed = std::env::var("PROJECTION_TEST_SEED").ok().map_or_else(
        || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
        |s| s.parse().unwrap(),
    );
    eprintln!("PROJECTION_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// Appends about `events` events in small appends: deposits, withdrawals and notes to twelve
/// `account-N` streams, and now and then an append to a `ledger-N` stream, which the category
/// filter must leave out.
async fn append_random(admin: &Client, rng: &mut StdRng, events: usize) {
    let mut sent = 0;
    while sent < events {
        let n = rng.random_range(1..=5usize);
        let batch: Vec<EventInput> = (0..n)
            .map(|_| {
                let (event_type, data) = match rng.random_range(0..10) {
                    0..=5 => ("Deposited", json!({ "amount": rng.random_range(1..=1000) })),
                    6..=8 => ("Withdrawn", json!({ "amount": rng.random_range(1..=500) })),
                    _ => ("Noted", json!({ "text": "hello" })),
                };
                EventInput {
                    id: None,
                    event_type: event_type.into(),
                    data,
                    metadata: None,
                }
            })
            .collect();
        let stream = if rng.random_range(0..8) == 0 {
            format!("ledger-{}", rng.random_range(0..3))
        } else {
            sent += n;
            format!("account-{}", rng.random_range(0..12))
        };
        admin.append(&stream, ExpectedVersion::Any, batch).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Runners.

type TestRunner<D, P> = Runner<<D as ReadModel>::Store, P, ConcordLog>;

fn config() -> RunnerConfig {
    RunnerConfig {
        batch_size: 17,
        idle_wait: Duration::from_millis(200),
        retry: concord_sdk::projection::Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
            give_up_after: None,
        },
    }
}

fn runner<D: ReadModel, P>(db: &D, server: &Server, projection: P) -> Arc<TestRunner<D, P>>
where
    P: Projection<ConnectionOf<D::Store>> + 'static,
{
    let runner = Runner::new(
        db.store(),
        ProjectionName::parse("balances").unwrap(),
        TableName::parse("balances").unwrap(),
        projection,
        server.source(),
        config(),
    )
    .unwrap();
    Arc::new(runner)
}

/// A runner task and the switch that stops it.
struct Running {
    task: JoinHandle<Result<(), ProjectionError>>,
    stop: watch::Sender<bool>,
}

fn spawn_runner<B: ProjectionBackend, P>(runner: &Arc<Runner<B, P, ConcordLog>>) -> Running
where
    P: Projection<ConnectionOf<B>> + 'static,
{
    let (stop, mut stopped) = watch::channel(false);
    let runner = Arc::clone(runner);
    let task = tokio::spawn(async move {
        runner
            .run_until(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
            .await
    });
    Running { task, stop }
}

impl Running {
    async fn stop(self) -> Result<(), ProjectionError> {
        self.stop.send_replace(true);
        self.task.await.expect("the runner task neither panics nor is aborted")
    }
}

/// Waits until the live checkpoint is at `position`; fails when a runner stops meanwhile.
async fn caught_up<B: ProjectionBackend, P>(runner: &Runner<B, P, ConcordLog>, position: u64, running: &[&Running])
where
    P: Projection<ConnectionOf<B>> + 'static,
{
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let at = runner.checkpoint().await.unwrap().map(|c| c.position);
        if at == Some(position) {
            return;
        }
        assert!(
            at < Some(position),
            "the checkpoint {at:?} passed the log's end {position}"
        );
        assert!(running.iter().all(|r| !r.task.is_finished()), "a runner stopped early");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no catch-up to {position}: at {at:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_position(log: &[EventOut]) -> u64 {
    log.last().expect("the log has account events").position
}

// ---------------------------------------------------------------------------------------------
// The tests.

async fn the_read_model_equals_a_replay_of_the_log(backend: Backend) {
    on_read_model!(backend, read_model_equals_replay);
}
both_backends!(the_read_model_equals_a_replay_of_the_log);

async fn read_model_equals_replay<D: ReadModel>(db: &D)
where
    ConnectionOf<D::Store>: Exec,
{
    let server = Server::start().await;
    let mut rng = rng();
    append_random(&server.admin, &mut rng, 300).await;

    let runner = runner(db, &server, V1);
    let running = spawn_runner(&runner);
    let log = server.account_log().await;
    assert!(log.len() >= 300);
    caught_up(&runner, last_position(&log), &[&running]).await;
    assert_eq!(db.rows("balances", false).await, replay(&log, false));

    // Live tailing: events appended later arrive too.
    append_random(&server.admin, &mut rng, 60).await;
    let log = server.account_log().await;
    caught_up(&runner, last_position(&log), &[&running]).await;
    assert_eq!(db.rows("balances", false).await, replay(&log, false));
    assert_eq!(db.rows("balances__r1", false).await, replay(&log, false));

    let checkpoint = runner.checkpoint().await.unwrap().unwrap();
    assert_eq!(checkpoint.position, last_position(&log));
    assert_eq!(
        (checkpoint.table.as_str(), checkpoint.generation, checkpoint.version),
        ("balances__r1", 1, 1)
    );
    running.stop().await.unwrap();
}

async fn aborted_and_failing_runners_neither_lose_nor_repeat_events(backend: Backend) {
    on_read_model!(backend, aborts_and_failures);
}
both_backends!(aborted_and_failing_runners_neither_lose_nor_repeat_events);

async fn aborts_and_failures<D: ReadModel>(db: &D)
where
    ConnectionOf<D::Store>: Exec,
{
    const ROUNDS: usize = 10;
    let server = Server::start().await;
    let mut rng = rng();
    append_random(&server.admin, &mut rng, 200).await;
    let first = server.account_log().await;
    // Deposits and withdrawals only: a skipped note would not show in the balances.
    let amounts: Vec<u64> = first
        .iter()
        .filter(|e| e.event_type != "Noted")
        .map(|e| e.position)
        .collect();
    let (fail_at, panic_at) = (amounts[40], amounts[110]);
    let (flaky, mut applied) = Flaky::new(V1, fail_at, panic_at);

    // Appends go on through every round.
    let admin = server.admin.clone();
    let mut appender_rng = StdRng::seed_from_u64(rng.random());
    let appender = tokio::spawn(async move {
        for _ in 0..30 {
            append_random(&admin, &mut appender_rng, 5).await;
            tokio::task::yield_now().await;
        }
    });

    for round in 0..ROUNDS {
        while applied.try_recv().is_ok() {}
        // A fresh runner each time, as after a restart of the service.
        let runner = runner(db, &server, Arc::clone(&flaky));
        let running = spawn_runner(&runner);
        if round % 2 == 0 {
            // Abort right while the projection is inside a batch's transaction...
            tokio::select! {
                _ = applied.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        } else {
            // ...or at a random moment.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        }
        running.task.abort();
        match running.task.await {
            Err(e) if e.is_cancelled() => {}
            other => panic!("round {round}: the runner ended by itself: {other:?}"),
        }
    }
    appender.await.unwrap();

    // Two runners at once, as on two nodes, finish the job.
    let runner = runner(db, &server, Arc::clone(&flaky));
    let (one, two) = (spawn_runner(&runner), spawn_runner(&runner));
    let log = server.account_log().await;
    caught_up(&runner, last_position(&log), &[&one, &two]).await;
    one.stop().await.unwrap();
    two.stop().await.unwrap();

    assert_eq!(db.rows("balances", false).await, replay(&log, false));
    assert_eq!(
        runner.checkpoint().await.unwrap().unwrap().position,
        last_position(&log)
    );
    assert!(flaky.failed.load(Ordering::SeqCst), "the failure was injected");
    assert!(flaky.panicked.load(Ordering::SeqCst), "the panic was injected");
    // The failed call, the panicked call and the calls of rolled-back batches came on top of
    // one applied call per event; the equal totals show none of them left a trace.
    let calls = flaky.calls.load(Ordering::SeqCst);
    assert!(calls >= log.len() as u64 + 2, "{calls} calls for {} events", log.len());
}

async fn a_rebuild_swaps_in_a_new_table_while_readers_keep_reading(backend: Backend) {
    on_read_model!(backend, rebuild_and_swap);
}
both_backends!(a_rebuild_swaps_in_a_new_table_while_readers_keep_reading);

async fn rebuild_and_swap<D: ReadModel>(db: &D)
where
    ConnectionOf<D::Store>: Exec,
{
    let server = Server::start().await;
    let mut rng = rng();
    append_random(&server.admin, &mut rng, 200).await;
    let live_v1 = runner(db, &server, V1);
    let serving = spawn_runner(&live_v1);
    caught_up(&live_v1, last_position(&server.account_log().await), &[&serving]).await;

    // A reader queries the view throughout.
    let reads = Arc::new(AtomicU64::new(0));
    let (stop_reader, reader_stopped) = watch::channel(false);
    let reader = {
        let (reads, handle) = (Arc::clone(&reads), db.reader());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !*reader_stopped.borrow() {
                match handle.read_balances().await {
                    Ok(rows) if rows.is_empty() => errors.push("the view answered no rows".to_owned()),
                    Ok(_) => {}
                    Err(e) => errors.push(e.to_string()),
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            errors
        })
    };

    // Version 2 refuses to run on a table version 1 built.
    let (v2_projection, mut v2_applied) = Flaky::new(V2, 0, 0);
    let live_v2 = runner(db, &server, Arc::clone(&v2_projection));
    let refused = live_v2.run_until(std::future::pending()).await;
    assert!(
        matches!(refused, Err(ProjectionError::VersionMismatch { live: 1, ours: 2 })),
        "{refused:?}"
    );

    // A rebuild stopped before it read anything keeps its table until cancelled.
    assert_eq!(live_v2.rebuild(async {}).await.unwrap(), Rebuild::Stopped);
    let started = live_v2.rebuild_checkpoint().await.unwrap().unwrap();
    assert_eq!(
        (started.position, started.table.as_str(), started.generation),
        (0, "balances__r2", 2)
    );
    assert!(db.table_exists("balances__r2").await);
    assert!(live_v2.cancel_rebuild().await.unwrap());
    assert!(!db.table_exists("balances__r2").await);
    assert_eq!(live_v2.rebuild_checkpoint().await.unwrap(), None);
    assert!(!live_v2.cancel_rebuild().await.unwrap());

    // Appends go on during the rebuild; the live table keeps serving them.
    let admin = server.admin.clone();
    let mut appender_rng = StdRng::seed_from_u64(rng.random());
    let appender = tokio::spawn(async move { append_random(&admin, &mut appender_rng, 100).await });

    // Interrupted once some events are in...
    while v2_applied.try_recv().is_ok() {}
    let interrupted = live_v2
        .rebuild(async {
            for _ in 0..40 {
                v2_applied.recv().await;
            }
        })
        .await
        .unwrap();
    assert_eq!(interrupted, Rebuild::Stopped);
    let partway = live_v2.rebuild_checkpoint().await.unwrap().unwrap();
    assert!(
        partway.position > 0 && partway.table.as_str() == "balances__r2",
        "{partway:?}"
    );
    assert_eq!(
        live_v1.checkpoint().await.unwrap().unwrap().table.as_str(),
        "balances__r1"
    );

    // ...then resumed to the swap.
    let resumed = tokio::time::timeout(CATCH_UP, live_v2.rebuild(std::future::pending()))
        .await
        .expect("the rebuild catches up and swaps");
    let Rebuild::Swapped(swapped) = resumed.unwrap() else {
        panic!("the rebuild stopped without a shutdown");
    };
    assert_eq!(
        (swapped.table.as_str(), swapped.generation, swapped.version),
        ("balances__r2", 2, 2)
    );
    assert_eq!(live_v2.rebuild_checkpoint().await.unwrap(), None);
    assert!(!db.table_exists("balances__r1").await, "the old table is dropped");
    appender.await.unwrap();

    // The version 1 runner stops at its next batch instead of writing into the new table.
    append_random(&server.admin, &mut rng, 5).await;
    let superseded = tokio::time::timeout(CATCH_UP, serving.task)
        .await
        .expect("the old runner stops");
    assert!(
        matches!(
            superseded,
            Ok(Err(ProjectionError::VersionMismatch { live: 2, ours: 1 }))
        ),
        "{superseded:?}"
    );

    // Version 2 serves from here on.
    let serving = spawn_runner(&live_v2);
    let log = server.account_log().await;
    caught_up(&live_v2, last_position(&log), &[&serving]).await;
    assert_eq!(db.rows("balances", true).await, replay(&log, true));
    assert_eq!(db.rows("balances__r2", true).await, replay(&log, true));
    let live = live_v2.checkpoint().await.unwrap().unwrap();
    assert_eq!(
        (live.position, live.table.as_str()),
        (last_position(&log), "balances__r2")
    );

    // The reader read on across the swap and never failed.
    let after_swap = reads.load(Ordering::SeqCst);
    while reads.load(Ordering::SeqCst) == after_swap {
        tokio::task::yield_now().await;
    }
    stop_reader.send_replace(true);
    let errors = reader.await.unwrap();
    assert!(
        errors.is_empty(),
        "the reader failed {} times, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(reads.load(Ordering::SeqCst) > 1);
    serving.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_with_typed_errors() {
    // Names.
    assert!(matches!(ProjectionName::parse(""), Err(NameError::Empty { .. })));
    assert!(matches!(
        TableName::parse("Balances"),
        Err(NameError::InvalidCharacter { character: 'B', .. })
    ));
    assert!(matches!(
        TableName::parse("x; DROP TABLE y"),
        Err(NameError::InvalidCharacter { .. })
    ));
    assert!(matches!(
        TableName::parse("9lives"),
        Err(NameError::InvalidStart { .. })
    ));
    assert!(matches!(
        TableName::parse("balances__r1"),
        Err(NameError::ReservedSeparator { .. })
    ));
    assert!(matches!(
        TableName::parse("sqlite_master"),
        Err(NameError::ReservedPrefix { .. })
    ));
    assert!(matches!(
        TableName::parse("x".repeat(41)),
        Err(NameError::TooLong { max: 40, .. })
    ));
    assert!(matches!(
        ProjectionName::parse("a.rebuild"),
        Err(NameError::InvalidCharacter { .. })
    ));
    let err: ProjectionError = TableName::parse("a-b").unwrap_err().into();
    assert_eq!(
        err.to_string(),
        "the table name \"a-b\" holds '-'; only a-z, 0-9 and _ are allowed"
    );

    // Limits.
    let db = SqliteDb::new().await;
    let new = |config: RunnerConfig, source: Box<dyn ProjectionSource>| {
        Runner::new(
            db.store(),
            ProjectionName::parse("balances").unwrap(),
            TableName::parse("balances").unwrap(),
            V1,
            source,
            config,
        )
    };
    let zero_batch = RunnerConfig {
        batch_size: 0,
        ..RunnerConfig::default()
    };
    assert!(matches!(
        new(zero_batch, Box::new(Scripted(vec![]))),
        Err(ProjectionError::Config(_))
    ));

    // A source that goes backwards stops the runner before anything is applied.
    let backwards = Scripted(vec![event(5, "account-1", 10), event(3, "account-1", 20)]);
    let runner = new(RunnerConfig::default(), Box::new(backwards)).unwrap();
    let stopped = runner.run_until(std::future::pending()).await;
    assert!(
        matches!(
            stopped,
            Err(ProjectionError::SourceOrder {
                after: 0,
                previous: 5,
                position: 3
            })
        ),
        "{stopped:?}"
    );
    assert_eq!(runner.checkpoint().await.unwrap().unwrap().position, 0);
    assert!(db.rows("balances", false).await.is_empty());

    // A source that refuses for good stops it too, with the source's error.
    let runner = new(RunnerConfig::default(), Box::new(Refusing)).unwrap();
    let stopped = runner.run_until(std::future::pending()).await;
    assert!(
        matches!(stopped, Err(ProjectionError::Source(SourceError::Rejected(_)))),
        "{stopped:?}"
    );
}

/// Answers the same events after any position.
struct Scripted(Vec<SourceEvent>);

#[async_trait]
impl ProjectionSource for Scripted {
    async fn fetch(&self, after: u64, max: usize, _wait: Duration) -> Result<Vec<SourceEvent>, SourceError> {
        assert_eq!(after, 0);
        Ok(self.0.iter().take(max).cloned().collect())
    }
}

struct Refusing;

#[async_trait]
impl ProjectionSource for Refusing {
    async fn fetch(&self, _after: u64, _max: usize, _wait: Duration) -> Result<Vec<SourceEvent>, SourceError> {
        Err(SourceError::Rejected("forbidden".into()))
    }
}

fn event(position: u64, stream: &str, amount: i64) -> SourceEvent {
    SourceEvent {
        position,
        id: uuid::Uuid::now_v7(),
        stream: stream.into(),
        version: 1,
        event_type: "Deposited".into(),
        data: json!({ "amount": amount }),
        metadata: json!({}),
        recorded_at: chrono::Utc::now(),
    }
}
