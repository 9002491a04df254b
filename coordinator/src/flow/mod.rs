//! One request through the cluster. Disaggregated: take a decode slot (priority queue,
//! decode policy), pick a prefill worker (prefill policy), open the decode stream (which
//! reserves KV and returns the transfer target), run the prefill against that target,
//! emit its first token, then relay the decode stream (`legs`). Single mode: one combined
//! worker does both.
//!
//! A leg that fails on a worker — before the first token or after tokens went out —
//! sends the request to another pair, never back to the workers that failed it: the new
//! prefill computes prompt + the tokens already sent and continues with the same sampler,
//! detokenizer and stop-string state, so the client's stream goes on with the very tokens
//! an uninterrupted run gives (a migration). At most `max_migrations` re-sends. A client
//! that leaves (its receiver dropped, or it stops reading past the stall timeout) or a
//! deadline ends every leg, and dropping the worker calls frees their KV.

mod error;
mod legs;

pub use error::{Failure, FlowError};

use crate::App;
use crate::cluster::RouteFacts;
use crate::error::ApiError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use xpyd_engine::{FinishReason, SamplingParams, TokenLogprobs};
use xpyd_proto as pb;
use xpyd_runtime::metrics as m;
use xpyd_runtime::worker::logprobs_from_pb;

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
        /// Its log-probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
        /// With the first token, when the request asked for them: the prompt's tokens
        /// after the first, each with its log-probabilities.
        prompt_logprobs: Vec<TokenLogprobs>,
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

/// Per-request emission state: the tokens sent so far (what a migration resumes from),
/// counts and latency metrics.
struct Emitter<'a> {
    tx: &'a mpsc::Sender<Delta>,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Token ids sent to the client, in order.
    generated: Vec<u32>,
    prompt: u32,
    /// Prompt tokens the worker reused from its prefix cache.
    cached: u32,
    /// How long a client may leave a token unread before it counts as gone.
    stall: Duration,
    /// The managed product's metric names.
    compat: &'a crate::compat::Compat,
}

impl Emitter<'_> {
    /// Sends one token; returns its finish reason. `ClientGone` when the client left or
    /// did not take the token within the stall timeout.
    async fn token(&mut self, t: &pb::Token) -> Result<Option<FinishReason>, FlowError> {
        let now = Instant::now();
        match self.last {
            None => {
                self.first = Some(now);
                let ttft = (now - self.start).as_secs_f64();
                metrics::histogram!(m::COORD_TTFT_SECONDS).record(ttft);
                self.compat.first_token(ttft);
            }
            Some(l) => {
                metrics::histogram!(m::COORD_TOKEN_LATENCY_SECONDS).record((now - l).as_secs_f64())
            }
        }
        self.last = Some(now);
        self.generated.push(t.id);
        let d = Delta::Text {
            text: t.text.clone(),
            id: t.id,
            logprobs: t.logprob.as_ref().map(logprobs_from_pb),
            prompt_logprobs: t.prompt_logprobs.iter().map(logprobs_from_pb).collect(),
        };
        match self.tx.send_timeout(d, self.stall).await {
            Ok(()) => Ok(finish_from_pb(t.finish_reason)),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                metrics::counter!(m::COORD_STALLED_CLIENTS_TOTAL).increment(1);
                tracing::warn!(
                    stall_s = self.stall.as_secs(),
                    "client stopped reading; cut off"
                );
                Err(FlowError::ClientGone)
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(FlowError::ClientGone),
        }
    }

    fn usage(&self) -> Usage {
        let tokens = self.generated.len() as u32;
        Usage {
            prompt_tokens: self.prompt,
            completion_tokens: tokens,
            total_tokens: self.prompt + tokens,
            cached_tokens: self.cached,
        }
    }
}

/// Runs one request to its end, streaming into `tx`. Returns when done, failed, or the
/// client is gone (then every leg has been dropped).
pub async fn serve(app: Arc<App>, p: Prepared, tx: mpsc::Sender<Delta>) {
    let start = Instant::now();
    metrics::gauge!(m::COORD_CONNECTIONS).increment(1.0);
    app.compat.connections(1.0);
    let mut em = Emitter {
        tx: &tx,
        start,
        first: None,
        last: None,
        generated: Vec::new(),
        prompt: p.tokens.len() as u32,
        cached: 0,
        stall: Duration::from_secs(app.cfg.client_stall_timeout_s),
        compat: &app.compat,
    };
    let hard = Duration::from_secs(app.cfg.request_timeout_s);
    let outcome = tokio::select! {
        r = tokio::time::timeout(hard, run(&app, &p, &mut em)) => match r {
            Ok(r) => r,
            Err(_) => Err(FlowError::Timeout("request")),
        },
        _ = tx.closed() => Err(FlowError::ClientGone),
    };
    let code = outcome.as_ref().map_or_else(FlowError::code, |_| 200);
    metrics::counter!(m::COORD_REQUESTS_TOTAL, "api" => p.api, "code" => code.to_string())
        .increment(1);
    metrics::gauge!(m::COORD_CONNECTIONS).decrement(1.0);
    app.compat.connections(-1.0);
    if p.api == "grpc" {
        // HTTP calls are counted by the router's middleware.
        app.compat.request(code, "POST", crate::grpc_api::GRPC_PATH);
    }
    record_finished(&app, &p, &em, outcome.as_ref().map(|_| ()));
    match outcome {
        Ok(finish) => {
            let usage = em.usage();
            let e2e = start.elapsed().as_secs_f64();
            metrics::histogram!(m::COORD_E2E_SECONDS).record(e2e);
            metrics::histogram!(m::COORD_INPUT_TOKENS).record(usage.prompt_tokens as f64);
            metrics::histogram!(m::COORD_OUTPUT_TOKENS).record(usage.completion_tokens as f64);
            let mut tpot = None;
            if let (Some(f), Some(l)) = (em.first, em.last)
                && usage.completion_tokens > 1
            {
                let t = (l - f).as_secs_f64() / (usage.completion_tokens - 1) as f64;
                metrics::histogram!(m::COORD_TPOT_SECONDS).record(t);
                tpot = Some(t);
            }
            if let Some(f) = em.first {
                // The same measurements as the histograms above, in the managed product's
                // names (ms).
                app.compat.served(
                    e2e,
                    (f - start).as_secs_f64(),
                    tpot,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                );
            }
            let _ = tx.send(Delta::Done { finish, usage }).await;
        }
        Err(e) => {
            if let Some(api) = e.api() {
                tracing::warn!(error = ?e, status = api.status, "request failed");
                let _ = tx.send(Delta::Error(api)).await;
            }
        }
    }
}

/// Puts the request into the advisor's window: what it asked for and what it saw. A
/// client that left tells nothing about the cluster and is left out; a failure keeps
/// NaN latencies (a miss) and the output it asked for.
fn record_finished(app: &App, p: &Prepared, em: &Emitter<'_>, outcome: Result<(), &FlowError>) {
    if matches!(outcome, Err(FlowError::ClientGone)) {
        return;
    }
    let generated = em.generated.len() as u32;
    let ttft = em.first.map_or(f64::NAN, |f| (f - em.start).as_secs_f64());
    let tpot = match (outcome, em.first, em.last) {
        (Ok(()), Some(f), Some(l)) if generated > 1 => {
            (l - f).as_secs_f64() / f64::from(generated - 1)
        }
        _ => f64::NAN,
    };
    let output = match outcome {
        Ok(()) => generated,
        Err(_) => generated.max(p.params.max_tokens.min(4096) as u32),
    };
    app.advisor.record(xpyd_planner::advisor::Finished {
        arrival: app.advisor.at(em.start),
        input: em.prompt,
        cached: em.cached,
        output: output.max(1),
        ttft,
        tpot,
    });
}

/// Sends the request to worker pairs until it finishes: the first pair, then — when a
/// leg fails on a worker — another pair that excludes every worker that failed it, up to
/// `max_migrations` re-sends.
async fn run(app: &App, p: &Prepared, em: &mut Emitter<'_>) -> Result<FinishReason, FlowError> {
    let mut facts = RouteFacts {
        source_ip: p.source_ip,
        tokens: p.tokens.clone(),
        class: p.class,
        exclude: Vec::new(),
    };
    let first_deadline = Duration::from_secs(app.cfg.first_token_timeout_s);
    let mut resends = 0;
    loop {
        let started = if app.cfg.single {
            legs::start_combined(app, p, &facts, em).await
        } else {
            legs::start_disaggregated(app, p, &facts, em).await
        };
        let result = match started {
            Ok(s) => legs::relay(app, s, em, first_deadline).await,
            Err(e) => Err(e),
        };
        let e = match result {
            Ok(finish) => return Ok(finish),
            Err(e) if !e.retryable() => return Err(e),
            Err(e) => e,
        };
        let FlowError::Worker {
            url,
            failure,
            worker,
            ..
        } = &e
        else {
            return Err(e);
        };
        if resends >= app.cfg.max_migrations {
            return Err(FlowError::Exhausted {
                attempts: resends + 1,
                last: Box::new(e),
            });
        }
        resends += 1;
        let metric = if em.generated.is_empty() {
            m::COORD_RETRIES_TOTAL
        } else {
            m::COORD_MIGRATIONS_TOTAL
        };
        metrics::counter!(metric, "reason" => failure.reason()).increment(1);
        app.events
            .resent(worker, failure.reason(), !em.generated.is_empty());
        tracing::warn!(
            error = ?e,
            tokens_sent = em.generated.len(),
            resend = resends,
            "sending the request to another worker pair"
        );
        facts.exclude.push(url.clone());
    }
}
