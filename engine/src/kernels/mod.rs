//! Numeric kernels chosen at run time for the CPU: the f32 loops of attention over the
//! paged cache (`attn`) and the quantized block dot products of the projections
//! (`qdot`). Each has a portable version doing the same float operations in the same
//! order, so every level gives the same bits.
//!
//! This module holds the engine's SIMD `unsafe`: calling a `#[target_feature]` function
//! after [`level`] found the CPU has it, and the intrinsics inside them.
#![allow(unsafe_code)]

pub mod attn;
pub mod qdot;

use std::sync::OnceLock;

/// The instruction set the quantized kernels use, detected once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Portable Rust, no SIMD intrinsics.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (`vpmaddubsw` integer dot products).
    Avx2,
    /// x86-64 AVX-512 VNNI with VL (`vpdpbusd` on 256-bit registers).
    Avx512Vnni,
}

impl Level {
    /// The level a name stands for: `scalar`, `avx2` or `avx512vnni`.
    pub fn parse(name: &str) -> Option<Level> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Level::Scalar),
            "avx2" => Some(Level::Avx2),
            "avx512vnni" => Some(Level::Avx512Vnni),
            _ => None,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Level::Scalar => 0,
            Level::Avx2 => 1,
            Level::Avx512Vnni => 2,
        }
    }
}

static CAP: OnceLock<Level> = OnceLock::new();

/// Caps the level the kernels use below what the CPU has (to measure or test a lower
/// path on a machine that has a higher one). Call it before the first [`level`]; a
/// later call changes nothing and returns false.
pub fn cap(at: Level) -> bool {
    CAP.set(at).is_ok() && LEVEL.get().is_none()
}

static LEVEL: OnceLock<Level> = OnceLock::new();

/// The level the kernels use: the best this CPU supports, or the [`cap`] when lower.
pub fn level() -> Level {
    *LEVEL.get_or_init(|| {
        let best = detected();
        match CAP.get() {
            Some(c) if c.rank() < best.rank() => *c,
            _ => best,
        }
    })
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx2" => std::is_x86_feature_detected!("avx2"),
                "fma" => std::is_x86_feature_detected!("fma"),
                "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
                "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
                "avx512f" => std::is_x86_feature_detected!("avx512f"),
                "f16c" => std::is_x86_feature_detected!("f16c"),
                _ => false,
            };
            if ["avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512vnni"]
                .iter()
                .all(|f| has(f))
            {
                return Level::Avx512Vnni;
            }
            if has("avx2") && has("fma") && has("f16c") {
                return Level::Avx2;
            }
        }
        Level::Scalar
    })
}
