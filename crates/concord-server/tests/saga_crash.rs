//! Crash tests of the saga runner with the real `concord` binary: sagas started against a server
//! that is SIGKILLed at random moments and restarted all reach a terminal status, and the
//! participants' own ledgers agree with every saga's recorded outcome, with nothing done twice.
//! Then two server nodes on one PostgreSQL database share a run without working on one saga at once.

#[path = "support/participant.rs"]
mod participant;
#[path = "support/proc.rs"]
mod proc;

use participant::{Participant, check_saga};
use proc::{ADMIN_KEY, Server, concord, free_addr, within};
use serde_json::{Value, json};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::Duration;

const SAGAS: usize = 200;

/// `concord serve` on `database_url`, with short leases so a dead node's sagas resume quickly.
fn node(dir: &Path, database_url: &str) -> Command {
    node_at(dir, database_url, "127.0.0.1:0")
}

/// A node listening on `listen`.
fn node_at(dir: &Path, database_url: &str, listen: &str) -> Command {
    let mut cmd = concord(dir);
    cmd.args(["serve", "--listen", listen, "--database-url", database_url])
        .env("CONCORD_ADMIN_KEY", ADMIN_KEY)
        .env("CONCORD_SAGA_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
        .env("CONCORD_TX_ALLOWED_HOSTS", r#"["127.0.0.1"]"#)
        .env("CONCORD_LEASE_MS", "1000")
        .env("CONCORD_POLL_MS", "50")
        .env("RUST_LOG", "warn,concord=info");
    cmd
}

/// A small deterministic generator, so a failing run can be replayed from its printed seed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn plan(rng: &mut Lcg) -> Value {
    let step = ["reserve", "charge", "ship"][usize::try_from(rng.next(3)).unwrap()];
    match rng.next(9) {
        0 | 1 => json!({}),
        2 => json!({ step: "refuse" }),
        3 => json!({ step: "flaky:2" }),
        4 => json!({ step: "flaky:9" }),
        5 => json!({ step: "hang:1" }),
        6 => json!({ step: "hang:9" }),
        7 => json!({ step: "dup:1" }),
        _ => json!({ "ship": "refuse", "reserve_undo": "cfail:2" }),
    }
}

async fn post(http: &reqwest::Client, url: &str, path: &str, body: &Value) -> Option<reqwest::Response> {
    send(http, reqwest::Method::POST, url, path, body).await
}

async fn put(http: &reqwest::Client, url: &str, path: &str, body: &Value) -> Option<reqwest::Response> {
    send(http, reqwest::Method::PUT, url, path, body).await
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    path: &str,
    body: &Value,
) -> Option<reqwest::Response> {
    http.request(method, format!("{url}{path}"))
        .bearer_auth(ADMIN_KEY)
        .json(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
}

async fn get(http: &reqwest::Client, url: &str, path: &str) -> Option<Value> {
    let r = http
        .get(format!("{url}{path}"))
        .bearer_auth(ADMIN_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Waits until every saga is terminal (failing after `limit`), then returns each one's full view.
async fn settle(http: &reqwest::Client, url: &str, ids: &[String], limit: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut open = Vec::new();
        let mut done = Vec::new();
        for id in ids {
            match get(http, url, &format!("/v1/sagas/{id}")).await {
                Some(s)
                    if matches!(
                        s["status"].as_str(),
                        Some("completed" | "compensated" | "failed" | "cancelled")
                    ) =>
                {
                    done.push(s);
                }
                other => open.push((id.clone(), other.map(|s| s["status"].clone()))),
            }
        }
        if open.is_empty() {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sagas not terminal after {limit:?}: {:?}",
            open.len(),
            &open[..open.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts a saga of `definition` for each id, with the plan `plan(index)`.
async fn start_all(http: &reqwest::Client, url: &str, definition: &str, ids: &[String], plan: impl Fn(usize) -> Value) {
    for (i, id) in ids.iter().enumerate() {
        let body = json!({"definition": definition, "id": id, "input": {"plan": plan(i)}});
        let r = post(http, url, "/v1/sagas", &body).await.unwrap();
        assert_eq!(r.status(), 201, "start {id}");
    }
}

/// Polls `path(id)` for each id until `reached` holds of what it answers (10 s each).
async fn until_each(
    http: &reqwest::Client,
    url: &str,
    ids: &[String],
    path: impl Fn(&str) -> String,
    reached: impl Fn(&Value) -> bool,
) {
    for id in ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = get(http, url, &path(id)).await;
            if answer.as_ref().is_some_and(&reached) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{id} never got there: {answer:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn check_all(p: &Participant, sagas: &[Value]) {
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    for s in sagas {
        assert_ne!(s["status"], "failed", "no compensation here runs out of attempts: {s}");
        if let Some(problem) = check_saga(p, s) {
            panic!("{problem}\n{s:#}");
        }
        *by_status.entry(s["status"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let l = p.ledger.lock().unwrap();
    assert_eq!(l.bad_headers, 0);
    eprintln!(
        "outcomes: {by_status:?}; participant calls: {}",
        l.attempts.values().sum::<u32>()
    );
    assert!(
        by_status.get("completed").copied().unwrap_or(0) > 0 && by_status.get("compensated").copied().unwrap_or(0) > 0
    );
}

async fn sagas_survive_repeated_sigkill(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(400)).await;
    let server = Server::start(node(dir, database_url)).await;
    let http = reqwest::Client::new();
    let r = put(
        &http,
        &server.url,
        "/v1/saga-definitions/order",
        &p.definition(&["reserve", "charge", "ship"], 200),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let url = Arc::new(RwLock::new(server.url.clone()));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    let ids: Vec<String> = (0..SAGAS).map(|i| format!("crash-{i:03}")).collect();
    let plans: Vec<Value> = (0..SAGAS).map(|_| plan(&mut rng)).collect();

    // Starters keep re-sending each start until a server acknowledges it; the caller-chosen id
    // makes a re-sent start find the saga instead of starting it twice.
    let starters = {
        let (ids, plans, url, http) = (ids.clone(), plans.clone(), url.clone(), http.clone());
        tokio::spawn(async move {
            for (id, plan) in ids.iter().zip(plans) {
                let body = json!({"definition": "order", "id": id, "input": {"plan": plan}});
                loop {
                    let current = url.read().unwrap().clone();
                    if let Some(r) = post(&http, &current, "/v1/sagas", &body).await
                        && r.status().is_success()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        })
    };

    let mut server = server;
    for kill in 0..4 {
        tokio::time::sleep(Duration::from_millis(300 + rng.next(700))).await;
        server.proc.signal("KILL");
        let status = server.proc.wait().await;
        assert_eq!(status.signal(), Some(9), "kill {kill}: {status}");
        drop(server);
        server = Server::start(node(dir, database_url)).await;
        *url.write().unwrap() = server.url.clone();
    }
    within("all starts acknowledged", starters).await.unwrap();
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(90)).await;
    // Hanging calls from before the last kill may still land: let them, then check again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    check_all(&p, &sagas);
    // Some sagas were cut by a kill and finished by the restarted node, from their logs.
    let mut resumed = 0;
    for id in &ids {
        let log = get(&http, &server.url, &format!("/v1/streams/saga-{id}"))
            .await
            .unwrap();
        let nodes: std::collections::HashSet<&str> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["metadata"]["node"].as_str())
            .collect();
        resumed += usize::from(nodes.len() > 1);
    }
    eprintln!("sagas resumed by a restarted node: {resumed}");
    assert!(resumed > 0, "the kills interrupted no saga; the test proved nothing");
}

fn postgres_base() -> Option<String> {
    let url = std::env::var("CONCORD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
    }
    url
}

/// `scenario::sqlite` on a SQLite file, and `scenario::postgres` on a scratch database of
/// `CONCORD_TEST_POSTGRES_URL` (skipped, saying so, when it is unset).
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("concord.db").display());
                super::$scenario(&url, dir.path()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(base) = super::postgres_base() else {
                    return;
                };
                let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
                    .await
                    .unwrap();
                let dir = tempfile::tempdir().unwrap();
                super::$scenario(&url, dir.path()).await;
                let _ = concord_store_postgres::drop_scratch_database(&base, &url).await;
            }
        }
    };
}

on_both_backends!(sagas_survive_repeated_sigkill);

/// Sagas asleep on a durable timer when their only node is SIGKILLed, and still asleep when it
/// comes back: the restarted node wakes each at its time, never before, and each goes on once.
async fn timers_outlive_a_sigkill_of_every_node(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    let server = Server::start(node(dir, database_url)).await;
    let http = reqwest::Client::new();
    let mut def = p.definition(&["reserve", "cool-off", "ship"], 2000);
    def["steps"][1] = json!({"name": "cool-off", "sleep_ms": 1500});
    let r = put(&http, &server.url, "/v1/saga-definitions/order", &def)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..20).map(|i| format!("sleep-{i:02}")).collect();
    start_all(&http, &server.url, "order", &ids, |_| json!({})).await;
    // Every saga reaches its timer, then the node dies with all of them asleep.
    let saga = |id: &str| format!("/v1/sagas/{id}");
    until_each(&http, &server.url, &ids, saga, |s| {
        s["steps"][0]["action"] == "succeeded"
    })
    .await;
    let mut server = server;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    assert!(
        ids.iter().all(|id| p.effect(id, "ship").is_none()),
        "nothing shipped before the kill"
    );
    let server = Server::start(node(dir, database_url)).await;
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        let id = saga["id"].as_str().unwrap();
        assert_eq!(saga["status"], "completed", "{saga}");
        assert_eq!(p.attempts(id, "ship", "action"), 1, "{id} shipped once");
        let log = get(&http, &server.url, &format!("/v1/streams/saga-{id}"))
            .await
            .unwrap();
        let events = log["events"].as_array().unwrap();
        let find = |t: &str| {
            events
                .iter()
                .find(|e| e["type"] == t)
                .unwrap_or_else(|| panic!("{t} in {log}"))
        };
        let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
        let until = time(&find("TimerStarted")["data"]["until"]);
        assert!(
            time(&find("TimerFired")["data"]["at"]) >= until,
            "{id} woke early: {log}"
        );
        assert!(time(&saga["steps"][2]["attempts"][0]["started_at"]) >= until);
        assert_eq!(events.iter().filter(|e| e["type"] == "TimerStarted").count(), 1);
    }
}

on_both_backends!(timers_outlive_a_sigkill_of_every_node);

/// Sagas waiting for a signal when their only node is SIGKILLed: after a restart, a signal sent
/// to the new process reaches each waiting saga, which goes on once with the signal's body; the
/// sagas nobody signals time out and compensate. The wait itself is recorded once.
async fn waits_outlive_a_sigkill_of_every_node(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    let server = Server::start(node(dir, database_url)).await;
    let http = reqwest::Client::new();
    let mut def = p.definition(&["reserve", "confirmed", "ship"], 2000);
    def["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "paid", "timeout_ms": 8000}});
    def["steps"][2]["action"]["body"]["ref"] = json!("{{steps.confirmed.output.ref}}");
    let r = put(&http, &server.url, "/v1/saga-definitions/order", &def)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..20).map(|i| format!("wait-{i:02}")).collect();
    start_all(&http, &server.url, "order", &ids, |_| json!({})).await;
    let saga = |id: &str| format!("/v1/sagas/{id}");
    until_each(&http, &server.url, &ids, saga, |s| {
        s["steps"][1]["waiting_for"] == "paid"
    })
    .await;
    let mut server = server;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let server = Server::start(node(dir, database_url)).await;
    // Half are signalled through the new process.
    for id in ids.iter().step_by(2) {
        let r = post(
            &http,
            &server.url,
            &format!("/v1/sagas/{id}/signals/paid"),
            &json!({"ref": format!("ref-{id}")}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 202, "{id}");
    }
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        let id = saga["id"].as_str().unwrap();
        let i = ids.iter().position(|x| x == id).unwrap();
        let log = get(&http, &server.url, &format!("/v1/streams/saga-{id}"))
            .await
            .unwrap();
        let events = log["events"].as_array().unwrap();
        let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
        assert_eq!(count("WaitStarted"), 1, "{log}");
        if i % 2 == 0 {
            assert_eq!(saga["status"], "completed", "{saga}");
            assert_eq!(saga["steps"][1]["output"], json!({"ref": format!("ref-{id}")}));
            assert_eq!(p.attempts(id, "ship", "action"), 1, "{id} shipped once");
            assert_eq!(count("SignalReceived"), 1, "{log}");
        } else {
            assert_eq!(saga["status"], "compensated", "{saga}");
            assert_eq!(count("WaitTimedOut"), 1, "{log}");
            assert_eq!(p.effect(id, "ship"), None);
            assert_eq!(saga["steps"][0]["compensation"], "succeeded", "{saga}");
        }
    }
}

on_both_backends!(waits_outlive_a_sigkill_of_every_node);

/// Sagas whose action a participant accepted (202) when their only node is SIGKILLed: the
/// completions posted to the URLs the dead process handed out are taken by the restarted one
/// (the token's key outlives the process), and each saga goes on once.
async fn completions_outlive_a_sigkill_of_every_node(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    // The first node hands out URLs of public_url, where the restarted node will listen.
    let public = free_addr();
    let mut first = node(dir, database_url);
    first.env("CONCORD_PUBLIC_URL", format!("http://{public}"));
    let mut server = Server::start(first).await;
    let http = reqwest::Client::new();
    let mut def = p.definition(&["reserve", "charge", "ship"], 2000);
    def["steps"][1]["callback_timeout_ms"] = json!(30_000);
    let r = put(&http, &server.url, "/v1/saga-definitions/order", &def)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..10).map(|i| format!("cb-{i:02}")).collect();
    start_all(&http, &server.url, "order", &ids, |_| json!({"charge": "asyncsilent"})).await;
    // Every saga waits for its completion, then the node dies.
    let log = |id: &str| format!("/v1/streams/saga-{id}");
    let accepted = |l: &Value| {
        l["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "ActionAccepted")
    };
    until_each(&http, &server.url, &ids, log, accepted).await;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let server = Server::start(node_at(dir, database_url, &public)).await;
    for id in &ids {
        let url = p.ledger.lock().unwrap().callback_urls[&(id.clone(), "charge".to_owned())].clone();
        let r = http
            .post(&url)
            .json(&json!({"outcome": "succeeded", "output": {"id": format!("charge-{id}")}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{id}: {}", r.text().await.unwrap());
    }
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        let id = saga["id"].as_str().unwrap();
        assert_eq!(saga["status"], "completed", "{saga}");
        assert_eq!(saga["steps"][1]["output"], json!({"id": format!("charge-{id}")}));
        assert_eq!(p.attempts(id, "charge", "action"), 1, "{id} charged once");
        assert_eq!(p.attempts(id, "ship", "action"), 1, "{id} shipped once");
    }
}

on_both_backends!(completions_outlive_a_sigkill_of_every_node);

/// Sagas in the middle of a parallel group's round when their only node is SIGKILLed: the
/// restarted node runs the round again (the participants' barrier absorbs the repeats) and each
/// saga ends consistent: completed with every branch standing once, or compensated with none.
async fn parallel_groups_survive_a_sigkill_mid_round(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    let server = Server::start(node(dir, database_url)).await;
    let http = reqwest::Client::new();
    let base = p.definition(&["reserve", "east", "west", "ship"], 2000);
    let def = json!({"steps": [
        base["steps"][0],
        {"name": "both", "parallel": [base["steps"][1], base["steps"][2]]},
        base["steps"][3]
    ], "compensation_retry": base["compensation_retry"]});
    let r = put(&http, &server.url, "/v1/saga-definitions/split", &def)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..12).map(|i| format!("par-{i:02}")).collect();
    // Every round is slow, so the kill lands while calls are in flight; a third refuse.
    start_all(&http, &server.url, "split", &ids, |i| {
        if i % 3 == 0 {
            json!({"east": "slow:400", "west": "refuse"})
        } else {
            json!({"east": "slow:400", "west": "slow:400"})
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut server = server;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let server = Server::start(node(dir, database_url)).await;
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(60)).await;
    check_all(&p, &sagas);
    assert!(
        ids.iter().any(|id| p.attempts(id, "east", "action") > 1),
        "the kill landed mid-round: some branch was called again"
    );
    for (i, saga) in sagas.iter().enumerate() {
        let id = saga["id"].as_str().unwrap();
        let expected = if ids.iter().position(|x| x == id).unwrap() % 3 == 0 {
            "compensated"
        } else {
            "completed"
        };
        assert_eq!(saga["status"], expected, "{i}: {saga}");
    }
}

on_both_backends!(parallel_groups_survive_a_sigkill_mid_round);

/// Operations asked while the node is in the middle of the sagas' calls, then a SIGKILL: after a
/// restart the cancelled sagas compensate what ran and end `cancelled`, the paused ones park
/// without starting anything more, and a resume finishes them.
async fn operations_outlive_a_sigkill_mid_call(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    let server = Server::start(node(dir, database_url)).await;
    let http = reqwest::Client::new();
    let def = p.definition(&["reserve", "charge", "ship"], 2000);
    let r = put(&http, &server.url, "/v1/saga-definitions/ops", &def).await.unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..10).map(|i| format!("op-{i:02}")).collect();
    start_all(&http, &server.url, "ops", &ids, |_| json!({"charge": "slow:600"})).await;
    // Every charge is in flight: the operations are kept, not yet recorded.
    until_each(
        &http,
        &server.url,
        &ids,
        |id| format!("/v1/sagas/{id}"),
        |s| s["steps"][0]["action"] == "succeeded",
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let op = if i % 2 == 0 { "cancel" } else { "pause" };
        let r = post(&http, &server.url, &format!("/v1/sagas/{id}/{op}"), &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{op} {id}");
    }
    let mut server = server;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let server = Server::start(node(dir, database_url)).await;
    let (cancelled, paused): (Vec<_>, Vec<_>) = ids.iter().cloned().enumerate().partition(|(i, _)| i % 2 == 0);
    let cancelled: Vec<String> = cancelled.into_iter().map(|(_, id)| id).collect();
    let paused: Vec<String> = paused.into_iter().map(|(_, id)| id).collect();
    for saga in settle(&http, &server.url, &cancelled, Duration::from_secs(60)).await {
        assert_eq!(saga["status"], "cancelled", "{saga}");
        if let Some(problem) = check_saga(&p, &saga) {
            panic!("{problem}\n{saga:#}");
        }
        let id = saga["id"].as_str().unwrap();
        assert_eq!(p.attempts(id, "ship", "action"), 0, "{saga}");
    }
    until_each(
        &http,
        &server.url,
        &paused,
        |id| format!("/v1/sagas/{id}"),
        |s| s["paused"] == true,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &paused {
        assert_eq!(p.attempts(id, "ship", "action"), 0, "{id} started nothing while paused");
        let r = post(&http, &server.url, &format!("/v1/sagas/{id}/resume"), &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "resume {id}");
    }
    for saga in settle(&http, &server.url, &paused, Duration::from_secs(60)).await {
        assert_eq!(saga["status"], "completed", "{saga}");
        if let Some(problem) = check_saga(&p, &saga) {
            panic!("{problem}\n{saga:#}");
        }
    }
}
on_both_backends!(operations_outlive_a_sigkill_mid_call);

/// A batch cancelling 60 parked sagas, five a page, and a SIGKILL of its node while it runs:
/// the restarted node takes the batch over from its last recorded page and finishes it; every
/// saga ends cancelled, once.
async fn a_batch_outlives_a_sigkill_of_its_node(database_url: &str, dir: &Path) {
    let p = Participant::start(Duration::from_millis(10)).await;
    let with_batches = |mut cmd: Command| {
        cmd.env("CONCORD_SAGA_BATCH_PAGE", "5")
            .env("CONCORD_SAGA_BATCH_RESUME_MS", "200")
            .env("CONCORD_SAGA_BATCH_PER_S", "20");
        cmd
    };
    let server = Server::start(with_batches(node(dir, database_url))).await;
    let http = reqwest::Client::new();
    let mut def = p.definition(&["reserve", "confirmed"], 2000);
    def["steps"][1] = json!({"name": "confirmed", "wait": {"signal": "go", "timeout_ms": 600_000}});
    let r = put(&http, &server.url, "/v1/saga-definitions/parked", &def)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ids: Vec<String> = (0..60).map(|i| format!("bk-{i:02}")).collect();
    start_all(&http, &server.url, "parked", &ids, |_| json!({})).await;
    until_each(
        &http,
        &server.url,
        &ids,
        |id| format!("/v1/sagas/{id}"),
        |s| s["steps"][1]["waiting_for"] == "go",
    )
    .await;
    let r = post(
        &http,
        &server.url,
        "/v1/saga-batches",
        &json!({"filter": {"definition": "parked"}, "action": "cancel"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let batch: Value = r.json().await.unwrap();
    let path = format!("/v1/saga-batches/{}", batch["id"].as_str().unwrap());
    // Killed once it recorded its first page, before it could finish.
    until_each(
        &http,
        &server.url,
        &[String::new()],
        |_| path.clone(),
        |b| b["matched"].as_u64().is_some_and(|n| n >= 5),
    )
    .await;
    let before = get(&http, &server.url, &path).await.unwrap();
    assert_eq!(before["status"], "running", "killed mid-batch: {before}");
    let mut server = server;
    server.proc.signal("KILL");
    assert_eq!(server.proc.wait().await.signal(), Some(9));
    drop(server);
    let server = Server::start(with_batches(node(dir, database_url))).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let b = get(&http, &server.url, &path).await.unwrap();
        if b["status"] == "finished" {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "the batch never finished: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["matched"].as_u64(), Some(60), "{done}");
    let sagas = settle(&http, &server.url, &ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        assert_eq!(saga["status"], "cancelled", "{saga}");
        if let Some(problem) = check_saga(&p, saga) {
            panic!("{problem}\n{saga:#}");
        }
        let cancels = saga["steps"][0]["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["op"] == "compensation")
            .count();
        assert_eq!(cancels, 1, "compensated once: {saga}");
    }
}
on_both_backends!(a_batch_outlives_a_sigkill_of_its_node);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_postgres_share_sagas_and_never_run_one_at_once() {
    let Some(base) = postgres_base() else { return };
    let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = Participant::start(Duration::from_millis(10)).await;
    let a = Server::start(node(dir.path(), &url)).await;
    let b = Server::start(node(dir.path(), &url)).await;
    let http = reqwest::Client::new();
    let r = put(
        &http,
        &a.url,
        "/v1/saga-definitions/order",
        &p.definition(&["reserve", "charge", "ship"], 2000),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    // Every saga waits out a backoff, so its later steps are claimed from the database by
    // whichever node gets there first.
    let ids: Vec<String> = (0..120).map(|i| format!("pair-{i:03}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let target = if i % 2 == 0 { &a.url } else { &b.url };
        let plan = if i % 3 == 0 {
            json!({"charge": "refuse"})
        } else {
            json!({"charge": "flaky:1"})
        };
        let r = post(
            &http,
            target,
            "/v1/sagas",
            &json!({"definition": "order", "id": id, "input": {"plan": plan}}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
    }
    let sagas = settle(&http, &a.url, &ids, Duration::from_secs(60)).await;
    check_all(&p, &sagas);
    assert_eq!(
        p.ledger.lock().unwrap().overlaps,
        0,
        "no saga had two calls in flight at once"
    );
    // Both nodes recorded transitions: the work was shared.
    let mut nodes = std::collections::HashSet::new();
    for id in &ids {
        let log = get(&http, &a.url, &format!("/v1/streams/saga-{id}")).await.unwrap();
        for e in log["events"].as_array().unwrap() {
            nodes.insert(e["metadata"]["node"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(nodes.len(), 2, "both nodes worked: {nodes:?}");
    drop((a, b));
    let _ = concord_store_postgres::drop_scratch_database(&base, &url).await;
}
