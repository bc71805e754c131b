//! `concord events`: append, read and follow events.

use super::Remote;
use anyhow::Context as _;
use clap::Subcommand;
use concord_api::events::EventInput;
use concord_sdk::ExpectedVersion;

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
