//! Concord's Rust sdk: the typed client of the Concord server ([`Client`]) and the service-side
//! kit: [`barrier`], the saga participant barrier; [`tx`], the two-phase-commit participant (an
//! axum router over a [`tx::Participant`], on PostgreSQL prepared transactions and on SQLite
//! reservation records); [`outbox`], the transactional outbox and its relays; [`broker`], the
//! broker port and the event-store broker (NATS JetStream is in `concord-broker-nats`);
//! [`inbox`], the idempotent consumer; [`idempotency`], the `Idempotency-Key` tower layer;
//! [`projection`], the CQRS projection runner; [`cache`], the read-through cache; [`trace`], W3C
//! trace context for outgoing calls, outbox messages and axum servers.
//!
//! # TLS crypto provider
//!
//! reqwest is built with `rustls-no-provider`: the library never picks a crypto provider. The
//! binary installs one, once, before the first [`Client::new`] (which otherwise answers
//! [`ClientError::Config`]), for example `rustls::crypto::ring::default_provider().install_default()`.
//! [`Client::with_http`] takes a `reqwest::Client` the caller built itself.
//!
//! # Example
//!
//! ```no_run
//! use concord_sdk::{Client, ClientError, ErrorCode, EventInput, ExpectedVersion};
//!
//! # async fn run() -> Result<(), ClientError> {
//! let _ = rustls::crypto::ring::default_provider().install_default();
//! let client = Client::new("http://127.0.0.1:7400", "my-api-key")?;
//!
//! let placed = EventInput {
//!     id: None,
//!     event_type: "OrderPlaced".into(),
//!     data: serde_json::json!({ "total": 30 }),
//!     metadata: None,
//! };
//! match client.append("order-42", ExpectedVersion::NoStream, vec![placed]).await {
//!     Ok(appended) => println!("order-42 is at version {}", appended.last_version),
//!     Err(e) if e.code() == Some(ErrorCode::WrongExpectedVersion) => println!("already placed"),
//!     Err(e) => return Err(e),
//! }
//!
//! let mut orders = client.subscribe(0, Some("order")).await?;
//! while let Some(event) = orders.next().await {
//!     let event = event?;
//!     println!("{} {} v{}", event.position, event.stream, event.version);
//! }
//! # Ok(())
//! # }
//! ```

pub mod barrier;
pub mod broker;
pub mod cache;
mod client;
pub mod idempotency;
pub mod inbox;
pub mod outbox;
pub mod projection;
pub mod trace;
pub mod tx;

pub use client::{Client, ClientError, Created, ExpectedVersion, Subscription};
pub use concord_api as api;
pub use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventOut, EventsPage};
pub use concord_api::keys::{CreatedKey, Health};
pub use concord_api::sagas::{AttemptOut, DefinitionOut, SagaOut, SagaPage, StartSagaBody, StepOut};
pub use concord_api::tx::{BeginTxBody, ParticipantIn, ParticipantOut, TxDecision, TxOut, TxPage};
pub use concord_api::{ErrorCode, Problem};
