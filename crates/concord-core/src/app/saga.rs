//! Running sagas: define, start, drive step by step, recover, retry.
//!
//! The saga log (stream `saga-{id}` in the event store) is the truth; the saga row is a read model
//! of it plus a place in the work queue. A node works on a saga only while it holds the row's
//! lease, and every log append names the version it expects, so a node that lost its lease (paused,
//! partitioned) cannot record anything once another node has moved the saga on.

use crate::app::flow::{Blocked, HostGate, Pass};
use crate::app::log::{self, AppendError, LEASE_MARGIN, chrono_dur};
use crate::domain::flow::{BlockReason, HostSignal};
use crate::domain::outbound::OutboundPolicy;
use crate::domain::saga::ActionStatus;
use crate::domain::saga::callback::{CallbackClaim, CallbackError, CallbackKey, Completion};
use crate::domain::saga::definition::MissingValue;
use crate::domain::saga::definition::check_signal_name;
use crate::domain::saga::machine::LogError;
use crate::domain::saga::{
    CallOutcome, CallResult, Decision, DefinitionError, DefinitionSpec, FoundSignal, HttpCall, Op, SagaDefinition,
    SagaEvent, SagaId, SagaLimits, SagaOperation, SagaSecrets, SagaState, SagaStatus, TemplateContext, callback_stream,
    decide, log_stream, on_callback, on_outcome, on_signal, operation_event, operations_stream, round_order,
    signal_places, signal_stream,
};
use crate::domain::{AppendRequest, ExpectedVersion, Limits, StreamName, ValidationError};
use crate::ports::{EventStore, SagaRow, SagaStore, SagaUpdate, StoreError, StoredDefinition};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument as _;
use uuid::Uuid;

/// A participant call ready to send: templates filled, headers decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantCall {
    pub saga_id: SagaId,
    pub step: String,
    pub op: Op,
    pub attempt: u32,
    pub call: HttpCall,
    pub timeout: Duration,
    /// `{saga id}:{step}:{action|compensation}`, the same for every attempt.
    pub idempotency_key: String,
    /// The `traceparent` of the request that started the saga, if any.
    pub origin_trace: Option<String>,
    /// An action's completion URL (`Concord-Callback`): where the participant posts its result
    /// if it answers 202.
    pub callback: Option<String>,
}

/// What a participant call came to: its outcome for the saga, and what it told about the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub outcome: CallOutcome,
    pub host: HostSignal,
}

impl From<CallOutcome> for Answer {
    /// The host signal an outcome implies when nothing more is known: a transient failure counts
    /// against the host, anything else says it is up.
    fn from(outcome: CallOutcome) -> Self {
        let host = match outcome {
            CallOutcome::Transient(_) => HostSignal::Failing,
            _ => HostSignal::Healthy,
        };
        Self { outcome, host }
    }
}

/// Sends participant calls and classifies what came back.
#[async_trait]
pub trait Participants: Send + Sync + 'static {
    async fn call(&self, call: &ParticipantCall) -> Answer;
}

/// What can go wrong for a caller of the saga use cases.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SagaError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("saga definition {0} not found")]
    DefinitionNotFound(String),
    /// No saga has this id. The text is what was asked, which an id that does not parse names
    /// too (no saga has it either).
    #[error("saga {0} not found")]
    NotFound(String),
    /// Only `failed` sagas can be retried.
    #[error("saga {0} is {1}, not failed")]
    NotFailed(SagaId, &'static str),
    /// Another node holds the saga right now; try again shortly.
    #[error("saga {0} is being worked on; try again shortly")]
    Busy(SagaId),
    #[error("input is {size} bytes, over the limit of {limit}")]
    InputTooLarge { size: usize, limit: usize },
    #[error("{what} body is {size} bytes, over the limit of {limit} (saga_max_output_bytes)")]
    PayloadTooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// No step of the saga waits for the signal, or none does any more.
    #[error("{0}")]
    SignalNotExpected(String),
    /// Every wait step for the signal has one already.
    #[error("saga {id} already has the {taken} signal(s) {signal} its wait steps take")]
    SignalAlreadySent { id: SagaId, signal: String, taken: u64 },
    #[error(transparent)]
    CallbackInvalid(#[from] CallbackError),
    /// The attempt the token is for is over, or the saga is.
    #[error("{0}")]
    CallbackNotExpected(String),
    /// The attempt was completed already, with another result.
    #[error("step {step} attempt {attempt} of saga {id} was completed already")]
    CallbackAlreadyUsed { id: SagaId, step: String, attempt: u32 },
    /// The operation does not apply to the saga as it is (or will be, after the operations
    /// asked of it before).
    #[error("{operation} of saga {id} does not apply: {reason}")]
    OperationRefused {
        id: SagaId,
        operation: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A saga id that does not parse, given to start a saga: a name outside its alphabet.
impl From<crate::domain::InvalidSagaId> for SagaError {
    fn from(e: crate::domain::InvalidSagaId) -> Self {
        Self::Definition(e.into())
    }
}

impl From<AppendError> for SagaError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Invalid(v) => v.into(),
            AppendError::Store(s) => s.into(),
        }
    }
}

/// Settings of the engine, all configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// How long a claim or start holds a saga before another node may take it over.
    pub lease: Duration,
    pub limits: SagaLimits,
    pub event_limits: Limits,
    /// Where definitions may send calls (`saga_allowed_hosts`): checked when a definition is put
    /// and again at every call, so a stricter list also stops definitions stored before it.
    pub outbound: OutboundPolicy,
    /// How long a start trusts the latest version of a definition it looked up: a version put
    /// on another node is used by new sagas here within this time (one put here, at once).
    pub latest_definition_ttl: Duration,
    /// How often a drive looks for operations asked of its saga between calls (always before
    /// the saga is put away to wait, and at its first call after a claim).
    pub operations_poll: Duration,
    /// Participant credentials, named in definitions as `{{secrets.<name>}}`.
    pub secrets: SagaSecrets,
    /// Where asynchronous participants post their completions, and the key of the tokens in
    /// those URLs; none: actions carry no completion URL, and a 202 is a 2xx like any other.
    pub callbacks: Option<CallbackConfig>,
    /// Rows of finished sagas may have been removed (retention): a start with a caller's id
    /// looks for the saga's log before it counts as new, and a saga without a row is read from
    /// its log.
    pub retention: bool,
}

/// Completion URLs of asynchronous actions: `{base_url}/callbacks/{token}`.
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackConfig {
    pub key: CallbackKey,
    /// How participants reach this server (`public_url`); none: this node checks completion
    /// URLs but hands none out, leaving asynchronous actions to nodes that can.
    pub base_url: Option<String>,
}

/// The event that closes an attempt's completion stream when another result was recorded.
const COMPLETION_CLOSED: &str = "CompletionClosed";

/// How long after an accepted attempt's own deadline its completion URL still opens: a
/// completion that lands then is recorded if the saga has not timed the attempt out yet.
const CALLBACK_GRACE: chrono::Duration = chrono::Duration::minutes(1);

/// How a drive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveEnd {
    /// The saga reached this terminal status.
    Finished(SagaStatus),
    /// A retry is due later; the lease is released.
    Waiting,
    /// Released to wait, but a signal came meanwhile: the saga is due again at once.
    Woken,
    /// Another node moved the saga on (the lease was lost); nothing more here.
    Lost,
}

/// A saga a node holds and is about to drive.
pub struct Held {
    row: SagaRow,
    state: Option<SagaState>,
    trace: Option<String>,
    /// Events of `state` not yet in the log (a new saga's `SagaStarted`).
    pending: Vec<SagaEvent>,
}

impl Held {
    #[must_use]
    pub fn id(&self) -> &SagaId {
        &self.row.id
    }
}

/// The saga use cases over their ports.
pub struct SagaEngine {
    events: Arc<dyn EventStore>,
    store: Arc<dyn SagaStore>,
    participants: Arc<dyn Participants>,
    /// Flow control per participant host; none: every call goes out.
    gate: Option<Arc<HostGate>>,
    node: Uuid,
    config: EngineConfig,
    /// Validated definitions by (name, version); versions never change once stored.
    definitions: Mutex<HashMap<(String, u32), Arc<SagaDefinition>>>,
    /// The latest version of each name, and when it was looked up.
    latest: Mutex<HashMap<String, (Arc<SagaDefinition>, std::time::Instant)>>,
}

/// What `start` was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct StartSaga {
    pub definition: String,
    pub input: Value,
    /// The caller's id; none: a generated one.
    pub id: Option<SagaId>,
    pub trace: Option<String>,
}

impl SagaEngine {
    #[must_use]
    pub fn new(
        events: Arc<dyn EventStore>,
        store: Arc<dyn SagaStore>,
        participants: Arc<dyn Participants>,
        node: Uuid,
        config: EngineConfig,
    ) -> Self {
        Self {
            events,
            store,
            participants,
            gate: None,
            node,
            config,
            definitions: Mutex::new(HashMap::new()),
            latest: Mutex::new(HashMap::new()),
        }
    }

    /// Passes every participant call through `gate` first.
    #[must_use]
    pub fn with_gate(mut self, gate: Arc<HostGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The flow control of participant hosts, if any.
    #[must_use]
    pub fn gate(&self) -> Option<&Arc<HostGate>> {
        self.gate.as_ref()
    }

    /// This node's id, the owner of its leases.
    #[must_use]
    pub fn node(&self) -> Uuid {
        self.node
    }

    #[must_use]
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    /// Validates and stores a definition; an unchanged spec keeps its version.
    ///
    /// # Errors
    /// An invalid definition, or the store.
    pub async fn define(&self, name: &str, spec: DefinitionSpec) -> Result<(StoredDefinition, bool), SagaError> {
        let def = SagaDefinition::new(name, 0, spec.clone(), &self.config.limits)?;
        def.check_secrets(&self.config.secrets)?;
        for (step, url) in def.urls() {
            if let Err(refused) = self.config.outbound.check(url) {
                return Err(DefinitionError::Refused {
                    step: step.to_owned(),
                    url: url.to_owned(),
                    reason: refused.0,
                }
                .into());
            }
        }
        let json = serde_json::to_value(&spec).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let now = Utc::now();
        let (version, created) = self.store.put_definition(name, &json, now).await?;
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        let stored = self
            .store
            .get_definition(name, Some(version))
            .await?
            .ok_or_else(|| SagaError::DefinitionNotFound(name.to_owned()))?;
        Ok((stored, created))
    }

    /// A validated definition version (the latest when `version` is none).
    ///
    /// # Errors
    /// Unknown name or version, or a stored spec that no longer validates.
    pub async fn definition(&self, name: &str, version: Option<u32>) -> Result<Arc<SagaDefinition>, SagaError> {
        if let Some(v) = version
            && let Some(d) = self.cached(name, v)
        {
            return Ok(d);
        }
        if version.is_none()
            && let Some(d) = self.cached_latest(name)
        {
            return Ok(d);
        }
        let stored = self
            .store
            .get_definition(name, version)
            .await?
            .ok_or_else(|| SagaError::DefinitionNotFound(name.to_owned()))?;
        if let Some(d) = self.cached(name, stored.version) {
            if version.is_none() {
                self.latest
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.to_owned(), (d.clone(), std::time::Instant::now()));
            }
            return Ok(d);
        }
        let spec: DefinitionSpec = serde_json::from_value(stored.spec)
            .map_err(|e| StoreError::Unavailable(format!("stored definition {name} is unreadable: {e}")))?;
        // Checked against the limits when it was put; lowered limits must not strand its sagas.
        let def = Arc::new(SagaDefinition::new(name, stored.version, spec, &SagaLimits::STORED)?);
        self.definitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((name.to_owned(), stored.version), def.clone());
        if version.is_none() {
            self.latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_owned(), (def.clone(), std::time::Instant::now()));
        }
        Ok(def)
    }

    /// The latest version as looked up less than `latest_definition_ttl` ago.
    fn cached_latest(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        let latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest
            .get(name)
            .filter(|(_, at)| at.elapsed() < self.config.latest_definition_ttl)
            .map(|(d, _)| d.clone())
    }

    fn cached(&self, name: &str, version: u32) -> Option<Arc<SagaDefinition>> {
        self.definitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(name.to_owned(), version))
            .cloned()
    }

    /// Starts a saga, or finds the one with the caller's id. A new saga comes back held by this
    /// node, ready for [`Self::drive`]; an existing one comes back as it is.
    ///
    /// # Errors
    /// Unknown definition, oversized input, or the store.
    pub async fn start(&self, req: StartSaga) -> Result<(SagaRow, Option<Held>), SagaError> {
        let given = req.id.is_some();
        let id = req.id.unwrap_or_else(SagaId::generate);
        let size = serde_json::to_vec(&req.input).map_or(usize::MAX, |v| v.len());
        if size > self.config.limits.max_input_bytes {
            return Err(SagaError::InputTooLarge {
                size,
                limit: self.config.limits.max_input_bytes,
            });
        }
        if has_nul(&req.input) {
            return Err(ValidationError::NulCharacter(0).into());
        }
        let def = self.definition(&req.definition, None).await?;
        let now = Utc::now();
        let row = SagaRow {
            id: id.clone(),
            definition: def.name.clone(),
            version: def.version,
            input: req.input.clone(),
            status: SagaStatus::Running,
            next_run_at: Some(now),
            // A token per hold, not the node id: a second hold of the same saga on this node
            // (a queued drive whose lease ran out and was claimed again) is fenced out too.
            lease_owner: Some(Uuid::now_v7()),
            lease_until: Some(now + self.lease_for(&def)),
            log_version: 0,
            created_at: now,
            updated_at: now,
        };
        let (row, created) = self.store.create_saga(&row).await?;
        if !created {
            return Ok((row, None));
        }
        // The saga may have run and finished before, its row since removed by retention: it is
        // that saga, put back from its log, not a new one.
        if given
            && self.config.retention
            && let Some((mut old, state)) = self.row_from_log(&id).await?
        {
            let done = state.status.is_terminal();
            let now = Utc::now();
            let restored = self
                .store
                .update_saga(&SagaUpdate {
                    id: &id,
                    holder: row.lease_owner,
                    status: state.status,
                    next_run_at: (!done).then_some(now),
                    lease: None,
                    log_version: state.log_version,
                    now,
                })
                .await?;
            if !restored {
                return Err(SagaError::Store(StoreError::Unavailable(format!(
                    "saga {id} was put back from its log by another node meanwhile; ask again"
                ))));
            }
            old.next_run_at = (!done).then_some(now);
            return Ok((old, None));
        }
        metrics::counter!("concord_sagas_started_total").increment(1);
        // The row is durable, so the saga will run; its log starts with the first record the
        // drive makes. A node that dies before then leaves a row without a log, and whoever
        // claims it writes `SagaStarted` from the row.
        let started = SagaEvent::SagaStarted {
            definition: def.name.clone(),
            version: def.version,
            input: req.input.clone(),
            at: now,
        };
        let state = SagaState::new(&id, &def, req.input, now);
        Ok((
            row.clone(),
            Some(Held {
                row,
                state: Some(state),
                trace: req.trace,
                pending: vec![started],
            }),
        ))
    }

    /// A lease long enough for the definition's longest step, so a fresh saga's calls need no
    /// renewal, and never shorter than the configured lease.
    fn lease_for(&self, def: &SagaDefinition) -> chrono::Duration {
        let longest = def.steps.iter().map(|s| s.timeout).max().unwrap_or_default();
        chrono_dur(self.config.lease.max(longest + LEASE_MARGIN))
    }

    /// Takes up to `limit` due sagas (new, retry due, or abandoned by a dead node).
    ///
    /// # Errors
    /// The store.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Held>, SagaError> {
        let now = Utc::now();
        let rows = self
            .store
            .claim_sagas(Uuid::now_v7(), now, now + chrono_dur(self.config.lease), limit)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Held {
                row,
                state: None,
                trace: None,
                pending: Vec::new(),
            })
            .collect())
    }

    /// The saga's row and its state folded from its log.
    ///
    /// # Errors
    /// Unknown saga, a log that does not fit its definition, or the store.
    pub async fn load(&self, id: &SagaId) -> Result<(SagaRow, Option<SagaState>), SagaError> {
        let Some(row) = self.store.get_saga(id).await? else {
            // Its row may have been removed by retention: its log still tells it.
            if self.config.retention
                && let Some((row, state)) = self.row_from_log(id).await?
            {
                return Ok((row, Some(state)));
            }
            return Err(SagaError::NotFound(id.to_string()));
        };
        let (state, _) = self.read_log(&row).await?;
        Ok((row, state))
    }

    /// A saga read from its log alone, with the row its log implies (held by nobody, due never
    /// when it is finished); none when it has no log.
    async fn row_from_log(&self, id: &SagaId) -> Result<Option<(SagaRow, SagaState)>, SagaError> {
        let first = match self
            .events
            .read_stream(&stream_name(id)?, 1, 1, 2 * self.config.event_limits.max_event_bytes)
            .await
        {
            Ok(events) => events,
            Err(StoreError::StreamNotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(first) = first.into_iter().next() else {
            return Ok(None);
        };
        let SagaEvent::SagaStarted {
            definition,
            version,
            input,
            at,
        } = serde_json::from_value::<SagaEvent>(first.data)
            .map_err(|e| LogError(format!("the first event of saga {id}: {e}")))?
        else {
            return Err(LogError(format!("the log of saga {id} does not start with SagaStarted")).into());
        };
        let mut row = SagaRow {
            id: id.clone(),
            definition,
            version,
            input,
            status: SagaStatus::Running,
            next_run_at: None,
            lease_owner: None,
            lease_until: None,
            log_version: 0,
            created_at: at,
            updated_at: at,
        };
        let (Some(state), _) = self.read_log(&row).await? else {
            return Ok(None);
        };
        row.status = state.status;
        row.log_version = state.log_version;
        row.updated_at = state.updated_at;
        Ok(Some((row, state)))
    }

    async fn read_log(&self, row: &SagaRow) -> Result<(Option<SagaState>, Option<String>), SagaError> {
        let def = self.definition(&row.definition, Some(row.version)).await?;
        let Some(recorded) = log::read_all(self.events.as_ref(), &stream_name(&row.id)?).await? else {
            return Ok((None, None));
        };
        let trace = recorded
            .first()
            .and_then(|e| e.metadata.get("traceparent"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let events = recorded
            .into_iter()
            .map(|e| {
                serde_json::from_value::<SagaEvent>(e.data)
                    .map_err(|err| LogError(format!("event {} of saga {}: {err}", e.version, row.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((Some(SagaState::from_log(&row.id, &def, &events)?), trace))
    }

    /// Resumes a `failed` saga: its compensations get a fresh budget. Returns it held by this node.
    ///
    /// # Errors
    /// Unknown saga, not failed, held by another node, or the store.
    pub async fn retry(&self, id: &SagaId) -> Result<Held, SagaError> {
        let row = self
            .store
            .get_saga(id)
            .await?
            .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
        if row.status != SagaStatus::Failed {
            return Err(SagaError::NotFailed(id.clone(), row.status.as_str()));
        }
        let now = Utc::now();
        let token = Uuid::now_v7();
        // Take the row first: while this node holds it nobody else records anything, and if this
        // node dies the lease expires and a runner finishes the retry from the log.
        let took = self
            .store
            .update_saga(&SagaUpdate {
                id,
                holder: None,
                status: SagaStatus::Failed,
                next_run_at: Some(now),
                lease: Some((token, now + chrono_dur(self.config.lease))),
                log_version: row.log_version,
                now,
            })
            .await?;
        if !took {
            return Err(SagaError::Busy(id.clone()));
        }
        let mut row = row;
        row.lease_owner = Some(token);
        row.lease_until = Some(now + chrono_dur(self.config.lease));
        let (state, trace) = self.read_log(&row).await?;
        let mut state = state.ok_or_else(|| LogError(format!("saga {id} has no log")))?;
        let def = self.definition(&row.definition, Some(row.version)).await?;
        if state.status != SagaStatus::Failed {
            // The row lagged its log; let the runner catch up from the log.
            return Ok(Held {
                row,
                state: Some(state),
                trace,
                pending: Vec::new(),
            });
        }
        // Operations asked while it failed are refused first: a pause asked of the saga that
        // then failed does not stop the retry that came after it.
        let mut events = Vec::new();
        for (sequence, op, by, _) in self.operations_after(id, state.operations).await? {
            let e = SagaEvent::OperationRefused {
                sequence,
                operation: op,
                reason: "the saga had failed; a retry came after it".into(),
                by,
                at: now,
            };
            state.apply(&def, &e)?;
            events.push(e);
        }
        let retried = SagaEvent::SagaRetried { at: now };
        state.apply(&def, &retried)?;
        events.push(retried);
        self.append(id, state.log_version - events.len() as u64, &events, None)
            .await?;
        metrics::counter!("concord_saga_operator_retries_total").increment(1);
        Ok(Held {
            row,
            state: Some(state),
            trace,
            pending: Vec::new(),
        })
    }

    /// Runs a held saga until it ends, waits for a retry, or is lost to another node. Any store
    /// failure stops the drive; the lease then expires and a runner continues from the log.
    ///
    /// # Errors
    /// The store, or a log that does not fit the definition.
    pub async fn drive(&self, held: Held) -> Result<DriveEnd, SagaError> {
        self.drive_with(held, |_| {}).await
    }

    /// [`Self::drive`], calling `on_finished` as soon as the log records the saga's end, before
    /// the row catches up: a waiting caller hears the outcome one commit sooner.
    ///
    /// # Errors
    /// As [`Self::drive`].
    pub async fn drive_with(
        &self,
        held: Held,
        on_finished: impl FnOnce(&SagaState) + Send,
    ) -> Result<DriveEnd, SagaError> {
        let span = tracing::info_span!("saga", saga.id = %held.row.id, saga.definition = %held.row.definition);
        self.drive_inner(held, on_finished).instrument(span).await
    }

    async fn drive_inner(
        &self,
        held: Held,
        on_finished: impl FnOnce(&SagaState) + Send,
    ) -> Result<DriveEnd, SagaError> {
        let Held {
            mut row,
            state,
            mut trace,
            pending,
        } = held;
        let def = self.definition(&row.definition, Some(row.version)).await?;
        let mut resumed = state.is_none();
        let mut state = match state {
            Some(s) => s,
            None => {
                let (s, t) = self.read_log(&row).await?;
                trace = t;
                match s {
                    Some(s) => s,
                    // The node that created the row died before writing the log's first event.
                    None => {
                        let started = SagaEvent::SagaStarted {
                            definition: row.definition.clone(),
                            version: row.version,
                            input: row.input.clone(),
                            at: row.created_at,
                        };
                        self.append(&row.id, 0, std::slice::from_ref(&started), None).await?;
                        // That first record fences the previous holder already.
                        resumed = false;
                        SagaState::new(&row.id, &def, row.input.clone(), row.created_at)
                    }
                }
            }
        };
        let mut pending = pending;
        let mut recorded = state.log_version - pending.len() as u64;
        // A claimed saga's first record comes before any call or other record: if the node that
        // held it before is only slow, not dead, its next record then fails on the log's version.
        // A claim that finds nothing to do yet (a wait woken before its signal, a timer not due)
        // records nothing.
        let mut fence = resumed && !state.status.is_terminal();
        let mut on_finished = Some(on_finished);
        // A saga this node has just started has had no time for an operator to ask anything of
        // it: its first look waits for the poll interval. One claimed looks at once.
        let mut last_look = (!resumed && state.log_version <= 1).then(std::time::Instant::now);
        loop {
            let now = Utc::now();
            let decision = match decide(&def, &state, now) {
                Decision::Await { step, signal, sequence } => {
                    let found = self.find_signal(&row.id, &signal, sequence).await?;
                    on_signal(&def, &state, step, found, now)
                }
                Decision::AwaitCallback { step, attempt } => {
                    let found = self.find_completion(&row.id, step, attempt).await?;
                    let random = rand::random::<f64>();
                    match on_callback(&def, &state, step, found, now, random) {
                        // Its time ran out: close the URL first, and take a completion that
                        // got in before the close.
                        Decision::Record(SagaEvent::ActionFailed { .. }) => {
                            let late = self.close_completion(&row.id, step, attempt).await?;
                            on_callback(&def, &state, step, late, now, random)
                        }
                        d => d,
                    }
                }
                d => d,
            };
            // Before the saga is put away, and before an attempt starts (at most every
            // `operations_poll` while it runs on): what operators asked of it.
            let operations_due = match decision {
                Decision::Wait(_) | Decision::Park => true,
                Decision::Call { .. } | Decision::CallAll(_) => {
                    last_look.is_none_or(|t: std::time::Instant| t.elapsed() >= self.config.operations_poll)
                }
                _ => false,
            };
            if operations_due {
                last_look = Some(std::time::Instant::now());
            }
            if operations_due && self.operations_waiting(&row.id, &state).await? {
                if fence {
                    let e = SagaEvent::SagaResumed { at: now };
                    state.apply(&def, &e)?;
                    pending.push(e);
                    fence = false;
                }
                self.take_operations(&row.id, &def, &mut state, &mut pending).await?;
                continue;
            }
            // The participant's host lets the calls through, or the saga waits without
            // spending an attempt or recording anything (a claimed saga's fence included).
            let mut decision = decision;
            let mut passes: Vec<Option<Pass>> = Vec::new();
            match &decision {
                Decision::Call { step, op, .. } => match self.admit(&def, &state, *step, *op).await {
                    Ok(p) => passes.push(p),
                    Err(b) => {
                        return self
                            .hold_back(&mut row, &mut recorded, &mut pending, &state, trace.as_deref(), b)
                            .await;
                    }
                },
                Decision::CallAll(calls) => {
                    let mut through = Vec::new();
                    let mut first: Option<Blocked> = None;
                    for &(step, op, attempt) in calls {
                        match self.admit(&def, &state, step, op).await {
                            Ok(p) => {
                                through.push((step, op, attempt));
                                passes.push(p);
                            }
                            Err(b) => {
                                if first.as_ref().is_none_or(|f| b.until < f.until) {
                                    first = Some(b);
                                }
                            }
                        }
                    }
                    if let (true, Some(b)) = (through.is_empty(), first) {
                        return self
                            .hold_back(&mut row, &mut recorded, &mut pending, &state, trace.as_deref(), b)
                            .await;
                    }
                    // The calls held back come round again once these are recorded.
                    decision = Decision::CallAll(through);
                }
                _ => {}
            }
            if fence
                && matches!(
                    decision,
                    Decision::Record(_) | Decision::Call { .. } | Decision::CallAll(_)
                )
            {
                let e = SagaEvent::SagaResumed { at: now };
                state.apply(&def, &e)?;
                pending.push(e);
                fence = false;
            }
            match decision {
                Decision::Await { .. } | Decision::AwaitCallback { .. } => {
                    unreachable!("on_signal and on_callback answer what to do")
                }
                Decision::Record(e) => {
                    state.apply(&def, &e)?;
                    pending.push(e);
                }
                Decision::Done => {
                    if !self
                        .flush(&row, &mut recorded, &mut pending, &state, trace.as_deref())
                        .await?
                    {
                        return Ok(DriveEnd::Lost);
                    }
                    metrics::counter!("concord_sagas_finished_total", "status" => state.status.as_str()).increment(1);
                    tracing::info!(status = state.status.as_str(), "saga finished");
                    // A failed saga waits for an operator's retry, which needs its row to say
                    // so: release first. Otherwise the waiting caller hears first.
                    if state.status != SagaStatus::Failed
                        && let Some(f) = on_finished.take()
                    {
                        f(&state);
                    }
                    if !self.release(&mut row, &state, None).await? {
                        return Ok(DriveEnd::Lost);
                    }
                    if let Some(f) = on_finished.take() {
                        f(&state);
                    }
                    return Ok(DriveEnd::Finished(state.status));
                }
                Decision::Park => {
                    if !self
                        .flush(&row, &mut recorded, &mut pending, &state, trace.as_deref())
                        .await?
                    {
                        return Ok(DriveEnd::Lost);
                    }
                    // Woken by an operation (a resume, a cancel); and looked at again after
                    // PARKED_LOOK whatever happens, so a wake that failed delays it, never strands it.
                    let again = Utc::now() + chrono_dur(PARKED_LOOK);
                    if !self.release(&mut row, &state, Some(again)).await? {
                        return Ok(DriveEnd::Lost);
                    }
                    tracing::info!("saga paused");
                    // One asked for while this node held it woke a row the release put away.
                    if !matches!(self.operations_waiting(&row.id, &state).await, Ok(false)) {
                        self.store.wake_saga(&row.id, Utc::now()).await?;
                        return Ok(DriveEnd::Woken);
                    }
                    return Ok(DriveEnd::Waiting);
                }
                Decision::Wait(until) => {
                    if !self
                        .flush(&row, &mut recorded, &mut pending, &state, trace.as_deref())
                        .await?
                    {
                        return Ok(DriveEnd::Lost);
                    }
                    if !self.release(&mut row, &state, Some(until)).await? {
                        return Ok(DriveEnd::Lost);
                    }
                    // A signal sent while this node held the saga woke a row that the release
                    // then put back to sleep: look once more, now that the row is free, and wake
                    // it again if the signal is there (a signal sent from now on wakes it itself).
                    // When the look fails, wake it anyway: a wasted claim costs less than a
                    // signal left waiting until the timeout.
                    let arrived = match decide(&def, &state, Utc::now()) {
                        Decision::Await { signal, sequence, .. } => {
                            !matches!(self.find_signal(&row.id, &signal, sequence).await, Ok(None))
                        }
                        Decision::AwaitCallback { step, attempt } => {
                            !matches!(self.find_completion(&row.id, step, attempt).await, Ok(None))
                        }
                        _ => false,
                    } || !matches!(self.operations_waiting(&row.id, &state).await, Ok(false));
                    if arrived {
                        self.store.wake_saga(&row.id, Utc::now()).await?;
                        return Ok(DriveEnd::Woken);
                    }
                    return Ok(DriveEnd::Waiting);
                }
                Decision::CallAll(calls) => {
                    // As for one call: progress is recorded, and the log proved ours, first.
                    let longest = calls
                        .iter()
                        .map(|(s, _, _)| def.steps[*s].timeout)
                        .max()
                        .unwrap_or_default();
                    let passes = match self
                        .ready_to_call(
                            &mut row,
                            &mut recorded,
                            &mut pending,
                            &state,
                            trace.as_deref(),
                            longest,
                            passes,
                        )
                        .await?
                    {
                        Ok(passes) => passes,
                        Err(end) => return Ok(end),
                    };
                    let started_at = Utc::now();
                    let outcomes =
                        futures::future::join_all(calls.iter().zip(passes).map(|(&(step, op, attempt), pass)| {
                            self.call(
                                &def,
                                &state,
                                step,
                                op,
                                attempt,
                                def.steps[step].timeout,
                                trace.as_deref(),
                                pass,
                            )
                        }))
                        .await;
                    let finished = Utc::now();
                    let mut round: Vec<SagaEvent> = calls
                        .into_iter()
                        .zip(outcomes)
                        .map(|((step, op, attempt), outcome)| {
                            observe_call(op, &outcome, started_at, finished);
                            let result = CallResult {
                                step,
                                op,
                                attempt,
                                started_at,
                                outcome,
                            };
                            on_outcome(&def, &state, result, finished, rand::random::<f64>())
                        })
                        .collect();
                    round.sort_by_key(round_order);
                    for e in round {
                        if let SagaEvent::ActionFailed { retry_at: Some(_), .. }
                        | SagaEvent::CompensationFailed { retry_at: Some(_), .. } = &e
                        {
                            metrics::counter!("concord_saga_retries_total", "op" => e_op(&e)).increment(1);
                        }
                        state.apply(&def, &e)?;
                        pending.push(e);
                    }
                }
                Decision::Call { step, op, attempt } => {
                    // Record progress before the next side effect: this also proves the log is
                    // still ours, so no call goes out for a saga another node has moved on. A new
                    // saga's first record waits for its first call's result instead.
                    let timeout = def.steps[step].timeout;
                    let pass = match self
                        .ready_to_call(
                            &mut row,
                            &mut recorded,
                            &mut pending,
                            &state,
                            trace.as_deref(),
                            timeout,
                            passes,
                        )
                        .await?
                    {
                        Ok(mut passes) => passes.pop().flatten(),
                        Err(end) => return Ok(end),
                    };
                    let started_at = Utc::now();
                    let outcome = self
                        .call(&def, &state, step, op, attempt, timeout, trace.as_deref(), pass)
                        .await;
                    let finished = Utc::now();
                    observe_call(op, &outcome, started_at, finished);
                    let result = CallResult {
                        step,
                        op,
                        attempt,
                        started_at,
                        outcome,
                    };
                    let e = on_outcome(&def, &state, result, finished, rand::random::<f64>());
                    if let SagaEvent::ActionFailed { retry_at: Some(_), .. }
                    | SagaEvent::CompensationFailed { retry_at: Some(_), .. } = &e
                    {
                        metrics::counter!("concord_saga_retries_total", "op" => op.as_str()).increment(1);
                    }
                    state.apply(&def, &e)?;
                    pending.push(e);
                }
            }
        }
    }

    /// Before calls go out: the saga's progress recorded (which also proves the log is still
    /// this node's; a new saga's first record waits for its first call's result instead), its
    /// lease long enough for `timeout`, and the gate asked once more of its copy. Answers the
    /// passes to call with, or how the drive ends (lost, or held back); passes of calls not made
    /// are given back.
    #[allow(clippy::too_many_arguments)]
    async fn ready_to_call(
        &self,
        row: &mut SagaRow,
        recorded: &mut u64,
        pending: &mut Vec<SagaEvent>,
        state: &SagaState,
        trace: Option<&str>,
        timeout: Duration,
        passes: Vec<Option<Pass>>,
    ) -> Result<Result<Vec<Option<Pass>>, DriveEnd>, SagaError> {
        let first = *recorded == 0 && pending.len() == 1;
        let kept = if first {
            Ok(true)
        } else {
            self.flush(row, recorded, pending, state, trace).await
        };
        let kept = match kept {
            Ok(true) => self.keep_lease(row, state, timeout).await,
            other => other,
        };
        match kept {
            Ok(true) => {}
            Ok(false) => {
                self.unused(passes).await;
                return Ok(Err(DriveEnd::Lost));
            }
            Err(e) => {
                self.unused(passes).await;
                return Err(e);
            }
        }
        let held = self.gate.as_ref().and_then(|gate| {
            passes
                .iter()
                .flatten()
                .filter_map(|p| gate.recheck(p))
                .min_by_key(|b| b.until)
        });
        if let Some(b) = held {
            self.unused(passes).await;
            return self.hold_back(row, recorded, pending, state, trace, b).await.map(Err);
        }
        Ok(Ok(passes))
    }

    /// Asks the gate whether a step's call may go out now. None: no gate, or nothing it counts
    /// (a call that cannot be rendered fails on its own, never reaching a host).
    async fn admit(
        &self,
        def: &SagaDefinition,
        state: &SagaState,
        step: usize,
        op: Op,
    ) -> Result<Option<Pass>, Blocked> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let s = &def.steps[step];
        let template = match op {
            Op::Action => s.action.as_ref(),
            Op::Compensation => s.compensation.as_ref(),
        };
        let Some(template) = template else {
            return Ok(None);
        };
        let outputs = state.outputs();
        let ctx = TemplateContext {
            saga_id: &state.id,
            input: &state.input,
            outputs: &outputs,
            secrets: &self.config.secrets,
        };
        // Only the URL: the headers (and their secrets) are rendered once, for the call itself.
        let Ok(url) = ctx.render_str(&template.url, true) else {
            return Ok(None);
        };
        let Some((host, port)) = url::Url::parse(&url)
            .ok()
            .and_then(|u| Some((u.host_str()?.to_owned(), u.port_or_known_default()?)))
        else {
            return Ok(None);
        };
        gate.admit(&host, port, s.timeout).await.map(Some)
    }

    /// Gives back the places of calls let through but never made (the drive stopped first).
    async fn unused(&self, passes: Vec<Option<Pass>>) {
        if let Some(gate) = &self.gate {
            for p in passes.into_iter().flatten() {
                gate.report(p, HostSignal::NotSent).await;
            }
        }
    }

    /// Puts a saga away whose call the gate held back: due again when the gate says, or, for a
    /// host that is down, when its probe may go out or as soon as it comes back, whichever is
    /// first. Nothing is recorded in its log and no attempt is spent.
    async fn hold_back(
        &self,
        row: &mut SagaRow,
        recorded: &mut u64,
        pending: &mut Vec<SagaEvent>,
        state: &SagaState,
        trace: Option<&str>,
        blocked: Blocked,
    ) -> Result<DriveEnd, SagaError> {
        if !self.flush(row, recorded, pending, state, trace).await? {
            return Ok(DriveEnd::Lost);
        }
        let Some(gate) = &self.gate else {
            // Never reached (only a gate holds calls back); the saga is due again at once.
            return Ok(if self.release(row, state, Some(Utc::now())).await? {
                DriveEnd::Waiting
            } else {
                DriveEnd::Lost
            });
        };
        let now = Utc::now();
        let recovery = blocked.reason.waits_for_recovery();
        let until = match blocked.reason {
            // Places free up as calls report; a short wait, spread so the sagas do not come back
            // together.
            BlockReason::Concurrency => {
                let wait = gate.settings().slot_wait;
                blocked.until.min(now + chrono_dur(wait)) + chrono_dur(wait.mul_f64(rand::random::<f64>() / 2.0))
            }
            // Spread over a second, so one probe goes out first instead of every saga at once.
            _ if recovery => blocked.until + chrono::Duration::milliseconds(rand::random_range(0..1000)),
            // Spread over half a second: the participant asked for less, not for a burst later.
            BlockReason::RetryAfter => blocked.until + chrono::Duration::milliseconds(rand::random_range(0..500)),
            // Each one held back by a rate has a moment of its own.
            _ => blocked.until,
        }
        .max(now);
        if recovery {
            gate.park(&blocked.key, &row.id).await?;
        }
        if !self.release(row, state, Some(until)).await? {
            return Ok(DriveEnd::Lost);
        }
        metrics::counter!("concord_saga_calls_held_total", "reason" => blocked.reason.as_str()).increment(1);
        tracing::debug!(host = %blocked.key, reason = blocked.reason.as_str(), %until, "saga call held back");
        // The host came back, or an operator asked something, while this node put the saga away:
        // the wake that meant to reach it found it still held.
        let back = recovery && matches!(gate.still_down(&blocked.key).await, Ok(false));
        if back || !matches!(self.operations_waiting(&row.id, state).await, Ok(false)) {
            self.store.wake_saga(&row.id, Utc::now()).await?;
            return Ok(DriveEnd::Woken);
        }
        Ok(DriveEnd::Waiting)
    }

    /// Makes a call the gate let through (`pass`), and tells the gate what it said of its host.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        def: &SagaDefinition,
        state: &SagaState,
        step: usize,
        op: Op,
        attempt: u32,
        timeout: Duration,
        trace: Option<&str>,
        pass: Option<Pass>,
    ) -> CallOutcome {
        let (outcome, signal) = self.call_inner(def, state, step, op, attempt, timeout, trace).await;
        if let (Some(gate), Some(pass)) = (&self.gate, pass) {
            gate.report(pass, signal).await;
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_inner(
        &self,
        def: &SagaDefinition,
        state: &SagaState,
        step: usize,
        op: Op,
        attempt: u32,
        timeout: Duration,
        trace: Option<&str>,
    ) -> (CallOutcome, HostSignal) {
        let not_sent = |o: CallOutcome| (o, HostSignal::NotSent);
        let s = &def.steps[step];
        let template = match op {
            Op::Action => match &s.action {
                Some(a) => a,
                None => return not_sent(CallOutcome::Refused("a timer step makes no call".into())),
            },
            Op::Compensation => match &s.compensation {
                Some(c) => c,
                None => return not_sent(CallOutcome::Succeeded(Value::Null)),
            },
        };
        let outputs = state.outputs();
        let ctx = TemplateContext {
            saga_id: &state.id,
            input: &state.input,
            outputs: &outputs,
            secrets: &self.config.secrets,
        };
        let call = match ctx.render_call(template) {
            Ok(c) => c,
            // This node lacks a secret another node put the definition with: one that has it
            // (or this one, reconfigured) can still make the call.
            Err(e @ MissingValue::Secret(_)) => return not_sent(CallOutcome::Transient(e.to_string())),
            // The data a call needs is not there: no retry will bring it.
            Err(e) => return not_sent(CallOutcome::Refused(e.to_string())),
        };
        // Checked again here: the list may have changed since the definition was put.
        if let Err(refused) = self.config.outbound.check(&call.url) {
            return not_sent(CallOutcome::Refused(format!("the call is not allowed: {refused}")));
        }
        if let Err(why) = self.config.secrets.check_call(template, &call) {
            return not_sent(CallOutcome::Refused(format!("the call is not allowed: {why}")));
        }
        // An asynchronous action's call carries the URL its participant completes it at.
        let callback = match (op, s.callback_timeout, &self.config.callbacks) {
            (Op::Action, Some(wait), Some(cb)) if let Some(base_url) = &cb.base_url => {
                let expires = chrono::Duration::from_std(timeout + wait)
                    .ok()
                    .and_then(|d| Utc::now().checked_add_signed(d + CALLBACK_GRACE))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let token = cb.key.mint(&CallbackClaim {
                    saga_id: state.id.clone(),
                    step,
                    attempt,
                    expires,
                });
                Some(format!("{}/callbacks/{token}", base_url.trim_end_matches('/')))
            }
            // This node cannot hand out a completion URL (no public_url): one that can may.
            (Op::Action, Some(_), _) => {
                return not_sent(CallOutcome::Transient(
                    "this node has no public_url to give an asynchronous action its completion URL".into(),
                ));
            }
            _ => None,
        };
        let pc = ParticipantCall {
            saga_id: state.id.clone(),
            step: s.name.clone(),
            op,
            attempt,
            call,
            timeout,
            idempotency_key: format!("{}:{}:{}", state.id, s.name, op.as_str()),
            origin_trace: trace.map(str::to_owned),
            callback,
        };
        let span = tracing::info_span!("saga.step", step = %s.name, op = op.as_str(), attempt);
        let answer = self.participants.call(&pc).instrument(span).await;
        let signal = answer.host;
        let outcome = self.keepable(answer.outcome);
        // The participant may have posted a completion while the call ran. The completion
        // stream decides once which result stands: the call's, by closing it, or a completion
        // kept before, which the participant was told is recorded.
        if pc.callback.is_some() && outcome != CallOutcome::Accepted {
            match self.close_completion(&state.id, step, attempt).await {
                Ok(Some(posted)) => return (posted, signal),
                Ok(None) => {}
                // Unknown which stands: the step is uncertain, never a second result.
                Err(e) => {
                    return (
                        CallOutcome::Unusable(format!("closing the completion URL failed: {e}")),
                        signal,
                    );
                }
            }
        }
        (outcome, signal)
    }

    /// Closes an attempt's completion URL before a result other than its completion is
    /// recorded (a synchronous answer, or its time running out): the completion stream's first
    /// event is either the completion or the close. Returns the completion when it came first.
    async fn close_completion(&self, id: &SagaId, step: usize, attempt: u32) -> Result<Option<CallOutcome>, SagaError> {
        let stream = StreamName::parse(&callback_stream(id, step, attempt))?;
        let event = crate::domain::event::UncheckedEvent {
            id: None,
            event_type: COMPLETION_CLOSED.to_owned(),
            data: Value::Null,
            metadata: None,
        };
        let request = AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![event],
            &self.config.event_limits,
        )?;
        match self.events.append(request).await {
            Ok(_) => Ok(None),
            Err(StoreError::WrongExpectedVersion { .. }) => self.find_completion(id, step, attempt).await,
            Err(e) => Err(e.into()),
        }
    }

    /// What of a participant's answer can go into the log: secrets it echoes redacted, an
    /// output over the limit or holding U+0000 unusable.
    fn keepable(&self, outcome: CallOutcome) -> CallOutcome {
        // Kept in the log and shown to readers: a participant that echoes a secret it was sent
        // must not put it there.
        let secrets = &self.config.secrets;
        let outcome = match outcome {
            CallOutcome::Succeeded(v) => CallOutcome::Succeeded(secrets.redact_json(v)),
            CallOutcome::Refused(e) => CallOutcome::Refused(secrets.redact(&e)),
            CallOutcome::Transient(e) => CallOutcome::Transient(secrets.redact(&e)),
            CallOutcome::Unusable(e) => CallOutcome::Unusable(secrets.redact(&e)),
            CallOutcome::Accepted => CallOutcome::Accepted,
        };
        match outcome {
            CallOutcome::Succeeded(v) => {
                let size = serde_json::to_vec(&v).map_or(usize::MAX, |b| b.len());
                if size > self.config.limits.max_output_bytes {
                    CallOutcome::Unusable(format!(
                        "output of {size} bytes, over the limit of {}",
                        self.config.limits.max_output_bytes
                    ))
                } else if has_nul(&v) {
                    CallOutcome::Unusable("output contains U+0000, which cannot be stored".into())
                } else {
                    CallOutcome::Succeeded(v)
                }
            }
            // Error text goes into the log, which cannot store U+0000.
            CallOutcome::Refused(e) => CallOutcome::Refused(scrub(e)),
            CallOutcome::Transient(e) => CallOutcome::Transient(scrub(e)),
            CallOutcome::Unusable(e) => CallOutcome::Unusable(scrub(e)),
            CallOutcome::Accepted => CallOutcome::Accepted,
        }
    }

    /// The completion of an accepted attempt, if it has come, as the call's outcome.
    async fn find_completion(&self, id: &SagaId, step: usize, attempt: u32) -> Result<Option<CallOutcome>, SagaError> {
        let stream = StreamName::parse(&callback_stream(id, step, attempt))?;
        match self.events.read_stream(&stream, 1, 1, usize::MAX).await {
            Ok(page) => Ok(page
                .into_iter()
                .next()
                .filter(|e| e.event_type != COMPLETION_CLOSED)
                .map(|e| {
                    match serde_json::from_value::<Completion>(e.data) {
                        Ok(c) => self.keepable(c.into_outcome()),
                        // Checked when it was posted: a record that does not read is a bug, and
                        // the action's effect is unknown.
                        Err(err) => CallOutcome::Unusable(format!("the completion does not read: {err}")),
                    }
                })),
            Err(StoreError::StreamNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The claim of a completion URL's token: checked before anything of the request is read.
    ///
    /// # Errors
    /// [`SagaError::CallbackInvalid`] for a token this cluster did not issue or one past its time.
    pub fn verify_callback(&self, token: &str) -> Result<CallbackClaim, SagaError> {
        let key = &self.config.callbacks.as_ref().ok_or(CallbackError::Invalid)?.key;
        Ok(key.verify(token, Utc::now())?)
    }

    /// Records the completion an asynchronous participant posted with `token`, once, and wakes
    /// the saga. The same completion posted again answers as the first did.
    ///
    /// # Errors
    /// A token this server did not issue or that expired, an oversized output, an attempt that
    /// is over (the saga timed it out, or went on), one completed with another result, or the
    /// store.
    pub async fn complete(
        &self,
        claim: CallbackClaim,
        completion: Completion,
    ) -> Result<(CallbackClaim, String), SagaError> {
        // Kept as the log would keep it: a secret the participant echoes never reaches the
        // stream, whoever may read it.
        let secrets = &self.config.secrets;
        let completion = match completion {
            Completion::Succeeded { output } => Completion::Succeeded {
                output: secrets.redact_json(output),
            },
            Completion::Refused { error } => Completion::Refused {
                error: secrets.redact(&error),
            },
            Completion::Failed { error } => Completion::Failed {
                error: secrets.redact(&error),
            },
        };
        let data = serde_json::to_value(&completion).unwrap_or(Value::Null);
        self.check_storable("completion", &data)?;
        let id = &claim.saga_id;
        let row = self
            .store
            .get_saga(id)
            .await?
            .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
        let def = self.definition(&row.definition, Some(row.version)).await?;
        let step_name = def
            .steps
            .get(claim.step)
            .map(|s| s.name.clone())
            .ok_or(CallbackError::Invalid)?;
        let stream = StreamName::parse(&callback_stream(id, claim.step, claim.attempt))?;
        // Posted before: the same completion again (a retry after a lost answer) answers the
        // same; another is refused.
        let posted = |first: Vec<crate::domain::RecordedEvent>| {
            if first.first().is_some_and(|e| e.event_type == COMPLETION_CLOSED) {
                return Err(SagaError::CallbackNotExpected(format!(
                    "attempt {} of step {step_name} of saga {id} ended without this completion",
                    claim.attempt
                )));
            }
            if first.first().map(|e| &e.data) == Some(&data) {
                Ok((claim.clone(), step_name.clone()))
            } else {
                Err(SagaError::CallbackAlreadyUsed {
                    id: id.clone(),
                    step: step_name.clone(),
                    attempt: claim.attempt,
                })
            }
        };
        match self.events.read_stream(&stream, 1, 1, usize::MAX).await {
            Ok(first) => {
                let again = posted(first)?;
                self.wake(id).await;
                return Ok(again);
            }
            Err(StoreError::StreamNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let (Some(state), _) = self.read_log(&row).await?
            && let Some(s) = state.steps.get(claim.step)
        {
            let started = s.attempts.iter().filter(|a| a.op == Op::Action).count() as u64;
            let open = state.status == SagaStatus::Running
                && s.action == ActionStatus::Pending
                && match s.callback {
                    Some(cb) => cb.attempt == claim.attempt,
                    // Not accepted yet: the completion may come before the 202 is recorded.
                    None => started < u64::from(claim.attempt),
                };
            if !open {
                return Err(SagaError::CallbackNotExpected(format!(
                    "attempt {} of step {step_name} of saga {id} is over; the saga is {}",
                    claim.attempt,
                    state.status.as_str()
                )));
            }
        }
        let event = crate::domain::event::UncheckedEvent {
            id: None,
            event_type: "CompletionPosted".to_owned(),
            data: data.clone(),
            metadata: None,
        };
        let request = AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![event],
            &self.config.event_limits,
        )?;
        match self.events.append(request).await {
            Ok(_) => metrics::counter!("concord_saga_completions_total").increment(1),
            Err(StoreError::WrongExpectedVersion { .. }) => {
                posted(self.events.read_stream(&stream, 1, 1, usize::MAX).await?)?;
            }
            Err(e) => return Err(e.into()),
        }
        self.wake(id).await;
        Ok((claim, step_name))
    }

    /// Signal number `sequence` of name `signal` sent to saga `id`, if it has come.
    async fn find_signal(&self, id: &SagaId, signal: &str, sequence: u64) -> Result<Option<FoundSignal>, SagaError> {
        let stream = StreamName::parse(&signal_stream(id, signal))?;
        match self.events.read_stream(&stream, sequence, 1, usize::MAX).await {
            Ok(page) => Ok(page.into_iter().find(|e| e.version == sequence).map(|e| FoundSignal {
                by: e.metadata.get("key").and_then(Value::as_str).map(str::to_owned),
                payload: e.data,
            })),
            Err(StoreError::StreamNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends signal `name` with `payload` to saga `id` for the API key `by`: kept until the saga's
    /// wait step for it takes it (one signal per wait step for that name, in step order), and
    /// wakes the saga if it waits. Answers which signal of that name this was (1: the first).
    /// A send with the `request_key` (its `Idempotency-Key`) of one already kept answers that one
    /// again and wakes the saga again, so a retry after a failed answer never keeps two.
    ///
    /// # Errors
    /// Unknown saga, a bad name, an oversized payload, a signal no step of the saga waits for
    /// (any more), one more than its wait steps take, or the store.
    pub async fn signal(&self, send: SendSignal<'_>) -> Result<u64, SagaError> {
        let SendSignal {
            id,
            name,
            payload,
            by,
            request_key,
        } = send;
        check_signal_name(name)?;
        self.check_storable("signal", &payload)?;
        let row = self
            .store
            .get_saga(id)
            .await?
            .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
        let def = self.definition(&row.definition, Some(row.version)).await?;
        let slots = def.signal_slots(name);
        if slots == 0 {
            return Err(SagaError::SignalNotExpected(format!(
                "no step of saga {id} ({} v{}) waits for signal {name}",
                def.name, def.version
            )));
        }
        let stream = StreamName::parse(&signal_stream(id, name))?;
        // The same send, retried with its key, is known by its event id.
        let event_id = request_key.map(|k| signal_event_id(id, name, by, k));
        // Appended at the version read, so two concurrent senders never both take the last place.
        for _ in 0..SIGNAL_RACES {
            let sent = match self
                .events
                .read_stream(&stream, 1, usize::try_from(slots).unwrap_or(usize::MAX), usize::MAX)
                .await
            {
                Ok(page) => {
                    if let Some(again) = page.iter().find(|e| Some(e.id) == event_id) {
                        self.wake(id).await;
                        return Ok(again.version);
                    }
                    page.last().map_or(0, |e| e.version)
                }
                Err(StoreError::StreamNotFound(_)) => 0,
                Err(e) => return Err(e.into()),
            };
            // Read after the signals, so a step that took one is seen as having taken it.
            let capacity = self.signal_capacity(&row, &def, name, slots).await?;
            if sent >= capacity {
                return Err(SagaError::SignalAlreadySent {
                    id: id.clone(),
                    signal: name.to_owned(),
                    taken: sent,
                });
            }
            let event = crate::domain::event::UncheckedEvent {
                id: event_id,
                event_type: "SignalSent".to_owned(),
                data: payload.clone(),
                metadata: Some(serde_json::json!({"key": by})),
            };
            let expected = if sent == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(sent)
            };
            let request = AppendRequest::new(stream.clone(), expected, vec![event], &self.config.event_limits)?;
            match self.events.append(request).await {
                Ok(_) => {
                    metrics::counter!("concord_saga_signals_total").increment(1);
                    self.wake(id).await;
                    return Ok(sent + 1);
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(SagaError::Busy(id.clone()))
    }

    /// How many signals of `name` the saga can take: one per wait step for it that took one or
    /// still can (every one of them before its log begins).
    ///
    /// # Errors
    /// [`SagaError::SignalAlreadySent`] when every wait for the name took its signal,
    /// [`SagaError::SignalNotExpected`] when none can take one any more, or the store.
    async fn signal_capacity(
        &self,
        row: &SagaRow,
        def: &SagaDefinition,
        name: &str,
        slots: u64,
    ) -> Result<u64, SagaError> {
        let Some(state) = self.read_log(row).await?.0 else {
            return Ok(slots);
        };
        let (taken, open) = signal_places(def, &state, name);
        if open > 0 {
            return Ok(taken + open);
        }
        // Every wait for the name took its signal: this one is one too many, whether the saga
        // has finished since or not.
        if taken == slots {
            return Err(SagaError::SignalAlreadySent {
                id: row.id.clone(),
                signal: name.to_owned(),
                taken,
            });
        }
        Err(SagaError::SignalNotExpected(format!(
            "saga {} is {} and no step of it waits for signal {name} any more",
            row.id,
            state.status.as_str()
        )))
    }

    /// The operations asked of the saga that its log has not come to yet, from number `after`
    /// on (at most a page).
    async fn operations_after(
        &self,
        id: &SagaId,
        after: u64,
    ) -> Result<Vec<(u64, SagaOperation, Option<String>, Uuid)>, SagaError> {
        let stream = StreamName::parse(&operations_stream(id))?;
        let page = match self
            .events
            .read_stream(&stream, after + 1, OPERATIONS_PAGE, usize::MAX)
            .await
        {
            Ok(page) => page,
            Err(StoreError::StreamNotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        page.into_iter()
            .map(|e| {
                let op = e.data["operation"]
                    .as_str()
                    .and_then(SagaOperation::parse)
                    .ok_or_else(|| LogError(format!("operation {} of saga {id} does not read", e.version)))?;
                let by = e.metadata.get("key").and_then(Value::as_str).map(str::to_owned);
                Ok((e.version, op, by, e.id))
            })
            .collect()
    }

    async fn operations_waiting(&self, id: &SagaId, state: &SagaState) -> Result<bool, SagaError> {
        Ok(!self.operations_after(id, state.operations).await?.is_empty())
    }

    /// Records, in order, the operations asked of the saga since its log last came to one. A
    /// cancel of a saga whose asynchronous action waits for its completion first closes that
    /// attempt's completion URL and takes a completion that got in before.
    async fn take_operations(
        &self,
        id: &SagaId,
        def: &SagaDefinition,
        state: &mut SagaState,
        pending: &mut Vec<SagaEvent>,
    ) -> Result<(), SagaError> {
        for (sequence, op, by, _) in self.operations_after(id, state.operations).await? {
            let now = Utc::now();
            if op == SagaOperation::Cancel && op.refusal(state).is_none() {
                let waiting = state
                    .steps
                    .iter()
                    .enumerate()
                    .find_map(|(i, s)| s.callback.map(|c| (i, c.attempt)));
                if let Some((step, attempt)) = waiting
                    && let Some(found) = self.close_completion(id, step, attempt).await?
                    && let Decision::Record(e) = on_callback(def, state, step, Some(found), now, rand::random())
                {
                    state.apply(def, &e)?;
                    pending.push(e);
                }
            }
            let e = operation_event(op, sequence, by, state, now);
            let result = if matches!(e, SagaEvent::OperationRefused { .. }) {
                "refused"
            } else {
                "applied"
            };
            metrics::counter!("concord_saga_operations_total", "operation" => op.as_str(), "result" => result)
                .increment(1);
            tracing::info!(operation = op.as_str(), sequence, result, "saga operation");
            state.apply(def, &e)?;
            pending.push(e);
        }
        Ok(())
    }

    /// Asks operation `op` of saga `id` for the API key `by`: kept in the saga's operations
    /// stream, and the saga woken to record it in its log when it comes to it (before its next
    /// attempt starts; an attempt running now finishes). Refused at once when it does not apply
    /// to the saga as it will be after the operations asked before it. A retry with the same
    /// `request_key` (its `Idempotency-Key`) answers the first ask. Answers the operation's
    /// number.
    ///
    /// # Errors
    /// Unknown saga, an operation that does not apply, or the store.
    pub async fn operate(
        &self,
        id: &SagaId,
        op: SagaOperation,
        by: Option<&str>,
        request_key: Option<&str>,
    ) -> Result<u64, SagaError> {
        let row = self
            .store
            .get_saga(id)
            .await?
            .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
        let def = self.definition(&row.definition, Some(row.version)).await?;
        let stream = StreamName::parse(&operations_stream(id))?;
        let event_id = request_key.map(|k| signal_event_id(id, &format!(".{}", op.as_str()), by, k));
        // Asked before with this key (and perhaps recorded since): that answer again.
        if let Some(eid) = event_id {
            let mut after = 0;
            loop {
                let asked = self.operations_after(id, after).await?;
                if let Some(&(sequence, ..)) = asked.iter().find(|a| a.3 == eid) {
                    self.wake(id).await;
                    return Ok(sequence);
                }
                let Some(&(n, ..)) = asked.last() else { break };
                after = n;
            }
        }
        for _ in 0..SIGNAL_RACES {
            let mut state = match self.read_log(&row).await?.0 {
                Some(s) => s,
                None => SagaState::new(id, &def, row.input.clone(), row.created_at),
            };
            // As the saga will be once it has come to what was asked before.
            let mut last = state.operations;
            loop {
                let asked = self.operations_after(id, last).await?;
                let Some(&(n, ..)) = asked.last() else { break };
                for (sequence, earlier, earlier_by, _) in asked {
                    let e = operation_event(earlier, sequence, earlier_by, &state, Utc::now());
                    state.apply(&def, &e)?;
                }
                last = n;
            }
            if let Some(reason) = op.refusal(&state) {
                return Err(SagaError::OperationRefused {
                    id: id.clone(),
                    operation: op.as_str(),
                    reason,
                });
            }
            let event = crate::domain::event::UncheckedEvent {
                id: event_id,
                event_type: "OperationRequested".to_owned(),
                data: serde_json::json!({ "operation": op.as_str() }),
                metadata: Some(serde_json::json!({ "key": by })),
            };
            let expected = if last == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(last)
            };
            let request = AppendRequest::new(stream.clone(), expected, vec![event], &self.config.event_limits)?;
            match self.events.append(request).await {
                // A concurrent ask with the same key may have kept it first: its number, then.
                Ok(kept) => {
                    metrics::counter!("concord_saga_operations_asked_total", "operation" => op.as_str()).increment(1);
                    self.wake(id).await;
                    return Ok(kept.first_version);
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(SagaError::Busy(id.clone()))
    }

    /// A body that becomes a step's output (a signal's, a completion's) fits the output limit
    /// and holds nothing a store cannot keep.
    fn check_storable(&self, what: &'static str, v: &Value) -> Result<(), SagaError> {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        let limit = self.config.limits.max_output_bytes;
        if size > limit {
            return Err(SagaError::PayloadTooLarge { what, size, limit });
        }
        if has_nul(v) {
            return Err(ValidationError::NulCharacter(0).into());
        }
        Ok(())
    }

    /// Makes a saga due now. The signal or operation that asked for it is kept already, so a
    /// failure here only delays the saga (to its wait's timeout, or `PARKED_LOOK` for a paused
    /// one, at worst); it is logged, not answered.
    async fn wake(&self, id: &SagaId) {
        if let Err(e) = self.store.wake_saga(id, Utc::now()).await {
            metrics::counter!("concord_saga_wake_errors_total").increment(1);
            tracing::warn!(saga.id = %id, error = %e, "waking a saga for its signal failed");
        }
    }

    /// Appends the pending events at the version we expect. False when the log moved on.
    async fn flush(
        &self,
        row: &SagaRow,
        recorded: &mut u64,
        pending: &mut Vec<SagaEvent>,
        state: &SagaState,
        trace: Option<&str>,
    ) -> Result<bool, SagaError> {
        if pending.is_empty() {
            return Ok(true);
        }
        // The first event of a log carries the trace that started the saga, for recovery.
        let trace = trace.filter(|_| *recorded == 0);
        match self.append(&row.id, *recorded, pending, trace).await {
            Ok(()) => {
                pending.clear();
                *recorded = state.log_version;
                Ok(true)
            }
            Err(SagaError::Store(StoreError::WrongExpectedVersion { .. })) => {
                tracing::warn!("saga log moved on elsewhere; this node stops working on it");
                metrics::counter!("concord_saga_leases_lost_total").increment(1);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn append(
        &self,
        id: &SagaId,
        after: u64,
        events: &[SagaEvent],
        trace: Option<&str>,
    ) -> Result<(), SagaError> {
        let entries = events
            .iter()
            .map(|e| (e.type_name(), serde_json::to_value(e).unwrap_or(Value::Null)))
            .collect();
        let limits = &self.config.event_limits;
        log::append(
            self.events.as_ref(),
            stream_name(id)?,
            after,
            entries,
            self.node,
            trace,
            limits,
        )
        .await?;
        Ok(())
    }

    /// Makes sure the lease outlasts the next call, and the row shows the saga's status.
    async fn keep_lease(&self, row: &mut SagaRow, state: &SagaState, timeout: Duration) -> Result<bool, SagaError> {
        let now = Utc::now();
        let margin = chrono_dur(timeout + LEASE_MARGIN);
        let lease_ok = row.lease_until.is_some_and(|t| t > now + margin);
        if lease_ok && row.status == state.status {
            return Ok(true);
        }
        let until = now + margin.max(chrono_dur(self.config.lease));
        let ok = self
            .store
            .update_saga(&SagaUpdate {
                id: &row.id,
                holder: row.lease_owner,
                status: state.status,
                next_run_at: Some(now),
                lease: row.lease_owner.map(|token| (token, until)),
                log_version: state.log_version,
                now,
            })
            .await?;
        if ok {
            row.lease_until = Some(until);
            row.status = state.status;
            row.log_version = state.log_version;
        }
        Ok(ok)
    }

    async fn release(
        &self,
        row: &mut SagaRow,
        state: &SagaState,
        next: Option<DateTime<Utc>>,
    ) -> Result<bool, SagaError> {
        let ok = self
            .store
            .update_saga(&SagaUpdate {
                id: &row.id,
                holder: row.lease_owner,
                status: state.status,
                next_run_at: next,
                lease: None,
                log_version: state.log_version,
                now: Utc::now(),
            })
            .await?;
        Ok(ok)
    }

    /// Gives a held saga back without driving it (for example when shutting down).
    ///
    /// # Errors
    /// The store.
    pub async fn abandon(&self, held: Held) -> Result<(), SagaError> {
        let now = Utc::now();
        self.store
            .update_saga(&SagaUpdate {
                id: &held.row.id,
                holder: held.row.lease_owner,
                status: held.row.status,
                next_run_at: Some(now),
                lease: None,
                log_version: held.row.log_version,
                now,
            })
            .await?;
        Ok(())
    }
}

/// The op an outcome event records, for metrics.
fn e_op(e: &SagaEvent) -> &'static str {
    match e {
        SagaEvent::CompensationFailed { .. } | SagaEvent::CompensationSucceeded { .. } => "compensation",
        _ => "action",
    }
}

/// How often a signal is tried again when another sender took its place in the meantime.
const SIGNAL_RACES: usize = 8;

/// How long a paused saga is left before its node looks again for the operation that resumes
/// or cancels it, should the wake that operation asked for have failed.
const PARKED_LOOK: Duration = Duration::from_secs(60);

/// Operations read at once; more wait for the next look.
const OPERATIONS_PAGE: usize = 100;

/// A signal to send to a saga.
pub struct SendSignal<'a> {
    pub id: &'a SagaId,
    pub name: &'a str,
    pub payload: Value,
    /// The API key that sends it.
    pub by: Option<&'a str>,
    /// The request's `Idempotency-Key`, if any.
    pub request_key: Option<&'a str>,
}

/// The event id of the signal a caller sent with an `Idempotency-Key`: the same for every retry
/// of that send, different for any other.
fn signal_event_id(id: &SagaId, name: &str, by: Option<&str>, key: &str) -> Uuid {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [id.as_str(), name, by.unwrap_or(""), key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// True when a JSON value holds U+0000 anywhere (which no store can keep).
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, x)| k.contains('\0') || has_nul(x)),
        _ => false,
    }
}

fn scrub(e: String) -> String {
    if e.contains('\0') {
        e.replace('\0', "\u{FFFD}")
    } else {
        e
    }
}

fn observe_call(op: Op, outcome: &CallOutcome, started: DateTime<Utc>, finished: DateTime<Utc>) {
    let label = match outcome {
        CallOutcome::Succeeded(_) => "succeeded",
        CallOutcome::Refused(_) => "refused",
        CallOutcome::Transient(_) => "failed",
        CallOutcome::Unusable(_) => "unusable",
        CallOutcome::Accepted => "accepted",
    };
    let secs = (finished - started).to_std().unwrap_or_default().as_secs_f64();
    metrics::histogram!("concord_saga_step_duration_seconds", "op" => op.as_str(), "outcome" => label).record(secs);
    metrics::counter!("concord_saga_calls_total", "op" => op.as_str(), "outcome" => label).increment(1);
    if op == Op::Compensation && label == "succeeded" {
        metrics::counter!("concord_saga_compensations_total").increment(1);
    }
}

fn stream_name(id: &SagaId) -> Result<StreamName, SagaError> {
    Ok(StreamName::parse(&log_stream(id))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::MemoryStore;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a script keyed by (step, op); counts every call.
    struct Scripted {
        answer: Box<dyn Fn(&ParticipantCall) -> CallOutcome + Send + Sync>,
        calls: Mutex<Vec<ParticipantCall>>,
        count: AtomicUsize,
    }

    #[async_trait]
    impl Participants for Scripted {
        async fn call(&self, call: &ParticipantCall) -> Answer {
            self.count.fetch_add(1, Ordering::SeqCst);
            self.calls.lock().unwrap().push(call.clone());
            (self.answer)(call).into()
        }
    }

    fn engine(
        store: &Arc<MemoryStore>,
        lease_ms: u64,
        answer: impl Fn(&ParticipantCall) -> CallOutcome + Send + Sync + 'static,
    ) -> (SagaEngine, Arc<Scripted>) {
        engine_with(store, lease_ms, SagaSecrets::default(), answer)
    }

    fn engine_with(
        store: &Arc<MemoryStore>,
        lease_ms: u64,
        secrets: SagaSecrets,
        answer: impl Fn(&ParticipantCall) -> CallOutcome + Send + Sync + 'static,
    ) -> (SagaEngine, Arc<Scripted>) {
        let p = Arc::new(Scripted {
            answer: Box::new(answer),
            calls: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        });
        let config = EngineConfig {
            lease: Duration::from_millis(lease_ms),
            limits: SagaLimits::default(),
            event_limits: Limits::default(),
            outbound: OutboundPolicy::public_only("saga_allowed_hosts"),
            latest_definition_ttl: Duration::from_secs(1),
            operations_poll: Duration::from_millis(100),
            secrets,
            callbacks: None,
            retention: true,
        };
        let e = SagaEngine::new(store.clone(), store.clone(), p.clone(), Uuid::now_v7(), config);
        (e, p)
    }

    #[tokio::test]
    async fn a_node_without_a_secret_retries_and_one_with_it_sends_it_and_keeps_it_out_of_the_log() {
        let store = Arc::new(MemoryStore::default());
        let secrets =
            SagaSecrets::new([("pay".to_owned(), "s3cr3t".to_owned(), vec!["pay".to_owned()].into())]).unwrap();
        // The participant echoes the header it got.
        let echo =
            |c: &ParticipantCall| CallOutcome::Succeeded(json!({"auth": c.call.headers.get("authorization").cloned()}));
        let (with, sent) = engine_with(&store, 10_000, secrets, echo);
        let (without, _) = engine(&store, 10_000, echo);
        let mut def = serde_json::to_value(spec()).unwrap();
        def["steps"][1]["action"]["headers"] = json!({"authorization": "Bearer {{secrets.pay}}"});
        let def: DefinitionSpec = serde_json::from_value(def).unwrap();
        assert!(
            without.define("order", def.clone()).await.is_err(),
            "this node holds no such secret"
        );
        with.define("order", def).await.unwrap();

        let (_, held) = without.start(start("o-s")).await.unwrap();
        assert_eq!(
            without.drive(held.unwrap()).await.unwrap(),
            DriveEnd::Waiting,
            "not compensated"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut claimed = with.claim(10).await.unwrap();
        assert_eq!(
            with.drive(claimed.pop().unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Completed)
        );
        let calls = sent.calls.lock().unwrap().clone();
        let charge = calls.iter().find(|c| c.step == "charge").unwrap();
        assert_eq!(charge.call.headers["authorization"], "Bearer s3cr3t");
        let (_, state) = with.load(&sid("o-s")).await.unwrap();
        let log = serde_json::to_string(&state.unwrap().outputs()).unwrap();
        assert!(log.contains("Bearer [secret]") && !log.contains("s3cr3t"), "{log}");
    }

    fn spec() -> DefinitionSpec {
        serde_json::from_value(json!({"steps": [
            {"name": "reserve", "action": {"method": "POST", "url": "http://inv/reserve", "body": {"qty": "{{input.qty}}"}},
             "timeout_ms": 50,
             "compensation": {"method": "POST", "url": "http://inv/release/{{saga.id}}"}},
            {"name": "charge", "action": {"method": "POST", "url": "http://pay/charge"}, "timeout_ms": 50,
             "retry": {"max_attempts": 2, "backoff_ms": 50, "max_backoff_ms": 50, "jitter": 0.0}}
        ]}))
        .unwrap()
    }

    fn sid(id: &str) -> SagaId {
        SagaId::parse(id).unwrap()
    }

    fn start(id: &str) -> StartSaga {
        StartSaga {
            definition: "order".into(),
            input: json!({"qty": 2}),
            id: Some(sid(id)),
            trace: None,
        }
    }

    fn wait_spec() -> DefinitionSpec {
        serde_json::from_value(json!({"steps": [
            {"name": "reserve", "action": {"method": "POST", "url": "http://inv/reserve"}, "timeout_ms": 50},
            {"name": "paid", "wait": {"signal": "go", "timeout_ms": 60_000}},
            {"name": "ship", "action": {"method": "POST", "url": "http://ship/{{steps.paid.output.ref}}"}, "timeout_ms": 50}
        ]}))
        .unwrap()
    }

    fn send<'a>(id: &'a SagaId, payload: Value, request_key: Option<&'a str>) -> SendSignal<'a> {
        SendSignal {
            id,
            name: "go",
            payload,
            by: Some("k1"),
            request_key,
        }
    }

    /// A saga store that, once armed, lands a signal (kept, row woken) just before the next
    /// release: the signal of a sender that came while the node held the saga.
    struct SignalAtRelease {
        inner: Arc<MemoryStore>,
        armed: Mutex<Option<SagaId>>,
    }

    #[async_trait]
    impl SagaStore for SignalAtRelease {
        async fn put_definition(&self, n: &str, s: &Value, now: DateTime<Utc>) -> Result<(u32, bool), StoreError> {
            self.inner.put_definition(n, s, now).await
        }
        async fn get_definition(&self, n: &str, v: Option<u32>) -> Result<Option<StoredDefinition>, StoreError> {
            self.inner.get_definition(n, v).await
        }
        async fn create_saga(&self, row: &SagaRow) -> Result<(SagaRow, bool), StoreError> {
            self.inner.create_saga(row).await
        }
        async fn get_saga(&self, id: &SagaId) -> Result<Option<SagaRow>, StoreError> {
            self.inner.get_saga(id).await
        }
        async fn list_sagas(
            &self,
            s: Option<SagaStatus>,
            a: Option<&str>,
            l: usize,
        ) -> Result<Vec<SagaRow>, StoreError> {
            self.inner.list_sagas(s, a, l).await
        }
        async fn claim_sagas(
            &self,
            o: Uuid,
            now: DateTime<Utc>,
            until: DateTime<Utc>,
            l: usize,
        ) -> Result<Vec<SagaRow>, StoreError> {
            self.inner.claim_sagas(o, now, until, l).await
        }
        async fn update_saga(&self, u: &SagaUpdate<'_>) -> Result<bool, StoreError> {
            let armed = self.armed.lock().unwrap().take();
            if let Some(id) = armed.filter(|_| u.lease.is_none()) {
                let stream = StreamName::parse(&signal_stream(&id, "go")).unwrap();
                let event = crate::domain::event::UncheckedEvent {
                    id: None,
                    event_type: "SignalSent".into(),
                    data: json!({"ref": "late"}),
                    metadata: None,
                };
                let req =
                    AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event], &Limits::default()).unwrap();
                EventStore::append(self.inner.as_ref(), req).await.unwrap();
                self.inner.wake_saga(&id, Utc::now()).await.unwrap();
            }
            self.inner.update_saga(u).await
        }
        async fn wake_saga(&self, id: &SagaId, now: DateTime<Utc>) -> Result<bool, StoreError> {
            self.inner.wake_saga(id, now).await
        }
        async fn count_sagas(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
            self.inner.count_sagas().await
        }
        async fn purge_sagas(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
            self.inner.purge_sagas(before, limit).await
        }
    }

    #[tokio::test]
    async fn a_signal_that_lands_while_the_node_releases_the_saga_is_not_lost() {
        let inner = Arc::new(MemoryStore::default());
        let store = Arc::new(SignalAtRelease {
            inner: inner.clone(),
            armed: Mutex::new(None),
        });
        let p = Arc::new(Scripted {
            answer: Box::new(|_| CallOutcome::Succeeded(json!({}))),
            calls: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        });
        let config = EngineConfig {
            lease: Duration::from_millis(10_000),
            limits: SagaLimits::default(),
            event_limits: Limits::default(),
            outbound: OutboundPolicy::public_only("saga_allowed_hosts"),
            latest_definition_ttl: Duration::from_secs(1),
            operations_poll: Duration::from_millis(100),
            secrets: SagaSecrets::default(),
            callbacks: None,
            retention: true,
        };
        let e = SagaEngine::new(inner.clone(), store.clone(), p.clone(), Uuid::now_v7(), config);
        e.define("order", wait_spec()).await.unwrap();
        let (_, held) = e.start(start("w-1")).await.unwrap();
        *store.armed.lock().unwrap() = Some(sid("w-1"));
        // The drive saw no signal, released the saga to wait, then found the one that came.
        assert_eq!(e.drive(held.unwrap()).await.unwrap(), DriveEnd::Woken);
        let row = inner.get_saga(&sid("w-1")).await.unwrap().unwrap();
        assert!(row.lease_owner.is_none() && row.next_run_at.is_some_and(|t| t <= Utc::now()));
        let mut claimed = e.claim(10).await.unwrap();
        assert_eq!(claimed.len(), 1, "due at once, not at the wait's timeout");
        let end = e.drive(claimed.pop().unwrap()).await.unwrap();
        assert_eq!(end, DriveEnd::Finished(SagaStatus::Completed));
        let (_, state) = e.load(&sid("w-1")).await.unwrap();
        assert_eq!(state.unwrap().steps[1].output, Some(json!({"ref": "late"})));
        assert_eq!(p.calls.lock().unwrap().last().unwrap().call.url, "http://ship/late");
    }

    #[tokio::test]
    async fn a_signal_retried_with_its_key_is_kept_once_and_a_wake_before_it_records_nothing() {
        let store = Arc::new(MemoryStore::default());
        let (e, _) = engine(&store, 10_000, |_| CallOutcome::Succeeded(json!({})));
        e.define("order", wait_spec()).await.unwrap();
        let (_, held) = e.start(start("w-2")).await.unwrap();
        assert_eq!(e.drive(held.unwrap()).await.unwrap(), DriveEnd::Waiting);
        let waiting = e.load(&sid("w-2")).await.unwrap().1.unwrap().log_version;
        // Woken with no signal there (as for a signal of a later step): the claim finds nothing
        // to do and writes nothing to the log.
        store.wake_saga(&sid("w-2"), Utc::now()).await.unwrap();
        let mut claimed = e.claim(10).await.unwrap();
        assert_eq!(e.drive(claimed.pop().unwrap()).await.unwrap(), DriveEnd::Waiting);
        assert_eq!(e.load(&sid("w-2")).await.unwrap().1.unwrap().log_version, waiting);
        // The same send twice (a retry after a lost answer) keeps one signal; another is refused.
        let id = sid("w-2");
        assert_eq!(
            e.signal(send(&id, json!({"ref": "a"}), Some("key-1"))).await.unwrap(),
            1
        );
        assert_eq!(
            e.signal(send(&id, json!({"ref": "a"}), Some("key-1"))).await.unwrap(),
            1
        );
        let stream = StreamName::parse(&signal_stream(&id, "go")).unwrap();
        assert_eq!(store.read_stream(&stream, 1, 10, usize::MAX).await.unwrap().len(), 1);
        assert!(matches!(
            e.signal(send(&id, json!({"ref": "b"}), Some("key-2"))).await,
            Err(SagaError::SignalAlreadySent { taken: 1, .. })
        ));
        let mut claimed = e.claim(10).await.unwrap();
        let end = e.drive(claimed.pop().unwrap()).await.unwrap();
        assert_eq!(end, DriveEnd::Finished(SagaStatus::Completed));
        assert!(matches!(
            e.signal(send(&id, json!({}), None)).await,
            Err(SagaError::SignalAlreadySent { .. })
        ));
    }

    #[tokio::test]
    async fn a_started_saga_runs_to_completion_and_its_log_and_row_agree() {
        let store = Arc::new(MemoryStore::default());
        let (e, p) = engine(&store, 10_000, |c| {
            CallOutcome::Succeeded(json!({"id": format!("{}-1", c.step)}))
        });
        e.define("order", spec()).await.unwrap();
        let (row, held) = e.start(start("o-1")).await.unwrap();
        assert!(
            row.lease_owner.is_some() && row.lease_owner != Some(e.node()),
            "a token per hold"
        );
        assert_eq!(
            e.drive(held.unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Completed)
        );
        let calls = p.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].idempotency_key, "o-1:reserve:action");
        assert_eq!(calls[0].call.body, Some(json!({"qty": 2})));
        let (row, state) = e.load(&sid("o-1")).await.unwrap();
        let state = state.unwrap();
        assert_eq!(
            (row.status, row.lease_owner, row.next_run_at),
            (SagaStatus::Completed, None, None)
        );
        assert_eq!(row.log_version, state.log_version);
        assert_eq!(state.log_version, 4, "started, two steps, completed");
        // Starting the same id again finds it and runs nothing.
        let (again, held) = e.start(start("o-1")).await.unwrap();
        assert!(held.is_none());
        assert_eq!(again.status, SagaStatus::Completed);
        assert_eq!(p.count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_transient_failure_waits_in_the_database_and_a_claim_resumes_it() {
        let store = Arc::new(MemoryStore::default());
        let failures = AtomicUsize::new(0);
        let (e, p) = engine(&store, 10_000, move |c| {
            if c.step == "charge" && failures.fetch_add(1, Ordering::SeqCst) == 0 {
                CallOutcome::Transient("503".into())
            } else {
                CallOutcome::Succeeded(json!({"id": "r"}))
            }
        });
        e.define("order", spec()).await.unwrap();
        let (_, held) = e.start(start("o-2")).await.unwrap();
        assert_eq!(e.drive(held.unwrap()).await.unwrap(), DriveEnd::Waiting);
        let row = store.get_saga(&sid("o-2")).await.unwrap().unwrap();
        assert!(row.next_run_at.is_some() && row.lease_owner.is_none());
        assert!(e.claim(10).await.unwrap().is_empty(), "not due before its backoff");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut claimed = e.claim(10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let end = e.drive(claimed.pop().unwrap()).await.unwrap();
        assert_eq!(end, DriveEnd::Finished(SagaStatus::Completed));
        assert_eq!(p.count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_open_breaker_parks_the_saga_without_an_attempt_and_a_wake_resumes_it() {
        use crate::domain::flow::{BreakerSettings, HostSignal};
        use crate::ports::HostStore as _;
        let store = Arc::new(MemoryStore::default());
        let (e, p) = engine(&store, 10_000, |_| CallOutcome::Succeeded(json!({"id": "r"})));
        let gate = Arc::new(crate::app::flow::HostGate::new(store.clone(), Default::default()));
        let e = e.with_gate(gate);
        let settings = BreakerSettings {
            failures: 1,
            ..BreakerSettings::default()
        };
        store
            .change_host("pay:80", &mut |h| {
                h.report(Utc::now(), None, HostSignal::Failing, &settings);
                true
            })
            .await
            .unwrap();
        e.define("order", spec()).await.unwrap();
        let (_, held) = e.start(start("o-9")).await.unwrap();
        assert_eq!(e.drive(held.unwrap()).await.unwrap(), DriveEnd::Waiting);
        assert_eq!(
            p.count.load(Ordering::SeqCst),
            1,
            "only the step before the open host ran"
        );
        let row = store.get_saga(&sid("o-9")).await.unwrap().unwrap();
        assert!(
            row.next_run_at.unwrap() > Utc::now() + chrono::Duration::seconds(3),
            "{row:?}"
        );
        assert_eq!(store.parked_on(&sid("o-9")).await.unwrap().as_deref(), Some("pay:80"));
        let (_, state) = e.load(&sid("o-9")).await.unwrap();
        assert!(
            state.unwrap().steps[1].attempts.is_empty(),
            "held back, it spent no attempt"
        );
        // Another saga's probe succeeded: the breaker closes and the parked saga is due now.
        store
            .change_host("pay:80", &mut |h| {
                h.report(Utc::now(), None, HostSignal::Healthy, &settings);
                true
            })
            .await
            .unwrap();
        assert_eq!(store.wake_parked("pay:80", Utc::now(), 10).await.unwrap(), 1);
        let mut claimed = e.claim(10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let end = e.drive(claimed.pop().unwrap()).await.unwrap();
        assert_eq!(end, DriveEnd::Finished(SagaStatus::Completed));
        assert_eq!(p.count.load(Ordering::SeqCst), 2);
        let (_, state) = e.load(&sid("o-9")).await.unwrap();
        assert_eq!(state.unwrap().steps[1].attempts.len(), 1);
    }

    /// A host table that cannot be read or written.
    struct BrokenHosts;

    #[async_trait]
    impl crate::ports::HostStore for BrokenHosts {
        async fn change_host(
            &self,
            _: &str,
            _: crate::ports::HostChange<'_>,
        ) -> Result<crate::domain::flow::HostState, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn get_host(&self, _: &str) -> Result<Option<crate::domain::flow::HostState>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn list_hosts(&self) -> Result<Vec<(String, crate::domain::flow::HostState)>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn park_saga(&self, _: &str, _: &SagaId, _: DateTime<Utc>) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn wake_parked(&self, _: &str, _: DateTime<Utc>, _: usize) -> Result<usize, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn parked_on(&self, _: &SagaId) -> Result<Option<String>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn calls_go_out_when_the_host_table_cannot_be_read() {
        let store = Arc::new(MemoryStore::default());
        let (e, p) = engine(&store, 10_000, |c| {
            if c.step == "charge" {
                CallOutcome::Transient("503".into())
            } else {
                CallOutcome::Succeeded(json!({"id": "r"}))
            }
        });
        let e = e.with_gate(Arc::new(crate::app::flow::HostGate::new(
            Arc::new(BrokenHosts),
            Default::default(),
        )));
        e.define("order", spec()).await.unwrap();
        let (_, held) = e.start(start("o-10")).await.unwrap();
        // The failure it reports cannot be counted either; the saga goes its own way.
        assert_eq!(e.drive(held.unwrap()).await.unwrap(), DriveEnd::Waiting);
        assert_eq!(p.count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refusal_compensates_with_the_earlier_output_and_retry_resumes_a_failed_saga() {
        let store = Arc::new(MemoryStore::default());
        let undo_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = undo_ok.clone();
        let (e, p) = engine(&store, 10_000, move |c| match (c.step.as_str(), c.op) {
            ("charge", Op::Action) => CallOutcome::Refused("card declined".into()),
            ("reserve", Op::Compensation) if !flag.load(Ordering::SeqCst) => CallOutcome::Refused("nope".into()),
            _ => CallOutcome::Succeeded(json!({"id": "r/9"})),
        });
        e.define("order", spec()).await.unwrap();
        let (_, held) = e.start(start("o-3")).await.unwrap();
        assert_eq!(
            e.drive(held.unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Failed)
        );
        let undo = p.calls.lock().unwrap().last().cloned().unwrap();
        assert_eq!(undo.call.url, "http://inv/release/o-3");
        assert_eq!(undo.idempotency_key, "o-3:reserve:compensation");
        undo_ok.store(true, Ordering::SeqCst);
        // A pause asked just before it failed, kept and never recorded: the retry refuses it,
        // so it does not park the retried saga.
        assert!(matches!(
            e.operate(&sid("o-3"), SagaOperation::Pause, None, None).await,
            Err(SagaError::OperationRefused { .. })
        ));
        let asked = crate::domain::event::UncheckedEvent {
            id: None,
            event_type: "OperationRequested".into(),
            data: json!({"operation": "pause"}),
            metadata: None,
        };
        let stream = StreamName::parse(&operations_stream(&sid("o-3"))).unwrap();
        let request = AppendRequest::new(stream, ExpectedVersion::NoStream, vec![asked], &Limits::default()).unwrap();
        crate::ports::EventStore::append(store.as_ref(), request).await.unwrap();
        let held = e.retry(&sid("o-3")).await.unwrap();
        assert_eq!(
            e.drive(held).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Compensated)
        );
        let (_, state) = e.load(&sid("o-3")).await.unwrap();
        let state = state.unwrap();
        assert_eq!((state.operations, state.paused), (1, false));
        assert!(matches!(e.retry(&sid("o-3")).await, Err(SagaError::NotFailed(..))));
        assert!(matches!(e.retry(&sid("nope")).await, Err(SagaError::NotFound(_))));
    }

    #[tokio::test]
    async fn a_node_that_lost_its_lease_records_nothing_more() {
        let store = Arc::new(MemoryStore::default());
        let (a, _) = engine(&store, 20, |_| CallOutcome::Succeeded(json!({"id": "x"})));
        let (b, pb) = engine(&store, 10_000, |_| CallOutcome::Succeeded(json!({"id": "x"})));
        a.define("order", spec()).await.unwrap();
        // Node a starts the saga and dies before driving it.
        let (_, held_by_a) = a.start(start("o-4")).await.unwrap();
        assert!(b.claim(10).await.unwrap().is_empty(), "a's lease is live");
        // A fresh lease covers the longest step's timeout plus a margin of 1 s.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut taken = b.claim(10).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            b.drive(taken.pop().unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Completed)
        );
        assert_eq!(pb.count.load(Ordering::SeqCst), 2);
        // Node a wakes up: its first record is refused by the log, so it stops.
        assert_eq!(a.drive(held_by_a.unwrap()).await.unwrap(), DriveEnd::Lost);
        let (row, state) = b.load(&sid("o-4")).await.unwrap();
        assert_eq!(row.status, SagaStatus::Completed);
        assert_eq!(state.unwrap().log_version, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_holder_cannot_record_after_a_takeover() {
        let store = Arc::new(MemoryStore::default());
        // Node a's charge call stalls past its lease, then answers "refused".
        let (a, _) = engine(&store, 20, |c| {
            if c.step == "charge" {
                std::thread::sleep(Duration::from_millis(1500));
                CallOutcome::Refused("declined".into())
            } else {
                CallOutcome::Succeeded(json!({"id": "x"}))
            }
        });
        // Node b's call is slow too, so a wakes and tries to record before b does.
        let (b, _) = engine(&store, 10_000, |c| {
            if c.step == "charge" {
                std::thread::sleep(Duration::from_millis(600));
            }
            CallOutcome::Succeeded(json!({"id": "x"}))
        });
        a.define("order", spec()).await.unwrap();
        let (_, held) = a.start(start("o-8")).await.unwrap();
        let stalled = tokio::task::spawn_blocking({
            let held = held.unwrap();
            move || tokio::runtime::Handle::current().block_on(a.drive(held))
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut taken = b.claim(10).await.unwrap();
        assert_eq!(taken.len(), 1, "a's lease ran out during its stalled call");
        assert_eq!(
            b.drive(taken.pop().unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Completed)
        );
        // a's refusal, recorded first, would have sent the saga compensating while b's charge
        // went through; b's takeover record made the log refuse it.
        assert_eq!(stalled.await.unwrap().unwrap(), DriveEnd::Lost);
        let (_, state) = b.load(&sid("o-8")).await.unwrap();
        let state = state.unwrap();
        assert_eq!(state.status, SagaStatus::Completed);
        assert_eq!(state.steps[1].attempts.len(), 1, "only b's call is recorded");
    }

    #[tokio::test]
    async fn a_row_without_its_first_log_event_is_started_by_the_runner() {
        let store = Arc::new(MemoryStore::default());
        let (e, _) = engine(&store, 10_000, |_| CallOutcome::Succeeded(json!({"id": "x"})));
        e.define("order", spec()).await.unwrap();
        let mut row = crate::testkit::saga_row("o-5", Utc::now());
        row.input = json!({"qty": 1});
        store.create_saga(&row).await.unwrap();
        let mut claimed = e.claim(1).await.unwrap();
        assert_eq!(
            e.drive(claimed.pop().unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Completed)
        );
    }

    #[tokio::test]
    async fn definitions_call_only_allowed_hosts_when_a_list_is_set() {
        let store = Arc::new(MemoryStore::default());
        let p = Arc::new(Scripted {
            answer: Box::new(|_| CallOutcome::Succeeded(Value::Null)),
            calls: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        });
        let config = |hosts: &[&str]| EngineConfig {
            lease: Duration::from_secs(10),
            limits: SagaLimits::default(),
            event_limits: Limits::default(),
            outbound: OutboundPolicy::new(
                "saga_allowed_hosts",
                &hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
            )
            .unwrap(),
            latest_definition_ttl: Duration::from_secs(1),
            operations_poll: Duration::from_millis(100),
            secrets: SagaSecrets::default(),
            callbacks: None,
            retention: true,
        };
        let only_inv = SagaEngine::new(
            store.clone(),
            store.clone(),
            p.clone(),
            Uuid::now_v7(),
            config(&["inv"]),
        );
        let err = only_inv.define("order", spec()).await.unwrap_err();
        assert!(
            matches!(&err, SagaError::Definition(DefinitionError::Refused { url, .. }) if url == "http://pay/charge"),
            "{err}"
        );
        let both = SagaEngine::new(
            store.clone(),
            store.clone(),
            p,
            Uuid::now_v7(),
            config(&["inv", "pay:80", "pay"]),
        );
        assert!(both.define("order", spec()).await.is_ok());
    }

    #[tokio::test]
    async fn a_definition_stored_under_a_wider_list_is_refused_at_call_time() {
        let store = Arc::new(MemoryStore::default());
        let (mut wide, _) = engine(&store, 10_000, |_| CallOutcome::Succeeded(Value::Null));
        wide.config.outbound = OutboundPolicy::new("saga_allowed_hosts", &["10.0.0.0/8".to_owned()]).unwrap();
        let def: DefinitionSpec = serde_json::from_value(json!({"steps": [
            {"name": "reserve", "action": {"method": "POST", "url": "http://10.0.0.5/reserve"}}
        ]}))
        .unwrap();
        wide.define("order", def).await.unwrap();
        // The list is narrowed (the default: public addresses only) after the definition was put.
        let (strict, p) = engine(&store, 10_000, |_| CallOutcome::Succeeded(Value::Null));
        let (_, held) = strict.start(start("o-wide")).await.unwrap();
        assert_eq!(
            strict.drive(held.unwrap()).await.unwrap(),
            DriveEnd::Finished(SagaStatus::Compensated)
        );
        assert_eq!(p.count.load(Ordering::SeqCst), 0, "no call left");
        let (_, state) = strict.load(&sid("o-wide")).await.unwrap();
        let log = serde_json::to_string(&state.unwrap().steps).unwrap();
        assert!(log.contains("private address"), "{log}");
    }

    #[tokio::test]
    async fn bad_starts_are_refused_before_anything_is_written() {
        let store = Arc::new(MemoryStore::default());
        let (e, _) = engine(&store, 10_000, |_| CallOutcome::Succeeded(Value::Null));
        assert!(matches!(
            e.start(start("o-6")).await,
            Err(SagaError::DefinitionNotFound(_))
        ));
        e.define("order", spec()).await.unwrap();
        // A bad id is refused where it enters, as a bad name: no start is ever made of it.
        assert!(matches!(
            SagaId::parse("bad id").map_err(SagaError::from),
            Err(SagaError::Definition(_))
        ));
        let mut big = start("o-7");
        big.input = json!({"x": "y".repeat(70_000)});
        assert!(matches!(e.start(big).await, Err(SagaError::InputTooLarge { .. })));
        assert!(store.list_sagas(None, None, 10).await.unwrap().is_empty());
    }
}
