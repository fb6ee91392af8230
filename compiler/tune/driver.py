"""`skiptree tune`: one driver for every drafter family: measure -> choose -> report, resumable.

A session is a folder (compiler/tune/session.py): every measurement is persisted as it is taken,
keyed by this machine's fingerprint, so a rerun resumes where a killed one stopped. The driver opens
the session and the settings once (`TuneContext`, compiler/tune/context.py); a strategy per
drafter family measures and chooses; the driver writes `choice.json` and the report.
`skiptree compile TARGET --tuned DIR` then builds the choice (`tuned_options`).

  strategy                    for                                   module
  tune_draft_tree             free drafters, a draft model, a       compiler/tune/draft_tree.py
                              feature head (Sequoia's DP over T(n))
  tune_self_draft             --draft self:auto (prefix exits,      compiler/tune/self_draft.py
                              skip sets; a chain)
  tune_exit_adapter           --train-draft exit-adapter            compiler/tune/trained.py
  tune_feature_head           --train-draft feature-head (trains,   compiler/tune/trained.py
                              then tune_draft_tree)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.compiler.tune.context import (
    TRAIN_DRAFTS,
    BackendChoice,
    TrainSettings,
    TuneContext,
    TuneSettings,
    this_device,
)
from skiptree.compiler.tune.draft_tree import tune_draft_tree
from skiptree.compiler.tune.measure import CALIBRATION_PROMPTS
from skiptree.compiler.tune.self_draft import tune_self_draft
from skiptree.compiler.tune.session import TuneSession, read_choice
from skiptree.compiler.tune.trained import tune_exit_adapter, tune_feature_head
from skiptree.runtime.manifest import TreeProvenance


def tune(target: str, session_dir: Path, draft: str = "prompt-lookup", prompts: Sequence[str] | None = None,
         max_seq_len: int = TuneSettings.max_seq_len, prefix: int = TuneSettings.prefix,
         width: int = TuneSettings.width, max_new_tokens: int = TuneSettings.max_new_tokens,
         threads: int = TuneSettings.threads, temperature: float = TuneSettings.temperature,
         train_draft: str | None = None, train_options: dict[str, Any] | None = None,
         backend: BackendChoice | None = None,
         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
         ) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) a tuning session; returns the choice it wrote. `train_options`: TrainSettings
    fields; `backend`: TVM sessions tune schedules first and measure the tuned code."""
    backend = backend or BackendChoice()
    if train_draft is not None and train_draft not in TRAIN_DRAFTS:
        raise CompileOptionError(f"--train-draft {train_draft} is unknown",
                                 f"use one of: {', '.join(TRAIN_DRAFTS)}")  # fmt: skip
    if backend.name == "tvm" and (train_draft or draft == "self:auto"):
        raise CompileOptionError(f"tune --backend tvm does not run {train_draft or draft} sessions yet",
                                 "tune those with --backend onnxruntime; tvm tunes prompt-lookup or a "
                                 "fixed --draft self:...")  # fmt: skip
    settings = TuneSettings(max_seq_len, prefix, width, max_new_tokens, threads, temperature,
                            tuple(prompts or CALIBRATION_PROMPTS))  # fmt: skip
    train = TrainSettings(**(train_options or {}))
    device, fingerprint = this_device(backend.name)
    session = TuneSession.open(Path(session_dir), fingerprint)
    log(f"session {session_dir}: {len(session.records)} measurements already taken on this device")
    context = TuneContext(str(target), session, device, settings, backend, log)
    if train_draft == "feature-head":
        outcome = tune_feature_head(context, train)
    elif train_draft == "exit-adapter":
        outcome = tune_exit_adapter(context, train)
    elif draft == "self:auto":
        outcome = tune_self_draft(context)
    else:
        outcome = tune_draft_tree(context, draft)
    session.write_choice(outcome.choice)
    if outcome.report is not None:
        log(f"report: {outcome.report(session.folder)}")
    return outcome.choice


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
    chosen: dict[str, Any] = {}  # one CompileOptions at the end: its checks see the whole choice
    if choice.get("draft_adapter"):  # a trained exit adapter
        chosen["draft_adapter"] = Path(choice["draft_adapter"])
    if choice.get("draft_vocab"):  # the draft's shrunk head
        chosen["draft_vocab"] = choice["draft_vocab"]
    tree_file = Path(session_dir) / "tree.json"
    tree_file.write_text(json.dumps({"parents": choice["parents"]}) + "\n")
    if isinstance(choice.get("acceptance"), dict):  # a tree: acceptance of each rank's draft
        acceptance = choice["acceptance"]["acceptance"]
    else:  # a chain: its draft's held-out (trained exit adapter) or searched (self-draft) acceptance
        best = next((c for c in choice.get("candidates", ()) if c.get("draft") == choice["draft"]), {})
        rate = (choice.get("adapter") or {}).get("held_out_acceptance", best.get("acceptance"))
        acceptance = [] if rate is None else [rate]
    device, costs = choice.get("device"), choice.get("verify_ms") or {}
    chosen["tree_provenance"] = TreeProvenance.from_json({
        "session": str(session_dir), "forced": force, "acceptance": acceptance,
        "device": {**device, "fingerprint": choice.get("fingerprint")} if device else None,
        "decode_ms": choice.get("decode_ms"), "verify_ms": {str(n): ms for n, ms in costs.items()},
        "predicted_speedup": choice.get("predicted_speedup"),
        "measured_speedup": choice.get("measured_speedup")}, "tree_provenance")  # fmt: skip
    return CompileOptions(**{**options.__dict__, **chosen, "draft": choice["draft"], "tree": str(tree_file),
                             "max_seq_len": options.max_seq_len or choice["max_seq_len"]})  # fmt: skip
