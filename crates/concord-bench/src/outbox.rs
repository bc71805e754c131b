//! `concord bench outbox`: the service kit's pipeline end to end — producers commit messages to
//! an outbox (PostgreSQL, or SQLite with `--backend sqlite`), the relay publishes them to NATS
//! JetStream, a consumer applies them through its inbox — against direct JetStream
//! publish-with-ack from one client, measured in the same run. Also: commit→consumer latency at a
//! fixed rate, and the latency the `Idempotency-Key` layer adds to an axum handler.

use super::{BenchArgs, BenchBackend, Figure, Report, percentile, ratio, round};
use anyhow::Context as _;
use concord_broker_nats::{NatsBroker, NatsConfig};
use concord_sdk::broker::{Broker, BrokerConsumer, BrokerMessage};
use concord_sdk::idempotency::{self, IdempotencyConfig, IdempotencyLayer};
use concord_sdk::inbox;
use concord_sdk::outbox::{self, OutboxLimits, RelayConfig};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Messages per producer transaction in the throughput phase.
const PER_TX: usize = 10;
/// The most messages in the outbox when the drain phase starts its relay (it holds ten times
/// what the fixed-rate phase sends, up to this).
const MAX_DRAIN: u64 = 50_000;
/// Keys the producers spread their messages over.
const KEYS: usize = 64;

/// The service's database, either kind.
#[derive(Clone)]
enum Db {
    Postgres(sqlx::PgPool, outbox::postgres::PgOutbox),
    Sqlite(sqlx::SqlitePool, outbox::sqlite::SqliteOutbox),
}

impl Db {
    async fn open(url: &str, connections: u32) -> anyhow::Result<Self> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(connections.min(8))
                .connect_with(options)
                .await?;
            outbox::sqlite::ensure_schema(&pool).await?;
            inbox::sqlite::ensure_schema(&pool).await?;
            idempotency::sqlite::ensure_schema(&pool).await?;
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_effects (id TEXT PRIMARY KEY, key TEXT NOT NULL)")
                .execute(&pool)
                .await?;
            Ok(Self::Sqlite(
                pool,
                outbox::sqlite::SqliteOutbox::new(OutboxLimits::default()),
            ))
        } else {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(connections)
                .connect(url)
                .await?;
            outbox::postgres::ensure_schema(&pool).await?;
            inbox::postgres::ensure_schema(&pool).await?;
            idempotency::postgres::ensure_schema(&pool).await?;
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_effects (id UUID PRIMARY KEY, key TEXT NOT NULL)")
                .execute(&pool)
                .await?;
            let handle = outbox::postgres::PgOutbox::new(pool.clone(), OutboxLimits::default());
            Ok(Self::Postgres(pool, handle))
        }
    }

    /// One producer transaction holding `messages`.
    async fn produce(&self, messages: &[BrokerMessage]) -> anyhow::Result<()> {
        match self {
            Self::Postgres(pool, handle) => {
                let mut tx = pool.begin().await?;
                handle.enqueue(&mut tx, messages).await?;
                handle.commit(tx).await?;
            }
            Self::Sqlite(pool, handle) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                for m in messages {
                    handle.enqueue(&mut tx, m).await?;
                }
                handle.commit(tx).await?;
            }
        }
        Ok(())
    }

    /// Applies a batch through the inbox in one transaction; answers how many were new.
    async fn consume(&self, messages: &[BrokerMessage]) -> anyhow::Result<usize> {
        let ids: Vec<uuid::Uuid> = messages.iter().map(|m| m.id).collect();
        match self {
            Self::Postgres(pool, _) => {
                let (mut tx, fresh) = inbox::postgres::begin_batch(pool, "bench", &ids).await?;
                let (ids, keys): (Vec<uuid::Uuid>, Vec<&str>) = messages
                    .iter()
                    .filter(|m| fresh.contains(&m.id))
                    .map(|m| (m.id, m.key.as_str()))
                    .unzip();
                sqlx::query("INSERT INTO bench_effects (id, key) SELECT * FROM UNNEST($1::uuid[], $2::text[])")
                    .bind(&ids)
                    .bind(&keys)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(fresh.len())
            }
            Self::Sqlite(pool, _) => {
                let (mut tx, fresh) = inbox::sqlite::begin_batch(pool, "bench", &ids).await?;
                for m in messages.iter().filter(|m| fresh.contains(&m.id)) {
                    sqlx::query("INSERT INTO bench_effects (id, key) VALUES (?, ?)")
                        .bind(m.id.to_string())
                        .bind(&m.key)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(fresh.len())
            }
        }
    }

    fn spawn_relay(&self, broker: Arc<dyn Broker>, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let config = RelayConfig {
            batch_size: 500,
            workers: 2,
            ..RelayConfig::default()
        };
        let db = self.clone();
        tokio::spawn(async move {
            let result = match db {
                Db::Postgres(pool, _) => outbox::postgres::PgRelay::new(pool, broker, config).run(stop).await,
                Db::Sqlite(pool, handle) => handle.relay(pool, broker, config).run(stop).await,
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "bench relay stopped");
            }
        })
    }

    async fn outbox_bytes(&self) -> anyhow::Result<i64> {
        Ok(match self {
            Self::Postgres(pool, _) => {
                sqlx::query_scalar("SELECT pg_total_relation_size('concord_outbox')")
                    .fetch_one(pool)
                    .await?
            }
            Self::Sqlite(pool, _) => {
                sqlx::query_scalar("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}

fn now_us(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Consumes `topic` until `stop`, applying through the inbox; records each new message's
/// latency from its `t` (microseconds since `origin`, stamped just before the producer's commit).
fn spawn_consumer(
    db: Db,
    mut consumer: Box<dyn BrokerConsumer>,
    origin: Instant,
    applied: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<f64>>> {
    tokio::spawn(async move {
        let mut latencies = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let batch = consumer.fetch(1000, Duration::from_millis(50)).await?;
            if batch.is_empty() {
                continue;
            }
            let messages: Vec<BrokerMessage> = batch.iter().map(|d| d.message.clone()).collect();
            let fresh = db.consume(&messages).await?;
            let now = now_us(origin);
            for d in &batch {
                if let Some(t) = d.message.payload["t"].as_u64() {
                    latencies.push(now.saturating_sub(t) as f64 / 1000.0);
                }
                consumer.ack(d).await?;
            }
            applied.fetch_add(fresh as u64, Ordering::SeqCst);
        }
        Ok(latencies)
    })
}

fn message(topic: &str, key: usize, origin: Instant) -> BrokerMessage {
    outbox::message(topic, &format!("k{key}"), json!({ "t": now_us(origin), "item": key }))
}

fn latency_figure(name: &'static str, count: u64, elapsed: Duration, mut ms: Vec<f64>) -> Figure {
    ms.sort_by(f64::total_cmp);
    Figure {
        name,
        ops_per_s: round(count as f64 / elapsed.as_secs_f64()),
        p50_ms: round(percentile(&ms, 0.50)),
        p99_ms: round(percentile(&ms, 0.99)),
    }
}

/// Waits until `applied` reaches `want` or `patience` passes.
async fn drain(applied: &AtomicU64, want: u64, patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    while applied.load(Ordering::SeqCst) < want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer applied {} of {want} messages",
            applied.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

pub(super) async fn outbox(args: &BenchArgs, database_url: &str) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(args.seconds);
    let connections = u32::try_from(args.clients + 8).unwrap_or(40);
    let db = Db::open(database_url, connections).await?;
    let nats = NatsBroker::connect(
        &args.nats_url,
        NatsConfig {
            max_age: Duration::from_secs(3600),
            ..NatsConfig::default()
        },
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", args.nats_url))?;
    let broker: Arc<dyn Broker> = Arc::new(nats);
    let origin = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();

    // Baseline: one client publishing straight to JetStream, each publish awaiting its ack.
    let baseline = {
        let topic = format!("benchdirect{}", &run[..8]);
        let client = async_nats::connect(&args.nats_url).await?;
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: format!("BENCH_{topic}"),
            subjects: vec![format!("bench.{topic}")],
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?;
        let payload = serde_json::to_vec(&json!({ "t": 0, "item": 1 }))?;
        let start = Instant::now();
        let mut ms = Vec::new();
        while start.elapsed() < duration {
            let t = Instant::now();
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone().into())
                .message_id(uuid::Uuid::now_v7().to_string());
            js.send_publish(format!("bench.{topic}"), publish).await?.await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let n = ms.len() as u64;
        latency_figure("direct JetStream publish", n, start.elapsed(), ms)
    };

    // Throughput: producers commit for the whole phase; the figure counts until the consumer
    // has applied every committed message.
    let topic = format!("bench{}", &run[..8]);
    let consumer = broker.subscribe(&topic, "bench").await?;
    let (stop_relay_tx, stop_relay) = watch::channel(false);
    let relay = db.spawn_relay(broker.clone(), stop_relay.clone());
    let applied = Arc::new(AtomicU64::new(0));
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let consuming = spawn_consumer(db.clone(), consumer, origin, applied.clone(), stop_consumer.clone());
    let produced = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let producers: Vec<_> = (0..args.clients)
        .map(|c| {
            let (db, topic, produced) = (db.clone(), topic.clone(), produced.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while start.elapsed() < duration {
                    let batch: Vec<BrokerMessage> = (0..PER_TX)
                        .map(|j| message(&topic, (c * PER_TX + i + j) % KEYS, origin))
                        .collect();
                    db.produce(&batch).await?;
                    produced.fetch_add(PER_TX as u64, Ordering::SeqCst);
                    i += PER_TX;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for p in producers {
        p.await??;
    }
    let produce_elapsed = start.elapsed();
    let total = produced.load(Ordering::SeqCst);
    drain(&applied, total, Duration::from_secs(120)).await?;
    let elapsed = start.elapsed();
    stop_consumer.store(true, Ordering::SeqCst);
    let latencies = consuming.await??;
    let ours = latency_figure("outbox→relay→NATS→inbox", total, elapsed, latencies);
    let outbox_bytes = db.outbox_bytes().await?;

    // Latency at a fixed rate: one message per transaction, paced.
    let rate = args.rate;
    let topic = format!("benchrate{}", &run[..8]);
    let consumer = broker.subscribe(&topic, "bench").await?;
    let applied = Arc::new(AtomicU64::new(0));
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let consuming = spawn_consumer(db.clone(), consumer, origin, applied.clone(), stop_consumer.clone());
    let count = (rate as f64 * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::new();
    let paced = Instant::now();
    for i in 0..count {
        let due = paced + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (db, topic) = (db.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            db.produce(&[message(&topic, usize::try_from(i).unwrap_or(0) % KEYS, origin)])
                .await?;
            anyhow::Ok(t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut commit_ms = Vec::with_capacity(tasks.len());
    for t in tasks {
        commit_ms.push(t.await??);
    }
    commit_ms.sort_by(f64::total_cmp);
    drain(&applied, count, Duration::from_secs(60)).await?;
    stop_consumer.store(true, Ordering::SeqCst);
    let fixed = latency_figure("at a fixed rate", count, paced.elapsed(), consuming.await??);
    let _ = stop_relay_tx.send(true);
    let _ = relay.await;

    // Pipeline capacity: a full outbox drained through relay, NATS and inbox, producers idle.
    let drain_figure = {
        let topic = format!("benchdrain{}", &run[..8]);
        let consumer = broker.subscribe(&topic, "bench").await?;
        let backlog = (count * 10).clamp(1, MAX_DRAIN);
        let messages: Vec<BrokerMessage> = (0..usize::try_from(backlog).unwrap_or(0))
            .map(|i| message(&topic, i % KEYS, origin))
            .collect();
        for chunk in messages.chunks(1000) {
            db.produce(chunk).await?;
        }
        let applied = Arc::new(AtomicU64::new(0));
        let stop_consumer = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let (stop_relay_tx, stop_relay) = watch::channel(false);
        let relay = db.spawn_relay(broker.clone(), stop_relay);
        let consuming = spawn_consumer(db.clone(), consumer, origin, applied.clone(), stop_consumer.clone());
        drain(&applied, backlog, Duration::from_secs(120)).await?;
        let elapsed = start.elapsed();
        stop_consumer.store(true, Ordering::SeqCst);
        consuming.await??;
        let _ = stop_relay_tx.send(true);
        let _ = relay.await;
        json!({ "messages": backlog, "seconds": round(elapsed.as_secs_f64()), "messages_per_s": round(backlog as f64 / elapsed.as_secs_f64()) })
    };

    let idempotency = idempotency_overhead(&db, duration).await?;

    Ok(Report {
        area: "outbox",
        backend: args.backend,
        clients: args.clients,
        seconds: args.seconds,
        ratio: ratio(&ours, &baseline),
        extra: json!({
            "messages": total,
            "producer_messages_per_s": round(total as f64 / produce_elapsed.as_secs_f64()),
            "messages_per_producer_tx": PER_TX,
            "keys": KEYS,
            "latency": "from just before the producer's commit to the consumer's commit of its effect",
            "fixed_rate": {
                "rate_per_s": rate, "messages": count, "p50_ms": fixed.p50_ms, "p99_ms": fixed.p99_ms,
                "producer_commit_p50_ms": round(percentile(&commit_ms, 0.5)),
                "producer_commit_p99_ms": round(percentile(&commit_ms, 0.99)),
            },
            "outbox_table_bytes_after": outbox_bytes,
            "broker": "NATS JetStream",
            "outbox": match args.backend { BenchBackend::Postgres => "PostgreSQL", BenchBackend::Sqlite => "SQLite" },
            "drain_full_outbox": drain_figure,
            "idempotency_layer": idempotency,
        }),
        ours,
        baseline,
    })
}

/// One client calling the same axum handler over HTTP, without and with the idempotency layer
/// (store in the bench's database), a fresh key per request.
async fn idempotency_overhead(db: &Db, duration: Duration) -> anyhow::Result<serde_json::Value> {
    use axum::Router;
    use axum::routing::post;
    async fn handler(body: String) -> axum::Json<serde_json::Value> {
        axum::Json(json!({ "ok": true, "len": body.len() }))
    }
    let store: Arc<dyn concord_core::ports::IdempotencyStore> = match db {
        Db::Postgres(pool, _) => Arc::new(idempotency::postgres::PostgresIdempotencyStore::new(pool.clone())),
        Db::Sqlite(pool, _) => Arc::new(idempotency::sqlite::SqliteIdempotencyStore::new(pool.clone())),
    };
    let layer = IdempotencyLayer::new(
        store,
        IdempotencyConfig::default().fingerprint_secret(b"bench".to_vec()),
    )?;
    let plain = Router::new().route("/orders", post(handler));
    let guarded = Router::new().route("/orders", post(handler)).layer(layer);
    let mut out = serde_json::Map::new();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let mut p50s = Vec::new();
    for (name, app) in [("without", plain), ("with", guarded)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/orders", listener.local_addr()?);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let phase = duration.div_f64(2.0).max(Duration::from_secs(1));
        let start = Instant::now();
        let mut ms = Vec::new();
        while start.elapsed() < phase {
            let t = Instant::now();
            let r = http
                .post(&url)
                .header("Idempotency-Key", uuid::Uuid::now_v7().to_string())
                .header("Authorization", "Bearer bench")
                .body(r#"{"item":"apple","qty":1}"#)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{name}: {}", r.status());
            r.bytes().await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        server.abort();
        ms.sort_by(f64::total_cmp);
        let p50 = percentile(&ms, 0.50);
        p50s.push(p50);
        out.insert(
            name.into(),
            json!({ "requests": ms.len(), "p50_ms": round(p50), "p99_ms": round(percentile(&ms, 0.99)) }),
        );
    }
    out.insert("added_p50_ms".into(), json!(round(p50s[1] - p50s[0])));
    Ok(serde_json::Value::Object(out))
}
