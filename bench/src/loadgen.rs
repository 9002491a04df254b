//! The load generator: sends a planned set of requests to a coordinator's gRPC
//! `Inference` service (`Generate`, streamed, or `Complete`) — or to any
//! OpenAI-compatible server's streamed `POST /v1/completions` — open loop (each request
//! at its planned time, whatever the server does) or closed loop (N clients, each
//! sending its next request when the previous one ends), and records what every
//! request saw.

use crate::stats::RequestRecord;
use crate::workload::{Planned, Rng};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use xpyd_engine::Tokenizer;
use xpyd_proto::inference_client::InferenceClient;
use xpyd_proto::{GenerateRequest, Sampling, generate_request};

/// Text the prompts are cut from: the project's own documentation, so the model sees
/// real English and real tokens.
const CORPUS: &[&str] = &[
    include_str!("../../docs/ARCHITECTURE.md"),
    include_str!("../../README.md"),
];

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The target URL is not usable.
    #[error("target `{0}`: {1}")]
    Target(String, String),
    /// Prompt text could not be made.
    #[error("prompts: {0}")]
    Prompt(String),
}

/// Makes prompt text of a wanted token count from the corpus.
#[derive(Debug)]
pub struct Prompts {
    tokenizer: Tokenizer,
    corpus: Vec<u32>,
}

impl Prompts {
    /// Tokenizes the corpus with the cluster's tokenizer.
    pub fn new(tokenizer: Tokenizer) -> Result<Self, LoadError> {
        let corpus = tokenizer
            .encode(&CORPUS.join("\n\n"))
            .map_err(|e| LoadError::Prompt(e.to_string()))?;
        if corpus.is_empty() {
            return Err(LoadError::Prompt("the corpus tokenizes to nothing".into()));
        }
        Ok(Prompts { tokenizer, corpus })
    }

    /// The token ids of request `index` (its text, tokenized as the server would).
    pub fn tokens(&self, index: usize, tokens: usize, seed: u64) -> Result<Vec<u32>, LoadError> {
        self.tokenizer
            .encode(&self.text(index, tokens, seed)?)
            .map_err(|e| LoadError::Prompt(e.to_string()))
    }

    /// The text of request `index`, `tokens` tokens long once the server tokenizes it:
    /// a header unique to `index` and `seed` (so no two requests of a run, nor of two
    /// runs, share a cached prefix), then corpus text from a seeded offset. The header
    /// takes at most half the prompt: a shorter prompt gets the index alone (too short
    /// to fill a cache block with the header anyway), or no header. The body is cut to
    /// what the whole tokenizes to — a header as long as a short prompt once made the
    /// prompts of a sweep's later points a third longer than their plan.
    pub fn text(&self, index: usize, tokens: usize, seed: u64) -> Result<String, LoadError> {
        let count = |text: &str| {
            self.tokenizer
                .encode(text)
                .map(|ids| ids.len())
                .map_err(|e| LoadError::Prompt(e.to_string()))
        };
        let mut header = String::new();
        for candidate in [
            format!("Request {index} of run {seed:x}.\n"),
            format!("{index}:\n"),
        ] {
            if 2 * count(&candidate)? <= tokens {
                header = candidate;
                break;
            }
        }
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(index as u64));
        let start = rng.range(0, self.corpus.len() - 1);
        let text_of = |body: usize| -> Result<String, LoadError> {
            let ids: Vec<u32> = self
                .corpus
                .iter()
                .cycle()
                .skip(start)
                .take(body)
                .copied()
                .collect();
            let text = self
                .tokenizer
                .decode(&ids)
                .map_err(|e| LoadError::Prompt(e.to_string()))?;
            Ok(format!("{header}{text}"))
        };
        // Where header and body meet, or where the body is cut, the tokenizer may merge
        // or split a token: correct the body by what the whole comes to.
        let mut body = tokens.saturating_sub(count(&header)?).max(1);
        let mut text = text_of(body)?;
        for _ in 0..4 {
            let n = count(&text)?;
            if n == tokens || (n > tokens && body <= 1) {
                break;
            }
            body = (body + tokens).saturating_sub(n).max(1);
            text = text_of(body)?;
        }
        Ok(text)
    }
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The plan it came from.
    pub plan: Planned,
    /// Its prompt text.
    pub prompt: String,
}

/// Builds the prompt text of every planned request. `point` tells the runs of one
/// session apart (e.g. the rate points of a sweep): the same seed and point give the
/// same prompts, another point gives other prompts of the same lengths, so no run can
/// hit the prefix cache entries an earlier run left.
pub fn prepare(
    prompts: &Prompts,
    plan: &[Planned],
    seed: u64,
    point: u64,
) -> Result<Vec<Prepared>, LoadError> {
    let key = seed ^ point.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    plan.iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(Prepared {
                prompt: prompts.text(i, p.input_tokens, key)?,
                plan: p.clone(),
            })
        })
        .collect()
}

/// How requests are released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Each request at its planned time (`Planned::at`).
    Open,
    /// `n` clients, each with one request in flight.
    Closed(usize),
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Coordinator gRPC URL, e.g. `http://127.0.0.1:8001`; with `openai_model`, the base
    /// URL of an OpenAI-compatible server, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Send to an OpenAI-compatible server's `/v1/completions` (streamed, greedy,
    /// `ignore_eos`) with this model name, instead of gRPC.
    pub openai_model: Option<String>,
    /// How requests are released.
    pub arrival: Arrival,
    /// Per-request deadline; a request still running then is recorded as an error.
    pub timeout: Duration,
    /// `Generate` (streamed tokens) when true, else `Complete` (one answer; its TTFT is
    /// its end-to-end time).
    pub stream: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Label of the progress bar.
    pub label: String,
}

/// Records of one run and how long it took (run start to last completion; in open loop
/// the start is one planned inter-arrival gap before the first send).
#[derive(Debug, Clone)]
pub struct RunResult {
    /// One per request, in plan order.
    pub records: Vec<RequestRecord>,
    /// Seconds from the run start to the last completion.
    pub duration: f64,
}

/// Connects to the target (lazily: the first request dials).
pub fn connect(target: &str) -> Result<InferenceClient<Channel>, LoadError> {
    let ep = xpyd_runtime::tls::endpoint(target, crate::http::grpc_roots())
        .map_err(|e| LoadError::Target(target.to_string(), e.to_string()))?
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    Ok(InferenceClient::new(ep.connect_lazy()))
}

/// Sends every request and waits for all of them.
pub async fn run(reqs: &[Prepared], opts: &RunOptions) -> Result<RunResult, LoadError> {
    let client = match &opts.openai_model {
        None => Some(connect(&opts.target)?),
        Some(_) => None,
    };
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let bar = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let (done, errors, n, label) =
            (done.clone(), errors.clone(), reqs.len(), opts.label.clone());
        tokio::spawn(async move {
            loop {
                let d = done.load(Ordering::Relaxed);
                draw_bar(&label, d, errors.load(Ordering::Relaxed), n, t0.elapsed());
                if d >= n {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let gate = match opts.arrival {
        Arrival::Open => None,
        Arrival::Closed(n) => Some(Arc::new(Semaphore::new(n.max(1)))),
    };
    let mut tasks = Vec::with_capacity(reqs.len());
    for req in reqs {
        let permit = match &gate {
            Some(g) => Some(g.clone().acquire_owned().await.expect("never closed")),
            None => {
                let at = t0 + Duration::from_secs_f64(req.plan.at);
                tokio::time::sleep_until(at.into()).await;
                None
            }
        };
        let (client, req, timeout, stream) =
            (client.clone(), req.clone(), opts.timeout, opts.stream);
        let (done, errors) = (done.clone(), errors.clone());
        let openai = opts
            .openai_model
            .clone()
            .map(|model| (opts.target.clone(), model));
        tasks.push(tokio::spawn(async move {
            let rec = match (client, openai) {
                (Some(client), _) => one(client, &req, t0, timeout, stream).await,
                (None, Some((base, model))) => {
                    let r = req.clone();
                    tokio::task::spawn_blocking(move || one_openai(&base, &model, &r, t0, timeout))
                        .await
                        .unwrap_or_else(|e| failed(&req, t0, format!("request task: {e}")))
                }
                (None, None) => unreachable!("a client or an OpenAI target"),
            };
            drop(permit);
            if rec.error.is_some() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            done.fetch_add(1, Ordering::Relaxed);
            rec
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.expect("request task never panics"));
    }
    let duration = records
        .iter()
        .map(|r| r.sent_at + r.e2e)
        .fold(0.0, f64::max);
    if let Some(b) = bar {
        let _ = b.await;
    }
    Ok(RunResult { records, duration })
}

fn draw_bar(label: &str, done: usize, errors: usize, n: usize, elapsed: Duration) {
    const W: usize = 30;
    let fill = (done * W).checked_div(n).unwrap_or(W);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{label} [{}{}] {done}/{n} errors {errors} {:.0}s ",
        "#".repeat(fill),
        ".".repeat(W - fill),
        elapsed.as_secs_f64()
    );
    let _ = err.flush();
}

/// The record of `req`, sent at `sent` in a run that started at `t0`, before any answer.
fn unanswered(req: &Prepared, t0: Instant, sent: Instant) -> RequestRecord {
    RequestRecord {
        sent_at: sent.duration_since(t0).as_secs_f64(),
        prompt_tokens: req.plan.input_tokens,
        output_tokens: 0,
        ttft: None,
        gaps: Vec::new(),
        e2e: 0.0,
        error: None,
    }
}

/// A request that could not be sent at all.
fn failed(req: &Prepared, t0: Instant, why: String) -> RequestRecord {
    RequestRecord {
        error: Some(why),
        ..unanswered(req, t0, Instant::now())
    }
}

/// The first model an OpenAI-compatible server lists (`GET /v1/models`).
///
/// # Errors
/// When the server does not answer or lists none.
pub fn openai_model(base: &str) -> Result<String, LoadError> {
    let bad = |why: String| LoadError::Target(base.to_string(), why);
    let text = crate::http::get_text(&format!("{base}/v1/models"), Duration::from_secs(10))
        .map_err(|e| bad(format!("{e:#}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(format!("no model in /v1/models: {text}")))
}

/// One request to an OpenAI-compatible server, streamed (SSE), on a blocking thread:
/// the time of every chunk as it arrives. Each chunk before the one that carries
/// `finish_reason` is a token; `usage.completion_tokens`, when the server sends it
/// (`stream_options.include_usage`), is the count that is checked.
fn one_openai(
    base: &str,
    model: &str,
    req: &Prepared,
    t0: Instant,
    timeout: Duration,
) -> RequestRecord {
    use std::io::BufRead;
    let sent = Instant::now();
    let mut rec = unanswered(req, t0, sent);
    let body = serde_json::json!({
        "model": model, "prompt": req.prompt, "max_tokens": req.plan.output_tokens,
        "temperature": 0, "stream": true, "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    let mut streamed = || -> Result<Option<usize>, String> {
        let url = format!("{base}/v1/completions");
        let mut resp = crate::http::with_auth(crate::http::agent().post(&url))
            .header("content-type", "application/json")
            .config()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .send(body.to_string())
            .map_err(|e| format!("POST {url}: {e}"))?;
        if resp.status().as_u16() != 200 {
            let code = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            return Err(format!("HTTP {code}: {text}"));
        }
        let mut usage = None;
        let mut last = sent;
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| format!("reading the stream: {e}"))?;
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("chunk `{data}`: {e}"))?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            let Some(choice) = v["choices"].get(0) else {
                continue;
            };
            let text = choice["text"].as_str().unwrap_or("");
            if !choice["finish_reason"].is_null() && text.is_empty() {
                continue;
            }
            let now = Instant::now();
            if rec.ttft.is_none() {
                rec.ttft = Some(now.duration_since(sent).as_secs_f64());
            } else {
                rec.gaps.push(now.duration_since(last).as_secs_f64());
            }
            last = now;
            rec.output_tokens += 1;
        }
        Ok(usage)
    };
    match streamed() {
        Ok(usage) => {
            // A server that sends several tokens in one chunk: they arrived together.
            if let Some(n) = usage.filter(|n| *n > rec.output_tokens) {
                rec.gaps
                    .extend(std::iter::repeat_n(0.0, n - rec.output_tokens));
                rec.output_tokens = n;
            }
            if rec.output_tokens != req.plan.output_tokens {
                rec.error = Some(format!(
                    "got {} of {} tokens",
                    rec.output_tokens, req.plan.output_tokens
                ));
            }
        }
        Err(e) => rec.error = Some(e),
    }
    rec.e2e = sent.elapsed().as_secs_f64();
    rec
}

/// One request: the time of every token as it arrives.
async fn one(
    mut client: InferenceClient<Channel>,
    req: &Prepared,
    t0: Instant,
    timeout: Duration,
    stream: bool,
) -> RequestRecord {
    let sent = Instant::now();
    let mut rec = unanswered(req, t0, sent);
    let body = GenerateRequest {
        model: String::new(),
        input: Some(generate_request::Input::Prompt(req.prompt.clone())),
        sampling: Some(Sampling {
            max_tokens: Some(req.plan.output_tokens as u32),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        priority: None,
    };
    // The process's API key (`$XPYD_API_KEY`), when it has one.
    let auth = crate::http::authorization().and_then(|a| a.parse().ok());
    let body = {
        let mut r = tonic::Request::new(body);
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a);
        }
        r
    };
    let streamed = async {
        if !stream {
            let resp = client.complete(body).await?.into_inner();
            rec.ttft = Some(sent.elapsed().as_secs_f64());
            rec.output_tokens = resp.token_ids.len();
            if let Some(u) = resp.usage {
                rec.prompt_tokens = u.prompt_tokens as usize;
            }
            return Ok(());
        }
        let mut stream = client.generate(body).await?.into_inner();
        let mut last = sent;
        while let Some(msg) = stream.message().await? {
            let now = Instant::now();
            for (i, _) in msg.token_ids.iter().enumerate() {
                if rec.ttft.is_none() {
                    rec.ttft = Some(now.duration_since(sent).as_secs_f64());
                } else {
                    // Tokens that arrive in one message arrived together.
                    rec.gaps.push(if i == 0 {
                        now.duration_since(last).as_secs_f64()
                    } else {
                        0.0
                    });
                }
                rec.output_tokens += 1;
            }
            if !msg.token_ids.is_empty() {
                last = now;
            }
            if let Some(u) = msg.usage {
                rec.prompt_tokens = u.prompt_tokens as usize;
            }
        }
        Ok::<(), tonic::Status>(())
    };
    match tokio::time::timeout(timeout, streamed).await {
        Ok(Ok(())) if rec.output_tokens == req.plan.output_tokens => {}
        Ok(Ok(())) => {
            rec.error = Some(format!(
                "got {} of {} tokens",
                rec.output_tokens, req.plan.output_tokens
            ))
        }
        Ok(Err(s)) => rec.error = Some(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => rec.error = Some(format!("no answer within {timeout:?}")),
    }
    rec.e2e = sent.elapsed().as_secs_f64();
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real model's tokenizer (the file `env::MODEL` names): `None` (skip) locally
    /// when missing, a failure in CI.
    fn real_tokenizer() -> Option<Tokenizer> {
        let Some(path) = std::env::var_os(xpyd_runtime::env::MODEL)
            .filter(|p| std::path::Path::new(p).is_file())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is not a file; run ./scripts/test.sh",
                xpyd_runtime::env::MODEL
            );
            return None;
        };
        Some(
            xpyd_engine::ModelInfo::load(std::path::Path::new(&path))
                .unwrap()
                .tokenizer,
        )
    }

    #[test]
    fn prompts_tokenize_to_their_planned_length_whatever_the_run_key() {
        let Some(tok) = real_tokenizer() else { return };
        let prompts = Prompts::new(tok).unwrap();
        // The keys of a sweep's later points are 64-bit hashes: their header alone is
        // longer than a short prompt.
        let keys = [1, 7 ^ 3u64.wrapping_mul(0x9E37_79B9_7F4A_7C15), u64::MAX];
        let mut off = 0;
        let mut texts = std::collections::HashSet::new();
        for key in keys {
            for (index, tokens) in [
                (0, 1),
                (1, 4),
                (2, 8),
                (3, 9),
                (12, 17),
                (345, 32),
                (6, 256),
                (7, 2048),
            ] {
                let n = prompts.tokens(index, tokens, key).unwrap().len();
                assert!(
                    n.abs_diff(tokens) <= 1,
                    "key {key:x}: {tokens} planned, {n} made"
                );
                off += n.abs_diff(tokens);
                if tokens >= 16 {
                    assert!(texts.insert(prompts.text(index, tokens, key).unwrap()));
                }
            }
        }
        assert!(off <= 2, "{off} tokens off over 24 prompts");
    }
}
