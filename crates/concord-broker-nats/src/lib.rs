//! NATS JetStream adapter of Concord's [`Broker`] port.
//!
//! - A topic `t` is the JetStream stream `{stream_prefix}_{t}` (created on first use, file
//!   storage) holding the one subject `{subject_prefix}.{t}`.
//! - Each message is published with its id as `Nats-Msg-Id`, so JetStream drops a second
//!   publish of the same message inside the stream's duplicate window
//!   ([`NatsConfig::duplicate_window`], 2 minutes by default). The key travels in the
//!   `Concord-Key` header, the other headers as they are; the payload is its JSON.
//! - A consumer group is a durable pull consumer with explicit acknowledgement: a message not
//!   acknowledged within [`NatsConfig::ack_wait`] (or nacked) is delivered again.
//!
//! Publishes of one call are pipelined on the connection (NATS keeps their order) and their
//! acknowledgements awaited together.
//!
//! ```no_run
//! use concord_broker_nats::{NatsBroker, NatsConfig};
//! use concord_kernel::broker::Broker;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = NatsBroker::connect("nats://127.0.0.1:4222", NatsConfig::default()).await?;
//! let mut consumer = broker.subscribe("stock", "query-service").await?;
//! for d in consumer.fetch(100, std::time::Duration::from_secs(1)).await? {
//!     println!("{} {}", d.message.key, d.message.payload);
//!     consumer.ack(&d).await?;
//! }
//! # Ok(())
//! # }
//! ```

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, stream};
use async_trait::async_trait;
use bytes::Bytes;
use concord_kernel::broker::{Broker, BrokerConsumer, BrokerError, BrokerMessage, Delivery};
use futures::StreamExt as _;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// The header that carries a message's key.
pub const KEY_HEADER: &str = "Concord-Key";
const ID_HEADER: &str = "Nats-Msg-Id";

/// How topics map onto JetStream and how long it keeps things.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Streams are named `{stream_prefix}_{topic}`.
    pub stream_prefix: String,
    /// Subjects are `{subject_prefix}.{topic}`.
    pub subject_prefix: String,
    /// How long JetStream remembers message ids to drop duplicates.
    pub duplicate_window: Duration,
    /// How long a stream keeps messages (zero: forever).
    pub max_age: Duration,
    /// How long a delivery may stay unacknowledged before it is delivered again.
    pub ack_wait: Duration,
    /// The most deliveries a consumer has unacknowledged at once.
    pub max_ack_pending: i64,
    /// The most bytes of one message (payload plus headers); larger ones are rejected before
    /// they are sent. The server's own `max_payload` (1 MiB by default) also applies.
    pub max_message_bytes: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            stream_prefix: "CONCORD".into(),
            subject_prefix: "concord".into(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            max_message_bytes: 1024 * 1024,
        }
    }
}

/// The broker over one NATS connection.
pub struct NatsBroker {
    client: async_nats::Client,
    js: Context,
    config: NatsConfig,
    /// Topics whose stream is known to exist.
    ready: Mutex<HashSet<String>>,
}

fn check_name(what: &str, name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::Rejected(format!(
            "a {what} is 1 to 100 letters, digits, '_' and '-'"
        )))
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl NatsBroker {
    /// Connects to `url`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the server cannot be reached.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, BrokerError> {
        let client = async_nats::connect(url).await.map_err(unavailable)?;
        Ok(Self::new(client, config))
    }

    /// A broker over a connection the caller made.
    #[must_use]
    pub fn new(client: async_nats::Client, config: NatsConfig) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            config,
            ready: Mutex::new(HashSet::new()),
        }
    }

    /// The JetStream stream of a topic.
    #[must_use]
    pub fn stream_name(&self, topic: &str) -> String {
        format!("{}_{topic}", self.config.stream_prefix)
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.config.subject_prefix)
    }

    async fn ensure_stream(&self, topic: &str) -> Result<stream::Stream, BrokerError> {
        check_name("topic", topic)?;
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.stream_name(topic),
                subjects: vec![self.subject(topic)],
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.max_age,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        self.ready.lock().expect("lock").insert(topic.to_owned());
        Ok(stream)
    }

    fn encode(&self, m: &BrokerMessage) -> Result<PublishMessage, BrokerError> {
        let payload = serde_json::to_vec(&m.payload).map_err(|e| BrokerError::Rejected(e.to_string()))?;
        let mut headers = HeaderMap::new();
        let mut size = payload.len();
        for (k, v) in &m.headers {
            if k.eq_ignore_ascii_case(KEY_HEADER) || k.eq_ignore_ascii_case(ID_HEADER) {
                return Err(BrokerError::Rejected(format!("header {k} is reserved")));
            }
            let valid_name = !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !valid_name || v.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(BrokerError::Rejected(format!(
                    "header {k:?} has a name or value NATS cannot carry"
                )));
            }
            size += k.len() + v.len() + 4;
            headers.insert(k.as_str(), v.as_str());
        }
        if m.key.is_empty() || m.key.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(BrokerError::Rejected("the key must be one non-empty line".into()));
        }
        size += m.key.len();
        if size > self.config.max_message_bytes {
            return Err(BrokerError::Rejected(format!(
                "message of {size} bytes is over the limit of {}",
                self.config.max_message_bytes
            )));
        }
        headers.insert(KEY_HEADER, m.key.as_str());
        Ok(PublishMessage::build()
            .payload(Bytes::from(payload))
            .headers(headers)
            .message_id(m.id.to_string()))
    }
}

fn publish_error(kind: PublishErrorKind, e: impl std::fmt::Display) -> BrokerError {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => BrokerError::Rejected(e.to_string()),
        _ => BrokerError::Unavailable(e.to_string()),
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, messages: &[BrokerMessage]) -> Vec<Result<(), BrokerError>> {
        let mut results: Vec<Result<(), BrokerError>> = Vec::with_capacity(messages.len());
        for topic in messages.iter().map(|m| m.topic.as_str()).collect::<HashSet<_>>() {
            if !self.ready.lock().expect("lock").contains(topic)
                && let Err(e) = self.ensure_stream(topic).await
            {
                tracing::debug!(topic, error = %e, "stream not ready");
            }
        }
        // Send them all, then wait for the acknowledgements.
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let sent = match self.encode(m) {
                Ok(msg) => self
                    .js
                    .send_publish(self.subject(&m.topic), msg)
                    .await
                    .map_err(|e| publish_error(e.kind(), e)),
                Err(e) => Err(e),
            };
            pending.push(sent);
        }
        let acks = futures::future::join_all(pending.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack.await.map(drop).map_err(|e| publish_error(e.kind(), e)),
                Err(e) => Err(e),
            }
        }))
        .await;
        results.extend(acks);
        results
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn BrokerConsumer>, BrokerError> {
        check_name("group", group)?;
        let stream = self.ensure_stream(topic).await?;
        let consumer = stream
            .get_or_create_consumer(
                group,
                pull::Config {
                    durable_name: Some(group.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: self.config.ack_wait,
                    max_ack_pending: self.config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(Box::new(NatsConsumer {
            client: self.client.clone(),
            consumer,
            topic: topic.to_owned(),
        }))
    }
}

/// A member of a durable pull consumer.
struct NatsConsumer {
    client: async_nats::Client,
    consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    topic: String,
}

impl NatsConsumer {
    /// One pull request: without `wait`, only what is available now; with it, held by the
    /// server until `max` messages came or `wait` passed.
    async fn pull(&self, max: usize, wait: Option<Duration>) -> Result<Vec<Delivery>, BrokerError> {
        let mut batch = match wait {
            None => self
                .consumer
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(unavailable)?,
            Some(wait) => self
                .consumer
                .batch()
                .max_messages(max)
                .expires(wait.max(Duration::from_millis(10)))
                .messages()
                .await
                .map_err(unavailable)?,
        };
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(unavailable)?;
            match self.delivery(&msg) {
                Ok(d) => out.push(d),
                Err(e) => {
                    // Not a message of ours: stop its redelivery rather than loop on it.
                    tracing::warn!(topic = %self.topic, error = %e, "terminating a foreign message");
                    msg.ack_with(AckKind::Term).await.map_err(unavailable)?;
                }
            }
        }
        Ok(out)
    }

    fn delivery(&self, msg: &jetstream::Message) -> Result<Delivery, BrokerError> {
        let info = msg.info().map_err(unavailable)?;
        let headers = msg.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let id = header(ID_HEADER)
            .and_then(|s| Uuid::parse_str(&s).ok())
            .ok_or_else(|| BrokerError::Rejected("a message without a valid Nats-Msg-Id".into()))?;
        let key = header(KEY_HEADER).unwrap_or_default();
        let mut user = BTreeMap::new();
        if let Some(h) = headers {
            for (name, values) in h.iter() {
                let name: &str = name.as_ref();
                if name.eq_ignore_ascii_case(KEY_HEADER) || name.eq_ignore_ascii_case(ID_HEADER) {
                    continue;
                }
                if let Some(v) = values.first() {
                    user.insert(name.to_owned(), v.as_str().to_owned());
                }
            }
        }
        let payload = serde_json::from_slice(&msg.payload).map_err(|e| BrokerError::Rejected(e.to_string()))?;
        Ok(Delivery {
            message: BrokerMessage {
                id,
                topic: self.topic.clone(),
                key,
                payload,
                headers: user,
            },
            sequence: info.stream_sequence,
            attempt: u64::try_from(info.delivered).unwrap_or(1).max(1),
            token: msg.reply.as_ref().map(ToString::to_string).unwrap_or_default(),
        })
    }

    async fn reply(&self, delivery: &Delivery, kind: AckKind) -> Result<(), BrokerError> {
        if delivery.token.is_empty() {
            return Err(BrokerError::Rejected("not a delivery of this consumer".into()));
        }
        self.client
            .publish(delivery.token.clone(), Bytes::from(kind))
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl BrokerConsumer for NatsConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        // What is there now; if nothing, wait for one message (a request for exactly one ends as
        // soon as it arrives), then take what followed it. A request for more than is there would
        // be held by the server until it expires.
        let max = max.max(1);
        let mut out = self.pull(max, None).await?;
        if out.is_empty() && !wait.is_zero() {
            out = self.pull(1, Some(wait)).await?;
            if !out.is_empty() && max > 1 {
                out.extend(self.pull(max - 1, None).await?);
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), BrokerError> {
        self.reply(delivery, AckKind::Ack).await
    }

    async fn nack(&mut self, delivery: &Delivery, delay: Duration) -> Result<(), BrokerError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.reply(delivery, AckKind::Nak(delay)).await
    }
}
