//! How a store port fails, shared by every port of the server and of the service kit.

use crate::ExpectedVersion;
use uuid::Uuid;

/// Failures of a store. Each variant's doc says what a caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version; re-read it, decide again, retry.
    #[error("stream {stream} is at version {current}, expected {expected}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        current: u64,
    },
    /// An event id of the append already exists but not as this exact append; use fresh ids.
    #[error("event id {0} already exists elsewhere")]
    EventIdConflict(Uuid),
    /// The stream has no events.
    #[error("stream {0} not found")]
    StreamNotFound(String),
    /// The database failed or is unreachable; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}
