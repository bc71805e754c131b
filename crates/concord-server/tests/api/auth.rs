use crate::both_backends;
use crate::helpers::{Backend, assert_problem, spawn_app};
use reqwest::Method;
use serde_json::json;

async fn every_v1_route_refuses_a_missing_or_unknown_key(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let routes = [
        (Method::POST, "/v1/streams/a-1"),
        (Method::GET, "/v1/streams/a-1"),
        (Method::GET, "/v1/events"),
        (Method::GET, "/v1/events/subscribe"),
        (Method::GET, "/v1/subscriptions/g/events"),
        (Method::PUT, "/v1/subscriptions/g/checkpoint"),
        (Method::POST, "/v1/keys"),
        (Method::DELETE, "/v1/keys/00000000-0000-0000-0000-000000000000"),
        (Method::GET, "/v1/openapi.json"),
    ];
    for (m, path) in routes {
        let r = app.request(m.clone(), path, None).send().await.unwrap();
        assert_problem(r, 401, "unauthorized").await;
        let r = app.request(m.clone(), path, Some("ck_not-a-key")).send().await.unwrap();
        assert_problem(r, 401, "unauthorized").await;
    }
    let r = app.request(Method::GET, "/health", None).send().await.unwrap();
    assert_eq!(r.status(), 200, "health needs no key");
    let r = app.request(Method::GET, "/metrics", None).send().await.unwrap();
    assert_eq!(r.status(), 200, "metrics needs no key");
}
both_backends!(every_v1_route_refuses_a_missing_or_unknown_key);

async fn a_key_without_the_scope_is_forbidden(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let reader = app.create_key(&["events:read"]).await;
    let writer = app.create_key(&["events:write"]).await;
    let body = json!({"events": [{"type": "E", "data": {}}]});
    let r = app
        .request(Method::POST, "/v1/streams/a-1", Some(&reader))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::POST, "/v1/streams/a-1", Some(&writer))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .request(Method::GET, "/v1/streams/a-1", Some(&writer))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::GET, "/v1/streams/a-1", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .request(Method::POST, "/v1/keys", Some(&writer))
        .json(&json!({"name": "x", "scopes": ["admin"]}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
}
both_backends!(a_key_without_the_scope_is_forbidden);

async fn a_revoked_key_stops_working(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let r = app
        .admin(Method::POST, "/v1/keys")
        .json(&json!({"name": "temp", "scopes": ["events:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = r.json().await.unwrap();
    assert_eq!(created["name"], "temp");
    assert_eq!(created["scopes"], json!(["events:read"]));
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    let r = app.request(Method::GET, "/v1/events", Some(key)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .admin(Method::DELETE, &format!("/v1/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app.request(Method::GET, "/v1/events", Some(key)).send().await.unwrap();
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .admin(Method::DELETE, &format!("/v1/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "key_not_found").await;
    let r = app.admin(Method::DELETE, "/v1/keys/not-a-uuid").send().await.unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
}
both_backends!(a_revoked_key_stops_working);

async fn key_creation_rejects_unknown_scopes_and_empty_names(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    for (body, code) in [
        (json!({"name": "x", "scopes": ["root"]}), "invalid_scope"),
        (json!({"name": "x", "scopes": []}), "invalid_parameter"),
        (json!({"name": "", "scopes": ["admin"]}), "invalid_parameter"),
        // A control character in a name would break the grant's audit record (nothing is written).
        (
            json!({"name": "a\u{0}b", "scopes": ["vault:detokenize:card"]}),
            "invalid_parameter",
        ),
        (
            json!({"name": "é".repeat(101), "scopes": ["admin"]}),
            "invalid_parameter",
        ),
        (json!({"name": "x"}), "malformed_json"),
    ] {
        let r = app.admin(Method::POST, "/v1/keys").json(&body).send().await.unwrap();
        assert_problem(r, 400, code).await;
    }
}
both_backends!(key_creation_rejects_unknown_scopes_and_empty_names);

#[tokio::test]
async fn keys_are_stored_hashed_never_in_plaintext() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let key = app.create_key(&["events:read"]).await;
    // Even when created with an Idempotency-Key, the response is not kept for replay.
    let created = |k: &'static str| {
        app.admin(Method::POST, "/v1/keys")
            .header("Idempotency-Key", k)
            .json(&json!({"name": "idem", "scopes": ["events:read"]}))
            .send()
    };
    let first: serde_json::Value = created("create-1").await.unwrap().json().await.unwrap();
    let second = created("create-1").await.unwrap();
    assert_eq!(second.status(), 201);
    assert!(
        second.headers().get("idempotent-replayed").is_none(),
        "a secret is never replayed"
    );
    let idem_key = first["key"].as_str().unwrap().to_owned();
    let path = app.database_url.trim_start_matches("sqlite://").to_owned();
    // Read every byte of the database and its WAL: neither key may appear anywhere.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
    for secret in [key.as_bytes(), app.admin_key.as_bytes(), idem_key.as_bytes()] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "a key is stored in plaintext"
        );
    }
}

#[tokio::test]
async fn admin_does_not_imply_revealing_vault_values() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    // The scope is accepted for a key, but admin alone never grants it.
    let r = app
        .admin(Method::POST, "/v1/keys")
        .json(&json!({"name": "payments", "scopes": ["vault:detokenize:card"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn system_streams_are_written_only_with_admin() {
    let Some(app) = spawn_app(Backend::Sqlite).await else {
        return;
    };
    let writer = app.create_key(&["events:write"]).await;
    let body = json!({"events": [{"type": "E", "data": {}}]});
    let r = app
        .request(Method::POST, "/v1/streams/$audit-1", Some(&writer))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    // A write the key may not make is refused before its body is read.
    let r = app
        .request(Method::POST, "/v1/streams/saga-x", Some(&writer))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app.append("$audit-1", body).await;
    assert_eq!(r.status(), 200, "admin may write a system stream");
}
