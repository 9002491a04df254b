//! The Llama forward pass with an explicit, paged KV cache.
//!
//! Weights stay quantized for decode (Q4_1 is re-quantized to Q8_0 at load, since
//! candle has SIMD dot products for Q8_0 but not Q4_1); every prefill chunk uses dense f32
//! copies of the projection weights and a GEMM, so a prompt's KV does not depend on how it
//! was split into chunks (which the prefix cache relies on). Attention reads the cache
//! in place for decode and through a gathered copy for prefill.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::{AttnQuery, KvStore};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;
use std::io::{Read, Seek};

/// A projection `y = x Wᵀ`.
struct Linear {
    quant: QMatMul,
    /// Zero columns appended to inputs of `quant` (see [`vnni_pad`]).
    pad: usize,
    /// `Wᵀ` as contiguous f32 `[in, out]`, for many-token chunks.
    dense_t: Option<Tensor>,
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Zero columns to append to a `[n, k]` weight so candle's repacked AVX-512 VNNI Q8_0
/// kernels apply to it (they need `k % 256 == 0` and `n % 16 == 0`); 0 where they are
/// not available. Zero weights times zero inputs leave the product unchanged.
fn vnni_pad(n: usize, k: usize) -> usize {
    if !has_vnni() || k.is_multiple_of(256) || !n.is_multiple_of(16) {
        return 0;
    }
    k.next_multiple_of(256) - k
}

/// Q8_0 weights for decode, padded for the VNNI kernels where that applies.
fn quantize_q8(w: &Tensor) -> Result<(QMatMul, usize)> {
    let (n, k) = w.dims2()?;
    let pad = vnni_pad(n, k);
    let w = if pad > 0 {
        w.pad_with_zeros(1, 0, pad)?
    } else {
        w.clone()
    };
    Ok((
        QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?,
        pad,
    ))
}

impl Linear {
    fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        name: &str,
        with_dense: bool,
    ) -> Result<Self> {
        let qt = tensor(ct, r, name)?;
        let dense = qt.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        let (quant, pad) = match qt.dtype() {
            GgmlDType::Q4_0 | GgmlDType::Q4K | GgmlDType::Q6K => (QMatMul::from_qtensor(qt)?, 0),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                (QMatMul::Tensor(dense.clone()), 0)
            }
            // Q8_0 stays Q8_0 (re-quantizing its dequantized values is exact); Q4_1 and the
            // rest become Q8_0, which has SIMD kernels.
            _ => quantize_q8(&dense)?,
        };
        let dense_t = if with_dense {
            Some(dense.t()?.contiguous()?)
        } else {
            None
        };
        Ok(Linear {
            quant,
            pad,
            dense_t,
        })
    }

    fn forward(&self, x: &Tensor, dense: bool) -> Result<Tensor> {
        match (&self.dense_t, dense) {
            (Some(w), true) => Ok(x.matmul(w)?),
            _ if self.pad > 0 => Ok(self.quant.forward(&x.pad_with_zeros(1, 0, self.pad)?)?),
            _ => Ok(self.quant.forward(x)?),
        }
    }
}

fn tensor<R: Read + Seek>(ct: &gguf_file::Content, r: &mut R, name: &str) -> Result<QTensor> {
    ct.tensor(r, name, &Device::Cpu)
        .map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// One token of a decode batch.
pub struct DecodeItem<'a> {
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Position of `token` (= tokens already cached).
    pub pos: usize,
    /// Input token.
    pub token: u32,
}

/// What one forward pass computes.
pub enum Pass<'a> {
    /// A chunk of one sequence's prompt at positions `start..start+tokens.len()`.
    Prefill {
        /// The sequence's block table.
        table: &'a [u32],
        /// First position.
        start: usize,
        /// Prompt tokens of the chunk.
        tokens: &'a [u32],
    },
    /// One token for each of several sequences.
    Decode(&'a [DecodeItem<'a>]),
}

impl Pass<'_> {
    /// The pass's tokens and their positions, checked against the model: `None` for an
    /// empty pass, `BadToken` / `ContextOverflow` for ids or positions out of range.
    pub fn inputs(&self, cfg: &ModelConfig) -> Result<Option<(Vec<u32>, Vec<usize>)>> {
        let (tokens, positions): (Vec<u32>, Vec<usize>) = match self {
            Pass::Prefill { start, tokens, .. } => {
                (tokens.to_vec(), (*start..*start + tokens.len()).collect())
            }
            Pass::Decode(items) => items.iter().map(|it| (it.token, it.pos)).unzip(),
        };
        if tokens.is_empty() {
            return Ok(None);
        }
        if let Some(t) = tokens.iter().find(|t| **t as usize >= cfg.vocab) {
            return Err(EngineError::BadToken {
                id: *t,
                vocab: cfg.vocab,
            });
        }
        if let Some(p) = positions.iter().find(|p| **p >= cfg.context_length) {
            return Err(EngineError::ContextOverflow {
                tokens: p + 1,
                max: cfg.context_length,
            });
        }
        Ok(Some((tokens, positions)))
    }
}

/// The loaded model.
pub struct Model {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

impl Model {
    /// Loads weights from an open GGUF file.
    pub fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        cfg: ModelConfig,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let vec_f32 = |r: &mut R, name: &str| -> Result<Tensor> {
            Ok(tensor(ct, r, name)?
                .dequantize(&dev)?
                .to_dtype(DType::F32)?)
        };
        let embed_q = tensor(ct, r, "token_embd.weight")?;
        let embed = embed_q.dequantize(&dev)?.to_dtype(DType::F32)?;
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            Linear::load(ct, r, "output.weight", false)?
        } else {
            let (quant, pad) = quantize_q8(&embed)?;
            Linear {
                quant,
                pad,
                dense_t: None,
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec_f32(r, &p("attn_norm"))?,
                wq: Linear::load(ct, r, &p("attn_q"), true)?,
                wk: Linear::load(ct, r, &p("attn_k"), true)?,
                wv: Linear::load(ct, r, &p("attn_v"), true)?,
                wo: Linear::load(ct, r, &p("attn_output"), true)?,
                ffn_norm: vec_f32(r, &p("ffn_norm"))?,
                w_gate: Linear::load(ct, r, &p("ffn_gate"), true)?,
                w_up: Linear::load(ct, r, &p("ffn_up"), true)?,
                w_down: Linear::load(ct, r, &p("ffn_down"), true)?,
            });
        }
        let norm = vec_f32(r, "output_norm.weight")?;
        let half = cfg.head_dim / 2;
        let mut rope_cos = Vec::with_capacity(cfg.context_length * half);
        let mut rope_sin = Vec::with_capacity(cfg.context_length * half);
        for pos in 0..cfg.context_length {
            for i in 0..half {
                let freq = 1.0 / (cfg.rope_base as f64).powf(2.0 * i as f64 / cfg.head_dim as f64);
                let a = pos as f64 * freq;
                rope_cos.push(a.cos() as f32);
                rope_sin.push(a.sin() as f32);
            }
        }
        Ok(Model {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
        })
    }

    /// The model's geometry.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Rotates interleaved pairs `(x[2i], x[2i+1])` of every head of every token.
    fn rope(&self, x: &mut [f32], positions: &[usize], heads: usize) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        for (t, pos) in positions.iter().enumerate() {
            let cos = &self.rope_cos[pos * half..(pos + 1) * half];
            let sin = &self.rope_sin[pos * half..(pos + 1) * half];
            for h in 0..heads {
                let v = &mut x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                for i in 0..half {
                    let (a, b) = (v[2 * i], v[2 * i + 1]);
                    v[2 * i] = a * cos[i] - b * sin[i];
                    v[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Runs one pass, writing the new tokens' KV into `kv`. `on_layer(l, kv)` is called
    /// as soon as layer `l`'s KV is in the cache. Returns logits: one row for a prefill
    /// chunk (its last token), one per item for decode.
    pub fn forward(
        &self,
        pass: &Pass<'_>,
        kv: &mut KvStore,
        on_layer: &mut dyn FnMut(usize, &KvStore),
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let Some((tokens, positions)) = pass.inputs(cfg)? else {
            return Ok(Vec::new());
        };
        let n = tokens.len();
        let dense = std::env::var("XPYD_DENSE_ALL").is_ok() || matches!(pass, Pass::Prefill { .. });
        let (hd, kvd) = (cfg.head_dim, cfg.kv_dim());
        let ids = Tensor::new(tokens.as_slice(), &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let mut q = layer
                .wq
                .forward(&h, dense)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut k = layer
                .wk
                .forward(&h, dense)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v = layer
                .wv
                .forward(&h, dense)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            self.rope(&mut q, &positions, cfg.n_head);
            self.rope(&mut k, &positions, cfg.n_kv_head);
            let attn = match pass {
                Pass::Prefill { table, start, .. } => {
                    kv.write_rows(l, table, *start, &k, &v);
                    on_layer(l, kv);
                    self.prefill_attention(l, kv, table, *start, n, q)?
                }
                Pass::Decode(items) => {
                    for (i, it) in items.iter().enumerate() {
                        let rows = i * kvd..(i + 1) * kvd;
                        kv.write_rows(l, it.table, it.pos, &k[rows.clone()], &v[rows]);
                    }
                    on_layer(l, kv);
                    let mut out = vec![0f32; n * cfg.hidden];
                    let kv_ref: &KvStore = kv;
                    out.par_chunks_mut(cfg.hidden)
                        .zip(items.par_iter())
                        .enumerate()
                        .for_each(|(i, (o, it))| {
                            let query = AttnQuery {
                                table: it.table,
                                len: it.pos + 1,
                                q: &q[i * cfg.hidden..(i + 1) * cfg.hidden],
                            };
                            kv_ref.attend(l, &query, hd, o);
                        });
                    Tensor::from_vec(out, (n, cfg.hidden), &dev)?
                }
            };
            x = (x + layer.wo.forward(&attn, dense)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let g = layer.w_gate.forward(&h, dense)?;
            let u = layer.w_up.forward(&h, dense)?;
            let m = (candle_nn::ops::silu(&g)? * u)?;
            x = (x + layer.w_down.forward(&m, dense)?)?;
        }
        let x = match pass {
            Pass::Prefill { .. } => x.narrow(0, n - 1, 1)?,
            Pass::Decode(_) => x,
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.rms_eps)?;
        Ok(self.lm_head.forward(&x, false)?.to_vec2::<f32>()?)
    }

    /// Causal attention of a prompt chunk over everything cached so far.
    fn prefill_attention(
        &self,
        layer: usize,
        kv: &KvStore,
        table: &[u32],
        start: usize,
        n: usize,
        q: Vec<f32>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let group = nh / nkv;
        let len = start + n;
        let (kc, vc) = kv.gather(layer, table, len);
        let k = Tensor::from_vec(kc, (len, nkv, hd), &dev)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = Tensor::from_vec(vc, (len, nkv, hd), &dev)?
            .transpose(0, 1)?
            .contiguous()?;
        // [n, nh, hd] → [nh, n, hd] → [nkv, group·n, hd]: the heads of a group are adjacent.
        let q = Tensor::from_vec(q, (n, nh, hd), &dev)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((nkv, group * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.reshape((nkv, group, n, len))?;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..len).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, len), &dev)?;
        let att = att.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((nkv, group * n, len))?;
        let out = att.matmul(&v)?; // [nkv, group·n, hd]
        Ok(out
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, cfg.hidden))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_q8_projection_matches_dense() {
        let dev = Device::Cpu;
        let (n, k) = (48, 576);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.2)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let x: Vec<f32> = (0..3 * k)
            .map(|i| (i * 13 % 29) as f32 / 29.0 - 0.5)
            .collect();
        let x = Tensor::from_vec(x, (3, k), &dev).unwrap();
        let (quant, pad) = quantize_q8(&w).unwrap();
        let lin = Linear {
            quant,
            pad,
            dense_t: Some(w.t().unwrap().contiguous().unwrap()),
        };
        let q = lin.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        let d = lin.forward(&x, true).unwrap().to_vec2::<f32>().unwrap();
        for (qr, dr) in q.iter().zip(&d) {
            assert_eq!(qr.len(), n);
            for (a, b) in qr.iter().zip(dr) {
                assert!((a - b).abs() < 0.05 + 0.02 * b.abs(), "{a} vs {b}");
            }
        }
        // Row independence: a row alone gives bitwise the same output as in the batch.
        let one = lin
            .forward(&x.narrow(0, 1, 1).unwrap(), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(one[0], q[1]);
    }
}
