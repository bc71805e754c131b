//! The command line: `serve`, client commands over the HTTP API, and `bench`.

use crate::config::Settings;
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use concord_api::events::EventInput;
use concord_sdk::{Client, ExpectedVersion};

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
    /// Measure an area against a baseline taken in the same run.
    Bench(crate::bench::BenchArgs),
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
        Ok(Client::new(self.url.clone(), key)?)
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; it is printed once.
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        /// A scope to grant; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Revoke a key by id.
    Revoke { id: uuid::Uuid },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append one event.
    Append {
        stream: String,
        #[arg(long = "type")]
        event_type: String,
        /// The event's data, JSON.
        #[arg(long)]
        data: String,
        /// The event's metadata, a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// `any`, `no_stream`, `exists` or a version.
        #[arg(long, default_value = "any")]
        expected_version: String,
        /// The event's id (makes a retry idempotent).
        #[arg(long)]
        id: Option<uuid::Uuid>,
    },
    /// Print a stream's events, one JSON object a line.
    Read {
        stream: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Follow the global log live, one JSON object a line.
    Tail {
        #[arg(long)]
        category: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

/// Runs a client command.
///
/// # Errors
/// Bad arguments or an error answer, printed by `main`.
pub async fn run_keys(remote: &Remote, command: KeysCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        KeysCommand::Create { name, scopes } => {
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let created = client.create_key(&name, &scopes).await?;
            println!("{}", serde_json::to_string_pretty(&created)?);
        }
        KeysCommand::Revoke { id } => {
            client.revoke_key(id).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// Runs an events command.
///
/// # Errors
/// Bad arguments or an error answer.
pub async fn run_events(remote: &Remote, command: EventsCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        EventsCommand::Append {
            stream,
            event_type,
            data,
            metadata,
            expected_version,
            id,
        } => {
            let expected = parse_expected(&expected_version)?;
            let data = serde_json::from_str(&data).context("--data must be JSON")?;
            let metadata = metadata
                .map(|m| serde_json::from_str(&m))
                .transpose()
                .context("--metadata must be JSON")?;
            let event = EventInput {
                id,
                event_type,
                data,
                metadata,
            };
            let answer = client.append(&stream, expected, vec![event]).await?;
            println!("{}", serde_json::to_string(&answer)?);
        }
        EventsCommand::Read { stream, from, limit } => {
            let mut from = from;
            loop {
                let page = client.read_stream(&stream, from, limit).await?;
                for e in &page.events {
                    println!("{}", serde_json::to_string(e)?);
                }
                match page.next {
                    Some(next) if !page.events.is_empty() => from = next,
                    _ => break,
                }
            }
        }
        EventsCommand::Tail { category, after } => {
            let mut sub = client.subscribe(after, category.as_deref()).await?;
            while let Some(event) = sub.next().await {
                println!("{}", serde_json::to_string(&event?)?);
            }
        }
    }
    Ok(())
}

fn parse_expected(raw: &str) -> anyhow::Result<ExpectedVersion> {
    Ok(match raw {
        "any" => ExpectedVersion::Any,
        "no_stream" => ExpectedVersion::NoStream,
        "exists" => ExpectedVersion::Exists,
        n => ExpectedVersion::Exact(
            n.parse()
                .with_context(|| format!("--expected-version {raw:?}: use any, no_stream, exists or a number"))?,
        ),
    })
}
