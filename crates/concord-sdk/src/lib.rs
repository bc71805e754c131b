//! Concord's service kit: the parts a service links to stay consistent with the others, and the
//! typed client of the Concord server ([`Client`], from `concord-client`, re-exported).
//!
//! - [`barrier`], the saga participant barrier; [`tx`], the two-phase-commit participant (an axum
//!   router over a [`tx::Participant`], on PostgreSQL prepared transactions and on SQLite
//!   reservation records); [`outbox`], the transactional outbox and its relays; [`inbox`], the
//!   idempotent consumer; [`projection`], the CQRS projection runner;
//! - [`broker`], the broker port with the event-store broker (and NATS JetStream);
//! - [`idempotency`], the `Idempotency-Key` tower layer and its stores;
//! - [`cache`], the read-through cache; [`trace`], W3C trace context for outgoing calls, outbox
//!   messages and axum servers.
//!
//! # Features
//!
//! A service compiles only what it uses (`default-features = false` and the features it needs);
//! all of them are on by default.
//!
//! | feature    | adds |
//! |------------|------|
//! | (none)     | the client, the broker port and the event-store broker, idempotency's types |
//! | `postgres` | barrier, outbox and relay, inbox, 2PC participant, projections, idempotency store on PostgreSQL |
//! | `sqlite`   | the same on SQLite |
//! | `redis`    | the read-through cache (moka in the process, Redis shared) and the Redis idempotency store |
//! | `nats`     | `broker::nats`, the NATS JetStream broker |
//! | `axum`     | the `Idempotency-Key` layer, and (with `postgres` or `sqlite`) the 2PC participant's router |
//! | `otel`     | the trace context: sent by the client, continued by `trace::server_span` (with `axum`) |
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

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod barrier;
pub mod broker;
#[cfg(feature = "redis")]
pub mod cache;
pub mod idempotency;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod inbox;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod outbox;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod projection;
#[cfg(feature = "axum")]
pub mod serve;
pub mod trace;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod tx;

pub use concord_client::{
    AppendBody, AppendResponse, AttemptOut, BeginTxBody, CheckpointBody, Client, ClientError, Created, CreatedKey,
    DefinitionOut, ErrorCode, EventInput, EventOut, EventsPage, ExpectedVersion, Health, ParticipantIn, ParticipantOut,
    Problem, SagaOut, SagaPage, StartSagaBody, StepOut, Subscription, TxDecision, TxOut, TxPage, api, tls::ClientTls,
};
pub use concord_client::{CALLBACK_HEADER, complete_action};
