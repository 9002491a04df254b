//! `xpyd generate`: one prompt through the engine in this process, streamed to stdout.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::time::Instant;
use xpyd_engine::{ChatMessage, Engine, EngineConfig, SamplingParams};

/// Flags of `xpyd generate` (besides the engine flags, which the CLI adds).
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template (the prompt is one user message).
    #[arg(long)]
    pub chat: bool,
    /// System message for `--chat`.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print the generated token ids to stderr as JSON.
    #[arg(long)]
    pub print_ids: bool,
}

/// Runs `xpyd generate` on an engine configured by `cfg`.
pub fn run(args: &GenerateArgs, cfg: EngineConfig) -> Result<()> {
    let t0 = Instant::now();
    let mut engine = Engine::load(cfg)?;
    let load = t0.elapsed();
    let prompt = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &args.prompt));
        engine.tokenizer().encode_chat(&msgs)?
    } else {
        engine.tokenizer().encode(&args.prompt)?
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let n_prompt = prompt.len();
    let t1 = Instant::now();
    let mut first = None;
    let mut out = std::io::stdout().lock();
    let generation = engine.generate(0, prompt, params, &mut |ev| {
        first.get_or_insert_with(|| t1.elapsed());
        let _ = out.write_all(ev.text.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    let total = t1.elapsed();
    let ttft = first.unwrap_or(total);
    let decode_tokens = generation.tokens.len().saturating_sub(1);
    let decode_s = (total - ttft).as_secs_f64();
    if args.print_ids {
        eprintln!("{}", serde_json::to_string(&generation.tokens)?);
    }
    eprintln!(
        "load {:.2}s | prompt {} tok, ttft {:.3}s ({:.1} tok/s) | {} tok generated, decode {:.1} tok/s | finish {}",
        load.as_secs_f64(),
        n_prompt,
        ttft.as_secs_f64(),
        n_prompt as f64 / ttft.as_secs_f64(),
        generation.tokens.len(),
        if decode_s > 0.0 {
            decode_tokens as f64 / decode_s
        } else {
            0.0
        },
        generation.finish.as_openai(),
    );
    Ok(())
}
