//! The event store as a broker passes the broker conformance suite, against the real binary.

#[path = "support/proc.rs"]
mod proc;

use concord_sdk::broker::{Broker, BrokerError, EventStoreBroker};

#[tokio::test]
async fn the_event_store_broker_passes_the_broker_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = proc::Server::start(proc::serve(dir.path())).await;
    let broker = EventStoreBroker::new(server.sdk());
    concord_core::testkit::broker_suite(&broker).await;

    // Keys outside the stream-name alphabet and topics with '-' are refused, not mangled.
    let topic = concord_core::testkit::fresh_topic();
    let bad_key = concord_core::testkit::message(&topic, "a key", 1);
    let bad_topic = concord_core::testkit::message("a-b", "k", 2);
    let results = broker.publish(&[bad_key, bad_topic]).await;
    assert!(matches!(results[0], Err(BrokerError::Rejected(_))), "{results:?}");
    assert!(matches!(results[1], Err(BrokerError::Rejected(_))), "{results:?}");
    // A key without the scope to write is unavailable to publish, not a rejection of the message.
    let reader = server.sdk().create_key("reader", &["events:read"]).await.unwrap();
    let weak = EventStoreBroker::new(concord_sdk::Client::new(server.url.clone(), reader.key).unwrap());
    let results = weak.publish(&[concord_core::testkit::message(&topic, "k", 3)]).await;
    assert!(matches!(results[0], Err(BrokerError::Unavailable(_))), "{results:?}");
}
