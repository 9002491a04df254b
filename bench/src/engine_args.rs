//! Engine flags shared by every command that runs the engine in its own process
//! (`xpyd generate`, `xpyd bench engine|kv|profile`, `xpyd kv-harness`).

use crate::host::Host;
use anyhow::Result;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use xpyd_engine::compute::{self, ComputeConfig};
use xpyd_engine::{EngineConfig, KvDtype};
use xpyd_runtime::env;

/// Options shared by every command that runs the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// GGUF model file (default: the fetched default model).
    #[arg(long, env = env::MODEL)]
    pub model: Option<PathBuf>,
    /// Compute threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin compute threads to these cores, e.g. `0` or `0-1`.
    #[arg(long)]
    pub cpus: Option<String>,
    /// KV cache element type.
    #[arg(long, value_enum, default_value_t = KvDtypeArg::F32)]
    pub kv_dtype: KvDtypeArg,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

/// `--kv-dtype` values (the engine's [`KvDtype`], spelled for clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    /// 32-bit floats (exact).
    F32,
    /// 16-bit floats: half the memory and transfer bytes.
    F16,
}

impl KvDtypeArg {
    /// The flag's spelling (`f32`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtypeArg::F32 => "f32",
            KvDtypeArg::F16 => "f16",
        }
    }
}

impl From<KvDtypeArg> for KvDtype {
    fn from(d: KvDtypeArg) -> Self {
        match d {
            KvDtypeArg::F32 => KvDtype::F32,
            KvDtypeArg::F16 => KvDtype::F16,
        }
    }
}

impl EngineArgs {
    /// The model path: `--model`, else the host's default model (fetched if missing).
    ///
    /// # Errors
    /// When the default model cannot be found or fetched.
    pub fn model_path(&self, host: &Host) -> Result<PathBuf> {
        host.model(self.model.as_deref())
    }

    /// Engine configuration for these flags.
    ///
    /// # Errors
    /// As [`EngineArgs::model_path`].
    pub fn engine_config(&self, host: &Host) -> Result<EngineConfig> {
        let mut cfg = EngineConfig::new(self.model_path(host)?);
        cfg.kv_dtype = self.kv_dtype.into();
        cfg.prefill_chunk = self.prefill_chunk;
        Ok(cfg)
    }

    /// Thread count and pinning (applied before any other thread starts).
    ///
    /// # Errors
    /// When `--cpus` is not a CPU list.
    pub fn compute(&self) -> Result<ComputeConfig> {
        Ok(ComputeConfig {
            threads: self.threads,
            cpus: self
                .cpus
                .as_deref()
                .map(compute::parse_cpu_list)
                .transpose()?,
        })
    }
}
