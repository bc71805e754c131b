//! The participant on PostgreSQL prepared transactions: prepare runs the work in a transaction
//! ended by `PREPARE TRANSACTION`, so the prepared work survives the participant's crash (and
//! PostgreSQL's restart) with its row locks held, until `COMMIT PREPARED` or `ROLLBACK PREPARED`.
//!
//! # Setup
//!
//! - The server needs `max_prepared_transactions` > 0 (at least the number of transactions
//!   prepared at once across its databases); [`PostgresParticipant::ensure_schema`] checks it.
//! - Each participant names its transactions `{gid_prefix}:{xid}`. Gids are unique per server,
//!   not per database: participants sharing a PostgreSQL server need distinct prefixes, and
//!   [`PostgresParticipant::in_doubt`] lists only its own database's gids with its own prefix.
//! - [`PostgresParticipant::ensure_schema`] creates `concord_tx_outcome` ([`SCHEMA`]), the
//!   participant's memory of finished transactions (below).
//!
//! # Why a table besides `pg_prepared_xacts`
//!
//! Once committed or rolled back, a prepared transaction leaves no trace in
//! `pg_prepared_xacts`, so a late prepare (a retry the coordinator gave up on, delayed in the
//! network) would do the work again and leave it prepared with nobody to finish it. So the
//! prepared transaction itself inserts `(gid, 'committed')`, which becomes visible only if it
//! commits, and an abort inserts `(gid, 'aborted')`: a late prepare finds either and does not
//! redo the work. Every prepare and abort of a gid first takes a transaction-level advisory lock
//! on it without waiting; a prepared transaction keeps holding it, so a second call for the same
//! xid while one runs answers [`ParticipantError::Busy`] (503, retried by the coordinator) instead
//! of racing. Rows are never deleted by the protocol; [`PostgresParticipant::purge_outcomes`]
//! removes old ones.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool, Row as _};

use super::{Participant, ParticipantError, RecoveryReport, Vote, WorkError, Xid};
use crate::Client;

/// The DDL of the participant's table, for services that run their own migrations.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_tx_outcome (
    gid         TEXT PRIMARY KEY,
    outcome     TEXT NOT NULL CHECK (outcome IN ('committed', 'aborted')),
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

const MAX_PREFIX_CHARS: usize = 64;

/// Takes the gid's lock without waiting, and reads what is known of the gid. The two-key form
/// keeps these locks apart from the application's single-key advisory locks.
const CLAIM: &str = "SELECT pg_try_advisory_xact_lock(hashtext('concord_tx'), hashtext($1)), \
                     (SELECT outcome FROM concord_tx_outcome WHERE gid = $1)";
/// [`CLAIM`], and when the gid is free and unrecorded, the `committed` row the prepared
/// transaction carries, in one round trip. The claim is evaluated once (a CTE that is read twice
/// is computed once), so the row is inserted only under the lock this statement took.
const CLAIM_AND_RECORD: &str = "WITH c AS (SELECT pg_try_advisory_xact_lock(hashtext('concord_tx'), hashtext($1)) AS locked, \
                                       (SELECT outcome FROM concord_tx_outcome WHERE gid = $1) AS outcome), \
                                ins AS (INSERT INTO concord_tx_outcome (gid, outcome) \
                                        SELECT $1, 'committed' FROM c WHERE c.locked AND c.outcome IS NULL) \
                                SELECT locked, outcome FROM c";
const IS_PREPARED: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database())";

// SQLSTATEs the participant tells apart.
const UNDEFINED_OBJECT: &str = "42704";
const DUPLICATE_OBJECT: &str = "42710";
const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
const FEATURE_NOT_SUPPORTED: &str = "0A000";

/// The business change a [`PostgresParticipant`] prepares.
#[async_trait::async_trait]
pub trait PreparedWork: Send + Sync {
    /// Makes the change of `xid` on `conn`, inside the transaction the participant opened (do not
    /// commit or roll it back; `conn.begin()` opens a savepoint). `Ok` votes commit: the
    /// participant then runs `PREPARE TRANSACTION`. [`WorkError::Refused`] votes abort, and a
    /// constraint violation returned with `?` is one (see [`WorkError`]'s `From<sqlx::Error>`).
    /// The locks the change takes are held until phase 2, so take few and keep them short;
    /// a `SET LOCAL lock_timeout` bounds the wait for rows another prepared transaction holds.
    async fn run(&self, conn: &mut PgConnection, xid: &Xid, payload: &Value) -> Result<(), WorkError>;
}

/// A [`Participant`] whose work is a PostgreSQL transaction left prepared between the phases.
pub struct PostgresParticipant {
    pool: PgPool,
    /// `{gid_prefix}:`.
    prefix: String,
    work: Box<dyn PreparedWork>,
}

impl fmt::Debug for PostgresParticipant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresParticipant")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What a claim on a gid found.
enum Claim {
    /// Another session holds the gid's lock: a call for it runs, or it is prepared.
    Taken,
    /// The lock is this transaction's; what the table knows of the gid.
    Free(Option<Recorded>),
}

enum Recorded {
    Committed,
    Aborted,
}

impl PostgresParticipant {
    /// A participant running `work` on `pool`, naming its prepared transactions
    /// `{gid_prefix}:{xid}`. The prefix must be unique among the participants sharing the
    /// PostgreSQL server.
    ///
    /// # Errors
    /// [`ParticipantError::Config`] when `gid_prefix` is not 1–64 of `[A-Za-z0-9_.-]`.
    pub fn new(pool: PgPool, gid_prefix: &str, work: impl PreparedWork + 'static) -> Result<Self, ParticipantError> {
        let valid = (1..=MAX_PREFIX_CHARS).contains(&gid_prefix.len())
            && gid_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(ParticipantError::Config(format!(
                "gid prefix {gid_prefix:?}: expected 1-64 letters, digits and _.-"
            )));
        }
        Ok(Self {
            pool,
            prefix: format!("{gid_prefix}:"),
            work: Box::new(work),
        })
    }

    /// The gid of `xid`'s prepared transaction, as `pg_prepared_xacts` shows it.
    #[must_use]
    pub fn gid(&self, xid: &Xid) -> String {
        // Both parts are checked to hold no quote, so the gid can be spliced into a literal.
        format!("{}{xid}", self.prefix)
    }

    /// Checks that the server allows prepared transactions and creates `concord_tx_outcome`
    /// unless it exists. Services starting together may all call it.
    ///
    /// # Errors
    /// [`ParticipantError::Config`] when `max_prepared_transactions` is 0,
    /// [`ParticipantError::Database`] when a statement fails.
    pub async fn ensure_schema(&self) -> Result<(), ParticipantError> {
        let mut conn = self.pool.acquire().await?;
        let max: String = sqlx::query_scalar("SELECT current_setting('max_prepared_transactions')")
            .fetch_one(&mut *conn)
            .await?;
        if max.trim() == "0" {
            return Err(ParticipantError::Config(
                "PostgreSQL has max_prepared_transactions = 0; set it above 0 and restart the server".into(),
            ));
        }
        let mut tx = conn.begin().await?;
        // A bare CREATE TABLE IF NOT EXISTS can fail when two sessions race.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('concord_tx'), hashtext('concord_tx_outcome'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await?;
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
    /// does the work again.
    ///
    /// # Errors
    /// [`ParticipantError::Database`].
    pub async fn purge_outcomes(&self, older_than: Duration) -> Result<u64, ParticipantError> {
        let done = sqlx::query("DELETE FROM concord_tx_outcome WHERE recorded_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait::async_trait]
impl Participant for PostgresParticipant {
    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn prepare(&self, xid: &Xid, payload: &Value) -> Result<Vote, ParticipantError> {
        let gid = self.gid(xid);
        let mut conn = self.pool.acquire().await?;
        // sqlx's transaction rather than a bare `BEGIN`: sqlx then knows the connection is in a
        // transaction, so a `conn.begin()` in the work opens a savepoint instead of a second
        // `BEGIN` whose commit would end ours before `PREPARE`; and a call cut off half-way
        // rolls back before the connection is reused. `PREPARE TRANSACTION` below ends the
        // transaction on the server and is followed by an empty one, which sqlx's commit ends.
        let mut tx = conn.begin().await?;
        match claim_with(&mut tx, &gid, CLAIM_AND_RECORD).await? {
            // The `committed` row is in, visible only if the transaction commits.
            Claim::Free(None) => {}
            Claim::Taken => {
                tx.rollback().await?;
                // Prepared already (a repeated prepare) or still preparing.
                return if is_prepared(&mut conn, &gid).await? {
                    Ok(Vote::Commit)
                } else {
                    Err(ParticipantError::Busy(xid.clone()))
                };
            }
            Claim::Free(Some(Recorded::Committed)) => {
                tx.rollback().await?;
                return Ok(Vote::Commit);
            }
            Claim::Free(Some(Recorded::Aborted)) => {
                tx.rollback().await?;
                return Ok(Vote::abort(format!("transaction {xid} was aborted already")));
            }
        }
        match self.work.run(&mut tx, xid, payload).await {
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
        // One round trip. PREPARE of a transaction a failed statement doomed does not fail, it
        // rolls back: the count tells.
        let prepared: i64 = sqlx::raw_sql(AssertSqlSafe(format!(
            "PREPARE TRANSACTION '{gid}'; BEGIN; \
             SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}' AND database = current_database()"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| prepare_error(e, &gid))?
        .try_get(0)?;
        tx.commit().await?;
        if prepared == 0 {
            return Err(ParticipantError::Work(
                "a statement of the work failed but the work returned Ok; PostgreSQL rolled the transaction back"
                    .into(),
            ));
        }
        Ok(Vote::Commit)
    }

    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn commit(&self, xid: &Xid) -> Result<(), ParticipantError> {
        let gid = self.gid(xid);
        let mut conn = self.pool.acquire().await?;
        match sqlx::raw_sql(AssertSqlSafe(format!("COMMIT PREPARED '{gid}'")))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if has_sqlstate(&e, UNDEFINED_OBJECT) => {}
            Err(e) => return Err(phase_two_error(e, xid)),
        }
        // Not prepared: a repeat of a commit that went through, which made the prepared
        // transaction's `committed` row visible.
        let recorded: Option<String> = sqlx::query_scalar("SELECT outcome FROM concord_tx_outcome WHERE gid = $1")
            .bind(&gid)
            .fetch_optional(&mut *conn)
            .await?;
        match recorded.as_deref() {
            Some("committed") => Ok(()),
            Some(_) => Err(ParticipantError::Inconsistent(format!(
                "commit of transaction {xid}, which this participant aborted"
            ))),
            None => {
                // Purged, or finished by hand: nothing is left to commit either way.
                tracing::warn!("commit of a transaction neither prepared nor recorded; taken as committed");
                Ok(())
            }
        }
    }

    #[tracing::instrument(skip_all, fields(xid = %xid))]
    async fn abort(&self, xid: &Xid) -> Result<(), ParticipantError> {
        let gid = self.gid(xid);
        let mut conn = self.pool.acquire().await?;
        match sqlx::raw_sql(AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => {}
            Err(e) if has_sqlstate(&e, UNDEFINED_OBJECT) => {}
            Err(e) => return Err(phase_two_error(e, xid)),
        }
        // The tombstone that makes a prepare still on its way vote abort, taken under the gid's
        // lock: a prepare running now holds it, and is waited out by the coordinator's retry.
        let mut tx = conn.begin().await?;
        match claim(&mut tx, &gid).await? {
            Claim::Taken => {
                tx.rollback().await?;
                Err(ParticipantError::Busy(xid.clone()))
            }
            Claim::Free(Some(Recorded::Aborted)) => {
                tx.rollback().await?;
                Ok(())
            }
            Claim::Free(Some(Recorded::Committed)) => {
                tx.rollback().await?;
                Err(ParticipantError::Inconsistent(format!(
                    "abort of transaction {xid}, which this participant committed"
                )))
            }
            Claim::Free(None) => {
                sqlx::query("INSERT INTO concord_tx_outcome (gid, outcome) VALUES ($1, 'aborted')")
                    .bind(&gid)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    async fn in_doubt(&self) -> Result<Vec<Xid>, ParticipantError> {
        let gids: Vec<String> = sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts \
             WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared",
        )
        .bind(&self.prefix)
        .fetch_all(&self.pool)
        .await?;
        Ok(gids
            .iter()
            .filter_map(|gid| Xid::parse(&gid[self.prefix.len()..]).ok())
            .collect())
    }
}

async fn claim(conn: &mut PgConnection, gid: &str) -> Result<Claim, ParticipantError> {
    claim_with(conn, gid, CLAIM).await
}

/// Runs a claim statement (its columns: the lock taken, the recorded outcome) and reads it.
async fn claim_with(conn: &mut PgConnection, gid: &str, statement: &'static str) -> Result<Claim, ParticipantError> {
    let row = sqlx::query(statement).bind(gid).fetch_one(conn).await?;
    if !row.try_get::<bool, _>(0)? {
        return Ok(Claim::Taken);
    }
    match row.try_get::<Option<String>, _>(1)?.as_deref() {
        None => Ok(Claim::Free(None)),
        Some("committed") => Ok(Claim::Free(Some(Recorded::Committed))),
        Some("aborted") => Ok(Claim::Free(Some(Recorded::Aborted))),
        Some(other) => Err(ParticipantError::Inconsistent(format!(
            "concord_tx_outcome holds outcome {other:?} for {gid}"
        ))),
    }
}

async fn is_prepared(conn: &mut PgConnection, gid: &str) -> Result<bool, ParticipantError> {
    Ok(sqlx::query_scalar(IS_PREPARED).bind(gid).fetch_one(conn).await?)
}

fn has_sqlstate(error: &sqlx::Error, code: &str) -> bool {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|c| c == code)
}

fn prepare_error(error: sqlx::Error, gid: &str) -> ParticipantError {
    if has_sqlstate(&error, DUPLICATE_OBJECT) {
        ParticipantError::Config(format!(
            "gid {gid} is in use by another database of this server; give each participant its own gid prefix"
        ))
    } else if has_sqlstate(&error, OBJECT_NOT_IN_PREREQUISITE_STATE) {
        ParticipantError::Config(format!("PREPARE TRANSACTION refused: {error}"))
    } else {
        error.into()
    }
}

fn phase_two_error(error: sqlx::Error, xid: &Xid) -> ParticipantError {
    if has_sqlstate(&error, OBJECT_NOT_IN_PREREQUISITE_STATE) {
        // "prepared transaction with identifier ... is busy": another session is finishing it.
        ParticipantError::Busy(xid.clone())
    } else if has_sqlstate(&error, FEATURE_NOT_SUPPORTED) {
        ParticipantError::Config(format!(
            "transaction {xid} was prepared in another database of this server: {error}"
        ))
    } else {
        error.into()
    }
}
