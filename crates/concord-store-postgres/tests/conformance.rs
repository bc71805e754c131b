//! The PostgreSQL adapters pass the ports' conformance suites against a real server.
//! Needs `CONCORD_TEST_POSTGRES_URL`; without it each test prints that it skipped.

use concord_core::testkit;
use concord_store_postgres::{PostgresConfig, PostgresStore, create_scratch_database};

fn base_url() -> Option<String> {
    let url = std::env::var("CONCORD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
    }
    url
}

async fn fresh(base: &str) -> PostgresStore {
    let url = create_scratch_database(base, "concord_t")
        .await
        .expect("create test database");
    PostgresStore::connect(&PostgresConfig::new(url))
        .await
        .expect("connect")
}

#[tokio::test]
async fn postgres_passes_the_event_store_suite() {
    let Some(base) = base_url() else { return };
    testkit::event_store_suite(|| fresh(&base)).await;
}

#[tokio::test]
async fn postgres_passes_the_key_store_suite() {
    let Some(base) = base_url() else { return };
    testkit::key_store_suite(fresh(&base).await).await;
}

#[tokio::test]
async fn postgres_passes_the_saga_store_suite() {
    let Some(base) = base_url() else { return };
    testkit::saga_store_suite(fresh(&base).await).await;
}

#[tokio::test]
async fn postgres_passes_the_tx_store_suite() {
    let Some(base) = base_url() else { return };
    testkit::tx_store_suite(fresh(&base).await).await;
}

#[tokio::test]
async fn postgres_passes_the_host_store_suite() {
    let Some(base) = base_url() else { return };
    testkit::host_store_suite(fresh(&base).await).await;
}

#[tokio::test]
async fn a_second_node_on_the_same_database_is_woken_by_notify() {
    use concord_core::domain::ExpectedVersion;
    use concord_core::ports::EventStore;
    let Some(base) = base_url() else { return };
    let url = create_scratch_database(&base, "concord_t").await.unwrap();
    let a = PostgresStore::connect(&PostgresConfig::new(&url)).await.unwrap();
    let b = PostgresStore::connect(&PostgresConfig::new(&url)).await.unwrap();
    let mut rx = b.watch_head();
    rx.borrow_and_update();
    let o = a
        .append(testkit::append("x-1", ExpectedVersion::Any, &["E"]))
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.wait_for(|p| *p >= o.position))
        .await
        .expect("node b hears node a's commit")
        .unwrap();
}

#[tokio::test]
async fn postgres_passes_the_vault_store_suite() {
    let Some(base) = base_url() else { return };
    let url = create_scratch_database(&base, "concord_t").await.unwrap();
    let store = concord_store_postgres::PostgresVaultStore::connect(&url, 8)
        .await
        .expect("connect the vault store");
    testkit::vault_store_suite(store).await;
}

#[tokio::test]
async fn the_vault_and_the_event_store_can_share_one_database() {
    let Some(base) = base_url() else { return };
    let url = create_scratch_database(&base, "concord_t").await.unwrap();
    for _ in 0..2 {
        let events = PostgresStore::connect(&PostgresConfig::new(&url))
            .await
            .expect("event store migrates");
        let vault = concord_store_postgres::PostgresVaultStore::connect(&url, 2)
            .await
            .expect("vault migrates beside it");
        drop(events);
        vault.close().await;
    }
}
