"""Decode speed, side by side in one run: eager torch reference vs our ONNX Runtime artifact.

SmolLM2-135M, fp32, pinned threads, the same prompts and greedy settings for every engine;
reports the median tokens/s over prompts and checks that outputs are identical.
Writes bench/results/decode_speed.json and .md.

    .venv/bin/python bench/decode_speed.py [--threads 1] [--max-new-tokens 64] [--max-seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import skiptree
from skiptree.models.reference import ReferenceModel
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model

PROMPTS = ["def fib(n):", "The capital of France is",
           "import numpy as np\n\n# compute the mean of each column\n",
           "Explain what a compiler does in one paragraph."]  # fmt: skip
RESULTS = Path(__file__).parent / "results"


def measure(generator, prompts, max_new_tokens: int, rounds: int) -> dict:
    speeds, outputs = [], []
    for prompt in prompts:
        generator.generate(prompt, max_new_tokens=4)  # warm-up
        per_prompt = []
        for _ in range(rounds):
            out = generator.generate(prompt, max_new_tokens=max_new_tokens)
            per_prompt.append(out.result.tokens_per_second)
        speeds.append(statistics.median(per_prompt))
        outputs.append(out.token_ids)
    return {"tokens_per_second_median": statistics.median(speeds), "per_prompt": speeds, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = fetch("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        artifact = skiptree.compile(folder, Path(tmp) / "artifact", max_seq_len=args.max_seq_len)
        compile_seconds = time.perf_counter() - start
        engines = {"reference (eager torch)": ReferenceModel(folder),
                   "skiptree onnxruntime": skiptree.load(artifact, threads=args.threads)}  # fmt: skip
        results = {name: measure(engine, PROMPTS, args.max_new_tokens, args.rounds)
                   for name, engine in engines.items()}  # fmt: skip
    base = results["reference (eager torch)"]
    record = {
        "model": "smollm2-135m (fp32)", "threads": args.threads, "max_new_tokens": args.max_new_tokens,
        "max_seq_len": args.max_seq_len, "rounds": args.rounds, "cpu": cpu_model(),
        "machine": platform.machine(), "compile_seconds": round(compile_seconds, 1),
        "engines": {name: {"tokens_per_second_median": round(r["tokens_per_second_median"], 2),
                           "speedup_vs_reference": round(r["tokens_per_second_median"]
                                                         / base["tokens_per_second_median"], 3),
                           "same_tokens_as_reference": r["outputs"] == base["outputs"]}
                    for name, r in results.items()},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Decode speed: {record['model']}, {args.threads} thread(s), "
             f"{args.max_new_tokens} new tokens, "
             f"S={args.max_seq_len}", "", f"CPU: {record['cpu']}", "",
             "| engine | tokens/s (median) | vs reference | same tokens |", "|---|---|---|---|"]  # fmt: skip
    for name, r in record["engines"].items():
        lines.append(f"| {name} | {r['tokens_per_second_median']:.1f} | {r['speedup_vs_reference']:.2f}x "
                     f"| {'yes' if r['same_tokens_as_reference'] else 'NO'} |")
    (RESULTS / "decode_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
