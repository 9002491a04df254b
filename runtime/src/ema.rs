//! Exponential moving average, for TTFT / TPOT / prefill-time estimates (workers report
//! them; the coordinator's router ranks workers by them).

/// Exponential moving average: `value = alpha * x + (1 - alpha) * value`, seeded by the
/// first observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ema {
    alpha: f64,
    value: Option<f64>,
}

impl Ema {
    /// New average with smoothing factor `alpha` (weight of the newest sample). `alpha` is
    /// clamped into `0.0..=1.0`; NaN becomes 1.0 (track the last sample).
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha.is_nan() {
            1.0
        } else {
            alpha.clamp(0.0, 1.0)
        };
        Ema { alpha, value: None }
    }

    /// Folds in one sample. Non-finite samples are ignored, since they come from peers.
    pub fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => self.alpha * x + (1.0 - self.alpha) * v,
        });
    }

    /// Current average, or 0 when nothing was observed (the router's "unknown").
    pub fn get(&self) -> f64 {
        self.value.unwrap_or(0.0)
    }

    /// Current average, `None` before the first observation.
    pub fn value(&self) -> Option<f64> {
        self.value
    }

    /// The (clamped) smoothing factor.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_with_first_sample_then_smooths() {
        let mut e = Ema::new(0.25);
        assert_eq!(e.get(), 0.0);
        assert_eq!(e.value(), None);
        e.observe(100.0);
        assert_eq!(e.get(), 100.0);
        e.observe(200.0);
        assert!((e.get() - 125.0).abs() < 1e-9, "{}", e.get());
        e.observe(200.0);
        assert!((e.get() - 143.75).abs() < 1e-9, "{}", e.get());
    }

    #[test]
    fn ignores_non_finite_and_clamps_alpha() {
        let mut e = Ema::new(5.0);
        assert_eq!(e.alpha(), 1.0);
        e.observe(10.0);
        e.observe(f64::NAN);
        e.observe(f64::INFINITY);
        assert_eq!(e.get(), 10.0);
        e.observe(20.0);
        assert_eq!(e.get(), 20.0, "alpha 1 tracks the last sample");
        assert_eq!(Ema::new(f64::NAN).alpha(), 1.0);
        assert_eq!(Ema::new(-1.0).alpha(), 0.0);
    }
}
