//! W3C trace context end to end: the client sends the current span, `server_span` continues an
//! incoming trace or starts one, and outbox messages carry the trace to their consumers.

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::routing::get;
use concord_sdk::trace::{TRACEPARENT, continue_from, inject, server_span, traceparent_of};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::ServiceExt as _;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A tracer that keeps finished spans in memory, installed for the current thread only.
struct Traced {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _default: tracing::subscriber::DefaultGuard,
}

impl Traced {
    fn install() -> Self {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        Self {
            exporter,
            _provider: provider,
            _default: tracing::subscriber::set_default(subscriber),
        }
    }

    fn span(&self, name: &str) -> SpanData {
        let spans = self.exporter.get_finished_spans().unwrap();
        spans
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no span {name:?} among {spans:#?}"))
    }
}

/// A router behind `server_span`: `/health` answers, as its `status`, the traceparent it was
/// sent (`none` without one), so a test sees what the sdk `Client` put on the wire.
fn echo() -> Router {
    Router::new()
        .route(
            "/health",
            get(|headers: HeaderMap| async move {
                let tp = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).unwrap_or("none");
                axum::Json(serde_json::json!({ "status": tp }))
            }),
        )
        .route("/items/{n}", get(|| async { "item" }))
        .layer(axum::middleware::from_fn(server_span))
}

/// Serves `echo()` on a free port; a client of it.
async fn serve() -> concord_sdk::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, echo()).await.unwrap() });
    concord_sdk::Client::new(url, "k1").unwrap()
}

#[tokio::test]
async fn the_client_sends_the_current_span_and_server_span_continues_it() {
    let traced = Traced::install();
    let client = serve().await;

    let order = tracing::info_span!("place order");
    let sent = client.health().instrument(order.clone()).await.unwrap().status;
    let order_tp = traceparent_of(&order).unwrap();
    drop(order);

    assert_eq!(sent, order_tp, "the client sends the span it was called in");
    let order = traced.span("place order");
    let server = traced.span("GET /health");
    assert_eq!(server.span_context.trace_id(), order.span_context.trace_id());
    assert_eq!(server.parent_span_id, order.span_context.span_id());
    assert_eq!(server.span_kind, SpanKind::Server);
    assert!(server.parent_span_is_remote);
    let status = server.attributes.iter().find(|kv| kv.key.as_str() == "status");
    assert_eq!(status.map(|kv| kv.value.to_string()), Some("200".to_owned()));
}

#[tokio::test]
async fn server_span_continues_an_incoming_traceparent() {
    let traced = Traced::install();
    let req = Request::builder()
        .uri("/items/7")
        .header(TRACEPARENT, INCOMING)
        .body(Body::empty())
        .unwrap();
    let res = echo().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);

    let server = traced.span("GET /items/{n}");
    assert_eq!(
        server.span_context.trace_id(),
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
    );
    assert_eq!(server.parent_span_id, SpanId::from_hex("00f067aa0ba902b7").unwrap());
    let trace_id = server.attributes.iter().find(|kv| kv.key.as_str() == "trace_id");
    assert_eq!(
        trace_id.map(|kv| kv.value.to_string()),
        Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
    );
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace_of_its_own() {
    let traced = Traced::install();
    let outer = tracing::info_span!("outer");
    let req = Request::builder().uri("/nowhere").body(Body::empty()).unwrap();
    let res = echo().oneshot(req).instrument(outer.clone()).await.unwrap();
    assert_eq!(res.status(), 404);
    drop(outer);

    let server = traced.span("GET unmatched");
    assert_eq!(server.parent_span_id, SpanId::INVALID);
    assert_ne!(
        server.span_context.trace_id(),
        traced.span("outer").span_context.trace_id()
    );
}

#[tokio::test]
async fn without_a_tracer_nothing_is_sent() {
    let client = serve().await;
    let span = tracing::info_span!("untraced");
    assert_eq!(traceparent_of(&span), None);
    let sent = client.health().instrument(span.clone()).await.unwrap().status;
    assert_eq!(sent, "none");
    span.in_scope(|| {
        let mut headers = HeaderMap::new();
        inject(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        assert!(
            concord_sdk::outbox::message("t", "k", serde_json::json!({}))
                .headers
                .is_empty()
        );
    });
}

#[tokio::test]
async fn outbox_messages_carry_the_trace_and_consumers_continue_it() {
    let traced = Traced::install();
    let produce = tracing::info_span!("produce");
    let message = produce.in_scope(|| concord_sdk::outbox::message("stock", "apple", serde_json::json!({})));
    assert_eq!(message.headers.get(TRACEPARENT), traceparent_of(&produce).as_ref());
    drop(produce);

    let consume = tracing::info_span!("consume");
    continue_from(&consume, &message.headers[TRACEPARENT]);
    drop(consume);
    let (produce, consume) = (traced.span("produce"), traced.span("consume"));
    assert_eq!(consume.span_context.trace_id(), produce.span_context.trace_id());
    assert_eq!(consume.parent_span_id, produce.span_context.span_id());

    let lost = tracing::info_span!("lost");
    continue_from(&lost, "not a traceparent");
    drop(lost);
    assert_eq!(traced.span("lost").parent_span_id, SpanId::INVALID);
}
