use crate::both_backends;
use crate::helpers::{Backend, spawn_app};
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn health_answers_ok() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let r = app.request(Method::GET, "/health", None).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_appends() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    app.append_one("m-1", "E").await;
    let _ = app.request(Method::GET, "/v1/events", None).send().await.unwrap();
    let text = app
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"concord_http_requests_total{method="POST",route="/v1/streams/{stream}",status="200"}"#,
        r#"concord_http_requests_total{method="GET",route="/v1/events",status="401"}"#,
        "concord_http_request_duration_seconds_bucket",
        "concord_events_appended_total",
        "concord_group_commit_batch_appends",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("m-1"), "raw paths never become labels");
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let doc: Value = app
        .admin(Method::GET, "/v1/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    // Every operation with the scope it needs (None: public, Some(""): any valid key); the
    // authentication layer enforces what the document says.
    let expected: &[(&str, &str, Option<&str>)] = &[
        ("get", "/health", None),
        ("get", "/ready", None),
        ("get", "/metrics", None),
        ("post", "/callbacks/{token}", None),
        ("post", "/v1/streams/{stream}", Some("events:write")),
        ("get", "/v1/streams/{stream}", Some("events:read")),
        ("get", "/v1/events", Some("events:read")),
        ("get", "/v1/events/subscribe", Some("events:read")),
        ("get", "/v1/subscriptions/{group}/events", Some("events:read")),
        ("put", "/v1/subscriptions/{group}/checkpoint", Some("events:read")),
        ("put", "/v1/saga-definitions/{name}", Some("sagas:write")),
        ("get", "/v1/saga-definitions/{name}", Some("sagas:read")),
        ("post", "/v1/sagas", Some("sagas:write")),
        ("get", "/v1/sagas", Some("sagas:read")),
        ("get", "/v1/sagas/{id}", Some("sagas:read")),
        ("post", "/v1/sagas/{id}/retry", Some("sagas:write")),
        ("post", "/v1/sagas/{id}/cancel", Some("sagas:write")),
        ("post", "/v1/sagas/{id}/pause", Some("sagas:write")),
        ("post", "/v1/sagas/{id}/resume", Some("sagas:write")),
        ("post", "/v1/sagas/{id}/retry-now", Some("sagas:write")),
        ("post", "/v1/sagas/{id}/signals/{signal}", Some("sagas:signal")),
        ("post", "/v1/saga-batches", Some("sagas:write")),
        ("get", "/v1/saga-batches/{id}", Some("sagas:read")),
        ("put", "/v1/participant-limits/{host}", Some("admin")),
        ("get", "/v1/participant-limits/{host}", Some("sagas:read")),
        ("get", "/v1/participant-limits", Some("sagas:read")),
        ("post", "/v1/transactions", Some("tx:write")),
        ("get", "/v1/transactions", Some("tx:read")),
        ("get", "/v1/transactions/{xid}", Some("tx:read")),
        ("post", "/v1/vault/tokenize", Some("vault:tokenize")),
        ("post", "/v1/vault/detokenize", Some("")),
        ("put", "/v1/vault/rules/{category}", Some("vault:admin")),
        ("get", "/v1/vault/rules/{category}", Some("vault:admin")),
        ("delete", "/v1/vault/subjects/{subject}", Some("vault:admin")),
        ("post", "/v1/vault/keys/rotate", Some("vault:admin")),
        ("post", "/v1/keys", Some("admin")),
        ("delete", "/v1/keys/{id}", Some("admin")),
        ("get", "/v1/openapi.json", Some("")),
    ];
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|i| i.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, expected.len(), "documented operations");
    for (method, path, scope) in expected {
        let op = &doc["paths"][*path][*method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let security = &op["security"];
        match scope {
            None => assert_eq!(security, &serde_json::json!([{}]), "{method} {path}"),
            Some("") => assert_eq!(security, &serde_json::json!([{"bearer": []}]), "{method} {path}"),
            Some(scope) => assert_eq!(security, &serde_json::json!([{"bearer": [scope]}]), "{method} {path}"),
        }
        for (status, answer) in op["responses"].as_object().unwrap() {
            if status.as_str() >= "400" {
                assert!(
                    answer["content"]["application/problem+json"].is_object(),
                    "{method} {path} {status} is a problem document"
                );
            }
        }
        if scope.is_some() {
            assert!(op["responses"]["401"].is_object(), "{method} {path} answers 401");
        }
    }
    // Public routes answer without a key, the others do not.
    for (method, path, scope) in expected.iter().filter(|(m, p, _)| *m == "get" && !p.contains('{')) {
        let r = app.request(Method::GET, path, None).send().await.unwrap();
        assert_eq!(r.status() == 401, scope.is_some(), "{method} {path}: {}", r.status());
    }
    // The settings' limits are in the schemas.
    assert_eq!(
        doc["components"]["schemas"]["AppendBody"]["properties"]["events"]["maxItems"],
        serde_json::json!(app.state.settings.max_events_per_append)
    );
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}

/// Once the server runs, the settings it keeps for its whole life hold no secret: the master
/// key, the admin key, the 2PC token and the saga secrets live only in the parts that use them.
async fn the_running_server_keeps_no_secret_in_its_settings(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |s| {
        s.tx_participant_token = Some("tx-token".into());
        s.tx_participant_token_hosts = vec!["127.0.0.1".into()];
    })
    .await
    else {
        return;
    };
    let s = &app.state.settings;
    assert!(s.vault_master_key.is_none() && s.vault_previous_master_keys.is_empty());
    assert!(s.admin_key.is_none() && s.tx_participant_token.is_none() && s.saga_secrets.is_empty());
    let r = app.admin(Method::GET, "/v1/events?limit=1").send().await.unwrap();
    assert_eq!(r.status(), 200, "the admin key still works: it lives in the key store");
}
both_backends!(the_running_server_keeps_no_secret_in_its_settings);

/// Readiness is its own endpoint: 200 while the store answers; from the start of a shutdown on it
/// answers 503 `draining` while the node still serves for `drain_ms`, and liveness stays 200.
async fn readiness_turns_false_when_a_drain_begins(b: Backend) {
    let Some(mut app) = crate::helpers::spawn_app_with(b, |s| s.drain_ms = 3000).await else {
        return;
    };
    let r = app.request(Method::GET, "/ready", None).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ready");
    app.shut_down();
    let mut draining = None;
    for _ in 0..100 {
        let r = app.request(Method::GET, "/ready", None).send().await.unwrap();
        if r.status() == 503 {
            draining = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    crate::helpers::assert_problem(draining.expect("readiness turned false"), 503, "draining").await;
    let r = app.request(Method::GET, "/health", None).send().await.unwrap();
    assert_eq!(r.status(), 200, "alive while draining");
    let r = app.admin(Method::GET, "/v1/events?limit=1").send().await.unwrap();
    assert_eq!(r.status(), 200, "requests are still served during the drain");
}
both_backends!(readiness_turns_false_when_a_drain_begins);
