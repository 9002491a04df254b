//! What every gRPC listener serves besides its own services: `grpc.health.v1` and server
//! reflection for `xpyd.v1`, and serving on a bound listener until shutdown.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Router, TcpIncoming};

pub use tonic_health::server::HealthReporter;

/// Service names of the standard services every listener serves.
const STANDARD: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds health and reflection (both `grpc.reflection.v1` and the `v1alpha` that many
/// clients still speak) to a server and returns the router plus the health reporter (set
/// a service's status with `set_serving::<S>()` / `set_not_serving`). Reflection lists
/// `served` (the full names of the port's own services, e.g.
/// `<InferenceServer<_> as NamedService>::NAME`) and the standard services, nothing else.
///
/// # Errors
/// When a descriptor set cannot be decoded (a build defect).
pub fn with_standard_services(
    builder: &mut tonic::transport::Server,
    served: &[&str],
) -> Result<(Router, HealthReporter), tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let configure = || {
        served.iter().chain(&STANDARD).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(xpyd_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = configure().build_v1()?;
    let v1alpha = configure().build_v1alpha()?;
    Ok((
        builder
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha),
        reporter,
    ))
}

/// Serves `router` on `listener` until `shutdown` is cancelled (then stops accepting and
/// lets in-flight calls end). Accepted connections get `TCP_NODELAY`: without it a small
/// streamed message waits for the peer's delayed ACK (about 40 ms on Linux).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(
            incoming(listener),
            async move { shutdown.cancelled().await },
        )
        .await
}

/// The accepted connections of `listener`, each with `TCP_NODELAY` set.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
