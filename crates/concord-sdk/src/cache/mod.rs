//! The read-through cache: a local tier in the process (moka) in front of an optional shared tier
//! (Redis), filled by the service's own loader, kept fresh by versioned writes and by
//! invalidations that travel between instances.
//!
//! # Versions
//!
//! Every entry carries a `u64` version: the row's version, or the log position of the last event
//! folded into the value. The loader returns it with the value, and writers invalidate with the
//! version their change produced. A write replaces an entry only when it is newer: a higher
//! version, or a value at the version of a tombstone (a tombstone at `w` says "changed at `w`",
//! so a value loaded at `w` is the change itself). Hence a slow loader that read the database
//! before a write can never overwrite what the write left behind, in either tier. Use one version
//! space per cache: the log feed ([`Cache::spawn_log_invalidation`]) invalidates at log
//! positions, so a cache it feeds must load log positions too.
//!
//! # How a read goes
//!
//! [`Cache::get_or_load`]: a value in the local tier is returned; otherwise one caller per key
//! and process (single flight: a thousand concurrent callers make one loader call) reads Redis,
//! and on a miss (or a tombstone) runs the loader, then stores the value in Redis and locally.
//! The loader answers `Ok(Some((value, version)))`, `Ok(None)` when there is no such item
//! (nothing is cached: the next read asks the loader again), or an error, which every waiting
//! caller receives as [`CacheError::Load`] and which is not cached either. A result older than a
//! tombstone either tier holds, or than an invalidation that arrived while the loader ran, is
//! stale: the loader runs again (up to [`CacheConfig::load_attempts`] calls in all), and a stale
//! result is returned to the callers waiting on that load but never stored.
//!
//! # How invalidations travel
//!
//! - [`Cache::invalidate`], called by the writer after its transaction committed, writes a
//!   tombstone in Redis and publishes the invalidation on the channel in one script, then applies
//!   it locally. Every instance with a shared tier subscribes to the channel in a background task
//!   and drops its local entry.
//! - [`Cache::apply_invalidation`] is for a feed that every instance receives by itself (the
//!   event log, a broker subscription that is not a consumer group): tombstone in Redis and
//!   locally, nothing published. [`Cache::spawn_log_invalidation`] follows the Concord log with it;
//!   a service that consumes a broker registers its consumer with [`Cache::register_feed`].
//! - Tombstones expire after [`CacheConfig::tombstone_ttl`], which the configuration check keeps
//!   longer than any load may take.
//!
//! # When something is down
//!
//! - A feed that disconnects (the pub/sub connection, the log subscription, a registered feed)
//!   may have lost invalidations: the local tier is flushed at once and neither served nor filled
//!   until every feed is back; loads that began before or during the gap store nothing in either
//!   tier. Reads go to Redis and the loader meanwhile.
//! - Redis down never fails a read: reads fall back to the loader (each Redis command gives up
//!   after [`RedisConfig::op_timeout`], and after a failure reads skip Redis for
//!   [`RedisConfig::failure_cooldown`]). Writes report it: [`Cache::invalidate`] applies the local
//!   part and returns [`CacheError::Shared`] or [`CacheError::SharedTimeout`]; retry it (it is
//!   idempotent), or rely on a log feed, which resumes from the last event it fully applied.
//! - Tombstones must live until they expire. Run Redis with `maxmemory-policy noeviction` (its
//!   default) or memory enough never to evict: every key of the cache has a TTL, so even the
//!   `volatile-*` policies may drop a tombstone early. The local tier may evict one when full;
//!   loads stay safe (an invalidation that arrives during a load is recorded with the load, and
//!   the shared tier keeps its own tombstone), but a local-only cache's [`Cache::set`] relies on
//!   the tombstone: size [`CacheConfig::local_capacity`] for it.
//!
//! # Redis layout
//!
//! `{key_prefix}{key}` holds `{version:020}{T|V}{json}` with a TTL ([`RedisConfig::ttl`] for
//! values, [`CacheConfig::tombstone_ttl`] for tombstones); versioned writes are one Lua script
//! (`EVALSHA`) comparing the 21-byte header. Invalidations are published on
//! [`RedisConfig::channel`] as `{version}:{key_prefix}{key}`.
//!
//! # Example
//!
//! ```no_run
//! use concord_sdk::cache::{Cache, CacheConfig, RedisConfig};
//! use serde::{Deserialize, Serialize};
//! use sqlx::SqlitePool;
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Product {
//!     name: String,
//!     price: i64,
//! }
//!
//! type BoxError = Box<dyn std::error::Error>;
//!
//! /// A read: the cache, else the database.
//! async fn product(cache: &Cache<Product>, pool: &SqlitePool, id: &str) -> Result<Option<Product>, BoxError> {
//!     let found = cache
//!         .get_or_load(id, || async {
//!             let row: Option<(String, i64, i64)> =
//!                 sqlx::query_as("SELECT name, price, version FROM products WHERE id = ?")
//!                     .bind(id)
//!                     .fetch_optional(pool)
//!                     .await?;
//!             Ok::<_, sqlx::Error>(row.map(|(name, price, version)| {
//!                 (Product { name, price }, u64::try_from(version).unwrap_or(0))
//!             }))
//!         })
//!         .await?;
//!     Ok(found)
//! }
//!
//! /// A write: commit, then invalidate at the version it produced.
//! async fn reprice(cache: &Cache<Product>, pool: &SqlitePool, id: &str, price: i64) -> Result<(), BoxError> {
//!     let (version,): (i64,) =
//!         sqlx::query_as("UPDATE products SET price = ?, version = version + 1 WHERE id = ? RETURNING version")
//!             .bind(price)
//!             .bind(id)
//!             .fetch_one(pool)
//!             .await?;
//!     // After the commit: other instances drop their copy, and no older load may store one.
//!     cache.invalidate(id, u64::try_from(version)?).await?;
//!     Ok(())
//! }
//!
//! # async fn start() -> Result<(), BoxError> {
//! let redis = redis::Client::open("redis://127.0.0.1:6379")?;
//! let cache: Cache<Product> = Cache::with_redis(
//!     CacheConfig::default(),
//!     redis,
//!     RedisConfig { key_prefix: "shop:product:".into(), ..RedisConfig::default() },
//! )?;
//! // Optional: wait for the invalidation feed before taking traffic (reads work before it too).
//! cache.ready(std::time::Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```

mod config;
mod entry;
mod feed;
mod flight;
mod local;
mod log;
mod shared;

use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::AbortHandle;

pub use config::{CacheConfig, RedisConfig};
pub use entry::Cached;
pub use feed::FeedHandle;
pub use log::LogFeed;

use crate::{Client, EventOut};
use feed::{Backoff, Feeds, enabled};
use flight::{Flights, Join, Outcome, Record};
use local::{Local, Slot};
use shared::{Shared, Subscription};

/// What went wrong. Reads only fail for the caller's own reasons (a bad key, the loader); the
/// shared tier being down is never one of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The key is empty or too long. A bug or bad input at the caller: refuse the request (400).
    #[error("invalid cache key: {0}")]
    InvalidKey(KeyError),
    /// The configuration is inconsistent, or a cache with a shared tier was built outside a tokio
    /// runtime. Fix the configuration.
    #[error("invalid cache configuration: {0}")]
    Config(String),
    /// The loader failed; every caller that waited on that load gets this. Nothing was cached:
    /// answer as the loader's error deserves (usually 5xx) and let the next read try again.
    #[error("loader failed: {0}")]
    Load(Arc<dyn StdError + Send + Sync>),
    /// The loader did not finish within [`CacheConfig::load_timeout`]. Treat as a loader failure.
    #[error("loader did not finish within {0:?}")]
    LoadTimeout(Duration),
    /// The value cannot be serialized for the shared tier (a `Serialize` impl that fails).
    #[error("cannot encode the value: {0}")]
    Encode(Arc<serde_json::Error>),
    /// Redis answered an error or the connection failed. From writes only; the local part of the
    /// write was applied. Retry: every write is idempotent.
    #[error("shared tier: {0}")]
    Shared(redis::RedisError),
    /// Redis did not answer within [`RedisConfig::op_timeout`]. As [`CacheError::Shared`].
    #[error("shared tier did not answer within {0:?}")]
    SharedTimeout(Duration),
    /// Redis failed moments ago and reads skip it for [`RedisConfig::failure_cooldown`]. Only
    /// from [`Cache::shared_entry`]; try again later.
    #[error("shared tier skipped after a recent failure")]
    SharedUnavailable,
}

/// Why a key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is empty.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than [`CacheConfig::max_key_bytes`].
    #[error("the key is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
}

/// What one tier did with a [`Cache::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierWrite {
    /// The value is stored.
    Stored,
    /// An entry of equal or newer rank is there (or an invalidation newer than the value arrived
    /// meanwhile); nothing changed.
    Refused,
    /// The tier was not written: there is no shared tier, the value is larger than
    /// [`RedisConfig::max_value_bytes`], or the local tier is off or bypassed while a feed is down.
    Skipped,
}

/// The answer of [`Cache::set`], per tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetOutcome {
    /// The local tier.
    pub local: TierWrite,
    /// The shared tier.
    pub shared: TierWrite,
}

/// Counters since the cache was built, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered by the local tier.
    pub local_hits: u64,
    /// Reads answered by Redis.
    pub shared_hits: u64,
    /// Loader calls.
    pub loads: u64,
    /// Loader calls that failed or timed out.
    pub load_errors: u64,
    /// Loader results older than an invalidation that arrived during the load (not stored).
    pub stale_loads: u64,
    /// Writes a tier refused: it held an equal or newer entry, or an invalidation, a lost feed or
    /// the load deadline overtook the write.
    pub refused_writes: u64,
    /// Redis commands that failed or timed out.
    pub shared_errors: u64,
    /// Invalidations applied to the local tier (from any source).
    pub invalidations: u64,
    /// Times a feed was lost (each flushed the local tier).
    pub feed_disconnects: u64,
}

#[derive(Default)]
struct Counters {
    local_hits: AtomicU64,
    shared_hits: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    stale_loads: AtomicU64,
    refused_writes: AtomicU64,
    shared_errors: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A read-through cache of `V`. Cheap to clone: clones share the tiers. Background tasks (the
/// pub/sub subscriber, log followers) stop when the last clone is dropped.
pub struct Cache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> fmt::Debug for Cache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.inner.config)
            .field("redis", &self.inner.shared.as_ref().map(|shared| &shared.config))
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner<V> {
    config: CacheConfig,
    local: Local<V>,
    shared: Option<Shared>,
    feeds: Arc<Feeds>,
    flights: Flights<V>,
    counters: Counters,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl<V> Drop for Inner<V> {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }
}

impl<V> Cache<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A cache with the local tier only: the embedded default, for one instance (or for
    /// instances that each receive every invalidation through a feed they register).
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`] when the configuration is inconsistent.
    pub fn local(config: CacheConfig) -> Result<Self, CacheError> {
        config.validate()?;
        Ok(Self::build(config, None))
    }

    /// A cache with a shared tier on Redis. Connects lazily and never waits for Redis: it starts
    /// the pub/sub subscriber in the background, and until it is subscribed the local tier is
    /// bypassed (see [`Cache::ready`]).
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`] when the configuration is inconsistent or no tokio runtime runs.
    pub fn with_redis(config: CacheConfig, client: redis::Client, redis: RedisConfig) -> Result<Self, CacheError> {
        config.validate()?;
        redis.validate(&config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CacheError::Config("a cache with a shared tier must be built inside a tokio runtime".into())
        })?;
        let shared = Shared::new(client, redis, config.tombstone_ttl)?;
        let cache = Self::build(config, Some(shared));
        let feed = cache.inner.feeds.register("redis pub/sub");
        let task = runtime.spawn(subscribe(Arc::downgrade(&cache.inner), feed, cache.backoff()));
        cache
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task.abort_handle());
        Ok(cache)
    }

    fn build(config: CacheConfig, shared: Option<Shared>) -> Self {
        let local = Local::new(config.local_capacity, config.local_ttl, config.tombstone_ttl);
        let feeds = Arc::new(Feeds::new(local.flusher()));
        Self {
            inner: Arc::new(Inner {
                config,
                local,
                shared,
                feeds,
                flights: Flights::new(),
                counters: Counters::default(),
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.inner.config.reconnect_min, self.inner.config.reconnect_max)
    }

    /// The value of `key`: from the local tier, else from Redis, else from `loader`, which
    /// answers `Ok(Some((value, version)))`, `Ok(None)` for "no such item", or an error.
    /// Concurrent callers of one key share one load; the loader is called again only when its
    /// result is stale (older than a tombstone, or than an invalidation that arrived meanwhile).
    /// A loader must not read this cache's entry for the same key (it would wait on itself).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`]; [`CacheError::Load`] or [`CacheError::LoadTimeout`] when the
    /// loader failed. Never an error of the shared tier.
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key))]
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, mut loader: F) -> Result<Option<V>, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<(V, u64)>, E>>,
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let inner = &*self.inner;
        inner.check_key(key)?;
        if let Some(value) = inner.local_value(key, inner.feeds.state()).await {
            return Ok(Some(V::clone(&value)));
        }
        loop {
            match inner.flights.join(key) {
                Join::Follow(rx) => {
                    if let Some(outcome) = flight::wait(rx).await {
                        return outcome.map(|value| value.map(|value| V::clone(&value)));
                    }
                    // The leader was cancelled: join again, perhaps as the leader.
                }
                Join::Lead(leader) => {
                    let outcome = inner.lead(key, leader.record(), &mut loader).await;
                    leader.finish(outcome.clone());
                    return outcome.map(|value| value.map(|value| V::clone(&value)));
                }
            }
        }
    }

    /// Stores `value` at `version` in both tiers unless a tier holds an equal or newer entry
    /// (write-through after a write). The shared tier is written first; when it refuses, so does
    /// the local one; when it fails, the local one is still written.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`], [`CacheError::Encode`], and the shared tier's
    /// [`CacheError::Shared`] / [`CacheError::SharedTimeout`] (the local tier was still written).
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key, version = version))]
    pub async fn set(&self, key: &str, value: V, version: u64) -> Result<SetOutcome, CacheError> {
        let inner = &*self.inner;
        inner.check_key(key)?;
        let user = inner.flights.guard(key);
        let start = inner.feeds.state();
        let value = Arc::new(value);
        let mut failure = None;
        let shared = match &inner.shared {
            None => TierWrite::Skipped,
            Some(shared) => match shared.value_write(version, &*value)? {
                None => TierWrite::Skipped,
                Some(_) if user.record().outdates(version) => TierWrite::Refused,
                Some(write) => match shared.put(key, &write, None).await {
                    Ok(true) => TierWrite::Stored,
                    Ok(false) => {
                        bump(&inner.counters.refused_writes);
                        TierWrite::Refused
                    }
                    Err(e) => {
                        bump(&inner.counters.shared_errors);
                        failure = Some(e);
                        TierWrite::Skipped
                    }
                },
            },
        };
        let local = if !enabled(start) || inner.config.local_capacity == 0 {
            TierWrite::Skipped
        } else if shared == TierWrite::Refused {
            // Redis holds something at least as new; a local tombstone may have been evicted.
            TierWrite::Refused
        } else if inner
            .fill_local(key, version, Some(value), start, user.record(), None)
            .await
        {
            TierWrite::Stored
        } else {
            TierWrite::Refused
        };
        drop(user);
        match failure {
            Some(e) => Err(e),
            None => Ok(SetOutcome { local, shared }),
        }
    }

    /// Invalidates `key` at `version`, the version the writer's change produced: a tombstone in
    /// Redis and an invalidation published to every instance (one script), then the local
    /// tombstone. Call it after the change committed.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`]; [`CacheError::Shared`] / [`CacheError::SharedTimeout`] when
    /// Redis was not written (the local tier was): other instances may keep the old value until
    /// their feed reconnects or it expires, so retry.
    #[tracing::instrument(level = "debug", skip_all, fields(key = %key, version = version))]
    pub async fn invalidate(&self, key: &str, version: u64) -> Result<(), CacheError> {
        self.inner.invalidate(key, version, true).await
    }

    /// Applies an invalidation that every instance receives by itself (from the event log or a
    /// broker subscription each instance has): the tombstone in Redis and locally, nothing
    /// published. Call it from the feed's event handler, with the version the event stands for.
    ///
    /// # Errors
    ///
    /// As [`Cache::invalidate`]; on a shared-tier error, handle the event again later.
    pub async fn apply_invalidation(&self, key: &str, version: u64) -> Result<(), CacheError> {
        self.inner.apply_invalidation(key, version).await
    }

    /// Registers an invalidation feed the service runs itself (a broker consumer that calls
    /// [`Cache::apply_invalidation`]). The feed starts disconnected: the local tier is bypassed
    /// until the service calls [`FeedHandle::connected`], and flushed whenever it calls
    /// [`FeedHandle::disconnected`].
    #[must_use]
    pub fn register_feed(&self, name: &str) -> FeedHandle {
        self.inner.feeds.register(name)
    }

    /// Follows the Concord event log from position `after` (`0`: the whole log; a projection's
    /// checkpoint: from there), optionally one category, and invalidates `key_of(event)` at the
    /// event's position with [`Cache::apply_invalidation`]. The feed reconnects with backoff
    /// ([`CacheConfig::reconnect_min`] to [`CacheConfig::reconnect_max`]) and resumes after the
    /// last event it fully applied; while it is disconnected the local tier is flushed and
    /// bypassed. The cache's versions must then be log positions.
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`] when called outside a tokio runtime.
    pub fn spawn_log_invalidation<F>(
        &self,
        client: Client,
        category: Option<String>,
        after: u64,
        key_of: F,
    ) -> Result<LogFeed, CacheError>
    where
        F: Fn(&EventOut) -> Option<String> + Send + Sync + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| CacheError::Config("the log feed must be started inside a tokio runtime".into()))?;
        let feed = self.inner.feeds.register(&format!(
            "event log{}",
            category.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
        ));
        let position = Arc::new(AtomicU64::new(after));
        let task = runtime.spawn(log::follow(
            Arc::downgrade(&self.inner),
            client,
            category,
            Arc::clone(&position),
            key_of,
            feed,
            self.backoff(),
        ));
        let abort = task.abort_handle();
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(abort.clone());
        Ok(LogFeed::new(position, abort))
    }

    /// Whether the local tier is in use now: every feed is connected.
    #[must_use]
    pub fn local_tier_enabled(&self) -> bool {
        enabled(self.inner.feeds.state())
    }

    /// Waits up to `timeout` for every feed to be connected; returns whether they are. Reads work
    /// before (without the local tier); use it as a readiness check.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut changes = self.inner.feeds.subscribe();
        tokio::time::timeout(timeout, changes.wait_for(|state| enabled(*state)))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    /// The counters since the cache was built.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            local_hits: read(&c.local_hits),
            shared_hits: read(&c.shared_hits),
            loads: read(&c.loads),
            load_errors: read(&c.load_errors),
            stale_loads: read(&c.stale_loads),
            refused_writes: read(&c.refused_writes),
            shared_errors: read(&c.shared_errors),
            invalidations: read(&c.invalidations),
            feed_disconnects: self.inner.feeds.disconnects(),
        }
    }

    /// The local tier's live entry for `key` (value or tombstone), for inspection. `None` when
    /// absent, expired, or flushed by a lost feed.
    pub async fn local_entry(&self, key: &str) -> Option<Cached<V>> {
        self.inner.local.entry(key, self.inner.feeds.state()).await
    }

    /// Whether the local tier holds a live entry (value or tombstone) for `key`.
    pub async fn contains_local(&self, key: &str) -> bool {
        self.local_entry(key).await.is_some()
    }

    /// How many live entries (values and tombstones) the local tier holds. Entries flushed by a
    /// lost feed are not counted, even before moka reclaims them.
    #[must_use]
    pub fn local_len(&self) -> usize {
        self.inner.local.len(self.inner.feeds.state())
    }

    /// Every live entry of the local tier, for inspection.
    #[must_use]
    pub fn local_snapshot(&self) -> Vec<(String, Cached<V>)> {
        self.inner.local.snapshot(self.inner.feeds.state())
    }

    /// The shared tier's entry for `key`, for inspection; `Ok(None)` without a shared tier.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`] and the shared tier's errors, [`CacheError::SharedUnavailable`]
    /// included.
    pub async fn shared_entry(&self, key: &str) -> Result<Option<Cached<V>>, CacheError> {
        self.inner.check_key(key)?;
        match &self.inner.shared {
            Some(shared) => shared.get(key).await,
            None => Ok(None),
        }
    }
}

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn check_key(&self, key: &str) -> Result<(), CacheError> {
        if key.is_empty() {
            return Err(CacheError::InvalidKey(KeyError::Empty));
        }
        if key.len() > self.config.max_key_bytes {
            return Err(CacheError::InvalidKey(KeyError::TooLong {
                len: key.len(),
                max: self.config.max_key_bytes,
            }));
        }
        Ok(())
    }

    async fn local_value(&self, key: &str, state: u64) -> Option<Arc<V>> {
        if !enabled(state) {
            return None;
        }
        let value = self.local.get(key, state).await?.value.clone()?;
        bump(&self.counters.local_hits);
        Some(value)
    }

    /// Whether a load or set that began under `start` may still store `version` now.
    fn may_store(&self, start: u64, record: &Record, version: u64, deadline: Option<Instant>) -> bool {
        enabled(start)
            && self.feeds.state() == start
            && !record.outdates(version)
            && deadline.is_none_or(|deadline| Instant::now() <= deadline)
    }

    /// Stores a value locally under `start`, re-checking [`Self::may_store`] under the key's lock.
    async fn fill_local(
        &self,
        key: &str,
        version: u64,
        value: Option<Arc<V>>,
        start: u64,
        record: &Record,
        deadline: Option<Instant>,
    ) -> bool {
        if !enabled(start) || self.config.local_capacity == 0 {
            return false;
        }
        let slot = Slot {
            state: start,
            version,
            value,
        };
        let stored = self
            .local
            .put_if_newer(key, slot, || self.may_store(start, record, version, deadline))
            .await;
        if !stored {
            bump(&self.counters.refused_writes);
        }
        stored
    }

    /// The leader's part of [`Cache::get_or_load`].
    async fn lead<F, Fut, E>(&self, key: &str, record: &Record, loader: &mut F) -> Outcome<V>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<(V, u64)>, E>>,
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let start = self.feeds.state();
        let deadline = Instant::now() + self.config.load_timeout;
        // The newest tombstone either tier shows: a result older than it is stale as well.
        let mut floor = 0;
        // Checked again: a caller that missed just before the previous leader stored its value.
        if enabled(start)
            && let Some(slot) = self.local.get(key, start).await
        {
            match &slot.value {
                Some(value) => {
                    bump(&self.counters.local_hits);
                    return Ok(Some(Arc::clone(value)));
                }
                None => floor = slot.version,
            }
        }
        if let Some(shared) = &self.shared {
            match shared.get::<V>(key).await {
                Ok(Some(Cached::Value { value, version })) if version >= floor && !record.outdates(version) => {
                    bump(&self.counters.shared_hits);
                    let value = Arc::new(value);
                    self.fill_local(key, version, Some(Arc::clone(&value)), start, record, Some(deadline))
                        .await;
                    return Ok(Some(value));
                }
                Ok(Some(Cached::Tombstone { version })) => floor = floor.max(version),
                Ok(_) | Err(CacheError::SharedUnavailable) => {}
                Err(e) => {
                    bump(&self.counters.shared_errors);
                    tracing::debug!(error = %e, "shared tier unavailable, loading");
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            bump(&self.counters.loads);
            let loaded = match tokio::time::timeout_at(deadline.into(), loader()).await {
                Err(_) => {
                    bump(&self.counters.load_errors);
                    return Err(CacheError::LoadTimeout(self.config.load_timeout));
                }
                Ok(Err(e)) => {
                    bump(&self.counters.load_errors);
                    return Err(CacheError::Load(Arc::from(e.into())));
                }
                Ok(Ok(loaded)) => loaded,
            };
            let Some((value, version)) = loaded else {
                return Ok(None);
            };
            let value = Arc::new(value);
            if version < floor || record.outdates(version) {
                bump(&self.counters.stale_loads);
                tracing::debug!(
                    version,
                    attempt,
                    "loaded a version older than an invalidation, not stored"
                );
                if attempt < self.config.load_attempts {
                    continue;
                }
                return Ok(Some(value));
            }
            self.store_loaded(key, version, &value, start, record, deadline).await;
            return Ok(Some(value));
        }
    }

    async fn store_loaded(
        &self,
        key: &str,
        version: u64,
        value: &Arc<V>,
        start: u64,
        record: &Record,
        deadline: Instant,
    ) {
        // Shared first, so that a local miss elsewhere right after finds it. A load that began
        // while a feed was down writes neither tier: it may have read before an invalidation
        // that never reached Redis (Redis was down or restarted empty).
        if let Some(shared) = &self.shared
            && self.may_store(start, record, version, Some(deadline))
        {
            match shared.value_write(version, &**value) {
                Ok(Some(write)) => match shared.put(key, &write, None).await {
                    Ok(true) => {
                        // A feed lost while the script ran went unnoticed by the check above.
                        if self.feeds.state() != start
                            && let Err(e) = shared.delete_if(key, &write).await
                        {
                            bump(&self.counters.shared_errors);
                            tracing::debug!(error = %e, "cannot undo a shared write that raced a lost feed");
                        }
                    }
                    Ok(false) => {
                        // Redis holds something at least as new: the next read takes it from there.
                        bump(&self.counters.refused_writes);
                        return;
                    }
                    Err(e) => {
                        bump(&self.counters.shared_errors);
                        tracing::debug!(error = %e, "shared tier unavailable, value kept locally only");
                    }
                },
                Ok(None) => tracing::debug!("value larger than max_value_bytes, not shared"),
                Err(e) => tracing::debug!(error = %e, "value does not serialize, not shared"),
            }
        }
        self.fill_local(key, version, Some(Arc::clone(value)), start, record, Some(deadline))
            .await;
    }

    async fn invalidate(&self, key: &str, version: u64, publish: bool) -> Result<(), CacheError> {
        self.check_key(key)?;
        // Redis first: a load that starts after the local tombstone then finds Redis's too.
        let shared = match &self.shared {
            Some(shared) => {
                let write = shared.tombstone_write(version);
                let written = shared.put(key, &write, publish.then_some(version)).await;
                if written.is_err() {
                    bump(&self.counters.shared_errors);
                }
                written.map(|_| ())
            }
            None => Ok(()),
        };
        self.invalidate_local(key, version).await;
        shared
    }

    async fn apply_invalidation(&self, key: &str, version: u64) -> Result<(), CacheError> {
        self.invalidate(key, version, false).await
    }

    /// The local part of every invalidation: loads and sets in progress learn of it, and the
    /// tombstone replaces any older local entry.
    async fn invalidate_local(&self, key: &str, version: u64) {
        bump(&self.counters.invalidations);
        self.flights.invalidated(key, version);
        let state = self.feeds.state();
        if enabled(state) && self.config.local_capacity > 0 {
            let slot = Slot {
                state,
                version,
                value: None,
            };
            self.local.put_if_newer(key, slot, || true).await;
        }
    }

    /// An invalidation received on the channel, for `redis_key`.
    async fn received(&self, redis_key: &str, version: u64) {
        let Some(shared) = &self.shared else { return };
        match shared.cache_key(redis_key) {
            Some(key) if self.check_key(key).is_ok() => {
                tracing::debug!(key, version, "invalidation received");
                self.invalidate_local(key, version).await;
            }
            _ => {}
        }
    }
}

/// The pub/sub subscriber of a cache with a shared tier: one session after another, with backoff
/// between them; the feed is down between sessions.
async fn subscribe<V>(cache: Weak<Inner<V>>, feed: FeedHandle, mut backoff: Backoff)
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    loop {
        let Some((client, config)) = cache.upgrade().and_then(|inner| {
            let shared = inner.shared.as_ref()?;
            Some((shared.client.clone(), shared.config.clone()))
        }) else {
            return;
        };
        let ended = match Subscription::open(&client, &config).await {
            Ok(mut subscription) => {
                feed.connected();
                backoff.reset();
                loop {
                    match subscription.next().await {
                        Ok(Some((redis_key, version))) => {
                            let Some(inner) = cache.upgrade() else { return };
                            inner.received(&redis_key, version).await;
                        }
                        Ok(None) => break "connection closed".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        feed.disconnected();
        tracing::debug!(reason = %ended, "invalidation channel lost, reconnecting");
        tokio::time::sleep(backoff.next_pause()).await;
    }
}
