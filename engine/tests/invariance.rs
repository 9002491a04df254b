//! Property tests of the engine's one numeric path (tiny random-weight model): a token's
//! KV and logits are bitwise the same however its prompt was chunked, whatever prefix
//! came from the prefix cache, whatever else was in its decode batch, and whether the
//! token was decoded or prefilled (what re-prefilling a migrated request relies on).

use proptest::prelude::*;
use xpyd_engine::testing::TinyModel;
use xpyd_engine::{Engine, EngineConfig, SamplingParams};

/// Tokens of the tiny model's byte vocabulary (ids above its three special tokens).
fn tokens(len: usize, seed: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| 3 + (xpyd_engine::sampling::splitmix64(seed ^ (i << 20)) % 256) as u32)
        .collect()
}

fn model() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    TinyModel::default().write(&path).unwrap();
    (dir, path)
}

fn engine(path: &std::path::Path, chunk: usize, prefix_blocks: usize) -> Engine {
    let mut cfg = EngineConfig::new(path);
    cfg.num_blocks = Some(256);
    cfg.prefill_chunk = chunk;
    cfg.prefix_cache_blocks = prefix_blocks;
    Engine::load(cfg).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The KV rows of an export (everything after its header: the layer chunks).
fn rows(export: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(export[10..14].try_into().unwrap()) as usize;
    &export[14 + len + 8..]
}

fn ignore_eos(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Logits after a prompt: prefill chunk size and a cached prefix of any length (a
    /// donor prompt sharing its first `shared` tokens ran first) change no bit.
    #[test]
    fn chunking_and_cached_prefixes_change_no_logit(
        len in 2usize..200,
        chunk in 16usize..70,
        shared_frac in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let (_d, path) = model();
        let prompt = tokens(len, seed);
        let shared = ((len as f64) * shared_frac) as usize;
        let mut donor = prompt[..shared].to_vec();
        donor.extend(tokens(1 + (seed % 40) as usize, !seed));
        let mut cached = engine(&path, chunk, 64);
        cached.next_logits(&donor).unwrap();
        let with_cache = cached.next_logits(&prompt).unwrap();
        let plain = engine(&path, 4096, 0).next_logits(&prompt).unwrap();
        prop_assert_eq!(bits(&with_cache), bits(&plain), "len {} chunk {} shared {}", len, chunk, shared);
    }

    /// A sequence decoded `k` steps, alone or in a batch with others that joined at
    /// other times, holds bitwise the KV that prefilling its prompt plus its first `k`
    /// tokens computes; and that prefill then samples the same next token.
    #[test]
    fn decoded_kv_equals_reprefilled_kv_in_any_batch(
        len in 1usize..90,
        steps in 1usize..12,
        others in 0usize..4,
        chunk in 16usize..40,
        seed in any::<u64>(),
    ) {
        let (_d, path) = model();
        let prompt = tokens(len, seed);
        let mut e = engine(&path, chunk, 0);
        // Other sequences, each prefilled and already decoding.
        for o in 0..others {
            let id = 100 + o as u64;
            e.add_sequence(id, tokens(1 + (seed as usize + o * 7) % 30, seed ^ o as u64), ignore_eos(64)).unwrap();
            e.prefill(id, &mut |_| {}).unwrap();
        }
        e.add_sequence(1, prompt.clone(), ignore_eos(64)).unwrap();
        let mut out = vec![e.prefill(1, &mut |_| {}).unwrap().token];
        for step in 0..steps {
            // The batch changes from step to step: some others sit out some steps.
            let mut ids = vec![1];
            ids.extend((0..others as u64).filter(|o| !(step as u64 + o).is_multiple_of(3)).map(|o| 100 + o));
            let evs = e.decode_step(&ids).unwrap();
            out.push(evs[0].token);
        }
        let decoded = e.export(1).unwrap();
        // Prefill of prompt + every token but the last sampled: the same positions.
        let mut again = prompt.clone();
        again.extend(&out[..steps]);
        let mut f = engine(&path, chunk + 3, 0);
        f.add_sequence(2, again, ignore_eos(64)).unwrap();
        let next = f.prefill(2, &mut |_| {}).unwrap();
        let prefilled = f.export(2).unwrap();
        prop_assert_eq!(rows(&prefilled), rows(&decoded));
        prop_assert_eq!(next.token, out[steps]);
    }
}

/// Every event (token, text, finish) of a generation, prefilled in `e` as sequence `id`.
fn events(
    e: &mut Engine,
    id: u64,
    resumed: Option<usize>,
    tokens: Vec<u32>,
    params: SamplingParams,
) -> Vec<(u32, String, Option<xpyd_engine::FinishReason>)> {
    match resumed {
        Some(prompt_len) => e.add_resumed(id, tokens, prompt_len, params).unwrap(),
        None => e.add_sequence(id, tokens, params).unwrap(),
    }
    let mut out = Vec::new();
    e.run_to_end(id, &mut |ev| {
        out.push((ev.token, ev.text.clone(), ev.finish))
    })
    .unwrap();
    e.remove(id);
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A request re-prefilled elsewhere from its prompt plus the tokens it had generated
    /// (a migration) continues event for event — tokens, text deltas (multi-byte
    /// characters and held-back stop-string text included) and finish — as the
    /// uninterrupted run, greedy or seeded.
    #[test]
    fn a_resumed_sequence_continues_event_for_event(
        len in 1usize..60,
        max_tokens in 2usize..24,
        cut_frac in 0.0f64..1.0,
        temperature in prop_oneof![Just(0.0f32), 0.5f32..1.5],
        stop_len in 0usize..3,
        seed in any::<u64>(),
    ) {
        let (_d, path) = model();
        let prompt = tokens(len, seed);
        let mut params = SamplingParams {
            temperature,
            seed,
            ..SamplingParams::greedy(max_tokens)
        };
        let mut e = engine(&path, 16, 0);
        let whole = events(&mut e, 1, None, prompt.clone(), params.clone());
        // A stop string made of text this generation produced, when it produced some.
        let text: String = whole.iter().map(|(_, t, _)| t.as_str()).collect();
        if stop_len > 0 && text.chars().count() > 4 {
            let s: String = text.chars().skip(2).take(stop_len).collect();
            params.stop = vec![s];
        }
        let whole = events(&mut e, 2, None, prompt.clone(), params.clone());
        prop_assume!(whole.len() >= 2);
        let cut = 1 + ((whole.len() - 1) as f64 * cut_frac) as usize;
        let mut resumed_tokens = prompt.clone();
        resumed_tokens.extend(whole[..cut].iter().map(|(t, _, _)| *t));
        let mut f = engine(&path, 16, 0);
        let rest = events(&mut f, 3, Some(prompt.len()), resumed_tokens, params);
        prop_assert_eq!(&rest[..], &whole[cut..]);
    }
}

#[test]
fn resuming_checks_its_prompt_length_and_an_ended_sequence() {
    let (_d, path) = model();
    let mut e = engine(&path, 16, 0);
    let p = tokens(8, 1);
    assert!(
        e.add_resumed(1, p.clone(), 0, SamplingParams::greedy(4))
            .is_err()
    );
    assert!(
        e.add_resumed(1, p.clone(), 9, SamplingParams::greedy(4))
            .is_err()
    );
    // Two generated tokens with max_tokens 2: the sequence had already ended.
    let err = e
        .add_resumed(1, p.clone(), 6, SamplingParams::greedy(2))
        .unwrap_err();
    assert!(err.to_string().contains("prompt_len"), "{err}");
    assert_eq!(e.sequences(), 0);
}
