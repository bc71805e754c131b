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

/// Work that queues in front of one writer, which takes everything waiting (up to a total
/// weight) in one call: appends in one transaction, vault records in one statement, audit
/// records in one append. Each item gets its own output.
#[async_trait]
pub trait Drain: Send + Sync + 'static {
    /// The `queue` label of the batch metrics (`concord_batch_items`, `concord_batch_seconds`).
    const QUEUE: &'static str;
    type Item: Send + 'static;
    type Output: Send + 'static;
    /// How much of the batch limit an item takes (at least 1 is counted).
    fn weight(item: &Self::Item) -> usize;
    /// Writes a batch: one output per item, in order.
    async fn write(&self, batch: Vec<Self::Item>) -> Vec<Self::Output>;
}

type Job<D> = (<D as Drain>::Item, oneshot::Sender<<D as Drain>::Output>);

/// A queue in front of a [`Drain`]. While a batch is being written, new items queue up, so
/// batches grow with concurrency and the cost of a write is shared; a lone item is written at
/// once, without waiting for company.
pub struct Batcher<D: Drain> {
    queue: mpsc::Sender<Job<D>>,
}

impl<D: Drain> Clone for Batcher<D> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<D: Drain> Batcher<D> {
    /// Starts the writer task on the current tokio runtime. It ends when every clone is dropped.
    /// At most `queue_len` items wait; callers beyond it wait for room (back-pressure).
    pub fn spawn(drain: Arc<D>, max_weight: usize, queue_len: usize) -> Self {
        let (queue, rx) = mpsc::channel(queue_len.max(1));
        tokio::spawn(drain_queue(drain, rx, max_weight.max(1)));
        Self { queue }
    }

    /// Room left in the queue.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Queues an item and waits for the batch that writes it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the writer has stopped.
    pub async fn submit(&self, item: D::Item) -> Result<D::Output, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((item, tx))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer dropped the item".into()))
    }
}

async fn drain_queue<D: Drain>(drain: Arc<D>, mut rx: mpsc::Receiver<Job<D>>, max_weight: usize) {
    // An item that would have pushed a batch over the limit opens the next one.
    let mut carried: Option<Job<D>> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut weight = D::weight(&first.0).max(1);
        let mut items = vec![first.0];
        let mut replies = vec![first.1];
        while weight < max_weight {
            match rx.try_recv() {
                Ok((item, reply)) if weight + D::weight(&item).max(1) > max_weight => {
                    carried = Some((item, reply));
                    break;
                }
                Ok((item, reply)) => {
                    weight += D::weight(&item).max(1);
                    items.push(item);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("concord_batch_items", "queue" => D::QUEUE).record(items.len() as f64);
        let started = std::time::Instant::now();
        let outputs = drain.write(items).await;
        metrics::histogram!("concord_batch_seconds", "queue" => D::QUEUE).record(started.elapsed().as_secs_f64());
        for (reply, output) in replies.into_iter().zip(outputs) {
            // A caller that gave up waiting is no reason to stop the writer.
            let _ = reply.send(output);
        }
    }
}

/// Queue of appends in front of a [`BatchWriter`].
#[derive(Clone)]
pub struct GroupCommitter {
    queue: Batcher<Appends>,
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

/// Appends drained into one transaction, weighed by their events.
struct Appends(Arc<dyn BatchWriter>);

#[async_trait]
impl Drain for Appends {
    const QUEUE: &'static str = "appends";
    type Item = AppendRequest;
    type Output = Result<AppendOutcome, StoreError>;

    fn weight(item: &AppendRequest) -> usize {
        item.events.len()
    }

    async fn write(&self, batch: Vec<AppendRequest>) -> Vec<Self::Output> {
        let started = std::time::Instant::now();
        let results = self.0.write_batch(&batch).await;
        metrics::histogram!("concord_group_commit_duration_seconds").record(started.elapsed().as_secs_f64());
        debug_assert_eq!(results.len(), batch.len());
        metrics::histogram!("concord_group_commit_batch_appends").record(batch.len() as f64);
        metrics::counter!("concord_group_commit_transactions_total").increment(1);
        results
    }
}

impl GroupCommitter {
    /// Starts the writer task on the current tokio runtime. It ends when every clone is dropped.
    pub fn spawn<W: BatchWriter>(writer: Arc<W>, limits: GroupCommitLimits) -> Self {
        let writer: Arc<dyn BatchWriter> = writer;
        Self {
            queue: Batcher::spawn(Arc::new(Appends(writer)), limits.max_batch_events, limits.queue_len),
        }
    }

    /// Queues an append and waits for its transaction.
    ///
    /// # Errors
    /// The append's own error, or [`StoreError::Unavailable`] when the writer has stopped.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.queue.submit(request).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ExpectedVersion;
    use crate::testkit;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// Records batch sizes as they enter; every batch waits for a permit, so appends queue behind it.
    struct GatedWriter {
        gate: Semaphore,
        entered: Mutex<Vec<usize>>,
        events: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl BatchWriter for GatedWriter {
        async fn write_batch(&self, batch: &[AppendRequest]) -> Vec<Result<AppendOutcome, StoreError>> {
            self.entered.lock().unwrap().push(batch.len());
            self.events
                .lock()
                .unwrap()
                .push(batch.iter().map(|r| r.events.len()).sum());
            let _permit = self.gate.acquire().await.expect("gate open");
            let ok = AppendOutcome {
                first_version: 1,
                last_version: 1,
                position: 1,
            };
            batch.iter().map(|_| Ok(ok)).collect()
        }
    }

    async fn run_gated(appends: usize, limits: GroupCommitLimits) -> Vec<usize> {
        let writer = Arc::new(GatedWriter {
            gate: Semaphore::new(0),
            entered: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        });
        let committer = GroupCommitter::spawn(writer.clone(), limits);
        let tasks: Vec<_> = (0..appends)
            .map(|i| {
                let c = committer.clone();
                tokio::spawn(async move {
                    c.append(testkit::append(&format!("s-{i}"), ExpectedVersion::Any, &["E"]))
                        .await
                })
            })
            .collect();
        // Wait until the first commit is in flight and every other append is queued behind it.
        loop {
            let first = writer.entered.lock().unwrap().first().copied();
            let queued = limits.queue_len - committer.queue.capacity();
            if first.is_some_and(|f| f + queued == appends) {
                break;
            }
            tokio::task::yield_now().await;
        }
        writer.gate.add_permits(1000);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let entered = writer.entered.lock().unwrap().clone();
        assert_eq!(entered.iter().sum::<usize>(), appends);
        entered
    }

    #[tokio::test]
    async fn appends_waiting_behind_a_commit_share_the_next_transaction() {
        let batches = run_gated(20, GroupCommitLimits::default()).await;
        // At most one commit in flight alone, then one for everything that waited behind it.
        assert!(batches.len() <= 2, "{batches:?}");
        assert!(batches.last().is_some_and(|b| *b >= 10), "{batches:?}");
    }

    #[tokio::test]
    async fn a_batch_never_exceeds_the_event_limit() {
        let batches = run_gated(
            12,
            GroupCommitLimits {
                max_batch_events: 5,
                queue_len: 100,
            },
        )
        .await;
        assert!(batches.iter().all(|b| *b <= 5), "{batches:?}");
        assert!(batches.len() >= 3);
    }

    #[tokio::test]
    async fn an_append_that_would_overflow_a_batch_waits_for_the_next_one() {
        let writer = Arc::new(GatedWriter {
            gate: Semaphore::new(1000),
            entered: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        });
        let committer = GroupCommitter::spawn(
            writer.clone(),
            GroupCommitLimits {
                max_batch_events: 5,
                queue_len: 100,
            },
        );
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let c = committer.clone();
                tokio::spawn(async move {
                    c.append(testkit::append(&format!("s-{i}"), ExpectedVersion::Any, &["E", "F"]))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let events = writer.events.lock().unwrap().clone();
        assert_eq!(events.iter().sum::<usize>(), 24);
        assert!(events.iter().all(|e| *e <= 5), "{events:?}");
    }
}
