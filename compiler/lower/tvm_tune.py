"""MetaSchedule tuning of a graph's static entries, kept in a tune session's `tvm_database/`.

The verify graph is imported with a static entry per token count the decoder runs (one token for a
plain step, n + 1 for a tree of n drafts), legalised to TIR, and its distinct TIR functions (tasks)
are tuned for this machine's CPU. Every measured candidate is committed to a JSON database as it is
taken, so a killed session resumes: the trials already recorded count against the budget. A later
`skiptree compile --backend tvm --tuned DIR` (or `--tvm-database DIR/tvm_database`) applies the best
record of every task it finds there. The step matmuls are not tasks: `tvm_schedules` schedules
them by hand (MetaSchedule measures candidates with the weights hot in cache; a step streams them
from memory), so the budget goes to the rest (softmax, norms, rotary, elementwise).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from skiptree.compiler.lower.to_tvm import ImportedGraph, legalize, quiet_native_logs, static_module
from skiptree.compiler.lower.tvm_schedules import IS_SCHEDULED

DATABASE_DIR = "tvm_database"
RECORDS_FILE = "database_tuning_record.json"
BUILD_TIMEOUT_SEC = 60.0  # a candidate that builds longer is a failed trial (some never finish)


@dataclass(frozen=True)
class ScheduleTuning:
    """The MetaSchedule budget: `trials` in all (a total over runs: a resumed run counts what is
    recorded), at most `trials_per_task` per task; schedules for `threads` cores."""

    trials: int = 1000
    trials_per_task: int = 64
    threads: int = 1
    only: tuple[str, ...] = ()  # tasks whose name contains one of these (() = all)


def recorded_trials(database_dir: Path) -> int:
    """Measured candidates already committed to the database (one JSON line each)."""
    path = Path(database_dir) / RECORDS_FILE
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def worker_builder(pool: Any, timeout_sec: float) -> Any:
    """A MetaSchedule builder with one build worker process that lives across batches.

    `LocalBuilder` starts fresh worker processes for every batch (to dodge a worker memory leak):
    measured here, ~40 s a batch on 2 busy cores, more than building 32 candidates. Building in
    this process instead has no timeout, and some candidates never finish (an argmax and a softmax
    candidate of SmolLM2's step each ran for minutes inside TVM's lowering). So: one persistent
    worker (`pool`, a one-worker PopenPoolExecutor), killed and restarted on a candidate that takes
    over `timeout_sec` (a failed trial) and every few hundred builds (the leak).
    """
    @derived_object
    class WorkerBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list) -> list:
            jobs = [(None, None, build_input.mod, build_input.target, None) for build_input in build_inputs]
            results = []
            for outcome in pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {timeout_sec} s"))
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed: {outcome.value}"))
            return results

    return WorkerBuilder()


class _ProgressLines(logging.Handler):
    """Forwards MetaSchedule's per-round summary lines ("Total trials: ...") to our log."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for line in message.splitlines():
            if line.startswith("Total trials:") or "Task #" in line and "Updated" in line:
                self.log(f"         {line.strip()}")


def _worth_tuning(task: Any, tuning: ScheduleTuning) -> bool:
    """Not a task: functions `tvm_schedules` scheduled (MetaSchedule itself checks only the module's
    attrs); plain reshapes (views at run time: never run); argmax (~0.1 ms a step, and some of its
    candidates were seen to build for minutes)."""
    name, attrs = task.task_name, task.dispatched[0]["main"].attrs
    if attrs is not None and bool(attrs.get(IS_SCHEDULED, False)):
        return False
    if re.fullmatch(r"reshape\d*", name) or name.startswith("argmax"):
        return False
    return not tuning.only or any(part in name for part in tuning.only)


def tune_schedules(imported: ImportedGraph, target: Any, database_dir: Path, tuning: ScheduleTuning,
                   log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Tune an imported graph's static entries into `database_dir`; returns what was done."""
    database_dir = Path(database_dir)
    database_dir.mkdir(parents=True, exist_ok=True)
    module = static_module(legalize(imported.module, target))
    with quiet_native_logs():
        tasks = ms.relax_integration.extract_tasks(module, target)
    tasks = [task for task in tasks if _worth_tuning(task, tuning)]
    done = recorded_trials(database_dir)
    remaining = tuning.trials - done
    log(f"MetaSchedule: {len(tasks)} tasks for token counts {imported.static_tokens}; "
        f"{done} of {tuning.trials} trials already recorded in {database_dir}")  # fmt: skip
    start = time.perf_counter()
    if remaining > 0:
        log(f"         tuning {remaining} more trials (at most {tuning.trials_per_task} per task; "
            "one build worker; a killed run resumes from what is recorded)")  # fmt: skip
        logger = logging.getLogger("tvm.s_tir.meta_schedule")
        # MetaSchedule rebuilds its logging config from the names of this logger's handlers; an
        # unnamed one (pytest's log capture, seen in CI) breaks that (None.format): keep them off
        unnamed = [handler for handler in logger.handlers if handler.get_name() is None]
        for handler in unnamed:
            logger.removeHandler(handler)
        progress = _ProgressLines(log)
        pool = PopenPoolExecutor(max_workers=1, timeout=BUILD_TIMEOUT_SEC, maximum_process_uses=256)
        try:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work_dir=str(database_dir), num_threads=tuning.threads)
            logger.addHandler(progress)  # after the logging config is built: it is unnamed too
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(database_dir),
                max_trials_global=remaining, max_trials_per_task=tuning.trials_per_task,
                num_trials_per_iter=min(8, tuning.trials_per_task),  # a first round reaches every task
                builder=worker_builder(pool, BUILD_TIMEOUT_SEC),
                runner=ms.runner.LocalRunner(timeout_sec=60),
                database=ms.database.JSONDatabase(work_dir=str(database_dir)),
            )  # fmt: skip
        finally:
            pool.shutdown()  # the build worker process ends with the tuning
            logger.removeHandler(progress)
            for handler in unnamed:
                logger.addHandler(handler)
    seconds = time.perf_counter() - start
    total = recorded_trials(database_dir)
    log(f"         {total} trials recorded ({total - done} this run, {seconds:.0f} s)")
    return {"tasks": len(tasks), "trials": total, "budget": tuning.trials, "seconds": round(seconds, 1),
            "token_counts": imported.static_tokens, "threads": tuning.threads}  # fmt: skip
