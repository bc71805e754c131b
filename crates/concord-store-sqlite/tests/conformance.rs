//! The SQLite adapters pass the ports' conformance suites, on a file in WAL mode like production.

use concord_core::testkit;
use concord_store_sqlite::{SqliteConfig, SqliteStore};

async fn fresh(dir: &tempfile::TempDir) -> SqliteStore {
    let path = dir.path().join(format!("{}.db", uuid::Uuid::now_v7()));
    SqliteStore::connect(&SqliteConfig::new(format!("sqlite://{}", path.display())))
        .await
        .expect("open sqlite store")
}

#[tokio::test]
async fn sqlite_passes_the_event_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    testkit::event_store_suite(|| fresh(&dir)).await;
}

#[tokio::test]
async fn sqlite_passes_the_key_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    testkit::key_store_suite(fresh(&dir).await).await;
}

#[tokio::test]
async fn sqlite_passes_the_saga_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    testkit::saga_store_suite(fresh(&dir).await).await;
}

#[tokio::test]
async fn sqlite_passes_the_tx_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    testkit::tx_store_suite(fresh(&dir).await).await;
}

#[tokio::test]
async fn events_survive_reopening_the_file() {
    use concord_core::domain::ExpectedVersion;
    use concord_core::ports::EventStore;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keep.db").display());
    let store = SqliteStore::connect(&SqliteConfig::new(&url)).await.unwrap();
    let o = store
        .append(testkit::append("a-1", ExpectedVersion::NoStream, &["E", "F"]))
        .await
        .unwrap();
    store.close().await;
    let reopened = SqliteStore::connect(&SqliteConfig::new(&url)).await.unwrap();
    assert_eq!(reopened.head_position().await.unwrap(), o.position);
    let next = reopened
        .append(testkit::append("a-1", ExpectedVersion::Exact(2), &["G"]))
        .await
        .unwrap();
    assert_eq!(next.position, o.position + 1, "positions continue after a restart");
}

#[tokio::test]
async fn the_wal_is_checkpointed_into_the_database_file_in_the_background() {
    use concord_core::domain::ExpectedVersion;
    use concord_core::ports::EventStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.db");
    let store = SqliteStore::connect(&SqliteConfig::new(format!("sqlite://{}", path.display())))
        .await
        .unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    for i in 0..100 {
        let mut req = testkit::append(&format!("big-{i}"), ExpectedVersion::Any, &["E"]);
        req.events[0].data = serde_json::json!({ "pad": "x".repeat(4000) });
        store.append(req).await.unwrap();
    }
    // Commits never checkpoint inline; the background checkpointer must move the pages.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&path).unwrap().len() < before + 300_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file never received the WAL's pages"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sqlite_passes_the_vault_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.db");
    let store = concord_store_sqlite::SqliteVaultStore::connect(&format!("sqlite://{}", path.display()), true)
        .await
        .expect("open the vault store");
    testkit::vault_store_suite(store).await;
}
