//! Out-of-band data paths (NCCL, UCX): the control connection carries one notice per
//! chunk (layer, tag, length, checksum) and the bytes move over the backend.

use crate::error::{Result, TransferError};
use crate::target::Backend;
use std::sync::Arc;
use std::time::Instant;

/// Tag of the `index`-th frame of the transfer with `epoch` (epochs are unique per
/// receiver, so tags never collide on its worker).
pub fn ucx_tag(epoch: u64, index: u64) -> u64 {
    (epoch << 24) | (index & 0xFF_FFFF)
}

/// The process's UCX worker, started on first use and shared by senders and receivers.
#[cfg(feature = "ucx")]
pub fn ucx_worker() -> Result<Arc<crate::ucx::Worker>> {
    static WORKER: std::sync::Mutex<Option<Arc<crate::ucx::Worker>>> = std::sync::Mutex::new(None);
    let mut w = WORKER.lock().expect("ucx worker lock");
    if let Some(w) = w.as_ref() {
        return Ok(w.clone());
    }
    let worker = Arc::new(crate::ucx::Worker::start()?);
    *w = Some(worker.clone());
    Ok(worker)
}

/// This process's UCX worker address, hex-encoded for a transfer target.
pub fn ucx_address() -> Result<String> {
    #[cfg(feature = "ucx")]
    {
        Ok(ucx_worker()?
            .address()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
    #[cfg(not(feature = "ucx"))]
    {
        Err(TransferError::Unavailable(
            "ucx is not built into this binary (cargo feature `ucx`)".into(),
        ))
    }
}

/// Hex-encodes bytes (addresses and ids travel in the JSON target).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a hex string; anything else is a protocol error, never a panic.
pub fn unhex(s: &str) -> Result<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| TransferError::Protocol("address or id is not hex".into()))
}

/// The sending end of an out-of-band path.
#[derive(Clone)]
pub enum SendLink {
    /// An NCCL communicator (rank 1).
    Nccl(Arc<crate::nccl::Link>),
    /// A UCX endpoint of this process's worker, and the transfer's epoch.
    #[cfg(feature = "ucx")]
    Ucx(Arc<crate::ucx::Worker>, u64, u64),
}

impl SendLink {
    /// Connects to the receiver's UCX worker (blocking).
    #[cfg(feature = "ucx")]
    pub fn ucx(address_hex: &str, epoch: u64) -> Result<Self> {
        let w = ucx_worker()?;
        let ep = w.connect(&unhex(address_hex)?)?;
        Ok(SendLink::Ucx(w, ep, epoch))
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            SendLink::Nccl(_) => Backend::Nccl,
            #[cfg(feature = "ucx")]
            SendLink::Ucx(..) => Backend::Ucx,
        }
    }

    /// Moves the `index`-th frame's bytes (blocking). NCCL pairs sends and receives by
    /// order, so it needs neither the index nor a deadline of its own.
    pub fn send(&self, index: u64, data: Vec<u8>, deadline: Instant) -> Result<()> {
        match self {
            SendLink::Nccl(l) => {
                let _ = (index, deadline);
                l.send(&data)
            }
            #[cfg(feature = "ucx")]
            SendLink::Ucx(w, ep, epoch) => w.send(*ep, ucx_tag(*epoch, index), data, deadline),
        }
    }
}

/// The receiving end of an out-of-band path.
#[derive(Clone)]
pub enum RecvLink {
    /// An NCCL communicator (rank 0).
    Nccl(Arc<crate::nccl::Link>),
    /// This process's UCX worker and the reservation's epoch.
    #[cfg(feature = "ucx")]
    Ucx(Arc<crate::ucx::Worker>, u64),
}

impl RecvLink {
    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            RecvLink::Nccl(_) => Backend::Nccl,
            #[cfg(feature = "ucx")]
            RecvLink::Ucx(..) => Backend::Ucx,
        }
    }

    /// Receives the `index`-th frame's `len` bytes (blocking).
    pub fn recv(&self, index: u64, len: usize, deadline: Instant) -> Result<Vec<u8>> {
        match self {
            RecvLink::Nccl(l) => {
                let _ = (index, deadline);
                l.recv(len)
            }
            #[cfg(feature = "ucx")]
            RecvLink::Ucx(w, epoch) => w.recv(ucx_tag(*epoch, index), len, deadline),
        }
    }
}
