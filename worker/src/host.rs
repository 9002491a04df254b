//! The worker host: what every role shares once the engine is loaded — the engine
//! itself, the KV receiver, the identity and lease, `/health` `/metrics` `/role`, the
//! gRPC server with health and reflection, stats and the lifecycle (serve until a
//! signal, drain, or stop on an engine failure) — and the one role [`Part`] running on
//! it, which a flip replaces (`flip.rs`).

use crate::decode::service::Geometry;
use crate::flip::FlipRequest;
use crate::slots::{Active, DecodeSlot, PrefillSlot, Slots};
use crate::{Config, Listeners, Role, WorkerError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use xpyd_engine::{Engine, KvLayout, KvMemoryFactory};
use xpyd_kv_transfer::{Backend, Receiver, ReceiverConfig, Sender};
use xpyd_proto as pb;
use xpyd_runtime::grpc::HealthReporter;
use xpyd_runtime::kv_pool::SharedPool;
use xpyd_runtime::lifecycle::{Ending, Lifecycle};
use xpyd_runtime::metrics as m;
use xpyd_runtime::plane::{ClusterKey, Gate};
use xpyd_runtime::worker::{SharedStats, start_membership, worker_info};

/// What a role's part is built from: the process's shared pieces.
pub(crate) struct Shared {
    pub(crate) stats: SharedStats,
    pub(crate) lifecycle: Lifecycle,
    /// Lease readiness.
    pub(crate) ready: watch::Receiver<bool>,
    pub(crate) sender: Sender,
    /// The KV receiver (not in combined mode).
    pub(crate) receiver: Option<Arc<Receiver>>,
    /// The engine's KV pools in shared memory, when they are (placed transfers).
    pub(crate) kv_pool: Option<(SharedPool, KvLayout)>,
    pub(crate) geometry: Geometry,
    pub(crate) kv_backend: Backend,
    /// Test knobs for the starting worker id.
    pub(crate) delay: Option<Duration>,
    pub(crate) panic_after: Option<u64>,
    /// The cluster's key (`None`: an open internal plane).
    pub(crate) key: Option<ClusterKey>,
}

/// The role running on the engine now.
pub(crate) struct Part {
    pub(crate) role: Role,
    /// Its gRPC service.
    pub(crate) service: Active,
    /// Requests in flight (a drain waits for 0).
    pub(crate) inflight: Box<dyn Fn() -> usize + Send + Sync>,
    /// Sends every request left at the drain timeout elsewhere.
    pub(crate) evict: Box<dyn Fn() + Send + Sync>,
    /// The engine thread; it gives the engine back when the service is gone.
    pub(crate) thread: Option<std::thread::JoinHandle<Option<Engine>>>,
    /// Cancelled before the part is meant to end (a flip or the process's end), so the
    /// engine thread's return is not taken for a failure.
    pub(crate) retiring: CancellationToken,
}

/// The running host: a flip changes its part and identity.
pub(crate) struct Host {
    pub(crate) cfg: Config,
    pub(crate) shared: Shared,
    pub(crate) part: Part,
    pub(crate) slots: Slots,
    pub(crate) health: HealthReporter,
    /// The identity the lease registers.
    pub(crate) info: watch::Sender<pb::WorkerInfo>,
}

/// The gRPC health name of a role's service.
pub(crate) fn service_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => {
            <pb::prefill_worker_server::PrefillWorkerServer<PrefillSlot> as NamedService>::NAME
        }
        Role::Decode | Role::Combined => {
            <pb::decode_worker_server::DecodeWorkerServer<DecodeSlot> as NamedService>::NAME
        }
    }
}

/// Starts `role`'s part on `engine`.
pub(crate) fn start_part(
    engine: Engine,
    shared: &Shared,
    settings: &crate::RoleSettings,
) -> std::io::Result<Part> {
    match settings.role {
        Role::Prefill => crate::prefill::start(engine, shared, settings),
        Role::Decode | Role::Combined => crate::decode::start(engine, shared, settings),
    }
}

impl Host {
    /// Routes calls to the part and says so in gRPC health and metrics.
    pub(crate) async fn serve_part(&self) {
        self.slots.set(self.part.service.clone());
        self.health
            .set_service_status(service_name(self.part.role), ServingStatus::Serving)
            .await;
        for r in [Role::Prefill, Role::Decode, Role::Combined] {
            metrics::gauge!(m::WORKER_ROLE, "role" => r.name())
                .set(f64::from(u8::from(r == self.part.role)));
        }
    }

    /// Stops routing to the part and waits for its engine thread: the engine, once the
    /// old service's last call has ended, or `None` when the thread died or did not end
    /// within `wait`.
    pub(crate) async fn retire_part(&mut self, wait: Duration) -> Option<Engine> {
        self.part.retiring.cancel();
        self.slots.set(Active::None);
        self.part.service = Active::None;
        self.health
            .set_service_status(service_name(self.part.role), ServingStatus::NotServing)
            .await;
        let thread = self.part.thread.take()?;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(wait, joined).await {
            Ok(Ok(Ok(engine))) => engine,
            _ => None,
        }
    }
}

/// Runs the worker until `shutdown`: loads the engine, registers, serves its role (and
/// changes it when asked), drains.
///
/// # Errors
/// Bad config, engine load failure, or a listener failing.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    cfg.validate().map_err(WorkerError::Config)?;
    let role = cfg.role.role;
    let mut engine_cfg = cfg.engine.clone();
    engine_cfg.prefill_chunk = cfg.role.prefill_chunk;
    engine_cfg.prefix_cache_blocks = cfg.role.prefix_cache_blocks;
    // A worker that receives KV keeps its pools in shared memory, so same-host senders
    // write rows straight into the blocks (placed transfers). The segment is committed
    // memory: a prefill worker keeps the heap (touched only as used) and moves its pools
    // when it flips to decode.
    let shared_pools = role == Role::Decode;
    let (engine, kv_pool) = tokio::task::spawn_blocking(move || {
        let mut pool = None;
        let make: Box<KvMemoryFactory<'_>> = Box::new(|bytes| {
            let (mem, p) = xpyd_runtime::kv_pool::kv_memory(bytes);
            pool = p;
            Ok(mem)
        });
        Engine::load_with_kv_memory(engine_cfg, shared_pools.then_some(make)).map(|e| (e, pool))
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
    let internal_tls = cfg.membership.tls.internal.clone();
    let receiver = if role == Role::Combined {
        None
    } else {
        let mut rc = ReceiverConfig::new(fingerprint.clone());
        rc.tls = internal_tls
            .as_ref()
            .map(|id| id.server_config(&[]))
            .transpose()
            .map_err(|e| WorkerError::Serve(format!("internal tls: {e}")))?;
        Some(Arc::new(Receiver::start(rc, listeners.kv)?))
    };
    let stats: SharedStats = Arc::new(Mutex::new(pb::WorkerStats {
        worker_id: cfg.worker_id.clone(),
        role: role.name().into(),
        kv_blocks_free: kv.free_blocks as u32,
        ..Default::default()
    }));
    let lifecycle = Lifecycle::new();
    // Cancelled once the worker is done: servers stop, the lease goes.
    let stopping = CancellationToken::new();
    let info = worker_info(
        &cfg.worker_id,
        role.name(),
        &cfg.advertise_host,
        (&listeners.grpc, &listeners.http, internal_tls.is_some()),
        &fingerprint,
        cfg.role.max_running,
    )
    .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let (grpc_url, http_url) = (info.grpc_url.clone(), info.http_url.clone());
    let (info_tx, info_rx) = watch::channel(info);
    let ready = start_membership(
        &cfg.membership,
        info_rx.clone(),
        stats.clone(),
        lifecycle.clone(),
        stopping.clone(),
    );
    let (flip_tx, mut flip_rx) = mpsc::channel::<FlipRequest>(1);
    let metrics = xpyd_runtime::metrics::install();
    // The small HTTP side too: `POST /role` carries the cluster credential.
    let http_tls = internal_tls
        .as_ref()
        .map(|id| id.server_config(&[b"h2", b"http/1.1"]))
        .transpose()
        .map_err(|e| WorkerError::Serve(format!("internal tls: {e}")))?;
    let http = tokio::spawn(xpyd_runtime::http::serve(
        xpyd_runtime::http::worker_router(ready.clone(), lifecycle.clone(), metrics).merge(
            crate::flip::router(flip_tx, info_rx, cfg.membership.key.clone()),
        ),
        listeners.http,
        http_tls,
        stopping.clone(),
    ));
    // HTTP/2 keepalive from this side too: a coordinator that froze or was cut off stops
    // answering pings, its streams end, and their KV is freed.
    let mut server = xpyd_runtime::tls::grpc_server(internal_tls.as_ref())
        .map_err(|e| WorkerError::Serve(format!("internal tls: {e}")))?
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)));
    let names = [service_name(Role::Prefill), service_name(Role::Decode)];
    let (router, health) = xpyd_runtime::grpc::with_standard_services(&mut server, &names)
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    // Both services are known to gRPC health; the role's turns SERVING below.
    for name in names {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let slots = Slots::new(stats.clone());
    // Only members of the cluster call a worker's services.
    let gate = Gate(cfg.membership.key.clone());
    let router = router
        .add_service(
            pb::prefill_worker_server::PrefillWorkerServer::with_interceptor(
                PrefillSlot(slots.clone()),
                gate.clone(),
            ),
        )
        .add_service(
            pb::decode_worker_server::DecodeWorkerServer::with_interceptor(
                DecodeSlot(slots.clone()),
                gate,
            ),
        );
    let shared = Shared {
        stats,
        lifecycle: lifecycle.clone(),
        ready,
        sender: match &cfg.membership.tls.roots {
            Some(r) => Sender::new(fingerprint).with_tls(
                r.client_config(&[])
                    .map_err(|e| WorkerError::Serve(format!("internal tls: {e}")))?,
            ),
            None => Sender::new(fingerprint),
        },
        receiver,
        kv_pool,
        geometry,
        kv_backend: cfg.kv_backend,
        delay: xpyd_runtime::worker::debug_delay(&cfg.worker_id),
        panic_after: xpyd_runtime::lifecycle::debug_panic_after(&cfg.worker_id),
        key: cfg.membership.key.clone(),
    };
    let part =
        start_part(engine, &shared, &cfg.role).map_err(|e| WorkerError::Serve(e.to_string()))?;
    let mut host = Host {
        cfg,
        shared,
        part,
        slots,
        health,
        info: info_tx,
    };
    host.serve_part().await;
    tracing::info!(worker_id = %host.cfg.worker_id, role = role.name(), %grpc_url, %http_url, "worker serving");
    let grpc = tokio::spawn(xpyd_runtime::grpc::serve(
        router,
        listeners.grpc,
        stopping.clone(),
    ));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = lifecycle.failed() => break,
            Some(req) = flip_rx.recv() => {
                let r = host.flip(req.to, req.worker_id).await;
                let _ = req.reply.send(r);
            }
        }
    }
    let drain_timeout = host.cfg.drain_timeout;
    let ending = {
        let part = &host.part;
        xpyd_runtime::lifecycle::until_stopped(
            &lifecycle,
            &shutdown,
            drain_timeout,
            &*part.inflight,
            &*part.evict,
        )
        .await
    };
    // The lease goes and the servers stop; the service, and with it the engine's command
    // channel, is dropped once its last call ends.
    host.part.retiring.cancel();
    stopping.cancel();
    let served = grpc.await.map_err(|e| WorkerError::Serve(e.to_string()))?;
    let _ = http.await;
    let _ = host.retire_part(Duration::from_secs(30)).await;
    served.map_err(|e| WorkerError::Serve(e.to_string()))?;
    match ending {
        Ending::Failed => Err(WorkerError::EngineStopped),
        Ending::Drained => Ok(()),
    }
}
