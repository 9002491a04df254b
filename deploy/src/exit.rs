//! Exit codes of the binary: 0 success, 1 a runtime failure, 64 (`EX_USAGE`) a usage or
//! configuration error — a bad flag (clap's own errors included), a flag value out of
//! range, a manifest that cannot be read or is invalid.

use crate::manifest::ManifestError;
use xpyd_engine::EngineError;

/// A runtime failure.
pub const FAILURE: u8 = 1;
/// A usage or configuration error (`EX_USAGE`).
pub const USAGE: u8 = 64;

/// A usage or configuration error found after parsing (flags clap cannot check alone).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for a failed command: [`USAGE`] when anything in the error's chain is a
/// usage or configuration error, else [`FAILURE`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|c| {
        c.is::<UsageError>()
            || c.is::<ManifestError>()
            || matches!(
                c.downcast_ref::<EngineError>(),
                Some(EngineError::InvalidParam { .. })
            )
    });
    if usage { USAGE } else { FAILURE }
}
