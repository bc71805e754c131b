//! Flow control per participant host: limits shared by every node, `Retry-After` holds and the
//! circuit breaker, against a participant that counts what reaches it.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app, spawn_app_with, spawn_second_node};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const UP: u8 = 0;
const DOWN: u8 = 1;
const THROTTLE_ONCE: u8 = 2;

/// A participant whose answers the test switches, recording when each call arrived and how
/// many were in at once.
#[derive(Default)]
struct Host {
    mode: AtomicU8,
    /// How long the next call sleeps before answering (taken by that call only).
    slow_next_ms: AtomicU64,
    /// How long every call sleeps.
    delay_ms: AtomicU64,
    arrivals: Mutex<Vec<(Instant, String)>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

async fn step(State(h): State<Arc<Host>>, headers: axum::http::HeaderMap) -> axum::response::Response {
    let saga = headers
        .get("concord-saga-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    h.arrivals.lock().unwrap().push((Instant::now(), saga));
    let now = h.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    h.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let slow = h.slow_next_ms.swap(0, Ordering::SeqCst) + h.delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(slow)).await;
    h.in_flight.fetch_sub(1, Ordering::SeqCst);
    match h.mode.load(Ordering::SeqCst) {
        DOWN => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
        THROTTLE_ONCE => {
            h.mode.store(UP, Ordering::SeqCst);
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2")], "slow down").into_response()
        }
        _ => axum::Json(json!({"ok": true})).into_response(),
    }
}

async fn host() -> (Arc<Host>, String) {
    let h = Arc::new(Host::default());
    let app = axum::Router::new()
        .route("/step", axum::routing::post(step))
        .route("/undo", axum::routing::post(|| async { axum::Json(json!({})) }))
        .with_state(h.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (h, authority)
}

async fn define(app: &TestApp, authority: &str, max_attempts: u32, timeout_ms: u64) {
    let def = json!({"steps": [{
        "name": "call",
        "action": {"method": "POST", "url": format!("http://{authority}/step")},
        "compensation": {"method": "POST", "url": format!("http://{authority}/undo")},
        "retry": {"max_attempts": max_attempts, "backoff_ms": 20, "max_backoff_ms": 100},
        "timeout_ms": timeout_ms
    }]});
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/flow")
        .json(&def)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

async fn start(app: &TestApp, id: &str) {
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "flow", "id": id, "input": {}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "start {id}: {}", r.status());
}

async fn get(app: &TestApp, path: &str) -> Value {
    let r = app.admin(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn finished(app: &TestApp, id: &str) -> Value {
    let saga = get(app, &format!("/v1/sagas/{id}?wait_ms=30000")).await;
    assert!(
        ["completed", "compensated", "failed", "cancelled"].contains(&saga["status"].as_str().unwrap()),
        "{saga}"
    );
    saga
}

async fn until(app: &TestApp, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..600 {
        let saga = get(app, &format!("/v1/sagas/{id}")).await;
        if pred(&saga) {
            return saga;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("saga {id} never {what}");
}

fn attempts(saga: &Value) -> usize {
    saga["steps"][0]["attempts"].as_array().map_or(0, Vec::len)
}

async fn put_limits(app: &TestApp, host: &str, body: &Value) -> reqwest::Response {
    app.admin(Method::PUT, &format!("/v1/participant-limits/{host}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn limits_are_validated_and_need_admin(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let r = put_limits(&app, "payments:8082", &json!({"max_concurrency": 4, "max_per_s": 2.5})).await;
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(
        (
            &out["host"],
            &out["max_concurrency"],
            &out["max_per_s"],
            &out["breaker"]
        ),
        (&json!("payments:8082"), &json!(4), &json!(2.5), &json!("closed"))
    );
    // Written as allow-lists write it, in any case.
    let r = put_limits(&app, "Inventory", &json!({"max_per_s": 100})).await;
    assert_eq!(r.status(), 200);
    let page = get(&app, "/v1/participant-limits").await;
    let hosts: Vec<&str> = page["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["inventory", "payments:8082"]);
    // Both left out: no limit.
    let r = put_limits(&app, "inventory", &json!({})).await;
    let out: Value = r.json().await.unwrap();
    assert!(out.get("max_per_s").is_none(), "{out}");
    // A host never set reads as open to calls.
    let fresh = get(&app, "/v1/participant-limits/shipping").await;
    assert_eq!(fresh["breaker"], "closed");
    assert_eq!(fresh["in_flight"], 0);

    for bad in ["x:0", "x:70000", "a%20b"] {
        let r = put_limits(&app, bad, &json!({"max_concurrency": 1})).await;
        assert_problem(r, 400, "invalid_participant_host").await;
    }
    for bad in [
        json!({"max_concurrency": 0}),
        json!({"max_per_s": 0}),
        json!({"max_per_s": -1}),
    ] {
        let r = put_limits(&app, "payments", &bad).await;
        assert_problem(r, 400, "invalid_participant_limits").await;
    }
    let r = put_limits(&app, "payments", &json!({"max_concurrency": "many"})).await;
    assert_problem(r, 400, "malformed_json").await;
    // Nothing was written by the refused puts.
    let page = get(&app, "/v1/participant-limits").await;
    assert_eq!(page["participants"].as_array().unwrap().len(), 2, "{page}");

    // Setting limits is an administrator's; reading them is a saga reader's.
    let reader = app.create_key(&["sagas:read", "sagas:write"]).await;
    let r = app
        .request(Method::PUT, "/v1/participant-limits/payments", Some(&reader))
        .json(&json!({"max_concurrency": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::GET, "/v1/participant-limits/payments:8082", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .request(Method::GET, "/v1/participant-limits", None)
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
}
both_backends!(limits_are_validated_and_need_admin);

async fn a_429_with_retry_after_holds_every_sagas_next_call_to_that_host(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (h, authority) = host().await;
    h.mode.store(THROTTLE_ONCE, Ordering::SeqCst);
    define(&app, &authority, 5, 2000).await;
    start(&app, "ra-1").await;
    // Its first attempt's 429 is recorded (and the hold with it) before the others start.
    until(&app, "ra-1", "saw its 429", |s| attempts(s) >= 1).await;
    let throttled_at = h.arrivals.lock().unwrap()[0].0;
    let shown = get(&app, &format!("/v1/participant-limits/{authority}")).await;
    assert!(shown["held_until"].is_string(), "{shown}");
    for id in ["ra-2", "ra-3"] {
        start(&app, id).await;
    }
    for id in ["ra-1", "ra-2", "ra-3"] {
        let saga = finished(&app, id).await;
        assert_eq!(saga["status"], "completed", "{saga}");
        // Held back, the later sagas spent no attempt.
        let expected = if id == "ra-1" { 2 } else { 1 };
        assert_eq!(attempts(&saga), expected, "{saga}");
    }
    let arrivals = h.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 4);
    for (at, saga) in &arrivals[1..] {
        let after = at.duration_since(throttled_at);
        assert!(
            after >= Duration::from_secs(2),
            "{saga}'s call came {after:?} after the 429"
        );
    }
}
both_backends!(a_429_with_retry_after_holds_every_sagas_next_call_to_that_host);

async fn an_open_breaker_parks_sagas_without_spending_attempts_and_releases_them_when_a_probe_succeeds(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.participant_breaker_failures = 3;
        s.participant_breaker_open_ms = 1000;
    })
    .await
    else {
        return;
    };
    let (h, authority) = host().await;
    h.mode.store(DOWN, Ordering::SeqCst);
    // Without the breaker, ten attempts 20-100 ms apart are spent well within the outage.
    define(&app, &authority, 10, 4000).await;
    let ids: Vec<String> = (0..6).map(|i| format!("br-{i}")).collect();
    for id in &ids {
        start(&app, id).await;
    }
    // The breaker opens and the sagas wait on it, showing the host they wait for.
    let parked = until(&app, "br-5", "waited for its host", |s| {
        s.get("waiting_for_host").is_some()
    })
    .await;
    let waiting = &parked["waiting_for_host"];
    assert_eq!(waiting["host"], authority, "{parked}");
    assert!(
        ["open", "half_open"].contains(&waiting["breaker"].as_str().unwrap()),
        "{parked}"
    );
    assert!(waiting["failures"].as_u64().unwrap() >= 3, "{parked}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = h.arrivals.lock().unwrap().len();
    // Six first attempts, a few retries that went out before the third failure was counted,
    // then one probe a second; without the breaker, sixty attempts would have been spent.
    assert!(during <= 20, "{during} calls reached a host that was down");
    let shown = get(&app, &format!("/v1/participant-limits/{authority}")).await;
    assert!(
        shown["opened"].as_u64().unwrap() >= 2,
        "a failed probe opens it again: {shown}"
    );

    // The host comes back, slowly at first: the sagas that come due while the probe is out wait
    // for it, and its success releases them at once, not when the probe's place would lapse
    // (its 4 s timeout and 5 s grace).
    h.slow_next_ms.store(1500, Ordering::SeqCst);
    let back = Instant::now();
    h.mode.store(UP, Ordering::SeqCst);
    let mut total = 0;
    for id in &ids {
        let saga = finished(&app, id).await;
        assert_eq!(saga["status"], "completed", "{saga}");
        total += attempts(&saga);
    }
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "the sagas came back {took:?} after their host"
    );
    assert_eq!(
        total,
        h.arrivals.lock().unwrap().len(),
        "every call is an attempt in a log"
    );
    let shown = get(&app, &format!("/v1/participant-limits/{authority}")).await;
    assert_eq!(
        (&shown["breaker"], &shown["failures"]),
        (&json!("closed"), &json!(0)),
        "{shown}"
    );
    // Each change is in the breaker journal: opened (and opened again by failed probes), then
    // closed.
    let mut journal = Vec::new();
    for _ in 0..100 {
        journal = get(&app, "/v1/streams/saga-@breakers").await["events"]
            .as_array()
            .unwrap()
            .clone();
        if journal.last().is_some_and(|e| e["type"] == "BreakerClosed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let types: Vec<&str> = journal.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(
        types.len() >= 3 && types[..types.len() - 1].iter().all(|t| *t == "BreakerOpened"),
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"BreakerClosed"), "{types:?}");
    assert!(
        journal.iter().all(|e| e["data"]["host"] == authority.as_str()),
        "{journal:?}"
    );
    assert!(journal[0]["data"]["until"].is_string(), "{journal:?}");
}
both_backends!(an_open_breaker_parks_sagas_without_spending_attempts_and_releases_them_when_a_probe_succeeds);

async fn two_nodes_sharing_a_limit_never_exceed_it_together(b: Backend) {
    let Some(one) = spawn_app(b).await else { return };
    let two = spawn_second_node(&one, |_| {}).await;
    let (h, authority) = host().await;
    h.delay_ms.store(100, Ordering::SeqCst);
    define(&one, &authority, 5, 4000).await;
    // Set on one node, applied by both; the host's name alone covers its every port.
    let r = put_limits(&one, "127.0.0.1", &json!({"max_concurrency": 2})).await;
    assert_eq!(r.status(), 200);
    let ids: Vec<String> = (0..12).map(|i| format!("lim-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        start(if i % 2 == 0 { &one } else { &two }, id).await;
    }
    for id in &ids {
        let saga = finished(&one, id).await;
        assert_eq!(saga["status"], "completed", "{saga}");
        assert_eq!(attempts(&saga), 1, "held back, a saga spends no attempt: {saga}");
    }
    let most = h.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} calls were in at once, over the limit of 2");
    assert_eq!(most, 2, "the limit was reached");

    // A rate: calls spaced evenly, from both nodes together.
    let r = put_limits(&two, "127.0.0.1", &json!({"max_per_s": 10})).await;
    assert_eq!(r.status(), 200);
    h.delay_ms.store(0, Ordering::SeqCst);
    h.arrivals.lock().unwrap().clear();
    let ids: Vec<String> = (0..8).map(|i| format!("rate-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        start(if i % 2 == 0 { &one } else { &two }, id).await;
    }
    for id in &ids {
        assert_eq!(finished(&two, id).await["status"], "completed");
    }
    let arrivals = h.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 8);
    let span = arrivals[7].0.duration_since(arrivals[0].0);
    assert!(
        span >= Duration::from_millis(650),
        "8 calls at 10/s came within {span:?}"
    );
}
both_backends!(two_nodes_sharing_a_limit_never_exceed_it_together);
