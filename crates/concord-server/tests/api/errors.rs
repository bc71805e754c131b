use crate::both_backends;
use crate::helpers::{Backend, assert_problem, spawn_app, spawn_app_with};
use reqwest::Method;
use serde_json::json;

async fn malformed_json_is_rejected_and_writes_nothing(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    for raw in [
        "{",
        "[]",
        "{\"events\": 5}",
        "{\"events\": [{\"data\": {}}]}",
        "null",
        "{\"events\": [], \"x\": 1}",
    ] {
        let r = app
            .admin(Method::POST, "/v1/streams/a-1")
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "malformed_json").await;
    }
    let r = app
        .admin(Method::POST, "/v1/streams/a-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "unsupported_media_type").await;
    assert_eq!(app.log_len().await, 0);
}
both_backends!(malformed_json_is_rejected_and_writes_nothing);

async fn unknown_expected_version_forms_are_rejected(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    for ev in [
        json!("latest"),
        json!(-1),
        json!(1.5),
        json!([1]),
        json!({"v": 1}),
        json!(true),
        json!("NO_STREAM"),
    ] {
        let r = app
            .append(
                "a-1",
                json!({"expected_version": ev, "events": [{"type": "E", "data": {}}]}),
            )
            .await;
        assert_problem(r, 400, "invalid_expected_version").await;
    }
    assert_eq!(app.log_len().await, 0);
}
both_backends!(unknown_expected_version_forms_are_rejected);

async fn bad_stream_names_are_rejected(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let long = "x".repeat(201);
    for name in ["a%20b", "a%2Fb", "-x", "%C3%BC", long.as_str(), "%24", "a%0Ab"] {
        let r = app.append(name, json!({"events": [{"type": "E", "data": {}}]})).await;
        assert_problem(r, 400, "invalid_stream_name").await;
        let r = app
            .admin(Method::GET, &format!("/v1/streams/{name}"))
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_stream_name").await;
    }
    let r = app.admin(Method::GET, "/v1/events?category=a-b").send().await.unwrap();
    assert_problem(r, 400, "invalid_stream_name").await;
    assert_eq!(app.log_len().await, 0);
}
both_backends!(bad_stream_names_are_rejected);

async fn limits_are_enforced_and_nothing_of_the_request_is_written(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.max_event_bytes = 1000;
        s.max_events_per_append = 3;
        s.max_body_bytes = 64 * 1024;
    })
    .await
    else {
        return;
    };
    let small = json!({"type": "E", "data": {"x": 1}});
    let big = json!({"type": "E", "data": {"x": "y".repeat(1200)}});
    let r = app.append("a-1", json!({"events": [small.clone(), big]})).await;
    let p = assert_problem(r, 400, "event_too_large").await;
    assert!(p["detail"].as_str().unwrap().contains("1000"));
    let r = app
        .append(
            "a-1",
            json!({"events": [small.clone(), small.clone(), small.clone(), small.clone()]}),
        )
        .await;
    assert_problem(r, 400, "batch_too_large").await;
    let r = app.append("a-1", json!({"events": []})).await;
    assert_problem(r, 400, "empty_append").await;
    let id = uuid::Uuid::now_v7();
    let dup = json!({"id": id, "type": "E", "data": {}});
    let r = app.append("a-1", json!({"events": [dup.clone(), dup]})).await;
    assert_problem(r, 400, "duplicate_event_id").await;
    let r = app
        .append("a-1", json!({"events": [{"type": "E", "data": {}, "metadata": [1]}]}))
        .await;
    assert_problem(r, 400, "invalid_metadata").await;
    let r = app
        .append("a-1", json!({"events": [{"type": "E", "data": {"x": "nul\u{0}"}}]}))
        .await;
    assert_problem(r, 400, "invalid_event_data").await;
    let r = app
        .append("a-1", json!({"events": [{"type": "has space", "data": {}}]}))
        .await;
    assert_problem(r, 400, "invalid_event_type").await;
    let huge = "z".repeat(70 * 1024);
    let r = app
        .append("a-1", json!({"events": [{"type": "E", "data": huge}]}))
        .await;
    assert_problem(r, 413, "body_too_large").await;
    assert_eq!(app.log_len().await, 0, "no rejected request wrote anything");
    let r = app.admin(Method::GET, "/v1/events?limit=0").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
    let r = app.admin(Method::GET, "/v1/events?limit=100000").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
    let r = app.admin(Method::GET, "/v1/events?after=-1").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
    let r = app.admin(Method::GET, "/v1/streams/a-1?from=0").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
}
both_backends!(limits_are_enforced_and_nothing_of_the_request_is_written);

#[tokio::test]
async fn unknown_routes_and_methods_answer_problems() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let r = app.admin(Method::GET, "/v2/nothing").send().await.unwrap();
    assert_problem(r, 404, "not_found").await;
    let r = app.admin(Method::PATCH, "/v1/events").send().await.unwrap();
    assert_problem(r, 405, "method_not_allowed").await;
}

#[test]
fn every_error_code_has_a_distinct_stable_name() {
    // The table itself is checked in concord-api; here: codes the server answers are in it.
    for code in [
        "wrong_expected_version",
        "not_found",
        "forbidden",
        "idempotency_key_reused",
        "idempotency_key_in_flight",
    ] {
        assert!(concord_api::ErrorCode::from_code(code).is_some(), "{code}");
    }
}
