//! Test fixtures: tiny random-weight Llama models written as real GGUF files, so tests of
//! every crate run the real loading and forward code in milliseconds.

use crate::error::Result;
use crate::{Engine, SamplingParams};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// Seed of the random weights: different seeds are different models.
    pub seed: u64,
    /// Layers.
    pub n_layer: usize,
    /// Residual width (multiple of 32).
    pub hidden: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv_head: usize,
    /// FFN width (multiple of 32).
    pub ffn: usize,
    /// Context length.
    pub context: usize,
    /// `tokenizer.chat_template` (none: the engine's ChatML default).
    pub chat_template: Option<String>,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            seed: 1,
            n_layer: 2,
            hidden: 64,
            n_head: 4,
            n_kv_head: 2,
            ffn: 128,
            context: 1024,
            chat_template: None,
        }
    }
}

/// GPT-2's byte → printable-char mapping used by byte-level BPE vocabularies.
fn byte_symbols() -> Vec<String> {
    let printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec![String::new(); 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).expect("valid char").to_string();
    }
    out
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

impl TinyModel {
    /// Vocabulary: 3 ChatML specials then the 256 byte tokens.
    pub const VOCAB: usize = 259;

    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Lcg(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut mat = |rows: usize, cols: usize, scale: f32, dtype: GgmlDType| -> Result<QTensor> {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.next() * scale).collect();
            let t = Tensor::from_vec(data, (rows, cols), &dev)?;
            Ok(QTensor::quantize(&t, dtype)?)
        };
        let head_dim = self.hidden / self.n_head;
        let kv = self.n_kv_head * head_dim;
        let ones = |n: usize| -> Result<QTensor> {
            Ok(QTensor::quantize(
                &Tensor::ones(n, candle_core::DType::F32, &dev)?,
                GgmlDType::F32,
            )?)
        };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        tensors.push((
            "token_embd.weight".into(),
            mat(Self::VOCAB, self.hidden, 2.0, GgmlDType::Q8_0)?,
        ));
        let proj = 1.0 / (self.hidden as f32).sqrt();
        for i in 0..self.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            tensors.push((p("attn_norm"), ones(self.hidden)?));
            tensors.push((
                p("attn_q"),
                mat(self.hidden, self.hidden, 4.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((
                p("attn_k"),
                mat(kv, self.hidden, 4.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((
                p("attn_v"),
                mat(kv, self.hidden, 2.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((
                p("attn_output"),
                mat(self.hidden, self.hidden, 2.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((p("ffn_norm"), ones(self.hidden)?));
            tensors.push((
                p("ffn_gate"),
                mat(self.ffn, self.hidden, 2.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((
                p("ffn_up"),
                mat(self.ffn, self.hidden, 2.0 * proj, GgmlDType::Q4_1)?,
            ));
            tensors.push((
                p("ffn_down"),
                mat(self.hidden, self.ffn, 2.0 * proj, GgmlDType::Q8_0)?,
            ));
        }
        tensors.push(("output_norm.weight".into(), ones(self.hidden)?));

        let mut tokens = vec![
            "<|endoftext|>".to_string(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend(byte_symbols());
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let s = |x: &str| Value::String(x.to_string());
        let u = |x: usize| Value::U32(x as u32);
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", s("llama")),
            ("general.name", s(&format!("tiny-{}", self.seed))),
            ("llama.block_count", u(self.n_layer)),
            ("llama.context_length", u(self.context)),
            ("llama.embedding_length", u(self.hidden)),
            ("llama.feed_forward_length", u(self.ffn)),
            ("llama.attention.head_count", u(self.n_head)),
            ("llama.attention.head_count_kv", u(self.n_kv_head)),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
            ("llama.rope.dimension_count", u(head_dim)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.vocab_size", u(Self::VOCAB)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("smollm")),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(vec![])),
            ("tokenizer.ggml.bos_token_id", u(1)),
            ("tokenizer.ggml.eos_token_id", u(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ];
        let mut meta = meta;
        if let Some(t) = &self.chat_template {
            meta.push(("tokenizer.chat_template", s(t)));
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)
            .map_err(|e| crate::EngineError::Model(format!("{}: {e}", path.display())))?;
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        Ok(())
    }
}

/// The disaggregated path in one process: prefill `prompt` in engine `a`, export the KV
/// to bytes, import it into engine `b` and decode there to the end. Returns every
/// generated token (the first one sampled by `a`). Both engines end with no sequences.
pub fn generate_split(
    a: &mut Engine,
    b: &mut Engine,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<Vec<u32>> {
    const ID: u64 = u64::MAX;
    a.add_sequence(ID, prompt, params)?;
    let exported = a
        .prefill(ID, &mut |_| {})
        .and_then(|first| Ok((first, a.export(ID)?)));
    a.remove(ID);
    let (first, bytes) = exported?;
    b.import(ID, &bytes)?;
    let mut out = vec![first.token];
    let rest = match first.finish {
        None => b.run_to_end(ID, &mut |ev| out.push(ev.token)).map(drop),
        Some(_) => Ok(()),
    };
    b.remove(ID);
    rest.map(|()| out)
}
