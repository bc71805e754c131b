//! The read-through cache against a real SQLite table and, when `CONCORD_TEST_REDIS_URL` is set, a
//! real Redis: single-flight loads, versioned sets, invalidation races between writers and slow
//! loaders on two instances, the event-log feed, and a Redis server killed and restarted under
//! load. Redis tests use a key prefix and channel of their own and print that they skipped when
//! the variable is unset.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use concord_sdk::Client;
use concord_sdk::cache::{Cache, CacheConfig, CacheError, Cached, KeyError, RedisConfig, SetOutcome, TierWrite};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, Notify, mpsc};
use tokio::task::JoinSet;

/// The longest any wait in these tests may take before it counts as a failure.
const PATIENCE: Duration = Duration::from_secs(20);

/// The cached value: a row of `items` as the loader read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Item {
    value: String,
    version: u64,
}

fn item(value: &str, version: u64) -> Item {
    Item {
        value: value.into(),
        version,
    }
}

fn value(item: Item) -> Cached<Item> {
    let version = item.version;
    Cached::Value { value: item, version }
}

/// A loader answer for `item`.
fn found(item: Item) -> Result<Option<(Item, u64)>, std::io::Error> {
    let version = item.version;
    Ok(Some((item, version)))
}

fn redis_url() -> Option<String> {
    match std::env::var("CONCORD_TEST_REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("skipped: CONCORD_TEST_REDIS_URL is not set");
            None
        }
    }
}

/// A key prefix and channel no other test uses.
fn scratch_redis() -> RedisConfig {
    let prefix = format!("concord_t_{}:", uuid::Uuid::new_v4().simple());
    RedisConfig {
        channel: format!("{prefix}invalidations"),
        key_prefix: prefix,
        op_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        ping_interval: Duration::from_millis(200),
        failure_cooldown: Duration::from_millis(200),
        ..RedisConfig::default()
    }
}

fn quick_reconnects() -> CacheConfig {
    CacheConfig {
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(300),
        ..CacheConfig::default()
    }
}

async fn redis_cache(url: &str, config: CacheConfig, redis: RedisConfig) -> Cache<Item> {
    let client = redis::Client::open(url).expect("a Redis URL");
    let cache = Cache::with_redis(config, client, redis).expect("a valid cache configuration");
    assert!(cache.ready(PATIENCE).await, "the cache subscribes to its channel");
    cache
}

/// Deletes what a test left under its prefix.
async fn clean_redis(url: &str, prefix: &str) {
    use redis::AsyncCommands as _;
    let client = redis::Client::open(url).unwrap();
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut keys: Vec<String> = Vec::new();
    if let Ok(mut scan) = con.scan_match::<_, String>(format!("{prefix}*")).await {
        while let Some(Ok(key)) = futures::StreamExt::next(&mut scan).await {
            keys.push(key);
        }
    }
    if !keys.is_empty() {
        let _: Result<(), _> = con.del(keys).await;
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A small xorshift generator: the races need pauses of a few random milliseconds, not quality.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(u64::try_from(uuid::Uuid::new_v4().as_u128() & u128::from(u64::MAX)).unwrap() | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ---------------------------------------------------------------------------------------------
// The database the loaders read: `items(key, value, version)` in a SQLite file.

const QUIET: &str = "quiet";

struct Db {
    pool: SqlitePool,
    keys: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Db {
    async fn new(keys: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("items.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE items (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let keys: Vec<String> = (0..keys).map(|i| format!("item-{i}")).collect();
        for key in &keys {
            sqlx::query("INSERT INTO items (key, value, version) VALUES (?, ?, 1)")
                .bind(key)
                .bind(format!("{key} v1"))
                .execute(&pool)
                .await
                .unwrap();
        }
        // A row outside `keys`: the readers never touch it.
        sqlx::query("INSERT INTO items (key, value, version) VALUES (?, 'quiet v1', 1)")
            .bind(QUIET)
            .execute(&pool)
            .await
            .unwrap();
        Self { pool, keys, _dir: dir }
    }

    async fn row(pool: &SqlitePool, key: &str) -> Result<Option<Item>, sqlx::Error> {
        let row: Option<(String, i64)> = sqlx::query_as("SELECT value, version FROM items WHERE key = ?")
            .bind(key)
            .fetch_optional(pool)
            .await?;
        Ok(row.map(|(value, version)| item(&value, u64::try_from(version).unwrap())))
    }

    /// The loader of the race tests: reads the row, then dawdles so that writers overtake it.
    async fn slow_load(pool: &SqlitePool, key: &str, loads: &AtomicUsize) -> Result<Option<(Item, u64)>, sqlx::Error> {
        loads.fetch_add(1, Ordering::SeqCst);
        let row = Self::row(pool, key).await?;
        let pause = Rng::new().below(6);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        Ok(row.map(|item| {
            let version = item.version;
            (item, version)
        }))
    }

    /// One writer's change: a new value and the next version, committed; returns the version.
    async fn write(pool: &SqlitePool, key: &str, tag: &str) -> u64 {
        let (version,): (i64,) =
            sqlx::query_as("UPDATE items SET value = ?, version = version + 1 WHERE key = ? RETURNING version")
                .bind(tag)
                .bind(key)
                .fetch_one(pool)
                .await
                .unwrap();
        u64::try_from(version).unwrap()
    }

    async fn rows(&self) -> HashMap<String, Item> {
        let mut rows = HashMap::new();
        for key in &self.keys {
            rows.insert(key.clone(), Self::row(&self.pool, key).await.unwrap().unwrap());
        }
        rows
    }
}

/// Every entry either tier holds equals the database: a value is the row, a tombstone is not
/// newer than the row. Then every read through each node equals the row too.
async fn assert_nothing_stale(db: &Db, nodes: &[Cache<Item>], shared: bool) {
    let rows = db.rows().await;
    for (n, node) in nodes.iter().enumerate() {
        for (key, entry) in node.local_snapshot() {
            let Some(row) = rows.get(&key) else { continue };
            match entry {
                Cached::Value { value, version } => {
                    assert_eq!(
                        (&value, version),
                        (row, row.version),
                        "node {n} holds a stale local {key}"
                    );
                }
                Cached::Tombstone { version } => assert!(version <= row.version, "node {n}: tombstone of {key}"),
            }
        }
    }
    if shared {
        for key in &db.keys {
            let entry = loop {
                match nodes[0].shared_entry(key).await {
                    Err(CacheError::SharedUnavailable) => tokio::time::sleep(Duration::from_millis(50)).await,
                    other => break other.expect("Redis answers"),
                }
            };
            match entry {
                Some(Cached::Value { value, version }) => {
                    assert_eq!(
                        (&value, version),
                        (&rows[key], rows[key].version),
                        "Redis holds a stale {key}"
                    );
                }
                Some(Cached::Tombstone { version }) => assert!(version <= rows[key].version),
                None => {}
            }
        }
    }
    let loads = AtomicUsize::new(0);
    for node in nodes {
        for key in &db.keys {
            let read = node
                .get_or_load(key, || Db::slow_load(&db.pool, key, &loads))
                .await
                .unwrap();
            assert_eq!(read.as_ref(), Some(&rows[key]), "a read of {key}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Single flight.

/// Warms `key`, lets it expire, then sends 1,000 concurrent readers at it; returns how many times
/// the loader ran for them.
async fn thousand_readers_after_expiry(cache: &Cache<Item>, key: &str) -> usize {
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = |loads: Arc<AtomicUsize>| {
        move || {
            let loads = Arc::clone(&loads);
            async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                found(item("hot", 1))
            }
        }
    };
    let warm = cache.get_or_load(key, loader(Arc::clone(&loads))).await.unwrap();
    assert_eq!(warm, Some(item("hot", 1)));
    assert_eq!(cache.local_entry(key).await, Some(value(item("hot", 1))));
    let cached = cache.get_or_load(key, loader(Arc::clone(&loads))).await.unwrap();
    assert_eq!(
        (cached, loads.load(Ordering::SeqCst)),
        (Some(item("hot", 1)), 1),
        "served from the cache"
    );

    let key = key.to_owned();
    eventually("the entry expired", async || {
        cache.local_entry(&key).await.is_none() && matches!(cache.shared_entry(&key).await, Ok(None))
    })
    .await;
    loads.store(0, Ordering::SeqCst);

    let start = Arc::new(Barrier::new(1000));
    let mut readers = JoinSet::new();
    for _ in 0..1000 {
        let (cache, key, start, load) = (
            cache.clone(),
            key.clone(),
            Arc::clone(&start),
            loader(Arc::clone(&loads)),
        );
        readers.spawn(async move {
            start.wait().await;
            cache.get_or_load(&key, load).await
        });
    }
    while let Some(read) = readers.join_next().await {
        assert_eq!(read.unwrap().unwrap(), Some(item("hot", 1)));
    }
    loads.load(Ordering::SeqCst)
}

fn short_ttls() -> CacheConfig {
    CacheConfig {
        local_ttl: Duration::from_millis(300),
        ..CacheConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_readers_of_an_expired_key_make_one_load_locally() {
    let cache = Cache::local(short_ttls()).unwrap();
    assert_eq!(thousand_readers_after_expiry(&cache, "hot").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_readers_of_an_expired_key_make_one_load_with_redis() {
    let Some(url) = redis_url() else { return };
    let redis = RedisConfig {
        ttl: Duration::from_millis(1500),
        ..scratch_redis()
    };
    let cache = redis_cache(&url, short_ttls(), redis.clone()).await;
    assert_eq!(thousand_readers_after_expiry(&cache, "hot").await, 1);
    assert_eq!(
        cache.shared_entry("hot").await.unwrap(),
        Some(value(item("hot", 1))),
        "the load filled Redis"
    );

    // Another instance finds it in Redis without loading.
    let other = redis_cache(&url, CacheConfig::default(), redis.clone()).await;
    let read = other
        .get_or_load("hot", || async {
            Err::<Option<(Item, u64)>, _>(std::io::Error::other("must not load"))
        })
        .await
        .unwrap();
    assert_eq!(read, Some(item("hot", 1)));
    assert_eq!((other.stats().shared_hits, other.stats().loads), (1, 0));
    clean_redis(&url, &redis.key_prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_reaches_every_waiting_caller_and_nothing_is_cached() {
    let cache: Cache<Item> = Cache::local(CacheConfig::default()).unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let mut readers = JoinSet::new();
    for _ in 0..50 {
        let (cache, loads, gate) = (cache.clone(), Arc::clone(&loads), Arc::clone(&gate));
        readers.spawn(async move {
            cache
                .get_or_load("k", || {
                    let (loads, gate) = (Arc::clone(&loads), Arc::clone(&gate));
                    async move {
                        // Only the first load parks; a caller too late to follow it loads again.
                        if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                            gate.notified().await;
                        }
                        Err::<Option<(Item, u64)>, _>(std::io::Error::other("database down"))
                    }
                })
                .await
        });
    }
    eventually("the load started", async || loads.load(Ordering::SeqCst) == 1).await;
    // Let the followers join while the loader is parked.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    while let Some(read) = readers.join_next().await {
        let Err(CacheError::Load(e)) = read.unwrap() else {
            panic!("every caller gets the loader's error")
        };
        assert_eq!(e.to_string(), "database down");
        assert!(e.downcast_ref::<std::io::Error>().is_some());
    }
    let followers_or_later = loads.load(Ordering::SeqCst);
    assert!(followers_or_later >= 1);
    assert!(!cache.contains_local("k").await);

    let missing = cache.get_or_load("k", || async { Ok::<_, std::io::Error>(None) }).await;
    assert_eq!(missing.unwrap(), None);
    assert!(!cache.contains_local("k").await, "not found is not cached");
    assert_eq!(cache.stats().load_errors, u64::try_from(followers_or_later).unwrap());
}

#[tokio::test]
async fn a_loader_that_overruns_its_deadline_fails_with_a_timeout() {
    let config = CacheConfig {
        load_timeout: Duration::from_millis(50),
        ..CacheConfig::default()
    };
    let cache: Cache<Item> = Cache::local(config).unwrap();
    let read = cache
        .get_or_load("k", || {
            std::future::pending::<Result<Option<(Item, u64)>, std::io::Error>>()
        })
        .await;
    assert!(matches!(read, Err(CacheError::LoadTimeout(t)) if t == Duration::from_millis(50)));
    assert!(!cache.contains_local("k").await);
}

// ---------------------------------------------------------------------------------------------
// Versioned sets and tombstones.

/// The same rules on any cache; `shared` says whether Redis must hold the same entries.
async fn versioned_sets_follow_the_rules(cache: &Cache<Item>, shared: bool) {
    let tier = |stored: TierWrite| SetOutcome {
        local: stored,
        shared: if shared { stored } else { TierWrite::Skipped },
    };
    let both = async |expected: Option<Cached<Item>>| {
        assert_eq!(cache.local_entry("k").await, expected);
        if shared {
            assert_eq!(cache.shared_entry("k").await.unwrap(), expected);
        }
    };

    assert_eq!(cache.set("k", item("a", 5), 5).await.unwrap(), tier(TierWrite::Stored));
    both(Some(value(item("a", 5)))).await;
    assert_eq!(
        cache.set("k", item("old", 4), 4).await.unwrap(),
        tier(TierWrite::Refused)
    );
    assert_eq!(
        cache.set("k", item("same", 5), 5).await.unwrap(),
        tier(TierWrite::Refused)
    );
    both(Some(value(item("a", 5)))).await;
    assert_eq!(cache.set("k", item("b", 6), 6).await.unwrap(), tier(TierWrite::Stored));
    both(Some(value(item("b", 6)))).await;

    cache.invalidate("k", 8).await.unwrap();
    both(Some(Cached::Tombstone { version: 8 })).await;
    assert_eq!(cache.set("k", item("c", 7), 7).await.unwrap(), tier(TierWrite::Refused));
    // A load that read before the write (version 7) is returned but not stored.
    let stale = cache.get_or_load("k", || async { found(item("c", 7)) }).await.unwrap();
    assert_eq!(stale, Some(item("c", 7)));
    both(Some(Cached::Tombstone { version: 8 })).await;
    // A load of the write's own version is the fresh value: it replaces the tombstone.
    let fresh = cache.get_or_load("k", || async { found(item("d", 8)) }).await.unwrap();
    assert_eq!(fresh, Some(item("d", 8)));
    both(Some(value(item("d", 8)))).await;
    // The same invalidation delivered again, or an older one, changes nothing.
    cache.invalidate("k", 8).await.unwrap();
    cache.apply_invalidation("k", 3).await.unwrap();
    both(Some(value(item("d", 8)))).await;
    assert_eq!(cache.set("k", item("e", 9), 9).await.unwrap(), tier(TierWrite::Stored));
    both(Some(value(item("e", 9)))).await;
    // Versions keep their order beyond what a Lua number holds exactly.
    let big = (1_u64 << 53) + 1;
    assert_eq!(
        cache.set("k", item("big", big), big).await.unwrap(),
        tier(TierWrite::Stored)
    );
    assert_eq!(
        cache.set("k", item("big-1", big - 1), big - 1).await.unwrap(),
        tier(TierWrite::Refused)
    );
    both(Some(value(item("big", big)))).await;
}

#[tokio::test]
async fn versioned_sets_refuse_older_versions_locally() {
    let cache = Cache::local(CacheConfig::default()).unwrap();
    versioned_sets_follow_the_rules(&cache, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_sets_refuse_older_versions_in_redis() {
    let Some(url) = redis_url() else { return };
    let redis = scratch_redis();
    let cache = redis_cache(&url, CacheConfig::default(), redis.clone()).await;
    versioned_sets_follow_the_rules(&cache, true).await;

    // Another instance: the invalidation reached it through the channel, and its own older
    // load cannot overwrite Redis either.
    let other = redis_cache(&url, CacheConfig::default(), redis.clone()).await;
    let big = (1_u64 << 53) + 1;
    cache.invalidate("k", big + 10).await.unwrap();
    assert_eq!(
        other
            .get_or_load("k", || async { found(item("late", big + 5)) })
            .await
            .unwrap(),
        Some(item("late", big + 5))
    );
    assert_eq!(
        other.shared_entry("k").await.unwrap(),
        Some(Cached::Tombstone { version: big + 10 })
    );
    assert_eq!(
        other.stats().stale_loads,
        3,
        "older than Redis's tombstone: loaded again, never stored"
    );
    let tombstone = Some(Cached::Tombstone { version: big + 10 });
    eventually("the other instance received the invalidation", async || {
        other.local_entry("k").await == tombstone
    })
    .await;
    clean_redis(&url, &redis.key_prefix).await;
}

/// A load parks after reading version 1; meanwhile `invalidate` runs at version 2. The load must
/// not store version 1, and with attempts left it loads again and gets version 2.
async fn a_load_overtaken_by_a_write_is_never_stored(reader: &Cache<Item>, writer: &Cache<Item>, attempts: u32) {
    let loads = Arc::new(AtomicUsize::new(0));
    let (parked, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let load = {
        let (reader, loads, parked, go) = (reader.clone(), Arc::clone(&loads), Arc::clone(&parked), Arc::clone(&go));
        tokio::spawn(async move {
            reader
                .get_or_load("k", || {
                    let (loads, parked, go) = (Arc::clone(&loads), Arc::clone(&parked), Arc::clone(&go));
                    async move {
                        if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                            parked.notify_one();
                            go.notified().await;
                            return found(item("before the write", 1));
                        }
                        found(item("after the write", 2))
                    }
                })
                .await
        })
    };
    parked.notified().await;
    writer.invalidate("k", 2).await.unwrap();
    // The reader has it (through the channel when the writer is another instance).
    let tombstone = Some(Cached::Tombstone { version: 2 });
    eventually("the reader received the invalidation", async || {
        reader.local_entry("k").await == tombstone
    })
    .await;
    go.notify_one();
    let read = load.await.unwrap().unwrap();
    assert_eq!(reader.stats().stale_loads, 1);
    if attempts > 1 {
        assert_eq!(
            (read, loads.load(Ordering::SeqCst)),
            (Some(item("after the write", 2)), 2)
        );
        assert_eq!(reader.local_entry("k").await, Some(value(item("after the write", 2))));
    } else {
        assert_eq!(
            (read, loads.load(Ordering::SeqCst)),
            (Some(item("before the write", 1)), 1)
        );
        assert_eq!(reader.local_entry("k").await, tombstone);
        assert!(!matches!(
            reader.shared_entry("k").await.unwrap(),
            Some(Cached::Value { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_a_write_is_never_stored_locally() {
    for attempts in [1, 3] {
        let cache = Cache::local(CacheConfig {
            load_attempts: attempts,
            ..CacheConfig::default()
        })
        .unwrap();
        a_load_overtaken_by_a_write_is_never_stored(&cache, &cache, attempts).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_a_write_on_another_instance_is_never_stored() {
    let Some(url) = redis_url() else { return };
    for attempts in [1, 3] {
        let redis = scratch_redis();
        let config = CacheConfig {
            load_attempts: attempts,
            ..CacheConfig::default()
        };
        let reader = redis_cache(&url, config.clone(), redis.clone()).await;
        let writer = redis_cache(&url, config, redis.clone()).await;
        a_load_overtaken_by_a_write_is_never_stored(&reader, &writer, attempts).await;
        clean_redis(&url, &redis.key_prefix).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Writers racing slow loaders on two instances.

const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 40;
const READERS: usize = 8;

/// How invalidations reach the instance that did not write.
#[derive(Clone, Copy)]
enum Delivery {
    /// Through Redis pub/sub (`invalidate` publishes).
    Channel,
    /// Local tiers only: a broker stand-in hands each invalidation to the other instance a few
    /// random milliseconds later, through `apply_invalidation`.
    Broker,
}

/// Readers that keep reading random keys through random nodes until stopped; every read must
/// succeed, whatever state Redis is in.
fn spawn_readers(db: &Db, nodes: &[Cache<Item>], stop: &Arc<AtomicBool>, loads: &Arc<AtomicUsize>) -> JoinSet<u64> {
    let mut readers = JoinSet::new();
    for _ in 0..READERS {
        let (pool, keys, nodes) = (db.pool.clone(), db.keys.clone(), nodes.to_vec());
        let (stop, loads) = (Arc::clone(stop), Arc::clone(loads));
        readers.spawn(async move {
            let mut rng = Rng::new();
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = &keys[usize::try_from(rng.below(keys.len() as u64)).unwrap()];
                let node = &nodes[usize::try_from(rng.below(nodes.len() as u64)).unwrap()];
                let read = node.get_or_load(key, || Db::slow_load(&pool, key, &loads)).await;
                assert!(matches!(read, Ok(Some(_))), "a read failed: {read:?}");
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        });
    }
    readers
}

/// What writers do when an invalidation reports an error (Redis down).
#[derive(Clone, Copy, PartialEq)]
enum OnFailure {
    /// Count it and go on.
    Count,
    /// Count it and retry until it succeeds, as the cache's documentation asks writers to.
    Retry,
}

/// Writers: update a random row, then invalidate through a random node. Returns how many
/// invalidation attempts reported an error.
async fn run_writers(
    db: &Db,
    nodes: &[Cache<Item>],
    delivery: Delivery,
    writes: usize,
    on_failure: OnFailure,
) -> usize {
    let failed = Arc::new(AtomicUsize::new(0));
    let mut writers = JoinSet::new();
    let mut deliveries = JoinSet::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Cache<Item>, String, u64)>();
    for w in 0..WRITERS {
        let (pool, keys, nodes, failed, tx) = (
            db.pool.clone(),
            db.keys.clone(),
            nodes.to_vec(),
            Arc::clone(&failed),
            tx.clone(),
        );
        writers.spawn(async move {
            let mut rng = Rng::new();
            for n in 0..writes {
                let key = &keys[usize::try_from(rng.below(keys.len() as u64)).unwrap()];
                let at = usize::try_from(rng.below(nodes.len() as u64)).unwrap();
                let version = Db::write(&pool, key, &format!("{key} by writer {w} #{n}")).await;
                let deadline = Instant::now() + PATIENCE;
                while nodes[at].invalidate(key, version).await.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                    if on_failure == OnFailure::Count {
                        break;
                    }
                    assert!(Instant::now() < deadline, "Redis never came back");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if let Delivery::Broker = delivery {
                    for (i, other) in nodes.iter().enumerate() {
                        if i != at {
                            tx.send((other.clone(), key.clone(), version)).unwrap();
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
            }
        });
    }
    drop(tx);
    let broker = tokio::spawn(async move {
        let mut rng = Rng::new();
        while let Some((node, key, version)) = rx.recv().await {
            let pause = Duration::from_millis(rng.below(4));
            deliveries.spawn(async move {
                tokio::time::sleep(pause).await;
                node.apply_invalidation(&key, version).await.unwrap();
            });
        }
        while let Some(delivered) = deliveries.join_next().await {
            delivered.unwrap();
        }
    });
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    broker.await.unwrap();
    failed.load(Ordering::SeqCst)
}

/// Waits until every node has received every invalidation published so far: each publishes a
/// marker, and the channel delivers in publication order.
async fn drain_channel(nodes: &[Cache<Item>]) {
    let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    for (i, node) in nodes.iter().enumerate() {
        node.invalidate(&format!("{marker}-{i}"), 1).await.unwrap();
    }
    for node in nodes {
        for i in 0..nodes.len() {
            let key = format!("{marker}-{i}");
            eventually("the markers went round", async || {
                node.local_entry(&key).await == Some(Cached::Tombstone { version: 1 })
            })
            .await;
        }
    }
}

async fn race(nodes: &[Cache<Item>], delivery: Delivery, shared: bool) {
    let db = Db::new(6).await;
    let (stop, loads) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let readers = spawn_readers(&db, nodes, &stop, &loads);
    let failed = run_writers(&db, nodes, delivery, WRITES_PER_WRITER, OnFailure::Count).await;
    assert_eq!(failed, 0, "every invalidation reached Redis");
    if let Delivery::Channel = delivery {
        drain_channel(nodes).await;
    }
    stop.store(true, Ordering::SeqCst);
    let reads: u64 = readers.join_all().await.into_iter().sum();
    assert!(reads > 0 && loads.load(Ordering::SeqCst) > 0);
    let stats: Vec<_> = nodes.iter().map(Cache::stats).collect();
    eprintln!("{reads} reads, {} loads; {stats:?}", loads.load(Ordering::SeqCst));
    assert_nothing_stale(&db, nodes, shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_and_slow_loaders_leave_nothing_stale_locally() {
    let nodes = [
        Cache::local(CacheConfig::default()).unwrap(),
        Cache::local(CacheConfig::default()).unwrap(),
    ];
    race(&nodes, Delivery::Broker, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_and_slow_loaders_leave_nothing_stale_with_redis() {
    let Some(url) = redis_url() else { return };
    let redis = scratch_redis();
    let nodes = [
        redis_cache(&url, CacheConfig::default(), redis.clone()).await,
        redis_cache(&url, CacheConfig::default(), redis.clone()).await,
    ];
    race(&nodes, Delivery::Channel, true).await;
    clean_redis(&url, &redis.key_prefix).await;
}

// ---------------------------------------------------------------------------------------------
// Redis killed and restarted under load.

/// A `redis-server` of the test's own, killed when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Self { port, child: None };
        server.spawn();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
    }

    async fn wait_answering(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        eventually("redis-server answers", async || {
            match client.get_multiplexed_async_connection().await {
                Ok(mut con) => redis::cmd("PING").query_async::<String>(&mut con).await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_flushes_the_local_tiers_and_leaves_nothing_stale() {
    if redis_url().is_none() {
        return;
    }
    let mut server = RedisServer::start();
    server.wait_answering().await;
    let redis = scratch_redis();
    let nodes = [
        redis_cache(&server.url(), quick_reconnects(), redis.clone()).await,
        redis_cache(&server.url(), quick_reconnects(), redis.clone()).await,
    ];
    let db = Db::new(6).await;
    let warm = db.keys[0].clone();
    let loads = Arc::new(AtomicUsize::new(0));
    for node in &nodes {
        for key in [warm.as_str(), QUIET] {
            node.get_or_load(key, || Db::slow_load(&db.pool, key, &loads))
                .await
                .unwrap();
            assert!(node.contains_local(key).await);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let readers = spawn_readers(&db, &nodes, &stop, &loads);
    assert_eq!(
        run_writers(&db, &nodes, Delivery::Channel, 10, OnFailure::Count).await,
        0
    );

    server.kill();
    for node in &nodes {
        eventually("the instance noticed the lost channel", async || {
            !node.local_tier_enabled()
        })
        .await;
        assert_eq!(node.local_len(), 0, "the local tier was flushed");
        assert!(!node.contains_local(&warm).await);
    }
    // Writes go on while Redis is down: invalidations report it, and reads still answer, from
    // the database, filling no local tier. (`quiet` is a row the readers leave alone, so no
    // load of theirs is in flight for it.)
    let version = Db::write(&db.pool, QUIET, "written while Redis is down").await;
    assert!(matches!(
        nodes[0].invalidate(QUIET, version).await,
        Err(CacheError::Shared(_) | CacheError::SharedTimeout(_))
    ));
    for node in &nodes {
        let read = node
            .get_or_load(QUIET, || Db::slow_load(&db.pool, QUIET, &loads))
            .await
            .unwrap();
        assert_eq!(read, Some(item("written while Redis is down", version)));
        assert!(!node.contains_local(QUIET).await);
    }
    let failed_while_down = run_writers(&db, &nodes, Delivery::Channel, 10, OnFailure::Count).await;
    assert_eq!(
        failed_while_down,
        WRITERS * 10,
        "every invalidation reported the outage"
    );

    server.spawn();
    server.wait_answering().await;
    for node in &nodes {
        assert!(node.ready(PATIENCE).await, "the instance resubscribed");
        // Nothing from before the outage comes back: `quiet` changed while its invalidation could
        // reach no one.
        let read = node
            .get_or_load(QUIET, || Db::slow_load(&db.pool, QUIET, &loads))
            .await
            .unwrap();
        assert_eq!(read, Some(item("written while Redis is down", version)));
    }
    run_writers(&db, &nodes, Delivery::Channel, 20, OnFailure::Retry).await;
    drain_channel(&nodes).await;
    stop.store(true, Ordering::SeqCst);
    readers.join_all().await;
    assert_nothing_stale(&db, &nodes, true).await;
    for node in &nodes {
        assert!(node.stats().feed_disconnects >= 1);
        node.get_or_load(&warm, || Db::slow_load(&db.pool, &warm, &loads))
            .await
            .unwrap();
        assert!(node.contains_local(&warm).await, "the local tier is in use again");
    }
    clean_redis(&server.url(), &redis.key_prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_loader_when_redis_is_unreachable() {
    // Nothing listens on the port of a listener just closed.
    let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let cache: Cache<Item> = Cache::with_redis(quick_reconnects(), client, scratch_redis()).unwrap();
    assert!(!cache.ready(Duration::from_millis(300)).await);
    let loads = AtomicUsize::new(0);
    for _ in 0..3 {
        let read = cache
            .get_or_load("k", || async {
                loads.fetch_add(1, Ordering::SeqCst);
                found(item("from the database", 3))
            })
            .await;
        assert_eq!(read.unwrap(), Some(item("from the database", 3)));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        3,
        "no tier may serve while the channel is down"
    );
    assert!(!cache.contains_local("k").await);
    assert!(matches!(
        cache.invalidate("k", 4).await,
        Err(CacheError::Shared(_) | CacheError::SharedTimeout(_))
    ));
    assert!(matches!(
        cache.set("k", item("x", 5), 5).await,
        Err(CacheError::Shared(_) | CacheError::SharedTimeout(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Feeds.

#[tokio::test]
async fn a_registered_feed_gates_the_local_tier() {
    let cache: Cache<Item> = Cache::local(CacheConfig::default()).unwrap();
    let loads = AtomicUsize::new(0);
    let read = async || {
        cache
            .get_or_load("k", || async {
                loads.fetch_add(1, Ordering::SeqCst);
                found(item("v", 1))
            })
            .await
            .unwrap()
    };
    let feed = cache.register_feed("orders consumer");
    assert!(!cache.local_tier_enabled());
    read().await;
    read().await;
    assert_eq!(loads.load(Ordering::SeqCst), 2, "bypassed until the feed is connected");
    assert!(!cache.contains_local("k").await);

    feed.connected();
    assert!(cache.ready(Duration::ZERO).await);
    read().await;
    read().await;
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert!(cache.contains_local("k").await);

    feed.disconnected();
    assert_eq!((cache.local_len(), cache.stats().feed_disconnects), (0, 1));
    assert!(!cache.contains_local("k").await);
    read().await;
    assert_eq!(loads.load(Ordering::SeqCst), 4);

    drop(feed);
    assert!(cache.local_tier_enabled());
}

/// One connection to the stand-in log server: the request line, and the socket to answer on.
struct LogConnection {
    request: String,
    socket: TcpStream,
}

impl LogConnection {
    async fn open_stream(&mut self) {
        self.socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
    }

    async fn event(&mut self, position: u64, stream: &str) {
        let event = serde_json::json!({
            "id": uuid::Uuid::new_v4(), "stream": stream, "version": 1, "position": position,
            "type": "Changed", "data": {}, "metadata": {}, "recorded_at": "2026-01-01T00:00:00Z",
        });
        let frame = format!("id: {position}\nevent: event\ndata: {event}\n\n");
        self.socket.write_all(frame.as_bytes()).await.unwrap();
    }
}

/// A server that speaks just enough of `GET /v1/events/subscribe` for the log feed.
async fn log_server() -> (String, mpsc::UnboundedReceiver<LogConnection>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            if tx.send(LogConnection { request, socket }).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_feed_invalidates_at_event_positions_and_resumes_after_a_disconnect() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, mut connections) = log_server().await;
    let client = Client::new(url, "k-cache").unwrap();
    let cache: Cache<Item> = Cache::local(quick_reconnects()).unwrap();
    let feed = cache
        .spawn_log_invalidation(client, Some("item".into()), 0, |event| {
            event.stream.strip_prefix("item-").map(str::to_owned)
        })
        .unwrap();
    assert!(
        !cache.local_tier_enabled(),
        "bypassed until the log subscription is open"
    );

    let mut first = connections.recv().await.unwrap();
    assert!(
        first
            .request
            .starts_with("GET /v1/events/subscribe?after=0&category=item "),
        "{}",
        first.request
    );
    first.open_stream().await;
    assert!(cache.ready(PATIENCE).await);

    cache.get_or_load("a", || async { found(item("a", 3)) }).await.unwrap();
    cache.get_or_load("b", || async { found(item("b", 4)) }).await.unwrap();
    assert_eq!(cache.local_len(), 2);

    first.event(5, "item-a").await;
    eventually("the event invalidated a", async || {
        cache.local_entry("a").await == Some(Cached::Tombstone { version: 5 })
    })
    .await;
    // The log position is the version: a load of the value before event 5 is not stored.
    let stale = cache.get_or_load("a", || async { found(item("a", 4)) }).await.unwrap();
    assert_eq!(stale, Some(item("a", 4)));
    assert_eq!(cache.local_entry("a").await, Some(Cached::Tombstone { version: 5 }));
    assert_eq!(cache.local_entry("b").await, Some(value(item("b", 4))));
    first.event(6, "other-b").await;
    first.event(7, "item-c").await;
    eventually("the feed applied event 7", async || feed.position() == 7).await;

    drop(first);
    eventually("the feed noticed the disconnect", async || !cache.local_tier_enabled()).await;
    assert_eq!(cache.local_len(), 0, "the local tier was flushed");

    let mut second = connections.recv().await.unwrap();
    assert!(
        second
            .request
            .starts_with("GET /v1/events/subscribe?after=7&category=item "),
        "resumes after the last applied event: {}",
        second.request
    );
    second.open_stream().await;
    assert!(cache.ready(PATIENCE).await);
    cache.get_or_load("a", || async { found(item("a", 8)) }).await.unwrap();
    assert_eq!(cache.local_entry("a").await, Some(value(item("a", 8))));

    feed.stop();
    eventually("a stopped feed no longer gates the cache", async || {
        cache.local_tier_enabled()
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[tokio::test]
async fn bad_keys_are_refused_with_typed_errors() {
    let cache: Cache<Item> = Cache::local(CacheConfig::default()).unwrap();
    let must_not_load = || async { Err::<Option<(Item, u64)>, _>(std::io::Error::other("must not load")) };
    let long = "k".repeat(513);
    for (key, expected) in [
        ("", KeyError::Empty),
        (long.as_str(), KeyError::TooLong { len: 513, max: 512 }),
    ] {
        let refused = |e: CacheError| matches!(e, CacheError::InvalidKey(k) if k == expected);
        assert!(refused(cache.get_or_load(key, must_not_load).await.unwrap_err()));
        assert!(refused(cache.set(key, item("v", 1), 1).await.unwrap_err()));
        assert!(refused(cache.invalidate(key, 1).await.unwrap_err()));
        assert!(refused(cache.apply_invalidation(key, 1).await.unwrap_err()));
        assert!(refused(cache.shared_entry(key).await.unwrap_err()));
    }
    let longest = "k".repeat(512);
    let read = cache.get_or_load(&longest, || async { found(item("v", 1)) }).await;
    assert_eq!(read.unwrap(), Some(item("v", 1)));

    let strict: Cache<Item> = Cache::local(CacheConfig {
        max_key_bytes: 4,
        ..CacheConfig::default()
    })
    .unwrap();
    // Bytes, not characters: "é" is two.
    assert!(matches!(
        strict.get_or_load("ééé", must_not_load).await,
        Err(CacheError::InvalidKey(KeyError::TooLong { len: 6, max: 4 }))
    ));
}

#[tokio::test]
async fn inconsistent_configurations_are_refused() {
    let short_tombstones = CacheConfig {
        tombstone_ttl: Duration::from_secs(1),
        load_timeout: Duration::from_secs(2),
        ..CacheConfig::default()
    };
    assert!(matches!(
        Cache::<Item>::local(short_tombstones),
        Err(CacheError::Config(_))
    ));
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let no_prefix = RedisConfig {
        key_prefix: String::new(),
        ..RedisConfig::default()
    };
    assert!(matches!(
        Cache::<Item>::with_redis(CacheConfig::default(), client, no_prefix),
        Err(CacheError::Config(_))
    ));
}

#[test]
fn a_shared_tier_needs_a_runtime() {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    assert!(matches!(
        Cache::<Item>::with_redis(CacheConfig::default(), client, RedisConfig::default()),
        Err(CacheError::Config(_))
    ));
}
