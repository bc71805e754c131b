//! The processes of a demo run: the Concord server and the shop's services, each a child of the
//! demo started from the `concord` binary itself, logging to its own file.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start one process (again, after a kill: same ports, same databases).
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub health_url: String,
}

/// A running child.
pub struct Proc {
    pub spec: Spec,
    child: Child,
    pub restarts: u32,
}

/// Where a run keeps its files: databases, `logs/`, `traces/`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub exe: PathBuf,
}

impl Layout {
    #[must_use]
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    #[must_use]
    pub fn trace_file(&self, name: &str) -> PathBuf {
        self.dir.join("traces").join(format!("{name}.jsonl"))
    }

    /// Creates the folders.
    ///
    /// # Errors
    /// The file system's.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.join("logs"))?;
        std::fs::create_dir_all(self.dir.join("traces"))
    }
}

fn spawn_child(layout: &Layout, spec: &Spec) -> anyhow::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log_file(&spec.name))?;
    let mut cmd = Command::new(&layout.exe);
    cmd.args(&spec.args).current_dir(&layout.dir);
    // The run's settings only: nothing of the caller's own Concord configuration leaks in.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CONCORD_")
            || name.starts_with("SHOP_")
            || name == "RUST_LOG"
            || name == "OTEL_SERVICE_NAME"
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd.env("RUST_LOG", "info,sqlx=warn")
        .env("NO_COLOR", "1")
        .env("OTEL_SERVICE_NAME", &spec.name)
        .env("CONCORD_TRACE_FILE", layout.trace_file(&spec.name))
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd.spawn()?)
}

/// Waits until `url` answers 200.
///
/// # Errors
/// When it does not within `timeout`.
pub async fn wait_healthy(http: &reqwest::Client, name: &str, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{name} did not become healthy at {url} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Proc {
    /// Starts the process and waits until it is healthy.
    ///
    /// # Errors
    /// It cannot start, or does not become healthy (see its log file).
    pub async fn start(layout: &Layout, http: &reqwest::Client, spec: Spec) -> anyhow::Result<Self> {
        let child = spawn_child(layout, &spec)?;
        let mut proc = Self {
            spec,
            child,
            restarts: 0,
        };
        proc.healthy(layout, http).await?;
        Ok(proc)
    }

    async fn healthy(&mut self, layout: &Layout, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Healthy takes two answers with the exit check between them: an answer from another
        // process that holds this port must not pass for this one, which has then exited.
        let mut answered = false;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!(
                    "{} exited with {status}; see {}",
                    self.spec.name,
                    layout.log_file(&self.spec.name).display()
                );
            }
            if wait_healthy(http, &self.spec.name, &self.spec.health_url, Duration::from_millis(200))
                .await
                .is_ok()
            {
                if answered {
                    return Ok(());
                }
                answered = true;
                continue;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not become healthy at {} within 60 s",
                    self.spec.name,
                    self.spec.health_url
                );
            }
        }
    }

    /// SIGKILL: no shutdown, no flush, whatever was in flight is cut off.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process with SIGKILL, starts it again on the same settings, and waits until it
    /// is healthy.
    ///
    /// # Errors
    /// As [`Proc::start`].
    pub async fn kill_and_restart(
        &mut self,
        layout: &Layout,
        http: &reqwest::Client,
        down_for: Duration,
    ) -> anyhow::Result<()> {
        self.kill();
        tokio::time::sleep(down_for).await;
        self.restart(layout, http).await
    }

    /// Starts a killed process again on the same settings, and waits until it is healthy.
    ///
    /// # Errors
    /// As [`Proc::start`].
    pub async fn restart(&mut self, layout: &Layout, http: &reqwest::Client) -> anyhow::Result<()> {
        self.child = spawn_child(layout, &self.spec)?;
        self.restarts += 1;
        self.healthy(layout, http).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port on 127.0.0.1, to pin a service to across restarts. It is taken below Linux's
/// ephemeral range (32768 and up), so no outgoing connection can take it while the service is
/// down between a kill and its restart. Demos running at once on one machine keep out of each
/// other's ports through a lock file per port, held until this process exits: a port that was
/// free when probed is not bound until its service starts, and a killed service's port is free
/// until it restarts.
///
/// # Errors
/// When none of the ports tried can be bound, or the lock folder cannot be made.
pub fn free_port() -> std::io::Result<u16> {
    free_port_from(20_000 + u16::from(uuid::Uuid::new_v4().as_bytes()[0]) * 40)
}

/// The lock file of `port`, shared by every demo on this machine.
fn port_lock(port: u16) -> std::io::Result<std::fs::File> {
    let locks = std::env::temp_dir().join("concord-demo-ports");
    std::fs::create_dir_all(&locks)?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(locks.join(format!("{port}.lock")))
}

fn free_port_from(start: u16) -> std::io::Result<u16> {
    // The ports handed out, each with its held lock: never hand one out twice.
    static HANDED_OUT: std::sync::Mutex<Vec<(u16, std::fs::File)>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for port in (start..32_000).chain(20_000..start) {
        if handed_out.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let lock = port_lock(port)?;
        if lock.try_lock().is_ok() && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push((port, lock));
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 20000-31999",
    ))
}

/// Every file under `dir`, recursively.
#[must_use]
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_whose_lock_another_demo_holds_is_passed_over() {
        // Another demo holds the lock of the first free port from 31000: it is skipped even
        // though nothing is bound to it yet.
        let taken = (31_000..32_000)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .unwrap();
        let other = port_lock(taken).unwrap();
        other.try_lock().unwrap();
        let port = free_port_from(taken).unwrap();
        assert_ne!(port, taken);
        assert!(port > taken, "the search goes on upward from {taken}: {port}");
        // And this process holds the port it was given: no other demo can take it.
        let again = port_lock(port).unwrap();
        assert!(again.try_lock().is_err(), "the lock of {port} is held");
    }
}
