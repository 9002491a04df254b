#!/usr/bin/env bash
# Run-to-run spread of single-stream decode: ROUNDS rounds (default 6), each a fresh
# `xpyd generate` process (256 tokens, greedy, ignore EOS, 2 threads) and then one
# completion of the same prompt and length from a llama-server kept running, so both
# see the same moments of the machine. Prints each round's tok/s and each side's
# median and range.
# Usage: scripts/decode-spread.sh LLAMA_SERVER [ROUNDS]   (xpyd from target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
server="${1:?path to llama-server}"
rounds="${2:-6}"
xpyd=target/release/xpyd
model="$($xpyd model path)"
prompt="Write a long story about a dog who learns to sail across the sea."
port=18300
"$server" -m "$model" --host 127.0.0.1 --port "$port" -t 2 -tb 2 -c 4096 --no-warmup \
  >/dev/null 2>&1 &
llama=$!
trap 'kill $llama 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -sf "127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
body() { printf '{"prompt":"%s","n_predict":%d,"ignore_eos":true,"temperature":0,"cache_prompt":false}' "$prompt" "$1"; }
curl -sf "127.0.0.1:$port/completion" -d "$(body 16)" >/dev/null
xs=() ls=()
for r in $(seq 1 "$rounds"); do
  x=$($xpyd generate --model "$model" --prompt "$prompt" --max-tokens 256 --ignore-eos \
    --threads 2 2>&1 | grep -o 'decode [0-9.]* tok/s' | awk '{print $2}')
  l=$(curl -sf "127.0.0.1:$port/completion" -d "$(body 256)" | python3 -c \
    'import json,sys; print(round(json.load(sys.stdin)["timings"]["predicted_per_second"], 1))')
  echo "round $r: xpyd $x tok/s, llama.cpp $l tok/s"
  xs+=("$x") ls+=("$l")
done
summary() {
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {
    m = NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2
    printf "median %.1f, range %.1f–%.1f (%.1f, %.1f %% of the median)\n", m, v[1], v[NR], v[NR]-v[1], 100*(v[NR]-v[1])/m }'
}
echo "xpyd:      $(summary "${xs[@]}")"
echo "llama.cpp: $(summary "${ls[@]}")"
