//! Consumer groups and saga definitions belong to the API key name that first changed them:
//! another key name can neither move a group's checkpoint nor put a version of the definition.

use crate::both_backends;
use crate::helpers::{Backend, assert_problem, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

async fn another_key_cannot_move_a_groups_checkpoint(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let billing = app.create_named_key("billing", &["events:read"]).await;
    let intruder = app.create_named_key("reports", &["events:read"]).await;
    let save = |key: String, position: u64| {
        app.request(Method::PUT, "/v1/subscriptions/billing/checkpoint", Some(&key))
            .json(&json!({"member": 0, "position": position}))
            .send()
    };
    let position = |key: String| {
        app.request(Method::GET, "/v1/subscriptions/billing/events?limit=1", Some(&key))
            .send()
    };
    app.append_one("pay-1", "E").await;
    assert_eq!(save(billing.clone(), 10).await.unwrap().status(), 204);
    for moved in [0, 20] {
        let r = save(intruder.clone(), moved).await.unwrap();
        let problem = assert_problem(r, 403, "not_owner").await;
        assert!(problem["detail"].as_str().unwrap().contains("billing"), "{problem}");
    }
    // Reading is not changing: the other key may still read from the group's checkpoint.
    let page: Value = position(intruder.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 0, "still after 10: {page}");
    // A rotated key of the same name, and an admin key, may move it.
    let rotated = app.create_named_key("billing", &["events:read"]).await;
    assert_eq!(save(rotated, 0).await.unwrap().status(), 204);
    let page: Value = position(billing.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "rewound to 0: {page}");
    let r = app
        .admin(Method::PUT, "/v1/subscriptions/billing/checkpoint")
        .json(&json!({"member": 0, "position": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}
both_backends!(another_key_cannot_move_a_groups_checkpoint);

async fn another_key_cannot_replace_a_definition(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let shop = app.create_named_key("shop", &["sagas:write", "sagas:read"]).await;
    let other = app.create_named_key("other-team", &["sagas:write", "sagas:read"]).await;
    let def = |url: &str| json!({"steps": [{"name": "s", "action": {"method": "POST", "url": url}}]});
    let put = |key: String, d: Value| {
        app.request(Method::PUT, "/v1/saga-definitions/place-order", Some(&key))
            .json(&d)
            .send()
    };
    assert_eq!(
        put(shop.clone(), def("http://127.0.0.1:1/a")).await.unwrap().status(),
        201
    );
    let r = put(other.clone(), def("http://127.0.0.1:1/stolen")).await.unwrap();
    assert_problem(r, 403, "not_owner").await;
    let latest: Value = app
        .request(Method::GET, "/v1/saga-definitions/place-order", Some(&other))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(latest["version"], 1, "{latest}");
    assert_eq!(
        put(shop, def("http://127.0.0.1:1/b")).await.unwrap().status(),
        201,
        "the owner puts version 2"
    );
    // A refused put claims nothing, and an admin's put claims nothing either.
    let put_as = |key: String, name: &'static str, d: Value| {
        app.request(Method::PUT, &format!("/v1/saga-definitions/{name}"), Some(&key))
            .json(&d)
            .send()
    };
    let bad = json!({"steps": []});
    assert_eq!(put_as(other.clone(), "refund", bad).await.unwrap().status(), 400);
    let shop = app.create_named_key("shop", &["sagas:write"]).await;
    assert_eq!(
        put_as(shop.clone(), "refund", def("http://127.0.0.1:1/r"))
            .await
            .unwrap()
            .status(),
        201,
        "a refused put did not claim the name"
    );
    let r = app
        .admin(Method::PUT, "/v1/saga-definitions/ship")
        .json(&def("http://127.0.0.1:1/s"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        put_as(shop, "ship", def("http://127.0.0.1:1/s2"))
            .await
            .unwrap()
            .status(),
        201,
        "what an admin set up is the first service key's to claim"
    );
}
both_backends!(another_key_cannot_replace_a_definition);
