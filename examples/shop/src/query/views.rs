//! The read models: `orders_view` (a projection of the log, rebuilt and swapped by the sdk's
//! runner) and `stock_view` (from the broker's stock changes).

use concord_sdk::projection::{BoxError, Projection, SourceEvent, TableName};
use serde_json::Value;

use crate::orders::domain;

pub const STOCK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock_view (
    warehouse TEXT NOT NULL,
    sku       TEXT NOT NULL,
    on_hand   BIGINT NOT NULL,
    reserved  BIGINT NOT NULL,
    shipped   BIGINT NOT NULL,
    held      BIGINT NOT NULL,
    version   BIGINT NOT NULL,
    PRIMARY KEY (warehouse, sku)
)";

/// The cache key of a stock row.
#[must_use]
pub fn stock_key(warehouse: &str, sku: &str) -> String {
    format!("{warehouse}.{sku}")
}

/// The orders read model.
pub struct OrdersView;

macro_rules! orders_view {
    ($conn:ty) => {
        #[async_trait::async_trait]
        impl Projection<$conn> for OrdersView {
            async fn create(&self, conn: &mut $conn, table: &TableName) -> Result<(), BoxError> {
                let sql = format!(
                    "CREATE TABLE {} (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL, total BIGINT NOT NULL, \
                     status TEXT NOT NULL, position BIGINT NOT NULL)",
                    table.quoted()
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
                Ok(())
            }

            async fn apply(&self, conn: &mut $conn, table: &TableName, e: &SourceEvent) -> Result<(), BoxError> {
                let Some(order_id) = e.stream.strip_prefix("order-") else {
                    return Ok(());
                };
                let position = i64::try_from(e.position)?;
                let status = match e.event_type.as_str() {
                    domain::PLACED => {
                        let sql = format!(
                            "INSERT INTO {} (order_id, customer, total, status, position) \
                             VALUES ($1, $2, $3, 'placed', $4) ON CONFLICT DO NOTHING",
                            table.quoted()
                        );
                        sqlx::query(sqlx::AssertSqlSafe(sql))
                            .bind(order_id)
                            .bind(e.data["customer"].as_str().unwrap_or_default())
                            .bind(e.data["total"].as_i64().unwrap_or(0))
                            .bind(position)
                            .execute(conn)
                            .await?;
                        return Ok(());
                    }
                    domain::CONFIRMED => "confirmed",
                    domain::REJECTED => "rejected",
                    _ => return Ok(()),
                };
                let sql = format!(
                    "UPDATE {} SET status = $2, position = $3 WHERE order_id = $1 AND status = 'placed'",
                    table.quoted()
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(order_id)
                    .bind(status)
                    .bind(position)
                    .execute(conn)
                    .await?;
                Ok(())
            }
        }
    };
}

orders_view!(sqlx::SqliteConnection);
orders_view!(sqlx::PgConnection);

crate::per_backend! {
    pub async fn ensure_schema(pool: &Pool) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(STOCK_SCHEMA).execute(pool).await?;
        inbox::ensure_schema(pool).await?;
        Ok(())
    }

    /// Applies one stock change unless it was handled before or is older than the row; answers
    /// the cache key and version to invalidate, `None` for a duplicate.
    pub async fn apply_stock(pool: &Pool, message_id: uuid::Uuid, level: &Value) -> Result<Option<(String, u64)>, sqlx::Error> {
        let Some(mut tx) = inbox::begin(pool, "query-stock", message_id).await? else {
            return Ok(None);
        };
        let warehouse = level["warehouse"].as_str().unwrap_or_default();
        let sku = level["sku"].as_str().unwrap_or_default();
        let version = level["version"].as_i64().unwrap_or(0);
        sqlx::query(
            "INSERT INTO stock_view (warehouse, sku, on_hand, reserved, shipped, held, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (warehouse, sku) DO UPDATE SET \
             on_hand = excluded.on_hand, reserved = excluded.reserved, shipped = excluded.shipped, \
             held = excluded.held, version = excluded.version WHERE stock_view.version < excluded.version",
        )
        .bind(warehouse)
        .bind(sku)
        .bind(level["on_hand"].as_i64().unwrap_or(0))
        .bind(level["reserved"].as_i64().unwrap_or(0))
        .bind(level["shipped"].as_i64().unwrap_or(0))
        .bind(level["held"].as_i64().unwrap_or(0))
        .bind(version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((stock_key(warehouse, sku), u64::try_from(version).unwrap_or(0))))
    }
}
