//! Logs, traces and metrics: the tracing subscriber, OpenTelemetry export, W3C trace context, Prometheus.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rand::Rng as _;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

const DEFAULT_FILTER: &str = "info,sqlx=warn";
const DEFAULT_SERVICE_NAME: &str = "concord";
const REQUESTS_TOTAL: &str = "concord_http_requests_total";
const REQUEST_DURATION: &str = "concord_http_request_duration_seconds";
/// Seconds; spans sub-millisecond cache hits up to slow long-polls.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Keeps trace export alive; dropping it flushes buffered spans and stops the exporter.
#[derive(Debug)]
#[must_use = "dropping the guard shuts down trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            // The subscriber may already be gone at this point, so stderr is the only reliable sink.
            eprintln!("telemetry: failed to shut down the OTLP tracer provider: {err}");
        }
    }
}

/// Installs the global tracing subscriber: `EnvFilter` from `RUST_LOG` (default `info,sqlx=warn`),
/// human-readable or JSON lines on stderr, plus OTLP/HTTP span export when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
/// Always installs the W3C `TraceContext` propagator. Safe to call more than once: later calls
/// leave the first subscriber in place.
pub fn init(json: bool) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Escape codes are noise in journald/docker logs; NO_COLOR is honoured as usual.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };

    let (provider, otlp_error) = match otlp_provider() {
        Ok(provider) => (provider, None),
        Err(err) => (None, Some(err)),
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(DEFAULT_SERVICE_NAME)));

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        // Another subscriber owns the process; an exporter nobody feeds would only hold a thread.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return TelemetryGuard { provider: None };
    }
    if let Some(err) = otlp_error {
        tracing::warn!(error = %err, "OTLP trace export disabled");
    }
    if let Some(provider) = &provider {
        // Lets libraries that use the OTel API directly join the same pipeline.
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    TelemetryGuard { provider }
}

fn otlp_provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;

    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    // reqwest is built with `rustls-no-provider` and panics while building a client without a
    // process-wide crypto provider. Installing fails harmlessly if the binary already did it.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        // Pinned because only the protobuf encoding is compiled in, whatever OTEL_EXPORTER_OTLP_PROTOCOL says.
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Installs (once per process) the global Prometheus recorder and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = match prometheus_builder().install_recorder() {
                Ok(handle) => handle,
                Err(err) => {
                    // Some other recorder won the race; hand out a detached one so callers still work.
                    tracing::warn!(error = %err, "Prometheus recorder not installed; metrics will be empty");
                    return prometheus_builder().build_recorder().handle();
                }
            };
            metrics::describe_counter!(REQUESTS_TOTAL, "HTTP requests served.");
            metrics::describe_histogram!(REQUEST_DURATION, metrics::Unit::Seconds, "HTTP request latency.");
            // install_recorder() spawns no upkeep task, and without one histogram samples pile up
            // between scrapes.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "metrics upkeep thread not started");
            }
            handle
        })
        .clone()
}

fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .expect("bucket list is non-empty")
}

/// A parsed W3C `traceparent` header; also stored in request extensions by [`observe`].
/// `Display` renders it back as a version-00 header value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: u8,
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

/// Parses a W3C `traceparent` header value; `None` when invalid.
#[must_use]
pub fn parse_traceparent(v: &str) -> Option<TraceParent> {
    fn lower_hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    fn non_zero(s: &str) -> bool {
        s.bytes().any(|b| b != b'0')
    }

    if v.len() != 55 {
        return None;
    }
    let mut parts = v.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && lower_hex(version, 2)
        && version != "ff"
        && lower_hex(trace_id, 32)
        && non_zero(trace_id)
        && lower_hex(parent_id, 16)
        && non_zero(parent_id)
        && lower_hex(flags, 2);
    well_formed.then(|| TraceParent {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags: u8::from_str_radix(flags, 16).unwrap_or_default(),
    })
}

/// The `traceparent` value for an outgoing call made from the current tracing span: the
/// OpenTelemetry span context when a tracer is active, else the incoming trace continued under a
/// fresh span id, else a brand-new trace.
#[must_use]
pub fn outgoing_traceparent(incoming: Option<&TraceParent>) -> String {
    let cx = tracing::Span::current().context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    if sc.is_valid() {
        return format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
    }
    let next = match incoming {
        Some(tp) => TraceParent {
            trace_id: tp.trace_id.clone(),
            parent_id: random_hex::<8>(),
            flags: tp.flags,
        },
        // Sampled, so downstream parent-based samplers still record the trace we start here.
        None => TraceParent {
            trace_id: random_hex::<16>(),
            parent_id: random_hex::<8>(),
            flags: 0x01,
        },
    };
    next.to_string()
}

fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // All-zero ids are invalid in W3C trace context.
    while bytes.iter().all(|&b| b == 0) {
        rand::rng().fill_bytes(&mut bytes);
    }
    bytes.iter().fold(String::with_capacity(N * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// Extension methods are client-chosen strings; folding them keeps label cardinality bounded.
fn method_label(method: &Method) -> &'static str {
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

/// Per-request span, W3C context propagation and HTTP metrics; use with
/// `axum::middleware::from_fn(observe)` via `Router::layer` so `MatchedPath` is available.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    // The raw path would create one series per stream id, so only the route template is used.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    // `otel.*` fields are read by tracing-opentelemetry: span kind feeds backends' service maps.
    let span = tracing::info_span!(
        "http",
        method,
        route = route.as_str(),
        status = Empty,
        trace_id = Empty,
        otel.kind = "server",
        otel.status_code = Empty
    );

    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
    // Fails only when no OpenTelemetry layer is installed, which is a supported setup.
    let _ = span.set_parent(parent);

    let incoming = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let otel_cx = span.context();
    let otel_sc = otel_cx.span().span_context().clone();
    let trace_id = if otel_sc.is_valid() {
        Some(otel_sc.trace_id().to_string())
    } else {
        incoming.as_ref().map(|tp| tp.trace_id.clone())
    };
    if let Some(trace_id) = &trace_id {
        span.record("trace_id", trace_id.as_str());
    }
    if let Some(tp) = incoming {
        req.extensions_mut().insert(tp);
    }

    let response = next.run(req).instrument(span.clone()).await;

    let status = response.status().as_u16();
    span.record("status", status);
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    metrics::counter!(
        REQUESTS_TOTAL,
        "method" => method,
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(REQUEST_DURATION, "method" => method, "route" => route).record(start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_traceparent() {
        let tp = parse_traceparent(VALID).unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id, "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), VALID);
    }

    #[test]
    fn rejects_invalid_traceparents() {
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
        ];
        for case in cases {
            assert_eq!(parse_traceparent(case), None, "{case:?}");
        }
    }

    #[test]
    fn outgoing_continues_incoming_trace() {
        let incoming = parse_traceparent(VALID).unwrap();
        let out = parse_traceparent(&outgoing_traceparent(Some(&incoming))).unwrap();
        assert_eq!(out.trace_id, incoming.trace_id);
        assert_ne!(out.parent_id, incoming.parent_id);
        assert_eq!(out.flags, incoming.flags);
    }

    #[test]
    fn outgoing_without_incoming_starts_a_valid_trace() {
        let a = parse_traceparent(&outgoing_traceparent(None)).unwrap();
        let b = parse_traceparent(&outgoing_traceparent(None)).unwrap();
        assert_ne!(a.trace_id, b.trace_id);
    }

    #[tokio::test]
    async fn observe_records_route_template_and_trace_context() {
        use axum::{Extension, Router, body::Body, routing::get};
        use tower::ServiceExt as _;

        let handle = metrics_handle();
        let app = Router::new()
            .route(
                "/t/items/{id}",
                get(|tp: Option<Extension<TraceParent>>| async move {
                    tp.map(|Extension(tp)| tp.trace_id).unwrap_or_default()
                }),
            )
            .layer(axum::middleware::from_fn(observe));
        let req = Request::builder()
            .uri("/t/items/42")
            .header("traceparent", VALID)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"4bf92f3577b34da6a3ce929d0e0e4736");

        let req = Request::builder().uri("/nowhere/42").body(Body::empty()).unwrap();
        let _ = app.oneshot(req).await.unwrap();

        let text = handle.render();
        assert!(
            text.contains(r#"concord_http_requests_total{method="GET",route="/t/items/{id}",status="200"}"#),
            "{text}"
        );
        assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
        assert!(!text.contains("/t/items/42"), "{text}");
    }
}
