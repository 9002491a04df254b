//! The f32 inner loops of attention over one cached K or V row: every query head's score
//! against it, and every head's weighted accumulation of it.
//!
//! Dot products run in eight lanes (`fma` per lane over the head's values in chunks of
//! eight, then a fixed pairwise sum of the lanes); accumulations are one `fma` per value.
//! The portable code performs the same operations in the same order as the AVX2 code, so
//! both give the same bits. Head dimensions that are not a multiple of 8 use a plain
//! sequential loop on every level.

use super::Level;

const LANES: usize = 8;

/// `out[h] = scale · (q_h · k_{h / group})` for every query head `h` (`q`: heads × `hd`,
/// `k`: KV heads × `hd`).
///
/// # Panics
/// When the slices disagree with `hd`, `group` and `out.len()`.
pub fn head_scores(
    level: Level,
    q: &[f32],
    k: &[f32],
    hd: usize,
    group: usize,
    scale: f32,
    out: &mut [f32],
) {
    let heads = out.len();
    assert!(q.len() >= heads * hd && k.len() >= heads.div_ceil(group) * hd);
    for (h, o) in out.iter_mut().enumerate() {
        let (qh, kh) = (
            &q[h * hd..(h + 1) * hd],
            &k[(h / group) * hd..(h / group + 1) * hd],
        );
        *o = dot(level, qh, kh) * scale;
    }
}

/// `out_h += p[h] · v_{h / group}` for every query head `h` (`out`: heads × `hd`).
///
/// # Panics
/// When the slices disagree with `hd`, `group` and `p.len()`.
pub fn head_accumulate(
    level: Level,
    p: &[f32],
    v: &[f32],
    hd: usize,
    group: usize,
    out: &mut [f32],
) {
    let heads = p.len();
    assert!(out.len() >= heads * hd && v.len() >= heads.div_ceil(group) * hd);
    for (h, w) in p.iter().enumerate() {
        let vh = &v[(h / group) * hd..(h / group + 1) * hd];
        axpy(level, *w, vh, &mut out[h * hd..(h + 1) * hd]);
    }
}

/// Dot product of two equal-length slices.
fn dot(level: Level, a: &[f32], b: &[f32]) -> f32 {
    if !a.len().is_multiple_of(LANES) {
        return a.iter().zip(b).fold(0.0, |s, (x, y)| x.mul_add(*y, s));
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every level but Scalar has avx2 and fma (`super::level`); the lengths
        // are equal multiples of 8 (checked by the callers' slicing and above).
        Level::Avx2 | Level::Avx512Vnni => unsafe { x86::dot(a, b) },
        _ => dot_portable(a, b),
    }
}

/// `y += alpha · x`, one fused multiply-add per value.
fn axpy(level: Level, alpha: f32, x: &[f32], y: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every level but Scalar has avx2 and fma (`super::level`).
        Level::Avx2 | Level::Avx512Vnni if x.len().is_multiple_of(LANES) => unsafe {
            x86::axpy(alpha, x, y)
        },
        _ => y
            .iter_mut()
            .zip(x)
            .for_each(|(yi, xi)| *yi = alpha.mul_add(*xi, *yi)),
    }
}

/// Eight lane sums, then `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, as the AVX2 code does.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let s: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have avx2 and fma; `a` and `b` are equal multiples of 8 long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(LANES) {
            // SAFETY: `i + 8 <= len` of both.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                )
            };
            acc = _mm256_fmadd_ps(x, y, acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// # Safety
    /// The CPU must have avx2 and fma; `x` is a multiple of 8 long and `y` at least as
    /// long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        assert!(y.len() >= x.len());
        let a = _mm256_set1_ps(alpha);
        for i in (0..x.len()).step_by(LANES) {
            // SAFETY: `i + 8 <= x.len() <= y.len()`.
            unsafe {
                let yp = y.as_mut_ptr().add(i);
                let r = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
                _mm256_storeu_ps(yp, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_gives_the_same_bits() {
        let (hd, heads, group) = (64, 9, 3);
        let q: Vec<f32> = (0..heads * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..3 * hd).map(|i| (i as f32 * 0.11).cos()).collect();
        let level = super::super::level();
        let (mut a, mut b) = (vec![0f32; heads], vec![0f32; heads]);
        head_scores(Level::Scalar, &q, &k, hd, group, 0.125, &mut a);
        head_scores(level, &q, &k, hd, group, 0.125, &mut b);
        assert_eq!(a, b);
        let naive: f32 = q[..hd].iter().zip(&k[..hd]).map(|(x, y)| x * y).sum();
        assert!((a[0] - naive * 0.125).abs() < 1e-5);
        let (mut y1, mut y2) = (q.clone(), q.clone());
        head_accumulate(Level::Scalar, &a, &k, hd, group, &mut y1);
        head_accumulate(level, &a, &k, hd, group, &mut y2);
        assert_eq!(y1, y2);
        assert!((y1[5] - (q[5] + a[0] * k[5])).abs() < 1e-6);
        // A head dimension that is not a multiple of 8: the sequential loop everywhere.
        let mut c = vec![0f32; 2];
        head_scores(level, &q[..20], &k[..10], 10, 2, 1.0, &mut c);
        let want: f32 = q[..10]
            .iter()
            .zip(&k[..10])
            .fold(0.0, |s, (x, y)| x.mul_add(*y, s));
        assert_eq!(c[0], want);
    }
}
