//! The orders service: `POST /orders` (with `Idempotency-Key`) tokenizes the card through the
//! vault, records the order as an event-sourced aggregate in Concord's event store and starts the
//! `place-order` saga; the saga's `open` and `confirm` steps and the `reject` compensation land
//! here as transitions of the aggregate.

pub mod app;
pub mod domain;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use concord_sdk::idempotency::{IdempotencyConfig, IdempotencyLayer, IdempotencyStore};

use crate::common::{Db, concord_client};

/// How the orders service is started.
#[derive(Debug, Clone, clap::Args)]
pub struct OrdersArgs {
    #[command(flatten)]
    pub common: crate::ServiceArgs,
    /// The saga definition each order starts.
    #[arg(long, default_value = crate::saga::PLACE_ORDER)]
    pub saga: String,
}

/// Runs the service until `shutdown`.
///
/// # Errors
/// Startup failures: the database, the listener.
pub async fn run(args: OrdersArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let c = &args.common;
    let db = Db::connect(&c.database_url).await?;
    let store: Arc<dyn IdempotencyStore> = match &db {
        Db::Sqlite(p) => {
            concord_sdk::idempotency::sqlite::ensure_schema(p).await?;
            Arc::new(concord_sdk::idempotency::sqlite::SqliteIdempotencyStore::new(p.clone()))
        }
        Db::Pg(p) => {
            concord_sdk::idempotency::postgres::ensure_schema(p).await?;
            Arc::new(concord_sdk::idempotency::postgres::PostgresIdempotencyStore::new(
                p.clone(),
            ))
        }
    };
    let config = IdempotencyConfig::default()
        .require_key(true)
        .fingerprint_secret(c.token()?.into_bytes())
        .ttl(Duration::from_secs(24 * 3600));
    let layer = IdempotencyLayer::new(store, config)?;
    let state = app::Orders {
        concord: concord_client(&c.concord_url, &c.concord_key()?, &concord_sdk::ClientTls::from_env())?,
        saga: args.saga.clone(),
        faults_enabled: c.faults,
    };
    let router = http::router(Arc::new(state), layer, c.token()?);
    let listener = tokio::net::TcpListener::bind(&c.listen).await?;
    crate::common::serve("orders", listener, router, shutdown).await
}
