"""Decode and verify step times on SmolLM2-135M: TVM untuned, TVM MetaSchedule-tuned, ONNX Runtime.

One run, 1 thread, interleaved rounds, medians. Each engine is a speculative (prompt-lookup) artifact
of the same model with max_seq_len 512; a step is measured after a 256-token prefix: the decode step
(1 token) and the verify step of a chain of n drafts (n + 1 tokens). The tuned artifact's schedules
come from a MetaSchedule database kept in --work (tuning resumes there; its trials and time are
reported). Writes bench/results/tvm_steps.{json,md}.

    .venv/bin/python bench/tvm_steps.py [--work DIR] [--trials 640] [--nodes 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.tune.measure import measure_decode_ms, measure_verify_ms
from skiptree.models.zoo import fetch

RESULTS = Path(__file__).parent / "results"
PREFIX = 256


def build(model: Path, work: Path, trials: int, nodes: tuple[int, ...]) -> dict[str, Path]:
    """The three artifacts (compiled once; the tuned one tunes first, resuming its database)."""
    common = dict(max_seq_len=512, draft="prompt-lookup", tree="chain:1", threads=1)
    static = (1, *(n + 1 for n in nodes))
    options = {
        "onnxruntime": CompileOptions(**common),
        "tvm untuned": CompileOptions(backend="tvm", tvm_static_tokens=static, **common),
        "tvm tuned": CompileOptions(backend="tvm", tvm_static_tokens=static, tvm_trials=trials,
                                    tvm_database=work / "tvm_database", tvm_trials_per_task=16, **common),
    }  # fmt: skip
    folders = {}
    for name, option in options.items():
        folders[name] = work / name.replace(" ", "-")
        if not (folders[name] / "manifest.json").is_file():
            start = time.perf_counter()
            compile_model(model, folders[name], option)
            print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("bench/.work/tvm_steps"))
    parser.add_argument("--trials", type=int, default=640, help="MetaSchedule trials in all")
    parser.add_argument("--nodes", default="4", help="verify sizes (drafts), comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nodes = tuple(int(n) for n in args.nodes.split(","))
    folders = build(fetch("smollm2-135m"), args.work, args.trials, nodes)
    runtimes = {name: skiptree.load(folder, threads=1) for name, folder in folders.items()}
    steps = {"decode (1 token)": lambda rt: measure_decode_ms(rt, PREFIX)}
    steps.update({f"verify {n} drafts ({n + 1} tokens)": (lambda rt, n=n: measure_verify_ms(rt, n, PREFIX))
                  for n in nodes})  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {step: {name: [] for name in runtimes} for step in steps}
    for round_index in range(args.rounds):
        for step, measure in steps.items():
            for name, runtime in runtimes.items():
                samples[step][name].append(measure(runtime))
        print(f"round {round_index + 1}/{args.rounds}: "
              + "; ".join(f"{s}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in by.items())
                          for s, by in samples.items()), flush=True)  # fmt: skip
    medians = {step: {name: statistics.median(v) for name, v in by.items()} for step, by in samples.items()}
    tuning = runtimes["tvm tuned"].manifest.backend.tuning
    report = {"model": "smollm2-135m", "threads": 1, "prefix": PREFIX, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "median_ms": medians,
              "ratio_to_onnxruntime": {s: {n: v / by["onnxruntime"] for n, v in by.items()}
                                       for s, by in medians.items()},
              "tuning": tuning}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tvm_steps.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Step times: TVM untuned / TVM tuned / ONNX Runtime (SmolLM2-135M fp32, 1 thread)", "",
             f"Median of {args.rounds} interleaved rounds (each a median of 7 calls) after a {PREFIX}-token "
             "prefix; ratio = time / ONNX Runtime's.", "",
             "| step | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]  # fmt: skip
    for step, by in medians.items():
        cells = [f"{v:.1f} ms ({v / by['onnxruntime']:.2f}x)" for v in by.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    graph = tuning.get("verify", {})
    lines += ["", f"Tuning: {graph.get('trials')} MetaSchedule trials over {graph.get('tasks')} tasks "
              f"(token counts {graph.get('token_counts')}); this run tuned for {graph.get('seconds')} s "
              "(a resumed run reports only its own time)."]  # fmt: skip
    (RESULTS / "tvm_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
