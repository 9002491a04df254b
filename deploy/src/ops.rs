//! Clients of the control plane: `xpyd scale`, `xpyd upgrade` and `xpyd down` call the
//! supervisor's control endpoint (found through the running cluster's state file, or
//! `--control URL`); `xpyd events` reads the coordinator's `/v1/events`. A refusal that
//! names a field (400) exits with 64 like any usage error; every call has a timeout.

use crate::client::{self, Target};
use crate::exit::UsageError;
use crate::manifest::Manifest;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xpyd_bench::http::with_auth;
use xpyd_runtime::events::{self, Severity};

/// Bound of one control call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which supervisor a command talks to.
#[derive(Debug, Args)]
pub struct ControlTarget {
    /// The manifest a running `xpyd up` was started with.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Or the supervisor's control URL (`supervisor:` in `xpyd up`'s output).
    #[arg(long)]
    pub control: Option<String>,
    /// With `--control`: the cluster's token file (`cluster_token_file:` in `xpyd up`'s
    /// output); with `-f` it is found beside the cluster's state file.
    #[arg(long)]
    pub cluster_token_file: Option<PathBuf>,
}

/// A supervisor to call.
struct Control {
    url: String,
    /// The supervisor's pid when known.
    pid: Option<u32>,
    /// The credential its changing calls carry (`x-xpyd-cluster`).
    credential: Option<String>,
}

impl ControlTarget {
    fn resolve(&self) -> Result<Control> {
        let credential = |token_file: &Path| -> Result<String> {
            let key = xpyd_runtime::plane::ClusterKey::load(token_file)?;
            Ok(key.bearer().to_string())
        };
        if let Some(u) = &self.control {
            return Ok(Control {
                url: u.trim_end_matches('/').to_string(),
                pid: None,
                credential: self
                    .cluster_token_file
                    .as_deref()
                    .map(credential)
                    .transpose()?,
            });
        }
        let Some(f) = &self.file else {
            return Err(UsageError("give -f MANIFEST or --control URL".into()).into());
        };
        let s = client::read_state(f)?;
        if s.control.is_empty() {
            bail!("the cluster's state file has no control URL (started by an older xpyd?)");
        }
        let token_file = match &self.cluster_token_file {
            Some(t) => t.clone(),
            None => client::state_file(&Manifest::load(f)?.name).with_extension("token"),
        };
        Ok(Control {
            url: s.control,
            pid: Some(s.pid),
            credential: Some(credential(&token_file)?),
        })
    }
}

/// One HTTP call: (status, JSON body); `credential` goes in `x-xpyd-cluster`.
fn call(
    method: &str,
    url: &str,
    body: Option<&Value>,
    credential: Option<&str>,
) -> Result<(u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(CALL_TIMEOUT))
        .build()
        .into();
    let member = |r: ureq::RequestBuilder<_>| match credential {
        Some(c) => with_auth(r).header(xpyd_runtime::plane::METADATA, c),
        None => with_auth(r),
    };
    let resp = match (method, body) {
        ("POST", Some(b)) => member(agent.post(url))
            .header("content-type", "application/json")
            .send(b.to_string()),
        ("POST", None) => member(agent.post(url)).send_empty(),
        _ => with_auth(agent.get(url)).call(),
    }
    .with_context(|| format!("{method} {url}"))?;
    let code = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap_or_default();
    Ok((
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// An error answer as an error: 400 → a usage error (exit 64), anything else → 1.
fn refused(code: u16, v: &Value) -> anyhow::Error {
    let msg = v["error"]["message"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| v.to_string());
    if code == 400 {
        UsageError(msg).into()
    } else {
        anyhow::anyhow!("HTTP {code}: {msg}")
    }
}

/// Flags of `xpyd scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    target: ControlTarget,
    /// The role to scale (`prefill`, `decode` or `combined`).
    #[arg(long)]
    role: String,
    /// Its new number of workers, 1..=64.
    #[arg(long)]
    replicas: u32,
}

/// `xpyd scale`.
pub fn scale(a: &ScaleArgs) -> Result<()> {
    let c = a.target.resolve()?;
    let body = json!({"role": a.role, "replicas": a.replicas});
    let (code, v) = call(
        "POST",
        &format!("{}/v1/scale", c.url),
        Some(&body),
        c.credential.as_deref(),
    )?;
    if code != 200 {
        return Err(refused(code, &v));
    }
    println!(
        "{}: {} → {} replicas",
        v["role"].as_str().unwrap_or("?"),
        v["from"],
        v["to"]
    );
    Ok(())
}

/// Flags of `xpyd upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The new manifest (same `name` as the running cluster).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// The supervisor's control URL (default: from the cluster's state file).
    #[arg(long)]
    control: Option<String>,
    /// With `--control`: the cluster's token file.
    #[arg(long)]
    cluster_token_file: Option<PathBuf>,
    /// Return once the upgrade has started instead of waiting for its end.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
}

/// `xpyd upgrade`: exits 0 when the upgrade completed, 1 when it was rolled back.
pub fn upgrade(a: &UpgradeArgs) -> Result<()> {
    // Checked here first, so a bad manifest is named before anything is sent.
    Manifest::load(&a.file)?;
    let target = ControlTarget {
        file: Some(a.file.clone()),
        control: a.control.clone(),
        cluster_token_file: a.cluster_token_file.clone(),
    };
    let c = target.resolve()?;
    let url = c.url.clone();
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let dir = std::fs::canonicalize(&a.file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let body = json!({"manifest": text, "dir": dir});
    let (code, v) = call(
        "POST",
        &format!("{url}/v1/upgrade"),
        Some(&body),
        c.credential.as_deref(),
    )?;
    if code != 202 {
        return Err(refused(code, &v));
    }
    let to = v["to"].as_u64().unwrap_or(0);
    println!("upgrade v{} → v{to}: rolling {}", v["from"], v["roll"]);
    if a.no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let (_, s) = call("GET", &format!("{url}/v1/supervisor"), None, None)?;
        let last = &s["last_upgrade"];
        if s["upgrade"].is_null() && last["to"].as_u64() == Some(to) {
            return match last["outcome"].as_str() {
                Some("succeeded") => {
                    println!("upgrade v{} → v{to} complete", last["from"]);
                    Ok(())
                }
                _ => bail!(
                    "the upgrade to v{to} failed and was rolled back: {}",
                    last["reason"].as_str().unwrap_or("?")
                ),
            };
        }
        if Instant::now() > deadline {
            bail!(
                "the upgrade to v{to} had not ended after {} s (it goes on)",
                a.timeout_s
            );
        }
    }
}

/// Flags of `xpyd down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    target: ControlTarget,
    /// Give up waiting for the cluster to stop after this long.
    #[arg(long, default_value_t = 7300)]
    timeout_s: u64,
}

/// `xpyd down`: a graceful stop of the whole cluster; returns when `xpyd up` has exited.
pub fn down(a: &DownArgs) -> Result<()> {
    let Control {
        url,
        pid,
        credential,
    } = a.target.resolve()?;
    let (code, v) = call(
        "POST",
        &format!("{url}/v1/down"),
        None,
        credential.as_deref(),
    )?;
    if code != 202 {
        return Err(refused(code, &v));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let gone = || match pid {
        Some(p) => process_gone(p),
        None => call("GET", &format!("{url}/v1/supervisor"), None, None).is_err(),
    };
    while !gone() {
        if Instant::now() > deadline {
            bail!("the cluster had not stopped after {} s", a.timeout_s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopped");
    Ok(())
}

/// True when process `pid` no longer runs (gone, or a zombie its parent has not reaped).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
    }
}

/// Flags of `xpyd events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    target: Target,
    /// Only events at or after this: a time (2024-05-01T12:00:00Z), a span back from
    /// now (90s, 10m, 2h, 7d) or Unix milliseconds.
    #[arg(long)]
    since: Option<String>,
    /// Only events at least this severe: normal, warning or error.
    #[arg(long)]
    severity: Option<String>,
    /// Only events about this subject (a worker id like decode-0, a role prefix like
    /// decode, `coordinator`, or the service name).
    #[arg(long)]
    subject: Option<String>,
    /// At most this many (the newest).
    #[arg(long)]
    limit: Option<usize>,
    /// Print the JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

/// `%XX`-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The query string of `a` (its values checked here, so mistakes exit with 64).
fn events_query(a: &EventsArgs) -> Result<String> {
    let mut q = Vec::new();
    if let Some(s) = &a.since {
        events::parse_since(s, events::now_ms()).map_err(|e| UsageError(format!("--{e}")))?;
        q.push(format!("since={}", encode(s)));
    }
    if let Some(s) = &a.severity {
        s.parse::<Severity>()
            .map_err(|e| UsageError(format!("--{e}")))?;
        q.push(format!("severity={}", encode(s)));
    }
    if let Some(s) = &a.subject {
        q.push(format!("subject={}", encode(s)));
    }
    if let Some(n) = a.limit {
        q.push(format!("limit={n}"));
    }
    Ok(q.join("&"))
}

/// `xpyd events`.
pub fn events(a: &EventsArgs) -> Result<()> {
    let http = a.target.http()?;
    let q = events_query(a)?;
    let (code, v) = call("GET", &format!("{http}/v1/events?{q}"), None, None)?;
    if code != 200 {
        return Err(refused(code, &v));
    }
    if a.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<14} {:<14} message",
        "time", "severity", "subject", "reason"
    );
    for e in v["events"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<8} {:<14} {:<14} {}",
            e["time"].as_str().unwrap_or(""),
            e["severity"].as_str().unwrap_or(""),
            e["subject"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_queries_are_encoded_and_checked() {
        let a = EventsArgs {
            target: Target {
                url: Some("http://x".into()),
                file: None,
            },
            since: Some("2024-05-01T12:00:00+02:00".into()),
            severity: Some("warning".into()),
            subject: Some("decode-0".into()),
            limit: Some(5),
            json: false,
        };
        assert_eq!(
            events_query(&a).unwrap(),
            "since=2024-05-01T12%3A00%3A00%2B02%3A00&severity=warning&subject=decode-0&limit=5"
        );
        let bad = EventsArgs {
            severity: Some("loud".into()),
            ..a
        };
        let e = events_query(&bad).unwrap_err();
        assert!(
            e.is::<UsageError>() && e.to_string().contains("--severity"),
            "{e}"
        );
    }
}
