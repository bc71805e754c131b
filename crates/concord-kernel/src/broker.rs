//! The message broker port: durable topics that outbox relays publish to and consumer groups
//! read from (NATS JetStream in `concord-broker-nats`, the event store in the sdk).

use async_trait::async_trait;
use uuid::Uuid;

/// A message on its way from a service's outbox through a broker to its consumers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BrokerMessage {
    /// Chosen once, when the message is enqueued: brokers drop a second publish of the same id
    /// inside their duplicate window, and consumers' inboxes drop a second delivery.
    pub id: Uuid,
    /// Where it goes: a NATS subject suffix, or an event-store stream category.
    pub topic: String,
    /// Messages of one key keep their order from the outbox to the consumer.
    pub key: String,
    pub payload: serde_json::Value,
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Failures of a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is unreachable or did not answer in time; retrying later may succeed.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refuses this message itself (too large, bad topic or key); retrying the same
    /// message will not help.
    #[error("message rejected: {0}")]
    Rejected(String),
}

impl BrokerError {
    /// Whether the failure belongs to the message (so it counts towards a dead-letter limit)
    /// rather than to the broker.
    #[must_use]
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::Rejected(_))
    }
}

/// One delivery of a message to a consumer. It is delivered again until acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub message: BrokerMessage,
    /// The broker's position of the message in its topic; grows with publish order.
    pub sequence: u64,
    /// 1 on the first delivery, more on redeliveries.
    pub attempt: u64,
    /// The adapter's handle for acknowledging this delivery.
    pub token: String,
}

/// A message broker: durable topics, publish with acknowledgement, durable consumer groups.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes the messages and waits until the broker holds each one durably. They leave in
    /// the slice's order but may be stored in parallel: a caller that needs two messages in
    /// order publishes the second after the first succeeded. Answer `i` belongs to message `i`.
    async fn publish(&self, messages: &[BrokerMessage]) -> Vec<Result<(), BrokerError>>;

    /// Joins the durable consumer group `group` of `topic`, creating it at the topic's start if
    /// it is new. A message is delivered to one member at a time, again and again until a
    /// member acknowledges it.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn BrokerConsumer>, BrokerError>;
}

/// A member of a consumer group.
#[async_trait]
pub trait BrokerConsumer: Send + 'static {
    /// Up to `max` deliveries, waiting up to `wait` for the first. Within a key, deliveries come
    /// in publish order.
    async fn fetch(&mut self, max: usize, wait: std::time::Duration) -> Result<Vec<Delivery>, BrokerError>;
    /// The message is handled: do not deliver it again.
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), BrokerError>;
    /// The message could not be handled now: deliver it again after `delay`.
    async fn nack(&mut self, delivery: &Delivery, delay: std::time::Duration) -> Result<(), BrokerError>;
}
