//! `concord bench vault`: tokenize and detokenize over HTTP, one item per request and batches of
//! 100, against AES-GCM plus the same rows written or read straight to the vault's database.

use super::{BenchArgs, BenchServer, RawInserts, Report, figure, ratio, round, run_clients};
use concord_api::vault::TokenizeItemIn;
use concord_core::domain::vault::SecretKey;
use concord_sdk::Client;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 100;
const CARD: &str = "4242424242424242";

fn card_items(n: usize) -> Vec<TokenizeItemIn> {
    (0..n)
        .map(|_| TokenizeItemIn {
            kind: "card".into(),
            value: CARD.into(),
            format: None,
            convergent: None,
            subject: None,
            ttl_s: None,
            metadata: None,
        })
        .collect()
}

pub(super) async fn vault(args: &BenchArgs, database_url: &str) -> anyhow::Result<Report> {
    let server = BenchServer::start(args, database_url).await?;
    let vault_url = server.vault_url.clone();
    let duration = Duration::from_secs(args.seconds);
    let clients = args.clients;
    let tokenizer = server.client.clone();
    let revealer_key = server
        .client
        .create_key("bench-revealer", &["vault:detokenize:card"])
        .await?
        .key;
    let revealer = Client::with_http(server.address.clone(), revealer_key, server.http.clone());

    let tokenize = |client: Client, n: usize, pool: Option<Arc<std::sync::Mutex<Vec<String>>>>| {
        let items = Arc::new(card_items(n));
        move |_c: usize, _i: usize| {
            let (client, items, pool) = (client.clone(), items.clone(), pool.clone());
            async move {
                let tokens = client.tokenize(&items).await?;
                anyhow::ensure!(
                    tokens.len() == items.len(),
                    "{} tokens for {} items",
                    tokens.len(),
                    items.len()
                );
                if let Some(pool) = pool {
                    let mut p = pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if p.len() < 100_000 {
                        p.extend(tokens);
                    }
                }
                Ok(())
            }
        }
    };
    let issued = Arc::new(std::sync::Mutex::new(Vec::new()));
    eprintln!(
        "bench: {clients} clients tokenize 1 card per request for {}s ...",
        args.seconds
    );
    let single = run_clients(clients, duration, tokenize(tokenizer.clone(), 1, Some(issued.clone()))).await?;
    eprintln!(
        "bench: {clients} clients tokenize batches of {BATCH} for {}s ...",
        args.seconds
    );
    let batch = run_clients(clients, duration, tokenize(tokenizer.clone(), BATCH, None)).await?;

    let tokens: Arc<Vec<String>> = Arc::new(std::mem::take(
        &mut *issued.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
    ));
    anyhow::ensure!(tokens.len() >= BATCH, "too few tokens issued to detokenize");
    let detokenize = |client: Client, n: usize, tokens: Arc<Vec<String>>| {
        move |c: usize, i: usize| {
            let (client, tokens) = (client.clone(), tokens.clone());
            async move {
                let asked = &tokens[pick(&tokens, c, i, n)];
                let items = client.detokenize(asked, false).await?;
                anyhow::ensure!(
                    items.iter().all(|it| it.value.as_deref() == Some(CARD)),
                    "a token did not reveal its card"
                );
                Ok(())
            }
        }
    };
    eprintln!(
        "bench: {clients} clients detokenize 1 token per request for {}s ...",
        args.seconds
    );
    let before = batch_sums();
    let reveal_single = run_clients(clients, duration, detokenize(revealer.clone(), 1, tokens.clone())).await?;
    let reveal_single_batches = batch_delta(&before, &batch_sums());
    eprintln!(
        "bench: {clients} clients detokenize batches of {BATCH} for {}s ...",
        args.seconds
    );
    let reveal_batch = run_clients(clients, duration, detokenize(revealer.clone(), BATCH, tokens.clone())).await?;
    server.stop().await;

    eprintln!("bench: the baselines, straight to the vault's database ...");
    let raw = RawVault::open(&vault_url, clients).await?;
    let r = raw.clone();
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = written.clone();
    let raw_single = run_clients(clients, duration, move |c, i| {
        let (r, w) = (r.clone(), w.clone());
        async move {
            let tokens = r.insert(c, i, 1).await?;
            let mut w = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if w.len() < 100_000 {
                w.extend(tokens);
            }
            Ok(())
        }
    })
    .await?;
    let r = raw.clone();
    let raw_batch = run_clients(clients, duration, move |c, i| {
        let r = r.clone();
        async move { r.insert(c, i, BATCH).await.map(|_| ()) }
    })
    .await?;
    let written: Arc<Vec<String>> = Arc::new(std::mem::take(
        &mut *written.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
    ));
    anyhow::ensure!(written.len() >= BATCH, "too few baseline rows written to read");
    let (r, w) = (raw.clone(), written.clone());
    let raw_read_single = run_clients(clients, duration, move |c, i| {
        let (r, w) = (r.clone(), w.clone());
        async move { r.read(&w[pick(&w, c, i, 1)]).await }
    })
    .await?;
    let (r, w) = (raw.clone(), written.clone());
    let raw_read_batch = run_clients(clients, duration, move |c, i| {
        let (r, w) = (r.clone(), w.clone());
        async move { r.read(&w[pick(&w, c, i, BATCH)]).await }
    })
    .await?;
    raw.close().await;

    let ours = figure("tokenize 1 via HTTP", &single, duration);
    let baseline = figure("AES-GCM + 1-row INSERT", &raw_single, duration);
    let ratio = ratio(&ours, &baseline);
    let per = |name, lat: &[Duration], n: usize| {
        let f = figure(name, lat, duration);
        json!({"requests_per_s": f.ops_per_s, "items_per_s": round(f.ops_per_s * n as f64),
               "p50_ms": f.p50_ms, "p99_ms": f.p99_ms})
    };
    let extra = json!({
        "tokenize_batch_100": per("tokenize 100", &batch, BATCH),
        "tokenize_batch_100_baseline": per("AES-GCM + 100-row INSERT transaction", &raw_batch, BATCH),
        "detokenize_1": per("detokenize 1", &reveal_single, 1),
        "detokenize_1_baseline": per("SELECT 1 row + AES-GCM", &raw_read_single, 1),
        "detokenize_batch_100": per("detokenize 100", &reveal_batch, BATCH),
        "detokenize_batch_100_baseline": per("SELECT 100 rows + AES-GCM", &raw_read_batch, BATCH),
        "batches_whole_run": batch_delta(&std::collections::HashMap::new(), &batch_sums()),
        "batches_detokenize_1": reveal_single_batches,
        "vault_database": if vault_url.starts_with("sqlite") { "sqlite" } else { "postgres" },
        "notes": "the detokenize rate limit is off for this run; every detokenize is audited in the event store as usual",
    });
    Ok(Report {
        area: "vault",
        backend: args.backend,
        clients,
        seconds: args.seconds,
        ours,
        baseline,
        ratio,
        extra,
    })
}

/// Per shared-write queue: (batches, items, write seconds) so far, from this process's metrics.
fn batch_sums() -> std::collections::HashMap<&'static str, [f64; 3]> {
    let text = concord_server::telemetry::metrics_handle().render();
    let value = |name: &str, queue: &str| {
        let prefix = format!("{name}{{queue=\"{queue}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    ["vault_tokens", "vault_audit", "appends"]
        .into_iter()
        .map(|q| {
            (
                q,
                [
                    value("concord_batch_items_count", q),
                    value("concord_batch_items_sum", q),
                    value("concord_batch_seconds_sum", q),
                ],
            )
        })
        .collect()
}

/// Average items and write time of each queue between two [`batch_sums`].
fn batch_delta(
    before: &std::collections::HashMap<&'static str, [f64; 3]>,
    after: &std::collections::HashMap<&'static str, [f64; 3]>,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (queue, a) in after {
        let b = before.get(queue).copied().unwrap_or([0.0; 3]);
        let n = a[0] - b[0];
        if n > 0.0 {
            out.insert(
                (*queue).into(),
                json!({"batches": n, "avg_items": round((a[1] - b[1]) / n), "avg_write_ms": round((a[2] - b[2]) / n * 1000.0)}),
            );
        }
    }
    serde_json::Value::Object(out)
}

/// A slice of `n` of `all` for client `c`'s request `i`, spread over the whole set.
fn pick(all: &[String], c: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let start = (c * 7919 + i * 104_729) % (all.len() - n + 1);
    start..start + n
}

/// The baseline: AES-256-GCM of the value, then one INSERT transaction of rows the size of a
/// token record (or one SELECT of them, then decryption), straight to the vault's database.
#[derive(Clone)]
struct RawVault {
    db: RawInserts,
    key: SecretKey,
}

impl RawVault {
    async fn open(url: &str, clients: usize) -> anyhow::Result<Self> {
        let db = RawInserts::connect(url, clients).await?;
        db.execute(
            "CREATE TABLE IF NOT EXISTS bench_vault_raw (token TEXT PRIMARY KEY, kind TEXT NOT NULL, \
             nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS bench_vault_raw (token TEXT PRIMARY KEY, kind TEXT NOT NULL, \
             nonce BYTEA NOT NULL, ciphertext BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL)",
        )
        .await?;
        Ok(Self {
            db,
            key: SecretKey::generate()?,
        })
    }

    fn row(&self, c: usize, i: usize, k: usize) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
        let token = format!("tok_raw_{c}_{i}_{k}_{}", uuid::Uuid::new_v4().simple());
        let sealed = self.key.seal(CARD.as_bytes(), token.as_bytes())?;
        Ok((token, sealed.nonce.to_vec(), sealed.ciphertext))
    }

    async fn insert(&self, c: usize, i: usize, n: usize) -> anyhow::Result<Vec<String>> {
        let rows = (0..n).map(|k| self.row(c, i, k)).collect::<anyhow::Result<Vec<_>>>()?;
        let written = rows.iter().map(|r| r.0.clone()).collect();
        match &self.db {
            RawInserts::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                for (token, nonce, ct) in &rows {
                    sqlx::query("INSERT INTO bench_vault_raw VALUES (?, 'card', ?, ?, ?)")
                        .bind(token)
                        .bind(nonce)
                        .bind(ct)
                        .bind(chrono::Utc::now().timestamp_micros())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            RawInserts::Postgres(pool) => {
                let (tokens, nonces, cts): (Vec<_>, Vec<_>, Vec<_>) = rows.into_iter().fold(
                    (Vec::new(), Vec::new(), Vec::new()),
                    |(mut a, mut b, mut c), (t, n, ct)| {
                        a.push(t);
                        b.push(n);
                        c.push(ct);
                        (a, b, c)
                    },
                );
                sqlx::query(
                    "INSERT INTO bench_vault_raw SELECT t, 'card', n, c, now() \
                     FROM UNNEST($1::text[], $2::bytea[], $3::bytea[]) AS u(t, n, c)",
                )
                .bind(tokens)
                .bind(nonces)
                .bind(cts)
                .execute(pool)
                .await?;
            }
        }
        Ok(written)
    }

    async fn read(&self, tokens: &[String]) -> anyhow::Result<()> {
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = match &self.db {
            RawInserts::Sqlite(p) => sqlx::query_as(
                "SELECT token, nonce, ciphertext FROM bench_vault_raw WHERE token IN (SELECT value FROM json_each(?))",
            )
            .bind(serde_json::to_string(tokens)?)
            .fetch_all(p)
            .await?,
            RawInserts::Postgres(p) => {
                sqlx::query_as("SELECT token, nonce, ciphertext FROM bench_vault_raw WHERE token = ANY($1)")
                    .bind(tokens)
                    .fetch_all(p)
                    .await?
            }
        };
        anyhow::ensure!(rows.len() == tokens.len(), "the baseline lost rows");
        for (token, nonce, ct) in rows {
            let sealed = concord_core::domain::vault::Sealed::from_parts(&nonce, ct)?;
            let plain = self.key.open(&sealed, token.as_bytes())?;
            anyhow::ensure!(plain.as_slice() == CARD.as_bytes(), "the baseline decrypted garbage");
        }
        Ok(())
    }

    async fn close(&self) {
        self.db.close().await;
    }
}
