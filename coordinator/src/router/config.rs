//! Router configuration: the policy names users write in manifests and their tunables.

use std::fmt;
use std::str::FromStr;

/// Which policy a leg uses. Manifest names: `round_robin`, `source_ip_hash`,
/// `least_connections`, `min_ttft`, `overall_load`, `slo_priority`, `prefix_aware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Rotate over the candidates in id order.
    RoundRobin,
    /// Rendezvous hash of the client IP, so a client sticks to one worker.
    SourceIpHash,
    /// Fewest coordinator-tracked in-flight requests.
    LeastConnections,
    /// Lowest moving-average TTFT; unmeasured workers are probed first.
    MinTtft,
    /// Lowest weighted load score (see [`LoadWeights`]).
    OverallLoad,
    /// Worker choice as `overall_load`; class ordering happens in the admission queue.
    SloPriority,
    /// Longest cached prompt prefix, falling back to least connections.
    PrefixAware,
}

impl PolicyKind {
    /// Every policy, in documentation order.
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::RoundRobin,
        PolicyKind::SourceIpHash,
        PolicyKind::LeastConnections,
        PolicyKind::MinTtft,
        PolicyKind::OverallLoad,
        PolicyKind::SloPriority,
        PolicyKind::PrefixAware,
    ];

    /// The manifest name of this policy.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::SourceIpHash => "source_ip_hash",
            PolicyKind::LeastConnections => "least_connections",
            PolicyKind::MinTtft => "min_ttft",
            PolicyKind::OverallLoad => "overall_load",
            PolicyKind::SloPriority => "slo_priority",
            PolicyKind::PrefixAware => "prefix_aware",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown policy name; its message lists the allowed names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsePolicyError {
    /// The name as given.
    pub given: String,
}

impl fmt::Display for ParsePolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown routing policy `{}`; expected one of: ",
            self.given
        )?;
        for (i, k) in PolicyKind::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(k.name())?;
        }
        Ok(())
    }
}

impl std::error::Error for ParsePolicyError {}

impl FromStr for PolicyKind {
    type Err = ParsePolicyError;

    /// Parses a manifest name; surrounding whitespace, case and `-` for `_` are tolerated.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == norm)
            .ok_or_else(|| ParsePolicyError {
                given: s.to_owned(),
            })
    }
}

/// Weights of the `overall_load` / `slo_priority` score; the lowest score wins:
///
/// ```text
/// score = connections * connections_count
///       + queued      * queued_count
///       + ttft        * (ttft_ms / ttft_ref_ms)
///       + kv          * kv_used
/// ```
///
/// Defaults: `connections = 1.0`, `queued = 1.0`, `ttft = 1.0`, `ttft_ref_ms = 100.0`,
/// `kv = 4.0` — one in-flight request weighs as much as one queued request, as 100 ms of
/// TTFT, and as a quarter of the KV cache. An unknown TTFT (0) adds nothing. At score time
/// a weight that is negative or not finite counts as 0, `kv_used` is clamped to `0..=1`,
/// a NaN or negative measurement counts as 0, and the TTFT term is dropped when
/// `ttft_ref_ms` is not a positive finite number. Exactly equal scores are broken
/// round-robin (by worker id), so equal workers share the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadWeights {
    /// Weight per coordinator-tracked in-flight request.
    pub connections: f64,
    /// Weight per worker-reported queued request.
    pub queued: f64,
    /// Weight per `ttft_ref_ms` of moving-average TTFT.
    pub ttft: f64,
    /// TTFT that counts as one unit, in milliseconds.
    pub ttft_ref_ms: f64,
    /// Weight of a full KV cache (`kv_used = 1.0`).
    pub kv: f64,
}

impl Default for LoadWeights {
    fn default() -> Self {
        LoadWeights {
            connections: 1.0,
            queued: 1.0,
            ttft: 1.0,
            ttft_ref_ms: 100.0,
            kv: 4.0,
        }
    }
}

/// Tunables of one leg's [`Router`](super::Router).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Tokens per prefix block (default 16); should equal the workers' KV block size.
    pub block_size: usize,
    /// Weights for `overall_load` and `slo_priority`.
    pub load_weights: LoadWeights,
    /// `prefix_aware`: below this many matched leading blocks, fall back to least
    /// connections (default 1).
    pub prefix_min_match_blocks: usize,
    /// `prefix_aware`: if max − min connections among the candidates exceeds this, fall
    /// back to least connections (default 8).
    pub prefix_imbalance: u32,
    /// `prefix_aware`: per-worker LRU bound on remembered block hashes (default 65536).
    pub prefix_capacity_blocks: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            block_size: 16,
            load_weights: LoadWeights::default(),
            prefix_min_match_blocks: 1,
            prefix_imbalance: 8,
            prefix_capacity_blocks: 65_536,
        }
    }
}

/// A [`RouterConfig`] value that [`RouterConfig::validate`] rejects.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    /// `block_size` is 0.
    ZeroBlockSize,
    /// A load weight (named) is negative or not finite.
    BadWeight(&'static str, f64),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroBlockSize => f.write_str("router block_size must be at least 1"),
            ConfigError::BadWeight(name, v) => {
                write!(
                    f,
                    "router load weight `{name}` must be finite and >= 0, got {v}"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl RouterConfig {
    /// Checks the values; the router itself never panics on bad values (it clamps), this
    /// is for rejecting a manifest early.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.block_size == 0 {
            return Err(ConfigError::ZeroBlockSize);
        }
        let w = &self.load_weights;
        for (name, v) in [
            ("connections", w.connections),
            ("queued", w.queued),
            ("ttft", w.ttft),
            ("kv", w.kv),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::BadWeight(name, v));
            }
        }
        if !(w.ttft_ref_ms.is_finite() && w.ttft_ref_ms > 0.0) {
            return Err(ConfigError::BadWeight("ttft_ref_ms", w.ttft_ref_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_tolerate_spelling() {
        for k in PolicyKind::ALL {
            assert_eq!(k.name().parse::<PolicyKind>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!(
            " Prefix-Aware ".parse::<PolicyKind>(),
            Ok(PolicyKind::PrefixAware)
        );
    }

    #[test]
    fn unknown_name_lists_allowed_names() {
        let err = "fastest".parse::<PolicyKind>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`fastest`"), "{msg}");
        for k in PolicyKind::ALL {
            assert!(msg.contains(k.name()), "{msg} lacks {}", k.name());
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        let cfg = RouterConfig::default();
        assert_eq!(cfg.block_size, 16);
        assert_eq!(cfg.prefix_min_match_blocks, 1);
        assert_eq!(cfg.prefix_imbalance, 8);
        assert_eq!(cfg.prefix_capacity_blocks, 65_536);
        assert_eq!(cfg.validate(), Ok(()));
        let zero = RouterConfig {
            block_size: 0,
            ..RouterConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::ZeroBlockSize));
        let mut neg = RouterConfig::default();
        neg.load_weights.kv = -1.0;
        assert_eq!(neg.validate(), Err(ConfigError::BadWeight("kv", -1.0)));
        let mut reference = RouterConfig::default();
        reference.load_weights.ttft_ref_ms = 0.0;
        assert!(matches!(
            reference.validate(),
            Err(ConfigError::BadWeight("ttft_ref_ms", _))
        ));
    }
}
