//! The broker port, as the outbox relay and consumers use it, and its embedded adapter: the
//! Concord event store itself ([`EventStoreBroker`]). The NATS JetStream adapter lives in the
//! `concord-broker-nats` crate.
//!
//! A message of topic `t` and key `k` becomes an event of stream `t-k` whose id is the message
//! id, so a second publish of the same message is absorbed by the event store's idempotent
//! append; the topic is the stream category and consumers are consumer groups of that category.

mod event_store;

pub use concord_kernel::broker::{Broker, BrokerConsumer, BrokerError, BrokerMessage, Delivery};
pub use event_store::EventStoreBroker;

/// NATS JetStream, one stream per topic (`concord-broker-nats`).
#[cfg(feature = "nats")]
pub use concord_broker_nats as nats;
