//! The worker-selection policies as pure functions over a candidate list.
//!
//! Every selector returns an index into the candidate slice (or `None` when it is empty)
//! and never panics, whatever the numbers in the candidates are.

use std::cmp::Ordering;
use std::net::IpAddr;

use super::config::{LoadWeights, RouterConfig};
use super::hash::rendezvous_weight;

/// One ready worker as the router sees it (the caller filters to ready workers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidate {
    /// Worker id.
    pub id: String,
    /// Requests the coordinator has in flight on it.
    pub connections: u32,
    /// Worker-reported queue length.
    pub queued: u32,
    /// Worker-reported running requests.
    pub running: u32,
    /// Moving-average TTFT (or prefill time) observed, in ms; 0 = unknown.
    pub ttft_ms: f64,
    /// Fraction of KV blocks in use, `0..=1`.
    pub kv_used: f64,
}

/// What the router knows about a request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouteInput<'a> {
    /// Client address, when known (`source_ip_hash`).
    pub source_ip: Option<IpAddr>,
    /// Prompt token ids (`prefix_aware`).
    pub tokens: &'a [u32],
    /// SLO class `0..=3`, 0 highest (ordering is the admission queue's job).
    pub class: u8,
}

/// Round-robin cursor that remembers the id it picked last and next picks the smallest
/// id greater than it (wrapping to the smallest id). Because it rotates by id rather than
/// by position, it stays fair when workers join or leave: each worker present is visited
/// once per cycle. Candidates sharing an id are treated as one (the first wins).
#[derive(Debug, Default, Clone)]
pub struct Rotor {
    last: Option<String>,
}

impl Rotor {
    /// Picks round-robin among the candidate indices in `among` (all in range).
    pub fn next_among(&mut self, cands: &[Candidate], among: &[usize]) -> Option<usize> {
        let by_id = |a: &usize, b: &usize| cands[*a].id.cmp(&cands[*b].id);
        let last = self.last.as_deref();
        let pick = among
            .iter()
            .copied()
            .filter(|&i| last.is_some_and(|l| cands[i].id.as_str() > l))
            .min_by(by_id)
            .or_else(|| among.iter().copied().min_by(by_id))?;
        self.last = Some(cands[pick].id.clone());
        Some(pick)
    }

    /// Picks round-robin among all candidates.
    pub fn next(&mut self, cands: &[Candidate]) -> Option<usize> {
        let all: Vec<usize> = (0..cands.len()).collect();
        self.next_among(cands, &all)
    }
}

/// `f64` ordered by [`f64::total_cmp`], for use in sort keys.
#[derive(Debug, Clone, Copy)]
struct Total(f64);

impl PartialEq for Total {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Total {}
impl PartialOrd for Total {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Total {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// `x` if it is a positive number (infinity included), else 0 — NaN, negatives and -0
/// from peers become "nothing" so scores stay comparable.
fn non_neg(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}

/// Index with the smallest `key` among `among`; exact ties are broken by `rotor`.
fn min_rotating<K: Ord>(
    rotor: &mut Rotor,
    cands: &[Candidate],
    among: &[usize],
    key: impl Fn(&Candidate) -> K,
) -> Option<usize> {
    let keys: Vec<K> = among.iter().map(|&i| key(&cands[i])).collect();
    let best = keys.iter().min()?;
    let tied: Vec<usize> = among
        .iter()
        .zip(&keys)
        .filter(|(_, k)| *k == best)
        .map(|(&i, _)| i)
        .collect();
    rotor.next_among(cands, &tied)
}

fn all(cands: &[Candidate]) -> Vec<usize> {
    (0..cands.len()).collect()
}

/// `source_ip_hash`: rendezvous hashing — the candidate with the highest
/// [`rendezvous_weight`] of (`ip`, id) wins, ties to the smaller id. The result depends
/// only on the set of ids, not their order, and removing a worker moves only the clients
/// that were on it. Without an IP, falls back to round robin.
pub fn source_ip_hash(rotor: &mut Rotor, cands: &[Candidate], ip: Option<IpAddr>) -> Option<usize> {
    let Some(ip) = ip else {
        return rotor.next(cands);
    };
    let key = |i: usize| {
        (
            rendezvous_weight(ip, &cands[i].id),
            std::cmp::Reverse(&cands[i].id),
        )
    };
    // `max_by` keeps the last maximum; iterate in reverse so equal ids resolve to the first.
    (0..cands.len()).rev().max_by(|&a, &b| key(a).cmp(&key(b)))
}

/// `least_connections`: fewest coordinator in-flight requests, then fewest worker-reported
/// `queued + running`, then round robin among exact ties (so equal workers share load).
pub fn least_connections(rotor: &mut Rotor, cands: &[Candidate]) -> Option<usize> {
    least_connections_among(rotor, cands, &all(cands))
}

fn least_connections_among(
    rotor: &mut Rotor,
    cands: &[Candidate],
    among: &[usize],
) -> Option<usize> {
    min_rotating(rotor, cands, among, |c| {
        (c.connections, u64::from(c.queued) + u64::from(c.running))
    })
}

/// `min_ttft`: lowest moving-average TTFT. An unmeasured worker (`ttft_ms` not > 0) with no
/// request in flight is probed before any measured one, so every worker gets measured;
/// once its probe is in flight it ranks after the measured workers, so a newcomer is not
/// flooded before its first measurement lands. Ties → fewer connections → round robin.
pub fn min_ttft(rotor: &mut Rotor, cands: &[Candidate]) -> Option<usize> {
    min_rotating(rotor, cands, &all(cands), |c| {
        let ttft = non_neg(c.ttft_ms);
        let tier = match (ttft > 0.0, c.connections) {
            (false, 0) => 0u8,
            (true, _) => 1,
            (false, _) => 2,
        };
        (tier, Total(ttft), c.connections)
    })
}

/// The `overall_load` score of `c` under `w` (formula and sanitising in [`LoadWeights`]).
pub fn load_score(w: &LoadWeights, c: &Candidate) -> f64 {
    let weight = |x: f64| if x.is_finite() { non_neg(x) } else { 0.0 };
    // Skip zero-weight terms: 0 * inf would be NaN.
    let term = |wt: f64, x: f64| {
        if weight(wt) == 0.0 {
            0.0
        } else {
            weight(wt) * non_neg(x)
        }
    };
    let ttft_units = if w.ttft_ref_ms.is_finite() && w.ttft_ref_ms > 0.0 {
        non_neg(c.ttft_ms) / w.ttft_ref_ms
    } else {
        0.0
    };
    term(w.connections, f64::from(c.connections))
        + term(w.queued, f64::from(c.queued))
        + term(w.ttft, ttft_units)
        + term(w.kv, non_neg(c.kv_used).min(1.0))
}

/// `overall_load` (and `slo_priority`): lowest [`load_score`], exact ties round robin.
pub fn overall_load(rotor: &mut Rotor, w: &LoadWeights, cands: &[Candidate]) -> Option<usize> {
    min_rotating(rotor, cands, &all(cands), |c| Total(load_score(w, c)))
}

/// `prefix_aware`, given `matched[i]` = leading blocks candidate `i` is believed to hold:
/// the longest match wins (ties → fewer connections → round robin) if it is at least
/// `prefix_min_match_blocks` and max − min connections over all candidates is at most
/// `prefix_imbalance`; otherwise [`least_connections`].
pub fn prefix_aware(
    rotor: &mut Rotor,
    cfg: &RouterConfig,
    cands: &[Candidate],
    matched: &[usize],
) -> Option<usize> {
    let conns = || cands.iter().map(|c| c.connections);
    let spread = conns().max()?.saturating_sub(conns().min()?);
    let best = cands
        .iter()
        .enumerate()
        .map(|(i, _)| matched.get(i).copied().unwrap_or(0))
        .max()?;
    if best == 0 || best < cfg.prefix_min_match_blocks || spread > cfg.prefix_imbalance {
        return least_connections(rotor, cands);
    }
    let holders: Vec<usize> = (0..cands.len())
        .filter(|&i| matched.get(i).copied().unwrap_or(0) == best)
        .collect();
    least_connections_among(rotor, cands, &holders)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
