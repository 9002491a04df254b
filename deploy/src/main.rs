//! The `xpyd` binary: parses flags, hands off to the command modules, and maps failures
//! to exit codes (see `exit`).
#![forbid(unsafe_code)]

mod cli;
mod client;
mod env;
mod exit;
mod generate;
mod keys_cli;
mod manifest;
mod model_fetch;
mod ops;
mod recommend;
mod roles;
mod supervisor;

use clap::Parser;
use std::process::ExitCode;
use xpyd_runtime::logging;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` arrive as errors too, printed to stdout.
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The kernels' level, capped on request, before anything computes.
    if let Some(v) = std::env::var_os(env::CPU_LEVEL) {
        match xpyd_engine::cpu::Level::parse(&v.to_string_lossy()) {
            Some(l) => {
                xpyd_engine::cpu::cap(l);
            }
            None => {
                eprintln!(
                    "error: {}: `{}` is not scalar, avx2 or avx512vnni",
                    env::CPU_LEVEL,
                    v.to_string_lossy()
                );
                return ExitCode::from(exit::USAGE);
            }
        }
    }
    // Threads and pinning are process-wide and must be set before any thread starts.
    if let Err(e) = cli.apply_compute() {
        eprintln!("error: {e:#}");
        return ExitCode::from(exit::USAGE);
    }
    let format = match logging::format_from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let (role, worker_id) = cli.identity();
    logging::set_identity(&role, worker_id.as_deref());
    logging::init(
        tracing_subscriber::EnvFilter::try_from_env(env::LOG)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        format,
    );
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::say(logging::Level::ERROR, &format!("error: {e:#}"));
            ExitCode::from(exit::code_of(&e))
        }
    }
}
