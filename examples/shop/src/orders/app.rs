//! The orders use cases, over the Concord client.

use concord_sdk::api::vault::TokenizeItemIn;
use concord_sdk::{Client, ClientError, ErrorCode, EventInput, ExpectedVersion, StartSagaBody};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::domain::{self, Decision, Order, PlaceOrder, Placed, Transition};
use crate::common::{derived_id, hex};

pub struct Orders {
    pub concord: Client,
    pub saga: String,
    pub faults_enabled: bool,
}

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error(transparent)]
    Invalid(#[from] domain::Invalid),
    #[error("no order {0}")]
    NotFound(String),
    #[error("the order is already {0}")]
    Conflict(&'static str),
    #[error("the same Idempotency-Key was used for another order")]
    KeyReused,
    #[error("concord: {0}")]
    Concord(#[from] ClientError),
}

/// The stream of an order.
#[must_use]
pub fn stream(order_id: &str) -> String {
    format!("order-{order_id}")
}

/// The saga of an order.
#[must_use]
pub fn saga_id(order_id: &str) -> String {
    format!("order-{order_id}")
}

impl Orders {
    /// Places an order: the card goes to the vault, `OrderPlaced` to the order's new stream, and
    /// the saga starts. Every step is idempotent under the same `request_key`, so a client retry
    /// after a crash anywhere in between finishes the same order.
    ///
    /// # Errors
    /// [`OrderError::Invalid`] for a bad command; Concord's errors.
    pub async fn place(&self, cmd: &PlaceOrder, request_key: &str, faults: Value) -> Result<Value, OrderError> {
        let total = cmd.validate()?;
        let order_id = derived_id(&["order", &cmd.customer, request_key]).to_string();
        let request = hex(&Sha256::digest(format!("{}\0{request_key}", cmd.customer).as_bytes()));
        let token = self
            .concord
            .tokenize(&[TokenizeItemIn {
                kind: "card".into(),
                value: cmd.card.clone(),
                format: None,
                convergent: Some(true),
                subject: Some(cmd.customer.clone()),
                ttl_s: None,
                metadata: None,
            }])
            .await?
            .pop()
            .ok_or(OrderError::Concord(ClientError::Config(
                "the vault answered no token".into(),
            )))?;
        let placed = Placed {
            order_id: order_id.clone(),
            customer: cmd.customer.clone(),
            items: cmd.items.clone(),
            total,
            card_token: token.clone(),
            request,
            express: cmd.express,
            split: cmd.split,
        };
        let event = EventInput {
            id: Some(derived_id(&[domain::PLACED, &order_id])),
            event_type: domain::PLACED.into(),
            data: serde_json::to_value(&placed).unwrap_or(Value::Null),
            metadata: None,
        };
        match self
            .concord
            .append(&stream(&order_id), ExpectedVersion::NoStream, vec![event])
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::WrongExpectedVersion) => {
                // Placed by an earlier try of this request: go on with the stored order.
                let stored = self.load(&order_id).await?;
                let same = (&stored.placed.items, stored.placed.express, stored.placed.split)
                    == (&placed.items, placed.express, placed.split);
                if !same {
                    return Err(OrderError::KeyReused);
                }
            }
            Err(e) => return Err(e.into()),
        }
        let (north, south) = domain::lines_by_warehouse(&placed.items, placed.split);
        let input = json!({
            "order_id": order_id,
            "items": north,
            "south_items": south,
            "split": !south.is_empty(),
            "express": placed.express,
            "review": total >= domain::REVIEW_FROM,
            "total": total,
            "card_token": token,
            "faults": if self.faults_enabled { faults } else { json!({}) },
        });
        let input = with_fault_defaults(input);
        let saga = self
            .concord
            .start_saga(
                &StartSagaBody {
                    definition: self.saga.clone(),
                    input,
                    id: Some(saga_id(&order_id)),
                },
                None,
            )
            .await?;
        Ok(json!({ "order_id": order_id, "saga_id": saga.id, "status": "placed", "total": total }))
    }

    /// The order folded from its stream.
    ///
    /// # Errors
    /// [`OrderError::NotFound`]; Concord's errors.
    pub async fn load(&self, order_id: &str) -> Result<Order, OrderError> {
        let page = match self.concord.read_stream(&stream(order_id), 1, 100).await {
            Ok(page) => page,
            Err(e) if e.status() == Some(404) => return Err(OrderError::NotFound(order_id.to_owned())),
            Err(e) => return Err(e.into()),
        };
        Order::fold(page.events.iter().map(|e| (e.event_type.as_str(), &e.data)))
            .ok_or_else(|| OrderError::NotFound(order_id.to_owned()))
    }

    /// The order as a client sees it: the card only masked.
    ///
    /// # Errors
    /// As [`Orders::load`].
    pub async fn view(&self, order_id: &str) -> Result<Value, OrderError> {
        let order = self.load(order_id).await?;
        let masked = self
            .concord
            .detokenize(std::slice::from_ref(&order.placed.card_token), true)
            .await?
            .pop()
            .and_then(|i| i.value);
        Ok(json!({
            "order_id": order.placed.order_id,
            "customer": order.placed.customer,
            "items": order.placed.items,
            "total": order.placed.total,
            "status": order.status.as_str(),
            "reason": order.reason,
            "card": masked,
            "version": order.version,
        }))
    }

    /// A saga's transition of the order. Appends with the version it read, so two transitions
    /// racing cannot both win, and with an event id derived from the transition, so a retried
    /// call appends nothing new.
    ///
    /// # Errors
    /// [`OrderError::Conflict`] when the order went the other way; Concord's errors.
    pub async fn transition(&self, order_id: &str, t: Transition, reason: Option<&str>) -> Result<Value, OrderError> {
        loop {
            let order = self.load(order_id).await?;
            let kind = match domain::decide(&order, t) {
                Decision::Already => return Ok(json!({ "order_id": order_id, "status": order.status.as_str() })),
                Decision::Conflict(s) => return Err(OrderError::Conflict(s.as_str())),
                Decision::Append(kind) => kind,
            };
            let event = EventInput {
                id: Some(derived_id(&[kind, order_id])),
                event_type: kind.into(),
                data: json!({ "order_id": order_id, "reason": reason }),
                metadata: None,
            };
            match self
                .concord
                .append(&stream(order_id), ExpectedVersion::Exact(order.version), vec![event])
                .await
            {
                Ok(_) => {
                    let status = if kind == domain::CONFIRMED {
                        "confirmed"
                    } else {
                        "rejected"
                    };
                    return Ok(json!({ "order_id": order_id, "status": status }));
                }
                Err(e) if e.code() == Some(ErrorCode::WrongExpectedVersion) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Every step's fault slot is present in the saga input, `none` unless asked for.
fn with_fault_defaults(mut input: Value) -> Value {
    let faults = input["faults"].as_object().cloned().unwrap_or_default();
    let mut filled = serde_json::Map::new();
    for step in crate::saga::FAULT_SLOTS {
        let v = faults
            .get(*step)
            .and_then(Value::as_str)
            .filter(|v| matches!(*v, "5xx" | "timeout" | crate::common::COMPLETION_LOST))
            .unwrap_or("none");
        filled.insert((*step).to_owned(), Value::String(v.to_owned()));
    }
    input["faults"] = Value::Object(filled);
    input
}
