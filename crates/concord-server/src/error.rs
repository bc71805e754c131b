//! The API's error type: a code from the one table in `concord-api`, answered as problem+json,
//! and every error of the layers below mapped to its code, here and nowhere else.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use concord_api::{ErrorCode, Problem};
use concord_core::app::auth::KeyError;
use concord_core::app::events::AppendError;
use concord_core::app::saga::SagaError;
use concord_core::app::tx::TxFailure;
use concord_core::app::vault::VaultFailure;
use concord_core::domain::ValidationError;
use concord_core::domain::event::InvalidExpectedVersion;
use concord_core::domain::saga::DefinitionError;
use concord_core::domain::tx::TxError;
use concord_core::domain::vault::VaultError;
use concord_core::ports::StoreError;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: String,
    pub current_version: Option<u64>,
    /// Sent as `Retry-After` (seconds).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            current_version: None,
            retry_after_s: None,
        }
    }

    pub fn parameter(name: &'static str, reason: impl Into<String>) -> Self {
        ValidationError::Parameter {
            name,
            reason: reason.into(),
        }
        .into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code.status() >= 500 {
            tracing::error!(code = self.code.code(), detail = %self.detail, "request failed");
        }
        let mut problem = Problem::new(self.code, self.detail);
        problem.current_version = self.current_version;
        let mut resp = problem.into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// What an error of a layer below answers: its code in the one table of `concord-api` and what
/// the client is told. Every error a route can meet implements it here, in this one place; one
/// conversion turns any of them into an [`ApiError`] (the shape of Meilisearch's `ErrorCode`).
pub trait Coded: std::fmt::Display {
    fn code(&self) -> ErrorCode;
    /// The client's explanation; the error's text unless it holds what must not be repeated.
    fn detail(&self) -> String {
        self.to_string()
    }
    /// For `wrong_expected_version`: the stream's current version.
    fn current_version(&self) -> Option<u64> {
        None
    }
    /// Sent as `Retry-After`, seconds.
    fn retry_after_s(&self) -> Option<u64> {
        None
    }
}

impl<E: Coded> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self {
            code: e.code(),
            detail: e.detail(),
            current_version: e.current_version(),
            retry_after_s: e.retry_after_s(),
        }
    }
}

impl Coded for ValidationError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::StreamName(_) => ErrorCode::InvalidStreamName,
            Self::EventType(_) => ErrorCode::InvalidEventType,
            Self::ExpectedVersion(_) => ErrorCode::InvalidExpectedVersion,
            Self::EventTooLarge { .. } => ErrorCode::EventTooLarge,
            Self::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            Self::EmptyAppend => ErrorCode::EmptyAppend,
            Self::DuplicateEventId(_) => ErrorCode::DuplicateEventId,
            Self::Metadata(_) => ErrorCode::InvalidMetadata,
            Self::NulCharacter(_) => ErrorCode::InvalidEventData,
            Self::Scope(_) => ErrorCode::InvalidScope,
            Self::IdempotencyKey(_) => ErrorCode::InvalidIdempotencyKey,
            Self::Parameter { .. } => ErrorCode::InvalidParameter,
        }
    }
}

impl Coded for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::WrongExpectedVersion { .. } => ErrorCode::WrongExpectedVersion,
            Self::EventIdConflict(_) => ErrorCode::EventIdConflict,
            Self::StreamNotFound(_) => ErrorCode::StreamNotFound,
            Self::Unavailable(_) => ErrorCode::StoreUnavailable,
        }
    }
    fn current_version(&self) -> Option<u64> {
        match self {
            Self::WrongExpectedVersion { current, .. } => Some(*current),
            _ => None,
        }
    }
}

impl Coded for InvalidExpectedVersion {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidExpectedVersion
    }
}

impl Coded for AppendError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Invalid(v) => v.code(),
            Self::Vault(v) => v.code(),
            Self::Store(s) => s.code(),
        }
    }
    fn detail(&self) -> String {
        match self {
            Self::Vault(v) => v.detail(),
            other => other.to_string(),
        }
    }
    fn current_version(&self) -> Option<u64> {
        match self {
            Self::Store(s) => s.current_version(),
            _ => None,
        }
    }
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            Self::Vault(v) => v.retry_after_s(),
            _ => None,
        }
    }
}

impl Coded for KeyError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(v) => v.code(),
            Self::Store(s) => s.code(),
        }
    }
}

impl Coded for VaultError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownType(_) => ErrorCode::InvalidValueType,
            Self::InvalidValue { .. } => ErrorCode::InvalidValue,
            Self::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            Self::FormatNotAllowed { .. } => ErrorCode::InvalidTokenFormat,
            Self::InvalidToken => ErrorCode::InvalidToken,
            Self::CardNumberAsToken => ErrorCode::CardNumberAsToken,
            Self::BatchSize { .. } => ErrorCode::VaultBatchSize,
            Self::InvalidSubject(_) => ErrorCode::InvalidSubject,
            Self::InvalidRule(_) => ErrorCode::InvalidVaultRule,
            Self::InvalidItem(_) => ErrorCode::InvalidVaultItem,
            Self::MasterKey(_) | Self::Crypto | Self::Rng => ErrorCode::VaultKeyFailure,
        }
    }
}

impl Coded for VaultFailure {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(v) => v.code(),
            Self::Store(s) => s.code(),
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
        }
    }
    fn detail(&self) -> String {
        match self {
            Self::Forbidden(m) => m.clone(),
            Self::RateLimited { retry_after_ms } => {
                format!("over this key's detokenize rate; retry in {retry_after_ms} ms")
            }
            other => other.to_string(),
        }
    }
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_ms } => Some(retry_after_ms.div_ceil(1000).max(1)),
            _ => None,
        }
    }
}

impl Coded for SagaError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Definition(d) => match d {
                DefinitionError::Name(_) => ErrorCode::InvalidName,
                DefinitionError::DuplicateStep(_) => ErrorCode::DuplicateStepName,
                DefinitionError::Template { .. } => ErrorCode::UnknownTemplateVariable,
                DefinitionError::Url { .. } => ErrorCode::InvalidStepUrl,
                DefinitionError::Refused { .. } => ErrorCode::OutboundCallRefused,
                DefinitionError::Method { .. } => ErrorCode::InvalidStepMethod,
                DefinitionError::Header { .. } => ErrorCode::InvalidStepHeader,
                DefinitionError::Condition { .. } => ErrorCode::InvalidStepCondition,
                DefinitionError::StepKind { .. } => ErrorCode::InvalidStepKind,
                DefinitionError::Limit(_) => ErrorCode::SagaLimitExceeded,
            },
            Self::DefinitionNotFound(_) => ErrorCode::SagaDefinitionNotFound,
            Self::NotFound(_) => ErrorCode::SagaNotFound,
            Self::NotFailed(..) => ErrorCode::SagaNotFailed,
            Self::OperationRefused { .. } => ErrorCode::SagaOperationRefused,
            Self::Busy(_) => ErrorCode::SagaBusy,
            Self::InputTooLarge { .. } | Self::PayloadTooLarge { .. } => ErrorCode::SagaLimitExceeded,
            Self::SignalNotExpected(_) => ErrorCode::SignalNotExpected,
            Self::SignalAlreadySent { .. } => ErrorCode::SignalAlreadySent,
            Self::CallbackInvalid(_) => ErrorCode::CallbackInvalid,
            Self::CallbackNotExpected(_) => ErrorCode::CallbackNotExpected,
            Self::CallbackAlreadyUsed { .. } => ErrorCode::CallbackAlreadyUsed,
            Self::Log(_) => ErrorCode::Internal,
            Self::Validation(v) => v.code(),
            Self::Store(s) => s.code(),
        }
    }
    fn current_version(&self) -> Option<u64> {
        match self {
            Self::Store(s) => s.current_version(),
            _ => None,
        }
    }
}

impl Coded for concord_core::app::auth::OwnershipError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NotOwner { .. } => ErrorCode::NotOwner,
            Self::Store(s) => s.code(),
        }
    }
}

impl Coded for TxFailure {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(TxError::Limit(_)) => ErrorCode::TransactionLimitExceeded,
            Self::Invalid(TxError::Refused { .. }) => ErrorCode::OutboundCallRefused,
            Self::Invalid(_) => ErrorCode::InvalidParticipant,
            Self::Log(_) => ErrorCode::Internal,
            Self::Validation(v) => v.code(),
            Self::Store(s) => s.code(),
        }
    }
    fn current_version(&self) -> Option<u64> {
        match self {
            Self::Store(s) => s.current_version(),
            _ => None,
        }
    }
}

impl Coded for crate::tx::runner::BeginError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Tx(t) => t.code(),
            Self::Task(_) => ErrorCode::Internal,
        }
    }
}

impl Coded for JsonRejection {
    fn code(&self) -> ErrorCode {
        match self {
            Self::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            Self::BytesRejection(_) if self.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
            _ => ErrorCode::MalformedJson,
        }
    }
    fn detail(&self) -> String {
        self.body_text()
    }
}

impl Coded for QueryRejection {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidParameter
    }
    fn detail(&self) -> String {
        self.body_text()
    }
}

/// The answer for a route that does not exist.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// The answer for a route that exists with other methods.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "the route does not take this method")
}
