//! Worker lifecycles in the actor: spawning a worker process with its probes, feeding
//! probe results and exits to its state machine, rebuilding a failed worker with its
//! role's scope and backoff, and draining (leave routing, shutdown command, SIGTERM,
//! SIGKILL at the deadline) before a restart or a removal.

use super::actor::{AfterExit, Msg, Supervisor, Worker};
use super::probe_exec;
use super::probes::ProbeSet;
use super::process::{self, StopSpec, Vars};
use super::rebuild::{Backoff, Slot, scope_members};
use super::states::{WorkerInput, WorkerState};
use crate::manifest::{ProbeKind, RebuildScope, Role};
use std::time::Duration;
use std::time::Instant;
use xpyd_runtime::events::Severity;

/// Failures in a row of a worker that never became ready after which a first
/// deployment gives up (a process that keeps exiting at start is misconfigured).
const DEPLOY_GIVE_UP: u32 = 3;
/// Pause between taking a worker out of routing and SIGTERM.
const SETTLE: Duration = Duration::from_millis(300);

/// The HTTP URL in a role process's first stdout line (`{"http": …, "grpc": …}`).
fn http_of(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["http"].as_str().map(String::from)
}

impl Supervisor {
    /// Creates worker `role-i` (the lowest index no worker of the role uses) running
    /// `version`, and starts it. Returns its id.
    pub(super) fn spawn_worker(&mut self, role: Role, version: u32) -> String {
        let index = (0..)
            .find(|i| !self.slot_taken(Slot { role, index: *i }))
            .unwrap_or(0);
        let id = Slot { role, index }.id();
        let now = Instant::now();
        self.workers.insert(
            id.clone(),
            Worker {
                slot: Slot { role, index },
                id: id.clone(),
                version,
                generation: 0,
                state: WorkerState::Starting,
                pid: None,
                exited: None,
                probes: None,
                http: None,
                backoff: Backoff::default(),
                restarts: 0,
                restart_at: None,
                ready_since: None,
                ever_ready: false,
                crashed: false,
                fresh: true,
                after_exit: AfterExit::Remove,
                started_at: now,
                flipping: None,
                last_flip: None,
            },
        );
        self.start_process(&id);
        id
    }

    /// Starts the process of worker `id` (state Starting).
    fn start_process(&mut self, id: &str) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let (role, index, version) = (w.slot.role, w.slot.index, w.version);
        let file = self.versions.get(&version).map(|v| v.file.clone());
        let probes = self
            .spec(version, role)
            .map(|s| ProbeKind::ALL.map(|k| s.probes.get(k).resolve(k)));
        let (Some(file), Some(probes)) = (file, probes) else {
            return;
        };
        let mut args: Vec<String> = vec![
            "worker".into(),
            "-f".into(),
            file.display().to_string(),
            "--role".into(),
            role.name().into(),
            "--index".into(),
            index.to_string(),
            "--model".into(),
            self.s.model.display().to_string(),
            "--registry-url".into(),
            self.coord.internal.clone(),
            "--cluster-token-file".into(),
            self.s.token_file.display().to_string(),
            "--supervisor-pid".into(),
            std::process::id().to_string(),
        ];
        let tls = match &self.s.tls {
            Some(plan) => plan.worker(&format!("{}-{index}", role.name())),
            None => Ok(crate::roles::TlsArgs::default()),
        };
        self.next_gen += 1;
        let generation = self.next_gen;
        let now = Instant::now();
        // Out of routing until its readiness probe passes.
        self.reporter.routing(id, false);
        let spawned = tls.and_then(|t| {
            args.extend(t.to_args());
            process::spawn(&self.s.exe, &args, generation, &self.pids, &self.msgs)
        });
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.generation = generation;
        w.started_at = now;
        w.ever_ready = false;
        w.http = None;
        match spawned {
            Ok(s) => {
                tracing::info!(worker = %id, pid = s.pid, generation, "worker started");
                w.pid = Some(s.pid);
                w.exited = Some(s.exited);
                w.probes = Some(ProbeSet::new(probes, now));
                let msgs = self.msgs.clone();
                tokio::spawn(async move {
                    if let Ok(line) = s.first_line.await
                        && let Some(http) = http_of(&line)
                    {
                        let _ = msgs.send(Msg::Urls { generation, http }).await;
                    }
                });
                let msg = format!("started (pid {}, version {version})", s.pid);
                self.event(Severity::Normal, id, "Started", msg);
            }
            Err(e) => {
                // Counted like a process that exited at once.
                w.pid = Some(0);
                self.worker_exited(id, &format!("could not start: {e:#}"));
            }
        }
    }

    /// Applies `input` to worker `id`'s state; an event and a routing switch when the
    /// state changed. False when `input` does not apply.
    pub(super) fn transition(&mut self, id: &str, input: WorkerInput, why: &str) -> bool {
        let Some(w) = self.workers.get_mut(id) else {
            return false;
        };
        let Some(next) = w.state.on(input) else {
            return false;
        };
        let from = std::mem::replace(&mut w.state, next);
        if next != WorkerState::Starting {
            w.fresh = false;
        }
        if next == WorkerState::Ready {
            w.ever_ready = true;
            w.crashed = false;
            w.ready_since = Some(Instant::now());
        } else if from == WorkerState::Ready {
            w.ready_since = None;
        }
        if from.routable() != next.routable() {
            self.reporter.routing(id, next.routable());
        }
        let msg = format!("{from} → {next}: {why}");
        self.event(next.severity(), id, "StateChanged", msg);
        true
    }

    /// A probe of worker `id` finished.
    pub(super) fn on_probe(&mut self, id: &str, kind: ProbeKind, result: Result<(), String>) {
        let now = Instant::now();
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        if !w.state.is_live() {
            return;
        }
        let Some(p) = w.probes.as_mut() else {
            return;
        };
        let o = p.on_result(kind, result.is_ok(), now);
        let detail = result.err().unwrap_or_default();
        if !o.passed && o.failures <= o.threshold {
            // A startup probe failing before the threshold is a worker still loading.
            let (sev, noisy) = match kind {
                ProbeKind::Startup => (Severity::Normal, o.failures != 1 && o.failures % 10 != 0),
                _ => (Severity::Warning, false),
            };
            if !noisy {
                let msg = format!(
                    "{kind} probe failed ({}/{}): {detail}",
                    o.failures, o.threshold
                );
                self.event(sev, id, "ProbeFailed", msg);
            }
        }
        match kind {
            ProbeKind::Readiness if o.passed => {
                self.transition(id, WorkerInput::ReadinessPassed, "readiness probe passed");
            }
            ProbeKind::Readiness if o.tripped => {
                let why = format!("readiness probe failed {} times: {detail}", o.threshold);
                self.transition(id, WorkerInput::ReadinessFailed, &why);
            }
            ProbeKind::Liveness | ProbeKind::Startup if o.tripped => {
                self.fail(
                    id,
                    format!("{kind} probe failed {} times: {detail}", o.threshold),
                );
            }
            _ => {}
        }
    }

    /// Worker `id` failed (a probe tripped, or it exited while meant to run): rebuild it
    /// with its role's scope, or — a new worker of an upgrade — stop the upgrade.
    pub(super) fn fail(&mut self, id: &str, reason: String) {
        let now = Instant::now();
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let ready_for = w.ready_since.map(|t| now - t).unwrap_or_default();
        let (was_running, alive, slot, version) =
            (w.ever_ready, w.pid.is_some(), w.slot, w.version);
        if !self.transition(id, WorkerInput::Failed, &reason) {
            return;
        }
        if let Some(r) = self.rollout.as_mut()
            && version == r.to
            && !was_running
        {
            r.failure.get_or_insert(format!("{id}: {reason}"));
            self.drain(id, AfterExit::Remove, "its upgrade stops");
            return;
        }
        if self.stopping {
            self.drain(id, AfterExit::Remove, "stopping");
            return;
        }
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        let restart = w.backoff.on_failure(ready_for);
        w.restarts += 1;
        w.crashed = true;
        if restart.crash_loop {
            let msg = format!(
                "failed {} times in a row (last: {reason}); next restart in {:?}",
                restart.failures, restart.delay
            );
            self.event(Severity::Error, id, "CrashLoop", msg);
        }
        if !self.service.has_run() && !alive && !was_running && restart.failures >= DEPLOY_GIVE_UP {
            self.give_up(format!(
                "{id} exited {} times while starting (last: {reason}); see its log above",
                restart.failures
            ));
            return;
        }
        self.rebuild(id, slot, version, was_running, restart.delay, &reason);
    }

    /// Restarts `id` after `delay`, and the rest of its scope at once (gracefully).
    fn rebuild(
        &mut self,
        id: &str,
        slot: Slot,
        version: u32,
        ran: bool,
        delay: Duration,
        why: &str,
    ) {
        // A worker that never ran failed on its own: only it restarts.
        let scope = match self.spec(version, slot.role) {
            Some(s) if ran => s.rebuild_scope,
            _ => RebuildScope::Process,
        };
        let live: Vec<Slot> = self
            .workers
            .values()
            .filter(|w| w.state.is_live() || w.id == id)
            .map(|w| w.slot)
            .collect();
        let members = scope_members(scope, slot, &live);
        let names: Vec<String> = members
            .iter()
            .map(|m| format!("{}-{}", m.role, m.index))
            .collect();
        let msg = format!(
            "rebuild (scope {}): {} after {id} {why}; {id} restarts in {delay:?}",
            scope.name(),
            names.join(", ")
        );
        self.event(Severity::Warning, id, "Rebuild", msg);
        for peer in names.iter().filter(|n| *n != id) {
            self.drain(
                peer,
                AfterExit::Restart(Duration::ZERO),
                &format!("rebuilt with {id}"),
            );
        }
        let alive = self.workers.get(id).is_some_and(|w| w.pid.is_some());
        if alive {
            self.drain(id, AfterExit::Restart(delay), "rebuild");
        } else if let Some(w) = self.workers.get_mut(id) {
            w.after_exit = AfterExit::Restart(delay);
            self.finish_exit(id);
        }
    }

    /// Stops worker `id` gracefully; `after` decides what its exit means.
    pub(super) fn drain(&mut self, id: &str, after: AfterExit, why: &str) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        if w.state == WorkerState::Draining {
            // A removal wins over a restart (the cluster stops, or scales down).
            if after == AfterExit::Remove {
                w.after_exit = after;
            }
            return;
        }
        w.after_exit = after;
        let was_routable = w.state.routable();
        if w.pid.is_none() {
            self.finish_exit(id);
            return;
        }
        self.transition(id, WorkerInput::Drain, why);
        self.reporter.routing(id, false);
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.probes = None;
        let (Some(pid), Some(exited)) = (w.pid, w.exited.clone()) else {
            return;
        };
        let vars = vars_of(w);
        let (role, version) = (w.slot.role, w.version);
        let g = self
            .spec(version, role)
            .map(|s| s.graceful_shutdown.clone())
            .unwrap_or_default();
        let spec = StopSpec {
            timeout: self.s.grace.unwrap_or(g.timeout()),
            command: g.shutdown_command.map(|c| process::substitute(&c, &vars)),
            settle: if was_routable { SETTLE } else { Duration::ZERO },
            name: id.to_string(),
        };
        tokio::spawn(process::stop(pid, exited, spec));
    }

    /// Worker `id`'s process exited.
    pub(super) fn worker_exited(&mut self, id: &str, status: &str) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.pid = None;
        w.exited = None;
        w.probes = None;
        w.http = None;
        // A flip in progress ended with the process: it restarts in its old slot.
        w.flipping = None;
        match w.state {
            WorkerState::Draining => self.finish_exit(id),
            s if s.is_live() => self.fail(id, format!("exited unexpectedly ({status})")),
            _ => {}
        }
    }

    /// A worker without a process: restart it later or remove it, as decided.
    pub(super) fn finish_exit(&mut self, id: &str) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        match w.after_exit {
            AfterExit::Restart(delay) if !self.stopping => {
                self.transition(
                    id,
                    WorkerInput::Restart,
                    &format!("restarting in {delay:?}"),
                );
                if let Some(w) = self.workers.get_mut(id) {
                    w.restart_at = Some(Instant::now() + delay);
                }
            }
            _ => {
                let v = w.version;
                self.transition(id, WorkerInput::Remove, &format!("removed (version {v})"));
                self.workers.remove(id);
            }
        }
    }

    /// Starts the Restarting workers whose time has come.
    pub(super) fn restart_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .workers
            .values()
            .filter(|w| {
                w.state == WorkerState::Restarting && w.restart_at.is_some_and(|t| t <= now)
            })
            .map(|w| w.id.clone())
            .collect();
        for id in due {
            if let Some(w) = self.workers.get_mut(&id) {
                w.restart_at = None;
            }
            self.transition(&id, WorkerInput::Respawned, "respawned");
            self.start_process(&id);
        }
    }

    /// Runs the probes that are due.
    pub(super) fn launch_probes(&mut self, now: Instant) {
        for w in self.workers.values_mut() {
            if !w.state.is_live() {
                continue;
            }
            let generation = w.generation;
            let vars = vars_of(w);
            let Some(p) = w.probes.as_mut() else {
                continue;
            };
            for kind in p.due(now) {
                let probe = p.probe(kind).clone();
                let (msgs, vars) = (self.msgs.clone(), vars.clone());
                tokio::spawn(async move {
                    let result = probe_exec::run(&probe.action, probe.timeout, &vars).await;
                    let _ = msgs
                        .send(Msg::Probe {
                            generation,
                            kind,
                            result,
                        })
                        .await;
                });
            }
        }
    }
}

/// The placeholders of worker `w`'s commands.
fn vars_of(w: &Worker) -> Vars {
    Vars {
        worker_id: w.id.clone(),
        role: w.slot.role.name().into(),
        index: w.slot.index.to_string(),
        pid: w.pid.map(|p| p.to_string()).unwrap_or_default(),
        http: w.http.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_come_from_the_first_line() {
        assert_eq!(
            super::http_of(r#"{"http":"http://127.0.0.1:5","grpc":"http://127.0.0.1:6"}"#),
            Some("http://127.0.0.1:5".into())
        );
        assert_eq!(super::http_of("hello"), None);
    }
}
