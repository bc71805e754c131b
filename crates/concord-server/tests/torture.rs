//! The ordering guarantee under load: many appenders through two server instances on one
//! PostgreSQL, with random delays and expected-version conflicts, while subscribers follow the
//! log. Every subscriber must see exactly the events the database holds, in position order.
//! Needs `CONCORD_TEST_POSTGRES_URL`; without it the test prints that it skipped.

use concord_sdk::{Client, ClientError, ErrorCode, EventInput, ExpectedVersion};
use concord_server::config::Settings;
use concord_server::startup::Application;
use rand::RngExt as _;
use serde_json::json;
use std::time::Duration;
use tokio::sync::oneshot;

/// The vault's master key of every node (they share one vault on PostgreSQL).
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const APPENDERS: usize = 24;
const APPENDS_EACH: usize = 40;

async fn start_node(database_url: &str, admin_key: &str) -> (String, oneshot::Sender<()>) {
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        // The participants are on loopback, which the outbound policy refuses unless named.
        saga_allowed_hosts: vec!["127.0.0.1".into()],
        tx_allowed_hosts: vec!["127.0.0.1".into()],
        database_url: database_url.to_owned(),
        admin_key: Some(admin_key.into()),
        vault_master_key: Some(VAULT_KEY.into()),
        db_connections: 8,
        ..Settings::default()
    };
    let app = Application::build(settings).await.expect("node starts");
    let address = format!("http://{}", app.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    (address, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_on_two_nodes_see_exactly_the_committed_log_in_order() {
    let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .unwrap();
    let admin = format!("torture-{}", uuid::Uuid::now_v7());
    let (a, _stop_a) = start_node(&db, &admin).await;
    let (b, _stop_b) = start_node(&db, &admin).await;
    let nodes = [
        Client::new(a, admin.clone()).unwrap(),
        Client::new(b, admin.clone()).unwrap(),
    ];

    // Subscribers start before any write, one SSE stream on each node and one poller.
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut sub = node.subscribe(0, None).await.unwrap();
        subscribers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                let e = e.expect("event decodes");
                seen.push((e.position, e.id));
            }
            seen
        }));
    }
    let poller = {
        let client = nodes[1].clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            let mut idle = 0;
            while idle < 50 {
                let page = client.read_log(after, 37, None).await.unwrap();
                if page.events.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for e in page.events {
                    idle = 0;
                    after = e.position;
                    seen.push((e.position, e.id));
                }
            }
            seen
        })
    };

    let mut appenders = Vec::new();
    for w in 0..APPENDERS {
        let nodes = nodes.clone();
        appenders.push(tokio::spawn(async move {
            let (mut ok, mut conflicts) = (0usize, 0usize);
            for i in 0..APPENDS_EACH {
                let (delay, node, n, contend) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..4u64),
                        rng.random_range(0..2usize),
                        rng.random_range(1..=3usize),
                        rng.random_bool(0.3),
                    )
                };
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let client = &nodes[node];
                let events = (0..n)
                    .map(|k| EventInput {
                        id: None,
                        event_type: "T".into(),
                        data: json!({"w": w, "i": i, "k": k}),
                        metadata: None,
                    })
                    .collect();
                // Some appends race on shared streams with a guessed version and may lose.
                let (stream, expected) = if contend {
                    let stream = format!("hot-{}", i % 3);
                    let current = match client.read_stream(&stream, 1, 1000).await {
                        Ok(p) => p.events.last().map_or(0, |e| e.version),
                        Err(e) if e.code() == Some(ErrorCode::StreamNotFound) => 0,
                        Err(e) => panic!("{e}"),
                    };
                    (stream, ExpectedVersion::Exact(current))
                } else {
                    (format!("w{w}-{}", i % 5), ExpectedVersion::Any)
                };
                match client.append(&stream, expected, events).await {
                    Ok(_) => ok += 1,
                    Err(ClientError::Problem(p)) if p.error_code() == Some(ErrorCode::WrongExpectedVersion) => {
                        conflicts += 1;
                    }
                    Err(e) => panic!("append failed: {e}"),
                }
            }
            (ok, conflicts)
        }));
    }
    let (mut ok, mut conflicts) = (0, 0);
    for t in appenders {
        let (o, c) = t.await.unwrap();
        ok += o;
        conflicts += c;
    }
    assert_eq!(ok + conflicts, APPENDERS * APPENDS_EACH);
    assert!(conflicts > 0, "the run must include expected-version failures");

    // The truth: the whole log as stored.
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = nodes[0].read_log(after, 1000, None).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        after = page.events.last().unwrap().position;
        stored.extend(page.events.into_iter().map(|e| (e.position, e.id)));
    }
    assert!(stored.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(stored.first().map(|e| e.0), Some(1));
    assert_eq!(
        stored.last().map(|e| e.0),
        Some(stored.len() as u64),
        "positions have no holes"
    );

    for (i, s) in subscribers.into_iter().enumerate() {
        let seen = s.await.unwrap();
        assert_eq!(
            seen.len(),
            stored.len(),
            "SSE subscriber {i} saw {} of {}",
            seen.len(),
            stored.len()
        );
        assert!(seen == stored, "SSE subscriber {i} saw a different sequence");
    }
    let seen = poller.await.unwrap();
    assert!(seen == stored, "the polling reader saw a different sequence");
    eprintln!(
        "torture: {ok} appends committed, {conflicts} refused, {} events",
        stored.len()
    );
}
