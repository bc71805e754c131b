//! The event store and consumer-group checkpoints on SQLite.

use crate::{Inner, SqliteStore, unavailable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_core::app::append::{Plan, StoredId, plan_batch};
use concord_core::app::group_commit::BatchWriter;
use concord_core::domain::{AppendOutcome, AppendRequest, RecordedEvent, StreamName};
use concord_core::ports::{CheckpointStore, EventStore, LogQuery, StoreError, collect_within};
use sqlx::Row as _;
use sqlx::sqlite::SqliteRow;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use uuid::Uuid;

/// Writes batches for the group committer, on the one write connection.
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
    /// One transaction for the whole batch. SQLite allows one writer at a time, and this
    /// connection is the only one that writes events, so positions are assigned and become
    /// visible in the same order: a reader can never see position P+1 before P.
    async fn try_write(&self, batch: &[AppendRequest]) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        let mut tx = self.0.write.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let mut heads = HashMap::new();
        let mut stored = HashMap::new();
        for req in batch {
            if !heads.contains_key(&req.stream) {
                let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM events WHERE stream = ?")
                    .bind(req.stream.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                heads.insert(req.stream.clone(), v.map_or(0, to_u64));
            }
            for e in &req.events {
                let row = sqlx::query(
                    "SELECT stream, version, position, event_type, data, metadata FROM events WHERE id = ?",
                )
                .bind(e.id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
                if let Some(row) = row {
                    let stream: String = row.get(0);
                    let (data, metadata): (String, String) = (row.get(4), row.get(5));
                    stored.insert(
                        e.id,
                        StoredId {
                            stream: StreamName::parse(&stream).map_err(unavailable)?,
                            version: to_u64(row.get(1)),
                            position: to_u64(row.get(2)),
                            event_type: row.get(3),
                            data: serde_json::from_str(&data).map_err(unavailable)?,
                            metadata: serde_json::from_str(&metadata).map_err(unavailable)?,
                        },
                    );
                }
            }
        }
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let plans = plan_batch(batch, &heads, &stored, to_u64(last));
        let now = Utc::now();
        let mut new_head = None;
        for (req, plan) in batch.iter().zip(&plans) {
            let Plan::Write {
                first_version,
                first_position,
            } = plan
            else {
                continue;
            };
            let category = req.stream.category();
            let hash = i64::from(req.stream.partition_hash());
            for (i, e) in req.events.iter().enumerate() {
                let position = first_position + i as u64;
                sqlx::query(
                    "INSERT INTO events (position, id, stream, version, category, stream_hash, event_type, data, metadata, recorded_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(to_i64(position))
                .bind(e.id)
                .bind(req.stream.as_str())
                .bind(to_i64(first_version + i as u64))
                .bind(category)
                .bind(hash)
                .bind(e.event_type.as_str())
                .bind(e.data.to_string())
                .bind(e.metadata.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                new_head = Some(position);
            }
        }
        tx.commit().await.map_err(unavailable)?;
        if let Some(p) = new_head {
            self.0.head.send_replace(p);
        }
        Ok(batch.iter().zip(&plans).map(|(r, p)| p.outcome(r)).collect())
    }
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const SELECT_EVENT: &str = "SELECT id, stream, version, position, event_type, data, metadata, recorded_at FROM events";

fn row_bytes(row: &SqliteRow) -> Result<usize, StoreError> {
    let data: &str = row.try_get(5).map_err(unavailable)?;
    let metadata: &str = row.try_get(6).map_err(unavailable)?;
    Ok(data.len() + metadata.len())
}

fn event_from_row(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    let stream: String = row.try_get(1).map_err(unavailable)?;
    let data: String = row.try_get(5).map_err(unavailable)?;
    let metadata: String = row.try_get(6).map_err(unavailable)?;
    Ok(RecordedEvent {
        id: row.try_get::<Uuid, _>(0).map_err(unavailable)?,
        stream: StreamName::parse(&stream).map_err(unavailable)?,
        version: to_u64(row.try_get(2).map_err(unavailable)?),
        position: to_u64(row.try_get(3).map_err(unavailable)?),
        event_type: row.try_get(4).map_err(unavailable)?,
        data: serde_json::from_str(&data).map_err(unavailable)?,
        metadata: serde_json::from_str(&metadata).map_err(unavailable)?,
        recorded_at: row.try_get::<DateTime<Utc>, _>(7).map_err(unavailable)?,
    })
}

#[async_trait]
impl EventStore for SqliteStore {
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
        let sql = format!("{SELECT_EVENT} WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?");
        let read = || {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(stream.as_str())
                .bind(to_i64(from))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        };
        let mut events = collect_within(read().fetch(&self.inner.read), max_bytes, row_bytes, event_from_row).await?;
        if events.is_empty() {
            let head: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM events WHERE stream = ?")
                .bind(stream.as_str())
                .fetch_one(&self.inner.read)
                .await
                .map_err(unavailable)?;
            match head {
                None => return Err(StoreError::StreamNotFound(stream.to_string())),
                // The stream was created, or grew to `from`, between the two reads: read again,
                // after the check, so a stream is never answered as empty when the check saw
                // events from `from` on.
                Some(h) if h >= to_i64(from) => {
                    events =
                        collect_within(read().fetch(&self.inner.read), max_bytes, row_bytes, event_from_row).await?;
                }
                Some(_) => {}
            }
        }
        Ok(events)
    }

    async fn read_log(&self, q: &LogQuery) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut sql = format!("{SELECT_EVENT} WHERE position > ?");
        if q.category.is_some() {
            sql.push_str(" AND category = ?");
        }
        if q.partition.is_some() {
            sql.push_str(" AND stream_hash % ? = ?");
        }
        sql.push_str(" ORDER BY position LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(to_i64(q.after));
        if let Some(c) = &q.category {
            query = query.bind(c.as_str().to_owned());
        }
        if let Some(p) = q.partition {
            query = query.bind(i64::from(p.size)).bind(i64::from(p.member));
        }
        let query = query.bind(i64::try_from(q.limit).unwrap_or(i64::MAX));
        collect_within(query.fetch(&self.inner.read), q.max_bytes, row_bytes, event_from_row).await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&self.inner.read)
            .await
            .map_err(unavailable)?;
        Ok(to_u64(last))
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    async fn load_checkpoint(&self, group: &str, member: u32) -> Result<Option<u64>, StoreError> {
        let p: Option<i64> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE grp = ? AND member = ?")
            .bind(group)
            .bind(i64::from(member))
            .fetch_optional(&self.inner.read)
            .await
            .map_err(unavailable)?;
        Ok(p.map(to_u64))
    }

    async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (grp, member, position, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (grp, member) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        )
        .bind(group)
        .bind(i64::from(member))
        .bind(to_i64(position))
        .bind(Utc::now())
        .execute(&self.inner.write)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}
