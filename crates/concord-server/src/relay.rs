//! `concord relay`: a standalone outbox relay, for services whose own process does not run one.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use concord_broker_nats::{NatsBroker, NatsConfig};
use concord_sdk::Client;
use concord_sdk::broker::{Broker, EventStoreBroker};
use concord_sdk::outbox::{self, RelayConfig};
use std::sync::Arc;
use std::time::Duration;

/// Where the relay publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// NATS JetStream (`--nats-url`).
    Nats,
    /// A Concord server's event store (`--url`, `--key`).
    Concord,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The service's database holding the outbox: `sqlite://PATH` or `postgres://...`.
    #[arg(long, env = "CONCORD_OUTBOX_URL")]
    pub outbox_url: String,
    /// The broker to publish to.
    #[arg(long, value_enum, default_value = "concord")]
    pub broker: BrokerKind,
    /// NATS server for `--broker nats`.
    #[arg(long, env = "CONCORD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Concord server for `--broker concord`.
    #[arg(long, env = "CONCORD_URL", default_value = "http://127.0.0.1:7400")]
    pub url: String,
    /// API key for `--broker concord` (needs `events:write`).
    #[arg(long, env = "CONCORD_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Rows per round.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Concurrent rounds (PostgreSQL).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Poll interval without a wake-up, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
    /// Lease on a SQLite outbox, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Rejections before a message is dead-lettered.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
}

/// Runs the relay until Ctrl-C or SIGTERM.
///
/// # Errors
/// A bad URL, an unreachable database or broker.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let broker: Arc<dyn Broker> = match args.broker {
        BrokerKind::Nats => Arc::new(
            NatsBroker::connect(&args.nats_url, NatsConfig::default())
                .await
                .context("connecting to NATS")?,
        ),
        BrokerKind::Concord => {
            let key = args
                .key
                .clone()
                .context("--broker concord needs --key or CONCORD_KEY")?;
            Arc::new(EventStoreBroker::new(Client::with_tls(
                args.url.clone(),
                key,
                &concord_sdk::ClientTls::from_env(),
            )?))
        }
    };
    let config = RelayConfig {
        batch_size: args.batch_size,
        workers: args.workers,
        poll_interval: Duration::from_millis(args.poll_ms),
        lease: Duration::from_millis(args.lease_ms),
        max_attempts: args.max_attempts,
        ..RelayConfig::default()
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::startup::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    if args.outbox_url.starts_with("postgres://") || args.outbox_url.starts_with("postgresql://") {
        let pool = concord_store_postgres::pool_options(u32::try_from(args.workers + 2).unwrap_or(8))
            .connect(&args.outbox_url)
            .await
            .context("connecting to the outbox database")?;
        outbox::postgres::ensure_schema(&pool).await?;
        println!("relay: publishing the PostgreSQL outbox");
        outbox::postgres::PgRelay::new(pool, broker, config).run(stop).await?;
    } else if let Some(path) = args.outbox_url.strip_prefix("sqlite://") {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .context("opening the outbox database")?;
        outbox::sqlite::ensure_schema(&pool).await?;
        println!("relay: publishing the SQLite outbox");
        outbox::sqlite::SqliteRelay::new(pool, broker, config).run(stop).await?;
    } else {
        anyhow::bail!("--outbox-url must be sqlite://PATH or postgres://...");
    }
    Ok(())
}
