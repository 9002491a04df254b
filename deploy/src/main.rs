//! The `xpyd` binary: parses flags and hands off to the command modules.
#![forbid(unsafe_code)]

mod bench_cluster;
mod bench_engine;
mod bench_kv;
mod bench_load;
mod bench_overhead;
mod bench_profile;
mod cli;
mod client;
mod env;
mod generate;
mod kv_harness;
mod manifest;
mod model_fetch;
mod roles;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // Threads and pinning are process-wide and must be set before any thread starts.
    if let Err(e) = cli.apply_compute() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(64);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env::LOG)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
