//! The supervisor's child processes (I/O): spawning one (this same binary as
//! `xpyd coordinator` / `xpyd worker`, in a process group of its own so a terminal's
//! Ctrl-C reaches only the supervisor, which stops them in order), a waiter task that
//! reaps it and reports its exit, its first stdout line (its URLs), the graceful stop
//! (shutdown command, SIGTERM, SIGKILL at the deadline), and the `{…}` placeholders of
//! probe and shutdown commands.

use super::actor::Msg;
use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Live children by spawn generation → pid (for the second Ctrl-C, which kills them all).
pub type Pids = Arc<Mutex<HashMap<u64, u32>>>;

/// A spawned child.
pub struct Spawned {
    /// Its process id.
    pub pid: u32,
    /// Becomes true once it has exited (and been reaped).
    pub exited: watch::Receiver<bool>,
    /// Its first line on stdout (the role processes print their URLs there).
    pub first_line: oneshot::Receiver<String>,
}

/// Starts `exe args` as generation `generation`; its exit arrives as [`Msg::Exited`].
///
/// # Errors
/// When the process cannot be started.
pub fn spawn(
    exe: &Path,
    args: &[String],
    generation: u64,
    pids: &Pids,
    msgs: &mpsc::Sender<Msg>,
) -> Result<Spawned> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {} {}", exe.display(), args.join(" ")))?;
    let pid = child.id().context("the child has no pid")?;
    lock(pids).insert(generation, pid);
    let (line_tx, first_line) = oneshot::channel();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            if let Ok(Some(l)) = lines.next_line().await {
                let _ = line_tx.send(l);
            }
            // Keep draining so the child never blocks on a full pipe.
            while let Ok(Some(_)) = lines.next_line().await {}
        });
    }
    let (exit_tx, exited) = watch::channel(false);
    let (pids, msgs) = (pids.clone(), msgs.clone());
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        lock(&pids).remove(&generation);
        let _ = exit_tx.send(true);
        let _ = msgs.send(Msg::Exited { generation, status }).await;
    });
    Ok(Spawned {
        pid,
        exited,
        first_line,
    })
}

fn lock(p: &Pids) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILL to every live child (the second Ctrl-C).
pub fn kill_all(pids: &Pids) {
    for pid in lock(pids).values() {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
}

/// What a command's `{…}` placeholders stand for.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// `{worker_id}`, e.g. `decode-1` (`coordinator` for the coordinator).
    pub worker_id: String,
    /// `{role}`.
    pub role: String,
    /// `{index}`.
    pub index: String,
    /// `{pid}`.
    pub pid: String,
    /// `{http}`: the process's HTTP URL (empty while unknown).
    pub http: String,
}

/// `argv` with the placeholders replaced.
pub fn substitute(argv: &[String], v: &Vars) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{worker_id}", &v.worker_id)
                .replace("{role}", &v.role)
                .replace("{index}", &v.index)
                .replace("{pid}", &v.pid)
                .replace("{http}", &v.http)
        })
        .collect()
}

/// How to stop one process.
#[derive(Debug, Clone)]
pub struct StopSpec {
    /// From the start of the stop to SIGKILL.
    pub timeout: Duration,
    /// Run first (already substituted), within `timeout`.
    pub command: Option<Vec<String>>,
    /// Pause between leaving routing and SIGTERM, so requests routed just before reach
    /// the worker while it still takes them.
    pub settle: Duration,
    /// For log lines.
    pub name: String,
}

/// Stops `pid` as `spec` says; returns when it has exited (or was SIGKILLed).
pub async fn stop(pid: u32, mut exited: watch::Receiver<bool>, spec: StopSpec) {
    let deadline = Instant::now() + spec.timeout;
    if let Some(argv) = &spec.command
        && !*exited.borrow()
    {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = super::probe_exec::command(argv, left).await {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::ERROR,
                &format!("xpyd up: {}: shutdown_command failed: {e}", spec.name),
            );
        }
    }
    if !spec.settle.is_zero() {
        let _ = tokio::time::timeout(spec.settle, exited.wait_for(|e| *e)).await;
    }
    if !*exited.borrow() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout_at(deadline, exited.wait_for(|e| *e))
        .await
        .is_err()
    {
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::ERROR,
            &format!(
                "xpyd up: {} did not stop within {:?}; killing it",
                spec.name, spec.timeout
            ),
        );
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = exited.wait_for(|e| *e).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_in_every_argument() {
        let v = Vars {
            worker_id: "decode-1".into(),
            role: "decode".into(),
            index: "1".into(),
            pid: "42".into(),
            http: "http://127.0.0.1:9".into(),
        };
        let argv = [
            "sh",
            "-c",
            "test -e /tmp/{worker_id}.ok && kill -0 {pid}",
            "{role}/{index} {http} {other}",
        ]
        .map(String::from);
        assert_eq!(
            substitute(&argv, &v),
            [
                "sh",
                "-c",
                "test -e /tmp/decode-1.ok && kill -0 42",
                "decode/1 http://127.0.0.1:9 {other}"
            ]
        );
    }

    #[tokio::test]
    async fn stop_terms_then_kills_a_process_that_ignores_sigterm() {
        let (tx, mut rx) = mpsc::channel(4);
        let pids: Pids = Arc::default();
        let argv = [
            "-c".to_string(),
            "trap '' TERM; echo up; sleep 30".to_string(),
        ];
        let s = spawn(Path::new("/bin/sh"), &argv, 7, &pids, &tx).unwrap();
        assert_eq!(s.first_line.await.unwrap(), "up");
        let t0 = std::time::Instant::now();
        let spec = StopSpec {
            timeout: Duration::from_millis(700),
            command: None,
            settle: Duration::ZERO,
            name: "test".into(),
        };
        stop(s.pid, s.exited, spec).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(600),
            "{:?}",
            t0.elapsed()
        );
        match rx.recv().await {
            Some(Msg::Exited { generation, status }) => {
                assert_eq!(generation, 7);
                assert!(status.contains("9") || status.contains("KILL"), "{status}");
            }
            other => panic!("{other:?}"),
        }
        assert!(lock(&pids).is_empty());
    }

    #[tokio::test]
    async fn stop_runs_the_shutdown_command_first() {
        let (tx, _rx) = mpsc::channel(4);
        let pids: Pids = Arc::default();
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("stopped");
        let argv = ["-c".to_string(), "echo up; exec sleep 30".to_string()];
        let s = spawn(Path::new("/bin/sh"), &argv, 1, &pids, &tx).unwrap();
        let spec = StopSpec {
            timeout: Duration::from_secs(20),
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                format!("touch {}", mark.display()),
            ]),
            settle: Duration::from_millis(10),
            name: "test".into(),
        };
        let t0 = std::time::Instant::now();
        stop(s.pid, s.exited, spec).await;
        assert!(mark.exists());
        assert!(t0.elapsed() < Duration::from_secs(15), "SIGTERM ended it");
    }
}
