//! Stock, reservations and transfers: the rules, free of storage.

use serde::{Deserialize, Serialize};

use crate::orders::domain::Line;

/// The warehouse orders are served from; it also keeps the reservations.
pub const NORTH: &str = "north";
/// The second warehouse; stock reaches the north only by a transfer (a two-phase commit).
pub const SOUTH: &str = "south";

/// The broker topic of stock changes; the key is `{warehouse}.{sku}`.
pub const STOCK_TOPIC: &str = "stock";
pub const STOCK_CHANGED: &str = "StockChanged";

/// The stock each warehouse starts with: `(sku, north, south)`.
pub const INITIAL_STOCK: &[(&str, i64, i64)] = &[
    ("apple", 1_000, 200),
    ("pear", 1_000, 200),
    ("plum", 800, 200),
    ("fig", 600, 200),
    ("rare-tea", 12, 6),
];

/// A stock row after a change: what the outbox announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub warehouse: String,
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub shipped: i64,
    pub held: i64,
    /// Raised by one on every change of the row.
    pub version: i64,
}

/// `POST /reservations`, the `reserve` step.
#[derive(Debug, Clone, Deserialize)]
pub struct Reserve {
    pub order_id: String,
    pub items: Vec<Line>,
}

/// A transfer between the warehouses, the payload of each 2PC participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub sku: String,
    pub qty: i64,
    pub from: String,
    pub to: String,
}

/// Which side of a transfer a warehouse is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Transfer {
    /// The warehouse's side, or why the transfer is refused.
    ///
    /// # Errors
    /// A transfer this warehouse takes no part in, or a bad quantity or sku.
    pub fn side(&self, warehouse: &str) -> Result<Side, String> {
        if self.qty <= 0 || self.qty > 10_000 {
            return Err("a transfer moves 1 to 10000 units".into());
        }
        if crate::orders::domain::price(&self.sku).is_none() {
            return Err(format!(
                "unknown sku {:?}",
                self.sku.chars().take(40).collect::<String>()
            ));
        }
        if self.from == self.to {
            return Err("a transfer goes between two warehouses".into());
        }
        if self.from == warehouse {
            Ok(Side::Source)
        } else if self.to == warehouse {
            Ok(Side::Destination)
        } else {
            Err(format!("warehouse {warehouse} is not part of this transfer"))
        }
    }
}

/// Merges lines of one sku, so a reservation has one row per sku.
#[must_use]
pub fn merge_lines(items: &[Line]) -> Vec<(String, i64)> {
    let mut merged: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for line in items {
        *merged.entry(line.sku.clone()).or_default() += i64::from(line.qty);
    }
    merged.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_names_each_side() {
        let t = Transfer {
            sku: "apple".into(),
            qty: 5,
            from: SOUTH.into(),
            to: NORTH.into(),
        };
        assert_eq!(t.side(SOUTH), Ok(Side::Source));
        assert_eq!(t.side(NORTH), Ok(Side::Destination));
        assert!(t.side("west").is_err());
        assert!(Transfer { qty: 0, ..t.clone() }.side(NORTH).is_err());
        assert!(
            Transfer {
                sku: "kiwi".into(),
                ..t
            }
            .side(NORTH)
            .is_err()
        );
    }

    #[test]
    fn lines_of_one_sku_merge() {
        let l = |sku: &str, qty| Line { sku: sku.into(), qty };
        assert_eq!(
            merge_lines(&[l("fig", 1), l("apple", 2), l("fig", 3)]),
            vec![("apple".into(), 2), ("fig".into(), 4)]
        );
    }
}
