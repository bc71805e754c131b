//! Read models on SQLite: [`SqliteStore`] for a [`Runner`](super::Runner) whose projections
//! implement [`Projection<SqliteConnection>`](super::Projection).
//!
//! Every transaction of the runner begins with `BEGIN IMMEDIATE`, so it holds the write lock
//! before it reads the checkpoint: runners, rebuilds and the service's other writers queue on
//! the pool's busy timeout instead of failing with `SQLITE_BUSY` halfway. Open the database in
//! WAL mode so that readers of the view never wait for a batch or a swap.

use sqlx::{AssertSqlSafe, Row as _, SqliteConnection, SqlitePool};

use super::TableName;
use super::runner::store::{Row, Store};

/// The checkpoint table's DDL, for services that run their own migrations.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_projection_checkpoints (
    name       TEXT PRIMARY KEY,
    position   INTEGER NOT NULL CHECK (position >= 0),
    table_name TEXT NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 1),
    version    INTEGER NOT NULL CHECK (version >= 0),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID";

/// The read-model database of a runner on SQLite: a pool of the service's own database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// A store over `pool`.
    #[must_use]
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn row(row: &sqlx::sqlite::SqliteRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        position: row.try_get(0)?,
        table_name: row.try_get(1)?,
        generation: row.try_get(2)?,
        version: row.try_get(3)?,
    })
}

const SELECT: &str =
    "SELECT position, table_name, generation, version FROM concord_projection_checkpoints WHERE name = ?";

#[async_trait::async_trait]
impl Store for SqliteStore {
    type Conn = SqliteConnection;
    type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

    async fn ensure_schema(&self) -> Result<(), sqlx::Error> {
        sqlx::query(SCHEMA).execute(&self.pool).await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.rollback().await
    }

    async fn read_committed(&self, key: &str) -> Result<Option<Row>, sqlx::Error> {
        let found = sqlx::query(SELECT).bind(key).fetch_optional(&self.pool).await?;
        found.as_ref().map(row).transpose()
    }

    async fn read(conn: &mut SqliteConnection, key: &str, _lock: bool) -> Result<Option<Row>, sqlx::Error> {
        // The transaction began with BEGIN IMMEDIATE: it holds the write lock already.
        let found = sqlx::query(SELECT).bind(key).fetch_optional(conn).await?;
        found.as_ref().map(row).transpose()
    }

    async fn insert(conn: &mut SqliteConnection, key: &str, row: &Row) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO concord_projection_checkpoints (name, position, table_name, generation, version) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(key)
        .bind(row.position)
        .bind(&row.table_name)
        .bind(row.generation)
        .bind(row.version)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update(conn: &mut SqliteConnection, key: &str, row: &Row) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE concord_projection_checkpoints SET position = ?, table_name = ?, generation = ?, version = ?, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE name = ?",
        )
        .bind(row.position)
        .bind(&row.table_name)
        .bind(row.generation)
        .bind(row.version)
        .bind(key)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn delete(conn: &mut SqliteConnection, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM concord_projection_checkpoints WHERE name = ?")
            .bind(key)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn replace_view(conn: &mut SqliteConnection, view: &TableName, table: &TableName) -> Result<(), sqlx::Error> {
        let drop = format!("DROP VIEW IF EXISTS {}", view.quoted());
        sqlx::query(AssertSqlSafe(drop)).execute(&mut *conn).await?;
        let create = format!("CREATE VIEW {} AS SELECT * FROM {}", view.quoted(), table.quoted());
        sqlx::query(AssertSqlSafe(create)).execute(conn).await?;
        Ok(())
    }

    async fn drop_table(conn: &mut SqliteConnection, table: &TableName) -> Result<(), sqlx::Error> {
        let drop = format!("DROP TABLE IF EXISTS {}", table.quoted());
        sqlx::query(AssertSqlSafe(drop)).execute(conn).await?;
        Ok(())
    }
}
