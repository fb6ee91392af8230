"""Draft-model speculation on a real pair: Qwen2.5-Coder-1.5B (target) + 0.5B (draft), CPU, 1 thread.

Engines on the same chat-formatted code prompts, greedy: our AR artifact, our speculative artifact
(draft model, the artifact's tree), transformers `generate` plain and with `assistant_model=`.
Decode tokens/s = (new tokens - 1) / (generate time - the time of a 1-token generate), median.

    .venv/bin/python bench/qwen_pair.py --artifact ART   # ART: skiptree compile qwen2.5-coder-1.5b
        --draft qwen2.5-coder-0.5b --tree chain:4 --max-seq-len 512 (about 5 minutes, 15 GB peak)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import skiptree
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python class Stack with push, pop and peek methods.",
]


def timed(run, max_new_tokens: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    run(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = run(max_new_tokens)
    total = time.perf_counter() - start
    return tokens, (len(tokens) - 1) / max(total - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime = skiptree.load(args.artifact, threads=1)  # one copy of the 7 GB of weights
    decoder = runtime.speculative
    target = AutoModelForCausalLM.from_pretrained(fetch("qwen2.5-coder-1.5b"), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(fetch("qwen2.5-coder-0.5b"), dtype=torch.float32).eval()

    def ours(speculate: bool, ids):
        def run(n):
            runtime.speculative = decoder if speculate else None
            return runtime.generate(ids, max_new_tokens=n).token_ids
        return run

    def theirs(ids, **extra):
        def run(n):
            x = torch.tensor([ids])
            with torch.inference_mode():
                out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                      **extra)  # fmt: skip
            return out[0, len(ids) :].tolist()
        return run

    rows: dict[str, list] = {}
    for prompt in PROMPTS:
        ids = runtime.encode_prompt(prompt, chat=True)
        engines = {"skiptree AR artifact": ours(False, ids),
                   "skiptree draft-model speculative": ours(True, ids),
                   "transformers generate": theirs(ids),
                   "transformers assistant_model=0.5B": theirs(ids, assistant_model=draft)}  # fmt: skip
        for name, run in engines.items():
            tokens, speed = timed(run, args.max_new_tokens)
            rows.setdefault(name, []).append({"tps": speed, "tokens": tokens})
            print(f"  {name}: {speed:.2f} tok/s", flush=True)
        runtime.speculative = decoder
        accepted = runtime.generate(ids, max_new_tokens=args.max_new_tokens).result.mean_accepted
        rows.setdefault("mean_accepted", []).append(accepted)
    base = rows["skiptree AR artifact"]
    record = {"target": "qwen2.5-coder-1.5b", "draft": "qwen2.5-coder-0.5b", "cpu": cpu_model(),
              "machine": platform.machine(), "threads": 1, "max_new_tokens": args.max_new_tokens,
              "tree": runtime.manifest.speculative.tree.spec,
              "mean_accepted": rows.pop("mean_accepted"), "engines": {}}  # fmt: skip
    lines = [f"# Qwen2.5-Coder-1.5B + 0.5B draft ({record['tree']}), 1 thread, "
             f"{args.max_new_tokens} tokens",
             "", f"CPU: {record['cpu']}; {len(PROMPTS)} chat-formatted code prompts; tokens/step of our "
             f"speculative engine: {statistics.median(record['mean_accepted']):.2f}", "",
             "| engine | tokens/s (median) | vs our AR | same tokens as our AR |",
             "|---|---|---|---|"]  # fmt: skip
    for name, runs in rows.items():
        speed = statistics.median(r["tps"] for r in runs)
        ratio = statistics.median(r["tps"] / b["tps"] for r, b in zip(runs, base, strict=True))
        same = all(r["tokens"] == b["tokens"] for r, b in zip(runs, base, strict=True))
        record["engines"][name] = {"tokens_per_second": speed, "speedup_vs_ar": ratio, "same_tokens": same}
        lines.append(f"| {name} | {speed:.2f} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
    peers.save_results("qwen_pair", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
