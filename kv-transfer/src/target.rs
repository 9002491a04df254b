//! What a receiver hands out and a sender opens: the serializable transfer target.

use serde::{Deserialize, Serialize};
use std::ops::Range;
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

/// Where a receiver's KV rows live in its shared-memory KV pool, so that a same-host
/// sender writes each chunk straight into the blocks (a *placed* transfer) and the
/// receiver only verifies them. Chunks of a placed transfer are tagged
/// `start << 32 | count` and carry rows `start..start+count` of one layer, all K rows
/// then all V rows; row `p` of a layer's K (V) pool lives at
/// `pools[layer][0 (1)] + (blocks[p / block_size] * block_size + p % block_size) * row_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Path of the KV pool segment (under /dev/shm).
    pub path: String,
    /// The segment's size in bytes.
    pub len: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Bytes of one K or V row.
    pub row_bytes: u64,
    /// Byte offsets of each layer's K and V pools in the segment.
    pub pools: Vec<[u64; 2]>,
    /// The sequence's block table.
    pub blocks: Vec<u32>,
}

impl Placement {
    /// The byte ranges of the segment a chunk of `len` bytes tagged `tag` of `layer`
    /// goes to, in payload order, adjacent ranges merged. Errors name what does not fit.
    pub fn runs(&self, layer: u32, tag: u64, len: usize) -> crate::Result<Vec<Range<usize>>> {
        let bad = |what: String| crate::TransferError::Protocol(format!("placed chunk: {what}"));
        let (start, count) = ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize);
        let (bs, row) = (self.block_size as usize, self.row_bytes as usize);
        let pools = self
            .pools
            .get(layer as usize)
            .ok_or_else(|| bad(format!("layer {layer} of {}", self.pools.len())))?;
        if bs == 0 || start + count > self.blocks.len() * bs {
            return Err(bad(format!(
                "rows {start}+{count} beyond {} blocks of {bs}",
                self.blocks.len()
            )));
        }
        if Some(len) != count.checked_mul(2 * row) {
            return Err(bad(format!(
                "{len} bytes for {count} K and V rows of {row}"
            )));
        }
        let mut out: Vec<Range<usize>> = Vec::with_capacity(2 * (count / bs.max(1) + 2));
        for pool in pools {
            let mut pos = start;
            while pos < start + count {
                let rows = (bs - pos % bs).min(start + count - pos);
                let at = *pool as usize + (self.blocks[pos / bs] as usize * bs + pos % bs) * row;
                let end = at + rows * row;
                if end as u64 > self.len {
                    return Err(bad(format!("ends at {end}, segment has {}", self.len)));
                }
                match out.last_mut() {
                    Some(last) if last.end == at => last.end = end,
                    _ => out.push(at..end),
                }
                pos += rows;
            }
        }
        Ok(out)
    }
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
    /// Where the rows go in the receiver's KV pool, when it offers placed transfers
    /// (same-host shm only; takes the place of `shm`).
    #[serde(default)]
    pub placement: Option<Placement>,
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
