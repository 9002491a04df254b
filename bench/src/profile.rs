//! `xpyd bench profile`: per-role performance profiles measured on the real engine —
//! prefill time by prompt tokens and chunk (batch) tokens, decode step time by batch
//! size and context length, KV transfer time by bytes for one backend — with fitted
//! models and their fit error, written as a versioned JSON the ratio advisor loads.

use crate::engine_args::EngineArgs;
use crate::engine_bench::{cpu_name, prompt_tokens};
use crate::fit::{self, FitError, Model};
use crate::host::Host;
use crate::kv_bench::{self, KvBackend};
use anyhow::Result;
use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;
use xpyd_engine::{Engine, SamplingParams};
use xpyd_planner::profile::PROFILE_VERSION;

/// Flags of `xpyd bench profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Engine flags (model, threads, KV dtype, prefill chunk).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt lengths (tokens) of the prefill profile.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,128,256,512,1024,2048"
    )]
    pub prompts: Vec<usize>,
    /// Prefill chunk sizes (tokens computed per forward pass).
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    pub chunks: Vec<usize>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub batches: Vec<usize>,
    /// Decode context lengths (tokens already in each sequence's KV).
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024")]
    pub contexts: Vec<usize>,
    /// Decode steps timed per (batch, context) point (the median is kept).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// KV transfer backend to profile, or `none`.
    #[arg(long, value_enum, default_value = "shm")]
    pub kv_backend: ProfileKv,
    /// KV transfer sizes in KiB.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,1024,4096,16384,65536"
    )]
    pub kv_kib: Vec<usize>,
    /// Where to write the profile.
    #[arg(long, default_value = "bench-out/profile.json")]
    pub out: PathBuf,
}

/// `--kv-backend`: a backend of `xpyd bench kv`, or `none` (no KV transfer profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileKv(pub Option<KvBackend>);

impl ValueEnum for ProfileKv {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            ProfileKv(None),
            ProfileKv(Some(KvBackend::Tcp)),
            ProfileKv(Some(KvBackend::Shm)),
            ProfileKv(Some(KvBackend::Ucx)),
            ProfileKv(Some(KvBackend::ShmStaged)),
            ProfileKv(Some(KvBackend::ShmScattered)),
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self.0 {
            None => Some(PossibleValue::new("none").help("no KV transfer profile")),
            Some(b) => b.to_possible_value(),
        }
    }
}

impl ProfileArgs {
    /// Checks what clap cannot: enough points for every fit.
    ///
    /// # Errors
    /// The first problem, naming the flag.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.prompts.len() < 3
            || self.batches.len() < 2
            || self.contexts.len() < 2
            || self.chunks.is_empty()
        {
            return Err(
                "--prompts needs at least 3 lengths, --batches and --contexts at least \
                        2 values, --chunks at least one"
                    .into(),
            );
        }
        if self.steps == 0 || self.kv_kib.len() < 2 && self.kv_backend.0.is_some() {
            return Err("--steps must be at least 1 and --kv-kib needs at least 2 sizes".into());
        }
        Ok(())
    }
}

fn median(v: Vec<f64>) -> f64 {
    let mut v = v;
    v.sort_by(f64::total_cmp);
    crate::stats::percentile(&v, 0.5)
}

/// Seconds to prefill `n` tokens with chunk `chunk` (best of two, after the caller's
/// warm-up).
fn prefill_secs(engine: &mut Engine, n: usize, salt: usize) -> Result<f64> {
    let prompt = prompt_tokens(engine, n, salt)?;
    let mut best = f64::MAX;
    for _ in 0..2 {
        engine.add_sequence(1, prompt.clone(), SamplingParams::greedy(1))?;
        let t = Instant::now();
        engine.prefill(1, &mut |_| {})?;
        best = best.min(t.elapsed().as_secs_f64());
        engine.remove(1);
    }
    Ok(best)
}

/// Median seconds of one decode step of `batch` sequences at context `ctx`. Each
/// sequence holds KV blocks of its own, as in a serving batch: the prompt is computed
/// once and its KV copied to the others by export and import. (Sharing the prompt through
/// the prefix cache would have every sequence of the batch read the same cached blocks,
/// and a step of batch × context rows would look as cheap as one of context rows.)
fn decode_step_secs(engine: &mut Engine, batch: usize, ctx: usize, steps: usize) -> Result<f64> {
    let prompt = prompt_tokens(engine, ctx, ctx)?;
    let ids: Vec<u64> = (100..100 + batch as u64).collect();
    let params = SamplingParams {
        ignore_eos: true,
        max_tokens: steps + 4,
        ..Default::default()
    };
    engine.add_sequence(ids[0], prompt, params)?;
    engine.prefill(ids[0], &mut |_| {})?;
    let kv = engine.export(ids[0])?;
    for id in &ids[1..] {
        engine.import(*id, &kv)?;
    }
    engine.decode_step(&ids)?; // warm-up
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        engine.decode_step(&ids)?;
        times.push(t.elapsed().as_secs_f64());
    }
    for id in &ids {
        engine.remove(*id);
    }
    Ok(median(times))
}

/// Logical CPUs of the machine (not just those this process may use).
fn logical_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

fn fitted(model: Model, err: FitError) -> Value {
    json!({"model": model, "fit_error": err})
}

/// Runs the profile.
///
/// # Errors
/// When the flags are inconsistent ([`ProfileArgs::validate`]), the model does not load,
/// a fit fails, or a KV transfer fails.
pub fn run(a: &ProfileArgs, host: &Host) -> Result<()> {
    a.validate().map_err(anyhow::Error::msg)?;
    let mut cfg = a.engine.engine_config(host)?;
    // Room for the largest decode batch at the largest context, plus the prompt cache.
    let max_ctx = a.contexts.iter().max().copied().unwrap_or(0);
    let max_batch = a.batches.iter().max().copied().unwrap_or(1);
    cfg.prefix_cache_blocks = max_ctx / cfg.block_size + 8;
    cfg.num_blocks = Some(
        (max_batch * (max_ctx + a.steps + 8) + a.prompts.iter().max().copied().unwrap_or(0))
            / cfg.block_size
            + cfg.prefix_cache_blocks
            + 64,
    );
    let threads = xpyd_engine::compute::available();
    eprintln!(
        "profiling prefill: prompts {:?} × chunks {:?}",
        a.prompts, a.chunks
    );
    let mut prefill_points = Vec::new();
    let mut prefill_models = serde_json::Map::new();
    let mut prefill_linear = None;
    for &chunk in &a.chunks {
        let mut c = cfg.clone();
        c.prefill_chunk = chunk;
        c.prefix_cache_blocks = 0;
        let mut engine = Engine::load(c)?;
        prefill_secs(&mut engine, a.prompts[0], 0)?; // warm-up
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for (i, &n) in a.prompts.iter().enumerate() {
            let s = prefill_secs(&mut engine, n, i + 1)?;
            eprintln!("  chunk {chunk:>4} prompt {n:>5}: {:.1} ms", s * 1e3);
            prefill_points.push(json!({"prompt_tokens": n, "chunk_tokens": chunk, "seconds": s}));
            xs.push(n as f64);
            ys.push(s);
        }
        let (m, e) = fit::fit_polynomial(&xs, &ys, 2)?;
        prefill_models.insert(chunk.to_string(), fitted(m, e));
        if chunk == a.chunks[a.chunks.len() / 2] {
            prefill_linear = Some(fit::fit_polynomial(&xs, &ys, 1)?.0);
        }
    }
    let mut engine = Engine::load(cfg.clone())?;
    eprintln!(
        "profiling decode: batches {:?} × contexts {:?}",
        a.batches, a.contexts
    );
    let (mut b, mut l, mut ys, mut decode_points) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &ctx in &a.contexts {
        for &batch in &a.batches {
            let s = decode_step_secs(&mut engine, batch, ctx, a.steps)?;
            eprintln!(
                "  batch {batch:>3} context {ctx:>5}: {:.2} ms/step",
                s * 1e3
            );
            decode_points.push(json!({"batch": batch, "context": ctx, "seconds": s}));
            b.push(batch as f64);
            l.push(ctx as f64);
            ys.push(s);
        }
    }
    let (dm, de) = fit::fit_bilinear(&b, &l, &ys)?;
    let ctx = a.contexts[a.contexts.len() / 2] as f64;
    let mock = mock_latency(prefill_linear.as_ref(), &dm, ctx);
    let kv = match a.kv_backend.0 {
        None => Value::Null,
        Some(backend) => kv_profile(host, backend, &a.kv_kib)?,
    };
    let profile = json!({
        "version": PROFILE_VERSION,
        "kind": "xpyd-performance-profile",
        "hardware": {"cpu": cpu_name(), "logical_cpus": logical_cpus(),
                     "usable_cpus": std::thread::available_parallelism().map_or(0, |n| n.get())},
        "threads": threads,
        "cpus": a.engine.cpus,
        "model": {"path": cfg.model_path, "fingerprint": engine.fingerprint(), "kv_dtype": cfg.kv_dtype,
                  "layers": engine.model_config().n_layer,
                  "kv_bytes_per_token": kv_bytes_per_token(engine.model_config(), cfg.kv_dtype)},
        "block_size": cfg.block_size,
        "prefill": {"points": prefill_points, "fit_by_chunk": prefill_models,
                    "fit_note": "seconds = c0 + c1·prompt_tokens + c2·prompt_tokens², one fit per chunk size"},
        "decode_step": {"points": decode_points, "fit": fitted(dm, de),
                        "fit_note": "seconds = c0 + c1·batch + c2·context + c3·batch·context"},
        "kv_transfer": kv,
        "mock_latency": mock,
        "mock_latency_note": format!(
            "for `mock_profile:` in a manifest: linear prefill fit at chunk {} (its intercept is charged per chunk), decode step at context {ctx}; no n² or context growth",
            a.chunks[a.chunks.len() / 2]
        ),
    });
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&profile)?)?;
    print_fits(&profile);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Bytes of KV one token takes over all layers (K and V), what a transfer moves.
fn kv_bytes_per_token(m: &xpyd_engine::ModelConfig, dtype: xpyd_engine::KvDtype) -> usize {
    m.n_layer * 2 * m.n_kv_head * m.head_dim * dtype.size()
}

/// KV transfer time by bytes over `backend`, with a linear fit.
fn kv_profile(host: &Host, backend: KvBackend, kv_kib: &[usize]) -> Result<Value> {
    eprintln!(
        "profiling kv transfer over {}: {kv_kib:?} KiB",
        backend.name()
    );
    let (mut xs, mut ys, mut pts) = (Vec::new(), Vec::new(), Vec::new());
    for &kib in kv_kib {
        let bytes = kib << 10;
        let gbps = median(kv_bench::transfer_rounds(&host.exe, backend, bytes, 3)?);
        let s = bytes as f64 / (gbps * 1e9);
        eprintln!("  {kib:>6} KiB: {:.3} ms ({gbps:.2} GB/s)", s * 1e3);
        pts.push(json!({"bytes": bytes, "seconds": s}));
        xs.push(bytes as f64);
        ys.push(s);
    }
    let (m, e) = fit::fit_polynomial(&xs, &ys, 1)?;
    Ok(json!({"backend": backend.name(), "points": pts, "fit": fitted(m, e)}))
}

/// The mock engine's latency that mimics this profile: prefill linear in prompt tokens,
/// a decode step linear in batch size at context `ctx`.
fn mock_latency(prefill: Option<&Model>, decode: &Model, ctx: f64) -> xpyd_engine::MockLatency {
    let us = |s: f64| (s * 1e6).clamp(0.0, xpyd_engine::mock::MAX_MOCK_LATENCY_US as f64) as u64;
    let (pb, pt) = match prefill {
        Some(Model::Polynomial { coeffs }) if coeffs.len() == 2 => (coeffs[0], coeffs[1]),
        _ => (0.0, 0.0),
    };
    let (db, ds) = match decode {
        Model::Bilinear { coeffs: c } => (c[0] + c[2] * ctx, c[1] + c[3] * ctx),
        _ => (0.0, 0.0),
    };
    xpyd_engine::MockLatency {
        prefill_base_us: us(pb),
        prefill_per_token_us: us(pt),
        decode_base_us: us(db),
        decode_per_seq_us: us(ds),
        ..Default::default()
    }
}

fn print_fits(p: &Value) {
    println!(
        "{:<28} {:>8} {:>14} {:>14}",
        "model", "R²", "mean |rel err|", "max |rel err|"
    );
    let row = |name: &str, f: &Value| {
        let e = &f["fit_error"];
        println!(
            "{:<28} {:>8.4} {:>13.1}% {:>13.1}%",
            name,
            e["r2"].as_f64().unwrap_or(f64::NAN),
            100.0 * e["mean_abs_rel"].as_f64().unwrap_or(f64::NAN),
            100.0 * e["max_abs_rel"].as_f64().unwrap_or(f64::NAN)
        );
    };
    if let Some(m) = p["prefill"]["fit_by_chunk"].as_object() {
        for (chunk, f) in m {
            row(&format!("prefill (chunk {chunk})"), f);
        }
    }
    row("decode step", &p["decode_step"]["fit"]);
    if !p["kv_transfer"].is_null() {
        row("kv transfer", &p["kv_transfer"]["fit"]);
    }
}
