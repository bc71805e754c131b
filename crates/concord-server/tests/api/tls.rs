//! TLS and mutual TLS on the server, its clients and its own calls to saga participants, with
//! certificates made in the test. TLS does not depend on the store: these run on SQLite.

use crate::helpers::{Backend, TestApp, spawn_app_with};
use crate::pki::{Pki, put};
use concord_sdk::ClientTls;
use concord_sdk::serve::{ConnectionLimits, ServerTls, ServerTlsFiles, serve};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// Concord over TLS with the server certificate `server` of `pki`; mutual TLS when `mutual`.
async fn spawn_tls_app(pki: &Pki, mutual: bool, tweak: impl FnOnce(&mut concord_server::config::Settings)) -> TestApp {
    pki.issue("server");
    let mut app = spawn_app_with(Backend::Sqlite, |s| {
        s.tls_cert = Some(pki.path("server.pem").display().to_string());
        s.tls_key = Some(pki.path("server.key").display().to_string());
        if mutual {
            s.tls_client_ca = Some(pki.path("ca.pem").display().to_string());
        }
        tweak(s);
    })
    .await
    .expect("SQLite needs no service");
    app.address = app.address.replacen("http://", "https://", 1);
    app
}

async fn ready(http: &reqwest::Client, app: &TestApp) -> reqwest::Result<reqwest::Response> {
    http.get(format!("{}/ready", app.address)).send().await
}

#[tokio::test]
async fn a_tls_server_refuses_plain_http_and_untrusted_clients() {
    let pki = Pki::new();
    let app = spawn_tls_app(&pki, false, |_| {}).await;
    assert_eq!(
        ready(&pki.http(None), &app).await.unwrap().status(),
        200,
        "a client trusting the CA"
    );

    let plain = app.address.replacen("https://", "http://", 1);
    let r = reqwest::Client::new().get(format!("{plain}/ready")).send().await;
    assert!(r.is_err(), "plain HTTP is not served on a TLS port: {r:?}");

    // Trusting only the system's roots, or another authority, the server's certificate is refused.
    let err = ready(&reqwest::Client::new(), &app).await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let other = Pki::new();
    let err = ready(&other.http(None), &app).await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed() {
    let pki = Pki::new();
    let app = spawn_tls_app(&pki, true, |_| {}).await;
    pki.issue("client");

    let response = ready(&pki.http(Some("client")), &app).await.unwrap();
    assert_eq!(response.status(), 200);
    let r = ready(&pki.http(None), &app).await;
    assert!(r.is_err(), "no client certificate: {r:?}");
    let stranger = Pki::new();
    stranger.issue("client");
    let mixed = ClientTls {
        ca: Some(pki.path("ca.pem")),
        ..stranger.client_tls(Some("client"))
    };
    let http = mixed.apply(reqwest::Client::builder()).unwrap().build().unwrap();
    let r = ready(&http, &app).await;
    assert!(r.is_err(), "a client certificate from another authority: {r:?}");

    // The kit's client, with the settings every Concord client reads.
    let client = concord_sdk::Client::with_tls(&app.address, &app.admin_key, &pki.client_tls(Some("client"))).unwrap();
    let event: concord_sdk::EventInput = serde_json::from_value(json!({"type": "Happened", "data": {"n": 1}})).unwrap();
    let appended = client
        .append("tls-stream", concord_sdk::ExpectedVersion::Any, vec![event])
        .await
        .unwrap();
    assert_eq!((appended.first_version, appended.last_version), (1, 1));
    assert_eq!(client.read_stream("tls-stream", 1, 10).await.unwrap().events.len(), 1);
    let without = concord_sdk::Client::with_tls(&app.address, &app.admin_key, &pki.client_tls(None)).unwrap();
    let refused = without.read_stream("tls-stream", 1, 10).await;
    assert!(
        matches!(refused, Err(concord_sdk::ClientError::Transport(_))),
        "{refused:?}"
    );

    let half = ClientTls {
        client_key: None,
        ..pki.client_tls(Some("client"))
    };
    assert!(matches!(
        concord_sdk::Client::with_tls(&app.address, "k", &half),
        Err(concord_sdk::ClientError::Config(_))
    ));
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let pki = Pki::new();
    let app = spawn_tls_app(&pki, false, |_| {}).await;
    let served = |r: &reqwest::Response| {
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            .unwrap()
    };
    // A new client for each look: a resumed TLS session shows the certificate of the session
    // it resumes.
    let first = served(&ready(&pki.http(None), &app).await.unwrap());

    let renewed = pki.issue("server");
    assert_ne!(first, renewed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = served(&ready(&pki.http(None), &app).await.unwrap());
        if now == renewed {
            break;
        }
        assert_eq!(now, first, "only the old or the renewed certificate is served");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A renewal that does not parse keeps the last good certificate in service, and the next
    // good one is still picked up after it.
    put(pki.dir.path(), "server.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(served(&ready(&pki.http(None), &app).await.unwrap()), renewed);
    let again = pki.issue("server");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while served(&ready(&pki.http(None), &app).await.unwrap()) != again {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewal after a broken one was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_renewed_client_certificate_is_shown_without_building_the_client_again() {
    let pki = Pki::new();
    let app = spawn_tls_app(&pki, true, |_| {}).await;
    // The client's files first hold a certificate of an authority the server does not trust.
    let stranger = Pki::new();
    stranger.issue("client");
    for file in ["client.pem", "client.key"] {
        put(
            pki.dir.path(),
            file,
            &std::fs::read_to_string(stranger.path(file)).unwrap(),
        );
    }
    let http = pki.http(Some("client"));
    let r = ready(&http, &app).await;
    assert!(r.is_err(), "a certificate of another authority: {r:?}");
    // Renewed in place by the right authority: the same client shows the new one.
    pki.issue("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ready(&http, &app).await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the renewed client certificate was never shown: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_silent_or_plain_connection_cannot_hold_the_only_slot_past_the_handshake_deadline() {
    let pki = Pki::new();
    let app = spawn_tls_app(&pki, false, |s| {
        s.max_connections = 1;
        s.header_read_timeout_ms = 300;
    })
    .await;
    let addr = app.address.trim_start_matches("https://").to_owned();
    // A connection that never says anything takes the only slot...
    let _silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // ...and a plain-HTTP request fails its handshake; neither keeps the slot past the deadline.
    let plain = reqwest::Client::new().get(format!("http://{addr}/ready")).send().await;
    assert!(plain.is_err(), "{plain:?}");
    let started = std::time::Instant::now();
    let r = pki
        .http(None)
        .get(format!("{}/ready", app.address))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_saga_step_over_mutual_tls_completes() {
    let pki = Pki::new();
    pki.issue("participant");
    pki.issue("concord");
    // A participant that serves only clients with a certificate of the CA.
    let tls = ServerTls::load(&ServerTlsFiles {
        cert: pki.path("participant.pem"),
        key: pki.path("participant.key"),
        client_ca: Some(pki.path("ca.pem")),
    })
    .unwrap();
    let router = axum::Router::new().route(
        "/reserve",
        axum::routing::post(|body: axum::Json<Value>| async move { axum::Json(json!({"reserved": body.0["sku"]})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let participant = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        router,
        ConnectionLimits::default(),
        Some(tls),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let r = pki
        .http(None)
        .post(format!("{participant}/reserve"))
        .json(&json!({}))
        .send()
        .await;
    assert!(
        r.is_err(),
        "the participant refuses a client without a certificate: {r:?}"
    );

    let app = spawn_tls_app(&pki, false, |s| {
        s.tls_ca = Some(pki.path("ca.pem").display().to_string());
        s.tls_client_cert = Some(pki.path("concord.pem").display().to_string());
        s.tls_client_key = Some(pki.path("concord.key").display().to_string());
    })
    .await;
    let http = pki.http(None);
    let definition = json!({"steps": [{
        "name": "reserve",
        "action": {"method": "POST", "url": format!("{participant}/reserve"), "body": {"sku": "{{input.sku}}"}},
    }]});
    let r = http
        .request(Method::PUT, format!("{}/v1/saga-definitions/mtls", app.address))
        .bearer_auth(&app.admin_key)
        .json(&definition)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = http
        .post(format!("{}/v1/sagas?wait_ms=20000", app.address))
        .bearer_auth(&app.admin_key)
        .json(&json!({"definition": "mtls", "id": "m-1", "input": {"sku": "A-1"}}))
        .send()
        .await
        .unwrap();
    let saga: Value = r.json().await.unwrap();
    assert_eq!(saga["status"], "completed", "{saga}");
    assert_eq!(saga["steps"][0]["output"], json!({"reserved": "A-1"}));
    drop(stop);
}

#[tokio::test]
async fn tls_settings_that_cannot_work_stop_the_start() {
    let pki = Pki::new();
    pki.issue("server");
    let mut settings = concord_server::config::Settings {
        tls_cert: Some(pki.path("server.pem").display().to_string()),
        ..concord_server::config::Settings::default()
    };
    assert!(settings.server_tls().is_err(), "a certificate without its key");
    settings.tls_cert = None;
    settings.tls_client_ca = Some(pki.path("ca.pem").display().to_string());
    assert!(settings.server_tls().is_err(), "mutual TLS without TLS");

    let other = pki.ca.leaf("other");
    put(pki.dir.path(), "other.key", &other.1);
    let mismatched = ServerTlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("other.key"),
        client_ca: None,
    };
    let err = ServerTls::load(&mismatched).unwrap_err().to_string();
    assert!(err.contains("private key"), "{err}");
    let missing = ServerTlsFiles {
        cert: pki.path("nowhere.pem"),
        ..mismatched
    };
    assert!(
        ServerTls::load(&missing)
            .unwrap_err()
            .to_string()
            .contains("cannot read")
    );
}
