//! The projection runner, CQRS's read side: it builds a read model in the service's own
//! database from an ordered event source, and writes its checkpoint in the same transaction as
//! the read model, so a crash at any moment neither loses an event nor applies one twice. It can
//! also rebuild a read model into a fresh table while the live one keeps serving, and swap the
//! new one in atomically.
//!
//! # The parts
//!
//! - A [`ProjectionSource`] answers events after a position. [`ConcordLog`] reads Concord's
//!   global log through the sdk [`Client`](crate::Client); other sources (a broker) implement
//!   the same trait.
//! - A [`Projection`] is the service's code, implemented for the connection type of its
//!   database (`sqlx::SqliteConnection`, `sqlx::PgConnection`): [`Projection::create`] creates
//!   the read-model table under the name it is given, [`Projection::apply`] applies one event to
//!   it. Both run inside the runner's transaction; do not commit or roll it back.
//! - A [`Runner`] over a store ([`sqlite::SqliteStore`], [`postgres::PostgresStore`]) runs
//!   the loop: read up to [`RunnerConfig::batch_size`] events after the checkpoint, begin a
//!   transaction (`BEGIN IMMEDIATE` on SQLite), lock the checkpoint row, apply every event,
//!   advance the checkpoint, commit, repeat. A batch whose projection fails or panics, or whose
//!   commit fails, is rolled back whole and read again after the [`Backoff`]: an event is never
//!   skipped. A runner whose task is aborted mid-batch leaves nothing of that batch behind; the
//!   next one resumes from the checkpoint.
//!
//! # Tables
//!
//! `concord_projection_checkpoints` ([`sqlite::SCHEMA`], [`postgres::SCHEMA`]) has one row per
//! projection: `name`, `position` (the last event applied), `table_name` (the physical table now
//! live), `generation` and `version` (the [`Projection::version`] that built that table). An
//! unfinished rebuild has its own row, named `<name>.rebuild`.
//!
//! The read model itself lives in physical tables named `<table>__r<generation>`, created by
//! the projection. **Readers query the view `<table>`**, which the runner keeps pointing at the
//! live one; [`Runner::checkpoint`] names that physical table, for diagnostics. Read through the
//! view, naming the columns you read (`SELECT account, balance FROM balances`): a cached
//! `SELECT *` fails on PostgreSQL once a rebuild changed the table's columns, and a physical
//! table read directly may be dropped by a swap between two statements.
//!
//! # Rebuild and swap
//!
//! [`Runner::rebuild`] creates `<table>__r<N+1>`, projects into it from position 0 under its own
//! checkpoint while the live table keeps being served and updated, and once it has caught up
//! with the live checkpoint swaps in one transaction: the live checkpoint row takes the new
//! table, generation, version and position, the view is replaced to select from the new table,
//! the old table is dropped. A reader's statement sees the old table or the new one, never
//! neither: on PostgreSQL the swap waits for statements reading the view and statements that
//! arrive meanwhile wait for it, on SQLite (use WAL mode) readers go on reading their snapshot.
//!
//! Roll out a changed projection by raising its [`Projection::version`] and calling
//! [`Runner::rebuild`] with a runner of the new version. Runners of the old version stop with
//! [`ProjectionError::VersionMismatch`] at their first batch after the swap, so old code never
//! writes into a table built by new code; a runner of the new version refuses to run on an old
//! table with the same error until the rebuild is done.
//!
//! # Several runners
//!
//! Each batch locks the projection's checkpoint row (`SELECT ... FOR UPDATE` on PostgreSQL,
//! the write lock on SQLite) and applies only if the checkpoint is still where the batch was
//! read from; otherwise it is discarded and read again from the stored position. So runners of
//! one projection on several nodes never apply an event twice; they only waste reads. Give one
//! node the projection, or give each projection to one node with a lease, to avoid the waste.
//!
//! # Limits
//!
//! Every limit is in [`RunnerConfig`] (batch size, idle wait, retry backoff) and
//! [`LogConfig`] (poll interval, page size), with defaults. Give SQLite pools a busy timeout
//! (sqlx's default is 5 s) and WAL mode: the runner's transactions take the write lock first,
//! so concurrent writers queue instead of failing with `SQLITE_BUSY`.
//!
//! # Example
//!
//! ```no_run
//! use concord_sdk::projection::sqlite::SqliteStore;
//! use concord_sdk::projection::{
//!     BoxError, ConcordLog, Projection, ProjectionName, Rebuild, Runner, RunnerConfig, SourceEvent, TableName,
//! };
//! use sqlx::{AssertSqlSafe, SqliteConnection};
//!
//! /// Balance per account, from `Deposited` and `Withdrawn` events of `account-*` streams.
//! struct Balances;
//!
//! #[async_trait::async_trait]
//! impl Projection<SqliteConnection> for Balances {
//!     fn version(&self) -> u32 {
//!         1
//!     }
//!
//!     async fn create(&self, conn: &mut SqliteConnection, table: &TableName) -> Result<(), BoxError> {
//!         let sql = format!("CREATE TABLE {} (account TEXT PRIMARY KEY, balance INTEGER NOT NULL)", table.quoted());
//!         sqlx::query(AssertSqlSafe(sql)).execute(conn).await?;
//!         Ok(())
//!     }
//!
//!     async fn apply(&self, conn: &mut SqliteConnection, table: &TableName, event: &SourceEvent) -> Result<(), BoxError> {
//!         let amount = event.data["amount"].as_i64().ok_or("no amount")?;
//!         let delta = match event.event_type.as_str() {
//!             "Deposited" => amount,
//!             "Withdrawn" => -amount,
//!             _ => return Ok(()),
//!         };
//!         let sql = format!(
//!             "INSERT INTO {t} (account, balance) VALUES (?, ?) \
//!              ON CONFLICT (account) DO UPDATE SET balance = {t}.balance + excluded.balance",
//!             t = table.quoted()
//!         );
//!         sqlx::query(AssertSqlSafe(sql)).bind(&event.stream).bind(delta).execute(conn).await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(pool: sqlx::SqlitePool, client: concord_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let runner = Runner::new(
//!     SqliteStore::new(pool),
//!     ProjectionName::parse("balances")?,
//!     TableName::parse("balances")?,
//!     Balances,
//!     ConcordLog::new(client, Some("account")),
//!     RunnerConfig::default(),
//! )?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! // A new version of the projection first rebuilds its table; the old one serves meanwhile.
//! if runner.init().await?.version != runner.projection().version() {
//!     if runner.rebuild(shutdown).await? == Rebuild::Stopped {
//!         return Ok(());
//!     }
//!     // ...then runs (a fresh shutdown future: the first one was consumed).
//! }
//! runner.run_until(async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }).await?;
//! // Readers: SELECT account, balance FROM balances WHERE account = ?
//! # Ok(())
//! # }
//! ```

mod names;
#[cfg(feature = "postgres")]
pub mod postgres;
mod runner;
mod source;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::time::Duration;

pub use crate::tx::BoxError;
pub use names::{MAX_PROJECTION_NAME_LEN, MAX_TABLE_NAME_LEN, NameError, NameKind, ProjectionName, TableName};
pub use runner::{Backend, ConnectionOf, Rebuild, Runner};
pub use source::{ConcordLog, LogConfig, MAX_PAGE_LIMIT, ProjectionSource, SourceError, SourceEvent};

/// Largest [`RunnerConfig::batch_size`] accepted.
pub const MAX_BATCH_SIZE: usize = 10_000;
/// Longest [`RunnerConfig::idle_wait`] accepted.
pub const MAX_IDLE_WAIT: Duration = Duration::from_secs(300);

/// A service's read model: how to create its table and how each event changes it, on the
/// database whose connection type is `C` (`sqlx::SqliteConnection`, `sqlx::PgConnection`).
///
/// Both methods run inside the runner's transaction; they must not commit or roll it back, and
/// should not talk to anything outside it (a call that cannot be undone would be repeated when a
/// batch is retried). An error, or a panic, rolls the whole batch back; the runner retries it.
#[async_trait::async_trait]
pub trait Projection<C: Send + ?Sized>: Send + Sync {
    /// The version of the table's shape and meaning. Raise it when [`Projection::create`] or
    /// [`Projection::apply`] change, and roll the change out with [`Runner::rebuild`]: a runner
    /// never applies events to a table built by another version. Default 1.
    fn version(&self) -> u32 {
        1
    }

    /// Creates the read-model table named `table` (and its indexes: name them after
    /// [`TableName::as_str`], e.g. `{table}_by_owner`, so every generation's are distinct).
    /// Splice the name with [`TableName::quoted`].
    async fn create(&self, conn: &mut C, table: &TableName) -> Result<(), BoxError>;

    /// Applies one event to the table `table`. Events come in position order. An event the
    /// projection has no use for is answered `Ok(())`.
    async fn apply(&self, conn: &mut C, table: &TableName, event: &SourceEvent) -> Result<(), BoxError>;
}

#[async_trait::async_trait]
impl<C: Send + ?Sized, P: Projection<C> + ?Sized> Projection<C> for std::sync::Arc<P> {
    fn version(&self) -> u32 {
        (**self).version()
    }

    async fn create(&self, conn: &mut C, table: &TableName) -> Result<(), BoxError> {
        (**self).create(conn, table).await
    }

    async fn apply(&self, conn: &mut C, table: &TableName, event: &SourceEvent) -> Result<(), BoxError> {
        (**self).apply(conn, table, event).await
    }
}

/// A projection's checkpoint row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The position of the last event applied; 0 before the first.
    pub position: u64,
    /// The physical table the row's events were applied to, `<table>__r<generation>`.
    pub table: TableName,
    /// The generation of that table: 1 at creation, one more at each rebuild.
    pub generation: u64,
    /// The [`Projection::version`] that built the table.
    pub version: u32,
}

impl Checkpoint {
    fn from_row(row: &runner::store::Row) -> Result<Self, ProjectionError> {
        let inconsistent = |what: &str| {
            ProjectionError::Inconsistent(format!(
                "a checkpoint row holds {what}; it was not written by the runner"
            ))
        };
        Ok(Self {
            position: u64::try_from(row.position).map_err(|_| inconsistent("a negative position"))?,
            table: TableName::parse_physical(&row.table_name).ok_or_else(|| inconsistent("an invalid table name"))?,
            generation: u64::try_from(row.generation).map_err(|_| inconsistent("a negative generation"))?,
            version: u32::try_from(row.version).map_err(|_| inconsistent("a version out of range"))?,
        })
    }
}

/// How a failed batch is retried: after `initial`, then twice as long each time up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first pause. Default 100 ms; at least 1 ms.
    pub initial: Duration,
    /// The longest pause. Default 30 s; at least `initial`, at most one hour.
    pub max: Duration,
    /// Stop and return the error after this many failed attempts in a row. Default `None`:
    /// retry for ever, logging each failure, because skipping the event is never an option and
    /// a stopped runner is easy to miss. Set it when a supervisor restarts the service on error.
    pub give_up_after: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            give_up_after: None,
        }
    }
}

impl Backoff {
    /// The pause before attempt `failures + 1`, after `failures` (at least 1) failed ones.
    #[must_use]
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

/// The limits of a [`Runner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// The most events applied in one transaction. Default 100; 1 to [`MAX_BATCH_SIZE`].
    pub batch_size: usize,
    /// How long one read of the source waits for new events when there are none; the runner
    /// notices `shutdown` meanwhile. Default 1 s; at most [`MAX_IDLE_WAIT`].
    pub idle_wait: Duration,
    /// How failed batches are retried.
    pub retry: Backoff,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            idle_wait: Duration::from_secs(1),
            retry: Backoff::default(),
        }
    }
}

impl RunnerConfig {
    fn validate(&self) -> Result<(), ProjectionError> {
        let error = |message| Err(ProjectionError::Config(message));
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return error("batch_size must be 1 to 10000");
        }
        if self.idle_wait > MAX_IDLE_WAIT {
            return error("idle_wait must be at most 300 s");
        }
        if self.retry.initial < Duration::from_millis(1) {
            return error("retry.initial must be at least 1 ms");
        }
        if self.retry.max < self.retry.initial || self.retry.max > Duration::from_secs(3600) {
            return error("retry.max must be at least retry.initial and at most one hour");
        }
        if self.retry.give_up_after == Some(0) {
            return error("retry.give_up_after must be at least 1 (None retries for ever)");
        }
        Ok(())
    }
}

/// What went wrong in a [`Runner`]. Each variant says what to do about it;
/// [`ProjectionError::is_retryable`] tells the ones the runner retries by itself.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// A name breaks the identifier rules. Fix it.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A limit is out of its range. Fix the configuration.
    #[error("invalid projection configuration: {0}")]
    Config(&'static str),
    /// The source failed. [`SourceError::Unavailable`] is retried; [`SourceError::Rejected`]
    /// stops the runner: fix the source's configuration (key, scope, page size).
    #[error("{0}")]
    Source(#[from] SourceError),
    /// The source answered a position not above the one before it: a bug in the source. The
    /// runner stops rather than apply events out of order.
    #[error("the source answered position {position} after {previous} (reading after {after})")]
    SourceOrder {
        /// The position read after.
        after: u64,
        /// The position before the offending one.
        previous: u64,
        /// The offending position.
        position: u64,
    },
    /// [`Projection::apply`] failed or panicked. The batch was rolled back; the runner retries
    /// it. When it keeps failing, fix the projection (or the data it trips on) and restart.
    #[error("the projection failed at position {position} ({stream} {event_type}): {source}")]
    Handler {
        /// The event's position.
        position: u64,
        /// The event's stream.
        stream: String,
        /// The event's type.
        event_type: String,
        /// The projection's error.
        source: BoxError,
    },
    /// [`Projection::create`] failed or panicked. Nothing was kept; retried like a batch.
    #[error("the projection could not create table {table}: {source}")]
    Create {
        /// The table it was asked to create.
        table: TableName,
        /// The projection's error.
        source: BoxError,
    },
    /// A statement of the runner failed (connection, busy, serialization failure). Retried.
    #[error("projection database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The live table was built by another version of the projection. A newer runner:
    /// [`Runner::rebuild`] first. An older runner: a newer one has taken over; stop this one.
    #[error("the live table was built by projection version {live}, this runner's is {ours}")]
    VersionMismatch {
        /// The version that built the live table.
        live: u32,
        /// This runner's version.
        ours: u32,
    },
    /// The projection has no checkpoint row: [`Runner::init`] was not called, or the row was
    /// deleted by hand. Call `init` (`run_until` does).
    #[error("projection {0} has no checkpoint row; call init first")]
    NotInitialized(ProjectionName),
    /// An unfinished rebuild of another version exists. Finish it with a runner of that
    /// version, or discard it with [`Runner::cancel_rebuild`].
    #[error("an unfinished rebuild of version {version} exists; this runner's version is {ours}")]
    RebuildInProgress {
        /// The unfinished rebuild's version.
        version: u32,
        /// This runner's version.
        ours: u32,
    },
    /// The rebuild was cancelled by [`Runner::cancel_rebuild`] while it ran. Start it again if
    /// still wanted.
    #[error("the rebuild of projection {0} was cancelled")]
    RebuildCancelled(ProjectionName),
    /// A source position does not fit the database's signed 64-bit integer.
    #[error("position {0} is beyond the largest storable position")]
    PositionOutOfRange(u64),
    /// The checkpoint table holds something the runner never writes (edited by hand). Have an
    /// operator look.
    #[error("inconsistent projection checkpoints: {0}")]
    Inconsistent(String),
}

impl ProjectionError {
    /// Whether the runner retries after this error (with its backoff) rather than stop.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Source(SourceError::Unavailable(_))
            | Self::Handler { .. }
            | Self::Create { .. }
            | Self::Database(_) => true,
            Self::Name(_)
            | Self::Config(_)
            | Self::Source(SourceError::Rejected(_))
            | Self::SourceOrder { .. }
            | Self::VersionMismatch { .. }
            | Self::NotInitialized(_)
            | Self::RebuildInProgress { .. }
            | Self::RebuildCancelled(_)
            | Self::PositionOutOfRange(_)
            | Self::Inconsistent(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_max() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            give_up_after: None,
        };
        let delays: Vec<_> = (1..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn config_limits_are_checked() {
        assert!(RunnerConfig::default().validate().is_ok());
        let bad = [
            RunnerConfig {
                batch_size: 0,
                ..RunnerConfig::default()
            },
            RunnerConfig {
                batch_size: MAX_BATCH_SIZE + 1,
                ..RunnerConfig::default()
            },
            RunnerConfig {
                idle_wait: MAX_IDLE_WAIT + Duration::from_secs(1),
                ..RunnerConfig::default()
            },
            RunnerConfig {
                retry: Backoff {
                    initial: Duration::ZERO,
                    ..Backoff::default()
                },
                ..RunnerConfig::default()
            },
            RunnerConfig {
                retry: Backoff {
                    max: Duration::from_millis(10),
                    ..Backoff::default()
                },
                ..RunnerConfig::default()
            },
            RunnerConfig {
                retry: Backoff {
                    give_up_after: Some(0),
                    ..Backoff::default()
                },
                ..RunnerConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(ProjectionError::Config(_))),
                "{config:?}"
            );
        }
    }
}
