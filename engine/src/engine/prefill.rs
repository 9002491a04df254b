//! Chunked prefill: computing a prompt's KV chunk by chunk, streaming each layer's rows
//! to a hook, and the first token (or, for scoring, the logits) at the end.

use super::{Engine, Phase};
use crate::error::{EngineError, Result};
use crate::kv::format::LayerChunk;
use crate::model::Pass;
use crate::sampling::{SamplingParams, logprobs, sample};
use crate::sequence::TokenEvent;

impl Engine {
    /// Computes the next prefill chunk of a sequence. Each layer's KV for the chunk is
    /// handed to `on_chunk` as soon as it is in the cache. When the prompt is done, the
    /// first token is sampled and returned.
    pub fn prefill_chunk(
        &mut self,
        id: u64,
        on_chunk: &mut dyn FnMut(LayerChunk),
    ) -> Result<Option<TokenEvent>> {
        let Some(logits) = self.prefill_pass(id, on_chunk)? else {
            return Ok(None);
        };
        let ctx = self.backend.config().context_length;
        let seq = self.seqs.get_mut(&id).expect("prefilled above");
        let token = sample(&logits, &seq.state.params, seq.state.draw());
        let mut ev = seq.state.accept(id, token, &self.tokenizer, ctx)?;
        let params = &seq.state.params;
        if params.logprobs {
            ev.logprobs = Some(logprobs(&logits, token, params.top_logprobs));
        }
        ev.prompt_logprobs = seq.prompt_logprobs.take().unwrap_or_default();
        seq.phase = match ev.finish {
            Some(f) => Phase::Finished(f),
            None => Phase::Decode,
        };
        Ok(Some(ev))
    }

    /// The logits of the token that would follow `tokens`: a scratch sequence prefilled
    /// like any prompt (in chunks, reusing and feeding the prefix cache), then removed.
    /// Sequence id `u64::MAX` is reserved for it.
    ///
    /// # Errors
    /// As [`Engine::add_sequence`] and [`Engine::prefill_chunk`].
    pub fn next_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        const SCRATCH: u64 = u64::MAX;
        self.add_sequence(SCRATCH, tokens.to_vec(), SamplingParams::greedy(1))?;
        let logits = loop {
            match self.prefill_pass(SCRATCH, &mut |_| {}) {
                Ok(Some(logits)) => break Ok(logits),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        self.remove(SCRATCH);
        logits
    }

    /// The log-probability of each of `tokens[1..]` given the tokens before it: `tokens`
    /// prefilled as one prompt (in chunks, never from the prefix cache) in a scratch
    /// sequence, then removed. What perplexity is computed from.
    ///
    /// # Errors
    /// As [`Engine::add_sequence`] and [`Engine::prefill_chunk`].
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        const SCRATCH: u64 = u64::MAX;
        let params = SamplingParams {
            logprobs: true,
            prompt_logprobs: true,
            ignore_eos: true,
            ..SamplingParams::greedy(1)
        };
        self.add_sequence(SCRATCH, tokens.to_vec(), params)?;
        let first = loop {
            match self.prefill_chunk(SCRATCH, &mut |_| {}) {
                Ok(Some(ev)) => break Ok(ev),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        self.remove(SCRATCH);
        Ok(first?.prompt_logprobs.iter().map(|l| l.logprob).collect())
    }

    /// One prefill chunk; the logits of the prompt's last token once it is done.
    fn prefill_pass(
        &mut self,
        id: u64,
        on_chunk: &mut dyn FnMut(LayerChunk),
    ) -> Result<Option<Vec<f32>>> {
        let chunk = self.cfg.prefill_chunk;
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        if seq.phase != Phase::Prefill {
            return Err(EngineError::WrongState {
                id,
                state: seq.phase.name(),
                expected: "prefilling",
            });
        }
        if seq.reused_pending {
            // The cached prefix goes out first, layer by layer, like computed chunks.
            let (table, n) = (seq.table.clone(), seq.reused);
            for layer in 0..self.backend.config().n_layer {
                let mut payload = Vec::new();
                self.kv.read_rows_bytes(layer, &table, 0, n, &mut payload);
                on_chunk(LayerChunk {
                    layer: layer as u32,
                    start: 0,
                    count: n as u32,
                    payload,
                });
            }
            if let Some(s) = self.seqs.get_mut(&id) {
                s.reused_pending = false;
            }
        }
        let seq = &self.seqs[&id];
        let start = seq.cached;
        // Every token so far is computed: the prompt, and for a resumed sequence the tokens
        // it had generated (no token is sampled until the prefill ends).
        let target = seq.state.tokens.len();
        let end = (start + chunk).min(target);
        let collect = seq.prompt_logprobs.is_some();
        let pass = Pass::Prefill {
            table: &seq.table,
            start,
            tokens: &seq.state.tokens[start..end],
            all_logits: collect,
        };
        let n = (end - start) as u32;
        let table = seq.table.clone();
        let logits = self
            .backend
            .forward(&pass, &mut self.kv, &mut |layer, kv| {
                let mut payload = Vec::new();
                kv.read_rows_bytes(layer, &table, start, n as usize, &mut payload);
                on_chunk(LayerChunk {
                    layer: layer as u32,
                    start: start as u32,
                    count: n,
                    payload,
                });
            })?;
        let seq = self.seqs.get_mut(&id).expect("checked above");
        seq.cached = end;
        let mut rows = logits;
        if collect {
            // Row i (position start + i) predicts the token at start + i + 1; the prompt's
            // last row predicts the first generated token and is returned as usual.
            let next = if end == target { rows.pop() } else { None };
            let top = seq.state.params.top_logprobs;
            let scored = rows
                .iter()
                .enumerate()
                .map(|(i, row)| logprobs(row, seq.state.tokens[start + i + 1], top));
            seq.prompt_logprobs
                .as_mut()
                .expect("collecting")
                .extend(scored);
            rows = next.into_iter().collect();
        }
        if end < target {
            return Ok(None);
        }
        Ok(rows.into_iter().next())
    }

    /// Prefills the whole prompt (in chunks) and returns the first token.
    pub fn prefill(&mut self, id: u64, on_chunk: &mut dyn FnMut(LayerChunk)) -> Result<TokenEvent> {
        loop {
            if let Some(ev) = self.prefill_chunk(id, on_chunk)? {
                return Ok(ev);
            }
        }
    }
}
