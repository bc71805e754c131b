//! The vault as an operator runs it: the real binary, its files and its logs. A tokenized card
//! number, SSN and email never appear in plaintext in any database file, the event store or the
//! server's output; a wrong master key stops the server with a clear error; a tampered record
//! answers `corrupted`; the CLI tokenizes, reveals, rotates and erases.

use reqwest::Method;
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;

#[path = "support/proc.rs"]
mod proc;
use proc::*;

const CARD: &str = "4111111111111111";
const CARD_SPACED: &str = "4111 1111 1111 1111";
const SSN: &str = "078-05-1120";
const SSN_DIGITS: &str = "078051120";
const EMAIL: &str = "ada.lovelace@example.com";
const SECRETS: [&str; 5] = [CARD, CARD_SPACED, SSN, SSN_DIGITS, EMAIL];

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Every secret, in plain and hex-encoded (as a `bytea` column would print it), found in `text`.
fn leaks(text: &str) -> Vec<String> {
    SECRETS
        .iter()
        .flat_map(|s| [(*s).to_owned(), hex(s)])
        .filter(|s| text.contains(s.as_str()))
        .collect()
}

fn leaks_in_bytes(bytes: &[u8]) -> Vec<&'static str> {
    SECRETS
        .into_iter()
        .filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()))
        .collect()
}

async fn key(server: &Server, scopes: &[&str]) -> String {
    let r = server
        .request(Method::POST, "/v1/keys")
        .json(&json!({"name": "vault-test", "scopes": scopes}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_owned()
}

fn serve_on(dir: &Path, database_url: Option<&str>) -> std::process::Command {
    let mut cmd = match database_url {
        None => serve(dir),
        Some(url) => {
            let mut cmd = bare_serve(dir);
            cmd.args(["--database-url", url]).env("CONCORD_ADMIN_KEY", ADMIN_KEY);
            cmd
        }
    };
    // Everything the server logs at debug, so a value logged anywhere would show.
    cmd.env("RUST_LOG", "debug");
    cmd
}

/// Tokenizes with the CLI reading the value from standard input.
fn tokenize_from_stdin(dir: &Path, server: &Server, key: &str, kind: &str, value: &str) -> String {
    let mut cmd = cli_command(dir, server, key, &["vault", "tokenize", "--type", kind, "-"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs the whole scenario against a server on `database_url` (SQLite in `dir` when none);
/// returns what the server printed.
async fn scenario(dir: &Path, database_url: Option<&str>) -> (Vec<String>, Vec<String>) {
    let server = Server::start(serve_on(dir, database_url)).await;
    let tokenizer = key(&server, &["vault:tokenize"]).await;
    let revealer = key(
        &server,
        &[
            "vault:detokenize:card",
            "vault:detokenize:ssn",
            "vault:detokenize:email",
        ],
    )
    .await;

    let card = tokenize_from_stdin(dir, &server, &tokenizer, "card", CARD_SPACED);
    let ssn = cli(
        dir,
        &server,
        &tokenizer,
        &["vault", "tokenize", "--type", "ssn", SSN, "--subject", "p-1"],
    )
    .await;
    assert!(ssn.status.success(), "{:?}", ssn.stderr);
    let ssn = ssn.stdout[0].clone();
    let r = server
        .http
        .post(format!("{}/v1/vault/tokenize", server.url))
        .bearer_auth(&tokenizer)
        .header("Idempotency-Key", "email-1")
        .json(&json!({"items": [{"type": "email", "value": EMAIL, "convergent": true}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let email = r.json::<Value>().await.unwrap()["tokens"][0]
        .as_str()
        .unwrap()
        .to_owned();
    // A refused value is not echoed or logged either.
    let r = server
        .http
        .post(format!("{}/v1/vault/tokenize", server.url))
        .bearer_auth(&tokenizer)
        .json(&json!({"items": [{"type": "card", "value": "4111111111111112"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(!r.text().await.unwrap().contains("4111111111111112"));

    // Event fields named by the rules are stored as tokens.
    let r = server
        .request(Method::PUT, "/v1/vault/rules/customer")
        .json(&json!({"fields": {"/card": "card", "/ssn": "ssn", "/contact/email": "email"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server
        .append(
            "customer-7",
            json!({"events": [{"type": "Registered", "data": {"card": CARD, "ssn": SSN, "contact": {"email": EMAIL}}}]}),
        )
        .await;
    let stored = server.read_stream("customer-7").await;
    assert!(leaks(&stored[0].to_string()).is_empty(), "{}", stored[0]);

    // The CLI reveals; the HTTP answer of a reveal with an Idempotency-Key is not stored.
    let shown = cli(dir, &server, &revealer, &["vault", "detokenize", &card, &ssn, &email]).await;
    assert!(shown.status.success(), "{:?}", shown.stderr);
    assert_eq!(shown.stdout[0], format!("{card}\t{CARD}"));
    assert_eq!(shown.stdout[1], format!("{ssn}\t{SSN_DIGITS}"));
    assert_eq!(shown.stdout[2], format!("{email}\t{EMAIL}"));
    let r = server
        .http
        .post(format!("{}/v1/vault/detokenize", server.url))
        .bearer_auth(&revealer)
        .header("Idempotency-Key", "reveal-1")
        .json(&json!({"tokens": [card, ssn, email]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let masked = key(&server, &["vault:detokenize-masked:card"]).await;
    let shown = cli(dir, &server, &masked, &["vault", "detokenize", "--masked", &card]).await;
    assert_eq!(shown.stdout[0], format!("{card}\t************1111"));
    let denied = cli(dir, &server, &masked, &["vault", "detokenize", &card]).await;
    assert!(!denied.status.success());

    let rotated = cli(dir, &server, ADMIN_KEY, &["vault", "rotate-key"]).await;
    assert!(
        rotated.stdout[0].starts_with("master key version 2;"),
        "{:?}",
        rotated.stdout
    );
    let erased = cli(dir, &server, ADMIN_KEY, &["vault", "erase-subject", "p-1"]).await;
    assert!(erased.stdout[0].contains("erased"), "{:?}", erased.stdout);
    let shown = cli(dir, &server, &revealer, &["vault", "detokenize", &card, &ssn]).await;
    assert_eq!(shown.stdout[0], format!("{card}\t{CARD}"), "rotation kept it readable");
    assert_eq!(shown.stdout[1], format!("{ssn}\t(erased)"));
    let finished = server.terminate().await;
    (finished.stdout, finished.stderr)
}

#[test]
fn the_leak_checks_find_a_planted_secret() {
    assert_eq!(leaks(&format!("row: \\x{}", hex(EMAIL))), vec![hex(EMAIL)]);
    assert_eq!(leaks_in_bytes(format!("..{SSN}..").as_bytes()), vec![SSN]);
    assert!(leaks("4111-1111").is_empty());
}

fn assert_quiet(stdout: &[String], stderr: &[String]) {
    let output = format!("{}\n{}", stdout.join("\n"), stderr.join("\n"));
    assert!(output.contains("vault"), "the debug log ran");
    assert!(
        leaks(&output).is_empty(),
        "the server's output holds {:?}",
        leaks(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_value_is_stored_or_logged_in_plaintext_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = scenario(dir.path(), None).await;
    assert_quiet(&stdout, &stderr);
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
        assert!(
            leaks_in_bytes(&bytes).is_empty(),
            "{} holds {:?}",
            path.display(),
            leaks_in_bytes(&bytes)
        );
    }
    for expected in ["concord.db", "concord-vault.db", "concord-vault.key"] {
        assert!(seen.iter().any(|s| s == expected), "{expected} in {seen:?}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("concord-vault.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key file is for its owner only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_value_is_stored_or_logged_in_plaintext_on_postgres() {
    let Ok(base) = std::env::var("CONCORD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CONCORD_TEST_POSTGRES_URL is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = concord_store_postgres::create_scratch_database(&base, "concord_t")
        .await
        .unwrap();
    let (stdout, stderr) = scenario(dir.path(), Some(&url)).await;
    assert_quiet(&stdout, &stderr);
    // Every row of every table, as text (bytea shows as hex, which `leaks` checks too).
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(tables.iter().any(|t| t == "concord_vault_tokens"), "{tables:?}");
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let text = rows.join("\n");
        assert!(leaks(&text).is_empty(), "{table} holds {:?}", leaks(&text));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_stops_the_server_and_a_tampered_record_answers_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(serve(dir.path())).await;
    let revealer = key(&server, &["vault:detokenize:generic"]).await;
    let out = cli(
        dir.path(),
        &server,
        ADMIN_KEY,
        &["vault", "tokenize", "--type", "generic", "a secret"],
    )
    .await;
    let token = out.stdout[0].clone();
    let other = cli(
        dir.path(),
        &server,
        ADMIN_KEY,
        &["vault", "tokenize", "--type", "generic", "another"],
    )
    .await;
    let other = other.stdout[0].clone();
    server.terminate().await;

    let mut wrong = serve(dir.path());
    wrong.env(
        "CONCORD_VAULT_MASTER_KEY",
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    );
    let finished = Proc::spawn(wrong).finish().await;
    assert!(!finished.status.success());
    let said = finished.stderr.join("\n");
    assert!(said.contains("not the key the vault was created with"), "{said}");
    let mut malformed = serve(dir.path());
    malformed.env("CONCORD_VAULT_MASTER_KEY", "short");
    let finished = Proc::spawn(malformed).finish().await;
    assert!(!finished.status.success());
    assert!(finished.stderr.join("\n").contains("CONCORD_VAULT_MASTER_KEY"));

    // An attacker with the database flips one byte of a ciphertext.
    {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", dir.path().join("concord-vault.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let mut ciphertext: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM vault_tokens WHERE token = ?")
            .bind(&token)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        ciphertext[1] ^= 0x01;
        let done = sqlx::query("UPDATE vault_tokens SET ciphertext = ? WHERE token = ?")
            .bind(&ciphertext)
            .bind(&token)
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }
    let server = Server::start(serve(dir.path())).await;
    let shown = cli(dir.path(), &server, &revealer, &["vault", "detokenize", &token, &other]).await;
    assert!(shown.status.success(), "{:?}", shown.stderr);
    assert_eq!(shown.stdout[0], format!("{token}\t(corrupted)"));
    assert_eq!(
        shown.stdout[1],
        format!("{other}\tanother"),
        "the key file opened the vault again"
    );
    let finished = server.terminate().await;
    assert!(finished.stderr.join("\n").contains("failed authentication"));

    // The master key itself rotates: start once with the new key and the old one as previous,
    // then the new key alone opens the vault.
    let old_key = std::fs::read_to_string(dir.path().join("concord-vault.key")).unwrap();
    let new_key = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    let mut handover = serve(dir.path());
    handover.env("CONCORD_VAULT_MASTER_KEY", new_key).env(
        "CONCORD_VAULT_PREVIOUS_MASTER_KEYS",
        format!("[\"{}\"]", old_key.trim()),
    );
    Server::start(handover).await.terminate().await;
    let mut renewed = serve(dir.path());
    renewed.env("CONCORD_VAULT_MASTER_KEY", new_key);
    let server = Server::start(renewed).await;
    let shown = cli(dir.path(), &server, &revealer, &["vault", "detokenize", &other]).await;
    assert_eq!(shown.stdout[0], format!("{other}\tanother"), "{:?}", shown.stderr);
    server.terminate().await;
    let finished = Proc::spawn(serve(dir.path())).finish().await;
    assert!(!finished.status.success(), "the old key file no longer opens the vault");
}
