use crate::both_backends;
use crate::helpers::{Backend, spawn_app};
use concord_sdk::{Client, EventInput, ExpectedVersion};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

fn event(n: usize) -> EventInput {
    EventInput {
        id: None,
        event_type: "E".into(),
        data: json!({"n": n}),
        metadata: None,
    }
}

async fn sse_catches_up_then_goes_live_without_gap_or_duplicate(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let client = Client::new(app.address.clone(), app.admin_key.clone()).unwrap();
    for i in 0..40 {
        client
            .append(&format!("s-{}", i % 4), ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    let mut sub = client.subscribe(0, None).await.unwrap();
    // Appends race with the switch from catch-up to live.
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 40..100 {
                client
                    .append(&format!("s-{}", i % 4), ExpectedVersion::Any, vec![event(i)])
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 100 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("event decodes");
        seen.push(e.position);
    }
    writer.await.unwrap();
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>());
    // Nothing more arrives: no duplicates after the last one.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err()
    );

    // Resume after a position, with a category filter.
    client
        .append("other-1", ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    let mut sub = client.subscribe(98, Some("s")).await.unwrap();
    let a = sub.next().await.unwrap().unwrap();
    let b = sub.next().await.unwrap().unwrap();
    assert_eq!((a.position, b.position), (99, 100));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "other-1 is filtered"
    );
}
both_backends!(sse_catches_up_then_goes_live_without_gap_or_duplicate);

async fn consumer_group_members_split_streams_and_keep_checkpoints(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let client = Client::new(app.address.clone(), app.admin_key.clone()).unwrap();
    for i in 0..30 {
        client
            .append(&format!("job-{i}"), ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    client
        .append("noise-1", ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    let mut all = Vec::new();
    for member in 0..3 {
        let page = client
            .group_events("workers", member, 3, Some("job"), 0, 1000)
            .await
            .unwrap();
        let mut streams: Vec<String> = page.events.iter().map(|e| e.stream.clone()).collect();
        streams.dedup();
        // Each stream lands in exactly one member.
        for s in &streams {
            assert!(!all.contains(s), "{s} delivered to two members");
        }
        all.extend(streams);
        if let Some(last) = page.events.last() {
            client.save_checkpoint("workers", member, last.position).await.unwrap();
        }
        let again = client
            .group_events("workers", member, 3, Some("job"), 0, 1000)
            .await
            .unwrap();
        assert!(again.events.is_empty(), "the checkpoint moved past the page");
    }
    all.sort();
    assert_eq!(all.len(), 30);

    // A long poll returns as soon as an event for the member arrives.
    let poll = {
        let client = client.clone();
        tokio::spawn(async move { client.group_events("solo", 0, 1, Some("late"), 5000, 10).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let appended = client
        .append("late-1", ExpectedVersion::Any, vec![event(1)])
        .await
        .unwrap();
    let page = tokio::time::timeout(Duration::from_secs(4), poll)
        .await
        .expect("woken before the wait ends")
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].position, appended.position);

    let r = app
        .admin(Method::GET, "/v1/subscriptions/g/events?member=3&size=3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .admin(Method::GET, "/v1/subscriptions/g/events?wait_ms=999999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .admin(Method::PUT, "/v1/subscriptions/g/checkpoint")
        .json(&json!({"position": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
both_backends!(consumer_group_members_split_streams_and_keep_checkpoints);
