//! Clusters for benchmarks: `xpyd up -f <manifest>` as a child process (the supervisor
//! starts the coordinator and workers), its URLs once it prints `ready`, and a clean
//! stop (SIGINT to the supervisor, which stops its children) when dropped.

use crate::http;
use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    child: Child,
    /// Coordinator HTTP URL.
    pub http: String,
    /// Coordinator gRPC URL.
    pub grpc: String,
    /// The supervisor's control endpoint.
    pub control: String,
    /// The cluster's credential (mode 0600), for calls on the internal plane.
    pub token_file: std::path::PathBuf,
}

/// How to start a cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSpec<'a> {
    /// The `xpyd` executable.
    pub exe: &'a Path,
    /// The cluster manifest.
    pub manifest: &'a Path,
    /// Model file of every role.
    pub model: &'a Path,
    /// Give up when the cluster is not ready after this long.
    pub ready_timeout: Duration,
    /// Environment of `xpyd up` and the processes it starts (e.g. `XPYD_STATE_DIR`).
    pub env: &'a [(String, String)],
}

impl Cluster {
    /// Starts `xpyd up` as `spec` says and waits until it is ready.
    ///
    /// # Errors
    /// When `xpyd up` cannot start, ends early, or is not ready in time.
    pub fn start(spec: ClusterSpec<'_>) -> Result<Cluster> {
        let ClusterSpec {
            exe,
            manifest,
            model,
            ready_timeout,
            env,
        } = spec;
        let mut child = Command::new(exe)
            .envs(env.iter().cloned())
            .args(["up", "-f"])
            .arg(manifest)
            .arg("--model")
            .arg(model)
            .args(["--grace-s", "10"])
            // Killed by a signal, the bench leaves no cluster behind.
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting xpyd up")?;
        let out = child.stdout.take().context("xpyd up stdout")?;
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
            control: String::new(),
            token_file: Default::default(),
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
                    } else if let Some(u) = line.strip_prefix("supervisor: ") {
                        c.control = u.to_string();
                    } else if let Some(p) = line.strip_prefix("cluster_token_file: ") {
                        c.token_file = p.into();
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

    /// The coordinator's `/v1/cluster`.
    ///
    /// # Errors
    /// When the coordinator does not answer in time or not with JSON.
    pub fn topology(&self) -> Result<serde_json::Value> {
        http::get_json(&format!("{}/v1/cluster", self.http), http::QUICK)
    }

    /// `POST` to the supervisor's control endpoint `path` as a member of the cluster.
    ///
    /// # Errors
    /// An unreadable token file, or the call failing.
    pub fn control_post(
        &self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let key = xpyd_runtime::plane::ClusterKey::load(&self.token_file)?;
        http::post_json_with(
            &format!("{}{path}", self.control),
            body,
            timeout,
            Some((xpyd_runtime::plane::METADATA, key.bearer())),
        )
    }

    /// A channel to one of the cluster's workers whose calls carry its credential.
    ///
    /// # Errors
    /// A bad URL, an unreadable token file, or no connection.
    pub async fn worker_channel(&self, url: &str) -> Result<xpyd_runtime::plane::Channel> {
        let key = xpyd_runtime::plane::ClusterKey::load(&self.token_file)?;
        let ch = xpyd_runtime::tls::endpoint(url, crate::http::grpc_roots())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            ch,
            xpyd_runtime::plane::Badge::new(Some(&key)),
        ))
    }
}

/// `GET {http}/metrics`.
///
/// # Errors
/// When the coordinator does not answer in time.
pub fn scrape(http: &str) -> Result<String> {
    http::get_text(&format!("{http}/metrics"), http::QUICK)
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
