//! The `concord` binary: parses the command line and hands over to the library.

use clap::Parser as _;
use concord_server::cli::{Cli, Command};
use concord_server::startup::{Application, shutdown_signal};
use concord_server::{bench, cli, telemetry};

fn main() -> std::process::ExitCode {
    // reqwest is built without a default crypto provider: choose ring, once, for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let settings = args.settings()?;
            let _telemetry = telemetry::init(settings.log_json);
            let app = Application::build(settings).await?;
            if let Some(key) = &app.generated_admin_key {
                // Printed once, to the terminal only: never through the log pipeline.
                println!("Generated admin API key (shown once, store it now): {key}");
            }
            tracing::info!(addr = %app.local_addr()?, "concord listening");
            app.run_until(shutdown_signal()).await?;
        }
        Command::Keys { remote, command } => cli::run_keys(&remote, command).await?,
        Command::Events { remote, command } => cli::run_events(&remote, command).await?,
        Command::Saga { remote, json, command } => cli::run_saga(&remote, json, command).await?,
        Command::Tx { remote, json, command } => cli::run_tx(&remote, json, command).await?,
        Command::Vault { remote, json, command } => cli::run_vault(&remote, json, command).await?,
        Command::Relay(args) => {
            let _telemetry = telemetry::init(false);
            concord_server::relay::run(args).await?;
        }
        Command::Bench(args) => return bench::run(args).await,
        Command::Shop { service } => {
            let _telemetry = telemetry::init(false);
            concord_shop::run(service, shutdown_signal()).await?;
        }
        Command::Demo(args) => return demo(args).await,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `concord demo`: the report on stdout, exit 1 unless every invariant holds, and 2 when the run
/// itself broke (a process did not start, a database was unreachable), which is no verdict.
async fn demo(args: concord_shop::demo::DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    let exe = std::env::current_exe()?;
    let report_path = args.report.clone();
    let outcome = match concord_shop::demo::run(args, exe).await {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("concord demo: the run broke before its verdict: {e:#}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    print!("{}", concord_shop::demo::report::render_text(&outcome.report));
    println!("report written to {}", report_path.display());
    if let Some((tree, services)) = &outcome.trace {
        println!("\n{tree}");
        println!(
            "services in this trace: {}",
            services.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(if outcome.report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
