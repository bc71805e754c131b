//! A server that holds under hostile clients: slow request heads are cut off, event streams and
//! requests per key are capped.

use crate::helpers::{Backend, spawn_app_with};
use reqwest::Method;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A client that sends its request head one byte at a time is cut off by the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.header_read_timeout_ms = 500).await else {
        return;
    };
    let addr = app.address.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let closed = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = read.read_to_end(&mut buf).await;
        Instant::now()
    });
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(100)
    );
    let started = Instant::now();
    let mut sent = 0;
    for byte in head.bytes() {
        if closed.is_finished() || write.write_all(&[byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent < head.len(), "the server waited for the whole head ({sent} bytes)");
    let at = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .unwrap()
        .unwrap();
    assert!(at.duration_since(started) < Duration::from_secs(15));
}

/// A client that connects and sends nothing, or goes quiet after a request, does not keep its
/// connection (and its place among `max_connections`) past the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.header_read_timeout_ms = 500).await else {
        return;
    };
    let addr = app.address.trim_start_matches("http://").to_owned();
    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 4096];
        let started = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    };
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(silent).await.is_some(), "a silent connection is closed");
    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial.write_all(b"P").await.unwrap();
    assert!(closed_within(partial).await.is_some(), "one byte and silence: closed");
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        closed_within(idle).await.is_some(),
        "an idle keep-alive connection is closed"
    );
}

/// Past `max_subscribers` streams a subscriber gets 503 `too_many_subscribers`; a stream that
/// ends gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_past_the_cap_get_503() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.max_subscribers = 2).await else {
        return;
    };
    let open = || async {
        app.admin(Method::GET, "/v1/events/subscribe")
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
    };
    let first = open().await;
    let second = open().await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = open().await;
    assert_eq!(third.status(), 503);
    assert!(third.headers().contains_key("retry-after"));
    let body: serde_json::Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_subscribers", "{body}");
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        let r = open().await;
        if r.status() == 200 {
            reopened = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed stream gives its place back");
    drop(second);
}

/// One key cannot hold more than `max_subscribers_per_key` streams; another key still can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holds_at_most_its_share_of_streams() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.max_subscribers_per_key = 1).await else {
        return;
    };
    let reader = app.create_key(&["events:read"]).await;
    let open = |key: String| {
        let app = &app;
        async move {
            app.request(Method::GET, "/v1/events/subscribe", Some(&key))
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap()
        }
    };
    let first = open(reader.clone()).await;
    assert_eq!(first.status(), 200);
    let second = open(reader.clone()).await;
    assert_eq!(second.status(), 429);
    let other = open(app.admin_key.clone()).await;
    assert_eq!(other.status(), 200, "another key has its own share");
    drop((first, other));
}

/// A key with `max_concurrent_requests_per_key` requests in progress gets 429 for one more;
/// another key is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_concurrent_requests_gets_429() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.max_concurrent_requests_per_key = 2).await else {
        return;
    };
    let reader = app.create_key(&["events:read"]).await;
    // Two long polls of a consumer group hold both of the reader's slots.
    let poll = |n: u32| {
        app.request(
            Method::GET,
            &format!("/v1/subscriptions/g{n}/events?wait_ms=5000"),
            Some(&reader),
        )
        .send()
    };
    let (a, b) = (tokio::spawn(poll(1)), tokio::spawn(poll(2)));
    let mut refused = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let r = app
            .request(Method::GET, "/v1/events?limit=1", Some(&reader))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("a third request of the key is refused while two run");
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "too_many_concurrent_requests", "{body}");
    let r = app.admin(Method::GET, "/v1/events?limit=1").send().await.unwrap();
    assert_eq!(r.status(), 200, "another key has its own share");
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    let r = app
        .request(Method::GET, "/v1/events?limit=1", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the slots came back");
}

/// A page holds at most `max_read_bytes` of events (always one), and the next page goes on
/// where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_its_byte_budget() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.max_read_bytes = 2500).await else {
        return;
    };
    let pad = "x".repeat(1000);
    let events: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"type": "Big", "data": {"n": i, "pad": pad}}))
        .collect();
    let r = app.append("big-1", serde_json::json!({"events": events})).await;
    assert_eq!(r.status(), 200);
    let page = |path: String| {
        let app = &app;
        async move {
            let r = app.admin(Method::GET, &path).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["data"]["n"].as_u64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page("/v1/streams/big-1?limit=100".into()).await, vec![0, 1]);
    assert_eq!(page("/v1/streams/big-1?from=3&limit=100".into()).await, vec![2]);
    // A reader that follows `next` gets every event: a short page is not the end.
    let mut seen = Vec::new();
    let mut from = 1;
    loop {
        let r = app
            .admin(Method::GET, &format!("/v1/streams/big-1?from={from}&limit=100"))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = r.json().await.unwrap();
        let events = body["events"].as_array().unwrap();
        seen.extend(events.iter().map(|e| e["data"]["n"].as_u64().unwrap()));
        match body["next"].as_u64() {
            Some(next) if !events.is_empty() => from = next,
            _ => break,
        }
    }
    assert_eq!(seen, vec![0, 1, 2]);
    assert_eq!(page("/v1/events?category=big&limit=100".into()).await, vec![0, 1]);
}
