//! The engine thread: owns the `Engine`, imports arriving KV, runs local prefills in
//! chunks (combined mode) and advances every decoding sequence with one batched step per
//! iteration (continuous batching: sequences join and leave between steps). Commands come
//! over a bounded channel and are drained between steps; tokens go out on each request's
//! own channel, and a closed channel means the client left. Each request has one entry
//! with one explicit [`Stage`] (see `request`), the one place cancellation, failure,
//! drain and holds look.

mod cmd;
mod request;

pub use cmd::{Cmd, EventTx, ReserveFn};
pub use request::Stage;

use crate::decode::budget::Budget;
use request::Request;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::Status;
use xpyd_engine::{Engine, EngineError};
use xpyd_proto as pb;
use xpyd_runtime::kv_pool::ChunkError;
use xpyd_runtime::metrics as m;
use xpyd_runtime::worker::{Ema, SharedStats, engine_status, token_to_pb};

/// The engine thread's state.
pub struct EngineLoop {
    engine: Engine,
    budget: Arc<Mutex<Budget>>,
    stats: SharedStats,
    /// Every request this thread holds, by id.
    requests: HashMap<u64, Request>,
    tpot: Ema,
    ttft: Ema,
    role: &'static str,
    delay: Option<std::time::Duration>,
    /// Wakes the loop when a hold ends (weak: it must not keep the channel open).
    wake: mpsc::WeakSender<Cmd>,
    /// Test knob: panic at this decode step (`XPYD_DEBUG_PANIC`).
    panic_at: Option<u64>,
    /// Decode steps run.
    steps: u64,
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
            requests: HashMap::new(),
            tpot: Ema::new(0.2),
            ttft: Ema::new(0.2),
            role,
            delay,
            wake,
            panic_at: None,
            steps: 0,
        }
    }

    /// Test knob: panic at decode step `n` (see `xpyd_runtime::lifecycle::debug_panic_after`).
    pub fn panic_after(mut self, n: Option<u64>) -> Self {
        self.panic_at = n;
        self
    }

    fn stage(&self, id: u64) -> Option<Stage> {
        self.requests.get(&id).map(|r| r.stage)
    }

    fn held(&self, id: u64) -> bool {
        self.requests.get(&id).is_some_and(Request::held)
    }

    /// Ids of the requests at `stage`.
    fn at(&self, stage: Stage) -> impl Iterator<Item = u64> + '_ {
        self.requests
            .iter()
            .filter(move |(_, r)| r.stage == stage)
            .map(|(id, _)| *id)
    }

    /// Frees a request's sequence and budget promise. A placed import that had not
    /// completed keeps both: if no sender ever attached (the fence closes the
    /// reservation first), they are freed at once; otherwise the request is held for
    /// [`HOLD_AFTER_FAILED_IMPORT`].
    fn free(&mut self, id: u64) {
        if self.held(id) {
            return; // Already held (e.g. a cancel after the failure): the hold stands.
        }
        let fence = self.requests.remove(&id).and_then(|r| r.fence);
        self.engine.remove(id);
        if !self.engine.holds(id) {
            self.budget_release(id);
            return;
        }
        match fence {
            Some(fence) if fence.close() => {
                let until = Instant::now() + HOLD_AFTER_FAILED_IMPORT;
                self.requests
                    .insert(id, Request::new(Stage::Held { until }, None));
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
            .requests
            .iter()
            .filter(|(_, r)| matches!(r.stage, Stage::Held { until } if until <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.requests.remove(id);
            self.engine.release_held(*id);
            self.budget_release(*id);
        }
        if !due.is_empty() {
            self.publish();
        }
    }

    /// Runs until the command channel closes; gives back the engine with no sequence
    /// left (for the worker's next role).
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> Engine {
        loop {
            let idle = self
                .requests
                .values()
                .all(|r| !matches!(r.stage, Stage::Prefilling | Stage::Decoding));
            if idle {
                self.publish();
                match rx.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return self.finish(),
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

    /// Frees what is left once no command can come: holds of failed placed imports
    /// run out first (a late write from their sender must still land in blocks nobody
    /// uses), then every other entry goes.
    fn finish(mut self) -> Engine {
        let last = self
            .requests
            .values()
            .filter_map(|r| match r.stage {
                Stage::Held { until } => Some(until),
                _ => None,
            })
            .max();
        if let Some(until) = last {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            self.requests.remove(&id);
            self.engine.remove(id);
            self.engine.release_held(id);
            self.budget_release(id);
        }
        self.publish();
        self.engine
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Reserve {
                id,
                tokens,
                reserve,
                reply,
            } => {
                let res = if self.budget_holds(id) {
                    self.engine
                        .reserve_import(id, tokens)
                        .map_err(|e| engine_status(&e))
                } else {
                    Err(xpyd_runtime::worker::cancelled_status(
                        "the request was cancelled",
                    ))
                };
                let table = match res {
                    Ok(table) => table,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                // The blocks are this request's now; a failure below is undone by the
                // service's cancel, as any failure after admission.
                let mut r = Request::new(Stage::Reserved, None);
                let made = reserve(table);
                if let Ok((_, incoming)) = &made {
                    r.fence = Some(incoming.fence());
                }
                let reserved = made.is_ok();
                self.requests.insert(id, r);
                if reply.send(made).is_err() && reserved {
                    // The request went away while waiting: nothing was handed out.
                    self.free(id);
                }
            }
            Cmd::Wake => {}
            // A header for a request that ended (cancelled, failed, held) is dropped: it
            // must not bring the request back.
            Cmd::Begin { id, .. } if self.held(id) || !self.budget_holds(id) => {}
            Cmd::Begin { id, header, out } => {
                // A placed import keeps the fence its reservation got.
                let fence = self.requests.remove(&id).and_then(|r| r.fence);
                let mut r = Request::new(Stage::Importing, Some(out));
                r.fence = fence;
                self.requests.insert(id, r);
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
                if self.stage(id) != Some(Stage::Importing) {
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
                if self.stage(id) == Some(Stage::Importing)
                    && let Err(e) = self.engine.import_resume(id, *state)
                {
                    self.fail(id, engine_status(&e));
                }
            }
            Cmd::Finish { id } => self.finish_import(id),
            Cmd::Local {
                id,
                tokens,
                prompt_len,
                params,
                out,
            } => {
                self.requests
                    .insert(id, Request::new(Stage::Prefilling, Some(out)));
                let admitted = if prompt_len < tokens.len() {
                    self.engine.add_resumed(id, tokens, prompt_len, params)
                } else {
                    self.engine.add_sequence(id, tokens, params)
                };
                if let Err(e) = admitted {
                    self.fail(id, engine_status(&e));
                }
            }
            Cmd::Cancel { id, client_gone } => {
                if self.requests.get(&id).is_some_and(|r| r.out.is_some()) {
                    self.end(id, client_gone);
                } else {
                    // Possibly blocks reserved for an import whose header never came.
                    self.free(id);
                }
            }
            Cmd::Fail { id, status } => self.fail(id, status),
            Cmd::Evict => {
                let streaming: Vec<u64> = self
                    .requests
                    .iter()
                    .filter(|(_, r)| r.out.is_some() && !r.held())
                    .map(|(id, _)| *id)
                    .collect();
                for id in streaming {
                    self.fail(id, xpyd_runtime::worker::draining_status());
                }
            }
        }
    }

    /// The transfer completed: the sequence joins the running batch (or ends, when its
    /// first token already ended it).
    fn finish_import(&mut self, id: u64) {
        if self.stage(id) != Some(Stage::Importing) {
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
                if let Some(r) = self.requests.get_mut(&id) {
                    r.stage = Stage::Decoding;
                    r.last_token = Some(Instant::now());
                }
            }
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

    /// Frees the request's KV and promise (see [`EngineLoop::free`]); the stream ends
    /// when its sender drops.
    fn end(&mut self, id: u64, cancelled: bool) {
        if let Some(r) = self.requests.get(&id)
            && r.tokens > 1
        {
            self.tpot.observe(r.gaps / (r.tokens - 1) as f64 * 1e3);
        }
        self.free(id);
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
        if let Some(out) = self.requests.get(&id).and_then(|r| r.out.as_ref()) {
            let _ = out.try_send(Err(status));
        }
        metrics::counter!(m::WORKER_REQUESTS_TOTAL, "role" => self.role, "outcome" => "error")
            .increment(1);
        self.free(id);
    }

    /// Sends one token; false when the client is gone.
    fn emit(&mut self, ev: &xpyd_engine::TokenEvent) -> bool {
        let Some(r) = self.requests.get_mut(&ev.seq) else {
            return false;
        };
        let now = Instant::now();
        if let Some(t) = r.last_token {
            r.gaps += (now - t).as_secs_f64();
        }
        r.last_token = Some(now);
        r.tokens += 1;
        self.send(ev.seq, pb::decode_event::Event::Token(token_to_pb(ev)))
    }

    /// Sends one event of request `id`'s stream; false when the client is gone.
    fn send(&self, id: u64, event: pb::decode_event::Event) -> bool {
        self.requests
            .get(&id)
            .and_then(|r| r.out.as_ref())
            .is_some_and(|out| {
                out.try_send(Ok(pb::DecodeEvent { event: Some(event) }))
                    .is_ok()
            })
    }

    /// One prefill chunk of the oldest local request (combined mode).
    fn local_chunk(&mut self) {
        let Some(id) = self
            .at(Stage::Prefilling)
            .min_by_key(|id| self.requests[id].started)
        else {
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
                if let Some(r) = self.requests.get(&id) {
                    self.ttft.observe(r.started.elapsed().as_secs_f64() * 1e3);
                }
                let cached_tokens = self.engine.reused_tokens(id) as u32;
                let alive = self.send(
                    id,
                    pb::decode_event::Event::Prefilled(pb::Prefilled { cached_tokens }),
                ) && self.emit(&ev);
                if !alive || ev.finish.is_some() {
                    self.end(id, !alive);
                } else if let Some(r) = self.requests.get_mut(&id) {
                    r.stage = Stage::Decoding;
                }
            }
        }
    }

    /// One batched decode step over every decoding sequence.
    fn decode_step(&mut self) {
        let mut ids: Vec<u64> = self.at(Stage::Decoding).collect();
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        self.steps += 1;
        if self.panic_at == Some(self.steps) {
            panic!(
                "XPYD_DEBUG_PANIC: the engine thread panics at decode step {}",
                self.steps
            );
        }
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
        let queued = self.at(Stage::Prefilling).count();
        self.stats_mut(|s| {
            s.prefix_lookup_tokens = prefix.lookup_tokens;
            s.prefix_hit_tokens = prefix.hit_tokens;
            s.running = running as u32;
            s.queued = queued as u32;
            s.kv_blocks_used = kv.used_blocks as u32;
            s.kv_blocks_free = kv.free_blocks as u32;
            s.kv_blocks_reserved = reserved as u32;
            s.ttft_ms = ttft;
            s.tpot_ms = tpot;
        });
        metrics::gauge!(m::WORKER_RUNNING, "role" => self.role).set(running as f64);
        metrics::gauge!(m::WORKER_QUEUE_DEPTH, "role" => self.role).set(queued as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_USED).set(kv.used_blocks as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_FREE).set(kv.free_blocks as f64);
    }
}
