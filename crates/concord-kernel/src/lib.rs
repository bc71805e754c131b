//! The shared kernel of the Concord server and the services that link the sdk: the few value
//! types and ports both sides speak, so the client and the service kit need neither the server's
//! core nor its vault crypto. `concord-core` re-exports every item here beside its own.
//!
//! - [`ExpectedVersion`]: the optimistic-concurrency check of an append, in its wire form too.
//! - [`SagaId`] and [`Xid`]: a saga's id and a two-phase-commit transaction's id, parsed once
//!   where they enter.
//! - [`idempotency`]: `Idempotency-Key` values, request fingerprints and the store port that the
//!   one idempotency layer runs on, in the server and in services alike.
//! - [`broker`]: the message broker port that outboxes publish to and consumers read from.
//! - [`StoreError`]: how a store port fails.

pub mod broker;
pub mod idempotency;
mod ids;
pub mod json;
mod store;
mod version;

pub use ids::{DERIVED_PREFIX, InvalidSagaId, InvalidXid, SagaId, Xid};
pub use store::StoreError;
pub use version::{ExpectedVersion, InvalidExpectedVersion};
