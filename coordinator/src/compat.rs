//! The managed product's metric names, beside xpyd's own, so dashboards and alerts built
//! for it work unchanged: every `infer_service_*` series carries `service_name`,
//! `group_id` and `instance_name`. Latencies are in milliseconds ("cost"), recorded
//! from the same measurements as the `xpyd_coordinator_*` histograms (in seconds), so
//! the two agree; the `*_{avg,min,max}_cost` gauges cover the requests served in the
//! last [`WINDOW`], refreshed when `/metrics` is rendered.

use metrics::Label;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use xpyd_runtime::metrics as m;

/// What the min/avg/max gauges look back over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most requests the window keeps (the gauges then cover the newest ones).
const KEPT: usize = 100_000;

/// The three labels every series carries.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The service (the cluster's name).
    pub service_name: String,
    /// The deployment group the service belongs to.
    pub group_id: String,
    /// This coordinator instance (host:port of its HTTP listener).
    pub instance_name: String,
}

/// One served request's latencies, ms.
#[derive(Debug, Clone, Copy)]
struct Served {
    at: Instant,
    first_token: f64,
    per_token: Option<f64>,
    token_latency: f64,
}

/// The compatible metrics of one coordinator.
#[derive(Debug)]
pub struct Compat {
    labels: Vec<Label>,
    window: Mutex<VecDeque<Served>>,
}

impl Compat {
    /// Metrics labelled with `id`.
    pub fn new(id: &Identity) -> Self {
        Compat {
            labels: vec![
                Label::new("service_name", id.service_name.clone()),
                Label::new("group_id", id.group_id.clone()),
                Label::new("instance_name", id.instance_name.clone()),
            ],
            window: Mutex::new(VecDeque::new()),
        }
    }

    fn with(&self, more: &[(&'static str, String)]) -> Vec<Label> {
        let mut l = self.labels.clone();
        l.extend(more.iter().map(|(k, v)| Label::new(*k, v.clone())));
        l
    }

    /// One call answered: `infer_service_request_total{code, method, path}`.
    pub fn request(&self, code: u16, method: &str, path: &str) {
        let labels = self.with(&[
            ("code", code.to_string()),
            ("method", method.to_string()),
            ("path", path.to_string()),
        ]);
        metrics::counter!(m::INFER_REQUEST_TOTAL, labels).increment(1);
    }

    /// Requests being served now (`infer_service_request_connect_count`).
    pub fn connections(&self, delta: f64) {
        metrics::gauge!(m::INFER_REQUEST_CONNECT_COUNT, self.labels.clone()).increment(delta);
    }

    /// A request's first token, `secs` after it arrived (recorded where
    /// `xpyd_coordinator_ttft_seconds` is: a request that fails later counts too).
    pub fn first_token(&self, secs: f64) {
        metrics::histogram!(m::INFER_FIRST_TOKEN_COST, self.labels.clone()).record(secs * 1e3);
    }

    /// One request served: end to end, to its first token, and between the first and
    /// the last (`None` with one token), all in seconds; its token counts.
    pub fn served(&self, e2e: f64, first: f64, per_token: Option<f64>, input: u32, output: u32) {
        let l = || self.labels.clone();
        metrics::histogram!(m::INFER_REQUEST_COST, l()).record(e2e * 1e3);
        if let Some(t) = per_token {
            metrics::histogram!(m::INFER_PER_TOKEN_COST, l()).record(t * 1e3);
        }
        metrics::histogram!(m::INFER_INPUT_TOKEN_QUANTITY, l()).record(f64::from(input));
        metrics::histogram!(m::INFER_OUTPUT_TOKEN_QUANTITY, l()).record(f64::from(output));
        metrics::counter!(m::INFER_TOKEN_COUNT, l()).increment(u64::from(output));
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() == KEPT {
            w.pop_front();
        }
        w.push_back(Served {
            at: Instant::now(),
            first_token: first * 1e3,
            per_token: per_token.map(|t| t * 1e3),
            token_latency: e2e * 1e3 / f64::from(output.max(1)),
        });
    }

    /// Sets the min/avg/max gauges from the requests served in the last [`WINDOW`]
    /// (0 when there were none).
    pub fn refresh(&self) {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        while w.front().is_some_and(|s| now.duration_since(s.at) > WINDOW) {
            w.pop_front();
        }
        let first: Vec<f64> = w.iter().map(|s| s.first_token).collect();
        let per: Vec<f64> = w.iter().filter_map(|s| s.per_token).collect();
        let lat: Vec<f64> = w.iter().map(|s| s.token_latency).collect();
        drop(w);
        for (xs, [avg, min, max]) in [
            (first, m::INFER_FIRST_TOKEN_AMM),
            (per, m::INFER_PER_TOKEN_AMM),
            (lat, m::INFER_TOKEN_LATENCY_AMM),
        ] {
            let (a, lo, hi) = avg_min_max(&xs);
            metrics::gauge!(avg, self.labels.clone()).set(a);
            metrics::gauge!(min, self.labels.clone()).set(lo);
            metrics::gauge!(max, self.labels.clone()).set(hi);
        }
    }
}

/// Mean, minimum and maximum (all 0 for no values).
pub fn avg_min_max(xs: &[f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let sum: f64 = xs.iter().sum();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (sum / xs.len() as f64, lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_avg_max_of_nothing_is_zero() {
        assert_eq!(avg_min_max(&[]), (0.0, 0.0, 0.0));
        assert_eq!(avg_min_max(&[3.0, 1.0, 8.0]), (4.0, 1.0, 8.0));
    }
}
