//! The saga participant barrier: a participant records every saga call it receives in its own
//! database, inside the transaction of the business change, so that a retried call, a
//! compensation with no action before it, and an action delayed past its compensation are each
//! recognised and never change the business data twice.
//!
//! # How a participant uses it
//!
//! 1. Parse the call's headers with [`BarrierKey::from_headers`] (answer 400 on error).
//! 2. Begin a write transaction. On SQLite begin it with `BEGIN IMMEDIATE`
//!    (`pool.begin_with("BEGIN IMMEDIATE")`) and give the connections a busy timeout (sqlx's
//!    default is 5 s): the write lock is then taken before anything is read, so concurrent
//!    barrier calls queue instead of failing with `SQLITE_BUSY`. On PostgreSQL use the default
//!    `READ COMMITTED`; at `REPEATABLE READ` or `SERIALIZABLE` a call racing another one for the
//!    same key fails with a serialization error (SQLSTATE 40001), which must be answered 5xx.
//! 3. Call [`sqlite::enter`] or [`postgres::enter`] on that transaction **before** touching any
//!    business row. The barrier's insert is what serializes an action and its compensation;
//!    taking it first also means the two never wait on each other's business rows (no deadlock).
//! 4. Only on [`Enter::Run`] run the business change on the same transaction (and, for an
//!    action, [`sqlite::save_output`] / [`postgres::save_output`] the body you answer), then
//!    commit. Commit on [`Enter::EmptyCompensation`] too: the committed row is what refuses the
//!    action if it arrives later. When the business change fails, roll back: no barrier row
//!    stays, so the orchestrator's retry runs again.
//!
//! # Answering the orchestrator
//!
//! The orchestrator treats 2xx as success (the JSON body is the step's output), 4xx other than
//! 408/425/429 as a business refusal (it compensates), and 5xx as "retry".
//!
//! | [`Enter`]              | action                                                 | compensation       |
//! |------------------------|--------------------------------------------------------|--------------------|
//! | `Run`                  | 2xx with the output (business refusal: roll back, 409) | 2xx                |
//! | `Duplicate { output }` | 2xx with `output`, the first delivery's body           | 2xx                |
//! | `EmptyCompensation`    | not returned for an action                             | 2xx, after commit  |
//! | `Refused`              | 409: the step was already compensated                  | not returned       |
//! | `Err(e)`               | [`BarrierError::http_status`]: 400 or 500              | same               |
//!
//! # Table
//!
//! [`sqlite::ensure_schema`] and [`postgres::ensure_schema`] create `concord_barrier`
//! ([`sqlite::SCHEMA`], [`postgres::SCHEMA`] hold the DDL for a migration tool). One row per
//! `(saga_id, step, op)`; `origin` says which call inserted it. An action row inserted by a
//! compensation (`op = 'action'`, `origin = 'compensation'`) marks an empty compensation and
//! refuses the action forever. Rows are never deleted by this module: deleting one reopens the
//! door to a hanging action, so purge only sagas finished long before any delayed call could
//! still arrive.
//!
//! # Example
//!
//! ```no_run
//! use concord_sdk::barrier::{self, BarrierKey, BarrierOp, Enter};
//! use serde_json::{Value, json};
//!
//! /// `POST /reservations`, the action of the saga step `reserve`.
//! async fn reserve(
//!     pool: &sqlx::SqlitePool,
//!     headers: &reqwest::header::HeaderMap,
//!     item: &str,
//! ) -> Result<(u16, Value), Box<dyn std::error::Error>> {
//!     let key = BarrierKey::from_headers(headers)?;
//!     if key.op() != BarrierOp::Action {
//!         return Ok((400, json!({ "error": "this route is the action" })));
//!     }
//!     let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
//!     match barrier::sqlite::enter(&mut tx, &key).await? {
//!         Enter::Run => {}
//!         Enter::Duplicate { output } => return Ok((200, output.unwrap_or(Value::Null))),
//!         Enter::Refused => return Ok((409, json!({ "error": "already compensated" }))),
//!         Enter::EmptyCompensation => unreachable!("answered only to compensations"),
//!     }
//!     let taken = sqlx::query("UPDATE stock SET qty = qty - 1 WHERE item = ? AND qty > 0")
//!         .bind(item)
//!         .execute(&mut *tx)
//!         .await?;
//!     if taken.rows_affected() == 0 {
//!         // Dropping the transaction rolls back the barrier row too.
//!         return Ok((409, json!({ "error": "out of stock" })));
//!     }
//!     let output = json!({ "item": item, "reserved": 1 });
//!     barrier::sqlite::save_output(&mut tx, &key, &output).await?;
//!     tx.commit().await?;
//!     Ok((200, output))
//! }
//! ```

use std::fmt;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

/// The header that names the call: `{saga_id}:{step}:{action|compensation}`.
pub use crate::idempotency::IDEMPOTENCY_KEY_HEADER;
/// A saga's id, as [`BarrierKey::saga_id`] gives it: the kernel's type, which the orchestrator
/// uses too.
pub use concord_kernel::SagaId;
/// The header that names the saga; it must agree with the idempotency key.
pub const SAGA_ID_HEADER: &str = "concord-saga-id";

const MAX_STEP_CHARS: usize = 64;

/// What went wrong at the barrier. Each variant says how a participant answers it;
/// [`BarrierError::http_status`] gives that status.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    /// The idempotency key is not `{saga_id}:{step}:{action|compensation}` with a saga id of 1–128
    /// letters, digits and `-_.:` and a step of 1–64 letters, digits and `-_`. Answer 400: the
    /// call is not one the orchestrator sends.
    #[error("invalid saga idempotency key: {0}")]
    InvalidKey(&'static str),
    /// A header every saga call carries is missing. Answer 400. Both headers are required so that
    /// an ordinary `Idempotency-Key` from a non-saga client is never taken for a saga call.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is not visible ASCII. Answer 400.
    #[error("header {0} is not visible ASCII")]
    InvalidHeader(&'static str),
    /// `Concord-Saga-Id` names another saga than the idempotency key. Answer 400.
    #[error("header concord-saga-id {header:?} does not match the idempotency key's saga id {key:?}")]
    SagaIdMismatch {
        /// The `Concord-Saga-Id` header.
        header: String,
        /// The saga id in the idempotency key.
        key: String,
    },
    /// The barrier was called on a connection with no open transaction: its row would commit
    /// apart from the business change. A bug in the participant; answer 500.
    #[error("the barrier must run inside the business change's transaction")]
    NotInTransaction,
    /// `save_output` found no row this call inserted: it was called without entering, or after
    /// [`Enter::Refused`]. A bug in the participant; answer 500.
    #[error("no barrier row of this call to save the output on; save_output follows Enter::Run")]
    NotEntered,
    /// The barrier table holds a row this module never writes (edited or deleted by hand). Answer
    /// 500 and have an operator look.
    #[error("inconsistent barrier table: {0}")]
    Inconsistent(String),
    /// The database failed, or a concurrent transaction made this one fail (a serialization
    /// failure or deadlock on PostgreSQL, `SQLITE_BUSY` on SQLite). Roll back and answer 5xx:
    /// the orchestrator retries.
    #[error("barrier database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl BarrierError {
    /// The status to answer the orchestrator with: 400 for a call that is not a valid saga call,
    /// 500 (retried by the orchestrator) for everything else.
    #[must_use]
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidKey(_) | Self::MissingHeader(_) | Self::InvalidHeader(_) | Self::SagaIdMismatch { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::NotInTransaction | Self::NotEntered | Self::Inconsistent(_) | Self::Database(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// Which side of a saga step a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierOp {
    /// The step's forward call.
    Action,
    /// The call that undoes the action.
    Compensation,
}

impl BarrierOp {
    /// The name used in the idempotency key and in the table: `action` or `compensation`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "action" => Some(Self::Action),
            "compensation" => Some(Self::Compensation),
            _ => None,
        }
    }
}

impl fmt::Display for BarrierOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One saga call: saga id, step and side. Only a valid key can be built.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BarrierKey {
    saga_id: SagaId,
    step: String,
    op: BarrierOp,
}

impl BarrierKey {
    /// A key from its parts.
    ///
    /// # Errors
    /// [`BarrierError::InvalidKey`] when the saga id or the step is not valid.
    pub fn new(saga_id: impl Into<String>, step: impl Into<String>, op: BarrierOp) -> Result<Self, BarrierError> {
        let saga_id = SagaId::parse(saga_id)
            .map_err(|_| BarrierError::InvalidKey("the saga id must be 1-128 letters, digits and -_.:"))?;
        let step = step.into();
        validate_step(&step)?;
        Ok(Self { saga_id, step, op })
    }

    /// Parses an `Idempotency-Key` header value, `{saga_id}:{step}:{action|compensation}`. The
    /// saga id may itself contain colons, the step may not: the key splits on its last two.
    ///
    /// # Errors
    /// [`BarrierError::InvalidKey`] when the value is not of that form.
    pub fn parse(idempotency_key: &str) -> Result<Self, BarrierError> {
        let (rest, op) = idempotency_key.rsplit_once(':').ok_or(BarrierError::InvalidKey(
            "expected {saga_id}:{step}:{action|compensation}",
        ))?;
        let op = BarrierOp::from_name(op).ok_or(BarrierError::InvalidKey(
            "the last part must be `action` or `compensation`",
        ))?;
        let (saga_id, step) = rest.rsplit_once(':').ok_or(BarrierError::InvalidKey(
            "expected {saga_id}:{step}:{action|compensation}",
        ))?;
        Self::new(saga_id, step, op)
    }

    /// Reads the key from a saga call's headers: `Idempotency-Key`, checked against
    /// `Concord-Saga-Id`. Takes the `http` crate's header map, which axum and hyper use too.
    ///
    /// # Errors
    /// [`BarrierError::MissingHeader`], [`BarrierError::InvalidHeader`],
    /// [`BarrierError::InvalidKey`] or [`BarrierError::SagaIdMismatch`]: all answered 400.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, BarrierError> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .ok_or(BarrierError::MissingHeader(name))?
                .to_str()
                .map_err(|_| BarrierError::InvalidHeader(name))
        };
        let key = Self::parse(header(IDEMPOTENCY_KEY_HEADER)?)?;
        let saga_id = header(SAGA_ID_HEADER)?;
        if key.saga_id != saga_id {
            return Err(BarrierError::SagaIdMismatch {
                header: saga_id.to_owned(),
                key: key.saga_id.to_string(),
            });
        }
        Ok(key)
    }

    /// The saga's id.
    #[must_use]
    pub fn saga_id(&self) -> &SagaId {
        &self.saga_id
    }

    /// The step's name in the saga definition.
    #[must_use]
    pub fn step(&self) -> &str {
        &self.step
    }

    /// Whether the call is the action or the compensation.
    #[must_use]
    pub fn op(&self) -> BarrierOp {
        self.op
    }
}

/// The header form, `{saga_id}:{step}:{op}`, which [`BarrierKey::parse`] reads back.
impl fmt::Display for BarrierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.saga_id, self.step, self.op)
    }
}

fn validate_step(step: &str) -> Result<(), BarrierError> {
    let valid = (1..=MAX_STEP_CHARS).contains(&step.len())
        && step
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(BarrierError::InvalidKey("the step must be 1-64 letters, digits and -_"))
    }
}

/// What the participant does with a call, decided by [`sqlite::enter`] or [`postgres::enter`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Enter {
    /// First delivery: run the business change on the same transaction, then commit. The row
    /// the barrier inserted commits or rolls back with it.
    Run,
    /// This call already took effect in a committed transaction: do nothing and answer 2xx.
    /// `output` is what [`sqlite::save_output`] / [`postgres::save_output`] stored for the
    /// first delivery, if anything, so a retried action answers the same body.
    Duplicate {
        /// The first delivery's saved output.
        output: Option<serde_json::Value>,
    },
    /// A compensation whose action never took effect (it failed, timed out on the orchestrator's
    /// side, or has not arrived yet). Do not run the business compensation; commit, so the action
    /// is refused if it arrives later, and answer 2xx.
    EmptyCompensation,
    /// An action arriving after its compensation (a delayed "hanging" request). Do not run it;
    /// answer 409. Nothing was written.
    Refused,
}

/// The statements the barrier needs, written once per database; the decisions built on them
/// ([`enter`], [`save_output`]) are shared.
trait BarrierRows: sqlx::Connection {
    /// Inserts the `(key, op)` row unless it exists; answers whether it inserted.
    async fn insert_row(&mut self, key: &BarrierKey, op: BarrierOp, origin: BarrierOp) -> Result<bool, sqlx::Error>;
    /// The `origin` and `output` of the `(key, op)` row.
    async fn find_row(
        &mut self,
        key: &BarrierKey,
        op: BarrierOp,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error>;
    /// Sets the output of the row the call `key` inserted itself; answers whether there was one.
    async fn set_output(&mut self, key: &BarrierKey, output: &str) -> Result<bool, sqlx::Error>;
}

async fn enter<C: BarrierRows>(conn: &mut C, key: &BarrierKey) -> Result<Enter, BarrierError> {
    if !conn.is_in_transaction() {
        return Err(BarrierError::NotInTransaction);
    }
    match key.op {
        BarrierOp::Action => {
            // On PostgreSQL this insert waits for an uncommitted compensation (or duplicate) of
            // the same key and then sees its outcome; on SQLite the write lock orders them.
            if conn.insert_row(key, BarrierOp::Action, BarrierOp::Action).await? {
                return Ok(Enter::Run);
            }
            let (origin, output) = existing(conn, key, BarrierOp::Action).await?;
            Ok(match origin {
                BarrierOp::Action => Enter::Duplicate { output },
                BarrierOp::Compensation => Enter::Refused,
            })
        }
        BarrierOp::Compensation => {
            if !conn
                .insert_row(key, BarrierOp::Compensation, BarrierOp::Compensation)
                .await?
            {
                let (_, output) = existing(conn, key, BarrierOp::Compensation).await?;
                return Ok(Enter::Duplicate { output });
            }
            // Claim the action's row too: if the action never committed, this row, origin
            // `compensation`, is what refuses it later.
            let action_never_ran = conn.insert_row(key, BarrierOp::Action, BarrierOp::Compensation).await?;
            Ok(if action_never_ran {
                Enter::EmptyCompensation
            } else {
                Enter::Run
            })
        }
    }
}

async fn existing<C: BarrierRows>(
    conn: &mut C,
    key: &BarrierKey,
    op: BarrierOp,
) -> Result<(BarrierOp, Option<serde_json::Value>), BarrierError> {
    let (origin, output) = conn.find_row(key, op).await?.ok_or_else(|| {
        // The insert conflicted, so a committed row exists: absent means it was deleted since.
        BarrierError::Inconsistent(format!("the {op} row of {key} vanished after a conflicting insert"))
    })?;
    let origin = BarrierOp::from_name(&origin)
        .ok_or_else(|| BarrierError::Inconsistent(format!("the {op} row of {key} has origin {origin:?}")))?;
    let output = output
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| {
            BarrierError::Inconsistent(format!("the {op} row of {key} has an output that is not JSON: {e}"))
        })?;
    Ok((origin, output))
}

async fn save_output<C: BarrierRows>(
    conn: &mut C,
    key: &BarrierKey,
    output: &serde_json::Value,
) -> Result<(), BarrierError> {
    if !conn.is_in_transaction() {
        return Err(BarrierError::NotInTransaction);
    }
    if conn.set_output(key, &output.to_string()).await? {
        Ok(())
    } else {
        Err(BarrierError::NotEntered)
    }
}

/// The barrier on SQLite. Begin the transaction with `BEGIN IMMEDIATE` (see the module docs).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    use super::{BarrierError, BarrierKey, BarrierOp, BarrierRows, Enter};
    use sqlx::{Row as _, SqliteConnection};

    /// The table's DDL, for participants that run their own migrations.
    pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_barrier (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('action', 'compensation')),
    origin     TEXT NOT NULL CHECK (origin IN ('action', 'compensation')),
    output     TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, op),
    CHECK (op = 'action' OR origin = 'compensation')
) WITHOUT ROWID";

    /// Creates the `concord_barrier` table when it does not exist.
    ///
    /// # Errors
    /// [`BarrierError::Database`] when the statement fails.
    pub async fn ensure_schema(conn: &mut SqliteConnection) -> Result<(), BarrierError> {
        sqlx::query(SCHEMA).execute(conn).await?;
        Ok(())
    }

    /// Records the call `key` in the caller's open transaction and says what to do with it.
    /// Call it first in the transaction, before any business row is touched.
    ///
    /// # Errors
    /// [`BarrierError::NotInTransaction`] outside a transaction, [`BarrierError::Database`] when
    /// a statement fails (roll back, answer 5xx), [`BarrierError::Inconsistent`] when the table
    /// was edited by hand.
    pub async fn enter(conn: &mut SqliteConnection, key: &BarrierKey) -> Result<Enter, BarrierError> {
        super::enter(conn, key).await
    }

    /// Stores the answer of a call that got [`Enter::Run`], in the same transaction, so that a
    /// duplicate gets it back in [`Enter::Duplicate`].
    ///
    /// # Errors
    /// [`BarrierError::NotEntered`] when the call has no row of its own (it was never entered, or
    /// it was [`Enter::Refused`]), [`BarrierError::NotInTransaction`], [`BarrierError::Database`].
    pub async fn save_output(
        conn: &mut SqliteConnection,
        key: &BarrierKey,
        output: &serde_json::Value,
    ) -> Result<(), BarrierError> {
        super::save_output(conn, key, output).await
    }

    impl BarrierRows for SqliteConnection {
        async fn insert_row(
            &mut self,
            key: &BarrierKey,
            op: BarrierOp,
            origin: BarrierOp,
        ) -> Result<bool, sqlx::Error> {
            let done = sqlx::query(
                "INSERT INTO concord_barrier (saga_id, step, op, origin) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (saga_id, step, op) DO NOTHING",
            )
            .bind(key.saga_id().as_str())
            .bind(key.step())
            .bind(op.as_str())
            .bind(origin.as_str())
            .execute(self)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn find_row(
            &mut self,
            key: &BarrierKey,
            op: BarrierOp,
        ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
            let row =
                sqlx::query("SELECT origin, output FROM concord_barrier WHERE saga_id = ? AND step = ? AND op = ?")
                    .bind(key.saga_id().as_str())
                    .bind(key.step())
                    .bind(op.as_str())
                    .fetch_optional(self)
                    .await?;
            row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
        }

        async fn set_output(&mut self, key: &BarrierKey, output: &str) -> Result<bool, sqlx::Error> {
            let done = sqlx::query(
                "UPDATE concord_barrier SET output = ? WHERE saga_id = ? AND step = ? AND op = ? AND origin = op",
            )
            .bind(output)
            .bind(key.saga_id().as_str())
            .bind(key.step())
            .bind(key.op().as_str())
            .execute(self)
            .await?;
            Ok(done.rows_affected() == 1)
        }
    }
}

/// The barrier on PostgreSQL. Use `READ COMMITTED`, the default (see the module docs).
#[cfg(feature = "postgres")]
pub mod postgres {
    use super::{BarrierError, BarrierKey, BarrierOp, BarrierRows, Enter};
    use sqlx::{Connection as _, PgConnection, Row as _};

    /// The table's DDL, for participants that run their own migrations.
    pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_barrier (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('action', 'compensation')),
    origin     TEXT NOT NULL CHECK (origin IN ('action', 'compensation')),
    output     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, op),
    CHECK (op = 'action' OR origin = 'compensation')
)";

    /// Creates the `concord_barrier` table when it does not exist. Services starting together
    /// may all call it: an advisory lock makes them create it once (a bare
    /// `CREATE TABLE IF NOT EXISTS` can fail when two sessions race).
    ///
    /// # Errors
    /// [`BarrierError::Database`] when a statement fails.
    pub async fn ensure_schema(conn: &mut PgConnection) -> Result<(), BarrierError> {
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('concord_barrier'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the call `key` in the caller's open transaction and says what to do with it.
    /// Call it first in the transaction, before any business row is touched. A concurrent call
    /// for the same saga step makes it wait until that call's transaction ends.
    ///
    /// # Errors
    /// [`BarrierError::NotInTransaction`] outside a transaction, [`BarrierError::Database`] when
    /// a statement fails (roll back, answer 5xx), [`BarrierError::Inconsistent`] when the table
    /// was edited by hand.
    pub async fn enter(conn: &mut PgConnection, key: &BarrierKey) -> Result<Enter, BarrierError> {
        super::enter(conn, key).await
    }

    /// Stores the answer of a call that got [`Enter::Run`], in the same transaction, so that a
    /// duplicate gets it back in [`Enter::Duplicate`].
    ///
    /// # Errors
    /// [`BarrierError::NotEntered`] when the call has no row of its own (it was never entered, or
    /// it was [`Enter::Refused`]), [`BarrierError::NotInTransaction`], [`BarrierError::Database`].
    pub async fn save_output(
        conn: &mut PgConnection,
        key: &BarrierKey,
        output: &serde_json::Value,
    ) -> Result<(), BarrierError> {
        super::save_output(conn, key, output).await
    }

    impl BarrierRows for PgConnection {
        async fn insert_row(
            &mut self,
            key: &BarrierKey,
            op: BarrierOp,
            origin: BarrierOp,
        ) -> Result<bool, sqlx::Error> {
            let done = sqlx::query(
                "INSERT INTO concord_barrier (saga_id, step, op, origin) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (saga_id, step, op) DO NOTHING",
            )
            .bind(key.saga_id().as_str())
            .bind(key.step())
            .bind(op.as_str())
            .bind(origin.as_str())
            .execute(self)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn find_row(
            &mut self,
            key: &BarrierKey,
            op: BarrierOp,
        ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
            let row =
                sqlx::query("SELECT origin, output FROM concord_barrier WHERE saga_id = $1 AND step = $2 AND op = $3")
                    .bind(key.saga_id().as_str())
                    .bind(key.step())
                    .bind(op.as_str())
                    .fetch_optional(self)
                    .await?;
            row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
        }

        async fn set_output(&mut self, key: &BarrierKey, output: &str) -> Result<bool, sqlx::Error> {
            let done = sqlx::query(
                "UPDATE concord_barrier SET output = $1 \
                 WHERE saga_id = $2 AND step = $3 AND op = $4 AND origin = op",
            )
            .bind(output)
            .bind(key.saga_id().as_str())
            .bind(key.step())
            .bind(key.op().as_str())
            .execute(self)
            .await?;
            Ok(done.rows_affected() == 1)
        }
    }
}
