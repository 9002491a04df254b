//! The worker side of membership: register, renew a lease with the current load, and
//! flip readiness off the moment the lease is lost (a worker without a lease takes no
//! work) until it registers again. Two backends with the same semantics: the embedded
//! registry in the coordinator (gRPC `xpyd.v1.Registry`) and etcd (lease + key under a
//! prefix that the coordinator watches).

use crate::plane::{Badge, ClusterKey};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xpyd_proto::registry_client::RegistryClient;
use xpyd_proto::{DeregisterRequest, HeartbeatRequest, Load, RegisterRequest, WorkerInfo};

/// Where workers register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum RegistryBackend {
    /// The coordinator's embedded registry at this gRPC URL.
    Embedded {
        /// e.g. `http://127.0.0.1:7000`.
        url: String,
    },
    /// etcd: keys `{prefix}workers/{worker_id}` bound to the worker's lease.
    Etcd {
        /// Client URLs, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// Key prefix, e.g. `/xpyd/demo/`.
        prefix: String,
        /// The roots `https://` endpoints' certificates chain to.
        #[serde(skip)]
        roots: Option<crate::tls::Roots>,
    },
}

/// A worker's entry as stored in etcd (JSON): who it is and its last reported load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique worker id.
    pub worker_id: String,
    /// prefill, decode or combined.
    pub role: String,
    /// gRPC endpoint.
    pub grpc_url: String,
    /// HTTP endpoint (/health, /metrics).
    pub http_url: String,
    /// The model the worker runs.
    pub model_fingerprint: String,
    /// Requests the worker admits at once.
    #[serde(default)]
    pub max_running: u32,
    /// Requests waiting.
    pub queued: u32,
    /// Requests running.
    pub running: u32,
    /// KV blocks in use.
    pub kv_blocks_used: u32,
    /// KV blocks free.
    pub kv_blocks_free: u32,
    /// Recent TTFT (ms).
    pub ttft_ms: f64,
    /// Recent TPOT (ms).
    pub tpot_ms: f64,
    /// Shutting down (see [`Load::draining`]).
    #[serde(default)]
    pub draining: bool,
    /// The cluster's signature of the rest (hex; empty on an open plane).
    #[serde(default)]
    pub mac: String,
}

impl WorkerRecord {
    /// Record from the proto identity and load.
    pub fn new(info: &WorkerInfo, load: &Load) -> Self {
        WorkerRecord {
            worker_id: info.worker_id.clone(),
            role: info.role.clone(),
            grpc_url: info.grpc_url.clone(),
            http_url: info.http_url.clone(),
            model_fingerprint: info.model_fingerprint.clone(),
            max_running: info.max_running,
            queued: load.queued,
            running: load.running,
            kv_blocks_used: load.kv_blocks_used,
            kv_blocks_free: load.kv_blocks_free,
            ttft_ms: load.ttft_ms,
            tpot_ms: load.tpot_ms,
            draining: load.draining,
            mac: String::new(),
        }
    }

    /// What the signature covers: the record without it.
    fn signed_bytes(&self) -> Vec<u8> {
        let bare = WorkerRecord {
            mac: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&bare).unwrap_or_default()
    }

    /// Signs the record with the cluster's key.
    pub fn sign(mut self, key: Option<&ClusterKey>) -> Self {
        if let Some(k) = key {
            self.mac = k.sign_hex(crate::plane::RECORD, &self.signed_bytes());
        }
        self
    }

    /// Whether a member of the cluster wrote the record (always, on an open plane).
    pub fn verified(&self, key: Option<&ClusterKey>) -> bool {
        key.is_none_or(|k| {
            crate::plane::unhex(&self.mac)
                .is_some_and(|m| k.verify(crate::plane::RECORD, &self.signed_bytes(), &m))
        })
    }

    /// The identity part.
    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            worker_id: self.worker_id.clone(),
            role: self.role.clone(),
            grpc_url: self.grpc_url.clone(),
            http_url: self.http_url.clone(),
            model_fingerprint: self.model_fingerprint.clone(),
            max_running: self.max_running,
        }
    }

    /// The load part.
    pub fn load(&self) -> Load {
        Load {
            queued: self.queued,
            running: self.running,
            kv_blocks_used: self.kv_blocks_used,
            kv_blocks_free: self.kv_blocks_free,
            ttft_ms: self.ttft_ms,
            tpot_ms: self.tpot_ms,
            draining: self.draining,
        }
    }
}

/// The etcd key of a worker.
pub fn etcd_key(prefix: &str, worker_id: &str) -> String {
    format!("{prefix}workers/{worker_id}")
}

/// How a worker keeps its lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Where to register.
    pub backend: RegistryBackend,
    /// Who this worker is. A change (a role flip) gives up the lease and registers the
    /// new identity.
    pub info: watch::Receiver<WorkerInfo>,
    /// Lease time-to-live.
    pub ttl: Duration,
    /// Renewal interval (well under the TTL).
    pub renew: Duration,
    /// The cluster's credential.
    pub key: Option<ClusterKey>,
    /// The roots the registry's certificate chains to (an `https://` registry URL).
    pub roots: Option<crate::tls::Roots>,
}

/// Keeps the lease until `shutdown`, then deregisters. `ready` is true exactly while the
/// worker holds a lease; `load` is sampled at every renewal; a new identity in `cfg.info`
/// is registered in place of the old one (readiness goes false in between).
pub async fn keep_lease(
    cfg: LeaseConfig,
    load: impl Fn() -> Load + Send + Sync,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    match &cfg.backend {
        RegistryBackend::Embedded { url } => {
            embedded(&cfg, url.clone(), &load, &ready, &shutdown).await
        }
        RegistryBackend::Etcd {
            endpoints,
            prefix,
            roots,
        } => {
            let opts = crate::tls::etcd_options(roots.as_ref());
            etcd(&cfg, endpoints, prefix, opts, &load, &ready, &shutdown).await
        }
    }
    let _ = ready.send(false);
}

/// Sleeps `d` unless shutdown comes first; false on shutdown.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Why a held lease is given up.
enum GiveUp {
    /// The worker stops.
    Shutdown,
    /// The worker has a new identity to register.
    NewIdentity,
}

/// Sleeps until the next renewal; `Err` when the lease is to be given up first.
async fn renewal(
    d: Duration,
    shutdown: &CancellationToken,
    info: &mut watch::Receiver<WorkerInfo>,
) -> Result<(), GiveUp> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = shutdown.cancelled() => Err(GiveUp::Shutdown),
        Ok(()) = info.changed() => Err(GiveUp::NewIdentity),
    }
}

async fn embedded(
    cfg: &LeaseConfig,
    url: String,
    load: &(impl Fn() -> Load + Send + Sync),
    ready: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) {
    let channel = match crate::tls::endpoint(&url, cfg.roots.as_ref()) {
        Ok(e) => e
            .connect_timeout(cfg.renew)
            .timeout(cfg.renew)
            .connect_lazy(),
        Err(e) => {
            tracing::error!(%url, error = %e, "bad registry URL");
            return;
        }
    };
    let mut client = RegistryClient::with_interceptor(channel, Badge::new(cfg.key.as_ref()));
    let mut info = cfg.info.clone();
    'register: while !shutdown.is_cancelled() {
        let req = RegisterRequest {
            worker: Some(info.borrow_and_update().clone()),
            ttl_ms: cfg.ttl.as_millis() as u32,
        };
        // Ready as the registration goes out: the registry may route to us as soon as it
        // records it, before its answer arrives here.
        let _ = ready.send(true);
        let lease = match client.register(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                let _ = ready.send(false);
                if matches!(
                    e.code(),
                    tonic::Code::Unauthenticated | tonic::Code::AlreadyExists
                ) {
                    tracing::warn!(error = %e.message(), "registration refused; trying again");
                } else {
                    tracing::debug!(error = %e, "registry not reachable yet");
                }
                if !pause(cfg.renew, shutdown).await {
                    return;
                }
                continue;
            }
        };
        let ttl = Duration::from_millis(lease.ttl_ms as u64);
        let renew = Duration::from_millis(lease.renew_interval_ms.max(50) as u64);
        tracing::info!(lease = lease.lease_id, ?ttl, "registered");
        let _ = ready.send(true);
        let mut renewed = Instant::now();
        loop {
            if let Err(why) = renewal(renew, shutdown, &mut info).await {
                let _ = ready.send(false);
                let _ = client
                    .deregister(DeregisterRequest {
                        lease_id: lease.lease_id,
                    })
                    .await;
                match why {
                    GiveUp::Shutdown => return,
                    GiveUp::NewIdentity => continue 'register,
                }
            }
            let hb = HeartbeatRequest {
                lease_id: lease.lease_id,
                load: Some(load()),
            };
            match client.heartbeat(hb).await {
                Ok(r) if r.get_ref().ok => renewed = Instant::now(),
                Ok(_) => {
                    tracing::warn!(lease = lease.lease_id, "lease lost; registering again");
                    let _ = ready.send(false);
                    continue 'register;
                }
                Err(e) if renewed.elapsed() >= ttl => {
                    // The registry has expired us by now: stop taking work.
                    tracing::warn!(error = %e, "lease expired without renewal");
                    let _ = ready.send(false);
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
        }
    }
}

async fn etcd(
    cfg: &LeaseConfig,
    endpoints: &[String],
    prefix: &str,
    base: etcd_client::ConnectOptions,
    load: &(impl Fn() -> Load + Send + Sync),
    ready: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) {
    use etcd_client::{Client, PutOptions};
    let ttl_s = cfg.ttl.as_secs().max(1) as i64;
    let mut info_rx = cfg.info.clone();
    while !shutdown.is_cancelled() {
        let info = info_rx.borrow_and_update().clone();
        let key = etcd_key(prefix, &info.worker_id);
        let opts = base
            .clone()
            .with_connect_timeout(cfg.renew.max(Duration::from_millis(200)))
            .with_timeout(cfg.renew.max(Duration::from_millis(200)));
        let attempt = async {
            let mut client = Client::connect(endpoints, Some(opts)).await?;
            let lease = client.lease_grant(ttl_s, None).await?.id();
            let record =
                serde_json::to_string(&WorkerRecord::new(&info, &load()).sign(cfg.key.as_ref()))
                    .unwrap_or_default();
            client
                .put(
                    key.clone(),
                    record,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            let (keeper, stream) = client.lease_keep_alive(lease).await?;
            Ok::<_, etcd_client::Error>((client, lease, keeper, stream))
        };
        let (mut client, lease, mut keeper, mut stream) = match attempt.await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "etcd not reachable yet");
                if !pause(cfg.renew, shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(lease, %key, "registered in etcd");
        let _ = ready.send(true);
        let mut renewed = Instant::now();
        loop {
            if let Err(why) = renewal(cfg.renew, shutdown, &mut info_rx).await {
                let _ = ready.send(false);
                let _ = client.lease_revoke(lease).await;
                match why {
                    GiveUp::Shutdown => return,
                    GiveUp::NewIdentity => break,
                }
            }
            let alive = async {
                keeper.keep_alive().await?;
                let ttl = match stream.message().await? {
                    Some(r) => r.ttl(),
                    None => 0,
                };
                if ttl > 0 {
                    let record = serde_json::to_string(
                        &WorkerRecord::new(&info, &load()).sign(cfg.key.as_ref()),
                    )
                    .unwrap_or_default();
                    client
                        .put(
                            key.clone(),
                            record,
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await?;
                }
                Ok::<_, etcd_client::Error>(ttl > 0)
            };
            match alive.await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!(lease, "etcd lease lost; registering again");
                    let _ = ready.send(false);
                    break;
                }
                Err(e) if renewed.elapsed() >= cfg.ttl => {
                    tracing::warn!(error = %e, "etcd lease expired without renewal");
                    let _ = ready.send(false);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "etcd keep-alive failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's record keeps its signature through etcd whatever its latency averages
    /// are: the coordinator re-serializes what it parsed, so every float must come back
    /// exactly (it did not for some EMA values, and those renewals were ignored as
    /// forged).
    #[test]
    fn a_signed_record_verifies_after_the_trip_through_etcd_for_any_latency() {
        let key = crate::plane::ClusterKey::from_token("0123456789abcdef0123");
        let info = WorkerInfo {
            worker_id: "prefill-0".into(),
            ..Default::default()
        };
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..20_000 {
            // xorshift: latencies of any magnitude and mantissa.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            let ttft = if v.is_finite() {
                v.abs() % 1e6
            } else {
                i as f64 / 7.0
            };
            let load = Load {
                ttft_ms: ttft,
                tpot_ms: ttft / 3.0,
                ..Default::default()
            };
            let wire =
                serde_json::to_string(&WorkerRecord::new(&info, &load).sign(Some(&key))).unwrap();
            let back: WorkerRecord = serde_json::from_str(&wire).unwrap();
            assert!(back.verified(Some(&key)), "ttft_ms {ttft:e}: {wire}");
        }
    }

    #[test]
    fn record_round_trips_identity_and_load() {
        let info = WorkerInfo {
            worker_id: "d0".into(),
            role: "decode".into(),
            grpc_url: "http://127.0.0.1:1".into(),
            http_url: "http://127.0.0.1:2".into(),
            model_fingerprint: "f".into(),
            max_running: 4,
        };
        let load = Load {
            queued: 1,
            running: 2,
            kv_blocks_used: 3,
            kv_blocks_free: 4,
            ttft_ms: 5.0,
            tpot_ms: 6.0,
            draining: true,
        };
        let r = WorkerRecord::new(&info, &load);
        let back: WorkerRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.info(), info);
        assert_eq!(back.load(), load);
        // Signed, a record survives the trip through etcd's JSON; any change, or another
        // cluster's key, and it is not this cluster's.
        let k = ClusterKey::from_token("0123456789abcdef0123");
        let signed = r.clone().sign(Some(&k));
        let back: WorkerRecord =
            serde_json::from_str(&serde_json::to_string(&signed).unwrap()).unwrap();
        assert!(back.verified(Some(&k)) && back.verified(None));
        assert!(!r.verified(Some(&k)), "unsigned");
        let forged = WorkerRecord {
            grpc_url: "http://10.0.0.9:1".into(),
            ..back.clone()
        };
        assert!(!forged.verified(Some(&k)));
        assert!(!back.verified(Some(&ClusterKey::from_token("another-token-000"))));
        assert_eq!(etcd_key("/xpyd/a/", "d0"), "/xpyd/a/workers/d0");
    }
}
