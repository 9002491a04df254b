//! `xpyd bench compare`: the same workload against an aggregated and a disaggregated
//! cluster (each started from its manifest through `xpyd up`), unloaded latency first,
//! then a sweep of rates; attainment and goodput on a grid of SLOs derived from the
//! unloaded latency, the disaggregated/aggregated ratios, JSON and SVG plots.

use super::{
    GOODPUT_ATTAINMENT, Point, WorkloadArgs, emit, finite, measure_at, print_table, runtime,
    write_records,
};
use crate::cluster::{Cluster, ClusterSpec};
use crate::host::Host;
use crate::loadgen::{Arrival, Prompts};
use crate::plot::{Chart, Series};
use crate::stats::{self, RequestRecord, Slo, Summary};
use crate::workload::parse_rate;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// TTFT SLOs as multiples of the unloaded TTFT.
const TTFT_FACTORS: [f64; 2] = [3.0, 5.0];
/// TPOT SLOs as multiples of the unloaded TPOT.
const TPOT_FACTORS: [f64; 3] = [1.5, 2.0, 3.0];
/// Requests of the unloaded (one at a time) measurement.
const UNLOADED_REQUESTS: usize = 8;
/// Prompt set of the unloaded measurement (rate points use their index).
const UNLOADED_POINT: u64 = 1 << 20;

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

/// What every mode's run shares.
struct Run<'a> {
    rt: &'a tokio::runtime::Runtime,
    prompts: &'a Prompts,
    a: &'a CompareArgs,
    host: &'a Host,
}

fn run_mode(run: &Run<'_>, name: &str, manifest: &Path, rates: &mut Vec<f64>) -> Result<Mode> {
    let Run {
        rt,
        prompts,
        a,
        host,
    } = *run;
    eprintln!("== {name}: starting {}", manifest.display());
    let cluster = Cluster::start(ClusterSpec {
        exe: &host.exe,
        manifest,
        model: &a.work.model_path(host)?,
        ready_timeout: Duration::from_secs(600),
    })?;
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
        let workers = count_workers(&cluster.topology()?)?.max(1) as f64;
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
fn count_workers(v: &Value) -> Result<usize> {
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
///
/// # Errors
/// When the model cannot be found, a cluster does not start, unloaded requests fail,
/// or writing a result fails.
pub fn compare(a: &CompareArgs, host: &Host) -> Result<()> {
    let rt = runtime()?;
    let prompts = a.work.prompts(host)?;
    let run = Run {
        rt: &rt,
        prompts: &prompts,
        a,
        host,
    };
    let mut rates = a.rates.clone();
    let agg = run_mode(&run, "aggregated", &a.aggregated, &mut rates)?;
    let dis = run_mode(&run, "disaggregated", &a.disaggregated, &mut rates)?;
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
