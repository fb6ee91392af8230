"""Strategy: shape the draft tree of a drafter that proposes trees (free drafters, a draft model, a
feature head) with Sequoia's DP over measured costs and acceptance, or choose plain decoding.

Phases (each measurement persisted as taken): compile the drafting artifact into the session ->
plain step cost -> verify cost T(n) on a grid -> the draft's cost per tree level -> acceptance by
rank (width-W trees) and by depth (a chain) -> choose (compiler/tune/choose.py) -> measure the
chosen tree's real speed-up. The report: report.md and report.png (compiler/tune/report.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from skiptree.compiler.options import CompileOptions
from skiptree.compiler.tune.choose import acceptance_by_depth, choose_tree
from skiptree.compiler.tune.context import Outcome, TuneContext
from skiptree.compiler.tune.measure import (
    DRAFT_WIDTHS,
    measure_acceptance,
    measure_depth_acceptance,
    measure_draft_level_ms,
    measure_speedup,
)
from skiptree.compiler.tune.report import write_report

CHAIN_DEPTH = 8  # chain used to measure how acceptance changes with depth


def tune_draft_tree(context: TuneContext, draft: str, draft_vocab: int = 0,
                    extra: dict[str, Any] | None = None) -> Outcome:  # fmt: skip
    """`draft_vocab`: the draft's head keeps that many frequent tokens; `extra`: more provenance for
    the choice (a trained draft's record)."""
    settings, log, measured = context.settings, context.log, context.measured
    prompts, prefix = list(settings.prompts), settings.context
    backend_options = context.backend.compile_options(context.folder, settings.threads, settings.max_seq_len,
                                                      prefix)  # fmt: skip
    options = CompileOptions(max_seq_len=settings.max_seq_len, draft=draft, tree="chain:1", check=False,
                             draft_vocab=draft_vocab, calibration_prompts=tuple(prompts),
                             **backend_options)  # fmt: skip
    runtime = context.artifact("artifact", options)
    if runtime.speculative is not None and hasattr(runtime.speculative.drafter, "cost"):
        runtime.speculative.drafter.cost = None  # free drafters: acceptance of whole drafts, not gated

    decode_ms, verify_ms = context.step_costs(runtime)
    prompt_key = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]
    level_ms = {w: measured("draft_level_ms", f"width={w},prefix={prefix}",
                            lambda w=w: measure_draft_level_ms(runtime, w, prefix))
                for w in DRAFT_WIDTHS}  # fmt: skip
    width, new_tokens, temperature = settings.width, settings.max_new_tokens, settings.temperature
    acceptance = measured("acceptance", f"drafter={draft},width={width},prompts={prompt_key}",
                          lambda: measure_acceptance(runtime, prompts, width, new_tokens))  # fmt: skip
    if temperature > 0:  # sampling: the tree is chosen for the acceptance at that temperature
        greedy_acceptance = acceptance
        acceptance = measured(
            "acceptance", f"drafter={draft},width={width},prompts={prompt_key},temperature={temperature}",
            lambda: measure_acceptance(runtime, prompts, width, new_tokens, temperature))  # fmt: skip
        log(f"greedy acceptance by rank {[round(p, 3) for p in greedy_acceptance['acceptance']]}; "
            f"at temperature {temperature}:")
    chain_acceptance = measured(
        "chain_acceptance", f"drafter={draft},depth={CHAIN_DEPTH},prompts={prompt_key}",
        lambda: measure_depth_acceptance(runtime, prompts, CHAIN_DEPTH, new_tokens))  # fmt: skip
    by_depth = acceptance_by_depth(acceptance["acceptance"], chain_acceptance)
    log(f"acceptance of a chain's k-th draft given the ones before, k = 1..{CHAIN_DEPTH}: "
        f"{[round(p, 3) for p in chain_acceptance]}")
    choice = choose_tree(acceptance, verify_ms, decode_ms, level_ms=level_ms, by_depth=by_depth)
    costs = {n: round(v, 1) for n, v in verify_ms.items()}
    log(f"plain step {decode_ms:.1f} ms; verify ms by draft nodes {json.dumps(costs)}")
    log(f"acceptance by rank {[round(p, 3) for p in acceptance['acceptance']]}, hit rate "
        f"{acceptance['hit_rate']:.2f}")
    if choice["mode"] == "plain":
        log("no draft tree is predicted to beat plain decoding here: plain decoding chosen")
        measured_speedup = 1.0
    else:
        log(f"chosen: {choice['nodes']} nodes, depth {choice['depth']}, expected tokens/step "
            f"{choice['expected_tokens']:.2f}, predicted speed-up {choice['predicted_speedup']:.2f}x")
        measured_speedup = measured(
            "measured_speedup", json.dumps(choice["parents"]),
            lambda: measure_speedup(runtime, choice["parents"], prompts, new_tokens))  # fmt: skip
        error = abs(measured_speedup - choice["predicted_speedup"]) / measured_speedup
        log(f"measured speed-up {measured_speedup:.2f}x (predicted {choice['predicted_speedup']:.2f}x, "
            f"{100 * error:.0f}% apart)")
        if measured_speedup <= 1.0:  # the model was wrong here: what was measured decides
            log("the chosen tree measured no faster than plain decoding: plain decoding chosen")
            choice = {**choice, "mode": "plain", "parents": [], "rejected_parents": choice["parents"]}
    record = {**context.choice_header(runtime),
              "draft": draft, "decode_ms": decode_ms, "verify_ms": verify_ms, "acceptance": acceptance,
              "draft_level_ms": level_ms, "temperature": temperature,
              "chain_acceptance": chain_acceptance, "draft_vocab": draft_vocab, **(extra or {}),
              "backend": context.backend.name, "threads": settings.threads,
              "tvm_tuning": runtime.manifest.backend.tuning,
              **{k: v for k, v in choice.items() if k != "candidates"},
              "measured_speedup": measured_speedup}  # fmt: skip
    return Outcome(record, lambda folder: write_report(folder, record, choice["candidates"]))
