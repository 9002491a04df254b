//! `xpyd kv-harness`: the two processes of a KV transfer, for tests and `xpyd bench kv`.
//! This is how a prefill in one process streams its KV to a decode in another outside a
//! cluster. Each command prints JSON lines on stdout: `recv` first its transfer target,
//! then one result line; `send` one result line.

mod recv;

use crate::engine_args::EngineArgs;
use crate::engine_bench::prompt_tokens;
use crate::host::Host;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xpyd_engine::{Engine, EngineConfig, SamplingParams};
use xpyd_kv_transfer::{Backend, Sender, TransferTarget};

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
    /// Serve TLS with the certificate `receiver.pem`/`receiver.key` issued by the CA in
    /// this directory ([`tls_dir`] makes one).
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Engine flags (model, threads, KV dtype, prefill chunk).
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
    /// Dial over TLS trusting only the CA in this directory (as `recv --tls-dir`).
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Engine flags (model, threads, KV dtype, prefill chunk).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// A CA in a new directory and the receiver's certificate for 127.0.0.1, for harness
/// processes given `--tls-dir` (kept until the returned directory is dropped).
///
/// # Errors
/// When the files cannot be written.
pub fn tls_dir() -> Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    let ca = xpyd_runtime::tls::Authority::open_or_create(d.path(), "bench")?;
    ca.issue("receiver", &["127.0.0.1".into()])?;
    Ok(d)
}

/// `s` dialling over TLS with the CA of `dir`, when given.
fn with_tls(s: Sender, dir: Option<&std::path::Path>) -> Result<Sender> {
    let Some(dir) = dir else { return Ok(s) };
    let roots = xpyd_runtime::tls::Roots::load(&dir.join("ca.pem"))?;
    Ok(s.with_tls(roots.client_config(&[])?))
}

/// The receiver's TLS with the certificate [`tls_dir`] issued, when given.
fn receiver_tls(
    dir: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    let Some(dir) = dir else { return Ok(None) };
    let id =
        xpyd_runtime::tls::Identity::load(&dir.join("receiver.pem"), &dir.join("receiver.key"))?;
    Ok(Some(id.server_config(&[])?))
}

/// Nanoseconds since the Unix epoch (both processes share the host clock).
fn now_ns() -> u64 {
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
///
/// # Errors
/// When the model cannot be found or loaded, or the transfer cannot start; a transfer
/// that fails is reported on stdout (`"ok": false`).
pub fn run(cmd: HarnessCmd, host: &Host) -> Result<()> {
    match cmd {
        HarnessCmd::Recv(a) => {
            let engine = a.decode.then(|| a.engine.engine_config(host)).transpose()?;
            runtime()?.block_on(recv::recv(a, engine))
        }
        HarnessCmd::Send(a) => {
            let prefill = a.prompt.is_some() || a.prompt_tokens.is_some();
            let engine = prefill.then(|| a.engine.engine_config(host)).transpose()?;
            runtime()?.block_on(send(a, engine))
        }
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
/// Rows per block of a synthetic pool.
const SYNTH_BLOCK: usize = 16;

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

/// Sends synthetic bytes, or (with an engine) a real prefill's KV.
async fn send(a: SendArgs, engine: Option<EngineConfig>) -> Result<()> {
    let targets: Vec<TransferTarget> = if a.target == "-" {
        Vec::new()
    } else {
        vec![serde_json::from_str(&a.target).context("--target is not a transfer target")?]
    };
    if let Some(cfg) = engine {
        let target = targets
            .into_iter()
            .next()
            .context("prefill mode takes one --target")?;
        return send_prefill(a, cfg, target).await;
    }
    let src = synthetic(a.bytes as usize);
    let sender = with_tls(
        Sender::new(a.fingerprint.clone().unwrap_or_else(|| SYNTHETIC.into())),
        a.tls_dir.as_deref(),
    )?;
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

async fn send_prefill(a: SendArgs, cfg: EngineConfig, target: TransferTarget) -> Result<()> {
    let mut engine = Engine::load(cfg)?;
    let prompt = match (&a.prompt, a.prompt_tokens) {
        (Some(p), _) if a.chat => engine
            .tokenizer()
            .encode_chat(&[xpyd_engine::ChatMessage::new("user", p)])?,
        (Some(p), _) => engine.tokenizer().encode(p)?,
        (None, Some(n)) => prompt_tokens(&engine, n, n)?,
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
    let sender = with_tls(
        Sender::new(
            a.fingerprint
                .clone()
                .unwrap_or_else(|| engine.fingerprint().to_string()),
        ),
        a.tls_dir.as_deref(),
    )?;
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
