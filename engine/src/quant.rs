//! Quantized projections `y = x Wᵀ` on the model's own block formats.
//!
//! Weights keep their GGUF blocks of 32 values: Q4_1 and Q4_0 as 4-bit values with a
//! scale and an offset (Q4_1's minimum, or −8·scale for Q4_0), Q8_0 as signed bytes with
//! a scale; every other type is rounded to Q8_0 at load. They are regrouped at load so
//! four output features' blocks lie side by side ([`crate::kernels::qdot`] has the
//! layout). Activations are quantized per row to signed bytes in blocks of 32 with one
//! f32 scale each (as llama.cpp's Q8_1), and block dot products run in integers.
//!
//! Every output row is computed from its input row alone, with the same operations
//! whatever else is in the call and on every instruction set: a token's projection is
//! the same in a prefill chunk of any length and in a decode batch of any composition.

use crate::compute;
use crate::error::{EngineError, Result};
use crate::kernels::qdot::{self, GROUP, Packing, QK, Rows};
use crate::kernels::{self, Level};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use half::f16;

/// Activation rows handled together by a tile (shares each weight record's load).
const TILE_ROWS: usize = 4;
/// Rows per task when a call has many (their activations stay in cache while every
/// weight group passes over them).
const ROW_BLOCK: usize = 32;

/// A weight matrix `[n, k]` in quantized blocks, grouped four output features at a time.
#[derive(Debug, Clone)]
pub struct QWeight {
    packing: Packing,
    /// Output features (rows of W).
    n: usize,
    /// Input features.
    k: usize,
    /// `ceil(n / 4)` groups of `k / 32` records each (missing features of the last group
    /// are zeros).
    data: Vec<u8>,
}

/// One GGUF block of a row: scale, offset, and the 32 values (unsigned nibbles or
/// signed bytes).
#[derive(Clone, Copy)]
struct Block {
    d: [u8; 2],
    c: [u8; 2],
    values: [u8; QK],
}

fn parse_block(dtype: GgmlDType, raw: &[u8]) -> Block {
    let mut values = [0u8; QK];
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q4_0 => {
            let qs = &raw[raw.len() - 16..];
            for j in 0..16 {
                values[j] = qs[j] & 15;
                values[j + 16] = qs[j] >> 4;
            }
        }
        _ => values.copy_from_slice(&raw[2..34]),
    }
    let d = [raw[0], raw[1]];
    let c = match dtype {
        GgmlDType::Q4_1 => [raw[2], raw[3]],
        // Q4_0 values are q − 8: an offset of −8·d (exact in f16).
        GgmlDType::Q4_0 => (f16::from_le_bytes(d) * f16::from_f32(-8.0)).to_le_bytes(),
        _ => [0, 0],
    };
    Block { d, c, values }
}

impl QWeight {
    /// Takes a GGUF tensor `[n, k]`: Q4_1, Q4_0 and Q8_0 keep their values exactly,
    /// every other type is rounded to Q8_0.
    ///
    /// # Errors
    /// `Model` when the tensor is not 2-D or `k` is not a multiple of 32.
    pub fn from_qtensor(qt: &QTensor, name: &str) -> Result<Self> {
        let (n, k) = qt
            .shape()
            .dims2()
            .map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))?;
        if !k.is_multiple_of(QK) {
            return Err(EngineError::Model(format!(
                "tensor `{name}`: input width {k} is not a multiple of {QK}"
            )));
        }
        match qt.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 | GgmlDType::Q8_0 => {
                Self::from_blocks(qt.dtype(), n, k, &qt.data()?)
            }
            _ => {
                let dense = qt.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                Self::from_dense(&dense.flatten_all()?.to_vec1::<f32>()?, n, k)
            }
        }
    }

    /// Rounds dense f32 weights `[n, k]` to Q8_0 blocks.
    ///
    /// # Errors
    /// `Model` when `k` is not a multiple of 32 or the sizes disagree.
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(QK) || w.len() != n * k {
            return Err(EngineError::Model(format!(
                "a [{n}, {k}] weight needs k a multiple of {QK} and {} values, got {}",
                n * k,
                w.len()
            )));
        }
        let t = candle_core::Tensor::from_slice(w, (n, k), &Device::Cpu)?;
        let qt = QTensor::quantize(&t, GgmlDType::Q8_0)?;
        Self::from_blocks(GgmlDType::Q8_0, n, k, &qt.data()?)
    }

    /// Regroups raw GGUF blocks of Q4_1 (`d, m: f16; 16 nibble bytes`), Q4_0 (`d: f16;
    /// 16 nibble bytes`, values q − 8) or Q8_0 (`d: f16; 32 signed bytes`).
    fn from_blocks(dtype: GgmlDType, n: usize, k: usize, raw: &[u8]) -> Result<Self> {
        let kb = k / QK;
        let (stride, packing) = match dtype {
            GgmlDType::Q4_1 => (20, Packing::Nibbles),
            GgmlDType::Q4_0 => (18, Packing::Nibbles),
            _ => (34, Packing::Bytes),
        };
        if raw.len() != n * kb * stride {
            return Err(EngineError::Model(format!(
                "{dtype:?} weight [{n}, {k}]: {} bytes, expected {}",
                raw.len(),
                n * kb * stride
            )));
        }
        let groups = n.div_ceil(GROUP);
        let empty = Block {
            d: [0; 2],
            c: [0; 2],
            values: [0; QK],
        };
        let mut data = Vec::with_capacity(groups * kb * packing.record_bytes());
        for g in 0..groups {
            for b in 0..kb {
                let blocks: [Block; GROUP] = std::array::from_fn(|c| match g * GROUP + c {
                    i if i < n => {
                        let at = (i * kb + b) * stride;
                        parse_block(dtype, &raw[at..at + stride])
                    }
                    _ => empty,
                });
                blocks.iter().for_each(|bl| data.extend(bl.d));
                match packing {
                    Packing::Nibbles => {
                        blocks.iter().for_each(|bl| data.extend(bl.c));
                        for pair in blocks.chunks_exact(2) {
                            data.extend(
                                (0..QK).map(|j| pair[0].values[j] | (pair[1].values[j] << 4)),
                            );
                        }
                    }
                    Packing::Bytes => blocks.iter().for_each(|bl| data.extend(bl.values)),
                }
            }
        }
        Ok(QWeight {
            packing,
            n,
            k,
            data,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    fn group(&self, g: usize) -> &[u8] {
        let len = (self.k / QK) * self.packing.record_bytes();
        &self.data[g * len..(g + 1) * len]
    }

    /// The weight at row `i`, column `j` (for tests and checks).
    pub fn value(&self, i: usize, j: usize) -> f32 {
        let rb = self.packing.record_bytes();
        let record = &self.group(i / GROUP)[(j / QK) * rb..(j / QK + 1) * rb];
        let (d, c) = qdot::scales(self.packing, record, i % GROUP);
        let values = &record[self.packing.values_at()..];
        d * qdot::value(self.packing, values, i % GROUP, j % QK) as f32 + c
    }

    /// `out = x Wᵀ` (`out`: `x.rows() × n`, row-major).
    ///
    /// # Panics
    /// When `x`'s width is not this weight's `k` or `out` has the wrong length.
    pub fn matmul(&self, x: &QActs, out: &mut [f32]) {
        assert_eq!(x.k, self.k, "activation width");
        assert_eq!(out.len(), x.rows * self.n, "output size");
        let level = kernels::level();
        let groups = self.n.div_ceil(GROUP);
        if x.rows > ROW_BLOCK {
            // Many rows (prefill): each task takes a block of rows and every group, writing
            // its rows of `out` directly; a group's records are reused across the block.
            let mut blocks: Vec<&mut [f32]> = out.chunks_mut(ROW_BLOCK * self.n).collect();
            compute::for_each_item(&mut blocks, |i, dst| {
                for g in 0..groups {
                    self.group_rows(level, x, g, i * ROW_BLOCK, &mut |r, c, v| {
                        dst[(r - i * ROW_BLOCK) * self.n + c] = v;
                    });
                }
            });
            return;
        }
        // Few rows (decode): each task takes groups of features, computed column-major
        // (`[feature][row]`), then copied.
        let mut by_col = vec![0f32; groups * GROUP * x.rows];
        let mut chunks: Vec<&mut [f32]> = by_col.chunks_mut(GROUP * x.rows).collect();
        compute::for_each_item(&mut chunks, |g, dst| {
            self.group_rows(level, x, g, 0, &mut |r, c, v| {
                dst[(c - g * GROUP) * x.rows + r] = v
            });
        });
        for (j, col) in by_col.chunks_exact(x.rows).take(self.n).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * self.n + j] = *v;
            }
        }
    }

    /// Group `g`'s features (those below `n`) for rows `r0..` (up to [`ROW_BLOCK`] of
    /// them), each output handed to `put(row, feature, value)`.
    fn group_rows(
        &self,
        level: Level,
        x: &QActs,
        g: usize,
        r0: usize,
        put: &mut dyn FnMut(usize, usize, f32),
    ) {
        let kb = self.k / QK;
        let group = self.group(g);
        let r1 = (r0 + ROW_BLOCK).min(x.rows);
        let features = (g * GROUP..(g + 1) * GROUP).take_while(|c| *c < self.n);
        let mut emit = |r: usize, out: &[f32; GROUP]| {
            for (c, v) in features.clone().zip(out) {
                put(r, c, *v);
            }
        };
        let mut r = r0;
        while r + TILE_ROWS <= r1 {
            let out = qdot::tile(level, self.packing, kb, group, &x.rows_at::<TILE_ROWS>(r));
            out.iter().enumerate().for_each(|(i, o)| emit(r + i, o));
            r += TILE_ROWS;
        }
        for r in r..r1 {
            emit(
                r,
                &qdot::tile(level, self.packing, kb, group, &x.rows_at::<1>(r))[0],
            );
        }
    }
}

/// Rows of activations quantized to signed bytes in blocks of 32.
#[derive(Debug, Clone)]
pub struct QActs {
    rows: usize,
    k: usize,
    /// Scale of each block, `rows × k/32`.
    d: Vec<f32>,
    /// `d · Σ q` of each block (for the weight offsets).
    s: Vec<f32>,
    /// The quantized values, `rows × k`.
    qs: Vec<i8>,
}

impl QActs {
    /// Quantizes `x` (`rows × k`, row-major, `k` a multiple of 32): per block, scale
    /// `d = max|x| / 127` and `q = round(x / d)` (ties to even).
    ///
    /// # Panics
    /// When `x.len()` is not a multiple of `k` or `k` of 32.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        assert!(
            k.is_multiple_of(QK) && x.len().is_multiple_of(k),
            "activation shape"
        );
        let blocks = x.len() / QK;
        let mut a = QActs {
            rows: x.len() / k,
            k,
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            qs: vec![0; x.len()],
        };
        a.d.resize(blocks, 0.0);
        a.s.resize(blocks, 0.0);
        qdot::quantize(kernels::level(), x, &mut a.qs, &mut a.d, &mut a.s);
        a
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn rows_at<const R: usize>(&self, r: usize) -> Rows<'_, R> {
        let kb = self.k / QK;
        Rows {
            qs: std::array::from_fn(|i| &self.qs[(r + i) * self.k..(r + i + 1) * self.k]),
            d: std::array::from_fn(|i| &self.d[(r + i) * kb..(r + i + 1) * kb]),
            s: std::array::from_fn(|i| &self.s[(r + i) * kb..(r + i + 1) * kb]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 / 101.0 - 0.5) * 0.4)
            .collect()
    }

    fn q4_1_blocks(n: usize, k: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for b in 0..n * k / QK {
            raw.extend(f16::from_f32(0.01 + (b % 7) as f32 * 0.002).to_le_bytes());
            raw.extend(f16::from_f32(-0.05 + (b % 3) as f32 * 0.01).to_le_bytes());
            raw.extend((0..16).map(|j| ((b * 31 + j * 7) % 256) as u8));
        }
        raw
    }

    /// Q4_1 blocks keep their exact values, and the product is close to the dense one.
    #[test]
    fn q4_1_values_are_exact_and_products_close() {
        let (n, k, rows) = (12, 96, 5);
        let w = QWeight::from_blocks(GgmlDType::Q4_1, n, k, &q4_1_blocks(n, k)).unwrap();
        // Block 0 of row 0: d = 0.01, m = -0.05, byte j = 7j.
        assert_eq!(
            w.value(0, 1),
            f16::from_f32(0.01).to_f32() * 7.0 + f16::from_f32(-0.05).to_f32()
        );
        assert_eq!(
            w.value(0, 17),
            f16::from_f32(0.01).to_f32() * 0.0 + f16::from_f32(-0.05).to_f32()
        );
        let x = values(rows * k, 1);
        let mut out = vec![0f32; rows * n];
        w.matmul(&QActs::quantize(&x, k), &mut out);
        for r in 0..rows {
            for i in 0..n {
                let dense: f32 = (0..k).map(|j| x[r * k + j] * w.value(i, j)).sum();
                let got = out[r * n + i];
                assert!(
                    (got - dense).abs() < 0.01 + 0.01 * dense.abs(),
                    "{got} vs {dense}"
                );
            }
        }
    }

    /// Each output row is bitwise the same whichever rows are computed with it, for
    /// every packing and for row counts across the tile and block sizes.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k, rows) = (22, 64, 70);
        let weights = [
            QWeight::from_blocks(GgmlDType::Q4_1, n, k, &q4_1_blocks(n, k)).unwrap(),
            QWeight::from_dense(&values(n * k, 5), n, k).unwrap(),
        ];
        let x = values(rows * k, 3);
        for w in &weights {
            let mut all = vec![0f32; rows * n];
            w.matmul(&QActs::quantize(&x, k), &mut all);
            for m in [1, 2, 3, 4, 5, 8, 9, 17, 63, 64, 65] {
                for start in [0, rows - m, (rows - m) / 2] {
                    let mut part = vec![0f32; m * n];
                    w.matmul(
                        &QActs::quantize(&x[start * k..(start + m) * k], k),
                        &mut part,
                    );
                    assert_eq!(
                        part,
                        all[start * n..(start + m) * n],
                        "{:?} rows {start}+{m}",
                        w.packing
                    );
                }
            }
        }
    }

    #[test]
    fn widths_that_are_not_whole_blocks_are_refused() {
        assert!(QWeight::from_dense(&values(2 * 40, 1), 2, 40).is_err());
    }
}
