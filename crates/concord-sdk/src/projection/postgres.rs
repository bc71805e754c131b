//! Read models on PostgreSQL: [`PostgresStore`] for a [`Runner`](super::Runner) whose
//! projections implement [`Projection<PgConnection>`](super::Projection).
//!
//! The runner's transactions run at `READ COMMITTED`, the default, and lock the checkpoint row
//! with `SELECT ... FOR UPDATE` before they touch the read model: batches of runners on several
//! nodes, and a rebuild's swap, take turns on that row. A rebuild locks its own row first and the
//! live row second, the only order used, so they cannot deadlock. The read model and the
//! checkpoint table live in the connection's current schema (`search_path`).

use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool, Row as _};

use super::TableName;
use super::runner::store::{Row, Store};

/// The checkpoint table's DDL, for services that run their own migrations.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS concord_projection_checkpoints (
    name       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL CHECK (position >= 0),
    table_name TEXT NOT NULL,
    generation BIGINT NOT NULL CHECK (generation >= 1),
    version    BIGINT NOT NULL CHECK (version >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// The read-model database of a runner on PostgreSQL: a pool of the service's own database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A store over `pool`.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn row(row: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        position: row.try_get(0)?,
        table_name: row.try_get(1)?,
        generation: row.try_get(2)?,
        version: row.try_get(3)?,
    })
}

const SELECT: &str =
    "SELECT position, table_name, generation, version FROM concord_projection_checkpoints WHERE name = $1";
const SELECT_FOR_UPDATE: &str =
    "SELECT position, table_name, generation, version FROM concord_projection_checkpoints WHERE name = $1 FOR UPDATE";

#[async_trait::async_trait]
impl Store for PostgresStore {
    type Conn = PgConnection;
    type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

    async fn ensure_schema(&self) -> Result<(), sqlx::Error> {
        // Services starting together may all get here: a bare CREATE TABLE IF NOT EXISTS can
        // fail when two sessions race, so they take turns on an advisory lock.
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('concord_projection_checkpoints'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool.begin().await
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

    async fn read(conn: &mut PgConnection, key: &str, lock: bool) -> Result<Option<Row>, sqlx::Error> {
        let statement = if lock { SELECT_FOR_UPDATE } else { SELECT };
        let found = sqlx::query(statement).bind(key).fetch_optional(conn).await?;
        found.as_ref().map(row).transpose()
    }

    async fn insert(conn: &mut PgConnection, key: &str, row: &Row) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO concord_projection_checkpoints (name, position, table_name, generation, version) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
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

    async fn update(conn: &mut PgConnection, key: &str, row: &Row) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE concord_projection_checkpoints SET position = $1, table_name = $2, generation = $3, \
             version = $4, updated_at = now() WHERE name = $5",
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

    async fn delete(conn: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM concord_projection_checkpoints WHERE name = $1")
            .bind(key)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn replace_view(conn: &mut PgConnection, view: &TableName, table: &TableName) -> Result<(), sqlx::Error> {
        let drop = format!("DROP VIEW IF EXISTS {}", view.quoted());
        sqlx::query(AssertSqlSafe(drop)).execute(&mut *conn).await?;
        let create = format!("CREATE VIEW {} AS SELECT * FROM {}", view.quoted(), table.quoted());
        sqlx::query(AssertSqlSafe(create)).execute(conn).await?;
        Ok(())
    }

    async fn drop_table(conn: &mut PgConnection, table: &TableName) -> Result<(), sqlx::Error> {
        let drop = format!("DROP TABLE IF EXISTS {}", table.quoted());
        sqlx::query(AssertSqlSafe(drop)).execute(conn).await?;
        Ok(())
    }
}
