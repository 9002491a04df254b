//! `xpyd up`: the local supervisor. Starts the coordinator and every worker of a manifest
//! as separate OS processes (this same binary, `xpyd coordinator` / `xpyd worker`), waits
//! until every worker is registered and ready, prints the URLs and `ready`, restarts any
//! process that exits, and on Ctrl-C/SIGTERM stops them all (SIGTERM, then SIGKILL after
//! a grace period) so no child or bound port is left behind.

use crate::client;
use crate::manifest::Manifest;
use crate::roles;
use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Flags of `xpyd up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The cluster manifest (see deploy/examples/).
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Model file (default: from the manifest).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Send this chat message once the cluster is ready, stream the answer, then stop.
    #[arg(long)]
    pub ask: Option<String>,
    /// `max_tokens` of the `--ask` request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Give up if the cluster is not ready after this long.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout_s: u64,
    /// Time each process gets to stop after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 30)]
    pub grace_s: u64,
}

/// One supervised process.
struct Proc {
    name: String,
    args: Vec<String>,
    child: Child,
    restarts: u32,
    /// When a crashed process may be started again.
    restart_at: Option<Instant>,
}

fn spawn(exe: &Path, args: &[String], stdout: bool) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(if stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {} {}", exe.display(), args.join(" ")))
}

/// Starts the coordinator and reads the URLs it prints.
async fn start_coordinator(exe: &Path, args: &[String]) -> Result<(Child, String, String)> {
    let mut child = spawn(exe, args, true)?;
    let out = child.stdout.take().context("coordinator stdout")?;
    let mut lines = BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .context("coordinator did not report its listeners within 120 s")??
        .context("coordinator exited before listening")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("coordinator printed `{line}`"))?;
    let http = v["http"].as_str().unwrap_or_default().to_string();
    let grpc = v["grpc"].as_str().unwrap_or_default().to_string();
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, http, grpc))
}

fn port_of(url: &str) -> String {
    url.rsplit(':').next().unwrap_or("0").to_string()
}

/// Runs `xpyd up`.
pub fn run(a: &UpArgs) -> Result<()> {
    let m = roles::check(&a.file)?;
    // Fetch the model once here rather than in every child at the same time.
    let model = roles::model_path(&m, &a.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(supervise(a, &m, &model))
}

async fn supervise(a: &UpArgs, m: &Manifest, model: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let file = a.file.display().to_string();
    let model = model.display().to_string();
    let stop = xpyd_runtime::shutdown::on_signal();
    let mut cargs = vec![
        "coordinator".into(),
        "-f".into(),
        file.clone(),
        "--model".into(),
        model.clone(),
    ];
    let (child, http, grpc) = start_coordinator(&exe, &cargs).await?;
    // A restarted coordinator keeps its ports, so clients and workers find it again.
    cargs.extend([
        "--http-port".into(),
        port_of(&http),
        "--grpc-port".into(),
        port_of(&grpc),
    ]);
    let mut procs = vec![Proc {
        name: "coordinator".into(),
        args: cargs,
        child,
        restarts: 0,
        restart_at: None,
    }];
    for (role, spec) in m.worker_roles() {
        for i in 0..spec.replicas {
            let args: Vec<String> = vec![
                "worker".into(),
                "-f".into(),
                file.clone(),
                "--role".into(),
                role.name().into(),
                "--index".into(),
                i.to_string(),
                "--model".into(),
                model.clone(),
                "--registry-url".into(),
                grpc.clone(),
            ];
            let child = spawn(&exe, &args, false)?;
            procs.push(Proc {
                name: format!("{}-{i}", role.name()),
                args,
                child,
                restarts: 0,
                restart_at: None,
            });
        }
    }
    let result = serve(a, m, &exe, &mut procs, &http, &grpc, &stop).await;
    stop_all(&mut procs, Duration::from_secs(a.grace_s)).await;
    let _ = std::fs::remove_file(client::state_file(&m.name));
    result
}

async fn serve(
    a: &UpArgs,
    m: &Manifest,
    exe: &Path,
    procs: &mut [Proc],
    http: &str,
    grpc: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    let want = m.total_replicas() as usize;
    let deadline = Instant::now() + Duration::from_secs(a.ready_timeout_s);
    loop {
        for p in procs.iter_mut() {
            if let Some(st) = p.child.try_wait()? {
                bail!("{} exited while starting ({st}); see its log above", p.name);
            }
        }
        let url = format!("{http}/v1/cluster");
        // One poll is bounded (`client::ready_workers` times out), so a coordinator that
        // accepts but never answers cannot hold the loop past its deadline.
        let ready = tokio::task::spawn_blocking(move || client::ready_workers(&url)).await?;
        if ready.unwrap_or(0) >= want {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cluster was not ready after {} s", a.ready_timeout_s);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    println!("http: {http}");
    println!("grpc: {grpc}");
    println!("ready");
    client::write_state(&m.name, http, grpc)?;
    if let Some(q) = &a.ask {
        let (url, q, n) = (http.to_string(), q.clone(), a.max_tokens);
        return tokio::task::spawn_blocking(move || {
            client::chat_once(&url, &q, n, &mut std::io::stdout())
        })
        .await?;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for p in procs.iter_mut() {
            if p.restart_at.is_none()
                && let Some(st) = p.child.try_wait()?
            {
                p.restarts += 1;
                let backoff = Duration::from_millis(250 * u64::from(p.restarts.min(20)));
                eprintln!(
                    "xpyd up: {} exited ({st}); restarting in {backoff:?} (restart {})",
                    p.name, p.restarts
                );
                p.restart_at = Some(Instant::now() + backoff);
            }
            if p.restart_at.is_some_and(|t| t <= Instant::now()) {
                p.restart_at = None;
                p.child = spawn(exe, &p.args, p.name == "coordinator")?;
                if p.name == "coordinator"
                    && let Some(out) = p.child.stdout.take()
                {
                    let mut lines = BufReader::new(out).lines();
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                }
            }
        }
    }
}

/// SIGTERM to workers, then the coordinator; SIGKILL whatever is left after `grace`.
async fn stop_all(procs: &mut [Proc], grace: Duration) {
    for p in procs.iter().rev() {
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for p in procs.iter_mut().rev() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            eprintln!(
                "xpyd up: {} did not stop within {grace:?}; killing it",
                p.name
            );
            let _ = p.child.kill().await;
        }
    }
}
