//! `spawn_app()`: the real router on port 0 with a fresh database, SQLite or PostgreSQL.

use concord_server::config::Settings;
use concord_server::startup::Application;
use concord_server::state::AppState;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub address: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    pub state: AppState,
    pub database_url: String,
    /// The vault master key, for another node on the same database.
    pub master_key: String,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
}

/// The PostgreSQL URL for tests, or `None` (after printing that the test skipped).
pub fn postgres_url() -> Option<String> {
    let url = std::env::var("CONCORD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
    }
    url
}

/// A fresh vault master key, base64.
pub fn test_master_key() -> String {
    concord_core::domain::vault::SecretKey::generate()
        .unwrap()
        .to_base64()
        .as_str()
        .to_owned()
}

pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A fresh database URL for a backend; `None` when PostgreSQL is not configured.
pub async fn fresh_database(backend: Backend) -> Option<(String, Option<tempfile::TempDir>)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("concord.db").display());
            Some((url, Some(dir)))
        }
        Backend::Postgres => {
            let base = postgres_url()?;
            let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
                .await
                .unwrap();
            Some((url, None))
        }
    }
}

pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> Option<TestApp> {
    let (database_url, dir) = fresh_database(backend).await?;
    let admin_key = format!("test-admin-{}", uuid::Uuid::now_v7());
    Some(spawn_node(database_url, admin_key, test_master_key(), dir, tweak).await)
}

/// Another node on the database of `first`, with the same admin key.
pub async fn spawn_second_node(first: &TestApp, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_node(
        first.database_url.clone(),
        first.admin_key.clone(),
        first.master_key.clone(),
        None,
        tweak,
    )
    .await
}

async fn spawn_node(
    database_url: String,
    admin_key: String,
    master_key: String,
    dir: Option<tempfile::TempDir>,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    init_crypto();
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        // The participants are on loopback, which the outbound policy refuses unless named.
        saga_allowed_hosts: vec!["127.0.0.1".into()],
        tx_allowed_hosts: vec!["127.0.0.1".into()],
        database_url: database_url.clone(),
        admin_key: Some(admin_key.clone().into()),
        vault_master_key: Some(master_key.clone().into()),
        db_connections: 4,
        ..Settings::default()
    };
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("build app");
    let address = format!("http://{}", app.local_addr().unwrap());
    let state = app.state().clone();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        admin_key,
        http: reqwest::Client::new(),
        state,
        database_url,
        master_key,
        _dir: dir,
        stop: Some(stop),
    }
}

impl TestApp {
    /// Starts the server's shutdown, as SIGTERM does.
    pub fn shut_down(&mut self) {
        self.stop.take();
    }

    pub fn request(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.address, path));
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path, Some(&self.admin_key))
    }

    pub async fn append(&self, stream: &str, body: Value) -> Response {
        self.admin(Method::POST, &format!("/v1/streams/{stream}"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn append_one(&self, stream: &str, event_type: &str) -> Value {
        let r = self
            .append(
                stream,
                json!({"events": [{"type": event_type, "data": {"at": stream}}]}),
            )
            .await;
        assert_eq!(r.status(), 200, "append to {stream}");
        r.json().await.unwrap()
    }

    /// Appends one event straight to the store, as Concord itself writes its own logs (`saga-`,
    /// `tx-`), which no key may append to.
    pub async fn seed_one(&self, stream: &str, event_type: &str) -> Value {
        use concord_core::domain::event::UncheckedEvent;
        use concord_core::domain::{AppendRequest, ExpectedVersion, StreamName};
        let event = UncheckedEvent {
            id: None,
            event_type: event_type.to_owned(),
            data: json!({"at": stream}),
            metadata: None,
        };
        let request = AppendRequest::new(
            StreamName::parse(stream).unwrap(),
            ExpectedVersion::Any,
            vec![event],
            &self.state.limits,
        )
        .unwrap();
        let outcome = self.state.events.append(request).await.unwrap();
        json!({"stream": stream, "position": outcome.position})
    }

    pub async fn create_key(&self, scopes: &[&str]) -> String {
        self.create_named_key("test", scopes).await
    }

    pub async fn create_named_key(&self, name: &str, scopes: &[&str]) -> String {
        let r = self
            .admin(Method::POST, "/v1/keys")
            .json(&json!({"name": name, "scopes": scopes}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_owned()
    }

    pub async fn log_len(&self) -> usize {
        let r = self.admin(Method::GET, "/v1/events?limit=1000").send().await.unwrap();
        r.json::<Value>().await.unwrap()["events"].as_array().unwrap().len()
    }
}

/// Asserts an error answer: status, problem+json content type and stable code.
pub async fn assert_problem(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status, "status for {code}");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type for {code}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string());
    body
}

/// Declares a test that runs on SQLite and, when configured, on PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await;
            }
        }
    };
}
