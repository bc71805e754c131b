//! Child processes of the real `concord` binary for black-box tests: their output, the server,
//! the command-line client. Every child lives in a [`Proc`], which kills and reaps it on drop, so
//! a failed assertion never leaks a process; every wait is bounded by [`TIMEOUT`].
#![allow(dead_code)]

use serde_json::Value;
use std::future::Future;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub const BIN: &str = env!("CARGO_BIN_EXE_concord");
/// The longest any single wait may take.
pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const ADMIN_KEY: &str = "process-test-admin-key";
pub const KEY_BANNER: &str = "Generated admin API key (shown once, store it now): ";

// ---------------------------------------------------------------------------------------------
// Helpers: child processes, their output, the server and the command-line client.
// ---------------------------------------------------------------------------------------------

/// Awaits `fut`, failing the test after [`TIMEOUT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?}: {what}"))
}

/// The lines a child writes to one pipe, read by a thread that keeps draining the pipe.
pub struct Lines {
    pub name: &'static str,
    pub rx: UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn read(name: &'static str, pipe: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name,
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line, `None` at end of file.
    pub async fn next(&mut self) -> Option<String> {
        let line = tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {} line within {TIMEOUT:?}; so far: {:#?}", self.name, self.seen));
        if let Some(line) = &line {
            self.seen.push(line.clone());
        }
        line
    }

    /// The first coming line that `pick` maps to `Some`; fails at end of file.
    pub async fn find<T>(&mut self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        loop {
            let Some(line) = self.next().await else {
                panic!("{} ended without {what}; it said: {:#?}", self.name, self.seen);
            };
            if let Some(found) = pick(&line) {
                return found;
            }
        }
    }

    /// Every line up to end of file (the ones already read included).
    pub async fn all(&mut self) -> Vec<String> {
        while self.next().await.is_some() {}
        self.seen.clone()
    }
}

/// A child process with its output; killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

/// What a child did, once it exited.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the concord binary");
        let stdout = Lines::read("stdout", child.stdout.take().unwrap());
        let stderr = Lines::read("stderr", child.stderr.take().unwrap());
        Self { child, stdout, stderr }
    }

    /// Sends a signal (`TERM`, `KILL`, ...) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed: {status}");
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the child did not exit within {TIMEOUT:?}; stderr so far: {:#?}",
                self.stderr.seen
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the child to exit and collects all it printed.
    pub async fn finish(&mut self) -> Finished {
        let status = self.wait().await;
        Finished {
            status,
            stdout: self.stdout.all().await,
            stderr: self.stderr.all().await,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `concord` command in `dir` whose environment holds nothing of the test runner's Concord,
/// OpenTelemetry or log settings.
pub fn concord(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CONCORD_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// `concord serve` on port 0 in `dir`, with no database or key chosen.
pub fn bare_serve(dir: &Path) -> Command {
    let mut cmd = concord(dir);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    cmd
}

/// `concord serve` on port 0 on `dir/concord.db`, with [`ADMIN_KEY`] as the admin key.
pub fn serve(dir: &Path) -> Command {
    let mut cmd = bare_serve(dir);
    cmd.arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("concord.db").display()))
        .env("CONCORD_ADMIN_KEY", ADMIN_KEY);
    cmd
}

/// A loopback address with a port free right now, for a node that must come back where its
/// clients look for it.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The address in the `concord listening` log line, human or JSON.
pub fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("concord listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        return v["fields"]["addr"].as_str().map(str::to_owned);
    }
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .map(str::to_owned)
}

/// A running server.
pub struct Server {
    pub proc: Proc,
    pub url: String,
    pub http: reqwest::Client,
}

impl Server {
    /// Spawns `cmd` and waits until the server logs the address it listens on.
    pub async fn start(cmd: Command) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut proc = Proc::spawn(cmd);
        let addr = proc.stderr.find("the `concord listening` line", listening_addr).await;
        let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
        Self {
            proc,
            url: format!("http://{addr}"),
            http,
        }
    }

    /// Spawns `cmd` and waits until the server listens and `/ready` answers 200.
    pub async fn start_ready(cmd: Command) -> Self {
        let server = Self::start(cmd).await;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let ready = server.http.get(format!("{}/ready", server.url)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            assert!(Instant::now() < deadline, "{} not ready within {TIMEOUT:?}", server.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY)
    }

    pub async fn append(&self, stream: &str, body: Value) -> Value {
        let r = within(
            "append",
            self.request(reqwest::Method::POST, &format!("/v1/streams/{stream}"))
                .json(&body)
                .send(),
        )
        .await
        .unwrap();
        let status = r.status();
        let answer: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "append to {stream}: {answer}");
        answer
    }

    pub async fn read_stream(&self, stream: &str) -> Vec<Value> {
        let r = self
            .request(reqwest::Method::GET, &format!("/v1/streams/{stream}?limit=1000"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "read {stream}");
        let page: Value = r.json().await.unwrap();
        page["events"].as_array().unwrap().clone()
    }

    /// A typed client of this server.
    pub fn sdk(&self) -> concord_sdk::Client {
        concord_sdk::Client::new(self.url.clone(), ADMIN_KEY).unwrap()
    }

    /// SIGTERM, then everything the server did until it exited.
    pub async fn terminate(mut self) -> Finished {
        self.proc.signal("TERM");
        self.proc.finish().await
    }
}

/// Runs a client command against `server` with `key` and waits for it to finish.
pub async fn cli(dir: &Path, server: &Server, key: &str, args: &[&str]) -> Finished {
    Proc::spawn(cli_command(dir, server, key, args)).finish().await
}

pub fn cli_command(dir: &Path, server: &Server, key: &str, args: &[&str]) -> Command {
    let mut cmd = concord(dir);
    cmd.args(args).args(["--url", &server.url, "--key", key]);
    cmd
}

/// Parses one line of CLI output as JSON.
pub fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}
