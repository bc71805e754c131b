use crate::both_backends;
use crate::helpers::{Backend, assert_problem, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

async fn an_append_is_atomic_numbered_and_read_back(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let r = app
        .append(
            "order-42",
            json!({"expected_version": "no_stream", "events": [
                {"type": "Placed", "data": {"total": 10}, "metadata": {"correlation_id": "c-1", "causation_id": "cmd-7"}},
                {"type": "Paid", "data": {"amount": 10}}
            ]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["stream"], "order-42");
    assert_eq!(
        (a["first_version"].as_u64(), a["last_version"].as_u64()),
        (Some(1), Some(2))
    );
    let r = app.admin(Method::GET, "/v1/streams/order-42").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["type"], "Placed");
    assert_eq!(events[0]["version"], 1);
    assert_eq!(events[0]["data"], json!({"total": 10}));
    assert_eq!(events[0]["metadata"]["correlation_id"], "c-1");
    assert_eq!(events[0]["metadata"]["causation_id"], "cmd-7");
    assert_eq!(events[1]["position"], a["position"]);
    assert!(events[0]["recorded_at"].is_string() && events[0]["id"].is_string());
    assert_eq!(page["next"], 3, "a page with events names the next");
    let r = app
        .admin(Method::GET, "/v1/streams/order-42?from=3")
        .send()
        .await
        .unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next"], Value::Null, "an empty page is the end");

    let r = app
        .admin(Method::GET, "/v1/streams/order-42?from=2&limit=1")
        .send()
        .await
        .unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["events"][0]["type"], "Paid");
    assert_eq!(page["next"], 3);
    let r = app.admin(Method::GET, "/v1/streams/order-43").send().await.unwrap();
    assert_problem(r, 404, "stream_not_found").await;
}
both_backends!(an_append_is_atomic_numbered_and_read_back);

async fn expected_version_mismatches_answer_409_with_the_current_version(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let ev = |v: Value| json!({"expected_version": v, "events": [{"type": "E", "data": {}}]});
    let r = app.append("acc-1", ev(json!("exists"))).await;
    let p = assert_problem(r, 409, "wrong_expected_version").await;
    assert_eq!(p["current_version"], 0);
    assert_eq!(app.append("acc-1", ev(json!("no_stream"))).await.status(), 200);
    assert_eq!(app.append("acc-1", ev(json!(1))).await.status(), 200);
    let r = app.append("acc-1", ev(json!(1))).await;
    let p = assert_problem(r, 409, "wrong_expected_version").await;
    assert_eq!(p["current_version"], 2);
    assert_eq!(app.append("acc-1", ev(json!("exists"))).await.status(), 200);
    assert_eq!(app.append("acc-1", ev(json!("any"))).await.status(), 200);
    assert_eq!(app.log_len().await, 4);
}
both_backends!(expected_version_mismatches_answer_409_with_the_current_version);

async fn re_sending_an_append_with_the_same_event_ids_returns_the_original_answer(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let body = json!({"expected_version": "no_stream", "events": [
        {"id": uuid::Uuid::now_v7(), "type": "A", "data": {}},
        {"id": uuid::Uuid::now_v7(), "type": "B", "data": {}}
    ]});
    let first: Value = app.append("cart-1", body.clone()).await.json().await.unwrap();
    app.append_one("cart-1", "C").await;
    let r = app.append("cart-1", body.clone()).await;
    assert_eq!(r.status(), 200, "a re-sent append is not an error");
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(app.log_len().await, 3);
    let r = app.append("cart-2", body).await;
    assert_problem(r, 409, "event_id_conflict").await;
}
both_backends!(re_sending_an_append_with_the_same_event_ids_returns_the_original_answer);

async fn the_global_log_reads_by_position_and_category(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let mut positions = Vec::new();
    for i in 0..6 {
        let cat = if i % 2 == 0 { "order" } else { "invoice" };
        let a = app.append_one(&format!("{cat}-{i}"), "E").await;
        positions.push(a["position"].as_u64().unwrap());
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let page: Value = app
        .admin(Method::GET, "/v1/events")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 6);
    let url = format!("/v1/events?after={}&limit=2", positions[1]);
    let page: Value = app.admin(Method::GET, &url).send().await.unwrap().json().await.unwrap();
    let got: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(got, positions[2..4]);
    assert_eq!(page["next"], positions[3]);
    let page: Value = app
        .admin(Method::GET, "/v1/events?category=invoice")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streams: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["invoice-1", "invoice-3", "invoice-5"]);
    let url = format!("/v1/events?after={}", positions[5]);
    let page: Value = app.admin(Method::GET, &url).send().await.unwrap().json().await.unwrap();
    assert!(page["events"].as_array().unwrap().is_empty());
    assert_eq!(page["next"], positions[5], "an empty page keeps the cursor");
}
both_backends!(the_global_log_reads_by_position_and_category);

async fn concurrent_appends_are_all_stored_once_in_order(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for c in 0..32 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                app.append_one(&format!("c{c}-{i}"), "E").await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let page: Value = app
        .admin(Method::GET, "/v1/events?limit=1000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let positions: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (1..=160).collect::<Vec<u64>>(),
        "positions are contiguous, no gaps"
    );
}
both_backends!(concurrent_appends_are_all_stored_once_in_order);
