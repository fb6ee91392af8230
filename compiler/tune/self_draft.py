"""`skiptree tune MODEL --draft self:auto`: the self-draft search as a resumable tuning session.

Phases (each measurement persisted as taken, see compiler/tune/session.py): compile a probe artifact
(self-draft of the first L/2 layers) -> backend costs (T(1), T(n), the probe's draft step) ->
acceptance of every candidate (eager, teacher-forced; compiler/drafters/self_draft_search.py) -> choose
(or plain) -> compile and measure the winner -> choice.json + report.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from skiptree.compiler.drafters.self_draft_search import (
    SelfDraftCosts,
    exit_agreement_and_similarity,
    predict,
    skip_agreement,
    skip_candidates,
    target_continuations,
)
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.specs import SelfDraftSpec, parse_self_draft
from skiptree.compiler.tune.context import Outcome, TuneContext
from skiptree.compiler.tune.measure import measure_probe_ms, measure_speedup, prompt_ids
from skiptree.models.loader import load_model
from skiptree.models.source import resolve_model_dir
from skiptree.runtime.tree import chain


def search_acceptance(model, prompts: list[list[int]], new_tokens: int, log: Callable[[str], None]) -> dict:
    """Acceptance (top-1 agreement) of every prefix exit and every candidate skip set."""
    data = target_continuations(model, prompts, new_tokens)
    exits, similarity = exit_agreement_and_similarity(model, data)
    found = {str(SelfDraftSpec("exit", exit_layer=e)): float(exits[e]) for e in range(1, len(similarity))}
    for spec in skip_candidates(similarity):
        found[str(spec)] = skip_agreement(model, data, spec)
        log(f"    {spec}: acceptance {found[str(spec)]:.3f}")
    return {"acceptance": found, "layer_similarity": [round(float(s), 4) for s in similarity]}


def tune_self_draft(context: TuneContext) -> Outcome:
    settings, log, measured = context.settings, context.log, context.measured
    prompts = list(settings.prompts)
    model = load_model(resolve_model_dir(context.target), torch.float32)
    count = model.config.num_layers
    probe = SelfDraftSpec("skip", skipped=tuple(range(count // 2, count)))  # drafts with the first L/2 layers
    runtime = context.artifact("artifact", CompileOptions(max_seq_len=settings.max_seq_len, draft=probe,
                                                          tree="chain:1", check=False))  # fmt: skip
    prefix = settings.context
    decode_ms, verify_ms = context.step_costs(runtime, max_nodes=8)
    probe_ms = measured(
        "self_draft_ms", f"layers={count // 2},prefix={prefix}", lambda: measure_probe_ms(runtime, prefix)
    )
    costs = SelfDraftCosts(decode_ms, verify_ms, count // 2, probe_ms, count)
    ids = [prompt_ids(runtime, p) for p in prompts]
    key = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]
    new_tokens = settings.max_new_tokens
    found = measured(
        "self_acceptance",
        f"prompts={key},tokens={new_tokens}",
        lambda: search_acceptance(model, ids, new_tokens, log),
    )
    specs = {
        str(SelfDraftSpec("exit", exit_layer=e)): SelfDraftSpec("exit", exit_layer=e) for e in range(1, count)
    }
    specs.update(
        {name: parse_self_draft(name) for name in found["acceptance"] if name.startswith("self:skip")}
    )
    candidates = sorted(
        (predict(specs[name], a, costs) for name, a in found["acceptance"].items()),
        key=lambda c: -c["speedup"],
    )
    log(
        f"full step {decode_ms:.1f} ms, probe draft ({count // 2} layers + head) {probe_ms:.1f} ms, "
        f"per layer {costs.layer_ms:.2f} ms, head and rest {costs.draft_ms(0):.1f} ms"
    )
    for c in candidates[:5]:
        log(
            f"  {c['draft']}: acceptance {c['acceptance']:.3f}, "
            f"draft {c['draft_share_of_step']:.2f} of a step, "
            f"chain {c['chain']}: predicted {c['speedup']:.2f}x"
        )
    best = candidates[0]
    record = {
        **context.choice_header(runtime),
        "decode_ms": decode_ms,
        "verify_ms": verify_ms,
        "probe_draft_ms": probe_ms,
        "layer_ms": costs.layer_ms,
        "candidates": candidates,
        "layer_similarity": found["layer_similarity"],
    }
    if best["speedup"] <= 1.0:
        log(
            f"no self-draft pays off here (best {best['draft']}: predicted {best['speedup']:.2f}x): "
            "plain decoding chosen"
        )
        record.update(mode="plain", draft=None, predicted_speedup=1.0, measured_speedup=1.0)
    else:
        parents = list(chain(best["chain"]).parents)
        options = CompileOptions(max_seq_len=settings.max_seq_len, draft=best["draft"],
                                 tree=f"chain:{best['chain']}", check=False)  # fmt: skip
        winner = context.artifact("winner", options)
        speedup = measured(
            "measured_speedup",
            best["draft"],
            lambda: measure_speedup(winner, parents, prompts, new_tokens),
        )
        log(
            f"chosen {best['draft']} chain {best['chain']}: measured {speedup:.2f}x "
            f"(predicted {best['speedup']:.2f}x)"
        )
        record.update(
            mode="speculative",
            draft=best["draft"],
            parents=parents,
            predicted_speedup=best["speedup"],
            measured_speedup=speedup,
        )

    def write(folder: Path) -> Path:
        (folder / "report.md").write_text(report(record))
        return folder / "report.md"

    return Outcome(record, write)


def report(record: dict[str, Any]) -> str:
    lines = [
        f"# Self-draft search: {record['target']}",
        "",
        f"Full step {record['decode_ms']:.1f} ms; per layer {record['layer_ms']:.2f} ms; "
        f"verify ms by draft nodes {json.dumps({k: round(v, 1) for k, v in record['verify_ms'].items()})}.",
        f"Decision: **{record['mode']}**"
        + (
            f" with {record['draft']}"
            if record["draft"]
            else " (no self-draft is predicted to beat plain decoding)"
        ),
        "",
        "| draft | layers run | acceptance | draft / step | best chain | predicted |",
        "|---|---|---|---|---|---|",
    ]
    for c in record["candidates"][:15]:
        lines.append(
            f"| {c['draft']} | {c['layers_run']} | {c['acceptance']:.3f} | {c['draft_share_of_step']:.2f} "
            f"| {c['chain']} | {c['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
