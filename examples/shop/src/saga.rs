//! The `place-order` saga: open the order → reserve stock → charge payment → confirm the order,
//! compensated in reverse by refund → release stock → reject the order.

use serde_json::{Value, json};

/// The definition's name.
pub const PLACE_ORDER: &str = "place-order";

/// The saga calls a fault may be asked for on (see [`crate::common::FAULT_HEADER`]).
pub const FAULT_SLOTS: &[&str] = &["reserve", "release", "charge", "refund"];

/// The name of the server-held saga secret that is the shop's service token: the definition
/// names it, so the token itself is never stored in a definition.
pub const TOKEN_SECRET: &str = "shop_token";

/// Where the participants listen and how they are called.
#[derive(Debug, Clone)]
pub struct Participants {
    pub orders_url: String,
    pub inventory_url: String,
    pub payments_url: String,
    /// Each attempt's timeout, milliseconds.
    pub timeout_ms: u64,
}

fn call(url: String, fault: Option<&str>, body: Option<Value>) -> Value {
    let mut headers = json!({ "authorization": format!("Bearer {{{{secrets.{TOKEN_SECRET}}}}}") });
    if let Some(slot) = fault {
        headers[crate::common::FAULT_HEADER] = Value::String(format!("{{{{input.faults.{slot}}}}}"));
    }
    let mut c = json!({ "method": "POST", "url": url, "headers": headers });
    if let Some(body) = body {
        c["body"] = body;
    }
    c
}

/// The definition, for `PUT /v1/saga-definitions/place-order`.
#[must_use]
pub fn definition(p: &Participants) -> Value {
    // Enough attempts to ride out a participant's restart (about 5 s of backoff) and an injected
    // fault, few enough that a step whose answers are all lost gives up in seconds.
    let retry = json!({ "max_attempts": 6, "backoff_ms": 200, "max_backoff_ms": 2_000 });
    let id = "{{input.order_id}}";
    json!({
        "steps": [
            {
                "name": "open",
                "action": call(format!("{}/orders/{id}/saga/open", p.orders_url), None, None),
                "compensation": call(format!("{}/orders/{id}/saga/reject", p.orders_url), None, None),
                "retry": retry,
                "timeout_ms": p.timeout_ms,
            },
            {
                "name": "reserve",
                "action": call(
                    format!("{}/reservations", p.inventory_url),
                            Some("reserve"),
                    Some(json!({ "order_id": id, "items": "{{input.items}}" })),
                ),
                "compensation": call(
                    format!("{}/reservations/{id}/release", p.inventory_url),
                            Some("release"),
                    None,
                ),
                "retry": retry,
                "timeout_ms": p.timeout_ms,
            },
            {
                "name": "charge",
                "action": call(
                    format!("{}/charges", p.payments_url),
                            Some("charge"),
                    Some(json!({ "order_id": id, "amount": "{{input.total}}", "card_token": "{{input.card_token}}" })),
                ),
                "compensation": call(format!("{}/charges/{id}/refund", p.payments_url), Some("refund"), None),
                "retry": retry,
                "timeout_ms": p.timeout_ms,
            },
            {
                "name": "confirm",
                "action": call(format!("{}/orders/{id}/saga/confirm", p.orders_url), None, None),
                // The pivot: once stock is held and the card charged, the order is confirmed,
                // retried for as long as it takes rather than left uncertain (it has no compensation,
                // and its append may have landed).
                "retry": { "max_attempts": 100, "backoff_ms": 200, "max_backoff_ms": 2_000 },
                "timeout_ms": p.timeout_ms,
            },
        ],
        "compensation_retry": { "max_attempts": 30, "backoff_ms": 100, "max_backoff_ms": 2_000 },
    })
}
