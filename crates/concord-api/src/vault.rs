//! The tokenization vault's API.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// One value of `POST /v1/vault/tokenize`: its `type` is `card` (Luhn checked), `ssn`, `email`,
/// `phone` or `generic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeItemIn {
    #[serde(rename = "type")]
    #[schema(inline, value_type = crate::schema::ValueType)]
    pub kind: String,
    /// Valid for its type (a card number passing the Luhn check, ...); at most the server's
    /// `vault_max_value_bytes`.
    #[schema(min_length = 1)]
    pub value: String,
    /// `random` (default), `uuid`, or `last4` (cards only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, value_type = Option<crate::schema::TokenFormat>)]
    pub format: Option<String>,
    /// The same type, format, subject and value give the same token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergent: Option<bool>,
    /// Whose data this is: each subject has its own data key, so it can be erased. 1–200 bytes
    /// without control characters or `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[ -.0-~]+$", min_length = 1, max_length = 200)]
    pub subject: Option<String>,
    /// Seconds after which the token stops revealing and is purged; at most the server's
    /// `vault_max_ttl_s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "concord_kernel::json::opt_uint"
    )]
    #[schema(minimum = 1)]
    pub ttl_s: Option<u64>,
    /// A JSON object kept in plain beside the token (never put sensitive data here); at most the
    /// server's `vault_max_metadata_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::StorableObject>)]
    pub metadata: Option<Value>,
}

/// The body of `POST /v1/vault/tokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeBody {
    /// At least one; at most the server's `vault_max_batch`.
    #[schema(min_items = 1)]
    pub items: Vec<TokenizeItemIn>,
}

/// The answer of `POST /v1/vault/tokenize`: one token per item, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tokenized {
    pub tokens: Vec<String>,
}

/// The body of `POST /v1/vault/detokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeBody {
    /// At least one; at most the server's `vault_max_batch`. Each 1–64 of `A-Z a-z 0-9 _ -`.
    #[schema(min_items = 1, value_type = Vec<crate::schema::TokenText>)]
    pub tokens: Vec<String>,
    /// `plain` (default) or `masked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, value_type = Option<crate::schema::Reveal>)]
    pub reveal: Option<String>,
}

/// One item of a detokenize answer: the value, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DetokenizedItem {
    pub token: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// `not_found`, `expired`, `erased` (the subject was erased) or `corrupted` (the record failed
    /// authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `POST /v1/vault/detokenize`, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Detokenized {
    pub items: Vec<DetokenizedItem>,
}

/// The body of `PUT /v1/vault/rules/{category}`: JSON pointers into the events' `data`, each with
/// a type (`"/email": "email"`) or a type and a format (`"/card/number": {"type": "card",
/// "format": "last4"}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesBody {
    #[schema(value_type = Object)]
    pub fields: Map<String, Value>,
}

/// The rules of a category, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RulesOut {
    pub category: String,
    #[schema(value_type = Object)]
    pub fields: Value,
}

/// The answer of `POST /v1/vault/keys/rotate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RotatedOut {
    /// The master key version data keys are wrapped by now.
    pub master_key_version: u32,
    /// How many data keys this rotation re-wrapped (one per subject, plus the default one).
    pub rewrapped: u64,
}

/// The answer of `DELETE /v1/vault/subjects/{subject}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErasedOut {
    pub subject: String,
    /// False when the subject had no data key (nothing to erase, or erased before).
    pub erased: bool,
}
