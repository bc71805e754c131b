//! The conformance suite of the [`IdempotencyStore`] port.

use crate::domain::{Fingerprint, IdempotencyKey};
use crate::ports::{IdempotencyBegin, IdempotencyClaim, IdempotencyStore, StoredResponse};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use uuid::Uuid;

/// Runs every idempotency-store check on a fresh store.
pub async fn idempotency_store_suite<S: IdempotencyStore>(s: S) {
    let owner = Uuid::now_v7();
    let other_owner = Uuid::now_v7();
    let key = IdempotencyKey::parse("k-1").unwrap();
    let now = Utc::now();
    let claim = |owner: Uuid, body: &[u8], now: DateTime<Utc>| IdempotencyClaim {
        owner,
        key: &key,
        fingerprint: Fingerprint::of("POST", "/x", body),
        now,
        locked_until: now + ChronoDuration::seconds(30),
        expires_at: now + ChronoDuration::hours(1),
    };
    let response = StoredResponse {
        status: 201,
        content_type: Some("application/json".into()),
        body: br#"{"ok":true}"#.to_vec(),
    };

    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        s.begin(&claim(owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Mismatch
    );
    assert_eq!(
        s.begin(&claim(other_owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Started,
        "keys are scoped per owner"
    );
    s.complete(&claim(owner, b"a", now), &response).await.unwrap();
    assert_eq!(
        s.begin(&claim(owner, b"a", now)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    assert_eq!(
        s.begin(&claim(owner, b"b", now)).await.unwrap(),
        IdempotencyBegin::Mismatch
    );

    // A released key can be claimed again.
    s.release(&claim(other_owner, b"b", now)).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", now)).await.unwrap(),
        IdempotencyBegin::Started
    );
    // An in-flight record whose holder died is taken over once its lock expires.
    let later = now + ChronoDuration::seconds(31);
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::Started
    );
    // The holder that lost the key to a takeover can neither complete nor release it.
    s.complete(&claim(other_owner, b"c", now), &response).await.unwrap();
    s.release(&claim(other_owner, b"c", now)).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::InFlight,
        "the new holder still holds the key"
    );
    s.complete(&claim(other_owner, b"c", later), &response).await.unwrap();
    assert_eq!(
        s.begin(&claim(other_owner, b"c", later)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    // A completed record is not taken over when its lock time passes, only when it expires.
    assert_eq!(
        s.begin(&claim(owner, b"a", later)).await.unwrap(),
        IdempotencyBegin::Replay(response.clone())
    );
    let expired = now + ChronoDuration::hours(2);
    assert_eq!(
        s.begin(&claim(owner, b"z", expired)).await.unwrap(),
        IdempotencyBegin::Started
    );

    assert!(s.purge_expired(now + ChronoDuration::hours(10)).await.unwrap() >= 1);
    assert_eq!(
        s.begin(&claim(other_owner, b"q", now + ChronoDuration::hours(10)))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
}
