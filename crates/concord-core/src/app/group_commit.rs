//! Group commit: concurrent appends share one database transaction.
//!
//! One writer task per store drains the queue: it takes every append waiting (up to a limit of
//! events), writes them in one transaction and answers each caller. While a commit is in flight
//! new appends queue up, so batches grow with concurrency and the cost of a commit (an fsync) is
//! shared; a lone append is written at once, without waiting for company.

use crate::domain::{AppendOutcome, AppendRequest};
use crate::ports::StoreError;
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Writes a batch of appends in one transaction, deciding each with
/// [`crate::app::append::plan_batch`]. One result per request, in order; a failed commit fails
/// every request that was to be written.
#[async_trait]
pub trait BatchWriter: Send + Sync + 'static {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Vec<Result<AppendOutcome, StoreError>>;
}

type Job = (AppendRequest, oneshot::Sender<Result<AppendOutcome, StoreError>>);

/// Queue in front of a [`BatchWriter`].
#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
}

/// Bounds of the group committer.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitLimits {
    /// Most events written in one transaction.
    pub max_batch_events: usize,
    /// Most appends waiting; callers beyond it wait for room (back-pressure).
    pub queue_len: usize,
}

impl Default for GroupCommitLimits {
    fn default() -> Self {
        Self {
            max_batch_events: 2000,
            queue_len: 4096,
        }
    }
}

impl GroupCommitter {
    /// Starts the writer task on the current tokio runtime. It ends when every clone is dropped.
    pub fn spawn<W: BatchWriter>(writer: Arc<W>, limits: GroupCommitLimits) -> Self {
        let (queue, rx) = mpsc::channel(limits.queue_len.max(1));
        tokio::spawn(run(writer, rx, limits.max_batch_events.max(1)));
        Self { queue }
    }

    /// Queues an append and waits for its transaction.
    ///
    /// # Errors
    /// The append's own error, or [`StoreError::Unavailable`] when the writer has stopped.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((request, tx))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer dropped the append".into()))?
    }
}

async fn run<W: BatchWriter>(writer: Arc<W>, mut rx: mpsc::Receiver<Job>, max_events: usize) {
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    while let Some((req, reply)) = rx.recv().await {
        let mut events = req.events.len();
        requests.push(req);
        replies.push(reply);
        while events < max_events {
            match rx.try_recv() {
                Ok((req, reply)) => {
                    events += req.events.len();
                    requests.push(req);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let results = writer.write_batch(&requests).await;
        debug_assert_eq!(results.len(), requests.len());
        tracing::trace!(appends = requests.len(), events, "group commit");
        for (reply, result) in replies.drain(..).zip(results) {
            // A caller that gave up waiting is no reason to stop the writer.
            let _ = reply.send(result);
        }
        requests.clear();
    }
}
