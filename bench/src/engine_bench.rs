//! `xpyd bench engine`: prefill and decode throughput of the engine on the real model,
//! compared in the same run with llama.cpp's `llama-server` on the same GGUF and threads.

use crate::engine_args::EngineArgs;
use crate::host::Host;
use crate::http;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xpyd_engine::{Engine, SamplingParams};
use xpyd_runtime::env;

/// Flags of `xpyd bench engine`.
#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    /// Engine flags (model, threads, KV dtype, prefill chunk).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Path to llama.cpp's `llama-server` for the same-run comparison (skipped when absent).
    #[arg(long, env = env::LLAMA_SERVER)]
    pub llama_server: Option<PathBuf>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Timed repetitions per prefill length (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from \
those used for wine. Books became cheaper, literacy spread, and ideas crossed borders faster \
than ever before. Scholars could compare identical copies, errors were corrected in later \
editions, and vernacular languages gained standard spellings. ";
const PREFILL_LENGTHS: [usize; 3] = [128, 512, 2048];
const DECODE_BATCHES: [usize; 3] = [1, 4, 16];
const DECODE_PROMPT: usize = 64;
/// Bound of one llama-server completion (a 512-token prefill or a short decode).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(600);

/// Exactly `n` tokens of real text (`salt` makes prompts differ, so no prefix is shared).
///
/// # Errors
/// When tokenizing fails or the text is too short.
pub fn prompt_tokens(engine: &Engine, n: usize, salt: usize) -> Result<Vec<u32>> {
    let mut ids = engine
        .tokenizer()
        .encode(&format!("Document {salt}. {}", TEXT.repeat(n / 40 + 2)))?;
    if ids.len() < n {
        bail!("bench text too short: {} < {n}", ids.len());
    }
    ids.truncate(n);
    Ok(ids)
}

fn bench_prefill(engine: &mut Engine, n: usize, repeats: usize) -> Result<f64> {
    let prompt = prompt_tokens(engine, n, n)?;
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        engine.add_sequence(1, prompt.clone(), SamplingParams::greedy(1))?;
        let t = Instant::now();
        engine.prefill(1, &mut |_| {})?;
        best = best.min(t.elapsed().as_secs_f64());
        engine.remove(1);
    }
    Ok(n as f64 / best)
}

fn bench_decode(engine: &mut Engine, batch: usize, steps: usize) -> Result<f64> {
    let ids: Vec<u64> = (0..batch as u64).collect();
    for id in &ids {
        let params = SamplingParams {
            ignore_eos: true,
            max_tokens: steps + 2,
            ..Default::default()
        };
        engine.add_sequence(
            *id,
            prompt_tokens(engine, DECODE_PROMPT, *id as usize)?,
            params,
        )?;
        engine.prefill(*id, &mut |_| {})?;
    }
    engine.decode_step(&ids)?; // warm-up
    let t = Instant::now();
    for _ in 0..steps {
        engine.decode_step(&ids)?;
    }
    let secs = t.elapsed().as_secs_f64();
    for id in &ids {
        engine.remove(*id);
    }
    Ok((batch * steps) as f64 / secs)
}

/// A llama-server child that is killed when dropped.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn llama_cpp(
    server: &Path,
    model: &Path,
    threads: usize,
    prompts: &LlamaPrompts,
    repeats: usize,
) -> Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(server)
        .args(["-m"])
        .arg(model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-c",
            "4096",
            "-b",
            "512",
            "-ub",
            "512",
        ])
        .args([
            "-t",
            &threads.to_string(),
            "-tb",
            &threads.to_string(),
            "--no-warmup",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", server.display()))?;
    let _guard = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http::get_text(&format!("{base}/health"), Duration::from_secs(2)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("llama-server did not become healthy within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let completion = |prompt: &[u32], n_predict: usize| -> Result<Value> {
        let r = http::post_json(
            &format!("{base}/completion"),
            &json!({"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": true, "cache_prompt": false}),
            COMPLETION_TIMEOUT,
        )?;
        Ok(r["timings"].clone())
    };
    completion(&prompts.prefill_512[..128], 1)?; // warm-up
    let mut prefill: f64 = 0.0;
    for _ in 0..repeats.max(1) {
        prefill = prefill.max(
            completion(&prompts.prefill_512, 1)?["prompt_per_second"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    let mut decode: f64 = 0.0;
    for _ in 0..2 {
        decode = decode.max(
            completion(&prompts.decode, prompts.decode_steps)?["predicted_per_second"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    Ok(json!({"prefill_512_tok_s": prefill, "decode_batch1_tok_s": decode}))
}

struct LlamaPrompts {
    prefill_512: Vec<u32>,
    decode: Vec<u32>,
    decode_steps: usize,
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the benchmark.
///
/// # Errors
/// When the model does not load, the engine fails, or llama-server does not answer.
pub fn run(args: &BenchEngineArgs, host: &Host) -> Result<()> {
    let threads = xpyd_engine::compute::init(&Default::default())?;
    let cfg = args.engine.engine_config(host)?;
    let model = cfg.model_path.clone();
    let mut engine = Engine::load(cfg)?;
    eprintln!("warming up…");
    bench_prefill(&mut engine, 128, 1)?;
    let mut prefill = Vec::new();
    for n in PREFILL_LENGTHS {
        let reps = if n >= 2048 {
            1.max(args.repeats / 2)
        } else {
            args.repeats
        };
        let tok_s = bench_prefill(&mut engine, n, reps)?;
        eprintln!("prefill {n:>5} tokens: {tok_s:8.1} tok/s");
        prefill.push(json!({"prompt_tokens": n, "tok_s": tok_s}));
    }
    let mut decode = Vec::new();
    for b in DECODE_BATCHES {
        let tok_s = bench_decode(&mut engine, b, args.decode_steps)?;
        eprintln!("decode batch {b:>3}: {tok_s:8.1} tok/s");
        decode.push(json!({"batch": b, "tok_s": tok_s}));
    }
    let prefill_512 = prefill[1]["tok_s"].as_f64().unwrap_or(0.0);
    let decode_1 = decode[0]["tok_s"].as_f64().unwrap_or(0.0);
    let decode_16 = decode[2]["tok_s"].as_f64().unwrap_or(0.0);
    let mut report = json!({
        "prefill": prefill,
        "decode": decode,
        "threads": threads,
        "cpus": args.engine.cpus.clone(),
        "cpu": cpu_name(),
        "kv_dtype": args.engine.kv_dtype.name(),
        "decode_prompt_tokens": DECODE_PROMPT,
        "ratios": {"decode_batch16_over_prefill_512": decode_16 / prefill_512},
    });
    match &args.llama_server {
        Some(server) if server.exists() => {
            eprintln!("llama.cpp comparison with {}", server.display());
            let prompts = LlamaPrompts {
                prefill_512: prompt_tokens(&engine, 512, 512)?,
                decode: prompt_tokens(&engine, DECODE_PROMPT, 0)?,
                decode_steps: args.decode_steps,
            };
            drop(engine);
            let l = llama_cpp(server, &model, threads, &prompts, args.repeats)?;
            let lp = l["prefill_512_tok_s"].as_f64().unwrap_or(f64::NAN);
            let ld = l["decode_batch1_tok_s"].as_f64().unwrap_or(f64::NAN);
            report["llama_cpp"] = l;
            report["ratios"]["prefill_512_vs_llama_cpp"] = json!(prefill_512 / lp);
            report["ratios"]["decode_batch1_vs_llama_cpp"] = json!(decode_1 / ld);
        }
        Some(server) => {
            eprintln!(
                "llama.cpp comparison skipped: {} does not exist",
                server.display()
            );
            report["llama_cpp"] = json!(null);
            report["llama_cpp_skipped"] = json!(format!("{} does not exist", server.display()));
        }
        None => {
            eprintln!("llama.cpp comparison skipped: no --llama-server given");
            report["llama_cpp"] = json!(null);
            report["llama_cpp_skipped"] = json!("no --llama-server given");
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "xpyd bench engine — {} threads, cpus {}, {}",
        r["threads"], r["cpus"], r["cpu"]
    );
    println!(
        "{:<22} {:>12} {:>14} {:>8}",
        "measure", "xpyd tok/s", "llama.cpp", "ratio"
    );
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let l = &r["llama_cpp"];
    // One row; the llama.cpp columns only where the bench measured llama.cpp too.
    let row = |label: String, ours: f64, theirs: Option<(&str, &str)>| {
        let (lc, ratio) = match theirs {
            Some((key, ratio_key)) if !l.is_null() => (
                format!("{:.1}", f(&l[key])),
                format!("{:.2}", f(&r["ratios"][ratio_key])),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!("{label:<22} {ours:>12.1} {lc:>14} {ratio:>8}");
    };
    for p in r["prefill"].as_array().into_iter().flatten() {
        let n = p["prompt_tokens"].as_u64().unwrap_or(0);
        let theirs = (n == 512).then_some(("prefill_512_tok_s", "prefill_512_vs_llama_cpp"));
        row(format!("prefill {n} tok"), f(&p["tok_s"]), theirs);
    }
    for d in r["decode"].as_array().into_iter().flatten() {
        let b = d["batch"].as_u64().unwrap_or(0);
        let theirs = (b == 1).then_some(("decode_batch1_tok_s", "decode_batch1_vs_llama_cpp"));
        row(format!("decode batch {b}"), f(&d["tok_s"]), theirs);
    }
    println!(
        "batch-16 decode / 512-token prefill: {:.2}",
        r["ratios"]["decode_batch16_over_prefill_512"]
            .as_f64()
            .unwrap_or(0.0)
    );
    if let Some(why) = r["llama_cpp_skipped"].as_str() {
        println!("llama.cpp comparison skipped: {why}");
    }
}
