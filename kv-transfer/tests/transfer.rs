//! In-process transfers over real loopback sockets and shared memory.

use proptest::prelude::*;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use xpyd_kv_transfer::{
    Backend, Event, Incoming, Receiver, ReceiverConfig, ReserveSpec, Sender, TransferError, frame,
};

const FP: &str = "model-a";

/// Every backend this build can run here.
fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Tcp, Backend::Shm];
    if cfg!(feature = "ucx") {
        b.push(Backend::Ucx);
    }
    b
}

async fn receiver() -> Receiver {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Receiver::start(ReceiverConfig::new(FP), l).unwrap()
}

fn spec(id: u64, backend: Backend, bytes: u64, deadline: Duration) -> ReserveSpec {
    ReserveSpec {
        transfer_id: id,
        backend,
        bytes,
        deadline,
    }
}

/// Drains an incoming transfer into (layer, tag, bytes) triples.
async fn drain(mut inc: Incoming) -> Result<(Vec<(u32, u64, Vec<u8>)>, Backend), TransferError> {
    let mut got = Vec::new();
    while let Some(ev) = inc.next().await {
        match ev? {
            Event::Chunk { layer, tag, data } => got.push((layer, tag, data.to_vec()?)),
            Event::Meta(m) => got.push((u32::MAX, 0, m.to_vec()?)),
            Event::Complete(s) => return Ok((got, s.backend)),
        }
    }
    Err(TransferError::PeerGone("ended without completion".into()))
}

fn payloads(layers: u32, chunks: usize, size: usize, seed: u8) -> Vec<(u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for c in 0..chunks {
        for l in 0..layers {
            let data: Vec<u8> = (0..size)
                .map(|i| {
                    (i as u8)
                        .wrapping_mul(31)
                        .wrapping_add(seed ^ l as u8 ^ c as u8)
                })
                .collect();
            out.push((l, c as u64, data));
        }
    }
    out
}

async fn round_trip(
    backend: Backend,
    items: Vec<(u32, u64, Vec<u8>)>,
) -> (Vec<(u32, u64, Vec<u8>)>, Backend) {
    let r = receiver().await;
    let total: u64 = items.iter().map(|(_, _, d)| d.len() as u64).sum();
    let (target, inc) = r
        .reserve(spec(1, backend, total, Duration::from_secs(20)))
        .unwrap();
    let sender = Sender::new(FP);
    let send = async {
        let mut t = sender.open(&target).await?;
        t.send_meta(b"header").await?;
        for (l, tag, d) in &items {
            t.send(*l, *tag, d).await?;
            t.flush().await?;
        }
        t.commit().await
    };
    let (sent, got) = tokio::join!(send, drain(inc));
    let stats = sent.unwrap();
    assert_eq!(stats.bytes, total);
    let (mut got, used) = got.unwrap();
    assert_eq!(got.remove(0), (u32::MAX, 0, b"header".to_vec()));
    assert_eq!(
        r.active(),
        0,
        "completed transfers release their reservation"
    );
    (got, used)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_transfers_round_trip_byte_exact(
        layers in 1u32..40,
        chunks in 1usize..4,
        size in 0usize..40_000,
        seed in any::<u8>(),
        which in 0usize..16,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let items = payloads(layers, chunks, size, seed);
        let built = backends();
        let backend = built[which % built.len()];
        let (got, used) = rt.block_on(round_trip(backend, items.clone()));
        prop_assert_eq!(used, backend);
        prop_assert_eq!(got, items);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_shared_memory_on_one_host() {
    let (got, used) = round_trip(Backend::Auto, payloads(3, 2, 1000, 1)).await;
    assert_eq!(used, Backend::Shm);
    assert_eq!(got.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_across_transfers() {
    let r = receiver().await;
    let sender = Sender::new(FP);
    for id in 0..3 {
        let (target, inc) = r
            .reserve(spec(id, Backend::Tcp, 0, Duration::from_secs(10)))
            .unwrap();
        let send = async {
            let mut t = sender.open(&target).await?;
            t.send(0, id, &[id as u8; 100]).await?;
            t.commit().await
        };
        let (s, g) = tokio::join!(send, drain(inc));
        s.unwrap();
        assert_eq!(g.unwrap().0, vec![(0, id, vec![id as u8; 100])]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_is_rejected() {
    let r = receiver().await;
    let (old, _inc_old) = r
        .reserve(spec(7, Backend::Tcp, 0, Duration::from_secs(10)))
        .unwrap();
    // The reservation is released and the id reused: the old target is fenced off.
    let (new, inc) = r
        .reserve(spec(7, Backend::Tcp, 0, Duration::from_secs(10)))
        .unwrap();
    assert!(new.epoch > old.epoch);
    let sender = Sender::new(FP);
    let err = sender
        .open(&old)
        .await
        .err()
        .expect("stale epoch must fail");
    assert!(
        matches!(err, TransferError::StaleEpoch { transfer_id: 7, .. }),
        "{err}"
    );
    // The current epoch still works (over the same pooled connection).
    let mut t = sender.open(&new).await.unwrap();
    t.send(0, 0, b"ok").await.unwrap();
    let (s, g) = tokio::join!(t.commit(), drain(inc));
    s.unwrap();
    g.unwrap();
    // A reservation already attached cannot be opened twice.
    let (again, _inc) = r
        .reserve(spec(8, Backend::Tcp, 0, Duration::from_secs(10)))
        .unwrap();
    let _first = sender.open(&again).await.unwrap();
    assert!(matches!(
        sender.open(&again).await.err().unwrap(),
        TransferError::StaleEpoch { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fingerprint_is_rejected() {
    let r = receiver().await;
    let (target, _inc) = r
        .reserve(spec(1, Backend::Tcp, 0, Duration::from_secs(10)))
        .unwrap();
    let err = Sender::new("model-b").open(&target).await.err().unwrap();
    match err {
        TransferError::FingerprintMismatch { expected, found } => {
            assert_eq!(expected, FP);
            assert_eq!(found, "model-b");
        }
        e => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_sends_fails_at_the_deadline_and_frees() {
    let r = receiver().await;
    let (_target, mut inc) = r
        .reserve(spec(1, Backend::Shm, 4096, Duration::from_millis(300)))
        .unwrap();
    let t0 = Instant::now();
    let err = inc.next().await.unwrap().unwrap_err();
    assert!(matches!(err, TransferError::DeadlineExceeded(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(r.active(), 0);
    assert!(inc.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_that_disappears_fails_the_receiver_promptly() {
    let r = receiver().await;
    let (target, inc) = r
        .reserve(spec(1, Backend::Tcp, 0, Duration::from_secs(30)))
        .unwrap();
    let sender = Sender::new(FP);
    let mut t = sender.open(&target).await.unwrap();
    t.send(0, 0, &[1; 5000]).await.unwrap();
    t.flush().await.unwrap();
    drop(t); // connection closed without commit
    let t0 = Instant::now();
    let err = drain(inc).await.unwrap_err();
    assert!(matches!(err, TransferError::PeerGone(_)), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "well before the 30 s deadline"
    );
    assert_eq!(r.active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_that_gives_up_fails_the_sender() {
    let r = receiver().await;
    let (target, inc) = r
        .reserve(spec(1, Backend::Tcp, 0, Duration::from_secs(30)))
        .unwrap();
    let sender = Sender::new(FP);
    let mut t = sender.open(&target).await.unwrap();
    drop(inc);
    let res = async {
        for i in 0..50 {
            t.send(0, i, &[0; 100_000]).await?;
            t.flush().await?;
        }
        t.commit().await
    }
    .await;
    assert!(
        res.is_err(),
        "a sender must not succeed into a released reservation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_detected() {
    let r = receiver().await;
    let (target, inc) = r
        .reserve(spec(1, Backend::Tcp, 0, Duration::from_secs(10)))
        .unwrap();
    let mut raw = tokio::net::TcpStream::connect(&target.addr).await.unwrap();
    frame::write_open(&mut raw, 1, target.epoch, FP)
        .await
        .unwrap();
    frame::read_reply(&mut raw).await.unwrap();
    let mut buf = Vec::new();
    frame::write_data(&mut buf, 0, 0, &[7; 64]).await.unwrap();
    buf[30] ^= 0x40; // a payload byte flips on the way
    raw.write_all(&buf).await.unwrap();
    let err = drain(inc).await.unwrap_err();
    assert!(matches!(err, TransferError::Checksum(_)), "{err}");
    assert_eq!(r.active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_fails_cleanly_without_a_gpu() {
    let r = receiver().await;
    let err = r
        .reserve(spec(1, Backend::Nccl, 100, Duration::from_secs(5)))
        .err()
        .expect("no GPU here");
    assert!(matches!(err, TransferError::Unavailable(_)), "{err}");
    let msg = err.to_string();
    if cfg!(feature = "nccl") {
        assert!(msg.contains("NCCL/CUDA not available"), "{msg}");
    } else {
        assert!(msg.contains("not built"), "{msg}");
    }
    assert_eq!(r.active(), 0);
    // A sender handed an NCCL target refuses it the same way (no panic from cudarc).
    let (mut target, _inc) = r
        .reserve(spec(2, Backend::Tcp, 0, Duration::from_secs(5)))
        .unwrap();
    target.backend = Backend::Nccl;
    target.nccl_id = Some("00".repeat(128));
    let err = Sender::new(FP).open(&target).await.err().unwrap();
    assert!(matches!(err, TransferError::Unavailable(_)), "{err}");
}

#[cfg(feature = "ucx")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ucx_round_trips_and_is_offered_by_auto() {
    let (got, used) = round_trip(Backend::Ucx, payloads(4, 3, 100_000, 9)).await;
    assert_eq!(used, Backend::Ucx);
    assert_eq!(got, payloads(4, 3, 100_000, 9));
    let r = receiver().await;
    let (target, _inc) = r
        .reserve(spec(1, Backend::Auto, 10, Duration::from_secs(5)))
        .unwrap();
    assert!(
        target.ucx_addr.is_some(),
        "auto offers UCX when it is built"
    );
    assert_eq!(
        Sender::new(FP).choose(&target).unwrap(),
        Backend::Shm,
        "same host still prefers shm"
    );
}

#[cfg(not(feature = "ucx"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ucx_is_unavailable_when_not_built() {
    let r = receiver().await;
    let err = r
        .reserve(spec(1, Backend::Ucx, 10, Duration::from_secs(5)))
        .err()
        .unwrap();
    assert!(matches!(err, TransferError::Unavailable(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_shared_memory_is_detected_by_the_reader() {
    let r = receiver().await;
    let (target, mut inc) = r
        .reserve(spec(1, Backend::Shm, 1 << 20, Duration::from_secs(10)))
        .unwrap();
    let sender = Sender::new(FP);
    let mut t = sender.open(&target).await.unwrap();
    t.send(2, 9, &vec![5u8; 300_000]).await.unwrap();
    t.flush().await.unwrap();
    // Another writer flips a byte in the segment after the sender wrote it.
    let d = target.shm.clone().unwrap();
    let mut seg =
        xpyd_kv_transfer::shm::Segment::open(std::path::Path::new(&d.path), d.len).unwrap();
    seg.bytes_mut()[d.offset as usize + 12_345] ^= 0x80;
    let Some(Ok(Event::Chunk { data, .. })) = inc.next().await else {
        panic!("expected a chunk")
    };
    let mut dst = vec![0u8; data.len()];
    let mut reader = data.reader();
    reader.copy_to(0, &mut dst).unwrap();
    let err = reader.finish().unwrap_err();
    assert!(matches!(err, TransferError::Checksum(_)), "{err}");
    assert!(matches!(data.verified(), Err(TransferError::Checksum(_))));
    assert!(data.to_vec().is_err());
    // Readers must consume the payload in order and completely.
    let mut partial = data.reader();
    assert!(
        partial.copy_to(10, &mut dst[..5]).is_err(),
        "gaps are refused"
    );
    partial.copy_to(0, &mut dst[..5]).unwrap();
    assert!(partial.finish().is_err(), "a partial read is not accepted");
}

/// Regression: two receivers in one process used to hand out the same epochs, so their
/// concurrent UCX transfers (tags `epoch << 24 | index`, matched by the process's single
/// UCX worker) could take each other's data and stall.
#[tokio::test]
async fn receivers_in_one_process_never_share_an_epoch() {
    let (a, b) = (receiver().await, receiver().await);
    let mut seen = std::collections::HashSet::new();
    for id in 0..4 {
        for r in [&a, &b] {
            let (t, _inc) = r
                .reserve(spec(id, Backend::Tcp, 0, Duration::from_secs(5)))
                .unwrap();
            assert!(seen.insert(t.epoch), "epoch {} handed out twice", t.epoch);
        }
    }
}
