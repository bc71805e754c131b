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
    for (method, path, _) in concord_server::auth::ROUTE_SCOPES {
        if *path == "/v1/openapi.json" {
            continue;
        }
        let op = &doc["paths"][*path][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is not documented");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}
