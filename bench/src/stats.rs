//! Statistics over per-request records: percentiles, latency summaries, SLO attainment,
//! and the goodput search (the highest request rate that still meets an SLO target).

use serde::{Deserialize, Serialize};

/// One request as the load generator saw it. Times in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// Offset from the run start when the request was sent.
    pub sent_at: f64,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Output tokens received.
    pub output_tokens: usize,
    /// Time to first token; `None` if no token came.
    pub ttft: Option<f64>,
    /// Every inter-token gap after the first token, in order (zero for tokens that
    /// arrived in the same message).
    pub gaps: Vec<f64>,
    /// Send to last byte.
    pub e2e: f64,
    /// `None` on success, else what went wrong.
    pub error: Option<String>,
}

impl RequestRecord {
    /// Whether the request succeeded.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token: the mean gap, `None` without gaps (0 or 1 tokens).
    pub fn tpot(&self) -> Option<f64> {
        (!self.gaps.is_empty()).then(|| self.gaps.iter().sum::<f64>() / self.gaps.len() as f64)
    }

    /// Whether the request succeeded within `slo`: a first token within `slo.ttft` and,
    /// if it has a TPOT, one within `slo.tpot`. A success without any token is a miss.
    pub fn meets(&self, slo: &Slo) -> bool {
        self.ok()
            && self.ttft.is_some_and(|t| t <= slo.ttft)
            && self.tpot().is_none_or(|t| t <= slo.tpot)
    }
}

/// A latency service-level objective, in seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Slo {
    /// Bound on time to first token.
    pub ttft: f64,
    /// Bound on time per output token.
    pub tpot: f64,
}

/// Summary of a distribution. Fields of an empty one are NaN; non-finite fields
/// serialize as `null` and `null` deserializes as NaN. `Dist::default()` is the empty
/// summary (so, NaN fields being unequal to themselves, it is not `==` to itself).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    /// Number of values.
    pub n: usize,
    /// Arithmetic mean.
    #[serde(with = "crate::nullable")]
    pub mean: f64,
    /// Median.
    #[serde(with = "crate::nullable")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(with = "crate::nullable")]
    pub p90: f64,
    /// 99th percentile.
    #[serde(with = "crate::nullable")]
    pub p99: f64,
    /// Largest value.
    #[serde(with = "crate::nullable")]
    pub max: f64,
}

impl Default for Dist {
    fn default() -> Self {
        Self {
            n: 0,
            mean: f64::NAN,
            p50: f64::NAN,
            p90: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
        }
    }
}

/// The `q` quantile (`q` clamped to [0, 1]) of ascending `sorted`, interpolating linearly
/// between the closest ranks (numpy's default). NaN for an empty slice or a NaN `q`.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let frac = h - lo as f64;
    let a = sorted[lo];
    if frac == 0.0 {
        return a;
    }
    let b = sorted[lo + 1];
    // The clamp keeps rounding from stepping past the upper rank, so the result stays
    // monotone in `q`.
    (a + frac * (b - a)).clamp(a, b)
}

/// Summarizes `values`, ignoring NaN.
pub fn dist(values: &[f64]) -> Dist {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return Dist::default();
    }
    v.sort_by(f64::total_cmp);
    Dist {
        n: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: percentile(&v, 0.5),
        p90: percentile(&v, 0.9),
        p99: percentile(&v, 0.99),
        max: v[v.len() - 1],
    }
}

/// Share of `records` meeting `slo` (errors count as misses); 0 when empty.
pub fn attainment(records: &[RequestRecord], slo: &Slo) -> f64 {
    if records.is_empty() {
        return 0.0;
    }
    records.iter().filter(|r| r.meets(slo)).count() as f64 / records.len() as f64
}

/// What a run measured. Latency distributions cover successful requests only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Length of the run in seconds (non-finite serializes as `null`).
    #[serde(with = "crate::nullable")]
    pub duration: f64,
    /// Successful requests per second (0 unless `duration` is positive).
    pub request_rate: f64,
    /// Output tokens of successful requests per second (0 unless `duration` is positive).
    pub output_token_rate: f64,
    /// Time to first token.
    pub ttft: Dist,
    /// Time per output token, one value per request.
    pub tpot: Dist,
    /// Inter-token latency: every gap of every request, pooled.
    pub itl: Dist,
    /// Send to last byte.
    pub e2e: Dist,
}

/// Summarizes a run of `duration` seconds.
pub fn summarize(records: &[RequestRecord], duration: f64) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let per_second = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let output_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let gaps: Vec<f64> = ok.iter().flat_map(|r| r.gaps.iter().copied()).collect();
    Summary {
        requests: records.len(),
        errors: records.len() - ok.len(),
        duration,
        request_rate: per_second(ok.len() as f64),
        output_token_rate: per_second(output_tokens as f64),
        ttft: dist(&ok.iter().filter_map(|r| r.ttft).collect::<Vec<_>>()),
        tpot: dist(&ok.iter().filter_map(|r| r.tpot()).collect::<Vec<_>>()),
        itl: dist(&gaps),
        e2e: dist(&ok.iter().map(|r| r.e2e).collect::<Vec<_>>()),
    }
}

/// The search gives up halving below `start * MIN_FRACTION` and reports goodput 0.
const MIN_FRACTION: f64 = 1.0 / 64.0;

/// Finds the highest request rate whose SLO attainment is ≥ `target` (e.g. 0.9):
/// starts at `start`, doubles (or halves) until it brackets the boundary, then bisects
/// until hi/lo ≤ 1 + `rel_tol` or `max_points` measurements are used.
///
/// A pure state machine: the caller runs the load at [`next_rate`](Self::next_rate) and
/// feeds back the attainment with [`record`](Self::record). Noisy, non-monotone
/// attainment is tolerated: the bracket is always (highest passing rate below the lowest
/// failing rate, lowest failing rate), so the search never goes above a rate that failed,
/// and it gives up (goodput 0) when halving would go below `start / 64`.
#[derive(Debug, Clone)]
pub struct GoodputSearch {
    start: f64,
    target: f64,
    rel_tol: f64,
    max_points: usize,
    points: Vec<(f64, f64)>,
}

impl GoodputSearch {
    /// A search starting at `start` requests per second. A `start` that is not a positive
    /// finite number yields no rates (goodput 0).
    pub fn new(start: f64, target: f64, rel_tol: f64, max_points: usize) -> Self {
        Self {
            start,
            target,
            rel_tol,
            max_points,
            points: Vec::new(),
        }
    }

    /// The rate to measure next; `None` when done.
    pub fn next_rate(&self) -> Option<f64> {
        if self.points.len() >= self.max_points || !(self.start.is_finite() && self.start > 0.0) {
            return None;
        }
        let rate = match bracket(&self.points, self.target) {
            (None, None) => self.start,
            (Some(lo), None) => lo * 2.0,
            (None, Some(hi)) => Some(hi / 2.0).filter(|&r| r >= self.start * MIN_FRACTION)?,
            (Some(lo), Some(hi)) => {
                let mid = (lo + hi) / 2.0;
                // Also stop when floating point cannot split the bracket any more.
                if hi / lo <= 1.0 + self.rel_tol || !(lo < mid && mid < hi) {
                    return None;
                }
                mid
            }
        };
        rate.is_finite().then_some(rate)
    }

    /// Records the attainment measured at `rate`.
    pub fn record(&mut self, rate: f64, attainment: f64) {
        self.points.push((rate, attainment));
    }

    /// `(rate, attainment)` in the order measured.
    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }

    /// The result so far: see [`goodput_of`].
    pub fn goodput(&self) -> f64 {
        goodput_of(&self.points, self.target)
    }

    /// The lowest rate that missed the target, if any did: the goodput lies in
    /// `[goodput(), failed_at())`.
    pub fn failed_at(&self) -> Option<f64> {
        bracket(&self.points, self.target).1
    }
}

/// Runs several searches in turns: each round asks every search still going for its
/// next rate and records what `measure(k, rate)` gives for search `k`, until none has a
/// rate left. What drifts over time (a shared machine's speed) then falls on every
/// search's points alike.
///
/// # Errors
/// The first error `measure` returns (the searches keep what they recorded before it).
pub fn search_in_turns<E>(
    searches: &mut [GoodputSearch],
    mut measure: impl FnMut(usize, f64) -> Result<f64, E>,
) -> Result<(), E> {
    loop {
        let mut measured = false;
        for (k, search) in searches.iter_mut().enumerate() {
            let Some(rate) = search.next_rate() else {
                continue;
            };
            measured = true;
            let attainment = measure(k, rate)?;
            search.record(rate, attainment);
        }
        if !measured {
            return Ok(());
        }
    }
}

/// Goodput of an already measured sweep, e.g. for several SLOs from the same runs: the
/// highest rate whose attainment ≥ `target` and that lies below every rate that missed
/// it (so a lucky pass above a failure does not count); 0 if none.
pub fn goodput_of(points: &[(f64, f64)], target: f64) -> f64 {
    bracket(points, target).0.unwrap_or(0.0)
}

/// (highest passing rate below the lowest failing rate, lowest failing rate), ignoring
/// rates that are not positive and finite. A NaN attainment fails.
fn bracket(points: &[(f64, f64)], target: f64) -> (Option<f64>, Option<f64>) {
    let pass = |a: f64| a >= target;
    let valid = || points.iter().filter(|(r, _)| r.is_finite() && *r > 0.0);
    let hi = valid()
        .filter(|&&(_, a)| !pass(a))
        .map(|&(r, _)| r)
        .min_by(f64::total_cmp);
    let lo = valid()
        .filter(|&&(r, a)| pass(a) && hi.is_none_or(|h| r < h))
        .map(|&(r, _)| r)
        .max_by(f64::total_cmp);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(ttft: Option<f64>, gaps: &[f64], error: Option<&str>) -> RequestRecord {
        RequestRecord {
            sent_at: 0.0,
            prompt_tokens: 10,
            output_tokens: gaps.len() + usize::from(ttft.is_some()),
            ttft,
            gaps: gaps.to_vec(),
            e2e: ttft.unwrap_or(0.0) + gaps.iter().sum::<f64>(),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 1.0), 4.0);
        assert_eq!(percentile(&s, 0.5), 2.5);
        // h = 3 * 0.9 = 2.7 → 3 + 0.7 * (4 - 3)
        assert!((percentile(&s, 0.9) - 3.7).abs() < 1e-12);
        // h = 3 * 0.25 = 0.75
        assert!((percentile(&s, 0.25) - 1.75).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert!(percentile(&s, f64::NAN).is_nan());
        assert_eq!(percentile(&s, 2.0), 4.0);
        assert_eq!(percentile(&s, -1.0), 1.0);
    }

    #[test]
    fn dist_ignores_nan_and_empty_is_nan() {
        let d = dist(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((d.n, d.mean, d.p50, d.max), (3, 2.0, 2.0, 3.0));
        assert!((d.p90 - 2.8).abs() < 1e-12);
        let e = dist(&[f64::NAN]);
        assert_eq!(e.n, 0);
        assert!(e.mean.is_nan() && e.p99.is_nan() && e.max.is_nan());
    }

    #[test]
    fn empty_dist_round_trips_through_json_as_null() {
        let json = serde_json::to_string(&dist(&[])).unwrap();
        assert_eq!(
            json,
            r#"{"n":0,"mean":null,"p50":null,"p90":null,"p99":null,"max":null}"#
        );
        let back: Dist = serde_json::from_str(&json).unwrap();
        assert!(back.n == 0 && back.mean.is_nan() && back.max.is_nan());
        let d = dist(&[1.0, 2.0]);
        assert_eq!(
            serde_json::from_str::<Dist>(&serde_json::to_string(&d).unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn tpot_and_meets() {
        let slo = Slo {
            ttft: 1.0,
            tpot: 0.1,
        };
        let r = rec(Some(0.5), &[0.05, 0.0, 0.1], None);
        assert!((r.tpot().unwrap() - 0.05).abs() < 1e-12);
        assert!(r.meets(&slo));
        assert!(!rec(Some(1.5), &[0.05], None).meets(&slo));
        assert!(!rec(Some(0.5), &[0.2, 0.2], None).meets(&slo));
        // One token: no TPOT, judged on TTFT alone.
        let one = rec(Some(0.5), &[], None);
        assert_eq!(one.tpot(), None);
        assert!(one.meets(&slo));
        assert!(!rec(None, &[], None).meets(&slo));
        assert!(!rec(Some(0.1), &[0.01], Some("boom")).meets(&slo));
    }

    #[test]
    fn attainment_counts_errors_as_misses() {
        let slo = Slo {
            ttft: 1.0,
            tpot: 0.1,
        };
        let rs = [
            rec(Some(0.5), &[0.05], None),
            rec(Some(0.5), &[0.05], Some("reset")),
            rec(Some(2.0), &[0.05], None),
            rec(Some(0.2), &[], None),
        ];
        assert_eq!(attainment(&rs, &slo), 0.5);
        assert_eq!(attainment(&[], &slo), 0.0);
    }

    #[test]
    fn summarize_counts_only_successes() {
        let rs = [
            rec(Some(0.5), &[0.1, 0.3], None),
            rec(Some(1.5), &[0.2], None),
            rec(Some(9.0), &[9.0, 9.0], Some("timeout")),
        ];
        let s = summarize(&rs, 2.0);
        assert_eq!((s.requests, s.errors), (3, 1));
        assert_eq!(s.request_rate, 1.0);
        assert_eq!(s.output_token_rate, 2.5); // (3 + 2) tokens / 2 s
        assert_eq!((s.ttft.n, s.ttft.mean, s.ttft.max), (2, 1.0, 1.5));
        assert_eq!((s.tpot.n, s.tpot.max), (2, 0.2));
        assert_eq!((s.itl.n, s.itl.max), (3, 0.3));
        assert_eq!((s.e2e.n, s.e2e.max), (2, 1.7));
        let zero = summarize(&rs, 0.0);
        assert_eq!((zero.request_rate, zero.output_token_rate), (0.0, 0.0));
        assert!(serde_json::to_string(&summarize(&[], f64::NAN)).is_ok());
    }

    /// Runs a search against `system` until it stops; panics if it does not stop within
    /// `limit` measurements.
    fn run(search: &mut GoodputSearch, mut system: impl FnMut(f64) -> f64, limit: usize) {
        for _ in 0..limit {
            let Some(rate) = search.next_rate() else {
                return;
            };
            search.record(rate, system(rate));
        }
        panic!("search did not stop: {:?}", search.points());
    }

    fn step(boundary: f64) -> impl Fn(f64) -> f64 {
        move |rate| if rate <= boundary { 0.97 } else { 0.4 }
    }

    #[test]
    fn searches_in_turns_alternate_and_find_what_each_finds_alone() {
        let boundaries = [3.0, 40.0, 0.7];
        let mut alone = Vec::new();
        for b in boundaries {
            let mut s = GoodputSearch::new(2.0, 0.9, 0.05, 12);
            run(&mut s, step(b), 12);
            alone.push((s.points().len(), s.goodput(), s.failed_at()));
        }
        let mut turns: Vec<_> = boundaries
            .iter()
            .map(|_| GoodputSearch::new(2.0, 0.9, 0.05, 12))
            .collect();
        let mut order = Vec::new();
        search_in_turns::<()>(&mut turns, |k, rate| {
            order.push(k);
            Ok(step(boundaries[k])(rate))
        })
        .unwrap();
        for (k, s) in turns.iter().enumerate() {
            assert_eq!((s.points().len(), s.goodput(), s.failed_at()), alone[k]);
        }
        // Round r measures every search that still has an r-th point, in order.
        let rounds = alone.iter().map(|a| a.0).max().unwrap();
        let lengths: Vec<usize> = alone.iter().map(|a| a.0).collect();
        let expected: Vec<usize> = (0..rounds)
            .flat_map(|r| {
                (0..lengths.len())
                    .filter(|&k| lengths[k] > r)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(order, expected);
        // An error stops every search where it is.
        let mut failing: Vec<_> = (0..2)
            .map(|_| GoodputSearch::new(2.0, 0.9, 0.05, 12))
            .collect();
        let mut calls = 0;
        let err = search_in_turns(&mut failing, |k, _| {
            calls += 1;
            if calls == 3 { Err(k) } else { Ok(0.95) }
        });
        assert_eq!(err, Err(0));
        assert_eq!(
            (failing[0].points().len(), failing[1].points().len()),
            (1, 1)
        );
    }

    #[test]
    fn search_brackets_upwards_and_downwards() {
        for boundary in [0.3, 1.0, 5.5, 37.0] {
            let mut s = GoodputSearch::new(2.0, 0.9, 0.05, 30);
            run(&mut s, step(boundary), 30);
            let g = s.goodput();
            assert!(g <= boundary && boundary / g < 1.05, "{boundary}: {g}");
            let hi = s.failed_at().unwrap();
            assert!(hi > boundary && hi / g <= 1.05, "{boundary}: [{g}, {hi})");
        }
    }

    #[test]
    fn search_respects_max_points() {
        let mut s = GoodputSearch::new(1.0, 0.9, 1e-9, 5);
        run(&mut s, step(100.0), 10);
        assert_eq!(s.points().len(), 5);
        assert_eq!(s.goodput(), 16.0);
        assert_eq!(s.failed_at(), None);
    }

    #[test]
    fn search_gives_up_below_the_floor() {
        let mut s = GoodputSearch::new(64.0, 0.9, 0.05, 100);
        run(&mut s, step(0.5), 100);
        assert_eq!(s.goodput(), 0.0);
        let lowest = s.points().iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        assert_eq!(lowest, 1.0);
    }

    #[test]
    fn bad_start_yields_nothing() {
        for start in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = GoodputSearch::new(start, 0.9, 0.05, 10);
            assert_eq!(s.next_rate(), None);
            assert_eq!(s.goodput(), 0.0);
        }
    }

    #[test]
    fn goodput_of_ignores_passes_above_a_failure() {
        let pts = [(1.0, 0.95), (2.0, 0.85), (4.0, 0.92), (1.5, 0.91)];
        assert_eq!(goodput_of(&pts, 0.9), 1.5);
        assert_eq!(goodput_of(&pts, 0.8), 4.0);
        assert_eq!(goodput_of(&pts, 0.99), 0.0);
        assert_eq!(goodput_of(&[(1.0, f64::NAN)], 0.5), 0.0);
        assert_eq!(goodput_of(&[(0.0, 1.0), (f64::INFINITY, 1.0)], 0.5), 0.0);
    }

    proptest! {
        #[test]
        fn percentile_monotone_and_bounded(
            mut v in prop::collection::vec(-1e6f64..1e6, 1..50),
            q1 in 0.0f64..=1.0,
            q2 in 0.0f64..=1.0,
        ) {
            v.sort_by(f64::total_cmp);
            let (qa, qb) = if q1 <= q2 { (q1, q2) } else { (q2, q1) };
            let (a, b) = (percentile(&v, qa), percentile(&v, qb));
            prop_assert!(a <= b);
            prop_assert!(v[0] <= a && b <= v[v.len() - 1]);
        }

        #[test]
        fn search_finds_step_boundary(boundary in 0.001f64..1000.0, start in 0.1f64..100.0) {
            let mut s = GoodputSearch::new(start, 0.9, 0.05, 64);
            run(&mut s, step(boundary), 64);
            prop_assert!(s.points().len() < 64, "stopped by convergence, not the budget");
            let g = s.goodput();
            if boundary >= start * MIN_FRACTION {
                prop_assert!(g <= boundary && boundary / g < 1.05, "{g}");
            } else {
                prop_assert_eq!(g, 0.0);
            }
        }

        #[test]
        fn noisy_search_terminates_and_never_exceeds_a_failure(
            noise in prop::collection::vec(0.0f64..1.0, 1..40),
            start in 0.1f64..100.0,
        ) {
            let mut s = GoodputSearch::new(start, 0.5, 0.01, usize::MAX);
            let mut i = 0;
            // Doubling on endless passes is only stopped by overflow, ~1100 steps.
            run(&mut s, |_| { i += 1; noise[i % noise.len()] }, 2000);
            let pts = s.points();
            for (k, &(failed, a)) in pts.iter().enumerate() {
                if a < 0.5 {
                    prop_assert!(pts[k + 1..].iter().all(|&(r, _)| r < failed));
                }
            }
            let g = s.goodput();
            prop_assert!(g == 0.0 || pts.iter().any(|&(r, a)| r == g && a >= 0.5));
            prop_assert!(pts.iter().all(|&(r, a)| a >= 0.5 || r > g));
        }
    }
}
