//! The engine thread of a prefill worker: requests wait in FIFO order; the front one is
//! prefilled chunk by chunk, each layer's KV handed to its transfer task as soon as it is
//! computed; cancellation is checked between chunks.

use std::collections::VecDeque;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use xpyd_engine::{Engine, LayerChunk, SamplingParams, TokenEvent};
use xpyd_proto as pb;
use xpyd_runtime::metrics as m;
use xpyd_runtime::worker::{Ema, SharedStats, cancelled_status, engine_status};

/// The transfer task ended before the prefill did (the receiver went away).
fn transfer_closed() -> Status {
    pb::WorkerError::status(
        pb::worker_error::Kind::Transfer,
        tonic::Code::Unavailable,
        "KV transfer closed",
    )
}

/// What the transfer task sends, in order: header, layer chunks, resume state.
pub enum Outgoing {
    /// Encoded `KvHeader`.
    Header(Vec<u8>),
    /// One layer's rows for one chunk.
    Chunk(LayerChunk),
    /// JSON `ResumeState` (first token, sampler position).
    Resume(Vec<u8>),
}

/// One prefill to run.
pub struct Job {
    /// Request id.
    pub id: u64,
    /// Prompt tokens, followed (for a migrating request) by the tokens it generated.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt; `tokens.len()` for a fresh request.
    pub prompt_len: usize,
    /// Sampling (the first token is sampled here).
    pub params: SamplingParams,
    /// The transfer task's input.
    pub out: mpsc::Sender<Outgoing>,
    /// Set when the caller gave up.
    pub cancel: CancellationToken,
    /// The first token and the prompt tokens reused from the prefix cache, or why not.
    pub reply: oneshot::Sender<Result<(TokenEvent, usize), Status>>,
}

/// The prefill engine thread.
pub struct EngineLoop {
    engine: Engine,
    stats: SharedStats,
    queue: VecDeque<Job>,
    current: Option<(Job, Instant)>,
    ttft: Ema,
    delay: Option<std::time::Duration>,
    /// Test knob: panic at this prefill chunk (`XPYD_DEBUG_PANIC`).
    panic_at: Option<u64>,
    /// Prefill chunks run.
    steps: u64,
}

impl EngineLoop {
    /// A loop around a loaded engine.
    pub fn new(engine: Engine, stats: SharedStats, delay: Option<std::time::Duration>) -> Self {
        EngineLoop {
            engine,
            stats,
            queue: VecDeque::new(),
            current: None,
            ttft: Ema::new(0.2),
            delay,
            panic_at: None,
            steps: 0,
        }
    }

    /// Test knob: panic at prefill chunk `n` (see `xpyd_runtime::lifecycle::debug_panic_after`).
    pub fn panic_after(mut self, n: Option<u64>) -> Self {
        self.panic_at = n;
        self
    }

    /// Runs until the job channel closes and the queue is empty; gives back the engine
    /// (for the worker's next role).
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) -> Engine {
        loop {
            if self.current.is_none() && self.queue.is_empty() {
                self.publish();
                match rx.blocking_recv() {
                    Some(j) => self.queue.push_back(j),
                    None => return self.engine,
                }
            }
            while let Ok(j) = rx.try_recv() {
                self.queue.push_back(j);
            }
            self.drop_cancelled();
            if self.current.is_none() {
                self.start_next();
            }
            self.step();
            self.publish();
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|j| !j.cancel.is_cancelled());
        let gone = (before - self.queue.len()) as u64;
        if gone > 0 {
            self.count("cancelled", gone);
        }
    }

    fn count(&self, outcome: &'static str, n: u64) {
        metrics::counter!(m::WORKER_REQUESTS_TOTAL, "role" => "prefill", "outcome" => outcome)
            .increment(n);
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.requests_total += n;
        if outcome == "cancelled" {
            s.requests_cancelled += n;
        }
    }

    fn start_next(&mut self) {
        while let Some(job) = self.queue.pop_front() {
            let admitted = if job.prompt_len < job.tokens.len() {
                self.engine.add_resumed(
                    job.id,
                    job.tokens.clone(),
                    job.prompt_len,
                    job.params.clone(),
                )
            } else {
                self.engine
                    .add_sequence(job.id, job.tokens.clone(), job.params.clone())
            };
            let setup = admitted.and_then(|()| self.engine.export_header(job.id));
            match setup {
                Ok(header) => {
                    let mut bytes = Vec::new();
                    header.encode(&mut bytes);
                    if job.out.blocking_send(Outgoing::Header(bytes)).is_err() {
                        self.finish(job, Err(transfer_closed()));
                        continue;
                    }
                    self.current = Some((job, Instant::now()));
                    return;
                }
                Err(e) => {
                    let status = engine_status(&e);
                    self.finish(job, Err(status));
                }
            }
        }
    }

    /// Frees the sequence and answers the caller.
    fn finish(&mut self, job: Job, res: Result<TokenEvent, Status>) {
        let reused = self.engine.reused_tokens(job.id);
        // With the prefix cache on, its full prompt blocks stay cached.
        self.engine.remove(job.id);
        let res = res.map(|first| (first, reused));
        let outcome = match &res {
            Ok(_) => "ok",
            Err(_) if job.cancel.is_cancelled() => "cancelled",
            Err(_) => "error",
        };
        self.count(outcome, 1);
        let _ = job.reply.send(res);
    }

    /// One chunk of the current prefill.
    fn step(&mut self) {
        let Some((job, started)) = self.current.take() else {
            return;
        };
        if job.cancel.is_cancelled() {
            self.finish(job, Err(cancelled_status("prefill cancelled")));
            return;
        }
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.steps += 1;
        if self.panic_at == Some(self.steps) {
            panic!(
                "XPYD_DEBUG_PANIC: the engine thread panics at prefill chunk {}",
                self.steps
            );
        }
        let out = job.out.clone();
        let mut closed = false;
        let res = self.engine.prefill_chunk(job.id, &mut |c| {
            if !closed && out.blocking_send(Outgoing::Chunk(c)).is_err() {
                closed = true;
            }
        });
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prefill_chunks_total += 1;
        match res {
            Err(e) => self.finish(job, Err(engine_status(&e))),
            Ok(_) if closed => self.finish(job, Err(transfer_closed())),
            Ok(None) => self.current = Some((job, started)),
            Ok(Some(first)) => {
                let resume = self
                    .engine
                    .resume_state(job.id)
                    .map_err(|e| engine_status(&e))
                    .and_then(|s| {
                        serde_json::to_vec(&s).map_err(|e| Status::internal(e.to_string()))
                    });
                let res = match resume {
                    Ok(bytes) => match job.out.blocking_send(Outgoing::Resume(bytes)) {
                        Ok(()) => Ok(first),
                        Err(_) => Err(transfer_closed()),
                    },
                    Err(s) => Err(s),
                };
                let secs = started.elapsed().as_secs_f64();
                metrics::histogram!(m::WORKER_PREFILL_SECONDS).record(secs);
                self.ttft.observe(secs * 1e3);
                self.finish(job, res);
            }
        }
    }

    fn publish(&self) {
        let kv = self.engine.kv_usage();
        let running = self.current.is_some() as u32;
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.queued = self.queue.len() as u32;
        s.running = running;
        s.kv_blocks_used = kv.used_blocks as u32;
        s.kv_blocks_free = kv.free_blocks as u32;
        s.ttft_ms = self.ttft.get();
        let p = self.engine.prefix_stats();
        s.prefix_lookup_tokens = p.lookup_tokens;
        s.prefix_hit_tokens = p.hit_tokens;
        if p.lookup_tokens > 0 {
            metrics::gauge!(m::WORKER_PREFIX_CACHE_HIT_RATIO)
                .set(p.hit_tokens as f64 / p.lookup_tokens as f64);
        }
        metrics::gauge!(m::WORKER_QUEUE_DEPTH, "role" => "prefill").set(s.queued as f64);
        metrics::gauge!(m::WORKER_RUNNING, "role" => "prefill").set(running as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_USED).set(kv.used_blocks as f64);
        metrics::gauge!(m::WORKER_KV_BLOCKS_FREE).set(kv.free_blocks as f64);
    }
}

/// Stats snapshot type re-exported for the service.
pub type Stats = pb::WorkerStats;
