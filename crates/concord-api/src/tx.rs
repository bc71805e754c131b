//! Two-phase commit: the coordinator's API and the messages it sends to participants.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// One participant of `POST /v1/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParticipantIn {
    /// 1–64 of `[A-Za-z0-9_.-]`, unique in the transaction.
    pub name: String,
    /// Base URL: phase 1 posts to `{url}/prepare`, phase 2 to `{url}/commit` or `{url}/abort`.
    pub url: String,
    #[serde(default)]
    pub payload: Value,
}

/// The body of `POST /v1/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginTxBody {
    pub participants: Vec<ParticipantIn>,
    /// How long prepare answers are awaited; a participant silent until then aborts the transaction.
    pub timeout_ms: u64,
}

/// The answer of `POST /v1/transactions`, given once the decision is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TxDecision {
    pub xid: String,
    /// `committed` or `aborted`.
    pub outcome: String,
}

/// One participant as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ParticipantOut {
    pub name: String,
    pub url: String,
    /// `commit`, `abort`, or none (no answer before the decision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<String>,
    /// When it acknowledged phase 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<DateTime<Utc>>,
}

/// `GET /v1/transactions/{xid}`. An unknown xid answers `aborted` with `presumed: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TxOut {
    pub xid: String,
    /// `committed`, `aborted`, or none while undecided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// True when the coordinator has no record of the xid (presumed abort).
    #[serde(default)]
    pub presumed: bool,
    /// True while a phase-2 message is still unacknowledged (or the decision not yet made).
    #[serde(default)]
    pub pending: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub participants: Vec<ParticipantOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// A page of `GET /v1/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TxPage {
    pub transactions: Vec<TxOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What the coordinator posts to `{url}/prepare`: answer 200 to vote commit (the work is then
/// prepared durably), 409 to vote abort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrepareMessage {
    pub xid: String,
    #[serde(default)]
    pub payload: Value,
}

/// What the coordinator posts to `{url}/commit` or `{url}/abort`; answer 2xx once done
/// (idempotently: a repeat, or an abort of an unknown xid, also answers 2xx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PhaseTwoMessage {
    pub xid: String,
}
