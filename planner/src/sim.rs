//! A discrete-event simulator of the cluster on a virtual clock, for the modes the
//! product runs:
//!
//! - **disaggregated xPyD**: the coordinator admits a request when a decode worker has a
//!   free slot (`max_running`) and KV blocks for prompt + output (else it waits in the
//!   admission queue, FCFS, up to `queue_timeout_s`, at most `max_queue` deep; beyond →
//!   rejected); the decode worker's engine loop grants the KV reservation between its
//!   steps (so a prompt reaches a prefill worker only when the decode step in progress
//!   has ended); a prefill worker (round robin or fewest queued) computes the prompt
//!   FCFS, one request at a time, and its first token; the KV streams to the decode
//!   worker (only the exposed share of the transfer delays it), whose loop finishes the
//!   import between steps too — the first token is answered once it has; then the
//!   decode worker runs continuous-batching steps over every sequence it holds.
//! - **aggregated**: combined workers run the decode worker's loop — each iteration one
//!   prefill chunk of the oldest prefilling request, then one decode step over every
//!   decoding sequence (including one whose prefill just finished), as
//!   the worker's decode role (`worker/src/decode`) does.
//!
//! Output per request: TTFT, TPOT, E2E and queueing (or rejected / unfinished); per
//! worker: utilisation, mean queue, mean batch, peak KV blocks.

use crate::PlanError;
use crate::service::ServiceModel;
use crate::traffic::SimRequest;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

/// How the cluster is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Layout {
    /// `prefill` prefill workers and `decode` decode workers.
    Disaggregated {
        /// Prefill workers.
        prefill: u32,
        /// Decode workers.
        decode: u32,
    },
    /// `workers` combined workers.
    Aggregated {
        /// Combined workers.
        workers: u32,
    },
}

impl Layout {
    /// Workers in all.
    pub fn units(&self) -> u32 {
        match *self {
            Layout::Disaggregated { prefill, decode } => prefill + decode,
            Layout::Aggregated { workers } => workers,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Disaggregated { prefill, decode } => write!(f, "{prefill}P{decode}D"),
            Layout::Aggregated { workers } => write!(f, "aggregated ×{workers}"),
        }
    }
}

/// How the coordinator picks a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Policy {
    /// Rotate in id order.
    RoundRobin,
    /// Fewest requests in flight (lowest id on ties).
    LeastConnections,
}

/// The cluster's settings that shape latency.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClusterConfig {
    /// Workers and their roles.
    pub layout: Layout,
    /// Sequences a decode (or combined) worker runs at once.
    pub max_running: u32,
    /// KV blocks of a decode (or combined) worker.
    pub kv_blocks: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Admission queue depth (beyond it a request is rejected at once).
    pub max_queue: usize,
    /// How long a request may wait for admission before it is rejected.
    pub queue_timeout_s: f64,
    /// Prefill worker choice.
    pub prefill_policy: Policy,
    /// Decode (or combined) worker choice.
    pub decode_policy: Policy,
    /// How long after the last arrival the run may go on; what has not finished by
    /// then is unfinished (an SLO miss).
    pub drain_s: f64,
}

/// Tokens per KV block: the workers' default (`block_size` of the engine).
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

impl ClusterConfig {
    /// The product's defaults (coordinator and workers) for `layout`.
    pub fn defaults(layout: Layout) -> Self {
        ClusterConfig {
            layout,
            max_running: 16,
            kv_blocks: 4096,
            block_size: DEFAULT_BLOCK_SIZE,
            max_queue: 256,
            queue_timeout_s: 10.0,
            prefill_policy: Policy::RoundRobin,
            decode_policy: Policy::LeastConnections,
            drain_s: 600.0,
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        let (p, d) = match self.layout {
            Layout::Disaggregated { prefill, decode } => (prefill, decode),
            Layout::Aggregated { workers } => (1, workers),
        };
        if p == 0 || d == 0 {
            return Err(PlanError::invalid(
                "layout",
                format!("{}: every role needs at least one worker", self.layout),
            ));
        }
        if self.layout.units() > 100_000 {
            return Err(PlanError::invalid("layout", "more than 100,000 workers"));
        }
        for (field, v) in [
            ("max_running", self.max_running),
            ("kv_blocks", self.kv_blocks),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(PlanError::invalid(field, "must be at least 1"));
            }
        }
        for (field, v) in [
            ("queue_timeout_s", self.queue_timeout_s),
            ("drain_s", self.drain_s),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(PlanError::invalid(field, format!("{v} is not a time ≥ 0")));
            }
        }
        Ok(())
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Outcome {
    /// Every token generated.
    Finished,
    /// Never admitted (queue full, timed out, or larger than any worker's KV).
    Rejected,
    /// Still running when the run ended.
    Unfinished,
}

/// What happened to one request (times in seconds; NaN where it never happened).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RequestResult {
    /// Time to the first token.
    pub ttft: f64,
    /// Mean time per output token after the first (0 for one token).
    pub tpot: f64,
    /// Arrival to the last token.
    pub e2e: f64,
    /// Waiting before any work: admission, then the prefill queue.
    pub queueing: f64,
    /// Of that, waiting for admission (a decode slot and KV blocks).
    pub admission: f64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Which kind of worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum WorkerRole {
    /// Prefill worker.
    Prefill,
    /// Decode worker.
    Decode,
    /// Combined worker.
    Combined,
}

/// One worker over the run.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WorkerStats {
    /// Its role.
    pub role: WorkerRole,
    /// Busy share of the run.
    pub utilisation: f64,
    /// Time-averaged requests waiting at it (prefill queue; prefilling requests of a
    /// combined worker).
    pub mean_queue: f64,
    /// Mean sequences per decode step.
    pub mean_batch: f64,
    /// Peak KV blocks in use.
    pub peak_kv_blocks: u32,
    /// Share of its busy time spent in prefill chunks (combined workers).
    pub prefill_share: f64,
}

/// A run's results.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// One per request, in arrival order.
    pub requests: Vec<RequestResult>,
    /// Prefill workers first, then decode (or combined) workers.
    pub workers: Vec<WorkerStats>,
    /// Virtual time at the end.
    pub end: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ev {
    Arrival(u32),
    Timeout(u32),
    PrefillDone(u32),
    Joined(u32),
    Iteration(u32),
}

#[derive(Debug, Clone, Copy)]
struct Timed {
    t: f64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Arrived,
    Queued,
    Prefill,
    Transfer,
    Decoding,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Req {
    stage: Stage,
    /// Decode (or combined) worker.
    worker: u32,
    admitted: f64,
    started: f64,
    first: f64,
    last: f64,
    /// Tokens generated so far (the first counts).
    generated: u32,
    /// Prompt tokens computed so far (combined).
    prefilled: u32,
    blocks: u32,
}

/// A prefill worker.
#[derive(Debug, Default)]
struct PrefillW {
    queue: VecDeque<u32>,
    current: Option<u32>,
    busy: f64,
    queue_area: f64,
    last_change: f64,
}

/// A decode or combined worker (the same engine loop).
#[derive(Debug, Default)]
struct EngineW {
    /// Admitted here (slots in use).
    inflight: u32,
    free_blocks: u32,
    peak_blocks: u32,
    /// Combined: waiting for or in prefill, oldest first.
    prefilling: VecDeque<u32>,
    /// Generating.
    decoding: Vec<u32>,
    /// Sum of the decoding sequences' contexts.
    context_sum: f64,
    /// Arrived (transfer done) since the iteration began: join the next.
    joining: Vec<u32>,
    /// Admitted while an iteration ran: their KV reservation is granted when it ends.
    reserving: Vec<u32>,
    /// Transfers done while an iteration ran: their import ends when it ends.
    committing: Vec<u32>,
    /// Finished by this iteration's prefill chunk (one output token).
    done_at_end: Vec<u32>,
    running: bool,
    busy: f64,
    prefill_busy: f64,
    steps: u64,
    batch_sum: u64,
    queue_area: f64,
    last_change: f64,
}

struct Sim<'a> {
    m: &'a ServiceModel,
    c: &'a ClusterConfig,
    reqs: &'a [SimRequest],
    st: Vec<Req>,
    heap: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    prefill: Vec<PrefillW>,
    engines: Vec<EngineW>,
    waiting: VecDeque<u32>,
    rr_prefill: usize,
    rr_decode: usize,
    aggregated: bool,
    /// A slot was freed while handling the current event.
    freed: bool,
}

/// Simulates `reqs` (in arrival order) on `cluster` with service model `m`.
///
/// # Errors
/// [`PlanError::Invalid`] for a bad model, cluster or request list (naming the field).
pub fn simulate(
    m: &ServiceModel,
    cluster: &ClusterConfig,
    reqs: &[SimRequest],
) -> Result<SimResult, PlanError> {
    m.validate()?;
    cluster.validate()?;
    if reqs.len() > u32::MAX as usize / 2 {
        return Err(PlanError::invalid("requests", "too many"));
    }
    if reqs.windows(2).any(|w| w[1].arrival < w[0].arrival) {
        return Err(PlanError::invalid("requests", "arrivals must be in order"));
    }
    let (np, ne, aggregated) = match cluster.layout {
        Layout::Disaggregated { prefill, decode } => (prefill, decode, false),
        Layout::Aggregated { workers } => (0, workers, true),
    };
    let mut s = Sim {
        m,
        c: cluster,
        reqs,
        st: vec![
            Req {
                stage: Stage::Arrived,
                worker: 0,
                admitted: f64::NAN,
                started: f64::NAN,
                first: f64::NAN,
                last: f64::NAN,
                generated: 0,
                prefilled: 0,
                blocks: 0,
            };
            reqs.len()
        ],
        heap: BinaryHeap::with_capacity(1024),
        seq: 0,
        now: 0.0,
        prefill: (0..np).map(|_| PrefillW::default()).collect(),
        engines: (0..ne)
            .map(|_| EngineW {
                free_blocks: cluster.kv_blocks,
                ..EngineW::default()
            })
            .collect(),
        waiting: VecDeque::new(),
        rr_prefill: 0,
        rr_decode: 0,
        aggregated,
        freed: false,
    };
    Ok(s.run())
}

impl Sim<'_> {
    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn run(&mut self) -> SimResult {
        // Arrivals are fed one at a time (the heap stays small).
        if !self.reqs.is_empty() {
            self.at(self.reqs[0].arrival, Ev::Arrival(0));
        }
        let last_arrival = self.reqs.last().map_or(0.0, |r| r.arrival);
        let stop = last_arrival + self.c.drain_s;
        while let Some(Timed { t, ev, .. }) = self.heap.pop() {
            if t > stop {
                self.now = stop;
                break;
            }
            if let Ev::Timeout(i) = ev
                && self.st[i as usize].stage != Stage::Queued
            {
                continue; // admitted in time: not an event of the run
            }
            self.now = t;
            match ev {
                Ev::Arrival(i) => {
                    if let Some(next) = self.reqs.get(i as usize + 1) {
                        self.at(next.arrival, Ev::Arrival(i + 1));
                    }
                    self.arrive(i);
                }
                Ev::Timeout(i) => self.st[i as usize].stage = Stage::Done,
                Ev::PrefillDone(p) => self.prefill_done(p),
                Ev::Joined(i) => self.joined(i),
                Ev::Iteration(w) => self.iteration_done(w),
            }
            if std::mem::take(&mut self.freed) {
                self.dispatch();
            }
        }
        self.results()
    }

    /// KV blocks request `i` needs at its decode worker (prompt + output).
    fn blocks(&self, i: u32) -> u32 {
        let r = &self.reqs[i as usize];
        (r.input + r.output).div_ceil(self.c.block_size)
    }

    fn arrive(&mut self, i: u32) {
        let need = self.blocks(i);
        if need > self.c.kv_blocks {
            self.st[i as usize].stage = Stage::Done; // larger than any worker: rejected
            return;
        }
        if self.waiting.is_empty()
            && let Some(w) = self.pick_engine(need)
        {
            self.admit(i, w);
            return;
        }
        if self.queued() >= self.c.max_queue {
            self.st[i as usize].stage = Stage::Done;
            return;
        }
        self.st[i as usize].stage = Stage::Queued;
        self.waiting.push_back(i);
        self.at(self.now + self.c.queue_timeout_s, Ev::Timeout(i));
    }

    /// Requests really waiting (timed-out ones leave the deque lazily).
    fn queued(&mut self) -> usize {
        while let Some(&h) = self.waiting.front() {
            if self.st[h as usize].stage == Stage::Queued {
                break;
            }
            self.waiting.pop_front();
        }
        self.waiting.len()
    }

    /// Admits waiting requests, FCFS, while the head finds room.
    fn dispatch(&mut self) {
        while self.queued() > 0 {
            let Some(&h) = self.waiting.front() else {
                return;
            };
            let Some(w) = self.pick_engine(self.blocks(h)) else {
                return;
            };
            self.waiting.pop_front();
            self.admit(h, w);
        }
    }

    fn pick_engine(&mut self, need: u32) -> Option<u32> {
        let n = self.engines.len();
        let fits = |e: &EngineW| e.inflight < self.c.max_running && e.free_blocks >= need;
        match self.c.decode_policy {
            Policy::LeastConnections => self
                .engines
                .iter()
                .enumerate()
                .filter(|(_, e)| fits(e))
                .min_by_key(|(i, e)| (e.inflight, *i))
                .map(|(i, _)| i as u32),
            Policy::RoundRobin => {
                let found = (0..n)
                    .map(|k| (self.rr_decode + k) % n)
                    .find(|&i| fits(&self.engines[i]))?;
                self.rr_decode = found + 1;
                Some(found as u32)
            }
        }
    }

    fn admit(&mut self, i: u32, w: u32) {
        let need = self.blocks(i);
        let now = self.now;
        let e = &mut self.engines[w as usize];
        e.inflight += 1;
        e.free_blocks -= need;
        e.peak_blocks = e.peak_blocks.max(self.c.kv_blocks - e.free_blocks);
        let st = &mut self.st[i as usize];
        st.worker = w;
        st.blocks = need;
        st.admitted = now;
        st.stage = Stage::Prefill;
        if self.aggregated {
            self.engine_queue_change(w);
            self.engines[w as usize].prefilling.push_back(i);
            self.kick(w);
        } else if self.engines[w as usize].running {
            self.engines[w as usize].reserving.push(i);
        } else {
            self.send_to_prefill(i);
        }
    }

    /// Request `i` has its KV reservation: its prompt goes to a prefill worker.
    fn send_to_prefill(&mut self, i: u32) {
        let p = self.pick_prefill();
        self.prefill_queue_change(p);
        self.prefill[p as usize].queue.push_back(i);
        if self.prefill[p as usize].current.is_none() {
            self.start_prefill(p);
        }
    }

    fn pick_prefill(&mut self) -> u32 {
        let n = self.prefill.len();
        match self.c.prefill_policy {
            Policy::RoundRobin => {
                let p = self.rr_prefill % n;
                self.rr_prefill = p + 1;
                p as u32
            }
            Policy::LeastConnections => self
                .prefill
                .iter()
                .enumerate()
                .min_by_key(|(i, p)| (p.queue.len() + usize::from(p.current.is_some()), *i))
                .map_or(0, |(i, _)| i as u32),
        }
    }

    fn prefill_queue_change(&mut self, p: u32) {
        let now = self.now;
        let w = &mut self.prefill[p as usize];
        w.queue_area += w.queue.len() as f64 * (now - w.last_change);
        w.last_change = now;
    }

    fn engine_queue_change(&mut self, e: u32) {
        let now = self.now;
        let w = &mut self.engines[e as usize];
        w.queue_area += w.prefilling.len() as f64 * (now - w.last_change);
        w.last_change = now;
    }

    fn start_prefill(&mut self, p: u32) {
        self.prefill_queue_change(p);
        let Some(i) = self.prefill[p as usize].queue.pop_front() else {
            return;
        };
        let r = self.reqs[i as usize];
        let t = self.m.prefill_time(r.input - r.cached);
        self.st[i as usize].started = self.now;
        let w = &mut self.prefill[p as usize];
        w.current = Some(i);
        w.busy += t;
        self.at(self.now + t, Ev::PrefillDone(p));
    }

    fn prefill_done(&mut self, p: u32) {
        let Some(i) = self.prefill[p as usize].current.take() else {
            return;
        };
        let r = self.reqs[i as usize];
        let now = self.now;
        self.st[i as usize].stage = Stage::Transfer;
        let compute = self.m.prefill_time(r.input - r.cached);
        let exposed = self.m.transfer_exposed(r.input, compute);
        self.at(now + exposed, Ev::Joined(i));
        self.start_prefill(p);
    }

    /// Request `i`'s KV has arrived. Its first token, which the prefill worker sampled,
    /// is answered now: the prefill call returns once the transfer is committed, without
    /// waiting for the decode worker. With one output token the request is done; else
    /// the decode worker's loop imports it between steps.
    fn joined(&mut self, i: u32) {
        let now = self.now;
        let st = &mut self.st[i as usize];
        st.first = now;
        st.last = now;
        st.generated = 1;
        if self.reqs[i as usize].output <= 1 {
            self.finish(i);
            return;
        }
        let w = st.worker;
        if self.engines[w as usize].running {
            self.engines[w as usize].committing.push(i);
        } else {
            self.committed(i);
            self.kick(w);
        }
    }

    /// Request `i`'s import has ended: it joins the next decode step.
    fn committed(&mut self, i: u32) {
        let st = &mut self.st[i as usize];
        st.stage = Stage::Decoding;
        let w = st.worker;
        self.engines[w as usize].joining.push(i);
    }

    /// Starts an iteration on worker `w` if it is idle and has work.
    fn kick(&mut self, w: u32) {
        if self.engines[w as usize].running {
            return;
        }
        let now = self.now;
        // Sequences that arrived join now.
        let joining = std::mem::take(&mut self.engines[w as usize].joining);
        for i in joining {
            let ctx = self.context(i);
            let e = &mut self.engines[w as usize];
            e.decoding.push(i);
            e.context_sum += ctx;
        }
        let mut t = 0.0;
        // Combined: one chunk of the oldest prefilling request first.
        if let Some(&i) = self.engines[w as usize].prefilling.front() {
            let r = self.reqs[i as usize];
            let st = &mut self.st[i as usize];
            if st.prefilled == 0 {
                st.started = now;
                st.prefilled = r.cached;
            }
            let from = st.prefilled - r.cached;
            let to = (from + self.m.chunk).min(r.input - r.cached);
            let chunk = self.m.chunk_time(from, to);
            st.prefilled = r.cached + to;
            t += chunk;
            self.engines[w as usize].prefill_busy += chunk;
            if to == r.input - r.cached {
                self.engine_queue_change(w);
                self.engines[w as usize].prefilling.pop_front();
                let st = &mut self.st[i as usize];
                st.first = now + chunk;
                st.last = now + chunk;
                st.generated = 1;
                st.stage = Stage::Decoding;
                if r.output <= 1 {
                    // Done at its first token, but its slot is free only when the
                    // iteration ends (the loop answers between iterations).
                    self.engines[w as usize].done_at_end.push(i);
                } else {
                    let ctx = self.context(i);
                    let e = &mut self.engines[w as usize];
                    e.decoding.push(i);
                    e.context_sum += ctx;
                }
            }
        }
        let e = &mut self.engines[w as usize];
        let n = e.decoding.len() as u32;
        if n > 0 {
            t += self.m.decode_step(n, e.context_sum);
            e.steps += 1;
            e.batch_sum += u64::from(n);
        }
        if t > 0.0 {
            e.running = true;
            e.busy += t;
            self.at(now + t, Ev::Iteration(w));
        }
    }

    /// Context of request `i` now: prompt plus generated tokens.
    fn context(&self, i: u32) -> f64 {
        f64::from(self.reqs[i as usize].input + self.st[i as usize].generated)
    }

    fn iteration_done(&mut self, w: u32) {
        let now = self.now;
        self.engines[w as usize].running = false;
        for i in std::mem::take(&mut self.engines[w as usize].done_at_end) {
            let first = self.st[i as usize].first;
            self.finish_at(i, first);
        }
        let decoding = std::mem::take(&mut self.engines[w as usize].decoding);
        let mut keep = Vec::with_capacity(decoding.len());
        for i in decoding {
            let out = self.reqs[i as usize].output;
            let st = &mut self.st[i as usize];
            st.generated += 1;
            st.last = now;
            self.engines[w as usize].context_sum += 1.0;
            if st.generated >= out {
                let ctx = self.context(i);
                self.engines[w as usize].context_sum -= ctx;
                self.finish(i);
            } else {
                keep.push(i);
            }
        }
        let e = &mut self.engines[w as usize];
        e.decoding = keep;
        if e.decoding.is_empty() {
            e.context_sum = 0.0; // no drift from float sums
        }
        // Between steps the loop answers reservations and finishes imports.
        for i in std::mem::take(&mut self.engines[w as usize].reserving) {
            self.send_to_prefill(i);
        }
        for i in std::mem::take(&mut self.engines[w as usize].committing) {
            self.committed(i);
        }
        self.kick(w);
    }

    fn finish(&mut self, i: u32) {
        self.finish_at(i, self.now);
    }

    /// Request `i` finished at `t`: its slot and blocks are free (waiting requests are
    /// admitted once the current event is handled, never in the middle of it).
    fn finish_at(&mut self, i: u32, t: f64) {
        let st = &mut self.st[i as usize];
        st.stage = Stage::Done;
        st.last = t;
        st.generated = self.reqs[i as usize].output;
        let (w, blocks) = (st.worker, st.blocks);
        let e = &mut self.engines[w as usize];
        e.inflight -= 1;
        e.free_blocks += blocks;
        self.freed = true;
    }

    fn results(&self) -> SimResult {
        let requests = self
            .reqs
            .iter()
            .zip(&self.st)
            .map(|(r, st)| {
                let done = st.stage == Stage::Done && st.generated >= r.output && !st.last.is_nan();
                let outcome = if done {
                    Outcome::Finished
                } else if st.admitted.is_nan() {
                    Outcome::Rejected
                } else {
                    Outcome::Unfinished
                };
                let tpot = if r.output > 1 && done {
                    (st.last - st.first) / f64::from(r.output - 1)
                } else if done {
                    0.0
                } else {
                    f64::NAN
                };
                RequestResult {
                    ttft: st.first - r.arrival,
                    tpot,
                    e2e: if done { st.last - r.arrival } else { f64::NAN },
                    queueing: st.started - r.arrival,
                    admission: st.admitted - r.arrival,
                    outcome,
                }
            })
            .collect();
        let span = self.now.max(1e-12);
        let mut workers: Vec<WorkerStats> = self
            .prefill
            .iter()
            .map(|p| WorkerStats {
                role: WorkerRole::Prefill,
                utilisation: (p.busy / span).min(1.0),
                mean_queue: p.queue_area / span,
                mean_batch: 1.0,
                peak_kv_blocks: 0,
                prefill_share: 1.0,
            })
            .collect();
        workers.extend(self.engines.iter().map(|e| WorkerStats {
            role: if self.aggregated {
                WorkerRole::Combined
            } else {
                WorkerRole::Decode
            },
            utilisation: (e.busy / span).min(1.0),
            mean_queue: e.queue_area / span,
            mean_batch: if e.steps == 0 {
                0.0
            } else {
                e.batch_sum as f64 / e.steps as f64
            },
            peak_kv_blocks: e.peak_blocks,
            prefill_share: if e.busy > 0.0 {
                e.prefill_busy / e.busy
            } else {
                0.0
            },
        }));
        SimResult {
            requests,
            workers,
            end: self.now,
        }
    }
}
