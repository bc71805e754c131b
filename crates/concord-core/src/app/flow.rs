//! The gate every saga call to a participant passes: the host's limits, its `Retry-After` hold
//! and its circuit breaker, shared by every node through the [`HostStore`].
//!
//! A host with no limit, nothing held and no failure counted (nearly every host, nearly all the
//! time) costs nothing: its state is read from a copy of the host table each node refreshes
//! every `refresh`, and only a failure writes. A host with a limit or a breaker that is not
//! closed goes through the store on every call, under the host's lock, so nodes share one count.

use crate::domain::flow::{
    Admission, BlockReason, Breaker, BreakerSettings, CallLease, HostLimits, HostSignal, HostState, Transition,
    host_key,
};
use crate::domain::saga::SagaId;
use crate::domain::{AppendRequest, ExpectedVersion, Limits, StreamName};
use crate::ports::{EventStore, HostStore, StoreError};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Settings of the gate, all configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateSettings {
    pub breaker: BreakerSettings,
    /// How old this node's copy of the host table may be: a limit set, or a breaker opened, on
    /// another node applies here within this time.
    pub refresh: Duration,
    /// How long a saga held back by a concurrency limit waits before it asks again.
    pub slot_wait: Duration,
    /// Sagas woken per statement when a host comes back.
    pub wake_batch: usize,
    /// How long past its call's timeout a call keeps its place, should its node die mid-call.
    pub lease_grace: Duration,
}

impl Default for GateSettings {
    fn default() -> Self {
        Self {
            breaker: BreakerSettings::default(),
            refresh: Duration::from_millis(500),
            slot_wait: Duration::from_millis(100),
            wake_batch: 500,
            lease_grace: Duration::from_secs(5),
        }
    }
}

/// A call let through: report what it told about its host with [`HostGate::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub key: String,
    lease: Option<Uuid>,
    /// The half-open probe: the one call that goes out while the breaker is not closed.
    probe: bool,
}

/// A call held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The host it was counted under.
    pub key: String,
    /// When to ask again: a moment the saga knows (a rate, a hold), or for a breaker, when the
    /// probe may go out (the saga is woken sooner if the host comes back).
    pub until: DateTime<Utc>,
    pub reason: BlockReason,
}

struct Snapshot {
    /// Each host's state as this node last saw it, and when it got it. Of two answers of changes
    /// that ran at about the same time, the one with the higher `version` stands, whatever order
    /// they arrive in; an older entry (a row reset or removed since) gives way to what the store
    /// says.
    hosts: HashMap<String, (HostState, Instant)>,
    read: Option<Instant>,
}

/// The stream every breaker change is recorded in: `BreakerOpened {host, at, until, failures}`
/// and `BreakerClosed {host, at}`, an audit of when each host was shut off.
pub const BREAKER_JOURNAL: &str = "saga-@breakers";

/// Flow control per participant host.
pub struct HostGate {
    store: Arc<dyn HostStore>,
    journal: Option<(Arc<dyn EventStore>, Limits)>,
    settings: GateSettings,
    copy: Mutex<Snapshot>,
    refreshing: tokio::sync::Mutex<()>,
}

impl HostGate {
    #[must_use]
    pub fn new(store: Arc<dyn HostStore>, settings: GateSettings) -> Self {
        Self {
            store,
            journal: None,
            settings,
            copy: Mutex::new(Snapshot {
                hosts: HashMap::new(),
                read: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Records every breaker change in [`BREAKER_JOURNAL`].
    #[must_use]
    pub fn with_journal(mut self, events: Arc<dyn EventStore>, limits: Limits) -> Self {
        self.journal = Some((events, limits));
        self
    }

    /// Appends a breaker change to the journal before the call that caused it is recorded,
    /// trying three times; a failure after that is logged and counted
    /// (`concord_participant_journal_errors_total`): the change itself is in the host's state
    /// either way, and the journal is an audit, not the state.
    async fn record(&self, event_type: &'static str, data: serde_json::Value) {
        let Some((events, limits)) = &self.journal else {
            return;
        };
        let event = crate::domain::event::UncheckedEvent {
            // One id for every try: a retried append that did land is not recorded twice.
            id: Some(Uuid::now_v7()),
            event_type: event_type.to_owned(),
            data,
            metadata: None,
        };
        let mut last = String::new();
        for attempt in 0..3u64 {
            let appended = match StreamName::parse(BREAKER_JOURNAL) {
                Ok(stream) => match AppendRequest::new(stream, ExpectedVersion::Any, vec![event.clone()], limits) {
                    Ok(request) => events.append(request).await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            match appended {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        metrics::counter!("concord_participant_journal_errors_total").increment(1);
        tracing::warn!(error = %last, "recording a breaker change failed");
    }

    #[must_use]
    pub fn settings(&self) -> &GateSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.copy.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the host table again once this node's copy is `refresh` old. When the read fails
    /// the old copy is kept (and read again at the next call).
    async fn refresh_if_old(&self) {
        let fresh = |c: &Snapshot| c.read.is_some_and(|t| t.elapsed() < self.settings.refresh);
        if fresh(&self.lock()) {
            return;
        }
        let _one = self.refreshing.lock().await;
        if fresh(&self.lock()) {
            return;
        }
        let began = Instant::now();
        match self.store.list_hosts().await {
            Ok(hosts) => {
                let mut c = self.lock();
                let now = Instant::now();
                let mut fresh: HashMap<String, (HostState, Instant)> =
                    hosts.into_iter().map(|(k, h)| (k, (h, now))).collect();
                // What this node got while the read ran, and newer than the read, stands.
                for (k, (h, got)) in &c.hosts {
                    if *got >= began && fresh.get(k).is_none_or(|(read, _)| read.version < h.version) {
                        fresh.insert(k.clone(), (h.clone(), *got));
                    }
                }
                for (k, (h, _)) in &fresh {
                    publish_one(k, h);
                }
                c.hosts = fresh;
                c.read = Some(now);
            }
            Err(e) => {
                metrics::counter!("concord_participant_gate_errors_total").increment(1);
                tracing::warn!(error = %e, "reading the participant hosts failed; keeping this node's copy");
            }
        }
    }

    fn remember(&self, key: &str, state: &HostState) {
        let mut c = self.lock();
        let refresh = self.settings.refresh;
        // A higher version got within the last `refresh` is newer; an older entry is not
        // trusted over the store (its row may have been reset).
        if c.hosts
            .get(key)
            .is_some_and(|(h, got)| h.version > state.version && got.elapsed() < refresh)
        {
            return;
        }
        c.hosts.insert(key.to_owned(), (state.clone(), Instant::now()));
        publish_one(key, state);
    }

    /// Asks again, of this node's copy, just before a call let through goes out: a breaker that
    /// opened (or a hold that began) since the call was let through holds it back after all,
    /// unless it is the probe. The copy is updated the moment this node changes a host, so on
    /// one node no call starts after the breaker opened; another node learns within `refresh`.
    #[must_use]
    pub fn recheck(&self, pass: &Pass) -> Option<Blocked> {
        if pass.probe {
            return None;
        }
        let now = Utc::now();
        let c = self.lock();
        let (h, _) = c.hosts.get(&pass.key)?;
        // Half open with its probe's place lapsed: not this call's to probe (the store let it
        // through before), so it asks again at once.
        if h.breaker == Breaker::HalfOpen && h.probe.is_none_or(|p| p.until <= now) {
            return Some(Blocked {
                key: pass.key.clone(),
                until: now,
                reason: BlockReason::Probing,
            });
        }
        // Past an open breaker's probe time the store decides who probes (the call asked it).
        local_block(&pass.key, h, now)
    }

    /// Asks whether a call to `host` on `port` that may run `timeout` can go out now. When the
    /// store cannot be asked, the call goes out (uncounted): flow control protects participants,
    /// it must not stop every saga because its own table is unreachable.
    pub async fn admit(&self, host: &str, port: u16, timeout: Duration) -> Result<Pass, Blocked> {
        self.refresh_if_old().await;
        let now = Utc::now();
        let (key, free, held) = {
            let c = self.lock();
            let key = host_key(host, port, |k| c.hosts.get(k).is_some_and(|(h, _)| !h.limits.is_none()));
            let known = c.hosts.get(&key).map(|(h, _)| h);
            let free = known.is_none_or(|h| h.is_free(now));
            // Held back on what this node knows, without asking the store: while a breaker is
            // open, every saga that needs the host would otherwise queue on its row's lock. A
            // copy that is behind only delays a saga to the probe time it names (a close wakes
            // the parked ones anyway).
            let held = known.and_then(|h| local_block(&key, h, now));
            (key, free, held)
        };
        if free {
            return Ok(Pass {
                key,
                lease: None,
                probe: false,
            });
        }
        if let Some(b) = held {
            // Confirmed by a plain read, which waits on no lock: another node may have closed
            // the breaker since this node's copy was read (and woken this very saga).
            let confirmed = match self.store.get_host(&key).await {
                Ok(Some(state)) => {
                    let still = local_block(&key, &state, Utc::now());
                    self.remember(&key, &state);
                    still
                }
                Ok(None) => None,
                Err(_) => Some(b),
            };
            if let Some(b) = confirmed {
                metrics::counter!("concord_participant_calls_held_total", "host" => key.clone(), "reason" => b.reason.as_str())
                    .increment(1);
                return Err(b);
            }
        }
        let lease = CallLease {
            id: Uuid::now_v7(),
            until: now + crate::app::log::chrono_dur(timeout + self.settings.lease_grace),
        };
        let mut admission = None;
        let changed = self
            .store
            .change_host(&key, &mut |h| {
                let before = h.clone();
                admission = Some(h.admit(Utc::now(), lease));
                written(h, &before)
            })
            .await;
        match changed {
            Ok(state) => self.remember(&key, &state),
            Err(e) => {
                metrics::counter!("concord_participant_gate_errors_total").increment(1);
                tracing::warn!(host = %key, error = %e, "the participant's flow control could not be asked; the call goes out");
                return Ok(Pass {
                    key,
                    lease: None,
                    probe: false,
                });
            }
        }
        match admission {
            Some(Admission::Admitted { tracked, probe }) => Ok(Pass {
                key,
                lease: tracked.then_some(lease.id),
                probe,
            }),
            Some(Admission::Blocked { until, reason }) => {
                metrics::counter!("concord_participant_calls_held_total", "host" => key.clone(), "reason" => reason.as_str())
                    .increment(1);
                Err(Blocked { key, until, reason })
            }
            None => Ok(Pass {
                key,
                lease: None,
                probe: false,
            }),
        }
    }

    /// Records what a call told about its host: frees its place, counts a failure (which may open
    /// the breaker), holds the host for a `Retry-After`, and, when a success closes the breaker,
    /// wakes every saga parked on the host at once. A failure here is logged: the call's place
    /// is freed when its lease passes, and the next report counts again.
    pub async fn report(&self, pass: Pass, signal: HostSignal) {
        let now = Utc::now();
        let untouched = {
            let c = self.lock();
            let state = c.hosts.get(&pass.key).map(|(h, _)| h);
            pass.lease.is_none()
                && match signal {
                    HostSignal::NotSent => true,
                    HostSignal::Healthy => state.is_none_or(|h| h.failures == 0 && h.breaker == Breaker::Closed),
                    HostSignal::Failing | HostSignal::Throttled(_) => false,
                }
        };
        if untouched {
            return;
        }
        let mut transition = None;
        let settings = self.settings.breaker;
        let changed = self
            .store
            .change_host(&pass.key, &mut |h| {
                let before = h.clone();
                transition = h.report(now, pass.lease, signal, &settings);
                written(h, &before)
            })
            .await;
        let state = match changed {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(host = %pass.key, error = %e, "recording a call's outcome for its host failed");
                return;
            }
        };
        self.remember(&pass.key, &state);
        match transition {
            Some(Transition::Opened) => {
                metrics::counter!("concord_participant_breaker_opened_total", "host" => pass.key.clone()).increment(1);
                tracing::warn!(host = %pass.key, failures = state.failures, "participant breaker opened; sagas that call it wait");
                // From the moment this node knows: calls it lets through check its copy, which
                // holds the open breaker from now on.
                self.record(
                    "BreakerOpened",
                    serde_json::json!({
                        "host": pass.key,
                        "at": Utc::now(),
                        "until": state.open_until,
                        "failures": state.failures,
                        "version": state.version,
                    }),
                )
                .await;
            }
            Some(Transition::Closed) => {
                self.record(
                    "BreakerClosed",
                    // From before the change was written: calls may go out from then on.
                    serde_json::json!({ "host": pass.key, "at": now, "version": state.version }),
                )
                .await;
                tracing::info!(host = %pass.key, "participant breaker closed; releasing the sagas parked on it");
                // In the background: the probe's own saga records its result meanwhile, within
                // its lease.
                let (store, key, batch) = (self.store.clone(), pass.key.clone(), self.settings.wake_batch);
                tokio::spawn(async move { wake_parked(store.as_ref(), &key, batch).await });
            }
            None => {}
        }
    }
}

/// Makes every saga parked on a host due now, a batch at a time.
async fn wake_parked(store: &dyn HostStore, key: &str, batch: usize) {
    {
        loop {
            match store.wake_parked(key, Utc::now(), batch).await {
                Ok(n) if n >= batch => {}
                Ok(n) => {
                    if n > 0 {
                        metrics::counter!("concord_participant_sagas_released_total", "host" => key.to_owned())
                            .increment(n as u64);
                    }
                    return;
                }
                Err(e) => {
                    // They still come back when their own time passes.
                    tracing::warn!(host = %key, error = %e, "waking the sagas parked on a host failed");
                    return;
                }
            }
        }
    }
}

impl HostGate {
    /// Notes that a saga waits for a host to come back.
    ///
    /// # Errors
    /// The store.
    pub async fn park(&self, key: &str, id: &SagaId) -> Result<(), StoreError> {
        self.store.park_saga(key, id, Utc::now()).await
    }

    /// Whether the host still holds calls back for a reason the saga waits out (read from the
    /// store, not the copy): a saga that parked just as the host came back is woken instead.
    ///
    /// # Errors
    /// The store.
    pub async fn still_down(&self, key: &str) -> Result<bool, StoreError> {
        let state = self.store.get_host(key).await?.unwrap_or_default();
        Ok(state.breaker != Breaker::Closed)
    }

    /// Sets a host's limits (none of either: no limit), keeping its breaker and calls out.
    ///
    /// # Errors
    /// The store.
    pub async fn set_limits(&self, key: &str, limits: HostLimits) -> Result<HostState, StoreError> {
        let state = self
            .store
            .change_host(key, &mut |h| {
                h.set_limits(limits);
                h.version += 1;
                true
            })
            .await?;
        self.remember(key, &state);
        Ok(state)
    }

    /// A host's state as the store has it.
    ///
    /// # Errors
    /// The store.
    pub async fn host(&self, key: &str) -> Result<HostState, StoreError> {
        Ok(self.store.get_host(key).await?.unwrap_or_default())
    }

    /// Every host with a state.
    ///
    /// # Errors
    /// The store.
    pub async fn hosts(&self) -> Result<Vec<(String, HostState)>, StoreError> {
        self.store.list_hosts().await
    }

    /// The host a saga is parked on, with its state.
    ///
    /// # Errors
    /// The store.
    pub async fn parked(&self, id: &SagaId) -> Result<Option<(String, HostState)>, StoreError> {
        match self.store.parked_on(id).await? {
            Some(key) => Ok(Some((key.clone(), self.host(&key).await?))),
            None => Ok(None),
        }
    }
}

/// Whether a change wrote anything; if it did, the state counts one more write.
fn written(h: &mut HostState, before: &HostState) -> bool {
    if *h == *before {
        return false;
    }
    h.version += 1;
    true
}

/// What a copy of a host's state holds a call back for without the store: an open breaker before
/// its probe time, a probe out, a `Retry-After` hold. Limits are the store's to count.
fn local_block(key: &str, h: &HostState, now: DateTime<Utc>) -> Option<Blocked> {
    let blocked = |until, reason| {
        Some(Blocked {
            key: key.to_owned(),
            until,
            reason,
        })
    };
    match (h.breaker, h.open_until, h.probe) {
        (Breaker::Open, Some(until), _) if until > now => return blocked(until, BlockReason::BreakerOpen),
        (Breaker::HalfOpen, _, Some(p)) if p.until > now => return blocked(p.until, BlockReason::Probing),
        _ => {}
    }
    match h.hold_until {
        Some(until) if until > now => blocked(until, BlockReason::RetryAfter),
        _ => None,
    }
}

fn publish_one(key: &str, h: &HostState) {
    let open = match h.breaker {
        Breaker::Closed => 0.0,
        Breaker::HalfOpen => 0.5,
        Breaker::Open => 1.0,
    };
    metrics::gauge!("concord_participant_breaker_open", "host" => key.to_owned()).set(open);
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("concord_participant_in_flight", "host" => key.to_owned()).set(h.in_flight.len() as f64);
}
