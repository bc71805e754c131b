//! The OpenAPI document of the whole API, served at `GET /v1/openapi.json`.
//!
//! The operations are declared on stubs here rather than on the handlers, so the handlers stay
//! plain functions and the whole API reads in one page.
#![allow(dead_code)]

use concord_api::Problem;
use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventOut, EventsPage};
use concord_api::keys::{CreateKeyBody, CreatedKey, Health};
use concord_api::sagas::{AttemptOut, DefinitionOut, SagaOut, SagaPage, StartSagaBody, StepOut};
use concord_api::tx::{BeginTxBody, ParticipantIn, ParticipantOut, TxDecision, TxOut, TxPage};
use concord_api::vault::{
    DetokenizeBody, Detokenized, DetokenizedItem, ErasedOut, RotatedOut, RulesBody, RulesOut, TokenizeBody,
    TokenizeItemIn, Tokenized,
};
use utoipa::OpenApi;

#[utoipa::path(get, path = "/health", responses((status = 200, description = "The store answers", body = Health)))]
fn health() {}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
fn metrics() {}

#[utoipa::path(post, path = "/v1/streams/{stream}", request_body = AppendBody,
    params(("stream" = String, Path, description = "1-200 of [A-Za-z0-9-_.:@], optional leading $"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 200, description = "Appended, or the original answer of a re-sent append", body = AppendResponse),
              (status = 400, description = "Invalid request; nothing written", body = Problem),
              (status = 409, description = "wrong_expected_version or event_id_conflict", body = Problem)))]
fn append() {}

#[utoipa::path(get, path = "/v1/streams/{stream}",
    params(("stream" = String, Path), ("from" = Option<u64>, Query), ("limit" = Option<u32>, Query)),
    responses((status = 200, description = "Events in version order", body = EventsPage),
              (status = 404, description = "stream_not_found", body = Problem)))]
fn read_stream() {}

#[utoipa::path(get, path = "/v1/events",
    params(("after" = Option<u64>, Query), ("limit" = Option<u32>, Query), ("category" = Option<String>, Query)),
    responses((status = 200, description = "The global log in position order", body = EventsPage)))]
fn read_log() {}

#[utoipa::path(get, path = "/v1/events/subscribe",
    params(("after" = Option<u64>, Query), ("category" = Option<String>, Query),
           ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses((status = 200, description = "text/event-stream; each event's id is its position, data an EventOut")))]
fn subscribe() {}

#[utoipa::path(get, path = "/v1/subscriptions/{group}/events",
    params(("group" = String, Path), ("member" = Option<u32>, Query), ("size" = Option<u32>, Query),
           ("category" = Option<String>, Query), ("wait_ms" = Option<u64>, Query), ("limit" = Option<u32>, Query)),
    responses((status = 200, description = "The member's next events after its checkpoint", body = EventsPage)))]
fn group_events() {}

#[utoipa::path(put, path = "/v1/subscriptions/{group}/checkpoint", request_body = CheckpointBody,
    params(("group" = String, Path)),
    responses((status = 204, description = "Saved")))]
fn save_checkpoint() {}

#[utoipa::path(post, path = "/v1/keys", request_body = CreateKeyBody,
    responses((status = 201, description = "Created; the key is shown only here", body = CreatedKey),
              (status = 400, description = "invalid_scope or invalid_parameter", body = Problem)))]
fn create_key() {}

#[utoipa::path(delete, path = "/v1/keys/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, description = "key_not_found", body = Problem)))]
fn revoke_key() {}

#[utoipa::path(put, path = "/v1/saga-definitions/{name}",
    request_body(content = serde_json::Value, description = "{\"steps\": [{name, action, compensation?, retry?, timeout_ms?}], \"compensation_retry\"?}; see the README"),
    params(("name" = String, Path, description = "1-64 of [A-Za-z0-9_.-]")),
    responses((status = 201, description = "A new version", body = DefinitionOut),
              (status = 200, description = "Unchanged: the latest version already has this spec", body = DefinitionOut),
              (status = 400, description = "invalid_name, duplicate_step_name, unknown_template_variable, invalid_step_url, invalid_step_method, invalid_step_header, saga_limit_exceeded", body = Problem)))]
fn put_definition() {}

#[utoipa::path(get, path = "/v1/saga-definitions/{name}", params(("name" = String, Path), ("version" = Option<u32>, Query)),
    responses((status = 200, description = "The version asked, or the latest", body = DefinitionOut),
              (status = 404, description = "saga_definition_not_found", body = Problem)))]
fn get_definition() {}

#[utoipa::path(post, path = "/v1/sagas", request_body = StartSagaBody,
    params(("wait_ms" = Option<u64>, Query, description = "Wait up to this long for the saga to finish"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 201, description = "Started", body = SagaOut),
              (status = 200, description = "A saga with this id exists: it is returned", body = SagaOut),
              (status = 404, description = "saga_definition_not_found", body = Problem)))]
fn start_saga() {}

#[utoipa::path(get, path = "/v1/sagas",
    params(("status" = Option<String>, Query), ("limit" = Option<u32>, Query), ("after" = Option<String>, Query)),
    responses((status = 200, description = "Sagas in id order", body = SagaPage)))]
fn list_sagas() {}

#[utoipa::path(get, path = "/v1/sagas/{id}", params(("id" = String, Path), ("wait_ms" = Option<u64>, Query)),
    responses((status = 200, description = "The saga with each step's attempts, output and error", body = SagaOut),
              (status = 404, description = "saga_not_found", body = Problem)))]
fn get_saga() {}

#[utoipa::path(post, path = "/v1/sagas/{id}/retry", params(("id" = String, Path), ("wait_ms" = Option<u64>, Query)),
    responses((status = 200, description = "Resumed: its compensations run again", body = SagaOut),
              (status = 409, description = "saga_not_failed", body = Problem),
              (status = 503, description = "saga_busy: another node is working on it; retry shortly", body = Problem)))]
fn retry_saga() {}

#[utoipa::path(post, path = "/v1/transactions", request_body = BeginTxBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 200, description = "Decided; the decision is durable, phase 2 runs on", body = TxDecision),
              (status = 202, description = "Logged, but the decision could not be confirmed (outcome `pending`): recovery finishes it; ask GET", body = TxDecision),
              (status = 400, description = "invalid_participant or transaction_limit_exceeded", body = Problem)))]
fn begin_tx() {}

#[utoipa::path(get, path = "/v1/transactions/{xid}", params(("xid" = String, Path)),
    responses((status = 200, description = "Outcome, votes and acknowledgements; an unknown xid is presumed aborted", body = TxOut)))]
fn get_tx() {}

#[utoipa::path(get, path = "/v1/transactions",
    params(("outcome" = Option<String>, Query, description = "committed, aborted or undecided"),
           ("pending" = Option<bool>, Query), ("after" = Option<String>, Query), ("limit" = Option<u32>, Query)),
    responses((status = 200, description = "Transactions in xid order", body = TxPage)))]
fn list_tx() {}

#[utoipa::path(post, path = "/v1/vault/tokenize", request_body = TokenizeBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 200, description = "One token per item, in order (scope vault:tokenize)", body = Tokenized),
              (status = 400, description = "invalid_value, invalid_value_type, value_too_large, invalid_token_format, invalid_subject, invalid_vault_item or vault_batch_size; nothing written", body = Problem)))]
fn tokenize() {}

#[utoipa::path(post, path = "/v1/vault/detokenize", request_body = DetokenizeBody,
    responses((status = 200, description = "Each item's value or error (not_found, expired, erased, corrupted); audited; never stored for replay", body = Detokenized),
              (status = 403, description = "Some item's type needs a vault:detokenize scope this key lacks: nothing revealed, audited", body = Problem),
              (status = 429, description = "rate_limited: over this key's detokenize rate; see Retry-After", body = Problem)))]
fn detokenize() {}

#[utoipa::path(put, path = "/v1/vault/rules/{category}", request_body = RulesBody,
    params(("category" = String, Path, description = "A stream category")),
    responses((status = 200, description = "Stored; appends to the category tokenize these fields (scope vault:admin)", body = RulesOut),
              (status = 400, description = "invalid_vault_rule", body = Problem)))]
fn put_rules() {}

#[utoipa::path(get, path = "/v1/vault/rules/{category}", params(("category" = String, Path)),
    responses((status = 200, description = "The category's rules", body = RulesOut),
              (status = 404, description = "not_found", body = Problem)))]
fn get_rules() {}

#[utoipa::path(delete, path = "/v1/vault/subjects/{subject}", params(("subject" = String, Path)),
    responses((status = 200, description = "The subject's data key is deleted: its tokens answer erased (scope vault:admin)", body = ErasedOut)))]
fn erase_subject() {}

#[utoipa::path(post, path = "/v1/vault/keys/rotate",
    responses((status = 200, description = "A new master key version wraps every data key (scope vault:admin)", body = RotatedOut)))]
fn rotate_keys() {}

#[derive(OpenApi)]
#[openapi(
    info(title = "Concord", description = "Data consistency across microservices: event store, sagas, 2PC, vault."),
    paths(health, metrics, append, read_stream, read_log, subscribe, group_events, save_checkpoint, create_key, revoke_key,
          put_definition, get_definition, start_saga, list_sagas, get_saga, retry_saga, begin_tx, get_tx, list_tx,
          tokenize, detokenize, put_rules, get_rules, erase_subject, rotate_keys),
    components(schemas(Problem, AppendBody, EventInput, AppendResponse, EventOut, EventsPage, CheckpointBody,
                       CreateKeyBody, CreatedKey, Health, DefinitionOut, StartSagaBody, SagaOut, SagaPage, StepOut,
                       AttemptOut, BeginTxBody, ParticipantIn, TxDecision, TxOut, ParticipantOut, TxPage,
                       TokenizeBody, TokenizeItemIn, Tokenized, DetokenizeBody, Detokenized, DetokenizedItem,
                       RulesBody, RulesOut, RotatedOut, ErasedOut)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

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

/// The document.
#[must_use]
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
