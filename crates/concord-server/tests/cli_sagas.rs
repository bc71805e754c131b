//! `concord saga ...` run as the real binary against a server in this process and a participant
//! that accepts `POST /a` and refuses `POST /refuse`: define, start and wait, show, list, a refused
//! saga compensated, and the problems a command reports.

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use concord_server::config::Settings;
use concord_server::startup::Application;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest one command may take; `--wait` asks for less.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A server on port 0 over a fresh SQLite database, a participant, and a directory for files.
struct Setup {
    url: String,
    admin_key: String,
    participant: String,
    dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

/// What a command did.
struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Setup {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let admin_key = format!("test-admin-{}", uuid::Uuid::now_v7());
        let settings = Settings {
            listen: "127.0.0.1:0".into(),
            // The participants are on loopback, which the outbound policy refuses unless named.
            saga_allowed_hosts: vec!["127.0.0.1".into()],
            tx_allowed_hosts: vec!["127.0.0.1".into()],
            database_url: format!("sqlite://{}", dir.path().join("concord.db").display()),
            admin_key: Some(admin_key.clone().into()),
            db_connections: 4,
            ..Settings::default()
        };
        let app = Application::build(settings).await.expect("build app");
        let url = format!("http://{}", app.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            url,
            admin_key,
            participant: participant().await,
            dir,
            _stop: stop,
        }
    }

    /// Writes `body` to `file` in the test's directory.
    fn file(&self, file: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, body).unwrap();
        path
    }

    /// `concord saga ARGS --url URL --key KEY`.
    async fn saga(&self, args: &[&str]) -> Ran {
        let mut cmd = concord();
        cmd.arg("saga")
            .args(args)
            .args(["--url", &self.url, "--key", &self.admin_key]);
        run(cmd, args).await
    }

    /// `concord saga ARGS` with the server and key in `CONCORD_URL` and `CONCORD_KEY`.
    async fn saga_from_env(&self, args: &[&str]) -> Ran {
        let mut cmd = concord();
        cmd.arg("saga")
            .args(args)
            .env("CONCORD_URL", &self.url)
            .env("CONCORD_KEY", &self.admin_key);
        run(cmd, args).await
    }

    /// Like [`Setup::saga`], asserting that the command succeeded; answers its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let ran = self.saga(args).await;
        assert!(ran.success, "saga {args:?} failed: {}{}", ran.stdout, ran.stderr);
        ran.stdout
    }

    /// Like [`Setup::saga`], asserting that the command failed and said `code`.
    async fn fails_with(&self, args: &[&str], code: &str) {
        let ran = self.saga(args).await;
        assert!(!ran.success, "saga {args:?} succeeded: {}", ran.stdout);
        assert!(
            ran.stderr.contains(code),
            "saga {args:?} said no {code}: {}",
            ran.stderr
        );
    }
}

/// The binary with none of the test runner's Concord settings.
fn concord() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_concord"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONCORD_") {
            cmd.env_remove(name);
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn run(mut cmd: tokio::process::Command, args: &[&str]) -> Ran {
    let output = tokio::time::timeout(TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("saga {args:?} did not finish within {TIMEOUT:?}"))
        .unwrap();
    Ran {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A participant on port 0: `POST /a` answers 200 `{"id": "r1"}`, `POST /refuse` 409.
async fn participant() -> String {
    let app = axum::Router::new()
        .route("/a", post(|| async { Json(json!({"id": "r1"})) }))
        .route(
            "/refuse",
            post(|| async { (StatusCode::CONFLICT, Json(json!({"error": "no stock"}))) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A definition named `name` whose second step calls `last` on the participant.
fn definition(name: &str, participant: &str, last: &str) -> String {
    let call = |path: &str| json!({"method": "POST", "url": format!("{participant}{path}")});
    let mut charge = call(last);
    charge["body"] = json!({"reservation": "{{steps.reserve.output.id}}"});
    json!({
        "name": name,
        "steps": [
            {"name": "reserve", "action": call("/a"), "compensation": call("/a")},
            {"name": "charge", "action": charge},
        ]
    })
    .to_string()
}

fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_defined_started_shown_listed_and_refused_retries_report_the_code() {
    let app = Setup::start().await;

    // Given a definition file that names itself,
    let order = app.file("order-file.json", &definition("order", &app.participant, "/a"));
    let order = order.to_str().unwrap();
    assert_eq!(app.ok(&["define", order]).await, "defined order version 1\n");
    assert_eq!(
        app.ok(&["define", order]).await,
        "defined order version 1 (unchanged)\n"
    );

    // when a saga starts and the command waits, it prints the finished timeline,
    let started = app
        .ok(&[
            "start",
            "order",
            "--id",
            "order:1",
            "--input",
            r#"{"sku":"a"}"#,
            "--wait",
            "20",
        ])
        .await;
    assert!(
        started.starts_with("order:1  order@1  completed  created "),
        "{started}"
    );
    assert!(
        line_with(&started, "reserve  action #1").contains("succeeded"),
        "{started}"
    );

    // and show gives each step's status and output, then the attempts in time order.
    let shown = app.ok(&["show", "order:1"]).await;
    assert!(shown.starts_with("order:1  order@1  completed"), "{shown}");
    assert!(shown.contains(r#"  input {"sku":"a"}"#), "{shown}");
    // (`reserve` shows the status the API gives an undo that a completed saga never ran.)
    assert!(shown.contains("  reserve  action succeeded  compensation "), "{shown}");
    assert!(
        shown.contains("  charge   action succeeded  compensation not_needed"),
        "{shown}"
    );
    assert!(shown.contains(r#"      output {"id":"r1"}"#), "{shown}");
    let attempts = shown.split_once("attempts:\n").unwrap().1;
    let order_of_steps: Vec<&str> = attempts.lines().map(|l| l.split_whitespace().nth(2).unwrap()).collect();
    assert_eq!(order_of_steps, ["reserve", "charge"], "{shown}");
    assert!(
        attempts
            .lines()
            .all(|l| l.contains("action #1") && l.ends_with("succeeded")),
        "{shown}"
    );
    let raw: Value = serde_json::from_str(&app.ok(&["show", "order:1", "--json"]).await).unwrap();
    assert_eq!(raw["status"], "completed");
    assert_eq!(raw["steps"][1]["attempts"][0]["outcome"], "succeeded");

    // Starting the same id again answers the saga that exists.
    let again = app.ok(&["start", "order", "--id", "order:1"]).await;
    assert_eq!(again, "order:1  completed (existing)\n");

    // A refused step compensates the steps before it.
    let refusing = app.file("refusing.json", &definition("refusing", &app.participant, "/refuse"));
    app.ok(&["define", refusing.to_str().unwrap(), "--name", "refusing"])
        .await;
    let refused = app
        .ok(&["start", "refusing", "--id", "refused:1", "--wait", "20"])
        .await;
    assert!(refused.starts_with("refused:1  refusing@1  compensated"), "{refused}");
    let shown = app.ok(&["show", "refused:1"]).await;
    assert!(
        shown.contains("  reserve  action succeeded  compensation succeeded"),
        "{shown}"
    );
    assert!(
        shown.contains("  charge   action refused    compensation not_needed"),
        "{shown}"
    );
    assert!(line_with(&shown, "charge   action #1").contains("refused"), "{shown}");
    assert!(
        line_with(&shown, "reserve  compensation #1").contains("succeeded"),
        "{shown}"
    );
    let calls: Vec<&str> = shown.split_once("attempts:\n").unwrap().1.lines().collect();
    assert!(
        calls[2].contains("reserve  compensation #1"),
        "the undo comes last: {shown}"
    );

    // Lists show one line a saga, and where the next page starts.
    let listed = app.saga_from_env(&["list"]).await;
    assert!(listed.success, "{}", listed.stderr);
    assert_eq!(listed.stdout.lines().count(), 2, "{}", listed.stdout);
    assert!(
        line_with(&listed.stdout, "order:1").contains("completed    order@1  20"),
        "{}",
        listed.stdout
    );
    let first = app.ok(&["list", "--limit", "1"]).await;
    let next = line_with(&first, "next: ").trim_start_matches("next: ");
    let rest = app.ok(&["list", "--after", next]).await;
    assert_eq!(first.lines().count() + rest.lines().count(), 3, "{first}{rest}");
    assert!(!rest.contains(next), "{rest}");
    let compensated = app.ok(&["list", "--status", "compensated"]).await;
    assert!(
        compensated.starts_with("refused:1  compensated  refusing@1  "),
        "{compensated}"
    );
    assert_eq!(compensated.lines().count(), 1, "{compensated}");

    // Only a failed saga can be retried.
    app.fails_with(&["retry", "order:1"], "saga_not_failed").await;
    app.fails_with(&["show", "nope"], "saga_not_found").await;
    app.fails_with(&["list", "--status", "done"], "invalid_parameter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defining_an_invalid_file_prints_the_problem_code_and_fails() {
    let app = Setup::start().await;
    let mut bad: Value = serde_json::from_str(&definition("bad", &app.participant, "/a")).unwrap();
    bad["steps"][0]["action"]["url"] = json!("file:///etc/passwd");
    let file = app.file("bad.json", &bad.to_string());
    app.fails_with(&["define", file.to_str().unwrap()], "invalid_step_url")
        .await;

    let not_json = app.file("broken.json", "{\"steps\": [");
    app.fails_with(&["define", not_json.to_str().unwrap()], "is not JSON")
        .await;
    let ran = app.saga(&["start", "bad"]).await;
    assert!(
        !ran.success && ran.stderr.contains("saga_definition_not_found"),
        "{}",
        ran.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_resume_and_cancel_a_waiting_saga_from_the_command_line() {
    let app = Setup::start().await;
    let call = |path: &str| json!({"method": "POST", "url": format!("{}{path}", app.participant)});
    let waits = json!({
        "name": "held",
        "steps": [
            {"name": "reserve", "action": call("/a"), "compensation": call("/a")},
            {"name": "review", "wait": {"signal": "cleared", "timeout_ms": 600_000}},
        ]
    });
    let file = app.file("held.json", &waits.to_string());
    app.ok(&["define", file.to_str().unwrap()]).await;
    app.ok(&["start", "held", "--id", "held:1"]).await;

    assert_eq!(app.ok(&["pause", "held:1"]).await, "held:1  pause #1 kept\n");
    app.fails_with(&["pause", "held:1"], "saga_operation_refused").await;
    let mut shown = String::new();
    for _ in 0..200 {
        shown = app.ok(&["show", "held:1"]).await;
        if shown.starts_with("held:1  held@1  running (paused)") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(shown.starts_with("held:1  held@1  running (paused)"), "{shown}");
    assert_eq!(app.ok(&["resume", "held:1"]).await, "held:1  resume #2 kept\n");
    assert_eq!(app.ok(&["cancel", "held:1"]).await, "held:1  cancel #3 kept\n");
    for _ in 0..200 {
        shown = app.ok(&["show", "held:1"]).await;
        if shown.starts_with("held:1  held@1  cancelled") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(shown.starts_with("held:1  held@1  cancelled"), "{shown}");
    assert!(
        line_with(&shown, "reserve  compensation #1").contains("succeeded"),
        "{shown}"
    );
    app.fails_with(&["cancel", "held:1"], "saga_operation_refused").await;
    app.fails_with(&["retry-now", "nope"], "saga_not_found").await;

    // A batch over the others: counted, then cancelled server-side.
    for id in ["held:2", "held:3"] {
        app.ok(&["start", "held", "--id", id]).await;
    }
    assert_eq!(
        app.ok(&[
            "batch",
            "cancel",
            "--definition",
            "held",
            "--status",
            "running",
            "--dry-run"
        ])
        .await,
        "2 sagas match\n"
    );
    let ran = app
        .ok(&[
            "batch",
            "cancel",
            "--definition",
            "held",
            "--status",
            "running",
            "--wait",
            "20",
        ])
        .await;
    assert!(
        ran.contains("  cancel  finished  matched 2  applied 2  refused 0"),
        "{ran}"
    );
    let id = ran.split_whitespace().next().unwrap();
    assert!(app.ok(&["batch-show", id]).await.starts_with(id));
    let bad = app.saga(&["batch", "explode"]).await;
    assert!(!bad.success && bad.stderr.contains("no batch action"), "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_set_and_read_participant_limits_from_the_command_line() {
    let app = Setup::start().await;
    let set = app
        .ok(&["limit", "Payments:8082", "--max-concurrency", "3", "--max-per-s", "2.5"])
        .await;
    assert!(
        set.starts_with("payments:8082  max_concurrency 3  max_per_s 2.5  in_flight 0  breaker closed"),
        "{set}"
    );
    app.ok(&["limit", "inventory", "--max-per-s", "40"]).await;
    let all = app.ok(&["hosts"]).await;
    let hosts: Vec<&str> = all.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(hosts, ["inventory", "payments:8082"], "{all}");
    let one = app.ok(&["hosts", "inventory"]).await;
    assert!(one.contains("max_concurrency -  max_per_s 40"), "{one}");
    app.fails_with(
        &["limit", "payments", "--max-concurrency", "0"],
        "invalid_participant_limits",
    )
    .await;
    app.fails_with(&["hosts", "x:0"], "invalid_participant_host").await;
}
