//! The Concord event store as a broker.

use super::{Broker, BrokerConsumer, BrokerError, BrokerMessage, Delivery};
use crate::{Client, ClientError, EventInput, EventOut, ExpectedVersion};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The most events one fetch asks the server for.
const MAX_FETCH: usize = 1000;

/// A broker over a Concord server's event store, through the sdk [`Client`] (which needs the
/// `events:write` scope to publish and `events:read` to consume).
///
/// Keys must be valid in stream names (letters, digits and `-_.:@`); others are
/// [`BrokerError::Rejected`]. Members of one consumer group split the topic's streams by a hash
/// of the stream name ([`EventStoreBroker::member`]); each member sees its keys in order.
#[derive(Clone)]
pub struct EventStoreBroker {
    client: Client,
    member: u32,
    size: u32,
}

impl EventStoreBroker {
    /// A broker whose consumers are the only member of their group.
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self {
            client,
            member: 0,
            size: 1,
        }
    }

    /// Consumers of this broker are member `member` of `size` in their groups.
    #[must_use]
    pub fn member(mut self, member: u32, size: u32) -> Self {
        self.member = member;
        self.size = size.max(1);
        self
    }
}

fn check_topic(topic: &str) -> Result<(), BrokerError> {
    let ok = !topic.is_empty()
        && topic.len() <= 100
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::Rejected(
            "a topic is 1 to 100 letters, digits and _.:@ (it names a stream category)".into(),
        ))
    }
}

fn broker_error(e: &ClientError) -> BrokerError {
    match e.status() {
        Some(s) if (400..500).contains(&s) && !matches!(s, 401 | 403 | 408 | 425 | 429) => {
            BrokerError::Rejected(e.to_string())
        }
        _ => BrokerError::Unavailable(e.to_string()),
    }
}

async fn publish_one(client: &Client, m: &BrokerMessage) -> Result<(), BrokerError> {
    check_topic(&m.topic)?;
    if m.key.is_empty() {
        return Err(BrokerError::Rejected("the key must not be empty".into()));
    }
    let stream = format!("{}-{}", m.topic, m.key);
    let event = EventInput {
        id: Some(m.id),
        event_type: m.headers.get("type").cloned().unwrap_or_else(|| m.topic.clone()),
        data: m.payload.clone(),
        metadata: Some(json!({ "headers": m.headers })),
    };
    client
        .append(&stream, ExpectedVersion::Any, vec![event])
        .await
        .map(drop)
        .map_err(|e| broker_error(&e))
}

#[async_trait]
impl Broker for EventStoreBroker {
    async fn publish(&self, messages: &[BrokerMessage]) -> Vec<Result<(), BrokerError>> {
        futures::future::join_all(messages.iter().map(|m| publish_one(&self.client, m))).await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn BrokerConsumer>, BrokerError> {
        check_topic(topic)?;
        if group.is_empty() {
            return Err(BrokerError::Rejected("the group must not be empty".into()));
        }
        Ok(Box::new(EventStoreConsumer {
            client: self.client.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            member: self.member,
            size: self.size,
            outstanding: BTreeMap::new(),
            delivered_up_to: 0,
            seen_up_to: 0,
            attempts: HashMap::new(),
            rewind: None,
        }))
    }
}

/// A member of a consumer group of the event store: the server keeps the group's checkpoint;
/// this member moves it over the prefix of deliveries that are acknowledged.
struct EventStoreConsumer {
    client: Client,
    topic: String,
    group: String,
    member: u32,
    size: u32,
    /// Delivered, not yet behind the checkpoint: position → acknowledged.
    outstanding: BTreeMap<u64, bool>,
    /// The highest position handed out since the last rewind.
    delivered_up_to: u64,
    /// The highest position ever handed out (a position at or below it is a redelivery).
    seen_up_to: u64,
    attempts: HashMap<u64, u64>,
    /// A nack asked for redelivery from the checkpoint, not before this delay.
    rewind: Option<Duration>,
}

impl EventStoreConsumer {
    async fn flush_checkpoint(&mut self) -> Result<(), BrokerError> {
        let mut done = None;
        while let Some((&pos, &acked)) = self.outstanding.first_key_value() {
            if !acked {
                break;
            }
            self.outstanding.pop_first();
            self.attempts.remove(&pos);
            done = Some(pos);
        }
        if let Some(pos) = done {
            self.client
                .save_checkpoint(&self.group, self.member, pos)
                .await
                .map_err(|e| broker_error(&e))?;
        }
        Ok(())
    }

    fn delivery(&mut self, e: EventOut) -> Delivery {
        let attempt = if e.position <= self.seen_up_to {
            let a = self.attempts.entry(e.position).or_insert(1);
            *a += 1;
            *a
        } else {
            1
        };
        let key = e.stream.split_once('-').map_or_else(String::new, |(_, k)| k.to_owned());
        let mut headers: BTreeMap<String, String> = match e.metadata.get("headers") {
            Some(Value::Object(h)) => h
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect(),
            _ => BTreeMap::new(),
        };
        // Events appended by a service rather than published carry their type only as the event
        // type: hand it over as the `type` header publishing reads it from.
        headers.entry("type".to_owned()).or_insert(e.event_type);
        Delivery {
            message: BrokerMessage {
                id: e.id,
                topic: self.topic.clone(),
                key,
                payload: e.data,
                headers,
            },
            sequence: e.position,
            attempt,
            token: e.position.to_string(),
        }
    }
}

fn position_of(d: &Delivery) -> Result<u64, BrokerError> {
    d.token
        .parse()
        .map_err(|_| BrokerError::Rejected("not a delivery of this consumer".into()))
}

#[async_trait]
impl BrokerConsumer for EventStoreConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.flush_checkpoint().await?;
        if let Some(delay) = self.rewind.take() {
            tokio::time::sleep(delay).await;
            // Deliver again from the checkpoint, all but what was acknowledged meanwhile.
            self.outstanding.retain(|_, acked| *acked);
            self.delivered_up_to = 0;
        }
        let limit = (max + self.outstanding.len()).clamp(1, MAX_FETCH);
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let page = self
            .client
            .group_events(
                &self.group,
                self.member,
                self.size,
                Some(&self.topic),
                wait_ms,
                u32::try_from(limit).unwrap_or(u32::MAX),
            )
            .await
            .map_err(|e| broker_error(&e))?;
        let mut out = Vec::new();
        for e in page.events {
            if e.position <= self.delivered_up_to || out.len() >= max {
                continue;
            }
            if self.outstanding.get(&e.position) == Some(&true) {
                self.delivered_up_to = e.position;
                continue;
            }
            self.delivered_up_to = e.position;
            self.outstanding.insert(e.position, false);
            let d = self.delivery(e);
            self.seen_up_to = self.seen_up_to.max(d.sequence);
            out.push(d);
        }
        Ok(out)
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), BrokerError> {
        let pos = position_of(delivery)?;
        if let Some(acked) = self.outstanding.get_mut(&pos) {
            *acked = true;
        }
        // The checkpoint moves once per fetched batch: when its last delivery is acknowledged
        // (and at the next fetch for a batch acknowledged only in part).
        if self.rewind.is_none() && self.outstanding.values().all(|&a| a) {
            self.flush_checkpoint().await?;
        }
        Ok(())
    }

    async fn nack(&mut self, delivery: &Delivery, delay: Duration) -> Result<(), BrokerError> {
        position_of(delivery)?;
        self.rewind = Some(self.rewind.map_or(delay, |d| d.max(delay)));
        Ok(())
    }
}
