//! The tokenization vault over HTTP: policy, audit, erasure, rotation, tokenized event fields and
//! every bad input, on SQLite and PostgreSQL vault stores.

use crate::both_backends;
use crate::helpers::{Backend, TestApp, assert_problem, spawn_app, spawn_app_with};
use reqwest::Method;
use serde_json::{Value, json};

const CARD: &str = "4242424242424242";

async fn tokenize(app: &TestApp, key: &str, items: Value) -> reqwest::Response {
    app.request(Method::POST, "/v1/vault/tokenize", Some(key))
        .json(&json!({ "items": items }))
        .send()
        .await
        .unwrap()
}

async fn tokens(app: &TestApp, items: Value) -> Vec<String> {
    let r = tokenize(app, &app.admin_key, items).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

async fn detokenize(app: &TestApp, key: &str, tokens: &[String], reveal: &str) -> reqwest::Response {
    app.request(Method::POST, "/v1/vault/detokenize", Some(key))
        .json(&json!({"tokens": tokens, "reveal": reveal}))
        .send()
        .await
        .unwrap()
}

async fn items(app: &TestApp, key: &str, tokens: &[String], reveal: &str) -> Vec<Value> {
    let r = detokenize(app, key, tokens, reveal).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["items"].as_array().unwrap().clone()
}

async fn audit(app: &TestApp) -> Vec<Value> {
    let auditor = app.create_key(&["events:read", "vault:audit"]).await;
    let r = app
        .request(Method::GET, "/v1/streams/$vault-audit?limit=1000", Some(&auditor))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["events"].as_array().unwrap().clone()
}

async fn first_data(app: &TestApp, stream: &str) -> Value {
    let r: Value = app
        .admin(Method::GET, &format!("/v1/streams/{stream}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["events"][0]["data"].clone()
}

async fn revealing_needs_the_scope_of_each_type_and_every_attempt_is_audited(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let t = tokens(
        &app,
        json!([
            {"type": "card", "value": "4242 4242 4242 4242", "format": "last4", "metadata": {"order": 7}},
            {"type": "ssn", "value": "123-45-6789"},
            {"type": "email", "value": "ada@example.com", "format": "uuid"},
        ]),
    )
    .await;
    assert_eq!(t.len(), 3);
    assert!(t[0].ends_with("4242") && t[0].len() == 16 && t[0] != CARD);
    assert!(uuid::Uuid::parse_str(&t[2]).is_ok());

    // admin alone reveals nothing: separation of duties.
    let r = detokenize(&app, &app.admin_key, &t[..1], "plain").await;
    let p = assert_problem(r, 403, "forbidden").await;
    assert!(!p.to_string().contains("4242"));
    // A card scope does not reveal an SSN: the whole answer is refused.
    let card_reader = app.create_key(&["vault:detokenize:card"]).await;
    let r = detokenize(&app, &card_reader, &t[..2], "plain").await;
    let p = assert_problem(r, 403, "forbidden").await;
    assert!(p["detail"].as_str().unwrap().contains("item 1 (ssn)"), "{p}");
    assert!(!p.to_string().contains(CARD));
    let got = items(&app, &card_reader, &t[..1], "plain").await;
    assert_eq!(got[0]["value"], CARD);
    assert_eq!(got[0]["type"], "card");
    assert_eq!(got[0]["metadata"], json!({"order": 7}));
    // The masked scope reveals only the mask, and never in plain.
    let masked = app.create_key(&["vault:detokenize-masked:card"]).await;
    let got = items(&app, &masked, &t[..1], "masked").await;
    assert_eq!(got[0]["value"], "************4242");
    let r = detokenize(&app, &masked, &t[..1], "plain").await;
    assert_problem(r, 403, "forbidden").await;
    let all = app
        .create_key(&[
            "vault:detokenize:card",
            "vault:detokenize:ssn",
            "vault:detokenize:email",
        ])
        .await;
    let got = items(&app, &all, &t, "plain").await;
    let values: Vec<&str> = got.iter().map(|i| i["value"].as_str().unwrap()).collect();
    assert_eq!(values, vec![CARD, "123456789", "ada@example.com"]);

    let everything = audit(&app).await;
    // Each key that can reveal was recorded as it was made, by the admin that made it.
    let grants: Vec<&Value> = everything.iter().filter(|e| e["type"] == "RevealGranted").collect();
    assert_eq!(grants.len(), 3, "{everything:?}");
    assert_eq!(grants[0]["data"]["scopes"], json!(["vault:detokenize:card"]));
    let trail: Vec<Value> = everything.into_iter().filter(|e| e["type"] == "Detokenized").collect();
    let outcomes: Vec<&str> = trail.iter().map(|e| e["data"]["outcome"].as_str().unwrap()).collect();
    // The admin key holds no detokenize scope at all: refused before anything is recorded.
    assert_eq!(outcomes, vec!["denied", "allowed", "allowed", "denied", "allowed"]);
    assert_eq!(trail[0]["data"]["items"][1]["result"], "denied");
    assert_eq!(trail[0]["data"]["items"][1]["type"], "ssn");
    assert_eq!(trail[4]["data"]["items"][0]["token"], t[0]);
    let text = serde_json::to_string(&trail).unwrap();
    for secret in [CARD, "123456789", "123-45-6789", "ada@example.com"] {
        assert!(!text.contains(secret), "the audit holds {secret}");
    }
    // The audit trail is read with vault:audit only, and written by nobody but the vault.
    let reader = app.create_key(&["events:read"]).await;
    let r = app
        .request(Method::GET, "/v1/streams/$vault-audit", Some(&reader))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .append("$vault-audit", json!({"events": [{"type": "Detokenized", "data": {}}]}))
        .await;
    assert_problem(r, 403, "forbidden").await;
}
both_backends!(revealing_needs_the_scope_of_each_type_and_every_attempt_is_audited);

async fn bad_input_gets_a_code_and_writes_nothing(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| s.vault_max_batch = 3).await else {
        return;
    };
    let key = &app.admin_key;
    let cases = [
        (json!([{"type": "card", "value": "4242424242424241"}]), "invalid_value"),
        (json!([{"type": "ssn", "value": "666-12-3456"}]), "invalid_value"),
        (json!([{"type": "email", "value": "ada@"}]), "invalid_value"),
        (json!([{"type": "phone", "value": "12"}]), "invalid_value"),
        (json!([{"type": "passport", "value": "x"}]), "invalid_value_type"),
        (
            json!([{"type": "email", "value": "ada@example.com", "format": "last4"}]),
            "invalid_token_format",
        ),
        (
            json!([{"type": "generic", "value": "x", "format": "rot13"}]),
            "invalid_parameter",
        ),
        (
            json!([{"type": "generic", "value": "x".repeat(4097)}]),
            "value_too_large",
        ),
        (
            json!([{"type": "generic", "value": "x", "ttl_s": 0}]),
            "invalid_vault_item",
        ),
        (
            json!([{"type": "generic", "value": "x", "metadata": [1]}]),
            "invalid_vault_item",
        ),
        (
            json!([{"type": "generic", "value": "x", "subject": "a/b"}]),
            "invalid_subject",
        ),
        (json!([]), "vault_batch_size"),
        (
            json!([{"type": "generic", "value": "a"}, {"type": "generic", "value": "b"},
                {"type": "generic", "value": "c"}, {"type": "generic", "value": "d"}]),
            "vault_batch_size",
        ),
        (
            json!([{"type": "generic", "value": "fine"}, {"type": "card", "value": "1234"}]),
            "invalid_value",
        ),
        (json!([{"type": "generic"}]), "malformed_json"),
    ];
    let r = tokenize(&app, key, json!([{"type": "card", "value": 4242424242424242_u64}])).await;
    let p = assert_problem(r, 400, "malformed_json").await;
    assert!(!p.to_string().contains("4242424242424242"), "{p}");
    for (items, code) in cases {
        let r = tokenize(&app, key, items.clone()).await;
        let p = assert_problem(r, 400, code).await;
        assert!(!p["detail"].as_str().unwrap().contains("4242424242424241"), "{p}");
    }
    let reader = app.create_key(&["vault:detokenize:generic"]).await;
    let r = detokenize(&app, &reader, &["not a token".into()], "plain").await;
    assert_problem(r, 400, "invalid_token").await;
    let r = detokenize(&app, &reader, &["tok_x".into()], "sideways").await;
    assert_problem(r, 400, "invalid_parameter").await;
    let r = detokenize(&app, &reader, &[], "plain").await;
    assert_problem(r, 400, "vault_batch_size").await;
    let got = items(&app, &reader, &["tok_unknown".into()], "plain").await;
    assert_eq!(got[0]["error"], "not_found");
    assert!(got[0].get("value").is_none());
    // Without vault:tokenize, nothing is tokenized.
    let r = tokenize(&app, &reader, json!([{"type": "generic", "value": "x"}])).await;
    assert_problem(r, 403, "forbidden").await;
}
both_backends!(bad_input_gets_a_code_and_writes_nothing);

async fn erasure_and_rotation_keep_their_promises(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let t = tokens(
        &app,
        json!([
            {"type": "email", "value": "ada@example.com", "subject": "customer-1"},
            {"type": "email", "value": "bob@example.com", "subject": "customer-2"},
            {"type": "email", "value": "carol@example.com"},
        ]),
    )
    .await;
    let rotate = || app.admin(Method::POST, "/v1/vault/keys/rotate").send();
    let r: Value = rotate().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"master_key_version": 2, "rewrapped": 3}));
    let reader = app.create_key(&["vault:detokenize:email"]).await;
    assert!(
        items(&app, &reader, &t, "plain")
            .await
            .iter()
            .all(|i| i["value"].is_string())
    );
    let erase = |s: &str| app.admin(Method::DELETE, &format!("/v1/vault/subjects/{s}")).send();
    let r: Value = erase("customer-1").await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"subject": "customer-1", "erased": true}));
    let r: Value = erase("customer-1").await.unwrap().json().await.unwrap();
    assert_eq!(r["erased"], false);
    let got = items(&app, &reader, &t, "plain").await;
    assert_eq!(got[0]["error"], "erased");
    assert!(got[0].get("value").is_none());
    assert_eq!(got[1]["value"], "bob@example.com");
    assert_eq!(got[2]["value"], "carol@example.com");
    let r: Value = rotate().await.unwrap().json().await.unwrap();
    assert_eq!(
        r,
        json!({"master_key_version": 3, "rewrapped": 2}),
        "the erased key is gone"
    );
    let reader_only = app.create_key(&["vault:detokenize:email"]).await;
    let r = app
        .request(Method::POST, "/v1/vault/keys/rotate", Some(&reader_only))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .request(Method::DELETE, "/v1/vault/subjects/customer-2", Some(&reader_only))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    let trail = audit(&app).await;
    assert!(
        !serde_json::to_string(&trail).unwrap().contains("customer-1"),
        "the trail names no subject"
    );
    let kinds: Vec<String> = trail.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert!(kinds.contains(&"SubjectErased".to_owned()) && kinds.contains(&"MasterKeyRotated".to_owned()));
}
both_backends!(erasure_and_rotation_keep_their_promises);

async fn tokenized_event_fields_forget_an_erased_subject_and_leave_the_events_readable(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let rules = json!({"fields": {"/email": "email", "/card/number": {"type": "card", "format": "last4"}}});
    let r = app
        .admin(Method::PUT, "/v1/vault/rules/customer")
        .json(&rules)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = app
        .admin(Method::GET, "/v1/vault/rules/customer")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["fields"]["/card/number"], json!({"type": "card", "format": "last4"}));
    let bad = app
        .admin(Method::PUT, "/v1/vault/rules/customer")
        .json(&json!({"fields": {"email": "email"}}))
        .send()
        .await
        .unwrap();
    assert_problem(bad, 400, "invalid_vault_rule").await;
    let fresh = || {
        json!({"events": [{"id": uuid::Uuid::now_v7(), "type": "Registered",
            "data": {"email": "ada@example.com", "card": {"number": CARD}, "plan": "pro"}}]})
    };
    let event = fresh();
    for (stream, body) in [("customer-42", event.clone()), ("customer-43", fresh())] {
        let r = app.append(stream, body).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Re-sending the same append stores the same tokens: the original answer, not a conflict.
    let again = app.append("customer-42", event.clone()).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["last_version"], 1);
    let stored = first_data(&app, "customer-42").await;
    assert_eq!(stored["plan"], "pro");
    let email = stored["email"].as_str().unwrap().to_owned();
    let card = stored["card"]["number"].as_str().unwrap().to_owned();
    assert!(email.starts_with("tok_"), "{stored}");
    assert!(card.ends_with("4242") && card != CARD);
    let other = first_data(&app, "customer-43").await;
    assert_ne!(other["email"], stored["email"], "each stream is its own subject");
    let bad = app
        .append(
            "customer-44",
            json!({"events": [{"type": "Registered", "data": {"email": "nope"}}]}),
        )
        .await;
    assert_problem(bad, 400, "invalid_value").await;
    let r = app.admin(Method::GET, "/v1/streams/customer-44").send().await.unwrap();
    assert_problem(r, 404, "stream_not_found").await;

    let reader = app
        .create_key(&["vault:detokenize:email", "vault:detokenize:card"])
        .await;
    let got = items(&app, &reader, &[email.clone(), card.clone()], "plain").await;
    assert_eq!(got[0]["value"], "ada@example.com");
    assert_eq!(got[1]["value"], CARD);
    let r = app
        .admin(Method::DELETE, "/v1/vault/subjects/customer-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        first_data(&app, "customer-42").await,
        stored,
        "the event is still there, unchanged"
    );
    let got = items(&app, &reader, &[email, card], "plain").await;
    assert!(got.iter().all(|i| i["error"] == "erased"), "{got:?}");
    let other_email = other["email"].as_str().unwrap().to_owned();
    assert_eq!(
        items(&app, &reader, &[other_email], "plain").await[0]["value"],
        "ada@example.com"
    );
}
both_backends!(tokenized_event_fields_forget_an_erased_subject_and_leave_the_events_readable);

async fn fifty_concurrent_convergent_tokenizations_return_one_token(b: Backend) {
    let Some(app) = spawn_app(b).await else { return };
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                tokens(
                    &app,
                    json!([{"type": "card", "value": CARD, "convergent": true, "subject": "c-1"}]),
                )
                .await
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap().remove(0));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    let plain = tokens(&app, json!([{"type": "card", "value": CARD, "subject": "c-1"}])).await;
    assert!(!seen.contains(&plain[0]), "a non-convergent token is fresh");
}
both_backends!(fifty_concurrent_convergent_tokenizations_return_one_token);

async fn detokenize_is_rate_limited_per_key_and_never_replayed(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| {
        s.vault_detokenize_per_s = 1.0;
        s.vault_detokenize_burst = 3.0;
    })
    .await
    else {
        return;
    };
    let t = tokens(&app, json!([{"type": "generic", "value": "the secret"}])).await;
    let reader = app.create_key(&["vault:detokenize:generic"]).await;
    let send = || {
        app.request(Method::POST, "/v1/vault/detokenize", Some(&reader))
            .header("Idempotency-Key", "same")
            .json(&json!({"tokens": t}))
            .send()
    };
    for _ in 0..3 {
        let r = send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("idempotent-replayed").is_none(),
            "a reveal is never stored"
        );
    }
    let r = send().await.unwrap();
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    assert_problem(r, 429, "rate_limited").await;
    let other = app.create_key(&["vault:detokenize:generic"]).await;
    assert_eq!(items(&app, &other, &t, "plain").await[0]["value"], "the secret");
    let outcomes: Vec<String> = audit(&app)
        .await
        .iter()
        .filter(|e| e["type"] == "Detokenized")
        .map(|e| e["data"]["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        outcomes,
        vec!["allowed", "allowed", "allowed", "rate_limited", "allowed"]
    );
}
both_backends!(detokenize_is_rate_limited_per_key_and_never_replayed);

/// The card numbers of `cards` that appear in `bytes`, as digits or written in groups of four
/// with `-` or spaces.
fn cards_in(bytes: &[u8], cards: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut found = Vec::new();
    for card in cards {
        let groups: Vec<String> = card
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        for form in [card.to_string(), groups.join("-"), groups.join(" ")] {
            if text.contains(&form) {
                found.push(form);
            }
        }
    }
    found
}

/// A key without any detokenize scope cannot fill the audit trail, a key with some scope leaves a
/// bounded number of records of its refused calls, and a card number sent as a token is refused
/// without being recorded: afterwards none of the card numbers is in any of the SQLite files.
async fn refused_detokenize_calls_leave_a_bounded_trail_and_no_card_number(b: Backend) {
    let Some(app) = spawn_app_with(b, |s| s.vault_refused_audit_per_min = 20.0).await else {
        return;
    };
    let card = tokens(&app, json!([{"type": "card", "value": CARD}])).await;
    let reader = app.create_key(&["events:read"]).await;
    let ssn_only = app.create_key(&["vault:detokenize:ssn"]).await;
    let card_reader = app.create_key(&["vault:detokenize:card"]).await;
    let before = audit(&app).await.len();
    let started = std::time::Instant::now();
    let calls = (0..5000).map(|i| {
        let key = if i % 2 == 0 { reader.clone() } else { ssn_only.clone() };
        let card = card.clone();
        let app = &app;
        async move { detokenize(app, &key, &card, "plain").await.status() }
    });
    use futures::StreamExt as _;
    let statuses: Vec<_> = futures::stream::iter(calls).buffer_unordered(32).collect().await;
    assert!(statuses.iter().all(|s| *s == 403), "every call refused: {statuses:?}");
    // The events:read key left none; the other at most its minute's budget (20) and what refilled
    // (one every 3 s) while the calls ran.
    let refilled = (started.elapsed().as_secs() / 3) as usize + 1;
    let after = audit(&app).await.len();
    assert!(
        after - before <= 20 + refilled,
        "5,000 refused calls left {} records in {:?}",
        after - before,
        started.elapsed()
    );
    for not_a_token in ["4111111111111111", "4111-1111-1111-1111", "tok_5500005555555559"] {
        let r = detokenize(&app, &card_reader, &[not_a_token.to_owned()], "plain").await;
        let problem = assert_problem(r, 400, "card_number_as_token").await;
        assert!(!problem.to_string().contains(&not_a_token[4..12]), "{problem}");
    }
    assert_eq!(audit(&app).await.len(), after, "nothing recorded of them");
    // Every card number this test sent, and the one it tokenized, as they could be written.
    let cards = [CARD, "4111111111111111", "5500005555555559"];
    let trail = serde_json::to_string(&audit(&app).await).unwrap();
    assert!(cards_in(trail.as_bytes(), &cards).is_empty(), "{trail}");

    if let Some(path) = app.database_url.strip_prefix("sqlite://") {
        let dir = std::path::Path::new(path).parent().unwrap();
        let mut scanned = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let file = entry.unwrap().path();
            let found = cards_in(&std::fs::read(&file).unwrap(), &cards);
            assert!(found.is_empty(), "{}: {found:?}", file.display());
            scanned += 1;
        }
        assert!(scanned >= 2, "the database files were scanned");
    }
}
both_backends!(refused_detokenize_calls_leave_a_bounded_trail_and_no_card_number);
