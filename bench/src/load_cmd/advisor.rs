//! `xpyd bench advisor`: the ratio advisor's validation instrument. For each budget of N
//! workers and each workload it starts a cluster per split — xP(N−x)D for every x and
//! aggregated ×N — of mock workers whose latency follows a measured profile (the same
//! service model the simulator uses), with real processes and real KV transfers, and
//! finds each split's goodput by search — the clusters of a case run side by side and
//! their searches take turns, a rate point each, so the machine's drift over the case
//! falls on every split alike. It asks `xpyd recommend` for its split on the
//! same profile, workload and SLO, and reports the advisor's regret (how much goodput
//! the recommended split loses against the best measured one) beside the split NVIDIA
//! Dynamo's SLA-planner formula gives (replicas = ⌈demand / per-engine rate at the
//! SLO⌉ for each role) and its measured goodput.

use super::{
    GOODPUT_ATTAINMENT, Point, Searched, Target, WorkloadArgs, emit, finite, measure_at, parse_slo,
    runtime, search_goodputs, write_records,
};
use crate::cluster::{Cluster, ClusterSpec};
use crate::host::Host;
use crate::loadgen::Arrival;
use crate::loadgen::Prompts;
use crate::stats::{GoodputSearch, RequestRecord, Slo};
use crate::workload::{LengthDist, parse_rate};
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use xpyd_planner::advisor::{Finished, calibration_solved};
use xpyd_planner::search::{self, RunStats};
use xpyd_planner::service::ServiceModel;
use xpyd_planner::sim::{ClusterConfig, Layout, Policy};
use xpyd_planner::traffic::{Process, Traffic};

/// The workloads of the validation, each with an SLO that the profile can meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Chat-like: prompts 32–256 tokens, outputs 24–96; TTFT ≤ 3 s, TPOT ≤ 60 ms.
    Chat,
    /// Long input: prompts 256–512 tokens, outputs 8–32; TTFT ≤ 6 s, TPOT ≤ 60 ms.
    LongInput,
    /// Long output: prompts 16–64 tokens, outputs 128–256; TTFT ≤ 3 s, TPOT ≤ 60 ms.
    LongOutput,
    /// Short both ways with a loose TPOT, where pooling wins: prompts 8–32 tokens,
    /// outputs 8–32; TTFT ≤ 1 s, TPOT ≤ 100 ms.
    Short,
    /// `--input` and `--output` with `--slo`.
    Custom,
}

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Preset::Chat => "chat",
            Preset::LongInput => "long-input",
            Preset::LongOutput => "long-output",
            Preset::Short => "short",
            Preset::Custom => "custom",
        }
    }

    /// Input, output and SLO; `None` for `custom`.
    fn spec(self) -> Option<(&'static str, &'static str, Slo)> {
        let slo = |ttft, tpot| Slo { ttft, tpot };
        Some(match self {
            Preset::Chat => ("uniform:32-256", "uniform:24-96", slo(3.0, 0.06)),
            Preset::LongInput => ("uniform:256-512", "uniform:8-32", slo(6.0, 0.06)),
            Preset::LongOutput => ("uniform:16-64", "uniform:128-256", slo(3.0, 0.06)),
            Preset::Short => ("uniform:8-32", "uniform:8-32", slo(1.0, 0.1)),
            Preset::Custom => return None,
        })
    }
}

/// Flags of `xpyd bench advisor`.
#[derive(Debug, Args)]
pub struct AdvisorArgs {
    /// The performance profile the mock workers and the advisor both use (`xpyd bench
    /// profile --out P`; `xpyd up` caches one per model under
    /// `~/.cache/xpyd/profiles/`).
    #[arg(long, required_unless_present = "measure_profile")]
    pub profile: Option<PathBuf>,
    /// Measure the profile in the run instead, before each case (`xpyd bench profile
    /// --threads 1 --chunks CHUNK`, pinned to core 0 with `--engine real`, as the
    /// workers run), so it describes the machine as the case finds it: a profile
    /// measured hours before can be 1.5× off on a shared VM.
    #[arg(long, conflicts_with = "profile")]
    pub measure_profile: bool,
    /// Budgets (workers) to validate.
    #[arg(long, value_delimiter = ',', default_value = "4",
          value_parser = clap::value_parser!(u32).range(2..=16))]
    pub budgets: Vec<u32>,
    /// Workloads.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chat,long-input,long-output,short"
    )]
    pub workloads: Vec<Preset>,
    /// The SLO of every workload, `TTFT_S,TPOT_S` in seconds (default: each preset's).
    #[arg(long, value_parser = parse_slo)]
    pub slo: Option<Slo>,
    /// Prompt tokens of `custom`.
    #[arg(long, default_value = "uniform:32-256")]
    pub input: LengthDist,
    /// Output tokens of `custom`.
    #[arg(long, default_value = "uniform:24-96")]
    pub output: LengthDist,
    /// Requests per rate point.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// At least this many seconds of arrivals per rate point (more requests than
    /// `--requests` at a high rate), so each point reaches the queue its rate keeps.
    #[arg(long, default_value_t = 0)]
    pub min_seconds: u64,
    /// Seed of lengths, prompt text and arrival times (and of the simulation).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The search stops when a goodput is bracketed within this share (0.05: 5%).
    #[arg(long, default_value_t = 0.05, value_parser = parse_rate)]
    pub tolerance: f64,
    /// Most rate points per split.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_points: u32,
    /// Also measure every split at these multiples of its measured goodput (e.g.
    /// `0.3,0.6,0.9`), for the simulator-against-measurement table; the search's own
    /// points are compared too.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub validate_at: Vec<f64>,
    /// Calibrate every split before its search: measure it once at this share of its
    /// predicted goodput (`--requests` requests drawn from a seed of their own), solve
    /// the per-role factors at which the simulator replays that run's mean TTFT and
    /// TPOT (the online advisor's calibration, `calibration_solved`), and compare
    /// every point with the calibrated simulation as well as with the profile's.
    #[arg(long, value_parser = parse_rate)]
    pub calibrate_at: Option<f64>,
    /// Decode slots per worker (`max_running`), in the clusters and the simulation.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_running: u32,
    /// Prefill chunk (tokens), in the clusters and the simulation.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=8192))]
    pub chunk: u32,
    /// Workers: `mock` (timed by `--profile`'s fits, one thread each, unpinned) or
    /// `real` (the model, one thread each, every worker pinned to a core of its own —
    /// as `xpyd bench compare` runs them; the budget must fit the cores). With `real`,
    /// the profile should be measured the same way (`xpyd bench profile --threads 1
    /// --cpus 0`, or `--measure-profile`): the simulation is validated against real
    /// processes.
    #[arg(long, value_enum, default_value = "mock")]
    pub engine: Workers,
    /// Model file whose tokenizer the mock workers and the prompts use (default: the
    /// fetched default model).
    #[arg(long, env = xpyd_runtime::env::MODEL)]
    pub model: Option<PathBuf>,
    /// Directory for manifests, the JSON result and the records.
    #[arg(long, default_value = "bench-out/advisor")]
    pub out_dir: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What the clusters of `xpyd bench advisor` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workers {
    /// Mock engines timed by the profile.
    Mock,
    /// The real model, one pinned core per worker.
    Real,
}

/// A split of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Disaggregated { prefill: u32, decode: u32 },
    Aggregated(u32),
}

impl Split {
    fn all(budget: u32) -> Vec<Split> {
        (1..budget)
            .map(|x| Split::Disaggregated {
                prefill: x,
                decode: budget - x,
            })
            .chain([Split::Aggregated(budget)])
            .collect()
    }

    fn name(self) -> String {
        match self {
            Split::Disaggregated { prefill, decode } => format!("{prefill}P{decode}D"),
            Split::Aggregated(n) => format!("aggregated ×{n}"),
        }
    }

    fn file_name(self) -> String {
        match self {
            Split::Disaggregated { prefill, decode } => format!("{prefill}p{decode}d"),
            Split::Aggregated(n) => format!("agg{n}"),
        }
    }

    fn layout(self) -> Layout {
        match self {
            Split::Disaggregated { prefill, decode } => Layout::Disaggregated { prefill, decode },
            Split::Aggregated(workers) => Layout::Aggregated { workers },
        }
    }

    /// The split of a row of `xpyd recommend --json`.
    fn of_row(row: &Value) -> Option<Split> {
        let n = |k: &str| row[k].as_u64().and_then(|x| u32::try_from(x).ok());
        match (n("prefill")?, n("decode")?, n("aggregated")?) {
            (0, 0, w) if w > 0 => Some(Split::Aggregated(w)),
            (p, d, 0) if p > 0 && d > 0 => Some(Split::Disaggregated {
                prefill: p,
                decode: d,
            }),
            _ => None,
        }
    }

    /// A manifest of this split: mock workers following `profile`, or real ones with a
    /// core each (prefill workers on the first cores, then decode).
    fn manifest(self, profile: &Path, a: &AdvisorArgs, kv_blocks: u32) -> String {
        let (mr, chunk) = (a.max_running, a.chunk);
        let engine = |first: u32, n: u32| match a.engine {
            Workers::Mock => format!(
                "engine: mock, mock_profile: \"{}\", threads: 1",
                profile.display()
            ),
            Workers::Real => format!(
                "threads: 1, cpus: \"{first}-{}\", pin: replica",
                first + n - 1
            ),
        };
        let head = "coordinator: { http_port: 0, grpc_port: 0 }\n";
        match self {
            Split::Disaggregated { prefill, decode } => format!(
                "name: adv-{}\nmodel: default\nmode: disaggregated\n{head}kv: {{ backend: auto }}\n\
                 roles:\n  prefill: {{ replicas: {prefill}, {}, prefill_chunk: {chunk}, prefix_cache_blocks: 0 }}\n  \
                 decode: {{ replicas: {decode}, {}, max_running: {mr}, kv_blocks: {kv_blocks} }}\n",
                self.file_name(),
                engine(0, prefill),
                engine(prefill, decode),
            ),
            Split::Aggregated(n) => format!(
                "name: adv-{}\nmodel: default\nmode: single\n{head}routing: {{ decode: least_connections }}\n\
                 roles:\n  combined: {{ replicas: {n}, {}, max_running: {mr}, kv_blocks: {kv_blocks}, prefill_chunk: {chunk}, prefix_cache_blocks: 0 }}\n",
                self.file_name(),
                engine(0, n),
            ),
        }
    }
}

/// KV blocks of a decode or combined worker: `max_running` of the workload's longest
/// requests, a block to spare each — so the KV never binds (the simulation's default
/// pool is larger still), and the clusters of a case, all up at once, stay within
/// memory (a worker's default pool of 32,768 f32 tokens is 1.5 GB of shared memory).
fn kv_blocks(work: &WorkloadArgs, max_running: u32) -> u32 {
    let longest = work.input.max() + work.output.max();
    let per_request = longest.div_ceil(xpyd_planner::sim::DEFAULT_BLOCK_SIZE as usize) + 1;
    (u32::try_from(per_request).unwrap_or(u32::MAX))
        .saturating_mul(max_running)
        .max(16)
}

/// The split Dynamo's SLA planner would run for `budget` workers: per-engine rates at
/// the SLO from the profile — a prefill engine serves `1 / prefill_time(mean prompt)`
/// requests/s (when that meets the TTFT SLO), a decode engine the largest batch whose
/// step meets the TPOT SLO, `batch / step` tokens/s — and per role `⌈demand / rate⌉`
/// replicas at the highest demand the budget holds; workers left over go one at a time
/// to the role with the higher load per replica. `None` when no engine meets the SLO.
fn dynamo_split(
    m: &ServiceModel,
    (mean_in, mean_out): (f64, f64),
    slo: &Slo,
    max_running: u32,
    budget: u32,
) -> Option<Split> {
    let prefill_s = m.prefill_time(mean_in.round() as u32);
    if prefill_s > slo.ttft || budget < 2 {
        return None;
    }
    let context = mean_in + mean_out / 2.0;
    let (batch, step) = (1..=max_running)
        .rev()
        .map(|n| (n, m.decode_step(n, f64::from(n) * context)))
        .find(|(_, s)| *s <= slo.tpot)?;
    let decode_tokens_per_s = f64::from(batch) / step;
    // Load (engines' worth of work) per role at `rate` requests/s.
    let load = |rate: f64| (rate * prefill_s, rate * mean_out / decode_tokens_per_s);
    let need = |rate: f64| {
        let (p, d) = load(rate);
        ((p.ceil() as u32).max(1), (d.ceil() as u32).max(1))
    };
    let fits = |rate: f64| {
        let (p, d) = need(rate);
        p + d <= budget
    };
    // The highest demand the budget holds, by bisection (need grows with rate).
    let (mut lo, mut hi) = (0.0, 1.0);
    while fits(hi) {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if fits(mid) { lo = mid } else { hi = mid }
    }
    let (mut p, mut d) = need(lo);
    let (lp, ld) = load(lo);
    while p + d < budget {
        if lp / f64::from(p) >= ld / f64::from(d) {
            p += 1;
        } else {
            d += 1;
        }
    }
    Some(Split::Disaggregated {
        prefill: p,
        decode: d,
    })
}

/// What `--calibrate-at` adds to `--seed` for its own requests.
const CALIBRATION_SEED_OFFSET: u64 = 1_000;

/// One split's measurement.
struct Measured {
    split: Split,
    predicted: Option<f64>,
    found: Searched,
    /// Points at `--validate-at` multiples of the goodput.
    extra: Vec<(Point, f64)>,
    /// `--calibrate-at`: the rate measured and the factors (prefill, decode) solved.
    calibration: Option<(f64, (f64, f64))>,
}

/// The simulated cluster of a split, with the settings `xpyd recommend` uses.
fn sim_cluster(split: Split, a: &AdvisorArgs) -> ClusterConfig {
    ClusterConfig {
        max_running: a.max_running,
        prefill_policy: Policy::RoundRobin,
        decode_policy: Policy::LeastConnections,
        ..ClusterConfig::defaults(split.layout())
    }
}

/// The measured requests as the advisor's window: arrival, lengths, TTFT and TPOT.
fn window_of(records: &[RequestRecord]) -> Vec<Finished> {
    records
        .iter()
        .map(|r| Finished {
            arrival: r.sent_at,
            input: u32::try_from(r.prompt_tokens).unwrap_or(u32::MAX),
            cached: 0,
            output: u32::try_from(r.output_tokens).unwrap_or(u32::MAX),
            ttft: r.ttft.filter(|_| r.ok()).unwrap_or(f64::NAN),
            tpot: r.tpot().filter(|_| r.ok()).unwrap_or(f64::NAN),
        })
        .collect()
}

/// The simulator's run of one measured point: the same requests (lengths and Poisson
/// arrivals drawn from the same seed as the load generator's plan) on the same split.
fn simulate_point(
    model: &ServiceModel,
    split: Split,
    a: &AdvisorArgs,
    work: &WorkloadArgs,
    (rate, n): (f64, usize),
    slo: &Slo,
) -> Result<RunStats> {
    let traffic = Traffic::Generated {
        input: work.input,
        output: work.output,
        process: Process::Poisson,
        prefix_hit: 0.0,
        requests: n,
        seed: work.seed,
    };
    let r = xpyd_planner::sim::simulate(model, &sim_cluster(split, a), &traffic.at_rate(rate))
        .map_err(|e| anyhow::anyhow!("simulating {}: {e}", split.name()))?;
    let slo = search::Slo {
        ttft_s: slo.ttft,
        tpot_s: slo.tpot,
        attainment: GOODPUT_ATTAINMENT,
    };
    Ok(search::stats(&r, &slo, rate))
}

/// A measured point beside its simulation (and its calibrated simulation).
fn point_json(
    p: &Point,
    attainment: f64,
    sim: &RunStats,
    calibrated: Option<&RunStats>,
    goodput: f64,
) -> Value {
    let (ttft, tpot) = (p.summary.ttft.p90, p.summary.tpot.p90);
    let rate = p.rate.unwrap_or(f64::NAN);
    let against = |sim: &RunStats| {
        let rel = |sim: f64, real: f64| finite(sim / real - 1.0);
        json!({
            "simulated": {"ttft_p90_s": finite(sim.ttft.p90), "tpot_p90_s": finite(sim.tpot.p90),
                          "attainment": sim.attainment},
            "ttft_p90_error": rel(sim.ttft.p90, ttft),
            "tpot_p90_error": rel(sim.tpot.p90, tpot),
            "attainment_error_pp": 100.0 * (sim.attainment - attainment),
        })
    };
    let mut v = against(sim);
    v["rate"] = json!(rate);
    v["share_of_goodput"] = json!(finite(rate / goodput));
    v["measured"] = json!({"ttft_p90_s": finite(ttft), "tpot_p90_s": finite(tpot),
                           "attainment": attainment, "errors": p.summary.errors});
    if let Some(c) = calibrated {
        v["calibrated"] = against(c);
    }
    v
}

/// `xpyd recommend --json` on the case.
fn recommend(
    host: &Host,
    a: &AdvisorArgs,
    profile: &Path,
    budget: u32,
    w: &WorkloadArgs,
    slo: &Slo,
) -> Result<Value> {
    let out = Command::new(&host.exe)
        .arg("recommend")
        .arg("--profile")
        .arg(profile)
        .args(["--budget", &budget.to_string()])
        .args(["--slo", &format!("{},{}", slo.ttft * 1e3, slo.tpot * 1e3)])
        .args([
            "--input",
            &w.input.to_string(),
            "--output",
            &w.output.to_string(),
        ])
        .args(["--max-running", &a.max_running.to_string()])
        .args(["--chunk", &a.chunk.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--attainment", &GOODPUT_ATTAINMENT.to_string()])
        .arg("--json")
        .output()
        .context("running xpyd recommend")?;
    if !out.status.success() {
        bail!(
            "xpyd recommend failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("xpyd recommend printed no JSON")
}

/// Measures the profile for one case into `out`, as the case's workers run: one thread,
/// pinned to core 0 for real workers.
fn measure_profile(host: &Host, a: &AdvisorArgs, model: &Path, out: &Path) -> Result<PathBuf> {
    eprintln!("== measuring the profile into {}", out.display());
    let mut cmd = Command::new(&host.exe);
    cmd.args(["bench", "profile", "--threads", "1"])
        .args(["--prefill-chunk", &a.chunk.to_string()])
        .args(["--chunks", &a.chunk.to_string()])
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null());
    if a.engine == Workers::Real {
        cmd.args(["--cpus", "0"]);
    }
    let status = cmd.status().context("running xpyd bench profile")?;
    if !status.success() {
        bail!("xpyd bench profile failed ({status})");
    }
    std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))
}

/// `xpyd bench advisor`.
///
/// # Errors
/// When the profile or model cannot be read, a cluster does not start, the advisor
/// cannot be asked, or writing a result fails; a split that misses the SLO at every
/// rate has goodput 0, not an error.
pub fn advisor(a: &AdvisorArgs, host: &Host) -> Result<()> {
    if a.engine == Workers::Real {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(b) = a.budgets.iter().find(|&&b| b as usize > cores) {
            bail!("--budgets: {b} real workers need a core each and this machine has {cores}");
        }
    }
    let rt = runtime()?;
    let model_path = host.model(a.model.as_deref())?;
    let prompts = Prompts::new(xpyd_engine::ModelInfo::load(&model_path)?.tokenizer)?;
    let manifests = a.out_dir.join("manifests");
    std::fs::create_dir_all(&manifests)
        .with_context(|| format!("creating {}", manifests.display()))?;
    let mut cases = Vec::new();
    let mut profiles = Vec::new();
    let mut runs: Vec<(String, Vec<RequestRecord>)> = Vec::new();
    for &wl in &a.workloads {
        let (input, output, preset_slo) = match wl.spec() {
            Some((i, o, s)) => (i.parse()?, o.parse()?, Some(s)),
            None => (a.input, a.output, None),
        };
        let Some(slo) = a.slo.or(preset_slo) else {
            bail!("--slo: the custom workload needs one");
        };
        let work = WorkloadArgs {
            requests: a.requests,
            min_seconds: a.min_seconds,
            input,
            output,
            phases: Vec::new(),
            seed: a.seed,
            timeout_s: 120,
            model: Some(model_path.clone()),
        };
        for &budget in &a.budgets {
            let case = format!("{} N={budget}", wl.name());
            eprintln!(
                "\n==== {case}: {input} in, {output} out, SLO TTFT {:.0} ms, TPOT {:.0} ms",
                slo.ttft * 1e3,
                slo.tpot * 1e3
            );
            let profile = match &a.profile {
                Some(p) => {
                    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?
                }
                None => measure_profile(
                    host,
                    a,
                    &model_path,
                    &a.out_dir
                        .join(format!("profile-{}-{budget}.json", wl.name())),
                )?,
            };
            let text = std::fs::read_to_string(&profile)
                .with_context(|| format!("reading the profile {}", profile.display()))?;
            let model = xpyd_planner::profile::service_model(&text, a.chunk)
                .map_err(|e| anyhow::anyhow!("profile {}: {e}", profile.display()))?;
            profiles.push(json!({"case": case, "profile": profile}));
            let advice = recommend(host, a, &profile, budget, &work, &slo)?;
            let row = |s: Split| {
                advice["ranked"]
                    .as_array()
                    .and_then(|rows| rows.iter().find(|r| Split::of_row(r) == Some(s)))
            };
            let predicted = |s: Split| row(s).and_then(|r| r["goodput_rps"].as_f64());
            let recommended =
                Split::of_row(&advice["recommended"]).context("xpyd recommend gave no split")?;
            let dynamo = dynamo_split(
                &model,
                (input.mean(), output.mean()),
                &slo,
                a.max_running,
                budget,
            );
            // Every split's cluster runs for the whole case and the searches take turns
            // (one rate point each per round), so the machine's drift over the case
            // falls on every split alike. An idle mock cluster only sleeps.
            let splits = Split::all(budget);
            let mut clusters = Vec::new();
            for &split in &splits {
                let file = manifests.join(format!("{}.yaml", split.file_name()));
                std::fs::write(
                    &file,
                    split.manifest(&profile, a, kv_blocks(&work, a.max_running)),
                )
                .with_context(|| format!("writing {}", file.display()))?;
                eprintln!("== {case} {}: starting", split.name());
                clusters.push(Cluster::start(ClusterSpec {
                    exe: &host.exe,
                    manifest: &file,
                    model: &model_path,
                    ready_timeout: Duration::from_secs(120),
                    env: &[],
                })?);
            }
            let labels: Vec<String> = splits
                .iter()
                .map(|s| format!("{case} {} ", s.name()))
                .collect();
            let targets: Vec<_> = clusters
                .iter()
                .zip(&labels)
                .map(|(c, label)| {
                    (
                        (Target::Grpc(c.grpc.as_str()), Some(c.http.as_str())),
                        label.as_str(),
                    )
                })
                .collect();
            // Each search starts near the prediction (a pruned split: near its capacity
            // bound) so it spends its points where the boundary is.
            let starts: Vec<f64> = splits
                .iter()
                .map(|&split| {
                    let bound = row(split).and_then(|r| r["bound_rps"].as_f64());
                    predicted(split)
                        .or(bound.map(|b| 0.8 * b))
                        .filter(|r| *r > 0.0)
                        .unwrap_or(1.0)
                })
                .collect();
            let mut calibrations = vec![None; splits.len()];
            if let Some(share) = a.calibrate_at {
                // Requests of their own: the calibration run shares no draw with the
                // points it is then compared with.
                let cal_work = WorkloadArgs {
                    seed: a.seed.wrapping_add(CALIBRATION_SEED_OFFSET),
                    ..work.clone()
                };
                for (i, &(target, label)) in targets.iter().enumerate() {
                    let rate = share * starts[i];
                    let label = format!("{label}calibrate {rate:.3}/s");
                    let p = measure_at(
                        &rt,
                        &prompts,
                        &cal_work,
                        target,
                        (Arrival::Open, Some(rate)),
                        (cal_work.requests_at(rate), 200),
                        &label,
                    )?;
                    let factors = calibration_solved(
                        &model,
                        &sim_cluster(splits[i], a),
                        &window_of(&p.records),
                    )
                    .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
                    eprintln!(
                        "{label}: the profile's prefill × {:.3}, decode step × {:.3}",
                        factors.0, factors.1
                    );
                    runs.push((label, p.records));
                    calibrations[i] = Some((rate, factors));
                }
            }
            let searches = starts
                .iter()
                .map(|&start| {
                    GoodputSearch::new(
                        start,
                        GOODPUT_ATTAINMENT,
                        a.tolerance,
                        a.max_points as usize,
                    )
                })
                .collect();
            let found = search_goodputs(&rt, &prompts, &work, &targets, &slo, searches)?;
            let mut extra: Vec<Vec<(Point, f64)>> = splits.iter().map(|_| Vec::new()).collect();
            for (k, f) in a.validate_at.iter().enumerate() {
                for (i, &(target, label)) in targets.iter().enumerate() {
                    if found[i].goodput <= 0.0 {
                        continue;
                    }
                    let rate = f * found[i].goodput;
                    let label = format!("{label}validate {rate:.3}/s");
                    let p = measure_at(
                        &rt,
                        &prompts,
                        &work,
                        target,
                        (Arrival::Open, Some(rate)),
                        (work.requests_at(rate), 100 + k as u64),
                        &label,
                    )?;
                    let att = crate::stats::attainment(&p.records, &slo);
                    eprintln!("{label}: attainment {:.1}%", att * 100.0);
                    runs.push((label, p.records.clone()));
                    extra[i].push((p, att));
                }
            }
            drop(targets);
            drop(clusters);
            let mut measured = Vec::new();
            for (((split, found), extra), calibration) in
                splits.into_iter().zip(found).zip(extra).zip(calibrations)
            {
                runs.extend(
                    found
                        .records()
                        .into_iter()
                        .map(|(l, r)| (format!("{case} {} {l}", split.name()), r)),
                );
                measured.push(Measured {
                    split,
                    predicted: predicted(split),
                    found,
                    extra,
                    calibration,
                });
            }
            let validation = validation_json(&model, a, &work, &slo, &measured)?;
            let mut c = case_json(
                &case,
                wl,
                budget,
                &slo,
                &measured,
                recommended,
                dynamo,
                &work,
            );
            c["validation"] = validation;
            cases.push(c);
            // Each case is long: keep what is measured so far, should the run be cut short.
            print_case(&cases[cases.len() - 1]);
            let partial = a.out_dir.join("advisor.partial.json");
            std::fs::write(&partial, serde_json::to_string_pretty(&cases)?)
                .with_context(|| format!("writing {}", partial.display()))?;
        }
    }
    let result = json!({
        "profiles": profiles,
        "cpu": crate::engine_bench::cpu_name(),
        "workers": match a.engine {
            Workers::Mock => "mock: the profile's fits, 1 thread each, unpinned",
            Workers::Real => "real model: 1 thread each, one pinned core per worker",
        },
        "requests_per_point": a.requests,
        "min_seconds_per_point": a.min_seconds,
        "seed": a.seed,
        "tolerance": a.tolerance,
        "attainment": GOODPUT_ATTAINMENT,
        "cases": cases,
        "all_within_5_percent": cases.iter().all(|c| c["recommended_share_of_best"].as_f64().is_some_and(|x| x >= 0.95)),
    });
    eprintln!("\n==== summary");
    for c in &cases {
        print_case(c);
    }
    write_records(Some(&a.out_dir.join("records.jsonl")), &runs)?;
    emit(&result, a.json, Some(&a.out_dir.join("advisor.json")))
}

#[allow(clippy::too_many_arguments)]
fn case_json(
    case: &str,
    wl: Preset,
    budget: u32,
    slo: &Slo,
    measured: &[Measured],
    recommended: Split,
    dynamo: Option<Split>,
    work: &WorkloadArgs,
) -> Value {
    let goodput = |s: Split| {
        measured
            .iter()
            .find(|m| m.split == s)
            .map(|m| m.found.goodput)
    };
    let best = measured
        .iter()
        .max_by(|x, y| x.found.goodput.total_cmp(&y.found.goodput))
        .expect("a budget has at least two splits");
    let best_g = best.found.goodput;
    let share = |s: Split| goodput(s).filter(|_| best_g > 0.0).map(|g| g / best_g);
    json!({
        "case": case,
        "workload": wl.name(),
        "input": work.input.to_string(),
        "output": work.output.to_string(),
        "budget": budget,
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
        "splits": measured.iter().map(|m| json!({
            "split": m.split.name(),
            "predicted_goodput": m.predicted,
            "goodput": m.found.goodput,
            "goodput_below": m.found.failed_at,
            "points": m.found.points.len(),
            "calibration": m.calibration.map(|(rate, (prefill, decode))| json!({
                "rate": rate, "prefill": prefill, "decode": decode,
            })),
        })).collect::<Vec<_>>(),
        "best": best.split.name(),
        "best_goodput": best_g,
        "recommended": recommended.name(),
        "recommended_goodput": goodput(recommended),
        "recommended_share_of_best": share(recommended),
        "regret": share(recommended).map(|s| 1.0 - s),
        "dynamo": dynamo.map(Split::name),
        "dynamo_goodput": dynamo.and_then(goodput),
        "dynamo_share_of_best": dynamo.and_then(share),
    })
}

/// Every measured point of every split beside the simulator's run of the same requests.
fn validation_json(
    model: &ServiceModel,
    a: &AdvisorArgs,
    work: &WorkloadArgs,
    slo: &Slo,
    measured: &[Measured],
) -> Result<Value> {
    let mut splits = Vec::new();
    for m in measured {
        let mut points = Vec::new();
        for (p, att) in m.found.points.iter().chain(&m.extra) {
            let Some(rate) = p.rate else { continue };
            let at = (rate, p.summary.requests);
            let sim = simulate_point(model, m.split, a, work, at, slo)?;
            let calibrated = m
                .calibration
                .map(|(_, f)| {
                    simulate_point(&model.calibrated(f.0, f.1), m.split, a, work, at, slo)
                })
                .transpose()?;
            points.push(point_json(
                p,
                *att,
                &sim,
                calibrated.as_ref(),
                m.found.goodput,
            ));
        }
        points.sort_by(|x, y| {
            x["rate"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&y["rate"].as_f64().unwrap_or(0.0))
        });
        splits.push(json!({"split": m.split.name(), "points": points}));
    }
    Ok(json!(splits))
}

fn print_case(c: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:.0}%", 100.0 * x))
    };
    eprintln!(
        "\n{} (SLO TTFT {} s, TPOT {} s)",
        c["case"].as_str().unwrap_or(""),
        c["slo"]["ttft_s"],
        c["slo"]["tpot_s"]
    );
    eprintln!(
        "  {:<16} {:>10} {:>18} {:>7}",
        "split", "predicted", "measured goodput", "points"
    );
    for s in c["splits"].as_array().into_iter().flatten() {
        let measured = match s["goodput_below"].as_f64() {
            Some(hi) => format!("[{}, {hi:.3})", f(&s["goodput"])),
            None => format!(">= {}", f(&s["goodput"])),
        };
        eprintln!(
            "  {:<16} {:>10} {:>18} {:>7}",
            s["split"].as_str().unwrap_or(""),
            f(&s["predicted_goodput"]),
            measured,
            s["points"]
        );
        let cal = &s["calibration"];
        if !cal.is_null() {
            eprintln!(
                "  {:<16} calibrated at {} /s: prefill × {}, decode step × {}",
                "",
                f(&cal["rate"]),
                f(&cal["prefill"]),
                f(&cal["decode"])
            );
        }
    }
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{:.0}", 1e3 * x));
    let err = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:+.0}%", 100.0 * x))
    };
    let calibrated = c["validation"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().into_iter().flatten())
        .any(|p| p.get("calibrated").is_some());
    let tables: &[(&str, Option<&str>)] = if calibrated {
        &[
            ("measured vs sim", None),
            ("vs calibrated", Some("calibrated")),
        ]
    } else {
        &[("measured vs sim", None)]
    };
    for (title, key) in tables {
        eprintln!(
            "  {:<16} {:>8} {:>6} {:>17} {:>6} {:>17} {:>6} {:>15}",
            title, "rate", "of gp", "TTFT p90 ms", "err", "TPOT p90 ms", "err", "attainment %"
        );
        for s in c["validation"].as_array().into_iter().flatten() {
            for p in s["points"].as_array().into_iter().flatten() {
                let e = key.map_or(p, |k| &p[k]);
                let (m, q) = (&p["measured"], &e["simulated"]);
                eprintln!(
                    "  {:<16} {:>8.3} {:>6} {:>17} {:>6} {:>17} {:>6} {:>15}",
                    s["split"].as_str().unwrap_or(""),
                    p["rate"].as_f64().unwrap_or(f64::NAN),
                    pct(&p["share_of_goodput"]),
                    format!("{} / {}", ms(&m["ttft_p90_s"]), ms(&q["ttft_p90_s"])),
                    err(&e["ttft_p90_error"]),
                    format!("{} / {}", ms(&m["tpot_p90_s"]), ms(&q["tpot_p90_s"])),
                    err(&e["tpot_p90_error"]),
                    format!(
                        "{:.0} / {:.0}",
                        100.0 * m["attainment"].as_f64().unwrap_or(f64::NAN),
                        100.0 * q["attainment"].as_f64().unwrap_or(f64::NAN)
                    ),
                );
            }
        }
    }
    eprintln!(
        "  best {}; advisor {} ({} of best); Dynamo formula {} ({} of best)",
        c["best"].as_str().unwrap_or(""),
        c["recommended"].as_str().unwrap_or(""),
        pct(&c["recommended_share_of_best"]),
        c["dynamo"].as_str().unwrap_or("none"),
        pct(&c["dynamo_share_of_best"]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_budget_and_parse_back_from_recommend_rows() {
        let all = Split::all(4);
        assert_eq!(
            all.iter().map(|s| s.name()).collect::<Vec<_>>(),
            ["1P3D", "2P2D", "3P1D", "aggregated ×4"]
        );
        let row = json!({"prefill": 2, "decode": 2, "aggregated": 0});
        assert_eq!(Split::of_row(&row), Some(all[1]));
        let row = json!({"prefill": 0, "decode": 0, "aggregated": 4});
        assert_eq!(Split::of_row(&row), Some(all[3]));
        assert_eq!(
            Split::of_row(&json!({"prefill": 0, "decode": 0, "aggregated": 0})),
            None
        );
    }

    #[test]
    fn dynamo_formula_follows_the_heavier_phase() {
        let m = ServiceModel::example();
        let slo = Slo {
            ttft: 3.0,
            tpot: 0.06,
        };
        // Long prompts, short outputs: prefill engines are what demand needs.
        let long_in = dynamo_split(&m, (2000.0, 8.0), &slo, 16, 6).unwrap();
        // Short prompts, long outputs: decode engines.
        let long_out = dynamo_split(&m, (16.0, 400.0), &slo, 16, 6).unwrap();
        let prefill = |s: Split| match s {
            Split::Disaggregated { prefill, decode } => {
                assert_eq!(prefill + decode, 6);
                prefill
            }
            Split::Aggregated(_) => panic!("the formula never aggregates"),
        };
        assert!(
            prefill(long_in) > prefill(long_out),
            "{long_in:?} vs {long_out:?}"
        );
        // A TTFT SLO below one prefill: no engine meets it.
        let tight = Slo {
            ttft: 1e-4,
            tpot: 0.06,
        };
        assert_eq!(dynamo_split(&m, (2000.0, 8.0), &tight, 16, 6), None);
    }

    #[test]
    fn a_failed_request_calibrates_nothing_but_keeps_its_place_in_the_window() {
        let rec = |sent_at: f64, error: Option<&str>| RequestRecord {
            sent_at,
            prompt_tokens: 120,
            output_tokens: 3,
            ttft: Some(0.5),
            gaps: vec![0.02, 0.04],
            e2e: 0.56,
            error: error.map(str::to_string),
        };
        let w = window_of(&[rec(1.5, None), rec(2.0, Some("timed out"))]);
        assert_eq!((w[0].arrival, w[0].input, w[0].output), (1.5, 120, 3));
        assert_eq!((w[0].ttft, w[0].tpot), (0.5, 0.03));
        assert_eq!((w[1].arrival, w[1].input), (2.0, 120));
        assert!(w[1].ttft.is_nan() && w[1].tpot.is_nan());
    }

    #[test]
    fn manifests_name_the_profile_every_split_and_the_cores_of_real_workers() {
        let a = AdvisorArgs {
            profile: Some("p.json".into()),
            measure_profile: false,
            budgets: vec![4],
            workloads: vec![Preset::Chat],
            slo: None,
            input: "16".parse().unwrap(),
            output: "16".parse().unwrap(),
            requests: 10,
            min_seconds: 0,
            seed: 1,
            tolerance: 0.05,
            max_points: 3,
            max_running: 8,
            chunk: 128,
            engine: Workers::Mock,
            model: None,
            validate_at: vec![],
            calibrate_at: None,
            out_dir: "x".into(),
            json: false,
        };
        let p = Path::new("/tmp/prof.json");
        let dis = Split::Disaggregated {
            prefill: 1,
            decode: 3,
        }
        .manifest(p, &a, 80);
        assert!(
            dis.contains("prefill: { replicas: 1,") && dis.contains("decode: { replicas: 3,"),
            "{dis}"
        );
        assert!(
            dis.contains("mock_profile: \"/tmp/prof.json\"") && dis.contains("max_running: 8"),
            "{dis}"
        );
        assert!(dis.contains("kv_blocks: 80 }"), "{dis}");
        let agg = Split::Aggregated(4).manifest(p, &a, 80);
        assert!(
            agg.contains("mode: single") && agg.contains("combined: { replicas: 4,"),
            "{agg}"
        );
        assert!(
            agg.contains("prefill_chunk: 128") && agg.contains("kv_blocks: 80,"),
            "{agg}"
        );
        // The pool holds `max_running` of the longest requests, a block to spare each:
        // 8 × (⌈(32 + 32) / 16⌉ + 1).
        let short = WorkloadArgs {
            requests: 10,
            min_seconds: 0,
            input: "uniform:8-32".parse().unwrap(),
            output: "uniform:8-32".parse().unwrap(),
            phases: Vec::new(),
            seed: 1,
            timeout_s: 10,
            model: None,
        };
        assert_eq!(kv_blocks(&short, 8), 40);
        assert_eq!(kv_blocks(&short, 1), 16);

        // Real workers: no mock, one core each — prefill first, then decode.
        let real = AdvisorArgs {
            engine: Workers::Real,
            ..a
        };
        let cpus = |m: &str, role: &str| {
            let line = m.lines().find(|l| l.contains(role)).unwrap();
            let list = line
                .split("cpus: \"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            assert!(line.contains("pin: replica"), "{line}");
            xpyd_engine::compute::parse_cpu_list(list).unwrap()
        };
        let dis = Split::Disaggregated {
            prefill: 1,
            decode: 3,
        }
        .manifest(p, &real, 80);
        assert!(!dis.contains("mock"), "{dis}");
        assert_eq!(cpus(&dis, "prefill:"), [0]);
        assert_eq!(cpus(&dis, "decode:"), [1, 2, 3]);
        let agg = Split::Aggregated(2).manifest(p, &real, 80);
        assert_eq!(cpus(&agg, "combined:"), [0, 1]);
    }
}
