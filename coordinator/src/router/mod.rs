//! Worker selection for one leg (prefill or decode): pure, synchronous routing policies,
//! prefix-cache affinity, TTFT averaging and the SLO-class admission queue.
//!
//! The coordinator keeps one [`Router`] per leg, filters the leg's workers to the ready
//! ones, calls [`Router::pick`], sends the request and then reports it with
//! [`Router::on_routed`]. All state here is in-memory belief; nothing does I/O.

pub mod admission;
pub mod config;
pub mod hash;
pub mod policy;
pub mod prefix;

pub use admission::{AdmissionQueue, Pushed, Ticket};
pub use config::{ConfigError, LoadWeights, ParsePolicyError, PolicyKind, RouterConfig};
pub use policy::{Candidate, RouteInput};
pub use xpyd_runtime::ema::Ema;

use hash::block_hashes;
use policy::Rotor;
use prefix::PrefixIndex;

/// One leg's router: a policy plus the little state it needs (a round-robin cursor and,
/// for `prefix_aware`, the per-worker prefix index).
#[derive(Debug, Clone)]
pub struct Router {
    kind: PolicyKind,
    cfg: RouterConfig,
    rotor: Rotor,
    prefixes: PrefixIndex,
}

impl Router {
    /// Router running policy `kind`. Bad `cfg` values are clamped, never a panic
    /// (`block_size` 0 acts as 1); use [`RouterConfig::validate`] to reject them early.
    pub fn new(kind: PolicyKind, cfg: RouterConfig) -> Self {
        let prefixes = PrefixIndex::new(cfg.prefix_capacity_blocks);
        Router {
            kind,
            cfg,
            rotor: Rotor::default(),
            prefixes,
        }
    }

    /// The policy this router runs.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// The configuration this router was built with.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Index into `cands` of the chosen worker; `None` when `cands` is empty. Never
    /// panics. See [`policy`] for each policy's exact rule.
    pub fn pick(&mut self, cands: &[Candidate], input: &RouteInput<'_>) -> Option<usize> {
        let rotor = &mut self.rotor;
        match self.kind {
            PolicyKind::RoundRobin => rotor.next(cands),
            PolicyKind::SourceIpHash => policy::source_ip_hash(rotor, cands, input.source_ip),
            PolicyKind::LeastConnections => policy::least_connections(rotor, cands),
            PolicyKind::MinTtft => policy::min_ttft(rotor, cands),
            PolicyKind::OverallLoad | PolicyKind::SloPriority => {
                policy::overall_load(rotor, &self.cfg.load_weights, cands)
            }
            PolicyKind::PrefixAware => {
                let hashes = block_hashes(input.tokens, self.cfg.block_size);
                let matched: Vec<usize> = cands
                    .iter()
                    .map(|c| self.prefixes.matched(&c.id, &hashes))
                    .collect();
                policy::prefix_aware(rotor, &self.cfg, cands, &matched)
            }
        }
    }

    /// Called after a request was sent to `worker`: `prefix_aware` records the prompt's
    /// full-block hashes for it (its KV cache will hold them); other policies do nothing.
    pub fn on_routed(&mut self, worker: &str, tokens: &[u32]) {
        if self.kind == PolicyKind::PrefixAware {
            self.prefixes
                .record(worker, &block_hashes(tokens, self.cfg.block_size));
        }
    }

    /// A worker left: forget its state. Round robin needs nothing here since its cursor
    /// is an id, not a position.
    pub fn forget(&mut self, worker: &str) {
        self.prefixes.forget(worker);
    }

    /// `prefix_aware`: how many leading full blocks of `tokens` the router believes
    /// `worker` holds (0 for other policies, which record nothing).
    pub fn cached_blocks(&self, worker: &str, tokens: &[u32]) -> usize {
        self.prefixes
            .matched(worker, &block_hashes(tokens, self.cfg.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn cands(ids: &[&str]) -> Vec<Candidate> {
        ids.iter()
            .map(|id| Candidate {
                id: (*id).to_owned(),
                ..Candidate::default()
            })
            .collect()
    }

    fn input(tokens: &[u32]) -> RouteInput<'_> {
        RouteInput {
            source_ip: None,
            tokens,
            class: 0,
        }
    }

    fn prompt(seed: u32, len: u32) -> Vec<u32> {
        (0..len).map(|i| seed * 100_000 + i).collect()
    }

    #[test]
    fn every_kind_handles_empty_and_reports_kind() {
        for kind in PolicyKind::ALL {
            let mut r = Router::new(kind, RouterConfig::default());
            assert_eq!(r.kind(), kind);
            assert_eq!(r.pick(&[], &input(&[1, 2, 3])), None, "{kind}");
            assert_eq!(r.pick(&cands(&["only"]), &input(&[])), Some(0), "{kind}");
        }
    }

    #[test]
    fn round_robin_router_is_fair_over_n_picks() {
        let cs = cands(&["w0", "w1", "w2", "w3"]);
        let mut r = Router::new(PolicyKind::RoundRobin, RouterConfig::default());
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[r.pick(&cs, &input(&[])).unwrap()] += 1;
        }
        assert_eq!(seen, [100; 4]);
    }

    #[test]
    fn source_ip_router_uses_the_ip() {
        let cs = cands(&["w0", "w1", "w2"]);
        let mut r = Router::new(PolicyKind::SourceIpHash, RouterConfig::default());
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let req = RouteInput {
            source_ip: Some(ip),
            tokens: &[],
            class: 0,
        };
        let first = r.pick(&cs, &req);
        assert!((0..50).all(|_| r.pick(&cs, &req) == first));
    }

    #[test]
    fn prefix_aware_routes_repeated_prefix_to_its_worker() {
        let mut r = Router::new(PolicyKind::PrefixAware, RouterConfig::default());
        let mut cs = cands(&["a", "b", "c"]);
        let doc = prompt(1, 64); // 4 blocks of 16
        assert_eq!(
            r.pick(&cs, &input(&doc)),
            Some(0),
            "cold: least connections"
        );
        // Pretend the first request went to "b" (e.g. another coordinator decision).
        r.on_routed("b", &doc);
        cs[1].connections = 2;
        assert_eq!(r.cached_blocks("b", &doc), 4);
        assert_eq!(r.cached_blocks("a", &doc), 0);
        // Same system prompt, different question: still goes to "b" despite more load.
        let mut follow_up = doc[..48].to_vec();
        follow_up.extend(prompt(2, 30));
        assert_eq!(r.cached_blocks("b", &follow_up), 3);
        assert_eq!(r.pick(&cs, &input(&follow_up)), Some(1));
        // Unrelated prompt: least connections (a or c, both idle).
        let other = r.pick(&cs, &input(&prompt(3, 64))).unwrap();
        assert_ne!(other, 1);
        // Imbalance beyond the limit (default 8): fall back to the idle workers.
        cs[1].connections = 9;
        assert_ne!(r.pick(&cs, &input(&follow_up)), Some(1));
        // A prompt shorter than one block never matches.
        assert_eq!(r.cached_blocks("b", &doc[..15]), 0);
    }

    #[test]
    fn prefix_aware_lru_bound_and_forget() {
        let cfg = RouterConfig {
            block_size: 4,
            prefix_capacity_blocks: 8,
            ..RouterConfig::default()
        };
        let mut r = Router::new(PolicyKind::PrefixAware, cfg);
        let old = prompt(1, 16); // 4 blocks
        r.on_routed("w", &old);
        for s in 2..10 {
            r.on_routed("w", &prompt(s, 16));
            assert!(r.prefixes.len("w") <= 8);
        }
        assert_eq!(r.cached_blocks("w", &old), 0, "oldest prompt evicted");
        assert_eq!(r.cached_blocks("w", &prompt(9, 16)), 4, "newest kept");
        r.forget("w");
        assert_eq!(r.cached_blocks("w", &prompt(9, 16)), 0);
    }

    #[test]
    fn non_prefix_policies_record_nothing() {
        let mut r = Router::new(PolicyKind::LeastConnections, RouterConfig::default());
        let doc = prompt(1, 64);
        r.on_routed("w", &doc);
        assert_eq!(r.cached_blocks("w", &doc), 0);
    }

    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        let f = prop_oneof![
            Just(0.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-1.0),
            0.0f64..1e6,
            any::<f64>()
        ];
        (
            "[a-d]{0,2}",
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            f.clone(),
            f,
        )
            .prop_map(
                |(id, connections, queued, running, ttft_ms, kv_used)| Candidate {
                    id,
                    connections,
                    queued,
                    running,
                    ttft_ms,
                    kv_used,
                },
            )
    }

    proptest! {
        /// Whatever the candidates hold (duplicate ids, NaN, huge counts), every policy
        /// returns an in-range index, or None exactly when there are no candidates.
        #[test]
        fn pick_is_always_in_range(
            cands in proptest::collection::vec(arb_candidate(), 0..6),
            tokens in proptest::collection::vec(0u32..4, 0..40),
            v4 in proptest::option::of(any::<[u8; 4]>()),
            block_size in 0usize..5,
            rounds in 1usize..4,
        ) {
            for kind in PolicyKind::ALL {
                let cfg = RouterConfig { block_size, prefix_capacity_blocks: 3, ..RouterConfig::default() };
                let mut r = Router::new(kind, cfg);
                let req = RouteInput { source_ip: v4.map(IpAddr::from), tokens: &tokens, class: 0 };
                for _ in 0..rounds {
                    let got = r.pick(&cands, &req);
                    prop_assert_eq!(got.is_some(), !cands.is_empty());
                    if let Some(i) = got {
                        prop_assert!(i < cands.len());
                        r.on_routed(&cands[i].id, &tokens);
                    }
                }
            }
        }
    }
}
