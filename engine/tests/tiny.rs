//! Fast engine tests on tiny random-weight GGUF models written by the fixture.

use xpyd_engine::sampling::logprobs;
use xpyd_engine::testing::{TinyModel, generate_split};
use xpyd_engine::{
    ChatMessage, Engine, EngineConfig, EngineError, FinishReason, HeapMemory, KvDtype,
    KvFormatError, LayerChunk, SamplingParams, TokenEvent, TokenLogprobs,
};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn tiny(seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("tiny-{seed}.gguf"));
    TinyModel {
        seed,
        ..Default::default()
    }
    .write(&path)
    .unwrap();
    Fixture { _dir: dir, path }
}

fn engine(f: &Fixture, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::new(&f.path);
    cfg.num_blocks = Some(256);
    tweak(&mut cfg);
    Engine::load(cfg).unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 7 + salt * 13) % 256)
        .collect()
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: 42,
        max_tokens: 24,
        ignore_eos: true,
        ..Default::default()
    }
}

fn run_single(e: &mut Engine, p: Vec<u32>, params: SamplingParams) -> Vec<u32> {
    e.generate(1, p, params, &mut |_| {}).unwrap().tokens
}

#[test]
fn split_prefill_decode_equals_one_engine() {
    let f = tiny(1);
    let mut one = engine(&f, |_| {});
    let mut a = engine(&f, |c| c.prefill_chunk = 16);
    let mut b = engine(&f, |_| {});
    let mut single_chunked = engine(&f, |c| c.prefill_chunk = 16);
    for (i, n) in [5usize, 17, 40, 100].into_iter().enumerate() {
        let p = prompt(n, i as u32);
        let reference = run_single(
            &mut single_chunked,
            p.clone(),
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(20)
            },
        );
        let split = generate_split(
            &mut a,
            &mut b,
            p.clone(),
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(20)
            },
        )
        .unwrap();
        assert_eq!(reference, split, "greedy, prompt of {n}");
        assert_eq!(reference.len(), 20);
        let r2 = run_single(&mut single_chunked, p.clone(), sampled());
        let s2 = generate_split(&mut a, &mut b, p.clone(), sampled()).unwrap();
        assert_eq!(r2, s2, "sampled, prompt of {n}");
        // Prompts that fit in one chunk are computed identically in the default engine.
        if n <= 16 {
            assert_eq!(run_single(&mut one, p, sampled()), r2);
        }
    }
    assert_eq!(a.kv_usage().used_blocks, 0);
    assert_eq!(b.kv_usage().used_blocks, 0);
}

#[test]
fn f16_kv_round_trips() {
    let f = tiny(2);
    let mut a = engine(&f, |c| c.kv_dtype = KvDtype::F16);
    let mut b = engine(&f, |c| c.kv_dtype = KvDtype::F16);
    let p = prompt(33, 1);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(12)
    };
    let reference = run_single(&mut a, p.clone(), params.clone());
    assert_eq!(
        generate_split(&mut a, &mut b, p, params).unwrap(),
        reference
    );
}

#[test]
fn batch_decode_equals_alone() {
    let f = tiny(3);
    let mut e = engine(&f, |_| {});
    let params = |i: u64| SamplingParams {
        temperature: if i.is_multiple_of(2) { 0.0 } else { 0.7 },
        seed: i,
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(3 + i * 5, i as u32)).collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| run_single(&mut e, p.clone(), params(i as u64)))
        .collect();
    // Continuous batching: sequence i joins at step i; finished ones leave.
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 8];
    let mut running: Vec<u64> = Vec::new();
    for step in 0..40 {
        if step < 8 {
            let id = step as u64;
            e.add_sequence(id, prompts[step].clone(), params(id))
                .unwrap();
            let ev = e.prefill(id, &mut |_| {}).unwrap();
            got[step].push(ev.token);
            running.push(id);
        }
        if running.is_empty() {
            break;
        }
        for ev in e.decode_step(&running).unwrap() {
            got[ev.seq as usize].push(ev.token);
            if ev.finish.is_some() {
                running.retain(|r| *r != ev.seq);
                e.remove(ev.seq);
            }
        }
    }
    assert_eq!(got, alone);
    assert_eq!(e.kv_usage().used_blocks, 0);
}

/// Logprobs with 5 alternatives, the prompt's too, on the usual sampled parameters.
fn scored() -> SamplingParams {
    SamplingParams {
        logprobs: true,
        top_logprobs: 5,
        prompt_logprobs: true,
        ..sampled()
    }
}

#[test]
fn logprobs_are_exactly_the_models_whatever_the_chunking_the_cache_or_the_batch() {
    let f = tiny(3);
    let p = prompt(40, 1);
    // Each position's distribution from a pass over exactly the tokens before it.
    let mut reference = engine(&f, |_| {});
    let want = |r: &mut Engine, ctx: &[u32], token: u32| -> TokenLogprobs {
        logprobs(&r.next_logits(ctx).unwrap(), token, 5)
    };
    // Chunks of 16, the prefix cache on and primed with this very prompt.
    let mut e = engine(&f, |c| {
        c.prefill_chunk = 16;
        c.prefix_cache_blocks = 64;
    });
    let plain = run_single(&mut e, p.clone(), sampled());
    let hits = e.prefix_stats().hit_tokens;
    let mut events: Vec<TokenEvent> = Vec::new();
    let g = e
        .generate(2, p.clone(), scored(), &mut |ev| events.push(ev.clone()))
        .unwrap();
    assert_eq!(g.tokens, plain, "asking for logprobs changes no token");
    assert_eq!(
        e.prefix_stats().hit_tokens,
        hits,
        "a scored prompt is computed whole"
    );
    let prompt_lp = &events[0].prompt_logprobs;
    assert_eq!(
        prompt_lp.len(),
        p.len() - 1,
        "every prompt token but the first"
    );
    for (i, l) in prompt_lp.iter().enumerate() {
        assert_eq!(l, &want(&mut reference, &p[..=i], p[i + 1]), "prompt {i}");
    }
    assert!(events[1..].iter().all(|e| e.prompt_logprobs.is_empty()));
    let mut ctx = p.clone();
    for ev in &events {
        assert_eq!(
            ev.logprobs.as_ref(),
            Some(&want(&mut reference, &ctx, ev.token))
        );
        ctx.push(ev.token);
    }
    // In a decode batch beside another sequence: the same numbers.
    e.add_sequence(10, p.clone(), scored()).unwrap();
    e.add_sequence(11, prompt(23, 5), sampled()).unwrap();
    let mut batched = vec![e.prefill(10, &mut |_| {}).unwrap()];
    let other = e.prefill(11, &mut |_| {}).unwrap();
    assert!(other.logprobs.is_none() && other.prompt_logprobs.is_empty());
    let mut running = vec![10, 11];
    while running.contains(&10) {
        for ev in e.decode_step(&running).unwrap() {
            if ev.finish.is_some() {
                running.retain(|r| *r != ev.seq);
            }
            if ev.seq == 10 {
                batched.push(ev);
            } else {
                assert!(ev.logprobs.is_none());
            }
        }
    }
    let lp = |evs: &[TokenEvent]| -> Vec<Option<TokenLogprobs>> {
        evs.iter().map(|e| e.logprobs.clone()).collect()
    };
    assert_eq!(lp(&batched), lp(&events));
    assert_eq!(batched[0].prompt_logprobs, events[0].prompt_logprobs);
}

#[test]
fn a_resumed_sequence_continues_its_logprobs_without_scoring_the_prompt_again() {
    let f = tiny(4);
    let p = prompt(20, 2);
    let mut e = engine(&f, |_| {});
    let mut events: Vec<TokenEvent> = Vec::new();
    e.generate(1, p.clone(), scored(), &mut |ev| events.push(ev.clone()))
        .unwrap();
    let mut tokens = p.clone();
    tokens.extend(events[..5].iter().map(|e| e.token));
    e.add_resumed(2, tokens, p.len(), scored()).unwrap();
    let next = e.prefill(2, &mut |_| {}).unwrap();
    assert!(
        next.prompt_logprobs.is_empty(),
        "the prompt was scored already"
    );
    assert_eq!(next.logprobs, events[5].logprobs);
}

#[test]
fn layer_hook_streams_every_layer_of_every_chunk() {
    let f = tiny(4);
    let mut a = engine(&f, |c| c.prefill_chunk = 16);
    let mut b = engine(&f, |_| {});
    let p = prompt(40, 2);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(8)
    };
    let reference = run_single(&mut a, p.clone(), params.clone());
    a.add_sequence(1, p, params).unwrap();
    // Streaming order: the header goes first, before anything is computed.
    let header = a.export_header(1).unwrap();
    assert_eq!(header.token_count, 40);
    b.begin_import(5, &header).unwrap();
    b.begin_import(6, &header).unwrap();
    let mut chunks: Vec<LayerChunk> = Vec::new();
    let first = a.prefill(1, &mut |c| chunks.push(c)).unwrap();
    // 40 tokens in chunks of 16 → 3 chunks × 2 layers, in layer order within a chunk.
    let order: Vec<(u32, u32, u32)> = chunks.iter().map(|c| (c.start, c.count, c.layer)).collect();
    assert_eq!(
        order,
        vec![
            (0, 16, 0),
            (0, 16, 1),
            (16, 16, 0),
            (16, 16, 1),
            (32, 8, 0),
            (32, 8, 1)
        ]
    );
    for c in &chunks {
        b.import_chunk(5, c).unwrap();
        b.import_chunk(6, c).unwrap();
    }
    // Without the final state (the first sampled token) the import cannot finish.
    let err = b.finish_import(6).unwrap_err();
    assert!(
        matches!(err, EngineError::KvImport(KvFormatError::Geometry(_))),
        "{err}"
    );
    let resume = a.resume_state(1).unwrap();
    let mut forged = resume.clone();
    forged.tokens[0] ^= 1;
    assert!(
        b.import_resume(5, forged).is_err(),
        "a state for another prompt is refused"
    );
    b.begin_import(5, &header).unwrap();
    for c in &chunks {
        b.import_chunk(5, c).unwrap();
    }
    b.import_resume(5, resume.clone()).unwrap();
    b.finish_import(5).unwrap();
    let mut out = vec![first.token];
    b.run_to_end(5, &mut |ev| out.push(ev.token)).unwrap();
    assert_eq!(out, reference);
}

/// A resume state from a peer whose offsets or held-back text lie is refused with a
/// typed error at import, before the decode step would slice with it (a detokenizer
/// position beyond the tokens used to panic the engine thread there).
#[test]
fn lying_resume_states_are_refused_before_they_are_used() {
    let f = tiny(4);
    let mut a = engine(&f, |_| {});
    let mut b = engine(&f, |_| {});
    let params = SamplingParams {
        ignore_eos: true,
        stop: vec!["zz".into()],
        ..SamplingParams::greedy(6)
    };
    a.add_sequence(1, prompt(20, 1), params).unwrap();
    let header = a.export_header(1).unwrap();
    let mut chunks: Vec<LayerChunk> = Vec::new();
    a.prefill(1, &mut |c| chunks.push(c)).unwrap();
    let resume = a.resume_state(1).unwrap();
    fn forge<T: serde::Serialize + serde::de::DeserializeOwned>(
        x: &T,
        at: &str,
        edit: &dyn Fn(&mut serde_json::Value),
    ) -> T {
        let mut v = serde_json::to_value(x).unwrap();
        edit(v.pointer_mut(at).unwrap());
        serde_json::from_value(v).unwrap()
    }
    type Edit = fn(&mut serde_json::Value);
    let lies: [(&str, Edit); 4] = [
        ("detokenizer beyond the tokens", |v| {
            v["detok"]["read"] = 1000.into()
        }),
        ("detokenizer prefix after read", |v| {
            v["detok"]["prefix"] = 999.into()
        }),
        ("detokenizer inside the prompt", |v| {
            v["detok"]["prefix"] = 0.into()
        }),
        ("held-back text", |v| {
            v["stop"]["pending"] = "x".repeat(4096).into()
        }),
    ];
    for (id, (what, edit)) in (10..).zip(lies) {
        b.begin_import(id, &header).unwrap();
        for c in &chunks {
            b.import_chunk(id, c).unwrap();
        }
        let err = b.import_resume(id, forge(&resume, "", &edit)).unwrap_err();
        assert!(
            matches!(err, EngineError::KvImport(KvFormatError::Geometry(_))),
            "{what}: {err}"
        );
        // The same lie inside a header is refused there.
        let err = b
            .begin_import(id, &forge(&header, "/resume", &edit))
            .unwrap_err();
        assert!(
            matches!(err, EngineError::KvImport(KvFormatError::Geometry(_))),
            "{what} in a header: {err}"
        );
    }
    assert_eq!(
        b.kv_usage().used_blocks,
        0,
        "refused imports hold no blocks"
    );
    b.begin_import(5, &header).unwrap();
    for c in &chunks {
        b.import_chunk(5, c).unwrap();
    }
    b.import_resume(5, resume).unwrap();
    b.finish_import(5).unwrap();
    b.run_to_end(5, &mut |_| {}).unwrap();
}

#[test]
fn corrupt_and_mismatched_imports_are_typed_errors() {
    let f1 = tiny(5);
    let f2 = tiny(6);
    let mut a = engine(&f1, |_| {});
    let mut b = engine(&f1, |_| {});
    let mut other = engine(&f2, |_| {});
    let mut f16 = engine(&f1, |c| c.kv_dtype = KvDtype::F16);
    a.add_sequence(1, prompt(20, 0), SamplingParams::greedy(4))
        .unwrap();
    a.prefill(1, &mut |_| {}).unwrap();
    let bytes = a.export(1).unwrap();
    let free = b.kv_usage().free_blocks;

    // A flipped byte anywhere in the payload is caught by a checksum.
    for at in [bytes.len() / 2, bytes.len() - 20] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let err = b.import(2, &bad).unwrap_err();
        assert!(
            matches!(err, EngineError::KvImport(KvFormatError::Checksum { .. })),
            "{err}"
        );
    }
    // Truncation, garbage, wrong model, wrong dtype.
    let err = b.import(2, &bytes[..bytes.len() - 9]).unwrap_err();
    assert!(
        matches!(err, EngineError::KvImport(KvFormatError::Truncated { .. })),
        "{err}"
    );
    let err = b.import(2, b"definitely not kv").unwrap_err();
    assert!(
        matches!(err, EngineError::KvImport(KvFormatError::BadMagic)),
        "{err}"
    );
    let err = other.import(2, &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::KvImport(KvFormatError::ModelMismatch { .. })
        ),
        "{err}"
    );
    let err = f16.import(2, &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::KvImport(KvFormatError::DtypeMismatch { .. })
        ),
        "{err}"
    );
    // Missing layers → Incomplete, and the reservation is released.
    let header = a.export_header(1).unwrap();
    b.begin_import(3, &header).unwrap();
    assert!(b.kv_usage().free_blocks < free);
    let err = b.finish_import(3).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::KvImport(KvFormatError::Incomplete { layer: 0, .. })
        ),
        "{err}"
    );
    assert_eq!(
        b.kv_usage().free_blocks,
        free,
        "failed imports free their blocks"
    );
    // A chunk out of order is refused.
    b.begin_import(4, &header).unwrap();
    let chunk = LayerChunk {
        layer: 0,
        start: 3,
        count: 1,
        payload: vec![0; 2 * 32 * 4],
    };
    let err = b.import_chunk(4, &chunk).unwrap_err();
    assert!(
        matches!(err, EngineError::KvImport(KvFormatError::OutOfOrder { .. })),
        "{err}"
    );
    assert_eq!(b.kv_usage().free_blocks, free);
    // The good bytes still import.
    b.import(2, &bytes).unwrap();
}

#[test]
fn out_of_blocks_is_a_typed_error_not_a_panic() {
    let f = tiny(7);
    let mut e = engine(&f, |c| {
        c.num_blocks = Some(4);
        c.block_size = 4;
    });
    let err = e
        .add_sequence(1, prompt(17, 0), SamplingParams::greedy(4))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::OutOfBlocks {
                needed: 5,
                free: 4,
                total: 4
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    // A 16-token prompt fits exactly; the first decode step needs a 5th block.
    e.add_sequence(
        1,
        prompt(16, 0),
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(4)
        },
    )
    .unwrap();
    e.prefill(1, &mut |_| {}).unwrap();
    let err = e.decode_step(&[1]).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::OutOfBlocks {
                needed: 1,
                free: 0,
                ..
            }
        ),
        "{err}"
    );
    e.remove(1);
    assert_eq!(e.kv_usage().free_blocks, 4);
}

#[test]
fn bad_requests_get_typed_errors() {
    let f = tiny(8);
    let mut e = engine(&f, |_| {});
    assert!(matches!(
        e.add_sequence(1, vec![], SamplingParams::default()),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        e.add_sequence(1, vec![5000], SamplingParams::default()),
        Err(EngineError::BadToken { id: 5000, .. })
    ));
    assert!(matches!(
        e.add_sequence(1, prompt(1024, 0), SamplingParams::default()),
        Err(EngineError::ContextOverflow {
            tokens: 1024,
            max: 1024
        })
    ));
    let bad = SamplingParams {
        top_p: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        e.add_sequence(1, prompt(3, 0), bad),
        Err(EngineError::InvalidParam { field: "top_p", .. })
    ));
    assert!(matches!(
        e.decode_step(&[99]),
        Err(EngineError::UnknownSequence(99))
    ));
    e.add_sequence(1, prompt(3, 0), SamplingParams::default())
        .unwrap();
    assert!(matches!(
        e.decode_step(&[1]),
        Err(EngineError::WrongState { .. })
    ));
    assert!(matches!(e.export(1), Err(EngineError::WrongState { .. })));
    assert!(matches!(
        e.add_sequence(1, prompt(3, 0), SamplingParams::default()),
        Err(EngineError::DuplicateSequence(1))
    ));
}

#[test]
fn finish_reasons_and_stop_strings() {
    let f = tiny(9);
    let mut e = engine(&f, |_| {});
    let p = prompt(10, 3);
    let g = e
        .generate(
            1,
            p.clone(),
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(30)
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(g.finish, FinishReason::Length);
    assert_eq!(g.tokens.len(), 30);
    // Pick a stop string from the middle of the text the model produces: generation must
    // end there and the stop string must not be emitted.
    let text = g.text.clone();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 8 {
        let stop: String = chars[4..7].iter().collect();
        let at = text.find(&stop).unwrap();
        let mut streamed = String::new();
        let g2 = e
            .generate(
                2,
                p,
                SamplingParams {
                    ignore_eos: true,
                    stop: vec![stop.clone()],
                    ..SamplingParams::greedy(30)
                },
                &mut |ev| streamed.push_str(&ev.text),
            )
            .unwrap();
        assert_eq!(g2.finish, FinishReason::Stop);
        assert_eq!(g2.text, text[..at]);
        assert_eq!(streamed, g2.text);
    }
}

#[test]
fn prefix_cache_reuses_blocks_and_changes_nothing() {
    let f = tiny(5);
    let mut plain = engine(&f, |_| {});
    let mut cached = engine(&f, |c| c.prefix_cache_blocks = 64);
    let mut b = engine(&f, |_| {});
    let base = prompt(70, 1);
    let with = |salt: u32, n: usize| {
        let mut p = base.clone();
        p.extend(prompt(n, salt));
        p
    };
    // A first prompt warms the cache with its 4 full leading blocks.
    let _ = run_single(&mut cached, with(2, 5), SamplingParams::greedy(4));
    assert_eq!(cached.prefix_stats().cached_blocks, 4);
    assert_eq!(
        cached.kv_usage().used_blocks,
        4,
        "only the cache holds blocks"
    );
    for (id, salt, params) in [(9, 3, SamplingParams::greedy(12)), (10, 4, sampled())] {
        let p = with(salt, 9);
        let want = run_single(&mut plain, p.clone(), params.clone());
        // Streamed through the prefill hook (cached rows first) into another engine.
        cached.add_sequence(id, p.clone(), params.clone()).unwrap();
        assert_eq!(cached.reused_tokens(id), 64);
        let header = cached.export_header(id).unwrap();
        let mut chunks = vec![];
        let first = cached.prefill(id, &mut |c| chunks.push(c)).unwrap();
        let resume = cached.resume_state(id).unwrap();
        cached.remove(id);
        let rows: u32 = chunks
            .iter()
            .filter(|c| c.layer == 0)
            .map(|c| c.count)
            .sum();
        assert_eq!(
            rows as usize,
            p.len(),
            "every row of layer 0 was handed out"
        );
        b.begin_import(id, &header).unwrap();
        for c in &chunks {
            b.import_chunk(id, c).unwrap();
        }
        b.import_resume(id, resume).unwrap();
        b.finish_import(id).unwrap();
        let mut got = vec![first.token];
        if first.finish.is_none() {
            b.run_to_end(id, &mut |ev| got.push(ev.token)).unwrap();
        }
        b.remove(id);
        assert_eq!(got, want, "prefix-cache hit changed the output");
    }
    let st = cached.prefix_stats();
    assert_eq!(st.hit_tokens, 128);
    assert_eq!(st.lookup_tokens, 75 + 79 + 79);
}

#[test]
fn retune_empties_the_prefix_cache_and_refuses_while_sequences_are_held() {
    let f = tiny(5);
    let mut e = engine(&f, |c| c.prefix_cache_blocks = 64);
    let mut plain = engine(&f, |_| {});
    let p = prompt(70, 2);
    let want = run_single(&mut plain, p.clone(), SamplingParams::greedy(6));
    let _ = run_single(&mut e, p.clone(), SamplingParams::greedy(6));
    assert_eq!(e.prefix_stats().cached_blocks, 4);
    // A held sequence blocks the change and leaves everything as it was.
    e.add_sequence(7, prompt(5, 9), SamplingParams::greedy(2))
        .unwrap();
    match e.retune(32, 0) {
        Err(EngineError::InvalidParam { field, .. }) => assert_eq!(field, "sequences"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(e.prefix_stats().cached_blocks, 4);
    e.remove(7);
    // Out of range: named, nothing changed.
    match e.retune(1, 0) {
        Err(EngineError::InvalidParam { field, .. }) => assert_eq!(field, "prefill_chunk"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    e.retune(32, 0).unwrap();
    assert_eq!(e.prefix_stats().cached_blocks, 0);
    assert_eq!(e.kv_usage().used_blocks, 0, "the cache's blocks went back");
    assert_eq!(e.config().prefill_chunk, 32);
    // The same engine computes the same tokens in its new settings (smaller chunks).
    assert_eq!(
        run_single(&mut e, p.clone(), SamplingParams::greedy(6)),
        want
    );
    assert_eq!(e.prefix_stats().lookup_tokens, 0, "the cache is off now");
    // The pools move to other memory only when empty, and compute the same there.
    e.add_sequence(8, prompt(5, 9), SamplingParams::greedy(2))
        .unwrap();
    let _ = e.prefill(8, &mut |_| {}).unwrap();
    let refused = e.move_kv_memory(Box::new(|n| Ok(Box::new(HeapMemory::new(n)))));
    assert!(matches!(
        refused,
        Err(EngineError::InvalidParam {
            field: "sequences",
            ..
        })
    ));
    e.remove(8);
    let small = e.move_kv_memory(Box::new(|_| Ok(Box::new(HeapMemory::new(8)))));
    assert!(matches!(
        small,
        Err(EngineError::InvalidParam {
            field: "kv_memory",
            ..
        })
    ));
    let mut made = 0;
    e.move_kv_memory(Box::new(|n| {
        made = n;
        Ok(Box::new(HeapMemory::new(n)))
    }))
    .unwrap();
    assert!(made > 0);
    assert_eq!(run_single(&mut e, p, SamplingParams::greedy(6)), want);
}

#[test]
fn prefix_cache_gives_way_when_the_pool_is_short() {
    let f = tiny(6);
    let mut e = engine(&f, |c| {
        c.num_blocks = Some(16);
        c.prefix_cache_blocks = 64;
    });
    let _ = run_single(&mut e, prompt(100, 1), SamplingParams::greedy(2));
    assert_eq!(e.prefix_stats().cached_blocks, 6);
    // 13 blocks needed, 10 free: cache entries are dropped to make room.
    let out = run_single(&mut e, prompt(200, 2), SamplingParams::greedy(2));
    assert_eq!(out.len(), 2);
    // Three of the first prompt's blocks went (its deepest first); its first three stay.
    assert_eq!(e.prefix_stats().cached_blocks, 3 + 12);
    e.add_sequence(7, prompt(100, 1), SamplingParams::greedy(2))
        .unwrap();
    assert_eq!(e.reused_tokens(7), 48);
}

/// KV pools in a file mapping that the test also maps, as a same-host sender does.
#[derive(Debug)]
struct Mapped(memmap2::MmapMut);

impl xpyd_engine::KvMemory for Mapped {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

#[allow(unsafe_code)]
fn map(file: &std::fs::File) -> memmap2::MmapMut {
    // SAFETY: the file belongs to this test and is never truncated while mapped.
    unsafe { memmap2::MmapMut::map_mut(file) }.unwrap()
}

/// Writes a layer chunk where the layout says its rows go (K rows, then V rows).
fn place(mem: &mut [u8], layout: &xpyd_engine::KvLayout, table: &[u32], c: &LayerChunk) {
    let (bs, row) = (layout.block_size, layout.row_bytes);
    let n = c.count as usize;
    for (kv, rows) in c.payload.chunks(n * row).enumerate() {
        for (i, src) in rows.chunks(row).enumerate() {
            let pos = c.start as usize + i;
            let at = layout.pools[c.layer as usize][kv]
                + (table[pos / bs] as usize * bs + pos % bs) * row;
            mem[at..at + row].copy_from_slice(src);
        }
    }
}

#[test]
fn placed_import_checks_rows_a_peer_wrote_into_the_pools() {
    let f = tiny(9);
    let mut a = engine(&f, |c| c.prefill_chunk = 16);
    let file = tempfile::tempfile().unwrap();
    let mut cfg = EngineConfig::new(&f.path);
    cfg.num_blocks = Some(64);
    let make: Box<xpyd_engine::KvMemoryFactory<'_>> = Box::new(|bytes| {
        file.set_len(bytes as u64).map_err(|e| e.to_string())?;
        Ok(Box::new(Mapped(map(&file))))
    });
    let mut b = Engine::load_with_kv_memory(cfg, Some(make)).unwrap();
    let layout = b.kv_layout();
    assert_eq!(layout.memory_bytes as u64, file.metadata().unwrap().len());
    let mut peer = map(&file);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(8)
    };
    let p = prompt(40, 5);
    let reference = run_single(&mut a, p.clone(), params.clone());

    a.add_sequence(1, p.clone(), params.clone()).unwrap();
    let header = a.export_header(1).unwrap();
    // A reservation that the header does not match is refused, and its blocks held.
    b.reserve_import(3, 39).unwrap();
    assert!(matches!(
        b.begin_import(3, &header),
        Err(EngineError::KvImport(KvFormatError::Geometry(_)))
    ));
    assert!(b.kv_usage().used_blocks > 0, "held, not freed");
    assert!(matches!(
        b.reserve_import(3, 40),
        Err(EngineError::DuplicateSequence(3))
    ));
    assert_eq!(b.release_held(3), 3);
    assert_eq!(b.kv_usage().used_blocks, 0);

    let table = b.reserve_import(7, 40).unwrap();
    b.begin_import(7, &header).unwrap();
    let mut chunks = Vec::new();
    let first = a.prefill(1, &mut |c| chunks.push(c)).unwrap();
    for c in &chunks {
        place(&mut peer, &layout, &table, c);
        let mut seen = 0;
        b.import_rows_in_place(
            7,
            c.layer,
            c.start,
            c.count,
            c.payload.len(),
            &mut |off, bytes| {
                assert_eq!(off, seen, "runs come in payload order");
                assert_eq!(bytes, &c.payload[off..off + bytes.len()]);
                seen += bytes.len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, c.payload.len());
    }
    b.import_resume(7, a.resume_state(1).unwrap()).unwrap();
    b.finish_import(7).unwrap();
    let mut out = vec![first.token];
    b.run_to_end(7, &mut |ev| out.push(ev.token)).unwrap();
    assert_eq!(out, reference);
    // Completed imports free their blocks normally.
    b.remove(7);
    assert_eq!(b.kv_usage().used_blocks, 0);

    // A failed check fails the import; the blocks stay held until released.
    let table = b.reserve_import(8, 40).unwrap();
    b.begin_import(8, &header).unwrap();
    let c = &chunks[0];
    place(&mut peer, &layout, &table, c);
    let err = b
        .import_rows_in_place(
            8,
            c.layer,
            c.start,
            c.count,
            c.payload.len(),
            &mut |_, _| Err("checksum mismatch".into()),
        )
        .unwrap_err();
    assert!(
        matches!(err, EngineError::KvImport(KvFormatError::Checksum { .. })),
        "{err}"
    );
    assert!(b.sequences() == 0 && b.kv_usage().used_blocks == table.len());
    assert_eq!(b.release_held(8), table.len());

    // Rows in place are refused for an import that was not reserved (nothing wrote them).
    b.begin_import(9, &header).unwrap();
    assert!(matches!(
        b.import_rows_in_place(9, 0, 0, 16, c.payload.len(), &mut |_, _| Ok(())),
        Err(EngineError::WrongState { .. })
    ));
}

/// The Llama 2 chat template as Hugging Face ships it (`tokenizer_config.json`): Python
/// string methods (`.strip()`) and `raise_exception`, which real templates use.
const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

#[test]
fn hugging_face_templates_with_python_methods_render() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama2-template.gguf");
    TinyModel {
        chat_template: Some(LLAMA2_TEMPLATE.into()),
        ..Default::default()
    }
    .write(&path)
    .unwrap();
    let e = Engine::load(EngineConfig::new(&path)).unwrap();
    let t = e.tokenizer();
    let text = t
        .apply_chat_template(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "  Hi there \n"),
            ChatMessage::new("assistant", " Hello. "),
            ChatMessage::new("user", "Bye"),
        ])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  Hi there [/INST] Hello. <|im_end|><|im_start|>[INST] Bye [/INST]"
    );
    // The template's own check, surfaced as a typed error naming its message.
    let err = t
        .apply_chat_template(&[ChatMessage::new("assistant", "first?")])
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Tokenizer(m) if m.contains("Conversation roles must alternate")),
        "{err}"
    );
}

mod fuzz {
    //! Fuzz targets over what a peer sends an importing engine: whole exports with
    //! bytes changed anywhere, and resume states with any numbers in them. Whatever
    //! arrives ends in an import or a typed error, never a panic, and a refused import
    //! holds no blocks. `PROPTEST_CASES` lengthens the run (`scripts/fuzz.sh`).
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Source {
        _f: Fixture,
        bytes: Vec<u8>,
        state: xpyd_engine::ResumeState,
        /// The importing engine, shared by every case (each leaves it empty).
        sink: Mutex<Engine>,
    }

    /// A prefilled sequence's export, its resume state and an importing engine.
    fn source() -> &'static Source {
        static S: OnceLock<Source> = OnceLock::new();
        S.get_or_init(|| {
            let f = tiny(9);
            let mut a = engine(&f, |_| {});
            let params = SamplingParams {
                stop: vec!["ab".into()],
                ..SamplingParams::greedy(5)
            };
            a.add_sequence(1, prompt(20, 3), params).unwrap();
            a.prefill(1, &mut |_| {}).unwrap();
            Source {
                bytes: a.export(1).unwrap(),
                state: a.resume_state(1).unwrap(),
                sink: Mutex::new(engine(&f, |_| {})),
                _f: f,
            }
        })
    }

    fn next_id() -> u64 {
        static ID: AtomicU64 = AtomicU64::new(100);
        ID.fetch_add(1, Ordering::Relaxed)
    }

    /// Decodes an accepted import to its end and frees it; either way the engine is
    /// left empty.
    fn settle(b: &mut Engine, id: u64, accepted: bool) -> Result<(), TestCaseError> {
        if accepted {
            b.run_to_end(id, &mut |_| {}).unwrap();
            b.remove(id);
        }
        prop_assert_eq!(b.kv_usage().used_blocks, 0);
        Ok(())
    }

    proptest! {

        #[test]
        fn changed_exports_import_or_fail_typed(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let src = source();
            let mut b = src.sink.lock().unwrap_or_else(|p| p.into_inner());
            let mut bad = src.bytes.clone();
            for (at, v) in edits {
                let i = at.index(bad.len());
                bad[i] = v;
            }
            if truncate {
                bad.truncate(cut.index(bad.len()));
            }
            let id = next_id();
            let accepted = b.import(id, &bad).is_ok();
            settle(&mut b, id, accepted)?;
        }

        #[test]
        fn resume_states_with_any_numbers_import_or_fail_typed(
            prefix in 0usize..40,
            read in 0usize..40,
            extra in 0usize..3,
            pending in 0usize..6,
            prompt_len in 0usize..25,
        ) {
            let src = source();
            let mut b = src.sink.lock().unwrap_or_else(|p| p.into_inner());
            let (header, chunks) = xpyd_engine::kv::format::decode_all(&src.bytes).unwrap();
            let mut streamed = header.clone();
            streamed.resume = xpyd_engine::ResumeState::new(
                header.resume.tokens[..20].to_vec(),
                header.resume.params.clone(),
            );
            let id = next_id();
            b.begin_import(id, &streamed).unwrap();
            for c in &chunks {
                b.import_chunk(id, c).unwrap();
            }
            let mut v = serde_json::to_value(&src.state).unwrap();
            v["detok"]["prefix"] = prefix.into();
            v["detok"]["read"] = read.into();
            v["stop"]["pending"] = "a".repeat(pending).into();
            v["prompt_len"] = prompt_len.into();
            let mut lie: xpyd_engine::ResumeState = serde_json::from_value(v).unwrap();
            for _ in 0..extra {
                lie.tokens.push(5);
            }
            let accepted = match b.import_resume(id, lie) {
                Ok(()) => {
                    b.finish_import(id).unwrap();
                    true
                }
                Err(e) => {
                    prop_assert!(matches!(e, EngineError::KvImport(_)), "{}", e);
                    false
                }
            };
            settle(&mut b, id, accepted)?;
        }
    }
}

#[test]
fn the_f32_reference_tracks_the_quantized_path_and_is_exchanged_with_nothing() {
    let f = tiny(5);
    let mut quant = engine(&f, |_| {});
    let mut reference = engine(&f, |c| c.reference_f32 = true);
    assert_ne!(quant.fingerprint(), reference.fingerprint());
    let p = prompt(30, 3);
    let (a, b) = (
        quant.next_logits(&p).unwrap(),
        reference.next_logits(&p).unwrap(),
    );
    assert_ne!(a, b, "two numeric paths");
    let mean = |x: &[f32]| x.iter().map(|v| f64::from(*v)).sum::<f64>() / x.len() as f64;
    let (ma, mb) = (mean(&a), mean(&b));
    let cov: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (f64::from(*x) - ma) * (f64::from(*y) - mb))
        .sum();
    let var = |x: &[f32], m: f64| x.iter().map(|v| (f64::from(*v) - m).powi(2)).sum::<f64>();
    let r = cov / (var(&a, ma) * var(&b, mb)).sqrt();
    assert!(r > 0.99, "correlation of the two paths' logits: {r}");
    // Scoring agrees with next_logits position by position (the reference's f32 GEMM
    // may round differently for other row counts: close, not the same bits).
    let lp = reference.score(&p).unwrap();
    assert_eq!(lp.len(), p.len() - 1);
    let want = logprobs(&reference.next_logits(&p[..10]).unwrap(), p[10], 0).logprob;
    assert!((lp[9] - want).abs() < 1e-4, "{} vs {want}", lp[9]);
}
