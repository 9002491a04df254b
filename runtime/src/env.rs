//! Every environment variable the `xpyd` binary reads, in one place: the CLI, the bench
//! drivers and the worker runtime all take the names from here (README.md lists them too).

/// Directory holding model files (default: `<user cache dir>/xpyd/models`).
pub const MODELS_DIR: &str = "XPYD_MODELS";
/// Model file for commands run without `--model` (the `env` of every `--model` flag
/// outside the manifest commands).
pub const MODEL: &str = "XPYD_MODEL";
/// Python interpreter used to run pip for the model fetch (default: `python3`).
pub const PYTHON: &str = "XPYD_PYTHON";
/// Log filter (`tracing` syntax), e.g. `info,xpyd_engine=debug`.
pub const LOG: &str = "XPYD_LOG";
/// Log line format: `text` (default) or `json` (one object per line with `ts`, `level`,
/// `role`, `worker_id`, `target`, `message` and the event's fields).
pub const LOG_FORMAT: &str = "XPYD_LOG_FORMAT";
/// llama.cpp's `llama-server`, for the same-run comparison of `xpyd bench engine`
/// (the `env` of its `--llama-server`).
pub const LLAMA_SERVER: &str = "XPYD_LLAMA_SERVER";
/// Directory of state kept across runs; the API-key store is its `keys/` (default: the
/// user data directory's `xpyd`).
pub const STATE_DIR: &str = "XPYD_STATE_DIR";
/// A PEM bundle the CLI's and the bench drivers' HTTPS calls trust instead of the
/// default roots (e.g. the `tls_ca` file `xpyd up` prints for a cluster with its own CA).
pub const TLS_CA: &str = "XPYD_TLS_CA";
/// Caps the engine's kernel level below the CPU's (`scalar`, `avx2`, `avx512vnni`), to
/// measure a lower SIMD path on a machine that has a higher one.
pub const CPU_LEVEL: &str = "XPYD_CPU_LEVEL";
/// The API key the CLI's and the bench drivers' calls to a coordinator carry.
pub const API_KEY: &str = "XPYD_API_KEY";
/// Test knob: `XPYD_DEBUG_DELAY=decode-1=50,prefill-0=20` makes the named workers sleep
/// that many milliseconds before every engine step, so routing tests can slow one down.
pub const DEBUG_DELAY: &str = "XPYD_DEBUG_DELAY";
/// Test knob: `XPYD_DEBUG_PANIC=decode-0=5` makes the named worker's engine thread panic
/// at its 5th step, to show a failed engine makes the worker unhealthy and rebuilt.
pub const DEBUG_PANIC: &str = "XPYD_DEBUG_PANIC";
