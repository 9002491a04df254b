//! Compute threads and CPU pinning for the process.
//!
//! candle sizes its thread pools from `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` and pins
//! them to `CANDLE_CPU_MASK`, reading them once when the pools start; the engine's own
//! attention threads use rayon's global pool. [`init`] sets all of them, and must run at
//! process start, before any other thread exists.
#![allow(unsafe_code)]

use crate::error::{EngineError, Result};
use std::sync::OnceLock;

/// Threads and cores for the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputeConfig {
    /// Compute threads; `None` = one per available core.
    pub threads: Option<usize>,
    /// Cores to pin compute threads to; `None` = no pinning.
    pub cpus: Option<Vec<usize>>,
}

static APPLIED: OnceLock<ComputeConfig> = OnceLock::new();

/// Highest core index a CPU list may name (a typo like `0-99999999` fails fast).
const MAX_CPU: usize = 4095;

/// Parses a CPU list such as `0,2-3` (cores 0..=4095, no empty parts).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let bad = || EngineError::InvalidParam {
        field: "cpus",
        reason: format!("`{s}` is not a CPU list like `0,2-3` (cores 0..={MAX_CPU})"),
    };
    let num = |t: &str| match t.trim().parse::<usize>() {
        Ok(n) if n <= MAX_CPU => Ok(n),
        _ => Err(bad()),
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Applies the configuration once per process; returns the thread count in force.
///
/// Call it first thing in `main`, before any other thread is spawned.
pub fn init(cfg: &ComputeConfig) -> Result<usize> {
    if let Some(prev) = APPLIED.get() {
        return Ok(prev.threads.unwrap_or_else(available));
    }
    if cfg.threads == Some(0) || cfg.threads.is_some_and(|t| t > 1024) {
        return Err(EngineError::InvalidParam {
            field: "threads",
            reason: "must be 1..=1024".into(),
        });
    }
    // CPU_SETSIZE: the kernel's affinity mask has 1024 bits.
    if let Some(c) = cfg.cpus.iter().flatten().find(|c| **c >= 1024) {
        return Err(EngineError::InvalidParam {
            field: "cpus",
            reason: format!("no CPU {c}"),
        });
    }
    let threads = cfg
        .threads
        .unwrap_or_else(|| cfg.cpus.as_ref().map_or_else(available, Vec::len));
    // SAFETY: called at process start before other threads exist (documented contract),
    // so no concurrent reader of the environment can race these writes.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        if let Some(cpus) = &cfg.cpus {
            let list: Vec<String> = cpus.iter().map(ToString::to_string).collect();
            std::env::set_var("CANDLE_CPU_MASK", list.join(","));
        }
    }
    candle_core::utils::set_thread_affinity();
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| candle_core::utils::set_thread_affinity())
        .build_global();
    let _ = APPLIED.set(ComputeConfig {
        threads: Some(threads),
        cpus: cfg.cpus.clone(),
    });
    Ok(threads)
}

/// Runs `f(i, &mut items[i])` for every item on the compute threads: the calling thread
/// and candle's persistent pool, whose threads spin briefly between calls instead of
/// sleeping (a forward pass is hundreds of short parallel sections).
pub fn for_each_item<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let cells: Vec<std::sync::Mutex<&mut T>> =
        items.iter_mut().map(std::sync::Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        for i in range {
            // Each index is handed out once, so a lock is never contended.
            let mut item = cells[i].lock().unwrap_or_else(|e| e.into_inner());
            f(i, &mut item);
        }
    });
}

/// Cores this process may run on.
pub fn available() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
