//! Command-line interface.

use crate::model_fetch::{self, DEFAULT_MODEL};
use crate::{
    bench_engine, bench_kv, bench_load, bench_overhead, bench_profile, client, generate,
    kv_harness, roles, up,
};
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use xpyd_engine::KvDtype;
use xpyd_engine::compute::{self, ComputeConfig};

/// xpyd: prefill/decode-disaggregated LLM serving.
#[derive(Debug, Parser)]
#[command(name = "xpyd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Generate a completion for one prompt in this process.
    Generate(generate::GenerateArgs),
    /// Manage model files.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// The two processes of a KV transfer (tests and benchmarks).
    #[command(hide = true)]
    KvHarness {
        #[command(subcommand)]
        cmd: kv_harness::HarnessCmd,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Start a cluster from a manifest: coordinator and workers as separate processes.
    Up(up::UpArgs),
    /// Show a running cluster's topology and load.
    Status(client::Target),
    /// Chat with a running cluster (streams the answer).
    Chat(client::ChatArgs),
    /// Run the coordinator of a manifest (started by `xpyd up`).
    Coordinator(roles::CoordinatorArgs),
    /// Run one worker of a manifest (started by `xpyd up`).
    Worker(roles::WorkerArgs),
}

#[derive(Debug, Subcommand)]
enum ModelCmd {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the models directory.
    Fetch {
        /// Models directory (default: $XPYD_MODELS or the user cache dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the path of the default model (fetching it if missing).
    Path,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Prefill and decode throughput of the engine on the real model.
    Engine(bench_engine::BenchEngineArgs),
    /// KV transfer throughput per backend between two processes, and streaming overlap.
    Kv(bench_kv::BenchKvArgs),
    /// Open- or closed-loop load against a running coordinator (optionally a goodput search).
    Load(bench_load::LoadArgs),
    /// The same workload against an aggregated and a disaggregated cluster, side by side.
    Compare(bench_load::CompareArgs),
    /// Per-role performance profiles of the real engine, with fitted models (JSON).
    Profile(bench_profile::ProfileArgs),
    /// Latency the serving path adds, against zero-latency mock workers.
    Overhead(bench_overhead::OverheadArgs),
}

/// Options shared by every command that runs the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// GGUF model file (default: the fetched default model).
    #[arg(long, env = "XPYD_MODEL")]
    pub model: Option<PathBuf>,
    /// Compute threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin compute threads to these cores, e.g. `0` or `0-1`.
    #[arg(long)]
    pub cpus: Option<String>,
    /// KV cache element type.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: KvDtype,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

impl EngineArgs {
    /// The model path, fetching the default model when none is given.
    pub fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => model_fetch::ensure(&DEFAULT_MODEL, &model_fetch::models_dir()),
        }
    }

    /// Engine configuration for these flags.
    pub fn engine_config(&self) -> Result<xpyd_engine::EngineConfig> {
        let mut cfg = xpyd_engine::EngineConfig::new(self.model_path()?);
        cfg.kv_dtype = self.kv_dtype;
        cfg.prefill_chunk = self.prefill_chunk;
        Ok(cfg)
    }

    fn compute(&self) -> Result<ComputeConfig> {
        Ok(ComputeConfig {
            threads: self.threads,
            cpus: self
                .cpus
                .as_deref()
                .map(compute::parse_cpu_list)
                .transpose()?,
        })
    }
}

impl Cli {
    /// Applies thread and pinning flags (before anything else starts threads).
    pub fn apply_compute(&self) -> Result<()> {
        let args = match &self.cmd {
            Cmd::Generate(g) => &g.engine,
            Cmd::Bench {
                cmd: BenchCmd::Engine(b),
            } => &b.engine,
            Cmd::Bench {
                cmd: BenchCmd::Profile(b),
            } => &b.engine,
            Cmd::Bench {
                cmd:
                    BenchCmd::Kv(_) | BenchCmd::Load(_) | BenchCmd::Compare(_) | BenchCmd::Overhead(_),
            } => return Ok(()),
            Cmd::KvHarness {
                cmd: kv_harness::HarnessCmd::Recv(r),
            } => &r.engine,
            Cmd::KvHarness {
                cmd: kv_harness::HarnessCmd::Send(s),
            } => &s.engine,
            Cmd::Worker(w) => {
                compute::init(&roles::worker_compute(w)?)?;
                return Ok(());
            }
            Cmd::Model { .. }
            | Cmd::KvHarness { .. }
            | Cmd::Up(_)
            | Cmd::Status(_)
            | Cmd::Chat(_)
            | Cmd::Coordinator(_) => return Ok(()),
        };
        compute::init(&args.compute()?)?;
        Ok(())
    }

    /// Runs the command.
    pub fn run(self) -> Result<()> {
        match self.cmd {
            Cmd::Generate(args) => generate::run(&args),
            Cmd::Model {
                cmd: ModelCmd::Fetch { dir },
            } => {
                let dir = dir.unwrap_or_else(model_fetch::models_dir);
                model_fetch::fetch(&DEFAULT_MODEL, &dir).map(|_| ())
            }
            Cmd::Model {
                cmd: ModelCmd::Path,
            } => {
                println!(
                    "{}",
                    model_fetch::ensure(&DEFAULT_MODEL, &model_fetch::models_dir())?.display()
                );
                Ok(())
            }
            Cmd::Bench {
                cmd: BenchCmd::Engine(args),
            } => bench_engine::run(&args),
            Cmd::Bench {
                cmd: BenchCmd::Kv(args),
            } => bench_kv::run(&args),
            Cmd::Bench {
                cmd: BenchCmd::Load(args),
            } => bench_load::load(&args),
            Cmd::Bench {
                cmd: BenchCmd::Compare(args),
            } => bench_load::compare(&args),
            Cmd::Bench {
                cmd: BenchCmd::Profile(args),
            } => bench_profile::run(&args),
            Cmd::Bench {
                cmd: BenchCmd::Overhead(args),
            } => bench_overhead::run(&args),
            Cmd::KvHarness { cmd } => kv_harness::run(cmd),
            Cmd::Up(a) => up::run(&a),
            Cmd::Status(t) => client::status(&t),
            Cmd::Chat(a) => client::chat(&a),
            Cmd::Coordinator(a) => roles::coordinator(&a),
            Cmd::Worker(a) => roles::worker(&a),
        }
    }
}
