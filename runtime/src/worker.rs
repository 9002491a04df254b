//! What prefill and decode workers share: identity and membership startup, the load
//! snapshot the lease reports, conversions between engine and proto types, the mapping
//! of engine and transfer errors to gRPC status codes, and a response stream that cancels
//! its request when the client drops it.

pub use crate::ema::Ema;

use crate::lease::{LeaseConfig, RegistryBackend, keep_lease};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use xpyd_engine::{EngineError, FinishReason, SamplingParams};
use xpyd_kv_transfer::TransferError;
use xpyd_proto as pb;
use xpyd_proto::worker_error::Kind;

/// Test knob: the named workers sleep before every engine step (see [`crate::env::DEBUG_DELAY`]).
pub use crate::env::DEBUG_DELAY as DEBUG_DELAY_ENV;

/// The step delay [`DEBUG_DELAY_ENV`] sets for `worker_id`, if any.
pub fn debug_delay(worker_id: &str) -> Option<Duration> {
    let spec = std::env::var(DEBUG_DELAY_ENV).ok()?;
    spec.split(',').find_map(|item| {
        let (id, ms) = item.split_once('=')?;
        (id.trim() == worker_id)
            .then(|| ms.trim().parse().ok().map(Duration::from_millis))
            .flatten()
    })
}

/// Membership of one worker: where to register and how often.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The registry; `None` runs the worker standalone (always ready).
    pub registry: Option<RegistryBackend>,
    /// Lease TTL.
    pub ttl: Duration,
    /// Renewal interval.
    pub renew: Duration,
    /// The cluster's credential (registration calls carry it; etcd records are signed).
    pub key: Option<crate::plane::ClusterKey>,
    /// The internal plane's TLS: this worker's identity and the roots it dials with.
    pub tls: crate::tls::Tls,
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            registry: None,
            ttl: Duration::from_secs(2),
            renew: Duration::from_millis(500),
            key: None,
            tls: crate::tls::Tls::default(),
        }
    }
}

/// The worker's live numbers, written by its engine thread and read by the lease and by
/// `Stats`.
pub type SharedStats = Arc<Mutex<pb::WorkerStats>>;

/// The load part of a stats snapshot.
pub fn load_of(s: &pb::WorkerStats, draining: bool) -> pb::Load {
    pb::Load {
        queued: s.queued,
        running: s.running,
        kv_blocks_used: s.kv_blocks_used,
        kv_blocks_free: s.kv_blocks_free,
        ttft_ms: s.ttft_ms,
        tpot_ms: s.tpot_ms,
        draining,
    }
}

/// Starts keeping the lease (or marks the worker ready at once when standalone) and
/// returns the readiness the gRPC handlers check before taking work. A new identity sent
/// on `info` (a role flip) is registered in place of the old one.
pub fn start_membership(
    m: &Membership,
    info: watch::Receiver<pb::WorkerInfo>,
    stats: SharedStats,
    lifecycle: crate::lifecycle::Lifecycle,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    match &m.registry {
        None => {
            let _ = tx.send(true);
            // Keep the sender alive for the worker's lifetime.
            tokio::spawn(async move {
                shutdown.cancelled().await;
                let _ = tx.send(false);
            });
        }
        Some(backend) => {
            let cfg = LeaseConfig {
                backend: backend.clone(),
                info,
                ttl: m.ttl,
                renew: m.renew,
                key: m.key.clone(),
                roots: m.tls.roots.clone(),
            };
            let load = move || {
                let draining = lifecycle.phase() != crate::lifecycle::Phase::Serving;
                load_of(&stats.lock().unwrap_or_else(|e| e.into_inner()), draining)
            };
            tokio::spawn(keep_lease(cfg, load, tx, shutdown));
        }
    }
    rx
}

/// The identity a worker registers: its id and role, and the URLs its bound gRPC and HTTP
/// listeners are reached at on `host`; `listeners` are the gRPC and HTTP listeners and
/// whether both serve TLS (then their URLs are `https://`).
///
/// # Errors
/// A listener without a local address.
pub fn worker_info(
    worker_id: &str,
    role: &str,
    host: &str,
    (grpc, http, tls): (&tokio::net::TcpListener, &tokio::net::TcpListener, bool),
    fingerprint: &str,
    max_running: usize,
) -> std::io::Result<pb::WorkerInfo> {
    Ok(pb::WorkerInfo {
        worker_id: worker_id.into(),
        role: role.into(),
        grpc_url: format!(
            "{}://{host}:{}",
            crate::tls::scheme(tls),
            grpc.local_addr()?.port()
        ),
        http_url: format!(
            "{}://{host}:{}",
            crate::tls::scheme(tls),
            http.local_addr()?.port()
        ),
        model_fingerprint: fingerprint.into(),
        max_running: max_running as u32,
    })
}

/// `UNAVAILABLE` (kind draining: go elsewhere) unless the worker holds its lease.
pub fn check_ready(ready: &watch::Receiver<bool>) -> Result<(), Status> {
    if *ready.borrow() {
        Ok(())
    } else {
        Err(pb::WorkerError::status(
            Kind::Draining,
            Code::Unavailable,
            "worker is not ready (starting, draining, or without a registry lease)",
        ))
    }
}

/// gRPC status for an engine error.
pub fn engine_status(e: &EngineError) -> Status {
    let (code, kind) = match e {
        EngineError::InvalidParam { .. }
        | EngineError::ContextOverflow { .. }
        | EngineError::EmptyPrompt
        | EngineError::BadToken { .. } => (Code::InvalidArgument, Kind::Invalid),
        EngineError::OutOfBlocks { .. } => (Code::ResourceExhausted, Kind::Overloaded),
        EngineError::KvImport(_) => (Code::DataLoss, Kind::Transfer),
        EngineError::DuplicateSequence(_) => (Code::AlreadyExists, Kind::Engine),
        _ => (Code::Internal, Kind::Engine),
    };
    pb::WorkerError::status(kind, code, e.to_string())
}

/// gRPC status for a transfer error.
pub fn transfer_status(e: &TransferError) -> Status {
    let code = match e {
        TransferError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        TransferError::PeerGone(_) | TransferError::Io(_) => Code::Unavailable,
        TransferError::StaleEpoch { .. } => Code::Aborted,
        TransferError::FingerprintMismatch { .. } => Code::FailedPrecondition,
        TransferError::Checksum(_) | TransferError::Protocol(_) => Code::DataLoss,
        TransferError::Unavailable(_) => Code::Unimplemented,
        TransferError::Rejected(_) => Code::Aborted,
    };
    pb::WorkerError::status(Kind::Transfer, code, format!("kv transfer: {e}"))
}

/// The status of a call a draining worker will not take (or can no longer finish): the
/// coordinator sends it elsewhere.
pub fn draining_status() -> Status {
    pb::WorkerError::status(
        Kind::Draining,
        Code::Unavailable,
        "the worker is draining: send the request to another worker",
    )
}

/// The status of a request cancelled here.
pub fn cancelled_status(why: &str) -> Status {
    pb::WorkerError::status(Kind::Cancelled, Code::Cancelled, why)
}

/// The engine's sampling parameters from the wire form.
pub fn sampling_from_pb(s: &pb::EngineSampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        seed: s.seed,
        max_tokens: s.max_tokens as usize,
        stop: s.stop.clone(),
        ignore_eos: s.ignore_eos,
        logprobs: s.logprobs,
        top_logprobs: s.top_logprobs as usize,
        prompt_logprobs: s.prompt_logprobs,
    }
}

/// The wire form of the engine's sampling parameters.
pub fn sampling_to_pb(p: &SamplingParams) -> pb::EngineSampling {
    pb::EngineSampling {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        seed: p.seed,
        max_tokens: p.max_tokens as u32,
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs as u32,
        prompt_logprobs: p.prompt_logprobs,
    }
}

/// The wire finish reason.
pub fn finish_to_pb(f: Option<FinishReason>) -> pb::FinishReason {
    match f {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::Eos) => pb::FinishReason::Eos,
    }
}

/// The wire token of an engine event.
pub fn token_to_pb(ev: &xpyd_engine::TokenEvent) -> pb::Token {
    pb::Token {
        id: ev.token,
        text: ev.text.clone(),
        finish_reason: finish_to_pb(ev.finish) as i32,
        logprob: ev.logprobs.as_ref().map(logprobs_to_pb),
        prompt_logprobs: ev.prompt_logprobs.iter().map(logprobs_to_pb).collect(),
    }
}

/// The wire form of a token's log-probabilities (ids only; texts are the API's).
pub fn logprobs_to_pb(l: &xpyd_engine::TokenLogprobs) -> pb::TokenLogprob {
    pb::TokenLogprob {
        id: l.token,
        logprob: l.logprob,
        token: String::new(),
        top: l
            .top
            .iter()
            .map(|(id, logprob)| pb::TopLogprob {
                id: *id,
                logprob: *logprob,
                token: String::new(),
            })
            .collect(),
    }
}

/// A token's log-probabilities from the wire.
pub fn logprobs_from_pb(l: &pb::TokenLogprob) -> xpyd_engine::TokenLogprobs {
    xpyd_engine::TokenLogprobs {
        token: l.id,
        logprob: l.logprob,
        top: l.top.iter().map(|t| (t.id, t.logprob)).collect(),
    }
}

/// Runs `on_drop` when dropped: how a server-streaming handler learns its client left.
pub struct DropGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl DropGuard {
    /// Guard calling `f` once on drop.
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        DropGuard(Some(Box::new(f)))
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A response stream that holds a [`DropGuard`]: when tonic drops the stream (the call
/// ended, the client disconnected or its deadline passed), the guard runs.
pub struct GuardedStream<T> {
    inner: tokio_stream::wrappers::ReceiverStream<T>,
    _guard: DropGuard,
}

impl<T> GuardedStream<T> {
    /// Wraps a receiver.
    pub fn new(rx: tokio::sync::mpsc::Receiver<T>, guard: DropGuard) -> Self {
        GuardedStream {
            inner: tokio_stream::wrappers::ReceiverStream::new(rx),
            _guard: guard,
        }
    }
}

impl<T> tokio_stream::Stream for GuardedStream<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_runs_once_when_the_stream_is_dropped() {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let (_tx, rx) = tokio::sync::mpsc::channel::<u32>(1);
        let s = GuardedStream::new(
            rx,
            DropGuard::new(move || {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(s);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn error_codes_follow_retryability() {
        let oob = EngineError::OutOfBlocks {
            needed: 2,
            free: 1,
            total: 4,
        };
        assert_eq!(engine_status(&oob).code(), Code::ResourceExhausted);
        assert_eq!(
            engine_status(&EngineError::EmptyPrompt).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            transfer_status(&TransferError::PeerGone("x".into())).code(),
            Code::Unavailable
        );
    }
}
