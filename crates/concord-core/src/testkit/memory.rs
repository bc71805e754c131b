//! [`MemoryStore`]: every port but the vault store and the broker, in memory.

use crate::app::append::{StoredId, plan_batch};
use crate::domain::saga::{SagaId, SagaStatus};
use crate::domain::tx::{Outcome, Xid};
use crate::domain::{
    ApiKeyRecord, AppendOutcome, AppendRequest, Fingerprint, KeyHash, RecordedEvent, Scope, StreamName,
};
use crate::ports::{
    CheckpointStore, EventStore, IdempotencyBegin, IdempotencyClaim, IdempotencyStore, KeyStore, LogQuery, SagaRow,
    SagaStore, SagaUpdate, StoreError, StoredDefinition, StoredResponse, TxRow, TxStore, TxUpdate,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Default)]
struct MemState {
    log: Vec<RecordedEvent>,
    checkpoints: HashMap<(String, u32), u64>,
    owners: HashMap<(String, String), String>,
    keys: Vec<(ApiKeyRecord, bool)>,
    idem: HashMap<(Uuid, String), IdemRecord>,
    definitions: Vec<StoredDefinition>,
    sagas: std::collections::BTreeMap<SagaId, SagaRow>,
    txs: std::collections::BTreeMap<Xid, TxRow>,
    hosts: std::collections::BTreeMap<String, crate::domain::flow::HostState>,
    parked: std::collections::BTreeMap<(String, SagaId), DateTime<Utc>>,
}

#[derive(Clone)]
struct IdemRecord {
    fingerprint: Fingerprint,
    response: Option<StoredResponse>,
    locked_until: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// Every port in memory, for use-case tests. Not durable: the embedded product is SQLite.
pub struct MemoryStore {
    state: Mutex<MemState>,
    head: watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::new(MemState::default()),
            head: watch::channel(0).0,
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let mut st = self.lock();
        let current = st
            .log
            .iter()
            .filter(|e| e.stream == request.stream)
            .map(|e| e.version)
            .max()
            .unwrap_or(0);
        let heads = HashMap::from([(request.stream.clone(), current)]);
        let stored: HashMap<Uuid, StoredId> = st
            .log
            .iter()
            .filter(|e| request.events.iter().any(|n| n.id == e.id))
            .map(|e| {
                (
                    e.id,
                    StoredId {
                        stream: e.stream.clone(),
                        version: e.version,
                        position: e.position,
                        event_type: e.event_type.clone(),
                        data: e.data.clone(),
                        metadata: e.metadata.clone(),
                    },
                )
            })
            .collect();
        let last = st.log.last().map_or(0, |e| e.position);
        let plan = plan_batch(std::slice::from_ref(&request), &heads, &stored, last)
            .pop()
            .expect("one plan per request");
        let outcome = plan.outcome(&request)?;
        if let crate::app::append::Plan::Write {
            first_version,
            first_position,
        } = plan
        {
            let now = Utc::now();
            for (i, e) in request.events.into_iter().enumerate() {
                st.log.push(RecordedEvent {
                    id: e.id,
                    stream: request.stream.clone(),
                    version: first_version + i as u64,
                    position: first_position + i as u64,
                    event_type: e.event_type.as_str().to_owned(),
                    data: e.data,
                    metadata: e.metadata,
                    recorded_at: now,
                });
            }
            self.head.send_replace(outcome.position);
        }
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let st = self.lock();
        if !st.log.iter().any(|e| &e.stream == stream) {
            return Err(StoreError::StreamNotFound(stream.to_string()));
        }
        Ok(within_bytes(
            st.log
                .iter()
                .filter(|e| &e.stream == stream && e.version >= from)
                .take(limit)
                .cloned(),
            max_bytes,
        ))
    }

    async fn read_log(&self, q: &LogQuery) -> Result<Vec<RecordedEvent>, StoreError> {
        let st = self.lock();
        Ok(within_bytes(
            st.log
                .iter()
                .filter(|e| e.position > q.after)
                .filter(|e| q.category.as_ref().is_none_or(|c| e.stream.category() == c.as_str()))
                .filter(|e| q.partition.is_none_or(|p| p.owns(&e.stream)))
                .take(q.limit)
                .cloned(),
            q.max_bytes,
        ))
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        Ok(self.lock().log.last().map_or(0, |e| e.position))
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

/// The events in order while their `data` and `metadata` (as JSON text) fit in `max_bytes`,
/// and always the first.
fn within_bytes(events: impl Iterator<Item = RecordedEvent>, max_bytes: usize) -> Vec<RecordedEvent> {
    let mut used = 0usize;
    let mut out = Vec::new();
    for e in events {
        let size = e.data.to_string().len() + e.metadata.to_string().len();
        if !out.is_empty() && used.saturating_add(size) > max_bytes {
            break;
        }
        used = used.saturating_add(size);
        out.push(e);
    }
    out
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    async fn load_checkpoint(&self, group: &str, member: u32) -> Result<Option<u64>, StoreError> {
        Ok(self.lock().checkpoints.get(&(group.to_owned(), member)).copied())
    }
    async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), StoreError> {
        self.lock().checkpoints.insert((group.to_owned(), member), position);
        Ok(())
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let mut st = self.lock();
        if !st.keys.iter().any(|(k, _)| k.hash == key.hash) {
            st.keys.push((key.clone(), false));
        }
        Ok(())
    }
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self
            .lock()
            .keys
            .iter()
            .find(|(k, revoked)| !revoked && &k.hash == hash)
            .map(|(k, _)| k.clone()))
    }
    async fn revoke_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let found = st.keys.iter_mut().find(|(k, revoked)| !revoked && k.id == id);
        Ok(found.map(|(_, revoked)| *revoked = true).is_some())
    }
    async fn count_admin_keys(&self) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .keys
            .iter()
            .filter(|(k, revoked)| !revoked && k.scopes.contains(&Scope::Admin))
            .count() as u64)
    }
    async fn claim_owner(&self, kind: &str, name: &str, owner: &str) -> Result<String, StoreError> {
        Ok(self
            .lock()
            .owners
            .entry((kind.to_owned(), name.to_owned()))
            .or_insert_with(|| owner.to_owned())
            .clone())
    }

    async fn owner(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().owners.get(&(kind.to_owned(), name.to_owned())).cloned())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, c: &IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        let mut st = self.lock();
        let slot = (c.owner, c.key.as_str().to_owned());
        if let Some(r) = st.idem.get(&slot) {
            let takeover = r.expires_at <= c.now || (r.response.is_none() && r.locked_until <= c.now);
            if !takeover {
                return Ok(if r.fingerprint != c.fingerprint {
                    IdempotencyBegin::Mismatch
                } else if let Some(resp) = &r.response {
                    IdempotencyBegin::Replay(resp.clone())
                } else {
                    IdempotencyBegin::InFlight
                });
            }
        }
        st.idem.insert(
            slot,
            IdemRecord {
                fingerprint: c.fingerprint,
                response: None,
                locked_until: c.locked_until,
                expires_at: c.expires_at,
            },
        );
        Ok(IdempotencyBegin::Started)
    }
    async fn complete(&self, c: &IdempotencyClaim<'_>, response: &StoredResponse) -> Result<(), StoreError> {
        if let Some(r) = self.lock().idem.get_mut(&(c.owner, c.key.as_str().to_owned()))
            && r.response.is_none()
            && r.fingerprint == c.fingerprint
            && r.locked_until == c.locked_until
        {
            r.response = Some(response.clone());
        }
        Ok(())
    }
    async fn release(&self, c: &IdempotencyClaim<'_>) -> Result<(), StoreError> {
        let mut st = self.lock();
        let slot = (c.owner, c.key.as_str().to_owned());
        if st
            .idem
            .get(&slot)
            .is_some_and(|r| r.response.is_none() && r.fingerprint == c.fingerprint && r.locked_until == c.locked_until)
        {
            st.idem.remove(&slot);
        }
        Ok(())
    }
    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let before = st.idem.len();
        st.idem.retain(|_, r| r.expires_at > now);
        Ok((before - st.idem.len()) as u64)
    }
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn put_definition(
        &self,
        name: &str,
        spec: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<(u32, bool), StoreError> {
        let mut st = self.lock();
        let latest = st
            .definitions
            .iter()
            .filter(|d| d.name == name)
            .max_by_key(|d| d.version);
        if let Some(l) = latest.filter(|l| &l.spec == spec) {
            return Ok((l.version, false));
        }
        let version = latest.map_or(1, |l| l.version + 1);
        st.definitions.push(StoredDefinition {
            name: name.to_owned(),
            version,
            spec: spec.clone(),
            created_at: now,
        });
        Ok((version, true))
    }

    async fn get_definition(&self, name: &str, version: Option<u32>) -> Result<Option<StoredDefinition>, StoreError> {
        let st = self.lock();
        let mut versions = st.definitions.iter().filter(|d| d.name == name);
        Ok(match version {
            Some(v) => versions.find(|d| d.version == v).cloned(),
            None => versions.max_by_key(|d| d.version).cloned(),
        })
    }

    async fn create_saga(&self, row: &SagaRow) -> Result<(SagaRow, bool), StoreError> {
        let mut st = self.lock();
        if let Some(existing) = st.sagas.get(&row.id) {
            return Ok((existing.clone(), false));
        }
        st.sagas.insert(row.id.clone(), row.clone());
        Ok((row.clone(), true))
    }

    async fn get_saga(&self, id: &SagaId) -> Result<Option<SagaRow>, StoreError> {
        Ok(self.lock().sagas.get(id).cloned())
    }

    async fn list_sagas(
        &self,
        status: Option<SagaStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError> {
        let st = self.lock();
        Ok(st
            .sagas
            .values()
            .filter(|r| after.is_none_or(|a| r.id.as_str() > a))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn claim_sagas(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, StoreError> {
        let mut st = self.lock();
        let mut due: Vec<&mut SagaRow> = st
            .sagas
            .values_mut()
            .filter(|r| r.next_run_at.is_some_and(|t| t <= now) && r.lease_until.is_none_or(|t| t <= now))
            .collect();
        due.sort_by_key(|r| r.next_run_at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|r| {
                r.lease_owner = Some(owner);
                r.lease_until = Some(lease_until);
                r.clone()
            })
            .collect())
    }

    async fn update_saga(&self, u: &SagaUpdate<'_>) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let Some(r) = st.sagas.get_mut(u.id) else {
            return Ok(false);
        };
        if r.lease_owner != u.holder || r.log_version > u.log_version {
            return Ok(false);
        }
        r.status = u.status;
        r.next_run_at = u.next_run_at;
        r.lease_owner = u.lease.map(|l| l.0);
        r.lease_until = u.lease.map(|l| l.1);
        r.log_version = u.log_version;
        r.updated_at = u.now;
        Ok(true)
    }

    async fn wake_saga(&self, id: &SagaId, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut st = self.lock();
        match st.sagas.get_mut(id) {
            Some(r) if !r.status.is_terminal() => {
                r.next_run_at = Some(now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn purge_sagas(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let gone: Vec<SagaId> = st
            .sagas
            .values()
            .filter(|r| {
                matches!(
                    r.status,
                    SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Cancelled
                ) && r.lease_owner.is_none()
                    && r.next_run_at.is_none()
                    && r.updated_at < before
            })
            .map(|r| r.id.clone())
            .take(limit)
            .collect();
        for id in &gone {
            st.sagas.remove(id);
        }
        Ok(gone.len() as u64)
    }

    async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        let st = self.lock();
        Ok(SagaStatus::ALL
            .into_iter()
            .map(|s| (s, st.sagas.values().filter(|r| r.status == s).count() as u64))
            .filter(|(_, n)| *n > 0)
            .collect())
    }
}

#[async_trait]
impl TxStore for MemoryStore {
    async fn create_tx(&self, row: &TxRow) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.txs.contains_key(&row.xid) {
            return Err(StoreError::Unavailable(format!("transaction {} exists", row.xid)));
        }
        st.txs.insert(row.xid.clone(), row.clone());
        Ok(())
    }

    async fn get_tx(&self, xid: &Xid) -> Result<Option<TxRow>, StoreError> {
        Ok(self.lock().txs.get(xid).cloned())
    }

    async fn list_txs(
        &self,
        outcome: Option<Option<Outcome>>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError> {
        let st = self.lock();
        Ok(st
            .txs
            .values()
            .filter(|r| after.is_none_or(|a| r.xid.as_str() > a))
            .filter(|r| outcome.is_none_or(|o| r.outcome == o))
            .filter(|r| pending.is_none_or(|p| r.pending == p))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn claim_txs(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TxRow>, StoreError> {
        let mut st = self.lock();
        let mut due: Vec<&mut TxRow> = st
            .txs
            .values_mut()
            .filter(|r| r.next_run_at.is_some_and(|t| t <= now) && r.lease_until.is_none_or(|t| t <= now))
            .collect();
        due.sort_by_key(|r| r.next_run_at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|r| {
                r.lease_owner = Some(owner);
                r.lease_until = Some(lease_until);
                r.clone()
            })
            .collect())
    }

    async fn update_tx(&self, u: &TxUpdate<'_>) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let Some(r) = st.txs.get_mut(u.xid) else {
            return Ok(false);
        };
        if r.lease_owner != u.holder || r.log_version > u.log_version {
            return Ok(false);
        }
        r.outcome = u.outcome;
        r.pending = u.pending;
        r.next_run_at = u.next_run_at;
        r.lease_owner = u.lease.map(|l| l.0);
        r.lease_until = u.lease.map(|l| l.1);
        r.log_version = u.log_version;
        r.updated_at = u.now;
        Ok(true)
    }

    async fn purge_txs(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let gone: Vec<Xid> = st
            .txs
            .values()
            .filter(|r| {
                r.outcome.is_some()
                    && !r.pending
                    && r.lease_owner.is_none()
                    && r.next_run_at.is_none()
                    && r.updated_at < before
            })
            .map(|r| r.xid.clone())
            .take(limit)
            .collect();
        for xid in &gone {
            st.txs.remove(xid);
        }
        Ok(gone.len() as u64)
    }

    async fn pending_txs(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        let st = self.lock();
        let pending: Vec<&TxRow> = st.txs.values().filter(|r| r.pending).collect();
        Ok((pending.len() as u64, pending.iter().map(|r| r.created_at).min()))
    }
}

#[async_trait]
impl crate::ports::HostStore for MemoryStore {
    async fn change_host(
        &self,
        host: &str,
        change: crate::ports::HostChange<'_>,
    ) -> Result<crate::domain::flow::HostState, StoreError> {
        let mut st = self.lock();
        let mut state = st.hosts.get(host).cloned().unwrap_or_default();
        if change(&mut state) {
            st.hosts.insert(host.to_owned(), state.clone());
        }
        Ok(state)
    }

    async fn get_host(&self, host: &str) -> Result<Option<crate::domain::flow::HostState>, StoreError> {
        Ok(self.lock().hosts.get(host).cloned())
    }

    async fn list_hosts(&self) -> Result<Vec<(String, crate::domain::flow::HostState)>, StoreError> {
        Ok(self.lock().hosts.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn park_saga(&self, host: &str, id: &SagaId, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.lock().parked.insert((host.to_owned(), id.clone()), now);
        Ok(())
    }

    async fn wake_parked(&self, host: &str, now: DateTime<Utc>, limit: usize) -> Result<usize, StoreError> {
        let mut st = self.lock();
        let mut ids: Vec<(DateTime<Utc>, SagaId)> = st
            .parked
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|((_, id), at)| (*at, id.clone()))
            .collect();
        ids.sort();
        ids.truncate(limit);
        for (_, id) in &ids {
            st.parked.remove(&(host.to_owned(), id.clone()));
            if let Some(row) = st.sagas.get_mut(id)
                && row.next_run_at.is_some_and(|t| t > now)
            {
                row.next_run_at = Some(now);
            }
        }
        Ok(ids.len())
    }

    async fn parked_on(&self, id: &SagaId) -> Result<Option<String>, StoreError> {
        Ok(self.lock().parked.keys().find(|(_, s)| s == id).map(|(h, _)| h.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{
        event_store_suite, host_store_suite, idempotency_store_suite, key_store_suite, saga_store_suite, tx_store_suite,
    };

    #[tokio::test]
    async fn the_memory_store_passes_the_event_store_suite() {
        event_store_suite(|| async { MemoryStore::default() }).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_key_store_suite() {
        key_store_suite(MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_saga_store_suite() {
        saga_store_suite(MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_host_store_suite() {
        host_store_suite(MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_tx_store_suite() {
        tx_store_suite(MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_idempotency_suite() {
        idempotency_store_suite(MemoryStore::default()).await;
    }
}
