//! Validated value types and the pure decisions made on them.

pub mod auth;
pub mod event;
pub mod flow;
pub mod idempotency;
pub mod limits;
pub mod outbound;
pub mod saga;
pub mod stream;
pub mod tx;
pub mod vault;

pub use auth::{ApiKeyRecord, KeyHash, Principal, Scope};
pub use event::{AppendOutcome, AppendRequest, EventType, ExpectedVersion, NewEvent, RecordedEvent};
pub use idempotency::{Fingerprint, IdempotencyKey};
pub use limits::Limits;
pub use saga::{InvalidSagaId, SagaId};
pub use stream::{Category, StreamName};
pub use tx::{InvalidXid, Xid};

/// A value rejected at the edge. Each variant maps to one stable error code in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The stream name breaks the alphabet or length rule; the caller must fix the name.
    #[error("invalid stream name: {0}")]
    StreamName(String),
    /// The event type breaks the alphabet or length rule.
    #[error("invalid event type: {0}")]
    EventType(String),
    /// `expected_version` is none of `any`, `no_stream`, `exists` or a non-negative integer.
    #[error("invalid expected_version: {0}")]
    ExpectedVersion(String),
    /// One event's data and metadata together exceed the configured size.
    #[error("event {index} is {size} bytes, over the limit of {limit}")]
    EventTooLarge { index: usize, size: usize, limit: usize },
    /// Too many events in one append.
    #[error("{count} events in one append, over the limit of {limit}")]
    BatchTooLarge { count: usize, limit: usize },
    /// An append without events.
    #[error("an append needs at least one event")]
    EmptyAppend,
    /// Event data or metadata contains U+0000, which a JSON column cannot store.
    #[error("event {0} contains the character U+0000, which cannot be stored")]
    NulCharacter(usize),
    /// Two events of one append share an id.
    #[error("event id {0} appears twice in one append")]
    DuplicateEventId(uuid::Uuid),
    /// Metadata must be a JSON object (or absent).
    #[error("metadata of event {0} must be a JSON object")]
    Metadata(usize),
    /// A scope name that Concord does not know.
    #[error("unknown scope: {0}")]
    Scope(String),
    /// An `Idempotency-Key` header that is empty, too long or not visible ASCII.
    #[error("invalid Idempotency-Key: {0}")]
    IdempotencyKey(String),
    /// A query or body parameter out of its range.
    #[error("invalid parameter {name}: {reason}")]
    Parameter { name: &'static str, reason: String },
}
