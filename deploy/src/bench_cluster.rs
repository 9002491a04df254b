//! Clusters for benchmarks: `xpyd up -f <manifest>` as a child process (the supervisor
//! starts the coordinator and workers), its URLs once it prints `ready`, and a clean
//! stop (SIGINT to the supervisor, which stops its children) when dropped.

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running cluster.
pub struct Cluster {
    child: Child,
    /// Coordinator HTTP URL.
    pub http: String,
    /// Coordinator gRPC URL.
    pub grpc: String,
}

impl Cluster {
    /// Starts `xpyd up` on `manifest` with `model` and waits until it is ready.
    pub fn start(manifest: &Path, model: &Path, ready_timeout: Duration) -> Result<Cluster> {
        let exe = std::env::current_exe().context("locating the xpyd binary")?;
        let mut child = Command::new(exe)
            .args(["up", "-f"])
            .arg(manifest)
            .arg("--model")
            .arg(model)
            .args(["--grace-s", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting xpyd up")?;
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut c = Cluster {
            child,
            http: String::new(),
            grpc: String::new(),
        };
        let deadline = Instant::now() + ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "ready" => break,
                Ok(line) => {
                    if let Some(u) = line.strip_prefix("http: ") {
                        c.http = u.to_string();
                    } else if let Some(u) = line.strip_prefix("grpc: ") {
                        c.grpc = u.to_string();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "{}: the cluster did not become ready within {ready_timeout:?}",
                    manifest.display()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = c.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    bail!(
                        "{}: `xpyd up` ended before the cluster was ready ({status}; its errors are above)",
                        manifest.display()
                    )
                }
            }
        }
        Ok(c)
    }
}

/// `GET {http}/metrics`.
pub fn scrape(http: &str) -> Result<String> {
    let url = format!("{http}/metrics");
    Ok(ureq::get(&url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .into_body()
        .read_to_string()?)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
