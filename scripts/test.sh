#!/usr/bin/env bash
# Runs every check and test of the workspace. Installs what is missing first:
# system packages with apt-get, the real model with pip (through `xpyd model fetch`).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

log "prerequisites"
missing=()
command -v cc >/dev/null || missing+=(gcc)
# UCX backend: headers and libraries, and libclang for bindgen.
[ -f /usr/include/ucp/api/ucp.h ] || missing+=(libucx-dev)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
# etcd for the multi-host membership tests.
command -v etcd >/dev/null || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root apt-get install -y -qq "${missing[@]}"
fi

# An OpenAI client library we did not write, for the compatibility test (kept in target/).
PYDEPS="$PWD/target/pydeps"
if ! PYTHONPATH="$PYDEPS" python3 -c "import openai" 2>/dev/null; then
  python3 -m pip install -q --target "$PYDEPS" openai \
    || python3 -m pip install -q --break-system-packages --target "$PYDEPS" openai
fi
export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"

log "format"
cargo fmt --all -- --check

log "clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
cargo clippy -p xpyd-kv-transfer -p xpyd --all-targets --release --features xpyd/ucx,xpyd/nccl -- -D warnings

log "build"
cargo build --release --workspace --all-targets

log "model"
XPYD_MODEL="$(./target/release/xpyd model path)"
export XPYD_MODEL
echo "XPYD_MODEL=$XPYD_MODEL"

log "tests"
# (Cluster tests are #[ignore]d here and run below one at a time; selecting targets with
# --workspace keeps one feature set, so nothing is rebuilt between these steps.)
cargo test --release --workspace
log "tests: clusters of real processes (one at a time: they time routing and leases)"
cargo test --release --workspace --test cluster_tiny -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_real -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_bench -- --ignored --test-threads=1

log "tests: kv-transfer with the nccl feature (no GPU here: the clean-failure path)"
cargo test --release -p xpyd-kv-transfer --features nccl

log "tests: UCX over its tcp transport, then over shared memory"
UCX_TLS=tcp cargo test --release -p xpyd-kv-transfer --features ucx
UCX_TLS=sm,self cargo test --release -p xpyd-kv-transfer --features ucx --test transfer
UCX_TLS=tcp cargo test --release -p xpyd --features ucx --test kv_processes
UCX_TLS=sm,self cargo test --release -p xpyd --features ucx --test kv_processes
UCX_TLS=tcp cargo test --release -p xpyd --features ucx --test cluster_real -- --ignored --test-threads=1 disaggregated_equals

log "benches compile"
cargo bench --workspace --no-run
