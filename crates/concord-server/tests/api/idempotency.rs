use crate::both_backends;
use crate::helpers::{Backend, assert_problem, spawn_app};
use concord_core::app::auth::authenticate;
use concord_core::domain::{IdempotencyKey, KeyHash};
use concord_core::ports::{IdempotencyBegin, IdempotencyClaim};
use reqwest::Method;
use serde_json::{Value, json};

fn body(n: u32) -> Value {
    json!({"events": [{"type": "E", "data": {"n": n}}]})
}

async fn a_completed_request_is_replayed_not_run_again(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let send = |b: Value, key: &'static str| {
        app.admin(Method::POST, "/v1/streams/pay-1")
            .header("Idempotency-Key", key)
            .json(&b)
            .send()
    };
    let first = send(body(1), "k-1").await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = send(body(1), "k-1").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.log_len().await, 1, "the replay wrote nothing");

    let other = send(body(2), "k-1").await.unwrap();
    assert_problem(other, 422, "idempotency_key_reused").await;
    // Error answers are replayed too: the same bad request gets the same answer.
    let bad = json!({"expected_version": 99, "events": [{"type": "E", "data": {}}]});
    let r = send(bad.clone(), "k-2").await.unwrap();
    assert_problem(r, 409, "wrong_expected_version").await;
    let r = send(bad, "k-2").await.unwrap();
    assert_eq!(r.headers().get("idempotent-replayed").unwrap(), "true");
    assert_problem(r, 409, "wrong_expected_version").await;
    let r = app
        .admin(Method::POST, "/v1/streams/pay-1")
        .header("Idempotency-Key", "has space")
        .json(&body(1))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_idempotency_key").await;
}
both_backends!(a_completed_request_is_replayed_not_run_again);

async fn a_key_in_flight_answers_409(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    // Another node holds the key right now: claim it directly in the store, as the layer would.
    let owner = authenticate(app.state.keys.as_ref(), &KeyHash::of(&app.admin_key))
        .await
        .unwrap()
        .unwrap()
        .key_id;
    let key = IdempotencyKey::parse("busy").unwrap();
    let raw = serde_json::to_vec(&body(1)).unwrap();
    let now = chrono::Utc::now();
    let claim = IdempotencyClaim {
        owner,
        key: &key,
        fingerprint: app
            .state
            .idempotency_layer
            .config()
            .fingerprint(&Method::POST, "/v1/streams/pay-1", &raw),
        now,
        locked_until: now + chrono::Duration::seconds(60),
        expires_at: now + chrono::Duration::hours(1),
    };
    assert_eq!(
        app.state.idempotency.begin(&claim).await.unwrap(),
        IdempotencyBegin::Started
    );
    let r = app
        .admin(Method::POST, "/v1/streams/pay-1")
        .header("Idempotency-Key", "busy")
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "idempotency_key_in_flight").await;
    assert_eq!(app.log_len().await, 0);
}
both_backends!(a_key_in_flight_answers_409);

async fn keys_are_scoped_per_api_key(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let other = app.create_key(&["events:write"]).await;
    for key in [app.admin_key.as_str(), other.as_str()] {
        let r = app
            .request(Method::POST, "/v1/streams/pay-1", Some(key))
            .header("Idempotency-Key", "shared")
            .json(&body(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("idempotent-replayed").is_none(),
            "another caller's key is not replayed"
        );
    }
    assert_eq!(app.log_len().await, 2);
}
both_backends!(keys_are_scoped_per_api_key);

#[tokio::test]
async fn concurrent_duplicates_run_the_request_once() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.admin(Method::POST, "/v1/streams/dup-1")
                .header("Idempotency-Key", "same")
                .json(&body(7))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 409), "{statuses:?}");
    assert_eq!(app.log_len().await, 1, "the append ran exactly once");
}

/// A keyed append whose record is gone (left locked by a crash, then expired) and that runs
/// again appends nothing new: its events' ids were derived from the caller and the key, so the
/// store answers the second run as a replay.
async fn a_keyed_append_run_twice_appends_once(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let send = || {
        app.admin(Method::POST, "/v1/streams/pay-2")
            .header("Idempotency-Key", "crash-1")
            .json(&json!({"expected_version": "any", "events": [{"type": "E", "data": {"n": 1}}, {"type": "E", "data": {"n": 2}}]}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    // The record disappears as an expired one does.
    let purged = app
        .state
        .idempotency
        .purge_expired(chrono::Utc::now() + chrono::Duration::days(400))
        .await
        .unwrap();
    assert!(purged >= 1);
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.headers().get("idempotent-replayed").is_none(), "it ran again");
    assert_eq!(again.json::<Value>().await.unwrap(), first, "answered as the first run");
    assert_eq!(app.log_len().await, 2, "two events, not four");
}
both_backends!(a_keyed_append_run_twice_appends_once);
