//! Block dot products of quantized weights and quantized activations: the inner loop of
//! every projection (see `crate::quant`).
//!
//! Blocks hold 32 values. Weights come in groups of [`GROUP`] columns (output features)
//! whose blocks are interleaved, one record per block index, so a tile reads one stream:
//!
//! | packing | record (per block index, for 4 columns) |
//! |---|---|
//! | `Nibbles` (Q4_0/Q4_1) | scales `d[4]` f16 · offsets `c[4]` f16 · 32 bytes `A` · 32 bytes `B` |
//! | `Bytes` (Q8_0) | scales `d[4]` f16 · 4 × 32 signed bytes, column by column |
//!
//! For `Nibbles`, value `j` of column 0 is `A[j] & 15`, of column 1 `A[j] >> 4`, of
//! columns 2 and 3 the same in `B`: unsigned 0..=15, and a weight is `d·q + c`. For
//! `Bytes` a weight is `d·q`. Activations are 32 signed bytes per block with a scale `d`
//! and `s = d·Σq`.
//!
//! For R activation rows and the 4 columns, a tile computes per output
//! `acc = fma(d_w·d_x, Σ q_w·q_x, acc)` block by block, the integer sum exact, and for
//! 4-bit weights `off = fma(c_w, s_x, off)`, returning `acc + off`. Every level performs
//! exactly these float operations in this order, so all levels give the same bits, and
//! an output never depends on the other rows of its tile.

use super::Level;

/// Columns per weight group.
pub const GROUP: usize = 4;

/// Values per block.
pub const QK: usize = 32;

/// How a weight group's blocks are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// 4-bit values with a per-block offset (Q4_0, Q4_1).
    Nibbles,
    /// Signed bytes (Q8_0).
    Bytes,
}

impl Packing {
    /// Bytes of one record: the 4 columns' block at one block index.
    pub fn record_bytes(self) -> usize {
        match self {
            Packing::Nibbles => 16 + 2 * QK,
            Packing::Bytes => 8 + GROUP * QK,
        }
    }

    /// Offset of the quantized values within a record.
    pub fn values_at(self) -> usize {
        match self {
            Packing::Nibbles => 16,
            Packing::Bytes => 8,
        }
    }
}

/// R activation rows: each row's quantized blocks, per-block scales and scaled sums.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a, const R: usize> {
    /// Quantized blocks of each row (32 signed bytes per block).
    pub qs: [&'a [i8]; R],
    /// Scale of each block of each row.
    pub d: [&'a [f32]; R],
    /// `d · Σ q` of each block of each row.
    pub s: [&'a [f32]; R],
}

/// The 4 outputs of each of R rows against one weight group of `kb` records.
///
/// # Panics
/// When a slice is shorter than `kb` blocks.
pub fn tile<const R: usize>(
    level: Level,
    packing: Packing,
    kb: usize,
    group: &[u8],
    x: &Rows<'_, R>,
) -> [[f32; GROUP]; R] {
    assert!(group.len() >= kb * packing.record_bytes());
    for r in 0..R {
        assert!(x.qs[r].len() >= kb * QK && x.d[r].len() >= kb && x.s[r].len() >= kb);
    }
    match (level, packing) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level()` found avx512f/vl/vnni, avx2, fma and f16c on this CPU; the
        // slice lengths were checked above.
        (Level::Avx512Vnni, Packing::Nibbles) => unsafe { x86::tile_vnni::<R, true>(kb, group, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Level::Avx512Vnni, Packing::Bytes) => unsafe { x86::tile_vnni::<R, false>(kb, group, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level()` found avx2, fma and f16c; the slice lengths were checked above.
        (Level::Avx2, Packing::Nibbles) => unsafe { x86::tile_avx2::<R, true>(kb, group, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Level::Avx2, Packing::Bytes) => unsafe { x86::tile_avx2::<R, false>(kb, group, x) },
        _ => tile_scalar(packing, kb, group, x),
    }
}

/// Quantizes `x` (a multiple of 32 long) block by block: scale `d = max|x| / 127`,
/// values `round(x / d)` (ties to even), and `s = d · Σ q`. Every level gives the same
/// bytes.
///
/// # Panics
/// When the output slices do not fit `x`.
pub fn quantize(level: Level, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let blocks = x.len() / QK;
    assert!(
        x.len() == blocks * QK && qs.len() == x.len() && d.len() == blocks && s.len() == blocks
    );
    for b in 0..blocks {
        let src = &x[b * QK..(b + 1) * QK];
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let dst = &mut qs[b * QK..(b + 1) * QK];
        let sum = match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: every level but Scalar has avx2 (`super::level`); both slices are
            // one block long.
            Level::Avx2 | Level::Avx512Vnni => unsafe { x86::quantize_block(src, inv, dst) },
            _ => {
                let mut sum = 0i32;
                for (q, v) in dst.iter_mut().zip(src) {
                    *q = (v * inv).round_ties_even() as i8;
                    sum += *q as i32;
                }
                sum
            }
        };
        d[b] = scale;
        s[b] = scale * sum as f32;
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Value `j` of column `c` in a record's quantized values.
pub fn value(packing: Packing, values: &[u8], c: usize, j: usize) -> i32 {
    match packing {
        Packing::Nibbles => {
            let byte = values[(c / 2) * QK + j];
            (if c.is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }) as i32
        }
        Packing::Bytes => values[c * QK + j] as i8 as i32,
    }
}

/// Scale and offset of column `c` in a record.
pub fn scales(packing: Packing, record: &[u8], c: usize) -> (f32, f32) {
    let offset = match packing {
        Packing::Nibbles => f16_at(record, 8 + 2 * c),
        Packing::Bytes => 0.0,
    };
    (f16_at(record, 2 * c), offset)
}

/// The portable tile, with the same float operations as the SIMD ones.
fn tile_scalar<const R: usize>(
    packing: Packing,
    kb: usize,
    group: &[u8],
    x: &Rows<'_, R>,
) -> [[f32; GROUP]; R] {
    let rb = packing.record_bytes();
    let mut out = [[0f32; GROUP]; R];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, o) in row.iter_mut().enumerate() {
            let (mut acc, mut off) = (0f32, 0f32);
            for b in 0..kb {
                let record = &group[b * rb..(b + 1) * rb];
                let values = &record[packing.values_at()..];
                let xb = &x.qs[r][b * QK..(b + 1) * QK];
                let isum: i32 = (0..QK)
                    .map(|j| value(packing, values, c, j) * xb[j] as i32)
                    .sum();
                let (dw, cw) = scales(packing, record, c);
                acc = (dw * x.d[r][b]).mul_add(isum as f32, acc);
                off = cw.mul_add(x.s[r][b], off);
            }
            *o = acc + off;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP, Packing, QK, Rows};
    use std::arch::x86_64::*;

    /// The four columns' exact block sums from their eight-lane partial sums.
    #[inline(always)]
    fn reduce4(p: [__m256i; GROUP]) -> __m128i {
        // SAFETY: only called from functions compiled with avx2.
        unsafe {
            let t0 = _mm256_hadd_epi32(p[0], p[1]);
            let t1 = _mm256_hadd_epi32(p[2], p[3]);
            let t2 = _mm256_hadd_epi32(t0, t1);
            _mm_add_epi32(_mm256_castsi256_si128(t2), _mm256_extracti128_si256(t2, 1))
        }
    }

    /// Unsigned × signed bytes, four adjacent products per i32 lane: `vpmaddubsw` to i16
    /// pairs (no saturation here: |w| ≤ 128 and |x| ≤ 127 give at most 32,512), then
    /// `vpmaddwd` with ones.
    #[inline(always)]
    fn dot_maddubs(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: only called from `tile_avx2` (avx2).
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
    }

    /// The same with `vpdpbusd`.
    #[inline(always)]
    fn dot_vnni(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: only called from `tile_vnni` (avx512vnni + avx512vl).
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x) }
    }

    macro_rules! define_tile {
        ($name:ident, $features:literal, $dot:ident) => {
            /// The tile of `super::tile` on this instruction set.
            ///
            /// # Safety
            /// The CPU must support the enabled features, and the group and every row
            /// must hold `kb` blocks (checked by `super::tile`).
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const NIBBLES: bool>(
                kb: usize,
                group: &[u8],
                x: &Rows<'_, R>,
            ) -> [[f32; GROUP]; R] {
                let packing = if NIBBLES {
                    Packing::Nibbles
                } else {
                    Packing::Bytes
                };
                let rb = packing.record_bytes();
                let xq: [*const i8; R] = std::array::from_fn(|r| x.qs[r].as_ptr());
                let xd: [*const f32; R] = std::array::from_fn(|r| x.d[r].as_ptr());
                let xs: [*const f32; R] = std::array::from_fn(|r| x.s[r].as_ptr());
                let mut acc = [_mm_setzero_ps(); R];
                let mut off = [_mm_setzero_ps(); R];
                let low = _mm256_set1_epi8(0x0F);
                let zero = _mm256_setzero_si256();
                for b in 0..kb {
                    // SAFETY: `b < kb` and the group holds `kb` records.
                    let rec = unsafe { group.as_ptr().add(b * rb) };
                    // Weights as unsigned bytes (nibbles; or magnitudes of signed bytes,
                    // with the signs kept aside), the 4 scales and offsets as f32.
                    let mut wu = [zero; GROUP];
                    let mut ws = [zero; GROUP];
                    // SAFETY: every load is inside the record (see the layout table).
                    let (dw, cw) = unsafe {
                        let dw = _mm_cvtph_ps(_mm_loadl_epi64(rec.cast()));
                        if NIBBLES {
                            let a = _mm256_loadu_si256(rec.add(16).cast());
                            let b2 = _mm256_loadu_si256(rec.add(16 + QK).cast());
                            wu[0] = _mm256_and_si256(a, low);
                            wu[1] = _mm256_and_si256(_mm256_srli_epi16(a, 4), low);
                            wu[2] = _mm256_and_si256(b2, low);
                            wu[3] = _mm256_and_si256(_mm256_srli_epi16(b2, 4), low);
                            (dw, _mm_cvtph_ps(_mm_loadl_epi64(rec.add(8).cast())))
                        } else {
                            for c in 0..GROUP {
                                ws[c] = _mm256_loadu_si256(rec.add(8 + c * QK).cast());
                                wu[c] = _mm256_sign_epi8(ws[c], ws[c]);
                            }
                            (dw, _mm_setzero_ps())
                        }
                    };
                    for r in 0..R {
                        // SAFETY: `b < kb` and every row holds `kb` blocks and scales.
                        let (xv, dx, sx) = unsafe {
                            (
                                _mm256_loadu_si256(xq[r].add(b * QK).cast()),
                                *xd[r].add(b),
                                *xs[r].add(b),
                            )
                        };
                        let mut p = [zero; GROUP];
                        for c in 0..GROUP {
                            // Signed weights: |w|·(x with w's sign) = w·x.
                            let xc = if NIBBLES {
                                xv
                            } else {
                                _mm256_sign_epi8(xv, ws[c])
                            };
                            p[c] = $dot(wu[c], xc);
                        }
                        let isum = _mm_cvtepi32_ps(reduce4(p));
                        let s = _mm_mul_ps(dw, _mm_set1_ps(dx));
                        acc[r] = _mm_fmadd_ps(s, isum, acc[r]);
                        if NIBBLES {
                            off[r] = _mm_fmadd_ps(cw, _mm_set1_ps(sx), off[r]);
                        }
                    }
                }
                let mut out = [[0f32; GROUP]; R];
                for r in 0..R {
                    // SAFETY: `out[r]` is 4 f32.
                    unsafe { _mm_storeu_ps(out[r].as_mut_ptr(), _mm_add_ps(acc[r], off[r])) };
                }
                out
            }
        };
    }

    /// One block: `round(x · inv)` to nearest even (the default rounding mode of
    /// `vcvtps2dq`), packed to bytes; returns the sum of the bytes.
    ///
    /// # Safety
    /// The CPU must have avx2; `x` and `q` are one block (32) long.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
        assert!(x.len() == QK && q.len() == QK);
        let m = _mm256_set1_ps(inv);
        // SAFETY: four loads of 8 floats within the 32.
        let v: [__m256i; 4] = std::array::from_fn(|i| unsafe {
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * i)), m))
        });
        // i32 → i16 → i8 packs work per 128-bit lane; a final permute restores order.
        let w01 = _mm256_packs_epi32(v[0], v[1]);
        let w23 = _mm256_packs_epi32(v[2], v[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes into a 32-byte slice.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), b) };
        let sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
    }

    define_tile!(tile_avx2, "avx2,fma,f16c", dot_maddubs);
    define_tile!(
        tile_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        dot_vnni
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn lcg(seed: u64) -> impl FnMut() -> u32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        }
    }

    /// A group of `kb` records with varied scales, offsets and values (-128 included).
    fn group(packing: Packing, kb: usize, seed: u64) -> Vec<u8> {
        let mut next = lcg(seed);
        let mut g = Vec::new();
        for b in 0..kb {
            for c in 0..GROUP {
                g.extend(f16::from_f32(0.01 + ((b + c) % 5) as f32 * 0.003).to_le_bytes());
            }
            if packing == Packing::Nibbles {
                for c in 0..GROUP {
                    g.extend(f16::from_f32(-0.04 + c as f32 * 0.01).to_le_bytes());
                }
            }
            let n = packing.record_bytes() - packing.values_at();
            g.extend((0..n).map(|i| if i == 5 { 0x80 } else { next() as u8 }));
        }
        g
    }

    /// Activations spanning the full quantized range, ±127 included.
    fn acts(kb: usize, seed: u64) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
        let mut next = lcg(seed);
        let q: Vec<i8> = (0..kb * QK)
            .map(|i| match i % 7 {
                0 => 127,
                1 => -127,
                _ => ((next() % 255) as i32 - 127) as i8,
            })
            .collect();
        let d: Vec<f32> = (0..kb).map(|b| 0.02 + (b % 3) as f32 * 0.005).collect();
        let s: Vec<f32> = (0..kb)
            .map(|b| {
                d[b] * q[b * QK..(b + 1) * QK]
                    .iter()
                    .map(|v| *v as f32)
                    .sum::<f32>()
            })
            .collect();
        (q, d, s)
    }

    /// Every level gives the scalar tile's bits, on both packings, and is close to the
    /// exact sum.
    #[test]
    fn every_level_gives_the_same_bits() {
        let kb = 18;
        let (q, d, s) = acts(kb, 9);
        let rows = Rows::<1> {
            qs: [&q],
            d: [&d],
            s: [&s],
        };
        for packing in [Packing::Nibbles, Packing::Bytes] {
            let g = group(packing, kb, 7);
            let want = tile_scalar(packing, kb, &g, &rows);
            let rb = packing.record_bytes();
            for (c, got) in want[0].iter().enumerate() {
                let exact: f64 = (0..kb)
                    .map(|b| {
                        let rec = &g[b * rb..(b + 1) * rb];
                        let (dw, cw) = scales(packing, rec, c);
                        (0..QK)
                            .map(|j| {
                                let w = dw as f64
                                    * value(packing, &rec[packing.values_at()..], c, j) as f64
                                    + cw as f64;
                                w * d[b] as f64 * q[b * QK + j] as f64
                            })
                            .sum::<f64>()
                    })
                    .sum();
                let got = *got as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * exact.abs().max(1.0),
                    "{packing:?} {c}: {got} vs {exact}"
                );
            }
            for level in [Level::Avx2, super::super::level()] {
                if level == Level::Avx2 && super::super::level() == Level::Scalar {
                    continue;
                }
                let got = tile(level, packing, kb, &g, &rows);
                assert_eq!(
                    got.map(|r| r.map(f32::to_bits)),
                    want.map(|r| r.map(f32::to_bits)),
                    "{level:?} {packing:?}"
                );
            }
        }
    }

    /// Quantizing gives the same bytes on every level, rounds ties to even, and keeps
    /// every value within ±127.
    #[test]
    fn quantize_is_the_same_on_every_level() {
        let mut x: Vec<f32> = (0..96)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.37)
            .collect();
        x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        // Block 2 with max 127: scale 1, so 2.5 and -3.5 are exact ties.
        x[64..96].iter_mut().for_each(|v| *v = 1.0);
        (x[64], x[65], x[66]) = (127.0, 2.5, -3.5);
        let run = |level| {
            let (mut q, mut d, mut s) = (vec![0i8; 96], vec![0f32; 3], vec![0f32; 3]);
            quantize(level, &x, &mut q, &mut d, &mut s);
            (q, d, s)
        };
        let (q, d, s) = run(Level::Scalar);
        assert_eq!(
            run(super::super::level()),
            (q.clone(), d.clone(), s.clone())
        );
        assert_eq!(d[1], 0.0);
        assert!(q[32..64].iter().all(|v| *v == 0));
        assert_eq!((d[2], q[64], q[65], q[66]), (1.0, 127, 2, -4));
        for (i, v) in x.iter().enumerate() {
            assert!((q[i] as f32 * d[i / 32] - v).abs() <= d[i / 32] * 0.5 + 1e-6);
        }
        assert_eq!(
            s[0],
            d[0] * q[..32].iter().map(|v| *v as i32).sum::<i32>() as f32
        );
    }

    /// A 4-row tile gives each row bitwise what a 1-row tile gives it.
    #[test]
    fn rows_of_a_tile_are_computed_alone() {
        let kb = 6;
        let a: Vec<_> = (0..4).map(|i| acts(kb, 100 + i)).collect();
        let level = super::super::level();
        for packing in [Packing::Nibbles, Packing::Bytes] {
            let g = group(packing, kb, 3);
            let rows = Rows::<4> {
                qs: std::array::from_fn(|r| a[r].0.as_slice()),
                d: std::array::from_fn(|r| a[r].1.as_slice()),
                s: std::array::from_fn(|r| a[r].2.as_slice()),
            };
            let all = tile(level, packing, kb, &g, &rows);
            for (r, want) in all.iter().enumerate() {
                let one = Rows::<1> {
                    qs: [rows.qs[r]],
                    d: [rows.d[r]],
                    s: [rows.s[r]],
                };
                assert_eq!(
                    &tile(level, packing, kb, &g, &one)[0],
                    want,
                    "{packing:?} row {r}"
                );
            }
        }
    }
}
