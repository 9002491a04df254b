//! `xpyd bench kv`: KV transfer throughput between two processes per backend, against a
//! plain memcpy and a raw TCP loopback copy measured in the same run, and the exposed
//! fraction of a real 2,048-token prefill streamed layer by layer.

use crate::engine_args::EngineArgs;
use crate::host::Host;
use crate::kv_harness;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

/// Flags of `xpyd bench kv`.
#[derive(Debug, Args)]
pub struct BenchKvArgs {
    /// Timed rounds per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Backends to measure (default: tcp, shm, and ucx when built). Variants of shm:
    /// `shm-scattered` writes into a shuffled block table (8 KiB runs; plain `shm` uses
    /// consecutive blocks, as the engine's allocator hands out), `shm-staged` goes
    /// through a staging region copied into the KV blocks (the path without placement).
    #[arg(long, value_enum, value_delimiter = ',', default_value = if cfg!(feature = "ucx") { "tcp,tcp-tls,shm,ucx" } else { "tcp,tcp-tls,shm" })]
    pub backends: Vec<KvBackend>,
    /// Skip the real-model streaming measurement.
    #[arg(long)]
    pub no_model: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Engine flags (model, threads, KV dtype, prefill chunk).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// A backend `xpyd bench kv` measures: a transfer backend, or a variant of shm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvBackend {
    /// TCP with per-chunk checksums.
    Tcp,
    /// TCP over TLS (the cluster's internal plane with `tls.internal`), compared with
    /// `tcp` in the same run.
    TcpTls,
    /// Shared memory, written straight into consecutive KV blocks (placed).
    Shm,
    /// UCX (when built with the `ucx` feature).
    Ucx,
    /// Shared memory through a staging region copied into the KV blocks.
    ShmStaged,
    /// Placed shared memory into a shuffled block table (8 KiB runs).
    ShmScattered,
}

impl KvBackend {
    /// The flag's spelling, also used in the report.
    pub fn name(self) -> &'static str {
        match self {
            KvBackend::Tcp => "tcp",
            KvBackend::TcpTls => "tcp-tls",
            KvBackend::Shm => "shm",
            KvBackend::Ucx => "ucx",
            KvBackend::ShmStaged => "shm-staged",
            KvBackend::ShmScattered => "shm-scattered",
        }
    }

    /// Whether it goes through shared memory (compared with memcpy, not raw TCP).
    fn is_shm(self) -> bool {
        matches!(
            self,
            KvBackend::Shm | KvBackend::ShmStaged | KvBackend::ShmScattered
        )
    }

    /// `kv-harness recv` flags for this backend.
    fn recv_args(self) -> &'static [&'static str] {
        match self {
            KvBackend::Tcp | KvBackend::TcpTls => &["--backend", "tcp"],
            KvBackend::Shm => &["--backend", "shm"],
            KvBackend::Ucx => &["--backend", "ucx"],
            KvBackend::ShmStaged => &["--backend", "shm", "--staged"],
            KvBackend::ShmScattered => &["--backend", "shm", "--scatter"],
        }
    }
}

/// SmolLM2-135M: 30 layers × (K+V) × 3 KV heads × 64 dims × f32 per token.
const LAYERS: usize = 30;
const ROW_BYTES: usize = 2 * 3 * 64 * 4;
const PROMPT: usize = 2048;

struct Payload {
    name: &'static str,
    bytes: usize,
    chunk: usize,
}

fn payloads() -> Vec<Payload> {
    let layer = PROMPT * ROW_BYTES;
    vec![
        Payload {
            name: "256KiB",
            bytes: 256 << 10,
            chunk: 256 << 10,
        },
        Payload {
            name: "4MiB",
            bytes: 4 << 20,
            chunk: 1 << 20,
        },
        Payload {
            name: "64MiB",
            bytes: 64 << 20,
            chunk: 4 << 20,
        },
        Payload {
            name: "kv-2048tok",
            bytes: LAYERS * layer,
            chunk: layer,
        },
    ]
}

fn spawn<S: AsRef<std::ffi::OsStr>>(exe: &Path, args: &[S], stdin: bool) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} kv-harness", exe.display()))
}

/// The harness's next JSON line (UCX logs to stdout too: other lines are skipped).
fn line(r: &mut BufReader<ChildStdout>) -> Result<Value> {
    loop {
        let mut s = String::new();
        if r.read_line(&mut s)? == 0 {
            bail!("harness process ended early");
        }
        if s.starts_with('{') {
            return Ok(serde_json::from_str(s.trim())?);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ns(v: &Value, key: &str) -> Result<u64> {
    v[key].as_u64().with_context(|| format!("no {key} in {v}"))
}

/// GB/s of each of `rounds` transfers of `bytes` (in chunks of up to 4 MiB) over
/// `backend` between two harness processes (`exe kv-harness`), after a warm-up round.
///
/// # Errors
/// When a harness process fails or a transfer fails or arrives corrupted.
pub fn transfer_rounds(
    exe: &Path,
    backend: KvBackend,
    bytes: usize,
    rounds: usize,
) -> Result<Vec<f64>> {
    let p = Payload {
        name: "profile",
        bytes,
        chunk: bytes.min(4 << 20),
    };
    Ok(transfer(exe, backend, &p, rounds)?.0)
}

/// GB/s of each round of one backend between two harness processes, and the
/// milliseconds the receiving thread spent taking the chunks in (copy or verification).
fn transfer(
    exe: &Path,
    backend: KvBackend,
    p: &Payload,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let s = |x: usize| x.to_string();
    let (chunk, bytes, repeat) = (s(p.chunk), s(p.bytes), s(rounds + 1));
    let mut args = vec!["kv-harness", "recv", "--bytes", &bytes, "--chunk", &chunk];
    args.extend(["--repeat", &repeat]);
    args.extend(backend.recv_args());
    let mut send_args = vec![
        "kv-harness",
        "send",
        "--target",
        "-",
        "--bytes",
        &bytes,
        "--chunk",
        &chunk,
    ];
    let tls = (backend == KvBackend::TcpTls)
        .then(crate::kv_harness::tls_dir)
        .transpose()?;
    let tls_path = tls.as_ref().map(|d| d.path().display().to_string());
    if let Some(d) = &tls_path {
        args.extend(["--tls-dir", d]);
        send_args.extend(["--tls-dir", d]);
    }
    let mut recv = spawn(exe, &args, false)?;
    let mut send = spawn(exe, &send_args, true)?;
    let mut rout = BufReader::new(recv.stdout.take().context("recv stdout")?);
    let mut sout = BufReader::new(send.stdout.take().context("send stdout")?);
    let mut sin = send.stdin.take().context("send stdin")?;
    let (mut out, mut busy) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let target = line(&mut rout)?;
        writeln!(sin, "{target}")?;
        sin.flush()?;
        let sr = line(&mut sout)?;
        let rr = line(&mut rout)?;
        if rr["ok"] != true || sr["ok"] != true || rr["xxh3"] != sr["xxh3"] {
            bail!(
                "{} transfer failed or corrupted: {sr} / {rr}",
                backend.name()
            );
        }
        if round > 0 {
            out.push(p.bytes as f64 / (ns(&rr, "end_ns")? - ns(&sr, "start_ns")?) as f64);
            busy.push(ns(&rr, "consume_us")? as f64 / 1e3);
        }
    }
    drop(sin);
    send.wait()?;
    recv.wait()?;
    Ok((out, busy))
}

/// GB/s of raw TCP rounds between two processes (no framing, no checksums).
fn raw_tcp(exe: &Path, p: &Payload, rounds: usize) -> Result<Vec<f64>> {
    let s = |x: usize| x.to_string();
    let mut recv = spawn(
        exe,
        &[
            "kv-harness",
            "raw-recv",
            "--bytes",
            &s(p.bytes),
            "--rounds",
            &s(rounds + 1),
        ],
        false,
    )?;
    let mut rout = BufReader::new(recv.stdout.take().context("recv stdout")?);
    let addr = line(&mut rout)?["addr"]
        .as_str()
        .context("raw-recv address")?
        .to_string();
    let mut send = spawn(
        exe,
        &[
            "kv-harness",
            "raw-send",
            "--addr",
            &addr,
            "--bytes",
            &s(p.bytes),
            "--rounds",
            &s(rounds + 1),
        ],
        false,
    )?;
    let mut sout = BufReader::new(send.stdout.take().context("send stdout")?);
    let mut out = Vec::new();
    for round in 0..=rounds {
        let sr = line(&mut sout)?;
        let rr = line(&mut rout)?;
        if round > 0 {
            out.push(p.bytes as f64 / (ns(&rr, "end_ns")? - ns(&sr, "start_ns")?) as f64);
        }
    }
    send.wait()?;
    recv.wait()?;
    Ok(out)
}

/// GB/s of copying the payload between two touched buffers in this process.
fn memcpy(p: &Payload, rounds: usize) -> Vec<f64> {
    let src = kv_harness::synthetic(p.bytes);
    let mut dst = vec![1u8; p.bytes];
    (0..=rounds)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            p.bytes as f64 / t.elapsed().as_nanos() as f64
        })
        .skip(1)
        .collect()
}

/// Exposed time of a streamed 2,048-token prefill vs. the transfer time of the same KV
/// sent after the prefill.
fn exposed(exe: &Path, backend: KvBackend, model: &str) -> Result<Value> {
    let mut ms = Vec::new();
    let tls = (backend == KvBackend::TcpTls)
        .then(crate::kv_harness::tls_dir)
        .transpose()?;
    let tls_path = tls.as_ref().map(|d| d.path().display().to_string());
    let tls_args: Vec<&str> = match &tls_path {
        Some(d) => vec!["--tls-dir", d],
        None => Vec::new(),
    };
    for stream in [true, false] {
        let n = PROMPT.to_string();
        let mut recv = spawn(
            exe,
            &[
                &["kv-harness", "recv"],
                backend.recv_args(),
                &tls_args,
                &[
                    "--decode",
                    "--prompt-tokens",
                    &n,
                    "--model",
                    model,
                    "--threads",
                    "1",
                ],
            ]
            .concat(),
            false,
        )?;
        let mut rout = BufReader::new(recv.stdout.take().context("recv stdout")?);
        let target = line(&mut rout)?.to_string();
        let mut args: Vec<&str> = vec![
            "kv-harness",
            "send",
            "--target",
            &target,
            "--prompt-tokens",
            &n,
            "--max-tokens",
            "1",
            "--model",
            model,
        ];
        if !stream {
            args.push("--no-stream");
        }
        args.extend(&tls_args);
        let mut send = spawn(exe, &args, false)?;
        let sr = line(&mut BufReader::new(
            send.stdout.take().context("send stdout")?,
        ))?;
        let rr = line(&mut rout)?;
        send.wait()?;
        recv.wait()?;
        if rr["ok"] != true || sr["ok"] != true {
            bail!("{} prefill transfer failed: {sr} / {rr}", backend.name());
        }
        // Last layer computed → all layers verified and imported on the receiver.
        ms.push((ns(&rr, "end_ns")? as f64 - ns(&sr, "prefill_end_ns")? as f64) / 1e6);
    }
    Ok(
        json!({"backend": backend.name(), "streamed_exposed_ms": ms[0], "non_streamed_transfer_ms": ms[1], "fraction": ms[0] / ms[1]}),
    )
}

/// Runs the benchmark.
///
/// # Errors
/// When a harness process or a transfer fails, or the model cannot be found.
pub fn run(args: &BenchKvArgs, host: &Host) -> Result<()> {
    let exe = host.exe.as_path();
    let rounds = args.rounds.max(1);
    let mut results = Vec::new();
    for p in payloads() {
        let mc = median(memcpy(&p, rounds));
        let raw = median(raw_tcp(exe, &p, rounds)?);
        let mut tcp = None;
        for &b in &args.backends {
            let (g, busy) = transfer(exe, b, &p, rounds)?;
            let (g, busy) = (median(g), median(busy));
            if b == KvBackend::Tcp {
                tcp = Some(g);
            }
            // TLS's cost: against plain tcp measured in the same run.
            let (base, base_g) = match (b, tcp) {
                (KvBackend::TcpTls, Some(t)) => ("tcp", t),
                _ if b.is_shm() => ("memcpy", mc),
                _ => ("raw_tcp", raw),
            };
            eprintln!(
                "{:<10} {:<13} {:>7.2} GB/s  vs {base} {:>7.2} GB/s  ratio {:.2}  receiver busy {busy:.2} ms",
                p.name,
                b.name(),
                g,
                base_g,
                g / base_g
            );
            results.push(
                json!({"backend": b.name(), "payload": p.name, "bytes": p.bytes, "gbps": g,
                "baseline": base, "baseline_gbps": base_g, "ratio": g / base_g,
                "memcpy_gbps": mc, "raw_tcp_gbps": raw, "receiver_busy_ms": busy}),
            );
        }
    }
    let mut report = json!({"results": results, "rounds": rounds, "statistic": "median",
        "timed": "sender's private memory → receiver's KV blocks (shm: written there by the sender; others: copied in), checksums verified",
        "receiver_busy": "time the receiving thread spends copying or verifying chunks (decode-step time on a decode worker)"});
    if !args.no_model {
        let model = args.engine.model_path(host)?;
        let model = model.to_str().context("model path is not UTF-8")?;
        let mut ex = Vec::new();
        for &b in &args.backends {
            let e = exposed(exe, b, model)?;
            eprintln!(
                "streaming {}: exposed {:.1} ms vs non-streamed transfer {:.1} ms → fraction {:.3}",
                b.name(),
                e["streamed_exposed_ms"].as_f64().unwrap_or(0.0),
                e["non_streamed_transfer_ms"].as_f64().unwrap_or(0.0),
                e["fraction"].as_f64().unwrap_or(0.0)
            );
            ex.push(e);
        }
        let worst = ex
            .iter()
            .filter_map(|e| e["fraction"].as_f64())
            .fold(0.0, f64::max);
        report["exposed"] = json!(ex);
        report["exposed_fraction"] = json!(worst);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{:<12} {:<13} {:>9} {:>10} {:>12} {:>7} {:>9}",
            "payload", "back", "GB/s", "baseline", "base GB/s", "ratio", "recv ms"
        );
        for r in report["results"].as_array().into_iter().flatten() {
            println!(
                "{:<12} {:<13} {:>9.2} {:>10} {:>12.2} {:>7.2} {:>9.2}",
                r["payload"].as_str().unwrap_or(""),
                r["backend"].as_str().unwrap_or(""),
                r["gbps"].as_f64().unwrap_or(0.0),
                r["baseline"].as_str().unwrap_or(""),
                r["baseline_gbps"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0),
                r["receiver_busy_ms"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(f) = report["exposed_fraction"].as_f64() {
            println!("exposed fraction (worst backend, real 2048-token prefill): {f:.3}");
        }
    }
    Ok(())
}
