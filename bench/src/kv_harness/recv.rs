//! The receiving side of `xpyd kv-harness recv`: reserves transfers, prints each target,
//! takes the chunks into an engine or a synthetic KV pool, and prints one result line.

use super::{RecvArgs, SYNTH_BLOCK, SYNTH_ROW, SYNTHETIC, now_ns, print};
use anyhow::{Context, Result, bail};
use serde_json::json;
use std::time::Duration;
use xpyd_engine::{Engine, EngineConfig, KvHeader, ResumeState};
use xpyd_kv_transfer::{Backend, Event, Receiver, ReceiverConfig, ReserveSpec};

/// A synthetic receiver's KV pool in shared memory: one layer per chunk, each with K and
/// V pools of twice the blocks a chunk needs, and a block table of consecutive blocks or
/// (`scatter`) shuffled ones.
struct SynthPool {
    mem: Box<dyn xpyd_engine::KvMemory>,
    placement: xpyd_kv_transfer::Placement,
}

impl SynthPool {
    fn new(bytes: usize, chunk: usize, scatter: bool) -> Result<Self> {
        let row_pair = 2 * SYNTH_ROW;
        if !bytes.is_multiple_of(row_pair) || !chunk.is_multiple_of(row_pair) || chunk == 0 {
            bail!("placed synthetic transfers need sizes in multiples of {row_pair} bytes");
        }
        let layers = bytes.div_ceil(chunk).max(1);
        let need = (chunk / row_pair).div_ceil(SYNTH_BLOCK);
        let blocks = 2 * need;
        let pool_bytes = blocks * SYNTH_BLOCK * SYNTH_ROW;
        let (mem, shared) = xpyd_runtime::kv_pool::kv_memory(2 * layers * pool_bytes);
        let shared = shared.context("the synthetic KV pool needs shared memory")?;
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        if scatter {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for i in (1..ids.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ids.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        let layout = xpyd_engine::KvLayout {
            block_size: SYNTH_BLOCK,
            row_bytes: SYNTH_ROW,
            pools: (0..layers)
                .map(|l| [2 * l * pool_bytes, (2 * l + 1) * pool_bytes])
                .collect(),
            memory_bytes: mem.bytes().len(),
        };
        let placement = shared.placement(&layout, ids[..need].to_vec());
        Ok(SynthPool { mem, placement })
    }
}

/// Where the receiver puts what arrives.
enum Sink<'a> {
    /// Import into the engine as sequence `id`.
    Engine(&'a mut Engine, u64),
    /// Synthetic: copy into a buffer standing in for KV blocks (tcp, staged shm, UCX).
    Buffer(&'a mut [u8], usize),
    /// Synthetic placed: verify rows where the sender wrote them; the ranges, in order.
    Placed(&'a SynthPool, Vec<std::ops::Range<usize>>),
}

/// Receives `a.repeat` transfers; with an engine config (`--decode`), imports each into
/// the engine and decodes to the end.
pub(super) async fn recv(a: RecvArgs, engine: Option<EngineConfig>) -> Result<()> {
    let shm_capable = matches!(a.backend, Backend::Shm | Backend::Auto) && !a.staged;
    // With a model, the engine's pools go in shared memory for placed transfers.
    let mut engine_pool = None;
    let mut engine = if let Some(cfg) = engine {
        let make: Option<Box<xpyd_engine::KvMemoryFactory<'_>>> = shm_capable.then(|| {
            Box::new(|bytes| {
                let (mem, pool) = xpyd_runtime::kv_pool::kv_memory(bytes);
                engine_pool = pool;
                Ok(mem)
            }) as Box<xpyd_engine::KvMemoryFactory<'_>>
        });
        Some(Engine::load_with_kv_memory(cfg, make)?)
    } else {
        None
    };
    let (fingerprint, bytes) = match &engine {
        Some(e) => {
            let m = e.model_config();
            let row = m.kv_dim() as u64 * e.kv_dtype().size() as u64;
            (
                e.fingerprint().to_string(),
                2 * row * a.prompt_tokens * m.n_layer as u64,
            )
        }
        None => (SYNTHETIC.to_string(), a.bytes),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut rc = ReceiverConfig::new(fingerprint);
    rc.tls = super::receiver_tls(a.tls_dir.as_deref())?;
    let receiver = Receiver::start(rc, listener)?;
    let synth_pool = match (&engine, shm_capable) {
        (None, true) => Some(SynthPool::new(bytes as usize, a.chunk, a.scatter)?),
        _ => None,
    };
    // Other synthetic transfers copy every chunk into this buffer, standing in for KV
    // blocks; it is touched once up front, as a running engine's KV pool is.
    let mut dest = vec![
        1u8;
        if engine.is_some() || synth_pool.is_some() {
            0
        } else {
            bytes as usize
        }
    ];
    for round in 1..=a.repeat.max(1) {
        let placement = match (engine.as_mut(), &engine_pool, &synth_pool) {
            (Some(e), Some(pool), _) => {
                let table = e.reserve_import(round, a.prompt_tokens as usize)?;
                Some(pool.placement(&e.kv_layout(), table))
            }
            (None, _, Some(p)) => Some(p.placement.clone()),
            _ => None,
        };
        let spec = ReserveSpec {
            transfer_id: round,
            backend: a.backend,
            bytes,
            deadline: Duration::from_millis(a.deadline_ms),
            placement,
        };
        let (target, incoming) = receiver.reserve(spec)?;
        print(serde_json::to_value(&target)?);
        let t0 = now_ns();
        let sink = match (engine.as_mut(), &synth_pool) {
            (Some(e), _) => Sink::Engine(e, round),
            (None, Some(p)) => Sink::Placed(p, Vec::new()),
            (None, None) => Sink::Buffer(&mut dest, 0),
        };
        let outcome = receive_one(incoming, sink).await;
        let end_ns = now_ns();
        let mut result = match outcome {
            Ok(r) => r,
            Err(e) => {
                let kind = e
                    .downcast_ref::<xpyd_kv_transfer::TransferError>()
                    .map(|t| t.reason())
                    .unwrap_or("other");
                print(json!({"ok": false, "error": format!("{e:#}"), "kind": kind,
                    "elapsed_ms": (end_ns - t0) / 1_000_000, "active_after": receiver.active()}));
                return Ok(());
            }
        };
        result["active_after"] = json!(receiver.active());
        if let Some(e) = engine.as_mut() {
            e.finish_import(round)?;
            let state = e.resume_state(round)?;
            let mut tokens = state.generated().to_vec();
            if state.finish.is_none() {
                e.run_to_end(round, &mut |ev| tokens.push(ev.token))?;
            }
            e.remove(round);
            result["tokens"] = json!(tokens);
        }
        print(result);
    }
    Ok(())
}

/// Receives one transfer into `sink`; returns the result line.
async fn receive_one(
    mut incoming: xpyd_kv_transfer::Incoming,
    mut sink: Sink<'_>,
) -> Result<serde_json::Value> {
    let (mut metas, mut chunks) = (0usize, 0u64);
    let mut meta = String::new();
    // Time the receiving thread spends taking chunks in (copying or verifying them): on
    // a decode worker this is engine-thread time taken from decode steps.
    let mut consume = Duration::ZERO;
    loop {
        let Some(ev) = incoming.next().await else {
            bail!("transfer ended without outcome")
        };
        match ev? {
            Event::Meta(m) => {
                let m = m.verified()?;
                match &mut sink {
                    Sink::Engine(e, id) if metas == 0 => {
                        let (h, _) = KvHeader::decode(m).map_err(|e| anyhow::anyhow!("{e}"))?;
                        e.begin_import(*id, &h)?;
                    }
                    Sink::Engine(e, id) => {
                        e.import_resume(*id, serde_json::from_slice::<ResumeState>(m)?)?
                    }
                    _ => meta = String::from_utf8_lossy(m).into_owned(),
                }
                metas += 1;
            }
            Event::Chunk { layer, tag, data } => {
                chunks += 1;
                let took = std::time::Instant::now();
                match &mut sink {
                    // Straight into the KV blocks, verified while copying, or (placed)
                    // verified where the sender wrote them.
                    Sink::Engine(e, id) => {
                        xpyd_runtime::kv_pool::import_chunk(e, *id, layer, tag, &data)?;
                    }
                    Sink::Buffer(dest, at) => {
                        let mut reader = data.reader();
                        let end = *at + data.len();
                        if end > dest.len() {
                            bail!("received more than the {} bytes reserved", dest.len());
                        }
                        reader.copy_to(0, &mut dest[*at..end])?;
                        reader.finish()?;
                        *at = end;
                    }
                    Sink::Placed(pool, seen) => {
                        let mut reader = data.reader();
                        let mem = pool.mem.bytes();
                        let mut off = 0;
                        for r in pool.placement.runs(layer, tag, data.len())? {
                            reader.check_in_place(off, &mem[r.clone()])?;
                            off += r.len();
                            seen.push(r);
                        }
                        reader.finish()?;
                    }
                }
                consume += took.elapsed();
            }
            Event::Complete(stats) => {
                // The transfer is complete here; the digest below is for checking only.
                let end_ns = now_ns();
                let mut r = json!({"ok": true, "backend": stats.backend.name(), "bytes": stats.bytes, "chunks": chunks, "end_ns": end_ns,
                    "consume_us": consume.as_micros() as u64});
                match &sink {
                    Sink::Buffer(dest, at) => {
                        r["xxh3"] = json!(xxhash_rust::xxh3::xxh3_64(&dest[..*at]));
                    }
                    Sink::Placed(pool, seen) => {
                        let mem = pool.mem.bytes();
                        let mut h = xxhash_rust::xxh3::Xxh3::new();
                        seen.iter().for_each(|r| h.update(&mem[r.clone()]));
                        r["xxh3"] = json!(h.digest());
                        r["placed"] = json!(true);
                    }
                    Sink::Engine(..) => {}
                }
                if !matches!(sink, Sink::Engine(..)) {
                    r["meta"] = json!(meta);
                }
                return Ok(r);
            }
        }
    }
}
