//! `xpyd bench engine`.

use crate::cli::EngineArgs;
use anyhow::Result;
use clap::Args;

/// Flags of `xpyd bench engine`.
#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Runs the benchmark.
pub fn run(_args: &BenchEngineArgs) -> Result<()> {
    anyhow::bail!("bench engine: not built yet")
}
