//! The receiving side: reservations, the listener, and per-connection frame handling.

use crate::buffers::BufPool;
use crate::error::{Result, TransferError};
use crate::frame::{self, Frame};
use crate::metrics as m;
use crate::oob::RecvLink;
use crate::shm::{Arena, Expect, Payload, Region};
use crate::stream::Conn;
use crate::target::{
    Backend, Placement, ShmDesc, TICKET_BYTES, TransferTarget, deadline_ms, host_id,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The model fingerprint senders must present.
    pub fingerprint: String,
    /// Directory for shared-memory segments.
    pub shm_dir: PathBuf,
    /// Chunks buffered per transfer before the connection stops reading (backpressure).
    pub queue: usize,
    /// Size of the shared-memory arena that shm reservations are carved from.
    pub shm_arena_bytes: u64,
    /// How long a new connection may take to send its `Open` before it is closed.
    pub open_timeout: Duration,
    /// How long a connection may wait idle between transfers before it is closed.
    pub keepalive: Duration,
    /// Connections one peer address may hold open at once; more are closed at accept.
    pub max_conns_per_peer: usize,
    /// Metadata bytes one transfer may carry in all.
    pub max_meta_bytes: u64,
    /// TLS every connection must speak (the handshake counts against `open_timeout`),
    /// when the internal plane runs it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ReceiverConfig {
    /// Defaults for a fingerprint.
    pub fn new(fingerprint: impl Into<String>) -> Self {
        ReceiverConfig {
            fingerprint: fingerprint.into(),
            shm_dir: crate::shm::SHM_DIR.into(),
            queue: 64,
            shm_arena_bytes: 1 << 30,
            open_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            max_conns_per_peer: 512,
            max_meta_bytes: 16 << 20,
            tls: None,
        }
    }
}

/// What one reservation asks for.
#[derive(Debug, Clone)]
pub struct ReserveSpec {
    /// Caller's id for the transfer (e.g. the request id).
    pub transfer_id: u64,
    /// Which backend(s) to offer.
    pub backend: Backend,
    /// Payload bytes the transfer carries: sizes the shared-memory segment and bounds
    /// what a sender may send (a chunk beyond it fails the transfer before any byte of
    /// it is allocated).
    pub bytes: u64,
    /// Time allowed from now to completion.
    pub deadline: Duration,
    /// Where the rows go in this receiver's KV pool segment: with `shm` or `auto`, a
    /// same-host sender writes straight into the blocks instead of a staging region.
    pub placement: Option<Placement>,
}

/// What a transfer delivers, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Metadata sent before or between chunks.
    Meta(Payload),
    /// A verified chunk of one layer.
    Chunk {
        /// Layer index.
        layer: u32,
        /// The sender's tag.
        tag: u64,
        /// The bytes.
        data: Payload,
    },
    /// Every frame arrived and was verified.
    Complete(Stats),
}

/// Totals of a finished transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Backend used.
    pub backend: Backend,
    /// Payload bytes.
    pub bytes: u64,
    /// Data and metadata frames.
    pub frames: u64,
    /// Seconds from open to commit.
    pub seconds: f64,
}

struct Slot {
    epoch: u64,
    /// What the sender's `Open` must present.
    ticket: [u8; TICKET_BYTES],
    bytes: u64,
    deadline: Instant,
    tx: mpsc::Sender<Result<Event>>,
    shm: Option<Arc<Region>>,
    placed: bool,
    nccl: Option<String>,
    ucx: bool,
    /// Whether a sender attached, and the receiver's order to stop.
    fate: Arc<Fate>,
}

/// Shared by a reservation, its connection and its [`TransferFence`].
#[derive(Default)]
struct Fate {
    /// A sender attached (set under the slots lock, so final once the slot is gone).
    attached: std::sync::atomic::AtomicBool,
    /// The receiver gave the transfer up: its connection must close now.
    aborted: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// Epochs are unique across every receiver of the process, not just per receiver: UCX
/// tags (`epoch << 24 | index`) are matched by the process's one UCX worker, so two
/// receivers handing out the same epoch would let their transfers take each other's data.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

struct Inner {
    cfg: ReceiverConfig,
    host_id: String,
    addr: SocketAddr,
    slots: Mutex<HashMap<u64, Slot>>,
    buffers: Arc<BufPool>,
    arena: Mutex<Option<Arc<Arena>>>,
    /// Open connections per peer address.
    peers: Mutex<HashMap<IpAddr, usize>>,
}

/// One accepted connection, counted against its peer while it lives.
struct PeerSlot {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl PeerSlot {
    /// Counts a connection from `ip`, or `None` when that peer is at its cap.
    fn take(inner: &Arc<Inner>, ip: IpAddr) -> Option<PeerSlot> {
        let mut peers = inner.peers.lock().expect("peers lock");
        let n = peers.entry(ip).or_default();
        if *n >= inner.cfg.max_conns_per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            inner: inner.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.inner.peers.lock().expect("peers lock");
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl Inner {
    fn release(&self, id: u64, epoch: u64) {
        let mut slots = self.slots.lock().expect("slots lock");
        if slots.get(&id).is_some_and(|s| s.epoch == epoch) {
            slots.remove(&id);
        }
    }
}

/// A KV receiver: one listener serving every reservation of the process.
pub struct Receiver {
    inner: Arc<Inner>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Receiver {
    /// Starts serving on a bound listener.
    pub fn start(cfg: ReceiverConfig, listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            cfg,
            host_id: host_id(),
            addr,
            slots: Mutex::new(HashMap::new()),
            buffers: BufPool::new(),
            arena: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
        });
        let acc = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let Some(slot) = PeerSlot::take(&acc, peer.ip()) else {
                            tracing::warn!(%peer, cap = acc.cfg.max_conns_per_peer, "kv connection refused: the peer is at its connection cap");
                            metrics::counter!(m::REFUSED, "reason" => "peer_cap").increment(1);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve(acc.clone(), stream, peer, slot));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kv receiver accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Receiver { inner, accept })
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Reservations alive now.
    pub fn active(&self) -> usize {
        self.inner.slots.lock().expect("slots lock").len()
    }

    /// Connections open now (attached or not).
    pub fn connections(&self) -> usize {
        self.inner.peers.lock().expect("peers lock").values().sum()
    }

    /// Bytes the receive buffer pool keeps between transfers.
    pub fn pooled_bytes(&self) -> usize {
        self.inner.buffers.held_bytes()
    }

    /// A region of the arena (created on first use).
    fn region(&self, bytes: u64) -> Result<Region> {
        let mut arena = self.inner.arena.lock().expect("arena lock");
        if arena.is_none() {
            crate::shm::remove_orphans(&self.inner.cfg.shm_dir);
            let name = crate::shm::segment_name("kv");
            *arena = Some(Arena::create(
                &self.inner.cfg.shm_dir,
                &name,
                self.inner.cfg.shm_arena_bytes,
            )?);
        }
        let arena = arena.as_ref().expect("created above");
        arena.alloc(bytes as usize).ok_or_else(|| {
            TransferError::Unavailable(format!(
                "shared-memory arena has no {bytes}-byte region free"
            ))
        })
    }

    /// Reserves room for one transfer and returns the target to hand to the sender plus
    /// the stream of what arrives. Dropping the `Incoming` releases the reservation.
    pub fn reserve(&self, spec: ReserveSpec) -> Result<(TransferTarget, Incoming)> {
        let epoch = EPOCHS.fetch_add(1, Ordering::Relaxed);
        let ticket = crate::target::new_ticket()?;
        let nccl = match spec.backend {
            Backend::Nccl => Some(crate::nccl::new_id()?),
            _ => None,
        };
        // UCX is offered when asked for, and with `auto` whenever it is built.
        let ucx_addr = match spec.backend {
            Backend::Ucx => Some(crate::oob::ucx_address()?),
            Backend::Auto => crate::oob::ucx_address().ok(),
            _ => None,
        };
        let placement = match spec.backend {
            Backend::Shm | Backend::Auto => spec.placement,
            Backend::Tcp | Backend::Nccl | Backend::Ucx => None,
        };
        let shm = match spec.backend {
            _ if placement.is_some() => None,
            Backend::Shm | Backend::Auto => match self.region(spec.bytes) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) if spec.backend == Backend::Auto => {
                    tracing::debug!(error = %e, "no shared memory region; offering tcp only");
                    None
                }
                Err(e) => return Err(e),
            },
            Backend::Tcp | Backend::Nccl | Backend::Ucx => None,
        };
        let (tx, rx) = mpsc::channel(self.inner.cfg.queue.max(1));
        let deadline = Instant::now() + spec.deadline;
        let fate = Arc::new(Fate::default());
        let target = TransferTarget {
            backend: spec.backend,
            addr: self.inner.addr.to_string(),
            host_id: self.inner.host_id.clone(),
            transfer_id: spec.transfer_id,
            epoch,
            ticket: crate::target::ticket_hex(&ticket),
            shm: shm.as_ref().map(|r| ShmDesc {
                path: r.arena().segment().path().display().to_string(),
                len: r.arena().segment().len() as u64,
                offset: r.offset() as u64,
                size: r.len() as u64,
            }),
            placement: placement.clone(),
            ucx_addr: ucx_addr.clone(),
            nccl_id: nccl.clone(),
            deadline_unix_ms: deadline_ms(spec.deadline),
        };
        // A new reservation under the same id replaces (and fences off) the old one.
        self.inner.slots.lock().expect("slots lock").insert(
            spec.transfer_id,
            Slot {
                epoch,
                ticket,
                bytes: spec.bytes,
                deadline,
                tx,
                shm,
                placed: placement.is_some(),
                nccl,
                ucx: ucx_addr.is_some(),
                fate: fate.clone(),
            },
        );
        let incoming = Incoming {
            fate,
            inner: self.inner.clone(),
            id: spec.transfer_id,
            epoch,
            rx,
            deadline,
            done: false,
        };
        Ok((target, incoming))
    }
}

/// The receiving end of one reservation.
pub struct Incoming {
    fate: Arc<Fate>,
    inner: Arc<Inner>,
    id: u64,
    epoch: u64,
    rx: mpsc::Receiver<Result<Event>>,
    deadline: Instant,
    done: bool,
}

/// Ends a transfer from the receiver's side, whoever holds its [`Incoming`]: a receiver
/// whose memory a sender writes directly (placed transfers) uses it when it drops the
/// import, so the sender sees the connection close before its next write.
#[derive(Clone)]
pub struct TransferFence {
    inner: Arc<Inner>,
    id: u64,
    epoch: u64,
    fate: Arc<Fate>,
}

impl TransferFence {
    /// Releases the reservation (no sender can attach any more), closes the transfer's
    /// connection if one is attached, and returns whether a sender ever attached.
    pub fn close(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.inner.release(self.id, self.epoch);
        self.fate.aborted.store(true, SeqCst);
        self.fate.wake.notify_one();
        self.fate.attached.load(SeqCst)
    }
}

impl std::fmt::Debug for TransferFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferFence")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// A handle that closes this reservation and tells whether a sender attached.
    pub fn fence(&self) -> TransferFence {
        TransferFence {
            inner: self.inner.clone(),
            id: self.id,
            epoch: self.epoch,
            fate: self.fate.clone(),
        }
    }

    /// The next event; `None` after completion or failure. Fails with `DeadlineExceeded`
    /// when nothing completes the transfer in time.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        if self.done {
            return None;
        }
        let ev = match timeout_at(self.deadline, self.rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => Err(TransferError::PeerGone("transfer connection ended".into())),
            Err(_) => Err(TransferError::DeadlineExceeded(format!(
                "transfer {} not complete in time",
                self.id
            ))),
        };
        if !matches!(ev, Ok(Event::Meta(_) | Event::Chunk { .. })) {
            self.done = true;
            self.inner.release(self.id, self.epoch);
            if let Err(e) = &ev {
                metrics::counter!(m::FAILURES, "reason" => e.reason(), "side" => "receiver")
                    .increment(1);
            }
        }
        Some(ev)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.inner.release(self.id, self.epoch);
    }
}

/// Read buffer of an attached connection (an idle one has none).
const READ_BUFFER: usize = 1 << 20;

/// Serves one connection: waits for an `Open` (at most `open_timeout` on a new
/// connection, `keepalive` between transfers), attaches it, then reads that transfer's
/// frames through a buffer that exists only while the transfer does.
async fn serve(inner: Arc<Inner>, tcp: TcpStream, peer: SocketAddr, _slot: PeerSlot) {
    let started = Instant::now();
    let handshake = Conn::accept(tcp, inner.cfg.tls.as_ref());
    let mut stream = match tokio::time::timeout(inner.cfg.open_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "kv connection refused: tls handshake failed");
            metrics::counter!(m::REFUSED, "reason" => "tls").increment(1);
            return;
        }
        Err(_) => {
            metrics::counter!(m::REFUSED, "reason" => "idle").increment(1);
            return;
        }
    };
    // The handshake and the first `Open` share one budget.
    let mut wait = inner.cfg.open_timeout.saturating_sub(started.elapsed());
    loop {
        // Unbuffered and with no budget: nothing a peer sends before it is attached makes
        // the receiver allocate more than an `Open`'s few bytes.
        let open = tokio::time::timeout(
            wait,
            frame::read_frame(&mut stream, &inner.buffers, frame::Budget::NONE),
        )
        .await;
        let (id, epoch, ticket, fp) = match open {
            Err(_) => {
                tracing::debug!(%peer, "idle kv connection closed");
                metrics::counter!(m::REFUSED, "reason" => "idle").increment(1);
                return;
            }
            Ok(Ok(Some(Frame::Open {
                transfer_id,
                epoch,
                ticket,
                fingerprint,
            }))) => (transfer_id, epoch, ticket, fingerprint),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(other))) => {
                tracing::warn!(%peer, ?other, "kv frame outside a transfer");
                metrics::counter!(m::REFUSED, "reason" => "protocol").increment(1);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "kv connection failed");
                metrics::counter!(m::REFUSED, "reason" => "protocol").increment(1);
                return;
            }
        };
        wait = inner.cfg.keepalive;
        let attached = attach(&inner, id, epoch, &ticket, &fp);
        let reply = attached.as_ref().map(|_| ()).map_err(Clone::clone);
        if frame::write_reply(&mut stream, &reply).await.is_err() {
            return;
        }
        let att = match attached {
            Ok(att) => att,
            // A peer without the reservation's ticket was not handed its target: it gets
            // no second try on this connection.
            Err(TransferError::Rejected(why)) => {
                tracing::warn!(%peer, transfer_id = id, %why, "kv open refused");
                metrics::counter!(m::REFUSED, "reason" => "ticket").increment(1);
                return;
            }
            Err(_) => continue,
        };
        let mut conn = BufReader::with_capacity(READ_BUFFER, &mut stream);
        let res = receive(&mut conn, &inner, &att, peer).await;
        // The sender waits for the commit's reply before it sends anything else, so
        // nothing can be buffered past the commit.
        let res = match res {
            Ok(()) if !conn.buffer().is_empty() => Err(TransferError::Protocol(
                "bytes after a commit, before its reply".into(),
            )),
            r => r,
        };
        if let Err(e) = res {
            let _ = att.tx.send(Err(e)).await;
            return;
        }
    }
}

/// What a connection needs once it is attached to a reservation.
struct Attached {
    tx: mpsc::Sender<Result<Event>>,
    shm: Option<Arc<Region>>,
    placed: bool,
    fate: Arc<Fate>,
    nccl: Option<String>,
    /// The reservation's epoch when UCX was offered (it scopes the UCX tags).
    ucx_epoch: Option<u64>,
    deadline: Instant,
    /// Data bytes the reservation allows.
    bytes: u64,
}

fn attach(
    inner: &Inner,
    id: u64,
    epoch: u64,
    ticket: &[u8; TICKET_BYTES],
    fp: &str,
) -> Result<Attached> {
    if fp != inner.cfg.fingerprint {
        return Err(TransferError::FingerprintMismatch {
            expected: inner.cfg.fingerprint.clone(),
            found: fp.to_string(),
        });
    }
    let mut slots = inner.slots.lock().expect("slots lock");
    if slots
        .get(&id)
        .is_some_and(|s| s.epoch == epoch && !crate::target::same_ticket(&s.ticket, ticket))
    {
        return Err(TransferError::Rejected(format!(
            "transfer {id}: the ticket does not match the reservation's"
        )));
    }
    match slots.get_mut(&id) {
        Some(s)
            if s.epoch == epoch && !s.fate.attached.load(std::sync::atomic::Ordering::SeqCst) =>
        {
            s.fate
                .attached
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(Attached {
                tx: s.tx.clone(),
                shm: s.shm.clone(),
                placed: s.placed,
                fate: s.fate.clone(),
                nccl: s.nccl.clone(),
                ucx_epoch: s.ucx.then_some(epoch),
                deadline: s.deadline,
                bytes: s.bytes,
            })
        }
        _ => Err(TransferError::StaleEpoch {
            transfer_id: id,
            epoch,
        }),
    }
}

/// Reads one transfer's frames up to its commit. Every length a frame announces is
/// checked against what the reservation has left before its bytes are read, allocated,
/// received out of band or handed on.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    inner: &Inner,
    att: &Attached,
    peer: SocketAddr,
) -> Result<()> {
    let (tx, shm, deadline) = (&att.tx, &att.shm, att.deadline);
    let buffers = &inner.buffers;
    // NCCL: join the communicator as rank 0 (blocks until the sender joins as rank 1).
    // UCX: receive on this process's worker, tags scoped by the epoch.
    let link: Option<RecvLink> = match (&att.nccl, att.ucx_epoch) {
        (Some(id), _) => {
            let id = id.clone();
            let join = tokio::task::spawn_blocking(move || crate::nccl::Link::join(&id, 0, 0));
            match timeout_at(deadline, join).await {
                Err(_) => return Err(TransferError::DeadlineExceeded("NCCL communicator".into())),
                Ok(j) => Some(RecvLink::Nccl(Arc::new(
                    j.map_err(|e| TransferError::Io(e.to_string()))??,
                ))),
            }
        }
        #[cfg(feature = "ucx")]
        (None, Some(epoch)) => Some(RecvLink::Ucx(crate::oob::ucx_worker()?, epoch)),
        _ => None,
    };
    let started = std::time::Instant::now();
    let (mut frames, mut bytes, mut meta) = (0u64, 0u64, 0u64);
    let mut backend = Backend::Tcp;
    // A chunk notice (shm, placed, out of band) announces bytes that are not read here:
    // they count against the same budget as inline data.
    let charge = |bytes: &mut u64, len: u64| -> Result<()> {
        match bytes.checked_add(len).filter(|b| *b <= att.bytes) {
            Some(b) => {
                *bytes = b;
                Ok(())
            }
            None => Err(TransferError::Protocol(format!(
                "chunk of {len} bytes goes beyond the {} bytes the transfer has left",
                att.bytes - *bytes
            ))),
        }
    };
    let gone = || TransferError::PeerGone("receiver released the reservation".into());
    loop {
        // The consumer dropping its `Incoming`, or closing its fence, ends the transfer at
        // once: the connection closes, which a placed sender checks before every write.
        if att.fate.aborted.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(gone());
        }
        let budget = frame::Budget {
            data: att.bytes - bytes,
            meta: inner.cfg.max_meta_bytes.saturating_sub(meta),
        };
        let read = tokio::select! {
            r = timeout_at(deadline, frame::read_frame(conn, buffers, budget)) => r,
            () = tx.closed() => return Err(gone()),
            () = att.fate.wake.notified() => return Err(gone()),
        };
        let f = match read {
            Err(_) => return Err(TransferError::DeadlineExceeded("sender too slow".into())),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => {
                return Err(TransferError::PeerGone(format!(
                    "sender {peer} closed the connection mid-transfer"
                )));
            }
            Ok(Err(e)) => return Err(e),
        };
        let ev = match f {
            Frame::Data {
                layer,
                tag,
                payload,
            } => {
                charge(&mut bytes, payload.len() as u64)?;
                Event::Chunk {
                    layer,
                    tag,
                    data: Payload::Owned(Arc::new(payload)),
                }
            }
            Frame::ShmData {
                layer,
                tag,
                offset,
                len,
                checksum,
            } => {
                charge(&mut bytes, len)?;
                let seg = shm
                    .as_ref()
                    .ok_or_else(|| TransferError::Protocol("shm frame without a segment".into()))?;
                let end = offset.checked_add(len).filter(|e| *e <= seg.len() as u64);
                let Some(end) = end else {
                    return Err(TransferError::Protocol(format!(
                        "shm range {offset}+{len} outside {} bytes",
                        seg.len()
                    )));
                };
                let range = offset as usize..end as usize;
                // Verified by the consumer as it copies the bytes out (one pass over them).
                backend = Backend::Shm;
                Event::Chunk {
                    layer,
                    tag,
                    data: Payload::Mapped(
                        seg.clone(),
                        range,
                        Expect {
                            layer,
                            tag,
                            checksum,
                        },
                    ),
                }
            }
            Frame::Placed {
                layer,
                tag,
                len,
                checksum,
            } => {
                charge(&mut bytes, len)?;
                if !att.placed {
                    return Err(TransferError::Protocol(
                        "placed frame for a reservation without a placement".into(),
                    ));
                }
                let len = usize::try_from(len)
                    .map_err(|_| TransferError::Protocol("chunk too large".into()))?;
                // Verified by the consumer where the sender wrote it (its KV blocks).
                backend = Backend::Shm;
                Event::Chunk {
                    layer,
                    tag,
                    data: Payload::Placed(
                        len,
                        Expect {
                            layer,
                            tag,
                            checksum,
                        },
                    ),
                }
            }
            Frame::OutOfBand {
                layer,
                tag,
                len,
                checksum,
            } => {
                charge(&mut bytes, len)?;
                let link = link.clone().ok_or_else(|| {
                    TransferError::Protocol("out-of-band frame without a link".into())
                })?;
                let len = usize::try_from(len)
                    .map_err(|_| TransferError::Protocol("chunk too large".into()))?;
                let index = frames;
                backend = link.backend();
                let data = match timeout_at(
                    deadline,
                    tokio::task::spawn_blocking(move || link.recv(index, len, deadline.into_std())),
                )
                .await
                {
                    Err(_) => {
                        return Err(TransferError::DeadlineExceeded(format!(
                            "{} receive",
                            backend.name()
                        )));
                    }
                    Ok(j) => j.map_err(|e| TransferError::Io(e.to_string()))??,
                };
                if frame::checksum(layer, tag, &data) != checksum {
                    return Err(TransferError::Checksum(format!(
                        "layer {layer} chunk {tag:#x} over {}",
                        backend.name()
                    )));
                }
                Event::Chunk {
                    layer,
                    tag,
                    data: Payload::Owned(Arc::new(data.into())),
                }
            }
            Frame::Meta(p) => {
                meta += p.len() as u64;
                Event::Meta(Payload::Owned(Arc::new(p.into())))
            }
            Frame::Commit(n) => {
                if n != frames {
                    let e = TransferError::Protocol(format!(
                        "commit counts {n} frames, received {frames}"
                    ));
                    frame::write_reply(conn.get_mut(), &Err(e.clone())).await?;
                    return Err(e);
                }
                let stats = Stats {
                    backend,
                    bytes,
                    frames,
                    seconds: started.elapsed().as_secs_f64(),
                };
                tx.send(Ok(Event::Complete(stats)))
                    .await
                    .map_err(|_| gone())?;
                m::record_transfer(
                    backend,
                    &peer.ip().to_string(),
                    "receive",
                    bytes,
                    stats.seconds,
                );
                frame::write_reply(conn.get_mut(), &Ok(())).await?;
                return Ok(());
            }
            Frame::Abort => return Err(TransferError::PeerGone("sender aborted".into())),
            Frame::Open { .. } => {
                return Err(TransferError::Protocol("open inside a transfer".into()));
            }
        };
        frames += 1;
        match timeout_at(deadline, tx.send(Ok(ev))).await {
            Err(_) => return Err(TransferError::DeadlineExceeded("consumer too slow".into())),
            Ok(Err(_)) => {
                let e = gone();
                let _ = frame::write_reply(conn.get_mut(), &Err(e.clone())).await;
                return Err(e);
            }
            Ok(Ok(())) => {}
        }
    }
}
