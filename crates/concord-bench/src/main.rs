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
    let cli = Cli::parse();
    concord_server::startup::run_main(concord_bench::run(cli.args))
}
