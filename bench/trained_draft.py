"""Cheap trained drafts on SmolLM2-135M, one run, 1 thread, greedy (issue 7's benchmark).

From a finished `skiptree tune smollm2-135m --train-draft exit-adapter --session S`: the exit
adapter with its shrunk head (the session's artifact) and with the full head, the same exit without
the adapter (shrunk and full head), our AR artifact and onnxruntime-genai fp32 on the same
chat-formatted prompts. Per engine: tokens/s, speed-up over our AR, tokens per target step, the
draft step's cost as a share of a target step, and whether the output equals our AR's.

    .venv/bin/python bench/trained_draft.py --session S [--prompts-per-set 3] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import skiptree
from skiptree.compiler.tune.measure import measure_decode_ms, measure_probe_ms
from skiptree.models.zoo import fetch
from skiptree.runtime.tree import chain

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import self_draft  # noqa: E402
import speculative as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", type=Path, required=True)
    parser.add_argument("--prompts-per-set", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    choice = json.loads((args.session / "choice.json").read_text())
    exit_layer, vocab = choice["adapter"]["exit_layer"], choice["draft_vocab"]
    adapter = args.session / "exit_adapter.safetensors"
    variants = {
        "adapter + shrunk head": dict(draft_adapter=adapter, draft_vocab=vocab),
        "adapter + full head": dict(draft_adapter=adapter),
        "plain exit + shrunk head": dict(draft_vocab=vocab),
        "plain exit + full head": {},
    }
    depth = len(choice["parents"])
    runtimes = {}
    for name, extra in variants.items():
        folder = args.session / (
            "artifact" if name == "adapter + shrunk head" else f"bench-{name.replace(' ', '-')}"
        )
        if not (folder / "manifest.json").is_file():
            skiptree.compile(
                choice["target"],
                folder,
                max_seq_len=choice["max_seq_len"],
                draft=f"self:exit={exit_layer}",
                tree=f"chain:{depth}",
                **extra,
            )
        runtime = skiptree.load(folder, threads=1)
        runtime.speculative = runtime.speculative.with_tree(chain(depth))
        runtimes[name] = runtime
    plain = skiptree.load(fetch_plain(choice), threads=1, speculative=False)
    share = {name: measure_probe_ms(r, 256) / measure_decode_ms(plain, 256) for name, r in runtimes.items()}
    engines = [
        self_draft.Ours(bench.AR, plain, False),
        *(self_draft.Ours(f"skiptree {name} (chain:{depth})", r, True) for name, r in runtimes.items()),
        *peers.genai_engines(fetch("smollm2-135m"), 1, precisions=("fp32",)),
    ]
    prompts = {
        name: [plain.encode_prompt(p, chat=True) for p in texts[: args.prompts_per_set]]
        for name, (_, texts) in bench.PROMPT_SETS.items()
    }
    runs = bench.measure([wrap(e) for e in engines], prompts, args.max_new_tokens, rounds=1)
    sets = {s: {name: bench.summarise(r, by[bench.AR]) for name, r in by.items()} for s, by in runs.items()}
    trained = choice["adapter"]
    lines = [
        "# Trained cheap drafts, SmolLM2-135M, fp32, 1 thread, greedy, one run",
        "",
        f"Exit after layer {exit_layer}; adapter trained {trained['step']} steps on "
        f"{trained['train_positions']} positions ({trained['seconds']:.0f} s): held-out acceptance "
        f"{trained['untrained_acceptance']:.3f} untrained -> {trained['held_out_acceptance']:.3f}; "
        f"shrunk head {vocab} tokens covering {choice['vocab_coverage']:.3f} of calibration outputs.",
        "Draft step / target step: " + ", ".join(f"{n} {v:.2f}" for n, v in share.items()) + ".",
        "",
        "| engine | " + " | ".join(f"{s} tok/s | {s} vs AR | {s} tok/step" for s in sets) + " | same as AR |",
        "|---|" + "---|---|---|" * len(sets) + "---|",
    ]
    for name in sets[next(iter(sets))]:
        rows = [sets[s][name] for s in sets]
        cells = [
            f"{r['tokens_per_second_median']:.1f} | {r['speedup_vs_ar_median']:.2f}x | "
            f"{r['tokens_per_target_step']:.2f}"
            for r in rows
        ]
        same = all(r["same_tokens_as_ar"] for r in rows)
        lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if same else 'NO'} |")
    peers.save_results(
        "trained_draft", {"choice": choice, "draft_share": share, "sets": sets}, "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


def fetch_plain(choice: dict) -> Path:
    """Our AR artifact for the target (compiled once, cached next to the session)."""
    folder = Path(choice.get("plain_artifact", "/tmp/skiptree-bench-plain-smollm2"))
    if not (folder / "manifest.json").is_file():
        skiptree.compile(choice["target"], folder, max_seq_len=choice["max_seq_len"])
    return folder


class wrap:  # noqa: N801 - adapts peer engines (tokens, tps) to bench.measure's dict results
    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def run(self, ids, max_new_tokens):
        out = self.engine.run(ids, max_new_tokens)
        if isinstance(out, dict):
            return out
        tokens, tps = out
        return {"tokens": tokens, "tps": tps, "per_step": 1.0}


if __name__ == "__main__":
    main()
