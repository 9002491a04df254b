//! Raw, unsafe bindings to UCX's UCP API as installed by Debian's `libucx-dev` (1.13),
//! generated at build time with bindgen. The safe wrapper lives in `xpyd-kv-transfer`.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unsafe_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
