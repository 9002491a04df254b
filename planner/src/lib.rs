//! The ratio advisor's core, pure and synchronous (no I/O, no clock: the caller passes
//! time; every random draw comes from a seed):
//!
//! - [`service`] — how long prefill chunks, decode steps, mixed iterations and KV
//!   transfers take, from a performance profile's fits ([`profile`] reads the JSON
//!   `xpyd bench profile` writes, with the `serde` feature);
//! - [`workload`] — length distributions and seeded request plans (shared with the load
//!   generator), and [`traffic`]: arrival processes (Poisson, gamma with a coefficient
//!   of variation, a recorded trace) turned into simulated requests with common random
//!   numbers across rates;
//! - [`sim`] — a discrete-event simulator of the cluster modes the product runs —
//!   disaggregated xPyD and aggregated (combined workers) — with the coordinator's
//!   admission queue and routing;
//! - [`queueing`] — closed forms (M/M/c, M/D/1) and the analytic capacity bound the
//!   search prunes with;
//! - [`search`] — goodput (the highest rate at which ≥ 90 % of requests meet both SLOs)
//!   and the ranking of every split of a budget;
//! - [`advisor`] — from a window of finished requests: calibration, a rate forecast, the
//!   best split and whether to keep, suggest or apply it (hysteresis and cool-down).

pub mod advisor;
pub mod queueing;
pub mod search;
pub mod service;
pub mod sim;
pub mod traffic;
pub mod workload;

#[cfg(feature = "serde")]
pub mod profile;

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// An input is out of range or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field (dotted path where nested).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The SLOs cannot be met even with no load: the fastest possible request misses.
    #[error("the SLO cannot be met even at zero load: {0}")]
    Infeasible(String),
}

impl PlanError {
    /// An invalid `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        PlanError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// JSON has no NaN: `serde_json` writes it as `null`; this reads `null` back as NaN.
#[cfg(feature = "serde")]
fn nan_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
