//! Sagas through the HTTP API against a scripted participant server.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app, spawn_app_with};
use crate::participant::{Effect, Participant, check_saga};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

async fn define(app: &TestApp, name: &str, def: &Value) -> Value {
    let r = app
        .admin(Method::PUT, &format!("/v1/saga-definitions/{name}"))
        .json(def)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "define {name}: {}", r.status());
    r.json().await.unwrap()
}

async fn run(app: &TestApp, definition: &str, id: &str, plan: Value) -> Value {
    let r = app
        .admin(Method::POST, "/v1/sagas?wait_ms=20000")
        .json(&json!({"definition": definition, "id": id, "input": {"plan": plan}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "start {id}");
    r.json().await.unwrap()
}

/// The saga's log, as the event store serves its stream.
async fn saga_log(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/v1/streams/saga-{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn attempts(saga: &Value, step: usize, op: &str) -> usize {
    saga["steps"][step]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["op"] == op)
        .count()
}

async fn definitions_are_validated_and_versioned(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let def = p.definition(&["reserve", "charge"], 1000);
    let put = |d: Value| app.admin(Method::PUT, "/v1/saga-definitions/order").json(&d).send();
    let r = put(def.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let v1: Value = r.json().await.unwrap();
    assert_eq!((v1["name"].as_str(), v1["version"].as_u64()), (Some("order"), Some(1)));
    let r = put(def.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "the same spec is not a new version");
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 1);
    let v2 = p.definition(&["reserve"], 1000);
    assert_eq!(put(v2.clone()).await.unwrap().status(), 201);
    let latest: Value = app
        .admin(Method::GET, "/v1/saga-definitions/order")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(latest["version"], 2);
    assert_eq!(latest["definition"]["steps"].as_array().unwrap().len(), 1);
    let first: Value = app
        .admin(Method::GET, "/v1/saga-definitions/order?version=1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["definition"]["steps"].as_array().unwrap().len(), 2);
    let r = app
        .admin(Method::GET, "/v1/saga-definitions/nope")
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "saga_definition_not_found").await;

    let bad = |f: &dyn Fn(&mut Value)| {
        let mut d = def.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            bad(&|d| d["steps"][0]["action"]["body"] = json!({"x": "{{steps.charge.output.id}}"})),
            "unknown_template_variable",
        ),
        (
            bad(&|d| d["steps"][0]["action"]["body"] = json!({"x": "{{secrets.k}}"})),
            "unknown_template_variable",
        ),
        (
            bad(&|d| d["steps"][0]["action"]["url"] = json!("file:///etc/passwd")),
            "invalid_step_url",
        ),
        (
            bad(&|d| d["steps"][0]["action"]["method"] = json!("CONNECT")),
            "invalid_step_method",
        ),
        (
            bad(&|d| d["steps"][1]["name"] = json!("reserve")),
            "duplicate_step_name",
        ),
        (bad(&|d| d["steps"][0]["timeout_ms"] = json!(0)), "saga_limit_exceeded"),
        (
            bad(&|d| d["steps"][0]["retry"]["max_attempts"] = json!(1000)),
            "saga_limit_exceeded",
        ),
        (
            bad(&|d| d["steps"][0]["action"]["headers"] = json!({"Concord-Saga-Id": "x"})),
            "invalid_step_header",
        ),
        (bad(&|d| d["steps"][0]["unknown"] = json!(1)), "malformed_json"),
    ];
    for (d, code) in cases {
        let r = app
            .admin(Method::PUT, "/v1/saga-definitions/bad")
            .json(&d)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, code).await;
    }
    let many: Vec<Value> = (0..40)
        .map(|i| json!({"name": format!("s{i}"), "action": {"method": "POST", "url": "http://x/y"}}))
        .collect();
    let r = put(json!({"steps": many})).await.unwrap();
    assert_problem(r, 400, "saga_limit_exceeded").await;
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/bad%20name")
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_name").await;
    let r = app.admin(Method::GET, "/v1/saga-definitions/bad").send().await.unwrap();
    assert_problem(r, 404, "saga_definition_not_found").await;
}
both_backends!(definitions_are_validated_and_versioned);

async fn saga_routes_need_their_scopes(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let reader = app.create_key(&["sagas:read"]).await;
    let writer = app.create_key(&["sagas:write", "events:write"]).await;
    let def = json!({"steps": [{"name": "a", "action": {"method": "POST", "url": "http://127.0.0.1:9/a"}}]});
    let r = app
        .request(Method::PUT, "/v1/saga-definitions/o", Some(&reader))
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::PUT, "/v1/saga-definitions/o", None)
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .request(Method::PUT, "/v1/saga-definitions/o", Some(&writer))
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .request(Method::GET, "/v1/sagas", Some(&writer))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::GET, "/v1/sagas", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .request(Method::POST, "/v1/sagas/x/retry", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    // A saga log cannot be forged through the event API, even with events:write, nor by admin.
    let forged = json!({"events": [{"type": "SagaCompleted", "data": {}}]});
    let r = app
        .request(Method::POST, "/v1/streams/saga-x", Some(&writer))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app.append("saga-x", forged).await;
    assert_problem(r, 403, "forbidden").await;
}
both_backends!(saga_routes_need_their_scopes);

async fn a_saga_completes_and_shows_its_timeline(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    define(&app, "order", &p.definition(&["reserve", "charge"], 2000)).await;
    let saga = run(&app, "order", "o-1", json!({"charge": "flaky:2"})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(saga["version"], 1);
    assert_eq!(saga["steps"][0]["output"], json!({"id": "reserve-o-1"}));
    assert_eq!(attempts(&saga, 1, "action"), 3, "two 503s, then success");
    assert_eq!(saga["steps"][1]["attempts"][0]["outcome"], "failed");
    assert!(
        saga["steps"][1]["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("503")
    );
    assert_eq!(check_saga(&p, &saga), None);
    {
        let l = p.ledger.lock().unwrap();
        assert_eq!(l.bad_headers, 0, "Idempotency-Key and Concord-Saga-Id on every call");
        assert_eq!(l.traceparents, 4, "traceparent on every call");
    }
    // The same id again returns the saga and runs nothing (with a wait, so the answer is read
    // from the log: the row may still be a moment behind the log that said it finished).
    let r = app
        .admin(Method::POST, "/v1/sagas?wait_ms=5000")
        .json(&json!({"definition": "order", "id": "o-1", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");
    assert_eq!(p.attempts("o-1", "reserve", "action"), 1);
    // The saga log is in the event store.
    let log = saga_log(&app, "o-1").await;
    let types: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    // After each backoff a runner claims the saga again and records that first.
    assert_eq!(
        types,
        [
            "SagaStarted",
            "ActionSucceeded",
            "ActionFailed",
            "SagaResumed",
            "ActionFailed",
            "SagaResumed",
            "ActionSucceeded",
            "SagaCompleted"
        ]
    );
    let got: Value = app
        .admin(Method::GET, "/v1/sagas/o-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["steps"], saga["steps"]);
    let r = app.admin(Method::GET, "/v1/sagas/nope").send().await.unwrap();
    assert_problem(r, 404, "saga_not_found").await;
    // An id no saga can have (outside the alphabet, too long) is not found either.
    for bad in ["bad%20id", "a'b", &"x".repeat(129)] {
        let r = app
            .admin(Method::GET, &format!("/v1/sagas/{bad}"))
            .send()
            .await
            .unwrap();
        assert_problem(r, 404, "saga_not_found").await;
    }
    let page: Value = app
        .admin(Method::GET, "/v1/sagas?status=completed")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["sagas"][0]["id"], "o-1");
    let page: Value = app
        .admin(Method::GET, "/v1/sagas?status=failed")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(page["sagas"].as_array().unwrap().is_empty());
    let r = app.admin(Method::GET, "/v1/sagas?status=weird").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "nope", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "saga_definition_not_found").await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "order", "id": "bad id!", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_name").await;
}
both_backends!(a_saga_completes_and_shows_its_timeline);

async fn refusals_and_exhausted_retries_compensate_in_reverse_order(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    define(&app, "trip", &p.definition(&["flight", "hotel", "car"], 2000)).await;
    let saga = run(&app, "trip", "t-1", json!({"car": "refuse"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][2]["action"], "refused");
    assert_eq!(
        attempts(&saga, 2, "compensation"),
        0,
        "a refused step has nothing to undo"
    );
    let hotel_undo = &saga["steps"][1]["attempts"][1]["started_at"];
    let flight_undo = &saga["steps"][0]["attempts"][1]["started_at"];
    assert!(
        hotel_undo.as_str() < flight_undo.as_str(),
        "hotel is undone before flight"
    );
    assert_eq!(check_saga(&p, &saga), None);
    assert_eq!(p.effect("t-1", "flight"), Some(Effect::Undone));

    // Attempts run out on a step: it is uncertain, so it is compensated too.
    let saga = run(&app, "trip", "t-2", json!({"hotel": "flaky:9"})).await;
    assert_eq!(saga["status"], "compensated");
    assert_eq!(saga["steps"][1]["action"], "uncertain");
    assert_eq!(attempts(&saga, 1, "action"), 3);
    assert_eq!(attempts(&saga, 1, "compensation"), 1);
    assert_eq!(
        p.effect("t-2", "hotel"),
        Some(Effect::Blocked),
        "empty compensation recorded"
    );
    assert_eq!(check_saga(&p, &saga), None);
}
both_backends!(refusals_and_exhausted_retries_compensate_in_reverse_order);

async fn a_step_whose_condition_fails_is_skipped_and_never_compensated(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["flight", "hotel", "car"], 2000);
    def["steps"][1]["when"] = json!("{{input.plan.stay}}");
    def["steps"][2]["when"] = json!({"value": "{{steps.flight.output.id}}", "present": true});
    define(&app, "trip", &def).await;
    let saga = run(&app, "trip", "w-1", json!({"car": "refuse"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "skipped");
    assert_eq!(saga["steps"][1]["compensation"], "not_needed");
    assert_eq!(saga["steps"][1]["attempts"], json!([]));
    assert_eq!(p.effect("w-1", "hotel"), None, "never called");
    assert_eq!(p.effect("w-1", "flight"), Some(Effect::Undone));
    assert_eq!(check_saga(&p, &saga), None);
    let log = saga_log(&app, "w-1").await;
    let skipped: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "StepSkipped")
        .collect();
    assert_eq!(skipped.len(), 1, "{log}");
    assert_eq!(skipped[0]["data"]["step"], 1);

    let saga = run(&app, "trip", "w-2", json!({"stay": true})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(attempts(&saga, 1, "action"), 1);
    assert_eq!(check_saga(&p, &saga), None);

    // A condition that is not one of the forms, or reads a later step, is refused when put.
    for when in [
        json!("{{input.stay}} or not"),
        json!({"value": "{{input.stay}}", "equals": 1, "not_equals": 2}),
        json!("{{steps.car.output.id}}"),
    ] {
        let mut bad = def.clone();
        bad["steps"][1]["when"] = when.clone();
        let r = app
            .admin(Method::PUT, "/v1/saga-definitions/trip")
            .json(&bad)
            .send()
            .await
            .unwrap();
        let code = if when.as_str().is_some_and(|w| w.contains("car")) {
            "unknown_template_variable"
        } else {
            "invalid_step_condition"
        };
        assert_problem(r, 400, code).await;
    }
}
both_backends!(a_step_whose_condition_fails_is_skipped_and_never_compensated);

async fn a_timer_parks_the_saga_and_any_runner_wakes_it_on_time(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["flight", "cool-off", "car"], 2000);
    def["steps"][1] = json!({"name": "cool-off", "sleep_ms": 400});
    define(&app, "trip", &def).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "trip", "id": "z-1", "input": {"plan": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // While it sleeps the saga says when it goes on, and the car is not booked.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let parked: Value = app
        .admin(Method::GET, "/v1/sagas/z-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(parked["status"], "running", "{parked}");
    assert_eq!(parked["steps"][1]["action"], "pending");
    assert!(parked["next_attempt_at"].is_string(), "{parked}");
    assert_eq!(p.effect("z-1", "car"), None);
    let done = finished(&app, "z-1").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["steps"][1]["action"], "succeeded");
    assert_eq!(done["steps"][1]["attempts"], json!([]));
    // The timer is no participant's step: the two calls took effect, each once.
    assert_eq!(p.effect("z-1", "flight"), Some(Effect::Done));
    assert_eq!(p.effect("z-1", "car"), Some(Effect::Done));
    assert_eq!(p.effect("z-1", "cool-off"), None);
    assert_eq!(
        (
            p.attempts("z-1", "flight", "action"),
            p.attempts("z-1", "car", "action")
        ),
        (1, 1)
    );
    let log = saga_log(&app, "z-1").await;
    let events = log["events"].as_array().unwrap();
    let data = |t: &str| events.iter().find(|e| e["type"] == t).map(|e| e["data"].clone());
    let started = data("TimerStarted").expect("TimerStarted");
    let fired = data("TimerFired").expect("TimerFired");
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!((time(&started["until"]) - time(&started["at"])).num_milliseconds(), 400);
    assert!(time(&fired["at"]) >= time(&started["until"]), "{log}");
    // The car was booked after the timer fired.
    let car = &done["steps"][2]["attempts"][0]["started_at"];
    assert!(time(car) >= time(&started["until"]));

    // A step of two kinds, or a timer with a compensation, is refused when put.
    for step in [
        json!({"name": "cool-off", "sleep_ms": 5, "sleep_until": "2030-01-01T00:00:00Z"}),
        json!({"name": "cool-off", "sleep_ms": 5, "compensation": def["steps"][0]["compensation"]}),
        json!({"name": "cool-off"}),
    ] {
        let mut bad = def.clone();
        bad["steps"][1] = step;
        let r = app
            .admin(Method::PUT, "/v1/saga-definitions/trip")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_step_kind").await;
    }
}
both_backends!(a_timer_parks_the_saga_and_any_runner_wakes_it_on_time);

async fn a_hanging_step_times_out_and_its_late_arrival_is_refused(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(600)).await;
    define(&app, "order", &p.definition(&["reserve", "charge"], 150)).await;
    // The first attempt hangs, the second succeeds; the late first one is a duplicate.
    let saga = run(&app, "order", "h-1", json!({"charge": "hang:1"})).await;
    assert_eq!(saga["status"], "completed");
    assert!(
        saga["steps"][1]["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    // Every attempt hangs: compensated, and the hanging calls land after the compensation.
    let saga = run(&app, "order", "h-2", json!({"charge": "hang:9"})).await;
    assert_eq!(saga["status"], "compensated");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        p.effect("h-2", "charge"),
        Some(Effect::Blocked),
        "no hanging action took effect"
    );
    assert_eq!(check_saga(&p, &saga), None);
    // The first attempt hangs and lands late; the second is refused. The late one may still
    // take effect, so the step is compensated (or blocked) like an uncertain one.
    let saga = run(&app, "order", "h-4", json!({"charge": "hangrefuse"})).await;
    assert_eq!(saga["status"], "compensated");
    assert_eq!(saga["steps"][1]["action"], "uncertain");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_ne!(
        p.effect("h-4", "charge"),
        Some(Effect::Done),
        "the late attempt left nothing standing"
    );
    assert_eq!(check_saga(&p, &saga), None);
    // An output that cannot be stored: the step took effect, so it is compensated.
    let saga = run(&app, "order", "h-5", json!({"reserve": "nul"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][0]["action"], "uncertain");
    assert_eq!(p.effect("h-5", "reserve"), Some(Effect::Undone));
    // An input that cannot be stored is refused before anything runs.
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "order", "id": "h-6", "input": {"x": "a\u{0}b"}}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_event_data").await;
    assert_eq!(p.attempts("h-6", "reserve", "action"), 0);
    // An answer lost after the effect: the retry is deduplicated by the participant.
    let saga = run(&app, "order", "h-3", json!({"reserve": "dup:1"})).await;
    assert_eq!(saga["status"], "completed");
    assert_eq!(p.attempts("h-3", "reserve", "action"), 2);
    assert_eq!(check_saga(&p, &saga), None);
}
both_backends!(a_hanging_step_times_out_and_its_late_arrival_is_refused);

async fn a_failed_compensation_stops_at_its_limit_and_retry_resumes_it(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    define(&app, "order", &p.definition(&["reserve", "charge"], 2000)).await;
    // Five compensation attempts fail (the limit); the sixth, after the operator's retry, works.
    let saga = run(
        &app,
        "order",
        "f-1",
        json!({"charge": "refuse", "reserve_undo": "cfail:5"}),
    )
    .await;
    assert_eq!(saga["status"], "failed", "{saga}");
    assert_eq!(saga["steps"][0]["compensation"], "gave_up");
    assert_eq!(attempts(&saga, 0, "compensation"), 5);
    let metrics = app
        .http
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("concord_sagas_finished_total{status=\"failed\"}"),
        "failed sagas are counted"
    );
    let r = app
        .admin(Method::POST, "/v1/sagas/f-1/retry?wait_ms=20000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let saga: Value = r.json().await.unwrap();
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(check_saga(&p, &saga), None);
    let r = app.admin(Method::POST, "/v1/sagas/f-1/retry").send().await.unwrap();
    assert_problem(r, 409, "saga_not_failed").await;
    let r = app.admin(Method::POST, "/v1/sagas/nope/retry").send().await.unwrap();
    assert_problem(r, 404, "saga_not_found").await;
    let r = app
        .admin(Method::POST, "/v1/sagas/bad%20id/retry")
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "saga_not_found").await;
}
both_backends!(a_failed_compensation_stops_at_its_limit_and_retry_resumes_it);

async fn an_instance_keeps_the_version_it_started_with(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut v1 = p.definition(&["reserve", "charge"], 2000);
    v1["steps"][1]["retry"] = json!({"max_attempts": 3, "backoff_ms": 400, "max_backoff_ms": 400, "jitter": 0.0});
    define(&app, "order", &v1).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .header("Idempotency-Key", "start-v-1")
        .json(&json!({"definition": "order", "id": "v-1", "input": {"plan": {"charge": "flaky:1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // While it waits out its backoff, a new version with a third step is stored.
    define(&app, "order", &p.definition(&["reserve", "charge", "ship"], 2000)).await;
    let saga = finished(&app, "v-1").await;
    assert_eq!(saga["status"], "completed");
    assert_eq!(saga["version"], 1);
    assert_eq!(saga["steps"].as_array().unwrap().len(), 2);
    assert_eq!(p.attempts("v-1", "ship", "action"), 0);
    // The idempotent start is replayed, not run again.
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .header("Idempotency-Key", "start-v-1")
        .json(&json!({"definition": "order", "id": "v-1", "input": {"plan": {"charge": "flaky:1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers().get("idempotent-replayed").unwrap(), "true");
}
both_backends!(an_instance_keeps_the_version_it_started_with);

async fn definitions_call_only_the_allowed_hosts(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |s| s.saga_allowed_hosts = vec!["127.0.0.1".into()]).await else {
        return;
    };
    let p = Participant::start(Duration::from_millis(10)).await;
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/order")
        .json(&p.definition(&["reserve"], 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the participant on 127.0.0.1 is allowed");
    let metadata = json!({"steps": [{"name": "steal", "action": {"method": "GET", "url": "http://169.254.169.254/latest/meta-data/"}}]});
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/steal")
        .json(&metadata)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(r, 400, "outbound_call_refused").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("saga_allowed_hosts"),
        "{problem}"
    );
}
both_backends!(definitions_call_only_the_allowed_hosts);

async fn participant_credentials_come_from_server_secrets(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |s| {
        s.saga_secrets.insert(
            "pay".into(),
            concord_server::config::SagaSecretSetting {
                value: "s3cr3t-token".into(),
                hosts: vec!["127.0.0.1".into()],
                methods: vec!["POST".into()],
                path_prefix: Some("/charge".into()),
            },
        );
    })
    .await
    else {
        return;
    };
    // A participant that answers with the Authorization header it was sent, and says whether
    // it was the secret's value.
    let router = axum::Router::new().route(
        "/charge",
        axum::routing::post(|headers: axum::http::HeaderMap| async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            axum::Json(json!({ "authorization": auth, "is_the_secret": auth == "Bearer s3cr3t-token" }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/charge", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let def = |url: &str, auth: &str| json!({"steps": [{"name": "charge", "action": {"method": "POST", "url": url, "headers": {"Authorization": auth}}}]});
    let put = |name: &str, d: Value| {
        app.admin(Method::PUT, &format!("/v1/saga-definitions/{name}"))
            .json(&d)
            .send()
    };

    let r = put("pay", def(&url, "Bearer {{secrets.pay}}")).await.unwrap();
    assert_eq!(r.status(), 201);
    let shown = app
        .admin(Method::GET, "/v1/saga-definitions/pay")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(shown.contains("{{secrets.pay}}"), "{shown}");
    assert!(
        !shown.contains("s3cr3t-token"),
        "a stored definition never shows the secret: {shown}"
    );

    let saga = run(&app, "pay", "pay-1", json!({})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(saga["steps"][0]["output"]["is_the_secret"], true, "{saga}");
    // The participant echoed the secret; the log keeps its answer without it.
    assert_eq!(saga["steps"][0]["output"]["authorization"], "Bearer [secret]", "{saga}");
    let log = app
        .admin(Method::GET, "/v1/streams/saga-pay-1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("ActionSucceeded") && !log.contains("s3cr3t-token"),
        "{log}"
    );

    let r = put("other", def(&url, "Bearer {{secrets.nope}}")).await.unwrap();
    let problem = assert_problem(r, 400, "unknown_template_variable").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("secrets.nope"),
        "{problem}"
    );
    let r = put("plain", def(&url, "Bearer s3cr3t-token")).await.unwrap();
    assert_problem(r, 400, "invalid_step_header").await;
    // The secret goes only to its hosts.
    let r = put("elsewhere", def("http://localhost:9/charge", "Bearer {{secrets.pay}}"))
        .await
        .unwrap();
    let problem = assert_problem(r, 400, "unknown_template_variable").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("not for localhost:9"),
        "{problem}"
    );
    // ...with its methods and under its path prefix only.
    let get = json!({"steps": [{"name": "charge", "action": {"method": "GET", "url": url, "headers": {"Authorization": "Bearer {{secrets.pay}}"}}}]});
    let problem = assert_problem(put("get", get).await.unwrap(), 400, "unknown_template_variable").await;
    assert!(problem["detail"].as_str().unwrap().contains("not for GET"), "{problem}");
    let beside = url.replace("/charge", "/chargeback");
    let r = put("beside", def(&beside, "Bearer {{secrets.pay}}")).await.unwrap();
    let problem = assert_problem(r, 400, "unknown_template_variable").await;
    assert!(problem["detail"].as_str().unwrap().contains("path_prefix"), "{problem}");
}
both_backends!(participant_credentials_come_from_server_secrets);

/// Waiting for a saga holds a waiter only while someone waits: 500 requests that give up mid-wait
/// (the client went away) and waits on unknown sagas (answered at once) leave none behind.
async fn abandoned_and_unknown_waits_leave_no_waiter(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_secs(30)).await;
    define(&app, "order", &p.definition(&["reserve", "charge"], 20_000)).await;
    // A saga that stays running: its charge hangs past the test.
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "order", "id": "w-1", "input": {"plan": {"charge": "hang:9"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    // 500 waits that the client abandons, 100 at a time (under the key's concurrency cap).
    let waits = (0..500).map(|_| {
        impatient
            .get(format!("{}/v1/sagas/w-1?wait_ms=20000", app.address))
            .bearer_auth(&app.admin_key)
            .send()
    });
    use futures::StreamExt as _;
    let abandoned: Vec<_> = futures::stream::iter(waits).buffer_unordered(100).collect().await;
    for r in abandoned {
        assert!(r.is_err(), "the client gave up before the saga finished");
    }
    // An unknown saga is answered at once: the impatient client gets its 404.
    for n in 0..20 {
        let r = impatient
            .get(format!("{}/v1/sagas/nope-{n}?wait_ms=20000", app.address))
            .bearer_auth(&app.admin_key)
            .send()
            .await
            .expect("answered before the client gives up");
        assert_problem(r, 404, "saga_not_found").await;
    }
    // The server sees the hang-ups a moment after the clients; the saga itself runs on (its
    // first attempt alone lasts 20 s), so its own end cannot be what clears the waiters.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.state.sagas.waiting() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.state.sagas.waiting(), 0, "no waiter left behind");
}
both_backends!(abandoned_and_unknown_waits_leave_no_waiter);

/// A keyed start without an id gets an id derived from the caller, the key and the request: the
/// same request again (its key's record gone) meets that saga, another request under the same
/// key once the record expired starts its own, and no caller may choose such an id.
async fn a_keyed_start_gets_an_id_derived_from_its_request(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    define(&app, "order", &p.definition(&["reserve"], 1000)).await;
    let start = |plan: Value| {
        app.admin(Method::POST, "/v1/sagas")
            .header("Idempotency-Key", "order-9")
            .json(&json!({"definition": "order", "input": {"plan": plan}}))
            .send()
    };
    let first = start(json!({})).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("idem-"), "{id}");
    let forget = || async {
        app.state
            .idempotency
            .purge_expired(chrono::Utc::now() + chrono::Duration::days(400))
            .await
            .unwrap()
    };
    forget().await;
    let again = start(json!({})).await.unwrap();
    assert_eq!(again.status(), 200, "the same request meets its saga");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());
    forget().await;
    let other = start(json!({"reserve": "refuse"})).await.unwrap();
    assert_eq!(other.status(), 201, "another request under an expired key is its own");
    assert_ne!(other.json::<Value>().await.unwrap()["id"], id.as_str());
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "order", "id": id, "input": {}}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_name").await;
}
both_backends!(a_keyed_start_gets_an_id_derived_from_its_request);

/// The saga once it finished (waiting up to 20 s).
async fn finished(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/v1/sagas/{id}?wait_ms=20000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn get_saga(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/v1/sagas/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until the saga's step `step` waits for its signal.
async fn until_waiting(app: &TestApp, id: &str, step: usize) -> Value {
    for _ in 0..200 {
        let saga = get_saga(app, id).await;
        if saga["steps"][step]["waiting_for"].is_string() {
            return saga;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("saga {id} never waited at step {step}: {}", get_saga(app, id).await);
}

async fn a_wait_step_parks_the_saga_until_its_signal_and_its_body_is_the_output(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["reserve", "confirmed", "ship"], 2000);
    def["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "payment-confirmed", "timeout_ms": 60_000}});
    // The step after the wait reads the signal's body: a missing value would refuse it.
    def["steps"][2]["action"]["body"]["ref"] = json!("{{steps.confirmed.output.ref}}");
    define(&app, "pay", &def).await;
    let start = |id: &str| {
        app.admin(Method::POST, "/v1/sagas")
            .json(&json!({"definition": "pay", "id": id, "input": {"plan": {}}}))
            .send()
    };
    assert_eq!(start("w-1").await.unwrap().status(), 201);
    let parked = until_waiting(&app, "w-1", 1).await;
    assert_eq!(parked["status"], "running");
    assert_eq!(parked["steps"][1]["waiting_for"], "payment-confirmed");
    assert!(parked["next_attempt_at"].is_string(), "its timeout: {parked}");
    assert_eq!(p.effect("w-1", "ship"), None, "nothing runs past a wait");

    // Only a key with sagas:signal (or admin) may send it.
    let reader = app.create_key(&["sagas:read"]).await;
    let signaller = app.create_key(&["sagas:signal"]).await;
    let signal = |key: &str, name: &str, idem: &str, body: Value| {
        app.request(Method::POST, &format!("/v1/sagas/w-1/signals/{name}"), Some(key))
            .header("Idempotency-Key", idem)
            .json(&body)
            .send()
    };
    let r = signal(&reader, "payment-confirmed", "k-0", json!({"ref": "x"}))
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = signal(&signaller, "nobody-waits", "k-1", json!({})).await.unwrap();
    assert_problem(r, 409, "signal_not_expected").await;
    let r = signal(&signaller, "payment-confirmed", "k-2", json!({"ref": "3ds-42"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let sent: Value = r.json().await.unwrap();
    assert_eq!(
        sent,
        json!({"saga_id": "w-1", "signal": "payment-confirmed", "sequence": 1})
    );
    // The same send again (a client retry) answers the first; a second signal is refused.
    let r = signal(&signaller, "payment-confirmed", "k-2", json!({"ref": "3ds-42"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap(), sent);
    let r = signal(&signaller, "payment-confirmed", "k-3", json!({"ref": "other"}))
        .await
        .unwrap();
    assert_problem(r, 409, "signal_already_sent").await;

    let done = finished(&app, "w-1").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["steps"][1]["output"], json!({"ref": "3ds-42"}));
    assert_eq!(done["steps"][1]["waiting_for"], Value::Null);
    assert_eq!(p.effect("w-1", "ship"), Some(Effect::Done));
    // The log records the wait and the signal, attributed to the key that sent it.
    let log = saga_log(&app, "w-1").await;
    let events = log["events"].as_array().unwrap();
    let received = events
        .iter()
        .find(|e| e["type"] == "SignalReceived")
        .expect("SignalReceived");
    assert_eq!(received["data"]["payload"], json!({"ref": "3ds-42"}));
    assert_eq!(received["data"]["sequence"], 1);
    let key_id = app
        .admin(Method::GET, "/v1/streams/saga-w-1@payment-confirmed")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["events"][0]["metadata"]["key"]
        .clone();
    assert!(key_id.is_string(), "the sending key is kept");
    assert_eq!(received["data"]["by"], key_id);
    assert!(events.iter().any(|e| e["type"] == "WaitStarted"), "{log}");
    // No one writes a saga's signals but Concord.
    let r = app
        .append(
            "saga-w-1@payment-confirmed",
            json!({"events": [{"type": "SignalSent", "data": {}}]}),
        )
        .await;
    assert_eq!(r.status(), 403);

    // A signal sent before the saga reaches its step is kept and taken when it does.
    let mut early = def.clone();
    early["steps"][0] = json!({"name": "reserve", "sleep_ms": 300});
    define(&app, "pay-early", &early).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "pay-early", "id": "w-2", "input": {"plan": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .admin(Method::POST, "/v1/sagas/w-2/signals/payment-confirmed")
        .json(&json!({"ref": "early"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let done = finished(&app, "w-2").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["steps"][1]["output"], json!({"ref": "early"}));
    let log = saga_log(&app, "w-2").await;
    assert!(
        !log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "WaitStarted"),
        "a kept signal needs no wait: {log}"
    );
    // A finished saga's step waits no more.
    let r = app
        .admin(Method::POST, "/v1/sagas/w-2/signals/payment-confirmed")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "signal_already_sent").await;
    let r = app
        .admin(Method::POST, "/v1/sagas/nope/signals/payment-confirmed")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "saga_not_found").await;
}
both_backends!(a_wait_step_parks_the_saga_until_its_signal_and_its_body_is_the_output);

async fn a_wait_that_times_out_compensates_the_saga(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["reserve", "confirmed", "ship"], 2000);
    def["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "ok", "timeout_ms": 300}});
    define(&app, "pay", &def).await;
    let saga = run(&app, "pay", "t-1", json!({})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "refused");
    assert!(saga["steps"][1]["error"].as_str().unwrap().contains("no signal ok"));
    assert_eq!(saga["steps"][0]["compensation"], "succeeded");
    assert_eq!(p.effect("t-1", "ship"), None);
    assert_eq!(check_saga(&p, &saga), None);
    let log = saga_log(&app, "t-1").await;
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "WaitTimedOut")
    );
    // The step it waited for is over: a late signal is refused, and nothing is kept.
    let r = app
        .admin(Method::POST, "/v1/sagas/t-1/signals/ok")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "signal_not_expected").await;

    // Two wait steps for one name take one signal each, in step order; a third is refused.
    let mut two = p.definition(&["a", "b", "c"], 2000);
    two["steps"][0] = json!({"name": "a", "wait": {"signal": "approve"}});
    two["steps"][1] = json!({"name": "b", "wait": {"signal": "approve"}});
    define(&app, "two", &two).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "two", "id": "t-2", "input": {"plan": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for (n, who) in [(1, "alice"), (2, "bob")] {
        let r = app
            .admin(Method::POST, "/v1/sagas/t-2/signals/approve")
            .json(&json!({"by": who}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(r.json::<Value>().await.unwrap()["sequence"], n);
    }
    let r = app
        .admin(Method::POST, "/v1/sagas/t-2/signals/approve")
        .json(&json!({"by": "eve"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "signal_already_sent").await;
    let done = finished(&app, "t-2").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (&done["steps"][0]["output"], &done["steps"][1]["output"]),
        (&json!({"by": "alice"}), &json!({"by": "bob"}))
    );

    // A wait is one kind of step, with a signal name of the step-name alphabet.
    for step in [
        json!({"name": "a", "wait": {"signal": "x"}, "sleep_ms": 5}),
        json!({"name": "a", "wait": {"signal": "x"}, "compensation": def["steps"][0]["compensation"]}),
        json!({"name": "a", "wait": {"signal": "bad name"}}),
    ] {
        let mut bad = two.clone();
        bad["steps"][0] = step;
        let r = app
            .admin(Method::PUT, "/v1/saga-definitions/two")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_step_kind").await;
    }
    let mut bad = two.clone();
    bad["steps"][0] = json!({"name": "a", "wait": {"signal": "x", "timeout_ms": 0}});
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/two")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "saga_limit_exceeded").await;
}
both_backends!(a_wait_that_times_out_compensates_the_saga);

async fn an_action_answered_202_finishes_through_its_completion_url(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["reserve", "charge", "ship"], 2000);
    def["steps"][1]["callback_timeout_ms"] = json!(400);
    define(&app, "pay", &def).await;

    // Accepted, then completed through the URL: the completion's output is the step's.
    let saga = run(&app, "pay", "a-1", json!({"charge": "async"})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(saga["steps"][1]["output"], json!({"id": "charge-a-1"}));
    assert_eq!(check_saga(&p, &saga), None);
    let log = saga_log(&app, "a-1").await;
    let types: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    let accepted = types
        .iter()
        .position(|t| *t == "ActionAccepted")
        .expect("ActionAccepted");
    // The node that took the saga up again fences the log first (SagaResumed), then records.
    let next = types[accepted + 1..].iter().find(|t| **t != "SagaResumed");
    assert_eq!(next, Some(&"ActionSucceeded"), "{types:?}");
    let url = p.ledger.lock().unwrap().callback_urls[&("a-1".to_owned(), "charge".to_owned())].clone();
    assert!(url.starts_with(&format!("{}/callbacks/", app.address)), "{url}");
    // The same completion again answers the same; another one, or a changed token, is refused.
    // Through the sdk, as a participant posts it (no API key).
    let post = |url: String, body: Value| reqwest::Client::new().post(url).json(&body).send();
    let http = reqwest::Client::new();
    let same: concord_sdk::api::sagas::CompletionIn =
        serde_json::from_value(json!({"outcome": "succeeded", "output": {"id": "charge-a-1"}})).unwrap();
    let taken = concord_sdk::complete_action(&http, &url, &same).await.unwrap();
    assert_eq!(
        (taken.saga_id.as_str(), taken.step.as_str(), taken.attempt),
        ("a-1", "charge", 1)
    );
    let other = serde_json::from_value(json!({"outcome": "refused", "error": "changed my mind"})).unwrap();
    let refused = concord_sdk::complete_action(&http, &url, &other).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(concord_sdk::ErrorCode::CallbackAlreadyUsed),
        "{refused}"
    );
    let (head, sig) = url.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let r = post(
        format!("{head}.{flipped}{}", &sig[1..]),
        json!({"outcome": "succeeded"}),
    )
    .await
    .unwrap();
    assert_problem(r, 401, "callback_invalid").await;
    let r = post(
        format!("{}/callbacks/nonsense", app.address),
        json!({"outcome": "succeeded"}),
    )
    .await
    .unwrap();
    assert_problem(r, 401, "callback_invalid").await;

    // Refused through the URL: the saga compensates what came before.
    let saga = run(&app, "pay", "a-2", json!({"charge": "asyncrefuse"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "refused");
    assert_eq!(saga["steps"][1]["error"], "card declined");
    assert_eq!(check_saga(&p, &saga), None);

    // Completed before the 202 was even answered: kept, and taken once the 202 is recorded.
    let saga = run(&app, "pay", "a-3", json!({"charge": "asyncfirst"})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(check_saga(&p, &saga), None);

    // Completed while the call ran, then the call failed: the completion stands (the
    // participant was told it is recorded), and the action is not called again.
    let saga = run(&app, "pay", "a-5", json!({"charge": "postthen503"})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(p.attempts("a-5", "charge", "action"), 1);
    assert_eq!(check_saga(&p, &saga), None);
    // Failed: its effect is unknown, so it is compensated, not called again.
    let saga = run(&app, "pay", "a-6", json!({"charge": "asyncfail"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "uncertain");
    assert_eq!(p.attempts("a-6", "charge", "action"), 1);
    assert_eq!(check_saga(&p, &saga), None);
    // A step without callback_timeout_ms is not asynchronous: its call carries no URL.
    let mut plain = p.definition(&["reserve", "charge"], 2000);
    plain["steps"][1]["action"]["url"] = json!(format!("{}/action/charge", p.url));
    define(&app, "plain", &plain).await;
    let saga = run(&app, "plain", "a-7", json!({"charge": "async"})).await;
    assert_eq!(
        saga["status"], "compensated",
        "no completion URL: the participant refuses: {saga}"
    );
    assert!(
        !p.ledger
            .lock()
            .unwrap()
            .callback_urls
            .contains_key(&("a-7".to_owned(), "charge".to_owned()))
    );

    // Never completed: past its time the action is uncertain (it may have taken effect), so it
    // is compensated; a completion that comes later is refused.
    let saga = run(&app, "pay", "a-4", json!({"charge": "asyncsilent"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "uncertain");
    assert_eq!(saga["steps"][1]["compensation"], "succeeded");
    assert_eq!(p.effect("a-4", "charge"), Some(Effect::Undone));
    assert_eq!(check_saga(&p, &saga), None);
    let late = p.ledger.lock().unwrap().callback_urls[&("a-4".to_owned(), "charge".to_owned())].clone();
    let r = post(late, json!({"outcome": "succeeded"})).await.unwrap();
    assert_problem(r, 409, "callback_not_expected").await;
    assert!(
        p.ledger.lock().unwrap().callback_answers.iter().all(|s| *s == 202),
        "every completion the participant posted was taken"
    );
}
both_backends!(an_action_answered_202_finishes_through_its_completion_url);

async fn a_parallel_group_runs_its_branches_at_once_and_compensates_them_together(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let base = p.definition(&["reserve", "east", "west", "ship"], 2000);
    let mut def = json!({"steps": [
        base["steps"][0],
        {"name": "both", "parallel": [base["steps"][1], base["steps"][2]]},
        base["steps"][3]
    ], "compensation_retry": base["compensation_retry"]});
    // The step after the group reads a branch's output.
    def["steps"][2]["action"]["body"]["east"] = json!("{{steps.east.output.id}}");
    define(&app, "split", &def).await;

    // Both branches take 300 ms: they overlap, and the saga goes on once both are done.
    let saga = run(&app, "split", "g-1", json!({"east": "slow:300", "west": "slow:300"})).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(check_saga(&p, &saga), None);
    assert!(
        p.ledger.lock().unwrap().overlaps >= 1,
        "the branches were in flight together"
    );
    let names: Vec<&str> = saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reserve", "east", "west", "ship"]);

    // One branch refuses: the other branch and the step before are compensated.
    let saga = run(&app, "split", "g-2", json!({"east": "slow:100", "west": "refuse"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["compensation"], "succeeded");
    assert_eq!(saga["steps"][2]["action"], "refused");
    assert_eq!(saga["steps"][0]["compensation"], "succeeded");
    assert_eq!(p.effect("g-2", "ship"), None);
    assert_eq!(check_saga(&p, &saga), None);

    // One branch is refused while the other waits for a retry: that one may have taken effect,
    // so it is compensated, not called again.
    let saga = run(&app, "split", "g-3", json!({"east": "flaky:9", "west": "refuse"})).await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert_eq!(saga["steps"][1]["action"], "uncertain", "{saga}");
    assert_eq!(saga["steps"][1]["compensation"], "succeeded", "{saga}");
    assert_eq!(p.attempts("g-3", "east", "action"), 1);
    assert_eq!(check_saga(&p, &saga), None);

    // A branch's condition is tested when the group is reached; a skipped branch is never called.
    let mut cond = def.clone();
    cond["steps"][1]["parallel"][1]["when"] = json!("{{input.west}}");
    cond["steps"][2]["action"]["body"] = json!({"plan": "{{input.plan}}"});
    define(&app, "split", &cond).await;
    let r = app
        .admin(Method::POST, "/v1/sagas?wait_ms=20000")
        .json(&json!({"definition": "split", "id": "g-4", "input": {"plan": {}, "west": false}}))
        .send()
        .await
        .unwrap();
    let saga: Value = r.json().await.unwrap();
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(saga["steps"][2]["action"], "skipped");
    assert_eq!(p.attempts("g-4", "west", "action"), 0);

    // A group has only its name and two or more calls; names are unique across branches.
    for group in [
        json!({"name": "both", "parallel": [base["steps"][1]]}),
        json!({"name": "both", "parallel": [base["steps"][1], {"name": "w", "sleep_ms": 5}]}),
        json!({"name": "both", "parallel": [base["steps"][1], base["steps"][2]], "when": "{{input.x}}"}),
    ] {
        let mut bad = def.clone();
        bad["steps"][1] = group;
        let r = app
            .admin(Method::PUT, "/v1/saga-definitions/split")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_step_kind").await;
    }
    let mut dup = def.clone();
    dup["steps"][1]["parallel"][1]["name"] = json!("reserve");
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/split")
        .json(&dup)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "duplicate_step_name").await;
    // A branch cannot read its sibling's output.
    let mut sibling = def.clone();
    sibling["steps"][1]["parallel"][1]["action"]["body"]["x"] = json!("{{steps.east.output.id}}");
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/split")
        .json(&sibling)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "unknown_template_variable").await;
}
both_backends!(a_parallel_group_runs_its_branches_at_once_and_compensates_them_together);

/// Polls until the saga satisfies `pred` (`what` names it for the failure).
async fn until_saga(app: &TestApp, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let saga = get_saga(app, id).await;
        if pred(&saga) {
            return saga;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("saga {id} never {what}: {}", get_saga(app, id).await);
}

async fn operate(app: &TestApp, key: &str, id: &str, op: &str, idem: Option<&str>) -> reqwest::Response {
    let mut r = app.request(Method::POST, &format!("/v1/sagas/{id}/{op}"), Some(key));
    if let Some(k) = idem {
        r = r.header("Idempotency-Key", k);
    }
    r.send().await.unwrap()
}

async fn operators_pause_resume_retry_now_and_cancel_a_saga(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut def = p.definition(&["reserve", "charge", "ship"], 2000);
    // A backoff nobody waits out in a test: only retry-now (or a cancel) moves the saga on.
    def["steps"][1]["retry"] = json!({"max_attempts": 3, "backoff_ms": 600_000, "max_backoff_ms": 600_000});
    define(&app, "ops", &def).await;
    let start = |id: &str| {
        app.admin(Method::POST, "/v1/sagas")
            .json(&json!({"definition": "ops", "id": id, "input": {"plan": {"charge": "flaky:1"}}}))
            .send()
    };
    let writer = app.create_key(&["sagas:write", "sagas:read"]).await;
    let reader = app.create_key(&["sagas:read"]).await;
    let backing_off = |s: &Value| s["steps"][1]["attempts"].as_array().is_some_and(|a| a.len() == 1);

    // Paused while it waits out its backoff: nothing starts, then resume and retry-now.
    assert_eq!(start("o-1").await.unwrap().status(), 201);
    until_saga(&app, "o-1", "backed off", backing_off).await;
    assert_problem(operate(&app, &reader, "o-1", "pause", None).await, 403, "forbidden").await;
    let r = operate(&app, &writer, "o-1", "pause", Some("p-1")).await;
    assert_eq!(r.status(), 202);
    let asked: Value = r.json().await.unwrap();
    assert_eq!(asked, json!({"saga_id": "o-1", "operation": "pause", "sequence": 1}));
    // The same ask again answers the first; a second pause or a retry-now of a paused saga is
    // refused, as the saga will be once it records the first.
    let again: Value = operate(&app, &writer, "o-1", "pause", Some("p-1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again, asked);
    for op in ["pause", "retry-now"] {
        assert_problem(
            operate(&app, &writer, "o-1", op, None).await,
            409,
            "saga_operation_refused",
        )
        .await;
    }
    let paused = until_saga(&app, "o-1", "paused", |s| s["paused"] == true).await;
    assert_eq!(paused["status"], "running");
    assert_eq!(p.attempts("o-1", "charge", "action"), 1);
    let r = operate(&app, &writer, "o-1", "resume", None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["sequence"], 2);
    let r = operate(&app, &writer, "o-1", "retry-now", None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["sequence"], 3);
    let done = finished(&app, "o-1").await;
    assert_eq!(done["status"], "completed", "retried now, not in ten minutes: {done}");
    assert_eq!(done["paused"], Value::Null);
    assert_eq!(p.attempts("o-1", "charge", "action"), 2);
    // Each operation is in the log, attributed to the key that asked for it.
    let log = saga_log(&app, "o-1").await;
    let events = log["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let at = |t: &str| {
        types
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t}: {types:?}"))
    };
    assert!(at("SagaPaused") < at("SagaUnpaused") && at("SagaUnpaused") < at("RetryNowRequested"));
    let paused_by = &events[at("SagaPaused")]["data"]["by"];
    assert!(paused_by.is_string(), "{log}");
    assert_eq!(events[at("RetryNowRequested")]["data"]["by"], *paused_by);
    assert_problem(
        operate(&app, &writer, "o-1", "cancel", None).await,
        409,
        "saga_operation_refused",
    )
    .await;

    // Cancelled while it waits out its backoff: what ran is compensated, the step whose
    // outcome is unknown too, and the saga ends cancelled.
    assert_eq!(start("o-2").await.unwrap().status(), 201);
    until_saga(&app, "o-2", "backed off", backing_off).await;
    let r = operate(&app, &writer, "o-2", "cancel", None).await;
    assert_eq!(r.status(), 202);
    let done = finished(&app, "o-2").await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["steps"][0]["compensation"], "succeeded");
    assert_eq!(done["steps"][1]["action"], "uncertain");
    assert_eq!(done["steps"][1]["compensation"], "succeeded");
    assert_eq!(done["steps"][2]["action"], "pending");
    assert_eq!(p.effect("o-2", "reserve"), Some(Effect::Undone));
    assert_eq!(p.attempts("o-2", "ship", "action"), 0);
    let types: Vec<String> = saga_log(&app, "o-2").await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(types.iter().any(|t| t == "SagaCancelled"), "{types:?}");
    let listed: Value = app
        .admin(Method::GET, "/v1/sagas?status=cancelled")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sagas"][0]["id"], "o-2", "{listed}");

    // Cancelled while parked on a wait (no node holds it): woken, compensated, cancelled.
    let mut waiting = p.definition(&["reserve", "confirmed"], 2000);
    waiting["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "go", "timeout_ms": 600_000}});
    define(&app, "ops-wait", &waiting).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "ops-wait", "id": "o-3", "input": {"plan": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    until_waiting(&app, "o-3", 1).await;
    assert_eq!(operate(&app, &writer, "o-3", "cancel", None).await.status(), 202);
    let done = finished(&app, "o-3").await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(p.effect("o-3", "reserve"), Some(Effect::Undone));
    assert_problem(
        operate(&app, &writer, "nobody", "pause", None).await,
        404,
        "saga_not_found",
    )
    .await;
}
both_backends!(operators_pause_resume_retry_now_and_cancel_a_saga);

/// Polls a batch until it has finished.
async fn batch_finished(app: &TestApp, id: &str) -> Value {
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = app
            .admin(Method::GET, &format!("/v1/saga-batches/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if batch["status"] == "finished" {
            return batch;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("batch {id} never finished: {batch}");
}

async fn a_batch_cancels_the_sagas_its_filter_matches_server_side(b: Backend) {
    // Pages of three: every page is recorded.
    let Some(app) = crate::helpers::spawn_app_with(b, |s| s.saga_batch_page = 3).await else {
        return;
    };
    let p = Participant::start(Duration::from_millis(10)).await;
    let mut waiting = p.definition(&["reserve", "confirmed"], 2000);
    waiting["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "go", "timeout_ms": 600_000}});
    define(&app, "parked", &waiting).await;
    define(&app, "other", &waiting).await;
    let start = |definition: &'static str, id: String| {
        app.admin(Method::POST, "/v1/sagas")
            .json(&json!({"definition": definition, "id": id, "input": {"plan": {}}}))
            .send()
    };
    // Seven of the one definition, two of the other.
    let ids: Vec<String> = (0..7).map(|i| format!("bt-{i}")).collect();
    for id in &ids {
        assert_eq!(start("parked", id.clone()).await.unwrap().status(), 201);
    }
    for id in ["bo-1", "bo-2"] {
        assert_eq!(start("other", id.to_owned()).await.unwrap().status(), 201);
    }
    for id in ids.iter().chain([&"bo-1".to_owned(), &"bo-2".to_owned()]) {
        until_waiting(&app, id, 1).await;
    }
    let batch = |body: Value| app.admin(Method::POST, "/v1/saga-batches").json(&body).send();
    // A dry run counts; a bad action or status is refused.
    let r =
        batch(json!({"filter": {"definition": "parked", "status": "running"}, "action": "cancel", "dry_run": true}))
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"matched": 7}));
    let r = batch(json!({"filter": {}, "action": "explode"})).await.unwrap();
    assert_problem(r, 400, "malformed_json").await;
    let r = batch(json!({"filter": {"status": "sleepy"}, "action": "cancel"}))
        .await
        .unwrap();
    assert_problem(r, 400, "malformed_json").await;
    let reader = app.create_key(&["sagas:read"]).await;
    let r = app
        .request(Method::POST, "/v1/saga-batches", Some(&reader))
        .json(&json!({"filter": {}, "action": "cancel"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;

    let r = batch(json!({"filter": {"definition": "parked"}, "action": "cancel"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(started["action"], "cancel");
    let done = batch_finished(&app, &id).await;
    assert_eq!(
        (done["matched"].as_u64(), done["applied"].as_u64()),
        (Some(7), Some(7)),
        "{done}"
    );
    for saga_id in &ids {
        let saga = finished(&app, saga_id).await;
        assert_eq!(saga["status"], "cancelled", "{saga}");
        assert_eq!(p.effect(saga_id, "reserve"), Some(Effect::Undone));
    }
    let pages: Vec<String> = app
        .admin(Method::GET, &format!("/v1/streams/saga-@batch-{id}"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    // Nine sagas in pages of three: a record per page, the last one when a page comes short.
    assert_eq!(pages.first().map(String::as_str), Some("BatchStarted"), "{pages:?}");
    assert_eq!(pages.last().map(String::as_str), Some("BatchFinished"), "{pages:?}");
    assert!(pages.iter().filter(|t| *t == "BatchProgress").count() >= 2, "{pages:?}");
    for other in ["bo-1", "bo-2"] {
        let saga = get_saga(&app, other).await;
        assert_eq!(saga["status"], "running", "outside the filter: {saga}");
    }
    // Run again, it finds them finished: matched, none applied.
    let r = batch(json!({"filter": {"definition": "parked"}, "action": "cancel"}))
        .await
        .unwrap();
    let again = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let seen = batch_finished(&app, &again).await;
    assert_eq!(
        (seen["matched"].as_u64(), seen["refused"].as_u64()),
        (Some(7), Some(7)),
        "{seen}"
    );
    let r = app.admin(Method::GET, "/v1/saga-batches/nope").send().await.unwrap();
    assert_problem(r, 404, "saga_batch_not_found").await;
}
both_backends!(a_batch_cancels_the_sagas_its_filter_matches_server_side);

async fn finished_sagas_leave_the_work_table_and_their_logs_still_answer_for_them(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.saga_retention_s = 1;
        s.retention_sweep_ms = 100;
    })
    .await
    else {
        return;
    };
    let p = Participant::start(Duration::from_millis(10)).await;
    define(&app, "keep", &p.definition(&["reserve", "charge"], 2000)).await;
    let done = run(&app, "keep", "old-1", json!({})).await;
    assert_eq!(done["status"], "completed");
    let undone = run(&app, "keep", "old-2", json!({"charge": "refuse"})).await;
    assert_eq!(undone["status"], "compensated");
    // A saga that has not finished stays whatever its age.
    let waiting = json!({"steps": [{"name": "hold", "wait": {"signal": "go", "timeout_ms": 60_000}}]});
    define(&app, "hold", &waiting).await;
    let r = app
        .admin(Method::POST, "/v1/sagas")
        .json(&json!({"definition": "hold", "id": "live-1", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids = |page: &Value| -> Vec<String> {
        page["sagas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut left = Vec::new();
    for _ in 0..200 {
        let page: Value = app
            .admin(Method::GET, "/v1/sagas?limit=1000")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        left = ids(&page);
        if left == ["live-1"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, ["live-1"], "finished rows outlived their retention");
    // Read from the log: the same saga, steps and all.
    let again = get_saga(&app, "old-2").await;
    assert_eq!(again["status"], "compensated");
    assert_eq!(again["steps"], undone["steps"]);
    // A start with its id finds it, and nothing runs twice.
    let calls = p.attempts("old-1", "reserve", "action");
    let r = app
        .admin(Method::POST, "/v1/sagas?wait_ms=5000")
        .json(&json!({"definition": "keep", "id": "old-1", "input": {"plan": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an old saga, not a new one");
    let found: Value = r.json().await.unwrap();
    assert_eq!(found["status"], "completed", "{found}");
    assert_eq!(p.attempts("old-1", "reserve", "action"), calls);
    // And the row it was put back with is finished: nothing claims it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_saga(&app, "old-1").await["status"], "completed");
    assert_eq!(p.attempts("old-1", "reserve", "action"), calls);
    let r = app.admin(Method::GET, "/v1/sagas/never-was").send().await.unwrap();
    assert_problem(r, 404, "saga_not_found").await;
}
both_backends!(finished_sagas_leave_the_work_table_and_their_logs_still_answer_for_them);
