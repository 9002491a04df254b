#!/usr/bin/env python3
"""Regenerates engine/tests/fixtures/llamacpp_golden.json from a running llama-server.

The fixture is the independent reference the engine's tokenizer, chat template and
greedy output are tested against. Usage:
  llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 --port 18080 &
  python3 scripts/llamacpp-golden.py http://127.0.0.1:18080 > engine/tests/fixtures/llamacpp_golden.json
"""
import json
import sys
import urllib.request

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:18080"


def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count: 1, 2, 3 — and say “done” in 日本語."}],
]
TEXTS = ["Hello world 1234 it's", "  leading spaces\n\nand\ttabs", "naïve café — 東京 🚀", "x=3.14159;y=2e10"]

out = {"chat": [], "text": [], "greedy": []}
for msgs in CHATS:
    prompt = post("/apply-template", {"messages": msgs})["prompt"]
    ids = post("/tokenize", {"content": prompt, "parse_special": True})["tokens"]
    out["chat"].append({"messages": msgs, "prompt": prompt, "ids": ids})
for t in TEXTS:
    out["text"].append({"text": t, "ids": post("/tokenize", {"content": t, "parse_special": True})["tokens"]})
for c in out["chat"][:1]:
    r = post("/completion", {"prompt": c["ids"], "n_predict": 16, "temperature": 0, "return_tokens": True})
    out["greedy"].append({"prompt_ids": c["ids"], "tokens": r["tokens"], "content": r["content"]})
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
print()
