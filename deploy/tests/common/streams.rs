//! Concurrent streaming requests for the failure tests: a mix of SSE and gRPC, greedy
//! and seeded, each with its reference (one engine in this process), and a round that
//! runs them all while something goes wrong and checks every stream ends exactly.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use xpyd_engine::{Engine, EngineConfig, SamplingParams};
use xpyd_proto as pb;

/// Tokens each request generates.
pub const TOKENS: usize = 40;

/// One request of the mix: its prompt, sampling, and whether it goes over gRPC.
#[derive(Clone)]
pub struct Req {
    /// Completion prompt.
    pub prompt: String,
    /// 0 = greedy.
    pub temperature: f32,
    /// Sampler seed.
    pub seed: u64,
    /// Over gRPC `Generate` (else HTTP SSE).
    pub grpc: bool,
    /// HTTP through OpenAI's Python client (else a plain HTTP client).
    pub openai: Option<OpenAi>,
}

/// OpenAI's Python client, as a new user would stream with it.
#[derive(Clone)]
pub struct OpenAi {
    /// A Python that imports `openai`.
    pub python: String,
    /// The model name the cluster serves.
    pub model: String,
}

/// Streams a completion with OpenAI's client (no retries of its own: an error must
/// show), printing each chunk as `[monotonic time, text]`.
const OPENAI_STREAM: &str = r#"
import json, sys, time, openai
url, model, prompt, max_tokens, temperature, seed = sys.argv[1:7]
c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
s = c.completions.create(model=model, prompt=prompt, max_tokens=int(max_tokens),
    temperature=float(temperature), seed=int(seed), stream=True, extra_body={"ignore_eos": True})
for ch in s:
    if ch.choices:
        print(json.dumps([time.monotonic(), ch.choices[0].text]), flush=True)
"#;

fn stream_openai(c: &OpenAi, http: &str, r: &Req) -> Result<(String, std::time::Duration), String> {
    let out = std::process::Command::new(&c.python)
        .args(["-c", OPENAI_STREAM, http, &c.model, &r.prompt])
        .arg(TOKENS.to_string())
        .arg(r.temperature.to_string())
        .arg(r.seed.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "openai client: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (mut text, mut last, mut max) = (String::new(), None::<f64>, 0.0f64);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: (f64, String) = serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        if let Some(l) = last {
            max = max.max(v.0 - l);
        }
        last = Some(v.0);
        text.push_str(&v.1);
    }
    Ok((text, std::time::Duration::from_secs_f64(max)))
}

/// The `n` requests of round `round`: every other one seeded sampling, a quarter of them
/// per API and mode.
pub fn mix(round: usize, n: usize) -> Vec<Req> {
    (0..n)
        .map(|i| Req {
            prompt: format!("Round {round}, request {i}: the story of a lighthouse keeper"),
            temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
            seed: 1000 + i as u64,
            grpc: i % 4 >= 2,
            openai: None,
        })
        .collect()
}

/// What one engine in this process generates for the request.
pub fn reference(model: &Path, r: &Req) -> String {
    let mut cfg = EngineConfig::new(model);
    cfg.num_blocks = Some(128);
    let mut e = Engine::load(cfg).unwrap();
    let prompt = e.tokenizer().encode(&r.prompt).unwrap();
    let params = SamplingParams {
        temperature: r.temperature,
        seed: r.seed,
        ignore_eos: true,
        ..SamplingParams::greedy(TOKENS)
    };
    e.generate(1, prompt, params, &mut |_| {}).unwrap().text
}

/// Arrival gaps of a stream's chunks: the longest one (where a migration shows).
#[derive(Default)]
struct Gaps {
    last: Option<std::time::Instant>,
    max: std::time::Duration,
}

impl Gaps {
    fn tick(&mut self) {
        let now = std::time::Instant::now();
        if let Some(l) = self.last {
            self.max = self.max.max(now - l);
        }
        self.last = Some(now);
    }
}

/// Streams the request through the coordinator at `http` / `grpc`: the concatenated
/// text and the longest gap between two chunks, or the error.
pub fn stream(http: &str, grpc: &str, r: &Req) -> Result<(String, std::time::Duration), String> {
    if r.grpc {
        return stream_grpc(grpc, r);
    }
    if let Some(c) = &r.openai {
        return stream_openai(c, http, r);
    }
    let body = json!({"prompt": r.prompt, "max_tokens": TOKENS, "temperature": r.temperature,
        "seed": r.seed, "ignore_eos": true, "stream": true});
    let resp = ureq::post(&format!("{http}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    let (mut text, mut gaps) = (String::new(), Gaps::default());
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Ok((text, gaps.max));
        }
        gaps.tick();
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(v.to_string());
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
    }
    Err(format!("stream ended without [DONE] after {text:?}"))
}

fn stream_grpc(url: &str, r: &Req) -> Result<(String, std::time::Duration), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::connect(url.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt(r.prompt.clone())),
            sampling: Some(pb::Sampling {
                max_tokens: Some(TOKENS as u32),
                temperature: Some(r.temperature),
                seed: Some(r.seed),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = c
            .generate(req)
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let (mut text, mut gaps) = (String::new(), Gaps::default());
        while let Some(m) = s.message().await.map_err(|e| e.to_string())? {
            gaps.tick();
            text.push_str(&m.text);
        }
        Ok((text, gaps.max))
    })
}

/// Runs the requests concurrently; `chaos` runs once they are all in flight. Every
/// stream must end with exactly its reference. Returns each stream's longest gap
/// between two chunks.
pub fn run_round(
    http: &str,
    grpc: &str,
    reqs: &[Req],
    refs: &[String],
    chaos: impl FnOnce(),
) -> Vec<std::time::Duration> {
    let outcomes: Vec<Result<(String, std::time::Duration), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|r| s.spawn(|| stream(http, grpc, r)))
            .collect();
        chaos();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut gaps = Vec::new();
    for (i, (got, want)) in outcomes.into_iter().zip(refs).enumerate() {
        match got {
            Ok((text, gap)) => {
                assert_eq!(&text, want, "request {i} (grpc: {})", reqs[i].grpc);
                gaps.push(gap);
            }
            Err(e) => panic!("request {i} failed: {e}"),
        }
    }
    gaps
}
