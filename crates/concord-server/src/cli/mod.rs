//! The command line: `serve`, client commands over the HTTP API, `relay`, and `bench` (which
//! runs the `concord-bench` binary). This module owns the command tree, `serve`'s arguments,
//! where a client command sends its requests ([`Remote`]) and the helper-binary launcher; each
//! client command family lives in its own module.

mod events;
mod keys;
mod saga;
mod tx;
mod vault;

pub use events::{EventsCommand, run_events};
pub use keys::{KeysCommand, run_keys};
pub use saga::{SagaCommand, run_saga};
pub use tx::{TxCommand, run_tx};
pub use vault::{VaultCommand, run_vault};

use crate::config::Settings;
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use concord_sdk::Client;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "concord", version, about = "Keeps data consistent across microservices.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage API keys (needs an admin key).
    Keys {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Append, read and follow events.
    Events {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect two-phase-commit transactions.
    Tx {
        #[command(flatten)]
        remote: Remote,
        /// Print the server's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: TxCommand,
    },
    /// Define, start, inspect and retry sagas.
    Saga {
        #[command(flatten)]
        remote: Remote,
        /// Print the server's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: SagaCommand,
    },
    /// Tokenize and reveal sensitive values, rotate the vault's master key, erase a subject.
    Vault {
        #[command(flatten)]
        remote: Remote,
        /// Print the server's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// Exit 0 when the server answers ready (`GET /ready`), 1 otherwise: for a container's
    /// exec-form health check, where there is no shell or curl.
    Healthcheck {
        /// Server URL.
        #[arg(long, env = "CONCORD_URL", default_value = "http://127.0.0.1:7400")]
        url: String,
        /// How long to wait for the answer, ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Publish a service's outbox to a broker (NATS JetStream or this server's event store).
    Relay(crate::relay::RelayArgs),
    /// Measure an area against a baseline taken in the same run: runs `concord-bench` (from
    /// beside this binary, else from PATH) with these arguments; `concord bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Runs the helper binary `concord-<name>` with `args` in place of this process (as `git` and
/// `cargo` run their external commands), so its output and exit code are the command's own.
///
/// # Errors
/// When the helper binary is neither beside this binary nor on PATH.
pub fn run_helper(name: &str, args: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let file = format!("concord-{name}");
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&file)))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(&file));
    let error = std::process::Command::new(&program).args(args).exec();
    anyhow::anyhow!(
        "cannot run {}: {error} (build it beside this binary, in the same profile: `cargo build -p {file}`, \
         with `--release` for a release build)",
        program.display()
    )
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [env: CONCORD_LISTEN] [default: 127.0.0.1:7400].
    #[arg(long)]
    pub listen: Option<String>,
    /// `sqlite://PATH` or `postgres://...` [env: CONCORD_DATABASE_URL] [default: sqlite://concord.db].
    #[arg(long)]
    pub database_url: Option<String>,
    /// The vault's database [env: CONCORD_VAULT_DATABASE_URL].
    #[arg(long)]
    pub vault_database_url: Option<String>,
    /// A TOML config file (default: ./concord.toml when present).
    #[arg(long)]
    pub config: Option<String>,
    /// Log JSON lines instead of human-readable text [env: CONCORD_LOG_JSON].
    #[arg(long)]
    pub log_json: bool,
    /// Serve TLS with this PEM certificate chain; a renewed file is served without a restart
    /// [env: CONCORD_TLS_CERT].
    #[arg(long)]
    pub tls_cert: Option<String>,
    /// The certificate's PEM private key [env: CONCORD_TLS_KEY].
    #[arg(long)]
    pub tls_key: Option<String>,
    /// Require client certificates signed by these PEM certificate authorities: mutual TLS
    /// [env: CONCORD_TLS_CLIENT_CA].
    #[arg(long)]
    pub tls_client_ca: Option<String>,
}

impl ServeArgs {
    /// Settings with the flags applied over file and environment.
    ///
    /// # Errors
    /// A bad config file or value.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref())?;
        if let Some(v) = &self.listen {
            s.listen.clone_from(v);
        }
        if let Some(v) = &self.database_url {
            s.database_url.clone_from(v);
        }
        if let Some(v) = &self.vault_database_url {
            s.vault_database_url.clone_from(v);
        }
        s.log_json |= self.log_json;
        for (flag, setting) in [
            (&self.tls_cert, &mut s.tls_cert),
            (&self.tls_key, &mut s.tls_key),
            (&self.tls_client_ca, &mut s.tls_client_ca),
        ] {
            if flag.is_some() {
                setting.clone_from(flag);
            }
        }
        Ok(s)
    }
}

/// Where a client command sends its requests.
#[derive(Debug, Args)]
pub struct Remote {
    /// Server URL.
    #[arg(long, env = "CONCORD_URL", default_value = "http://127.0.0.1:7400", global = true)]
    pub url: String,
    /// API key.
    #[arg(long, env = "CONCORD_KEY", hide_env_values = true, global = true)]
    pub key: Option<String>,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        let key = self.key.clone().context("an API key is needed: --key or CONCORD_KEY")?;
        Ok(Client::with_tls(
            self.url.clone(),
            key,
            &concord_sdk::ClientTls::from_env(),
        )?)
    }
}

/// `concord healthcheck`: whether the server at `url` answers `GET /ready` with 200 within
/// `timeout`; says why not on stderr. Over TLS it trusts and shows what `CONCORD_TLS_CA`,
/// `CONCORD_TLS_CLIENT_CERT` and `CONCORD_TLS_CLIENT_KEY` name, as every Concord client does.
pub async fn healthcheck(url: &str, timeout: std::time::Duration) -> bool {
    let builder = concord_sdk::ClientTls::from_env().apply(reqwest::Client::builder().timeout(timeout));
    let client = match builder.map_err(anyhow::Error::from).and_then(|b| Ok(b.build()?)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("unhealthy: {e}");
            return false;
        }
    };
    match client.get(format!("{}/ready", url.trim_end_matches('/'))).send().await {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            eprintln!("unhealthy: GET /ready answered {}", r.status());
            false
        }
        Err(e) => {
            // The causes too: "error sending request" alone does not say a certificate was refused.
            eprintln!("unhealthy: {:#}", anyhow::Error::from(e));
            false
        }
    }
}
