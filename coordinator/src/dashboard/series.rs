//! The dashboard's time series: one [`Sample`] a second, an hour of them kept in
//! memory. [`sample`] is pure: the coordinator's finished requests of the last
//! [`WINDOW_S`] seconds, its workers' reported load, its queue and the KV bytes moved
//! so far in, one point out.

use crate::cluster::WorkerView;
use serde::Serialize;
use std::collections::VecDeque;
use xpyd_planner::advisor::Finished;
use xpyd_planner::search::Percentiles;

/// Seconds of finished requests each point summarises (rates are per second over it).
pub const WINDOW_S: f64 = 10.0;
/// Points kept: an hour at one a second.
pub const KEPT: usize = 3600;

/// Per role: prefill, decode, combined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PerRole {
    /// Prefill workers' sum.
    pub prefill: f64,
    /// Decode workers' sum.
    pub decode: f64,
    /// Combined (single-mode) workers' sum.
    pub combined: f64,
}

impl PerRole {
    fn add(&mut self, role: &str, x: f64) {
        match role {
            "prefill" => self.prefill += x,
            "decode" => self.decode += x,
            "combined" => self.combined += x,
            _ => {}
        }
    }
}

/// p50 / p90 / p99 in milliseconds (`null` without requests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Pcts {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

impl Pcts {
    fn of_seconds(xs: impl Iterator<Item = f64>) -> Pcts {
        let p = Percentiles::of(xs);
        let ms = |x: f64| (!x.is_nan()).then_some(x * 1e3);
        Pcts {
            p50: ms(p.p50),
            p90: ms(p.p90),
            p99: ms(p.p99),
        }
    }
}

/// One point of every chart.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Unix milliseconds.
    pub t_ms: u64,
    /// Requests finished per second (served or failed).
    pub qps: f64,
    /// Of those, failed per second.
    pub failed_qps: f64,
    /// Time to first token.
    pub ttft_ms: Pcts,
    /// Time per output token.
    pub tpot_ms: Pcts,
    /// Output tokens per second.
    pub output_tps: f64,
    /// Prompt tokens per second.
    pub input_tps: f64,
    /// Share of prompt tokens served from the prefix cache (`null` without requests).
    pub prefix_hit: Option<f64>,
    /// KV moved from prefill to decode workers, GB/s (10^9 bytes).
    pub kv_gbps: f64,
    /// Requests waiting in the coordinator's admission queue.
    pub coordinator_queue: f64,
    /// Requests waiting on workers, per role.
    pub queue: PerRole,
    /// Requests running on workers, per role.
    pub running: PerRole,
    /// KV blocks in use, per role.
    pub kv_used: PerRole,
    /// KV blocks in all, per role.
    pub kv_total: PerRole,
    /// Ready workers, per role.
    pub ready: PerRole,
}

/// What [`sample`] reads.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Now, Unix milliseconds.
    pub t_ms: u64,
    /// Requests finished in the last [`WINDOW_S`] seconds.
    pub finished: &'a [Finished],
    /// The workers as the coordinator sees them.
    pub workers: &'a [WorkerView],
    /// The admission queue's length.
    pub coordinator_queue: usize,
    /// KV bytes moved between the legs in the last [`WINDOW_S`] seconds.
    pub kv_bytes: u64,
}

/// One point from `i`.
pub fn sample(i: &Inputs<'_>) -> Sample {
    let n = i.finished.len() as f64;
    let failed = i.finished.iter().filter(|f| f.ttft.is_nan()).count() as f64;
    let (input, cached, output) = i.finished.iter().fold((0u64, 0u64, 0u64), |a, f| {
        (
            a.0 + u64::from(f.input),
            a.1 + u64::from(f.cached),
            a.2 + u64::from(f.output),
        )
    });
    let mut s = Sample {
        t_ms: i.t_ms,
        qps: n / WINDOW_S,
        failed_qps: failed / WINDOW_S,
        ttft_ms: Pcts::of_seconds(i.finished.iter().map(|f| f.ttft)),
        tpot_ms: Pcts::of_seconds(i.finished.iter().map(|f| f.tpot)),
        output_tps: output as f64 / WINDOW_S,
        input_tps: input as f64 / WINDOW_S,
        prefix_hit: (input > 0).then(|| cached as f64 / input as f64),
        kv_gbps: i.kv_bytes as f64 / WINDOW_S / 1e9,
        coordinator_queue: i.coordinator_queue as f64,
        ..Sample::default()
    };
    for w in i.workers.iter().filter(|w| w.state != "down") {
        s.queue.add(&w.role, f64::from(w.queued));
        s.running.add(&w.role, f64::from(w.running));
        s.kv_used.add(&w.role, f64::from(w.kv_blocks_used));
        s.kv_total.add(
            &w.role,
            f64::from(w.kv_blocks_used) + f64::from(w.kv_blocks_free),
        );
        if w.state == "ready" {
            s.ready.add(&w.role, 1.0);
        }
    }
    s
}

/// The kept points, oldest first.
#[derive(Debug, Default)]
pub struct Series {
    points: VecDeque<Sample>,
}

impl Series {
    /// Adds a point, dropping the oldest beyond [`KEPT`].
    pub fn push(&mut self, s: Sample) {
        if self.points.len() == KEPT {
            self.points.pop_front();
        }
        self.points.push_back(s);
    }

    /// The points of the last `range_ms` before `now_ms`, at most `max` of them (every
    /// k-th, newest kept, when there are more).
    pub fn range(&self, now_ms: u64, range_ms: u64, max: usize) -> Vec<Sample> {
        let from = now_ms.saturating_sub(range_ms);
        let v: Vec<&Sample> = self.points.iter().filter(|s| s.t_ms >= from).collect();
        let step = v.len().div_ceil(max.max(1)).max(1);
        let last = v.len().saturating_sub(1);
        v.iter()
            .enumerate()
            .filter(|(k, _)| (last - k).is_multiple_of(step))
            .map(|(_, s)| (*s).clone())
            .collect()
    }

    /// The newest point.
    pub fn last(&self) -> Option<&Sample> {
        self.points.back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(input: u32, cached: u32, output: u32, ttft: f64, tpot: f64) -> Finished {
        Finished {
            arrival: 0.0,
            input,
            cached,
            output,
            ttft,
            tpot,
        }
    }

    fn worker(role: &str, state: &'static str, q: u32, used: u32, free: u32) -> WorkerView {
        WorkerView {
            worker_id: format!("{role}-0"),
            role: role.into(),
            grpc_url: String::new(),
            http_url: String::new(),
            state,
            inflight: 0,
            routed: 0,
            queued: q,
            running: 1,
            kv_blocks_used: used,
            kv_blocks_free: free,
            ttft_ms: 0.0,
            tpot_ms: 0.0,
            up_s: 0,
        }
    }

    #[test]
    fn a_point_sums_roles_and_rates_over_the_window() {
        let finished = [
            fin(100, 50, 10, 0.2, 0.02),
            fin(300, 0, 30, 0.4, 0.04),
            fin(100, 0, 0, f64::NAN, f64::NAN),
        ];
        let workers = [
            worker("prefill", "ready", 3, 0, 0),
            worker("decode", "ready", 1, 40, 60),
            worker("decode", "draining", 2, 10, 90),
            worker("decode", "down", 9, 99, 1),
        ];
        let s = sample(&Inputs {
            t_ms: 7,
            finished: &finished,
            workers: &workers,
            coordinator_queue: 4,
            kv_bytes: 20_000_000_000,
        });
        assert_eq!(s.t_ms, 7);
        assert!((s.qps - 0.3).abs() < 1e-12 && (s.failed_qps - 0.1).abs() < 1e-12);
        assert_eq!((s.ttft_ms.p50, s.ttft_ms.p99), (Some(200.0), Some(400.0)));
        assert_eq!(s.tpot_ms.p90, Some(40.0));
        assert!((s.output_tps - 4.0).abs() < 1e-12 && (s.input_tps - 50.0).abs() < 1e-12);
        assert_eq!(s.prefix_hit, Some(0.1));
        assert!((s.kv_gbps - 2.0).abs() < 1e-12);
        assert_eq!(s.coordinator_queue, 4.0);
        // The down worker counts nowhere; the draining one is load but not ready.
        assert_eq!((s.queue.prefill, s.queue.decode), (3.0, 3.0));
        assert_eq!((s.kv_used.decode, s.kv_total.decode), (50.0, 200.0));
        assert_eq!((s.ready.prefill, s.ready.decode), (1.0, 1.0));
        let idle = sample(&Inputs {
            t_ms: 8,
            finished: &[],
            workers: &[],
            coordinator_queue: 0,
            kv_bytes: 0,
        });
        assert_eq!(
            (idle.qps, idle.prefix_hit, idle.ttft_ms.p50),
            (0.0, None, None)
        );
    }

    #[test]
    fn the_series_keeps_an_hour_and_thins_long_ranges() {
        let mut s = Series::default();
        for t in 0..(KEPT as u64 + 10) {
            s.push(Sample {
                t_ms: t * 1000,
                ..Sample::default()
            });
        }
        let now = (KEPT as u64 + 9) * 1000;
        assert_eq!(s.range(now, 3_600_000, 10_000).len(), KEPT);
        assert_eq!(s.range(now, 60_000, 10_000).len(), 61);
        let thin = s.range(now, 3_600_000, 600);
        assert!(thin.len() <= 600 && thin.len() >= 590, "{}", thin.len());
        assert_eq!(thin.last().unwrap().t_ms, now, "the newest point is kept");
        assert_eq!(s.last().unwrap().t_ms, now);
    }
}
