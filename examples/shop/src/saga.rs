//! The `place-order` saga: open the order → reserve stock (a split order in both warehouses at
//! once, a parallel group) → book a courier (express orders only, a `when`) → charge payment (an
//! asynchronous action the card provider confirms by webhook) → hold for fraud review (large
//! orders only: a wait that an operator's signal ends early and its timeout ends anyway) →
//! confirm the order; compensated in reverse by refund → cancel the courier → release stock →
//! reject the order.

use serde_json::{Value, json};

/// The definition's name.
pub const PLACE_ORDER: &str = "place-order";

/// The saga calls a fault may be asked for on (see [`crate::common::FAULT_HEADER`]).
pub const FAULT_SLOTS: &[&str] = &["reserve", "release", "charge", "refund"];

/// The signal an operator sends to end an order's fraud-review hold early.
pub const REVIEW_CLEARED: &str = "review-cleared";

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
    /// How long a charge the provider confirms later may take, milliseconds.
    pub charge_callback_ms: u64,
    /// How long a fraud-review hold lasts without an operator, milliseconds.
    pub review_hold_ms: u64,
    /// The calls carry the demo's fault header, filled from the input.
    pub faults: bool,
}

fn call_with(url: String, fault: Option<&str>, body: Option<Value>, faults: bool) -> Value {
    let mut headers = json!({ "authorization": format!("Bearer {{{{secrets.{TOKEN_SECRET}}}}}") });
    if let Some(slot) = fault.filter(|_| faults) {
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
    let call = |url, fault, body| call_with(url, fault, body, p.faults);
    const WAREHOUSES: [&str; 2] = ["north", "south"];
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
                "parallel": WAREHOUSES.map(|w| {
                    let mut branch = json!({
                        "name": format!("reserve-{w}"),
                        "action": call(
                            format!("{}/warehouses/{w}/reservations", p.inventory_url),
                            Some("reserve"),
                            Some(json!({
                                "order_id": id,
                                "items": if w == "north" { "{{input.items}}" } else { "{{input.south_items}}" },
                            })),
                        ),
                        "compensation": call(
                            format!("{}/warehouses/{w}/reservations/{id}/release", p.inventory_url),
                            Some("release"),
                            None,
                        ),
                        "retry": retry,
                        "timeout_ms": p.timeout_ms,
                    });
                    if w == "south" {
                        branch["when"] = json!("{{input.split}}");
                    }
                    branch
                }),
            },
            {
                "name": "courier",
                "when": "{{input.express}}",
                "action": call(format!("{}/couriers", p.inventory_url), None, Some(json!({ "order_id": id }))),
                "compensation": call(format!("{}/couriers/{id}/cancel", p.inventory_url), None, None),
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
                // Payments answers 202 and completes the step when the provider's webhook says.
                "callback_timeout_ms": p.charge_callback_ms,
            },
            {
                "name": "review",
                "when": "{{input.review}}",
                "wait": { "signal": REVIEW_CLEARED, "timeout_ms": p.review_hold_ms, "on_timeout": "continue" },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition the Kubernetes overlay puts: the shop's own, for the services' names in
    /// the cluster, without the demo's fault headers. Regenerate it with
    /// `CONCORD_SHOP_WRITE_DEFINITION=1 cargo test -p concord-shop --lib saga`.
    #[test]
    fn the_kubernetes_overlay_puts_the_shops_definition() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kubernetes/overlays/shop/place-order.json"
        );
        let want = definition(&Participants {
            orders_url: "http://orders:8080".into(),
            inventory_url: "http://inventory:8080".into(),
            payments_url: "http://payments:8080".into(),
            timeout_ms: 10_000,
            charge_callback_ms: 600_000,
            review_hold_ms: 60_000,
            faults: false,
        });
        if std::env::var_os("CONCORD_SHOP_WRITE_DEFINITION").is_some() {
            let text = serde_json::to_string_pretty(&want).unwrap() + "\n";
            std::fs::write(path, text).unwrap();
        }
        let file: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(file, want, "{path} differs from saga::definition");
        assert!(!file.to_string().contains(crate::common::FAULT_HEADER));
    }
}
