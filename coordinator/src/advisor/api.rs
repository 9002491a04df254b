//! The advisor's HTTP surface and its loop.
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /v1/advisor` | config, profile, current and desired split, the last advice (curve of predicted goodput per split, p50/p90/p99 now and after), history |
//! | `PUT /v1/advisor/config` | any of `enabled`, `window_s`, `slo {ttft_ms, tpot_ms, attainment}`, `budget`, `mode`, `min_gain`, `streak`, `cooldown_s`, `history`; 400 naming the field |
//! | `POST /v1/advisor/apply` | `{}`: the recommendation; `{"prefill": x, "decode": y}` or `{"combined": n}`: that split; 400 naming `role`, 409 without advice |
//! | `GET /v1/advisor/desired` | `{generation, replicas}` — what the supervisor converges to |
//! | `GET /v1/advisor/window` | the ring's requests of the last window as JSON lines (a replayable trace) |
//! | `POST /v1/advisor/whatif` | the ranking of every split for other `budget`, `slo`, `rate`, `input`/`output` lengths, on the recent window (or on drawn lengths) |

use super::{Live, SloBody, advice_json, parse_apply, parse_body, plan_error};
use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use xpyd_planner::advisor::Action;
use xpyd_planner::search;
use xpyd_planner::sim::Layout;
use xpyd_planner::traffic::{Process, Traffic};
use xpyd_planner::workload::LengthDist;
use xpyd_runtime::events::{Event, Severity};

/// Who the advisor's own applies are by (history, events, audit log).
const AUTO: &str = "advisor (auto)";

/// The routes, merged into the coordinator's HTTP router.
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/advisor", get(status))
        .route("/v1/advisor/config", put(config))
        .route("/v1/advisor/apply", post(apply))
        .route("/v1/advisor/desired", get(desired))
        .route("/v1/advisor/window", get(window))
        .route("/v1/advisor/whatif", post(whatif))
}

/// The split the cluster runs: ready (or draining) workers per role.
pub fn current_layout(app: &App) -> Option<Layout> {
    let (mut p, mut d, mut c) = (0, 0, 0);
    for w in app.cluster.snapshot() {
        if w.state == "down" {
            continue;
        }
        match w.role.as_str() {
            "prefill" => p += 1,
            "decode" => d += 1,
            "combined" => c += 1,
            _ => {}
        }
    }
    if app.cfg.single {
        (c > 0).then_some(Layout::Aggregated { workers: c })
    } else {
        (p > 0 && d > 0).then_some(Layout::Disaggregated {
            prefill: p,
            decode: d,
        })
    }
}

fn window_requests(app: &App) -> Vec<xpyd_planner::advisor::Finished> {
    let (_, w) = app.advisor.schedule();
    app.advisor.since(app.advisor.now() - w.as_secs_f64())
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let n = window_requests(&app).len();
    axum::Json(app.advisor.status_json(current_layout(&app), n)).into_response()
}

async fn config(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match app.advisor.patch_config(&body) {
        Ok(v) => {
            app.events.record(Event::new(
                Severity::Normal,
                "advisor",
                "AdvisorConfigured",
                format!("advisor config: {v}"),
            ));
            axum::Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn apply(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let (layout, goodput) = match parse_apply(&body, app.cfg.single) {
        Ok(Some(l)) => (l, None),
        Ok(None) => match app.advisor.recommendation() {
            Ok((l, g)) => (l, Some(g)),
            Err(e) => return e.into_response(),
        },
        Err(e) => return e.into_response(),
    };
    let d = {
        let _one = app
            .advisor
            .applying
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Err(e) = not_converging(&app, super::unix_ms()) {
            return e.into_response();
        }
        apply_layout(&app, layout, "operator", goodput)
    };
    axum::Json(json!({"generation": d.generation, "layout": d.layout.to_string(), "replicas": d.replicas()}))
        .into_response()
}

/// How long an apply that the cluster has not reached yet holds off the next one (after
/// that, a stuck apply can be replaced).
pub const APPLY_SETTLE_MS: u64 = 300_000;

/// 409 while the last apply is still being carried out: the cluster does not run the
/// desired split yet and it was set less than [`APPLY_SETTLE_MS`] ago.
fn not_converging(app: &App, now_ms: u64) -> Result<(), ApiError> {
    let Some(d) = app.advisor.desired() else {
        return Ok(());
    };
    let current = current_layout(app);
    if current == Some(d.layout) || now_ms.saturating_sub(d.at_ms) >= APPLY_SETTLE_MS {
        return Ok(());
    }
    let mut e = ApiError::refusal(
        409,
        "conflict",
        "apply_in_progress",
        format!(
            "apply: generation {} ({} by {}) is still being carried out; the cluster runs {}. Apply again once it runs {} (or after {} s)",
            d.generation,
            d.layout,
            d.by,
            current.map_or_else(|| "no complete split".into(), |l| l.to_string()),
            d.layout,
            (APPLY_SETTLE_MS - now_ms.saturating_sub(d.at_ms)).div_ceil(1000),
        ),
    );
    e.param = Some("apply".into());
    Err(e)
}

fn apply_layout(
    app: &App,
    layout: Layout,
    by: &str,
    goodput: Option<(f64, f64)>,
) -> super::Desired {
    let current = current_layout(app);
    let d = app.advisor.apply(layout, current, by, goodput);
    let from = current.map_or_else(|| "-".into(), |l| l.to_string());
    app.events.record(Event::new(
        Severity::Normal,
        "advisor",
        "RatioApplied",
        format!(
            "{by} set the split to {layout} (from {from}); generation {}",
            d.generation
        ),
    ));
    d
}

async fn desired(State(app): State<Arc<App>>) -> Response {
    let v = match app.advisor.desired() {
        Some(d) => {
            json!({"generation": d.generation, "replicas": d.replicas(), "layout": d.layout.to_string()})
        }
        None => json!({"generation": 0, "replicas": null}),
    };
    axum::Json(v).into_response()
}

async fn window(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    for f in window_requests(&app) {
        if let Ok(line) = serde_json::to_string(&f) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response()
}

/// `POST /v1/advisor/whatif`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhatIf {
    budget: Option<u32>,
    slo: Option<SloBody>,
    /// Also the fewest units that meet the SLOs at this rate.
    rate: Option<f64>,
    input: Option<String>,
    output: Option<String>,
}

/// Largest budget a what-if ranks (each split is simulated).
const WHATIF_MAX_BUDGET: u32 = 128;

async fn whatif(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match whatif_inner(&app, &body).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn length(field: &str, s: &Option<String>, default: &str) -> Result<LengthDist, ApiError> {
    s.as_deref()
        .unwrap_or(default)
        .parse()
        .map_err(|e: xpyd_planner::workload::BadLength| ApiError::invalid(field, e.to_string()))
}

async fn whatif_inner(app: &Arc<App>, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let w: WhatIf = parse_body(body)?;
    let model = app
        .advisor
        .model()
        .map_err(|e| ApiError::invalid("profile", e))?;
    let cfg = app.advisor.lock().config.clone();
    if let Some(s) = &w.slo {
        s.check()?;
    }
    let slo = w.slo.as_ref().map_or(cfg.slo, |s| s.over(cfg.slo));
    slo.validate().map_err(plan_error)?;
    let budget = match w.budget {
        Some(b) => b,
        None => current_layout(app).map_or(cfg.budget, |l| l.units()),
    };
    if !(1..=WHATIF_MAX_BUDGET).contains(&budget) {
        return Err(ApiError::invalid(
            "budget",
            format!("{budget} is outside 1..={WHATIF_MAX_BUDGET}"),
        ));
    }
    if let Some(r) = w.rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(ApiError::invalid("rate", format!("{r} is not a rate > 0")));
    }
    let traffic = if w.input.is_some() || w.output.is_some() {
        Traffic::Generated {
            input: length("input", &w.input, "uniform:32-256")?,
            output: length("output", &w.output, "uniform:24-96")?,
            process: Process::Poisson,
            prefix_hit: 0.0,
            requests: 1000,
            seed: 1,
        }
    } else {
        let (_, win) = app.advisor.schedule();
        let span = win.as_secs_f64() * f64::from(cfg.history);
        let recent = app.advisor.since(app.advisor.now() - span);
        if recent.len() < xpyd_planner::advisor::MIN_WINDOW_REQUESTS {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "the last {span:.0} s hold {} requests; give `input` and `output` lengths to rank drawn traffic",
                    recent.len()
                ),
            ));
        }
        Traffic::Trace(xpyd_planner::advisor::trace_of(&recent))
    };
    let base = app.advisor.base.clone();
    let precision = cfg.precision;
    let _slot = app.advisor.sim.lock().await;
    let started = std::time::Instant::now();
    let (ranked, fewest) = tokio::task::spawn_blocking(move || {
        let ranked = search::rank(&model, &base, &traffic, &slo, budget, precision)?;
        let fewest = match w.rate {
            Some(r) => search::fewest_units(&model, &base, &traffic, &slo, r, 128, precision)?,
            None => None,
        };
        Ok::<_, xpyd_planner::PlanError>((ranked, fewest))
    })
    .await
    .map_err(|e| ApiError::upstream(500, format!("simulation: {e}")))?
    .map_err(plan_error)?;
    let why = ranked[0]
        .goodput
        .as_ref()
        .map_or("", |g| g.bottleneck.explain());
    Ok(json!({
        "budget": budget,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment},
        "recommended": ranked[0],
        "why": why,
        "ranked": ranked,
        "fewest_units": fewest,
        "rate": w.rate,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Runs the advisor every window while monitoring is on, until `shutdown`.
pub async fn run_loop(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        let (enabled, win) = app.advisor.schedule();
        let wait = if enabled {
            win
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = app.advisor.changed.notified() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        if !enabled {
            continue;
        }
        one_window(&app, win).await;
    }
}

/// Observes the last window; applies in auto mode.
async fn one_window(app: &Arc<App>, win: Duration) {
    let live: &Live = &app.advisor;
    let now = live.now();
    let requests = live.since(now - win.as_secs_f64());
    let Some(current) = current_layout(app) else {
        live.finish_window(
            None,
            Err("no complete cluster is serving (a role has no ready worker)".into()),
        );
        return;
    };
    // A window in which a worker was down says little about the split (its requests
    // moved, the survivors ran hot), and a budget taken from the cluster then would be
    // one worker short: wait for the cluster to recover.
    let down: Vec<String> = app
        .cluster
        .snapshot()
        .into_iter()
        .filter(|w| w.state == "down")
        .map(|w| w.worker_id)
        .collect();
    if !down.is_empty() {
        live.finish_window(
            None,
            Err(format!(
                "waiting for the cluster to recover: {} down",
                down.join(", ")
            )),
        );
        return;
    }
    let taken = match live.take_advisor(current) {
        Ok(a) => a,
        Err(e) => {
            live.finish_window(None, Err(e));
            return;
        }
    };
    let _slot = live.sim.lock().await;
    let (mut advisor, generation) = taken;
    let window_s = win.as_secs_f64();
    let joined = tokio::task::spawn_blocking(move || {
        let r = advisor.observe(now, window_s, &requests);
        (advisor, r)
    })
    .await;
    let (advisor, result) = match joined {
        Ok(x) => x,
        Err(e) => {
            // A panic in the planner must not take the coordinator down.
            tracing::error!(error = %e, "advisor window failed");
            live.finish_window(None, Err(format!("the advisor failed: {e}")));
            return;
        }
    };
    let result = result.map_err(|e| e.to_string());
    let auto = result
        .as_ref()
        .ok()
        .filter(|a| a.action == Action::Apply)
        .map(|a| (a.recommended, a.goodput));
    if let Ok(a) = &result {
        record_metrics(a);
        tracing::info!(advice = %advice_json(a), "advisor window");
    }
    live.finish_window(Some((advisor, generation)), result);
    if let Some((layout, goodput)) = auto {
        let d = {
            let _one = live.applying.lock().unwrap_or_else(|p| p.into_inner());
            apply_layout(app, layout, AUTO, Some(goodput))
        };
        crate::audit::record(
            &app.audit,
            crate::audit::Record {
                who: AUTO.into(),
                peer: String::new(),
                action: "apply (auto mode)".into(),
                request: json!({"layout": layout.to_string(), "predicted_goodput": {"current": goodput.0, "recommended": goodput.1}}),
                status: 200,
                outcome: json!({"generation": d.generation, "replicas": d.replicas()}),
            },
        );
    }
}

fn record_metrics(a: &xpyd_planner::advisor::Advice) {
    use xpyd_runtime::metrics as m;
    for (kind, l) in [("current", a.current), ("recommended", a.recommended)] {
        let (p, d, c) = match l {
            Layout::Disaggregated { prefill, decode } => (prefill, decode, 0),
            Layout::Aggregated { workers } => (0, 0, workers),
        };
        for (role, n) in [("prefill", p), ("decode", d), ("combined", c)] {
            metrics::gauge!(m::ADVISOR_REPLICAS, "role" => role, "split" => kind).set(f64::from(n));
        }
    }
    for (kind, r) in [("current", &a.now), ("recommended", &a.after)] {
        metrics::gauge!(m::ADVISOR_PREDICTED_TTFT_P90_SECONDS, "split" => kind).set(r.ttft.p90);
        metrics::gauge!(m::ADVISOR_PREDICTED_TPOT_P90_SECONDS, "split" => kind).set(r.tpot.p90);
    }
}
