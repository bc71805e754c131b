//! The outbound policy: where saga steps and 2PC participants may be called, proven with a
//! capture listener on loopback that counts every request it gets and the tokens they carry.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app_with};
use axum::http::{HeaderMap, StatusCode, header};
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "tx-token-for-the-capture-test";

/// Every request a listener got: (path, Authorization header).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A listener that records every request and answers 200 `{}`.
async fn capture() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let router = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap| {
        let s = s.clone();
        async move {
            let auth = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            s.lock().unwrap().push((uri.path().to_owned(), auth));
            axum::Json(json!({}))
        }
    });
    (serve(router).await, seen)
}

/// A listener that redirects every request to `to`.
async fn redirector(to: String) -> u16 {
    let router = axum::Router::new().fallback(move || {
        let to = to.clone();
        async move { (StatusCode::FOUND, [(header::LOCATION, to)]) }
    });
    serve(router).await
}

async fn serve(router: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await });
    port
}

fn one_step(url: &str) -> Value {
    json!({"steps": [{"name": "call", "action": {"method": "GET", "url": url},
                      "retry": {"max_attempts": 1, "backoff_ms": 10, "max_backoff_ms": 10}}]})
}

async fn put(app: &TestApp, name: &str, def: &Value) -> reqwest::Response {
    app.admin(Method::PUT, &format!("/v1/saga-definitions/{name}"))
        .json(def)
        .send()
        .await
        .unwrap()
}

async fn run(app: &TestApp, definition: &str, id: &str) -> Value {
    let r = app
        .admin(Method::POST, "/v1/sagas?wait_ms=20000")
        .json(&json!({"definition": definition, "id": id, "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "start {id}");
    r.json().await.unwrap()
}

async fn begin(app: &TestApp, url: &str) -> reqwest::Response {
    app.admin(Method::POST, "/v1/transactions")
        .json(&json!({"participants": [{"name": "p", "url": url, "payload": {}}], "timeout_ms": 2000}))
        .send()
        .await
        .unwrap()
}

/// With the default settings, no step or participant reaches loopback, link-local (metadata),
/// private or unique-local addresses, however the address is written.
async fn by_default_loopback_and_metadata_are_refused(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.saga_allowed_hosts = Vec::new();
        s.tx_allowed_hosts = Vec::new();
        s.tx_participant_token = Some(TOKEN.into());
        s.tx_participant_token_hosts = vec!["127.0.0.1".into()];
    })
    .await
    else {
        return;
    };
    let (port, seen) = capture().await;
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://localhost:{port}/x"),
        format!("http://[::1]:{port}/x"),
        format!("http://[::ffff:127.0.0.1]:{port}/x"),
        format!("http://2130706433:{port}/x"),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/".to_owned(),
        "http://[fd00:ec2::254]/latest/api/token".to_owned(),
        "http://10.0.0.1/".to_owned(),
    ] {
        let problem = assert_problem(put(&app, "steal", &one_step(&url)).await, 400, "outbound_call_refused").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("saga_allowed_hosts"),
            "{url}: {problem}"
        );
        let problem = assert_problem(begin(&app, &url).await, 400, "outbound_call_refused").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("tx_allowed_hosts"),
            "{url}: {problem}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.lock().unwrap().is_empty(), "no request reached loopback");
}
both_backends!(by_default_loopback_and_metadata_are_refused);

/// A name is judged by every address it resolves to, at call time: `localhost` under a list of
/// networks passes the first check and is refused once it resolves to 127.0.0.1.
async fn a_name_is_judged_by_where_it_resolves(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.saga_allowed_hosts = vec!["10.0.0.0/8".into()];
        s.tx_allowed_hosts = vec!["10.0.0.0/8".into()];
        s.tx_participant_token = Some(TOKEN.into());
        s.tx_participant_token_hosts = vec!["127.0.0.1".into()];
    })
    .await
    else {
        return;
    };
    let (port, seen) = capture().await;
    let url = format!("http://localhost:{port}/x");
    let r = put(&app, "rebound", &one_step(&url)).await;
    assert_eq!(r.status(), 201, "a name is judged when it is called");
    let saga = run(&app, "rebound", "rebound-1").await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    let error = saga["steps"][0]["attempts"][0]["error"].as_str().unwrap_or("");
    // `localhost` may resolve to ::1 first: either loopback address is named.
    assert!(
        error.contains("resolves to 127.0.0.1") || error.contains("resolves to ::1"),
        "{saga}"
    );
    assert_eq!(saga["steps"][0]["action"], "refused", "{saga}");

    let r = begin(&app, &format!("http://localhost:{port}")).await;
    assert_eq!(r.status(), 200);
    let tx: Value = r.json().await.unwrap();
    assert_eq!(tx["outcome"], "aborted", "{tx}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached loopback, no token left: {:?}",
        seen.lock().unwrap()
    );
}
both_backends!(a_name_is_judged_by_where_it_resolves);

/// A host listed with a port is not open on its other ports, even beside a network.
async fn a_listed_port_is_the_only_one_beside_a_network(b: Backend) {
    let (port, seen) = capture().await;
    let Some(app) = spawn_app_with(b, |s| {
        s.saga_allowed_hosts = vec![format!("localhost:{port}"), "10.0.0.0/8".into()];
    })
    .await
    else {
        return;
    };
    let r = put(&app, "listed", &one_step(&format!("http://localhost:{port}/x"))).await;
    assert_eq!(r.status(), 201);
    let other = if port == 1 { 2 } else { port - 1 };
    let r = put(&app, "other", &one_step(&format!("http://localhost:{other}/x"))).await;
    assert_problem(r, 400, "outbound_call_refused").await;
    let saga = run(&app, "listed", "listed-1").await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}
both_backends!(a_listed_port_is_the_only_one_beside_a_network);

/// A host named in the list is called; a redirect from it to a host the list does not name is
/// not followed; a port the list does not name is refused.
async fn a_named_host_is_called_and_its_redirects_are_not_followed(b: Backend) {
    let (port, seen) = capture().await;
    let redirect = redirector(format!("http://127.0.0.1:{port}/stolen")).await;
    let Some(app) = spawn_app_with(b, |s| {
        s.saga_allowed_hosts = vec![format!("127.0.0.1:{redirect}"), format!("127.0.0.1:{port}")];
    })
    .await
    else {
        return;
    };
    let r = put(
        &app,
        "redirected",
        &one_step(&format!("http://127.0.0.1:{redirect}/go")),
    )
    .await;
    assert_eq!(r.status(), 201);
    let saga = run(&app, "redirected", "redirected-1").await;
    assert_eq!(saga["status"], "compensated", "{saga}");
    assert!(
        saga["steps"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("redirects are not followed"),
        "{saga}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the redirect was not followed");

    let r = put(&app, "direct", &one_step(&format!("http://127.0.0.1:{port}/direct"))).await;
    assert_eq!(r.status(), 201);
    let saga = run(&app, "direct", "direct-1").await;
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(seen.lock().unwrap().len(), 1, "the named host and port was called");

    let other = if port == 1 { 2 } else { port - 1 };
    let r = put(&app, "other-port", &one_step(&format!("http://127.0.0.1:{other}/x"))).await;
    assert_problem(r, 400, "outbound_call_refused").await;
}
both_backends!(a_named_host_is_called_and_its_redirects_are_not_followed);

/// The 2PC token goes to the participants it is bound to and to no other, even one the outbound
/// policy allows; a server with a token bound to nothing does not start.
async fn the_token_goes_only_where_it_is_bound(b: Backend) {
    let (bound_port, bound) = capture().await;
    let (other_port, other) = capture().await;
    let Some(app) = spawn_app_with(b, |s| {
        s.tx_allowed_hosts = vec!["127.0.0.1".into()];
        s.tx_participant_token = Some(TOKEN.into());
        s.tx_participant_token_hosts = vec![format!("127.0.0.1:{bound_port}")];
    })
    .await
    else {
        return;
    };
    let r = app
        .admin(Method::POST, "/v1/transactions")
        .json(&json!({"participants": [
            {"name": "a", "url": format!("http://127.0.0.1:{bound_port}"), "payload": {}},
            {"name": "b", "url": format!("http://127.0.0.1:{other_port}"), "payload": {}}
        ], "timeout_ms": 2000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tx: Value = r.json().await.unwrap();
    assert_eq!(tx["outcome"], "committed", "the capture listeners vote commit: {tx}");
    let bearer = format!("Bearer {TOKEN}");
    for _ in 0..100 {
        if bound.lock().unwrap().len() >= 2 && other.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bound = bound.lock().unwrap().clone();
    let other = other.lock().unwrap().clone();
    assert!(
        bound.len() >= 2 && bound.iter().all(|(_, auth)| *auth == bearer),
        "{bound:?}"
    );
    assert!(
        other.len() >= 2 && other.iter().all(|(_, auth)| auth.is_empty()),
        "{other:?}"
    );

    let unbound = concord_server::config::Settings {
        tx_participant_token: Some(TOKEN.into()),
        ..concord_server::config::Settings::default()
    };
    let err = unbound.tx_token().err().expect("a token bound to nothing is refused");
    assert!(err.to_string().contains("tx_participant_token_hosts"), "{err}");
}
both_backends!(the_token_goes_only_where_it_is_bound);
