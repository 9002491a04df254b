//! The operator's dashboard, served by the coordinator.
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /dashboard` | the page (embedded in the binary; no CDN, works offline) |
//! | `GET /dashboard/{asset}` | its script, style and the vendored chart library (uPlot) |
//! | `GET /v1/dashboard/history?range_s=` | the kept points of the last `range_s` (60..=3600) seconds |
//! | `GET /v1/dashboard/stream` | SSE, one `tick` a second: the newest point, the workers, the advisor, new events and audit entries |
//! | `POST /v1/dashboard/scale` | `{role, replicas}`, passed to the supervisor's control endpoint (audited) |
//!
//! The page and its assets hold no data and are open; everything else is an admin
//! route (an admin key, or the cluster token, when the service requires keys). The
//! page reads the stream with `fetch`, so it can send the key.

pub mod series;

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use series::{Inputs, Sample, Series};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a point is taken and the stream ticks.
pub const TICK: Duration = Duration::from_secs(1);
/// Most points one history answer carries (longer ranges are thinned).
pub const MAX_POINTS: usize = 1200;
/// How long the supervisor may take to accept a scale.
const SCALE_TIMEOUT: Duration = Duration::from_secs(30);
/// Events and audit entries a tick looks back over.
const RECENT: usize = 200;

/// The page and its assets: (name, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("assets/style.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("assets/uPlot.LICENSE"),
    ),
];
const INDEX: &str = include_str!("assets/index.html");

/// The dashboard's state in the coordinator: the kept points and the KV bytes moved.
#[derive(Debug, Default)]
pub struct Board {
    series: Mutex<Series>,
    kv_bytes: AtomicU64,
    /// (Unix ms, `kv_bytes` then) of the last [`series::WINDOW_S`] seconds' ticks.
    kv_marks: Mutex<VecDeque<(u64, u64)>>,
}

impl Board {
    /// Counts KV bytes moved from a prefill to a decode worker.
    pub fn kv_moved(&self, bytes: u64) {
        self.kv_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// KV bytes moved since the mark [`series::WINDOW_S`] seconds before `now_ms`.
    fn kv_window(&self, now_ms: u64) -> u64 {
        let total = self.kv_bytes.load(Ordering::Relaxed);
        let mut m = self.kv_marks.lock().unwrap_or_else(|e| e.into_inner());
        m.push_back((now_ms, total));
        let from = now_ms.saturating_sub((series::WINDOW_S * 1e3) as u64);
        while m.len() > 1 && m[1].0 <= from {
            m.pop_front();
        }
        total - m.front().map_or(total, |f| f.1)
    }

    fn push(&self, s: Sample) {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s);
    }

    fn last(&self) -> Option<Sample> {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }
}

/// Takes one point now.
fn take_point(app: &App) -> Sample {
    let now_ms = xpyd_runtime::events::now_ms();
    let finished = app.advisor.since(app.advisor.now() - series::WINDOW_S);
    let workers = app.cluster.snapshot();
    series::sample(&Inputs {
        t_ms: now_ms,
        finished: &finished,
        workers: &workers,
        coordinator_queue: app.cluster.queued(),
        kv_bytes: app.board.kv_window(now_ms),
    })
}

/// The per-role load gauges of `/metrics`, from the newest point.
fn publish_gauges(p: &Sample) {
    use xpyd_runtime::metrics as m;
    for (role, q, used, total) in [
        (
            "prefill",
            p.queue.prefill,
            p.kv_used.prefill,
            p.kv_total.prefill,
        ),
        (
            "decode",
            p.queue.decode,
            p.kv_used.decode,
            p.kv_total.decode,
        ),
        (
            "combined",
            p.queue.combined,
            p.kv_used.combined,
            p.kv_total.combined,
        ),
    ] {
        metrics::gauge!(m::ROLE_QUEUE_DEPTH, "role" => role).set(q);
        metrics::gauge!(m::ROLE_KV_BLOCKS, "role" => role, "state" => "used").set(used);
        metrics::gauge!(m::ROLE_KV_BLOCKS, "role" => role, "state" => "free").set(total - used);
    }
    if let Some(h) = p.prefix_hit {
        metrics::gauge!(m::COORD_PREFIX_CACHE_HIT_RATIO).set(h);
    }
}

/// Takes a point every [`TICK`] (and sets the per-role gauges) until `shutdown`.
pub async fn run_sampler(app: Arc<App>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let p = take_point(&app);
        publish_gauges(&p);
        app.board.push(p);
    }
}

/// The routes, merged into the coordinator's HTTP router.
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/{asset}", get(asset))
        .route("/v1/dashboard/history", get(history))
        .route("/v1/dashboard/stream", get(stream))
        .route("/v1/dashboard/scale", post(scale))
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such dashboard asset").into_response(),
    }
}

/// `range_s=` in 60..=3600 (default 300).
fn parse_range(raw: Option<&str>) -> Result<u64, ApiError> {
    let mut range = 300;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "range_s" => {
                range = v
                    .parse()
                    .ok()
                    .filter(|n| (60..=3600).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("range_s", format!("`{v}` is not in 60..=3600"))
                    })?;
            }
            other => return Err(ApiError::invalid(other, "unknown parameter (range_s)")),
        }
    }
    Ok(range)
}

async fn history(State(app): State<Arc<App>>, RawQuery(q): RawQuery) -> Response {
    let range = match parse_range(q.as_deref()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let now = xpyd_runtime::events::now_ms();
    let points = app
        .board
        .series
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .range(now, range * 1000, MAX_POINTS);
    axum::Json(json!({"range_s": range, "window_s": series::WINDOW_S, "points": points}))
        .into_response()
}

/// What one tick carries: the newest point, the workers, the advisor's status, and the
/// events and audit entries after the ones already sent.
fn tick(app: &App, seen: &mut (u64, u64)) -> Value {
    let workers = app.cluster.snapshot();
    let events: Vec<_> = app
        .events
        .query(&xpyd_runtime::events::Query {
            limit: RECENT,
            ..Default::default()
        })
        .into_iter()
        .filter(|e| e.seq > seen.0)
        .collect();
    if let Some(e) = events.last() {
        seen.0 = e.seq;
    }
    let audit = app.audit.query(seen.1, RECENT);
    if let Some(e) = audit.last() {
        seen.1 = e.seq;
    }
    let current = crate::advisor::api::current_layout(app);
    let n = app
        .advisor
        .since(app.advisor.now() - app.advisor.schedule().1.as_secs_f64())
        .len();
    json!({
        "t_ms": xpyd_runtime::events::now_ms(),
        "service": app.model_id,
        "mode": if app.cfg.single {"single"} else {"disaggregated"},
        "point": app.board.last(),
        "workers": workers,
        "coordinator_queue": app.cluster.queued(),
        "advisor": app.advisor.status_json(current, n),
        "events": events,
        "audit": audit,
        "scale": app.cfg.supervisor_url.is_some(),
    })
}

async fn stream(State(app): State<Arc<App>>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(2);
    tokio::spawn(async move {
        let mut seen = (0u64, 0u64);
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // The stream ends when the coordinator stops, so an open page does not hold
            // its graceful shutdown open.
            tokio::select! {
                _ = every.tick() => {}
                () = app.stopping.cancelled() => return,
            }
            let v = tick(&app, &mut seen);
            let ev = SseEvent::default().event("tick").data(v.to_string());
            // A page that stopped reading (or left) ends its stream.
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /v1/dashboard/scale {role, replicas}`: the supervisor's `POST /v1/scale`,
/// with the cluster's credential; its answer (or refusal) is passed back as is.
async fn scale(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let Some(url) = app.cfg.supervisor_url.clone() else {
        return ApiError::refusal(
            409,
            "conflict",
            "no_supervisor",
            "scale: this coordinator was not started by `xpyd up`, so there is no supervisor to scale workers",
        )
        .into_response();
    };
    let bearer = app.badge.bearer().map(str::to_string);
    let call = tokio::task::spawn_blocking(move || {
        // Audited here, with the operator's name: the supervisor need not report it.
        let mut req = ureq::post(format!("{url}/v1/scale"))
            .header(header::CONTENT_TYPE.as_str(), "application/json")
            .header(crate::audit::AUDITED, "coordinator");
        if let Some(b) = &bearer {
            req = req.header(xpyd_runtime::plane::METADATA, b);
        }
        let mut r = req
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(SCALE_TIMEOUT))
            .build()
            .send(&body[..])?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string()?;
        Ok::<_, ureq::Error>((status, text))
    })
    .await;
    match call {
        Ok(Ok((status, text))) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response(),
        Ok(Err(e)) => ApiError::upstream(502, format!("scale: the supervisor did not answer: {e}"))
            .into_response(),
        Err(e) => ApiError::upstream(502, format!("scale: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_rates_cover_the_last_window_only() {
        let b = Board::default();
        assert_eq!(b.kv_window(1_000), 0);
        b.kv_moved(500);
        assert_eq!(b.kv_window(2_000), 500);
        b.kv_moved(100);
        assert_eq!(b.kv_window(5_000), 600);
        // 10 s after the 500 were counted they leave the window; the 100 stay.
        assert_eq!(b.kv_window(12_000), 100);
        assert_eq!(b.kv_window(16_000), 0);
    }

    #[test]
    fn ranges_outside_the_kept_hour_are_refused_by_name() {
        assert_eq!(parse_range(None).unwrap(), 300);
        assert_eq!(parse_range(Some("range_s=3600")).unwrap(), 3600);
        for q in ["range_s=59", "range_s=3601", "range_s=x", "from=1"] {
            let e = parse_range(Some(q)).unwrap_err();
            assert_eq!(e.status, 400, "{q}");
        }
    }

    #[test]
    fn every_asset_the_page_names_is_served() {
        for (name, _, body) in ASSETS {
            assert!(!body.is_empty(), "{name}");
        }
        for needed in ["app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"] {
            assert!(
                INDEX.contains(&format!("/dashboard/{needed}")),
                "index.html loads {needed}"
            );
        }
        // No CDN: nothing is loaded from another host (the icon is inline).
        assert!(
            !INDEX.contains("src=\"http") && !INDEX.contains("href=\"http"),
            "no CDN"
        );
    }
}
