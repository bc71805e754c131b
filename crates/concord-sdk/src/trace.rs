//! W3C trace context across processes: everything of `concord_client::trace` (the current
//! span's `traceparent` for outgoing work, [`continue_from`] for a consumed message, re-exported
//! here), and [`server_span`], the axum middleware that continues an incoming request's trace.
//! The [`Client`](crate::Client) and [`outbox::message`] send the trace.
//!
//! Everything here goes through OpenTelemetry's context of `tracing` spans, so it only has an effect
//! once the process installed a `tracing-opentelemetry` layer and the W3C propagator
//! (`opentelemetry::global::set_text_map_propagator`, which the `concord` binary's telemetry does
//! for every process it runs). Without them nothing is sent and incoming headers are not followed.
//!
//! [`outbox::message`]: crate::outbox::message

use http::Method;

pub use concord_client::trace::*;
#[cfg(all(feature = "axum", feature = "otel"))]
pub use server::server_span;

/// The HTTP method as a bounded label for spans and metrics: extension methods are client-chosen
/// strings, so they fold into `OTHER`.
#[must_use]
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(all(feature = "axum", feature = "otel"))]
mod server {
    use super::{HeaderExtractor, method_label, remote_context};
    use axum::extract::{MatchedPath, Request};
    use axum::middleware::Next;
    use axum::response::Response;
    use opentelemetry::trace::TraceContextExt as _;
    use tracing::Instrument as _;
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    /// Axum middleware: runs the request inside an `http` server span (`method`, `route`, `status`,
    /// `trace_id`; named `<METHOD> <route>`) whose parent is the trace in the request's `traceparent`
    /// header, or a new trace without one. The route is the `MatchedPath` template (`unmatched` when
    /// no route matched), never the raw path, so span names stay few. Use it with
    /// `axum::middleware::from_fn(server_span)` through `Router::layer`, where `MatchedPath` is known.
    pub async fn server_span(req: Request, next: Next) -> Response {
        let method = method_label(req.method());
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        let name = format!("{method} {route}");
        // `otel.*` fields are read by tracing-opentelemetry: the name and kind feed backends' service maps.
        let span = tracing::info_span!(
            "http",
            method,
            route,
            status = Empty,
            trace_id = Empty,
            otel.kind = "server",
            otel.name = name.as_str(),
            otel.status_code = Empty
        );

        let parent = remote_context(&HeaderExtractor(req.headers()));
        let incoming = parent.span().span_context().trace_id();
        let incoming_valid = parent.span().span_context().is_valid();
        // Always set, so a request without a traceparent starts its own trace instead of joining
        // whatever span happens to be current. Fails only without an OpenTelemetry layer.
        let _ = span.set_parent(parent);
        let own = span.context().span().span_context().clone();
        if own.is_valid() {
            span.record("trace_id", own.trace_id().to_string());
        } else if incoming_valid {
            // No tracer here: the incoming trace id still lets logs be matched with the caller's.
            span.record("trace_id", incoming.to_string());
        }

        let response = next.run(req).instrument(span.clone()).await;

        span.record("status", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "error");
        }
        response
    }
}
