//! The supervisor's actor: one task owns every process record, probe set, state
//! machine and the upgrade in progress, and reacts to four inputs — control commands,
//! process exits and URLs, probe results, and a 100 ms tick (probes due, restarts due,
//! the rolling upgrade's next step, the replica counts, the deploy deadline). Every
//! state change becomes an event sent to the coordinator. Worker and coordinator
//! lifecycles are in `lifecycle.rs`, counts and upgrades in `rollout.rs`.

use super::control::{Command, CtlError};
use super::probes::ProbeSet;
use super::process::Pids;
use super::rebuild::{Backoff, Slot};
use super::report::Reporter;
use super::rollout::Rollout;
use super::states::{ServiceFacts, ServiceState, WorkerState};
use crate::manifest::{Manifest, ProbeKind, Role, RoleSpec};
use anyhow::Result;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use xpyd_runtime::events::{Event, Severity};

/// How often the actor looks at its clocks.
const TICK: Duration = Duration::from_millis(100);

/// What the actor hears from its tasks.
#[derive(Debug)]
pub enum Msg {
    /// Process generation `generation` exited.
    Exited {
        /// Its spawn generation.
        generation: u64,
        /// How it ended, for events.
        status: String,
    },
    /// Process `generation` printed its HTTP URL.
    Urls {
        /// Its spawn generation.
        generation: u64,
        /// Its HTTP URL.
        http: String,
    },
    /// Process `generation` answered its role flip (the worker's report), or did not.
    Flipped {
        /// Its spawn generation.
        generation: u64,
        /// The worker's flip report, or why the flip failed.
        result: Result<Value, String>,
    },
    /// A probe of process `generation` finished.
    Probe {
        /// Its spawn generation.
        generation: u64,
        /// Which probe.
        kind: ProbeKind,
        /// Passed, or why not.
        result: Result<(), String>,
    },
}

/// Fixed facts of this `xpyd up`.
pub struct Settings {
    /// Service name (the manifest's `name`).
    pub name: String,
    /// This binary.
    pub exe: PathBuf,
    /// The model every process loads.
    pub model: PathBuf,
    /// The manifest `xpyd up` was started with (version 1).
    pub file: PathBuf,
    /// `--grace-s`: overrides every `graceful_shutdown.timeout_s`.
    pub grace: Option<Duration>,
    /// Give up when not every worker is ready after this long.
    pub ready_timeout: Duration,
    /// Where upgraded manifests are written.
    pub run_dir: PathBuf,
    /// The cluster token's file (mode 0600), passed to every child by path.
    pub token_file: PathBuf,
    /// The cluster's credential, for the supervisor's own internal calls.
    pub key: xpyd_runtime::plane::ClusterKey,
    /// The cluster's TLS (issues each worker's certificate at its start).
    pub tls: Option<std::sync::Arc<super::tls_plan::TlsPlan>>,
}

/// One manifest version the cluster has run.
pub struct Version {
    /// The manifest.
    pub manifest: Manifest,
    /// The file its workers read.
    pub file: PathBuf,
}

/// What happens when a draining worker has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after this long (a rebuild).
    Restart(Duration),
    /// Remove it (scale-down, upgrade, stop).
    Remove,
}

/// One worker slot and its current process.
pub struct Worker {
    /// Role and index.
    pub slot: Slot,
    /// `role-index`.
    pub id: String,
    /// Manifest version it runs.
    pub version: u32,
    /// Spawn generation of its current process.
    pub generation: u64,
    /// Its state.
    pub state: WorkerState,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Becomes true when the process has exited.
    pub exited: Option<watch::Receiver<bool>>,
    /// Probes of the current process.
    pub probes: Option<ProbeSet>,
    /// Its HTTP URL once printed.
    pub http: Option<String>,
    /// Restart backoff, kept across restarts.
    pub backoff: Backoff,
    /// Restarts so far.
    pub restarts: u32,
    /// When a Restarting worker starts again.
    pub restart_at: Option<Instant>,
    /// Since when it is Ready.
    pub ready_since: Option<Instant>,
    /// The current process has been Ready at least once.
    pub ever_ready: bool,
    /// Failed since it was last Ready.
    pub crashed: bool,
    /// A new slot (scale-up) that has not been ready yet: not yet expected to serve.
    pub fresh: bool,
    /// What its exit means while draining.
    pub after_exit: AfterExit,
    /// When its current process started.
    pub started_at: Instant,
    /// The slot it moves to while it flips role (see `flip.rs`).
    pub flipping: Option<Slot>,
    /// The report of its last role flip.
    pub last_flip: Option<Value>,
}

/// The coordinator process.
pub struct Coord {
    /// Spawn generation.
    pub generation: u64,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Becomes true when it has exited.
    pub exited: Option<watch::Receiver<bool>>,
    /// Its command line (with the ports it first bound, so a restart keeps them).
    pub args: Vec<String>,
    /// Its HTTP URL.
    pub http: String,
    /// Its public gRPC URL.
    pub grpc: String,
    /// Its internal-plane URL (workers register there).
    pub internal: String,
    /// Restarts so far.
    pub restarts: u32,
    /// Restart backoff.
    pub backoff: Backoff,
    /// When it starts again after an exit.
    pub restart_at: Option<Instant>,
    /// When the running process started (a stable run resets the backoff).
    pub started_at: Instant,
    /// Its stop has begun.
    pub stopping: bool,
}

/// The actor's state.
pub struct Supervisor {
    pub(super) s: Settings,
    pub(super) versions: BTreeMap<u32, Version>,
    pub(super) current: u32,
    pub(super) desired: BTreeMap<Role, u32>,
    pub(super) workers: BTreeMap<String, Worker>,
    pub(super) coord: Coord,
    pub(super) service: ServiceState,
    pub(super) gave_up: Option<String>,
    pub(super) stopping: bool,
    pub(super) rollout: Option<Rollout>,
    pub(super) last_upgrade: Value,
    pub(super) reporter: Reporter,
    pub(super) msgs: mpsc::Sender<Msg>,
    pub(super) pids: Pids,
    pub(super) next_gen: u64,
    pub(super) deploy_deadline: Instant,
    pub(super) routed: watch::Receiver<HashSet<String>>,
    pub(super) ready_tx: Option<oneshot::Sender<()>>,
    /// The model file's fingerprint at start (an upgrade refuses a changed one).
    pub(super) model_stamp: Option<String>,
    /// Role flips in progress.
    pub(super) pending_flip: Option<super::flip::PendingFlip>,
}

/// What [`Supervisor::new`] needs besides the settings.
pub struct Wiring {
    /// The running coordinator.
    pub coord: Coord,
    /// Reports to the coordinator.
    pub reporter: Reporter,
    /// Where process tasks send their news.
    pub msgs: mpsc::Sender<Msg>,
    /// Live children.
    pub pids: Pids,
    /// Workers the coordinator routes to.
    pub routed: watch::Receiver<HashSet<String>>,
    /// Told once when the cluster is first ready.
    pub ready_tx: oneshot::Sender<()>,
}

/// The model file's fingerprint (the hash of its bytes the workers exchange with their
/// KV), to notice that it changed.
pub fn stamp(path: &std::path::Path) -> Option<String> {
    xpyd_engine::fingerprint(path).ok()
}

impl Supervisor {
    /// The supervisor of manifest `m` (version 1).
    pub fn new(s: Settings, m: Manifest, w: Wiring) -> Self {
        let desired = m
            .worker_roles()
            .into_iter()
            .map(|(r, spec)| (r, spec.replicas))
            .collect();
        let deploy_deadline = Instant::now() + s.ready_timeout;
        let model_stamp = stamp(&s.model);
        let file = s.file.clone();
        Supervisor {
            versions: BTreeMap::from([(1, Version { manifest: m, file })]),
            current: 1,
            desired,
            workers: BTreeMap::new(),
            coord: w.coord,
            service: ServiceState::Deploying,
            gave_up: None,
            stopping: false,
            rollout: None,
            last_upgrade: Value::Null,
            reporter: w.reporter,
            msgs: w.msgs,
            pids: w.pids,
            next_gen: 1000,
            deploy_deadline,
            routed: w.routed,
            ready_tx: Some(w.ready_tx),
            model_stamp,
            pending_flip: None,
            s,
        }
    }

    /// Runs until every process has stopped (after `stop`, `xpyd down`, or a failed
    /// deployment, which is returned as the error).
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut msgs: mpsc::Receiver<Msg>,
        stop: CancellationToken,
    ) -> Result<()> {
        let roles: Vec<String> = self
            .desired
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        self.event(
            Severity::Normal,
            &self.s.name.clone(),
            "Deploying",
            format!("deploying version 1: {}", roles.join(", ")),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled(), if !self.stopping => self.begin_stop("signal"),
                Some(c) = cmds.recv() => self.command(c),
                Some(m) = msgs.recv() => self.message(m),
                _ = tick.tick() => self.tick(),
            }
            self.update_service();
            if self.stopping && self.coord.pid.is_none() && self.workers.is_empty() {
                break;
            }
        }
        self.update_service();
        match self.gave_up.take() {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    /// Sends an event about `subject`.
    pub(super) fn event(&self, sev: Severity, subject: &str, reason: &str, msg: String) {
        self.reporter.event(Event::new(sev, subject, reason, msg));
    }

    /// The manifest of `version`.
    pub(super) fn manifest(&self, version: u32) -> &Manifest {
        self.versions
            .get(&version)
            .or_else(|| self.versions.get(&self.current))
            .map(|v| &v.manifest)
            .unwrap_or_else(|| &self.versions.values().next().expect("version 1").manifest)
    }

    /// The spec of `role` in `version`.
    pub(super) fn spec(&self, version: u32, role: Role) -> Option<&RoleSpec> {
        self.manifest(version).roles.get(role)
    }

    fn message(&mut self, m: Msg) {
        match m {
            Msg::Exited { generation, status } if generation == self.coord.generation => {
                self.coord_exited(&status)
            }
            Msg::Exited { generation, status } => {
                if let Some(id) = self.id_of(generation) {
                    self.worker_exited(&id, &status);
                }
            }
            Msg::Urls { generation, http } => {
                if let Some(id) = self.id_of(generation)
                    && let Some(w) = self.workers.get_mut(&id)
                {
                    w.http = Some(http);
                }
            }
            Msg::Flipped { generation, result } => self.flipped(generation, result),
            Msg::Probe {
                generation,
                kind,
                result,
            } => {
                if let Some(id) = self.id_of(generation) {
                    self.on_probe(&id, kind, result);
                }
            }
        }
    }

    /// The worker whose current process is `generation`.
    fn id_of(&self, generation: u64) -> Option<String> {
        self.workers
            .values()
            .find(|w| w.generation == generation && w.pid.is_some())
            .map(|w| w.id.clone())
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.stopping {
            self.stop_progress();
            return;
        }
        self.coord_tick(now);
        self.restart_due(now);
        self.launch_probes(now);
        if self.rollout.is_some() {
            self.rollout_step();
        } else {
            self.reconcile();
        }
        if !self.service.has_run() && now > self.deploy_deadline {
            self.give_up(format!(
                "the cluster was not ready after {} s",
                self.s.ready_timeout.as_secs()
            ));
        }
        self.notify_ready();
    }

    fn notify_ready(&mut self) {
        if self.ready_tx.is_none() || self.service != ServiceState::Running {
            return;
        }
        let routed = self.routed.borrow().clone();
        let all = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Ready)
            .all(|w| routed.contains(&w.id));
        if all && let Some(tx) = self.ready_tx.take() {
            let _ = tx.send(());
        }
    }

    /// Gives the deployment up: the service fails and everything stops.
    pub(super) fn give_up(&mut self, reason: String) {
        if self.gave_up.is_none() {
            self.gave_up = Some(reason);
            self.update_service();
            self.begin_stop("the deployment failed");
        }
    }

    fn facts(&self) -> ServiceFacts {
        let count = |s: WorkerState| self.workers.values().filter(|w| w.state == s).count() as u32;
        let (_, unavailable) = self.manifest(self.current).upgrade.percents();
        ServiceFacts {
            stopping: self.stopping,
            all_stopped: self.coord.pid.is_none() && self.workers.is_empty(),
            gave_up: self.gave_up.is_some(),
            upgrading: self.rollout.is_some(),
            desired: self.desired.values().sum(),
            ready: count(WorkerState::Ready),
            not_ready: count(WorkerState::NotReady),
            failed: count(WorkerState::Failed),
            crashed: self
                .workers
                .values()
                .filter(|w| w.crashed && w.state != WorkerState::Ready)
                .count() as u32,
            fresh: self.workers.values().filter(|w| w.fresh).count() as u32,
            max_unavailable: self.desired.values().map(|n| n * unavailable / 100).sum(),
        }
    }

    /// Recomputes the service state; an event when it changed.
    pub(super) fn update_service(&mut self) {
        let next = self.service.next(&self.facts());
        if next != self.service {
            let from = std::mem::replace(&mut self.service, next);
            let f = self.facts();
            self.event(
                next.severity(),
                &self.s.name.clone(),
                "StateChanged",
                format!(
                    "{from} → {next} ({} of {} workers ready)",
                    f.ready, f.desired
                ),
            );
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Scale {
                role,
                replicas,
                reply,
            } => {
                let _ = reply.send(self.scale(&role, replicas));
            }
            Command::Upgrade {
                manifest,
                dir,
                reply,
            } => {
                let _ = reply.send(self.upgrade(&manifest, dir));
            }
            Command::Flip {
                from,
                to,
                count,
                reply,
            } => self.flip(&from, &to, count, reply),
            Command::Down(tx) => {
                self.begin_stop("xpyd down");
                let _ = tx.send(());
            }
        }
    }

    /// Refuses a control call while stopping or upgrading.
    pub(super) fn check_idle(&self, what: &str) -> Result<(), CtlError> {
        if self.stopping {
            return Err(CtlError::busy(format!(
                "cannot {what}: the cluster is stopping"
            )));
        }
        if let Some(r) = &self.rollout {
            return Err(CtlError::busy(format!(
                "cannot {what}: the upgrade v{} → v{} is in progress",
                r.from, r.to
            )));
        }
        if let Some(p) = &self.pending_flip {
            return Err(CtlError::busy(format!(
                "cannot {what}: {} role flip(s) are in progress",
                p.left
            )));
        }
        Ok(())
    }

    fn status(&self) -> Value {
        let workers: Vec<Value> = self
            .workers
            .values()
            .map(|w| {
                json!({
                    "id": w.id, "role": w.slot.role.name(), "index": w.slot.index,
                    "version": w.version, "pid": w.pid, "state": w.state,
                    "restarts": w.restarts, "http": w.http,
                    "flipping_to": w.flipping.map(|s| s.id()), "last_flip": w.last_flip,
                    "routed": self.routed.borrow().contains(&w.id),
                })
            })
            .collect();
        let roles: serde_json::Map<String, Value> = self
            .desired
            .iter()
            .map(|(r, n)| {
                let scope = self.spec(self.current, *r).map(|s| s.rebuild_scope.name());
                (
                    r.name().to_string(),
                    json!({"replicas": n, "rebuild_scope": scope}),
                )
            })
            .collect();
        let c = &self.coord;
        json!({
            "service": self.s.name, "state": self.service, "version": self.current,
            "pid": std::process::id(),
            "coordinator": {"pid": c.pid, "http": c.http, "grpc": c.grpc, "internal": c.internal, "restarts": c.restarts,
                "state": if c.pid.is_some() { "running" } else if self.stopping { "stopped" } else { "restarting" }},
            "roles": roles, "workers": workers,
            "upgrade": self.rollout.as_ref().map(Rollout::view),
            "last_upgrade": self.last_upgrade,
        })
    }
}
