//! `xpyd bench overhead`: the latency the serving path adds, measured against workers
//! running the zero-latency mock engine, so nearly all of what remains is the
//! coordinator, the gRPC hops and (disaggregated) the KV hand-off. Scenarios: aggregated
//! and 1P1D × sequential and 64-way concurrent × streamed and not × 1 and 16 output
//! tokens. The aggregated mode is also measured straight against the worker's own
//! `DecodeWorker.Generate` (token ids in, no coordinator), so the coordinator's share is
//! the difference. A third cluster, aggregated behind every guard (an API key on each
//! call, an access list, a rate limit), gives the guards' cost as a ratio to the plain
//! aggregated one in the same run.

use crate::cluster::{Cluster, ClusterSpec};
use crate::host::Host;
use crate::loadgen::{self, Arrival, Prompts, RunOptions};
use crate::stats;
use crate::workload::{LengthDist, Workload};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use xpyd_runtime::env;

/// Flags of `xpyd bench overhead`.
#[derive(Debug, Args)]
pub struct OverheadArgs {
    /// Requests per sequential scenario.
    #[arg(long, default_value_t = 200)]
    pub sequential: usize,
    /// Concurrent clients of the concurrent scenarios.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Requests per concurrent scenario.
    #[arg(long, default_value_t = 640)]
    pub concurrent_requests: usize,
    /// Prompt tokens of every request.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
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

const AGGREGATED: &str = "name: overhead-single
mode: single
coordinator: { http_port: 0, grpc_port: 0 }
roles:
  combined: { replicas: 1, engine: mock, max_running: 128, prefix_cache_blocks: 0 }
";

/// The aggregated cluster behind every guard: an API key checked on each call, an
/// access list and a rate limit too high to refuse anything.
const GUARDED: &str = "name: overhead-guarded
mode: single
coordinator: { http_port: 0, grpc_port: 0, auth: api_key, rate_limit: { rps: 10000 }, access: { allow: [127.0.0.0/8] } }
roles:
  combined: { replicas: 1, engine: mock, max_running: 128, prefix_cache_blocks: 0 }
";

const DISAGGREGATED: &str = "name: overhead-1p1d
mode: disaggregated
coordinator: { http_port: 0, grpc_port: 0 }
kv: { backend: auto }
roles:
  prefill: { replicas: 1, engine: mock, max_running: 128, prefix_cache_blocks: 0 }
  decode: { replicas: 1, engine: mock, max_running: 128 }
";

impl OverheadArgs {
    /// Checks what clap cannot: consistent request counts.
    ///
    /// # Errors
    /// The problem, naming the flags.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sequential == 0
            || self.concurrency == 0
            || self.concurrent_requests < self.concurrency
        {
            return Err("--sequential and --concurrency must be > 0, \
                        --concurrent-requests >= --concurrency"
                .into());
        }
        Ok(())
    }
}

/// Runs every scenario.
///
/// # Errors
/// When the flags are inconsistent ([`OverheadArgs::validate`]), a cluster does not
/// start, or a request fails.
pub fn run(a: &OverheadArgs, host: &Host) -> Result<()> {
    a.validate().map_err(anyhow::Error::msg)?;
    let model = host.model(a.model.as_deref())?;
    let prompts = Prompts::new(xpyd_engine::ModelInfo::load(&model)?.tokenizer)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile_dir()?;
    // The guarded cluster's key store and key; every scenario's calls carry the key (a
    // service without auth ignores it), so the scenarios differ only in the guards.
    let state = dir.join("state");
    let key = std::process::Command::new(&host.exe)
        .args(["keys", "create", "--name", "overhead", "--admin", "--dir"])
        .arg(state.join("keys"))
        .output()
        .context("xpyd keys create")?;
    if !key.status.success() {
        bail!("xpyd keys create: {}", String::from_utf8_lossy(&key.stderr));
    }
    crate::http::set_bearer(String::from_utf8_lossy(&key.stdout).trim().to_string());
    let env = vec![(env::STATE_DIR.to_string(), state.display().to_string())];
    let mut rows = Vec::new();
    for (mode, yaml) in [
        ("aggregated", AGGREGATED),
        ("aggregated-guarded", GUARDED),
        ("1p1d", DISAGGREGATED),
    ] {
        let manifest = dir.join(format!("{mode}.yaml"));
        std::fs::write(&manifest, yaml).with_context(|| format!("{}", manifest.display()))?;
        eprintln!("== {mode}");
        let cluster = Cluster::start(ClusterSpec {
            exe: &host.exe,
            manifest: &manifest,
            model: &model,
            ready_timeout: Duration::from_secs(300),
            env: &env,
        })?;
        for (concurrency, n) in [(1, a.sequential), (a.concurrency, a.concurrent_requests)] {
            for stream in [true, false] {
                for out in [1usize, 16] {
                    let wl = Workload {
                        input: LengthDist::Fixed { n: a.prompt_tokens },
                        output: LengthDist::Fixed { n: out },
                        seed: 7,
                    };
                    let reqs = loadgen::prepare(&prompts, &wl.plan(n + concurrency, None), 7, 0)?;
                    let opts = RunOptions {
                        target: cluster.grpc.clone(),
                        openai_model: None,
                        arrival: Arrival::Closed(concurrency),
                        timeout: Duration::from_secs(60),
                        stream,
                        progress: true,
                        label: format!("{mode} c={concurrency} stream={stream} out={out}"),
                    };
                    // The first `concurrency` requests warm connections and are dropped.
                    let res = rt.block_on(loadgen::run(&reqs, &opts))?;
                    let kept = &res.records[concurrency..];
                    let errors = kept.iter().filter(|r| !r.ok()).count();
                    if errors > 0 {
                        bail!(
                            "{}: {errors} requests failed: {:?}",
                            opts.label,
                            kept.iter().find_map(|r| r.error.clone())
                        );
                    }
                    let e2e: Vec<f64> = kept.iter().map(|r| r.e2e).collect();
                    let ttft: Vec<f64> = kept.iter().filter_map(|r| r.ttft).collect();
                    let (d, t) = (stats::dist(&e2e), stats::dist(&ttft));
                    rows.push(json!({
                        "mode": mode, "concurrency": concurrency, "stream": stream,
                        "output_tokens": out, "requests": kept.len(),
                        "e2e_ms": {"mean": d.mean * 1e3, "p50": d.p50 * 1e3, "p99": d.p99 * 1e3},
                        "ttft_ms": {"mean": t.mean * 1e3, "p50": t.p50 * 1e3, "p99": t.p99 * 1e3},
                    }));
                }
            }
        }
        if mode == "aggregated" {
            for out in [1usize, 16] {
                let d = rt.block_on(direct(&cluster, &prompts, a, out))?;
                rows.push(json!({
                    "mode": "worker-direct", "concurrency": 1, "stream": true,
                    "output_tokens": out, "requests": d.n,
                    "e2e_ms": {"mean": d.mean * 1e3, "p50": d.p50 * 1e3, "p99": d.p99 * 1e3},
                }));
            }
        }
        drop(cluster);
    }
    // What the coordinator adds: through it minus straight to the worker, same requests.
    let find = |mode: &str, out: u64| {
        rows.iter()
            .find(|r| {
                r["mode"] == mode
                    && r["concurrency"] == 1
                    && r["stream"] == true
                    && r["output_tokens"] == out
            })
            .map(|r| r["e2e_ms"].clone())
    };
    let mut added = Vec::new();
    for out in [1u64, 16] {
        if let (Some(via), Some(direct)) = (find("aggregated", out), find("worker-direct", out)) {
            let diff = |k: &str| {
                via[k].as_f64().unwrap_or(f64::NAN) - direct[k].as_f64().unwrap_or(f64::NAN)
            };
            added.push(json!({"output_tokens": out, "mean_ms": diff("mean"), "p50_ms": diff("p50"), "p99_ms": diff("p99")}));
        }
    }
    // What the guards (API key, access list, rate limit) cost: guarded over plain, the
    // same requests in the same run.
    let mut guards = Vec::new();
    for r in rows.iter().filter(|r| r["mode"] == "aggregated-guarded") {
        let plain = rows.iter().find(|p| {
            p["mode"] == "aggregated"
                && p["concurrency"] == r["concurrency"]
                && p["stream"] == r["stream"]
                && p["output_tokens"] == r["output_tokens"]
        });
        if let Some(p) = plain {
            let ratio = |k: &str| {
                r["e2e_ms"][k].as_f64().unwrap_or(f64::NAN)
                    / p["e2e_ms"][k].as_f64().unwrap_or(f64::NAN)
            };
            guards.push(json!({
                "concurrency": r["concurrency"], "stream": r["stream"],
                "output_tokens": r["output_tokens"],
                "e2e_mean_ratio": ratio("mean"), "e2e_p50_ratio": ratio("p50"),
                "e2e_p99_ratio": ratio("p99"),
            }));
        }
    }
    let per_request = guard_cost(&dir)?;
    let plane = plane_cost();
    let coordinator_added = added
        .iter()
        .find(|a| a["output_tokens"] == 1)
        .and_then(|a| a["mean_ms"].as_f64());
    let _ = std::fs::remove_dir_all(&dir);
    print_rows(&rows);
    eprintln!(
        "guards in process: {per_request:.2} µs per request{}",
        coordinator_added.map_or(String::new(), |c| format!(
            " = {:.1} % of the {:.0} µs the coordinator adds (1 token, sequential, streamed)",
            100.0 * per_request / (c * 1e3),
            c * 1e3
        ))
    );
    eprintln!(
        "internal plane in process: {plane:.2} µs per disaggregated request (two calls \
         badged and gated, a target signed and verified){}",
        coordinator_added.map_or(String::new(), |c| format!(
            " = {:.1} % of the {:.0} µs the coordinator adds",
            100.0 * plane / (c * 1e3),
            c * 1e3
        ))
    );
    eprintln!("guards (API key + access list + rate limit), e2e guarded / plain:");
    for g in &guards {
        eprintln!(
            "  c={:<3} stream={:<5} out={:<2}  mean {:.3}  p50 {:.3}  p99 {:.3}",
            g["concurrency"],
            g["stream"],
            g["output_tokens"],
            g["e2e_mean_ratio"].as_f64().unwrap_or(f64::NAN),
            g["e2e_p50_ratio"].as_f64().unwrap_or(f64::NAN),
            g["e2e_p99_ratio"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let out = json!({
        "engine": "mock (zero latency)",
        "prompt_tokens": a.prompt_tokens,
        "client": "gRPC Inference (Generate streamed, Complete not), 127.0.0.1",
        "anchor": "NVIDIA Dynamo 1.6 frontend + mocker, 1-token: ~1.0-1.3 ms mean / 3.7-4.7 ms p99 aggregated, 3-5 ms mean / 11-14 ms p99 1P1D",
        "scenarios": rows,
        "coordinator_added_sequential_streamed": added,
        "guards_over_plain": guards,
        "guards_in_process_us_per_request": per_request,
        "guards_share_of_coordinator_added": coordinator_added.map(|c| per_request / (c * 1e3)),
        "internal_plane_in_process_us_per_disaggregated_request": plane,
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

/// What the closed internal plane costs one disaggregated request, in µs, timed over many
/// on this thread: the coordinator's credential put on its two calls (Decode, Prefill),
/// the workers' checks of it, the decode worker's signature of the target it issues and
/// the prefill worker's check of it (a target of the usual size).
fn plane_cost() -> f64 {
    use tonic::service::Interceptor;
    use xpyd_runtime::plane::{Badge, ClusterKey, Gate, TARGET};
    let key = ClusterKey::from_token("0123456789abcdef0123456789abcdef");
    let (mut badge, mut gate) = (Badge::new(Some(&key)), Gate(Some(key.clone())));
    let target = json!({"backend": "auto", "addr": "127.0.0.1:40000", "host_id": "x".repeat(70),
        "transfer_id": 1u64 << 60, "epoch": 12345, "ticket": "ab".repeat(16),
        "shm": null, "placement": {"path": "/dev/shm/xpyd-kv-1234", "len": 1u64 << 30,
        "block_size": 16, "row_bytes": 128, "pools": vec![[0u64, 1 << 20]; 30],
        "blocks": (0..16).collect::<Vec<u32>>()},
        "ucx_addr": null, "nccl_id": null, "deadline_unix_ms": 1u64 << 41})
    .to_string()
    .into_bytes();
    let n = 100_000u32;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        for _ in 0..2 {
            let r = badge.call(tonic::Request::new(())).expect("badge");
            assert!(gate.call(r).is_ok());
        }
        let mac = key.sign(TARGET, &target);
        assert!(key.verify(TARGET, &target, &mac));
    }
    t0.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// What the guards cost one request in the coordinator's process, in µs: the access
/// list, the API key (HMAC-SHA256 and a constant-time compare) and the rate limiter,
/// timed over many calls on this thread.
fn guard_cost(dir: &std::path::Path) -> Result<f64> {
    use xpyd_coordinator::{guard, keys};
    let store = keys::Store::new(dir.join("micro-keys"));
    let secret = store.create("micro", &[], false)?;
    let live = keys::Live::new(store, "svc", None)?;
    let access = guard::Access::parse(&["127.0.0.0/8".into(), "10.0.0.0/8".into()], &[])
        .map_err(anyhow::Error::msg)?;
    let limiter = guard::Limiter::new(Some(guard::RateLimit {
        rps: 10_000,
        per_instance: true,
    }));
    let header = format!("Bearer {secret}");
    let ip: std::net::IpAddr = "127.0.0.1".parse()?;
    let n = 200_000u32;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        let _ = access.check(ip);
        let _ = live.check(Some(&header), keys::Need::Service);
        let _ = limiter.admit(|| 1);
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6 / f64::from(n))
}

/// Sequential streamed requests straight to the combined worker of `cluster`.
async fn direct(
    cluster: &Cluster,
    prompts: &Prompts,
    a: &OverheadArgs,
    out: usize,
) -> Result<stats::Dist> {
    use xpyd_proto::decode_worker_client::DecodeWorkerClient;
    let v = cluster.topology()?;
    let worker = v["workers"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["role"] == "combined"))
        .and_then(|w| w["grpc_url"].as_str())
        .context("no combined worker in /v1/cluster")?
        .to_string();
    let mut client = DecodeWorkerClient::new(cluster.worker_channel(&worker).await?);
    let tokens = prompts.tokens(0, a.prompt_tokens, 7)?; // fixed: the engine caches nothing
    let mut e2e = Vec::with_capacity(a.sequential);
    for i in 0..a.sequential + 1 {
        let req = xpyd_proto::LocalGenerateRequest {
            request_id: 1 << 40 | i as u64,
            tokens: tokens.clone(),
            sampling: Some(xpyd_proto::EngineSampling {
                temperature: 0.0,
                top_p: 1.0,
                max_tokens: out as u32,
                ignore_eos: true,
                ..Default::default()
            }),
            prompt_len: 0,
        };
        let t = std::time::Instant::now();
        let mut s = client.generate(req).await?.into_inner();
        let mut got = 0;
        while let Some(ev) = s.message().await? {
            if matches!(ev.event, Some(xpyd_proto::decode_event::Event::Token(_))) {
                got += 1;
            }
        }
        if got != out {
            bail!("worker-direct: {got} of {out} tokens");
        }
        if i > 0 {
            e2e.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(stats::dist(&e2e))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("xpyd-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn print_rows(rows: &[Value]) {
    eprintln!(
        "{:<18} {:>5} {:>7} {:>4} {:>6} {:>9} {:>9} {:>9}",
        "mode", "conc", "stream", "out", "reqs", "mean ms", "p50 ms", "p99 ms"
    );
    for r in rows {
        let e = &r["e2e_ms"];
        eprintln!(
            "{:<18} {:>5} {:>7} {:>4} {:>6} {:>9.2} {:>9.2} {:>9.2}",
            r["mode"].as_str().unwrap_or(""),
            r["concurrency"].to_string(),
            r["stream"].to_string(),
            r["output_tokens"].to_string(),
            r["requests"].to_string(),
            e["mean"].as_f64().unwrap_or(f64::NAN),
            e["p50"].as_f64().unwrap_or(f64::NAN),
            e["p99"].as_f64().unwrap_or(f64::NAN)
        );
    }
    eprintln!("(end-to-end latency as the client sees it; the mock engine computes nothing)");
}
