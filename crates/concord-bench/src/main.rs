//! The `concord-bench` binary: `concord-bench <area> [options]`, or `concord bench <area>`,
//! which runs this binary from beside `concord`.

use clap::Parser as _;
use concord_bench::BenchArgs;

#[derive(Debug, clap::Parser)]
#[command(
    name = "concord-bench",
    version,
    about = "Measure an area of Concord against a baseline taken in the same run."
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

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
    match runtime.block_on(concord_bench::run(cli.args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
