//! Black-box tests of one trace across processes in span files: a caller's span, sent by the sdk
//! client as `traceparent`, is the parent of the real `concord` server's request span in the
//! server's own `CONCORD_TRACE_FILE`, and of the calls its saga runner makes to participants; a
//! span is on disk as soon as it ends, so a SIGKILL after the answer loses nothing of it.

use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use concord_sdk::{EventInput, ExpectedVersion, StartSagaBody};
use concord_server::telemetry::SpanFileExporter;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[path = "support/proc.rs"]
mod proc;
use proc::*;

fn spans(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
}

/// Spans of this thread go to `path` as service `shop`, until the guard drops. The tests run on
/// the current-thread runtime, so the clients and the services they spawn stay on this thread.
fn trace_this_thread(path: &Path) -> (SdkTracerProvider, tracing::subscriber::DefaultGuard) {
    // What `telemetry::init` sets up in every process of the binary; `server_span` reads
    // incoming headers through it.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = SpanFileExporter::append_to(path, "shop".into()).unwrap();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let guard = tracing::subscriber::set_default(subscriber);
    (provider, guard)
}

/// `concord serve` writing its spans to `path` as service `concord-under-test`.
async fn traced_server(dir: &Path, path: &Path) -> Server {
    let mut cmd = serve(dir);
    cmd.env("CONCORD_TRACE_FILE", path)
        .env("OTEL_SERVICE_NAME", "concord-under-test")
        // The test's participants listen on loopback.
        .env("CONCORD_SAGA_ALLOWED_HOSTS", r#"["127.0.0.1"]"#);
    Server::start(cmd).await
}

#[tokio::test]
async fn the_servers_request_span_continues_the_callers_trace_in_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let (server_file, caller_file) = (dir.path().join("concord.jsonl"), dir.path().join("shop.jsonl"));
    let mut server = traced_server(dir.path(), &server_file).await;
    let _traced = trace_this_thread(&caller_file);

    let client = server.sdk();
    let order = tracing::info_span!("place order");
    let placed = EventInput {
        id: None,
        event_type: "OrderPlaced".into(),
        data: serde_json::json!({"total": 30}),
        metadata: None,
    };
    within(
        "a traced append",
        client
            .append("order-7", ExpectedVersion::NoStream, vec![placed])
            .instrument(order.clone()),
    )
    .await
    .unwrap();
    drop(order);

    server.proc.signal("KILL");
    let status = server.proc.wait().await;
    assert!(!status.success(), "{status}");

    let caller = spans(&caller_file);
    let order = named(&caller, "place order");
    assert_eq!(order["service"], "shop");
    let recorded = spans(&server_file);
    let request = named(&recorded, "POST /v1/streams/{stream}");
    assert_eq!(request["service"], "concord-under-test");
    assert_eq!(request["trace_id"], order["trace_id"]);
    assert_eq!(request["parent_span_id"], order["span_id"]);
    assert_eq!(request["attributes"]["route"], "/v1/streams/{stream}");
    assert_eq!(request["attributes"]["method"], "POST");
    assert_eq!(request["attributes"]["status"], "200");
    assert_eq!(request["attributes"]["trace_id"], order["trace_id"]);
}

#[tokio::test]
async fn a_sagas_participant_call_joins_the_trace_of_the_request_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server_file, shop_file) = (dir.path().join("concord.jsonl"), dir.path().join("shop.jsonl"));
    let mut server = traced_server(dir.path(), &server_file).await;
    let _traced = trace_this_thread(&shop_file);

    // A participant built on the sdk, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let participant = format!("http://{}", listener.local_addr().unwrap());
    let router = Router::new()
        .route(
            "/reservations",
            post(|| async { axum::Json(serde_json::json!({"reserved": 1})) }),
        )
        .layer(axum::middleware::from_fn(concord_sdk::trace::server_span));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let client = server.sdk();
    let definition = serde_json::json!({"steps": [
        {"name": "reserve", "action": {"method": "POST", "url": format!("{participant}/reservations")}}
    ]});
    within("a definition", client.put_saga_definition("place-order", &definition))
        .await
        .unwrap();
    let order = tracing::info_span!("place order");
    let body = StartSagaBody {
        definition: "place-order".into(),
        input: serde_json::json!({}),
        id: None,
    };
    let saga = within(
        "a traced saga",
        client
            .start_saga(&body, Some(Duration::from_secs(10)))
            .instrument(order.clone()),
    )
    .await
    .unwrap();
    assert_eq!(saga.status, "completed", "{saga:#?}");
    drop(order);

    server.proc.signal("KILL");
    server.proc.wait().await;

    let shop = spans(&shop_file);
    let order = named(&shop, "place order");
    let reservation = named(&shop, "POST /reservations");
    let recorded = spans(&server_file);
    let start = named(&recorded, "POST /v1/sagas");
    let call = named(&recorded, "saga reserve action");
    for span in [start, call, reservation] {
        assert_eq!(span["trace_id"], order["trace_id"], "{span}");
    }
    assert_eq!(start["parent_span_id"], order["span_id"]);
    assert_eq!(call["parent_span_id"], order["span_id"]);
    assert_eq!(call["service"], "concord-under-test");
    assert_eq!(reservation["parent_span_id"], call["span_id"]);
}
