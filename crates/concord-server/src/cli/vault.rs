//! `concord vault`: tokenize and reveal values, rotate the master key, erase a subject.

use super::Remote;
use anyhow::Context as _;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Tokenize one value and print its token. VALUE `-` reads it from standard input, which
    /// keeps it out of the shell history and the process list.
    Tokenize {
        /// card, ssn, email, phone or generic.
        #[arg(long = "type")]
        kind: String,
        value: String,
        /// random (default), uuid or last4 (cards).
        #[arg(long)]
        format: Option<String>,
        /// The same type, format, subject and value give the same token.
        #[arg(long)]
        convergent: bool,
        /// Whose data it is (so it can be erased).
        #[arg(long)]
        subject: Option<String>,
        /// Seconds until the token stops revealing.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print the values of tokens, one per line (needs vault:detokenize:TYPE, or
    /// vault:detokenize-masked:TYPE with --masked).
    Detokenize {
        #[arg(required = true)]
        tokens: Vec<String>,
        #[arg(long)]
        masked: bool,
    },
    /// Add a master key version and re-wrap every data key under it.
    RotateKey,
    /// Delete a subject's data key: its tokens answer `erased` from then on.
    EraseSubject { subject: String },
}

/// Runs a `concord vault` command.
///
/// # Errors
/// The server's problem, or an unreachable server.
pub async fn run_vault(remote: &Remote, json: bool, command: VaultCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        VaultCommand::Tokenize {
            kind,
            value,
            format,
            convergent,
            subject,
            ttl,
        } => {
            let value = if value == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading the value")?;
                text.trim_end_matches(['\r', '\n']).to_owned()
            } else {
                value
            };
            let item = concord_api::vault::TokenizeItemIn {
                kind,
                value,
                format,
                convergent: convergent.then_some(true),
                subject,
                ttl_s: ttl,
                metadata: None,
            };
            let tokens = client.tokenize(std::slice::from_ref(&item)).await?;
            if json {
                println!("{}", serde_json::json!({ "tokens": tokens }));
            } else {
                for t in tokens {
                    println!("{t}");
                }
            }
        }
        VaultCommand::Detokenize { tokens, masked } => {
            let items = client.detokenize(&tokens, masked).await?;
            if json {
                println!("{}", serde_json::json!({ "items": items }));
                return Ok(());
            }
            for i in items {
                match (i.value, i.error) {
                    (Some(v), _) => println!("{}\t{v}", i.token),
                    (None, e) => println!("{}\t({})", i.token, e.as_deref().unwrap_or("no value")),
                }
            }
        }
        VaultCommand::RotateKey => {
            let r = client.rotate_vault_key().await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "master key version {}; {} data keys re-wrapped",
                    r.master_key_version, r.rewrapped
                );
            }
        }
        VaultCommand::EraseSubject { subject } => {
            let r = client.erase_subject(&subject).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else if r.erased {
                println!("{}: erased; its tokens can no longer be revealed", r.subject);
            } else {
                println!("{}: no data key (nothing to erase, or erased before)", r.subject);
            }
        }
    }
    Ok(())
}
