//! The conformance suite of the [`TxStore`] port.

use crate::domain::tx::{Outcome, Xid};
use crate::ports::{TxRow, TxStore, TxUpdate};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use std::sync::Arc;
use uuid::Uuid;

/// A transaction id for tests; panics on a bad literal.
#[must_use]
pub fn tx_id(xid: &str) -> Xid {
    Xid::parse(xid).expect("valid test xid")
}

/// A new transaction row, undecided, due now, held by nobody.
#[must_use]
pub fn tx_row(xid: &str, now: DateTime<Utc>) -> TxRow {
    TxRow {
        xid: tx_id(xid),
        outcome: None,
        pending: true,
        next_run_at: Some(now),
        lease_owner: None,
        lease_until: None,
        log_version: 0,
        created_at: now,
        updated_at: now,
    }
}

/// Runs every transaction-store check on a fresh store.
pub async fn tx_store_suite<S: TxStore>(s: S) {
    let s = Arc::new(s);
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("valid time");
    let secs = ChronoDuration::seconds;
    assert_eq!(s.pending_txs().await.unwrap(), (0, None));
    let a = tx_row("x-1", now);
    s.create_tx(&a).await.unwrap();
    assert!(s.create_tx(&a).await.is_err(), "an xid is created once");
    assert_eq!(s.get_tx(&tx_id("x-1")).await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_tx(&tx_id("x-404")).await.unwrap(), None);
    let mut later = tx_row("x-2", now - secs(5));
    later.next_run_at = Some(now + secs(60));
    s.create_tx(&later).await.unwrap();
    let mut done = tx_row("x-3", now);
    done.outcome = Some(Outcome::Committed);
    done.pending = false;
    done.next_run_at = None;
    s.create_tx(&done).await.unwrap();
    assert_eq!(s.pending_txs().await.unwrap(), (2, Some(now - secs(5))));

    // Claims: due and unleased only; an expired lease is taken over.
    let (n1, n2) = (Uuid::now_v7(), Uuid::now_v7());
    let got = s.claim_txs(n1, now, now + secs(10), 10).await.unwrap();
    assert_eq!(got.iter().map(|r| r.xid.as_str()).collect::<Vec<_>>(), ["x-1"]);
    assert_eq!(
        (got[0].lease_owner, got[0].lease_until),
        (Some(n1), Some(now + secs(10)))
    );
    assert!(
        s.claim_txs(n2, now + secs(5), now + secs(15), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let got = s.claim_txs(n2, now + secs(11), now + secs(21), 10).await.unwrap();
    assert_eq!(got.iter().map(|r| r.xid.as_str()).collect::<Vec<_>>(), ["x-1"]);

    // Updates: only by the holder, never backwards.
    let x1 = tx_id("x-1");
    let update = |holder, log_version, outcome, pending, next| TxUpdate {
        xid: &x1,
        holder,
        outcome,
        pending,
        next_run_at: next,
        lease: None,
        log_version,
        now: now + secs(12),
    };
    assert!(
        !s.update_tx(&update(Some(n1), 2, Some(Outcome::Aborted), true, Some(now)))
            .await
            .unwrap()
    );
    assert!(
        s.update_tx(&update(
            Some(n2),
            2,
            Some(Outcome::Committed),
            true,
            Some(now + secs(30))
        ))
        .await
        .unwrap()
    );
    let r = s.get_tx(&tx_id("x-1")).await.unwrap().unwrap();
    assert_eq!(
        (
            r.outcome,
            r.pending,
            r.lease_owner,
            r.lease_until,
            r.log_version,
            r.next_run_at,
            r.updated_at
        ),
        (
            Some(Outcome::Committed),
            true,
            None,
            None,
            2,
            Some(now + secs(30)),
            now + secs(12)
        )
    );
    assert!(
        !s.update_tx(&update(None, 1, Some(Outcome::Committed), false, None))
            .await
            .unwrap(),
        "older"
    );
    assert!(
        s.update_tx(&update(None, 3, Some(Outcome::Committed), false, None))
            .await
            .unwrap()
    );
    assert!(
        !s.update_tx(&TxUpdate {
            xid: &tx_id("x-404"),
            ..update(None, 9, None, true, None)
        })
        .await
        .unwrap()
    );

    // Listing by outcome (undecided included), pending, cursor and limit.
    let ids = |rows: Vec<TxRow>| rows.into_iter().map(|r| r.xid).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_txs(None, None, None, 10).await.unwrap()),
        ["x-1", "x-2", "x-3"]
    );
    assert_eq!(ids(s.list_txs(None, Some(true), None, 10).await.unwrap()), ["x-2"]);
    assert_eq!(ids(s.list_txs(Some(None), None, None, 10).await.unwrap()), ["x-2"]);
    assert_eq!(
        ids(s
            .list_txs(Some(Some(Outcome::Committed)), None, None, 10)
            .await
            .unwrap()),
        ["x-1", "x-3"]
    );
    assert_eq!(ids(s.list_txs(None, None, Some("x-1"), 1).await.unwrap()), ["x-2"]);
    assert_eq!(s.pending_txs().await.unwrap(), (1, Some(now - secs(5))));

    // Concurrent claimers never take the same row.
    for i in 0..40 {
        s.create_tx(&tx_row(&format!("c-{i:03}"), now)).await.unwrap();
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let me = Uuid::now_v7();
                let mut mine = Vec::new();
                for _ in 0..15 {
                    mine.extend(
                        s.claim_txs(me, now + secs(100), now + secs(200), 5)
                            .await
                            .unwrap()
                            .into_iter()
                            .map(|r| r.xid),
                    );
                }
                mine
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in claimers {
        for xid in c.await.unwrap() {
            assert!(seen.insert(xid.clone()), "{xid} claimed twice");
        }
    }
    assert_eq!(seen.len(), 41, "the 40 new rows and x-2");

    // Retention: only decided transactions with nothing left to do, held by nobody, changed
    // before the cut, go.
    let done_at = now + secs(500);
    for (xid, outcome, pending) in [
        ("p-commit", Some(Outcome::Committed), false),
        ("p-abort", Some(Outcome::Aborted), false),
        ("p-doubt", Some(Outcome::Committed), true),
    ] {
        s.create_tx(&tx_row(xid, now)).await.unwrap();
        let update = TxUpdate {
            xid: &tx_id(xid),
            holder: None,
            outcome,
            pending,
            next_run_at: if pending { Some(done_at + secs(60)) } else { None },
            lease: None,
            log_version: 2,
            now: done_at,
        };
        assert!(s.update_tx(&update).await.unwrap());
    }
    // Rows the checks above decided go first; these three changed at the cut, not before it.
    s.purge_txs(done_at, 1000).await.unwrap();
    for xid in ["p-commit", "p-abort", "p-doubt"] {
        assert!(
            s.get_tx(&tx_id(xid)).await.unwrap().is_some(),
            "{xid} went before its time"
        );
    }
    assert_eq!(s.purge_txs(done_at + secs(1), 1).await.unwrap(), 1, "at most the limit");
    assert_eq!(s.purge_txs(done_at + secs(1), 100).await.unwrap(), 1);
    for (xid, kept) in [("p-commit", false), ("p-abort", false), ("p-doubt", true)] {
        assert_eq!(s.get_tx(&tx_id(xid)).await.unwrap().is_some(), kept, "{xid}");
    }
}
