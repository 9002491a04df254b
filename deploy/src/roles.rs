//! The role processes `xpyd up` starts — `xpyd coordinator` and `xpyd worker` — as thin
//! mains: read the manifest, build the role's typed config, bind, call its
//! `run(config, listeners, shutdown)`, and stop on SIGINT/SIGTERM.

use crate::manifest::{self, Manifest, ManifestError, Role};
use crate::model_fetch::{self, DEFAULT_MODEL};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use xpyd_runtime::RegistryBackend;
use xpyd_runtime::shutdown::{CancellationToken, on_signal};
use xpyd_runtime::worker::Membership;

/// Flags of `xpyd coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// The cluster manifest.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Model file (default: from the manifest).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Override `coordinator.http_port`.
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Override `coordinator.grpc_port`.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Override `coordinator.internal_port` (the internal plane: workers register there).
    #[arg(long)]
    pub internal_port: Option<u16>,
    /// Stop when this process (the `xpyd up` that started it) is gone.
    #[arg(long, hide = true)]
    pub supervisor_pid: Option<i32>,
    /// The cluster's credential (a file `xpyd up` writes, mode 0600): it closes the
    /// internal plane to everyone without it, and passes as an admin key for the
    /// supervisor's own calls. Without it the internal plane is open.
    #[arg(long)]
    pub cluster_token_file: Option<PathBuf>,
    /// The audit log of admin operations (default: `audit/<cluster name>.jsonl` in the
    /// state directory, `$XPYD_STATE_DIR` or the user data directory's `xpyd`).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// The supervisor's control endpoint, for the dashboard's scale controls (`xpyd up`
    /// passes it).
    #[arg(long, hide = true)]
    pub supervisor_url: Option<String>,
    /// TLS files.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Flags of `xpyd worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The cluster manifest.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// The worker's role (its section under `roles:` in the manifest).
    #[arg(long, value_enum)]
    pub role: WorkerRole,
    /// Replica index (names the worker `<role>-<index>`).
    #[arg(long, default_value_t = 0)]
    pub index: u32,
    /// Model file (default: from the manifest).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The coordinator's internal-plane URL (embedded registry).
    #[arg(long)]
    pub registry_url: Option<String>,
    /// The cluster's credential (a file of mode 0600, as `xpyd up` writes): the worker
    /// proves membership with it and admits only callers that have it. Without it the
    /// worker's internal plane is open.
    #[arg(long)]
    pub cluster_token_file: Option<PathBuf>,
    /// Stop when this process (the `xpyd up` that started it) is gone.
    #[arg(long, hide = true)]
    pub supervisor_pid: Option<i32>,
    /// Address to bind and advertise (default: the manifest's `coordinator.host`); a
    /// worker on another host or network namespace gives its own.
    #[arg(long)]
    pub host: Option<String>,
    /// TLS files (the public ones are not used by a worker).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Command-line flags naming a process's TLS files (the role processes take them; `xpyd
/// up` passes the ones it issued).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// The CA every member of the internal plane trusts (PEM). With it, this process
    /// dials members over TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This process's internal-plane certificate chain (PEM), issued by `--tls-ca`.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The certificate chain the public APIs serve (coordinator only).
    #[arg(long, requires = "public_tls_key")]
    pub public_tls_cert: Option<PathBuf>,
    /// The key of `--public-tls-cert`.
    #[arg(long, requires = "public_tls_cert")]
    pub public_tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Reads the files named.
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate or key.
    pub fn load(&self) -> Result<xpyd_runtime::tls::Tls, xpyd_runtime::tls::TlsError> {
        use xpyd_runtime::tls::{Identity, Roots, Tls};
        let pair = |c: &Option<PathBuf>, k: &Option<PathBuf>| match (c, k) {
            (Some(c), Some(k)) => Identity::load(c, k).map(Some),
            _ => Ok(None),
        };
        Ok(Tls {
            public: pair(&self.public_tls_cert, &self.public_tls_key)?,
            internal: pair(&self.tls_cert, &self.tls_key)?,
            roots: self.tls_ca.as_deref().map(Roots::load).transpose()?,
        })
    }

    /// The flags again, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, v) in [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--public-tls-cert", &self.public_tls_cert),
            ("--public-tls-key", &self.public_tls_key),
        ] {
            if let Some(p) = v {
                out.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        out
    }
}

/// `--role` of `xpyd worker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerRole {
    /// Prefill worker of a disaggregated cluster.
    Prefill,
    /// Decode worker of a disaggregated cluster.
    Decode,
    /// Prefill and decode in one worker (single mode).
    Combined,
}

impl From<WorkerRole> for Role {
    fn from(r: WorkerRole) -> Role {
        match r {
            WorkerRole::Prefill => Role::Prefill,
            WorkerRole::Decode => Role::Decode,
            WorkerRole::Combined => Role::Combined,
        }
    }
}

/// The model file a manifest names.
pub fn model_path(m: &Manifest, flag: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.clone());
    }
    if m.model == "default" {
        model_fetch::ensure(&DEFAULT_MODEL, &model_fetch::models_dir())
    } else {
        Ok(PathBuf::from(&m.model))
    }
}

/// The role's spec in the manifest.
fn role_spec(m: &Manifest, role: Role) -> Result<&manifest::RoleSpec> {
    m.roles.get(role).ok_or_else(|| {
        ManifestError::invalid(format!("roles.{}", role.name()), "not in this manifest").into()
    })
}

/// Thread count and pinning of a worker (applied before any thread starts).
pub fn worker_compute(a: &WorkerArgs) -> Result<xpyd_engine::compute::ComputeConfig> {
    let m = Manifest::load(&a.file)?;
    let spec = role_spec(&m, a.role.into())?;
    Ok(xpyd_engine::compute::ComputeConfig {
        threads: Some(spec.threads as usize),
        cpus: spec.cpus_of(a.index)?,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("bind {host}:{port}"))
}

fn policy(p: manifest::RoutingPolicy) -> Result<xpyd_coordinator::router::PolicyKind> {
    p.name()
        .parse()
        .map_err(|e| anyhow::anyhow!("routing: {e}"))
}

/// `xpyd coordinator`: prints `{"http":URL,"grpc":URL}` on stdout once bound.
pub fn coordinator(a: &CoordinatorArgs) -> Result<()> {
    let m = Manifest::load(&a.file)?;
    let mut cfg = xpyd_coordinator::Config::new(model_path(&m, &a.model)?);
    let c = &m.coordinator;
    cfg.single = m.mode == manifest::Mode::Single;
    cfg.prefill_policy = policy(m.routing.prefill)?;
    cfg.decode_policy = policy(m.routing.decode)?;
    cfg.router.block_size = m.routing.block_size as usize;
    cfg.max_queue = c.max_queue as usize;
    cfg.queue_timeout_ms = c.queue_timeout_ms as u64;
    cfg.first_token_timeout_s = c.first_token_timeout_s as u64;
    cfg.request_timeout_s = c.request_timeout_s as u64;
    cfg.max_migrations = c.max_migrations;
    cfg.client_stall_timeout_s = c.client_stall_timeout_s as u64;
    cfg.max_request_bytes = c.max_request_bytes as usize;
    cfg.rate_limit = c
        .rate_limit
        .as_ref()
        .map(|r| xpyd_coordinator::guard::RateLimit {
            rps: r.rps,
            per_instance: r.scope == manifest::RateScope::Instance,
        });
    cfg.access = xpyd_coordinator::guard::Access::parse(&c.access.allow, &c.access.deny)
        .map_err(|e| anyhow::anyhow!("coordinator.access.{e}"))?;
    let mut auth_store = false;
    if c.auth == manifest::AuthMode::ApiKey {
        auth_store = true;
    }
    if let Some(f) = &a.cluster_token_file {
        cfg.cluster_token = Some(xpyd_runtime::plane::read_token(f)?);
    }
    cfg.audit_log = Some(a.audit_log.clone().unwrap_or_else(|| {
        xpyd_coordinator::keys::state_dir()
            .join("audit")
            .join(format!("{}.jsonl", m.name))
    }));
    cfg.supervisor_url = a.supervisor_url.clone();
    cfg.tls = a.tls.load()?;
    if auth_store {
        cfg.auth = Some(xpyd_coordinator::Auth {
            store: key_store(&m, &a.file, cfg.tls.roots.as_ref())?,
            service: m.name.clone(),
        });
    }
    let public = xpyd_runtime::tls::scheme(cfg.tls.public.is_some());
    let internal = xpyd_runtime::tls::scheme(cfg.tls.internal.is_some());
    cfg.service_name = m.name.clone();
    cfg.kv_backend = m.kv.backend.name().into();
    cfg.transfer_deadline_ms = m.kv.transfer_deadline_ms;
    cfg.lease_ttl = Duration::from_millis(m.registry.lease_ttl_ms as u64);
    cfg.renew_interval = Duration::from_millis(m.registry.renew_interval_ms as u64);
    cfg.events = xpyd_runtime::events::Retention {
        max_age: Duration::from_secs(m.events.retention_s),
        max_events: m.events.max_events as usize,
    };
    cfg.advisor = advisor_setup(&m, &a.file);
    if m.registry.backend == manifest::RegistryBackend::Etcd {
        cfg.membership = xpyd_coordinator::Membership::Etcd {
            endpoints: m.registry.endpoints.clone(),
            prefix: etcd_prefix(&m),
            roots: etcd_roots(&m, &a.file, cfg.tls.roots.as_ref())?,
        };
    }
    runtime()?.block_on(async {
        let http = bind(&c.host, a.http_port.unwrap_or(c.http_port)).await?;
        let grpc = bind(&c.host, a.grpc_port.unwrap_or(c.grpc_port)).await?;
        let internal_l = bind(&c.host, a.internal_port.unwrap_or(c.internal_port)).await?;
        let urls = serde_json::json!({
            "http": format!("{public}://{}", http.local_addr()?),
            "grpc": format!("{public}://{}", grpc.local_addr()?),
            "internal": format!("{internal}://{}", internal_l.local_addr()?),
        });
        println!("{urls}");
        let listeners = xpyd_coordinator::Listeners {
            http,
            grpc,
            internal: internal_l,
        };
        let shutdown = on_signal();
        watch_parent(a.supervisor_pid, &shutdown, c.graceful_shutdown.timeout());
        xpyd_coordinator::run(cfg, listeners, shutdown).await?;
        Ok(())
    })
}

/// Where a measured profile of the manifest's model (`default` or a file) on this
/// machine is cached.
pub fn cached_profile(model: &str) -> PathBuf {
    let stem = Path::new(model)
        .file_stem()
        .map_or_else(|| "default".into(), |s| s.to_string_lossy().into_owned());
    model_fetch::models_dir()
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("profiles")
        .join(format!("{stem}.json"))
}

/// The advisor's setup from the manifest: its settings, the service model of its
/// profile (or why there is none) and the workers' settings that shape latency.
fn advisor_setup(m: &Manifest, file: &Path) -> xpyd_coordinator::advisor::Setup {
    use xpyd_planner::sim::{ClusterConfig, Layout, Policy};
    let a = &m.advisor;
    let single = m.mode == manifest::Mode::Single;
    let (front, back) = if single {
        (Role::Combined, Role::Combined)
    } else {
        (Role::Prefill, Role::Decode)
    };
    let chunk = m.roles.get(front).map_or(256, |s| s.prefill_chunk);
    let back_spec = m.roles.get(back);
    let block_size = 16;
    let sim_policy = |p: manifest::RoutingPolicy| match p {
        manifest::RoutingPolicy::RoundRobin => Policy::RoundRobin,
        _ => Policy::LeastConnections,
    };
    let base = ClusterConfig {
        max_running: back_spec.map_or(16, |s| s.max_running_for(back)),
        kv_blocks: back_spec
            .map(|s| s.kv_blocks)
            .filter(|&b| b > 0)
            .unwrap_or((xpyd_engine::config::DEFAULT_KV_TOKENS / block_size) as u32),
        block_size: block_size as u32,
        max_queue: m.coordinator.max_queue as usize,
        queue_timeout_s: f64::from(m.coordinator.queue_timeout_ms) / 1e3,
        prefill_policy: sim_policy(m.routing.prefill),
        decode_policy: sim_policy(m.routing.decode),
        ..ClusterConfig::defaults(Layout::Aggregated { workers: 1 })
    };
    let path = match &a.profile {
        Some(p) => file.parent().unwrap_or(Path::new(".")).join(p),
        None => cached_profile(&m.model),
    };
    let model = match std::fs::read_to_string(&path) {
        Ok(text) => xpyd_planner::profile::service_model(&text, chunk)
            .map_err(|e| format!("profile {}: {e}", path.display())),
        Err(e) if a.profile.is_none() && e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "no performance profile yet: `xpyd up` measures one in the background once a cluster of real workers is ready (a few minutes), or name one under `advisor.profile`, or measure it with `xpyd bench profile --out {}`",
            path.display()
        )),
        Err(e) => Err(format!("profile {}: {e}", path.display())),
    };
    if let Err(e) = &model
        && a.enabled
    {
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::WARN,
            &format!("coordinator: advisor: {e}"),
        );
    }
    let mut config = a.planner_config();
    // A running cluster changes its split, not its mode.
    config.shapes = if single {
        xpyd_planner::advisor::Shapes::Aggregated
    } else {
        xpyd_planner::advisor::Shapes::Disaggregated
    };
    // The default profile may be measured by `xpyd up` after this start.
    let reload = (a.profile.is_none() && model.is_err()).then(|| (path.clone(), chunk));
    xpyd_coordinator::advisor::Setup {
        enabled: a.enabled,
        window: Duration::from_secs(a.window_s),
        config,
        budget_from_cluster: a.budget.is_none(),
        model,
        reload,
        profile: path.display().to_string(),
        base,
    }
}

/// How often a role process checks that its supervisor is still there.
const PARENT_POLL: Duration = Duration::from_millis(200);

/// Blocks until `parent` is no longer this process's parent (it died, even by SIGKILL,
/// and the process was re-parented).
pub(crate) fn wait_parent_gone(parent: i32) {
    while nix::unistd::getppid().as_raw() == parent {
        std::thread::sleep(PARENT_POLL);
    }
}

/// Parent-death watchdog, the safe stand-in for `PR_SET_PDEATHSIG` (which needs `unsafe`
/// in `pre_exec`): a thread polls `getppid()`; when it is no longer `parent` (the
/// supervisor died, even by SIGKILL, and the process was re-parented), it starts the
/// graceful stop as SIGTERM would and ends the process when `grace` has passed.
fn watch_parent(parent: Option<i32>, shutdown: &CancellationToken, grace: Duration) {
    let Some(parent) = parent else {
        return;
    };
    let token = shutdown.clone();
    let spawned = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            wait_parent_gone(parent);
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::ERROR,
                &format!("xpyd: supervisor (pid {parent}) is gone; stopping"),
            );
            token.cancel();
            std::thread::sleep(grace);
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::WARN,
            &format!("xpyd: parent watchdog: {e}"),
        );
    }
}

/// The roots etcd's `https://` endpoints are checked against: `registry.ca` (relative to
/// the manifest's directory), else the cluster's CA.
fn etcd_roots(
    m: &Manifest,
    file: &Path,
    cluster: Option<&xpyd_runtime::tls::Roots>,
) -> Result<Option<xpyd_runtime::tls::Roots>> {
    match &m.registry.ca {
        Some(ca) => {
            let path = file.parent().unwrap_or(Path::new(".")).join(ca);
            Ok(Some(
                xpyd_runtime::tls::Roots::load(&path).context("registry.ca")?,
            ))
        }
        None => Ok(cluster.cloned()),
    }
}

/// The API-key store of a manifest's cluster: in etcd under `<registry.prefix>keys/`
/// when its membership is there (shared by the clusters of that prefix, as a state
/// directory's store is shared by its clusters), else the state directory's `keys/`.
///
/// # Errors
/// An unreadable `registry.ca`.
pub fn key_store(
    m: &Manifest,
    file: &Path,
    cluster: Option<&xpyd_runtime::tls::Roots>,
) -> Result<xpyd_coordinator::keys::Store> {
    Ok(match m.registry.backend {
        manifest::RegistryBackend::Etcd => xpyd_coordinator::keys::Store::etcd(
            m.registry.endpoints.clone(),
            &m.registry.prefix,
            etcd_roots(m, file, cluster)?,
        ),
        manifest::RegistryBackend::Embedded => {
            xpyd_coordinator::keys::Store::new(xpyd_coordinator::keys::default_dir())
        }
    })
}

/// The etcd key prefix of a manifest's cluster.
fn etcd_prefix(m: &Manifest) -> String {
    format!("{}{}/", m.registry.prefix, m.name)
}

/// The `mock_latency` section of a performance profile (the JSON the profiling command
/// writes).
pub fn mock_latency_of_profile(path: &Path, chunk: u32) -> Result<xpyd_engine::MockLatency> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The simulator's own service model when the profile has its fits: the mock then
    // runs exactly as fast as the ratio advisor predicts.
    if let Ok(m) = xpyd_planner::profile::service_model(&text, chunk) {
        let l = xpyd_engine::MockLatency {
            prefill_fit: Some(m.prefill),
            decode_fit: Some(m.decode),
            ..Default::default()
        };
        l.validate()?;
        return Ok(l);
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let l: xpyd_engine::MockLatency = serde_json::from_value(v["mock_latency"].clone())
        .with_context(|| format!("{}: no valid `mock_latency` section", path.display()))?;
    l.validate()?;
    Ok(l)
}

/// How long a worker's drain waits for in-flight requests: its `graceful_shutdown`
/// budget less a margin for closing down, so the process exits before the supervisor's
/// SIGKILL at the end of that budget.
fn drain_timeout(budget: Duration) -> Duration {
    budget
        .saturating_sub(Duration::from_millis(500))
        .max(Duration::from_millis(500))
}

/// What `role` decides in a worker of `spec` once the model is loaded.
fn role_settings(spec: &manifest::RoleSpec, role: Role) -> xpyd_worker::RoleSettings {
    let max_running = spec.max_running_for(role) as usize;
    xpyd_worker::RoleSettings {
        role: match role {
            Role::Prefill => xpyd_worker::Role::Prefill,
            Role::Decode => xpyd_worker::Role::Decode,
            Role::Combined => xpyd_worker::Role::Combined,
        },
        // A prefill worker queues: its bound is a multiple of what it runs at once.
        max_running: match role {
            Role::Prefill => max_running.max(1) * 64,
            Role::Decode | Role::Combined => max_running,
        },
        prefill_chunk: spec.prefill_chunk as usize,
        // Prefix caching pays where prompts are computed; a plain decode worker only
        // imports.
        prefix_cache_blocks: if role == Role::Decode {
            0
        } else {
            spec.prefix_cache_blocks as usize
        },
    }
}

/// The role a worker of `role` may flip to without a restart, or why it may not: the
/// other of prefill and decode, when the manifest runs both with engines a reload would
/// not change (same engine kind, mock timing, KV dtype and pool, threads and pinning).
fn flip_settings(m: &Manifest, role: Role) -> Result<xpyd_worker::RoleSettings, String> {
    let other = match role {
        Role::Prefill => Role::Decode,
        Role::Decode => Role::Prefill,
        Role::Combined => return Err("a combined worker has no other role".into()),
    };
    let (Some(a), Some(b)) = (m.roles.get(role), m.roles.get(other)) else {
        return Err(format!("the manifest has no roles.{}", other.name()));
    };
    let mock = a.engine == manifest::EngineKind::Mock;
    let differs = [
        ("engine", a.engine != b.engine),
        ("mock_latency", a.mock_latency != b.mock_latency),
        ("mock_profile", a.mock_profile != b.mock_profile),
        // A mock's timing from a profile is fitted at the chunk size.
        ("prefill_chunk", mock && a.prefill_chunk != b.prefill_chunk),
        ("kv_dtype", a.kv_dtype != b.kv_dtype),
        ("kv_blocks", a.kv_blocks != b.kv_blocks),
        ("threads", a.threads != b.threads),
        ("cpus", a.cpus != b.cpus || a.pin != b.pin),
    ];
    if let Some((field, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(format!(
            "roles.{} and roles.{} differ in `{field}`, which only a restart changes",
            role.name(),
            other.name()
        ));
    }
    Ok(role_settings(b, other))
}

/// `xpyd worker`.
pub fn worker(a: &WorkerArgs) -> Result<()> {
    let m = Manifest::load(&a.file)?;
    let role: Role = a.role.into();
    let spec = role_spec(&m, role)?;
    let mut engine = xpyd_engine::EngineConfig::new(model_path(&m, &a.model)?);
    // The mock computes nothing but still uses the model file's tokenizer and geometry.
    if spec.engine == manifest::EngineKind::Mock {
        engine.mock = Some(match &spec.mock_profile {
            Some(p) => mock_latency_of_profile(
                &a.file.parent().unwrap_or(Path::new(".")).join(p),
                spec.prefill_chunk,
            )
            .with_context(|| format!("roles.{}.mock_profile", role.name()))?,
            None => spec.mock_latency.unwrap_or_default(),
        });
    }
    engine.kv_dtype = match spec.kv_dtype {
        manifest::KvDtype::F32 => xpyd_engine::KvDtype::F32,
        manifest::KvDtype::F16 => xpyd_engine::KvDtype::F16,
    };
    if spec.kv_blocks > 0 {
        engine.num_blocks = Some(spec.kv_blocks as usize);
    }
    let tls = a.tls.load()?;
    let registry = match m.registry.backend {
        manifest::RegistryBackend::Embedded => RegistryBackend::Embedded {
            url: a
                .registry_url
                .clone()
                .context("--registry-url is required with the embedded registry")?,
        },
        manifest::RegistryBackend::Etcd => RegistryBackend::Etcd {
            endpoints: m.registry.endpoints.clone(),
            prefix: etcd_prefix(&m),
            roots: etcd_roots(&m, &a.file, tls.roots.as_ref())?,
        },
    };
    let key = match &a.cluster_token_file {
        Some(f) => Some(xpyd_runtime::plane::ClusterKey::load(f)?),
        None => {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                "worker: no --cluster-token-file: the internal plane is open (any caller may use this worker)",
            );
            None
        }
    };
    let membership = Membership {
        registry: Some(registry),
        ttl: Duration::from_millis(m.registry.lease_ttl_ms as u64),
        renew: Duration::from_millis(m.registry.renew_interval_ms as u64),
        key,
        tls,
    };
    let grpc_scheme = xpyd_runtime::tls::scheme(membership.tls.internal.is_some());
    let worker_id = format!("{}-{}", role.name(), a.index);
    let host = a.host.clone().unwrap_or_else(|| m.coordinator.host.clone());
    runtime()?.block_on(async {
        let shutdown = on_signal();
        watch_parent(
            a.supervisor_pid,
            &shutdown,
            spec.graceful_shutdown.timeout(),
        );
        let grpc = bind(&host, 0).await?;
        let http = bind(&host, 0).await?;
        // The supervisor reads this line to probe the worker's HTTP port.
        let urls = serde_json::json!({
            "http": format!("{grpc_scheme}://{}", http.local_addr()?),
            "grpc": format!("{grpc_scheme}://{}", grpc.local_addr()?),
        });
        println!("{urls}");
        let kv = bind(&host, 0).await?;
        let cfg = xpyd_worker::Config {
            worker_id,
            engine,
            role: role_settings(spec, role),
            flip: flip_settings(&m, role),
            kv_backend: m
                .kv
                .backend
                .name()
                .parse()
                .map_err(|e: String| anyhow::anyhow!("kv.backend: {e}"))?,
            membership,
            advertise_host: host,
            drain_timeout: drain_timeout(spec.graceful_shutdown.timeout()),
        };
        let l = xpyd_worker::Listeners { grpc, http, kv };
        xpyd_worker::run(cfg, l, shutdown).await?;
        Ok(())
    })
}

/// True when `path` names a manifest that loads and validates (for `up`'s early check).
pub fn check(path: &Path) -> Result<Manifest> {
    Ok(Manifest::load(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_latency_comes_from_a_profiles_section() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("profile.json");
        std::fs::write(
            &p,
            r#"{"version":1,"mock_latency":{"prefill_base_us":12,"prefill_per_token_us":3,"decode_base_us":4000,"decode_per_seq_us":70}}"#,
        )
        .unwrap();
        let l = mock_latency_of_profile(&p, 256).unwrap();
        assert_eq!((l.prefill_base_us, l.prefill_per_token_us), (12, 3));
        assert_eq!((l.decode_base_us, l.decode_per_seq_us), (4000, 70));
        std::fs::write(&p, r#"{"version":1}"#).unwrap();
        let e = format!("{:#}", mock_latency_of_profile(&p, 256).unwrap_err());
        assert!(e.contains("mock_latency"), "{e}");
        std::fs::write(&p, r#"{"mock_latency":{"decode_base_us":99999999999}}"#).unwrap();
        assert!(mock_latency_of_profile(&p, 256).is_err());
        assert!(mock_latency_of_profile(&dir.path().join("missing.json"), 256).is_err());
    }

    #[test]
    fn a_profile_with_fits_gives_the_simulators_own_latency() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("profile.json");
        let fit = |kind: &str, c: &[f64]| serde_json::json!({"model": {"kind": kind, "coeffs": c}, "fit_error": {"mean_abs_rel": 0.02}});
        let profile = serde_json::json!({
            "version": xpyd_planner::profile::PROFILE_VERSION, "kind": "xpyd-performance-profile",
            "model": {"kv_bytes_per_token": 23040, "layers": 30},
            "prefill": {"fit_by_chunk": {"256": fit("polynomial", &[0.004, 0.0004, 2e-8])}},
            "decode_step": {"fit": fit("bilinear", &[0.012, 0.001, 1e-6, 2e-7])},
            "kv_transfer": null,
            "mock_latency": {"decode_base_us": 1},
        });
        std::fs::write(&p, profile.to_string()).unwrap();
        let l = mock_latency_of_profile(&p, 256).unwrap();
        assert_eq!(l.prefill_fit, Some([0.004, 0.0004, 2e-8]));
        assert_eq!(l.decode_fit, Some([0.012, 0.001, 1e-6, 2e-7]));
    }
}
