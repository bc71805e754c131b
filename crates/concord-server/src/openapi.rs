//! The OpenAPI document of the whole API, served at `GET /v1/openapi.json`.
//!
//! Each operation is declared once, on its handler (`#[utoipa::path]`: method, path, the scope
//! it needs as its `security`, its own answers), and registered with axum and the document
//! together (`routes::declared`). What every route of a kind answers is added here once
//! ([`finish`]): the authentication, idempotency, body and store answers, each error as
//! `application/problem+json`. The limits the settings make configurable are written into the
//! schemas, so the document says what this server enforces.

use concord_api::Problem;
use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventOut, EventsPage};
use concord_api::keys::{CreateKeyBody, CreatedKey, Health};
use concord_api::sagas::{AttemptOut, DefinitionOut, SagaOut, SagaPage, StartSagaBody, StepOut};
use concord_api::tx::{BeginTxBody, ParticipantIn, ParticipantOut, TxDecision, TxOut, TxPage};
use concord_api::vault::{
    DetokenizeBody, Detokenized, DetokenizedItem, ErasedOut, RotatedOut, RulesBody, RulesOut, TokenizeBody,
    TokenizeItemIn, Tokenized,
};
use concord_core::domain::Scope;
use concord_core::domain::saga::definition::{CREDENTIAL_HEADERS, RESERVED_HEADERS};
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::config::Settings;
use crate::scopes::required_scopes;

/// The document's frame: its title, the bearer scheme, the schemas every route shares.
#[derive(OpenApi)]
#[openapi(
    info(title = "Concord", description = "Data consistency across microservices: event store, sagas, 2PC, vault. \
        Every /v1 route needs `Authorization: Bearer <key>`; the scope an operation needs is its security requirement's \
        role. Errors are application/problem+json with a stable `code`."),
    components(schemas(Problem, AppendBody, EventInput, AppendResponse, EventOut, EventsPage, CheckpointBody,
                       CreateKeyBody, CreatedKey, Health, DefinitionOut, StartSagaBody, SagaOut, SagaPage, StepOut,
                       AttemptOut, BeginTxBody, ParticipantIn, TxDecision, TxOut, ParticipantOut, TxPage,
                       TokenizeBody, TokenizeItemIn, Tokenized, DetokenizeBody, Detokenized, DetokenizedItem,
                       RulesBody, RulesOut, RotatedOut, ErasedOut)),
    modifiers(&BearerAuth),
    tags((name = "events"), (name = "sagas"), (name = "transactions"), (name = "vault"), (name = "keys"), (name = "system"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The media type of every error.
const PROBLEM_JSON: &str = "application/problem+json";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The served document: the declared operations with what every route of a kind answers, and
/// the settings' limits.
#[must_use]
pub fn finish(declared: &utoipa::openapi::OpenApi, settings: &Settings) -> Value {
    // A document of strings, numbers and maps always serializes.
    let mut doc = serde_json::to_value(declared).unwrap_or_default();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            for method in METHODS {
                if let Some(op) = item.get_mut(method) {
                    add_common_answers(path, method, op);
                    problems_are_problem_json(op);
                    event_streams_are_framed(op);
                }
            }
        }
    }
    let missing = apply_limits(&mut doc, settings);
    // Every limit has its schema (a test builds the document in debug).
    debug_assert!(missing.is_empty(), "limits with no schema to hold them: {missing:?}");
    doc
}

fn add_common_answers(path: &str, method: &str, op: &mut Value) {
    let scopes = required_scopes(op);
    let has_body = op.get("requestBody").is_some();
    let has_params = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(|p| p["in"] == "query" || p["in"] == "path"));
    let mutating = method != "get";
    let mut answers: Vec<(&str, &str)> = Vec::new();
    if scopes.is_some() {
        answers.push(("401", "unauthorized: no API key, or an unknown or revoked one"));
        if scopes.as_ref().is_some_and(|s| !s.is_empty()) {
            answers.push(("403", "forbidden: the key lacks the scope this operation needs"));
        }
        answers.push((
            "429",
            "too_many_concurrent_requests: this key has max_concurrent_requests_per_key requests in progress; see Retry-After",
        ));
    }
    answers.push((
        "503",
        "request_timed_out: the request took over request_timeout_ms; see Retry-After",
    ));
    // Every route but the metrics asks a database: the store itself, or the key store behind
    // authentication.
    if path != "/metrics" {
        answers.push((
            "503",
            "store_unavailable: the database failed or is unreachable; retry with backoff",
        ));
    }
    if has_body {
        answers.push(("400", "malformed_json: the body is not the JSON this operation takes"));
        answers.push(("413", "body_too_large: over the server's body limit"));
        answers.push(("415", "unsupported_media_type: the body is not application/json"));
    }
    if has_params {
        answers.push(("400", "invalid_parameter: a path or query parameter out of its range"));
    }
    if mutating {
        answers.push(("400", "invalid_idempotency_key"));
        answers.push((
            "409",
            "idempotency_key_in_flight: the first request with this key still runs; see Retry-After",
        ));
        answers.push(("413", "payload_too_large: over what the idempotency layer buffers"));
        answers.push(("422", "idempotency_key_reused: the key was used with another request"));
        answers.push((
            "500",
            "idempotency_response_not_stored: the request ran, its answer could not be kept",
        ));
        answers.push(("503", "idempotency_store_unavailable: the request did not run; retry"));
        add_idempotency_header(op);
    }
    answers.push((
        "500",
        "internal: a bug; nothing was written that a retry would duplicate",
    ));
    let responses = op
        .as_object_mut()
        .map(|o| o.entry("responses").or_insert_with(|| json!({})));
    let Some(responses) = responses.and_then(Value::as_object_mut) else {
        return;
    };
    for (status, description) in answers {
        let answer = responses.entry(status).or_insert_with(|| json!({"description": ""}));
        let text = answer["description"].as_str().unwrap_or_default().to_owned();
        answer["description"] = Value::String(if text.is_empty() {
            description.to_owned()
        } else {
            format!("{text}; {description}")
        });
    }
}

fn add_idempotency_header(op: &mut Value) {
    let header = json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "Makes a retry safe: the first request's answer is replayed (Idempotent-Replayed: true). \
            Scoped per API key.",
        "schema": {"type": "string", "pattern": "^[!-~]+$", "minLength": 1, "maxLength": 255},
    });
    if let Some(o) = op.as_object_mut() {
        let params = o.entry("parameters").or_insert_with(|| json!([]));
        if let Some(list) = params.as_array_mut() {
            list.push(header);
        }
    }
}

/// Every error answer is a problem document.
fn problems_are_problem_json(op: &mut Value) {
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for (status, answer) in responses.iter_mut() {
        if status.as_str() >= "400" {
            answer["content"] = json!({PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}});
        }
    }
}

/// A `text/event-stream` answer is a sequence of events whose `data` is the declared JSON: the
/// schema describes one event (`id`, `event`, `data` holding the JSON as text).
fn event_streams_are_framed(op: &mut Value) {
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for answer in responses.values_mut() {
        if let Some(media) = answer.pointer_mut("/content/text~1event-stream") {
            let data = media.get("schema").cloned().unwrap_or_else(|| json!({}));
            media["schema"] = json!({
                "type": "object",
                "required": ["data"],
                "properties": {
                    "id": {"type": "string", "description": "The event's position in the log"},
                    "event": {"type": "string", "enum": ["event"]},
                    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
                },
            });
        }
    }
}

/// Writes a configurable limit into the schema at `pointer` (a JSON pointer into the document);
/// answers `false` when there is no such schema (a type renamed or no longer used).
fn set(doc: &mut Value, pointer: &str, key: &str, value: impl Into<Value>) -> bool {
    match doc.pointer_mut(pointer) {
        Some(Value::Object(schema)) => {
            schema.insert(key.to_owned(), value.into());
            true
        }
        _ => false,
    }
}

/// The limits the settings choose, and the rules the derive cannot spell, where the schemas carry
/// them; answers the schemas that were not there to hold one.
fn apply_limits(doc: &mut Value, s: &Settings) -> Vec<String> {
    // Header names a definition may set: not one Concord sets itself, not a credential header
    // (those take `{{secrets.<name>}}` values, which the schema does not spell); values are
    // literal printable text.
    let taken: Vec<Value> = RESERVED_HEADERS
        .iter()
        .chain(CREDENTIAL_HEADERS)
        .map(|h| Value::String((*h).to_owned()))
        .collect();
    let scopes: Vec<Value> = Scope::all().iter().map(|s| Value::String(s.to_string())).collect();
    let types = json!(["card", "ssn", "email", "phone", "generic"]);
    let limits: Vec<(&str, &str, Value)> = vec![
        (
            "AppendBody/properties/events",
            "maxItems",
            s.max_events_per_append.into(),
        ),
        ("TokenizeBody/properties/items", "maxItems", s.vault_max_batch.into()),
        ("DetokenizeBody/properties/tokens", "maxItems", s.vault_max_batch.into()),
        ("TokenizeItemIn/properties/ttl_s", "maximum", s.vault_max_ttl_s.into()),
        (
            "RulesBody/properties/fields",
            "maxProperties",
            s.vault_max_rule_fields.into(),
        ),
        (
            "BeginTxBody/properties/participants",
            "maxItems",
            s.tx_max_participants.into(),
        ),
        (
            "BeginTxBody/properties/timeout_ms",
            "maximum",
            s.tx_max_timeout_ms.into(),
        ),
        ("DefinitionIn/properties/steps", "maxItems", s.saga_max_steps.into()),
        ("StepIn/properties/timeout_ms", "maximum", s.saga_max_timeout_ms.into()),
        ("StepIn/properties/sleep_ms", "maximum", s.saga_max_sleep_ms.into()),
        ("RetryIn/properties/max_attempts", "maximum", s.saga_max_attempts.into()),
        ("RetryIn/properties/backoff_ms", "maximum", s.saga_max_backoff_ms.into()),
        (
            "RetryIn/properties/max_backoff_ms",
            "maximum",
            s.saga_max_backoff_ms.into(),
        ),
        ("CreateKeyBody/properties/scopes/items", "enum", scopes.into()),
        (
            "CallIn/properties/headers",
            "propertyNames",
            json!({"pattern": "^[a-z][a-z0-9-]*$", "maxLength": 64, "not": {"enum": taken}}),
        ),
        (
            "CallIn/properties/headers",
            "additionalProperties",
            json!({"type": "string", "pattern": "^[ -z|~]*$", "maxLength": 1024}),
        ),
        // A rule's key is a JSON pointer into the event data (printable ASCII here; `~` only as
        // `~0` or `~1`); its value a type, or a type and a format (`last4` for cards only).
        (
            "RulesBody/properties/fields",
            "propertyNames",
            json!({"pattern": "^(/([!-.0-}]|~[01])*)+$", "maxLength": 512}),
        ),
        (
            "RulesBody/properties/fields",
            "additionalProperties",
            json!({"oneOf": [
                {"type": "string", "enum": types},
                {"type": "object", "required": ["type"], "properties": {
                    "type": {"type": "string", "enum": ["card"]},
                    "format": {"type": "string", "enum": ["random", "uuid", "last4"]}}},
                {"type": "object", "required": ["type"], "properties": {
                    "type": {"type": "string", "enum": ["ssn", "email", "phone", "generic"]},
                    "format": {"type": "string", "enum": ["random", "uuid"]}}},
            ]}),
        ),
    ];
    let mut missing = Vec::new();
    for (at, key, value) in limits {
        let pointer = format!("/components/schemas/{at}");
        if !set(doc, &pointer, key, value) {
            missing.push(pointer);
        }
    }
    // Query parameters: the read limit and the longest waits.
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        missing.push("/paths".to_owned());
        return missing;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            let Some(params) = item
                .pointer_mut(&format!("/{method}/parameters"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for p in params.iter_mut() {
                let max: Option<u64> = match p["name"].as_str() {
                    Some("limit") => u64::try_from(s.max_read_limit).ok(),
                    Some("wait_ms") if path.starts_with("/v1/sagas") => Some(s.saga_max_wait_ms),
                    Some("wait_ms") => Some(s.max_wait_ms),
                    _ => None,
                };
                if let (Some(max), Some(schema)) = (max, p.get_mut("schema").and_then(Value::as_object_mut)) {
                    schema.insert("maximum".into(), max.into());
                }
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use concord_api::sagas::DefinitionIn;
    use concord_core::domain::saga::DefinitionSpec;
    use serde_json::json;

    /// The document's definition schema (`DefinitionIn`) and the definition the engine parses
    /// (`DefinitionSpec`) take the same JSON: every field of each, both ways.
    #[test]
    fn the_documented_definition_is_the_one_the_engine_reads() {
        let full = json!({
            "steps": [{
                "name": "reserve",
                "action": {"method": "POST", "url": "http://inventory:8081/r", "headers": {"x-tenant": "t"}, "body": {"n": 1}},
                "compensation": {"method": "DELETE", "url": "http://inventory:8081/r/1"},
                "retry": {"max_attempts": 5, "backoff_ms": 200, "max_backoff_ms": 5000, "jitter": 0.5},
                "timeout_ms": 2000,
                "when": {"value": "{{input.x}}", "equals": null}
            }],
            "compensation_retry": {"max_attempts": 10, "backoff_ms": 100, "max_backoff_ms": 30000, "jitter": 0.2}
        });
        let documented: DefinitionIn = serde_json::from_value(full.clone()).unwrap();
        let engine: DefinitionSpec = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(serde_json::to_value(&documented).unwrap(), full);
        assert_eq!(serde_json::to_value(&engine).unwrap(), full);
        let minimal = json!({"steps": [{"name": "a", "action": {"method": "GET", "url": "http://a"}}]});
        let documented: DefinitionIn = serde_json::from_value(minimal.clone()).unwrap();
        let engine: DefinitionSpec = serde_json::from_value(minimal).unwrap();
        assert_eq!(
            serde_json::from_value::<DefinitionSpec>(serde_json::to_value(&documented).unwrap()).unwrap(),
            engine
        );
        // A retry policy may name only some of its fields; the rest take their defaults.
        let partial = json!({
            "steps": [{"name": "a", "action": {"method": "GET", "url": "http://a"}, "retry": {"max_attempts": 2},
                       "when": "{{input.express}}"},
                      {"name": "b", "sleep_ms": 5000},
                      {"name": "c", "sleep_until": "{{input.at}}"}],
            "compensation_retry": {}
        });
        let documented: DefinitionIn = serde_json::from_value(partial.clone()).unwrap();
        let engine: DefinitionSpec = serde_json::from_value(partial.clone()).unwrap();
        assert_eq!(serde_json::to_value(&documented).unwrap(), partial);
        assert_eq!(serde_json::to_value(&engine).unwrap(), partial);
        for unknown in [
            json!({"steps": [], "x": 1}),
            json!({"steps": [{"name": "a", "action": {"method": "GET", "url": "u"}, "retry": {"tries": 2}}]}),
            json!({"steps": [{"name": "a", "action": {"method": "GET", "url": "u", "y": 2}}]}),
        ] {
            assert!(
                serde_json::from_value::<DefinitionIn>(unknown.clone()).is_err(),
                "{unknown}"
            );
            assert!(
                serde_json::from_value::<DefinitionSpec>(unknown.clone()).is_err(),
                "{unknown}"
            );
        }
    }
}
