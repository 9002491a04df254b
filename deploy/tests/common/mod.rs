//! Helpers shared by the `xpyd` binary's integration tests.
#![allow(dead_code)]

pub mod cluster;

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
