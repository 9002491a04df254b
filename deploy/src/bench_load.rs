//! `xpyd bench load` (open/closed-loop load against a running coordinator, optionally a
//! goodput search) and `xpyd bench compare` (the same workload against clusters started
//! from manifests, side by side, with SLOs derived from each mode's unloaded latency).

use crate::bench_cluster::{Cluster, scrape};
use crate::client;
use crate::model_fetch::{self, DEFAULT_MODEL};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use xpyd_bench::loadgen::{self, Arrival, Prepared, Prompts, RunOptions};
use xpyd_bench::plot::{Chart, Series};
use xpyd_bench::prom;
use xpyd_bench::stats::{self, GoodputSearch, RequestRecord, Slo, Summary};
use xpyd_bench::workload::{LengthDist, Workload, parse_rate};
use xpyd_runtime::metrics as m;

/// SLO attainment that counts as "meeting the SLO" for goodput.
const GOODPUT_ATTAINMENT: f64 = 0.9;
/// TTFT SLOs as multiples of the unloaded TTFT.
const TTFT_FACTORS: [f64; 2] = [3.0, 5.0];
/// TPOT SLOs as multiples of the unloaded TPOT.
const TPOT_FACTORS: [f64; 3] = [1.5, 2.0, 3.0];
/// Requests of the unloaded (one at a time) measurement.
const UNLOADED_REQUESTS: usize = 8;
/// Prompt set of the unloaded measurement (rate points use their index).
const UNLOADED_POINT: u64 = 1 << 20;

/// The workload and its pacing, shared by `load` and `compare`.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Requests per run (per rate point).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Prompt tokens: `N`, `uniform:LO-HI` or `longtail:LO-MEDIAN-HI`.
    #[arg(long, default_value = "uniform:32-256")]
    pub input: LengthDist,
    /// Output tokens (enforced with max_tokens and ignore_eos), same syntax.
    #[arg(long, default_value = "uniform:24-96")]
    pub output: LengthDist,
    /// Seed of lengths, prompt text and arrival times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A request not finished after this long counts as an error.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Model file whose tokenizer makes the prompts (default: the fetched default model).
    #[arg(long, env = "XPYD_MODEL")]
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

    fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => model_fetch::ensure(&DEFAULT_MODEL, &model_fetch::models_dir()),
        }
    }

    fn prompts(&self) -> Result<Prompts> {
        let info = xpyd_engine::ModelInfo::load(&self.model_path()?)?;
        Ok(Prompts::new(info.tokenizer)?)
    }
}

/// Flags of `xpyd bench load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Coordinator gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub grpc: String,
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

/// Runs one point: the plan, sent to `grpc`, with scrapes of `http` around it.
fn measure_at(
    rt: &tokio::runtime::Runtime,
    prompts: &Prompts,
    work: &WorkloadArgs,
    (grpc, http): (&str, Option<&str>),
    (arrival, rate): (Arrival, Option<f64>),
    (n, point): (usize, u64),
    label: &str,
) -> Result<Point> {
    let wl = work.workload();
    let plan = wl.plan(n, rate);
    let reqs: Vec<Prepared> = loadgen::prepare(prompts, &plan, wl.seed, point)?;
    let before = http.map(scrape).transpose()?;
    let opts = RunOptions {
        target: grpc.to_string(),
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
pub fn load(a: &LoadArgs) -> Result<()> {
    let rt = runtime()?;
    let prompts = a.work.prompts()?;
    let target = (a.grpc.as_str(), a.http.as_deref());
    let mut out = json!({"target": a.grpc, "workload": a.work.workload()});
    if let Some(slo) = a.goodput {
        let mut search =
            GoodputSearch::new(a.rate.unwrap_or(1.0), GOODPUT_ATTAINMENT, 0.1, a.max_points);
        let mut points = Vec::new();
        let mut all = Vec::new();
        while let Some(rate) = search.next_rate() {
            let label = format!("rate {rate:.2}/s");
            let p = measure_at(
                &rt,
                &prompts,
                &a.work,
                target,
                (Arrival::Open, Some(rate)),
                (a.work.requests, points.len() as u64),
                &label,
            )?;
            all.push((label, p.records.clone()));
            let att = stats::attainment(&p.records, &slo);
            eprintln!("rate {rate:.3}/s: attainment {:.1}%", att * 100.0);
            search.record(rate, att);
            points.push(json!({"point": p, "attainment": att}));
        }
        out["slo"] = json!(slo);
        out["points"] = json!(points);
        out["goodput"] = json!(search.goodput());
        eprintln!("goodput {:.3} requests/s at {slo:?}", search.goodput());
        write_records(a.records.as_deref(), &all)?;
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
            (a.work.requests, 0),
            &label,
        )?;
        write_records(a.records.as_deref(), &[(label.clone(), p.records.clone())])?;
        print_table(&[(&label, &p)]);
        out["point"] = json!(p);
    }
    emit(&out, a.json, a.out.as_deref())
}

/// Flags of `xpyd bench compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Aggregated baseline manifest.
    #[arg(long, default_value = "deploy/examples/bench-single.yaml")]
    pub aggregated: PathBuf,
    /// Disaggregated manifest.
    #[arg(long, default_value = "deploy/examples/bench-1p1d.yaml")]
    pub disaggregated: PathBuf,
    /// Open-loop rates (requests/s) to measure both modes at; default: derived from
    /// the aggregated mode's unloaded latency.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub rates: Vec<f64>,
    /// Rate multipliers of the derived rates.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,1.5", value_parser = parse_rate)]
    pub rate_factors: Vec<f64>,
    /// Workload.
    #[command(flatten)]
    pub work: WorkloadArgs,
    /// Directory for the JSON result and the SVG plots.
    #[arg(long, default_value = "bench-out")]
    pub out_dir: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One mode's measurements.
struct Mode {
    name: String,
    manifest: PathBuf,
    unloaded: Point,
    points: Vec<Point>,
}

/// Unloaded TTFT and TPOT: medians of requests sent one at a time.
fn unloaded_slo_base(p: &Point) -> Slo {
    Slo {
        ttft: p.summary.ttft.p50,
        tpot: p.summary.tpot.p50,
    }
}

fn run_mode(
    rt: &tokio::runtime::Runtime,
    prompts: &Prompts,
    a: &CompareArgs,
    name: &str,
    manifest: &Path,
    rates: &mut Vec<f64>,
) -> Result<Mode> {
    eprintln!("== {name}: starting {}", manifest.display());
    let cluster = Cluster::start(manifest, &a.work.model_path()?, Duration::from_secs(600))?;
    let target = (cluster.grpc.as_str(), Some(cluster.http.as_str()));
    let unloaded = measure_at(
        rt,
        prompts,
        &a.work,
        target,
        (Arrival::Closed(1), None),
        (UNLOADED_REQUESTS, UNLOADED_POINT),
        &format!("{name} unloaded"),
    )?;
    if unloaded.summary.errors > 0 {
        bail!(
            "{name}: {} unloaded requests failed",
            unloaded.summary.errors
        );
    }
    if rates.is_empty() {
        // One request at a time per worker, without batching gains: a load the cluster
        // sustains, to scale the sweep from.
        let workers = count_workers(&cluster.http)?.max(1) as f64;
        let base = workers / unloaded.summary.e2e.mean;
        rates.extend(a.rate_factors.iter().map(|f| round3(base * f).max(0.001)));
        eprintln!("rates derived from {name}: {rates:?} requests/s");
    }
    let mut points = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        let p = measure_at(
            rt,
            prompts,
            &a.work,
            target,
            (Arrival::Open, Some(rate)),
            (a.work.requests, i as u64),
            &format!("{name} {rate}/s"),
        )?;
        points.push(p);
    }
    drop(cluster);
    Ok(Mode {
        name: name.to_string(),
        manifest: manifest.to_path_buf(),
        unloaded,
        points,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Workers that compute (prefill, decode or combined) in a cluster's `/v1/cluster`.
fn count_workers(http: &str) -> Result<usize> {
    let v = client::get_json(&format!("{http}/v1/cluster"))?;
    let roles: Vec<&str> = v["workers"]
        .as_array()
        .context("/v1/cluster has no workers")?
        .iter()
        .filter(|w| w["state"] == "ready")
        .filter_map(|w| w["role"].as_str())
        .collect();
    // Prefill and decode workers share requests; count the larger pool.
    let count = |r: &str| roles.iter().filter(|x| **x == r).count();
    Ok(count("combined").max(count("prefill")).max(count("decode")))
}

/// `xpyd bench compare`.
pub fn compare(a: &CompareArgs) -> Result<()> {
    let rt = runtime()?;
    let prompts = a.work.prompts()?;
    let mut rates = a.rates.clone();
    let agg = run_mode(&rt, &prompts, a, "aggregated", &a.aggregated, &mut rates)?;
    let dis = run_mode(
        &rt,
        &prompts,
        a,
        "disaggregated",
        &a.disaggregated,
        &mut rates,
    )?;
    // One absolute SLO grid for both modes: multiples of the slower unloaded value.
    let (ua, ud) = (
        unloaded_slo_base(&agg.unloaded),
        unloaded_slo_base(&dis.unloaded),
    );
    let base = Slo {
        ttft: ua.ttft.max(ud.ttft),
        tpot: ua.tpot.max(ud.tpot),
    };
    let grid: Vec<(String, Slo)> = TTFT_FACTORS
        .iter()
        .flat_map(|ft| {
            TPOT_FACTORS.iter().map(move |fp| {
                (
                    format!("ttft<={ft}x,tpot<={fp}x"),
                    Slo {
                        ttft: base.ttft * ft,
                        tpot: base.tpot * fp,
                    },
                )
            })
        })
        .collect();
    let modes_json: Vec<Value> = [&agg, &dis].iter().map(|md| mode_json(md, &grid)).collect();
    let goodput =
        |md: &Mode, slo: &Slo| stats::goodput_of(&attainment_points(md, slo), GOODPUT_ATTAINMENT);
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let per_slo: Vec<Value> = grid
        .iter()
        .map(|(name, slo)| {
            let (ga, gd) = (goodput(&agg, slo), goodput(&dis, slo));
            let r = GoodputRatio::of(bracket(&rates, ga), bracket(&rates, gd));
            json!({"slo": name, "ttft_s": slo.ttft, "tpot_s": slo.tpot,
                   "aggregated": ga, "disaggregated": gd, "ratio": r.value,
                   "ratio_kind": r.kind, "ratio_range": r.range})
        })
        .collect();
    // Headline: the tightest TPOT SLO (with the looser TTFT) at which either mode has
    // a goodput, and latency ratios at the highest rate both served without errors.
    let loose_ttft = base.ttft * TTFT_FACTORS[TTFT_FACTORS.len() - 1];
    let candidates: Vec<&(String, Slo)> =
        grid.iter().filter(|(_, s)| s.ttft == loose_ttft).collect();
    let (head_name, head_slo) = candidates
        .iter()
        .find(|(_, s)| goodput(&agg, s) > 0.0 || goodput(&dis, s) > 0.0)
        .or(candidates.first())
        .map(|c| (*c).clone())
        .expect("the grid holds every factor pair");
    let (ga, gd) = (goodput(&agg, &head_slo), goodput(&dis, &head_slo));
    let head = GoodputRatio::of(bracket(&rates, ga), bracket(&rates, gd));
    let mut by_rate: Vec<usize> = (0..rates.len()).collect();
    by_rate.sort_by(|&i, &j| rates[i].total_cmp(&rates[j]));
    let common = by_rate
        .into_iter()
        .rev()
        .find(|&i| agg.points[i].summary.errors == 0 && dis.points[i].summary.errors == 0);
    let at = |f: fn(&Summary) -> f64| {
        common.map(|i| finite(ratio(f(&dis.points[i].summary), f(&agg.points[i].summary))))
    };
    let result = json!({
        "workload": a.work.workload(),
        "requests_per_point": a.work.requests,
        "rates": rates,
        "unloaded": {"aggregated": ua, "disaggregated": ud},
        "slo": {"name": head_name, "ttft_s": head_slo.ttft, "tpot_s": head_slo.tpot,
                "derived_from": base, "attainment": GOODPUT_ATTAINMENT},
        "modes": modes_json,
        "goodput_ratio": head.value,
        "goodput_ratio_kind": head.kind,
        "goodput_ratio_range": head.range,
        "goodput": {"aggregated": ga, "disaggregated": gd},
        "tpot_p99_ratio": at(|s| s.tpot.p99),
        "ttft_p90_ratio": at(|s| s.ttft.p90),
        "ratios_at_rate": common.map(|i| rates[i]),
        "goodput_by_slo": per_slo,
    });
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    write_plots(&a.out_dir, &[&agg, &dis], &head_slo, &head_name)?;
    let runs: Vec<(String, Vec<RequestRecord>)> = [&agg, &dis]
        .iter()
        .flat_map(|md| {
            std::iter::once((format!("{} unloaded", md.name), md.unloaded.records.clone())).chain(
                md.points.iter().map(|p| {
                    (
                        format!("{} {}/s", md.name, p.rate.unwrap_or(0.0)),
                        p.records.clone(),
                    )
                }),
            )
        })
        .collect();
    write_records(Some(&a.out_dir.join("records.jsonl")), &runs)?;
    print_compare(&[&agg, &dis], &result);
    emit(&result, a.json, Some(&a.out_dir.join("compare.json")))
}

/// Where a goodput measured on a rate sweep really lies: at or above the highest rate
/// that met the SLO (`lo`, 0 if none did) and below the next measured rate (`hi`, or
/// unbounded when the highest rate met it).
fn bracket(rates: &[f64], goodput: f64) -> (f64, f64) {
    let hi = rates
        .iter()
        .copied()
        .filter(|r| *r > goodput)
        .fold(f64::INFINITY, f64::min);
    (goodput, hi)
}

/// Disaggregated / aggregated goodput from two brackets.
struct GoodputRatio {
    /// The point estimate (both goodputs measured), or the bound `kind` names.
    value: Option<f64>,
    /// `estimate` (both modes met the SLO at some rate; the truth lies in `range`),
    /// `lower_bound` / `upper_bound` (one mode met it at no measured rate), or `none`.
    kind: &'static str,
    /// What the sweep allows: `[low, high]`, `null` for unbounded.
    range: [Option<f64>; 2],
}

impl GoodputRatio {
    fn of((a_lo, a_hi): (f64, f64), (d_lo, d_hi): (f64, f64)) -> Self {
        let range = [finite(d_lo / a_hi), finite(d_hi / a_lo)];
        let (value, kind) = match (a_lo > 0.0, d_lo > 0.0) {
            (true, true) => (finite(d_lo / a_lo), "estimate"),
            (false, true) => (finite(d_lo / a_hi), "lower_bound"),
            (true, false) => (finite(d_hi / a_lo), "upper_bound"),
            (false, false) => (None, "none"),
        };
        GoodputRatio { value, kind, range }
    }
}

/// NaN and infinities as JSON null.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn attainment_points(md: &Mode, slo: &Slo) -> Vec<(f64, f64)> {
    md.points
        .iter()
        .filter_map(|p| Some((p.rate?, stats::attainment(&p.records, slo))))
        .collect()
}

fn mode_json(md: &Mode, grid: &[(String, Slo)]) -> Value {
    let points: Vec<Value> = md
        .points
        .iter()
        .map(|p| {
            let att: serde_json::Map<String, Value> = grid
                .iter()
                .map(|(n, s)| (n.clone(), json!(stats::attainment(&p.records, s))))
                .collect();
            json!({"point": p, "attainment": att})
        })
        .collect();
    let goodput: serde_json::Map<String, Value> = grid
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                json!(stats::goodput_of(
                    &attainment_points(md, s),
                    GOODPUT_ATTAINMENT
                )),
            )
        })
        .collect();
    json!({
        "name": md.name,
        "manifest": md.manifest,
        "unloaded": md.unloaded,
        "points": points,
        "goodput": goodput,
    })
}

fn write_plots(dir: &Path, modes: &[&Mode], slo: &Slo, slo_name: &str) -> Result<()> {
    let series = |f: &dyn Fn(&Mode, &Point) -> f64| -> Vec<Series> {
        modes
            .iter()
            .map(|md| Series {
                name: md.name.clone(),
                points: md
                    .points
                    .iter()
                    .filter_map(|p| Some((p.rate?, f(md, p))))
                    .collect(),
            })
            .collect()
    };
    let att = Chart {
        title: format!("SLO attainment ({slo_name})"),
        x_label: "request rate (requests/s)".into(),
        y_label: "attainment (%)".into(),
        series: series(&|_, p| 100.0 * stats::attainment(&p.records, slo)),
        hlines: vec![("90%".into(), 100.0 * GOODPUT_ATTAINMENT)],
    };
    let tpot = Chart {
        title: "TPOT p99".into(),
        x_label: "request rate (requests/s)".into(),
        y_label: "TPOT p99 (ms)".into(),
        series: series(&|_, p| 1000.0 * p.summary.tpot.p99),
        hlines: vec![("SLO".into(), 1000.0 * slo.tpot)],
    };
    for (file, chart) in [("attainment.svg", att), ("tpot_p99.svg", tpot)] {
        let path = dir.join(file);
        std::fs::write(&path, chart.to_svg(720, 440))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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

fn print_compare(modes: &[&Mode], r: &Value) {
    let labels: Vec<(String, &Point)> = modes
        .iter()
        .flat_map(|md| {
            std::iter::once((format!("{} unloaded", md.name), &md.unloaded)).chain(
                md.points
                    .iter()
                    .map(|p| (format!("{} {}/s", md.name, p.rate.unwrap_or(0.0)), p)),
            )
        })
        .collect();
    let rows: Vec<(&str, &Point)> = labels.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    print_table(&rows);
    eprintln!("\ngoodput (requests/s with >= 90% attainment) by SLO:");
    eprintln!(
        "{:<26} {:>11} {:>14} {:>7}",
        "slo", "aggregated", "disaggregated", "ratio"
    );
    for g in r["goodput_by_slo"].as_array().into_iter().flatten() {
        eprintln!(
            "{:<26} {:>11} {:>14} {:>7}",
            g["slo"].as_str().unwrap_or(""),
            g["aggregated"],
            g["disaggregated"],
            g["ratio"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}"))
        );
    }
    eprintln!(
        "\ngoodput_ratio {} ({}) at {}; tpot_p99_ratio {} and ttft_p90_ratio {} at {} requests/s",
        r["goodput_ratio"],
        r["goodput_ratio_kind"],
        r["slo"]["name"],
        r["tpot_p99_ratio"],
        r["ttft_p90_ratio"],
        r["ratios_at_rate"]
    );
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
