//! xpyd decode worker. Reserves KV for a request, imports it as the prefill worker streams
//! it (layer by layer, verified), admits the sequence into the running batch and streams
//! its tokens; continuous batching across requests. In combined mode (`single`
//! deployments) it also prefills prompts itself, one chunk between decode steps. On
//! SIGTERM it drains (no new requests, its lease kept but marked draining; in-flight
//! streams finish within `drain_timeout`, the rest fail with kind draining and migrate);
//! if its engine thread stops it reports itself failed and exits to be rebuilt.
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
use xpyd_engine::{Engine, EngineConfig, KvMemoryFactory};
use xpyd_kv_transfer::{Backend, Receiver, ReceiverConfig};
use xpyd_proto as pb;
use xpyd_runtime::host::{self, Identity};
use xpyd_runtime::lifecycle::{Ending, Lifecycle};
use xpyd_runtime::worker::{Membership, SharedStats};

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
    /// How long a drain (SIGTERM) waits for in-flight requests before sending the rest
    /// to other workers.
    pub drain_timeout: std::time::Duration,
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
    /// The engine thread stopped (a panic, say): the worker reported itself failed and
    /// stopped so it is rebuilt.
    #[error("the engine thread stopped")]
    EngineStopped,
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
    let stats_for_lease = stats.clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(4096);
    let delay = xpyd_runtime::worker::debug_delay(&cfg.worker_id);
    let lp = EngineLoop::new(
        engine,
        budget.clone(),
        stats.clone(),
        role,
        delay,
        cmd_tx.downgrade(),
    )
    .panic_after(xpyd_runtime::lifecycle::debug_panic_after(&cfg.worker_id));
    let lifecycle = Lifecycle::new();
    // Cancelled once the worker is done: servers stop, the lease goes.
    let stopping = CancellationToken::new();
    let engine_thread =
        xpyd_runtime::lifecycle::spawn_engine(&lifecycle, stopping.clone(), move || lp.run(cmd_rx))
            .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let id = Identity {
        worker_id: cfg.worker_id.clone(),
        role,
        advertise_host: cfg.advertise_host.clone(),
        fingerprint,
        max_running: cfg.max_running,
        membership: cfg.membership.clone(),
        drain_timeout: cfg.drain_timeout,
    };
    let running = {
        let budget = budget.clone();
        move || budget.lock().unwrap_or_else(|e| e.into_inner()).running()
    };
    let evict = {
        let cmds = cmd_tx.clone();
        move || {
            let _ = cmds.try_send(engine_loop::Cmd::Evict);
        }
    };
    let service = {
        let lifecycle = lifecycle.clone();
        move |ready| {
            pb::decode_worker_server::DecodeWorkerServer::new(DecodeService {
                cmds: cmd_tx,
                budget,
                receiver,
                stats: stats.clone(),
                ready,
                lifecycle,
                geometry,
                default_backend: cfg.kv_backend,
                combined: cfg.combined,
                kv_pool,
            })
        }
    };
    let listeners = host::Listeners {
        grpc: listeners.grpc,
        http: listeners.http,
    };
    let role = host::Role {
        service,
        inflight: running,
        evict,
    };
    let served = host::serve(
        id,
        listeners,
        stats_for_lease,
        &lifecycle,
        &stopping,
        &shutdown,
        role,
    )
    .await;
    // The service (and its command sender) is gone: the engine thread drains and exits.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    match served {
        Ok(Ending::Failed) => Err(WorkerError::EngineStopped),
        Ok(Ending::Drained) => Ok(()),
        Err(e) => Err(WorkerError::Serve(e)),
    }
}
