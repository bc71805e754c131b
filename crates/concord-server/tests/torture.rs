//! The ordering guarantee under load: three `concord serve` processes on one PostgreSQL database,
//! 24 appenders racing on shared streams with expected-version conflicts, an SSE subscriber and a
//! polling reader on every node, and one node SIGKILLed and started again mid-run. Afterwards the
//! log holds every acknowledged append once, positions are contiguous from 1, and every reader
//! saw exactly that log, in order: none missed, none doubled.
//! Needs `CONCORD_TEST_POSTGRES_URL`; without it the test prints that it skipped.

#[path = "support/proc.rs"]
mod proc;

use concord_sdk::{Client, ClientError, ErrorCode, EventInput, ExpectedVersion};
use proc::{ADMIN_KEY, Server};
use rand::RngExt as _;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const NODES: usize = 3;
const APPENDERS: usize = 24;
const APPENDS_EACH: usize = 40;
/// The node that is killed once half the appends are answered.
const VICTIM: usize = 2;

fn node(dir: &Path, addr: &str, database_url: &str) -> std::process::Command {
    let mut cmd = proc::concord(dir);
    cmd.args(["serve", "--listen", addr, "--database-url", database_url])
        .env("CONCORD_ADMIN_KEY", ADMIN_KEY)
        .env("CONCORD_DB_CONNECTIONS", "6");
    cmd
}

type Seen = Arc<Mutex<Vec<(u64, Uuid)>>>;

/// Follows the log over SSE on one node from its last position, connecting again whenever the
/// node goes away.
fn sse_reader(client: Client, seen: Seen, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let after = seen.lock().unwrap().last().map_or(0, |e| e.0);
            let Ok(mut sub) = client.subscribe(after, None).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                seen.lock().unwrap().push((e.position, e.id));
            }
        }
    })
}

/// Follows the log by polling pages on one node, with a cursor.
fn polling_reader(client: Client, seen: Seen, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut after = 0;
        while !stop.load(Ordering::Relaxed) {
            match client.read_log(after, 37, None).await {
                Ok(page) if !page.events.is_empty() => {
                    let mut seen = seen.lock().unwrap();
                    for e in page.events {
                        after = e.position;
                        seen.push((e.position, e.id));
                    }
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}

/// An acknowledged append: where its answer says its events are.
struct Acked {
    stream: String,
    ids: Vec<Uuid>,
    first_version: u64,
    /// The position of its last event.
    position: u64,
}

/// Appends, retrying on the next node (same event ids, so a retry of an append that did commit
/// is answered with its first outcome) while a node is away. Answers the appends acknowledged
/// and how many lost their expected-version race.
async fn appender(nodes: Vec<Client>, w: usize, answered: Arc<AtomicUsize>) -> (Vec<Acked>, usize) {
    let (mut acked, mut conflicts) = (Vec::new(), 0);
    for i in 0..APPENDS_EACH {
        let (delay, mut at, n, contend) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..4u64),
                rng.random_range(0..NODES),
                rng.random_range(1..=3usize),
                rng.random_bool(0.3),
            )
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let events: Vec<EventInput> = (0..n)
            .map(|k| EventInput {
                id: Some(Uuid::now_v7()),
                event_type: "T".into(),
                data: json!({"w": w, "i": i, "k": k}),
                metadata: None,
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Some appends race on shared streams with a guessed version and may lose.
        let (stream, mut expected) = if contend {
            (format!("hot-{}", i % 3), None)
        } else {
            (format!("w{w}-{}", i % 5), Some(ExpectedVersion::Any))
        };
        loop {
            assert!(Instant::now() < deadline, "append {w}/{i} found no node for 60 s");
            let client = &nodes[at];
            if expected.is_none() {
                expected = match client.read_stream(&stream, 1, 1000).await {
                    Ok(p) => Some(ExpectedVersion::Exact(p.events.last().map_or(0, |e| e.version))),
                    Err(e) if e.code() == Some(ErrorCode::StreamNotFound) => Some(ExpectedVersion::Exact(0)),
                    Err(_) => {
                        at = (at + 1) % NODES;
                        continue;
                    }
                };
            }
            match client
                .append(&stream, expected.expect("chosen above"), events.clone())
                .await
            {
                Ok(o) => {
                    assert_eq!(o.last_version - o.first_version + 1, n as u64, "{o:?}");
                    let ids = events.iter().filter_map(|e| e.id).collect();
                    acked.push(Acked {
                        stream: stream.clone(),
                        ids,
                        first_version: o.first_version,
                        position: o.position,
                    });
                    break;
                }
                Err(ClientError::Problem(p)) if p.error_code() == Some(ErrorCode::WrongExpectedVersion) => {
                    conflicts += 1;
                    break;
                }
                Err(ClientError::Problem(p)) if p.status != 503 => panic!("append refused: {p:?}"),
                // The node is down, or went down with the request: the same append on the next.
                Err(_) => {
                    at = (at + 1) % NODES;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        answered.fetch_add(1, Ordering::Relaxed);
    }
    (acked, conflicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_one_killed_and_every_reader_sees_exactly_the_committed_log() {
    let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..NODES).map(|_| proc::free_addr()).collect();
    let mut servers = Vec::new();
    for addr in &addrs {
        servers.push(Some(Server::start_ready(node(dir.path(), addr, &db)).await));
    }
    let clients: Vec<Client> = addrs
        .iter()
        .map(|a| Client::new(format!("http://{a}"), ADMIN_KEY).unwrap())
        .collect();

    // Readers start before any write: an SSE subscriber and a poller on every node.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (n, client) in clients.iter().enumerate() {
        for kind in ["sse", "poll"] {
            let seen = Seen::default();
            let task = if kind == "sse" {
                sse_reader(client.clone(), seen.clone(), stop.clone())
            } else {
                polling_reader(client.clone(), seen.clone(), stop.clone())
            };
            readers.push((format!("{kind} reader on node {n}"), seen, task));
        }
    }

    let answered = Arc::new(AtomicUsize::new(0));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|w| tokio::spawn(appender(clients.clone(), w, answered.clone())))
        .collect();

    // Mid-run, one node dies without a word and comes back on its address.
    let half = APPENDERS * APPENDS_EACH / 2;
    let deadline = Instant::now() + Duration::from_secs(120);
    while answered.load(Ordering::Relaxed) < half {
        assert!(Instant::now() < deadline, "half the appends not answered in 120 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut victim = servers[VICTIM].take().unwrap();
    victim.proc.signal("KILL");
    victim.proc.wait().await;
    let killed_at = answered.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers[VICTIM] = Some(Server::start_ready(node(dir.path(), &addrs[VICTIM], &db)).await);

    let (mut acked, mut conflicts) = (Vec::new(), 0);
    for t in appenders {
        let (a, c) = t.await.unwrap();
        acked.extend(a);
        conflicts += c;
    }
    assert!(conflicts > 0, "the run must include expected-version failures");
    assert!(
        killed_at < APPENDERS * APPENDS_EACH,
        "the node died while appends were still running"
    );

    // The truth: the whole log as stored.
    let mut stored: Vec<(u64, Uuid)> = Vec::new();
    let mut at: HashMap<Uuid, (String, u64, u64)> = HashMap::new();
    loop {
        let after = stored.last().map_or(0, |e| e.0);
        let page = clients[0].read_log(after, 1000, None).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        for e in page.events {
            stored.push((e.position, e.id));
            at.insert(e.id, (e.stream, e.version, e.position));
        }
    }
    let positions: Vec<u64> = stored.iter().map(|e| e.0).collect();
    assert_eq!(
        positions,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "positions are contiguous from 1"
    );
    let ids: HashSet<Uuid> = stored.iter().map(|e| e.1).collect();
    assert_eq!(ids.len(), stored.len(), "no event is stored twice");
    // Each answer told the truth: its events are in its stream, at the versions and the
    // position it gave, in order.
    for a in &acked {
        let n = a.ids.len() as u64;
        for (k, id) in a.ids.iter().enumerate() {
            let (stream, version, position) = at
                .get(id)
                .unwrap_or_else(|| panic!("acknowledged event {id} is in the log"));
            assert_eq!(stream, &a.stream);
            assert_eq!(*version, a.first_version + k as u64, "event {id}'s version");
            assert_eq!(*position, a.position + 1 + k as u64 - n, "event {id}'s position");
        }
    }
    let acked_events: usize = acked.iter().map(|a| a.ids.len()).sum();

    // Every reader catches up to the truth, and saw nothing else.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, seen, _) in &readers {
        while seen.lock().unwrap().len() < stored.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = seen.lock().unwrap().clone();
        let missed = stored.iter().filter(|e| !seen.contains(e)).count();
        assert!(
            seen == stored,
            "{name} saw {} of {} events ({missed} missed), or not in order",
            seen.len(),
            stored.len()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for (_, _, task) in readers {
        task.abort();
    }
    eprintln!(
        "torture: {acked_events} acknowledged events, {conflicts} appends refused, {} events stored; node {VICTIM} killed after {killed_at} answers",
        stored.len()
    );
}
