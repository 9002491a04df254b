//! A hostile peer on the KV port: lengths that lie, frames out of place, idle floods.
//! Each attack must fail alone — the receiver allocates nothing for it, stays up, and
//! an honest transfer beside it completes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xpyd_kv_transfer::{
    Backend, Event, Incoming, Receiver, ReceiverConfig, ReserveSpec, Sender, TransferError, frame,
};

const FP: &str = "model-a";

async fn receiver(edit: impl FnOnce(&mut ReceiverConfig)) -> Receiver {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = ReceiverConfig::new(FP);
    edit(&mut cfg);
    Receiver::start(cfg, l).unwrap()
}

fn spec(id: u64, backend: Backend, bytes: u64) -> ReserveSpec {
    ReserveSpec {
        transfer_id: id,
        backend,
        bytes,
        deadline: Duration::from_secs(20),
        placement: None,
    }
}

/// A connection from another loopback address (`127.0.0.x`), as a second host would.
async fn connect_from(ip: &str, to: &str) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    s.connect(to.parse().unwrap()).await.unwrap()
}

/// Whether the receiver closes `s` within `within` (it reads to end of stream).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(within, s.read_to_end(&mut sink)).await,
        Ok(Ok(_) | Err(_))
    )
}

/// An honest transfer of `n` bytes: it must complete whatever else is going on.
async fn honest(r: &Receiver, id: u64, n: usize) {
    let (target, inc) = r.reserve(spec(id, Backend::Tcp, n as u64)).unwrap();
    let sender = Sender::new(FP);
    let send = async {
        let mut t = sender.open(&target).await?;
        t.send_meta(b"header").await?;
        t.send(0, 7, &vec![3u8; n]).await?;
        t.commit().await
    };
    let (sent, got) = tokio::join!(send, drain(inc));
    sent.unwrap();
    assert_eq!(got.unwrap(), n, "transfer {id} delivers its bytes");
}

async fn drain(mut inc: Incoming) -> Result<usize, TransferError> {
    let mut bytes = 0;
    while let Some(ev) = inc.next().await {
        match ev? {
            Event::Chunk { data, .. } => bytes += data.len(),
            Event::Meta(_) => {}
            Event::Complete(_) => return Ok(bytes),
        }
    }
    Err(TransferError::PeerGone("ended without completion".into()))
}

/// Before a connection is attached to a reservation, nothing it announces is allocated:
/// a 2 GiB data frame, a 2 GiB metadata frame and a 64 KiB fingerprint each close the
/// connection at once (the old receiver allocated the announced length, then waited for
/// the bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lengths_before_open_allocate_nothing_and_close_the_connection() {
    let r = receiver(|_| {}).await;
    let addr = r.local_addr().to_string();
    let mut data = vec![b'D'];
    data.extend_from_slice(&0u32.to_le_bytes());
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&(1u64 << 31).to_le_bytes());
    let mut meta = vec![b'M'];
    meta.extend_from_slice(&(1u64 << 31).to_le_bytes());
    let mut open = vec![b'O'];
    open.extend_from_slice(&1u64.to_le_bytes());
    open.extend_from_slice(&1u64.to_le_bytes());
    open.extend_from_slice(&[0; 16]); // ticket
    open.extend_from_slice(&u16::MAX.to_le_bytes());
    for (what, bytes) in [("data", data), ("metadata", meta), ("fingerprint", open)] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(3)).await,
            "a {what} length before open closes the connection"
        );
        assert_eq!(r.pooled_bytes(), 0, "{what}: nothing was allocated");
    }
    honest(&r, 1, 10_000).await;
}

/// Once attached, a chunk announcing more than the reservation has left fails that
/// transfer with a protocol error before its bytes are read; another transfer of the
/// same receiver completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_beyond_the_reservation_fails_only_its_transfer() {
    let r = receiver(|_| {}).await;
    for (id, notice) in [(1u64, b'D'), (2, b'S'), (3, b'N'), (4, b'P')] {
        let backend = if notice == b'S' {
            Backend::Shm
        } else {
            Backend::Tcp
        };
        let (target, inc) = r.reserve(spec(id, backend, 1000)).unwrap();
        let mut s = TcpStream::connect(&target.addr).await.unwrap();
        frame::write_open(
            &mut s,
            id,
            target.epoch,
            &target.ticket_bytes().unwrap(),
            FP,
        )
        .await
        .unwrap();
        frame::read_reply(&mut s).await.unwrap();
        // An honest first chunk, then one that lies about its length.
        frame::write_data(&mut s, 0, 0, &[1; 600]).await.unwrap();
        let mut lie = vec![notice];
        lie.extend_from_slice(&1u32.to_le_bytes());
        lie.extend_from_slice(&0u64.to_le_bytes());
        if notice == b'S' {
            lie.extend_from_slice(&0u64.to_le_bytes()); // offset
        }
        lie.extend_from_slice(&(1u64 << 30).to_le_bytes());
        lie.extend_from_slice(&0u64.to_le_bytes()); // checksum
        s.write_all(&lie).await.unwrap();
        let t0 = Instant::now();
        let err = drain(inc).await.unwrap_err();
        assert!(
            matches!(&err, TransferError::Protocol(m) if m.contains("goes beyond the 400 bytes")),
            "frame {}: {err}",
            notice as char
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "failed at once");
        assert!(closed_within(&mut s, Duration::from_secs(3)).await);
        assert!(r.pooled_bytes() <= 1 << 20, "{}", r.pooled_bytes());
        assert_eq!(r.active(), 0);
    }
    honest(&r, 9, 100_000).await;
}

/// Metadata is bounded per transfer as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_beyond_its_bound_fails_the_transfer() {
    let r = receiver(|c| c.max_meta_bytes = 100).await;
    let (target, inc) = r.reserve(spec(1, Backend::Tcp, 10)).unwrap();
    let sender = Sender::new(FP);
    let mut t = sender.open(&target).await.unwrap();
    t.send_meta(&[0; 60]).await.unwrap();
    t.send_meta(&[0; 60]).await.unwrap();
    t.flush().await.unwrap();
    let err = drain(inc).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Protocol(m) if m.contains("metadata")),
        "{err}"
    );
}

/// An idle flood from one peer: connections beyond its cap are closed at accept, the
/// rest once the open timeout passes; an honest peer's transfer completes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_per_peer_and_closed_after_a_timeout() {
    let r = receiver(|c| {
        c.max_conns_per_peer = 4;
        c.open_timeout = Duration::from_millis(500);
    })
    .await;
    let addr = r.local_addr().to_string();
    let mut flood = Vec::new();
    for _ in 0..12 {
        flood.push(connect_from("127.0.0.2", &addr).await);
    }
    // Those beyond the cap are closed at once.
    let mut closed_now = 0;
    for s in &mut flood {
        if closed_within(s, Duration::from_millis(100)).await {
            closed_now += 1;
        }
    }
    assert_eq!(closed_now, 8, "12 connections, a cap of 4");
    honest(&r, 1, 50_000).await;
    // The rest go once the open timeout has passed.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for s in &mut flood {
        assert!(closed_within(s, Duration::from_millis(500)).await);
    }
    assert!(
        r.connections() <= 1,
        "only the honest sender's pooled connection is left: {}",
        r.connections()
    );
    // The flooding peer can connect again once its connections are gone.
    let mut again = connect_from("127.0.0.2", &addr).await;
    assert!(!closed_within(&mut again, Duration::from_millis(100)).await);
}

/// A pooled connection the receiver closed for idling is replaced by the sender, not
/// reported as a failed transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_for_idling_is_replaced() {
    let r = receiver(|c| c.keepalive = Duration::from_millis(200)).await;
    let sender = Sender::new(FP);
    for id in 0..2 {
        let (target, inc) = r.reserve(spec(id, Backend::Tcp, 100)).unwrap();
        let send = async {
            let mut t = sender.open(&target).await?;
            t.send(0, id, &[1; 100]).await?;
            t.commit().await
        };
        let (sent, got) = tokio::join!(send, drain(inc));
        sent.unwrap();
        assert_eq!(got.unwrap(), 100);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

/// A peer that knows a reservation's id and epoch (both guessable) but not its ticket is
/// refused and disconnected: it cannot attach, so it can neither write into the KV nor
/// take the reservation from the sender it was made for, which then completes. Tickets
/// are random per reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_without_the_reservations_ticket_is_refused() {
    let r = receiver(|_| {}).await;
    let (target, inc) = r.reserve(spec(7, Backend::Tcp, 1000)).unwrap();
    let (other, _inc2) = r.reserve(spec(8, Backend::Tcp, 1000)).unwrap();
    assert_ne!(target.ticket, other.ticket);
    let mut forged = target.ticket_bytes().unwrap();
    forged[15] ^= 1;
    let mut s = TcpStream::connect(&target.addr).await.unwrap();
    frame::write_open(&mut s, 7, target.epoch, &forged, FP)
        .await
        .unwrap();
    match frame::read_reply(&mut s).await {
        Err(frame::ReplyError::Rejected(_, msg)) => assert!(msg.contains("ticket"), "{msg}"),
        other => panic!("a forged ticket must be refused: {other:?}"),
    }
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    // A target with no ticket at all fails at the sender, before it connects.
    let mut bare = target.clone();
    bare.ticket.clear();
    let sender = Sender::new(FP);
    let e = sender.open(&bare).await.err().expect("no ticket, no open");
    assert!(matches!(e, TransferError::Protocol(_)), "{e}");
    // The honest sender still attaches and completes.
    let send = async {
        let mut t = sender.open(&target).await?;
        t.send(0, 1, &[5; 1000]).await?;
        t.commit().await
    };
    let (sent, got) = tokio::join!(send, drain(inc));
    sent.unwrap();
    assert_eq!(got.unwrap(), 1000);
}
