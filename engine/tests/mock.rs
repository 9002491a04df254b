//! The mock backend behind the real engine interface: deterministic streams, sampling
//! that cannot diverge, KV export/import and the prefix cache exercised for real, and
//! fingerprints that keep mock and real KV apart.

use candle_core::quantized::gguf_file;
use xpyd_engine::testing::{TinyModel, generate_split};
use xpyd_engine::{
    Engine, EngineConfig, EngineError, KvDtype, KvFormatError, LayerChunk, MockLatency,
    SamplingParams,
};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn tiny() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    TinyModel::default().write(&path).unwrap();
    Fixture { _dir: dir, path }
}

fn mock(f: &Fixture, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::new(&f.path);
    cfg.num_blocks = Some(256);
    cfg.mock = Some(MockLatency::default());
    tweak(&mut cfg);
    Engine::load(cfg).unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 7 + salt * 13) % 256)
        .collect()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.5,
        top_p: 0.9,
        top_k: 40,
        seed,
        max_tokens: 20,
        ..Default::default()
    }
}

fn run(e: &mut Engine, p: Vec<u32>, params: SamplingParams) -> Vec<u32> {
    e.generate(1, p, params, &mut |_| {}).unwrap().tokens
}

#[test]
fn the_mock_is_never_the_default() {
    assert_eq!(EngineConfig::new("m.gguf").mock, None);
}

#[test]
fn same_stream_from_separately_loaded_engines() {
    let f = tiny();
    let (mut a, mut b) = (mock(&f, |_| {}), mock(&f, |_| {}));
    let mut streams = Vec::new();
    for (i, n) in [1usize, 5, 17, 40, 300].into_iter().enumerate() {
        let p = prompt(n, i as u32);
        let ga = a.generate(1, p.clone(), greedy(20), &mut |_| {}).unwrap();
        let gb = b.generate(1, p, greedy(20), &mut |_| {}).unwrap();
        assert_eq!(ga, gb, "prompt of {n}");
        // max_tokens governs the length: the mock never emits EOS or special tokens.
        assert_eq!(ga.tokens.len(), 20);
        assert!(ga.tokens.iter().all(|t| *t >= 3), "{:?}", ga.tokens);
        assert!(
            ga.text.chars().all(|c| c == ' ' || c.is_ascii_lowercase()),
            "{:?}",
            ga.text
        );
        streams.push(ga.tokens);
    }
    let distinct: std::collections::HashSet<_> = streams.iter().collect();
    assert_eq!(distinct.len(), 5, "different prompts, different streams");
    // The stream depends on the cached prefix, not only the last token: prompts that
    // differ only in their first token continue differently.
    let (mut p, q) = (prompt(30, 1), prompt(30, 1));
    p[0] += 1;
    assert_ne!(run(&mut a, p, greedy(12)), run(&mut a, q, greedy(12)));
    // Without ignore_eos the length is still max_tokens.
    assert_eq!(
        run(&mut a, prompt(9, 9), SamplingParams::greedy(33)).len(),
        33
    );
}

#[test]
fn greedy_and_seeded_sampling_give_the_same_stream() {
    let f = tiny();
    let mut e = mock(&f, |_| {});
    for n in [3usize, 50] {
        let p = prompt(n, 4);
        let want = run(&mut e, p.clone(), greedy(20));
        for seed in [0, 7, 12345] {
            assert_eq!(run(&mut e, p.clone(), sampled(seed)), want, "seed {seed}");
        }
    }
}

#[test]
fn chunking_changes_neither_kv_nor_tokens() {
    let f = tiny();
    let mut whole = mock(&f, |_| {});
    let mut by16 = mock(&f, |c| c.prefill_chunk = 16);
    let mut by48 = mock(&f, |c| c.prefill_chunk = 48);
    let p = prompt(130, 2);
    let mut exports = Vec::new();
    for e in [&mut whole, &mut by16, &mut by48] {
        e.add_sequence(1, p.clone(), greedy(10)).unwrap();
        e.prefill(1, &mut |_| {}).unwrap();
        exports.push(e.export(1).unwrap());
        e.remove(1);
    }
    assert_eq!(exports[0], exports[1]);
    assert_eq!(exports[0], exports[2]);
    let want = run(&mut whole, p.clone(), greedy(10));
    assert_eq!(run(&mut by16, p.clone(), greedy(10)), want);
    assert_eq!(run(&mut by48, p, greedy(10)), want);
}

#[test]
fn kv_dtype_changes_nothing_but_bytes() {
    let f = tiny();
    let mut a = mock(&f, |_| {});
    let mut h = mock(&f, |c| c.kv_dtype = KvDtype::F16);
    let mut h2 = mock(&f, |c| c.kv_dtype = KvDtype::F16);
    let p = prompt(45, 3);
    let want = run(&mut a, p.clone(), greedy(16));
    assert_eq!(run(&mut h, p.clone(), greedy(16)), want);
    assert_eq!(
        generate_split(&mut h, &mut h2, p, greedy(16)).unwrap(),
        want
    );
}

#[test]
fn exported_kv_decodes_elsewhere_like_one_engine() {
    let f = tiny();
    let mut one = mock(&f, |c| c.prefill_chunk = 16);
    let mut a = mock(&f, |c| c.prefill_chunk = 16);
    let mut b = mock(&f, |_| {});
    for (i, n) in [5usize, 17, 40, 100].into_iter().enumerate() {
        let p = prompt(n, i as u32);
        let want = run(&mut one, p.clone(), greedy(20));
        assert_eq!(
            generate_split(&mut a, &mut b, p.clone(), greedy(20)).unwrap(),
            want,
            "prompt of {n}"
        );
        assert_eq!(
            generate_split(&mut a, &mut b, p, sampled(3)).unwrap(),
            want,
            "sampled, prompt of {n}"
        );
    }
    // Streamed layer by layer as the prefill computes (the workers' path).
    let p = prompt(40, 7);
    let want = run(&mut one, p.clone(), greedy(8));
    a.add_sequence(1, p, greedy(8)).unwrap();
    let header = a.export_header(1).unwrap();
    b.begin_import(5, &header).unwrap();
    let mut chunks: Vec<LayerChunk> = Vec::new();
    let first = a.prefill(1, &mut |c| chunks.push(c)).unwrap();
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
    }
    b.import_resume(5, a.resume_state(1).unwrap()).unwrap();
    b.finish_import(5).unwrap();
    a.remove(1);
    let mut got = vec![first.token];
    b.run_to_end(5, &mut |ev| got.push(ev.token)).unwrap();
    b.remove(5);
    assert_eq!(got, want);
    assert_eq!(a.kv_usage().used_blocks, 0);
    assert_eq!(b.kv_usage().used_blocks, 0);
}

#[test]
fn batched_decode_and_prefix_cache_hits_change_nothing() {
    let f = tiny();
    let mut alone = mock(&f, |_| {});
    let mut e = mock(&f, |c| c.prefix_cache_blocks = 64);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let mut p = prompt(40, 0);
            p.extend(prompt(3 + i, i as u32 + 1));
            p
        })
        .collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&mut alone, p.clone(), greedy(10)))
        .collect();
    let mut got = vec![Vec::new(); 6];
    for (i, p) in prompts.iter().enumerate() {
        e.add_sequence(i as u64, p.clone(), greedy(10)).unwrap();
        got[i].push(e.prefill(i as u64, &mut |_| {}).unwrap().token);
    }
    let ids: Vec<u64> = (0..6).collect();
    for _ in 0..9 {
        for ev in e.decode_step(&ids).unwrap() {
            got[ev.seq as usize].push(ev.token);
        }
    }
    assert_eq!(got, want, "one batch of six equals each alone");
    for id in ids {
        e.remove(id);
    }
    // The shared 32-token prefix is now cached: a hit gives the same stream.
    e.add_sequence(9, prompts[3].clone(), greedy(10)).unwrap();
    assert_eq!(e.reused_tokens(9), 32);
    let mut out = vec![e.prefill(9, &mut |_| {}).unwrap().token];
    e.run_to_end(9, &mut |ev| out.push(ev.token)).unwrap();
    assert_eq!(out, want[3]);
}

#[test]
fn real_and_mock_engines_refuse_each_others_kv() {
    let f = tiny();
    let mut m = mock(&f, |_| {});
    let mut cfg = EngineConfig::new(&f.path);
    cfg.num_blocks = Some(256);
    let mut real = Engine::load(cfg).unwrap();
    assert_eq!(m.fingerprint(), format!("mock:{}", real.fingerprint()));
    let export = |e: &mut Engine| {
        e.add_sequence(1, prompt(20, 0), greedy(4)).unwrap();
        e.prefill(1, &mut |_| {}).unwrap();
        let bytes = e.export(1).unwrap();
        e.remove(1);
        bytes
    };
    let (from_mock, from_real) = (export(&mut m), export(&mut real));
    for (to, bytes) in [(&mut real, &from_mock), (&mut m, &from_real)] {
        let err = to.import(2, bytes).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::KvImport(KvFormatError::ModelMismatch { .. })
            ),
            "{err}"
        );
        assert_eq!(to.kv_usage().used_blocks, 0);
    }
    // Each still accepts its own kind.
    real.import(2, &from_real).unwrap();
    m.import(2, &from_mock).unwrap();
}

#[test]
fn latency_slows_but_does_not_change_the_stream() {
    let f = tiny();
    let mut fast = mock(&f, |_| {});
    let mut slow = mock(&f, |c| {
        c.mock = Some(MockLatency {
            prefill_base_us: 300,
            prefill_per_token_us: 5,
            decode_base_us: 200,
            decode_per_seq_us: 50,
            ..Default::default()
        })
    });
    let p = prompt(60, 5);
    assert_eq!(
        run(&mut slow, p.clone(), greedy(12)),
        run(&mut fast, p, greedy(12))
    );
    // A whole decode step takes the fitted time (the engine paces it, not the forward).
    let mut paced = mock(&f, |c| {
        c.mock = Some(MockLatency {
            decode_base_us: 150_000,
            ..Default::default()
        })
    });
    paced.add_sequence(7, prompt(10, 2), greedy(4)).unwrap();
    paced.prefill(7, &mut |_| {}).unwrap();
    let t = std::time::Instant::now();
    paced.decode_step(&[7]).unwrap();
    assert!(t.elapsed() >= std::time::Duration::from_millis(150));
    let mut cfg = EngineConfig::new(&f.path);
    cfg.mock = Some(MockLatency {
        decode_base_us: 10_000_001,
        ..Default::default()
    });
    let err = Engine::load(cfg).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidParam {
                field: "mock.decode_base_us",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_mock_reads_only_metadata() {
    let f = tiny();
    // The same metadata with no tensors at all.
    let mut file = std::fs::File::open(&f.path).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let bare = f._dir.path().join("bare.gguf");
    gguf_file::write(&mut std::fs::File::create(&bare).unwrap(), &meta, &[]).unwrap();
    assert!(
        Engine::load(EngineConfig::new(&bare)).is_err(),
        "no weights"
    );
    let mut cfg = EngineConfig::new(&bare);
    cfg.num_blocks = Some(64);
    cfg.mock = Some(MockLatency::default());
    let mut m = Engine::load(cfg).unwrap();
    assert_eq!(m.model_config(), mock(&f, |_| {}).model_config());
    assert_eq!(run(&mut m, prompt(10, 1), greedy(5)).len(), 5);
}
