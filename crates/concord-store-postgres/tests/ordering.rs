//! The bug class of sequence-numbered logs: a writer that has taken its place in the log and
//! commits late. Here a second connection takes the next position the way the store's own
//! writer does (it moves the head row and inserts its event) and holds its transaction open.
//! Appends on two nodes queue behind it, readers on both nodes see nothing past the last
//! committed position meanwhile, and once the late writer commits (or rolls back) every reader
//! sees the log dense and in order, the late event included (or its place taken by the next).
//! Needs `CONCORD_TEST_POSTGRES_URL`; without it each test prints that it skipped.

use concord_core::domain::{ExpectedVersion, RecordedEvent};
use concord_core::ports::{EventStore, LogQuery};
use concord_core::testkit;
use concord_store_postgres::{PostgresConfig, PostgresStore, create_scratch_database};
use sqlx::Connection as _;
use std::time::Duration;

fn base_url() -> Option<String> {
    let url = std::env::var("CONCORD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
    }
    url
}

async fn whole_log(store: &PostgresStore) -> Vec<RecordedEvent> {
    store
        .read_log(&LogQuery {
            after: 0,
            limit: 1000,
            max_bytes: usize::MAX,
            category: None,
            partition: None,
        })
        .await
        .unwrap()
}

/// A reader that follows the log with a cursor, as a consumer does: it never reads a position
/// twice, so one it stepped over would be lost to it for good.
fn follower(store: PostgresStore, until: usize) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut after = 0;
        while seen.len() < until {
            let page = store
                .read_log(&LogQuery {
                    after,
                    limit: 2,
                    max_bytes: usize::MAX,
                    category: None,
                    partition: None,
                })
                .await
                .unwrap();
            for e in page {
                after = e.position;
                seen.push(e.position);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

async fn a_late_writer_is_never_skipped(commit: bool) {
    let Some(base) = base_url() else { return };
    let url = create_scratch_database(&base, "concord_t").await.unwrap();
    let a = PostgresStore::connect(&PostgresConfig::new(&url)).await.unwrap();
    let b = PostgresStore::connect(&PostgresConfig::new(&url)).await.unwrap();
    a.append(testkit::append("first-1", ExpectedVersion::Any, &["E"]))
        .await
        .unwrap();

    // The late writer takes position 2 and holds it.
    let mut late = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut late).await.unwrap();
    let taken: i64 = sqlx::query_scalar(
        "UPDATE concord_log_head SET last_position = last_position + 1 WHERE id = 1 RETURNING last_position",
    )
    .fetch_one(&mut late)
    .await
    .unwrap();
    assert_eq!(taken, 2);
    sqlx::query(
        "INSERT INTO concord_events (position, id, stream, version, category, stream_hash, event_type, data, metadata, recorded_at) \
         VALUES (2, gen_random_uuid(), 'late-1', 1, 'late', 0, 'Late', '{}', '{}', now())",
    )
    .execute(&mut late)
    .await
    .unwrap();

    let expected = if commit { 5 } else { 4 };
    let followers = [follower(a.clone(), expected), follower(b.clone(), expected)];
    // Appends on both nodes: one on a stream of its own, two on a stream they share, planned
    // from the same read, so one of them meets the other's version and is planned again.
    let appends: Vec<_> = [(&a, "a-1"), (&b, "shared-1"), (&a, "shared-1")]
        .into_iter()
        .map(|(store, stream)| {
            let store = store.clone();
            let request = testkit::append(stream, ExpectedVersion::Any, &["E"]);
            tokio::spawn(async move { store.append(request).await })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    for (node, store) in [("a", &a), ("b", &b)] {
        let log = whole_log(store).await;
        assert_eq!(
            log.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![1],
            "node {node} shows nothing past the late writer's place while it is open"
        );
    }
    assert!(
        appends.iter().all(|h| !h.is_finished()),
        "appends wait behind the late writer"
    );

    if commit {
        sqlx::query("COMMIT").execute(&mut late).await.unwrap();
    } else {
        sqlx::query("ROLLBACK").execute(&mut late).await.unwrap();
    }
    let mut positions = Vec::new();
    for h in appends {
        let outcome = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the appends go on once the late writer ends")
            .unwrap()
            .unwrap();
        positions.push(outcome.position);
    }
    positions.sort_unstable();
    let dense: Vec<u64> = (1..=expected as u64).collect();
    assert_eq!(
        positions,
        dense[dense.len() - 3..],
        "the appends follow the late writer"
    );
    for (i, f) in followers.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("the reader catches up")
            .unwrap();
        assert_eq!(seen, dense, "reader {i} saw every position once, in order");
    }
    for store in [&a, &b] {
        let log = whole_log(store).await;
        let shared: Vec<u64> = log
            .iter()
            .filter(|e| e.stream.as_str() == "shared-1")
            .map(|e| e.version)
            .collect();
        assert_eq!(
            shared,
            vec![1, 2],
            "the shared stream took both appends, one after the other"
        );
        assert_eq!(log.iter().map(|e| e.position).collect::<Vec<_>>(), dense);
        let late_one = log.iter().any(|e| e.stream.as_str() == "late-1");
        assert_eq!(late_one, commit, "the late event is there exactly when it committed");
    }
}

#[tokio::test]
async fn a_late_writer_that_commits_is_never_skipped() {
    a_late_writer_is_never_skipped(true).await;
}

#[tokio::test]
async fn a_late_writer_that_rolls_back_leaves_no_hole() {
    a_late_writer_is_never_skipped(false).await;
}
