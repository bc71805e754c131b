//! SQLite adapters of Concord's ports: the embedded default, nothing to install.
//!
//! One connection writes (SQLite has one writer anyway, and a dedicated connection never waits on
//! a busy lock); a small pool reads concurrently thanks to WAL mode.

mod events;
mod hosts;
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
    /// The write-ahead log's bound: past it the log is checkpointed and truncated from the writer
    /// connection (see [`spawn_checkpointer`]).
    pub wal_limit_bytes: u64,
    /// The longest an append waits, past the bound, for readers to leave the log before that
    /// truncation gives up until the next round.
    pub wal_reader_wait: Duration,
}

impl SqliteConfig {
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            read_connections: 4,
            synchronous_full: true,
            group_commit: GroupCommitLimits::default(),
            wal_limit_bytes: DEFAULT_WAL_LIMIT_BYTES,
            wal_reader_wait: Duration::from_millis(100),
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
        migration(6, "hosts", include_str!("../migrations/0006_hosts.sql")),
        migration(7, "retention", include_str!("../migrations/0007_retention.sql")),
    ]);
    m.set_ignore_missing(true);
    m
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The default bound of the write-ahead log.
pub const DEFAULT_WAL_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

/// Keeps the write-ahead log bounded while appends keep flowing.
///
/// Every half second a `PASSIVE` checkpoint on its own connection copies the log's pages into the
/// database file: it never blocks the writer, so no append waits for that copy or its fsyncs
/// (SQLite's automatic checkpoint would run inside the commit that crosses its threshold). But a
/// passive checkpoint alone never shortens the file: under sustained appends new frames land
/// while it copies, the log is never wholly copied at a moment the writer starts, so SQLite never
/// starts it over, and the file grows without end (seen: 3 GB beside a 174 MB database after
/// 90 s at full speed).
///
/// So when the file has passed `wal_limit_bytes`, the same round runs `wal_checkpoint(TRUNCATE)`
/// on the writer's own connection, between two group commits: no frame can be added meanwhile,
/// what is left to copy is what came since the passive copy, and the log restarts at zero bytes.
/// Readers still reading older frames hold the restart back; the writer waits for them at most
/// `wal_reader_wait`, then gives up until the next round. That pause, once per `wal_limit_bytes`
/// of log, is the most an append waits for a checkpoint. `journal_size_limit` also truncates the
/// file to the bound whenever SQLite restarts the log on its own.
async fn spawn_checkpointer(
    inner: &Arc<Inner>,
    options: SqliteConnectOptions,
    wal: std::path::PathBuf,
    limit: u64,
    reader_wait: Duration,
) -> Result<(), StoreError> {
    let pool = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.write.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
            let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            if size > limit {
                match truncate_wal(&inner.write, reader_wait).await {
                    Ok(true) => metrics::counter!("concord_sqlite_wal_truncations_total").increment(1),
                    Ok(false) => metrics::counter!("concord_sqlite_wal_truncations_deferred_total").increment(1),
                    Err(e) => tracing::warn!(error = %e, "WAL truncation failed"),
                }
            }
            let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            #[allow(clippy::cast_precision_loss, reason = "a gauge")]
            metrics::gauge!("concord_sqlite_wal_bytes").set(size as f64);
            // A reader that holds a snapshot for long keeps the log from restarting.
            if size > limit.saturating_mul(4) && !warned {
                tracing::warn!(
                    wal_bytes = size,
                    limit_bytes = limit,
                    "the SQLite WAL is past four times its bound: a long-lived reader (another \
                     process with the database open?) keeps it from restarting"
                );
            }
            warned = size > limit.saturating_mul(4);
        }
    });
    Ok(())
}

/// `wal_checkpoint(TRUNCATE)` on the writer connection, waiting at most `reader_wait` for
/// readers; whether the log was wholly copied and truncated.
async fn truncate_wal(write: &SqlitePool, reader_wait: Duration) -> Result<bool, sqlx::Error> {
    use sqlx::Row as _;
    let mut conn = write.acquire().await?;
    let wait_ms = reader_wait.as_millis().max(1);
    sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {wait_ms}")))
        .execute(&mut *conn)
        .await?;
    let result = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&mut *conn)
        .await;
    // The writer's own timeout back before anything else runs on this connection.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        BUSY_TIMEOUT.as_millis()
    )))
    .execute(&mut *conn)
    .await?;
    let row = result?;
    let busy: i64 = row.try_get(0)?;
    Ok(busy == 0)
}

/// How long a connection waits on a lock before it answers busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

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
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let in_memory = config.url.contains(":memory:");
        // No liveness check when a pool hands out a connection (sqlx's default is one per
        // acquire, a hop to the connection's thread and back): a connection to a local file
        // does not go stale, so every pool of this crate turns it off.
        let write = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", if in_memory { "1000" } else { "0" })
                    .pragma("journal_size_limit", config.wal_limit_bytes.to_string()),
            )
            .await
            .map_err(unavailable)?;
        migrator().run(&write).await.map_err(unavailable)?;
        // An in-memory database lives in one connection: readers must share the writer's.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
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
            let wal = format!("{}-wal", options.get_filename().display());
            spawn_checkpointer(
                &inner,
                options,
                wal.into(),
                config.wal_limit_bytes,
                config.wal_reader_wait,
            )
            .await?;
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
