//! The inbox: an idempotent consumer. A consumer records each message id it handles in its own
//! database, in the same local transaction as the handler's effects, so a message delivered
//! twice (a relay that crashed before removing it, a broker redelivery after a lost ack) has its
//! effect once.
//!
//! [`postgres::begin`] / [`sqlite::begin`] start the transaction and claim the message id; they
//! answer `None` when the id is already recorded: acknowledge the delivery and do nothing else.
//! [`postgres::handle`] / [`sqlite::handle`] wrap that around a closure. On PostgreSQL two
//! concurrent deliveries of one message serialize on the id's row; on SQLite the transaction is
//! `BEGIN IMMEDIATE`.
//!
//! Rows are kept until [`postgres::prune`] / [`sqlite::prune`] removes those older than a
//! retention the service picks: longer than any redelivery can be late (the relay's longest
//! backoff plus the broker's retention of unacknowledged messages).
//!
//! # Example
//!
//! ```no_run
//! use concord_sdk::broker::BrokerConsumer;
//! use concord_sdk::inbox;
//!
//! # async fn run(pool: sqlx::PgPool, mut consumer: Box<dyn BrokerConsumer>) -> Result<(), Box<dyn std::error::Error>> {
//! inbox::postgres::ensure_schema(&pool).await?;
//! loop {
//!     for d in consumer.fetch(100, std::time::Duration::from_secs(1)).await? {
//!         if let Some(mut tx) = inbox::postgres::begin(&pool, "billing", d.message.id).await? {
//!             sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
//!                 .bind(&d.message.key)
//!                 .execute(&mut *tx)
//!                 .await?;
//!             tx.commit().await?;
//!         }
//!         consumer.ack(&d).await?;
//!     }
//! }
//! # }
//! ```

use futures::future::BoxFuture;

/// What happened to a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<T> {
    /// First delivery: the handler ran and its transaction committed.
    Processed(T),
    /// The message was handled before; the handler did not run.
    Duplicate,
}

/// Failures of [`postgres::handle`] / [`sqlite::handle`]; in both cases nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError<E> {
    #[error("inbox database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("handler failed: {0}")]
    Handler(E),
}

fn check_consumer(consumer: &str) -> Result<(), sqlx::Error> {
    if consumer.is_empty() || consumer.len() > 200 {
        return Err(sqlx::Error::Protocol("an inbox consumer name is 1 to 200 bytes".into()));
    }
    Ok(())
}

/// The inbox on PostgreSQL.
#[cfg(feature = "postgres")]
pub mod postgres {
    use super::{BoxFuture, Handled, InboxError, check_consumer};
    use sqlx::{PgConnection, PgPool, Postgres, Transaction};
    use std::collections::HashSet;
    use uuid::Uuid;

    /// The table, for a migration tool of the service's own.
    pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_inbox (
        consumer    TEXT NOT NULL,
        message_id  UUID NOT NULL,
        received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, message_id)
    );
    CREATE INDEX IF NOT EXISTS concord_inbox_received ON concord_inbox (received_at);";

    /// Creates the table if it is missing.
    ///
    /// # Errors
    /// The database's.
    pub async fn ensure_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(3214, 2)")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Begins a transaction that has claimed `message_id` for `consumer`, or `None` when the
    /// message was handled before. Do the handler's work on it, then commit; dropping it
    /// releases the claim.
    ///
    /// # Errors
    /// The database's.
    pub async fn begin(
        pool: &PgPool,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<Option<Transaction<'static, Postgres>>, sqlx::Error> {
        check_consumer(consumer)?;
        let mut tx = pool.begin().await?;
        let fresh =
            sqlx::query("INSERT INTO concord_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(consumer)
                .bind(message_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if fresh == 1 {
            Ok(Some(tx))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }

    /// Claims several message ids in one transaction: answers it with the ids claimed now (the
    /// others were handled before). Apply the claimed ones on it, then commit.
    ///
    /// # Errors
    /// The database's.
    pub async fn begin_batch(
        pool: &PgPool,
        consumer: &str,
        message_ids: &[Uuid],
    ) -> Result<(Transaction<'static, Postgres>, HashSet<Uuid>), sqlx::Error> {
        check_consumer(consumer)?;
        let mut tx = pool.begin().await?;
        let fresh: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO concord_inbox (consumer, message_id) SELECT $1, UNNEST($2::uuid[]) \
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(consumer)
        .bind(message_ids)
        .fetch_all(&mut *tx)
        .await?;
        Ok((tx, fresh.into_iter().collect()))
    }

    /// Runs `handler` on the claimed transaction and commits, unless the message is a duplicate.
    ///
    /// # Errors
    /// The database's, or the handler's (then nothing is committed).
    pub async fn handle<T, E, F>(
        pool: &PgPool,
        consumer: &str,
        message_id: Uuid,
        handler: F,
    ) -> Result<Handled<T>, InboxError<E>>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let Some(mut tx) = begin(pool, consumer, message_id).await? else {
            return Ok(Handled::Duplicate);
        };
        let out = handler(&mut tx).await.map_err(InboxError::Handler)?;
        tx.commit().await?;
        Ok(Handled::Processed(out))
    }

    /// Deletes up to `max_rows` records received before `before`; returns how many.
    ///
    /// # Errors
    /// The database's.
    pub async fn prune(
        pool: &PgPool,
        before: chrono::DateTime<chrono::Utc>,
        max_rows: i64,
    ) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "DELETE FROM concord_inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM concord_inbox WHERE received_at < $1 LIMIT $2))",
        )
        .bind(before)
        .bind(max_rows)
        .execute(pool)
        .await?
        .rows_affected())
    }
}

/// The inbox on SQLite.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    use super::{BoxFuture, Handled, InboxError, check_consumer};
    use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
    use std::collections::HashSet;
    use uuid::Uuid;

    /// The table, for a migration tool of the service's own.
    pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_inbox (
        consumer    TEXT NOT NULL,
        message_id  TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (consumer, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS concord_inbox_received ON concord_inbox (received_at);";

    /// Creates the table if it is missing.
    ///
    /// # Errors
    /// The database's.
    pub async fn ensure_schema(pool: &SqlitePool) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(SCHEMA).execute(pool).await.map(drop)
    }

    /// As [`super::postgres::begin`], with a `BEGIN IMMEDIATE` transaction.
    ///
    /// # Errors
    /// The database's.
    pub async fn begin(
        pool: &SqlitePool,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<Option<Transaction<'static, Sqlite>>, sqlx::Error> {
        check_consumer(consumer)?;
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let fresh = sqlx::query(
            "INSERT INTO concord_inbox (consumer, message_id, received_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(message_id.to_string())
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if fresh == 1 {
            Ok(Some(tx))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }

    /// As [`super::postgres::begin_batch`].
    ///
    /// # Errors
    /// The database's.
    pub async fn begin_batch(
        pool: &SqlitePool,
        consumer: &str,
        message_ids: &[Uuid],
    ) -> Result<(Transaction<'static, Sqlite>, HashSet<Uuid>), sqlx::Error> {
        check_consumer(consumer)?;
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<String> = message_ids.iter().map(Uuid::to_string).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        let fresh: Vec<String> = sqlx::query_scalar(
            "INSERT INTO concord_inbox (consumer, message_id, received_at) \
             SELECT ?1, value, ?2 FROM json_each(?3) WHERE true ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(consumer)
        .bind(chrono::Utc::now().timestamp_millis())
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        Ok((tx, fresh.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect()))
    }

    /// As [`super::postgres::handle`].
    ///
    /// # Errors
    /// The database's, or the handler's (then nothing is committed).
    pub async fn handle<T, E, F>(
        pool: &SqlitePool,
        consumer: &str,
        message_id: Uuid,
        handler: F,
    ) -> Result<Handled<T>, InboxError<E>>
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let Some(mut tx) = begin(pool, consumer, message_id).await? else {
            return Ok(Handled::Duplicate);
        };
        let out = handler(&mut tx).await.map_err(InboxError::Handler)?;
        tx.commit().await?;
        Ok(Handled::Processed(out))
    }

    /// Deletes up to `max_rows` records received before `before`; returns how many.
    ///
    /// # Errors
    /// The database's.
    pub async fn prune(
        pool: &SqlitePool,
        before: chrono::DateTime<chrono::Utc>,
        max_rows: i64,
    ) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "DELETE FROM concord_inbox WHERE rowid IN (SELECT rowid FROM concord_inbox WHERE received_at < ? LIMIT ?)",
        )
        .bind(before.timestamp_millis())
        .bind(max_rows)
        .execute(pool)
        .await?
        .rows_affected())
    }
}
