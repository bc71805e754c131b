//! The broker conformance suite against the real NATS JetStream.

use concord_broker_nats::{NatsBroker, NatsConfig};

#[tokio::test]
async fn nats_jetstream_passes_the_broker_suite() {
    let Ok(url) = std::env::var("CONCORD_TEST_NATS_URL") else {
        eprintln!("skipped: CONCORD_TEST_NATS_URL is not set");
        return;
    };
    let broker = NatsBroker::connect(&url, test_config()).await.expect("connect");
    concord_core::testkit::broker_suite(&broker).await;
}

#[tokio::test]
async fn oversized_and_malformed_messages_are_rejected_not_sent() {
    let Ok(url) = std::env::var("CONCORD_TEST_NATS_URL") else {
        eprintln!("skipped: CONCORD_TEST_NATS_URL is not set");
        return;
    };
    let config = NatsConfig {
        max_message_bytes: 1000,
        ..test_config()
    };
    let broker = NatsBroker::connect(&url, config).await.expect("connect");
    use concord_core::ports::{Broker, BrokerError};
    let topic = concord_core::testkit::fresh_topic();
    let mut big = concord_core::testkit::message(&topic, "k", 1);
    big.payload = serde_json::json!({ "blob": "x".repeat(2000) });
    let mut bad_header = concord_core::testkit::message(&topic, "k", 2);
    bad_header.headers.insert("Concord-Key".into(), "other".into());
    let mut bad_topic = concord_core::testkit::message("a.b", "k", 3);
    bad_topic.topic = "a.b".into();
    let ok = concord_core::testkit::message(&topic, "k", 4);
    let results = broker.publish(&[big, bad_header, ok, bad_topic]).await;
    assert!(matches!(results[0], Err(BrokerError::Rejected(_))), "{results:?}");
    assert!(matches!(results[1], Err(BrokerError::Rejected(_))), "{results:?}");
    assert!(results[2].is_ok(), "{results:?}");
    assert!(results[3].is_err(), "{results:?}");
    let mut consumer = broker.subscribe(&topic, "only").await.expect("subscribe");
    let got = consumer
        .fetch(10, std::time::Duration::from_millis(500))
        .await
        .expect("fetch");
    assert_eq!(got.len(), 1, "only the valid message reached the stream");
    assert_eq!(got[0].message.payload["n"], 4);
}

/// Test streams age out instead of piling up on the shared server.
fn test_config() -> NatsConfig {
    NatsConfig {
        max_age: std::time::Duration::from_secs(600),
        ..NatsConfig::default()
    }
}
