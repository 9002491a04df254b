//! Benchmark instruments for xpyd: a seeded workload planner and an open/closed-loop
//! load generator, statistics over per-request records (percentiles,
//! SLO attainment, goodput search), Prometheus histogram scrapes, curve fitting for
//! performance profiles, and SVG plots.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fit;
pub mod loadgen;
mod nullable;
pub mod plot;
pub mod prom;
pub mod stats;
pub mod workload;
