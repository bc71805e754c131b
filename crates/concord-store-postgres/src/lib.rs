//! PostgreSQL adapters of Concord's ports: the scale-out shape, any number of `concord serve`
//! nodes over one database. Nothing here assumes a single node: ordering comes from a row lock,
//! wake-ups from LISTEN/NOTIFY, and every claim is a statement the database arbitrates.

mod events;
mod hosts;
mod keys;
mod sagas;
mod sql;
mod txs;
mod vault;

pub use vault::PostgresVaultStore;

use concord_core::app::group_commit::{GroupCommitLimits, GroupCommitter};
use concord_core::ports::StoreError;
use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`.
    pub url: String,
    pub max_connections: u32,
    pub group_commit: GroupCommitLimits,
}

impl PostgresConfig {
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            group_commit: GroupCommitLimits::default(),
        }
    }
}

/// Every port on one PostgreSQL database.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    committer: GroupCommitter,
}

struct Inner {
    pool: PgPool,
    head: watch::Sender<u64>,
}

/// The NOTIFY channel on which writers announce new positions.
pub const EVENTS_CHANNEL: &str = "concord_events";

/// How long a pooled connection may sit idle before it is checked with a round trip before use.
pub const CHECK_IDLE_AFTER: Duration = Duration::from_millis(500);

/// The options of every pool this crate opens, for `max_connections` connections.
///
/// By default sqlx checks every connection it hands out with a round trip to the server (a
/// `Sync` and its answer) before the caller's first statement. On the write paths that is one
/// round trip in every two or three. A connection returned moments ago is live, so only one idle
/// for [`CHECK_IDLE_AFTER`] or longer (one a server restart, a failover or a firewall may have
/// dropped since) is checked first. A connection that breaks while in use fails its statement
/// as it did before, and sqlx drops it from the pool; a path that must not fail on the next dead
/// connection (settling a write whose answer was lost) takes one with [`acquire_live`].
#[must_use]
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    use sqlx::Connection as _;
    PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A connection checked with a round trip, for a path that must not fail on a dead one: each
/// that fails the check is closed, up to one more than the pool holds.
pub(crate) async fn acquire_live(pool: &PgPool) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    use sqlx::Connection as _;
    let mut last = None;
    for _ in 0..=pool.options().get_max_connections() {
        let mut conn = pool.acquire().await?;
        match conn.ping().await {
            Ok(()) => return Ok(conn),
            Err(e) => {
                conn.close_on_drop();
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(sqlx::Error::PoolClosed))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A plain (not reversible) migration of this crate.
fn migration(version: i64, description: &'static str, sql: &'static str) -> Migration {
    Migration::new(
        version,
        description.into(),
        MigrationType::Simple,
        sql.into_sql_str(),
        false,
    )
}

fn migrator() -> Migrator {
    // The vault's migrations (1001 on) may share the database: ignore them.
    let mut m = Migrator::with_migrations(vec![
        migration(1, "init", include_str!("../migrations/0001_init.sql")),
        migration(2, "sagas", include_str!("../migrations/0002_sagas.sql")),
        migration(3, "transactions", include_str!("../migrations/0003_transactions.sql")),
        migration(4, "owners", include_str!("../migrations/0004_owners.sql")),
        migration(5, "hosts", include_str!("../migrations/0005_hosts.sql")),
        migration(6, "retention", include_str!("../migrations/0006_retention.sql")),
    ]);
    m.set_ignore_missing(true);
    m
}

impl PostgresStore {
    /// The pool, for a store of the service kit that keeps its table in this database (the
    /// `Idempotency-Key` records).
    #[must_use]
    pub fn pool(&self) -> PgPool {
        self.inner.pool.clone()
    }

    /// Connects, applies migrations (under the migrator's advisory lock, so nodes starting
    /// together apply them once) and starts the NOTIFY listener.
    ///
    /// # Errors
    /// When the database is unreachable or a migration fails.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        // The log's ordering (see `events`) rests on READ COMMITTED: a writer that waited for the
        // head row re-reads it as the last holder committed it. Under a stricter default set for
        // the database or role, that wait would end in a serialization failure instead.
        let options = sqlx::postgres::PgConnectOptions::from_str(&config.url)
            .map_err(unavailable)?
            .options([("default_transaction_isolation", "read committed")]);
        let pool = pool_options(config.max_connections)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        migrator().run(&pool).await.map_err(unavailable)?;
        let last: i64 = sqlx::query_scalar("SELECT last_position FROM concord_log_head WHERE id = 1")
            .fetch_one(&pool)
            .await
            .map_err(unavailable)?;
        let inner = Arc::new(Inner {
            pool,
            head: watch::channel(u64::try_from(last).unwrap_or(0)).0,
        });
        events::spawn_listener(&inner).await?;
        let committer = GroupCommitter::spawn(Arc::new(events::Writer(Arc::clone(&inner))), config.group_commit);
        Ok(Self { inner, committer })
    }

    pub async fn close(&self) {
        self.inner.pool.close().await;
    }
}

/// Creates an empty database next to the one `base_url` names and answers its URL: each test and
/// benchmark run gets its own, so runs never see each other's events.
///
/// # Errors
/// When the server refuses.
pub async fn create_scratch_database(base_url: &str, prefix: &str) -> Result<String, StoreError> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(base_url).await.map_err(unavailable)?;
    let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
    let (head, _) = base_url
        .rsplit_once('/')
        .ok_or_else(|| unavailable("database URL has no path"))?;
    let query = base_url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Ok(format!("{head}/{name}{query}"))
}

/// Drops a database made by [`create_scratch_database`], closing its remaining connections.
///
/// # Errors
/// When the server refuses.
pub async fn drop_scratch_database(base_url: &str, scratch_url: &str) -> Result<(), StoreError> {
    use sqlx::Connection as _;
    let name = scratch_url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .ok_or_else(|| unavailable("not a scratch database URL"))?;
    let mut conn = sqlx::PgConnection::connect(base_url).await.map_err(unavailable)?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .map_err(unavailable)?;
    Ok(())
}
