//! The worker that drives sagas on this node. Fresh sagas started here are driven at once; due
//! sagas (retries whose backoff passed, sagas abandoned by a dead node) are claimed from the
//! database every poll interval. A semaphore bounds how many sagas one node drives at a time.

use concord_core::app::saga::{DriveEnd, Held, SagaEngine, SagaError, SendSignal, StartSaga};
use concord_core::domain::saga::DefinitionSpec;
use concord_core::domain::saga::{SagaId, SagaState, SagaStatus};
use concord_core::ports::{SagaRow, StoredDefinition};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};

/// How often a waiter looks at the saga's row, for sagas finishing on another node.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Settings of the worker.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    pub poll: Duration,
    pub max_concurrent: usize,
    pub claim_batch: usize,
}

/// A saga as the API shows it: its row (what lists show), and its log's state when it was read
/// (the truth: it may be ahead of the row while a node works on the saga).
pub struct SagaView {
    pub row: SagaRow,
    pub state: Option<Arc<SagaState>>,
}

/// One local waiter, from [`SagaRunner::watch`] on: dropped however the wait ends (also before
/// it began, while the request still read the store), it drops its receiver and then forgets the
/// saga's closed waiters, so an abandoned request leaves nothing behind.
pub struct Waiting<'a> {
    runner: &'a SagaRunner,
    id: SagaId,
    rx: Option<oneshot::Receiver<Arc<SagaState>>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.runner.forget_waiter(&self.id);
    }
}

/// Drives sagas and tells local waiters when one finishes.
pub struct SagaRunner {
    engine: Arc<SagaEngine>,
    config: RunnerConfig,
    /// Whether this node drives sagas at all.
    runs: bool,
    slots: Arc<Semaphore>,
    waiters: Mutex<HashMap<SagaId, Vec<oneshot::Sender<Arc<SagaState>>>>>,
    /// Poked when a slot frees up or a saga may be due sooner than the next poll.
    wake: Arc<Notify>,
}

impl SagaRunner {
    #[must_use]
    pub fn new(engine: Arc<SagaEngine>, config: RunnerConfig, runs: bool) -> Arc<Self> {
        Arc::new(Self {
            engine,
            runs,
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            waiters: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
        })
    }

    #[must_use]
    pub fn engine(&self) -> &Arc<SagaEngine> {
        &self.engine
    }

    /// Drives a saga this node holds, in the background, if a slot is free and this node runs
    /// sagas; otherwise gives it back to the queue in the database, where a runner with room
    /// claims it.
    pub fn spawn(self: &Arc<Self>, held: Held) {
        let permit = self.runs.then(|| self.slots.clone().try_acquire_owned().ok()).flatten();
        match permit {
            Some(permit) => self.spawn_with(held, permit),
            None => {
                let engine = self.engine.clone();
                tokio::spawn(async move {
                    if let Err(e) = engine.abandon(held).await {
                        tracing::warn!(error = %e, "giving a saga back failed; its lease will expire");
                    }
                });
            }
        }
    }

    fn spawn_with(self: &Arc<Self>, held: Held, permit: OwnedSemaphorePermit) {
        let me = self.clone();
        tokio::spawn(async move {
            me.drive(held).await;
            drop(permit);
            me.wake.notify_one();
        });
    }

    async fn drive(&self, held: Held) {
        let id = held.id().clone();
        match self.engine.drive_with(held, |state| self.finished(state)).await {
            Ok(DriveEnd::Finished(_) | DriveEnd::Waiting | DriveEnd::Woken | DriveEnd::Lost) => {}
            // The lease will expire and a runner (maybe this one) continues from the log.
            Err(e) => {
                metrics::counter!("concord_saga_drive_errors_total").increment(1);
                tracing::warn!(saga.id = %id, error = %e, "saga drive stopped");
            }
        }
    }

    fn finished(&self, state: &SagaState) {
        let waiters = self.lock_waiters().remove(&state.id);
        if let Some(waiters) = waiters {
            let state = Arc::new(state.clone());
            for w in waiters {
                let _ = w.send(state.clone());
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<SagaId, Vec<oneshot::Sender<Arc<SagaState>>>>> {
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks to hear when a saga driven on this node finishes: register before the drive starts.
    pub fn watch(&self, id: &SagaId) -> Waiting<'_> {
        let (tx, rx) = oneshot::channel();
        self.lock_waiters().entry(id.clone()).or_default().push(tx);
        Waiting {
            runner: self,
            id: id.clone(),
            rx: Some(rx),
        }
    }

    /// Waits up to `timeout` for what [`Self::watch`] asked. None on timeout, or when the saga
    /// finished on another node (seen in its row, looked at every [`WAIT_POLL`]); the caller
    /// then reads the saga's state.
    pub async fn wait(&self, mut waiting: Waiting<'_>, timeout: Duration) -> Option<Arc<SagaState>> {
        let id = waiting.id.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rx = waiting.rx.as_mut()?;
            tokio::select! {
                r = rx => return r.ok(),
                () = tokio::time::sleep_until(deadline) => return None,
                () = tokio::time::sleep(WAIT_POLL) => {
                    if let Ok(Some(row)) = self.engine.store().get_saga(&id).await
                        && row.status.is_terminal()
                        && row.lease_owner.is_none()
                    {
                        return None;
                    }
                }
            }
        }
    }

    /// How many local waiters there are, for tests that check none is left behind.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.lock_waiters().values().map(Vec::len).sum()
    }

    /// Waits up to `timeout` for a saga that may already be running (here or on another node)
    /// to finish. Returns at once when it already has; the caller then reads its state.
    pub async fn wait_finished(&self, id: &SagaId, timeout: Duration) {
        // Registered before the read, so a finish between the two is heard; dropped (the request
        // gone mid-read, or the saga already over) it forgets itself.
        let waiting = self.watch(id);
        if let Ok(Some(row)) = self.engine.store().get_saga(id).await
            && row.status.is_terminal()
            && row.lease_owner.is_none()
        {
            return;
        }
        self.wait(waiting, timeout).await;
    }

    fn forget_waiter(&self, id: &SagaId) {
        let mut w = self.lock_waiters();
        if let Some(list) = w.get_mut(id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(id);
            }
        }
    }

    /// Stores a new version of a definition, or answers the latest when it is unchanged
    /// (`true`: a new version).
    ///
    /// # Errors
    /// A definition the engine refuses, or a store failure.
    pub async fn define(&self, name: &str, spec: DefinitionSpec) -> Result<(StoredDefinition, bool), SagaError> {
        self.engine.define(name, spec).await
    }

    /// A version of a definition, or its latest.
    ///
    /// # Errors
    /// [`SagaError::DefinitionNotFound`], or a store failure.
    pub async fn definition(&self, name: &str, version: Option<u32>) -> Result<StoredDefinition, SagaError> {
        self.engine
            .store()
            .get_definition(name, version)
            .await?
            .ok_or_else(|| SagaError::DefinitionNotFound(name.to_owned()))
    }

    /// Starts a saga (or finds the one with its id) and, with `wait`, waits up to that long for
    /// it to finish. Answers whether this call created it, and the saga: its row alone when
    /// nothing was awaited, with its log's state otherwise.
    ///
    /// # Errors
    /// What [`SagaEngine::start`] refuses, or a store failure.
    pub async fn start(
        self: &Arc<Self>,
        request: StartSaga,
        wait: Option<Duration>,
    ) -> Result<(bool, SagaView), SagaError> {
        let (row, held) = self.engine.start(request).await?;
        let created = held.is_some();
        let Some(wait) = wait else {
            if let Some(h) = held {
                self.spawn(h);
            }
            return Ok((created, SagaView { row, state: None }));
        };
        let Some(h) = held else {
            self.wait_finished(&row.id, wait).await;
            return Ok((created, self.view(&row.id, None).await?));
        };
        // Heard from the drive itself: the answer needs no read of what was just written.
        let finished = self.watch(&row.id);
        self.spawn(h);
        match self.wait(finished, wait).await {
            Some(state) => Ok((
                created,
                SagaView {
                    row,
                    state: Some(state),
                },
            )),
            None => Ok((created, self.view(&row.id, None).await?)),
        }
    }

    /// A saga with its log's state, after waiting up to `wait` for it to finish.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], or a store failure.
    pub async fn view(&self, id: &SagaId, wait: Option<Duration>) -> Result<SagaView, SagaError> {
        // An unknown saga is answered at once, with no waiter to leave behind; so is one whose
        // row retention removed, which finished long ago.
        if let Some(w) = wait
            && self.engine.store().get_saga(id).await?.is_some()
        {
            self.wait_finished(id, w).await;
        }
        let (row, state) = self.engine.load(id).await?;
        Ok(SagaView {
            row,
            state: state.map(Arc::new),
        })
    }

    /// Gives a failed saga's compensations a fresh budget and, with `wait`, waits for it.
    ///
    /// # Errors
    /// What [`SagaEngine::retry`] refuses (not failed, busy, unknown), or a store failure.
    pub async fn retry(self: &Arc<Self>, id: &SagaId, wait: Option<Duration>) -> Result<SagaView, SagaError> {
        let held = self.engine.retry(id).await?;
        let finished = wait.map(|_| self.watch(id));
        self.spawn(held);
        if let (Some(w), Some(waiting)) = (wait, finished) {
            self.wait(waiting, w).await;
        }
        self.view(id, None).await
    }

    /// Sends a signal to a saga and makes this node look at the saga at once (it is due now if
    /// it waits). Answers which signal of that name it was.
    ///
    /// # Errors
    /// What [`SagaEngine::signal`] refuses, or a store failure.
    pub async fn signal(&self, send: SendSignal<'_>) -> Result<u64, SagaError> {
        let sequence = self.engine.signal(send).await?;
        self.wake.notify_one();
        Ok(sequence)
    }

    /// Asks an operation of a saga and makes this node look at the saga at once.
    ///
    /// # Errors
    /// What [`SagaEngine::operate`] refuses, or a store failure.
    pub async fn operate(
        &self,
        id: &SagaId,
        op: concord_core::domain::saga::SagaOperation,
        by: Option<&str>,
        request_key: Option<&str>,
    ) -> Result<u64, SagaError> {
        let sequence = self.engine.operate(id, op, by, request_key).await?;
        self.wake.notify_one();
        Ok(sequence)
    }

    /// The claim of a completion URL's token.
    ///
    /// # Errors
    /// What [`SagaEngine::verify_callback`] refuses.
    pub fn verify_callback(
        &self,
        token: &str,
    ) -> Result<concord_core::domain::saga::callback::CallbackClaim, SagaError> {
        self.engine.verify_callback(token)
    }

    /// Records an asynchronous action's completion and makes this node look at the saga at once.
    ///
    /// # Errors
    /// What [`SagaEngine::complete`] refuses, or a store failure.
    pub async fn complete(
        &self,
        claim: concord_core::domain::saga::callback::CallbackClaim,
        completion: concord_core::domain::saga::callback::Completion,
    ) -> Result<(concord_core::domain::saga::callback::CallbackClaim, String), SagaError> {
        let done = self.engine.complete(claim, completion).await?;
        self.wake.notify_one();
        Ok(done)
    }

    /// Sagas in id order, after `after`, at most `limit`.
    ///
    /// # Errors
    /// A store failure.
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SagaRow>, SagaError> {
        Ok(self.engine.store().list_sagas(status, after, limit).await?)
    }

    /// Claims and drives due sagas until `stopping` turns true (see [`crate::worker::run`]).
    pub async fn run(self: Arc<Self>, stopping: watch::Receiver<bool>, grace: Duration) {
        let (slots, wake) = (self.slots.clone(), self.wake.clone());
        let config = crate::worker::WorkerConfig {
            poll: self.config.poll,
            max_concurrent: self.config.max_concurrent,
            claim_batch: self.config.claim_batch,
        };
        crate::worker::run(self, slots, wake, config, stopping, grace).await;
    }

    async fn publish_counts(&self) {
        match self.engine.store().count_sagas().await {
            Ok(counts) => {
                for status in SagaStatus::ALL {
                    let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| *n);
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!("concord_sagas", "status" => status.as_str()).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting sagas failed"),
        }
    }
}

#[async_trait::async_trait]
impl crate::worker::Claims for SagaRunner {
    type Item = Held;

    async fn claim(&self, n: usize) -> Result<Vec<Held>, String> {
        self.engine.claim(n).await.map_err(|e| e.to_string())
    }

    fn start(self: &Arc<Self>, item: Held, permit: OwnedSemaphorePermit) {
        self.spawn_with(item, permit);
    }

    async fn tick(&self) {
        self.publish_counts().await;
    }
}
