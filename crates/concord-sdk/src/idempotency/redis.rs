//! Idempotency records in Redis, for services that keep no database of their own or share one
//! Redis between instances.
//!
//! Each record is one hash under `{prefix}{owner}:{key}` (the prefix is
//! [`RedisIdempotencyStore::DEFAULT_PREFIX`] unless set) with the fields `fp` (fingerprint),
//! `lu` (locked until) and `ea` (expires at), both unix milliseconds, and once completed `st`
//! (status), `ct` (content type, when there was one) and `body`. Claim, complete and release are
//! each one Lua script, so each is atomic on the Redis server:
//!
//! - **claim** reads the record; when it is absent, expired, or in flight with its lock run out,
//!   it replaces it with the new claim and sets the key's TTL to the record's lifetime; otherwise
//!   it answers mismatch, replay or in flight;
//! - **complete** stores the response only when the record still carries the claim's fingerprint
//!   and lock time and has no response yet (the fence against a holder that lost a takeover);
//! - **release** deletes the record under the same condition.
//!
//! The decisions compare the claim's own times with the stored ones, exactly as the SQL stores
//! do. The key's TTL, set at the claim to the record's whole lifetime (`expires_at - now`), only
//! frees memory: Redis drops each record itself once it has expired, so
//! [`IdempotencyStore::purge_expired`] has nothing to do. Give the [`ConnectionManager`] a response timeout, so that a Redis that hangs turns into
//! 503 answers rather than hanging requests.

use std::sync::LazyLock;

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, Script};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{IdempotencyBegin, IdempotencyClaim, IdempotencyKey, IdempotencyStore, StoreError, StoredResponse};

/// KEYS[1] record; ARGV fingerprint, now, locked_until, expires_at, ttl_ms.
const CLAIM: &str = r"
local r = redis.call('HMGET', KEYS[1], 'fp', 'st', 'ct', 'body', 'lu', 'ea')
if r[1] then
  local now = tonumber(ARGV[2])
  local expired = tonumber(r[6]) <= now
  local dead = (not r[2]) and tonumber(r[5]) <= now
  if not expired and not dead then
    if r[1] ~= ARGV[1] then return {'mismatch'} end
    if not r[2] then return {'in_flight'} end
    if r[3] then return {'replay', r[2], r[4] or '', '1', r[3]} end
    return {'replay', r[2], r[4] or '', '0', ''}
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'lu', ARGV[3], 'ea', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'started'}
";

/// KEYS[1] record; ARGV fingerprint, locked_until, status, has_content_type, content_type, body.
const COMPLETE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'fp', 'lu', 'st')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] then return 0 end
redis.call('HSET', KEYS[1], 'st', ARGV[3], 'body', ARGV[6])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'ct', ARGV[5]) end
return 1
";

/// KEYS[1] record; ARGV fingerprint, locked_until.
const RELEASE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'fp', 'lu', 'st')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));
static COMPLETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// [`IdempotencyStore`] in Redis. Records of every instance that uses the same prefix are shared.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisIdempotencyStore {
    /// The prefix of record keys unless [`RedisIdempotencyStore::with_prefix`] sets another.
    pub const DEFAULT_PREFIX: &'static str = "concord:idempotency:";

    /// A store over `conn`, with keys under [`RedisIdempotencyStore::DEFAULT_PREFIX`].
    #[must_use]
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
        }
    }

    /// Puts the record keys under `prefix` (for example one per service sharing a Redis).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The prefix of the record keys.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of the record of `key` for `owner`.
    #[must_use]
    pub fn record_key(&self, owner: Uuid, key: &IdempotencyKey) -> String {
        format!("{}{}:{}", self.prefix, owner.simple(), key.as_str())
    }
}

fn unavailable(e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner))]
    async fn begin(&self, claim: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        // The key lives as long as the record can be replayed, and at least a millisecond.
        let ttl_ms = (claim.expires_at - claim.now).num_milliseconds().max(1);
        let answer: Vec<Vec<u8>> = CLAIM_SCRIPT
            .key(self.record_key(claim.owner, claim.key))
            .arg(&claim.fingerprint.0[..])
            .arg(claim.now.timestamp_millis())
            .arg(claim.locked_until.timestamp_millis())
            .arg(claim.expires_at.timestamp_millis())
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        let corrupt = || StoreError::Unavailable("redis: unexpected answer of the claim script".into());
        match answer.first().map(Vec::as_slice) {
            Some(b"started") => Ok(IdempotencyBegin::Started),
            Some(b"mismatch") => Ok(IdempotencyBegin::Mismatch),
            Some(b"in_flight") => Ok(IdempotencyBegin::InFlight),
            Some(b"replay") => {
                let [_, status, body, has_type, content_type] = answer.as_slice() else {
                    return Err(corrupt());
                };
                let status = std::str::from_utf8(status)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(corrupt)?;
                let content_type = match has_type.as_slice() {
                    b"1" => Some(String::from_utf8(content_type.clone()).map_err(|_| corrupt())?),
                    _ => None,
                };
                Ok(IdempotencyBegin::Replay(StoredResponse {
                    status,
                    content_type,
                    body: body.clone(),
                }))
            }
            _ => Err(corrupt()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner, status = response.status))]
    async fn complete(&self, claim: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), StoreError> {
        let _stored: i64 = COMPLETE_SCRIPT
            .key(self.record_key(claim.owner, claim.key))
            .arg(&claim.fingerprint.0[..])
            .arg(claim.locked_until.timestamp_millis())
            .arg(response.status)
            .arg(if response.content_type.is_some() { "1" } else { "0" })
            .arg(response.content_type.as_deref().unwrap_or(""))
            .arg(&response.body[..])
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(owner = %claim.owner))]
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), StoreError> {
        let _released: i64 = RELEASE_SCRIPT
            .key(self.record_key(claim.owner, claim.key))
            .arg(&claim.fingerprint.0[..])
            .arg(claim.locked_until.timestamp_millis())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    /// Redis deletes each record when its key's TTL ends: nothing is left to purge.
    async fn purge_expired(&self, _now: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(0)
    }
}
