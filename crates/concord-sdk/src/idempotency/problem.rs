//! The problems the idempotency layer answers, in one table.

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};
use concord_api::Problem;

/// The media type of every answer the layer makes itself.
pub(super) const PROBLEM_JSON: &str = "application/problem+json";

macro_rules! problem_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($code:literal, $status:ident, $title:literal), )*) => {
        /// Every error the layer answers itself: its stable `code`, HTTP status and title. The
        /// codes the Concord server answers too (`invalid_idempotency_key`,
        /// `idempotency_key_reused`, `idempotency_key_in_flight`, `internal`) have the same
        /// code and status there. Each variant's doc says what a client does about it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemCode { $( $(#[$doc])* $variant, )* }

        impl ProblemCode {
            /// All codes, for documentation and tests.
            pub const ALL: &'static [ProblemCode] = &[ $( ProblemCode::$variant, )* ];

            /// The stable machine code, `snake_case`.
            #[must_use]
            pub fn code(self) -> &'static str { match self { $( ProblemCode::$variant => $code, )* } }

            /// The HTTP status it is answered with.
            #[must_use]
            pub fn status(self) -> StatusCode { match self { $( ProblemCode::$variant => StatusCode::$status, )* } }

            /// A short human summary, the same for every occurrence.
            #[must_use]
            pub fn title(self) -> &'static str { match self { $( ProblemCode::$variant => $title, )* } }

            /// The code with this machine name.
            #[must_use]
            pub fn from_code(code: &str) -> Option<Self> {
                match code { $( $code => Some(ProblemCode::$variant), )* _ => None }
            }
        }
    };
}

problem_codes! {
    /// A covered request without `Idempotency-Key`. Send one: a fresh unique value (a UUID) per
    /// operation, the same value on each retry of it.
    IdempotencyKeyMissing = ("idempotency_key_missing", BAD_REQUEST, "Idempotency-Key missing"),
    /// An `Idempotency-Key` that is empty, longer than 255 characters, not visible ASCII, or sent
    /// twice. Fix the client.
    InvalidIdempotencyKey = ("invalid_idempotency_key", BAD_REQUEST, "Invalid Idempotency-Key"),
    /// The request body could not be read (the client went away or sent a broken body). Retry.
    BodyUnreadable = ("body_unreadable", BAD_REQUEST, "Request body unreadable"),
    /// The body is over the layer's limit. Send a smaller one; the handler did not run.
    PayloadTooLarge = ("payload_too_large", PAYLOAD_TOO_LARGE, "Payload too large"),
    /// The first request with this key is still running. Retry after `Retry-After` seconds.
    IdempotencyKeyInFlight = ("idempotency_key_in_flight", CONFLICT, "Idempotency-Key in flight"),
    /// The key was used with a different request (method, path, query or body). Use a new key.
    IdempotencyKeyReused = (
        "idempotency_key_reused",
        UNPROCESSABLE_ENTITY,
        "Idempotency-Key reused with a different request"
    ),
    /// The request ran, but its response was too large (or broken) to be kept, so a retry gets
    /// this instead. Do not retry with the same key: the operation happened; look its result up.
    IdempotencyResponseNotStored = (
        "idempotency_response_not_stored",
        INTERNAL_SERVER_ERROR,
        "Idempotent response not stored"
    ),
    /// The idempotency store failed or is unreachable; the handler did not run. Retry with backoff.
    IdempotencyStoreUnavailable = (
        "idempotency_store_unavailable",
        SERVICE_UNAVAILABLE,
        "Idempotency store unavailable"
    ),
    /// The handler panicked or its task failed; the key was released. Retry with the same key.
    Internal = ("internal", INTERNAL_SERVER_ERROR, "Internal error"),
}

impl ProblemCode {
    /// The RFC 9457 body of this code with a detail.
    #[must_use]
    pub fn problem(self, detail: impl Into<String>) -> Problem {
        Problem {
            problem_type: format!("urn:concord:error:{}", self.code()),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail: detail.into(),
            code: self.code().to_owned(),
            current_version: None,
        }
    }

    /// The problem serialized, as stored or sent.
    pub(super) fn body(self, detail: impl Into<String>) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(&self.problem(detail)).unwrap_or_default()
    }

    /// The whole `application/problem+json` response.
    pub(super) fn response(self, detail: impl Into<String>) -> Response<Body> {
        let mut response = Response::new(Body::from(self.body(detail)));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
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
        for c in ProblemCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert!(c.code().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert_eq!(ProblemCode::from_code(c.code()), Some(*c));
            assert!(c.status().is_client_error() || c.status().is_server_error());
        }
    }

    #[test]
    fn shared_codes_agree_with_the_server_table() {
        use concord_api::ErrorCode;
        for (ours, theirs) in [
            (ProblemCode::InvalidIdempotencyKey, ErrorCode::InvalidIdempotencyKey),
            (ProblemCode::IdempotencyKeyInFlight, ErrorCode::IdempotencyKeyInFlight),
            (ProblemCode::IdempotencyKeyReused, ErrorCode::IdempotencyKeyReused),
            (ProblemCode::Internal, ErrorCode::Internal),
        ] {
            assert_eq!(ours.code(), theirs.code());
            assert_eq!(ours.status().as_u16(), theirs.status());
        }
    }

    #[test]
    fn a_problem_body_has_the_five_members() {
        let body: serde_json::Value =
            serde_json::from_slice(&ProblemCode::PayloadTooLarge.body("over 10 bytes")).unwrap();
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
}
