//! The loop every background worker of a node runs: claim due work from the database (where
//! leases share it between nodes), start each item in a free slot, repeat every poll interval;
//! on shutdown, wait a grace period for the items in flight.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// Settings of a worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    pub poll: Duration,
    pub max_concurrent: usize,
    pub claim_batch: usize,
}

/// What a worker claims and runs.
#[async_trait]
pub trait Claims: Send + Sync + 'static {
    type Item: Send + 'static;
    /// Takes up to `n` due items, leased to this node.
    async fn claim(&self, n: usize) -> Result<Vec<Self::Item>, String>;
    /// Runs one item in the background; the permit is its slot, dropped when it ends.
    fn start(self: &Arc<Self>, item: Self::Item, permit: OwnedSemaphorePermit);
    /// Called about every 10 s (gauges).
    async fn tick(&self) {}
}

/// Claims and starts items until `stopping` turns true, then waits up to `grace` for the items
/// in flight; what is left is picked up elsewhere when its lease expires. `wake` is poked when a
/// slot frees up.
pub async fn run<C: Claims>(
    work: Arc<C>,
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
    config: WorkerConfig,
    mut stopping: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut last_tick = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        if *stopping.borrow() {
            break;
        }
        // Take the slots first, so a claim never takes more than this node can run.
        let mut permits: Vec<OwnedSemaphorePermit> = std::iter::from_fn(|| slots.clone().try_acquire_owned().ok())
            .take(config.claim_batch.max(1))
            .collect();
        let free = permits.len();
        let mut claimed = 0;
        if free > 0 {
            match work.claim(free).await {
                Ok(items) => {
                    claimed = items.len();
                    for item in items {
                        if let Some(p) = permits.pop() {
                            work.start(item, p);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming work failed"),
            }
        }
        drop(permits);
        if last_tick.elapsed() >= Duration::from_secs(10) {
            last_tick = tokio::time::Instant::now();
            work.tick().await;
        }
        // A full batch suggests more is due: look again at once.
        if claimed > 0 && claimed == free {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(config.poll) => {}
            () = wake.notified(), if free == 0 => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    let all = u32::try_from(config.max_concurrent.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}
