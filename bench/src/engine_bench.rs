//! `xpyd bench engine`: prefill and decode throughput of the engine on the real model,
//! compared in the same run with llama.cpp's `llama-server` on the same GGUF and threads.
//! The two alternate round by round (`--rounds`, default 5), so one noisy moment of the
//! machine does not decide a ratio: each figure is the median of its rounds with their
//! range, and each ratio the median of the rounds' paired ratios.

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
    /// Decode steps timed per batch size (256: about 2 s at batch 1, long enough that one
    /// noisy moment of a shared machine does not decide a round).
    #[arg(long, default_value_t = 256)]
    pub decode_steps: usize,
    /// Timed repetitions per prefill length in a round (the round's best counts; every
    /// length gets as many, so the 2,048 / 512 ratio compares like with like).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Rounds; xpyd's and llama.cpp's measurements alternate, round by round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
}

/// Median, minimum and maximum of one measure's rounds.
pub fn spread(xs: &[f64]) -> Value {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return json!({"median": null, "min": null, "max": null, "rounds": xs});
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!({"median": median, "min": v[0], "max": v[n - 1], "rounds": xs})
}

const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from \
those used for wine. Books became cheaper, literacy spread, and ideas crossed borders faster \
than ever before. Scholars could compare identical copies, errors were corrected in later \
editions, and vernacular languages gained standard spellings. ";
const PREFILL_LENGTHS: [usize; 3] = [128, 512, 2048];
const DECODE_BATCHES: [usize; 3] = [1, 4, 16];
const DECODE_PROMPT: usize = 64;
/// Bound of one llama-server completion (a 2,048-token prefill or a short decode).
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

/// A running llama-server on the same model and threads.
struct Llama {
    _server: Server,
    base: String,
}

impl Llama {
    fn start(server: &Path, model: &Path, threads: usize) -> Result<Self> {
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
        let llama = Llama {
            _server: Server(child),
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http::get_text(&format!("{}/health", llama.base), Duration::from_secs(2)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("llama-server did not become healthy within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(llama)
    }

    fn completion(&self, prompt: &[u32], n_predict: usize) -> Result<Value> {
        let r = http::post_json(
            &format!("{}/completion", self.base),
            &json!({"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": true, "cache_prompt": false}),
            COMPLETION_TIMEOUT,
        )?;
        Ok(r["timings"].clone())
    }

    /// Prefill tok/s of `prompt`, the best of `repeats`.
    fn prefill(&self, prompt: &[u32], repeats: usize) -> Result<f64> {
        let mut best: f64 = 0.0;
        for _ in 0..repeats.max(1) {
            best = best.max(
                self.completion(prompt, 1)?["prompt_per_second"]
                    .as_f64()
                    .unwrap_or(0.0),
            );
        }
        Ok(best)
    }

    /// One round: prefill 512 and 2,048 tok/s (as xpyd's, each the best of `repeats`)
    /// and decode batch 1 tok/s.
    fn measure(&self, prompts: &LlamaPrompts, repeats: usize) -> Result<LlamaRound> {
        Ok(LlamaRound {
            prefill_512: self.prefill(&prompts.prefill_512, repeats)?,
            prefill_2048: self.prefill(&prompts.prefill_2048, repeats)?,
            decode: self.completion(&prompts.decode, prompts.decode_steps)?["predicted_per_second"]
                .as_f64()
                .unwrap_or(0.0),
        })
    }
}

struct LlamaPrompts {
    prefill_512: Vec<u32>,
    prefill_2048: Vec<u32>,
    decode: Vec<u32>,
    decode_steps: usize,
}

/// One round of llama-server's measurements (tok/s).
struct LlamaRound {
    prefill_512: f64,
    prefill_2048: f64,
    decode: f64,
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
    let prompts = LlamaPrompts {
        prefill_512: prompt_tokens(&engine, 512, 512)?,
        prefill_2048: prompt_tokens(&engine, 2048, 2048)?,
        decode: prompt_tokens(&engine, DECODE_PROMPT, 0)?,
        decode_steps: args.decode_steps,
    };
    let mut skipped = None;
    let llama = match &args.llama_server {
        Some(server) if server.exists() => {
            eprintln!("llama.cpp comparison with {}", server.display());
            let l = Llama::start(server, &model, threads)?;
            l.completion(&prompts.prefill_512[..128], 1)?; // warm-up
            Some(l)
        }
        Some(server) => {
            skipped = Some(format!("{} does not exist", server.display()));
            None
        }
        None => {
            skipped = Some("no --llama-server given".to_string());
            None
        }
    };
    let rounds = args.rounds as usize;
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); PREFILL_LENGTHS.len()];
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); DECODE_BATCHES.len()];
    let (mut l_prefill, mut l_long, mut l_decode) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for (i, n) in PREFILL_LENGTHS.iter().enumerate() {
            prefill[i].push(bench_prefill(&mut engine, *n, args.repeats)?);
        }
        for (i, b) in DECODE_BATCHES.iter().enumerate() {
            decode[i].push(bench_decode(&mut engine, *b, args.decode_steps)?);
        }
        let mut line = format!(
            "round {}/{rounds}: xpyd prefill 512 {:.1} tok/s, decode 1 {:.1} tok/s",
            round + 1,
            prefill[1][round],
            decode[0][round]
        );
        if let Some(l) = &llama {
            let m = l.measure(&prompts, args.repeats)?;
            l_prefill.push(m.prefill_512);
            l_long.push(m.prefill_2048);
            l_decode.push(m.decode);
            line.push_str(&format!(
                "; llama.cpp {:.1}, {:.1}",
                m.prefill_512, m.decode
            ));
        }
        eprintln!("{line}");
    }
    drop(llama);
    let median = |v: &Value| v["median"].as_f64().unwrap_or(0.0);
    let prefill_json: Vec<Value> = PREFILL_LENGTHS
        .iter()
        .zip(&prefill)
        .map(|(n, xs)| {
            let s = spread(xs);
            json!({"prompt_tokens": n, "tok_s": median(&s), "spread": s})
        })
        .collect();
    let decode_json: Vec<Value> = DECODE_BATCHES
        .iter()
        .zip(&decode)
        .map(|(b, xs)| {
            let s = spread(xs);
            json!({"batch": b, "tok_s": median(&s), "spread": s})
        })
        .collect();
    let prefill_512 = prefill_json[1]["tok_s"].as_f64().unwrap_or(0.0);
    let decode_16 = decode_json[2]["tok_s"].as_f64().unwrap_or(0.0);
    // Paired: each round's ratio, then their median.
    let paired = |ours: &[f64], theirs: &[f64]| -> Vec<f64> {
        ours.iter().zip(theirs).map(|(a, b)| a / b).collect()
    };
    let long_over_512 = spread(&paired(&prefill[2], &prefill[1]));
    let mut report = json!({
        "prefill": prefill_json,
        "decode": decode_json,
        "rounds": rounds,
        "kernels": format!("{:?}", xpyd_engine::cpu::level()),
        "threads": threads,
        "cpus": args.engine.cpus.clone(),
        "cpu": cpu_name(),
        "kv_dtype": args.engine.kv_dtype.name(),
        "decode_prompt_tokens": DECODE_PROMPT,
        "ratios": {
            "decode_batch16_over_prefill_512": decode_16 / prefill_512,
            "prefill_2048_over_512": median(&long_over_512),
            "prefill_2048_over_512_spread": long_over_512,
        },
    });
    match skipped {
        Some(why) => {
            eprintln!("llama.cpp comparison skipped: {why}");
            report["llama_cpp"] = json!(null);
            report["llama_cpp_skipped"] = json!(why);
        }
        None => {
            let (lp, ll, ld) = (spread(&l_prefill), spread(&l_long), spread(&l_decode));
            let (rp, rl, rd) = (
                spread(&paired(&prefill[1], &l_prefill)),
                spread(&paired(&prefill[2], &l_long)),
                spread(&paired(&decode[0], &l_decode)),
            );
            let l_long_over_512 = spread(&paired(&l_long, &l_prefill));
            report["llama_cpp"] = json!({
                "prefill_512_tok_s": median(&lp), "decode_batch1_tok_s": median(&ld),
                "prefill_2048_tok_s": median(&ll),
                "prefill_512_spread": lp, "prefill_2048_spread": ll, "decode_batch1_spread": ld,
                "prefill_2048_over_512": median(&l_long_over_512),
                "prefill_2048_over_512_spread": l_long_over_512,
            });
            report["ratios"]["prefill_512_vs_llama_cpp"] = json!(median(&rp));
            report["ratios"]["prefill_2048_vs_llama_cpp"] = json!(median(&rl));
            report["ratios"]["prefill_2048_vs_llama_cpp_spread"] = rl;
            report["ratios"]["decode_batch1_vs_llama_cpp"] = json!(median(&rd));
            report["ratios"]["prefill_512_vs_llama_cpp_spread"] = rp;
            report["ratios"]["decode_batch1_vs_llama_cpp_spread"] = rd;
        }
    }
    report_out(&report, args.json, args.out.as_deref(), print_table)
}

/// Writes `report` to `out` (pretty JSON) when given, and prints it: one JSON line
/// with `json`, else as `table` lays it out.
///
/// # Errors
/// When `out` cannot be written.
pub fn report_out(report: &Value, json: bool, out: Option<&Path>, table: fn(&Value)) -> Result<()> {
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(report)?)?;
    }
    if json {
        println!("{report}");
    } else {
        table(report);
    }
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "xpyd bench engine — {} threads, cpus {}, {}, kernels {}; medians of {} rounds [min–max]",
        r["threads"], r["cpus"], r["cpu"], r["kernels"], r["rounds"]
    );
    println!(
        "{:<18} {:>22} {:>22} {:>20}",
        "measure", "xpyd tok/s", "llama.cpp tok/s", "ratio (paired)"
    );
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let cell = |s: &Value, d: usize| {
        format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            f(&s["median"]),
            f(&s["min"]),
            f(&s["max"])
        )
    };
    let l = &r["llama_cpp"];
    // One row; the llama.cpp columns only where the bench measured llama.cpp too.
    let row = |label: String, ours: &Value, theirs: Option<(&str, &str)>| {
        let (lc, ratio) = match theirs {
            Some((key, ratio_key)) if !l.is_null() => {
                (cell(&l[key], 1), cell(&r["ratios"][ratio_key], 2))
            }
            _ => ("-".into(), "-".into()),
        };
        println!("{label:<18} {:>22} {lc:>22} {ratio:>20}", cell(ours, 1));
    };
    for p in r["prefill"].as_array().into_iter().flatten() {
        let n = p["prompt_tokens"].as_u64().unwrap_or(0);
        let theirs = match n {
            512 => Some(("prefill_512_spread", "prefill_512_vs_llama_cpp_spread")),
            2048 => Some(("prefill_2048_spread", "prefill_2048_vs_llama_cpp_spread")),
            _ => None,
        };
        row(format!("prefill {n} tok"), &p["spread"], theirs);
    }
    for d in r["decode"].as_array().into_iter().flatten() {
        let b = d["batch"].as_u64().unwrap_or(0);
        let theirs =
            (b == 1).then_some(("decode_batch1_spread", "decode_batch1_vs_llama_cpp_spread"));
        row(format!("decode batch {b}"), &d["spread"], theirs);
    }
    println!(
        "batch-16 decode / 512-token prefill: {:.2}",
        r["ratios"]["decode_batch16_over_prefill_512"]
            .as_f64()
            .unwrap_or(0.0)
    );
    let over = |v: &Value| cell(&v["prefill_2048_over_512_spread"], 2);
    if l.is_null() {
        println!("prefill 2048 / 512 (paired): xpyd {}", over(&r["ratios"]));
    } else {
        println!(
            "prefill 2048 / 512 (paired): xpyd {}, llama.cpp {}",
            over(&r["ratios"]),
            over(l)
        );
    }
    if let Some(why) = r["llama_cpp_skipped"].as_str() {
        println!("llama.cpp comparison skipped: {why}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_is_the_median_and_range_of_the_rounds() {
        let s = super::spread(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!(
            (s["median"].as_f64(), s["min"].as_f64(), s["max"].as_f64()),
            (Some(2.0), Some(1.0), Some(3.0))
        );
        assert_eq!(super::spread(&[4.0, 1.0, 2.0, 3.0])["median"], 2.5);
        assert!(super::spread(&[])["median"].is_null());
    }
}
