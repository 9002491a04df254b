//! Helpers of the supervisor tests: `xpyd up` as a child process with its control URL
//! (the `supervisor:` line), its control endpoint and the coordinator's events, a steady
//! load that counts failed requests, and the process ids of a cluster.
#![allow(dead_code)]

use crate::common::cluster::{get, post_raw, try_post_raw};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

/// A 1P2D-style manifest named `name` with extra text inside each role's mapping and
/// extra top-level keys.
pub fn manifest(name: &str, prefill: &str, decode: &str, extra: &str) -> String {
    format!(
        "name: {name}\nmode: disaggregated\n{extra}roles:\n  prefill: {{ replicas: 1{prefill} }}\n  decode: {{ replicas: 2{decode} }}\n"
    )
}

/// A running `xpyd up`.
pub struct Sup {
    child: Option<Child>,
    /// Its control endpoint.
    pub control: String,
    /// The coordinator's HTTP URL (empty until ready when not waited for).
    pub http: String,
    /// The dashboard's URL, as `xpyd up` printed it.
    pub dashboard: String,
    /// The manifest file.
    pub manifest: PathBuf,
    /// A temp dir of the test (manifests, probe files).
    pub dir: tempfile::TempDir,
    /// The cluster's credential (mode 0600; empty until `xpyd up` printed it).
    pub token_file: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl Sup {
    /// Starts `xpyd up` on `yaml` (written into a fresh temp dir, where `{dir}` in it is
    /// replaced by that dir) and waits for `ready` when `wait`.
    pub fn start(yaml: &str, model: &Path, env: &[(&str, &str)], wait: bool) -> Sup {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("cluster.yaml");
        std::fs::write(
            &manifest,
            yaml.replace("{dir}", &dir.path().display().to_string()),
        )
        .unwrap();
        let mut child = crate::common::xpyd()
            .args(["up", "-f"])
            .arg(&manifest)
            .arg("--model")
            .arg(model)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut s = Sup {
            child: Some(child),
            control: String::new(),
            http: String::new(),
            dashboard: String::new(),
            manifest,
            dir,
            lines,
            token_file: PathBuf::new(),
        };
        s.read_until(|l| l.starts_with("supervisor: "));
        if wait {
            s.wait_ready();
        }
        s
    }

    fn read_until(&mut self, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("xpyd up output ended or stalled: {e}"));
            if let Some(u) = line.strip_prefix("supervisor: ") {
                self.control = u.to_string();
            } else if let Some(u) = line.strip_prefix("http: ") {
                self.http = u.to_string();
            } else if let Some(u) = line.strip_prefix("dashboard: ") {
                self.dashboard = u.to_string();
            } else if let Some(p) = line.strip_prefix("cluster_token_file: ") {
                self.token_file = p.into();
            }
            if done(&line) {
                return;
            }
        }
    }

    /// Waits for `ready`.
    pub fn wait_ready(&mut self) {
        self.read_until(|l| l == "ready");
    }

    /// The `xpyd up` process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `GET /v1/supervisor`.
    pub fn status(&self) -> Value {
        get(&format!("{}/v1/supervisor", self.control)).1
    }

    /// Workers in state Ready.
    pub fn ready_workers(&self) -> usize {
        self.status()["workers"]
            .as_array()
            .map_or(0, |ws| ws.iter().filter(|w| w["state"] == "Ready").count())
    }

    /// The worker `id` in the supervisor's status.
    pub fn worker(&self, id: &str) -> Option<Value> {
        self.status()["workers"]
            .as_array()?
            .iter()
            .find(|w| w["id"] == id)
            .cloned()
    }

    /// Worker id → pid, for the workers that have a process.
    pub fn pids(&self) -> Vec<(String, u64)> {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| Some((w["id"].as_str()?.to_string(), w["pid"].as_u64()?)))
            .collect()
    }

    /// The coordinator's view of worker `id`: its state and requests routed to it.
    pub fn routed(&self, id: &str) -> Option<(String, u64)> {
        let v = get(&format!("{}/v1/cluster", self.http)).1;
        v["workers"]
            .as_array()?
            .iter()
            .find(|w| w["worker_id"] == id)
            .map(|w| {
                (
                    w["state"].as_str().unwrap_or("").to_string(),
                    w["routed"].as_u64().unwrap_or(0),
                )
            })
    }

    /// `GET /v1/events?query` on the coordinator at `http`.
    pub fn events_at(http: &str, query: &str) -> Vec<Value> {
        let (code, v) = get(&format!("{http}/v1/events?{query}"));
        assert_eq!(code, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    /// `GET /v1/events?query`.
    pub fn events(&self, query: &str) -> Vec<Value> {
        Sup::events_at(&self.coordinator_http(), query)
    }

    /// The coordinator's HTTP URL (from the supervisor when `ready` was not waited for).
    pub fn coordinator_http(&self) -> String {
        if self.http.is_empty() {
            self.status()["coordinator"]["http"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            self.http.clone()
        }
    }

    /// Whether an event with this subject, reason and severity exists whose message
    /// contains `text`.
    pub fn has_event(&self, subject: &str, reason: &str, severity: &str, text: &str) -> bool {
        self.events(&format!("subject={subject}")).iter().any(|e| {
            e["subject"] == subject
                && e["reason"] == reason
                && e["severity"] == severity
                && e["message"].as_str().unwrap_or("").contains(text)
        })
    }

    /// `POST` to the control endpoint.
    pub fn control_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let credential = xpyd_runtime::plane::ClusterKey::load(&self.token_file)
            .unwrap()
            .bearer()
            .to_string();
        let (code, v, _) = post_raw(
            &format!("{}{path}", self.control),
            &body.to_string(),
            Some((xpyd_runtime::plane::METADATA, &credential)),
        );
        (code, v)
    }

    /// Sends `sig` to `xpyd up` and waits for it to end (at most `limit`): its exit
    /// status and how long it took.
    pub fn signal_and_wait(
        &mut self,
        sig: Signal,
        limit: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return (st, t0.elapsed());
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("xpyd up did not end within {limit:?} of {sig:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `xpyd up` to end by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "xpyd up did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::common::cluster::interrupt_child(&mut c, Duration::from_secs(40));
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            state != Some("Z")
        })
        .unwrap_or(false)
}

/// Longest one request of [`Load`] may take before it counts as failed.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Steady load: `clients` threads posting short completions until stopped. A request
/// fails on an error status, a body without text, or a transport error (refused or
/// reset connection, timeout); a client thread that panicked counts as a failure too.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Arc<Mutex<(u64, Vec<String>)>>,
}

/// The results, even if a client panicked while holding them.
fn lock(results: &Mutex<(u64, Vec<String>)>) -> MutexGuard<'_, (u64, Vec<String>)> {
    results.lock().unwrap_or_else(|e| e.into_inner())
}

impl Load {
    /// Starts `clients` closed-loop clients against `http`.
    pub fn start(http: &str, clients: usize) -> Load {
        Load::shaped(http, clients, 0, 6)
    }

    /// As [`Load::start`], each prompt padded with `pad` more words and asking for
    /// `max_tokens` tokens.
    pub fn shaped(http: &str, clients: usize, pad: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new((0u64, Vec::new())));
        let threads = (0..clients)
            .map(|i| {
                let (stop, results) = (stop.clone(), results.clone());
                let url = format!("{http}/v1/completions");
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let prompt = format!("client {i} request {n}{}", " word".repeat(pad));
                        let body = json!({"prompt": prompt,
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
                        let got = try_post_raw(&url, &body.to_string(), LOAD_TIMEOUT);
                        let mut r = lock(&results);
                        match got {
                            Ok((200, v)) if v["choices"][0]["text"].is_string() => r.0 += 1,
                            Ok((code, v)) => r.1.push(format!("client {i} #{n}: {code}: {v}")),
                            Err(e) => r.1.push(format!("client {i} #{n}: transport: {e}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            results,
        }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> u64 {
        lock(&self.results).0
    }

    /// Requests that failed so far.
    pub fn failures(&self) -> Vec<String> {
        lock(&self.results).1.clone()
    }

    /// Stops the clients: (succeeded, failures), a client thread that panicked being one.
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut panics = Vec::new();
        for (i, t) in self.threads.into_iter().enumerate() {
            if let Err(e) = t.join() {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("client {i} panicked: {why}"));
            }
        }
        let mut r = lock(&self.results);
        r.1.extend(panics);
        (r.0, r.1.clone())
    }
}
