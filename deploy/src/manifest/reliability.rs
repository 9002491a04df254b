//! The manifest's reliability sections: per-role health probes (`probes`), the scope of
//! an automatic rebuild (`rebuild_scope`), graceful shutdown (`graceful_shutdown`, also
//! on the coordinator), the rolling-upgrade strategy (`upgrade`) and event retention
//! (`events`), with their defaults.
//!
//! Probe defaults follow the managed product's examples (startup 10/60/30/1800,
//! readiness 10/60/30/3, liveness 10/60/30/6 as delay/interval/timeout/threshold) scaled
//! for a 135M-parameter model that loads in about a second, so a cluster still starts
//! in seconds:
//!
//! | probe | delay_s | interval_s | timeout_s | failure_threshold | gives up after |
//! |---|---|---|---|---|---|
//! | startup | 1 | 1 | 5 | 300 | about 5 min without passing |
//! | readiness | 1 | 2 | 2 | 3 | 3 failures in a row (≈ 6 s) |
//! | liveness | 1 | 5 | 5 | 3 | 3 failures in a row (≈ 15 s) |

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::time::Duration;

/// Largest probe time or threshold (the managed product's bound, `i32::MAX`).
pub const PROBE_MAX: u64 = 2_147_483_647;

/// Which of a role's three probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// Passes once the worker has started; gates the other two.
    Startup,
    /// Failing takes the worker out of routing; passing puts it back.
    Readiness,
    /// Failing rebuilds the worker.
    Liveness,
}

impl ProbeKind {
    /// All three, in the order they take effect.
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Startup,
        ProbeKind::Readiness,
        ProbeKind::Liveness,
    ];

    /// The YAML key: `startup`, `readiness` or `liveness`.
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        }
    }

    /// `(delay_s, interval_s, timeout_s, failure_threshold)` when the manifest is silent.
    pub fn defaults(self) -> (u64, u64, u64, u64) {
        match self {
            ProbeKind::Startup => (1, 1, 5, 300),
            ProbeKind::Readiness => (1, 2, 2, 3),
            ProbeKind::Liveness => (1, 5, 5, 3),
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One probe as written in the manifest; absent fields take [`ProbeKind::defaults`].
/// Either `http_path` (an HTTP GET on the worker's HTTP port; 200–399 passes; the
/// default, with `/health`) or `command` (passes on exit status 0), not both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// Path of the HTTP GET, `^/[a-zA-Z0-9-_/]{0,1024}$` (default `/health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// A command instead of the HTTP GET: a string (run with `sh -c`) or a list
    /// (`[prog, arg, …]`, run directly). `{worker_id}`, `{role}`, `{index}`, `{pid}` and
    /// `{http}` (the worker's HTTP URL) are replaced in it.
    #[serde(
        default,
        deserialize_with = "de_command",
        skip_serializing_if = "Option::is_none"
    )]
    pub command: Option<Vec<String>>,
    /// Seconds after the process starts before the first probe, `1..=2147483647`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_s: Option<u64>,
    /// Seconds between probes, `1..=2147483647`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    /// Seconds one probe may take before it counts as failed, `1..=2147483647`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Failures in a row that make the probe fail, `1..=2147483647`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u64>,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// GET this path on the worker's HTTP port; 200–399 passes.
    HttpGet(String),
    /// Run this command (`argv`); exit status 0 passes.
    Command(Vec<String>),
}

/// A probe with every default applied (what the supervisor runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// HTTP GET or command.
    pub action: ProbeAction,
    /// Before the first probe, from the process start.
    pub delay: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Bound of one probe.
    pub timeout: Duration,
    /// Failures in a row that fail the probe.
    pub failure_threshold: u32,
}

impl ProbeSpec {
    /// This probe with the defaults of `kind` filled in (validated manifests only:
    /// values were checked against [`PROBE_MAX`]).
    pub fn resolve(&self, kind: ProbeKind) -> Probe {
        let (d, i, t, f) = kind.defaults();
        let action = match (&self.command, &self.http_path) {
            (Some(c), _) => ProbeAction::Command(c.clone()),
            (None, Some(p)) => ProbeAction::HttpGet(p.clone()),
            (None, None) => ProbeAction::HttpGet("/health".into()),
        };
        Probe {
            action,
            delay: Duration::from_secs(self.delay_s.unwrap_or(d)),
            interval: Duration::from_secs(self.interval_s.unwrap_or(i)),
            timeout: Duration::from_secs(self.timeout_s.unwrap_or(t)),
            failure_threshold: self.failure_threshold.unwrap_or(f).min(PROBE_MAX) as u32,
        }
    }
}

/// A role's three probes (each optional; absent = all defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesSpec {
    /// Gates the others; failing it rebuilds the worker.
    pub startup: ProbeSpec,
    /// Failing it takes the worker out of routing until it passes again.
    pub readiness: ProbeSpec,
    /// Failing it rebuilds the worker (with the role's `rebuild_scope`).
    pub liveness: ProbeSpec,
}

impl ProbesSpec {
    /// The probe of `kind`.
    pub fn get(&self, kind: ProbeKind) -> &ProbeSpec {
        match kind {
            ProbeKind::Startup => &self.startup,
            ProbeKind::Readiness => &self.readiness,
            ProbeKind::Liveness => &self.liveness,
        }
    }
}

/// Which workers a failed worker's rebuild restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildScope {
    /// The failed worker only (default).
    #[default]
    Process,
    /// The failed worker's unit replica: the workers of every role with its replica
    /// index (`prefill-1` and `decode-1` form unit replica 1).
    UnitReplica,
    /// Every worker of the failed worker's role.
    Unit,
    /// Every worker of the deployment (all roles; the coordinator, the service's
    /// endpoint, keeps running).
    DeploymentReplica,
}

impl RebuildScope {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            RebuildScope::Process => "process",
            RebuildScope::UnitReplica => "unit_replica",
            RebuildScope::Unit => "unit",
            RebuildScope::DeploymentReplica => "deployment_replica",
        }
    }
}

/// How a process is stopped (on `xpyd down`, scale-down, upgrade, a rebuild or Ctrl-C):
/// `shutdown_command` first (if any), then SIGTERM; the process drains; SIGKILL when the
/// whole stop has taken `timeout_s`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GracefulShutdown {
    /// Seconds from the start of the stop to SIGKILL, `1..=3600` (default 30; 60–300 is
    /// typical for LLMs with long answers).
    pub timeout_s: u64,
    /// Run before SIGTERM (a pre-stop hook), within `timeout_s`: a string (`sh -c`) or a
    /// list; the same `{…}` placeholders as probe commands.
    #[serde(
        deserialize_with = "de_command",
        skip_serializing_if = "Option::is_none"
    )]
    pub shutdown_command: Option<Vec<String>>,
}

impl Default for GracefulShutdown {
    fn default() -> Self {
        GracefulShutdown {
            timeout_s: 30,
            shutdown_command: None,
        }
    }
}

impl GracefulShutdown {
    /// `timeout_s` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }
}

/// Named rolling-upgrade strategies: (max surge %, max unavailable %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradePreset {
    /// 1 % / 1 %: one extra worker at a time, none taken away before its replacement is
    /// ready (with fewer than 100 replicas). The default.
    ZeroDisruption,
    /// 25 % / 25 %.
    Fast,
    /// 10 % / 10 %.
    Gray,
    /// 100 % / 100 %: everything at once.
    Emergency,
}

impl UpgradePreset {
    /// (max surge %, max unavailable %).
    pub fn percents(self) -> (u32, u32) {
        match self {
            UpgradePreset::ZeroDisruption => (1, 1),
            UpgradePreset::Fast => (25, 25),
            UpgradePreset::Gray => (10, 10),
            UpgradePreset::Emergency => (100, 100),
        }
    }
}

/// Rolling upgrade (`xpyd upgrade`): a preset, or the two percentages (of a role's
/// replicas; surge rounded up, unavailable rounded down), not both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeSpec {
    /// `zero_disruption` (default), `fast`, `gray` or `emergency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<UpgradePreset>,
    /// New workers started beyond `replicas` during an upgrade, `0..=100` % (rounded up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_surge_percent: Option<u32>,
    /// Workers that may be unavailable during an upgrade (and while workers restart
    /// without the service counting as degraded), `0..=100` % (rounded down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unavailable_percent: Option<u32>,
    /// Seconds a role's rollout may go without progress (no new worker ready, no role
    /// done) before the upgrade counts as failed and rolls back, `10..=3600` (default
    /// 600, as Kubernetes' `progressDeadlineSeconds`): a new version that starts but
    /// never becomes ready cannot hold the cluster in an upgrade forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_deadline_s: Option<u64>,
}

impl UpgradeSpec {
    /// [`UpgradeSpec::progress_deadline_s`] after its default.
    pub fn progress_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.progress_deadline_s.unwrap_or(600))
    }

    /// (max surge %, max unavailable %) after the preset and defaults.
    pub fn percents(&self) -> (u32, u32) {
        let (s, u) = self
            .preset
            .unwrap_or(UpgradePreset::ZeroDisruption)
            .percents();
        (
            self.max_surge_percent.unwrap_or(s),
            self.max_unavailable_percent.unwrap_or(u),
        )
    }
}

/// How long the coordinator keeps the cluster's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSpec {
    /// Seconds an event is kept, `60..=31536000` (default 2592000 = 30 days).
    pub retention_s: u64,
    /// Most events kept (oldest dropped first), `100..=1000000` (default 10000).
    pub max_events: u32,
}

impl Default for EventsSpec {
    fn default() -> Self {
        EventsSpec {
            retention_s: 30 * 24 * 3600,
            max_events: 10_000,
        }
    }
}

/// Accepts `command: "test -e /tmp/ok"` (run with `sh -c`) or `command: [prog, arg]`.
fn de_command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a command: a string (run with sh -c) or a list of strings")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(vec!["sh".into(), "-c".into(), v.to_owned()]))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(s) = a.next_element::<String>()? {
                v.push(s);
            }
            Ok(Some(v))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// The ratio advisor (`/v1/advisor`): monitoring, objectives, the budget it splits and
/// how it acts. Everything here can also be changed at run time through
/// `PUT /v1/advisor/config` (except `profile`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvisorSpec {
    /// Monitoring on: the advisor observes every window (default false).
    pub enabled: bool,
    /// Window length, seconds, `5..=3600` (default 60).
    pub window_s: u64,
    /// Objectives.
    pub slo: AdvisorSlo,
    /// Workers to split, `1..=1024`; absent = the workers the cluster runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<u32>,
    /// `manual` (suggest; an operator applies) or `auto` (apply outside the cool-down).
    pub mode: AdvisorMode,
    /// Smallest relative goodput gain worth a change, `0..=10` (default 0.1).
    pub min_gain: f64,
    /// Windows in a row a better split must win before it is suggested, `1..=100`
    /// (default 2).
    pub streak: u32,
    /// Seconds after a change during which nothing is applied (default 600).
    pub cooldown_s: f64,
    /// Windows whose requests the ranking uses, `1..=60` (default 3).
    pub history: u32,
    /// Performance profile (JSON from `xpyd bench profile`), relative to the manifest;
    /// absent = the profile cached for this model and machine, if one was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<std::path::PathBuf>,
}

/// The advisor's objectives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvisorSlo {
    /// Time to first token, ms (default 2000).
    pub ttft_ms: f64,
    /// Time per output token, ms (default 100).
    pub tpot_ms: f64,
    /// Share of requests that must meet both, `(0, 1]` (default 0.9).
    pub attainment: f64,
}

impl Default for AdvisorSlo {
    fn default() -> Self {
        AdvisorSlo {
            ttft_ms: 2000.0,
            tpot_ms: 100.0,
            attainment: 0.9,
        }
    }
}

/// How the advisor acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvisorMode {
    /// Suggest only.
    #[default]
    Manual,
    /// Apply on its own.
    Auto,
}

impl Default for AdvisorSpec {
    fn default() -> Self {
        AdvisorSpec {
            enabled: false,
            window_s: 60,
            slo: AdvisorSlo::default(),
            budget: None,
            mode: AdvisorMode::Manual,
            min_gain: 0.1,
            streak: 2,
            cooldown_s: 600.0,
            history: 3,
            profile: None,
        }
    }
}

impl AdvisorSpec {
    /// The planner's settings (the budget filled in later when absent).
    pub fn planner_config(&self) -> xpyd_planner::advisor::AdvisorConfig {
        let mut c = xpyd_planner::advisor::AdvisorConfig::new(
            xpyd_planner::search::Slo {
                ttft_s: self.slo.ttft_ms / 1e3,
                tpot_s: self.slo.tpot_ms / 1e3,
                attainment: self.slo.attainment,
            },
            self.budget.unwrap_or(1),
        );
        c.mode = match self.mode {
            AdvisorMode::Manual => xpyd_planner::advisor::Mode::Manual,
            AdvisorMode::Auto => xpyd_planner::advisor::Mode::Auto,
        };
        c.min_gain = self.min_gain;
        c.streak = self.streak;
        c.cooldown_s = self.cooldown_s;
        c.history = self.history;
        c
    }
}
