//! Paged KV storage: per layer, one K and one V pool of `num_blocks × block_size` rows.
//!
//! A sequence owns a block table (block ids in position order); position `p` lives in
//! row `table[p / block_size] * block_size + p % block_size`. Rows are `kv_dim` wide.

use crate::config::KvDtype;
use crate::kernels::{self, attn};
use half::f16;

#[cfg(not(target_endian = "little"))]
compile_error!("the KV export layout is little endian; cache memory is used as such");
use half::slice::HalfFloatSliceExt;

/// Memory the KV pools live in. The default is the process heap; a decode worker can
/// put its pools in a shared-memory mapping instead, so that a same-host sender writes
/// received rows straight into the blocks (see [`KvStore::with_memory`]).
pub trait KvMemory: Send + Sync + std::fmt::Debug {
    /// The whole memory.
    fn bytes(&self) -> &[u8];
    /// The whole memory, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// Heap memory for the pools (8-byte aligned, zeroed; the OS commits pages on first touch).
#[derive(Debug)]
pub struct HeapMemory(Vec<u64>);

impl HeapMemory {
    /// At least `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        HeapMemory(vec![0; bytes.div_ceil(8)])
    }
}

impl KvMemory for HeapMemory {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Pools start at multiples of this within the memory.
const POOL_ALIGN: usize = 4096;

/// Key positions per online-softmax step of [`KvStore::attend_block`].
pub const ATTN_TILE: usize = 32;

/// Consecutive query tokens of one sequence that [`KvStore::attend_block`] takes at once
/// in a prefill chunk (they share each tile of K and V rows while it is in cache).
pub const ATTN_QUERY_BLOCK: usize = 16;

/// One layer's K or V pool, borrowed from the memory.
enum Pool<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// One layer's K or V pool, borrowed writable.
enum PoolMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

impl Pool<'_> {
    fn read_f32(&self, at: usize, dst: &mut [f32]) {
        match self {
            Pool::F32(p) => dst.copy_from_slice(&p[at..at + dst.len()]),
            Pool::F16(p) => p[at..at + dst.len()].convert_to_f32_slice(dst),
        }
    }

    /// `elems` elements at `at` as their in-memory bytes (little endian: the export layout).
    fn bytes(&self, at: usize, elems: usize) -> &[u8] {
        match self {
            Pool::F32(p) => bytemuck::cast_slice(&p[at..at + elems]),
            Pool::F16(p) => bytemuck::cast_slice(&p[at..at + elems]),
        }
    }
}

impl PoolMut<'_> {
    fn write_f32(&mut self, at: usize, src: &[f32]) {
        match self {
            PoolMut::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            PoolMut::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// `elems` elements at `at` as their in-memory bytes.
    fn bytes_mut(&mut self, at: usize, elems: usize) -> &mut [u8] {
        match self {
            PoolMut::F32(p) => bytemuck::cast_slice_mut(&mut p[at..at + elems]),
            PoolMut::F16(p) => bytemuck::cast_slice_mut(&mut p[at..at + elems]),
        }
    }
}

/// Where the pools are in the memory, for a peer that writes rows into it: pool
/// `(layer, V?)` starts at `pools[layer][V as usize]`, and position `p` of a sequence
/// with block table `t` is the row at `(t[p / block_size] * block_size + p % block_size)
/// * row_bytes` within its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of one K or V row.
    pub row_bytes: usize,
    /// Byte offsets of each layer's K and V pools.
    pub pools: Vec<[usize; 2]>,
    /// Size of the memory.
    pub memory_bytes: usize,
}

/// Checks payload bytes `offset..offset + bytes.len()` already in the cache (see
/// [`KvStore::check_rows`]); an `Err` fails the import.
pub type RowCheck<'a> = dyn FnMut(usize, &[u8]) -> Result<(), String> + 'a;

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
    mem: Box<dyn KvMemory>,
    /// Bytes from one pool's start to the next.
    stride: usize,
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
    /// Allocates the pools on the heap (zeroed; the OS commits pages on first touch).
    pub fn new(shape: CacheShape) -> Self {
        Self::with_memory(shape, Box::new(HeapMemory::new(Self::bytes_needed(shape))))
            .expect("heap memory is sized and aligned for the shape")
    }

    /// Bytes of memory the pools of `shape` take.
    pub fn bytes_needed(shape: CacheShape) -> usize {
        2 * shape.n_layer * Self::stride_of(shape)
    }

    fn stride_of(shape: CacheShape) -> usize {
        (shape.num_blocks * shape.block_size * shape.kv_dim * shape.dtype.size())
            .next_multiple_of(POOL_ALIGN)
    }

    /// Puts the pools in `mem`, which must hold [`KvStore::bytes_needed`] bytes and be
    /// aligned for the element type (a mapping is page-aligned).
    pub fn with_memory(shape: CacheShape, mem: Box<dyn KvMemory>) -> Result<Self, String> {
        let need = Self::bytes_needed(shape);
        let have = mem.bytes();
        if have.len() < need {
            return Err(format!(
                "KV memory has {} bytes, the pools need {need}",
                have.len()
            ));
        }
        if have.as_ptr().align_offset(std::mem::align_of::<f32>()) != 0 {
            return Err("KV memory is not 4-byte aligned".into());
        }
        Ok(KvStore {
            shape,
            mem,
            stride: Self::stride_of(shape),
        })
    }

    /// Where the pools are in the memory.
    pub fn layout(&self) -> KvLayout {
        KvLayout {
            block_size: self.shape.block_size,
            row_bytes: self.shape.kv_dim * self.shape.dtype.size(),
            pools: (0..self.shape.n_layer)
                .map(|l| [self.pool_offset(l, false), self.pool_offset(l, true)])
                .collect(),
            memory_bytes: self.mem.bytes().len(),
        }
    }

    fn pool_offset(&self, layer: usize, v: bool) -> usize {
        (2 * layer + usize::from(v)) * self.stride
    }

    fn pool_len(&self) -> usize {
        self.shape.num_blocks * self.shape.block_size * self.shape.kv_dim * self.shape.dtype.size()
    }

    fn pool(&self, layer: usize, v: bool) -> Pool<'_> {
        let at = self.pool_offset(layer, v);
        let bytes = &self.mem.bytes()[at..at + self.pool_len()];
        match self.shape.dtype {
            KvDtype::F32 => Pool::F32(bytemuck::cast_slice(bytes)),
            KvDtype::F16 => Pool::F16(bytemuck::cast_slice(bytes)),
        }
    }

    fn pool_mut(&mut self, layer: usize, v: bool) -> PoolMut<'_> {
        let (at, len, dtype) = (
            self.pool_offset(layer, v),
            self.pool_len(),
            self.shape.dtype,
        );
        let bytes = &mut self.mem.bytes_mut()[at..at + len];
        match dtype {
            KvDtype::F32 => PoolMut::F32(bytemuck::cast_slice_mut(bytes)),
            KvDtype::F16 => PoolMut::F16(bytemuck::cast_slice_mut(bytes)),
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
            self.pool_mut(layer, false).write_f32(at, kr);
            self.pool_mut(layer, true).write_f32(at, vr);
        }
    }

    /// The runs of positions `start..start+n` that are contiguous in the cache, in the
    /// export layout's order (all K rows, then all V rows): `(V?, element offset in the
    /// pool, rows)`.
    fn runs(&self, table: &[u32], start: usize, n: usize) -> Vec<(bool, usize, usize)> {
        let bs = self.shape.block_size;
        let mut out = Vec::with_capacity(2 * (n / bs + 2));
        for v in [false, true] {
            let mut pos = start;
            while pos < start + n {
                let run = (bs - pos % bs).min(start + n - pos);
                out.push((v, self.row_offset(table, pos), run));
                pos += run;
            }
        }
        out
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
        let d = self.shape.kv_dim;
        let row = d * self.shape.dtype.size();
        let mut off = 0;
        for (v, at, rows) in self.runs(table, start, n) {
            fill(off, self.pool_mut(layer, v).bytes_mut(at, rows * d))?;
            off += rows * row;
        }
        Ok(())
    }

    /// Like [`KvStore::fill_rows`] for rows a peer already wrote into the cache memory:
    /// `check(offset, bytes)` sees the cache's bytes of each run, in payload order.
    pub fn check_rows(
        &self,
        layer: usize,
        table: &[u32],
        start: usize,
        n: usize,
        check: &mut RowCheck<'_>,
    ) -> Result<(), String> {
        let row = self.shape.kv_dim * self.shape.dtype.size();
        let mut off = 0;
        for (v, at, rows) in self.runs(table, start, n) {
            check(off, self.pool(layer, v).bytes(at, rows * self.shape.kv_dim))?;
            off += rows * row;
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
        for v in [false, true] {
            let pool = self.pool(layer, v);
            for pos in start..start + n {
                out.extend_from_slice(pool.bytes(self.row_offset(table, pos), d));
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
        self.pool(layer, false).read_f32(at, k);
        self.pool(layer, true).read_f32(at, v);
    }

    /// Attention of query tokens of one sequence (one block table) against its cache
    /// (positions `0..query.len` each), for every head, into `outs[i]` (`n_head ×
    /// head_dim`). Query heads `h` use KV head `h / (n_head / n_kv_head)`.
    ///
    /// Prefill chunks call this for blocks of consecutive tokens and decode steps for
    /// one token, and a token's result is the same either way: an online softmax over
    /// tiles of [`ATTN_TILE`] positions counted from position 0, every sum taken in
    /// a fixed order, the same operations for each query whatever else is in its
    /// block. The block shares each tile's K and V rows, read once for all its queries.
    ///
    /// # Panics
    /// When the queries do not share one block table, or `outs` and `queries` differ in
    /// length.
    pub fn attend_block(
        &self,
        layer: usize,
        queries: &[AttnQuery<'_>],
        head_dim: usize,
        outs: &mut [&mut [f32]],
    ) {
        assert_eq!(queries.len(), outs.len());
        let Some(first) = queries.first() else {
            return;
        };
        let table = first.table;
        assert!(queries.iter().all(|q| std::ptr::eq(q.table, table)));
        let d = self.shape.kv_dim;
        let n_head = first.q.len() / head_dim;
        let n_kv = d / head_dim;
        let group = n_head / n_kv;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let longest = queries.iter().map(|q| q.len).max().unwrap_or(0);
        // One tile's scores of a KV head's query heads, for two queries: head `i` of the
        // group at `i · ATTN_TILE`.
        let mut scores = [vec![0f32; group * ATTN_TILE], vec![0f32; group * ATTN_TILE]];
        let mut rescale = vec![0f32; group];
        let mut max = vec![f32::NEG_INFINITY; n_head * queries.len()];
        let mut sum = vec![0f32; n_head * queries.len()];
        let (kp, vp) = (self.pool(layer, false), self.pool(layer, true));
        let (mut kbuf, mut vbuf) = match kp {
            Pool::F32(_) => (Vec::new(), Vec::new()),
            Pool::F16(_) => (vec![0f32; ATTN_TILE * d], vec![0f32; ATTN_TILE * d]),
        };
        let level = kernels::level();
        outs.iter_mut().for_each(|o| o.fill(0.0));
        for tile in (0..longest).step_by(ATTN_TILE) {
            let count = ATTN_TILE.min(longest - tile);
            let krows = self.tile_rows(&kp, table, tile, count, &mut kbuf);
            let vrows = self.tile_rows(&vp, table, tile, count, &mut vbuf);
            // Queries in pairs that both see the tile: their scores are taken together.
            let mut qi = 0;
            while qi < queries.len() {
                if queries[qi].len <= tile {
                    qi += 1;
                    continue;
                }
                let paired = queries.get(qi + 1).is_some_and(|b| b.len > tile);
                let taken = 1 + usize::from(paired);
                let n: [usize; 2] = std::array::from_fn(|i| match queries.get(qi + i) {
                    Some(q) if i < taken => ATTN_TILE.min(q.len - tile),
                    _ => 0,
                });
                for kv in 0..n_kv {
                    // The query heads `h0..h0 + group` read KV head `kv` at `g`.
                    let (h0, g) = (kv * group, kv * head_dim);
                    let heads = h0 * head_dim..(h0 + group) * head_dim;
                    let [sa, sb] = &mut scores;
                    let qa = &queries[qi].q[heads.clone()];
                    if paired {
                        // Rows past the shorter query's end are scored and left unused.
                        let k = &krows[..n[0].max(n[1])];
                        let qb = &queries[qi + 1].q[heads.clone()];
                        attn::pair_scores(level, [qa, qb], k, g, scale, [sa, sb], ATTN_TILE);
                    } else {
                        attn::group_scores(level, qa, &krows[..n[0]], g, scale, sa, ATTN_TILE);
                    }
                    for (i, sc) in scores.iter_mut().enumerate().take(taken) {
                        let (q, n) = (qi + i, n[i]);
                        for (j, r) in rescale.iter_mut().enumerate() {
                            let s = &mut sc[j * ATTN_TILE..j * ATTN_TILE + n];
                            let st = q * n_head + h0 + j;
                            // exp(-inf) = 0 on the first tile: nothing accumulated yet.
                            let (new_max, rs, tile_sum) = attn::softmax_tile(level, s, max[st]);
                            sum[st] = sum[st] * rs + tile_sum;
                            max[st] = new_max;
                            *r = rs;
                        }
                        let (v, o) = (&vrows[..n], &mut outs[q][heads.clone()]);
                        attn::group_accumulate(level, sc, ATTN_TILE, v, g, &rescale, o);
                    }
                }
                qi += taken;
            }
        }
        for (qi, out) in outs.iter_mut().enumerate() {
            for h in 0..n_head {
                let inv = 1.0 / sum[qi * n_head + h];
                out[h * head_dim..(h + 1) * head_dim]
                    .iter_mut()
                    .for_each(|o| *o *= inv);
            }
        }
    }

    /// Rows `start..start + n` (`n ≤ ATTN_TILE`) of one pool as f32, the first `n` of the
    /// array: borrowed from an f32 pool, converted into `scratch` (`n × kv_dim` or more)
    /// otherwise.
    fn tile_rows<'a>(
        &self,
        pool: &'a Pool<'_>,
        table: &[u32],
        start: usize,
        n: usize,
        scratch: &'a mut [f32],
    ) -> [&'a [f32]; ATTN_TILE] {
        let d = self.shape.kv_dim;
        let mut rows: [&[f32]; ATTN_TILE] = [&[]; ATTN_TILE];
        match pool {
            Pool::F32(p) => {
                for (i, row) in rows.iter_mut().take(n).enumerate() {
                    let at = self.row_offset(table, start + i);
                    *row = &p[at..at + d];
                }
            }
            Pool::F16(_) => {
                for (i, row) in scratch.chunks_exact_mut(d).take(n).enumerate() {
                    pool.read_f32(self.row_offset(table, start + i), row);
                }
                for (row, src) in rows.iter_mut().zip(scratch.chunks_exact(d).take(n)) {
                    *row = src;
                }
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one query over positions `0..len`, in f64 from the cache's own rows.
    fn reference(kv: &KvStore, table: &[u32], q: &[f32], len: usize, hd: usize) -> Vec<f64> {
        let d = kv.shape().kv_dim;
        let n_head = q.len() / hd;
        let group = n_head / (d / hd);
        let (mut k, mut v) = (vec![0f32; d], vec![0f32; d]);
        let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..len)
            .map(|p| {
                kv.read_row_f32(0, table, p, &mut k, &mut v);
                (k.clone(), v.clone())
            })
            .collect();
        let mut out = vec![0f64; q.len()];
        for h in 0..n_head {
            let (qh, g) = (&q[h * hd..(h + 1) * hd], (h / group) * hd);
            let s: Vec<f64> = rows
                .iter()
                .map(|(k, _)| {
                    let dot: f64 = qh
                        .iter()
                        .zip(&k[g..])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    dot / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (w, (_, v)) in e.iter().zip(&rows) {
                for i in 0..hd {
                    out[h * hd + i] += w / z * v[g + i] as f64;
                }
            }
        }
        out
    }

    /// SmolLM2's shape (9 query heads on 3 KV heads of 64): a block of queries of uneven
    /// lengths — pairs that differ in their last tile, a query that does not see the last
    /// tile between two that do, whole tiles, one position — each gets exactly what it
    /// gets attended alone, and the f64 reference within float error; in both pool types.
    #[test]
    fn each_query_of_a_block_gets_its_own_attention() {
        let (n_head, n_kv, hd) = (9, 3, 64);
        let d = n_kv * hd;
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let shape = CacheShape {
                n_layer: 1,
                kv_dim: d,
                block_size: 16,
                num_blocks: 8,
                dtype,
            };
            let mut kv = KvStore::new(shape);
            let table = [3u32, 0, 5, 1, 7];
            let total = 75;
            let rows = |salt: usize| -> Vec<f32> {
                (0..total * d)
                    .map(|i| ((i * 7 + salt) as f32 * 0.173).sin() * 2.0)
                    .collect()
            };
            kv.write_rows(0, &table, 0, &rows(1), &rows(2));
            let lens = [75, 74, 64, 33, 70, 75, 1, 32, 65];
            let qs: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(j, _)| {
                    (0..n_head * hd)
                        .map(|i| ((i * 3 + j * 101) as f32 * 0.291).cos() * 1.5)
                        .collect()
                })
                .collect();
            let queries: Vec<AttnQuery<'_>> = lens
                .iter()
                .zip(&qs)
                .map(|(&len, q)| AttnQuery {
                    table: &table,
                    len,
                    q,
                })
                .collect();
            let mut outs = vec![vec![0f32; n_head * hd]; lens.len()];
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
            kv.attend_block(0, &queries, hd, &mut refs);
            for (i, query) in queries.iter().enumerate() {
                let mut alone = vec![0f32; n_head * hd];
                kv.attend_block(0, std::slice::from_ref(query), hd, &mut [&mut alone]);
                assert_eq!(outs[i], alone, "{dtype:?}: query {i} (len {})", lens[i]);
                let want = reference(&kv, &table, &qs[i], lens[i], hd);
                let err = outs[i]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err < 1e-5,
                    "{dtype:?}: query {i} is {err} off the reference"
                );
            }
        }
    }
}
