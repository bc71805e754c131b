//! The one table of stable error codes. A code never changes meaning once released; clients
//! branch on `code`, never on `title` or `detail`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($code:literal, $status:literal, $title:literal), )*) => {
        /// Every error Concord answers, with its HTTP status and title: the server's, and those
        /// the sdk's layers answer inside a service (the idempotency layer's).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $(#[$doc])* $variant, )* }

        impl ErrorCode {
            /// All codes, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The stable machine code, `snake_case`.
            #[must_use]
            pub fn code(self) -> &'static str { match self { $( ErrorCode::$variant => $code, )* } }

            /// The HTTP status it is answered with.
            #[must_use]
            pub fn status(self) -> u16 { match self { $( ErrorCode::$variant => $status, )* } }

            /// A short human summary, the same for every occurrence.
            #[must_use]
            pub fn title(self) -> &'static str { match self { $( ErrorCode::$variant => $title, )* } }

            /// The code with this machine name.
            #[must_use]
            pub fn from_code(code: &str) -> Option<Self> {
                match code { $( $code => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

error_codes! {
    /// The body is not JSON, or not the JSON the route takes. Fix the request.
    MalformedJson = ("malformed_json", 400, "Malformed JSON body"),
    /// A stream name outside the alphabet `[A-Za-z0-9-_.:@]` (optional leading `$`) or over 200 characters.
    InvalidStreamName = ("invalid_stream_name", 400, "Invalid stream name"),
    /// An event type outside `[A-Za-z0-9-_.:/]` or over 200 characters.
    InvalidEventType = ("invalid_event_type", 400, "Invalid event type"),
    /// `expected_version` is none of `any`, `no_stream`, `exists` or a non-negative integer.
    InvalidExpectedVersion = ("invalid_expected_version", 400, "Invalid expected_version"),
    /// One event's data and metadata exceed the configured size (default 1 MiB).
    EventTooLarge = ("event_too_large", 400, "Event too large"),
    /// More events in one append than the configured limit.
    BatchTooLarge = ("batch_too_large", 400, "Too many events in one append"),
    /// Event data or metadata holds U+0000, which no store can keep.
    InvalidEventData = ("invalid_event_data", 400, "Event data cannot be stored"),
    /// An append without events.
    EmptyAppend = ("empty_append", 400, "Append without events"),
    /// Two events of one append share an id.
    DuplicateEventId = ("duplicate_event_id", 400, "Duplicate event id in one append"),
    /// Event metadata that is not a JSON object.
    InvalidMetadata = ("invalid_metadata", 400, "Invalid event metadata"),
    /// A query or body parameter out of its range.
    InvalidParameter = ("invalid_parameter", 400, "Invalid parameter"),
    /// A scope that Concord does not know.
    InvalidScope = ("invalid_scope", 400, "Unknown scope"),
    /// An `Idempotency-Key` header that is empty, too long or not visible ASCII.
    InvalidIdempotencyKey = ("invalid_idempotency_key", 400, "Invalid Idempotency-Key"),
    /// A request without `Idempotency-Key` to a service whose idempotency layer requires one
    /// (answered by the sdk's layer). Send a fresh unique value (a UUID) per operation, the same
    /// value on each retry of it.
    IdempotencyKeyMissing = ("idempotency_key_missing", 400, "Idempotency-Key missing"),
    /// The request body could not be read (the client went away or sent a broken body; answered
    /// by the sdk's idempotency layer). Retry.
    BodyUnreadable = ("body_unreadable", 400, "Request body unreadable"),
    /// A definition, step or saga name outside its alphabet or length.
    InvalidName = ("invalid_name", 400, "Invalid name"),
    /// Two steps of a saga definition share a name.
    DuplicateStepName = ("duplicate_step_name", 400, "Duplicate step name"),
    /// A `{{...}}` template that names nothing the step can see.
    UnknownTemplateVariable = ("unknown_template_variable", 400, "Unknown template variable"),
    /// A step URL that is not `http://` or `https://` with a fixed host.
    InvalidStepUrl = ("invalid_step_url", 400, "Invalid step URL"),
    /// A step method other than GET, POST, PUT, PATCH, DELETE.
    InvalidStepMethod = ("invalid_step_method", 400, "Invalid step method"),
    /// A step header that is malformed or that Concord sets itself.
    InvalidStepHeader = ("invalid_step_header", 400, "Invalid step header"),
    /// A step's `when` that is not one of its forms, or reads what the step cannot see.
    InvalidStepCondition = ("invalid_step_condition", 400, "Invalid step condition"),
    /// A step that is not exactly one kind (an `action`, `sleep_ms`, `sleep_until` or `wait`), or
    /// a timer or wait with a compensation, retry or timeout, or a wait with a bad signal name.
    InvalidStepKind = ("invalid_step_kind", 400, "Invalid step kind"),
    /// A saga definition or input beyond a configured limit (steps, sizes, attempts, timeouts).
    SagaLimitExceeded = ("saga_limit_exceeded", 400, "Saga limit exceeded"),
    /// A transaction participant with a bad name, a duplicate name or a bad URL.
    InvalidParticipant = ("invalid_participant", 400, "Invalid participant"),
    /// A step or participant URL the outbound policy does not allow (`saga_allowed_hosts`,
    /// `tx_allowed_hosts`): by default no loopback, private, link-local or metadata address.
    OutboundCallRefused = ("outbound_call_refused", 400, "Outbound call refused"),
    /// A transaction beyond a configured limit (participants, payload, timeout).
    TransactionLimitExceeded = ("transaction_limit_exceeded", 400, "Transaction limit exceeded"),
    /// A vault value type that is not card, ssn, email, phone or generic.
    InvalidValueType = ("invalid_value_type", 400, "Unknown value type"),
    /// A value its type refuses (a card failing the Luhn check, a malformed email, ...). The
    /// detail says why, never the value.
    InvalidValue = ("invalid_value", 400, "Invalid value"),
    /// A vault value over the configured size.
    ValueTooLarge = ("value_too_large", 400, "Value too large"),
    /// A token format the value's type cannot take (`last4` is for cards).
    InvalidTokenFormat = ("invalid_token_format", 400, "Invalid token format"),
    /// A token outside 1–64 of `[A-Za-z0-9_-]`.
    InvalidToken = ("invalid_token", 400, "Invalid token"),
    /// A tokenize or detokenize request with no items or more than the configured limit.
    VaultBatchSize = ("vault_batch_size", 400, "Wrong number of vault items"),
    /// A vault subject that is empty, too long, or holds control characters or `/`.
    InvalidSubject = ("invalid_subject", 400, "Invalid subject"),
    /// Tokenized-field rules with a bad pointer, type or format.
    InvalidVaultRule = ("invalid_vault_rule", 400, "Invalid vault rule"),
    /// A vault item with bad metadata or TTL.
    InvalidVaultItem = ("invalid_vault_item", 400, "Invalid vault item"),
    /// The API key detokenized more than its rate allows. Retry after `Retry-After` seconds.
    RateLimited = ("rate_limited", 429, "Too many requests"),
    /// This API key already has `max_concurrent_requests_per_key` requests in progress.
    /// A card number sent where a token belongs; it is neither echoed nor recorded.
    CardNumberAsToken = ("card_number_as_token", 400, "Card number sent as a token"),
    /// A consumer group or saga definition another API key name owns.
    NotOwner = ("not_owner", 403, "Not the owner"),
    TooManyConcurrentRequests = ("too_many_concurrent_requests", 429, "Too many concurrent requests"),
    /// A vault key failed to open (a keyring written under another master key, or tampering):
    /// nothing was revealed. An operator must look.
    VaultKeyFailure = ("vault_key_failure", 500, "Vault key failure"),
    /// The request body is larger than the server accepts at all.
    BodyTooLarge = ("body_too_large", 413, "Request body too large"),
    /// The body is over the limit a service's idempotency layer buffers (answered by the sdk's
    /// layer); the handler did not run. Send a smaller one.
    PayloadTooLarge = ("payload_too_large", 413, "Payload too large"),
    /// The body is not `application/json`.
    UnsupportedMediaType = ("unsupported_media_type", 415, "Unsupported media type"),
    /// No API key, or an unknown or revoked one. Send `Authorization: Bearer <key>`.
    Unauthorized = ("unauthorized", 401, "Unauthorized"),
    /// The key lacks the scope this route needs.
    Forbidden = ("forbidden", 403, "Forbidden"),
    /// No such route or resource.
    NotFound = ("not_found", 404, "Not found"),
    /// The stream has no events.
    StreamNotFound = ("stream_not_found", 404, "Stream not found"),
    /// No live key with that id.
    KeyNotFound = ("key_not_found", 404, "Key not found"),
    /// No saga definition with that name (or version).
    SagaDefinitionNotFound = ("saga_definition_not_found", 404, "Saga definition not found"),
    /// No saga with that id.
    SagaNotFound = ("saga_not_found", 404, "Saga not found"),
    /// Only a `failed` saga can be retried.
    SagaNotFailed = ("saga_not_failed", 409, "Saga is not failed"),
    /// The operation does not apply to the saga as it is, or will be once the operations asked
    /// before it are recorded: cancel a saga that is not running, pause a paused one, resume
    /// one that is not paused, retry-now a paused one, anything on a finished one.
    SagaOperationRefused = ("saga_operation_refused", 409, "Saga operation does not apply"),
    /// No saga batch with that id.
    SagaBatchNotFound = ("saga_batch_not_found", 404, "Saga batch not found"),
    /// A participant host written otherwise than allow-lists write it (`name` or `name:port`).
    InvalidParticipantHost = ("invalid_participant_host", 400, "Invalid participant host"),
    /// A participant limit of zero or past its bound.
    InvalidParticipantLimits = ("invalid_participant_limits", 400, "Invalid participant limits"),
    /// No step of the saga waits for this signal, or none does any more (the saga went past
    /// it, timed out or finished).
    SignalNotExpected = ("signal_not_expected", 409, "Signal not expected"),
    /// The saga already has as many signals of this name as its steps wait for (one per wait
    /// step); this one is not kept.
    SignalAlreadySent = ("signal_already_sent", 409, "Signal already sent"),
    /// A completion URL this server did not issue, or one past its time.
    CallbackInvalid = ("callback_invalid", 401, "Invalid completion URL"),
    /// The attempt the completion URL is for is over: the saga timed it out or went on.
    CallbackNotExpected = ("callback_not_expected", 409, "Completion not expected"),
    /// The attempt was completed already, with another result.
    CallbackAlreadyUsed = ("callback_already_used", 409, "Completion URL already used"),

    /// The route exists but not with this method.
    MethodNotAllowed = ("method_not_allowed", 405, "Method not allowed"),
    /// The stream is not at the expected version. Re-read, decide again, retry.
    WrongExpectedVersion = ("wrong_expected_version", 409, "Wrong expected version"),
    /// An event id of the append exists, but not as this same append. Use fresh ids.
    EventIdConflict = ("event_id_conflict", 409, "Event id already used"),
    /// The first request with this `Idempotency-Key` is still running. Retry later.
    IdempotencyKeyInFlight = ("idempotency_key_in_flight", 409, "Idempotency-Key in flight"),
    /// The `Idempotency-Key` was used with a different request. Use a new key.
    IdempotencyKeyReused = ("idempotency_key_reused", 422, "Idempotency-Key reused with a different request"),
    /// Another node is working on the saga right now. Retry shortly (never replayed for an
    /// `Idempotency-Key`, so the retry runs).
    SagaBusy = ("saga_busy", 503, "Saga busy"),
    /// The database failed or is unreachable. Retry with backoff.
    StoreUnavailable = ("store_unavailable", 503, "Store unavailable"),
    /// The server already serves `max_subscribers` event streams.
    TooManySubscribers = ("too_many_subscribers", 503, "Too many subscribers"),
    /// The node is shutting down (readiness): send requests to another.
    Draining = ("draining", 503, "Draining"),
    /// The request did not finish within `request_timeout_ms`.
    RequestTimedOut = ("request_timed_out", 503, "Request timed out"),
    /// A service's idempotency store failed or is unreachable (answered by the sdk's layer); the
    /// handler did not run. Retry with backoff.
    IdempotencyStoreUnavailable = ("idempotency_store_unavailable", 503, "Idempotency store unavailable"),
    /// The request ran, but its response was too large (or broken) to be kept, so a retry with
    /// its `Idempotency-Key` gets this instead (answered by the sdk's layer). Do not retry with
    /// the same key: the operation happened; look its result up.
    IdempotencyResponseNotStored = ("idempotency_response_not_stored", 500, "Idempotent response not stored"),
    /// A bug. Nothing of the request was written that a retry would duplicate.
    Internal = ("internal", 500, "Internal error"),
}

/// The media type of every problem body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem: the body of every error, `application/problem+json`, whoever answers it
/// (the server, the sdk's layers, a service built on the sdk). With the `axum` feature it is an
/// axum response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:concord:error:<code>` for a code of Concord's table; `about:blank` otherwise.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The stable machine code: from the error table, or a service's own.
    pub code: String,
    /// For `wrong_expected_version`: the stream's current version.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub current_version: Option<u64>,
}

impl Problem {
    /// The problem of a code of Concord's table.
    #[must_use]
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            problem_type: format!("urn:concord:error:{}", code.code()),
            title: code.title().to_owned(),
            status: code.status(),
            detail: detail.into(),
            code: code.code().to_owned(),
            current_version: None,
        }
    }

    /// A problem outside Concord's table (a service's own code, or an answer that was no problem
    /// document): `type` `about:blank`, the status's reason phrase as title, as RFC 9457 asks.
    #[must_use]
    pub fn custom(status: u16, code: impl Into<String>, detail: impl Into<String>) -> Self {
        let title = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("HTTP error");
        Self {
            problem_type: "about:blank".to_owned(),
            title: title.to_owned(),
            status,
            detail: detail.into(),
            code: code.into(),
            current_version: None,
        }
    }

    /// The code as a known variant, if it is one.
    #[must_use]
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(&self.code)
    }

    /// The serialized body.
    #[must_use]
    pub fn to_body(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for Problem {
    /// The status, `Content-Type: application/problem+json` and the body.
    fn into_response(self) -> axum_core::response::Response {
        let status = http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = axum_core::response::Response::new(axum_core::body::Body::from(self.to_body()));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_snake_case_and_round_trip() {
        let mut seen = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert!(c.code().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert_eq!(ErrorCode::from_code(c.code()), Some(*c));
            assert!((400..600).contains(&c.status()));
        }
    }

    #[test]
    fn a_problem_body_has_the_five_members() {
        let body: serde_json::Value =
            serde_json::from_slice(&Problem::new(ErrorCode::PayloadTooLarge, "over 10 bytes").to_body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "urn:concord:error:payload_too_large",
                "title": "Payload too large",
                "status": 413,
                "detail": "over 10 bytes",
                "code": "payload_too_large",
            })
        );
    }

    #[test]
    fn a_problem_outside_the_table_is_about_blank_with_the_reason_phrase() {
        let p = Problem::custom(503, "injected_fault", "injected");
        assert_eq!(
            (p.problem_type.as_str(), p.title.as_str(), p.status, p.code.as_str()),
            ("about:blank", "Service Unavailable", 503, "injected_fault")
        );
        assert_eq!(p.error_code(), None);
    }
}
