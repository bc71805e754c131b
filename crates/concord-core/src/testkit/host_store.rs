//! The conformance suite of the [`HostStore`] port.

use super::saga_store::saga_row;
use crate::domain::flow::{HostLimits, HostState};
use crate::ports::{HostStore, SagaStore, SagaUpdate};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use std::sync::Arc;

/// Runs every host-store check on a fresh store.
pub async fn host_store_suite<S: HostStore + SagaStore>(s: S) {
    let s = Arc::new(s);
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("valid time");

    // A host without a state reads as the default, and a change that writes nothing leaves none.
    let read = s.change_host("payments", &mut |_| false).await.unwrap();
    assert_eq!(read, HostState::default());
    assert!(s.list_hosts().await.unwrap().is_empty());
    let limits = HostLimits::new(Some(3), Some(2.5)).unwrap();
    let set = s
        .change_host("payments", &mut |h| {
            h.set_limits(limits);
            true
        })
        .await
        .unwrap();
    assert_eq!(set.limits, limits);
    assert_eq!(
        s.list_hosts().await.unwrap(),
        vec![("payments".to_owned(), set.clone())]
    );
    assert_eq!(s.get_host("payments").await.unwrap(), Some(set.clone()));
    assert_eq!(s.get_host("shipping").await.unwrap(), None);

    // Concurrent changes to one host apply one after the other: none is lost.
    let changes: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.change_host("inventory:8081", &mut |h| {
                    h.failures += 1;
                    true
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for c in changes {
        c.await.unwrap();
    }
    let counted = s.change_host("inventory:8081", &mut |_| false).await.unwrap();
    assert_eq!(counted.failures, 16, "a concurrent change was lost");
    let hosts: Vec<String> = s.list_hosts().await.unwrap().into_iter().map(|(h, _)| h).collect();
    assert_eq!(hosts, ["inventory:8081", "payments"]);

    // Parked sagas: woken (due now) and forgotten, a limited number at a time; one already due
    // or finished is left alone.
    let later = now + ChronoDuration::seconds(60);
    for id in ["host-a", "host-b", "host-c"] {
        let (row, _) = s.create_saga(&saga_row(id, now)).await.unwrap();
        assert!(
            s.update_saga(&SagaUpdate {
                id: &row.id,
                holder: None,
                status: row.status,
                next_run_at: Some(later),
                lease: None,
                log_version: 1,
                now,
            })
            .await
            .unwrap()
        );
        s.park_saga("payments", &row.id, now).await.unwrap();
    }
    // One due already and one finished are woken to nothing: they keep their time.
    let (due, _) = s.create_saga(&saga_row("host-due", now)).await.unwrap();
    s.park_saga("payments", &due.id, now).await.unwrap();
    let (done, _) = s.create_saga(&saga_row("host-done", now)).await.unwrap();
    assert!(
        s.update_saga(&SagaUpdate {
            id: &done.id,
            holder: None,
            status: crate::domain::saga::SagaStatus::Completed,
            next_run_at: None,
            lease: None,
            log_version: 1,
            now,
        })
        .await
        .unwrap()
    );
    s.park_saga("payments", &done.id, now).await.unwrap();
    let a = super::saga_id("host-a");
    assert_eq!(s.parked_on(&a).await.unwrap().as_deref(), Some("payments"));
    assert_eq!(s.parked_on(&super::saga_id("nobody")).await.unwrap(), None);
    assert_eq!(s.wake_parked("inventory:8081", now, 10).await.unwrap(), 0);
    let woken = now + ChronoDuration::seconds(1);
    assert_eq!(s.wake_parked("payments", woken, 2).await.unwrap(), 2);
    assert_eq!(s.wake_parked("payments", woken, 10).await.unwrap(), 3);
    assert_eq!(s.wake_parked("payments", now, 10).await.unwrap(), 0);
    for id in ["host-a", "host-b", "host-c"] {
        let row = s.get_saga(&super::saga_id(id)).await.unwrap().unwrap();
        assert_eq!(row.next_run_at, Some(woken), "{id} was not woken");
        assert_eq!(s.parked_on(&row.id).await.unwrap(), None);
    }
    assert_eq!(s.get_saga(&due.id).await.unwrap().unwrap().next_run_at, Some(now));
    assert_eq!(s.get_saga(&done.id).await.unwrap().unwrap().next_run_at, None);
    assert_eq!(s.parked_on(&done.id).await.unwrap(), None);
}
