//! What the simulator serves: requests with an arrival time, prompt tokens (some of
//! them prefix-cache hits) and output tokens — drawn from length distributions and an
//! arrival process, or replayed from a recorded trace.
//!
//! Common random numbers: the lengths and the unit-rate arrival gaps depend only on the
//! seed, and a rate only scales time, so every candidate split and every rate of a
//! search sees the same requests in the same order. The lengths and Poisson arrivals are
//! drawn exactly as [`crate::workload::Workload::plan`] draws them, so a simulated run
//! and `xpyd bench load` with the same seed send the same requests.

use crate::PlanError;
use crate::workload::{LengthDist, Phase, Rng, plan_phases};

/// One request of a simulated run.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SimRequest {
    /// Arrival, seconds from the start.
    pub arrival: f64,
    /// Prompt tokens.
    pub input: u32,
    /// Of those, found in the prefix cache (not computed).
    pub cached: u32,
    /// Output tokens (the first comes from the prefill).
    pub output: u32,
}

/// How requests arrive.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum Process {
    /// Exponential gaps.
    Poisson,
    /// Gamma gaps with this coefficient of variation (1 = Poisson; above 1, bursts).
    Gamma {
        /// Standard deviation / mean of a gap, `0.05..=20`.
        cv: f64,
    },
}

/// A workload to simulate.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum Traffic {
    /// Drawn from distributions.
    Generated {
        /// Prompt tokens.
        input: LengthDist,
        /// Output tokens.
        output: LengthDist,
        /// Arrival process.
        process: Process,
        /// Share of prompt tokens found in the prefix cache, `0..1`.
        prefix_hit: f64,
        /// How many requests.
        requests: usize,
        /// The seed of every draw.
        seed: u64,
    },
    /// A recorded trace (e.g. the coordinator's live window), replayed; a rate other
    /// than its own compresses or stretches its time.
    Trace(Vec<SimRequest>),
    /// Phases one after the other (a shift in lengths or a burst), Poisson arrivals; at
    /// rate `r` a phase arrives at `r × rate_factor`. Drawn exactly as
    /// [`crate::workload::plan_phases`] draws them for `xpyd bench load --phases`.
    Phased {
        /// The phases, in order.
        phases: Vec<Phase>,
        /// Share of prompt tokens found in the prefix cache, `0..1`.
        prefix_hit: f64,
        /// The seed of every draw.
        seed: u64,
    },
}

/// Checks a length distribution of field `field`.
fn check_length(field: &str, d: &LengthDist) -> Result<(), PlanError> {
    if d.max() == 0 || d.max() > u32::MAX as usize / 2 {
        return Err(PlanError::invalid(field, format!("`{d}` is out of range")));
    }
    Ok(())
}

/// Checks a prefix-cache hit share.
fn check_hit(prefix_hit: f64) -> Result<(), PlanError> {
    if !(0.0..1.0).contains(&prefix_hit) {
        return Err(PlanError::invalid(
            "prefix_hit",
            format!("{prefix_hit} is outside 0..1"),
        ));
    }
    Ok(())
}

/// Checks a request count.
fn check_requests(field: &str, requests: usize) -> Result<(), PlanError> {
    if requests == 0 || requests > MAX_REQUESTS {
        return Err(PlanError::invalid(
            field,
            format!("{requests} is outside 1..={MAX_REQUESTS}"),
        ));
    }
    Ok(())
}

/// Most requests one simulated workload may hold.
pub const MAX_REQUESTS: usize = 10_000_000;

/// Fewest requests a trace is simulated with (a shorter one repeats).
pub const MIN_TRACE_REQUESTS: usize = 1000;

impl Traffic {
    /// Checks the workload.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        match self {
            Traffic::Generated {
                input,
                output,
                process,
                prefix_hit,
                requests,
                ..
            } => {
                check_length("input", input)?;
                check_length("output", output)?;
                check_hit(*prefix_hit)?;
                check_requests("requests", *requests)?;
                if let Process::Gamma { cv } = process
                    && !(0.05..=20.0).contains(cv)
                {
                    return Err(PlanError::invalid(
                        "process.cv",
                        format!("{cv} is outside 0.05..=20"),
                    ));
                }
                Ok(())
            }
            Traffic::Phased {
                phases, prefix_hit, ..
            } => {
                if phases.is_empty() {
                    return Err(PlanError::invalid("phases", "none given"));
                }
                for (i, p) in phases.iter().enumerate() {
                    check_length(&format!("phases[{i}].input"), &p.input)?;
                    check_length(&format!("phases[{i}].output"), &p.output)?;
                    check_requests(&format!("phases[{i}].requests"), p.requests)?;
                    let f = p.rate_factor;
                    if !(f.is_finite() && f > 0.0 && f <= 1000.0) {
                        return Err(PlanError::invalid(
                            format!("phases[{i}].rate_factor"),
                            format!("{f} is outside (0, 1000]"),
                        ));
                    }
                }
                check_requests("phases", phases.iter().map(|p| p.requests).sum())?;
                check_hit(*prefix_hit)
            }
            Traffic::Trace(reqs) => {
                if reqs.len() < 2 || reqs.len() > MAX_REQUESTS {
                    return Err(PlanError::invalid(
                        "trace",
                        format!("{} requests; a trace needs 2..={MAX_REQUESTS}", reqs.len()),
                    ));
                }
                for (i, r) in reqs.iter().enumerate() {
                    let bad = |why: String| Err(PlanError::invalid(format!("trace[{i}]"), why));
                    if !r.arrival.is_finite() || r.arrival < 0.0 {
                        return bad(format!("arrival {} is not a time ≥ 0", r.arrival));
                    }
                    if i > 0 && r.arrival < reqs[i - 1].arrival {
                        return bad("arrivals must not go back in time".into());
                    }
                    if r.input == 0 || r.output == 0 || r.cached >= r.input {
                        return bad(format!(
                            "input {} / cached {} / output {}: needs input ≥ 1, cached < input, output ≥ 1",
                            r.input, r.cached, r.output
                        ));
                    }
                }
                if reqs[reqs.len() - 1].arrival <= reqs[0].arrival {
                    return Err(PlanError::invalid(
                        "trace",
                        "every request arrives at the same instant: no rate",
                    ));
                }
                Ok(())
            }
        }
    }

    /// The workload's own mean rate (a trace's), or `None` (generated: any rate).
    pub fn native_rate(&self) -> Option<f64> {
        match self {
            Traffic::Generated { .. } | Traffic::Phased { .. } => None,
            Traffic::Trace(r) => {
                let span = r[r.len() - 1].arrival - r[0].arrival;
                Some((r.len() - 1) as f64 / span)
            }
        }
    }

    /// Mean prompt tokens computed (not cached) and mean output tokens of a request.
    pub fn means(&self) -> (f64, f64) {
        match self {
            Traffic::Generated {
                input,
                output,
                prefix_hit,
                ..
            } => (input.mean() * (1.0 - prefix_hit), output.mean()),
            Traffic::Phased {
                phases, prefix_hit, ..
            } => {
                let n: usize = phases.iter().map(|p| p.requests).sum();
                let mean = |f: &dyn Fn(&Phase) -> f64| {
                    phases.iter().map(|p| p.requests as f64 * f(p)).sum::<f64>() / n as f64
                };
                (
                    mean(&|p| p.input.mean()) * (1.0 - prefix_hit),
                    mean(&|p| p.output.mean()),
                )
            }
            Traffic::Trace(r) => {
                let n = r.len() as f64;
                (
                    r.iter().map(|x| f64::from(x.input - x.cached)).sum::<f64>() / n,
                    r.iter().map(|x| f64::from(x.output)).sum::<f64>() / n,
                )
            }
        }
    }

    /// The requests at `rate` requests/s (`rate` > 0; a trace is rescaled in time, and one
    /// shorter than [`MIN_TRACE_REQUESTS`] repeated until it is not).
    pub fn at_rate(&self, rate: f64) -> Vec<SimRequest> {
        match self {
            Traffic::Generated {
                input,
                output,
                process,
                prefix_hit,
                requests,
                seed,
            } => {
                let mut lengths = Rng::new(*seed);
                let mut gaps = Rng::new(*seed ^ 0xA5A5_A5A5_5A5A_5A5A);
                let shape = match process {
                    Process::Poisson => None,
                    Process::Gamma { cv } => Some(1.0 / (cv * cv)),
                };
                let mut t = 0.0;
                (0..*requests)
                    .map(|_| {
                        t += match shape {
                            None => gaps.exp(rate),
                            Some(k) => gaps.gamma(k) / k / rate,
                        };
                        let input = input.sample(&mut lengths) as u32;
                        let output = output.sample(&mut lengths) as u32;
                        let cached = ((f64::from(input) * prefix_hit) as u32).min(input - 1);
                        SimRequest {
                            arrival: t,
                            input,
                            cached,
                            output,
                        }
                    })
                    .collect()
            }
            Traffic::Phased {
                phases,
                prefix_hit,
                seed,
            } => plan_phases(phases, *seed, Some(rate))
                .into_iter()
                .map(|p| {
                    let input = p.input_tokens as u32;
                    SimRequest {
                        arrival: p.at,
                        input,
                        cached: ((f64::from(input) * prefix_hit) as u32).min(input - 1),
                        output: p.output_tokens as u32,
                    }
                })
                .collect(),
            Traffic::Trace(reqs) => {
                let t0 = reqs[0].arrival;
                let native = self.native_rate().unwrap_or(rate);
                let scale = native / rate;
                // A short trace (one window of a quiet cluster) repeats end to end, one
                // mean gap apart, so queues can build as they would under a steady
                // stream: a few dozen requests say nothing about the rate a split
                // sustains.
                let period = reqs.len() as f64 / native;
                let copies = MIN_TRACE_REQUESTS.div_ceil(reqs.len()).max(1);
                (0..copies)
                    .flat_map(|k| {
                        reqs.iter().map(move |r| SimRequest {
                            arrival: (r.arrival - t0 + k as f64 * period) * scale,
                            ..*r
                        })
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    fn chat(process: Process) -> Traffic {
        Traffic::Generated {
            input: "uniform:10-500".parse().unwrap(),
            output: "longtail:4-32-256".parse().unwrap(),
            process,
            prefix_hit: 0.0,
            requests: 4000,
            seed: 42,
        }
    }

    #[test]
    fn generated_requests_match_the_load_generator_and_share_draws_across_rates() {
        let t = chat(Process::Poisson);
        let a = t.at_rate(2.0);
        let w = Workload {
            input: "uniform:10-500".parse().unwrap(),
            output: "longtail:4-32-256".parse().unwrap(),
            seed: 42,
        };
        for (s, p) in a.iter().zip(w.plan(4000, Some(2.0))) {
            assert_eq!(
                (s.input as usize, s.output as usize),
                (p.input_tokens, p.output_tokens)
            );
            assert!((s.arrival - p.at).abs() < 1e-9 * p.at.max(1.0));
        }
        let b = t.at_rate(8.0);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.input, x.output), (y.input, y.output));
            assert!((x.arrival - 4.0 * y.arrival).abs() < 1e-9 * x.arrival.max(1.0));
        }
    }

    #[test]
    fn phases_continue_the_draws_and_bad_phases_are_named() {
        let Traffic::Generated { input, output, .. } = chat(Process::Poisson) else {
            unreachable!()
        };
        let one = Phase {
            requests: 4000,
            rate_factor: 1.0,
            input,
            output,
        };
        let phased = |phases: Vec<Phase>| Traffic::Phased {
            phases,
            prefix_hit: 0.0,
            seed: 42,
        };
        // One phase at factor 1 is the generated Poisson workload.
        assert_eq!(
            phased(vec![one]).at_rate(3.0),
            chat(Process::Poisson).at_rate(3.0)
        );
        // A shift: the means weigh each phase by its requests.
        let long = Phase {
            requests: 1000,
            rate_factor: 0.5,
            input: LengthDist::Fixed { n: 1000 },
            output: LengthDist::Fixed { n: 2 },
        };
        let two = phased(vec![one, long]);
        two.validate().unwrap();
        let (i, o) = two.means();
        assert!((i - (0.8 * 255.0 + 0.2 * 1000.0)).abs() < 5.0, "{i}");
        assert!(o < one.output.mean(), "{o}");
        let reqs = two.at_rate(2.0);
        assert_eq!(reqs.len(), 5000);
        assert!(
            reqs[4000..]
                .iter()
                .all(|r| r.input == 1000 && r.output == 2)
        );
        // Bad phases name the phase and the field.
        for (bad, field) in [
            (phased(vec![]), "phases"),
            (
                phased(vec![
                    one,
                    Phase {
                        rate_factor: 0.0,
                        ..long
                    },
                ]),
                "phases[1].rate_factor",
            ),
            (
                phased(vec![Phase { requests: 0, ..one }]),
                "phases[0].requests",
            ),
        ] {
            match bad.validate() {
                Err(PlanError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn gamma_gaps_have_the_asked_variation() {
        for cv in [0.5, 1.0, 3.0] {
            let r = chat(Process::Gamma { cv }).at_rate(1.0);
            let gaps: Vec<f64> = r.windows(2).map(|w| w[1].arrival - w[0].arrival).collect();
            let n = gaps.len() as f64;
            let mean = gaps.iter().sum::<f64>() / n;
            let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!((mean - 1.0).abs() < 0.1, "cv {cv}: mean {mean}");
            assert!(
                (sd / mean - cv).abs() < 0.15 * cv,
                "cv {cv}: got {}",
                sd / mean
            );
        }
    }

    #[test]
    fn traces_rescale_and_bad_workloads_are_named() {
        let trace = Traffic::Trace(vec![
            SimRequest {
                arrival: 10.0,
                input: 5,
                cached: 0,
                output: 3,
            },
            SimRequest {
                arrival: 12.0,
                input: 9,
                cached: 4,
                output: 1,
            },
            SimRequest {
                arrival: 14.0,
                input: 9,
                cached: 0,
                output: 1,
            },
        ]);
        trace.validate().unwrap();
        assert_eq!(trace.native_rate(), Some(0.5));
        let r = trace.at_rate(1.0);
        // Repeated end to end, one mean gap apart: the rate holds throughout.
        assert_eq!(r.len(), 1002);
        assert_eq!(
            r.iter().take(7).map(|x| x.arrival).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!((r[3].input, r[4].cached), (5, 4));
        assert_eq!(trace.means(), (19.0 / 3.0, 5.0 / 3.0));
        let field = |t: Traffic| match t.validate() {
            Err(PlanError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut back = trace.clone();
        if let Traffic::Trace(r) = &mut back {
            r[2].arrival = 1.0;
        }
        assert_eq!(field(back), "trace[2]");
        assert_eq!(field(Traffic::Trace(vec![])), "trace");
        assert_eq!(field(chat(Process::Gamma { cv: 0.0 })), "process.cv");
        let mut hit = chat(Process::Poisson);
        if let Traffic::Generated { prefix_hit, .. } = &mut hit {
            *prefix_hit = 1.0;
        }
        assert_eq!(field(hit), "prefix_hit");
    }
}
