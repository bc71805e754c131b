//! Concord's Rust sdk: the typed client of the Concord server ([`Client`], from `concord-client`,
//! re-exported) and the service-side kit: [`barrier`], the saga participant barrier; [`tx`], the two-phase-commit participant (an
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
pub mod idempotency;
pub mod inbox;
pub mod outbox;
pub mod projection;
pub mod trace;
pub mod tx;

pub use concord_client::{
    AppendBody, AppendResponse, AttemptOut, BeginTxBody, CheckpointBody, Client, ClientError, Created, CreatedKey,
    DefinitionOut, ErrorCode, EventInput, EventOut, EventsPage, ExpectedVersion, Health, ParticipantIn, ParticipantOut,
    Problem, SagaOut, SagaPage, StartSagaBody, StepOut, Subscription, TxDecision, TxOut, TxPage, api,
};
