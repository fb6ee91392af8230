"""Early exit (CALM, lossy) on a real model: tokens/s against agreement with the full model, one run.

One artifact compiled with `--early-exit` (exits at L/4, L/2, 3L/4, softmax gate); thresholds for
a range of agreement targets are calibrated from one set of observations
(compiler/drafters/exit_calibration.py) and set on the loaded artifact. Baseline: the same
artifact's plain step graph (our AR). Agreement is measured on the outputs: the share of decoded
tokens the full model would have chosen after the same prefix. Writes
bench/results/early_exit.{json,md} and early_exit.png.

    .venv/bin/python bench/early_exit.py [--artifact ART] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import skiptree
from skiptree.compiler.compile import calibration_prompts
from skiptree.compiler.drafters.exit_calibration import ExitObservations, choose_threshold, observe_exits
from skiptree.compiler.drafters.self_draft_search import target_continuations
from skiptree.compiler.drafters.vocab import frequent_tokens
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.specs import EarlyExitSpec, parse_early_exit
from skiptree.models.loader import load_model
from skiptree.models.zoo import fetch
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.onnx_step import GraphStepModel
from skiptree.runtime.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import speculative as bench  # noqa: E402

TARGETS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4)


class PlainSteps:
    """The early-exit artifact's full step graph: our AR baseline on the same sessions."""

    def __init__(self, step_model):
        self.model, self.max_seq_len = step_model, step_model.max_seq_len

    def prefill(self, ids):
        return self.model.prefill(ids)

    def decode(self, token):
        return GraphStepModel.decode(self.model, token)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts-per-set", type=int, default=3)
    parser.add_argument("--exit-vocab", type=int, default=0, help="exit heads keep this many tokens (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = fetch("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or Path(tmp) / "art"
        if not (artifact / "manifest.json").is_file():
            options = f"min-agreement=0.9,vocab={args.exit_vocab}"
            skiptree.compile(folder, artifact, max_seq_len=512, early_exit=options)
        runtime = skiptree.load(artifact, threads=1)
        early = runtime.manifest.early_exit
        kept = early.exit_head_tokens
        kept = kept if kept < runtime.manifest.model.config["vocab_size"] else 0
        exits = "+".join(map(str, early.exits))
        spec = parse_early_exit(f"min-agreement=0.9,exits={exits},vocab={kept}").resolved(early.num_layers)
        model = load_model(folder, torch.float32)
        calibration = [runtime.encode_prompt(p, chat=True) for p in bench.PROMPT_SETS["code"][1][3:]]
        data = target_continuations(model, calibration, 48)
        vocab = ()
        if spec.vocab:  # the exit heads' tokens, counted exactly as compile counted them
            tokenizer = Tokenizer.from_folder(folder)
            vocab = frequent_tokens(model, calibration_prompts(CompileOptions(), tokenizer), spec.vocab)[0]
        observed = [observe_exits(model, seq, first, spec, vocab) for first, seq in data.sequences]
        obs = ExitObservations(
            *(
                np.concatenate([getattr(o, f) for o in observed])
                for f in ("confidence", "exit_tokens", "full_tokens")
            )
        )
        thresholds = {
            t: choose_threshold(obs, EarlyExitSpec(t, spec.exits, spec.gate), early.num_layers)
            for t in TARGETS
        }
        prompts = [
            runtime.encode_prompt(p, chat=True)
            for name in ("chat", "code")
            for p in bench.PROMPT_SETS[name][1][: args.prompts_per_set]
        ]
        step = runtime.step_model
        rows = []
        base = [
            generate_tokens(PlainSteps(step), p, args.max_new_tokens, eos_token_ids=runtime.eos_token_ids)
            for p in prompts
        ]
        base_tps = statistics.median(r.tokens_per_second for r in base)
        for target, choice in thresholds.items():
            step.threshold = choice["threshold"]
            tps, layers, agreement = [], [], []
            for ids in prompts:
                out = runtime.generate(ids, max_new_tokens=args.max_new_tokens).result
                tps.append(out.tokens_per_second)
                layers += out.layers_run or []
                agreement.append(step.full_model_agreement(ids, out.token_ids))
            rows.append(
                {
                    "target": target,
                    "threshold": choice["threshold"],
                    "calibrated_agreement": choice["agreement"],
                    "measured_agreement": float(np.mean(agreement)),
                    "mean_layers": float(np.mean(layers)),
                    "tokens_per_second": statistics.median(tps),
                    "speedup_vs_ar": statistics.median(tps) / base_tps,
                }
            )
    lines = [
        "# Early exit (lossy) on SmolLM2-135M, fp32, 1 thread, one run"
        + (f", exit heads of {spec.vocab} tokens" if spec.vocab else ""),
        "",
        f"Exits after layers {spec.exits} of {early.num_layers}, gate {spec.gate}; "
        f"top-1 agreement of each exit head"
        f" with the full model on calibration: {list(early.top1_agreement_by_exit)}.",
        f"Our AR (same artifact, full step graph): {base_tps:.1f} tok/s. {len(prompts)} chat/code prompts x "
        f"{args.max_new_tokens} tokens.",
        "",
        "| target agreement | threshold | calibrated | measured agreement | mean layers | tok/s | vs AR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']:.2f} | {r['threshold']:.4f} | {r['calibrated_agreement']:.3f} | "
            f"{r['measured_agreement']:.3f} | {r['mean_layers']:.1f} | {r['tokens_per_second']:.1f} | "
            f"{r['speedup_vs_ar']:.2f}x |"
        )
    record = {"ar_tokens_per_second": base_tps, "exits": list(spec.exits), "rows": rows,
              "manifest": early.to_json()}  # fmt: skip
    stem = f"early_exit_vocab{spec.vocab}" if spec.vocab else "early_exit"
    peers.save_results(stem, record, "\n".join(lines) + "\n")
    plot(rows, base_tps, Path(__file__).parent / "results" / f"{stem}.png")


def plot(rows: list[dict], base_tps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["measured_agreement"] for r in rows],
        [r["tokens_per_second"] for r in rows],
        "o-",
        label="early exit",
    )
    ax.axhline(base_tps, color="gray", linestyle="--", label="our AR (lossless)")
    ax.set_xlabel("measured agreement with the full model")
    ax.set_ylabel("decode tokens/s (1 thread)")
    ax.set_title("SmolLM2-135M early exit: speed vs agreement")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
