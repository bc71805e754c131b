//! Delivers phase 2 in the background: right after a decision on this node, and for due rows
//! claimed from the database (retries, and transactions whose coordinator died).

use concord_core::app::tx::{HeldTx, TxCoordinator, TxDriveEnd, TxFailure};
use concord_core::domain::tx::{Outcome, TxParticipant, TxState, Xid};
use concord_core::ports::TxRow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// Why a transaction could not be begun.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    /// The coordinator refused it, or the store failed before it was logged.
    #[error(transparent)]
    Tx(#[from] TxFailure),
    /// The task running it failed (a bug): nothing was logged that a retry would duplicate.
    #[error("the transaction's task failed: {0}")]
    Task(String),
}

/// The coordinator's worker on this node.
pub struct TxRunner {
    coordinator: Arc<TxCoordinator>,
    config: crate::worker::WorkerConfig,
    runs: bool,
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
}

impl TxRunner {
    #[must_use]
    pub fn new(coordinator: Arc<TxCoordinator>, config: crate::worker::WorkerConfig, runs: bool) -> Arc<Self> {
        Arc::new(Self {
            coordinator,
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            runs,
            wake: Arc::new(Notify::new()),
        })
    }

    #[must_use]
    pub fn coordinator(&self) -> &Arc<TxCoordinator> {
        &self.coordinator
    }

    /// Delivers phase 2 of a transaction decided here, if a slot is free and this node runs
    /// workers; otherwise gives it back to the queue.
    pub fn spawn(self: &Arc<Self>, held: HeldTx) {
        if let Some(permit) = self.runs.then(|| self.slots.clone().try_acquire_owned().ok()).flatten() {
            self.spawn_with(held, permit);
        } else {
            // Back to the queue, due now, so a node with room delivers it without waiting for
            // this lease to run out.
            let coordinator = self.coordinator.clone();
            tokio::spawn(async move {
                if let Err(e) = coordinator.release(held).await {
                    tracing::warn!(error = %e, "giving a transaction back failed; its lease will expire");
                }
            });
        }
    }

    fn spawn_with(self: &Arc<Self>, held: HeldTx, permit: OwnedSemaphorePermit) {
        let me = self.clone();
        tokio::spawn(async move {
            let xid = held.xid().clone();
            match me.coordinator.deliver(held).await {
                Ok(TxDriveEnd::Completed(_) | TxDriveEnd::Waiting(_) | TxDriveEnd::Lost) => {}
                Err(e) => tracing::warn!(tx.xid = %xid, error = %e, "phase 2 stopped; the lease will expire"),
            }
            drop(permit);
            me.wake.notify_one();
        });
    }

    /// Runs a transaction to its durable decision, then phase 2 in the background. The work
    /// runs in a task of its own: a caller that goes away in the middle of phase 1 would
    /// otherwise leave the participants prepared until recovery presumed an abort. Answers the
    /// xid and the decision, none when it could not be confirmed (recovery finishes it).
    ///
    /// # Errors
    /// What the coordinator refuses, or a store failure before the transaction was logged.
    pub async fn begin(
        self: &Arc<Self>,
        participants: Vec<TxParticipant>,
        timeout_ms: u64,
        trace: Option<String>,
        xid: Option<Xid>,
    ) -> Result<(Xid, Option<Outcome>), BeginError> {
        let runner = Arc::clone(self);
        tokio::spawn(async move {
            let begun = runner
                .coordinator
                .begin(participants, timeout_ms, trace.as_deref(), xid)
                .await?;
            // The decision is durable: phase 2 goes on in the background.
            if let Some(held) = begun.held {
                runner.spawn(held);
            }
            Ok::<_, TxFailure>((begun.xid, begun.outcome))
        })
        .await
        .map_err(|e| BeginError::Task(e.to_string()))?
        .map_err(BeginError::Tx)
    }

    /// A transaction's row and the state its log records; `None`s for an unknown xid.
    ///
    /// # Errors
    /// A store failure.
    pub async fn view(&self, xid: &Xid) -> Result<(Option<TxRow>, Option<TxState>), TxFailure> {
        let row = self.coordinator.store().get_tx(xid).await?;
        let log = self.coordinator.read_log(xid).await?;
        Ok((row, log))
    }

    /// Transactions in xid order: with an outcome (`Some(None)`: undecided), pending or not,
    /// after `after`, at most `limit`.
    ///
    /// # Errors
    /// A store failure.
    pub async fn list(
        &self,
        outcome: Option<Option<Outcome>>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRow>, TxFailure> {
        Ok(self
            .coordinator
            .store()
            .list_txs(outcome, pending, after, limit)
            .await?)
    }

    /// Claims and delivers until `stopping` turns true (see [`crate::worker::run`]).
    pub async fn run(self: Arc<Self>, stopping: watch::Receiver<bool>, grace: Duration) {
        let (slots, wake, config) = (self.slots.clone(), self.wake.clone(), self.config);
        crate::worker::run(self, slots, wake, config, stopping, grace).await;
    }
}

#[async_trait::async_trait]
impl crate::worker::Claims for TxRunner {
    type Item = HeldTx;

    async fn claim(&self, n: usize) -> Result<Vec<HeldTx>, String> {
        self.coordinator.claim(n).await.map_err(|e| e.to_string())
    }

    fn start(self: &Arc<Self>, item: HeldTx, permit: OwnedSemaphorePermit) {
        self.spawn_with(item, permit);
    }

    async fn tick(&self) {
        match self.coordinator.store().pending_txs().await {
            Ok((n, oldest)) => {
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("concord_tx_in_doubt").set(n as f64);
                let age = oldest.map_or(0.0, |t| {
                    (chrono::Utc::now() - t).to_std().unwrap_or_default().as_secs_f64()
                });
                metrics::gauge!("concord_tx_in_doubt_oldest_seconds").set(age);
            }
            Err(e) => tracing::warn!(error = %e, "counting pending transactions failed"),
        }
    }
}
