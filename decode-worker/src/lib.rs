//! xpyd decode worker. Reserves KV for a request, imports it as the prefill worker streams
//! it (layer by layer, verified), admits the sequence into the running batch and streams
//! its tokens; continuous batching across requests. In combined mode (`single`
//! deployments) it also prefills prompts itself, one chunk between decode steps.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budget;
pub mod engine_loop;
pub mod service;

use budget::Budget;
use engine_loop::EngineLoop;
use service::{DecodeService, Geometry};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use xpyd_engine::{Engine, EngineConfig, KvMemoryFactory};
use xpyd_kv_transfer::{Backend, Receiver, ReceiverConfig};
use xpyd_proto as pb;
use xpyd_runtime::worker::{Membership, SharedStats, start_membership};

/// Decode worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique id in the cluster.
    pub worker_id: String,
    /// Also prefill prompts locally (`combined` role).
    pub combined: bool,
    /// The engine.
    pub engine: EngineConfig,
    /// Most requests admitted at once.
    pub max_running: usize,
    /// KV backend offered when the coordinator asks for none.
    pub kv_backend: Backend,
    /// Where to register.
    pub membership: Membership,
    /// Host name other processes reach this worker at.
    pub advertise_host: String,
}

impl Config {
    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_id.is_empty() {
            return Err("worker_id: must not be empty".into());
        }
        if !(1..=1024).contains(&self.max_running) {
            return Err(format!(
                "max_running: {} is out of range 1..=1024",
                self.max_running
            ));
        }
        self.engine.validate().map_err(|e| format!("engine: {e}"))
    }
}

/// The listeners a decode worker serves on.
pub struct Listeners {
    /// gRPC (`xpyd.v1.DecodeWorker`, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/health`, `/metrics`).
    pub http: TcpListener,
    /// KV transfer receiver.
    pub kv: TcpListener,
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
    /// The KV receiver failed to start.
    #[error("kv-transfer: {0}")]
    Transfer(#[from] xpyd_kv_transfer::TransferError),
    /// A listener failed.
    #[error("serve: {0}")]
    Serve(String),
}

/// Runs the worker until `shutdown`: loads the engine, registers, serves.
///
/// # Errors
/// Bad config, engine load failure, or a listener failing.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    cfg.validate().map_err(WorkerError::Config)?;
    let role = if cfg.combined { "combined" } else { "decode" };
    let engine_cfg = cfg.engine.clone();
    // A worker that receives KV keeps its pools in shared memory, so same-host senders
    // write rows straight into the blocks (placed transfers).
    let shared = !cfg.combined;
    let (engine, kv_pool) = tokio::task::spawn_blocking(move || {
        let mut pool = None;
        let make: Box<KvMemoryFactory<'_>> = Box::new(|bytes| {
            let (mem, p) = xpyd_runtime::kv_pool::kv_memory(bytes);
            pool = p;
            Ok(mem)
        });
        Engine::load_with_kv_memory(engine_cfg, shared.then_some(make)).map(|e| (e, pool))
    })
    .await
    .map_err(|e| WorkerError::Serve(e.to_string()))??;
    let kv_pool = kv_pool.map(|p| (p, engine.kv_layout()));
    let mc = engine.model_config().clone();
    let kv = engine.kv_usage();
    let geometry = Geometry {
        block_size: kv.block_size,
        context_length: mc.context_length,
        kv_bytes_per_token: 2 * (mc.kv_dim() * engine.kv_dtype().size() * mc.n_layer) as u64,
    };
    let fingerprint = engine.fingerprint().to_string();
    let receiver = if cfg.combined {
        None
    } else {
        Some(Receiver::start(
            ReceiverConfig::new(fingerprint.clone()),
            listeners.kv,
        )?)
    };
    let budget = Arc::new(Mutex::new(Budget::new(
        kv.used_blocks + kv.free_blocks,
        cfg.max_running,
    )));
    let stats: SharedStats = Arc::new(Mutex::new(pb::WorkerStats {
        worker_id: cfg.worker_id.clone(),
        role: role.into(),
        kv_blocks_free: kv.free_blocks as u32,
        ..Default::default()
    }));
    let (cmd_tx, cmd_rx) = mpsc::channel(4096);
    let delay = xpyd_runtime::worker::debug_delay(&cfg.worker_id);
    let lp = EngineLoop::new(
        engine,
        budget.clone(),
        stats.clone(),
        role,
        delay,
        cmd_tx.downgrade(),
    );
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || lp.run(cmd_rx))
        .map_err(|e| WorkerError::Serve(e.to_string()))?;

    let info = xpyd_runtime::worker::worker_info(
        &cfg.worker_id,
        role,
        &cfg.advertise_host,
        &listeners.grpc,
        &listeners.http,
        &fingerprint,
        cfg.max_running,
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
    let svc = DecodeService {
        cmds: cmd_tx,
        budget,
        receiver,
        stats,
        ready,
        geometry,
        default_backend: cfg.kv_backend,
        combined: cfg.combined,
        kv_pool,
    };
    let mut server = tonic::transport::Server::builder();
    let (router, health) = xpyd_runtime::grpc::with_standard_services(
        &mut server,
        &[<pb::decode_worker_server::DecodeWorkerServer<DecodeService> as NamedService>::NAME],
    )
    .map_err(|e| WorkerError::Serve(e.to_string()))?;
    health
        .set_serving::<pb::decode_worker_server::DecodeWorkerServer<DecodeService>>()
        .await;
    let router = router.add_service(pb::decode_worker_server::DecodeWorkerServer::new(svc));
    tracing::info!(worker_id = %cfg.worker_id, %grpc_url, %http_url, role, "decode worker serving");
    let served = xpyd_runtime::grpc::serve(router, listeners.grpc, shutdown).await;
    let _ = http.await;
    // The service (and its command sender) is gone: the engine thread drains and exits.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    served.map_err(|e| WorkerError::Serve(e.to_string()))
}
