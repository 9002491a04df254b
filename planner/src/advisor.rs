//! The advisor: given the requests the cluster finished in the last window, what split
//! to run next. Pure: the caller passes the time and the window.
//!
//! Each [`Advisor::observe`]:
//! 1. turns the window into a trace (arrival, prompt, cached, output) and its rate;
//! 2. calibrates the service model per role — the factors (clamped to `0.5..=2`) at
//!    which the current layout, simulated on the window as it arrived, gives the
//!    observed mean TTFT and TPOT ([`calibration_solved`]);
//! 3. forecasts the next window's rate (Holt's linear smoothing of window rates);
//! 4. ranks every split of the budget by simulated goodput on the window's mix, and
//!    predicts TTFT/TPOT at the forecast rate for the current and the best split;
//! 5. decides: `keep`, `suggest` (a better split for `streak` windows in a row, by more
//!    than the noise — the larger of `min_gain` and twice the fits' error) or `apply`
//!    (the same, in auto mode, outside the cool-down after the last change).

use crate::PlanError;
use crate::search::{self, RunStats, Slo};
use crate::service::ServiceModel;
use crate::sim::{ClusterConfig, Layout, simulate};
use crate::traffic::{SimRequest, Traffic};

/// One request the coordinator finished (or failed) in the window.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Finished {
    /// Arrival, seconds (any origin; only differences matter).
    pub arrival: f64,
    /// Prompt tokens.
    pub input: u32,
    /// Of those, prefix-cache hits.
    pub cached: u32,
    /// Output tokens.
    pub output: u32,
    /// Observed TTFT, seconds (NaN if it failed before a first token).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::nan_or_number"))]
    pub ttft: f64,
    /// Observed TPOT, seconds (NaN for one token or a failure).
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::nan_or_number"))]
    pub tpot: f64,
}

impl Finished {
    /// `req` as the simulator served it (`result`): a failed request has NaN TPOT, as
    /// the coordinator records it. For windows made from simulations (tests, examples).
    pub fn observed(req: &SimRequest, result: &crate::sim::RequestResult) -> Finished {
        Finished {
            arrival: req.arrival,
            input: req.input,
            cached: req.cached,
            output: req.output,
            ttft: result.ttft,
            tpot: if result.outcome == crate::sim::Outcome::Finished {
                result.tpot
            } else {
                f64::NAN
            },
        }
    }
}

/// Manual: suggest only. Auto: apply a suggestion outside the cool-down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Mode {
    /// Suggest; an operator applies.
    Manual,
    /// Apply on its own.
    Auto,
}

/// Which layouts the advisor may recommend: a running cluster can change its split
/// (and size) but not its mode without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Shapes {
    /// xPyD splits and aggregated.
    #[default]
    Any,
    /// xPyD splits only (a disaggregated cluster).
    Disaggregated,
    /// Aggregated only (a single-mode cluster).
    Aggregated,
}

impl Shapes {
    /// Whether `l` is one of these.
    pub fn allows(self, l: Layout) -> bool {
        matches!(
            (self, l),
            (Shapes::Any, _)
                | (Shapes::Disaggregated, Layout::Disaggregated { .. })
                | (Shapes::Aggregated, Layout::Aggregated { .. })
        )
    }
}

/// What the advisor is asked to do.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdvisorConfig {
    /// The objectives.
    pub slo: Slo,
    /// Workers to split.
    pub budget: u32,
    /// Manual or auto.
    pub mode: Mode,
    /// Smallest relative goodput gain worth a change.
    pub min_gain: f64,
    /// Windows in a row the same better split must win before it is suggested.
    pub streak: u32,
    /// Seconds after a change during which nothing is applied.
    pub cooldown_s: f64,
    /// Goodput search precision.
    pub precision: f64,
    /// Windows whose requests the ranking uses (this one and the ones before): one
    /// window's mix can tip a near tie either way, several steady it; a shift still
    /// wins within two windows of three.
    pub history: u32,
    /// The layouts it may recommend (the curve still shows every split).
    #[cfg_attr(feature = "serde", serde(default))]
    pub shapes: Shapes,
}

impl AdvisorConfig {
    /// Defaults for `slo` and `budget`: manual, 10 % gain, 2 windows, 10 min cool-down.
    pub fn new(slo: Slo, budget: u32) -> Self {
        AdvisorConfig {
            slo,
            budget,
            mode: Mode::Manual,
            min_gain: 0.1,
            streak: 2,
            cooldown_s: 600.0,
            precision: 0.05,
            history: 3,
            shapes: Shapes::Any,
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        self.slo.validate()?;
        if self.budget == 0 || self.budget > 1024 {
            return Err(PlanError::invalid(
                "budget",
                format!("{} is outside 1..=1024", self.budget),
            ));
        }
        if !(0.0..=10.0).contains(&self.min_gain) {
            return Err(PlanError::invalid(
                "min_gain",
                format!("{} is outside 0..=10", self.min_gain),
            ));
        }
        if self.streak == 0 || self.streak > 100 {
            return Err(PlanError::invalid(
                "streak",
                format!("{} is outside 1..=100", self.streak),
            ));
        }
        if self.history == 0 || self.history > 60 {
            return Err(PlanError::invalid(
                "history",
                format!("{} is outside 1..=60", self.history),
            ));
        }
        if !(self.cooldown_s.is_finite() && self.cooldown_s >= 0.0) {
            return Err(PlanError::invalid("cooldown_s", "not a time ≥ 0"));
        }
        Ok(())
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Action {
    /// Stay.
    Keep,
    /// Recommend the change to an operator.
    Suggest,
    /// Change now (auto mode).
    Apply,
}

/// One observation's advice.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Advice {
    /// The split running now.
    pub current: Layout,
    /// The best split found.
    pub recommended: Layout,
    /// What to do.
    pub action: Action,
    /// The window's rate (requests/s).
    pub observed_rate: f64,
    /// The next window's forecast rate.
    pub forecast_rate: f64,
    /// Predicted goodput of the current and the recommended split (requests/s).
    pub goodput: (f64, f64),
    /// Predicted run of the current split at the forecast rate.
    pub now: RunStats,
    /// Predicted run of the recommended split at the forecast rate.
    pub after: RunStats,
    /// Every split with its goodput (`None`: pruned by its bound).
    pub curve: Vec<(Layout, Option<f64>)>,
    /// Calibration factors applied (prefill, decode).
    pub calibration: (f64, f64),
    /// Why, in words.
    pub why: String,
    /// 0..1: less with few requests in the window or loose fits.
    pub confidence: f64,
}

/// Finished requests (in arrival order) as a trace to simulate: arrivals from the first,
/// at least one prompt and one output token, at least one prompt token computed.
pub fn trace_of(window: &[Finished]) -> Vec<SimRequest> {
    let t0 = window.first().map_or(0.0, |f| f.arrival);
    window
        .iter()
        .map(|f| SimRequest {
            arrival: f.arrival - t0,
            input: f.input.max(1),
            cached: f.cached.min(f.input.max(1) - 1),
            output: f.output.max(1),
        })
        .collect()
}

/// Holt's linear smoothing of window rates.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Forecast {
    level: Option<f64>,
    trend: f64,
}

impl Forecast {
    const ALPHA: f64 = 0.5;
    const BETA: f64 = 0.3;

    fn add(&mut self, x: f64) -> f64 {
        match self.level {
            None => self.level = Some(x),
            Some(l) => {
                let level = Self::ALPHA * x + (1.0 - Self::ALPHA) * (l + self.trend);
                self.trend = Self::BETA * (level - l) + (1.0 - Self::BETA) * self.trend;
                self.level = Some(level);
            }
        }
        (self.level.unwrap_or(x) + self.trend).max(0.0)
    }
}

/// The advisor's state across windows.
#[derive(Debug, Clone)]
pub struct Advisor {
    cfg: AdvisorConfig,
    model: ServiceModel,
    base: ClusterConfig,
    current: Layout,
    forecast: Forecast,
    streak: Option<(Layout, u32)>,
    last_change: Option<f64>,
    /// The previous windows' requests (arrivals from each window's start) and lengths.
    past: std::collections::VecDeque<(Vec<SimRequest>, f64)>,
}

/// Precision of the goodputs the decision compares.
const FINE_PRECISION: f64 = 0.01;

/// The smallest window that gets advice (fewer requests say too little).
pub const MIN_WINDOW_REQUESTS: usize = 10;

/// A window whose mean prompt or output length differs from the past windows' by more
/// than this factor starts the history over.
pub const MIX_SHIFT: f64 = 1.5;

/// The clamp of each calibration factor: a worker seen more than twice as fast or as
/// slow as its profile says the profile is wrong, not that it drifted.
pub const CALIBRATION_RANGE: std::ops::RangeInclusive<f64> = 0.5..=2.0;

/// Per-role calibration factors `(prefill, decode)` of `model` from requests that ran on
/// `cfg`'s layout, in one step: the window is replayed as it arrived and the observed
/// mean TTFT and TPOT are divided by the simulated ones (each clamped to
/// [`CALIBRATION_RANGE`]; a factor without observations is 1). A first-order step:
/// queueing in the window makes the TTFT ratio stronger than the service-time change
/// behind it (the queue grows faster than the service time), so a loaded window reads
/// slower workers than it ran on; [`calibration_solved`] finds the factors themselves.
///
/// # Errors
/// [`PlanError::Invalid`] for an empty or malformed window, or a configuration the
/// simulator rejects.
pub fn calibration(
    model: &ServiceModel,
    cfg: &ClusterConfig,
    window: &[Finished],
) -> Result<(f64, f64), PlanError> {
    let (trace, observed) = calibration_window(window)?;
    one_step(model, cfg, &trace, observed)
}

/// [`calibration`] on a window already made a trace, with its observed means.
fn one_step(
    model: &ServiceModel,
    cfg: &ClusterConfig,
    trace: &[SimRequest],
    observed: Means,
) -> Result<(f64, f64), PlanError> {
    let predicted = replay_means(model, cfg, trace)?;
    let ratio = |obs: Option<f64>, pred: Option<f64>| match (obs, pred) {
        (Some(o), Some(p)) if p > 0.0 => {
            (o / p).clamp(*CALIBRATION_RANGE.start(), *CALIBRATION_RANGE.end())
        }
        _ => 1.0,
    };
    Ok((
        ratio(observed.0, predicted.0),
        ratio(observed.1, predicted.1),
    ))
}

/// The factors `(prefill, decode)` within [`CALIBRATION_RANGE`] at which the replay of
/// the window gives its observed mean TTFT and mean TPOT. From one [`calibration`]
/// step, each factor in turn (the other held), twice over, is kept if its replay meets
/// the mean within 0.1 %, else solved for ([`solve_factor`]): about 17 replays of the
/// window in `xpyd bench planner`'s case (27 by bisection), at most 53. The bounds of
/// the range come back when the window lies beyond them.
///
/// # Errors
/// As [`calibration`].
pub fn calibration_solved(
    model: &ServiceModel,
    cfg: &ClusterConfig,
    window: &[Finished],
) -> Result<(f64, f64), PlanError> {
    let (trace, observed) = calibration_window(window)?;
    let mut cal = one_step(model, cfg, &trace, observed)?;
    for _ in 0..2 {
        cal.0 = solve_factor(observed.0, cal.0, &|f| {
            Ok(replay_means(&model.calibrated(f, cal.1), cfg, &trace)?.0)
        })?;
        cal.1 = solve_factor(observed.1, cal.1, &|f| {
            Ok(replay_means(&model.calibrated(cal.0, f), cfg, &trace)?.1)
        })?;
    }
    Ok(cal)
}

/// The factor within [`CALIBRATION_RANGE`] whose replay mean (`mean_at`, rising with
/// the factor) meets `target`. `start` stays when its replay already does (within
/// [`CALIBRATION_MATCH`]), so a window the model explains keeps its factors exactly.
/// Otherwise regula falsi in log scale with the Illinois step: the first step rescales
/// by target ÷ mean (met at once when the mean is proportional to the factor), each
/// step keeps the bracket of factors whose means lie either side of the target, and a
/// step that would leave it bisects instead. A bound of the range comes back when the
/// target lies beyond it; `start` when a replay has no mean.
fn solve_factor(
    target: Option<f64>,
    start: f64,
    mean_at: &dyn Fn(f64) -> Result<Option<f64>, PlanError>,
) -> Result<f64, PlanError> {
    let Some(target) = target.filter(|t| *t > 0.0) else {
        return Ok(start);
    };
    // ln(mean ÷ target) at the factor e^x; `None` when the replay has no mean.
    let gap = |x: f64| -> Result<Option<f64>, PlanError> {
        Ok(mean_at(x.exp())?
            .filter(|p| *p > 0.0)
            .map(|p| (p / target).ln()))
    };
    let met = |g: f64| g.exp_m1().abs() <= CALIBRATION_MATCH;
    let (mut x, mut g) = match gap(start.ln())? {
        Some(g) if !met(g) => (start.ln(), g),
        _ => return Ok(start),
    };
    // The bracket: `a` below the target, `b` above it, with their gaps once replayed.
    let (mut a, mut ga) = (CALIBRATION_RANGE.start().ln(), None::<f64>);
    let (mut b, mut gb) = (CALIBRATION_RANGE.end().ln(), None::<f64>);
    let mut last_below = None;
    for _ in 0..CALIBRATION_STEPS {
        let below = g < 0.0;
        if below {
            (a, ga) = (x, Some(g));
        } else {
            (b, gb) = (x, Some(g));
        }
        // Illinois: the same end moved twice, so the other end's weight halves.
        if last_below == Some(below) {
            if below {
                gb = gb.map(|v| 0.5 * v);
            } else {
                ga = ga.map(|v| 0.5 * v);
            }
        }
        last_below = Some(below);
        if b - a <= CALIBRATION_WIDTH {
            break;
        }
        let next = match (ga, gb) {
            (Some(ga), Some(gb)) => a - ga * (b - a) / (gb - ga),
            // One end replayed: rescale, up to the other end of the range.
            _ => (x - g).clamp(a, b),
        };
        x = if next > a && next < b || ga.is_none() || gb.is_none() {
            next
        } else {
            0.5 * (a + b)
        };
        match gap(x)? {
            Some(v) if met(v) => return Ok(x.exp()),
            Some(v) => g = v,
            None => return Ok(start),
        }
    }
    Ok((0.5 * (a + b)).exp())
}

/// How near the observed mean a replay must come for [`calibration_solved`] to keep a
/// factor.
const CALIBRATION_MATCH: f64 = 1e-3;

/// Most replays [`solve_factor`] makes after the one at its start.
const CALIBRATION_STEPS: u32 = 12;

/// A bracket this narrow (in log scale, 0.03 %) ends [`solve_factor`].
const CALIBRATION_WIDTH: f64 = 3e-4;

/// Mean TTFT and TPOT, when there are any.
type Means = (Option<f64>, Option<f64>);

/// The window as a trace (in arrival order) and its observed mean TTFT and TPOT.
fn calibration_window(window: &[Finished]) -> Result<(Vec<SimRequest>, Means), PlanError> {
    if window.is_empty() {
        return Err(PlanError::invalid("window", "no requests to calibrate on"));
    }
    let mut sorted = window.to_vec();
    sorted.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    let trace = trace_of(&sorted);
    Traffic::Trace(trace.clone()).validate()?;
    let observed = (
        mean(sorted.iter().map(|f| f.ttft)),
        mean(sorted.iter().map(|f| f.tpot)),
    );
    Ok((trace, observed))
}

/// Mean simulated TTFT and TPOT of `trace` on `cfg`.
fn replay_means(
    model: &ServiceModel,
    cfg: &ClusterConfig,
    trace: &[SimRequest],
) -> Result<Means, PlanError> {
    let r = simulate(model, cfg, trace)?;
    Ok((
        mean(r.requests.iter().map(|q| q.ttft)),
        mean(r.requests.iter().map(|q| q.tpot)),
    ))
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for x in xs.filter(|x| x.is_finite()) {
        s += x;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

impl Advisor {
    /// An advisor for a cluster running `current`, with `base` giving every other
    /// setting of its workers and `model` the profile's service model.
    ///
    /// # Errors
    /// A bad config, model or cluster.
    pub fn new(
        cfg: AdvisorConfig,
        model: ServiceModel,
        base: ClusterConfig,
        current: Layout,
    ) -> Result<Self, PlanError> {
        cfg.validate()?;
        model.validate()?;
        ClusterConfig {
            layout: current,
            ..base.clone()
        }
        .validate()?;
        Ok(Advisor {
            cfg,
            model,
            base,
            current,
            forecast: Forecast::default(),
            streak: None,
            last_change: None,
            past: std::collections::VecDeque::new(),
        })
    }

    /// The split running now.
    pub fn current(&self) -> Layout {
        self.current
    }

    /// The settings in force.
    pub fn config(&self) -> &AdvisorConfig {
        &self.cfg
    }

    /// New settings (SLOs, budget, mode, hysteresis); the rate forecast and the past
    /// windows are kept, the streak toward a suggestion starts over.
    ///
    /// # Errors
    /// A bad config (the advisor keeps the old one).
    pub fn set_config(&mut self, cfg: AdvisorConfig) -> Result<(), PlanError> {
        cfg.validate()?;
        self.cfg = cfg;
        self.streak = None;
        Ok(())
    }

    /// The cluster was seen running `layout` (workers came or went without an apply):
    /// no cool-down starts, but a streak toward another split starts over.
    pub fn observed_layout(&mut self, layout: Layout) {
        if layout != self.current {
            self.current = layout;
            self.streak = None;
        }
    }

    /// The cluster now runs `layout` (applied at `now`, seconds): the cool-down starts.
    pub fn applied(&mut self, now: f64, layout: Layout) {
        self.current = layout;
        self.last_change = Some(now);
        self.streak = None;
    }

    /// Whether `trace`'s mean uncached prompt or mean output differs from the past
    /// windows' by more than [`MIX_SHIFT`]×: why, if so.
    fn mix_shift(&self, trace: &[SimRequest]) -> Option<String> {
        if self.past.is_empty() {
            return None;
        }
        let means = |rs: &mut dyn Iterator<Item = &SimRequest>| {
            let (mut n, mut i, mut o) = (0.0, 0.0, 0.0);
            for r in rs {
                n += 1.0;
                i += f64::from(r.input - r.cached);
                o += f64::from(r.output);
            }
            (i / n, o / n)
        };
        let (pi, po) = means(&mut self.past.iter().flat_map(|(w, _)| w.iter()));
        let (ni, no) = means(&mut trace.iter());
        let apart = |a: f64, b: f64| a.max(b) / a.min(b).max(1e-9) > MIX_SHIFT;
        (apart(pi, ni) || apart(po, no)).then(|| {
            format!(
                "the length mix shifted (mean prompt {pi:.0} → {ni:.0} tokens, output {po:.0} → {no:.0}): ranked on this window alone"
            )
        })
    }

    /// Advice from the window `[now − window_s, now]` of finished requests.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] for a window too small or malformed (naming the field),
    /// [`PlanError::Infeasible`] when no split meets the SLOs on this traffic.
    pub fn observe(
        &mut self,
        now: f64,
        window_s: f64,
        window: &[Finished],
    ) -> Result<Advice, PlanError> {
        if !(window_s.is_finite() && window_s > 0.0) {
            return Err(PlanError::invalid("window_s", "not a time > 0"));
        }
        if window.len() < MIN_WINDOW_REQUESTS {
            return Err(PlanError::invalid(
                "window",
                format!(
                    "{} requests; advice needs at least {MIN_WINDOW_REQUESTS}",
                    window.len()
                ),
            ));
        }
        let mut sorted = window.to_vec();
        sorted.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        let trace = trace_of(&sorted);
        Traffic::Trace(trace.clone()).validate()?;
        // A shift in the length mix makes the older windows describe traffic that is
        // gone: rank on this window alone (and count the streak from here).
        let shift = self.mix_shift(&trace);
        if shift.is_some() {
            self.past.clear();
            self.streak = None;
        }
        // The ranking's traffic: this window after the ones before it, end to end.
        self.past.push_back((trace.clone(), window_s));
        while self.past.len() > self.cfg.history as usize {
            self.past.pop_front();
        }
        let mut union = Vec::new();
        let mut offset = 0.0;
        for (w, len) in &self.past {
            union.extend(w.iter().map(|r| SimRequest {
                arrival: r.arrival + offset,
                ..*r
            }));
            offset += len.max(w.last().map_or(0.0, |r| r.arrival));
        }
        let traffic = Traffic::Trace(union.clone());
        traffic.validate()?;
        let observed_rate = window.len() as f64 / window_s;
        let forecast_rate = self.forecast.add(observed_rate).max(1e-6);
        // Calibration: the current layout on the window as it arrived.
        let current_cfg = ClusterConfig {
            layout: self.current,
            ..self.base.clone()
        };
        let cal = calibration_solved(&self.model, &current_cfg, &sorted)?;
        let model = self.model.calibrated(cal.0, cal.1);
        let shapes = self.cfg.shapes;
        let ranked = search::rank_preferring(
            &model,
            &self.base,
            &traffic,
            &self.cfg.slo,
            self.cfg.budget,
            self.cfg.precision,
            &|l| shapes.allows(l),
        )?;
        let curve: Vec<(Layout, Option<f64>)> = ranked
            .iter()
            .map(|r| (r.layout, r.goodput.as_ref().map(|g| g.rate)))
            .collect();
        let overall = &ranked[0];
        let best = ranked
            .iter()
            .find(|r| self.cfg.shapes.allows(r.layout))
            .ok_or_else(|| {
                PlanError::invalid("shapes", "no split of the budget is of the allowed kind")
            })?;
        // The best overall is another mode: worth saying, not applying.
        let other_mode = (overall.layout != best.layout)
            .then(|| {
                overall.goodput.as_ref().map(|g| {
                    format!(
                        "; {} would give {:.3} requests/s, but changing the mode needs a restart",
                        overall.layout, g.rate
                    )
                })
            })
            .flatten()
            .unwrap_or_default();
        let at = |layout: Layout| -> Result<RunStats, PlanError> {
            let c = ClusterConfig {
                layout,
                ..self.base.clone()
            };
            let r = simulate(&model, &c, &traffic.at_rate(forecast_rate))?;
            Ok(search::stats(&r, &self.cfg.slo, forecast_rate))
        };
        // The two that matter, measured finely (the ranking's bracket alone could make
        // a tie look like a gain), on the whole window and on each half of it: how far
        // the gain moves between halves is the window's sampling noise.
        let fine = |layout: Layout, t: &Traffic| -> Result<f64, PlanError> {
            let c = ClusterConfig {
                layout,
                ..self.base.clone()
            };
            Ok(search::goodput(&model, &c, t, &self.cfg.slo, FINE_PRECISION)?.rate)
        };
        let gain_of = |best: f64, current: f64| {
            if current > 0.0 {
                best / current - 1.0
            } else if best > 0.0 {
                f64::INFINITY
            } else {
                0.0
            }
        };
        let best_rate = fine(best.layout, &traffic)?;
        let current_rate = fine(self.current, &traffic)?;
        let gain = gain_of(best_rate, current_rate);
        let spread = if best.layout == self.current {
            0.0
        } else {
            let mut gains = [gain; 2];
            for (k, g) in gains.iter_mut().enumerate() {
                let h = Traffic::Trace(union.iter().skip(k).step_by(2).copied().collect());
                if h.validate().is_ok() {
                    *g = gain_of(fine(best.layout, &h)?, fine(self.current, &h)?);
                }
            }
            (gains[0] - gains[1]).abs().min(10.0)
        };
        let now_stats = at(self.current)?;
        let after = at(best.layout)?;
        let noise = self
            .cfg
            .min_gain
            .max(2.0 * (model.errors.prefill.max(model.errors.decode)).min(1.0))
            .max(spread);
        // The current split misses the SLOs at the forecast rate and the best meets them:
        // a change is worth it whatever the goodput gain.
        let rescue = now_stats.attainment < self.cfg.slo.attainment
            && after.attainment >= self.cfg.slo.attainment;
        let better = best.layout != self.current && (gain > noise || rescue);
        let count = match (&self.streak, better) {
            (Some((l, n)), true) if *l == best.layout => n + 1,
            (_, true) => 1,
            (_, false) => 0,
        };
        self.streak = better.then_some((best.layout, count));
        let cooling = self
            .last_change
            .is_some_and(|t| now - t < self.cfg.cooldown_s);
        let action = if !better || count < self.cfg.streak {
            Action::Keep
        } else if self.cfg.mode == Mode::Auto && !cooling {
            Action::Apply
        } else {
            Action::Suggest
        };
        let bottleneck = best.goodput.as_ref().map_or("", |g| g.bottleneck.explain());
        let why = if best.layout == self.current {
            format!(
                "{} is already the best split of {} workers for this traffic (goodput {best_rate:.3} requests/s); past it: {bottleneck}",
                self.current, self.cfg.budget
            )
        } else if !better {
            format!(
                "{} would give {best_rate:.3} requests/s against {current_rate:.3} now ({:+.0}%), within the noise of ±{:.0}%: keep {}",
                best.layout,
                100.0 * gain.min(99.99),
                100.0 * noise,
                self.current
            )
        } else {
            let base = if rescue {
                format!(
                    "at the forecast {forecast_rate:.3} requests/s, {} meets the SLOs for {:.0}% of requests and {} for {:.0}%",
                    self.current,
                    100.0 * now_stats.attainment,
                    best.layout,
                    100.0 * after.attainment
                )
            } else {
                format!(
                    "{} gives {best_rate:.3} requests/s of goodput against {current_rate:.3} for {} ({:+.0}%)",
                    best.layout,
                    self.current,
                    100.0 * gain.min(99.99)
                )
            };
            let when = match action {
                Action::Keep => format!(
                    "; window {count} of {} before suggesting it",
                    self.cfg.streak
                ),
                Action::Suggest if cooling => "; in the cool-down after the last change".into(),
                _ => String::new(),
            };
            format!("{base}; limit of {}: {bottleneck}{when}", best.layout)
        };
        let sample = (window.len() as f64 / 200.0).min(1.0);
        let fit = (1.0 - model.errors.prefill - model.errors.decode).clamp(0.0, 1.0);
        let calibrated = 1.0 - ((cal.0.ln().abs() + cal.1.ln().abs()) / (2.0 * 2f64.ln())) * 0.5;
        let why = why + &other_mode + &shift.map(|s| format!("; {s}")).unwrap_or_default();
        Ok(Advice {
            current: self.current,
            recommended: best.layout,
            action,
            observed_rate,
            forecast_rate,
            goodput: (current_rate, best_rate),
            now: now_stats,
            after,
            curve,
            calibration: cal,
            why,
            confidence: (sample * fit * calibrated).clamp(0.0, 1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tests::model;
    use crate::traffic::Process;

    fn slo() -> Slo {
        Slo {
            ttft_s: 2.0,
            tpot_s: 0.06,
            attainment: 0.9,
        }
    }

    /// A window of `traffic` at `rate` as the simulator says `layout` serves it.
    fn window(traffic: &Traffic, rate: f64, layout: Layout, t0: f64) -> Vec<Finished> {
        let reqs = traffic.at_rate(rate);
        let c = ClusterConfig::defaults(layout);
        let r = simulate(&model(), &c, &reqs).unwrap();
        reqs.iter()
            .zip(&r.requests)
            .map(|(q, o)| Finished {
                arrival: t0 + q.arrival,
                ..Finished::observed(q, o)
            })
            .collect()
    }

    fn mix(input: &str, output: &str, seed: u64) -> Traffic {
        Traffic::Generated {
            input: input.parse().unwrap(),
            output: output.parse().unwrap(),
            process: Process::Poisson,
            prefix_hit: 0.0,
            requests: 300,
            seed,
        }
    }

    fn advisor(mode: Mode, current: Layout) -> Advisor {
        let cfg = AdvisorConfig {
            mode,
            cooldown_s: 300.0,
            ..AdvisorConfig::new(slo(), 4)
        };
        Advisor::new(
            cfg,
            model(),
            ClusterConfig::defaults(Layout::Aggregated { workers: 1 }),
            current,
        )
        .unwrap()
    }

    #[test]
    fn a_wrong_split_is_suggested_after_the_streak_and_applied_in_auto_mode() {
        // Long prompts, short outputs on 1P3D: prefill-bound.
        let long_in = mix("uniform:1500-2500", "uniform:4-16", 3);
        let wrong = Layout::Disaggregated {
            prefill: 1,
            decode: 3,
        };
        let mut a = advisor(Mode::Manual, wrong);
        let w = window(&long_in, 0.5, wrong, 0.0);
        let first = a.observe(60.0, 600.0, &w).unwrap();
        assert_ne!(first.recommended, wrong, "{}", first.why);
        if let Layout::Disaggregated { prefill, decode } = first.recommended {
            assert!(prefill > decode, "{}", first.recommended);
        }
        assert!(first.goodput.1 > first.goodput.0 * 1.1, "{first:?}");
        assert_eq!(first.action, Action::Keep, "{}", first.why);
        assert!(first.why.contains("window 1 of 2"), "{}", first.why);
        let second = a.observe(120.0, 600.0, &w).unwrap();
        assert_eq!(second.action, Action::Suggest, "{}", second.why);
        assert_eq!(second.recommended, first.recommended);
        // Auto mode applies it after the streak…
        let mut auto = advisor(Mode::Auto, wrong);
        assert_eq!(auto.observe(60.0, 600.0, &w).unwrap().action, Action::Keep);
        let applied = auto.observe(120.0, 600.0, &w).unwrap();
        assert_eq!(applied.action, Action::Apply, "{}", applied.why);
        // … and when the cluster is set back to the wrong split right after, the cool-down
        // (300 s from the change) holds the next change to a suggestion until it ends.
        auto.applied(130.0, wrong);
        auto.observe(180.0, 600.0, &w).unwrap();
        let held = auto.observe(240.0, 600.0, &w).unwrap();
        assert_eq!(held.action, Action::Suggest, "{}", held.why);
        assert!(held.why.contains("cool-down"), "{}", held.why);
        let later = auto.observe(440.0, 600.0, &w).unwrap();
        assert_eq!(later.action, Action::Apply, "{}", later.why);
    }

    #[test]
    fn an_overloaded_split_is_changed_in_auto_mode() {
        // Short prompts and long outputs at a rate one decode worker cannot carry: 3P1D
        // queues without bound (TTFT grows through the window, requests time out), so
        // its goodput on the window is 0 — the change must still be made.
        let decode_bound = mix("uniform:16-64", "uniform:128-256", 7);
        let wrong = Layout::Disaggregated {
            prefill: 3,
            decode: 1,
        };
        let mut a = advisor(Mode::Auto, wrong);
        let mut actions = Vec::new();
        for k in 0..3 {
            let w = window(&decode_bound, 5.0, wrong, 60.0 * k as f64);
            let adv = a.observe(60.0 * (k + 1) as f64, 60.0, &w).unwrap();
            actions.push((adv.action, adv.recommended, adv.why));
        }
        assert_eq!(actions[0].0, Action::Keep, "{actions:#?}");
        assert!(
            actions[1..]
                .iter()
                .all(|(act, rec, _)| *act == Action::Apply && *rec != wrong),
            "{actions:#?}"
        );
    }

    #[test]
    fn a_shift_in_the_length_mix_is_followed_within_the_streak() {
        // Short prompts, long outputs for three windows (the history), then long
        // prompts, short outputs: the old windows are dropped at once, so the advice
        // turns at the first window after the shift and is suggested at the streak.
        let split = Layout::Disaggregated {
            prefill: 2,
            decode: 2,
        };
        let mut a = advisor(Mode::Manual, split);
        for k in 0..3 {
            let short = mix("uniform:16-64", "uniform:128-256", 10 + k);
            let w = window(&short, 2.0, split, 60.0 * k as f64);
            let adv = a.observe(60.0 * (k + 1) as f64, 150.0, &w).unwrap();
            assert!(!adv.why.contains("shifted"), "window {k}: {}", adv.why);
        }
        let long_in = mix("uniform:1500-2500", "uniform:4-16", 20);
        let w = window(&long_in, 0.5, split, 180.0);
        let first = a.observe(240.0, 150.0, &w).unwrap();
        assert!(first.why.contains("length mix shifted"), "{}", first.why);
        let Layout::Disaggregated { prefill, .. } = first.recommended else {
            panic!("{}", first.recommended)
        };
        assert!(prefill > 2, "{}: {}", first.recommended, first.why);
        assert_eq!(first.action, Action::Keep, "{}", first.why);
        let second = a
            .observe(300.0, 150.0, &window(&long_in, 0.5, split, 240.0))
            .unwrap();
        assert_eq!(second.action, Action::Suggest, "{}", second.why);
        assert!(!second.why.contains("shifted"), "{}", second.why);
    }

    #[test]
    fn a_stationary_load_on_the_best_split_changes_nothing_for_ten_windows() {
        // The split to start from: the best on a long sample of the mix (3,000 requests).
        let long = match mix("uniform:50-400", "uniform:16-96", 5) {
            Traffic::Generated {
                input,
                output,
                process,
                prefix_hit,
                seed,
                ..
            } => Traffic::Generated {
                input,
                output,
                process,
                prefix_hit,
                requests: 3000,
                seed,
            },
            t => t,
        };
        let base = ClusterConfig::defaults(Layout::Aggregated { workers: 1 });
        let best = crate::search::rank(&model(), &base, &long, &slo(), 4, 0.01).unwrap()[0].layout;
        let mut a = advisor(Mode::Auto, best);
        for k in 0..10 {
            let traffic = mix("uniform:50-400", "uniform:16-96", 100 + k);
            let w = window(&traffic, 2.0, best, 60.0 * k as f64);
            let adv = a.observe(60.0 * (k + 1) as f64, 150.0, &w).unwrap();
            assert_eq!(adv.action, Action::Keep, "window {k}: {}", adv.why);
        }
    }

    #[test]
    fn forecasts_follow_a_trend_and_bad_windows_are_named() {
        let mut f = Forecast::default();
        let mut last = 0.0;
        for x in [1.0, 2.0, 3.0, 4.0, 5.0] {
            last = f.add(x);
        }
        assert!(last > 5.0 && last < 6.5, "{last}");
        let mut a = advisor(Mode::Manual, Layout::Aggregated { workers: 4 });
        let field = |r: Result<Advice, PlanError>| match r {
            Err(PlanError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(a.observe(1.0, 60.0, &[])), "window");
        assert_eq!(field(a.observe(1.0, 0.0, &[])), "window_s");
        let cfg = AdvisorConfig::new(slo(), 0);
        assert!(matches!(
            Advisor::new(cfg, model(), ClusterConfig::defaults(Layout::Aggregated { workers: 1 }), Layout::Aggregated { workers: 1 }),
            Err(PlanError::Invalid { field, .. }) if field == "budget"
        ));
    }

    #[test]
    fn calibration_follows_slower_workers() {
        let chat = mix("uniform:50-400", "uniform:16-96", 8);
        let layout = Layout::Disaggregated {
            prefill: 1,
            decode: 3,
        };
        let mut w = window(&chat, 1.0, layout, 0.0);
        for f in &mut w {
            f.tpot *= 1.5;
        }
        let mut a = advisor(Mode::Manual, layout);
        let adv = a.observe(60.0, 300.0, &w).unwrap();
        // Solved: the factor behind the window, not a ratio of means.
        assert!(
            (1.47..=1.53).contains(&adv.calibration.1),
            "{:?}",
            adv.calibration
        );
        assert!(
            (0.97..=1.03).contains(&adv.calibration.0),
            "{:?}",
            adv.calibration
        );
        assert!(adv.confidence > 0.0 && adv.confidence < 1.0);
    }

    #[test]
    fn solved_calibration_finds_the_factors_of_a_loaded_window() {
        // Workers 30 % slower at prefill and 20 % faster at decode than the profile,
        // at a load that queues prompts: one step overshoots the prefill factor (the
        // queue grows faster than the service time); the solved factors are the truth.
        let chat = mix("uniform:200-600", "uniform:16-96", 5);
        let layout = Layout::Disaggregated {
            prefill: 1,
            decode: 1,
        };
        let cfg = ClusterConfig::defaults(layout);
        let truth = model().calibrated(1.3, 0.8);
        let reqs = chat.at_rate(0.6 / (1.3 * model().prefill_time(400)));
        let r = simulate(&truth, &cfg, &reqs).unwrap();
        let w: Vec<Finished> = reqs
            .iter()
            .zip(&r.requests)
            .map(|(q, o)| Finished::observed(q, o))
            .collect();
        let one = calibration(&model(), &cfg, &w).unwrap();
        let settled = calibration_solved(&model(), &cfg, &w).unwrap();
        assert!(one.0 > 1.33, "one step: {one:?}");
        assert!((settled.0 / 1.3 - 1.0).abs() < 0.02, "{settled:?}");
        assert!((settled.1 / 0.8 - 1.0).abs() < 0.02, "{settled:?}");
        // The clamp holds whatever the window says.
        let slow: Vec<Finished> = w
            .iter()
            .map(|f| Finished {
                ttft: f.ttft * 10.0,
                tpot: f.tpot * 10.0,
                ..*f
            })
            .collect();
        assert_eq!(calibration(&model(), &cfg, &slow).unwrap(), (2.0, 2.0));
        let c = calibration_solved(&model(), &cfg, &slow).unwrap();
        assert!(c.0 > 1.99 && c.1 > 1.99, "{c:?}");
        assert!(matches!(
            calibration_solved(&model(), &cfg, &[]),
            Err(PlanError::Invalid { field, .. }) if field == "window"
        ));
    }

    #[test]
    fn a_factor_is_solved_in_a_few_replays_and_kept_within_the_range() {
        use std::cell::Cell;
        let calls = Cell::new(0u32);
        // A mean that is not proportional to the factor (a queue's convex rise).
        let convex = |f: f64| {
            calls.set(calls.get() + 1);
            Ok(Some(0.2 + f * f * f))
        };
        let solve = |target: f64, start: f64| {
            calls.set(0);
            let f = solve_factor(Some(target), start, &convex).unwrap();
            (f, calls.get())
        };
        for (truth, start) in [(1.3, 1.0), (0.6, 1.9), (1.95, 0.5), (1.0001, 1.0)] {
            let (f, n) = solve(0.2 + truth * truth * truth, start);
            assert!(((0.2 + f * f * f) / (0.2 + truth.powi(3)) - 1.0).abs() <= CALIBRATION_MATCH);
            assert!(n <= 8, "{n} replays for {truth} from {start}");
        }
        // Met at the start: kept exactly, after one replay.
        assert_eq!(solve(0.2 + 1.5f64.powi(3), 1.5), (1.5, 1));
        // Beyond the range: its bound.
        assert_eq!(solve(100.0, 1.0).0, 2.0);
        assert_eq!(solve(0.01, 1.0).0, 0.5);
        // No target or no mean: the start.
        assert_eq!(solve_factor(None, 1.2, &convex).unwrap(), 1.2);
        assert_eq!(solve_factor(Some(1.0), 1.2, &|_| Ok(None)).unwrap(), 1.2);
    }

    #[test]
    fn only_allowed_shapes_are_recommended() {
        let l = Layout::Disaggregated {
            prefill: 1,
            decode: 3,
        };
        let agg = Layout::Aggregated { workers: 4 };
        assert!(Shapes::Any.allows(agg) && Shapes::Any.allows(l));
        assert!(Shapes::Disaggregated.allows(l) && !Shapes::Disaggregated.allows(agg));
        assert!(Shapes::Aggregated.allows(agg) && !Shapes::Aggregated.allows(l));
        // A single-mode cluster of 4 has one shape: it is kept, whatever the traffic.
        let mut cfg = AdvisorConfig::new(slo(), 4);
        cfg.shapes = Shapes::Aggregated;
        cfg.streak = 1;
        let mut a = Advisor::new(cfg, model(), ClusterConfig::defaults(agg), agg).unwrap();
        let traffic = Traffic::Generated {
            input: crate::workload::LengthDist::Fixed { n: 1500 },
            output: crate::workload::LengthDist::Fixed { n: 8 },
            process: Process::Poisson,
            prefix_hit: 0.0,
            requests: 200,
            seed: 3,
        };
        let advice = a
            .observe(60.0, 60.0, &window(&traffic, 3.0, agg, 0.0))
            .unwrap();
        assert_eq!((advice.recommended, advice.action), (agg, Action::Keep));
        assert_eq!(advice.curve.len(), 4, "the curve shows every split");
    }
}
