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
        placement: None,
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
            .reserve(spec(id, Backend::Tcp, 100, Duration::from_secs(10)))
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
        .reserve(spec(7, Backend::Tcp, 2, Duration::from_secs(10)))
        .unwrap();
    // The reservation is released and the id reused: the old target is fenced off.
    let (new, inc) = r
        .reserve(spec(7, Backend::Tcp, 2, Duration::from_secs(10)))
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
        .reserve(spec(1, Backend::Tcp, 5000, Duration::from_secs(30)))
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
        .reserve(spec(1, Backend::Tcp, 5_000_000, Duration::from_secs(30)))
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
        .reserve(spec(1, Backend::Tcp, 64, Duration::from_secs(10)))
        .unwrap();
    let mut raw = tokio::net::TcpStream::connect(&target.addr).await.unwrap();
    frame::write_open(
        &mut raw,
        1,
        target.epoch,
        &target.ticket_bytes().unwrap(),
        FP,
    )
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

/// A receiver-side KV pool in shared memory, laid out like the engine's: per layer a K
/// and a V pool of `blocks × block_size` rows.
struct Pool {
    seg: xpyd_kv_transfer::shm::Segment,
    placement: xpyd_kv_transfer::Placement,
}

fn pool(layers: usize, block_size: u32, row: u64, blocks: u32, table: Vec<u32>) -> Pool {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let pool_bytes = u64::from(blocks) * u64::from(block_size) * row;
    let len = 2 * layers as u64 * pool_bytes;
    let name = format!(
        "xpyd-test-kvpool-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let seg = xpyd_kv_transfer::shm::Segment::create_committed(
        std::path::Path::new(xpyd_kv_transfer::shm::SHM_DIR),
        &name,
        len,
    )
    .unwrap();
    let placement = xpyd_kv_transfer::Placement {
        path: seg.path().display().to_string(),
        len: seg.len() as u64,
        block_size,
        row_bytes: row,
        pools: (0..layers as u64)
            .map(|l| [2 * l * pool_bytes, (2 * l + 1) * pool_bytes])
            .collect(),
        blocks: table,
    };
    Pool { seg, placement }
}

fn tag(start: usize, count: usize) -> u64 {
    (start as u64) << 32 | count as u64
}

/// Sends `chunks` (layer, start, count, bytes) as a placed transfer and checks each one in
/// place on arrival; returns the receiver's outcome.
async fn placed_round_trip(
    pool: &Pool,
    chunks: &[(u32, usize, usize, Vec<u8>)],
    corrupt: Option<usize>,
) -> Result<Backend, TransferError> {
    let r = receiver().await;
    let bytes = chunks.iter().map(|c| c.3.len() as u64).sum();
    let mut sp = spec(1, Backend::Auto, bytes, Duration::from_secs(20));
    sp.placement = Some(pool.placement.clone());
    let (target, mut inc) = r.reserve(sp).unwrap();
    assert!(
        target.shm.is_none(),
        "no staging region for a placed transfer"
    );
    let sender = Sender::new(FP);
    let send = async {
        let mut t = sender.open(&target).await?;
        for (l, start, count, d) in chunks {
            t.send(*l, tag(*start, *count), d).await?;
            t.flush().await?;
        }
        t.commit().await
    };
    let recv = async {
        let mut seen = 0;
        while let Some(ev) = inc.next().await {
            match ev? {
                Event::Chunk { layer, tag, data } => {
                    assert!(data.is_placed());
                    assert!(data.to_vec().is_err(), "placed rows are not copied out");
                    let runs = pool.placement.runs(layer, tag, data.len())?;
                    if corrupt == Some(seen) {
                        let mut w = xpyd_kv_transfer::shm::Segment::open(
                            pool.seg.path(),
                            pool.seg.len() as u64,
                        )?;
                        w.bytes_mut()[runs[0].start] ^= 0x40;
                    }
                    let mut reader = data.reader();
                    let mut off = 0;
                    for run in runs {
                        let n = run.len();
                        reader.check_in_place(off, &pool.seg.bytes()[run])?;
                        off += n;
                    }
                    reader.finish()?;
                    seen += 1;
                }
                Event::Meta(_) => {}
                Event::Complete(s) => return Ok(s.backend),
            }
        }
        Err(TransferError::PeerGone("ended without completion".into()))
    };
    let (_, got) = tokio::join!(send, recv);
    got
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Random geometry, block tables and chunk splits: every row lands where the
    /// placement says, verified in place, byte-exact.
    #[test]
    fn placed_transfers_land_in_the_blocks_byte_exact(
        layers in 1usize..4,
        block_size in 1u32..20,
        row_words in 1u64..64,
        tokens in 1usize..200,
        cuts in proptest::collection::vec(1usize..200, 0..4),
        seed in any::<u64>(),
    ) {
        let row = row_words * 4;
        let need = tokens.div_ceil(block_size as usize) as u32;
        let blocks = need + 3;
        // A shuffled table: rows scatter over the pool as they do in a running engine.
        let mut ids: Vec<u32> = (0..blocks).collect();
        let mut x = seed | 1;
        for i in (1..ids.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            ids.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let table = ids[..need as usize].to_vec();
        let mut p = pool(layers, block_size, row, blocks, table.clone());
        // Bytes no chunk is meant for must keep this value.
        p.seg.bytes_mut().fill(0xA5);
        let mut bounds: Vec<usize> = cuts.into_iter().filter(|c| *c < tokens).collect();
        bounds.push(0);
        bounds.push(tokens);
        bounds.sort_unstable();
        bounds.dedup();
        let mut chunks = Vec::new();
        for w in bounds.windows(2) {
            for l in 0..layers as u32 {
                let n = w[1] - w[0];
                let d: Vec<u8> = (0..2 * n * row as usize)
                    .map(|i| (i as u64 ^ seed ^ (u64::from(l) << 8) ^ (w[0] as u64) << 16) as u8)
                    .collect();
                chunks.push((l, w[0], n, d));
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let used = rt.block_on(placed_round_trip(&p, &chunks, None)).unwrap();
        prop_assert_eq!(used, Backend::Shm);
        // Nothing outside the chunks' runs was written.
        let mem = p.seg.bytes();
        let mut ours = vec![false; mem.len()];
        for (l, start, n, d) in &chunks {
            for r in p.placement.runs(*l, tag(*start, *n), d.len()).unwrap() {
                ours[r].iter_mut().for_each(|b| *b = true);
            }
        }
        prop_assert!(mem.iter().zip(&ours).all(|(b, o)| *o || *b == 0xA5));
        // Read every row back through the engine's formula.
        let (bs, row) = (block_size as usize, row as usize);
        for (l, start, n, d) in &chunks {
            for (kv, half) in d.chunks(n * row).enumerate() {
                for (i, want) in half.chunks(row).enumerate() {
                    let pos = start + i;
                    let at = p.placement.pools[*l as usize][kv] as usize
                        + (table[pos / bs] as usize * bs + pos % bs) * row;
                    prop_assert_eq!(&mem[at..at + row], want);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_placed_rows_is_detected() {
    let p = pool(2, 16, 64, 8, vec![5, 2, 7]);
    let chunks: Vec<_> = (0..2)
        .map(|l| (l, 0, 40, vec![l as u8 + 1; 2 * 40 * 64]))
        .collect();
    let err = placed_round_trip(&p, &chunks, Some(1)).await.unwrap_err();
    assert!(matches!(err, TransferError::Checksum(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_chunks_that_do_not_fit_are_refused() {
    let p = pool(1, 16, 64, 4, vec![1, 3]);
    // Rows beyond the table, a wrong length, a layer that does not exist: the sender
    // refuses before writing anything.
    for (layer, start, count, len) in [(0, 20, 20, 2 * 20 * 64), (0, 0, 10, 100), (3, 0, 1, 128)] {
        let err = p.placement.runs(layer, tag(start, count), len).unwrap_err();
        assert!(matches!(err, TransferError::Protocol(_)), "{err}");
    }
    let r = receiver().await;
    let mut sp = spec(1, Backend::Shm, 0, Duration::from_secs(10));
    sp.placement = Some(p.placement.clone());
    let (target, _inc) = r.reserve(sp).unwrap();
    let mut t = Sender::new(FP).open(&target).await.unwrap();
    assert!(t.send(0, tag(20, 20), &vec![0; 2 * 20 * 64]).await.is_err());
    // A placed notice for a reservation without a placement is a protocol error.
    let (plain, inc) = r
        .reserve(spec(2, Backend::Shm, 1 << 16, Duration::from_secs(10)))
        .unwrap();
    let mut forged = plain.clone();
    forged.placement = Some(p.placement.clone());
    let mut t = Sender::new(FP).open(&forged).await.unwrap();
    t.send(0, tag(0, 4), &vec![1; 2 * 4 * 64]).await.unwrap();
    t.flush().await.unwrap();
    let err = drain(inc).await.unwrap_err();
    assert!(matches!(err, TransferError::Protocol(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_is_ignored_for_tcp() {
    let p = pool(1, 16, 64, 4, vec![0]);
    let r = receiver().await;
    let mut sp = spec(1, Backend::Tcp, 2 * 16 * 64, Duration::from_secs(10));
    sp.placement = Some(p.placement.clone());
    let (target, inc) = r.reserve(sp).unwrap();
    assert!(target.placement.is_none());
    let send = async {
        let mut t = Sender::new(FP).open(&target).await?;
        t.send(0, tag(0, 16), &vec![9; 2 * 16 * 64]).await?;
        t.commit().await
    };
    let (sent, got) = tokio::join!(send, drain(inc));
    sent.unwrap();
    let (got, used) = got.unwrap();
    assert_eq!(used, Backend::Tcp);
    assert_eq!(got[0].2, vec![9; 2 * 16 * 64]);
}

proptest! {
    /// Placements come from a peer: any values give ranges inside the segment that add up
    /// to the chunk, or an error — never a panic.
    #[test]
    fn any_placement_and_tag_give_ranges_inside_the_segment_or_an_error(
        len in any::<u64>(),
        block_size in any::<u32>(),
        row_bytes in prop_oneof![any::<u64>(), 1u64..4096],
        pools in proptest::collection::vec((prop_oneof![any::<u64>(), 0u64..1 << 20], 0u64..1 << 20), 0..3),
        blocks in proptest::collection::vec(prop_oneof![any::<u32>(), 0u32..64], 0..8),
        layer in 0u32..4,
        tag in prop_oneof![any::<u64>(), (0u64..64, 0u64..64).prop_map(|(s, c)| s << 32 | c)],
        bytes in prop_oneof![any::<usize>(), 0usize..1 << 16],
    ) {
        let p = xpyd_kv_transfer::Placement {
            path: "/dev/shm/xpyd-x".into(),
            len,
            block_size,
            row_bytes,
            pools: pools.iter().map(|(k, v)| [*k, *v]).collect(),
            blocks,
        };
        if let Ok(runs) = p.runs(layer, tag, bytes) {
            prop_assert!(runs.iter().all(|r| r.start <= r.end && r.end as u64 <= len));
            prop_assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_sender_never_writes_after_its_deadline() {
    let mut p = pool(1, 16, 64, 4, vec![1, 2]);
    p.seg.bytes_mut().fill(0x5A);
    let r = receiver().await;
    let mut sp = spec(1, Backend::Shm, 0, Duration::from_millis(300));
    sp.placement = Some(p.placement.clone());
    let (target, _inc) = r.reserve(sp).unwrap();
    let mut t = Sender::new(FP).open(&target).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = t
        .send(0, tag(0, 20), &vec![1; 2 * 20 * 64])
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::DeadlineExceeded(_)), "{err}");
    assert!(p.seg.bytes().iter().all(|b| *b == 0x5A), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_closes_the_reservation_and_tells_whether_a_sender_attached() {
    let r = receiver().await;
    let (target, inc) = r
        .reserve(spec(1, Backend::Tcp, 10, Duration::from_secs(10)))
        .unwrap();
    assert!(!inc.fence().close(), "nobody attached");
    let err = Sender::new(FP).open(&target).await.err().unwrap();
    assert!(matches!(err, TransferError::StaleEpoch { .. }), "{err}");
    let (target, inc) = r
        .reserve(spec(2, Backend::Tcp, 10, Duration::from_secs(10)))
        .unwrap();
    let _t = Sender::new(FP).open(&target).await.unwrap();
    assert!(inc.fence().close(), "a sender attached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_write_only_into_this_projects_segments() {
    assert!(xpyd_kv_transfer::target::is_segment_path(
        "/dev/shm/xpyd-kvpool-1-ab"
    ));
    for bad in [
        "/etc/passwd",
        "/dev/shm/other",
        "/dev/shm/sub/xpyd-x",
        "/tmp/xpyd-x",
        "/dev/shm/xpyd-..",
    ] {
        assert!(!xpyd_kv_transfer::target::is_segment_path(bad), "{bad}");
    }
    let p = pool(1, 16, 64, 4, vec![0]);
    let r = receiver().await;
    let mut sp = spec(1, Backend::Shm, 0, Duration::from_secs(10));
    sp.placement = Some(p.placement.clone());
    let (mut target, _inc) = r.reserve(sp).unwrap();
    target.placement.as_mut().unwrap().path = "/tmp/not-a-segment".into();
    let err = Sender::new(FP).open(&target).await.err().unwrap();
    assert!(matches!(err, TransferError::Protocol(_)), "{err}");
}

/// A placed transfer whose first chunk arrived: the pool, the receiver (kept alive),
/// the consumer's end and the sender's.
async fn placed_after_one_chunk() -> (Pool, Receiver, Incoming, xpyd_kv_transfer::Transfer) {
    let p = pool(2, 16, 64, 4, vec![1, 2]);
    let r = receiver().await;
    let mut sp = spec(1, Backend::Shm, 2 * 2 * 20 * 64, Duration::from_secs(20));
    sp.placement = Some(p.placement.clone());
    let (target, mut inc) = r.reserve(sp).unwrap();
    let mut t = Sender::new(FP).open(&target).await.unwrap();
    t.send(0, tag(0, 20), &vec![1; 2 * 20 * 64]).await.unwrap();
    t.flush().await.unwrap();
    assert!(matches!(inc.next().await, Some(Ok(Event::Chunk { .. }))));
    (p, r, inc, t)
}

/// Once the receiver has given up, the sender's next chunk fails and writes nothing.
async fn next_write_is_refused(p: &mut Pool, t: &mut xpyd_kv_transfer::Transfer) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.seg.bytes_mut().fill(0x5A);
    let err = t
        .send(1, tag(0, 20), &vec![2; 2 * 20 * 64])
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::PeerGone(_)), "{err}");
    assert!(p.seg.bytes().iter().all(|b| *b == 0x5A), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_sender_writes_nothing_once_the_receiver_dropped_the_transfer() {
    let (mut p, _r, inc, mut t) = placed_after_one_chunk().await;
    // The consumer gives up while the sender is between chunks (e.g. still computing).
    drop(inc);
    next_write_is_refused(&mut p, &mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_fence_ends_an_attached_transfer_before_the_next_write() {
    let (mut p, _r, mut inc, mut t) = placed_after_one_chunk().await;
    // The engine drops the import while whoever holds `inc` has not noticed yet.
    assert!(inc.fence().close(), "a sender had attached");
    next_write_is_refused(&mut p, &mut t).await;
    assert!(
        matches!(inc.next().await, Some(Err(_))),
        "the consumer sees the end"
    );
}
