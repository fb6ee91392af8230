"""The trained feature head (EAGLE-style) on SmolLM2-135M, one run, 1 thread, greedy (issue 7).

From a finished `skiptree tune smollm2-135m --train-draft feature-head --session S`: the session's
artifact (shrunk head) with the tuner's tree and with chains, the same head with the full output
head, our AR artifact and onnxruntime-genai fp32, on the same chat-formatted prompts. Per engine:
tokens/s, speed-up over our AR, tokens per target step, outputs compared with our AR; and the head's
cost per draft level as a share of a target step.

    .venv/bin/python bench/feature_head.py --session S [--prompts-per-set 3] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import skiptree
from skiptree.compiler.tune.measure import measure_decode_ms, measure_draft_level_ms
from skiptree.models.zoo import fetch
from skiptree.runtime.tree import TreeShape, chain

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import self_draft  # noqa: E402
import speculative as bench  # noqa: E402
from trained_draft import fetch_plain, wrap  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", type=Path, required=True)
    parser.add_argument("--prompts-per-set", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--chains", default="2,4", help="chain lengths to run besides the tuned tree")
    args = parser.parse_args()
    torch.set_num_threads(1)
    choice = json.loads((args.session / "choice.json").read_text())
    tuned = TreeShape(tuple(choice["parents"])) if choice["parents"] else chain(3)
    shrunk = skiptree.load(args.session / "artifact", threads=1)
    full_folder = args.session / "bench-full-head"
    if not (full_folder / "manifest.json").is_file():
        skiptree.compile(choice["target"], full_folder, max_seq_len=choice["max_seq_len"],
                         draft=choice["draft"], tree="chain:1")  # fmt: skip
    full = skiptree.load(full_folder, threads=1)
    plain = skiptree.load(fetch_plain(choice), threads=1, speculative=False)
    decode_ms = measure_decode_ms(plain, 256)
    share = {name: {w: measure_draft_level_ms(r, w, 256) / decode_ms for w in (1, 4)}
             for name, r in (("shrunk head", shrunk), ("full head", full))}  # fmt: skip
    tree_name = f"tuned tree ({len(tuned.parents)} nodes, depth {tuned.depth})"
    variants = [(f"feature head + shrunk head, {tree_name}", shrunk, tuned),
                (f"feature head + full head, {tree_name}", full, tuned)]  # fmt: skip
    chains = [int(k) for k in args.chains.split(",")]
    variants += [(f"feature head + shrunk head, chain:{k}", shrunk, chain(k)) for k in chains]
    engines = [self_draft.Ours(bench.AR, plain, False)]
    for name, runtime, shape in variants:
        runtime_copy = skiptree.load(runtime.folder, threads=1)  # each engine its own caches and tree
        runtime_copy.speculative = runtime_copy.speculative.with_tree(shape)
        engines.append(self_draft.Ours(f"skiptree {name}", runtime_copy, True))
    engines += peers.genai_engines(fetch("smollm2-135m"), 1, precisions=("fp32",))
    prompts = {name: [plain.encode_prompt(p, chat=True) for p in texts[: args.prompts_per_set]]
               for name, (_, texts) in bench.PROMPT_SETS.items()}  # fmt: skip
    runs = bench.measure([wrap(e) for e in engines], prompts, args.max_new_tokens, rounds=1)
    sets = {s: {name: bench.summarise(r, by[bench.AR]) for name, r in by.items()} for s, by in runs.items()}
    head = choice["feature_head"]
    data = head["data"]
    depth_acceptance = [round(a, 2) for a in choice["chain_acceptance"]]
    lines = [
        "# Feature-level draft head (EAGLE-style), SmolLM2-135M, fp32, 1 thread, greedy, one run",
        "",
        f"Trained {head['step']} steps ({head['seconds']:.0f} s) on {head['train_positions']} positions: "
        f"{data['answer_tokens']} tokens of the target's own answers to {data['target_answers']} requests, "
        f"{data['stdlib_tokens']} of standard-library source; held-out first-draft acceptance "
        f"{head['untrained_acceptance']:.3f} untrained -> {head['held_out_acceptance']:.3f}. Shrunk head "
        f"{choice['draft_vocab']} tokens covering {choice['vocab_coverage']:.3f} of calibration outputs.",
        "Draft level / target step (width 1, 4): "
        + ", ".join(f"{n} {v[1]:.3f}, {v[4]:.3f}" for n, v in share.items())
        + f". Tuner: predicted {choice['predicted_speedup']:.2f}x, measured "
        f"{choice['measured_speedup']:.2f}x; chain acceptance by depth {depth_acceptance}.",
        "",
        "| engine | " + " | ".join(f"{s} tok/s | {s} vs AR | {s} tok/step" for s in sets) + " | same as AR |",
        "|---|" + "---|---|---|" * len(sets) + "---|",
    ]
    for name in sets[next(iter(sets))]:
        rows = [sets[s][name] for s in sets]
        cells = [f"{r['tokens_per_second_median']:.1f} | {r['speedup_vs_ar_median']:.2f}x | "
                 f"{r['tokens_per_target_step']:.2f}" for r in rows]  # fmt: skip
        same = all(r["same_tokens_as_ar"] for r in rows)
        lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if same else 'NO'} |")
    record = {"choice": {k: v for k, v in choice.items() if k != "acceptance"}, "draft_share": share,
              "sets": sets}  # fmt: skip
    peers.save_results("feature_head", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
