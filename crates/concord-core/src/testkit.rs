//! In-memory fakes of the ports and the conformance suites every adapter must pass.
//!
//! An adapter's tests call `event_store_suite`, `key_store_suite` and `idempotency_store_suite`
//! with a factory of fresh stores; the in-memory fake passes them too, which keeps the suites honest.

use crate::app::append::{StoredId, plan_batch};
use crate::domain::event::UncheckedEvent;
use crate::domain::saga::SagaStatus;
use crate::domain::stream::Partition;
use crate::domain::tx::Outcome;
use crate::domain::{
    ApiKeyRecord, AppendOutcome, AppendRequest, Category, ExpectedVersion, Fingerprint, IdempotencyKey, KeyHash,
    Limits, RecordedEvent, Scope, StreamName,
};
use crate::ports::{
    CheckpointStore, EventStore, IdempotencyBegin, IdempotencyClaim, IdempotencyStore, KeyStore, LogQuery, SagaRow,
    SagaStore, SagaUpdate, StoreError, StoredDefinition, StoredResponse,
};
use crate::ports::{TxRow, TxStore, TxUpdate};
use async_trait::async_trait;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use uuid::Uuid;

mod broker;
mod vault;
pub use broker::{broker_suite, fresh_topic, message};
pub use vault::{MemoryVaultStore, vault_store_suite};

// ---------------------------------------------------------------------------------------------
// In-memory fake
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct MemState {
    log: Vec<RecordedEvent>,
    checkpoints: HashMap<(String, u32), u64>,
    keys: Vec<(ApiKeyRecord, bool)>,
    idem: HashMap<(Uuid, String), IdemRecord>,
    definitions: Vec<StoredDefinition>,
    sagas: std::collections::BTreeMap<String, SagaRow>,
    txs: std::collections::BTreeMap<String, TxRow>,
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
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let st = self.lock();
        if !st.log.iter().any(|e| &e.stream == stream) {
            return Err(StoreError::StreamNotFound(stream.to_string()));
        }
        Ok(st
            .log
            .iter()
            .filter(|e| &e.stream == stream && e.version >= from)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn read_log(&self, q: &LogQuery) -> Result<Vec<RecordedEvent>, StoreError> {
        let st = self.lock();
        Ok(st
            .log
            .iter()
            .filter(|e| e.position > q.after)
            .filter(|e| q.category.as_ref().is_none_or(|c| e.stream.category() == c.as_str()))
            .filter(|e| q.partition.is_none_or(|p| p.owns(&e.stream)))
            .take(q.limit)
            .cloned()
            .collect())
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        Ok(self.lock().log.last().map_or(0, |e| e.position))
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
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
            .filter(|(k, revoked)| !revoked && k.scopes.iter().any(|s| s.as_str() == Scope::ADMIN))
            .count() as u64)
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

// ---------------------------------------------------------------------------------------------
// Helpers for suites and tests
// ---------------------------------------------------------------------------------------------

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

fn log_query(after: u64) -> LogQuery {
    LogQuery {
        after,
        limit: 10_000,
        category: None,
        partition: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Event store conformance
// ---------------------------------------------------------------------------------------------

/// Runs every event-store check, each on a fresh store from `make`.
pub async fn event_store_suite<S, F, Fut>(make: F)
where
    S: EventStore + CheckpointStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    appends_number_events_and_reads_them_back(make().await).await;
    expected_version_is_enforced(make().await).await;
    a_resent_append_answers_the_original_outcome(make().await).await;
    reads_of_unknown_streams_are_not_found(make().await).await;
    the_log_filters_by_position_category_and_partition(make().await).await;
    the_head_signal_moves_on_append(make().await).await;
    concurrent_appends_never_share_a_version_or_position(Arc::new(make().await)).await;
    checkpoints_are_kept_per_group_member(make().await).await;
}

async fn appends_number_events_and_reads_them_back<S: EventStore>(s: S) {
    let mut req = append("order-1", ExpectedVersion::NoStream, &["Placed", "Paid"]);
    req.events[0].metadata = json!({"correlation_id": "c-1", "causation_id": "x-9"});
    let ids: Vec<Uuid> = req.events.iter().map(|e| e.id).collect();
    let o = s.append(req).await.expect("first append");
    assert_eq!((o.first_version, o.last_version), (1, 2));
    let o2 = s
        .append(append("order-1", ExpectedVersion::Exact(2), &["Shipped"]))
        .await
        .expect("second append");
    assert_eq!((o2.first_version, o2.last_version), (3, 3));
    assert!(o2.position > o.position);

    let all = s.read_stream(&stream("order-1"), 1, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[0].id, ids[0]);
    assert_eq!(all[1].id, ids[1]);
    assert_eq!(all[0].event_type, "Placed");
    assert_eq!(all[1].data, json!({"n": 1}));
    assert_eq!(all[0].metadata["correlation_id"], "c-1");
    assert_eq!(all[0].metadata["causation_id"], "x-9");
    assert_eq!(all[2].position, o2.position);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));

    let page = s.read_stream(&stream("order-1"), 2, 1).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), [2]);
    let past_end = s.read_stream(&stream("order-1"), 4, 10).await.unwrap();
    assert!(past_end.is_empty());
    assert_eq!(s.head_position().await.unwrap(), o2.position);
}

async fn expected_version_is_enforced<S: EventStore>(s: S) {
    let wrong = |r: Result<AppendOutcome, StoreError>, want: u64| match r {
        Err(StoreError::WrongExpectedVersion { current, .. }) => assert_eq!(current, want),
        other => panic!("expected wrong_expected_version, got {other:?}"),
    };
    wrong(s.append(append("acc-1", ExpectedVersion::Exists, &["A"])).await, 0);
    wrong(s.append(append("acc-1", ExpectedVersion::Exact(1), &["A"])).await, 0);
    s.append(append("acc-1", ExpectedVersion::Exact(0), &["A"]))
        .await
        .unwrap();
    wrong(s.append(append("acc-1", ExpectedVersion::NoStream, &["A"])).await, 1);
    wrong(
        s.append(append("acc-1", ExpectedVersion::Exact(5), &["A", "B"])).await,
        1,
    );
    s.append(append("acc-1", ExpectedVersion::Exists, &["B"]))
        .await
        .unwrap();
    s.append(append("acc-1", ExpectedVersion::Any, &["C"])).await.unwrap();
    // Nothing of a rejected append was written.
    let events = s.read_stream(&stream("acc-1"), 1, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(s.read_log(&log_query(0)).await.unwrap().len(), 3);
}

async fn a_resent_append_answers_the_original_outcome<S: EventStore>(s: S) {
    s.append(append("cart-1", ExpectedVersion::Any, &["X"])).await.unwrap();
    let req = append("cart-1", ExpectedVersion::Exact(1), &["A", "B"]);
    let first = s.append(req.clone()).await.unwrap();
    s.append(append("cart-1", ExpectedVersion::Any, &["C"])).await.unwrap();
    let again = s.append(req.clone()).await.expect("a re-sent append is not an error");
    assert_eq!(again, first);
    assert_eq!(s.read_stream(&stream("cart-1"), 1, 100).await.unwrap().len(), 4);

    // The same ids in another stream, or mixed with new ones, are a conflict.
    let mut elsewhere = req.clone();
    elsewhere.stream = stream("cart-2");
    assert!(matches!(s.append(elsewhere).await, Err(StoreError::EventIdConflict(_))));
    let mut mixed = req.clone();
    mixed
        .events
        .push(append("cart-1", ExpectedVersion::Any, &["D"]).events.remove(0));
    assert!(matches!(s.append(mixed).await, Err(StoreError::EventIdConflict(_))));
    assert!(matches!(
        s.read_stream(&stream("cart-2"), 1, 10).await,
        Err(StoreError::StreamNotFound(_))
    ));
}

async fn reads_of_unknown_streams_are_not_found<S: EventStore>(s: S) {
    assert!(matches!(
        s.read_stream(&stream("ghost-1"), 1, 10).await,
        Err(StoreError::StreamNotFound(name)) if name == "ghost-1"
    ));
    assert_eq!(s.head_position().await.unwrap(), 0);
    assert!(s.read_log(&log_query(0)).await.unwrap().is_empty());
}

async fn the_log_filters_by_position_category_and_partition<S: EventStore>(s: S) {
    for i in 0..12 {
        let cat = if i % 3 == 0 { "invoice" } else { "order" };
        s.append(append(&format!("{cat}-{i}"), ExpectedVersion::Any, &["E"]))
            .await
            .unwrap();
    }
    let all = s.read_log(&log_query(0)).await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let after = s.read_log(&log_query(all[4].position)).await.unwrap();
    assert_eq!(after.first().map(|e| e.id), Some(all[5].id));
    let mut limited = log_query(0);
    limited.limit = 3;
    assert_eq!(s.read_log(&limited).await.unwrap().len(), 3);

    let mut invoices = log_query(0);
    invoices.category = Some(Category::parse("invoice").unwrap());
    let got = s.read_log(&invoices).await.unwrap();
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|e| e.stream.category() == "invoice"));
    // A category is not a prefix match: `order` must not match `orderline-1`.
    s.append(append("orderline-1", ExpectedVersion::Any, &["E"]))
        .await
        .unwrap();
    let mut orders = log_query(0);
    orders.category = Some(Category::parse("order").unwrap());
    assert_eq!(s.read_log(&orders).await.unwrap().len(), 8);

    let mut seen = Vec::new();
    for member in 0..3 {
        let mut q = log_query(0);
        q.partition = Some(Partition::new(member, 3).unwrap());
        let part = s.read_log(&q).await.unwrap();
        assert!(part.iter().all(|e| e.stream.partition_hash() % 3 == member));
        seen.extend(part.into_iter().map(|e| e.position));
    }
    seen.sort_unstable();
    let everything: Vec<u64> = s
        .read_log(&log_query(0))
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        seen, everything,
        "members of a group together see every event exactly once"
    );
}

async fn the_head_signal_moves_on_append<S: EventStore>(s: S) {
    let mut rx = s.watch_head();
    rx.borrow_and_update();
    let o = s.append(append("sig-1", ExpectedVersion::Any, &["E"])).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
        .await
        .expect("the head signal fires after an append")
        .expect("the signal is open");
    assert!(*rx.borrow() >= o.position);
}

async fn concurrent_appends_never_share_a_version_or_position<S: EventStore>(s: Arc<S>) {
    let writers = 16;
    let per_writer = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for i in 0..per_writer {
                // Half the writers contend on one stream with optimistic concurrency.
                let name = if w % 2 == 0 {
                    "hot-1".to_owned()
                } else {
                    format!("cold-{w}")
                };
                loop {
                    let current = match s.read_stream(&stream(&name), 1, 10_000).await {
                        Ok(ev) => ev.last().map_or(0, |e| e.version),
                        Err(StoreError::StreamNotFound(_)) => 0,
                        Err(e) => panic!("{e}"),
                    };
                    match s
                        .append(append(&name, ExpectedVersion::Exact(current), &["T"; 2][..1 + i % 2]))
                        .await
                    {
                        Ok(_) => {
                            won += 1;
                            break;
                        }
                        Err(StoreError::WrongExpectedVersion { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            won
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("writer task");
    }
    assert_eq!(total, writers * per_writer);
    let log = s.read_log(&log_query(0)).await.unwrap();
    let expected_events: usize = writers * (0..per_writer).map(|i| 1 + i % 2).sum::<usize>();
    assert_eq!(log.len(), expected_events);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    let hot = s.read_stream(&stream("hot-1"), 1, 10_000).await.unwrap();
    let versions: Vec<u64> = hot.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=hot.len() as u64).collect::<Vec<_>>());
}

async fn checkpoints_are_kept_per_group_member<S: CheckpointStore>(s: S) {
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), None);
    s.save_checkpoint("g", 0, 5).await.unwrap();
    s.save_checkpoint("g", 1, 7).await.unwrap();
    s.save_checkpoint("h", 0, 9).await.unwrap();
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), Some(5));
    assert_eq!(s.load_checkpoint("g", 1).await.unwrap(), Some(7));
    assert_eq!(s.load_checkpoint("h", 0).await.unwrap(), Some(9));
    s.save_checkpoint("g", 0, 3).await.unwrap();
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), Some(3), "a group may rewind");
}

// ---------------------------------------------------------------------------------------------
// Key store conformance
// ---------------------------------------------------------------------------------------------

fn key_record(name: &str, scopes: &[&str], secret: &str) -> ApiKeyRecord {
    ApiKeyRecord {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        hash: KeyHash::of(secret),
        created_at: Utc::now(),
    }
}

/// Runs every key-store check on a fresh store.
pub async fn key_store_suite<S: KeyStore>(s: S) {
    assert_eq!(s.count_admin_keys().await.unwrap(), 0);
    let admin = key_record("root", &["admin"], "secret-a");
    let reader = key_record("reader", &["events:read", "sagas:read"], "secret-b");
    s.insert_key(&admin).await.unwrap();
    s.insert_key(&reader).await.unwrap();
    s.insert_key(&key_record("dup", &["admin"], "secret-a")).await.unwrap();
    assert_eq!(s.count_admin_keys().await.unwrap(), 1, "same hash is stored once");

    let found = s.find_key(&KeyHash::of("secret-b")).await.unwrap().expect("found");
    assert_eq!(found.id, reader.id);
    assert_eq!(found.name, "reader");
    assert_eq!(found.scopes, reader.scopes);
    assert!(s.find_key(&KeyHash::of("nope")).await.unwrap().is_none());

    assert!(s.revoke_key(admin.id).await.unwrap());
    assert!(!s.revoke_key(admin.id).await.unwrap(), "revoking twice finds nothing");
    assert!(s.find_key(&KeyHash::of("secret-a")).await.unwrap().is_none());
    assert_eq!(s.count_admin_keys().await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// Saga store conformance
// ---------------------------------------------------------------------------------------------

/// A new saga row, due now, held by nobody.
#[must_use]
pub fn saga_row(id: &str, now: DateTime<Utc>) -> SagaRow {
    SagaRow {
        id: id.to_owned(),
        definition: "order".into(),
        version: 1,
        input: json!({"sku": "a", "qty": 2}),
        status: SagaStatus::Running,
        next_run_at: Some(now),
        lease_owner: None,
        lease_until: None,
        log_version: 0,
        created_at: now,
        updated_at: now,
    }
}

/// Runs every saga-store check on a fresh store.
pub async fn saga_store_suite<S: SagaStore>(s: S) {
    let s = Arc::new(s);
    // The database keeps microseconds; start from a whole second so rows compare equal.
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("valid time");
    let secs = ChronoDuration::seconds;

    // Definitions: versioned, a repeated put is not a new version.
    let spec1 = json!({"steps": [{"name": "a"}]});
    let spec2 = json!({"steps": [{"name": "a"}, {"name": "b"}]});
    assert_eq!(s.put_definition("order", &spec1, now).await.unwrap(), (1, true));
    assert_eq!(s.put_definition("order", &spec1, now).await.unwrap(), (1, false));
    assert_eq!(s.put_definition("order", &spec2, now).await.unwrap(), (2, true));
    assert_eq!(s.put_definition("other", &spec2, now).await.unwrap(), (1, true));
    let latest = s.get_definition("order", None).await.unwrap().expect("latest");
    assert_eq!((latest.version, &latest.spec), (2, &spec2));
    let first = s.get_definition("order", Some(1)).await.unwrap().expect("v1");
    assert_eq!(first.spec, spec1);
    assert!(s.get_definition("order", Some(3)).await.unwrap().is_none());
    assert!(s.get_definition("nope", None).await.unwrap().is_none());
    // Concurrent puts of different specs get distinct versions.
    let puts: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.put_definition("race", &json!({"n": i}), now).await.unwrap() })
        })
        .collect();
    let mut versions = Vec::new();
    for p in puts {
        versions.push(p.await.unwrap().0);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());

    // Rows: a caller-chosen id is created once.
    let row = saga_row("s-1", now);
    assert_eq!(s.create_saga(&row).await.unwrap(), (row.clone(), true));
    let mut again = saga_row("s-1", now);
    again.input = json!({"other": true});
    assert_eq!(s.create_saga(&again).await.unwrap(), (row.clone(), false));
    assert_eq!(s.get_saga("s-1").await.unwrap(), Some(row.clone()));
    assert_eq!(s.get_saga("s-404").await.unwrap(), None);

    // Claims take due rows without a live lease, oldest due first.
    let mut later = saga_row("s-2", now + secs(60));
    later.next_run_at = Some(now + secs(60));
    s.create_saga(&later).await.unwrap();
    let mut done = saga_row("s-3", now);
    done.status = SagaStatus::Completed;
    done.next_run_at = None;
    s.create_saga(&done).await.unwrap();
    let node_a = Uuid::now_v7();
    let node_b = Uuid::now_v7();
    let claimed = s.claim_sagas(node_a, now, now + secs(10), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-1"]);
    assert_eq!(claimed[0].lease_owner, Some(node_a));
    assert_eq!(claimed[0].lease_until, Some(now + secs(10)));
    assert!(
        s.claim_sagas(node_b, now + secs(5), now + secs(15), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A lease that expired is taken over.
    let taken = s.claim_sagas(node_b, now + secs(11), now + secs(21), 10).await.unwrap();
    assert_eq!(taken.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-1"]);

    // Updates hold only for the lease holder, and never go back in the log.
    let update = |holder, log_version, status, next: Option<DateTime<Utc>>| SagaUpdate {
        id: "s-1",
        holder,
        status,
        next_run_at: next,
        lease: None,
        log_version,
        now: now + secs(12),
    };
    assert!(
        !s.update_saga(&update(Some(node_a), 3, SagaStatus::Compensating, Some(now)))
            .await
            .unwrap()
    );
    assert!(
        s.update_saga(&update(Some(node_b), 3, SagaStatus::Compensating, Some(now + secs(30))))
            .await
            .unwrap()
    );
    let r = s.get_saga("s-1").await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.lease_owner, r.lease_until, r.log_version, r.next_run_at),
        (SagaStatus::Compensating, None, None, 3, Some(now + secs(30)))
    );
    assert_eq!(r.updated_at, now + secs(12));
    assert!(
        !s.update_saga(&update(None, 2, SagaStatus::Running, Some(now)))
            .await
            .unwrap(),
        "older log version"
    );
    let mut keep = update(None, 4, SagaStatus::Compensating, Some(now));
    keep.lease = Some((node_a, now + secs(40)));
    assert!(
        s.update_saga(&keep).await.unwrap(),
        "an unheld row can be taken by an update"
    );
    let r = s.get_saga("s-1").await.unwrap().unwrap();
    assert_eq!((r.lease_owner, r.lease_until), (Some(node_a), Some(now + secs(40))));
    assert!(
        !s.update_saga(&update(None, 5, SagaStatus::Completed, None))
            .await
            .unwrap(),
        "held by node a"
    );
    assert!(
        !s.update_saga(&SagaUpdate {
            id: "s-404",
            ..update(None, 1, SagaStatus::Completed, None)
        })
        .await
        .unwrap()
    );

    // Listing: id order, status filter, cursor, limit.
    let all = s.list_sagas(None, None, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["s-1", "s-2", "s-3"]
    );
    let page = s.list_sagas(None, Some("s-1"), 1).await.unwrap();
    assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-2"]);
    let completed = s.list_sagas(Some(SagaStatus::Completed), None, 10).await.unwrap();
    assert_eq!(completed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-3"]);
    let mut counts = s.count_sagas().await.unwrap();
    counts.sort_by_key(|(st, _)| st.as_str());
    assert_eq!(
        counts,
        vec![
            (SagaStatus::Compensating, 1),
            (SagaStatus::Completed, 1),
            (SagaStatus::Running, 1)
        ]
    );

    // Concurrent claimers never take the same row.
    for i in 0..60 {
        s.create_saga(&saga_row(&format!("c-{i:03}"), now)).await.unwrap();
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let me = Uuid::now_v7();
                let mut mine = Vec::new();
                for _ in 0..20 {
                    let got = s.claim_sagas(me, now + secs(100), now + secs(200), 7).await.unwrap();
                    mine.extend(got.into_iter().map(|r| r.id));
                }
                mine
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in claimers {
        for id in c.await.unwrap() {
            assert!(seen.insert(id.clone()), "{id} claimed twice");
        }
    }
    // The 60 new rows plus s-2 (due at +60 s); s-1 is held by node a until +40 s, so it is free too.
    assert_eq!(seen.len(), 62);
}

// ---------------------------------------------------------------------------------------------
// Transaction store conformance
// ---------------------------------------------------------------------------------------------

/// A new transaction row, undecided, due now, held by nobody.
#[must_use]
pub fn tx_row(xid: &str, now: DateTime<Utc>) -> TxRow {
    TxRow {
        xid: xid.to_owned(),
        outcome: None,
        pending: true,
        next_run_at: Some(now),
        lease_owner: None,
        lease_until: None,
        log_version: 0,
        created_at: now,
        updated_at: now,
    }
}

/// Runs every transaction-store check on a fresh store.
pub async fn tx_store_suite<S: TxStore>(s: S) {
    let s = Arc::new(s);
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("valid time");
    let secs = ChronoDuration::seconds;
    assert_eq!(s.pending_txs().await.unwrap(), (0, None));
    let a = tx_row("x-1", now);
    s.create_tx(&a).await.unwrap();
    assert!(s.create_tx(&a).await.is_err(), "an xid is created once");
    assert_eq!(s.get_tx("x-1").await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_tx("x-404").await.unwrap(), None);
    let mut later = tx_row("x-2", now - secs(5));
    later.next_run_at = Some(now + secs(60));
    s.create_tx(&later).await.unwrap();
    let mut done = tx_row("x-3", now);
    done.outcome = Some(Outcome::Committed);
    done.pending = false;
    done.next_run_at = None;
    s.create_tx(&done).await.unwrap();
    assert_eq!(s.pending_txs().await.unwrap(), (2, Some(now - secs(5))));

    // Claims: due and unleased only; an expired lease is taken over.
    let (n1, n2) = (Uuid::now_v7(), Uuid::now_v7());
    let got = s.claim_txs(n1, now, now + secs(10), 10).await.unwrap();
    assert_eq!(got.iter().map(|r| r.xid.as_str()).collect::<Vec<_>>(), ["x-1"]);
    assert_eq!(
        (got[0].lease_owner, got[0].lease_until),
        (Some(n1), Some(now + secs(10)))
    );
    assert!(
        s.claim_txs(n2, now + secs(5), now + secs(15), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let got = s.claim_txs(n2, now + secs(11), now + secs(21), 10).await.unwrap();
    assert_eq!(got.iter().map(|r| r.xid.as_str()).collect::<Vec<_>>(), ["x-1"]);

    // Updates: only by the holder, never backwards.
    let update = |holder, log_version, outcome, pending, next| TxUpdate {
        xid: "x-1",
        holder,
        outcome,
        pending,
        next_run_at: next,
        lease: None,
        log_version,
        now: now + secs(12),
    };
    assert!(
        !s.update_tx(&update(Some(n1), 2, Some(Outcome::Aborted), true, Some(now)))
            .await
            .unwrap()
    );
    assert!(
        s.update_tx(&update(
            Some(n2),
            2,
            Some(Outcome::Committed),
            true,
            Some(now + secs(30))
        ))
        .await
        .unwrap()
    );
    let r = s.get_tx("x-1").await.unwrap().unwrap();
    assert_eq!(
        (
            r.outcome,
            r.pending,
            r.lease_owner,
            r.lease_until,
            r.log_version,
            r.next_run_at,
            r.updated_at
        ),
        (
            Some(Outcome::Committed),
            true,
            None,
            None,
            2,
            Some(now + secs(30)),
            now + secs(12)
        )
    );
    assert!(
        !s.update_tx(&update(None, 1, Some(Outcome::Committed), false, None))
            .await
            .unwrap(),
        "older"
    );
    assert!(
        s.update_tx(&update(None, 3, Some(Outcome::Committed), false, None))
            .await
            .unwrap()
    );
    assert!(
        !s.update_tx(&TxUpdate {
            xid: "x-404",
            ..update(None, 9, None, true, None)
        })
        .await
        .unwrap()
    );

    // Listing by outcome (undecided included), pending, cursor and limit.
    let ids = |rows: Vec<TxRow>| rows.into_iter().map(|r| r.xid).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_txs(None, None, None, 10).await.unwrap()),
        ["x-1", "x-2", "x-3"]
    );
    assert_eq!(ids(s.list_txs(None, Some(true), None, 10).await.unwrap()), ["x-2"]);
    assert_eq!(ids(s.list_txs(Some(None), None, None, 10).await.unwrap()), ["x-2"]);
    assert_eq!(
        ids(s
            .list_txs(Some(Some(Outcome::Committed)), None, None, 10)
            .await
            .unwrap()),
        ["x-1", "x-3"]
    );
    assert_eq!(ids(s.list_txs(None, None, Some("x-1"), 1).await.unwrap()), ["x-2"]);
    assert_eq!(s.pending_txs().await.unwrap(), (1, Some(now - secs(5))));

    // Concurrent claimers never take the same row.
    for i in 0..40 {
        s.create_tx(&tx_row(&format!("c-{i:03}"), now)).await.unwrap();
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let me = Uuid::now_v7();
                let mut mine = Vec::new();
                for _ in 0..15 {
                    mine.extend(
                        s.claim_txs(me, now + secs(100), now + secs(200), 5)
                            .await
                            .unwrap()
                            .into_iter()
                            .map(|r| r.xid),
                    );
                }
                mine
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in claimers {
        for xid in c.await.unwrap() {
            assert!(seen.insert(xid.clone()), "{xid} claimed twice");
        }
    }
    assert_eq!(seen.len(), 41, "the 40 new rows and x-2");
}

// ---------------------------------------------------------------------------------------------
// Idempotency store conformance
// ---------------------------------------------------------------------------------------------

/// Runs every idempotency-store check on a fresh store.
pub async fn idempotency_store_suite<S: IdempotencyStore>(s: S) {
    let owner = Uuid::now_v7();
    let other_owner = Uuid::now_v7();
    let key = IdempotencyKey::parse("k-1").unwrap();
    let now = Utc::now();
    let claim = |owner: Uuid, body: &[u8], now: DateTime<Utc>| IdempotencyClaim {
        owner,
        key: &key,
        fingerprint: Fingerprint::of("POST", "/x", body),
        now,
        locked_until: now + ChronoDuration::seconds(30),
        expires_at: now + ChronoDuration::hours(1),
    };
    let response = StoredResponse {
        status: 201,
        content_type: Some("application/json".into()),
        body: br#"{"ok":true}"#.to_vec(),
    };

    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        s.begin(&claim(owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Mismatch
    );
    assert_eq!(
        s.begin(&claim(other_owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Started,
        "keys are scoped per owner"
    );
    s.complete(&claim(owner, b"a", now), &response).await.unwrap();
    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    assert_eq!(
        s.begin(&claim(owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Mismatch
    );

    // A released key can be claimed again.
    s.release(&claim(other_owner, b"b", now)).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", now)).await.unwrap(),
        IdempotencyBegin::Started
    );
    // An in-flight record whose holder died is taken over once its lock expires.
    let later = now + ChronoDuration::seconds(31);
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::Started
    );
    // The holder that lost the key to a takeover can neither complete nor release it.
    s.complete(&claim(other_owner, b"c", now), &response).await.unwrap();
    s.release(&claim(other_owner, b"c", now)).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::InFlight,
        "the new holder still holds the key"
    );
    s.complete(&claim(other_owner, b"c", later), &response).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    // A completed record is not taken over when its lock time passes, only when it expires.
    assert_eq!(
        s.begin(&claim(owner, b"a", later)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    let expired = now + ChronoDuration::hours(2);
    assert_eq!(
        s.begin(&claim(owner, b"z", expired)).await.unwrap(),
        IdempotencyBegin::Started
    );

    assert!(s.purge_expired(now + ChronoDuration::hours(10)).await.unwrap() >= 1);
    assert_eq!(
        s.begin(&claim(other_owner, b"q", now + ChronoDuration::hours(10)))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
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

    async fn get_saga(&self, id: &str) -> Result<Option<SagaRow>, StoreError> {
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

    async fn get_tx(&self, xid: &str) -> Result<Option<TxRow>, StoreError> {
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

    async fn pending_txs(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        let st = self.lock();
        let pending: Vec<&TxRow> = st.txs.values().filter(|r| r.pending).collect();
        Ok((pending.len() as u64, pending.iter().map(|r| r.created_at).min()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn the_memory_store_passes_the_tx_store_suite() {
        tx_store_suite(MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn the_memory_store_passes_the_idempotency_suite() {
        idempotency_store_suite(MemoryStore::default()).await;
    }
}
