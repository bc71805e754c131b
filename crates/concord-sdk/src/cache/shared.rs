//! The shared tier on Redis: versioned writes as one Lua script, reads that give up quickly, and
//! the pub/sub connection that carries invalidations between instances.
//!
//! Keys: `{key_prefix}{key}` holds `{version:020}{T|V}{json}` (see [`super::entry`]) with a TTL
//! (`ttl` for values, the cache's `tombstone_ttl` for tombstones). Invalidations are published on
//! `channel` as `{version}:{key_prefix}{key}`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands as _, RedisError, Script};
use serde::de::DeserializeOwned;

use super::entry::{self, Cached};
use super::{CacheError, RedisConfig};

/// Stores the entry unless one of equal or higher rank is there; publishes the invalidation
/// message either way when a channel is given (a newer entry does not mean every instance
/// dropped the older one it may hold locally).
///
/// KEYS[1] entry key; ARGV[1] rank header of the new entry; ARGV[2] the entry; ARGV[3] TTL in
/// ms; ARGV[4] channel or ''; ARGV[5] message. Returns 1 when stored, 0 when refused.
const SET_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
local stored = 0
if (not current) or string.sub(current, 1, 21) < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  stored = 1
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return stored
";

/// Deletes the entry only if it is still exactly ARGV[1] (undoing a write that turned out to
/// have raced a lost feed).
const DELETE_IF_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub(crate) struct Shared {
    pub(crate) client: redis::Client,
    manager: ConnectionManager,
    pub(crate) config: RedisConfig,
    tombstone_ttl: Duration,
    set_script: Script,
    delete_if_script: Script,
    /// Reads skip Redis until then, after a connection or timeout error.
    cooling_until: Mutex<Option<Instant>>,
}

/// A write to send: the entry's bytes and how long it lives.
pub(crate) struct Write {
    pub(crate) header: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) ttl: Duration,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Shared {
    pub(crate) fn new(client: redis::Client, config: RedisConfig, tombstone_ttl: Duration) -> Result<Self, CacheError> {
        // The manager retries a lost connection once per command; our own timeout bounds every
        // command anyway, and a read falls back to the loader instead of waiting for Redis.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(config.op_timeout);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| CacheError::Config(format!("redis connection manager: {e}")))?;
        Ok(Self {
            client,
            manager,
            config,
            tombstone_ttl,
            set_script: Script::new(SET_SCRIPT),
            delete_if_script: Script::new(DELETE_IF_SCRIPT),
            cooling_until: Mutex::new(None),
        })
    }

    pub(crate) fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.config.key_prefix)
    }

    /// The cache key of a Redis key of this cache.
    pub(crate) fn cache_key<'a>(&self, redis_key: &'a str) -> Option<&'a str> {
        redis_key.strip_prefix(&self.config.key_prefix)
    }

    fn cooling(&self) -> bool {
        let mut until = self
            .cooling_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *until {
            Some(at) if Instant::now() < at => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    async fn run<T>(&self, command: impl Future<Output = Result<T, RedisError>>) -> Result<T, CacheError> {
        let outcome = match tokio::time::timeout(self.config.op_timeout, command).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error();
                (CacheError::Shared(e), unreachable)
            }
            Err(_) => (CacheError::SharedTimeout(self.config.op_timeout), true),
        };
        if outcome.1 {
            let mut until = self
                .cooling_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *until = Some(Instant::now() + self.config.failure_cooldown);
        }
        Err(outcome.0)
    }

    /// The entry of `key`; `Ok(None)` when there is none or it is not one this cache can read.
    pub(crate) async fn get<V: DeserializeOwned>(&self, key: &str) -> Result<Option<Cached<V>>, CacheError> {
        if self.cooling() {
            return Err(CacheError::SharedUnavailable);
        }
        let redis_key = self.redis_key(key);
        let mut manager = self.manager.clone();
        let bytes: Option<Vec<u8>> = self.run(manager.get(&redis_key)).await?;
        let Some(bytes) = bytes else { return Ok(None) };
        match entry::decode(&bytes) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) => {
                tracing::debug!(key = %redis_key, error = %e, "ignoring a shared entry this cache cannot read");
                Ok(None)
            }
        }
    }

    pub(crate) fn value_write<V: serde::Serialize>(
        &self,
        version: u64,
        value: &V,
    ) -> Result<Option<Write>, CacheError> {
        let bytes = entry::encode(version, Some(value)).map_err(|e| CacheError::Encode(std::sync::Arc::new(e)))?;
        if bytes.len() > self.config.max_value_bytes {
            return Ok(None);
        }
        Ok(Some(Write {
            header: entry::header(version, true),
            bytes,
            ttl: self.config.ttl,
        }))
    }

    pub(crate) fn tombstone_write(&self, version: u64) -> Write {
        Write {
            header: entry::header(version, false),
            bytes: entry::header(version, false).into_bytes(),
            ttl: self.tombstone_ttl,
        }
    }

    /// Runs the versioned set; with `publish`, also publishes the invalidation at `version`.
    /// Returns whether the entry was stored.
    pub(crate) async fn put(&self, key: &str, write: &Write, publish: Option<u64>) -> Result<bool, CacheError> {
        let redis_key = self.redis_key(key);
        let (channel, message) = match publish {
            Some(version) => (self.config.channel.as_str(), entry::message(version, &redis_key)),
            None => ("", String::new()),
        };
        let mut manager = self.manager.clone();
        let mut invocation = self.set_script.key(&redis_key);
        invocation
            .arg(&write.header)
            .arg(&write.bytes)
            .arg(millis(write.ttl))
            .arg(channel)
            .arg(message);
        let stored: i64 = self.run(invocation.invoke_async(&mut manager)).await?;
        Ok(stored == 1)
    }

    /// Deletes the entry of `key` if it is still `write`.
    pub(crate) async fn delete_if(&self, key: &str, write: &Write) -> Result<(), CacheError> {
        let redis_key = self.redis_key(key);
        let mut manager = self.manager.clone();
        let mut invocation = self.delete_if_script.key(&redis_key);
        invocation.arg(&write.bytes);
        let _: i64 = self.run(invocation.invoke_async(&mut manager)).await?;
        Ok(())
    }
}

/// The pub/sub connection of one instance: subscribed to the channel, pinged so that a silent
/// connection is noticed too.
pub(crate) struct Subscription {
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
    pings: tokio::time::Interval,
    op_timeout: Duration,
}

impl Subscription {
    /// Connects and subscribes; returns once Redis confirmed the subscription.
    pub(crate) async fn open(client: &redis::Client, config: &RedisConfig) -> Result<Self, CacheError> {
        let connect = async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&config.channel).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let limit = config.connect_timeout + config.op_timeout;
        let (sink, stream) = match tokio::time::timeout(limit, connect).await {
            Ok(connected) => connected.map_err(CacheError::Shared)?,
            Err(_) => return Err(CacheError::SharedTimeout(limit)),
        };
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + config.ping_interval, config.ping_interval);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            sink,
            stream,
            pings,
            op_timeout: config.op_timeout,
        })
    }

    /// The next invalidation, as `(redis key, version)`; `Ok(None)` when the connection closed,
    /// an error when a ping failed. Messages that are not invalidations are skipped.
    pub(crate) async fn next(&mut self) -> Result<Option<(String, u64)>, CacheError> {
        loop {
            tokio::select! {
                message = self.stream.next() => {
                    let Some(message) = message else { return Ok(None) };
                    let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
                        tracing::debug!("ignoring a non-UTF-8 invalidation message");
                        continue;
                    };
                    match entry::parse_message(payload) {
                        Some((version, redis_key)) => return Ok(Some((redis_key.to_owned(), version))),
                        None => tracing::debug!(payload, "ignoring a malformed invalidation message"),
                    }
                }
                _ = self.pings.tick() => {
                    match tokio::time::timeout(self.op_timeout, self.sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(CacheError::Shared(e)),
                        Err(_) => return Err(CacheError::SharedTimeout(self.op_timeout)),
                    }
                }
            }
        }
    }
}
