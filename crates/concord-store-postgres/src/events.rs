//! The event store and consumer-group checkpoints on PostgreSQL.
//!
//! # Why a reader never misses an event that commits late
//!
//! A sequence or identity column hands out positions at INSERT time, but transactions commit in
//! any order: a reader can see position 11 committed while 10 is still in flight, move its
//! cursor past 10, and never see it. Here a writing transaction takes the single row of
//! `concord_log_head` (a row lock) before it numbers its events after the position the row holds,
//! and keeps the lock until it commits. A second writer, on this node or any other, blocks on the
//! row until the first has committed, and PostgreSQL makes a transaction visible before it
//! releases its row locks. So positions become visible strictly in order, with no holes: whoever
//! sees position P can already see every position below P. A transaction that rolls back returns
//! the row as it was, so the next writer takes the same positions.
//!
//! # Why the lock costs one statement, not a transaction
//!
//! The lock is the only serialization point, so it is held as briefly as the database allows. A
//! batch is planned (expected versions, replays of stored event ids) from a read taken before any
//! lock, and written by one statement in its own implicit transaction: it moves the head row
//! (`UPDATE ... RETURNING`, which takes the lock and, under READ COMMITTED, re-reads the row as
//! the previous holder committed it), inserts the events at positions after it, notifies, and
//! commits. The lock is held for that statement's execution and its commit's WAL flush, not for
//! round trips, and the answer carries the positions at once. Batches of other nodes read and plan
//! meanwhile.
//!
//! A plan from a read that went stale (another writer took a version of one of the batch's
//! streams, or one of its event ids, in between) cannot be written: the unique keys on
//! `(stream, version)` and `id` refuse the insert, which is checked against every committed row,
//! not the statement's snapshot, and the statement rolls back whole. The batch is then planned
//! again with the lock held from before the read until COMMIT (the slow path, counted in
//! `concord_append_conflict_retries_total`), where no plan can go stale. That any progress of a
//! stream since the read collides rests on versions being dense per stream and on no event ever
//! being deleted: every admitted write takes version `current + 1` of the read.
//!
//! A statement that fails otherwise may still have committed (its answer lost with the
//! connection) or may yet commit (a backend waiting for the head row runs it even after its
//! client left). The batch then goes the slow path too, which settles it by event id: events
//! stored by then are answered as replays, and a statement that commits later meets the ids the
//! slow path stored and rolls back. A COMMIT of the slow path whose answer was lost is settled the
//! same way, by one more pass under the lock.
//! Group commit keeps either path cheap: the lock is taken once per batch of appends, not per
//! event.

use crate::{EVENTS_CHANNEL, Inner, PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::app::append::{Plan, StoredId, plan_batch};
use concord_core::app::group_commit::BatchWriter;
use concord_core::domain::{AppendOutcome, AppendRequest, ExpectedVersion, RecordedEvent, StreamName};
use concord_core::ports::{CheckpointStore, EventStore, LogQuery, StoreError, collect_within};
use sqlx::Row as _;
use sqlx::postgres::{PgListener, PgRow};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// The fast path's statement: takes the head row, numbers the batch after it (`$1` holds
/// positions relative to the head), inserts, moves the head by `$10` and notifies; its own
/// transaction commits when it ends. A row whose `$12` is not 0 is written only if its stream
/// holds that version already (the plan's stated head, not read before): otherwise its version
/// is NULL and the NOT NULL key refuses the whole statement, as a stale read would be refused.
const WRITE_AFTER_HEAD: &str = "WITH head AS ( \
               UPDATE concord_log_head SET last_position = last_position + $10 WHERE id = 1 \
               RETURNING last_position - $10 AS base), \
             ins AS ( \
               INSERT INTO concord_events (position, id, stream, version, category, stream_hash, event_type, data, metadata, recorded_at) \
               SELECT head.base + p, i, s, \
                      CASE WHEN g = 0 OR EXISTS (SELECT 1 FROM concord_events e WHERE e.stream = u.s AND e.version = u.g) THEN v END, \
                      c, h, t, d::jsonb, m::jsonb, now() \
               FROM head, UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[], $12::bigint[]) \
                 AS u(p, i, s, v, c, h, t, d, m, g) \
               RETURNING 1) \
             SELECT head.base, pg_notify($11, (head.base + $10)::text), (SELECT count(*) FROM ins) FROM head";

/// The slow path's write, under the head row's lock taken before: positions absolute, the head
/// set to `$10`.
const WRITE_UNDER_LOCK: &str = "WITH ins AS ( \
                   INSERT INTO concord_events (position, id, stream, version, category, stream_hash, event_type, data, metadata, recorded_at) \
                   SELECT p, i, s, v, c, h, t, d::jsonb, m::jsonb, now() \
                   FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[]) \
                     AS u(p, i, s, v, c, h, t, d, m) \
                   RETURNING 1), \
                 upd AS (UPDATE concord_log_head SET last_position = $10 WHERE id = 1 RETURNING 1) \
                 SELECT pg_notify($11, $10::text), (SELECT count(*) FROM ins), (SELECT count(*) FROM upd)";

/// Writes batches for the group committer.
pub(crate) struct Writer(pub(crate) Arc<Inner>);

#[async_trait]
impl BatchWriter for Writer {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Vec<Result<AppendOutcome, StoreError>> {
        match self.try_write(batch).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); batch.len()],
        }
    }
}

impl Writer {
    async fn try_write(&self, batch: &[AppendRequest]) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        match self.write_in_one_statement(batch).await {
            Ok(Some(results)) => return Ok(results),
            Ok(None) => metrics::counter!("concord_append_conflict_retries_total").increment(1),
            // The statement may have committed (its answer lost with the connection), may still
            // commit (a backend waiting for the head row runs it even after its client went away),
            // or not: planning again under the lock settles it by event id. Events stored by then
            // are answered as replays; a statement that commits later meets the ids the slow path
            // stored and rolls back.
            Err(e) => tracing::warn!(error = %e, "the append statement failed; writing the batch under the lock"),
        }
        match self.write_under_lock(batch).await {
            Err(WriteError::CommitLost(e)) => {
                // The same reasoning for a COMMIT whose answer was lost: once more, under the lock.
                tracing::warn!(error = %e, "COMMIT answered an error; writing the batch under the lock again");
                self.write_under_lock(batch).await.map_err(WriteError::into_store)
            }
            other => other.map_err(WriteError::into_store),
        }
    }

    /// The fast path (see the module comment): the batch is planned from a read taken before any
    /// lock, or from the versions it states itself, then written in one statement that runs in
    /// its own implicit transaction: it takes the head row, numbers the events after it, inserts
    /// them, moves the head and notifies, and commits, in one round trip. None when the plan was
    /// stale (another writer took a version or an event id of the batch meanwhile, or a stated
    /// version was not the stream's): the keys refuse the insert, the statement rolls back whole,
    /// and the caller plans again under the lock.
    async fn write_in_one_statement(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Option<Vec<Result<AppendOutcome, StoreError>>>, StoreError> {
        // Positions relative to a head the statement reads: 1, 2, ...
        let from_stated = stated_heads(batch).map(|heads| {
            let plans = plan_batch(batch, &heads, &HashMap::new(), 0);
            (heads, plans)
        });
        // Only a plan in which every request writes is checked whole by the statement: a refusal
        // or a replay would be decided on a stated version that no written row verified.
        let (heads, stored, relative, stated) = match from_stated {
            Some((heads, plans)) if plans.iter().all(|p| matches!(p, Plan::Write { .. })) => {
                (heads, HashMap::new(), plans, true)
            }
            _ => {
                let (heads, stored) = lookup(&self.0.pool, batch).await?;
                let plans = plan_batch(batch, &heads, &stored, 0);
                (heads, stored, plans, false)
            }
        };
        let cols = Columns::of(batch, &relative);
        let Some(&count) = cols.position.last() else {
            // Nothing to write: every request is a replay or a refusal, decided on committed rows
            // (a plan from stated versions is used only when every request writes).
            return Ok(Some(batch.iter().zip(&relative).map(|(r, p)| p.outcome(r)).collect()));
        };
        let guards = if stated {
            stated_guards(batch, &relative)
        } else {
            vec![0; cols.position.len()]
        };
        let written = cols
            .bind(sqlx::query(WRITE_AFTER_HEAD))
            .bind(count)
            .bind(EVENTS_CHANNEL)
            .bind(&guards)
            .fetch_one(&self.0.pool)
            .await
            .and_then(|row| row.try_get::<i64, _>(0));
        let base = match written {
            Ok(base) => to_u64(base),
            Err(e) if is_stale_plan(&e) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        advance(&self.0.head, base + to_u64(count));
        let plans = plan_batch(batch, &heads, &stored, base);
        Ok(Some(batch.iter().zip(&plans).map(|(r, p)| p.outcome(r)).collect()))
    }

    /// The slow path, after a conflict or a failed statement: the head row locked from before
    /// the read until COMMIT, so the plan cannot go stale.
    async fn write_under_lock(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, WriteError> {
        // This path settles a statement whose answer was lost, typically with its connection:
        // it must not fail on the next dead connection of the pool.
        let mut conn = crate::acquire_live(&self.0.pool).await.map_err(unavailable)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(unavailable)?;
        // The serialization point: held until COMMIT (see the module comment).
        let last: i64 = sqlx::query_scalar("SELECT last_position FROM concord_log_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        // A statement that starts after the lock is held: its snapshot includes every batch
        // committed before ours.
        let (heads, stored) = lookup(&mut *tx, batch).await?;
        let plans = plan_batch(batch, &heads, &stored, to_u64(last));
        let cols = Columns::of(batch, &plans);
        let new_head = cols.position.last().copied();
        if let Some(head) = new_head {
            // Insert, move the head and notify in one round trip; NOTIFY is delivered at COMMIT to
            // every node's listener, this one included.
            cols.bind(sqlx::query(WRITE_UNDER_LOCK))
                .bind(head)
                .bind(EVENTS_CHANNEL)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        if let Err(e) = tx.commit().await {
            // A COMMIT whose answer was lost (the connection broke) may have committed anyway:
            // answering "unavailable" would invite a retry that writes the events twice.
            return Err(if new_head.is_some() {
                WriteError::CommitLost(unavailable(e))
            } else {
                WriteError::Store(unavailable(e))
            });
        }
        if let Some(head) = new_head {
            advance(&self.0.head, to_u64(head));
        }
        Ok(batch.iter().zip(&plans).map(|(r, p)| p.outcome(r)).collect())
    }
}

type Lookup = (HashMap<StreamName, u64>, HashMap<Uuid, StoredId>);

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The current version of each stream of the batch and the events of the batch already stored,
/// in one round trip.
async fn lookup(db: impl sqlx::PgExecutor<'_>, batch: &[AppendRequest]) -> Result<Lookup, StoreError> {
    let streams: Vec<&str> = batch.iter().map(|r| r.stream.as_str()).collect();
    let ids: Vec<Uuid> = batch.iter().flat_map(|r| r.events.iter().map(|e| e.id)).collect();
    let rows = sqlx::query(
        // One index probe per stream (the backward scan of (stream, version)): a MAX over
        // `stream = ANY($1) GROUP BY stream` reads every event of the stream instead, so a long
        // stream made each append slower than the last. A stream without events is at 0.
        "SELECT NULL::uuid, s.stream, \
                COALESCE((SELECT MAX(e.version) FROM concord_events e WHERE e.stream = s.stream), 0), NULL::bigint, \
                NULL::text, NULL::jsonb, NULL::jsonb \
         FROM (SELECT DISTINCT unnest($1::text[]) AS stream) s \
         UNION ALL \
         SELECT id, stream, version, position, event_type, data, metadata FROM concord_events WHERE id = ANY($2)",
    )
    .bind(&streams)
    .bind(&ids)
    .fetch_all(db)
    .await
    .map_err(unavailable)?;
    let mut heads = HashMap::new();
    let mut stored = HashMap::new();
    for row in rows {
        let name: String = row.get(1);
        let stream = StreamName::parse(&name).map_err(unavailable)?;
        match row.get::<Option<Uuid>, _>(0) {
            None => {
                heads.insert(stream, to_u64(row.get(2)));
            }
            Some(id) => {
                let position: Option<i64> = row.get(3);
                let json = |i: usize| -> Result<serde_json::Value, StoreError> {
                    Ok(row
                        .try_get::<sqlx::types::Json<serde_json::Value>, _>(i)
                        .map_err(unavailable)?
                        .0)
                };
                stored.insert(
                    id,
                    StoredId {
                        stream,
                        version: to_u64(row.get(2)),
                        position: position.map_or(0, to_u64),
                        event_type: row.get(4),
                        data: json(5)?,
                        metadata: json(6)?,
                    },
                );
            }
        }
    }
    Ok((heads, stored))
}

/// A failed write under the lock.
enum WriteError {
    Store(StoreError),
    /// COMMIT answered an error: the batch may be stored.
    CommitLost(StoreError),
}

impl WriteError {
    fn into_store(self) -> StoreError {
        match self {
            Self::Store(e) | Self::CommitLost(e) => e,
        }
    }
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// The fast path's statement refused by a key: a version or an event id taken meanwhile (unique),
/// or a stated version that the stream does not hold (the NOT NULL version).
fn is_stale_plan(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        matches!(
            d.kind(),
            sqlx::error::ErrorKind::UniqueViolation | sqlx::error::ErrorKind::NotNullViolation
        )
    })
}

/// The head of each stream of the batch as the batch states it, when the first request on every
/// stream expects an exact version (or no stream): planning then needs no read. The statement
/// checks what the read would have: a version taken meanwhile collides with the unique key on
/// `(stream, version)`, an event id stored already with the one on `id` (and the slow path then
/// answers it as a replay), and a stated version above the stream's is caught by the guard of
/// [`stated_guards`]. Versions stay dense: a first event is written at `n + 1` only while `n`
/// exists and `n + 1` does not.
fn stated_heads(batch: &[AppendRequest]) -> Option<HashMap<StreamName, u64>> {
    let mut heads = HashMap::new();
    for r in batch {
        if heads.contains_key(&r.stream) {
            continue;
        }
        let head = match r.expected {
            ExpectedVersion::NoStream => 0,
            // Versions are BIGINTs: a larger one is no stream's, and the read answers so.
            ExpectedVersion::Exact(v) if v < i64::MAX as u64 => v,
            _ => return None,
        };
        heads.insert(r.stream.clone(), head);
    }
    Some(heads)
}

/// Per row of a plan from stated heads (in the order of [`Columns::of`]): the version that must
/// already be in the stream for the row to be written (0: none). Only a stream's first written
/// row needs one; later rows follow it in the same statement.
fn stated_guards(batch: &[AppendRequest], plans: &[Plan]) -> Vec<i64> {
    let mut seen: std::collections::HashSet<&StreamName> = std::collections::HashSet::new();
    let mut guards = Vec::new();
    for (req, plan) in batch.iter().zip(plans) {
        let Plan::Write { first_version, .. } = plan else {
            continue;
        };
        let first = seen.insert(&req.stream);
        for i in 0..req.events.len() {
            guards.push(if first && i == 0 { to_i64(first_version - 1) } else { 0 });
        }
    }
    guards
}

/// The rows a batch writes, column by column (for `UNNEST`).
#[derive(Default)]
struct Columns<'a> {
    position: Vec<i64>,
    id: Vec<Uuid>,
    stream: Vec<&'a str>,
    version: Vec<i64>,
    category: Vec<&'a str>,
    hash: Vec<i64>,
    event_type: Vec<&'a str>,
    data: Vec<String>,
    metadata: Vec<String>,
}

impl<'a> Columns<'a> {
    /// Binds the columns as `$1`–`$9`, in the order of the `UNNEST` of both writes.
    fn bind(&'a self, query: PgQuery<'a>) -> PgQuery<'a> {
        query
            .bind(&self.position)
            .bind(&self.id)
            .bind(&self.stream)
            .bind(&self.version)
            .bind(&self.category)
            .bind(&self.hash)
            .bind(&self.event_type)
            .bind(&self.data)
            .bind(&self.metadata)
    }

    fn of(batch: &'a [AppendRequest], plans: &[Plan]) -> Self {
        let mut cols = Self::default();
        for (req, plan) in batch.iter().zip(plans) {
            let Plan::Write {
                first_version,
                first_position,
            } = plan
            else {
                continue;
            };
            for (i, e) in req.events.iter().enumerate() {
                cols.position.push(to_i64(first_position + i as u64));
                cols.id.push(e.id);
                cols.stream.push(req.stream.as_str());
                cols.version.push(to_i64(first_version + i as u64));
                cols.category.push(req.stream.category());
                cols.hash.push(i64::from(req.stream.partition_hash()));
                cols.event_type.push(e.event_type.as_str());
                cols.data.push(e.data.to_string());
                cols.metadata.push(e.metadata.to_string());
            }
        }
        cols
    }
}

fn advance(head: &watch::Sender<u64>, position: u64) {
    head.send_if_modified(|h| {
        let moved = position > *h;
        *h = (*h).max(position);
        moved
    });
}

/// Listens for other nodes' commits. When the connection drops, notifications sent meanwhile are
/// lost, so on every error the signal is poked to make subscribers re-read from their cursor.
pub(crate) async fn spawn_listener(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let mut listener = PgListener::connect_with(&inner.pool).await.map_err(unavailable)?;
    listener.listen(EVENTS_CHANNEL).await.map_err(unavailable)?;
    let weak: Weak<Inner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            let received = listener.try_recv().await;
            let Some(inner) = weak.upgrade() else { return };
            match received {
                Ok(Some(n)) => {
                    if let Ok(p) = n.payload().parse::<u64>() {
                        advance(&inner.head, p);
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("event notification connection lost; subscribers re-read");
                    inner.head.send_modify(|_| {});
                    drop(inner);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Ok(())
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const SELECT_EVENT: &str =
    "SELECT id, stream, version, position, event_type, data, metadata, recorded_at FROM concord_events";

/// The bytes of `data` and `metadata` as they came (JSONB: a version byte and the JSON text).
fn row_bytes(row: &PgRow) -> Result<usize, StoreError> {
    use sqlx::ValueRef as _;
    let len = |i: usize| -> Result<usize, StoreError> {
        let raw = row.try_get_raw(i).map_err(unavailable)?;
        Ok(if raw.is_null() {
            0
        } else {
            raw.as_bytes().map_err(|e| unavailable(e.to_string()))?.len()
        })
    };
    Ok(len(5)? + len(6)?)
}

fn event_from_row(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let stream: String = row.try_get(1).map_err(unavailable)?;
    Ok(RecordedEvent {
        id: row.try_get(0).map_err(unavailable)?,
        stream: StreamName::parse(&stream).map_err(unavailable)?,
        version: to_u64(row.try_get(2).map_err(unavailable)?),
        position: to_u64(row.try_get(3).map_err(unavailable)?),
        event_type: row.try_get(4).map_err(unavailable)?,
        data: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>(5)
            .map_err(unavailable)?
            .0,
        metadata: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>(6)
            .map_err(unavailable)?
            .0,
        recorded_at: row.try_get::<DateTime<Utc>, _>(7).map_err(unavailable)?,
    })
}

#[async_trait]
impl EventStore for PostgresStore {
    #[tracing::instrument(skip_all, fields(stream = %request.stream, events = request.events.len()))]
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.committer.append(request).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!("{SELECT_EVENT} WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3");
        let read = || {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(stream.as_str())
                .bind(to_i64(from))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        };
        let mut events = collect_within(read().fetch(&self.inner.pool), max_bytes, row_bytes, event_from_row).await?;
        if events.is_empty() {
            let head: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM concord_events WHERE stream = $1")
                .bind(stream.as_str())
                .fetch_one(&self.inner.pool)
                .await
                .map_err(unavailable)?;
            match head {
                None => return Err(StoreError::StreamNotFound(stream.to_string())),
                // The stream was created, or grew to `from`, between the two reads: read again,
                // after the check, so a stream is never answered as empty when the check saw
                // events from `from` on.
                Some(h) if h >= to_i64(from) => {
                    events =
                        collect_within(read().fetch(&self.inner.pool), max_bytes, row_bytes, event_from_row).await?;
                }
                Some(_) => {}
            }
        }
        Ok(events)
    }

    async fn read_log(&self, q: &LogQuery) -> Result<Vec<RecordedEvent>, StoreError> {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_EVENT} WHERE position > $1 \
             AND ($2::text IS NULL OR category = $2) \
             AND ($3::bigint IS NULL OR stream_hash % $3 = $4) \
             ORDER BY position LIMIT $5"
        )))
        .bind(to_i64(q.after))
        .bind(q.category.as_ref().map(|c| c.as_str().to_owned()))
        .bind(q.partition.map(|p| i64::from(p.size)))
        .bind(q.partition.map_or(0, |p| i64::from(p.member)))
        .bind(i64::try_from(q.limit).unwrap_or(i64::MAX));
        collect_within(query.fetch(&self.inner.pool), q.max_bytes, row_bytes, event_from_row).await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT last_position FROM concord_log_head WHERE id = 1")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(unavailable)?;
        Ok(to_u64(last))
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    async fn load_checkpoint(&self, group: &str, member: u32) -> Result<Option<u64>, StoreError> {
        let p: Option<i64> =
            sqlx::query_scalar("SELECT position FROM concord_checkpoints WHERE grp = $1 AND member = $2")
                .bind(group)
                .bind(i64::from(member))
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(unavailable)?;
        Ok(p.map(to_u64))
    }

    async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO concord_checkpoints (grp, member, position, updated_at) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (grp, member) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        )
        .bind(group)
        .bind(i64::from(member))
        .bind(to_i64(position))
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PostgresConfig, create_scratch_database};
    use concord_core::testkit::append;

    /// A batch as the group committer hands it over, written directly: a refusal decided on a
    /// version the batch states (here after an id conflict left that stream unwritten) must not
    /// be answered; the batch is planned from the read instead.
    #[tokio::test]
    async fn a_batch_with_a_refusal_is_planned_from_the_read_not_from_its_stated_versions() {
        let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
            eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
            return;
        };
        let url = create_scratch_database(&base, "concord_t").await.unwrap();
        let store = PostgresStore::connect(&PostgresConfig::new(&url)).await.unwrap();
        store
            .append(append("b-1", ExpectedVersion::NoStream, &["A", "B", "C"]))
            .await
            .unwrap();
        let first = append("a-1", ExpectedVersion::NoStream, &["X"]);
        // The same event id on another stream, stating a version b-1 does not have.
        let mut reused = append("b-1", ExpectedVersion::Exact(5), &["Y"]);
        reused.events[0].id = first.events[0].id;
        let right = append("b-1", ExpectedVersion::Exact(3), &["Z"]);
        let writer = Writer(Arc::clone(&store.inner));
        let results = writer.write_batch(&[first, reused, right]).await;
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(StoreError::EventIdConflict(_))),
            "{:?}",
            results[1]
        );
        let written = results[2].as_ref().expect("b-1 is at 3, as the third append expects");
        assert_eq!((written.first_version, written.last_version), (4, 4));
        let versions: Vec<u64> = store
            .read_stream(&StreamName::parse("b-1").unwrap(), 1, 10, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, [1, 2, 3, 4]);

        // A stated version past what a BIGINT holds is no stream's: refused, not a panic.
        let huge = append("b-1", ExpectedVersion::Exact(u64::MAX), &["W"]);
        let results = writer.write_batch(&[huge]).await;
        assert!(
            matches!(results[0], Err(StoreError::WrongExpectedVersion { current: 4, .. })),
            "{:?}",
            results[0]
        );
    }
}
