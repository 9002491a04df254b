//! Every environment variable the xpyd binary reads, in one place.

/// Directory holding model files (default: `<user cache dir>/xpyd/models`).
pub const MODELS_DIR: &str = "XPYD_MODELS";
/// Python interpreter used to run pip for the model fetch (default: `python3`).
pub const PYTHON: &str = "XPYD_PYTHON";
/// Log filter (`tracing` syntax), e.g. `info,xpyd_engine=debug`.
pub const LOG: &str = "XPYD_LOG";
