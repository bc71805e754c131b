//! The inventory service: stock of two warehouses, each in its own database. Saga participant
//! (`reserve-{warehouse}`, `release`, and the express orders' `courier`) behind the barrier; every stock change is announced through the
//! outbox; a confirmed order's reservation ships when its `OrderConfirmed` event arrives (inbox);
//! transfers between the warehouses are two-phase commits, one participant per warehouse.

pub mod domain;
pub mod http;
pub mod store;
pub mod transfer;

use std::sync::Arc;
use std::time::Duration;

use concord_sdk::broker::{Broker, EventStoreBroker};
use concord_sdk::tx::Participant;

use crate::common::{Db, DuplicateDeliveries, concord_client, spawn_relay};
use domain::{NORTH, SOUTH};

/// How the inventory service is started.
#[derive(Debug, Clone, clap::Args)]
pub struct InventoryArgs {
    #[command(flatten)]
    pub common: crate::ServiceArgs,
    /// The south warehouse's database (`--database-url` is the north's).
    #[arg(long)]
    pub south_database_url: String,
    #[command(flatten)]
    pub broker: crate::BrokerArgs,
    /// Hands this percentage of order events to the shipping consumer twice (a fault).
    #[arg(long, default_value_t = 0)]
    pub duplicate_deliveries: u8,
    /// Counts the saga calls in at once and logs each new peak; a call counts until it is
    /// answered or this many milliseconds have passed (0: until it is answered).
    #[arg(long, default_value_t = 0)]
    pub saga_call_window_ms: u64,
}

/// Runs the service until `shutdown`.
///
/// # Errors
/// Startup failures: the databases, the broker, the listener.
pub async fn run(args: InventoryArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let c = &args.common;
    let north = Db::connect(&c.database_url).await?;
    let south = Db::connect(&args.south_database_url).await?;
    let client = concord_client(&c.concord_url, &c.concord_key()?, &concord_sdk::ClientTls::from_env())?;
    // The participants first, with pools of their own, and their recovery at once: a transfer a
    // crash left prepared holds locks that the rest of the startup could wait on. And a phase 2
    // must never wait behind the requests that wait on the rows its prepared transaction holds.
    let participants = [
        (
            NORTH,
            participant(&Db::connect(&c.database_url).await?, NORTH, &client).await?,
        ),
        (
            SOUTH,
            participant(&Db::connect(&args.south_database_url).await?, SOUTH, &client).await?,
        ),
    ];
    for (db, warehouse) in [(&north, NORTH), (&south, SOUTH)] {
        match db {
            Db::Sqlite(p) => store::on_sqlite::ensure_schema(p, warehouse).await?,
            Db::Pg(p) => store::on_pg::ensure_schema(p, warehouse).await?,
        }
    }
    let broker = args.broker.connect(&client).await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let relays = [
        spawn_relay(&north, Arc::clone(&broker), stop.clone()),
        spawn_relay(&south, Arc::clone(&broker), stop.clone()),
    ];
    let dup = DuplicateDeliveries {
        percent: args.duplicate_deliveries,
        seed: c.seed,
    };
    let shipping = tokio::spawn(ship_orders(
        [north.clone(), south.clone()],
        EventStoreBroker::new(client.clone()),
        dup,
        stop.clone(),
    ));
    let state = Arc::new(http::Inventory {
        north,
        south,
        faults: c.faults(),
    });
    let counter = crate::common::SagaCallCounter::new(
        (args.saga_call_window_ms > 0).then(|| Duration::from_millis(args.saga_call_window_ms)),
    );
    let router = http::router(state, participants, c.token()?, c.tx_token()?).layer(
        axum::middleware::from_fn_with_state(counter, crate::common::count_saga_calls),
    );
    let listener = tokio::net::TcpListener::bind(&c.listen).await?;
    let served = crate::common::serve("inventory", listener, router, shutdown).await;
    let _ = stop_tx.send(true);
    shipping.abort();
    for r in relays {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    served
}

/// The warehouse's 2PC participant, after settling what a previous run left prepared.
async fn participant(db: &Db, warehouse: &str, client: &concord_sdk::Client) -> anyhow::Result<Arc<dyn Participant>> {
    let participant: Arc<dyn Participant> = match db {
        Db::Sqlite(p) => {
            let part = concord_sdk::tx::sqlite::SqliteParticipant::new(
                p.clone(),
                transfer::SqliteSide {
                    warehouse: warehouse.to_owned(),
                },
            );
            part.ensure_schema().await?;
            Arc::new(part)
        }
        Db::Pg(p) => {
            let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(p).await?;
            let part = concord_sdk::tx::postgres::PostgresParticipant::new(
                p.clone(),
                &format!("{database}-{warehouse}"),
                transfer::PgSide {
                    warehouse: warehouse.to_owned(),
                },
            )?;
            part.ensure_schema().await?;
            Arc::new(part)
        }
    };
    let recovering = Arc::clone(&participant);
    let client = client.clone();
    let warehouse = warehouse.to_owned();
    tokio::spawn(async move {
        // The coordinator may be down too: keep asking until nothing is left in doubt.
        loop {
            match concord_sdk::tx::recover(recovering.as_ref(), &client).await {
                Ok(report) if report.is_settled() => {
                    tracing::info!(warehouse, ?report, "transfers recovered");
                    return;
                }
                Ok(report) => tracing::info!(warehouse, ?report, "transfers still in doubt"),
                Err(e) => tracing::warn!(warehouse, error = %e, "transfer recovery failed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok(participant)
}

/// Follows the orders' streams (the event store as a broker, topic `order`): a confirmed order's
/// reservations ship from each warehouse, once per event whatever the redeliveries.
async fn ship_orders(
    warehouses: [Db; 2],
    broker: EventStoreBroker,
    dup: DuplicateDeliveries,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let mut consumer = match broker.subscribe("order", "inventory-shipping").await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the orders; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let batch = match consumer.fetch(100, Duration::from_secs(1)).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the orders failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            };
            // Only confirmed orders matter here; the others are passed over at once.
            let mut confirmed = Vec::new();
            for d in batch {
                if d.message.headers.get("type").map(String::as_str) == Some(crate::orders::domain::CONFIRMED) {
                    confirmed.push(d);
                } else if let Err(e) = consumer.ack(&d).await {
                    tracing::warn!(error = %e, "ack failed");
                }
            }
            for d in dup.apply(confirmed) {
                {
                    let order_id = d.message.payload["order_id"].as_str().unwrap_or_default().to_owned();
                    // Each warehouse's inbox keeps its own record: after a failure half-way the
                    // redelivery ships only where it had not.
                    let mut failed = false;
                    for db in &warehouses {
                        let shipped = match db {
                            Db::Sqlite(p) => store::on_sqlite::ship(p, d.message.id, &order_id).await,
                            Db::Pg(p) => store::on_pg::ship(p, d.message.id, &order_id).await,
                        };
                        match shipped {
                            Ok(true) => {}
                            Ok(false) => tracing::info!(message = %d.message.id, "duplicate delivery ignored"),
                            Err(e) => {
                                tracing::warn!(error = %e, "shipping failed; the event comes again");
                                failed = true;
                                break;
                            }
                        }
                    }
                    if failed {
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
