//! `Idempotency-Key` values and request fingerprints: the shared kernel's, which the server and
//! the services' idempotency layer both use.

pub use concord_kernel::idempotency::{
    Fingerprint, IdempotencyKey, InvalidIdempotencyKey, MAX_IDEMPOTENCY_KEY_LEN, derived_event_id,
};

impl From<InvalidIdempotencyKey> for super::ValidationError {
    fn from(e: InvalidIdempotencyKey) -> Self {
        Self::IdempotencyKey(e.0)
    }
}
