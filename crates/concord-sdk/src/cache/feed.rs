//! The invalidation feeds a cache depends on, and the one number that says whether its local
//! tier may be used.
//!
//! The state is `(generation << 1) | disabled`. `disabled` is set while any registered feed is
//! down; the generation moves on at every change. A local slot is only served when it was written
//! under the current state, and a load only stores what it loaded when the state did not change
//! while it ran: a feed that drops may have lost invalidations, so nothing read before or during
//! the gap may be kept.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

const DISABLED: u64 = 1;

/// Whether a state lets the local tier be used.
pub(crate) fn enabled(state: u64) -> bool {
    state & DISABLED == 0
}

struct Feed {
    name: String,
    up: bool,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    feeds: HashMap<u64, Feed>,
}

pub(crate) struct Feeds {
    table: Mutex<Table>,
    state: AtomicU64,
    changes: watch::Sender<u64>,
    flush: Box<dyn Fn() + Send + Sync>,
    disconnects: AtomicU64,
}

impl Feeds {
    /// `flush` empties the local tier; it runs after every change that disables it.
    pub(crate) fn new(flush: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            state: AtomicU64::new(0),
            changes: watch::channel(0).0,
            flush: Box::new(flush),
            disconnects: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> u64 {
        self.state.load(Ordering::SeqCst)
    }

    pub(crate) fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies `change` to the table and moves the state on when the table says so. The table
    /// lock is held until the new state is stored, so two changes never store out of order.
    fn change(&self, change: impl FnOnce(&mut Table) -> bool) {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !change(&mut table) {
            return;
        }
        let disabled = table.feeds.values().any(|feed| !feed.up);
        let generation = (self.state() >> 1) + 1;
        let state = (generation << 1) | u64::from(disabled);
        self.state.store(state, Ordering::SeqCst);
        self.changes.send_replace(state);
        drop(table);
        if disabled {
            (self.flush)();
        }
    }

    pub(crate) fn register(self: &Arc<Self>, name: &str) -> FeedHandle {
        let mut id = 0;
        self.change(|table| {
            id = table.next_id;
            table.next_id += 1;
            table.feeds.insert(
                id,
                Feed {
                    name: name.to_owned(),
                    up: false,
                },
            );
            true
        });
        FeedHandle {
            feeds: Arc::clone(self),
            id,
        }
    }

    fn set_up(&self, id: u64, up: bool) {
        self.change(|table| match table.feeds.get_mut(&id) {
            Some(feed) if feed.up != up => {
                feed.up = up;
                if up {
                    tracing::debug!(feed = %feed.name, "invalidation feed connected");
                } else {
                    self.disconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(feed = %feed.name, "invalidation feed lost: local cache tier flushed and bypassed");
                }
                true
            }
            _ => false,
        });
    }
}

/// A registered invalidation feed. While it is registered and not [`connected`](Self::connected)
/// the local tier is flushed and bypassed: reads go to the shared tier or the loader.
///
/// Dropping the handle removes the feed and flushes the local tier once (entries loaded while it
/// ran may have needed its later invalidations).
pub struct FeedHandle {
    feeds: Arc<Feeds>,
    id: u64,
}

impl fmt::Debug for FeedHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl FeedHandle {
    /// The feed is delivering: call it once the subscription is established, before the first
    /// event is handled.
    pub fn connected(&self) {
        self.feeds.set_up(self.id, true);
    }

    /// The feed stopped delivering (connection lost, subscription error): the local tier is
    /// flushed at once and bypassed until [`connected`](Self::connected).
    pub fn disconnected(&self) {
        self.feeds.set_up(self.id, false);
    }
}

impl Drop for FeedHandle {
    fn drop(&mut self) {
        let id = self.id;
        self.feeds.change(|table| {
            table.feeds.remove(&id);
            true
        });
        (self.feeds.flush)();
    }
}

/// Exponential reconnection pauses between `min` and `max`.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn feeds() -> (Arc<Feeds>, Arc<AtomicUsize>) {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&flushes);
        let feeds = Arc::new(Feeds::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        (feeds, flushes)
    }

    #[test]
    fn no_feed_means_enabled() {
        let (feeds, flushes) = feeds();
        assert!(enabled(feeds.state()));
        assert_eq!(flushes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn any_feed_down_disables_and_every_change_moves_the_state() {
        let (feeds, flushes) = feeds();
        let a = feeds.register("a");
        let registered = feeds.state();
        assert!(!enabled(registered));
        a.connected();
        let up = feeds.state();
        assert!(enabled(up));
        let b = feeds.register("b");
        assert!(!enabled(feeds.state()));
        b.connected();
        let both = feeds.state();
        assert!(enabled(both) && both != up);
        let flushed = flushes.load(Ordering::SeqCst);
        a.disconnected();
        assert!(!enabled(feeds.state()));
        assert_eq!(flushes.load(Ordering::SeqCst), flushed + 1);
        assert_eq!(feeds.disconnects(), 1);
        a.disconnected();
        assert_eq!(feeds.disconnects(), 1, "a repeated disconnect is no new change");
        a.connected();
        assert!(enabled(feeds.state()));
        assert_ne!(feeds.state(), both);
        drop(a);
        assert!(enabled(feeds.state()));
        drop(b);
        assert!(enabled(feeds.state()));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<_> = (0..4).map(|_| backoff.next_pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_pause().as_millis(), 100);
    }
}
