//! Tokenizer and chat template from GGUF metadata, and incremental detokenization.

use crate::config::meta;
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde::{Deserialize, Serialize};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, used when the GGUF carries no `tokenizer.chat_template`.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Token texts that end generation besides the declared EOS (as llama.cpp treats them).
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
];

/// Text ↔ token ids for one model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The chat template compiled once at load, or why it does not compile (only chat
    /// calls fail then).
    chat: std::sync::Arc<std::result::Result<minijinja::Environment<'static>, String>>,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    bos_text: String,
    eos_text: String,
    /// Bytes of the longest vocabulary entry: no token stands for more text.
    max_token_bytes: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// A template environment as Hugging Face chat templates expect it: Python's string and
/// list methods (`.strip()`, `.startswith()`, …) and `raise_exception(message)`.
fn chat_environment(
    template: String,
) -> std::result::Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template)
        .map_err(|e| format!("chat template: {e}"))?;
    Ok(env)
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(ct).map_err(tok_err)?;
        let pre = meta(ct, "tokenizer.ggml.pre")
            .ok()
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if pre == "smollm" {
            // SmolLM's tokenizer splits digits individually, then byte-level BPE with no
            // prefix space (candle's default GPT-2 pipeline adds one, which breaks
            // `<|im_start|>system` and every prompt's first word).
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        let id = |key: &str| meta(ct, key).ok().and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = meta(ct, "tokenizer.ggml.add_bos_token")
            .ok()
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        for text in END_OF_GENERATION {
            if let Some(t) = inner.token_to_id(text)
                && !eos.contains(&t)
            {
                eos.push(t);
            }
        }
        let text_of = |t: Option<u32>| t.and_then(|t| inner.id_to_token(t)).unwrap_or_default();
        let template = meta(ct, "tokenizer.chat_template")
            .ok()
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| CHATML.to_string());
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Tokenizer {
            max_token_bytes,
            bos_text: text_of(bos),
            eos_text: text_of(eos.first().copied()),
            inner,
            chat: std::sync::Arc::new(chat_environment(template)),
            bos,
            add_bos,
            eos,
        })
    }

    /// Whether `bytes` bytes of text certainly make at least `tokens` tokens, told without
    /// tokenizing: no token stands for more than the longest vocabulary entry's bytes
    /// (a margin of 4 covers normalizers that shorten text). A coordinator refuses an
    /// oversized prompt with this before it spends time on it.
    pub fn certainly_reaches(&self, bytes: usize, tokens: usize) -> bool {
        bytes / (4 * self.max_token_bytes) >= tokens
    }

    /// Tokenizes raw text, adding BOS when the model's metadata asks for it. Special
    /// tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Renders messages with the model's chat template (generation prompt appended).
    ///
    /// # Errors
    /// `Tokenizer` when the template does not compile or fails while rendering (a
    /// template's own `raise_exception`, e.g. for roles out of order).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let env = self.chat.as_ref().as_ref().map_err(tok_err)?;
        let tmpl = env.get_template("chat").map_err(tok_err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_text,
            eos_token => self.eos_text,
        })
        .map_err(tok_err)
    }

    /// Chat-templates and tokenizes.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        if messages.is_empty() {
            return Err(EngineError::InvalidParam {
                field: "messages",
                reason: "at least one message is required".into(),
            });
        }
        let text = self.apply_chat_template(messages)?;
        self.encode(&text)
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The BOS token [`Tokenizer::encode`] puts first, when the model asks for one.
    pub fn bos_added(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The id of `text` when it is exactly one ordinary token (not special, not
    /// end-of-generation) that decodes back to `text`.
    pub(crate) fn single_token(&self, text: &str) -> Option<u32> {
        let enc = self.inner.encode(text, false).ok()?;
        let [id] = enc.get_ids() else { return None };
        let back = self.inner.decode(&[*id], true).ok()?;
        (back == text && !self.eos.contains(id)).then_some(*id)
    }

    /// One token as text and as the bytes it stands for (OpenAI's `token` and `bytes`).
    /// A byte-level BPE token that holds part of a UTF-8 character has its exact bytes
    /// here and U+FFFD in its text; a special token is its literal text.
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        let text = self.inner.decode(&[id], false).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            let bytes = text.clone().into_bytes();
            return (text, bytes);
        }
        let raw = self.inner.id_to_token(id).unwrap_or_default();
        let bytes = raw
            .chars()
            .map(byte_of_char)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.clone().into_bytes());
        (text, bytes)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The byte a byte-level BPE character stands for (GPT-2's table: printable Latin-1
/// bytes are themselves; the other 68 bytes are U+0100.. in byte order).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth((c - 256) as usize)
        .map(|b| b as u8)
}

/// Turns a growing token sequence into text deltas that never split a UTF-8 character.
///
/// Holds `prefix..read` as context: decoding `tokens[prefix..]` and subtracting the
/// decoding of `tokens[prefix..read]` gives the new text; a delta ending in U+FFFD is an
/// incomplete character and waits for the next token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Detokenizer {
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Starts after `already` tokens that are not to be emitted (the prompt).
    pub fn starting_at(already: usize) -> Self {
        Detokenizer {
            prefix: already,
            read: already,
        }
    }

    /// Whether its positions are consistent with a sequence of `tokens` tokens whose
    /// first `prompt_len` are the prompt (a state from a peer is checked with this before
    /// [`Detokenizer::step`] slices with them).
    pub fn fits(&self, prompt_len: usize, tokens: usize) -> bool {
        prompt_len <= self.prefix && self.prefix <= self.read && self.read <= tokens
    }

    /// The text that the tokens up to `tokens.len()` add, possibly empty.
    pub fn step(&mut self, tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let before = tok.decode(&tokens[self.prefix..self.read])?;
        let after = tok.decode(&tokens[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = tokens.len();
            Ok(delta)
        } else if after.ends_with('\u{FFFD}') {
            Ok(String::new())
        } else {
            // Nothing visible (special token) or a re-segmentation: move on.
            let delta = if after.starts_with(&before) {
                after[before.len()..].to_string()
            } else {
                String::new()
            };
            self.prefix = self.read;
            self.read = tokens.len();
            Ok(delta)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_of_char;

    #[test]
    fn byte_level_characters_map_back_to_their_bytes() {
        assert_eq!(byte_of_char('Ġ'), Some(b' '), "GPT-2's space");
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('é'), Some(0xE9));
        let all: Vec<u8> = (0u32..0x200)
            .filter_map(char::from_u32)
            .filter_map(byte_of_char)
            .collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            (all.len(), sorted.len()),
            (256, 256),
            "a bijection onto the bytes"
        );
    }
}
