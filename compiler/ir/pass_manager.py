"""Passes and the pass manager: a pipeline is a list of named passes run in order.

A pass is a small class: `name`, frozen `options`, a docstring saying what it requires and
guarantees, and `run(ir) -> PassResult`. The manager runs the list, records each pass in
`ir.passes_run` (the artifact's manifest lists them), runs the verifier after each pass when
asked (tests always ask: their conftest sets `PassManager.always_verify`), and dumps the IR after
each pass to a folder when asked.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from skiptree.compiler.ir.dump import dump_ir
from skiptree.compiler.ir.graph import ModelIR, PassRecord, verify_ir


@dataclass(frozen=True)
class PassResult:
    ir: ModelIR
    modified: bool


class Pass:
    """Base of every pass. Subclasses set `name` and implement `run`; options are a dataclass."""

    name: ClassVar[str] = "pass"

    def options(self) -> dict[str, Any]:
        """The pass's options as JSON-able data (its dataclass fields), for the manifest."""
        if dataclasses.is_dataclass(self):
            return dataclasses.asdict(self)
        return {}

    def run(self, ir: ModelIR) -> PassResult:
        raise NotImplementedError


@dataclass
class PassManager:
    """Runs `pipeline` over an IR. `verify`: check invariants after each pass. `dump_dir`: write
    the IR (text + Graphviz DOT) after tracing and after each pass. `always_verify` (class-wide,
    off by default) verifies every manager's passes whatever its `verify`: the tests turn it on."""

    always_verify: ClassVar[bool] = False
    pipeline: Sequence[Pass]
    verify: bool = False
    dump_dir: Path | None = None
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)

    def run(self, ir: ModelIR) -> ModelIR:
        self._checkpoint(ir, 0, "trace")
        for index, step in enumerate(self.pipeline, start=1):
            start = time.perf_counter()
            result = step.run(ir)
            ir = result.ir
            ir.passes_run.append(PassRecord(step.name, step.options(), result.modified))
            status = "modified" if result.modified else "unchanged"
            seconds = time.perf_counter() - start
            self.log(f"  pass {index}/{len(self.pipeline)} {step.name}: {status} ({seconds:.2f} s)")
            self._checkpoint(ir, index, step.name)
        return ir

    def _checkpoint(self, ir: ModelIR, index: int, name: str) -> None:
        if self.verify or self.always_verify:
            verify_ir(ir, after_pass=name)
        if self.dump_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            dump_ir(ir, Path(self.dump_dir) / f"{index:02d}-{safe}")
