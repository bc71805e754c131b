//! A scripted saga participant for tests: a real HTTP server on port 0.
//!
//! Each saga's input carries a plan, `{"plan": {"<step>": "<behaviour>", "<step>_undo": "..."}}`,
//! sent in the call body. Action behaviours: `ok` (default), `refuse` (409), `flaky:N` (503 for the
//! first N attempts), `hang:N` (the first N attempts sleep past the step timeout, then take
//! effect), `dup:N` (the first N attempts take effect, then answer 500, so the call comes again),
//! `slow:MS` (takes MS ms, then takes effect),
//! `hangrefuse` (the first attempt sleeps past the timeout, then takes effect; later ones are
//! refused), `nul` (takes effect and answers an output holding U+0000). Asynchronous ones answer
//! 202 and finish through the call's `Concord-Callback` URL: `async` (takes effect, then posts
//! `succeeded` with its output), `asyncrefuse` (posts `refused`), `asyncsilent` (takes effect and
//! never posts), `asyncfirst` (takes effect and posts before it answers 202), `asyncfail`
//! (posts `failed`), `postthen503` (takes effect, posts `succeeded`, then answers 503).
//! Compensation behaviours (`<step>_undo`): `ok`, `cfail:N` (503 for the first N attempts).
//!
//! Effects go through a barrier keyed by `Idempotency-Key`, as a real participant's would: a
//! duplicate is a no-op, a compensation with no action before it blocks that action for good.
#![allow(dead_code)]

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a step's effects came to on the participant side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The action took effect and stands.
    Done,
    /// The action took effect and was undone.
    Undone,
    /// The compensation came first: nothing took effect and the action is refused for good.
    Blocked,
}

#[derive(Default)]
pub struct Ledger {
    pub effects: HashMap<(String, String), Effect>,
    /// Every call, by (saga, step, op).
    pub attempts: HashMap<(String, String, String), u32>,
    /// Times an effect was applied, by (saga, step, op): never more than 1.
    pub applied: HashMap<(String, String, String), u32>,
    in_flight: HashMap<String, u32>,
    /// Calls that arrived for a saga while another call for it was still being answered.
    pub overlaps: u32,
    /// The saga-id header of each call agreed with its idempotency key.
    pub bad_headers: u32,
    pub traceparents: u32,
    /// The completion URL each asynchronous call carried, by (saga, step), and the status each
    /// post to one was answered with.
    pub callback_urls: HashMap<(String, String), String>,
    pub callback_answers: Vec<u16>,
}

#[derive(Clone)]
pub struct Participant {
    pub url: String,
    pub ledger: Arc<Mutex<Ledger>>,
    /// How long a `hang` attempt sleeps.
    pub hang: Duration,
}

impl Participant {
    pub async fn start(hang: Duration) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let state = (ledger.clone(), hang);
        let app = axum::Router::new()
            .route("/action/{step}", post(action))
            .route("/compensate/{step}", post(compensate))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, ledger, hang }
    }

    pub fn effect(&self, saga: &str, step: &str) -> Option<Effect> {
        self.ledger
            .lock()
            .unwrap()
            .effects
            .get(&(saga.to_owned(), step.to_owned()))
            .copied()
    }

    pub fn attempts(&self, saga: &str, step: &str, op: &str) -> u32 {
        self.ledger
            .lock()
            .unwrap()
            .attempts
            .get(&(saga.to_owned(), step.to_owned(), op.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// A definition whose steps all call this participant.
    pub fn definition(&self, steps: &[&str], timeout_ms: u64) -> Value {
        let steps: Vec<Value> = steps
            .iter()
            .map(|s| {
                json!({
                    "name": s,
                    "action": {"method": "POST", "url": format!("{}/action/{s}", self.url),
                               "body": {"plan": "{{input.plan}}"}},
                    "compensation": {"method": "POST", "url": format!("{}/compensate/{s}", self.url),
                                     "body": {"plan": "{{input.plan}}"}},
                    "retry": {"max_attempts": 3, "backoff_ms": 20, "max_backoff_ms": 100},
                    "timeout_ms": timeout_ms
                })
            })
            .collect();
        json!({"steps": steps, "compensation_retry": {"max_attempts": 5, "backoff_ms": 20, "max_backoff_ms": 100}})
    }
}

type St = (Arc<Mutex<Ledger>>, Duration);

struct Call {
    saga: String,
    step: String,
    op: String,
    attempt: u32,
    behaviour: String,
}

fn begin(ledger: &Mutex<Ledger>, headers: &HeaderMap, step: &str, op: &str, plan_key: &str, body: &Value) -> Call {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let saga = headers
        .get("concord-saga-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut l = ledger.lock().unwrap();
    if key != format!("{saga}:{step}:{op}") {
        l.bad_headers += 1;
    }
    if headers.get("traceparent").is_some() {
        l.traceparents += 1;
    }
    let n = l.in_flight.entry(saga.clone()).or_default();
    *n += 1;
    if *n > 1 {
        l.overlaps += 1;
    }
    let attempt = {
        let a = l
            .attempts
            .entry((saga.clone(), step.to_owned(), op.to_owned()))
            .or_default();
        *a += 1;
        *a
    };
    let behaviour = body["plan"][plan_key].as_str().unwrap_or("ok").to_owned();
    Call {
        saga,
        step: step.to_owned(),
        op: op.to_owned(),
        attempt,
        behaviour,
    }
}

fn end(ledger: &Mutex<Ledger>, call: &Call) {
    let mut l = ledger.lock().unwrap();
    if let Some(n) = l.in_flight.get_mut(&call.saga) {
        *n -= 1;
    }
}

fn first_n(behaviour: &str, prefix: &str, attempt: u32) -> bool {
    behaviour
        .strip_prefix(prefix)
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| attempt <= n)
}

/// Applies the action through the barrier: the answer a real participant would give.
fn apply_action(ledger: &Mutex<Ledger>, c: &Call) -> (StatusCode, Value) {
    let mut l = ledger.lock().unwrap();
    let k = (c.saga.clone(), c.step.clone());
    match l.effects.get(&k) {
        None => {
            l.effects.insert(k, Effect::Done);
            *l.applied
                .entry((c.saga.clone(), c.step.clone(), c.op.clone()))
                .or_default() += 1;
            (StatusCode::OK, json!({"id": format!("{}-{}", c.step, c.saga)}))
        }
        Some(Effect::Done) => (StatusCode::OK, json!({"id": format!("{}-{}", c.step, c.saga)})),
        Some(Effect::Undone | Effect::Blocked) => (StatusCode::CONFLICT, json!({"error": "compensated already"})),
    }
}

async fn action(
    State((ledger, hang)): State<St>,
    Path(step): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let c = begin(&ledger, &headers, &step, "action", &step, &body);
    if c.behaviour.starts_with("async") || c.behaviour == "postthen503" {
        return asynchronous(&ledger, &headers, c).await;
    }
    let answer = if c.behaviour == "refuse" {
        (StatusCode::CONFLICT, json!({"error": "refused by plan"}))
    } else if first_n(&c.behaviour, "flaky:", c.attempt) {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "flaky"}))
    } else if first_n(&c.behaviour, "hang:", c.attempt) {
        // The orchestrator gives up waiting; this request still lands later, like a slow network.
        end(&ledger, &c);
        tokio::time::sleep(hang).await;
        let (s, v) = apply_action(&ledger, &c);
        return (s, Json(v));
    } else if c.behaviour == "hangrefuse" && c.attempt > 1 {
        (StatusCode::CONFLICT, json!({"error": "refused after a hang"}))
    } else if c.behaviour == "hangrefuse" {
        end(&ledger, &c);
        tokio::time::sleep(hang).await;
        let (s, v) = apply_action(&ledger, &c);
        return (s, Json(v));
    } else if let Some(ms) = c.behaviour.strip_prefix("slow:").and_then(|n| n.parse::<u64>().ok()) {
        // Takes its time while in flight (overlapping calls of one saga are counted).
        tokio::time::sleep(Duration::from_millis(ms)).await;
        apply_action(&ledger, &c)
    } else if c.behaviour == "nul" {
        let _ = apply_action(&ledger, &c);
        (StatusCode::OK, json!({"id": "a\u{0}b"}))
    } else if first_n(&c.behaviour, "dup:", c.attempt) {
        let _ = apply_action(&ledger, &c);
        (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "lost the answer"}))
    } else {
        apply_action(&ledger, &c)
    };
    end(&ledger, &c);
    (answer.0, Json(answer.1))
}

/// Posts `completion` to the completion URL and keeps the answer's status.
async fn post_completion(ledger: &Mutex<Ledger>, url: &str, completion: Value) {
    let status = match reqwest::Client::new().post(url).json(&completion).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    };
    ledger.lock().unwrap().callback_answers.push(status);
}

/// An action that answers 202 and finishes later through its completion URL.
async fn asynchronous(ledger: &Arc<Mutex<Ledger>>, headers: &HeaderMap, c: Call) -> (StatusCode, Json<Value>) {
    let Some(url) = headers
        .get(concord_sdk::CALLBACK_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        end(ledger, &c);
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "no completion URL"})));
    };
    ledger
        .lock()
        .unwrap()
        .callback_urls
        .insert((c.saga.clone(), c.step.clone()), url.clone());
    end(ledger, &c);
    let completion = |ledger: &Mutex<Ledger>, c: &Call| match apply_action(ledger, c) {
        (StatusCode::OK, v) => json!({"outcome": "succeeded", "output": v}),
        (_, v) => json!({"outcome": "refused", "error": v.to_string()}),
    };
    match c.behaviour.as_str() {
        "asyncfirst" => {
            let done = completion(ledger, &c);
            post_completion(ledger, &url, done).await;
        }
        "asyncsilent" => {
            let _ = apply_action(ledger, &c);
        }
        "postthen503" => {
            let done = completion(ledger, &c);
            post_completion(ledger, &url, done).await;
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "lost the answer"})),
            );
        }
        "asyncfail" => {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                post_completion(&ledger, &url, json!({"outcome": "failed", "error": "provider down"})).await;
            });
        }
        "asyncrefuse" => {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                post_completion(&ledger, &url, json!({"outcome": "refused", "error": "card declined"})).await;
            });
        }
        _ => {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let done = completion(&ledger, &c);
                post_completion(&ledger, &url, done).await;
            });
        }
    }
    (StatusCode::ACCEPTED, Json(json!({"accepted": true})))
}

async fn compensate(
    State((ledger, _)): State<St>,
    Path(step): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let c = begin(&ledger, &headers, &step, "compensation", &format!("{step}_undo"), &body);
    let answer = if first_n(&c.behaviour, "cfail:", c.attempt) {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "undo failed"}))
    } else {
        let mut l = ledger.lock().unwrap();
        let k = (c.saga.clone(), c.step.clone());
        match l.effects.get(&k).copied() {
            Some(Effect::Done) => {
                l.effects.insert(k, Effect::Undone);
                *l.applied
                    .entry((c.saga.clone(), c.step.clone(), c.op.clone()))
                    .or_default() += 1;
            }
            None => {
                l.effects.insert(k, Effect::Blocked);
            }
            Some(Effect::Undone | Effect::Blocked) => {}
        }
        (StatusCode::OK, json!({}))
    };
    end(&ledger, &c);
    (answer.0, Json(answer.1))
}

/// Checks one finished saga against the participant's ledger: a completed saga's actions all
/// stand; a compensated saga left nothing standing. Returns a description of any mismatch.
pub fn check_saga(p: &Participant, saga: &Value) -> Option<String> {
    let id = saga["id"].as_str().unwrap_or("");
    let status = saga["status"].as_str().unwrap_or("");
    let steps = saga["steps"].as_array().cloned().unwrap_or_default();
    for s in &steps {
        let name = s["name"].as_str().unwrap_or("");
        let effect = p.effect(id, name);
        let ok = match status {
            "completed" => effect == Some(Effect::Done),
            "compensated" | "cancelled" => effect != Some(Effect::Done),
            other => return Some(format!("{id}: status {other} is not final")),
        };
        if !ok {
            return Some(format!(
                "{id}: {status} but step {name} is {effect:?} at the participant"
            ));
        }
    }
    let l = p.ledger.lock().unwrap();
    for ((saga, step, op), n) in &l.applied {
        if saga == id && *n > 1 {
            return Some(format!("{id}: {step} {op} took effect {n} times"));
        }
    }
    None
}
