//! Model geometry read from GGUF metadata, and the engine's own runtime configuration.

use crate::error::{EngineError, Result};
use crate::mock::MockLatency;
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Shape of a Llama-architecture model, as its GGUF metadata states it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Residual width.
    pub hidden: usize,
    /// Feed-forward inner width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length: the longest sequence the engine accepts.
    pub context_length: usize,
}

impl ModelConfig {
    /// Reads the geometry from GGUF metadata (`{arch}.block_count`, …). Fails on a
    /// non-Llama architecture or missing keys.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let arch = meta(ct, "general.architecture")?
            .to_string()
            .map_err(|e| EngineError::Model(e.to_string()))?
            .clone();
        if arch != "llama" {
            return Err(EngineError::Model(format!(
                "unsupported architecture `{arch}` (only `llama` is supported)"
            )));
        }
        let u = |key: &str| -> Result<usize> {
            let v = meta(ct, &format!("{arch}.{key}"))?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| EngineError::Model(format!("{arch}.{key}: {e}")))
        };
        let f = |key: &str| -> Result<f32> {
            meta(ct, &format!("{arch}.{key}"))?
                .to_f32()
                .map_err(|e| EngineError::Model(format!("{arch}.{key}: {e}")))
        };
        let hidden = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = u("rope.dimension_count").unwrap_or(hidden / n_head.max(1));
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => meta(ct, "tokenizer.ggml.tokens")?
                .to_vec()
                .map_err(|e| EngineError::Model(e.to_string()))?
                .len(),
        };
        let cfg = ModelConfig {
            n_layer: u("block_count")?,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            ffn: u("feed_forward_length")?,
            vocab,
            rope_base: f("rope.freq_base").unwrap_or(10_000.0),
            rms_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            context_length: u("context_length")?,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(EngineError::Model(format!("inconsistent geometry: {what}")));
        if self.n_layer == 0 || self.n_head == 0 || self.n_kv_head == 0 || self.head_dim == 0 {
            return bad("zero layers, heads or head dim");
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad("head_count is not a multiple of head_count_kv");
        }
        if self.n_head * self.head_dim != self.hidden {
            return bad("head_count × head_dim != embedding_length");
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("odd head dimension");
        }
        Ok(())
    }

    /// Width of one token's K (or V) row: `n_kv_head × head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

pub(crate) fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Model(format!("missing GGUF metadata key `{key}`")))
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 32-bit floats (default; exact).
    #[default]
    F32,
    /// 16-bit floats: half the memory and transfer bytes.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!("unknown KV dtype `{other}` (expected f32 or f16)")),
        }
    }
}

/// Runtime configuration of one engine instance.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// KV element type.
    pub kv_dtype: KvDtype,
    /// Tokens per KV block [1–256], default 16.
    pub block_size: usize,
    /// KV pool size in blocks; `None` sizes it for `default_kv_tokens` tokens.
    pub num_blocks: Option<usize>,
    /// Prompt tokens computed per prefill chunk [16–8192], default 512.
    pub prefill_chunk: usize,
    /// Full prompt blocks kept for reuse by later prompts with the same prefix; 0 = off
    /// (default).
    pub prefix_cache_blocks: usize,
    /// `Some` runs the mock backend instead of the model (deterministic tokens, this
    /// simulated latency, no weights loaded); `None` (default) runs the real model.
    pub mock: Option<MockLatency>,
    /// The f32 reference: weights dequantized to dense f32 and activations kept in f32
    /// (no 8-bit rounding) — the model as its GGUF defines it, several times slower and
    /// larger. For the quality check (`xpyd bench quality`), not for serving.
    pub reference_f32: bool,
}

/// Tokens the KV pool holds when `num_blocks` is not given.
pub const DEFAULT_KV_TOKENS: usize = 32_768;

impl EngineConfig {
    /// Defaults for a model file.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model_path: model_path.into(),
            kv_dtype: KvDtype::F32,
            block_size: 16,
            num_blocks: None,
            prefill_chunk: 512,
            prefix_cache_blocks: 0,
            mock: None,
            reference_f32: false,
        }
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(1..=256).contains(&self.block_size) {
            return Err(EngineError::InvalidParam {
                field: "block_size",
                reason: format!("{} is outside 1..=256", self.block_size),
            });
        }
        if !(16..=8192).contains(&self.prefill_chunk) {
            return Err(EngineError::InvalidParam {
                field: "prefill_chunk",
                reason: format!("{} is outside 16..=8192", self.prefill_chunk),
            });
        }
        if let Some(m) = &self.mock {
            m.validate()?;
        }
        if self.num_blocks == Some(0) {
            return Err(EngineError::InvalidParam {
                field: "num_blocks",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}
