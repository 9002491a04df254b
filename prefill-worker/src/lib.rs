//! xpyd prefill worker. Takes a prompt and a transfer target, prefills in chunks on the
//! real engine and streams each layer's KV to the decode worker while the next layer
//! computes; answers with the first sampled token once the KV is delivered.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine_loop;
pub mod service;

use engine_loop::EngineLoop;
use service::PrefillService;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use xpyd_engine::{Engine, EngineConfig};
use xpyd_kv_transfer::Sender;
use xpyd_proto as pb;
use xpyd_runtime::worker::{Membership, SharedStats, start_membership};

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
    );
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || lp.run(job_rx))
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let info = xpyd_runtime::worker::worker_info(
        &cfg.worker_id,
        "prefill",
        &cfg.advertise_host,
        &listeners.grpc,
        &listeners.http,
        &fingerprint,
        cfg.max_queue,
    )
    .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let (grpc_url, http_url) = (info.grpc_url.clone(), info.http_url.clone());
    let ready = start_membership(&cfg.membership, info, stats.clone(), shutdown.clone());
    let metrics = xpyd_runtime::metrics::install();
    let http = tokio::spawn(xpyd_runtime::http::serve(
        xpyd_runtime::http::worker_router(ready.clone(), metrics),
        listeners.http,
        shutdown.clone(),
    ));
    let svc = PrefillService {
        jobs: job_tx,
        sender: Sender::new(fingerprint),
        stats,
        ready,
        running: Default::default(),
    };
    let mut server = tonic::transport::Server::builder();
    let (router, health) = xpyd_runtime::grpc::with_standard_services(
        &mut server,
        &[<pb::prefill_worker_server::PrefillWorkerServer<PrefillService> as NamedService>::NAME],
    )
    .map_err(|e| WorkerError::Serve(e.to_string()))?;
    health
        .set_serving::<pb::prefill_worker_server::PrefillWorkerServer<PrefillService>>()
        .await;
    let router = router.add_service(pb::prefill_worker_server::PrefillWorkerServer::new(svc));
    tracing::info!(worker_id = %cfg.worker_id, %grpc_url, %http_url, "prefill worker serving");
    let served = xpyd_runtime::grpc::serve(router, listeners.grpc, shutdown).await;
    let _ = http.await;
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    served.map_err(|e| WorkerError::Serve(e.to_string()))
}
