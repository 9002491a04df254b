//! The Llama forward pass with an explicit, paged KV cache.
//!
//! One computation per token, whichever pass it is in: every projection runs on the
//! model's own quantized blocks with integer kernels that compute each output row from
//! its input row alone ([`crate::quant`]), norms and activations are per row, and
//! attention does the same operations per query over the paged cache
//! ([`KvStore::attend_block`]) in a prefill chunk and in a decode step. So a token's KV
//! and logits do not depend on how the prompt was split into chunks, on which prefix came
//! from the prefix cache, on what else is in the decode batch, or on whether the token
//! was prefilled or decoded (which re-prefilling a migrated sequence relies on).

use crate::compute;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::{ATTN_QUERY_BLOCK, AttnQuery, KvStore};
use crate::quant::{QActs, QWeight};
use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Seek};

/// A projection's weights: the GGUF's own blocks (serving), or dense f32 (the reference).
enum Linear {
    Quant(QWeight),
    /// `[n, k]`, dequantized.
    Dense(Tensor),
}

/// Activation rows as a projection takes them: quantized once and shared by the
/// projections that read them, or f32 for the reference.
enum Acts {
    Quant(QActs),
    /// `[rows, k]`.
    Dense(Tensor),
}

impl Linear {
    fn load(qt: &QTensor, name: &str, reference: bool) -> Result<Self> {
        Ok(if reference {
            Linear::Dense(qt.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
        } else {
            Linear::Quant(QWeight::from_qtensor(qt, name)?)
        })
    }

    fn cols(&self) -> usize {
        match self {
            Linear::Quant(w) => w.cols(),
            Linear::Dense(w) => w.dims()[1],
        }
    }
}

/// `x Wᵀ` for the rows of `x`.
fn project(w: &Linear, x: &Acts) -> Result<Vec<f32>> {
    Ok(match (w, x) {
        (Linear::Quant(w), Acts::Quant(x)) => {
            let mut out = vec![0f32; x.rows() * w.rows()];
            w.matmul(x, &mut out);
            out
        }
        (Linear::Dense(w), Acts::Dense(x)) => x.matmul(&w.t()?)?.flatten_all()?.to_vec1()?,
        _ => unreachable!("a model's weights and activations share one precision"),
    })
}

/// RMS norm of each `alpha.len()`-wide row of `x`, scaled by `alpha`.
fn rms_norm(x: &[f32], alpha: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x
        .chunks_exact(alpha.len())
        .zip(out.chunks_exact_mut(alpha.len()))
    {
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let m = (sum2 / alpha.len() as f32 + eps).sqrt();
        for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
            *d = s / m * a;
        }
    }
    out
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn tensor<R: Read + Seek>(ct: &gguf_file::Content, r: &mut R, name: &str) -> Result<QTensor> {
    ct.tensor(r, name, &Device::Cpu)
        .map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
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
        /// Logits for every token of the chunk (scoring a prompt), not only the last.
        all_logits: bool,
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
    /// Token embeddings, dequantized, `vocab × hidden`.
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// Dense f32 weights and activations (the reference), not the quantized kernels.
    reference: bool,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

impl Model {
    /// Loads weights from an open GGUF file.
    pub fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        cfg: ModelConfig,
        reference: bool,
    ) -> Result<Self> {
        let dense = |qt: &QTensor| -> Result<Vec<f32>> {
            Ok(qt
                .dequantize(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let embed_q = tensor(ct, r, "token_embd.weight")?;
        let embed = dense(&embed_q)?;
        // Tied embeddings: the embedding matrix, in its own blocks, is the LM head.
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            Linear::load(&tensor(ct, r, "output.weight")?, "output.weight", reference)?
        } else {
            Linear::load(&embed_q, "token_embd.weight", reference)?
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let mut linear = |s: &str| Linear::load(&tensor(ct, r, &p(s))?, &p(s), reference);
            let (wq, wk, wv, wo) = (
                linear("attn_q")?,
                linear("attn_k")?,
                linear("attn_v")?,
                linear("attn_output")?,
            );
            let (w_gate, w_up, w_down) =
                (linear("ffn_gate")?, linear("ffn_up")?, linear("ffn_down")?);
            layers.push(Layer {
                attn_norm: dense(&tensor(ct, r, &p("attn_norm"))?)?,
                wq,
                wk,
                wv,
                wo,
                ffn_norm: dense(&tensor(ct, r, &p("ffn_norm"))?)?,
                w_gate,
                w_up,
                w_down,
            });
        }
        let norm = dense(&tensor(ct, r, "output_norm.weight")?)?;
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
            reference,
            rope_cos,
            rope_sin,
        })
    }

    /// `k`-wide activation rows in the model's precision.
    fn acts(&self, x: &[f32], k: usize) -> Result<Acts> {
        Ok(if self.reference {
            Acts::Dense(Tensor::from_slice(x, (x.len() / k, k), &Device::Cpu)?)
        } else {
            Acts::Quant(QActs::quantize(x, k))
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
    /// chunk (its last token, or every token with `all_logits`), one per item for decode.
    pub fn forward(
        &self,
        pass: &Pass<'_>,
        kv: &mut KvStore,
        on_layer: &mut dyn FnMut(usize, &KvStore),
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let Some((tokens, positions)) = pass.inputs(cfg)? else {
            return Ok(Vec::new());
        };
        let (n, hidden, kvd) = (tokens.len(), cfg.hidden, cfg.kv_dim());
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|t| &self.embed[*t as usize * hidden..(*t as usize + 1) * hidden])
            .copied()
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.acts(&rms_norm(&x, &layer.attn_norm, cfg.rms_eps), hidden)?;
            let mut q = project(&layer.wq, &h)?;
            let mut k = project(&layer.wk, &h)?;
            let v = project(&layer.wv, &h)?;
            self.rope(&mut q, &positions, cfg.n_head);
            self.rope(&mut k, &positions, cfg.n_kv_head);
            // Each token's K/V row goes in first; then every token attends over positions
            // up to its own, with the same per-query loop in either pass.
            let queries: Vec<AttnQuery<'_>> = match pass {
                Pass::Prefill { table, start, .. } => {
                    kv.write_rows(l, table, *start, &k, &v);
                    (0..n)
                        .map(|i| AttnQuery {
                            table,
                            len: start + i + 1,
                            q: &q[i * hidden..(i + 1) * hidden],
                        })
                        .collect()
                }
                Pass::Decode(items) => {
                    for (i, it) in items.iter().enumerate() {
                        let rows = i * kvd..(i + 1) * kvd;
                        kv.write_rows(l, it.table, it.pos, &k[rows.clone()], &v[rows]);
                    }
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, it)| AttnQuery {
                            table: it.table,
                            len: it.pos + 1,
                            q: &q[i * hidden..(i + 1) * hidden],
                        })
                        .collect()
                }
            };
            on_layer(l, kv);
            let mut attn = vec![0f32; n * hidden];
            // Blocks of consecutive queries of one sequence share each K/V tile.
            let mut blocks: Vec<(usize, &mut [f32])> = Vec::new();
            let mut rest: &mut [f32] = &mut attn;
            let mut i = 0;
            while i < n {
                let same = |j: &usize| std::ptr::eq(queries[*j].table, queries[i].table);
                let len = (i..n.min(i + ATTN_QUERY_BLOCK)).take_while(same).count();
                let (block, tail) = rest.split_at_mut(len * hidden);
                blocks.push((i, block));
                rest = tail;
                i += len;
            }
            let kv_ref: &KvStore = kv;
            compute::for_each_item(&mut blocks, |_, (at, out)| {
                let mut outs: Vec<&mut [f32]> = out.chunks_mut(hidden).collect();
                let qs = &queries[*at..*at + outs.len()];
                kv_ref.attend_block(l, qs, cfg.head_dim, &mut outs)
            });
            drop((blocks, queries));
            add_in_place(&mut x, &project(&layer.wo, &self.acts(&attn, hidden)?)?);
            let h = self.acts(&rms_norm(&x, &layer.ffn_norm, cfg.rms_eps), hidden)?;
            let mut m = project(&layer.w_gate, &h)?;
            let u = project(&layer.w_up, &h)?;
            for (g, u) in m.iter_mut().zip(&u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let ffn = layer.w_down.cols();
            add_in_place(&mut x, &project(&layer.w_down, &self.acts(&m, ffn)?)?);
        }
        // Logits of a prefill chunk's last token, or of every token or decode item.
        let last = match pass {
            Pass::Prefill {
                all_logits: false, ..
            } => &x[(n - 1) * hidden..],
            _ => &x[..],
        };
        let h = self.acts(&rms_norm(last, &self.norm, cfg.rms_eps), hidden)?;
        let logits = project(&self.lm_head, &h)?;
        Ok(logits
            .chunks_exact(cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
