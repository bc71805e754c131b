//! Delivers phase 2 in the background: right after a decision on this node, and for due rows
//! claimed from the database (retries, and transactions whose coordinator died).

use concord_core::app::tx::{HeldTx, TxCoordinator, TxDriveEnd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

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
            let xid = held.xid().to_owned();
            match me.coordinator.deliver(held).await {
                Ok(TxDriveEnd::Completed(_) | TxDriveEnd::Waiting(_) | TxDriveEnd::Lost) => {}
                Err(e) => tracing::warn!(tx.xid = %xid, error = %e, "phase 2 stopped; the lease will expire"),
            }
            drop(permit);
            me.wake.notify_one();
        });
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
