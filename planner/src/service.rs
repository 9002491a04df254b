//! The service model: how long a worker takes for each thing it does, from the fits of a
//! performance profile (`xpyd bench profile`). Pure functions of token counts.
//!
//! - Prefill of a prompt of `L` uncached tokens, chunk size fixed: `T(L) = a + b·L +
//!   c·L²` (the quadratic term is attention's context growth). A chunk covering tokens
//!   `from..to` costs `T(to) − T(from)` (the first chunk also pays `a`), so the chunks of
//!   a prompt add up to `T(L)`.
//! - Decode step of a batch of `n` sequences whose contexts add up to `S`: `c0 + c1·n +
//!   c2·S/n + c3·S` (the profile's bilinear fit in batch and per-sequence context).
//! - The mixed iteration of a combined worker: one prefill chunk, then one decode step,
//!   one after the other on the same threads.
//! - KV transfer of `L` tokens: `latency + bytes / bandwidth`, streamed layer by layer
//!   while the prefill runs, so what shows after the prefill ends is the larger of the
//!   last layer's share and what the prefill could not hide.

use crate::PlanError;

/// A fit's error over the points it was fitted to (mean |relative error|): the noise
/// a prediction carries.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FitErrors {
    /// Of the prefill fit.
    pub prefill: f64,
    /// Of the decode-step fit.
    pub decode: f64,
    /// Of the transfer fit.
    pub transfer: f64,
}

/// Latency of each piece of work, in seconds.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ServiceModel {
    /// `[a, b, c]`: a whole prompt of `L` tokens takes `a + b·L + c·L²`.
    pub prefill: [f64; 3],
    /// The prefill chunk size the fit was measured with (tokens).
    pub chunk: u32,
    /// `[c0, c1, c2, c3]`: a step of `n` sequences of mean context `l` takes
    /// `c0 + c1·n + c2·l + c3·n·l`.
    pub decode: [f64; 4],
    /// Fixed cost of one KV transfer (connection, header, last ack).
    pub transfer_latency_s: f64,
    /// KV transfer bandwidth (bytes/s); infinite = free transfers (aggregated runs).
    pub transfer_bytes_per_s: f64,
    /// KV bytes per token (all layers, K and V).
    pub kv_bytes_per_token: f64,
    /// Layers (the transfer streams one layer at a time).
    pub layers: u32,
    /// The fits' errors.
    pub errors: FitErrors,
}

/// The smallest time any step takes (a fit can dip below zero at its edges).
const MIN_STEP_S: f64 = 1e-6;

impl ServiceModel {
    /// Checks the numbers: finite, a positive chunk and layer count, a non-negative
    /// latency and a positive bandwidth, a prefill and a decode step that take time.
    ///
    /// # Errors
    /// [`PlanError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        let finite = |field: &'static str, v: &[f64]| {
            if v.iter().all(|x| x.is_finite()) {
                Ok(())
            } else {
                Err(PlanError::invalid(field, format!("{v:?} is not finite")))
            }
        };
        finite("prefill", &self.prefill)?;
        finite("decode", &self.decode)?;
        finite("transfer_latency_s", &[self.transfer_latency_s])?;
        finite("kv_bytes_per_token", &[self.kv_bytes_per_token])?;
        if self.chunk == 0 {
            return Err(PlanError::invalid("chunk", "must be at least 1 token"));
        }
        if self.layers == 0 {
            return Err(PlanError::invalid("layers", "must be at least 1"));
        }
        if self.transfer_latency_s < 0.0 || self.kv_bytes_per_token < 0.0 {
            return Err(PlanError::invalid(
                "transfer_latency_s",
                "latency and bytes per token cannot be negative",
            ));
        }
        if self.transfer_bytes_per_s.is_nan() || self.transfer_bytes_per_s <= 0.0 {
            return Err(PlanError::invalid(
                "transfer_bytes_per_s",
                format!("{} is not a bandwidth > 0", self.transfer_bytes_per_s),
            ));
        }
        if self.prefill_time(self.chunk) <= MIN_STEP_S {
            return Err(PlanError::invalid(
                "prefill",
                "the fit gives no time for a chunk: not a prefill profile",
            ));
        }
        if self.decode_step(1, 1.0) <= MIN_STEP_S {
            return Err(PlanError::invalid(
                "decode",
                "the fit gives no time for a step of one sequence: not a decode profile",
            ));
        }
        Ok(())
    }

    /// The model with every prefill time × `prefill` and decode step × `decode`
    /// (the advisor's calibration from observed latencies).
    pub fn calibrated(&self, prefill: f64, decode: f64) -> ServiceModel {
        let mut m = self.clone();
        m.prefill.iter_mut().for_each(|c| *c *= prefill);
        m.decode.iter_mut().for_each(|c| *c *= decode);
        m
    }

    fn t(&self, l: u32) -> f64 {
        let l = f64::from(l);
        let [a, b, c] = self.prefill;
        a + b * l + c * l * l
    }

    /// A whole prefill of `tokens` uncached tokens.
    pub fn prefill_time(&self, tokens: u32) -> f64 {
        self.t(tokens).max(MIN_STEP_S)
    }

    /// A model for examples and tests, shaped like SmolLM2-135M's profile but ten times
    /// faster at prefill (~0.4 ms/token; a decode step ~12 ms + 1 ms per sequence),
    /// with exact fits.
    pub fn example() -> ServiceModel {
        ServiceModel {
            prefill: [0.004, 0.0004, 2e-8],
            chunk: 512,
            decode: [0.012, 0.001, 1e-6, 2e-7],
            transfer_latency_s: 0.001,
            transfer_bytes_per_s: 2e9,
            kv_bytes_per_token: 23_040.0,
            layers: 30,
            errors: FitErrors::default(),
        }
    }

    /// The chunk covering prompt tokens `from..to` (the first chunk pays the fixed cost).
    pub fn chunk_time(&self, from: u32, to: u32) -> f64 {
        let start = if from == 0 { 0.0 } else { self.t(from) };
        (self.t(to) - start).max(MIN_STEP_S)
    }

    /// One decode step of `batch` sequences whose contexts add up to `context_sum`.
    pub fn decode_step(&self, batch: u32, context_sum: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let n = f64::from(batch);
        let [c0, c1, c2, c3] = self.decode;
        (c0 + c1 * n + c2 * context_sum / n + c3 * context_sum).max(MIN_STEP_S)
    }

    /// The whole KV transfer of `tokens` tokens, had nothing overlapped it.
    pub fn transfer_time(&self, tokens: u32) -> f64 {
        self.transfer_latency_s
            + f64::from(tokens) * self.kv_bytes_per_token / self.transfer_bytes_per_s
    }

    /// What of the transfer shows after a prefill of `prefill_s` ends: the layer-wise
    /// stream hides all but the last layer's share, unless the link is slower than the
    /// prefill.
    pub fn transfer_exposed(&self, tokens: u32, prefill_s: f64) -> f64 {
        let wire = f64::from(tokens) * self.kv_bytes_per_token / self.transfer_bytes_per_s;
        self.transfer_latency_s + (wire / f64::from(self.layers)).max(wire - prefill_s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn model() -> ServiceModel {
        ServiceModel::example()
    }

    #[test]
    fn chunks_add_up_to_the_whole_prefill() {
        let m = model();
        let whole = m.prefill_time(1500);
        let parts = m.chunk_time(0, 512) + m.chunk_time(512, 1024) + m.chunk_time(1024, 1500);
        assert!((whole - parts).abs() < 1e-12, "{whole} vs {parts}");
        assert!(m.chunk_time(1024, 1500) > m.chunk_time(0, 476) - m.prefill[0]);
    }

    #[test]
    fn steps_grow_with_batch_and_context_and_transfers_hide_behind_prefill() {
        let m = model();
        assert!(m.decode_step(8, 8.0 * 500.0) > m.decode_step(1, 500.0));
        assert!(m.decode_step(8, 8.0 * 2000.0) > m.decode_step(8, 8.0 * 500.0));
        assert_eq!(m.decode_step(0, 0.0), 0.0);
        let wire = m.transfer_time(1000) - m.transfer_latency_s;
        let hidden = m.transfer_exposed(1000, 10.0);
        assert!((hidden - (m.transfer_latency_s + wire / 30.0)).abs() < 1e-12);
        let slow = ServiceModel {
            transfer_bytes_per_s: 1e6,
            ..model()
        };
        let exposed = slow.transfer_exposed(1000, 0.5);
        assert!((exposed - (slow.transfer_time(1000) - 0.5)).abs() < 1e-9);
        let c = m.calibrated(2.0, 0.5);
        assert!((c.prefill_time(100) - 2.0 * m.prefill_time(100)).abs() < 1e-12);
        assert!((c.decode_step(4, 400.0) - 0.5 * m.decode_step(4, 400.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_models_are_named() {
        let field = |m: ServiceModel| match m.validate() {
            Err(PlanError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(model().validate().is_ok());
        assert_eq!(
            field(ServiceModel {
                chunk: 0,
                ..model()
            }),
            "chunk"
        );
        assert_eq!(
            field(ServiceModel {
                prefill: [f64::NAN, 0.0, 0.0],
                ..model()
            }),
            "prefill"
        );
        assert_eq!(
            field(ServiceModel {
                prefill: [0.0, 0.0, 0.0],
                ..model()
            }),
            "prefill"
        );
        assert_eq!(
            field(ServiceModel {
                decode: [-1.0, 0.0, 0.0, 0.0],
                ..model()
            }),
            "decode"
        );
        assert_eq!(
            field(ServiceModel {
                transfer_bytes_per_s: 0.0,
                ..model()
            }),
            "transfer_bytes_per_s"
        );
    }
}
