//! xpyd prefill worker. Takes a prompt and a transfer target, prefills in chunks on the
//! real engine and streams each layer's KV to the decode worker while the next layer
//! computes; answers with the first sampled token once the KV is delivered. On SIGTERM it
//! drains (no new prompts; queued and running ones finish and their transfers commit
//! within `drain_timeout`, the rest are cancelled and go elsewhere); if its engine thread
//! stops it reports itself failed and exits to be rebuilt.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine_loop;
pub mod service;

use engine_loop::EngineLoop;
use service::PrefillService;
use service::Running;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use xpyd_engine::{Engine, EngineConfig};
use xpyd_kv_transfer::Sender;
use xpyd_proto as pb;
use xpyd_runtime::host::{self, Identity};
use xpyd_runtime::lifecycle::{Ending, Lifecycle};
use xpyd_runtime::worker::{Membership, SharedStats};

/// Prefill worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique id in the cluster.
    pub worker_id: String,
    /// The engine (its `prefill_chunk` sets the chunk size).
    pub engine: EngineConfig,
    /// Most prefills queued before new ones are refused.
    pub max_queue: usize,
    /// Where to register.
    pub membership: Membership,
    /// Host name other processes reach this worker at.
    pub advertise_host: String,
    /// How long a drain (SIGTERM) waits for queued and running prefills (and their KV
    /// transfers) before cancelling the rest, which the coordinator then sends elsewhere.
    pub drain_timeout: std::time::Duration,
}

/// The listeners a prefill worker serves on.
pub struct Listeners {
    /// gRPC (`xpyd.v1.PrefillWorker`, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/health`, `/metrics`).
    pub http: TcpListener,
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// The engine failed to load.
    #[error("engine: {0}")]
    Engine(#[from] xpyd_engine::EngineError),
    /// A listener failed.
    #[error("serve: {0}")]
    Serve(String),
    /// The engine thread stopped (a panic, say): the worker reported itself failed and
    /// stopped so it is rebuilt.
    #[error("the engine thread stopped")]
    EngineStopped,
}

/// Runs the worker until `shutdown`.
///
/// # Errors
/// Bad config, engine load failure, or a listener failing.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    if cfg.worker_id.is_empty() {
        return Err(WorkerError::Config("worker_id: must not be empty".into()));
    }
    if !(1..=100_000).contains(&cfg.max_queue) {
        return Err(WorkerError::Config(format!(
            "max_queue: {} is out of range 1..=100000",
            cfg.max_queue
        )));
    }
    cfg.engine
        .validate()
        .map_err(|e| WorkerError::Config(format!("engine: {e}")))?;
    let engine_cfg = cfg.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load(engine_cfg))
        .await
        .map_err(|e| WorkerError::Serve(e.to_string()))??;
    let fingerprint = engine.fingerprint().to_string();
    let stats: SharedStats = Arc::new(Mutex::new(pb::WorkerStats {
        worker_id: cfg.worker_id.clone(),
        role: "prefill".into(),
        ..Default::default()
    }));
    let (job_tx, job_rx) = mpsc::channel(cfg.max_queue);
    let lp = EngineLoop::new(
        engine,
        stats.clone(),
        xpyd_runtime::worker::debug_delay(&cfg.worker_id),
    )
    .panic_after(xpyd_runtime::lifecycle::debug_panic_after(&cfg.worker_id));
    let lifecycle = Lifecycle::new();
    // Cancelled once the worker is done: servers stop, the lease goes.
    let stopping = CancellationToken::new();
    let engine_thread =
        xpyd_runtime::lifecycle::spawn_engine(&lifecycle, stopping.clone(), move || lp.run(job_rx))
            .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let id = Identity {
        worker_id: cfg.worker_id.clone(),
        role: "prefill",
        advertise_host: cfg.advertise_host.clone(),
        fingerprint: fingerprint.clone(),
        max_running: cfg.max_queue,
        membership: cfg.membership.clone(),
        drain_timeout: cfg.drain_timeout,
    };
    let running: Running = Default::default();
    let inflight = {
        let running = running.clone();
        move || running.lock().unwrap_or_else(|e| e.into_inner()).len()
    };
    let evict = {
        let running = running.clone();
        move || {
            for token in running.lock().unwrap_or_else(|e| e.into_inner()).values() {
                token.cancel();
            }
        }
    };
    let service = {
        let (stats, lifecycle) = (stats.clone(), lifecycle.clone());
        move |ready| {
            pb::prefill_worker_server::PrefillWorkerServer::new(PrefillService {
                jobs: job_tx,
                sender: Sender::new(fingerprint),
                stats,
                ready,
                lifecycle,
                running,
            })
        }
    };
    let listeners = host::Listeners {
        grpc: listeners.grpc,
        http: listeners.http,
    };
    let role = host::Role {
        service,
        inflight,
        evict,
    };
    let served = host::serve(id, listeners, stats, &lifecycle, &stopping, &shutdown, role).await;
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    match served {
        Ok(Ending::Failed) => Err(WorkerError::EngineStopped),
        Ok(Ending::Drained) => Ok(()),
        Err(e) => Err(WorkerError::Serve(e)),
    }
}
