//! The saga state machine: pure. The state is a fold of the saga's log (its events); given the
//! state and the time, [`decide`] says what to do next; given the outcome of a participant call,
//! [`on_outcome`] says which event records it. Nothing here does I/O.

use super::definition::{OnTimeout, SagaDefinition, timer_end};
use chrono::{DateTime, Utc};
use concord_kernel::SagaId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation reached its limit: kept for an operator, who may retry it.
    Failed,
    /// An operator cancelled it, and what ran was compensated.
    Cancelled,
}

impl SagaStatus {
    pub const ALL: [Self; 6] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Failed,
        Self::Cancelled,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// True when nothing more runs on its own (`failed` waits for an operator).
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Compensated | Self::Failed | Self::Cancelled
        )
    }
}

/// The event operation number `sequence` becomes for a saga in `state`: the operation itself,
/// or its refusal when it no longer applies. (A cancel of a saga whose asynchronous action waits
/// for its completion needs that completion settled first: see the engine.)
#[must_use]
pub fn operation_event(
    op: SagaOperation,
    sequence: u64,
    by: Option<String>,
    state: &SagaState,
    at: DateTime<Utc>,
) -> SagaEvent {
    if let Some(reason) = op.refusal(state) {
        return SagaEvent::OperationRefused {
            sequence,
            operation: op,
            reason,
            by,
            at,
        };
    }
    match op {
        SagaOperation::Cancel => SagaEvent::SagaCancelled { sequence, by, at },
        SagaOperation::Pause => SagaEvent::SagaPaused { sequence, by, at },
        SagaOperation::Resume => SagaEvent::SagaUnpaused { sequence, by, at },
        SagaOperation::RetryNow => SagaEvent::RetryNowRequested { sequence, by, at },
    }
}

/// What an operator may ask of one saga (`POST /v1/sagas/{id}/{operation}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaOperation {
    /// Stop: compensate what ran, end `cancelled`.
    Cancel,
    /// No new attempt starts (the running one finishes) until a resume.
    Pause,
    Resume,
    /// The next attempt now, not after its backoff.
    RetryNow,
}

impl SagaOperation {
    pub const ALL: [Self; 4] = [Self::Cancel, Self::Pause, Self::Resume, Self::RetryNow];

    /// As in the route: `cancel`, `pause`, `resume`, `retry-now`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::RetryNow => "retry-now",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Why it does not apply to a saga in `state`, if it does not.
    #[must_use]
    pub fn refusal(self, state: &SagaState) -> Option<String> {
        let status = state.status;
        let reason = match self {
            _ if status.is_terminal() => format!("the saga is {}", status.as_str()),
            Self::Cancel if status != SagaStatus::Running => {
                format!(
                    "the saga is {} already: only a running saga is cancelled",
                    status.as_str()
                )
            }
            Self::Pause if state.paused => "the saga is paused already".to_owned(),
            Self::Resume if !state.paused => "the saga is not paused".to_owned(),
            Self::RetryNow if state.paused => "the saga is paused: resume it".to_owned(),
            _ => return None,
        };
        Some(reason)
    }
}

/// Which call of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Action,
    Compensation,
}

impl Op {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }
}

/// What a participant call came to, as classified by the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    /// 2xx: the JSON answer is the step's output.
    Succeeded(Value),
    /// 4xx other than 408/425/429: the participant said no.
    Refused(String),
    /// 5xx, 408, 425, 429, a timeout, a connection error: it may work later, or may have worked.
    Transient(String),
    /// 2xx, but the answer cannot be kept (too large, or not storable): the call took effect,
    /// yet later steps could not use its output. An action is then compensated as uncertain.
    Unusable(String),
    /// 202 to an action that carried a completion URL: the participant finishes later and posts
    /// its result there.
    Accepted,
}

/// One entry of the saga log, stored as an event of the stream `saga-{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum SagaEvent {
    SagaStarted {
        definition: String,
        version: u32,
        input: Value,
        at: DateTime<Utc>,
    },
    ActionSucceeded {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        output: Value,
        at: DateTime<Utc>,
    },
    ActionRefused {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        error: String,
        at: DateTime<Utc>,
    },
    /// A transient failure; `retry_at` is when the next attempt is due, none when the attempts are
    /// used up (the step's effect is then uncertain and it is compensated).
    ActionFailed {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        error: String,
        retry_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    CompensationSucceeded {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// A failed compensation; none for `retry_at` means it gave up and the saga is `failed`.
    CompensationFailed {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        error: String,
        retry_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    SagaCompleted {
        at: DateTime<Utc>,
    },
    SagaCompensated {
        at: DateTime<Utc>,
    },
    /// An operator resumed a `failed` saga: its compensations get a fresh budget.
    SagaRetried {
        at: DateTime<Utc>,
    },
    /// The participant answered the attempt with 202: it posts the result to the attempt's
    /// completion URL, by `until` at the latest. The saga waits, holding no lease.
    ActionAccepted {
        step: usize,
        attempt: u32,
        started_at: DateTime<Utc>,
        until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// A timer step was reached: the saga waits until `until`, holding no lease.
    TimerStarted {
        step: usize,
        until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// A timer step's time came: the step is done (nothing to compensate).
    TimerFired {
        step: usize,
        at: DateTime<Utc>,
    },
    /// A wait step was reached before its signal came: the saga waits for it until `until`,
    /// holding no lease.
    WaitStarted {
        step: usize,
        signal: String,
        until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// The signal a wait step waited for: its body is the step's output. `sequence` is which
    /// signal of that name it was (1: the first sent); `by` the API key that sent it.
    SignalReceived {
        step: usize,
        signal: String,
        sequence: u64,
        payload: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
    /// A wait step's time ran out before its signal came: the saga compensates.
    WaitTimedOut {
        step: usize,
        at: DateTime<Utc>,
    },
    /// A step whose `when` did not hold when the saga reached it: never called, never
    /// compensated.
    StepSkipped {
        step: usize,
        at: DateTime<Utc>,
    },
    /// A node took the saga over (its previous holder died or stalled); changes nothing but
    /// moves the log on, so the previous holder can record nothing more.
    SagaResumed {
        at: DateTime<Utc>,
    },
    /// An operator's pause (operation `sequence`, sent by key `by`): no attempt starts until an
    /// unpause.
    SagaPaused {
        sequence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
    /// An operator's resume of a paused saga (named so because `SagaResumed` is a node taking a
    /// saga over).
    SagaUnpaused {
        sequence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
    /// An operator's cancel: the saga compensates what ran (a step whose outcome is unknown
    /// counts as uncertain) and ends `cancelled`.
    SagaCancelled {
        sequence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
    /// An operator asked for the next attempt now, not after its backoff.
    RetryNowRequested {
        sequence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
    /// An operation that no longer applied when the saga came to it (it finished meanwhile, or
    /// an earlier operation changed it).
    OperationRefused {
        sequence: u64,
        operation: SagaOperation,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        at: DateTime<Utc>,
    },
}

impl SagaEvent {
    /// The event type it is stored under.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::SagaStarted { .. } => "SagaStarted",
            Self::ActionSucceeded { .. } => "ActionSucceeded",
            Self::ActionRefused { .. } => "ActionRefused",
            Self::ActionFailed { .. } => "ActionFailed",
            Self::CompensationSucceeded { .. } => "CompensationSucceeded",
            Self::CompensationFailed { .. } => "CompensationFailed",
            Self::SagaCompleted { .. } => "SagaCompleted",
            Self::SagaCompensated { .. } => "SagaCompensated",
            Self::SagaRetried { .. } => "SagaRetried",
            Self::SagaResumed { .. } => "SagaResumed",
            Self::StepSkipped { .. } => "StepSkipped",
            Self::TimerStarted { .. } => "TimerStarted",
            Self::TimerFired { .. } => "TimerFired",
            Self::WaitStarted { .. } => "WaitStarted",
            Self::ActionAccepted { .. } => "ActionAccepted",
            Self::SignalReceived { .. } => "SignalReceived",
            Self::WaitTimedOut { .. } => "WaitTimedOut",
            Self::SagaPaused { .. } => "SagaPaused",
            Self::SagaUnpaused { .. } => "SagaUnpaused",
            Self::SagaCancelled { .. } => "SagaCancelled",
            Self::RetryNowRequested { .. } => "RetryNowRequested",
            Self::OperationRefused { .. } => "OperationRefused",
        }
    }
}

/// The effect of a step's action, as far as the orchestrator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    Pending,
    Succeeded,
    Refused,
    /// Attempts ran out on transient failures: it may or may not have taken effect.
    Uncertain,
    /// Its `when` did not hold: it was never called.
    Skipped,
}

/// Where a step's compensation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationStatus {
    NotNeeded,
    Pending,
    Succeeded,
    GaveUp,
}

/// One call to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub op: Op,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// `succeeded`, `refused` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
}

/// A step as the log tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub action: ActionStatus,
    pub compensation: CompensationStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub attempts: Vec<Attempt>,
    /// Tries of the current op counted against its limit (an operator retry resets them).
    pub tries: u32,
    /// A timer step that was reached: when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<DateTime<Utc>>,
    /// A wait step that was reached before its signal: when it gives up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_until: Option<DateTime<Utc>>,
    /// The signal it waits for, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// An attempt the participant accepted (202) and has not completed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<PendingCallback>,
}

/// An action attempt answered with 202, waiting for its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCallback {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// A saga as the log tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub id: SagaId,
    pub definition: String,
    pub version: u32,
    pub input: Value,
    pub status: SagaStatus,
    pub steps: Vec<StepState>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the next call is due (none: now, or never when terminal).
    pub retry_at: Option<DateTime<Utc>>,
    /// How many log events are folded in (the stream version).
    pub log_version: u64,
    /// An operator paused it: no attempt starts.
    #[serde(default)]
    pub paused: bool,
    /// An operator cancelled it: its compensation ends it `cancelled`.
    #[serde(default)]
    pub cancelled: bool,
    /// How many operator operations it has come to (the operations stream's version).
    #[serde(default)]
    pub operations: u64,
}

/// A log that does not fit the definition: a bug or a tampered stream. The saga stops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("saga log inconsistent: {0}")]
pub struct LogError(pub String);

impl SagaState {
    /// The state right after `SagaStarted`.
    #[must_use]
    pub fn new(id: &SagaId, def: &SagaDefinition, input: Value, at: DateTime<Utc>) -> Self {
        Self {
            id: id.clone(),
            definition: def.name.clone(),
            version: def.version,
            input,
            status: SagaStatus::Running,
            steps: def
                .steps
                .iter()
                .map(|s| StepState {
                    name: s.name.clone(),
                    action: ActionStatus::Pending,
                    compensation: CompensationStatus::NotNeeded,
                    output: None,
                    error: None,
                    attempts: Vec::new(),
                    tries: 0,
                    timer: None,
                    wait_until: None,
                    waiting_for: None,
                    callback: None,
                })
                .collect(),
            started_at: at,
            updated_at: at,
            retry_at: None,
            log_version: 1,
            paused: false,
            cancelled: false,
            operations: 0,
        }
    }

    /// Folds a whole log. The first event must be `SagaStarted` of `def`.
    ///
    /// # Errors
    /// A log that does not fit the definition.
    pub fn from_log(id: &SagaId, def: &SagaDefinition, events: &[SagaEvent]) -> Result<Self, LogError> {
        let Some(SagaEvent::SagaStarted { input, at, .. }) = events.first() else {
            return Err(LogError("the log does not start with SagaStarted".into()));
        };
        let mut s = Self::new(id, def, input.clone(), *at);
        for e in &events[1..] {
            s.apply(def, e)?;
        }
        Ok(s)
    }

    /// Outputs of the succeeded steps, for templates.
    #[must_use]
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| s.output.clone().map(|o| (s.name.clone(), o)))
            .collect()
    }

    fn step_mut(&mut self, i: usize) -> Result<&mut StepState, LogError> {
        self.steps
            .get_mut(i)
            .ok_or_else(|| LogError(format!("step {i} is not in the definition")))
    }

    /// Folds one event in.
    ///
    /// # Errors
    /// An event that cannot happen in this state.
    pub fn apply(&mut self, def: &SagaDefinition, e: &SagaEvent) -> Result<(), LogError> {
        let attempt = |op, attempt, started_at, at, outcome: &str, error: Option<&String>| Attempt {
            op,
            attempt,
            started_at,
            finished_at: at,
            outcome: outcome.to_owned(),
            error: error.cloned(),
        };
        if let SagaEvent::ActionSucceeded { step, attempt: n, .. }
        | SagaEvent::ActionRefused { step, attempt: n, .. }
        | SagaEvent::ActionFailed { step, attempt: n, .. } = e
            && let Some(cb) = self.steps.get(*step).and_then(|s| s.callback)
            && cb.attempt != *n
        {
            return Err(LogError(format!(
                "{} of step {step} attempt {n} while attempt {} awaits its completion",
                e.type_name(),
                cb.attempt
            )));
        }
        match e {
            SagaEvent::SagaStarted { .. } => return Err(LogError("SagaStarted twice".into())),
            SagaEvent::ActionSucceeded {
                step,
                attempt: n,
                started_at,
                output,
                at,
            } => {
                let late_branch = self.late_branch(def, *step, e)?;
                let has_comp = def.steps.get(*step).is_some_and(|d| d.compensation.is_some());
                let s = self.step_mut(*step)?;
                s.attempts
                    .push(attempt(Op::Action, *n, *started_at, *at, "succeeded", None));
                s.callback = None;
                s.action = ActionStatus::Succeeded;
                s.output = Some(output.clone());
                s.error = None;
                s.tries = 0;
                s.compensation = if has_comp {
                    CompensationStatus::Pending
                } else {
                    CompensationStatus::NotNeeded
                };
                if !late_branch {
                    self.retry_at = None;
                }
            }
            SagaEvent::ActionRefused {
                step,
                attempt: n,
                started_at,
                error,
                at,
            } => {
                self.late_branch(def, *step, e)?;
                let has_comp = def.steps.get(*step).is_some_and(|d| d.compensation.is_some());
                let s = self.step_mut(*step)?;
                // An earlier attempt that failed or timed out may still land after this refusal,
                // so the step is uncertain and its compensation (which blocks a late action at
                // a barrier) is owed.
                let earlier_unknown = s.attempts.iter().any(|a| a.op == Op::Action && a.outcome == "failed");
                s.attempts
                    .push(attempt(Op::Action, *n, *started_at, *at, "refused", Some(error)));
                s.callback = None;
                if earlier_unknown {
                    s.action = ActionStatus::Uncertain;
                    s.compensation = if has_comp {
                        CompensationStatus::Pending
                    } else {
                        CompensationStatus::NotNeeded
                    };
                } else {
                    s.action = ActionStatus::Refused;
                }
                s.error = Some(error.clone());
                s.tries = 0;
                self.status = SagaStatus::Compensating;
                self.retry_at = None;
                self.branches_in_doubt(def, *step);
            }
            SagaEvent::ActionFailed {
                step,
                attempt: n,
                started_at,
                error,
                retry_at,
                at,
            } => {
                let late_branch = self.late_branch(def, *step, e)?;
                let has_comp = def.steps.get(*step).is_some_and(|d| d.compensation.is_some());
                let s = self.step_mut(*step)?;
                s.attempts
                    .push(attempt(Op::Action, *n, *started_at, *at, "failed", Some(error)));
                s.callback = None;
                s.error = Some(error.clone());
                // A branch whose sibling already turned the saga to compensating is not tried
                // again: its effect is unknown, so it is compensated.
                if retry_at.is_some() && !late_branch {
                    s.tries += 1;
                    // In a round, the latest backoff: no branch is called before its own (an
                    // earlier value is one already due).
                    self.retry_at = self.retry_at.max(*retry_at);
                } else {
                    s.action = ActionStatus::Uncertain;
                    s.tries = 0;
                    s.compensation = if has_comp {
                        CompensationStatus::Pending
                    } else {
                        CompensationStatus::NotNeeded
                    };
                    if !late_branch {
                        self.status = SagaStatus::Compensating;
                        self.retry_at = None;
                        self.branches_in_doubt(def, *step);
                    }
                }
            }
            SagaEvent::CompensationSucceeded {
                step,
                attempt: n,
                started_at,
                at,
            } => {
                let late = self.late_compensation(def, *step, e)?;
                let s = self.step_mut(*step)?;
                s.attempts
                    .push(attempt(Op::Compensation, *n, *started_at, *at, "succeeded", None));
                s.compensation = CompensationStatus::Succeeded;
                s.tries = 0;
                if !late {
                    self.retry_at = None;
                }
            }
            SagaEvent::CompensationFailed {
                step,
                attempt: n,
                started_at,
                error,
                retry_at,
                at,
            } => {
                let late = self.late_compensation(def, *step, e)?;
                let s = self.step_mut(*step)?;
                s.attempts
                    .push(attempt(Op::Compensation, *n, *started_at, *at, "failed", Some(error)));
                s.error = Some(error.clone());
                if retry_at.is_some() {
                    s.tries += 1;
                    if !late {
                        // In a round, the latest backoff: no branch is called before its own.
                        self.retry_at = self.retry_at.max(*retry_at);
                    }
                } else {
                    s.compensation = CompensationStatus::GaveUp;
                    s.tries = 0;
                    self.status = SagaStatus::Failed;
                    self.retry_at = None;
                }
            }
            SagaEvent::StepSkipped { step, .. } => {
                self.expect(SagaStatus::Running, e)?;
                let s = self.step_mut(*step)?;
                if s.action != ActionStatus::Pending || !s.attempts.is_empty() || s.callback.is_some() {
                    return Err(LogError(format!("StepSkipped of step {step}, which was called")));
                }
                s.action = ActionStatus::Skipped;
                s.compensation = CompensationStatus::NotNeeded;
            }
            SagaEvent::TimerStarted { step, until, .. } => {
                self.expect(SagaStatus::Running, e)?;
                let is_timer = def.steps.get(*step).is_some_and(|d| d.sleep.is_some());
                let s = self.step_mut(*step)?;
                if !is_timer || s.action != ActionStatus::Pending || s.timer.is_some() {
                    return Err(LogError(format!(
                        "TimerStarted of step {step}, which is no waiting timer"
                    )));
                }
                s.timer = Some(*until);
                self.retry_at = Some(*until);
            }
            SagaEvent::TimerFired { step, .. } => {
                self.expect(SagaStatus::Running, e)?;
                let s = self.step_mut(*step)?;
                if s.action != ActionStatus::Pending || s.timer.is_none() {
                    return Err(LogError(format!("TimerFired of step {step}, which had no timer")));
                }
                s.action = ActionStatus::Succeeded;
                s.compensation = CompensationStatus::NotNeeded;
                self.retry_at = None;
            }
            SagaEvent::ActionAccepted {
                step,
                attempt: n,
                started_at,
                until,
                ..
            } => {
                self.expect(SagaStatus::Running, e)?;
                let is_async = def.steps.get(*step).is_some_and(|d| d.callback_timeout.is_some());
                let s = self.step_mut(*step)?;
                let next = s.attempts.iter().filter(|a| a.op == Op::Action).count() as u64 + 1;
                if !is_async || s.action != ActionStatus::Pending || s.callback.is_some() || u64::from(*n) != next {
                    return Err(LogError(format!(
                        "ActionAccepted of step {step} attempt {n}, which is no pending asynchronous call"
                    )));
                }
                s.callback = Some(PendingCallback {
                    attempt: *n,
                    started_at: *started_at,
                    until: *until,
                });
                self.retry_at = None;
            }
            SagaEvent::WaitStarted {
                step, signal, until, ..
            } => {
                self.expect(SagaStatus::Running, e)?;
                let waits_for = def.steps.get(*step).and_then(|d| d.wait.as_ref()).map(|w| &w.signal);
                let s = self.step_mut(*step)?;
                if waits_for != Some(signal) || s.action != ActionStatus::Pending || s.wait_until.is_some() {
                    return Err(LogError(format!(
                        "WaitStarted of step {step}, which is no wait for {signal}"
                    )));
                }
                // No retry_at: a signal may end the wait before `until`, so the saga is looked
                // at whenever it is woken, and `until` is the row's next run.
                s.wait_until = Some(*until);
                s.waiting_for = Some(signal.clone());
            }
            SagaEvent::SignalReceived {
                step, signal, payload, ..
            } => {
                self.expect(SagaStatus::Running, e)?;
                let waits_for = def.steps.get(*step).and_then(|d| d.wait.as_ref()).map(|w| &w.signal);
                let s = self.step_mut(*step)?;
                if waits_for != Some(signal) || s.action != ActionStatus::Pending {
                    return Err(LogError(format!(
                        "SignalReceived of step {step}, which does not wait for {signal}"
                    )));
                }
                s.action = ActionStatus::Succeeded;
                s.compensation = CompensationStatus::NotNeeded;
                s.output = Some(payload.clone());
                s.wait_until = None;
                s.waiting_for = None;
                self.retry_at = None;
            }
            SagaEvent::WaitTimedOut { step, .. } => {
                self.expect(SagaStatus::Running, e)?;
                let wait = def.steps.get(*step).and_then(|d| d.wait.as_ref());
                let s = self.step_mut(*step)?;
                let (Some(wait), Some(_)) = (wait, s.wait_until) else {
                    return Err(LogError(format!("WaitTimedOut of step {step}, which was not waiting")));
                };
                if s.action != ActionStatus::Pending {
                    return Err(LogError(format!("WaitTimedOut of step {step}, which had ended")));
                }
                s.wait_until = None;
                s.waiting_for = None;
                match wait.on_timeout {
                    OnTimeout::Continue => {
                        s.action = ActionStatus::Succeeded;
                        s.compensation = CompensationStatus::NotNeeded;
                        s.output = Some(Value::Null);
                    }
                    OnTimeout::Compensate => {
                        s.action = ActionStatus::Refused;
                        s.error = Some(format!("no signal {} came in time", wait.signal));
                        self.status = SagaStatus::Compensating;
                    }
                }
                self.retry_at = None;
            }
            SagaEvent::SagaCompleted { .. } => {
                self.expect(SagaStatus::Running, e)?;
                self.status = SagaStatus::Completed;
            }
            SagaEvent::SagaCompensated { .. } => {
                self.expect(SagaStatus::Compensating, e)?;
                self.status = if self.cancelled {
                    SagaStatus::Cancelled
                } else {
                    SagaStatus::Compensated
                };
            }
            SagaEvent::SagaPaused { sequence, .. } => {
                self.operation(*sequence, SagaOperation::Pause, e)?;
                self.paused = true;
            }
            SagaEvent::SagaUnpaused { sequence, .. } => {
                self.operation(*sequence, SagaOperation::Resume, e)?;
                self.paused = false;
            }
            SagaEvent::RetryNowRequested { sequence, .. } => {
                self.operation(*sequence, SagaOperation::RetryNow, e)?;
                self.retry_at = None;
            }
            SagaEvent::SagaCancelled { sequence, .. } => {
                self.operation(*sequence, SagaOperation::Cancel, e)?;
                // The step the saga is at (a group's pending branches): it may have been called
                // with no record of it (a node that died mid-call records nothing of the call),
                // or called and not known to have failed cleanly (a transient failure waiting
                // for its retry, a 202 whose completion has not come; the engine closes a
                // pending completion URL before it records the cancel, taking a completion that
                // got in first). Either way it may have taken effect, so it is compensated:
                // behind the barrier, a compensation of a call that never landed is empty and
                // blocks that call for good. A step its `when` skips was never called.
                let current = self.steps.iter().position(|s| s.action == ActionStatus::Pending);
                let group = current.and_then(|i| def.steps.get(i)).and_then(|d| d.group.clone());
                let outputs = self.outputs();
                let at_it: Vec<bool> = (0..self.steps.len())
                    .map(|i| {
                        let d = def.steps.get(i);
                        let here = Some(i) == current
                            || (group.is_some() && d.and_then(|d| d.group.as_ref()) == group.as_ref());
                        here && d.is_some_and(|d| {
                            d.action.is_some() && d.when.as_ref().is_none_or(|w| w.holds(&self.input, &outputs))
                        })
                    })
                    .collect();
                for (i, s) in self.steps.iter_mut().enumerate() {
                    if s.action != ActionStatus::Pending {
                        continue;
                    }
                    let called = at_it[i] || s.callback.is_some() || s.attempts.iter().any(|a| a.op == Op::Action);
                    if called {
                        s.action = ActionStatus::Uncertain;
                        s.tries = 0;
                        s.compensation = if def.steps.get(i).is_some_and(|d| d.compensation.is_some()) {
                            CompensationStatus::Pending
                        } else {
                            CompensationStatus::NotNeeded
                        };
                        s.error = Some("cancelled while its outcome was unknown".into());
                    }
                    s.callback = None;
                    s.timer = None;
                    s.wait_until = None;
                    s.waiting_for = None;
                }
                self.paused = false;
                self.cancelled = true;
                self.status = SagaStatus::Compensating;
                self.retry_at = None;
            }
            SagaEvent::OperationRefused { sequence, .. } => {
                if *sequence != self.operations + 1 {
                    return Err(LogError(format!(
                        "OperationRefused of operation {sequence} after {}",
                        self.operations
                    )));
                }
                self.operations = *sequence;
            }
            SagaEvent::SagaResumed { .. } => {
                if self.status.is_terminal() {
                    return Err(LogError(format!(
                        "SagaResumed while the saga is {}",
                        self.status.as_str()
                    )));
                }
            }
            SagaEvent::SagaRetried { .. } => {
                self.expect(SagaStatus::Failed, e)?;
                for s in &mut self.steps {
                    if s.compensation == CompensationStatus::GaveUp {
                        s.compensation = CompensationStatus::Pending;
                        s.tries = 0;
                    }
                }
                self.status = SagaStatus::Compensating;
                self.retry_at = None;
            }
        }
        self.updated_at = event_time(e);
        self.log_version += 1;
        Ok(())
    }

    /// Checks operation `sequence` is the next one and applies to the saga as it is.
    fn operation(&mut self, sequence: u64, op: SagaOperation, e: &SagaEvent) -> Result<(), LogError> {
        if sequence != self.operations + 1 {
            return Err(LogError(format!(
                "{} of operation {sequence} after {}",
                e.type_name(),
                self.operations
            )));
        }
        if let Some(reason) = op.refusal(self) {
            return Err(LogError(format!("{}, but {reason}", e.type_name())));
        }
        self.operations = sequence;
        Ok(())
    }

    /// Checks an action's outcome may be recorded: the saga runs, or the step is a branch of a
    /// parallel group whose sibling's result, recorded first in the same round, already turned
    /// the saga to compensating. Answers whether it is such a late branch.
    fn late_branch(&self, def: &SagaDefinition, step: usize, e: &SagaEvent) -> Result<bool, LogError> {
        let branch = def.steps.get(step).is_some_and(|d| d.group.is_some());
        let pending = self.steps.get(step).is_some_and(|s| s.action == ActionStatus::Pending);
        if self.status == SagaStatus::Compensating && branch && pending {
            return Ok(true);
        }
        self.expect(SagaStatus::Running, e).map(|()| false)
    }

    /// Checks a compensation's result may be recorded: the saga compensates, or the step is a
    /// branch whose sibling's give-up, recorded first in the same round, already made the saga
    /// `failed`. Answers whether it is such a late branch.
    fn late_compensation(&self, def: &SagaDefinition, step: usize, e: &SagaEvent) -> Result<bool, LogError> {
        let branch = def.steps.get(step).is_some_and(|d| d.group.is_some());
        let owed = self
            .steps
            .get(step)
            .is_some_and(|s| s.compensation == CompensationStatus::Pending);
        if self.status == SagaStatus::Failed && branch && owed {
            return Ok(true);
        }
        self.expect(SagaStatus::Compensating, e).map(|()| false)
    }

    /// The saga turned to compensating at `step`: a branch of its group that failed and waits
    /// for a retry will not get it, and may have taken effect, so it is compensated too.
    fn branches_in_doubt(&mut self, def: &SagaDefinition, step: usize) {
        let Some(group) = def.steps.get(step).and_then(|d| d.group.as_ref()) else {
            return;
        };
        for (d, s) in def.steps.iter().zip(self.steps.iter_mut()) {
            if d.group.as_ref() == Some(group)
                && s.action == ActionStatus::Pending
                && s.attempts.iter().any(|a| a.op == Op::Action && a.outcome == "failed")
            {
                s.action = ActionStatus::Uncertain;
                s.tries = 0;
                s.compensation = if d.compensation.is_some() {
                    CompensationStatus::Pending
                } else {
                    CompensationStatus::NotNeeded
                };
            }
        }
    }

    fn expect(&self, status: SagaStatus, e: &SagaEvent) -> Result<(), LogError> {
        if self.status == status {
            Ok(())
        } else {
            Err(LogError(format!(
                "{} while the saga is {}",
                e.type_name(),
                self.status.as_str()
            )))
        }
    }
}

fn event_time(e: &SagaEvent) -> DateTime<Utc> {
    match e {
        SagaEvent::SagaStarted { at, .. }
        | SagaEvent::ActionSucceeded { at, .. }
        | SagaEvent::ActionRefused { at, .. }
        | SagaEvent::ActionFailed { at, .. }
        | SagaEvent::CompensationSucceeded { at, .. }
        | SagaEvent::CompensationFailed { at, .. }
        | SagaEvent::SagaCompleted { at }
        | SagaEvent::SagaCompensated { at }
        | SagaEvent::SagaRetried { at }
        | SagaEvent::SagaResumed { at }
        | SagaEvent::SagaPaused { at, .. }
        | SagaEvent::SagaUnpaused { at, .. }
        | SagaEvent::SagaCancelled { at, .. }
        | SagaEvent::RetryNowRequested { at, .. }
        | SagaEvent::OperationRefused { at, .. }
        | SagaEvent::StepSkipped { at, .. }
        | SagaEvent::TimerStarted { at, .. }
        | SagaEvent::TimerFired { at, .. }
        | SagaEvent::WaitStarted { at, .. }
        | SagaEvent::ActionAccepted { at, .. }
        | SagaEvent::SignalReceived { at, .. }
        | SagaEvent::WaitTimedOut { at, .. } => *at,
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Call this step's action or compensation; `attempt` is 1-based over the saga's life.
    Call { step: usize, op: Op, attempt: u32 },
    /// Call these branches of a parallel group at once (each as [`Decision::Call`]), and record
    /// their results together once all are back: successes first, then failures that wait for a
    /// retry, then the rest.
    CallAll(Vec<(usize, Op, u32)>),
    /// Nothing is due before this time.
    Wait(DateTime<Utc>),
    /// Record this event (it skips a step, starts or fires a timer, or ends the saga).
    Record(SagaEvent),
    /// Step `step`'s attempt `attempt` was accepted (202): look its completion up and ask
    /// [`on_callback`].
    AwaitCallback { step: usize, attempt: u32 },
    /// Wait step `step` needs signal `signal` number `sequence`: look it up and ask
    /// [`on_signal`].
    Await { step: usize, signal: String, sequence: u64 },
    /// Paused by an operator: nothing runs until it is resumed.
    Park,
    /// Terminal: nothing more to do.
    Done,
}

/// The next thing to do for a saga of `def` at time `now`.
#[must_use]
pub fn decide(def: &SagaDefinition, state: &SagaState, now: DateTime<Utc>) -> Decision {
    if state.paused && !state.status.is_terminal() {
        return Decision::Park;
    }
    if let Some(t) = state.retry_at.filter(|t| *t > now)
        && !state.status.is_terminal()
    {
        return Decision::Wait(t);
    }
    let attempt_no = |i: usize, op: Op| {
        let n = state.steps[i].attempts.iter().filter(|a| a.op == op).count();
        u32::try_from(n).unwrap_or(u32::MAX).saturating_add(1)
    };
    match state.status {
        SagaStatus::Running => match state.steps.iter().position(|s| s.action == ActionStatus::Pending) {
            // A step's condition is tested when the saga reaches it, over the input and the
            // outputs of the steps before it; the decision is recorded, so recovery replays it.
            Some(i)
                if state.steps[i].attempts.is_empty()
                    && state.steps[i].timer.is_none()
                    && state.steps[i].wait_until.is_none()
                    && state.steps[i].callback.is_none()
                    && def
                        .steps
                        .get(i)
                        .and_then(|d| d.when.as_ref())
                        .is_some_and(|w| !w.holds(&state.input, &state.outputs())) =>
            {
                Decision::Record(SagaEvent::StepSkipped { step: i, at: now })
            }
            // A timer: its end is fixed and recorded when the saga reaches it; the saga then
            // waits (the check above) and the step ends once the time has come.
            Some(i) if let Some(sleep) = def.steps.get(i).and_then(|d| d.sleep.as_ref()) => {
                match state.steps[i].timer {
                    Some(until) if until > now => Decision::Wait(until),
                    Some(_) => Decision::Record(SagaEvent::TimerFired { step: i, at: now }),
                    None => match timer_end(sleep, now, &state.id, &state.input, &state.outputs()) {
                        Ok(until) => Decision::Record(SagaEvent::TimerStarted {
                            step: i,
                            until,
                            at: now,
                        }),
                        // The time the step names is not there: no wait will bring it.
                        Err(error) => Decision::Record(SagaEvent::ActionRefused {
                            step: i,
                            attempt: 1,
                            started_at: now,
                            error,
                            at: now,
                        }),
                    },
                }
            }
            // A parallel group: its branches' conditions are tested together when the saga
            // reaches it, then every pending branch is called at once.
            Some(i) if let Some(group) = def.steps.get(i).and_then(|d| d.group.as_ref()) => {
                let branches: Vec<usize> = (i..def.steps.len())
                    .take_while(|&j| def.steps[j].group.as_ref() == Some(group))
                    .collect();
                let outputs = state.outputs();
                if let Some(&j) = branches.iter().find(|&&j| {
                    state.steps[j].action == ActionStatus::Pending
                        && state.steps[j].attempts.is_empty()
                        && def.steps[j]
                            .when
                            .as_ref()
                            .is_some_and(|w| !w.holds(&state.input, &outputs))
                }) {
                    return Decision::Record(SagaEvent::StepSkipped { step: j, at: now });
                }
                let calls: Vec<(usize, Op, u32)> = branches
                    .into_iter()
                    .filter(|&j| state.steps[j].action == ActionStatus::Pending)
                    .map(|j| (j, Op::Action, attempt_no(j, Op::Action)))
                    .collect();
                one_or_all(calls)
            }
            // An accepted call: whether its completion is there is for the caller to look up.
            Some(i) if let Some(cb) = state.steps[i].callback => Decision::AwaitCallback {
                step: i,
                attempt: cb.attempt,
            },
            // A wait: whether its signal is there is for the caller to look up.
            Some(i) if let Some(wait) = def.steps.get(i).and_then(|d| d.wait.as_ref()) => Decision::Await {
                step: i,
                signal: wait.signal.clone(),
                sequence: signal_sequence(def, state, i),
            },
            Some(i) => Decision::Call {
                step: i,
                op: Op::Action,
                attempt: attempt_no(i, Op::Action),
            },
            None => Decision::Record(SagaEvent::SagaCompleted { at: now }),
        },
        SagaStatus::Compensating => {
            // Undo in reverse order: the latest step still owing a compensation goes first.
            match state
                .steps
                .iter()
                .rposition(|s| s.compensation == CompensationStatus::Pending)
            {
                // The branches of a group owing a compensation are compensated at once.
                Some(i) if let Some(group) = def.steps.get(i).and_then(|d| d.group.as_ref()) => one_or_all(
                    state
                        .steps
                        .iter()
                        .enumerate()
                        .filter(|(j, s)| {
                            def.steps[*j].group.as_ref() == Some(group) && s.compensation == CompensationStatus::Pending
                        })
                        .map(|(j, _)| (j, Op::Compensation, attempt_no(j, Op::Compensation)))
                        .collect(),
                ),
                Some(i) => Decision::Call {
                    step: i,
                    op: Op::Compensation,
                    attempt: attempt_no(i, Op::Compensation),
                },
                None => Decision::Record(SagaEvent::SagaCompensated { at: now }),
            }
        }
        SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed | SagaStatus::Cancelled => Decision::Done,
    }
}

/// One call as [`Decision::Call`], several as [`Decision::CallAll`].
fn one_or_all(mut calls: Vec<(usize, Op, u32)>) -> Decision {
    if calls.len() == 1 {
        let (step, op, attempt) = calls.remove(0);
        Decision::Call { step, op, attempt }
    } else {
        Decision::CallAll(calls)
    }
}

/// The order a parallel round's results are recorded in: successes, then failures that wait for
/// a retry, then the rest (refusals, failures with no retry left), so the saga turns to
/// compensating once, after its siblings' results are in.
#[must_use]
pub fn round_order(e: &SagaEvent) -> u8 {
    match e {
        SagaEvent::ActionSucceeded { .. } | SagaEvent::CompensationSucceeded { .. } => 0,
        SagaEvent::ActionFailed { retry_at: Some(_), .. } | SagaEvent::CompensationFailed { retry_at: Some(_), .. } => {
            1
        }
        _ => 2,
    }
}

/// Which signal of its name wait step `step` takes (1: the first sent): the one after those the
/// wait steps before it took. A wait step skipped by its `when` takes none, so the next one for
/// the name takes its signal.
#[must_use]
pub fn signal_sequence(def: &SagaDefinition, state: &SagaState, step: usize) -> u64 {
    let Some(signal) = def.steps.get(step).and_then(|d| d.wait.as_ref()).map(|w| &w.signal) else {
        return 0;
    };
    let taken = def
        .steps
        .iter()
        .zip(&state.steps)
        .take(step)
        .filter(|(d, s)| d.wait.as_ref().is_some_and(|w| &w.signal == signal) && s.action == ActionStatus::Succeeded)
        .count();
    taken as u64 + 1
}

/// Of the wait steps for `signal`: how many took theirs, and how many can still take one (the
/// saga runs and they have not ended).
#[must_use]
pub fn signal_places(def: &SagaDefinition, state: &SagaState, signal: &str) -> (u64, u64) {
    let waits = def
        .steps
        .iter()
        .zip(&state.steps)
        .filter(|(d, _)| d.wait.as_ref().is_some_and(|w| w.signal == signal));
    let (mut taken, mut open) = (0, 0);
    for (_, s) in waits {
        match s.action {
            ActionStatus::Succeeded => taken += 1,
            ActionStatus::Pending if state.status == SagaStatus::Running => open += 1,
            _ => {}
        }
    }
    (taken, open)
}

/// A signal as the caller of [`on_signal`] found it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSignal {
    pub payload: Value,
    /// The API key that sent it.
    pub by: Option<String>,
}

/// What a wait step ([`Decision::Await`]) does, given the signal it needs if it has come: take
/// it, start waiting, go on waiting, or time out.
#[must_use]
pub fn on_signal(
    def: &SagaDefinition,
    state: &SagaState,
    step: usize,
    found: Option<FoundSignal>,
    now: DateTime<Utc>,
) -> Decision {
    let Some(wait) = def.steps.get(step).and_then(|d| d.wait.as_ref()) else {
        return Decision::Done;
    };
    if let Some(f) = found {
        return Decision::Record(SagaEvent::SignalReceived {
            step,
            signal: wait.signal.clone(),
            sequence: signal_sequence(def, state, step),
            payload: f.payload,
            by: f.by,
            at: now,
        });
    }
    match state.steps.get(step).and_then(|s| s.wait_until) {
        Some(until) if until > now => Decision::Wait(until),
        Some(_) => Decision::Record(SagaEvent::WaitTimedOut { step, at: now }),
        None => {
            let until = chrono::Duration::from_std(wait.timeout)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            Decision::Record(SagaEvent::WaitStarted {
                step,
                signal: wait.signal.clone(),
                until,
                at: now,
            })
        }
    }
}

/// What an accepted attempt ([`Decision::AwaitCallback`]) does, given its completion if it has
/// come: record it as the call's outcome, go on waiting, or, past its time, count the action
/// as uncertain (it may have taken effect) and compensate. `random` as for [`on_outcome`].
#[must_use]
pub fn on_callback(
    def: &SagaDefinition,
    state: &SagaState,
    step: usize,
    found: Option<CallOutcome>,
    now: DateTime<Utc>,
    random: f64,
) -> Decision {
    let Some(cb) = state.steps.get(step).and_then(|s| s.callback) else {
        return Decision::Done;
    };
    match found {
        Some(outcome) => {
            let call = CallResult {
                step,
                op: Op::Action,
                attempt: cb.attempt,
                started_at: cb.started_at,
                outcome,
            };
            Decision::Record(on_outcome(def, state, call, now, random))
        }
        None if cb.until > now => Decision::Wait(cb.until),
        None => Decision::Record(SagaEvent::ActionFailed {
            step,
            attempt: cb.attempt,
            started_at: cb.started_at,
            error: format!(
                "accepted (202) but no completion came in {} ms",
                (cb.until - cb.started_at).num_milliseconds()
            ),
            retry_at: None,
            at: now,
        }),
    }
}

/// A call decided by [`decide`], made, and what came of it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    pub step: usize,
    pub op: Op,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub outcome: CallOutcome,
}

/// The event that records a call's result. `random` is uniform in `[0, 1)`, for the retry jitter.
#[must_use]
pub fn on_outcome(
    def: &SagaDefinition,
    state: &SagaState,
    call: CallResult,
    now: DateTime<Utc>,
    random: f64,
) -> SagaEvent {
    let CallResult {
        step,
        op,
        attempt,
        started_at,
        outcome,
    } = call;
    let tries = state.steps.get(step).map_or(0, |s| s.tries) + 1;
    let retry_at = |policy: &super::definition::RetryPolicy| {
        (tries < policy.max_attempts)
            .then(|| now + chrono::Duration::from_std(policy.delay(tries, random)).unwrap_or(chrono::Duration::zero()))
    };
    match (op, outcome) {
        (Op::Action, CallOutcome::Accepted) if let Some(wait) = def.steps[step].callback_timeout => {
            SagaEvent::ActionAccepted {
                step,
                attempt,
                started_at,
                until: chrono::Duration::from_std(wait)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
                at: now,
            }
        }
        // Not an asynchronous step: a 202 is a 2xx like any other.
        (Op::Action, CallOutcome::Accepted) => SagaEvent::ActionSucceeded {
            step,
            attempt,
            started_at,
            output: Value::Null,
            at: now,
        },
        // A compensation carries no completion URL: a 202 is a 2xx like any other.
        (Op::Compensation, CallOutcome::Accepted) => SagaEvent::CompensationSucceeded {
            step,
            attempt,
            started_at,
            at: now,
        },
        (Op::Action, CallOutcome::Succeeded(output)) => SagaEvent::ActionSucceeded {
            step,
            attempt,
            started_at,
            output,
            at: now,
        },
        (Op::Action, CallOutcome::Refused(error)) => SagaEvent::ActionRefused {
            step,
            attempt,
            started_at,
            error,
            at: now,
        },
        (Op::Action, CallOutcome::Transient(error)) => SagaEvent::ActionFailed {
            step,
            attempt,
            started_at,
            error,
            retry_at: retry_at(&def.steps[step].retry),
            at: now,
        },
        // It took effect but cannot be used: no retry, compensate it with the rest.
        (Op::Action, CallOutcome::Unusable(error)) => SagaEvent::ActionFailed {
            step,
            attempt,
            started_at,
            error,
            retry_at: None,
            at: now,
        },
        (Op::Compensation, CallOutcome::Succeeded(_) | CallOutcome::Unusable(_)) => SagaEvent::CompensationSucceeded {
            step,
            attempt,
            started_at,
            at: now,
        },
        // A participant that refuses to compensate will refuse again: an operator must look.
        (Op::Compensation, CallOutcome::Refused(error)) => SagaEvent::CompensationFailed {
            step,
            attempt,
            started_at,
            error,
            retry_at: None,
            at: now,
        },
        (Op::Compensation, CallOutcome::Transient(error)) => SagaEvent::CompensationFailed {
            step,
            attempt,
            started_at,
            error,
            retry_at: retry_at(&def.compensation_retry),
            at: now,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::definition::{DefinitionError, DefinitionSpec, SagaLimits, StepSpec};
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn id() -> SagaId {
        SagaId::parse("s").unwrap()
    }

    fn def(steps: &[(&str, bool)], attempts: u32, comp_attempts: u32) -> SagaDefinition {
        let steps: Vec<Value> = steps
            .iter()
            .map(|(name, comp)| {
                let mut s = json!({"name": name, "action": {"method": "POST", "url": format!("http://p.local/{name}")},
                    "retry": {"max_attempts": attempts, "backoff_ms": 10, "max_backoff_ms": 100}});
                if *comp {
                    s["compensation"] = json!({"method": "POST", "url": format!("http://p.local/{name}/undo")});
                }
                s
            })
            .collect();
        let spec: DefinitionSpec = serde_json::from_value(json!({"steps": steps,
            "compensation_retry": {"max_attempts": comp_attempts, "backoff_ms": 10, "max_backoff_ms": 100}}))
        .unwrap();
        SagaDefinition::new("t", 1, spec, &SagaLimits::default()).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    /// Runs a saga to its end, answering calls from `outcomes` (then success), and returns the
    /// calls made, the events and the final state.
    fn run(
        d: &SagaDefinition,
        outcomes: impl FnMut(usize, Op) -> CallOutcome,
    ) -> (Vec<(usize, Op)>, Vec<SagaEvent>, SagaState) {
        run_with(d, json!({}), outcomes)
    }

    /// As [`run`], with the saga's input.
    fn run_with(
        d: &SagaDefinition,
        input: Value,
        mut outcomes: impl FnMut(usize, Op) -> CallOutcome,
    ) -> (Vec<(usize, Op)>, Vec<SagaEvent>, SagaState) {
        let mut now = t0();
        let started = SagaEvent::SagaStarted {
            definition: "t".into(),
            version: 1,
            input,
            at: now,
        };
        let mut events = vec![started];
        let mut state = SagaState::from_log(&id(), d, &events).unwrap();
        let mut calls = Vec::new();
        for _ in 0..10_000 {
            let decision = match decide(d, &state, now) {
                // No signal or completion ever comes in this harness: a wait runs out.
                Decision::Await { step, .. } => on_signal(d, &state, step, None, now),
                Decision::AwaitCallback { step, .. } => on_callback(d, &state, step, None, now, 0.5),
                other => other,
            };
            match decision {
                // Paused: only an operation moves it, which the caller applies.
                Decision::Done | Decision::Park => break,
                Decision::Await { .. } | Decision::AwaitCallback { .. } => unreachable!(),
                Decision::CallAll(round) => {
                    now += chrono::Duration::milliseconds(1);
                    let mut round_events: Vec<SagaEvent> = round
                        .into_iter()
                        .map(|(step, op, attempt)| {
                            calls.push((step, op));
                            let call = CallResult {
                                step,
                                op,
                                attempt,
                                started_at: now,
                                outcome: outcomes(step, op),
                            };
                            on_outcome(d, &state, call, now, 0.5)
                        })
                        .collect();
                    round_events.sort_by_key(round_order);
                    for e in round_events {
                        state.apply(d, &e).unwrap();
                        events.push(e);
                    }
                }
                Decision::Wait(t) => {
                    assert!(t > now);
                    now = t;
                }
                Decision::Record(e) => {
                    state.apply(d, &e).unwrap();
                    events.push(e);
                }
                Decision::Call { step, op, attempt } => {
                    calls.push((step, op));
                    let out = outcomes(step, op);
                    now += chrono::Duration::milliseconds(1);
                    let call = CallResult {
                        step,
                        op,
                        attempt,
                        started_at: now,
                        outcome: out,
                    };
                    let e = on_outcome(d, &state, call, now, 0.5);
                    state.apply(d, &e).unwrap();
                    events.push(e);
                }
            }
        }
        // The log alone rebuilds the same state: recovery continues where the saga was.
        assert_eq!(SagaState::from_log(&id(), d, &events).unwrap(), state);
        (calls, events, state)
    }

    #[test]
    fn given_all_steps_succeed_then_the_saga_completes_without_compensation() {
        let d = def(&[("a", true), ("b", true)], 3, 3);
        let (calls, events, state) = run(&d, |_, _| CallOutcome::Succeeded(json!({"ok": 1})));
        assert_eq!(calls, vec![(0, Op::Action), (1, Op::Action)]);
        assert_eq!(state.status, SagaStatus::Completed);
        assert!(matches!(events.last(), Some(SagaEvent::SagaCompleted { .. })));
        assert_eq!(state.steps[1].output, Some(json!({"ok": 1})));
    }

    #[test]
    fn given_a_refusal_when_compensating_then_earlier_steps_undo_in_reverse_order() {
        let d = def(&[("a", true), ("b", false), ("c", true), ("d", true)], 3, 3);
        let (calls, _, state) = run(&d, |step, op| match (step, op) {
            (3, Op::Action) => CallOutcome::Refused("no stock".into()),
            _ => CallOutcome::Succeeded(json!(null)),
        });
        // b has no compensation; d was refused, so it has nothing to undo.
        assert_eq!(
            calls,
            vec![
                (0, Op::Action),
                (1, Op::Action),
                (2, Op::Action),
                (3, Op::Action),
                (2, Op::Compensation),
                (0, Op::Compensation)
            ]
        );
        assert_eq!(state.status, SagaStatus::Compensated);
        assert_eq!(state.steps[3].action, ActionStatus::Refused);
    }

    #[test]
    fn given_transient_failures_then_retries_wait_and_exhaustion_compensates_the_uncertain_step() {
        let d = def(&[("a", true), ("b", true)], 3, 3);
        let (calls, events, state) = run(&d, |step, op| match (step, op) {
            (1, Op::Action) => CallOutcome::Transient("503".into()),
            _ => CallOutcome::Succeeded(json!(null)),
        });
        assert_eq!(
            calls,
            vec![
                (0, Op::Action),
                (1, Op::Action),
                (1, Op::Action),
                (1, Op::Action),
                (1, Op::Compensation),
                (0, Op::Compensation)
            ]
        );
        assert_eq!(state.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(state.status, SagaStatus::Compensated);
        let waits: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SagaEvent::ActionFailed { retry_at, .. } => Some(retry_at.is_some()),
                _ => None,
            })
            .collect();
        assert_eq!(waits, vec![true, true, false]);
    }

    #[test]
    fn given_a_compensation_that_keeps_failing_then_the_saga_fails_and_a_retry_resumes_it() {
        let d = def(&[("a", true), ("b", true)], 1, 2);
        let (calls, mut events, mut state) = run(&d, |step, op| match (step, op) {
            (1, Op::Action) => CallOutcome::Refused("declined".into()),
            (0, Op::Compensation) => CallOutcome::Transient("down".into()),
            _ => CallOutcome::Succeeded(json!(null)),
        });
        assert_eq!(calls.iter().filter(|c| c.1 == Op::Compensation).count(), 2);
        assert_eq!(state.status, SagaStatus::Failed);
        assert_eq!(decide(&d, &state, t0()), Decision::Done);
        let retried = SagaEvent::SagaRetried { at: t0() };
        state.apply(&d, &retried).unwrap();
        events.push(retried);
        assert_eq!(
            decide(&d, &state, t0()),
            Decision::Call {
                step: 0,
                op: Op::Compensation,
                attempt: 3
            }
        );
        assert_eq!(SagaState::from_log(&id(), &d, &events).unwrap(), state);
        // Retrying a saga that is not failed is not a valid transition.
        let d2 = def(&[("a", true)], 1, 1);
        let (_, _, mut done) = run(&d2, |_, _| CallOutcome::Succeeded(json!(null)));
        assert!(done.apply(&d2, &SagaEvent::SagaRetried { at: t0() }).is_err());
    }

    #[test]
    fn given_a_timeout_then_a_refusal_the_step_is_uncertain_and_compensated() {
        let d = def(&[("a", true), ("b", true)], 3, 3);
        let mut tries = 0;
        let (calls, _, state) = run(&d, |step, op| match (step, op) {
            (1, Op::Action) => {
                tries += 1;
                if tries == 1 {
                    CallOutcome::Transient("timeout".into())
                } else {
                    CallOutcome::Refused("out of stock".into())
                }
            }
            _ => CallOutcome::Succeeded(json!(null)),
        });
        assert_eq!(state.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(state.status, SagaStatus::Compensated);
        assert_eq!(
            calls[calls.len() - 2..],
            [(1, Op::Compensation), (0, Op::Compensation)],
            "the first attempt may still land, so b is compensated too"
        );
    }

    fn with_when(mut d: SagaDefinition, whens: &[(usize, serde_json::Value)]) -> SagaDefinition {
        let mut spec = d.spec.clone();
        for (i, w) in whens {
            spec.steps[*i].when = Some(serde_json::from_value(w.clone()).unwrap());
        }
        d = SagaDefinition::new(&d.name, d.version, spec, &SagaLimits::default()).unwrap();
        d
    }

    #[test]
    fn a_step_whose_condition_fails_is_skipped_recorded_and_never_compensated() {
        let d = with_when(
            def(&[("a", true), ("courier", true), ("c", true)], 3, 3),
            &[(1, json!("{{input.express}}"))],
        );
        // Not express: the courier is skipped; c is refused, so a is undone and the courier not.
        let (calls, events, state) = run_with(&d, json!({"express": false}), |step, op| match (step, op) {
            (2, Op::Action) => CallOutcome::Refused("no".into()),
            _ => CallOutcome::Succeeded(json!({"id": 1})),
        });
        assert_eq!(calls, vec![(0, Op::Action), (2, Op::Action), (0, Op::Compensation)]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, SagaEvent::StepSkipped { step: 1, .. }))
                .count(),
            1
        );
        assert_eq!(state.steps[1].action, ActionStatus::Skipped);
        assert_eq!(state.status, SagaStatus::Compensated);
        // Express: the courier is called, and undone with the rest.
        let (calls, _, _) = run_with(&d, json!({"express": true}), |step, op| match (step, op) {
            (2, Op::Action) => CallOutcome::Refused("no".into()),
            _ => CallOutcome::Succeeded(json!({"id": 1})),
        });
        assert_eq!(calls.iter().filter(|c| c.0 == 1).count(), 2);
        // A missing input is not truthy.
        let (calls, _, state) = run_with(&d, json!({}), |_, _| CallOutcome::Succeeded(json!(null)));
        assert_eq!(calls, vec![(0, Op::Action), (2, Op::Action)]);
        assert_eq!(state.status, SagaStatus::Completed);
    }

    #[test]
    fn conditions_read_earlier_outputs_and_test_equality_and_presence() {
        let d = with_when(
            def(&[("a", false), ("b", false), ("c", false), ("d", false)], 1, 1),
            &[
                (1, json!({"value": "{{steps.a.output.tier}}", "equals": 2})),
                (2, json!({"value": "{{steps.a.output.tier}}", "not_equals": 2})),
                (3, json!({"value": "{{steps.a.output.note}}", "present": true})),
            ],
        );
        let (calls, _, _) = run_with(&d, json!({}), |step, _| {
            CallOutcome::Succeeded(if step == 0 {
                json!({"tier": 2.0, "note": null})
            } else {
                json!(null)
            })
        });
        // 2.0 equals 2; a null note is present.
        assert_eq!(calls, vec![(0, Op::Action), (1, Op::Action), (3, Op::Action)]);
        let (calls, _, _) = run_with(&d, json!({}), |_, _| CallOutcome::Succeeded(json!({"tier": "2"})));
        assert_eq!(calls, vec![(0, Op::Action), (2, Op::Action)]);
    }

    #[test]
    fn a_condition_must_be_one_form_over_what_its_step_can_see() {
        let base = || def(&[("a", false), ("b", false)], 1, 1).spec;
        let put = |i: usize, w: serde_json::Value| {
            let mut spec = base();
            spec.steps[i].when = Some(serde_json::from_value(w)?);
            Ok::<_, serde_json::Error>(SagaDefinition::new("t", 1, spec, &SagaLimits::default()))
        };
        for (i, w) in [
            (1, json!("{{input.x}} and more")),
            (1, json!("plain")),
            (1, json!({"value": "{{input.x}}"})),
            (1, json!({"value": "{{input.x}}", "equals": 1, "present": true})),
            (1, json!("{{saga.id}}")),
            (0, json!("{{steps.a.output.x}}")),
            (1, json!("{{steps.b.output.x}}")),
            (1, json!("{{secrets.k}}")),
        ] {
            let r = put(i, w.clone()).unwrap();
            assert!(
                matches!(
                    r,
                    Err(DefinitionError::Condition { .. } | DefinitionError::Template { .. })
                ),
                "{w}: {r:?}"
            );
        }
        // An unknown member is not a condition at all.
        assert!(put(1, json!({"value": "{{input.x}}", "is": 1})).is_err());
        // `equals: null` is a test of its own, not a missing one.
        assert!(put(1, json!({"value": "{{input.x}}", "equals": null})).unwrap().is_ok());
    }

    /// `def` with step `i` turned into a timer: `sleep_ms` or `sleep_until`.
    fn with_timer(d: &SagaDefinition, i: usize, sleep: serde_json::Value) -> SagaDefinition {
        let mut spec = serde_json::to_value(&d.spec).unwrap();
        let step = spec["steps"][i].as_object_mut().unwrap();
        for k in ["action", "compensation", "retry", "timeout_ms"] {
            step.remove(k);
        }
        step.extend(sleep.as_object().unwrap().clone());
        SagaDefinition::new(
            &d.name,
            d.version,
            serde_json::from_value(spec).unwrap(),
            &SagaLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_timer_waits_holding_nothing_then_the_saga_goes_on() {
        let d = with_timer(
            &def(&[("a", true), ("cool", false), ("b", true)], 1, 1),
            1,
            json!({"sleep_ms": 60_000}),
        );
        let (calls, events, state) = run(&d, |_, _| CallOutcome::Succeeded(json!(null)));
        assert_eq!(calls, vec![(0, Op::Action), (2, Op::Action)]);
        assert_eq!(state.status, SagaStatus::Completed);
        let started = events.iter().find_map(|e| match e {
            SagaEvent::TimerStarted { step: 1, until, at } => Some((*until, *at)),
            _ => None,
        });
        let (until, at) = started.expect("TimerStarted");
        assert_eq!(until - at, chrono::Duration::seconds(60));
        let fired = events.iter().find_map(|e| match e {
            SagaEvent::TimerFired { step: 1, at } => Some(*at),
            _ => None,
        });
        assert!(fired.expect("TimerFired") >= until, "never before its time");
        // Once reached, the saga waits for the timer: nothing is due before it.
        let mut s = SagaState::from_log(&id(), &d, &events[..3]).unwrap();
        assert!(matches!(events[2], SagaEvent::TimerStarted { .. }));
        assert_eq!(decide(&d, &s, at), Decision::Wait(until));
        assert_eq!(s.retry_at, Some(until));
        s.apply(&d, &SagaEvent::SagaResumed { at }).unwrap();
        assert_eq!(
            decide(&d, &s, until - chrono::Duration::milliseconds(1)),
            Decision::Wait(until)
        );
        assert!(matches!(
            decide(&d, &s, until),
            Decision::Record(SagaEvent::TimerFired { step: 1, .. })
        ));
    }

    #[test]
    fn a_cancel_compensates_what_ran_and_ends_cancelled() {
        let d = def(&[("a", true), ("b", true), ("c", true)], 3, 1);
        let (_, events, _) = run(&d, |_, _| CallOutcome::Succeeded(json!(null)));
        // After a's success, b failed transiently and waits for its retry: its effect is unknown.
        let mut s = SagaState::from_log(&id(), &d, &events[..2]).unwrap();
        let at = s.updated_at;
        let failed = SagaEvent::ActionFailed {
            step: 1,
            attempt: 1,
            started_at: at,
            error: "503".into(),
            retry_at: Some(at + chrono::Duration::seconds(30)),
            at,
        };
        s.apply(&d, &failed).unwrap();
        assert!(matches!(decide(&d, &s, at), Decision::Wait(_)));
        let cancel = operation_event(SagaOperation::Cancel, 1, Some("k1".into()), &s, at);
        assert!(
            matches!(cancel, SagaEvent::SagaCancelled { sequence: 1, .. }),
            "{cancel:?}"
        );
        s.apply(&d, &cancel).unwrap();
        assert_eq!(s.status, SagaStatus::Compensating);
        assert_eq!(s.retry_at, None, "compensation starts now, not after b's backoff");
        assert_eq!(s.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(
            s.steps[2].action,
            ActionStatus::Pending,
            "never called: nothing to undo"
        );
        // b (uncertain) then a are compensated, and the saga ends cancelled.
        let mut calls = Vec::new();
        loop {
            match decide(&d, &s, at) {
                Decision::Call { step, op, attempt } => {
                    calls.push((step, op));
                    let e = SagaEvent::CompensationSucceeded {
                        step,
                        attempt,
                        started_at: at,
                        at,
                    };
                    assert_eq!(op, Op::Compensation);
                    s.apply(&d, &e).unwrap();
                }
                Decision::Record(e) => s.apply(&d, &e).unwrap(),
                Decision::Done => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(calls, vec![(1, Op::Compensation), (0, Op::Compensation)]);
        assert_eq!(s.status, SagaStatus::Cancelled);
        assert!(s.status.is_terminal());
        // Cancelled at a step with no attempt in its log: a node that died mid-call leaves none,
        // so the step it is at counts as called; the ones after it do not.
        let mut fresh = SagaState::from_log(&id(), &d, &events[..2]).unwrap();
        let cancel = operation_event(SagaOperation::Cancel, 1, None, &fresh, at);
        fresh.apply(&d, &cancel).unwrap();
        assert_eq!(fresh.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(fresh.steps[1].compensation, CompensationStatus::Pending);
        assert_eq!(fresh.steps[2].action, ActionStatus::Pending);
        // Anything more is refused, and recorded as refused.
        let late = operation_event(SagaOperation::Pause, 2, None, &s, at);
        assert!(matches!(late, SagaEvent::OperationRefused { .. }), "{late:?}");
        s.apply(&d, &late).unwrap();
        assert_eq!(s.operations, 2);
        // The log is the proof: the cancel, out of order or on a finished saga, does not fold.
        let mut again = s.clone();
        assert!(
            again
                .apply(
                    &d,
                    &SagaEvent::SagaCancelled {
                        sequence: 3,
                        by: None,
                        at
                    }
                )
                .is_err()
        );
        assert!(
            again
                .apply(
                    &d,
                    &SagaEvent::SagaCancelled {
                        sequence: 9,
                        by: None,
                        at
                    }
                )
                .is_err()
        );
    }

    #[test]
    fn a_paused_saga_starts_nothing_until_resumed_and_retry_now_skips_the_backoff() {
        let d = def(&[("a", true), ("b", true)], 3, 1);
        let (_, events, _) = run(&d, |_, _| CallOutcome::Succeeded(json!(null)));
        let mut s = SagaState::from_log(&id(), &d, &events[..1]).unwrap();
        let at = s.updated_at;
        let pause = operation_event(SagaOperation::Pause, 1, None, &s, at);
        s.apply(&d, &pause).unwrap();
        assert!(s.paused);
        assert_eq!(decide(&d, &s, at), Decision::Park);
        // Paused twice, or retried now while paused: refused.
        assert!(SagaOperation::Pause.refusal(&s).is_some());
        assert!(SagaOperation::RetryNow.refusal(&s).is_some());
        let resume = operation_event(SagaOperation::Resume, 2, None, &s, at);
        assert!(matches!(resume, SagaEvent::SagaUnpaused { .. }));
        s.apply(&d, &resume).unwrap();
        assert!(matches!(decide(&d, &s, at), Decision::Call { step: 0, .. }));
        // A transient failure's backoff, skipped.
        let failed = SagaEvent::ActionFailed {
            step: 0,
            attempt: 1,
            started_at: at,
            error: "503".into(),
            retry_at: Some(at + chrono::Duration::seconds(30)),
            at,
        };
        s.apply(&d, &failed).unwrap();
        assert!(matches!(decide(&d, &s, at), Decision::Wait(_)));
        let now = operation_event(SagaOperation::RetryNow, 3, None, &s, at);
        s.apply(&d, &now).unwrap();
        assert!(matches!(
            decide(&d, &s, at),
            Decision::Call {
                step: 0,
                attempt: 2,
                ..
            }
        ));
        // Resume of a saga that is not paused: refused.
        assert!(matches!(
            operation_event(SagaOperation::Resume, 4, None, &s, at),
            SagaEvent::OperationRefused { .. }
        ));
        for op in SagaOperation::ALL {
            assert_eq!(SagaOperation::parse(op.as_str()), Some(op));
        }
    }

    #[test]
    fn a_hold_goes_on_at_its_timeout_and_a_signal_ends_it_early() {
        let d = with_timer(
            &def(&[("a", true), ("hold", false), ("b", true)], 1, 1),
            1,
            json!({"wait": {"signal": "cleared", "timeout_ms": 60_000, "on_timeout": "continue"}}),
        );
        assert_eq!(
            d.steps[1].wait.as_ref().map(|w| w.on_timeout),
            Some(OnTimeout::Continue)
        );
        // No signal: the timeout ends the hold and the saga completes, nothing compensated.
        let (calls, events, state) = run(&d, |_, _| CallOutcome::Succeeded(json!(null)));
        assert_eq!(calls, vec![(0, Op::Action), (2, Op::Action)]);
        assert_eq!(state.status, SagaStatus::Completed);
        assert_eq!(state.steps[1].action, ActionStatus::Succeeded);
        assert_eq!(state.steps[1].output, Some(Value::Null));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SagaEvent::WaitTimedOut { step: 1, .. }))
        );
        // A signal before the end takes the hold's place, its body the output.
        let waiting = SagaState::from_log(&id(), &d, &events[..3]).unwrap();
        let found = FoundSignal {
            payload: json!({"by": "ops"}),
            by: None,
        };
        let Decision::Record(received) = on_signal(&d, &waiting, 1, Some(found), waiting.updated_at) else {
            panic!("a signal is taken");
        };
        let mut s = waiting.clone();
        s.apply(&d, &received).unwrap();
        assert_eq!(s.steps[1].output, Some(json!({"by": "ops"})));
        assert!(matches!(decide(&d, &s, s.updated_at), Decision::Call { step: 2, .. }));
        // The default, spelled or not, compensates; a value that is neither is refused.
        let spelled = json!({"wait": {"signal": "s", "on_timeout": "compensate"}});
        let spec: StepSpec = serde_json::from_value(json!({"name": "w", "wait": spelled["wait"]})).unwrap();
        assert_eq!(spec.wait.map(|w| w.on_timeout), Some(OnTimeout::Compensate));
        let wrong = json!({"name": "w", "wait": {"signal": "s", "on_timeout": "skip"}});
        assert!(serde_json::from_value::<StepSpec>(wrong).is_err());
    }

    #[test]
    fn a_wait_takes_its_signal_or_waits_until_its_timeout_then_compensates() {
        let d = with_timer(
            &def(&[("a", true), ("ok", false), ("b", true)], 1, 1),
            1,
            json!({"wait": {"signal": "approved", "timeout_ms": 60_000}}),
        );
        assert_eq!(d.signal_slots("approved"), 1);
        // Reached without its signal: the wait starts, and nothing is due before its end.
        let (calls, events, state) = run(&d, |_, _| CallOutcome::Succeeded(json!(null)));
        assert_eq!(calls, vec![(0, Op::Action), (0, Op::Compensation)]);
        assert_eq!(state.status, SagaStatus::Compensated);
        assert_eq!(state.steps[1].action, ActionStatus::Refused);
        assert_eq!(state.steps[1].compensation, CompensationStatus::NotNeeded);
        let (until, at) = events
            .iter()
            .find_map(|e| match e {
                SagaEvent::WaitStarted { step: 1, until, at, .. } => Some((*until, *at)),
                _ => None,
            })
            .expect("WaitStarted");
        assert_eq!(until - at, chrono::Duration::seconds(60));
        let waiting = SagaState::from_log(&id(), &d, &events[..3]).unwrap();
        assert_eq!(waiting.steps[1].waiting_for.as_deref(), Some("approved"));
        assert_eq!(waiting.retry_at, None, "a signal may end the wait at any time");
        assert_eq!(
            decide(&d, &waiting, at),
            Decision::Await {
                step: 1,
                signal: "approved".into(),
                sequence: 1
            }
        );
        assert_eq!(on_signal(&d, &waiting, 1, None, at), Decision::Wait(until));
        assert!(matches!(
            on_signal(&d, &waiting, 1, None, until),
            Decision::Record(SagaEvent::WaitTimedOut { step: 1, .. })
        ));
        // The signal comes while it waits, even at its last moment: its body is the output.
        let found = FoundSignal {
            payload: json!({"ref": 7}),
            by: Some("k".into()),
        };
        let Decision::Record(received) = on_signal(&d, &waiting, 1, Some(found.clone()), until) else {
            panic!("a signal is taken");
        };
        let mut s = waiting.clone();
        s.apply(&d, &received).unwrap();
        assert_eq!(s.steps[1].action, ActionStatus::Succeeded);
        assert_eq!(s.steps[1].output, Some(json!({"ref": 7})));
        assert_eq!(s.steps[1].waiting_for, None);
        assert!(matches!(decide(&d, &s, until), Decision::Call { step: 2, .. }));
        // A signal already there when the saga comes: taken without a wait.
        let fresh = SagaState::from_log(&id(), &d, &events[..2]).unwrap();
        assert!(matches!(
            on_signal(&d, &fresh, 1, Some(found), at),
            Decision::Record(SagaEvent::SignalReceived {
                step: 1,
                sequence: 1,
                ..
            })
        ));
        // A log that does not fit: a signal for a step that does not wait for it, a timeout of
        // a wait that never started, a second signal.
        let mut bad = fresh.clone();
        let wrong = SagaEvent::SignalReceived {
            step: 1,
            signal: "other".into(),
            sequence: 1,
            payload: json!(null),
            by: None,
            at,
        };
        assert!(bad.apply(&d, &wrong).is_err());
        assert!(bad.apply(&d, &SagaEvent::WaitTimedOut { step: 1, at }).is_err());
        let mut twice = s.clone();
        assert!(twice.apply(&d, &received).is_err());
    }

    #[test]
    fn a_wait_skipped_by_its_condition_leaves_its_signal_to_the_next_wait_for_the_name() {
        let base = def(&[("first", false), ("second", false), ("b", true)], 1, 1);
        let d = with_timer(&base, 0, json!({"wait": {"signal": "ok"}, "when": "{{input.twice}}"}));
        let d = with_timer(&d, 1, json!({"wait": {"signal": "ok"}}));
        assert_eq!(d.signal_slots("ok"), 2);
        let started = |input| SagaState::new(&id(), &d, input, t0());
        let mut once = started(json!({"twice": false}));
        assert_eq!(signal_places(&d, &once, "ok"), (0, 2), "not known yet which will run");
        let Decision::Record(skip) = decide(&d, &once, t0()) else {
            panic!("the first wait is skipped")
        };
        once.apply(&d, &skip).unwrap();
        assert_eq!(signal_places(&d, &once, "ok"), (0, 1));
        assert_eq!(
            decide(&d, &once, t0()),
            Decision::Await {
                step: 1,
                signal: "ok".into(),
                sequence: 1
            },
            "the second wait takes the first signal"
        );
        // Both run: the second takes the second signal.
        let mut twice = started(json!({"twice": true}));
        let found = FoundSignal {
            payload: json!(1),
            by: None,
        };
        let Decision::Record(e) = on_signal(&d, &twice, 0, Some(found), t0()) else {
            panic!("taken")
        };
        twice.apply(&d, &e).unwrap();
        assert_eq!(signal_places(&d, &twice, "ok"), (1, 1));
        assert!(matches!(
            decide(&d, &twice, t0()),
            Decision::Await {
                step: 1,
                sequence: 2,
                ..
            }
        ));
    }

    #[test]
    fn an_accepted_action_waits_for_its_completion_then_records_it_or_times_out_as_uncertain() {
        let sync = def(&[("a", true), ("pay", true), ("b", true)], 3, 1);
        let mut spec = serde_json::to_value(&sync.spec).unwrap();
        spec["steps"][1]["callback_timeout_ms"] = json!(3_600_000);
        let d = SagaDefinition::new("t", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default()).unwrap();
        let mut s = SagaState::new(&id(), &d, json!({}), t0());
        let ok = |step| CallResult {
            step,
            op: Op::Action,
            attempt: 1,
            started_at: t0(),
            outcome: CallOutcome::Succeeded(json!({})),
        };
        let e = on_outcome(&d, &s, ok(0), t0(), 0.5);
        s.apply(&d, &e).unwrap();
        let accepted = on_outcome(
            &d,
            &s,
            CallResult {
                outcome: CallOutcome::Accepted,
                ..ok(1)
            },
            t0(),
            0.5,
        );
        let SagaEvent::ActionAccepted { until, .. } = accepted else {
            panic!("202 is accepted: {accepted:?}")
        };
        assert_eq!(until - t0(), chrono::Duration::hours(1), "its callback_timeout_ms");
        // A step that is not asynchronous takes a 202 as done.
        let plain = on_outcome(
            &sync,
            &s,
            CallResult {
                outcome: CallOutcome::Accepted,
                ..ok(1)
            },
            t0(),
            0.5,
        );
        assert!(matches!(plain, SagaEvent::ActionSucceeded { step: 1, .. }), "{plain:?}");
        s.apply(&d, &accepted).unwrap();
        assert_eq!(s.steps[1].action, ActionStatus::Pending);
        assert_eq!(decide(&d, &s, t0()), Decision::AwaitCallback { step: 1, attempt: 1 });
        assert_eq!(on_callback(&d, &s, 1, None, t0(), 0.5), Decision::Wait(until));
        // Completed: recorded as the attempt's outcome; a transient one is retried.
        let done = on_callback(&d, &s, 1, Some(CallOutcome::Succeeded(json!({"x": 1}))), t0(), 0.5);
        assert!(matches!(
            done,
            Decision::Record(SagaEvent::ActionSucceeded {
                step: 1,
                attempt: 1,
                ..
            })
        ));
        let failed = on_callback(&d, &s, 1, Some(CallOutcome::Transient("later".into())), t0(), 0.5);
        let Decision::Record(failed) = failed else { panic!() };
        assert!(matches!(failed, SagaEvent::ActionFailed { retry_at: Some(_), .. }));
        let mut retried = s.clone();
        retried.apply(&d, &failed).unwrap();
        assert_eq!(retried.steps[1].callback, None);
        assert!(matches!(
            decide(&d, &retried, until),
            Decision::Call {
                step: 1,
                attempt: 2,
                ..
            }
        ));
        // Past its time with no completion: uncertain, so compensated with the step before.
        let Decision::Record(timeout) = on_callback(&d, &s, 1, None, until, 0.5) else {
            panic!("times out")
        };
        s.apply(&d, &timeout).unwrap();
        assert_eq!(s.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(s.status, SagaStatus::Compensating);
        assert!(matches!(
            decide(&d, &s, until),
            Decision::Call {
                step: 1,
                op: Op::Compensation,
                ..
            }
        ));
        // A second accept of the same step does not fit the log.
        let mut twice = SagaState::new(&id(), &d, json!({}), t0());
        twice.apply(&d, &e).unwrap();
        twice.apply(&d, &accepted).unwrap();
        assert!(twice.apply(&d, &accepted).is_err());
    }

    #[test]
    fn a_parallel_group_calls_its_branches_in_one_round_and_compensates_them_together() {
        let flat = def(&[("a", true), ("east", true), ("west", true), ("b", true)], 3, 1);
        let mut spec = serde_json::to_value(&flat.spec).unwrap();
        let steps = spec["steps"].as_array().unwrap().clone();
        spec["steps"] = json!([steps[0], {"name": "both", "parallel": [steps[1], steps[2]]}, steps[3]]);
        let d = SagaDefinition::new("t", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default()).unwrap();
        assert_eq!(d.steps.len(), 4, "branches are steps of their own");
        assert_eq!(d.steps[1].group.as_deref(), Some("both"));
        // All succeed: one round for the group.
        let (calls, _, state) = run(&d, |_, _| CallOutcome::Succeeded(json!({})));
        assert_eq!(state.status, SagaStatus::Completed);
        assert_eq!(calls.len(), 4);
        let mut s = SagaState::new(&id(), &d, json!({}), t0());
        let ok = on_outcome(
            &d,
            &s,
            CallResult {
                step: 0,
                op: Op::Action,
                attempt: 1,
                started_at: t0(),
                outcome: CallOutcome::Succeeded(json!({})),
            },
            t0(),
            0.5,
        );
        s.apply(&d, &ok).unwrap();
        assert_eq!(
            decide(&d, &s, t0()),
            Decision::CallAll(vec![(1, Op::Action, 1), (2, Op::Action, 1)])
        );
        // West refuses while east waits for a retry: east may have taken effect, so both the
        // group's branch and the step before are compensated, east's and a's in turn.
        let result = |step, outcome| CallResult {
            step,
            op: Op::Action,
            attempt: 1,
            started_at: t0(),
            outcome,
        };
        let mut round = vec![
            on_outcome(&d, &s, result(2, CallOutcome::Refused("no".into())), t0(), 0.5),
            on_outcome(&d, &s, result(1, CallOutcome::Transient("503".into())), t0(), 0.5),
        ];
        round.sort_by_key(round_order);
        assert!(matches!(round[0], SagaEvent::ActionFailed { step: 1, .. }), "{round:?}");
        for e in &round {
            s.apply(&d, e).unwrap();
        }
        assert_eq!(s.status, SagaStatus::Compensating);
        assert_eq!(s.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(s.steps[1].compensation, CompensationStatus::Pending);
        assert!(matches!(
            decide(&d, &s, t0()),
            Decision::Call {
                step: 1,
                op: Op::Compensation,
                ..
            }
        ));
        // Recorded in the other order (a log written so), the late branch is uncertain too.
        let mut other = SagaState::new(&id(), &d, json!({}), t0());
        other.apply(&d, &ok).unwrap();
        for e in round.iter().rev() {
            other.apply(&d, e).unwrap();
        }
        assert_eq!(other.steps[1].action, ActionStatus::Uncertain);
        assert_eq!(other.status, SagaStatus::Compensating);
        // Both branches owe a compensation: they are compensated in one round.
        let mut both = SagaState::new(&id(), &d, json!({}), t0());
        both.apply(&d, &ok).unwrap();
        let mut round = vec![
            on_outcome(&d, &both, result(1, CallOutcome::Succeeded(json!({}))), t0(), 0.5),
            on_outcome(&d, &both, result(2, CallOutcome::Succeeded(json!({}))), t0(), 0.5),
        ];
        round.sort_by_key(round_order);
        for e in &round {
            both.apply(&d, e).unwrap();
        }
        let refused = on_outcome(&d, &both, result(3, CallOutcome::Refused("no".into())), t0(), 0.5);
        both.apply(&d, &refused).unwrap();
        assert_eq!(
            decide(&d, &both, t0()),
            Decision::CallAll(vec![(1, Op::Compensation, 1), (2, Op::Compensation, 1)])
        );
        // Both compensations give up in the same round, in either order: the saga is failed
        // once, with both recorded.
        let undo = |step| CallResult {
            step,
            op: Op::Compensation,
            attempt: 1,
            started_at: t0(),
            outcome: CallOutcome::Refused("no".into()),
        };
        let gave_up = [
            on_outcome(&d, &both, undo(1), t0(), 0.5),
            on_outcome(&d, &both, undo(2), t0(), 0.5),
        ];
        for order in [[0, 1], [1, 0]] {
            let mut s = both.clone();
            for i in order {
                s.apply(&d, &gave_up[i]).unwrap();
            }
            assert_eq!(s.status, SagaStatus::Failed);
            assert_eq!(s.steps[1].compensation, CompensationStatus::GaveUp);
            assert_eq!(s.steps[2].compensation, CompensationStatus::GaveUp);
        }
        // Two branches back off differently in one round: the saga waits for the later, so
        // neither is called before its own backoff.
        let mut s = SagaState::new(&id(), &d, json!({}), t0());
        s.apply(&d, &ok).unwrap();
        let failed = |step, ms| SagaEvent::ActionFailed {
            step,
            attempt: 1,
            started_at: t0(),
            error: "503".into(),
            retry_at: Some(t0() + chrono::Duration::milliseconds(ms)),
            at: t0(),
        };
        s.apply(&d, &failed(1, 900)).unwrap();
        s.apply(&d, &failed(2, 100)).unwrap();
        assert_eq!(s.retry_at, Some(t0() + chrono::Duration::milliseconds(900)));
    }

    #[test]
    fn a_timer_until_a_time_from_the_input_and_one_without_a_time_compensates() {
        let d = with_timer(
            &def(&[("a", true), ("hold", false), ("b", true)], 1, 1),
            1,
            json!({"sleep_until": "{{input.at}}"}),
        );
        let (calls, events, state) = run_with(&d, json!({"at": "2023-11-14T23:00:00+01:00"}), |_, _| {
            CallOutcome::Succeeded(json!(null))
        });
        assert_eq!(state.status, SagaStatus::Completed);
        assert_eq!(calls.len(), 2);
        let until = events.iter().find_map(|e| match e {
            SagaEvent::TimerStarted { until, .. } => Some(*until),
            _ => None,
        });
        assert_eq!(
            until,
            Some(
                DateTime::parse_from_rfc3339("2023-11-14T22:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
        // A time already past goes on at once.
        let (_, _, state) = run_with(&d, json!({"at": "2000-01-01T00:00:00Z"}), |_, _| {
            CallOutcome::Succeeded(json!(null))
        });
        assert_eq!(state.status, SagaStatus::Completed);
        // No time, or not a time: the step is refused and the saga undoes a.
        for input in [json!({}), json!({"at": "tomorrow"})] {
            let (calls, _, state) = run_with(&d, input, |_, _| CallOutcome::Succeeded(json!(null)));
            assert_eq!(state.status, SagaStatus::Compensated);
            assert_eq!(state.steps[1].action, ActionStatus::Refused);
            assert_eq!(calls, vec![(0, Op::Action), (0, Op::Compensation)]);
        }
    }

    #[test]
    fn a_timer_is_one_kind_of_step_only() {
        let base = def(&[("a", true), ("b", true)], 1, 1);
        let put = |step: serde_json::Value| {
            let mut spec = serde_json::to_value(&base.spec).unwrap();
            spec["steps"][1] = step;
            SagaDefinition::new("t", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default())
        };
        let call = json!({"method": "POST", "url": "http://p.local/x"});
        for step in [
            json!({"name": "b"}),
            json!({"name": "b", "action": call, "sleep_ms": 5}),
            json!({"name": "b", "sleep_ms": 5, "sleep_until": "2030-01-01T00:00:00Z"}),
            json!({"name": "b", "sleep_ms": 5, "compensation": call}),
            json!({"name": "b", "sleep_ms": 5, "retry": {}}),
            json!({"name": "b", "sleep_until": "soon"}),
        ] {
            assert!(
                matches!(put(step.clone()), Err(DefinitionError::StepKind { .. })),
                "{step}"
            );
        }
        assert!(matches!(
            put(json!({"name": "b", "sleep_ms": super::super::definition::DEFAULT_MAX_SLEEP_MS + 1})),
            Err(DefinitionError::Limit(_))
        ));
        assert!(matches!(
            put(json!({"name": "b", "sleep_until": "{{steps.b.output.t}}"})),
            Err(DefinitionError::Template { .. })
        ));
        assert!(put(json!({"name": "b", "sleep_until": "{{steps.a.output.t}}", "when": "{{input.x}}"})).is_ok());
    }

    #[test]
    fn edges_of_conditions_and_timers_are_refused_or_kept_small_never_a_panic() {
        use super::super::definition::{Condition, ConditionTest, Sleep, timer_end};
        // Integers compare exactly, past what a float holds; a whole float equals its integer.
        let eq = |want: Value, got: Value| {
            Condition {
                var: "input.x".into(),
                test: ConditionTest::Equals(want),
            }
            .holds(&json!({ "x": got }), &BTreeMap::new())
        };
        assert!(!eq(json!(u64::MAX), json!(u64::MAX - 1)));
        assert!(!eq(json!(9_007_199_254_740_993_u64), json!(9_007_199_254_740_992.0)));
        assert!(eq(json!(2), json!(2.0)));
        assert!(eq(json!(-3), json!(-3.0)));
        assert!(!eq(json!(2), json!(2.5)));
        assert!(eq(json!({"a": [1, 2.0]}), json!({"a": [1.0, 2]})));
        // A sleep past the last time that can be kept refuses the step; it does not panic.
        let end = timer_end(
            &Sleep::For(std::time::Duration::from_millis(u64::MAX)),
            t0(),
            &id(),
            &json!({}),
            &BTreeMap::new(),
        );
        assert!(end.is_err());
        // A long value that is no time is quoted short in the error, which fits in an event.
        let long = "x".repeat(100_000);
        let err = timer_end(
            &Sleep::Until("{{input.at}}".into()),
            t0(),
            &id(),
            &json!({ "at": long }),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.len() < 300, "{err}");
        // Shapes a `when` cannot have are refused with what is wrong.
        for bad in [json!(5), json!(true), json!({"value": "{{input.x}}", "equal": 1})] {
            let e = serde_json::from_value::<super::super::definition::WhenSpec>(bad.clone()).unwrap_err();
            assert!(e.to_string().contains("when"), "{bad}: {e}");
        }
        // A timer has no output for a later step to read.
        let d = with_timer(
            &def(&[("a", false), ("t", false), ("b", false)], 1, 1),
            1,
            json!({"sleep_ms": 1}),
        );
        let mut spec = d.spec.clone();
        spec.steps[2].when = Some(serde_json::from_value(json!("{{steps.t.output.x}}")).unwrap());
        assert!(matches!(
            SagaDefinition::new("t", 1, spec, &SagaLimits::default()),
            Err(DefinitionError::Condition { .. } | DefinitionError::Template { .. })
        ));
    }

    #[test]
    fn a_log_that_does_not_fit_is_an_error_not_a_panic() {
        let d = def(&[("a", true)], 1, 1);
        assert!(SagaState::from_log(&id(), &d, &[]).is_err());
        let started = SagaEvent::SagaStarted {
            definition: "t".into(),
            version: 1,
            input: json!({}),
            at: t0(),
        };
        let bad_step = SagaEvent::ActionSucceeded {
            step: 9,
            attempt: 1,
            started_at: t0(),
            output: json!(null),
            at: t0(),
        };
        assert!(SagaState::from_log(&id(), &d, &[started.clone(), bad_step]).is_err());
        let early = SagaEvent::CompensationSucceeded {
            step: 0,
            attempt: 1,
            started_at: t0(),
            at: t0(),
        };
        assert!(SagaState::from_log(&id(), &d, &[started, early]).is_err());
    }

    #[test]
    fn events_round_trip_through_json() {
        let e = SagaEvent::ActionFailed {
            step: 1,
            attempt: 2,
            started_at: t0(),
            error: "x".into(),
            retry_at: Some(t0()),
            at: t0(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "ActionFailed");
        assert_eq!(serde_json::from_value::<SagaEvent>(v).unwrap(), e);
    }

    fn outcome_strategy() -> impl Strategy<Value = u8> {
        0u8..5
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn any_outcome_sequence_ends_well_formed(
            comps in proptest::collection::vec(any::<bool>(), 1..6),
            conds in proptest::collection::vec(proptest::option::of(any::<bool>()), 6),
            timers in proptest::collection::vec(any::<bool>(), 6),
            attempts in 1u32..4,
            comp_attempts in 1u32..4,
            script in proptest::collection::vec(outcome_strategy(), 0..64),
        ) {
            let names: Vec<String> = (0..comps.len()).map(|i| format!("s{i}")).collect();
            let steps: Vec<(&str, bool)> = names.iter().map(String::as_str).zip(comps.iter().copied()).collect();
            // Step i may carry `when: {{input.c<i>}}`, and the input says whether it holds.
            let whens: Vec<(usize, serde_json::Value)> = (0..comps.len())
                .filter(|&i| conds[i].is_some())
                .map(|i| (i, json!(format!("{{{{input.c{i}}}}}"))))
                .collect();
            let input: serde_json::Map<String, Value> = (0..comps.len())
                .filter_map(|i| conds[i].map(|c| (format!("c{i}"), json!(c))))
                .collect();
            let mut d = with_when(def(&steps, attempts, comp_attempts), &whens);
            for (k, t) in timers.iter().enumerate().take(comps.len()) {
                if *t {
                    d = with_timer(&d, k, json!({"sleep_ms": 50}));
                }
            }
            let mut i = 0;
            let (calls, events, state) = run_with(&d, Value::Object(input), |_, _| {
                let o = script.get(i).copied().unwrap_or(0);
                i += 1;
                match o {
                    0 => CallOutcome::Succeeded(json!(null)),
                    1 => CallOutcome::Refused("no".into()),
                    2 => CallOutcome::Transient("503".into()),
                    3 => CallOutcome::Transient("timeout".into()),
                    _ => CallOutcome::Unusable("output too large".into()),
                }
            });
            // 1. Every saga ends; failed only when a compensation exhausted its limit.
            prop_assert!(state.status.is_terminal());
            let gave_up = events.iter().any(|e| matches!(e, SagaEvent::CompensationFailed { retry_at: None, .. }));
            prop_assert_eq!(state.status == SagaStatus::Failed, gave_up);
            if state.status == SagaStatus::Completed {
                prop_assert!(state.steps.iter().all(|s| matches!(s.action, ActionStatus::Succeeded | ActionStatus::Skipped)));
                prop_assert!(calls.iter().all(|c| c.1 == Op::Action));
            }
            // A timer is never called and never compensated; it ends only after its time.
            for (k, t) in timers.iter().enumerate().take(comps.len()) {
                if *t {
                    prop_assert!(!calls.iter().any(|c| c.0 == k));
                    prop_assert!(state.steps[k].compensation == CompensationStatus::NotNeeded);
                }
            }
            for e in &events {
                if let SagaEvent::TimerFired { step, at } = e {
                    prop_assert!(state.steps[*step].timer.is_some_and(|u| u <= *at));
                }
            }
            // A step whose condition fails is skipped, never called, never compensated; a step
            // whose condition holds is never skipped.
            for (k, c) in conds.iter().enumerate().take(comps.len()) {
                let skipped = state.steps[k].action == ActionStatus::Skipped;
                prop_assert!(!(skipped && calls.iter().any(|c| c.0 == k)));
                if *c == Some(true) || c.is_none() {
                    prop_assert!(!skipped);
                }
                if *c == Some(false) && state.status == SagaStatus::Completed {
                    prop_assert!(skipped);
                }
            }
            // 2. Compensations run are those of succeeded or uncertain steps, in reverse order.
            let mut comp_order: Vec<usize> = Vec::new();
            for (step, op) in &calls {
                if *op == Op::Compensation && comp_order.last() != Some(step) {
                    comp_order.push(*step);
                }
            }
            let owed: Vec<usize> = (0..state.steps.len()).rev()
                .filter(|&i| d.steps[i].compensation.is_some()
                    && matches!(state.steps[i].action, ActionStatus::Succeeded | ActionStatus::Uncertain))
                .collect();
            if state.status == SagaStatus::Compensated {
                prop_assert_eq!(&comp_order, &owed);
            } else if state.status == SagaStatus::Failed {
                prop_assert!(owed.starts_with(&comp_order));
            }
            // 3. No action runs after its step's compensation started.
            for (k, (step, op)) in calls.iter().enumerate() {
                if *op == Op::Compensation {
                    prop_assert!(!calls[k..].iter().any(|c| c.0 == *step && c.1 == Op::Action));
                }
            }
            // Retries never exceed the policies.
            for (i, s) in d.steps.iter().enumerate() {
                let actions = calls.iter().filter(|c| **c == (i, Op::Action)).count();
                prop_assert!(actions <= s.retry.max_attempts as usize);
                let comps = calls.iter().filter(|c| **c == (i, Op::Compensation)).count();
                prop_assert!(comps <= d.compensation_retry.max_attempts as usize);
            }
        }
    }
}
