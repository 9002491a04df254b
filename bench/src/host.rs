//! What the hosting binary hands the benchmark drivers: its own executable (the drivers
//! start `xpyd up` and `xpyd kv-harness` as child processes) and how to find the default
//! model, so that xpyd-bench needs nothing from the CLI crate.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// What the `xpyd` binary provides to the drivers.
#[derive(Debug, Clone)]
pub struct Host {
    /// The `xpyd` executable, for child processes (`xpyd up`, `xpyd kv-harness`).
    pub exe: PathBuf,
    /// The default model file (fetching it when missing), for commands run without
    /// `--model`; called only when a model is needed.
    pub default_model: fn() -> Result<PathBuf>,
}

impl Host {
    /// `flag` when given, else the default model.
    ///
    /// # Errors
    /// When the default model cannot be found or fetched.
    pub fn model(&self, flag: Option<&Path>) -> Result<PathBuf> {
        match flag {
            Some(p) => Ok(p.to_path_buf()),
            None => (self.default_model)(),
        }
    }
}
