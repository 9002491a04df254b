//! KV export and import between engine instances: headers, layer chunks, streamed rows
//! and the resume state, with every check an untrusted peer's data needs.

use super::{Engine, Phase, Sequence};
use crate::error::{EngineError, Result};
use crate::kv::blocks_for;
use crate::kv::cache::{RowCheck, RowFill};
use crate::kv::format::{self, KvFormatError, KvHeader, LayerChunk};
use crate::sequence::ResumeState;

impl Engine {
    /// The header that describes a sequence's KV and resume state. Before prefill it
    /// announces the whole prompt with the state decode will resume from still pending
    /// (no sampled token yet): a streaming sender sends it first, the layers as they are
    /// computed, and the final [`ResumeState`] after the prefill.
    pub fn export_header(&self, id: u64) -> Result<KvHeader> {
        let s = self.seq(id)?;
        if matches!(s.phase, Phase::Importing(_) | Phase::Reserved) {
            return Err(EngineError::WrongState {
                id,
                state: s.phase.name(),
                expected: "local",
            });
        }
        let token_count = match s.phase {
            // Before any sampling: every token of the state is to be computed.
            Phase::Prefill => s.state.tokens.len(),
            _ => s.cached,
        };
        let m = self.backend.config().clone();
        Ok(KvHeader {
            version: format::VERSION,
            fingerprint: self.fingerprint.clone(),
            dtype: self.cfg.kv_dtype,
            n_layer: m.n_layer as u32,
            kv_dim: m.kv_dim() as u32,
            block_size: self.cfg.block_size as u32,
            token_count: token_count as u32,
            source_blocks: s.table.clone(),
            resume: s.state.clone(),
        })
    }

    /// Exports a prefilled sequence: header, then every layer's rows.
    pub fn export(&self, id: u64) -> Result<Vec<u8>> {
        let s = self.seq(id)?;
        if !matches!(s.phase, Phase::Decode | Phase::Finished(_)) {
            return Err(EngineError::WrongState {
                id,
                state: s.phase.name(),
                expected: "prefilled",
            });
        }
        let header = self.export_header(id)?;
        let chunks: Vec<LayerChunk> = (0..header.n_layer)
            .map(|layer| {
                let mut payload = Vec::with_capacity(header.layer_bytes());
                self.kv
                    .read_rows_bytes(layer as usize, &s.table, 0, s.cached, &mut payload);
                LayerChunk {
                    layer,
                    start: 0,
                    count: s.cached as u32,
                    payload,
                }
            })
            .collect();
        Ok(format::encode_all(&header, &chunks))
    }

    /// Reserves blocks for an import of `tokens` tokens before its header arrives, so a
    /// same-host sender can be told where to write the rows (the sequence's block table,
    /// returned, within [`Engine::kv_layout`]). The import then goes on as usual with
    /// [`Engine::begin_import`], whose header must announce exactly `tokens` tokens, and
    /// its rows are checked in place with [`Engine::import_rows_in_place`]. Until the
    /// import completes, removing the sequence holds its blocks (see [`Engine::remove`]).
    pub fn reserve_import(&mut self, id: u64, tokens: usize) -> Result<Vec<u32>> {
        if self.seqs.contains_key(&id) || self.held.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        let ctx = self.backend.config().context_length;
        if tokens == 0 || tokens >= ctx {
            return Err(EngineError::ContextOverflow { tokens, max: ctx });
        }
        let table = self.alloc(blocks_for(tokens, self.cfg.block_size))?;
        self.seqs.insert(
            id,
            Sequence {
                table: table.clone(),
                cached: tokens,
                reused: 0,
                reused_pending: false,
                state: ResumeState::new(Vec::new(), crate::SamplingParams::default()),
                phase: Phase::Reserved,
                placed: true,
                prompt_logprobs: None,
            },
        );
        Ok(table)
    }

    /// Starts importing a sequence: validates the header against this engine and
    /// reserves blocks (or takes those of [`Engine::reserve_import`]). Layers then arrive
    /// through [`Engine::import_chunk`].
    pub fn begin_import(&mut self, id: u64, header: &KvHeader) -> Result<()> {
        let res = self.try_begin_import(id, header);
        if res.is_err()
            && self
                .seqs
                .get(&id)
                .is_some_and(|s| s.phase == Phase::Reserved)
        {
            self.remove(id);
        }
        res
    }

    fn try_begin_import(&mut self, id: u64, header: &KvHeader) -> Result<()> {
        let reserved = match self.seqs.get(&id) {
            Some(s) if s.phase == Phase::Reserved => Some(s.cached),
            Some(_) => return Err(EngineError::DuplicateSequence(id)),
            None => None,
        };
        if let Some(tokens) = reserved
            && tokens != header.token_count as usize
        {
            return Err(KvFormatError::Geometry(format!(
                "header announces {} tokens, {tokens} were reserved",
                header.token_count
            ))
            .into());
        }
        if header.fingerprint != self.fingerprint {
            return Err(KvFormatError::ModelMismatch {
                expected: self.fingerprint.clone(),
                found: header.fingerprint.clone(),
            }
            .into());
        }
        if header.dtype != self.cfg.kv_dtype {
            return Err(KvFormatError::DtypeMismatch {
                expected: self.cfg.kv_dtype,
                found: header.dtype,
            }
            .into());
        }
        let m = self.backend.config().clone();
        if header.n_layer as usize != m.n_layer || header.kv_dim as usize != m.kv_dim() {
            return Err(KvFormatError::Geometry(format!(
                "{} layers × {} wide, engine has {} × {}",
                header.n_layer,
                header.kv_dim,
                m.n_layer,
                m.kv_dim()
            ))
            .into());
        }
        let r = &header.resume;
        let count = header.token_count as usize;
        // `count + 1` tokens: prefilled with the first token sampled; `count`: streamed, the
        // final state follows through `import_resume`.
        if r.prompt_len == 0
            || r.prompt_len > count
            || !(count..=count + 1).contains(&r.tokens.len())
        {
            return Err(KvFormatError::Geometry(format!(
                "{count} cached tokens do not fit a resume state of {} tokens ({} prompt)",
                r.tokens.len(),
                r.prompt_len
            ))
            .into());
        }
        r.check(m.vocab).map_err(|e| {
            KvFormatError::Geometry(format!("the header's resume state is not valid: {e}"))
        })?;
        self.check_prompt(&r.tokens[..count], &r.params)?;
        if let Some(s) = self.seqs.get_mut(&id) {
            s.state = r.clone();
            s.phase = Phase::Importing(vec![0; m.n_layer]);
            return Ok(());
        }
        let table = self.alloc(blocks_for(count, self.cfg.block_size))?;
        self.seqs.insert(
            id,
            Sequence {
                table,
                cached: count,
                reused: 0,
                reused_pending: false,
                state: r.clone(),
                phase: Phase::Importing(vec![0; m.n_layer]),
                placed: false,
                prompt_logprobs: None,
            },
        );
        Ok(())
    }

    /// Writes one received layer chunk. A bad chunk (wrong layer, gap, size) fails the
    /// import and frees its blocks.
    pub fn import_chunk(&mut self, id: u64, chunk: &LayerChunk) -> Result<()> {
        let c = chunk;
        self.import_rows(id, c.layer, c.start, c.count, &c.payload)
    }

    /// Writes received rows straight from a transport's buffer: the K then V rows of
    /// positions `start..start+count` of `layer`. Same checks and failure handling as
    /// [`Engine::import_chunk`], without an intermediate copy.
    pub fn import_rows(
        &mut self,
        id: u64,
        layer: u32,
        start: u32,
        count: u32,
        payload: &[u8],
    ) -> Result<()> {
        self.import_rows_with(id, layer, start, count, payload.len(), &mut |off, dst| {
            dst.copy_from_slice(&payload[off..off + dst.len()]);
            Ok(())
        })
    }

    /// Like [`Engine::import_rows`], with the bytes supplied by `fill(offset, dst)`: it
    /// must write payload bytes `offset..offset + dst.len()` into `dst` (straight into the
    /// KV blocks). Calls come in payload order and cover all `len` bytes, so a transport
    /// can verify a checksum while it copies; an `Err` from `fill` fails the import and
    /// frees the sequence's blocks.
    pub fn import_rows_with(
        &mut self,
        id: u64,
        layer: u32,
        start: u32,
        count: u32,
        len: usize,
        fill: &mut RowFill<'_>,
    ) -> Result<()> {
        self.rows_or_remove(id, layer, start, count, len, Rows::Copy(fill))
    }

    /// Accepts rows a peer wrote straight into this sequence's blocks (a placed import,
    /// see [`Engine::reserve_import`]): `check(offset, bytes)` sees the cache's bytes of
    /// each contiguous run in payload order, so the transport can verify its checksum
    /// without a copy. Same checks and failure handling as [`Engine::import_rows_with`].
    pub fn import_rows_in_place(
        &mut self,
        id: u64,
        layer: u32,
        start: u32,
        count: u32,
        len: usize,
        check: &mut RowCheck<'_>,
    ) -> Result<()> {
        self.rows_or_remove(id, layer, start, count, len, Rows::InPlace(check))
    }

    /// Takes rows in; a bad chunk (`KvImport`) fails the import and frees its blocks.
    fn rows_or_remove(
        &mut self,
        id: u64,
        layer: u32,
        start: u32,
        count: u32,
        len: usize,
        rows: Rows<'_, '_>,
    ) -> Result<()> {
        let res = self.try_import_rows(id, layer, start, count, len, rows);
        if matches!(res, Err(EngineError::KvImport(_))) {
            self.remove(id);
        }
        res
    }

    fn try_import_rows(
        &mut self,
        id: u64,
        layer_idx: u32,
        start: u32,
        n: u32,
        len: usize,
        rows: Rows<'_, '_>,
    ) -> Result<()> {
        let row_bytes = self.backend.config().kv_dim() * self.cfg.kv_dtype.size();
        let s = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        let Phase::Importing(filled) = &mut s.phase else {
            return Err(EngineError::WrongState {
                id,
                state: s.phase.name(),
                expected: "importing",
            });
        };
        if matches!(rows, Rows::InPlace(_)) && !s.placed {
            return Err(EngineError::WrongState {
                id,
                state: "importing by copy",
                expected: "a placed import",
            });
        }
        let layer = layer_idx as usize;
        let Some(have) = filled.get(layer).copied() else {
            return Err(
                KvFormatError::Geometry(format!("layer {layer_idx} of {}", filled.len())).into(),
            );
        };
        if start != have {
            return Err(KvFormatError::OutOfOrder {
                layer: layer_idx,
                start,
                expected: have,
            }
            .into());
        }
        let count = n as usize;
        if start as usize + count > s.cached {
            return Err(KvFormatError::Geometry(format!(
                "layer {layer_idx} chunk ends at {}, beyond {} tokens",
                start as usize + count,
                s.cached
            ))
            .into());
        }
        if len != 2 * count * row_bytes {
            return Err(KvFormatError::Geometry(format!(
                "layer {layer_idx} chunk has {len} bytes, expected {}",
                2 * count * row_bytes
            ))
            .into());
        }
        let res = match rows {
            Rows::Copy(fill) => self
                .kv
                .fill_rows(layer, &s.table, start as usize, count, fill),
            Rows::InPlace(check) => {
                self.kv
                    .check_rows(layer, &s.table, start as usize, count, check)
            }
        };
        res.map_err(|e| KvFormatError::Checksum {
            what: format!("layer {layer_idx} chunk at {start}: {e}"),
        })?;
        filled[layer] += n;
        Ok(())
    }

    /// Sets the state decode resumes from (sent after a streamed prefill). It must extend
    /// the announced tokens by exactly the first sampled token.
    pub fn import_resume(&mut self, id: u64, state: ResumeState) -> Result<()> {
        let vocab = self.backend.config().vocab;
        let s = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        if !matches!(s.phase, Phase::Importing(_)) {
            return Err(EngineError::WrongState {
                id,
                state: s.phase.name(),
                expected: "importing",
            });
        }
        let ok = state.tokens.len() == s.cached + 1
            && state.prompt_len == s.state.prompt_len
            && state.tokens[..s.cached] == s.state.tokens[..s.cached];
        let checked = if ok {
            state.check(vocab)
        } else {
            Err("it does not continue the announced sequence by one token".into())
        };
        if let Err(e) = checked {
            self.remove(id);
            return Err(KvFormatError::Geometry(format!("resume state: {e}")).into());
        }
        s.state = state;
        Ok(())
    }

    /// The state a local sequence would resume from (e.g. after its prefill).
    pub fn resume_state(&self, id: u64) -> Result<ResumeState> {
        Ok(self.seq(id)?.state.clone())
    }

    /// Completes an import: every layer must hold every token. The sequence is then ready
    /// for [`Engine::decode_step`].
    pub fn finish_import(&mut self, id: u64) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        let Phase::Importing(filled) = &s.phase else {
            return Err(EngineError::WrongState {
                id,
                state: s.phase.name(),
                expected: "importing",
            });
        };
        let need = s.cached as u32;
        if s.state.tokens.len() != s.cached + 1 {
            let err = KvFormatError::Geometry(
                "the resume state with the first sampled token never arrived".into(),
            );
            self.remove(id);
            return Err(err.into());
        }
        if let Some((layer, have)) = filled.iter().enumerate().find(|(_, h)| **h != need) {
            let err = KvFormatError::Incomplete {
                layer: layer as u32,
                have: *have,
                need,
            };
            self.remove(id);
            return Err(err.into());
        }
        s.phase = match s.state.finish {
            Some(f) => Phase::Finished(f),
            None => Phase::Decode,
        };
        // The sender committed: nothing writes into these blocks any more.
        s.placed = false;
        Ok(())
    }

    /// Imports a whole export produced by [`Engine::export`].
    pub fn import(&mut self, id: u64, bytes: &[u8]) -> Result<()> {
        let (header, chunks) = format::decode_all(bytes)?;
        self.begin_import(id, &header)?;
        for c in &chunks {
            self.import_chunk(id, c)?;
        }
        self.finish_import(id)
    }
}

/// How an import's rows reach the cache.
enum Rows<'a, 'b> {
    /// Copied in from a transport's buffer.
    Copy(&'a mut RowFill<'b>),
    /// Already written into the blocks by the peer; only checked.
    InPlace(&'a mut RowCheck<'b>),
}
