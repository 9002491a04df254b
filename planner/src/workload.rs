//! Workloads: input/output length distributions, seeded arrivals, and the plan of
//! requests a run sends — the same for the load generator (`xpyd bench load`) and the
//! simulator. Everything here is deterministic given the seed.

use std::fmt;
use std::str::FromStr;

/// SplitMix64's output function (the same generator as the engine's sampler; the bench
/// crate checks that the two agree).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator (SplitMix64): runs are reproducible across
/// platforms and dependency versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi` (the bounds in either order).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        match (hi - lo).checked_add(1) {
            Some(span) => lo + (self.next_u64() % span as u64) as usize,
            None => self.next_u64() as usize,
        }
    }

    /// Exponentially distributed with mean `1 / rate` (Poisson inter-arrival times);
    /// `rate` must be positive and finite (see [`parse_rate`]).
    pub fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma-distributed with shape `k > 0` and scale 1 (Marsaglia–Tsang; shape below 1
    /// by the boost `G(k) = G(k + 1) · U^(1/k)`).
    pub fn gamma(&mut self, k: f64) -> f64 {
        if k < 1.0 {
            let u = 1.0 - self.unit();
            return self.gamma(k + 1.0) * u.powf(1.0 / k);
        }
        let d = k - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }
}

/// A distribution of token counts.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum LengthDist {
    /// Always `n`.
    Fixed {
        /// The length.
        n: usize,
    },
    /// Uniform in `lo..=hi`.
    Uniform {
        /// Smallest.
        lo: usize,
        /// Largest.
        hi: usize,
    },
    /// Chat-like long tail: log-normal with median `median` (σ = 1), clamped to
    /// `lo..=hi`. Most requests are short, a few are many times longer.
    LongTail {
        /// Smallest.
        lo: usize,
        /// Median before clamping.
        median: usize,
        /// Largest.
        hi: usize,
    },
}

impl LengthDist {
    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            LengthDist::Fixed { n } => n,
            LengthDist::Uniform { lo, hi } => rng.range(lo, hi),
            LengthDist::LongTail { lo, median, hi } => {
                let x = median as f64 * rng.normal().exp();
                (x.round() as usize).clamp(lo, hi)
            }
        }
    }

    /// The mean of a draw (for a long tail, of the clamped log-normal, by quadrature).
    pub fn mean(&self) -> f64 {
        match *self {
            LengthDist::Fixed { n } => n as f64,
            LengthDist::Uniform { lo, hi } => (lo + hi) as f64 / 2.0,
            LengthDist::LongTail { lo, median, hi } => {
                // E[clamp(m·e^Z, lo, hi)] over Z ~ N(0, 1), on a fine grid of Z.
                let (steps, span) = (4000, 8.0);
                let dz = 2.0 * span / steps as f64;
                (0..steps)
                    .map(|i| {
                        let z = -span + (i as f64 + 0.5) * dz;
                        let pdf = (-0.5 * z * z).exp() / (std::f64::consts::TAU).sqrt();
                        (median as f64 * z.exp()).clamp(lo as f64, hi as f64) * pdf * dz
                    })
                    .sum()
            }
        }
    }

    /// The largest value a draw can take.
    pub fn max(&self) -> usize {
        match *self {
            LengthDist::Fixed { n } => n,
            LengthDist::Uniform { hi, .. } | LengthDist::LongTail { hi, .. } => hi,
        }
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthDist::Fixed { n } => write!(f, "{n}"),
            LengthDist::Uniform { lo, hi } => write!(f, "uniform:{lo}-{hi}"),
            LengthDist::LongTail { lo, median, hi } => write!(f, "longtail:{lo}-{median}-{hi}"),
        }
    }
}

/// Why a length distribution did not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "`{0}` is not a length distribution: expected `N`, `uniform:LO-HI` or \
     `longtail:LO-MEDIAN-HI` with 1 <= LO <= (MEDIAN <=) HI"
)]
pub struct BadLength(String);

impl FromStr for LengthDist {
    type Err = BadLength;

    fn from_str(s: &str) -> Result<Self, BadLength> {
        let bad = || BadLength(s.to_string());
        let nums = |t: &str| -> Result<Vec<usize>, BadLength> {
            t.split('-')
                .map(|p| p.trim().parse::<usize>().map_err(|_| bad()))
                .collect()
        };
        let d = match s.split_once(':') {
            None => match nums(s)?[..] {
                [n] => LengthDist::Fixed { n },
                _ => return Err(bad()),
            },
            Some(("uniform", r)) => match nums(r)?[..] {
                [lo, hi] => LengthDist::Uniform { lo, hi },
                _ => return Err(bad()),
            },
            Some(("longtail", r)) => match nums(r)?[..] {
                [lo, median, hi] if median >= lo && median <= hi => {
                    LengthDist::LongTail { lo, median, hi }
                }
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        let (lo, hi) = match d {
            LengthDist::Fixed { n } => (n, n),
            LengthDist::Uniform { lo, hi } | LengthDist::LongTail { lo, hi, .. } => (lo, hi),
        };
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        Ok(d)
    }
}

/// Parses a request rate: a finite number of requests per second above zero.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a rate: expected requests/s > 0, e.g. `0.5`"
        )),
    }
}

/// What a run sends: lengths and seed.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Workload {
    /// Prompt tokens.
    pub input: LengthDist,
    /// Output tokens (enforced with `max_tokens` and `ignore_eos`).
    pub output: LengthDist,
    /// Makes the plan reproducible.
    pub seed: u64,
}

/// One planned request.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Send time, seconds after the run starts (open loop; ignored in closed loop).
    pub at: f64,
    /// Prompt tokens wanted.
    pub input_tokens: usize,
    /// Output tokens to generate.
    pub output_tokens: usize,
}

impl Workload {
    /// `n` requests; with `rate` (requests/s) their send times form a Poisson process,
    /// without it they all have `at = 0` (closed loop). The lengths depend only on the
    /// seed and `n`, not on the rate, so every rate of a sweep sends the same requests.
    pub fn plan(&self, n: usize, rate: Option<f64>) -> Vec<Planned> {
        let one = Phase {
            requests: n,
            rate_factor: 1.0,
            input: self.input,
            output: self.output,
        };
        plan_phases(&[one], self.seed, rate)
    }
}

/// A stretch of a workload with lengths and a rate of its own: `requests` requests
/// arriving at `rate_factor` × the run's rate. Written `N*F:IN/OUT`, e.g.
/// `300*1:uniform:16-64/uniform:128-256` (300 requests at the run's rate, prompts of
/// 16–64 tokens, outputs of 128–256).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Phase {
    /// Requests in the phase, ≥ 1.
    pub requests: usize,
    /// The phase's rate as a multiple of the run's, `0 < f ≤ 1000`.
    pub rate_factor: f64,
    /// Prompt tokens.
    pub input: LengthDist,
    /// Output tokens.
    pub output: LengthDist,
}

/// A phase that does not parse or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a phase: expected `N*F:IN/OUT` (N ≥ 1 requests at F × the rate, 0 < F ≤ 1000; \
     lengths as `N`, `uniform:LO-HI` or `longtail:LO-MEDIAN-HI`), e.g. `300*1:uniform:16-64/uniform:128-256`"
)]
pub struct BadPhase(pub String);

impl FromStr for Phase {
    type Err = BadPhase;

    fn from_str(s: &str) -> Result<Self, BadPhase> {
        let bad = || BadPhase(s.to_string());
        let (head, lengths) = s.trim().split_once(':').ok_or_else(bad)?;
        let (n, f) = head.split_once('*').ok_or_else(bad)?;
        let (input, output) = lengths.split_once('/').ok_or_else(bad)?;
        let phase = Phase {
            requests: n.trim().parse().map_err(|_| bad())?,
            rate_factor: f.trim().parse().map_err(|_| bad())?,
            input: input.trim().parse().map_err(|_| bad())?,
            output: output.trim().parse().map_err(|_| bad())?,
        };
        let f = phase.rate_factor;
        if phase.requests == 0 || !(f.is_finite() && f > 0.0 && f <= 1000.0) {
            return Err(bad());
        }
        Ok(phase)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}*{}:{}/{}",
            self.requests, self.rate_factor, self.input, self.output
        )
    }
}

/// The phases one after the other. Lengths and arrival gaps continue the same two
/// random streams across phases (a phase only changes what is drawn and how fast time
/// runs), so a single phase at factor 1 plans exactly what [`Workload::plan`] plans, and
/// every rate of a sweep sends the same requests. Without `rate`, every `at` is 0.
pub fn plan_phases(phases: &[Phase], seed: u64, rate: Option<f64>) -> Vec<Planned> {
    let mut lengths = Rng::new(seed);
    let mut arrivals = Rng::new(seed ^ 0xA5A5_A5A5_5A5A_5A5A);
    let mut t = 0.0;
    let mut out = Vec::with_capacity(phases.iter().map(|p| p.requests).sum());
    for p in phases {
        for _ in 0..p.requests {
            let at = match rate {
                Some(r) => {
                    t += arrivals.exp(r * p.rate_factor);
                    t
                }
                None => 0.0,
            };
            out.push(Planned {
                at,
                input_tokens: p.input.sample(&mut lengths),
                output_tokens: p.output.sample(&mut lengths),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_must_be_positive_and_finite() {
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "NaN", "x", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let mut rng = Rng::new(3);
        assert!((0..100).all(|_| (2..=5).contains(&rng.range(5, 2))));
        rng.range(0, usize::MAX);
    }

    #[test]
    fn phases_parse_print_and_plan_like_one_workload() {
        let p: Phase = "300*1.5:uniform:16-64/uniform:128-256".parse().unwrap();
        assert_eq!(p.requests, 300);
        assert_eq!(p.rate_factor, 1.5);
        assert_eq!(p.to_string(), "300*1.5:uniform:16-64/uniform:128-256");
        for bad in [
            "",
            "300:16/16",
            "0*1:16/16",
            "5*0:16/16",
            "5*-1:16/16",
            "5*inf:16/16",
            "5*1001:16/16",
            "5*1:16",
            "5*1:uniform:9-3/16",
            "x*1:16/16",
        ] {
            let e = bad.parse::<Phase>().unwrap_err();
            assert!(e.to_string().contains("N*F:IN/OUT"), "{bad}: {e}");
        }
        // One phase at factor 1 is the plain workload, request for request.
        let w = Workload {
            input: "uniform:8-64".parse().unwrap(),
            output: "uniform:2-20".parse().unwrap(),
            seed: 9,
        };
        let one = Phase {
            requests: 50,
            rate_factor: 1.0,
            input: w.input,
            output: w.output,
        };
        assert_eq!(plan_phases(&[one], 9, Some(3.0)), w.plan(50, Some(3.0)));
        // A second phase at twice the rate with other lengths: its requests come twice
        // as fast and are drawn from its own distributions.
        let long = Phase {
            requests: 2000,
            rate_factor: 2.0,
            input: LengthDist::Fixed { n: 500 },
            output: LengthDist::Fixed { n: 3 },
        };
        let first = Phase {
            requests: 2000,
            ..one
        };
        let plan = plan_phases(&[first, long], 9, Some(4.0));
        assert_eq!(plan.len(), 4000);
        let span = |r: &[Planned]| r[r.len() - 1].at - r[0].at;
        let (a, b) = plan.split_at(2000);
        let ratio = span(a) / span(b);
        assert!((ratio - 2.0).abs() < 0.2, "{ratio}");
        assert!(a.iter().all(|r| (8..=64).contains(&r.input_tokens)));
        assert!(
            b.iter()
                .all(|r| r.input_tokens == 500 && r.output_tokens == 3)
        );
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn lengths_parse_and_print() {
        for s in ["7", "uniform:3-9", "longtail:16-128-2048"] {
            let d: LengthDist = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        for s in [
            "",
            "0",
            "uniform:9-3",
            "uniform:3",
            "longtail:5-1-9",
            "normal:1-2",
            "x",
        ] {
            assert!(s.parse::<LengthDist>().is_err(), "{s}");
        }
    }

    #[test]
    fn draws_stay_in_range_and_long_tail_is_skewed() {
        let mut rng = Rng::new(1);
        let u = LengthDist::Uniform { lo: 3, hi: 9 };
        let draws: Vec<usize> = (0..2000).map(|_| u.sample(&mut rng)).collect();
        assert!(draws.iter().all(|d| (3..=9).contains(d)));
        assert!(draws.contains(&3) && draws.contains(&9));
        let t = LengthDist::LongTail {
            lo: 8,
            median: 100,
            hi: 4000,
        };
        let mut draws: Vec<usize> = (0..4001).map(|_| t.sample(&mut rng)).collect();
        draws.sort_unstable();
        let median = draws[2000];
        let mean = draws.iter().sum::<usize>() as f64 / draws.len() as f64;
        assert!((80..=125).contains(&median), "median {median}");
        assert!(mean > 1.3 * median as f64, "mean {mean} median {median}");
        assert!(draws.iter().all(|d| (8..=4000).contains(d)));
    }

    #[test]
    fn plans_are_reproducible_and_rate_independent() {
        let w = Workload {
            input: "uniform:10-500".parse().unwrap(),
            output: "longtail:4-32-256".parse().unwrap(),
            seed: 42,
        };
        let a = w.plan(200, Some(2.0));
        assert_eq!(a, w.plan(200, Some(2.0)));
        let b = w.plan(200, Some(8.0));
        let lens = |p: &[Planned]| {
            p.iter()
                .map(|r| (r.input_tokens, r.output_tokens))
                .collect::<Vec<_>>()
        };
        assert_eq!(lens(&a), lens(&b));
        assert_ne!(
            lens(&a),
            lens(&Workload { seed: 43, ..w }.plan(200, Some(2.0)))
        );
        // Poisson arrivals: increasing, mean gap ≈ 1/rate.
        assert!(a.windows(2).all(|p| p[1].at >= p[0].at));
        let mean_gap = a.last().unwrap().at / a.len() as f64;
        assert!((0.4..0.6).contains(&mean_gap), "{mean_gap}");
        assert!(w.plan(5, None).iter().all(|p| p.at == 0.0));
    }
}
