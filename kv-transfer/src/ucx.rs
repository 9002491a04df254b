//! UCX backend (cargo feature `ucx`): tagged sends over UCP, so the same code runs over
//! RDMA NICs where they exist and over UCX's tcp and shared-memory transports here
//! (`UCX_TLS`). Every UCX object lives on one thread per process that owns the context
//! and worker and drives progress; this module's handle sends it requests. The receiver
//! puts its worker address in the transfer target; the sender creates an endpoint to it.
//! All `unsafe` UCX calls of the project are in this file.
#![allow(unsafe_code)]

use crate::error::{Result, TransferError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use xpyd_ucx_sys as sys;

fn status_error(what: &str, s: sys::ucs_status_t) -> TransferError {
    // SAFETY: ucs_status_string returns a static string for every status value.
    let msg = unsafe { std::ffi::CStr::from_ptr(sys::ucs_status_string(s)) }.to_string_lossy();
    match s {
        sys::ucs_status_t::UCS_ERR_CANCELED | sys::ucs_status_t::UCS_ERR_TIMED_OUT => {
            TransferError::DeadlineExceeded(format!("{what}: {msg}"))
        }
        sys::ucs_status_t::UCS_ERR_CONNECTION_RESET
        | sys::ucs_status_t::UCS_ERR_ENDPOINT_TIMEOUT
        | sys::ucs_status_t::UCS_ERR_UNREACHABLE => {
            TransferError::PeerGone(format!("{what}: {msg}"))
        }
        _ => TransferError::Io(format!("{what}: {msg}")),
    }
}

fn check(what: &str, s: sys::ucs_status_t) -> Result<()> {
    if s == sys::ucs_status_t::UCS_OK {
        Ok(())
    } else {
        Err(status_error(what, s))
    }
}

/// The outcome of a completed request. A request still in flight when its endpoint fails
/// (the peer died or closed) completes with the endpoint's error; over UCX's tcp transport
/// that is `UCS_ERR_IO_ERROR`, which here means the peer is gone, not a local fault.
fn completion(what: &str, s: sys::ucs_status_t) -> Result<()> {
    match s {
        sys::ucs_status_t::UCS_ERR_IO_ERROR => Err(TransferError::PeerGone(format!(
            "{what}: endpoint failed (Input/output error)"
        ))),
        _ => check(what, s),
    }
}

/// What a `ucs_status_ptr_t` returned by a non-blocking call means.
enum Started {
    Done,
    Pending(*mut c_void),
}

/// Decodes UCS_PTR_IS_ERR / UCS_PTR_STATUS.
fn started(what: &str, p: sys::ucs_status_ptr_t) -> Result<Started> {
    let v = p as isize;
    if v == 0 {
        Ok(Started::Done)
    } else if v < 0 && v >= sys::ucs_status_t::UCS_ERR_LAST.0 as isize {
        Err(status_error(what, sys::ucs_status_t(v as _)))
    } else {
        Ok(Started::Pending(p))
    }
}

enum Request {
    Connect(Vec<u8>, mpsc::Sender<Result<u64>>),
    Send {
        ep: u64,
        tag: u64,
        data: Vec<u8>,
        deadline: Instant,
        reply: mpsc::Sender<Result<()>>,
    },
    Recv {
        tag: u64,
        len: usize,
        deadline: Instant,
        reply: mpsc::Sender<Result<Vec<u8>>>,
    },
}

enum Reply {
    Sent(mpsc::Sender<Result<()>>),
    Received(mpsc::Sender<Result<Vec<u8>>>),
}

struct InFlight {
    req: *mut c_void,
    buf: Vec<u8>,
    deadline: Instant,
    cancelled: bool,
    /// Taken when the caller has been answered (a cancelled request is answered at its
    /// deadline; its buffer stays here until UCX lets go of it).
    reply: Option<Reply>,
}

/// A process's UCX worker, driven by its own thread.
pub struct Worker {
    requests: mpsc::Sender<Request>,
    address: Vec<u8>,
}

impl Worker {
    /// Creates the context and worker (UCX reads `UCX_*` settings from the environment).
    pub fn start() -> Result<Self> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name("xpyd-ucx".into())
            .spawn(move || match Owner::new() {
                Ok(mut owner) => {
                    let _ = ready_tx.send(Ok(owner.address.clone()));
                    owner.run(inbox);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| TransferError::Io(format!("spawn UCX thread: {e}")))?;
        let address = ready.recv().map_err(|_| gone())??;
        Ok(Worker { requests, address })
    }

    /// This worker's address, for the peer's endpoint.
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    /// Creates (or reuses) an endpoint to a remote worker address.
    pub fn connect(&self, remote: &[u8]) -> Result<u64> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(Request::Connect(remote.to_vec(), tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Tagged send; blocks until UCX has taken the data or the deadline passes.
    pub fn send(&self, ep: u64, tag: u64, data: Vec<u8>, deadline: Instant) -> Result<()> {
        let (reply, rx) = mpsc::channel();
        self.requests
            .send(Request::Send {
                ep,
                tag,
                data,
                deadline,
                reply,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Tagged receive of exactly `len` bytes; blocks until it arrives or the deadline passes.
    pub fn recv(&self, tag: u64, len: usize, deadline: Instant) -> Result<Vec<u8>> {
        let (reply, rx) = mpsc::channel();
        self.requests
            .send(Request::Recv {
                tag,
                len,
                deadline,
                reply,
            })
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

fn gone() -> TransferError {
    TransferError::Io("UCX worker thread ended".into())
}

/// The UCX objects, owned by the worker thread.
struct Owner {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    address: Vec<u8>,
    eps: HashMap<Vec<u8>, (u64, sys::ucp_ep_h)>,
    by_id: HashMap<u64, sys::ucp_ep_h>,
    inflight: Vec<InFlight>,
}

impl Owner {
    fn new() -> Result<Self> {
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; NULL name/file prefixes read the defaults.
        check("ucp_config_read", unsafe {
            sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        let params = sys::ucp_params_t {
            field_mask: sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64,
            features: sys::ucp_feature_UCP_FEATURE_TAG as u64,
            ..Default::default()
        };
        let mut context: sys::ucp_context_h = std::ptr::null_mut();
        // SAFETY: params and config are valid for the call; context is an out-pointer.
        let s = unsafe {
            sys::ucp_init_version(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &params,
                config,
                &mut context,
            )
        };
        // SAFETY: config came from ucp_config_read and is not used after this.
        unsafe { sys::ucp_config_release(config) };
        check("ucp_init", s)?;
        let wparams = sys::ucp_worker_params_t {
            field_mask: sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: context is live; worker is an out-pointer.
        if let Err(e) = check("ucp_worker_create", unsafe {
            sys::ucp_worker_create(context, &wparams, &mut worker)
        }) {
            // SAFETY: context is live and owned here.
            unsafe { sys::ucp_cleanup(context) };
            return Err(e);
        }
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: worker is live; out-pointers to locals.
        let got = check("ucp_worker_get_address", unsafe {
            sys::ucp_worker_get_address(worker, &mut addr, &mut len)
        });
        // From here on `owner` cleans the worker and context up on any early return.
        let mut owner = Owner {
            context,
            worker,
            address: Vec::new(),
            eps: HashMap::new(),
            by_id: HashMap::new(),
            inflight: Vec::new(),
        };
        got?;
        // SAFETY: UCX returned `len` readable bytes at `addr`; released right after copying.
        owner.address = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: addr came from ucp_worker_get_address on this worker.
        unsafe { sys::ucp_worker_release_address(worker, addr) };
        Ok(owner)
    }

    fn run(&mut self, inbox: mpsc::Receiver<Request>) {
        loop {
            let next = if self.inflight.is_empty() {
                match inbox.recv_timeout(Duration::from_micros(200)) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                inbox.try_recv().ok()
            };
            if let Some(r) = next {
                self.start(r);
            }
            // SAFETY: the worker is live and only this thread uses it.
            while unsafe { sys::ucp_worker_progress(self.worker) } > 0 {}
            self.reap();
        }
    }

    fn start(&mut self, r: Request) {
        match r {
            Request::Connect(remote, reply) => {
                let _ = reply.send(self.connect(remote));
            }
            Request::Send {
                ep,
                tag,
                data,
                deadline,
                reply,
            } => {
                let Some(&ep) = self.by_id.get(&ep) else {
                    let _ = reply.send(Err(TransferError::Protocol("unknown UCX endpoint".into())));
                    return;
                };
                let param = sys::ucp_request_param_t::default();
                // SAFETY: ep is live; `data` stays in `inflight` until the request completes.
                let p = unsafe {
                    sys::ucp_tag_send_nbx(
                        ep,
                        data.as_ptr() as *const c_void,
                        data.len(),
                        tag,
                        &param,
                    )
                };
                match started("ucp_tag_send_nbx", p) {
                    Ok(Started::Done) => {
                        let _ = reply.send(Ok(()));
                    }
                    Ok(Started::Pending(req)) => self.inflight.push(InFlight {
                        req,
                        buf: data,
                        deadline,
                        cancelled: false,
                        reply: Some(Reply::Sent(reply)),
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Request::Recv {
                tag,
                len,
                deadline,
                reply,
            } => {
                let mut buf = vec![0u8; len];
                let param = sys::ucp_request_param_t::default();
                // SAFETY: the worker is live; `buf` stays in `inflight` until completion.
                let p = unsafe {
                    sys::ucp_tag_recv_nbx(
                        self.worker,
                        buf.as_mut_ptr() as *mut c_void,
                        len,
                        tag,
                        u64::MAX,
                        &param,
                    )
                };
                match started("ucp_tag_recv_nbx", p) {
                    Ok(Started::Done) => {
                        let _ = reply.send(Ok(buf));
                    }
                    Ok(Started::Pending(req)) => self.inflight.push(InFlight {
                        req,
                        buf,
                        deadline,
                        cancelled: false,
                        reply: Some(Reply::Received(reply)),
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    fn connect(&mut self, remote: Vec<u8>) -> Result<u64> {
        if let Some((id, _)) = self.eps.get(&remote) {
            return Ok(*id);
        }
        // Peer error handling where the transports support it (tcp, RDMA); shared-memory
        // transports do not, and then the endpoint is made without it (deadlines still
        // bound every request).
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        let mut result = sys::ucs_status_t::UCS_OK;
        for err_mode in [
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER,
            sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE,
        ] {
            let params = sys::ucp_ep_params_t {
                field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE)
                    as u64,
                address: remote.as_ptr() as *const sys::ucp_address_t,
                err_mode,
                ..Default::default()
            };
            // SAFETY: the worker is live; `remote` outlives the call (UCX copies what it needs).
            result = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
            if result == sys::ucs_status_t::UCS_OK {
                break;
            }
        }
        check("ucp_ep_create", result)?;
        let id = self.by_id.len() as u64 + 1;
        self.eps.insert(remote, (id, ep));
        self.by_id.insert(id, ep);
        Ok(id)
    }

    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.inflight.len() {
            let f = &mut self.inflight[i];
            // SAFETY: f.req is a live request of this worker until freed below.
            let s = unsafe { sys::ucp_request_check_status(f.req) };
            if s == sys::ucs_status_t::UCS_INPROGRESS {
                if now > f.deadline && !f.cancelled {
                    // SAFETY: cancelling a live request; it completes with CANCELED when
                    // the transport supports cancelling it (tag receives), else later.
                    unsafe { sys::ucp_request_cancel(self.worker, f.req) };
                    f.cancelled = true;
                    // Answer now: a send UCX cannot cancel may stay pending until its
                    // endpoint closes, and the caller's deadline is now.
                    answer(
                        f.reply.take(),
                        Err(TransferError::DeadlineExceeded("UCX transfer".into())),
                        Vec::new(),
                    );
                }
                i += 1;
                continue;
            }
            let f = self.inflight.swap_remove(i);
            // SAFETY: the request completed; freeing it is the caller's duty.
            unsafe { sys::ucp_request_free(f.req) };
            answer(f.reply, completion("ucx request", s), f.buf);
        }
    }
}

/// Delivers a request's outcome (no-op when it was answered already).
fn answer(reply: Option<Reply>, res: Result<()>, buf: Vec<u8>) {
    match reply {
        None => {}
        Some(Reply::Sent(r)) => {
            let _ = r.send(res);
        }
        Some(Reply::Received(r)) => {
            let _ = r.send(res.map(|()| buf));
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        for f in self.inflight.drain(..) {
            // SAFETY: cancel and free what is still pending before the worker goes.
            unsafe {
                sys::ucp_request_cancel(self.worker, f.req);
                sys::ucp_request_free(f.req);
            }
        }
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        for (_, ep) in self.by_id.drain() {
            // SAFETY: force-closing our own endpoints; a returned request is freed at once.
            unsafe {
                let p = sys::ucp_ep_close_nbx(ep, &param);
                if let Ok(Started::Pending(req)) = started("ucp_ep_close_nbx", p) {
                    while sys::ucp_request_check_status(req) == sys::ucs_status_t::UCS_INPROGRESS {
                        sys::ucp_worker_progress(self.worker);
                    }
                    sys::ucp_request_free(req);
                }
            }
        }
        // SAFETY: the worker and context are ours and nothing uses them any more.
        unsafe {
            sys::ucp_worker_destroy(self.worker);
            sys::ucp_cleanup(self.context);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_ended_by_a_failed_endpoint_is_peer_gone() {
        let io = completion("r", sys::ucs_status_t::UCS_ERR_IO_ERROR).unwrap_err();
        assert!(matches!(io, TransferError::PeerGone(_)), "{io:?}");
        let reset = completion("r", sys::ucs_status_t::UCS_ERR_CONNECTION_RESET).unwrap_err();
        assert!(matches!(reset, TransferError::PeerGone(_)), "{reset:?}");
        let nomem = completion("r", sys::ucs_status_t::UCS_ERR_NO_MEMORY).unwrap_err();
        assert!(matches!(nomem, TransferError::Io(_)), "{nomem:?}");
        assert!(completion("r", sys::ucs_status_t::UCS_OK).is_ok());
    }
}
