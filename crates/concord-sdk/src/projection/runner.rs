//! The runner: the batch loop shared by every database, the rebuild and the swap. The SQL of
//! each database lives in [`super::sqlite`] and [`super::postgres`], behind [`store::Store`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};

use futures::FutureExt as _;

use super::{
    BoxError, Checkpoint, Projection, ProjectionError, ProjectionName, ProjectionSource, RunnerConfig, SourceEvent,
    TableName,
};

/// The statements the runner needs, written once per database. Sealed: only this crate's
/// stores implement it.
pub(crate) mod store {
    use std::ops::DerefMut;

    /// A checkpoint row as stored.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Row {
        pub position: i64,
        pub table_name: String,
        pub generation: i64,
        pub version: i64,
    }

    #[async_trait::async_trait]
    pub trait Store: Send + Sync + 'static {
        /// The connection a [`Projection`](crate::projection::Projection) writes through.
        type Conn: Send;
        /// An open write transaction.
        type Tx: Send + DerefMut<Target = Self::Conn>;

        /// Creates `concord_projection_checkpoints` when missing.
        async fn ensure_schema(&self) -> Result<(), sqlx::Error>;
        /// Begins a write transaction; on SQLite with `BEGIN IMMEDIATE`.
        async fn begin(&self) -> Result<Self::Tx, sqlx::Error>;
        async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error>;
        async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error>;
        /// The row `key`, outside any transaction.
        async fn read_committed(&self, key: &str) -> Result<Option<Row>, sqlx::Error>;
        /// The row `key`; with `lock`, locked until the transaction ends (PostgreSQL's
        /// `FOR UPDATE`; on SQLite the transaction holds the write lock already).
        async fn read(conn: &mut Self::Conn, key: &str, lock: bool) -> Result<Option<Row>, sqlx::Error>;
        /// Inserts the row `key` unless it exists; answers whether it inserted.
        async fn insert(conn: &mut Self::Conn, key: &str, row: &Row) -> Result<bool, sqlx::Error>;
        async fn update(conn: &mut Self::Conn, key: &str, row: &Row) -> Result<(), sqlx::Error>;
        async fn delete(conn: &mut Self::Conn, key: &str) -> Result<(), sqlx::Error>;
        /// Points the view `view` at `table`, replacing the view if it exists.
        async fn replace_view(
            conn: &mut Self::Conn,
            view: &super::TableName,
            table: &super::TableName,
        ) -> Result<(), sqlx::Error>;
        async fn drop_table(conn: &mut Self::Conn, table: &super::TableName) -> Result<(), sqlx::Error>;
    }
}

use store::{Row, Store};

/// A database the runner keeps read models and checkpoints in:
/// [`SqliteStore`](super::sqlite::SqliteStore) or [`PostgresStore`](super::postgres::PostgresStore).
/// Sealed. [`ConnectionOf<B>`] is the connection type a [`Projection`] for it takes.
pub trait Backend: Store {}

impl<T: Store> Backend for T {}

/// The connection type of a backend's projections: `sqlx::SqliteConnection` for
/// [`SqliteStore`](super::sqlite::SqliteStore), `sqlx::PgConnection` for
/// [`PostgresStore`](super::postgres::PostgresStore). For code generic over the backend:
/// `P: Projection<ConnectionOf<B>>`.
pub type ConnectionOf<B> = <B as Store>::Conn;

/// What [`Runner::rebuild`] ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Rebuild {
    /// The new table caught up and is live: the view and the checkpoint row name it, the old
    /// table is dropped.
    Swapped(Checkpoint),
    /// The shutdown future completed first. The rebuild's table and checkpoint stay; the next
    /// [`Runner::rebuild`] resumes them.
    Stopped,
}

/// What one attempt at a batch did.
enum Step<T> {
    /// Applied or skipped a batch; loop again.
    Progress,
    /// The shutdown future completed.
    Stopped,
    /// Finished with this result.
    Done(T),
}

/// Runs one projection: reads the source after the stored checkpoint, applies each batch and
/// advances the checkpoint in one transaction, and rebuilds the read model into a fresh table
/// on demand. See the [module docs](super) for the tables and the guarantees.
///
/// Any number of runners of the same projection may run, on any number of nodes: each batch
/// locks the checkpoint row and is discarded when another runner moved the checkpoint first.
pub struct Runner<B, P, S> {
    store: B,
    name: ProjectionName,
    view: TableName,
    projection: P,
    source: S,
    config: RunnerConfig,
    /// Set once the checkpoint table is known to exist.
    schema: tokio::sync::OnceCell<()>,
}

impl<B, P, S> std::fmt::Debug for Runner<B, P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("name", &self.name)
            .field("table", &self.view)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B, P, S> Runner<B, P, S>
where
    B: Backend,
    P: Projection<B::Conn>,
    S: ProjectionSource,
{
    /// A runner of the projection `name` whose readers query the view `table`.
    ///
    /// # Errors
    /// [`ProjectionError::Config`] when a limit in `config` is out of its range.
    pub fn new(
        store: B,
        name: ProjectionName,
        table: TableName,
        projection: P,
        source: S,
        config: RunnerConfig,
    ) -> Result<Self, ProjectionError> {
        config.validate()?;
        Ok(Self {
            store,
            name,
            view: table,
            projection,
            source,
            config,
            schema: tokio::sync::OnceCell::new(),
        })
    }

    /// The projection's name, the key of its checkpoint row.
    #[must_use]
    pub fn name(&self) -> &ProjectionName {
        &self.name
    }

    /// The view readers query.
    #[must_use]
    pub fn table(&self) -> &TableName {
        &self.view
    }

    /// The projection this runner applies.
    #[must_use]
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Creates the checkpoint table when missing and, when the projection has no checkpoint row
    /// yet, its first table (`<table>__r1`, through [`Projection::create`]), the view and the row
    /// at position 0, in one transaction. Answers the live checkpoint, which may have been built
    /// by another version of the projection (compare [`Checkpoint::version`] with
    /// [`Projection::version`]). [`Runner::run_until`] calls it first.
    ///
    /// # Errors
    /// [`ProjectionError::Database`], [`ProjectionError::Create`] (nothing is left behind),
    /// [`ProjectionError::Inconsistent`].
    #[tracing::instrument(skip_all, fields(projection = %self.name))]
    pub async fn init(&self) -> Result<Checkpoint, ProjectionError> {
        self.ensure_schema().await?;
        let mut tx = self.store.begin().await?;
        let result = self.init_in(&mut tx).await;
        finish::<B, _>(tx, result).await
    }

    async fn init_in(&self, conn: &mut B::Conn) -> Result<Checkpoint, ProjectionError> {
        let key = self.name.as_str();
        if let Some(row) = B::read(conn, key, true).await? {
            return Checkpoint::from_row(&row);
        }
        let table = self.view.generation(1);
        let row = Row {
            position: 0,
            table_name: table.as_str().to_owned(),
            generation: 1,
            version: i64::from(self.projection.version()),
        };
        if !B::insert(conn, key, &row).await? {
            // Another runner created it meanwhile (PostgreSQL; SQLite's write lock excludes it).
            let row = B::read(conn, key, false)
                .await?
                .ok_or_else(|| ProjectionError::Inconsistent(format!("the checkpoint row {key} vanished")))?;
            return Checkpoint::from_row(&row);
        }
        create(&self.projection, conn, &table).await?;
        B::replace_view(conn, &self.view, &table).await?;
        tracing::info!(projection = %self.name, table = %table, "projection created");
        Checkpoint::from_row(&row)
    }

    /// The live checkpoint, or `None` before [`Runner::init`].
    ///
    /// # Errors
    /// [`ProjectionError::Database`], [`ProjectionError::Inconsistent`].
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, ProjectionError> {
        self.read_checkpoint(self.name.as_str()).await
    }

    /// The checkpoint of an unfinished rebuild, or `None` when there is none.
    ///
    /// # Errors
    /// [`ProjectionError::Database`], [`ProjectionError::Inconsistent`].
    pub async fn rebuild_checkpoint(&self) -> Result<Option<Checkpoint>, ProjectionError> {
        self.read_checkpoint(&self.name.rebuild_key()).await
    }

    async fn read_checkpoint(&self, key: &str) -> Result<Option<Checkpoint>, ProjectionError> {
        self.ensure_schema().await?;
        self.store
            .read_committed(key)
            .await?
            .map(|row| Checkpoint::from_row(&row))
            .transpose()
    }

    /// Runs the projection until `shutdown` completes: [`Runner::init`], then batch after batch
    /// from the checkpoint on. A batch that fails (the source unavailable, the projection's
    /// error or panic, the database) is rolled back and tried again after the
    /// [backoff](super::Backoff); no event is ever skipped. `shutdown` is watched while the
    /// runner waits for events or for a retry; a batch already being applied finishes (or, if the
    /// future is dropped instead, rolls back).
    ///
    /// # Errors
    /// The errors a retry cannot mend, and any error once
    /// [`Backoff::give_up_after`](super::Backoff::give_up_after) attempts failed in a row:
    /// [`ProjectionError::VersionMismatch`] when the live table was built by another version of
    /// the projection (rebuild, or stop this older runner), [`ProjectionError::Source`] with
    /// [`SourceError::Rejected`](super::SourceError::Rejected), [`ProjectionError::SourceOrder`],
    /// [`ProjectionError::NotInitialized`], [`ProjectionError::Inconsistent`],
    /// [`ProjectionError::PositionOutOfRange`].
    #[tracing::instrument(skip_all, fields(projection = %self.name))]
    pub async fn run_until<F: Future<Output = ()>>(&self, shutdown: F) -> Result<(), ProjectionError> {
        let mut shutdown = pin!(shutdown);
        let mut failures = 0;
        let mut known = None;
        loop {
            match self.live_batch(&mut known, shutdown.as_mut()).await {
                Ok(Step::Progress) => failures = 0,
                Ok(Step::Stopped | Step::Done(())) => return Ok(()),
                Err(error) => {
                    // The checkpoint may have moved while the batch failed: read it again.
                    known = None;
                    if self.failed(error, &mut failures, shutdown.as_mut()).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn live_batch<F: Future<Output = ()>>(
        &self,
        known: &mut Option<u64>,
        shutdown: Pin<&mut F>,
    ) -> Result<Step<()>, ProjectionError> {
        let after = match *known {
            Some(position) => position,
            None => {
                let checkpoint = self.init().await?;
                self.check_version(&checkpoint)?;
                *known = Some(checkpoint.position);
                checkpoint.position
            }
        };
        let Some(events) = self.fetch(after, shutdown).await? else {
            return Ok(Step::Stopped);
        };
        if events.is_empty() {
            return Ok(Step::Progress);
        }
        let mut tx = self.store.begin().await?;
        let result = self.live_batch_in(&mut tx, after, &events).await;
        let position = finish::<B, _>(tx, result).await?;
        tracing::debug!(projection = %self.name, read = events.len(), position, "batch done");
        // The checkpoint, for lag against the log's head.
        metrics::gauge!("concord_projection_position", "projection" => self.name.to_string()).set(position as f64);
        *known = Some(position);
        Ok(Step::Progress)
    }

    /// Applies `events` when the checkpoint still is `after`; answers the checkpoint now.
    async fn live_batch_in(
        &self,
        conn: &mut B::Conn,
        after: u64,
        events: &[SourceEvent],
    ) -> Result<u64, ProjectionError> {
        let key = self.name.as_str();
        let row = B::read(conn, key, true)
            .await?
            .ok_or_else(|| ProjectionError::NotInitialized(self.name.clone()))?;
        let live = Checkpoint::from_row(&row)?;
        self.check_version(&live)?;
        if live.position != after {
            // Another runner, or a swap, moved the checkpoint since this batch was read: the
            // batch is stale. Go on from the stored position.
            tracing::debug!(projection = %self.name, read_after = after, checkpoint = live.position, "checkpoint moved");
            return Ok(live.position);
        }
        let last = apply_all(&self.projection, conn, &live.table, events).await?;
        let row = Row {
            position: to_db(last)?,
            ..row
        };
        B::update(conn, key, &row).await?;
        Ok(last)
    }

    /// Builds the read model anew with this runner's projection while the live one keeps
    /// serving, then swaps it in.
    ///
    /// Creates `<table>__r<N>` (N the live generation plus one) through
    /// [`Projection::create`] with its own checkpoint row (`<name>.rebuild`), projects into it
    /// from position 0 batch by batch, and once it has caught up with the live checkpoint swaps
    /// in one transaction: the live checkpoint row takes the new table, generation, version and
    /// position, the view is pointed at the new table, the rebuild's row is deleted and the old
    /// table dropped. Runners of another [`Projection::version`] then stop with
    /// [`ProjectionError::VersionMismatch`]; runners of the same version go on with the new
    /// table. An unfinished rebuild of the same version (stopped, crashed) is resumed where it
    /// stopped. Failed batches are retried like [`Runner::run_until`]'s.
    ///
    /// # Errors
    /// [`ProjectionError::RebuildInProgress`] when an unfinished rebuild of another version
    /// exists ([`Runner::cancel_rebuild`] discards it), [`ProjectionError::RebuildCancelled`]
    /// when it was cancelled meanwhile, [`ProjectionError::NotInitialized`] before
    /// [`Runner::init`], and the errors of [`Runner::run_until`] that a retry cannot mend.
    #[tracing::instrument(skip_all, fields(projection = %self.name))]
    pub async fn rebuild<F: Future<Output = ()>>(&self, shutdown: F) -> Result<Rebuild, ProjectionError> {
        let mut shutdown = pin!(shutdown);
        let mut failures = 0;
        let mut known = None;
        loop {
            match self.rebuild_batch(&mut known, shutdown.as_mut()).await {
                Ok(Step::Progress) => failures = 0,
                Ok(Step::Stopped) => return Ok(Rebuild::Stopped),
                Ok(Step::Done(checkpoint)) => return Ok(Rebuild::Swapped(checkpoint)),
                Err(error) => {
                    known = None;
                    if self.failed(error, &mut failures, shutdown.as_mut()).await? {
                        return Ok(Rebuild::Stopped);
                    }
                }
            }
        }
    }

    async fn rebuild_batch<F: Future<Output = ()>>(
        &self,
        known: &mut Option<(u64, TableName)>,
        shutdown: Pin<&mut F>,
    ) -> Result<Step<Checkpoint>, ProjectionError> {
        let (after, table) = match known.take() {
            Some(known) => known,
            None => {
                let mut tx = self.store.begin().await?;
                let result = self.start_rebuild_in(&mut tx).await;
                let started = finish::<B, _>(tx, result).await?;
                (started.position, started.table)
            }
        };
        *known = Some((after, table.clone()));
        let live = self
            .checkpoint()
            .await?
            .ok_or_else(|| ProjectionError::NotInitialized(self.name.clone()))?;
        // Caught up already: try the swap without reading.
        let events = if after >= live.position {
            Vec::new()
        } else {
            let Some(events) = self.fetch(after, shutdown).await? else {
                return Ok(Step::Stopped);
            };
            if events.is_empty() {
                return Ok(Step::Progress);
            }
            events
        };
        let mut tx = self.store.begin().await?;
        let result = self.rebuild_batch_in(&mut tx, after, &table, &events).await;
        match finish::<B, _>(tx, result).await? {
            RebuildBatch::Moved(position) => {
                *known = Some((position, table));
                Ok(Step::Progress)
            }
            RebuildBatch::Swapped(checkpoint) => {
                tracing::info!(
                    projection = %self.name, table = %checkpoint.table, position = checkpoint.position,
                    "rebuild swapped in"
                );
                Ok(Step::Done(checkpoint))
            }
        }
    }

    /// The rebuild's checkpoint: the unfinished one of this version, or a new one with its table.
    async fn start_rebuild_in(&self, conn: &mut B::Conn) -> Result<Checkpoint, ProjectionError> {
        let key = self.name.rebuild_key();
        // Lock order everywhere: the rebuild's row, then the live row.
        let existing = B::read(conn, &key, true).await?;
        let live = B::read(conn, self.name.as_str(), true)
            .await?
            .ok_or_else(|| ProjectionError::NotInitialized(self.name.clone()))?;
        let live = Checkpoint::from_row(&live)?;
        if let Some(row) = existing {
            return self.resumable(&row);
        }
        let generation = live.generation + 1;
        let table = self.view.generation(generation);
        let row = Row {
            position: 0,
            table_name: table.as_str().to_owned(),
            generation: to_db(generation)?,
            version: i64::from(self.projection.version()),
        };
        if !B::insert(conn, &key, &row).await? {
            let row = B::read(conn, &key, false)
                .await?
                .ok_or_else(|| ProjectionError::Inconsistent(format!("the checkpoint row {key} vanished")))?;
            return self.resumable(&row);
        }
        create(&self.projection, conn, &table).await?;
        tracing::info!(projection = %self.name, table = %table, "rebuild started");
        Checkpoint::from_row(&row)
    }

    fn resumable(&self, row: &Row) -> Result<Checkpoint, ProjectionError> {
        let checkpoint = Checkpoint::from_row(row)?;
        if checkpoint.version != self.projection.version() {
            return Err(ProjectionError::RebuildInProgress {
                version: checkpoint.version,
                ours: self.projection.version(),
            });
        }
        Ok(checkpoint)
    }

    async fn rebuild_batch_in(
        &self,
        conn: &mut B::Conn,
        after: u64,
        table: &TableName,
        events: &[SourceEvent],
    ) -> Result<RebuildBatch, ProjectionError> {
        let key = self.name.rebuild_key();
        let Some(row) = B::read(conn, &key, true).await? else {
            // Finished by another runner, or cancelled.
            let live = B::read(conn, self.name.as_str(), false)
                .await?
                .ok_or_else(|| ProjectionError::NotInitialized(self.name.clone()))?;
            let live = Checkpoint::from_row(&live)?;
            return if live.table == *table {
                Ok(RebuildBatch::Swapped(live))
            } else {
                Err(ProjectionError::RebuildCancelled(self.name.clone()))
            };
        };
        let rebuild = self.resumable(&row)?;
        if rebuild.table != *table {
            // Cancelled and started again meanwhile: this run's table is gone.
            return Err(ProjectionError::RebuildCancelled(self.name.clone()));
        }
        if rebuild.position != after {
            return Ok(RebuildBatch::Moved(rebuild.position));
        }
        let last = if events.is_empty() {
            after
        } else {
            apply_all(&self.projection, conn, &rebuild.table, events).await?
        };
        let live_row = B::read(conn, self.name.as_str(), true)
            .await?
            .ok_or_else(|| ProjectionError::NotInitialized(self.name.clone()))?;
        let live = Checkpoint::from_row(&live_row)?;
        if last < live.position {
            B::update(
                conn,
                &key,
                &Row {
                    position: to_db(last)?,
                    ..row
                },
            )
            .await?;
            return Ok(RebuildBatch::Moved(last));
        }
        // Caught up (or ahead: the new table then holds events the live one has not seen, and
        // the checkpoint moves with it). Everything in one transaction: readers of the view see
        // the old table or the new one, never neither.
        let swapped = Row {
            position: to_db(last)?,
            ..row
        };
        B::update(conn, self.name.as_str(), &swapped).await?;
        B::delete(conn, &key).await?;
        B::replace_view(conn, &self.view, &rebuild.table).await?;
        B::drop_table(conn, &live.table).await?;
        Checkpoint::from_row(&swapped).map(RebuildBatch::Swapped)
    }

    /// Discards an unfinished rebuild: drops its table and deletes its checkpoint row. Answers
    /// whether there was one. A [`Runner::rebuild`] running meanwhile stops with
    /// [`ProjectionError::RebuildCancelled`].
    ///
    /// # Errors
    /// [`ProjectionError::Database`], [`ProjectionError::Inconsistent`].
    #[tracing::instrument(skip_all, fields(projection = %self.name))]
    pub async fn cancel_rebuild(&self) -> Result<bool, ProjectionError> {
        self.ensure_schema().await?;
        let mut tx = self.store.begin().await?;
        let result = async {
            let key = self.name.rebuild_key();
            let Some(row) = B::read(&mut tx, &key, true).await? else {
                return Ok(false);
            };
            let rebuild = Checkpoint::from_row(&row)?;
            B::delete(&mut tx, &key).await?;
            B::drop_table(&mut tx, &rebuild.table).await?;
            tracing::info!(projection = %self.name, table = %rebuild.table, "rebuild cancelled");
            Ok(true)
        }
        .await;
        finish::<B, _>(tx, result).await
    }

    async fn ensure_schema(&self) -> Result<(), ProjectionError> {
        self.schema.get_or_try_init(|| self.store.ensure_schema()).await?;
        Ok(())
    }

    fn check_version(&self, live: &Checkpoint) -> Result<(), ProjectionError> {
        if live.version == self.projection.version() {
            Ok(())
        } else {
            Err(ProjectionError::VersionMismatch {
                live: live.version,
                ours: self.projection.version(),
            })
        }
    }

    /// The next batch after `after`, checked against the source contract; `None` when `shutdown`
    /// completed first.
    async fn fetch<F: Future<Output = ()>>(
        &self,
        after: u64,
        shutdown: Pin<&mut F>,
    ) -> Result<Option<Vec<SourceEvent>>, ProjectionError> {
        let mut events = tokio::select! {
            biased;
            () = shutdown => return Ok(None),
            fetched = self.source.fetch(after, self.config.batch_size, self.config.idle_wait) => fetched?,
        };
        events.truncate(self.config.batch_size);
        let mut previous = after;
        for event in &events {
            if event.position <= previous {
                return Err(ProjectionError::SourceOrder {
                    after,
                    previous,
                    position: event.position,
                });
            }
            previous = event.position;
        }
        Ok(Some(events))
    }

    /// Handles a failed attempt: returns the error when a retry cannot help or the attempts
    /// are used up, otherwise logs it and sleeps the backoff. Answers whether `shutdown`
    /// completed during the sleep.
    async fn failed<F: Future<Output = ()>>(
        &self,
        error: ProjectionError,
        failures: &mut u32,
        shutdown: Pin<&mut F>,
    ) -> Result<bool, ProjectionError> {
        *failures = failures.saturating_add(1);
        let retry = &self.config.retry;
        if !error.is_retryable() || retry.give_up_after.is_some_and(|max| *failures >= max) {
            tracing::error!(projection = %self.name, attempts = *failures, error = %error, "projection stopped");
            return Err(error);
        }
        let delay = retry.delay(*failures);
        tracing::warn!(
            projection = %self.name, attempt = *failures, retry_in_ms = delay.as_millis(), error = %error,
            "projection batch failed; rolled back, retrying"
        );
        tokio::select! {
            biased;
            () = shutdown => Ok(true),
            () = tokio::time::sleep(delay) => Ok(false),
        }
    }
}

enum RebuildBatch {
    Moved(u64),
    Swapped(Checkpoint),
}

/// Commits when `result` is `Ok`, rolls back otherwise.
async fn finish<B: Store, T>(tx: B::Tx, result: Result<T, ProjectionError>) -> Result<T, ProjectionError> {
    match result {
        Ok(value) => {
            B::commit(tx).await?;
            Ok(value)
        }
        Err(error) => {
            if let Err(rollback) = B::rollback(tx).await {
                tracing::warn!(error = %rollback, "rollback failed; the connection discards the transaction");
            }
            Err(error)
        }
    }
}

/// Applies `events` in order on `conn`; answers the last position. A panic of the projection is
/// caught and reported like its errors, so the batch is rolled back and retried.
async fn apply_all<C: Send, P: Projection<C>>(
    projection: &P,
    conn: &mut C,
    table: &TableName,
    events: &[SourceEvent],
) -> Result<u64, ProjectionError> {
    let mut last = None;
    for event in events {
        let applied = AssertUnwindSafe(projection.apply(conn, table, event))
            .catch_unwind()
            .await;
        if let Err(source) = applied.unwrap_or_else(|panic| Err(panicked(panic.as_ref()))) {
            return Err(ProjectionError::Handler {
                position: event.position,
                stream: event.stream.clone(),
                event_type: event.event_type.clone(),
                source,
            });
        }
        last = Some(event.position);
    }
    last.ok_or_else(|| ProjectionError::Inconsistent("an empty batch was applied".into()))
}

async fn create<C: Send, P: Projection<C>>(
    projection: &P,
    conn: &mut C,
    table: &TableName,
) -> Result<(), ProjectionError> {
    let created = AssertUnwindSafe(projection.create(conn, table)).catch_unwind().await;
    created
        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
        .map_err(|source| ProjectionError::Create {
            table: table.clone(),
            source,
        })
}

fn panicked(payload: &(dyn std::any::Any + Send)) -> BoxError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    format!("the projection panicked: {message}").into()
}

pub(super) fn to_db(position: u64) -> Result<i64, ProjectionError> {
    i64::try_from(position).map_err(|_| ProjectionError::PositionOutOfRange(position))
}
