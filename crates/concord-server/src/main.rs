//! The `concord` binary: parses the command line and hands over to the library.

use clap::Parser as _;
use concord_server::cli::{Cli, Command};
use concord_server::startup;
use concord_server::{cli, telemetry};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    startup::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(args) => startup::serve(args.settings()?).await?,
        Command::Keys { remote, command } => cli::run_keys(&remote, command).await?,
        Command::Events { remote, command } => cli::run_events(&remote, command).await?,
        Command::Saga { remote, json, command } => cli::run_saga(&remote, json, command).await?,
        Command::Tx { remote, json, command } => cli::run_tx(&remote, json, command).await?,
        Command::Vault { remote, json, command } => cli::run_vault(&remote, json, command).await?,
        Command::Relay(args) => {
            let _telemetry = telemetry::init(false);
            concord_server::relay::run(args).await?;
        }
        Command::Bench { args } => return Err(cli::run_helper("bench", &args)),
        Command::Healthcheck { url, timeout_ms } => {
            if !cli::healthcheck(&url, std::time::Duration::from_millis(timeout_ms)).await {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
