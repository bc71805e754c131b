//! Participant calls over HTTP, classified as the saga contract says: 2xx succeeds (the JSON body
//! is the step's output), 4xx other than 408/425/429 is a refusal, anything else (5xx, 408, 425,
//! 429, timeouts, connection errors) may work on a retry.

use crate::outbound::{Outbound, refusal};
use async_trait::async_trait;
use concord_core::app::saga::{Answer, ParticipantCall, Participants};
use concord_core::domain::flow::HostSignal;
use concord_core::domain::outbound::OutboundPolicy;
use concord_core::domain::saga::CallOutcome;
use concord_sdk::trace;
use reqwest::StatusCode;
use serde_json::Value;
use tracing::Instrument as _;

/// Sends participant calls with `Idempotency-Key`, `Concord-Saga-Id` and `traceparent`.
pub struct HttpParticipants {
    client: Outbound,
    /// Largest answer read; a larger one is not kept as an output.
    max_body: usize,
}

impl HttpParticipants {
    /// # Errors
    /// When the HTTP client cannot be built (no TLS provider installed).
    pub fn new(max_body: usize, policy: OutboundPolicy, tls: &concord_sdk::ClientTls) -> anyhow::Result<Self> {
        let client = Outbound::new(policy, tls)?;
        Ok(Self { client, max_body })
    }
}

/// How much of an error answer is kept in the saga log.
const ERROR_SNIPPET: usize = 300;

#[async_trait]
impl Participants for HttpParticipants {
    async fn call(&self, c: &ParticipantCall) -> Answer {
        // A client span in the trace of the request that started the saga (kept in the saga log,
        // so recovery on another node continues it too): the participant's own spans nest under
        // it instead of hanging from a span id no process recorded.
        let name = format!("saga {} {}", c.step, c.op.as_str());
        let span = tracing::info_span!(
            "saga.call",
            saga.id = %c.saga_id,
            attempt = c.attempt,
            otel.kind = "client",
            otel.name = name.as_str()
        );
        if let Some(origin) = &c.origin_trace {
            concord_sdk::trace::continue_from(&span, origin);
        }
        self.send(c).instrument(span).await
    }
}

impl HttpParticipants {
    async fn send(&self, c: &ParticipantCall) -> Answer {
        let not_sent = |outcome| Answer {
            outcome,
            host: HostSignal::NotSent,
        };
        let failing = |outcome| Answer {
            outcome,
            host: HostSignal::Failing,
        };
        let Ok(method) = reqwest::Method::from_bytes(c.call.method.as_bytes()) else {
            return not_sent(CallOutcome::Refused(format!("unsupported method {}", c.call.method)));
        };
        let req = match self.client.request(method, &c.call.url) {
            Ok(r) => r,
            Err(refused) => return not_sent(CallOutcome::Refused(format!("the call is not allowed: {refused}"))),
        };
        let mut req = req
            .timeout(c.timeout)
            .header("idempotency-key", &c.idempotency_key)
            .header("concord-saga-id", c.saga_id.as_str())
            .header(trace::TRACEPARENT, trace::outgoing(c.origin_trace.as_deref()));
        for (k, v) in &c.call.headers {
            // A definition's headers may carry a secret: kept out of HTTP/2 header compression
            // tables and out of any Debug print of the request.
            let Ok(mut value) = reqwest::header::HeaderValue::from_str(v) else {
                return not_sent(CallOutcome::Refused(format!(
                    "header {k} has a value that cannot be sent"
                )));
            };
            value.set_sensitive(true);
            req = req.header(k, value);
        }
        if let Some(url) = &c.callback {
            // A capability: whoever holds it completes the attempt, so it stays out of header
            // compression tables and Debug prints like a secret.
            let Ok(mut value) = reqwest::header::HeaderValue::from_str(url) else {
                return not_sent(CallOutcome::Refused(
                    "the completion URL cannot be sent as a header".into(),
                ));
            };
            value.set_sensitive(true);
            req = req.header(concord_core::domain::saga::callback::CALLBACK_HEADER, value);
        }
        if let Some(body) = &c.call.body {
            req = req.json(body);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_builder() => return not_sent(CallOutcome::Refused(format!("the call cannot be made: {e}"))),
            Err(e) if let Some(refused) = refusal(&e) => {
                return not_sent(CallOutcome::Refused(format!("the call is not allowed: {refused}")));
            }
            Err(e) if e.is_timeout() => {
                return failing(CallOutcome::Transient(format!(
                    "timed out after {} ms",
                    c.timeout.as_millis()
                )));
            }
            Err(e) => return failing(CallOutcome::Transient(format!("connection error: {}", error_chain(&e)))),
        };
        let status = resp.status();
        let retry_after = retry_after(resp.headers(), chrono::Utc::now());
        let host = host_signal(status, retry_after);
        // Accepted: the participant finishes later and posts its result to the completion URL
        // this call carried. Without one, a 202 is a 2xx like any other.
        if status == StatusCode::ACCEPTED && c.callback.is_some() {
            return Answer {
                outcome: CallOutcome::Accepted,
                host,
            };
        }
        let body = match read_limited(resp, self.max_body).await {
            Ok(b) => b,
            // It took effect, but its answer cannot be kept.
            Err(Read::TooLarge) if status.is_success() => {
                return Answer {
                    outcome: CallOutcome::Unusable(format!("answer over the limit of {} bytes", self.max_body)),
                    host,
                };
            }
            Err(Read::TooLarge) => Vec::new(),
            Err(Read::Failed(e)) if e.is_timeout() => {
                return failing(CallOutcome::Transient(format!(
                    "timed out after {} ms",
                    c.timeout.as_millis()
                )));
            }
            Err(Read::Failed(e)) => return failing(CallOutcome::Transient(format!("reading the answer: {e}"))),
        };
        Answer {
            outcome: classify(status, &body),
            host,
        }
    }
}

fn classify(status: StatusCode, body: &[u8]) -> CallOutcome {
    if status.is_success() {
        let output = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        return CallOutcome::Succeeded(output);
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(ERROR_SNIPPET).collect();
    let error = if snippet.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {snippet}", status.as_u16())
    };
    match status.as_u16() {
        408 | 425 | 429 => CallOutcome::Transient(error),
        // The participant is still running an earlier attempt of this very call: its outcome is
        // unknown, not a refusal.
        409 if in_flight(body) => CallOutcome::Transient(error),
        400..=499 => CallOutcome::Refused(error),
        // Not followed (the call would go where the definition does not name), and the work may
        // have been done before the redirect: unknown, so retried and compensated if it stays so.
        300..=399 => CallOutcome::Transient(format!("{error} (redirects are not followed)")),
        _ => CallOutcome::Transient(error),
    }
}

/// What an answer tells of its host: a 429, or a 503 with `Retry-After`, asks callers to slow
/// down (a hold for every saga's calls to it, not a failure); any other 5xx counts toward its
/// breaker; anything else says it is up.
fn host_signal(status: StatusCode, retry_after: Option<std::time::Duration>) -> HostSignal {
    match status.as_u16() {
        429 => HostSignal::Throttled(retry_after),
        503 if retry_after.is_some() => HostSignal::Throttled(retry_after),
        500..=599 => HostSignal::Failing,
        _ => HostSignal::Healthy,
    }
}

/// `Retry-After` as seconds or as an HTTP date (RFC 9110 10.2.3); none when absent or neither.
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v)
        .ok()?
        .with_timezone(&chrono::Utc);
    Some((at - now).to_std().unwrap_or_default())
}

/// A 409 whose problem code says the same `Idempotency-Key` is still being processed.
fn in_flight(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["code"] == "idempotency_key_in_flight")
}

enum Read {
    TooLarge,
    Failed(reqwest::Error),
}

async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, Read> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(Read::TooLarge);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Read::Failed)? {
        if out.len() + chunk.len() > max {
            return Err(Read::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_the_contract_says() {
        let ok = |s: u16, b: &[u8]| classify(StatusCode::from_u16(s).unwrap(), b);
        assert_eq!(
            ok(200, br#"{"id": 1}"#),
            CallOutcome::Succeeded(serde_json::json!({"id": 1}))
        );
        assert_eq!(ok(204, b""), CallOutcome::Succeeded(Value::Null));
        assert_eq!(ok(200, b"plain"), CallOutcome::Succeeded(Value::String("plain".into())));
        assert!(matches!(ok(409, b"no stock"), CallOutcome::Refused(e) if e.contains("no stock")));
        assert!(matches!(ok(404, b""), CallOutcome::Refused(_)));
        for s in [408, 425, 429, 500, 502, 503] {
            assert!(matches!(ok(s, b""), CallOutcome::Transient(_)), "{s}");
        }
        assert!(matches!(ok(302, b""), CallOutcome::Transient(_)));
        let busy = br#"{"code": "idempotency_key_in_flight", "status": 409}"#;
        assert!(matches!(ok(409, busy), CallOutcome::Transient(_)));
    }

    #[test]
    fn answers_tell_whether_the_host_is_down_or_only_busy() {
        let s = |c: u16| StatusCode::from_u16(c).unwrap();
        let two = Some(std::time::Duration::from_secs(2));
        assert_eq!(host_signal(s(429), two), HostSignal::Throttled(two));
        assert_eq!(host_signal(s(429), None), HostSignal::Throttled(None));
        assert_eq!(host_signal(s(503), two), HostSignal::Throttled(two));
        assert_eq!(host_signal(s(503), None), HostSignal::Failing);
        assert_eq!(host_signal(s(500), two), HostSignal::Failing);
        for ok in [200, 202, 404, 409, 408] {
            assert_eq!(host_signal(s(ok), None), HostSignal::Healthy, "{ok}");
        }
        let mut h = reqwest::header::HeaderMap::new();
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-08T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h, now), two);
        h.insert("retry-after", "Tue, 08 Dec 2026 00:00:03 GMT".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(std::time::Duration::from_secs(3)));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }
}
