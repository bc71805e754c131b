//! Bulk operations on sagas: a filter, an action, run server-side page by page.
//!
//! A batch is a stream of its own (`saga-@batch-{id}`; `@` is in no saga id, so it is no saga's
//! log): `BatchStarted` (filter, action, the key that asked), then a `BatchProgress` per page
//! (the last saga id done and the running counts), then `BatchFinished`. Each append names the
//! version it expects, so of two nodes running one batch only one goes on. Every batch's id is
//! also in the index stream `saga-@batches`; each node looks there every `saga_batch_resume_ms`
//! for a batch that is not finished and has recorded nothing for `lease_ms` (its node died) and
//! takes it over from its last page. Operations are asked with the batch id as their
//! idempotency key, so a page done again after a takeover asks nothing twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use concord_core::app::saga::SagaError;
use concord_core::domain::event::UncheckedEvent;
use concord_core::domain::saga::{SagaId, SagaOperation, SagaStatus};
use concord_core::domain::{AppendRequest, ExpectedVersion, Limits, StreamName};
use concord_core::ports::{EventStore, SagaRow, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::SagaRunner;

/// The stream that lists every batch.
const INDEX: &str = "saga-@batches";

fn stream(id: &Uuid) -> String {
    format!("saga-@batch-{id}")
}

/// Which sagas a batch acts on; every field that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SagaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_after: Option<DateTime<Utc>>,
}

impl BatchFilter {
    fn holds(&self, row: &SagaRow) -> bool {
        self.definition.as_ref().is_none_or(|d| *d == row.definition)
            && self.started_before.is_none_or(|t| row.created_at < t)
            && self.started_after.is_none_or(|t| row.created_at > t)
    }
}

/// What a batch does to each saga it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchAction {
    Cancel,
    Pause,
    Resume,
    /// `POST /v1/sagas/{id}/retry` of a failed saga.
    Retry,
}

impl BatchAction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Retry => "retry",
        }
    }
}

/// A batch's record, folded from its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: Uuid,
    pub filter: BatchFilter,
    pub action: BatchAction,
    /// The key that asked for it.
    pub by: Option<String>,
    /// Sagas that matched so far, and of them those the action applied to and those it did not
    /// (finished meanwhile, not in a state it applies to).
    pub matched: u64,
    pub applied: u64,
    pub refused: u64,
    /// The last saga id done: the next page starts after it.
    pub after: Option<String>,
    pub finished: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The stream's version.
    version: u64,
}

/// The records of a batch's stream (named as stored).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
#[allow(clippy::enum_variant_names)]
enum BatchEvent {
    BatchStarted {
        filter: BatchFilter,
        action: BatchAction,
        by: Option<String>,
    },
    BatchProgress {
        after: Option<String>,
        matched: u64,
        applied: u64,
        refused: u64,
    },
    BatchFinished {
        matched: u64,
        applied: u64,
        refused: u64,
    },
}

/// Bad input to a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Saga(#[from] SagaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs batches on this node and takes over those whose node died.
pub struct SagaBatches {
    runner: Arc<SagaRunner>,
    events: Arc<dyn EventStore>,
    limits: Limits,
    /// Sagas per page (and per progress record).
    pub page: usize,
    /// How long a batch that records nothing is left to its node before another takes it over.
    pub stale: Duration,
    /// At most this many sagas a second per batch (0: no limit), so a bulk operation over a
    /// million sagas does not crowd out the rest.
    pub per_s: u32,
    /// The batches this node runs now: never taken over by itself.
    running: std::sync::Mutex<std::collections::HashSet<Uuid>>,
}

impl SagaBatches {
    #[must_use]
    pub fn new(
        runner: Arc<SagaRunner>,
        events: Arc<dyn EventStore>,
        limits: Limits,
        page: usize,
        stale: Duration,
        per_s: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            runner,
            events,
            limits,
            page: page.max(1),
            stale,
            per_s,
            running: std::sync::Mutex::default(),
        })
    }

    /// How long a batch may record nothing before it counts as stopped: `stale`, or twice the
    /// time a page takes at the rate limit if that is longer.
    fn stale_after(&self) -> Duration {
        let page = if self.per_s > 0 {
            Duration::from_secs_f64(self.page as f64 / f64::from(self.per_s))
        } else {
            Duration::ZERO
        };
        self.stale.max(page * 2)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Uuid>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn append(&self, stream: &str, expected: ExpectedVersion, e: &BatchEvent) -> Result<(), BatchError> {
        let event = UncheckedEvent {
            id: None,
            event_type: match e {
                BatchEvent::BatchStarted { .. } => "BatchStarted",
                BatchEvent::BatchProgress { .. } => "BatchProgress",
                BatchEvent::BatchFinished { .. } => "BatchFinished",
            }
            .to_owned(),
            data: serde_json::to_value(e).unwrap_or(Value::Null),
            metadata: None,
        };
        let stream = StreamName::parse(stream).map_err(SagaError::from)?;
        let request = AppendRequest::new(stream, expected, vec![event], &self.limits).map_err(SagaError::from)?;
        self.events.append(request).await?;
        Ok(())
    }

    /// Counts the sagas the filter matches now (a dry run).
    ///
    /// # Errors
    /// The store.
    pub async fn count(&self, filter: &BatchFilter) -> Result<u64, BatchError> {
        let mut after: Option<String> = None;
        let mut matched = 0;
        loop {
            let rows = self.runner.list(filter.status, after.as_deref(), self.page).await?;
            matched += rows.iter().filter(|r| filter.holds(r)).count() as u64;
            match rows.last() {
                Some(last) if rows.len() == self.page => after = Some(last.id.to_string()),
                _ => return Ok(matched),
            }
        }
    }

    /// Records a new batch and starts it on this node.
    ///
    /// # Errors
    /// The store.
    pub async fn start(
        self: &Arc<Self>,
        filter: BatchFilter,
        action: BatchAction,
        by: Option<String>,
    ) -> Result<Batch, BatchError> {
        let id = Uuid::now_v7();
        // Listed first: a batch whose record a crash cut off is an id with no stream there,
        // which the takeover passes over; never a batch nobody would take over.
        let index = UncheckedEvent {
            id: None,
            event_type: "BatchCreated".into(),
            data: serde_json::json!({ "id": id }),
            metadata: None,
        };
        let request = AppendRequest::new(
            StreamName::parse(INDEX).map_err(SagaError::from)?,
            ExpectedVersion::Any,
            vec![index],
            &self.limits,
        )
        .map_err(SagaError::from)?;
        self.events.append(request).await?;
        self.append(
            &stream(&id),
            ExpectedVersion::NoStream,
            &BatchEvent::BatchStarted { filter, action, by },
        )
        .await?;
        let batch = self.get(&id).await?;
        let me = Arc::clone(self);
        tokio::spawn(async move { me.run(id).await });
        Ok(batch)
    }

    /// A batch as its stream tells it.
    ///
    /// # Errors
    /// [`BatchError::NotFound`], or the store.
    pub async fn get(&self, id: &Uuid) -> Result<Batch, BatchError> {
        let name = StreamName::parse(&stream(id)).map_err(SagaError::from)?;
        let events = match self.events.read_stream(&name, 1, usize::MAX, usize::MAX).await {
            Ok(e) => e,
            Err(StoreError::StreamNotFound(_)) => return Err(BatchError::NotFound(id.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut batch: Option<Batch> = None;
        for e in events {
            let Ok(event) = serde_json::from_value::<BatchEvent>(e.data.clone()) else {
                continue;
            };
            match (event, batch.as_mut()) {
                (BatchEvent::BatchStarted { filter, action, by }, None) => {
                    batch = Some(Batch {
                        id: *id,
                        filter,
                        action,
                        by,
                        matched: 0,
                        applied: 0,
                        refused: 0,
                        after: None,
                        finished: false,
                        created_at: e.recorded_at,
                        updated_at: e.recorded_at,
                        version: e.version,
                    });
                }
                (
                    BatchEvent::BatchProgress {
                        after,
                        matched,
                        applied,
                        refused,
                    },
                    Some(b),
                ) => {
                    (b.after, b.matched, b.applied, b.refused) = (after, matched, applied, refused);
                    (b.updated_at, b.version) = (e.recorded_at, e.version);
                }
                (
                    BatchEvent::BatchFinished {
                        matched,
                        applied,
                        refused,
                    },
                    Some(b),
                ) => {
                    (b.matched, b.applied, b.refused, b.finished) = (matched, applied, refused, true);
                    (b.updated_at, b.version) = (e.recorded_at, e.version);
                }
                _ => {}
            }
        }
        batch.ok_or_else(|| BatchError::NotFound(id.to_string()))
    }

    /// Runs a batch from its last recorded page until it finishes, or another node records
    /// first (it then has the batch), or a store failure (a node takes it over later).
    async fn run(&self, id: Uuid) {
        if !self.running().insert(id) {
            return;
        }
        let ran = self.run_inner(id).await;
        self.running().remove(&id);
        match ran {
            Ok(()) => {}
            Err(BatchError::Store(StoreError::WrongExpectedVersion { .. })) => {
                tracing::info!(batch = %id, "another node runs this batch");
            }
            Err(e) => tracing::warn!(batch = %id, error = %e, "batch stopped; a node takes it over later"),
        }
    }

    async fn run_inner(&self, id: Uuid) -> Result<(), BatchError> {
        let mut b = self.get(&id).await?;
        let key = format!("batch-{id}");
        while !b.finished {
            let page_started = std::time::Instant::now();
            let rows = self.runner.list(b.filter.status, b.after.as_deref(), self.page).await?;
            for row in rows.iter().filter(|r| b.filter.holds(r)) {
                b.matched += 1;
                if self.apply(b.action, &row.id, b.by.as_deref(), &key).await? {
                    b.applied += 1;
                } else {
                    b.refused += 1;
                }
            }
            let last_page = rows.len() < self.page;
            if let Some(last) = rows.last() {
                b.after = Some(last.id.to_string());
            }
            let (matched, applied, refused) = (b.matched, b.applied, b.refused);
            let event = if last_page {
                BatchEvent::BatchFinished {
                    matched,
                    applied,
                    refused,
                }
            } else {
                BatchEvent::BatchProgress {
                    after: b.after.clone(),
                    matched,
                    applied,
                    refused,
                }
            };
            self.append(&stream(&id), ExpectedVersion::Exact(b.version), &event)
                .await?;
            b.version += 1;
            b.finished = last_page;
            metrics::counter!("concord_saga_batch_pages_total").increment(1);
            if self.per_s > 0 && !b.finished {
                let due = Duration::from_secs_f64(rows.len() as f64 / f64::from(self.per_s));
                tokio::time::sleep(due.saturating_sub(page_started.elapsed())).await;
            }
        }
        tracing::info!(batch = %id, matched = b.matched, applied = b.applied, refused = b.refused, "batch finished");
        Ok(())
    }

    /// Applies the action to one saga: true when it took, false when it does not apply.
    async fn apply(&self, action: BatchAction, id: &SagaId, by: Option<&str>, key: &str) -> Result<bool, BatchError> {
        let op = match action {
            BatchAction::Cancel => SagaOperation::Cancel,
            BatchAction::Pause => SagaOperation::Pause,
            BatchAction::Resume => SagaOperation::Resume,
            BatchAction::Retry => {
                return match self.runner.retry(id, None).await {
                    Ok(_) => Ok(true),
                    Err(e) => Self::not_applied(id, e),
                };
            }
        };
        match self.runner.operate(id, op, by, Some(key)).await {
            Ok(_) => Ok(true),
            Err(e) => Self::not_applied(id, e),
        }
    }

    /// A saga the action did not apply to counts as refused, and the batch goes on; only a
    /// store failure stops it (a node takes it over later).
    fn not_applied(id: &SagaId, e: SagaError) -> Result<bool, BatchError> {
        match e {
            SagaError::Store(e) => Err(e.into()),
            SagaError::OperationRefused { .. } | SagaError::NotFound(_) | SagaError::NotFailed(..) => Ok(false),
            other => {
                tracing::warn!(saga.id = %id, error = %other, "the batch passes over a saga it cannot act on");
                Ok(false)
            }
        }
    }

    /// Takes over every batch that is not finished and has recorded nothing for `stale`.
    ///
    /// # Errors
    /// The store.
    pub async fn resume_stale(self: &Arc<Self>) -> Result<usize, BatchError> {
        let index = StreamName::parse(INDEX).map_err(SagaError::from)?;
        let listed = match self.events.read_stream(&index, 1, usize::MAX, usize::MAX).await {
            Ok(e) => e,
            Err(StoreError::StreamNotFound(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let stale = chrono::Duration::from_std(self.stale_after()).unwrap_or(chrono::Duration::MAX);
        let mut taken = 0;
        for e in listed {
            let Some(id) = e.data["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
                continue;
            };
            let b = match self.get(&id).await {
                Ok(b) => b,
                Err(BatchError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let here = self.running().contains(&id);
            if !b.finished && !here && Utc::now() - b.updated_at >= stale {
                tracing::info!(batch = %id, "taking over a batch whose node stopped");
                taken += 1;
                let me = Arc::clone(self);
                tokio::spawn(async move { me.run(id).await });
            }
        }
        Ok(taken)
    }

    /// Looks for stale batches every `every` until `stopping` turns true.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stopping: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stopping.changed() => return,
            }
            if *stopping.borrow() {
                return;
            }
            if let Err(e) = self.resume_stale().await {
                tracing::warn!(error = %e, "looking for batches to take over failed");
            }
        }
    }
}
