//! The participant host port: each host's flow-control state, shared by every node, and the
//! sagas parked until a host comes back.

use crate::domain::flow::HostState;
use crate::domain::saga::SagaId;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_kernel::StoreError;

/// A change to one host's state, made under its lock: it changes the state and answers whether
/// there is anything to write.
pub type HostChange<'a> = &'a mut (dyn FnMut(&mut HostState) -> bool + Send);

#[async_trait]
pub trait HostStore: Send + Sync + 'static {
    /// Reads a host's state (the default when it has none), applies `change` and writes it back
    /// if it says so, as one transaction that holds the host's row: concurrent changes to one
    /// host, from any node, apply one after the other. Answers the state as left.
    async fn change_host(&self, host: &str, change: HostChange<'_>) -> Result<HostState, StoreError>;
    /// A host's state as stored, without locking it; none when it has none.
    async fn get_host(&self, host: &str) -> Result<Option<HostState>, StoreError>;
    /// Every host with a state, in name order.
    async fn list_hosts(&self) -> Result<Vec<(String, HostState)>, StoreError>;
    /// Notes that a saga waits for a host to come back.
    async fn park_saga(&self, host: &str, id: &SagaId, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Makes up to `limit` sagas parked on a host due now (those not finished and not yet due)
    /// and forgets them; answers how many it forgot.
    async fn wake_parked(&self, host: &str, now: DateTime<Utc>, limit: usize) -> Result<usize, StoreError>;
    /// The host a saga is parked on, if any.
    async fn parked_on(&self, id: &SagaId) -> Result<Option<String>, StoreError>;
}
