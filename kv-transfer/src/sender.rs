//! The sending side: opens a target over the chosen backend and writes chunks.

use crate::error::{Result, TransferError};
use crate::frame;
use crate::metrics as m;
use crate::oob::SendLink;
use crate::receiver::Stats;
use crate::shm::Segment;
use crate::stream::Conn;
use crate::target::{Backend, TransferTarget, host_id};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::time::{Instant, timeout_at};

/// Bytes buffered before a write: small chunks coalesce into writes this large.
const WRITE_BUFFER: usize = 1 << 20;

/// Opens transfers; keeps idle connections per peer for reuse.
#[derive(Clone)]
pub struct Sender {
    fingerprint: String,
    host_id: String,
    pool: Arc<Mutex<HashMap<String, Vec<Conn>>>>,
    /// Receivers' shared segments, mapped once.
    maps: Arc<Mutex<HashMap<String, Arc<Mutex<Segment>>>>>,
    /// TLS to dial receivers with (the cluster's CA as the only root), when the
    /// internal plane runs it.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Segments kept mapped; beyond this the others are unmapped.
const MAPS_KEPT: usize = 8;

impl Sender {
    /// A sender for a model fingerprint.
    pub fn new(fingerprint: impl Into<String>) -> Self {
        Sender {
            fingerprint: fingerprint.into(),
            host_id: host_id(),
            pool: Arc::default(),
            maps: Arc::default(),
            tls: None,
        }
    }

    /// Dials receivers over TLS with `config` (their certificates must name the host of
    /// the target's address).
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The backend `open` would use for this target.
    pub fn choose(&self, target: &TransferTarget) -> Result<Backend> {
        let same_host =
            target.host_id == self.host_id && (target.shm.is_some() || target.placement.is_some());
        match target.backend {
            Backend::Tcp => Ok(Backend::Tcp),
            Backend::Shm if same_host => Ok(Backend::Shm),
            Backend::Shm => Err(TransferError::Unavailable(
                "shm needs the receiver on this host".into(),
            )),
            Backend::Auto if same_host => Ok(Backend::Shm),
            Backend::Auto if cfg!(feature = "ucx") && target.ucx_addr.is_some() => Ok(Backend::Ucx),
            Backend::Auto => Ok(Backend::Tcp),
            Backend::Ucx if cfg!(feature = "ucx") && target.ucx_addr.is_some() => Ok(Backend::Ucx),
            b @ (Backend::Ucx | Backend::Nccl) => Err(TransferError::Unavailable(format!(
                "{} is not built into this binary",
                b.name()
            ))),
        }
    }

    /// Maps a receiver's segment (kept for reuse while the path names the same file).
    /// Only segments this project creates are accepted: a forged target cannot make a
    /// sender write into an arbitrary file.
    fn map(&self, path: &str, len: u64) -> Result<Arc<Mutex<Segment>>> {
        if !crate::target::is_segment_path(path) {
            return Err(TransferError::Protocol(format!(
                "{path} is not a KV segment (want {}/xpyd-…)",
                crate::shm::SHM_DIR
            )));
        }
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = maps.get(path) {
            let seg = m.lock().unwrap_or_else(|e| e.into_inner());
            if seg.len() as u64 == len && seg.is_current(Path::new(path)) {
                return Ok(m.clone());
            }
        }
        let seg = Arc::new(Mutex::new(Segment::open(Path::new(path), len)?));
        if maps.len() >= MAPS_KEPT {
            maps.clear();
        }
        maps.insert(path.to_string(), seg.clone());
        Ok(seg)
    }

    /// Opens a transfer to `target`: connects (or reuses a connection), attaches to the
    /// reservation, and maps the shared segment when shm is chosen.
    pub async fn open(&self, target: &TransferTarget) -> Result<Transfer> {
        let deadline = Instant::now() + target.remaining();
        let ticket = target.ticket_bytes()?;
        let backend = self.choose(target)?;
        let shm = match (backend, &target.placement, &target.shm) {
            (Backend::Shm, Some(p), _) => Some(ShmTarget::Placed {
                seg: self.map(&p.path, p.len)?,
                placement: p.clone(),
            }),
            (Backend::Shm, None, Some(d)) => Some(ShmTarget::Region {
                seg: self.map(&d.path, d.len)?,
                offset: d.offset as usize,
                size: d.size as usize,
            }),
            _ => None,
        };
        tracing::info!(transfer = target.transfer_id, backend = backend.name(), requested = target.backend.name(), peer = %target.addr, "kv transfer backend chosen");
        // A pooled connection the receiver has closed since (it keeps idle ones for a
        // while only) fails at the open: that one attempt is made again on a new one.
        let conn = loop {
            let pooled = self
                .pool
                .lock()
                .expect("pool lock")
                .get_mut(&target.addr)
                .and_then(Vec::pop);
            let reused = pooled.is_some();
            let stream = match pooled {
                Some(s) => s,
                None => timeout_at(deadline, Conn::connect(&target.addr, self.tls.as_ref()))
                    .await
                    .map_err(|_| {
                        TransferError::DeadlineExceeded(format!("connect {}", target.addr))
                    })??,
            };
            let mut conn = BufWriter::with_capacity(WRITE_BUFFER, stream);
            let opened = async {
                frame::write_open(
                    &mut conn,
                    target.transfer_id,
                    target.epoch,
                    &ticket,
                    &self.fingerprint,
                )
                .await?;
                conn.flush().await.map_err(TransferError::from)?;
                frame::read_reply(conn.get_mut()).await
            };
            match timeout_at(deadline, opened).await {
                Err(_) => return Err(TransferError::DeadlineExceeded("open".into())),
                Ok(Err(frame::ReplyError::Rejected(code, msg))) => {
                    // The connection is still in sync after a refused open: keep it.
                    self.pool
                        .lock()
                        .expect("pool lock")
                        .entry(target.addr.clone())
                        .or_default()
                        .push(conn.into_inner());
                    return Err(classify_rejection(code, msg, target, &self.fingerprint));
                }
                Ok(Err(frame::ReplyError::Io(e))) if reused => {
                    tracing::debug!(peer = %target.addr, error = %e, "pooled kv connection was closed; opening a new one");
                }
                Ok(Err(frame::ReplyError::Io(e))) => return Err(e),
                Ok(Ok(())) => break conn,
            }
        };
        let oob = match (backend, &target.nccl_id, &target.ucx_addr) {
            (Backend::Nccl, Some(id), _) => {
                let id = id.clone();
                let join = tokio::task::spawn_blocking(move || crate::nccl::Link::join(&id, 1, 0));
                match timeout_at(deadline, join).await {
                    Err(_) => {
                        return Err(TransferError::DeadlineExceeded("NCCL communicator".into()));
                    }
                    Ok(j) => Some(SendLink::Nccl(Arc::new(
                        j.map_err(|e| TransferError::Io(e.to_string()))??,
                    ))),
                }
            }
            #[cfg(feature = "ucx")]
            (Backend::Ucx, _, Some(addr)) => {
                let (addr, epoch) = (addr.clone(), target.epoch);
                let connect = tokio::task::spawn_blocking(move || SendLink::ucx(&addr, epoch));
                match timeout_at(deadline, connect).await {
                    Err(_) => return Err(TransferError::DeadlineExceeded("UCX endpoint".into())),
                    Ok(j) => Some(j.map_err(|e| TransferError::Io(e.to_string()))??),
                }
            }
            _ => None,
        };
        Ok(Transfer {
            sender: self.clone(),
            oob,
            addr: target.addr.clone(),
            conn: Some(conn),
            shm,
            cursor: 0,
            frames: 0,
            bytes: 0,
            backend,
            deadline,
            started: std::time::Instant::now(),
        })
    }
}

fn classify_rejection(
    code: u8,
    msg: String,
    target: &TransferTarget,
    fingerprint: &str,
) -> TransferError {
    match code {
        frame::REPLY_STALE => TransferError::StaleEpoch {
            transfer_id: target.transfer_id,
            epoch: target.epoch,
        },
        frame::REPLY_FINGERPRINT => TransferError::FingerprintMismatch {
            expected: msg,
            found: fingerprint.to_string(),
        },
        _ => TransferError::Rejected(msg),
    }
}

/// Where in the receiver's shared memory this transfer writes.
enum ShmTarget {
    /// A staging region, filled in order; the receiver copies chunks out of it.
    Region {
        seg: Arc<Mutex<Segment>>,
        offset: usize,
        size: usize,
    },
    /// The receiver's KV blocks themselves.
    Placed {
        seg: Arc<Mutex<Segment>>,
        placement: crate::target::Placement,
    },
}

/// Copies `data` to `dst` while continuing checksum `crc` over it in cache-sized pieces
/// (one pass over memory).
fn copy_and_checksum(mut crc: u32, data: &[u8], dst: &mut [u8]) -> u32 {
    const PIECE: usize = 64 * 1024;
    for (src, out) in data.chunks(PIECE).zip(dst.chunks_mut(PIECE)) {
        out.copy_from_slice(src);
        crc = frame::checksum_update(crc, src);
    }
    crc
}

/// True when the receiver has closed the connection (or sent anything: mid-transfer it
/// only speaks to fail). A non-blocking peek, so a sender can check before every write
/// into a receiver's memory.
fn receiver_left(stream: &Conn) -> bool {
    let stream = stream.tcp();
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    let peek = recv(
        stream.as_raw_fd(),
        &mut b,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    !matches!(
        peek,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
    )
}

/// One open transfer. Dropping it without `commit` aborts it.
pub struct Transfer {
    sender: Sender,
    oob: Option<SendLink>,
    addr: String,
    conn: Option<BufWriter<Conn>>,
    shm: Option<ShmTarget>,
    cursor: usize,
    frames: u64,
    bytes: u64,
    backend: Backend,
    deadline: Instant,
    started: std::time::Instant,
}

impl Transfer {
    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn conn(&mut self) -> Result<&mut BufWriter<Conn>> {
        self.conn
            .as_mut()
            .ok_or_else(|| TransferError::Protocol("transfer already finished".into()))
    }

    async fn within<T>(
        &mut self,
        what: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match timeout_at(self.deadline, f).await {
            Ok(r) => r,
            Err(_) => Err(TransferError::DeadlineExceeded(what.to_string())),
        }
    }

    /// Fails unless the receiver still wants this transfer: before its deadline, with the
    /// connection open. Checked right before every write into the receiver's memory.
    fn check_receiver(&self, deadline: Instant) -> Result<()> {
        if Instant::now() >= deadline {
            return Err(TransferError::DeadlineExceeded("send".into()));
        }
        if let Some(conn) = self.conn.as_ref()
            && receiver_left(conn.get_ref())
        {
            return Err(TransferError::PeerGone(
                "receiver closed the transfer; nothing written".into(),
            ));
        }
        Ok(())
    }

    /// Sends one chunk of `layer`. Buffered: small chunks coalesce; call [`flush`] to
    /// push what is buffered (e.g. after each layer when streaming).
    ///
    /// [`flush`]: Transfer::flush
    pub async fn send(&mut self, layer: u32, tag: u64, data: &[u8]) -> Result<()> {
        let deadline = self.deadline;
        if let Some(link) = self.oob.clone() {
            let sum = frame::checksum(layer, tag, data);
            let conn = self.conn()?;
            timeout_at(deadline, async {
                frame::write_oob(conn, layer, tag, data.len() as u64, sum).await?;
                conn.flush().await.map_err(TransferError::from)
            })
            .await
            .map_err(|_| TransferError::DeadlineExceeded("send".into()))??;
            let (owned, index, std_deadline) = (data.to_vec(), self.frames, deadline.into_std());
            timeout_at(
                deadline,
                tokio::task::spawn_blocking(move || link.send(index, owned, std_deadline)),
            )
            .await
            .map_err(|_| TransferError::DeadlineExceeded("out-of-band send".into()))?
            .map_err(|e| TransferError::Io(e.to_string()))??;
            self.frames += 1;
            self.bytes += data.len() as u64;
            return Ok(());
        }
        let res = match self.shm.as_ref() {
            Some(ShmTarget::Region { seg, offset, size }) => {
                let (start, end) = (self.cursor, self.cursor + data.len());
                if end > *size {
                    return Err(TransferError::Protocol(format!(
                        "{end} bytes exceed the {size}-byte region"
                    )));
                }
                let sum = {
                    let mut seg = seg.lock().unwrap_or_else(|e| e.into_inner());
                    // A given-up region may already belong to another transfer.
                    self.check_receiver(deadline)?;
                    let dst = offset
                        .checked_add(start)
                        .zip(offset.checked_add(end))
                        .and_then(|(a, b)| seg.bytes_mut().get_mut(a..b))
                        .ok_or_else(|| {
                            TransferError::Protocol("region outside its segment".into())
                        })?;
                    copy_and_checksum(frame::checksum_start(layer, tag), data, dst)
                };
                self.cursor = end;
                let conn = self.conn()?;
                timeout_at(
                    deadline,
                    frame::write_shm(
                        conn,
                        layer,
                        tag,
                        start as u64,
                        data.len() as u64,
                        sum as u64,
                    ),
                )
                .await
            }
            Some(ShmTarget::Placed { seg, placement }) => {
                let runs = placement.runs(layer, tag, data.len())?;
                let sum = {
                    let mut seg = seg.lock().unwrap_or_else(|e| e.into_inner());
                    // Once the receiver has given up (deadline, failure: it closes the
                    // connection at once) these blocks may go to another sequence: check
                    // right before writing, with the segment in hand.
                    self.check_receiver(deadline)?;
                    let mem = seg.bytes_mut();
                    if runs.iter().any(|r| r.end > mem.len()) {
                        return Err(TransferError::Protocol(
                            "placement outside its segment".into(),
                        ));
                    }
                    let (mut crc, mut at) = (frame::checksum_start(layer, tag), 0);
                    for r in runs {
                        let n = r.len();
                        crc = copy_and_checksum(crc, &data[at..at + n], &mut mem[r]);
                        at += n;
                    }
                    crc
                };
                let conn = self.conn()?;
                timeout_at(
                    deadline,
                    frame::write_placed(conn, layer, tag, data.len() as u64, sum as u64),
                )
                .await
            }
            None => {
                let conn = self.conn()?;
                timeout_at(deadline, frame::write_data(conn, layer, tag, data)).await
            }
        };
        res.map_err(|_| TransferError::DeadlineExceeded("send".into()))??;
        self.frames += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Sends opaque metadata (always inline).
    pub async fn send_meta(&mut self, data: &[u8]) -> Result<()> {
        let deadline = self.deadline;
        let conn = self.conn()?;
        timeout_at(deadline, frame::write_meta(conn, data))
            .await
            .map_err(|_| TransferError::DeadlineExceeded("send meta".into()))??;
        self.frames += 1;
        Ok(())
    }

    /// Writes out everything buffered.
    pub async fn flush(&mut self) -> Result<()> {
        let deadline = self.deadline;
        let conn = self.conn()?;
        timeout_at(deadline, conn.flush())
            .await
            .map_err(|_| TransferError::DeadlineExceeded("flush".into()))??;
        Ok(())
    }

    /// Commits: the receiver verifies the frame count and answers. Returns the totals.
    pub async fn commit(mut self) -> Result<Stats> {
        let frames = self.frames;
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| TransferError::Protocol("finished".into()))?;
        let res = self
            .within("commit", async {
                frame::write_commit(&mut conn, frames).await?;
                conn.flush().await?;
                frame::read_reply(conn.get_mut())
                    .await
                    .map_err(|e| match e {
                        frame::ReplyError::Io(e) => e,
                        frame::ReplyError::Rejected(_, msg) => TransferError::Rejected(msg),
                    })
            })
            .await;
        if let Err(e) = res {
            metrics::counter!(m::FAILURES, "reason" => e.reason(), "side" => "sender").increment(1);
            return Err(e);
        }
        let stats = Stats {
            backend: self.backend,
            bytes: self.bytes,
            frames,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        m::record_transfer(self.backend, &self.addr, "send", self.bytes, stats.seconds);
        self.sender
            .pool
            .lock()
            .expect("pool lock")
            .entry(self.addr.clone())
            .or_default()
            .push(conn.into_inner());
        Ok(stats)
    }

    /// Gives up: the receiver sees the transfer fail.
    pub async fn abort(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = frame::write_abort(&mut conn).await;
            let _ = conn.flush().await;
        }
    }
}
