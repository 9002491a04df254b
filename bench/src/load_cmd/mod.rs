//! `xpyd bench load` (open/closed-loop load against a running coordinator, optionally a
//! goodput search), `xpyd bench compare` (the same workload against an aggregated and a
//! disaggregated cluster started from manifests, goodput of each by search) and `xpyd
//! bench advisor` (a cluster per split of a budget, the ratio advisor's pick scored
//! against the measured best).

mod advisor;
mod compare;

pub use advisor::{AdvisorArgs, Preset, advisor};
pub use compare::{CompareArgs, compare};

use crate::cluster::scrape;
use crate::host::Host;
use crate::loadgen::{self, Arrival, Prepared, Prompts, RunOptions};
use crate::prom;
use crate::stats::{self, GoodputSearch, RequestRecord, Slo, Summary};
use crate::workload::{LengthDist, Phase, Planned, Workload, parse_rate, plan_phases};
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use xpyd_runtime::env;
use xpyd_runtime::metrics as m;

/// SLO attainment that counts as "meeting the SLO" for goodput.
const GOODPUT_ATTAINMENT: f64 = 0.9;

/// Most requests `--min-seconds` asks of one point (a search doubling its rate must not
/// plan millions).
const MAX_TIMED_REQUESTS: usize = 20_000;

/// The workload and its pacing, shared by `load` and `compare`.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Requests per run (per rate point).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Open loop: at least this many seconds of arrivals per rate point, so a point at a
    /// high rate gets more than `--requests` (rate × this). A short point ends before the
    /// queue a rate keeps has built up, which flatters a split that absorbs bursts.
    #[arg(long, default_value_t = 0)]
    pub min_seconds: u64,
    /// Prompt tokens: `N`, `uniform:LO-HI` or `longtail:LO-MEDIAN-HI`.
    #[arg(long, default_value = "uniform:32-256")]
    pub input: LengthDist,
    /// Output tokens (enforced with max_tokens and ignore_eos), same syntax.
    #[arg(long, default_value = "uniform:24-96")]
    pub output: LengthDist,
    /// Phases instead of one length mix: `N*F:IN/OUT,…` — N requests at F × the rate,
    /// with their own prompt and output lengths (a shift in the mix, a burst), one after
    /// the other; `--requests` is then their sum.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["input", "output", "requests"])]
    pub phases: Vec<Phase>,
    /// Seed of lengths, prompt text and arrival times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A request not finished after this long counts as an error.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Model file whose tokenizer makes the prompts (default: the fetched default model).
    #[arg(long, env = env::MODEL)]
    pub model: Option<PathBuf>,
}

impl WorkloadArgs {
    fn workload(&self) -> Workload {
        Workload {
            input: self.input,
            output: self.output,
            seed: self.seed,
        }
    }

    /// The workload as JSON for results: the length mix, or the phases.
    fn describe(&self) -> Value {
        if self.phases.is_empty() {
            json!(self.workload())
        } else {
            json!({"phases": self.phases, "seed": self.seed})
        }
    }

    /// Requests of one point at `rate`: `--requests`, or `--min-seconds` of arrivals
    /// when that is more (at most [`MAX_TIMED_REQUESTS`]).
    fn requests_at(&self, rate: f64) -> usize {
        let timed = (rate * self.min_seconds as f64).ceil();
        if timed.is_finite() && timed > self.requests as f64 {
            (timed as usize).min(MAX_TIMED_REQUESTS.max(self.requests))
        } else {
            self.requests
        }
    }

    /// `n` requests of the length mix, or every request of the phases, paced at `rate`.
    fn plan(&self, n: usize, rate: Option<f64>) -> Vec<Planned> {
        if self.phases.is_empty() {
            self.workload().plan(n, rate)
        } else {
            plan_phases(&self.phases, self.seed, rate)
        }
    }

    fn model_path(&self, host: &Host) -> Result<PathBuf> {
        host.model(self.model.as_deref())
    }

    fn prompts(&self, host: &Host) -> Result<Prompts> {
        let info = xpyd_engine::ModelInfo::load(&self.model_path(host)?)?;
        Ok(Prompts::new(info.tokenizer)?)
    }
}

/// Flags of `xpyd bench load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Coordinator gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub grpc: String,
    /// Drive this OpenAI-compatible server instead (its base URL, e.g.
    /// `http://127.0.0.1:8080`: xpyd's HTTP port, llama-server, vLLM…) with streamed
    /// `/v1/completions` — the same workload, greedy, `ignore_eos`.
    #[arg(long)]
    pub openai: Option<String>,
    /// The model name to ask the OpenAI server for (default: the first of its
    /// `/v1/models`).
    #[arg(long, requires = "openai")]
    pub openai_model: Option<String>,
    /// Coordinator HTTP URL, to check the bench against its Prometheus histograms.
    #[arg(long)]
    pub http: Option<String>,
    /// Open loop: Poisson arrivals at this many requests/s.
    #[arg(long, conflicts_with = "clients", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Closed loop: this many clients, each with one request in flight (default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: Option<u32>,
    /// Search the goodput (highest rate with 90% of requests within this TTFT and
    /// TPOT, in seconds, e.g. `2.0,0.1`), starting at `--rate` (default 1).
    #[arg(long, value_parser = parse_slo, conflicts_with = "clients")]
    pub goodput: Option<Slo>,
    /// Rate points the goodput search may use.
    #[arg(long, default_value_t = 6)]
    pub max_points: usize,
    /// Workload.
    #[command(flatten)]
    pub work: WorkloadArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write every request's record (TTFT, gaps, E2E, error) to this file, one JSON
    /// object per line.
    #[arg(long)]
    pub records: Option<PathBuf>,
}

fn parse_slo(s: &str) -> Result<Slo, String> {
    let bad = || format!("`{s}` is not `TTFT_S,TPOT_S` with both > 0, e.g. `2.0,0.1`");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let (ttft, tpot) = (
        a.trim().parse::<f64>().map_err(|_| bad())?,
        b.trim().parse::<f64>().map_err(|_| bad())?,
    );
    if !(ttft > 0.0 && tpot > 0.0 && ttft.is_finite() && tpot.is_finite()) {
        return Err(bad());
    }
    Ok(Slo { ttft, tpot })
}

/// One measured run: how the load was paced and what it gave.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Open-loop rate (requests/s), if open loop.
    pub rate: Option<f64>,
    /// Closed-loop clients, if closed loop.
    pub clients: Option<usize>,
    /// The summary.
    pub summary: Summary,
    /// Agreement with the coordinator's histograms, when scraped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<Value>,
    /// Every request.
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

/// Where a run's requests go.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// A coordinator's gRPC `Inference`.
    Grpc(&'a str),
    /// An OpenAI-compatible server (base URL) and the model name to ask for.
    OpenAi { base: &'a str, model: &'a str },
}

/// Runs one point: the plan, sent to `target`, with scrapes of `http` around it.
fn measure_at(
    rt: &tokio::runtime::Runtime,
    prompts: &Prompts,
    work: &WorkloadArgs,
    (target, http): (Target<'_>, Option<&str>),
    (arrival, rate): (Arrival, Option<f64>),
    (n, point): (usize, u64),
    label: &str,
) -> Result<Point> {
    let plan = work.plan(n, rate);
    let reqs: Vec<Prepared> = loadgen::prepare(prompts, &plan, work.seed, point)?;
    let before = http.map(scrape).transpose()?;
    let (url, openai_model) = match target {
        Target::Grpc(u) => (u, None),
        Target::OpenAi { base, model } => (base, Some(model.to_string())),
    };
    let opts = RunOptions {
        target: url.to_string(),
        openai_model,
        arrival,
        timeout: Duration::from_secs(work.timeout_s),
        stream: true,
        progress: true,
        label: label.to_string(),
    };
    let res = rt.block_on(loadgen::run(&reqs, &opts))?;
    let summary = stats::summarize(&res.records, res.duration);
    let prometheus = match (http, before) {
        (Some(h), Some(b)) => Some(prom_check(&b, &scrape(h)?, &summary)),
        _ => None,
    };
    Ok(Point {
        rate,
        clients: match arrival {
            Arrival::Closed(c) => Some(c),
            Arrival::Open => None,
        },
        summary,
        prometheus,
        records: res.records,
    })
}

/// A goodput found by search on a running cluster.
struct Searched {
    /// Every point measured, in order, with its attainment.
    points: Vec<(Point, f64)>,
    /// The highest rate that met the SLO below every rate that missed it (0 if none).
    goodput: f64,
    /// The lowest rate that missed it, if any: the goodput lies in `[goodput, failed_at)`.
    failed_at: Option<f64>,
}

impl Searched {
    fn points_json(&self) -> Value {
        json!(
            self.points
                .iter()
                .map(|(p, att)| json!({"point": p, "attainment": att}))
                .collect::<Vec<_>>()
        )
    }

    /// The point at the goodput (the highest rate that met the SLO), if any.
    fn at_goodput(&self) -> Option<&Point> {
        self.points
            .iter()
            .map(|(p, _)| p)
            .find(|p| self.goodput > 0.0 && p.rate == Some(self.goodput))
    }

    /// Records per point, labelled `{rate}/s`.
    fn records(&self) -> Vec<(String, Vec<RequestRecord>)> {
        self.points
            .iter()
            .map(|(p, _)| (Self::label(p), p.records.clone()))
            .collect()
    }

    fn label(p: &Point) -> String {
        format!("{:.3}/s", p.rate.unwrap_or(0.0))
    }
}

/// Bisects the open-loop rate on `target` until `search` stops (DistServe's goodput:
/// the highest rate with ≥ 90% of requests within `slo`). Point `i` of the search uses
/// prompt set `i`, so two clusters searched alike see the same requests at each step.
fn search_goodput(
    rt: &tokio::runtime::Runtime,
    prompts: &Prompts,
    work: &WorkloadArgs,
    target: (Target<'_>, Option<&str>),
    slo: &Slo,
    search: GoodputSearch,
    label: &str,
) -> Result<Searched> {
    let mut found = search_goodputs(rt, prompts, work, &[(target, label)], slo, vec![search])?;
    Ok(found.remove(0))
}

/// Goodput searches on several running clusters, interleaved: each round measures the
/// next point of every search still going, so a machine whose speed drifts over the
/// run (a shared VM's does, by about 20 % in half an hour) moves every cluster's points
/// alike instead of deciding which cluster looks better. `targets[k]` (with its label)
/// is searched by `searches[k]`.
fn search_goodputs(
    rt: &tokio::runtime::Runtime,
    prompts: &Prompts,
    work: &WorkloadArgs,
    targets: &[((Target<'_>, Option<&str>), &str)],
    slo: &Slo,
    mut searches: Vec<GoodputSearch>,
) -> Result<Vec<Searched>> {
    assert_eq!(targets.len(), searches.len(), "one search per target");
    let mut points: Vec<Vec<(Point, f64)>> = targets.iter().map(|_| Vec::new()).collect();
    stats::search_in_turns(&mut searches, |k, rate| {
        let (target, label) = targets[k];
        let p = measure_at(
            rt,
            prompts,
            work,
            target,
            (Arrival::Open, Some(rate)),
            (work.requests_at(rate), points[k].len() as u64),
            &format!("{label}rate {rate:.3}/s"),
        )?;
        let att = stats::attainment(&p.records, slo);
        eprintln!("{label}rate {rate:.3}/s: attainment {:.1}%", att * 100.0);
        points[k].push((p, att));
        Ok::<_, anyhow::Error>(att)
    })?;
    Ok(searches
        .into_iter()
        .zip(points)
        .map(|(search, points)| Searched {
            points,
            goodput: search.goodput(),
            failed_at: search.failed_at(),
        })
        .collect())
}

/// Compares the bench's p50 TTFT and TPOT with the coordinator's histograms over the
/// same window: the bucket each p50 falls in may differ by at most one.
fn prom_check(before: &str, after: &str, s: &Summary) -> Value {
    let one = |name: &str, bench_p50: f64| -> Value {
        let (Some(a), b) = (prom::histogram(after, name), prom::histogram(before, name)) else {
            return json!({"error": format!("{name} not in the scrape")});
        };
        let window = match b {
            Some(b) => match a.since(&b) {
                Ok(w) => w,
                Err(e) => return json!({"error": e.to_string()}),
            },
            None => a,
        };
        let prom_p50 = window.quantile(0.5);
        // No p50 on either side (no samples): nothing to compare.
        let (Some(bb), Some(pb)) = (window.bucket_of(bench_p50), window.bucket_of(prom_p50)) else {
            return json!({"bench_p50": finite(bench_p50), "prometheus_p50": finite(prom_p50),
                          "count": window.count, "agree": null});
        };
        let agree = bb.abs_diff(pb) <= 1;
        if !agree {
            eprintln!(
                "warning: {name}: bench p50 {bench_p50:.4}s and Prometheus p50 {prom_p50:.4}s \
                 are more than one bucket apart"
            );
        }
        json!({
            "bench_p50": bench_p50,
            "prometheus_p50": prom_p50,
            "bench_bucket_le": window.buckets[bb].0,
            "prometheus_bucket_le": window.buckets[pb].0,
            "count": window.count,
            "agree": agree,
        })
    };
    json!({
        "ttft": one(m::COORD_TTFT_SECONDS, s.ttft.p50),
        "tpot": one(m::COORD_TPOT_SECONDS, s.tpot.p50),
    })
}

/// `xpyd bench load`.
///
/// # Errors
/// When the model cannot be found, the coordinator cannot be reached, or writing a
/// result fails; failed requests are counted, not errors.
pub fn load(a: &LoadArgs, host: &Host) -> Result<()> {
    let rt = runtime()?;
    let prompts = a.work.prompts(host)?;
    let base = a.openai.as_deref().map(|b| b.trim_end_matches('/'));
    let model = match (base, &a.openai_model) {
        (None, _) => None,
        (Some(_), Some(m)) => Some(m.clone()),
        (Some(b), None) => Some(loadgen::openai_model(b)?),
    };
    let (target, url) = match (base, &model) {
        (Some(base), Some(model)) => {
            eprintln!("OpenAI-compatible server {base}, model `{model}`");
            (Target::OpenAi { base, model }, base)
        }
        _ => (Target::Grpc(&a.grpc), a.grpc.as_str()),
    };
    let target = (target, a.http.as_deref());
    let mut out = json!({"target": url, "workload": a.work.describe()});
    if let Some(m) = &model {
        out["api"] = json!("openai");
        out["model"] = json!(m);
    }
    if let Some(slo) = a.goodput {
        let search =
            GoodputSearch::new(a.rate.unwrap_or(1.0), GOODPUT_ATTAINMENT, 0.1, a.max_points);
        let found = search_goodput(&rt, &prompts, &a.work, target, &slo, search, "")?;
        out["slo"] = json!(slo);
        out["points"] = found.points_json();
        out["goodput"] = json!(found.goodput);
        out["goodput_below"] = json!(found.failed_at);
        eprintln!("goodput {:.3} requests/s at {slo:?}", found.goodput);
        write_records(a.records.as_deref(), &found.records())?;
    } else {
        let (arrival, label) = match a.rate {
            Some(r) => (Arrival::Open, format!("rate {r}/s")),
            None => {
                let c = a.clients.unwrap_or(1) as usize;
                (Arrival::Closed(c), format!("{c} clients"))
            }
        };
        let p = measure_at(
            &rt,
            &prompts,
            &a.work,
            target,
            (arrival, a.rate),
            (a.rate.map_or(a.work.requests, |r| a.work.requests_at(r)), 0),
            &label,
        )?;
        write_records(a.records.as_deref(), &[(label.clone(), p.records.clone())])?;
        print_table(&[(&label, &p)]);
        out["point"] = json!(p);
    }
    emit(&out, a.json, a.out.as_deref())
}

/// NaN and infinities as JSON null.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}
fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", x * 1000.0)
    } else {
        "-".into()
    }
}

fn print_table(rows: &[(&str, &Point)]) {
    eprintln!(
        "{:<22} {:>5} {:>4} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "run",
        "reqs",
        "err",
        "req/s",
        "tok/s",
        "TTFTp50",
        "TTFTp90",
        "TPOTp50",
        "TPOTp90",
        "TPOTp99",
        "ITLp99"
    );
    for (name, p) in rows {
        let s = &p.summary;
        eprintln!(
            "{:<22} {:>5} {:>4} {:>7.2} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            name,
            s.requests,
            s.errors,
            s.request_rate,
            s.output_token_rate,
            ms(s.ttft.p50),
            ms(s.ttft.p90),
            ms(s.tpot.p50),
            ms(s.tpot.p90),
            ms(s.tpot.p99),
            ms(s.itl.p99)
        );
    }
    eprintln!("(latencies in ms)");
}

/// Writes every record as one JSON line, tagged with the run it belongs to.
fn write_records(path: Option<&Path>, runs: &[(String, Vec<RequestRecord>)]) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let mut text = String::new();
    for (run, records) in runs {
        for r in records {
            text.push_str(&json!({"run": run, "record": r}).to_string());
            text.push('\n');
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn emit(v: &Value, json: bool, out: Option<&Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    if let Some(p) = out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if json {
        println!("{text}");
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        work: WorkloadArgs,
    }

    #[test]
    fn min_seconds_lengthens_only_the_points_it_must() {
        let w = |args: &[&str]| Cli::parse_from([&["x"], args].concat()).work;
        let plain = w(&["--requests", "150"]);
        assert_eq!(plain.requests_at(50.0), 150);
        let timed = w(&["--requests", "150", "--min-seconds", "20"]);
        assert_eq!(
            timed.requests_at(5.0),
            150,
            "100 s of arrivals is under 150"
        );
        assert_eq!(timed.requests_at(48.86), 978);
        assert_eq!(timed.requests_at(1e9), MAX_TIMED_REQUESTS);
        assert_eq!(timed.requests_at(f64::INFINITY), 150);
    }
}
