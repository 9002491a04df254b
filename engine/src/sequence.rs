//! Per-sequence generation state: tokens, sampler position, detokenizer and stop-string
//! matching. All of it is plain data ([`ResumeState`]) so it travels with exported KV.

use crate::error::Result;
use crate::sampling::{SamplingParams, TokenLogprobs};
use crate::tokenizer::{Detokenizer, Tokenizer};
use serde::{Deserialize, Serialize};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// A stop string matched.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
}

impl FinishReason {
    /// The OpenAI `finish_reason` value.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop | FinishReason::Eos => "stop",
        }
    }
}

/// Text held back because it may be the start of a stop string.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopMatcher {
    pending: String,
}

impl StopMatcher {
    /// Adds newly decoded text. Returns the text that is safe to emit and whether a stop
    /// string matched (the stop string and anything after it are dropped).
    pub fn push(&mut self, delta: &str, stops: &[String]) -> (String, bool) {
        self.pending.push_str(delta);
        if stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        let first = stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let hold = stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Bytes held back now.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Releases held-back text when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`; always at a
/// UTF-8 boundary of `text`, since `stop` begins with a whole character.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k)
                && stop
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - k..])
        })
        .unwrap_or(0)
}

/// Everything decode needs besides the KV rows to continue a sequence exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Prompt tokens followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt.
    pub prompt_len: usize,
    /// Sampling parameters (the seed and the draw index make the sampler state).
    pub params: SamplingParams,
    /// Incremental detokenizer position.
    pub detok: Detokenizer,
    /// Stop-string state.
    pub stop: StopMatcher,
    /// Set once the sequence has ended.
    #[serde(default)]
    pub finish: Option<FinishReason>,
}

/// One token produced for a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The sequence.
    pub seq: u64,
    /// The token id.
    pub token: u32,
    /// Text this token releases (may be empty while a character or stop string is pending).
    pub text: String,
    /// Set when the sequence has ended.
    pub finish: Option<FinishReason>,
    /// The token's log-probability, when the sequence asked for them.
    pub logprobs: Option<TokenLogprobs>,
    /// On a prompt's first token, when asked for: the log-probabilities of the prompt's
    /// tokens after the first (the first has no context to be predicted from).
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

impl ResumeState {
    /// A fresh sequence.
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        let n = prompt.len();
        ResumeState {
            tokens: prompt,
            prompt_len: n,
            params,
            detok: Detokenizer::starting_at(n),
            stop: StopMatcher::default(),
            finish: None,
        }
    }

    /// Checks a state that came from a peer before anything indexes with it: the prompt
    /// within the tokens, every token within `vocab`, the detokenizer's positions within
    /// the tokens, held-back text shorter than the longest stop string, and valid
    /// sampling parameters. The error names what is wrong.
    pub fn check(&self, vocab: usize) -> std::result::Result<(), String> {
        let n = self.tokens.len();
        if self.prompt_len == 0 || self.prompt_len > n {
            return Err(format!("prompt_len {} outside 1..={n}", self.prompt_len));
        }
        if let Some(t) = self.tokens.iter().find(|t| **t as usize >= vocab) {
            return Err(format!("token {t} outside the vocabulary of {vocab}"));
        }
        if !self.detok.fits(self.prompt_len, n) {
            return Err(format!(
                "detokenizer positions do not fit {n} tokens ({} prompt)",
                self.prompt_len
            ));
        }
        let longest = self.params.stop.iter().map(String::len).max().unwrap_or(0);
        if self.stop.pending_len() > longest.saturating_sub(1) {
            return Err(format!(
                "{} bytes held back for stop strings of at most {longest}",
                self.stop.pending_len()
            ));
        }
        self.params.validate().map_err(|e| format!("params: {e}"))
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Draw index for the sampler: one per generated token.
    pub fn draw(&self) -> u64 {
        self.generated().len() as u64
    }

    /// Records a sampled token and decides whether the sequence ends.
    pub fn accept(
        &mut self,
        seq: u64,
        token: u32,
        tok: &Tokenizer,
        context: usize,
    ) -> Result<TokenEvent> {
        self.tokens.push(token);
        let mut finish = None;
        let mut text = String::new();
        if !self.params.ignore_eos && tok.eos_ids().contains(&token) {
            finish = Some(FinishReason::Eos);
        } else {
            let delta = self.detok.step(tok, &self.tokens)?;
            let (out, stopped) = self.stop.push(&delta, &self.params.stop);
            text = out;
            if stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none()
            && (self.generated().len() >= self.params.max_tokens || self.tokens.len() >= context)
        {
            finish = Some(FinishReason::Length);
        }
        if matches!(finish, Some(FinishReason::Eos | FinishReason::Length)) {
            text.push_str(&self.stop.flush());
        }
        self.finish = finish;
        Ok(TokenEvent {
            seq,
            token,
            text,
            finish,
            logprobs: None,
            prompt_logprobs: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], stops: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::default();
        let mut out = String::new();
        for p in pieces {
            let (o, stop) = m.push(p, &stops);
            out.push_str(&o);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_spanning_pieces_is_not_emitted() {
        assert_eq!(
            run(&["Hello ", "wo", "rld!"], &["world"]),
            ("Hello ".into(), true)
        );
        assert_eq!(
            run(&["ab", "c<", "|e", "nd|>x"], &["<|end|>"]),
            ("abc".into(), true)
        );
    }

    #[test]
    fn near_misses_are_released() {
        assert_eq!(run(&["wor", "m"], &["world"]), ("worm".into(), false));
        let stops = vec!["xyz".to_string()];
        let mut m = StopMatcher::default();
        assert_eq!(m.push("abx", &stops), ("ab".into(), false));
        assert_eq!(m.push("q", &stops), ("xq".into(), false));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let (out, stop) = run(&["é", "日本", "語!"], &["語!"]);
        assert_eq!(out, "é日本");
        assert!(stop);
        assert_eq!(run(&["日本"], &["本x"]), ("日本".into(), false));
    }
}
