//! The payments service's HTTP face: the `charge` step and the `refund` compensation.

use std::sync::Arc;
use tracing::Instrument as _;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use concord_sdk::barrier::{BarrierKey, BarrierOp};
use serde::Deserialize;
use serde_json::json;

use super::provider_client::{Charged, ProviderClient};
use super::store::{self, Gate};
use crate::common::{Db, Faults, internal, ok, problem, saga_call};

pub struct Payments {
    pub db: Db,
    pub provider: ProviderClient,
    pub faults: Faults,
    pub unsafe_skip_barrier: bool,
}

pub fn router(state: Arc<Payments>, token: String) -> Router {
    crate::common::service_router(
        Router::new()
            .route("/charges", post(charge))
            .route("/charges/{order_id}/refund", post(refund))
            .with_state(state),
        Router::new(),
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
async fn charge(State(state): State<Arc<Payments>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let task = Arc::clone(&state);
    saga_call(&state.faults, &headers, BarrierOp::Action, |key| async move {
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
        tokio::spawn(async move { charge_once(&task, key, &cmd).await }.in_current_span())
            .await
            .unwrap_or_else(|e| internal("the charge failed", &e))
    })
    .await
}

async fn charge_once(s: &Payments, key: BarrierKey, cmd: &Charge) -> Response {
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
    let provider_key = if s.unsafe_skip_barrier {
        uuid::Uuid::new_v4().to_string()
    } else {
        format!("charge-{}", cmd.order_id)
    };
    let charge_id = match s
        .provider
        .charge(&provider_key, &cmd.order_id, cmd.amount, &cmd.card_token)
        .await
    {
        Ok(Charged::Captured { charge_id }) => charge_id,
        Ok(Charged::Declined) => return problem(StatusCode::CONFLICT, "card_declined", "the card was declined"),
        Ok(Charged::Voided) => {
            return problem(StatusCode::CONFLICT, "already_compensated", "the charge was refunded");
        }
        Err(e) => return internal("the provider failed", &e),
    };
    let recorded = on_db!(
        &s.db,
        record_charge(key.as_ref(), &cmd.order_id, cmd.amount, &cmd.card_token, &charge_id)
    );
    match recorded {
        Ok(Gate::Done(output)) => ok(output),
        Ok(Gate::Open) => ok(json!({ "order_id": cmd.order_id, "charge_id": charge_id, "amount": cmd.amount })),
        Ok(Gate::Refused) => {
            // Refunded while the provider was charging: give the money back now.
            if let Err(e) = s
                .provider
                .refund(&format!("refund-{}", cmd.order_id), &cmd.order_id)
                .await
            {
                return internal("the provider failed", &e);
            }
            problem(StatusCode::CONFLICT, "already_compensated", "the charge was refunded")
        }
        Err(e) => internal("recording the charge failed", &e),
    }
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
