//! The saga participant barrier against real databases: every behaviour on SQLite and on
//! PostgreSQL, with the business change a real `stock` row updated in the barrier's transaction.
//! PostgreSQL tests need `CONCORD_TEST_POSTGRES_URL`; without it each prints that it skipped.

use std::sync::Arc;
use std::time::Duration;

use concord_sdk::barrier::{self, BarrierError, BarrierKey, BarrierOp, Enter};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

const INITIAL_STOCK: i64 = 10;

/// A participant service reduced to its two handlers: the action `reserve` takes one widget
/// from stock, the compensation `release` puts it back.
#[derive(Clone)]
struct Participant {
    db: Db,
}

#[derive(Clone)]
enum Db {
    Sqlite {
        pool: SqlitePool,
        _dir: Arc<tempfile::TempDir>,
    },
    Postgres {
        pool: PgPool,
        base: String,
        url: String,
    },
}

/// What a handler answers the orchestrator, following the mapping the barrier documents.
#[derive(Debug, PartialEq)]
struct Reply {
    status: u16,
    enter: Enter,
    body: Value,
}

fn key(saga_id: &str, step: &str, op: BarrierOp) -> BarrierKey {
    BarrierKey::new(saga_id, step, op).expect("a valid key")
}

fn reply(enter: Enter, ran_body: Value) -> Reply {
    match enter {
        Enter::Run => Reply {
            status: 200,
            enter,
            body: ran_body,
        },
        Enter::Duplicate { ref output } => Reply {
            status: 200,
            body: output.clone().unwrap_or(Value::Null),
            enter,
        },
        Enter::EmptyCompensation => Reply {
            status: 200,
            enter,
            body: Value::Null,
        },
        Enter::Refused => Reply {
            status: 409,
            enter,
            body: json!({ "error": "already compensated" }),
        },
    }
}

impl Participant {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("participant.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("open sqlite");
        let mut conn = pool.acquire().await.expect("connection");
        // Twice: creating the table is idempotent.
        barrier::sqlite::ensure_schema(&mut conn).await.expect("schema");
        barrier::sqlite::ensure_schema(&mut conn).await.expect("schema again");
        sqlx::query("CREATE TABLE stock (item TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
            .execute(&mut *conn)
            .await
            .expect("stock table");
        sqlx::query("INSERT INTO stock VALUES ('widget', ?)")
            .bind(INITIAL_STOCK)
            .execute(&mut *conn)
            .await
            .expect("stock row");
        drop(conn);
        Self {
            db: Db::Sqlite {
                pool,
                _dir: Arc::new(dir),
            },
        }
    }

    /// `None` (after saying so) when no PostgreSQL server is configured.
    async fn postgres() -> Option<Self> {
        let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
            eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is unset");
            return None;
        };
        let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
            .await
            .expect("scratch database");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect postgres");
        let mut conn = pool.acquire().await.expect("connection");
        barrier::postgres::ensure_schema(&mut conn).await.expect("schema");
        barrier::postgres::ensure_schema(&mut conn).await.expect("schema again");
        sqlx::query("CREATE TABLE stock (item TEXT PRIMARY KEY, qty BIGINT NOT NULL)")
            .execute(&mut *conn)
            .await
            .expect("stock table");
        sqlx::query("INSERT INTO stock VALUES ('widget', $1)")
            .bind(INITIAL_STOCK)
            .execute(&mut *conn)
            .await
            .expect("stock row");
        drop(conn);
        Some(Self {
            db: Db::Postgres { pool, base, url },
        })
    }

    /// Closes the pool and drops the scratch PostgreSQL database.
    async fn finish(self) {
        match self.db {
            Db::Sqlite { pool, .. } => pool.close().await,
            Db::Postgres { pool, base, url } => {
                pool.close().await;
                concord_store_postgres::drop_scratch_database(&base, &url)
                    .await
                    .expect("drop scratch database");
            }
        }
    }

    /// The action handler.
    async fn reserve(&self, key: &BarrierKey) -> Reply {
        self.reserve_holding(key, Duration::ZERO).await
    }

    /// The action handler, keeping its transaction open `hold` longer after entering the barrier
    /// so that a racing call has to wait for it.
    async fn reserve_holding(&self, key: &BarrierKey, hold: Duration) -> Reply {
        const TAKE: &str = "UPDATE stock SET qty = qty - 1 WHERE item = 'widget' RETURNING qty";
        match &self.db {
            Db::Sqlite { pool, .. } => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                let enter = barrier::sqlite::enter(&mut tx, key).await.expect("enter");
                tokio::time::sleep(hold).await;
                if enter != Enter::Run {
                    return reply(enter, Value::Null);
                }
                let left: i64 = sqlx::query_scalar(TAKE).fetch_one(&mut *tx).await.expect("take");
                let output = json!({ "reserved": 1, "left": left });
                barrier::sqlite::save_output(&mut tx, key, &output)
                    .await
                    .expect("save output");
                tx.commit().await.expect("commit");
                reply(enter, output)
            }
            Db::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                let enter = barrier::postgres::enter(&mut tx, key).await.expect("enter");
                tokio::time::sleep(hold).await;
                if enter != Enter::Run {
                    return reply(enter, Value::Null);
                }
                let left: i64 = sqlx::query_scalar(TAKE).fetch_one(&mut *tx).await.expect("take");
                let output = json!({ "reserved": 1, "left": left });
                barrier::postgres::save_output(&mut tx, key, &output)
                    .await
                    .expect("save output");
                tx.commit().await.expect("commit");
                reply(enter, output)
            }
        }
    }

    /// The compensation handler.
    async fn release(&self, key: &BarrierKey) -> Reply {
        self.release_holding(key, Duration::ZERO).await
    }

    async fn release_holding(&self, key: &BarrierKey, hold: Duration) -> Reply {
        const PUT_BACK: &str = "UPDATE stock SET qty = qty + 1 WHERE item = 'widget'";
        match &self.db {
            Db::Sqlite { pool, .. } => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                let enter = barrier::sqlite::enter(&mut tx, key).await.expect("enter");
                tokio::time::sleep(hold).await;
                if enter == Enter::Run {
                    sqlx::query(PUT_BACK).execute(&mut *tx).await.expect("put back");
                }
                // Also on EmptyCompensation: the committed rows refuse the late action.
                tx.commit().await.expect("commit");
                reply(enter, Value::Null)
            }
            Db::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                let enter = barrier::postgres::enter(&mut tx, key).await.expect("enter");
                tokio::time::sleep(hold).await;
                if enter == Enter::Run {
                    sqlx::query(PUT_BACK).execute(&mut *tx).await.expect("put back");
                }
                tx.commit().await.expect("commit");
                reply(enter, Value::Null)
            }
        }
    }

    /// The action handler whose business change fails after it entered: it rolls back.
    async fn reserve_and_fail(&self, key: &BarrierKey) -> Enter {
        const TAKE: &str = "UPDATE stock SET qty = qty - 1 WHERE item = 'widget'";
        match &self.db {
            Db::Sqlite { pool, .. } => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                let enter = barrier::sqlite::enter(&mut tx, key).await.expect("enter");
                sqlx::query(TAKE).execute(&mut *tx).await.expect("take");
                tx.rollback().await.expect("rollback");
                enter
            }
            Db::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                let enter = barrier::postgres::enter(&mut tx, key).await.expect("enter");
                sqlx::query(TAKE).execute(&mut *tx).await.expect("take");
                tx.rollback().await.expect("rollback");
                enter
            }
        }
    }

    async fn stock(&self) -> i64 {
        const QTY: &str = "SELECT qty FROM stock WHERE item = 'widget'";
        match &self.db {
            Db::Sqlite { pool, .. } => sqlx::query_scalar(QTY).fetch_one(pool).await,
            Db::Postgres { pool, .. } => sqlx::query_scalar(QTY).fetch_one(pool).await,
        }
        .expect("stock")
    }

    /// The saga's barrier rows as `step op origin`, sorted.
    async fn barrier_rows(&self, saga_id: &str) -> Vec<String> {
        let rows: Vec<(String, String, String)> = match &self.db {
            Db::Sqlite { pool, .. } => {
                sqlx::query_as("SELECT step, op, origin FROM concord_barrier WHERE saga_id = ? ORDER BY step, op")
                    .bind(saga_id)
                    .fetch_all(pool)
                    .await
            }
            Db::Postgres { pool, .. } => {
                sqlx::query_as("SELECT step, op, origin FROM concord_barrier WHERE saga_id = $1 ORDER BY step, op")
                    .bind(saga_id)
                    .fetch_all(pool)
                    .await
            }
        }
        .expect("barrier rows");
        rows.into_iter()
            .map(|(step, op, origin)| format!("{step} {op} {origin}"))
            .collect()
    }

    /// `enter` on a connection with no transaction, then `save_output` for a refused action.
    async fn misuse(&self, refused: &BarrierKey) -> (BarrierError, BarrierError) {
        match &self.db {
            Db::Sqlite { pool, .. } => {
                let mut conn = pool.acquire().await.expect("connection");
                let outside = barrier::sqlite::enter(&mut conn, refused)
                    .await
                    .expect_err("outside a tx");
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                assert_eq!(
                    barrier::sqlite::enter(&mut tx, refused).await.expect("enter"),
                    Enter::Refused
                );
                let not_entered = barrier::sqlite::save_output(&mut tx, refused, &json!({}))
                    .await
                    .expect_err("refused calls have no row of their own");
                (outside, not_entered)
            }
            Db::Postgres { pool, .. } => {
                let mut conn = pool.acquire().await.expect("connection");
                let outside = barrier::postgres::enter(&mut conn, refused)
                    .await
                    .expect_err("outside a tx");
                let mut tx = pool.begin().await.expect("begin");
                assert_eq!(
                    barrier::postgres::enter(&mut tx, refused).await.expect("enter"),
                    Enter::Refused
                );
                let not_entered = barrier::postgres::save_output(&mut tx, refused, &json!({}))
                    .await
                    .expect_err("refused calls have no row of their own");
                (outside, not_entered)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The behaviours, each run on both databases.

async fn a_duplicate_action_runs_once_and_answers_the_first_output(p: Participant) {
    let action = key("order-1", "reserve", BarrierOp::Action);

    let first = p.reserve(&action).await;
    let second = p.reserve(&action).await;

    assert_eq!(first.enter, Enter::Run);
    assert_eq!(first.body, json!({ "reserved": 1, "left": INITIAL_STOCK - 1 }));
    assert_eq!(second.status, 200);
    assert_eq!(
        second.enter,
        Enter::Duplicate {
            output: Some(first.body.clone())
        }
    );
    assert_eq!(second.body, first.body);
    assert_eq!(p.stock().await, INITIAL_STOCK - 1);
    assert_eq!(p.barrier_rows("order-1").await, ["reserve action action"]);
    p.finish().await;
}

async fn a_compensation_after_the_action_undoes_it_once_even_when_delivered_twice(p: Participant) {
    let action = key("order-2", "reserve", BarrierOp::Action);
    let compensation = key("order-2", "reserve", BarrierOp::Compensation);
    assert_eq!(p.reserve(&action).await.enter, Enter::Run);

    let first = p.release(&compensation).await;
    let second = p.release(&compensation).await;

    assert_eq!((first.status, first.enter), (200, Enter::Run));
    assert_eq!((second.status, second.enter), (200, Enter::Duplicate { output: None }));
    assert_eq!(p.stock().await, INITIAL_STOCK);
    assert_eq!(
        p.barrier_rows("order-2").await,
        ["reserve action action", "reserve compensation compensation"]
    );
    // An action retried after its compensation is still a duplicate: it does not run again.
    let late = p.reserve(&action).await;
    assert_eq!(
        late.enter,
        Enter::Duplicate {
            output: Some(json!({ "reserved": 1, "left": INITIAL_STOCK - 1 }))
        }
    );
    assert_eq!(p.stock().await, INITIAL_STOCK);
    p.finish().await;
}

async fn a_compensation_first_is_empty_and_refuses_the_late_action(p: Participant) {
    let action = key("order-3", "reserve", BarrierOp::Action);
    let compensation = key("order-3", "reserve", BarrierOp::Compensation);

    let empty = p.release(&compensation).await;
    let again = p.release(&compensation).await;
    let late = p.reserve(&action).await;

    assert_eq!((empty.status, empty.enter), (200, Enter::EmptyCompensation));
    assert_eq!((again.status, again.enter), (200, Enter::Duplicate { output: None }));
    assert_eq!((late.status, late.enter), (409, Enter::Refused));
    assert_eq!(
        p.stock().await,
        INITIAL_STOCK,
        "neither the compensation nor the late action touched stock"
    );
    assert_eq!(
        p.barrier_rows("order-3").await,
        ["reserve action compensation", "reserve compensation compensation"]
    );
    // Another step of the same saga is not blocked.
    assert_eq!(
        p.reserve(&key("order-3", "reserve-again", BarrierOp::Action))
            .await
            .enter,
        Enter::Run
    );
    assert_eq!(p.stock().await, INITIAL_STOCK - 1);
    p.finish().await;
}

async fn a_rolled_back_transaction_leaves_no_barrier_row_and_the_retry_runs(p: Participant) {
    let action = key("order-4", "reserve", BarrierOp::Action);

    assert_eq!(p.reserve_and_fail(&action).await, Enter::Run);
    assert_eq!(p.barrier_rows("order-4").await, Vec::<String>::new());
    assert_eq!(p.stock().await, INITIAL_STOCK);

    assert_eq!(p.reserve(&action).await.enter, Enter::Run);
    assert_eq!(p.stock().await, INITIAL_STOCK - 1);
    assert_eq!(p.barrier_rows("order-4").await, ["reserve action action"]);
    p.finish().await;
}

/// Each round delivers the action and the compensation of one key twice each, all at once; one
/// of the two originals keeps its transaction open a little so the others must wait on it.
async fn racing_calls_never_leave_the_action_without_its_compensation(p: Participant, rounds: usize) {
    let (mut both_ran, mut neither_ran) = (0, 0);
    for round in 0..rounds {
        let saga_id = format!("race-{round}");
        let action = key(&saga_id, "reserve", BarrierOp::Action);
        let compensation = key(&saga_id, "reserve", BarrierOp::Compensation);
        let hold = Duration::from_millis(3);
        let (action_hold, compensation_hold) = match round % 3 {
            0 => (hold, Duration::ZERO),
            1 => (Duration::ZERO, hold),
            _ => (Duration::ZERO, Duration::ZERO),
        };
        let mut tasks = Vec::new();
        for (op, hold) in [
            (BarrierOp::Action, action_hold),
            (BarrierOp::Compensation, compensation_hold),
            (BarrierOp::Action, Duration::ZERO),
            (BarrierOp::Compensation, Duration::ZERO),
        ] {
            let (p, action, compensation) = (p.clone(), action.clone(), compensation.clone());
            tasks.push(tokio::spawn(async move {
                match op {
                    BarrierOp::Action => (op, p.reserve_holding(&action, hold).await.enter),
                    BarrierOp::Compensation => (op, p.release_holding(&compensation, hold).await.enter),
                }
            }));
        }
        let (mut actions_ran, mut compensations_ran) = (0, 0);
        for task in tasks {
            match task.await.expect("task") {
                (BarrierOp::Action, Enter::Run) => actions_ran += 1,
                (BarrierOp::Compensation, Enter::Run) => compensations_ran += 1,
                (BarrierOp::Action, Enter::Duplicate { .. } | Enter::Refused)
                | (BarrierOp::Compensation, Enter::Duplicate { .. } | Enter::EmptyCompensation) => {}
                other => panic!("round {round}: impossible answer {other:?}"),
            }
        }
        assert!(
            actions_ran <= 1 && compensations_ran <= 1,
            "round {round}: a call ran twice"
        );
        assert_eq!(
            actions_ran, compensations_ran,
            "round {round}: the action took effect uncompensated"
        );
        assert_eq!(p.stock().await, INITIAL_STOCK, "round {round}: net stock change");
        if actions_ran == 1 {
            both_ran += 1;
        } else {
            neither_ran += 1;
        }
    }
    eprintln!("{rounds} rounds: action then compensation {both_ran}, compensation first {neither_ran}");
    p.finish().await;
}

async fn misuse_is_reported_not_recorded(p: Participant) {
    let compensation = key("order-5", "reserve", BarrierOp::Compensation);
    assert_eq!(p.release(&compensation).await.enter, Enter::EmptyCompensation);

    let (outside, not_entered) = p.misuse(&key("order-5", "reserve", BarrierOp::Action)).await;

    assert!(matches!(outside, BarrierError::NotInTransaction), "{outside:?}");
    assert!(matches!(not_entered, BarrierError::NotEntered), "{not_entered:?}");
    assert_eq!(outside.http_status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        p.barrier_rows("order-5").await,
        ["reserve action compensation", "reserve compensation compensation"]
    );
    p.finish().await;
}

/// Runs each behaviour above as two tests, `on_sqlite::<name>` and `on_postgres::<name>`, with
/// the extra arguments given in parentheses.
macro_rules! on_both_databases {
    ($($name:ident $(($($arg:expr),*))?;)+) => {
        mod on_sqlite {
            use super::Participant;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(Participant::sqlite().await $($(, $arg)*)?).await;
                }
            )+
        }
        mod on_postgres {
            use super::Participant;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(p) = Participant::postgres().await else { return };
                    super::$name(p $($(, $arg)*)?).await;
                }
            )+
        }
    };
}

on_both_databases! {
    a_duplicate_action_runs_once_and_answers_the_first_output;
    a_compensation_after_the_action_undoes_it_once_even_when_delivered_twice;
    a_compensation_first_is_empty_and_refuses_the_late_action;
    a_rolled_back_transaction_leaves_no_barrier_row_and_the_retry_runs;
    racing_calls_never_leave_the_action_without_its_compensation(100);
    misuse_is_reported_not_recorded;
}

// ---------------------------------------------------------------------------------------------
// The key, parsed at the edge.

#[test]
fn a_key_splits_on_its_last_two_colons() {
    let parsed = BarrierKey::parse("order:2024:42:reserve-stock_1:compensation").expect("valid");
    assert_eq!(parsed.saga_id(), "order:2024:42");
    assert_eq!(parsed.step(), "reserve-stock_1");
    assert_eq!(parsed.op(), BarrierOp::Compensation);
    assert_eq!(parsed.to_string(), "order:2024:42:reserve-stock_1:compensation");

    let plain = BarrierKey::parse("0b1c.A-z_9:pay:action").expect("valid");
    assert_eq!(
        (plain.saga_id().as_str(), plain.step(), plain.op()),
        ("0b1c.A-z_9", "pay", BarrierOp::Action)
    );

    let longest = format!("{}:{}:action", "s".repeat(128), "t".repeat(64));
    assert!(BarrierKey::parse(&longest).is_ok());
}

#[test]
fn a_malformed_key_is_refused_with_400() {
    let too_long_saga = format!("{}:pay:action", "s".repeat(129));
    let too_long_step = format!("saga:{}:action", "t".repeat(65));
    for bad in [
        "",
        "action",
        "pay:action",
        "saga:pay:undo",
        "saga:pay:Action",
        "saga:pay:action:",
        ":pay:action",
        "saga::action",
        "saga:p.ay:action",
        "sa ga:pay:action",
        "sagä:pay:action",
        "saga:pay/1:action",
        &too_long_saga,
        &too_long_step,
    ] {
        let error = BarrierKey::parse(bad).expect_err(bad);
        assert!(matches!(error, BarrierError::InvalidKey(_)), "{bad:?}: {error:?}");
        assert_eq!(error.http_status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert!(matches!(
        BarrierKey::new("saga", "", BarrierOp::Action),
        Err(BarrierError::InvalidKey(_))
    ));
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.insert(*name, HeaderValue::from_str(value).expect("header value"));
    }
    headers
}

#[test]
fn the_key_comes_from_both_saga_headers() {
    let good = headers(&[("Idempotency-Key", "a:b:pay:action"), ("Concord-Saga-Id", "a:b")]);
    assert_eq!(
        BarrierKey::from_headers(&good).expect("valid"),
        key("a:b", "pay", BarrierOp::Action)
    );

    let cases = [
        headers(&[("Concord-Saga-Id", "a")]),
        headers(&[("Idempotency-Key", "a:pay:action")]),
        headers(&[("Idempotency-Key", "a:pay:action"), ("Concord-Saga-Id", "b")]),
        headers(&[("Idempotency-Key", "a:pay"), ("Concord-Saga-Id", "a")]),
    ];
    let errors: Vec<BarrierError> = cases
        .iter()
        .map(|h| BarrierKey::from_headers(h).expect_err("refused"))
        .collect();
    assert!(
        matches!(errors[0], BarrierError::MissingHeader("idempotency-key")),
        "{:?}",
        errors[0]
    );
    assert!(
        matches!(errors[1], BarrierError::MissingHeader("concord-saga-id")),
        "{:?}",
        errors[1]
    );
    assert!(
        matches!(&errors[2], BarrierError::SagaIdMismatch { header, key } if header == "b" && key == "a"),
        "{:?}",
        errors[2]
    );
    assert!(matches!(errors[3], BarrierError::InvalidKey(_)), "{:?}", errors[3]);

    let mut opaque = headers(&[("Concord-Saga-Id", "a")]);
    opaque.insert(
        "Idempotency-Key",
        HeaderValue::from_bytes(b"a:pay:\xffaction").expect("opaque bytes"),
    );
    assert!(matches!(
        BarrierKey::from_headers(&opaque),
        Err(BarrierError::InvalidHeader("idempotency-key"))
    ));
    for error in &errors {
        assert_eq!(error.http_status(), StatusCode::BAD_REQUEST, "{error:?}");
    }
}
