//! Saga definitions: the steps a saga runs, validated once when the definition is stored, and
//! the templates their HTTP calls are filled from when a step runs.

use chrono::{DateTime, Utc};
use concord_kernel::{InvalidSagaId, SagaId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::domain::outbound::OutboundPolicy;

/// A definition rejected at the edge. Each variant maps to one stable error code in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// A name (definition, step or saga id) outside its alphabet or length.
    #[error("invalid name: {0}")]
    Name(String),
    /// Two steps share a name.
    #[error("step name {0} appears twice")]
    DuplicateStep(String),
    /// A `{{...}}` that names nothing a step can see.
    #[error("step {step}: unknown template variable {{{{{var}}}}}: {reason}")]
    Template { step: String, var: String, reason: String },
    /// A URL that is not `http://` or `https://` with a fixed host.
    #[error("step {step}: invalid url {url}: {reason}")]
    Url { step: String, url: String, reason: String },
    /// A URL the outbound policy (`saga_allowed_hosts`) does not allow.
    #[error("step {step}: {url} may not be called: {reason}")]
    Refused { step: String, url: String, reason: String },
    /// A method other than GET, POST, PUT, PATCH, DELETE.
    #[error("step {step}: unsupported method {method}")]
    Method { step: String, method: String },
    /// A header that is malformed or that Concord sets itself.
    #[error("step {step}: invalid header {header}: {reason}")]
    Header {
        step: String,
        header: String,
        reason: String,
    },
    /// A step that is not exactly one kind (a call, `sleep_ms`, `sleep_until`), or a sleep with
    /// what only a call has.
    #[error("step {step}: {reason}")]
    StepKind { step: String, reason: String },
    /// A `when` that is not one of its forms, or that reads what its step cannot see.
    #[error("step {step}: invalid condition: {reason}")]
    Condition { step: String, reason: String },
    /// A size, count or duration beyond its configured limit.
    #[error("{0}")]
    Limit(String),
}

/// Limits on definitions and instances, all configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SagaLimits {
    pub max_steps: usize,
    pub max_definition_bytes: usize,
    pub max_input_bytes: usize,
    /// Largest participant answer kept as a step's output; a larger one is an error of the step.
    pub max_output_bytes: usize,
    pub max_attempts: u32,
    pub max_timeout_ms: u64,
    pub max_backoff_ms: u64,
    /// Longest `sleep_ms` of a timer step.
    pub max_sleep_ms: u64,
}

impl SagaLimits {
    /// No limits: for definitions already stored, which were checked when they were put and must
    /// stay loadable for their sagas even after the limits are lowered.
    pub const STORED: Self = Self {
        max_steps: usize::MAX,
        max_definition_bytes: usize::MAX,
        max_input_bytes: usize::MAX,
        max_output_bytes: usize::MAX,
        max_attempts: u32::MAX,
        max_timeout_ms: u64::MAX,
        max_backoff_ms: u64::MAX,
        max_sleep_ms: u64::MAX,
    };
}

impl Default for SagaLimits {
    fn default() -> Self {
        Self {
            max_steps: 32,
            max_definition_bytes: 64 * 1024,
            max_input_bytes: 64 * 1024,
            max_output_bytes: 64 * 1024,
            max_attempts: 100,
            max_timeout_ms: 300_000,
            max_backoff_ms: 3_600_000,
            max_sleep_ms: DEFAULT_MAX_SLEEP_MS,
        }
    }
}

/// The longest `sleep_ms` by default: 31 days.
pub const DEFAULT_MAX_SLEEP_MS: u64 = 31 * 24 * 3_600_000;

/// When and how often a call is retried, resolved: every field has its value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    #[serde(deserialize_with = "concord_kernel::json::uint")]
    pub max_attempts: u32,
    /// Delay before the second attempt; each later delay doubles, up to `max_backoff_ms`.
    #[serde(deserialize_with = "concord_kernel::json::uint")]
    pub backoff_ms: u64,
    #[serde(deserialize_with = "concord_kernel::json::uint")]
    pub max_backoff_ms: u64,
    /// Fraction (0 to 1) of each delay drawn at random and taken off, so retries spread out.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

/// A retry policy as written by the user: each field it leaves out takes the default of its
/// place ([`RetryPolicy::ACTION`] for a step, [`RetryPolicy::COMPENSATION`] for
/// `compensation_retry`), except `max_backoff_ms`, which is never below the `backoff_ms` given.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub backoff_ms: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub max_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

impl RetrySpec {
    /// The policy this spec makes with `default` filling what it leaves out.
    #[must_use]
    pub fn resolve(&self, default: RetryPolicy) -> RetryPolicy {
        // A cap given alone lowers the default delay to it, rather than refusing the pair.
        let backoff_ms = self
            .backoff_ms
            .unwrap_or(default.backoff_ms.min(self.max_backoff_ms.unwrap_or(u64::MAX)));
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(default.max_attempts),
            backoff_ms,
            max_backoff_ms: self.max_backoff_ms.unwrap_or(default.max_backoff_ms.max(backoff_ms)),
            jitter: self.jitter.unwrap_or(default.jitter),
        }
    }
}

impl From<RetryPolicy> for RetrySpec {
    fn from(p: RetryPolicy) -> Self {
        Self {
            max_attempts: Some(p.max_attempts),
            backoff_ms: Some(p.backoff_ms),
            max_backoff_ms: Some(p.max_backoff_ms),
            jitter: Some(p.jitter),
        }
    }
}

fn default_jitter() -> f64 {
    0.2
}

impl RetryPolicy {
    /// The default for actions: 3 attempts, 100 ms doubling up to 10 s.
    pub const ACTION: Self = Self {
        max_attempts: 3,
        backoff_ms: 100,
        max_backoff_ms: 10_000,
        jitter: 0.2,
    };
    /// The default for compensations: 10 attempts, 100 ms doubling up to 30 s.
    pub const COMPENSATION: Self = Self {
        max_attempts: 10,
        backoff_ms: 100,
        max_backoff_ms: 30_000,
        jitter: 0.2,
    };

    /// The delay after the `tries`-th failed attempt (1-based); `random` is uniform in `[0, 1)`.
    #[must_use]
    pub fn delay(&self, tries: u32, random: f64) -> Duration {
        let exp = tries.saturating_sub(1).min(32);
        let base = self.backoff_ms.saturating_mul(1u64 << exp).min(self.max_backoff_ms);
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let ms = (base as f64 * (1.0 - self.jitter * random.clamp(0.0, 1.0))).max(0.0) as u64;
        Duration::from_millis(ms)
    }

    fn validate(&self, what: &str, limits: &SagaLimits) -> Result<(), DefinitionError> {
        let bad = |reason: String| Err(DefinitionError::Limit(format!("{what}: {reason}")));
        if self.max_attempts == 0 || self.max_attempts > limits.max_attempts {
            return bad(format!("max_attempts must be 1 to {}", limits.max_attempts));
        }
        if self.max_backoff_ms > limits.max_backoff_ms || self.backoff_ms > self.max_backoff_ms {
            return bad(format!(
                "backoff_ms must be at most max_backoff_ms, which must be at most {}",
                limits.max_backoff_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("jitter must be between 0 and 1".into());
        }
        Ok(())
    }
}

/// An HTTP call to a participant; its strings may hold `{{...}}` templates.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCall {
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

impl std::fmt::Debug for HttpCall {
    /// Header names without their values: a filled-in call carries its secrets there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCall")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &self.body)
            .finish()
    }
}

/// One step as written by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    /// The call; a timer step has `sleep_ms` or `sleep_until` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<HttpCall>,
    /// A durable timer: the saga waits this long, holding no lease, then goes on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub sleep_ms: Option<u64>,
    /// A durable timer until a time: RFC 3339, or a template that gives one
    /// (`"{{input.ship_at}}"`). A time already past goes on at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<HttpCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub timeout_ms: Option<u64>,
    /// Runs the step only when this holds; otherwise it is skipped (and never compensated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<WhenSpec>,
    /// Waits for a signal (`POST /v1/sagas/{id}/signals/{name}`), holding no lease; its body is
    /// the step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitSpec>,
    /// A parallel group: these steps (calls) run at once; the group succeeds when all do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<Vec<StepSpec>>,
    /// Makes the action asynchronous: its calls carry a completion URL (`Concord-Callback`), and
    /// a 202 answer means the participant posts its result there within this time, after which
    /// the step counts as uncertain and the saga compensates (at most `saga_max_sleep_ms`).
    /// Without it a 202 is a 2xx like any other.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub callback_timeout_ms: Option<u64>,
}

/// A wait step as written: the signal it waits for and how long it waits at most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    pub signal: String,
    /// How long after the saga reaches the step it gives up and compensates (default and
    /// maximum: `saga_max_sleep_ms`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    pub timeout_ms: Option<u64>,
    /// What the timeout does: `compensate` (the default: the signal was needed) or `continue`
    /// (a hold: the saga goes on without the signal, the step's output `null`).
    #[serde(default, skip_serializing_if = "OnTimeout::is_default")]
    pub on_timeout: OnTimeout,
}

/// What a wait step's timeout does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step fails and the saga compensates.
    #[default]
    Compensate,
    /// The step succeeds with no output and the saga goes on: a hold a signal may end early.
    Continue,
}

impl OnTimeout {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_default(&self) -> bool {
        *self == Self::Compensate
    }
}

/// A step's condition as written: `"{{x}}"` (x is truthy), or an object naming the value and
/// one test, `{"value": "{{x}}", "equals": v}`, `"not_equals": v` or `"present": bool`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WhenSpec {
    Truthy(String),
    Test(WhenTest),
}

impl<'de> Deserialize<'de> for WhenSpec {
    /// A string is the truthy form, an object the test form (its errors named); nothing else.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Truthy(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(Self::Test)
                .map_err(|e| D::Error::custom(format!("when: {e}"))),
            _ => Err(D::Error::custom(
                "when is a template string or an object with value and one test",
            )),
        }
    }
}

/// The object form of a [`WhenSpec`]: exactly one of the tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenTest {
    pub value: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::present_value"
    )]
    pub equals: Option<Value>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::present_value"
    )]
    pub not_equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A validated condition: one variable and its test.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The variable, as in a template (`input.express`, `steps.reserve.output.split`).
    pub var: String,
    pub test: ConditionTest,
}

/// What a [`Condition`] asks of its variable's value.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionTest {
    /// Present and not `false`, `null`, `0`, `""`, `[]` or `{}`.
    Truthy,
    /// Present and equal (as JSON; `1` and `1.0` are equal).
    Equals(Value),
    /// Absent, or present and not equal.
    NotEquals(Value),
    /// Present (`true`) or absent (`false`); a `null` value is present.
    Present(bool),
}

impl Condition {
    fn new(step: &str, spec: &WhenSpec, visible: &[&str]) -> Result<Self, DefinitionError> {
        let bad = |reason: &str| {
            Err(DefinitionError::Condition {
                step: step.into(),
                reason: reason.into(),
            })
        };
        let (value, test) = match spec {
            WhenSpec::Truthy(v) => (v, ConditionTest::Truthy),
            WhenSpec::Test(t) => {
                let test = match (&t.equals, &t.not_equals, t.present) {
                    (Some(v), None, None) => ConditionTest::Equals(v.clone()),
                    (None, Some(v), None) => ConditionTest::NotEquals(v.clone()),
                    (None, None, Some(p)) => ConditionTest::Present(p),
                    _ => return bad("give exactly one of equals, not_equals or present"),
                };
                (&t.value, test)
            }
        };
        let var = match parse_template(value).as_slice() {
            [Piece::Var(var)] => (*var).to_owned(),
            _ => return bad("the value must be exactly one template, such as \"{{input.express}}\""),
        };
        check_templates(step, value, visible, false)?;
        if var == "saga.id" {
            return bad("saga.id is always present: test input or an earlier step's output");
        }
        Ok(Self { var, test })
    }

    /// Whether the step runs, given what the saga knows when it reaches it.
    #[must_use]
    pub fn holds(&self, input: &Value, outputs: &BTreeMap<String, Value>) -> bool {
        let parts: Vec<&str> = self.var.split('.').collect();
        let (root, path) = match parts.as_slice() {
            ["input", path @ ..] => (Some(input), path),
            ["steps", name, "output", path @ ..] => (outputs.get(*name), path),
            _ => (None, &[][..]),
        };
        let found = root.and_then(|root| {
            path.iter().try_fold(root, |v, p| match v {
                Value::Object(o) => o.get(*p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            })
        });
        match (&self.test, found) {
            (ConditionTest::Truthy, Some(v)) => truthy(v),
            (ConditionTest::Truthy | ConditionTest::Equals(_), None) => false,
            (ConditionTest::Equals(want), Some(v)) => json_eq(want, v),
            (ConditionTest::NotEquals(_), None) => true,
            (ConditionTest::NotEquals(want), Some(v)) => !json_eq(want, v),
            (ConditionTest::Present(p), found) => *p == found.is_some(),
        }
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A JSON number by value: an integer (a whole float included) exactly, else its float.
#[derive(PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

fn num(n: &serde_json::Number) -> Num {
    if let Some(i) = n.as_i64() {
        return Num::Int(i128::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Num::Int(i128::from(u));
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    // Whole and within the integers JSON numbers reach here: compare exactly as an integer.
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    if f.fract() == 0.0 && f.abs() < 1.8e19 && (f as i128) as f64 == f {
        return Num::Int(f as i128);
    }
    Num::Float(f)
}

/// JSON equality where numbers compare by value (`1` equals `1.0`), integers exactly.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num(x) == num(y),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// A definition as written by the user (the body of `PUT /v1/saga-definitions/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSpec {
    pub steps: Vec<StepSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_retry: Option<RetrySpec>,
}

/// How long a timer step waits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sleep {
    For(Duration),
    /// RFC 3339, or a template filled when the saga reaches the step.
    Until(String),
}

/// What a wait step waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub signal: String,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// A validated step with its defaults resolved: a call (`action`), a timer (`sleep`) or a wait
/// for a signal (`wait`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub action: Option<HttpCall>,
    pub sleep: Option<Sleep>,
    pub wait: Option<Wait>,
    pub compensation: Option<HttpCall>,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    /// An asynchronous action: how long one answered with 202 waits for its completion.
    pub callback_timeout: Option<Duration>,
    /// Runs only when this holds (none: always).
    pub when: Option<Condition>,
    /// A branch of this parallel group: it runs at once with the group's other branches.
    pub group: Option<String>,
}

/// A validated, versioned definition. Instances keep the version they started with.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaDefinition {
    pub name: String,
    pub version: u32,
    pub steps: Vec<Step>,
    pub compensation_retry: RetryPolicy,
    /// The spec it was made from, as stored.
    pub spec: DefinitionSpec,
}

/// Default step timeout when a step sets none.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Headers that carry credentials: a new definition fills them from one server-held secret.
pub const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "x-api-key", "x-auth-token"];

/// The secrets a string names (`{{secrets.<name>}}`).
fn secret_names(s: &str) -> Vec<&str> {
    parse_template(s)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => v.strip_prefix("secrets."),
            _ => None,
        })
        .collect()
}

/// A credential header's value as a new definition may write it: `{{secrets.<name>}}` alone or
/// after an auth scheme (`Bearer {{secrets.<name>}}`), nothing else that could hold plaintext.
fn is_secret_credential(value: &str) -> bool {
    let pieces = parse_template(value);
    match pieces.as_slice() {
        [Piece::Var(v)] => v.starts_with("secrets."),
        [Piece::Text(scheme), Piece::Var(v)] => {
            v.starts_with("secrets.")
                && scheme
                    .strip_suffix(' ')
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        }
        _ => false,
    }
}

/// Headers Concord sets on every participant call; a definition may not set them.
pub const RESERVED_HEADERS: &[&str] = &[
    "idempotency-key",
    "concord-saga-id",
    "concord-callback",
    "traceparent",
    "tracestate",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// Checks a definition or step name: 1–64 of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// [`DefinitionError::Name`] when it breaks the rule.
pub fn check_definition_name(name: &str) -> Result<(), DefinitionError> {
    check_name(name, 64, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
    })
}

/// A saga id that does not parse is a name outside its alphabet or length, answered as such.
impl From<InvalidSagaId> for DefinitionError {
    fn from(InvalidSagaId(id): InvalidSagaId) -> Self {
        Self::Name(format!("{id:?} must be 1 to 128 characters of the allowed alphabet"))
    }
}

fn check_step_name(name: &str) -> Result<(), DefinitionError> {
    check_name(name, 64, |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn check_name(name: &str, max: usize, ok: impl Fn(u8) -> bool) -> Result<(), DefinitionError> {
    if name.is_empty() || name.len() > max || !name.bytes().all(ok) {
        return Err(DefinitionError::Name(format!(
            "{name:?} must be 1 to {max} characters of the allowed alphabet"
        )));
    }
    Ok(())
}

impl SagaDefinition {
    /// Validates a spec: names, methods, URLs, headers, every template variable, every limit.
    ///
    /// # Errors
    /// The first problem found.
    pub fn new(name: &str, version: u32, spec: DefinitionSpec, limits: &SagaLimits) -> Result<Self, DefinitionError> {
        check_definition_name(name)?;
        let size = serde_json::to_vec(&spec).map_or(usize::MAX, |v| v.len());
        if size > limits.max_definition_bytes {
            return Err(DefinitionError::Limit(format!(
                "definition is {size} bytes, over the limit of {}",
                limits.max_definition_bytes
            )));
        }
        if spec.steps.is_empty() || spec.steps.len() > limits.max_steps {
            return Err(DefinitionError::Limit(format!(
                "a definition has 1 to {} steps",
                limits.max_steps
            )));
        }
        let compensation_retry = spec
            .compensation_retry
            .unwrap_or_default()
            .resolve(RetryPolicy::COMPENSATION);
        compensation_retry.validate("compensation_retry", limits)?;
        let mut steps: Vec<Step> = Vec::with_capacity(spec.steps.len());
        // Every name a template or a reader could mean: steps, branches and groups alike.
        let mut names = std::collections::BTreeSet::new();
        let mut claim = |n: &str| -> Result<(), DefinitionError> {
            check_step_name(n)?;
            if !names.insert(n.to_owned()) {
                return Err(DefinitionError::DuplicateStep(n.to_owned()));
            }
            Ok(())
        };
        for s in &spec.steps {
            claim(&s.name)?;
            // Only calls and waits have outputs: a timer's name is no variable.
            let earlier: Vec<String> = steps
                .iter()
                .filter(|p| p.action.is_some() || p.wait.is_some())
                .map(|p| p.name.clone())
                .collect();
            let earlier: Vec<&str> = earlier.iter().map(String::as_str).collect();
            let Some(branches) = &s.parallel else {
                steps.push(build_step(s, &earlier, limits, None)?);
                continue;
            };
            let bad = |reason: &str| DefinitionError::StepKind {
                step: s.name.clone(),
                reason: reason.to_owned(),
            };
            let alone = s.action.is_none()
                && s.sleep_ms.is_none()
                && s.sleep_until.is_none()
                && s.wait.is_none()
                && s.compensation.is_none()
                && s.retry.is_none()
                && s.timeout_ms.is_none()
                && s.callback_timeout_ms.is_none()
                && s.when.is_none();
            if !alone {
                return Err(bad("a parallel group has only its name and its branches"));
            }
            if branches.len() < 2 {
                return Err(bad("a parallel group has at least two branches"));
            }
            for b in branches {
                claim(&b.name)?;
                if b.action.is_none() || b.parallel.is_some() || b.callback_timeout_ms.is_some() {
                    return Err(DefinitionError::StepKind {
                        step: b.name.clone(),
                        reason: "a branch of a parallel group is a call (no timer, wait, group or callback_timeout_ms)"
                            .into(),
                    });
                }
                // A branch sees what came before its group, not its siblings.
                steps.push(build_step(b, &earlier, limits, Some(&s.name))?);
            }
        }
        if steps.len() > limits.max_steps {
            return Err(DefinitionError::Limit(format!(
                "a definition has 1 to {} steps, branches of parallel groups included",
                limits.max_steps
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            version,
            steps,
            compensation_retry,
            spec,
        })
    }
}

impl SagaDefinition {
    /// Every call with its step's name: actions and compensations.
    fn calls(&self) -> impl Iterator<Item = (&str, &HttpCall)> {
        self.steps.iter().flat_map(|s| {
            s.action
                .iter()
                .chain(s.compensation.as_ref())
                .map(move |c| (s.name.as_str(), c))
        })
    }

    /// The checks of a new definition against the server's secrets (a stored one was checked
    /// when it was put, so a secret changed since does not strand its sagas): credential
    /// headers take their value from one secret, every secret named is held, and each goes
    /// only to the hosts it is for.
    ///
    /// # Errors
    /// [`DefinitionError::Header`] for a credential written in plaintext,
    /// [`DefinitionError::Template`] for a secret not held or not for that host.
    pub fn check_secrets(&self, secrets: &SagaSecrets) -> Result<(), DefinitionError> {
        for (step, call) in self.calls() {
            for (header, value) in &call.headers {
                if CREDENTIAL_HEADERS.contains(&header.to_ascii_lowercase().as_str()) && !is_secret_credential(value) {
                    return Err(DefinitionError::Header {
                        step: step.into(),
                        header: header.clone(),
                        reason: "a definition is shown to every reader, so a credential comes from a server-held \
                                 secret: write {{secrets.<name>}} or <scheme> {{secrets.<name>}}"
                            .into(),
                    });
                }
                for name in secret_names(value) {
                    let bad = |reason: String| {
                        Err(DefinitionError::Template {
                            step: step.into(),
                            var: format!("secrets.{name}"),
                            reason,
                        })
                    };
                    let Some(secret) = secrets.0.get(name) else {
                        return bad("no such secret is configured on this server (saga_secrets)".into());
                    };
                    if let Err(why) = secret.binding.permits(&call.method, &call.url) {
                        return bad(why);
                    }
                }
            }
        }
        Ok(())
    }

    /// How many signals named `signal` a saga of this definition takes: one per wait step that
    /// waits for it.
    #[must_use]
    pub fn signal_slots(&self, signal: &str) -> u64 {
        self.steps
            .iter()
            .filter(|s| s.wait.as_ref().is_some_and(|w| w.signal == signal))
            .count() as u64
    }

    /// Every call's (step, URL template).
    #[must_use]
    pub fn urls(&self) -> Vec<(&str, &str)> {
        self.calls().map(|(step, c)| (step, c.url.as_str())).collect()
    }
}

/// Validates one step (or one branch of `group`) against what it can see, defaults resolved.
fn build_step(
    s: &StepSpec,
    earlier: &[&str],
    limits: &SagaLimits,
    group: Option<&str>,
) -> Result<Step, DefinitionError> {
    let retry = s.retry.unwrap_or_default().resolve(RetryPolicy::ACTION);
    retry.validate(&format!("step {} retry", s.name), limits)?;
    let timeout_ms = s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > limits.max_timeout_ms {
        return Err(DefinitionError::Limit(format!(
            "step {}: timeout_ms must be 1 to {}",
            s.name, limits.max_timeout_ms
        )));
    }
    let (sleep, wait) = check_kind(s, earlier, limits)?;
    if let Some(ms) = s.callback_timeout_ms
        && (ms == 0 || ms > limits.max_sleep_ms)
    {
        return Err(DefinitionError::Limit(format!(
            "step {}: callback_timeout_ms must be 1 to {}",
            s.name, limits.max_sleep_ms
        )));
    }
    if let Some(a) = &s.action {
        check_call(&s.name, a, earlier)?;
    }
    if let Some(c) = &s.compensation {
        // Not its own step's output: a step whose attempts ran out is compensated without one.
        // The participant knows the call by its Idempotency-Key and saga id.
        check_call(&s.name, c, earlier)?;
    }
    let when = s
        .when
        .as_ref()
        .map(|w| Condition::new(&s.name, w, earlier))
        .transpose()?;
    Ok(Step {
        name: s.name.clone(),
        action: s.action.clone(),
        sleep,
        wait,
        compensation: s.compensation.clone(),
        retry,
        timeout: Duration::from_millis(timeout_ms),
        callback_timeout: s.callback_timeout_ms.map(Duration::from_millis),
        when,
        group: group.map(str::to_owned),
    })
}

/// A step is one kind: a call, a timer or a wait; a timer or a wait has no compensation, retry
/// or timeout_ms of a call.
fn check_kind(
    s: &StepSpec,
    visible: &[&str],
    limits: &SagaLimits,
) -> Result<(Option<Sleep>, Option<Wait>), DefinitionError> {
    let bad = |reason: String| {
        Err(DefinitionError::StepKind {
            step: s.name.clone(),
            reason,
        })
    };
    let kinds = [
        s.action.is_some(),
        s.sleep_ms.is_some(),
        s.sleep_until.is_some(),
        s.wait.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return bad("a step has exactly one of action, sleep_ms, sleep_until and wait".into());
    }
    if s.action.is_some() {
        return Ok((None, None));
    }
    if s.compensation.is_some() || s.retry.is_some() || s.timeout_ms.is_some() || s.callback_timeout_ms.is_some() {
        return bad("a timer or a wait has no compensation, retry, timeout_ms or callback_timeout_ms".into());
    }
    if let Some(w) = &s.wait {
        check_signal_name(&w.signal).map_err(|_| DefinitionError::StepKind {
            step: s.name.clone(),
            reason: format!("signal {:?} must be 1 to 64 of [A-Za-z0-9_-]", w.signal),
        })?;
        let ms = w.timeout_ms.unwrap_or(limits.max_sleep_ms);
        if ms == 0 || ms > limits.max_sleep_ms {
            return Err(DefinitionError::Limit(format!(
                "step {}: wait timeout_ms must be 1 to {}",
                s.name, limits.max_sleep_ms
            )));
        }
        let wait = Wait {
            signal: w.signal.clone(),
            timeout: Duration::from_millis(ms),
            on_timeout: w.on_timeout,
        };
        return Ok((None, Some(wait)));
    }
    let sleep = match (s.sleep_ms, &s.sleep_until) {
        (Some(ms), _) => {
            if ms > limits.max_sleep_ms {
                return Err(DefinitionError::Limit(format!(
                    "step {}: sleep_ms must be at most {}",
                    s.name, limits.max_sleep_ms
                )));
            }
            Sleep::For(Duration::from_millis(ms))
        }
        (None, Some(until)) => {
            if parse_template(until).iter().any(|p| !matches!(p, Piece::Text(_))) {
                check_templates(&s.name, until, visible, false)?;
            } else if DateTime::parse_from_rfc3339(until).is_err() {
                return bad(format!("sleep_until {until:?} is neither RFC 3339 nor a template"));
            }
            Sleep::Until(until.clone())
        }
        (None, None) => unreachable!("one kind was counted above"),
    };
    Ok((Some(sleep), None))
}

/// Checks a signal name: 1–64 of `[A-Za-z0-9_-]`, like a step name.
///
/// # Errors
/// [`DefinitionError::Name`] when it breaks the rule.
pub fn check_signal_name(name: &str) -> Result<(), DefinitionError> {
    check_step_name(name)
}

/// When a timer step that the saga reaches at `now` ends.
///
/// # Errors
/// `sleep_until` that does not give an RFC 3339 time (a missing value, or other text).
pub fn timer_end(
    sleep: &Sleep,
    now: DateTime<Utc>,
    saga_id: &SagaId,
    input: &Value,
    outputs: &BTreeMap<String, Value>,
) -> Result<DateTime<Utc>, String> {
    match sleep {
        Sleep::For(d) => chrono::Duration::from_std(*d)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .ok_or_else(|| format!("sleep_ms {} ends past the last time that can be kept", d.as_millis())),
        Sleep::Until(template) => {
            let secrets = SagaSecrets::default();
            let ctx = TemplateContext {
                saga_id,
                input,
                outputs,
                secrets: &secrets,
            };
            let text = ctx.render_str(template, false).map_err(|e| e.to_string())?;
            DateTime::parse_from_rfc3339(&text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    // The value came from the input or an output: quote only its start, so the
                    // error always fits in the event that records it.
                    let shown: String = text.chars().take(64).collect();
                    let more = if text.chars().nth(64).is_some() { "..." } else { "" };
                    format!("sleep_until {shown:?}{more} is not an RFC 3339 time: {e}")
                })
        }
    }
}

fn authority(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

fn check_call(step: &str, call: &HttpCall, visible: &[&str]) -> Result<(), DefinitionError> {
    if !METHODS.contains(&call.method.as_str()) {
        return Err(DefinitionError::Method {
            step: step.into(),
            method: call.method.clone(),
        });
    }
    check_url(step, &call.url)?;
    for (name, value) in &call.headers {
        let bad = |reason: &str| {
            Err(DefinitionError::Header {
                step: step.into(),
                header: name.clone(),
                reason: reason.into(),
            })
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return bad("not a valid header name");
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return bad("Concord sets this header itself");
        }
        if value.bytes().any(|b| b.is_ascii_control()) {
            return bad("control characters in the value");
        }
        check_templates(step, value, visible, true)?;
    }
    check_templates(step, &call.url, visible, false)?;
    if let Some(body) = &call.body {
        check_json_templates(step, body, visible)?;
    }
    Ok(())
}

fn check_url(step: &str, url: &str) -> Result<(), DefinitionError> {
    let bad = |reason: &str| {
        Err(DefinitionError::Url {
            step: step.into(),
            url: url.into(),
            reason: reason.into(),
        })
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return bad("must start with http:// or https://");
    }
    let authority = authority(url);
    if authority.is_empty() {
        return bad("has no host");
    }
    if authority.contains("{{") || authority.contains('@') {
        return bad("the host must be fixed (no templates, no user info)");
    }
    if !authority
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return bad("invalid characters in the host");
    }
    if url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return bad("whitespace or control characters");
    }
    Ok(())
}

fn check_json_templates(step: &str, v: &Value, visible: &[&str]) -> Result<(), DefinitionError> {
    match v {
        Value::String(s) => check_templates(step, s, visible, false),
        Value::Array(a) => a.iter().try_for_each(|x| check_json_templates(step, x, visible)),
        Value::Object(o) => o.values().try_for_each(|x| check_json_templates(step, x, visible)),
        _ => Ok(()),
    }
}

/// Checks the variables of one string; `secrets` says whether `secrets.<name>` may be used
/// (header values only: a URL or a body may be echoed into errors, logs and outputs).
fn check_templates(step: &str, s: &str, visible: &[&str], secrets: bool) -> Result<(), DefinitionError> {
    for piece in parse_template(s) {
        let var = match piece {
            Piece::Text(_) => continue,
            Piece::Var(v) => v,
            Piece::Unclosed => {
                return Err(DefinitionError::Template {
                    step: step.into(),
                    var: s.into(),
                    reason: "a {{ without its }}".into(),
                });
            }
        };
        let bad = |reason: &str| {
            Err(DefinitionError::Template {
                step: step.into(),
                var: var.into(),
                reason: reason.into(),
            })
        };
        let parts: Vec<&str> = var.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return bad("empty path segment");
        }
        match parts.as_slice() {
            ["saga", "id"] | ["input", ..] => {}
            ["saga", ..] => return bad("the saga offers only saga.id"),
            ["steps", name, "output", ..] => {
                if !visible.contains(name) {
                    return bad("names no earlier step (a compensation may not read its own step's output)");
                }
            }
            ["steps", ..] => return bad("use steps.<name>.output[.field]"),
            ["secrets", _] if secrets => {}
            ["secrets", _] => return bad("a secret may be used in a header value only"),
            ["secrets", ..] => return bad("use secrets.<name>"),
            _ => return bad("variables start with input., steps.<name>.output, saga.id or secrets."),
        }
    }
    Ok(())
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
    Unclosed,
}

fn parse_template(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push(Piece::Unclosed);
            return out;
        };
        out.push(Piece::Var(after[..end].trim()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

/// What templates are filled from when a step runs.
pub struct TemplateContext<'a> {
    pub saga_id: &'a SagaId,
    pub input: &'a Value,
    /// Outputs of the steps that succeeded, by step name.
    pub outputs: &'a BTreeMap<String, Value>,
    /// The secrets the server holds, by name (`{{secrets.<name>}}` in header values).
    pub secrets: &'a SagaSecrets,
}

/// Credentials for participants, held by the server (its configuration), never stored in a
/// definition or a saga log; a definition names them as `{{secrets.<name>}}` in header values,
/// and each goes only to the hosts it lists.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SagaSecrets(BTreeMap<String, SagaSecret>);

#[derive(Clone, PartialEq, Eq)]
struct SagaSecret {
    value: zeroize::Zeroizing<String>,
    binding: Binding,
}

/// Where a secret may be sent: hosts (`name`, `name:port`), methods (none: any) and a path
/// prefix (`/` by default). A prefix matches whole segments: `/pay` covers `/pay` and `/pay/x`,
/// not `/payroll`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretBinding {
    pub hosts: Vec<String>,
    pub methods: Vec<String>,
    pub path_prefix: Option<String>,
}

impl From<Vec<String>> for SecretBinding {
    /// Bound to hosts only: any method, any path.
    fn from(hosts: Vec<String>) -> Self {
        Self {
            hosts,
            ..Self::default()
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Binding {
    hosts: OutboundPolicy,
    methods: Vec<String>,
    path_prefix: String,
}

impl Binding {
    /// Whether a call of `method` to `url` may carry the secret; why not otherwise.
    fn permits(&self, method: &str, url: &str) -> Result<(), String> {
        if !self.hosts.binds(url) {
            return Err(format!("this secret is not for {} (its hosts)", authority(url)));
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return Err(format!("this secret is not for {method} (its methods)"));
        }
        let path = url::Url::parse(url).map(|u| u.path().to_owned()).unwrap_or_default();
        let prefix = self.path_prefix.as_str();
        let under = path == prefix
            || (path.starts_with(prefix) && (prefix.ends_with('/') || path[prefix.len()..].starts_with('/')));
        if !under {
            return Err(format!("this secret is not for path {path} (its path_prefix {prefix})"));
        }
        Ok(())
    }
}

/// Replaces a secret's value wherever a participant's answer repeats it.
const REDACTED: &str = "[secret]";

impl SagaSecrets {
    /// From (name, value, binding) triples.
    ///
    /// # Errors
    /// A name outside `A-Z a-z 0-9 _ -`, an empty value, an empty host list (a secret for every
    /// host would go wherever a definition sends it), an unknown method or a path prefix that
    /// does not start with `/`.
    pub fn new(secrets: impl IntoIterator<Item = (String, String, SecretBinding)>) -> Result<Self, String> {
        let mut out = BTreeMap::new();
        for (name, value, binding) in secrets {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("saga secret name {name:?}: use A-Z a-z 0-9 _ -"));
            }
            if value.is_empty() {
                return Err(format!("saga secret {name}: empty value"));
            }
            if binding.hosts.is_empty() {
                return Err(format!("saga secret {name}: list the hosts it may be sent to"));
            }
            let hosts = OutboundPolicy::new("saga_secrets.hosts", &binding.hosts)
                .map_err(|e| format!("saga secret {name}: {e}"))?;
            let methods: Vec<String> = binding.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
            if let Some(m) = methods.iter().find(|m| !METHODS.contains(&m.as_str())) {
                return Err(format!("saga secret {name}: unknown method {m}"));
            }
            let path_prefix = binding.path_prefix.unwrap_or_else(|| "/".to_owned());
            if !path_prefix.starts_with('/') {
                return Err(format!("saga secret {name}: path_prefix must start with /"));
            }
            out.insert(
                name,
                SagaSecret {
                    value: zeroize::Zeroizing::new(value),
                    binding: Binding {
                        hosts,
                        methods,
                        path_prefix,
                    },
                },
            );
        }
        Ok(Self(out))
    }

    /// Checks a filled-in call against the bindings of the secrets its template names, at every
    /// call: the secrets' configuration may have changed since the definition was put.
    ///
    /// # Errors
    /// The first secret the call may not carry, and why.
    pub fn check_call(&self, template: &HttpCall, call: &HttpCall) -> Result<(), String> {
        for value in template.headers.values() {
            for name in secret_names(value) {
                if let Some(secret) = self.0.get(name) {
                    secret
                        .binding
                        .permits(&call.method, &call.url)
                        .map_err(|why| format!("secret {name}: {why}"))?;
                }
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// `s` with every secret value replaced by `[secret]`: what a participant answers is kept
    /// in the saga log, and an answer may echo what it was sent.
    #[must_use]
    pub fn redact(&self, s: &str) -> String {
        // Longest first, so a secret inside another does not leave the rest of that one.
        let mut values: Vec<&str> = self.0.values().map(|v| v.value.as_str()).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.into_iter().fold(s.to_owned(), |s, v| s.replace(v, REDACTED))
    }

    /// [`Self::redact`] over every string of a JSON value, keys included.
    #[must_use]
    pub fn redact_json(&self, v: Value) -> Value {
        if self.0.is_empty() {
            return v;
        }
        match v {
            Value::String(s) => Value::String(self.redact(&s)),
            Value::Array(a) => Value::Array(a.into_iter().map(|x| self.redact_json(x)).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, x)| (self.redact(&k), self.redact_json(x)))
                    .collect(),
            ),
            other => other,
        }
    }
}

impl std::fmt::Debug for SagaSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The names only: a secret's value is never printed.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A template that cannot be filled at run time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingValue {
    /// The variable has no value (an output lacks the field).
    #[error("template variable {{{{{0}}}}} has no value")]
    Missing(String),
    /// The server holds no secret of that name (its configuration changed since the
    /// definition was put); a node configured with it can make the call.
    #[error("secret {0} is not configured on this node")]
    Secret(String),
    /// A value of `.` or `..` in a URL would climb the participant's path.
    #[error("template variable {{{{{0}}}}} is a dot segment, not allowed in a URL")]
    DotSegment(String),
}

impl TemplateContext<'_> {
    fn lookup(&self, var: &str) -> Result<Value, MissingValue> {
        let missing = || MissingValue::Missing(var.to_owned());
        let parts: Vec<&str> = var.split('.').collect();
        let (root, path) = match parts.as_slice() {
            ["saga", "id"] => return Ok(Value::String(self.saga_id.as_str().to_owned())),
            ["input", path @ ..] => (self.input, path),
            ["steps", name, "output", path @ ..] => (self.outputs.get(*name).ok_or_else(missing)?, path),
            ["secrets", name] => {
                return self
                    .secrets
                    .0
                    .get(*name)
                    .map(|v| Value::String(v.value.as_str().to_owned()))
                    .ok_or_else(|| MissingValue::Secret((*name).to_owned()));
            }
            _ => return Err(missing()),
        };
        let mut v = root;
        for p in path {
            v = match v {
                Value::Object(o) => o.get(*p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .ok_or_else(missing)?;
        }
        Ok(v.clone())
    }

    /// Fills a string. `encode` percent-encodes every substituted value (for URLs).
    ///
    /// # Errors
    /// A variable without a value.
    pub fn render_str(&self, s: &str, encode: bool) -> Result<String, MissingValue> {
        let mut out = String::with_capacity(s.len());
        for piece in parse_template(s) {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => {
                    let text = match self.lookup(v)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if encode {
                        if text == "." || text == ".." {
                            return Err(MissingValue::DotSegment(v.to_owned()));
                        }
                        percent_encode(&text, &mut out);
                    } else {
                        out.push_str(&text);
                    }
                }
                Piece::Unclosed => out.push_str("{{"),
            }
        }
        Ok(out)
    }

    /// Fills a JSON body: a string that is one whole `{{x}}` takes x's JSON value (keeping its
    /// type); other strings are filled as text.
    ///
    /// # Errors
    /// A variable without a value.
    pub fn render_json(&self, v: &Value) -> Result<Value, MissingValue> {
        Ok(match v {
            Value::String(s) => match parse_template(s).as_slice() {
                [Piece::Var(var)] => self.lookup(var)?,
                _ => Value::String(self.render_str(s, false)?),
            },
            Value::Array(a) => Value::Array(a.iter().map(|x| self.render_json(x)).collect::<Result<_, _>>()?),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.render_json(x)?)))
                    .collect::<Result<_, MissingValue>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Fills a whole call.
    ///
    /// # Errors
    /// A variable without a value.
    pub fn render_call(&self, call: &HttpCall) -> Result<HttpCall, MissingValue> {
        Ok(HttpCall {
            method: call.method.clone(),
            url: self.render_str(&call.url, true)?,
            headers: call
                .headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), self.render_str(v, false)?)))
                .collect::<Result<_, MissingValue>>()?,
            body: call.body.as_ref().map(|b| self.render_json(b)).transpose()?,
        })
    }
}

fn percent_encode(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> DefinitionSpec {
        serde_json::from_value(v).unwrap()
    }

    fn two_steps() -> Value {
        json!({"steps": [
            {"name": "reserve", "action": {"method": "POST", "url": "http://inv.local/reserve",
              "body": {"sku": "{{input.sku}}", "qty": "{{input.qty}}"}},
             "compensation": {"method": "POST", "url": "http://inv.local/release/{{saga.id}}"}},
            {"name": "charge", "action": {"method": "POST", "url": "http://pay.local/charge",
              "headers": {"X-Order": "{{saga.id}}"}, "body": {"reservation": "{{steps.reserve.output.id}}"}},
             "compensation": {"method": "POST", "url": "http://pay.local/refund/{{steps.reserve.output.id}}"},
             "retry": {"max_attempts": 5, "backoff_ms": 10, "max_backoff_ms": 100}, "timeout_ms": 500}
        ]})
    }

    #[test]
    fn a_valid_definition_resolves_defaults() {
        let d = SagaDefinition::new("order", 1, spec(two_steps()), &SagaLimits::default()).unwrap();
        assert_eq!(d.steps.len(), 2);
        assert_eq!(d.steps[0].retry, RetryPolicy::ACTION);
        assert_eq!(d.steps[0].timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(d.steps[1].retry.max_attempts, 5);
        assert_eq!(d.steps[1].timeout, Duration::from_millis(500));
        assert_eq!(d.compensation_retry, RetryPolicy::COMPENSATION);
    }

    #[test]
    fn a_retry_policy_takes_the_defaults_of_its_place_for_what_it_leaves_out() {
        let mut v = two_steps();
        v["steps"][0]["retry"] = json!({"max_attempts": 7});
        v["steps"][1]["retry"] = json!({"backoff_ms": 20_000});
        v["compensation_retry"] = json!({"jitter": 0.0});
        let d = SagaDefinition::new("order", 1, spec(v.clone()), &SagaLimits::default()).unwrap();
        assert_eq!(
            d.steps[0].retry,
            RetryPolicy {
                max_attempts: 7,
                ..RetryPolicy::ACTION
            }
        );
        // The default cap (10 s) is below the delay given: the cap rises to it.
        assert_eq!(
            d.steps[1].retry,
            RetryPolicy {
                backoff_ms: 20_000,
                max_backoff_ms: 20_000,
                ..RetryPolicy::ACTION
            }
        );
        assert_eq!(
            d.compensation_retry,
            RetryPolicy {
                jitter: 0.0,
                ..RetryPolicy::COMPENSATION
            }
        );
        // An empty policy is the default; a cap given below the delay is still refused.
        v["steps"][0]["retry"] = json!({});
        let d = SagaDefinition::new("order", 1, spec(v.clone()), &SagaLimits::default()).unwrap();
        assert_eq!(d.steps[0].retry, RetryPolicy::ACTION);
        v["steps"][0]["retry"] = json!({"backoff_ms": 500, "max_backoff_ms": 100});
        assert!(matches!(
            SagaDefinition::new("order", 1, spec(v.clone()), &SagaLimits::default()),
            Err(DefinitionError::Limit(_))
        ));
        // A cap given alone lowers the default delay to it.
        v["steps"][0]["retry"] = json!({"max_backoff_ms": 50});
        let d = SagaDefinition::new("order", 1, spec(v.clone()), &SagaLimits::default()).unwrap();
        assert_eq!((d.steps[0].retry.backoff_ms, d.steps[0].retry.max_backoff_ms), (50, 50));
        // What the user wrote is what is stored: no default is written into the spec.
        v["steps"][0]["retry"] = json!({"max_attempts": 7});
        let d = SagaDefinition::new("order", 1, spec(v.clone()), &SagaLimits::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&d.spec).unwrap()["steps"][0]["retry"],
            json!({"max_attempts": 7})
        );
    }

    #[test]
    fn each_kind_of_bad_definition_is_named() {
        let l = SagaLimits::default();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = two_steps();
            f(&mut v);
            SagaDefinition::new("order", 1, spec(v), &l).unwrap_err()
        };
        assert!(matches!(
            with(&|v| v["steps"][1]["name"] = json!("reserve")),
            DefinitionError::DuplicateStep(_)
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["method"] = json!("TRACE")),
            DefinitionError::Method { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["url"] = json!("ftp://x/y")),
            DefinitionError::Url { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["url"] = json!("http://{{input.host}}/y")),
            DefinitionError::Url { .. }
        ));
        // A step may not read the output of a later step, nor of itself in its action.
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["body"] = json!({"x": "{{steps.charge.output.id}}"})),
            DefinitionError::Template { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["body"] = json!({"x": "{{steps.reserve.output}}"})),
            DefinitionError::Template { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][1]["compensation"]["url"] = json!("http://p/{{steps.charge.output.id}}")),
            DefinitionError::Template { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["body"] = json!({"x": "{{env.HOME}}"})),
            DefinitionError::Template { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][0]["action"]["body"] = json!({"x": "{{input.a"})),
            DefinitionError::Template { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][1]["action"]["headers"] = json!({"Idempotency-Key": "x"})),
            DefinitionError::Header { .. }
        ));
        assert!(matches!(
            with(&|v| v["steps"][1]["retry"]["max_attempts"] = json!(0)),
            DefinitionError::Limit(_)
        ));
        assert!(matches!(
            with(&|v| v["steps"][1]["timeout_ms"] = json!(10_000_000)),
            DefinitionError::Limit(_)
        ));
        assert!(matches!(
            with(&|v| v["steps"][1]["name"] = json!("bad name")),
            DefinitionError::Name(_)
        ));
        assert!(matches!(with(&|v| v["steps"] = json!([])), DefinitionError::Limit(_)));
        let tight = SagaLimits { max_steps: 1, ..l };
        assert!(matches!(
            SagaDefinition::new("order", 1, spec(two_steps()), &tight),
            Err(DefinitionError::Limit(_))
        ));
        assert!(SagaDefinition::new("bad/name", 1, spec(two_steps()), &l).is_err());
    }

    #[test]
    fn templates_fill_values_keeping_json_types_and_encoding_urls() {
        let input = json!({"sku": "a b/c", "qty": 3});
        let mut outputs = BTreeMap::new();
        outputs.insert("reserve".to_owned(), json!({"id": "r/1"}));
        let ctx = TemplateContext {
            saga_id: &SagaId::parse("s1").unwrap(),
            input: &input,
            outputs: &outputs,
            secrets: &SagaSecrets::default(),
        };
        let d = SagaDefinition::new("order", 1, spec(two_steps()), &SagaLimits::default()).unwrap();
        let a = ctx.render_call(d.steps[0].action.as_ref().unwrap()).unwrap();
        assert_eq!(a.body, Some(json!({"sku": "a b/c", "qty": 3})));
        let c = ctx.render_call(d.steps[1].compensation.as_ref().unwrap()).unwrap();
        assert_eq!(c.url, "http://pay.local/refund/r%2F1");
        let b = ctx.render_call(d.steps[1].action.as_ref().unwrap()).unwrap();
        assert_eq!(b.headers["X-Order"], "s1");
        assert_eq!(ctx.render_str("n={{ input.qty }}!", false).unwrap(), "n=3!");
        assert_eq!(
            ctx.render_str("{{input.missing}}", false),
            Err(MissingValue::Missing("input.missing".into()))
        );
        let dots = serde_json::json!({"id": ".."});
        let ctx = TemplateContext {
            saga_id: &SagaId::parse("s1").unwrap(),
            input: &dots,
            outputs: &outputs,
            secrets: &SagaSecrets::default(),
        };
        assert_eq!(
            ctx.render_str("http://x/orders/{{input.id}}/cancel", true),
            Err(MissingValue::DotSegment("input.id".into()))
        );
    }

    #[test]
    fn credentials_come_from_server_secrets_filled_in_header_values_only() {
        let l = SagaLimits::default();
        let secrets = SagaSecrets::new([
            (
                "pay".to_owned(),
                "s3cr3t".to_owned(),
                vec!["pay.local".to_owned()].into(),
            ),
            (
                "inv".to_owned(),
                "other-s3cr3t".to_owned(),
                vec!["inv.local:8080".to_owned()].into(),
            ),
        ])
        .unwrap();
        let with_headers = |headers: Value, url: &str| {
            let mut v = two_steps();
            v["steps"][1]["action"]["headers"] = headers;
            v["steps"][1]["action"]["url"] = json!(url);
            SagaDefinition::new("order", 1, spec(v), &l)
        };
        let checked = |headers: Value, url: &str| with_headers(headers, url).and_then(|d| d.check_secrets(&secrets));
        let ok = with_headers(
            json!({"Authorization": "Bearer {{secrets.pay}}"}),
            "http://pay.local/charge",
        )
        .unwrap();
        ok.check_secrets(&secrets).unwrap();
        checked(json!({"X-Api-Key": "{{ secrets.pay }}"}), "http://pay.local:9/charge").unwrap();
        // A credential written into the definition would be stored and shown in plaintext, in
        // whole or in part.
        for plain in [
            "Bearer abc",
            "Bearer {{input.token}}",
            "Bearer real {{secrets.pay}}",
            "{{input.a}}{{secrets.pay}}",
            "Bearer {{secrets.pay}} x",
        ] {
            assert!(
                matches!(
                    checked(json!({"authorization": plain}), "http://pay.local/charge"),
                    Err(DefinitionError::Header { .. })
                ),
                "{plain}"
            );
        }
        assert!(matches!(
            checked(json!({"Proxy-Authorization": "Basic xyz"}), "http://pay.local/charge"),
            Err(DefinitionError::Header { .. })
        ));
        // A secret the server does not hold, or one for another host, is refused.
        for (headers, url) in [
            (json!({"X-Key": "{{secrets.nope}}"}), "http://pay.local/charge"),
            (json!({"X-Key": "{{secrets.pay}}"}), "http://evil.example/charge"),
            (json!({"X-Key": "{{secrets.inv}}"}), "http://inv.local:9090/charge"),
        ] {
            assert!(
                matches!(checked(headers.clone(), url), Err(DefinitionError::Template { .. })),
                "{headers} {url}"
            );
        }
        checked(json!({"X-Key": "{{secrets.inv}}"}), "http://inv.local:8080/charge").unwrap();
        // Nowhere but header values: a URL or a body is echoed into errors and outputs.
        assert!(matches!(
            with_headers(json!({}), "http://pay.local/charge?k={{secrets.pay}}"),
            Err(DefinitionError::Template { .. })
        ));
        let mut body = two_steps();
        body["steps"][0]["action"]["body"] = json!({"key": "{{secrets.pay}}"});
        assert!(matches!(
            SagaDefinition::new("order", 1, spec(body), &l),
            Err(DefinitionError::Template { .. })
        ));
        assert!(matches!(
            with_headers(json!({"X-Key": "{{secrets.a.b}}"}), "http://pay.local/charge"),
            Err(DefinitionError::Template { .. })
        ));

        assert_eq!(
            format!("{secrets:?}"),
            r#"{"inv", "pay"}"#,
            "Debug shows names, never values"
        );
        let (input, outputs) = (json!({}), BTreeMap::from([("reserve".to_owned(), json!({"id": "r1"}))]));
        let ctx = TemplateContext {
            saga_id: &SagaId::parse("s1").unwrap(),
            input: &input,
            outputs: &outputs,
            secrets: &secrets,
        };
        let call = ctx.render_call(ok.steps[1].action.as_ref().unwrap()).unwrap();
        assert_eq!(call.headers["Authorization"], "Bearer s3cr3t");
        assert!(!format!("{call:?}").contains("s3cr3t"), "{call:?}");
        // The stored spec still names the secret, not its value.
        assert_eq!(
            ok.steps[1].action.as_ref().unwrap().headers["Authorization"],
            "Bearer {{secrets.pay}}"
        );
        // An answer that repeats a secret is kept without it.
        assert_eq!(
            secrets.redact_json(json!({"seen": ["Bearer s3cr3t"], "other-s3cr3t": 1})),
            json!({"seen": ["Bearer [secret]"], "[secret]": 1})
        );
        let none = SagaSecrets::default();
        let ctx = TemplateContext { secrets: &none, ..ctx };
        assert_eq!(
            ctx.render_call(ok.steps[1].action.as_ref().unwrap()),
            Err(MissingValue::Secret("pay".into()))
        );
        for bad in [
            ("", "v", vec!["h".to_owned()]),
            ("a b", "v", vec!["h".to_owned()]),
            ("n", "", vec!["h".to_owned()]),
            ("n", "v", vec![]),
        ] {
            assert!(
                SagaSecrets::new([(bad.0.to_owned(), bad.1.to_owned(), bad.2.clone().into())]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_secret_goes_only_with_its_methods_and_under_its_path_prefix() {
        let binding = SecretBinding {
            hosts: vec!["pay.local".into()],
            methods: vec!["post".into()],
            path_prefix: Some("/pay".into()),
        };
        let secrets = SagaSecrets::new([("pay".to_owned(), "s3cr3t".to_owned(), binding)]).unwrap();
        let template = HttpCall {
            method: "POST".into(),
            url: "http://pay.local/pay/{{input.id}}".into(),
            headers: [("authorization".to_owned(), "Bearer {{secrets.pay}}".to_owned())].into(),
            body: None,
        };
        let call = |method: &str, url: &str| HttpCall {
            method: method.into(),
            url: url.into(),
            ..template.clone()
        };
        assert!(
            secrets
                .check_call(&template, &call("POST", "http://pay.local/pay/1"))
                .is_ok()
        );
        assert!(
            secrets
                .check_call(&template, &call("POST", "http://pay.local/pay"))
                .is_ok()
        );
        for (method, url) in [
            ("GET", "http://pay.local/pay/1"),
            ("POST", "http://pay.local/payroll"),
            ("POST", "http://pay.local/pay/../admin"),
            ("POST", "http://other.local/pay/1"),
            ("POST", "http://pay.local.evil/pay/1"),
        ] {
            assert!(
                secrets.check_call(&template, &call(method, url)).is_err(),
                "{method} {url}"
            );
        }
        let bad = |b: SecretBinding| SagaSecrets::new([("n".to_owned(), "v".to_owned(), b)]).is_err();
        assert!(bad(SecretBinding {
            hosts: vec!["h".into()],
            methods: vec!["TRACE".into()],
            path_prefix: None
        }));
        assert!(bad(SecretBinding {
            hosts: vec!["h".into()],
            methods: Vec::new(),
            path_prefix: Some("pay".into())
        }));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_only_shortens() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff_ms: 100,
            max_backoff_ms: 1000,
            jitter: 0.5,
        };
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay(5, 0.0), Duration::from_millis(1000));
        assert_eq!(p.delay(40, 0.0), Duration::from_millis(1000));
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(50));
    }

    #[test]
    fn saga_ids_follow_their_alphabet() {
        let check = |id: &str| SagaId::parse(id).map_err(DefinitionError::from);
        assert!(check("order-42:retry_1.a").is_ok());
        assert!(check("").is_err());
        assert!(check("a/b").is_err());
        assert!(check(&"x".repeat(129)).is_err());
        assert_eq!(
            check("a/b"),
            Err(DefinitionError::Name(
                r#""a/b" must be 1 to 128 characters of the allowed alphabet"#.into()
            ))
        );
    }
}
