//! `xpyd recommend`: ranks every split of a budget of workers — xP(N−x)D and
//! aggregated ×N — by simulated goodput on a workload and prints the table with the
//! bottleneck of each and the recommendation. Offline, from a performance profile
//! (`xpyd bench profile`) and a workload or trace; online (`--url`), a running
//! coordinator ranks the requests of its recent windows with its own profile
//! (`POST /v1/advisor/whatif`). The planner does the work (`xpyd_planner::search`);
//! this reads files, checks flags and prints.

use crate::exit::UsageError;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use xpyd_planner::PlanError;
use xpyd_planner::search::{self, Ranked, Slo};
use xpyd_planner::sim::{ClusterConfig, Layout, Policy};
use xpyd_planner::traffic::{Process, SimRequest, Traffic};
use xpyd_planner::workload::{LengthDist, Phase};

/// Flags of `xpyd recommend`.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// Performance profile (JSON from `xpyd bench profile`); required offline.
    #[arg(long, required_unless_present = "url")]
    pub profile: Option<PathBuf>,
    /// A running coordinator's HTTP URL: rank its recent traffic with its profile.
    #[arg(long, conflicts_with_all = ["profile", "trace", "cv", "prefix_hit"])]
    pub url: Option<String>,
    /// Workers to split, 1..=128 (online: default the workers the cluster runs).
    #[arg(long, required_unless_present = "url", value_parser = clap::value_parser!(u32).range(1..=128))]
    pub budget: Option<u32>,
    /// TTFT and TPOT objectives in milliseconds, e.g. `2000,100`.
    #[arg(long, value_parser = parse_slo)]
    pub slo: (f64, f64),
    /// Share of requests that must meet both objectives (DistServe: 0.9).
    #[arg(long, default_value_t = 0.9)]
    pub attainment: f64,
    /// A recorded trace to replay instead of drawn lengths: JSON lines of
    /// `{"arrival", "input", "cached", "output"}` (e.g. the coordinator's window).
    #[arg(long, conflicts_with_all = ["input", "output", "cv", "prefix_hit", "phases"])]
    pub trace: Option<PathBuf>,
    /// Phases instead of one length mix: `N*F:IN/OUT,…` — N requests at F × the rate,
    /// with their own prompt and output lengths (a shift, a burst), Poisson arrivals.
    /// Goodput is then the base rate the phases scale.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["input", "output", "cv", "requests"])]
    pub phases: Vec<Phase>,
    /// Prompt tokens: `N`, `uniform:LO-HI` or `longtail:LO-MEDIAN-HI`.
    #[arg(long, default_value = "uniform:32-256")]
    pub input: LengthDist,
    /// Output tokens, same syntax.
    #[arg(long, default_value = "uniform:24-96")]
    pub output: LengthDist,
    /// Burstiness: gamma inter-arrival times with this coefficient of variation
    /// (default: Poisson).
    #[arg(long)]
    pub cv: Option<f64>,
    /// Share of prompt tokens found in the prefix cache, 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub prefix_hit: f64,
    /// Requests per simulated run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub requests: u64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also find the fewest workers (and their split) that meet the objectives at this
    /// rate (requests/s).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sequences per decode (or combined) worker, as the manifest's `max_running`.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_running: u32,
    /// KV blocks per decode (or combined) worker.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub kv_blocks: u32,
    /// Prefill chunk tokens (picks the profile's fit of the nearest chunk size).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk: u32,
    /// Bisection stops when the goodput bracket is within this share.
    #[arg(long, default_value_t = 0.05)]
    pub precision: f64,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn parse_slo(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("`{s}` is not `TTFT_MS,TPOT_MS` with both > 0, e.g. `2000,100`");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let ttft: f64 = a.trim().parse().map_err(|_| bad())?;
    let tpot: f64 = b.trim().parse().map_err(|_| bad())?;
    if !(ttft > 0.0 && tpot > 0.0 && ttft.is_finite() && tpot.is_finite()) {
        return Err(bad());
    }
    Ok((ttft / 1e3, tpot / 1e3))
}

/// A planner error as the CLI reports it: bad input is a usage error naming the field.
fn plan_error(e: PlanError) -> anyhow::Error {
    match e {
        PlanError::Invalid { field, reason } => {
            anyhow::Error::new(UsageError(format!("{field}: {reason}")))
        }
        other => anyhow::Error::msg(other.to_string()),
    }
}

/// Reads a JSONL trace.
fn read_trace(path: &std::path::Path) -> Result<Vec<SimRequest>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<SimRequest>(l).map_err(|e| {
                anyhow::Error::new(UsageError(format!(
                    "trace: line {} of {}: {e}",
                    i + 1,
                    path.display()
                )))
            })
        })
        .collect()
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{:.0}", x * 1e3)
    }
}

fn row_json(r: &Ranked) -> Value {
    let g = r.goodput.as_ref();
    json!({
        "layout": r.layout.to_string(),
        "prefill": match r.layout { Layout::Disaggregated { prefill, .. } => prefill, _ => 0 },
        "decode": match r.layout { Layout::Disaggregated { decode, .. } => decode, _ => 0 },
        "aggregated": match r.layout { Layout::Aggregated { workers } => workers, _ => 0 },
        "bound_rps": r.bound,
        "goodput_rps": g.map(|g| g.rate),
        "pruned": g.is_none(),
        "ttft_s": g.map(|g| json!({"p50": g.at.ttft.p50, "p90": g.at.ttft.p90, "p99": g.at.ttft.p99})),
        "tpot_s": g.map(|g| json!({"p50": g.at.tpot.p50, "p90": g.at.tpot.p90, "p99": g.at.tpot.p99})),
        "attainment": g.map(|g| g.at.attainment),
        "bottleneck": g.map(|g| g.bottleneck),
    })
}

/// Runs `xpyd recommend`.
///
/// # Errors
/// Bad flags or files (usage errors naming the field), SLOs no split can meet, or an
/// unreachable coordinator.
pub fn run(a: &RecommendArgs) -> Result<()> {
    let slo = Slo {
        ttft_s: a.slo.0,
        tpot_s: a.slo.1,
        attainment: a.attainment,
    };
    slo.validate().map_err(plan_error)?;
    let t0 = std::time::Instant::now();
    let (ranked, fewest, budget, fit) = match &a.url {
        Some(url) => online(a, url, &slo)?,
        None => offline(a, &slo)?,
    };
    let took = t0.elapsed();
    let best = &ranked[0];
    let aggregated = ranked
        .iter()
        .find(|r| matches!(r.layout, Layout::Aggregated { .. }))
        .and_then(|r| r.goodput.as_ref())
        .map(|g| g.rate);
    let best_rate = best.goodput.as_ref().map_or(0.0, |g| g.rate);
    let why = best.goodput.as_ref().map_or("", |g| g.bottleneck.explain());
    if a.json {
        let out = json!({
            "budget": budget,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment},
            "recommended": row_json(best),
            "why": format!("highest simulated goodput of the {} splits; as the rate grows past it: {why}", ranked.len()),
            "ranked": ranked.iter().map(row_json).collect::<Vec<_>>(),
            "fewest_units": fewest.map(|f| f.as_ref().map(row_json)),
            "model_fit_error": fit,
            "seconds": took.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>10} {:>10} {:>22} {:>22} {:>7}  bottleneck",
        "split", "bound r/s", "goodput", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "attain"
    );
    for r in &ranked {
        match &r.goodput {
            Some(g) => println!(
                "{:<16} {:>10.3} {:>10.3} {:>22} {:>22} {:>6.1}%  {:?}",
                r.layout.to_string(),
                r.bound,
                g.rate,
                format!(
                    "{}/{}/{}",
                    ms(g.at.ttft.p50),
                    ms(g.at.ttft.p90),
                    ms(g.at.ttft.p99)
                ),
                format!(
                    "{}/{}/{}",
                    ms(g.at.tpot.p50),
                    ms(g.at.tpot.p90),
                    ms(g.at.tpot.p99)
                ),
                100.0 * g.at.attainment,
                g.bottleneck
            ),
            None => println!(
                "{:<16} {:>10.3} {:>10}  (pruned: its capacity bound is below the best goodput)",
                r.layout.to_string(),
                r.bound,
                "-"
            ),
        }
    }
    let vs = match aggregated {
        Some(agg) if agg > 0.0 && !matches!(best.layout, Layout::Aggregated { .. }) => {
            format!(" ({:.2}× aggregated ×{budget})", best_rate / agg)
        }
        _ => String::new(),
    };
    println!(
        "\nrecommended: {} — goodput {best_rate:.3} requests/s{vs} at TTFT ≤ {:.0} ms and TPOT ≤ {:.0} ms for {:.0}% of requests",
        best.layout,
        slo.ttft_s * 1e3,
        slo.tpot_s * 1e3,
        100.0 * slo.attainment
    );
    println!("past that rate: {why}");
    if let Some(f) = fewest {
        match f {
            Some(r) => println!(
                "fewest workers for {:.3} requests/s: {} (goodput {:.3})",
                a.rate.unwrap_or_default(),
                r.layout,
                r.goodput.as_ref().map_or(0.0, |g| g.rate)
            ),
            None => println!(
                "no split of up to 128 workers reaches {:.3} requests/s",
                a.rate.unwrap_or_default()
            ),
        }
    }
    eprintln!(
        "(simulated in {:.2} s; profile fit error: prefill {:.1}%, decode {:.1}%)",
        took.as_secs_f64(),
        100.0 * fit["prefill"].as_f64().unwrap_or(f64::NAN),
        100.0 * fit["decode"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// The ranking, the fewest units (with `--rate`), the budget and the fits' errors.
type Outcome = (Vec<Ranked>, Option<Option<Ranked>>, u32, Value);

fn offline(a: &RecommendArgs, slo: &Slo) -> Result<Outcome> {
    let path = a
        .profile
        .as_ref()
        .context("--profile is required offline")?;
    let budget = a.budget.context("--budget is required offline")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the profile {}", path.display()))?;
    let model = xpyd_planner::profile::service_model(&text, a.chunk).map_err(|e| match e {
        PlanError::Invalid { field, reason } => anyhow::Error::new(UsageError(format!(
            "profile {}: {field}: {reason}",
            path.display()
        ))),
        other => plan_error(other),
    })?;
    let traffic = match &a.trace {
        Some(p) => Traffic::Trace(read_trace(p)?),
        None if !a.phases.is_empty() => Traffic::Phased {
            phases: a.phases.clone(),
            prefix_hit: a.prefix_hit,
            seed: a.seed,
        },
        None => Traffic::Generated {
            input: a.input,
            output: a.output,
            process: a.cv.map_or(Process::Poisson, |cv| Process::Gamma { cv }),
            prefix_hit: a.prefix_hit,
            requests: a.requests as usize,
            seed: a.seed,
        },
    };
    let base = ClusterConfig {
        max_running: a.max_running,
        kv_blocks: a.kv_blocks,
        prefill_policy: Policy::RoundRobin,
        decode_policy: Policy::LeastConnections,
        ..ClusterConfig::defaults(Layout::Aggregated { workers: 1 })
    };
    let ranked =
        search::rank(&model, &base, &traffic, slo, budget, a.precision).map_err(plan_error)?;
    let fewest = match a.rate {
        Some(rate) => Some(
            search::fewest_units(&model, &base, &traffic, slo, rate, 128, a.precision)
                .map_err(plan_error)?,
        ),
        None => None,
    };
    let fit = json!({"prefill": model.errors.prefill, "decode": model.errors.decode, "transfer": model.errors.transfer});
    Ok((ranked, fewest, budget, fit))
}

/// Asks the coordinator at `url` to rank its recent traffic.
fn online(a: &RecommendArgs, url: &str, slo: &Slo) -> Result<Outcome> {
    let mut body = json!({
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3, "attainment": slo.attainment},
    });
    if let Some(b) = a.budget {
        body["budget"] = json!(b);
    }
    if let Some(r) = a.rate {
        body["rate"] = json!(r);
    }
    let endpoint = format!("{}/v1/advisor/whatif", url.trim_end_matches('/'));
    let resp = xpyd_bench::http::with_auth(xpyd_bench::http::agent().post(&endpoint))
        .header("content-type", "application/json")
        .config()
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .http_status_as_error(false)
        .build()
        .send(body.to_string())
        .with_context(|| format!("POST {endpoint}"))?;
    let code = resp.status().as_u16();
    let text = resp.into_body().read_to_string()?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{endpoint}: not JSON: {text}"))?;
    if code != 200 {
        let msg = v["error"]["message"].as_str().unwrap_or(&text).to_string();
        if code == 400 {
            return Err(UsageError(format!("the coordinator: {msg}")).into());
        }
        anyhow::bail!("{endpoint}: HTTP {code}: {msg}");
    }
    let ranked: Vec<Ranked> = serde_json::from_value(v["ranked"].clone())
        .with_context(|| format!("{endpoint}: unexpected ranking"))?;
    if ranked.is_empty() {
        anyhow::bail!("{endpoint}: an empty ranking");
    }
    let fewest = match a.rate {
        Some(_) => Some(serde_json::from_value(v["fewest_units"].clone())?),
        None => None,
    };
    let budget = v["budget"].as_u64().unwrap_or(0) as u32;
    let status: Value = xpyd_bench::http::with_auth(
        xpyd_bench::http::agent().get(&format!("{}/v1/advisor", url.trim_end_matches('/'))),
    )
    .call()
    .ok()
    .and_then(|r| r.into_body().read_to_string().ok())
    .and_then(|t| serde_json::from_str(&t).ok())
    .unwrap_or(Value::Null);
    Ok((
        ranked,
        fewest,
        budget,
        status["profile"]["fit_error"].clone(),
    ))
}
