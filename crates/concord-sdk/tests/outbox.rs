//! The outbox, its relays and the inbox against real PostgreSQL and NATS JetStream, and on
//! SQLite. (The SIGKILL tests of the relay process are in the server crate's `outbox_crash`.)

use async_trait::async_trait;
use concord_broker_nats::{NatsBroker, NatsConfig};
use concord_sdk::broker::{Broker, BrokerConsumer, BrokerError, BrokerMessage};
use concord_sdk::inbox::{self, Handled};
use concord_sdk::outbox::{self, OutboxError, OutboxLimits, RelayConfig};
use serde_json::json;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env(name: &str) -> Option<String> {
    let v = std::env::var(name).ok();
    if v.is_none() {
        eprintln!("skipped: {name} is not set");
    }
    v
}

async fn scratch_pg(base: &str) -> PgPool {
    let admin = PgPool::connect(base).await.expect("connect");
    let name = format!("concord_t_outbox_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("create db");
    let url = match base.rsplit_once('/') {
        Some((head, _)) => format!("{head}/{name}"),
        None => panic!("bad url"),
    };
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect scratch")
}

async fn scratch_sqlite(dir: &tempfile::TempDir) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("svc.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("sqlite")
}

fn nats_config() -> NatsConfig {
    NatsConfig {
        max_age: Duration::from_secs(600),
        ..NatsConfig::default()
    }
}

fn topic() -> String {
    concord_core::testkit::fresh_topic()
}

/// Consumes `topic` through a PostgreSQL inbox until `expected` distinct messages were applied;
/// answers, per key, the sequence numbers in the order their effects were applied, and how
/// many deliveries the inbox absorbed.
async fn consume_pg(
    pool: &PgPool,
    consumer: &mut dyn BrokerConsumer,
    expected: usize,
    patience: Duration,
) -> (HashMap<String, Vec<u64>>, usize) {
    let applied = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let mut count = 0;
    let mut duplicates = 0;
    let deadline = Instant::now() + patience;
    while count < expected && Instant::now() < deadline {
        for d in consumer.fetch(200, Duration::from_millis(200)).await.expect("fetch") {
            let key = d.message.key.clone();
            let n = d.message.payload["n"].as_u64().expect("n");
            let log = applied.clone();
            let handled = inbox::postgres::handle(pool, "test", d.message.id, move |conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (key, n) VALUES ($1, $2)")
                        .bind(&key)
                        .bind(i64::try_from(n).unwrap())
                        .execute(&mut *conn)
                        .await?;
                    log.lock().unwrap().entry(key).or_default().push(n);
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await
            .expect("handle");
            match handled {
                Handled::Processed(()) => count += 1,
                Handled::Duplicate => duplicates += 1,
            }
            consumer.ack(&d).await.expect("ack");
        }
    }
    let map = applied.lock().unwrap().clone();
    (map, duplicates)
}

async fn effects_schema_pg(pool: &PgPool) {
    sqlx::raw_sql("CREATE TABLE effects (key TEXT NOT NULL, n BIGINT NOT NULL, UNIQUE (key, n))")
        .execute(pool)
        .await
        .expect("effects");
}

/// Enqueues messages numbered `ns` for each of `keys` keys, interleaved, `per_tx` per transaction.
async fn fill_pg(pool: &PgPool, topic: &str, keys: usize, ns: std::ops::RangeInclusive<u64>, per_tx: usize) {
    let mut all = Vec::new();
    for n in ns {
        for k in 0..keys {
            let mut m = outbox::message(topic, &format!("k{k}"), json!({ "n": n }));
            m.headers.insert("type".into(), "Counted".into());
            all.push(m);
        }
    }
    for chunk in all.chunks(per_tx) {
        let mut tx = pool.begin().await.unwrap();
        outbox::postgres::enqueue_all(&mut tx, chunk, &OutboxLimits::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

fn assert_in_order(applied: &HashMap<String, Vec<u64>>, keys: usize, per_key: u64) {
    assert_eq!(applied.len(), keys, "every key arrived");
    for (k, ns) in applied {
        let want: Vec<u64> = (1..=per_key).collect();
        assert_eq!(ns, &want, "key {k}: each message once, in order");
    }
}

#[tokio::test]
async fn two_pg_relays_keep_per_key_order_through_nats_and_the_inbox_applies_each_once() {
    let (Some(pg), Some(nats)) = (env("CONCORD_TEST_POSTGRES_URL"), env("CONCORD_TEST_NATS_URL")) else {
        return;
    };
    let pool = scratch_pg(&pg).await;
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    inbox::postgres::ensure_schema(&pool).await.unwrap();
    effects_schema_pg(&pool).await;
    let broker: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&nats, nats_config()).await.unwrap());
    let topic = topic();
    let (keys, per_key) = (8, 150);
    let mut consumer = broker.subscribe(&topic, "order").await.unwrap();
    // Most of the messages wait before the relays start, so their batches overlap on every key.
    fill_pg(&pool, &topic, keys, 1..=100, 50).await;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let config = RelayConfig {
        batch_size: 12,
        workers: 3,
        poll_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = outbox::postgres::PgRelay::new(pool.clone(), broker.clone(), config.clone());
            let stop = stop.clone();
            tokio::spawn(async move { relay.run(stop).await })
        })
        .collect();
    // The rest is enqueued while the relays run.
    fill_pg(&pool, &topic, keys, 101..=per_key, 3).await;

    let (applied, _) = consume_pg(
        &pool,
        consumer.as_mut(),
        keys * per_key as usize,
        Duration::from_secs(60),
    )
    .await;
    stop_tx.send(true).unwrap();
    for r in relays {
        r.await.unwrap().unwrap();
    }
    assert_in_order(&applied, keys, per_key);
    assert_eq!(
        outbox::postgres::pending(&pool).await.unwrap(),
        0,
        "published rows removed"
    );
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(effects, (keys as i64) * (per_key as i64));
}

/// A broker that refuses some messages and is down for a while.
struct Flaky {
    inner: Arc<dyn Broker>,
    down_for: AtomicUsize,
    calls: AtomicUsize,
}

#[async_trait]
impl Broker for Flaky {
    async fn publish(&self, messages: &[BrokerMessage]) -> Vec<Result<(), BrokerError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .down_for
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return messages
                .iter()
                .map(|_| Err(BrokerError::Unavailable("down".into())))
                .collect();
        }
        let (poison, good): (Vec<_>, Vec<_>) = messages
            .iter()
            .enumerate()
            .partition(|(_, m)| m.payload["poison"] == true);
        let good_msgs: Vec<BrokerMessage> = good.iter().map(|(_, m)| (*m).clone()).collect();
        let mut results: Vec<Option<Result<(), BrokerError>>> = vec![None; messages.len()];
        for (i, _) in &poison {
            results[*i] = Some(Err(BrokerError::Rejected("poison".into())));
        }
        for ((i, _), r) in good.iter().zip(self.inner.publish(&good_msgs).await) {
            results[*i] = Some(r);
        }
        results.into_iter().map(Option::unwrap).collect()
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn BrokerConsumer>, BrokerError> {
        self.inner.subscribe(topic, group).await
    }
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_an_unavailable_broker_loses_nothing_pg() {
    let (Some(pg), Some(nats)) = (env("CONCORD_TEST_POSTGRES_URL"), env("CONCORD_TEST_NATS_URL")) else {
        return;
    };
    let pool = scratch_pg(&pg).await;
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    inbox::postgres::ensure_schema(&pool).await.unwrap();
    effects_schema_pg(&pool).await;
    let nats: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&nats, nats_config()).await.unwrap());
    let flaky = Arc::new(Flaky {
        inner: nats.clone(),
        down_for: AtomicUsize::new(3),
        calls: AtomicUsize::new(0),
    });
    let topic = topic();
    let mut tx = pool.begin().await.unwrap();
    for n in 1..=5u64 {
        let payload = if n == 2 {
            json!({ "n": n, "poison": true })
        } else {
            json!({ "n": n })
        };
        outbox::postgres::enqueue(
            &mut tx,
            &outbox::message(&topic, "k", payload),
            &OutboxLimits::default(),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let config = RelayConfig {
        max_attempts: 3,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        workers: 1,
        ..RelayConfig::default()
    };
    let relay = outbox::postgres::PgRelay::new(pool.clone(), flaky.clone(), config);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dead = 0;
    while outbox::postgres::pending(&pool).await.unwrap() > 0 && Instant::now() < deadline {
        let round = relay.run_once().await.unwrap();
        dead += round.dead;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert_eq!(outbox::postgres::pending(&pool).await.unwrap(), 0);
    assert_eq!(dead, 1, "only the poison message is dead");
    assert_eq!(outbox::postgres::dead_letters(&pool).await.unwrap(), 1);
    let (attempts, error): (i32, String) = sqlx::query_as("SELECT attempts, last_error FROM concord_outbox_dead")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        attempts, 3,
        "dead after max_attempts rejections; unavailability did not count"
    );
    assert!(error.contains("poison"), "{error}");
    let mut consumer = nats.subscribe(&topic, "dl").await.unwrap();
    let (applied, _) = consume_pg(&pool, consumer.as_mut(), 4, Duration::from_secs(10)).await;
    assert_eq!(
        applied["k"],
        vec![1, 3, 4, 5],
        "the rest of the key in order, after the poison one"
    );
    assert!(
        flaky.calls.load(Ordering::SeqCst) > 3,
        "the relay retried after the outage"
    );
}

#[tokio::test]
async fn a_late_commit_is_never_skipped_and_rolled_back_messages_never_leave_pg() {
    let (Some(pg), Some(nats)) = (env("CONCORD_TEST_POSTGRES_URL"), env("CONCORD_TEST_NATS_URL")) else {
        return;
    };
    let pool = scratch_pg(&pg).await;
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    inbox::postgres::ensure_schema(&pool).await.unwrap();
    effects_schema_pg(&pool).await;
    let broker: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&nats, nats_config()).await.unwrap());
    let topic = topic();
    let limits = OutboxLimits::default();
    // The first transaction takes the lower seq and commits last.
    let mut slow = pool.begin().await.unwrap();
    outbox::postgres::enqueue(&mut slow, &outbox::message(&topic, "a", json!({ "n": 1 })), &limits)
        .await
        .unwrap();
    let mut fast = pool.begin().await.unwrap();
    outbox::postgres::enqueue(&mut fast, &outbox::message(&topic, "b", json!({ "n": 1 })), &limits)
        .await
        .unwrap();
    fast.commit().await.unwrap();
    let mut gone = pool.begin().await.unwrap();
    outbox::postgres::enqueue(&mut gone, &outbox::message(&topic, "c", json!({ "n": 1 })), &limits)
        .await
        .unwrap();
    gone.rollback().await.unwrap();

    let relay = outbox::postgres::PgRelay::new(pool.clone(), broker.clone(), RelayConfig::default());
    assert_eq!(relay.run_once().await.unwrap().published, 1, "the committed row");
    slow.commit().await.unwrap();
    assert_eq!(
        relay.run_once().await.unwrap().published,
        1,
        "the late commit, not skipped"
    );
    let mut consumer = broker.subscribe(&topic, "late").await.unwrap();
    let (applied, _) = consume_pg(&pool, consumer.as_mut(), 2, Duration::from_secs(10)).await;
    assert_eq!(applied.len(), 2);
    assert!(applied.contains_key("a") && applied.contains_key("b"));
    let extra = consumer.fetch(10, Duration::from_millis(300)).await.unwrap();
    assert!(extra.is_empty(), "the rolled-back message never left: {extra:?}");
}

#[tokio::test]
async fn invalid_messages_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let pool = scratch_sqlite(&dir).await;
    outbox::sqlite::ensure_schema(&pool).await.unwrap();
    let limits = OutboxLimits {
        max_payload_bytes: 100,
        ..OutboxLimits::default()
    };
    let mut bad = vec![
        outbox::message("", "k", json!(1)),
        outbox::message("t", "", json!(1)),
        outbox::message("t t", "k", json!(1)),
        outbox::message("t", "k\n", json!(1)),
        outbox::message("t", "k", json!({ "big": "x".repeat(200) })),
    ];
    let mut headers = outbox::message("t", "k", json!(1));
    headers.headers.insert(String::new(), "v".into());
    bad.push(headers);
    for m in &bad {
        let mut tx = pool.begin().await.unwrap();
        let e = outbox::sqlite::enqueue(&mut tx, m, &limits).await.unwrap_err();
        assert!(matches!(e, OutboxError::Invalid(_)), "{e}");
        tx.commit().await.unwrap();
    }
    assert_eq!(outbox::sqlite::pending(&pool).await.unwrap(), 0);
    if let Ok(pg) = std::env::var("CONCORD_TEST_POSTGRES_URL") {
        let pool = scratch_pg(&pg).await;
        outbox::postgres::ensure_schema(&pool).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let good = outbox::message("t", "k", json!(1));
        let all = [good, bad[4].clone()];
        assert!(matches!(
            outbox::postgres::enqueue_all(&mut tx, &all, &limits).await,
            Err(OutboxError::Invalid(_))
        ));
        tx.commit().await.unwrap();
        assert_eq!(outbox::postgres::pending(&pool).await.unwrap(), 0, "all or nothing");
    }
}

#[tokio::test]
async fn sqlite_relay_publishes_in_order_wakes_on_signal_and_holds_a_lease() {
    let Some(nats) = env("CONCORD_TEST_NATS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pool = scratch_sqlite(&dir).await;
    outbox::sqlite::ensure_schema(&pool).await.unwrap();
    inbox::sqlite::ensure_schema(&pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE effects (key TEXT NOT NULL, n INTEGER NOT NULL, UNIQUE (key, n))")
        .execute(&pool)
        .await
        .unwrap();
    let broker: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&nats, nats_config()).await.unwrap());
    let topic = topic();
    let handle = outbox::sqlite::SqliteOutbox::new(OutboxLimits::default());
    let config = RelayConfig {
        // A poll far longer than the test: only the signal can wake the relay in time.
        poll_interval: Duration::from_secs(3600),
        batch_size: 50,
        ..RelayConfig::default()
    };
    let relay = handle.relay(pool.clone(), broker.clone(), config.clone());
    // A second relay of the same database is refused while the first holds the lease.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { relay.run(stop).await });
    // Its first round takes the lease.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM concord_outbox_lease")
        .fetch_one(&pool)
        .await
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the relay took no lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = outbox::sqlite::SqliteRelay::new(pool.clone(), broker.clone(), config);
    assert!(matches!(
        other.run_once().await,
        Err(outbox::RelayError::LeaseHeld { .. })
    ));

    let (keys, per_key) = (10, 30u64);
    for n in 1..=per_key {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
        for k in 0..keys {
            handle
                .enqueue(&mut tx, &outbox::message(&topic, &format!("k{k}"), json!({ "n": n })))
                .await
                .unwrap();
        }
        handle.commit(tx).await.unwrap();
    }
    let mut consumer = broker.subscribe(&topic, "sq").await.unwrap();
    let mut applied: HashMap<String, Vec<u64>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut count = 0;
    while count < keys * per_key as usize && Instant::now() < deadline {
        for d in consumer.fetch(100, Duration::from_millis(200)).await.unwrap() {
            let key = d.message.key.clone();
            let n = d.message.payload["n"].as_u64().unwrap();
            if let Some(mut tx) = inbox::sqlite::begin(&pool, "test", d.message.id).await.unwrap() {
                sqlx::query("INSERT INTO effects (key, n) VALUES (?, ?)")
                    .bind(&key)
                    .bind(i64::try_from(n).unwrap())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                applied.entry(key).or_default().push(n);
                count += 1;
            }
            consumer.ack(&d).await.unwrap();
        }
    }
    stop_tx.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_in_order(&applied, keys, per_key);
    assert_eq!(outbox::sqlite::pending(&pool).await.unwrap(), 0);
    // A redelivered message is absorbed by the inbox.
    let first = outbox::message(&topic, "k0", json!({ "n": 1 }));
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let ran = ran.clone();
        inbox::sqlite::handle(&pool, "again", first.id, move |_conn| {
            Box::pin(async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, sqlx::Error>(())
            })
        })
        .await
        .unwrap();
    }
    assert_eq!(ran.load(Ordering::SeqCst), 1, "three deliveries, one effect");
}

#[tokio::test]
async fn the_pg_outbox_handle_wakes_a_relay_that_does_not_poll_and_batches_claim_once() {
    let (Some(pg), Some(nats)) = (env("CONCORD_TEST_POSTGRES_URL"), env("CONCORD_TEST_NATS_URL")) else {
        return;
    };
    let pool = scratch_pg(&pg).await;
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    inbox::postgres::ensure_schema(&pool).await.unwrap();
    let broker: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&nats, nats_config()).await.unwrap());
    let topic = topic();
    let mut consumer = broker.subscribe(&topic, "wake").await.unwrap();
    let config = RelayConfig {
        // A poll far longer than the test: only the NOTIFY can wake the relay in time.
        poll_interval: Duration::from_secs(3600),
        workers: 1,
        ..RelayConfig::default()
    };
    let relay = outbox::postgres::PgRelay::new(pool.clone(), broker.clone(), config);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { relay.run(stop).await });
    // Let the relay's first round and its LISTEN happen before anything is enqueued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let handle = outbox::postgres::PgOutbox::new(pool.clone(), OutboxLimits::default());
    let messages: Vec<BrokerMessage> = (1..=3)
        .map(|n| outbox::message(&topic, "k", json!({ "n": n })))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    handle.enqueue(&mut tx, &messages).await.unwrap();
    handle.commit(tx).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 3 && Instant::now() < deadline {
        got.extend(consumer.fetch(10, Duration::from_millis(200)).await.unwrap());
    }
    stop_tx.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(got.len(), 3, "woken by the handle's NOTIFY");

    // A batch claim: what was handled before is not claimed again.
    let ids: Vec<uuid::Uuid> = got.iter().map(|d| d.message.id).collect();
    let (tx, fresh) = inbox::postgres::begin_batch(&pool, "batch", &ids[..2]).await.unwrap();
    assert_eq!(fresh.len(), 2);
    tx.commit().await.unwrap();
    let (tx, fresh) = inbox::postgres::begin_batch(&pool, "batch", &ids).await.unwrap();
    assert_eq!(fresh.into_iter().collect::<Vec<_>>(), vec![ids[2]], "only the new one");
    tx.commit().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lite = scratch_sqlite(&dir).await;
    inbox::sqlite::ensure_schema(&lite).await.unwrap();
    let (tx, fresh) = inbox::sqlite::begin_batch(&lite, "batch", &ids[..2]).await.unwrap();
    assert_eq!(fresh.len(), 2);
    tx.commit().await.unwrap();
    let (tx, fresh) = inbox::sqlite::begin_batch(&lite, "batch", &ids).await.unwrap();
    assert_eq!(fresh.into_iter().collect::<Vec<_>>(), vec![ids[2]], "only the new one");
    tx.commit().await.unwrap();
}

/// A service that is both a 2PC participant and an outbox writer restarts with a transaction
/// left prepared, which holds a lock on the outbox until its phase 2; setting up the schema must
/// not wait on it (the recovery that would end it runs in that same service).
#[tokio::test]
async fn ensure_schema_does_not_wait_on_a_prepared_transaction_that_enqueued_pg() {
    let Some(pg) = env("CONCORD_TEST_POSTGRES_URL") else {
        return;
    };
    let pool = scratch_pg(&pg).await;
    outbox::postgres::ensure_schema(&pool).await.unwrap();
    let gid = format!("outbox-schema-{}", uuid::Uuid::new_v4().simple());
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
    outbox::postgres::enqueue(
        &mut conn,
        &outbox::message("t", "k", json!({})),
        &OutboxLimits::default(),
    )
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let again = tokio::time::timeout(Duration::from_secs(5), outbox::postgres::ensure_schema(&pool)).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
        .execute(&pool)
        .await
        .unwrap();
    assert!(again.is_ok(), "ensure_schema waited on the prepared transaction's lock");
    again.unwrap().unwrap();
}
