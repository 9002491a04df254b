//! The legs of one attempt: open them on a (prefill, decode) pair or a combined worker,
//! resuming after the tokens already sent when this is a re-send, then relay the decode
//! stream until the finishing token. Every failure comes back as a typed [`FlowError`].

use super::{Emitter, FlowError, Prepared};
use crate::App;
use crate::cluster::{Leg, Overload, RouteFacts, Slot};
use crate::flow::Failure;
use std::time::{Duration, Instant};
use xpyd_engine::FinishReason;
use xpyd_proto as pb;
use xpyd_proto::decode_worker_client::DecodeWorkerClient;
use xpyd_proto::prefill_worker_client::PrefillWorkerClient;
use xpyd_runtime::worker::sampling_to_pb;

/// How often a relay checks that its decode worker is still in the cluster.
const MEMBERSHIP_CHECK: Duration = Duration::from_millis(250);

/// A request whose decode stream is open; the first token may already be out.
pub(super) struct Started {
    stream: tonic::Streaming<pb::DecodeEvent>,
    /// Events the decode stream delivered before the prefill answered.
    early: Vec<pb::DecodeEvent>,
    done: Option<FinishReason>,
    decode: Slot,
}

/// What this attempt sends the workers: the prompt, then any tokens already sent to the
/// client, and how many of them are the prompt (0 = all: a fresh request).
fn tokens_to_send(p: &Prepared, em: &Emitter<'_>) -> (Vec<u32>, u32) {
    let mut tokens = p.tokens.to_vec();
    if em.generated.is_empty() {
        return (tokens, 0);
    }
    tokens.extend(&em.generated);
    (tokens, p.tokens.len() as u32)
}

/// Turns a failed call into a flow error, marking an unreachable worker down.
fn failed(leg: Leg, slot: &Slot, s: &tonic::Status) -> FlowError {
    let e = FlowError::from_status(leg, slot, s);
    if matches!(
        e,
        FlowError::Worker {
            failure: Failure::Transport,
            ..
        }
    ) {
        slot.mark_down(Duration::from_secs(2));
    }
    e
}

/// How long a re-send waits for a worker it has not failed on before it tries the ones
/// it has again (one of them may have failed for a cause elsewhere, e.g. a transfer).
const EXCLUSION_GRACE: Duration = Duration::from_secs(2);

/// Gets a slot from `pick`. When no worker of the leg is ready (the only one died and is
/// being rebuilt, say) the request waits for one: a fresh request up to the admission
/// queue's timeout, a re-send up to the first-token deadline; a re-send also considers,
/// after [`EXCLUSION_GRACE`], workers it failed on that are ready again.
async fn slot_with<F, Fut>(
    app: &App,
    facts: &RouteFacts,
    resend: bool,
    pick: F,
) -> Result<Slot, FlowError>
where
    F: Fn(RouteFacts) -> Fut,
    Fut: std::future::Future<Output = Result<Slot, Overload>>,
{
    let t0 = Instant::now();
    let deadline = t0
        + if resend {
            Duration::from_secs(app.cfg.first_token_timeout_s)
        } else {
            Duration::from_millis(app.cfg.queue_timeout_ms)
        };
    let mut facts = facts.clone();
    loop {
        match pick(facts.clone()).await {
            Err(Overload::NoWorkers(_)) if Instant::now() < deadline => {
                if t0.elapsed() > EXCLUSION_GRACE {
                    facts.exclude.clear();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r.map_err(FlowError::Overload),
        }
    }
}

/// A decode (or combined) slot (see [`slot_with`]).
async fn decode_slot(app: &App, facts: &RouteFacts, resend: bool) -> Result<Slot, FlowError> {
    let queue = Duration::from_millis(app.cfg.queue_timeout_ms);
    slot_with(app, facts, resend, |f| app.cluster.acquire_decode(f, queue)).await
}

/// A prefill worker (see [`slot_with`]).
async fn prefill_slot(app: &App, facts: &RouteFacts, resend: bool) -> Result<Slot, FlowError> {
    slot_with(app, facts, resend, |f| {
        std::future::ready(app.cluster.pick_prefill(&f))
    })
    .await
}

/// A failed prefill call. A KV transfer that failed from the prefill side (the
/// receiver stopped answering, its deadline passed) is the decode worker's failure: the
/// next attempt avoids that one, not the prefill worker.
fn prefill_failed(pslot: &Slot, dslot: &Slot, s: &tonic::Status) -> FlowError {
    match failed(Leg::Prefill, pslot, s) {
        FlowError::Worker {
            failure: Failure::Transfer,
            message,
            ..
        } => FlowError::worker(Leg::Decode, dslot, Failure::Transfer, &message),
        e => e,
    }
}

pub(super) async fn start_disaggregated(
    app: &App,
    p: &Prepared,
    facts: &RouteFacts,
    em: &mut Emitter<'_>,
) -> Result<Started, FlowError> {
    let first_deadline = Duration::from_secs(app.cfg.first_token_timeout_s);
    let resend = !facts.exclude.is_empty() || !em.generated.is_empty();
    let dslot = decode_slot(app, facts, resend).await?;
    let pslot = prefill_slot(app, facts, resend).await?;
    let (tokens, prompt_len) = tokens_to_send(p, em);
    let id = app.next_id();
    let mut dclient = DecodeWorkerClient::new(app.internal(&dslot.channel));
    let dreq = pb::DecodeRequest {
        request_id: id,
        prompt_tokens: tokens.len() as u32,
        // The KV promise covers what is left to generate.
        max_tokens: (p.params.max_tokens - em.generated.len()).max(1) as u32,
        backend: app.cfg.kv_backend.clone(),
        transfer_deadline_ms: app.cfg.transfer_deadline_ms,
    };
    let open = async {
        let mut stream = dclient
            .decode(dreq)
            .await
            .map_err(|s| failed(Leg::Decode, &dslot, &s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(pb::DecodeEvent {
                event: Some(pb::decode_event::Event::Reserved(r)),
            })) => Ok((stream, r)),
            Ok(_) => Err(FlowError::worker(
                Leg::Decode,
                &dslot,
                Failure::Ended,
                "the decode worker did not reserve KV",
            )),
            Err(s) => Err(failed(Leg::Decode, &dslot, &s)),
        }
    };
    let (mut stream, target) = tokio::time::timeout(first_deadline, open)
        .await
        .map_err(|_| FlowError::Timeout("first token"))??;
    let mut pclient = PrefillWorkerClient::new(app.internal(&pslot.channel));
    let preq = pb::PrefillRequest {
        request_id: id,
        tokens,
        sampling: Some(sampling_to_pb(&p.params)),
        target_json: target.target_json,
        target_mac: target.target_mac,
        prompt_len,
    };
    let t0 = Instant::now();
    // The decode stream is watched while the prefill runs: if the decode worker dies or
    // freezes, the prefill (stuck sending it KV) is dropped at once instead of waiting
    // for the transfer deadline. Tokens it sends before the prefill answers are kept.
    let mut early = Vec::new();
    let prefill = async {
        let call = pclient.prefill(preq);
        tokio::pin!(call);
        let mut ended = false;
        loop {
            tokio::select! {
                r = &mut call => return r.map_err(|s| prefill_failed(&pslot, &dslot, &s)),
                m = stream.message(), if !ended => match m {
                    Ok(Some(ev)) => early.push(ev),
                    // A short output can finish on the decode worker before the prefill's
                    // answer reaches us: keep what it sent and wait for the answer (the
                    // relay decides whether the stream ended with its finish).
                    Ok(None) => ended = true,
                    Err(s) => return Err(failed(Leg::Decode, &dslot, &s)),
                },
            }
        }
    };
    let first = tokio::time::timeout(first_deadline, prefill)
        .await
        .map_err(|_| FlowError::Timeout("first token"))??
        .into_inner();
    pslot.observe_ttft(t0.elapsed().as_secs_f64() * 1e3);
    app.board.kv_moved(first.kv_bytes);
    let link = [
        ("source", pslot.worker_id.clone()),
        ("target", dslot.worker_id.clone()),
        ("backend", first.backend.clone()),
    ];
    metrics::counter!(xpyd_runtime::metrics::COORD_KV_BYTES_TOTAL, &link).increment(first.kv_bytes);
    metrics::counter!(xpyd_runtime::metrics::COORD_KV_MICROS_TOTAL, &link)
        .increment((first.kv_seconds * 1e6) as u64);
    metrics::histogram!(xpyd_runtime::metrics::COORD_KV_SECONDS, &link).record(first.kv_seconds);
    if em.generated.is_empty() {
        em.cached = first.cached_tokens;
    }
    let Some(tok) = first.first else {
        return Err(FlowError::worker(
            Leg::Prefill,
            &pslot,
            Failure::Ended,
            "the prefill worker returned no token",
        ));
    };
    drop(pslot);
    let done = em.token(&tok).await?;
    dslot.observe_ttft(em.start.elapsed().as_secs_f64() * 1e3);
    Ok(Started {
        stream,
        early,
        done,
        decode: dslot,
    })
}

pub(super) async fn start_combined(
    app: &App,
    p: &Prepared,
    facts: &RouteFacts,
    em: &mut Emitter<'_>,
) -> Result<Started, FlowError> {
    let resend = !facts.exclude.is_empty() || !em.generated.is_empty();
    let slot = decode_slot(app, facts, resend).await?;
    let (tokens, prompt_len) = tokens_to_send(p, em);
    let mut client = DecodeWorkerClient::new(app.internal(&slot.channel));
    let req = pb::LocalGenerateRequest {
        request_id: app.next_id(),
        tokens,
        sampling: Some(sampling_to_pb(&p.params)),
        prompt_len,
    };
    let first_deadline = Duration::from_secs(app.cfg.first_token_timeout_s);
    match tokio::time::timeout(first_deadline, client.generate(req)).await {
        Err(_) => Err(FlowError::Timeout("first token")),
        Ok(Ok(s)) => Ok(Started {
            stream: s.into_inner(),
            early: Vec::new(),
            done: None,
            decode: slot,
        }),
        Ok(Err(s)) => Err(failed(Leg::Decode, &slot, &s)),
    }
}

/// Relays the decode stream until the finishing token. Every token resets the
/// inactivity deadline; a worker that leaves the cluster mid-stream fails the leg (its
/// request then migrates).
pub(super) async fn relay(
    app: &App,
    mut s: Started,
    em: &mut Emitter<'_>,
    inactivity: Duration,
) -> Result<FinishReason, FlowError> {
    if let Some(f) = s.done {
        return Ok(f);
    }
    let (worker, url) = (s.decode.worker_id.clone(), s.decode.url.clone());
    let mut check = tokio::time::interval(MEMBERSHIP_CHECK);
    let mut idle_until = Instant::now() + inactivity;
    let mut early = std::mem::take(&mut s.early).into_iter();
    loop {
        let msg = if let Some(ev) = early.next() {
            Ok(Some(ev))
        } else {
            tokio::select! {
                m = s.stream.message() => m,
                _ = check.tick() => {
                    if !app.cluster.is_member(&worker, &url) {
                        return Err(FlowError::worker(Leg::Decode, &s.decode, Failure::Left,
                            "the decode worker left the cluster"));
                    }
                    if Instant::now() > idle_until {
                        return Err(FlowError::Timeout("next token"));
                    }
                    continue;
                }
            }
        };
        let msg = match msg {
            Err(st) => return Err(failed(Leg::Decode, &s.decode, &st)),
            Ok(None) => {
                return Err(FlowError::worker(
                    Leg::Decode,
                    &s.decode,
                    Failure::Ended,
                    "the decode worker ended the stream early",
                ));
            }
            Ok(Some(m)) => m,
        };
        idle_until = Instant::now() + inactivity;
        match msg.event {
            Some(pb::decode_event::Event::Prefilled(p)) if em.generated.is_empty() => {
                em.cached = p.cached_tokens;
            }
            Some(pb::decode_event::Event::Token(t)) => {
                let started = em.first.is_some();
                if let Some(f) = em.token(&t).await? {
                    return Ok(f);
                }
                if !started {
                    s.decode
                        .observe_ttft(em.start.elapsed().as_secs_f64() * 1e3);
                }
            }
            _ => {}
        }
    }
}
