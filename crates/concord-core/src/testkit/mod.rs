//! In-memory fakes of the ports and the conformance suites every adapter must pass.
//!
//! An adapter's tests call `event_store_suite`, `key_store_suite` and `idempotency_store_suite`
//! with a factory of fresh stores; the in-memory fake passes them too, which keeps the suites honest.
//!
//! [`MemoryStore`] (`memory.rs`) fakes every port but the vault store and the broker; each port's
//! suite has its own file (`event_store.rs`, `key_store.rs`, `saga_store.rs`, `tx_store.rs`,
//! `idempotency_store.rs`, `broker.rs`), and `vault.rs` holds the vault store's fake and suite.

use crate::domain::event::UncheckedEvent;
use crate::domain::{AppendRequest, ExpectedVersion, Limits, StreamName};
use serde_json::json;

mod broker;
mod event_store;
mod host_store;
mod idempotency_store;
mod key_store;
mod memory;
mod saga_store;
mod tx_store;
mod vault;
pub use broker::{broker_suite, fresh_topic, message};
pub use event_store::event_store_suite;
pub use host_store::host_store_suite;
pub use idempotency_store::idempotency_store_suite;
pub use key_store::key_store_suite;
pub use memory::MemoryStore;
pub use saga_store::{saga_id, saga_row, saga_store_suite};
pub use tx_store::{tx_id, tx_row, tx_store_suite};
pub use vault::{MemoryVaultStore, vault_store_suite};

/// A stream name for tests; panics on a bad literal.
#[must_use]
pub fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("valid test stream name")
}

/// An append of events with the given types and `{"n": i}` data.
#[must_use]
pub fn append(name: &str, expected: ExpectedVersion, types: &[&str]) -> AppendRequest {
    let events = types
        .iter()
        .enumerate()
        .map(|(i, t)| UncheckedEvent {
            id: None,
            event_type: (*t).to_owned(),
            data: json!({ "n": i }),
            metadata: None,
        })
        .collect();
    AppendRequest::new(stream(name), expected, events, &Limits::default()).expect("valid test append")
}
