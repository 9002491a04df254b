//! `xpyd bench planner`: how fast the ratio advisor's core is — a full recommendation
//! (every split of a large budget ranked by simulated goodput) and one simulation of a
//! very large cluster under a very long workload — each beside a small baseline of the
//! same kind measured in the same run, so the ratio (how the cost grows with size) means
//! something on any machine; and the online advisor's solved calibration of a large
//! window beside the one-step ratio on the same window. Single-threaded: the planner is
//! sequential.

use crate::engine_bench::cpu_name;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;
use xpyd_planner::queueing::Capacity;
use xpyd_planner::search::{self, Slo};
use xpyd_planner::service::{FitErrors, ServiceModel};
use xpyd_planner::sim::{ClusterConfig, Layout, simulate};
use xpyd_planner::traffic::{Process, Traffic};
use xpyd_planner::workload::LengthDist;

/// Flags of `xpyd bench planner`.
#[derive(Debug, Args)]
pub struct PlannerBenchArgs {
    /// Performance profile (`xpyd bench profile` JSON); default: a built-in
    /// approximation of SmolLM2-135M on 2 threads (stated in the output).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Workers split by the large recommendation, 8..=1024.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub budget: u32,
    /// Workers of the large simulation (a quarter prefill), 10..=100000.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub workers: u32,
    /// Requests of the large simulation, 1000..=10000000.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1000..=10_000_000))]
    pub requests: u64,
    /// Requests of the window calibrated (on an even split of `--budget`), 100..=1000000.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub window: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A round-number approximation of SmolLM2-135M-Instruct Q4_1 on 2 threads of a 2-vCPU
/// Xeon (about 4 ms per prompt token, a decode step of 11 ms plus 1.6 ms per sequence):
/// the default model of this benchmark. Speed depends little on the fits' values.
fn default_model() -> ServiceModel {
    ServiceModel {
        prefill: [0.004, 0.0038, 1.2e-7],
        chunk: 256,
        decode: [0.011, 0.0016, 2.0e-6, 1.5e-7],
        transfer_latency_s: 0.0004,
        transfer_bytes_per_s: 3.0e9,
        kv_bytes_per_token: 23_040.0,
        layers: 30,
        errors: FitErrors::default(),
    }
}

fn traffic(requests: usize) -> Traffic {
    Traffic::Generated {
        input: LengthDist::Uniform { lo: 32, hi: 256 },
        output: LengthDist::Uniform { lo: 24, hi: 96 },
        process: Process::Poisson,
        prefix_hit: 0.0,
        requests,
        seed: 1,
    }
}

/// Seconds to rank every split of `budget` workers.
fn recommend(m: &ServiceModel, slo: &Slo, budget: u32) -> Result<(f64, Value)> {
    let base = ClusterConfig::defaults(Layout::Aggregated { workers: 1 });
    let t0 = Instant::now();
    let ranked = search::rank(m, &base, &traffic(1000), slo, budget, 0.05)?;
    let s = t0.elapsed().as_secs_f64();
    let best = &ranked[0];
    let sims: u32 = ranked
        .iter()
        .filter_map(|r| r.goodput.as_ref().map(|g| g.sims))
        .sum();
    Ok((
        s,
        json!({"budget": budget, "seconds": s, "recommended": best.layout.to_string(),
               "goodput_rps": best.goodput.as_ref().map(|g| g.rate), "simulations": sims,
               "splits": ranked.len()}),
    ))
}

/// Seconds to simulate `workers` workers (¼ prefill) under `requests` requests at 70 %
/// of the layout's capacity bound.
fn simulate_big(m: &ServiceModel, workers: u32, requests: usize) -> Result<(f64, Value)> {
    let prefill = (workers / 4).max(1);
    let layout = Layout::Disaggregated {
        prefill,
        decode: workers - prefill,
    };
    let c = ClusterConfig::defaults(layout);
    let t = traffic(requests);
    let cap = Capacity::of(m, &c, &traffic(2000).at_rate(1.0));
    let rate = 0.7 * cap.bound(layout);
    let reqs = t.at_rate(rate);
    let t0 = Instant::now();
    let r = simulate(m, &c, &reqs)?;
    let s = t0.elapsed().as_secs_f64();
    let finished = r
        .requests
        .iter()
        .filter(|q| q.outcome == xpyd_planner::sim::Outcome::Finished)
        .count();
    Ok((
        s,
        json!({"workers": workers, "layout": layout.to_string(), "requests": requests,
               "rate_rps": rate, "seconds": s, "finished": finished,
               "requests_per_second_simulated": requests as f64 / s}),
    ))
}

/// Seconds of the one-step and of the solved calibration of a `requests`-request window
/// that an even split of `budget` workers ran at 70 % of its capacity bound, its
/// prefill 20 % slower and its decode steps 10 % faster than the model.
fn calibrate_big(m: &ServiceModel, budget: u32, requests: usize) -> Result<(f64, f64, Value)> {
    use xpyd_planner::advisor::{Finished, calibration, calibration_solved};
    let layout = Layout::Disaggregated {
        prefill: budget / 2,
        decode: budget - budget / 2,
    };
    let c = ClusterConfig::defaults(layout);
    let cap = Capacity::of(m, &c, &traffic(2000).at_rate(1.0));
    let reqs = traffic(requests).at_rate(0.7 * cap.bound(layout));
    let truth = m.calibrated(1.2, 0.9);
    let r = simulate(&truth, &c, &reqs)?;
    let window: Vec<Finished> = reqs
        .iter()
        .zip(&r.requests)
        .map(|(q, o)| Finished::observed(q, o))
        .collect();
    let t0 = Instant::now();
    let one = calibration(m, &c, &window)?;
    let one_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let solved = calibration_solved(m, &c, &window)?;
    let solved_s = t0.elapsed().as_secs_f64();
    Ok((
        one_s,
        solved_s,
        json!({"layout": layout.to_string(), "requests": requests, "truth": [1.2, 0.9],
               "one_step": {"seconds": one_s, "factors": [one.0, one.1]},
               "solved": {"seconds": solved_s, "factors": [solved.0, solved.1]}}),
    ))
}

/// Runs `xpyd bench planner`.
///
/// # Errors
/// An unreadable profile, or a planner error on bad flags.
pub fn run(a: &PlannerBenchArgs) -> Result<()> {
    let (model, source) = match &a.profile {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the profile {}", p.display()))?;
            let m = xpyd_planner::profile::service_model(&text, 256)
                .with_context(|| format!("profile {}", p.display()))?;
            (m, p.display().to_string())
        }
        None => (
            default_model(),
            "built-in approximation of SmolLM2-135M Q4_1 on 2 threads".into(),
        ),
    };
    let slo = Slo {
        ttft_s: 2.0,
        tpot_s: 0.1,
        attainment: 0.9,
    };
    eprintln!("ranking every split of 8 and of {} workers…", a.budget);
    let (small_rank, small_rank_v) = recommend(&model, &slo, 8)?;
    let (big_rank, big_rank_v) = recommend(&model, &slo, a.budget)?;
    let base_workers = 10;
    let requests = a.requests as usize;
    let base_requests = (requests / 100).max(1000);
    eprintln!(
        "simulating {base_workers} workers × {base_requests} requests and {} workers × {} requests…",
        a.workers, a.requests
    );
    let (small_sim, small_sim_v) = simulate_big(&model, base_workers, base_requests)?;
    let (big_sim, big_sim_v) = simulate_big(&model, a.workers, requests)?;
    eprintln!(
        "calibrating a {}-request window of {} workers…",
        a.window, a.budget
    );
    let (one_cal, solved_cal, cal_v) = calibrate_big(&model, a.budget, a.window as usize)?;
    let per_req = |s: f64, n: usize| s / n as f64;
    let sim_ratio = per_req(big_sim, requests) / per_req(small_sim, base_requests);
    let out = json!({
        "kind": "xpyd-planner-bench",
        "cpu": cpu_name(),
        "threads": 1,
        "pinning": "none",
        "model": source,
        "recommendation": {"baseline": small_rank_v, "large": big_rank_v,
                           "ratio": big_rank / small_rank, "target_s": 1.0},
        "simulation": {"baseline": small_sim_v, "large": big_sim_v,
                       "per_request_ratio": sim_ratio, "target_s": 60.0},
        "calibration": cal_v,
    });
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "case", "baseline", "large", "ratio"
    );
    println!(
        "{:<44} {:>9.3}s {:>9.3}s {:>7.1}×   (target < 1 s)",
        format!("recommend: budget 8 vs {}", a.budget),
        small_rank,
        big_rank,
        big_rank / small_rank
    );
    println!(
        "{:<44} {:>9.3}s {:>9.3}s {:>7.2}×   per request (target < 60 s)",
        format!(
            "simulate: {base_workers}w×{base_requests} vs {}w×{}",
            a.workers, a.requests
        ),
        small_sim,
        big_sim,
        sim_ratio
    );
    println!(
        "{:<44} {:>9.3}s {:>9.3}s {:>7.1}×   (one step, solved)",
        format!("calibrate: {} requests, {} workers", a.window, a.budget),
        one_cal,
        solved_cal,
        solved_cal / one_cal
    );
    eprintln!("(CPU: {}; one thread, not pinned)", cpu_name());
    if let Some(p) = &a.out {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
