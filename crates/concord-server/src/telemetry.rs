//! Logs, traces and metrics: the tracing subscriber, OpenTelemetry export (OTLP and a span file),
//! W3C trace context, Prometheus.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use concord_sdk::trace::{self, TRACEPARENT, method_label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanId, Status, TracerProvider as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::Serialize;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

const DEFAULT_FILTER: &str = "info,sqlx=warn";
const DEFAULT_SERVICE_NAME: &str = "concord";
/// A path: finished spans are appended to it as JSON lines ([`SpanFileExporter`]).
pub const TRACE_FILE_VAR: &str = "CONCORD_TRACE_FILE";
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
            eprintln!("telemetry: failed to shut down the tracer provider: {err}");
        }
    }
}

/// Installs the global tracing subscriber: `EnvFilter` from `RUST_LOG` (default `info,sqlx=warn`),
/// human-readable or JSON lines on stderr, plus span export to OpenTelemetry when configured:
/// OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
/// JSON lines appended to the file `CONCORD_TRACE_FILE` names when that is set ([`SpanFileExporter`]),
/// both when both are. Spans carry the service name `OTEL_SERVICE_NAME` (default `concord`).
/// Always installs the W3C `TraceContext` propagator. Every process the binary runs calls it
/// once at start; safe to call more than once: later calls leave the first subscriber in place.
pub fn init(json: bool) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Escape codes are noise in journald/docker logs; NO_COLOR is honoured as usual.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };

    let (provider, problems) = tracer_provider();
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
    for (what, err) in problems {
        tracing::warn!(error = %err, "{what}");
    }
    if let Some(provider) = &provider {
        // Lets libraries that use the OTel API directly join the same pipeline.
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    TelemetryGuard { provider }
}

/// The tracer provider for the exports the environment asks for (`None` when it asks for none),
/// and the exports that could not be set up, each with its error.
fn tracer_provider() -> (Option<SdkTracerProvider>, Vec<(&'static str, String)>) {
    let service_name = service_name();
    let mut builder = SdkTracerProvider::builder();
    let mut exporting = false;
    let mut problems = Vec::new();
    match otlp_exporter() {
        Ok(Some(exporter)) => {
            builder = builder.with_batch_exporter(exporter);
            exporting = true;
        }
        Ok(None) => {}
        Err(err) => problems.push(("OTLP trace export disabled", err.to_string())),
    }
    if let Some(path) = std::env::var_os(TRACE_FILE_VAR).filter(|v| !v.is_empty()) {
        match SpanFileExporter::append_to(Path::new(&path), service_name.clone()) {
            // Simple, not batched: each span is on disk when it ends, so a process killed with
            // SIGKILL loses only the spans still open.
            Ok(exporter) => {
                builder = builder.with_simple_exporter(exporter);
                exporting = true;
            }
            Err(err) => problems.push((
                "trace file export disabled",
                format!("{}: {err}", Path::new(&path).display()),
            )),
        }
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    (exporting.then(|| builder.with_resource(resource).build()), problems)
}

fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned())
}

fn otlp_exporter() -> Result<Option<opentelemetry_otlp::SpanExporter>, opentelemetry_otlp::ExporterBuildError> {
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
    Ok(Some(exporter))
}

/// Appends each finished span to a file as one JSON object per line:
///
/// ```json
/// {"trace_id":"4bf9…4736","span_id":"00f0…02b7","parent_span_id":null,"name":"POST /v1/sagas",
///  "service":"concord","start_unix_nanos":1764000000000000000,"end_unix_nanos":1764000000001000000,
///  "attributes":{"method":"POST","route":"/v1/sagas","status":"201"},"status":"unset"}
/// ```
///
/// Ids are lower-case hex; `parent_span_id` is `null` for a root span; attribute values are
/// strings whatever their OpenTelemetry type; `status` is `unset`, `ok` or `error`. Several
/// processes may append to one file, and a reader should skip a torn last line (a process killed
/// in the middle of a write).
#[derive(Debug)]
pub struct SpanFileExporter {
    /// One `write_all` per batch under the lock, so lines of concurrent batches never interleave.
    file: Mutex<File>,
    service: String,
}

impl SpanFileExporter {
    /// Opens (creating it if needed) `path` for appending; spans are labelled `service`.
    ///
    /// # Errors
    /// When the file cannot be opened for appending.
    pub fn append_to(path: &Path, service: String) -> std::io::Result<Self> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(Self {
            file: Mutex::new(file),
            service,
        })
    }

    fn write(&self, batch: &[SpanData]) -> OTelSdkResult {
        let mut lines = String::new();
        for span in batch {
            let line = serde_json::to_string(&SpanLine::of(span, &self.service))
                .map_err(|e| OTelSdkError::InternalFailure(format!("span not encoded: {e}")))?;
            lines.push_str(&line);
            lines.push('\n');
        }
        let mut file = self
            .file
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("trace file lock poisoned".into()))?;
        file.write_all(lines.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| OTelSdkError::InternalFailure(format!("trace file not written: {e}")))
    }
}

impl SpanExporter for SpanFileExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        // The write is synchronous on purpose: the span is on disk once the processor returns.
        std::future::ready(self.write(&batch))
    }
}

/// One line of the trace file; see [`SpanFileExporter`].
#[derive(Serialize)]
struct SpanLine<'a> {
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    name: &'a str,
    service: &'a str,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    attributes: BTreeMap<&'a str, String>,
    status: &'static str,
}

impl<'a> SpanLine<'a> {
    fn of(span: &'a SpanData, service: &'a str) -> Self {
        fn unix_nanos(t: SystemTime) -> u64 {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }
        Self {
            trace_id: span.span_context.trace_id().to_string(),
            span_id: span.span_context.span_id().to_string(),
            parent_span_id: (span.parent_span_id != SpanId::INVALID).then(|| span.parent_span_id.to_string()),
            name: &span.name,
            service,
            start_unix_nanos: unix_nanos(span.start_time),
            end_unix_nanos: unix_nanos(span.end_time),
            attributes: span
                .attributes
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str().into_owned()))
                .collect(),
            status: match span.status {
                Status::Unset => "unset",
                Status::Ok => "ok",
                Status::Error { .. } => "error",
            },
        }
    }
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

/// The valid `traceparent` a request came with, put in its extensions by [`observe`] for the
/// routes that keep it (a saga or a transaction continues its starter's trace, across restarts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingTrace(pub String);

/// Per-request span, W3C context propagation and HTTP metrics; use with
/// `axum::middleware::from_fn(observe)` via `Router::layer` so `MatchedPath` is available.
/// The span is the sdk's [`server_span`](concord_sdk::trace::server_span) (named `POST /v1/sagas`
/// and so on), so the server and the services built on the sdk trace requests alike; a valid
/// incoming `traceparent` is put in the request's extensions ([`IncomingTrace`]).
pub async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    // The raw path would create one series per stream id, so only the route template is used.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let incoming = req
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| trace::parse(v).is_some())
        .map(|v| IncomingTrace(v.to_owned()));
    if let Some(trace) = incoming {
        req.extensions_mut().insert(trace);
    }

    let response = trace::server_span(req, next).await;

    let status = response.status().as_u16();
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

    #[tokio::test]
    async fn observe_records_route_template_and_trace_context() {
        use axum::{Extension, Router, body::Body, routing::get};
        use tower::ServiceExt as _;

        let handle = metrics_handle();
        let app = Router::new()
            .route(
                "/t/items/{id}",
                get(|tp: Option<Extension<IncomingTrace>>| async move {
                    tp.map(|Extension(IncomingTrace(tp))| tp).unwrap_or_default()
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
        assert_eq!(&body[..], VALID.as_bytes());

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

    #[test]
    fn the_trace_file_gets_one_json_line_per_finished_span_after_what_it_held() {
        use tracing_subscriber::layer::SubscriberExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.jsonl");
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let exporter = SpanFileExporter::append_to(&path, "orders".into()).unwrap();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let order = tracing::info_span!("place order", order = 42, otel.kind = "server");
            order.in_scope(|| tracing::info_span!("reserve", otel.status_code = "error").in_scope(|| {}));
        });

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], serde_json::json!({"earlier": true}));
        // A child ends, and is written, before its parent.
        let (reserve, order) = (&lines[1], &lines[2]);
        let keys: Vec<&str> = order.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "attributes",
                "end_unix_nanos",
                "name",
                "parent_span_id",
                "service",
                "span_id",
                "start_unix_nanos",
                "status",
                "trace_id"
            ]
        );
        assert_eq!(order["name"], "place order");
        assert_eq!(order["service"], "orders");
        assert_eq!(order["parent_span_id"], serde_json::Value::Null);
        assert_eq!(order["status"], "unset");
        assert_eq!(order["attributes"]["order"], "42");
        assert_eq!(order["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(order["span_id"].as_str().unwrap().len(), 16);
        assert!(order["start_unix_nanos"].as_u64().unwrap() <= order["end_unix_nanos"].as_u64().unwrap());
        assert!(order["start_unix_nanos"].as_u64().unwrap() > 1_600_000_000_000_000_000);

        assert_eq!(reserve["name"], "reserve");
        assert_eq!(reserve["trace_id"], order["trace_id"]);
        assert_eq!(reserve["parent_span_id"], order["span_id"]);
        assert_eq!(reserve["status"], "error");
        assert!(reserve["start_unix_nanos"].as_u64() >= order["start_unix_nanos"].as_u64());
    }
}
