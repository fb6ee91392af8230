"""`skiptree tune`: an autotuning session for one target and drafter on this machine.

Phases (each measurement persisted as taken; a rerun resumes where a killed one stopped):
compile the drafting artifact into the session -> plain step cost -> verify cost T(n) on a grid
-> acceptance of the drafter -> choose the tree (or plain) -> measure the chosen tree's real
speed-up -> write choice.json. `skiptree compile TARGET --tuned DIR` then builds the choice.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime

from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.compiler.tune.measure import (
    CALIBRATION_PROMPTS,
    DRAFT_WIDTHS,
    VERIFY_SIZES,
    acceptance_by_depth,
    choose_tree,
    measure_acceptance,
    measure_decode_ms,
    measure_depth_acceptance,
    measure_draft_level_ms,
    measure_speedup,
    measure_verify_ms,
)
from skiptree.compiler.tune.report import write_report
from skiptree.compiler.tune.session import TuneSession, read_choice
from skiptree.runtime.artifact import Runtime, is_artifact
from skiptree.runtime.device import device_description, device_fingerprint

CHAIN_DEPTH = 8  # chain used to measure how acceptance changes with depth


def this_device(backend: str = "onnxruntime") -> tuple[dict[str, Any], str]:
    if backend == "tvm":
        import tvm

        device = device_description("tvm", tvm.__version__)
    else:
        device = device_description("onnxruntime", onnxruntime.__version__)
    return device, device_fingerprint(device)


@dataclass(frozen=True)
class BackendChoice:
    """Which backend a session measures; for TVM, the MetaSchedule budget spent before measuring."""

    name: str = "onnxruntime"
    trials: int = 1000
    trials_per_task: int = 64
    only: tuple[str, ...] = ()  # tune only tasks whose name contains one of these (() = all)

    def compile_options(self, session_dir: Path, threads: int, max_seq_len: int, prefix: int
                        ) -> dict[str, Any]:  # fmt: skip
        """CompileOptions fields for the session's artifact: TVM gets a static, tuned entry per verify
        size of the T(n) grid (+1 for the root) and a decode step, tuned into the session."""
        if self.name != "tvm":
            return {}
        sizes = (1, *(n + 1 for n in VERIFY_SIZES if n + 1 + prefix < max_seq_len))
        return {"backend": "tvm", "threads": threads, "tvm_database": session_dir / "tvm_database",
                "tvm_trials": self.trials, "tvm_trials_per_task": self.trials_per_task,
                "tvm_tune_only": self.only,
                "tvm_static_tokens": sizes}  # fmt: skip


def tune(target: str, session_dir: Path, draft: str = "prompt-lookup", prompts: Sequence[str] | None = None,
         max_seq_len: int = 512, prefix: int = 256, width: int = 4, max_new_tokens: int = 64,
         threads: int = 1, temperature: float = 0.0, train_draft: str | None = None,
         train_options: dict[str, Any] | None = None, draft_vocab: int = 0,
         extra: dict[str, Any] | None = None, backend: BackendChoice | None = None,
         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
         ) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) a tuning session; returns the choice it wrote. `draft_vocab`: the draft's head
    keeps that many frequent tokens; `extra`: more provenance for the choice (a trained draft's record);
    `backend`: TVM sessions tune schedules first and measure the tuned code."""
    session_dir = Path(session_dir)
    backend = backend or BackendChoice()
    if backend.name == "tvm" and (train_draft or draft == "self:auto"):
        raise CompileOptionError(f"tune --backend tvm does not run {train_draft or draft} sessions yet",
                                 "tune those with --backend onnxruntime; tvm tunes prompt-lookup or a "
                                 "fixed --draft self:...")  # fmt: skip
    if train_draft == "feature-head":
        from skiptree.compiler.tune.feature_head import tune_feature_head

        _, fingerprint = this_device()
        return tune_feature_head(target, session_dir, fingerprint, max_seq_len=max_seq_len, prefix=prefix,
                                 max_new_tokens=max_new_tokens, threads=threads, prompts=prompts, log=log,
                                 **(train_options or {}))  # fmt: skip
    if train_draft == "exit-adapter":
        from skiptree.compiler.tune.exit_adapter import tune_exit_adapter

        device, fingerprint = this_device()
        return tune_exit_adapter(target, session_dir, fingerprint, device, max_seq_len=max_seq_len,
                                 prefix=prefix, max_new_tokens=max_new_tokens, threads=threads,
                                 prompts=prompts,
                                 log=log, **(train_options or {}))  # fmt: skip
    if draft == "self:auto":
        from skiptree.compiler.tune.self_draft import tune_self_draft

        device, fingerprint = this_device()
        return tune_self_draft(target, session_dir, fingerprint, device, prompts, max_seq_len, prefix,
                               max_new_tokens, threads, log)  # fmt: skip
    prompts = list(prompts or CALIBRATION_PROMPTS)
    prefix = min(prefix, max_seq_len // 2)  # room for the largest verify tree after the prefix
    device, fingerprint = this_device(backend.name)
    session = TuneSession.open(session_dir, fingerprint)
    log(f"session {session_dir}: {len(session.records)} measurements already taken on this device")
    artifact = session_dir / "artifact"
    if not is_artifact(artifact):
        log("compiling the drafting artifact into the session")
        backend_options = backend.compile_options(session_dir, threads, max_seq_len, prefix)
        options = CompileOptions(max_seq_len=max_seq_len, draft=draft, tree="chain:1", check=False,
                                 draft_vocab=draft_vocab, calibration_prompts=tuple(prompts),
                                 **backend_options)  # fmt: skip
        compile_model(target, artifact, options, log=log)
    runtime = Runtime(artifact, threads=threads)
    if runtime.speculative is not None and hasattr(runtime.speculative.drafter, "cost"):
        runtime.speculative.drafter.cost = None  # free drafters: acceptance of whole drafts, not gated

    def measured(kind: str, key: str, take: Callable[[], Any]) -> Any:
        return session.measure(kind, key, take, log)

    decode_ms = measured("decode_ms", f"prefix={prefix}", lambda: measure_decode_ms(runtime, prefix))
    verify_ms = {n: measured("verify_ms", f"n={n},prefix={prefix}",
                             lambda n=n: measure_verify_ms(runtime, n, prefix))
                 for n in VERIFY_SIZES if n + 1 + prefix < max_seq_len}  # fmt: skip
    prompt_key = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]
    level_ms = {w: measured("draft_level_ms", f"width={w},prefix={prefix}",
                            lambda w=w: measure_draft_level_ms(runtime, w, prefix))
                for w in DRAFT_WIDTHS}  # fmt: skip
    acceptance = measured("acceptance", f"drafter={draft},width={width},prompts={prompt_key}",
                          lambda: measure_acceptance(runtime, prompts, width, max_new_tokens))  # fmt: skip
    if temperature > 0:  # sampling: the tree is chosen for the acceptance at that temperature
        greedy_acceptance = acceptance
        acceptance = measured(
            "acceptance", f"drafter={draft},width={width},prompts={prompt_key},temperature={temperature}",
            lambda: measure_acceptance(runtime, prompts, width, max_new_tokens, temperature))  # fmt: skip
        log(f"greedy acceptance by rank {[round(p, 3) for p in greedy_acceptance['acceptance']]}; "
            f"at temperature {temperature}:")
    chain_acceptance = measured(
        "chain_acceptance", f"drafter={draft},depth={CHAIN_DEPTH},prompts={prompt_key}",
        lambda: measure_depth_acceptance(runtime, prompts, CHAIN_DEPTH, max_new_tokens))  # fmt: skip
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
            lambda: measure_speedup(runtime, choice["parents"], prompts, max_new_tokens))  # fmt: skip
        error = abs(measured_speedup - choice["predicted_speedup"]) / measured_speedup
        log(f"measured speed-up {measured_speedup:.2f}x (predicted {choice['predicted_speedup']:.2f}x, "
            f"{100 * error:.0f}% apart)")
    record = {"target": str(target), "model_sha256": runtime.manifest["model"]["weights_sha256"],
              "draft": draft, "device": device, "max_seq_len": max_seq_len,
              "decode_ms": decode_ms, "verify_ms": verify_ms, "acceptance": acceptance,
              "draft_level_ms": level_ms, "temperature": temperature,
              "chain_acceptance": chain_acceptance, "draft_vocab": draft_vocab, **(extra or {}),
              "backend": backend.name, "threads": threads,
              "tvm_tuning": runtime.manifest["backend"].get("tuning"),
              **{k: v for k, v in choice.items() if k != "candidates"},
              "measured_speedup": measured_speedup}  # fmt: skip
    session.write_choice(record)
    log(f"report: {write_report(session_dir, record, choice['candidates'])} and report.png")
    return record


def tuned_options(session_dir: Path, options: CompileOptions, model_sha256: str | None = None,
                  force: bool = False) -> CompileOptions:  # fmt: skip
    """The compile options a finished session chose (refused if tuned on another device or model)."""
    backend = "tvm" if (Path(session_dir) / "tvm_database").is_dir() else "onnxruntime"
    _, fingerprint = this_device(backend)  # a TVM session's measurements hold for TVM only
    choice = read_choice(session_dir, fingerprint, model_sha256, force)
    if choice.get("backend") == "tvm":  # the schedules were tuned for that target: compile for it
        options = CompileOptions(**{**options.__dict__, "backend": "tvm", "threads": choice["threads"],
                                    "tvm_database": Path(session_dir) / "tvm_database"})  # fmt: skip
    if choice["mode"] == "plain":
        return CompileOptions(**{**options.__dict__, "draft": None})
    if choice.get("draft_adapter"):  # a trained exit adapter
        options = CompileOptions(**{**options.__dict__, "draft_adapter": Path(choice["draft_adapter"])})
    if choice.get("draft_vocab"):  # the draft's shrunk head
        options = CompileOptions(**{**options.__dict__, "draft_vocab": choice["draft_vocab"]})
    tree_file = Path(session_dir) / "tree.json"
    tree_file.write_text(json.dumps({"parents": choice["parents"]}) + "\n")
    return CompileOptions(**{**options.__dict__, "draft": choice["draft"], "tree": str(tree_file),
                             "max_seq_len": options.max_seq_len or choice["max_seq_len"]})  # fmt: skip
