//! The client against a scripted server: paths, queries, bodies, problems, subscriptions.

use super::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves one connection: reads one request, writes `parts` with pauses between them, closes.
async fn serve_once(parts: Vec<Vec<u8>>) -> (Client, JoinHandle<String>) {
    install_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(format!("http://{}/", listener.local_addr().unwrap()), "k1").unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0; 4096];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_lowercase();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if request.len() >= head_end + 4 + length {
                    break;
                }
            }
            assert!(n > 0, "request cut short");
        }
        for part in parts {
            socket.write_all(&part).await.unwrap();
            socket.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        String::from_utf8(request).unwrap()
    });
    (client, server)
}

fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn append_encodes_the_path_and_sends_key_and_body() {
    let (client, server) = serve_once(vec![answer(
        "201 Created",
        "application/json",
        r#"{"stream":"$audit:a/b","first_version":1,"last_version":1,"position":5}"#,
    )])
    .await;
    let body = AppendBody {
        expected_version: Some(ExpectedVersion::NoStream.into()),
        events: vec![EventInput {
            id: None,
            event_type: "Noted".into(),
            data: serde_json::json!({"n": 1}),
            metadata: None,
        }],
    };
    let appended = client.append_with("$audit:a/b", &body, Some("idem-1")).await.unwrap();
    assert_eq!(appended.position, 5);
    let request = server.await.unwrap();
    assert!(
        request.starts_with("POST /v1/streams/$audit:a%2Fb HTTP/1.1\r\n"),
        "{request}"
    );
    let lower = request.to_lowercase();
    assert!(lower.contains("\r\nauthorization: bearer k1\r\n"), "{request}");
    assert!(lower.contains("\r\nidempotency-key: idem-1\r\n"), "{request}");
    assert!(request.ends_with(r#"{"expected_version":"no_stream","events":[{"type":"Noted","data":{"n":1}}]}"#));
}

#[tokio::test]
async fn queries_are_encoded() {
    let (client, server) = serve_once(vec![answer(
        "200 OK",
        "application/json",
        r#"{"events":[],"next":null}"#,
    )])
    .await;
    let page = client.group_events("g 1", 2, 3, Some("a&b"), 500, 10).await.unwrap();
    assert!(page.events.is_empty());
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/subscriptions/g%201/events?member=2&size=3&category=a%26b&wait_ms=500&limit=10 "),
        "{request}"
    );
}

const SAGA: &str = r#"{"id":"order:42/a","definition":"order.v2","version":1,"status":"running",
    "input":{},"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}"#;

#[tokio::test]
async fn saga_ids_are_encoded_and_waits_sent_in_milliseconds() {
    let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
    let saga = client
        .saga("order:42/a", Some(Duration::from_millis(1500)))
        .await
        .unwrap();
    assert_eq!((saga.id.as_str(), saga.steps.len()), ("order:42/a", 0));
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/sagas/order:42%2Fa?wait_ms=1500 "),
        "{request}"
    );

    let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
    client.retry_saga("order:42/a", None).await.unwrap();
    let request = server.await.unwrap();
    assert!(
        request.starts_with("POST /v1/sagas/order:42%2Fa/retry HTTP/1.1\r\n"),
        "{request}"
    );
}

#[tokio::test]
async fn saga_lists_encode_their_query() {
    let (client, server) = serve_once(vec![answer("200 OK", "application/json", r#"{"sagas":[],"next":"b"}"#)]).await;
    let page = client.list_sagas(Some("failed"), Some("a&b"), 10).await.unwrap();
    assert_eq!(page.next.as_deref(), Some("b"));
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/sagas?status=failed&limit=10&after=a%26b "),
        "{request}"
    );
}

#[tokio::test]
async fn created_tells_201_from_200() {
    let definition = r#"{"name":"order.v2","version":3,"definition":{"steps":[]},
        "created_at":"2026-01-01T00:00:00Z"}"#;
    let steps = serde_json::json!({"steps": []});
    for (status, created) in [("201 Created", true), ("200 OK", false)] {
        let (client, server) = serve_once(vec![answer(status, "application/json", definition)]).await;
        let put = client.put_saga_definition_created("order.v2", &steps).await.unwrap();
        assert_eq!((put.value.version, put.created), (3, created));
        let request = server.await.unwrap();
        assert!(request.starts_with("PUT /v1/saga-definitions/order.v2 "), "{request}");
        assert!(request.ends_with(r#"{"steps":[]}"#), "{request}");
    }
    let body = StartSagaBody {
        definition: "order.v2".into(),
        input: serde_json::json!({"n": 1}),
        id: None,
    };
    let (client, server) = serve_once(vec![answer("200 OK", "application/json", SAGA)]).await;
    assert!(!client.start_saga_created(&body, None).await.unwrap().created);
    let request = server.await.unwrap();
    assert!(request.starts_with("POST /v1/sagas HTTP/1.1\r\n"), "{request}");
    assert!(
        request.ends_with(r#"{"definition":"order.v2","input":{"n":1}}"#),
        "{request}"
    );
}

#[tokio::test]
async fn problem_bodies_become_problems() {
    let (client, _server) = serve_once(vec![answer(
        "409 Conflict",
        "application/problem+json",
        r#"{"type":"urn:concord:error:wrong_expected_version","title":"Wrong expected version",
            "status":409,"detail":"stream order-1 is at 3","code":"wrong_expected_version",
            "current_version":3}"#,
    )])
    .await;
    let err = client
        .append("order-1", ExpectedVersion::Exact(2), vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::WrongExpectedVersion));
    assert_eq!(err.status(), Some(409));
    let ClientError::Problem(problem) = err else {
        panic!("{err:?}")
    };
    assert_eq!(problem.current_version, Some(3));
}

#[tokio::test]
async fn other_bodies_become_problems_from_the_status() {
    let (client, _server) = serve_once(vec![answer("502 Bad Gateway", "text/html", "<h1>upstream down</h1>")]).await;
    let err = client.health().await.unwrap_err();
    assert_eq!(err.code(), None);
    assert_eq!(err.status(), Some(502));
    let ClientError::Problem(problem) = err else {
        panic!("{err:?}")
    };
    assert_eq!(problem.code, "http_502");
    assert_eq!(problem.detail, "<h1>upstream down</h1>");

    let (client, _server) = serve_once(vec![answer("404 Not Found", "text/plain", "")]).await;
    assert_eq!(
        client.revoke_key(Uuid::nil()).await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
}

#[tokio::test]
async fn dot_segments_are_refused_locally() {
    install_provider();
    let client = Client::with_http("http://127.0.0.1:9", "k", reqwest::Client::new());
    for name in ["", ".", ".."] {
        let err = client.read_stream(name, 1, 10).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidStreamName));
    }
    let err = client.saga("..", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidName));
    let err = client
        .put_saga_definition(".", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidName));
}

#[tokio::test]
async fn subscription_reads_events_split_across_chunks() {
    let event = |position: u64| {
        format!(
            r#"{{"id":"00000000-0000-0000-0000-00000000000{position}","stream":"order-1","version":{position},"position":{position},"type":"T","data":{{}},"metadata":{{}},"recorded_at":"2026-01-01T00:00:00Z"}}"#
        )
    };
    let body = format!(
        ": hello\r\n\r\nid: 1\r\nevent: event\r\ndata: {}\r\n\r\nevent: other\ndata: x\n\nid: 2\nevent: event\ndata: {}\n\n",
        event(1),
        event(2)
    );
    let (head, tail) = body.as_bytes().split_at(40);
    let (client, server) = serve_once(vec![
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec(),
        head.to_vec(),
        tail.to_vec(),
    ])
    .await;
    let mut subscription = client.subscribe(0, Some("order")).await.unwrap();
    let positions = [
        subscription.next().await.unwrap().unwrap().position,
        subscription.next().await.unwrap().unwrap().position,
    ];
    assert_eq!(positions, [1, 2]);
    assert_eq!(subscription.last_position(), 2);
    assert!(subscription.next().await.is_none());
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/events/subscribe?after=0&category=order "),
        "{request}"
    );
    assert!(request.to_lowercase().contains("\r\naccept: text/event-stream\r\n"));
}
