//! `concord keys`: create and revoke API keys.

use super::Remote;
use clap::Subcommand;

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
