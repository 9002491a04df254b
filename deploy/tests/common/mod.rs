//! Helpers shared by the `xpyd` binary's integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod etcd;
pub mod streams;

use std::path::PathBuf;
use std::process::Command;

/// The binary under test.
pub fn xpyd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xpyd"))
}

/// Writes the default tiny model into a fresh temp dir (kept alive by the returned guard).
pub fn tiny_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    xpyd_engine::testing::TinyModel::default()
        .write(&model)
        .unwrap();
    (dir, model)
}

/// A performance profile (the JSON `xpyd bench profile` writes) with exact fits: a
/// prompt of `L` tokens takes `p0 + p1·L + p2·L²` seconds, a decode step of `n`
/// sequences of mean context `l` takes `d0 + d1·n + d2·l + d3·n·l`. For mock workers and
/// the advisor.
pub fn profile_with(prefill: [f64; 3], decode: [f64; 4]) -> serde_json::Value {
    use serde_json::json;
    let fit = |kind: &str, c: &[f64]| {
        json!({"model": {"kind": kind, "coeffs": c},
               "fit_error": {"r2": 0.99, "mean_abs_rel": 0.02, "max_abs_rel": 0.05}})
    };
    json!({
        "version": xpyd_planner::profile::PROFILE_VERSION, "kind": "xpyd-performance-profile",
        "model": {"kv_bytes_per_token": 2048, "layers": 2},
        "prefill": {"fit_by_chunk": {"256": fit("polynomial", &prefill)}},
        "decode_step": {"fit": fit("bilinear", &decode)},
        "kv_transfer": null,
    })
}

/// A profile whose prefill is slow per token (0.2 ms) and whose decode steps are fast
/// (2 ms + 0.2 ms per sequence): long prompts make one prefill worker the bottleneck.
pub fn slow_prefill_profile() -> serde_json::Value {
    profile_with([0.004, 0.0002, 0.0], [0.002, 0.0002, 0.0, 0.0])
}

/// The Python interpreter (`XPYD_PYTHON`, default `python3`) when it can import `module`
/// (a client library the compatibility tests drive); `None` (skip) locally when it
/// cannot, a failure in CI. `./scripts/test.sh` installs the modules.
pub fn python_with(module: &str) -> Option<String> {
    let python = std::env::var("XPYD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let msg = format!("Python cannot import `{module}`; ./scripts/test.sh installs it");
    assert!(std::env::var("CI").is_err(), "{msg}");
    eprintln!("SKIPPED: {msg}");
    None
}

/// The real model from `XPYD_MODEL`: `None` (skip) locally when missing, a failure in CI.
pub fn real_model() -> Option<PathBuf> {
    match std::env::var_os("XPYD_MODEL").map(PathBuf::from) {
        Some(p) if p.exists() => Some(p),
        other => {
            let msg = format!("real model not found (XPYD_MODEL={other:?}); run ./scripts/test.sh");
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}
