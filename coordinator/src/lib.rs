//! xpyd coordinator: the public APIs (OpenAI-compatible HTTP with SSE, WebSocket, gRPC
//! `xpyd.v1.Inference`), tokenization, admission with SLO classes, routing of the prefill
//! and decode legs, the request flow across workers, and membership (the embedded
//! registry on the gRPC port, or an etcd watch).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_api;
pub mod advisor;
pub mod audit;
pub mod cluster;
pub mod compat;
pub mod dashboard;
pub mod error;
pub mod events_api;
pub mod flow;
pub mod grpc_api;
pub mod guard;
pub mod http_api;
pub mod keys;
pub mod logprobs;
pub mod registry;
pub mod request;
pub mod router;
pub mod ws;

use cluster::Cluster;
use metrics_exporter_prometheus::PrometheusHandle;
use router::{PolicyKind, Router, RouterConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use xpyd_engine::ModelInfo;
use xpyd_proto as pb;

/// Where workers register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// The embedded registry on the coordinator's gRPC port.
    Embedded,
    /// etcd at these endpoints, keys under `prefix`.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// The roots `https://` endpoints' certificates chain to.
        roots: Option<xpyd_runtime::tls::Roots>,
    },
}

/// Coordinator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The GGUF model (only its metadata and tokenizer are read).
    pub model_path: PathBuf,
    /// Model id clients use (default: the file stem).
    pub model_id: Option<String>,
    /// Single (aggregated) mode: combined workers only.
    pub single: bool,
    /// Prefill-leg policy.
    pub prefill_policy: PolicyKind,
    /// Decode-leg policy.
    pub decode_policy: PolicyKind,
    /// Router tuning (block size for prefix hashing, load weights).
    pub router: RouterConfig,
    /// Waiting requests across classes.
    pub max_queue: usize,
    /// How long a request waits for a free worker before 429.
    pub queue_timeout_ms: u64,
    /// Time to first token (and between tokens) before 504.
    pub first_token_timeout_s: u64,
    /// Hard end-to-end cap.
    pub request_timeout_s: u64,
    /// How many times one request may be sent to another worker pair after a leg fails
    /// (before or after its first token), `0..=16`.
    pub max_migrations: u32,
    /// A client that leaves a streamed token unread this long is cut off and its KV
    /// freed, `1..=3600` s.
    pub client_stall_timeout_s: u64,
    /// Request body limit.
    pub max_request_bytes: usize,
    /// KV backend requested from decode workers (`auto`, `tcp`, `shm`, `ucx`, `nccl`).
    pub kv_backend: String,
    /// KV transfer deadline.
    pub transfer_deadline_ms: u32,
    /// Membership source.
    pub membership: Membership,
    /// How long and how many cluster events are kept.
    pub events: xpyd_runtime::events::Retention,
    /// Embedded registry lease TTL.
    pub lease_ttl: Duration,
    /// Embedded registry renewal interval.
    pub renew_interval: Duration,
    /// The ratio advisor (`/v1/advisor`).
    pub advisor: advisor::Setup,
    /// Who may call the public APIs (checked first: 403).
    pub access: guard::Access,
    /// Requests per second on the inference APIs (excess: 429 with Retry-After).
    pub rate_limit: Option<guard::RateLimit>,
    /// API keys (`None`: every caller the access list lets in is served).
    pub auth: Option<Auth>,
    /// The cluster's own credential (from `xpyd up`): passes as an admin key.
    /// It also serves inference, for `xpyd up --ask`.
    pub cluster_token: Option<String>,
    /// The audit log's file (`None`: kept in memory only).
    pub audit_log: Option<PathBuf>,
    /// The supervisor's control endpoint (`xpyd up` passes it): the dashboard's scale
    /// controls call it.
    pub supervisor_url: Option<String>,
    /// `service_name` of the `infer_service_*` metrics (the cluster's name).
    pub service_name: String,
    /// `group_id` of the `infer_service_*` metrics (default: the service name).
    pub group_id: Option<String>,
    /// TLS: the public APIs' identity, the internal plane's, and the roots workers'
    /// certificates chain to.
    pub tls: xpyd_runtime::tls::Tls,
}

/// API-key authentication.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The key store (a directory, or etcd).
    pub store: keys::Store,
    /// This service's name (what keys are bound to).
    pub service: String,
}

impl Config {
    /// Defaults for a model.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Config {
            model_path: model_path.into(),
            model_id: None,
            single: false,
            prefill_policy: PolicyKind::RoundRobin,
            decode_policy: PolicyKind::LeastConnections,
            router: RouterConfig::default(),
            max_queue: 256,
            queue_timeout_ms: 10_000,
            first_token_timeout_s: 120,
            request_timeout_s: 3600,
            max_migrations: 3,
            client_stall_timeout_s: 30,
            max_request_bytes: 10 << 20,
            kv_backend: "auto".into(),
            transfer_deadline_ms: 30_000,
            membership: Membership::Embedded,
            events: xpyd_runtime::events::Retention::default(),
            lease_ttl: Duration::from_secs(2),
            renew_interval: Duration::from_millis(500),
            advisor: advisor::Setup::default(),
            access: guard::Access::Open,
            rate_limit: None,
            auth: None,
            cluster_token: None,
            audit_log: None,
            supervisor_url: None,
            service_name: "xpyd".into(),
            group_id: None,
            tls: xpyd_runtime::tls::Tls::default(),
        }
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=600_000).contains(&self.queue_timeout_ms) {
            return Err(format!(
                "queue_timeout_ms: {} is out of range 1..=600000",
                self.queue_timeout_ms
            ));
        }
        if !(1..=1200).contains(&self.first_token_timeout_s) {
            return Err(format!(
                "first_token_timeout_s: {} is out of range 1..=1200",
                self.first_token_timeout_s
            ));
        }
        if !(1..=3600).contains(&self.request_timeout_s) {
            return Err(format!(
                "request_timeout_s: {} is out of range 1..=3600",
                self.request_timeout_s
            ));
        }
        if self.max_migrations > 16 {
            return Err(format!(
                "max_migrations: {} is out of range 0..=16",
                self.max_migrations
            ));
        }
        if !(1..=3600).contains(&self.client_stall_timeout_s) {
            return Err(format!(
                "client_stall_timeout_s: {} is out of range 1..=3600",
                self.client_stall_timeout_s
            ));
        }
        if let Some(r) = &self.rate_limit {
            r.validate().map_err(|e| format!("rate_limit.{e}"))?;
        }
        if !(1..=50 << 20).contains(&self.max_request_bytes) {
            return Err(format!(
                "max_request_bytes: {} is out of range 1..=52428800",
                self.max_request_bytes
            ));
        }
        if self.renew_interval * 2 > self.lease_ttl {
            return Err("renew_interval: must be at most half the lease TTL".into());
        }
        self.router.validate().map_err(|e| format!("routing: {e}"))
    }
}

/// State shared by every API.
pub struct App {
    /// The configuration.
    pub cfg: Config,
    /// Tokenizer, context length and fingerprint of the served model.
    pub model: ModelInfo,
    /// The id clients use.
    pub model_id: String,
    /// Workers, routers and the admission queue.
    pub cluster: Cluster,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The cluster's event log (`/v1/events`).
    pub events: events_api::EventStore,
    /// The live ratio advisor (`/v1/advisor`).
    pub advisor: advisor::Live,
    /// The request-rate limit of the inference APIs.
    pub limiter: guard::Limiter,
    /// The API keys, when the service requires them.
    pub keys: Option<keys::Live>,
    /// The cluster's credential on calls to workers.
    pub badge: xpyd_runtime::plane::Badge,
    /// The cluster's key, to tell its own processes' HTTP calls (`x-xpyd-cluster`).
    pub cluster_key: Option<xpyd_runtime::plane::ClusterKey>,
    /// Admin operations, who made them and how they ended (`/v1/audit`).
    pub audit: audit::Audit,
    /// The dashboard's time series.
    pub board: dashboard::Board,
    /// The managed product's metric names.
    pub compat: compat::Compat,
    /// Cancelled when the coordinator begins to stop: endless streams (the dashboard's)
    /// end then, so they do not hold the graceful shutdown open.
    pub stopping: CancellationToken,
}

impl App {
    /// The access list for a caller at `ip` (`None`: the transport did not say, which
    /// passes only when there is no list).
    ///
    /// # Errors
    /// 403.
    pub fn access(&self, ip: Option<std::net::IpAddr>) -> Result<(), error::ApiError> {
        match (ip, &self.cfg.access) {
            (_, guard::Access::Open) => Ok(()),
            (Some(ip), a) => a.check(ip),
            (None, _) => Err(error::ApiError::refusal(
                403,
                "permission_denied",
                "address_not_allowed",
                "the caller's address is unknown and this service has an access list",
            )),
        }
    }

    /// The API key a call presents (its `Authorization` value), when the service
    /// requires keys.
    ///
    /// # Errors
    /// 401 or 403.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        need: keys::Need,
    ) -> Result<keys::Caller, error::ApiError> {
        match &self.keys {
            None => Ok(keys::Caller::Anyone),
            Some(k) => k.check(authorization, need),
        }
    }

    /// A fresh request id: 64 random bits, so no caller can guess another request's
    /// (a clash is as likely as two random 64-bit numbers meeting).
    pub fn next_id(&self) -> u64 {
        random_u64()
    }

    /// A channel to a worker whose calls carry the cluster's credential.
    pub fn internal(&self, ch: &tonic::transport::Channel) -> xpyd_runtime::plane::Channel {
        tonic::service::interceptor::InterceptedService::new(ch.clone(), self.badge.clone())
    }
}

/// 64 random bits from the OS (a counter mixed with the time when it has none to give,
/// which no supported system lacks).
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        (t ^ FALLBACK.fetch_add(1, Ordering::Relaxed).rotate_left(40))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

/// The coordinator's listeners.
pub struct Listeners {
    /// OpenAI HTTP, SSE, WebSocket, /health, /metrics.
    pub http: TcpListener,
    /// Public gRPC: `xpyd.v1.Inference`, health, reflection.
    pub grpc: TcpListener,
    /// The internal plane: `xpyd.v1.Registry` (workers register here), health. Every call
    /// but health needs the cluster's credential.
    pub internal: TcpListener,
}

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
    /// The model's metadata could not be read.
    #[error("model: {0}")]
    Model(#[from] xpyd_engine::EngineError),
    /// A listener failed.
    #[error("serve: {0}")]
    Serve(String),
}

/// Keeps the API keys in step with their store on a blocking thread: reloads a changed
/// store every [`keys::RECHECK`], writes when keys were last used every 5 s and once
/// more at shutdown.
async fn record_key_use(app: Arc<App>, shutdown: CancellationToken) {
    if app.keys.is_none() {
        return;
    }
    let mut ticks = 0u32;
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(keys::RECHECK) => false,
            () = shutdown.cancelled() => true,
        };
        ticks += 1;
        let flush = stop || ticks.is_multiple_of(5);
        let a = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(k) = &a.keys {
                k.refresh();
                if flush {
                    k.flush_used();
                }
            }
        })
        .await;
        if stop {
            return;
        }
    }
}

/// Serves the internal plane (the embedded registry behind the cluster's credential)
/// until `shutdown`.
async fn serve_internal(
    cfg: &Config,
    cluster: Cluster,
    key: Option<xpyd_runtime::plane::ClusterKey>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, CoordinatorError> {
    type Registry = pb::registry_server::RegistryServer<registry::EmbeddedRegistry>;
    let mut server = xpyd_runtime::tls::grpc_server(cfg.tls.internal.as_ref())
        .map_err(|e| CoordinatorError::Config(format!("internal tls: {e}")))?;
    let (router, health) = xpyd_runtime::grpc::with_standard_services(
        &mut server,
        &[<Registry as NamedService>::NAME],
    )
    .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
    health.set_serving::<Registry>().await;
    let router = router.add_service(Registry::with_interceptor(
        registry::EmbeddedRegistry {
            cluster,
            ttl: cfg.lease_ttl,
            renew: cfg.renew_interval,
        },
        xpyd_runtime::plane::Gate(key),
    ));
    tracing::info!(internal = ?listener.local_addr().ok(), "internal plane serving");
    Ok(tokio::spawn(async move {
        if let Err(e) = xpyd_runtime::grpc::serve(router, listener, shutdown).await {
            tracing::error!(error = %e, "internal plane listener failed");
        }
    }))
}

/// Runs the coordinator until `shutdown`.
///
/// # Errors
/// Bad config, unreadable model, or a listener failing.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    cfg.validate().map_err(CoordinatorError::Config)?;
    let path = cfg.model_path.clone();
    let model = tokio::task::spawn_blocking(move || ModelInfo::load(&path))
        .await
        .map_err(|e| CoordinatorError::Serve(e.to_string()))??;
    let model_id = cfg.model_id.clone().unwrap_or_else(|| {
        let stem = cfg
            .model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        stem.unwrap_or_else(|| "model".into())
    });
    let cluster = Cluster::new(
        Router::new(cfg.prefill_policy, cfg.router.clone()),
        Router::new(cfg.decode_policy, cfg.router.clone()),
        cfg.max_queue,
    )
    .with_roots(cfg.tls.roots.clone());
    let keys = match &cfg.auth {
        None => None,
        Some(a) => Some(
            keys::Live::new(a.store.clone(), &a.service, cfg.cluster_token.clone())
                .map_err(|e| CoordinatorError::Config(format!("auth: {e}")))?,
        ),
    };
    let key = cfg
        .cluster_token
        .as_deref()
        .map(xpyd_runtime::plane::ClusterKey::from_token);
    if key.is_none() {
        tracing::warn!(
            "no cluster token: the internal plane is open (any caller may register a worker); `xpyd up` gives every cluster one"
        );
    }
    let audit = match &cfg.audit_log {
        None => audit::Audit::in_memory(),
        Some(p) => {
            let p = p.clone();
            tokio::task::spawn_blocking(move || audit::Audit::open(p))
                .await
                .map_err(|e| CoordinatorError::Serve(e.to_string()))?
                .map_err(|e| CoordinatorError::Config(e.to_string()))?
        }
    };
    let app = Arc::new(App {
        cfg: cfg.clone(),
        model,
        model_id,
        cluster: cluster.clone(),
        metrics: xpyd_runtime::metrics::install(),
        events: events_api::EventStore::new(cfg.events),
        advisor: advisor::Live::new(cfg.advisor.clone()),
        limiter: guard::Limiter::new(cfg.rate_limit),
        keys,
        badge: xpyd_runtime::plane::Badge::new(key.as_ref()),
        cluster_key: key.clone(),
        audit,
        board: dashboard::Board::default(),
        compat: compat::Compat::new(&compat::Identity {
            service_name: cfg.service_name.clone(),
            group_id: cfg
                .group_id
                .clone()
                .unwrap_or_else(|| cfg.service_name.clone()),
            instance_name: listeners
                .http
                .local_addr()
                .map_or_else(|_| "coordinator".into(), |a| a.to_string()),
        }),
        stopping: shutdown.clone(),
    });
    let membership = match &cfg.membership {
        Membership::Embedded => tokio::spawn(registry::sweep(cluster.clone(), shutdown.clone())),
        Membership::Etcd {
            endpoints,
            prefix,
            roots,
        } => tokio::spawn(registry::watch_etcd(
            cluster.clone(),
            endpoints.clone(),
            prefix.clone(),
            xpyd_runtime::tls::etcd_options(roots.as_ref()),
            key.clone(),
            shutdown.clone(),
        )),
    };
    let advisor_loop = tokio::spawn(advisor::api::run_loop(app.clone(), shutdown.clone()));
    let used_loop = tokio::spawn(record_key_use(app.clone(), shutdown.clone()));
    let sampler = tokio::spawn(dashboard::run_sampler(app.clone(), shutdown.clone()));
    let http_addr = listeners.http.local_addr().ok();
    let public_tls = cfg
        .tls
        .public
        .as_ref()
        .map(|id| id.server_config(&[b"h2", b"http/1.1"]))
        .transpose()
        .map_err(|e| CoordinatorError::Config(format!("public tls: {e}")))?;
    let http = tokio::spawn(xpyd_runtime::http::serve(
        http_api::router(app.clone()),
        listeners.http,
        public_tls,
        shutdown.clone(),
    ));
    let mut server = xpyd_runtime::tls::grpc_server(cfg.tls.public.as_ref())
        .map_err(|e| CoordinatorError::Config(format!("public tls: {e}")))?;
    let (router, health) = xpyd_runtime::grpc::with_standard_services(
        &mut server,
        &[
            <pb::inference_server::InferenceServer<grpc_api::InferenceService> as NamedService>::NAME,
        ],
    )
    .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
    health
        .set_serving::<pb::inference_server::InferenceServer<grpc_api::InferenceService>>()
        .await;
    let router = router.add_service(
        pb::inference_server::InferenceServer::new(grpc_api::InferenceService { app: app.clone() })
            .max_decoding_message_size(cfg.max_request_bytes),
    );
    let internal = serve_internal(&cfg, cluster, key, listeners.internal, shutdown.clone()).await?;
    tracing::info!(
        http = ?http_addr,
        grpc = ?listeners.grpc.local_addr().ok(),
        model = %app.model_id,
        "coordinator serving"
    );
    let served = xpyd_runtime::grpc::serve(router, listeners.grpc, shutdown).await;
    let _ = internal.await;
    let _ = http.await;
    let _ = membership.await;
    let _ = advisor_loop.await;
    let _ = used_loop.await;
    let _ = sampler.await;
    served.map_err(|e| CoordinatorError::Serve(e.to_string()))
}
