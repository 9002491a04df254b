//! The small HTTP side of a worker: `/health` (200 while serving with a lease; 503
//! naming why not: starting or without a lease, draining, failed engine) and `/metrics`.

use crate::lifecycle::{Lifecycle, Phase};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct HealthState {
    ready: watch::Receiver<bool>,
    lifecycle: Lifecycle,
    metrics: PrometheusHandle,
}

/// `/health` and `/metrics` for a worker whose lease readiness is `ready`.
pub fn worker_router(
    ready: watch::Receiver<bool>,
    lifecycle: Lifecycle,
    metrics: PrometheusHandle,
) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render))
        .with_state(HealthState {
            ready,
            lifecycle,
            metrics,
        })
}

async fn health(State(s): State<HealthState>) -> (StatusCode, &'static str) {
    match s.lifecycle.phase() {
        Phase::Serving if *s.ready.borrow() => (StatusCode::OK, "ok\n"),
        Phase::Serving => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no registry lease\n",
        ),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
        // A flip is short and the process stays: live, though routed nothing meanwhile.
        Phase::Flipping => (StatusCode::OK, "ok: changing role\n"),
        Phase::Failed => (
            StatusCode::SERVICE_UNAVAILABLE,
            "failed: the engine stopped\n",
        ),
    }
}

async fn render(State(s): State<HealthState>) -> String {
    crate::metrics::sample_process();
    s.metrics.render()
}

/// Serves `router` on `listener` until `shutdown`, with `TCP_NODELAY` on every accepted
/// connection (SSE events are small writes that must not wait for a delayed ACK), over
/// TLS when `tls` is given (HTTP/2 and HTTP/1.1 offered; handshakes off the accept loop).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    if let Some(tls) = tls {
        // (`tap_io` only to reach axum's connect-info impl for tapped listeners.)
        return axum::serve(
            crate::tls::TlsListener::new(listener, tls)?.tap_io(|_| {}),
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    }
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
        }
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}
