//! Paged KV storage: per layer, one K and one V pool of `num_blocks × block_size` rows.
//!
//! A sequence owns a block table (block ids in position order); position `p` lives in
//! row `table[p / block_size] * block_size + p % block_size`. Rows are `kv_dim` wide.

use crate::config::KvDtype;
use crate::kernels::{axpy, dot};
use half::f16;

#[cfg(not(target_endian = "little"))]
compile_error!("the KV export layout is little endian; cache memory is used as such");
use half::slice::HalfFloatSliceExt;

/// One layer's K or V pool.
#[derive(Debug)]
enum Pool {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Pool {
    fn new(dtype: KvDtype, elems: usize) -> Self {
        match dtype {
            KvDtype::F32 => Pool::F32(vec![0.0; elems]),
            KvDtype::F16 => Pool::F16(vec![f16::ZERO; elems]),
        }
    }

    fn write_f32(&mut self, at: usize, src: &[f32]) {
        match self {
            Pool::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            Pool::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    fn read_f32(&self, at: usize, dst: &mut [f32]) {
        match self {
            Pool::F32(p) => dst.copy_from_slice(&p[at..at + dst.len()]),
            Pool::F16(p) => p[at..at + dst.len()].convert_to_f32_slice(dst),
        }
    }

    /// `elems` elements at `at` as their in-memory bytes (little endian: the export layout).
    fn bytes_mut(&mut self, at: usize, elems: usize) -> &mut [u8] {
        match self {
            Pool::F32(p) => bytemuck::cast_slice_mut(&mut p[at..at + elems]),
            Pool::F16(p) => bytemuck::cast_slice_mut(&mut p[at..at + elems]),
        }
    }

    fn read_le_bytes(&self, at: usize, elems: usize, out: &mut Vec<u8>) {
        match self {
            Pool::F32(p) => p[at..at + elems]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Pool::F16(p) => p[at..at + elems]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
        }
    }
}

/// Supplies payload bytes `offset..offset + dst.len()` into `dst` (see
/// [`KvStore::fill_rows`]); an `Err` aborts the fill.
pub type RowFill<'a> = dyn FnMut(usize, &mut [u8]) -> Result<(), String> + 'a;

/// Geometry of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Layers.
    pub n_layer: usize,
    /// Width of a K or V row.
    pub kv_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Element type.
    pub dtype: KvDtype,
}

/// The KV storage of every layer.
#[derive(Debug)]
pub struct KvStore {
    shape: CacheShape,
    k: Vec<Pool>,
    v: Vec<Pool>,
}

/// Where attention for one query token looks.
pub struct AttnQuery<'a> {
    /// Block table of the sequence.
    pub table: &'a [u32],
    /// Positions `0..len` are visible.
    pub len: usize,
    /// `n_head × head_dim` query, already rotated.
    pub q: &'a [f32],
}

impl KvStore {
    /// Allocates the pools (zeroed; the OS commits pages on first touch).
    pub fn new(shape: CacheShape) -> Self {
        let elems = shape.num_blocks * shape.block_size * shape.kv_dim;
        KvStore {
            shape,
            k: (0..shape.n_layer)
                .map(|_| Pool::new(shape.dtype, elems))
                .collect(),
            v: (0..shape.n_layer)
                .map(|_| Pool::new(shape.dtype, elems))
                .collect(),
        }
    }

    /// The geometry.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    fn row_offset(&self, table: &[u32], pos: usize) -> usize {
        let bs = self.shape.block_size;
        (table[pos / bs] as usize * bs + pos % bs) * self.shape.kv_dim
    }

    /// Writes `k`/`v` rows (`n × kv_dim`, f32) for positions `start..start+n`.
    pub fn write_rows(&mut self, layer: usize, table: &[u32], start: usize, k: &[f32], v: &[f32]) {
        let d = self.shape.kv_dim;
        for (i, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            let at = self.row_offset(table, start + i);
            self.k[layer].write_f32(at, kr);
            self.v[layer].write_f32(at, vr);
        }
    }

    /// Fills positions `start..start+n` of one layer from bytes in the export layout (all K
    /// rows, then all V rows, little endian). `fill(offset, dst)` writes the payload bytes
    /// at `offset..offset + dst.len()` into `dst`, which is the cache memory itself; it is
    /// called once per run of rows that is contiguous in the cache, in payload order.
    pub fn fill_rows(
        &mut self,
        layer: usize,
        table: &[u32],
        start: usize,
        n: usize,
        fill: &mut RowFill<'_>,
    ) -> Result<(), String> {
        let (d, bs, esz) = (
            self.shape.kv_dim,
            self.shape.block_size,
            self.shape.dtype.size(),
        );
        let mut off = 0;
        for v in [false, true] {
            let mut pos = start;
            while pos < start + n {
                let run = (bs - pos % bs).min(start + n - pos);
                let at = self.row_offset(table, pos);
                let pool = if v {
                    &mut self.v[layer]
                } else {
                    &mut self.k[layer]
                };
                fill(off, pool.bytes_mut(at, run * d))?;
                off += run * d * esz;
                pos += run;
            }
        }
        Ok(())
    }

    /// Appends positions `start..start+n` of one layer as little-endian bytes: all K rows,
    /// then all V rows.
    pub fn read_rows_bytes(
        &self,
        layer: usize,
        table: &[u32],
        start: usize,
        n: usize,
        out: &mut Vec<u8>,
    ) {
        let d = self.shape.kv_dim;
        for pool in [&self.k[layer], &self.v[layer]] {
            for pos in start..start + n {
                pool.read_le_bytes(self.row_offset(table, pos), d, out);
            }
        }
    }

    /// Copies the K and V rows (`kv_dim` each, as f32) of position `pos` of one layer.
    pub fn read_row_f32(
        &self,
        layer: usize,
        table: &[u32],
        pos: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) {
        let at = self.row_offset(table, pos);
        self.k[layer].read_f32(at, k);
        self.v[layer].read_f32(at, v);
    }

    /// Copies positions `0..len` of one layer into contiguous f32 `K` and `V` (`len × kv_dim`).
    pub fn gather(&self, layer: usize, table: &[u32], len: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.shape.kv_dim;
        let mut k = vec![0f32; len * d];
        let mut v = vec![0f32; len * d];
        for pos in 0..len {
            let at = self.row_offset(table, pos);
            self.k[layer].read_f32(at, &mut k[pos * d..(pos + 1) * d]);
            self.v[layer].read_f32(at, &mut v[pos * d..(pos + 1) * d]);
        }
        (k, v)
    }

    /// Attention of one query token against its sequence's cache, for every head, into
    /// `out` (`n_head × head_dim`). Query heads `h` use KV head `h / (n_head / n_kv_head)`.
    pub fn attend(&self, layer: usize, query: &AttnQuery<'_>, head_dim: usize, out: &mut [f32]) {
        let d = self.shape.kv_dim;
        let n_head = query.q.len() / head_dim;
        let group = n_head / (d / head_dim);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let len = query.len;
        let mut scores = vec![0f32; n_head * len];
        let mut row = vec![0f32; d];
        // Pass 1: scores. Each K row is read once for all heads.
        for pos in 0..len {
            let krow = self.row_f32(&self.k[layer], query.table, pos, &mut row);
            for h in 0..n_head {
                let g = h / group;
                let qh = &query.q[h * head_dim..(h + 1) * head_dim];
                scores[h * len + pos] = dot(qh, &krow[g * head_dim..(g + 1) * head_dim]) * scale;
            }
        }
        for h in 0..n_head {
            softmax_in_place(&mut scores[h * len..(h + 1) * len]);
        }
        // Pass 2: weighted sum of V rows.
        out.fill(0.0);
        for pos in 0..len {
            let vrow = self.row_f32(&self.v[layer], query.table, pos, &mut row);
            for h in 0..n_head {
                let g = h / group;
                axpy(
                    scores[h * len + pos],
                    &vrow[g * head_dim..(g + 1) * head_dim],
                    &mut out[h * head_dim..(h + 1) * head_dim],
                );
            }
        }
    }

    /// One row as f32: borrowed from an f32 pool, converted into `scratch` otherwise.
    fn row_f32<'a>(
        &self,
        pool: &'a Pool,
        table: &[u32],
        pos: usize,
        scratch: &'a mut [f32],
    ) -> &'a [f32] {
        let at = self.row_offset(table, pos);
        let d = self.shape.kv_dim;
        match pool {
            Pool::F32(p) => &p[at..at + d],
            Pool::F16(_) => {
                pool.read_f32(at, scratch);
                scratch
            }
        }
    }
}

/// Numerically stable softmax.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}
