"""The tuned tree against preset trees, in one run (1 thread, greedy).

Uses the engines and prompt sets of bench/speculative.py; the tuned tree is read from a finished
`skiptree tune` session (its choice.json is a tree file: it has "parents"). SmolLM2-135M with prompt
lookup by default; with `--artifact` of a draft-model session (e.g. the session's own artifact of
`skiptree tune qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b`), that drafter on the Qwen code prompts.

    .venv/bin/python bench/tuned_tree.py --session SESSION [--artifact ART] [--prompts-per-set 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import skiptree
from skiptree.models.zoo import fetch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import qwen_pair  # noqa: E402
import speculative as bench  # noqa: E402

PRESETS = ("chain:2", "chain:4", "chain:6", "k-ary:2x2", "k-ary:3x2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", type=Path, required=True, help="a finished skiptree tune session")
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--prompts-per-set", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    choice = json.loads((args.session / "choice.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or Path(tmp) / "artifact"
        if not (artifact / "manifest.json").is_file():
            skiptree.compile(fetch("smollm2-135m"), artifact, max_seq_len=512, draft="prompt-lookup")
        spec = skiptree.load(artifact, threads=1)  # one runtime: AR runs its step model directly
        drafter = spec.speculative.drafter
        sets = bench.PROMPT_SETS if drafter.name == "prompt-lookup" else {"code": (True, qwen_pair.PROMPTS)}
        prompts = {name: [spec.encode_prompt(p, chat=chat) for p in texts[: args.prompts_per_set]]
                   for name, (chat, texts) in sets.items() if name != "chat"}  # fmt: skip
        tuned = bench.SpecEngine(spec, str(args.session / "choice.json"), drafter)
        tuned.name = f"tuned ({len(choice['parents'])} nodes, depth {choice.get('depth', 0)})"
        engines = [bench.ArEngine(spec), tuned, *(bench.SpecEngine(spec, tree, drafter) for tree in PRESETS)]
        runs = bench.measure(engines, prompts, args.max_new_tokens, rounds=1)
    sets = {s: {name: bench.summarise(r, by_engine[bench.AR]) for name, r in by_engine.items()}
            for s, by_engine in runs.items()}  # fmt: skip
    names = [e.name for e in engines[1:]]
    mean_speedup = {n: statistics.mean(sets[s][n]["speedup_vs_ar_median"] for s in sets) for n in names}
    title = f"{choice['target']}, drafter {choice.get('draft', 'prompt-lookup')}"
    lines = [f"# Tuned tree vs presets ({title}, 1 thread, greedy, one run)", "",
             f"Tuned: parents {choice['parents']}, predicted {choice['predicted_speedup']:.2f}x, measured by "
             f"the tuner {choice['measured_speedup']:.2f}x", "",
             "| tree | " + " | ".join(sets) + " | mean |", "|---|" + "---|" * (len(sets) + 1)]  # fmt: skip
    for name in names:
        cells = [f"{sets[s][name]['speedup_vs_ar_median']:.2f}x" for s in sets]
        lines.append(f"| {name} | {' | '.join(cells)} | {mean_speedup[name]:.2f}x |")
    same = all(r["same_tokens_as_ar"] for by in sets.values() for r in by.values())
    lines += ["", f"Tokens identical to our AR artifact on every prompt: {'yes' if same else 'NO'}."]
    record = {"choice": choice, "sets": sets, "mean_speedup": mean_speedup, "same_tokens": same}
    name = "tuned_tree" if drafter.name == "prompt-lookup" else f"tuned_tree_{choice['target']}"
    peers.save_results(name, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
