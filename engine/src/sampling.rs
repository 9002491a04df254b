//! Sampling parameters, their validation, and a deterministic sampler whose whole state
//! is `(seed, draws so far)` so it can move between processes with the KV.

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};

/// How to pick tokens and when to stop. Defaults: greedy, 256 tokens, no stop strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it [0–2].
    pub temperature: f32,
    /// Nucleus sampling mass (0–1]; 1 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Seed for the sampler; the same seed gives the same tokens.
    pub seed: u64,
    /// Most tokens to generate [1–context].
    pub max_tokens: usize,
    /// Generation stops before any of these strings; they are not emitted [≤16, each ≤256 bytes].
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`: also the most likely alternatives at each position [0–20].
    pub top_logprobs: usize,
    /// With `logprobs`: report the prompt tokens' log-probabilities too (the prompt is
    /// then computed whole, without prefix-cache reuse).
    pub prompt_logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            prompt_logprobs: false,
        }
    }
}

/// Most alternatives per position `top_logprobs` may ask for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks every field; the error names the field and its range.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(EngineError::InvalidParam { field, reason });
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad(
                "temperature",
                format!("{} is outside 0..=2", self.temperature),
            );
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("{} is outside (0, 1]", self.top_p));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(
                "stop",
                format!("{} strings, at most {MAX_STOP_STRINGS}", self.stop.len()),
            );
        }
        if let Some(s) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return bad(
                "stop",
                format!(
                    "stop strings must be 1..={MAX_STOP_BYTES} bytes, got {}",
                    s.len()
                ),
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!("{} is outside 0..={MAX_TOP_LOGPROBS}", self.top_logprobs),
            );
        }
        if !self.logprobs && (self.top_logprobs > 0 || self.prompt_logprobs) {
            let field = if self.top_logprobs > 0 {
                "top_logprobs"
            } else {
                "prompt_logprobs"
            };
            return bad(field, "needs logprobs to be on".into());
        }
        Ok(())
    }

    /// True when no randomness is involved.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// SplitMix64: a well-mixed, bijective 64-bit hash, used as a counter-based generator
/// (here and by the bench's seeded workloads) and as a hash finaliser (the coordinator's
/// affinity and prefix hashes). `splitmix64(s)` is the generator's output for state `s`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) for draw number `n` of a seed.
pub fn uniform(seed: u64, n: u64) -> f64 {
    let x = splitmix64(splitmix64(seed) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Picks the next token from logits. `draw` is the index of this draw for the seed
/// (the number of tokens the sequence has sampled before).
pub fn sample(logits: &[f32], params: &SamplingParams, draw: u64) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Tokens more than 40 nats below the best carry < 1e-17 of the mass: skip them.
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| (max - **l) * inv_t < 40.0)
        .map(|(i, l)| (i as u32, (*l - max) * inv_t))
        .collect();
    // Stable order: by logit descending, then id ascending.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 && cand.len() > params.top_k {
        cand.truncate(params.top_k);
    }
    let mut probs: Vec<f64> = cand.iter().map(|(_, l)| (*l as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = uniform(params.seed, draw);
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// A token's log-probability and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token.
    pub token: u32,
    /// Its natural log-probability under the model (before temperature, top-k, top-p).
    pub logprob: f32,
    /// The most likely tokens at this position with theirs, best first (ties: lower id).
    pub top: Vec<(u32, f32)>,
}

/// Log-probability the model gives a token that has no chance: `-inf` has no JSON
/// form, and every token with a finite logit lies far above this.
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// `token`'s log-probability under the softmax of `logits` (the model's distribution,
/// before any sampling transform) and the `top` most likely tokens with theirs.
/// Computed in f64; impossible tokens get [`LOGPROB_FLOOR`].
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    let lp = |l: f32| {
        let v = (l as f64 - log_z) as f32;
        if v.is_finite() {
            v.max(LOGPROB_FLOOR)
        } else {
            LOGPROB_FLOOR
        }
    };
    let mut best: Vec<u32> = Vec::with_capacity(top + 1);
    if top > 0 {
        // One pass keeping the `top` best in order: better than sorting the vocabulary.
        let better = |a: u32, b: u32| {
            let (x, y) = (logits[a as usize], logits[b as usize]);
            x > y || (x == y && a < b)
        };
        for i in 0..logits.len() as u32 {
            if best.len() == top && !better(i, best[top - 1]) {
                continue;
            }
            let at = best.partition_point(|b| better(*b, i));
            best.insert(at, i);
            best.truncate(top);
        }
    }
    TokenLogprobs {
        token,
        logprob: lp(logits[token as usize]),
        top: best
            .into_iter()
            .map(|t| (t, lp(logits[t as usize])))
            .collect(),
    }
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_vector() {
        // First output of the SplitMix64 generator seeded with 0.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            temperature: 3.0,
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam {
                field: "temperature",
                ..
            })
        ));
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam { field: "top_p", .. })
        ));
        let p = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam {
                field: "max_tokens",
                ..
            })
        ));
        let p = SamplingParams {
            stop: vec![String::new()],
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam { field: "stop", .. })
        ));
        for (p, field) in [
            (
                SamplingParams {
                    logprobs: true,
                    top_logprobs: 21,
                    ..Default::default()
                },
                "top_logprobs",
            ),
            (
                SamplingParams {
                    top_logprobs: 2,
                    ..Default::default()
                },
                "top_logprobs",
            ),
            (
                SamplingParams {
                    prompt_logprobs: true,
                    ..Default::default()
                },
                "prompt_logprobs",
            ),
        ] {
            match p.validate() {
                Err(EngineError::InvalidParam { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{p:?} gave {other:?}"),
            }
        }
        let p = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(p.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_best_alternatives_in_order() {
        let logits = vec![1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let z: f64 = logits.iter().map(|l| (*l as f64).exp()).sum();
        let want = |l: f32| (l as f64 - z.ln()) as f32;
        let r = logprobs(&logits, 2, 3);
        assert_eq!(r.token, 2);
        assert!((r.logprob - want(2.0)).abs() < 1e-6);
        let ids: Vec<u32> = r.top.iter().map(|(t, _)| *t).collect();
        assert_eq!(ids, [1, 3, 2], "best first; the tie goes to the lower id");
        for (t, lp) in &r.top {
            assert!((lp - want(logits[*t as usize])).abs() < 1e-6);
        }
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(t, _)| (logprobs(&logits, t as u32, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "the probabilities sum to one");
        let none = logprobs(&logits, 4, 0);
        assert_eq!(none.logprob, LOGPROB_FLOOR, "-inf has a finite stand-in");
        assert!(none.top.is_empty());
        assert_eq!(
            logprobs(&logits, 0, 20).top.len(),
            5,
            "never more than the vocabulary"
        );
    }

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        assert_eq!(sample(&logits, &SamplingParams::greedy(1), 0), 1);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = (0..64).map(|n| sample(&logits, &p, n)).collect();
        let b: Vec<u32> = (0..64).map(|n| sample(&logits, &p, n)).collect();
        assert_eq!(a, b, "same seed and draw index give the same token");
        assert!(
            a.contains(&1) && a.contains(&2),
            "temperature 1 mixes the two top tokens"
        );
        let q = SamplingParams {
            seed: 8,
            ..p.clone()
        };
        let c: Vec<u32> = (0..64).map(|n| sample(&logits, &q, n)).collect();
        assert_ne!(a, c, "another seed gives another stream");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = vec![3.0, 2.9, 0.0, -5.0];
        let k1 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let p1 = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        for n in 0..200 {
            assert!(sample(&logits, &k1, n) < 2);
            assert_eq!(
                sample(&logits, &p1, n),
                0,
                "top_p 0.5 keeps only the best token here"
            );
        }
    }
}
