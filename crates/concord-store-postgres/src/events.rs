//! The event store and consumer-group checkpoints on PostgreSQL.
//!
//! # Why a reader never misses an event that commits late
//!
//! A sequence or identity column hands out positions at INSERT time, but transactions commit in
//! any order: a reader can see position 11 committed while 10 is still in flight, move its
//! cursor past 10, and never see it. Here every writing transaction first locks the single row
//! of `concord_log_head` (`SELECT ... FOR UPDATE`) and holds that lock until it commits; it reads
//! the last position under the lock and numbers its events after it. A second writer, on this
//! node or any other, blocks on the row until the first has committed, and PostgreSQL makes a
//! transaction visible before it releases its row locks. So positions become visible strictly in
//! order, with no holes: whoever sees position P can already see every position below P.
//! Group commit keeps this cheap: the lock is taken once per batch of appends, not per event.

use crate::{EVENTS_CHANNEL, Inner, PostgresStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::app::append::{Plan, StoredId, plan_batch};
use concord_core::app::group_commit::BatchWriter;
use concord_core::domain::{AppendOutcome, AppendRequest, RecordedEvent, StreamName};
use concord_core::ports::{CheckpointStore, EventStore, LogQuery, StoreError, collect_within};
use sqlx::Row as _;
use sqlx::postgres::{PgListener, PgRow};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

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
        let mut tx = self.0.pool.begin().await.map_err(unavailable)?;
        // The serialization point: held until COMMIT (see the module comment).
        let last: i64 = sqlx::query_scalar("SELECT last_position FROM concord_log_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;

        // One round trip for both lookups, in a statement that starts after the lock is held, so
        // its snapshot includes every batch committed before ours.
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
        .fetch_all(&mut *tx)
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

        let plans = plan_batch(batch, &heads, &stored, to_u64(last));
        let mut cols = Columns::default();
        for (req, plan) in batch.iter().zip(&plans) {
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
        let new_head = cols.position.last().copied();
        if let Some(head) = new_head {
            // Insert, move the head and notify in one round trip; NOTIFY is delivered at COMMIT to
            // every node's listener, this one included.
            sqlx::query(
                "WITH ins AS ( \
                   INSERT INTO concord_events (position, id, stream, version, category, stream_hash, event_type, data, metadata, recorded_at) \
                   SELECT p, i, s, v, c, h, t, d::jsonb, m::jsonb, now() \
                   FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[]) \
                     AS u(p, i, s, v, c, h, t, d, m) \
                   RETURNING 1), \
                 upd AS (UPDATE concord_log_head SET last_position = $10 WHERE id = 1 RETURNING 1) \
                 SELECT pg_notify($11, $10::text), (SELECT count(*) FROM ins), (SELECT count(*) FROM upd)",
            )
            .bind(&cols.position)
            .bind(&cols.id)
            .bind(&cols.stream)
            .bind(&cols.version)
            .bind(&cols.category)
            .bind(&cols.hash)
            .bind(&cols.event_type)
            .bind(&cols.data)
            .bind(&cols.metadata)
            .bind(head)
            .bind(EVENTS_CHANNEL)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        if let Err(e) = tx.commit().await {
            // A COMMIT whose answer was lost (the connection broke) may have committed anyway.
            // Answering "unavailable" then would invite a retry that writes the events twice, so
            // look: the batch's last event id is there exactly when the whole batch committed.
            let committed = match cols.id.last() {
                Some(id) => sqlx::query_scalar::<_, i64>("SELECT position FROM concord_events WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.0.pool)
                    .await
                    .ok()
                    .flatten()
                    .is_some(),
                None => false,
            };
            if !committed {
                return Err(unavailable(e));
            }
            tracing::warn!(error = %e, "COMMIT answered an error but the batch is stored");
        }
        if let Some(head) = new_head {
            advance(&self.0.head, to_u64(head));
        }
        Ok(batch.iter().zip(&plans).map(|(r, p)| p.outcome(r)).collect())
    }
}

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
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(stream.as_str())
            .bind(to_i64(from))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let events = collect_within(query.fetch(&self.inner.pool), max_bytes, row_bytes, event_from_row).await?;
        if events.is_empty() {
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM concord_events WHERE stream = $1 LIMIT 1")
                .bind(stream.as_str())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(unavailable)?;
            if exists.is_none() {
                return Err(StoreError::StreamNotFound(stream.to_string()));
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
