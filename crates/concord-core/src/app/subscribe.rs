//! Following the global log: catch up, then wait for new events, never skipping or repeating one.

use crate::domain::RecordedEvent;
use crate::ports::{EventStore, LogQuery, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often a follower re-reads the store when no signal arrived: a safety net for a lost
/// notification (for example while a database listener reconnects), not the normal path.
pub const FALLBACK_POLL: Duration = Duration::from_millis(1000);

/// A reader of the log that remembers the last position it returned.
pub struct LogFollower {
    store: Arc<dyn EventStore>,
    query: LogQuery,
    head: watch::Receiver<u64>,
}

impl LogFollower {
    #[must_use]
    pub fn new(store: Arc<dyn EventStore>, query: LogQuery) -> Self {
        let head = store.watch_head();
        Self { store, query, head }
    }

    /// The position of the last event returned (or the starting point).
    #[must_use]
    pub fn position(&self) -> u64 {
        self.query.after
    }

    /// The newest position this node has heard of; with [`Self::position`] it gives the lag.
    #[must_use]
    pub fn known_head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The next events after the last one returned, waiting up to `wait` for some to commit.
    /// Empty when none came in time.
    ///
    /// There is no gap between catch-up and live: both are the same read by position, and the
    /// signal is marked seen *before* each read, so an event that commits during the read wakes
    /// the next wait instead of being lost.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn next_batch(&mut self, wait: Duration) -> Result<Vec<RecordedEvent>, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            self.head.borrow_and_update();
            let events = self.store.read_log(&self.query).await?;
            if let Some(last) = events.last() {
                self.query.after = last.position;
                return Ok(events);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(events);
            }
            let nap = (deadline - now).min(FALLBACK_POLL);
            // A closed channel means the store is shutting down: fall back to the timer.
            tokio::select! {
                r = self.head.changed() => { if r.is_err() { tokio::time::sleep(nap).await; } }
                () = tokio::time::sleep(nap) => {}
            }
        }
    }
}
