//! `xpyd bench flip`: how long changing a worker's role takes in place — a role flip:
//! drain, the engine handed to the other role's loop, the new identity registered —
//! against the way a split changed before flips, starting a worker of the new role
//! (process start, model load, registration, readiness), in the same run, on a 1P2D
//! cluster under a light closed-loop load. Each round flips decode → prefill and back
//! through the supervisor (`POST /v1/flip`), then scales prefill up by one and back
//! down (`POST /v1/scale`). Reported: the worker's own flip times (drain, switch,
//! register, total), the time from the call until the coordinator routes to the worker
//! in its new role, and the time from the scale call until the new worker is routed —
//! medians over the rounds, and the ratio start ÷ flip. Failed requests are counted
//! (none expected).

use crate::cluster::{Cluster, ClusterSpec};
use crate::host::Host;
use crate::http::{get_json, post_json};
use crate::stats;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xpyd_runtime::env;

/// Flags of `xpyd bench flip`.
#[derive(Debug, Args)]
pub struct FlipArgs {
    /// Rounds (each: a flip there and back, a worker started and stopped), 1..=100.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Closed-loop clients keeping the cluster busy meanwhile, 0..=64.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Compute threads per worker, 1..=64.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// `real` (the model's weights) or `mock` (its tokenizer and shape only).
    #[arg(long, default_value = "real", value_parser = ["real", "mock"])]
    pub engine: String,
    /// Model file (default: the project's model).
    #[arg(long, env = env::MODEL)]
    pub model: Option<PathBuf>,
    /// Print the result as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl FlipArgs {
    /// Checks ranges.
    ///
    /// # Errors
    /// The problem, naming the flag.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(1..=100).contains(&self.rounds) {
            return Err(format!("--rounds: {} is out of range 1..=100", self.rounds));
        }
        if self.clients > 64 {
            return Err(format!(
                "--clients: {} is out of range 0..=64",
                self.clients
            ));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(format!(
                "--threads: {} is out of range 1..=64",
                self.threads
            ));
        }
        Ok(())
    }
}

/// Closed-loop clients over HTTP: counts of answered and failed requests.
struct Clients {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<(u64, Vec<String>)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(http: &str, n: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new((0u64, Vec::new())));
        let threads = (0..n)
            .map(|i| {
                let (stop, counts) = (stop.clone(), counts.clone());
                let url = format!("{http}/v1/completions");
                std::thread::spawn(move || {
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        let body = json!({"prompt": format!("Client {i}, request {k}: tell me about the sea."),
                            "max_tokens": 16, "temperature": 0});
                        let r = post_json(&url, &body, Duration::from_secs(120));
                        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                        match r {
                            Ok(v) if v["choices"][0]["text"].is_string() => c.0 += 1,
                            Ok(v) => c.1.push(v.to_string()),
                            Err(e) => c.1.push(format!("{e:#}")),
                        }
                    }
                })
            })
            .collect();
        Clients {
            stop,
            counts,
            threads,
        }
    }

    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (c.0, c.1.clone())
    }
}

/// Workers the coordinator routes to: `(id, role)` of the ready ones.
fn routed(http: &str) -> Result<Vec<(String, String)>> {
    let v = get_json(&format!("{http}/v1/cluster"), Duration::from_secs(10))?;
    Ok(v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["state"] == "ready")
                .filter_map(|w| {
                    Some((
                        w["worker_id"].as_str()?.to_string(),
                        w["role"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until `done` holds for the routed workers; the time it took from `t0`.
fn until(
    http: &str,
    t0: Instant,
    what: &str,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Result<Duration> {
    let limit = Duration::from_secs(300);
    loop {
        if done(&routed(http)?) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One flip through the supervisor: the worker's report and the call → routed time.
fn flip(c: &Cluster, from: &str, to: &str) -> Result<Value> {
    let t0 = Instant::now();
    let v = c.control_post(
        "/v1/flip",
        &json!({"from": from, "to": to, "count": 1}),
        Duration::from_secs(300),
    )?;
    let answered = t0.elapsed();
    let e = &v["flipped"][0];
    if e["ok"] != true {
        bail!("flip {from} → {to} failed: {v}");
    }
    let id = e["worker_id"].as_str().context("no worker_id")?.to_string();
    let routed_after = until(&c.http, t0, "the flipped worker routed", |ws| {
        ws.iter().any(|(w, r)| *w == id && r == to)
    })?;
    let r = &e["report"];
    Ok(json!({
        "path": format!("flip {from}→{to}"), "worker_id": id,
        "drain_ms": r["drain_ms"], "switch_ms": r["switch_ms"], "register_ms": r["register_ms"],
        "worker_total_ms": r["total_ms"],
        "call_ms": answered.as_secs_f64() * 1e3, "routed_ms": routed_after.as_secs_f64() * 1e3,
    }))
}

/// A prefill worker started by a scale-up, then drained again.
fn start_one(c: &Cluster) -> Result<Value> {
    let before: Vec<String> = routed(&c.http)?.into_iter().map(|w| w.0).collect();
    let scale = |n: u32| {
        c.control_post(
            "/v1/scale",
            &json!({"role": "prefill", "replicas": n}),
            Duration::from_secs(30),
        )
    };
    let t0 = Instant::now();
    scale(2)?;
    let routed_after = until(&c.http, t0, "the new prefill worker routed", |ws| {
        ws.iter()
            .any(|(w, r)| r == "prefill" && !before.contains(w))
    })?;
    scale(1)?;
    let t1 = Instant::now();
    until(&c.http, t1, "back to one prefill worker", |ws| {
        ws.iter().filter(|(_, r)| r == "prefill").count() == 1
    })?;
    // The drained process has exited once the supervisor has forgotten it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while get_json(
        &format!("{}/v1/supervisor", c.control),
        Duration::from_secs(10),
    )?["workers"]
        .as_array()
        .is_some_and(|ws| ws.len() > 3)
    {
        if Instant::now() > deadline {
            bail!("the scaled-down worker did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(json!({"path": "start prefill worker", "routed_ms": routed_after.as_secs_f64() * 1e3}))
}

fn median(rows: &[Value], path: &str, key: &str) -> f64 {
    let v: Vec<f64> = rows
        .iter()
        .filter(|r| r["path"] == path)
        .filter_map(|r| r[key].as_f64())
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        stats::dist(&v).p50
    }
}

/// Runs the benchmark.
///
/// # Errors
/// Bad flags, a cluster that does not start, a flip or a scale that fails.
pub fn run(a: &FlipArgs, host: &Host) -> Result<()> {
    a.validate().map_err(anyhow::Error::msg)?;
    let model = host.model(a.model.as_deref())?;
    let dir = std::env::temp_dir().join(format!("xpyd-flip-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("flip.yaml");
    let role = format!("threads: {}, engine: {}", a.threads, a.engine);
    std::fs::write(
        &manifest,
        format!(
            "name: bench-flip\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\n\
             roles:\n  prefill: {{ replicas: 1, {role} }}\n  decode: {{ replicas: 2, {role} }}\n"
        ),
    )?;
    let c = Cluster::start(ClusterSpec {
        exe: &host.exe,
        manifest: &manifest,
        model: &model,
        ready_timeout: Duration::from_secs(300),
        env: &[],
    })?;
    let clients = Clients::start(&c.http, a.clients);
    std::thread::sleep(Duration::from_secs(2));
    let mut rows = Vec::new();
    for round in 1..=a.rounds {
        for (from, to) in [("decode", "prefill"), ("prefill", "decode")] {
            let r = flip(&c, from, to)?;
            eprintln!("round {round}: {r}");
            rows.push(r);
        }
        let r = start_one(&c)?;
        eprintln!("round {round}: {r}");
        rows.push(r);
    }
    let (ok, failed) = clients.stop();
    // The table goes to stdout, or to stderr when stdout carries the JSON.
    macro_rules! say {
        ($($t:tt)*) => {
            if a.json { eprintln!($($t)*) } else { println!($($t)*) }
        };
    }
    let cpu = crate::engine_bench::cpu_name();
    say!(
        "role flip vs starting a worker — CPU: {cpu}; {} engine, {} thread(s) per worker, unpinned; \
         {} closed-loop clients; {} rounds (medians)",
        a.engine,
        a.threads,
        a.clients,
        a.rounds
    );
    say!("| path | drain ms | switch ms | register ms | worker total ms | call → routed ms |");
    say!("|---|---|---|---|---|---|");
    for path in ["flip decode→prefill", "flip prefill→decode"] {
        let m = |k| median(&rows, path, k);
        say!(
            "| {path} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            m("drain_ms"),
            m("switch_ms"),
            m("register_ms"),
            m("worker_total_ms"),
            m("routed_ms")
        );
    }
    let start = median(&rows, "start prefill worker", "routed_ms");
    say!("| start prefill worker | – | – | – | – | {start:.1} |");
    let flip_ms = median(&rows, "flip decode→prefill", "routed_ms");
    let ratio = start / flip_ms;
    say!(
        "starting a worker ÷ flipping one (call → routed, medians): {ratio:.1}×; \
         requests: {ok} answered, {} failed",
        failed.len()
    );
    let out = json!({
        "cpu": cpu, "engine": a.engine, "threads_per_worker": a.threads, "pinned": false,
        "clients": a.clients, "rounds": rows, "requests_ok": ok,
        "requests_failed": failed.len(), "failures": failed.iter().take(5).collect::<Vec<_>>(),
        "start_over_flip": ratio,
    });
    if a.json {
        println!("{out}");
    }
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !failed.is_empty() {
        bail!(
            "{} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }
    Ok(())
}
