//! A stand-in for a third-party card provider, run as its own process with its own ledger. It
//! alone holds the `vault:detokenize:card` scope: it reveals the card behind a token to "charge"
//! it, keeps only the last four digits, and declines cards ending in `0002`. Like real providers
//! it deduplicates by `Idempotency-Key` and nothing else: a caller that sends a new key for a
//! retry is charged twice, which its ledger shows. A charge for an order whose refund was already
//! asked for is voided (a refund of nothing is recorded too, for that).
//!
//! A charge that names a `webhook_url` is asynchronous, as a card that asks for 3-D Secure is:
//! the provider answers 202 `pending`, authenticates the cardholder a moment later, decides the
//! charge then (a refund asked for meanwhile voids it), and posts the result to the webhook,
//! signed ([`crate::common::WEBHOOK_SIGNATURE`]), again and again until it is answered 2xx, a
//! restart included.

use std::sync::Arc;
use tracing::Instrument as _;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;
use sqlx::Row as _;

use crate::common::{Db, concord_client, internal, ok, problem};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger (
    idempotency_key TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    last4           TEXT NOT NULL,
    status          TEXT NOT NULL,
    -- An asynchronous charge: what its authentication will decide, where its result goes, and
    -- whether that was answered (0: not yet, 1: 2xx, 2: refused for good).
    verdict         TEXT,
    webhook_url     TEXT,
    delivered       BIGINT NOT NULL DEFAULT 0
)";

/// The status of an asynchronous charge until it is decided.
pub const PENDING: &str = "pending";

/// Cards ending so are declined.
pub const DECLINED_SUFFIX: &str = "0002";

#[derive(Debug, Clone, clap::Args)]
pub struct ProviderArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long)]
    pub database_url: String,
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    pub concord_url: String,
}

struct Provider {
    db: Db,
    concord: concord_sdk::Client,
    /// Posts the webhooks.
    http: reqwest::Client,
    /// Signs them.
    api_key: String,
    /// One write at a time: the ledger's refunds read what is left to refund.
    write: tokio::sync::Mutex<()>,
}

/// Runs the provider until `shutdown`. Its API key is `SHOP_PROVIDER_KEY`; its Concord key
/// (`SHOP_CONCORD_KEY`) may reveal cards.
///
/// # Errors
/// Startup failures.
pub async fn run(args: ProviderArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let db = Db::connect(&args.database_url).await?;
    db.execute_script(SCHEMA).await?;
    let key = std::env::var(crate::CONCORD_KEY_ENV).map_err(|_| anyhow::anyhow!("set {}", crate::CONCORD_KEY_ENV))?;
    let api_key = std::env::var(crate::payments::PROVIDER_KEY_ENV)
        .map_err(|_| anyhow::anyhow!("set {}", crate::payments::PROVIDER_KEY_ENV))?;
    let tls = concord_sdk::ClientTls::from_env();
    let state = Arc::new(Provider {
        db,
        concord: concord_client(&args.concord_url, &key, &tls)?,
        http: crate::common::http_client(std::time::Duration::from_secs(5), &tls)?,
        api_key: api_key.clone(),
        write: tokio::sync::Mutex::new(()),
    });
    // What a previous run left undecided or unannounced goes on now.
    let unfinished: Vec<String> = crate::with_db!(&state.db, |p| {
        sqlx::query_scalar("SELECT idempotency_key FROM ledger WHERE webhook_url IS NOT NULL AND delivered = 0")
            .fetch_all(p)
            .await?
    });
    for key in unfinished {
        tokio::spawn(finish_async(Arc::clone(&state), key));
    }
    let routes = Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/refunds", post(refund))
        .with_state(state);
    let router = crate::common::service_router(routes, Router::new(), api_key);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    crate::common::serve("provider", listener, router, shutdown).await
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 200)
        .map(str::to_owned)
}

fn key_missing() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "idempotency_key_missing",
        "Idempotency-Key of 1 to 200 bytes is required",
    )
}

#[derive(Deserialize)]
struct Charge {
    order_id: String,
    amount: i64,
    card_token: String,
    /// Makes the charge asynchronous: its result is posted here.
    #[serde(default)]
    webhook_url: Option<String>,
}

async fn stored(db: &Db, key: &str) -> Result<Option<(String, i64)>, sqlx::Error> {
    crate::with_db!(db, |p| {
        sqlx::query("SELECT status, amount FROM ledger WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(p)
            .await?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
    })
}

async fn insert(
    db: &Db,
    key: &str,
    order_id: &str,
    kind: &str,
    amount: i64,
    last4: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    crate::with_db!(db, |p| {
        sqlx::query(
            "INSERT INTO ledger (idempotency_key, order_id, kind, amount, last4, status) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(order_id)
        .bind(kind)
        .bind(amount)
        .bind(last4)
        .bind(status)
        .execute(p)
        .await
        .map(drop)
    })
}

fn charge_answer(key: &str, status: &str, amount: i64) -> Response {
    if status == "declined" {
        problem(StatusCode::PAYMENT_REQUIRED, "card_declined", "the card was declined")
    } else if status == PENDING {
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "charge_id": key, "status": status, "amount": amount })),
        )
            .into_response()
    } else if status == "voided" {
        problem(
            StatusCode::CONFLICT,
            "charge_voided",
            "the order was refunded before this charge",
        )
    } else {
        ok(json!({ "charge_id": key, "status": status, "amount": amount }))
    }
}

/// Runs a handler body in a task of its own, so a caller that hangs up cannot cut it off between
/// two writes.
async fn detached<F>(work: F) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    tokio::spawn(work.in_current_span())
        .await
        .unwrap_or_else(|e| internal("the handler failed", &e))
}

async fn charge(State(s): State<Arc<Provider>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    detached(charge_inner(s, headers, body)).await
}

async fn charge_inner(s: Arc<Provider>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(key) = idempotency_key(&headers) else {
        return key_missing();
    };
    let Ok(cmd) = serde_json::from_slice::<Charge>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_charge",
            "the body is {order_id, amount, card_token}",
        );
    };
    match stored(&s.db, &key).await {
        Ok(Some((status, amount))) => return charge_answer(&key, &status, amount),
        Ok(None) => {}
        Err(e) => return internal("the ledger failed", &e),
    }
    let card = match s.concord.detokenize(std::slice::from_ref(&cmd.card_token), false).await {
        Ok(mut items) => match items.pop().and_then(|i| i.value) {
            Some(card) => card,
            None => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_card",
                    "the token reveals no card",
                );
            }
        },
        Err(e) => return internal("the vault failed", &e),
    };
    let last4: String = card
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let status = if card.ends_with(DECLINED_SUFFIX) {
        "declined"
    } else {
        "captured"
    };
    drop(card);
    if let Some(webhook) = &cmd.webhook_url {
        return charge_async(s, &key, &cmd, &last4, status, webhook).await;
    }
    let _write = s.write.lock().await;
    // A charge arriving after the order's refund was asked for is voided, not captured: the
    // refund (perhaps of nothing, then) has already answered.
    let refunded: Result<i64, sqlx::Error> = crate::with_db!(&s.db, |p| {
        sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger WHERE order_id = $1 AND kind = 'refund'")
            .bind(&cmd.order_id)
            .fetch_one(p)
            .await
    });
    let status = match refunded {
        Ok(0) => status,
        Ok(_) => "voided",
        Err(e) => return internal("the ledger failed", &e),
    };
    if let Err(e) = insert(&s.db, &key, &cmd.order_id, "charge", cmd.amount, &last4, status).await {
        return internal("the ledger failed", &e);
    }
    match stored(&s.db, &key).await {
        Ok(Some((status, amount))) => charge_answer(&key, &status, amount),
        Ok(None) => internal("the ledger failed", &"the charge vanished"),
        Err(e) => internal("the ledger failed", &e),
    }
}

/// Records an asynchronous charge as pending, answers 202, and decides and announces it in a
/// task of its own.
async fn charge_async(
    s: Arc<Provider>,
    key: &str,
    cmd: &Charge,
    last4: &str,
    verdict: &str,
    webhook: &str,
) -> Response {
    if !(webhook.starts_with("http://") || webhook.starts_with("https://")) || webhook.len() > 2_000 {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_webhook",
            "webhook_url is an http(s) URL",
        );
    }
    let inserted = crate::with_db!(&s.db, |p| {
        sqlx::query(
            "INSERT INTO ledger (idempotency_key, order_id, kind, amount, last4, status, verdict, webhook_url) \
             VALUES ($1, $2, 'charge', $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(&cmd.order_id)
        .bind(cmd.amount)
        .bind(last4)
        .bind(PENDING)
        .bind(verdict)
        .bind(webhook)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
    });
    match inserted {
        Ok(1) => {
            tokio::spawn(finish_async(Arc::clone(&s), key.to_owned()).in_current_span());
        }
        Ok(_) => {}
        Err(e) => return internal("the ledger failed", &e),
    }
    match stored(&s.db, key).await {
        Ok(Some((status, amount))) => charge_answer(key, &status, amount),
        Ok(None) => internal("the ledger failed", &"the charge vanished"),
        Err(e) => internal("the ledger failed", &e),
    }
}

/// Authenticates a pending charge (a short pause stands for the cardholder's 3-D Secure step),
/// decides it, and posts the result to its webhook until that is answered 2xx.
async fn finish_async(s: Arc<Provider>, key: String) {
    let pause = rand::random_range(20..200);
    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match decide_and_announce(&s, &key).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, charge = key, "the webhook is not delivered yet; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
    }
}

async fn decide_and_announce(s: &Provider, key: &str) -> anyhow::Result<()> {
    type Row = (String, i64, String, Option<String>, Option<String>);
    let row: Option<Row> = crate::with_db!(&s.db, |p| {
        sqlx::query_as("SELECT order_id, amount, status, verdict, webhook_url FROM ledger WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(p)
            .await?
    });
    let Some((order_id, amount, mut status, verdict, Some(webhook))) = row else {
        return Ok(());
    };
    if status == PENDING {
        let _write = s.write.lock().await;
        let refunded: i64 = crate::with_db!(&s.db, |p| {
            sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger WHERE order_id = $1 AND kind = 'refund'")
                .bind(&order_id)
                .fetch_one(p)
                .await?
        });
        let decided = if refunded > 0 {
            "voided".to_owned()
        } else {
            verdict.unwrap_or_else(|| "declined".into())
        };
        crate::with_db!(&s.db, |p| {
            sqlx::query("UPDATE ledger SET status = $2 WHERE idempotency_key = $1 AND status = $3")
                .bind(key)
                .bind(&decided)
                .bind(PENDING)
                .execute(p)
                .await
                .map(drop)?;
        });
        status = decided;
    }
    let body = serde_json::to_vec(&json!({
        "charge_id": key,
        "order_id": order_id,
        "status": status,
        "amount": amount,
    }))?;
    let mut request = s
        .http
        .post(&webhook)
        .header("content-type", "application/json")
        .header(
            crate::common::WEBHOOK_SIGNATURE,
            crate::common::sign_webhook(&s.api_key, &body),
        )
        .body(body);
    if let Some(tp) = concord_sdk::trace::traceparent() {
        request = request.header("traceparent", tp);
    }
    let answer = request.send().await.map_err(|e| anyhow::anyhow!(e.without_url()))?;
    let status = answer.status();
    // A refusal that no retry changes (a bad signature, a body it does not read) ends the
    // deliveries, kept as refused (2), as a real provider's dashboard would show it.
    let permanent = status.is_client_error() && !matches!(status.as_u16(), 408 | 409 | 425 | 429);
    if permanent {
        tracing::error!(charge = key, %status, "the webhook was refused for good");
    } else {
        anyhow::ensure!(status.is_success(), "the webhook answered {status}");
    }
    crate::with_db!(&s.db, |p| {
        sqlx::query("UPDATE ledger SET delivered = $2 WHERE idempotency_key = $1")
            .bind(key)
            .bind(if permanent { 2_i64 } else { 1 })
            .execute(p)
            .await
            .map(drop)?;
    });
    Ok(())
}

#[derive(Deserialize)]
struct Refund {
    order_id: String,
}

/// Refunds what the order has captured and not yet refunded.
async fn refund(State(s): State<Arc<Provider>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    detached(refund_inner(s, headers, body)).await
}

async fn refund_inner(s: Arc<Provider>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(key) = idempotency_key(&headers) else {
        return key_missing();
    };
    let Ok(cmd) = serde_json::from_slice::<Refund>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "invalid_refund", "the body is {order_id}");
    };
    let _write = s.write.lock().await;
    match stored(&s.db, &key).await {
        Ok(Some((_, amount))) => return ok(json!({ "refunded": amount })),
        Ok(None) => {}
        Err(e) => return internal("the ledger failed", &e),
    }
    let open: Result<i64, sqlx::Error> = crate::with_db!(&s.db, |p| {
        sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'charge' AND status = 'captured' THEN amount \
             WHEN kind = 'refund' THEN -amount ELSE 0 END), 0) AS BIGINT) FROM ledger WHERE order_id = $1",
        )
        .bind(&cmd.order_id)
        .fetch_one(p)
        .await
    });
    let open = match open {
        Ok(v) => v,
        Err(e) => return internal("the ledger failed", &e),
    };
    // Recorded even when nothing is open: the record voids a charge that arrives later.
    if let Err(e) = insert(&s.db, &key, &cmd.order_id, "refund", open.max(0), "", "refunded").await {
        return internal("the ledger failed", &e);
    }
    ok(json!({ "refunded": open.max(0) }))
}
