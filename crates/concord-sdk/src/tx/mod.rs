//! The two-phase-commit participant kit: the [`Participant`] trait, its HTTP face ([`router`]),
//! two implementations over a service's own database ([`postgres::PostgresParticipant`],
//! [`sqlite::SqliteParticipant`]) and [`recover`], which settles in-doubt transactions after a
//! restart by asking the coordinator.
//!
//! # The protocol, seen from a participant
//!
//! The coordinator posts `{url}/prepare` with `{"xid", "payload"}`. The participant does its work
//! and makes it durable without making it visible, then answers 200 (vote commit): from then on
//! it must be able to commit **or** abort, whatever happens to it, until told which. A refusal is
//! answered 409 (vote abort). Once the decision is logged the coordinator posts `{url}/commit` or
//! `{url}/abort` with `{"xid"}`, again and again until it gets a 2xx: both are idempotent, and an
//! abort of an xid the participant never prepared succeeds. A participant that restarts holding
//! prepared transactions asks `GET /v1/transactions/{xid}` for each ([`recover`]).
//!
//! | answer                               | status | the coordinator                                  |
//! |--------------------------------------|--------|--------------------------------------------------|
//! | [`Vote::Commit`]                     | 200    | counts a commit vote                             |
//! | [`Vote::Abort`]                      | 409    | aborts the transaction                           |
//! | a malformed body or xid              | 400    | aborts (any 4xx but 408/425/429 is a vote abort) |
//! | [`ParticipantError`], other variants | 5xx    | retries until its prepare timeout or, in phase 2, forever |
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use concord_sdk::tx::postgres::{PostgresParticipant, PreparedWork};
//! use concord_sdk::tx::{WorkError, Xid};
//! use serde_json::Value;
//! use sqlx::PgConnection;
//!
//! /// Debits the account named in the payload; the CHECK (balance >= 0) refuses an overdraft.
//! struct Debit;
//!
//! #[async_trait::async_trait]
//! impl PreparedWork for Debit {
//!     async fn run(&self, conn: &mut PgConnection, _xid: &Xid, payload: &Value) -> Result<(), WorkError> {
//!         let account = payload["account"].as_str().ok_or_else(|| WorkError::refused("no account"))?;
//!         let amount = payload["amount"].as_i64().ok_or_else(|| WorkError::refused("no amount"))?;
//!         let debited = sqlx::query("UPDATE accounts SET balance = balance - $2 WHERE id = $1")
//!             .bind(account)
//!             .bind(amount)
//!             .execute(conn)
//!             .await?; // a CHECK violation becomes WorkError::Refused: the vote is abort
//!         if debited.rows_affected() == 0 {
//!             return Err(WorkError::refused(format!("no account {account}")));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(pool: sqlx::PgPool, coordinator: concord_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let participant = PostgresParticipant::new(pool, "wallet", Debit)?;
//! participant.ensure_schema().await?;
//! // Settle what a previous run left prepared, then serve the coordinator.
//! let report = participant.recover(&coordinator).await?;
//! println!("recovery: {report:?}");
//! let auth = concord_sdk::tx::CoordinatorAuth::Token(std::env::var("TX_PARTICIPANT_TOKEN")?);
//! let app = axum::Router::new().nest("/2pc", concord_sdk::tx::router(Arc::new(participant), auth));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "axum")]
mod http;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use concord_api::ErrorCode;
use reqwest::StatusCode;
use serde_json::Value;

use crate::Client;

/// An xid that does not parse; it converts into [`ParticipantError::InvalidXid`].
pub use concord_kernel::InvalidXid;
/// A transaction id as the coordinator sends it: 1–128 letters, digits and `_.:-` (the
/// coordinator's are UUIDs). It is the kernel's type, which the coordinator uses too. Only a
/// valid one can be built, so it can be spliced into a PostgreSQL gid literal.
pub use concord_kernel::Xid;
#[cfg(feature = "axum")]
pub use http::{CoordinatorAuth, router};

/// An error of a participant's own code: the work, or the storage behind it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A participant's answer to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Vote {
    /// The work is durably prepared: the participant can still commit or abort it, whatever
    /// happens to it. Answered 200.
    Commit,
    /// The participant refuses; nothing is left prepared. Answered 409 with the reason.
    Abort {
        /// Why, for the coordinator's record and the people reading it.
        reason: String,
    },
}

impl Vote {
    /// A vote abort for `reason`.
    pub fn abort(reason: impl Into<String>) -> Self {
        Self::Abort { reason: reason.into() }
    }
}

/// Why a participant's work did not vote commit.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// The business change is refused (insufficient funds, out of stock, no such account): the
    /// participant votes abort (409) and the whole transaction aborts. Refuse only for reasons a
    /// retry would not change.
    #[error("refused: {0}")]
    Refused(String),
    /// The work failed for a reason a retry may fix (the database, a bug): answered 5xx, and the
    /// coordinator retries prepare until its timeout, after which it aborts.
    #[error(transparent)]
    Failed(BoxError),
}

impl WorkError {
    /// A refusal for `reason`.
    pub fn refused(reason: impl Into<String>) -> Self {
        Self::Refused(reason.into())
    }

    /// A failure caused by `error`.
    pub fn failed(error: impl Into<BoxError>) -> Self {
        Self::Failed(error.into())
    }
}

/// A constraint violation (CHECK, UNIQUE, FOREIGN KEY, NOT NULL) is the database refusing the
/// change, the same on every retry: it becomes [`WorkError::Refused`], so `?` on a statement
/// that trips a `CHECK (balance >= 0)` votes abort. Every other error is [`WorkError::Failed`].
impl From<sqlx::Error> for WorkError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.kind() != sqlx::error::ErrorKind::Other => Self::Refused(db.to_string()),
            _ => Self::Failed(error.into()),
        }
    }
}

/// What went wrong in a participant. [`ParticipantError::http_status`] says how [`router`]
/// answers it; every variant but [`ParticipantError::InvalidXid`] is a 5xx, which the
/// coordinator retries.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The xid is not 1–128 of `[A-Za-z0-9_.:-]`. Answered 400, which the coordinator takes as a
    /// vote abort: such an xid is not one it sends.
    #[error("invalid xid {0:?}: expected 1-128 letters, digits and _.:-")]
    InvalidXid(String),
    /// Another call for the same transaction is under way: a retried prepare racing the first
    /// one, or an abort arriving while prepare still runs. Answered 503; the coordinator's retry
    /// finds the first call finished.
    #[error("another call for transaction {0} is under way; retry")]
    Busy(Xid),
    /// The work failed without refusing ([`WorkError::Failed`]), or returned `Ok` from a
    /// transaction a failed statement had already doomed. Answered 500.
    #[error("the work failed: {0}")]
    Work(BoxError),
    /// The participant's records contradict the request: a commit of a transaction it aborted,
    /// or the reverse. Answered 500 and never acknowledged, so the transaction stays pending at
    /// the coordinator until an operator looks.
    #[error("inconsistent participant state: {0}")]
    Inconsistent(String),
    /// The participant cannot work as configured: a gid prefix outside its alphabet, PostgreSQL
    /// with `max_prepared_transactions = 0`, or a gid already used by another database of the
    /// same server (give each participant its own prefix). Answered 500.
    #[error("participant misconfigured: {0}")]
    Config(String),
    /// The database failed or is unreachable. Answered 503; the transaction's local state is
    /// unchanged or rolled back.
    #[error("participant database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// An xid that does not parse: [`ParticipantError::InvalidXid`] with what was given.
impl From<InvalidXid> for ParticipantError {
    fn from(InvalidXid(xid): InvalidXid) -> Self {
        Self::InvalidXid(xid)
    }
}

impl ParticipantError {
    /// The stable error code of the problem body [`router`] answers.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidXid(_) => ErrorCode::InvalidParameter,
            // Both clear up by themselves: the other call finishes, the database comes back.
            Self::Busy(_) | Self::Database(_) => ErrorCode::StoreUnavailable,
            Self::Work(_) | Self::Inconsistent(_) | Self::Config(_) => ErrorCode::Internal,
        }
    }

    /// The status [`router`] answers: 400 for an invalid xid, 503 or 500 (retried by the
    /// coordinator) for the rest.
    #[must_use]
    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// One side of two-phase commit, served over HTTP by [`router`]. Implementations keep their
/// state in durable storage, never only in memory: a participant that restarts between prepare
/// and phase 2 must still commit or abort what it prepared.
#[async_trait::async_trait]
pub trait Participant: Send + Sync {
    /// Does the work of `xid` and prepares it durably ([`Vote::Commit`]), or refuses
    /// ([`Vote::Abort`], leaving nothing prepared). A repeat of a prepare that voted commit votes
    /// commit again without redoing the work.
    async fn prepare(&self, xid: &Xid, payload: &Value) -> Result<Vote, ParticipantError>;

    /// Makes the prepared work of `xid` final. Idempotent: a repeat succeeds.
    async fn commit(&self, xid: &Xid) -> Result<(), ParticipantError>;

    /// Undoes the prepared work of `xid`. Idempotent, and an xid never prepared succeeds too.
    async fn abort(&self, xid: &Xid) -> Result<(), ParticipantError>;

    /// The transactions this participant has prepared and not yet committed or aborted, for
    /// [`recover`]. The default has none: a participant that keeps nothing across restarts.
    async fn in_doubt(&self) -> Result<Vec<Xid>, ParticipantError> {
        Ok(Vec::new())
    }
}

/// What [`recover`] did with each in-doubt transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct RecoveryReport {
    /// Committed: the coordinator decided commit.
    pub committed: Vec<Xid>,
    /// Aborted: the coordinator decided abort or has no record of the xid (presumed abort).
    pub aborted: Vec<Xid>,
    /// Left prepared: the coordinator has not decided yet and will send phase 2 itself.
    pub undecided: Vec<Xid>,
    /// Left prepared because asking or settling failed, with why; call [`recover`] again.
    pub failed: Vec<(Xid, String)>,
}

impl RecoveryReport {
    /// True when no transaction is left prepared.
    #[must_use]
    pub fn is_settled(&self) -> bool {
        self.undecided.is_empty() && self.failed.is_empty()
    }
}

/// Settles `participant`'s in-doubt transactions: for each one it asks the coordinator
/// (`GET /v1/transactions/{xid}`, a key with `tx:read`) and commits or aborts it accordingly.
/// Run it when the participant starts, and it may run again at any time: commit and abort are
/// idempotent, and an undecided transaction is left for the coordinator's phase 2.
///
/// # Errors
/// Only when the in-doubt transactions cannot be listed; a failure to settle one of them is
/// reported in [`RecoveryReport::failed`] and the others are still settled.
pub async fn recover(participant: &dyn Participant, coordinator: &Client) -> Result<RecoveryReport, ParticipantError> {
    let mut report = RecoveryReport::default();
    for xid in participant.in_doubt().await? {
        let outcome = match coordinator.transaction(xid.as_str()).await {
            Ok(tx) => tx.outcome,
            Err(e) => {
                report.failed.push((xid, format!("asking the coordinator: {e}")));
                continue;
            }
        };
        let settled = match outcome.as_deref() {
            Some("committed") => participant.commit(&xid).await.map(|()| &mut report.committed),
            Some("aborted") => participant.abort(&xid).await.map(|()| &mut report.aborted),
            None => Ok(&mut report.undecided),
            Some(other) => {
                report
                    .failed
                    .push((xid, format!("the coordinator answered outcome {other:?}")));
                continue;
            }
        };
        match settled {
            Ok(list) => list.push(xid),
            Err(e) => report.failed.push((xid, e.to_string())),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xid_is_1_to_128_of_its_alphabet() {
        for ok in [
            "0190c3b2-7e1a-7c3e-9a55-3b1f0e4d2a11",
            "a",
            "A.b_c:d-9",
            &"x".repeat(128),
        ] {
            assert_eq!(Xid::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "a'b", "a b", "a;b", "a%b", "é", &"x".repeat(129)] {
            assert!(
                matches!(Xid::parse(bad).map_err(ParticipantError::from), Err(ParticipantError::InvalidXid(ref x)) if x == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_an_invalid_xid_is_a_client_error() {
        let xid = Xid::parse("x").unwrap();
        let statuses = [
            (ParticipantError::InvalidXid(String::new()), 400),
            (ParticipantError::Busy(xid), 503),
            (ParticipantError::Database(sqlx::Error::PoolTimedOut), 503),
            (ParticipantError::Work("boom".into()), 500),
            (ParticipantError::Inconsistent(String::new()), 500),
            (ParticipantError::Config(String::new()), 500),
        ];
        for (error, status) in statuses {
            assert_eq!(error.http_status().as_u16(), status, "{error}");
        }
    }
}
