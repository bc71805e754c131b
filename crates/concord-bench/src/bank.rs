//! A small participant service for the two-phase-commit benchmark and tests: accounts with
//! balances in their own PostgreSQL database, changed by prepared transactions through the sdk's
//! [`PostgresParticipant`]. Each change also writes a ledger row keyed by the xid, so a check can
//! tell exactly which transactions took effect here.

use async_trait::async_trait;
use concord_sdk::tx::postgres::{PostgresParticipant, PreparedWork};
use concord_sdk::tx::{Participant, ParticipantError, Vote, WorkError, Xid};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Row as _};
use std::sync::Arc;
use std::time::Duration;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL CHECK (balance >= 0));
CREATE TABLE IF NOT EXISTS ledger (xid TEXT NOT NULL, account TEXT NOT NULL, delta BIGINT NOT NULL, PRIMARY KEY (xid, account))";

/// Moves `{"account": ID, "delta": N}`; an overdraft or an unknown account refuses (votes abort).
/// `"refuse": true` refuses outright; `"sleep_ms": N` holds the prepare that long (for timeouts).
struct Transfer;

#[async_trait]
impl PreparedWork for Transfer {
    async fn run(&self, conn: &mut PgConnection, xid: &Xid, payload: &Value) -> Result<(), WorkError> {
        let account = payload["account"].as_str().unwrap_or_default();
        let delta = payload["delta"].as_i64().unwrap_or_default();
        if payload["refuse"].as_bool() == Some(true) {
            return Err(WorkError::Refused("refused by request".into()));
        }
        if let Some(ms) = payload["sleep_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        }
        // One statement: the balance and the ledger row. An overdraft breaks the CHECK, which
        // the sdk turns into a refusal.
        let changed = sqlx::query(
            "WITH moved AS (UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING id) \
             INSERT INTO ledger (xid, account, delta) SELECT $3, id, $2 FROM moved",
        )
        .bind(account)
        .bind(delta)
        .bind(xid.as_str())
        .execute(&mut *conn)
        .await?;
        if changed.rows_affected() == 0 {
            return Err(WorkError::Refused(format!("no account {account}")));
        }
        Ok(())
    }
}

/// Answers the first `refuse` commit messages with 503 (without committing), to hold a
/// transaction between its decision and its acknowledgement in crash tests.
struct StubbornCommit {
    inner: Arc<PostgresParticipant>,
    refuse: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Participant for StubbornCommit {
    async fn prepare(&self, xid: &Xid, payload: &Value) -> Result<Vote, ParticipantError> {
        self.inner.prepare(xid, payload).await
    }
    async fn commit(&self, xid: &Xid) -> Result<(), ParticipantError> {
        use std::sync::atomic::Ordering;
        let refused = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(ParticipantError::Busy(xid.clone()));
        }
        self.inner.commit(xid).await
    }
    async fn abort(&self, xid: &Xid) -> Result<(), ParticipantError> {
        self.inner.abort(xid).await
    }
    async fn in_doubt(&self) -> Result<Vec<Xid>, ParticipantError> {
        self.inner.in_doubt().await
    }
}

/// A running bank: its database and the URL of its participant endpoints.
pub struct Bank {
    pub url: String,
    pub pool: PgPool,
    pub participant: Arc<PostgresParticipant>,
    server: tokio::task::JoinHandle<()>,
}

impl Bank {
    /// Opens (creating its tables) the bank on `database_url`, gives each listed account its
    /// balance, and serves the participant on `listen` (`127.0.0.1:0` for any port). The first
    /// `refuse_commits` commit messages are answered 503, to hold phase 2 open in crash tests.
    /// `auth` says who may call it (the coordinator's token).
    ///
    /// # Errors
    /// The database, or the address.
    pub async fn start(
        database_url: &str,
        gid_prefix: &str,
        accounts: &[(&str, i64)],
        listen: &str,
        refuse_commits: u32,
        auth: concord_sdk::tx::CoordinatorAuth,
    ) -> anyhow::Result<Self> {
        // A prepared transaction keeps its row locks until phase 2; a bounded wait for them turns
        // a distributed deadlock (two transfers waiting on each other across the two banks) into
        // a refusal instead of a hang.
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET lock_timeout = '500ms'").execute(conn).await?;
                    Ok(())
                })
            })
            .connect(database_url)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        for (id, balance) in accounts {
            // Not ON CONFLICT: that waits for a prepared transaction holding the row, which after
            // a restart may be exactly the one this participant is about to recover.
            sqlx::query("INSERT INTO accounts (id, balance) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(id)
                .bind(balance)
                .execute(&pool)
                .await?;
        }
        let participant = Arc::new(PostgresParticipant::new(pool.clone(), gid_prefix, Transfer)?);
        participant.ensure_schema().await?;
        let served: Arc<dyn Participant> = if refuse_commits == 0 {
            participant.clone()
        } else {
            Arc::new(StubbornCommit {
                inner: participant.clone(),
                refuse: std::sync::atomic::AtomicU32::new(refuse_commits),
            })
        };
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = concord_sdk::tx::router(served, auth);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            pool,
            participant,
            server,
        })
    }

    /// The sum of all balances.
    ///
    /// # Errors
    /// The database.
    pub async fn total(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(SUM(balance), 0)::BIGINT FROM accounts")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Whether the transaction took effect here.
    ///
    /// # Errors
    /// The database.
    pub async fn applied(&self, xid: &str) -> anyhow::Result<bool> {
        let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM ledger WHERE xid = $1)")
            .bind(xid)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Transactions of this bank's database still prepared.
    ///
    /// # Errors
    /// The database.
    pub async fn prepared(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_xacts WHERE database = current_database()")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Stops serving and closes the pool.
    pub async fn stop(self) {
        self.server.abort();
        self.pool.close().await;
    }
}
