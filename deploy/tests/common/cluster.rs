//! A real cluster for tests: `xpyd up -f <manifest>` as a child process (which starts the
//! coordinator and workers as processes of their own), its URLs, small HTTP helpers, and
//! a clean Ctrl-C stop on drop.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `xpyd up`.
pub struct Up {
    child: Option<Child>,
    /// Coordinator HTTP URL.
    pub http: String,
    /// Coordinator gRPC URL.
    pub grpc: String,
    /// The coordinator's internal plane (the registry).
    pub internal: String,
    /// The manifest file.
    pub manifest: PathBuf,
    /// The cluster's credential (mode 0600).
    pub token_file: PathBuf,
    /// The cluster CA's certificate, when the cluster runs TLS with its own CA (the
    /// helpers of this module then trust it).
    pub tls_ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// The CA the helpers' HTTPS calls trust (the last cluster started with one).
static ROOTS: std::sync::Mutex<Option<Vec<u8>>> = std::sync::Mutex::new(None);

/// A gRPC channel to `url` (each call within 20 s).
pub async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

/// Waits until `f` returns true, polling every 100 ms; panics with `what` after `limit`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Up {
    /// Writes `yaml` to a temp file and starts `xpyd up` on it with `model`.
    pub fn start(yaml: &str, model: &Path) -> Up {
        Up::start_env(yaml, model, "")
    }

    /// Like [`Up::start`], with the workers' debug step delays (`XPYD_DEBUG_DELAY`, e.g.
    /// `decode-1=50`) set for the processes it starts.
    pub fn start_env(yaml: &str, model: &Path, delays: &str) -> Up {
        Up::start_with(yaml, model, &[("XPYD_DEBUG_DELAY", delays)])
    }

    /// Like [`Up::start`], with these environment variables set for the processes it
    /// starts (test knobs such as `XPYD_DEBUG_DELAY` and `XPYD_DEBUG_PANIC`).
    pub fn start_with(yaml: &str, model: &Path, env: &[(&str, &str)]) -> Up {
        Up::start_full(yaml, model, env, Stdio::inherit())
    }

    /// Like [`Up::start_with`], with the log of every process (their stderr) in `log`.
    pub fn start_logged(yaml: &str, model: &Path, env: &[(&str, &str)], log: &Path) -> Up {
        let f = std::fs::File::create(log).unwrap();
        Up::start_full(yaml, model, env, Stdio::from(f))
    }

    fn start_full(yaml: &str, model: &Path, env: &[(&str, &str)], stderr: Stdio) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("cluster.yaml");
        std::fs::write(&manifest, yaml).unwrap();
        let mut child = super::xpyd()
            .args(["up", "-f"])
            .arg(&manifest)
            .arg("--model")
            .arg(model)
            .args(["--grace-s", "20"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (mut http, mut grpc, mut internal) = (String::new(), String::new(), String::new());
        let mut token_file = PathBuf::new();
        let mut tls_ca = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("xpyd up did not print `ready` (http={http})"));
            if let Some(u) = line.strip_prefix("http: ") {
                http = u.to_string();
            } else if let Some(u) = line.strip_prefix("grpc: ") {
                grpc = u.to_string();
            } else if let Some(u) = line.strip_prefix("internal: ") {
                internal = u.to_string();
            } else if let Some(p) = line.strip_prefix("cluster_token_file: ") {
                token_file = p.into();
            } else if let Some(p) = line.strip_prefix("tls_ca: ") {
                *ROOTS.lock().unwrap() = Some(std::fs::read(p).unwrap());
                tls_ca = Some(PathBuf::from(p));
            } else if line == "ready" {
                break;
            }
        }
        Up {
            child: Some(child),
            http,
            grpc,
            internal,
            manifest,
            token_file,
            tls_ca,
            _dir: dir,
        }
    }

    /// What a member of the cluster puts on its internal calls.
    pub fn badge(&self) -> xpyd_runtime::plane::Badge {
        let key = xpyd_runtime::plane::ClusterKey::load(&self.token_file).unwrap();
        xpyd_runtime::plane::Badge::new(Some(&key))
    }

    /// `Stats` of a worker (an element of `workers()`), called as a member would.
    pub fn stats(&self, w: &Value) -> xpyd_proto::WorkerStats {
        use xpyd_proto as pb;
        let url = w["grpc_url"].as_str().unwrap().to_string();
        let role = w["role"].as_str().unwrap().to_string();
        let badge = self.badge();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ch = channel(&url).await;
            if role == "prefill" {
                pb::prefill_worker_client::PrefillWorkerClient::with_interceptor(ch, badge)
                    .stats(pb::StatsRequest {})
                    .await
                    .unwrap()
                    .into_inner()
            } else {
                pb::decode_worker_client::DecodeWorkerClient::with_interceptor(ch, badge)
                    .stats(pb::StatsRequest {})
                    .await
                    .unwrap()
                    .into_inner()
            }
        })
    }

    /// The `xpyd up` process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `GET /v1/cluster`.
    pub fn cluster(&self) -> Value {
        get(&format!("{}/v1/cluster", self.http)).1
    }

    /// The model id the cluster serves.
    pub fn cluster_model(&self) -> String {
        get(&format!("{}/v1/models", self.http)).1["data"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The cluster's workers with this role.
    pub fn workers(&self, role: &str) -> Vec<Value> {
        self.cluster()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == role)
            .cloned()
            .collect()
    }

    /// `POST` JSON to the coordinator: (status, body, Retry-After).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value, Option<String>) {
        post_raw(&format!("{}{path}", self.http), &body.to_string(), None)
    }

    /// Greedy non-streaming chat: the answer text and the full response.
    pub fn chat(&self, prompt: &str, max_tokens: u32) -> (String, Value) {
        let (code, v, _) = self.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(code, 200, "{v}");
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            v,
        )
    }

    /// Ctrl-C and wait; panics if it does not stop within 60 s.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.interrupt().expect("xpyd up stopped")
    }

    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("xpyd up did not stop within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Stops `xpyd up` as Ctrl-C does (its children stop with it), or kills it when it has
/// not exited within `limit`.
pub fn interrupt_child(c: &mut Child, limit: Duration) {
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(mut c) = self.child.take() {
                interrupt_child(&mut c, Duration::from_secs(30));
            }
        } else {
            self.interrupt();
        }
    }
}

fn agent() -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(pem) = ROOTS.lock().unwrap().as_deref() {
        let certs = ureq::tls::parse_pem(pem)
            .filter_map(|i| match i.unwrap() {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// `GET` a JSON document.
pub fn get(url: &str) -> (u16, Value) {
    let resp = agent().get(url).call().unwrap();
    let code = resp.status().as_u16();
    let s = resp.into_body().read_to_string().unwrap();
    (code, serde_json::from_str(&s).unwrap_or(Value::String(s)))
}

/// `GET` a JSON document; `None` when nothing answers (a process restarting).
pub fn try_get(url: &str) -> Option<(u16, Value)> {
    let resp = agent().get(url).call().ok()?;
    let code = resp.status().as_u16();
    let s = resp.into_body().read_to_string().ok()?;
    Some((code, serde_json::from_str(&s).unwrap_or(Value::String(s))))
}

/// Pids of the worker processes of `role` (only replica `index`, with one) that
/// `xpyd up -f manifest` runs, found by their command line.
pub fn worker_pids(manifest: &Path, role: &str, index: Option<u32>) -> Vec<i32> {
    let mut pattern = format!("worker -f {} --role {role}", manifest.display());
    if let Some(i) = index {
        // The trailing space keeps index 1 from matching 10.
        pattern.push_str(&format!(" --index {i} "));
    }
    let out = std::process::Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The command lines (`pgrep -f`) of every process still running with `manifest` in its
/// own: empty once a cluster has stopped and left nothing behind.
pub fn processes_of(manifest: &Path) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &manifest.display().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The pid of worker `role`-`index` (it must run).
pub fn worker_pid(manifest: &Path, role: &str, index: u32) -> i32 {
    worker_pids(manifest, role, Some(index))
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no {role}-{index} process"))
}

/// The sum over every series of metric `name` (a counter, or a histogram's `_count`)
/// whose line contains `filter` (`""`: all), from `{http}/metrics`.
pub fn metric_sum(http: &str, name: &str, filter: &str) -> f64 {
    let text = agent()
        .get(&format!("{http}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `POST` a raw body: (status, JSON body or string, Retry-After).
pub fn post_raw(
    url: &str,
    body: &str,
    header: Option<(&str, &str)>,
) -> (u16, Value, Option<String>) {
    let mut req = agent().post(url).header("content-type", "application/json");
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = req.send(body).unwrap();
    let code = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let s = resp.into_body().read_to_string().unwrap();
    (
        code,
        serde_json::from_str(&s).unwrap_or(Value::String(s)),
        retry,
    )
}

/// `POST` a JSON body with at most `timeout` for the whole exchange: (status, JSON body or
/// string), or the transport error (refused, reset, timeout, a truncated body) as text
/// instead of a panic.
pub fn try_post_raw(url: &str, body: &str, timeout: Duration) -> Result<(u16, Value), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let resp = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .map_err(|e| format!("{url}: {e}"))?;
    let code = resp.status().as_u16();
    let s = resp
        .into_body()
        .read_to_string()
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    let v = serde_json::from_str(&s).unwrap_or(Value::String(s));
    Ok((code, v))
}

/// Streams `body` (with `stream: true`) over SSE: the content of every chunk in order and
/// every parsed chunk; asserts the stream ends with `[DONE]`.
pub fn sse(url: &str, body: &Value) -> (String, Vec<Value>) {
    let resp = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let mut raw = String::new();
    resp.into_body()
        .into_reader()
        .read_to_string(&mut raw)
        .unwrap();
    let mut text = String::new();
    let mut chunks = Vec::new();
    let mut done = false;
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!done, "data after [DONE]");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(c) = v["choices"][0]["text"].as_str() {
            text.push_str(c);
        }
        chunks.push(v);
    }
    assert!(done, "stream did not end with [DONE]: {raw}");
    (text, chunks)
}

/// `xpyd generate` for the same request: (text, token ids).
pub fn reference(model: &Path, prompt: &str, extra: &[&str]) -> (String, Vec<u32>) {
    let out = super::xpyd()
        .args(["generate", "--chat", "--print-ids", "--prompt", prompt])
        .arg("--model")
        .arg(model)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let ids_line = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with('['))
        .unwrap()
        .to_string();
    (
        text.strip_suffix('\n').unwrap_or(&text).to_string(),
        serde_json::from_str(&ids_line).unwrap(),
    )
}
