//! The live ratio advisor: every finished request goes into a bounded ring (arrival,
//! prompt, cached and output tokens, TTFT, TPOT); when monitoring is on, a loop hands
//! the last window to the planner's [`Advisor`] every `window_s` and keeps its advice;
//! an apply (by an operator, or by the advisor in auto mode) records the desired
//! replicas per role, which the supervisor (`xpyd up`) polls and converges to.
//!
//! This file is the state and its pure operations (config patches, apply bodies, the
//! status document); [`api`] is the HTTP surface and the loop.

pub mod api;

use crate::error::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use xpyd_planner::advisor::{Advice, Advisor, AdvisorConfig, Finished, Mode};
use xpyd_planner::search::Slo;
use xpyd_planner::service::ServiceModel;
use xpyd_planner::sim::{ClusterConfig, Layout};

/// Finished requests the ring keeps at most (older ones fall out first).
pub const RING_CAP: usize = 200_000;

/// Changes the history keeps.
const HISTORY_CAP: usize = 100;

/// Shortest and longest window, seconds.
pub const WINDOW_S: std::ops::RangeInclusive<u64> = 5..=3600;

/// How the advisor starts (from the manifest's `advisor:` section).
#[derive(Debug, Clone)]
pub struct Setup {
    /// Monitoring on: the loop runs every window.
    pub enabled: bool,
    /// Window length, [`WINDOW_S`].
    pub window: Duration,
    /// SLOs, mode and hysteresis; `budget` as given, or the workers first seen when
    /// [`Setup::budget_from_cluster`].
    pub config: AdvisorConfig,
    /// The budget is the number of workers running when the advisor first runs.
    pub budget_from_cluster: bool,
    /// The service model from the profile, or why there is none.
    pub model: Result<ServiceModel, String>,
    /// Where the model came from (shown in the status).
    pub profile: String,
    /// A profile that may appear later (measured by `xpyd up` at first start) and the
    /// prefill chunk to read it at: read again while there is no model.
    pub reload: Option<(std::path::PathBuf, u32)>,
    /// Every setting of the workers but the layout.
    pub base: ClusterConfig,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            enabled: false,
            window: Duration::from_secs(60),
            config: AdvisorConfig::new(
                Slo {
                    ttft_s: 2.0,
                    tpot_s: 0.1,
                    attainment: 0.9,
                },
                1,
            ),
            budget_from_cluster: true,
            model: Err("no performance profile: name one under `advisor.profile` in the manifest (the JSON `xpyd bench profile` writes)".into()),
            profile: String::new(),
            reload: None,
            base: ClusterConfig::defaults(Layout::Aggregated { workers: 1 }),
        }
    }
}

/// The replicas per role the cluster should run, as last applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Desired {
    /// Grows by one with every apply; the supervisor acts once per generation.
    pub generation: u64,
    /// The split.
    pub layout: Layout,
    /// `operator` or `advisor (auto)`.
    pub by: String,
    /// Unix milliseconds.
    pub at_ms: u64,
}

impl Desired {
    /// Replicas per role, as the supervisor's `scale` takes them.
    pub fn replicas(&self) -> Value {
        replicas(self.layout)
    }
}

/// `{"prefill": x, "decode": y}` or `{"combined": n}`.
pub fn replicas(l: Layout) -> Value {
    match l {
        Layout::Disaggregated { prefill, decode } => json!({"prefill": prefill, "decode": decode}),
        Layout::Aggregated { workers } => json!({"combined": workers}),
    }
}

/// One change of the split.
#[derive(Debug, Clone, serde::Serialize)]
struct Change {
    at_ms: u64,
    from: String,
    to: String,
    by: String,
    /// Predicted goodput before and after (requests/s), when the advisor chose it.
    goodput: Option<(f64, f64)>,
}

/// What the loop and the API share.
#[derive(Debug)]
struct State {
    enabled: bool,
    window: Duration,
    config: AdvisorConfig,
    budget_from_cluster: bool,
    /// Built at the first window with the layout then running.
    advisor: Option<Advisor>,
    advice: Option<Advice>,
    advice_at_ms: Option<u64>,
    /// Why the last window gave no advice.
    status: String,
    desired: Option<Desired>,
    history: VecDeque<Change>,
}

/// The live advisor's state, held by the coordinator's [`crate::App`].
#[derive(Debug)]
pub struct Live {
    origin: Instant,
    model: Mutex<Result<ServiceModel, String>>,
    reload: Option<(std::path::PathBuf, u32)>,
    profile: String,
    base: ClusterConfig,
    /// `(finished at, request)`, in finishing order.
    ring: Mutex<VecDeque<(f64, Finished)>>,
    state: Mutex<State>,
    /// Wakes the loop after a config change.
    pub(crate) changed: tokio::sync::Notify,
    /// One simulation at a time (the loop and what-ifs share the cores with serving).
    pub(crate) sim: tokio::sync::Mutex<()>,
    /// Held from an apply's check that no other apply is still being carried out to its
    /// setting the new split, so two applies at once cannot both pass the check.
    pub(crate) applying: Mutex<()>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A body field that is out of range or malformed.
fn bad(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::invalid(field, reason)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 409,
        kind: "invalid_request_error",
        code: Some("conflict"),
        param: None,
        message: message.into(),
        retry_after: None,
    }
}

/// A planner error as a 400 naming the field.
pub(crate) fn plan_error(e: xpyd_planner::PlanError) -> ApiError {
    match e {
        xpyd_planner::PlanError::Invalid { field, reason } => bad(&field, reason),
        other => ApiError {
            status: 422,
            kind: "invalid_request_error",
            code: Some("infeasible"),
            param: None,
            message: other.to_string(),
            retry_after: None,
        },
    }
}

/// SLOs as the API spells them (milliseconds).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SloBody {
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    attainment: Option<f64>,
}

/// Longest TTFT SLO the API takes (10 min).
pub const MAX_TTFT_MS: f64 = 600_000.0;
/// Longest TPOT SLO the API takes (1 min per token).
pub const MAX_TPOT_MS: f64 = 60_000.0;

impl SloBody {
    /// Checks the numbers in the API's own names and units.
    ///
    /// # Errors
    /// 400 naming `slo.ttft_ms`, `slo.tpot_ms` or `slo.attainment`.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        for (field, v, max) in [
            ("slo.ttft_ms", self.ttft_ms, MAX_TTFT_MS),
            ("slo.tpot_ms", self.tpot_ms, MAX_TPOT_MS),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0 && v <= max)
            {
                return Err(bad(field, format!("{v} ms is outside (0, {max}]")));
            }
        }
        if let Some(a) = self.attainment
            && !(a > 0.0 && a <= 1.0)
        {
            return Err(bad("slo.attainment", format!("{a} is outside (0, 1]")));
        }
        Ok(())
    }

    /// These numbers over `s` (the keys not given keep `s`'s).
    pub(crate) fn over(&self, s: Slo) -> Slo {
        Slo {
            ttft_s: self.ttft_ms.map_or(s.ttft_s, |v| v / 1e3),
            tpot_s: self.tpot_ms.map_or(s.tpot_s, |v| v / 1e3),
            attainment: self.attainment.unwrap_or(s.attainment),
        }
    }
}

/// `PUT /v1/advisor/config`: every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    enabled: Option<bool>,
    window_s: Option<u64>,
    slo: Option<SloBody>,
    budget: Option<u32>,
    mode: Option<Mode>,
    min_gain: Option<f64>,
    streak: Option<u32>,
    cooldown_s: Option<f64>,
    history: Option<u32>,
}

/// Parses a JSON body, naming the field serde stopped at.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".into() } else { path };
        let inner = e.into_inner().to_string();
        // serde names an unknown key in its message; name it as the field too.
        let field = inner
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map_or(field, str::to_string);
        bad(&field, inner)
    })
}

/// What `POST /v1/advisor/apply` asks for: `None` — the recommendation.
pub(crate) fn parse_apply(body: &[u8], single: bool) -> Result<Option<Layout>, ApiError> {
    let v: serde_json::Map<String, Value> = parse_body(body)?;
    if v.is_empty() {
        return Ok(None);
    }
    let mut counts = [None, None, None];
    for (k, val) in &v {
        let slot = match k.as_str() {
            "prefill" => 0,
            "decode" => 1,
            "combined" => 2,
            other => {
                return Err(bad(
                    "role",
                    format!("`{other}` is not a role: prefill, decode or combined"),
                ));
            }
        };
        let n = val
            .as_u64()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| bad(k, format!("{val} is not a replica count in 1..=1024")))?;
        counts[slot] = Some(n as u32);
    }
    match (single, counts) {
        (false, [Some(prefill), Some(decode), None]) => {
            Ok(Some(Layout::Disaggregated { prefill, decode }))
        }
        (true, [None, None, Some(workers)]) => Ok(Some(Layout::Aggregated { workers })),
        (false, _) => Err(bad(
            "role",
            "a disaggregated cluster takes {\"prefill\": N, \"decode\": M}",
        )),
        (true, _) => Err(bad("role", "a single-mode cluster takes {\"combined\": N}")),
    }
}

impl Live {
    /// The advisor as the manifest sets it up.
    pub fn new(setup: Setup) -> Self {
        Live {
            origin: Instant::now(),
            model: Mutex::new(setup.model),
            reload: setup.reload,
            profile: setup.profile,
            base: setup.base,
            ring: Mutex::new(VecDeque::new()),
            state: Mutex::new(State {
                enabled: setup.enabled,
                window: setup.window,
                config: setup.config,
                budget_from_cluster: setup.budget_from_cluster,
                advisor: None,
                advice: None,
                advice_at_ms: None,
                status: "waiting for the first window".into(),
                desired: None,
                history: VecDeque::new(),
            }),
            changed: tokio::sync::Notify::new(),
            sim: tokio::sync::Mutex::new(()),
            applying: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<(f64, Finished)>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service model, reading the profile again if it was missing and may since
    /// have been measured.
    pub(crate) fn model(&self) -> Result<ServiceModel, String> {
        let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_err()
            && let Some((path, chunk)) = &self.reload
            && let Ok(text) = std::fs::read_to_string(path)
        {
            *m = xpyd_planner::profile::service_model(&text, *chunk)
                .map_err(|e| format!("profile {}: {e}", path.display()));
        }
        m.clone()
    }

    /// Seconds since the coordinator started: the clock of arrivals and of the advisor.
    pub fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// The same clock at `t`.
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.origin).as_secs_f64()
    }

    /// Records one finished (or failed) request, finished now.
    pub fn record(&self, f: Finished) {
        self.record_at(self.now(), f);
    }

    /// Records one request that finished at `finished_at` (on [`Live::now`]'s clock, not
    /// before the last one recorded).
    pub(crate) fn record_at(&self, finished_at: f64, f: Finished) {
        let mut r = self.ring();
        if r.len() >= RING_CAP {
            r.pop_front();
        }
        r.push_back((finished_at, f));
    }

    /// Requests that finished at or after `from` (seconds on [`Live::now`]'s clock), in
    /// arrival order. By finish, not arrival: under overload a request can take longer
    /// than a window, and a window of arrivals would then hold none that finished — the
    /// advisor would go blind exactly when the split is wrong. The ring is in finishing
    /// order, so only its tail is read.
    pub fn since(&self, from: f64) -> Vec<Finished> {
        let mut v: Vec<Finished> = self
            .ring()
            .iter()
            .rev()
            .take_while(|(t, _)| *t >= from)
            .map(|(_, f)| *f)
            .collect();
        v.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        v
    }

    /// Monitoring on, and the window.
    pub fn schedule(&self) -> (bool, Duration) {
        let s = self.lock();
        (s.enabled, s.window)
    }

    /// The last desired replicas, if any apply happened.
    pub fn desired(&self) -> Option<Desired> {
        self.lock().desired.clone()
    }

    /// Applies a `PUT /v1/advisor/config` body; returns the new config document.
    pub(crate) fn patch_config(&self, body: &[u8]) -> Result<Value, ApiError> {
        let b: ConfigBody = parse_body(body)?;
        let mut s = self.lock();
        let mut cfg = s.config.clone();
        if let Some(slo) = &b.slo {
            slo.check()?;
            cfg.slo = slo.over(cfg.slo);
        }
        if let Some(n) = b.budget {
            cfg.budget = n;
        }
        if let Some(m) = b.mode {
            cfg.mode = m;
        }
        if let Some(g) = b.min_gain {
            cfg.min_gain = g;
        }
        if let Some(n) = b.streak {
            cfg.streak = n;
        }
        if let Some(c) = b.cooldown_s {
            cfg.cooldown_s = c;
        }
        if let Some(h) = b.history {
            cfg.history = h;
        }
        cfg.validate().map_err(plan_error)?;
        if let Some(w) = b.window_s
            && !WINDOW_S.contains(&w)
        {
            return Err(bad(
                "window_s",
                format!("{w} is outside {}..={}", WINDOW_S.start(), WINDOW_S.end()),
            ));
        }
        if let Some(a) = &mut s.advisor {
            a.set_config(cfg.clone()).map_err(plan_error)?;
        }
        s.config = cfg;
        if b.budget.is_some() {
            s.budget_from_cluster = false;
        }
        if let Some(w) = b.window_s {
            s.window = Duration::from_secs(w);
        }
        if let Some(e) = b.enabled {
            s.enabled = e;
            if !e {
                s.status = "monitoring is off".into();
            }
        }
        drop(s);
        self.changed.notify_one();
        Ok(self.config_json())
    }

    fn config_json(&self) -> Value {
        let s = self.lock();
        let c = &s.config;
        json!({
            "enabled": s.enabled,
            "window_s": s.window.as_secs(),
            "slo": {"ttft_ms": c.slo.ttft_s * 1e3, "tpot_ms": c.slo.tpot_s * 1e3, "attainment": c.slo.attainment},
            "budget": if s.budget_from_cluster && s.advisor.is_none() { Value::Null } else { json!(c.budget) },
            "mode": c.mode,
            "min_gain": c.min_gain,
            "streak": c.streak,
            "cooldown_s": c.cooldown_s,
            "history": c.history,
        })
    }

    /// The whole status: config, profile, current and desired split, the last advice
    /// and the history of changes.
    pub(crate) fn status_json(&self, current: Option<Layout>, window_requests: usize) -> Value {
        let config = self.config_json();
        let s = self.lock();
        let converged = match (&s.desired, current) {
            (Some(d), Some(c)) => Some(d.layout == c),
            _ => None,
        };
        json!({
            "config": config,
            "profile": match &self.model() {
                Ok(m) => json!({"source": self.profile, "fit_error": {"prefill": m.errors.prefill, "decode": m.errors.decode, "transfer": m.errors.transfer}}),
                Err(e) => json!({"source": self.profile, "error": e}),
            },
            "current": current.map(|l| l.to_string()),
            "current_replicas": current.map(replicas),
            "desired": s.desired.as_ref().map(|d| json!({
                "generation": d.generation, "layout": d.layout.to_string(),
                "replicas": d.replicas(), "by": d.by, "at_ms": d.at_ms,
            })),
            "converged": converged,
            "window_requests": window_requests,
            "status": s.status,
            "advice_at_ms": s.advice_at_ms,
            "advice": s.advice.as_ref().map(advice_json),
            "history": s.history,
        })
    }

    /// Records `layout` as desired (by `by`), starts the advisor's cool-down; returns
    /// the new desired state.
    pub(crate) fn apply(
        &self,
        layout: Layout,
        current: Option<Layout>,
        by: &str,
        goodput: Option<(f64, f64)>,
    ) -> Desired {
        let now = self.now();
        let mut s = self.lock();
        let generation = s.desired.as_ref().map_or(0, |d| d.generation) + 1;
        let d = Desired {
            generation,
            layout,
            by: by.into(),
            at_ms: unix_ms(),
        };
        s.desired = Some(d.clone());
        if let Some(a) = &mut s.advisor {
            a.applied(now, layout);
        }
        if s.history.len() >= HISTORY_CAP {
            s.history.pop_front();
        }
        s.history.push_back(Change {
            at_ms: d.at_ms,
            from: current.map_or_else(|| "-".into(), |l| l.to_string()),
            to: layout.to_string(),
            by: by.into(),
            goodput,
        });
        d
    }

    /// The recommendation of the last advice, if it differs from `current`.
    pub(crate) fn recommendation(&self) -> Result<(Layout, (f64, f64)), ApiError> {
        let s = self.lock();
        let a = s
            .advice
            .as_ref()
            .ok_or_else(|| conflict(format!("no advice yet ({})", s.status)))?;
        Ok((a.recommended, a.goodput))
    }

    /// The advisor to run on the next window (built on first use with `current`), or
    /// why there is none.
    fn take_advisor(&self, current: Layout) -> Result<(Advisor, u64), String> {
        let model = self.model()?;
        let mut s = self.lock();
        let generation = s.desired.as_ref().map_or(0, |d| d.generation);
        if let Some(a) = &mut s.advisor {
            a.observed_layout(current);
            return Ok((a.clone(), generation));
        }
        let mut cfg = s.config.clone();
        if s.budget_from_cluster {
            cfg.budget = current.units();
        }
        let a = Advisor::new(cfg.clone(), model, self.base.clone(), current)
            .map_err(|e| e.to_string())?;
        s.config = cfg;
        s.advisor = Some(a.clone());
        Ok((a, generation))
    }

    /// Stores the outcome of one window; `advisor` is the one [`Live::take_advisor`]
    /// gave (at desired generation `generation`), after its observation.
    fn finish_window(&self, advisor: Option<(Advisor, u64)>, result: Result<Advice, String>) {
        let now = self.now();
        let mut s = self.lock();
        if let Some((mut a, generation)) = advisor {
            // Keep what changed while the window ran: settings, and an apply.
            if a.config() != &s.config {
                let _ = a.set_config(s.config.clone());
            }
            if let Some(d) = s.desired.as_ref().filter(|d| d.generation != generation) {
                a.applied(now, d.layout);
            }
            s.advisor = Some(a);
        }
        match result {
            Ok(advice) => {
                s.status = format!("{:?}", advice.action).to_lowercase();
                s.advice = Some(advice);
                s.advice_at_ms = Some(unix_ms());
            }
            Err(e) => s.status = e,
        }
    }
}

/// An advice as JSON: times in ms, layouts as text and as replicas.
pub(crate) fn advice_json(a: &Advice) -> Value {
    let run = |r: &xpyd_planner::search::RunStats| {
        json!({
            "rate": r.rate, "attainment": r.attainment, "failed": r.failed,
            "ttft_ms": {"p50": r.ttft.p50 * 1e3, "p90": r.ttft.p90 * 1e3, "p99": r.ttft.p99 * 1e3},
            "tpot_ms": {"p50": r.tpot.p50 * 1e3, "p90": r.tpot.p90 * 1e3, "p99": r.tpot.p99 * 1e3},
        })
    };
    json!({
        "current": a.current.to_string(),
        "recommended": a.recommended.to_string(),
        "recommended_replicas": replicas(a.recommended),
        "action": a.action,
        "observed_rate": a.observed_rate,
        "forecast_rate": a.forecast_rate,
        "goodput": {"current": a.goodput.0, "recommended": a.goodput.1},
        "now": run(&a.now),
        "after": run(&a.after),
        "curve": a.curve.iter().map(|(l, g)| json!({"layout": l.to_string(), "goodput": g})).collect::<Vec<_>>(),
        "calibration": {"prefill": a.calibration.0, "decode": a.calibration.1},
        "why": a.why,
        "confidence": a.confidence,
    })
}

#[cfg(test)]
mod tests;
