//! Every environment variable the xpyd binary reads: the one list is
//! `xpyd_runtime::env`, shared with the worker runtime (which reads `XPYD_DEBUG_DELAY`)
//! and the command drivers in other crates; re-exported here for the CLI's modules.

pub use xpyd_runtime::env::*;
