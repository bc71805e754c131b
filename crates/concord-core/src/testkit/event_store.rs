//! The conformance suite of the [`EventStore`] and [`CheckpointStore`] ports.

use super::{append, stream};
use crate::domain::stream::Partition;
use crate::domain::{AppendOutcome, Category, ExpectedVersion};
use crate::ports::{CheckpointStore, EventStore, LogQuery, StoreError};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use uuid::Uuid;

fn log_query(after: u64) -> LogQuery {
    LogQuery {
        after,
        limit: 10_000,
        max_bytes: usize::MAX,
        category: None,
        partition: None,
    }
}

/// Runs every event-store check, each on a fresh store from `make`.
pub async fn event_store_suite<S, F, Fut>(make: F)
where
    S: EventStore + CheckpointStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    appends_number_events_and_reads_them_back(make().await).await;
    expected_version_is_enforced(make().await).await;
    a_resent_append_answers_the_original_outcome(make().await).await;
    reads_of_unknown_streams_are_not_found(make().await).await;
    the_log_filters_by_position_category_and_partition(make().await).await;
    the_head_signal_moves_on_append(make().await).await;
    concurrent_appends_never_share_a_version_or_position(Arc::new(make().await)).await;
    checkpoints_are_kept_per_group_member(make().await).await;
    reads_stop_at_their_byte_budget(make().await).await;
    a_read_racing_a_streams_creation_sees_all_or_nothing(Arc::new(make().await)).await;
}

/// A read of a stream from its start, racing the append that creates it, answers either "no
/// such stream" or its events, never an existing stream with no events.
async fn a_read_racing_a_streams_creation_sees_all_or_nothing<S: EventStore + 'static>(s: Arc<S>) {
    const STREAMS: usize = 200;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..STREAMS {
                s.append(append(&format!("race-{i}"), ExpectedVersion::NoStream, &["A", "B"]))
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for i in 0..STREAMS {
        let name = stream(&format!("race-{i}"));
        loop {
            assert!(std::time::Instant::now() < deadline, "stream {name} never appeared");
            match s.read_stream(&name, 1, 100, usize::MAX).await {
                Err(StoreError::StreamNotFound(_)) => tokio::task::yield_now().await,
                Ok(events) => {
                    assert_eq!(events.len(), 2, "stream {name} read half-created: {events:?}");
                    break;
                }
                Err(e) => panic!("read of {name}: {e}"),
            }
        }
    }
    writer.await.unwrap();
}

async fn reads_stop_at_their_byte_budget<S: EventStore>(s: S) {
    let mut req = append("big-1", ExpectedVersion::NoStream, &["A", "B", "C"]);
    for e in &mut req.events {
        e.data = json!({"pad": "x".repeat(1000)});
    }
    s.append(req).await.unwrap();
    // Each event is a little over 1,000 bytes: a budget of 2,500 holds two of them.
    let page = s.read_stream(&stream("big-1"), 1, 100, 2500).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = s.read_stream(&stream("big-1"), 3, 100, 2500).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3]);
    let one = s.read_stream(&stream("big-1"), 1, 100, 1).await.unwrap();
    assert_eq!(one.len(), 1, "a page always holds one event");
    let mut q = log_query(0);
    q.max_bytes = 2500;
    assert_eq!(s.read_log(&q).await.unwrap().len(), 2);
    q.max_bytes = usize::MAX;
    assert_eq!(s.read_log(&q).await.unwrap().len(), 3);
}

async fn appends_number_events_and_reads_them_back<S: EventStore>(s: S) {
    let mut req = append("order-1", ExpectedVersion::NoStream, &["Placed", "Paid"]);
    req.events[0].metadata = json!({"correlation_id": "c-1", "causation_id": "x-9"});
    let ids: Vec<Uuid> = req.events.iter().map(|e| e.id).collect();
    let o = s.append(req).await.expect("first append");
    assert_eq!((o.first_version, o.last_version), (1, 2));
    let o2 = s
        .append(append("order-1", ExpectedVersion::Exact(2), &["Shipped"]))
        .await
        .expect("second append");
    assert_eq!((o2.first_version, o2.last_version), (3, 3));
    assert!(o2.position > o.position);

    let all = s.read_stream(&stream("order-1"), 1, 100, usize::MAX).await.unwrap();
    assert_eq!(all.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[0].id, ids[0]);
    assert_eq!(all[1].id, ids[1]);
    assert_eq!(all[0].event_type, "Placed");
    assert_eq!(all[1].data, json!({"n": 1}));
    assert_eq!(all[0].metadata["correlation_id"], "c-1");
    assert_eq!(all[0].metadata["causation_id"], "x-9");
    assert_eq!(all[2].position, o2.position);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));

    let page = s.read_stream(&stream("order-1"), 2, 1, usize::MAX).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), [2]);
    let past_end = s.read_stream(&stream("order-1"), 4, 10, usize::MAX).await.unwrap();
    assert!(past_end.is_empty());
    assert_eq!(s.head_position().await.unwrap(), o2.position);
}

async fn expected_version_is_enforced<S: EventStore>(s: S) {
    let wrong = |r: Result<AppendOutcome, StoreError>, want: u64| match r {
        Err(StoreError::WrongExpectedVersion { current, .. }) => assert_eq!(current, want),
        other => panic!("expected wrong_expected_version, got {other:?}"),
    };
    wrong(s.append(append("acc-1", ExpectedVersion::Exists, &["A"])).await, 0);
    wrong(s.append(append("acc-1", ExpectedVersion::Exact(1), &["A"])).await, 0);
    s.append(append("acc-1", ExpectedVersion::Exact(0), &["A"]))
        .await
        .unwrap();
    wrong(s.append(append("acc-1", ExpectedVersion::NoStream, &["A"])).await, 1);
    wrong(
        s.append(append("acc-1", ExpectedVersion::Exact(5), &["A", "B"])).await,
        1,
    );
    s.append(append("acc-1", ExpectedVersion::Exists, &["B"]))
        .await
        .unwrap();
    s.append(append("acc-1", ExpectedVersion::Any, &["C"])).await.unwrap();
    // Nothing of a rejected append was written.
    let events = s.read_stream(&stream("acc-1"), 1, 100, usize::MAX).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(s.read_log(&log_query(0)).await.unwrap().len(), 3);
}

async fn a_resent_append_answers_the_original_outcome<S: EventStore>(s: S) {
    s.append(append("cart-1", ExpectedVersion::Any, &["X"])).await.unwrap();
    let req = append("cart-1", ExpectedVersion::Exact(1), &["A", "B"]);
    let first = s.append(req.clone()).await.unwrap();
    s.append(append("cart-1", ExpectedVersion::Any, &["C"])).await.unwrap();
    let again = s.append(req.clone()).await.expect("a re-sent append is not an error");
    assert_eq!(again, first);
    assert_eq!(
        s.read_stream(&stream("cart-1"), 1, 100, usize::MAX)
            .await
            .unwrap()
            .len(),
        4
    );

    // The same ids in another stream, or mixed with new ones, are a conflict.
    let mut elsewhere = req.clone();
    elsewhere.stream = stream("cart-2");
    assert!(matches!(s.append(elsewhere).await, Err(StoreError::EventIdConflict(_))));
    let mut mixed = req.clone();
    mixed
        .events
        .push(append("cart-1", ExpectedVersion::Any, &["D"]).events.remove(0));
    assert!(matches!(s.append(mixed).await, Err(StoreError::EventIdConflict(_))));
    // The same ids with other content are another append, not a retry.
    let mut changed = req.clone();
    changed.events[1].data = json!({"amount": 1_000_000});
    assert!(matches!(s.append(changed).await, Err(StoreError::EventIdConflict(_))));
    let mut retagged = req.clone();
    retagged.events[0].metadata = json!({"correlation_id": "another"});
    assert!(matches!(s.append(retagged).await, Err(StoreError::EventIdConflict(_))));
    assert!(matches!(
        s.read_stream(&stream("cart-2"), 1, 10, usize::MAX).await,
        Err(StoreError::StreamNotFound(_))
    ));
}

async fn reads_of_unknown_streams_are_not_found<S: EventStore>(s: S) {
    assert!(matches!(
        s.read_stream(&stream("ghost-1"), 1, 10, usize::MAX).await,
        Err(StoreError::StreamNotFound(name)) if name == "ghost-1"
    ));
    assert_eq!(s.head_position().await.unwrap(), 0);
    assert!(s.read_log(&log_query(0)).await.unwrap().is_empty());
}

async fn the_log_filters_by_position_category_and_partition<S: EventStore>(s: S) {
    for i in 0..12 {
        let cat = if i % 3 == 0 { "invoice" } else { "order" };
        s.append(append(&format!("{cat}-{i}"), ExpectedVersion::Any, &["E"]))
            .await
            .unwrap();
    }
    let all = s.read_log(&log_query(0)).await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let after = s.read_log(&log_query(all[4].position)).await.unwrap();
    assert_eq!(after.first().map(|e| e.id), Some(all[5].id));
    let mut limited = log_query(0);
    limited.limit = 3;
    assert_eq!(s.read_log(&limited).await.unwrap().len(), 3);

    let mut invoices = log_query(0);
    invoices.category = Some(Category::parse("invoice").unwrap());
    let got = s.read_log(&invoices).await.unwrap();
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|e| e.stream.category() == "invoice"));
    // A category is not a prefix match: `order` must not match `orderline-1`.
    s.append(append("orderline-1", ExpectedVersion::Any, &["E"]))
        .await
        .unwrap();
    let mut orders = log_query(0);
    orders.category = Some(Category::parse("order").unwrap());
    assert_eq!(s.read_log(&orders).await.unwrap().len(), 8);

    let mut seen = Vec::new();
    for member in 0..3 {
        let mut q = log_query(0);
        q.partition = Some(Partition::new(member, 3).unwrap());
        let part = s.read_log(&q).await.unwrap();
        assert!(part.iter().all(|e| e.stream.partition_hash() % 3 == member));
        seen.extend(part.into_iter().map(|e| e.position));
    }
    seen.sort_unstable();
    let everything: Vec<u64> = s
        .read_log(&log_query(0))
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        seen, everything,
        "members of a group together see every event exactly once"
    );
}

async fn the_head_signal_moves_on_append<S: EventStore>(s: S) {
    let mut rx = s.watch_head();
    rx.borrow_and_update();
    let o = s.append(append("sig-1", ExpectedVersion::Any, &["E"])).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
        .await
        .expect("the head signal fires after an append")
        .expect("the signal is open");
    assert!(*rx.borrow() >= o.position);
}

async fn concurrent_appends_never_share_a_version_or_position<S: EventStore>(s: Arc<S>) {
    let writers = 16;
    let per_writer = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for i in 0..per_writer {
                // Half the writers contend on one stream with optimistic concurrency.
                let name = if w % 2 == 0 {
                    "hot-1".to_owned()
                } else {
                    format!("cold-{w}")
                };
                loop {
                    let current = match s.read_stream(&stream(&name), 1, 10_000, usize::MAX).await {
                        Ok(ev) => ev.last().map_or(0, |e| e.version),
                        Err(StoreError::StreamNotFound(_)) => 0,
                        Err(e) => panic!("{e}"),
                    };
                    match s
                        .append(append(&name, ExpectedVersion::Exact(current), &["T"; 2][..1 + i % 2]))
                        .await
                    {
                        Ok(_) => {
                            won += 1;
                            break;
                        }
                        Err(StoreError::WrongExpectedVersion { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            won
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("writer task");
    }
    assert_eq!(total, writers * per_writer);
    let log = s.read_log(&log_query(0)).await.unwrap();
    let expected_events: usize = writers * (0..per_writer).map(|i| 1 + i % 2).sum::<usize>();
    assert_eq!(log.len(), expected_events);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    let hot = s.read_stream(&stream("hot-1"), 1, 10_000, usize::MAX).await.unwrap();
    let versions: Vec<u64> = hot.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=hot.len() as u64).collect::<Vec<_>>());
}

async fn checkpoints_are_kept_per_group_member<S: CheckpointStore>(s: S) {
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), None);
    s.save_checkpoint("g", 0, 5).await.unwrap();
    s.save_checkpoint("g", 1, 7).await.unwrap();
    s.save_checkpoint("h", 0, 9).await.unwrap();
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), Some(5));
    assert_eq!(s.load_checkpoint("g", 1).await.unwrap(), Some(7));
    assert_eq!(s.load_checkpoint("h", 0).await.unwrap(), Some(9));
    s.save_checkpoint("g", 0, 3).await.unwrap();
    assert_eq!(s.load_checkpoint("g", 0).await.unwrap(), Some(3), "a group may rewind");
}
