//! The order aggregate: validated commands, its events, and its state folded from them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The shop's catalogue: sku and unit price in cents.
pub const CATALOG: &[(&str, i64)] = &[
    ("apple", 120),
    ("pear", 90),
    ("plum", 250),
    ("fig", 400),
    ("rare-tea", 1_500),
];

/// Limits of one order.
pub const MAX_ITEMS: usize = 10;
pub const MAX_QTY: u32 = 5;
pub const MAX_CUSTOMER_LEN: usize = 64;

#[must_use]
pub fn price(sku: &str) -> Option<i64> {
    CATALOG.iter().find(|(s, _)| *s == sku).map(|(_, p)| *p)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub qty: u32,
}

/// `POST /orders` as the client sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct PlaceOrder {
    pub customer: String,
    pub items: Vec<Line>,
    /// The card number; it goes to the vault and nowhere else.
    pub card: String,
    /// Delivered by courier: the saga books one.
    #[serde(default)]
    pub express: bool,
    /// Shipped from both warehouses: every second line comes from the south.
    #[serde(default)]
    pub split: bool,
}

/// Orders of this total (cents) or more are held for fraud review before they are confirmed.
pub const REVIEW_FROM: i64 = 1_500;

/// The lines each warehouse ships, `(north, south)`: all from the north unless the order is
/// split, when every second line comes from the south.
#[must_use]
pub fn lines_by_warehouse(items: &[Line], split: bool) -> (Vec<Line>, Vec<Line>) {
    if !split {
        return (items.to_vec(), Vec::new());
    }
    let (south, north): (Vec<_>, Vec<_>) = items.iter().enumerate().partition(|(i, _)| i % 2 == 1);
    let lines = |v: Vec<(usize, &Line)>| v.into_iter().map(|(_, l)| l.clone()).collect();
    (lines(north), lines(south))
}

/// Why an order was refused at the door.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the customer is 1 to {MAX_CUSTOMER_LEN} letters, digits and -_.")]
    Customer,
    #[error("an order has 1 to {MAX_ITEMS} lines")]
    Lines,
    #[error("unknown sku {0:?}")]
    Sku(String),
    #[error("a quantity is 1 to {MAX_QTY}")]
    Qty,
    #[error("a card number is 12 to 19 digits")]
    Card,
}

impl PlaceOrder {
    /// Checks the command and prices it.
    ///
    /// # Errors
    /// The first rule it breaks.
    pub fn validate(&self) -> Result<i64, Invalid> {
        let customer_ok = !self.customer.is_empty()
            && self.customer.len() <= MAX_CUSTOMER_LEN
            && self
                .customer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !customer_ok {
            return Err(Invalid::Customer);
        }
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            return Err(Invalid::Lines);
        }
        let mut total = 0;
        for line in &self.items {
            let unit = price(&line.sku).ok_or_else(|| Invalid::Sku(line.sku.chars().take(40).collect()))?;
            if line.qty == 0 || line.qty > MAX_QTY {
                return Err(Invalid::Qty);
            }
            total += unit * i64::from(line.qty);
        }
        let digits = self.card.len();
        if !(12..=19).contains(&digits) || !self.card.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Invalid::Card);
        }
        Ok(total)
    }
}

/// Event types of an order's stream.
pub const PLACED: &str = "OrderPlaced";
pub const CONFIRMED: &str = "OrderConfirmed";
pub const REJECTED: &str = "OrderRejected";

/// The body of `OrderPlaced`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub order_id: String,
    pub customer: String,
    pub items: Vec<Line>,
    pub total: i64,
    /// The vault's token for the card; the number itself is never written.
    pub card_token: String,
    /// A digest of the client's `Idempotency-Key`, so one key is seen to give one order.
    pub request: String,
    #[serde(default)]
    pub express: bool,
    #[serde(default)]
    pub split: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Placed,
    Confirmed,
    Rejected,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
        }
    }
}

/// An order as its stream tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub placed: Placed,
    pub status: Status,
    pub reason: Option<String>,
    /// The stream's version: the number of events folded.
    pub version: u64,
}

impl Order {
    /// Folds the events of one stream, in order; `None` until it holds an `OrderPlaced`.
    #[must_use]
    pub fn fold<'a>(events: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Option<Self> {
        let mut order: Option<Self> = None;
        for (kind, data) in events {
            match (kind, order.as_mut()) {
                (PLACED, None) => {
                    let placed = serde_json::from_value(data.clone()).ok()?;
                    order = Some(Self {
                        placed,
                        status: Status::Placed,
                        reason: None,
                        version: 0,
                    });
                }
                (CONFIRMED, Some(o)) if o.status == Status::Placed => o.status = Status::Confirmed,
                (REJECTED, Some(o)) if o.status == Status::Placed => {
                    o.status = Status::Rejected;
                    o.reason = data["reason"].as_str().map(str::to_owned);
                }
                _ => {}
            }
            if let Some(o) = order.as_mut() {
                o.version += 1;
            }
        }
        order
    }
}

/// What a saga call asks of the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Confirm,
    Reject,
}

/// What to do about a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Append this event type.
    Append(&'static str),
    /// The order is already there: answer success.
    Already,
    /// The order went the other way: refuse.
    Conflict(Status),
}

#[must_use]
pub fn decide(order: &Order, transition: Transition) -> Decision {
    match (order.status, transition) {
        (Status::Placed, Transition::Confirm) => Decision::Append(CONFIRMED),
        (Status::Placed, Transition::Reject) => Decision::Append(REJECTED),
        (Status::Confirmed, Transition::Confirm) | (Status::Rejected, Transition::Reject) => Decision::Already,
        (other, _) => Decision::Conflict(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd(items: Vec<Line>, card: &str) -> PlaceOrder {
        PlaceOrder {
            customer: "c-1".into(),
            items,
            card: card.into(),
            express: false,
            split: false,
        }
    }

    #[test]
    fn a_split_order_ships_every_second_line_from_the_south() {
        let line = |sku: &str| Line {
            sku: sku.into(),
            qty: 1,
        };
        let items = vec![line("apple"), line("pear"), line("fig")];
        assert_eq!(lines_by_warehouse(&items, false), (items.clone(), vec![]));
        let (north, south) = lines_by_warehouse(&items, true);
        assert_eq!(north, vec![line("apple"), line("fig")]);
        assert_eq!(south, vec![line("pear")]);
        assert_eq!(lines_by_warehouse(&items[..1], true), (items[..1].to_vec(), vec![]));
    }

    #[test]
    fn an_order_is_priced_from_the_catalogue() {
        let c = cmd(
            vec![
                Line {
                    sku: "apple".into(),
                    qty: 2,
                },
                Line {
                    sku: "fig".into(),
                    qty: 1,
                },
            ],
            "4242424242424242",
        );
        assert_eq!(c.validate(), Ok(640));
    }

    #[test]
    fn bad_commands_are_refused() {
        let line = |sku: &str, qty| Line { sku: sku.into(), qty };
        assert_eq!(cmd(vec![], "4242424242424242").validate(), Err(Invalid::Lines));
        assert_eq!(
            cmd(vec![line("kiwi", 1)], "4242424242424242").validate(),
            Err(Invalid::Sku("kiwi".into()))
        );
        assert_eq!(
            cmd(vec![line("apple", 9)], "4242424242424242").validate(),
            Err(Invalid::Qty)
        );
        assert_eq!(cmd(vec![line("apple", 1)], "4242-4242").validate(), Err(Invalid::Card));
    }

    #[test]
    fn the_state_is_folded_from_the_stream_and_transitions_are_idempotent() {
        let placed =
            json!({"order_id": "o1", "customer": "c", "items": [], "total": 5, "card_token": "t", "request": "r"});
        let confirmed = json!({});
        let order = Order::fold([(PLACED, &placed)]).unwrap();
        assert_eq!(order.status, Status::Placed);
        assert_eq!(decide(&order, Transition::Confirm), Decision::Append(CONFIRMED));
        let order = Order::fold([(PLACED, &placed), (CONFIRMED, &confirmed)]).unwrap();
        assert_eq!(order.version, 2);
        assert_eq!(decide(&order, Transition::Confirm), Decision::Already);
        assert_eq!(
            decide(&order, Transition::Reject),
            Decision::Conflict(Status::Confirmed)
        );
        assert!(Order::fold([(CONFIRMED, &confirmed)]).is_none());
    }
}
