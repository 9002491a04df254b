//! xpyd's CPU inference engine: Llama-family GGUF models on candle with an explicit,
//! paged KV cache that can be exported from one engine and imported into another.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod compute;
pub mod config;
pub mod engine;
pub mod error;
mod kernels;

/// The SIMD level the kernels run at: detected once per process, optionally capped.
pub mod cpu {
    pub use crate::kernels::{Level, cap, detected, level};
}
pub mod kv;
pub mod mock;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod sequence;
pub mod testing;
pub mod tokenizer;

pub use config::{EngineConfig, KvDtype, ModelConfig};
pub use engine::{Engine, Generation, KvMemoryFactory, KvUsage, ModelInfo, fingerprint};
pub use error::{EngineError, Result};
pub use kv::{HeapMemory, KvFormatError, KvHeader, KvLayout, KvMemory, LayerChunk};
pub use mock::{MockLatency, MockModel};
pub use sampling::{MAX_TOP_LOGPROBS, SamplingParams, TokenLogprobs};
pub use sequence::{FinishReason, ResumeState, TokenEvent};
pub use tokenizer::{ChatMessage, Tokenizer};
