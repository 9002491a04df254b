#!/usr/bin/env bash
# The fuzz targets with many more cases than CI gives them (CI runs each bounded, as part
# of ./scripts/test.sh). Usage: scripts/fuzz.sh [CASES] (default 20000; the live-cluster
# target gets CASES/20). Each target is a property test: no panic, no unbounded
# allocation, only typed errors.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-20000}"
export PROPTEST_CASES="$cases"
# KV frames from a hostile peer, and the receive buffer pool's bound.
cargo test --release -p xpyd-kv-transfer --lib hostile_bytes
# KV exports with bytes changed anywhere; resume states with any numbers.
cargo test --release -p xpyd-engine --test tiny fuzz::
# Key store files and presented keys.
cargo test --release -p xpyd-coordinator --lib keys::tests::any_store_bytes
# Manifests.
cargo test --release -p xpyd --bin xpyd manifest::tests::fuzz
# The public APIs of a live cluster: HTTP bodies, WebSocket frames, gRPC requests.
PROPTEST_CASES=$((cases / 20)) cargo test --release -p xpyd --test cluster_tiny -- \
  --ignored --exact fuzzed_requests_on_every_public_api_get_answers_not_failures
# The worker services, called as a member of the cluster: any Decode, Generate, Prefill
# (signed targets of any content) and Cancel.
PROPTEST_CASES=$((cases / 20)) cargo test --release -p xpyd --test cluster_tiny -- \
  --ignored --exact fuzzed_member_calls_on_worker_ports_hurt_no_worker
