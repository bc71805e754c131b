//! The traits use cases need from the outside world. Adapters (SQLite, PostgreSQL, ...) implement
//! them and prove it by running the conformance suites of [`crate::testkit`]. One module per
//! port, each with the rows it stores; every item is re-exported here, so `ports::X` names it.

mod events;
mod hosts;
mod keys;
mod sagas;
mod txs;
mod vault;

pub use events::{CheckpointStore, EventStore, LogQuery, collect_within};
pub use hosts::{HostChange, HostStore};
pub use keys::KeyStore;
pub use sagas::{SagaRow, SagaStore, SagaUpdate, StoredDefinition};
pub use txs::{TxRow, TxStore, TxUpdate};
pub use vault::{DataKeyRow, FoundToken, MasterKeyRow, TokenInsert, TokenRecord, VaultStore};

// The ports the services share with the server live in the shared kernel.
pub use concord_kernel::StoreError;
pub use concord_kernel::broker::{Broker, BrokerConsumer, BrokerError, BrokerMessage, Delivery};
pub use concord_kernel::idempotency::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoredResponse};
