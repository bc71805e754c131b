//! The reference shop: four services, each its own process with its own database, built only on
//! `concord-sdk` and the Concord server's API, plus a stand-in for a third-party card provider,
//! and [`demo`], which runs them all under injected faults and checks that nothing became
//! inconsistent.
//!
//! | service     | owns                                         | Concord parts it uses                         |
//! |-------------|----------------------------------------------|-----------------------------------------------|
//! | [`orders`]  | orders (event-sourced in the event store)    | vault, event store, sagas, `Idempotency-Key`  |
//! | [`inventory`] | stock of two warehouses, reservations      | saga barrier, outbox, inbox, 2PC participants |
//! | [`payments`] | charges and refunds                         | saga barrier                                   |
//! | [`query`]   | read models of orders and stock              | projection runner, broker + inbox, cache      |
//! | [`provider`] | the card network's ledger (a third party)   | vault (the only one allowed to reveal a card) |

pub mod common;
pub mod demo;
pub mod inventory;
pub mod orders;
pub mod payments;
pub mod provider;
pub mod query;
pub mod saga;

use std::sync::Arc;
use std::time::Duration;

use concord_sdk::broker::{Broker, EventStoreBroker};

/// Settings every service takes. Secrets come from the environment only.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The service's own database: `sqlite://PATH` or `postgres://...`.
    #[arg(long)]
    pub database_url: String,
    /// The Concord server.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    pub concord_url: String,
    /// Honour the fault requests saga calls carry (for the demo).
    #[arg(long)]
    pub faults: bool,
    /// How late a `timeout` fault answers, milliseconds.
    #[arg(long, default_value_t = 1_500)]
    pub slow_answer_ms: u64,
    /// Seed of the faults a service picks itself (duplicate deliveries).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Environment variables holding a service's secrets.
pub const TOKEN_ENV: &str = "SHOP_TOKEN";
pub const CONCORD_KEY_ENV: &str = "SHOP_CONCORD_KEY";
pub const TX_TOKEN_ENV: &str = "SHOP_TX_TOKEN";

fn secret(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow::anyhow!("set {name}"))
}

impl ServiceArgs {
    /// The bearer token every caller of the service presents (`SHOP_TOKEN`).
    ///
    /// # Errors
    /// When it is unset.
    pub fn token(&self) -> anyhow::Result<String> {
        secret(TOKEN_ENV)
    }

    /// The service's Concord API key (`SHOP_CONCORD_KEY`).
    ///
    /// # Errors
    /// When it is unset.
    pub fn concord_key(&self) -> anyhow::Result<String> {
        secret(CONCORD_KEY_ENV)
    }

    /// The token the 2PC coordinator presents (`SHOP_TX_TOKEN`).
    ///
    /// # Errors
    /// When it is unset.
    pub fn tx_token(&self) -> anyhow::Result<String> {
        secret(TX_TOKEN_ENV)
    }

    #[must_use]
    pub fn faults(&self) -> common::Faults {
        common::Faults::new(self.faults, Duration::from_millis(self.slow_answer_ms))
    }
}

/// Which broker carries stock changes.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// `concord` (the event store as broker) or `nats` (JetStream).
    #[arg(long, default_value = "concord")]
    pub broker: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of JetStream stream names, so runs sharing a server stay apart.
    #[arg(long, default_value = "CONCORD")]
    pub nats_stream_prefix: String,
}

impl BrokerArgs {
    /// Connects the broker.
    ///
    /// # Errors
    /// An unknown kind or an unreachable NATS server.
    pub async fn connect(&self, client: &concord_sdk::Client) -> anyhow::Result<Arc<dyn Broker>> {
        match self.broker.as_str() {
            "concord" => Ok(Arc::new(EventStoreBroker::new(client.clone()))),
            "nats" => {
                let config = concord_broker_nats::NatsConfig {
                    stream_prefix: self.nats_stream_prefix.clone(),
                    subject_prefix: self.nats_stream_prefix.to_lowercase(),
                    ..concord_broker_nats::NatsConfig::default()
                };
                Ok(Arc::new(
                    concord_broker_nats::NatsBroker::connect(&self.nats_url, config).await?,
                ))
            }
            other => anyhow::bail!("unknown broker {other:?}: concord or nats"),
        }
    }
}

/// `concord-shop <service>`: runs one service of the shop.
#[derive(Debug, clap::Subcommand)]
pub enum ShopCommand {
    Orders(orders::OrdersArgs),
    Inventory(inventory::InventoryArgs),
    Payments(payments::PaymentsArgs),
    Query(query::QueryArgs),
    /// The card provider (a stand-in for a third party).
    Provider(provider::ProviderArgs),
}

/// Runs the chosen service until `shutdown`.
///
/// # Errors
/// The service's startup failures.
pub async fn run(command: ShopCommand, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    match command {
        ShopCommand::Orders(a) => orders::run(a, shutdown).await,
        ShopCommand::Inventory(a) => inventory::run(a, shutdown).await,
        ShopCommand::Payments(a) => payments::run(a, shutdown).await,
        ShopCommand::Query(a) => query::run(a, shutdown).await,
        ShopCommand::Provider(a) => provider::run(a, shutdown).await,
    }
}

/// The per-request span of every shop route, continuing the caller's trace.
pub async fn trace_layer(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    concord_sdk::trace::server_span(request, next).await
}
