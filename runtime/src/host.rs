//! What every worker role shares once its engine is loaded: its identity and lease,
//! `/health` and `/metrics`, the gRPC server with health and reflection, and its
//! lifecycle — serve until a signal, drain, or stop on an engine failure — so the prefill
//! and decode roles differ only in their service and their engine loop.

use crate::lifecycle::{Ending, Lifecycle};
use crate::worker::{Membership, SharedStats, start_membership, worker_info};
use std::convert::Infallible;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::Request;
use tonic::server::NamedService;

/// Who the worker is and how it behaves as a cluster member.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Unique id in the cluster, e.g. `decode-1`.
    pub worker_id: String,
    /// `prefill`, `decode` or `combined`.
    pub role: &'static str,
    /// Host name other processes reach this worker at.
    pub advertise_host: String,
    /// The model fingerprint its KV carries.
    pub fingerprint: String,
    /// Requests it admits at once (its queue, for prefill).
    pub max_running: usize,
    /// Where it registers.
    pub membership: Membership,
    /// How long a drain waits for in-flight work before sending the rest elsewhere.
    pub drain_timeout: Duration,
}

/// The listeners every role serves on (a decode worker also has a KV listener).
pub struct Listeners {
    /// gRPC: the role's service, health, reflection.
    pub grpc: TcpListener,
    /// HTTP: `/health`, `/metrics`.
    pub http: TcpListener,
}

/// What the role plugs into the host.
pub struct Role<F, I, E> {
    /// Builds the role's gRPC service from the lease readiness.
    pub service: F,
    /// Requests in flight (a drain waits for 0).
    pub inflight: I,
    /// Sends every request left at the drain timeout elsewhere.
    pub evict: E,
}

/// Serves the role until `shutdown` (then drains) or until its engine fails; returns how
/// it ended once its lease is gone and its listeners are closed. `stopping` is cancelled
/// on the way out (the engine thread treats that as the normal end).
///
/// # Errors
/// A listener or the gRPC server failing.
pub async fn serve<S, F, I, E>(
    id: Identity,
    listeners: Listeners,
    stats: SharedStats,
    lifecycle: &Lifecycle,
    stopping: &CancellationToken,
    shutdown: &CancellationToken,
    role: Role<F, I, E>,
) -> Result<Ending, String>
where
    S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
    F: FnOnce(watch::Receiver<bool>) -> S,
    I: Fn() -> usize,
    E: FnOnce(),
{
    let info = worker_info(
        &id.worker_id,
        id.role,
        &id.advertise_host,
        &listeners.grpc,
        &listeners.http,
        &id.fingerprint,
        id.max_running,
    )
    .map_err(|e| e.to_string())?;
    let (grpc_url, http_url) = (info.grpc_url.clone(), info.http_url.clone());
    let ready = start_membership(
        &id.membership,
        info,
        stats,
        lifecycle.clone(),
        stopping.clone(),
    );
    let metrics = crate::metrics::install();
    let http = tokio::spawn(crate::http::serve(
        crate::http::worker_router(ready.clone(), lifecycle.clone(), metrics),
        listeners.http,
        stopping.clone(),
    ));
    // HTTP/2 keepalive from this side too: a coordinator that froze or was cut off stops
    // answering pings, its streams end, and their KV is freed.
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)));
    let (router, health) =
        crate::grpc::with_standard_services(&mut server, &[S::NAME]).map_err(|e| e.to_string())?;
    health.set_serving::<S>().await;
    let router = router.add_service((role.service)(ready));
    tracing::info!(worker_id = %id.worker_id, role = id.role, %grpc_url, %http_url, "worker serving");
    let grpc = tokio::spawn(crate::grpc::serve(router, listeners.grpc, stopping.clone()));
    let ending = crate::lifecycle::until_stopped(
        lifecycle,
        shutdown,
        id.drain_timeout,
        role.inflight,
        role.evict,
    )
    .await;
    health.set_not_serving::<S>().await;
    // The lease goes and the servers stop (the service, and with it the engine's command
    // channel, is dropped once its last call ends).
    stopping.cancel();
    let served = grpc.await.map_err(|e| e.to_string())?;
    let _ = http.await;
    served.map_err(|e| e.to_string())?;
    Ok(ending)
}
