//! `xpyd up`: the local supervisor. Starts the coordinator and every worker of a manifest
//! as processes of their own (this same binary, `xpyd coordinator` / `xpyd worker`),
//! probes each worker (startup, readiness, liveness), keeps a state machine per worker
//! and one for the service, takes workers out of routing when their readiness fails,
//! rebuilds failed ones with their role's scope and a backoff, scales and rolls
//! upgrades on request, and reports every change as an event to the coordinator's log.
//!
//! It prints `supervisor: URL` (its control endpoint, see [`control`]) and
//! `cluster_token_file: PATH` (the cluster's credential, mode 0600) at once, and
//! `http:`, `grpc:`, `internal:` and `ready` once every worker is ready and routed. The URLs are also
//! in the cluster's state file (`client::state_file`), which `xpyd status/scale/
//! upgrade/down/events -f MANIFEST` read. Ctrl-C or SIGTERM stops the cluster gracefully
//! (coordinator first, then the workers, each within its `graceful_shutdown`); a second
//! one kills every child at once and exits with 130. Children are in process groups of
//! their own and watch this process (`--supervisor-pid`): if it dies, even by SIGKILL,
//! they stop too.
//!
//! Pure cores: `states` (state machines), `probes` (probe scheduling), `rebuild`
//! (scopes, backoff), `plan` (rolling-upgrade steps). I/O: `process`, `probe_exec`,
//! `report`, `control`. The actor that ties them: `actor`, `lifecycle`, `coord`,
//! `rollout`.

mod actor;
pub mod control;
mod coord;
mod first_profile;
mod flip;
mod lifecycle;
mod plan;
mod probe_exec;
mod probes;
mod process;
mod ratio;
mod rebuild;
mod report;
mod rollout;
mod states;
pub mod tls_plan;

use crate::client::{self, ClusterState};
use crate::manifest::Manifest;
use crate::roles;
use actor::{Settings, Supervisor, Wiring};
use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
    /// Time every process gets to stop after SIGTERM before SIGKILL (default: each
    /// role's `graceful_shutdown.timeout_s`).
    #[arg(long)]
    pub grace_s: Option<u64>,
    /// Stop the cluster, as on SIGTERM, once the process with this pid is no longer this
    /// one's parent (for a program that starts clusters, e.g. `xpyd bench advisor`: a
    /// SIGKILL of it leaves no cluster behind).
    #[arg(long)]
    pub parent_pid: Option<i32>,
}

/// Runs `xpyd up`.
///
/// # Errors
/// A bad manifest, a process that cannot start, or a deployment that gave up.
pub fn run(a: &UpArgs) -> Result<()> {
    let m = roles::check(&a.file)?;
    // Fetch the model once here rather than in every child at the same time.
    let model = roles::model_path(&m, &a.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(supervise(a, m, &model))
}

/// First signal: a graceful stop. Second: SIGKILL every child and exit with 130.
fn on_signals(stop: CancellationToken, pids: process::Pids) {
    tokio::spawn(async move {
        xpyd_runtime::shutdown::signal().await;
        stop.cancel();
        xpyd_runtime::shutdown::signal().await;
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::ERROR,
            "xpyd up: second signal: killing every process now",
        );
        process::kill_all(&pids);
        std::process::exit(xpyd_runtime::shutdown::SECOND_SIGNAL_EXIT);
    });
}

/// Cancels `stop` once `parent` is no longer this process's parent (it died, and the
/// process was re-parented). A plain thread, not a blocking tokio task: the runtime would
/// wait for that at shutdown while the parent lives on.
fn stop_without_parent(parent: i32, stop: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            roles::wait_parent_gone(parent);
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::ERROR,
                &format!("xpyd up: its parent (pid {parent}) is gone; stopping"),
            );
            stop.cancel();
        });
    if let Err(e) = spawned {
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::WARN,
            &format!("xpyd up: parent watchdog: {e}"),
        );
    }
}

async fn supervise(a: &UpArgs, m: Manifest, model: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let stop = CancellationToken::new();
    let pids = process::Pids::default();
    on_signals(stop.clone(), pids.clone());
    if let Some(parent) = a.parent_pid {
        stop_without_parent(parent, stop.clone());
    }
    let (msgs_tx, msgs_rx) = mpsc::channel(1024);
    // The cluster's own credential: it closes the internal plane (workers register with
    // it, the coordinator and the supervisor call workers with it), and the coordinator
    // takes it as an admin key, so the supervisor's calls pass when the service requires
    // API keys. It never appears in an argument list: every child reads it from a file
    // only this user can read.
    let token = xpyd_coordinator::keys::random_hex(32)?;
    let token_file = client::state_file(&m.name).with_extension("token");
    if let Some(d) = token_file.parent() {
        std::fs::create_dir_all(d)?;
    }
    xpyd_coordinator::keys::write_private(&token_file, token.as_bytes())?;
    let key = xpyd_runtime::plane::ClusterKey::from_token(&token);
    xpyd_bench::http::set_bearer(token);
    let tls = tls_plan::TlsPlan::new(&m, &a.file)?.map(std::sync::Arc::new);
    let coord_tls = match &tls {
        Some(plan) => plan.coordinator()?.to_args(),
        None => Vec::new(),
    };
    if let Some(ca) = tls.as_ref().and_then(|p| p.ca_file()) {
        // The supervisor's own calls to the coordinator trust the cluster's CA.
        xpyd_bench::http::set_roots(&std::fs::read(&ca)?)?;
        probe_exec::trust(&xpyd_runtime::tls::Roots::load(&ca)?)?;
    }
    // The control endpoint is bound before the coordinator starts: the coordinator is
    // told where it is (the dashboard's scale controls call it).
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let control_url = format!("http://{}", listener.local_addr()?);
    let coord = coord::start_coordinator(coord::CoordStart {
        exe: &exe,
        file: &a.file,
        model,
        pids: &pids,
        msgs: &msgs_tx,
        token_file: &token_file,
        control: &control_url,
        tls: coord_tls,
    })
    .await;
    let coord = match coord {
        Ok(c) => c,
        Err(e) => {
            process::kill_all(&pids);
            return Err(e);
        }
    };
    let (http, grpc, internal) = (
        coord.http.clone(),
        coord.grpc.clone(),
        coord.internal.clone(),
    );
    let bg = CancellationToken::new();
    let reporter = report::spawn(http.clone(), Some(key.bearer().to_string()), bg.clone());
    let routed = report::poll_cluster(http.clone(), bg.clone());
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    ratio::spawn(http.clone(), cmd_tx.clone(), bg.clone());
    tokio::spawn(control::serve(
        listener,
        cmd_tx,
        key.clone(),
        reporter.clone(),
        bg.clone(),
    ));
    println!("supervisor: {control_url}");
    // Where the credential is (not the credential): tools of this user that call the
    // internal plane read it there.
    println!("cluster_token_file: {}", token_file.display());
    if let Some(ca) = tls.as_ref().and_then(|p| p.ca_file()) {
        // What clients of a cluster with its own CA trust.
        println!("tls_ca: {}", ca.display());
    }
    let _ = std::io::stdout().flush();
    let state = ClusterState {
        http: http.clone(),
        grpc: grpc.clone(),
        control: control_url,
        pid: std::process::id(),
    };
    client::write_state(&m.name, &state)?;
    let run_dir = client::state_file(&m.name)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let profile_job = first_profile::needed(&m).map(|(out, threads)| (exe.clone(), out, threads));
    let settings = Settings {
        name: m.name.clone(),
        exe,
        model: model.to_path_buf(),
        file: a.file.clone(),
        grace: a.grace_s.map(Duration::from_secs),
        ready_timeout: Duration::from_secs(a.ready_timeout_s),
        run_dir: run_dir.clone(),
        token_file: token_file.clone(),
        key,
        tls,
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let name = m.name.clone();
    let wiring = Wiring {
        coord,
        reporter,
        msgs: msgs_tx,
        pids,
        routed,
        ready_tx,
    };
    let sup = Supervisor::new(settings, m, wiring);
    let mut actor = tokio::spawn(sup.run(cmd_rx, msgs_rx, stop.clone()));
    let mut asked = Ok(());
    let mut ended = None;
    tokio::select! {
        r = ready_rx => if r.is_ok() {
            if let Some((exe, out, threads)) = profile_job {
                first_profile::spawn(exe, model.to_path_buf(), out, threads, bg.clone());
            }
            tracing::info!(%http, %grpc, %internal, "cluster ready");
            asked = announce(a, [&http, &grpc, &internal]).await;
            if a.ask.is_some() {
                stop.cancel();
            }
        },
        r = &mut actor => ended = Some(r),
    }
    let ended = match ended {
        Some(r) => r,
        None => actor.await,
    };
    let result = ended.map_err(anyhow::Error::from).and_then(|r| r);
    bg.cancel();
    cleanup(&name, &run_dir);
    result.and(asked)
}

/// Prints the URLs and `ready`; with `--ask`, streams that one question's answer.
async fn announce(a: &UpArgs, urls: [&str; 3]) -> Result<()> {
    let [http, grpc, internal] = urls;
    println!("http: {http}");
    println!("grpc: {grpc}");
    println!("internal: {internal}");
    println!("dashboard: {http}/dashboard");
    println!("ready");
    let _ = std::io::stdout().flush();
    let Some(q) = a.ask.clone() else {
        return Ok(());
    };
    let (url, n) = (http.to_string(), a.max_tokens);
    tokio::task::spawn_blocking(move || client::chat_once(&url, &q, n, &mut std::io::stdout()))
        .await?
}

/// Removes the state file, the cluster token and the upgraded manifests of cluster
/// `name`.
fn cleanup(name: &str, run_dir: &Path) {
    let _ = std::fs::remove_file(client::state_file(name));
    let _ = std::fs::remove_file(client::state_file(name).with_extension("token"));
    if let Ok(dir) = std::fs::read_dir(run_dir) {
        let prefix = format!("{name}-v");
        for e in dir.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.starts_with(&prefix) && f.ends_with(".yaml") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
