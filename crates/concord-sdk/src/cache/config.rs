//! The limits of a cache and of its shared tier, with their defaults and the checks that keep
//! them consistent with each other.

use std::time::Duration;

use super::CacheError;

/// The limits of a [`Cache`](super::Cache) and of its local tier. Every field has a default
/// ([`CacheConfig::default`]); build one with `CacheConfig { local_ttl: .., ..Default::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The most entries (values and tombstones) the local tier holds; beyond it the least useful
    /// ones are evicted. Zero turns the local tier off (every read goes to the shared tier or the
    /// loader). Default 10,000.
    pub local_capacity: u64,
    /// How long a value stays in the local tier after it was stored. Default 60 s.
    pub local_ttl: Duration,
    /// How long a tombstone (the mark an invalidation leaves) stays, locally and in the shared
    /// tier. It must outlast any load: [`load_timeout`](Self::load_timeout) plus, with a shared
    /// tier, its [`op_timeout`](RedisConfig::op_timeout). Default 120 s.
    pub tombstone_ttl: Duration,
    /// The longest a load (every attempt of the loader together) may take. A load that overruns
    /// fails with [`CacheError::LoadTimeout`], and a load whose result arrives after this deadline
    /// is never stored, so a tombstone always outlives the loads it must stop. Default 10 s.
    pub load_timeout: Duration,
    /// How many times one load may call the loader while its results are stale (older than a
    /// tombstone, or than an invalidation that arrived while it ran). After the last attempt the
    /// stale value is returned to the waiting callers but not stored. At least 1; default 3.
    pub load_attempts: u32,
    /// The longest key, in bytes. Default 512.
    pub max_key_bytes: usize,
    /// The first pause before an invalidation feed reconnects; it doubles on each failure.
    /// Default 100 ms.
    pub reconnect_min: Duration,
    /// The longest pause between reconnection attempts of an invalidation feed. Default 5 s.
    pub reconnect_max: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            local_capacity: 10_000,
            local_ttl: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(120),
            load_timeout: Duration::from_secs(10),
            load_attempts: 3,
            max_key_bytes: 512,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// The shared tier: where entries live in Redis and how long the cache waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Every Redis key of this cache is `{key_prefix}{key}`. Give each cache (each value type)
    /// its own prefix, and a new one when the value's serialized form changes. 1 to 256 bytes;
    /// default `concord:cache:`.
    pub key_prefix: String,
    /// The pub/sub channel invalidations are published on. Caches with different prefixes may
    /// share it: each ignores the keys outside its prefix. Default `concord:cache:invalidations`.
    pub channel: String,
    /// How long a value stays in Redis. Default 300 s.
    pub ttl: Duration,
    /// The longest one Redis command may take (connecting included) before the cache gives up on
    /// it: a read then falls back to the loader, a write reports [`CacheError::SharedTimeout`].
    /// Default 500 ms.
    pub op_timeout: Duration,
    /// The longest a new connection (commands or pub/sub) may take to open. Default 1 s.
    pub connect_timeout: Duration,
    /// How often the pub/sub connection is pinged; a ping unanswered within
    /// [`op_timeout`](Self::op_timeout) counts as a lost feed. Default 1 s.
    pub ping_interval: Duration,
    /// After Redis fails to answer (a connection or timeout error), reads skip Redis for this
    /// long instead of waiting on it again. Writes always try. Default 1 s.
    pub failure_cooldown: Duration,
    /// The largest serialized entry written to Redis; larger values are served and kept locally
    /// but not shared. Default 1 MiB.
    pub max_value_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            key_prefix: "concord:cache:".into(),
            channel: "concord:cache:invalidations".into(),
            ttl: Duration::from_secs(300),
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
            failure_cooldown: Duration::from_secs(1),
            max_value_bytes: 1024 * 1024,
        }
    }
}

const MAX_PREFIX_BYTES: usize = 256;

fn positive(name: &str, value: Duration) -> Result<(), CacheError> {
    if value.is_zero() {
        return Err(CacheError::Config(format!("{name} must be greater than zero")));
    }
    Ok(())
}

impl CacheConfig {
    pub(crate) fn validate(&self) -> Result<(), CacheError> {
        positive("local_ttl", self.local_ttl)?;
        positive("load_timeout", self.load_timeout)?;
        positive("reconnect_min", self.reconnect_min)?;
        if self.reconnect_max < self.reconnect_min {
            return Err(CacheError::Config(
                "reconnect_max must be at least reconnect_min".into(),
            ));
        }
        if self.tombstone_ttl <= self.load_timeout {
            return Err(CacheError::Config(format!(
                "tombstone_ttl ({:?}) must be longer than load_timeout ({:?}): a tombstone must outlive every load",
                self.tombstone_ttl, self.load_timeout
            )));
        }
        if self.load_attempts == 0 {
            return Err(CacheError::Config("load_attempts must be at least 1".into()));
        }
        if self.max_key_bytes == 0 {
            return Err(CacheError::Config("max_key_bytes must be at least 1".into()));
        }
        Ok(())
    }
}

impl RedisConfig {
    pub(crate) fn validate(&self, cache: &CacheConfig) -> Result<(), CacheError> {
        if self.key_prefix.is_empty() || self.key_prefix.len() > MAX_PREFIX_BYTES {
            return Err(CacheError::Config(format!(
                "key_prefix must be 1 to {MAX_PREFIX_BYTES} bytes"
            )));
        }
        if self.channel.is_empty() {
            return Err(CacheError::Config("channel must not be empty".into()));
        }
        positive("redis ttl", self.ttl)?;
        positive("op_timeout", self.op_timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("ping_interval", self.ping_interval)?;
        if self.max_value_bytes == 0 {
            return Err(CacheError::Config("max_value_bytes must be at least 1".into()));
        }
        // A value set reaches Redis at most op_timeout after the load's deadline; the tombstone
        // it must not overwrite has to be alive until then.
        if cache.tombstone_ttl <= cache.load_timeout + self.op_timeout {
            return Err(CacheError::Config(format!(
                "tombstone_ttl ({:?}) must be longer than load_timeout + op_timeout ({:?})",
                cache.tombstone_ttl,
                cache.load_timeout + self.op_timeout
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let cache = CacheConfig::default();
        cache.validate().unwrap();
        RedisConfig::default().validate(&cache).unwrap();
    }

    #[test]
    fn a_tombstone_shorter_than_a_load_is_refused() {
        let cache = CacheConfig {
            tombstone_ttl: Duration::from_secs(5),
            load_timeout: Duration::from_secs(5),
            ..CacheConfig::default()
        };
        assert!(matches!(cache.validate(), Err(CacheError::Config(_))));
        let cache = CacheConfig {
            tombstone_ttl: Duration::from_millis(10_200),
            load_timeout: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        cache.validate().unwrap();
        assert!(matches!(
            RedisConfig::default().validate(&cache),
            Err(CacheError::Config(_))
        ));
    }

    #[test]
    fn zero_limits_are_refused() {
        for config in [
            CacheConfig {
                local_ttl: Duration::ZERO,
                ..CacheConfig::default()
            },
            CacheConfig {
                load_attempts: 0,
                ..CacheConfig::default()
            },
            CacheConfig {
                max_key_bytes: 0,
                ..CacheConfig::default()
            },
            CacheConfig {
                reconnect_max: Duration::from_millis(1),
                ..CacheConfig::default()
            },
        ] {
            assert!(matches!(config.validate(), Err(CacheError::Config(_))), "{config:?}");
        }
        let cache = CacheConfig::default();
        for redis in [
            RedisConfig {
                key_prefix: String::new(),
                ..RedisConfig::default()
            },
            RedisConfig {
                channel: String::new(),
                ..RedisConfig::default()
            },
            RedisConfig {
                op_timeout: Duration::ZERO,
                ..RedisConfig::default()
            },
            RedisConfig {
                max_value_bytes: 0,
                ..RedisConfig::default()
            },
        ] {
            assert!(
                matches!(redis.validate(&cache), Err(CacheError::Config(_))),
                "{redis:?}"
            );
        }
    }
}
