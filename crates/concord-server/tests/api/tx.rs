//! Two-phase commit through the HTTP API, against in-process participants.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app, spawn_app_with};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a test participant saw: its vote per xid and the phase-2 messages it got.
#[derive(Default)]
struct Seen {
    prepared: HashMap<String, String>,
    finished: Vec<(String, String)>,
    /// Answer 503 to this many phase-2 messages before acknowledging.
    refuse_phase2: u32,
}

/// A participant whose vote comes from the payload: `{"vote": "commit" | "abort" | "silent"}`.
async fn participant() -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    async fn prepare(State(seen): State<Arc<Mutex<Seen>>>, Json(m): Json<Value>) -> StatusCode {
        let vote = m["payload"]["vote"].as_str().unwrap_or("commit").to_owned();
        if vote == "silent" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        seen.lock()
            .unwrap()
            .prepared
            .insert(m["xid"].as_str().unwrap().to_owned(), vote.clone());
        if vote == "abort" {
            StatusCode::CONFLICT
        } else {
            StatusCode::OK
        }
    }
    async fn finish(seen: Arc<Mutex<Seen>>, what: &str, m: Value) -> StatusCode {
        let mut s = seen.lock().unwrap();
        if s.refuse_phase2 > 0 {
            s.refuse_phase2 -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        s.finished
            .push((m["xid"].as_str().unwrap().to_owned(), what.to_owned()));
        StatusCode::OK
    }
    let app = axum::Router::new()
        .route("/prepare", post(prepare))
        .route(
            "/commit",
            post(|State(s): State<Arc<Mutex<Seen>>>, Json(m): Json<Value>| finish(s, "commit", m)),
        )
        .route(
            "/abort",
            post(|State(s): State<Arc<Mutex<Seen>>>, Json(m): Json<Value>| finish(s, "abort", m)),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

async fn begin(app: &TestApp, body: Value) -> reqwest::Response {
    app.admin(Method::POST, "/v1/transactions")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn settled(app: &TestApp, xid: &str) -> Value {
    for _ in 0..200 {
        let t: Value = app
            .admin(Method::GET, &format!("/v1/transactions/{xid}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if t["pending"] == false {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("transaction {xid} still pending");
}

async fn unanimous_commit_commits_everyone_and_one_abort_aborts_everyone(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (a_url, a) = participant().await;
    let (b_url, bb) = participant().await;
    let body = |va: &str, vb: &str| {
        json!({"participants": [
            {"name": "wh-a", "url": a_url, "payload": {"vote": va}},
            {"name": "wh-b", "url": b_url, "payload": {"vote": vb}}], "timeout_ms": 1000})
    };
    let r = begin(&app, body("commit", "commit")).await;
    assert_eq!(r.status(), 200);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["outcome"], "committed");
    let xid = d["xid"].as_str().unwrap().to_owned();
    let t = settled(&app, &xid).await;
    assert_eq!(t["participants"][0]["vote"], "commit");
    assert!(t["participants"][1]["acknowledged_at"].is_string());
    assert!(t["completed_at"].is_string());
    assert_eq!(a.lock().unwrap().finished, [(xid.clone(), "commit".to_owned())]);
    assert_eq!(bb.lock().unwrap().finished, [(xid.clone(), "commit".to_owned())]);

    let d: Value = begin(&app, body("commit", "abort")).await.json().await.unwrap();
    assert_eq!(d["outcome"], "aborted");
    let xid2 = d["xid"].as_str().unwrap().to_owned();
    let t = settled(&app, &xid2).await;
    assert_eq!(t["participants"][1]["vote"], "abort");
    assert!(t["reason"].as_str().unwrap().contains("wh-b voted abort"));
    assert!(a.lock().unwrap().finished.contains(&(xid2.clone(), "abort".to_owned())));
    assert!(
        !a.lock()
            .unwrap()
            .finished
            .iter()
            .any(|(x, w)| *x == xid2 && w == "commit")
    );

    // The log is in the event store, decision before any acknowledgement.
    let log: Value = app
        .admin(Method::GET, &format!("/v1/streams/tx-{xid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    // Phase 2 acknowledged at the first round: its completion is in the row, not the log.
    assert_eq!(types, ["TxStarted", "TxDecided"]);

    let page: Value = app
        .admin(Method::GET, "/v1/transactions?outcome=committed")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["transactions"].as_array().unwrap().len(), 1);
    assert_eq!(page["transactions"][0]["xid"], xid.as_str());
}
both_backends!(unanimous_commit_commits_everyone_and_one_abort_aborts_everyone);

async fn a_silent_participant_aborts_at_the_timeout_and_phase_two_is_retried(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (a_url, a) = participant().await;
    let (b_url, _) = participant().await;
    a.lock().unwrap().refuse_phase2 = 2;
    let r = begin(
        &app,
        json!({"participants": [
            {"name": "a", "url": a_url, "payload": {"vote": "commit"}},
            {"name": "b", "url": b_url, "payload": {"vote": "silent"}}], "timeout_ms": 300}),
    )
    .await;
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["outcome"], "aborted");
    let xid = d["xid"].as_str().unwrap().to_owned();
    let pending: Value = app
        .admin(Method::GET, "/v1/transactions?pending=true")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        pending["transactions"][0]["xid"],
        xid.as_str(),
        "pending while a refuses phase 2"
    );
    let t = settled(&app, &xid).await;
    assert!(t["participants"][1]["vote"].is_null(), "no answer in time");
    assert!(t["reason"].as_str().unwrap().contains("b did not answer"));
    assert_eq!(
        a.lock().unwrap().finished,
        [(xid, "abort".to_owned())],
        "acknowledged on the third try"
    );
}
both_backends!(a_silent_participant_aborts_at_the_timeout_and_phase_two_is_retried);

async fn unknown_xids_are_presumed_aborted_and_bad_requests_are_named(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let t: Value = app
        .admin(Method::GET, "/v1/transactions/never-heard-of")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (t["outcome"].as_str(), t["presumed"].as_bool()),
        (Some("aborted"), Some(true))
    );
    // So is an xid the coordinator could never have made (outside the alphabet, too long),
    // answered with the xid as asked.
    for (asked, xid) in [
        ("bad%20xid", "bad xid".to_owned()),
        ("a'b", "a'b".to_owned()),
        (&"x".repeat(129), "x".repeat(129)),
    ] {
        let t: Value = app
            .admin(Method::GET, &format!("/v1/transactions/{asked}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (t["xid"].as_str(), t["outcome"].as_str(), t["presumed"].as_bool()),
            (Some(xid.as_str()), Some("aborted"), Some(true)),
            "{t}"
        );
    }
    let p = json!({"name": "a", "url": "http://127.0.0.1:9"});
    let cases = [
        (
            json!({"participants": [], "timeout_ms": 100}),
            "transaction_limit_exceeded",
        ),
        (
            json!({"participants": [p, p], "timeout_ms": 100}),
            "invalid_participant",
        ),
        (
            json!({"participants": [{"name": "a", "url": "ftp://x"}], "timeout_ms": 100}),
            "invalid_participant",
        ),
        (
            json!({"participants": [p], "timeout_ms": 0}),
            "transaction_limit_exceeded",
        ),
        (json!({"participants": [p]}), "malformed_json"),
    ];
    for (body, code) in cases {
        assert_problem(begin(&app, body).await, 400, code).await;
    }
    let reader = app.create_key(&["tx:read"]).await;
    let r = app
        .request(Method::POST, "/v1/transactions", Some(&reader))
        .json(&json!({"participants": [p], "timeout_ms": 100}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::GET, "/v1/transactions", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .admin(Method::GET, "/v1/transactions?outcome=maybe")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_parameter").await;
}
both_backends!(unknown_xids_are_presumed_aborted_and_bad_requests_are_named);

async fn transaction_logs_are_guarded_and_begin_honours_idempotency_keys(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let (url, seen) = participant().await;
    let body = json!({"participants": [{"name": "a", "url": url, "payload": {"vote": "commit"}}], "timeout_ms": 1000});
    let send = || {
        app.admin(Method::POST, "/v1/transactions")
            .header("Idempotency-Key", "move-42")
            .json(&body)
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "the same transaction, not a second one"
    );
    let xid = first["xid"].as_str().unwrap().to_owned();
    settled(&app, &xid).await;
    assert_eq!(seen.lock().unwrap().prepared.len(), 1);
    // A transaction's log can be neither forged nor read without the transaction scopes.
    let writer = app.create_key(&["events:write", "events:read"]).await;
    let forged = json!({"events": [{"type": "TxDecided", "data": {"outcome": "committed"}}]});
    let r = app
        .request(Method::POST, &format!("/v1/streams/tx-{xid}"), Some(&writer))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    // Not even by admin: a forged decision would commit despite an abort vote.
    let r = app.append(&format!("tx-{xid}"), forged.clone()).await;
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::GET, &format!("/v1/streams/tx-{xid}"), Some(&writer))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let log: Value = app
        .request(Method::GET, "/v1/events?limit=100", Some(&writer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !e["stream"].as_str().unwrap().starts_with("tx-"))
    );
}
both_backends!(transaction_logs_are_guarded_and_begin_honours_idempotency_keys);

async fn a_decided_transaction_leaves_the_work_table_and_its_log_still_tells_its_outcome(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.tx_retention_s = 1;
        s.retention_sweep_ms = 100;
    })
    .await
    else {
        return;
    };
    let (url, seen) = participant().await;
    let body =
        json!({"participants": [{"name": "wh-a", "url": url, "payload": {"vote": "commit"}}], "timeout_ms": 1000});
    let d: Value = begin(&app, body).await.json().await.unwrap();
    assert_eq!(d["outcome"], "committed");
    let xid = d["xid"].as_str().unwrap().to_owned();
    settled(&app, &xid).await;
    let listed = |page: &Value| {
        page["transactions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["xid"] == xid.as_str())
    };
    let mut gone = false;
    for _ in 0..200 {
        let page: Value = app
            .admin(Method::GET, "/v1/transactions?limit=1000")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !listed(&page) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the row of {xid} outlived its retention");
    // Never a presumed abort: the log still tells it was committed.
    let t: Value = app
        .admin(Method::GET, &format!("/v1/transactions/{xid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&t["outcome"], &t["presumed"], &t["pending"]),
        (&json!("committed"), &json!(false), &json!(false)),
        "{t}"
    );
    assert!(t["completed_at"].is_string(), "{t}");
    assert_eq!(seen.lock().unwrap().finished, [(xid.clone(), "commit".to_owned())]);
}
both_backends!(a_decided_transaction_leaves_the_work_table_and_its_log_still_tells_its_outcome);
