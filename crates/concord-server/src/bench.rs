//! `concord bench <area>`: our figure beside a baseline measured in the same run.

use clap::Args;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The area to measure: `events`.
    pub area: String,
}

/// Runs a benchmark.
///
/// # Errors
/// When the benchmark cannot run.
pub async fn run(_args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not yet")
}
