"""Self-drafts side by side, one run, 1 thread, greedy: our AR artifact, the best prefix-exit and the
best skip-set self-draft of a finished `skiptree tune MODEL --draft self:auto` session (each at its
best predicted chain length), transformers `generate` and transformers `assistant_early_exit=E`
(its LayerSkip-style self-speculation with our best exit E). Same chat-formatted prompts; outputs
compared with our AR. Writes bench/results/self_draft_<model>.{json,md}.

    .venv/bin/python bench/self_draft.py --session SESSION [--prompts-per-set 3] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import skiptree
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.generation import generate_tokens

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import speculative as bench  # noqa: E402


class Ours:
    def __init__(self, name: str, runtime, speculative: bool):
        self.name, self.runtime, self.speculative = name, runtime, speculative

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        if not self.speculative:
            out = generate_tokens(
                self.runtime.step_model, ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids
            )
            return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": 1.0}
        out = self.runtime.speculative.generate(ids, max_new_tokens, eos_token_ids=self.runtime.eos_token_ids)
        return {"tokens": out.token_ids, "tps": out.tokens_per_second, "per_step": out.mean_accepted}


class Transformers:
    def __init__(self, engine: peers.TransformersEngine, early_exit: int | None):
        self.engine, self.early_exit = engine, early_exit
        self.name = "transformers generate" + (f" assistant_early_exit={early_exit}" if early_exit else "")

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        options = {} if self.early_exit is None else {"assistant_early_exit": self.early_exit}
        tokens, tps = self.engine.run(ids, max_new_tokens, **options)
        return {"tokens": tokens, "tps": tps, "per_step": 1.0}


def best_of_kind(candidates: list[dict], kind: str) -> dict:
    return max((c for c in candidates if c["kind"] == kind), key=lambda c: c["speedup"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", type=Path, required=True, help="a finished self:auto tuning session")
    parser.add_argument("--prompts-per-set", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    choice = json.loads((args.session / "choice.json").read_text())
    target, max_len = choice["target"], choice["max_seq_len"]
    best = {kind: best_of_kind(choice["candidates"], kind) for kind in ("exit", "skip")}
    runtimes = {}
    for kind, c in best.items():
        folder = args.session / f"bench-{kind}"
        if not (folder / "manifest.json").is_file():
            skiptree.compile(
                target, folder, max_seq_len=max_len, draft=c["draft"], tree=f"chain:{c['chain']}"
            )
        runtimes[kind] = skiptree.load(folder, threads=1)
    plain = skiptree.load(args.session / "artifact", threads=1, speculative=False)
    engine = peers.TransformersEngine(resolve_model_dir(target), threads=1)
    exit_layer = best["exit"]["layers_run"]
    engines = [
        Ours(bench.AR, plain, False),
        *(Ours(f"skiptree {best[k]['draft']} chain:{best[k]['chain']}", runtimes[k], True) for k in best),
        Transformers(engine, None),
        Transformers(engine, exit_layer),
    ]
    prompts = {
        name: [plain.encode_prompt(p, chat=True) for p in texts[: args.prompts_per_set]]
        for name, (_, texts) in bench.PROMPT_SETS.items()
        if name != "copying"
    }
    runs = bench.measure(engines, prompts, args.max_new_tokens, rounds=1)
    sets = {s: {name: bench.summarise(r, by[bench.AR]) for name, r in by.items()} for s, by in runs.items()}
    lines = [
        f"# Self-drafts vs plain, {target}, fp32, 1 thread, greedy, one run",
        "",
        f"From session {args.session.name}: decision {choice['mode']}; best exit {best['exit']['draft']} "
        f"(acceptance {best['exit']['acceptance']:.3f}, draft {best['exit']['draft_share_of_step']:.2f} of a "
        f"step, predicted {best['exit']['speedup']:.2f}x); best skip set {best['skip']['draft']} (acceptance "
        f"{best['skip']['acceptance']:.3f}, draft {best['skip']['draft_share_of_step']:.2f} of a step, "
        f"predicted {best['skip']['speedup']:.2f}x).",
        "",
        "| engine | "
        + " | ".join(f"{s} tok/s | {s} vs AR | {s} tokens/step" for s in sets)
        + " | same tokens |",
        "|---|" + "---|---|---|" * len(sets) + "---|",
    ]
    for name in sets[next(iter(sets))]:
        rows = [sets[s][name] for s in sets]
        cells = [
            f"{r['tokens_per_second_median']:.1f} | {r['speedup_vs_ar_median']:.2f}x | "
            f"{r['tokens_per_target_step']:.2f}"
            for r in rows
        ]
        same = all(sets[s][name]["same_tokens_as_ar"] for s in sets)
        lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if same else 'NO'} |")
    record = {"target": target, "best": best, "sets": sets}
    peers.save_results(f"self_draft_{Path(str(target)).name}", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
