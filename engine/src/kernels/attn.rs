//! The f32 inner loops of attention over a tile of cached K or V rows: one query head's
//! scores against them, and its weighted accumulation of them.
//!
//! Dot products run in eight lanes (`fma` per lane over the head's values in chunks of
//! eight, then a fixed pairwise sum of the lanes); accumulations are one `fma` per value.
//! The portable code performs the same operations in the same order as the AVX2 code, so
//! both give the same bits. Head dimensions that are not a multiple of 8 use a plain
//! sequential loop on every level.
//!
//! [`rows_scores`] and [`rows_accumulate`] take a whole tile at once: eight rows' dot
//! products interleaved (eight independent chains instead of one) and reduced together
//! by a transpose that adds the lanes in the single-row order, and the accumulator held
//! in registers across the tile. Each output is bit for bit what the one-row reference
//! (`head_scores`, `head_accumulate`, kept for the tests) gives.

use super::Level;

const LANES: usize = 8;

/// `out[h] = scale · (q_h · k_{h / group})` for every query head `h` (`q`: heads × `hd`,
/// `k`: KV heads × `hd`).
///
/// The one-row reference the tile kernels are tested against.
///
/// # Panics
/// When the slices disagree with `hd`, `group` and `out.len()`.
#[cfg(test)]
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
/// The one-row reference the tile kernels are tested against.
///
/// # Panics
/// When the slices disagree with `hd`, `group` and `p.len()`.
#[cfg(test)]
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

/// `out[j] = scale · (q · rows[j][off..off + q.len()])` for every row: for each row the
/// same bits as [`head_scores`].
///
/// # Panics
/// When a row is shorter than `off + q.len()` or `out` shorter than `rows`.
pub fn rows_scores(
    level: Level,
    q: &[f32],
    rows: &[&[f32]],
    off: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let out = &mut out[..rows.len()];
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level != Level::Scalar && hd.is_multiple_of(LANES) {
        for (rs, os) in rows.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
            let r: [&[f32]; LANES] = std::array::from_fn(|i| &rs[i][off..off + hd]);
            // SAFETY: every level but Scalar has avx2 and fma (`super::level`); each row
            // slice is `hd` long, a multiple of 8, and `os` is 8 long.
            unsafe { x86::dot8(q, &r, scale, os) };
            done += LANES;
        }
    }
    for (r, o) in rows[done..].iter().zip(&mut out[done..]) {
        *o = dot(level, q, &r[off..off + hd]) * scale;
    }
}

/// `out *= rescale`, then `out += p[j] · rows[j][off..off + out.len()]` for every row in
/// order: for each value the same bits as scaling it and calling [`head_accumulate`] once
/// per row.
///
/// # Panics
/// When a row is shorter than `off + out.len()` or `p` shorter than `rows`.
pub fn rows_accumulate(
    level: Level,
    p: &[f32],
    rows: &[&[f32]],
    off: usize,
    rescale: f32,
    out: &mut [f32],
) {
    let hd = out.len();
    let p = &p[..rows.len()];
    assert!(rows.iter().all(|r| r.len() >= off + hd));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every level but Scalar has avx2 and fma (`super::level`); every row
        // holds `off + hd` values (asserted), `hd` a multiple of 8, and `p` is as long as
        // `rows`.
        Level::Avx2 | Level::Avx512Vnni if hd.is_multiple_of(LANES) => unsafe {
            x86::accumulate(p, rows, off, rescale, out)
        },
        _ => {
            out.iter_mut().for_each(|o| *o *= rescale);
            for (w, r) in p.iter().zip(rows) {
                axpy(level, *w, &r[off..off + hd], out);
            }
        }
    }
}

/// Most query heads one grouped kernel call scores or accumulates at once (their
/// accumulators fill the 32 vector registers of AVX-512).
#[cfg(target_arch = "x86_64")]
const GROUP_CHUNK: usize = 3;

/// [`rows_scores`] for the `out.len() / stride` query heads that share one KV head (`q`:
/// heads × `hd`): `out[h · stride + j] = scale · (q_h · rows[j][off..off + hd])`, for each
/// `(h, j)` the
/// same bits as `rows_scores` gives for head `h` alone. On AVX-512 the heads take turns
/// on each K value loaded (up to [`GROUP_CHUNK`] heads × 8 rows of chains at once).
///
/// # Panics
/// When `out` is not a whole number of strides, `q` not as many heads, `stride <
/// rows.len()`, or a row is shorter than `off + hd`.
pub fn group_scores(
    level: Level,
    q: &[f32],
    rows: &[&[f32]],
    off: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    assert!(stride >= rows.len().max(1) && out.len().is_multiple_of(stride));
    let heads = out.len() / stride;
    assert!(heads > 0 && q.len().is_multiple_of(heads) && !q.is_empty());
    let hd = q.len() / heads;
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512Vnni && hd.is_multiple_of(LANES) {
        assert!(rows.iter().all(|r| r.len() >= off + hd));
        let mut h0 = 0;
        while h0 < heads {
            let g = GROUP_CHUNK.min(heads - h0);
            let (qc, oc) = (&q[h0 * hd..(h0 + g) * hd], &mut out[h0 * stride..]);
            // SAFETY: Avx512Vnni has avx512f, avx512vl, avx2 and fma (`super::level`);
            // `qc` is `g` heads of `hd` (a multiple of 8), every row holds `off + hd`
            // values (asserted), and `oc` `g` strides of at least `rows.len()`.
            unsafe {
                match g {
                    1 => x86::group_scores::<1>(qc, rows, off, scale, oc, stride),
                    2 => x86::group_scores::<2>(qc, rows, off, scale, oc, stride),
                    _ => x86::group_scores::<GROUP_CHUNK>(qc, rows, off, scale, oc, stride),
                }
            }
            h0 += g;
        }
        return;
    }
    for h in 0..heads {
        let qh = &q[h * hd..(h + 1) * hd];
        rows_scores(level, qh, rows, off, scale, &mut out[h * stride..]);
    }
}

/// [`group_scores`] for two queries at once (`q[0]`, `q[1]`: the same heads of two
/// tokens of one sequence) against the same tile, into `out[0]` and `out[1]`; each
/// query's scores are the bits `group_scores` gives it alone. On AVX-512 the two queries
/// share each sixteen-lane register, a K chunk broadcast to both halves.
///
/// # Panics
/// As [`group_scores`] for each query; also when the two differ in length.
pub fn pair_scores(
    level: Level,
    q: [&[f32]; 2],
    rows: &[&[f32]],
    off: usize,
    scale: f32,
    out: [&mut [f32]; 2],
    stride: usize,
) {
    let [qa, qb] = q;
    let [oa, ob] = out;
    assert!(qa.len() == qb.len() && oa.len() == ob.len());
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512Vnni {
        assert!(stride >= rows.len().max(1) && oa.len().is_multiple_of(stride));
        let heads = oa.len() / stride;
        assert!(heads > 0 && qa.len().is_multiple_of(heads) && !qa.is_empty());
        let hd = qa.len() / heads;
        if hd.is_multiple_of(LANES) {
            assert!(rows.iter().all(|r| r.len() >= off + hd));
            let mut h0 = 0;
            while h0 < heads {
                let g = GROUP_CHUNK.min(heads - h0);
                let qs = [&qa[h0 * hd..(h0 + g) * hd], &qb[h0 * hd..(h0 + g) * hd]];
                let os = [
                    oa[h0 * stride..].as_mut_ptr(),
                    ob[h0 * stride..].as_mut_ptr(),
                ];
                // SAFETY: Avx512Vnni has avx512f, avx512vl, avx2 and fma
                // (`super::level`); each of `qs` is `g` heads of `hd` (a multiple of 8),
                // every row holds `off + hd` values (asserted), and each of `os` points
                // at `g` strides of at least `rows.len()` values, the two apart.
                unsafe {
                    match g {
                        1 => x86::pair_scores::<1>(qs, rows, off, scale, os, stride),
                        2 => x86::pair_scores::<2>(qs, rows, off, scale, os, stride),
                        _ => x86::pair_scores::<GROUP_CHUNK>(qs, rows, off, scale, os, stride),
                    }
                }
                h0 += g;
            }
            return;
        }
    }
    group_scores(level, qa, rows, off, scale, oa, stride);
    group_scores(level, qb, rows, off, scale, ob, stride);
}

/// [`rows_accumulate`] for the `rescale.len()` query heads that share one KV head (`out`:
/// heads × `hd`): head `h`'s output `out[h · hd..]` is scaled by `rescale[h]`, then gains
/// `p[h · stride + j] · rows[j][off..off + hd]` for every row in order — for each value the
/// same bits as `rows_accumulate` gives for head `h` alone. On AVX-512 each V value loaded
/// serves every head, sixteen values to a register.
///
/// # Panics
/// When `out` is not as many heads as `rescale`, `p` is short, or a row is shorter than
/// `off + hd`.
pub fn group_accumulate(
    level: Level,
    p: &[f32],
    stride: usize,
    rows: &[&[f32]],
    off: usize,
    rescale: &[f32],
    out: &mut [f32],
) {
    let heads = rescale.len();
    assert!(heads > 0 && out.len().is_multiple_of(heads) && !out.is_empty());
    let hd = out.len() / heads;
    assert!(stride >= rows.len() && p.len() >= (heads - 1) * stride + rows.len());
    assert!(rows.iter().all(|r| r.len() >= off + hd));
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512Vnni && hd.is_multiple_of(2 * LANES) {
        let mut h0 = 0;
        while h0 < heads {
            let g = GROUP_CHUNK.min(heads - h0);
            let (pc, oc) = (&p[h0 * stride..], &mut out[h0 * hd..(h0 + g) * hd]);
            let rc = &rescale[h0..h0 + g];
            // SAFETY: Avx512Vnni has avx512f, avx512vl, avx2 and fma (`super::level`);
            // `oc` is `g` heads of `hd` (a multiple of 16), every row holds `off + hd`
            // values (asserted), `pc` `g − 1` strides plus `rows.len()`.
            unsafe {
                match g {
                    1 => x86::group_accumulate::<1>(pc, stride, rows, off, rc, hd, oc),
                    2 => x86::group_accumulate::<2>(pc, stride, rows, off, rc, hd, oc),
                    _ => x86::group_accumulate::<GROUP_CHUNK>(pc, stride, rows, off, rc, hd, oc),
                }
            }
            h0 += g;
        }
        return;
    }
    for h in 0..heads {
        let ph = &p[h * stride..h * stride + rows.len()];
        rows_accumulate(
            level,
            ph,
            rows,
            off,
            rescale[h],
            &mut out[h * hd..(h + 1) * hd],
        );
    }
}

/// One online-softmax step over a tile of scores: with `m` the larger of `max` and the
/// tile's largest score, every score becomes `exp(s − m)`; returns `(m, exp(max − m),
/// Σ exp(s − m))`. The exponentials are [`exp_neg`] and the sum runs in eight lanes (the
/// tile padded with zeros to a multiple of 8, then `dot`'s reduction), on every level.
pub fn softmax_tile(level: Level, s: &mut [f32], max: f32) -> (f32, f32, f32) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512Vnni has avx512f, avx512vl, avx2 and fma (`super::level`).
        Level::Avx512Vnni => unsafe { x86::softmax_tile16(s, max) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 has avx2 and fma (`super::level`).
        Level::Avx2 => unsafe { x86::softmax_tile8(s, max) },
        _ => {
            let m = s.iter().copied().fold(max, f32::max);
            let mut acc = [0f32; LANES];
            for (i, v) in s.iter_mut().enumerate() {
                *v = exp_neg(*v - m);
                acc[i % LANES] += *v;
            }
            let h: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
            (m, exp_neg(max - m), (h[0] + h[2]) + (h[1] + h[3]))
        }
    }
}

/// `exp(x)` for `x ≤ 0` (softmax's arguments; `−∞` gives 0), the same bits on every
/// level: `x = n·ln 2 + r` with `n` rounded to even and `|r| ≤ ln 2 / 2` (ln 2 in two
/// parts), a degree-7 polynomial in `r` by Horner's rule in `fma`s, times `2ⁿ`. Below
/// −87 (where `2ⁿ` would be subnormal) it gives 0. Within 2 ulp of the exact value.
///
/// Inlined into the kernels so that its `mul_add`s are the CPU's `fma` there (the
/// portable build calls a software `fmaf`, with the same bits).
#[inline]
pub fn exp_neg(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Below this `exp_neg` gives 0 (`exp(−87) ≈ 1.6e−38`, still a normal float).
const EXP_MIN: f32 = -87.0;
/// ln 2 split so that `n · LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Taylor coefficients of `exp(r)`, highest first: 1/7!, …, 1/1!, 1.
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

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

    /// Eight dot products of `q` with `rows[i]`, times `scale`, into `out[..8]`. Each row
    /// has its own chain of `fma`s over the chunks in order, as [`dot`] does; the eight
    /// accumulators are then reduced together by a transpose whose additions are those
    /// of `dot`'s reduction, `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, lane for lane.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma; `q` and every row are the same multiple of 8 long;
    /// `out` is at least 8 long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot8(q: &[f32], rows: &[&[f32]; LANES], scale: f32, out: &mut [f32]) {
        assert!(out.len() >= LANES && rows.iter().all(|r| r.len() == q.len()));
        let mut acc = [_mm256_setzero_ps(); LANES];
        for c in (0..q.len()).step_by(LANES) {
            // SAFETY: `c + 8 <= len` of `q` and of every row.
            unsafe {
                let x = _mm256_loadu_ps(q.as_ptr().add(c));
                for (a, r) in acc.iter_mut().zip(rows) {
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(r.as_ptr().add(c)), *a);
                }
            }
        }
        // SAFETY: the caller's CPU has avx2 and fma.
        let r = unsafe { reduce8(&acc) };
        // SAFETY: `out` holds at least 8 values (asserted).
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(r, _mm256_set1_ps(scale)));
        }
    }

    /// Eight accumulators' lane sums by a transpose whose additions are those of `dot`'s
    /// reduction, `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, lane for lane: lane `i` of the
    /// result is accumulator `i`'s sum.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn reduce8(acc: &[__m256; LANES]) -> __m256 {
        // Halves: [lo(a) + hi(a) | lo(b) + hi(b)], the first step of `dot` for a and b.
        let halves = |a, b| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        // Rows 0..3 land in the low half, rows 4..7 in the high half.
        let u: [__m256; 4] = std::array::from_fn(|i| halves(acc[i], acc[i + 4]));
        // Lanes (0 + 2) and (1 + 3) of each row: `dot`'s second step.
        let pairs = |a, b| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        };
        let (x, y) = (pairs(u[0], u[1]), pairs(u[2], u[3]));
        // (0 + 2) + (1 + 3): `dot`'s last step; the rows come out in order 0..7.
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b10_00_10_00>(x, y),
            _mm256_shuffle_ps::<0b11_01_11_01>(x, y),
        )
    }

    /// `out *= rescale`, then `out += p[j] · rows[j][off..]` in row order, the
    /// accumulator held in registers over all the rows, 64 values at a time.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma; `out` is a multiple of 8 long and every row holds
    /// `off + out.len()` values; `p` is as long as `rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate(
        p: &[f32],
        rows: &[&[f32]],
        off: usize,
        rescale: f32,
        out: &mut [f32],
    ) {
        debug_assert!(p.len() == rows.len() && rows.iter().all(|r| r.len() >= off + out.len()));
        let mut at = 0;
        while at + 8 * LANES <= out.len() {
            // SAFETY: `at + 64 <= len` of `out`, and every row holds `off + len`.
            unsafe { accumulate_slab::<LANES>(p, rows, off, rescale, out, at) };
            at += 8 * LANES;
        }
        while at < out.len() {
            // SAFETY: `at + 8 <= len`: the length is a multiple of 8.
            unsafe { accumulate_slab::<1>(p, rows, off, rescale, out, at) };
            at += LANES;
        }
    }

    /// [`accumulate`] for `N` registers of values from `at`.
    ///
    /// # Safety
    /// As `accumulate`, and `at + 8·N` is within `out`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn accumulate_slab<const N: usize>(
        p: &[f32],
        rows: &[&[f32]],
        off: usize,
        rescale: f32,
        out: &mut [f32],
        at: usize,
    ) {
        let s = _mm256_set1_ps(rescale);
        // SAFETY: `at + 8·N` is within `out`, and `off + at + 8·N` within every row (the
        // caller's contract).
        unsafe {
            let o = out.as_mut_ptr().add(at);
            let mut acc: [__m256; N] =
                std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(o.add(i * LANES)), s));
            for (w, r) in p.iter().zip(rows) {
                let (w, r) = (_mm256_set1_ps(*w), r.as_ptr().add(off + at));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(i * LANES)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(i * LANES), *a);
            }
        }
    }

    /// [`super::softmax_tile`]'s exponentials and lane sums, eight scores at a time: the
    /// same operations as `exp_neg` per value (`_mm256_round_ps` rounds to even, as
    /// `round_ties_even` does), the same lanes as the portable sum.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
        use super::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
        let (mv, min) = (_mm256_set1_ps(m), _mm256_set1_ps(EXP_MIN));
        let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
        let (hi, lo) = (_mm256_set1_ps(-LN2_HI), _mm256_set1_ps(-LN2_LO));
        let mut acc = _mm256_setzero_ps();
        for chunk in s.chunks_mut(LANES) {
            let mut buf = [0f32; LANES];
            buf[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: `buf` holds 8 values.
            let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(buf.as_ptr()) }, mv);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, log2e),
            );
            let r = _mm256_fmadd_ps(n, lo, _mm256_fmadd_ps(n, hi, x));
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            // 2ⁿ from its exponent bits; lanes below EXP_MIN (and NaN) are zeroed.
            let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, min);
            let e = _mm256_and_ps(_mm256_mul_ps(p, two_n), keep);
            // SAFETY: `buf` holds 8 values.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), e) };
            chunk.copy_from_slice(&buf[..chunk.len()]);
            // The padding lanes of a short chunk add 0, as in the portable sum.
            let pad = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                _mm256_set1_epi32(chunk.len() as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            ));
            acc = _mm256_add_ps(acc, _mm256_and_ps(e, pad));
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// [`super::group_scores`] for `G` heads: eight rows at a time, each K chunk loaded
    /// once for all `G` heads, every `(head, row)` its own chain of `fma`s over the chunks
    /// in order and [`reduce8`]'s reduction, as [`dot8`]; the rows past the last eight by
    /// [`dot`].
    ///
    /// # Safety
    /// The CPU must have avx512f, avx512vl, avx2 and fma; `q` is `G` heads of `hd`, a
    /// multiple of 8, and every row holds `off + hd` values; `out` holds `(G − 1) ·
    /// stride + rows.len()` values.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn group_scores<const G: usize>(
        q: &[f32],
        rows: &[&[f32]],
        off: usize,
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let hd = q.len() / G;
        assert!(rows.iter().all(|r| r.len() >= off + hd));
        assert!(out.len() >= (G - 1) * stride + rows.len() && stride >= rows.len());
        let full = rows.len() / LANES * LANES;
        let sv = _mm256_set1_ps(scale);
        for j0 in (0..full).step_by(LANES) {
            // SAFETY: `off + hd` is within every row (asserted).
            let r: [*const f32; LANES] =
                std::array::from_fn(|i| unsafe { rows[j0 + i].as_ptr().add(off) });
            let mut acc = [[_mm256_setzero_ps(); LANES]; G];
            for c in (0..hd).step_by(LANES) {
                // SAFETY: `c + 8 <= hd`: within each head of `q` and every row from `off`.
                unsafe {
                    let x: [__m256; G] =
                        std::array::from_fn(|h| _mm256_loadu_ps(q.as_ptr().add(h * hd + c)));
                    for (i, ri) in r.iter().enumerate() {
                        let k = _mm256_loadu_ps(ri.add(c));
                        for h in 0..G {
                            acc[h][i] = _mm256_fmadd_ps(x[h], k, acc[h][i]);
                        }
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                // SAFETY: the caller's CPU has avx2 and fma; `h · stride + j0 + 8 <=
                // (G − 1) · stride + rows.len() <= out.len()` (asserted).
                unsafe {
                    let v = _mm256_mul_ps(reduce8(a), sv);
                    _mm256_storeu_ps(out.as_mut_ptr().add(h * stride + j0), v);
                }
            }
        }
        for (j, r) in rows.iter().enumerate().skip(full) {
            for h in 0..G {
                // SAFETY: as above; both slices are `hd` long.
                let (qh, rj) = (&q[h * hd..(h + 1) * hd], &r[off..off + hd]);
                out[h * stride + j] = unsafe { dot(qh, rj) } * scale;
            }
        }
    }

    /// [`super::pair_scores`] for `G` heads: eight rows at a time, each register holding
    /// one `(head, row)` chain of both queries (the first in the low eight lanes), a K
    /// chunk loaded once and broadcast to both halves; then [`reduce8`]'s additions on
    /// each half at once (`vpermt2ps` stands in for its 128-bit permutes, the in-lane
    /// shuffles work per 128 bits alike), so each query gets `dot8`'s bits; the rows past
    /// the last eight by [`dot`].
    ///
    /// # Safety
    /// The CPU must have avx512f, avx512vl, avx2 and fma; each of `q` is `G` heads of
    /// `hd`, a multiple of 8; every row holds `off + hd` values; each of `out` points at
    /// `(G − 1) · stride + rows.len()` writable values that nothing else references.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn pair_scores<const G: usize>(
        q: [&[f32]; 2],
        rows: &[&[f32]],
        off: usize,
        scale: f32,
        out: [*mut f32; 2],
        stride: usize,
    ) {
        let hd = q[0].len() / G;
        assert!(q[1].len() == G * hd && stride >= rows.len());
        assert!(rows.iter().all(|r| r.len() >= off + hd));
        let full = rows.len() / LANES * LANES;
        let sv = _mm512_set1_ps(scale);
        // Per 256-bit half, [lo128(a) | lo128(b)] and [hi128(a) | hi128(b)]: the two
        // permutes of `reduce8`'s first step.
        let lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
        let hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        for j0 in (0..full).step_by(LANES) {
            // SAFETY: `off + hd` is within every row (asserted).
            let r: [*const f32; LANES] =
                std::array::from_fn(|i| unsafe { rows[j0 + i].as_ptr().add(off) });
            let mut acc = [[_mm512_setzero_ps(); LANES]; G];
            for c in (0..hd).step_by(LANES) {
                // SAFETY: `c + 8 <= hd`: within each head of both queries and every row
                // from `off`.
                unsafe {
                    let x: [__m512; G] = std::array::from_fn(|h| {
                        let a = _mm256_loadu_ps(q[0].as_ptr().add(h * hd + c));
                        let b = _mm256_castps_pd(_mm256_loadu_ps(q[1].as_ptr().add(h * hd + c)));
                        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                            _mm512_castpd256_pd512(_mm256_castps_pd(a)),
                            b,
                        ))
                    });
                    for (i, ri) in r.iter().enumerate() {
                        let k = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(
                            _mm256_loadu_ps(ri.add(c)),
                        )));
                        for h in 0..G {
                            acc[h][i] = _mm512_fmadd_ps(x[h], k, acc[h][i]);
                        }
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let halves = |x, y| {
                    _mm512_add_ps(
                        _mm512_permutex2var_ps(x, lo, y),
                        _mm512_permutex2var_ps(x, hi, y),
                    )
                };
                let u: [__m512; 4] = std::array::from_fn(|i| halves(a[i], a[i + 4]));
                let pairs = |x, y| {
                    _mm512_add_ps(
                        _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                        _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
                    )
                };
                let (x, y) = (pairs(u[0], u[1]), pairs(u[2], u[3]));
                let v = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b10_00_10_00>(x, y),
                    _mm512_shuffle_ps::<0b11_01_11_01>(x, y),
                );
                let v = _mm512_mul_ps(v, sv);
                // SAFETY: `h · stride + j0 + 8 <= (G − 1) · stride + rows.len()`, within
                // each output (the caller's contract).
                unsafe {
                    let at = h * stride + j0;
                    _mm256_storeu_ps(out[0].add(at), _mm512_castps512_ps256(v));
                    let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
                    _mm256_storeu_ps(out[1].add(at), _mm256_castpd_ps(high));
                }
            }
        }
        for (j, r) in rows.iter().enumerate().skip(full) {
            let rj = &r[off..off + hd];
            for h in 0..G {
                for (qx, o) in q.iter().zip(out) {
                    // SAFETY: both slices are `hd` long; `h · stride + j` is within the
                    // output (the caller's contract).
                    unsafe { *o.add(h * stride + j) = dot(&qx[h * hd..(h + 1) * hd], rj) * scale };
                }
            }
        }
    }

    /// [`super::group_accumulate`] for `G` heads: 64 values of every head at a time (16
    /// to a register; a 16-value tail after), each V register loaded once for all `G`
    /// heads; per value the `fma` chain over the rows in order that [`accumulate`] runs.
    ///
    /// # Safety
    /// The CPU must have avx512f, avx512vl, avx2 and fma; `out` is `G` heads of `hd`, a
    /// multiple of 16; every row holds `off + hd` values; `rescale` holds `G` values and
    /// `p` `(G − 1) · stride + rows.len()`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn group_accumulate<const G: usize>(
        p: &[f32],
        stride: usize,
        rows: &[&[f32]],
        off: usize,
        rescale: &[f32],
        hd: usize,
        out: &mut [f32],
    ) {
        const W: usize = 16;
        debug_assert!(out.len() == G * hd && p.len() >= (G - 1) * stride + rows.len());
        let mut at = 0;
        while at + 4 * W <= hd {
            // SAFETY: `at + 64 <= hd`; the rest is the caller's contract.
            unsafe { group_slab::<G, 4>(p, stride, rows, off, rescale, hd, out, at) };
            at += 4 * W;
        }
        while at < hd {
            // SAFETY: `at + 16 <= hd`: `hd` is a multiple of 16.
            unsafe { group_slab::<G, 1>(p, stride, rows, off, rescale, hd, out, at) };
            at += W;
        }
    }

    /// [`group_accumulate`] for values `at..at + 16·N` of every head.
    ///
    /// # Safety
    /// As `group_accumulate`, and `at + 16·N <= hd`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_slab<const G: usize, const N: usize>(
        p: &[f32],
        stride: usize,
        rows: &[&[f32]],
        off: usize,
        rescale: &[f32],
        hd: usize,
        out: &mut [f32],
        at: usize,
    ) {
        // SAFETY: `h · hd + at + 16·N <= G · hd = out.len()`, `off + at + 16·N` is within
        // every row, and `h · stride + j < p.len()` (the caller's contract).
        unsafe {
            let o = out.as_mut_ptr();
            let mut acc: [[__m512; N]; G] = std::array::from_fn(|h| {
                let s = _mm512_set1_ps(rescale[h]);
                std::array::from_fn(|i| {
                    _mm512_mul_ps(_mm512_loadu_ps(o.add(h * hd + at + 16 * i)), s)
                })
            });
            for (j, r) in rows.iter().enumerate() {
                let r = r.as_ptr().add(off + at);
                let v: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(r.add(16 * i)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.get_unchecked(h * stride + j));
                    for (ai, vi) in a.iter_mut().zip(&v) {
                        *ai = _mm512_fmadd_ps(w, *vi, *ai);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (i, ai) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.add(h * hd + at + 16 * i), *ai);
                }
            }
        }
    }

    /// [`super::softmax_tile`] on AVX2: the portable maximum, the rescale factor by
    /// `exp_neg` with the CPU's `fma`, and [`exp_sum`].
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_tile8(s: &mut [f32], max: f32) -> (f32, f32, f32) {
        let m = s.iter().copied().fold(max, f32::max);
        // SAFETY: the caller's CPU has avx2 and fma.
        (m, super::exp_neg(max - m), unsafe { exp_sum(s, m) })
    }

    /// [`super::softmax_tile`] on AVX-512: the maximum sixteen scores at a time (as
    /// `f32::max`, a NaN score never wins; the maximum of a set is the same whatever the
    /// order), then as [`softmax_tile8`] with [`exp_sum16`].
    ///
    /// # Safety
    /// The CPU must have avx512f, avx512vl, avx2 and fma.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn softmax_tile16(s: &mut [f32], max: f32) -> (f32, f32, f32) {
        let mut mv = _mm512_set1_ps(max);
        for at in (0..s.len()).step_by(16) {
            let left = (s.len() - at).min(16);
            let valid: __mmask16 = if left == 16 { !0 } else { (1 << left) - 1 };
            // SAFETY: the mask covers only `at..at + left`, within `s`; the lanes past
            // the end keep the running maximum.
            let x = unsafe { _mm512_mask_loadu_ps(mv, valid, s.as_ptr().add(at)) };
            // `vmaxps` gives its second operand when either is NaN.
            mv = _mm512_max_ps(x, mv);
        }
        let m = _mm512_reduce_max_ps(mv);
        // SAFETY: the caller's CPU has every feature `exp_sum16` needs.
        (m, super::exp_neg(max - m), unsafe { exp_sum16(s, m) })
    }

    /// [`exp_sum`] sixteen scores to a register: per value the same operations
    /// (`_mm512_roundscale_ps` rounds to even, as `_mm256_round_ps` does), and each
    /// register's low eight lanes added to the eight-lane sum before its high eight, as
    /// `exp_sum` adds consecutive chunks; the lanes past the end are masked off.
    ///
    /// # Safety
    /// The CPU must have avx512f, avx512vl, avx2 and fma.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub unsafe fn exp_sum16(s: &mut [f32], m: f32) -> f32 {
        use super::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
        let (mv, min) = (_mm512_set1_ps(m), _mm512_set1_ps(EXP_MIN));
        let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
        let (hi, lo) = (_mm512_set1_ps(-LN2_HI), _mm512_set1_ps(-LN2_LO));
        let mut acc = _mm256_setzero_ps();
        for at in (0..s.len()).step_by(16) {
            let left = (s.len() - at).min(16);
            let valid: __mmask16 = if left == 16 { !0 } else { (1 << left) - 1 };
            // SAFETY: the mask covers only `at..at + left`, within `s`.
            let x = unsafe { _mm512_maskz_loadu_ps(valid, s.as_ptr().add(at)) };
            let x = _mm512_sub_ps(x, mv);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, log2e),
            );
            let r = _mm512_fmadd_ps(n, lo, _mm512_fmadd_ps(n, hi, x));
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            )));
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, min) & valid;
            let e = _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, two_n));
            // SAFETY: as the load.
            unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr().add(at), valid, e) };
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            if left > LANES {
                acc = _mm256_add_ps(acc, high);
            }
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
    use proptest::prelude::*;

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

    /// The tile kernels against the one-row ones on the portable path, bit for bit.
    fn tile_matches_rows(level: Level, hd: usize, n: usize, off: usize, seed: f32) {
        let q: Vec<f32> = (0..hd)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
            .collect();
        let data: Vec<Vec<f32>> = (0..n)
            .map(|j| {
                (0..off + hd)
                    .map(|i| ((i * 7 + j * 13) as f32 * 0.11 + seed).cos() * 2.0)
                    .collect()
            })
            .collect();
        let rows: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let mut got = vec![0f32; n];
        rows_scores(level, &q, &rows, off, 0.125, &mut got);
        let want: Vec<f32> = rows
            .iter()
            .map(|r| {
                let mut o = [0f32];
                head_scores(Level::Scalar, &q, &r[off..], hd, 1, 0.125, &mut o);
                o[0]
            })
            .collect();
        assert_eq!(got, want, "scores: {level:?}, hd {hd}, {n} rows");
        let p: Vec<f32> = (0..n)
            .map(|j| (j as f32 * 0.3 + seed).sin().abs())
            .collect();
        let mut got = q.clone();
        rows_accumulate(level, &p, &rows, off, 0.7, &mut got);
        let mut want: Vec<f32> = q.iter().map(|v| v * 0.7).collect();
        for (w, r) in p.iter().zip(&rows) {
            head_accumulate(Level::Scalar, &[*w], &r[off..], hd, 1, &mut want);
        }
        assert_eq!(got, want, "accumulate: {level:?}, hd {hd}, {n} rows");
    }

    #[test]
    fn tile_kernels_give_the_one_row_bits_on_every_level() {
        let best = super::super::level();
        for level in [Level::Scalar, Level::Avx2, Level::Avx512Vnni] {
            if level.rank() > best.rank() {
                continue;
            }
            // Eight-row groups, a remainder, one row, a tile; 64-value slabs and 8-value
            // tails; a head dimension that is not a multiple of 8.
            for (hd, n, off) in [
                (64, 32, 64),
                (64, 13, 0),
                (64, 1, 128),
                (72, 9, 8),
                (10, 5, 3),
            ] {
                tile_matches_rows(level, hd, n, off, 0.5);
            }
        }
    }

    /// The grouped kernels against the one-head tile kernels on the portable path, bit
    /// for bit: `heads` query heads of `hd` sharing `n` rows.
    fn group_matches_heads(level: Level, heads: usize, hd: usize, n: usize, off: usize, seed: f32) {
        let stride = n + 3;
        let q: Vec<f32> = (0..heads * hd)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
            .collect();
        let data: Vec<Vec<f32>> = (0..n)
            .map(|j| {
                (0..off + hd)
                    .map(|i| ((i * 7 + j * 13) as f32 * 0.11 + seed).cos() * 2.0)
                    .collect()
            })
            .collect();
        let rows: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let mut got = vec![0f32; heads * stride];
        group_scores(level, &q, &rows, off, 0.125, &mut got, stride);
        for h in 0..heads {
            let mut want = vec![0f32; n];
            rows_scores(
                Level::Scalar,
                &q[h * hd..(h + 1) * hd],
                &rows,
                off,
                0.125,
                &mut want,
            );
            let g = &got[h * stride..h * stride + n];
            assert_eq!(
                g, want,
                "scores: {level:?}, head {h} of {heads}, hd {hd}, {n} rows"
            );
        }
        // Two queries at once: each gets its own bits (`n` may be under 8, a remainder
        // of rows, or whole eights).
        let q2: Vec<f32> = q.iter().map(|v| (v * 1.7 + seed).cos()).collect();
        let (mut a, mut b) = (vec![0f32; heads * stride], vec![0f32; heads * stride]);
        pair_scores(
            level,
            [&q, &q2],
            &rows,
            off,
            0.125,
            [&mut a, &mut b],
            stride,
        );
        let mut want_b = vec![0f32; heads * stride];
        group_scores(Level::Scalar, &q2, &rows, off, 0.125, &mut want_b, stride);
        for h in 0..heads {
            let at = h * stride..h * stride + n;
            assert_eq!(
                a[at.clone()],
                got[at.clone()],
                "pair, first: {level:?}, head {h}"
            );
            assert_eq!(
                b[at.clone()],
                want_b[at],
                "pair, second: {level:?}, head {h}"
            );
        }
        let p: Vec<f32> = (0..heads * stride)
            .map(|j| (j as f32 * 0.3 + seed).sin().abs())
            .collect();
        let rescale: Vec<f32> = (0..heads).map(|h| 0.5 + h as f32 * 0.1).collect();
        let mut got = q.clone();
        group_accumulate(level, &p, stride, &rows, off, &rescale, &mut got);
        for h in 0..heads {
            let mut want = q[h * hd..(h + 1) * hd].to_vec();
            let ph = &p[h * stride..h * stride + n];
            rows_accumulate(Level::Scalar, ph, &rows, off, rescale[h], &mut want);
            let g = &got[h * hd..(h + 1) * hd];
            assert_eq!(
                g, want,
                "accumulate: {level:?}, head {h} of {heads}, hd {hd}, {n} rows"
            );
        }
    }

    #[test]
    fn group_kernels_give_each_heads_bits_on_every_level() {
        let best = super::super::level();
        for level in [Level::Scalar, Level::Avx2, Level::Avx512Vnni] {
            if level.rank() > best.rank() {
                continue;
            }
            // SmolLM2's three heads per KV head over a whole tile (and with two 64-value
            // slabs), one to seven heads
            // (chunks of three and their remainders), a remainder of rows, a head
            // dimension with a 16-value tail, one of 8 (no 16-wide accumulation), one
            // that is not a multiple of 8.
            for (heads, hd, n, off) in [
                (3, 64, 32, 64),
                (3, 128, 32, 0),
                (1, 64, 13, 0),
                (2, 64, 8, 128),
                (4, 80, 9, 16),
                (5, 64, 1, 0),
                (7, 16, 31, 32),
                (3, 72, 17, 8),
                (3, 10, 5, 3),
            ] {
                group_matches_heads(level, heads, hd, n, off, 0.5);
            }
        }
    }

    #[test]
    fn exp_neg_is_within_two_ulp_and_the_same_on_every_level() {
        let xs: Vec<f32> = (0..20_000)
            .map(|i| -(i as f32) * 0.004_4)
            .chain([
                0.0,
                -0.0,
                -86.9,
                -87.0,
                -87.1,
                -1e30,
                f32::NEG_INFINITY,
                f32::NAN,
            ])
            .collect();
        for x in &xs {
            let got = exp_neg(*x);
            if x.is_nan() || *x < EXP_MIN {
                assert_eq!(got, 0.0, "exp({x})");
                continue;
            }
            let want = (*x as f64).exp();
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
        }
        assert_eq!(exp_neg(0.0), 1.0);
        let best = super::super::level();
        let levels = [Level::Avx2, Level::Avx512Vnni].into_iter();
        let levels: Vec<Level> = levels.filter(|l| l.rank() <= best.rank()).collect();
        for n in [1, 7, 8, 13, 16, 17, 24, 31, 32, 48, 100, 256] {
            // Scores of mixed sizes, so that the order of the lane sums shows in the bits.
            let s: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 1.37).sin() * 4.0 + 3.0)
                .collect();
            // With odd scores among them: NaN, −∞, ±0, one below exp's range.
            let mut odd = s.clone();
            for (i, x) in [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, -200.0]
                .into_iter()
                .enumerate()
            {
                odd[i * 5 % n] = x;
            }
            // The first tile (nothing before), and later ones whose running maximum is
            // inside the scores or above them all.
            for (s, before) in [&s, &odd]
                .into_iter()
                .flat_map(|s| [f32::NEG_INFINITY, 1.0, 8.0].map(|b| (s, b)))
            {
                let run = |level| {
                    let mut t = s.clone();
                    let r = softmax_tile(level, &mut t, before);
                    let r = (r.0.to_bits(), r.1.to_bits(), r.2.to_bits());
                    (t.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), r)
                };
                let a = run(Level::Scalar);
                for level in &levels {
                    assert_eq!(a, run(*level), "{level:?}: {n} scores {s:?} after {before}");
                }
                let m = s.iter().copied().fold(before, f32::max);
                assert_eq!(a.1.0, m.to_bits());
            }
            let a = softmax_tile(Level::Scalar, &mut s.clone(), f32::NEG_INFINITY);
            assert_eq!(a.1, 0.0, "nothing to rescale on the first tile");
            let exact: f64 = s.iter().map(|v| ((v - a.0) as f64).exp()).sum();
            assert!(
                (a.2 as f64 - exact).abs() < 1e-5 * exact,
                "{n}: {} vs {exact}",
                a.2
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tile_kernels_match_the_scalar_reference_on_random_rows(
            hd in (1usize..=12).prop_map(|c| c * 8),
            n in 1usize..=40,
            off in 0usize..3,
            seed in -10.0f32..10.0,
        ) {
            tile_matches_rows(super::super::level(), hd, n, off * 8, seed);
        }

        #[test]
        fn group_kernels_match_the_scalar_reference_on_random_rows(
            heads in 1usize..=6,
            hd in (1usize..=8).prop_map(|c| c * 8),
            n in 1usize..=40,
            off in 0usize..3,
            seed in -10.0f32..10.0,
        ) {
            group_matches_heads(super::super::level(), heads, hd, n, off * 8, seed);
        }
    }
}
