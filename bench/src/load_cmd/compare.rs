//! `xpyd bench compare`: the same workload against an aggregated and a disaggregated
//! cluster (each started from its manifest through `xpyd up`): unloaded latency first,
//! then one SLO (given, or derived from the slower mode's unloaded latency), and each
//! mode's goodput at it found by search — the rate doubled or halved until attainment
//! crosses 90%, then bisected until the bracket is within the tolerance, the two
//! clusters up side by side and their searches taking turns — so the
//! disaggregated/aggregated ratio is measured, not bounded by a fixed grid. JSON, the
//! records and SVG plots.

use super::{
    GOODPUT_ATTAINMENT, Point, Searched, Target, WorkloadArgs, emit, finite, measure_at, parse_slo,
    print_table, runtime, search_goodputs, write_records,
};
use crate::cluster::{Cluster, ClusterSpec};
use crate::host::Host;
use crate::loadgen::{Arrival, Prompts};
use crate::plot::{Chart, Series};
use crate::stats::{GoodputSearch, RequestRecord, Slo};
use crate::workload::parse_rate;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Requests of the unloaded (one at a time) measurement.
const UNLOADED_REQUESTS: usize = 8;
/// Prompt set of the unloaded measurement (search points use their index).
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
    /// The SLO, `TTFT_S,TPOT_S` in seconds; default: `--ttft-factor` and
    /// `--tpot-factor` times the slower mode's unloaded TTFT and TPOT.
    #[arg(long, value_parser = parse_slo)]
    pub slo: Option<Slo>,
    /// Derived TTFT SLO as a multiple of the unloaded TTFT.
    #[arg(long, default_value_t = 5.0, value_parser = parse_rate)]
    pub ttft_factor: f64,
    /// Derived TPOT SLO as a multiple of the unloaded TPOT.
    #[arg(long, default_value_t = 2.0, value_parser = parse_rate)]
    pub tpot_factor: f64,
    /// First rate of both searches (requests/s); default: the aggregated mode's workers
    /// over its unloaded end-to-end latency.
    #[arg(long, value_parser = parse_rate)]
    pub start_rate: Option<f64>,
    /// The search stops when the goodput is bracketed within this share (0.05: 5%).
    #[arg(long, default_value_t = 0.05, value_parser = parse_rate)]
    pub tolerance: f64,
    /// Most rate points per mode.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_points: u32,
    /// Workload.
    #[command(flatten)]
    pub work: WorkloadArgs,
    /// Directory for the JSON result, the records and the SVG plots.
    #[arg(long, default_value = "bench-out")]
    pub out_dir: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One mode's measurements.
struct Mode {
    name: &'static str,
    manifest: PathBuf,
    unloaded: Point,
    found: Searched,
}

/// What every mode's run shares.
struct Run<'a> {
    rt: &'a tokio::runtime::Runtime,
    prompts: &'a Prompts,
    a: &'a CompareArgs,
    host: &'a Host,
}

impl Run<'_> {
    fn start(&self, name: &str, manifest: &Path) -> Result<Cluster> {
        eprintln!("== {name}: starting {}", manifest.display());
        Cluster::start(ClusterSpec {
            exe: &self.host.exe,
            manifest,
            model: &self.a.work.model_path(self.host)?,
            ready_timeout: Duration::from_secs(600),
            env: &[],
        })
    }

    fn unloaded(&self, name: &str, cluster: &Cluster) -> Result<Point> {
        let p = measure_at(
            self.rt,
            self.prompts,
            &self.a.work,
            (
                Target::Grpc(cluster.grpc.as_str()),
                Some(cluster.http.as_str()),
            ),
            (Arrival::Closed(1), None),
            (UNLOADED_REQUESTS, UNLOADED_POINT),
            &format!("{name} unloaded"),
        )?;
        if p.summary.errors > 0 {
            bail!("{name}: {} unloaded requests failed", p.summary.errors);
        }
        Ok(p)
    }

    /// Goodput searches on `clusters` (label, cluster), taking turns.
    fn search(
        &self,
        clusters: &[(&str, &Cluster)],
        slo: &Slo,
        start: f64,
    ) -> Result<Vec<Searched>> {
        let searches = clusters
            .iter()
            .map(|_| {
                GoodputSearch::new(
                    start,
                    GOODPUT_ATTAINMENT,
                    self.a.tolerance,
                    self.a.max_points as usize,
                )
            })
            .collect();
        let targets: Vec<_> = clusters
            .iter()
            .map(|&(label, c)| {
                (
                    (Target::Grpc(c.grpc.as_str()), Some(c.http.as_str())),
                    label,
                )
            })
            .collect();
        search_goodputs(self.rt, self.prompts, &self.a.work, &targets, slo, searches)
    }
}

/// Unloaded TTFT and TPOT: medians of requests sent one at a time.
fn unloaded_slo_base(p: &Point) -> Slo {
    Slo {
        ttft: p.summary.ttft.p50,
        tpot: p.summary.tpot.p50,
    }
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
    // Both clusters stay up for the whole run: the unloaded latencies (the aggregated
    // mode's gives the start rate), then, once the SLO is known, the two searches take
    // turns, a rate point each, so the machine's drift falls on both modes alike.
    let agg_cluster = run.start("aggregated", &a.aggregated)?;
    let agg_unloaded = run.unloaded("aggregated", &agg_cluster)?;
    // One request at a time per worker, without batching gains: a load the cluster
    // sustains, to start from.
    let workers = count_workers(&agg_cluster.topology()?)?.max(1) as f64;
    let start = a
        .start_rate
        .unwrap_or_else(|| round3(workers / agg_unloaded.summary.e2e.mean).max(0.001));
    let dis_cluster = run.start("disaggregated", &a.disaggregated)?;
    let dis_unloaded = run.unloaded("disaggregated", &dis_cluster)?;
    let (ua, ud) = (
        unloaded_slo_base(&agg_unloaded),
        unloaded_slo_base(&dis_unloaded),
    );
    // One absolute SLO for both modes: multiples of the slower unloaded value.
    let base = Slo {
        ttft: ua.ttft.max(ud.ttft),
        tpot: ua.tpot.max(ud.tpot),
    };
    let slo = a.slo.unwrap_or(Slo {
        ttft: base.ttft * a.ttft_factor,
        tpot: base.tpot * a.tpot_factor,
    });
    if !(slo.ttft.is_finite() && slo.tpot.is_finite()) {
        bail!("no SLO could be derived: the unloaded runs measured no TTFT or TPOT; give --slo");
    }
    eprintln!(
        "SLO: TTFT <= {:.0} ms, TPOT <= {:.1} ms for {:.0}% of requests; searches start at {start} requests/s",
        slo.ttft * 1e3,
        slo.tpot * 1e3,
        GOODPUT_ATTAINMENT * 100.0
    );
    let [dis_found, agg_found]: [Searched; 2] = run
        .search(
            &[
                ("disaggregated ", &dis_cluster),
                ("aggregated ", &agg_cluster),
            ],
            &slo,
            start,
        )?
        .try_into()
        .map_err(|_| anyhow::anyhow!("two searches give two results"))?;
    drop((dis_cluster, agg_cluster));
    let dis = Mode {
        name: "disaggregated",
        manifest: a.disaggregated.clone(),
        found: dis_found,
        unloaded: dis_unloaded,
    };
    let agg = Mode {
        name: "aggregated",
        manifest: a.aggregated.clone(),
        found: agg_found,
        unloaded: agg_unloaded,
    };
    let bracket = |m: &Mode| (m.found.goodput, m.found.failed_at.unwrap_or(f64::INFINITY));
    let head = GoodputRatio::of(bracket(&agg), bracket(&dis));
    let result = json!({
        "workload": a.work.describe(),
        "requests_per_point": a.work.requests,
        "unloaded": {"aggregated": ua, "disaggregated": ud},
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "attainment": GOODPUT_ATTAINMENT,
                "derived_from": a.slo.is_none().then_some(base),
                "factors": a.slo.is_none().then_some([a.ttft_factor, a.tpot_factor])},
        "search": {"start_rate": start, "tolerance": a.tolerance, "max_points": a.max_points},
        "modes": [mode_json(&agg), mode_json(&dis)],
        "goodput": {"aggregated": agg.found.goodput, "disaggregated": dis.found.goodput},
        "goodput_ratio": head.value,
        "goodput_ratio_kind": head.kind,
        "goodput_ratio_range": head.range,
    });
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    write_plots(&a.out_dir, &[&agg, &dis], &slo)?;
    let runs: Vec<(String, Vec<RequestRecord>)> = [&agg, &dis]
        .iter()
        .flat_map(|md| {
            std::iter::once((format!("{} unloaded", md.name), md.unloaded.records.clone())).chain(
                md.found
                    .records()
                    .into_iter()
                    .map(|(l, r)| (format!("{} {l}", md.name), r)),
            )
        })
        .collect();
    write_records(Some(&a.out_dir.join("records.jsonl")), &runs)?;
    print_compare(&[&agg, &dis], &result);
    emit(&result, a.json, Some(&a.out_dir.join("compare.json")))
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

fn mode_json(md: &Mode) -> Value {
    json!({
        "name": md.name,
        "manifest": md.manifest,
        "unloaded": md.unloaded,
        "points": md.found.points_json(),
        "goodput": md.found.goodput,
        "goodput_below": md.found.failed_at,
        "at_goodput": md.found.at_goodput().map(|p| &p.summary),
    })
}

/// A mode's points in rate order.
fn by_rate(md: &Mode) -> Vec<&(Point, f64)> {
    let mut v: Vec<&(Point, f64)> = md.found.points.iter().collect();
    v.sort_by(|x, y| x.0.rate.unwrap_or(0.0).total_cmp(&y.0.rate.unwrap_or(0.0)));
    v
}

fn write_plots(dir: &Path, modes: &[&Mode], slo: &Slo) -> Result<()> {
    let series = |f: &dyn Fn(&Point, f64) -> f64| -> Vec<Series> {
        modes
            .iter()
            .map(|md| Series {
                name: md.name.to_string(),
                points: by_rate(md)
                    .into_iter()
                    .filter_map(|(p, att)| Some((p.rate?, f(p, *att))))
                    .collect(),
            })
            .collect()
    };
    let att = Chart {
        title: format!(
            "SLO attainment (TTFT <= {:.0} ms, TPOT <= {:.1} ms)",
            slo.ttft * 1e3,
            slo.tpot * 1e3
        ),
        x_label: "request rate (requests/s)".into(),
        y_label: "attainment (%)".into(),
        series: series(&|_, att| 100.0 * att),
        hlines: vec![("90%".into(), 100.0 * GOODPUT_ATTAINMENT)],
    };
    let tpot = Chart {
        title: "TPOT p99".into(),
        x_label: "request rate (requests/s)".into(),
        y_label: "TPOT p99 (ms)".into(),
        series: series(&|p, _| 1000.0 * p.summary.tpot.p99),
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
                by_rate(md)
                    .into_iter()
                    .map(|(p, _)| (format!("{} {}", md.name, Searched::label(p)), p)),
            )
        })
        .collect();
    let rows: Vec<(&str, &Point)> = labels.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    print_table(&rows);
    let show = |m: &Mode| match m.found.failed_at {
        Some(hi) => format!("[{:.3}, {hi:.3})", m.found.goodput),
        None => format!(">= {:.3}", m.found.goodput),
    };
    eprintln!(
        "\ngoodput (requests/s with >= 90% within TTFT <= {:.0} ms and TPOT <= {:.1} ms):",
        r["slo"]["ttft_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        r["slo"]["tpot_s"].as_f64().unwrap_or(f64::NAN) * 1e3
    );
    for m in modes {
        eprintln!("  {:<14} {}", m.name, show(m));
    }
    eprintln!(
        "goodput_ratio {} ({}), range {}",
        r["goodput_ratio"]
            .as_f64()
            .map_or("-".into(), |x| format!("{x:.2}")),
        r["goodput_ratio_kind"],
        r["goodput_ratio_range"]
    );
}
