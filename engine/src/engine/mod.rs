//! The engine: a model, its tokenizer and a paged KV cache holding many sequences, with
//! chunked prefill, batched decode steps, and KV export/import between instances
//! (`kv_io`).

mod backend;
mod kv_io;
mod prefill;

use backend::Backend;

use crate::config::{DEFAULT_KV_TOKENS, EngineConfig, KvDtype, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kv::cache::{KvLayout, KvMemory};
use crate::kv::prefix::chain_hashes;
use crate::kv::{BlockAllocator, CacheShape, KvStore, PrefixCache, PrefixStats, blocks_for};
use crate::mock::MockModel;
use crate::model::{DecodeItem, Model, Pass};
use crate::sampling::{SamplingParams, TokenLogprobs, logprobs, sample};
use crate::sequence::{FinishReason, ResumeState, TokenEvent};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::io::Read;

/// Where a sequence is in its life.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Blocks reserved for an import whose header has not arrived yet.
    Reserved,
    /// Prompt being computed; `cached` tokens done.
    Prefill,
    /// KV arriving from another engine; rows received per layer.
    Importing(Vec<u32>),
    /// Ready for decode steps.
    Decode,
    /// Ended; blocks held until removed.
    Finished(FinishReason),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Reserved => "reserved",
            Phase::Prefill => "prefilling",
            Phase::Importing(_) => "importing",
            Phase::Decode => "decoding",
            Phase::Finished(_) => "finished",
        }
    }
}

#[derive(Debug)]
struct Sequence {
    table: Vec<u32>,
    /// Tokens whose KV is in the cache.
    cached: usize,
    /// Leading tokens whose KV came from the prefix cache.
    reused: usize,
    /// Reused tokens not yet handed to a prefill hook (sent with the first chunk).
    reused_pending: bool,
    state: ResumeState,
    phase: Phase,
    /// A peer writes this import's rows straight into the blocks: until the import
    /// completes, removing the sequence holds its blocks instead of freeing them.
    placed: bool,
    /// The prompt tokens' log-probabilities so far, while a prefill that asked for them
    /// runs; handed out with the first token.
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

/// KV pool occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    /// Blocks in use.
    pub used_blocks: usize,
    /// Blocks free.
    pub free_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text (stop strings excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
}

/// A CPU inference engine over one model.
pub struct Engine {
    cfg: EngineConfig,
    backend: Backend,
    tokenizer: Tokenizer,
    kv: KvStore,
    blocks: BlockAllocator,
    seqs: HashMap<u64, Sequence>,
    fingerprint: String,
    prefix: PrefixCache,
    prefix_stats: PrefixStats,
    /// Blocks of failed placed imports, kept from reuse until [`Engine::release_held`].
    held: HashMap<u64, Vec<u32>>,
}

/// Makes the memory for a KV pool of the given size (see [`Engine::load_with_kv_memory`]).
pub type KvMemoryFactory<'a> =
    dyn FnOnce(usize) -> std::result::Result<Box<dyn KvMemory>, String> + 'a;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.cfg.model_path)
            .field("fingerprint", &self.fingerprint)
            .field("mock", &matches!(self.backend, Backend::Mock(_)))
            .field("sequences", &self.seqs.len())
            .finish_non_exhaustive()
    }
}

/// Identifies the weights and the numerics that computed a KV cache: a hash of the model
/// file plus this engine's version (its re-quantization and kernels shape the values).
///
/// # Errors
/// `Model` when the file cannot be read.
pub fn fingerprint(path: &std::path::Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!(
        "xxh3:{:032x}/xpyd-engine-{}",
        h.digest128(),
        env!("CARGO_PKG_VERSION")
    ))
}

/// What a process that only tokenizes needs from a model (the coordinator): geometry,
/// tokenizer and fingerprint, read from the GGUF metadata without loading weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Geometry and context length.
    pub config: ModelConfig,
    /// The model's tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Same value as `Engine::fingerprint` for this file.
    pub fingerprint: String,
}

impl ModelInfo {
    /// Reads the metadata of the GGUF file at `path`.
    ///
    /// # Errors
    /// `Model` when the file is missing or not a supported GGUF.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("{}: not a GGUF file: {e}", path.display())))?;
        Ok(ModelInfo {
            config: ModelConfig::from_gguf(&ct)?,
            tokenizer: Tokenizer::from_gguf(&ct)?,
            fingerprint: fingerprint(path)?,
        })
    }
}

impl Engine {
    /// Loads the model and tokenizer and allocates the KV pool. With `cfg.mock` set, only
    /// the GGUF metadata is read (no weights): the mock backend computes, and the
    /// fingerprint is `mock:` + the real one, so real and mock engines refuse each
    /// other's KV.
    ///
    /// # Errors
    /// `InvalidParam` for a bad config; `Model` for a missing or unsupported file.
    pub fn load(cfg: EngineConfig) -> Result<Self> {
        Self::load_with_kv_memory(cfg, None)
    }

    /// Like [`Engine::load`], with the KV pools in memory from `make(bytes)` when given
    /// (e.g. a shared-memory mapping a same-host sender writes rows into), else the heap.
    ///
    /// # Errors
    /// As [`Engine::load`]; `InvalidParam` when the memory cannot be made or is too small.
    pub fn load_with_kv_memory(
        cfg: EngineConfig,
        make: Option<Box<KvMemoryFactory<'_>>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let path = &cfg.model_path;
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("{}: not a GGUF file: {e}", path.display())))?;
        let mcfg = ModelConfig::from_gguf(&ct)?;
        let tokenizer = Tokenizer::from_gguf(&ct)?;
        let (backend, fingerprint) = match cfg.mock {
            Some(latency) => (
                Backend::Mock(MockModel::new(mcfg.clone(), &tokenizer, latency)?),
                format!("mock:{}", fingerprint(path)?),
            ),
            None => (
                Backend::Real(Model::load(
                    &ct,
                    &mut file,
                    mcfg.clone(),
                    cfg.reference_f32,
                )?),
                // The reference's KV is not the serving engine's: never exchanged.
                if cfg.reference_f32 {
                    format!("f32-reference:{}", fingerprint(path)?)
                } else {
                    fingerprint(path)?
                },
            ),
        };
        let num_blocks = cfg.num_blocks.unwrap_or_else(|| {
            blocks_for(
                DEFAULT_KV_TOKENS.min(mcfg.context_length * 4),
                cfg.block_size,
            )
        });
        let shape = CacheShape {
            n_layer: mcfg.n_layer,
            kv_dim: mcfg.kv_dim(),
            block_size: cfg.block_size,
            num_blocks,
            dtype: cfg.kv_dtype,
        };
        let kv = match make {
            None => Ok(KvStore::new(shape)),
            Some(make) => {
                make(KvStore::bytes_needed(shape)).and_then(|mem| KvStore::with_memory(shape, mem))
            }
        }
        .map_err(|reason| EngineError::InvalidParam {
            field: "kv_memory",
            reason,
        })?;
        tracing::info!(
            model = %path.display(),
            layers = mcfg.n_layer,
            hidden = mcfg.hidden,
            kv_blocks = num_blocks,
            kv_dtype = ?cfg.kv_dtype,
            mock = ?cfg.mock,
            "engine loaded"
        );
        Ok(Engine {
            blocks: BlockAllocator::new(num_blocks),
            backend,
            tokenizer,
            kv,
            seqs: HashMap::new(),
            fingerprint,
            prefix: PrefixCache::new(cfg.prefix_cache_blocks),
            prefix_stats: PrefixStats::default(),
            held: HashMap::new(),
            cfg,
        })
    }

    /// Where the KV pools are in their memory.
    pub fn kv_layout(&self) -> KvLayout {
        self.kv.layout()
    }

    /// Model geometry.
    pub fn model_config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Identity of weights + numerics; imports must match it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The engine configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// KV pool occupancy.
    pub fn kv_usage(&self) -> KvUsage {
        KvUsage {
            used_blocks: self.blocks.used_blocks(),
            free_blocks: self.blocks.free_blocks(),
            block_size: self.cfg.block_size,
        }
    }

    /// Sequences held (any phase).
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Moves the KV pools into memory from `make(bytes)` (a worker that starts receiving
    /// KV after a role flip puts them in shared memory). Nothing is copied: only while no
    /// block is in use — no sequence, held import or prefix-cache entry.
    ///
    /// # Errors
    /// `InvalidParam`: `sequences` while blocks are in use, `kv_memory` when the memory
    /// cannot be made or is too small (the old memory stays).
    pub fn move_kv_memory(&mut self, make: Box<KvMemoryFactory<'_>>) -> Result<()> {
        if self.blocks.used_blocks() > 0 {
            return Err(EngineError::InvalidParam {
                field: "sequences",
                reason: format!(
                    "{} KV blocks are in use; the pools move only when empty",
                    self.blocks.used_blocks()
                ),
            });
        }
        let shape = self.kv.shape();
        self.kv = make(KvStore::bytes_needed(shape))
            .and_then(|mem| KvStore::with_memory(shape, mem))
            .map_err(|reason| EngineError::InvalidParam {
                field: "kv_memory",
                reason,
            })?;
        Ok(())
    }

    /// Changes what a worker's role decides without reloading the model (a role flip):
    /// the prefill chunk and the prefix cache's size. The cache is emptied — its blocks
    /// go back to the pool. Only between roles: no sequence or held block may remain.
    ///
    /// # Errors
    /// `InvalidParam` naming the field out of range, or `sequences` while any is held.
    pub fn retune(&mut self, prefill_chunk: usize, prefix_cache_blocks: usize) -> Result<()> {
        if !self.seqs.is_empty() || !self.held.is_empty() {
            return Err(EngineError::InvalidParam {
                field: "sequences",
                reason: format!(
                    "{} sequences and {} held imports remain; a role changes only when idle",
                    self.seqs.len(),
                    self.held.len()
                ),
            });
        }
        let mut cfg = self.cfg.clone();
        cfg.prefill_chunk = prefill_chunk;
        cfg.prefix_cache_blocks = prefix_cache_blocks;
        cfg.validate()?;
        while self.prefix.evict_one(&mut self.blocks) {}
        self.prefix = PrefixCache::new(prefix_cache_blocks);
        self.prefix_stats = PrefixStats::default();
        self.cfg = cfg;
        Ok(())
    }

    fn check_prompt(&self, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let ctx = self.backend.config().context_length;
        if prompt.len() >= ctx {
            return Err(EngineError::ContextOverflow {
                tokens: prompt.len(),
                max: ctx,
            });
        }
        let vocab = self.backend.config().vocab;
        if let Some(t) = prompt.iter().find(|t| **t as usize >= vocab) {
            return Err(EngineError::BadToken { id: *t, vocab });
        }
        Ok(())
    }

    /// Admits a sequence and reserves KV blocks for its prompt.
    ///
    /// # Errors
    /// `DuplicateSequence`, the prompt checks (`EmptyPrompt`, `ContextOverflow`,
    /// `BadToken`), a bad sampling parameter, or `OutOfBlocks`.
    pub fn add_sequence(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<()> {
        self.check_prompt(&prompt, &params)?;
        self.admit(id, ResumeState::new(prompt, params))
    }

    /// Admits a sequence that already generated `tokens[prompt_len..]` elsewhere (a
    /// request migrating off a failed worker). Its sampler position, detokenizer and
    /// stop-string state are rebuilt by replaying those tokens, and its prefill computes
    /// the KV of every token: the token it then samples is exactly the one an
    /// uninterrupted run would have sampled next, with the same text.
    ///
    /// # Errors
    /// As [`Engine::add_sequence`]; `InvalidParam` (`prompt_len`) when `prompt_len` is 0
    /// or beyond the tokens, or when the replayed tokens already end the sequence.
    pub fn add_resumed(
        &mut self,
        id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
    ) -> Result<()> {
        if prompt_len == 0 || prompt_len > tokens.len() {
            return Err(EngineError::InvalidParam {
                field: "prompt_len",
                reason: format!("{prompt_len} is outside 1..={}", tokens.len()),
            });
        }
        self.check_prompt(&tokens, &params)?;
        let ctx = self.backend.config().context_length;
        let mut state = ResumeState::new(tokens[..prompt_len].to_vec(), params);
        for t in &tokens[prompt_len..] {
            if state.accept(id, *t, &self.tokenizer, ctx)?.finish.is_some() {
                return Err(EngineError::InvalidParam {
                    field: "prompt_len",
                    reason: "the generated tokens already end the sequence".into(),
                });
            }
        }
        self.admit(id, state)
    }

    /// Reserves blocks for every token of `state` (reusing cached leading blocks, leaving
    /// at least one token to compute: its logits give the next token) and adds the
    /// sequence in its prefill phase.
    fn admit(&mut self, id: u64, state: ResumeState) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        let prompt = &state.tokens;
        let bs = self.cfg.block_size;
        // Scoring the prompt needs every position's logits: no prefix reuse then. A
        // resumed sequence's prompt was scored on its first run.
        let score =
            state.params.logprobs && state.params.prompt_logprobs && state.generated().is_empty();
        let mut table = if self.cfg.prefix_cache_blocks > 0 && !score {
            let hashes = chain_hashes(prompt, bs, (prompt.len() - 1) / bs);
            self.prefix.lookup(&hashes)
        } else {
            Vec::new()
        };
        self.blocks.retain(&table);
        let reused = table.len() * bs;
        let need = blocks_for(prompt.len(), bs) - table.len();
        match self.alloc(need) {
            Ok(fresh) => table.extend(fresh),
            Err(e) => {
                self.blocks.release(&table);
                return Err(e);
            }
        }
        let prompt_len = prompt.len();
        if self.cfg.prefix_cache_blocks > 0 && !score {
            self.prefix_stats.lookup_tokens += prompt.len() as u64;
            self.prefix_stats.hit_tokens += reused as u64;
        }
        self.seqs.insert(
            id,
            Sequence {
                table,
                cached: reused,
                reused,
                reused_pending: reused > 0,
                state,
                phase: Phase::Prefill,
                placed: false,
                prompt_logprobs: score.then(|| Vec::with_capacity(prompt_len - 1)),
            },
        );
        Ok(())
    }

    /// Takes `n` blocks, dropping prefix-cache entries first when the pool is short.
    fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        self.prefix.make_room(n, &mut self.blocks);
        self.blocks.alloc(n)
    }

    /// Prompt tokens of sequence `id` whose KV came from the prefix cache.
    pub fn reused_tokens(&self, id: u64) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.reused)
    }

    /// Prefix-cache counters.
    pub fn prefix_stats(&self) -> PrefixStats {
        PrefixStats {
            cached_blocks: self.prefix.len(),
            ..self.prefix_stats
        }
    }

    /// Drops a sequence and frees its blocks; returns its state if it existed.
    /// With the prefix cache on, the sequence's full computed prompt blocks stay cached.
    /// A placed import that had not completed keeps its blocks from reuse (a late write
    /// from its sender must not land in another sequence) until [`Engine::release_held`].
    pub fn remove(&mut self, id: u64) -> Option<ResumeState> {
        let seq = self.seqs.remove(&id)?;
        if seq.placed {
            self.held.entry(id).or_default().extend(&seq.table);
            return Some(seq.state);
        }
        let bs = self.cfg.block_size;
        if self.cfg.prefix_cache_blocks > 0
            && !matches!(seq.phase, Phase::Importing(_) | Phase::Reserved)
        {
            let full = seq.cached.min(seq.state.prompt_len) / bs;
            let hashes = chain_hashes(&seq.state.tokens[..full * bs], bs, full);
            self.prefix
                .insert(&hashes, &seq.table[..full], &mut self.blocks);
        }
        self.blocks.release(&seq.table);
        Some(seq.state)
    }

    /// True while a failed placed import `id` holds blocks.
    pub fn holds(&self, id: u64) -> bool {
        self.held.contains_key(&id)
    }

    /// Frees the blocks a failed placed import `id` held; returns how many.
    pub fn release_held(&mut self, id: u64) -> usize {
        let table = self.held.remove(&id).unwrap_or_default();
        self.blocks.release(&table);
        table.len()
    }

    fn seq(&self, id: u64) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))
    }

    /// Advances every listed sequence by one token in a single batched forward pass.
    /// Reserves the blocks the step needs first: when the pool cannot supply them the
    /// step fails with `OutOfBlocks` and changes nothing.
    pub fn decode_step(&mut self, ids: &[u64]) -> Result<Vec<TokenEvent>> {
        let started = std::time::Instant::now();
        let bs = self.cfg.block_size;
        let mut need = 0;
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(EngineError::DuplicateSequence(*id));
            }
            let s = self.seq(*id)?;
            if s.phase != Phase::Decode {
                return Err(EngineError::WrongState {
                    id: *id,
                    state: s.phase.name(),
                    expected: "decoding",
                });
            }
            need += blocks_for(s.cached + 1, bs).saturating_sub(s.table.len());
        }
        let mut fresh = self.alloc(need)?;
        for id in ids {
            let s = self.seqs.get_mut(id).expect("checked above");
            let more = blocks_for(s.cached + 1, bs).saturating_sub(s.table.len());
            s.table.extend(fresh.drain(..more));
        }
        let items: Vec<DecodeItem<'_>> = ids
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                DecodeItem {
                    table: &s.table,
                    pos: s.cached,
                    token: *s
                        .state
                        .tokens
                        .last()
                        .expect("decode sequences have a token"),
                }
            })
            .collect();
        let pass = Pass::Decode(&items);
        let pace = self.backend.decode_pace(&pass);
        let logits = self.backend.forward(&pass, &mut self.kv, &mut |_, _| {})?;
        drop(items);
        let ctx = self.backend.config().context_length;
        let mut events = Vec::with_capacity(ids.len());
        for (id, row) in ids.iter().zip(&logits) {
            let s = self.seqs.get_mut(id).expect("checked above");
            s.cached += 1;
            let token = sample(row, &s.state.params, s.state.draw());
            let mut ev = s.state.accept(*id, token, &self.tokenizer, ctx)?;
            if s.state.params.logprobs {
                ev.logprobs = Some(logprobs(row, token, s.state.params.top_logprobs));
            }
            if let Some(f) = ev.finish {
                s.phase = Phase::Finished(f);
            }
            events.push(ev);
        }
        // The mock's step takes its fitted time in all, sampling included, as the real
        // model's step did when the profile timed it.
        if let Some(due) = pace.map(|d| started + d) {
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        }
        Ok(events)
    }

    /// Runs one sequence to completion, calling `on_token` for every token.
    pub fn generate(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Generation> {
        let prompt_tokens = prompt.len();
        self.add_sequence(id, prompt, params)?;
        let result = self.run_to_end(id, on_token);
        let state = self.remove(id);
        let (finish, text) = result?;
        let state = state.expect("sequence existed");
        Ok(Generation {
            tokens: state.generated().to_vec(),
            text,
            finish,
            prompt_tokens,
        })
    }

    /// Prefills (if needed) and decodes one sequence until it finishes.
    pub fn run_to_end(
        &mut self,
        id: u64,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(FinishReason, String)> {
        let mut text = String::new();
        let mut ev = match self.seq(id)?.phase {
            Phase::Prefill => self.prefill(id, &mut |_| {})?,
            _ => self.decode_step(&[id])?.remove(0),
        };
        loop {
            on_token(&ev);
            text.push_str(&ev.text);
            if let Some(f) = ev.finish {
                return Ok((f, text));
            }
            ev = self.decode_step(&[id])?.remove(0);
        }
    }

    /// The KV element type.
    pub fn kv_dtype(&self) -> KvDtype {
        self.cfg.kv_dtype
    }
}
