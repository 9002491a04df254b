//! Membership sources feeding the [`Cluster`]: the embedded registry (gRPC
//! `xpyd.v1.Registry`, leases swept every 100 ms) and an etcd watcher (workers' keys
//! under a prefix, bound to their etcd leases; a delete or expiry removes the worker).

use crate::cluster::Cluster;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use xpyd_proto as pb;
use xpyd_runtime::WorkerRecord;
use xpyd_runtime::plane::ClusterKey;

/// The embedded registry service.
pub struct EmbeddedRegistry {
    /// Where workers land.
    pub cluster: Cluster,
    /// Lease TTL granted.
    pub ttl: Duration,
    /// Renewal interval asked of workers.
    pub renew: Duration,
}

#[tonic::async_trait]
impl pb::registry_server::Registry for EmbeddedRegistry {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let Some(info) = r.worker else {
            return Err(Status::invalid_argument("worker: missing"));
        };
        if info.worker_id.is_empty() || info.grpc_url.is_empty() {
            return Err(Status::invalid_argument(
                "worker: worker_id and grpc_url are required",
            ));
        }
        if !matches!(info.role.as_str(), "prefill" | "decode" | "combined") {
            return Err(Status::invalid_argument(format!(
                "worker.role: `{}` is not one of prefill, decode, combined",
                info.role
            )));
        }
        let lease_id = self
            .cluster
            .register(info, self.ttl)
            .map_err(Status::already_exists)?;
        Ok(Response::new(pb::RegisterResponse {
            lease_id,
            ttl_ms: self.ttl.as_millis() as u32,
            renew_interval_ms: self.renew.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let ok = self
            .cluster
            .heartbeat(r.lease_id, r.load.unwrap_or_default(), self.ttl);
        Ok(Response::new(pb::HeartbeatResponse { ok }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.cluster.deregister(req.into_inner().lease_id);
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}

/// Expires lapsed leases until shutdown.
pub async fn sweep(cluster: Cluster, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => cluster.expire(),
        }
    }
}

/// Mirrors etcd's `{prefix}workers/` keys into the cluster until shutdown, reconnecting
/// as needed.
pub async fn watch_etcd(
    cluster: Cluster,
    endpoints: Vec<String>,
    prefix: String,
    opts: etcd_client::ConnectOptions,
    key: Option<ClusterKey>,
    shutdown: CancellationToken,
) {
    use etcd_client::{Client, EventType, GetOptions, WatchOptions};
    let key_prefix = format!("{prefix}workers/");
    // Only records a member of the cluster signed: anyone else who can write to etcd
    // cannot add a worker (and receive prompts) or forge one's load.
    let apply = |kv: &etcd_client::KeyValue| match serde_json::from_slice::<WorkerRecord>(
        kv.value(),
    ) {
        Ok(r) if r.verified(key.as_ref()) => {
            cluster.upsert(r.info(), r.load(), None);
        }
        Ok(r) => {
            tracing::warn!(key = ?kv.key_str(), worker_id = %r.worker_id, "worker record in etcd not signed by this cluster; ignored")
        }
        Err(e) => tracing::warn!(key = ?kv.key_str(), error = %e, "bad worker record in etcd"),
    };
    while !shutdown.is_cancelled() {
        let session = async {
            let mut client = Client::connect(&endpoints, Some(opts.clone())).await?;
            let snap = client
                .get(key_prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let rev = snap.header().map(|h| h.revision()).unwrap_or(0);
            let present: Vec<String> = snap
                .kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok())
                .filter_map(|k| k.strip_prefix(&key_prefix).map(String::from))
                .collect();
            for kv in snap.kvs() {
                apply(kv);
            }
            // Workers that vanished while we were not watching.
            for w in cluster.snapshot() {
                if !present.contains(&w.worker_id) {
                    cluster.remove(&w.worker_id);
                }
            }
            let mut stream = client
                .watch(
                    key_prefix.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            while let Some(resp) = stream.message().await? {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => apply(kv),
                        EventType::Delete => {
                            if let Some(id) =
                                kv.key_str().ok().and_then(|k| k.strip_prefix(&key_prefix))
                            {
                                cluster.remove(id);
                            }
                        }
                    }
                }
            }
            Ok::<_, etcd_client::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session => if let Err(e) = r {
                tracing::warn!(error = %e, "etcd watch failed; retrying");
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
