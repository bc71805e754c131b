//! `concord tx`: show and list two-phase-commit transactions.

use super::Remote;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// A transaction's outcome, each participant's vote and acknowledgement.
    Show { xid: String },
    /// Transactions, one per line.
    List {
        /// Only those still waiting for a decision or an acknowledgement.
        #[arg(long)]
        pending: bool,
        /// committed, aborted or undecided.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
    },
}

/// Runs a `concord tx` command.
///
/// # Errors
/// The server's problem, or an unreachable server.
pub async fn run_tx(remote: &Remote, json: bool, command: TxCommand) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        TxCommand::Show { xid } => {
            let t = client.transaction(&xid).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
                return Ok(());
            }
            let outcome = t.outcome.as_deref().unwrap_or("undecided");
            let state = if t.presumed {
                " (presumed: no record of it)"
            } else if t.pending {
                " (pending)"
            } else {
                ""
            };
            println!("{}  {outcome}{state}", t.xid);
            if let Some(r) = &t.reason {
                println!("  reason: {r}");
            }
            for p in &t.participants {
                let ack = p
                    .acknowledged_at
                    .map_or_else(|| "not acknowledged".to_owned(), |a| format!("acknowledged {a}"));
                println!(
                    "  {:<20} vote {:<7} {ack}  {}",
                    p.name,
                    p.vote.as_deref().unwrap_or("none"),
                    p.url
                );
            }
        }
        TxCommand::List {
            pending,
            outcome,
            limit,
            after,
        } => {
            let page = client
                .list_transactions(outcome.as_deref(), pending.then_some(true), after.as_deref(), limit)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            for t in &page.transactions {
                let created = t.created_at.map(|c| c.to_rfc3339()).unwrap_or_default();
                let pending = if t.pending { "pending" } else { "done" };
                println!(
                    "{}  {:<10} {pending:<8} {created}",
                    t.xid,
                    t.outcome.as_deref().unwrap_or("undecided")
                );
            }
            if let Some(next) = page.next {
                println!("next: {next}");
            }
        }
    }
    Ok(())
}
