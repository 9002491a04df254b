//! One request through the cluster. Disaggregated: take a decode slot (priority queue,
//! decode policy), pick a prefill worker (prefill policy), open the decode stream (which
//! reserves KV and returns the transfer target), run the prefill against that target,
//! emit its first token, then relay the decode stream. Single mode: one combined worker
//! does both. A prefill failing before the first token is retried once on another pair;
//! a client that leaves (its receiver dropped) or a deadline ends every leg, and dropping
//! the worker calls frees their KV.

use crate::App;
use crate::cluster::{RouteFacts, Slot};
use crate::error::{ApiError, from_worker, retryable};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;
use xpyd_engine::{FinishReason, SamplingParams};
use xpyd_proto as pb;
use xpyd_proto::decode_worker_client::DecodeWorkerClient;
use xpyd_proto::prefill_worker_client::PrefillWorkerClient;
use xpyd_runtime::metrics as m;
use xpyd_runtime::worker::sampling_to_pb;

/// A validated request, tokenized once.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Prompt tokens.
    pub tokens: Arc<[u32]>,
    /// Sampling.
    pub params: SamplingParams,
    /// SLO class 0..=3.
    pub class: u8,
    /// Client address.
    pub source_ip: Option<std::net::IpAddr>,
    /// Which API (metrics label).
    pub api: &'static str,
}

/// Token usage of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Both.
    pub total_tokens: u32,
    /// Prompt tokens whose KV came from a worker's prefix cache.
    pub cached_tokens: u32,
}

/// OpenAI's shape: `cached_tokens` under `prompt_tokens_details`.
impl serde::Serialize for Usage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Details {
            cached_tokens: u32,
        }
        #[derive(serde::Serialize)]
        struct OpenAi {
            prompt_tokens: u32,
            completion_tokens: u32,
            total_tokens: u32,
            prompt_tokens_details: Details,
        }
        OpenAi {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            prompt_tokens_details: Details {
                cached_tokens: self.cached_tokens,
            },
        }
        .serialize(s)
    }
}

/// What the API layer streams to its client.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Text of one token (may be empty while a stop string is pending).
    Text {
        /// The text.
        text: String,
        /// The token id.
        id: u32,
    },
    /// The end.
    Done {
        /// Why generation stopped.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed.
    Error(ApiError),
}

fn finish_from_pb(v: i32) -> Option<FinishReason> {
    match pb::FinishReason::try_from(v).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Stop => Some(FinishReason::Stop),
        pb::FinishReason::Length => Some(FinishReason::Length),
        pb::FinishReason::Eos => Some(FinishReason::Eos),
    }
}

/// Per-request emission state: counts tokens and records latency metrics.
struct Emitter<'a> {
    tx: &'a mpsc::Sender<Delta>,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: u32,
    prompt: u32,
    /// Prompt tokens the worker reused from its prefix cache.
    cached: u32,
}

impl Emitter<'_> {
    /// Sends one token; returns its finish reason. Err when the client is gone.
    async fn token(&mut self, t: &pb::Token) -> Result<Option<FinishReason>, ApiError> {
        let now = Instant::now();
        match self.last {
            None => {
                self.first = Some(now);
                metrics::histogram!(m::COORD_TTFT_SECONDS).record((now - self.start).as_secs_f64());
            }
            Some(l) => {
                metrics::histogram!(m::COORD_TOKEN_LATENCY_SECONDS).record((now - l).as_secs_f64())
            }
        }
        self.last = Some(now);
        self.tokens += 1;
        let d = Delta::Text {
            text: t.text.clone(),
            id: t.id,
        };
        if self.tx.send(d).await.is_err() {
            return Err(ApiError::upstream(499, "client closed the request"));
        }
        Ok(finish_from_pb(t.finish_reason))
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt,
            completion_tokens: self.tokens,
            total_tokens: self.prompt + self.tokens,
            cached_tokens: self.cached,
        }
    }
}

/// Runs one request to its end, streaming into `tx`. Returns when done, failed, or the
/// client is gone (then every leg has been dropped).
pub async fn serve(app: Arc<App>, p: Prepared, tx: mpsc::Sender<Delta>) {
    let start = Instant::now();
    metrics::gauge!(m::COORD_CONNECTIONS).increment(1.0);
    let mut em = Emitter {
        tx: &tx,
        start,
        first: None,
        last: None,
        tokens: 0,
        prompt: p.tokens.len() as u32,
        cached: 0,
    };
    let hard = Duration::from_secs(app.cfg.request_timeout_s);
    let outcome = tokio::select! {
        r = tokio::time::timeout(hard, run(&app, &p, &mut em)) => match r {
            Ok(r) => r,
            Err(_) => Err(ApiError::timeout("request")),
        },
        _ = tx.closed() => Err(ApiError::upstream(499, "client closed the request")),
    };
    let code = match &outcome {
        Ok(_) => 200,
        Err(e) => e.status,
    };
    metrics::counter!(m::COORD_REQUESTS_TOTAL, "api" => p.api, "code" => code.to_string())
        .increment(1);
    metrics::gauge!(m::COORD_CONNECTIONS).decrement(1.0);
    match outcome {
        Ok(finish) => {
            let usage = em.usage();
            metrics::histogram!(m::COORD_E2E_SECONDS).record(start.elapsed().as_secs_f64());
            metrics::histogram!(m::COORD_INPUT_TOKENS).record(usage.prompt_tokens as f64);
            metrics::histogram!(m::COORD_OUTPUT_TOKENS).record(usage.completion_tokens as f64);
            if let (Some(f), Some(l)) = (em.first, em.last)
                && usage.completion_tokens > 1
            {
                let tpot = (l - f).as_secs_f64() / (usage.completion_tokens - 1) as f64;
                metrics::histogram!(m::COORD_TPOT_SECONDS).record(tpot);
            }
            let _ = tx.send(Delta::Done { finish, usage }).await;
        }
        Err(e) if e.status == 499 => {}
        Err(e) => {
            let _ = tx.send(Delta::Error(e)).await;
        }
    }
}

async fn run(app: &App, p: &Prepared, em: &mut Emitter<'_>) -> Result<FinishReason, ApiError> {
    let facts = RouteFacts {
        source_ip: p.source_ip,
        tokens: p.tokens.clone(),
        class: p.class,
    };
    let first_deadline = Duration::from_secs(app.cfg.first_token_timeout_s);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = if app.cfg.single {
            tokio::time::timeout(first_deadline, start_combined(app, p, &facts)).await
        } else {
            tokio::time::timeout(first_deadline, start_disaggregated(app, p, &facts, em)).await
        };
        let started = match r {
            Err(_) => return Err(ApiError::timeout("first token")),
            Ok(Ok(s)) => s,
            Ok(Err(Failure::Retry(e))) if attempt < 2 => {
                tracing::warn!(error = %e.message, "retrying on another worker pair");
                metrics::counter!(m::COORD_RETRIES_TOTAL, "reason" => "before_first_token")
                    .increment(1);
                continue;
            }
            Ok(Err(Failure::Retry(e) | Failure::Fatal(e))) => return Err(e),
        };
        return relay(started, em, first_deadline).await;
    }
}

enum Failure {
    Retry(ApiError),
    Fatal(ApiError),
}

fn classify(leg: &str, s: &Status, slot: &Slot) -> Failure {
    let e = from_worker(leg, s);
    if s.code() == tonic::Code::Unavailable && s.message().contains("transport") {
        slot.mark_down(Duration::from_secs(2));
    }
    if retryable(s) {
        Failure::Retry(e)
    } else {
        Failure::Fatal(e)
    }
}

/// A request whose decode stream is open; the first token may already be out.
struct Started {
    stream: tonic::Streaming<pb::DecodeEvent>,
    done: Option<FinishReason>,
    _decode: Slot,
}

async fn start_disaggregated(
    app: &App,
    p: &Prepared,
    facts: &RouteFacts,
    em: &mut Emitter<'_>,
) -> Result<Started, Failure> {
    let queue = Duration::from_millis(app.cfg.queue_timeout_ms);
    let dslot = app
        .cluster
        .acquire_decode(facts.clone(), queue)
        .await
        .map_err(|o| Failure::Fatal(o.into()))?;
    let pslot = app
        .cluster
        .pick_prefill(facts)
        .map_err(|o| Failure::Fatal(o.into()))?;
    let id = app.next_id();
    let mut dclient = DecodeWorkerClient::new(dslot.channel.clone());
    let dreq = pb::DecodeRequest {
        request_id: id,
        prompt_tokens: p.tokens.len() as u32,
        max_tokens: p.params.max_tokens as u32,
        backend: app.cfg.kv_backend.clone(),
        transfer_deadline_ms: app.cfg.transfer_deadline_ms,
    };
    let mut stream = match dclient.decode(dreq).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Err(classify("decode", &s, &dslot)),
    };
    let target = match stream.message().await {
        Ok(Some(pb::DecodeEvent {
            event: Some(pb::decode_event::Event::Reserved(r)),
        })) => r,
        Ok(_) => {
            return Err(Failure::Retry(ApiError::upstream(
                502,
                "decode worker did not reserve KV",
            )));
        }
        Err(s) => return Err(classify("decode", &s, &dslot)),
    };
    let mut pclient = PrefillWorkerClient::new(pslot.channel.clone());
    let preq = pb::PrefillRequest {
        request_id: id,
        tokens: p.tokens.to_vec(),
        sampling: Some(sampling_to_pb(&p.params)),
        target_json: target.target_json,
    };
    let t0 = Instant::now();
    let first = match pclient.prefill(preq).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(classify("prefill", &s, &pslot)),
    };
    pslot.observe_ttft(t0.elapsed().as_secs_f64() * 1e3);
    drop(pslot);
    em.cached = first.cached_tokens;
    let Some(tok) = first.first else {
        return Err(Failure::Retry(ApiError::upstream(
            502,
            "prefill worker returned no token",
        )));
    };
    let done = em.token(&tok).await.map_err(Failure::Fatal)?;
    dslot.observe_ttft(em.start.elapsed().as_secs_f64() * 1e3);
    Ok(Started {
        stream,
        done,
        _decode: dslot,
    })
}

async fn start_combined(app: &App, p: &Prepared, facts: &RouteFacts) -> Result<Started, Failure> {
    let queue = Duration::from_millis(app.cfg.queue_timeout_ms);
    let slot = app
        .cluster
        .acquire_decode(facts.clone(), queue)
        .await
        .map_err(|o| Failure::Fatal(o.into()))?;
    let mut client = DecodeWorkerClient::new(slot.channel.clone());
    let req = pb::LocalGenerateRequest {
        request_id: app.next_id(),
        tokens: p.tokens.to_vec(),
        sampling: Some(sampling_to_pb(&p.params)),
    };
    match client.generate(req).await {
        Ok(s) => Ok(Started {
            stream: s.into_inner(),
            done: None,
            _decode: slot,
        }),
        Err(s) => Err(classify("combined", &s, &slot)),
    }
}

/// Relays the decode stream until the finishing token.
async fn relay(
    mut s: Started,
    em: &mut Emitter<'_>,
    first_deadline: Duration,
) -> Result<FinishReason, ApiError> {
    if let Some(f) = s.done {
        return Ok(f);
    }
    loop {
        // Every token resets the inactivity deadline.
        let msg = match tokio::time::timeout(first_deadline, s.stream.message()).await {
            Err(_) => return Err(ApiError::timeout("next token")),
            Ok(Err(st)) => return Err(from_worker("decode", &st)),
            Ok(Ok(None)) => {
                return Err(ApiError::upstream(
                    502,
                    "decode worker ended the stream early",
                ));
            }
            Ok(Ok(Some(m))) => m,
        };
        if let Some(pb::decode_event::Event::Prefilled(p)) = &msg.event {
            em.cached = p.cached_tokens;
        }
        if let Some(pb::decode_event::Event::Token(t)) = msg.event {
            let started = em.first.is_some();
            if let Some(f) = em.token(&t).await? {
                return Ok(f);
            }
            if !started {
                s._decode
                    .observe_ttft(em.start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
}
