//! Simple models for performance profiles (e.g. step time against batch size and context
//! length): least-squares polynomials and bilinear surfaces, and interpolating
//! piecewise-linear curves, each reported with its error over the points it was fitted to.
//!
//! The least-squares fits minimise the *relative* error (each point weighted by `1 / y`):
//! timings span orders of magnitude (a 64-token prefill against a 2,048-token one), and
//! an absolute fit lets the few large points decide, leaving the small ones — the
//! short prompts most traffic has — off by their whole size, or negative.

use serde::{Deserialize, Serialize};

/// A fitted model of `y` against one input (or two, for [`Model::Bilinear`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Model {
    /// y = c0 + c1 x + c2 x² ...
    Polynomial {
        /// Coefficients by ascending power.
        coeffs: Vec<f64>,
    },
    /// Linear interpolation between knots, linear extrapolation beyond the ends.
    PiecewiseLinear {
        /// `(x, y)` sorted by distinct `x`.
        knots: Vec<(f64, f64)>,
    },
    /// y = c0 + c1 x1 + c2 x2 + c3 x1 x2 (for two inputs, e.g. batch size and context
    /// length).
    Bilinear {
        /// `[c0, c1, c2, c3]`.
        coeffs: [f64; 4],
    },
}

impl Model {
    /// `y` at `x`; a bilinear model is evaluated at `x2 = 0`. NaN for a piecewise model
    /// without knots.
    pub fn eval(&self, x: f64) -> f64 {
        match self {
            Model::Polynomial { coeffs } => coeffs.iter().rev().fold(0.0, |acc, &c| acc * x + c),
            Model::PiecewiseLinear { knots } => match knots.as_slice() {
                [] => f64::NAN,
                [(_, y)] => *y,
                _ => {
                    let i = knots
                        .partition_point(|k| k.0 <= x)
                        .clamp(1, knots.len() - 1);
                    let ((x0, y0), (x1, y1)) = (knots[i - 1], knots[i]);
                    y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                }
            },
            Model::Bilinear { .. } => self.eval2(x, 0.0),
        }
    }

    /// `y` at `(x1, x2)`; models of one input ignore `x2`.
    pub fn eval2(&self, x1: f64, x2: f64) -> f64 {
        match self {
            Model::Bilinear {
                coeffs: [c0, c1, c2, c3],
            } => c0 + c1 * x1 + c2 * x2 + c3 * x1 * x2,
            _ => self.eval(x1),
        }
    }
}

/// How well a model matches the points it was fitted to. Relative errors are
/// |prediction − y| / |y| (infinite where y = 0 but the prediction is not); non-finite
/// fields serialize as `null`, which deserializes as NaN.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct FitError {
    /// Coefficient of determination, 1 − SS_res / SS_tot. For (nearly) constant `y` it is
    /// 1 if the model matches to rounding error, else 0.
    #[serde(with = "crate::nullable")]
    pub r2: f64,
    /// Mean relative error.
    #[serde(with = "crate::nullable")]
    pub mean_abs_rel: f64,
    /// Largest relative error.
    #[serde(with = "crate::nullable")]
    pub max_abs_rel: f64,
}

/// Why a model could not be fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FitFailure {
    /// The input slices differ in length.
    #[error("input slices differ in length")]
    LengthMismatch,
    /// Fewer points than the model has parameters.
    #[error("need at least {needed} points, got {got}")]
    TooFewPoints {
        /// Points the model needs.
        needed: usize,
        /// Points given.
        got: usize,
    },
    /// An input is NaN or infinite.
    #[error("inputs must be finite")]
    NonFinite,
    /// The points do not determine the model (e.g. fewer distinct x than coefficients).
    #[error("the points do not determine the model (singular system)")]
    Singular,
}

/// Least-squares polynomial of `degree` through `(xs, ys)`. `x` is mapped onto [-1, 1]
/// for the solve, which keeps the normal equations well conditioned, and the result is
/// expressed in powers of the original `x`.
///
/// # Errors
/// [`FitFailure`] for mismatched lengths, non-finite inputs, fewer than `degree + 1`
/// points, or fewer than `degree + 1` distinct `x`.
pub fn fit_polynomial(
    xs: &[f64],
    ys: &[f64],
    degree: usize,
) -> Result<(Model, FitError), FitFailure> {
    check(&[xs], ys, degree.saturating_add(1))?;
    let (m, s) = unit_scale(xs);
    let rows: Vec<Vec<f64>> = xs
        .iter()
        .map(|&x| {
            let u = (x - m) / s;
            std::iter::successors(Some(1.0), |p| Some(p * u))
                .take(degree + 1)
                .collect()
        })
        .collect();
    let a = least_squares(&rows, ys)?;
    // Σ a_k u^k with u = (x - m) / s, in powers of x by Horner's rule on polynomials.
    let (p, q) = (1.0 / s, -m / s);
    let mut coeffs: Vec<f64> = Vec::with_capacity(a.len());
    for &ak in a.iter().rev() {
        let mut next = vec![0.0; coeffs.len() + 1];
        for (j, &c) in coeffs.iter().enumerate() {
            next[j] += c * q;
            next[j + 1] += c * p;
        }
        next[0] += ak;
        coeffs = next;
    }
    let model = Model::Polynomial { coeffs };
    let err = fit_error(ys, xs.iter().map(|&x| model.eval(x)));
    Ok((model, err))
}

/// Piecewise-linear model with a knot at each distinct `x`, at the mean of its `y`s. It
/// interpolates the knots; the error is still reported over the raw points.
///
/// # Errors
/// [`FitFailure`] for mismatched lengths, non-finite inputs or no points.
pub fn fit_piecewise(xs: &[f64], ys: &[f64]) -> Result<(Model, FitError), FitFailure> {
    check(&[xs], ys, 1)?;
    let mut pts: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let knots = pts
        .chunk_by(|a, b| a.0 == b.0)
        .map(|g| (g[0].0, g.iter().map(|p| p.1).sum::<f64>() / g.len() as f64))
        .collect();
    let model = Model::PiecewiseLinear { knots };
    let err = fit_error(ys, xs.iter().map(|&x| model.eval(x)));
    Ok((model, err))
}

/// Least-squares bilinear model `y = c0 + c1 x1 + c2 x2 + c3 x1 x2`, solved with both
/// inputs mapped onto [-1, 1].
///
/// # Errors
/// [`FitFailure`] for mismatched lengths, non-finite inputs, fewer than 4 points, or
/// points that do not determine the surface (e.g. a constant input).
pub fn fit_bilinear(x1: &[f64], x2: &[f64], ys: &[f64]) -> Result<(Model, FitError), FitFailure> {
    check(&[x1, x2], ys, 4)?;
    let ((m1, s1), (m2, s2)) = (unit_scale(x1), unit_scale(x2));
    let rows: Vec<[f64; 4]> = x1
        .iter()
        .zip(x2)
        .map(|(&a, &b)| {
            let (u, v) = ((a - m1) / s1, (b - m2) / s2);
            [1.0, u, v, u * v]
        })
        .collect();
    let a = least_squares(&rows, ys)?;
    // a0 + a1 u + a2 v + a3 u v with u = (x1 - m1) / s1, v = (x2 - m2) / s2, expanded.
    let d = a[3] / (s1 * s2);
    let coeffs = [
        a[0] - a[1] * m1 / s1 - a[2] * m2 / s2 + d * m1 * m2,
        a[1] / s1 - d * m2,
        a[2] / s2 - d * m1,
        d,
    ];
    let model = Model::Bilinear { coeffs };
    let err = fit_error(ys, x1.iter().zip(x2).map(|(&a, &b)| model.eval2(a, b)));
    Ok((model, err))
}

/// Validates the inputs of a fit needing `needed` points.
fn check(inputs: &[&[f64]], ys: &[f64], needed: usize) -> Result<(), FitFailure> {
    if inputs.iter().any(|x| x.len() != ys.len()) {
        return Err(FitFailure::LengthMismatch);
    }
    if ys.len() < needed {
        return Err(FitFailure::TooFewPoints {
            needed,
            got: ys.len(),
        });
    }
    if inputs
        .iter()
        .chain([&ys])
        .flat_map(|v| v.iter())
        .any(|v| !v.is_finite())
    {
        return Err(FitFailure::NonFinite);
    }
    Ok(())
}

/// `(centre, half-width)` mapping `xs` onto [-1, 1]; half-width 1 for constant `xs`.
fn unit_scale(xs: &[f64]) -> (f64, f64) {
    let (lo, hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let half = (hi - lo) / 2.0;
    (lo + half, if half > 0.0 { half } else { 1.0 })
}

/// Least-squares coefficients for design `rows` (at least one, all of one length) and
/// targets `ys` that minimise the relative error: each point is weighted by
/// `1 / max(|y|, 1e-3 · max |y|)` (the floor keeps a zero `y` finite), via the normal
/// equations.
fn least_squares<R: AsRef<[f64]>>(rows: &[R], ys: &[f64]) -> Result<Vec<f64>, FitFailure> {
    let k = rows.first().map_or(0, |r| r.as_ref().len());
    let largest = ys.iter().fold(0.0f64, |m, y| m.max(y.abs()));
    let floor = if largest > 0.0 { 1e-3 * largest } else { 1.0 };
    // The augmented matrix [XᵀWX | XᵀWy], W = diag(w²).
    let mut a = vec![vec![0.0; k + 1]; k];
    for (row, &y) in rows.iter().zip(ys) {
        let row = row.as_ref();
        let w = 1.0 / y.abs().max(floor);
        let w2 = w * w;
        for (ai, &ri) in a.iter_mut().zip(row) {
            for (aij, &rj) in ai.iter_mut().zip(row) {
                *aij += w2 * ri * rj;
            }
            ai[k] += w2 * ri * y;
        }
    }
    solve(a)
}

/// Solves the `k × (k + 1)` augmented system by Gaussian elimination with partial
/// pivoting; a pivot below 1e-12 of the largest entry means singular.
fn solve(mut a: Vec<Vec<f64>>) -> Result<Vec<f64>, FitFailure> {
    let k = a.len();
    let tiny = 1e-12
        * a.iter()
            .flat_map(|r| &r[..k])
            .fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        let pv = a[pivot][col].abs();
        if pv <= tiny || pv.is_nan() {
            return Err(FitFailure::Singular);
        }
        a.swap(col, pivot);
        let (top, bottom) = a.split_at_mut(col + 1);
        let p = &top[col];
        for row in bottom {
            let f = row[col] / p[col];
            for (x, &pv) in row[col..].iter_mut().zip(&p[col..]) {
                *x -= f * pv;
            }
        }
    }
    let mut x = vec![0.0; k];
    for i in (0..k).rev() {
        let s: f64 = (i + 1..k).map(|j| a[i][j] * x[j]).sum();
        x[i] = (a[i][k] - s) / a[i][i];
    }
    Ok(x)
}

/// Error of `preds` against `ys` (non-empty).
fn fit_error(ys: &[f64], preds: impl Iterator<Item = f64>) -> FitError {
    let n = ys.len() as f64;
    let mean = ys.iter().sum::<f64>() / n;
    let sum_sq: f64 = ys.iter().map(|y| y * y).sum();
    let (mut ss_res, mut ss_tot, mut sum_rel, mut max_rel) = (0.0, 0.0, 0.0, 0.0f64);
    for (&y, p) in ys.iter().zip(preds) {
        let d = p - y;
        ss_res += d * d;
        ss_tot += (y - mean) * (y - mean);
        let rel = if d == 0.0 { 0.0 } else { d.abs() / y.abs() };
        sum_rel += rel;
        max_rel = max_rel.max(rel);
    }
    let negligible = f64::EPSILON * sum_sq;
    let r2 = if ss_tot > negligible {
        1.0 - ss_res / ss_tot
    } else if ss_res <= negligible {
        1.0
    } else {
        0.0
    };
    FitError {
        r2,
        mean_abs_rel: sum_rel / n,
        max_abs_rel: max_rel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    /// Deterministic noise in [-1, 1].
    fn noise(i: usize) -> f64 {
        (i as f64 * 12.9898).sin()
    }

    #[test]
    fn recovers_polynomials_exactly() {
        let truth = [2.0, -3.0, 0.5, 0.01];
        for degree in 0..=3 {
            let c = &truth[..=degree];
            let xs: Vec<f64> = (0..12).map(|i| i as f64 * 1.7 - 4.0).collect();
            let ys: Vec<f64> = xs
                .iter()
                .map(|&x| Model::Polynomial { coeffs: c.to_vec() }.eval(x))
                .collect();
            let (model, err) = fit_polynomial(&xs, &ys, degree).unwrap();
            let Model::Polynomial { coeffs } = &model else {
                panic!("{model:?}")
            };
            assert_eq!(coeffs.len(), degree + 1);
            for (got, want) in coeffs.iter().zip(c) {
                assert!(close(*got, *want, 1e-9), "degree {degree}: {coeffs:?}");
            }
            assert!(err.r2 > 1.0 - 1e-12 && err.max_abs_rel < 1e-9, "{err:?}");
        }
    }

    #[test]
    fn scaling_handles_large_offset_inputs() {
        // Context lengths around 30k: x³ ~ 3e13 would swamp unscaled normal equations.
        let xs: Vec<f64> = (0..20).map(|i| 30_000.0 + 100.0 * i as f64).collect();
        let f = |x: f64| 0.02 + 1e-6 * x + 3e-11 * x * x;
        let ys: Vec<f64> = xs.iter().map(|&x| f(x)).collect();
        let (model, err) = fit_polynomial(&xs, &ys, 2).unwrap();
        assert!(err.max_abs_rel < 1e-8, "{err:?}");
        assert!(close(model.eval(31_050.0), f(31_050.0), 1e-8));
    }

    #[test]
    fn noisy_line_fits_well_but_not_perfectly() {
        let xs: Vec<f64> = (1..=50).map(f64::from).collect();
        let ys: Vec<f64> = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| 5.0 + 2.0 * x + noise(i))
            .collect();
        let (model, err) = fit_polynomial(&xs, &ys, 1).unwrap();
        assert!(err.r2 > 0.99 && err.r2 < 1.0, "{err:?}");
        assert!(err.mean_abs_rel > 0.0 && err.max_abs_rel >= err.mean_abs_rel);
        let Model::Polynomial { coeffs } = model else {
            panic!()
        };
        assert!((coeffs[1] - 2.0).abs() < 0.05, "{coeffs:?}");
    }

    #[test]
    fn fits_minimise_relative_error_so_short_prompts_keep_their_time() {
        // Prefill times of a profile (1 thread, chunk 256; the 1,024-token point noisy):
        // the absolute fit gave an intercept of −0.59 s and the 64-token prompt no time.
        let xs = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
        let ys = [0.234, 0.5089, 1.303, 2.7456, 9.4337, 21.5493];
        let (model, err) = fit_polynomial(&xs, &ys, 2).unwrap();
        for (&x, &y) in xs.iter().zip(&ys) {
            let rel = (model.eval(x) - y).abs() / y;
            assert!(
                rel < 0.25,
                "{x} tokens: {} s for {y} s ({model:?})",
                model.eval(x)
            );
        }
        assert!(err.mean_abs_rel < 0.15, "{err:?}");
    }

    #[test]
    fn polynomial_errors() {
        assert_eq!(
            fit_polynomial(&[1.0, 2.0], &[1.0, 2.0], 2),
            Err(FitFailure::TooFewPoints { needed: 3, got: 2 })
        );
        assert_eq!(
            fit_polynomial(&[1.0, 1.0, 2.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 2),
            Err(FitFailure::Singular)
        );
        assert_eq!(
            fit_polynomial(&[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 1),
            Err(FitFailure::Singular)
        );
        assert_eq!(
            fit_polynomial(&[1.0, 2.0], &[1.0], 0),
            Err(FitFailure::LengthMismatch)
        );
        assert_eq!(
            fit_polynomial(&[1.0, f64::NAN], &[1.0, 2.0], 0),
            Err(FitFailure::NonFinite)
        );
        assert_eq!(
            fit_polynomial(&[], &[], usize::MAX),
            Err(FitFailure::TooFewPoints {
                needed: usize::MAX,
                got: 0
            })
        );
    }

    #[test]
    fn constant_data_is_a_perfect_constant_fit() {
        let (model, err) = fit_polynomial(&[1.0, 2.0, 3.0], &[4.0; 3], 0).unwrap();
        assert_eq!(model.eval(10.0), 4.0);
        assert_eq!(err.r2, 1.0);
    }

    #[test]
    fn piecewise_averages_duplicates_and_extrapolates() {
        let xs = [4.0, 1.0, 2.0, 2.0];
        let ys = [7.0, 1.0, 2.0, 4.0];
        let (model, err) = fit_piecewise(&xs, &ys).unwrap();
        assert_eq!(
            model,
            Model::PiecewiseLinear {
                knots: vec![(1.0, 1.0), (2.0, 3.0), (4.0, 7.0)]
            }
        );
        assert_eq!(model.eval(1.5), 2.0);
        assert_eq!(model.eval(3.0), 5.0);
        assert_eq!(model.eval(0.0), -1.0);
        assert_eq!(model.eval(6.0), 11.0);
        // The duplicates at x = 2 miss by 1 each: 1/2 and 1/4.
        assert_eq!((err.max_abs_rel, err.mean_abs_rel), (0.5, 0.75 / 4.0));
        assert!(err.r2 < 1.0);
        let (one, _) = fit_piecewise(&[3.0], &[9.0]).unwrap();
        assert_eq!(one.eval(-100.0), 9.0);
        assert_eq!(
            fit_piecewise(&[], &[]),
            Err(FitFailure::TooFewPoints { needed: 1, got: 0 })
        );
        assert!(Model::PiecewiseLinear { knots: vec![] }.eval(1.0).is_nan());
    }

    #[test]
    fn recovers_bilinear_surface() {
        let c = [0.003, 1.5e-4, 2e-6, 4e-9];
        let truth = Model::Bilinear { coeffs: c };
        let (mut b, mut ctx, mut ys) = (vec![], vec![], vec![]);
        for batch in [1.0, 8.0, 32.0, 128.0] {
            for context in [512.0, 2048.0, 8192.0] {
                b.push(batch);
                ctx.push(context);
                ys.push(truth.eval2(batch, context));
            }
        }
        let (model, err) = fit_bilinear(&b, &ctx, &ys).unwrap();
        let Model::Bilinear { coeffs } = model else {
            panic!()
        };
        for (got, want) in coeffs.iter().zip(c) {
            assert!((got - want).abs() <= 1e-9 * want.abs(), "{coeffs:?}");
        }
        assert!(err.max_abs_rel < 1e-9);
        assert_eq!(
            fit_bilinear(&b[..3], &ctx[..3], &ys[..3]),
            Err(FitFailure::TooFewPoints { needed: 4, got: 3 })
        );
        let constant = vec![2.0; b.len()];
        assert_eq!(fit_bilinear(&b, &constant, &ys), Err(FitFailure::Singular));
        assert_eq!(
            fit_bilinear(&b, &ctx[1..], &ys),
            Err(FitFailure::LengthMismatch)
        );
    }

    #[test]
    fn eval_dispatch() {
        let bi = Model::Bilinear {
            coeffs: [1.0, 2.0, 3.0, 4.0],
        };
        assert_eq!(bi.eval2(2.0, 3.0), 1.0 + 4.0 + 9.0 + 24.0);
        assert_eq!(bi.eval(2.0), 5.0);
        let poly = Model::Polynomial {
            coeffs: vec![1.0, 1.0],
        };
        assert_eq!(poly.eval2(2.0, 100.0), 3.0);
    }

    #[test]
    fn serde_is_tagged() {
        let m = Model::Polynomial {
            coeffs: vec![1.0, 2.0],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"kind":"polynomial","coeffs":[1.0,2.0]}"#);
        let pw: Model =
            serde_json::from_str(r#"{"kind":"piecewise_linear","knots":[[0,0],[1,2]]}"#).unwrap();
        assert_eq!(pw.eval(0.5), 1.0);
        let e = FitError {
            r2: 1.0,
            mean_abs_rel: f64::INFINITY,
            max_abs_rel: f64::INFINITY,
        };
        let back: FitError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert!(back.r2 == 1.0 && back.max_abs_rel.is_nan());
    }
}
