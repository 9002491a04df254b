//! The engine thread: owns the `Engine`, imports arriving KV, runs local prefills in
//! chunks (combined mode) and advances every decoding sequence with one batched step per
//! iteration (continuous batching: sequences join and leave between steps). Commands come
//! over a bounded channel and are drained between steps; tokens go out on each request's
//! own channel, and a closed channel means the client left.

use crate::budget::Budget;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::Status;
use xpyd_engine::{Engine, EngineError, KvHeader, ResumeState, SamplingParams};
use xpyd_kv_transfer::{Payload, TransferFence};
use xpyd_proto as pb;
use xpyd_runtime::kv_pool::ChunkError;
use xpyd_runtime::metrics as m;
use xpyd_runtime::worker::{Ema, SharedStats, engine_status, token_to_pb};

/// What a request's response stream carries.
pub type EventTx = mpsc::Sender<Result<pb::DecodeEvent, Status>>;

/// Work for the engine thread.
pub enum Cmd {
    /// A placed import's reservation exists, before its target is handed out: the fence
    /// that ends the transfer and tells whether a sender attached (see
    /// [`HOLD_AFTER_FAILED_IMPORT`]). The reply is false (and the fence closed) when the
    /// request was dropped meanwhile: the target must not be handed out.
    Watch {
        /// Request id.
        id: u64,
        /// Ends the transfer; says whether a sender attached.
        fence: TransferFence,
        /// Whether the import is still wanted.
        reply: tokio::sync::oneshot::Sender<bool>,
    },
    /// A hold may have ended.
    Wake,
    /// Reserve blocks for a placed import of `tokens` tokens (before its header arrives);
    /// the reply carries the block table the sender writes into.
    Reserve {
        /// Request id (= sequence id).
        id: u64,
        /// Prompt tokens whose KV will arrive.
        tokens: usize,
        /// The block table, or why not.
        reply: tokio::sync::oneshot::Sender<Result<Vec<u32>, Status>>,
    },
    /// The KV header arrived: reserve blocks for the import.
    Begin {
        /// Request id (= sequence id).
        id: u64,
        /// The exporter's header.
        header: Box<KvHeader>,
        /// Where this request's tokens and errors go.
        out: EventTx,
    },
    /// One layer chunk: rows `start..start+count` of `layer`.
    Rows {
        /// Request id.
        id: u64,
        /// Layer.
        layer: u32,
        /// Chunk tag (`start << 32 | count`).
        tag: u64,
        /// The bytes, verified while copied into the KV blocks (or, placed, where the
        /// sender wrote them).
        data: Payload,
    },
    /// The resume state (first token, sampler position) arrived.
    Resume {
        /// Request id.
        id: u64,
        /// The state.
        state: Box<ResumeState>,
    },
    /// The transfer completed: start decoding.
    Finish {
        /// Request id.
        id: u64,
    },
    /// Combined mode: prefill `tokens` here, then decode.
    Local {
        /// Request id.
        id: u64,
        /// Prompt tokens.
        tokens: Vec<u32>,
        /// Sampling.
        params: SamplingParams,
        /// Where tokens go.
        out: EventTx,
    },
    /// Drop the request and free everything it holds (idempotent).
    Cancel {
        /// Request id.
        id: u64,
        /// Counted as cancelled (the client left) rather than finished.
        client_gone: bool,
    },
    /// Fail the request with this status and free it.
    Fail {
        /// Request id.
        id: u64,
        /// What went wrong.
        status: Status,
    },
}

struct Active {
    out: EventTx,
    decoding: bool,
    last_token: Option<Instant>,
    gaps: f64,
    tokens: usize,
}

impl Active {
    /// A request that is importing or prefilling: not decoding yet, no tokens out.
    fn new(out: EventTx) -> Self {
        Active {
            out,
            decoding: false,
            last_token: None,
            gaps: 0.0,
            tokens: 0,
        }
    }
}

/// The engine thread's state.
pub struct EngineLoop {
    engine: Engine,
    budget: Arc<Mutex<Budget>>,
    stats: SharedStats,
    active: HashMap<u64, Active>,
    local: VecDeque<u64>,
    tpot: Ema,
    ttft: Ema,
    started: HashMap<u64, Instant>,
    role: &'static str,
    delay: Option<std::time::Duration>,
    /// Placed imports in flight: their transfer's fence.
    placed: HashMap<u64, TransferFence>,
    /// Failed placed imports whose blocks (and budget promise) stay out of use until
    /// then: their sender may still write into them.
    held: HashMap<u64, Instant>,
    /// Wakes the loop when a hold ends (weak: it must not keep the channel open).
    wake: mpsc::WeakSender<Cmd>,
}

/// How long a failed placed import keeps its blocks after the failure. Removing it closes
/// the transfer's fence, which closes the connection at once, and a sender checks for
/// that (and its deadline) right before every write into the blocks: only a sender
/// stalled this long in the middle of one chunk's copy could still land a write.
pub const HOLD_AFTER_FAILED_IMPORT: std::time::Duration = std::time::Duration::from_secs(5);

impl EngineLoop {
    /// A loop around a loaded engine; `wake` is a weak handle on its own command channel.
    pub fn new(
        engine: Engine,
        budget: Arc<Mutex<Budget>>,
        stats: SharedStats,
        role: &'static str,
        delay: Option<std::time::Duration>,
        wake: mpsc::WeakSender<Cmd>,
    ) -> Self {
        EngineLoop {
            engine,
            budget,
            stats,
            active: HashMap::new(),
            local: VecDeque::new(),
            tpot: Ema::new(0.2),
            ttft: Ema::new(0.2),
            started: HashMap::new(),
            role,
            delay,
            placed: HashMap::new(),
            held: HashMap::new(),
            wake,
        }
    }

    /// Removes a request's sequence from the engine and frees its budget promise. A
    /// placed import that had not completed keeps both: if no sender ever attached (the
    /// fence closes the reservation first), they are freed at once; otherwise after
    /// [`HOLD_AFTER_FAILED_IMPORT`].
    fn remove(&mut self, id: u64) {
        if self.held.contains_key(&id) {
            return; // Already held (e.g. a cancel after the failure): the hold stands.
        }
        self.engine.remove(id);
        let fence = self.placed.remove(&id);
        if !self.engine.holds(id) {
            self.budget_release(id);
            return;
        }
        match fence {
            Some(fence) if fence.close() => {
                let until = Instant::now() + HOLD_AFTER_FAILED_IMPORT;
                if self.held.insert(id, until).is_none() {
                    // Wakes an idle loop when the hold ends (without it, the next command
                    // releases the blocks).
                    let wake = self.wake.clone();
                    let _ = std::thread::Builder::new()
                        .name("kv-hold".into())
                        .spawn(move || {
                            std::thread::sleep(until.saturating_duration_since(Instant::now()));
                            if let Some(tx) = wake.upgrade() {
                                let _ = tx.blocking_send(Cmd::Wake);
                            }
                        });
                }
            }
            // No sender can write: the target never left, or nobody attached before the
            // reservation closed.
            _ => {
                self.engine.release_held(id);
                self.budget_release(id);
            }
        }
    }

    /// Frees held blocks whose time has come (and publishes the freed room).
    fn release_due(&mut self) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.held.remove(id);
            self.engine.release_held(*id);
            self.budget_release(*id);
        }
        if !due.is_empty() {
            self.publish();
        }
    }

    /// Runs until the command channel closes.
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let idle = self.local.is_empty() && !self.active.values().any(|a| a.decoding);
            if idle {
                self.publish();
                match rx.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return,
                }
            }
            self.release_due();
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            self.local_chunk();
            self.decode_step();
            self.publish();
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Reserve { id, tokens, reply } => {
                let res = if self.budget_holds(id) {
                    self.engine
                        .reserve_import(id, tokens)
                        .map_err(|e| engine_status(&e))
                } else {
                    Err(Status::cancelled("the request was cancelled"))
                };
                let reserved = res.is_ok();
                if reply.send(res).is_err() && reserved {
                    // The request went away while waiting: nothing was handed out.
                    self.remove(id);
                }
            }
            Cmd::Watch { id, fence, reply } => {
                let wanted = self.engine.is_reserved(id) && !self.held.contains_key(&id);
                if wanted {
                    self.placed.insert(id, fence);
                } else {
                    fence.close();
                }
                if reply.send(wanted).is_err() && wanted {
                    self.remove(id);
                }
            }
            Cmd::Wake => {}
            // A header for a request that ended (cancelled, failed, held) is dropped: it
            // must not bring the request back.
            Cmd::Begin { id, .. } if self.held.contains_key(&id) || !self.budget_holds(id) => {}
            Cmd::Begin { id, header, out } => {
                self.started.insert(id, Instant::now());
                self.active.insert(id, Active::new(out));
                if let Err(e) = self.engine.begin_import(id, &header) {
                    self.fail(id, engine_status(&e));
                }
            }
            Cmd::Rows {
                id,
                layer,
                tag,
                data,
            } => {
                if !self.active.contains_key(&id) {
                    return;
                }
                match xpyd_runtime::kv_pool::import_chunk(&mut self.engine, id, layer, tag, &data) {
                    Ok(()) => {}
                    Err(ChunkError::Engine(e)) => self.fail(id, engine_status(&e)),
                    Err(ChunkError::Transfer(e)) => {
                        self.fail(id, xpyd_runtime::worker::transfer_status(&e))
                    }
                }
            }
            Cmd::Resume { id, state } => {
                if self.active.contains_key(&id)
                    && let Err(e) = self.engine.import_resume(id, *state)
                {
                    self.fail(id, engine_status(&e));
                }
            }
            Cmd::Finish { id } => {
                if !self.active.contains_key(&id) {
                    return;
                }
                let done = self
                    .engine
                    .finish_import(id)
                    .and_then(|()| self.engine.resume_state(id));
                match done {
                    Err(e) => self.fail(id, engine_status(&e)),
                    // The first token already ended the request (max_tokens 1, EOS, stop).
                    Ok(state) if state.finish.is_some() => self.end(id, false),
                    Ok(_) => {
                        if let Some(a) = self.active.get_mut(&id) {
                            a.decoding = true;
                            a.last_token = Some(Instant::now());
                        }
                    }
                }
            }
            Cmd::Local {
                id,
                tokens,
                params,
                out,
            } => {
                self.started.insert(id, Instant::now());
                self.active.insert(id, Active::new(out));
                match self.engine.add_sequence(id, tokens, params) {
                    Ok(()) => self.local.push_back(id),
                    Err(e) => self.fail(id, engine_status(&e)),
                }
            }
            Cmd::Cancel { id, client_gone } => {
                if self.active.contains_key(&id) {
                    self.end(id, client_gone);
                } else {
                    // Possibly blocks reserved for an import whose header never came.
                    self.remove(id);
                }
            }
            Cmd::Fail { id, status } => self.fail(id, status),
        }
    }

    fn budget_holds(&self, id: u64) -> bool {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holds(id)
    }

    fn budget_release(&self, id: u64) {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(id);
    }

    /// Frees the request's KV and promise (see [`EngineLoop::remove`]); the stream ends
    /// when its sender drops.
    fn end(&mut self, id: u64, cancelled: bool) {
        self.remove(id);
        self.local.retain(|x| *x != id);
        self.started.remove(&id);
        if let Some(a) = self.active.remove(&id)
            && a.tokens > 1
        {
            self.tpot.observe(a.gaps / (a.tokens - 1) as f64 * 1e3);
        }
        let outcome = if cancelled { "cancelled" } else { "ok" };
        metrics::counter!(m::WORKER_REQUESTS_TOTAL, "role" => self.role, "outcome" => outcome)
            .increment(1);
        if cancelled {
            self.stats_mut(|s| s.requests_cancelled += 1);
        }
        self.stats_mut(|s| s.requests_total += 1);
    }

    fn fail(&mut self, id: u64, status: Status) {
        tracing::warn!(request_id = id, %status, "request failed");
        if let Some(a) = self.active.get(&id) {
            let _ = a.out.try_send(Err(status));
        }
        metrics::counter!(m::WORKER_REQUESTS_TOTAL, "role" => self.role, "outcome" => "error")
            .increment(1);
        self.remove(id);
        self.local.retain(|x| *x != id);
        self.started.remove(&id);
        self.active.remove(&id);
    }

    /// Sends one token; false when the client is gone.
    fn emit(&mut self, ev: &xpyd_engine::TokenEvent) -> bool {
        let Some(a) = self.active.get_mut(&ev.seq) else {
            return false;
        };
        let now = Instant::now();
        if let Some(t) = a.last_token {
            a.gaps += (now - t).as_secs_f64();
        }
        a.last_token = Some(now);
        a.tokens += 1;
        self.send(ev.seq, pb::decode_event::Event::Token(token_to_pb(ev)))
    }

    /// Sends one event of request `id`'s stream; false when the client is gone.
    fn send(&self, id: u64, event: pb::decode_event::Event) -> bool {
        self.active.get(&id).is_some_and(|a| {
            a.out
                .try_send(Ok(pb::DecodeEvent { event: Some(event) }))
                .is_ok()
        })
    }

    /// One prefill chunk of the oldest local request (combined mode).
    fn local_chunk(&mut self) {
        let Some(&id) = self.local.front() else {
            return;
        };
        let t0 = Instant::now();
        let res = self.engine.prefill_chunk(id, &mut |_| {});
        self.stats_mut(|s| s.prefill_chunks_total += 1);
        metrics::histogram!(m::WORKER_PREFILL_SECONDS).record(t0.elapsed().as_secs_f64());
        match res {
            Err(e) => self.fail(id, engine_status(&e)),
            Ok(None) => {}
            Ok(Some(ev)) => {
                self.local.pop_front();
                if let Some(t) = self.started.remove(&id) {
                    self.ttft.observe(t.elapsed().as_secs_f64() * 1e3);
                }
                let cached_tokens = self.engine.reused_tokens(id) as u32;
                let alive = self.send(
                    id,
                    pb::decode_event::Event::Prefilled(pb::Prefilled { cached_tokens }),
                ) && self.emit(&ev);
                if !alive || ev.finish.is_some() {
                    self.end(id, !alive);
                } else if let Some(a) = self.active.get_mut(&id) {
                    a.decoding = true;
                }
            }
        }
    }

    /// One batched decode step over every decoding sequence.
    fn decode_step(&mut self) {
        let mut ids: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.decoding)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        let t0 = Instant::now();
        match self.engine.decode_step(&ids) {
            Ok(events) => {
                metrics::histogram!(m::WORKER_DECODE_STEP_SECONDS)
                    .record(t0.elapsed().as_secs_f64());
                metrics::histogram!(m::WORKER_DECODE_BATCH).record(ids.len() as f64);
                for ev in events {
                    let alive = self.emit(&ev);
                    if !alive || ev.finish.is_some() {
                        self.end(ev.seq, !alive);
                    }
                }
            }
            Err(e) => {
                // Promises make this unreachable in practice; fail the step's requests
                // rather than spin.
                let status = engine_status(&e);
                for id in ids {
                    self.fail(id, status.clone());
                }
                if !matches!(e, EngineError::OutOfBlocks { .. }) {
                    tracing::error!(error = %e, "decode step failed");
                }
            }
        }
    }

    fn stats_mut(&self, f: impl FnOnce(&mut pb::WorkerStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn publish(&self) {
        let kv = self.engine.kv_usage();
        let (running, reserved) = {
            let b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            (b.running(), b.promised_blocks())
        };
        let (ttft, tpot) = (self.ttft.get(), self.tpot.get());
        let prefix = self.engine.prefix_stats();
        self.stats_mut(|s| {
            s.prefix_lookup_tokens = prefix.lookup_tokens;
            s.prefix_hit_tokens = prefix.hit_tokens;
            s.running = running as u32;
            s.queued = self.local.len() as u32;
            s.kv_blocks_used = kv.used_blocks as u32;
            s.kv_blocks_free = kv.free_blocks as u32;
            s.kv_blocks_reserved = reserved as u32;
            s.ttft_ms = ttft;
            s.tpot_ms = tpot;
        });
        metrics::gauge!(m::WORKER_RUNNING, "role" => self.role).set(running as f64);
        metrics::gauge!(m::WORKER_QUEUE_DEPTH, "role" => self.role).set(self.local.len() as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_USED).set(kv.used_blocks as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_FREE).set(kv.free_blocks as f64);
    }
}
