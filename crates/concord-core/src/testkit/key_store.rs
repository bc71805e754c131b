//! The conformance suite of the [`KeyStore`] port.

use crate::domain::{ApiKeyRecord, KeyHash, Scope};
use crate::ports::KeyStore;
use chrono::Utc;
use uuid::Uuid;

fn key_record(name: &str, scopes: &[&str], secret: &str) -> ApiKeyRecord {
    ApiKeyRecord {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        hash: KeyHash::of(secret),
        created_at: Utc::now(),
    }
}

/// Runs every key-store check on a fresh store.
pub async fn key_store_suite<S: KeyStore>(s: S) {
    assert_eq!(s.count_admin_keys().await.unwrap(), 0);
    let admin = key_record("root", &["admin"], "secret-a");
    let reader = key_record("reader", &["events:read", "sagas:read"], "secret-b");
    s.insert_key(&admin).await.unwrap();
    s.insert_key(&reader).await.unwrap();
    s.insert_key(&key_record("dup", &["admin"], "secret-a")).await.unwrap();
    assert_eq!(s.count_admin_keys().await.unwrap(), 1, "same hash is stored once");

    let found = s.find_key(&KeyHash::of("secret-b")).await.unwrap().expect("found");
    assert_eq!(found.id, reader.id);
    assert_eq!(found.name, "reader");
    assert_eq!(found.scopes, reader.scopes);
    assert!(s.find_key(&KeyHash::of("nope")).await.unwrap().is_none());

    assert!(s.revoke_key(admin.id).await.unwrap());
    assert!(!s.revoke_key(admin.id).await.unwrap(), "revoking twice finds nothing");
    assert!(s.find_key(&KeyHash::of("secret-a")).await.unwrap().is_none());
    assert_eq!(s.count_admin_keys().await.unwrap(), 0);

    assert_eq!(s.owner("group", "g").await.unwrap(), None);
    assert_eq!(s.claim_owner("group", "g", "orders").await.unwrap(), "orders");
    assert_eq!(s.owner("group", "g").await.unwrap().as_deref(), Some("orders"));
    assert_eq!(
        s.claim_owner("group", "g", "billing").await.unwrap(),
        "orders",
        "the first claim holds"
    );
    assert_eq!(s.claim_owner("group", "g", "orders").await.unwrap(), "orders");
    assert_eq!(
        s.claim_owner("definition", "g", "billing").await.unwrap(),
        "billing",
        "one owner per kind"
    );
}
