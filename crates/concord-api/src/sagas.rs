//! Saga definitions and instances.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A stored definition version (the answer of `PUT` and `GET /v1/saga-definitions/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DefinitionOut {
    pub name: String,
    pub version: u32,
    /// The definition as it was put: `{"steps": [...], "compensation_retry"?: {...}}`.
    pub definition: Value,
    pub created_at: DateTime<Utc>,
}

/// The body of `POST /v1/sagas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSagaBody {
    /// The definition's name; its latest version runs, and the saga keeps that version.
    #[schema(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
    pub definition: String,
    /// What the steps' templates read as `{{input.x}}`; at most the server's `saga_max_input_bytes`.
    #[serde(default)]
    #[schema(value_type = crate::schema::StorableJson)]
    pub input: Value,
    /// A caller-chosen id (1–128 of letters, digits and `-_.:`); a UUID by default. Starting an
    /// existing id again returns that saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9_.:-]+$", min_length = 1, max_length = 128)]
    pub id: Option<String>,
}

/// One call to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptOut {
    /// `action` or `compensation`.
    pub op: String,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// `succeeded`, `refused` or `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One step of a saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepOut {
    pub name: String,
    /// `pending`, `succeeded`, `refused`, `uncertain` (attempts ran out) or `skipped` (its
    /// `when` did not hold).
    pub action: String,
    /// `not_needed`, `pending`, `succeeded` or `gave_up`.
    pub compensation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: Vec<AttemptOut>,
    /// A wait step the saga has reached: the signal it waits for, while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// When a reached timer ends, when a reached wait gives up, or when an accepted (202)
    /// action's completion is due at the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// A saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SagaOut {
    pub id: String,
    pub definition: String,
    pub version: u32,
    /// `running`, `compensating`, `completed`, `compensated`, `failed` or `cancelled`.
    pub status: String,
    pub input: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the next attempt is due, while one waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// An operator paused it: no attempt starts until a resume (its status stays `running` or
    /// `compensating`). Shown by `GET /v1/sagas/{id}`; lists, which read no log, leave it out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Each step with its attempts (empty in lists).
    #[serde(default)]
    pub steps: Vec<StepOut>,
    /// The participant host the saga waits for, spending no attempt, while that host's breaker
    /// is not closed: its limits and breaker. Shown by `GET /v1/sagas/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_host: Option<ParticipantHostOut>,
}

/// The body of `PUT /v1/participant-limits/{host}`: what every node together sends the host.
/// A limit left out (or null) is no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParticipantLimitsIn {
    /// Calls out at once, from all nodes together.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_concurrency: Option<u32>,
    /// Calls started per second, from all nodes together, spaced evenly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.001, maximum = 1_000_000)]
    pub max_per_s: Option<f64>,
}

/// A participant host's flow control: its limits, its `Retry-After` hold and its breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ParticipantHostOut {
    /// As allow-lists write it: `payments` (every port) or `payments:8082`.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_s: Option<f64>,
    /// `closed`, `open` or `half_open` (one probe is out).
    pub breaker: String,
    /// Consecutive failures counted toward the breaker.
    pub failures: u32,
    /// How many times the breaker opened.
    pub opened: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<DateTime<Utc>>,
    /// When the open breaker lets a probe out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until: Option<DateTime<Utc>>,
    /// No call before this: the host answered `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<DateTime<Utc>>,
    /// Calls out now, counted while a concurrency limit is set (or a probe is out).
    pub in_flight: u32,
}

/// `GET /v1/participant-limits`: every host with limits or breaker state, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ParticipantHostPage {
    pub participants: Vec<ParticipantHostOut>,
}

/// A page of `GET /v1/sagas`; pass `next` as `after` for the following page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SagaPage {
    pub sagas: Vec<SagaOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The body of `PUT /v1/saga-definitions/{name}`: the steps in order, each a call and, when it
/// can be undone, its compensation. Strings of a call may hold `{{input.x}}`,
/// `{{steps.<earlier step>.output.x}}`, `{{saga.id}}` and, in header values,
/// `{{secrets.<name>}}` templates (see the README); the schema admits literal text only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefinitionIn {
    /// At least one; at most the server's `saga_max_steps`.
    #[schema(min_items = 1)]
    pub steps: Vec<StepIn>,
    /// How compensations are retried (default 10 attempts, 100 ms doubling to 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_retry: Option<RetryIn>,
}

/// One step of a saga definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepIn {
    /// Unique in the definition.
    #[schema(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
    pub name: String,
    /// The call. A step has exactly one of `action`, `sleep_ms`, `sleep_until` and `wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<CallIn>,
    /// A durable timer: the saga waits this long (no lease held, no worker busy), then goes on.
    /// A timer has no compensation, retry or timeout.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub sleep_ms: Option<u64>,
    /// A durable timer until a time: RFC 3339, or one template that gives it
    /// (`{{input.ship_at}}`). A time already past goes on at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 2048)]
    pub sleep_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallIn>,
    /// How the action is retried (default 3 attempts, 100 ms doubling to 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryIn>,
    /// How long one attempt may take (default 5 s).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
    /// Runs the step only when this holds when the saga reaches it; otherwise the step is
    /// skipped, and never compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<WhenIn>,
    /// Waits for a signal (`POST /v1/sagas/{id}/signals/{signal}`), holding no lease; the
    /// signal's body is the step's output. A wait has no compensation, retry or timeout_ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitIn>,
    /// A parallel group: these calls (two or more, each with its own name) run at once; the
    /// group succeeds when all do. On a failure the branches that succeeded or are uncertain are
    /// compensated at once, then the steps before in reverse. A group has only its name and
    /// its branches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(no_recursion)]
    pub parallel: Option<Vec<StepIn>>,
    /// Makes the action asynchronous: its calls carry `Concord-Callback`, and a 202 answer
    /// means the participant posts its result there within this time (at most
    /// `saga_max_sleep_ms`); then the step is uncertain and compensated.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    #[schema(minimum = 1)]
    pub callback_timeout_ms: Option<u64>,
}

/// A wait step: the signal it takes and how long it waits for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitIn {
    /// The signal's name. Each wait step for a name takes one signal of it, in step order; a
    /// signal sent before the saga reaches its step is kept for it.
    #[schema(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
    pub signal: String,
    /// Time from reaching the step until the saga gives up and compensates (default and
    /// maximum: the server's `saga_max_sleep_ms`, 31 days).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
}

/// The body a participant posts to the completion URL (`Concord-Callback`) of an action it
/// answered with 202: `{"outcome": "succeeded", "output"?: ...}`, `{"outcome": "refused",
/// "error": "..."}` (it took no effect: the saga compensates) or `{"outcome": "failed",
/// "error": "..."}` (whether it took effect is unknown: the step is uncertain and compensated).
/// `output` goes only with `succeeded`, `error` only with the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionIn {
    #[schema(inline)]
    pub outcome: CompletionOutcome,
    /// With `succeeded`: the step's output, for later templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::StorableJson>)]
    pub output: Option<Value>,
    /// With `refused` or `failed`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How an accepted action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompletionOutcome {
    Succeeded,
    Refused,
    Failed,
}

/// The answer of a completion: it is recorded, and the saga goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionOut {
    pub saga_id: String,
    pub step: String,
    pub attempt: u32,
}

/// The answer of an operation on a saga (`POST /v1/sagas/{id}/cancel`, `/pause`, `/resume`,
/// `/retry-now`): it is kept, and the saga records it in its log at its next look for operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OperationOut {
    pub saga_id: String,
    /// `cancel`, `pause`, `resume` or `retry-now`.
    pub operation: String,
    /// Which operation of the saga it is (1: the first).
    pub sequence: u64,
}

/// A saga's status, as a batch filters by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatusIn {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
    Cancelled,
}

impl SagaStatusIn {
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
        [
            Self::Running,
            Self::Compensating,
            Self::Completed,
            Self::Compensated,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// What a batch does to each saga it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchActionIn {
    Cancel,
    Pause,
    Resume,
    /// As `POST /v1/sagas/{id}/retry`: a failed saga's compensations run again.
    Retry,
}

impl BatchActionIn {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Retry => "retry",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Cancel, Self::Pause, Self::Resume, Self::Retry]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// Which sagas a batch acts on; every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchFilterIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SagaStatusIn>,
    /// A definition's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Started before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_before: Option<DateTime<Utc>>,
    /// Started after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_after: Option<DateTime<Utc>>,
}

/// The body of `POST /v1/saga-batches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchIn {
    #[serde(default)]
    pub filter: BatchFilterIn,
    pub action: BatchActionIn,
    /// Only count the sagas the filter matches now.
    #[serde(default)]
    pub dry_run: bool,
}

/// A dry run's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchCountOut {
    pub matched: u64,
}

/// A batch and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchOut {
    pub id: String,
    pub action: BatchActionIn,
    pub filter: BatchFilterIn,
    /// `running` or `finished`.
    pub status: String,
    /// Sagas matched so far; of them, those the action applied to and those it did not apply
    /// to (finished meanwhile, or not in a state it applies to).
    pub matched: u64,
    pub applied: u64,
    pub refused: u64,
    /// The last saga id done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The answer of `POST /v1/sagas/{id}/signals/{signal}`: the signal is kept for the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SignalOut {
    pub saga_id: String,
    pub signal: String,
    /// Which signal of this name it is (1: the first): the wait step for that name, in step
    /// order, takes it.
    pub sequence: u64,
}

/// A step's condition over the input and earlier outputs: `"{{input.express}}"` (the value is
/// present and not `false`, `null`, `0`, `""`, `[]` or `{}`), or an object with the value and
/// exactly one test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum WhenIn {
    /// Exactly one template.
    Truthy(String),
    Test(WhenTestIn),
}

/// The object form of a condition: `value` and one of `equals`, `not_equals`, `present`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenTestIn {
    /// Exactly one template, such as `{{steps.quote.output.tier}}`.
    #[schema(pattern = r"^\{\{[^{}]+\}\}$")]
    pub value: String,
    /// Present and equal (numbers by value: `1` equals `1.0`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::present_value"
    )]
    #[schema(value_type = Option<crate::schema::StorableJson>)]
    pub equals: Option<Value>,
    /// Absent, or present and not equal.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::present_value"
    )]
    #[schema(value_type = Option<crate::schema::StorableJson>)]
    pub not_equals: Option<Value>,
    /// Present (`true`, a `null` value included) or absent (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// An HTTP call to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallIn {
    #[schema(inline)]
    pub method: CallMethod,
    /// `http://` or `https://` with a fixed host (on the server's `saga_allowed_hosts` when it
    /// has any); templates may fill the path and the query.
    #[schema(
        pattern = r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?(:[1-9][0-9]{0,4})?(/[A-Za-z0-9._~%/-]*)?$",
        max_length = 2048
    )]
    pub url: String,
    /// Headers Concord sets itself (`Idempotency-Key`, `Concord-Saga-Id`, `traceparent`, `Host`,
    /// ...) cannot be set; a credential header's value must be a `{{secrets.<name>}}`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The JSON body; a string that is exactly one template takes the value's JSON type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::StorableJson>)]
    pub body: Option<Value>,
}

/// The methods a participant call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum CallMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// When and how often a call is retried. A field left out takes the default of its place: for a
/// step's `retry` 3 attempts, 100 ms doubling up to 10 s; for `compensation_retry` 10 attempts,
/// 100 ms doubling up to 30 s; jitter 0.2. A `max_backoff_ms` left out is never below the
/// `backoff_ms` given.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryIn {
    /// Attempts in all, the first included.
    #[schema(minimum = 1)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt; each later delay doubles, up to `max_backoff_ms`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub backoff_ms: Option<u64>,
    /// At least `backoff_ms`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub max_backoff_ms: Option<u64>,
    /// Fraction of each delay drawn at random and taken off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.2)]
    pub jitter: Option<f64>,
}
