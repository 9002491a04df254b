//! The search: SLO attainment of a run, goodput (DistServe's: the highest arrival rate at
//! which at least 90 % of requests meet both the TTFT and the TPOT SLO; rejected and
//! unfinished requests miss) found by bisection, the ranking of every split of a budget
//! of N units (xP(N−x)D and aggregated ×N) pruned by the capacity bound, the bottleneck
//! of a layout, and the fewest units that meet the SLOs at a given rate.

use crate::PlanError;
use crate::queueing::Capacity;
use crate::service::ServiceModel;
use crate::sim::{ClusterConfig, Layout, Outcome, SimResult, WorkerRole, simulate};
use crate::traffic::{SimRequest, Traffic};

/// The service-level objectives.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Slo {
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Time per output token, seconds.
    pub tpot_s: f64,
    /// Share of requests that must meet both (DistServe: 0.9).
    pub attainment: f64,
}

impl Slo {
    /// Checks the numbers.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        for (field, v) in [("slo.ttft_s", self.ttft_s), ("slo.tpot_s", self.tpot_s)] {
            if !v.is_finite() || v <= 0.0 {
                return Err(PlanError::invalid(field, format!("{v} is not a time > 0")));
            }
        }
        if !(self.attainment > 0.0 && self.attainment <= 1.0) {
            return Err(PlanError::invalid(
                "slo.attainment",
                format!("{} is outside (0, 1]", self.attainment),
            ));
        }
        Ok(())
    }
}

/// p50 / p90 / p99 of one latency (seconds; NaN without samples).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Percentiles {
    /// Median.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::nan_or_number"))]
    pub p50: f64,
    /// 90th percentile.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::nan_or_number"))]
    pub p90: f64,
    /// 99th percentile.
    #[cfg_attr(feature = "serde", serde(deserialize_with = "crate::nan_or_number"))]
    pub p99: f64,
}

impl Percentiles {
    /// Of `xs` (NaNs ignored), nearest rank.
    pub fn of(xs: impl Iterator<Item = f64>) -> Percentiles {
        let mut v: Vec<f64> = xs.filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
                v[rank - 1]
            }
        };
        Percentiles {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
        }
    }
}

/// What a run gave, against the SLOs.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RunStats {
    /// Arrival rate (requests/s).
    pub rate: f64,
    /// Share of all requests that finished within both SLOs.
    pub attainment: f64,
    /// TTFT of the requests that got a first token.
    pub ttft: Percentiles,
    /// TPOT of the finished requests.
    pub tpot: Percentiles,
    /// Share rejected or unfinished.
    pub failed: f64,
    /// Misses by TTFT (including rejected and unfinished), share of all requests.
    pub ttft_misses: f64,
    /// Misses by TPOT alone, share of all requests.
    pub tpot_misses: f64,
}

/// Statistics of `r` against `slo`.
pub fn stats(r: &SimResult, slo: &Slo, rate: f64) -> RunStats {
    let n = r.requests.len().max(1) as f64;
    let (mut ok, mut failed, mut ttft_miss, mut tpot_miss) = (0usize, 0usize, 0usize, 0usize);
    for q in &r.requests {
        if q.outcome != Outcome::Finished {
            failed += 1;
            ttft_miss += 1;
        } else if q.ttft > slo.ttft_s {
            ttft_miss += 1;
        } else if q.tpot > slo.tpot_s {
            tpot_miss += 1;
        } else {
            ok += 1;
        }
    }
    RunStats {
        rate,
        attainment: ok as f64 / n,
        ttft: Percentiles::of(r.requests.iter().map(|q| q.ttft)),
        tpot: Percentiles::of(
            r.requests
                .iter()
                .filter(|q| q.outcome == Outcome::Finished)
                .map(|q| q.tpot),
        ),
        failed: failed as f64 / n,
        ttft_misses: ttft_miss as f64 / n,
        tpot_misses: tpot_miss as f64 / n,
    }
}

/// What limits a layout first as the rate grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Bottleneck {
    /// Prompts wait for a prefill worker.
    PrefillQueue,
    /// Decode slots are full (requests wait for admission) or steps are too slow.
    DecodeBatch,
    /// KV blocks run out before the slots do.
    KvBlocks,
    /// The KV transfer's exposed share slows the decode leg.
    Transfer,
    /// Prefill chunks in a combined worker's iterations slow its decode steps.
    Interference,
}

impl Bottleneck {
    /// In words, for the advice.
    pub fn explain(self) -> &'static str {
        match self {
            Bottleneck::PrefillQueue => {
                "prompts wait for a prefill worker: TTFT misses first (more prefill workers)"
            }
            Bottleneck::DecodeBatch => {
                "decode slots are full: requests wait for admission or steps grow too slow (more decode workers)"
            }
            Bottleneck::KvBlocks => {
                "decode workers run out of KV blocks before slots (more decode workers or KV memory)"
            }
            Bottleneck::Transfer => "the KV transfer's exposed time slows the decode leg",
            Bottleneck::Interference => {
                "prefill chunks interleaved with decode steps slow every stream (disaggregate)"
            }
        }
    }
}

/// The bottleneck of a run near or past its goodput, from where its requests waited
/// and what its workers did.
pub fn bottleneck(
    m: &ServiceModel,
    c: &ClusterConfig,
    reqs: &[SimRequest],
    r: &SimResult,
) -> Bottleneck {
    let mean = |f: fn(&crate::sim::RequestResult) -> f64| {
        let v: Vec<f64> = r.requests.iter().map(f).filter(|x| !x.is_nan()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let admission = mean(|q| q.admission);
    let prefill_wait = mean(|q| q.queueing) - admission;
    let engines: Vec<_> = r
        .workers
        .iter()
        .filter(|w| w.role != WorkerRole::Prefill)
        .collect();
    let n = engines.len().max(1) as f64;
    let batch = engines.iter().map(|w| w.mean_batch).sum::<f64>() / n;
    let kv_full = engines
        .iter()
        .any(|w| f64::from(w.peak_kv_blocks) >= 0.95 * f64::from(c.kv_blocks));
    let slots_spare = batch < 0.9 * f64::from(c.max_running);
    match c.layout {
        Layout::Aggregated { .. } => {
            let prefill_share = engines.iter().map(|w| w.prefill_share).sum::<f64>() / n;
            if admission > prefill_wait && kv_full && slots_spare {
                Bottleneck::KvBlocks
            } else if prefill_share > 0.3 {
                Bottleneck::Interference
            } else {
                Bottleneck::DecodeBatch
            }
        }
        Layout::Disaggregated { .. } => {
            let mean_in =
                reqs.iter().map(|q| f64::from(q.input)).sum::<f64>() / reqs.len().max(1) as f64;
            let exposed = m.transfer_exposed(mean_in as u32, m.prefill_time(mean_in as u32));
            let tpot = mean(|q| q.tpot);
            if prefill_wait > admission {
                Bottleneck::PrefillQueue
            } else if kv_full && slots_spare {
                Bottleneck::KvBlocks
            } else if tpot > 0.0 && exposed > 0.3 * tpot {
                Bottleneck::Transfer
            } else {
                Bottleneck::DecodeBatch
            }
        }
    }
}

/// A layout's goodput and the run at it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Goodput {
    /// Requests/s (0: the SLOs are not met even at a trickle).
    pub rate: f64,
    /// The run at that rate (at the lowest rate tried when 0).
    pub at: RunStats,
    /// What limits it (from the run just past the goodput).
    pub bottleneck: Bottleneck,
    /// Simulations run.
    pub sims: u32,
}

/// Goodput of `c` on `traffic` by bisection on the rate until the bracket is within
/// `precision` (relative, e.g. 0.05). `hint` is a rate near the answer (the capacity
/// bound) to start the bracket from.
///
/// # Errors
/// A bad model, cluster, workload or SLO.
pub fn goodput(
    m: &ServiceModel,
    c: &ClusterConfig,
    traffic: &Traffic,
    slo: &Slo,
    precision: f64,
) -> Result<Goodput, PlanError> {
    slo.validate()?;
    traffic.validate()?;
    if !(precision > 0.0 && precision < 1.0) {
        return Err(PlanError::invalid(
            "precision",
            format!("{precision} is outside (0, 1)"),
        ));
    }
    let unit = traffic.at_rate(1.0);
    let cap = Capacity::of(m, c, &unit).bound(c.layout);
    let mut sims = 0;
    let mut run = |rate: f64| -> Result<(RunStats, SimResult, Vec<SimRequest>), PlanError> {
        sims += 1;
        let reqs = traffic.at_rate(rate);
        let r = simulate(m, c, &reqs)?;
        Ok((stats(&r, slo, rate), r, reqs))
    };
    // A trickle first: if even that misses, the goodput is 0.
    let low = cap * 0.01;
    let (at_low, r_low, q_low) = run(low)?;
    if at_low.attainment < slo.attainment {
        let b = bottleneck(m, c, &q_low, &r_low);
        return Ok(Goodput {
            rate: 0.0,
            at: at_low,
            bottleneck: b,
            sims,
        });
    }
    let (mut lo, mut lo_stats) = (low, at_low);
    let mut hi = cap * 1.1;
    let mut hi_run = None;
    for _ in 0..8 {
        let (s, r, q) = run(hi)?;
        if s.attainment < slo.attainment {
            hi_run = Some((r, q));
            break;
        }
        (lo, lo_stats) = (hi, s);
        hi *= 2.0;
    }
    let Some(mut past) = hi_run else {
        // Meets the SLOs far beyond its bound: the bound is off; report what was seen.
        let (r, q) = (simulate(m, c, &traffic.at_rate(lo))?, traffic.at_rate(lo));
        let b = bottleneck(m, c, &q, &r);
        return Ok(Goodput {
            rate: lo,
            at: lo_stats,
            bottleneck: b,
            sims,
        });
    };
    while (hi - lo) / hi > precision {
        let mid = 0.5 * (lo + hi);
        let (s, r, q) = run(mid)?;
        if s.attainment >= slo.attainment {
            (lo, lo_stats) = (mid, s);
        } else {
            hi = mid;
            past = (r, q);
        }
    }
    let b = bottleneck(m, c, &past.1, &past.0);
    Ok(Goodput {
        rate: lo,
        at: lo_stats,
        bottleneck: b,
        sims,
    })
}

/// A split is skipped when its capacity bound, times this, is below the best goodput
/// found: the bound is an estimate (decode at its largest batch and the mean context),
/// so it gets a margin before it may rule a split out.
pub const PRUNE_MARGIN: f64 = 1.1;

/// One split of a budget, ranked.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Ranked {
    /// The split.
    pub layout: Layout,
    /// Its capacity bound (requests/s).
    pub bound: f64,
    /// Its goodput, or `None` when pruned (its bound, with [`PRUNE_MARGIN`], is below the
    /// best goodput found).
    pub goodput: Option<Goodput>,
}

/// Every split of `units` workers — xP(N−x)D for x in 1..N, and aggregated ×N — best
/// first by goodput (pruned ones last, by bound). `base` gives everything but the
/// layout.
///
/// # Errors
/// A budget of 0, or a bad model, cluster, workload or SLO.
pub fn rank(
    m: &ServiceModel,
    base: &ClusterConfig,
    traffic: &Traffic,
    slo: &Slo,
    units: u32,
    precision: f64,
) -> Result<Vec<Ranked>, PlanError> {
    rank_preferring(m, base, traffic, slo, units, precision, &|_| true)
}

/// As [`rank`], for a caller that can only run the layouts `allowed` admits (a running
/// cluster cannot change its mode): those are pruned only against the best of their
/// own kind, so each has its goodput unless another of its kind beats its bound.
///
/// # Errors
/// As [`rank`].
pub fn rank_preferring(
    m: &ServiceModel,
    base: &ClusterConfig,
    traffic: &Traffic,
    slo: &Slo,
    units: u32,
    precision: f64,
    allowed: &dyn Fn(Layout) -> bool,
) -> Result<Vec<Ranked>, PlanError> {
    if units == 0 {
        return Err(PlanError::invalid("budget", "0 units: nothing to split"));
    }
    traffic.validate()?;
    let unit = traffic.at_rate(1.0);
    let cap = Capacity::of(m, base, &unit);
    let mut layouts: Vec<Layout> = (1..units)
        .map(|p| Layout::Disaggregated {
            prefill: p,
            decode: units - p,
        })
        .collect();
    layouts.push(Layout::Aggregated { workers: units });
    let mut ranked: Vec<Ranked> = layouts
        .into_iter()
        .map(|layout| Ranked {
            layout,
            bound: cap.bound(layout),
            goodput: None,
        })
        .collect();
    ranked.sort_by(|a, b| b.bound.total_cmp(&a.bound));
    let (mut best, mut best_allowed) = (0.0f64, 0.0f64);
    for r in &mut ranked {
        let ok = allowed(r.layout);
        if r.bound * PRUNE_MARGIN < if ok { best_allowed } else { best } {
            continue; // cannot beat the best found
        }
        let c = ClusterConfig {
            layout: r.layout,
            ..base.clone()
        };
        let g = goodput(m, &c, traffic, slo, precision)?;
        best = best.max(g.rate);
        if ok {
            best_allowed = best_allowed.max(g.rate);
        }
        r.goodput = Some(g);
    }
    ranked.sort_by(|a, b| {
        let key = |r: &Ranked| r.goodput.as_ref().map(|g| g.rate);
        match (key(a), key(b)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => b.bound.total_cmp(&a.bound),
        }
    });
    if ranked
        .iter()
        .all(|r| r.goodput.as_ref().is_none_or(|g| g.rate == 0.0))
    {
        let why = zero_load_reason(m, &unit, slo);
        return Err(PlanError::Infeasible(why));
    }
    Ok(ranked)
}

/// Why no layout meets the SLOs: the share of requests that would miss alone on an idle
/// cluster.
fn zero_load_reason(m: &ServiceModel, reqs: &[SimRequest], slo: &Slo) -> String {
    let n = reqs.len().max(1) as f64;
    let ttft_miss = reqs
        .iter()
        .filter(|r| m.prefill_time(r.input - r.cached) > slo.ttft_s)
        .count() as f64
        / n;
    let tpot_miss = reqs
        .iter()
        .filter(|r| r.output > 1 && m.decode_step(1, f64::from(r.input)) > slo.tpot_s)
        .count() as f64
        / n;
    format!(
        "on an idle cluster {:.0}% of the requests miss the TTFT SLO of {:.0} ms and {:.0}% the TPOT SLO of {:.1} ms (a single decode step takes {:.1} ms); at least {:.0}% must meet both",
        100.0 * ttft_miss,
        slo.ttft_s * 1e3,
        100.0 * tpot_miss,
        slo.tpot_s * 1e3,
        m.decode_step(1, 512.0) * 1e3,
        100.0 * slo.attainment
    )
}

/// The fewest units (up to `max_units`) and their best split whose goodput reaches
/// `rate` — what scaling to a forecast rate needs — or `None` when even `max_units`
/// fall short.
///
/// # Errors
/// As [`rank`].
pub fn fewest_units(
    m: &ServiceModel,
    base: &ClusterConfig,
    traffic: &Traffic,
    slo: &Slo,
    rate: f64,
    max_units: u32,
    precision: f64,
) -> Result<Option<Ranked>, PlanError> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(PlanError::invalid(
            "rate",
            format!("{rate} is not a rate > 0"),
        ));
    }
    let unit = traffic.at_rate(1.0);
    let cap = Capacity::of(m, base, &unit);
    for n in 1..=max_units {
        // Skip budgets whose every split is bounded below the rate.
        let best_bound = (1..n)
            .map(|p| {
                cap.bound(Layout::Disaggregated {
                    prefill: p,
                    decode: n - p,
                })
            })
            .chain([cap.bound(Layout::Aggregated { workers: n })])
            .fold(0.0, f64::max);
        if best_bound < rate {
            continue;
        }
        let ranked = match rank(m, base, traffic, slo, n, precision) {
            Ok(r) => r,
            Err(PlanError::Infeasible(_)) => continue,
            Err(e) => return Err(e),
        };
        if let Some(top) = ranked.into_iter().next()
            && top.goodput.as_ref().is_some_and(|g| g.rate >= rate)
        {
            return Ok(Some(top));
        }
    }
    Ok(None)
}
