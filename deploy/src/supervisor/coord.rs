//! The coordinator process in the supervisor, and the order of a stop: starting the
//! coordinator and reading its URLs, restarting it on the same ports when it exits
//! (then re-sending every routing switch it forgot), and stopping the cluster — the
//! coordinator first (it stops taking requests and finishes those in flight while the
//! workers still serve them), then every worker, each within its graceful timeout.

use super::actor::{AfterExit, Coord, Msg, Supervisor};
use super::process::{self, Pids, StopSpec, Vars};
use super::rebuild::Backoff;
use super::states::ServiceState;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::mpsc;
use xpyd_runtime::events::Severity;

/// How long a coordinator may take to print its URLs.
const URLS_TIMEOUT: Duration = Duration::from_secs(120);

fn port_of(url: &str) -> String {
    url.rsplit(':').next().unwrap_or("0").to_string()
}

/// What [`start_coordinator`] needs.
pub struct CoordStart<'a> {
    /// This binary.
    pub exe: &'a Path,
    /// The manifest.
    pub file: &'a Path,
    /// The model.
    pub model: &'a Path,
    /// Live children.
    pub pids: &'a Pids,
    /// The actor's inbox.
    pub msgs: &'a mpsc::Sender<Msg>,
    /// The cluster token's file (mode 0600).
    pub token_file: &'a Path,
    /// The supervisor's control endpoint (the dashboard's scale controls call it).
    pub control: &'a str,
    /// TLS flags.
    pub tls: Vec<String>,
}

/// Starts the coordinator and waits for the URLs it prints.
///
/// # Errors
/// When it cannot start, exits first, or says nothing in time.
pub async fn start_coordinator(c: CoordStart<'_>) -> Result<Coord> {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "-f".into(),
        c.file.display().to_string(),
        "--model".into(),
        c.model.display().to_string(),
        "--supervisor-pid".into(),
        std::process::id().to_string(),
        "--cluster-token-file".into(),
        c.token_file.display().to_string(),
        "--supervisor-url".into(),
        c.control.to_string(),
    ];
    args.extend(c.tls.iter().cloned());
    let generation = 1;
    let s = process::spawn(c.exe, &args, generation, c.pids, c.msgs)?;
    let line = match tokio::time::timeout(URLS_TIMEOUT, s.first_line).await {
        Ok(Ok(line)) => line,
        Ok(Err(_)) => bail!("the coordinator exited before listening; see its log above"),
        Err(_) => bail!("the coordinator did not report its listeners within {URLS_TIMEOUT:?}"),
    };
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("the coordinator printed `{line}`"))?;
    let http = v["http"].as_str().unwrap_or_default().to_string();
    let grpc = v["grpc"].as_str().unwrap_or_default().to_string();
    let internal = v["internal"].as_str().unwrap_or_default().to_string();
    // A restarted coordinator keeps its ports, so clients and workers find it again.
    args.extend([
        "--http-port".into(),
        port_of(&http),
        "--grpc-port".into(),
        port_of(&grpc),
        "--internal-port".into(),
        port_of(&internal),
    ]);
    Ok(Coord {
        generation,
        pid: Some(s.pid),
        exited: Some(s.exited),
        args,
        http,
        grpc,
        internal,
        restarts: 0,
        backoff: Backoff::default(),
        restart_at: None,
        started_at: Instant::now(),
        stopping: false,
    })
}

impl Supervisor {
    /// The coordinator exited.
    pub(super) fn coord_exited(&mut self, status: &str) {
        self.coord.pid = None;
        self.coord.exited = None;
        if self.stopping {
            self.stop_progress();
            return;
        }
        if !self.service.has_run() {
            self.give_up(format!(
                "the coordinator exited while starting ({status}); see its log above"
            ));
            return;
        }
        // A coordinator that ran for a stable while starts its backoff over.
        let r = self
            .coord
            .backoff
            .on_failure(self.coord.started_at.elapsed());
        self.coord.restarts += 1;
        self.coord.restart_at = Some(Instant::now() + r.delay);
        let msg = format!(
            "exited unexpectedly ({status}); restarting in {:?} on the same ports",
            r.delay
        );
        self.event(Severity::Error, "coordinator", "Rebuild", msg);
        if r.crash_loop {
            let msg = format!(
                "exited {} times in a row (last: {status}); next restart in {:?}",
                r.failures, r.delay
            );
            self.event(Severity::Error, "coordinator", "CrashLoop", msg);
        }
    }

    /// Restarts the coordinator when its time has come.
    pub(super) fn coord_tick(&mut self, now: Instant) {
        if self.coord.pid.is_some() || self.coord.restart_at.is_none_or(|t| t > now) {
            return;
        }
        self.coord.restart_at = None;
        self.next_gen += 1;
        let generation = self.next_gen;
        match process::spawn(
            &self.s.exe,
            &self.coord.args,
            generation,
            &self.pids,
            &self.msgs,
        ) {
            Ok(s) => {
                self.coord.generation = generation;
                self.coord.pid = Some(s.pid);
                self.coord.started_at = Instant::now();
                self.coord.exited = Some(s.exited);
                // It starts with no routing switches: send them all again.
                self.reporter.reassert();
                self.event(
                    Severity::Normal,
                    "coordinator",
                    "Started",
                    format!("restarted (pid {})", s.pid),
                );
            }
            Err(e) => {
                self.coord.restart_at = Some(now + Duration::from_secs(1));
                xpyd_runtime::logging::say(
                    xpyd_runtime::logging::Level::WARN,
                    &format!("xpyd up: restarting the coordinator: {e:#}"),
                );
            }
        }
    }

    /// Begins the graceful stop of the whole cluster.
    pub(super) fn begin_stop(&mut self, why: &str) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(r) = self.rollout.take() {
            let msg = format!("the upgrade v{} → v{} was interrupted: {why}", r.from, r.to);
            self.event(Severity::Warning, &self.s.name.clone(), "UpgradeStep", msg);
        }
        self.event(
            Severity::Normal,
            &self.s.name.clone(),
            "Stopping",
            format!("stopping: {why}"),
        );
        self.update_service();
        if let (Some(pid), Some(exited)) = (self.coord.pid, self.coord.exited.clone()) {
            let g = &self.manifest(self.current).coordinator.graceful_shutdown;
            let vars = Vars {
                worker_id: "coordinator".into(),
                role: "coordinator".into(),
                pid: pid.to_string(),
                http: self.coord.http.clone(),
                ..Vars::default()
            };
            let spec = StopSpec {
                timeout: self.s.grace.unwrap_or(g.timeout()),
                command: g
                    .shutdown_command
                    .as_ref()
                    .map(|c| process::substitute(c, &vars)),
                settle: Duration::ZERO,
                name: "coordinator".into(),
            };
            self.coord.stopping = true;
            tokio::spawn(process::stop(pid, exited, spec));
        }
        self.stop_progress();
    }

    /// Once the coordinator is gone, stops every worker.
    pub(super) fn stop_progress(&mut self) {
        if self.coord.pid.is_some() {
            return;
        }
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            self.drain(&id, AfterExit::Remove, "the cluster stops");
        }
        if self.workers.is_empty() && self.service != ServiceState::Stopped {
            self.update_service();
        }
    }
}
