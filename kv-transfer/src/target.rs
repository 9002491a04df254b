//! What a receiver hands out and a sender opens: the serializable transfer target.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Shared memory when both ends are on one host, else UCX if built, else TCP.
    #[default]
    Auto,
    /// TCP with per-chunk checksums.
    Tcp,
    /// Same-host shared memory (a /dev/shm segment) plus a TCP control channel.
    Shm,
    /// UCX (RDMA where the NIC supports it; tcp/shm transports otherwise).
    Ucx,
    /// NCCL between GPUs.
    Nccl,
}

impl Backend {
    /// Lower-case name, used as the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Tcp => "tcp",
            Backend::Shm => "shm",
            Backend::Ucx => "ucx",
            Backend::Nccl => "nccl",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "tcp" => Ok(Backend::Tcp),
            "shm" => Ok(Backend::Shm),
            "ucx" => Ok(Backend::Ucx),
            "nccl" => Ok(Backend::Nccl),
            o => Err(format!(
                "unknown KV backend `{o}` (auto, tcp, shm, ucx, nccl)"
            )),
        }
    }
}

/// A region of a shared-memory segment offered by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmDesc {
    /// Path of the segment (under /dev/shm).
    pub path: String,
    /// The segment's size in bytes.
    pub len: u64,
    /// Start of this transfer's region.
    pub offset: u64,
    /// Length of the region.
    pub size: u64,
}

/// What a sender needs to write one transfer into a receiver's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferTarget {
    /// Backends the receiver accepts for this transfer (`Auto` resolved by the sender).
    pub backend: Backend,
    /// Receiver's control/data address (`host:port`).
    pub addr: String,
    /// Receiver's host identity, to detect same-host peers.
    pub host_id: String,
    /// The reservation.
    pub transfer_id: u64,
    /// Fencing token: a reservation released and reused gets a new epoch.
    pub epoch: u64,
    /// Shared-memory segment, when offered.
    pub shm: Option<ShmDesc>,
    /// The receiver's UCX worker address (hex), when UCX is offered.
    #[serde(default)]
    pub ucx_addr: Option<String>,
    /// NCCL unique id (hex), when NCCL is offered.
    #[serde(default)]
    pub nccl_id: Option<String>,
    /// Deadline, milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
}

impl TransferTarget {
    /// Time left until the deadline (zero when past).
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_millis(self.deadline_unix_ms).saturating_sub(now)
    }
}

/// Milliseconds since the Unix epoch, `after` from now.
pub fn deadline_ms(after: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + after).as_millis() as u64
}

/// An identity of this host: `/etc/machine-id` plus the boot id, or the hostname.
pub fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    match (
        read("/etc/machine-id"),
        read("/proc/sys/kernel/random/boot_id"),
    ) {
        (Some(m), Some(b)) if !m.is_empty() => format!("{m}-{b}"),
        _ => read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown-host".into()),
    }
}
