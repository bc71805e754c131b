//! W3C trace context across processes, on OpenTelemetry's propagator: the `traceparent` of the
//! current span for outgoing work ([`traceparent`], [`inject`], [`outgoing`]; the [`Client`]
//! sends it on every call), and the way back in ([`continue_from`], [`remote_context`]).
//! The service kit adds the axum middleware that continues an incoming request's trace.
//!
//! The current span's context comes through OpenTelemetry's context of `tracing` spans, so it
//! exists once the process installed a `tracing-opentelemetry` layer (and, for [`continue_from`]
//! and [`remote_context`], the W3C propagator with
//! `opentelemetry::global::set_text_map_propagator`). Without them, [`traceparent`] is `None`,
//! and [`outgoing`] still continues a stored incoming trace under a fresh span id.
//!
//! Without the `otel` feature, nothing is sent and nothing is followed.
//!
//! [`Client`]: crate::Client

/// The W3C trace context header (and the outbox message header) that carries the trace.
pub const TRACEPARENT: &str = "traceparent";

#[cfg(feature = "otel")]
pub use with_otel::*;

/// Without the `otel` feature there is no span context to send: always `None`, so callers
/// (the outbox's message headers) need no feature switch of their own.
#[cfg(not(feature = "otel"))]
#[must_use]
pub fn traceparent() -> Option<String> {
    None
}

#[cfg(feature = "otel")]
mod with_otel {
    use super::TRACEPARENT;
    use opentelemetry::Context;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    /// The W3C `traceparent` (version 00) of the current `tracing` span's OpenTelemetry context;
    /// `None` when there is no valid span context (no current span, or no OpenTelemetry layer).
    #[must_use]
    pub fn traceparent() -> Option<String> {
        traceparent_of(&tracing::Span::current())
    }

    /// The W3C `traceparent` of `span`'s OpenTelemetry context; `None` when it has none.
    #[must_use]
    pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        sc.is_valid().then(|| header_value(sc))
    }

    /// Sets `traceparent` in `headers` to the current span's ([`traceparent`]); leaves them
    /// alone when there is none.
    pub fn inject(headers: &mut HeaderMap) {
        if let Some(value) = traceparent().and_then(|tp| HeaderValue::from_str(&tp).ok()) {
            headers.insert(HeaderName::from_static(TRACEPARENT), value);
        }
    }

    /// The span context a `traceparent` value names, when it is a valid one (W3C: version not
    /// `ff`, lower-case hex, non-zero ids), as the propagator reads it. The propagator also takes
    /// fields of other lengths or signs (a one-digit flags field, a 31-digit trace id, `+1`);
    /// W3C's fixed layout of version 00 (2-32-16-2 lower-case hex digits) refuses them.
    #[must_use]
    pub fn parse(traceparent: &str) -> Option<SpanContext> {
        let bytes = traceparent.as_bytes();
        let hex = |range: std::ops::Range<usize>| bytes[range].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let layout = bytes.len() == 55
            && [2, 35, 52].iter().all(|&i| bytes[i] == b'-')
            && hex(0..2)
            && hex(3..35)
            && hex(36..52)
            && hex(53..55);
        if !layout {
            return None;
        }
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &OneHeader(traceparent));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    /// The `traceparent` for an outgoing call made from the current span: the span's own context
    /// when a tracer records it; else the trace of `incoming` (a stored `traceparent`) continued
    /// under a fresh span id; else a new sampled trace, so downstream parent-based samplers still
    /// record the trace started here.
    #[must_use]
    pub fn outgoing(incoming: Option<&str>) -> String {
        if let Some(traceparent) = traceparent() {
            return traceparent;
        }
        let (trace_id, flags) = match incoming.and_then(parse) {
            Some(parent) => (parent.trace_id(), parent.trace_flags()),
            None => (TraceId::from(random_nonzero()), TraceFlags::SAMPLED),
        };
        // The low 64 bits of a non-zero random u128 are zero only with probability 2^-64; the
        // loop makes sure of it.
        let span_id = loop {
            let bits = random_nonzero().to_le_bytes();
            let id = SpanId::from_bytes(bits[..8].try_into().unwrap_or([1; 8]));
            if id != SpanId::INVALID {
                break id;
            }
        };
        header_value(&SpanContext::new(trace_id, span_id, flags, true, TraceState::default()))
    }

    /// Makes `span` continue the trace that `traceparent` names (for example the header of a
    /// consumed outbox message), so the work done in it joins the producer's trace. Call it
    /// before the span is first entered; a malformed value leaves `span` where it was.
    pub fn continue_from(span: &tracing::Span, traceparent: &str) {
        let parent = remote_context(&OneHeader(traceparent));
        if parent.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, where there is no trace to continue.
            let _ = span.set_parent(parent);
        }
    }

    /// The remote context in `carrier` through the process's propagator, on top of an empty
    /// context: extracting onto the current context would make a request without a traceparent
    /// join whatever span is active where it is read.
    #[must_use]
    pub fn remote_context(carrier: &dyn Extractor) -> Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract_with_context(&Context::new(), carrier))
    }

    /// The headers of a request as the propagator's carrier.
    pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(HeaderName::as_str).collect()
        }
    }

    /// One stored `traceparent` value as the propagator's carrier.
    struct OneHeader<'a>(&'a str);

    impl Extractor for OneHeader<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            key.eq_ignore_ascii_case(TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT]
        }
    }

    /// The `traceparent` header value of `sc`, as the propagator writes it.
    fn header_value(sc: &SpanContext) -> String {
        struct One(Option<String>);
        impl Injector for One {
            fn set(&mut self, key: &str, value: String) {
                if key.eq_ignore_ascii_case(TRACEPARENT) {
                    self.0 = Some(value);
                }
            }
        }
        let mut out = One(None);
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        out.0.unwrap_or_default()
    }

    /// 128 random bits, not all zero (all-zero ids are invalid in W3C trace context), from the
    /// operating system's generator through UUIDv4 (122 of them random).
    fn random_nonzero() -> u128 {
        loop {
            let bits = uuid::Uuid::new_v4().as_u128();
            if bits != 0 {
                return bits;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

        #[test]
        fn a_valid_traceparent_parses_and_prints_back() {
            let sc = parse(VALID).unwrap();
            assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
            assert!(sc.is_sampled());
            assert_eq!(header_value(&sc), VALID);
        }

        #[test]
        fn invalid_traceparents_are_refused() {
            let cases = [
                "",
                &VALID[..54],
                &format!("{VALID}0"),
                &VALID.to_uppercase(),
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "004-bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-+bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-+1",
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ];
            let accepted: Vec<_> = cases.iter().filter(|case| parse(case).is_some()).collect();
            assert!(accepted.is_empty(), "{accepted:?}");
        }

        #[test]
        fn outgoing_continues_the_incoming_trace_under_a_new_span() {
            let incoming = parse(VALID).unwrap();
            let out = parse(&outgoing(Some(VALID))).unwrap();
            assert_eq!(out.trace_id(), incoming.trace_id());
            assert_ne!(out.span_id(), incoming.span_id());
            assert_eq!(out.trace_flags(), incoming.trace_flags());
        }

        #[test]
        fn outgoing_without_incoming_starts_a_sampled_trace() {
            let a = parse(&outgoing(None)).unwrap();
            let b = parse(&outgoing(Some("not a traceparent"))).unwrap();
            assert_ne!(a.trace_id(), b.trace_id());
            assert!(a.is_sampled() && b.is_sampled());
        }
    }
}
