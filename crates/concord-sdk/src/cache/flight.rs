//! Per-key records of the loads and sets in progress: single-flight (one loader call per key at a
//! time, the other callers wait for its outcome) and the invalidations that arrived while they
//! ran.
//!
//! A record lives while a load or set of its key runs. An invalidation raises the record's
//! `invalidated` watermark, and a write checks it under moka's per-key lock, so a value older than
//! an invalidation that arrived during its load is never stored, whether or not the tombstone is
//! still in the local tier (moka may evict it when full). An invalidation that arrives when no
//! record exists needs none: every later load reads after it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::CacheError;

/// What one load gives every caller that waited on it.
pub(crate) type Outcome<V> = Result<Option<Arc<V>>, CacheError>;
type OutcomeRx<V> = watch::Receiver<Option<Outcome<V>>>;

#[derive(Default)]
pub(crate) struct Record {
    invalidated: AtomicU64,
}

impl Record {
    /// Whether an invalidation newer than `version` arrived since the record was created: a value
    /// at `version` is then stale.
    pub(crate) fn outdates(&self, version: u64) -> bool {
        self.invalidated.load(Ordering::SeqCst) > version
    }
}

struct KeyState<V> {
    record: Arc<Record>,
    users: usize,
    flight: Option<OutcomeRx<V>>,
}

pub(crate) struct Flights<V> {
    keys: Mutex<HashMap<String, KeyState<V>>>,
}

/// How a caller takes part in a load.
pub(crate) enum Join<'a, V> {
    /// The caller runs the load and must [`Leader::finish`] it.
    Lead(Leader<'a, V>),
    /// Another caller runs it: wait with [`wait`].
    Follow(OutcomeRx<V>),
}

impl<V> Flights<V> {
    pub(crate) fn new() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, KeyState<V>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn user<'a>(keys: &'a mut HashMap<String, KeyState<V>>, key: &str) -> &'a mut KeyState<V> {
        let state = keys.entry(key.to_owned()).or_insert_with(|| KeyState {
            record: Arc::default(),
            users: 0,
            flight: None,
        });
        state.users += 1;
        state
    }

    /// Leads the load of `key`, or follows the one in progress.
    pub(crate) fn join(&self, key: &str) -> Join<'_, V> {
        let mut keys = self.lock();
        if let Some(rx) = keys.get(key).and_then(|state| state.flight.clone()) {
            return Join::Follow(rx);
        }
        let (tx, rx) = watch::channel(None);
        let state = Self::user(&mut keys, key);
        state.flight = Some(rx);
        let record = Arc::clone(&state.record);
        Join::Lead(Leader {
            user: User {
                flights: self,
                key: key.to_owned(),
                record,
                leads: true,
            },
            tx,
        })
    }

    /// Registers a write of `key` that is not a load (a versioned set), so that invalidations
    /// arriving meanwhile are seen.
    pub(crate) fn guard(&self, key: &str) -> User<'_, V> {
        let mut keys = self.lock();
        let record = Arc::clone(&Self::user(&mut keys, key).record);
        User {
            flights: self,
            key: key.to_owned(),
            record,
            leads: false,
        }
    }

    /// Records an invalidation of `key` at `version` for the loads and sets in progress.
    pub(crate) fn invalidated(&self, key: &str, version: u64) {
        if let Some(state) = self.lock().get(key) {
            state.record.invalidated.fetch_max(version, Ordering::SeqCst);
        }
    }

    fn leave(&self, key: &str, leads: bool) {
        let mut keys = self.lock();
        if let Entry::Occupied(mut entry) = keys.entry(key.to_owned()) {
            let state = entry.get_mut();
            if leads {
                state.flight = None;
            }
            state.users -= 1;
            if state.users == 0 {
                entry.remove();
            }
        }
    }
}

/// A registered load or set of one key; leaves the record when dropped.
pub(crate) struct User<'a, V> {
    flights: &'a Flights<V>,
    key: String,
    record: Arc<Record>,
    leads: bool,
}

impl<V> User<'_, V> {
    pub(crate) fn record(&self) -> &Arc<Record> {
        &self.record
    }
}

impl<V> Drop for User<'_, V> {
    fn drop(&mut self) {
        self.flights.leave(&self.key, self.leads);
    }
}

/// The caller running a load. Dropped without [`finish`](Self::finish) (the caller was cancelled),
/// it leaves first and then closes the channel, so the followers that wake to a closed channel
/// find no flight and one of them leads a new load.
pub(crate) struct Leader<'a, V> {
    // Field order matters: `user` (which leaves the record) drops before `tx` closes the channel.
    user: User<'a, V>,
    tx: watch::Sender<Option<Outcome<V>>>,
}

impl<V> Leader<'_, V> {
    pub(crate) fn record(&self) -> &Arc<Record> {
        self.user.record()
    }

    /// Hands `outcome` to the followers, then leaves. A caller that joins in between still
    /// receives it.
    pub(crate) fn finish(self, outcome: Outcome<V>) {
        self.tx.send_replace(Some(outcome));
    }
}

/// Waits for the leader's outcome; `None` when the leader was cancelled.
pub(crate) async fn wait<V>(mut rx: OutcomeRx<V>) -> Option<Outcome<V>> {
    let outcome = rx.wait_for(Option::is_some).await.ok()?;
    outcome.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_caller_leads_and_the_others_follow() {
        let flights = Flights::<u32>::new();
        let Join::Lead(leader) = flights.join("k") else {
            panic!("the first caller leads")
        };
        assert!(matches!(flights.join("k"), Join::Follow(_)));
        assert!(matches!(flights.join("other"), Join::Lead(_)));
        leader.finish(Ok(None));
        assert!(matches!(flights.join("k"), Join::Lead(_)));
        assert!(flights.lock().is_empty());
    }

    #[tokio::test]
    async fn followers_get_the_outcome_or_learn_the_leader_is_gone() {
        let flights = Flights::<u32>::new();
        let Join::Lead(leader) = flights.join("k") else {
            panic!()
        };
        let Join::Follow(rx) = flights.join("k") else { panic!() };
        leader.finish(Ok(Some(Arc::new(7))));
        assert_eq!(wait(rx).await.unwrap().unwrap().as_deref(), Some(&7));

        let Join::Lead(leader) = flights.join("k") else {
            panic!()
        };
        let Join::Follow(rx) = flights.join("k") else { panic!() };
        drop(leader);
        assert!(wait(rx).await.is_none());
        assert!(matches!(flights.join("k"), Join::Lead(_)));
    }

    #[test]
    fn invalidations_reach_the_records_in_progress_only() {
        let flights = Flights::<u32>::new();
        flights.invalidated("k", 9);
        let set = flights.guard("k");
        assert!(!set.record().outdates(0));
        let Join::Lead(leader) = flights.join("k") else {
            panic!()
        };
        flights.invalidated("k", 5);
        flights.invalidated("k", 3);
        assert!(leader.record().outdates(4));
        assert!(!leader.record().outdates(5));
        assert!(set.record().outdates(4));
        drop(leader);
        drop(set);
        assert!(flights.lock().is_empty());
    }
}
