//! SQLite adapters of Concord's ports: the embedded default, nothing to install.
//!
//! One connection writes (SQLite has one writer anyway, and a dedicated connection never waits on
//! a busy lock); a small pool reads concurrently thanks to WAL mode.

mod events;
mod keys;
mod sagas;
mod sql;
mod txs;
mod vault;

pub use vault::SqliteVaultStore;

use concord_core::app::group_commit::{GroupCommitLimits, GroupCommitter};
use concord_core::ports::StoreError;
use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Settings of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// `sqlite://PATH` (created when missing) or `sqlite::memory:`.
    pub url: String,
    /// Connections that read; writes use one more.
    pub read_connections: u32,
    /// `FULL` syncs the WAL on every commit: an acknowledged append survives power loss.
    pub synchronous_full: bool,
    pub group_commit: GroupCommitLimits,
}

impl SqliteConfig {
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            read_connections: 4,
            synchronous_full: true,
            group_commit: GroupCommitLimits::default(),
        }
    }
}

/// Every port on one SQLite database.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    committer: GroupCommitter,
}

struct Inner {
    write: SqlitePool,
    read: SqlitePool,
    head: watch::Sender<u64>,
    /// The saga-row writer's queue (see `sagas::spawn_row_writer`).
    rows: tokio::sync::mpsc::Sender<sagas::RowOp>,
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
        migration(
            4,
            "idempotency moves to the kit",
            include_str!("../migrations/0004_idempotency.sql"),
        ),
        migration(5, "owners", include_str!("../migrations/0005_owners.sql")),
    ]);
    m.set_ignore_missing(true);
    m
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the WAL from its own connection. SQLite's automatic checkpoint runs inside the
/// commit that crosses the threshold, so one append in a thousand would pay for copying and
/// syncing the database file; here no append waits for it. PASSIVE never blocks the writer.
async fn spawn_checkpointer(inner: &Arc<Inner>, options: SqliteConnectOptions) -> Result<(), StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.write.is_closed() {
                return;
            }
            drop(inner);
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
        }
    });
    Ok(())
}

impl SqliteStore {
    /// Opens (creating when missing) the database and applies migrations.
    ///
    /// # Errors
    /// When the file cannot be opened or a migration fails.
    pub async fn connect(config: &SqliteConfig) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if config.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let in_memory = config.url.contains(":memory:");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", if in_memory { "1000" } else { "0" }),
            )
            .await
            .map_err(unavailable)?;
        migrator().run(&write).await.map_err(unavailable)?;
        // An in-memory database lives in one connection: readers must share the writer's.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(config.read_connections.max(1))
                .connect_with(options.clone().read_only(true))
                .await
                .map_err(unavailable)?
        };
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&read)
            .await
            .map_err(unavailable)?;
        let rows = sagas::spawn_row_writer(write.clone());
        let inner = Arc::new(Inner {
            write,
            read,
            rows,
            head: watch::channel(u64::try_from(last).unwrap_or(0)).0,
        });
        if !in_memory {
            spawn_checkpointer(&inner, options).await?;
        }
        let committer = GroupCommitter::spawn(Arc::new(events::Writer(Arc::clone(&inner))), config.group_commit);
        Ok(Self { inner, committer })
    }

    /// The pool of the single writer connection, for a store of the service kit that keeps its
    /// table in this database (the `Idempotency-Key` records): its writes queue with the log's.
    #[must_use]
    pub fn write_pool(&self) -> SqlitePool {
        self.inner.write.clone()
    }

    /// Closes both pools.
    pub async fn close(&self) {
        self.inner.write.close().await;
        self.inner.read.close().await;
    }
}
