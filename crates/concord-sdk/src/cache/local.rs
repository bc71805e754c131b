//! The in-process tier: a moka cache of slots, each tagged with the feed state it was written
//! under so that a flush is one atomic store (see [`super::feed`]) rather than a sweep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache as Moka;
use moka::ops::compute::{CompResult, Op};

use super::entry::{Cached, Rank, rank};

/// One local entry. `value` is `None` for a tombstone.
pub(crate) struct Slot<V> {
    /// The feed state ([`super::feed::Feeds::state`]) the slot was written under; a slot of any
    /// other state is treated as absent.
    pub(crate) state: u64,
    pub(crate) version: u64,
    pub(crate) value: Option<Arc<V>>,
}

impl<V> Slot<V> {
    pub(crate) fn rank(&self) -> Rank {
        rank(self.version, self.value.is_some())
    }

    fn to_cached(&self) -> Cached<V>
    where
        V: Clone,
    {
        match &self.value {
            Some(value) => Cached::Value {
                value: V::clone(value),
                version: self.version,
            },
            None => Cached::Tombstone { version: self.version },
        }
    }
}

struct SlotExpiry {
    value_ttl: Duration,
    tombstone_ttl: Duration,
}

impl SlotExpiry {
    fn ttl<V>(&self, slot: &Slot<V>) -> Duration {
        if slot.value.is_some() {
            self.value_ttl
        } else {
            self.tombstone_ttl
        }
    }
}

impl<V: Send + Sync + 'static> Expiry<String, Arc<Slot<V>>> for SlotExpiry {
    fn expire_after_create(&self, _key: &String, slot: &Arc<Slot<V>>, _created_at: Instant) -> Option<Duration> {
        Some(self.ttl(slot))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        slot: &Arc<Slot<V>>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.ttl(slot))
    }
}

pub(crate) struct Local<V> {
    cache: Moka<String, Arc<Slot<V>>>,
    /// Capacity zero: the tier is off.
    off: bool,
}

impl<V: Send + Sync + 'static> Local<V> {
    pub(crate) fn new(capacity: u64, value_ttl: Duration, tombstone_ttl: Duration) -> Self {
        let cache = Moka::builder()
            .max_capacity(capacity)
            .expire_after(SlotExpiry {
                value_ttl,
                tombstone_ttl,
            })
            .build();
        Self {
            cache,
            off: capacity == 0,
        }
    }

    /// The slot of `key` written under `state`, if any.
    pub(crate) async fn get(&self, key: &str, state: u64) -> Option<Arc<Slot<V>>> {
        if self.off {
            return None;
        }
        self.cache.get(key).await.filter(|slot| slot.state == state)
    }

    /// Stores `slot` unless an entry of the same state with an equal or higher rank is there, or
    /// `allowed` (called under moka's per-key lock, which every write of this module takes, so
    /// nothing can slip in between the check and the write) says no. Returns whether it stored.
    pub(crate) async fn put_if_newer(&self, key: &str, slot: Slot<V>, allowed: impl FnOnce() -> bool) -> bool {
        if self.off {
            return false;
        }
        let new_rank = slot.rank();
        let slot_state = slot.state;
        let slot = Arc::new(slot);
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(move |existing| {
                let newer = existing.is_none_or(|existing| {
                    let existing = existing.value();
                    existing.state != slot_state || existing.rank() < new_rank
                });
                std::future::ready(if newer && allowed() { Op::Put(slot) } else { Op::Nop })
            })
            .await;
        matches!(result, CompResult::Inserted(_) | CompResult::ReplacedWith(_))
    }

    pub(crate) fn len(&self, state: u64) -> usize {
        self.cache.iter().filter(|(_, slot)| slot.state == state).count()
    }

    pub(crate) fn snapshot(&self, state: u64) -> Vec<(String, Cached<V>)>
    where
        V: Clone,
    {
        self.cache
            .iter()
            .filter(|(_, slot)| slot.state == state)
            .map(|(key, slot)| (String::clone(&key), slot.to_cached()))
            .collect()
    }

    pub(crate) async fn entry(&self, key: &str, state: u64) -> Option<Cached<V>>
    where
        V: Clone,
    {
        self.get(key, state).await.map(|slot| slot.to_cached())
    }

    /// The flush hook of the feeds. The feed state has already moved on when it runs, so the
    /// slots are dead already; this frees their memory early.
    pub(crate) fn flusher(&self) -> impl Fn() + Send + Sync + 'static {
        let cache = self.cache.clone();
        move || cache.invalidate_all()
    }
}
