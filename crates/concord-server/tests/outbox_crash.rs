//! SIGKILL of the outbox relay process (`concord relay`) in the middle of its work, then a
//! restart: no message is lost, and the consumer's inbox turns every duplicate into a no-op, so
//! each message has its effect exactly once and in per-key order. Once on PostgreSQL with NATS
//! JetStream, once on SQLite with the Concord event store as the broker.

#[path = "support/proc.rs"]
mod proc;

use concord_broker_nats::{NatsBroker, NatsConfig};
use concord_sdk::broker::{Broker, BrokerConsumer, EventStoreBroker};
use concord_sdk::{inbox, outbox};
use proc::{ADMIN_KEY, Proc, Server};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 12;
const PER_KEY: u64 = 250;
const TOTAL: usize = KEYS * PER_KEY as usize;

fn messages(topic: &str) -> Vec<outbox::BrokerMessage> {
    let mut all = Vec::new();
    for n in 1..=PER_KEY {
        for k in 0..KEYS {
            all.push(outbox::message(topic, &format!("k{k}"), json!({ "n": n })));
        }
    }
    all
}

/// What the consumer applied, per key in order, and how many deliveries its inbox absorbed.
#[derive(Default)]
struct Applied {
    by_key: Mutex<HashMap<String, Vec<u64>>>,
    count: AtomicUsize,
    duplicates: AtomicUsize,
}

impl Applied {
    fn record(&self, key: String, n: u64) {
        self.by_key.lock().unwrap().entry(key).or_default().push(n);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn check(&self) {
        let by_key = self.by_key.lock().unwrap();
        assert_eq!(by_key.len(), KEYS, "every key arrived");
        let want: Vec<u64> = (1..=PER_KEY).collect();
        for (k, ns) in by_key.iter() {
            assert_eq!(ns, &want, "key {k}: every message exactly once, in order");
        }
    }
}

/// Consumes until `stop`: `apply(key, n, id)` applies a message through the inbox and answers
/// whether it was new. Every 50th message is first handled as if the consumer died between its
/// commit and its ack, so the broker delivers it again.
fn spawn_consumer<F>(
    mut consumer: Box<dyn BrokerConsumer>,
    applied: Arc<Applied>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    apply: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(String, i64, uuid::Uuid) -> futures::future::BoxFuture<'static, Result<bool, sqlx::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        while !*stop.borrow_and_update() {
            for d in consumer.fetch(100, Duration::from_millis(100)).await.unwrap() {
                let (key, n) = (d.message.key.clone(), d.message.payload["n"].as_u64().unwrap());
                if apply(key.clone(), i64::try_from(n).unwrap(), d.message.id)
                    .await
                    .unwrap()
                {
                    applied.record(key, n);
                } else {
                    applied.duplicates.fetch_add(1, Ordering::SeqCst);
                }
                if n % 50 == 0 && d.attempt == 1 {
                    consumer.nack(&d, Duration::ZERO).await.unwrap();
                } else {
                    consumer.ack(&d).await.unwrap();
                }
            }
        }
    })
}

async fn wait_for(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn relay(dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = proc::concord(dir);
    cmd.arg("relay").args(args);
    Proc::spawn(cmd)
}

/// Kills the relay once it has published a third of the messages, restarts it, and waits
/// until the consumer applied everything.
async fn kill_and_restart(dir: &Path, args: &[&str], applied: &Applied, pending: impl AsyncFn() -> i64) -> usize {
    let mut first = relay(dir, args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending().await > i64::try_from(TOTAL * 2 / 3).unwrap() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the relay to publish a third"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.signal("KILL");
    let status = proc::within("the killed relay to exit", first.wait()).await;
    assert!(!status.success(), "the relay was killed: {status:?}");
    let left = pending().await;
    assert!(left > 0, "the relay was killed with work left");
    let mut second = relay(dir, args);
    wait_for("every message", Duration::from_secs(120), || {
        applied.count.load(Ordering::SeqCst) >= TOTAL
    })
    .await;
    second.signal("TERM");
    let _ = proc::within("the relay to stop", second.wait()).await;
    usize::try_from(left).unwrap()
}

#[tokio::test]
async fn sigkill_of_the_relay_loses_nothing_and_duplicates_have_no_effect_postgres_nats() {
    let (Ok(pg), Ok(nats)) = (
        std::env::var("CONCORD_TEST_POSTGRES_URL"),
        std::env::var("CONCORD_TEST_NATS_URL"),
    ) else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL or CONCORD_TEST_NATS_URL is not set");
        return;
    };
    let admin = sqlx::PgPool::connect(&pg).await.unwrap();
    let name = format!("concord_t_relay_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{name}", pg.rsplit_once('/').unwrap().0);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    inbox::postgres::ensure_schema(&pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE effects (key TEXT NOT NULL, n BIGINT NOT NULL, UNIQUE (key, n))")
        .execute(&pool)
        .await
        .unwrap();
    let topic = concord_core::testkit::fresh_topic();
    for chunk in messages(&topic).chunks(25) {
        let mut tx = pool.begin().await.unwrap();
        outbox::postgres::enqueue_all(&mut tx, chunk, &outbox::OutboxLimits::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    let broker = NatsBroker::connect(
        &nats,
        NatsConfig {
            max_age: Duration::from_secs(600),
            ..NatsConfig::default()
        },
    )
    .await
    .unwrap();
    let consumer = broker.subscribe(&topic, "crash").await.unwrap();
    let applied = Arc::new(Applied::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let consuming = spawn_consumer(consumer, applied.clone(), stop, {
        let pool = pool.clone();
        move |key, n, id| {
            let pool = pool.clone();
            Box::pin(async move {
                let Some(mut tx) = inbox::postgres::begin(&pool, "crash", id).await? else {
                    return Ok(false);
                };
                sqlx::query("INSERT INTO effects (key, n) VALUES ($1, $2)")
                    .bind(key)
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            })
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--outbox-url",
        url.as_str(),
        "--broker",
        "nats",
        "--nats-url",
        nats.as_str(),
        "--batch-size",
        "20",
        "--workers",
        "1",
        "--poll-ms",
        "100",
    ];
    let left = kill_and_restart(dir.path(), &args, &applied, async || {
        outbox::postgres::pending(&pool).await.unwrap()
    })
    .await;
    // Every nacked message comes back once more; wait for those redeliveries too.
    wait_for("the redeliveries", Duration::from_secs(60), || {
        applied.duplicates.load(Ordering::SeqCst) >= TOTAL / 50
    })
    .await;
    stop_tx.send(true).unwrap();
    consuming.await.unwrap();
    applied.check();
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(usize::try_from(effects).unwrap(), TOTAL, "one effect per message");
    assert_eq!(outbox::postgres::pending(&pool).await.unwrap(), 0, "the outbox drained");
    let duplicates = applied.duplicates.load(Ordering::SeqCst);
    assert!(
        duplicates >= TOTAL / 50,
        "redeliveries reached the consumer and had no effect"
    );
    eprintln!("killed with {left} rows left; the inbox absorbed {duplicates} duplicate deliveries");
}

async fn sqlite_pool(path: &Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

#[tokio::test]
async fn sigkill_of_the_relay_loses_nothing_and_duplicates_have_no_effect_sqlite_event_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(proc::serve(dir.path())).await;
    let outbox_path = dir.path().join("service.db");
    let service = sqlite_pool(&outbox_path).await;
    outbox::sqlite::ensure_schema(&service).await.unwrap();
    let topic = concord_core::testkit::fresh_topic();
    for chunk in messages(&topic).chunks(25) {
        let mut tx = service.begin_with("BEGIN IMMEDIATE").await.unwrap();
        for m in chunk {
            outbox::sqlite::enqueue(&mut tx, m, &outbox::OutboxLimits::default())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    // The consumer has a database of its own.
    let consumer_db = sqlite_pool(&dir.path().join("consumer.db")).await;
    inbox::sqlite::ensure_schema(&consumer_db).await.unwrap();
    sqlx::raw_sql("CREATE TABLE effects (key TEXT NOT NULL, n INTEGER NOT NULL, UNIQUE (key, n))")
        .execute(&consumer_db)
        .await
        .unwrap();
    let broker = EventStoreBroker::new(server.sdk());
    let consumer: Box<dyn BrokerConsumer> = broker.subscribe(&topic, "crash").await.unwrap();
    let applied = Arc::new(Applied::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let consuming = spawn_consumer(consumer, applied.clone(), stop, {
        let pool = consumer_db.clone();
        move |key, n, id| {
            let pool = pool.clone();
            Box::pin(async move {
                let Some(mut tx) = inbox::sqlite::begin(&pool, "crash", id).await? else {
                    return Ok(false);
                };
                sqlx::query("INSERT INTO effects (key, n) VALUES (?, ?)")
                    .bind(key)
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            })
        }
    });

    let outbox_url = format!("sqlite://{}", outbox_path.display());
    let args = [
        "--outbox-url",
        outbox_url.as_str(),
        "--broker",
        "concord",
        "--url",
        server.url.as_str(),
        "--key",
        ADMIN_KEY,
        "--batch-size",
        "40",
        "--poll-ms",
        "100",
        "--lease-ms",
        "1000",
    ];
    let left = kill_and_restart(dir.path(), &args, &applied, async || {
        outbox::sqlite::pending(&service).await.unwrap()
    })
    .await;
    // Every nacked message comes back once more; wait for those redeliveries too.
    wait_for("the redeliveries", Duration::from_secs(60), || {
        applied.duplicates.load(Ordering::SeqCst) >= TOTAL / 50
    })
    .await;
    stop_tx.send(true).unwrap();
    consuming.await.unwrap();
    applied.check();
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&consumer_db)
        .await
        .unwrap();
    assert_eq!(usize::try_from(effects).unwrap(), TOTAL, "one effect per message");
    assert_eq!(
        outbox::sqlite::pending(&service).await.unwrap(),
        0,
        "the outbox drained"
    );
    // The event store holds each message once: a re-publish of the same id was idempotent.
    let (mut after, mut events) = (0, 0);
    loop {
        let page = server.sdk().read_log(after, 1000, Some(&topic)).await.unwrap();
        let Some(last) = page.events.last() else { break };
        after = last.position;
        events += page.events.len();
    }
    assert_eq!(events, TOTAL, "one event per message in the log");
    let duplicates = applied.duplicates.load(Ordering::SeqCst);
    assert!(
        duplicates >= TOTAL / 50,
        "redeliveries reached the consumer and had no effect"
    );
    eprintln!("killed with {left} rows left; the inbox absorbed {duplicates} duplicate deliveries");
    drop(server);
}
