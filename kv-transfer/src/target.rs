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
    /// goes to, in payload order, adjacent ranges merged. Every value comes from a peer:
    /// all arithmetic is checked, and errors name what does not fit.
    pub fn runs(&self, layer: u32, tag: u64, len: usize) -> crate::Result<Vec<Range<usize>>> {
        let bad = |what: String| crate::TransferError::Protocol(format!("placed chunk: {what}"));
        let overflow = || bad("sizes overflow".into());
        let (start, count) = (tag >> 32, tag & 0xffff_ffff);
        let (bs, row) = (u64::from(self.block_size), self.row_bytes);
        let pools = self
            .pools
            .get(layer as usize)
            .ok_or_else(|| bad(format!("layer {layer} of {}", self.pools.len())))?;
        if bs == 0 || row == 0 {
            return Err(bad(format!("block size {bs}, row bytes {row}")));
        }
        let rows = (self.blocks.len() as u64)
            .checked_mul(bs)
            .ok_or_else(overflow)?;
        let stop = start.checked_add(count).ok_or_else(overflow)?;
        if stop > rows {
            return Err(bad(format!(
                "rows {start}+{count} beyond {} blocks of {bs}",
                self.blocks.len()
            )));
        }
        if count.checked_mul(row).and_then(|b| b.checked_mul(2)) != Some(len as u64) {
            return Err(bad(format!(
                "{len} bytes for {count} K and V rows of {row}"
            )));
        }
        let mut out: Vec<Range<usize>> = Vec::with_capacity(2 * (count / bs + 2) as usize);
        for pool in pools {
            let mut pos = start;
            while pos < stop {
                let n = (bs - pos % bs).min(stop - pos);
                let block = u64::from(self.blocks[(pos / bs) as usize]);
                let at = block
                    .checked_mul(bs)
                    .and_then(|r| r.checked_add(pos % bs))
                    .and_then(|r| r.checked_mul(row))
                    .and_then(|b| b.checked_add(*pool))
                    .ok_or_else(overflow)?;
                let end = n
                    .checked_mul(row)
                    .and_then(|b| b.checked_add(at))
                    .ok_or_else(overflow)?;
                if end > self.len {
                    return Err(bad(format!("ends at {end}, segment has {}", self.len)));
                }
                let (at, end) = (
                    usize::try_from(at).map_err(|_| overflow())?,
                    usize::try_from(end).map_err(|_| overflow())?,
                );
                match out.last_mut() {
                    Some(last) if last.end == at => last.end = end,
                    _ => out.push(at..end),
                }
                pos += n;
            }
        }
        Ok(out)
    }
}

/// Whether `path` names a segment a receiver of this project made: directly under
/// [`crate::shm::SHM_DIR`] and named `xpyd-…`. Senders map and write only such files, so
/// a forged target cannot point them at an arbitrary file.
pub fn is_segment_path(path: &str) -> bool {
    let p = std::path::Path::new(path);
    p.parent() == Some(std::path::Path::new(crate::shm::SHM_DIR))
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("xpyd-") && !n.contains(".."))
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
    /// The reservation's secret (32 hex digits, random): a sender's `Open` must present
    /// it, so only a peer that was handed this target attaches to the reservation.
    #[serde(default)]
    pub ticket: String,
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
    /// The ticket an `Open` presents.
    ///
    /// # Errors
    /// [`crate::TransferError::Protocol`] when the target's is not 32 hex digits.
    pub fn ticket_bytes(&self) -> crate::Result<[u8; TICKET_BYTES]> {
        parse_ticket(&self.ticket)
    }

    /// Time left until the deadline (zero when past).
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_millis(self.deadline_unix_ms).saturating_sub(now)
    }
}

/// Bytes in a reservation's ticket.
pub const TICKET_BYTES: usize = 16;

/// A fresh random ticket.
///
/// # Errors
/// The OS has no randomness to give.
pub fn new_ticket() -> crate::Result<[u8; TICKET_BYTES]> {
    let mut t = [0u8; TICKET_BYTES];
    getrandom::fill(&mut t)
        .map_err(|e| crate::TransferError::Unavailable(format!("randomness: {e}")))?;
    Ok(t)
}

/// A ticket as the target carries it.
pub fn ticket_hex(t: &[u8; TICKET_BYTES]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ticket a target carries, or why it is not one.
///
/// # Errors
/// [`crate::TransferError::Protocol`] when it is not 32 hex digits.
pub fn parse_ticket(s: &str) -> crate::Result<[u8; TICKET_BYTES]> {
    let bad = || crate::TransferError::Protocol("target ticket is not 32 hex digits".into());
    if s.len() != 2 * TICKET_BYTES || !s.is_ascii() {
        return Err(bad());
    }
    let mut t = [0u8; TICKET_BYTES];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(t)
}

/// Equality that takes the same time wherever the first difference is.
pub fn same_ticket(a: &[u8; TICKET_BYTES], b: &[u8; TICKET_BYTES]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
