"""What every tuning strategy works with: the settings (defaults once), the open session with this
machine's description, the measuring helpers every family shares, and the outcome it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime

from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.tune.measure import (
    CALIBRATION_PROMPTS,
    VERIFY_SIZES,
    measure_decode_ms,
    measure_verify_ms,
)
from skiptree.compiler.tune.session import TuneSession
from skiptree.runtime.artifact import Runtime, is_artifact
from skiptree.runtime.device import device_description, device_fingerprint

TRAIN_DRAFTS = ("exit-adapter", "feature-head")


def this_device(backend: str = "onnxruntime") -> tuple[dict[str, Any], str]:
    if backend == "tvm":
        import tvm  # an optional heavy backend: imported only for TVM sessions

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


@dataclass(frozen=True)
class TuneSettings:
    """What every session measures with. The defaults live here, once."""

    max_seq_len: int = 512
    prefix: int = 256  # context before each timed step (at most max_seq_len / 2)
    width: int = 4  # root children measured for acceptance by rank
    max_new_tokens: int = 64
    threads: int = 1
    temperature: float = 0.0  # > 0: tune for sampling at this temperature
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS

    @property
    def context(self) -> int:
        """The prefix actually used: room for the largest verify tree after it."""
        return min(self.prefix, self.max_seq_len // 2)


@dataclass(frozen=True)
class TrainSettings:
    """--train-draft options; None keeps the family's own default (its function's keyword)."""

    exit_layer: int | None = None
    draft_vocab: int | None = None
    steps: int | None = None
    distill_prompts: int | None = None
    self_requests: int | None = None

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class TuneContext:
    """One open session: the target, this machine, the settings, and the measuring helpers."""

    target: str
    session: TuneSession
    device: dict[str, Any]
    settings: TuneSettings
    backend: BackendChoice = field(default_factory=BackendChoice)
    log: Callable[[str], None] = print

    @property
    def folder(self) -> Path:
        return self.session.folder

    def measured(self, kind: str, key: str, take: Callable[[], Any]) -> Any:
        """The session's value for (kind, key), taken now (and persisted) if missing."""
        return self.session.measure(kind, key, take, self.log)

    def artifact(self, name: str, options: CompileOptions) -> Runtime:
        """A session artifact compiled once (a rerun reuses it), opened at the session's threads."""
        folder = self.folder / name
        if not is_artifact(folder):
            self.log(f"compiling {name} ({options.draft}) into the session")
            compile_model(self.target, folder, options, log=self.log)
        return Runtime(folder, threads=self.settings.threads)

    def step_costs(self, runtime: Runtime, max_nodes: int | None = None) -> tuple[float, dict[int, float]]:
        """The plain step and the verify cost T(n) on the grid (n <= max_nodes), at the same context."""
        prefix, limit = self.settings.context, self.settings.max_seq_len
        decode_ms = self.measured("decode_ms", f"prefix={prefix}",
                                  lambda: measure_decode_ms(runtime, prefix))  # fmt: skip
        sizes = [n for n in VERIFY_SIZES
                 if n + 1 + prefix < limit and (max_nodes is None or n <= max_nodes)]  # fmt: skip
        verify_ms = {n: self.measured("verify_ms", f"n={n},prefix={prefix}",
                                      lambda n=n: measure_verify_ms(runtime, n, prefix))
                     for n in sizes}  # fmt: skip
        return decode_ms, verify_ms

    def choice_header(self, runtime: Runtime) -> dict[str, Any]:
        """What every choice.json starts with: what was tuned, for which weights, on which device."""
        weights = runtime.manifest.model.weights_sha256
        return {"target": str(self.target), "model_sha256": weights, "device": self.device,
                "max_seq_len": self.settings.max_seq_len}  # fmt: skip


@dataclass
class Outcome:
    """A strategy's result: the choice record, and how to write the session's report (or None)."""

    choice: dict[str, Any]
    report: Callable[[Path], Path] | None = None
