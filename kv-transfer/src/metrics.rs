//! Metric names of the crate (`xpyd_kv_*`) and the one place that records them.

use crate::target::Backend;

/// Bytes moved, by backend, peer and direction.
pub const BYTES: &str = "xpyd_kv_transfer_bytes_total";
/// Seconds per transfer (open to commit), by backend and direction.
pub const SECONDS: &str = "xpyd_kv_transfer_seconds";
/// Completed transfers, by backend and direction.
pub const TRANSFERS: &str = "xpyd_kv_transfers_total";
/// Failed transfers, by reason and side.
pub const FAILURES: &str = "xpyd_kv_transfer_failures_total";
/// Connections the receiver closed before any transfer, by reason (`peer_cap`,
/// `idle`, `protocol`).
pub const REFUSED: &str = "xpyd_kv_connections_refused_total";

/// Records one completed transfer.
pub fn record_transfer(
    backend: Backend,
    peer: &str,
    direction: &'static str,
    bytes: u64,
    seconds: f64,
) {
    let labels = [
        ("backend", backend.name().to_string()),
        ("peer", peer.to_string()),
        ("direction", direction.to_string()),
    ];
    metrics::counter!(BYTES, &labels).increment(bytes);
    metrics::counter!(TRANSFERS, "backend" => backend.name(), "direction" => direction)
        .increment(1);
    metrics::histogram!(SECONDS, "backend" => backend.name(), "direction" => direction)
        .record(seconds);
}
