//! The conformance suite of the [`Broker`] port.

use crate::ports::{Broker, BrokerMessage, Delivery};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A topic name no earlier run used, valid on every adapter (letters and digits only).
#[must_use]
pub fn fresh_topic() -> String {
    format!("suite{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A message of `topic` and `key` whose payload records `n`.
#[must_use]
pub fn message(topic: &str, key: &str, n: u64) -> BrokerMessage {
    let mut headers = BTreeMap::new();
    headers.insert("type".to_owned(), "Counted".to_owned());
    headers.insert("n".to_owned(), n.to_string());
    BrokerMessage {
        id: Uuid::now_v7(),
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload: json!({ "key": key, "n": n }),
        headers,
    }
}

/// Fetches from `consumer` until `count` deliveries arrived or `patience` passed.
async fn fetch_n(consumer: &mut dyn crate::ports::BrokerConsumer, count: usize, patience: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        let batch = consumer
            .fetch(count - got.len(), Duration::from_millis(200))
            .await
            .expect("fetch");
        got.extend(batch);
    }
    got
}

/// Every [`Broker`] adapter passes this: publish acknowledged, per-key order, payload and headers
/// kept, acknowledged messages not delivered again, unacknowledged ones delivered again with a
/// higher attempt, a second publish of one message id delivered once, separate groups each
/// seeing everything.
///
/// # Panics
/// On the first broken expectation.
pub async fn broker_suite(broker: &dyn Broker) {
    let topic = fresh_topic();
    // Per-key order: each key's messages published one wave at a time, keys in parallel.
    let keys = ["a", "b", "c"];
    let mut sent = Vec::new();
    for n in 1..=5 {
        let wave: Vec<BrokerMessage> = keys.iter().map(|k| message(&topic, k, n)).collect();
        for r in broker.publish(&wave).await {
            r.expect("publish");
        }
        sent.extend(wave);
    }
    // The same message id again: the broker keeps one copy.
    for r in broker.publish(&sent[..1]).await {
        r.expect("publish of a duplicate is acknowledged");
    }

    let mut consumer = broker.subscribe(&topic, "g1").await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), sent.len() + 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), sent.len(), "every message once, the duplicate dropped");
    for k in keys {
        let ns: Vec<u64> = got
            .iter()
            .filter(|d| d.message.key == k)
            .map(|d| d.message.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, vec![1, 2, 3, 4, 5], "key {k} in publish order");
    }
    let sequences: Vec<u64> = got.iter().map(|d| d.sequence).collect();
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), sequences.len(), "sequences are distinct");
    for d in &got {
        let original = sent.iter().find(|m| m.id == d.message.id).expect("a sent id");
        assert_eq!(&d.message, original, "topic, key, payload and headers kept");
        assert_eq!(d.attempt, 1);
    }

    // Nack the first: it comes again with a higher attempt; ack everything then.
    consumer.nack(&got[0], Duration::ZERO).await.expect("nack");
    for d in &got[1..] {
        consumer.ack(d).await.expect("ack");
    }
    let again = fetch_n(consumer.as_mut(), 1, Duration::from_secs(10)).await;
    let redelivered = again
        .iter()
        .find(|d| d.message.id == got[0].message.id)
        .expect("the nacked message is delivered again");
    assert!(redelivered.attempt >= 2, "a redelivery counts its attempt");
    for d in &again {
        consumer.ack(d).await.expect("ack");
    }
    drop(consumer);

    // A member joining the same group later sees nothing new; a new group sees everything.
    let mut later = broker.subscribe(&topic, "g1").await.expect("subscribe again");
    let rest = later.fetch(100, Duration::from_millis(500)).await.expect("fetch");
    assert!(
        rest.iter().all(|d| d.message.id == got[0].message.id),
        "acknowledged messages are not delivered again: {rest:?}"
    );
    for d in &rest {
        later.ack(d).await.expect("ack");
    }
    let mut other = broker.subscribe(&topic, "g2").await.expect("subscribe g2");
    let all = fetch_n(other.as_mut(), sent.len(), Duration::from_secs(5)).await;
    assert_eq!(all.len(), sent.len(), "another group sees every message");
    for d in &all {
        other.ack(d).await.expect("ack");
    }

    // Bad topic names are refused, not panicked on.
    assert!(broker.subscribe("", "g1").await.is_err(), "empty topic refused");
}
