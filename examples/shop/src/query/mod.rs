//! The query service, the CQRS read side: a projection of the orders from Concord's log and of
//! the stock from the broker into its own database, served through the read-through cache,
//! which the same two feeds keep fresh.

pub mod http;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use concord_sdk::broker::Broker;
use concord_sdk::cache::{Cache, CacheConfig, RedisConfig};
use concord_sdk::projection::{ConcordLog, ProjectionName, Runner, RunnerConfig, TableName};

use crate::common::{Db, DuplicateDeliveries, concord_client};

#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub common: crate::ServiceArgs,
    #[command(flatten)]
    pub broker: crate::BrokerArgs,
    /// A Redis URL for the cache's shared tier (none: the local tier only).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Prefix of the cache's Redis keys and channel, so runs sharing a server stay apart.
    #[arg(long, default_value = "shop:")]
    pub redis_prefix: String,
    /// Hands this percentage of stock changes to the consumer twice (a fault).
    #[arg(long, default_value_t = 0)]
    pub duplicate_deliveries: u8,
}

/// The projection of orders, its view, and the stock table.
pub const ORDERS_PROJECTION: &str = "shop_orders";
pub const ORDERS_VIEW: &str = "orders_view";

/// Runs the service until `shutdown`.
///
/// # Errors
/// Startup failures.
pub async fn run(args: QueryArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let c = &args.common;
    let db = Db::connect(&c.database_url).await?;
    match &db {
        Db::Sqlite(p) => views::on_sqlite::ensure_schema(p).await?,
        Db::Pg(p) => views::on_pg::ensure_schema(p).await?,
    }
    let client = concord_client(&c.concord_url, &c.concord_key()?, &concord_sdk::ClientTls::from_env())?;
    let (orders_cache, stock_cache) = caches(&args)?;
    let _order_feed = orders_cache.spawn_log_invalidation(client.clone(), Some("order".into()), 0, |e| {
        e.stream.strip_prefix("order-").map(str::to_owned)
    })?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let projection = spawn_projection(&db, client.clone(), stop.clone())?;
    let broker = args.broker.connect(&client).await?;
    let dup = DuplicateDeliveries {
        percent: args.duplicate_deliveries,
        seed: c.seed,
    };
    let consumer = tokio::spawn(follow_stock(db.clone(), broker, stock_cache.clone(), dup, stop.clone()));
    let state = Arc::new(http::Query {
        db,
        orders: orders_cache,
        stock: stock_cache,
    });
    let router = http::router(state, c.token()?);
    let listener = tokio::net::TcpListener::bind(&c.listen).await?;
    let served = crate::common::serve("query", listener, router, shutdown).await;
    let _ = stop_tx.send(true);
    consumer.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), projection).await;
    served
}

type Caches = (Cache<serde_json::Value>, Cache<serde_json::Value>);

fn caches(args: &QueryArgs) -> anyhow::Result<Caches> {
    let config = CacheConfig::default();
    match &args.redis_url {
        None => Ok((Cache::local(config.clone())?, Cache::local(config)?)),
        Some(url) => {
            let redis = |name: &str| RedisConfig {
                key_prefix: format!("{}{name}:", args.redis_prefix),
                channel: format!("{}{name}:invalidations", args.redis_prefix),
                ..RedisConfig::default()
            };
            let client = redis::Client::open(url.as_str())?;
            Ok((
                Cache::with_redis(config.clone(), client.clone(), redis("orders"))?,
                Cache::with_redis(config, client, redis("stock"))?,
            ))
        }
    }
}

fn spawn_projection(
    db: &Db,
    client: concord_sdk::Client,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let name = ProjectionName::parse(ORDERS_PROJECTION)?;
    let table = TableName::parse(ORDERS_VIEW)?;
    let source = ConcordLog::new(client, Some("order"));
    let config = RunnerConfig {
        idle_wait: Duration::from_millis(500),
        // Back within 2 s of the server's return, not the default 30 s.
        retry: concord_sdk::projection::Backoff {
            max: Duration::from_secs(2),
            ..concord_sdk::projection::Backoff::default()
        },
        ..RunnerConfig::default()
    };
    let until = async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    };
    Ok(match db {
        Db::Sqlite(p) => {
            let store = concord_sdk::projection::sqlite::SqliteStore::new(p.clone());
            let runner = Runner::new(store, name, table, views::OrdersView, source, config)?;
            tokio::spawn(async move {
                if let Err(e) = runner.run_until(until).await {
                    tracing::error!(error = %e, "the orders projection stopped");
                }
            })
        }
        Db::Pg(p) => {
            let store = concord_sdk::projection::postgres::PostgresStore::new(p.clone());
            let runner = Runner::new(store, name, table, views::OrdersView, source, config)?;
            tokio::spawn(async move {
                if let Err(e) = runner.run_until(until).await {
                    tracing::error!(error = %e, "the orders projection stopped");
                }
            })
        }
    })
}

/// Follows the stock changes on the broker into `stock_view`, once per message (inbox) and never
/// backwards (versions), then invalidates the cached row.
async fn follow_stock(
    db: Db,
    broker: Arc<dyn Broker>,
    cache: Cache<serde_json::Value>,
    dup: DuplicateDeliveries,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let feed = cache.register_feed("stock changes");
    while !*stop.borrow() {
        let mut consumer = match broker
            .subscribe(crate::inventory::domain::STOCK_TOPIC, "query-stock")
            .await
        {
            Ok(c) => c,
            Err(e) => {
                feed.disconnected();
                tracing::warn!(error = %e, "cannot follow the stock; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        feed.connected();
        loop {
            let batch = match consumer.fetch(100, Duration::from_secs(1)).await {
                Ok(b) => b,
                Err(e) => {
                    feed.disconnected();
                    tracing::warn!(error = %e, "reading the stock failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            };
            for d in dup.apply(batch) {
                let applied = match &db {
                    Db::Sqlite(p) => views::on_sqlite::apply_stock(p, d.message.id, &d.message.payload).await,
                    Db::Pg(p) => views::on_pg::apply_stock(p, d.message.id, &d.message.payload).await,
                };
                match applied {
                    Ok(Some((key, version))) => {
                        if let Err(e) = cache.invalidate(&key, version).await {
                            tracing::warn!(error = %e, "cache invalidation failed");
                        }
                    }
                    Ok(None) => tracing::info!(message = %d.message.id, "duplicate delivery ignored"),
                    Err(e) => {
                        tracing::warn!(error = %e, "applying a stock change failed; it comes again");
                        let _ = consumer.nack(&d, Duration::from_millis(500)).await;
                        continue;
                    }
                }
                if let Err(e) = consumer.ack(&d).await {
                    tracing::warn!(error = %e, "ack failed");
                }
            }
        }
    }
}
