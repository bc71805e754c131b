//! Black-box tests of the real `concord` binary, run as child processes: startup, the generated
//! admin key, the command-line client, signals, JSON logs, trace export and crash durability.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

#[path = "support/proc.rs"]
mod proc;
use proc::*;
#[path = "support/pki.rs"]
mod pki;

// ---------------------------------------------------------------------------------------------
// A fake OTLP/HTTP collector.
// ---------------------------------------------------------------------------------------------

/// One request the collector received.
#[derive(Debug)]
struct Received {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Listens on 127.0.0.1:0 and reports every HTTP request it answers (200, empty body).
fn fake_collector() -> (String, UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = unbounded_channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = collector_connection(conn, &tx);
            });
        }
    });
    (endpoint, rx)
}

/// Serves keep-alive HTTP/1.1 requests with `Content-Length` bodies until the peer hangs up.
fn collector_connection(conn: TcpStream, tx: &UnboundedSender<Received>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let received = Received {
            method: parts.next().unwrap_or_default().to_owned(),
            path: parts.next().unwrap_or_default().to_owned(),
            body,
        };
        // Reported before answering, so it is in the channel by the time the exporter is done.
        if tx.send(received).is_err() {
            return Ok(());
        }
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_in_a_working_directory_without_concord_toml() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = concord(dir.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("CONCORD_ADMIN_KEY", ADMIN_KEY);
    let server = Server::start(cmd).await;
    let r = within("GET /health", server.http.get(format!("{}/health", server.url)).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `concord healthcheck` exits 0 when the server answers ready and 1 when nothing answers: the
/// health check of an image without a shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_for_a_ready_server_and_1_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(serve(dir.path())).await;
    let check = |url: String| {
        let dir = dir.path().to_owned();
        async move {
            let mut cmd = concord(&dir);
            cmd.args(["healthcheck", "--url", &url]);
            let mut p = Proc::spawn(cmd);
            p.finish().await
        }
    };
    let ok = within("healthcheck", check(server.url.clone())).await;
    assert!(ok.status.success(), "{ok:?}");
    // A port nothing listens on: bind one, then let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = within("healthcheck", check(format!("http://{free}"))).await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(down.stderr.iter().any(|l| l.contains("unhealthy")), "{down:?}");
}

/// `concord serve --tls-cert --tls-key --tls-client-ca` serves mutual TLS, and `concord
/// healthcheck` reads the client settings every Concord client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_tls_flags_and_healthcheck_shows_its_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new();
    pki.issue("server");
    pki.issue("probe");
    let path = |name: &str| pki.path(name).display().to_string();
    let mut cmd = serve(dir.path());
    cmd.args(["--tls-cert", &path("server.pem"), "--tls-key", &path("server.key")])
        .args(["--tls-client-ca", &path("ca.pem")]);
    let server = Server::start(cmd).await;
    let url = server.url.replacen("http://", "https://", 1);
    let check = |env: Vec<(&'static str, String)>| {
        let (dir, url) = (dir.path().to_owned(), url.clone());
        async move {
            let mut cmd = concord(&dir);
            cmd.args(["healthcheck", "--url", &url]).envs(env);
            Proc::spawn(cmd).finish().await
        }
    };
    let with_cert = vec![
        ("CONCORD_TLS_CA", path("ca.pem")),
        ("CONCORD_TLS_CLIENT_CERT", path("probe.pem")),
        ("CONCORD_TLS_CLIENT_KEY", path("probe.key")),
    ];
    let ok = within("healthcheck", check(with_cert)).await;
    assert!(ok.status.success(), "{ok:?}");
    let no_cert = within("healthcheck", check(vec![("CONCORD_TLS_CA", path("ca.pem"))])).await;
    assert_eq!(no_cert.status.code(), Some(1), "no client certificate: {no_cert:?}");
    // With its certificate but without the server's CA, the probe refuses the server.
    let untrusted = within(
        "healthcheck",
        check(vec![
            ("CONCORD_TLS_CLIENT_CERT", path("probe.pem")),
            ("CONCORD_TLS_CLIENT_KEY", path("probe.key")),
        ]),
    )
    .await;
    assert_eq!(
        untrusted.status.code(),
        Some(1),
        "the server's CA not trusted: {untrusted:?}"
    );
    assert!(
        untrusted
            .stderr
            .iter()
            .any(|l| l.to_lowercase().contains("certificate")),
        "{untrusted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_database_url_creates_concord_db_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(bare_serve(dir.path())).await;

    let r = within("GET /health", server.http.get(format!("{}/health", server.url)).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    assert!(
        dir.path().join("concord.db").is_file(),
        "no concord.db in the working directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_admin_key_is_printed_once_and_works() {
    let dir = tempfile::tempdir().unwrap();
    // No CONCORD_ADMIN_KEY: the first start has to generate the key.
    let command = || {
        let mut cmd = bare_serve(dir.path());
        cmd.arg("--database-url")
            .arg(format!("sqlite://{}", dir.path().join("keys.db").display()));
        cmd
    };
    let mut server = Server::start(command()).await;
    let key = server
        .proc
        .stdout
        .find("the generated admin key", |line| {
            line.strip_prefix(KEY_BANNER).map(str::to_owned)
        })
        .await;
    assert!(key.starts_with("ck_"), "{key}");

    let create = |server: &Server| {
        server
            .http
            .post(format!("{}/v1/keys", server.url))
            .bearer_auth(&key)
            .json(&json!({"name": "reader", "scopes": ["events:read"]}))
            .send()
    };
    let r = within("POST /v1/keys", create(&server)).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let first = server.terminate().await;
    assert!(first.status.success(), "{first:#?}");
    assert_eq!(
        first.stdout,
        [format!("{KEY_BANNER}{key}")],
        "stdout of the first start"
    );
    assert!(
        first.stderr.iter().all(|l| !l.contains(&key)),
        "the key reached the log: {first:#?}"
    );

    let again = Server::start(command()).await;
    let r = within("POST /v1/keys after a restart", create(&again)).await.unwrap();
    assert_eq!(r.status(), 201, "the generated key no longer works after a restart");
    let second = again.terminate().await;
    assert!(second.status.success(), "{second:#?}");
    assert!(
        second.stdout.iter().all(|l| !l.contains("admin API key")),
        "the second start printed a key: {second:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_appends_reads_and_tails_events_and_creates_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(serve(d)).await;

    let first = cli(
        d,
        &server,
        ADMIN_KEY,
        &[
            "events",
            "append",
            "order-7",
            "--type",
            "Placed",
            "--data",
            r#"{"n":1}"#,
        ],
    )
    .await;
    assert!(first.status.success(), "{first:#?}");
    assert_eq!(first.stdout.len(), 1, "{first:#?}");
    let answer = json_line(&first.stdout[0]);
    assert_eq!(answer["stream"], "order-7");
    assert_eq!(answer["first_version"], 1);
    assert_eq!(answer["last_version"], 1);

    let second = cli(
        d,
        &server,
        ADMIN_KEY,
        &[
            "events",
            "append",
            "order-7",
            "--type",
            "Paid",
            "--data",
            r#"{"n":2}"#,
            "--expected-version",
            "1",
        ],
    )
    .await;
    assert!(second.status.success(), "{second:#?}");
    assert_eq!(json_line(&second.stdout[0])["last_version"], 2, "{second:#?}");

    let read = cli(d, &server, ADMIN_KEY, &["events", "read", "order-7"]).await;
    assert!(read.status.success(), "{read:#?}");
    let events: Vec<Value> = read.stdout.iter().map(|l| json_line(l)).collect();
    assert_eq!(events.len(), 2, "{read:#?}");
    assert_eq!(
        (&events[0]["version"], &events[0]["type"], &events[0]["data"]),
        (&json!(1), &json!("Placed"), &json!({"n": 1}))
    );
    assert_eq!(
        (&events[1]["version"], &events[1]["type"], &events[1]["data"]),
        (&json!(2), &json!("Paid"), &json!({"n": 2}))
    );

    let conflict = cli(
        d,
        &server,
        ADMIN_KEY,
        &[
            "events",
            "append",
            "order-7",
            "--type",
            "Late",
            "--data",
            "{}",
            "--expected-version",
            "5",
        ],
    )
    .await;
    assert!(!conflict.status.success(), "{conflict:#?}");
    assert!(conflict.stdout.is_empty(), "{conflict:#?}");
    assert!(
        conflict.stderr.iter().any(|l| l.contains("wrong_expected_version")),
        "{conflict:#?}"
    );

    // The tail catches up with both events first, which proves it is subscribed.
    let mut tail = Proc::spawn(cli_command(d, &server, ADMIN_KEY, &["events", "tail"]));
    for version in [1, 2] {
        let line = tail.stdout.next().await.expect("tail ended early");
        assert_eq!(json_line(&line)["version"], version, "{line}");
    }
    let third = cli(
        d,
        &server,
        ADMIN_KEY,
        &[
            "events",
            "append",
            "order-7",
            "--type",
            "Shipped",
            "--data",
            r#"{"n":3}"#,
        ],
    )
    .await;
    assert!(third.status.success(), "{third:#?}");
    let live = json_line(&tail.stdout.next().await.expect("tail ended early"));
    assert_eq!(
        (&live["stream"], &live["version"], &live["type"]),
        (&json!("order-7"), &json!(3), &json!("Shipped"))
    );
    drop(tail);

    let created = cli(
        d,
        &server,
        ADMIN_KEY,
        &["keys", "create", "--name", "reader", "--scope", "events:read"],
    )
    .await;
    assert!(created.status.success(), "{created:#?}");
    let created: Value = serde_json::from_str(&created.stdout.join("\n")).unwrap();
    assert_eq!(created["name"], "reader");
    assert_eq!(created["scopes"], json!(["events:read"]));
    let reader = created["key"].as_str().unwrap();

    let read = cli(d, &server, reader, &["events", "read", "order-7"]).await;
    assert!(read.status.success(), "{read:#?}");
    assert_eq!(read.stdout.len(), 3, "{read:#?}");
    let refused = cli(
        d,
        &server,
        reader,
        &["events", "append", "order-7", "--type", "X", "--data", "{}"],
    )
    .await;
    assert!(!refused.status.success(), "a read key appended: {refused:#?}");
    assert!(refused.stderr.iter().any(|l| l.contains("forbidden")), "{refused:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_long_poll_finish_ends_sse_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(serve(dir.path())).await;
    server
        .append("order-1", json!({"events": [{"type": "Placed", "data": {}}]}))
        .await;

    // A live SSE subscription, proven live by the event it catches up with.
    let mut sub = within("subscribe", server.sdk().subscribe(0, None)).await.unwrap();
    let event = within("the first SSE event", sub.next()).await.unwrap().unwrap();
    assert_eq!(event.stream, "order-1");

    // A long poll that finds nothing of its category and so waits the whole 3 s.
    let poll = server
        .request(
            reqwest::Method::GET,
            "/v1/subscriptions/billing/events?category=idle&wait_ms=3000",
        )
        .send();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let r = poll.await?;
        let status = r.status();
        Ok::<_, reqwest::Error>((status, r.json::<Value>().await?, started.elapsed()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the long poll answered before the signal");

    server.proc.signal("TERM");
    server
        .proc
        .stderr
        .find("the shutdown log line", |l| l.contains("shutting down").then_some(()))
        .await;

    // The listener closes while the long poll is still being served.
    let addr = server.url.trim_start_matches("http://").to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::net::TcpStream::connect(&addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "still accepting connections 2 s after SIGTERM: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(!poll.is_finished(), "the long poll answered before its wait was over");

    // The SSE stream ends cleanly (end of body, not a transport error).
    let end = within("the end of the SSE stream", sub.next()).await;
    assert!(end.is_none(), "the SSE stream went on after SIGTERM: {end:?}");

    let (status, page, elapsed) = within("the long poll", poll)
        .await
        .unwrap()
        .expect("long poll answered");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"], json!([]), "{page}");
    assert!(elapsed >= Duration::from_millis(2900), "cut short after {elapsed:?}");

    let done = server.proc.finish().await;
    assert!(done.status.success(), "{done:#?}");
    assert!(
        done.stderr.iter().all(|l| !l.contains("grace period over")),
        "the grace period ran out: {done:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_json_makes_every_stderr_line_a_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve(dir.path());
    cmd.arg("--log-json");
    let server = Server::start(cmd).await;
    server
        .append("order-1", json!({"events": [{"type": "E", "data": {}}]}))
        .await;
    let unauthorized = within(
        "an unauthenticated read",
        server.http.get(format!("{}/v1/events", server.url)).send(),
    )
    .await
    .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let missing = within("a 404", server.request(reqwest::Method::GET, "/nowhere").send())
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let done = server.terminate().await;
    assert!(done.status.success(), "{done:#?}");
    assert!(done.stderr.len() >= 2, "{done:#?}");
    for line in &done.stderr {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(value.is_object(), "not an object: {line}");
        assert!(value["level"].is_string() && value["fields"].is_object(), "{line}");
    }
    assert!(done.stderr.iter().any(|l| l.contains("shutting down")), "{done:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_traceparent_reaches_the_otlp_exporter() {
    let (endpoint, mut received) = fake_collector();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve(dir.path());
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let server = Server::start(cmd).await;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let r = within(
        "a traced append",
        server
            .request(reqwest::Method::POST, "/v1/streams/order-9")
            .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
            .json(&json!({"events": [{"type": "E", "data": {}}]}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    // Shutdown flushes the batch exporter.
    let done = server.terminate().await;
    assert!(done.status.success(), "{done:#?}");

    let (trace, parent) = (hex_bytes(&trace_id), hex_bytes(&parent_id));
    let mut seen = Vec::new();
    let export = within("an export carrying the trace id", async {
        loop {
            let Some(req) = received.recv().await else {
                unreachable!("the collector never stops")
            };
            if contains(&req.body, &trace) {
                return req;
            }
            seen.push((req.method, req.path, req.body.len()));
        }
    })
    .await;
    assert_eq!((export.method.as_str(), export.path.as_str()), ("POST", "/v1/traces"));
    assert!(
        contains(&export.body, &parent),
        "the request span's parent is not the incoming span id"
    );
    assert!(
        seen.iter().all(|(m, p, _)| m == "POST" && p == "/v1/traces"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(serve(dir.path())).await;
    for n in 1..=50u64 {
        let answer = server
            .append("acct-1", json!({"events": [{"type": "Deposited", "data": {"n": n}}]}))
            .await;
        assert_eq!(answer["last_version"], n, "{answer}");
    }

    server.proc.signal("KILL");
    let status = server.proc.wait().await;
    assert_eq!(status.signal(), Some(9), "{status}");
    drop(server);

    let server = Server::start(serve(dir.path())).await;
    let events = server.read_stream("acct-1").await;
    assert_eq!(events.len(), 50);
    for (event, n) in events.iter().zip(1..=50u64) {
        assert_eq!(
            (&event["version"], &event["position"], &event["data"]),
            (&json!(n), &json!(n), &json!({"n": n})),
            "{event}"
        );
    }
    let answer = server
        .append("acct-1", json!({"events": [{"type": "Deposited", "data": {"n": 51}}]}))
        .await;
    assert_eq!(
        (&answer["first_version"], &answer["position"]),
        (&json!(51), &json!(51)),
        "{answer}"
    );
}

// ---------------------------------------------------------------------------------------------

/// `concord bench` runs `concord-bench` from beside `concord` (both are built by
/// `cargo test --workspace`), its output and exit code passed through.
#[test]
fn concord_bench_runs_the_bench_binary_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = concord(dir.path()).args(["bench", "--help"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("concord-bench") && stdout.contains("--backend"),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = concord(dir.path()).args(["bench", "no-such-area"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error, passed through");
}
