//! Benchmark instruments for xpyd: a seeded workload planner and an open/closed-loop
//! load generator, statistics over per-request records (percentiles,
//! SLO attainment, goodput search), Prometheus histogram scrapes, curve fitting for
//! performance profiles, and SVG plots; and the drivers behind `xpyd bench …` and
//! `xpyd kv-harness`, which the `xpyd` binary parses flags for and calls.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fit;
pub mod loadgen;
mod nullable;
pub mod plot;
pub mod prom;
pub mod stats;
pub mod workload;

// The drivers: benchmarks, so their errors are `anyhow`.
pub mod cluster;
pub mod dashboard_bench;
pub mod engine_args;
pub mod engine_bench;
pub mod flip_bench;
pub mod host;
pub mod http;
pub mod kv_bench;
pub mod kv_harness;
pub mod load_cmd;
pub mod overhead;
pub mod planner_bench;
pub mod profile;
pub mod quality;
