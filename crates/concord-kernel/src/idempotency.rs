//! `Idempotency-Key` values, request fingerprints, and the port of the records that make a
//! retried request answer what its first attempt answered.

use crate::StoreError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The id of the `index`-th event of a keyed append that names none: a UUIDv8 of a SHA-256 of
/// the caller, its `Idempotency-Key`, the index and the event, so a retry after a crash (the
/// events committed, the key's record not) appends the same ids and the store answers it as a
/// replay, and the key reused for other events once its record expired appends them.
#[must_use]
pub fn derived_event_id(caller: &str, idempotency_key: &str, index: usize, event: &[u8]) -> Uuid {
    let digest = Sha256::new()
        .chain_update(b"event:")
        .chain_update((caller.len() as u64).to_be_bytes())
        .chain_update(caller.as_bytes())
        .chain_update((idempotency_key.len() as u64).to_be_bytes())
        .chain_update(idempotency_key.as_bytes())
        .chain_update((index as u64).to_be_bytes())
        .chain_update(event)
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// An `Idempotency-Key` header that is empty, too long or not visible ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Idempotency-Key: {0}")]
pub struct InvalidIdempotencyKey(pub String);

/// A client's idempotency key: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Accepts the header value with or without the quotes of the draft's sf-string form.
    ///
    /// # Errors
    /// [`InvalidIdempotencyKey`] when empty, too long or not visible ASCII.
    pub fn parse(raw: &str) -> Result<Self, InvalidIdempotencyKey> {
        let v = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')).unwrap_or(raw);
        if v.is_empty() || v.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(InvalidIdempotencyKey(format!(
                "must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            )));
        }
        if !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidIdempotencyKey(
                "only visible ASCII characters are allowed".into(),
            ));
        }
        Ok(Self(v.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What makes two requests "the same request" for an idempotency key: method, path and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// HMAC-SHA256 of method, path and body under a server secret. Stored fingerprints of
    /// bodies holding low-entropy secrets (a card number, an SSN) cannot be guessed offline
    /// without the key.
    #[must_use]
    pub fn keyed(key: &[u8], method: &str, path: &str, body: &[u8]) -> Self {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(method.as_bytes());
        mac.update(&[0]);
        mac.update(path.as_bytes());
        mac.update(&[0]);
        mac.update(body);
        Self(mac.finalize().into_bytes().into())
    }

    #[must_use]
    pub fn of(method: &str, path: &str, body: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(path.as_bytes());
        h.update([0]);
        h.update(body);
        Self(h.finalize().into())
    }
}

/// A response kept for replay under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// What to do with a request that carries an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// This request holds the key now: run it, then `complete` or `release`.
    Started,
    /// The same request already completed: answer its stored response.
    Replay(StoredResponse),
    /// The key was used with a different request.
    Mismatch,
    /// The first request with this key is still running.
    InFlight,
}

/// One idempotency key of one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim<'a> {
    pub owner: Uuid,
    pub key: &'a IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub now: DateTime<Utc>,
    /// Until when this claim's in-flight record holds the key; after it, another request may
    /// take the key over, since a holder that has not finished by then has died.
    pub locked_until: DateTime<Utc>,
    /// When a completed record stops being replayed.
    pub expires_at: DateTime<Utc>,
}

/// Records of idempotency keys, scoped per owner (the API key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims the key atomically, even across nodes.
    async fn begin(&self, claim: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError>;
    /// Stores the response of the request that holds the key.
    ///
    /// Only the claim that still holds the key is heard: after a takeover, a late first holder
    /// neither overwrites nor releases the new holder's record (the claim is the fencing token).
    async fn complete(&self, claim: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), StoreError>;
    /// Gives the key up without a response (the request failed in a way worth retrying).
    async fn release(&self, claim: &IdempotencyClaim<'_>) -> Result<(), StoreError>;
    /// Deletes records past their expiry; returns how many.
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_fingerprints_depend_on_the_key() {
        let body = br#"{"value":"4242"}"#;
        let a = Fingerprint::keyed(b"key one", "POST", "/v1/vault/tokenize", body);
        assert_ne!(a, Fingerprint::keyed(b"key two", "POST", "/v1/vault/tokenize", body));
        assert_ne!(a, Fingerprint::of("POST", "/v1/vault/tokenize", body));
        assert_eq!(a, Fingerprint::keyed(b"key one", "POST", "/v1/vault/tokenize", body));
    }

    #[test]
    fn keys_accept_plain_and_quoted_forms() {
        assert_eq!(IdempotencyKey::parse("abc").unwrap().as_str(), "abc");
        assert_eq!(IdempotencyKey::parse("\"abc\"").unwrap().as_str(), "abc");
        for bad in ["", "\"\"", "a b", "é", &"x".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let a = Fingerprint::of("POST", "/v1/streams/a", b"{}");
        assert_eq!(a, Fingerprint::of("POST", "/v1/streams/a", b"{}"));
        assert_ne!(a, Fingerprint::of("PUT", "/v1/streams/a", b"{}"));
        assert_ne!(a, Fingerprint::of("POST", "/v1/streams/b", b"{}"));
        assert_ne!(a, Fingerprint::of("POST", "/v1/streams/a", b"{ }"));
    }
}
