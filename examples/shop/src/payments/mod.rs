//! The payments service: the `charge` step and its `refund` compensation, behind the saga
//! barrier, against an external card provider that it reaches with the card's token only.

pub mod http;
pub mod provider_client;
pub mod store;

use std::sync::Arc;

use crate::common::Db;

/// How the payments service is started.
#[derive(Debug, Clone, clap::Args)]
pub struct PaymentsArgs {
    #[command(flatten)]
    pub common: crate::ServiceArgs,
    /// The card provider's base URL.
    #[arg(long)]
    pub provider_url: String,
    /// How the provider reaches this service, for its webhooks (`http://payments:8080`).
    #[arg(long)]
    pub public_url: String,
    /// Charge without the barrier and with a new provider idempotency key on every attempt.
    /// Wrong on purpose: it exists to show that the demo's checker catches double charges.
    #[arg(long, hide = true)]
    pub unsafe_skip_barrier: bool,
}

/// The provider's API key, from the environment.
pub const PROVIDER_KEY_ENV: &str = "SHOP_PROVIDER_KEY";

/// Runs the service until `shutdown`.
///
/// # Errors
/// Startup failures: the database, the listener.
pub async fn run(args: PaymentsArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let c = &args.common;
    let db = Db::connect(&c.database_url).await?;
    match &db {
        Db::Sqlite(p) => store::on_sqlite::ensure_schema(p).await?,
        Db::Pg(p) => store::on_pg::ensure_schema(p).await?,
    }
    let provider_key = std::env::var(PROVIDER_KEY_ENV).map_err(|_| anyhow::anyhow!("set {PROVIDER_KEY_ENV}"))?;
    let state = Arc::new(http::Payments {
        db,
        provider: provider_client::ProviderClient::new(&args.provider_url, &provider_key)?,
        faults: c.faults(),
        unsafe_skip_barrier: args.unsafe_skip_barrier,
        public_url: args.public_url.clone(),
        webhook_key: provider_key,
        http: crate::common::http_client(std::time::Duration::from_secs(10), &concord_sdk::ClientTls::from_env())?,
    });
    if args.unsafe_skip_barrier {
        tracing::warn!("running WITHOUT the saga barrier: retried charges are charged again");
    }
    let router = http::router(state, c.token()?);
    let listener = tokio::net::TcpListener::bind(&c.listen).await?;
    crate::common::serve("payments", listener, router, shutdown).await
}
