//! `xpyd bench quality`: perplexity of the model on a fixed text, computed the way
//! llama.cpp's `llama-perplexity` computes it (windows of `--ctx` tokens, each scored on
//! its second half), by the serving engine (the GGUF's own blocks, 8-bit activations),
//! by xpyd's f32 reference (dense f32 weights and activations) and — given its path —
//! by `llama-perplexity` on the same GGUF and text, in the same run.
//!
//! The shipped text is the GNU GPL v3 (`bench/data/quality/gpl-3.0.txt`, Debian's
//! `/usr/share/common-licenses/GPL-3`; its own notice lets anyone copy it verbatim).

use crate::engine_args::EngineArgs;
use crate::engine_bench::{cpu_name, report_out};
use crate::host::Host;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use xpyd_engine::{Engine, EngineConfig};

/// The shipped text.
pub const TEXT: &str = include_str!("../data/quality/gpl-3.0.txt");
/// Its name in reports.
const TEXT_NAME: &str = "gpl-3.0.txt (GNU GPL v3, verbatim)";

/// Flags of `xpyd bench quality`.
#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Engine flags (model, threads, pinning).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Another text file instead of the shipped one.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window (llama-perplexity's `-c`).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows (default: every whole window of the text).
    #[arg(long)]
    pub max_chunks: Option<usize>,
    /// Path to llama.cpp's `llama-perplexity` for the same-run comparison.
    #[arg(long)]
    pub llama_perplexity: Option<PathBuf>,
    /// Skip the f32 reference (it is several times slower).
    #[arg(long)]
    pub no_reference: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl QualityArgs {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// A message naming the flag.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(16..=8192).contains(&self.ctx) || !self.ctx.is_multiple_of(2) {
            return Err(format!("--ctx: {} is not an even 16..=8192", self.ctx));
        }
        if self.max_chunks == Some(0) {
            return Err("--max-chunks: must be at least 1".into());
        }
        Ok(())
    }
}

/// The windows llama-perplexity scores: `tokens` cut into whole windows of `ctx` (the
/// first token of each replaced by BOS when the model adds one), at most `max`.
pub fn windows(tokens: &[u32], ctx: usize, bos: Option<u32>, max: Option<usize>) -> Vec<Vec<u32>> {
    let n = (tokens.len() / ctx).min(max.unwrap_or(usize::MAX));
    (0..n)
        .map(|i| {
            let mut w = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect()
}

/// Negative log-likelihood summed over a window's second half, as llama-perplexity
/// counts it: `logprobs[j]` is the logprob of token `j + 1`, and tokens
/// `ctx/2 + 1 ..= ctx - 1` are scored. Returns (sum, count).
pub fn second_half_nll(logprobs: &[f32]) -> (f64, usize) {
    let ctx = logprobs.len() + 1;
    let scored = &logprobs[ctx / 2..];
    (scored.iter().map(|l| -f64::from(*l)).sum(), scored.len())
}

/// One engine's perplexity over the windows: (ppl, scored tokens, seconds).
fn perplexity(cfg: EngineConfig, windows: &[Vec<u32>]) -> Result<(f64, usize, f64)> {
    let mut engine = Engine::load(cfg)?;
    let t = Instant::now();
    let (mut nll, mut count) = (0.0, 0);
    for w in windows {
        let (s, c) = second_half_nll(&engine.score(w)?);
        nll += s;
        count += c;
    }
    Ok(((nll / count as f64).exp(), count, t.elapsed().as_secs_f64()))
}

/// `Final estimate: PPL = 12.3456 +/- 0.12345` from llama-perplexity's output.
pub fn parse_llama_ppl(output: &str) -> Option<(f64, f64)> {
    let line = output
        .lines()
        .find(|l| l.contains("Final estimate: PPL ="))?;
    let rest = line.split("PPL =").nth(1)?.trim();
    let mut parts = rest.split("+/-");
    let ppl = parts.next()?.trim().parse().ok()?;
    let err = parts.next()?.trim().parse().ok()?;
    Some((ppl, err))
}

/// Runs the benchmark.
///
/// # Errors
/// When the model or text cannot be read, an engine fails, or llama-perplexity fails.
pub fn run(args: &QualityArgs, host: &Host) -> Result<()> {
    let threads = xpyd_engine::compute::init(&Default::default())?;
    let cfg = args.engine.engine_config(host)?;
    let model = cfg.model_path.clone();
    let (text, name) = match &args.text {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("--text {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (TEXT.to_string(), TEXT_NAME.to_string()),
    };
    let info = xpyd_engine::ModelInfo::load(&model)?;
    let tokens = info.tokenizer.encode(&text)?;
    let bos = info.tokenizer.bos_added();
    let wins = windows(&tokens, args.ctx, bos, args.max_chunks);
    if wins.is_empty() {
        bail!(
            "the text has {} tokens: fewer than one window of --ctx {}",
            tokens.len(),
            args.ctx
        );
    }
    let mut serving = cfg.clone();
    serving.prefill_chunk = args.ctx;
    eprintln!(
        "{} tokens, {} windows of {}: the serving engine…",
        tokens.len(),
        wins.len(),
        args.ctx
    );
    let (ppl, scored, secs) = perplexity(serving.clone(), &wins)?;
    let mut report = json!({
        "text": name,
        "text_tokens": tokens.len(),
        "ctx": args.ctx,
        "windows": wins.len(),
        "scored_tokens": scored,
        "threads": threads,
        "cpus": args.engine.cpus.clone(),
        "cpu": cpu_name(),
        "xpyd": {"ppl": ppl, "seconds": secs},
    });
    if !args.no_reference {
        eprintln!("the f32 reference…");
        let mut reference = serving.clone();
        reference.reference_f32 = true;
        let (rppl, _, rsecs) = perplexity(reference, &wins)?;
        report["reference_f32"] = json!({"ppl": rppl, "seconds": rsecs});
        report["ratios"]["xpyd_over_reference"] = json!(ppl / rppl);
    }
    match &args.llama_perplexity {
        Some(bin) => {
            eprintln!("llama-perplexity…");
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("text.txt");
            std::fs::write(&path, &text)?;
            let t = Instant::now();
            let mut cmd = Command::new(bin);
            cmd.arg("-m")
                .arg(&model)
                .arg("-f")
                .arg(&path)
                .args(["-c", &args.ctx.to_string()])
                .args(["-b", &args.ctx.to_string()])
                .args(["-t", &threads.to_string()]);
            if let Some(n) = args.max_chunks {
                cmd.args(["--chunks", &n.to_string()]);
            }
            let out = cmd
                .output()
                .with_context(|| format!("running {}", bin.display()))?;
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let Some((lppl, lerr)) = parse_llama_ppl(&all) else {
                bail!(
                    "{} gave no `Final estimate` ({}):\n{}",
                    bin.display(),
                    out.status,
                    all.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                );
            };
            report["llama_cpp"] =
                json!({"ppl": lppl, "stderr": lerr, "seconds": t.elapsed().as_secs_f64()});
            report["ratios"]["xpyd_over_llama_cpp"] = json!(ppl / lppl);
        }
        None => {
            eprintln!("llama.cpp comparison skipped: no --llama-perplexity given");
            report["llama_cpp"] = Value::Null;
        }
    }
    report_out(&report, args.json, args.out.as_deref(), print_table)
}

fn print_table(r: &Value) {
    println!(
        "xpyd bench quality — {}: {} tokens, {} windows of {} ({} scored); {} threads, cpus {}, {}",
        r["text"].as_str().unwrap_or(""),
        r["text_tokens"],
        r["windows"],
        r["ctx"],
        r["scored_tokens"],
        r["threads"],
        r["cpus"],
        r["cpu"]
    );
    println!("{:<34} {:>10} {:>10}", "engine", "perplexity", "seconds");
    for (label, key) in [
        ("xpyd (Q4_1 blocks, 8-bit acts)", "xpyd"),
        ("xpyd f32 reference", "reference_f32"),
        ("llama.cpp llama-perplexity", "llama_cpp"),
    ] {
        let v = &r[key];
        if v.is_null() {
            continue;
        }
        println!(
            "{label:<34} {:>10.4} {:>10.1}",
            v["ppl"].as_f64().unwrap_or(f64::NAN),
            v["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }
    for (label, key) in [
        ("xpyd / f32 reference", "xpyd_over_reference"),
        ("xpyd / llama.cpp", "xpyd_over_llama_cpp"),
    ] {
        if let Some(x) = r["ratios"][key].as_f64() {
            println!("{label:<34} {x:>10.4} ({:+.2} %)", (x - 1.0) * 100.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_scoring_follow_llama_perplexity() {
        let tokens: Vec<u32> = (0..1100).collect();
        let w = windows(&tokens, 512, Some(7), None);
        assert_eq!(w.len(), 2, "whole windows only");
        assert_eq!((w[1][0], w[1][1], w[1][511]), (7, 513, 1023));
        assert_eq!(windows(&tokens, 512, None, Some(1)).len(), 1);
        // 511 logprobs for a window of 512; the second half is tokens 257..=511.
        let lp: Vec<f32> = (0..511).map(|j| -(j as f32)).collect();
        let (nll, n) = second_half_nll(&lp);
        assert_eq!(n, 255);
        assert_eq!(nll, (256..511).map(f64::from).sum::<f64>());
    }

    #[test]
    fn llama_perplexitys_final_line_parses() {
        let out = "[1]10.1,[2]11.2,\nFinal estimate: PPL = 12.3456 +/- 0.12345\n";
        assert_eq!(parse_llama_ppl(out), Some((12.3456, 0.12345)));
        assert_eq!(parse_llama_ppl("nothing"), None);
    }

    #[test]
    fn the_shipped_text_is_long_enough() {
        assert!(TEXT.len() > 30_000, "{}", TEXT.len());
        assert!(TEXT.contains("GNU GENERAL PUBLIC LICENSE"));
    }
}
