//! The outbox on SQLite: [`enqueue`] on the service's transaction, [`SqliteRelay`] to publish.
//!
//! SQLite has one writer at a time, so one relay serves one database: it holds a lease row
//! (`concord_outbox_lease`), renewed every round; a second relay waits until the lease expires
//! ([`RelayConfig::lease`]), which is also how long a restarted relay waits after a crash.

use super::relay::{Next, Row, next_step, publish_waves};
use super::{OutboxError, OutboxLimits, RelayConfig, RelayError, RelayRound, validate};
use crate::broker::{Broker, BrokerMessage};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row as _, SqliteConnection, SqlitePool};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

/// The tables, for a migration tool of the service's own.
pub const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS concord_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL,
    topic        TEXT NOT NULL,
    key          TEXT NOT NULL,
    payload      TEXT NOT NULL,
    headers      TEXT NOT NULL,
    enqueued_at  INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE TABLE IF NOT EXISTS concord_outbox_dead (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,
    topic       TEXT NOT NULL,
    key         TEXT NOT NULL,
    payload     TEXT NOT NULL,
    headers     TEXT NOT NULL,
    enqueued_at INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    last_error  TEXT NOT NULL,
    dead_at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS concord_outbox_lease (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    holder   TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Creates the outbox's tables if they are missing.
///
/// # Errors
/// The database's.
pub async fn ensure_schema(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(pool).await.map(drop)
}

/// Inserts `message` on the caller's transaction (`&mut *tx`); it is published only if that
/// transaction commits. Call [`SqliteOutbox::notify`] after the commit to wake an in-process
/// relay at once (else it finds the row at its next poll).
///
/// # Errors
/// [`OutboxError::Invalid`] (nothing written) or the database's error.
pub async fn enqueue(
    conn: &mut SqliteConnection,
    message: &BrokerMessage,
    limits: &OutboxLimits,
) -> Result<(), OutboxError> {
    let (payload, headers) = validate(message, limits)?;
    sqlx::query("INSERT INTO concord_outbox (id, topic, key, payload, headers, enqueued_at) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(message.id.to_string())
        .bind(&message.topic)
        .bind(&message.key)
        .bind(payload)
        .bind(headers)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Rows waiting in the outbox.
///
/// # Errors
/// The database's.
pub async fn pending(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM concord_outbox")
        .fetch_one(pool)
        .await
}

/// Rows in the dead-letter table.
///
/// # Errors
/// The database's.
pub async fn dead_letters(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM concord_outbox_dead")
        .fetch_one(pool)
        .await
}

/// An outbox handle that wakes the relay of the same process.
#[derive(Clone, Default)]
pub struct SqliteOutbox {
    signal: Arc<Notify>,
    limits: OutboxLimits,
}

impl SqliteOutbox {
    #[must_use]
    pub fn new(limits: OutboxLimits) -> Self {
        Self {
            signal: Arc::new(Notify::new()),
            limits,
        }
    }

    /// As [`enqueue`], with this handle's limits.
    ///
    /// # Errors
    /// As [`enqueue`].
    pub async fn enqueue(&self, conn: &mut SqliteConnection, message: &BrokerMessage) -> Result<(), OutboxError> {
        enqueue(conn, message, &self.limits).await
    }

    /// Commits `tx` and wakes the relay.
    ///
    /// # Errors
    /// The commit's.
    pub async fn commit(&self, tx: sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<(), sqlx::Error> {
        tx.commit().await?;
        self.notify();
        Ok(())
    }

    /// Wakes the relay: call it after committing a transaction that enqueued.
    pub fn notify(&self) {
        self.signal.notify_one();
    }

    /// A relay woken by this handle.
    #[must_use]
    pub fn relay(&self, pool: SqlitePool, broker: Arc<dyn Broker>, config: RelayConfig) -> SqliteRelay {
        SqliteRelay {
            pool,
            broker,
            config,
            signal: self.signal.clone(),
            holder: Uuid::new_v4().to_string(),
        }
    }
}

fn row(r: &SqliteRow) -> Result<Row, RelayError> {
    let seq: i64 = r.try_get("seq")?;
    let corrupt = |reason: String| RelayError::Corrupt { seq, reason };
    let id: String = r.try_get("id")?;
    let payload: String = r.try_get("payload")?;
    let headers: String = r.try_get("headers")?;
    let attempts: i64 = r.try_get("attempts")?;
    Ok(Row {
        seq,
        attempts: u32::try_from(attempts).unwrap_or(0),
        message: BrokerMessage {
            id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
            topic: r.try_get("topic")?,
            key: r.try_get("key")?,
            payload: serde_json::from_str(&payload).map_err(|e| corrupt(e.to_string()))?,
            headers: serde_json::from_str::<BTreeMap<String, String>>(&headers).map_err(|e| corrupt(e.to_string()))?,
        },
    })
}

/// Publishes the outbox of one SQLite database.
pub struct SqliteRelay {
    pool: SqlitePool,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
    signal: Arc<Notify>,
    holder: String,
}

impl SqliteRelay {
    /// A relay woken only by polling (for a relay in another process than the enqueuers).
    #[must_use]
    pub fn new(pool: SqlitePool, broker: Arc<dyn Broker>, config: RelayConfig) -> Self {
        SqliteOutbox::default().relay(pool, broker, config)
    }

    /// Takes or renews the lease; answers whether this relay holds it.
    async fn lease(&self) -> Result<(), RelayError> {
        let now = now_ms();
        let until = now + i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX / 2);
        let taken = sqlx::query(
            "INSERT INTO concord_outbox_lease (id, holder, until_ms) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET holder = ?1, until_ms = ?2 \
             WHERE concord_outbox_lease.holder = ?1 OR concord_outbox_lease.until_ms < ?3",
        )
        .bind(&self.holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if taken == 1 {
            return Ok(());
        }
        let until_ms: i64 = sqlx::query_scalar("SELECT until_ms FROM concord_outbox_lease WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Err(RelayError::LeaseHeld { until_ms })
    }

    /// One round: reads up to a batch of due rows, publishes them in per-key waves, then in one
    /// transaction removes the published rows and reschedules or dead-letters the failed ones.
    /// A crash before that transaction leaves every row in place for the next round.
    ///
    /// # Errors
    /// [`RelayError::LeaseHeld`] while another relay serves this database; the database's.
    pub async fn run_once(&self) -> Result<RelayRound, RelayError> {
        self.config.check()?;
        self.lease().await?;
        let mut round = RelayRound::default();
        let now = now_ms();
        let rows: Vec<(Row, i64)> = sqlx::query(
            "SELECT seq, id, topic, key, payload, headers, attempts, available_at FROM concord_outbox \
             ORDER BY seq LIMIT ?",
        )
        .bind(i64::try_from(self.config.batch_size).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((row(r)?, r.try_get::<i64, _>("available_at")?)))
        .collect::<Result<_, RelayError>>()?;
        let mut blocked = std::collections::HashSet::new();
        let mut go = Vec::with_capacity(rows.len());
        // A row not yet due holds back its key's later rows.
        for (r, due_at) in rows {
            if blocked.contains(&r.message.key) || due_at > now {
                blocked.insert(r.message.key.clone());
                round.held += 1;
            } else {
                go.push(r);
            }
        }
        round.claimed = go.len();
        if go.is_empty() {
            return Ok(round);
        }
        let published = publish_waves(self.broker.as_ref(), go).await;
        round.published = published.done.len();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in published.done.chunks(500) {
            let seqs = serde_json::to_string(chunk).map_err(|e| RelayError::Config(e.to_string()))?;
            sqlx::query("DELETE FROM concord_outbox WHERE seq IN (SELECT value FROM json_each(?))")
                .bind(seqs)
                .execute(&mut *tx)
                .await?;
        }
        for f in &published.failed {
            let error = f.error.to_string();
            let Next::Retry { attempts, wait } = next_step(f, &self.config, &mut round) else {
                sqlx::query(
                    "INSERT INTO concord_outbox_dead (seq, id, topic, key, payload, headers, enqueued_at, attempts, last_error, dead_at) \
                     SELECT seq, id, topic, key, payload, headers, enqueued_at, attempts + 1, ?2, ?3 FROM concord_outbox WHERE seq = ?1",
                )
                .bind(f.seq)
                .bind(&error)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM concord_outbox WHERE seq = ?")
                    .bind(f.seq)
                    .execute(&mut *tx)
                    .await?;
                continue;
            };
            let due = now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
            sqlx::query("UPDATE concord_outbox SET attempts = ?2, last_error = ?3, available_at = ?4 WHERE seq = ?1")
                .bind(f.seq)
                .bind(i64::from(attempts))
                .bind(&error)
                .bind(due)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        round.record("sqlite");
        Ok(round)
    }

    /// Runs rounds until `stop` turns true: at once while batches come full, else on the
    /// outbox handle's signal or every poll interval.
    ///
    /// # Errors
    /// An invalid configuration.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), RelayError> {
        self.config.check()?;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let pause = match self.run_once().await {
                Ok(r) if r.broker_down => Some(self.config.backoff_initial),
                Ok(r) if r.claimed + r.held >= self.config.batch_size && r.published + r.dead > 0 => None,
                Ok(_) => Some(self.config.poll_interval),
                Err(RelayError::LeaseHeld { .. }) => Some(self.config.poll_interval),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay round failed");
                    Some(self.config.backoff_initial)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = self.signal.notified() => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}
