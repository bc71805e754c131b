//! The payments service's HTTP face: the `charge` step and the `refund` compensation, and the
//! card provider's webhook, by which an asynchronous charge (3-D Secure) completes its step.

use std::sync::Arc;
use tracing::Instrument as _;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use concord_sdk::ErrorCode;
use concord_sdk::api::sagas::{CompletionIn, CompletionOutcome};
use concord_sdk::barrier::{BarrierKey, BarrierOp};
use serde::Deserialize;
use serde_json::json;

use super::provider_client::{Charged, ProviderClient};
use super::store::{self, Gate, PendingCharge};
use crate::common::{Db, Faults, internal, ok, problem, saga_call, saga_call_seeing};

pub struct Payments {
    pub db: Db,
    pub provider: ProviderClient,
    pub faults: Faults,
    pub unsafe_skip_barrier: bool,
    /// Where the provider reaches this service: its webhook is `{public_url}/webhooks/provider`.
    pub public_url: String,
    /// The key the provider signs its webhooks with.
    pub webhook_key: String,
    /// Posts results to the saga steps' completion URLs.
    pub http: reqwest::Client,
}

pub fn router(state: Arc<Payments>, token: String) -> Router {
    crate::common::service_router(
        Router::new()
            .route("/charges", post(charge))
            .route("/charges/{order_id}/refund", post(refund))
            .with_state(Arc::clone(&state)),
        // Signed by the provider, not called with the shop's token.
        Router::new()
            .route("/webhooks/provider", post(provider_webhook))
            .with_state(state),
        token,
    )
}

#[derive(Debug, Deserialize)]
struct Charge {
    order_id: String,
    amount: i64,
    card_token: String,
}

macro_rules! on_db {
    ($db:expr, $f:ident($($arg:expr),*)) => {
        match $db {
            Db::Sqlite(p) => store::on_sqlite::$f(p, $($arg),*).await,
            Db::Pg(p) => store::on_pg::$f(p, $($arg),*).await,
        }
    };
}

/// Charges once per order: the barrier is checked before the provider is called (a charge
/// arriving after its refund is refused without touching the card), the provider is called
/// with the order's own idempotency key, and the barrier is entered for good after it. A refund
/// that slipped in between is caught there, and the fresh charge is given back at once.
///
/// A call that carries a completion URL (the step is asynchronous) asks the provider for an
/// asynchronous charge: when the provider answers `pending`, so does this (202), and the
/// provider's webhook completes the step later.
async fn charge(State(state): State<Arc<Payments>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let task = Arc::clone(&state);
    let callback = headers
        .get(concord_sdk::CALLBACK_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|url| (url.to_owned(), state.faults.completion_lost(&headers)));
    saga_call_seeing(&state.faults, &headers, BarrierOp::Action, |key, late| async move {
        let Ok(cmd) = serde_json::from_slice::<Charge>(&body) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_charge",
                "the body is {order_id, amount, card_token}",
            );
        };
        if cmd.amount <= 0 {
            return problem(StatusCode::BAD_REQUEST, "invalid_charge", "the amount is positive");
        }
        // In a task of its own: an orchestrator that times out and hangs up must not cut the
        // charge off between the provider's answer and its record.
        // A late answer comes with a late webhook: the step times out and is called again, as
        // when a provider is slow, rather than completed through its URL meanwhile.
        let hold_until = late.map_or(0, |late| {
            chrono::Utc::now().timestamp_millis() + i64::try_from(late.as_millis()).unwrap_or(i64::MAX / 2) + 500
        });
        let callback = callback.map(|(url, lost)| (url, lost, hold_until));
        tokio::spawn(async move { charge_once(&task, key, &cmd, callback).await }.in_current_span())
            .await
            .unwrap_or_else(|e| internal("the charge failed", &e))
    })
    .await
}

async fn charge_once(s: &Payments, key: BarrierKey, cmd: &Charge, callback: Option<(String, bool, i64)>) -> Response {
    let pending = callback.map(|(callback_url, lost, hold_until)| PendingCharge {
        order_id: cmd.order_id.clone(),
        saga_id: key.saga_id().to_string(),
        step: key.step().to_owned(),
        amount: cmd.amount,
        card_token: cmd.card_token.clone(),
        callback_url,
        lost,
        hold_until,
    });
    let key = (!s.unsafe_skip_barrier).then_some(key);
    if let Some(key) = &key {
        match on_db!(&s.db, peek(key)) {
            Ok(Gate::Open) => {}
            Ok(Gate::Done(output)) => return ok(output),
            Ok(Gate::Refused) => {
                return problem(StatusCode::CONFLICT, "already_compensated", "the charge was refunded");
            }
            Err(e) => return internal("the barrier failed", &e),
        }
    }
    // Kept before the provider is asked, so its webhook always finds where the result goes.
    if let Some(p) = &pending
        && let Err(e) = on_db!(&s.db, save_pending(p))
    {
        return internal("keeping the charge failed", &e);
    }
    let provider_key = if s.unsafe_skip_barrier {
        uuid::Uuid::new_v4().to_string()
    } else {
        format!("charge-{}", cmd.order_id)
    };
    let webhook = pending
        .as_ref()
        .map(|_| format!("{}/webhooks/provider", s.public_url.trim_end_matches('/')));
    let charge_id = match s
        .provider
        .charge(
            &provider_key,
            &cmd.order_id,
            cmd.amount,
            &cmd.card_token,
            webhook.as_deref(),
        )
        .await
    {
        Ok(Charged::Captured { charge_id }) => charge_id,
        Ok(Charged::Pending) => {
            return (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "order_id": cmd.order_id, "status": "pending" })),
            )
                .into_response();
        }
        Ok(Charged::Declined) => return problem(StatusCode::CONFLICT, "card_declined", "the card was declined"),
        Ok(Charged::Voided) => {
            return problem(StatusCode::CONFLICT, "already_compensated", "the charge was refunded");
        }
        Err(e) => return internal("the provider failed", &e),
    };
    match record(s, key.as_ref(), &cmd.order_id, cmd.amount, &cmd.card_token, &charge_id).await {
        Ok(Recorded::Charged(output)) => ok(output),
        Ok(Recorded::Refunded) => problem(StatusCode::CONFLICT, "already_compensated", "the charge was refunded"),
        Err(r) => r,
    }
}

/// What recording a captured charge came to.
enum Recorded {
    /// The step's output.
    Charged(serde_json::Value),
    /// The step was compensated while the provider charged: the money went back at once.
    Refunded,
}

/// Records a charge the provider captured, behind the barrier; one the saga compensated
/// meanwhile is given back at once.
async fn record(
    s: &Payments,
    key: Option<&BarrierKey>,
    order_id: &str,
    amount: i64,
    card_token: &str,
    charge_id: &str,
) -> Result<Recorded, Response> {
    match on_db!(&s.db, record_charge(key, order_id, amount, card_token, charge_id)) {
        Ok(Gate::Done(output)) => Ok(Recorded::Charged(output)),
        Ok(Gate::Open) => Ok(Recorded::Charged(
            json!({ "order_id": order_id, "charge_id": charge_id, "amount": amount }),
        )),
        Ok(Gate::Refused) => {
            // Refunded while the provider was charging: give the money back now.
            if let Err(e) = s.provider.refund(&format!("refund-{order_id}"), order_id).await {
                return Err(internal("the provider failed", &e));
            }
            Ok(Recorded::Refunded)
        }
        Err(e) => Err(internal("recording the charge failed", &e)),
    }
}

/// The provider's webhook: the result of an asynchronous charge.
#[derive(Debug, Deserialize)]
struct ChargeDecided {
    charge_id: String,
    order_id: String,
    /// `captured`, `declined` or `voided`.
    status: String,
}

/// Takes the provider's result of an asynchronous charge, records it like a synchronous one,
/// and posts it to the step's completion URL. Answers 2xx only when that is done (or can never
/// be), so the provider sends it again after any failure here, a crash included.
async fn provider_webhook(State(s): State<Arc<Payments>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let signature = headers
        .get(crate::common::WEBHOOK_SIGNATURE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !crate::common::webhook_signed(&s.webhook_key, &body, signature) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the webhook is not signed by the provider",
        );
    }
    let Ok(decided) = serde_json::from_slice::<ChargeDecided>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_webhook",
            "the body is {charge_id, order_id, status}",
        );
    };
    let task = Arc::clone(&s);
    tokio::spawn(async move { complete_step(&task, decided).await }.in_current_span())
        .await
        .unwrap_or_else(|e| internal("the webhook failed", &e))
}

async fn complete_step(s: &Payments, decided: ChargeDecided) -> Response {
    let pending = match on_db!(&s.db, pending(&decided.order_id)) {
        Ok(Some(p)) => p,
        // Charged synchronously, or not by this service: nothing waits for it.
        Ok(None) => return ok(json!({ "order_id": decided.order_id, "taken": false })),
        Err(e) => return internal("reading the charge failed", &e),
    };
    if chrono::Utc::now().timestamp_millis() < pending.hold_until {
        // The fault: the webhook is not taken yet; the provider sends it again later.
        return problem(StatusCode::SERVICE_UNAVAILABLE, "injected_fault", "webhook held back");
    }
    let key = match BarrierKey::new(pending.saga_id.clone(), pending.step.clone(), BarrierOp::Action) {
        Ok(k) => k,
        Err(e) => return internal("the charge's saga step is not valid", &e),
    };
    let key = (!s.unsafe_skip_barrier).then_some(key);
    let refused = |error: &str| CompletionIn {
        outcome: CompletionOutcome::Refused,
        output: None,
        error: Some(error.to_owned()),
    };
    let completion = match decided.status.as_str() {
        "captured" => match record(
            s,
            key.as_ref(),
            &pending.order_id,
            pending.amount,
            &pending.card_token,
            &decided.charge_id,
        )
        .await
        {
            Ok(Recorded::Charged(output)) => CompletionIn {
                outcome: CompletionOutcome::Succeeded,
                output: Some(output),
                error: None,
            },
            Ok(Recorded::Refunded) => refused("already_compensated: the charge was refunded"),
            Err(r) => return r,
        },
        "declined" => refused("card_declined: the card was declined"),
        "voided" => refused("already_compensated: the order was refunded before this charge"),
        _ => return problem(StatusCode::BAD_REQUEST, "invalid_webhook", "unknown charge status"),
    };
    if pending.lost {
        tracing::info!(order_id = %pending.order_id, "fault injected: completion lost");
        return ok(json!({ "order_id": pending.order_id, "taken": false }));
    }
    // A later attempt of the step may have replaced the URL while this was on its way.
    let mut url = pending.callback_url;
    for _ in 0..3 {
        match concord_sdk::complete_action(&s.http, &url, &completion).await {
            Ok(_) => {
                if let Err(e) = on_db!(&s.db, mark_completed(&pending.order_id, &url)) {
                    return internal("recording the completion failed", &e);
                }
                return ok(json!({ "order_id": pending.order_id, "taken": true }));
            }
            Err(e) if e.code() == Some(ErrorCode::CallbackNotExpected) => {
                match on_db!(&s.db, pending(&pending.order_id)) {
                    Ok(Some(now)) if now.callback_url != url => url = now.callback_url,
                    Ok(_) => break,
                    Err(e) => return internal("reading the charge failed", &e),
                }
            }
            // Another result stands, or the URL is past its time: the saga has moved on (an
            // uncertain step is refunded by its compensation).
            Err(e)
                if matches!(
                    e.code(),
                    Some(ErrorCode::CallbackAlreadyUsed | ErrorCode::CallbackInvalid)
                ) =>
            {
                break;
            }
            Err(e) => return internal("completing the saga step failed", &e),
        }
    }
    ok(json!({ "order_id": pending.order_id, "taken": false }))
}

/// Refunds whatever the order has captured at the provider. The barrier row comes first, so a
/// charge still on its way is refused (or refunds itself, above).
async fn refund(State(state): State<Arc<Payments>>, headers: HeaderMap, Path(order_id): Path<String>) -> Response {
    let task = Arc::clone(&state);
    saga_call(&state.faults, &headers, BarrierOp::Compensation, |key| async move {
        tokio::spawn(async move { refund_once(&task, key, order_id).await }.in_current_span())
            .await
            .unwrap_or_else(|e| internal("the refund failed", &e))
    })
    .await
}

async fn refund_once(s: &Payments, key: BarrierKey, order_id: String) -> Response {
    if !s.unsafe_skip_barrier
        && let Err(e) = on_db!(&s.db, enter_refund(&key))
    {
        return internal("the barrier failed", &e);
    }
    let refunded = match s.provider.refund(&format!("refund-{order_id}"), &order_id).await {
        Ok(r) => r,
        Err(e) => return internal("the provider failed", &e),
    };
    if let Err(e) = on_db!(&s.db, mark_refunded(&order_id)) {
        return internal("recording the refund failed", &e);
    }
    ok(json!({ "order_id": order_id, "refunded": refunded }))
}
