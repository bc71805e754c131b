//! What the demo will do, drawn from the seed before anything runs: the orders, and the faults
//! each one carries.

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::{Value, json};

use crate::orders::domain::Line;

/// Cards the demo pays with. The checker looks for each of them, in plaintext, everywhere.
pub const GOOD_CARDS: &[&str] = &[
    "4111111111111111",
    "5555555555554444",
    "4242424242424242",
    "378282246310005",
];
/// A card the provider declines.
pub const DECLINED_CARD: &str = "4000000000000002";

/// The skus ordinary orders pick from; `rare-tea` is the scarce one.
const COMMON: &[&str] = &["apple", "pear", "plum", "fig"];
const SCARCE: &str = "rare-tea";

/// One order as the demo will submit it.
#[derive(Debug, Clone)]
pub struct PlannedOrder {
    pub index: usize,
    pub customer: String,
    pub items: Vec<Line>,
    pub card: String,
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// Fault per saga call (`reserve`, `charge`, `release`, `refund`): `5xx` or `timeout`.
    pub faults: Value,
    /// Submitted twice with the same key, the second while the first may still run.
    pub duplicate: bool,
    /// Asks for the scarce sku, beyond what may be left of it.
    pub scarce: bool,
    /// Delivered by courier (the saga's `courier` step runs).
    pub express: bool,
    /// Shipped from both warehouses (a parallel group when it has two lines or more).
    pub split: bool,
}

impl PlannedOrder {
    #[must_use]
    pub fn body(&self) -> Value {
        json!({
            "customer": self.customer,
            "items": self.items,
            "card": self.card,
            "express": self.express,
            "split": self.split,
        })
    }

    /// Held for fraud review: its total reaches [`crate::orders::domain::REVIEW_FROM`].
    #[must_use]
    pub fn reviewed(&self) -> bool {
        let total: i64 = self
            .items
            .iter()
            .map(|l| crate::orders::domain::price(&l.sku).unwrap_or(0) * i64::from(l.qty))
            .sum();
        total >= crate::orders::domain::REVIEW_FROM
    }

    /// Reserved in both warehouses at once.
    #[must_use]
    pub fn ships_from_both(&self) -> bool {
        self.split && self.items.len() > 1
    }

    /// The order id the orders service derives from the customer and key.
    #[must_use]
    pub fn order_id(&self) -> String {
        crate::common::derived_id(&["order", &self.customer, &self.key]).to_string()
    }

    fn fault_count(&self, kind: &str) -> usize {
        self.faults
            .as_object()
            .map_or(0, |f| f.values().filter(|v| v.as_str() == Some(kind)).count())
    }
}

/// The whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub orders: Vec<PlannedOrder>,
    /// Which shop service is killed mid-run.
    pub victim: &'static str,
}

impl Plan {
    #[must_use]
    pub fn draw(seed: u64, n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut orders = Vec::with_capacity(n);
        for index in 0..n {
            let lines = rng.random_range(1..=3);
            let mut items: Vec<Line> = (0..lines)
                .map(|_| Line {
                    sku: COMMON[rng.random_range(0..COMMON.len())].to_owned(),
                    qty: rng.random_range(1..=3),
                })
                .collect();
            let scarce = rng.random_bool(0.08);
            if scarce {
                items.push(Line {
                    sku: SCARCE.to_owned(),
                    qty: rng.random_range(2..=3),
                });
            }
            let card = if rng.random_bool(0.08) {
                DECLINED_CARD
            } else {
                GOOD_CARDS[rng.random_range(0..GOOD_CARDS.len())]
            };
            let mut faults = serde_json::Map::new();
            for (slot, p5xx, ptimeout, plost) in [
                ("reserve", 0.08, 0.06, 0.0),
                ("charge", 0.08, 0.06, 0.03),
                ("release", 0.1, 0.05, 0.0),
                ("refund", 0.1, 0.05, 0.0),
            ] {
                let roll: f64 = rng.random();
                let fault = if roll < p5xx {
                    Some("5xx")
                } else if roll < p5xx + ptimeout {
                    Some("timeout")
                } else if roll < p5xx + ptimeout + plost {
                    Some(crate::common::COMPLETION_LOST)
                } else {
                    None
                };
                if let Some(f) = fault {
                    faults.insert(slot.to_owned(), Value::String(f.to_owned()));
                }
            }
            orders.push(PlannedOrder {
                index,
                customer: format!("customer-{}", rng.random_range(0..40)),
                items,
                card: card.to_owned(),
                key: format!("demo-{seed}-{index}"),
                faults: Value::Object(faults),
                duplicate: rng.random_bool(0.1),
                scarce,
                express: rng.random_bool(0.2),
                split: rng.random_bool(0.3),
            });
        }
        let victim = if rng.random_bool(0.5) { "payments" } else { "inventory" };
        Self { orders, victim }
    }

    /// Charges whose confirmation is lost (the saga must refund an uncertain charge).
    #[must_use]
    pub fn lost_answers(&self) -> usize {
        self.orders
            .iter()
            .map(|o| o.fault_count(crate::common::COMPLETION_LOST))
            .sum()
    }

    /// Declined cards, scarce orders, duplicates, and faults by kind, as planned.
    #[must_use]
    pub fn counts(&self) -> (usize, usize, usize, usize, usize) {
        let declined = self.orders.iter().filter(|o| o.card == DECLINED_CARD).count();
        let scarce = self.orders.iter().filter(|o| o.scarce).count();
        let duplicates = self.orders.iter().filter(|o| o.duplicate).count();
        let e5xx = self.orders.iter().map(|o| o.fault_count("5xx")).sum();
        let timeouts = self.orders.iter().map(|o| o.fault_count("timeout")).sum();
        (declined, scarce, duplicates, e5xx, timeouts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_plan() {
        let a = Plan::draw(7, 50);
        let b = Plan::draw(7, 50);
        assert_eq!(a.counts(), b.counts());
        assert_eq!(a.victim, b.victim);
        assert_eq!(a.orders[3].body(), b.orders[3].body());
        let c = Plan::draw(8, 50);
        assert_ne!(
            a.orders.iter().map(PlannedOrder::body).collect::<Vec<_>>(),
            c.orders.iter().map(PlannedOrder::body).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_plan_of_some_size_holds_every_kind_of_fault() {
        let (declined, scarce, duplicates, e5xx, timeouts) = Plan::draw(1, 300).counts();
        let lost = Plan::draw(1, 300).lost_answers();
        for (what, n) in [
            ("declined", declined),
            ("scarce", scarce),
            ("duplicates", duplicates),
            ("5xx", e5xx),
            ("timeouts", timeouts),
            ("lost answers", lost),
        ] {
            assert!(n > 0, "no {what} in 300 orders");
        }
    }
}
