//! Saga logs (`saga-{id}`) hold saga inputs and participant outputs: reading them needs
//! `sagas:read` (or `admin`) however the events are read (one stream, the log, SSE, a group).

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app};
use concord_sdk::{Client, Subscription};
use reqwest::{Method, Response};
use serde_json::Value;
use std::time::Duration;

/// Writes an event to `saga-x` as Concord does (no key may), then appends one to `order-1`;
/// returns their positions.
async fn given_a_saga_log_and_an_order(app: &TestApp) -> (u64, u64) {
    let saga = app.seed_one("saga-x", "SagaStarted").await;
    let order = app.append_one("order-1", "Placed").await;
    (saga["position"].as_u64().unwrap(), order["position"].as_u64().unwrap())
}

async fn get(app: &TestApp, key: &str, path: &str) -> Response {
    app.request(Method::GET, path, Some(key)).send().await.unwrap()
}

async fn page(app: &TestApp, key: &str, path: &str) -> Value {
    let r = get(app, key, path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

fn streams(page: &Value) -> Vec<&str> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect()
}

/// The streams of the next `n` events of a subscription, each within 10 s.
async fn next_streams(sub: &mut Subscription, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("event decodes");
        seen.push(e.stream);
    }
    seen
}

/// The raw SSE text sent after `Last-Event-ID: last_event_id`, read until it mentions `until`.
async fn sse_resumed_until(app: &TestApp, key: &str, last_event_id: u64, until: &str) -> String {
    let mut r = app
        .request(Method::GET, "/v1/events/subscribe", Some(key))
        .header("last-event-id", last_event_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    while !text.contains(until) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .unwrap_or_else(|_| panic!("{until} within 10 s; got {text:?}"))
            .unwrap()
            .expect("stream open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    text
}

async fn a_key_without_sagas_read_never_sees_a_saga_log(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (saga, order) = given_a_saga_log_and_an_order(&app).await;
    let reader = app.create_key(&["events:read"]).await;

    let p = assert_problem(get(&app, &reader, "/v1/streams/saga-x").await, 403, "forbidden").await;
    assert!(p["detail"].as_str().unwrap().contains("sagas:read"), "{p}");
    for path in [
        "/v1/events?category=saga",
        "/v1/events/subscribe?category=saga",
        "/v1/subscriptions/g/events?category=saga",
    ] {
        assert_problem(get(&app, &reader, path).await, 403, "forbidden").await;
    }

    let log = page(&app, &reader, "/v1/events").await;
    assert_eq!(streams(&log), ["order-1"]);
    assert_eq!(log["next"], order, "past both events");
    // A page of hidden events only is empty, yet its cursor moves past them.
    let log = page(&app, &reader, "/v1/events?limit=1").await;
    assert!(streams(&log).is_empty(), "{log}");
    assert_eq!(log["next"], saga);
    let group = page(&app, &reader, "/v1/subscriptions/g/events").await;
    assert_eq!(streams(&group), ["order-1"]);
    assert_eq!(group["next"], order);

    // SSE leaves the saga log out, in catch-up and live alike.
    let client = Client::new(app.address.clone(), reader.clone()).unwrap();
    let mut sub = client.subscribe(0, None).await.unwrap();
    assert_eq!(next_streams(&mut sub, 1).await, ["order-1"]);
    app.seed_one("saga-x", "StepSucceeded").await;
    app.append_one("order-2", "Placed").await;
    assert_eq!(next_streams(&mut sub, 1).await, ["order-2"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "nothing more"
    );
    // Resuming after the last event seen skips the hidden one again.
    let resumed = sse_resumed_until(&app, &reader, order, "order-2").await;
    assert!(!resumed.contains("saga-x"), "{resumed}");
}
both_backends!(a_key_without_sagas_read_never_sees_a_saga_log);

async fn a_key_with_sagas_read_or_admin_sees_saga_logs_everywhere(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (saga, order) = given_a_saga_log_and_an_order(&app).await;
    let saga_reader = app.create_key(&["events:read", "sagas:read"]).await;

    for key in [saga_reader.as_str(), app.admin_key.as_str()] {
        let stream = page(&app, key, "/v1/streams/saga-x").await;
        assert_eq!(streams(&stream), ["saga-x"]);
        let log = page(&app, key, "/v1/events").await;
        assert_eq!(streams(&log), ["saga-x", "order-1"]);
        assert_eq!(log["next"], order);
        let sagas = page(&app, key, "/v1/events?category=saga").await;
        assert_eq!(streams(&sagas), ["saga-x"]);
        assert_eq!(sagas["next"], saga);
        let group = page(&app, key, "/v1/subscriptions/g/events").await;
        assert_eq!(streams(&group), ["saga-x", "order-1"]);

        let client = Client::new(app.address.clone(), key.to_owned()).unwrap();
        let mut sub = client.subscribe(0, None).await.unwrap();
        assert_eq!(next_streams(&mut sub, 2).await, ["saga-x", "order-1"]);
        let mut sub = client.subscribe(0, Some("saga")).await.unwrap();
        assert_eq!(next_streams(&mut sub, 1).await, ["saga-x"]);
    }
}
both_backends!(a_key_with_sagas_read_or_admin_sees_saga_logs_everywhere);
