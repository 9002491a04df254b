//! `xpyd bench dashboard`: what an open dashboard costs. Against a 1P1D cluster of
//! zero-latency mock workers (so the coordinator does as much per second as it can), the
//! same closed-loop load runs with no dashboard and with `--viewers` open ones (each
//! loads the page, its assets and the history, then reads the SSE stream), in
//! alternating rounds. The coordinator's CPU seconds per request (its
//! `process_cpu_seconds_total`) with viewers over without is the cost, a ratio within the
//! run. The page's load — page, assets and history over HTTP, as a browser fetches them
//! — is timed too.

use crate::cluster::{Cluster, ClusterSpec, scrape};
use crate::host::Host;
use crate::loadgen::{self, Arrival, Prompts, RunOptions};
use crate::stats;
use crate::workload::{LengthDist, Workload};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use xpyd_runtime::env;

/// Flags of `xpyd bench dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Requests per round.
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Rounds of each kind (without and with viewers, alternating).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Open dashboards in the rounds with viewers.
    #[arg(long, default_value_t = 1)]
    pub viewers: usize,
    /// Model file for the tokenizer and KV geometry (weights are not loaded).
    #[arg(long, env = env::MODEL)]
    pub model: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl DashboardArgs {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// The problem, naming the flag.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.requests < self.concurrency || self.concurrency == 0 {
            return Err("--requests must be >= --concurrency > 0".into());
        }
        if !(1..=20).contains(&self.rounds) || !(1..=64).contains(&self.viewers) {
            return Err("--rounds must be in 1..=20 and --viewers in 1..=64".into());
        }
        Ok(())
    }
}

const CLUSTER: &str = "name: bench-dashboard
mode: disaggregated
coordinator: { http_port: 0, grpc_port: 0 }
roles:
  prefill: { replicas: 1, engine: mock, max_running: 128, prefix_cache_blocks: 0 }
  decode: { replicas: 1, engine: mock, max_running: 128 }
";

/// How long each idle stretch lasts.
const IDLE: Duration = Duration::from_secs(20);

/// What the page fetches when it opens.
const PAGE: &[&str] = &[
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/dashboard/uPlot.iife.min.js",
    "/dashboard/uPlot.min.css",
    "/v1/dashboard/history?range_s=300",
];

/// The coordinator's CPU seconds so far.
fn coordinator_cpu(http: &str) -> Result<f64> {
    let text = scrape(http)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(xpyd_runtime::metrics::PROCESS_CPU_SECONDS_TOTAL)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .context("the coordinator's /metrics has no process_cpu_seconds_total")
}

/// Fetches the page as a browser does: (seconds, bytes).
fn load_page(http: &str) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    let mut bytes = 0;
    for p in PAGE {
        bytes += crate::http::get_text(&format!("{http}{p}"), crate::http::QUICK)?.len();
    }
    Ok((t0.elapsed().as_secs_f64(), bytes))
}

/// Open dashboards: each loads the page, then reads the stream until stopped.
struct Viewers {
    stop: Arc<AtomicBool>,
    ticks: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Viewers {
    fn open(http: &str, n: usize) -> Result<Viewers> {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..n {
            load_page(http)?;
            let url = format!("{http}/v1/dashboard/stream");
            let (stop, ticks) = (stop.clone(), ticks.clone());
            let resp = crate::http::with_auth(crate::http::agent().get(&url))
                .config()
                .timeout_global(None)
                .build()
                .call()
                .with_context(|| format!("GET {url}"))?;
            threads.push(std::thread::spawn(move || {
                let mut body = resp.into_body().into_reader();
                let mut buf = vec![0u8; 64 << 10];
                while !stop.load(Ordering::Relaxed) {
                    match body.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            let n = buf[..k].windows(11).filter(|w| w == b"event: tick").count();
                            ticks.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(Viewers {
            stop,
            ticks,
            threads,
        })
    }

    /// Stops reading; the ticks received (0 for none opened).
    fn close(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        // A reader blocked in `read` wakes with the next tick (one a second).
        for t in self.threads {
            let _ = t.join();
        }
        self.ticks.load(Ordering::Relaxed)
    }
}

/// Runs the benchmark.
///
/// # Errors
/// Bad flags, a cluster that does not start, a failed request.
pub fn run(a: &DashboardArgs, host: &Host) -> Result<()> {
    a.validate().map_err(anyhow::Error::msg)?;
    let model = host.model(a.model.as_deref())?;
    let prompts = Prompts::new(xpyd_engine::ModelInfo::load(&model)?.tokenizer)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("xpyd-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("cluster.yaml");
    std::fs::write(&manifest, CLUSTER)?;
    let env = vec![(
        env::STATE_DIR.to_string(),
        dir.join("state").display().to_string(),
    )];
    let cluster = Cluster::start(ClusterSpec {
        exe: &host.exe,
        manifest: &manifest,
        model: &model,
        ready_timeout: Duration::from_secs(300),
        env: &env,
    })?;
    let mut page = Vec::new();
    for _ in 0..5 {
        page.push(load_page(&cluster.http)?);
    }
    let wl = Workload {
        input: LengthDist::Fixed { n: 32 },
        output: LengthDist::Fixed { n: 16 },
        seed: 11,
    };
    let reqs = loadgen::prepare(&prompts, &wl.plan(a.requests, None), 11, 0)?;
    // The dashboard's own cost, measured apart from the load's noise: the coordinator's
    // CPU over an idle stretch without and with the viewers.
    let idle = |viewers: usize| -> Result<f64> {
        let open = Viewers::open(&cluster.http, viewers)?;
        let cpu0 = coordinator_cpu(&cluster.http)?;
        let t0 = Instant::now();
        std::thread::sleep(IDLE);
        let cores = (coordinator_cpu(&cluster.http)? - cpu0) / t0.elapsed().as_secs_f64();
        open.close();
        Ok(cores)
    };
    let idle_without = idle(0)?;
    let idle_with = idle(a.viewers)?;
    eprintln!(
        "idle coordinator: {:.4} cores without, {:.4} cores with {} viewer(s)",
        idle_without, idle_with, a.viewers
    );
    // One warm-up round (connections, allocator) that is not counted.
    let options = |label: String| RunOptions {
        target: cluster.grpc.clone(),
        openai_model: None,
        arrival: Arrival::Closed(a.concurrency),
        timeout: Duration::from_secs(60),
        stream: true,
        progress: false,
        label,
    };
    let warm = options("warm-up".into());
    rt.block_on(loadgen::run(&reqs[..a.requests.min(500)], &warm))?;
    let mut rows = Vec::new();
    for round in 0..a.rounds {
        for viewers in [0, a.viewers] {
            let open = Viewers::open(&cluster.http, viewers)?;
            let cpu0 = coordinator_cpu(&cluster.http)?;
            let t0 = Instant::now();
            let opts = options(format!("round {round} viewers {viewers}"));
            let res = rt.block_on(loadgen::run(&reqs, &opts))?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = coordinator_cpu(&cluster.http)? - cpu0;
            let ticks = open.close();
            let failed = res.records.iter().filter(|r| !r.ok()).count();
            if failed > 0 {
                bail!("{}: {failed} requests failed", opts.label);
            }
            let row = json!({
                "round": round, "viewers": viewers, "requests": res.records.len(),
                "seconds": wall, "requests_per_s": res.records.len() as f64 / wall,
                "coordinator_cpu_s": cpu, "coordinator_cores": cpu / wall,
                "cpu_ms_per_request": cpu * 1e3 / res.records.len() as f64,
                "ticks_received": ticks,
            });
            eprintln!(
                "round {round} viewers {viewers:>2}: {:>7.0} req/s, coordinator {:.2} cores, {:.3} CPU ms/request, {ticks} ticks",
                row["requests_per_s"].as_f64().unwrap_or(0.0),
                row["coordinator_cores"].as_f64().unwrap_or(0.0),
                row["cpu_ms_per_request"].as_f64().unwrap_or(0.0),
            );
            rows.push(row);
        }
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    let per = |v: usize| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["viewers"] == v)
            .filter_map(|r| r["cpu_ms_per_request"].as_f64())
            .collect()
    };
    let (without, with) = (stats::dist(&per(0)), stats::dist(&per(a.viewers)));
    let added = with.p50 / without.p50 - 1.0;
    // The viewers' own cost (idle, apart from the load) against the coordinator's CPU
    // under load.
    let load_cores = stats::dist(
        &rows
            .iter()
            .filter(|r| r["viewers"] == 0)
            .filter_map(|r| r["coordinator_cores"].as_f64())
            .collect::<Vec<_>>(),
    )
    .p50;
    let isolated = (idle_with - idle_without) / load_cores;
    let page_s: Vec<f64> = page.iter().map(|p| p.0).collect();
    let page_d = stats::dist(&page_s);
    println!(
        "| viewers | CPU ms / request (median of {} rounds) |",
        a.rounds
    );
    println!("|---|---|");
    println!("| 0 | {:.4} |", without.p50);
    println!("| {} | {:.4} |", a.viewers, with.p50);
    println!(
        "open dashboard: {:+.2} % coordinator CPU per request under load (medians of rounds); \
         its own cost measured idle: {:+.3} % of the coordinator's {load_cores:.2} cores under load; \
         page + assets + history: {:.1} ms median ({} bytes)",
        added * 100.0,
        isolated * 100.0,
        page_d.p50 * 1e3,
        page.first().map_or(0, |p| p.1)
    );
    let out: Value = json!({
        "cpu": crate::engine_bench::cpu_name(),
        "requests": a.requests, "concurrency": a.concurrency, "rounds": a.rounds,
        "viewers": a.viewers, "rows": rows,
        "cpu_ms_per_request_p50": {"without": without.p50, "with": with.p50},
        "added_cpu_share": added,
        "idle_cores": {"without": idle_without, "with": idle_with},
        "isolated_cost_share_of_load_cpu": isolated,
        "page_load_ms_p50": page_d.p50 * 1e3,
        "page_bytes": page.first().map_or(0, |p| p.1),
    });
    let text = serde_json::to_string_pretty(&out)?;
    if let Some(p) = &a.out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{text}");
    }
    Ok(())
}
