//! The participant on SQLite, for the embedded shape. SQLite has no prepared transactions, so
//! the work is split in two: at prepare, [`ReservationWork::reserve`] holds what the change needs
//! (stock set aside, an amount put on hold) and a reservation record is written, in one local
//! transaction; at commit [`ReservationWork::apply`] makes the held change final, at abort
//! [`ReservationWork::release`] gives it back, each in one local transaction with the record's
//! new state. The record is what makes every step idempotent and what [`recover`](super::recover)
//! lists after a restart.
//!
//! # Table
//!
//! [`SqliteParticipant::ensure_schema`] creates `concord_tx_prepared` ([`SCHEMA`]): one row per
//! xid, `prepared` until phase 2 marks it `committed` or `aborted`. An abort of an xid never
//! prepared writes an `aborted` row, so a prepare arriving after it (delayed in the network)
//! votes abort instead of holding stock nobody will release. Rows are never deleted by the
//! protocol; [`SqliteParticipant::purge_finished`] removes old finished ones.
//!
//! # Durability
//!
//! A vote commit is only as durable as the local commit behind it: keep SQLite's default
//! `synchronous = FULL` (in WAL mode, `NORMAL` may lose the last commits on power loss, though
//! not on a crash of the process). Give the pool a busy timeout: every step begins with
//! `BEGIN IMMEDIATE`, so concurrent calls queue for the write lock.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use sqlx::{Row as _, SqliteConnection, SqlitePool};

use super::{BoxError, Participant, ParticipantError, RecoveryReport, Vote, WorkError, Xid};
use crate::Client;

/// The DDL of the participant's table, for services that run their own migrations.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_tx_prepared (
    xid         TEXT PRIMARY KEY,
    payload     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS concord_tx_prepared_in_doubt ON concord_tx_prepared (created_at)
    WHERE state = 'prepared'";

/// The business change of a [`SqliteParticipant`], in two steps. Each runs inside the local
/// transaction the participant opened with `BEGIN IMMEDIATE` (do not commit or roll it back),
/// together with the write of the reservation record.
#[async_trait::async_trait]
pub trait ReservationWork: Send + Sync {
    /// At prepare: holds what the change needs, so that [`ReservationWork::apply`] cannot fail
    /// for lack of it later. `Ok` votes commit; [`WorkError::Refused`] (or a constraint
    /// violation returned with `?`) votes abort.
    async fn reserve(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), WorkError>;

    /// At commit: makes the reserved change final. `payload` is the one given to `reserve`.
    /// The decision is taken, so this must not refuse; an error is answered 500 and the
    /// coordinator retries.
    async fn apply(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), BoxError>;

    /// At abort of a reserved transaction: gives back what `reserve` held. Like `apply`, an
    /// error is answered 500 and retried.
    async fn release(&self, conn: &mut SqliteConnection, xid: &Xid, payload: &Value) -> Result<(), BoxError>;
}

/// A [`Participant`] keeping each transaction's reservation in the service's SQLite database.
pub struct SqliteParticipant {
    pool: SqlitePool,
    work: Box<dyn ReservationWork>,
}

impl fmt::Debug for SqliteParticipant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteParticipant").finish_non_exhaustive()
    }
}

/// A reservation record's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Prepared,
    Committed,
    Aborted,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }
}

impl SqliteParticipant {
    /// A participant running `work` on `pool`.
    pub fn new(pool: SqlitePool, work: impl ReservationWork + 'static) -> Self {
        Self {
            pool,
            work: Box::new(work),
        }
    }

    /// Creates `concord_tx_prepared` unless it exists.
    ///
    /// # Errors
    /// [`ParticipantError::Database`] when a statement fails.
    pub async fn ensure_schema(&self) -> Result<(), ParticipantError> {
        sqlx::raw_sql(SCHEMA).execute(&self.pool).await?;
        Ok(())
    }

    /// Settles this participant's in-doubt transactions with the coordinator's decisions; see
    /// [`super::recover`].
    ///
    /// # Errors
    /// When they cannot be listed.
    pub async fn recover(&self, coordinator: &Client) -> Result<RecoveryReport, ParticipantError> {
        super::recover(self, coordinator).await
    }

    /// Deletes the records of transactions finished more than `older_than` ago. Purge only
    /// what no prepare can still arrive for (hours, not seconds): a prepare that finds no record
    /// reserves again.
    ///
    /// # Errors
    /// [`ParticipantError::Database`].
    pub async fn purge_finished(&self, older_than: Duration) -> Result<u64, ParticipantError> {
        let done = sqlx::query(
            "DELETE FROM concord_tx_prepared WHERE state <> 'prepared' \
             AND finished_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)",
        )
        .bind(format!("-{:.3} seconds", older_than.as_secs_f64()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait::async_trait]
impl Participant for SqliteParticipant {
    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn prepare(&self, xid: &Xid, payload: &Value) -> Result<Vote, ParticipantError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        match record(&mut tx, xid).await? {
            None => {}
            Some((State::Prepared | State::Committed, _)) => {
                tx.rollback().await?;
                return Ok(Vote::Commit);
            }
            Some((State::Aborted, _)) => {
                tx.rollback().await?;
                return Ok(Vote::abort(format!("transaction {xid} was aborted already")));
            }
        }
        match self.work.reserve(&mut tx, xid, payload).await {
            Ok(()) => {}
            Err(WorkError::Refused(reason)) => {
                tx.rollback().await?;
                return Ok(Vote::Abort { reason });
            }
            Err(WorkError::Failed(e)) => {
                tx.rollback().await?;
                return Err(ParticipantError::Work(e));
            }
        }
        sqlx::query("INSERT INTO concord_tx_prepared (xid, payload, state) VALUES (?, ?, 'prepared')")
            .bind(xid.as_str())
            .bind(payload.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Vote::Commit)
    }

    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn commit(&self, xid: &Xid) -> Result<(), ParticipantError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        match record(&mut tx, xid).await? {
            Some((State::Prepared, payload)) => {
                self.work
                    .apply(&mut tx, xid, &payload)
                    .await
                    .map_err(ParticipantError::Work)?;
                finish(&mut tx, xid, State::Committed).await?;
                tx.commit().await?;
                Ok(())
            }
            Some((State::Committed, _)) => Ok(()),
            Some((State::Aborted, _)) => Err(ParticipantError::Inconsistent(format!(
                "commit of transaction {xid}, which this participant aborted"
            ))),
            None => {
                // Purged, or removed by hand: nothing is left to commit either way.
                tracing::warn!("commit of a transaction with no reservation record; taken as committed");
                Ok(())
            }
        }
    }

    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn abort(&self, xid: &Xid) -> Result<(), ParticipantError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        match record(&mut tx, xid).await? {
            Some((State::Prepared, payload)) => {
                self.work
                    .release(&mut tx, xid, &payload)
                    .await
                    .map_err(ParticipantError::Work)?;
                finish(&mut tx, xid, State::Aborted).await?;
            }
            Some((State::Aborted, _)) => return Ok(()),
            Some((State::Committed, _)) => {
                return Err(ParticipantError::Inconsistent(format!(
                    "abort of transaction {xid}, which this participant committed"
                )));
            }
            None => {
                // Never prepared: the tombstone makes a late prepare vote abort.
                sqlx::query(
                    "INSERT INTO concord_tx_prepared (xid, payload, state, finished_at) \
                     VALUES (?, 'null', 'aborted', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                )
                .bind(xid.as_str())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn in_doubt(&self) -> Result<Vec<Xid>, ParticipantError> {
        let xids: Vec<String> =
            sqlx::query_scalar("SELECT xid FROM concord_tx_prepared WHERE state = 'prepared' ORDER BY created_at")
                .fetch_all(&self.pool)
                .await?;
        Ok(xids.into_iter().filter_map(|xid| Xid::parse(xid).ok()).collect())
    }
}

/// The record of `xid`: its state and the payload prepare was given.
async fn record(conn: &mut SqliteConnection, xid: &Xid) -> Result<Option<(State, Value)>, ParticipantError> {
    let Some(row) = sqlx::query("SELECT state, payload FROM concord_tx_prepared WHERE xid = ?")
        .bind(xid.as_str())
        .fetch_optional(conn)
        .await?
    else {
        return Ok(None);
    };
    let state: String = row.try_get(0)?;
    let state = [State::Prepared, State::Committed, State::Aborted]
        .into_iter()
        .find(|s| s.as_str() == state)
        .ok_or_else(|| {
            ParticipantError::Inconsistent(format!("concord_tx_prepared holds state {state:?} for {xid}"))
        })?;
    let payload = serde_json::from_str(&row.try_get::<String, _>(1)?).map_err(|e| {
        ParticipantError::Inconsistent(format!(
            "concord_tx_prepared holds a payload for {xid} that is not JSON: {e}"
        ))
    })?;
    Ok(Some((state, payload)))
}

async fn finish(conn: &mut SqliteConnection, xid: &Xid, state: State) -> Result<(), ParticipantError> {
    sqlx::query(
        "UPDATE concord_tx_prepared SET state = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE xid = ? AND state = 'prepared'",
    )
    .bind(state.as_str())
    .bind(xid.as_str())
    .execute(conn)
    .await?;
    Ok(())
}
