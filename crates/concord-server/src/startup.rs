//! Building and running the application: stores, bootstrap, router, background work, shutdown.

use crate::config::{Secret, Settings};
use crate::routes;
use crate::state::AppState;
use anyhow::Context as _;
use concord_core::app::auth::bootstrap_admin;
use concord_core::app::group_commit::GroupCommitLimits;
use concord_core::app::saga::{EngineConfig, SagaEngine};
use concord_core::app::tx::{TxConfig, TxCoordinator};
use concord_core::domain::outbound::OutboundPolicy;
use concord_core::ports::{CheckpointStore, EventStore, HostStore, IdempotencyStore, KeyStore, SagaStore, TxStore};
use concord_sdk::idempotency;
use concord_store_postgres::{PostgresConfig, PostgresStore};
use concord_store_sqlite::{SqliteConfig, SqliteStore};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The ports, all on one database.
#[derive(Clone)]
pub struct Stores {
    pub events: Arc<dyn EventStore>,
    pub txs: Arc<dyn TxStore>,
    pub sagas: Arc<dyn SagaStore>,
    pub hosts: Arc<dyn HostStore>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    pub keys: Arc<dyn KeyStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
}

impl Stores {
    fn from<S: EventStore + CheckpointStore + KeyStore + SagaStore + TxStore + HostStore>(
        s: S,
        idempotency: Arc<dyn IdempotencyStore>,
    ) -> Self {
        let s = Arc::new(s);
        Self {
            events: s.clone(),
            txs: s.clone(),
            sagas: s.clone(),
            hosts: s.clone(),
            checkpoints: s.clone(),
            keys: s,
            idempotency,
        }
    }
}

/// Opens the database the URL names (`sqlite://` or `postgres://`) and applies its migrations.
///
/// # Errors
/// An unknown scheme or an unreachable database.
pub async fn open_stores(settings: &Settings) -> anyhow::Result<Stores> {
    let url = settings.database_url.as_str();
    let group_commit = GroupCommitLimits {
        max_batch_events: settings.max_batch_events,
        ..GroupCommitLimits::default()
    };
    if url.starts_with("sqlite:") {
        let mut config = SqliteConfig::new(url);
        config.read_connections = settings.db_connections.clamp(1, 8);
        config.synchronous_full = settings.sqlite_synchronous_full;
        config.group_commit = group_commit;
        config.wal_limit_bytes = settings.sqlite_wal_limit_bytes;
        config.wal_reader_wait = Duration::from_millis(settings.sqlite_wal_reader_wait_ms);
        let store = SqliteStore::connect(&config).await.context("opening SQLite")?;
        let pool = store.write_pool();
        idempotency::sqlite::ensure_schema(&pool)
            .await
            .context("creating the idempotency table")?;
        Ok(Stores::from(
            store,
            Arc::new(idempotency::sqlite::SqliteIdempotencyStore::new(pool)),
        ))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let mut config = PostgresConfig::new(url);
        config.max_connections = settings.db_connections;
        config.group_commit = group_commit;
        let store = PostgresStore::connect(&config).await.context("opening PostgreSQL")?;
        let pool = store.pool();
        idempotency::postgres::ensure_schema(&pool)
            .await
            .context("creating the idempotency table")?;
        Ok(Stores::from(
            store,
            Arc::new(idempotency::postgres::PostgresIdempotencyStore::new(pool)),
        ))
    } else {
        anyhow::bail!("database URL must start with sqlite:// or postgres://")
    }
}

/// A built application, bound to its address, not yet serving.
pub struct Application {
    listener: TcpListener,
    tls: Option<concord_sdk::serve::ServerTls>,
    state: AppState,
    shutdown: watch::Sender<bool>,
    /// A generated admin key to print once (none when one was configured or already existed).
    pub generated_admin_key: Option<String>,
}

impl Application {
    /// Opens the stores, makes sure an admin key exists and binds the listener.
    ///
    /// # Errors
    /// When the database or the address is unavailable.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        settings.check()?;
        // Read the TLS files first: a bad certificate stops the start before anything opens.
        let tls = match settings.server_tls()? {
            Some(files) => Some(concord_sdk::serve::ServerTls::load(&files)?),
            None => None,
        };
        let client_tls = settings.client_tls();
        // Install the recorder before anything counts, so no early sample is lost.
        crate::telemetry::metrics_handle();
        let stores = open_stores(&settings).await?;
        let generated_admin_key =
            bootstrap_admin(stores.keys.as_ref(), settings.admin_key.as_ref().map(Secret::expose)).await?;
        let listener = TcpListener::bind(&settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let saga_outbound = OutboundPolicy::new("saga_allowed_hosts", &settings.saga_allowed_hosts)
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        let tx_outbound = OutboundPolicy::new("tx_allowed_hosts", &settings.tx_allowed_hosts)
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        // The vault first: the saga engine's completion tokens are signed with a key derived
        // from its master key.
        let vault = crate::vault::open(&settings, stores.events.clone()).await?;
        // Where participants post completions: public_url, else the address listened on when
        // one could reach it. Without either, this node gives asynchronous actions to others.
        let public_url = match &settings.public_url {
            Some(url) => Some(url.trim_end_matches('/').to_owned()),
            None => {
                let addr = listener.local_addr()?;
                let scheme = if tls.is_some() { "https" } else { "http" };
                if addr.ip().is_unspecified() {
                    tracing::warn!(
                        %addr,
                        "no public_url, and the listen address reaches no one: this node will not run asynchronous \
                         actions (steps with callback_timeout_ms); set public_url to how participants reach it"
                    );
                    None
                } else {
                    Some(format!("{scheme}://{addr}"))
                }
            }
        };
        let participants = Arc::new(crate::saga::HttpParticipants::new(
            settings.saga_limits().max_output_bytes,
            saga_outbound.clone(),
            &client_tls,
        )?);
        let gate = Arc::new(
            concord_core::app::flow::HostGate::new(stores.hosts.clone(), settings.gate_settings())
                .with_journal(stores.events.clone(), settings.limits()),
        );
        let engine = Arc::new(
            SagaEngine::new(
                stores.events.clone(),
                stores.sagas.clone(),
                participants,
                uuid::Uuid::now_v7(),
                EngineConfig {
                    lease: Duration::from_millis(settings.lease_ms),
                    limits: settings.saga_limits(),
                    event_limits: settings.limits(),
                    outbound: saga_outbound,
                    latest_definition_ttl: Duration::from_millis(settings.saga_definition_cache_ms),
                    operations_poll: Duration::from_millis(settings.saga_operations_poll_ms),
                    secrets: settings.saga_secrets()?,
                    callbacks: Some(concord_core::app::saga::CallbackConfig {
                        key: concord_core::domain::saga::callback::CallbackKey::new(vault.callback_secret()),
                        base_url: public_url,
                    }),
                    retention: settings.saga_retention_s > 0,
                },
            )
            .with_gate(gate),
        );
        let sagas = crate::saga::SagaRunner::new(
            engine,
            crate::saga::runner::RunnerConfig {
                poll: Duration::from_millis(settings.poll_ms.max(1)),
                max_concurrent: settings.saga_max_concurrent,
                claim_batch: settings.claim_batch,
            },
            settings.workers,
        );
        let coordinator = Arc::new(TxCoordinator::new(
            stores.events.clone(),
            stores.txs.clone(),
            Arc::new(crate::tx::HttpTxParticipants::new(
                Duration::from_millis(settings.tx_phase2_timeout_ms),
                settings.tx_token()?,
                tx_outbound.clone(),
                &client_tls,
            )?),
            uuid::Uuid::now_v7(),
            TxConfig {
                lease: Duration::from_millis(settings.lease_ms),
                limits: concord_core::domain::tx::TxLimits {
                    max_participants: settings.tx_max_participants,
                    max_payload_bytes: settings.tx_max_payload_bytes.min(settings.max_event_bytes / 2),
                    max_timeout_ms: settings.tx_max_timeout_ms,
                },
                event_limits: settings.limits(),
                retry_backoff: Duration::from_millis(settings.tx_retry_backoff_ms),
                max_retry_backoff: Duration::from_millis(settings.tx_max_retry_backoff_ms),
                phase2_timeout: Duration::from_millis(settings.tx_phase2_timeout_ms),
                outbound: tx_outbound,
            },
        ));
        let transactions = crate::tx::TxRunner::new(
            coordinator,
            crate::worker::WorkerConfig {
                poll: Duration::from_millis(settings.poll_ms.max(1)),
                max_concurrent: settings.tx_max_concurrent,
                claim_batch: settings.claim_batch,
            },
            settings.workers,
        );
        let idempotency_layer =
            crate::idempotency::layer(stores.idempotency.clone(), &settings, &vault.fingerprint_secret()).context(
                "settings: idempotency_ttl_s must be 1 s to 366 days, idempotency_lock_s 1 s to idempotency_ttl_s",
            )?;
        let openapi = crate::routes::document(&settings);
        let route_scopes = crate::scopes::RouteScopes::from_document(&openapi)?;
        let appender = Arc::new(concord_core::app::events::Appender::new(
            stores.events.clone(),
            vault.clone(),
            settings.limits(),
        ));
        let batches = crate::saga::batch::SagaBatches::new(
            sagas.clone(),
            stores.events.clone(),
            settings.limits(),
            settings.saga_batch_page,
            Duration::from_millis(settings.lease_ms),
            settings.saga_batch_per_s,
        );
        let state = AppState {
            appender,
            idempotency_layer,
            openapi: Arc::new(openapi),
            route_scopes: Arc::new(route_scopes),
            vault,
            sagas,
            batches,
            transactions,
            events: stores.events,
            checkpoints: stores.checkpoints,
            keys: stores.keys,
            idempotency: stores.idempotency,
            limits: settings.limits(),
            key_cache: Arc::new(concord_core::app::auth::KeyCache::new(Duration::from_millis(
                settings.auth_cache_ttl_ms,
            ))),
            key_slots: crate::limits::KeySlots::new(settings.max_concurrent_requests_per_key),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            subscribers: Arc::new(tokio::sync::Semaphore::new(settings.max_subscribers)),
            key_streams: crate::limits::KeySlots::new(settings.max_subscribers_per_key),
            settings: Arc::new({
                // Each secret now lives in the part that uses it (the vault, the participants'
                // clients); the settings kept for the process's life hold none.
                settings.forget_startup_secrets();
                settings
            }),
            shutdown: shutdown_rx,
        };
        Ok(Self {
            listener,
            tls,
            state,
            shutdown,
            generated_admin_key,
        })
    }

    /// The shared state, for tests that reach past the HTTP API.
    #[must_use]
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal` completes, then stops accepting, ends live subscriptions and lets
    /// in-flight requests finish (up to the configured grace period).
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self {
            listener,
            tls,
            state,
            shutdown,
            ..
        } = self;
        let grace = Duration::from_secs(state.settings.shutdown_grace_s);
        spawn_idempotency_purge(&state);
        spawn_vault_purge(&state);
        spawn_retention(&state);
        let runner = state.settings.workers.then(|| {
            let sagas = tokio::spawn(state.sagas.clone().run(state.shutdown.clone(), grace));
            tokio::spawn(state.batches.clone().watch(
                Duration::from_millis(state.settings.saga_batch_resume_ms.max(1)),
                state.shutdown.clone(),
            ));
            let transactions = tokio::spawn(state.transactions.clone().run(state.shutdown.clone(), grace));
            async move {
                let _ = sagas.await;
                let _ = transactions.await;
            }
        });
        let limits = concord_sdk::serve::ConnectionLimits {
            header_read_timeout: Duration::from_millis(state.settings.header_read_timeout_ms),
            max_connections: state.settings.max_connections,
        };
        let draining = state.draining.clone();
        let drain = Duration::from_millis(state.settings.drain_ms);
        let app = routes::router(state);
        let signal = async move {
            signal.await;
            // Readiness turns false at once; requests are still served for `drain_ms`, while load
            // balancers take the node out, and only then does the node stop accepting.
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            if !drain.is_zero() {
                tracing::info!(drain_ms = drain.as_millis(), "draining: readiness is false");
                tokio::time::sleep(drain).await;
            }
            // Ends live subscriptions and tells the workers.
            let _ = shutdown.send(true);
        };
        concord_sdk::serve::serve(listener, app, limits, tls, signal, grace).await;
        // Let sagas in flight reach their next record (bounded by the grace period inside).
        if let Some(r) = runner {
            r.await;
        }
        Ok(())
    }
}

fn spawn_idempotency_purge(state: &AppState) {
    let store = state.idempotency.clone();
    spawn_purge(state, "concord_idempotency_purged_total", PURGE_EVERY, move || {
        let store = store.clone();
        async move { store.purge_expired(chrono::Utc::now()).await.map_err(|e| e.to_string()) }
    });
}

/// Expired tokens stop revealing at once; this deletes their records, a page at a time.
fn spawn_vault_purge(state: &AppState) {
    const PAGE: usize = 1000;
    let vault = state.vault.clone();
    spawn_purge(state, "concord_vault_tokens_purged_total", PURGE_EVERY, move || {
        let vault = vault.clone();
        async move {
            let mut total = 0;
            loop {
                let n = vault.purge_expired(PAGE).await.map_err(|e| e.to_string())?;
                total += n;
                if n < PAGE as u64 {
                    return Ok(total);
                }
            }
        }
    });
}

/// How often expired idempotency records and vault tokens are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Removes the rows of sagas and transactions past their retention from the work tables, a batch
/// at a time, every `retention_sweep_ms`. Every node sweeps; a row goes once.
fn spawn_retention(state: &AppState) {
    let every = Duration::from_millis(state.settings.retention_sweep_ms.max(1));
    let batch = state.settings.retention_batch.max(1);
    let keep = |s: u64| (s > 0).then(|| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX)));
    if let Some(keep) = keep(state.settings.saga_retention_s) {
        let store = state.sagas.engine().store().clone();
        spawn_purge(state, "concord_saga_rows_purged_total", every, move || {
            let store = store.clone();
            async move {
                let before = chrono::Utc::now() - keep;
                drain(|| store.purge_sagas(before, batch), batch).await
            }
        });
    }
    if let Some(keep) = keep(state.settings.tx_retention_s) {
        let store = state.transactions.coordinator().store().clone();
        spawn_purge(state, "concord_tx_rows_purged_total", every, move || {
            let store = store.clone();
            async move {
                let before = chrono::Utc::now() - keep;
                drain(|| store.purge_txs(before, batch), batch).await
            }
        });
    }
}

/// Runs a batch delete until a batch comes back short; answers the total.
async fn drain<F, Fut>(mut once: F, batch: usize) -> Result<u64, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, concord_core::ports::StoreError>>,
{
    let mut total = 0;
    loop {
        let n = once().await.map_err(|e| e.to_string())?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// Runs `purge` every `every` until shutdown, counting what it deleted in `metric`.
fn spawn_purge<F, Fut>(state: &AppState, metric: &'static str, every: Duration, purge: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, String>> + Send,
{
    let mut stopping = state.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            match purge().await {
                Ok(n) => metrics::counter!(metric).increment(n),
                Err(e) => tracing::warn!(error = %e, metric, "purge failed"),
            }
        }
    });
}

/// What the `main` of each binary (`concord`, `concord-bench`, `concord-shop`) does around its
/// work: the process's TLS crypto provider (reqwest is built without one: ring, chosen once), a
/// runtime, `run` on it, and its result as the exit code, an error printed to stderr.
pub fn run_main<F: Future<Output = anyhow::Result<std::process::ExitCode>>>(run: F) -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `concord serve`: telemetry, the application, the generated admin key printed once, then
/// serving until SIGINT or SIGTERM.
///
/// # Errors
/// When the application cannot be built or stops with an error.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let _telemetry = crate::telemetry::init(settings.log_json);
    let app = Application::build(settings).await?;
    if let Some(key) = &app.generated_admin_key {
        // Printed once, to the terminal only: never through the log pipeline.
        println!("Generated admin API key (shown once, store it now): {key}");
    }
    tracing::info!(addr = %app.local_addr()?, tls = app.tls.is_some(), "concord listening");
    app.run_until(shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
