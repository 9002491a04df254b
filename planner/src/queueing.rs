//! Closed forms of queueing theory — to check the simulator against (M/M/c, M/D/1) —
//! and the analytic capacity bound of a layout, which the search uses to prune splits
//! that cannot beat the best one found so far.

use crate::service::ServiceModel;
use crate::sim::{ClusterConfig, Layout};
use crate::traffic::SimRequest;

/// Erlang C: the probability that an arrival waits in an M/M/c queue with offered load
/// `a = λ/μ` (< c).
pub fn erlang_c(c: u32, a: f64) -> f64 {
    // Erlang B by its stable recursion, then C from B.
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (f64::from(k) + a * b);
    }
    let rho = a / f64::from(c);
    b / (1.0 - rho + rho * b)
}

/// Mean wait in queue of M/M/c with arrival rate `lambda` and service rate `mu` per
/// server (stable: λ < cμ).
pub fn mmc_wait(c: u32, lambda: f64, mu: f64) -> f64 {
    erlang_c(c, lambda / mu) / (f64::from(c) * mu - lambda)
}

/// Mean wait in queue of M/D/1 with arrival rate `lambda` and fixed service time `d`
/// (Pollaczek–Khinchine; stable: λd < 1).
pub fn md1_wait(lambda: f64, d: f64) -> f64 {
    let rho = lambda * d;
    rho * d / (2.0 * (1.0 - rho))
}

/// What one worker of each kind can sustain at best on `reqs`' mix (requests/s): the
/// capacity bound the search prunes with. Decode runs at its largest batch (slots, or
/// what the KV blocks hold), which gives the most tokens per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// Requests/s of one prefill worker.
    pub prefill: f64,
    /// Requests/s of one decode worker.
    pub decode: f64,
    /// Requests/s of one combined worker.
    pub combined: f64,
}

impl Capacity {
    /// Per-worker capacities for this mix (`reqs` non-empty).
    pub fn of(m: &ServiceModel, c: &ClusterConfig, reqs: &[SimRequest]) -> Capacity {
        let n = reqs.len().max(1) as f64;
        let prefill = reqs
            .iter()
            .map(|r| m.prefill_time(r.input - r.cached))
            .sum::<f64>()
            / n;
        let steps = reqs
            .iter()
            .map(|r| f64::from(r.output.saturating_sub(1)))
            .sum::<f64>()
            / n;
        let blocks = reqs
            .iter()
            .map(|r| f64::from((r.input + r.output).div_ceil(c.block_size)))
            .sum::<f64>()
            / n;
        let ctx = reqs
            .iter()
            .map(|r| f64::from(r.input) + f64::from(r.output) / 2.0)
            .sum::<f64>()
            / n;
        let batch = f64::from(c.max_running)
            .min((f64::from(c.kv_blocks) / blocks).floor())
            .max(1.0);
        // Seconds of decode-step time one request costs at that batch.
        let per_req_decode = steps * m.decode_step(batch as u32, batch * ctx) / batch;
        Capacity {
            prefill: 1.0 / prefill,
            decode: if per_req_decode > 0.0 {
                1.0 / per_req_decode
            } else {
                f64::INFINITY
            },
            combined: 1.0 / (prefill + per_req_decode),
        }
    }

    /// The most requests/s `layout` can sustain.
    pub fn bound(&self, layout: Layout) -> f64 {
        match layout {
            Layout::Disaggregated { prefill, decode } => {
                (f64::from(prefill) * self.prefill).min(f64::from(decode) * self.decode)
            }
            Layout::Aggregated { workers } => f64::from(workers) * self.combined,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_match_known_values() {
        // M/M/1: Wq = ρ/(μ − λ).
        assert!((mmc_wait(1, 0.5, 1.0) - 1.0).abs() < 1e-12);
        // Erlang C, c = 2, a = 1: 1/3.
        assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        // M/D/1 waits half as long as M/M/1 at the same load.
        assert!((md1_wait(0.5, 1.0) - 0.5).abs() < 1e-12);
    }
}
