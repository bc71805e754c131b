//! The conformance suite of the [`SagaStore`] port.

use crate::domain::saga::{SagaId, SagaStatus};
use crate::ports::{SagaRow, SagaStore, SagaUpdate};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

/// A saga id for tests; panics on a bad literal.
#[must_use]
pub fn saga_id(id: &str) -> SagaId {
    SagaId::parse(id).expect("valid test saga id")
}

/// A new saga row, due now, held by nobody.
#[must_use]
pub fn saga_row(id: &str, now: DateTime<Utc>) -> SagaRow {
    SagaRow {
        id: saga_id(id),
        definition: "order".into(),
        version: 1,
        input: json!({"sku": "a", "qty": 2}),
        status: SagaStatus::Running,
        next_run_at: Some(now),
        lease_owner: None,
        lease_until: None,
        log_version: 0,
        created_at: now,
        updated_at: now,
    }
}

/// Runs every saga-store check on a fresh store.
pub async fn saga_store_suite<S: SagaStore>(s: S) {
    let s = Arc::new(s);
    // The database keeps microseconds; start from a whole second so rows compare equal.
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("valid time");
    let secs = ChronoDuration::seconds;

    // Definitions: versioned, a repeated put is not a new version.
    let spec1 = json!({"steps": [{"name": "a"}]});
    let spec2 = json!({"steps": [{"name": "a"}, {"name": "b"}]});
    assert_eq!(s.put_definition("order", &spec1, now).await.unwrap(), (1, true));
    assert_eq!(s.put_definition("order", &spec1, now).await.unwrap(), (1, false));
    assert_eq!(s.put_definition("order", &spec2, now).await.unwrap(), (2, true));
    assert_eq!(s.put_definition("other", &spec2, now).await.unwrap(), (1, true));
    let latest = s.get_definition("order", None).await.unwrap().expect("latest");
    assert_eq!((latest.version, &latest.spec), (2, &spec2));
    let first = s.get_definition("order", Some(1)).await.unwrap().expect("v1");
    assert_eq!(first.spec, spec1);
    assert!(s.get_definition("order", Some(3)).await.unwrap().is_none());
    assert!(s.get_definition("nope", None).await.unwrap().is_none());
    // Concurrent puts of different specs get distinct versions.
    let puts: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.put_definition("race", &json!({"n": i}), now).await.unwrap() })
        })
        .collect();
    let mut versions = Vec::new();
    for p in puts {
        versions.push(p.await.unwrap().0);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());

    // Rows: a caller-chosen id is created once.
    let row = saga_row("s-1", now);
    assert_eq!(s.create_saga(&row).await.unwrap(), (row.clone(), true));
    let mut again = saga_row("s-1", now);
    again.input = json!({"other": true});
    assert_eq!(s.create_saga(&again).await.unwrap(), (row.clone(), false));
    assert_eq!(s.get_saga(&saga_id("s-1")).await.unwrap(), Some(row.clone()));
    assert_eq!(s.get_saga(&saga_id("s-404")).await.unwrap(), None);

    // Claims take due rows without a live lease, oldest due first.
    let mut later = saga_row("s-2", now + secs(60));
    later.next_run_at = Some(now + secs(60));
    s.create_saga(&later).await.unwrap();
    let mut done = saga_row("s-3", now);
    done.status = SagaStatus::Completed;
    done.next_run_at = None;
    s.create_saga(&done).await.unwrap();
    let node_a = Uuid::now_v7();
    let node_b = Uuid::now_v7();
    let claimed = s.claim_sagas(node_a, now, now + secs(10), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-1"]);
    assert_eq!(claimed[0].lease_owner, Some(node_a));
    assert_eq!(claimed[0].lease_until, Some(now + secs(10)));
    assert!(
        s.claim_sagas(node_b, now + secs(5), now + secs(15), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A lease that expired is taken over.
    let taken = s.claim_sagas(node_b, now + secs(11), now + secs(21), 10).await.unwrap();
    assert_eq!(taken.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-1"]);

    // Updates hold only for the lease holder, and never go back in the log.
    let s1 = saga_id("s-1");
    let update = |holder, log_version, status, next: Option<DateTime<Utc>>| SagaUpdate {
        id: &s1,
        holder,
        status,
        next_run_at: next,
        lease: None,
        log_version,
        now: now + secs(12),
    };
    assert!(
        !s.update_saga(&update(Some(node_a), 3, SagaStatus::Compensating, Some(now)))
            .await
            .unwrap()
    );
    assert!(
        s.update_saga(&update(Some(node_b), 3, SagaStatus::Compensating, Some(now + secs(30))))
            .await
            .unwrap()
    );
    let r = s.get_saga(&saga_id("s-1")).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.lease_owner, r.lease_until, r.log_version, r.next_run_at),
        (SagaStatus::Compensating, None, None, 3, Some(now + secs(30)))
    );
    assert_eq!(r.updated_at, now + secs(12));
    assert!(
        !s.update_saga(&update(None, 2, SagaStatus::Running, Some(now)))
            .await
            .unwrap(),
        "older log version"
    );
    let mut keep = update(None, 4, SagaStatus::Compensating, Some(now));
    keep.lease = Some((node_a, now + secs(40)));
    assert!(
        s.update_saga(&keep).await.unwrap(),
        "an unheld row can be taken by an update"
    );
    let r = s.get_saga(&saga_id("s-1")).await.unwrap().unwrap();
    assert_eq!((r.lease_owner, r.lease_until), (Some(node_a), Some(now + secs(40))));
    assert!(
        !s.update_saga(&update(None, 5, SagaStatus::Completed, None))
            .await
            .unwrap(),
        "held by node a"
    );
    assert!(
        !s.update_saga(&SagaUpdate {
            id: &saga_id("s-404"),
            ..update(None, 1, SagaStatus::Completed, None)
        })
        .await
        .unwrap()
    );

    // A wake makes an unfinished saga due now and leaves its lease and the rest alone; a
    // finished one or an unknown id is not woken.
    assert!(s.wake_saga(&saga_id("s-2"), now).await.unwrap());
    let r = s.get_saga(&saga_id("s-2")).await.unwrap().unwrap();
    assert_eq!(
        (r.next_run_at, r.lease_owner, r.status),
        (Some(now), None, SagaStatus::Running)
    );
    assert!(s.wake_saga(&saga_id("s-1"), now + secs(1)).await.unwrap());
    let r = s.get_saga(&saga_id("s-1")).await.unwrap().unwrap();
    assert_eq!((r.next_run_at, r.lease_owner), (Some(now + secs(1)), Some(node_a)));
    assert!(!s.wake_saga(&saga_id("s-3"), now).await.unwrap());
    assert_eq!(s.get_saga(&saga_id("s-3")).await.unwrap().unwrap().next_run_at, None);
    assert!(!s.wake_saga(&saga_id("s-404"), now).await.unwrap());

    // Listing: id order, status filter, cursor, limit.
    let all = s.list_sagas(None, None, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["s-1", "s-2", "s-3"]
    );
    let page = s.list_sagas(None, Some("s-1"), 1).await.unwrap();
    assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-2"]);
    let completed = s.list_sagas(Some(SagaStatus::Completed), None, 10).await.unwrap();
    assert_eq!(completed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s-3"]);
    let mut counts = s.count_sagas().await.unwrap();
    counts.sort_by_key(|(st, _)| st.as_str());
    assert_eq!(
        counts,
        vec![
            (SagaStatus::Compensating, 1),
            (SagaStatus::Completed, 1),
            (SagaStatus::Running, 1)
        ]
    );

    // Concurrent claimers never take the same row.
    for i in 0..60 {
        s.create_saga(&saga_row(&format!("c-{i:03}"), now)).await.unwrap();
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let me = Uuid::now_v7();
                let mut mine = Vec::new();
                for _ in 0..20 {
                    let got = s.claim_sagas(me, now + secs(100), now + secs(200), 7).await.unwrap();
                    mine.extend(got.into_iter().map(|r| r.id));
                }
                mine
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in claimers {
        for id in c.await.unwrap() {
            assert!(seen.insert(id.clone()), "{id} claimed twice");
        }
    }
    // The 60 new rows plus s-2 (due at +60 s); s-1 is held by node a until +40 s, so it is free too.
    assert_eq!(seen.len(), 62);

    // Retention: only sagas finished for good, held by nobody, changed before the cut, go; a
    // failed one waits for its operator, a running one for its runner.
    let done_at = now + secs(500);
    for (id, status) in [
        ("p-done", SagaStatus::Completed),
        ("p-undone", SagaStatus::Compensated),
        ("p-cancel", SagaStatus::Cancelled),
        ("p-failed", SagaStatus::Failed),
    ] {
        let (row, _) = s.create_saga(&saga_row(id, now)).await.unwrap();
        let update = SagaUpdate {
            id: &row.id,
            holder: None,
            status,
            next_run_at: None,
            lease: None,
            log_version: 3,
            now: done_at,
        };
        assert!(s.update_saga(&update).await.unwrap());
    }
    // Rows the checks above finished go first; these four changed at the cut, not before it.
    s.purge_sagas(done_at, 1000).await.unwrap();
    for id in ["p-done", "p-undone", "p-cancel", "p-failed"] {
        assert!(
            s.get_saga(&saga_id(id)).await.unwrap().is_some(),
            "{id} went before its time"
        );
    }
    assert_eq!(
        s.purge_sagas(done_at + secs(1), 2).await.unwrap(),
        2,
        "at most the limit"
    );
    assert_eq!(s.purge_sagas(done_at + secs(1), 100).await.unwrap(), 1);
    for (id, kept) in [
        ("p-done", false),
        ("p-undone", false),
        ("p-cancel", false),
        ("p-failed", true),
    ] {
        assert_eq!(s.get_saga(&saga_id(id)).await.unwrap().is_some(), kept, "{id}");
    }
    assert!(
        s.get_saga(&saga_id("c-000")).await.unwrap().is_some(),
        "a running saga stays"
    );
}
