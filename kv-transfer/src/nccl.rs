//! NCCL backend (cargo feature `nccl`): GPU-to-GPU transfer through cudarc with dynamic
//! loading. The receiver creates the NCCL unique id and passes it in the transfer target;
//! both sides join a two-rank communicator (receiver rank 0, sender rank 1); each chunk
//! is staged to the device, sent with `ncclSend`/`ncclRecv`, and announced with its size
//! and checksum on the control connection. Without libcuda/libnccl or a device every
//! entry point returns `Unavailable` (cudarc would panic on first use, so presence is
//! checked first). This path has never run on a GPU in this project's CI.
#![allow(unsafe_code)]

use crate::error::{Result, TransferError};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id};
use std::sync::Arc;

fn unavailable(what: impl std::fmt::Display) -> TransferError {
    TransferError::Unavailable(format!("NCCL/CUDA not available: {what}"))
}

/// Fails with `Unavailable` unless libcuda, libnccl and a CUDA device are present.
pub fn check_available() -> Result<()> {
    // SAFETY: only tries to dlopen the libraries; nothing is called through them.
    let cuda = unsafe { cudarc::driver::sys::is_culib_present() };
    // SAFETY: as above.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !cuda || !nccl {
        return Err(unavailable(format!(
            "libcuda {}, libnccl {}",
            if cuda { "found" } else { "missing" },
            if nccl { "found" } else { "missing" }
        )));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(unavailable("no CUDA device")),
        Err(e) => Err(unavailable(format!("{e:?}"))),
    }
}

/// A fresh NCCL unique id, hex-encoded for the transfer target.
pub fn new_id() -> Result<String> {
    check_available()?;
    let id = Id::new().map_err(|e| unavailable(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id
        .internal()
        .iter()
        .map(|c| format!("{:02x}", *c as u8))
        .collect())
}

/// One end of a two-rank communicator. cudarc's communicator may not move between
/// threads, so it lives on a thread of its own and this handle sends it requests.
pub struct Link {
    requests: std::sync::mpsc::Sender<Request>,
}

enum Request {
    Send(Vec<u8>, std::sync::mpsc::Sender<Result<()>>),
    Recv(usize, std::sync::mpsc::Sender<Result<Vec<u8>>>),
}

/// The communicator and its stream, owned by the link thread.
struct Endpoint {
    comm: Comm,
    stream: Arc<CudaStream>,
    peer: i32,
}

impl Endpoint {
    fn join(id_hex: &str, rank: usize, device: usize) -> Result<Self> {
        let bytes = crate::oob::unhex(id_hex)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(TransferError::Protocol(format!(
                "NCCL id has {} bytes, expected 128",
                bytes.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let ctx =
            CudaContext::new(device).map_err(|e| unavailable(format!("device {device}: {e:?}")))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, 2, Id::uninit(internal))
            .map_err(|e| TransferError::PeerGone(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Endpoint {
            comm,
            stream,
            peer: 1 - rank as i32,
        })
    }

    fn send(&self, data: &[u8]) -> Result<()> {
        let dev = self
            .stream
            .clone_htod(data)
            .map_err(|e| TransferError::Io(format!("htod: {e:?}")))?;
        self.comm
            .send(&dev, self.peer)
            .map_err(|e| TransferError::PeerGone(format!("ncclSend: {e:?}")))?;
        self.stream
            .synchronize()
            .map_err(|e| TransferError::Io(format!("sync: {e:?}")))
    }

    fn recv(&self, len: usize) -> Result<Vec<u8>> {
        let mut dev = self
            .stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| TransferError::Io(format!("alloc: {e:?}")))?;
        self.comm
            .recv(&mut dev, self.peer)
            .map_err(|e| TransferError::PeerGone(format!("ncclRecv: {e:?}")))?;
        self.stream
            .clone_dtoh(&dev)
            .map_err(|e| TransferError::Io(format!("dtoh: {e:?}")))
    }
}

fn link_gone() -> TransferError {
    TransferError::PeerGone("NCCL link thread ended".into())
}

impl Link {
    /// Joins the communicator named by `id_hex` as `rank` (0 receiver, 1 sender) on CUDA
    /// device `device`. Blocks until the other rank joins.
    pub fn join(id_hex: &str, rank: usize, device: usize) -> Result<Self> {
        check_available()?;
        let (requests, inbox) = std::sync::mpsc::channel::<Request>();
        let (joined_tx, joined) = std::sync::mpsc::channel();
        let id = id_hex.to_string();
        std::thread::Builder::new()
            .name("xpyd-nccl".into())
            .spawn(move || {
                let ep = match Endpoint::join(&id, rank, device) {
                    Ok(ep) => {
                        let _ = joined_tx.send(Ok(()));
                        ep
                    }
                    Err(e) => {
                        let _ = joined_tx.send(Err(e));
                        return;
                    }
                };
                for req in inbox {
                    match req {
                        Request::Send(data, reply) => {
                            let _ = reply.send(ep.send(&data));
                        }
                        Request::Recv(len, reply) => {
                            let _ = reply.send(ep.recv(len));
                        }
                    }
                }
            })
            .map_err(|e| TransferError::Io(format!("spawn NCCL thread: {e}")))?;
        joined.recv().map_err(|_| link_gone())??;
        Ok(Link { requests })
    }

    /// Sends host bytes to the peer (staged through device memory). Blocks.
    pub fn send(&self, data: &[u8]) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .send(Request::Send(data.to_vec(), tx))
            .map_err(|_| link_gone())?;
        rx.recv().map_err(|_| link_gone())?
    }

    /// Receives `len` bytes from the peer into host memory. Blocks.
    pub fn recv(&self, len: usize) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .send(Request::Recv(len, tx))
            .map_err(|_| link_gone())?;
        rx.recv().map_err(|_| link_gone())?
    }
}
