//! Stand-in for the NCCL backend when the crate is built without the `nccl` feature: every
//! entry point reports that the backend is not built.

use crate::error::{Result, TransferError};

fn not_built() -> TransferError {
    TransferError::Unavailable("nccl is not built into this binary (cargo feature `nccl`)".into())
}

/// Always `Unavailable`: the feature is off.
pub fn check_available() -> Result<()> {
    Err(not_built())
}

/// Always `Unavailable`: the feature is off.
pub fn new_id() -> Result<String> {
    Err(not_built())
}

/// Never constructed without the feature.
pub struct Link(());

impl Link {
    /// Always `Unavailable`: the feature is off.
    pub fn join(_id_hex: &str, _rank: usize, _device: usize) -> Result<Self> {
        Err(not_built())
    }

    /// Unreachable without a joined link.
    pub fn send(&self, _data: &[u8]) -> Result<()> {
        Err(not_built())
    }

    /// Unreachable without a joined link.
    pub fn recv(&self, _len: usize) -> Result<Vec<u8>> {
        Err(not_built())
    }
}
