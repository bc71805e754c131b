//! The `concord-shop` binary: `demo` runs the shop under faults and checks it; each service runs
//! on its own (`concord-shop orders ...`); `serve` runs the Concord server this binary links, so
//! the demo needs nothing but this binary.

use clap::Parser as _;
use concord_shop::ShopCommand;
use concord_shop::demo::DemoArgs;
use std::process::ExitCode;

#[derive(Debug, clap::Parser)]
#[command(
    name = "concord-shop",
    version,
    about = "The reference shop on Concord, and the demo that runs it under faults."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the shop under injected faults and check that nothing became inconsistent.
    Demo(DemoArgs),
    /// The Concord server, as `concord serve` (the demo starts it this way).
    #[command(hide = true)]
    Serve(concord_server::cli::ServeArgs),
    #[command(flatten)]
    Service(ShopCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    concord_server::startup::run_main(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    use concord_server::startup::{serve, shutdown_signal};
    match command {
        Command::Demo(args) => return demo(args).await,
        Command::Serve(args) => serve(args.settings()?).await?,
        Command::Service(service) => {
            let _telemetry = concord_server::telemetry::init(false);
            concord_shop::run(service, shutdown_signal()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The report on stdout, exit 1 unless every invariant holds, and 2 when the run itself broke (a
/// process did not start, a database was unreachable), which is no verdict.
async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let report_path = args.report.clone();
    let outcome = match concord_shop::demo::run(args, exe).await {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("concord-shop demo: the run broke before its verdict: {e:#}");
            return Ok(ExitCode::from(2));
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
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
