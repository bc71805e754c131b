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
    pub definition: String,
    #[serde(default)]
    pub input: Value,
    /// A caller-chosen id (1–128 of letters, digits and `-_.:`); a UUID by default. Starting an
    /// existing id again returns that saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// `pending`, `succeeded`, `refused` or `uncertain` (attempts ran out).
    pub action: String,
    /// `not_needed`, `pending`, `succeeded` or `gave_up`.
    pub compensation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: Vec<AttemptOut>,
}

/// A saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SagaOut {
    pub id: String,
    pub definition: String,
    pub version: u32,
    /// `running`, `compensating`, `completed`, `compensated` or `failed`.
    pub status: String,
    pub input: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the next attempt is due, while one waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Each step with its attempts (empty in lists).
    #[serde(default)]
    pub steps: Vec<StepOut>,
}

/// A page of `GET /v1/sagas`; pass `next` as `after` for the following page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SagaPage {
    pub sagas: Vec<SagaOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}
