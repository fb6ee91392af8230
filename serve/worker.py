"""The engine's thread: loads an artifact for batching, runs `BatchEngine.step()` while there is work,
and hands each request's tokens to the asyncio side that waits for them.

ONNX Runtime releases the GIL inside a call, so the event loop keeps answering (health, metrics,
new requests, disconnects) while a step runs. Requests enter through a thread-safe inbox and are
admitted between steps; a cancelled request (its client went away, or a stop string matched)
leaves its row at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skiptree.errors import ModelSourceError
from skiptree.runtime.artifact import free_sources, lone_rows_differ
from skiptree.runtime.batch_step import BatchRows
from skiptree.runtime.manifest import DecodeMode, GraphName, Manifest, read_manifest
from skiptree.runtime.onnx_step import SessionConfig
from skiptree.runtime.tokenizer import Tokenizer
from skiptree.runtime.tree import TreeShape
from skiptree.serve.budget import BatchCost, measure_batch_cost
from skiptree.serve.engine import BatchEngine, Request
from skiptree.serve.metrics import Metrics


@dataclass(frozen=True)
class EngineOptions:
    artifact: Path
    max_batch: int | None = None  # None: the artifact's
    threads: int | None = None  # None: the artifact's
    speculative: bool = True
    measure_cost: bool = True  # measure T_batch(b, T) at start (else verify whole drafts)


def batch_rows_of(manifest: Manifest) -> int:
    verify = manifest.graphs.get(GraphName.VERIFY)
    return (verify.max_batch or 1) if verify else 1


class EngineThread:
    """A `BatchEngine` over an artifact, stepped on its own thread."""

    def __init__(self, options: EngineOptions, metrics: Metrics, log=print):
        folder = Path(options.artifact)
        self.manifest = read_manifest(folder)
        verify = self.manifest.graphs.get(GraphName.VERIFY)
        compiled = batch_rows_of(self.manifest)
        if verify is None or compiled < 2 or self.manifest.backend.name != "onnxruntime":
            raise ModelSourceError(f"{folder} was not compiled for batching (its verify graph takes one "
                                   "request per call)", "recompile it with `skiptree compile ... "
                                   "--max-batch 8` (ONNX Runtime)")  # fmt: skip
        rows = min(options.max_batch or compiled, compiled)
        if rows < 1:
            raise ModelSourceError(f"--max-batch {options.max_batch} is not a request count",
                                   f"pass 1 to {compiled} (the artifact's)")  # fmt: skip
        backend = self.manifest.backend
        threads = backend.threads if options.threads is None else options.threads
        # ORT's threads sleep between calls instead of spinning: the HTTP side needs the cores between
        # steps (bench/results/serve.md, "spinning")
        config = SessionConfig(threads=threads, optimization_level=backend.optimization_level or "extended",
                               spinning=False)  # fmt: skip
        pads = lone_rows_differ(verify)
        self.rows = BatchRows(folder / verify.file, verify.signature, rows, config, pads)
        self.tokenizer = Tokenizer.from_folder(folder / self.manifest.tokenizer.folder)
        self.eos_token_ids = frozenset(self.manifest.tokenizer.eos_token_ids)
        spec = self.manifest.speculative
        speculative = (
            options.speculative and spec is not None and self.manifest.decode_mode == DecodeMode.SPECULATIVE
        )
        sources = free_sources(folder, self.manifest, spec) if speculative else []
        if speculative and not sources:
            log(f"[serve] the artifact's drafter '{spec.drafter}' does not batch: plain steps "
                "(free drafters batch: lookup, recycle, corpus)")  # fmt: skip
        shape = TreeShape(spec.tree.parents, spec.tree.spec) if sources else None
        if shape is not None and pads and list(shape.parents) != list(range(-1, shape.size - 1)):
            # as Runtime.description says: int8 activations make a branching tree inexact at near-ties
            log(f"[serve] LOSSY at near-ties: tree {spec.tree.spec} branches and the weights run with int8 "
                "activations (compile with a chain:N tree or --quantize ...:accuracy=0 for exact output)")
        max_tree = verify.max_tree or 1
        self.engine = BatchEngine(self.rows, max_tree, sources, shape)
        self.cost: BatchCost | None = None
        if self.engine.speculative and options.measure_cost:
            log(f"[serve] measuring the batched verify cost (1..{rows} requests, trees up to "
                f"{self.engine.max_tokens} tokens)")  # fmt: skip
            self.cost = measure_batch_cost(self._timed_call, rows, self.engine.max_tokens,
                                           log=lambda line: log(f"[serve]   {line}"))  # fmt: skip
            self.engine.cost = self.cost
        self.metrics, self.log = metrics, log
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="skiptree-engine", daemon=True)

    def _timed_call(self, rows: int, tokens: int) -> None:
        saved = self.rows.lengths.copy()
        self.rows.lengths[:rows] = min(64, self.rows.max_seq_len - tokens)  # a typical cached prefix
        chain = np.maximum(np.arange(tokens, dtype=np.int64) - 1, 0)
        self.rows.run(0, np.ones((rows, tokens), dtype=np.int64), np.tile(chain, (rows, 1)), ("next_ids",))
        self.rows.lengths[:] = saved

    def start(self) -> None:
        if not self.thread.is_alive():
            self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        self.inbox.put(request)
        self.wake.set()

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting) + self.inbox.qsize()

    def _loop(self) -> None:
        engine = self.engine
        while not self.stopping:
            while True:
                try:
                    request = self.inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    engine.submit(request)
                except ValueError as error:  # the API checks lengths first; one request never stops the loop
                    self.log(f"[serve] request refused: {error}")
                    request.on_finish("error")
            if engine.idle():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                stats = engine.step()
            except Exception as error:  # a failed step ends its requests with an error, not the server
                self.log(f"[serve] a step failed ({error!r}): its requests end with an error")
                engine.fail_active()
                continue
            self.metrics.observe_step(stats, len(engine.waiting), engine.active)


def bridge(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, request: Request) -> None:
    """Route a request's callbacks (engine thread) into `events` on `loop`: ("tokens", [ids]) and
    ("finish", reason)."""

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody waits any more
            request.cancel()

    request.on_tokens = lambda tokens: put(("tokens", list(tokens), time.perf_counter()))
    request.on_finish = lambda reason: put(("finish", reason, time.perf_counter()))
