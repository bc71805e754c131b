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
    #[schema(pattern = r"^[A-Za-z0-9_.-]+$", min_length = 1, max_length = 64)]
    pub name: String,
    /// Base URL (`http://` or `https://`, on the server's `tx_allowed_hosts` when it has any):
    /// phase 1 posts to `{url}/prepare`, phase 2 to `{url}/commit` or `{url}/abort`.
    #[schema(
        pattern = r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?(:[1-9][0-9]{0,4})?(/[A-Za-z0-9._~%/-]*)?$",
        max_length = 2048
    )]
    pub url: String,
    /// Sent with the prepare; at most the server's `tx_max_payload_bytes`.
    #[serde(default)]
    #[schema(value_type = crate::schema::StorableJson)]
    pub payload: Value,
}

/// The body of `POST /v1/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginTxBody {
    /// At least one, names unique; at most the server's `tx_max_participants`.
    #[schema(min_items = 1)]
    pub participants: Vec<ParticipantIn>,
    /// How long prepare answers are awaited; a participant silent until then aborts the
    /// transaction. At most the server's `tx_max_timeout_ms`.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "concord_kernel::json::uint")]
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
