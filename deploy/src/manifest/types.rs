//! The manifest's subsystem sections and enums, with their serde defaults.

use super::Role;
use super::reliability::{GracefulShutdown, ProbesSpec, RebuildScope};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Coordinator listeners, admission queue and request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSpec {
    /// Bind host for all listeners (default `127.0.0.1`).
    pub host: String,
    /// OpenAI-compatible HTTP/SSE/WebSocket port; 0 = ephemeral (default 0).
    pub http_port: u16,
    /// Public gRPC port (`xpyd.v1.Inference`); 0 = ephemeral (default 0).
    pub grpc_port: u16,
    /// The internal plane's gRPC port, where workers register (the cluster's credential
    /// is required); 0 = ephemeral (default 0).
    pub internal_port: u16,
    /// Requests waiting for a free worker, across SLO classes, `0..=100000` (default 256).
    pub max_queue: u32,
    /// How long a request waits for a free worker before a 429, `1..=600000` ms (default 10000).
    pub queue_timeout_ms: u32,
    /// Time to first token (reset by every streamed chunk), `1..=1200` s (default 120).
    pub first_token_timeout_s: u32,
    /// Hard end-to-end cap, `1..=3600` s (default 3600).
    pub request_timeout_s: u32,
    /// Largest request body, 1 MiB..=50 MiB (default 10 MiB).
    pub max_request_bytes: u64,
    /// Re-sends of one request after a worker failed it (in-flight migration), `0..=16`
    /// (default 3); beyond them the client gets a clear error.
    pub max_migrations: u32,
    /// A client that reads nothing of its stream for this long is cut off and its KV
    /// freed, `1..=3600` s (default 30).
    pub client_stall_timeout_s: u32,
    /// How `xpyd up` stops the coordinator (after which it stops the workers).
    pub graceful_shutdown: GracefulShutdown,
    /// Requests per second on the inference APIs; none by default.
    pub rate_limit: Option<RateLimitSpec>,
    /// Who may call the public APIs; everyone by default.
    pub access: AccessSpec,
    /// `none` (default) or `api_key`: every call but `/health` needs a key from the
    /// store `xpyd keys` manages (inference: a key scoped to this service; operations:
    /// an admin key).
    pub auth: AuthMode,
}

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No authentication.
    #[default]
    None,
    /// API keys (`Authorization: Bearer <key>`, gRPC metadata `authorization`).
    ApiKey,
}

/// A request-rate limit: excess requests get 429 with Retry-After.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests per second, `1..=10000`.
    pub rps: u32,
    /// `service` (default): `rps` in all; `instance`: `rps` per ready serving worker
    /// (decode or combined).
    #[serde(default)]
    pub scope: RateScope,
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// One total for the service.
    #[default]
    Service,
    /// Per ready serving instance.
    Instance,
}

/// An access list: CIDR networks (or bare addresses), at most 10, either allowed
/// (everyone else gets 403) or denied — not both.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSpec {
    /// Only these may call.
    pub allow: Vec<String>,
    /// These may not call.
    pub deny: Vec<String>,
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        CoordinatorSpec {
            host: "127.0.0.1".into(),
            http_port: 0,
            grpc_port: 0,
            internal_port: 0,
            max_queue: 256,
            queue_timeout_ms: 10_000,
            first_token_timeout_s: 120,
            request_timeout_s: 3600,
            max_request_bytes: 10 * 1024 * 1024,
            max_migrations: 3,
            client_stall_timeout_s: 30,
            graceful_shutdown: GracefulShutdown::default(),
            rate_limit: None,
            access: AccessSpec::default(),
            auth: AuthMode::None,
        }
    }
}

/// Where membership (worker registrations and leases) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryBackend {
    /// In-process registry in the coordinator: single binary, no external store.
    #[default]
    Embedded,
    /// etcd with leases and watches: multi-host and coordinator HA.
    Etcd,
}

/// Membership store and worker leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySpec {
    /// `embedded` (default) or `etcd`.
    pub backend: RegistryBackend,
    /// etcd endpoints, each `http://host:port` (or `https://`); required non-empty
    /// for `etcd`, must be empty for `embedded`.
    pub endpoints: Vec<String>,
    /// Key prefix in etcd, starting and ending with `/` (default `/xpyd/`).
    pub prefix: String,
    /// Worker lease time-to-live, `500..=60000` ms (default 2000); with etcd a whole
    /// number of seconds, since etcd leases are granted in seconds.
    pub lease_ttl_ms: u32,
    /// How often a worker renews its lease, `100..=lease_ttl_ms/2` ms (default 500).
    pub renew_interval_ms: u32,
    /// The CA (PEM, relative to the manifest's directory) the certificates of `https://`
    /// endpoints chain to; default: the cluster's CA (`tls.internal: true`).
    pub ca: Option<String>,
}

impl Default for RegistrySpec {
    fn default() -> Self {
        RegistrySpec {
            backend: RegistryBackend::Embedded,
            endpoints: Vec::new(),
            prefix: "/xpyd/".into(),
            lease_ttl_ms: 2000,
            renew_interval_ms: 500,
            ca: None,
        }
    }
}

/// How a worker is chosen among the ready, healthy workers of a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Each worker in turn.
    RoundRobin,
    /// Hash of the client IP, so a client sticks to one worker.
    SourceIpHash,
    /// Fewest requests in flight.
    LeastConnections,
    /// Lowest moving-average time to first token.
    MinTtft,
    /// Weighted mix of connections, TTFT, queue and KV use.
    OverallLoad,
    /// By SLO class 0–3 (0 highest); lower classes are queued and shed first.
    SloPriority,
    /// Most prompt blocks already in the worker's prefix cache.
    PrefixAware,
}

impl RoutingPolicy {
    /// The YAML spelling, e.g. `least_connections`.
    pub fn name(self) -> &'static str {
        match self {
            RoutingPolicy::RoundRobin => "round_robin",
            RoutingPolicy::SourceIpHash => "source_ip_hash",
            RoutingPolicy::LeastConnections => "least_connections",
            RoutingPolicy::MinTtft => "min_ttft",
            RoutingPolicy::OverallLoad => "overall_load",
            RoutingPolicy::SloPriority => "slo_priority",
            RoutingPolicy::PrefixAware => "prefix_aware",
        }
    }
}

impl fmt::Display for RoutingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Routing policies for the two legs of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSpec {
    /// Policy picking the prefill worker (default `round_robin`).
    pub prefill: RoutingPolicy,
    /// Policy picking the decode worker (default `least_connections`); in mode
    /// `single` it picks the combined worker.
    pub decode: RoutingPolicy,
    /// Tokens per block hashed by `prefix_aware`, `1..=1024` (default 16).
    pub block_size: u32,
}

impl Default for RoutingSpec {
    fn default() -> Self {
        RoutingSpec {
            prefill: RoutingPolicy::RoundRobin,
            decode: RoutingPolicy::LeastConnections,
            block_size: 16,
        }
    }
}

impl RoutingSpec {
    /// The policy choosing workers of `role` (combined workers use `decode`).
    #[cfg(test)]
    pub fn policy_for(&self, role: Role) -> RoutingPolicy {
        match role {
            Role::Prefill => self.prefill,
            Role::Decode | Role::Combined => self.decode,
        }
    }
}

/// Transport carrying KV from prefill to decode workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvBackend {
    /// Shared memory when both ends share a host, TCP otherwise.
    #[default]
    Auto,
    /// TCP streams.
    Tcp,
    /// Shared memory (same host only).
    Shm,
    /// UCX (RDMA where present; needs the `ucx` build feature).
    Ucx,
    /// NCCL (GPU hosts; needs the `nccl` build feature).
    Nccl,
}

impl KvBackend {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            KvBackend::Auto => "auto",
            KvBackend::Tcp => "tcp",
            KvBackend::Shm => "shm",
            KvBackend::Ucx => "ucx",
            KvBackend::Nccl => "nccl",
        }
    }
}

/// KV transfer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvSpec {
    /// `auto` (default), `tcp`, `shm`, `ucx` or `nccl`.
    pub backend: KvBackend,
    /// Deadline for one sequence's transfer, `100..=600000` ms (default 30000).
    pub transfer_deadline_ms: u32,
}

impl Default for KvSpec {
    fn default() -> Self {
        KvSpec {
            backend: KvBackend::Auto,
            transfer_deadline_ms: 30_000,
        }
    }
}

/// The worker roles. Mode `disaggregated` needs `prefill` and `decode` and forbids
/// `combined`; mode `single` needs `combined` and forbids the other two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesSpec {
    /// Prefill workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoleSpec>,
    /// Decode workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<RoleSpec>,
    /// Workers doing both phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combined: Option<RoleSpec>,
}

impl RolesSpec {
    /// The spec of `role`, if present.
    pub fn get(&self, role: Role) -> Option<&RoleSpec> {
        match role {
            Role::Prefill => self.prefill.as_ref(),
            Role::Decode => self.decode.as_ref(),
            Role::Combined => self.combined.as_ref(),
        }
    }
}

/// Numeric type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    /// 32-bit floats (default; exact).
    #[default]
    F32,
    /// 16-bit floats (half the memory and transfer bytes).
    F16,
}

/// How the replicas of a role share its `cpus` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinScope {
    /// Every replica may run on every listed core (default).
    #[default]
    Role,
    /// Each replica gets `threads` cores of its own from the list.
    Replica,
}

impl RoleSpec {
    /// The cores replica `index` is pinned to, if the role is pinned.
    ///
    /// # Errors
    /// When `cpus` is not a CPU list (validated manifests never fail here).
    pub fn cpus_of(&self, index: u32) -> xpyd_engine::Result<Option<Vec<usize>>> {
        let Some(list) = self.cpus.as_deref() else {
            return Ok(None);
        };
        let all = xpyd_engine::compute::parse_cpu_list(list)?;
        Ok(Some(match self.pin {
            PinScope::Role => all,
            PinScope::Replica => {
                let t = self.threads as usize;
                (0..t)
                    .map(|k| all[(index as usize * t + k) % all.len()])
                    .collect()
            }
        }))
    }
}

/// What executes the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// The real candle engine (default).
    #[default]
    Real,
    /// Deterministic tokens without a model, for scale tests.
    Mock,
}

impl EngineKind {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Real => "real",
            EngineKind::Mock => "mock",
        }
    }
}

/// One role's workers; every replica gets the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Worker processes, `1..=64`. Required.
    pub replicas: u32,
    /// Compute threads per worker, `1..=256` (default 1).
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// Cores to pin each worker's compute threads to, e.g. `"0"`, `"0-1"`, `"0,2"`;
    /// absent = no pinning. A bare number is accepted too.
    #[serde(
        default,
        deserialize_with = "de_cpus",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpus: Option<String>,
    /// How replicas share `cpus`: `role` (default; every replica may use the whole
    /// list) or `replica` (replica `i` gets its own `threads` cores, the list's entries
    /// `i*threads ..`, wrapping around).
    #[serde(default)]
    pub pin: PinScope,
    /// Requests a worker runs at once, `1..=1024`; absent = the role's default
    /// (see [`RoleSpec::max_running_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    /// KV pool blocks, 0 = sized automatically (default), else `16..=10000000`.
    #[serde(default)]
    pub kv_blocks: u32,
    /// Prompt tokens per prefill chunk, `16..=8192` (default 256).
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: u32,
    /// `f32` (default) or `f16`.
    #[serde(default)]
    pub kv_dtype: KvDtype,
    /// KV blocks kept for the prefix cache on prefill/combined workers, 0 = off,
    /// `0..=10000000` (default 1024).
    #[serde(default = "default_prefix_cache_blocks")]
    pub prefix_cache_blocks: u32,
    /// `real` (default) or `mock`.
    #[serde(default)]
    pub engine: EngineKind,
    /// Simulated compute time of the mock engine, each field `0..=10000000` µs
    /// (default all 0 = none): `prefill_base_us`, `prefill_per_token_us`,
    /// `decode_base_us`, `decode_per_seq_us`. Only with `engine: mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock_latency: Option<xpyd_engine::MockLatency>,
    /// Take the mock engine's latency from a profile written by `xpyd bench profile`
    /// (its `mock_latency` section); a relative path is relative to the manifest.
    /// Only with `engine: mock`, and not together with `mock_latency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock_profile: Option<std::path::PathBuf>,
    /// Health probes run by `xpyd up`: `startup`, `readiness`, `liveness`.
    #[serde(default)]
    pub probes: ProbesSpec,
    /// What a failed worker's rebuild restarts: `process` (default), `unit_replica`,
    /// `unit` or `deployment_replica`.
    #[serde(default)]
    pub rebuild_scope: RebuildScope,
    /// How a worker of this role is stopped.
    #[serde(default)]
    pub graceful_shutdown: GracefulShutdown,
}

fn default_threads() -> u32 {
    1
}
fn default_prefill_chunk() -> u32 {
    256
}
fn default_prefix_cache_blocks() -> u32 {
    1024
}

impl RoleSpec {
    /// A spec with `replicas` workers and every other field at its default.
    #[cfg(test)]
    pub fn with_replicas(replicas: u32) -> Self {
        RoleSpec {
            replicas,
            threads: default_threads(),
            cpus: None,
            pin: PinScope::Role,
            max_running: None,
            kv_blocks: 0,
            prefill_chunk: default_prefill_chunk(),
            kv_dtype: KvDtype::F32,
            prefix_cache_blocks: default_prefix_cache_blocks(),
            engine: EngineKind::Real,
            mock_latency: None,
            mock_profile: None,
            probes: ProbesSpec::default(),
            rebuild_scope: RebuildScope::Process,
            graceful_shutdown: GracefulShutdown::default(),
        }
    }

    /// Concurrent requests for a worker of `role`: `max_running` if given, else 4
    /// for prefill (compute-bound) and 16 for decode and combined (batching).
    pub fn max_running_for(&self, role: Role) -> u32 {
        self.max_running.unwrap_or(match role {
            Role::Prefill => 4,
            Role::Decode | Role::Combined => 16,
        })
    }
}

/// Accepts `cpus: "0-1"` and also the unquoted `cpus: 0`.
fn de_cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a CPU list like \"0\", \"0-1\" or \"0,2\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}
