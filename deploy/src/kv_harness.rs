//! `xpyd kv-harness`: the two processes of a KV transfer, for tests and `xpyd bench kv`.
//! Until the cluster brings the workers, this is how a prefill in one process streams its
//! KV to a decode in another. Each command prints JSON lines on stdout: `recv` first its
//! transfer target, then one result line; `send` one result line.

use crate::cli::EngineArgs;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xpyd_engine::{Engine, KvHeader, ResumeState, SamplingParams};
use xpyd_kv_transfer::{
    Backend, Event, Receiver, ReceiverConfig, ReserveSpec, Sender, TransferTarget,
};

/// Fingerprint of synthetic (non-model) transfers.
const SYNTHETIC: &str = "synthetic";

/// Harness commands.
#[derive(Debug, Subcommand)]
pub enum HarnessCmd {
    /// Reserve one transfer, print its target, receive it (and decode, with a model).
    Recv(RecvArgs),
    /// Send one transfer to a target (synthetic bytes, or a real prefill with a model).
    Send(SendArgs),
    /// Baseline: accept one raw TCP stream and read N bytes into a buffer.
    RawRecv {
        /// Bytes to read per round.
        #[arg(long)]
        bytes: u64,
        /// Rounds over the one connection.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
    },
    /// Baseline: write N bytes over raw TCP to `addr`.
    RawSend {
        /// Receiver address.
        #[arg(long)]
        addr: String,
        /// Bytes to write per round.
        #[arg(long)]
        bytes: u64,
        /// Rounds over the one connection.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
    },
}

/// Flags of `recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Backend to offer.
    #[arg(long, default_value = "auto")]
    pub backend: Backend,
    /// Payload bytes expected (synthetic; with a model it is computed from the prompt).
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    /// Prompt tokens expected (with --decode: sizes the reservation; over shm the blocks
    /// are reserved up front, so it must be the prompt's exact length).
    #[arg(long, default_value_t = 0)]
    pub prompt_tokens: u64,
    /// Deadline for each transfer.
    #[arg(long, default_value_t = 30_000)]
    pub deadline_ms: u64,
    /// Transfers to receive one after another (a target line and a result line each).
    #[arg(long, default_value_t = 1)]
    pub repeat: u64,
    /// Import into an engine and decode to the end.
    #[arg(long)]
    pub decode: bool,
    /// Synthetic chunk size the sender uses (each chunk is one layer's K and V rows).
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk: usize,
    /// Stage shm transfers through a region and copy them into the KV blocks, instead of
    /// having the sender write the blocks themselves (the placed default).
    #[arg(long)]
    pub staged: bool,
    /// Synthetic placed transfers: a shuffled block table (rows scattered in 8 KiB runs
    /// over the pool, a long-running worker's worst case) instead of consecutive blocks
    /// (what the engine's allocator hands out from a fresh or steadily reused pool).
    #[arg(long)]
    pub scatter: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Flags of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The target JSON printed by `recv`, or `-` to read one target per stdin line.
    #[arg(long)]
    pub target: String,
    /// Synthetic payload bytes.
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    /// Synthetic chunk size.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk: usize,
    /// Sleep between chunks (to make room for fault injection).
    #[arg(long, default_value_t = 0)]
    pub pace_ms: u64,
    /// Present this fingerprint instead of the real one.
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Prefill this prompt with the engine and stream its KV.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Apply the chat template to the prompt.
    #[arg(long)]
    pub chat: bool,
    /// Instead of --prompt: a prompt of exactly this many tokens of real text.
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Most tokens the decode side generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Send the KV only after the whole prefill (default: layer by layer while computing).
    #[arg(long)]
    pub no_stream: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Nanoseconds since the Unix epoch (both processes share the host clock).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn print(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Runs a harness command.
pub fn run(cmd: HarnessCmd) -> Result<()> {
    match cmd {
        HarnessCmd::Recv(a) => runtime()?.block_on(recv(a)),
        HarnessCmd::Send(a) => runtime()?.block_on(send(a)),
        HarnessCmd::RawRecv { bytes, rounds } => runtime()?.block_on(raw_recv(bytes, rounds)),
        HarnessCmd::RawSend {
            addr,
            bytes,
            rounds,
        } => runtime()?.block_on(raw_send(&addr, bytes, rounds)),
    }
}

/// Tag of an engine chunk: first position and token count.
fn tag(start: u32, count: u32) -> u64 {
    ((start as u64) << 32) | count as u64
}

/// Synthetic rows: 512-byte K and V rows in blocks of 16, as in an engine's pools.
const SYNTH_ROW: usize = 512;
const SYNTH_BLOCK: usize = 16;

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

async fn recv(a: RecvArgs) -> Result<()> {
    let shm_capable = matches!(a.backend, Backend::Shm | Backend::Auto) && !a.staged;
    // With a model, the engine's pools go in shared memory for placed transfers.
    let mut engine_pool = None;
    let mut engine = if a.decode {
        let cfg = a.engine.engine_config()?;
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
    let receiver = Receiver::start(ReceiverConfig::new(fingerprint), listener)?;
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

/// Deterministic synthetic payload.
pub fn synthetic(bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            (i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17) as u8
        })
        .collect()
}

async fn send(a: SendArgs) -> Result<()> {
    let targets: Vec<TransferTarget> = if a.target == "-" {
        Vec::new()
    } else {
        vec![serde_json::from_str(&a.target).context("--target is not a transfer target")?]
    };
    if a.prompt.is_some() || a.prompt_tokens.is_some() {
        let target = targets
            .into_iter()
            .next()
            .context("prefill mode takes one --target")?;
        return send_prefill(a, target).await;
    }
    let src = synthetic(a.bytes as usize);
    let sender = Sender::new(a.fingerprint.clone().unwrap_or_else(|| SYNTHETIC.into()));
    // One target from the flag, or one per line of stdin (`--target -`).
    let mut lines = std::io::stdin().lock().lines();
    let mut given = targets.into_iter();
    loop {
        let target = match given.next() {
            Some(t) => t,
            None if a.target == "-" => match lines.next() {
                Some(line) => {
                    serde_json::from_str(&line?).context("stdin line is not a transfer target")?
                }
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        let start_ns = now_ns();
        let res = async {
            let mut t = sender.open(&target).await?;
            t.send_meta(start_ns.to_string().as_bytes()).await?;
            // Each chunk is one layer's K and V rows (placed transfers need row tags).
            for (i, c) in src.chunks(a.chunk.max(1)).enumerate() {
                t.send(i as u32, tag(0, (c.len() / (2 * SYNTH_ROW)) as u32), c)
                    .await?;
                t.flush().await?;
                if a.pace_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(a.pace_ms)).await;
                }
            }
            t.commit().await
        }
        .await;
        match res {
            Ok(s) => print(
                json!({"ok": true, "backend": s.backend.name(), "bytes": s.bytes, "start_ns": start_ns,
                "xxh3": xxhash_rust::xxh3::xxh3_64(&src)}),
            ),
            Err(e) => {
                print(json!({"ok": false, "error": e.to_string(), "kind": e.reason()}));
                std::process::exit(3);
            }
        }
    }
}

async fn send_prefill(a: SendArgs, target: TransferTarget) -> Result<()> {
    let mut engine = Engine::load(a.engine.engine_config()?)?;
    let prompt = match (&a.prompt, a.prompt_tokens) {
        (Some(p), _) if a.chat => engine
            .tokenizer()
            .encode_chat(&[xpyd_engine::ChatMessage::new("user", p)])?,
        (Some(p), _) => engine.tokenizer().encode(p)?,
        (None, Some(n)) => crate::bench_engine::prompt_tokens(&engine, n, n)?,
        (None, None) => bail!("give --prompt or --prompt-tokens"),
    };
    let params = SamplingParams {
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    engine.add_sequence(1, prompt, params)?;
    let header = engine.export_header(1)?;
    let mut header_bytes = Vec::new();
    header.encode(&mut header_bytes);
    let sender = Sender::new(
        a.fingerprint
            .clone()
            .unwrap_or_else(|| engine.fingerprint().to_string()),
    );
    let mut t = sender.open(&target).await?;
    t.send_meta(&header_bytes).await?;
    let backend = t.backend();
    // Prefill runs on this thread; a task streams each layer chunk as it is handed out.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<xpyd_engine::LayerChunk>(256);
    let streamer = tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            t.send(c.layer, tag(c.start, c.count), &c.payload).await?;
            t.flush().await?;
        }
        Ok::<_, xpyd_kv_transfer::TransferError>(t)
    });
    let prefill_start_ns = now_ns();
    let mut held = Vec::new();
    let stream = !a.no_stream;
    let first = tokio::task::block_in_place(|| {
        engine.prefill(1, &mut |c| {
            if stream {
                let _ = tx.blocking_send(c);
            } else {
                held.push(c);
            }
        })
    })?;
    let prefill_end_ns = now_ns();
    for c in held {
        tx.send(c)
            .await
            .map_err(|_| anyhow::anyhow!("streamer ended early"))?;
    }
    drop(tx);
    let mut t = streamer.await??;
    t.send_meta(&serde_json::to_vec(&engine.resume_state(1)?)?)
        .await?;
    let stats = t.commit().await?;
    print(
        json!({"ok": true, "backend": backend.name(), "bytes": stats.bytes, "first_token": first.token,
        "prefill_start_ns": prefill_start_ns, "prefill_end_ns": prefill_end_ns, "streamed": stream}),
    );
    Ok(())
}

async fn raw_recv(bytes: u64, rounds: u64) -> Result<()> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    print(json!({"addr": l.local_addr()?.to_string()}));
    let (mut s, _) = l.accept().await?;
    s.set_nodelay(true)?;
    let mut dest = vec![1u8; bytes as usize];
    for _ in 0..rounds.max(1) {
        s.read_exact(&mut dest).await?;
        let end_ns = now_ns();
        s.write_all(b"k").await?;
        print(json!({"ok": true, "bytes": bytes, "end_ns": end_ns}));
    }
    Ok(())
}

async fn raw_send(addr: &str, bytes: u64, rounds: u64) -> Result<()> {
    let src = synthetic(bytes as usize);
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    for _ in 0..rounds.max(1) {
        let start_ns = now_ns();
        s.write_all(&src).await?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).await?;
        print(json!({"ok": true, "bytes": bytes, "start_ns": start_ns}));
    }
    Ok(())
}
