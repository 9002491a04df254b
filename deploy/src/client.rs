//! Small clients of a running cluster: `xpyd status` (topology from `/v1/cluster`),
//! `xpyd chat` (streams a chat completion over SSE), and the state file through which
//! `xpyd up` tells them where the cluster listens. Every call has a timeout, so a
//! coordinator that accepts but never answers cannot hang the CLI.

use crate::exit::UsageError;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;
use xpyd_bench::http::get_json;

/// Bound of `xpyd status`'s request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of connecting to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence of a streamed chat answer (each read restarts it): above the
/// coordinator's own inactivity limit (`first_token_timeout_s`, at most 1,200 s), so the
/// coordinator reports a stalled request before the client gives up on it.
const CHAT_READ_TIMEOUT: Duration = Duration::from_secs(1_260);

/// Where `xpyd up` records a running cluster's URLs.
pub fn state_file(name: &str) -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("xpyd")
        .join("run")
        .join(format!("{name}.json"))
}

/// Where a running cluster listens (the state file's content).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterState {
    /// The coordinator's HTTP URL.
    pub http: String,
    /// The coordinator's gRPC URL.
    pub grpc: String,
    /// The supervisor's control endpoint.
    #[serde(default)]
    pub control: String,
    /// The `xpyd up` process.
    pub pid: u32,
}

/// Records where a cluster listens.
pub fn write_state(name: &str, state: &ClusterState) -> Result<()> {
    let p = state_file(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let v = serde_json::to_string(state)?;
    std::fs::write(&p, v).with_context(|| format!("write {}", p.display()))
}

/// The state of the running cluster of the manifest at `file`.
///
/// # Errors
/// A manifest that does not load, or no running cluster of that name.
pub fn read_state(file: &std::path::Path) -> Result<ClusterState> {
    let m = crate::manifest::Manifest::load(file)?;
    let p = state_file(&m.name);
    let s = std::fs::read_to_string(&p)
        .with_context(|| format!("no running cluster `{}` ({} missing)", m.name, p.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{} is not a cluster state", p.display()))
}

/// Which cluster a client talks to.
#[derive(Debug, Args)]
pub struct Target {
    /// Coordinator HTTP URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: Option<String>,
    /// Or the manifest a running `xpyd up` was started with.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
}

impl Target {
    /// The coordinator's HTTP URL: `--url`, or from the running cluster's state file.
    ///
    /// # Errors
    /// Neither given, or no running cluster of that manifest.
    pub fn http(&self) -> Result<String> {
        if let Some(u) = &self.url {
            return Ok(u.trim_end_matches('/').to_string());
        }
        let Some(f) = &self.file else {
            return Err(UsageError("give --url or -f MANIFEST".into()).into());
        };
        Ok(read_state(f)?.http)
    }
}

/// `xpyd status`.
pub fn status(t: &Target) -> Result<()> {
    let http = t.http()?;
    let v = get_json(&format!("{http}/v1/cluster"), STATUS_TIMEOUT)?;
    println!(
        "mode {}  routing prefill={} decode={}  queued {}",
        v["mode"].as_str().unwrap_or("?"),
        v["routing"]["prefill"].as_str().unwrap_or("?"),
        v["routing"]["decode"].as_str().unwrap_or("?"),
        v["queued"]
    );
    println!(
        "{:<12} {:<9} {:<28} {:<6} {:>8} {:>7} {:>7} {:>10} {:>9} {:>9}",
        "worker",
        "role",
        "grpc",
        "state",
        "inflight",
        "queued",
        "running",
        "kv used",
        "ttft ms",
        "tpot ms"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<9} {:<28} {:<6} {:>8} {:>7} {:>7} {:>10} {:>9.1} {:>9.1}",
            w["worker_id"].as_str().unwrap_or(""),
            w["role"].as_str().unwrap_or(""),
            w["grpc_url"].as_str().unwrap_or(""),
            w["state"].as_str().unwrap_or(""),
            w["inflight"],
            w["queued"],
            w["running"],
            format!(
                "{}/{}",
                w["kv_blocks_used"],
                w["kv_blocks_used"].as_u64().unwrap_or(0)
                    + w["kv_blocks_free"].as_u64().unwrap_or(0)
            ),
            w["ttft_ms"].as_f64().unwrap_or(0.0),
            w["tpot_ms"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Streams one chat completion for `messages`, writing deltas to `out`; returns the text.
fn stream_chat(
    http: &str,
    messages: &Value,
    max_tokens: u32,
    temperature: f64,
    out: &mut dyn Write,
) -> Result<String> {
    let body = json!({"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": true});
    let resp = xpyd_bench::http::with_auth(
        xpyd_bench::http::agent().post(&format!("{http}/v1/chat/completions")),
    )
    .header("content-type", "application/json")
    .config()
    .http_status_as_error(false)
    .timeout_connect(Some(CONNECT_TIMEOUT))
    .timeout_per_read(Some(CHAT_READ_TIMEOUT))
    .build()
    .send(body.to_string())
    .context("POST /v1/chat/completions")?;
    let status = resp.status();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if !status.is_success() {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut s);
        bail!("HTTP {status}: {s}");
    }
    let mut text = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                bail!("{}", e["message"].as_str().unwrap_or("request failed"));
            }
            if let Some(d) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(d);
                write!(out, "{d}")?;
                out.flush()?;
            }
        }
        line.clear();
    }
    writeln!(out)?;
    Ok(text)
}

/// One user message, streamed.
pub fn chat_once(http: &str, prompt: &str, max_tokens: u32, out: &mut dyn Write) -> Result<()> {
    let msgs = json!([{"role": "user", "content": prompt}]);
    stream_chat(http, &msgs, max_tokens, 0.0, out).map(|_| ())
}

/// Flags of `xpyd chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    target: Target,
    /// Send this one message and exit (default: read messages from stdin, one per line).
    #[arg(long)]
    prompt: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
}

/// `xpyd chat`: a streaming client that keeps the conversation.
pub fn chat(a: &ChatArgs) -> Result<()> {
    let http = a.target.http()?;
    let mut out = std::io::stdout();
    if let Some(p) = &a.prompt {
        let msgs = json!([{"role": "user", "content": p}]);
        return stream_chat(&http, &msgs, a.max_tokens, a.temperature, &mut out).map(|_| ());
    }
    let mut history: Vec<Value> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        let answer = stream_chat(
            &http,
            &Value::Array(history.clone()),
            a.max_tokens,
            a.temperature,
            &mut out,
        )?;
        history.push(json!({"role": "assistant", "content": answer}));
    }
    Ok(())
}
