//! A real Concord server for black-box tests of the kit: the `concord-server` library's router on
//! 127.0.0.1:0 over a fresh SQLite database, with an admin key and a vault master key of its own.

use concord_server::config::Settings;
use concord_server::startup::Application;
use tokio::sync::oneshot;

/// A running server; dropping it stops the server and deletes its database.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    pub admin_key: String,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    /// Starts a server on a fresh SQLite database.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("concord.db").display());
        let admin_key = format!("test-admin-{}", uuid::Uuid::now_v7());
        let settings = Settings {
            listen: "127.0.0.1:0".into(),
            // The participants are on loopback, which the outbound policy refuses unless named.
            saga_allowed_hosts: vec!["127.0.0.1".into()],
            tx_allowed_hosts: vec!["127.0.0.1".into()],
            database_url,
            admin_key: Some(admin_key.clone().into()),
            vault_master_key: Some(test_master_key().into()),
            db_connections: 4,
            ..Settings::default()
        };
        let app = Application::build(settings).await.expect("build app");
        let address = format!("http://{}", app.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            address,
            admin_key,
            _dir: dir,
            _stop: stop,
        }
    }
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
fn test_master_key() -> String {
    concord_core::domain::vault::SecretKey::generate()
        .unwrap()
        .to_base64()
        .as_str()
        .to_owned()
}
