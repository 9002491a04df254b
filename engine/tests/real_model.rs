//! Tests on the real model (SmolLM2-135M-Instruct Q4_1). The model path comes from
//! `XPYD_MODEL`; the test script fetches it first. Without it these tests skip locally and
//! fail in CI (`CI=true`), so CI can never pass without running them.

use serde_json::Value;
use std::path::PathBuf;
use xpyd_engine::testing::generate_split;
use xpyd_engine::{ChatMessage, Engine, EngineConfig, SamplingParams};

fn model() -> Option<PathBuf> {
    let path = std::env::var_os("XPYD_MODEL").map(PathBuf::from);
    match path {
        Some(p) if p.exists() => Some(p),
        other => {
            let msg = format!(
                "real model not found (XPYD_MODEL={other:?}); run `./scripts/test.sh` or `xpyd model fetch` and set XPYD_MODEL"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

fn load(path: &PathBuf, chunk: usize) -> Engine {
    let mut cfg = EngineConfig::new(path);
    cfg.prefill_chunk = chunk;
    cfg.num_blocks = Some(512);
    Engine::load(cfg).unwrap()
}

fn golden() -> Value {
    serde_json::from_str(include_str!("fixtures/llamacpp_golden.json")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

const PARAGRAPH: &str = "The history of the printing press begins in the fifteenth century, when \
Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from \
those used for wine. Books became cheaper, literacy spread, and ideas crossed borders faster \
than ever before. ";

fn prompts(e: &Engine) -> Vec<Vec<u32>> {
    let t = e.tokenizer();
    let long = PARAGRAPH.repeat(12);
    let v = vec![
        t.encode_chat(&[ChatMessage::new("user", "What is the capital of France?")])
            .unwrap(),
        t.encode("Once upon a time, in a small village by the sea,")
            .unwrap(),
        t.encode_chat(&[ChatMessage::new(
            "user",
            "Write a haiku about autumn leaves.",
        )])
        .unwrap(),
        t.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
            .unwrap(),
        t.encode_chat(&[ChatMessage::new(
            "user",
            format!("Summarise this text:\n{long}"),
        )])
        .unwrap(),
    ];
    assert!(
        v[4].len() > 600,
        "the long prompt has {} tokens",
        v[4].len()
    );
    v
}

#[test]
fn chat_template_and_tokenizer_match_llama_cpp() {
    let Some(path) = model() else { return };
    let e = load(&path, 512);
    let g = golden();
    for case in g["chat"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = e.tokenizer().apply_chat_template(&msgs).unwrap();
        assert_eq!(text, case["prompt"].as_str().unwrap());
        assert_eq!(
            e.tokenizer().encode_chat(&msgs).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
    for case in g["text"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            e.tokenizer().encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}

/// Teacher-forced agreement with llama.cpp's greedy text on the same GGUF: after the
/// prompt and each prefix of llama.cpp's tokens, llama.cpp's next token is our argmax or
/// within 0.5 of it (logits here are 10–25). The two engines approximate the Q4_1 model differently (xpyd:
/// f32-scaled 8-bit activations per 32 values; llama.cpp: Q8_1 with f16 scales), so a
/// near tie may fall either way — on this prompt the first token is one (`The` vs `L`,
/// about 0.04 apart in our logits, and step 15 about 0.4); an implementation error
/// moves logits by whole units and the greedy text with them.
#[test]
fn greedy_agrees_with_llama_cpp_step_by_step() {
    let Some(path) = model() else { return };
    let mut e = load(&path, 512);
    let g = &golden()["greedy"][0];
    let (prompt, reference) = (ids(&g["prompt_ids"]), ids(&g["tokens"]));
    let mut exact = 0;
    for i in 0..reference.len() {
        let mut context = prompt.clone();
        context.extend(&reference[..i]);
        let logits = e.next_logits(&context).unwrap();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let theirs = logits[reference[i] as usize];
        assert!(
            theirs >= max - 0.5,
            "step {i}: llama.cpp's token {} scores {theirs}, our best {max}",
            reference[i]
        );
        exact += usize::from(theirs == max);
    }
    eprintln!(
        "{exact} of {} llama.cpp tokens are our argmax",
        reference.len()
    );
    // Today 13 of 16; the other three are near ties.
    assert!(
        exact * 4 >= reference.len() * 3,
        "{exact} of {} argmax matches",
        reference.len()
    );
}

#[test]
fn split_prefill_export_import_decode_is_identical() {
    let Some(path) = model() else { return };
    let mut a = load(&path, 256);
    let mut b = load(&path, 512);
    let mut single = load(&path, 256);
    for (i, p) in prompts(&a).into_iter().enumerate() {
        let params = SamplingParams {
            ignore_eos: i % 2 == 1,
            ..SamplingParams::greedy(24)
        };
        let reference = single
            .generate(9, p.clone(), params.clone(), &mut |_| {})
            .unwrap()
            .tokens;
        assert_eq!(
            generate_split(&mut a, &mut b, p.clone(), params).unwrap(),
            reference,
            "greedy prompt {i}"
        );
        if i == 0 || i == 4 {
            let params = SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: 1234 + i as u64,
                max_tokens: 24,
                ..Default::default()
            };
            let reference = single
                .generate(9, p.clone(), params.clone(), &mut |_| {})
                .unwrap()
                .tokens;
            assert_eq!(
                generate_split(&mut a, &mut b, p, params).unwrap(),
                reference,
                "sampled prompt {i}"
            );
        }
    }
}

#[test]
fn batch_of_eight_joining_at_different_steps_equals_alone() {
    let Some(path) = model() else { return };
    let mut e = load(&path, 512);
    let base = prompts(&e);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| base[i % 4][..base[i % 4].len() - i / 4].to_vec())
        .collect();
    let params = |i: usize| SamplingParams {
        temperature: if i.is_multiple_of(3) { 0.8 } else { 0.0 },
        seed: i as u64,
        max_tokens: 10 + i,
        ignore_eos: true,
        ..Default::default()
    };
    let alone: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            e.generate(100, prompts[i].clone(), params(i), &mut |_| {})
                .unwrap()
                .tokens
        })
        .collect();
    let mut got = vec![Vec::new(); 8];
    let mut running: Vec<u64> = Vec::new();
    let mut step = 0;
    while step < 8 || !running.is_empty() {
        if step < 8 {
            e.add_sequence(step as u64, prompts[step].clone(), params(step))
                .unwrap();
            got[step].push(e.prefill(step as u64, &mut |_| {}).unwrap().token);
            running.push(step as u64);
        }
        for ev in e.decode_step(&running).unwrap() {
            got[ev.seq as usize].push(ev.token);
            if ev.finish.is_some() {
                running.retain(|r| *r != ev.seq);
                e.remove(ev.seq);
            }
        }
        step += 1;
    }
    assert_eq!(got, alone);
    assert_eq!(e.kv_usage().used_blocks, 0);
}

#[test]
fn multibyte_text_streams_whole_characters() {
    let Some(path) = model() else { return };
    let mut e = load(&path, 512);
    let p = e
        .tokenizer()
        .encode_chat(&[ChatMessage::new(
            "user",
            "Écris une phrase en français avec des accents, et « des guillemets ».",
        )])
        .unwrap();
    let mut pieces = Vec::new();
    let g = e
        .generate(
            1,
            p,
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(40)
            },
            &mut |ev| pieces.push(ev.text.clone()),
        )
        .unwrap();
    // Every streamed piece is valid UTF-8 by type; none carries a replacement character
    // from a split byte sequence, and together they are the whole text.
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), g.text);
    assert!(!g.text.is_ascii(), "expected accented output: {:?}", g.text);
}

#[test]
fn the_mock_on_the_real_vocabulary_writes_words() {
    let Some(path) = model() else { return };
    let mut cfg = EngineConfig::new(&path);
    cfg.num_blocks = Some(64);
    cfg.mock = Some(xpyd_engine::MockLatency::default());
    let mut m = Engine::load(cfg).unwrap();
    let p = m.tokenizer().encode("Once upon a time,").unwrap();
    let g = m
        .generate(1, p.clone(), SamplingParams::greedy(24), &mut |_| {})
        .unwrap();
    assert_eq!(g.tokens.len(), 24, "no EOS: max_tokens governs");
    // Whole common words, each with its leading space.
    let words: Vec<&str> = g.text.split(' ').skip(1).collect();
    assert_eq!(words.len(), 24, "{:?}", g.text);
    assert!(
        words
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase())),
        "{:?}",
        g.text
    );
    let again = m
        .generate(1, p, SamplingParams::greedy(24), &mut |_| {})
        .unwrap();
    assert_eq!(again, g);
}

/// The fresh-machine report's case: greedy "Name three colors." gave one answer on the
/// first call and another on every repeat (a prefix-cache hit changed the logits). With
/// the cache on, first and repeated calls, and prompts sharing 1…n blocks with an
/// earlier one at lengths on and off block boundaries, give exactly the tokens an engine
/// without a cache gives.
#[test]
fn prefix_cache_hits_change_no_output() {
    let Some(path) = model() else { return };
    // Workers' default chunk (512: a prompt is one chunk unless a cache hit shortens it).
    let engine = |prefix_blocks: usize| {
        let mut cfg = EngineConfig::new(&path);
        cfg.num_blocks = Some(512);
        cfg.prefill_chunk = 512;
        cfg.prefix_cache_blocks = prefix_blocks;
        Engine::load(cfg).unwrap()
    };
    let (mut cached, mut plain) = (engine(256), engine(0));
    let t = cached.tokenizer().clone();
    let base = t
        .encode_chat(&[ChatMessage::new("user", "Name three colors.")])
        .unwrap();
    let tail = t.encode(" Also, name a fruit please.").unwrap();
    let mut prompts = vec![base.clone(), base.clone(), base.clone()];
    let bs = cached.config().block_size;
    for blocks in 1..=base.len() / bs {
        for extra in [0, 5] {
            let mut p = base[..(blocks * bs + extra).min(base.len())].to_vec();
            p.extend(&tail);
            prompts.push(p);
        }
    }
    let mut id = 0;
    let mut run = |e: &mut Engine, p: &[u32]| {
        id += 1;
        e.generate(id, p.to_vec(), SamplingParams::greedy(24), &mut |_| {})
            .unwrap()
            .tokens
    };
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(
            run(&mut cached, p),
            run(&mut plain, p),
            "prompt {i} ({} tokens)",
            p.len()
        );
    }
    let stats = cached.prefix_stats();
    assert!(
        stats.hit_tokens >= 2 * bs as u64 * (base.len() / bs) as u64,
        "{stats:?}"
    );
}
