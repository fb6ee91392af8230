"""Speculative decoding on SmolLM2-135M: speed, acceptance and exactness per prompt set, in one run.

Engines (1 thread each, greedy, EOS may stop early, the same prompt ids for all): our ORT artifact
decoding plainly (the AR baseline), the same artifact with prompt lookup over several draft trees
(one compile: the graphs do not depend on the tree, so one `SpeculativeDecoder` per tree is built
over the shared graphs), and transformers `generate`, plain and with its own prompt lookup
(`prompt_lookup_num_tokens=K`), timed as bench/peers.py times it (a streamer timestamps each token;
assisted steps hand over several tokens at once, each gets the step's timestamp). Engines run
interleaved (the order rotates per prompt); per (set, engine): median decode tokens/s over the
prompts, the median per-prompt speed-up over AR, tokens per target step, the prompt-lookup hit rate,
and where token ids first differ from AR's. Also a per-step time profile of each tree (draft,
verify split into ORT runs and Python, host loop) and the verify graph's cost T(n) at a 256-token
prefix. All three prompt sets are instructions to an instruct model, so all are chat-formatted.
Writes bench/results/speculative.json and .md.

    .venv/bin/python bench/speculative.py [--max-new-tokens 96] [--rounds 1] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import skiptree
from skiptree.models.zoo import fetch
from skiptree.runtime.device import cpu_model
from skiptree.runtime.drafters import PromptLookupDrafter
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.speculative import SpeculativeDecoder
from skiptree.runtime.tree import parse_tree

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from decode_speed import first_difference, versions  # noqa: E402

TREES = ("chain:2", "chain:4", "chain:6", "k-ary:2x2")
HF_LOOKUP = (2, 4, 6)
VERIFY_NODES = (1, 2, 4, 8, 16)
AR = "skiptree AR (artifact, speculative=False)"
FN = "```python\n{}\n```"
PROMPT_SETS = {  # name -> (chat-formatted, prompts)
    "chat": (True, [
        "What causes the seasons on Earth?",
        "Explain the difference between a list and a tuple in Python.",
        "Why is the sky blue? Answer in a short paragraph.",
        "Give me three tips for sleeping better.",
        "What is the difference between weather and climate?",
        "Explain what a compiler does in one paragraph.",
        "How does a refrigerator keep food cold?"]),
    "code": (True, [
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a Python function that returns the n-th Fibonacci number, iteratively.",
        "Write a Python function that merges two sorted lists into one sorted list.",
        "Write a JavaScript function that removes duplicates from an array.",
        "Write a Python function that counts the words in a text file.",
        "Write a SQL query that returns the ten customers with the highest total order amount.",
        "Write a Python class for a stack with push, pop and peek methods."]),
    "copying": (True, [
        "Add type hints to this function:\n\n" + FN.format(
            "def scale(values, factor):\n    result = []\n    for value in values:\n"
            "        result.append(value * factor)\n    return result"),
        "Fix the bug in:\n\n" + FN.format(
            "def average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n"
            "    return total / len(number)"),
        "Rename variable x to count in:\n\n" + FN.format(
            "def count_vowels(text):\n    x = 0\n    for ch in text.lower():\n        if ch in 'aeiou':\n"
            "            x += 1\n    return x"),
        "Add a docstring to this function:\n\n" + FN.format(
            "def clamp(value, low, high):\n    if value < low:\n        return low\n    if value > high:\n"
            "        return high\n    return value"),
        "Rewrite this loop as a list comprehension:\n\n" + FN.format(
            "squares = []\nfor number in range(10):\n    if number % 2 == 0:\n"
            "        squares.append(number * number)"),
        "Summarise: The Python programming language was created by Guido van Rossum and first released "
        "in 1991. It emphasises code readability, using significant indentation, and supports several "
        "programming paradigms, including procedural, object-oriented and functional programming. Python "
        "is dynamically typed and garbage-collected, and its large standard library is often described "
        "as 'batteries included'.",
        "Summarise: Photosynthesis is the process by which green plants, algae and some bacteria turn "
        "light energy into chemical energy. Using sunlight, they convert carbon dioxide and water into "
        "glucose and oxygen. The process takes place mainly in the chloroplasts of leaf cells, where the "
        "pigment chlorophyll absorbs light, and it supplies most of the oxygen in Earth's atmosphere."]),
}  # fmt: skip
PROFILE_KEYS = ("steps", "decode_s", "draft_s", "verify_s", "ort_verify_s", "ort_step_s", "ort_compact_s",
                "drafted_steps", "drafted_nodes", "accepted", "emitted")  # fmt: skip


class Timed:
    """A graph or step model whose `run` / `forward` calls add their time to `clock[key]`."""

    def __init__(self, inner, clock: dict, key: str):
        self.inner, self.clock, self.key = inner, clock, key

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.clock[self.key] += time.perf_counter() - start

        return timed if name in ("run", "forward") else method


class ArEngine:
    def __init__(self, runtime):
        self.name, self.runtime = AR, runtime

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        # the step model itself: plain decoding even on a runtime that has a speculative decoder
        out = generate_tokens(self.runtime.step_model, ids, max_new_tokens,
                              eos_token_ids=self.runtime.eos_token_ids)  # fmt: skip
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": 1.0}


class SpecEngine:
    """Prompt lookup over one tree, on the shared graphs of the speculative runtime."""

    def __init__(self, runtime, tree: str, drafter=None):
        drafter = drafter or PromptLookupDrafter()
        self.name, self.runtime = f"skiptree {drafter.name} {tree}", runtime
        spec, self.clock = runtime.speculative, dict.fromkeys(PROFILE_KEYS, 0.0)
        self.decoder = SpeculativeDecoder(Timed(spec.step, self.clock, "ort_step_s"),
                                          Timed(spec.verify_graph, self.clock, "ort_verify_s"),
                                          Timed(spec.compact_graph, self.clock, "ort_compact_s"),
                                          drafter, parse_tree(tree))  # fmt: skip

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        self.clock.update(dict.fromkeys(self.clock, 0.0))
        out = self.decoder.generate(ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        steps = out.steps
        self.clock.update(steps=len(steps), decode_s=out.decode_seconds,
                          emitted=sum(s.emitted for s in steps), draft_s=sum(s.draft_seconds for s in steps),
                          verify_s=sum(s.verify_seconds for s in steps),
                          drafted_steps=sum(s.drafted > 0 for s in steps),
                          drafted_nodes=sum(s.drafted for s in steps),
                          accepted=sum(s.accepted for s in steps))  # fmt: skip
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": out.mean_accepted,
                "profile": dict(self.clock)}  # fmt: skip


class LookupModel:
    """A transformers model whose `generate` adds `prompt_lookup_num_tokens=k` and passes each token of
    a target step to the caller's streamer separately (one timestamp each); `steps` counts the steps."""

    def __init__(self, model, k: int):
        self.model, self.k, self.streamer, self.steps = model, k, None, 0

    def generate(self, *args, streamer, **kwargs):
        self.streamer, self.steps = streamer, -1  # the first put is the prompt
        return self.model.generate(*args, streamer=self, prompt_lookup_num_tokens=self.k, **kwargs)

    def put(self, value) -> None:
        self.steps += 1
        for _ in range(1 if self.steps == 0 else value.numel()):
            self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


class HfEngine:
    """bench/peers.py's `TransformersEngine`; with `k`, a copy sharing its model with prompt lookup on."""

    def __init__(self, base, k: int | None = None):
        self.engine = base if k is None else copy.copy(base)
        self.name = base.name + ("" if k is None else f" prompt_lookup_num_tokens={k}")
        if k is not None:
            self.engine.model = LookupModel(base.model, k)

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        tokens, tps = self.engine.run(ids, max_new_tokens)
        model = self.engine.model
        return {"tokens": tokens, "tps": tps,
                "per_step": len(tokens) / model.steps if isinstance(model, LookupModel) else 1.0}  # fmt: skip


def measure(engines: list, prompt_sets: dict, max_new_tokens: int, rounds: int) -> dict:
    """result[set][engine] = per-prompt list of {tps (median of rounds), tokens, per_step, profile}."""
    for engine in engines:  # warm-up
        engine.run(next(iter(prompt_sets.values()))[0], 4)
    result, turn = {s: {e.name: [] for e in engines} for s in prompt_sets}, 0
    for set_name, prompts in prompt_sets.items():
        for p, ids in enumerate(prompts):
            runs: dict[str, list] = {e.name: [] for e in engines}
            for _ in range(rounds):
                order = engines[turn % len(engines) :] + engines[: turn % len(engines)]
                turn += 1
                for engine in order:
                    runs[engine.name].append(engine.run(ids, max_new_tokens))
            for name, rs in runs.items():
                result[set_name][name].append({**rs[-1], "tps": statistics.median(r["tps"] for r in rs)})
            speeds = ", ".join(f"{n.removeprefix('skiptree ')} {rs[-1]['tps']:.1f}" for n, rs in runs.items())
            print(f"  {set_name} {p + 1}/{len(prompts)}: {speeds}", flush=True)
    return result


def summarise(runs: list[dict], base: list[dict]) -> dict:
    diffs = first_difference([r["tokens"] for r in runs], [b["tokens"] for b in base])
    ratios = [r["tps"] / b["tps"] for r, b in zip(runs, base, strict=True)]
    record = {"tokens_per_second_median": round(statistics.median(r["tps"] for r in runs), 2),
              "tokens_per_second_per_prompt": [round(r["tps"], 2) for r in runs],
              "speedup_vs_ar_median": round(statistics.median(ratios), 3),
              "tokens_per_target_step": round(statistics.mean(r["per_step"] for r in runs), 3),
              "same_tokens_as_ar": all(d is None for d in diffs), "first_difference_per_prompt": diffs,
              "new_tokens_per_prompt": [len(r["tokens"]) for r in runs]}  # fmt: skip
    if "profile" in runs[0]:
        total = {k: sum(r["profile"][k] for r in runs) for k in PROFILE_KEYS}
        ms = {k: 1000 * total[k] / total["steps"] for k in PROFILE_KEYS if k.endswith("_s")}
        python = ms["verify_s"] - ms["ort_verify_s"] - ms["ort_step_s"] - ms["ort_compact_s"]
        record["lookup_hit_rate"] = round(total["drafted_steps"] / total["steps"], 3)
        record["profile_ms_per_step"] = {
            "step": ms["decode_s"], "draft": ms["draft_s"], "verify (recorded)": ms["verify_s"],
            "host/other": ms["decode_s"] - ms["draft_s"] - ms["verify_s"],
            "  ORT verify graph": ms["ort_verify_s"], "  ORT plain step (no draft)": ms["ort_step_s"],
            "  ORT compact": ms["ort_compact_s"], "  Python accept/bookkeeping": python}  # fmt: skip
        record["profile_ms_per_step"] = {k: round(v, 2) for k, v in record["profile_ms_per_step"].items()}
        drafted = max(total["drafted_steps"], 1)
        record["mean_draft_nodes_when_drafted"] = round(total["drafted_nodes"] / drafted, 2)
        record["mean_accepted_when_drafted"] = round(total["accepted"] / drafted, 2)
        plain = max(total["steps"] - total["drafted_steps"], 1)
        record["ms_per_verify_call"] = round(1000 * total["ort_verify_s"] / drafted, 2)
        record["ms_per_plain_step_call"] = round(1000 * total["ort_step_s"] / plain, 2)
    return record


def verify_cost(runtime, prompt_ids: list[int], prefix: int = 256, reps: int = 15) -> dict:
    """Median ms of the verify graph with a chain of n draft nodes (n + 1 tokens with the root) after a
    `prefix`-token cache, and of one plain step (T=1, logits fetched as the AR loop does)."""
    step, verify = runtime.step_model, runtime.speculative.verify_graph
    step.prefill((prompt_ids * (prefix // len(prompt_ids) + 1))[:prefix])
    tokens = (prompt_ids * 4)[:17]
    jobs = {"plain step (T=1)": lambda: step.forward(tokens[:1], ("logits",))}
    for n in VERIFY_NODES:
        inputs = {"tokens": np.asarray([tokens[: n + 1]], dtype=np.int64),
                  "parents": np.asarray([0, *range(n)], dtype=np.int64),
                  "prefix_len": np.asarray([prefix], dtype=np.int64)}  # fmt: skip
        jobs[f"verify n={n}"] = lambda inputs=inputs: verify.run(inputs, ("next_ids",))
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for rep in range(reps + 1):
        for name in list(jobs)[rep % len(jobs) :] + list(jobs)[: rep % len(jobs)]:
            step.cache.length = prefix
            start = time.perf_counter()
            jobs[name]()
            if rep:
                times[name].append(1000 * (time.perf_counter() - start))
    plain = statistics.median(times["plain step (T=1)"])
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {name: {"ms": round(ms, 2), "vs_plain_step": round(ms / plain, 3)} for name, ms in medians.items()}


def write_markdown(record: dict) -> str:
    lines = [f"# Speculative decoding: {record['model']}, {record['threads']} thread, greedy, "
             f"{record['max_new_tokens']} new tokens (EOS may stop), S={record['max_seq_len']}", "",
             f"CPU: {record['cpu']}. Engines interleaved; {record['rounds']} round(s) per prompt; "
             "tokens/s = decode tokens/s (prefill excluded), median over the set's prompts; speed-up = "
             "median over prompts of engine/AR tokens/s; tokens/step = tokens emitted per target step "
             "(transformers: per assisted step); hit = share of steps where prompt lookup proposed a draft.",
             ""]  # fmt: skip
    for set_name, engines in record["sets"].items():
        n = len(record["prompts"][set_name]["text"])
        lines += [f"## {set_name} ({n} prompts, chat-formatted: {record['prompts'][set_name]['chat']})", "",
                  "| engine | tokens/s | speed-up vs AR | tokens/step | hit | same tokens as AR "
                  "| first diff |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in engines.items():
            diffs = ", ".join("-" if d is None else str(d) for d in r["first_difference_per_prompt"])
            lines.append(f"| {name} | {r['tokens_per_second_median']:.1f} | "
                         f"{r['speedup_vs_ar_median']:.2f}x | {r['tokens_per_target_step']:.2f} | "
                         f"{r.get('lookup_hit_rate', '')} | "
                         f"{'yes' if r['same_tokens_as_ar'] else 'NO'} | {diffs} |")  # fmt: skip
        lines.append("")
    best = record["best_tree"]
    lines += [f"## Profile per target step, ms (best tree: {best}; all trees in the JSON)", "",
              "verify (recorded) = `StepRecord.verify_seconds` (ORT verify/step/compact + Python "
              "acceptance); host/other = step - draft - verify (the generate loop).", "",
              "| | " + " | ".join(record["sets"]) + " |", "|---|" + "---|" * len(record["sets"])]  # fmt: skip
    profiles = [engines[f"skiptree prompt-lookup {best}"] for engines in record["sets"].values()]
    for key in profiles[0]["profile_ms_per_step"]:
        cells = " | ".join(f"{p['profile_ms_per_step'][key]:.2f}" for p in profiles)
        lines.append(f"| {'- ' + key.strip() if key.startswith(' ') else key} | {cells} |")
    ar = [1000 / engines[AR]["tokens_per_second_median"] for engines in record["sets"].values()]
    lines += ["| AR ms per token (for comparison) | " + " | ".join(f"{v:.2f}" for v in ar) + " |",
              *(f"| {key.replace('_', ' ')} | " + " | ".join(str(p[key]) for p in profiles) + " |"
                for key in ("lookup_hit_rate", "mean_draft_nodes_when_drafted", "mean_accepted_when_drafted",
                            "ms_per_verify_call", "ms_per_plain_step_call")), "",
              f"## Verify cost T(n) at a {record['verify_prefix']}-token prefix (chain of n draft nodes "
              "+ the root; median ms)", "", "| graph | ms | vs plain step |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {v['ms']:.2f} | {v['vs_plain_step']:.2f} |"
              for name, v in record["verify_cost"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prompts-per-set", type=int, default=None, help="fewer prompts (a smoke test)")
    parser.add_argument("--artifact", type=Path, default=None, help="reuse (or keep) this compiled artifact")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = fetch("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or Path(tmp) / "artifact"
        start = time.perf_counter()
        if not (artifact / "manifest.json").is_file():
            skiptree.compile(folder, artifact, max_seq_len=args.max_seq_len, draft="prompt-lookup",
                             tree=TREES[0])  # fmt: skip
        compile_seconds = time.perf_counter() - start
        ar_rt = skiptree.load(artifact, threads=1, speculative=False)
        spec_rt = skiptree.load(artifact, threads=1)
        prompt_ids = {name: [ar_rt.encode_prompt(p, chat=chat) for p in prompts[: args.prompts_per_set]]
                      for name, (chat, prompts) in PROMPT_SETS.items()}  # fmt: skip
        base = peers.TransformersEngine(folder, threads=1)
        engines = [ArEngine(ar_rt), *(SpecEngine(spec_rt, tree) for tree in TREES), HfEngine(base),
                   *(HfEngine(base, k) for k in HF_LOOKUP)]  # fmt: skip
        runs = measure(engines, prompt_ids, args.max_new_tokens, args.rounds)
        cost = verify_cost(spec_rt, prompt_ids["copying"][0])
    sets = {s: {name: summarise(r, by_engine[AR]) for name, r in by_engine.items()}
            for s, by_engine in runs.items()}  # fmt: skip
    best = max(TREES, key=lambda t: statistics.mean(e[f"skiptree prompt-lookup {t}"]["speedup_vs_ar_median"]
                                                    for e in sets.values()))  # fmt: skip
    record = {"model": "smollm2-135m (fp32)", "threads": 1, "max_new_tokens": args.max_new_tokens,
              "max_seq_len": args.max_seq_len, "rounds": args.rounds, "cpu": cpu_model(),
              "machine": platform.machine(), "versions": versions(),
              "compile_seconds": round(compile_seconds, 1),
              "best_tree": best, "verify_prefix": 256, "verify_cost": cost, "sets": sets,
              "prompts": {s: {"chat": PROMPT_SETS[s][0], "text": PROMPT_SETS[s][1][: args.prompts_per_set],
                              "ids": ids} for s, ids in prompt_ids.items()}}  # fmt: skip
    peers.save_results("speculative", record, write_markdown(record))


if __name__ == "__main__":
    main()
