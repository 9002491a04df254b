//! Typed errors of the engine, with a retryable-vs-fatal split callers use to retry or fail.

use crate::kv::format::KvFormatError;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing, unreadable, or not a supported Llama GGUF.
    #[error("model: {0}")]
    Model(String),
    /// A sampling or request parameter is out of its allowed range.
    #[error("invalid parameter `{field}`: {reason}")]
    InvalidParam {
        /// The offending field, as users spell it (`temperature`, `top_p`, …).
        field: &'static str,
        /// What the allowed range is.
        reason: String,
    },
    /// The KV block pool cannot hold the sequence; nothing was allocated.
    #[error("out of KV blocks: need {needed}, {free} free of {total}")]
    OutOfBlocks {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks free at the time.
        free: usize,
        /// Size of the pool.
        total: usize,
    },
    /// The prompt (plus what must be generated) exceeds the model's context.
    #[error("prompt of {tokens} tokens exceeds the context length of {max} tokens")]
    ContextOverflow {
        /// Tokens asked for.
        tokens: usize,
        /// The model's context length.
        max: usize,
    },
    /// A request with no prompt tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// No sequence with this id.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// A sequence with this id exists already.
    #[error("sequence {0} already exists")]
    DuplicateSequence(u64),
    /// The sequence is not in the state the call needs (e.g. decode before prefill).
    #[error("sequence {id} is {state}, expected {expected}")]
    WrongState {
        /// The sequence.
        id: u64,
        /// Its state now.
        state: &'static str,
        /// The state the call needed.
        expected: &'static str,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// KV import rejected: corrupt, mismatched or incomplete data.
    #[error("KV import rejected: {0}")]
    KvImport(#[from] KvFormatError),
    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tensor library failed.
    #[error("compute: {0}")]
    Compute(#[from] candle_core::Error),
}

impl EngineError {
    /// True when the same request may succeed later or elsewhere (capacity), false when
    /// retrying cannot help (bad input, corrupt data, bad model).
    pub fn is_retryable(&self) -> bool {
        matches!(self, EngineError::OutOfBlocks { .. })
    }
}

/// Result alias for engine calls.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
