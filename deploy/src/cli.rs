//! Command-line interface: parses the flags and calls into the crates — the role crates
//! through `roles`, the supervisor (`up`) and its control-plane clients (`ops`: `down`,
//! `scale`, `upgrade`, `events`), the small clients, and xpyd-bench for
//! `xpyd bench …` and the hidden `xpyd kv-harness`. What only the binary knows (where
//! it is, where the default model lives) is handed to the bench drivers as a [`Host`].

use crate::exit::UsageError;
use crate::model_fetch::{self, DEFAULT_MODEL};
use crate::{client, generate, ops, recommend, roles, supervisor};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use xpyd_bench::engine_args::EngineArgs;
use xpyd_bench::host::Host;
use xpyd_bench::{
    dashboard_bench, engine_bench, flip_bench, kv_bench, kv_harness, load_cmd, overhead,
    planner_bench, profile, quality,
};
use xpyd_engine::compute;

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
    Generate {
        #[command(flatten)]
        args: generate::GenerateArgs,
        #[command(flatten)]
        engine: EngineArgs,
    },
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
    Up(supervisor::UpArgs),
    /// Stop a running cluster gracefully (coordinator, then workers).
    Down(ops::DownArgs),
    /// Change the number of workers of a role of a running cluster.
    Scale(ops::ScaleArgs),
    /// Roll a running cluster to a changed manifest (rolled back if a new worker fails).
    Upgrade(ops::UpgradeArgs),
    /// The cluster's events: state changes, probe failures, rebuilds, scaling, upgrades.
    Events(ops::EventsArgs),
    /// The best split of a budget of workers (xPyD or aggregated) for a workload and SLOs,
    /// by simulation on a performance profile.
    Recommend(recommend::RecommendArgs),
    /// Show a running cluster's topology and load.
    Status(client::Target),
    /// Chat with a running cluster (streams the answer).
    Chat(client::ChatArgs),
    /// API keys of services with `auth: api_key` (create, list, bind, unbind, delete).
    Keys {
        #[command(subcommand)]
        cmd: crate::keys_cli::KeysCmd,
    },
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
    Engine(engine_bench::BenchEngineArgs),
    /// KV transfer throughput per backend between two processes, and streaming overlap.
    Kv(kv_bench::BenchKvArgs),
    /// Open- or closed-loop load against a running coordinator (optionally a goodput search).
    Load(load_cmd::LoadArgs),
    /// The same workload against an aggregated and a disaggregated cluster, side by side.
    Compare(load_cmd::CompareArgs),
    /// The ratio advisor against measured goodput: a mock cluster per split of a
    /// budget, the advisor's regret and the Dynamo-formula split beside it.
    Advisor(load_cmd::AdvisorArgs),
    /// Per-role performance profiles of the real engine, with fitted models (JSON).
    Profile(profile::ProfileArgs),
    /// Latency the serving path adds, against zero-latency mock workers.
    Overhead(overhead::OverheadArgs),
    /// Speed of the ratio advisor's core: a large recommendation and a large simulation.
    Planner(planner_bench::PlannerBenchArgs),
    /// A role flip (decode ⇄ prefill in place) against starting a worker, on a 1P2D cluster.
    Flip(flip_bench::FlipArgs),
    /// What an open dashboard costs the coordinator under load, and the page's load time.
    Dashboard(dashboard_bench::DashboardArgs),
    /// Perplexity on a fixed text: the serving engine, its f32 reference and llama.cpp.
    Quality(quality::QualityArgs),
}

/// The default model, fetched into the models directory when missing.
fn default_model() -> Result<PathBuf> {
    model_fetch::ensure(&DEFAULT_MODEL, &model_fetch::models_dir())
}

/// What the bench drivers need from this binary.
fn host() -> Result<Host> {
    Ok(Host {
        exe: std::env::current_exe().context("locating the xpyd binary")?,
        default_model,
    })
}

impl Cli {
    /// Applies thread and pinning flags (before anything else starts threads).
    ///
    /// # Errors
    /// A bad `--threads`/`--cpus` or a worker's manifest that cannot be used.
    pub fn apply_compute(&self) -> Result<()> {
        let args = match &self.cmd {
            Cmd::Generate { engine, .. } => engine,
            Cmd::Bench {
                cmd: BenchCmd::Engine(b),
            } => &b.engine,
            Cmd::Bench {
                cmd: BenchCmd::Profile(b),
            } => &b.engine,
            Cmd::Bench {
                cmd: BenchCmd::Quality(b),
            } => &b.engine,
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
            Cmd::Bench {
                cmd:
                    BenchCmd::Kv(_)
                    | BenchCmd::Load(_)
                    | BenchCmd::Compare(_)
                    | BenchCmd::Advisor(_)
                    | BenchCmd::Overhead(_)
                    | BenchCmd::Planner(_)
                    | BenchCmd::Flip(_)
                    | BenchCmd::Dashboard(_),
            }
            | Cmd::Model { .. }
            | Cmd::KvHarness { .. }
            | Cmd::Up(_)
            | Cmd::Down(_)
            | Cmd::Scale(_)
            | Cmd::Upgrade(_)
            | Cmd::Events(_)
            | Cmd::Recommend(_)
            | Cmd::Status(_)
            | Cmd::Chat(_)
            | Cmd::Keys { .. }
            | Cmd::Coordinator(_) => return Ok(()),
        };
        compute::init(&args.compute()?)?;
        Ok(())
    }

    /// Who this process's log lines say wrote them: (role, worker id).
    pub fn identity(&self) -> (String, Option<String>) {
        match &self.cmd {
            Cmd::Up(_) => ("supervisor".into(), None),
            Cmd::Coordinator(_) => ("coordinator".into(), None),
            Cmd::Worker(w) => {
                let role = crate::manifest::Role::from(w.role).name().to_string();
                let id = format!("{role}-{}", w.index);
                (role, Some(id))
            }
            _ => ("cli".into(), None),
        }
    }

    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command fails with; [`crate::exit::code_of`] maps it to an exit code.
    pub fn run(self) -> Result<()> {
        match self.cmd {
            Cmd::Generate { args, engine } => generate::run(&args, engine.engine_config(&host()?)?),
            Cmd::Model {
                cmd: ModelCmd::Fetch { dir },
            } => {
                let dir = dir.unwrap_or_else(model_fetch::models_dir);
                model_fetch::fetch(&DEFAULT_MODEL, &dir).map(|_| ())
            }
            Cmd::Model {
                cmd: ModelCmd::Path,
            } => {
                println!("{}", default_model()?.display());
                Ok(())
            }
            Cmd::Bench { cmd } => bench(cmd),
            Cmd::KvHarness { cmd } => kv_harness::run(cmd, &host()?),
            Cmd::Up(a) => supervisor::run(&a),
            Cmd::Down(a) => ops::down(&a),
            Cmd::Scale(a) => ops::scale(&a),
            Cmd::Upgrade(a) => ops::upgrade(&a),
            Cmd::Events(a) => ops::events(&a),
            Cmd::Recommend(a) => recommend::run(&a),
            Cmd::Status(t) => client::status(&t),
            Cmd::Chat(a) => client::chat(&a),
            Cmd::Keys { cmd } => crate::keys_cli::run(cmd),
            Cmd::Coordinator(a) => roles::coordinator(&a),
            Cmd::Worker(a) => roles::worker(&a),
        }
    }
}

/// `xpyd bench …`: checks what clap could not, then hands over to xpyd-bench.
fn bench(cmd: BenchCmd) -> Result<()> {
    let host = host()?;
    match cmd {
        BenchCmd::Engine(a) => engine_bench::run(&a, &host),
        BenchCmd::Kv(a) => kv_bench::run(&a, &host),
        BenchCmd::Load(a) => load_cmd::load(&a, &host),
        BenchCmd::Compare(a) => load_cmd::compare(&a, &host),
        BenchCmd::Advisor(a) => load_cmd::advisor(&a, &host),
        BenchCmd::Profile(a) => {
            a.validate().map_err(UsageError)?;
            profile::run(&a, &host)
        }
        BenchCmd::Overhead(a) => {
            a.validate().map_err(UsageError)?;
            overhead::run(&a, &host)
        }
        BenchCmd::Quality(a) => {
            a.validate().map_err(UsageError)?;
            quality::run(&a, &host)
        }
        BenchCmd::Planner(a) => planner_bench::run(&a),
        BenchCmd::Flip(a) => {
            a.validate().map_err(UsageError)?;
            flip_bench::run(&a, &host)
        }
        BenchCmd::Dashboard(a) => {
            a.validate().map_err(UsageError)?;
            dashboard_bench::run(&a, &host)
        }
    }
}
