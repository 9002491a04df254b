//! The mock compute backend: deterministic KV rows and next tokens, with an optional
//! simulated latency per pass, behind the engine's real interface (paged KV, export and
//! import, prefix cache, sampling), so scale tests run many workers without model compute.
//!
//! Everything a pass writes is a function of (token, position, layer), and the next
//! token is a function of the input token, its position and KV rows read back from the
//! cache (the first, previous and current position of the last layer), so KV that was
//! imported to the wrong place changes the output just as it would on the real model.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvStore;
use crate::model::Pass;
use crate::sampling::splitmix64;
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Largest value of any [`MockLatency`] field, in microseconds (10 s).
pub const MAX_MOCK_LATENCY_US: u64 = 10_000_000;

/// Simulated compute time of the mock backend, in microseconds; all zero (the default)
/// means no delay. A latency profile fills these from measurements of the real engine:
/// either the linear fields, or the fitted polynomials the ratio advisor's simulator
/// uses (`prefill_fit`, `decode_fit`), so a mock cluster runs at the speed the
/// simulator predicts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockLatency {
    /// Fixed cost of one prefill chunk.
    pub prefill_base_us: u64,
    /// Added per prompt token a chunk computes (prefix-cache hits cost nothing).
    pub prefill_per_token_us: u64,
    /// Fixed cost of one decode step.
    pub decode_base_us: u64,
    /// Added per sequence in the decode batch.
    pub decode_per_seq_us: u64,
    /// Seconds of prefill as `t(n) = a + b·n + c·n²` for `[a, b, c]`, `n` the prompt
    /// tokens computed so far: a chunk ending at `n` costs `t(n) − t(start)` (the first
    /// `t(n)`). Replaces the two linear prefill fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_fit: Option<[f64; 3]>,
    /// Seconds of a decode step as `c0 + c1·batch + c2·mean context + c3·total context`
    /// for `[c0, c1, c2, c3]`. Replaces the two linear decode fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_fit: Option<[f64; 4]>,
}

/// Shortest simulated pass under a fit (the simulator's floor too).
const MIN_FIT_STEP_S: f64 = 1e-6;

impl MockLatency {
    /// Checks every field is within `0..=MAX_MOCK_LATENCY_US`; the error names it.
    ///
    /// # Errors
    /// `InvalidParam` naming the field (`mock.prefill_base_us`, …).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("mock.prefill_base_us", self.prefill_base_us),
            ("mock.prefill_per_token_us", self.prefill_per_token_us),
            ("mock.decode_base_us", self.decode_base_us),
            ("mock.decode_per_seq_us", self.decode_per_seq_us),
        ] {
            if v > MAX_MOCK_LATENCY_US {
                return Err(EngineError::InvalidParam {
                    field,
                    reason: format!("{v} is outside 0..={MAX_MOCK_LATENCY_US} µs"),
                });
            }
        }
        let fits = [
            ("mock.prefill_fit", self.prefill_fit.map(|f| f.to_vec())),
            ("mock.decode_fit", self.decode_fit.map(|f| f.to_vec())),
        ];
        for (field, fit) in fits {
            if let Some(c) = fit
                && c.iter().any(|x| !x.is_finite() || x.abs() > 10.0)
            {
                return Err(EngineError::InvalidParam {
                    field,
                    reason: format!("{c:?}: every coefficient must be finite, |c| ≤ 10 s"),
                });
            }
        }
        Ok(())
    }

    /// Seconds as a duration, floored and capped like the linear fields.
    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s.clamp(MIN_FIT_STEP_S, MAX_MOCK_LATENCY_US as f64 / 1e6))
    }

    /// The simulated duration of a pass: base + per-token × chunk tokens for prefill,
    /// base + per-sequence × batch size for decode.
    pub fn of(&self, pass: &Pass<'_>) -> Duration {
        match (pass, self.prefill_fit, self.decode_fit) {
            (Pass::Prefill { start, tokens, .. }, Some([a, b, c]), _) => {
                let t = |n: usize| {
                    let n = n as f64;
                    a + b * n + c * n * n
                };
                let from = if *start == 0 { 0.0 } else { t(*start) };
                return Self::secs(t(start + tokens.len()) - from);
            }
            (Pass::Decode(items), _, Some([c0, c1, c2, c3])) if !items.is_empty() => {
                let n = items.len() as f64;
                let ctx: f64 = items.iter().map(|it| (it.pos + 1) as f64).sum();
                return Self::secs(c0 + c1 * n + c2 * ctx / n + c3 * ctx);
            }
            _ => {}
        }
        let (base, each, n) = match pass {
            Pass::Prefill { tokens, .. } => (
                self.prefill_base_us,
                self.prefill_per_token_us,
                tokens.len(),
            ),
            Pass::Decode(items) => (self.decode_base_us, self.decode_per_seq_us, items.len()),
        };
        Duration::from_micros(base.saturating_add(each.saturating_mul(n as u64)))
    }
}

/// Common words: with a real vocabulary most are single tokens, so mock output reads as
/// (meaningless) English.
const WORDS: &[&str] = &[
    " the", " of", " and", " to", " a", " in", " is", " it", " that", " was", " for", " on",
    " are", " with", " as", " be", " at", " one", " have", " this", " from", " by", " not", " but",
    " what", " all", " were", " when", " we", " there", " can", " an", " your", " which", " their",
    " said", " if", " will", " each", " about", " how", " up", " out", " them", " then", " she",
    " many", " some", " so", " these", " would", " other", " into", " has", " more", " two",
    " like", " see", " time", " could", " no", " make", " than", " first", " been", " its", " who",
    " now", " people", " made", " over", " did", " down", " only", " way", " find", " use", " may",
    " water", " long", " little", " very", " after", " words", " called", " just", " where",
    " most", " know",
];

/// Used when the vocabulary has few whole words (byte-level test models).
const LETTERS: &str = " abcdefghijklmnopqrstuvwxyz";

/// The mock model: the geometry and vocabulary of a real model file, no weights.
#[derive(Debug, Clone)]
pub struct MockModel {
    cfg: ModelConfig,
    latency: MockLatency,
    /// Token ids the mock emits: ordinary tokens only, never EOS or special tokens.
    outputs: Vec<u32>,
}

impl MockModel {
    /// A mock of the model with geometry `cfg` and tokenizer `tokenizer`.
    ///
    /// # Errors
    /// `InvalidParam` for a latency out of range; `Model` when the vocabulary has no
    /// ordinary word or letter tokens to emit.
    pub fn new(cfg: ModelConfig, tokenizer: &Tokenizer, latency: MockLatency) -> Result<Self> {
        latency.validate()?;
        let fits = |t: &u32| (*t as usize) < cfg.vocab;
        let mut outputs: Vec<u32> = WORDS
            .iter()
            .filter_map(|w| tokenizer.single_token(w))
            .filter(fits)
            .collect();
        if outputs.len() < 8 {
            let mut buf = [0u8; 4];
            outputs.extend(
                LETTERS
                    .chars()
                    .filter_map(|c| tokenizer.single_token(c.encode_utf8(&mut buf)))
                    .filter(fits),
            );
        }
        let mut seen = std::collections::HashSet::new();
        outputs.retain(|t| seen.insert(*t));
        if outputs.is_empty() {
            return Err(EngineError::Model(
                "mock engine: the vocabulary has no ordinary word or letter tokens".into(),
            ));
        }
        Ok(MockModel {
            cfg,
            latency,
            outputs,
        })
    }

    /// The model's geometry.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The simulated latency.
    pub fn latency(&self) -> MockLatency {
        self.latency
    }

    /// The token ids this mock can emit.
    pub fn outputs(&self) -> &[u32] {
        &self.outputs
    }

    /// Same contract as [`crate::model::Model::forward`]: writes the new tokens' KV into
    /// `kv`, calls `on_layer(l, kv)` once layer `l`'s rows are in, and returns logits
    /// (one row for a prefill chunk, or one per token with `all_logits`; one per decode
    /// item). Each row allows exactly one
    /// token (logit 0, every other `-inf`), so greedy and any seeded sampling agree.
    /// With a latency, a prefill pass takes that long, spread evenly over the layers (its
    /// layers stream out as they would); a decode pass returns at once and the engine
    /// paces the whole step, sampling included (`Engine::decode_step`).
    ///
    /// # Errors
    /// `BadToken` and `ContextOverflow`, like the real model.
    pub fn forward(
        &self,
        pass: &Pass<'_>,
        kv: &mut KvStore,
        on_layer: &mut dyn FnMut(usize, &KvStore),
    ) -> Result<Vec<Vec<f32>>> {
        let started = Instant::now();
        let cfg = &self.cfg;
        let Some((tokens, positions)) = pass.inputs(cfg)? else {
            return Ok(Vec::new());
        };
        let n = tokens.len();
        let total = self.latency.of(pass);
        let d = cfg.kv_dim();
        let (mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d]);
        for l in 0..cfg.n_layer {
            for (i, (t, p)) in tokens.iter().zip(&positions).enumerate() {
                fill_row(&mut k[i * d..(i + 1) * d], *t, *p, l, 0);
                fill_row(&mut v[i * d..(i + 1) * d], *t, *p, l, 1);
            }
            match pass {
                Pass::Prefill { table, start, .. } => kv.write_rows(l, table, *start, &k, &v),
                Pass::Decode(items) => {
                    for (i, it) in items.iter().enumerate() {
                        let rows = i * d..(i + 1) * d;
                        kv.write_rows(l, it.table, it.pos, &k[rows.clone()], &v[rows]);
                    }
                }
            }
            if matches!(pass, Pass::Prefill { .. }) {
                let due = started + total * (l as u32 + 1) / cfg.n_layer as u32;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            on_layer(l, kv);
        }
        let kv: &KvStore = kv;
        Ok(match pass {
            Pass::Prefill {
                table, all_logits, ..
            } => {
                let from = if *all_logits { 0 } else { n - 1 };
                (from..n)
                    .map(|i| self.logits(self.next_token(kv, table, tokens[i], positions[i])))
                    .collect()
            }
            Pass::Decode(items) => items
                .iter()
                .map(|it| self.logits(self.next_token(kv, it.table, it.token, it.pos)))
                .collect(),
        })
    }

    /// The token after `token` at `pos`: a hash of both and of the last layer's cached
    /// rows at positions 0, `pos - 1` and `pos`, mapped onto the output tokens.
    fn next_token(&self, kv: &KvStore, table: &[u32], token: u32, pos: usize) -> u32 {
        let d = self.cfg.kv_dim();
        let layer = self.cfg.n_layer - 1;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&token.to_le_bytes());
        h.update(&(pos as u64).to_le_bytes());
        let mut row = vec![0f32; 2 * d];
        for p in [0, pos.saturating_sub(1), pos] {
            let (k, v) = row.split_at_mut(d);
            kv.read_row_f32(layer, table, p, k, v);
            h.update(bytemuck::cast_slice(&row));
        }
        self.outputs[(h.digest() % self.outputs.len() as u64) as usize]
    }

    fn logits(&self, token: u32) -> Vec<f32> {
        let mut row = vec![f32::NEG_INFINITY; self.cfg.vocab];
        row[token as usize] = 0.0;
        row
    }
}

/// Fills one K (`kind` 0) or V (`kind` 1) row from (token, position, layer). The values
/// are multiples of 1/1024 in [-0.5, 0.5), exact in f16 too, so the mock emits the same
/// tokens with either KV dtype.
fn fill_row(row: &mut [f32], token: u32, pos: usize, layer: usize, kind: u64) {
    let key = ((token as u64) << 32 | pos as u64)
        ^ ((layer as u64) << 1 | kind).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut s = splitmix64(key) | 1;
    for x in row {
        // xorshift64*: cheap and well spread.
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
        *x = ((r >> 54) as i32 - 512) as f32 / 1024.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelInfo;
    use crate::testing::TinyModel;

    #[test]
    fn latency_fields_are_range_checked_by_name() {
        assert!(MockLatency::default().validate().is_ok());
        let l = MockLatency {
            decode_per_seq_us: MAX_MOCK_LATENCY_US + 1,
            ..Default::default()
        };
        assert!(matches!(
            l.validate(),
            Err(EngineError::InvalidParam {
                field: "mock.decode_per_seq_us",
                ..
            })
        ));
        let l: MockLatency =
            serde_json::from_str(r#"{"prefill_base_us": 5, "prefill_per_token_us": 2}"#).unwrap();
        let tokens = [1u32; 10];
        let pass = Pass::Prefill {
            table: &[],
            start: 0,
            tokens: &tokens,
            all_logits: false,
        };
        assert_eq!(l.of(&pass), Duration::from_micros(25));
        assert_eq!(l.of(&Pass::Decode(&[])), Duration::ZERO);
        assert!(serde_json::from_str::<MockLatency>(r#"{"decode_us": 1}"#).is_err());
    }

    #[test]
    fn fitted_latency_follows_the_simulators_service_model() {
        let l = MockLatency {
            prefill_fit: Some([0.004, 0.0004, 2e-8]),
            decode_fit: Some([0.012, 0.001, 1e-6, 2e-7]),
            ..Default::default()
        };
        let t = |n: f64| 0.004 + 0.0004 * n + 2e-8 * n * n;
        let toks = [1u32; 256];
        let chunk = |start| {
            l.of(&Pass::Prefill {
                table: &[],
                start,
                tokens: &toks,
                all_logits: false,
            })
            .as_secs_f64()
        };
        assert!((chunk(0) - t(256.0)).abs() < 1e-9);
        assert!((chunk(256) - (t(512.0) - t(256.0))).abs() < 1e-9);
        let items: Vec<crate::model::DecodeItem<'_>> = [99usize, 199]
            .iter()
            .map(|&pos| crate::model::DecodeItem {
                table: &[],
                token: 1,
                pos,
            })
            .collect();
        let step = l.of(&Pass::Decode(&items)).as_secs_f64();
        let want = 0.012 + 0.001 * 2.0 + 1e-6 * 300.0 / 2.0 + 2e-7 * 300.0;
        assert!((step - want).abs() < 1e-9, "{step} vs {want}");
        let bad = MockLatency {
            decode_fit: Some([f64::NAN, 0.0, 0.0, 0.0]),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn outputs_are_ordinary_tokens_of_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel::default().write(&path).unwrap();
        let info = ModelInfo::load(&path).unwrap();
        let m =
            MockModel::new(info.config.clone(), &info.tokenizer, MockLatency::default()).unwrap();
        // The byte-level tiny vocabulary has no whole words: space and 26 letters.
        assert_eq!(m.outputs().len(), 27);
        for t in m.outputs() {
            assert!((*t as usize) < info.config.vocab);
            assert!(!info.tokenizer.eos_ids().contains(t));
            let text = info.tokenizer.decode(&[*t]).unwrap();
            assert!(text.len() == 1 && LETTERS.contains(&text), "{text:?}");
        }
    }

    /// The profile times a whole decode step (forward, sampling, bookkeeping), so the
    /// mock's forward of a decode pass must not take the step's time itself: the engine
    /// paces the whole step (before, the step took the fit plus the mock's sampling).
    #[test]
    fn a_decode_pass_leaves_the_pacing_to_the_engine_and_a_prefill_pass_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel::default().write(&path).unwrap();
        let info = ModelInfo::load(&path).unwrap();
        let latency = MockLatency {
            prefill_base_us: 200_000,
            decode_base_us: 5_000_000,
            ..Default::default()
        };
        let m = MockModel::new(info.config.clone(), &info.tokenizer, latency).unwrap();
        let cfg = m.config().clone();
        let mut kv = crate::kv::KvStore::new(crate::kv::CacheShape {
            n_layer: cfg.n_layer,
            kv_dim: cfg.kv_dim(),
            block_size: 16,
            num_blocks: 4,
            dtype: crate::config::KvDtype::F32,
        });
        let table = [0u32];
        let tokens = [m.outputs()[0]; 4];
        let t = Instant::now();
        let prefill = Pass::Prefill {
            table: &table,
            start: 0,
            tokens: &tokens,
            all_logits: false,
        };
        m.forward(&prefill, &mut kv, &mut |_, _| {}).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        let items = [crate::model::DecodeItem {
            table: &table,
            pos: 4,
            token: tokens[0],
        }];
        let t = Instant::now();
        let logits = m
            .forward(&Pass::Decode(&items), &mut kv, &mut |_, _| {})
            .unwrap();
        assert_eq!(logits.len(), 1);
        // Five seconds of fitted step: a forward that slept it would take that long.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn rows_are_deterministic_and_exact_in_f16() {
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        fill_row(&mut a, 7, 3, 1, 0);
        fill_row(&mut b, 7, 3, 1, 0);
        assert_eq!(a, b);
        fill_row(&mut b, 7, 3, 1, 1);
        assert_ne!(a, b, "K and V differ");
        fill_row(&mut b, 7, 4, 1, 0);
        assert_ne!(a, b, "positions differ");
        for x in a {
            assert!((-0.5..0.5).contains(&x));
            assert_eq!(half::f16::from_f32(x).to_f32(), x);
        }
    }
}
