"""Decode speed, side by side in one run: our eager reference and ONNX Runtime artifact, and peers.

SmolLM2-135M, fp32, pinned threads, the same prompt token ids and greedy settings for every engine:
skiptree's eager torch reference and ORT artifact, transformers `generate`, onnxruntime-genai fp32
and int4 (see bench/peers.py). Engines run interleaved (every round visits every engine, in a
rotating order) so that machine noise hits them alike; reports the median decode tokens/s over
prompts (prefill excluded), whether each engine's tokens equal the reference's (and where they first
differ), graph op counts, and the artifact's peak RSS next to its weight and KV-cache bytes.
Engines that cannot be installed, built or run are listed with the reason.
Writes bench/results/decode_speed.json and .md.

    .venv/bin/python bench/decode_speed.py [--threads 1] [--max-new-tokens 64] [--max-seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

import skiptree
from skiptree.models.reference import ReferenceModel
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model
from skiptree.runtime.manifest import GraphName

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

PROMPTS = ["def fib(n):", "The capital of France is",
           "import numpy as np\n\n# compute the mean of each column\n",
           "Explain what a compiler does in one paragraph."]  # fmt: skip
REFERENCE = "skiptree reference (eager torch)"
MB = 1e6


class SkiptreeEngine:
    """A skiptree `TextGenerator` (reference or artifact) behind the peers' `run` interface."""

    def __init__(self, name: str, generator):
        self.name, self.generator = name, generator

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        out = self.generator.generate(prompt_ids, max_new_tokens=max_new_tokens)
        return out.token_ids, out.result.tokens_per_second


def measure(engines: list, prompt_ids: list[list[int]], max_new_tokens: int, rounds: int) -> dict:
    """Per engine: median tokens/s over prompts (each the median of `rounds`), outputs, or an error."""
    speeds = {e.name: [[] for _ in prompt_ids] for e in engines}
    outputs: dict[str, list] = {e.name: [None] * len(prompt_ids) for e in engines}
    errors: dict[str, str] = {}
    for p, ids in enumerate(prompt_ids):
        for r in range(rounds + 1):  # round 0 is a short warm-up
            order = engines[r % len(engines) :] + engines[: r % len(engines)]
            for engine in (e for e in order if e.name not in errors):
                try:
                    tokens, tps = engine.run(ids, 4 if r == 0 else max_new_tokens)
                except Exception as error:  # noqa: BLE001 - reported in the results
                    errors[engine.name] = f"failed while running: {type(error).__name__}: {error}"
                    continue
                if r > 0:
                    speeds[engine.name][p].append(tps)
                    outputs[engine.name][p] = tokens
    return {e.name: {"error": errors[e.name]} if e.name in errors else
            {"per_prompt": [statistics.median(s) for s in speeds[e.name]], "outputs": outputs[e.name]}
            for e in engines}  # fmt: skip


def first_difference(outputs: list[list[int]], reference: list[list[int]]) -> list[int | None]:
    """Per prompt, the first index where the new tokens differ from the reference's (None: same)."""
    result = []
    for ours, ref in zip(outputs, reference, strict=True):
        index = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
        if index is None and len(ours) != len(ref):
            index = min(len(ours), len(ref))
        result.append(index)
    return result


def memory(artifact: Path, folder: Path, genai: list, prompt_ids: list[int], args) -> dict:
    """Peak RSS of fresh processes that load the artifact (and genai's models) and generate once."""
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * args.max_seq_len * head_dim * 4
    probes = [("skiptree onnxruntime", "skiptree", artifact), *((e.name, e.name, e.model_dir) for e in genai)]
    rss = {name: peers.peak_rss(kind, path, prompt_ids, args.max_new_tokens, args.threads)
           for name, kind, path in probes}  # fmt: skip
    return {"weight_bytes (fp32, model.safetensors)": (folder / "model.safetensors").stat().st_size,
            f"kv_cache_bytes (2 x L x Hkv x S={args.max_seq_len} x D x 4)": kv, "rss": rss}  # fmt: skip


def engine_record(name: str, result: dict, base: dict, graph: dict | None) -> dict:
    if "error" in result:
        return {"available": False, "reason": result["error"]}
    median = statistics.median(result["per_prompt"])
    diffs = first_difference(result["outputs"], base["outputs"])
    return {"available": True, "tokens_per_second_median": round(median, 2),
            "tokens_per_second_per_prompt": [round(s, 2) for s in result["per_prompt"]],
            "speedup_vs_reference": round(median / statistics.median(base["per_prompt"]), 3),
            "same_tokens_as_reference": all(d is None for d in diffs),
            "first_differing_index_per_prompt": diffs,
            "new_tokens_per_prompt": [len(o) for o in result["outputs"]],
            **({"graph": graph} if graph else {})}  # fmt: skip


def write_markdown(record: dict) -> str:
    lines = [f"# Decode speed: {record['model']}, {record['threads']} thread(s), "
             f"{record['max_new_tokens']} new tokens, S={record['max_seq_len']}", "",
             f"CPU: {record['cpu']}; {len(PROMPTS)} prompts, median of {record['rounds']} rounds each, "
             "engines interleaved; decode tokens/s (prefill excluded).", "",
             "| engine | tokens/s (median) | vs reference | same tokens "
             "| first difference (per prompt) | graph nodes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in record["engines"].items():
        if not r["available"]:
            reason = " ".join(r["reason"].replace("|", "/").split())
            lines.append(f"| {name} | unavailable | | | {reason} | |")
            continue
        diffs = ", ".join("-" if d is None else str(d) for d in r["first_differing_index_per_prompt"])
        nodes = r["graph"]["nodes"] if "graph" in r else ""
        lines.append(
            f"| {name} | {r['tokens_per_second_median']:.1f} | {r['speedup_vs_reference']:.2f}x "
            f"| {'yes' if r['same_tokens_as_reference'] else 'NO'} | {diffs} | {nodes} |"
        )
    lines += ["", "Graph op types (ONNX engines):", ""]
    for name, r in record["engines"].items():
        if "graph" in r:
            ops = ", ".join(f"{op} {n}" for op, n in r["graph"]["op_types"].items())
            lines.append(f"- {name}: {ops}")
    memory = record["memory"]
    lines += ["", "Memory (a fresh process per engine: load, then one generate of the first prompt):", "",
              *(f"- {k}: {v / MB:.1f} MB" for k, v in memory.items() if k != "rss")]  # fmt: skip
    for name, rss in memory["rss"].items():
        if "error" in rss:
            lines.append(f"- {name}: RSS probe failed: {rss['error']}")
            continue
        lines.append(
            f"- {name}: RSS before load {rss['rss_before_load_bytes'] / MB:.1f} MB, after load "
            f"{rss['rss_after_load_bytes'] / MB:.1f} MB, peak {rss['peak_rss_bytes'] / MB:.1f} MB"
        )
    return "\n".join(lines) + "\n"


def versions() -> dict:
    names = ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "onnx")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def decode_arguments() -> argparse.ArgumentParser:
    """The options every decode benchmark takes (threads, new tokens, context, rounds)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def main() -> None:
    args = decode_arguments().parse_args()
    torch.set_num_threads(args.threads)
    folder = fetch("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        artifact = skiptree.compile(folder, Path(tmp) / "artifact", max_seq_len=args.max_seq_len)
        compile_seconds = time.perf_counter() - start
        reference = ReferenceModel(folder)
        runtime = skiptree.load(artifact, threads=args.threads)
        prompt_ids = [reference.encode_prompt(p) for p in PROMPTS]
        engines = [SkiptreeEngine(REFERENCE, reference), SkiptreeEngine("skiptree onnxruntime", runtime),
                   peers.transformers_engine(folder, args.threads),
                   *peers.genai_engines(folder, args.threads)]  # fmt: skip
        step_file = artifact / runtime.manifest.graphs[GraphName.STEP].file
        graphs = {"skiptree onnxruntime": peers.op_counts(step_file)}
        graphs |= {e.name: peers.op_counts(e.model_dir / "model.onnx")
                   for e in engines if isinstance(e, peers.GenaiEngine)}  # fmt: skip
        runnable = [e for e in engines if not isinstance(e, peers.Unavailable)]
        results = measure(runnable, prompt_ids, args.max_new_tokens, args.rounds)
        results |= {e.name: {"error": e.reason} for e in engines if isinstance(e, peers.Unavailable)}
        genai = [e for e in engines if isinstance(e, peers.GenaiEngine)]
        memory_record = memory(artifact, folder, genai, prompt_ids[0], args)
    base = results[REFERENCE]
    record = {
        "model": "smollm2-135m (fp32)", "threads": args.threads, "max_new_tokens": args.max_new_tokens,
        "max_seq_len": args.max_seq_len, "rounds": args.rounds, "cpu": cpu_model(),
        "machine": platform.machine(), "versions": versions(), "compile_seconds": round(compile_seconds, 1),
        "prompt_ids": prompt_ids,
        "engines": {name: engine_record(name, r, base, graphs.get(name)) for name, r in results.items()},
        "memory": memory_record,
    }  # fmt: skip
    peers.save_results("decode_speed", record, write_markdown(record))


if __name__ == "__main__":
    main()
