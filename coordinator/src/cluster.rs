//! The coordinator's view of the cluster and its admission gate: registered workers with
//! their leases, reported load and coordinator-side in-flight counts; the routers of both
//! legs; and the priority queue of requests waiting for decode capacity. One mutex guards
//! it all (every operation is short and synchronous); waiters are woken with oneshots.

use crate::router::{AdmissionQueue, Candidate, Ema, PolicyKind, Pushed, RouteInput, Router};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use xpyd_proto as pb;
use xpyd_runtime::metrics as m;

/// The two legs of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Prefill workers.
    Prefill,
    /// Decode or combined workers (whichever the deployment runs).
    Decode,
}

/// One registered worker.
#[derive(Debug)]
pub struct Worker {
    /// Identity as registered.
    pub info: pb::WorkerInfo,
    /// Last reported load.
    pub load: pb::Load,
    /// Lease id (embedded registry) and when it lapses; `None` for etcd (etcd expires).
    pub lease: Option<(u64, Instant)>,
    /// Requests this coordinator has in flight on it.
    pub inflight: u32,
    /// Marked unreachable until then.
    pub down_until: Option<Instant>,
    /// TTFT (decode leg) or prefill latency (prefill leg) seen by the coordinator, ms.
    pub ttft: Ema,
    /// Requests routed here in total.
    pub routed: u64,
    /// gRPC channel (lazy; tonic reconnects).
    pub channel: Channel,
    /// When it registered (again, after a restart) or first appeared in etcd.
    pub joined: Instant,
}

impl Worker {
    fn leg(&self) -> Option<Leg> {
        match self.info.role.as_str() {
            "prefill" => Some(Leg::Prefill),
            "decode" | "combined" => Some(Leg::Decode),
            _ => None,
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.lease.is_none_or(|(_, until)| until > now) && self.down_until.is_none_or(|t| t <= now)
    }

    /// Takes new requests: ready and not draining (a draining worker still serves the
    /// streams it has).
    fn routable(&self, now: Instant) -> bool {
        self.ready(now) && !self.load.draining
    }

    fn capacity(&self) -> u32 {
        if self.info.max_running == 0 {
            16
        } else {
            self.info.max_running
        }
    }
}

/// A request's routing facts.
#[derive(Debug, Clone)]
pub struct RouteFacts {
    /// The client's address.
    pub source_ip: Option<IpAddr>,
    /// Prompt tokens.
    pub tokens: Arc<[u32]>,
    /// SLO class 0..=3.
    pub class: u8,
    /// gRPC URLs of workers that already failed this request: it never goes back to them.
    pub exclude: Vec<String>,
}

/// Why no worker was assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Overload {
    /// No ready worker of the leg exists.
    #[error("no ready {0} workers")]
    NoWorkers(&'static str),
    /// Waited the whole queue timeout without a free worker.
    #[error("all workers are busy; waited {0:?}")]
    Timeout(Duration),
    /// The waiting queue is full (or this request was shed for a higher class).
    #[error("the request queue is full")]
    QueueFull,
}

struct Waiter {
    facts: RouteFacts,
    tx: oneshot::Sender<Slot>,
}

struct State {
    workers: HashMap<String, Worker>,
    routers: [Router; 2],
    waiting: AdmissionQueue<Waiter>,
    /// Worker ids the supervisor took out of routing (readiness failed, draining).
    unroutable: HashSet<String>,
    /// The roots workers' TLS certificates must chain to (the internal plane's CA).
    roots: Option<xpyd_runtime::tls::Roots>,
}

/// Shared cluster state.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Mutex<State>>,
}

/// A worker assigned to a request; dropping it ends the request's hold on the worker.
pub struct Slot {
    cluster: Cluster,
    /// The worker id.
    pub worker_id: String,
    /// Its gRPC channel.
    pub channel: Channel,
    /// Its gRPC URL (a rebuilt worker of the same id has a new one).
    pub url: String,
    leg: Leg,
    released: bool,
}

impl Slot {
    /// Records an observed latency (ms) for the worker's TTFT average.
    pub fn observe_ttft(&self, ms: f64) {
        if let Some(w) = self.cluster.lock().workers.get_mut(&self.worker_id) {
            w.ttft.observe(ms);
        }
    }

    /// Marks the worker unreachable for `d` (it leaves routing until then).
    pub fn mark_down(&self, d: Duration) {
        if let Some(w) = self.cluster.lock().workers.get_mut(&self.worker_id) {
            tracing::warn!(worker_id = %self.worker_id, "worker unreachable; marked down");
            w.down_until = Some(Instant::now() + d);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            self.cluster.release(&self.worker_id, self.leg);
        }
    }
}

/// How many worker ids may be out of routing at once (the admin switch's set is bounded
/// whatever callers send; a cluster has far fewer workers).
pub const MAX_UNROUTABLE: usize = 1024;

/// How often the coordinator pings each worker connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

fn leg_index(l: Leg) -> usize {
    match l {
        Leg::Prefill => 0,
        Leg::Decode => 1,
    }
}

impl Cluster {
    /// Empty cluster with these routers and a queue of `max_queue` waiters.
    pub fn new(prefill: Router, decode: Router, max_queue: usize) -> Self {
        Cluster {
            inner: Arc::new(Mutex::new(State {
                workers: HashMap::new(),
                routers: [prefill, decode],
                waiting: AdmissionQueue::new(max_queue),
                unroutable: HashSet::new(),
                roots: None,
            })),
        }
    }

    /// Dials workers that serve `https://` over TLS trusting only `roots`.
    #[must_use]
    pub fn with_roots(self, roots: Option<xpyd_runtime::tls::Roots>) -> Self {
        self.lock().roots = roots;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing policy of a leg.
    pub fn policy(&self, leg: Leg) -> PolicyKind {
        self.lock().routers[leg_index(leg)].kind()
    }

    /// Adds or refreshes a worker; with `ttl`, under a new lease (returned).
    pub fn upsert(&self, info: pb::WorkerInfo, load: pb::Load, ttl: Option<Duration>) -> u64 {
        self.join(info, load, ttl, false).unwrap_or(0)
    }

    /// Registers a worker under a new lease of `ttl` (its random id returned), unless a
    /// live worker at another address holds its id: a registration never takes another
    /// worker's identity (and so its requests). The id is free again once that worker
    /// deregisters or its lease lapses; the same worker at the same address may register
    /// again at any time (a new lease replaces its old one).
    ///
    /// # Errors
    /// Who holds the id.
    pub fn register(&self, info: pb::WorkerInfo, ttl: Duration) -> Result<u64, String> {
        self.join(info, pb::Load::default(), Some(ttl), true)
    }

    fn join(
        &self,
        info: pb::WorkerInfo,
        load: pb::Load,
        ttl: Option<Duration>,
        exclusive: bool,
    ) -> Result<u64, String> {
        let now = Instant::now();
        let mut st = self.lock();
        if exclusive
            && let Some(w) = st.workers.get(&info.worker_id)
            && w.info.grpc_url != info.grpc_url
            && w.lease.is_none_or(|(_, until)| until > now)
        {
            return Err(format!(
                "worker_id `{}` is held by a live worker at {}; it is free once that one deregisters or its lease lapses",
                info.worker_id, w.info.grpc_url
            ));
        }
        // Lease ids are random: a caller cannot renew or end another worker's lease by
        // guessing its id.
        let lease = ttl.map(|t| (crate::random_u64().max(1), now + t));
        let id = info.worker_id.clone();
        match st.workers.get_mut(&id) {
            Some(w) if w.info.grpc_url == info.grpc_url => {
                w.info = info;
                w.load = load;
                if lease.is_some() {
                    w.lease = lease;
                }
                if exclusive {
                    w.joined = now;
                }
            }
            _ => {
                // HTTP/2 and TCP keepalive: a frozen or partitioned worker stops answering
                // pings, its connection fails within about 1.5 s, and its streams migrate.
                let channel = xpyd_runtime::tls::endpoint(&info.grpc_url, st.roots.as_ref())
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(2))
                            .tcp_nodelay(true)
                            .tcp_keepalive(Some(Duration::from_secs(1)))
                            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                            .keep_alive_while_idle(true)
                            .connect_lazy()
                    })
                    .unwrap_or_else(|_| {
                        Endpoint::from_static("http://invalid.invalid:1").connect_lazy()
                    });
                tracing::info!(worker_id = %id, role = %info.role, url = %info.grpc_url, "worker joined");
                st.workers.insert(
                    id,
                    Worker {
                        info,
                        load,
                        lease,
                        inflight: 0,
                        down_until: None,
                        ttft: Ema::new(0.3),
                        routed: 0,
                        channel,
                        joined: now,
                    },
                );
            }
        }
        self.publish(&st);
        drop(st);
        self.dispatch();
        Ok(lease.map(|l| l.0).unwrap_or(0))
    }

    /// Renews a lease and records load; false when the lease is unknown or expired.
    pub fn heartbeat(&self, lease_id: u64, load: pb::Load, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.values_mut().find(|w| {
            w.lease
                .is_some_and(|(id, until)| id == lease_id && until > now)
        }) else {
            return false;
        };
        w.lease = Some((lease_id, now + ttl));
        w.load = load;
        drop(st);
        self.dispatch();
        true
    }

    /// Removes the worker holding `lease_id`.
    pub fn deregister(&self, lease_id: u64) {
        let mut st = self.lock();
        let ids: Vec<String> = st
            .workers
            .iter()
            .filter(|(_, w)| w.lease.is_some_and(|(id, _)| id == lease_id))
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            Self::remove_locked(&mut st, &id, "deregistered");
        }
        self.publish(&st);
    }

    /// Removes a worker by id (etcd delete).
    pub fn remove(&self, worker_id: &str) {
        let mut st = self.lock();
        Self::remove_locked(&mut st, worker_id, "lease gone");
        self.publish(&st);
    }

    fn remove_locked(st: &mut State, id: &str, why: &str) {
        if st.workers.remove(id).is_some() {
            tracing::info!(worker_id = %id, why, "worker left");
            for r in &mut st.routers {
                r.forget(id);
            }
        }
    }

    /// Drops workers whose lease lapsed.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let gone: Vec<String> = st
            .workers
            .iter()
            .filter(|(_, w)| w.lease.is_some_and(|(_, until)| until <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for id in &gone {
            Self::remove_locked(&mut st, id, "lease expired");
        }
        if !gone.is_empty() {
            self.publish(&st);
        }
    }

    fn publish(&self, st: &State) {
        let now = Instant::now();
        for role in ["prefill", "decode", "combined"] {
            let (mut ready, mut down) = (0, 0);
            for w in st.workers.values().filter(|w| w.info.role == role) {
                if w.ready(now) {
                    ready += 1;
                } else {
                    down += 1;
                }
            }
            metrics::gauge!(m::COORD_WORKERS, "role" => role, "state" => "ready").set(ready as f64);
            metrics::gauge!(m::COORD_WORKERS, "role" => role, "state" => "down").set(down as f64);
        }
        let by = st.waiting.len_by_class();
        for (c, n) in by.iter().enumerate() {
            metrics::gauge!(m::COORD_QUEUE_DEPTH, "class" => c.to_string()).set(*n as f64);
        }
    }

    /// Ready workers of `leg` (with room when `need_capacity`), except those at the
    /// `exclude`d URLs.
    fn candidates(st: &State, leg: Leg, need_capacity: bool, exclude: &[String]) -> Vec<Candidate> {
        let now = Instant::now();
        let mut c: Vec<Candidate> = st
            .workers
            .values()
            .filter(|w| w.leg() == Some(leg) && w.routable(now))
            .filter(|w| !st.unroutable.contains(&w.info.worker_id))
            .filter(|w| !exclude.contains(&w.info.grpc_url))
            .filter(|w| !need_capacity || w.inflight < w.capacity())
            .map(|w| {
                let total = w.load.kv_blocks_used + w.load.kv_blocks_free;
                Candidate {
                    id: w.info.worker_id.clone(),
                    connections: w.inflight,
                    queued: w.load.queued,
                    running: w.load.running,
                    ttft_ms: w.ttft.get(),
                    kv_used: if total == 0 {
                        0.0
                    } else {
                        w.load.kv_blocks_used as f64 / total as f64
                    },
                }
            })
            .collect();
        c.sort_by(|a, b| a.id.cmp(&b.id));
        c
    }

    /// Picks a worker of `leg` with room, or None.
    fn assign_locked(
        &self,
        st: &mut State,
        leg: Leg,
        facts: &RouteFacts,
        gate: bool,
    ) -> Option<Slot> {
        let cands = Self::candidates(st, leg, gate, &facts.exclude);
        let input = RouteInput {
            source_ip: facts.source_ip,
            tokens: &facts.tokens,
            class: facts.class,
        };
        let i = st.routers[leg_index(leg)].pick(&cands, &input)?;
        let id = cands[i].id.clone();
        st.routers[leg_index(leg)].on_routed(&id, &facts.tokens);
        let w = st.workers.get_mut(&id)?;
        w.inflight += 1;
        w.routed += 1;
        Some(Slot {
            cluster: self.clone(),
            worker_id: id,
            channel: w.channel.clone(),
            url: w.info.grpc_url.clone(),
            leg,
            released: false,
        })
    }

    /// A prefill worker for the request (no capacity gate: prefill workers queue).
    ///
    /// # Errors
    /// `NoWorkers` when none is ready.
    pub fn pick_prefill(&self, facts: &RouteFacts) -> Result<Slot, Overload> {
        let mut st = self.lock();
        self.assign_locked(&mut st, Leg::Prefill, facts, false)
            .ok_or(Overload::NoWorkers("prefill"))
    }

    /// A decode (or combined) worker with room, waiting up to `timeout` in priority order.
    ///
    /// # Errors
    /// `NoWorkers`, `QueueFull` or `Timeout`.
    pub async fn acquire_decode(
        &self,
        facts: RouteFacts,
        timeout: Duration,
    ) -> Result<Slot, Overload> {
        let (tx, mut rx) = oneshot::channel();
        let ticket = {
            let mut st = self.lock();
            if Self::candidates(&st, Leg::Decode, false, &facts.exclude).is_empty() {
                return Err(Overload::NoWorkers("decode"));
            }
            if st.waiting.is_empty()
                && let Some(s) = self.assign_locked(&mut st, Leg::Decode, &facts, true)
            {
                return Ok(s);
            }
            let class = facts.class;
            let ticket = match st.waiting.push(class, Waiter { facts, tx }) {
                Pushed::Queued(t) => t,
                Pushed::Rejected(_) => return Err(Overload::QueueFull),
                Pushed::Displaced { ticket, shed, .. } => {
                    // Dropping its sender wakes the shed waiter with an error.
                    drop(shed);
                    ticket
                }
            };
            self.publish(&st);
            ticket
        };
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(Overload::QueueFull),
            Err(_) => {
                let mut st = self.lock();
                if st.waiting.remove(ticket).is_some() {
                    self.publish(&st);
                    return Err(Overload::Timeout(timeout));
                }
                drop(st);
                // Popped and sent under the lock just before we took it.
                rx.try_recv().map_err(|_| Overload::Timeout(timeout))
            }
        }
    }

    fn release(&self, worker_id: &str, leg: Leg) {
        {
            let mut st = self.lock();
            if let Some(w) = st.workers.get_mut(worker_id) {
                w.inflight = w.inflight.saturating_sub(1);
            }
        }
        if leg == Leg::Decode {
            self.dispatch();
        }
    }

    /// Hands free decode capacity to waiters, highest class first.
    pub fn dispatch(&self) {
        let mut st = self.lock();
        while !st.waiting.is_empty() {
            if Self::candidates(&st, Leg::Decode, true, &[]).is_empty() {
                break;
            }
            let Some((class, w)) = st.waiting.pop() else {
                break;
            };
            let Some(slot) = self.assign_locked(&mut st, Leg::Decode, &w.facts, true) else {
                // Only workers this request already failed on have room: it waits on
                // (behind the others of its class).
                let _ = st.waiting.push(class, w);
                break;
            };
            if let Err(mut slot) = w.tx.send(slot) {
                // The waiter left; undo without re-entering the lock.
                slot.released = true;
                if let Some(wk) = st.workers.get_mut(&slot.worker_id) {
                    wk.inflight = wk.inflight.saturating_sub(1);
                }
            }
        }
        self.publish(&st);
    }

    /// Snapshot for `/v1/cluster` and `xpyd status`.
    pub fn snapshot(&self) -> Vec<WorkerView> {
        let now = Instant::now();
        let st = self.lock();
        let mut v: Vec<WorkerView> = st
            .workers
            .values()
            .map(|w| WorkerView {
                worker_id: w.info.worker_id.clone(),
                role: w.info.role.clone(),
                grpc_url: w.info.grpc_url.clone(),
                http_url: w.info.http_url.clone(),
                // Down (lease lapsed or unreachable) first: a dead worker the supervisor
                // also took out of routing shows as down, not as merely unroutable.
                state: match (w.ready(now), w.load.draining) {
                    (false, _) => "down",
                    _ if st.unroutable.contains(&w.info.worker_id) => "unroutable",
                    (true, false) => "ready",
                    (true, true) => "draining",
                },
                inflight: w.inflight,
                routed: w.routed,
                queued: w.load.queued,
                running: w.load.running,
                kv_blocks_used: w.load.kv_blocks_used,
                kv_blocks_free: w.load.kv_blocks_free,
                ttft_ms: w.ttft.get(),
                tpot_ms: w.load.tpot_ms,
                up_s: now.saturating_duration_since(w.joined).as_secs(),
            })
            .collect();
        v.sort_by(|a, b| (&a.role, &a.worker_id).cmp(&(&b.role, &b.worker_id)));
        v
    }

    /// Ready decode-side (decode or combined) workers that take new requests: the
    /// instances an instance-scoped rate limit counts.
    pub fn serving_instances(&self) -> usize {
        let now = Instant::now();
        let st = self.lock();
        st.workers
            .values()
            .filter(|w| {
                w.leg() == Some(Leg::Decode)
                    && w.routable(now)
                    && !st.unroutable.contains(&w.info.worker_id)
            })
            .count()
    }

    /// Waiting requests.
    pub fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Takes worker `id` out of routing (both legs) or puts it back; the mark outlives
    /// its registration. Returns (registered now, the mark changed), or `None` when
    /// [`MAX_UNROUTABLE`] ids are out already and `id` is not one of them (the set is
    /// bounded whatever a caller sends).
    pub fn set_routable(&self, id: &str, routable: bool) -> Option<(bool, bool)> {
        let mut st = self.lock();
        if !routable && !st.unroutable.contains(id) && st.unroutable.len() >= MAX_UNROUTABLE {
            return None;
        }
        let changed = if routable {
            st.unroutable.remove(id)
        } else {
            st.unroutable.insert(id.to_string())
        };
        let registered = st.workers.contains_key(id);
        self.publish(&st);
        drop(st);
        if routable && changed {
            self.dispatch();
        }
        Some((registered, changed))
    }

    /// True while worker `id` is registered at `url` (not gone, not replaced by a rebuilt
    /// process of the same id).
    pub fn is_member(&self, id: &str, url: &str) -> bool {
        self.lock()
            .workers
            .get(id)
            .is_some_and(|w| w.info.grpc_url == url)
    }
}

/// One worker as `/v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    /// Worker id.
    pub worker_id: String,
    /// Role.
    pub role: String,
    /// gRPC endpoint.
    pub grpc_url: String,
    /// HTTP endpoint.
    pub http_url: String,
    /// ready, draining, unroutable (taken out by the supervisor) or down.
    pub state: &'static str,
    /// Requests in flight from this coordinator.
    pub inflight: u32,
    /// Requests routed here so far.
    pub routed: u64,
    /// Reported queue.
    pub queued: u32,
    /// Reported running.
    pub running: u32,
    /// Reported KV blocks used.
    pub kv_blocks_used: u32,
    /// Reported KV blocks free.
    pub kv_blocks_free: u32,
    /// Coordinator-observed TTFT / prefill latency (ms).
    pub ttft_ms: f64,
    /// Reported TPOT (ms).
    pub tpot_ms: f64,
    /// Seconds since it registered (a restarted worker starts again at 0).
    pub up_s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{PolicyKind, Router, RouterConfig};

    #[test]
    fn the_routing_switch_is_bounded_and_idempotent() {
        let router = || Router::new(PolicyKind::RoundRobin, RouterConfig::default());
        let c = Cluster::new(router(), router(), 8);
        for i in 0..MAX_UNROUTABLE {
            assert_eq!(
                c.set_routable(&format!("w-{i}"), false),
                Some((false, true))
            );
        }
        // Full: a new id is refused, one already out is accepted (unchanged), and
        // putting one back makes room.
        assert_eq!(c.set_routable("one-more", false), None);
        assert_eq!(c.set_routable("w-0", false), Some((false, false)));
        assert_eq!(c.set_routable("w-0", true), Some((false, true)));
        assert_eq!(c.set_routable("w-0", true), Some((false, false)));
        assert_eq!(c.set_routable("one-more", false), Some((false, true)));
    }

    #[tokio::test]
    async fn a_dead_worker_out_of_routing_shows_down_and_a_live_one_unroutable() {
        let router = || Router::new(PolicyKind::RoundRobin, RouterConfig::default());
        let c = Cluster::new(router(), router(), 8);
        let info = |id: &str, port: u16| pb::WorkerInfo {
            worker_id: id.into(),
            role: "decode".into(),
            grpc_url: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        };
        c.register(info("dead", 1), Duration::from_millis(1))
            .unwrap();
        c.register(info("alive", 2), Duration::from_secs(60))
            .unwrap();
        for id in ["dead", "alive"] {
            c.set_routable(id, false);
        }
        std::thread::sleep(Duration::from_millis(5));
        let states: Vec<(String, &str, u64)> = c
            .snapshot()
            .into_iter()
            .map(|w| (w.worker_id, w.state, w.up_s))
            .collect();
        assert_eq!(
            states,
            [
                ("alive".into(), "unroutable", 0),
                ("dead".into(), "down", 0)
            ]
        );
    }
}
